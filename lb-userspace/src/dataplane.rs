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
    maps, Backend, Counters, FlowKey, IfaceInfo, ServiceMeta, SnatAddr, SnatConfig, VipAddr, VipKey,
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
/// The benchmark's floor for encapsulation: room for an outer header made again behind the
/// stripping driver, MACs swapped, `XDP_TX`.
pub const FLOOR_ENCAP_PROGRAM: &str = "xdplb_floor_encap";
/// End-to-end benchmark receiver (count and drop) and generator tail (`XDP_TX` as is).
pub const SINK_PROGRAM: &str = "xdplb_sink";
pub const TX_PROGRAM: &str = "xdplb_tx";
/// The end-to-end bench's relay behind its AF_PACKET generator (`BENCH_RELAY`).
pub const RELAY_PROGRAM: &str = "xdplb_relay";
/// End-to-end benchmark backend and client for the two-way rows: answers client packets
/// as their backend, counts the director's replies (`BENCH_RESPOND`).
pub const RESPOND_PROGRAM: &str = "xdplb_respond";
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
    #[error(
        "the director pinned under {dir} uses map layout {found}, this build uses {}; it cannot be \
         adopted: stop it with `xdplb detach` (this drops established connections) and start again",
        lb_common::LAYOUT_VERSION
    )]
    Layout { dir: PathBuf, found: u64 },
    #[error("{0} is missing from the XDP object")]
    MissingMap(&'static str),
    #[error("{0}")]
    Invalid(String),
}

pub type Result<T> = std::result::Result<T, Error>;

/// Every map of the director, typed. Opened from a freshly loaded object or from the pins
/// of a running director; nothing else in the controller names a map.
pub struct Maps {
    pub services: HashMap<MapData, VipKey, ServiceMeta>,
    pub rings: Array<MapData, lb_common::RingEntry>,
    pub backends: Array<MapData, Backend>,
    pub flows: crate::flow_table::FlowTable,
    pub ifaces: HashMap<MapData, u32, IfaceInfo>,
    pub service_stats: PerCpuArray<MapData, Counters>,
    pub backend_stats: PerCpuArray<MapData, Counters>,
    pub reasons: PerCpuArray<MapData, u64>,
    pub vips: HashMap<MapData, VipAddr, u32>,
    pub tx_ports: DevMapHash<MapData>,
    pub nat_replies: crate::flow_table::ReplyTable,
    pub snat_pool: Array<MapData, SnatAddr>,
    pub snat_config: Array<MapData, SnatConfig>,
    pub meta: Array<MapData, u64>,
    pub persist: HashMap<MapData, lb_common::PersistKey, lb_common::PersistValue>,
    pub backend_active: PerCpuArray<MapData, i64>,
    pub rr_cursor: PerCpuArray<MapData, u32>,
    pub iface_slots: Array<MapData, IfaceInfo>,
    pub service_slots: Array<MapData, lb_common::ServiceSlot>,
    pub vip_filter: Array<MapData, u64>,
    pub service_index: Array<MapData, u32>,
    pub ring_dirty: Array<MapData, u64>,
    pub ring_held: Array<MapData, lb_common::RingEntry>,
}

