//! `xdplb decap`: the backend side of TUN mode. Loads the small decapsulation object, tells
//! it this host's addresses (refreshed while it runs), attaches it and reports its counters.

use std::{net::IpAddr, time::Duration};

use anyhow::Context as _;
use aya::{
    maps::{HashMap, MapData, PerCpuArray},
    programs::Xdp,
    Ebpf, EbpfLoader,
};
use lb_common::{decap_reason, AddrKey};
use tokio::signal::unix::{signal, SignalKind};

use crate::{config, dataplane::addr_bytes, netlink::Netlink};

/// The decapsulation object built by `build.rs` from `lb-ebpf` (binary `decap`).
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/decap"));
pub const PROGRAM: &str = "xdplb_decap";

fn key(addr: IpAddr) -> AddrKey {
    let (addr, family) = addr_bytes(addr);
    AddrKey {
        addr,
        family,
        _pad: [0; 3],
    }
}

/// A loaded (and, after [`Decap::attach`], attached) decapsulation program.
pub struct Decap {
    ebpf: Ebpf,
    addrs: HashMap<MapData, AddrKey, u32>,
    stats: PerCpuArray<MapData, u64>,
}

impl Decap {
    /// Load; with `vips` non-empty, only packets for those inner destinations are unwrapped.
    pub fn load(vips: &[IpAddr]) -> anyhow::Result<Self> {
        let filter = u8::from(!vips.is_empty());
        let mut ebpf = EbpfLoader::new()
            .override_global("FILTER_VIPS", &filter, true)
            .load(OBJECT)
            .context("loading the decapsulation object")?;
        let prog: &mut Xdp = ebpf
            .program_mut(PROGRAM)
            .context("program missing")?
            .try_into()?;
        prog.load()?;
        let mut filter_map: HashMap<MapData, AddrKey, u32> = ebpf
            .take_map("DECAP_VIPS")
            .context("DECAP_VIPS")?
            .try_into()?;
        for vip in vips {
            filter_map.insert(key(*vip), 1, 0)?;
        }
        let addrs = ebpf
            .take_map("DECAP_ADDRS")
            .context("DECAP_ADDRS")?
            .try_into()?;
        let stats = ebpf
            .take_map("DECAP_STATS")
            .context("DECAP_STATS")?
            .try_into()?;
        Ok(Decap { ebpf, addrs, stats })
    }

    /// Outer destinations to accept: this host's addresses (stale ones are removed).
    pub fn set_local_addrs(&mut self, addrs: &[IpAddr]) -> anyhow::Result<()> {
        let want: Vec<AddrKey> = addrs.iter().map(|a| key(*a)).collect();
        let old: Vec<AddrKey> = self.addrs.keys().filter_map(|k| k.ok()).collect();
        for k in &want {
            self.addrs.insert(*k, 1, 0)?;
        }
        for k in old.iter().filter(|k| !want.contains(k)) {
            self.addrs.remove(k)?;
        }
        Ok(())
    }

    pub fn program(&self) -> &Xdp {
        self.ebpf
            .program(PROGRAM)
            .and_then(|p| p.try_into().ok())
            .expect("loaded")
    }

    pub fn attach(&mut self, iface: &str, mode: config::XdpMode) -> anyhow::Result<()> {
        let prog: &mut Xdp = self
            .ebpf
            .program_mut(PROGRAM)
            .context("program missing")?
            .try_into()?;
        crate::dataplane::attach_xdp(prog, iface, mode)?;
        Ok(())
    }

    /// Packets per `decap_reason` slot, summed over CPUs.
    pub fn counters(&self) -> anyhow::Result<Vec<u64>> {
        (0..decap_reason::COUNT)
            .map(|i| Ok(self.stats.get(&i, 0)?.iter().sum()))
            .collect()
    }
}

/// Run until SIGINT/SIGTERM: attach to `iface`, keep the local address list current.
pub async fn run(iface: &str, vips: &[IpAddr], mode: config::XdpMode) -> anyhow::Result<()> {
    if crate::netlink::ifindex(iface).is_none() {
        anyhow::bail!("interface {iface} does not exist here (see `ip link`)");
    }
    let nl = Netlink::new()?;
    let mut decap = Decap::load(vips)?;
    decap.set_local_addrs(&nl.local_addrs().await?)?;
    decap.attach(iface, mode)?;
    tracing::info!(
        "decapsulating IP-in-IP on {iface} (inner destinations: {})",
        if vips.is_empty() {
            "any".to_string()
        } else {
            format!("{vips:?}")
        }
    );
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut refresh = tokio::time::interval(Duration::from_secs(5));
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = refresh.tick() => decap.set_local_addrs(&nl.local_addrs().await?)?,
        }
    }
    let counts = decap.counters()?;
    let summary: Vec<String> = decap_reason::NAMES
        .iter()
        .zip(&counts)
        .map(|(n, c)| format!("{n}={c}"))
        .collect();
    tracing::info!("detached from {iface}: {}", summary.join(" "));
    Ok(())
}
