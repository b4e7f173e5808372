//! TUN fixtures through BPF_PROG_TEST_RUN: exact outer headers (checksums computed by
//! etherparse), the MTU replies, FIB failures, ICMP error steering, and the backend-side
//! decapsulation program. The FIB lookups happen in a network namespace the test creates
//! (routes and permanent neighbours of its own), never in the host's.

use std::net::IpAddr;

use etherparse::{
    icmpv4::DestUnreachableHeader, EtherType, Ethernet2Header, Icmpv4Header, Icmpv4Type,
    Icmpv6Header, Icmpv6Type, IpNumber, Ipv4Header, Ipv6FlowLabel, Ipv6Header,
};
use lb_common::{decap_reason, reason, tunnel_hash};
use lb_tests::{
    netns::{FibLab, GW_MAC, UP_MAC},
    Harness, Pkt, CLIENT_MAC, DIRECTOR_MAC, XDP_PASS, XDP_TX,
};
use lb_userspace::{dataplane, decap::Decap};

const XDP_REDIRECT: u32 = 4;

const CONFIG: &str = "
interfaces:
  - name: up0
    tun_source: [198.18.0.3, 2001:db8:1::3]
flow_table_size: 4096
services:
  - name: web
    vip: 198.18.0.100
    port: 80
    protocol: tcp
    mode: tun
    backends:
      - address: 198.18.5.11
      - address: 198.18.5.12
  - name: web6
    vip: 2001:db8::100
    port: 80
    protocol: tcp
    mode: tun
    backends:
      - address: 2001:db8:5::11
  - name: v4-over-v6
    vip: 198.18.0.101
    port: 80
    protocol: tcp
    mode: tun
    backends:
      - address: 2001:db8:5::21
  - name: no-neighbour
    vip: 198.18.0.102
    port: 80
    protocol: tcp
    mode: tun
    backends:
      - address: 198.18.6.11
  - name: no-route
    vip: 198.18.0.103
    port: 80
    protocol: tcp
    mode: tun
    backends:
      - address: 198.18.7.11
  - name: dr
    vip: 198.18.0.104
    port: 80
    protocol: tcp
    mode: dr
    backends:
      - { address: 198.18.0.21, mac: '02:00:00:00:00:21' }
      - { address: 198.18.0.22, mac: '02:00:00:00:00:22' }
";

fn ifindex(name: &str) -> u32 {
    lb_userspace::netlink::ifindex(name).expect("interface in the test namespace")
}

/// The director loaded in the namespace, with `up0` registered (IFACES and TX_PORTS).
fn harness() -> Harness {
    harness_of(CONFIG)
}

fn harness_of(yaml: &str) -> Harness {
    let mut h = Harness::new(yaml);
    let up0 = ifindex("up0");
    let info = dataplane::iface_info(&h.config.interfaces[0], UP_MAC);
    h.director.maps.set_iface(up0, info).expect("IFACES");
    h.director
        .maps
        .tx_ports
        .insert(up0, up0, None, 0)
        .expect("TX_PORTS");
    h
}

fn v4(a: &str) -> [u8; 4] {
    match a.parse::<IpAddr>().unwrap() {
        IpAddr::V4(a) => a.octets(),
        _ => panic!("{a} is not IPv4"),
    }
}
fn v6(a: &str) -> [u8; 16] {
    match a.parse::<IpAddr>().unwrap() {
        IpAddr::V6(a) => a.octets(),
        _ => panic!("{a} is not IPv6"),
    }
}

/// Expected IPv4 outer packet: Ethernet to the gateway + IPv4 (DF, TTL 64, TOS copied).
fn ipip(src: [u8; 4], dst: [u8; 4], inner: &[u8], tos: u8) -> Vec<u8> {
    let mut ip = Ipv4Header::new(inner.len() as u16, 64, IpNumber::IPV4, src, dst).unwrap();
    ip.dont_fragment = true;
    ip.dscp = (tos >> 2).try_into().unwrap();
    ip.ecn = (tos & 3).try_into().unwrap();
    ip.header_checksum = ip.calc_header_checksum();
    let mut out = Ethernet2Header {
        source: UP_MAC,
        destination: GW_MAC,
        ether_type: EtherType::IPV4,
    }
    .to_bytes()
    .to_vec();
    out.extend_from_slice(&ip.to_bytes());
    out.extend_from_slice(inner);
    out
}

