//! The YAML declaration: parsing (unknown keys are errors) and validation. Every error names
//! the field path and the line it is on; a config with any error is never applied.

use std::{
    collections::{HashMap, HashSet},
    fmt,
    net::IpAddr,
    path::Path,
    str::FromStr,
    time::Duration,
};

use lb_common::{FLOW_TABLE_CAPACITY, MAX_BACKENDS, MAX_SERVICES};
use serde::{Deserialize, Deserializer};

/// Largest backend weight (as IPVS).
pub const MAX_WEIGHT: u32 = 65_535;
/// Bounds of `flow_table_size` (connection-table entries, both families; also the NAT
/// reply mappings): below the lower one a busy director evicts live flows; the upper one
/// bounds the preallocated tables (68 B per connection-table entry — a 64-byte way and its
/// share of the set's header — and 132 B per reply mapping — a 128-byte way and its share:
/// 200 MiB at the default, 12.5 GiB at the maximum).
pub const FLOW_TABLE_MIN: u32 = 1024;
pub const FLOW_TABLE_MAX: u32 = 1 << 26;

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub interfaces: Vec<Interface>,
    pub services: Vec<Service>,
    /// Capacity of the connection table (default [`FLOW_TABLE_CAPACITY`]).
    #[serde(default)]
    pub flow_table_size: Option<u32>,
    /// Slots of the per-CPU flow cache in front of the connection table (default
    /// [`lb_common::FLOW_CACHE_SLOTS`]; 0: off).
    #[serde(default)]
    pub flow_cache_size: Option<u32>,
    /// The Prometheus endpoint.
    #[serde(default)]
    pub metrics: Option<Metrics>,
    /// Source addresses and ports for `fullnat` services.
    #[serde(default)]
    pub fullnat: Option<FullNat>,
    /// A UDP flow with no packet for this long has ended (default 30s). Kept as text so a bad
    /// value is reported on its own line.
    #[serde(default)]
    pub udp_idle_timeout: Option<String>,
}

/// `metrics:`: serve `/metrics` (Prometheus text format) on `listen`.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Metrics {
    /// e.g. `127.0.0.1:9100` or `[::1]:9100`.
    pub listen: std::net::SocketAddr,
}

/// The full-NAT source pool: the backend sees one of these addresses (of its family) and a
/// port from the range as the client. Put the addresses on the backend-facing interface so
/// the director answers ARP / neighbour discovery for them, and keep them out of the
/// kernel's own use (its ephemeral ports would collide).
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FullNat {
    pub pool: Vec<IpAddr>,
    #[serde(default = "default_port_min")]
    pub port_min: u16,
    #[serde(default = "default_port_max")]
    pub port_max: u16,
}

fn default_port_min() -> u16 {
    1024
}
fn default_port_max() -> u16 {
    65535
}

impl FullNat {
    /// Flows one address family of the pool can hold at once (per backend port).
    pub fn capacity(&self, ipv4: bool) -> u64 {
        let addrs = self.pool.iter().filter(|a| a.is_ipv4() == ipv4).count() as u64;
        let ports = u64::from(self.port_max).saturating_sub(u64::from(self.port_min)) + 1;
        addrs * ports
    }
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Interface {
    pub name: String,
    #[serde(default)]
    pub xdp_mode: XdpMode,
    /// Outer source addresses of TUN packets leaving this interface, at most one per family:
    /// `198.18.0.3`, or a prefix like `198.18.200.0/24` with `tun_source_entropy`.
    #[serde(default)]
    pub tun_source: Vec<String>,
    /// Fill the host bits of the `tun_source` prefixes from the flow hash (up to 32 bits), so
    /// backend NICs spread tunnel traffic over their queues (as Katran does).
    #[serde(default)]
    pub tun_source_entropy: bool,
}

/// A parsed `tun_source` entry: address and prefix length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TunSource {
    pub addr: IpAddr,
    pub prefix_len: u8,
}

impl TunSource {
    /// Bits of an address of this family (32 or 128).
    fn addr_bits(&self) -> u8 {
        if self.addr.is_ipv4() {
            32
        } else {
            128
        }
    }

    /// Host bits below the prefix (0 for a single address).
    pub fn host_bits(&self) -> u8 {
        self.addr_bits() - self.prefix_len
    }
}

impl FromStr for TunSource {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (addr, len) = match s.split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (s, None),
        };
        let addr: IpAddr = addr.parse().map_err(|_| {
            format!("`{s}` is not an IP address or prefix (e.g. 198.18.0.3 or 198.18.200.0/24)")
        })?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix_len = match len {
            None => max,
            Some(l) => l
                .parse::<u8>()
                .ok()
                .filter(|l| *l <= max)
                .ok_or_else(|| format!("`{s}`: prefix length must be 0..={max}"))?,
        };
        Ok(TunSource { addr, prefix_len })
    }
}

impl Interface {
    /// Parsed `tun_source` entries (validated, so every entry parses).
    pub fn tun_sources(&self) -> Vec<TunSource> {
        self.tun_source
            .iter()
            .filter_map(|s| s.parse().ok())
            .collect()
    }

    /// Host bits the data plane fills from the flow hash for this source (entropy).
    pub fn entropy_bits(&self, src: &TunSource) -> u8 {
        if !self.tun_source_entropy {
            return 0;
        }
        src.host_bits().min(32)
    }
}

#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum XdpMode {
    /// Native (driver) mode, falling back to generic (skb) mode with a warning.
    #[default]
    Auto,
    Native,
    Skb,
}

#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => lb_common::IPPROTO_TCP,
            Protocol::Udp => lb_common::IPPROTO_UDP,
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        })
    }
}

#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Dr,
    Tun,
    Nat,
    Fullnat,
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Mode::Dr => "dr",
            Mode::Tun => "tun",
            Mode::Nat => "nat",
            Mode::Fullnat => "fullnat",
        })
    }
}

#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Scheduler {
    #[default]
    Maglev,
    Rr,
    Wrr,
    Sh,
    Lc,
    Wlc,
}

/// A field of the 5-tuple, for `hash_fields`.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "snake_case")]
pub enum HashField {
    SrcIp,
    SrcPort,
    DstIp,
    DstPort,
    Proto,
}

impl HashField {
    pub fn bit(self) -> u8 {
        match self {
            HashField::SrcIp => lb_common::hash::SRC_IP,
            HashField::SrcPort => lb_common::hash::SRC_PORT,
            HashField::DstIp => lb_common::hash::DST_IP,
            HashField::DstPort => lb_common::hash::DST_PORT,
            HashField::Proto => lb_common::hash::PROTO,
        }
    }
}

impl fmt::Display for Scheduler {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Scheduler::Maglev => "maglev",
            Scheduler::Rr => "rr",
            Scheduler::Wrr => "wrr",
            Scheduler::Sh => "sh",
            Scheduler::Lc => "lc",
            Scheduler::Wlc => "wlc",
        })
    }
}

/// Bounds of `persistence` (when not 0s).
pub const PERSISTENCE_MIN: Duration = Duration::from_secs(1);
pub const PERSISTENCE_MAX: Duration = Duration::from_secs(24 * 3600);

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Service {
    pub name: String,
    pub vip: IpAddr,
    /// 0 = every port of the VIP.
    pub port: u16,
    pub protocol: Protocol,
    pub mode: Mode,
    #[serde(default)]
    pub scheduler: Scheduler,
    /// `maglev` only: the 5-tuple fields to hash (default all five), e.g. `[src_ip]` for
    /// UDP protocols that change ports.
    #[serde(default)]
    pub hash_fields: Option<Vec<HashField>>,
    /// Source-address affinity (LVS `-p`): a client's new connections within this time of
    /// its last one go to the same backend. 0s = off.
    #[serde(default, deserialize_with = "duration")]
    pub persistence: Duration,
    pub backends: Vec<Backend>,
    /// How the controller decides a backend is up; absent = always up.
    #[serde(default)]
    pub health_check: Option<HealthCheck>,
    /// What happens to a failed backend's established flows.
    #[serde(default)]
    pub on_backend_down: DownPolicy,
    /// What happens to new packets when no backend is up (or every one is drained).
    #[serde(default)]
    pub on_all_down: AllDownPolicy,
    /// TCP packets go by the Maglev ring alone while their slot's backend has not changed,
    /// skipping the flow table, new connections included (Katran's LRU bypass, kept safe
    /// across backend changes): packets on changed slots, and FIN/RST, use the table. DR
    /// and TUN, TCP, `maglev` or `sh`, no persistence.
    #[serde(default)]
    pub ring_fast_path: bool,
    /// How long a ring slot whose backend changed keeps sending connections the flow table
    /// does not hold (begun on the fast path) to its old backend. A connection idle for
    /// longer than this across a change moves. Also applies after `ring_fast_path` is
    /// turned off.
    #[serde(default = "default_ring_fast_path_hold", deserialize_with = "duration")]
    pub ring_fast_path_hold: Duration,
}

