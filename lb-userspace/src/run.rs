//! `xdplb run`: validate, resolve, load, fill the maps, attach, then wait for a signal.

use std::{collections::HashMap, net::IpAddr, path::Path, time::Duration};

use anyhow::Context as _;
use tokio::signal::unix::{signal, SignalKind};

use crate::{
    config::{Config, ThisHost},
    dataplane::{self, Director},
    netlink::Netlink,
};

/// How long to wait for a backend's MAC to appear in the neighbour table.
const NEIGHBOUR_TIMEOUT: Duration = Duration::from_secs(3);

pub struct RunOptions<'a> {
    pub config: &'a Path,
    pub pin_dir: &'a Path,
    /// Leave the pinned director forwarding when the controller exits.
    pub keep_attached: bool,
    /// Log every packet's fate from the data plane (slow; for debugging only).
    pub debug_log: bool,
}

/// Resolve every backend MAC the config leaves out, before anything is loaded.
async fn backend_macs(nl: &Netlink, cfg: &Config) -> anyhow::Result<HashMap<IpAddr, [u8; 6]>> {
    let mut macs = HashMap::new();
    for (i, svc) in cfg.services.iter().enumerate() {
        if svc.mode != crate::config::Mode::Dr {
            continue;
        }
        for (j, b) in svc.backends.iter().enumerate() {
            let mac = match b.mac() {
                Some(m) => m.0,
                None => match macs.get(&b.address) {
                    Some(m) => *m,
                    None => nl
                        .resolve(b.address, NEIGHBOUR_TIMEOUT)
                        .await
                        .with_context(|| format!("services[{i}].backends[{j}] ({})", b.address))?,
                },
            };
            macs.insert(b.address, mac);
        }
    }
    Ok(macs)
}

pub async fn run(opts: RunOptions<'_>) -> anyhow::Result<()> {
    let cfg = Config::load(opts.config, &ThisHost)?;
    let nl = Netlink::new().context("opening rtnetlink")?;
    let mut iface_macs = Vec::new();
    for iface in &cfg.interfaces {
        iface_macs.push(nl.link_mac(&iface.name).await?);
    }
    let macs = backend_macs(&nl, &cfg).await?;
    // TUN backends need no MAC of their own, but the kernel must know the next hop toward
    // them; a datagram to each makes it resolve that neighbour before the first packet.
    for svc in cfg
        .services
        .iter()
        .filter(|s| s.mode == crate::config::Mode::Tun)
    {
        for b in &svc.backends {
            crate::netlink::poke(b.address);
        }
    }
    let want = dataplane::desired(&cfg, |b| macs.get(&b.address).copied().unwrap_or_default());

    let mut director = Director::load(&dataplane::LoadOptions {
        flow_table_size: cfg.flow_table_size(),
        pin_dir: Some(opts.pin_dir),
        debug_log: opts.debug_log,
    })?;
    if opts.debug_log {
        log::warn!("per-packet debug logging is on: expect a much slower data plane");
        let logger = director.logger(log::logger())?;
        // SAFETY: the logger owns its ring buffer fd, which stays open and unchanged for as
        // long as the AsyncFd (which owns the logger) lives.
        let mut fd = unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE)
        }
        .map_err(|e| anyhow::anyhow!("watching the debug log: {}", e.into_parts().1))?;
        tokio::spawn(async move {
            while let Ok(mut guard) = fd.readable_mut().await {
                guard.get_inner_mut().flush();
                guard.clear_ready();
            }
        });
    }
    let setup = (|| -> anyhow::Result<()> {
        // Maps first, so the first packet the program sees meets a complete configuration.
        director.apply(&want)?;
        for (iface, mac) in cfg.interfaces.iter().zip(&iface_macs) {
            director.attach(
                &iface.name,
                iface.xdp_mode,
                dataplane::iface_info(iface, *mac),
            )?;
        }
        Ok(())
    })();
    if let Err(e) = setup {
        director.unpin().ok();
        return Err(e);
    }
    log::info!(
        "xdplb running: {} service(s), {} backend(s) on {}",
        cfg.services.len(),
        want.backends.len(),
        cfg.interfaces
            .iter()
            .map(|i| i.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    );

    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = hup.recv() => log::warn!("SIGHUP: configuration reload is not available in this version; restart the controller to apply changes"),
        }
    }
    if opts.keep_attached {
        log::info!(
            "exiting; director left attached and pinned under {}",
            opts.pin_dir.display()
        );
        // Dropping the loader must not detach: links are pinned, maps are pinned.
        std::mem::forget(director);
    } else {
        director.unpin()?;
        log::info!("detached and unpinned");
    }
    Ok(())
}
