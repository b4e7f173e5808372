//! Loading, attaching and pinning the XDP director, and the typed view of its maps.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use aya::{
    maps::{Array, DevMapHash, HashMap, Map, MapData, PerCpuArray},
    programs::{links::FdLink, links::PinnedLink, Xdp, XdpMode},
    Ebpf, EbpfLoader,
};
use lb_common::{
    maps, Backend, Counters, FlowKey, FlowValue, IfaceInfo, NatReply, ServiceMeta, SnatAddr,
    SnatConfig, VipAddr, VipKey, RINGS_PER_SERVICE, RING_SIZE,
};

use crate::config;

/// Where a running director pins its maps, program and links.
pub const PIN_DIR: &str = "/sys/fs/bpf/xdplb";
/// The director program's name in the object.
pub const PROGRAM: &str = "xdplb";
/// Pass-through program (for veth peers that receive `XDP_TX`).
pub const PASS_PROGRAM: &str = "xdplb_pass";
/// MAC-swap `XDP_TX` program: the benchmark floor.
pub const FLOOR_PROGRAM: &str = "xdplb_floor";
/// Benchmark driver: optionally strips an outer header and/or makes a new 5-tuple per run
/// (`BENCH_CFG`), then tail-calls `BENCH_NEXT[0]`.
pub const BENCH_DRIVER_PROGRAM: &str = "xdplb_bench_driver";

