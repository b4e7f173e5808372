//! End-to-end packets per second on veth, for `cargo xtask bench`: a generator namespace
//! sends frames with `BPF_PROG_TEST_RUN` in live-frames mode (XDP_TX out of its veth) to
//! the director's namespace, whose XDP program sends them back out (DR: XDP_TX toward the
//! backend's MAC on the same segment); an XDP sink on the generator's veth counts what comes
//! back. The ceiling is the same path with a plain MAC-swap XDP_TX program in the director's
//! place. Every target has its own director namespace and veth pair, all attached at once,
//! and the runs go round the targets (see [`rows`]).

use std::{
    sync::mpsc,
    time::{Duration, Instant},
};

use aya::{
    maps::{Array, MapData, PerCpuArray},
    programs::{ProgramFd, TestRun, TestRunAttrs, TestRunOptions},
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
    fn new() -> Lab {
        let tag = std::process::id();
        let gen = TempNs::new(&format!("xpg{tag}"));
        gen.ip(&["link", "set", "lo", "up"]);
        let mut lanes = Vec::new();
        for (i, target) in Target::ALL.into_iter().enumerate() {
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
#[derive(Clone, Copy, PartialEq)]
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
}

impl Target {
    pub const ALL: [Target; 5] = [
        Target::Ceiling,
        Target::Dr,
        Target::Tun,
        Target::Nat,
        Target::Nft,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Target::Ceiling => "ceiling: MAC swap + XDP_TX",
            Target::Dr => "xdplb DR",
            Target::Tun => "xdplb TUN",
            Target::Nat => "xdplb NAT",
            Target::Nft => "nftables DNAT (numgen)",
        }
    }

    fn mode(self) -> Option<&'static str> {
        match self {
            Target::Dr => Some("dr"),
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

/// Run the director side (`target` attached to eth0 of `dir`) until told to stop; also hands
/// back the attached program's id (for its run-time statistics).
fn serve(
    dir: &str,
    target: Target,
    gen_mac: [u8; 6],
) -> (mpsc::Sender<()>, std::thread::JoinHandle<()>, u32) {
    let nft = (target == Target::Nft).then(|| NftDnat::new(dir, "xdplb_bench", VIP, 80, &BACKENDS));
    let before = napi_threads();
    let (stop_tx, stop_rx) = mpsc::channel::<()>();
    let (ready_tx, ready_rx) = mpsc::channel::<u32>();
    let handle = in_netns(dir, move || {
        let mut d = Director::load(&dataplane::LoadOptions {
            flow_table_size: 65536,
            ..Default::default()
        })
        .expect("load");
        let program = match target.mode() {
            None => {
                let program = if target == Target::Ceiling {
                    dataplane::FLOOR_PROGRAM
                } else {
                    dataplane::PASS_PROGRAM
                };
                d.attach_program(program, "eth0").expect("attach");
                program
            }
            Some(mode) => {
                let cfg = Config::parse(&director_config(mode, gen_mac), &AnyHost).expect("config");
                let want = dataplane::desired(&cfg, |b| b.mac().map(|m| m.0).unwrap_or_default());
                d.apply(&want).expect("maps");
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
    if crate::cpus() > 1 {
        // The director's receive path (veth NAPI, where its XDP program runs) gets a core
        // of its own, as on a real director; the generator keeps CPU 0. (Attaching XDP
        // created the device's NAPI; a thread of an earlier target's may linger.)
        sh(&[
            "ip",
            "netns",
            "exec",
            dir,
            "sh",
            "-c",
            "echo 1 > /sys/class/net/eth0/threaded",
        ]);
        let ours: Vec<i32> = napi_threads().difference(&before).copied().collect();
        assert!(!ours.is_empty(), "threaded NAPI started a kernel thread");
        for pid in ours {
            crate::pin_to(pid, 1);
        }
    }
    (stop_tx, handle, program)
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

/// Send `count` frames over `flows` distinct 5-tuples out of `lane`'s veth; (sent pps,
/// delivered pps).
fn generate(gen: &str, lane: &Lane, flows: u32, count: u32) -> (f64, f64) {
    let (gen, dev) = (gen.to_string(), lane.gen_if.clone());
    let (gen_mac, dir_mac) = (lane.gen_mac, lane.dir_mac);
    in_netns(&gen, move || {
        crate::pin_to(0, 0);
        let mut d = Director::load(&dataplane::LoadOptions {
            flow_table_size: lb_userspace::config::FLOW_TABLE_MIN,
            ..Default::default()
        })
        .expect("load generator object");
        d.attach_program(dataplane::SINK_PROGRAM, &dev)
            .expect("sink");
        let tx_fd: ProgramFd = d
            .program(dataplane::TX_PROGRAM)
            .expect("tx")
            .fd()
            .expect("fd")
            .try_clone()
            .expect("fd");
        let (mut next, mut cfg) = crate::bench_driver(&mut d);
        next.set(0, &tx_fd, 0).expect("tail");
        // Restore the template every run (live frames reuse pages), then a 5-tuple from
        // the cycle of `flows`.
        cfg.set(0, 4 | 2, 0).expect("cfg");
        cfg.set(1, flows, 0).expect("cycle");
        let mut p = Pkt::tcp("198.18.9.1", VIP, 40000, 80).with_macs(gen_mac, dir_mac);
        p.payload = vec![0x5a; FRAME - 54];
        // ACK: a segment conntrack (the nftables peer) picks up as an established stream.
        p.tcp_flags = crate::TCP_ACK;
        let frame = p.build();
        let mut template: Array<MapData, [u8; FRAME]> = d
            .ebpf_mut()
            .take_map("BENCH_TEMPLATE")
            .expect("BENCH_TEMPLATE")
            .try_into()
            .expect("template");
        template
            .set(
                0,
                <[u8; FRAME]>::try_from(&frame[..]).expect("128 bytes"),
                0,
            )
            .expect("template");
        let sink: PerCpuArray<MapData, u64> = d
            .ebpf_mut()
            .take_map("SINK")
            .expect("SINK")
            .try_into()
            .expect("sink");
        let received = || -> u64 { sink.get(&0, 0).map(|v| v.iter().sum()).unwrap_or(0) };
        let ifindex = lb_userspace::netlink::ifindex(&dev).expect("generator veth");
        let ctx: Vec<u8> = [0, frame.len() as u32, 0, ifindex, 0, 0]
            .iter()
            .flat_map(|w: &u32| w.to_ne_bytes())
            .collect();
        let before = received();
        let prog = d.loaded(dataplane::BENCH_DRIVER_PROGRAM).expect("driver");
        let started = Instant::now();
        prog.test_run(TestRunOptions {
            data_in: Some(&frame),
            ctx_in: Some(&ctx),
            repeat: count,
            attrs: TestRunAttrs::new().xdp_live_frames(64),
            ..Default::default()
        })
        .expect("live frames");
        let sent_s = started.elapsed().as_secs_f64();
        // Let the last frames arrive.
        std::thread::sleep(Duration::from_millis(200));
        let got = received() - before;
        (f64::from(count) / sent_s, got as f64 / sent_s)
    })
    .join()
    .expect("generator")
}

pub struct PpsRow {
    pub target: Target,
    pub flows: u32,
    /// What the generator sent (its own rate, CPU 0): the ceiling is near it when the
    /// receiving side keeps up.
    pub offered_mpps: Vec<f64>,
    pub delivered_mpps: Vec<f64>,
    /// The target's XDP program, ns per packet as it ran on the forwarding path (kernel run
    /// time statistics, one extra run after the timed ones); `None` for nftables, whose work
    /// is not in a program.
    pub run_ns: Option<f64>,
}

/// Delivered Mpps for every [`Target`] at 1 and 10k flows (`runs` each). All targets are
/// attached at once (a namespace each) and measured round by round, each round in another
/// order: the VM's speed drifts over tens of seconds, and a target measured in a block of its
/// own would carry its phase into the ratios.
pub fn rows(quick: bool) -> Vec<PpsRow> {
    let lab = Lab::new();
    let (runs, count) = if quick { (2, 200_000) } else { (7, 2_000_000) };
    let servers: Vec<_> = lab
        .lanes
        .iter()
        .map(|l| serve(&l.dir.0, l.target, l.gen_mac))
        .collect();
    // Row `i * FLOWS.len() + f`: target `i` (and lane `i`) at `FLOWS[f]`, as the report reads them.
    const FLOWS: [u32; 2] = [1, 10_000];
    let mut out: Vec<PpsRow> = Target::ALL
        .into_iter()
        .flat_map(|target| {
            FLOWS.map(|flows| PpsRow {
                target,
                flows,
                offered_mpps: Vec::new(),
                delivered_mpps: Vec::new(),
                run_ns: None,
            })
        })
        .collect();
    let n = Target::ALL.len();
    for round in 0..runs {
        for f in 0..FLOWS.len() {
            // Round r starts at target r.
            for i in (0..n).map(|k| (k + round) % n) {
                let r = &mut out[i * FLOWS.len() + f];
                let (sent, delivered) = generate(&lab.gen.0, &lab.lanes[i], r.flows, count);
                r.offered_mpps.push(sent / 1e6);
                r.delivered_mpps.push(delivered / 1e6);
            }
        }
    }
    // One more run of each with run-time statistics on (they cost every program two clock
    // reads, so these runs are not among the delivered figures above); off when dropped.
    let stats = aya::sys::enable_stats(aya::sys::Stats::RunTime).expect("BPF_ENABLE_STATS");
    for (row, r) in out.iter_mut().enumerate() {
        if r.target == Target::Nft {
            continue;
        }
        let i = row / FLOWS.len();
        let program = servers[i].2;
        let (t0, n0) = run_time(program);
        generate(&lab.gen.0, &lab.lanes[i], r.flows, count);
        let (t1, n1) = run_time(program);
        r.run_ns = (n1 > n0).then(|| (t1 - t0).as_nanos() as f64 / (n1 - n0) as f64);
    }
    drop(stats);
    for (stop, handle, _) in servers {
        let _ = stop.send(());
        handle.join().expect("director side");
    }
    out
}

/// The end-to-end table (markdown): each row's ratio to the ceiling at the same flow count,
/// and NAT's to the kernel's DNAT.
pub fn report(rows: &[PpsRow]) -> String {
    let at = |t: Target, flows: u32| {
        rows.iter()
            .find(|r| r.target == t && r.flows == flows)
            .map(|r| median(&r.delivered_mpps))
            .unwrap_or(f64::NAN)
    };
    let mut out = String::from(
        "\n| end to end on veth (delivered) | flows | Mpps (median) | min–max | × ceiling | × nftables DNAT | offered Mpps (median) | program ns/packet (bpf_stats) |\n|---|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for r in rows {
        let m = median(&r.delivered_mpps);
        let (min, max) = min_max(&r.delivered_mpps);
        let vs_nft = match r.target {
            Target::Nat | Target::Nft => format!("{:.2}", m / at(Target::Nft, r.flows)),
            _ => String::new(),
        };
        out.push_str(&format!(
            "| {} | {} | {m:.2} | {min:.2}–{max:.2} | {:.2} | {vs_nft} | {:.2} | {} |\n",
            r.target.name(),
            r.flows,
            m / at(Target::Ceiling, r.flows),
            median(&r.offered_mpps),
            r.run_ns.map_or(String::new(), |ns| format!("{ns:.0}")),
        ));
    }
    out
}
