//! Failover, reload, restart and upgrade under continuous load (DR, namespaces): 20
//! long-lived TCP connections exchanging data every 50 ms (each byte checked) plus a new
//! connection every 20 ms, while backends fail, the config changes, and the controller is
//! killed or upgraded.

use std::{net::SocketAddr, path::PathBuf, sync::Mutex, time::Duration};

use lb_tests::{
    load::{EchoServer, Load, LoadReport, ECHO_PORT},
    netns::{self, ConfigFile, Topology, VIP4},
};

/// The scenarios share the machine's two CPUs: one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

const INTERVAL_MS: u64 = 200;
const FALL: u64 = 2;

fn config(backends: &[usize], extra: &str) -> String {
    let mut s = format!(
        "interfaces:\n  - name: eth0\n    xdp_mode: native\n{extra}services:\n  - name: echo\n    vip: {VIP4}\n    port: {ECHO_PORT}\n    protocol: tcp\n    mode: dr\n    health_check: {{kind: tcp, interval: {INTERVAL_MS}ms, timeout: 150ms, rise: 2, fall: {FALL}}}\n    backends:\n"
    );
    for &i in backends {
        s += &format!("      - address: {}\n", netns::backend4(i));
    }
    s
}

struct Lab {
    topo: Topology,
    servers: Vec<EchoServer>,
    xdplb: PathBuf,
    config: ConfigFile,
}

impl Lab {
    fn new(tag: &str, backends: &[usize]) -> Lab {
        Lab::with(tag, backends, "")
    }

    /// With `extra` top-level config lines (e.g. `metrics:`).
    fn with(tag: &str, backends: &[usize], extra: &str) -> Lab {
        lb_tests::require_root();
        let xdplb = netns::xdplb_binary();
        let prefix = format!("{tag}{}", std::process::id());
        let mut topo = Topology::dr(&prefix, 3);
        topo.attach_pass(&xdplb);
        let servers = (0..3)
            .map(|i| {
                EchoServer::start(
                    &topo.ns(&Topology::backend_name(i)),
                    &Topology::backend_name(i),
                )
            })
            .collect();
        let config = ConfigFile::new(&prefix, &config(backends, extra));
        topo.start_director(&xdplb, config.path());
        topo.wait_log("xdplb running", 1, Duration::from_secs(20));
        Lab {
            topo,
            servers,
            xdplb,
            config,
        }
    }

    fn load(&self) -> Load {
        let target = SocketAddr::new(VIP4.parse().unwrap(), ECHO_PORT);
        Load::start(&self.topo.ns("cl"), target, Duration::from_secs(60))
    }

    /// New flows counted for backend `i` by the data plane.
    fn new_flows(&self, i: usize) -> u64 {
        let stats = self.topo.stats(&self.xdplb);
        let addr = netns::backend4(i);
        stats["services"]
            .as_array()
            .expect("services")
            .iter()
            .flat_map(|s| s["backends"].as_array().cloned().unwrap_or_default())
            .find(|b| b["address"] == addr.as_str())
            .map_or(0, |b| b["new_flows"].as_u64().expect("new_flows"))
    }

    fn state(&self, i: usize) -> String {
        let stats = self.topo.stats(&self.xdplb);
        let addr = netns::backend4(i);
        stats["services"][0]["backends"]
            .as_array()
            .expect("backends")
            .iter()
            .find(|b| b["address"] == addr.as_str())
            .map_or("absent".into(), |b| {
                b["state"].as_str().unwrap_or("?").to_string()
            })
    }

    fn xdplb(&self, args: &[&str]) -> std::process::Output {
        std::process::Command::new(&self.xdplb)
            .arg("--pin-dir")
            .arg(&self.topo.pin_dir)
            .args(args)
            .output()
            .expect("run xdplb")
    }

    /// The id of the program attached through the pinned link on eth0.
    fn attached_program(&self) -> u64 {
        let link = self.topo.pin_dir.join("link_eth0");
        let out = netns::sh(&[
            "bpftool",
            "-j",
            "link",
            "show",
            "pinned",
            link.to_str().unwrap(),
        ]);
        let v: serde_json::Value = serde_json::from_str(&out).expect("bpftool json");
        v["prog_id"].as_u64().expect("prog_id")
    }
}

