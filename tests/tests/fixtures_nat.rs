//! NAT and full-NAT fixtures through BPF_PROG_TEST_RUN, in a namespace with its own routes.
//! Expected packets are built by etherparse, which computes every checksum itself: an exact
//! byte match proves the director's incremental updates right.

use etherparse::IpHeaders;
use lb_common::reason;
use lb_tests::{
    netns::{wait_for, FibLab, GW_MAC, UP_MAC},
    Harness, Pkt, TCP_FIN, TCP_RST, XDP_PASS, XDP_TX,
};

const CONFIG: &str = "
interfaces:
  - name: up0
flow_table_size: 1024
fullnat:
  pool: [198.18.5.100, 2001:db8:5::100]
  port_min: 20000
  port_max: 21023
services:
  - name: nat
    vip: 198.18.0.100
    port: 80
    protocol: tcp
    mode: nat
    backends:
      - address: 198.18.5.11
        port: 8080
  - name: nat-udp
    vip: 198.18.0.100
    port: 53
    protocol: udp
    mode: nat
    backends:
      - address: 198.18.5.12
  - name: nat6
    vip: 2001:db8::100
    port: 80
    protocol: tcp
    mode: nat
    backends:
      - address: 2001:db8:5::11
  - name: full
    vip: 198.18.0.101
    port: 80
    protocol: tcp
    mode: fullnat
    backends:
      - address: 198.18.5.13
  - name: full6
    vip: 2001:db8::101
    port: 80
    protocol: tcp
    mode: fullnat
    backends:
      - address: 2001:db8:5::13
  - name: nat-b
    vip: 198.18.0.102
    port: 80
    protocol: tcp
    mode: nat
    backends:
      - address: 198.18.5.14
        port: 8080
  - name: nat-any
    vip: 198.18.0.103
    port: 0
    protocol: tcp
    mode: nat
    backends:
      - address: 198.18.5.15
        port: 8080
  - name: nat-any-same
    vip: 198.18.0.104
    port: 0
    protocol: tcp
    mode: nat
    backends:
      - address: 198.18.5.16
";

/// How long a fixture waits for what happens "within the second" (the flow cache's slots,
/// the reply mapping's check): the second and room for a slow machine.
const SECOND_AND_A_HALF: std::time::Duration = std::time::Duration::from_millis(1500);

fn harness() -> (Harness, u32) {
    let mut h = Harness::new(CONFIG);
    FibLab::register_up0(&mut h);
    let up0 = lb_userspace::netlink::ifindex("up0").expect("up0");
    (h, up0)
}

/// `p` with another TTL / hop limit (a router's decrement).
fn with_ttl(p: &Pkt, ttl: u8) -> Vec<u8> {
    let mut hdrs = p.headers();
    match hdrs {
        IpHeaders::Ipv4(ref mut ip, _) => ip.time_to_live = ttl,
        IpHeaders::Ipv6(ref mut ip, _) => ip.hop_limit = ttl,
    }
    p.build_with(hdrs)
}

/// What the director sends: same packet, new addresses/ports, TTL 63, to the gateway.
fn expect(p: &Pkt, src: &str, sport: u16, dst: &str, dport: u16) -> Vec<u8> {
    let mut q = p.with_macs(UP_MAC, GW_MAC);
    q.src = src.parse().unwrap();
    q.dst = dst.parse().unwrap();
    q.sport = sport;
    q.dport = dport;
    with_ttl(&q, 63)
}

/// A client packet of the `nat` service from `sport` and its backend's reply, after both went
/// through (the flow and its reply mapping exist).
fn open_nat_flow(h: &Harness, up0: u32, sport: u16) -> (Pkt, Pkt) {
    open_flow_to(
        h,
        up0,
        Pkt::tcp("198.18.2.1", "198.18.0.100", sport, 80),
        "198.18.5.11",
        8080,
    )
}

/// `client`'s packet and the reply of its backend at `backend`:`port`, after both went
/// through (the flow and its reply mapping exist).
fn open_flow_to(h: &Harness, up0: u32, client: Pkt, backend: &str, port: u16) -> (Pkt, Pkt) {
    let reply = reply_to(&client, backend, port);
    assert_eq!(run(h, up0, &client.build()).0, XDP_TX);
    assert_eq!(run(h, up0, &reply.build()).0, XDP_TX, "reply mapped");
    (client, reply)
}

/// The reply of the backend at `backend`:`port` to half-NAT `client`, as it arrives from
/// the gateway.
fn reply_to(client: &Pkt, backend: &str, port: u16) -> Pkt {
    Pkt {
        src: backend.parse().unwrap(),
        dst: client.src,
        sport: port,
        dport: client.sport,
        ..client.clone()
    }
    .with_macs(GW_MAC, UP_MAC)
}

/// What the director makes of a backend's `reply` to `client`: the VIP and its port as
/// the source, TTL 63, to the gateway.
fn restored(reply: &Pkt, client: &Pkt) -> Vec<u8> {
    expect(
        reply,
        &client.dst.to_string(),
        client.dport,
        &client.src.to_string(),
        client.sport,
    )
}

/// Take `reply`'s mapping away while its flow lives on, as LRU eviction would (and the
/// reply's flow-cache slot, which would answer for up to a second more).
fn evict_mapping(h: &mut Harness, up0: u32, reply: &Pkt) {
    h.director
        .maps
        .nat_replies
        .remove(&reply.key())
        .expect("mapping present");
    h.forget_cached(&lb_common::flow_cache_reply_words(&reply.key()));
    assert_eq!(run(h, up0, &reply.build()).0, XDP_PASS, "mapping gone");
}

