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
/// How often idle UDP flows (and their NAT state) are removed from the tables.
const SWEEP_INTERVAL: Duration = Duration::from_secs(5);
/// How often routed backends are poked so their next hop stays resolved.
const NEIGHBOUR_REFRESH: Duration = Duration::from_secs(20);

/// Notices NAT traffic whose replies never come back through the director — the classic
/// mistake of a (one-armed) NAT set-up whose backends do not route via the director, which
/// no config check can see from here.
#[derive(Default)]
struct ReplyWatch {
    last: Option<(u64, u64)>,
    warned: bool,
}

impl ReplyWatch {
    /// Packets forwarded to backends in one interval, with no reply at all, before warning.
    const THRESHOLD: u64 = 3;

    fn check(&mut self, totals: &[u64]) {
        let now = (
            totals[lb_common::reason::FWD_NAT as usize],
            totals[lb_common::reason::FWD_NAT_REPLY as usize],
        );
        if let Some((fwd, back)) = self.last {
            let (sent, returned) = (now.0 - fwd, now.1 - back);
            if sent >= Self::THRESHOLD && returned == 0 && !self.warned {
                log::warn!(
                    "NAT: {sent} packets went to backends in the last {SWEEP_INTERVAL:?} and no reply came back \
                     through the director (if this service expects replies: NAT backends must route them via it, as \
                     their default gateway, or use mode: fullnat)"
                );
                self.warned = true;
            } else if returned > 0 {
                self.warned = false;
            }
        }
        self.last = Some(now);
    }
}

/// Addresses of the backends of services in one of `modes` (each once).
fn backends_of(cfg: &Config, modes: &[crate::config::Mode]) -> Vec<IpAddr> {
    let mut out: Vec<IpAddr> = cfg
        .services
        .iter()
        .filter(|s| modes.contains(&s.mode))
        .flat_map(|s| s.backends.iter().map(|b| b.address))
        .collect();
    out.sort();
    out.dedup();
    out
}

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
    // Routed modes (TUN, NAT, full-NAT) need no backend MAC in the config, but the kernel must
    // know the next hop toward each backend: the XDP FIB lookup does not resolve neighbours,
    // and a full-NAT packet handed to the kernel instead is dropped (its source is ours).
    use crate::config::Mode;
    let routed = backends_of(&cfg, &[Mode::Tun, Mode::Nat, Mode::Fullnat]);
    for b in &routed {
        crate::netlink::poke(*b);
    }
    // NAT backends are usually on a directly attached subnet: wait for them to resolve.
    for b in backends_of(&cfg, &[Mode::Nat, Mode::Fullnat]) {
        if let Err(e) = nl.resolve(b, NEIGHBOUR_TIMEOUT).await {
            log::warn!("{e:#}; its first packets go through the kernel until it answers");
        }
    }
    let want = dataplane::desired(&cfg, |b| macs.get(&b.address).copied().unwrap_or_default());

    let mut director = Director::load(&dataplane::LoadOptions {
        flow_table_size: cfg.flow_table_size(),
        pin_dir: Some(opts.pin_dir),
        debug_log: opts.debug_log,
        udp_idle: cfg.udp_idle_timeout(),
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
    // Keep the next hops of routed backends in the neighbour table: the kernel sees none of
    // the traffic XDP forwards, so it would otherwise let the entries lapse.
    let mut refresh = tokio::time::interval(NEIGHBOUR_REFRESH);
    let mut sweep = tokio::time::interval(SWEEP_INTERVAL);
    let mut replies = ReplyWatch::default();
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = refresh.tick() => routed.iter().for_each(|b| crate::netlink::poke(*b)),
            _ = sweep.tick() => {
                match dataplane::sweep_idle_udp(&mut director.maps, cfg.udp_idle_timeout()) {
                    Ok(0) => {}
                    Ok(n) => log::debug!("removed {n} idle UDP flow(s)"),
                    Err(e) => log::warn!("sweeping idle UDP flows: {e}"),
                }
                if let Ok(totals) = director.maps.reason_totals() {
                    replies.check(&totals);
                }
            }
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
