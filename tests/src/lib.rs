//! Shared pieces of the xdplb tests: packet building (etherparse), a loaded director for
//! `BPF_PROG_TEST_RUN` fixtures, and network-namespace guards for end-to-end tests.
//! Everything here needs root; tests call [`require_root`] first.

pub mod control_bench;
pub mod http_bench;
pub mod load;
pub mod netns;
pub mod plot;
pub mod pps_bench;

use std::net::IpAddr;

use aya::programs::{TestRun, TestRunOptions};
use etherparse::{IpHeaders, Ipv4Header, Ipv6Header, PacketBuilder};
use lb_common::{flow_hash, FlowKey, RING_SIZE};
use lb_userspace::{
    config::{AnyHost, Config},
    dataplane::{self, addr_bytes, Desired, Director},
};

pub const XDP_ABORTED: u32 = 0;
pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;
pub const XDP_TX: u32 = 3;

/// MAC of the director's interface in fixtures (registered for ifindex 1: the loopback
/// device, which `BPF_PROG_TEST_RUN` reports as the ingress interface).
pub const DIRECTOR_MAC: [u8; 6] = [0x02, 0xd1, 0, 0, 0, 0x01];
pub const CLIENT_MAC: [u8; 6] = [0x02, 0xc1, 0, 0, 0, 0x01];

pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "this test needs root (BPF, namespaces): run `cargo xtask test`"
    );
}

/// A [`Harness`] whose maps come from the reconciler: config plus a per-backend runtime
/// state (health, drain, load) the test sets, as the controller would.
pub struct Reconciled {
    pub h: Harness,
    pub ids: lb_userspace::reconcile::Ids,
    pub runtime: std::collections::HashMap<
        lb_userspace::health::BackendKey,
        lb_userspace::reconcile::Runtime,
    >,
}

impl Reconciled {
    /// `yaml` must give every backend a `mac:`.
    pub fn new(yaml: &str) -> Reconciled {
        let mut r = Reconciled {
            h: Harness::new(yaml),
            ids: Default::default(),
            runtime: Default::default(),
        };
        r.apply();
        r
    }

    /// Write the desired state of config + `runtime` (a diff, as the controller does).
    pub fn apply(&mut self) -> lb_userspace::reconcile::Changes {
        let rt = &self.runtime;
        let want = lb_userspace::reconcile::desired(
            &self.h.config,
            &mut self.ids,
            |b| b.mac().map(|m| m.0).unwrap_or_default(),
            |k| rt.get(k).copied().unwrap_or_default(),
        );
        self.h.director.apply(&want).expect("apply")
    }

    /// Backend `addr` of service `vip:port/proto`.
    pub fn key(vip: &str, port: u16, proto: u8, addr: &str) -> lb_userspace::health::BackendKey {
        lb_userspace::health::BackendKey {
            vip: vip.parse().expect("vip"),
            port,
            proto,
            address: addr.parse().expect("address"),
        }
    }
}

/// Program `name` of a loaded object, loaded, as a descriptor for a program array (the
/// bench driver's tail-call slot).
pub fn program_fd(d: &mut Director, name: &'static str) -> aya::programs::ProgramFd {
    d.program(name)
        .unwrap_or_else(|e| panic!("load {name}: {e}"))
        .fd()
        .expect("loaded program's fd")
        .try_clone()
        .expect("dup the program fd")
}

/// The benchmark driver (`xdplb_bench_driver`) of a loaded object: loads it and takes its
/// tail-call slot (`BENCH_NEXT`) and its settings (`BENCH_CFG`).
pub fn bench_driver(
    d: &mut Director,
) -> (
    aya::maps::ProgramArray<aya::maps::MapData>,
    aya::maps::Array<aya::maps::MapData, u32>,
) {
    d.program(dataplane::BENCH_DRIVER_PROGRAM)
        .expect("load the bench driver");
    let next = d
        .ebpf_mut()
        .take_map("BENCH_NEXT")
        .expect("BENCH_NEXT")
        .try_into()
        .expect("program array");
    let cfg = d
        .ebpf_mut()
        .take_map("BENCH_CFG")
        .expect("BENCH_CFG")
        .try_into()
        .expect("array");
    (next, cfg)
}

/// A director loaded (not attached) with maps filled from a YAML config, for fixtures.
pub struct Harness {
    pub director: Director,
    pub desired: Desired,
    pub config: Config,
}

impl Harness {
    /// `yaml` must give every backend a `mac:`.
    pub fn new(yaml: &str) -> Harness {
        Harness::with_debug_log(yaml, false)
    }