/// The pool port a full-NAT flow left with: the source port of `out`, the director's output
/// for `p`.
fn pool_port(p: &Pkt, out: &[u8]) -> u16 {
    let l4 = if p.src.is_ipv4() { 14 + 20 } else { 14 + 40 };
    u16::from_be_bytes([out[l4], out[l4 + 1]])
}

/// `backend`'s reply (from port 80) to the full-NAT flow of `p` that reached it from
/// `pool`:`port`.
fn pool_reply(p: &Pkt, backend: &str, pool: &str, port: u16) -> Pkt {
    Pkt {
        src: backend.parse().unwrap(),
        dst: pool.parse().unwrap(),
        sport: 80,
        dport: port,
        ..p.clone()
    }
    .with_macs(GW_MAC, UP_MAC)
}

fn run(h: &Harness, up0: u32, input: &[u8]) -> (u32, Vec<u8>) {
    lb_tests::run_program_on(h.director.director_program(), input, up0)
}

#[test]
fn nat_rewrites_both_ways_with_exact_checksums() {
    lb_tests::require_root();
    FibLab::new("nat").run(|| {
        let (h, up0) = harness();
        let cases = [
            // (client packet, backend, backend port, VIP port)
            (
                Pkt::tcp("198.18.2.1", "198.18.0.100", 40000, 80),
                "198.18.5.11",
                8080,
            ),
            (
                Pkt::udp("198.18.2.1", "198.18.0.100", 40001, 53),
                "198.18.5.12",
                53,
            ),
            (
                Pkt::tcp("2001:db8:2::1", "2001:db8::100", 40000, 80),
                "2001:db8:5::11",
                80,
            ),
        ];
        for (client, backend, bport) in cases {
            let c = client.src.to_string();
            let vip = client.dst.to_string();
            let before = h.reason(reason::FWD_NAT);
            let (v, out) = run(&h, up0, &client.build());
            assert_eq!(v, XDP_TX, "{vip}: forward");
            assert_eq!(
                out,
                expect(&client, &c, client.sport, backend, bport),
                "{vip}: DNAT to {backend}:{bport}"
            );
            assert_eq!(h.reason(reason::FWD_NAT), before + 1);

            let reply = Pkt {
                src: backend.parse().unwrap(),
                dst: client.src,
                sport: bport,
                dport: client.sport,
                ..client.clone()
            }
            .with_macs(GW_MAC, UP_MAC);
            let before = h.reason(reason::FWD_NAT_REPLY);
            let (v, out) = run(&h, up0, &reply.build());
            assert_eq!(v, XDP_TX, "{vip}: reply");
            assert_eq!(
                out,
                expect(&reply, &vip, client.dport, &c, client.sport),
                "{vip}: source restored to the VIP"
            );
            assert_eq!(h.reason(reason::FWD_NAT_REPLY), before + 1);
        }
    });
}

#[test]
fn udp_without_checksum_stays_without() {
    lb_tests::require_root();
    FibLab::new("natudp").run(|| {
        let (h, up0) = harness();
        let p = Pkt::udp("198.18.2.1", "198.18.0.100", 40002, 53);
        let mut input = p.build();
        input[14 + 20 + 6..14 + 20 + 8].copy_from_slice(&[0, 0]);
        let (v, out) = run(&h, up0, &input);
        assert_eq!(v, XDP_TX);
        let mut expected = expect(&p, "198.18.2.1", 40002, "198.18.5.12", 53);
        expected[14 + 20 + 6..14 + 20 + 8].copy_from_slice(&[0, 0]);
        assert_eq!(out, expected);
    });
}

#[test]
fn fullnat_allocates_distinct_pool_ports_and_translates_replies() {
    lb_tests::require_root();
    FibLab::new("full").run(|| {
        let (h, up0) = harness();
        for (client, vip, backend, pool) in [
            ("198.18.2.1", "198.18.0.101", "198.18.5.13", "198.18.5.100"),
            (
                "2001:db8:2::1",
                "2001:db8::101",
                "2001:db8:5::13",
                "2001:db8:5::100",
            ),
        ] {
            let mut ports = std::collections::HashSet::new();
            for i in 0..50u16 {
                let p = Pkt::tcp(client, vip, 41000 + i, 80);
                let (v, out) = run(&h, up0, &p.build());
                assert_eq!(v, XDP_TX);
                let port = pool_port(&p, &out);
                assert!((20000..=21023).contains(&port), "pool port {port}");
                assert_eq!(out, expect(&p, pool, port, backend, 80), "{vip}: SNAT+DNAT");
                // The flow keeps its source port.
                assert_eq!(run(&h, up0, &p.build()).1, out, "same flow, same source");
                ports.insert(port);

                let reply = pool_reply(&p, backend, pool, port);
                let (v, back) = run(&h, up0, &reply.build());
                assert_eq!(v, XDP_TX);
                assert_eq!(
                    back,
                    expect(&reply, vip, 80, client, 41000 + i),
                    "{vip}: reply to the real client"
                );
            }
            assert_eq!(ports.len(), 50, "every flow has its own pool port");
        }
    });
}

