//! Control-plane rows of `cargo xtask bench`: how fast config and health changes reach the
//! maps (in process, and end to end through a running controller), and the failover time
//! under load (backend failure -> last new flow sent to it).

use std::{
    net::{IpAddr, SocketAddr},
    time::{Duration, Instant},
};

use lb_userspace::{
    config::{AnyHost, Config},
    dataplane::{self, Director, Maps},
    health::{BackendKey, State},
    reconcile::{self, Ids, Runtime},
};

use crate::{
    load::{EchoServer, Load, ECHO_PORT},
    netns::{self, ConfigFile, Topology, VIP4},
};

struct Stat {
    what: String,
    samples: Vec<f64>,
    unit: &'static str,
    note: String,
}

impl Stat {
    fn row(&self) -> String {
        let (min, max) = crate::min_max(&self.samples);
        format!(
            "| {} | {:.1} {} | {min:.1}–{max:.1} | {} | {} |\n",
            self.what,
            crate::median(&self.samples),
            self.unit,
            self.samples.len(),
            self.note
        )
    }
}

fn in_process_config(services: usize, backends: usize) -> String {
    let mut s = String::from("interfaces: [{name: lo}]\nflow_table_size: 4096\nservices:\n");
    for i in 0..services {
        s += &format!(
            "  - {{name: s{i}, vip: 198.18.0.100, port: {}, protocol: tcp, mode: dr, backends: [",
            1000 + i
        );
        for j in 0..backends {
            s += &format!(
                "{{address: 198.18.{}.{}, mac: '02:00:00:00:00:01'}},",
                1 + j / 250,
                1 + j % 250
            );
        }
        s += "]}\n";
    }
    s
}

/// Reconcile cost in process: desired state computed and written as a diff.
fn reconcile_rows(rounds: usize) -> Vec<Stat> {
    let (services, backends) = (8, 16);
    let cfg = Config::parse(&in_process_config(services, backends), &AnyHost).expect("config");
    let mut d = Director::load(&dataplane::LoadOptions {
        flow_table_size: 4096,
        ..Default::default()
    })
    .expect("load");
    let mut ids = Ids::default();
    let mac = |b: &lb_userspace::config::Backend| b.mac().map(|m| m.0).unwrap_or_default();
    let want = reconcile::desired(&cfg, &mut ids, mac, |_| Runtime::default());
    d.apply(&want).expect("apply");
    let victim = BackendKey::new(
        cfg.services[0].endpoint(),
        cfg.services[0].backends[3].address,
    );

    let mut health = Stat {
        what: format!("health change → maps (1 of {backends} backends down/up, in process)"),
        samples: Vec::new(),
        unit: "ms",
        note: "desired state + diff write; one ring flip".into(),
    };
    for i in 0..rounds * 2 {
        let down = i % 2 == 0;
        let started = Instant::now();
        let want = reconcile::desired(&cfg, &mut ids, mac, |k| Runtime {
            state: if down && *k == victim {
                State::Down
            } else {
                State::Up
            },
            ..Runtime::default()
        });
        let ch = d.apply(&want).expect("apply");
        health.samples.push(started.elapsed().as_secs_f64() * 1e3);
        assert_eq!(ch.rings_flipped, 1, "{ch}");
    }

    let mut added = cfg.clone();
    added.services[0]
        .backends
        .push(lb_userspace::config::Backend {
            address: "198.18.9.9".parse().unwrap(),
            weight: 100,
            mac: Some("02:00:00:00:00:02".into()),
            port: None,
        });
    let mut reload = Stat {
        what: format!("reload → maps (add/remove 1 backend, {services} services × {backends})"),
        samples: Vec::new(),
        unit: "ms",
        note: "unchanged services write nothing".into(),
    };
    for i in 0..rounds * 2 {
        let c = if i % 2 == 0 { &added } else { &cfg };
        let started = Instant::now();
        let want = reconcile::desired(c, &mut ids, mac, |_| Runtime::default());
        let ch = d.apply(&want).expect("apply");
        reload.samples.push(started.elapsed().as_secs_f64() * 1e3);
        assert_eq!(ch.rings_flipped, 1, "{ch}");
    }
    vec![health, reload]
}

fn config(backends: &[usize], interval_ms: u64, fall: u32) -> String {
    let mut s = format!(
        "interfaces:\n  - name: eth0\n    xdp_mode: native\nservices:\n  - name: echo\n    vip: {VIP4}\n    port: {ECHO_PORT}\n    protocol: tcp\n    mode: dr\n    health_check: {{kind: tcp, interval: {interval_ms}ms, timeout: {}ms, rise: 2, fall: {fall}}}\n    backends:\n",
        interval_ms * 3 / 4
    );
    for &i in backends {
        s += &format!("      - address: {}\n", netns::backend4(i));
    }
    s
}

fn backend_present(pin_dir: &std::path::Path, addr: IpAddr) -> bool {
    let Ok(m) = Maps::from_pins(pin_dir) else {
        return false;
    };
    (0..lb_common::MAX_BACKENDS).any(|id| {
        m.backends.get(&id, 0).is_ok_and(|b| {
            b.flags & lb_common::BACKEND_F_VALID != 0
                && dataplane::addr_from_bytes(b.addr, b.family) == addr
                && b.flags & lb_common::BACKEND_F_RETIRED == 0
        })
    })
}