/// Default `ring_fast_path_hold`: IPVS's timeout of an established TCP connection.
pub const RING_FAST_PATH_HOLD_DEFAULT: Duration = Duration::from_secs(15 * 60);
/// Upper bound of `ring_fast_path_hold`.
pub const RING_FAST_PATH_HOLD_MAX: Duration = Duration::from_secs(24 * 3600);

fn default_ring_fast_path_hold() -> Duration {
    RING_FAST_PATH_HOLD_DEFAULT
}

impl Service {
    /// Why the ring fast path cannot serve this service (its connections are not kept by
    /// their ring slot alone), if so. A held service must keep this `None`.
    pub fn ring_fast_path_unfit(&self) -> Option<String> {
        if !matches!(self.mode, Mode::Dr | Mode::Tun) {
            Some(format!(
                "mode `{}` keeps per-flow state (NAT translations) in the flow table; the ring fast \
                 path is for `dr` and `tun`",
                self.mode
            ))
        } else if self.protocol != Protocol::Tcp {
            Some(
                "the ring fast path is for TCP (UDP flows keep their idle clock in the flow table); \
                 remove `ring_fast_path` or use `protocol: tcp`"
                    .into(),
            )
        } else if !matches!(self.scheduler, Scheduler::Maglev | Scheduler::Sh) {
            Some(format!(
                "`{}` does not pick a flow's backend by its ring slot alone; the ring fast path needs \
                 `scheduler: maglev` or `sh`",
                self.scheduler
            ))
        } else if !self.persistence.is_zero() {
            Some(
                "with persistence a client's template, not the ring, picks the backend; use one or \
                 the other"
                    .into(),
            )
        } else {
            None
        }
    }

    /// What identifies this service across reloads (its VIP key).
    pub fn endpoint(&self) -> (IpAddr, u16, Protocol) {
        (self.vip, self.port, self.protocol)
    }
}

/// `on_backend_down`: `keep` lets a failed backend's established flows continue (the
/// backend may still serve them: LVS's default); `reset` reschedules them on their next
/// packet (for backends that are really gone).
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum DownPolicy {
    #[default]
    Keep,
    Reset,
}

/// `on_all_down`: `drop` new packets (counted as `drop_no_backend`) or `pass` them to the
/// director's own stack (e.g. for a local sorry server).
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum AllDownPolicy {
    #[default]
    Drop,
    Pass,
}

#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum CheckKind {
    #[default]
    Tcp,
    Http,
    Udp,
    Exec,
    None,
}

impl fmt::Display for CheckKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CheckKind::Tcp => "tcp",
            CheckKind::Http => "http",
            CheckKind::Udp => "udp",
            CheckKind::Exec => "exec",
            CheckKind::None => "none",
        })
    }
}

/// A service's health check, run against every backend from the director.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq, Hash)]
#[serde(deny_unknown_fields)]
pub struct HealthCheck {
    #[serde(default)]
    pub kind: CheckKind,
    #[serde(default = "default_interval", deserialize_with = "duration")]
    pub interval: Duration,
    #[serde(default = "default_check_timeout", deserialize_with = "duration")]
    pub timeout: Duration,
    /// Consecutive successes before a down backend is up again.
    #[serde(default = "default_rise")]
    pub rise: u32,
    /// Consecutive failures before an up backend is down.
    #[serde(default = "default_fall")]
    pub fall: u32,
    /// Port to check (default: the backend's `port`, else the service port).
    #[serde(default)]
    pub port: Option<u16>,
    /// http: the path of the GET.
    #[serde(default)]
    pub path: Option<String>,
    /// http: the status that means healthy (default 200).
    #[serde(default)]
    pub expect_status: Option<u16>,
    /// udp: what to send (default: an empty datagram).
    #[serde(default)]
    pub payload: Option<String>,
    /// udp: the reply must contain this text (default: any reply).
    #[serde(default)]
    pub expect: Option<String>,
    /// exec: program and arguments; `{address}` and `{port}` are replaced; exit 0 = healthy.
    #[serde(default)]
    pub command: Vec<String>,
}

fn default_interval() -> Duration {
    Duration::from_secs(1)
}
fn default_check_timeout() -> Duration {
    Duration::from_millis(500)
}
fn default_rise() -> u32 {
    2
}
fn default_fall() -> u32 {
    3
}

/// Bounds of a health check's `interval`.
pub const CHECK_INTERVAL_MIN: Duration = Duration::from_millis(100);
pub const CHECK_INTERVAL_MAX: Duration = Duration::from_secs(3600);
/// Bound of `rise` and `fall`.
pub const CHECK_COUNT_MAX: u32 = 100;

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Backend {
    pub address: IpAddr,
    #[serde(default = "default_weight")]
    pub weight: u32,
    /// Next-hop MAC for DR (`02:00:00:00:01:0b`); resolved from the neighbour table when
    /// absent. Kept as text so a bad value is reported on its own line by validation.
    #[serde(default)]
    pub mac: Option<String>,
    /// NAT modes: the backend's port (default: the client's destination port).
    #[serde(default)]
    pub port: Option<u16>,
}

impl Backend {
    /// The configured MAC (validated, so a present value parses).
    pub fn mac(&self) -> Option<Mac> {
        self.mac.as_deref().and_then(|m| m.parse().ok())
    }
}

fn default_weight() -> u32 {
    100
}

/// An Ethernet address written `02:00:00:00:01:0b`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Mac(pub [u8; 6]);

impl FromStr for Mac {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let parts: Vec<&str> = s.split(':').collect();
        let bad =
            || format!("invalid MAC address `{s}`: expected six hex pairs like 02:00:00:00:01:0b");
        if parts.len() != 6 {
            return Err(bad());
        }
        let mut mac = [0u8; 6];
        for (b, p) in mac.iter_mut().zip(parts) {
            if p.len() != 2 {
                return Err(bad());
            }
            *b = u8::from_str_radix(p, 16).map_err(|_| bad())?;
        }
        Ok(Mac(mac))
    }
}

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let s = String::deserialize(d)?;
    humantime::parse_duration(&s).map_err(|e| {
        serde::de::Error::custom(format!(
            "invalid duration `{s}` ({e}); write e.g. 500ms, 2s, 5m"
        ))
    })
}

/// One problem with a config: where it is and what is wrong.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError {
    /// Field path like `services[0].backends[1].weight`; empty for syntax errors.
    pub path: String,
    /// 1-based line in the file, when known.
    pub line: Option<usize>,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.line, self.path.is_empty()) {
            (Some(l), false) => write!(f, "line {l}: {}: {}", self.path, self.message),
            (Some(l), true) => write!(f, "line {l}: {}", self.message),
            (None, false) => write!(f, "{}: {}", self.path, self.message),
            (None, true) => f.write_str(&self.message),
        }
    }
}

/// Every error of one config file.
#[derive(Debug, thiserror::Error)]
pub struct ConfigErrors {
    pub file: String,
    pub errors: Vec<ConfigError>,
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{}: {} error(s); nothing was applied",
            self.file,
            self.errors.len()
        )?;
        for e in &self.errors {
            writeln!(f, "  {}:{e}", self.file)?;
        }
        Ok(())
    }
}