#[test]
fn unknown_replies_and_expiring_ttl_pass_unchanged() {
    lb_tests::require_root();
    FibLab::new("natpass").run(|| {
        let (h, up0) = harness();
        let stray = Pkt::tcp("198.18.5.11", "198.18.2.9", 8080, 45000)
            .with_macs(GW_MAC, UP_MAC)
            .build();
        let before = h.reason(reason::PASS_NON_VIP);
        assert_eq!(
            run(&h, up0, &stray),
            (XDP_PASS, stray.clone()),
            "reply of no flow"
        );
        assert_eq!(h.reason(reason::PASS_NON_VIP), before + 1);

        let p = Pkt::tcp("198.18.2.1", "198.18.0.100", 40010, 80);
        let dying = with_ttl(&p, 1);
        let before = h.reason(reason::PASS_TTL_EXPIRED);
        assert_eq!(
            run(&h, up0, &dying),
            (XDP_PASS, dying.clone()),
            "TTL 1: the kernel answers"
        );
        assert_eq!(h.reason(reason::PASS_TTL_EXPIRED), before + 1);
    });
}

#[test]
fn rst_and_fin_both_ways_end_the_flow() {
    lb_tests::require_root();
    FibLab::new("natfin").run(|| {
        let (mut h, up0) = harness();
        let (client, reply) = open_nat_flow(&h, up0, 40020);

        // RST from the client: forwarded, and the mapping is gone.
        let rst = client.with_flags(TCP_RST);
        let closed = h.reason(reason::NAT_FLOW_CLOSED);
        assert_eq!(
            run(&h, up0, &rst.build()).0,
            XDP_TX,
            "the RST itself is forwarded"
        );
        assert_eq!(h.reason(reason::NAT_FLOW_CLOSED), closed + 1);
        assert_eq!(
            run(&h, up0, &reply.build()).0,
            XDP_PASS,
            "no mapping after RST"
        );

        // A new flow, closed by FIN both ways and the client's last ACK.
        assert_eq!(run(&h, up0, &client.build()).0, XDP_TX);
        assert_eq!(run(&h, up0, &client.with_flags(TCP_FIN).build()).0, XDP_TX);
        assert_eq!(run(&h, up0, &reply.with_flags(TCP_FIN).build()).0, XDP_TX);
        let closed = h.reason(reason::NAT_FLOW_CLOSED);
        assert_eq!(
            run(&h, up0, &client.build()).0,
            XDP_TX,
            "last ACK forwarded"
        );
        assert_eq!(
            h.reason(reason::NAT_FLOW_CLOSED),
            closed + 1,
            "then the flow ends"
        );
        assert_eq!(
            run(&h, up0, &reply.build()).0,
            XDP_PASS,
            "no mapping after the close"
        );

        // The backend closes first: its FIN, the client's FIN, then the backend's last ACK
        // ends the flow. Plain backend packets before its FIN end nothing.
        let closed_by = |h: &Harness, p: &[u8]| {
            let before = h.reason(reason::NAT_FLOW_CLOSED);
            assert_eq!(run(h, up0, p).0, XDP_TX);
            h.reason(reason::NAT_FLOW_CLOSED) - before
        };
        assert_eq!(closed_by(&h, &client.build()), 0);
        assert_eq!(
            closed_by(&h, &reply.build()),
            0,
            "a plain reply ends nothing"
        );
        assert_eq!(closed_by(&h, &reply.with_flags(TCP_FIN).build()), 0);
        assert_eq!(closed_by(&h, &reply.build()), 0, "FIN one way only");
        assert_eq!(closed_by(&h, &client.with_flags(TCP_FIN).build()), 0);
        assert_eq!(
            closed_by(&h, &reply.build()),
            1,
            "the backend's last ACK ends the flow"
        );
        assert_eq!(run(&h, up0, &reply.build()).0, XDP_PASS);

        // RST from the backend ends the flow too.
        assert_eq!(closed_by(&h, &client.build()), 0);
        assert_eq!(
            closed_by(&h, &reply.with_flags(TCP_RST).build()),
            1,
            "backend RST"
        );
        assert_eq!(run(&h, up0, &reply.build()).0, XDP_PASS);

        // A reply mapping lost to LRU eviction after the backend's FIN is made again by the
        // client's next packet, and still knows of that FIN: the backend's last ACK ends it.
        assert_eq!(closed_by(&h, &client.build()), 0);
        assert_eq!(closed_by(&h, &reply.with_flags(TCP_FIN).build()), 0);
        evict_mapping(&mut h, up0, &reply);
        assert_eq!(
            closed_by(&h, &client.with_flags(TCP_FIN).build()),
            0,
            "mapping made again"
        );
        assert_eq!(
            closed_by(&h, &reply.build()),
            1,
            "the backend's FIN survived the eviction"
        );
    });
}

#[test]
fn a_lost_reply_mapping_is_made_again_within_a_second() {
    lb_tests::require_root();
    FibLab::new("natlost").run(|| {
        let (mut h, up0) = harness();
        let (client, reply) = open_nat_flow(&h, up0, 40030);
        // LRU eviction takes the mapping while the flow lives on (removed by hand here).
        evict_mapping(&mut h, up0, &reply);
        // Client packets keep flowing; within about a second one of them makes it again
        // (the check is not a hash lookup on every packet).
        wait_for(
            "the client's packets to make the mapping again",
            SECOND_AND_A_HALF,
            || {
                h.director.maps.nat_replies.get(&reply.key()).is_some() || {
                    assert_eq!(run(&h, up0, &client.build()).0, XDP_TX);
                    false
                }
            },
        );
        let (verdict, out) = run(&h, up0, &reply.build());
        assert_eq!(verdict, XDP_TX, "replies translated again");
        assert_eq!(
            out,
            expect(&reply, "198.18.0.100", 80, "198.18.2.1", 40030),
            "back from the VIP"
        );
    });
}

