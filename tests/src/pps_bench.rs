//! End-to-end packets per second on veth, for `cargo xtask bench`: a generator namespace
//! sends frames with `BPF_PROG_TEST_RUN` in live-frames mode (XDP_TX out of its veth) to
//! the director's namespace, whose XDP program sends them back out (DR: XDP_TX toward the
//! backend's MAC on the same segment); an XDP sink on the generator's veth counts what comes
//! back. The ceiling is the same path with a plain MAC-swap XDP_TX program in the director's
//! place. Every target has its own director namespace and veth pair, all attached at once,
//! and the runs go round the targets (see [`rows`]). The two-way targets answer every
//! forwarded packet as its backend would (`xdplb_respond` on the generator's veth, in place
//! of the sink) and count the replies the director sends back: round trips, two packets
//! through the director each (NAT's reply path and nftables' conntrack both ways).

use std::{
    sync::mpsc,
    time::{Duration, Instant},
};

use aya::{
    maps::{Array, MapData, PerCpuArray},
    programs::{TestRun, TestRunAttrs, TestRunOptions},
};
use lb_userspace::{
    config::{AnyHost, Config, Mac, XdpMode},
    dataplane::{self, Director},
};

use crate::{
    median, min_max,
    netns::{in_netns, sh, NftDnat, TempNs},
    Pkt,
};

const VIP: &str = "198.18.8.100";
/// Where the two-way rows' clients are: the driver puts a flow's number in the source's low
/// 16 bits, so the one-way rows' clients (198.18.x.y, from 198.18.9.1) include the director's
/// own segment, 198.18.8.0/24, to which answers could not be routed.
const TWO_WAY_CLIENT: &str = "198.19.0.1";
const TWO_WAY_CLIENTS: &str = "198.19.0.0/16";
/// Frame size of the generator's template (as the bench driver's RESTORE expects).
const FRAME: usize = 128;

/// The generator's namespace and one director namespace per [`Target`], each joined to the
/// generator by its own veth pair (`t<i>` in the generator, `eth0` in the director's). All
/// targets stay attached for the whole section, so their runs can be interleaved.
struct Lab {
    gen: TempNs,
    lanes: Vec<Lane>,
}

/// One target's path: its director namespace and the generator's end of the veth pair.
struct Lane {
    target: Target,
    dir: TempNs,
    gen_if: String,
    gen_mac: [u8; 6],
    dir_mac: [u8; 6],
}

impl Lab {
    fn new(targets: &[Target]) -> Lab {
        let tag = std::process::id();
        let gen = TempNs::new(&format!("xpg{tag}"));
        gen.ip(&["link", "set", "lo", "up"]);
        let mut lanes = Vec::new();
        for (i, &target) in targets.iter().enumerate() {
            let dir = TempNs::new(&format!("xpd{i}-{tag}"));
            let gen_if = format!("t{i}");
            sh(&[
                "ip", "-n", &gen.0, "link", "add", &gen_if, "type", "veth", "peer", "name", "eth0",
                "netns", &dir.0,
            ]);
            gen.ip(&["link", "set", &gen_if, "up"]);
            dir.ip(&["addr", "add", "198.18.8.2/24", "dev", "eth0"]);
            dir.ip(&["link", "set", "eth0", "up"]);
            dir.ip(&["link", "set", "lo", "up"]);
            let gen_mac = if_mac(Some(&gen.0), &gen_if);
            // TUN/NAT/nftables route to the backends on this segment; their neighbours are
            // the generator's MAC, so every forwarded frame comes back to the generator's sink.
            let mac = Mac(gen_mac).to_string();
            for b in BACKENDS.iter().chain(["198.18.8.1"].iter()) {
                dir.ip(&[
                    "neigh",
                    "replace",
                    b,
                    "lladdr",
                    &mac,
                    "dev",
                    "eth0",
                    "nud",
                    "permanent",
                ]);
            }
            dir.ip(&["route", "add", "198.18.9.0/24", "via", "198.18.8.1"]);
            // The two-way rows' clients (their answers are routed back to the generator).
            dir.ip(&["route", "add", TWO_WAY_CLIENTS, "via", "198.18.8.1"]);
            dir.sysctl(&[
                "net.ipv4.ip_forward=1",
                "net.ipv4.conf.all.send_redirects=0",
                "net.ipv4.conf.eth0.send_redirects=0",
                "net.ipv4.conf.all.rp_filter=0",
                "net.ipv4.conf.eth0.rp_filter=0",
            ]);
            let dir_mac = if_mac(Some(&dir.0), "eth0");
            lanes.push(Lane {
                target,
                dir,
                gen_if,
                gen_mac,
                dir_mac,
            });
        }
        Lab { gen, lanes }
    }
}

/// The MAC of `dev` in namespace `ns` (`None`: the calling thread's namespace).
fn if_mac(ns: Option<&str>, dev: &str) -> [u8; 6] {
    let mut args = vec!["ip"];
    if let Some(ns) = ns {
        args.extend(["-n", ns]);
    }
    args.extend(["-j", "link", "show", dev]);
    let v: serde_json::Value = serde_json::from_str(&sh(&args)).expect("ip -j");
    let s = v[0]["address"].as_str().expect("address");
    s.parse::<Mac>().expect("MAC").0
}

/// What sits in the director's namespace.
#[derive(Clone, Copy, PartialEq, clap::ValueEnum)]
pub enum Target {
    /// MAC swap + XDP_TX.
    Ceiling,
    /// The director in DR mode.
    Dr,
    /// The director in TUN mode (IPIP to backends on the generator's segment).
    Tun,
    /// The director in NAT mode (DNAT, next hop from the FIB).
    Nat,
    /// The kernel peer: nftables DNAT with `numgen inc`, IP forwarding (a pass-through XDP
    /// program on eth0 only so the generator's XDP_TX into the veth delivers).
    Nft,
    /// The director in DR mode with `ring_fast_path: true` (slots clean, as after a sweep).
    DrFast,
    /// Two-way: [`Target::Ceiling`] with the backend answering every packet (the
    /// generator's `xdplb_respond`), which the MAC swap sends back as well.
    CeilingTwoWay,
    /// Two-way: the director in NAT mode, forwarding each client packet and its backend's
    /// answer (the reply path: flow cache, `NAT_REPLIES`).
    NatTwoWay,
    /// Two-way: nftables DNAT, the answers un-DNATed by conntrack on their way back.
    NftTwoWay,
}