    /// As [`Harness::new`], with the data plane's per-packet debug log compiled in or not.
    pub fn with_debug_log(yaml: &str, debug_log: bool) -> Harness {
        Harness::load(yaml, debug_log, 0)
    }

    /// As [`Harness::new`], with a director that ends established flows' packets after
    /// `stage` (the benchmark's stage breakdown, [`lb_common::stage`]).
    pub fn stopping_after(yaml: &str, stage: u8) -> Harness {
        Harness::load(yaml, false, stage)
    }

    fn load(yaml: &str, debug_log: bool, stop_after: u8) -> Harness {
        require_root();
        let config = Config::parse(yaml, &AnyHost)
            .unwrap_or_else(|e| panic!("fixture config invalid: {e:?}"));
        // DR backends need a `mac:` here; TUN backends have none.
        let desired = dataplane::desired(&config, |b| b.mac().map(|m| m.0).unwrap_or_default());
        let mut director = Director::load(&dataplane::LoadOptions {
            flow_table_size: config.flow_table_size(),
            pin_dir: None,
            debug_log,
            udp_idle: config.udp_idle_timeout(),
            adopt: false,
            stop_after,
            ring_fast: config.ring_fast(),
            flow_cache_size: config.flow_cache_size(),
        })
        .expect("load XDP object");
        director.apply(&desired).expect("fill maps");
        director
            .maps
            .set_iface(
                1,
                dataplane::iface_info(&config.interfaces[0], DIRECTOR_MAC),
            )
            .expect("register ifindex 1");
        Harness {
            director,
            desired,
            config,
        }
    }

    /// Run the director program once on `input`; returns (verdict, output bytes).
    pub fn run(&self, input: &[u8]) -> (u32, Vec<u8>) {
        run_program(self.director.director_program(), input)
    }

    /// The backend id userspace predicts for a flow on a miss (same hash, same table).
    pub fn predicted_backend(&self, service: usize, key: &FlowKey) -> u32 {
        self.desired.services[service].ring[(flow_hash(key) % RING_SIZE) as usize]
    }

    /// The `SERVICES` entry of desired service `service` as the data plane sees it now.
    pub fn live_service(&self, service: usize) -> lb_common::ServiceMeta {
        self.director
            .maps
            .services
            .get(&self.desired.services[service].key, 0)
            .expect("service in SERVICES")
    }

    /// The ids of desired service `service`'s backends.
    pub fn backends_of(&self, service: usize) -> Vec<u32> {
        let id = self.desired.services[service].id;
        self.desired
            .backends
            .iter()
            .filter(|(_, b)| b.service == id)
            .map(|(&b, _)| b)
            .collect()
    }

    pub fn backend_mac(&self, id: u32) -> [u8; 6] {
        self.desired.backends[&id].mac
    }

    pub fn reason(&self, slot: u32) -> u64 {
        self.director.maps.reason_totals().expect("read REASONS")[slot as usize]
    }

    /// Empty the flow-cache slot holding the key words `w` ([`lb_common::flow_cache_words`]
    /// or [`lb_common::flow_cache_reply_words`]) on every CPU, as the data plane's
    /// `cache_forget` does: a fixture that takes a table entry or mapping away as LRU
    /// eviction would, and wants the next packet to see that at once rather than within the
    /// second the slot may still answer. The set's other slot stays (a half-NAT flow's own
    /// slot shares the set of its replies').
    pub fn forget_cached(&mut self, w: &[u64; 3]) {
        let slots = self.config.flow_cache_size();
        if slots == 0 {
            return;
        }
        let bits = (slots / 2).trailing_zeros();
        let set = lb_common::flow_cache_set(w, bits);
        let mut cache = self.flow_cache();
        for cpu in 0..aya::util::nr_cpus().expect("possible CPUs") as u32 {
            let at = cpu << bits | set;
            let mut v = cache.get(&at, 0).expect("read the set");
            for slot in v.chunks_exact_mut(4) {
                if slot[0] == w[0]
                    && slot[1] == w[1]
                    && slot[2] & lb_common::cache_slot::TUPLE == w[2]
                {
                    slot[2] = 0;
                }
            }
            cache.set(at, v, 0).expect("write the set");
        }
    }

    /// Empty every flow-cache slot on every CPU, as a restarted director's cache starts: a
    /// benchmark row with N established flows then measures a cache holding those N flows
    /// only, not slots the row before it (up to 1M other flows, answering for a second)
    /// still holds. One write per two-slot set (65,536 on 2 CPUs: ~50 ms).
    pub fn clear_flow_cache(&mut self) {
        let mut cache = self.flow_cache();
        for at in 0..cache.len() {
            cache.set(at, [0; 8], 0).expect("empty a set");
        }
    }