impl Maps {
    fn open(mut get: impl FnMut(&'static str) -> Result<Map>) -> Result<Self> {
        Ok(Maps {
            services: get(maps::SERVICES)?.try_into()?,
            rings: get(maps::RINGS)?.try_into()?,
            backends: get(maps::BACKENDS)?.try_into()?,
            flows: crate::flow_table::FlowTable::open(get(maps::FLOWS)?)?,
            ifaces: get(maps::IFACES)?.try_into()?,
            service_stats: get(maps::SERVICE_STATS)?.try_into()?,
            backend_stats: get(maps::BACKEND_STATS)?.try_into()?,
            reasons: get(maps::REASONS)?.try_into()?,
            vips: get(maps::VIPS)?.try_into()?,
            tx_ports: get(maps::TX_PORTS)?.try_into()?,
            nat_replies: crate::flow_table::ReplyTable::open(get(maps::NAT_REPLIES)?)?,
            snat_pool: get(maps::SNAT_POOL)?.try_into()?,
            snat_config: get(maps::SNAT_CONFIG)?.try_into()?,
            meta: get(maps::META)?.try_into()?,
            persist: get(maps::PERSIST)?.try_into()?,
            backend_active: get(maps::BACKEND_ACTIVE)?.try_into()?,
            rr_cursor: get(maps::RR_CURSOR)?.try_into()?,
            iface_slots: get(maps::IFACE_SLOTS)?.try_into()?,
            service_slots: get(maps::SERVICE_SLOTS)?.try_into()?,
            vip_filter: get(maps::VIP_FILTER)?.try_into()?,
            service_index: get(maps::SERVICE_INDEX)?.try_into()?,
            ring_dirty: get(maps::RING_DIRTY)?.try_into()?,
            ring_held: get(maps::RING_HELD)?.try_into()?,
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
            out_packets: a.out_packets + c.out_packets,
            out_bytes: a.out_bytes + c.out_bytes,
        }))
    }

    /// Register an interface (`IFACES`, and `IFACE_SLOTS` for small ifindexes).
    pub fn set_iface(&mut self, ifindex: u32, info: IfaceInfo) -> Result<()> {
        self.ifaces.insert(ifindex, info, 0)?;
        if ifindex < lb_common::IFACE_SLOTS {
            let slot = IfaceInfo {
                flags: info.flags | lb_common::IFACE_F_PRESENT,
                ..info
            };
            self.iface_slots.set(ifindex, slot, 0)?;
        }
        Ok(())
    }

    /// Forget an interface.
    pub fn remove_iface(&mut self, ifindex: u32) {
        let _ = self.ifaces.remove(&ifindex);
        if ifindex < lb_common::IFACE_SLOTS {
            let _ = self.iface_slots.set(ifindex, IfaceInfo::default(), 0);
        }
    }

    /// Active flows of backend `id` (the data plane's count, summed over CPUs).
    pub fn active_flows(&self, id: u32) -> Result<u64> {
        let per_cpu = self.backend_active.get(&id, 0)?;
        Ok(per_cpu.iter().sum::<i64>().max(0) as u64)
    }