/// Expected IPv6 outer packet; the flow label carries the flow hash (ECMP/RSS entropy).
fn ip6ip(src: [u8; 16], dst: [u8; 16], inner: &[u8], next: IpNumber, hash: u32) -> Vec<u8> {
    let ip = Ipv6Header {
        traffic_class: 0,
        flow_label: Ipv6FlowLabel::try_new(hash & 0xfffff).unwrap(),
        payload_length: inner.len() as u16,
        next_header: next,
        hop_limit: 64,
        source: src,
        destination: dst,
    };
    let mut out = Ethernet2Header {
        source: UP_MAC,
        destination: GW_MAC,
        ether_type: EtherType::IPV6,
    }
    .to_bytes()
    .to_vec();
    out.extend_from_slice(&ip.to_bytes());
    out.extend_from_slice(inner);
    out
}

#[test]
fn encapsulation_has_exact_outer_headers() {
    lb_tests::require_root();
    let ns = FibLab::new("enc");
    ns.run(|| {
        let h = harness();
        let check = |what: &str, pkt: &Pkt, expected: Vec<u8>, verdict: u32, on: Option<u32>| {
            let before = h.reason(reason::FWD_TUN);
            let (v, out) = match on {
                Some(i) => lb_tests::run_program_on(h.director.director_program(), &pkt.build(), i),
                None => h.run(&pkt.build()),
            };
            assert_eq!(v, verdict, "{what}: verdict");
            assert_eq!(out, expected, "{what}: output bytes");
            assert_eq!(
                h.reason(reason::FWD_TUN),
                before + 1,
                "{what}: fwd_tun counted"
            );
        };
        let l3 = 14;

        // IPv4 in IPv4; ingress lo, egress up0: redirect through the devmap.
        let p = Pkt::tcp("198.18.2.1", "198.18.0.100", 40000, 80);
        let backend = h.desired.backends[&h.predicted_backend(0, &p.key())].addr;
        let inner = p.build()[l3..].to_vec();
        check(
            "IPIP via redirect",
            &p,
            ipip(
                v4("198.18.0.3"),
                backend[..4].try_into().unwrap(),
                &inner,
                0,
            ),
            XDP_REDIRECT,
            None,
        );
        // Same flow arriving on up0 leaves on up0: XDP_TX.
        check(
            "IPIP via XDP_TX",
            &p,
            ipip(
                v4("198.18.0.3"),
                backend[..4].try_into().unwrap(),
                &inner,
                0,
            ),
            XDP_TX,
            Some(ifindex("up0")),
        );

        // TOS is copied to the outer header.
        let tos = Pkt::tcp("198.18.2.1", "198.18.0.100", 40001, 80);
        let mut hdrs = tos.headers();
        if let etherparse::IpHeaders::Ipv4(ref mut ip, _) = hdrs {
            ip.dscp = 46.try_into().unwrap();
        }
        let bytes = tos.build_with(hdrs);
        let backend = h.desired.backends[&h.predicted_backend(0, &tos.key())].addr;
        let (v, out) = h.run(&bytes);
        assert_eq!(v, XDP_REDIRECT);
        assert_eq!(
            out,
            ipip(
                v4("198.18.0.3"),
                backend[..4].try_into().unwrap(),
                &bytes[l3..],
                46 << 2
            ),
            "DSCP copied"
        );

        // IPv6 in IPv6.
        let p = Pkt::tcp("2001:db8:2::1", "2001:db8::100", 40000, 80);
        let inner = p.build()[l3..].to_vec();
        let hash = tunnel_hash(&p.key());
        check(
            "IPv6 in IPv6",
            &p,
            ip6ip(
                v6("2001:db8:1::3"),
                v6("2001:db8:5::11"),
                &inner,
                IpNumber::IPV6,
                hash,
            ),
            XDP_REDIRECT,
            None,
        );

        // IPv4 VIP served by an IPv6 backend.
        let p = Pkt::tcp("198.18.2.1", "198.18.0.101", 40000, 80);
        let inner = p.build()[l3..].to_vec();
        let hash = tunnel_hash(&p.key());
        check(
            "IPv4 in IPv6",
            &p,
            ip6ip(
                v6("2001:db8:1::3"),
                v6("2001:db8:5::21"),
                &inner,
                IpNumber::IPV4,
                hash,
            ),
            XDP_REDIRECT,
            None,
        );
    });
}