fn assert_clean(what: &str, r: &LoadReport) {
    assert!(
        r.failed_attempts().is_empty() && r.broken_sessions().is_empty() && r.lost_bytes() == 0,
        "{what}: {}",
        r.summary()
    );
    assert!(
        r.attempts.len() > 50,
        "{what}: the load ran: {}",
        r.summary()
    );
}

#[test]
fn failed_backend_leaves_within_fall_times_interval_and_comes_back() {
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let lab = Lab::with("xf", &[0, 1, 2], "metrics:\n  listen: 127.0.0.1:9100\n");
    let load = lab.load();
    std::thread::sleep(Duration::from_secs(1));

    let t0 = load.now();
    lab.servers[1].set_accepting(false);
    let deadline = Duration::from_millis(FALL * INTERVAL_MS) + Duration::from_secs(1);
    std::thread::sleep(deadline);
    let frozen = lab.new_flows(1);
    assert_eq!(lab.state(1), "down");
    // The controller's log is structured: the transition carries the backend and the check.
    let down = format!(
        "backend is DOWN backend={VIP4}:{ECHO_PORT}/tcp -> {} state=\"DOWN\" check=connect",
        netns::backend4(1)
    );
    let log = lab.topo.director_log.lock().unwrap().clone();
    assert!(log.contains(&down), "`{down}` in:\n{log}");
    operator_views_show_the_failure(&lab);
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        lab.new_flows(1),
        frozen,
        "a new flow went to the failed backend more than fall × interval + 1 s after it failed"
    );

    // It comes back after `rise` good checks.
    let t1 = load.now();
    lab.servers[1].set_accepting(true);
    std::thread::sleep(Duration::from_secs(2));
    let report = load.stop();

    // Only new connections that reached b2 while it was failing could fail (refused).
    let failed = report.failed_attempts();
    let last_failure = failed.iter().map(|(at, _)| *at).max();
    if let Some(last) = last_failure {
        assert!(
            last >= t0 && last - t0 <= deadline,
            "failures outside the failover window ({:?} .. {:?} after the load started): {:?}; {}",
            t0,
            t0 + deadline,
            failed,
            report.summary()
        );
    }
    let failover = last_failure.map_or(Duration::ZERO, |l| l - t0);
    eprintln!(
        "measured failover: last new connection sent to the failed backend {} ms after it stopped \
         (health check interval {INTERVAL_MS} ms, fall {FALL}); {} new connections failed",
        failover.as_millis(),
        failed.len()
    );
    assert!(
        report.broken_sessions().is_empty() && report.lost_bytes() == 0,
        "on_backend_down: keep — no established connection breaks: {}",
        report.summary()
    );
    assert!(
        report.served_since(t1).contains_key("b2"),
        "b2 takes new connections again after it recovered: {:?}",
        report.served_since(t1)
    );
}