    /// Set backend `id`'s active-flow count (the controller's correction from the flow
    /// table): all of it on the first CPU. Increments racing with this write are lost; the
    /// next correction catches them.
    pub fn set_active_flows(&mut self, id: u32, n: u64) -> Result<()> {
        let cpus = aya::util::nr_cpus().map_err(|(_, e)| Error::Io(e))?;
        let mut v = vec![0i64; cpus];
        v[0] = n as i64;
        self.backend_active
            .set(id, aya::maps::PerCpuValues::try_from(v)?, 0)?;
        Ok(())
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

pub(crate) fn vip_addr(v: &[u8; 17]) -> VipAddr {
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
    /// `ServiceMeta::flags`.
    pub flags: u8,
    /// `ServiceMeta::{scheduler, hash_fields, rr_len, persist_s}`.
    pub scheduler: u8,
    pub hash_fields: u8,
    pub rr_len: u32,
    pub persist_s: u32,
    /// Maglev table (or, round robin, the sequence then `NO_BACKEND`): backend id per slot.
    pub ring: Vec<u32>,
    /// `ring_fast_path_hold`.
    pub hold: std::time::Duration,
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

/// Desired map contents for a validated config with every backend up: ids in config
/// order (fixtures and benchmarks; the controller keeps ids across reloads with
/// [`crate::reconcile`]). `mac_of` gives each backend's next-hop MAC.
pub fn desired(cfg: &config::Config, mac_of: impl Fn(&config::Backend) -> [u8; 6]) -> Desired {
    crate::reconcile::desired(cfg, &mut crate::reconcile::Ids::default(), mac_of, |_| {
        crate::reconcile::Runtime::default()
    })
}

/// A loaded director: the object, its typed maps, and where it is pinned (if it is).
pub struct Director {
    ebpf: Ebpf,
    pub maps: Maps,
    pin_dir: Option<PathBuf>,
    /// What the maps hold, so updates write only differences.
    state: crate::reconcile::MapState,
    /// Whether this director was created now or taken over from pins.
    pub origin: Origin,
}

/// How a [`Director`] came to be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    /// Loaded now, maps empty.
    Fresh,
    /// A pinned director was already forwarding: its maps (flows included) were kept, and
    /// its program was atomically replaced if this build's differs.
    Adopted { program_replaced: bool },
}

/// How to load the director.
#[derive(Clone, Debug)]
pub struct LoadOptions<'a> {
    /// Capacity of the connection table.
    pub flow_table_size: u32,
    /// Pin maps, program and links here.
    pub pin_dir: Option<&'a Path>,
    /// If a director is attached under `pin_dir`, take it over (keep its maps, replace its
    /// program if it differs) instead of failing.
    pub adopt: bool,
    /// Compile per-packet aya-log records into the program (read with [`Director::logger`]).
    pub debug_log: bool,
    /// Idle timeout of UDP flows.
    pub udp_idle: std::time::Duration,
    /// Benchmark only: end established flows' packets after this [`lb_common::stage`]
    /// (0: never; anything else does not forward).
    pub stop_after: u8,
    /// A service has `ring_fast_path: true`: compile the ring fast path in.
    pub ring_fast: bool,
    /// Slots of the per-CPU flow cache (`flow_cache_size`): 0 (off) or a power of two ≥ 4.
    pub flow_cache_size: u32,
}

impl Default for LoadOptions<'_> {
    fn default() -> Self {
        LoadOptions {
            flow_table_size: lb_common::FLOW_TABLE_CAPACITY,
            pin_dir: None,
            adopt: false,
            debug_log: false,
            udp_idle: std::time::Duration::from_nanos(lb_common::UDP_IDLE_DEFAULT_NS),
            stop_after: 0,
            ring_fast: false,
            flow_cache_size: lb_common::FLOW_CACHE_SLOTS,
        }
    }
}

/// The flow cache's layout for `slots` per CPU: (log2 of its two-slot sets per CPU, 0 when
/// off; the array's entries: that many sets for every possible CPU, 1 when off).
fn flow_cache_layout(slots: u32) -> Result<(u32, u32)> {
    if !lb_common::flow_cache_size_valid(slots) {
        return Err(Error::Invalid(format!(
            "flow cache of {slots} slots: 0 (off) or a power of two from 4 to {}",
            lb_common::FLOW_CACHE_SLOTS_MAX
        )));
    }
    if slots == 0 {
        return Ok((0, 1));
    }
    let cpus = aya::util::nr_cpus().map_err(|(_, e)| Error::Io(e))? as u64;
    if cpus > u64::from(lb_common::MAX_CPUS) {
        return Err(Error::Invalid(format!(
            "the flow cache serves at most {} CPUs, this machine has {cpus}; set flow_cache_size: 0",
            lb_common::MAX_CPUS
        )));
    }
    let bits = (slots / 2).trailing_zeros();
    let sets = u32::try_from(cpus << bits).map_err(|_| {
        Error::Invalid(format!(
            "flow cache of {slots} slots on {cpus} CPUs is too large; lower flow_cache_size"
        ))
    })?;
    Ok((bits, sets))
}