/// With `ring_fast_path: true` (slots cleaned by a sweep), established packets are
/// encapsulated by the ring alone into the same bytes the table's way makes.
#[test]
fn ring_fast_path_encapsulates_as_the_table_does() {
    lb_tests::require_root();
    let ns = FibLab::new("rfp");
    ns.run(|| {
        let mut h = harness_of(&CONFIG.replacen(
            "    mode: tun\n",
            "    mode: tun\n    ring_fast_path: true\n",
            1,
        ));
        std::thread::sleep(
            lb_userspace::reconcile::DIRTY_GRACE + std::time::Duration::from_millis(100),
        );
        let swept = h
            .director
            .sweep(std::time::Duration::from_secs(300))
            .expect("sweep");
        assert_eq!(swept.cleaned, lb_common::RING_SIZE as usize);
        let p = Pkt::tcp("198.18.2.1", "198.18.0.100", 41000, 80).with_flags(lb_tests::TCP_ACK);
        let backend = h.desired.backends[&h.predicted_backend(0, &p.key())].addr;
        let expected = ipip(
            v4("198.18.0.3"),
            backend[..4].try_into().unwrap(),
            &p.build()[14..],
            0,
        );
        for _ in 0..64 {
            let (v, out) = h.run(&p.build());
            assert_eq!((v, &out), (XDP_REDIRECT, &expected));
        }
        let (ring, table) = (h.reason(reason::FWD_TUN_RING), h.reason(reason::FWD_TUN));
        assert_eq!(ring + table, 64);
        assert!(ring >= 48, "by the ring: {ring}");
    });
}

#[test]
fn entropy_fills_source_host_bits_from_the_flow_hash() {
    lb_tests::require_root();
    let ns = FibLab::new("ent");
    ns.run(|| {
        let yaml = CONFIG.replace(
            "    tun_source: [198.18.0.3, 2001:db8:1::3]",
            "    tun_source_entropy: true\n    tun_source: [198.18.200.0/24, 2001:db8:200::/64]",
        );
        let mut h = Harness::new(&yaml);
        FibLab::register_up0(&mut h);
        let mut sources = std::collections::HashSet::new();
        for port in 0..16 {
            let p = Pkt::tcp("198.18.2.1", "198.18.0.100", 41000 + port, 80);
            let hash = tunnel_hash(&p.key());
            let backend = h.desired.backends[&h.predicted_backend(0, &p.key())].addr;
            let (v, out) = h.run(&p.build());
            assert_eq!(v, XDP_REDIRECT);
            let src = [198, 18, 200, (hash & 0xff) as u8];
            assert_eq!(
                out,
                ipip(src, backend[..4].try_into().unwrap(), &p.build()[14..], 0)
            );
            sources.insert(src);
        }
        assert!(
            sources.len() > 8,
            "16 flows use many outer sources: {sources:?}"
        );
    });
}