impl Target {
    pub const ALL: [Target; 9] = [
        Target::Ceiling,
        Target::Dr,
        Target::Tun,
        Target::Nat,
        Target::Nft,
        Target::DrFast,
        Target::CeilingTwoWay,
        Target::NatTwoWay,
        Target::NftTwoWay,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Target::Ceiling => "ceiling: MAC swap + XDP_TX",
            Target::Dr => "xdplb DR",
            Target::Tun => "xdplb TUN",
            Target::Nat => "xdplb NAT",
            Target::Nft => "nftables DNAT (numgen)",
            Target::DrFast => "xdplb DR, ring fast path",
            Target::CeilingTwoWay => "ceiling, two-way: MAC swap + XDP_TX",
            Target::NatTwoWay => "xdplb NAT, two-way",
            Target::NftTwoWay => "nftables DNAT (numgen), two-way",
        }
    }

    /// Whether the backend answers (the generator's `xdplb_respond`): the row counts round
    /// trips, two packets through the director each.
    pub fn two_way(self) -> bool {
        matches!(
            self,
            Target::CeilingTwoWay | Target::NatTwoWay | Target::NftTwoWay
        )
    }

    /// What sits in the director's namespace: the one-way target of the same setup.
    fn base(self) -> Target {
        match self {
            Target::CeilingTwoWay => Target::Ceiling,
            Target::NatTwoWay => Target::Nat,
            Target::NftTwoWay => Target::Nft,
            t => t,
        }
    }

    /// The ceiling a row is compared with: the one that carries the same traffic.
    fn ceiling(self) -> Target {
        if self.two_way() {
            Target::CeilingTwoWay
        } else {
            Target::Ceiling
        }
    }

    /// The kernel peer a NAT row (and the peer's own row) is compared with; `None` for the
    /// other modes.
    fn nft_peer(self) -> Option<Target> {
        match self.base() {
            Target::Nat | Target::Nft if self.two_way() => Some(Target::NftTwoWay),
            Target::Nat | Target::Nft => Some(Target::Nft),
            _ => None,
        }
    }

    fn mode(self) -> Option<&'static str> {
        match self.base() {
            Target::Dr | Target::DrFast => Some("dr"),
            Target::Tun => Some("tun"),
            Target::Nat => Some("nat"),
            _ => None,
        }
    }
}

/// Backends "live" on the generator's segment: their frames (DR: the backend MAC is the
/// generator's; TUN/NAT: permanent neighbours with the generator's MAC) come back to it.
const BACKENDS: [&str; 3] = ["198.18.8.11", "198.18.8.12", "198.18.8.13"];

fn director_config(mode: &str, gen_mac: [u8; 6]) -> String {
    let mac = Mac(gen_mac);
    let tun = if mode == "tun" {
        ", tun_source: [198.18.8.2]"
    } else {
        ""
    };
    let mut cfg = format!(
        "interfaces: [{{name: eth0, xdp_mode: native{tun}}}]\nflow_table_size: 65536\nservices:\n  - name: web\n    vip: {VIP}\n    port: 80\n    protocol: tcp\n    mode: {mode}\n    backends:\n"
    );
    for b in BACKENDS {
        if mode == "dr" {
            cfg += &format!("      - {{address: {b}, mac: '{mac}'}}\n");
        } else {
            cfg += &format!("      - {{address: {b}}}\n");
        }
    }
    cfg
}

/// A running director side: how to stop it, its thread, the attached program's id (for its
/// run-time statistics) and its receive path's threaded-NAPI pollers (none on one CPU).
struct Server {
    stop: mpsc::Sender<()>,
    handle: std::thread::JoinHandle<()>,
    program: u32,
    napi: Vec<i32>,
}

/// Run the director side (`target` attached to eth0 of `dir`) until told to stop.
fn serve(dir: &str, target: Target, gen_mac: [u8; 6]) -> Server {
    let target = target.base();
    let nft = (target == Target::Nft).then(|| NftDnat::new(dir, "xdplb_bench", VIP, 80, &BACKENDS));
    let before = napi_threads();
    let (stop_tx, stop_rx) = mpsc::channel::<()>();
    let (ready_tx, ready_rx) = mpsc::channel::<u32>();
    let handle = in_netns(dir, move || {
        let cfg = target.mode().map(|mode| {
            let mut text = director_config(mode, gen_mac);
            if target == Target::DrFast {
                text = text.replace("    mode: dr\n", "    mode: dr\n    ring_fast_path: true\n");
            }
            Config::parse(&text, &AnyHost).expect("config")
        });
        let mut d = Director::load(&dataplane::LoadOptions {
            flow_table_size: 65536,
            ring_fast: cfg.as_ref().is_some_and(Config::ring_fast),
            ..Default::default()
        })
        .expect("load");
        let program = match cfg {
            None => {
                let program = if target == Target::Ceiling {
                    dataplane::FLOOR_PROGRAM
                } else {
                    dataplane::PASS_PROGRAM
                };
                d.attach_program(program, "eth0").expect("attach");
                program
            }
            Some(cfg) => {
                let want = dataplane::desired(&cfg, |b| b.mac().map(|m| m.0).unwrap_or_default());
                d.apply(&want).expect("maps");
                if cfg.ring_fast() {
                    // A new fast-path service starts with every slot dirty; the controller's
                    // first sweep after the grace period cleans them (no flows yet).
                    std::thread::sleep(
                        lb_userspace::reconcile::DIRTY_GRACE + Duration::from_millis(100),
                    );
                    let swept = d.sweep(Duration::from_secs(300)).expect("sweep");
                    assert_eq!(swept.cleaned, lb_common::RING_SIZE as usize);
                }
                let mac = if_mac(None, "eth0");
                d.attach(
                    "eth0",
                    XdpMode::Native,
                    dataplane::iface_info(&cfg.interfaces[0], mac),
                )
                .expect("attach director");
                dataplane::PROGRAM
            }
        };
        let id = d
            .loaded(program)
            .and_then(|p| p.info().ok())
            .expect("attached program")
            .id();
        ready_tx.send(id).expect("ready");
        let _ = stop_rx.recv();
        drop(d);
        drop(nft);
    });
    let program = ready_rx
        .recv_timeout(Duration::from_secs(30))
        .expect("director side ready");
    let mut napi = Vec::new();
    if crate::cpus() > 1 {
        // The director's receive path (veth NAPI, where its XDP program runs) gets a core
        // of its own, as on a real director; the generator keeps CPU 0. (Attaching XDP
        // created the device's NAPI; a thread of an earlier target's may linger.) Real-time
        // priority, as a dedicated packet core is tuned: under the default policy the woken
        // thread waited up to ~10 ms for CPU 1 (behind what, not pinned down; the sink's
        // softirq work deferred to ksoftirqd is the likely competitor), so paced
        // trials overflowed the 256-frame veth ring far below capacity (the ceiling, a MAC
        // swap forwarding 3 Mpps flat out, lost 73 % at 60 kpps; every loss was the
        // generator's `xdp_xmit_errors`, a full ring) and the PDR search measured the
        // scheduler, not the target.
        sh(&[
            "ip",
            "netns",
            "exec",
            dir,
            "sh",
            "-c",
            "echo 1 > /sys/class/net/eth0/threaded",
        ]);
        napi = napi_threads().difference(&before).copied().collect();
        assert!(!napi.is_empty(), "threaded NAPI started a kernel thread");
        for &pid in &napi {
            crate::pin_to(pid, 1);
            crate::realtime(pid);
        }
    }
    Server {
        stop: stop_tx,
        handle,
        program,
        napi,
    }
}

/// CPU time the threads `pids` have run so far (`/proc/<pid>/schedstat`, ns). With
/// paravirtual steal accounting (this kernel has it) the time the hypervisor held the vCPU
/// is not in it.
fn run_ns(pids: &[i32]) -> u64 {
    pids.iter()
        .filter_map(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/schedstat"))
                .ok()?
                .split_whitespace()
                .next()?
                .parse::<u64>()
                .ok()
        })
        .sum()
}

/// Program `id`'s (total run time, runs) so far, as the kernel counts them while run-time
/// statistics are enabled.
fn run_time(id: u32) -> (Duration, u64) {
    aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .find(|p| p.id() == id)
        .map(|p| (p.run_time(), p.run_count()))
        .expect("the target's program is loaded")
}