/// `xdplb status` (table and JSON), `xdplb stats --watch` and `/metrics` while b2 is down
/// under load.
fn operator_views_show_the_failure(lab: &Lab) {
    let out = lab.xdplb(&["status", "--json", "--interval", "500ms"]);
    assert!(out.status.success(), "{out:?}");
    let st: serde_json::Value = serde_json::from_slice(&out.stdout).expect("status --json");
    let svc = &st["services"][0];
    assert_eq!(svc["name"], "echo", "{st}");
    assert_eq!(svc["scheduler"], "maglev");
    assert!(
        svc["rates"]["conn_per_s"].as_f64().unwrap() > 5.0,
        "50 conn/s of load: {st}"
    );
    let backend = |i: usize| {
        svc["backends"]
            .as_array()
            .unwrap()
            .iter()
            .find(|b| b["address"] == netns::backend4(i).as_str())
            .cloned()
            .unwrap_or_else(|| panic!("backend {i} in {st}"))
    };
    let b2 = backend(1);
    assert_eq!(b2["state"], "down", "{b2}");
    assert_eq!(b2["last_check"]["ok"], false, "{b2}");
    assert!(
        b2["last_check"]["detail"]
            .as_str()
            .unwrap()
            .contains("refused"),
        "{b2}"
    );
    assert_eq!(b2["rates"]["conn_per_s"].as_f64(), Some(0.0), "{b2}");
    let b1 = backend(0);
    assert_eq!(
        (b1["state"].as_str(), b1["health"].as_str()),
        (Some("up"), Some("up"))
    );
    assert!(b1["rates"]["packets_per_s"].as_f64().unwrap() > 0.0, "{b1}");
    assert!(st["controller"]["generation"].as_u64() == Some(1), "{st}");

    let table = String::from_utf8(lab.xdplb(&["status", "--interval", "200ms"]).stdout).unwrap();
    for expected in [
        "maglev (echo)",
        "LastCheck",
        "FAIL",
        "refused",
        "ok ",
        "CPS",
        "config generation 1",
    ] {
        assert!(table.contains(expected), "`{expected}` in:\n{table}");
    }

    let watch = lab.xdplb(&["stats", "--watch", "300ms", "--count", "2"]);
    let text = String::from_utf8_lossy(&watch.stdout);
    assert!(watch.status.success(), "{watch:?}");
    let fwd_dr_lines = text
        .lines()
        .filter(|l| l.split_whitespace().next() == Some("fwd_dr"))
        .count();
    assert_eq!(fwd_dr_lines, 2, "two reports:\n{text}");
    assert!(text.contains("/s"), "rates in the second report:\n{text}");

    // Prometheus: scrape from inside the director's namespace and parse.
    let body = netns::in_netns(&lab.topo.ns("dir"), || {
        use std::io::{Read as _, Write as _};
        let mut s = std::net::TcpStream::connect("127.0.0.1:9100").expect("connect to /metrics");
        s.write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            .unwrap();
        let mut r = String::new();
        s.read_to_string(&mut r).unwrap();
        r
    })
    .join()
    .unwrap();
    let (head, body) = body.split_once("\r\n\r\n").expect("HTTP response");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let scrape = prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_string())))
        .expect("exposition format parses");
    let value = |name: &str, label: Option<(&str, &str)>| -> f64 {
        scrape
            .samples
            .iter()
            .find(|s| s.metric == name && label.is_none_or(|(k, v)| s.labels.get(k) == Some(v)))
            .map(|s| match s.value {
                prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Untyped(v) => v,
                _ => f64::NAN,
            })
            .unwrap_or_else(|| panic!("{name} {label:?} in:\n{body}"))
    };
    let b2addr = netns::backend4(1);
    let b1addr = netns::backend4(0);
    assert_eq!(value("xdplb_backend_up", Some(("backend", &b2addr))), 0.0);
    assert_eq!(value("xdplb_backend_up", Some(("backend", &b1addr))), 1.0);
    assert!(value("xdplb_backend_flows_total", Some(("backend", &b1addr))) > 0.0);
    assert!(value("xdplb_service_packets_total", Some(("service", "echo"))) > 0.0);
    assert!(value("xdplb_packets_total", Some(("reason", "fwd_dr"))) > 0.0);
    assert_eq!(value("xdplb_config_generation", None), 1.0);
    assert!(value("xdplb_last_reconcile_timestamp_seconds", None) > 1.0e9);
}