/// The XDP object built by `build.rs` from `lb-ebpf`.
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb"));

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("loading the XDP object: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("XDP program: {0}")]
    Program(#[from] aya::programs::ProgramError),
    #[error("BPF map: {0}")]
    Map(#[from] aya::maps::MapError),
    #[error("pinning under {PIN_DIR}: {0}")]
    Pin(#[from] aya::pin::PinError),
    #[error("link: {0}")]
    Link(#[from] aya::programs::links::LinkError),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error(
        "XDP driver (native) mode is not supported on {0}; set `xdp_mode: skb` or `auto` for it"
    )]
    NativeUnsupported(String),
    #[error(
        "a director is already attached (pinned under {0}); stop its controller, or run `xdplb detach` \
         to remove it"
    )]
    AlreadyAttached(PathBuf),
    #[error("no director is pinned under {0}; start one with `xdplb run --config FILE`")]
    NotRunning(PathBuf),
    #[error("{0} is not a bpffs mount; run `mount -t bpf bpf {0}` (or `cargo xtask setup`)")]
    NoBpffs(PathBuf),
    #[error("{0} is missing from the XDP object")]
    MissingMap(&'static str),
}

pub type Result<T> = std::result::Result<T, Error>;

/// Every map of the director, typed. Opened from a freshly loaded object or from the pins
/// of a running director; nothing else in the controller names a map.
pub struct Maps {
    pub services: HashMap<MapData, VipKey, ServiceMeta>,
    pub rings: Array<MapData, u32>,
    pub backends: Array<MapData, Backend>,
    pub flows: HashMap<MapData, FlowKey, FlowValue>,
    pub ifaces: HashMap<MapData, u32, IfaceInfo>,
    pub service_stats: PerCpuArray<MapData, Counters>,
    pub backend_stats: PerCpuArray<MapData, Counters>,
    pub reasons: PerCpuArray<MapData, u64>,
    pub vips: HashMap<MapData, VipAddr, u32>,
    pub tx_ports: DevMapHash<MapData>,
    pub nat_replies: HashMap<MapData, FlowKey, NatReply>,
    pub snat_pool: Array<MapData, SnatAddr>,
    pub snat_config: Array<MapData, SnatConfig>,
}

impl Maps {
    fn open(mut get: impl FnMut(&'static str) -> Result<Map>) -> Result<Self> {
        Ok(Maps {
            services: get(maps::SERVICES)?.try_into()?,
            rings: get(maps::RINGS)?.try_into()?,
            backends: get(maps::BACKENDS)?.try_into()?,
            flows: get(maps::FLOWS)?.try_into()?,
            ifaces: get(maps::IFACES)?.try_into()?,
            service_stats: get(maps::SERVICE_STATS)?.try_into()?,
            backend_stats: get(maps::BACKEND_STATS)?.try_into()?,
            reasons: get(maps::REASONS)?.try_into()?,
            vips: get(maps::VIPS)?.try_into()?,
            tx_ports: get(maps::TX_PORTS)?.try_into()?,
            nat_replies: get(maps::NAT_REPLIES)?.try_into()?,
            snat_pool: get(maps::SNAT_POOL)?.try_into()?,
            snat_config: get(maps::SNAT_CONFIG)?.try_into()?,
        })
    }

    /// Take the maps out of a loaded object (the programs keep their references).
    pub fn take(ebpf: &mut Ebpf) -> Result<Self> {
        Maps::open(|name| ebpf.take_map(name).ok_or(Error::MissingMap(name)))
    }

    /// The maps of the director pinned under `dir`.
    pub fn from_pins(dir: &Path) -> Result<Self> {
        if !dir.join(maps::SERVICES).exists() {
            return Err(Error::NotRunning(dir.to_path_buf()));
        }
        Maps::open(|name| Ok(Map::from_map_data(MapData::from_pin(dir.join(name))?)?))
    }

    /// Per-CPU counters summed over CPUs.
    pub fn sum_counters(arr: &PerCpuArray<MapData, Counters>, idx: u32) -> Result<Counters> {
        let per_cpu = arr.get(&idx, 0)?;
        Ok(per_cpu.iter().fold(Counters::default(), |a, c| Counters {
            packets: a.packets + c.packets,
            bytes: a.bytes + c.bytes,
            new_flows: a.new_flows + c.new_flows,
        }))
    }

    pub fn reason_totals(&self) -> Result<Vec<u64>> {
        (0..lb_common::reason::COUNT)
            .map(|i| Ok(self.reasons.get(&i, 0)?.iter().sum()))
            .collect()
    }
}

/// What the maps should hold for a config: computed by [`desired`], written by
/// [`Director::apply`].
#[derive(Debug, Default)]
pub struct Desired {
    pub services: Vec<DesiredService>,
    /// Backend id -> entry.
    pub backends: BTreeMap<u32, Backend>,
    /// Every VIP address (answered to ICMP echo).
    pub vips: std::collections::BTreeSet<[u8; 17]>,
    /// Full-NAT pool: IPv4 addresses first, then IPv6.
    pub snat_pool: Vec<[u8; 16]>,
    pub snat: SnatConfig,
}

fn vip_addr(v: &[u8; 17]) -> VipAddr {
    let mut addr = [0u8; 16];
    addr.copy_from_slice(&v[..16]);
    VipAddr {
        addr,
        family: v[16],
        _pad: [0; 3],
    }
}

#[derive(Debug)]
pub struct DesiredService {
    pub key: VipKey,
    pub id: u32,
    pub mode: u8,
    /// Maglev table: backend id per slot.
    pub ring: Vec<u32>,
}

pub fn addr_bytes(addr: std::net::IpAddr) -> ([u8; 16], u8) {
    let mut out = [0u8; 16];
    match addr {
        std::net::IpAddr::V4(a) => {
            out[..4].copy_from_slice(&a.octets());
            (out, lb_common::AF_INET)
        }
        std::net::IpAddr::V6(a) => (a.octets(), lb_common::AF_INET6),
    }
}

pub fn addr_from_bytes(bytes: [u8; 16], family: u8) -> std::net::IpAddr {
    if family == lb_common::AF_INET {
        std::net::Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3]).into()
    } else {
        std::net::Ipv6Addr::from(bytes).into()
    }
}