/// Pids of the kernel's threaded-NAPI pollers (`napi/<dev>-<id>`).
fn napi_threads() -> std::collections::HashSet<i32> {
    std::fs::read_dir("/proc")
        .expect("/proc")
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .map(|c| c.starts_with("napi/"))
                .unwrap_or(false)
        })
        .collect()
}

/// One measurement: `count` frames over `flows` distinct 5-tuples out of lane `lane`'s veth,
/// `gap_ns` apart (0: as fast as the generator goes).
struct Trial {
    lane: usize,
    flows: u32,
    count: u32,
    gap_ns: u32,
}

/// What a [`Trial`] gave: the generator's rate and the rate and share that came back.
#[derive(Clone, Copy)]
struct Sample {
    offered_pps: f64,
    delivered_pps: f64,
    loss: f64,
    /// The hypervisor took CPU time from this VM during the trial (`steal` in /proc/stat
    /// grew): a stalled vCPU lets the 256-frame veth ring overflow, whatever the target.
    stolen: bool,
}

/// CPU time the hypervisor took from this VM so far, all CPUs (`steal` of /proc/stat's
/// `cpu` line, in clock ticks); 0 where the kernel does not say.
fn steal_ticks() -> u64 {
    std::fs::read_to_string("/proc/stat")
        .ok()
        .and_then(|t| {
            let line = t.lines().find(|l| l.starts_with("cpu "))?;
            line.split_whitespace().nth(8)?.parse().ok()
        })
        .unwrap_or(0)
}

/// The generator: one loaded object in the generator's namespace with its sink on every
/// lane's veth (attached for the whole section), running [`Trial`]s sent over a channel on
/// CPU 0. (`BPF_PROG_TEST_RUN` resolves the ingress interface in the calling thread's
/// namespace, hence a thread of its own.)
struct Generator {
    trials: Option<mpsc::Sender<(Trial, mpsc::Sender<Sample>)>>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl Generator {
    fn new(lab: &Lab) -> Generator {
        let lanes: Vec<(String, [u8; 6], [u8; 6], bool)> = lab
            .lanes
            .iter()
            .map(|l| (l.gen_if.clone(), l.gen_mac, l.dir_mac, l.target.two_way()))
            .collect();
        // Each lane's template frame and `xdp_md` (ingress: its veth), built once.
        let lane_input = |(dev, gen_mac, dir_mac, two_way): &(String, [u8; 6], [u8; 6], bool)| {
            let client = if *two_way {
                TWO_WAY_CLIENT
            } else {
                "198.18.9.1"
            };
            let mut p = Pkt::tcp(client, VIP, 40000, 80).with_macs(*gen_mac, *dir_mac);
            p.payload = vec![0x5a; FRAME - 54];
            // ACK: a segment conntrack (the nftables peer) picks up as an established stream.
            p.tcp_flags = crate::TCP_ACK;
            let frame = <[u8; FRAME]>::try_from(&p.build()[..]).expect("128 bytes");
            let ifindex = lb_userspace::netlink::ifindex(dev).expect("generator veth");
            let ctx: Vec<u8> = [0, FRAME as u32, 0, ifindex, 0, 0]
                .iter()
                .flat_map(|w: &u32| w.to_ne_bytes())
                .collect();
            (frame, ctx, p, ifindex)
        };
        let (tx, rx) = mpsc::channel::<(Trial, mpsc::Sender<Sample>)>();
        let gen_ns = lab.gen.0.clone();
        let handle = in_netns(&lab.gen.0, move || {
            crate::pin_to(0, 0);
            let mut d = Director::load(&dataplane::LoadOptions {
                flow_table_size: lb_userspace::config::FLOW_TABLE_MIN,
                ..Default::default()
            })
            .expect("load generator object");
            // One-way lanes count what comes back; two-way lanes answer it as the backend,
            // then count the director's replies.
            for (dev, _, _, two_way) in &lanes {
                let program = if *two_way {
                    dataplane::RESPOND_PROGRAM
                } else {
                    dataplane::SINK_PROGRAM
                };
                d.attach_program(program, dev).expect("sink or responder");
            }
            let mut respond: Array<MapData, u32> = d
                .ebpf_mut()
                .take_map("BENCH_RESPOND")
                .expect("BENCH_RESPOND")
                .try_into()
                .expect("array");
            let vip: std::net::Ipv4Addr = VIP.parse().expect("VIP");
            respond.set(0, 80, 0).expect("port");
            respond
                .set(1, u32::from_ne_bytes(vip.octets()), 0)
                .expect("VIP");
            let tx_fd = crate::program_fd(&mut d, dataplane::TX_PROGRAM);
            let inputs: Vec<_> = lanes.iter().map(lane_input).collect();
            let (mut next, mut cfg) = crate::bench_driver(&mut d);
            next.set(0, &tx_fd, 0).expect("tail");
            // Restore the template every run (live frames reuse pages), then a 5-tuple from
            // the cycle of `flows`.
            cfg.set(0, 4 | 2, 0).expect("cfg");
            let mut template: Array<MapData, [u8; FRAME]> = d
                .ebpf_mut()
                .take_map("BENCH_TEMPLATE")
                .expect("BENCH_TEMPLATE")
                .try_into()
                .expect("template");
            let sink: PerCpuArray<MapData, u64> = d
                .ebpf_mut()
                .take_map("SINK")
                .expect("SINK")
                .try_into()
                .expect("sink");
            let received = || -> u64 { sink.get(&0, 0).map(|v| v.iter().sum()).unwrap_or(0) };
            let live = |d: &Director, frame: &[u8; FRAME], ctx: &[u8], count: u32| {
                let prog = d.loaded(dataplane::BENCH_DRIVER_PROGRAM).expect("driver");
                prog.test_run(TestRunOptions {
                    data_in: Some(frame),
                    ctx_in: Some(ctx),
                    repeat: count,
                    attrs: TestRunAttrs::new().xdp_live_frames(64),
                    ..Default::default()
                })
            };
            // Live frames where the kernel allows them (one frame out of lane 0 tells);
            // else an AF_PACKET socket per lane (see [`PacketGenerator`]).
            let (frame, ctx, _, _) = &inputs[0];
            let mut fallback = match live(&d, frame, ctx, 1) {
                Ok(_) => {
                    let _ = GENERATOR.set(GeneratorKind::LiveFrames);
                    None
                }
                Err(e) => {
                    let why = match std::error::Error::source(&e) {
                        Some(cause) => format!("{e}: {cause}"),
                        None => e.to_string(),
                    };
                    let _ = GENERATOR.set(GeneratorKind::Packet(why));
                    // Each lane's socket sends into a veth pair of its own (`s<i>` to
                    // `r<i>`, in the generator's namespace) whose far end relays the frames
                    // to the lane's veth as XDP frames (`xdplb_relay`).
                    let mut relay: aya::maps::DevMapHash<MapData> = d
                        .ebpf_mut()
                        .take_map("BENCH_RELAY")
                        .expect("BENCH_RELAY")
                        .try_into()
                        .expect("devmap hash");
                    let mut sources = Vec::new();
                    for (i, (_, _, p, lane_ifindex)) in inputs.iter().enumerate() {
                        let (s_if, r_if) = (format!("s{i}"), format!("r{i}"));
                        crate::netns::sh(&[
                            "ip", "-n", &gen_ns, "link", "add", &s_if, "type", "veth", "peer",
                            "name", &r_if,
                        ]);
                        for dev in [&s_if, &r_if] {
                            crate::netns::sh(&["ip", "-n", &gen_ns, "link", "set", dev, "up"]);
                        }
                        d.attach_program(dataplane::RELAY_PROGRAM, &r_if)
                            .expect("relay");
                        let r = lb_userspace::netlink::ifindex(&r_if).expect("relay veth");
                        relay
                            .insert(r, *lane_ifindex, None, 0)
                            .expect("relay entry");
                        let s = lb_userspace::netlink::ifindex(&s_if).expect("source veth");
                        sources.push((p.clone(), s));
                    }
                    Some(PacketGenerator::new(sources.into_iter()))
                }
            };
            // The probe's frame is back (or lost) before the first trial counts.
            std::thread::sleep(Duration::from_millis(50));
            for (t, reply) in rx {
                let (frame, ctx, _, _) = &inputs[t.lane];
                template.set(0, *frame, 0).expect("template");
                cfg.set(1, t.flows, 0).expect("cycle");
                cfg.set(2, t.gap_ns, 0).expect("pace");
                let before = received();
                let steal_before = steal_ticks();
                let started = Instant::now();
                let sent_s = match fallback.as_mut() {
                    Some(g) => g.send(&t),
                    None => {
                        let res = live(&d, frame, ctx, t.count).expect("live frames");
                        // The kernel's own time of the sending loop (average per frame ×
                        // frames): the wall clock also holds ~20 ms of live-frames setup,
                        // 5-12 % of a trial. (Wall clock if the kernel gave no time.)
                        match res.duration.as_secs_f64() * f64::from(t.count) {
                            s if s > 0.0 => s,
                            _ => started.elapsed().as_secs_f64(),
                        }
                    }
                };
                // Let the last frames arrive: until the count holds still for 20 ms (a frame
                // counted in the next trial would be one lost here and one too many there).
                let mut got = received() - before;
                for _ in 0..25 {
                    std::thread::sleep(Duration::from_millis(20));
                    let now = received() - before;
                    if now == got {
                        break;
                    }
                    got = now;
                }
                let _ = reply.send(Sample {
                    offered_pps: f64::from(t.count) / sent_s,
                    delivered_pps: got as f64 / sent_s,
                    loss: 1.0 - got as f64 / f64::from(t.count),
                    stolen: steal_ticks() > steal_before,
                });
            }
        });
        Generator {
            trials: Some(tx),
            handle: Some(handle),
        }
    }

    fn run(&self, trial: Trial) -> Sample {
        let (tx, rx) = mpsc::channel();
        self.trials
            .as_ref()
            .expect("generator running")
            .send((trial, tx))
            .expect("generator thread");
        rx.recv().expect("generator answered")
    }
}

/// How the generator sends, as the report says.
enum GeneratorKind {
    /// `BPF_PROG_TEST_RUN` in live-frames mode: the bench driver's XDP_TX out of the lane's
    /// veth, ~4 Mpps from one core here.
    LiveFrames,
    /// The kernel refused live frames (the error): [`PacketGenerator`].
    Packet(String),
}

/// The generator this section's rows were measured with (set by [`Generator::new`]).
static GENERATOR: std::sync::OnceLock<GeneratorKind> = std::sync::OnceLock::new();

/// Whether this run's end-to-end rows were measured behind the AF_PACKET generator (the
/// kernel refused live frames), whose ratios measure the rig more than the targets.
pub fn generator_bound() -> bool {
    matches!(GENERATOR.get(), Some(GeneratorKind::Packet(_)))
}

/// Frames handed to one `sendmmsg`: live frames also go out 64 at a time.
const BATCH: usize = 64;

/// The generator where the kernel refuses live frames (`EPERM` for
/// `BPF_F_TEST_XDP_LIVE_FRAMES`, as root, on this project's machines from 2026-12-06): an
/// `AF_PACKET` socket per lane, sending with `sendmmsg` past the qdisc
/// (`PACKET_QDISC_BYPASS`) into a veth pair of its own whose far end relays the frames to
/// the lane's veth by `XDP_REDIRECT` (`xdplb_relay`), so they reach the director as XDP
/// frames, as live frames do (sent straight into the lane's veth they arrived as skbs, and
/// the director's core paid ~300 ns each to handle them: the ceiling's core time read 816 ns
/// against 478 relayed). It sends the frames the bench driver would: the lane's template
/// with the driver's 5-tuple cycle (source address's low 16 bits and source port from the
/// sequence), built in userspace once per (lane, flows), and paces the same way (a frame
/// every `gap_ns`; behind schedule, it catches up by at most one batch). Each frame costs a
/// system call's share and an skb, so it offers less than live frames and the flat-out rows
/// measure it as much as the target: the report says which generator ran.
struct PacketGenerator {
    lanes: Vec<(crate::Pkt, std::os::fd::OwnedFd)>,
    /// The frames of a (lane, flows) cycle, in the driver's order.
    frames: std::collections::HashMap<(usize, u32), Vec<Vec<u8>>>,
}

impl PacketGenerator {
    fn new(lanes: impl Iterator<Item = (crate::Pkt, u32)>) -> PacketGenerator {
        let lanes = lanes
            .map(|(p, ifindex)| (p, packet_socket(ifindex).expect("AF_PACKET socket")))
            .collect();
        PacketGenerator {
            lanes,
            frames: Default::default(),
        }
    }

