//! `cargo xtask bench`: ns/packet of the director's paths through BPF_PROG_TEST_RUN, next to
//! a trivial MAC-swap `XDP_TX` program measured in the same run. Every measured path is
//! proven by counters: a flow-hit run must create no flow, a new-flow run one per packet.

use aya::{
    maps::ProgramArray,
    programs::{TestRun, TestRunOptions, Xdp},
};
use clap::Parser;
use lb_common::reason;
use lb_tests::{Harness, Pkt, XDP_TX};
use lb_userspace::dataplane::{self, Maps};

#[derive(Parser)]
struct Args {
    /// Fewer repetitions (smoke run).
    #[arg(long)]
    quick: bool,
}

const CONFIG: &str = "
interfaces:
  - name: lo
flow_table_size: 65536
services:
  - name: web
    vip: 198.18.0.100
    port: 80
    protocol: tcp
    mode: dr
    backends:
      - { address: 198.18.1.11, mac: '02:00:00:00:01:0b' }
      - { address: 198.18.1.12, mac: '02:00:00:00:01:0c' }
      - { address: 198.18.1.13, mac: '02:00:00:00:01:0d' }
      - { address: 198.18.1.14, mac: '02:00:00:00:01:0e' }
  - name: web6
    vip: 2001:db8::100
    port: 80
    protocol: tcp
    mode: dr
    backends:
      - { address: 2001:db8::11, mac: '02:00:00:00:06:11' }
      - { address: 2001:db8::12, mac: '02:00:00:00:06:12' }
";

/// Kernel-measured average ns per run over `repeat` runs.
fn time(prog: &Xdp, input: &[u8], repeat: u32) -> f64 {
    let mut out = vec![0u8; input.len() + 256];
    let res = prog
        .test_run(TestRunOptions {
            data_in: Some(input),
            data_out: Some(&mut out),
            repeat,
            ..Default::default()
        })
        .expect("BPF_PROG_TEST_RUN");
    assert_eq!(res.return_value, XDP_TX, "benchmarked path must forward");
    res.duration.as_nanos() as f64
}

struct Row {
    path: &'static str,
    samples: Vec<f64>,
}

impl Row {
    fn median(&self) -> f64 {
        let mut s = self.samples.clone();
        s.sort_by(f64::total_cmp);
        s[s.len() / 2]
    }
}

fn loaded<'a>(h: &'a Harness, name: &str) -> &'a Xdp {
    h.director
        .loaded(name)
        .expect("program loaded before the runs")
}

fn counters(h: &Harness) -> (u64, u64) {
    let fwd = h.reason(reason::FWD_DR);
    let new: u64 = (0..2)
        .map(|s| {
            Maps::sum_counters(&h.director.maps.service_stats, s)
                .unwrap()
                .new_flows
        })
        .sum();
    (fwd, new)
}

fn main() {
    let args = Args::parse();
    let (repeat, runs) = if args.quick {
        (100_000u32, 3)
    } else {
        (1_000_000u32, 5)
    };
    let mut h = Harness::new(CONFIG);
    let v4 = Pkt::tcp("198.18.2.1", "198.18.0.100", 40000, 80).build();
    let v6 = Pkt::tcp("2001:db8:2::1", "2001:db8::100", 40000, 80).build();

    // The driver tail-calls slot 0 of BENCH_NEXT: the director, or the floor for its own cost.
    let director_fd = h
        .director
        .director_program()
        .fd()
        .unwrap()
        .try_clone()
        .unwrap();
    let floor_fd = h
        .director
        .program(dataplane::FLOOR_PROGRAM)
        .unwrap()
        .fd()
        .unwrap()
        .try_clone()
        .unwrap();
    h.director
        .program(dataplane::BENCH_NEW_FLOW_PROGRAM)
        .unwrap();
    let mut next: ProgramArray<_> = h
        .director
        .ebpf_mut()
        .take_map("BENCH_NEXT")
        .expect("BENCH_NEXT")
        .try_into()
        .expect("program array");

    let mut rows = [
        Row {
            path: "floor: MAC swap + XDP_TX",
            samples: vec![],
        },
        Row {
            path: "DR flow hit, IPv4 TCP",
            samples: vec![],
        },
        Row {
            path: "DR flow hit, IPv6 TCP",
            samples: vec![],
        },
        Row {
            path: "floor via new-flow driver",
            samples: vec![],
        },
        Row {
            path: "DR new flow (table full), IPv4 TCP",
            samples: vec![],
        },
    ];
    for _ in 0..runs {
        // (Re-)establish the flows the hit paths reuse: the new-flow runs evict them.
        assert_eq!(h.run(&v4).0, XDP_TX);
        assert_eq!(h.run(&v6).0, XDP_TX);
        rows[0]
            .samples
            .push(time(loaded(&h, dataplane::FLOOR_PROGRAM), &v4, repeat));

        let before = counters(&h);
        rows[1]
            .samples
            .push(time(h.director.director_program(), &v4, repeat));
        rows[2]
            .samples
            .push(time(h.director.director_program(), &v6, repeat));
        let after = counters(&h);
        assert_eq!(
            after.0 - before.0,
            2 * u64::from(repeat),
            "every hit-path run forwarded"
        );
        assert_eq!(after.1, before.1, "hit-path runs created no flow");

        next.set(0, &floor_fd, 0).unwrap();
        rows[3].samples.push(time(
            loaded(&h, dataplane::BENCH_NEW_FLOW_PROGRAM),
            &v4,
            repeat,
        ));

        next.set(0, &director_fd, 0).unwrap();
        let before = counters(&h);
        rows[4].samples.push(time(
            loaded(&h, dataplane::BENCH_NEW_FLOW_PROGRAM),
            &v4,
            repeat,
        ));
        let after = counters(&h);
        assert_eq!(
            after.1 - before.1,
            u64::from(repeat),
            "every new-flow run created a flow"
        );
    }

    let floor = rows[0].median();
    let driver_floor = rows[3].median();
    let mut report = format!(
        "xdplb bench ({} × {repeat} runs per path, BPF_PROG_TEST_RUN, {} CPUs)\n\n\
         | path | ns/packet (median) | min–max | × floor | Mpps/core |\n|---|---:|---:|---:|---:|\n",
        runs,
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
    );
    for (i, r) in rows.iter().enumerate() {
        // Paths run through the driver compare with the floor run through the same driver.
        let base = if i >= 3 { driver_floor } else { floor };
        let min = r.samples.iter().copied().fold(f64::INFINITY, f64::min);
        let max = r.samples.iter().copied().fold(0.0, f64::max);
        let m = r.median();
        report.push_str(&format!(
            "| {} | {m:.1} | {min:.1}–{max:.1} | {:.2} | {:.1} |\n",
            r.path,
            m / base,
            1000.0 / m
        ));
    }
    print!("{report}");
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
    std::fs::create_dir_all(&dir).expect("target/bench");
    std::fs::write(dir.join("report.md"), &report).expect("write report");
    println!("\nwritten to target/bench/report.md");
}
