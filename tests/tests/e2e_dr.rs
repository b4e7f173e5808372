//! DR end to end: client — director — three backends on one L2 segment, real TCP and UDP
//! through the VIP, over veth with the director attached in native XDP mode.

use std::{net::TcpListener, time::Duration};

use lb_tests::netns::{self, Topology, DIRECTOR4, DIRECTOR6, TCP_PORT, UDP_PORT, VIP4, VIP6};

const CONNECTIONS: usize = 300;

#[test]
fn dr_balances_real_tcp_and_udp_for_ipv4_and_ipv6() {
    lb_tests::require_root();
    let xdplb = netns::xdplb_binary();
    let mut topo = Topology::dr(&format!("xe{}", std::process::id()), 3);
    topo.start_servers();
    topo.attach_pass(&xdplb);
    topo.start_director(&xdplb, &Topology::demo_config());

    let cl = topo.ns("cl");
    netns::assert_spread(
        "IPv4 TCP",
        &netns::tcp_clients(&cl, VIP4, TCP_PORT, CONNECTIONS),
        CONNECTIONS,
        3,
        "",
    );
    netns::assert_spread(
        "IPv6 TCP",
        &netns::tcp_clients(&cl, VIP6, TCP_PORT, CONNECTIONS),
        CONNECTIONS,
        3,
        "",
    );
    netns::assert_spread(
        "IPv4 UDP",
        &netns::udp_clients(&cl, VIP4, UDP_PORT, CONNECTIONS),
        CONNECTIONS,
        3,
        "",
    );
    netns::assert_spread(
        "IPv6 UDP",
        &netns::udp_clients(&cl, VIP6, UDP_PORT, CONNECTIONS),
        CONNECTIONS,
        3,
        "",
    );

    // The director's own traffic (not for a VIP) still reaches its stack.
    for addr in [DIRECTOR4, DIRECTOR6] {
        // Bound (in the director's namespace) before the client connects.
        let listener = netns::in_netns(&topo.ns("dir"), move || {
            TcpListener::bind((addr.parse::<std::net::IpAddr>().unwrap(), 2222))
                .expect("bind on director")
        })
        .join()
        .expect("bind thread");
        netns::in_netns(&cl, move || {
            let target = (addr.parse::<std::net::IpAddr>().unwrap(), 2222).into();
            std::net::TcpStream::connect_timeout(&target, Duration::from_secs(3)).map(|_| ())
        })
        .join()
        .expect("client thread")
        .unwrap_or_else(|e| panic!("connecting to the director's own address {addr}: {e}"));
        listener.accept().expect("accept on director");
    }

    // Status and stats read the pinned maps of the running director.
    let status = netns::sh(&[
        xdplb.to_str().unwrap(),
        "--pin-dir",
        topo.pin_dir.to_str().unwrap(),
        "status",
    ]);
    assert!(
        status.contains("198.18.100.100:80/tcp") && status.contains("198.18.0.11"),
        "status:\n{status}"
    );
    let stats = topo.stats(&xdplb);
    assert!(
        stats["reasons"]["fwd_dr"].as_u64().unwrap() >= 2 * CONNECTIONS as u64,
        "{stats}"
    );
    assert!(
        stats["reasons"]["pass_non_vip"].as_u64().unwrap() >= 2,
        "director's own traffic counted: {stats}"
    );

    // The bpftool inspection helper sees the pinned program, link and maps.
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/inspect.sh");
    let inspect = netns::sh(&["bash", script, topo.pin_dir.to_str().unwrap()]);
    for expected in [
        "xdp  name xdplb",
        "array  name FLOWS",
        "percpu_array  name REASONS",
    ] {
        assert!(inspect.contains(expected), "`{expected}` in:\n{inspect}");
    }

    // Every pinned map carries BTF: bpftool prints named fields. (Not TX_PORTS: the loader
    // creates the devmap without BTF; it maps an ifindex to itself.)
    for name in lb_common::maps::ALL
        .into_iter()
        .filter(|&n| n != lb_common::maps::TX_PORTS)
    {
        let path = topo.pin_dir.join(name);
        let show: serde_json::Value = serde_json::from_str(&netns::sh(&[
            "bpftool",
            "-j",
            "map",
            "show",
            "pinned",
            path.to_str().unwrap(),
        ]))
        .expect("bpftool json");
        assert!(
            show["btf_id"].as_u64().unwrap_or(0) > 0,
            "{name} has no BTF: {show}"
        );
    }
    for (name, field) in [
        ("SERVICES", "\"port_be\""),
        ("BACKENDS", "\"weight\""),
        ("SERVICE_STATS", "\"new_flows\""),
        ("IFACES", "\"src4_entropy_bits\""),
    ] {
        let path = topo.pin_dir.join(name);
        let dump = netns::sh(&["bpftool", "map", "dump", "pinned", path.to_str().unwrap()]);
        assert!(
            dump.contains(field),
            "{field} in bpftool's dump of {name}:\n{dump}"
        );
    }

    // SIGTERM detaches the program and removes every pin.
    assert!(topo.stop_director(), "xdplb run exits 0 on SIGTERM");
    assert!(!topo.pin_dir.exists(), "pins removed on exit");
    for ext in ["lock", "sock"] {
        let f = lb_userspace::run::control_path(&topo.pin_dir, ext);
        assert!(!f.exists(), "{} removed on exit", f.display());
    }
    let link = netns::sh(&["ip", "-n", &topo.ns("dir"), "-d", "link", "show", "eth0"]);
    assert!(
        !link.contains("prog/xdp"),
        "XDP detached from eth0:\n{link}"
    );
    let (_, failures) = netns::tcp_clients(&cl, VIP4, TCP_PORT, 1);
    assert_eq!(
        failures.len(),
        1,
        "without the director the VIP is unreachable (the test is not vacuous)"
    );
}
