//! Schedulers end to end (DR lab, real TCP/UDP): wrr split, sh stickiness, persistence
//! across a drain and its expiry, and wlc steering new connections away from a backend
//! that holds many long-lived ones. The scheduler changes by hot reload between phases.

use std::{collections::BTreeMap, net::SocketAddr, time::Duration};

use lb_tests::{
    load::{EchoServer, Load, ECHO_PORT},
    netns::{self, ConfigFile, Topology, TCP_PORT, UDP_PORT, VIP4},
};

fn config(web: &str, dns: &str, echo: &str, echo_backends: &[usize]) -> String {
    let backends = |weights: &[u32]| -> String {
        (0..3)
            .map(|i| {
                format!(
                    "      - {{address: {}, weight: {}}}\n",
                    netns::backend4(i),
                    weights[i]
                )
            })
            .collect()
    };
    let echo_list: String = echo_backends
        .iter()
        .map(|&i| format!("      - address: {}\n", netns::backend4(i)))
        .collect();
    format!(
        "interfaces:\n  - name: eth0\n    xdp_mode: native\nservices:\n\
         \x20 - name: web\n    vip: {VIP4}\n    port: {TCP_PORT}\n    protocol: tcp\n    mode: dr\n{web}    backends:\n{}\
         \x20 - name: dns\n    vip: {VIP4}\n    port: {UDP_PORT}\n    protocol: udp\n    mode: dr\n{dns}    backends:\n{}\
         \x20 - name: echo\n    vip: {VIP4}\n    port: {ECHO_PORT}\n    protocol: tcp\n    mode: dr\n{echo}    backends:\n{echo_list}",
        backends(&[300, 100, 100]),
        backends(&[100, 100, 100]),
    )
}

fn shares(answers: &BTreeMap<String, usize>) -> Vec<f64> {
    let total: usize = answers.values().sum();
    (1..=3)
        .map(|i| *answers.get(&format!("b{i}")).unwrap_or(&0) as f64 / total.max(1) as f64)
        .collect()
}