/// Desired map contents for a validated config. Service ids follow the config order;
/// backend ids are allocated in order across services. `mac_of` gives each backend's
/// next-hop MAC (configured or resolved).
pub fn desired(cfg: &config::Config, mac_of: impl Fn(&config::Backend) -> [u8; 6]) -> Desired {
    let mut out = Desired::default();
    if let Some(f) = &cfg.fullnat {
        for ipv4 in [true, false] {
            out.snat_pool.extend(
                f.pool
                    .iter()
                    .filter(|a| a.is_ipv4() == ipv4)
                    .map(|a| addr_bytes(*a).0),
            );
        }
        out.snat = SnatConfig {
            v4_count: f.pool.iter().filter(|a| a.is_ipv4()).count() as u32,
            v6_count: f.pool.iter().filter(|a| a.is_ipv6()).count() as u32,
            port_min: u32::from(f.port_min),
            port_max: u32::from(f.port_max),
        };
    }
    let mut next_backend = 0u32;
    for (sid, svc) in cfg.services.iter().enumerate() {
        let sid = sid as u32;
        let mut entries = Vec::new();
        for b in &svc.backends {
            let id = next_backend;
            next_backend += 1;
            let (addr, family) = addr_bytes(b.address);
            out.backends.insert(
                id,
                Backend {
                    addr,
                    mac: mac_of(b),
                    family,
                    flags: lb_common::BACKEND_F_VALID,
                    service: sid,
                    weight: b.weight,
                    port_be: b.port.unwrap_or(0).to_be(),
                    _pad: [0; 2],
                },
            );
            entries.push(crate::maglev::Entry {
                identity: b.address.to_string(),
                weight: b.weight,
                id,
            });
        }
        let (addr, family) = addr_bytes(svc.vip);
        let mut v = [0u8; 17];
        v[..16].copy_from_slice(&addr);
        v[16] = family;
        out.vips.insert(v);
        out.services.push(DesiredService {
            key: VipKey {
                addr,
                port_be: svc.port.to_be(),
                proto: svc.protocol.number(),
                family,
            },
            id: sid,
            mode: match svc.mode {
                config::Mode::Dr => lb_common::mode::DR,
                config::Mode::Tun => lb_common::mode::TUN,
                config::Mode::Nat => lb_common::mode::NAT,
                config::Mode::Fullnat => lb_common::mode::FULLNAT,
            },
            ring: crate::maglev::build(&entries, RING_SIZE),
        });
    }
    out
}

/// A loaded director: the object, its typed maps, and where it is pinned (if it is).
pub struct Director {
    ebpf: Ebpf,
    pub maps: Maps,
    pin_dir: Option<PathBuf>,
}

/// How to load the director.
#[derive(Clone, Debug)]
pub struct LoadOptions<'a> {
    /// Capacity of the connection table.
    pub flow_table_size: u32,
    /// Pin maps, program and links here (the directory must not hold an attached director).
    pub pin_dir: Option<&'a Path>,
    /// Compile per-packet aya-log records into the program (read with [`Director::logger`]).
    pub debug_log: bool,
    /// Idle timeout of UDP flows.
    pub udp_idle: std::time::Duration,
}

impl Default for LoadOptions<'_> {
    fn default() -> Self {
        LoadOptions {
            flow_table_size: lb_common::FLOW_TABLE_CAPACITY,
            pin_dir: None,
            debug_log: false,
            udp_idle: std::time::Duration::from_nanos(lb_common::UDP_IDLE_DEFAULT_NS),
        }
    }
}