#[test]
fn too_big_gets_icmp_back_to_the_client() {
    lb_tests::require_root();
    let ns = FibLab::new("mtu");
    ns.run(|| {
        let h = harness();
        let l3 = 14;
        // IPv4 with DF: 1500-byte inner packet + 20 > 1500.
        let mut p = Pkt::tcp("198.18.2.1", "198.18.0.100", 40000, 80);
        p.payload = vec![0xab; 1500 - 40];
        let mut hdrs = p.headers();
        if let etherparse::IpHeaders::Ipv4(ref mut ip, _) = hdrs {
            ip.dont_fragment = true;
        }
        let input = p.build_with(hdrs.clone());
        let quote = &input[l3..l3 + 28];
        let icmp = Icmpv4Header::with_checksum(
            Icmpv4Type::DestinationUnreachable(DestUnreachableHeader::FragmentationNeeded {
                next_hop_mtu: 1480,
            }),
            quote,
        );
        let ip = {
            let mut ip = Ipv4Header::new(
                (8 + quote.len()) as u16,
                64,
                IpNumber::ICMP,
                v4("198.18.0.100"),
                v4("198.18.2.1"),
            )
            .unwrap();
            ip.dont_fragment = false;
            ip.header_checksum = ip.calc_header_checksum();
            ip
        };
        let mut expected = Ethernet2Header {
            source: DIRECTOR_MAC,
            destination: CLIENT_MAC,
            ether_type: EtherType::IPV4,
        }
        .to_bytes()
        .to_vec();
        expected.extend_from_slice(&ip.to_bytes());
        icmp.write(&mut expected).unwrap();
        expected.extend_from_slice(quote);
        let before = h.reason(reason::ICMP_TOO_BIG_SENT);
        let (v, out) = h.run(&input);
        assert_eq!(v, XDP_TX, "frag-needed goes back out");
        assert_eq!(out, expected, "exact ICMP frag-needed (MTU 1500 - 20)");
        assert_eq!(h.reason(reason::ICMP_TOO_BIG_SENT), before + 1);

        // The same packet without DF cannot be fragmented here: the kernel gets it, unchanged.
        let mut hdrs = p.headers();
        if let etherparse::IpHeaders::Ipv4(ref mut ip, _) = hdrs {
            ip.dont_fragment = false;
        }
        let no_df = p.build_with(hdrs);
        let before = h.reason(reason::PASS_TOO_BIG_NO_DF);
        assert_eq!(h.run(&no_df), (XDP_PASS, no_df.clone()));
        assert_eq!(h.reason(reason::PASS_TOO_BIG_NO_DF), before + 1);

        // IPv6: 1480-byte inner + 40 > 1500 -> packet too big, MTU 1460.
        let mut p = Pkt::tcp("2001:db8:2::1", "2001:db8::100", 40000, 80);
        p.payload = vec![0xcd; 1480 - 60];
        let input = p.build();
        let quote = &input[l3..l3 + 48];
        let icmp = Icmpv6Header::with_checksum(
            Icmpv6Type::PacketTooBig { mtu: 1460 },
            v6("2001:db8::100"),
            v6("2001:db8:2::1"),
            quote,
        )
        .unwrap();
        let ip = Ipv6Header {
            traffic_class: 0,
            flow_label: Default::default(),
            payload_length: (8 + quote.len()) as u16,
            next_header: IpNumber::IPV6_ICMP,
            hop_limit: 64,
            source: v6("2001:db8::100"),
            destination: v6("2001:db8:2::1"),
        };
        let mut expected = Ethernet2Header {
            source: DIRECTOR_MAC,
            destination: CLIENT_MAC,
            ether_type: EtherType::IPV6,
        }
        .to_bytes()
        .to_vec();
        expected.extend_from_slice(&ip.to_bytes());
        icmp.write(&mut expected).unwrap();
        expected.extend_from_slice(quote);
        let (v, out) = h.run(&input);
        assert_eq!(v, XDP_TX);
        assert_eq!(out, expected, "exact ICMPv6 packet too big (MTU 1500 - 40)");

        // A packet that fits is forwarded.
        let mut p = Pkt::tcp("198.18.2.1", "198.18.0.100", 40002, 80);
        p.payload = vec![0xab; 1480 - 40];
        assert_eq!(h.run(&p.build()).0, XDP_REDIRECT, "1480 + 20 fits");
    });
}