#[test]
fn schedulers_distribute_stick_persist_and_steer_end_to_end() {
    lb_tests::require_root();
    let xdplb = netns::xdplb_binary();
    let prefix = format!("xs{}", std::process::id());
    let mut topo = Topology::dr(&prefix, 3);
    topo.start_servers();
    topo.attach_pass(&xdplb);
    let _echo: Vec<EchoServer> = (0..3)
        .map(|i| {
            EchoServer::start(
                &topo.ns(&Topology::backend_name(i)),
                &Topology::backend_name(i),
            )
        })
        .collect();
    let file = ConfigFile::new(
        &prefix,
        &config(
            "    scheduler: wrr\n",
            "    scheduler: sh\n",
            "    scheduler: wlc\n",
            &[0],
        ),
    );
    topo.start_director(&xdplb, file.path());
    topo.wait_log("xdplb running", 1, Duration::from_secs(20));
    let cl = topo.ns("cl");

    // wrr 3:1:1 over 300 connections.
    let (answers, failures) = netns::tcp_clients(&cl, VIP4, TCP_PORT, 300);
    assert!(failures.is_empty(), "{failures:?}");
    let s = shares(&answers);
    assert!(
        (s[0] - 0.6).abs() < 0.05 && (s[1] - 0.2).abs() < 0.05 && (s[2] - 0.2).abs() < 0.05,
        "wrr 3:1:1: {answers:?}"
    );

    // sh: every UDP exchange of this client (each from a new source port) on one backend.
    let (answers, failures) = netns::udp_clients(&cl, VIP4, UDP_PORT, 60);
    assert!(failures.is_empty(), "{failures:?}");
    assert_eq!(
        answers.len(),
        1,
        "sh keeps one client on one backend: {answers:?}"
    );

    // rr ignores the weights; maglev on the source address only behaves like sh, while
    // plain maglev spreads the same client's exchanges.
    file.write(&config(
        "    scheduler: rr\n",
        "    hash_fields: [src_ip]\n",
        "    scheduler: lc\n",
        &[0],
    ));
    topo.wait_log("configuration 2 applied", 1, Duration::from_secs(5));
    let (answers, failures) = netns::tcp_clients(&cl, VIP4, TCP_PORT, 300);
    assert!(failures.is_empty(), "{failures:?}");
    assert!(
        shares(&answers)
            .iter()
            .all(|s| (s - 1.0 / 3.0).abs() < 0.05),
        "rr: {answers:?}"
    );
    let (answers, _) = netns::udp_clients(&cl, VIP4, UDP_PORT, 30);
    assert_eq!(answers.len(), 1, "hash_fields [src_ip]: {answers:?}");
    file.write(&config(
        "    scheduler: rr\n",
        "",
        "    scheduler: lc\n",
        &[0],
    ));
    topo.wait_log("configuration 3 applied", 1, Duration::from_secs(5));
    let (answers, _) = netns::udp_clients(&cl, VIP4, UDP_PORT, 60);
    assert_eq!(
        answers.len(),
        3,
        "maglev over the 5-tuple spreads: {answers:?}"
    );

    // Persistence on web (maglev would spread this client's connections over all three).
    file.write(&config(
        "    persistence: 2s\n",
        "    scheduler: sh\n",
        "    scheduler: wlc\n",
        &[0],
    ));
    topo.wait_log("configuration 4 applied", 1, Duration::from_secs(5));
    let (answers, failures) = netns::tcp_clients(&cl, VIP4, TCP_PORT, 40);
    assert!(failures.is_empty(), "{failures:?}");
    assert_eq!(
        answers.len(),
        1,
        "persistent client on one backend: {answers:?}"
    );
    let sticky = answers.keys().next().unwrap().clone();
    let sticky_addr = netns::backend4(sticky[1..].parse::<usize>().unwrap() - 1);
    // Drained: the persistent client still reaches it (as in LVS) ...
    netns::sh(&[
        xdplb.to_str().unwrap(),
        "--pin-dir",
        topo.pin_dir.to_str().unwrap(),
        "drain",
        "web",
        &sticky_addr,
    ]);
    let (answers, _) = netns::tcp_clients(&cl, VIP4, TCP_PORT, 10);
    assert_eq!(
        answers.keys().collect::<Vec<_>>(),
        vec![&sticky],
        "{answers:?}"
    );
    // ... until the template expires (2 s without a new connection).
    std::thread::sleep(Duration::from_millis(2500));
    let (answers, failures) = netns::tcp_clients(&cl, VIP4, TCP_PORT, 10);
    assert!(failures.is_empty(), "{failures:?}");
    assert!(
        !answers.contains_key(&sticky) && answers.len() == 1,
        "after expiry: a new (persistent) backend, not the drained one: {answers:?}"
    );

    // wlc: 20 long-lived connections (plus a stream of short ones) pile up on b1, the only
    // echo backend; then b2 and b3 join. New connections go to them, not to busy b1.
    let target = SocketAddr::new(VIP4.parse().unwrap(), ECHO_PORT);
    let load = Load::start(&cl, target, Duration::from_secs(30));
    std::thread::sleep(Duration::from_millis(500));
    file.write(&config(
        "    persistence: 2s\n",
        "    scheduler: sh\n",
        "    scheduler: wlc\n",
        &[0, 1, 2],
    ));
    topo.wait_log("configuration 5 applied", 1, Duration::from_secs(5));
    // Two least-connection updates (every second).
    std::thread::sleep(Duration::from_millis(2200));
    let from = load.now();
    std::thread::sleep(Duration::from_secs(3));
    let report = load.stop();
    assert!(
        report.broken_sessions().is_empty() && report.failed_attempts().is_empty(),
        "{}",
        report.summary()
    );
    let after = report.served_since(from);
    let total: usize = after.values().sum();
    let b1 = after.get("b1").copied().unwrap_or(0);
    assert!(total > 50, "{after:?}");
    assert!(
        b1 * 100 <= total * 15,
        "wlc: new connections avoid b1 with its 20 long-lived ones: {after:?}"
    );
    assert!(
        after.get("b2").copied().unwrap_or(0) > 0 && after.get("b3").copied().unwrap_or(0) > 0,
        "{after:?}"
    );
}