/// Identity of the program a set of options loads: the object and its load-time
/// constants (64-bit FNV-1a, stable across builds and platforms).
pub fn program_version(opts: &LoadOptions<'_>) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let idle = opts.udp_idle.as_nanos() as u64;
    for &b in OBJECT
        .iter()
        .chain(&[
            u8::from(opts.debug_log),
            opts.stop_after,
            u8::from(opts.ring_fast),
        ])
        .chain(&idle.to_le_bytes())
        .chain(&kernel_hz().to_le_bytes())
        .chain(&opts.flow_cache_size.to_le_bytes())
    {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    // 0 means "unknown" in META.
    h.max(1)
}

/// The running kernel's timer ticks per second (`CONFIG_HZ`), which the data path needs to
/// count its per-packet freshness checks in jiffies (`JIFFIES_HZ`): from the kernel's
/// config (`/proc/config.gz`, `/boot/config-<release>`), else measured from the jiffies
/// `/proc/timer_list` shows 100 ms apart. Found once per process.
pub fn kernel_hz() -> u32 {
    static HZ: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    *HZ.get_or_init(|| {
        let from_config = config_text().and_then(|t| config_hz(&t));
        from_config.or_else(measured_hz).unwrap_or_else(|| {
            // Every check then comes early, never late (HZ is 100 to 1000).
            log::warn!("kernel HZ unknown (no kernel config, no /proc/timer_list): assuming 100");
            100
        })
    })
}

/// The running kernel's build configuration, if it exposes it.
fn config_text() -> Option<String> {
    use std::io::Read;
    if let Ok(f) = std::fs::File::open("/proc/config.gz") {
        let mut text = String::new();
        if flate2::read::GzDecoder::new(f)
            .read_to_string(&mut text)
            .is_ok()
        {
            return Some(text);
        }
    }
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").ok()?;
    std::fs::read_to_string(format!("/boot/config-{}", release.trim())).ok()
}

/// `CONFIG_HZ` of a kernel configuration (a plausible one: 24 to 10000).
pub fn config_hz(config: &str) -> Option<u32> {
    config
        .lines()
        .find_map(|l| l.strip_prefix("CONFIG_HZ="))
        .and_then(|v| v.trim().parse().ok())
        .filter(|hz| (24..=10_000).contains(hz))
}

/// Ticks per second from two readings of `/proc/timer_list` 100 ms apart, snapped to the
/// nearest value Linux offers (100, 250, 300, 1000).
fn measured_hz() -> Option<u32> {
    let read = || -> Option<(u64, std::time::Instant)> {
        let text = std::fs::read_to_string("/proc/timer_list").ok()?;
        let at = std::time::Instant::now();
        let j = text
            .lines()
            .find_map(|l| l.strip_prefix("jiffies: "))?
            .trim()
            .parse()
            .ok()?;
        Some((j, at))
    };
    let (j0, t0) = read()?;
    std::thread::sleep(std::time::Duration::from_millis(100));
    let (j1, t1) = read()?;
    let rate = (j1.checked_sub(j0)? as f64) / t1.duration_since(t0).as_secs_f64();
    [100u32, 250, 300, 1000].into_iter().min_by(|a, b| {
        (f64::from(*a) - rate)
            .abs()
            .total_cmp(&(f64::from(*b) - rate).abs())
    })
}

/// Names of the interfaces a pinned director is attached to.
pub fn pinned_interfaces(dir: &Path) -> Vec<String> {
    let mut out: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter_map(|e| {
                    e.file_name()
                        .to_string_lossy()
                        .strip_prefix("link_")
                        .map(str::to_string)
                })
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

/// The map layout a pinned director was created with (0 if it predates `META`).
fn pinned_layout(dir: &Path) -> Result<u64> {
    let path = dir.join(maps::META);
    if !path.exists() {
        return Ok(0);
    }
    let meta: Array<MapData, u64> = Map::from_map_data(MapData::from_pin(path)?)?.try_into()?;
    Ok(meta.get(&lb_common::meta::LAYOUT, 0)?)
}

impl Director {
    /// Load the object and the director program (not attached yet). With a pin directory
    /// that holds an attached director and `adopt`, take that director over.
    pub fn load(opts: &LoadOptions<'_>) -> Result<Self> {
        let pin_dir = opts.pin_dir;
        let mut loader = EbpfLoader::new();
        let debug_log = u8::from(opts.debug_log);
        loader.override_global("DEBUG_LOG", &debug_log, true);
        let udp_idle_ns = opts.udp_idle.as_nanos() as u64;
        loader.override_global("UDP_IDLE_NS", &udp_idle_ns, true);
        loader.override_global("STOP_AFTER", &opts.stop_after, true);
        let ring_fast = u8::from(opts.ring_fast);
        loader.override_global("RING_FAST", &ring_fast, true);
        let hz = kernel_hz();
        loader.override_global("JIFFIES_HZ", &hz, true);
        let (set_bits, sets) = flow_cache_layout(opts.flow_cache_size)?;
        loader.override_global("CACHE_SET_BITS", &set_bits, true);
        let cache_cpus = sets >> set_bits;
        loader.override_global("CACHE_CPUS", &cache_cpus, true);
        loader.map_max_entries(maps::FLOW_CACHE, sets);
        // The table's sets: an adopted director's keep their number, which the program must
        // know (`FLOW_SET_BITS`).
        let flow_sets = pin_dir
            .filter(|dir| opts.adopt && has_pinned_links(dir))
            .and_then(|dir| aya::maps::MapInfo::from_pin(dir.join(maps::FLOWS)).ok())
            .map_or_else(
                || lb_common::flow_table::sets_for(opts.flow_table_size),
                |info| info.max_entries(),
            );
        let flow_set_bits = flow_sets.trailing_zeros();
        loader.map_max_entries(maps::FLOWS, flow_sets);
        loader.override_global("FLOW_SET_BITS", &flow_set_bits, true);
        // One reply mapping per NAT flow: as many sets (an adopted director's too).
        loader.map_max_entries(maps::NAT_REPLIES, flow_sets);
        loader.override_global("REPLY_SET_BITS", &flow_set_bits, true);
        let mut adopting = false;
        if let Some(dir) = pin_dir {
            check_bpffs(dir)?;
            if has_pinned_links(dir) {
                if !opts.adopt {
                    return Err(Error::AlreadyAttached(dir.to_path_buf()));
                }
                let layout = pinned_layout(dir)?;
                if layout != lb_common::LAYOUT_VERSION {
                    return Err(Error::Layout {
                        dir: dir.to_path_buf(),
                        found: layout,
                    });
                }
                if flow_sets != lb_common::flow_table::sets_for(opts.flow_table_size) {
                    tracing::warn!(
                        "the running director's flow table holds {} entries; flow_table_size {} \
                         takes effect only after `xdplb detach` and a new start (which drops connections)",
                        u64::from(flow_sets) * lb_common::flow_table::WAYS as u64,
                        opts.flow_table_size
                    );
                }
                adopting = true;
            } else {
                // Leftover pins without a link (a crashed run): nothing forwards with them.
                remove_pins(dir)?;
                std::fs::create_dir_all(dir)?;
            }
            // Existing pins are reused: an adopted director keeps its flows and counters.
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
        let maps = Maps::take(&mut ebpf)?;
        let mut director = Director {
            ebpf,
            maps,
            pin_dir: pin_dir.map(Path::to_path_buf),
            state: crate::reconcile::MapState::fresh(),
            origin: Origin::Fresh,
        };
        let version = program_version(opts);
        if let Some(dir) = pin_dir {
            if adopting {
                director.state = crate::reconcile::MapState::read(&director.maps)?;
                // A director pinned before `VIP_FILTER` existed got an empty one just now:
                // cover its services' VIPs before this program can see a packet.
                director.state.cover_pinned_vips(&mut director.maps)?;
                let running = director.maps.meta.get(&lb_common::meta::PROGRAM, 0)?;
                let program_replaced = running != version;
                if program_replaced {
                    director.replace_program(dir)?;
                }
                director.origin = Origin::Adopted { program_replaced };
            } else {
                director.pin_program(dir)?;
            }
            director
                .maps
                .meta
                .set(lb_common::meta::LAYOUT, lb_common::LAYOUT_VERSION, 0)?;
            director
                .maps
                .meta
                .set(lb_common::meta::PROGRAM, version, 0)?;
        }
        Ok(director)
    }

    fn pin_program(&mut self, dir: &Path) -> Result<()> {
        let path = dir.join("prog_xdplb");
        if path.exists() {
            std::fs::remove_file(&path)?;
        }
        let prog: &mut Xdp = self.ebpf.program_mut(PROGRAM).expect("loaded").try_into()?;
        prog.pin(path)?;
        Ok(())
    }

    /// Point every pinned link at this object's program, atomically per interface
    /// (`BPF_LINK_UPDATE`: no packet sees a missing program), then re-pin the program.
    fn replace_program(&mut self, dir: &Path) -> Result<()> {
        for iface in pinned_interfaces(dir) {
            let pinned = PinnedLink::from_pin(dir.join(format!("link_{iface}")))?;
            let link: aya::programs::xdp::XdpLink = FdLink::from(pinned).try_into()?;
            let prog: &mut Xdp = self.ebpf.program_mut(PROGRAM).expect("loaded").try_into()?;
            // The program keeps this link's fd; the pin keeps the link itself.
            prog.attach_to_link(link)?;
            tracing::info!("{iface}: running program replaced atomically");
        }
        self.pin_program(dir)
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
        self.maps.set_iface(ifindex, info)?;
        // A redirect target for TUN packets the FIB sends out of this interface.
        self.maps
            .tx_ports
            .insert(ifindex, ifindex, None, 0)
            .map_err(|e| std::io::Error::other(format!("adding {iface} to TX_PORTS: {e}")))?;
        let pin = self
            .pin_dir
            .as_ref()
            .map(|d| d.join(format!("link_{iface}")));
        if pin.as_ref().is_some_and(|p| p.exists()) {
            // Adopted: already attached (and running this object's program).
            return Ok(());
        }
        let prog: &mut Xdp = self.ebpf.program_mut(PROGRAM).expect("loaded").try_into()?;
        let link_id = attach_xdp(prog, iface, mode)?;
        if let Some(path) = pin {
            let link = prog.take_link(link_id)?;
            let fd: FdLink = link.try_into()?;
            fd.pin(&path)?;
            tracing::info!(
                "attached to {iface} (ifindex {ifindex}), link pinned at {}",
                path.display()
            );
        } else {
            tracing::info!("attached to {iface} (ifindex {ifindex})");
        }
        Ok(())
    }

    /// Detach from an interface the config no longer lists (pinned directors only).
    pub fn detach_interface(&mut self, iface: &str) -> Result<()> {
        let Some(dir) = &self.pin_dir else {
            return Ok(());
        };
        if let Some(ifindex) = crate::netlink::ifindex(iface) {
            self.maps.remove_iface(ifindex);
            let _ = self.maps.tx_ports.remove(ifindex);
        }
        let path = dir.join(format!("link_{iface}"));
        if path.exists() {
            drop(PinnedLink::from_pin(&path)?.unpin()?);
            tracing::info!("detached from {iface}");
        }
        Ok(())
    }

    /// The pin directory, if pinned.
    pub fn pin_dir(&self) -> Option<&Path> {
        self.pin_dir.as_deref()
    }

    /// The entry last written for backend `id`.
    pub fn backend_entry(&self, id: u32) -> Option<Backend> {
        self.state.backend(id).copied()
    }

    /// Remove ended flows (see [`sweep`]).
    pub fn sweep(&mut self, idle: std::time::Duration) -> Result<Swept> {
        let evict = self.state.evicted();
        let dirty = self.state.dirty_check(&self.maps)?;
        let state = &self.state;
        let mut swept = sweep(&mut self.maps, idle, &evict, &dirty, |id| {
            state.is_configured(id)
        })?;
        swept.cleaned = self
            .state
            .clear_dirty(&mut self.maps, &dirty, &swept.blocked)?;
        Ok(swept)
    }

    /// The ids, health and drains recorded in the maps (meaningful for an adopted director).
    pub fn recover(
        &self,
    ) -> Result<(
        crate::reconcile::Ids,
        std::collections::HashMap<crate::health::BackendKey, crate::reconcile::Runtime>,
    )> {
        self.state.recover(&self.maps)
    }

    /// Attach one of the helper programs (not pinned: it lives as long as `self`).
    pub fn attach_program(&mut self, name: &'static str, iface: &str) -> Result<()> {
        let prog = self.program(name)?;
        prog.attach(iface, XdpMode::Driver)
            .or_else(|_| prog.attach(iface, XdpMode::Skb))?;
        Ok(())
    }

    /// Whether a service whose ring fast path was turned off is done holding (see
    /// [`crate::reconcile::MapState::leaving_done`]).
    pub fn leaving_done(&self) -> bool {
        self.state.leaving_done()
    }

    /// Why `cfg` may not be applied: it changes how a service whose ring slots are held
    /// (ring fast path on, or turned off less than its hold ago) picks backends — other
    /// `hash_fields`, a scheduler that is not `maglev`/`sh`, persistence, a NAT mode — which
    /// would move connections the flow table does not hold.
    pub fn held_hash_change(&self, cfg: &config::Config) -> Option<String> {
        cfg.services.iter().find_map(|s| {
            let meta = self.maps.services.get(&crate::reconcile::vip_key(s), 0).ok()?;
            let same_ring = meta.hash_fields == crate::reconcile::hash_bits(s)
                && s.ring_fast_path_unfit().is_none();
            (meta.flags & lb_common::SERVICE_F_RING_HELD != 0 && !same_ring).then(|| {
                format!(
                    "service {}: its ring fast path holds slots, so its mode, scheduler, hash_fields \
                     and persistence must keep connections on their ring slots (connections the flow \
                     table does not hold would move). Set `ring_fast_path: false` first, reload, and \
                     make this change after `ring_fast_path_hold` ({})",
                    s.name,
                    humantime::format_duration(s.ring_fast_path_hold)
                )
            })
        })
    }

    /// Make the maps equal to `want`, writing only differences (see
    /// [`crate::reconcile::MapState::apply`]).
    pub fn apply(&mut self, want: &Desired) -> Result<crate::reconcile::Changes> {
        self.state.apply(&mut self.maps, want)
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
                tracing::warn!("native XDP unavailable on {iface} ({e}); using generic (skb) mode");
                prog.attach(iface, XdpMode::Skb)?
            }
        },
    })
}