    /// Send trial `t`'s frames; the seconds the sending took.
    fn send(&mut self, t: &Trial) -> f64 {
        let (template, fd) = &self.lanes[t.lane];
        let frames = self.frames.entry((t.lane, t.flows)).or_insert_with(|| {
            // The driver's sequence: `seq = (seq + 1) % flows` from 0, so a cycle of 1 is
            // the 5-tuple of 0. (Every trial here cycles a few flows.)
            assert!(t.flows > 0, "a trial cycles at least one flow");
            (0..t.flows)
                .map(|i| {
                    let seq = (i + 1) % t.flows;
                    let mut p = template.clone();
                    p.src = with_low16(p.src, seq as u16);
                    p.sport = (seq >> 16) as u16 | 1024;
                    p.build()
                })
                .collect()
        });
        let started = Instant::now();
        let gap = u64::from(t.gap_ns);
        let (mut sent, mut due, mut next) = (0u32, 0u64, 0usize);
        let mut batch = Batch::default();
        // Bounded in time as in count: a stuck socket ends the trial (as lost frames).
        while sent < t.count && started.elapsed() < Duration::from_secs(10) {
            let mut n = (t.count - sent).min(BATCH as u32) as u64;
            if gap != 0 {
                let now = started.elapsed().as_nanos() as u64;
                if now < due {
                    std::hint::spin_loop();
                    continue;
                }
                if now > due + BATCH as u64 * gap {
                    due = now;
                }
                n = n.min((now - due) / gap + 1);
                due += n * gap;
            }
            batch.send(
                fd,
                (0..n as usize).map(|k| frames[(next + k) % frames.len()].as_slice()),
            );
            next = (next + n as usize) % frames.len();
            sent += n as u32;
        }
        started.elapsed().as_secs_f64()
    }
}

/// `addr` with its low 16 bits `low` (the bench driver's cycle).
fn with_low16(addr: std::net::IpAddr, low: u16) -> std::net::IpAddr {
    use std::net::IpAddr;
    match addr {
        IpAddr::V4(a) => {
            let mut o = a.octets();
            [o[2], o[3]] = low.to_be_bytes();
            IpAddr::from(o)
        }
        IpAddr::V6(a) => {
            let mut o = a.octets();
            [o[14], o[15]] = low.to_be_bytes();
            IpAddr::from(o)
        }
    }
}

/// A transmit-only `AF_PACKET` socket on interface `ifindex` (protocol 0: it receives
/// nothing), past the qdisc.
fn packet_socket(ifindex: u32) -> std::io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    // SAFETY: plain socket calls with valid, sized arguments; the fd is owned once made.
    unsafe {
        let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let fd = std::os::fd::OwnedFd::from_raw_fd(fd);
        let raw = std::os::fd::AsRawFd::as_raw_fd(&fd);
        let one: libc::c_int = 1;
        if libc::setsockopt(
            raw,
            libc::SOL_PACKET,
            libc::PACKET_QDISC_BYPASS,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        ) != 0
        {
            return Err(std::io::Error::last_os_error());
        }
        let mut ll: libc::sockaddr_ll = std::mem::zeroed();
        ll.sll_family = libc::AF_PACKET as u16;
        ll.sll_ifindex = ifindex as i32;
        if libc::bind(
            raw,
            (&ll as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        ) != 0
        {
            return Err(std::io::Error::last_os_error());
        }
        Ok(fd)
    }
}

/// One `sendmmsg`'s headers, kept from batch to batch of a trial (the sending loop makes
/// no allocation per batch).
#[derive(Default)]
struct Batch {
    iov: Vec<libc::iovec>,
    msgs: Vec<libc::mmsghdr>,
}

impl Batch {
    /// Hand `frames` to the socket, one `sendmmsg` (again for any it did not take). A frame
    /// the veth refuses (its peer's ring full) is a lost frame, as for live frames: the
    /// sink's count tells, so errors end the batch rather than the trial.
    fn send<'a>(&mut self, fd: &std::os::fd::OwnedFd, frames: impl Iterator<Item = &'a [u8]>) {
        let raw = std::os::fd::AsRawFd::as_raw_fd(fd);
        self.iov.clear();
        self.iov.extend(frames.map(|f| libc::iovec {
            iov_base: f.as_ptr() as *mut libc::c_void,
            iov_len: f.len(),
        }));
        self.msgs.clear();
        // SAFETY: zeroed headers, each pointing at one iovec that points at a live frame.
        self.msgs.extend(self.iov.iter_mut().map(|v| {
            let mut m: libc::mmsghdr = unsafe { std::mem::zeroed() };
            m.msg_hdr.msg_iov = v;
            m.msg_hdr.msg_iovlen = 1;
            m
        }));
        let msgs = &mut self.msgs;
        let mut at = 0;
        while at < msgs.len() {
            // SAFETY: `msgs[at..]` are valid headers for the kernel to read.
            let r = unsafe {
                libc::sendmmsg(raw, msgs[at..].as_mut_ptr(), (msgs.len() - at) as u32, 0)
            };
            if r <= 0 {
                // The frame at `at` was dropped (ENOBUFS from a full ring): skip it.
                at += 1;
            } else {
                at += r as usize;
            }
        }
    }
}

