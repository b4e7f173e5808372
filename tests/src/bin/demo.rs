//! The embedded demo (`cargo xtask run`): builds a namespace topology (client, director,
//! three backends), runs `xdplb run` in DR mode with `examples/demo.yaml`, sends a steady
//! stream of TCP requests through the VIP and shows which backend answered how often.
//! Everything it created is removed on exit, Ctrl-C or after `--duration`.

use std::{
    collections::BTreeMap,
    io::{IsTerminal as _, Write as _},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use clap::Parser;
use lb_tests::netns::{self, Topology, TCP_PORT, VIP4, VIP6};

#[derive(Parser)]
#[command(about = "xdplb demo: DR load balancing between three backends in network namespaces")]
struct Args {
    /// Stop after this many seconds (Ctrl-C stops earlier).
    #[arg(long, default_value_t = 30)]
    duration: u64,
    /// New TCP connections per second (half IPv4, half IPv6).
    #[arg(long, default_value_t = 40)]
    rate: usize,
}

fn main() {
    let args = Args::parse();
    lb_tests::require_root();
    let stop = Arc::new(AtomicBool::new(false));
    let s = stop.clone();
    ctrlc::set_handler(move || s.store(true, Ordering::SeqCst)).expect("signal handler");

    let xdplb = netns::xdplb_binary();
    println!(
        "Building the topology: client, director, backends b1 b2 b3 (network namespaces xdemo{}-*)",
        std::process::id()
    );
    let mut topo = Topology::dr(&format!("xdemo{}", std::process::id()), 3);
    topo.start_servers();
    topo.attach_pass(&xdplb);
    topo.start_director(&xdplb, &Topology::demo_config());
    println!(
        "Director attached (XDP, DR mode) with {}",
        Topology::demo_config().display()
    );

    let cl = topo.ns("cl");
    let mut total: BTreeMap<String, usize> = BTreeMap::new();
    let mut failures = 0usize;
    let start = Instant::now();
    let tty = std::io::stdout().is_terminal();
    let per_family = (args.rate / 2).max(1);
    while !stop.load(Ordering::SeqCst) && start.elapsed() < Duration::from_secs(args.duration) {
        let tick = Instant::now();
        let mut last: BTreeMap<String, usize> = BTreeMap::new();
        for vip in [VIP4, VIP6] {
            let (answers, failed) = netns::tcp_clients(&cl, vip, TCP_PORT, per_family);
            failures += failed.len();
            for (name, n) in answers {
                *last.entry(name.clone()).or_default() += n;
                *total.entry(name).or_default() += n;
            }
        }
        let sum: usize = total.values().sum();
        let mut out = String::new();
        if tty {
            out.push_str("\x1b[2J\x1b[H");
        }
        out.push_str(&format!(
            "xdplb demo — {:>3}s of {}s — requests to {VIP4}:{TCP_PORT} and [{VIP6}]:{TCP_PORT} (Ctrl-C to stop)\n",
            start.elapsed().as_secs(),
            args.duration
        ));
        out.push_str(&format!(
            "{:<8} {:>10} {:>8} {:>10}\n",
            "backend", "answered", "share", "last tick"
        ));
        for (name, n) in &total {
            let share = 100.0 * *n as f64 / sum.max(1) as f64;
            out.push_str(&format!(
                "{name:<8} {n:>10} {share:>7.1}% {:>10}\n",
                last.get(name).copied().unwrap_or(0)
            ));
        }
        out.push_str(&format!("{:<8} {sum:>10}   failed: {failures}\n", "total"));
        print!("{out}");
        std::io::stdout().flush().ok();
        if let Some(rest) = Duration::from_secs(1).checked_sub(tick.elapsed()) {
            std::thread::sleep(rest);
        }
    }
    println!("\nThe director's view (xdplb status):");
    let status = netns::sh(&[
        xdplb.to_str().unwrap(),
        "--pin-dir",
        topo.pin_dir.to_str().unwrap(),
        "status",
    ]);
    println!("{status}");
    println!("Cleaning up: stopping the director, deleting the namespaces.");
    drop(topo);
    if failures > 0 {
        eprintln!("{failures} request(s) failed");
        std::process::exit(1);
    }
}