impl Director {
    /// Load the object and the director program (not attached yet).
    pub fn load(opts: &LoadOptions<'_>) -> Result<Self> {
        let pin_dir = opts.pin_dir;
        let mut loader = EbpfLoader::new();
        loader.map_max_entries(maps::FLOWS, opts.flow_table_size);
        // One reply mapping per NAT flow.
        loader.map_max_entries(maps::NAT_REPLIES, opts.flow_table_size);
        let debug_log = u8::from(opts.debug_log);
        loader.override_global("DEBUG_LOG", &debug_log, true);
        let udp_idle_ns = opts.udp_idle.as_nanos() as u64;
        loader.override_global("UDP_IDLE_NS", &udp_idle_ns, true);
        if let Some(dir) = pin_dir {
            check_bpffs(dir)?;
            if has_pinned_links(dir) {
                return Err(Error::AlreadyAttached(dir.to_path_buf()));
            }
            // Leftover pins without a link (a crashed run): nothing forwards with them.
            remove_pins(dir)?;
            std::fs::create_dir_all(dir)?;
            for name in maps::ALL {
                loader.map_pin_path(name, dir.join(name));
            }
        }
        let mut ebpf = loader.load(OBJECT)?;
        // Helpers (pass-through, benchmark programs) are loaded only when asked for.
        let prog: &mut Xdp = ebpf
            .program_mut(PROGRAM)
            .ok_or(Error::MissingMap(PROGRAM))?
            .try_into()?;
        prog.load()?;
        if let Some(dir) = pin_dir {
            let prog: &mut Xdp = ebpf
                .program_mut(PROGRAM)
                .ok_or(Error::MissingMap(PROGRAM))?
                .try_into()?;
            prog.pin(dir.join("prog_xdplb"))?;
        }
        let maps = Maps::take(&mut ebpf)?;
        Ok(Director {
            ebpf,
            maps,
            pin_dir: pin_dir.map(Path::to_path_buf),
        })
    }

    /// A program of the object that is already loaded (see [`Director::program`]).
    pub fn loaded(&self, name: &str) -> Option<&Xdp> {
        let prog: &Xdp = self.ebpf.program(name)?.try_into().ok()?;
        prog.fd().is_ok().then_some(prog)
    }

    /// The director program (always loaded), e.g. for `BPF_PROG_TEST_RUN`.
    pub fn director_program(&self) -> &Xdp {
        self.loaded(PROGRAM)
            .expect("the director program is loaded")
    }

    /// A program of the object, loaded into the kernel on first use (helpers, benchmarks).
    pub fn program(&mut self, name: &'static str) -> Result<&mut Xdp> {
        let prog: &mut Xdp = self
            .ebpf
            .program_mut(name)
            .ok_or(Error::MissingMap(name))?
            .try_into()?;
        if prog.fd().is_err() {
            prog.load()?;
        }
        Ok(prog)
    }

    /// Forwards the program's debug records (loaded with `debug_log`) to `logger`; call
    /// `flush` on the result when its fd is readable.
    pub fn logger<L: log::Log>(&mut self, logger: L) -> Result<aya_log::EbpfLogger<L>> {
        aya_log::EbpfLogger::init_with_logger(&mut self.ebpf, logger)
            .map_err(|e| Error::Io(std::io::Error::other(format!("debug log: {e}"))))
    }

    /// The whole object, for a caller that needs a map the controller does not use (the
    /// benchmark's program array).
    pub fn ebpf_mut(&mut self) -> &mut Ebpf {
        &mut self.ebpf
    }

    /// Attach the director to an interface and register the interface's MAC. When pinned,
    /// the link is pinned too, so forwarding survives the controller.
    pub fn attach(&mut self, iface: &str, mode: config::XdpMode, info: IfaceInfo) -> Result<()> {
        let ifindex = crate::netlink::ifindex(iface)
            .ok_or_else(|| std::io::Error::other(format!("interface {iface} does not exist")))?;
        self.maps.ifaces.insert(ifindex, info, 0)?;
        // A redirect target for TUN packets the FIB sends out of this interface.
        self.maps
            .tx_ports
            .insert(ifindex, ifindex, None, 0)
            .map_err(|e| std::io::Error::other(format!("adding {iface} to TX_PORTS: {e}")))?;
        let pin = self
            .pin_dir
            .as_ref()
            .map(|d| d.join(format!("link_{iface}")));
        let prog: &mut Xdp = self.ebpf.program_mut(PROGRAM).expect("loaded").try_into()?;
        let link_id = attach_xdp(prog, iface, mode)?;
        if let Some(path) = pin {
            let link = prog.take_link(link_id)?;
            let fd: FdLink = link.try_into()?;
            fd.pin(&path)?;
            log::info!(
                "attached to {iface} (ifindex {ifindex}), link pinned at {}",
                path.display()
            );
        } else {
            log::info!("attached to {iface} (ifindex {ifindex})");
        }
        Ok(())
    }