#[test]
fn fullnat_ports_return_to_the_pool_when_the_flow_ends() {
    lb_tests::require_root();
    FibLab::new("fullrst").run(|| {
        let (h, up0) = harness();
        let p = Pkt::tcp("198.18.2.1", "198.18.0.101", 46000, 80);
        let (_, out) = run(&h, up0, &p.build());
        let port = u16::from_be_bytes([out[34], out[35]]);
        let held = lb_tests::flow_key(
            "198.18.5.13".parse().unwrap(),
            "198.18.5.100".parse().unwrap(),
            80,
            port,
            6,
        );
        assert!(
            h.director.maps.nat_replies.get(&held).is_some(),
            "port {port} held by the flow"
        );
        let rst = p.with_flags(TCP_RST);
        assert_eq!(run(&h, up0, &rst.build()).0, XDP_TX);
        assert!(
            h.director.maps.nat_replies.get(&held).is_none(),
            "port {port} free again after RST"
        );
        // The same client tuple is a new flow now, with a held port again.
        let (v, again) = run(&h, up0, &p.build());
        assert_eq!(v, XDP_TX);
        let port2 = u16::from_be_bytes([again[34], again[35]]);
        let held2 = lb_tests::flow_key(
            "198.18.5.13".parse().unwrap(),
            "198.18.5.100".parse().unwrap(),
            80,
            port2,
            6,
        );
        assert!(h.director.maps.nat_replies.get(&held2).is_some());
    });
}

#[test]
fn idle_udp_flows_end_and_their_nat_state_goes() {
    lb_tests::require_root();
    FibLab::new("udpidle").run(|| {
        let yaml = format!("udp_idle_timeout: 1s\n{CONFIG}");
        let mut h = Harness::new(&yaml);
        FibLab::register_up0(&mut h);
        let up0 = lb_userspace::netlink::ifindex("up0").expect("up0");
        let udp = Pkt::udp("198.18.2.1", "198.18.0.100", 47000, 53);
        let tcp = Pkt::tcp("198.18.2.1", "198.18.0.100", 47000, 80);
        assert_eq!(
            lb_tests::run_program_on(h.director.director_program(), &udp.build(), up0).0,
            XDP_TX
        );
        assert_eq!(
            lb_tests::run_program_on(h.director.director_program(), &tcp.build(), up0).0,
            XDP_TX
        );
        let reply = lb_tests::flow_key(
            "198.18.5.12".parse().unwrap(),
            "198.18.2.1".parse().unwrap(),
            53,
            47000,
            17,
        );
        assert!(
            h.director.maps.nat_replies.get(&reply).is_some(),
            "UDP reply mapping"
        );
        let new_flows = |h: &Harness| -> u64 {
            (0..h.desired.services.len() as u32)
                .map(|s| h.new_flows(s))
                .sum()
        };
        let before = new_flows(&h);
        std::thread::sleep(std::time::Duration::from_millis(1300));
        // Past the timeout, the UDP flow's next packet starts a new flow; TCP is not affected.
        assert_eq!(
            lb_tests::run_program_on(h.director.director_program(), &tcp.build(), up0).0,
            XDP_TX
        );
        assert_eq!(new_flows(&h), before, "TCP flow still established");
        assert_eq!(
            lb_tests::run_program_on(h.director.director_program(), &udp.build(), up0).0,
            XDP_TX
        );
        assert_eq!(new_flows(&h), before + 1, "idle UDP flow started anew");

        // A UDP flow that never sends again is swept with its NAT state.
        std::thread::sleep(std::time::Duration::from_millis(1300));
        let swept = lb_userspace::dataplane::sweep_idle_udp(
            &mut h.director.maps,
            std::time::Duration::from_secs(1),
        )
        .unwrap();
        assert_eq!(swept, 1, "one idle UDP flow");
        assert!(
            h.director.maps.flows.get(&udp.key()).is_none(),
            "flow entry removed"
        );
        assert!(
            h.director.maps.nat_replies.get(&reply).is_none(),
            "reply mapping removed"
        );
        assert!(
            h.director.maps.flows.get(&tcp.key()).is_some(),
            "TCP flow kept"
        );
    });
}

#[test]
fn reply_route_to_the_client_is_cached_for_a_second() {
    lb_tests::require_root();
    let lab = FibLab::new("natcache");
    let ns = lab.0 .0.clone();
    lab.run(move || {
        // Per-CPU cache: stay on one CPU.
        lb_tests::pin_to(0, 0);
        let (h, up0) = harness();
        let client = Pkt::tcp("198.18.2.7", "198.18.0.100", 40300, 80);
        assert_eq!(run(&h, up0, &client.build()).0, XDP_TX, "forward");
        let reply = Pkt {
            src: "198.18.5.11".parse().unwrap(),
            dst: client.src,
            sport: 8080,
            dport: client.sport,
            ..client.clone()
        }
        .with_macs(GW_MAC, UP_MAC);
        let reply_mac = |h: &Harness| {
            let (v, out) = run(h, up0, &reply.build());
            assert_eq!(v, XDP_TX, "reply sent");
            <[u8; 6]>::try_from(&out[..6]).unwrap()
        };
        assert_eq!(reply_mac(&h), GW_MAC, "the FIB's answer");

        // The gateway toward the client changes its MAC: within the second the cached hop
        // is used, after it the FIB's new answer.
        let new_gw = "02:99:00:00:00:fc";
        lb_tests::netns::replace_up0_neighbour(&ns, "198.18.0.1", new_gw);
        assert_eq!(reply_mac(&h), GW_MAC, "cached within the second");
        std::thread::sleep(std::time::Duration::from_millis(1100));
        assert_eq!(
            reply_mac(&h),
            [0x02, 0x99, 0, 0, 0, 0xfc],
            "a stale entry is refreshed from the FIB"
        );
    });
}