/// What validation may ask of the host it runs on.
pub trait Host {
    /// Does a network interface of this name exist (in our network namespace)?
    fn interface_exists(&self, name: &str) -> bool;
    /// Is IP forwarding on for this family (`true` = IPv4)? TUN needs it: the kernel's
    /// FIB helper refuses lookups for a device that does not forward.
    fn forwarding(&self, _ipv4: bool) -> bool {
        true
    }
    /// Does this host have a route to `addr`?
    fn has_route(&self, _addr: IpAddr) -> bool {
        true
    }
    /// Is `addr` reached through a gateway (not on a directly attached subnet)?
    fn via_gateway(&self, _addr: IpAddr) -> bool {
        false
    }
}

/// The host we run on.
pub struct ThisHost;

impl Host for ThisHost {
    fn interface_exists(&self, name: &str) -> bool {
        crate::netlink::ifindex(name).is_some()
    }
    fn via_gateway(&self, addr: IpAddr) -> bool {
        // rtnetlink is async; validation is not (and may run inside a runtime already).
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .ok()?;
            rt.block_on(async { crate::netlink::Netlink::new().ok()?.via_gateway(addr).await })
        })
        .join()
        .ok()
        .flatten()
        .unwrap_or(false)
    }
    fn has_route(&self, addr: IpAddr) -> bool {
        // A UDP connect() only does the route lookup (no packet is sent).
        let any: IpAddr = if addr.is_ipv4() {
            std::net::Ipv4Addr::UNSPECIFIED.into()
        } else {
            std::net::Ipv6Addr::UNSPECIFIED.into()
        };
        std::net::UdpSocket::bind((any, 0))
            .and_then(|s| s.connect((addr, 9)))
            .is_ok()
    }
    fn forwarding(&self, ipv4: bool) -> bool {
        let path = if ipv4 {
            "/proc/sys/net/ipv4/ip_forward"
        } else {
            "/proc/sys/net/ipv6/conf/all/forwarding"
        };
        std::fs::read_to_string(path)
            .map(|v| v.trim() == "1")
            .unwrap_or(false)
    }
}

/// Validation without host checks (for configs written for another machine).
pub struct AnyHost;

impl Host for AnyHost {
    fn interface_exists(&self, _name: &str) -> bool {
        true
    }
}

