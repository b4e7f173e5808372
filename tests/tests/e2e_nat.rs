//! NAT and full-NAT end to end on a two-armed director: clients on eth0, backends on eth1
//! (a separate subnet). NAT backends route via the director; full-NAT backends cannot reach
//! clients at all and only ever see the director's pool address. Real TCP and UDP, IPv4 and
//! IPv6, and 10 MiB each way checked byte for byte.

use lb_tests::netns::{self, tun_backend4, tun_backend6, Topology, TCP_PORT, UDP_PORT, VIP4, VIP6};

const CONNECTIONS: usize = 300;
const TEN_MIB: usize = 10 << 20;

fn nat_end_to_end(fullnat: bool) {
    lb_tests::require_root();
    let xdplb = netns::xdplb_binary();
    let tag = if fullnat { "xf" } else { "xn" };
    let mut topo = Topology::nat(&format!("{tag}{}", std::process::id()), 3, fullnat);
    // NAT backends see their own address as destination.
    topo.start_servers_on(|i| [tun_backend4(i), tun_backend6(i)]);
    topo.attach_pass_on(&xdplb, "dir");
    topo.attach_pass_on(&xdplb, "dir-eth1");
    topo.start_director(&xdplb, &Topology::nat_config(fullnat));
    let cl = topo.ns("cl");

    for vip in [VIP4, VIP6] {
        let tally = netns::tcp_clients(&cl, vip, TCP_PORT, CONNECTIONS);
        netns::assert_spread(
            &format!("{vip} TCP"),
            &tally,
            CONNECTIONS,
            3,
            topo.stats(&xdplb),
        );
        let (answers, failures) = netns::udp_clients(&cl, vip, UDP_PORT, 60);
        assert!(failures.is_empty(), "{vip} UDP: {failures:?}");
        assert_eq!(
            answers.values().sum::<usize>(),
            60,
            "{vip} UDP: {answers:?}"
        );
    }
    for vip in [VIP4, VIP6] {
        netns::bulk_download(&cl, vip, TEN_MIB)
            .unwrap_or_else(|e| panic!("10 MiB download from {vip}: {e}"));
        netns::bulk_upload(&cl, vip, TEN_MIB)
            .unwrap_or_else(|e| panic!("10 MiB upload to {vip}: {e}"));
    }
    let stats = topo.stats(&xdplb);
    let reasons = &stats["reasons"];
    assert!(
        reasons["fwd_nat"].as_u64().unwrap() >= 2 * CONNECTIONS as u64,
        "{stats}"
    );
    assert!(
        reasons["fwd_nat_reply"].as_u64().unwrap() >= 2 * CONNECTIONS as u64,
        "{stats}"
    );
    assert!(
        reasons["nat_flow_closed"].as_u64().unwrap() >= CONNECTIONS as u64,
        "TCP closes end NAT flows: {stats}"
    );
    // Replies are counted per service and backend: the 10 MiB downloads came back through
    // the director, and every backend answered.
    let mut reply_bytes = 0;
    for svc in stats["services"].as_array().unwrap() {
        for b in svc["backends"].as_array().unwrap() {
            assert!(b["out_packets"].as_u64().unwrap() > 0, "replies of {b}");
        }
        reply_bytes += svc["out_bytes"].as_u64().unwrap();
    }
    assert!(reply_bytes >= 2 * TEN_MIB as u64, "{stats}");
    assert!(topo.stop_director(), "xdplb run exits 0 on SIGTERM");
}

#[test]
fn nat_two_armed_tcp_udp_and_bulk_both_families() {
    nat_end_to_end(false);
}

#[test]
fn fullnat_two_armed_tcp_udp_and_bulk_both_families() {
    nat_end_to_end(true);
}

#[test]
fn nat_without_a_route_back_is_reported() {
    lb_tests::require_root();
    let xdplb = netns::xdplb_binary();
    // NAT backends that do not route via the director: their replies never come back.
    let mut topo = Topology::nat_with(&format!("xr{}", std::process::id()), 3, false, false);
    topo.start_servers_on(|i| [tun_backend4(i), tun_backend6(i)]);
    topo.attach_pass_on(&xdplb, "dir");
    topo.attach_pass_on(&xdplb, "dir-eth1");
    topo.start_director(&xdplb, &Topology::nat_config(false));
    let cl = topo.ns("cl");
    let clients = std::thread::spawn(move || netns::tcp_clients(&cl, VIP4, TCP_PORT, 6));
    let log = topo.director_log.clone();
    netns::wait_for(
        "the director's warning about missing replies",
        std::time::Duration::from_secs(20),
        || {
            log.lock()
                .unwrap()
                .contains("no reply came back through the director")
        },
    );
    let (_, failures) = clients.join().expect("clients");
    assert!(
        !failures.is_empty(),
        "without a route back, connections fail"
    );
}