/// A reply that misses the flow cache (every full-NAT reply) takes its next hop from its
/// flow's reply mapping, where the first one kept the FIB's answer (`NatReply::hop`), not
/// from the per-CPU client slots: a hop written into the mapping is what the next replies
/// use, on either CPU, while fresh and while they fit its MTU; a second later the FIB
/// answers again and the mapping keeps that. Both families.
#[test]
fn a_reply_flows_next_hop_is_kept_in_its_mapping() {
    lb_tests::require_root();
    FibLab::new("nathop").run(|| {
        lb_tests::pin_to(0, 0);
        let (mut h, up0) = harness();
        let marker = [0x02, 0x99, 0, 0, 0, 0xfd];
        for (client, vip, backend, pool) in [
            ("198.18.2.9", "198.18.0.101", "198.18.5.13", "198.18.5.100"),
            (
                "2001:db8:2::9",
                "2001:db8::101",
                "2001:db8:5::13",
                "2001:db8:5::100",
            ),
        ] {
            let p = Pkt::tcp(client, vip, 41500, 80);
            let (v, out) = run(&h, up0, &p.build());
            assert_eq!(v, XDP_TX, "{vip}: forward");
            let reply = pool_reply(&p, backend, pool, pool_port(&p, &out));
            let reply_mac = |h: &Harness| {
                let (v, out) = run(h, up0, &reply.build());
                assert_eq!(v, XDP_TX, "{vip}: reply sent");
                <[u8; 6]>::try_from(&out[..6]).unwrap()
            };
            let mapping = |h: &Harness| h.director.maps.nat_replies.get(&reply.key()).unwrap();
            assert_eq!(reply_mac(&h), GW_MAC, "{vip}: the FIB's answer");
            let kept = mapping(&h).hop;
            assert_eq!(
                (kept.dmac, kept.smac, kept.ifindex),
                (GW_MAC, UP_MAC, up0),
                "{vip}: kept in the mapping"
            );
            assert!(kept.mtu >= 1500, "{vip}: with the route's MTU");

            let mut m = mapping(&h);
            m.hop.dmac = marker;
            h.director.maps.nat_replies.insert(&reply.key(), m).unwrap();
            assert_eq!(reply_mac(&h), marker, "{vip}: the mapping's hop answers");
            lb_tests::pin_to(0, 1);
            assert_eq!(reply_mac(&h), marker, "{vip}: on any CPU");
            lb_tests::pin_to(0, 0);

            // A hop whose MTU the reply exceeds does not answer: the FIB does (and its
            // answer is kept).
            m.hop.mtu = 20;
            h.director.maps.nat_replies.insert(&reply.key(), m).unwrap();
            assert_eq!(reply_mac(&h), GW_MAC, "{vip}: too big for the kept hop");
            assert_eq!(mapping(&h).hop, kept, "{vip}: the answer kept again");

            // A hop kept for another client (its mapping reused by the LRU before the
            // write) does not answer.
            m.hop = mapping(&h).hop;
            m.hop.dmac = marker;
            m.hop.client_tag ^= 1;
            h.director.maps.nat_replies.insert(&reply.key(), m).unwrap();
            assert_eq!(reply_mac(&h), GW_MAC, "{vip}: another client's hop");

            m.hop = mapping(&h).hop;
            m.hop.dmac = marker;
            h.director.maps.nat_replies.insert(&reply.key(), m).unwrap();
            assert_eq!(reply_mac(&h), marker, "{vip}: fresh again");
            std::thread::sleep(std::time::Duration::from_millis(1100));
            assert_eq!(
                reply_mac(&h),
                GW_MAC,
                "{vip}: stale after a second: the FIB"
            );
            assert_eq!(mapping(&h).hop.dmac, GW_MAC, "{vip}: and kept");
        }
    });
}

/// NAT flows are answered from the flow cache (`FLOW_CACHE`) after a table hit, as DR and
/// TUN flows are: with the table entry taken away behind the cache's back, the client's
/// packets stay the same flow (no new one scheduled) until the slot ends, which is when the
/// reply mapping is due to be made sure of (within the second): the lost mapping is then
/// made again. Without NAT in the cache the first packet after the removal is a new flow.
#[test]
fn nat_flows_are_cached_until_their_reply_mapping_is_due() {
    lb_tests::require_root();
    FibLab::new("natflowc").run(|| {
        lb_tests::pin_to(0, 0);
        let (mut h, up0) = harness();
        let (client, reply) = open_nat_flow(&h, up0, 40040);
        let (verdict, out) = run(&h, up0, &client.build());
        assert_eq!(verdict, XDP_TX, "table hit: the slot is filled");
        let flows = h.new_flows(0);
        h.director
            .maps
            .flows
            .remove(&client.key())
            .expect("flow in the table");
        evict_mapping(&mut h, up0, &reply);
        assert_eq!(
            run(&h, up0, &client.build()),
            (XDP_TX, out),
            "the cache answers, rewritten as before"
        );
        assert_eq!(h.new_flows(0), flows, "no new flow: the cache answered");
        wait_for("the table to decide again", SECOND_AND_A_HALF, || {
            h.new_flows(0) != flows || {
                assert_eq!(run(&h, up0, &client.build()).0, XDP_TX);
                false
            }
        });
        assert_eq!(
            run(&h, up0, &reply.build()).0,
            XDP_TX,
            "and the mapping is made again"
        );
    });
}