#[test]
fn fib_failures_pass_to_the_kernel() {
    lb_tests::require_root();
    let ns = FibLab::new("fib");
    ns.run(|| {
        let h = harness();
        // No route to the backend: unchanged.
        let p = Pkt::tcp("198.18.2.1", "198.18.0.103", 40000, 80).build();
        let before = h.reason(reason::PASS_FIB_FAILED);
        assert_eq!(h.run(&p), (XDP_PASS, p.clone()));
        assert_eq!(h.reason(reason::PASS_FIB_FAILED), before + 1);
        // Route, but the gateway's MAC is unknown: the encapsulated packet goes to our own
        // stack (destination MAC = the interface's), which resolves the neighbour.
        let p = Pkt::tcp("198.18.2.1", "198.18.0.102", 40000, 80);
        let before = h.reason(reason::PASS_NO_NEIGH);
        let (v, out) = h.run(&p.build());
        assert_eq!(v, XDP_PASS);
        assert_eq!(h.reason(reason::PASS_NO_NEIGH), before + 1);
        let ip = Ipv4Header::from_slice(&out[14..]).expect("outer IPv4").0;
        assert_eq!(
            (ip.source, ip.destination, ip.protocol),
            (v4("198.18.0.3"), v4("198.18.6.11"), IpNumber::IPV4)
        );
        assert_eq!(
            out[..6],
            DIRECTOR_MAC,
            "addressed to our own interface (ingress lo in the fixture)"
        );
        assert_eq!(out[34..], p.build()[14..], "inner packet intact");
    });
}

/// An ICMP error from a router to the VIP, quoting a packet the backend sent (VIP -> client).
fn icmp_error_v4(client: &str, client_port: u16, vip: &str) -> Vec<u8> {
    let reply = Pkt::tcp(vip, client, 80, client_port).build();
    let quote = &reply[14..14 + 28];
    let icmp = Icmpv4Header::with_checksum(
        Icmpv4Type::DestinationUnreachable(DestUnreachableHeader::FragmentationNeeded {
            next_hop_mtu: 1400,
        }),
        quote,
    );
    let mut out = Vec::new();
    etherparse::PacketBuilder::ethernet2(CLIENT_MAC, DIRECTOR_MAC)
        .ipv4(v4("198.18.0.1"), v4(vip), 64)
        .icmpv4(icmp.icmp_type)
        .write(&mut out, quote)
        .unwrap();
    out
}

/// ICMPv6 "packet too big" from a router to the VIP, quoting a backend's packet.
fn icmp_error_v6(client: &str, client_port: u16, vip: &str) -> Vec<u8> {
    let reply = Pkt::tcp(vip, client, 80, client_port).build();
    let quote = &reply[14..14 + 48];
    let mut out = Vec::new();
    etherparse::PacketBuilder::ethernet2(CLIENT_MAC, DIRECTOR_MAC)
        .ipv6(v6("2001:db8:1::1"), v6(vip), 64)
        .icmpv6(Icmpv6Type::PacketTooBig { mtu: 1400 })
        .write(&mut out, quote)
        .unwrap();
    out
}

#[test]
fn icmpv6_too_big_reaches_the_backend_that_owns_the_flow() {
    lb_tests::require_root();
    let ns = FibLab::new("icmp6");
    ns.run(|| {
        let h = harness();
        let syn = Pkt::tcp("2001:db8:2::1", "2001:db8::100", 44000, 80);
        let (v, first) = h.run(&syn.build());
        assert_eq!(v, XDP_REDIRECT);
        let err = icmp_error_v6("2001:db8:2::1", 44000, "2001:db8::100");
        let before = h.reason(reason::ICMP_ERROR_STEERED);
        let (v, out) = h.run(&err);
        assert_eq!(v, XDP_REDIRECT, "error tunnelled like the flow");
        assert_eq!(
            out[14 + 24..14 + 40],
            first[14 + 24..14 + 40],
            "outer destination: the flow's backend"
        );
        assert_eq!(
            out[14 + 40..],
            err[14..],
            "the ICMPv6 packet itself, unchanged, inside"
        );
        assert_eq!(h.reason(reason::ICMP_ERROR_STEERED), before + 1);
    });
}