/// Remove UDP flows idle for longer than `idle`, and their NAT state (which frees full-NAT
/// ports). The data plane already treats such flows as ended; this reclaims the entries of
/// flows that never send again. Walks the tables with syscalls: O(table) per call.
pub fn sweep_idle_udp(m: &mut Maps, idle: std::time::Duration) -> Result<usize> {
    Ok(sweep(m, idle, &Default::default(), &Default::default(), |_| true)?.removed)
}

/// What a [`sweep`] did and saw.
#[derive(Debug, Default)]
pub struct Swept {
    /// Flows removed.
    pub removed: usize,
    /// Flows left that have not ended (FIN/RST seen), per backend id.
    pub live: std::collections::HashMap<u32, usize>,
    /// Dirty ring slots (service id, slot) of the checked ring-fast-path services that a
    /// flow still holds with another backend than the ring's: they stay dirty.
    pub blocked: std::collections::HashSet<(u32, u32)>,
    /// Dirty ring slots that turned clean (see [`Director::sweep`]).
    pub cleaned: usize,
}

/// Remove ended flows and their NAT state: UDP flows idle for longer than `idle` (as
/// [`lb_common::udp_expired`] judges it, the same test the data plane makes), flows
/// of a backend in `evict` (down with `on_backend_down: reset`: the data plane already
/// reschedules them), and flows of backends that are no longer configured (`configured`
/// says which ids are). Flows that stay and disagree with a ring `dirty` checks are
/// reported in [`Swept::blocked`] (ended ones too: the client's last ACK may follow).
pub fn sweep(
    m: &mut Maps,
    idle: std::time::Duration,
    evict: &std::collections::HashSet<u32>,
    dirty: &crate::reconcile::DirtyCheck,
    configured: impl Fn(u32) -> bool,
) -> Result<Swept> {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into `ts`; CLOCK_MONOTONIC_COARSE is
    // bpf_ktime_get_coarse_ns's clock, the one the data plane stamps flows with.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    let now = ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64;
    let idle = idle.as_nanos() as u64;
    let mut swept = Swept::default();
    let mut expired = std::collections::HashSet::new();
    for (k, v) in m.flows.iter() {
        if (k.proto == lb_common::IPPROTO_UDP
            && lb_common::udp_expired(now.saturating_sub(v.last_seen_ns), idle))
            || evict.contains(&v.backend)
            || !configured(v.backend)
        {
            expired.insert(k);
            continue;
        }
        if v.flags & lb_common::FLOW_F_ENDED == 0 {
            *swept.live.entry(v.backend).or_default() += 1;
        }
        if let Some(pos) = dirty.blocks(v.service, &k, v.backend) {
            swept.blocked.insert((v.service, pos));
        }
    }
    swept.removed = expired.len();
    if expired.is_empty() {
        return Ok(swept);
    }
    let replies: Vec<FlowKey> = m
        .nat_replies
        .iter()
        .filter(|(k, r)| expired.contains(&r.flow(k.proto)))
        .map(|(k, _)| k)
        .collect();
    for k in &replies {
        let _ = m.nat_replies.remove(k);
    }
    for k in &expired {
        let _ = m.flows.remove(k);
    }
    Ok(swept)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flow_cache_layout_is_a_region_of_two_slot_sets_per_cpu() {
        let cpus = aya::util::nr_cpus().unwrap() as u32;
        assert_eq!(
            flow_cache_layout(0).unwrap(),
            (0, 1),
            "off: one unused entry"
        );
        assert_eq!(
            flow_cache_layout(4).unwrap(),
            (1, cpus << 1),
            "two sets per CPU"
        );
        assert_eq!(flow_cache_layout(65536).unwrap(), (15, cpus << 15));
        for bad in [1, 2, 3, 65535, lb_common::FLOW_CACHE_SLOTS_MAX * 2] {
            let e = flow_cache_layout(bad).unwrap_err().to_string();
            assert!(e.contains("power of two"), "{bad}: {e}");
        }
    }

    #[test]
    fn a_new_flow_cache_size_is_a_new_program() {
        // A reload compares versions and swaps the program when they differ.
        let at = |flow_cache_size| {
            program_version(&LoadOptions {
                flow_cache_size,
                ..Default::default()
            })
        };
        assert_eq!(at(65536), at(65536));
        assert_ne!(at(65536), at(32768));
        assert_ne!(at(65536), at(0));
    }

    #[test]
    fn config_hz_reads_the_kernel_configs_line() {
        let config =
            "# CONFIG_HZ_100 is not set\nCONFIG_HZ_250=y\nCONFIG_HZ=250\nCONFIG_HZ_PERIODIC=n\n";
        assert_eq!(config_hz(config), Some(250));
        assert_eq!(
            config_hz("CONFIG_HZ_1000=y\n"),
            None,
            "only CONFIG_HZ= itself"
        );
        assert_eq!(config_hz("CONFIG_HZ=0\n"), None, "implausible");
        assert_eq!(config_hz(""), None);
    }

    /// What the data path is told is what the kernel's jiffies do: a wrong HZ would stretch
    /// or shrink every per-packet "once a second" (next-hop cache, NAT mapping checks).
    #[test]
    fn kernel_hz_is_the_rate_jiffies_advance_at() {
        let Some(measured) = measured_hz() else {
            eprintln!("skipped: /proc/timer_list is not readable here");
            return;
        };
        assert_eq!(kernel_hz(), measured);
    }
}