/// A NAT flow's cached slot does not outlive its close: the backend's RST, seen on another
/// CPU, empties it on every CPU, so the client's next packet is a new flow with a new reply
/// mapping (answered from the slot, it would reach the backend with no mapping for its
/// reply); and a flow the client closes first ends at its last ACK.
#[test]
fn a_nat_flows_close_reaches_its_cached_slot() {
    lb_tests::require_root();
    FibLab::new("natcclose").run(|| {
        lb_tests::pin_to(0, 0);
        let (h, up0) = harness();
        let (client, reply) = open_nat_flow(&h, up0, 40050);
        assert_eq!(run(&h, up0, &client.build()).0, XDP_TX, "slot filled");
        let flows = h.new_flows(0);
        lb_tests::pin_to(0, 1);
        let closed = h.reason(reason::NAT_FLOW_CLOSED);
        assert_eq!(run(&h, up0, &reply.with_flags(TCP_RST).build()).0, XDP_TX);
        assert_eq!(h.reason(reason::NAT_FLOW_CLOSED), closed + 1, "backend RST");
        lb_tests::pin_to(0, 0);
        assert_eq!(run(&h, up0, &client.build()).0, XDP_TX);
        assert_eq!(h.new_flows(0), flows + 1, "the next packet is a new flow");
        assert_eq!(run(&h, up0, &reply.build()).0, XDP_TX, "with its mapping");

        // Cached again, then closed by the client first: FIN, the backend's FIN, and the
        // client's last ACK, which the table sees.
        assert_eq!(run(&h, up0, &client.build()).0, XDP_TX, "slot filled");
        assert_eq!(run(&h, up0, &client.with_flags(TCP_FIN).build()).0, XDP_TX);
        assert_eq!(run(&h, up0, &reply.with_flags(TCP_FIN).build()).0, XDP_TX);
        let closed = h.reason(reason::NAT_FLOW_CLOSED);
        assert_eq!(run(&h, up0, &client.build()).0, XDP_TX, "last ACK");
        assert_eq!(
            h.reason(reason::NAT_FLOW_CLOSED),
            closed + 1,
            "ends the flow"
        );
    });
}

/// A half-NAT reply is answered from the flow cache (no `NAT_REPLIES` lookup) for up to a
/// second after the mapping answered it: with the mapping taken away, the next replies are
/// still restored exactly, and within the second they pass (the mapping decides again).
/// Both families. Without the reply-side cache the first reply after the removal passes.
#[test]
fn nat_replies_are_cached_for_up_to_a_second() {
    lb_tests::require_root();
    FibLab::new("natrcache").run(|| {
        lb_tests::pin_to(0, 0);
        let (mut h, up0) = harness();
        let flows = [
            (
                Pkt::tcp("198.18.2.1", "198.18.0.100", 40060, 80),
                "198.18.5.11",
                8080,
            ),
            (
                Pkt::tcp("2001:db8:2::1", "2001:db8::100", 40060, 80),
                "2001:db8:5::11",
                80,
            ),
        ];
        for (client, backend, port) in flows {
            let (client, reply) = open_flow_to(&h, up0, client, backend, port);
            // The reply above filled the slot (the mapping answered it).
            h.director
                .maps
                .nat_replies
                .remove(&reply.key())
                .expect("mapping present");
            let replied = h.reason(reason::FWD_NAT_REPLY);
            assert_eq!(
                run(&h, up0, &reply.build()),
                (XDP_TX, restored(&reply, &client)),
                "{backend}: the cache answers, restored exactly"
            );
            assert_eq!(h.reason(reason::FWD_NAT_REPLY), replied + 1);
            wait_for(
                &format!("{backend}: the mapping to decide again"),
                SECOND_AND_A_HALF,
                || run(&h, up0, &reply.build()).0 != XDP_TX,
            );
        }
    });
}

/// A cached reply is checked against the packet: two backends replying from the same port
/// to the same client address and port share the slot's words, and each reply gets its
/// own VIP back (the slot's backend must be the packet's source). An every-port service
/// whose backend has its own port is never answered from the cache (the client's port is
/// in the mapping only: the slot is filled only where the service and backend restore what
/// the mapping does, and a hit checks that again); one whose backend keeps the port is,
/// with that port.
#[test]
fn cached_replies_restore_their_own_flows_vip_and_port() {
    lb_tests::require_root();
    FibLab::new("natrown").run(|| {
        lb_tests::pin_to(0, 0);
        let (mut h, up0) = harness();
        let (a, a_reply) = open_nat_flow(&h, up0, 40070);
        let (b, b_reply) = open_flow_to(
            &h,
            up0,
            Pkt::tcp("198.18.2.1", "198.18.0.102", 40070, 80),
            "198.18.5.14",
            8080,
        );
        assert_eq!(
            lb_common::flow_cache_reply_words(&a_reply.key()),
            lb_common::flow_cache_reply_words(&b_reply.key()),
            "the two replies share their slot's words"
        );
        for _ in 0..3 {
            for (client, reply) in [(&a, &a_reply), (&b, &b_reply)] {
                assert_eq!(
                    run(&h, up0, &reply.build()),
                    (XDP_TX, restored(reply, client)),
                    "{}: its own VIP",
                    reply.src
                );
            }
        }
        // Every-port services: the client's destination port is restored as it was.
        for (vip, backend, port) in [
            ("198.18.0.103", "198.18.5.15", 8080),
            ("198.18.0.104", "198.18.5.16", 443),
        ] {
            let client = Pkt::tcp("198.18.2.1", vip, 40071, 443);
            let (client, reply) = open_flow_to(&h, up0, client, backend, port);
            assert_eq!(
                run(&h, up0, &reply.build()),
                (XDP_TX, restored(&reply, &client)),
                "{vip}: port 443 back"
            );
            h.director
                .maps
                .nat_replies
                .remove(&reply.key())
                .expect("mapping present");
            let cached = run(&h, up0, &reply.build()).0 == XDP_TX;
            assert_eq!(
                cached,
                port == 443,
                "{vip}: answered from the cache only where the backend keeps the port"
            );
        }
    });
}