impl Config {
    pub fn load(path: &Path, host: &dyn Host) -> Result<Config, ConfigErrors> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ConfigErrors {
            file: file.clone(),
            errors: vec![ConfigError {
                path: String::new(),
                line: None,
                message: format!("cannot read: {e}"),
            }],
        })?;
        Config::parse(&text, host).map_err(|errors| ConfigErrors { file, errors })
    }

    /// Parse and validate; all errors at once.
    pub fn parse(text: &str, host: &dyn Host) -> Result<Config, Vec<ConfigError>> {
        let lines = path_lines(text);
        let config: Config = serde_yaml::from_str(text).map_err(|e| {
            // serde_yaml appends "at line N column M"; the line goes in front instead.
            let message = e
                .to_string()
                .split(" at line ")
                .next()
                .unwrap_or_default()
                .to_string();
            // Its message starts with the field path when it knows one ("services[0]: ...").
            let path = match message.split_once(": ") {
                Some((p, _)) if lines.contains_key(p) => p.to_string(),
                _ => String::new(),
            };
            let line = e
                .location()
                .map(|l| l.line())
                .or_else(|| lines.get(&path).copied());
            let message = if path.is_empty() {
                message
            } else {
                message[path.len() + 2..].to_string()
            };
            vec![ConfigError {
                path,
                line,
                message,
            }]
        })?;
        let errors = config.validate(host);
        if errors.is_empty() {
            return Ok(config);
        }
        Err(errors
            .into_iter()
            .map(|(path, message)| ConfigError {
                line: line_of(&lines, &path),
                path,
                message,
            })
            .collect())
    }

    /// Semantic checks; returns (field path, message) pairs.
    fn validate(&self, host: &dyn Host) -> Vec<(String, String)> {
        let mut errs = Vec::new();
        let mut err = |path: String, msg: String| errs.push((path, msg));
        if self.interfaces.is_empty() {
            err(
                "interfaces".into(),
                "at least one interface is required".into(),
            );
        }
        let mut names = HashSet::new();
        for (i, iface) in self.interfaces.iter().enumerate() {
            let mut families = HashSet::new();
            for (j, src) in iface.tun_source.iter().enumerate() {
                let p = format!("interfaces[{i}].tun_source[{j}]");
                match src.parse::<TunSource>() {
                    Err(e) => err(p, e),
                    Ok(t) => {
                        if !families.insert(t.addr.is_ipv4()) {
                            err(p, "at most one tun_source per address family".into());
                        } else if t.host_bits() != 0 && !iface.tun_source_entropy {
                            err(
                                p,
                                format!(
                                    "`{src}` is a prefix: give a single address, or set `tun_source_entropy: true` \
                                     to fill its host bits from the flow hash"
                                ),
                            );
                        }
                    }
                }
            }
            if iface.tun_source_entropy && iface.tun_sources().iter().all(|t| t.host_bits() == 0) {
                err(
                    format!("interfaces[{i}].tun_source_entropy"),
                    "entropy needs a `tun_source` prefix with host bits to fill (e.g. 198.18.200.0/24)".into(),
                );
            }
            let p = format!("interfaces[{i}].name");
            if iface.name.is_empty() {
                err(p, "interface name is empty".into());
            } else if !names.insert(iface.name.as_str()) {
                err(p, format!("interface `{}` is listed twice", iface.name));
            } else if !host.interface_exists(&iface.name) {
                err(
                    p,
                    format!(
                        "interface `{}` does not exist on this host (see `ip link`)",
                        iface.name
                    ),
                );
            }
        }
        if let Some(size) = self.flow_table_size {
            if !(FLOW_TABLE_MIN..=FLOW_TABLE_MAX).contains(&size) {
                err(
                    "flow_table_size".into(),
                    format!("{size} is out of range {FLOW_TABLE_MIN}..={FLOW_TABLE_MAX}"),
                );
            }
        }
        if let Some(slots) = self.flow_cache_size {
            if !lb_common::flow_cache_size_valid(slots) {
                err(
                    "flow_cache_size".into(),
                    format!(
                        "{slots} is not 0 (off) or a power of two from 4 to {} (e.g. 65536)",
                        lb_common::FLOW_CACHE_SLOTS_MAX
                    ),
                );
            }
        }
        if let Some(t) = &self.udp_idle_timeout {
            match humantime::parse_duration(t) {
                Err(e) => err(
                    "udp_idle_timeout".into(),
                    format!("invalid duration `{t}` ({e}); write e.g. 30s, 2m"),
                ),
                Ok(d) if d < Duration::from_secs(1) || d > Duration::from_secs(3600) => err(
                    "udp_idle_timeout".into(),
                    format!("{t} is out of range 1s..=1h"),
                ),
                Ok(_) => {}
            }
        }
        if let Some(f) = &self.fullnat {
            let mut seen = HashSet::new();
            for (i, a) in f.pool.iter().enumerate() {
                if !seen.insert(a) {
                    err(
                        format!("fullnat.pool[{i}]"),
                        format!("{a} is listed twice (pools must not overlap)"),
                    );
                }
                if self.services.iter().any(|s| s.vip == *a) {
                    err(
                        format!("fullnat.pool[{i}]"),
                        format!("{a} is a VIP; pool addresses must be the director's own"),
                    );
                }
            }
            if f.port_min > f.port_max || f.port_min == 0 {
                err(
                    "fullnat.port_min".into(),
                    format!(
                        "port range {}-{} is empty or starts at 0",
                        f.port_min, f.port_max
                    ),
                );
            }
            let flows = u64::from(self.flow_table_size());
            for ipv4 in [true, false] {
                let used = self
                    .services
                    .iter()
                    .any(|s| s.mode == Mode::Fullnat && s.vip.is_ipv4() == ipv4);
                let cap = f.capacity(ipv4);
                if used && cap > 0 && cap < flows {
                    err(
                        "fullnat.pool".into(),
                        format!(
                            "{} source ports ({} addresses × {} ports) cannot hold the {flows} flows of \
                             flow_table_size: add addresses, widen the port range or lower flow_table_size",
                            if ipv4 { "IPv4" } else { "IPv6" },
                            f.pool.iter().filter(|a| a.is_ipv4() == ipv4).count(),
                            u32::from(f.port_max) - u32::from(f.port_min) + 1
                        ),
                    );
                }
            }
        }
        if self.services.is_empty() {
            err("services".into(), "at least one service is required".into());
        }
        if self.services.len() > MAX_SERVICES as usize {
            err(
                "services".into(),
                format!(
                    "{} services declared; at most {MAX_SERVICES}",
                    self.services.len()
                ),
            );
        }
        let total_backends: usize = self.services.iter().map(|s| s.backends.len()).sum();
        if total_backends > MAX_BACKENDS as usize {
            err(
                "services".into(),
                format!("{total_backends} backends declared; at most {MAX_BACKENDS} in all"),
            );
        }
        let mut svc_names: HashMap<&str, usize> = HashMap::new();
        let mut svc_keys: HashMap<(IpAddr, u16, Protocol), usize> = HashMap::new();
        for (i, s) in self.services.iter().enumerate() {
            let p = format!("services[{i}]");
            if s.name.is_empty() {
                err(format!("{p}.name"), "service name is empty".into());
            } else if let Some(j) = svc_names.insert(&s.name, i) {
                err(
                    format!("{p}.name"),
                    format!("service name `{}` is already used by services[{j}]", s.name),
                );
            }
            if let Some(j) = svc_keys.insert((s.vip, s.port, s.protocol), i) {
                err(
                    format!("{p}.vip"),
                    format!(
                        "duplicate service: {}:{}/{} is already declared by services[{j}]",
                        s.vip, s.port, s.protocol
                    ),
                );
            }
            let nat = matches!(s.mode, Mode::Nat | Mode::Fullnat);
            if nat && !host.forwarding(s.vip.is_ipv4()) {
                let knob = if s.vip.is_ipv4() {
                    "net.ipv4.ip_forward=1"
                } else {
                    "net.ipv6.conf.all.forwarding=1"
                };
                err(
                    format!("{p}.mode"),
                    format!(
                        "mode `{}` routes packets, so the director needs IP forwarding (the kernel FIB lookup \
                         refuses otherwise): sysctl -w {knob}",
                        s.mode
                    ),
                );
            }
            if s.mode == Mode::Fullnat {
                match &self.fullnat {
                    None => err(
                        format!("{p}.mode"),
                        "full-NAT needs a source pool: add `fullnat: {{pool: [ADDRESS, ...]}}`"
                            .into(),
                    ),
                    Some(f) if f.capacity(s.vip.is_ipv4()) == 0 => err(
                        format!("{p}.mode"),
                        format!(
                            "full-NAT needs an {} address in `fullnat.pool`",
                            if s.vip.is_ipv4() { "IPv4" } else { "IPv6" }
                        ),
                    ),
                    _ => {}
                }
            }
            if let Some(fields) = &s.hash_fields {
                if s.scheduler != Scheduler::Maglev {
                    err(
                        format!("{p}.hash_fields"),
                        format!(
                            "`hash_fields` applies to `scheduler: maglev` (`{}` {})",
                            s.scheduler,
                            if s.scheduler == Scheduler::Sh {
                                "always hashes the source address: use maglev with hash_fields: [src_ip, ...] for other choices"
                            } else {
                                "does not hash"
                            }
                        ),
                    );
                } else if fields.is_empty() {
                    err(
                        format!("{p}.hash_fields"),
                        "an empty list hashes nothing (every flow would land on one backend); list fields or leave it out".into(),
                    );
                } else if fields.iter().collect::<HashSet<_>>().len() != fields.len() {
                    err(format!("{p}.hash_fields"), "a field is listed twice".into());
                }
            }
            if !s.persistence.is_zero() {
                if !(PERSISTENCE_MIN..=PERSISTENCE_MAX).contains(&s.persistence) {
                    err(
                        format!("{p}.persistence"),
                        format!(
                            "{:?} is out of range {PERSISTENCE_MIN:?}..={PERSISTENCE_MAX:?} (0s = off)",
                            s.persistence
                        ),
                    );
                } else if s.scheduler == Scheduler::Sh {
                    err(
                        format!("{p}.persistence"),
                        "`sh` already sends every flow of a client to one backend while the backend set is \
                         stable; persistence on top of it only adds state — use one or the other"
                            .into(),
                    );
                } else if s
                    .hash_fields
                    .as_ref()
                    .is_some_and(|f| f.iter().all(|h| *h == HashField::SrcIp))
                {
                    err(
                        format!("{p}.persistence"),
                        "hashing on the source address only is already client-sticky; persistence on top \
                         of it only adds state — use one or the other"
                            .into(),
                    );
                }
            }
            if s.ring_fast_path {
                if let Some(why) = s.ring_fast_path_unfit() {
                    err(format!("{p}.ring_fast_path"), why);
                }
            }
            if s.ring_fast_path_hold > RING_FAST_PATH_HOLD_MAX {
                err(
                    format!("{p}.ring_fast_path_hold"),
                    format!(
                        "{} is longer than the limit of 24h",
                        humantime::format_duration(s.ring_fast_path_hold)
                    ),
                );
            }
            if let Some(hc) = &s.health_check {
                validate_check(s, hc, &format!("{p}.health_check"), &mut err);
            }
            if s.backends.is_empty() {
                err(
                    format!("{p}.backends"),
                    format!("service `{}` has no backends", s.name),
                );
            } else if s.backends.iter().all(|b| b.weight == 0) {
                err(
                    format!("{p}.backends"),
                    format!(
                        "every backend of `{}` has weight 0; at least one must be above 0",
                        s.name
                    ),
                );
            }
            let mut seen = HashSet::new();
            for (j, b) in s.backends.iter().enumerate() {
                let bp = format!("{p}.backends[{j}]");
                if !seen.insert(b.address) {
                    err(
                        format!("{bp}.address"),
                        format!("backend {} is listed twice", b.address),
                    );
                }
                if b.address.is_ipv4() != s.vip.is_ipv4() && s.mode == Mode::Dr {
                    err(
                        format!("{bp}.address"),
                        format!(
                            "DR mode needs backends of the VIP's address family ({} vs {})",
                            b.address, s.vip
                        ),
                    );
                }
                if s.mode != Mode::Dr && !host.has_route(b.address) {
                    err(
                        format!("{bp}.address"),
                        format!(
                            "this host has no route to backend {} ({} mode routes to it): add one, e.g. \
                             `ip route add {} via GATEWAY`",
                            b.address, s.mode, b.address
                        ),
                    );
                }
                // One arm: the backends' replies come back only if the director is their
                // gateway, which it cannot be for a backend it reaches through a gateway.
                if s.mode == Mode::Nat && self.interfaces.len() == 1 && host.via_gateway(b.address)
                {
                    err(
                        format!("{bp}.address"),
                        format!(
                            "NAT on a one-armed director: backend {} is reached through a gateway, so its \
                             replies have no route back through this director; put the backends on a subnet \
                             of `{}` with the director as their default gateway, or use mode: fullnat",
                            b.address, self.interfaces[0].name
                        ),
                    );
                }
                if nat && b.address.is_ipv4() != s.vip.is_ipv4() {
                    err(
                        format!("{bp}.address"),
                        format!(
                            "{} mode needs backends of the VIP's address family ({} vs {})",
                            s.mode, b.address, s.vip
                        ),
                    );
                }
                if b.port.is_some() && !nat {
                    err(
                        format!("{bp}.port"),
                        format!("a backend port only applies to nat/fullnat; `{}` keeps the client's port", s.mode),
                    );
                }
                if b.port == Some(0) {
                    err(
                        format!("{bp}.port"),
                        "port 0 is not a backend port; leave `port` out to keep the client's"
                            .into(),
                    );
                }
                if s.mode == Mode::Tun {
                    if s.vip.is_ipv6() && b.address.is_ipv4() {
                        err(
                            format!("{bp}.address"),
                            format!(
                                "TUN cannot carry the IPv6 VIP {} to the IPv4 backend {} (no IPv6-in-IPv4); use IPv6 backends",
                                s.vip, b.address
                            ),
                        );
                    } else if !self.interfaces.iter().any(|i| {
                        i.tun_sources()
                            .iter()
                            .any(|t| t.addr.is_ipv4() == b.address.is_ipv4())
                    }) {
                        let family = if b.address.is_ipv4() { "IPv4" } else { "IPv6" };
                        err(
                            format!("{bp}.address"),
                            format!(
                                "TUN to the {family} backend {} needs an {family} outer source: add one to \
                                 `tun_source` of an interface",
                                b.address
                            ),
                        );
                    }
                }
                if let Some(Err(e)) = b.mac.as_deref().map(Mac::from_str) {
                    err(format!("{bp}.mac"), e);
                }
                if b.weight > MAX_WEIGHT {
                    err(
                        format!("{bp}.weight"),
                        format!("weight {} is out of range 0..={MAX_WEIGHT}", b.weight),
                    );
                }
            }
        }
        errs
    }

    /// Whether a service uses the ring fast path (the data plane is loaded with it compiled in).
    pub fn ring_fast(&self) -> bool {
        self.services.iter().any(|s| s.ring_fast_path)
    }

    /// The UDP idle timeout (validated).
    pub fn udp_idle_timeout(&self) -> Duration {
        self.udp_idle_timeout
            .as_deref()
            .and_then(|t| humantime::parse_duration(t).ok())
            .unwrap_or(Duration::from_nanos(lb_common::UDP_IDLE_DEFAULT_NS))
    }

    pub fn flow_table_size(&self) -> u32 {
        self.flow_table_size.unwrap_or(FLOW_TABLE_CAPACITY)
    }

    pub fn flow_cache_size(&self) -> u32 {
        self.flow_cache_size.unwrap_or(lb_common::FLOW_CACHE_SLOTS)
    }
}

