//! The embedded demo (`cargo xtask run`): builds a namespace topology (client, director,
//! three backends), runs `xdplb run` in DR mode with `examples/demo.yaml`, sends a steady
//! stream of TCP requests through the VIP and shows live which backend answered how often
//! and what the director's health checks say; midway it stops b2's web server (failover) and
//! later restarts it. Everything it created is removed on exit, Ctrl-C or after `--duration`.

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
    let mut events: Vec<String> = Vec::new();
    let mut last_health: BTreeMap<String, String> = BTreeMap::new();
    let start = Instant::now();
    let tty = std::io::stdout().is_terminal();
    let per_family = (args.rate / 2).max(1);
    let duration = Duration::from_secs(args.duration);
    // The failover act: b2's web server stops at 40 % of the run and returns at 70 %.
    let (stop_at, back_at) = (duration.mul_f64(0.4), duration.mul_f64(0.7));
    let (mut stopped, mut restarted) = (false, false);
    while !stop.load(Ordering::SeqCst) && start.elapsed() < duration {
        let tick = Instant::now();
        let now = start.elapsed();
        if !stopped && now >= stop_at {
            topo.set_serving(1, false);
            stopped = true;
            events.push(format!(
                "{:>3}s  stopped b2's web server: the health check (500 ms × fall 2) takes it out",
                now.as_secs()
            ));
        }
        if stopped && !restarted && now >= back_at {
            topo.set_serving(1, true);
            restarted = true;
            events.push(format!(
                "{:>3}s  restarted b2's web server: back after rise 2",
                now.as_secs()
            ));
        }
        let mut last: BTreeMap<String, usize> = BTreeMap::new();
        for vip in [VIP4, VIP6] {
            let (answers, failed) = netns::tcp_clients(&cl, vip, TCP_PORT, per_family);
            failures += failed.len();
            for (name, n) in answers {
                *last.entry(name.clone()).or_default() += n;
                *total.entry(name).or_default() += n;
            }
        }
        let health = health(&xdplb, &topo);
        for (b, h) in &health {
            if last_health.get(b).is_some_and(|was| was != h) {
                events.push(format!("{:>3}s  director: {b} is {h}", now.as_secs()));
            }
        }
        last_health.extend(health.clone());
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
            "{:<8} {:>10} {:>8} {:>10}  {}\n",
            "backend", "answered", "share", "last tick", "health (web, from the director)"
        ));
        for i in 0..3 {
            let name = Topology::backend_name(i);
            let n = total.get(&name).copied().unwrap_or(0);
            let share = 100.0 * n as f64 / sum.max(1) as f64;
            out.push_str(&format!(
                "{name:<8} {n:>10} {share:>7.1}% {:>10}  {}\n",
                last.get(&name).copied().unwrap_or(0),
                health.get(&name).map_or("?", String::as_str)
            ));
        }
        out.push_str(&format!("{:<8} {sum:>10}   failed: {failures}\n", "total"));
        for e in &events {
            out.push_str(&format!("  {e}\n"));
        }
        print!("{out}");
        std::io::stdout().flush().ok();
        if let Some(rest) = Duration::from_secs(1).checked_sub(tick.elapsed()) {
            std::thread::sleep(rest);
        }
    }
    if stopped && !restarted {
        topo.set_serving(1, true);
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
        println!(
            "{failures} request(s) failed: new connections that reached b2 between its server \
             stopping and the director's health check taking it out."
        );
    }
}

/// Health of each backend of the IPv4 web service, as the director's controller sees it.
fn health(xdplb: &std::path::Path, topo: &Topology) -> BTreeMap<String, String> {
    let out = std::process::Command::new(xdplb)
        .arg("--pin-dir")
        .arg(&topo.pin_dir)
        .args(["status", "--json", "--interval", "50ms"])
        .output();
    let Ok(out) = out else {
        return BTreeMap::new();
    };
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(&out.stdout) else {
        return BTreeMap::new();
    };
    let mut health = BTreeMap::new();
    let web = v["services"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|s| s["name"] == "web");
    for b in web
        .and_then(|w| w["backends"].as_array())
        .into_iter()
        .flatten()
    {
        let addr = b["address"].as_str().unwrap_or("");
        if let Some(i) = (0..3).find(|&i| netns::backend4(i) == addr) {
            health.insert(
                Topology::backend_name(i),
                b["state"].as_str().unwrap_or("?").to_string(),
            );
        }
    }
    health
}