/// The close of a half-NAT flow reaches its replies' slots on every CPU: after the client's
/// RST, the backend's FIN or its RST (each seen on CPU 0), replies that CPU 1 had cached
/// go to the mapping again — after a RST they pass (no mapping), and after the backend's
/// FIN and the client's, the backend's last ACK on CPU 1 ends the flow. Answered from the
/// slot, each would be restored as if the flow were open.
#[test]
fn a_nat_flows_close_reaches_its_cached_replies() {
    lb_tests::require_root();
    FibLab::new("natrclose").run(|| {
        let cached_on_1 = |h: &Harness, up0: u32, reply: &Pkt| {
            lb_tests::pin_to(0, 1);
            for _ in 0..2 {
                assert_eq!(run(h, up0, &reply.build()).0, XDP_TX, "CPU 1 replies");
            }
            lb_tests::pin_to(0, 0);
        };
        lb_tests::pin_to(0, 0);
        let (h, up0) = harness();
        for (sport, client_resets) in [(40080, true), (40081, false)] {
            let (client, reply) = open_nat_flow(&h, up0, sport);
            cached_on_1(&h, up0, &reply);
            let rst = if client_resets { &client } else { &reply };
            assert_eq!(run(&h, up0, &rst.with_flags(TCP_RST).build()).0, XDP_TX);
            lb_tests::pin_to(0, 1);
            assert_eq!(
                run(&h, up0, &reply.build()).0,
                XDP_PASS,
                "after the {} RST: no mapping",
                if client_resets {
                    "client's"
                } else {
                    "backend's"
                }
            );
            lb_tests::pin_to(0, 0);
        }
        // The backend's FIN, then the client's; the backend's last ACK on CPU 1.
        let (client, reply) = open_nat_flow(&h, up0, 40082);
        cached_on_1(&h, up0, &reply);
        assert_eq!(run(&h, up0, &reply.with_flags(TCP_FIN).build()).0, XDP_TX);
        assert_eq!(run(&h, up0, &client.with_flags(TCP_FIN).build()).0, XDP_TX);
        let closed = h.reason(reason::NAT_FLOW_CLOSED);
        lb_tests::pin_to(0, 1);
        assert_eq!(run(&h, up0, &reply.build()).0, XDP_TX, "last ACK");
        lb_tests::pin_to(0, 0);
        assert_eq!(
            h.reason(reason::NAT_FLOW_CLOSED),
            closed + 1,
            "the backend's last ACK ends the flow"
        );
    });
}

/// A full-NAT flow is answered from the flow cache too, with the source its entry chose
/// (pool address and port) kept in the slot: with the table entry taken away, its next
/// packets still leave with the same source, byte for byte, and no new flow is counted;
/// within the second the table decides again (a new flow). The backend's RST, seen on
/// another CPU, empties the slot on every CPU, so the client's next packet is a new flow.
/// Both families (the IPv6 pool address is the pool's second). Before the cache held
/// full-NAT flows the first packet after the removal was a new flow with another port.
#[test]
fn fullnat_flows_are_cached_with_their_source() {
    lb_tests::require_root();
    FibLab::new("fullcache").run(|| {
        lb_tests::pin_to(0, 0);
        let (mut h, up0) = harness();
        for (service, client, vip, backend, pool) in [
            (
                3,
                "198.18.2.1",
                "198.18.0.101",
                "198.18.5.13",
                "198.18.5.100",
            ),
            (
                4,
                "2001:db8:2::1",
                "2001:db8::101",
                "2001:db8:5::13",
                "2001:db8:5::100",
            ),
        ] {
            let p = Pkt::tcp(client, vip, 47000, 80);
            let (v, first) = run(&h, up0, &p.build());
            assert_eq!(v, XDP_TX, "{vip}: new flow");
            let port = pool_port(&p, &first);
            assert_eq!(
                first,
                expect(&p, pool, port, backend, 80),
                "{vip}: SNAT+DNAT"
            );
            assert_eq!(
                run(&h, up0, &p.build()),
                (XDP_TX, first.clone()),
                "table hit"
            );
            let flows = h.new_flows(service);
            h.director
                .maps
                .flows
                .remove(&p.key())
                .expect("flow in the table");
            assert_eq!(
                run(&h, up0, &p.build()),
                (XDP_TX, first.clone()),
                "{vip}: the cache answers with the flow's own source"
            );
            assert_eq!(h.new_flows(service), flows, "{vip}: no new flow");
            wait_for("the table to decide again", SECOND_AND_A_HALF, || {
                let out = run(&h, up0, &p.build());
                h.new_flows(service) != flows || {
                    assert_eq!(out, (XDP_TX, first.clone()), "{vip}: while cached");
                    false
                }
            });

            // Cached again (its second packet fills the slot); the backend resets on CPU 1.
            let (_, out) = run(&h, up0, &p.build());
            assert_eq!(
                run(&h, up0, &p.build()),
                (XDP_TX, out.clone()),
                "slot filled"
            );
            let reply = pool_reply(&p, backend, pool, pool_port(&p, &out));
            let flows = h.new_flows(service);
            lb_tests::pin_to(0, 1);
            assert_eq!(run(&h, up0, &reply.with_flags(TCP_RST).build()).0, XDP_TX);
            lb_tests::pin_to(0, 0);
            assert_eq!(run(&h, up0, &p.build()).0, XDP_TX);
            assert_eq!(
                h.new_flows(service),
                flows + 1,
                "{vip}: after the backend's RST the next packet is a new flow"
            );
        }
    });
}