    /// Attach one of the helper programs (not pinned: it lives as long as `self`).
    pub fn attach_program(&mut self, name: &'static str, iface: &str) -> Result<()> {
        let prog = self.program(name)?;
        prog.attach(iface, XdpMode::Driver)
            .or_else(|_| prog.attach(iface, XdpMode::Skb))?;
        Ok(())
    }

    /// Make the maps equal to `want`: backends first (so a ring never points at an unset
    /// backend), then each service's inactive ring, then the service entry that flips to
    /// it; finally what is no longer wanted is removed.
    pub fn apply(&mut self, want: &Desired) -> Result<()> {
        apply(&mut self.maps, want)
    }

    /// Detach and remove every pin (the program stops forwarding).
    pub fn unpin(self) -> Result<()> {
        let dir = self.pin_dir.clone();
        drop(self);
        if let Some(dir) = dir {
            remove_pins(&dir)?;
        }
        Ok(())
    }
}

/// Attach `prog` to `iface` in the configured mode: native, generic, or native with a
/// fallback to generic (and a warning).
pub fn attach_xdp(
    prog: &mut Xdp,
    iface: &str,
    mode: config::XdpMode,
) -> Result<aya::programs::xdp::XdpLinkId> {
    Ok(match mode {
        config::XdpMode::Native => prog
            .attach(iface, XdpMode::Driver)
            .map_err(|_| Error::NativeUnsupported(iface.to_string()))?,
        config::XdpMode::Skb => prog.attach(iface, XdpMode::Skb)?,
        config::XdpMode::Auto => match prog.attach(iface, XdpMode::Driver) {
            Ok(id) => id,
            Err(e) => {
                log::warn!("native XDP unavailable on {iface} ({e}); using generic (skb) mode");
                prog.attach(iface, XdpMode::Skb)?
            }
        },
    })
}

/// Remove UDP flows idle for longer than `idle`, and their NAT state (which frees full-NAT
/// ports). The data plane already treats such flows as ended; this reclaims the entries of
/// flows that never send again. Walks the tables with syscalls: O(table) per call.
pub fn sweep_idle_udp(m: &mut Maps, idle: std::time::Duration) -> Result<usize> {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into `ts`; CLOCK_MONOTONIC is bpf_ktime_get_ns's clock.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    let now = ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64;
    let idle = idle.as_nanos() as u64;
    let expired: std::collections::HashSet<FlowKey> = m
        .flows
        .iter()
        .filter_map(|r| r.ok())
        .filter(|(k, v)| {
            k.proto == lb_common::IPPROTO_UDP && now.saturating_sub(v.last_seen_ns) > idle
        })
        .map(|(k, _)| k)
        .collect();
    if expired.is_empty() {
        return Ok(0);
    }
    let replies: Vec<FlowKey> = m
        .nat_replies
        .iter()
        .filter_map(|r| r.ok())
        .filter(|(_, r)| expired.contains(&r.flow))
        .map(|(k, _)| k)
        .collect();
    for k in &replies {
        let _ = m.nat_replies.remove(k);
    }
    for k in &expired {
        let _ = m.flows.remove(k);
    }
    Ok(expired.len())
}

/// What the data plane needs about an interface: its MAC and, for TUN, the outer sources.
pub fn iface_info(iface: &config::Interface, mac: [u8; 6]) -> IfaceInfo {
    let mut info = IfaceInfo {
        mac,
        ..Default::default()
    };
    for src in iface.tun_sources() {
        let bits = iface.entropy_bits(&src);
        match src.addr {
            std::net::IpAddr::V4(a) => {
                info.src4 = a.octets();
                info.src4_entropy_bits = bits;
                info.flags |= lb_common::IFACE_F_SRC4;
            }
            std::net::IpAddr::V6(a) => {
                info.src6 = a.octets();
                info.src6_entropy_bits = bits;
                info.flags |= lb_common::IFACE_F_SRC6;
            }
        }
    }
    info
}

