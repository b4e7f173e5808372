//! TUN end to end: client — director — router — backends on another subnet. The director
//! encapsulates (IPIP / IPv6-in-IPv6), the router routes, backends run `xdplb decap` and
//! answer clients directly. Large transfers both ways exercise the MTU path (the director's
//! ICMP "too big" makes the client shrink its segments).

use lb_tests::netns::{self, Topology, TCP_PORT, VIP4, VIP6};

const CONNECTIONS: usize = 300;
const MIB: usize = 1 << 20;

#[test]
fn tun_balances_tcp_and_carries_bulk_transfers_both_ways() {
    lb_tests::require_root();
    let xdplb = netns::xdplb_binary();
    let mut topo = Topology::tun(&format!("xt{}", std::process::id()), 3);
    topo.start_servers();
    topo.attach_pass(&xdplb);
    topo.start_decap(&xdplb);
    topo.start_director(&xdplb, &Topology::tun_config());
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
    }
    for vip in [VIP4, VIP6] {
        netns::bulk_download(&cl, vip, MIB)
            .unwrap_or_else(|e| panic!("1 MiB download from {vip}: {e}"));
        netns::bulk_upload(&cl, vip, MIB).unwrap_or_else(|e| panic!("1 MiB upload to {vip}: {e}"));
    }

    let stats = topo.stats(&xdplb);
    let reasons = &stats["reasons"];
    assert!(
        reasons["fwd_tun"].as_u64().unwrap() >= 2 * CONNECTIONS as u64,
        "{stats}"
    );
    assert!(
        reasons["icmp_too_big_sent"].as_u64().unwrap() >= 2,
        "uploads hit the MTU path (v4 and v6): {stats}"
    );
    assert_eq!(reasons["pass_fib_failed"].as_u64().unwrap(), 0, "{stats}");
    assert!(topo.stop_director(), "xdplb run exits 0 on SIGTERM");
}