/// Clients of the `nat` service (from 198.18.2.1) whose replies' mappings all hash to one
/// set of `NAT_REPLIES`, `n` of them, with their replies.
fn same_reply_set_flows(h: &Harness, n: usize) -> Vec<(Pkt, Pkt)> {
    let replies = &h.director.maps.nat_replies;
    let bits = replies.sets().trailing_zeros();
    let set_of = |k: &lb_common::FlowKey| {
        let words: [u64; 5] = bytemuck::cast(*k);
        lb_common::flow_table::set_of(lb_common::flow_table::hash(&words), bits)
    };
    let pair = |sport: u16| {
        let client = Pkt::tcp("198.18.2.1", "198.18.0.100", sport, 80);
        let reply = reply_to(&client, "198.18.5.11", 8080);
        (client, reply)
    };
    let target = set_of(&pair(30000).1.key());
    let out: Vec<_> = (30000..60000)
        .map(pair)
        .filter(|(_, r)| set_of(&r.key()) == target)
        .take(n)
        .collect();
    assert_eq!(out.len(), n, "{n} replies in one set");
    out
}

/// The reply mappings are a table like the flows' (`NAT_REPLIES`, set-associative, CLOCK):
/// a full set gives a new flow's mapping the way of a mapping no reply used since it was
/// written, not one a replying connection uses; every other connection's replies are
/// still restored.
#[test]
fn a_full_reply_set_gives_a_new_mapping_the_way_no_reply_used() {
    lb_tests::require_root();
    FibLab::new("replyset").run(|| {
        let (h, up0) = harness();
        let ways = lb_common::flow_table::WAYS;
        let flows = same_reply_set_flows(&h, ways + 1);
        let (first, newcomer) = flows.split_at(ways);
        // The flow in way 9 gets no reply; the others one each (a lookup: its reference bit).
        let idle = 9;
        for (i, (client, reply)) in first.iter().enumerate() {
            if i == idle {
                assert_eq!(run(&h, up0, &client.build()).0, XDP_TX);
            } else {
                open_flow_to(&h, up0, client.clone(), "198.18.5.11", 8080);
            }
            let at = h.director.maps.nat_replies.position(&reply.key()).1;
            assert_eq!(at, Some(i), "mappings fill the ways in order");
        }
        let replies = &h.director.maps.nat_replies;
        let (set, _) = replies.position(&first[0].1.key());
        assert_eq!(
            replies.head(set).refs,
            0xffff & !(1 << idle),
            "every mapping but the idle one used"
        );
        let (client, reply) = &newcomer[0];
        open_flow_to(&h, up0, client.clone(), "198.18.5.11", 8080);
        let replies = &h.director.maps.nat_replies;
        assert_eq!(replies.position(&reply.key()).1, Some(idle), "the idle way");
        assert!(
            replies.get(&first[idle].1.key()).is_none(),
            "idle mapping gone"
        );
        for (i, (client, reply)) in first.iter().enumerate().filter(|&(i, _)| i != idle) {
            let m = replies.get(&reply.key()).expect("mapping kept");
            assert_eq!(
                m.flow(reply.key().proto),
                client.key(),
                "mapping {i} names its flow"
            );
            assert_eq!(
                run(&h, up0, &reply.build()),
                (XDP_TX, restored(reply, client)),
                "reply {i} restored"
            );
        }
    });
}

/// A full-NAT flow's source port is one no reply mapping toward that backend port holds:
/// the port its flow hash picks first, held by another mapping, is passed over for the
/// next candidate, and the flow's replies come back through the port it got.
#[test]
fn a_fullnat_source_port_a_mapping_holds_is_passed_over() {
    lb_tests::require_root();
    FibLab::new("fullheld").run(|| {
        let (mut h, up0) = harness();
        let p = Pkt::tcp("198.18.2.1", "198.18.0.101", 46100, 80);
        // The pool's IPv4 address (one) and the first candidate port, as the data plane
        // picks them (port_min + flow hash mod the range).
        let first = 20000 + (lb_common::flow_hash(&p.key()) % 1024) as u16;
        let held = lb_tests::flow_key(
            "198.18.5.13".parse().unwrap(),
            "198.18.5.100".parse().unwrap(),
            80,
            first,
            6,
        );
        let other = lb_common::NatReply {
            fullnat: 1,
            backend: 1,
            service: 3,
            ..Default::default()
        };
        h.director
            .maps
            .nat_replies
            .insert(&held, other)
            .expect("hold the port");
        let (v, out) = run(&h, up0, &p.build());
        assert_eq!(v, XDP_TX);
        let port = pool_port(&p, &out);
        assert_ne!(port, first, "the held port passed over");
        assert_eq!(
            h.director.maps.nat_replies.get(&held),
            Some(other),
            "the holder's mapping untouched"
        );
        let reply = pool_reply(&p, "198.18.5.13", "198.18.5.100", port);
        assert_eq!(
            run(&h, up0, &reply.build()),
            (
                XDP_TX,
                expect(&reply, "198.18.0.101", 80, "198.18.2.1", 46100)
            ),
            "the reply through the port the flow got"
        );
    });
}