#[test]
fn backends_added_and_removed_by_editing_the_file_drop_nothing() {
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut lab = Lab::new("xr", &[0, 1]);
    let load = lab.load();
    std::thread::sleep(Duration::from_millis(500));

    lab.config.write(&config(&[0, 1, 2], ""));
    lab.topo
        .wait_log("configuration 2 applied", 1, Duration::from_secs(5));
    std::thread::sleep(Duration::from_secs(1));
    let t_added = load.now();
    std::thread::sleep(Duration::from_secs(1));

    // Remove b1: its established connections finish on it (it still serves), new ones
    // avoid it.
    lab.config.write(&config(&[1, 2], ""));
    lab.topo
        .wait_log("configuration 3 applied", 1, Duration::from_secs(5));
    let t_removed = load.now();
    std::thread::sleep(Duration::from_secs(1));

    // An invalid edit is rejected and changes nothing.
    lab.config.write("interfaces: []\nservices: nope\n");
    lab.topo.wait_log(
        "rejected, the running configuration stays",
        1,
        Duration::from_secs(5),
    );
    // `xdplb reload` reports the errors; SIGHUP is logged the same way.
    let out = lab.xdplb(&["reload"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("line 2: services"), "{err}");
    lab.topo.signal_director(libc::SIGHUP);
    lab.topo
        .wait_log("reload (SIGHUP) rejected", 1, Duration::from_secs(5));
    std::thread::sleep(Duration::from_millis(500));

    // A restarted controller keeps the removed backend for its flows too.
    lab.config.write(&config(&[1, 2], ""));
    lab.topo.kill_director();
    let config = lab.config.path().to_path_buf();
    lab.topo.start_director(&lab.xdplb.clone(), &config);
    lab.topo
        .wait_log("xdplb running", 2, Duration::from_secs(20));
    std::thread::sleep(Duration::from_millis(500));
    let report = load.stop();

    assert_clean("reloads", &report);
    let added = report.served_since(t_added);
    assert!(added.contains_key("b3"), "b3 joined: {added:?}");
    let after = report.served_since(t_removed);
    assert!(!after.contains_key("b1"), "b1 left: {after:?}");
    assert!(
        after.contains_key("b2") && after.contains_key("b3"),
        "the others serve: {after:?}"
    );
    assert_eq!(
        lab.state(0),
        "removed",
        "b1 stays only for its established connections"
    );
}

/// The ring fast path under the same load, begun once a sweep has cleaned the slots: the
/// connections open by the ring, unrecorded; a backend added (slots move to it) and one
/// removed (its connections finish on it) break nothing — moved slots hold their old
/// backend for connections the flow table lacks, and record them.
#[test]
fn ring_fast_path_keeps_every_connection_across_backend_changes() {
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let fast = |backends: &[usize]| {
        config(backends, "").replace("    mode: dr\n", "    mode: dr\n    ring_fast_path: true\n")
    };
    let lab = Lab::new("xf", &[0, 1]);
    lab.config.write(&fast(&[0, 1]));
    lab.topo
        .wait_log("configuration 2 applied", 1, Duration::from_secs(5));
    let ring = |lab: &Lab| {
        lab.topo.stats(&lab.xdplb)["reasons"]["fwd_dr_ring"]
            .as_u64()
            .expect("fwd_dr_ring")
    };
    // A sweep (every 5 s) after the 1 s grace cleans the new fast service's slots; `status`
    // shows the fast path and its dirty slots.
    let dirty = |lab: &Lab| {
        let out = lab.xdplb(&["status", "--json", "--interval", "100ms"]);
        let st: serde_json::Value = serde_json::from_slice(&out.stdout).expect("status --json");
        let fast = &st["services"][0]["ring_fast_path"];
        assert_eq!(fast["on"].as_bool(), Some(true), "{st}");
        fast["dirty_slots"].as_u64().expect("dirty_slots")
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while dirty(&lab) > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the new service's slots never turned clean"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let table = String::from_utf8(lab.xdplb(&["status", "--interval", "100ms"]).stdout).unwrap();
    assert!(table.contains("ring fast path (0 dirty slots)"), "{table}");
    let text = lb_userspace::metrics::render(lab.topo.pin_dir.clone(), Default::default());
    let line = text
        .lines()
        .find(|l| l.starts_with("xdplb_service_ring_dirty_slots{"))
        .unwrap_or_else(|| panic!("dirty slots gauge in:\n{text}"));
    assert!(line.ends_with(" 0.0"), "{line}");

    // Every slot is clean: the connections begin on the fast path, unrecorded, and keep
    // their backends across the changes by their slots' held backends.
    let load = lab.load();
    std::thread::sleep(Duration::from_secs(1));
    lab.config.write(&fast(&[0, 1, 2]));
    lab.topo
        .wait_log("configuration 3 applied", 1, Duration::from_secs(5));
    std::thread::sleep(Duration::from_secs(1));
    let t_added = load.now();
    std::thread::sleep(Duration::from_secs(1));
    lab.config.write(&fast(&[1, 2]));
    lab.topo
        .wait_log("configuration 4 applied", 1, Duration::from_secs(5));
    let t_removed = load.now();
    // Long enough for sweeps to clean the slots no connection holds any more.
    std::thread::sleep(Duration::from_secs(7));
    let before = ring(&lab);
    std::thread::sleep(Duration::from_secs(1));
    let report = load.stop();

    assert_clean("ring fast path", &report);
    assert!(ring(&lab) > before, "still by the ring after the changes");
    let added = report.served_since(t_added);
    assert!(added.contains_key("b3"), "b3 joined: {added:?}");
    let after = report.served_since(t_removed);
    assert!(!after.contains_key("b1"), "b1 left: {after:?}");
}

#[test]
fn controller_sigkill_and_restart_lose_nothing_and_checks_resume() {
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut lab = Lab::new("xk", &[0, 1, 2]);
    let before = lab.attached_program();
    let load = lab.load();
    std::thread::sleep(Duration::from_millis(500));

    lab.topo.kill_director();
    // Forwarding goes on with no controller at all.
    std::thread::sleep(Duration::from_secs(1));
    let config = lab.config.path().to_path_buf();
    lab.topo.start_director(&lab.xdplb.clone(), &config);
    lab.topo
        .wait_log("program unchanged", 1, Duration::from_secs(20));
    lab.topo
        .wait_log("xdplb running", 2, Duration::from_secs(20));
    assert_eq!(
        lab.attached_program(),
        before,
        "same program: left in place"
    );
    std::thread::sleep(Duration::from_millis(500));

    // Health checking resumed: a failure is noticed again.
    let t0 = load.now();
    lab.servers[2].set_accepting(false);
    std::thread::sleep(Duration::from_millis(FALL * INTERVAL_MS) + Duration::from_secs(1));
    assert_eq!(lab.state(2), "down");
    let t_gone = load.now();
    std::thread::sleep(Duration::from_millis(500));
    let report = load.stop();
    lab.servers[2].set_accepting(true);

    assert!(
        report.broken_sessions().is_empty() && report.lost_bytes() == 0,
        "{}",
        report.summary()
    );
    assert!(
        report
            .failed_attempts()
            .iter()
            .all(|(at, _)| *at >= t0 && *at < t_gone),
        "new connections failed only while b3 was failing: {}",
        report.summary()
    );
    assert!(!report.served_since(t_gone).contains_key("b3"));
}

#[test]
fn program_upgrade_replaces_the_program_atomically_under_load() {
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut lab = Lab::new("xu", &[0, 1, 2]);
    let before = lab.attached_program();
    let load = lab.load();
    std::thread::sleep(Duration::from_millis(500));

    // A controller with a different program (here: another load-time constant, the UDP
    // idle timeout, which is compiled into the verified program) takes over.
    lab.topo.kill_director();
    lab.config
        .write(&config(&[0, 1, 2], "udp_idle_timeout: 45s\n"));
    let config = lab.config.path().to_path_buf();
    lab.topo.start_director(&lab.xdplb.clone(), &config);
    lab.topo.wait_log(
        "running program replaced atomically",
        1,
        Duration::from_secs(20),
    );
    lab.topo
        .wait_log("xdplb running", 2, Duration::from_secs(20));
    let after = lab.attached_program();
    assert_ne!(after, before, "the link now runs the new program");
    std::thread::sleep(Duration::from_secs(1));

    // And drain over the control socket, while we are here.
    let out = lab.xdplb(&["drain", "echo", &netns::backend4(0)]);
    assert!(out.status.success(), "{out:?}");
    let t_drained = load.now();
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(lab.state(0), "drained");
    let bad = lab.xdplb(&["drain", "echo", "198.18.9.9"]);
    assert!(!bad.status.success());
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("has no backend 198.18.9.9"),
        "{bad:?}"
    );
    // A second controller for the same director is refused (and changes nothing).
    let second = std::process::Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", lab.topo.ns("dir")))
        .arg(&lab.xdplb)
        .arg("--pin-dir")
        .arg(&lab.topo.pin_dir)
        .args(["run", "--config"])
        .arg(lab.config.path())
        .output()
        .expect("second xdplb run");
    assert!(!second.status.success());
    assert!(
        String::from_utf8_lossy(&second.stderr).contains("another `xdplb run`"),
        "{second:?}"
    );
    let report = load.stop();
    assert_clean("upgrade", &report);
    assert!(
        !report
            .served_since(t_drained + Duration::from_millis(100))
            .contains_key("b1"),
        "drained b1 takes no new connections: {:?}",
        report.served_since(t_drained)
    );
    // Established connections on b1 lived on through the drain (assert_clean above).
    assert!(report.sessions.iter().any(|s| s.backend == "b1"));
}