fn validate_check(s: &Service, hc: &HealthCheck, p: &str, err: &mut impl FnMut(String, String)) {
    let kind = hc.kind;
    let interval_ok = (CHECK_INTERVAL_MIN..=CHECK_INTERVAL_MAX).contains(&hc.interval);
    if !interval_ok {
        err(
            format!("{p}.interval"),
            format!(
                "{:?} is out of range {CHECK_INTERVAL_MIN:?}..={CHECK_INTERVAL_MAX:?}",
                hc.interval
            ),
        );
    }
    if interval_ok && (hc.timeout.is_zero() || hc.timeout > hc.interval) {
        err(
            format!("{p}.timeout"),
            format!(
                "timeout {:?} must be above 0 and at most the interval ({:?})",
                hc.timeout, hc.interval
            ),
        );
    }
    for (name, v) in [("rise", hc.rise), ("fall", hc.fall)] {
        if !(1..=CHECK_COUNT_MAX).contains(&v) {
            err(
                format!("{p}.{name}"),
                format!("{v} is out of range 1..={CHECK_COUNT_MAX}"),
            );
        }
    }
    let only =
        |field: &str, present: bool, for_kind: CheckKind, err: &mut dyn FnMut(String, String)| {
            if present && kind != for_kind {
                err(
                    format!("{p}.{field}"),
                    format!(
                    "`{field}` only applies to `kind: {for_kind}` checks (this one is `{kind}`)"
                ),
                );
            }
        };
    only("path", hc.path.is_some(), CheckKind::Http, err);
    only(
        "expect_status",
        hc.expect_status.is_some(),
        CheckKind::Http,
        err,
    );
    only("payload", hc.payload.is_some(), CheckKind::Udp, err);
    only("expect", hc.expect.is_some(), CheckKind::Udp, err);
    only("command", !hc.command.is_empty(), CheckKind::Exec, err);
    if kind == CheckKind::Exec && hc.command.first().is_none_or(|c| c.is_empty()) {
        err(
            format!("{p}.command"),
            "an exec check needs a command, e.g. [\"/usr/local/bin/check\", \"{address}\", \"{port}\"]".into(),
        );
    }
    if let Some(path) = &hc.path {
        if !path.starts_with('/') || path.chars().any(|c| c.is_whitespace() || c.is_control()) {
            err(
                format!("{p}.path"),
                format!("`{path}` is not an absolute URL path (start with `/`, no spaces)"),
            );
        }
    }
    if let Some(code) = hc.expect_status {
        if !(100..=599).contains(&code) {
            err(
                format!("{p}.expect_status"),
                format!("{code} is not an HTTP status (100..=599)"),
            );
        }
    }
    if hc.port == Some(0) {
        err(format!("{p}.port"), "port 0 cannot be checked".into());
    }
    let needs_port = matches!(kind, CheckKind::Tcp | CheckKind::Http | CheckKind::Udp);
    if needs_port && hc.port.is_none() && s.port == 0 && s.backends.iter().any(|b| b.port.is_none())
    {
        err(
            format!("{p}.port"),
            format!(
                "service `{}` covers every port (port: 0), so the {kind} check needs a `port` to connect to",
                s.name
            ),
        );
    }
}

/// Field path -> 1-based line, from the YAML event stream (serde_yaml keeps no positions).
fn path_lines(text: &str) -> HashMap<String, usize> {
    use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
    use yaml_rust2::scanner::Marker;

    enum Frame {
        Map { key: Option<String> },
        Seq { idx: usize },
    }
    struct Rec {
        stack: Vec<Frame>,
        lines: HashMap<String, usize>,
    }
    impl Rec {
        fn path(&self) -> String {
            let mut p = String::new();
            for f in &self.stack {
                match f {
                    Frame::Map { key: Some(k) } => {
                        if !p.is_empty() {
                            p.push('.');
                        }
                        p.push_str(k);
                    }
                    Frame::Map { key: None } => {}
                    Frame::Seq { idx } => p.push_str(&format!("[{idx}]")),
                }
            }
            p
        }
        /// A value (scalar or container) finished: the parent moves on.
        fn advance(&mut self) {
            match self.stack.last_mut() {
                Some(Frame::Map { key }) => *key = None,
                Some(Frame::Seq { idx }) => *idx += 1,
                None => {}
            }
        }
        /// A value starts here: remember where (for sequence items and map values).
        fn start_value(&mut self, line: usize) {
            if matches!(self.stack.last(), Some(Frame::Seq { .. })) {
                let p = self.path();
                self.lines.entry(p).or_insert(line);
            }
        }
    }
    impl MarkedEventReceiver for Rec {
        fn on_event(&mut self, ev: Event, mark: Marker) {
            let line = mark.line();
            match ev {
                Event::Scalar(s, ..) => {
                    if let Some(Frame::Map { key: key @ None }) = self.stack.last_mut() {
                        *key = Some(s);
                        let p = self.path();
                        self.lines.insert(p, line);
                    } else {
                        self.start_value(line);
                        self.advance();
                    }
                }
                Event::MappingStart(..) => {
                    self.start_value(line);
                    self.stack.push(Frame::Map { key: None });
                }
                Event::SequenceStart(..) => {
                    self.start_value(line);
                    self.stack.push(Frame::Seq { idx: 0 });
                }
                Event::MappingEnd | Event::SequenceEnd => {
                    self.stack.pop();
                    self.advance();
                }
                _ => {}
            }
        }
    }
    let mut rec = Rec {
        stack: Vec::new(),
        lines: HashMap::new(),
    };
    // Syntax errors were already reported by serde_yaml; positions are best effort.
    let _ = Parser::new_from_str(text).load(&mut rec, false);
    rec.lines
}