pub fn apply(m: &mut Maps, want: &Desired) -> Result<()> {
    let old_backends: Vec<u32> = (0..lb_common::MAX_BACKENDS)
        .filter(|&i| {
            m.backends
                .get(&i, 0)
                .map(|b| b.flags & lb_common::BACKEND_F_VALID != 0)
                .unwrap_or(false)
        })
        .collect();
    // Pool before services: a full-NAT flow must never see an empty pool.
    for (i, a) in want.snat_pool.iter().enumerate() {
        m.snat_pool.set(i as u32, SnatAddr { addr: *a }, 0)?;
    }
    m.snat_config.set(0, want.snat, 0)?;
    for (&id, b) in &want.backends {
        m.backends.set(id, *b, 0)?;
    }
    let current: std::collections::HashMap<VipKey, ServiceMeta> =
        m.services.iter().filter_map(|r| r.ok()).collect();
    for svc in &want.services {
        let first = svc.id * RINGS_PER_SERVICE;
        let ring = match current.get(&svc.key) {
            Some(meta) if meta.id == svc.id && meta.ring == first => first + 1,
            _ => first,
        };
        let base = ring * RING_SIZE;
        for (slot, &id) in svc.ring.iter().enumerate() {
            m.rings.set(base + slot as u32, id, 0)?;
        }
        let meta = ServiceMeta {
            id: svc.id,
            ring,
            mode: svc.mode,
            flags: 0,
            _pad: [0; 2],
        };
        m.services.insert(svc.key, meta, 0)?;
    }
    for key in current.keys() {
        if !want.services.iter().any(|s| s.key == *key) {
            m.services.remove(key)?;
        }
    }
    let old_vips: Vec<VipAddr> = m.vips.keys().filter_map(|k| k.ok()).collect();
    for v in &want.vips {
        m.vips.insert(vip_addr(v), 1, 0)?;
    }
    for v in old_vips {
        if !want.vips.iter().any(|w| vip_addr(w) == v) {
            m.vips.remove(&v)?;
        }
    }
    for id in old_backends {
        if !want.backends.contains_key(&id) {
            m.backends.set(id, Backend::default(), 0)?;
        }
    }
    Ok(())
}

/// The pin directory must live on a mounted bpffs.
fn check_bpffs(dir: &Path) -> Result<()> {
    const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
    let parent = dir.parent().unwrap_or(Path::new("/"));
    let c = std::ffi::CString::new(parent.as_os_str().as_encoded_bytes())
        .map_err(std::io::Error::other)?;
    // SAFETY: statfs writes into a zeroed struct we own; `c` is NUL-terminated.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::statfs(c.as_ptr(), &mut st) };
    if rc != 0 || st.f_type as i64 != BPF_FS_MAGIC {
        return Err(Error::NoBpffs(parent.to_path_buf()));
    }
    Ok(())
}

fn has_pinned_links(dir: &Path) -> bool {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .any(|e| e.file_name().to_string_lossy().starts_with("link_"))
        })
        .unwrap_or(false)
}

/// Detach pinned links and remove every pin under `dir` (and `dir`). Missing `dir` is fine.
pub fn remove_pins(dir: &Path) -> Result<()> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(());
    };
    for entry in entries.filter_map(|e| e.ok()) {
        let path = entry.path();
        if entry.file_name().to_string_lossy().starts_with("link_") {
            // Unpinning drops the last reference: the program is detached.
            let link = PinnedLink::from_pin(&path)?;
            drop(link.unpin()?);
        } else {
            std::fs::remove_file(&path)?;
        }
    }
    std::fs::remove_dir(dir)?;
    Ok(())
}