/// End to end through a running controller in a namespace lab.
fn controller_rows(rounds: usize) -> Vec<Stat> {
    const INTERVAL_MS: u64 = 200;
    const FALL: u32 = 2;
    let xdplb = netns::xdplb_binary();
    let prefix = format!("bc{}", std::process::id());
    let mut topo = Topology::dr(&prefix, 3);
    topo.attach_pass(&xdplb);
    let servers: Vec<EchoServer> = (0..3)
        .map(|i| {
            EchoServer::start(
                &topo.ns(&Topology::backend_name(i)),
                &Topology::backend_name(i),
            )
        })
        .collect();
    let file = ConfigFile::new(&prefix, &config(&[0, 1], INTERVAL_MS, FALL));
    topo.start_director(&xdplb, file.path());
    topo.wait_log("xdplb running", 1, Duration::from_secs(20));

    // File edit -> the new backend's entry is in the pinned map.
    let mut edit = Stat {
        what: "config file edit → backend in the maps (running controller)".into(),
        samples: Vec::new(),
        unit: "ms",
        note: "includes the 250 ms file watch interval".into(),
    };
    let b3: IpAddr = netns::backend4(2).parse().unwrap();
    for _ in 0..rounds {
        let started = Instant::now();
        file.write(&config(&[0, 1, 2], INTERVAL_MS, FALL));
        netns::wait_for("b3 in the maps", Duration::from_secs(5), || {
            backend_present(&topo.pin_dir, b3)
        });
        edit.samples.push(started.elapsed().as_secs_f64() * 1e3);
        file.write(&config(&[0, 1], INTERVAL_MS, FALL));
        netns::wait_for("b3 out of the maps", Duration::from_secs(5), || {
            !backend_present(&topo.pin_dir, b3)
        });
    }
    file.write(&config(&[0, 1, 2], INTERVAL_MS, FALL));
    netns::wait_for("b3 back", Duration::from_secs(5), || {
        backend_present(&topo.pin_dir, b3)
    });
    std::thread::sleep(Duration::from_millis(600));

    // Failover under load: the last new connection that reached the failed backend.
    let mut failover = Stat {
        what: format!(
            "failover: backend failure → last new flow sent to it (tcp check, {INTERVAL_MS} ms × fall {FALL})"
        ),
        samples: Vec::new(),
        unit: "ms",
        note: "20 long-lived + 50 new conn/s; refused connects mark the failed backend".into(),
    };
    let target = SocketAddr::new(VIP4.parse().unwrap(), ECHO_PORT);
    let load = Load::start(&topo.ns("cl"), target, Duration::from_secs(120));
    let mut starts = Vec::new();
    for _ in 0..rounds {
        std::thread::sleep(Duration::from_millis(500));
        let t0 = load.now();
        servers[1].set_accepting(false);
        std::thread::sleep(Duration::from_millis(u64::from(FALL) * INTERVAL_MS + 1000));
        servers[1].set_accepting(true);
        // Failures only come from the stopped backend; wait until it is back in the ring.
        std::thread::sleep(Duration::from_millis(3 * INTERVAL_MS + 500));
        starts.push(t0.as_secs_f64() * 1e3);
    }
    let report = load.stop();
    if std::env::var_os("XDPLB_BENCH_DEBUG").is_some() {
        eprintln!("starts {starts:?}\nfailures {:?}", report.failed_attempts());
    }
    // Only connects while the backend was stopped count (refused = sent to it).
    let down_ms = (u64::from(FALL) * INTERVAL_MS + 1000) as f64;
    for &t0 in &starts {
        let end = t0 + down_ms;
        let last = report
            .failed_attempts()
            .iter()
            .map(|(at, _)| at.as_secs_f64() * 1e3)
            .filter(|&at| at >= t0 && at < end)
            .fold(t0, f64::max);
        failover.samples.push(last - t0);
    }
    assert!(
        report.broken_sessions().is_empty(),
        "failover broke established connections: {}",
        report.summary()
    );
    drop(topo);
    drop(servers);
    drop(file);
    vec![edit, failover]
}

/// Maglev table build time (weighted, distinct identities) for a few sizes.
fn maglev_rows(rounds: usize) -> Vec<Stat> {
    let mut rows = Vec::new();
    for size in [65_537u32, 655_373] {
        for n in [10usize, 100, 1000] {
            let entries: Vec<lb_userspace::maglev::Entry> = (0..n)
                .map(|i| lb_userspace::maglev::Entry {
                    identity: format!("198.18.{}.{}", i / 250, 1 + i % 250),
                    weight: 100 + (i % 3) as u32,
                    id: i as u32,
                })
                .collect();
            let mut stat = Stat {
                what: format!("Maglev build, {n} backends, {size} slots"),
                samples: Vec::new(),
                unit: "ms",
                note: if size == 65_537 && n == 100 {
                    "target ≤ 5 ms".into()
                } else {
                    String::new()
                },
            };
            for _ in 0..rounds {
                let started = Instant::now();
                let t = lb_userspace::maglev::build(&entries, size);
                stat.samples.push(started.elapsed().as_secs_f64() * 1e3);
                assert_eq!(t.len(), size as usize);
            }
            rows.push(stat);
        }
    }
    rows
}

/// The control-plane table (markdown), and the median Maglev build time for 100 backends at
/// 65,537 slots (ms; one of issue 8's targets).
pub fn report(quick: bool) -> (String, f64) {
    let rounds = if quick { 2 } else { 5 };
    let mut out = String::from(
        "\n| control plane | median | min–max | samples | notes |\n|---|---:|---:|---:|---|\n",
    );
    let mut maglev_100 = f64::NAN;
    for s in maglev_rows(rounds)
        .into_iter()
        .chain(reconcile_rows(rounds * 4))
        .chain(controller_rows(rounds))
    {
        if s.what == "Maglev build, 100 backends, 65537 slots" {
            maglev_100 = crate::median(&s.samples);
        }
        out.push_str(&s.row());
    }
    (out, maglev_100)
}