impl Drop for Generator {
    fn drop(&mut self) {
        drop(self.trials.take());
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// Loss a rate may show and still count as forwarded (FD.io CSIT's partial drop rate, PDR).
pub const PDR_LOSS: f64 = 0.005;

/// The paced rate at which [`PpsRow::core_ns`] is measured: below what every target
/// forwards here (nftables' PDR is ~0.6 Mpps), so each pays for packets, not for overload.
const CORE_RATE: f64 = 0.4e6;

/// Trials one rate gets at most in [`pdr`] (two that lose without steal end it sooner).
const PDR_TRIES: u32 = 5;

/// The highest rate (pps, as offered) forwarded with at most [`PDR_LOSS`] lost, by `trial`
/// (offered pps, infinite: flat out → what happened): flat out first, then a bisection
/// (geometric, `steps` halvings) between a rate that lost more (twice) and one that did not. A
/// receiver under overload does worse than at its capacity (see [`rows`]), so the flat-out
/// rate alone understates a slower target. 0 when nothing down to 10 kpps passes.
fn pdr(mut trial: impl FnMut(f64) -> Sample, steps: u32) -> f64 {
    // A rate fails only when two trials lose that the hypervisor left alone: one hiccup of
    // this VM (a few ms of lost CPU) costs a short trial its 0.5 % and would send the search
    // far down, and a trial during which the host took CPU time ([`Sample::stolen`]; seen
    // in about one 0.2 s trial in six here, each losing 2-6 %) measured the host. At most
    // [`PDR_TRIES`] trials per rate. Of those that lose, the one that delivered more counts:
    // the search starts below what came back flat out, and a stall in a lone flat-out trial
    // (nothing came back) would end it at 0.
    let mut trial = |pps: f64| {
        let mut best: Option<Sample> = None;
        let mut lost = 0;
        for _ in 0..PDR_TRIES {
            let s = trial(pps);
            if s.loss <= PDR_LOSS {
                return s;
            }
            if best.is_none_or(|b| s.delivered_pps > b.delivered_pps) {
                best = Some(s);
            }
            lost += u32::from(!s.stolen);
            if lost == 2 {
                break;
            }
        }
        best.expect("PDR_TRIES > 0")
    };
    let flat = trial(f64::INFINITY);
    if flat.loss <= PDR_LOSS {
        return flat.offered_pps;
    }
    // A rate that passes: start just below what came back flat out, halve until one does.
    let (mut fail, mut pass) = (flat.offered_pps, flat.delivered_pps * 0.9);
    let mut best = loop {
        if pass < 10_000.0 {
            return 0.0;
        }
        let s = trial(pass);
        if s.loss <= PDR_LOSS {
            break s.offered_pps;
        }
        fail = pass;
        pass /= 2.0;
    };
    for _ in 0..steps {
        let mid = (fail * pass).sqrt();
        let s = trial(mid);
        if s.loss <= PDR_LOSS {
            best = best.max(s.offered_pps);
            pass = mid;
        } else {
            fail = mid;
        }
    }
    best
}

/// [`pdr`] of lane `lane` at `flows`, each trial about `trial_s` long.
fn lane_pdr(gen: &Generator, lane: usize, flows: u32, trial_s: f64, steps: u32) -> f64 {
    let trial = |pps: f64| {
        let gap_ns = if pps.is_finite() {
            (1e9 / pps) as u32
        } else {
            0
        };
        // Enough frames for `trial_s` at that rate (flat out: ~4 Mpps), and for the loss to
        // be resolved.
        let count = if pps.is_finite() { pps } else { 4e6 } * trial_s;
        gen.run(Trial {
            lane,
            flows,
            count: count.max(20_000.0) as u32,
            gap_ns,
        })
    };
    pdr(trial, steps)
}

pub struct PpsRow {
    pub target: Target,
    pub flows: u32,
    /// Flat out: what the generator sent (its own rate, CPU 0) and what came back. The
    /// ceiling is near the offered rate when the receiving side keeps up.
    pub offered_mpps: Vec<f64>,
    pub delivered_mpps: Vec<f64>,
    /// The highest offered rate forwarded with at most [`PDR_LOSS`] lost, one per round.
    pub pdr_mpps: Vec<f64>,
    /// The director core's time per delivered packet at [`CORE_RATE`] (its receive path's
    /// NAPI thread, which also runs the XDP program), one per round; empty on one CPU.
    pub core_ns: Vec<f64>,
    /// The target's XDP program, ns per packet as it ran on the forwarding path (kernel run
    /// time statistics, one extra run after the timed ones); `None` for nftables, whose work
    /// is not in a program.
    pub run_ns: Option<f64>,
    /// Ceiling and DR: where the director's core spent its time in one more flat-out run
    /// ([`profile`]): (symbol, % of its samples), largest first.
    pub profile: Vec<(String, f64)>,
}

/// perf's `cpu-clock` samples of CPU 1 (the director's NAPI core) while `run` runs, by
/// symbol: (symbol, % of samples), largest first. `cpu-clock` is a software event, so it
/// works on this VM, which has no PMU (`bpftool prog profile` needs one); the JIT-ed programs
/// appear under their names. `run` runs again (once) when the first recording came back
/// empty; empty when perf is missing or records nothing twice.
fn profile(mut run: impl FnMut()) -> Vec<(String, f64)> {
    for _ in 0..2 {
        let symbols = profile_once(&mut run);
        if !symbols.is_empty() {
            return symbols;
        }
    }
    Vec::new()
}

fn profile_once(run: &mut impl FnMut()) -> Vec<(String, f64)> {
    use std::process::{Command, Stdio};
    let data = std::env::temp_dir().join(format!("xdplb-bench-{}.perf", std::process::id()));
    let Ok(mut rec) = Command::new("perf")
        .args(["record", "-q", "-e", "cpu-clock", "-C", "1", "-o"])
        .arg(&data)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
    else {
        return Vec::new();
    };
    // perf samples only after it has written its header (~140 ms idle here; a fixed 300 ms
    // sleep was not always enough on a loaded CI machine and a row came back empty), so wait
    // for the file to have content, up to 5 s, then a moment more.
    let start = Instant::now();
    while std::fs::metadata(&data).map_or(true, |m| m.len() == 0)
        && start.elapsed() < Duration::from_secs(5)
    {
        std::thread::sleep(Duration::from_millis(10));
    }
    std::thread::sleep(Duration::from_millis(100));
    run();
    // SAFETY: a signal to our own child; SIGINT makes perf write its file and exit.
    unsafe { libc::kill(rec.id() as libc::pid_t, libc::SIGINT) };
    let _ = rec.wait();
    let text = Command::new("perf")
        .args(["report", "--stdio", "-q", "--sort", "sym", "-i"])
        .arg(&data)
        .stderr(Stdio::null())
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    let _ = std::fs::remove_file(&data);
    perf_symbols(&text)
}

/// `perf report --sort sym` lines ("  27.28%  [k] bpf_prog_e6844195109670ed_xdplb") as
/// (symbol, %); a JIT-ed program's tag is dropped ("BPF program xdplb").
fn perf_symbols(text: &str) -> Vec<(String, f64)> {
    text.lines()
        .filter_map(|l| {
            let (pct, rest) = l.trim().split_once('%')?;
            let pct: f64 = pct.trim().parse().ok()?;
            let sym = rest.trim().split_once(']').map_or(rest, |(_, s)| s).trim();
            let sym = match sym
                .strip_prefix("bpf_prog_")
                .and_then(|t| t.split_once('_'))
            {
                Some((tag, name))
                    if tag.len() == 16 && tag.chars().all(|c| c.is_ascii_hexdigit()) =>
                {
                    format!("BPF program {name}")
                }
                _ => sym.to_string(),
            };
            Some((sym, pct))
        })
        .collect()
}

/// Every [`Target`] at 1 and 10k flows: delivered Mpps flat out (`runs` each) and the
/// forwarding rate at ≤ 0.5 % loss ([`pdr`], `pdr_runs` each). All targets are attached at
/// once (a namespace each) and measured round by round, each round in another order: the
/// VM's speed drifts over tens of seconds, and a target measured in a block of its own would
/// carry its phase into the ratios.
///
/// Both figures, because they disagree: flat out, the generator overfills the director's
/// veth ring and a receiver that is a little slower loses much more (the full ring's
/// cache lines bounce between the cores; on 2026-11-23 DR delivered 0.6× the ceiling flat
/// out, yet forwarded what it was offered at 3 Mpps as the ceiling did). The loss-bounded
/// rate is how forwarding devices are compared (RFC 2544 throughput, FD.io CSIT's PDR).
///
/// `targets`: which of [`Target::ALL`] (all for the report; fewer to compare a change
/// quickly, `bench --only e2e --targets ceiling,dr`).
pub fn rows(quick: bool, targets: &[Target]) -> Vec<PpsRow> {
    let lab = Lab::new(targets);
    let (runs, count) = if quick { (2, 200_000) } else { (7, 2_000_000) };
    let (pdr_runs, trial_s, steps) = if quick { (1, 0.03, 2) } else { (5, 0.2, 6) };
    let servers: Vec<_> = lab
        .lanes
        .iter()
        .map(|l| serve(&l.dir.0, l.target, l.gen_mac))
        .collect();
    let gen = Generator::new(&lab);
    // Row `i * FLOWS.len() + f`: target `i` (and lane `i`) at `FLOWS[f]`, as the report reads them.
    const FLOWS: [u32; 2] = [1, 10_000];
    let mut out: Vec<PpsRow> = targets
        .iter()
        .flat_map(|&target| {
            FLOWS.map(|flows| PpsRow {
                target,
                flows,
                offered_mpps: Vec::new(),
                delivered_mpps: Vec::new(),
                pdr_mpps: Vec::new(),
                core_ns: Vec::new(),
                run_ns: None,
                profile: Vec::new(),
            })
        })
        .collect();
    let n = targets.len();
    // Round r starts at target r.
    let order = |round: usize| (0..n).map(move |k| (k + round) % n);
    let flat_out = |lane: usize, flows: u32| {
        gen.run(Trial {
            lane,
            flows,
            count,
            gap_ns: 0,
        })
    };
    for round in 0..runs {
        for f in 0..FLOWS.len() {
            for i in order(round) {
                let r = &mut out[i * FLOWS.len() + f];
                let s = flat_out(i, r.flows);
                r.offered_mpps.push(s.offered_pps / 1e6);
                r.delivered_mpps.push(s.delivered_pps / 1e6);
            }
        }
    }
    for round in 0..pdr_runs {
        for f in 0..FLOWS.len() {
            for i in order(round) {
                let r = &mut out[i * FLOWS.len() + f];
                r.pdr_mpps
                    .push(lane_pdr(&gen, i, r.flows, trial_s, steps) / 1e6);
            }
        }
    }
    // The director core's cost per packet at a rate every target forwards: its NAPI
    // thread's CPU time (steal excluded) over what came back.
    for round in 0..pdr_runs {
        for f in 0..FLOWS.len() {
            for i in order(round) {
                let r = &mut out[i * FLOWS.len() + f];
                let napi = &servers[i].napi;
                if napi.is_empty() {
                    continue;
                }
                let count = (CORE_RATE * trial_s.max(0.1)) as u32;
                let before = run_ns(napi);
                let s = gen.run(Trial {
                    lane: i,
                    flows: r.flows,
                    count,
                    gap_ns: (1e9 / CORE_RATE) as u32,
                });
                let delivered = f64::from(count) * (1.0 - s.loss);
                if delivered > 0.0 {
                    r.core_ns.push((run_ns(napi) - before) as f64 / delivered);
                }
            }
        }
    }
    // One more run of each with run-time statistics on (they cost every program two clock
    // reads, so these runs are not among the delivered figures above); off when dropped.
    let stats = aya::sys::enable_stats(aya::sys::Stats::RunTime).expect("BPF_ENABLE_STATS");
    for (row, r) in out.iter_mut().enumerate() {
        if r.target.base() == Target::Nft {
            continue;
        }
        let i = row / FLOWS.len();
        let program = servers[i].program;
        let (t0, n0) = run_time(program);
        flat_out(i, r.flows);
        let (t1, n1) = run_time(program);
        r.run_ns = (n1 > n0).then(|| (t1 - t0).as_nanos() as f64 / (n1 - n0) as f64);
    }
    drop(stats);
    // Where the director's core spends its time, ceiling and DR at both flow counts.
    let profile_runs = if quick { 2 } else { 8 };
    for (row, r) in out.iter_mut().enumerate() {
        if matches!(r.target, Target::Ceiling | Target::Dr) {
            let i = row / FLOWS.len();
            r.profile = profile(|| {
                for _ in 0..profile_runs {
                    flat_out(i, r.flows);
                }
            });
        }
    }
    drop(gen);
    for s in servers {
        let _ = s.stop.send(());
        s.handle.join().expect("director side");
    }
    out
}

/// The end-to-end tables (markdown), flat out and at ≤ 0.5 % loss: each row's ratio to the
/// ceiling at the same flow count, and NAT's to the kernel's DNAT.
pub fn report(rows: &[PpsRow]) -> String {
    // Median, min, max, × ceiling, × nftables (NAT and nftables rows) of the samples `pick`s.
    let cells = |r: &PpsRow, pick: fn(&PpsRow) -> &[f64]| {
        let at = |t: Target| {
            rows.iter()
                .find(|o| o.target == t && o.flows == r.flows)
                .map_or(f64::NAN, |o| median(pick(o)))
        };
        let m = median(pick(r));
        let (min, max) = min_max(pick(r));
        let vs_nft = r
            .target
            .nft_peer()
            .map_or(String::new(), |nft| ratio(m / at(nft)));
        format!(
            "| {} | {} | {m:.2} | {min:.2}–{max:.2} | {} | {vs_nft} |",
            r.target.name(),
            r.flows,
            ratio(m / at(r.target.ceiling())),
        )
    };
    let mut out = match GENERATOR.get() {
        Some(GeneratorKind::LiveFrames) | None => String::from(
            "\nGenerator: BPF_PROG_TEST_RUN live frames (XDP_TX out of the generator's veth).\n",
        ),
        Some(GeneratorKind::Packet(e)) => format!(
            "\nGenerator: AF_PACKET sendmmsg, relayed to the director as XDP frames (the \
             kernel refused live frames: {e}). It offers less than live frames: where a row's \
             delivered rate is near its offered rate, the row measured the generator, not the \
             target.\n"
        ),
    };
    out += &String::from(
        "\n| end to end on veth (delivered flat out) | flows | Mpps (median) | min–max | × ceiling | × nftables DNAT | offered Mpps (median) | program ns/packet (bpf_stats) |\n|---|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for r in rows {
        out.push_str(&format!(
            "{} {:.2} | {} |\n",
            cells(r, |r| &r.delivered_mpps),
            median(&r.offered_mpps),
            r.run_ns.map_or(String::new(), |ns| format!("{ns:.0}")),
        ));
    }
    out.push_str(&format!(
        "\n| forwarding rate at ≤ {}% loss (PDR) | flows | Mpps (median) | min–max | × ceiling | × nftables DNAT |\n|---|---:|---:|---:|---:|---:|\n",
        PDR_LOSS * 100.0
    ));
    for r in rows {
        out.push_str(&cells(r, |r| &r.pdr_mpps));
        out.push('\n');
    }
    out + &core_table(rows) + &profile_table(rows)
}

/// The director core's time per packet at [`CORE_RATE`] and the rate one core would forward
/// at that cost, each row against the ceiling's (the ratio of capacities), NAT's against
/// nftables'. Empty when not measured (one CPU).
fn core_table(rows: &[PpsRow]) -> String {
    if rows.iter().all(|r| r.core_ns.is_empty()) {
        return String::new();
    }
    let at = |t: Target, flows: u32| {
        rows.iter()
            .find(|o| o.target == t && o.flows == flows)
            .map_or(f64::NAN, |o| median(&o.core_ns))
    };
    let mut out = format!(
        "\n| director core time per packet, paced at {:.1} Mpps (NAPI thread, steal excluded) | flows | ns/packet (median) | min–max | Mpps per core | × ceiling | × nftables DNAT |\n|---|---:|---:|---:|---:|---:|---:|\n",
        CORE_RATE / 1e6
    );
    for r in rows {
        let m = median(&r.core_ns);
        let (min, max) = min_max(&r.core_ns);
        let vs_nft = r
            .target
            .nft_peer()
            .map_or(String::new(), |nft| ratio(at(nft, r.flows) / m));
        out.push_str(&format!(
            "| {} | {} | {m:.0} | {min:.0}–{max:.0} | {:.2} | {} | {vs_nft} |\n",
            r.target.name(),
            r.flows,
            1e3 / m,
            ratio(at(r.target.ceiling(), r.flows) / m),
        ));
    }
    out
}

/// A ratio for a table: "n/a" when a side is missing or 0 (a PDR search that found no
/// rate within the loss bound: on 2026-12-06 nftables two-way at 10k flows printed "inf").
fn ratio(x: f64) -> String {
    if x.is_finite() {
        format!("{x:.2}")
    } else {
        "n/a".to_string()
    }
}

/// The profiled rows side by side: every symbol with ≥ 1 % of some row's samples, ordered
/// by its largest share in any of them, at most 16.
fn profile_table(rows: &[PpsRow]) -> String {
    let profiled: Vec<&PpsRow> = rows.iter().filter(|r| !r.profile.is_empty()).collect();
    if profiled.is_empty() {
        return String::new();
    }
    let share = |r: &PpsRow, sym: &str| {
        r.profile
            .iter()
            .find(|(s, _)| s == sym)
            .map_or(0.0, |p| p.1)
    };
    // The programs always have their rows (behind the AF_PACKET generator the kernel's skb
    // work takes most samples and the ceiling's program can hold well under 1 %); then the
    // largest of the rest, 16 rows in all.
    let program = |s: &str| s.starts_with("BPF program");
    let mut syms: Vec<&str> = profiled
        .iter()
        .flat_map(|r| r.profile.iter())
        .filter(|(s, pct)| *pct >= 1.0 || program(s))
        .map(|(s, _)| s.as_str())
        .collect();
    let top = |sym: &str| profiled.iter().map(|r| share(r, sym)).fold(0.0, f64::max);
    syms.sort_by(|a, b| top(b).total_cmp(&top(a)).then(a.cmp(b)));
    syms.dedup();
    let programs = syms.iter().filter(|s| program(s)).count();
    let (room, mut others) = (16usize.saturating_sub(programs), 0);
    syms.retain(|s| {
        program(s) || {
            others += 1;
            others <= room
        }
    });
    let mut out = String::from(
        "\nWhere the director's core (CPU 1) spends its time flat out, % of perf cpu-clock samples:\n\n| symbol |",
    );
    for r in &profiled {
        let flows = match r.flows {
            1 => "1 flow".to_string(),
            n if n % 1000 == 0 => format!("{}k flows", n / 1000),
            n => format!("{n} flows"),
        };
        out.push_str(&format!(" {}, {flows} |", r.target.name()));
    }
    out.push_str("\n|---|");
    out.push_str(&"---:|".repeat(profiled.len()));
    out.push('\n');
    for sym in syms {
        out.push_str(&format!("| {sym} |"));
        for r in &profiled {
            out.push_str(&format!(" {:.1} |", share(r, sym)));
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_profile_table_keeps_the_programs_rows_however_small_their_share() {
        // 20 kernel symbols of 2-21 % each and a program at 0.4 %: 15 kernel rows and the
        // program's.
        let mut profile: Vec<(String, f64)> = (0..20)
            .map(|i| (format!("k{i}"), 21.0 - i as f64))
            .collect();
        profile.push(("BPF program xdplb_floor".into(), 0.4));
        let row = PpsRow {
            target: Target::Ceiling,
            flows: 1,
            offered_mpps: vec![],
            delivered_mpps: vec![],
            pdr_mpps: vec![],
            core_ns: vec![],
            run_ns: None,
            profile,
        };
        let table = profile_table(&[row]);
        let rows: Vec<&str> = table
            .lines()
            .filter(|l| l.starts_with("| "))
            .skip(1)
            .collect();
        assert_eq!(rows.len(), 16, "{table}");
        assert!(
            rows.contains(&"| BPF program xdplb_floor | 0.4 |"),
            "{table}"
        );
        assert!(
            rows.contains(&"| k14 | 7.0 |") && !table.contains("| k15 |"),
            "{table}"
        );
    }

    #[test]
    fn perf_report_lines_become_symbols_and_shares() {
        let text = "    27.28%  [k] bpf_prog_e6844195109670ed_xdplb\n\
                    \x20    9.31%  [k] lookup_nulls_elem_raw\n\
                    \x20    0.17%  [k] 0xffffffffc0036871\n\
                    \n# a comment\n";
        assert_eq!(
            perf_symbols(text),
            vec![
                ("BPF program xdplb".to_string(), 27.28),
                ("lookup_nulls_elem_raw".to_string(), 9.31),
                ("0xffffffffc0036871".to_string(), 0.17),
            ]
        );
        // Not a JIT tag: kept as it is.
        assert_eq!(
            perf_symbols("1.00% [k] bpf_prog_run_x")[0].0,
            "bpf_prog_run_x"
        );
    }

    /// A receiver that forwards up to `capacity` pps and, past it, loses the excess; a
    /// generator that tops out at `max` pps.
    fn model(capacity: f64, max: f64) -> impl FnMut(f64) -> Sample {
        move |pps: f64| {
            let offered = pps.min(max);
            let delivered = offered.min(capacity);
            Sample {
                offered_pps: offered,
                delivered_pps: delivered,
                loss: 1.0 - delivered / offered,
                stolen: false,
            }
        }
    }

    #[test]
    fn pdr_finds_the_capacity() {
        for capacity in [0.3e6, 1.7e6, 3.1e6] {
            let found = pdr(model(capacity, 4.5e6), 6);
            assert!(
                found <= capacity * (1.0 + PDR_LOSS) && found >= capacity * 0.97,
                "capacity {capacity}: found {found}"
            );
        }
    }

    #[test]
    fn pdr_is_the_generator_when_nothing_is_lost_flat_out() {
        assert_eq!(pdr(model(5e6, 4.5e6), 6), 4.5e6);
    }

    #[test]
    fn pdr_survives_a_stall_in_the_flat_out_trial() {
        // The first flat-out trial meets a stall: nothing comes back.
        let capacity = 2e6;
        let mut m = model(capacity, 4.5e6);
        let mut first = true;
        let trial = |pps: f64| {
            let mut s = m(pps);
            if std::mem::take(&mut first) {
                s.delivered_pps = 0.0;
                s.loss = 1.0;
            }
            s
        };
        let found = pdr(trial, 6);
        assert!(found >= capacity * 0.97, "found {found}");
    }

    #[test]
    fn pdr_of_a_receiver_that_loses_everything_is_zero() {
        assert_eq!(pdr(model(0.0, 4.5e6), 6), 0.0);
    }

    #[test]
    fn pdr_retries_a_rate_that_lost_once() {
        // Every third trial below the capacity hits a hiccup and loses 2 %.
        let capacity = 2e6;
        let mut n = 0;
        let mut m = model(capacity, 4.5e6);
        let trial = |pps: f64| {
            n += 1;
            let mut s = m(pps);
            if pps.is_finite() && n % 3 == 0 {
                s.loss = 0.02;
            }
            s
        };
        let found = pdr(trial, 6);
        assert!(found >= capacity * 0.97, "found {found}");
    }

    #[test]
    fn pdr_does_not_count_trials_the_host_stole_from() {
        // Two of every three trials below the capacity lose 4 % while the hypervisor holds
        // the vCPU; the third is clean. Counted like any loss, every rate would fail twice.
        let capacity = 2e6;
        let mut n = 0;
        let mut m = model(capacity, 4.5e6);
        let trial = |pps: f64| {
            let mut s = m(pps);
            if pps.is_finite() {
                n += 1;
                if n % 3 != 0 {
                    s.loss = 0.04;
                    s.delivered_pps = s.offered_pps * 0.96;
                    s.stolen = true;
                }
            }
            s
        };
        let found = pdr(trial, 6);
        assert!(found >= capacity * 0.97, "found {found}");
    }

    #[test]
    fn pdr_ends_a_rate_that_keeps_losing_under_steal() {
        // Every trial is stolen from and loses: each rate gets its bounded tries, and the
        // search still ends (at 0, nothing passed).
        let mut n = 0;
        let trial = |pps: f64| {
            n += 1;
            Sample {
                offered_pps: pps.min(4.5e6),
                delivered_pps: pps.min(4.5e6) * 0.5,
                loss: 0.5,
                stolen: true,
            }
        };
        assert_eq!(pdr(trial, 6), 0.0);
        assert!(n <= 5 * 12, "bounded: {n} trials");
    }

    #[test]
    fn pdr_searches_below_a_collapsed_flat_out_rate() {
        // Under overload this receiver delivers only a third of its capacity (ring
        // contention); paced at or below its capacity it loses nothing.
        let capacity = 3e6;
        let trial = |pps: f64| {
            let offered = pps.min(4.5e6);
            let delivered = if offered > capacity {
                capacity / 3.0
            } else {
                offered
            };
            Sample {
                offered_pps: offered,
                delivered_pps: delivered,
                loss: 1.0 - delivered / offered,
                stolen: false,
            }
        };
        let found = pdr(trial, 8);
        assert!(found >= capacity * 0.97, "found {found}");
    }
}