/// The line of `path`, or of its nearest ancestor that has one.
fn line_of(lines: &HashMap<String, usize>, path: &str) -> Option<usize> {
    let mut p = path;
    loop {
        if let Some(&l) = lines.get(p) {
            return Some(l);
        }
        let cut = p.rfind(['.', '['])?;
        p = &p[..cut];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "\
interfaces:
  - name: eth0
    xdp_mode: native
services:
  - name: web
    vip: 198.18.0.100
    port: 80
    protocol: tcp
    mode: dr
    backends:
      - address: 198.18.1.11
        weight: 100
        mac: 02:00:00:00:01:0b
      - address: 198.18.1.12
  - name: web6
    vip: 2001:db8::100
    port: 0
    protocol: udp
    mode: dr
    backends:
      - address: 2001:db8::11
";

    fn errors(text: &str) -> Vec<ConfigError> {
        Config::parse(text, &AnyHost).expect_err("config should be rejected")
    }

    fn one_error(text: &str) -> ConfigError {
        let e = errors(text);
        assert_eq!(e.len(), 1, "expected one error, got {e:?}");
        e.into_iter().next().unwrap()
    }

    #[test]
    fn good_config_parses_with_defaults() {
        let c = Config::parse(GOOD, &AnyHost).unwrap();
        assert_eq!(c.interfaces[0].xdp_mode, XdpMode::Native);
        assert_eq!(c.services[0].backends[1].weight, 100);
        assert_eq!(
            c.services[0].backends[0].mac(),
            Some(Mac([2, 0, 0, 0, 1, 0x0b]))
        );
        assert_eq!(c.services[1].port, 0);
        assert_eq!(c.services[0].scheduler, Scheduler::Maglev);
        assert_eq!(c.flow_table_size(), FLOW_TABLE_CAPACITY);
    }

    #[test]
    fn flow_cache_size_is_off_or_a_power_of_two() {
        let with =
            |v: &str| GOOD.replace("services:\n", &format!("flow_cache_size: {v}\nservices:\n"));
        assert_eq!(
            Config::parse(GOOD, &AnyHost).unwrap().flow_cache_size(),
            lb_common::FLOW_CACHE_SLOTS
        );
        for (v, slots) in [("0", 0), ("4", 4), ("1048576", 1 << 20)] {
            assert_eq!(
                Config::parse(&with(v), &AnyHost).unwrap().flow_cache_size(),
                slots
            );
        }
        for v in ["1", "2", "3", "65535", "33554432"] {
            let e = one_error(&with(v));
            assert_eq!(e.path, "flow_cache_size", "{v}");
            assert_eq!(e.line, Some(4), "{v}");
            assert!(e.message.contains("power of two"), "{e}");
        }
    }

    #[test]
    fn unknown_key_names_field_and_line() {
        let e = one_error(&GOOD.replace("        weight: 100\n", "        wieght: 100\n"));
        assert_eq!(e.line, Some(12));
        assert!(e.message.contains("unknown field `wieght`"), "{e}");
        assert!(e.to_string().contains("services[0].backends[0]"), "{e}");
    }

    #[test]
    fn invalid_yaml_is_one_error_with_line() {
        let e = one_error("interfaces:\n  - name: [eth0\nservices: []\n");
        assert!(e.line.is_some(), "{e}");
    }

    #[test]
    fn weight_out_of_range_names_path_and_line() {
        let e = one_error(&GOOD.replace("weight: 100", "weight: 70000"));
        assert_eq!(e.path, "services[0].backends[0].weight");
        assert_eq!(e.line, Some(12));
        assert!(e.message.contains("out of range"), "{e}");
    }

    /// GOOD with `extra` (indented lines) added to services[0] after `mode: dr` (line 9).
    fn with_web(extra: &str) -> String {
        GOOD.replacen("    mode: dr\n", &format!("    mode: dr\n{extra}"), 1)
    }

    #[test]
    fn health_checks_parse_with_defaults_and_policies() {
        let c = Config::parse(
            &with_web(
                "    on_backend_down: reset\n    on_all_down: pass\n    health_check:\n      kind: http\n      path: /healthz\n",
            ),
            &AnyHost,
        )
        .unwrap();
        let s = &c.services[0];
        let hc = s.health_check.as_ref().unwrap();
        assert_eq!(hc.kind, CheckKind::Http);
        assert_eq!(
            (hc.interval, hc.timeout, hc.rise, hc.fall),
            (Duration::from_secs(1), Duration::from_millis(500), 2, 3)
        );
        assert_eq!(s.on_backend_down, DownPolicy::Reset);
        assert_eq!(s.on_all_down, AllDownPolicy::Pass);
        assert_eq!(c.services[1].on_backend_down, DownPolicy::Keep);
        assert_eq!(c.services[1].on_all_down, AllDownPolicy::Drop);
        for kind in ["tcp", "udp", "none"] {
            Config::parse(
                &with_web(&format!("    health_check: {{kind: {kind}}}\n")),
                &AnyHost,
            )
            .unwrap_or_else(|e| panic!("{kind}: {e:?}"));
        }
        Config::parse(
            &with_web("    health_check: {kind: exec, command: [/bin/true, '{address}']}\n"),
            &AnyHost,
        )
        .unwrap();
    }

    #[test]
    fn bad_health_checks_name_field_and_line() {
        let cases: &[(&str, &str, usize, &str)] = &[
            (
                "    health_check:\n      kind: tcp\n      interval: 10ms\n",
                "services[0].health_check.interval",
                12,
                "out of range",
            ),
            (
                "    health_check:\n      interval: 1s\n      timeout: 2s\n",
                "services[0].health_check.timeout",
                12,
                "at most the interval",
            ),
            (
                "    health_check:\n      fall: 0\n",
                "services[0].health_check.fall",
                11,
                "out of range",
            ),
            (
                "    health_check:\n      kind: tcp\n      path: /x\n",
                "services[0].health_check.path",
                12,
                "only applies to `kind: http`",
            ),
            (
                "    health_check:\n      kind: exec\n",
                "services[0].health_check.command",
                10,
                "needs a command",
            ),
            (
                "    health_check:\n      kind: http\n      path: healthz\n",
                "services[0].health_check.path",
                12,
                "absolute URL path",
            ),
            (
                "    health_check:\n      kind: http\n      expect_status: 42\n",
                "services[0].health_check.expect_status",
                12,
                "not an HTTP status",
            ),
            (
                "    health_check:\n      kind: udp\n      expect: pong\n      command: [x]\n",
                "services[0].health_check.command",
                13,
                "only applies to `kind: exec`",
            ),
        ];
        for (extra, path, line, msg) in cases {
            let e = one_error(&with_web(extra));
            assert_eq!(e.path, *path, "{extra}");
            assert_eq!(e.line, Some(*line), "{extra}: {e}");
            assert!(e.message.contains(msg), "{extra}: {e}");
        }
        // Unknown kind / policy values and unknown keys are syntax-level errors with a line.
        for extra in [
            "    health_check: {kind: icmp}\n",
            "    on_backend_down: maybe\n",
            "    on_all_down: sorry\n",
            "    health_check: {kind: tcp, retries: 3}\n",
        ] {
            let e = one_error(&with_web(extra));
            assert_eq!(e.line, Some(10), "{extra}: {e}");
        }
        // A service on every port needs a port to check.
        let e = one_error(&GOOD.replacen(
            "    protocol: udp\n",
            "    protocol: udp\n    health_check: {kind: udp}\n",
            1,
        ));
        assert_eq!(e.path, "services[1].health_check.port");
        assert!(e.message.contains("needs a `port`"), "{e}");
    }

    #[test]
    fn schedulers_and_persistence_parse_and_bad_ones_name_field_and_line() {
        for sched in ["maglev", "rr", "wrr", "sh", "lc", "wlc"] {
            let c = Config::parse(&with_web(&format!("    scheduler: {sched}\n")), &AnyHost)
                .unwrap_or_else(|e| panic!("{sched}: {e:?}"));
            assert_eq!(c.services[0].scheduler.to_string(), sched);
        }
        let c = Config::parse(
            &with_web("    hash_fields: [src_ip, dst_port]\n    persistence: 300s\n"),
            &AnyHost,
        )
        .unwrap();
        assert_eq!(
            c.services[0].hash_fields,
            Some(vec![HashField::SrcIp, HashField::DstPort])
        );
        assert_eq!(c.services[0].persistence, Duration::from_secs(300));
        let cases: &[(&str, &str, usize, &str)] = &[
            (
                "    scheduler: rr\n    hash_fields: [src_ip]\n",
                "services[0].hash_fields",
                11,
                "applies to `scheduler: maglev`",
            ),
            (
                "    hash_fields: []\n",
                "services[0].hash_fields",
                10,
                "empty list",
            ),
            (
                "    hash_fields: [src_ip, src_ip]\n",
                "services[0].hash_fields",
                10,
                "listed twice",
            ),
            (
                "    persistence: 500ms\n",
                "services[0].persistence",
                10,
                "out of range",
            ),
            (
                "    persistence: 2d\n",
                "services[0].persistence",
                10,
                "out of range",
            ),
            (
                "    scheduler: sh\n    persistence: 60s\n",
                "services[0].persistence",
                11,
                "`sh` already sends",
            ),
            (
                "    hash_fields: [src_ip]\n    persistence: 60s\n",
                "services[0].persistence",
                11,
                "already client-sticky",
            ),
        ];
        for (extra, path, line, msg) in cases {
            let e = one_error(&with_web(extra));
            assert_eq!(e.path, *path, "{extra}");
            assert_eq!(e.line, Some(*line), "{extra}: {e}");
            assert!(e.message.contains(msg), "{extra}: {e}");
        }
        // Unknown scheduler / field: one syntax-level error with its line.
        for extra in ["    scheduler: fastest\n", "    hash_fields: [src_mac]\n"] {
            let e = one_error(&with_web(extra));
            assert_eq!(e.line, Some(10), "{extra}: {e}");
        }
        // Weights that sum to zero stay an error for every scheduler.
        let e = one_error(
            &with_web("    scheduler: wrr\n")
                .replace("weight: 100", "weight: 0")
                .replacen(
                    "      - address: 198.18.1.12\n",
                    "      - address: 198.18.1.12\n        weight: 0\n",
                    1,
                ),
        );
        assert!(e.message.contains("weight 0"), "{e}");
    }

    #[test]
    fn ring_fast_path_parses_for_dr_tcp_maglev_and_names_field_and_line_otherwise() {
        for extra in [
            "    ring_fast_path: true\n",
            "    scheduler: sh\n    ring_fast_path: true\n",
            "    hash_fields: [src_ip, src_port]\n    ring_fast_path: true\n",
        ] {
            let c = Config::parse(&with_web(extra), &AnyHost)
                .unwrap_or_else(|e| panic!("{extra}: {e:?}"));
            assert!(c.services[0].ring_fast_path && c.ring_fast(), "{extra}");
        }
        assert!(!Config::parse(GOOD, &AnyHost).unwrap().ring_fast());
        let tun = GOOD.replacen("mode: dr\n", "mode: tun\n    ring_fast_path: true\n", 1);
        if let Err(e) = Config::parse(&tun, &AnyHost) {
            assert!(
                !e.iter().any(|e| e.path.ends_with("ring_fast_path")),
                "{e:?}"
            );
        }
        let cases: &[(String, usize, &str)] = &[
            (
                with_web("    scheduler: rr\n    ring_fast_path: true\n"),
                11,
                "`rr` does not pick",
            ),
            (
                with_web("    scheduler: wlc\n    ring_fast_path: true\n"),
                11,
                "`wlc` does not pick",
            ),
            (
                with_web("    persistence: 60s\n    ring_fast_path: true\n"),
                11,
                "with persistence",
            ),
            (
                GOOD.replacen("mode: dr\n", "mode: nat\n    ring_fast_path: true\n", 1),
                10,
                "is for `dr` and `tun`",
            ),
            (
                GOOD.replacen(
                    "protocol: tcp\n    mode: dr\n",
                    "protocol: udp\n    mode: dr\n    ring_fast_path: true\n",
                    1,
                ),
                10,
                "is for TCP",
            ),
        ];
        for (text, line, msg) in cases {
            let e = one_error(text);
            assert_eq!(e.path, "services[0].ring_fast_path", "{text}");
            assert_eq!(e.line, Some(*line), "{text}: {e}");
            assert!(e.message.contains(msg), "{text}: {e}");
        }
        // The hold: 15 minutes unless set, at most a day.
        let c = Config::parse(
            &with_web(
                "    ring_fast_path: true
",
            ),
            &AnyHost,
        )
        .unwrap();
        assert_eq!(
            c.services[0].ring_fast_path_hold,
            RING_FAST_PATH_HOLD_DEFAULT
        );
        let c = Config::parse(
            &with_web(
                "    ring_fast_path: true
    ring_fast_path_hold: 90s
",
            ),
            &AnyHost,
        )
        .unwrap();
        assert_eq!(c.services[0].ring_fast_path_hold, Duration::from_secs(90));
        let e = one_error(&with_web(
            "    ring_fast_path: true
    ring_fast_path_hold: 2d
",
        ));
        assert_eq!(e.path, "services[0].ring_fast_path_hold");
        assert_eq!(e.line, Some(11), "{e}");
        assert!(e.message.contains("limit of 24h"), "{e}");
    }

    #[test]
    fn duplicate_service_is_rejected() {
        let text = GOOD.replace(
            "vip: 2001:db8::100\n    port: 0\n    protocol: udp",
            "vip: 198.18.0.100\n    port: 80\n    protocol: tcp",
        );
        let e = errors(&text)
            .into_iter()
            .find(|e| e.path == "services[1].vip")
            .expect("duplicate reported");
        assert_eq!(e.line, Some(16));
        assert!(e.message.contains("duplicate service"), "{e}");
    }

    #[test]
    fn vip_without_backends_is_rejected() {
        let text = GOOD.replace(
            "    backends:\n      - address: 2001:db8::11\n",
            "    backends: []\n",
        );
        let e = one_error(&text);
        assert_eq!(e.path, "services[1].backends");
        assert!(e.message.contains("no backends"), "{e}");
    }

    #[test]
    fn all_zero_weights_are_rejected() {
        let text = GOOD.replace(
            "      - address: 2001:db8::11\n",
            "      - address: 2001:db8::11\n        weight: 0\n",
        );
        assert!(one_error(&text).message.contains("weight 0"));
    }

    #[test]
    fn bad_mac_and_bad_mode_value() {
        let e = one_error(&GOOD.replace("02:00:00:00:01:0b", "02:00:00:00:01"));
        assert_eq!(e.line, Some(13));
        assert!(e.message.contains("invalid MAC"), "{e}");
        let e = one_error(&GOOD.replace("mode: dr", "mode: magic"));
        assert!(e.message.contains("unknown variant `magic`"), "{e}");
    }

    #[test]
    fn missing_interface_is_reported() {
        struct NoIfaces;
        impl Host for NoIfaces {
            fn interface_exists(&self, _: &str) -> bool {
                false
            }
        }
        let e = Config::parse(GOOD, &NoIfaces).unwrap_err();
        assert_eq!(e.len(), 1);
        assert_eq!(e[0].path, "interfaces[0].name");
        assert_eq!(e[0].line, Some(2));
        assert!(e[0].message.contains("does not exist"));
    }

    #[test]
    fn every_error_is_reported_at_once() {
        let text = GOOD.replace("weight: 100", "weight: 70000").replace(
            "mode: dr\n    backends:\n      - address: 2001",
            "mode: dr\n    persistence: 3d\n    backends:\n      - address: 2001",
        );
        let e = errors(&text);
        assert_eq!(e.len(), 2, "{e:?}");
        assert_eq!(e[1].path, "services[1].persistence");
    }

    #[test]
    fn mixed_family_backend_in_dr_is_rejected() {
        let e = one_error(&GOOD.replace("address: 2001:db8::11", "address: 198.18.1.20"));
        assert_eq!(e.path, "services[1].backends[0].address");
        assert_eq!(e.line, Some(21));
    }

    const TUN: &str = "\
interfaces:
  - name: eth0
    tun_source: [198.18.0.3, 2001:db8:1::3]
services:
  - name: web
    vip: 198.18.0.100
    port: 80
    protocol: tcp
    mode: tun
    backends:
      - address: 198.18.5.11
      - address: 2001:db8:5::11
";

    #[test]
    fn tun_with_sources_of_both_families_parses() {
        let c = Config::parse(TUN, &AnyHost).unwrap();
        let srcs = c.interfaces[0].tun_sources();
        assert_eq!(srcs.len(), 2);
        assert_eq!(srcs[0].prefix_len, 32);
        assert_eq!(c.interfaces[0].entropy_bits(&srcs[0]), 0);
    }

    #[test]
    fn tun_backend_without_outer_source_names_the_backend() {
        let e = one_error(&TUN.replace(
            "tun_source: [198.18.0.3, 2001:db8:1::3]",
            "tun_source: [198.18.0.3]",
        ));
        assert_eq!(e.path, "services[0].backends[1].address");
        assert_eq!(e.line, Some(12));
        assert!(e.message.contains("needs an IPv6 outer source"), "{e}");
    }

    #[test]
    fn tun_cannot_carry_ipv6_vip_to_ipv4_backend() {
        let text = TUN.replace("vip: 198.18.0.100", "vip: 2001:db8::100");
        let e = one_error(&text);
        assert_eq!(e.path, "services[0].backends[0].address");
        assert!(e.message.contains("no IPv6-in-IPv4"), "{e}");
    }

    #[test]
    fn tun_source_prefixes_need_entropy_and_vice_versa() {
        let e = one_error(&TUN.replace("198.18.0.3,", "198.18.200.0/24,"));
        assert_eq!(e.path, "interfaces[0].tun_source[0]");
        assert!(e.message.contains("tun_source_entropy"), "{e}");
        let e = one_error(&TUN.replace(
            "    tun_source:",
            "    tun_source_entropy: true\n    tun_source:",
        ));
        assert_eq!(e.path, "interfaces[0].tun_source_entropy");
        let ok = TUN.replace(
            "    tun_source: [198.18.0.3, 2001:db8:1::3]",
            "    tun_source_entropy: true\n    tun_source: [198.18.200.0/24, 2001:db8:200::/64]",
        );
        let c = Config::parse(&ok, &AnyHost).unwrap();
        let srcs = c.interfaces[0].tun_sources();
        assert_eq!(c.interfaces[0].entropy_bits(&srcs[0]), 8);
        assert_eq!(
            c.interfaces[0].entropy_bits(&srcs[1]),
            32,
            "capped at 32 bits"
        );
    }

    #[test]
    fn bad_and_duplicate_tun_sources() {
        let e = one_error(&TUN.replace("198.18.0.3,", "198.18.0.3, 198.18.0.4,"));
        assert_eq!(e.path, "interfaces[0].tun_source[1]");
        assert!(
            e.message.contains("one tun_source per address family"),
            "{e}"
        );
        let e = errors(&TUN.replace("198.18.0.3,", "banana,"));
        assert_eq!(e[0].path, "interfaces[0].tun_source[0]");
        assert!(e[0].message.contains("not an IP address"), "{e:?}");
    }

    const NAT: &str = "\
interfaces:
  - name: eth0
  - name: eth1
flow_table_size: 65536
fullnat:
  pool: [198.18.5.100, 198.18.5.101]
services:
  - name: web
    vip: 198.18.0.100
    port: 80
    protocol: tcp
    mode: nat
    backends:
      - address: 198.18.5.11
        port: 8080
  - name: web-full
    vip: 198.18.0.100
    port: 443
    protocol: tcp
    mode: fullnat
    backends:
      - address: 198.18.5.12
";

    #[test]
    fn nat_and_fullnat_parse_with_backend_ports() {
        let c = Config::parse(NAT, &AnyHost).unwrap();
        assert_eq!(c.services[0].backends[0].port, Some(8080));
        let f = c.fullnat.as_ref().unwrap();
        assert_eq!((f.port_min, f.port_max), (1024, 65535));
        assert_eq!(f.capacity(true), 2 * 64512);
    }

    #[test]
    fn fullnat_pool_too_small_for_the_flow_table() {
        let e = one_error(&NAT.replace("flow_table_size: 65536", "flow_table_size: 1048576"));
        assert_eq!(e.path, "fullnat.pool");
        assert_eq!(e.line, Some(6));
        assert!(e.message.contains("cannot hold the 1048576 flows"), "{e}");
    }

    #[test]
    fn fullnat_needs_a_pool_of_its_family_without_overlaps() {
        let e = one_error(&NAT.replace("fullnat:\n  pool: [198.18.5.100, 198.18.5.101]\n", ""));
        assert_eq!(e.path, "services[1].mode");
        assert!(e.message.contains("needs a source pool"), "{e}");
        let e = errors(&NAT.replace("198.18.5.101]", "198.18.5.100]"));
        assert!(
            e.iter()
                .any(|e| e.path == "fullnat.pool[1]" && e.message.contains("listed twice")),
            "{e:?}"
        );
        let e = errors(&NAT.replace("198.18.5.101]", "198.18.0.100]"));
        assert!(
            e.iter()
                .any(|e| e.path == "fullnat.pool[1]" && e.message.contains("is a VIP")),
            "{e:?}"
        );
        let e = one_error(&NAT.replace(
            "pool: [198.18.5.100, 198.18.5.101]",
            "pool: [2001:db8:5::100]",
        ));
        assert!(
            e.message
                .contains("needs an IPv4 address in `fullnat.pool`"),
            "{e}"
        );
    }

    #[test]
    fn backend_ports_only_in_nat_modes_and_families_match() {
        let e = one_error(&NAT.replace("mode: nat", "mode: dr"));
        assert_eq!(e.path, "services[0].backends[0].port");
        let e = errors(&NAT.replace("address: 198.18.5.11", "address: 2001:db8:5::11"));
        assert!(
            e.iter().any(|e| e.path == "services[0].backends[0].address"
                && e.message.contains("address family")),
            "{e:?}"
        );
    }

    #[test]
    fn nat_needs_forwarding() {
        struct NoForwarding;
        impl Host for NoForwarding {
            fn interface_exists(&self, _: &str) -> bool {
                true
            }
            fn forwarding(&self, _: bool) -> bool {
                false
            }
        }
        let e = Config::parse(NAT, &NoForwarding).unwrap_err();
        assert_eq!(e.len(), 2, "{e:?}");
        assert!(
            e[0].message.contains("sysctl -w net.ipv4.ip_forward=1"),
            "{e:?}"
        );
    }

    #[test]
    fn udp_idle_timeout_defaults_and_bounds() {
        let c = Config::parse(GOOD, &AnyHost).unwrap();
        assert_eq!(c.udp_idle_timeout(), Duration::from_secs(30));
        let c = Config::parse(&format!("udp_idle_timeout: 2m\n{GOOD}"), &AnyHost).unwrap();
        assert_eq!(c.udp_idle_timeout(), Duration::from_secs(120));
        let e = one_error(&format!("udp_idle_timeout: 100ms\n{GOOD}"));
        assert_eq!((e.path.as_str(), e.line), ("udp_idle_timeout", Some(1)));
        let e = one_error(&format!("udp_idle_timeout: soon\n{GOOD}"));
        assert!(e.message.contains("invalid duration"), "{e}");
    }

    #[test]
    fn routed_modes_need_a_route_to_each_backend() {
        struct NoRoutes;
        impl Host for NoRoutes {
            fn interface_exists(&self, _: &str) -> bool {
                true
            }
            fn via_gateway(&self, addr: IpAddr) -> bool {
                // rtnetlink is async; validation is not (and may run inside a runtime already).
                std::thread::spawn(move || {
                    let rt = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .ok()?;
                    rt.block_on(async {
                        crate::netlink::Netlink::new().ok()?.via_gateway(addr).await
                    })
                })
                .join()
                .ok()
                .flatten()
                .unwrap_or(false)
            }
            fn has_route(&self, addr: IpAddr) -> bool {
                addr != "198.18.5.11".parse::<IpAddr>().unwrap()
            }
        }
        let e = Config::parse(NAT, &NoRoutes).unwrap_err();
        assert_eq!(e.len(), 1, "{e:?}");
        assert_eq!(e[0].path, "services[0].backends[0].address");
        assert!(
            e[0].message.contains("no route to backend 198.18.5.11"),
            "{e:?}"
        );
    }

    #[test]
    fn one_armed_nat_needs_on_link_backends() {
        struct Routed;
        impl Host for Routed {
            fn interface_exists(&self, _: &str) -> bool {
                true
            }
            fn via_gateway(&self, addr: IpAddr) -> bool {
                addr == "198.18.5.11".parse::<IpAddr>().unwrap()
            }
        }
        let one_arm = NAT.replace("  - name: eth1\n", "");
        let e = Config::parse(&one_arm, &Routed).unwrap_err();
        assert_eq!(e.len(), 1, "{e:?}");
        assert_eq!(e[0].path, "services[0].backends[0].address");
        assert!(
            e[0].message.contains("no route back through this director"),
            "{e:?}"
        );
        // Two arms, or full-NAT: fine.
        assert!(Config::parse(NAT, &Routed).is_ok());
    }
}