#[test]
fn icmp_errors_reach_the_backend_that_owns_the_flow() {
    lb_tests::require_root();
    let ns = FibLab::new("icmp");
    ns.run(|| {
        let h = harness();
        // TUN service: open several flows; each flow's ICMP error follows it.
        for port in 0..8u16 {
            let syn = Pkt::tcp("198.18.2.1", "198.18.0.100", 42000 + port, 80);
            let (v, first) = h.run(&syn.build());
            assert_eq!(v, XDP_REDIRECT);
            let owner = &first[30..34];
            let err = icmp_error_v4("198.18.2.1", 42000 + port, "198.18.0.100");
            let before = h.reason(reason::ICMP_ERROR_STEERED);
            let (v, out) = h.run(&err);
            assert_eq!(v, XDP_REDIRECT, "error tunnelled like the flow");
            assert_eq!(&out[30..34], owner, "to the flow's backend");
            assert_eq!(
                out[34..],
                err[14..],
                "the ICMP packet itself, unchanged, inside"
            );
            assert_eq!(h.reason(reason::ICMP_ERROR_STEERED), before + 1);
        }
        // DR service: MAC rewrite to the owner.
        let syn = Pkt::tcp("198.18.2.1", "198.18.0.104", 43000, 80);
        let (_, first) = h.run(&syn.build());
        let err = icmp_error_v4("198.18.2.1", 43000, "198.18.0.104");
        let (v, out) = h.run(&err);
        assert_eq!(v, XDP_TX);
        assert_eq!(out[..6], first[..6], "same backend MAC as the flow");
        assert_eq!(out[12..], err[12..], "otherwise unchanged");
        // An error about no service of ours passes.
        let err = icmp_error_v4("198.18.2.1", 43000, "198.18.0.100");
        let mut other_port = err.clone();
        // Quoted source port 81: no service.
        other_port[14 + 20 + 8 + 20 + 1] = 81;
        let before = h.reason(reason::PASS_NON_VIP);
        assert_eq!(h.run(&other_port).0, XDP_PASS);
        assert_eq!(h.reason(reason::PASS_NON_VIP), before + 1);
    });
}

#[test]
fn decap_unwraps_tunnels_addressed_to_the_host() {
    lb_tests::require_root();
    let ns = FibLab::new("dec");
    ns.run(|| {
        let run = |d: &Decap, input: &[u8]| lb_tests::run_program(d.program(), input);
        let counters = |d: &Decap| d.counters().unwrap();
        let mut d = Decap::load(&[]).unwrap();
        d.set_local_addrs(&[
            "198.18.5.11".parse().unwrap(),
            "2001:db8:5::11".parse().unwrap(),
        ])
        .unwrap();

        let inner4 = Pkt::tcp("198.18.2.1", "198.18.0.100", 40000, 80)
            .with_macs(GW_MAC, UP_MAC)
            .build();
        let inner6 = Pkt::tcp("2001:db8:2::1", "2001:db8::100", 40000, 80)
            .with_macs(GW_MAC, UP_MAC)
            .build();
        let mut wrapped4 = ipip(v4("198.18.0.3"), v4("198.18.5.11"), &inner4[14..], 0);
        wrapped4[..12].copy_from_slice(&inner4[..12]);
        let mut wrapped6 = ip6ip(
            v6("2001:db8:1::3"),
            v6("2001:db8:5::11"),
            &inner6[14..],
            IpNumber::IPV6,
            7,
        );
        wrapped6[..12].copy_from_slice(&inner6[..12]);
        let mut wrapped46 = ip6ip(
            v6("2001:db8:1::3"),
            v6("2001:db8:5::11"),
            &inner4[14..],
            IpNumber::IPV4,
            7,
        );
        wrapped46[..12].copy_from_slice(&inner4[..12]);
        for (what, input, inner) in [
            ("IPIP", &wrapped4, &inner4),
            ("IPv6 in IPv6", &wrapped6, &inner6),
            ("IPv4 in IPv6", &wrapped46, &inner4),
        ] {
            let before = counters(&d)[decap_reason::DECAPPED as usize];
            assert_eq!(
                run(&d, input),
                (XDP_PASS, inner.clone()),
                "{what}: inner packet handed to the stack"
            );
            assert_eq!(counters(&d)[decap_reason::DECAPPED as usize], before + 1);
        }
        // Not for us, not a tunnel: unchanged and counted.
        let mut elsewhere = ipip(v4("198.18.0.3"), v4("198.18.5.99"), &inner4[14..], 0);
        elsewhere[..12].copy_from_slice(&inner4[..12]);
        assert_eq!(run(&d, &elsewhere), (XDP_PASS, elsewhere.clone()));
        assert_eq!(run(&d, &inner4), (XDP_PASS, inner4.clone()));
        let c = counters(&d);
        assert_eq!(
            (
                c[decap_reason::PASS_NOT_LOCAL as usize],
                c[decap_reason::PASS_NOT_TUNNEL as usize]
            ),
            (1, 1)
        );

        // With --vip, other inner destinations are left alone.
        let mut filtered = Decap::load(&["198.18.0.200".parse().unwrap()]).unwrap();
        filtered
            .set_local_addrs(&["198.18.5.11".parse().unwrap()])
            .unwrap();
        assert_eq!(run(&filtered, &wrapped4), (XDP_PASS, wrapped4.clone()));
        assert_eq!(counters(&filtered)[decap_reason::PASS_NOT_VIP as usize], 1);
    });
}