    /// The director's `FLOW_CACHE`: per CPU a region of sets, each two slots of (source
    /// words, tuple word, clock word with the ids; see `lb_common::cache_slot`).
    fn flow_cache(&mut self) -> aya::maps::Array<&mut aya::maps::MapData, [u64; 8]> {
        let map = self
            .director
            .ebpf_mut()
            .map_mut(lb_common::maps::FLOW_CACHE)
            .expect("FLOW_CACHE");
        aya::maps::Array::try_from(map).expect("FLOW_CACHE is an array of 64-byte sets")
    }

    /// New flows counted for service id `service` so far, all CPUs.
    pub fn new_flows(&self, service: u32) -> u64 {
        lb_userspace::dataplane::Maps::sum_counters(&self.director.maps.service_stats, service)
            .expect("read SERVICE_STATS")
            .new_flows
    }
}

pub fn run_program(prog: &aya::programs::Xdp, input: &[u8]) -> (u32, Vec<u8>) {
    let mut out = vec![0u8; input.len() + 256];
    let res = prog
        .test_run(TestRunOptions {
            data_in: Some(input),
            data_out: Some(&mut out),
            repeat: 1,
            ..Default::default()
        })
        .expect("BPF_PROG_TEST_RUN");
    out.truncate(res.data_size_out as usize);
    (res.return_value, out)
}

/// Run `prog` once on `input` as if it arrived on interface `ifindex` (`ctx_in` sets the
/// ingress, so the FIB's egress can equal it: `XDP_TX`).
pub fn run_program_on(prog: &aya::programs::Xdp, input: &[u8], ifindex: u32) -> (u32, Vec<u8>) {
    let (verdict, out, _) = run_repeated_on(prog, input, ifindex, 1);
    (verdict, out)
}

/// `repeat` runs on one buffer entering on `ifindex`: (last verdict, output, kernel-measured
/// average time per run).
pub fn run_repeated_on(
    prog: &aya::programs::Xdp,
    input: &[u8],
    ifindex: u32,
    repeat: u32,
) -> (u32, Vec<u8>, std::time::Duration) {
    // struct xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue_index, egress_ifindex
    let ctx: Vec<u8> = [0, input.len() as u32, 0, ifindex, 0, 0]
        .iter()
        .flat_map(|w: &u32| w.to_ne_bytes())
        .collect();
    let mut out = vec![0u8; input.len() + 256];
    let res = prog
        .test_run(TestRunOptions {
            data_in: Some(input),
            data_out: Some(&mut out),
            ctx_in: Some(&ctx),
            repeat,
            ..Default::default()
        })
        .expect("BPF_PROG_TEST_RUN with ctx");
    out.truncate(res.data_size_out as usize);
    (res.return_value, out, res.duration)
}

/// The 5-tuple the data plane will key this flow by.
pub fn flow_key(src: IpAddr, dst: IpAddr, sport: u16, dport: u16, proto: u8) -> FlowKey {
    let (s, family) = addr_bytes(src);
    let (d, _) = addr_bytes(dst);
    FlowKey {
        src: s,
        dst: d,
        sport_be: sport.to_be(),
        dport_be: dport.to_be(),
        proto,
        family,
        _pad: [0; 2],
    }
}

/// What a test packet looks like; [`Pkt::build`] turns it into bytes with etherparse.
#[derive(Clone, Debug)]
pub struct Pkt {
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    pub vlan: Option<u16>,
    pub src: IpAddr,
    pub dst: IpAddr,
    pub proto: u8,
    pub sport: u16,
    pub dport: u16,
    pub payload: Vec<u8>,
    /// TCP flags to set: [`TCP_FIN`] | [`TCP_RST`] (ACK is always set after the first packet
    /// of a test; SYN is left out: the director does not care).
    pub tcp_flags: u8,
}

/// Median of a non-empty sample set.
pub fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// (min, max) of a sample set.
pub fn min_max(v: &[f64]) -> (f64, f64) {
    (
        v.iter().copied().fold(f64::INFINITY, f64::min),
        v.iter().copied().fold(f64::NEG_INFINITY, f64::max),
    )
}