/// TUN and NAT remember a backend's next hop per CPU for a second (`NEXT_HOPS`): a changed
/// neighbour MAC reaches the packets once the entry is stale, and a cached hop never lets a
/// packet past the route's MTU.
#[test]
fn next_hop_is_cached_per_backend_for_a_second() {
    lb_tests::require_root();
    let ns = FibLab::new("hop");
    let lab = ns.0 .0.clone();
    ns.run(move || {
        // Per-CPU cache: stay on one CPU.
        lb_tests::pin_to(0, 0);
        let h = harness();
        let up0 = ifindex("up0");
        let p = Pkt::tcp("198.18.2.1", "198.18.0.100", 40100, 80);
        let dst_mac = |h: &Harness, input: &[u8]| {
            let (verdict, out) =
                lb_tests::run_program_on(h.director.director_program(), input, up0);
            assert_eq!(verdict, XDP_TX, "forwarded");
            <[u8; 6]>::try_from(&out[..6]).unwrap()
        };
        assert_eq!(dst_mac(&h, &p.build()), GW_MAC, "the FIB's answer");

        // The gateway's MAC changes: the cached hop serves the next packet...
        let new_gw = "02:99:00:00:00:fd";
        lb_tests::netns::replace_up0_neighbour(&lab, "198.18.0.1", new_gw);
        assert_eq!(
            dst_mac(&h, &p.build()),
            GW_MAC,
            "within the second the cached hop is used"
        );
        // ...but never one larger than the route's MTU: that asks the FIB (too big).
        let mut big = p.clone();
        big.payload = vec![0xab; 1500 - 40];
        let mut hdrs = big.headers();
        if let etherparse::IpHeaders::Ipv4(ref mut ip, _) = hdrs {
            ip.dont_fragment = true;
        }
        let (verdict, _) =
            lb_tests::run_program_on(h.director.director_program(), &big.build_with(hdrs), up0);
        assert_eq!(verdict, XDP_TX, "ICMP frag-needed back to the client");
        assert_eq!(h.reason(reason::ICMP_TOO_BIG_SENT), 1);

        // After the TTL the FIB is asked again.
        std::thread::sleep(std::time::Duration::from_millis(1100));
        assert_eq!(
            dst_mac(&h, &p.build()),
            [0x02, 0x99, 0, 0, 0, 0xfd],
            "a stale entry is refreshed from the FIB"
        );
    });
}