/// CPUs this process may run on.
pub fn cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Pin thread/process `pid` (0: the calling thread) to one CPU (BPF_PROG_TEST_RUN runs on
/// the calling CPU).
pub fn pin_to(pid: libc::pid_t, cpu: usize) {
    pin_to_cpus(pid, [cpu]);
}

/// Let thread/process `pid` (0: the calling thread) run on these CPUs only.
pub fn pin_to_cpus(pid: libc::pid_t, cpus: impl IntoIterator<Item = usize>) {
    // SAFETY: a zeroed cpu_set_t with a bit set per CPU.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        for cpu in cpus {
            libc::CPU_SET(cpu, &mut set);
        }
        assert_eq!(
            libc::sched_setaffinity(pid, std::mem::size_of::<libc::cpu_set_t>(), &set),
            0,
            "pin {pid}"
        );
    }
}

/// Give thread/process `pid` the real-time policy SCHED_FIFO (priority 50, as threaded-NAPI
/// packet cores are commonly tuned): it runs as soon as it is woken, ahead of normal tasks.
pub fn realtime(pid: libc::pid_t) {
    let param = libc::sched_param { sched_priority: 50 };
    // SAFETY: plain syscall with a valid parameter struct.
    let r = unsafe { libc::sched_setscheduler(pid, libc::SCHED_FIFO, &param) };
    assert_eq!(
        r,
        0,
        "SCHED_FIFO for {pid}: {}",
        std::io::Error::last_os_error()
    );
}

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

impl Pkt {
    pub fn tcp(src: &str, dst: &str, sport: u16, dport: u16) -> Pkt {
        Pkt {
            src_mac: CLIENT_MAC,
            dst_mac: DIRECTOR_MAC,
            vlan: None,
            src: src.parse().expect("address"),
            dst: dst.parse().expect("address"),
            proto: lb_common::IPPROTO_TCP,
            sport,
            dport,
            payload: b"hello".to_vec(),
            tcp_flags: 0,
        }
    }

    pub fn udp(src: &str, dst: &str, sport: u16, dport: u16) -> Pkt {
        Pkt {
            proto: lb_common::IPPROTO_UDP,
            ..Pkt::tcp(src, dst, sport, dport)
        }
    }

    pub fn key(&self) -> FlowKey {
        flow_key(self.src, self.dst, self.sport, self.dport, self.proto)
    }

    /// The same packet with TCP flags `flags` ([`TCP_SYN`], ...).
    pub fn with_flags(&self, flags: u8) -> Pkt {
        Pkt {
            tcp_flags: flags,
            ..self.clone()
        }
    }

    pub fn with_macs(&self, src: [u8; 6], dst: [u8; 6]) -> Pkt {
        Pkt {
            src_mac: src,
            dst_mac: dst,
            ..self.clone()
        }
    }

    fn ip_headers(&self) -> IpHeaders {
        match (self.src, self.dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => IpHeaders::Ipv4(
                Ipv4Header {
                    source: s.octets(),
                    destination: d.octets(),
                    time_to_live: 64,
                    ..Default::default()
                },
                Default::default(),
            ),
            (IpAddr::V6(s), IpAddr::V6(d)) => IpHeaders::Ipv6(
                Ipv6Header {
                    source: s.octets(),
                    destination: d.octets(),
                    hop_limit: 64,
                    ..Default::default()
                },
                Default::default(),
            ),
            _ => panic!("mixed address families"),
        }
    }

    pub fn build(&self) -> Vec<u8> {
        self.build_with(self.ip_headers())
    }

    /// Build with caller-adjusted IP headers (options, fragments, extension headers).
    pub fn build_with(&self, ip: IpHeaders) -> Vec<u8> {
        let eth = PacketBuilder::ethernet2(self.src_mac, self.dst_mac);
        let mut out = Vec::new();
        let step = match self.vlan {
            Some(id) => eth.single_vlan(id.try_into().expect("vlan id")).ip(ip),
            None => eth.ip(ip),
        };
        let res = match self.proto {
            lb_common::IPPROTO_TCP => {
                let mut tcp = step.tcp(self.sport, self.dport, 1000, 64240);
                if self.tcp_flags & TCP_FIN != 0 {
                    tcp = tcp.fin();
                }
                if self.tcp_flags & TCP_SYN != 0 {
                    tcp = tcp.syn();
                }
                if self.tcp_flags & TCP_RST != 0 {
                    tcp = tcp.rst();
                }
                if self.tcp_flags & TCP_ACK != 0 {
                    tcp = tcp.ack(1);
                }
                tcp.write(&mut out, &self.payload)
            }
            lb_common::IPPROTO_UDP => step
                .udp(self.sport, self.dport)
                .write(&mut out, &self.payload),
            p => panic!("Pkt::build supports tcp/udp, not {p}"),
        };
        res.expect("build packet");
        out
    }

    /// Current IP headers, for tweaking before [`Pkt::build_with`].
    pub fn headers(&self) -> IpHeaders {
        self.ip_headers()
    }
}
