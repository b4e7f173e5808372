//! Packet fixtures through BPF_PROG_TEST_RUN: input bytes + maps -> verdict + output bytes.
//! Each fixture is (description, input, expected verdict, expected output, counter slot).

use etherparse::IpHeaders;
use lb_common::{reason, RingEntry, RING_ENTRIES};
use lb_tests::{Harness, Pkt, DIRECTOR_MAC, XDP_DROP, XDP_PASS, XDP_TX};

const CONFIG: &str = "
interfaces:
  - name: lo
flow_table_size: 4096
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
  - name: dns
    vip: 198.18.0.100
    port: 53
    protocol: udp
    mode: dr
    backends:
      - { address: 198.18.1.21, mac: '02:00:00:00:01:15' }
      - { address: 198.18.1.22, mac: '02:00:00:00:01:16' }
  - name: web6
    vip: 2001:db8::100
    port: 443
    protocol: tcp
    mode: dr
    backends:
      - { address: 2001:db8::11, mac: '02:00:00:00:06:11' }
      - { address: 2001:db8::12, mac: '02:00:00:00:06:12' }
  - name: dns6
    vip: 2001:db8::100
    port: 53
    protocol: udp
    mode: dr
    backends:
      - { address: 2001:db8::21, mac: '02:00:00:00:06:21' }
  - name: all-ports
    vip: 198.18.0.200
    port: 0
    protocol: tcp
    mode: dr
    backends:
      - { address: 198.18.1.31, mac: '02:00:00:00:01:1f' }
      - { address: 198.18.1.32, mac: '02:00:00:00:01:20' }
";

struct Fixture {
    description: &'static str,
    input: Vec<u8>,
    verdict: u32,
    output: Vec<u8>,
    slot: u32,
}

/// A VIP packet the director must forward: the expected output is the same packet with the
/// backend's MAC as destination and the director's as source.
fn forwarded(h: &Harness, description: &'static str, service: usize, pkt: Pkt) -> Fixture {
    let backend = h.predicted_backend(service, &pkt.key());
    let mac = h.backend_mac(backend);
    Fixture {
        description,
        input: pkt.build(),
        verdict: XDP_TX,
        output: pkt.with_macs(DIRECTOR_MAC, mac).build(),
        slot: reason::FWD_DR,
    }
}

fn passed(description: &'static str, input: Vec<u8>, slot: u32) -> Fixture {
    Fixture {
        description,
        output: input.clone(),
        input,
        verdict: XDP_PASS,
        slot,
    }
}

fn check(h: &Harness, f: &Fixture) {
    let before = h.reason(f.slot);
    let (verdict, output) = h.run(&f.input);
    assert_eq!(verdict, f.verdict, "{}: verdict", f.description);
    assert_eq!(output, f.output, "{}: output bytes", f.description);
    assert_eq!(
        h.reason(f.slot),
        before + 1,
        "{}: counter {}",
        f.description,
        reason::NAMES[f.slot as usize]
    );
}

#[test]
fn dr_forwards_every_family_and_protocol() {
    let h = Harness::new(CONFIG);
    let mut vlan = Pkt::tcp("198.18.2.1", "198.18.0.100", 40001, 80);
    vlan.vlan = Some(42);
    let fixtures = [
        forwarded(
            &h,
            "IPv4 TCP to VIP:80",
            0,
            Pkt::tcp("198.18.2.1", "198.18.0.100", 40000, 80),
        ),
        forwarded(
            &h,
            "IPv4 UDP to VIP:53",
            1,
            Pkt::udp("198.18.2.1", "198.18.0.100", 40000, 53),
        ),
        forwarded(
            &h,
            "IPv6 TCP to VIP:443",
            2,
            Pkt::tcp("2001:db8:2::1", "2001:db8::100", 40000, 443),
        ),
        forwarded(
            &h,
            "IPv6 UDP to VIP:53",
            3,
            Pkt::udp("2001:db8:2::1", "2001:db8::100", 40000, 53),
        ),
        forwarded(
            &h,
            "wildcard service, port 8080",
            4,
            Pkt::tcp("198.18.2.1", "198.18.0.200", 40000, 8080),
        ),
        forwarded(
            &h,
            "wildcard service, port 22",
            4,
            Pkt::tcp("198.18.2.1", "198.18.0.200", 40000, 22),
        ),
        forwarded(&h, "802.1Q-tagged IPv4 TCP keeps its tag", 0, vlan),
    ];
    for f in &fixtures {
        check(&h, f);
    }
}

#[test]
fn flows_spread_over_every_backend_as_userspace_predicts() {
    let h = Harness::new(CONFIG);
    let mut seen = std::collections::HashSet::new();
    for port in 0..200u16 {
        let pkt = Pkt::tcp("198.18.2.7", "198.18.0.100", 10000 + port, 80);
        let f = forwarded(&h, "spread", 0, pkt);
        check(&h, &f);
        seen.insert(f.output[..6].to_vec());
    }
    assert_eq!(seen.len(), 3, "200 flows reach all three backends");
}

#[test]
fn everything_else_passes_unchanged_and_counted() {
    let h = Harness::new(CONFIG);
    let tcp = Pkt::tcp("198.18.2.1", "198.18.0.100", 40000, 80);
    let good = tcp.build();
    let l3 = 14;

    let mut options = tcp.headers();
    if let IpHeaders::Ipv4(ref mut ip, _) = options {
        ip.options = [1u8, 1, 1, 1][..].try_into().expect("NOP options");
    }
    let mut more_fragments = tcp.headers();
    if let IpHeaders::Ipv4(ref mut ip, _) = more_fragments {
        ip.more_fragments = true;
    }
    let mut later_fragment = tcp.headers();
    if let IpHeaders::Ipv4(ref mut ip, _) = later_fragment {
        ip.fragment_offset = 185u16.try_into().expect("offset");
    }
    let tcp6 = Pkt::tcp("2001:db8:2::1", "2001:db8::100", 40000, 443);
    let mut hop_by_hop = tcp6.headers();
    if let IpHeaders::Ipv6(_, ref mut ext) = hop_by_hop {
        ext.hop_by_hop_options = Some(
            etherparse::Ipv6RawExtHeader::new_raw(etherparse::IpNumber::TCP, &[0; 6])
                .expect("hop-by-hop"),
        );
    }
    let mut ihl4 = good.clone();
    ihl4[l3] = 0x44;
    let mut long_total = good.clone();
    long_total[l3 + 2..l3 + 4].copy_from_slice(&((good.len() - l3 + 1) as u16).to_be_bytes());
    let mut bad_version = good.clone();
    bad_version[l3] = 0x65;
    let mut short_doff = good.clone();
    short_doff[l3 + 20 + 12] = 0x40;
    let truncated_tcp = good[..l3 + 20 + 10].to_vec();
    let mut truncated_tcp_fixed = truncated_tcp.clone();
    // A consistent IPv4 header whose payload is too short for a TCP header.
    truncated_tcp_fixed[l3 + 2..l3 + 4].copy_from_slice(&30u16.to_be_bytes());
    let good6 = tcp6.build();
    let mut long_payload6 = good6.clone();
    long_payload6[l3 + 4..l3 + 6]
        .copy_from_slice(&((good6.len() - l3 - 40 + 8) as u16).to_be_bytes());
    let mut qinq = Pkt::tcp("198.18.2.1", "198.18.0.100", 40000, 80);
    qinq.vlan = Some(7);
    let mut qinq = qinq.build();
    qinq[16..18].copy_from_slice(&0x8100u16.to_be_bytes());
    let vlan_cut = {
        let mut v = Pkt::tcp("198.18.2.1", "198.18.0.100", 40000, 80);
        v.vlan = Some(9);
        v.build()[..16].to_vec()
    };
    let icmp = {
        let mut out = Vec::new();
        etherparse::PacketBuilder::ethernet2(lb_tests::CLIENT_MAC, DIRECTOR_MAC)
            .ipv4([198, 18, 2, 1], [198, 18, 0, 3], 64)
            .icmpv4_echo_request(1, 1)
            .write(&mut out, b"ping")
            .expect("icmp");
        out
    };
    let arp = {
        let mut out = Vec::new();
        etherparse::PacketBuilder::ethernet2(lb_tests::CLIENT_MAC, [0xff; 6])
            .arp(
                etherparse::ArpPacket::new(
                    etherparse::ArpHardwareId::ETHERNET,
                    etherparse::EtherType::IPV4,
                    etherparse::ArpOperation::REQUEST,
                    &lb_tests::CLIENT_MAC,
                    &[198, 18, 2, 1],
                    &[0; 6],
                    &[198, 18, 0, 100],
                )
                .expect("arp"),
            )
            .write(&mut out)
            .expect("arp");
        out
    };

    let fixtures = [
        passed(
            "non-VIP destination",
            Pkt::tcp("198.18.2.1", "198.18.0.101", 40000, 80).build(),
            reason::PASS_NON_VIP,
        ),
        passed(
            "VIP on a port it does not serve",
            Pkt::tcp("198.18.2.1", "198.18.0.100", 40000, 81).build(),
            reason::PASS_NON_VIP,
        ),
        passed(
            "VIP port with the other protocol",
            Pkt::udp("198.18.2.1", "198.18.0.100", 40000, 80).build(),
            reason::PASS_NON_VIP,
        ),
        passed(
            "non-VIP IPv6",
            Pkt::udp("2001:db8:2::1", "2001:db8::101", 40000, 53).build(),
            reason::PASS_NON_VIP,
        ),
        passed("ARP request", arp, reason::PASS_NOT_IP),
        passed("two VLAN tags (QinQ)", qinq, reason::PASS_NOT_IP),
        passed(
            "ICMP echo to the director's own address",
            icmp,
            reason::PASS_NON_VIP,
        ),
        passed(
            "IPv4 options",
            tcp.build_with(options),
            reason::PASS_IP_OPTIONS,
        ),
        passed(
            "first fragment (MF set)",
            tcp.build_with(more_fragments),
            reason::PASS_FRAGMENT,
        ),
        passed(
            "later fragment (offset > 0)",
            tcp.build_with(later_fragment),
            reason::PASS_FRAGMENT,
        ),
        passed(
            "IPv6 hop-by-hop extension header",
            tcp6.build_with(hop_by_hop),
            reason::PASS_IPV6_EXT,
        ),
        // BPF_PROG_TEST_RUN refuses frames below ETH_HLEN (as drivers never pass them up), so
        // the shortest truncation to test is inside the VLAN tag.
        passed(
            "frame cut inside the VLAN tag",
            vlan_cut,
            reason::PASS_MALFORMED,
        ),
        passed("IPv4 IHL 4", ihl4, reason::PASS_MALFORMED),
        passed(
            "IPv4 version 6 in an IPv4 frame",
            bad_version,
            reason::PASS_MALFORMED,
        ),
        passed(
            "IPv4 total length beyond the frame",
            long_total,
            reason::PASS_MALFORMED,
        ),
        passed(
            "frame cut inside the IPv4 header",
            good[..l3 + 12].to_vec(),
            reason::PASS_MALFORMED,
        ),
        passed(
            "frame cut inside the TCP header",
            truncated_tcp_fixed,
            reason::PASS_MALFORMED,
        ),
        passed(
            "TCP data offset below 5",
            short_doff,
            reason::PASS_MALFORMED,
        ),
        passed(
            "IPv6 payload length beyond the frame",
            long_payload6,
            reason::PASS_MALFORMED,
        ),
        passed(
            "frame cut inside the IPv6 header",
            good6[..l3 + 30].to_vec(),
            reason::PASS_MALFORMED,
        ),
    ];
    for f in &fixtures {
        check(&h, f);
    }
}

#[test]
fn established_flows_stay_when_the_ring_changes() {
    let mut h = Harness::new(CONFIG);
    let old = Pkt::tcp("198.18.2.9", "198.18.0.100", 41000, 80);
    let first = forwarded(&h, "first packet schedules the flow", 0, old.clone());
    check(&h, &first);
    let owner = h.predicted_backend(0, &old.key());

    // Point every slot of service 0's live ring at another backend.
    let other = h
        .desired
        .backends
        .keys()
        .copied()
        .find(|&id| id != owner && h.desired.backends[&id].service == 0)
        .unwrap();
    let meta = h.live_service(0);
    for e in 0..RING_ENTRIES {
        h.director
            .maps
            .rings
            .set(
                meta.ring * RING_ENTRIES + e,
                RingEntry::pack(&[other; 4]),
                0,
            )
            .expect("ring write");
    }

    let (verdict, out) = h.run(&old.build());
    assert_eq!(verdict, XDP_TX);
    assert_eq!(
        out[..6],
        h.backend_mac(owner),
        "established flow keeps its backend after the ring changed"
    );

    let new = Pkt::tcp("198.18.2.9", "198.18.0.100", 41001, 80);
    let (verdict, out) = h.run(&new.build());
    assert_eq!(verdict, XDP_TX);
    assert_eq!(
        out[..6],
        h.backend_mac(other),
        "a new flow follows the new ring"
    );

    // A backend removed from the config loses its flows: they are rescheduled.
    h.director
        .maps
        .backends
        .set(owner, lb_common::Backend::default(), 0)
        .expect("remove backend");
    let (verdict, out) = h.run(&old.build());
    assert_eq!(verdict, XDP_TX);
    assert_eq!(
        out[..6],
        h.backend_mac(other),
        "flow of a removed backend is rescheduled"
    );

    // A service whose ring is empty drops new packets (`on_all_down: drop`, the default),
    // counted.
    for e in 0..RING_ENTRIES {
        h.director
            .maps
            .rings
            .set(meta.ring * RING_ENTRIES + e, RingEntry::default(), 0)
            .expect("ring write");
    }
    let input = Pkt::tcp("198.18.2.9", "198.18.0.100", 41002, 80).build();
    let f = Fixture {
        description: "service without backends",
        output: input.clone(),
        input,
        verdict: XDP_DROP,
        slot: reason::DROP_NO_BACKEND,
    };
    check(&h, &f);
}

/// Flow hits take the fast path: the flow's service comes from `SERVICE_SLOTS` by the id
/// the flow recorded (no `SERVICES` lookup), and only while the slot still describes the
/// packet's destination; otherwise the full path decides.
#[test]
fn established_flows_reach_their_service_by_id() {
    let mut h = Harness::new(CONFIG);
    let old = Pkt::tcp("198.18.2.9", "198.18.0.100", 41100, 80);
    check(
        &h,
        &forwarded(&h, "first packet schedules the flow", 0, old.clone()),
    );
    let owner = h.predicted_backend(0, &old.key());
    let key = h.desired.services[0].key;
    let id = h.desired.services[0].id;
    let meta = h.live_service(0);

    // Without its SERVICES entry, the established flow still reaches its backend, and a new
    // flow its service by SERVICE_INDEX (the hash is asked only where the index cannot
    // tell); without its index slot too, a new flow to the same VIP and port is no longer
    // a VIP packet.
    h.director.maps.services.remove(&key).expect("remove");
    let (verdict, out) = h.run(&old.build());
    assert_eq!(verdict, XDP_TX, "hit served from SERVICE_SLOTS");
    assert_eq!(out[..6], h.backend_mac(owner));
    let by_index = Pkt::tcp("198.18.2.9", "198.18.0.100", 41102, 80);
    check(
        &h,
        &forwarded(&h, "new flow, service by the index", 0, by_index),
    );
    let slot = lb_userspace::reconcile::index_slot_of(&key);
    assert_eq!(
        h.director.maps.service_index.get(&slot, 0).expect("index"),
        id + 1,
        "the index names the service"
    );
    h.director
        .maps
        .service_index
        .set(slot, 0, 0)
        .expect("index clear");
    let new = Pkt::tcp("198.18.2.9", "198.18.0.100", 41101, 80).build();
    check(
        &h,
        &passed("new flow, service entry gone", new, reason::PASS_NON_VIP),
    );

    // A slot that now describes another VIP (a reused id) does not capture the flow: the
    // full path misses SERVICES and passes it.
    let original = h.director.maps.service_slots.get(&id, 0).expect("slot");
    let mut slots = original;
    slots.key.addr[3] ^= 1;
    h.director
        .maps
        .service_slots
        .set(id, slots, 0)
        .expect("slot write");
    check(
        &h,
        &passed(
            "established flow, slot of another VIP",
            old.build(),
            reason::PASS_NON_VIP,
        ),
    );

    // The SERVICES entry back, the slot emptied: still no service. Every packet reads its
    // service from SERVICE_SLOTS; SERVICES only names the id where the index cannot.
    h.director
        .maps
        .service_slots
        .set(id, lb_common::ServiceSlot::default(), 0)
        .expect("slot clear");
    h.director
        .maps
        .services
        .insert(key, meta, 0)
        .expect("service back");
    check(
        &h,
        &passed(
            "established flow, slot emptied",
            old.build(),
            reason::PASS_NON_VIP,
        ),
    );

    // The slot back too, the index slot still empty: the established flow reaches its
    // backend again, and a new flow its service through the id SERVICES names.
    h.director
        .maps
        .service_slots
        .set(id, original, 0)
        .expect("slot back");
    let (verdict, out) = h.run(&old.build());
    assert_eq!(verdict, XDP_TX, "established flow");
    assert_eq!(out[..6], h.backend_mac(owner), "same backend via FLOWS");
    let by_hash = Pkt::tcp("198.18.2.9", "198.18.0.100", 41103, 80);
    check(
        &h,
        &forwarded(&h, "new flow, service by SERVICES", 0, by_hash),
    );
}

/// New flows find their service through `SERVICE_INDEX`; where two services hash to one
/// slot (shared), or a port of an every-port service's VIP meets another service's slot,
/// each packet still reaches its own service: exact ports before every port.
#[test]
fn services_sharing_an_index_slot_keep_their_own_flows() {
    let vip: std::net::Ipv4Addr = "198.18.0.104".parse().unwrap();
    let key = |port: u16| lb_common::VipKey {
        addr: lb_userspace::dataplane::addr_bytes(vip.into()).0,
        port_be: port.to_be(),
        proto: lb_common::IPPROTO_TCP,
        family: lb_common::AF_INET,
    };
    let slot = |port: u16| lb_userspace::reconcile::index_slot_of(&key(port));
    // Two exact ports sharing a slot, a third port on the every-port service's slot, and a
    // fourth port whose own slot names one of the exact services.
    let a = 1000u16;
    let b = (a + 1..=u16::MAX).find(|&p| slot(p) == slot(a)).expect("b");
    let c = (1..=u16::MAX)
        .find(|&p| p != a && p != b && slot(p) == slot(0))
        .expect("c");
    let d = (1..=u16::MAX)
        .find(|&p| ![a, b, c].contains(&p) && slot(p) == slot(c))
        .expect("d");
    let e = (1..=u16::MAX)
        .find(|&p| ![a, b, c, d].contains(&p) && slot(p) == slot(a))
        .expect("e");
    // A service alone in its slot, and a port whose slot names it.
    let g = (2000..=u16::MAX)
        .find(|&p| ![a, b, c, d, e].contains(&p) && ![slot(a), slot(0)].contains(&slot(p)))
        .expect("g");
    let f = (1..=u16::MAX)
        .find(|&p| ![a, b, c, d, e, g].contains(&p) && slot(p) == slot(g))
        .expect("f");
    let yaml = format!(
        "
interfaces:
  - name: lo
flow_table_size: 4096
services:
  - name: a
    vip: {vip}
    port: {a}
    protocol: tcp
    mode: dr
    backends:
      - {{ address: 198.18.1.51, mac: '02:00:00:00:01:33' }}
  - name: b
    vip: {vip}
    port: {b}
    protocol: tcp
    mode: dr
    backends:
      - {{ address: 198.18.1.52, mac: '02:00:00:00:01:34' }}
  - name: every-port
    vip: {vip}
    port: 0
    protocol: tcp
    mode: dr
    backends:
      - {{ address: 198.18.1.53, mac: '02:00:00:00:01:35' }}
  - name: c
    vip: {vip}
    port: {c}
    protocol: tcp
    mode: dr
    backends:
      - {{ address: 198.18.1.54, mac: '02:00:00:00:01:36' }}
  - name: g
    vip: {vip}
    port: {g}
    protocol: tcp
    mode: dr
    backends:
      - {{ address: 198.18.1.55, mac: '02:00:00:00:01:37' }}
"
    );
    let h = Harness::new(&yaml);
    let shared = lb_common::INDEX_SLOT_SHARED;
    let index = |port: u16| {
        h.director
            .maps
            .service_index
            .get(&slot(port), 0)
            .expect("index")
    };
    assert_eq!((index(a), index(0)), (shared, shared), "shared slots");
    assert_ne!(index(g), shared, "g alone in its slot");
    let to = |port: u16, sport: u16| {
        let (verdict, out) = h.run(&Pkt::tcp("198.18.2.4", &vip.to_string(), sport, port).build());
        assert_eq!(verdict, XDP_TX, "port {port}");
        out[5]
    };
    for sport in 0..20 {
        assert_eq!(to(a, 9000 + sport), 0x33, "port {a}: service a");
        assert_eq!(to(b, 9000 + sport), 0x34, "port {b}: service b");
        assert_eq!(to(c, 9000 + sport), 0x36, "port {c}: service c");
        assert_eq!(to(d, 9000 + sport), 0x35, "port {d}: every port");
        assert_eq!(to(e, 9000 + sport), 0x35, "port {e}: every port");
        assert_eq!(to(g, 9000 + sport), 0x37, "port {g}: service g");
        assert_eq!(to(f, 9000 + sport), 0x35, "port {f}: every port, not g");
        assert_eq!(to(a + 3, 9000 + sport), 0x35, "another port: every port");
    }
}

#[test]
fn flows_of_both_families_share_the_set_associative_table() {
    let mut h = Harness::new(CONFIG);
    let v4 = Pkt::tcp("198.18.2.9", "198.18.0.100", 41200, 80);
    let v6 = Pkt::tcp("2001:db8:2::9", "2001:db8::100", 41200, 443);
    check(&h, &forwarded(&h, "IPv4 flow scheduled", 0, v4.clone()));
    check(&h, &forwarded(&h, "IPv6 flow scheduled", 2, v6.clone()));
    let (k4, k6) = (v4.key(), v6.key());
    let flows = &h.director.maps.flows;

    // Each flow sits in the set its hash picks, under its tag, its key's last word
    // carrying the check of its backend and service.
    for (k, service) in [(&k4, 0), (&k6, 2)] {
        let words: [u64; 5] = bytemuck::cast(*k);
        let hash = lb_common::flow_table::hash(&words);
        let (set, way) = flows.position(k);
        assert_eq!(
            set,
            lb_common::flow_table::set_of(hash, flows.sets().trailing_zeros())
        );
        let way = way.expect("flow in its set");
        assert_eq!(
            flows.head(set).tags[way],
            lb_common::flow_table::tag(hash),
            "tag"
        );
        assert_eq!(
            flows.get(k).expect("entry").backend,
            h.predicted_backend(service, k)
        );
    }
    let (e4, e6) = (flows.get(&k4).unwrap(), flows.get(&k6).unwrap());
    let mut all: Vec<_> = flows.iter().map(|(k, v)| (k, v.backend)).collect();
    all.sort_by_key(|(k, _)| k.family);
    assert_eq!(all, vec![(k4, e4.backend), (k6, e6.backend)]);
    h.director.maps.flows.remove(&k4).expect("remove IPv4 flow");
    assert_eq!(h.director.maps.flows.get(&k4), None);
    assert_eq!(h.director.maps.flows.get(&k6), Some(e6), "IPv6 flow kept");
    assert!(
        h.director.maps.flows.remove(&k4).is_err(),
        "removing an absent flow is an error"
    );
}

/// IPv4 clients of service 0 (port 80) whose flows all hash to one set of the table,
/// `n` of them.
fn same_set_flows(h: &Harness, n: usize) -> Vec<Pkt> {
    let bits = h.director.maps.flows.sets().trailing_zeros();
    let set_of = |p: &Pkt| {
        let words: [u64; 5] = bytemuck::cast(p.key());
        lb_common::flow_table::set_of(lb_common::flow_table::hash(&words), bits)
    };
    let client = |i: u32| Pkt::tcp("198.18.3.1", "198.18.0.100", 1024 + i as u16, 80);
    let target = set_of(&client(0));
    let out: Vec<Pkt> = (0..60_000)
        .map(client)
        .filter(|p| set_of(p) == target)
        .take(n)
        .collect();
    assert_eq!(out.len(), n, "{n} clients in one set");
    out
}

/// A full set gives a new flow the way of a flow whose reference bit is clear (one packet
/// so far, no hit since), not the oldest way: the table evicts what was not used, as an LRU
/// would, and an established flow (hit again) keeps its backend. The ways older than the
/// one taken lose their bits (a second chance, used up by the next insert that finds them
/// still unused).
#[test]
fn a_full_set_gives_a_new_flow_the_way_of_a_flow_not_used_since() {
    let h = Harness::new(CONFIG);
    let ways = lb_common::flow_table::WAYS;
    let pkts = same_set_flows(&h, ways + 1);
    let (first, newcomer) = pkts.split_at(ways);
    // The flow in way 5 gets one packet; the others two (the second a table hit: the flow
    // cache is filled by hits, not by new flows).
    let idle = 5;
    for (i, p) in first.iter().enumerate() {
        check(&h, &forwarded(&h, "flow opened", 0, p.clone()));
        let at = h.director.maps.flows.position(&p.key()).1;
        assert_eq!(at, Some(i), "ways fill in order");
        if i != idle {
            check(&h, &forwarded(&h, "flow hit", 0, p.clone()));
        }
    }
    let (set, _) = h.director.maps.flows.position(&first[0].key());
    let refs = h.director.maps.flows.head(set).refs;
    assert_eq!(
        refs,
        0xffff & !(1 << idle),
        "every way but the idle one used"
    );
    check(&h, &forwarded(&h, "newcomer", 0, newcomer[0].clone()));
    let flows = &h.director.maps.flows;
    let at = flows.position(&newcomer[0].key()).1;
    assert_eq!(at, Some(idle), "the idle flow's way");
    assert_eq!(flows.get(&first[idle].key()), None, "the idle flow evicted");
    for (i, p) in first.iter().enumerate().filter(|&(i, _)| i != idle) {
        assert!(flows.get(&p.key()).is_some(), "flow {i} kept");
    }
    assert_eq!(
        flows.head(set).refs,
        0xffff & !((1 << (idle + 1)) - 1),
        "the bits of the ways older than the one taken cleared, its own clear"
    );
}

/// A full set of flows none of which was used since it was written (a table filled by new
/// flows, a SYN flood) gives each new flow the oldest way: flows opened later (the
/// established connections among them) stay, as in an LRU, and do not take each other's
/// ways.
#[test]
fn a_full_set_of_unused_flows_gives_new_flows_the_oldest_ways() {
    let h = Harness::new(CONFIG);
    let ways = lb_common::flow_table::WAYS;
    let pkts = same_set_flows(&h, ways + 3);
    for p in &pkts[..ways] {
        check(&h, &forwarded(&h, "flow opened", 0, p.clone()));
    }
    for (n, p) in pkts[ways..].iter().enumerate() {
        check(&h, &forwarded(&h, "newcomer", 0, p.clone()));
        let flows = &h.director.maps.flows;
        assert_eq!(
            flows.position(&p.key()).1,
            Some(n),
            "newcomer {n}: the oldest way"
        );
        assert_eq!(flows.get(&pkts[n].key()), None, "flow {n} evicted");
        for (m, q) in pkts[ways..=ways + n].iter().enumerate() {
            assert!(flows.get(&q.key()).is_some(), "newcomer {m} kept");
        }
    }
    assert_eq!(
        h.director
            .maps
            .flows
            .head(h.director.maps.flows.position(&pkts[0].key()).0)
            .refs,
        0,
        "no way used"
    );
}

/// Two CPUs writing different flows into one way at once can leave a key of one with the
/// value of the other. The check in the key's last word catches it: such a way is no entry,
/// and the packet is scheduled again (as after an eviction), not sent to the other flow's
/// backend.
#[test]
fn a_way_torn_between_two_writers_is_no_entry() {
    let mut h = Harness::new(CONFIG);
    let p = Pkt::tcp("198.18.2.9", "198.18.0.100", 41300, 80);
    let k = p.key();
    let first = forwarded(&h, "flow opened", 0, p.clone());
    check(&h, &first);
    let entry = h.director.maps.flows.get(&k).expect("entry");
    let backend = entry.backend;
    // The key and the check as the first writer left them, the value another's.
    let mut torn = lb_common::flow_table::way(&k, entry);
    torn.value.backend = other_backend(&h, 0, h.backend_mac(backend));
    h.director
        .maps
        .flows
        .put_way(&k, torn)
        .expect("write the way");
    assert_eq!(
        h.director.maps.flows.get(&k),
        None,
        "the controller skips it"
    );
    assert_eq!(h.director.maps.flows.iter().count(), 0, "and its walk too");
    assert_eq!(
        dst_mac(&h, &p),
        h.backend_mac(backend),
        "scheduled again: the ring's backend, not the torn value's"
    );
    let entry = h.director.maps.flows.get(&k).expect("recorded again");
    assert_eq!(entry.backend, backend);
    // Recorded in another way: the torn one stays (CLOCK takes it in time) and does not
    // hide the new entry from the next packet, a hit, not one more new flow.
    let (set, at) = h.director.maps.flows.position(&k);
    assert!(at.is_some(), "the new entry found past the torn way");
    assert_eq!(
        h.director
            .maps
            .flows
            .head(set)
            .tags
            .iter()
            .filter(|&&t| t != 0)
            .count(),
        2,
        "the torn way and the new one"
    );
    let new_flows = || {
        lb_userspace::dataplane::Maps::sum_counters(&h.director.maps.service_stats, 0)
            .unwrap()
            .new_flows
    };
    let before = new_flows();
    assert_eq!(dst_mac(&h, &p), h.backend_mac(backend));
    assert_eq!(new_flows(), before, "a hit on the new entry");
}

#[test]
fn counters_count_packets_bytes_and_new_flows() {
    let h = Harness::new(CONFIG);
    let pkt = Pkt::udp("198.18.2.3", "198.18.0.100", 5353, 53);
    let bytes = pkt.build();
    for _ in 0..3 {
        assert_eq!(h.run(&bytes).0, XDP_TX);
    }
    let svc =
        lb_userspace::dataplane::Maps::sum_counters(&h.director.maps.service_stats, 1).unwrap();
    assert_eq!(
        (svc.packets, svc.bytes, svc.new_flows),
        (3, 3 * bytes.len() as u64, 1)
    );
    let backend = h.predicted_backend(1, &pkt.key());
    let b = lb_userspace::dataplane::Maps::sum_counters(&h.director.maps.backend_stats, backend)
        .unwrap();
    assert_eq!((b.packets, b.new_flows), (3, 1));
    let status = lb_userspace::status::collect(&h.director.maps).unwrap();
    let dns = status.iter().find(|s| s.id == 1).unwrap();
    assert_eq!(
        dns.backends.iter().map(|b| b.active_flows).sum::<u64>(),
        1,
        "one active flow in the table"
    );
}

/// A UDP flow whose packets come closer together than `udp_idle_timeout` keeps its entry
/// (data plane and sweep alike), however short the timeout: the flow's clock is refreshed
/// often enough for it. (With a 1 s refresh, a flow with a packet every 0.6 s under a 1 s
/// timeout was swept, or rescheduled, on its third packet.)
#[test]
fn udp_flows_with_packets_closer_than_the_timeout_are_kept() {
    let idle = std::time::Duration::from_secs(1);
    let mut h = Harness::new(&format!("udp_idle_timeout: 1s\n{CONFIG}"));
    let gap = std::time::Duration::from_millis(600);
    // A packet is checked only when this VM did not stall past the timeout since the one
    // before (then starting anew would be right); a try needs three checked packets.
    for sport in [5300u16, 5301, 5302] {
        let pkt = Pkt::udp("198.18.2.4", "198.18.0.100", sport, 53);
        let bytes = pkt.build();
        let mut before = std::time::Instant::now();
        assert_eq!(h.run(&bytes).0, XDP_TX);
        let mut flows = h.new_flows(1);
        let mut checked = 0;
        for _ in 0..5 {
            std::thread::sleep(gap.saturating_sub(before.elapsed()));
            let swept = lb_userspace::dataplane::sweep_idle_udp(&mut h.director.maps, idle);
            let now = std::time::Instant::now();
            assert_eq!(h.run(&bytes).0, XDP_TX);
            // At most this long between the two packets' clock readings.
            let stalled = before.elapsed() >= idle;
            if !stalled {
                assert_eq!(swept.unwrap(), 0, "flow {sport} swept while active");
                assert_eq!(
                    h.new_flows(1),
                    flows,
                    "flow {sport} started anew while active"
                );
                checked += 1;
            }
            before = now;
            flows = h.new_flows(1);
        }
        if checked >= 3 {
            assert!(h.director.maps.flows.get(&pkt.key()).is_some());
            return;
        }
    }
    panic!("this VM stalled past the timeout in every try");
}

/// Collects log records in memory.
#[derive(Clone, Default)]
struct Capture(std::sync::Arc<std::sync::Mutex<Vec<String>>>);

impl log::Log for Capture {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }
    fn log(&self, record: &log::Record<'_>) {
        self.0.lock().unwrap().push(record.args().to_string());
    }
    fn flush(&self) {}
}

#[test]
fn debug_log_only_when_switched_on() {
    for on in [false, true] {
        let mut h = Harness::with_debug_log(CONFIG, on);
        let capture = Capture::default();
        let mut logger = h.director.logger(capture.clone()).expect("logger");
        let fwd = Pkt::tcp("198.18.2.1", "198.18.0.100", 40000, 80);
        assert_eq!(h.run(&fwd.build()).0, XDP_TX);
        let non_vip = Pkt::tcp("198.18.2.1", "198.18.0.101", 40000, 80).build();
        assert_eq!(h.run(&non_vip).0, XDP_PASS);
        logger.flush();
        let lines = capture.0.lock().unwrap().clone();
        if on {
            let backend = h.predicted_backend(0, &fwd.key());
            let expect = format!("service 0 -> backend {backend} new_flow 1");
            assert!(lines.contains(&expect), "{expect} in {lines:?}");
            let expect = format!("pass reason {}", reason::PASS_NON_VIP);
            assert!(lines.contains(&expect), "{expect} in {lines:?}");
        } else {
            assert!(
                lines.is_empty(),
                "no records without --debug-log: {lines:?}"
            );
        }
    }
}

/// An ICMP echo request or reply between `a` and `b`, built by etherparse (which computes
/// the checksums the director must reproduce incrementally).
fn echo(src_mac: [u8; 6], dst_mac: [u8; 6], a: &str, b: &str, reply: bool) -> Vec<u8> {
    let mut out = Vec::new();
    let eth = etherparse::PacketBuilder::ethernet2(src_mac, dst_mac);
    let payload = b"xdplb ping payload";
    match (a.parse().unwrap(), b.parse().unwrap()) {
        (std::net::IpAddr::V4(a), std::net::IpAddr::V4(b)) => {
            let ip = eth.ipv4(a.octets(), b.octets(), 64);
            if reply {
                ip.icmpv4_echo_reply(7, 3).write(&mut out, payload)
            } else {
                ip.icmpv4_echo_request(7, 3).write(&mut out, payload)
            }
        }
        (std::net::IpAddr::V6(a), std::net::IpAddr::V6(b)) => {
            let ip = eth.ipv6(a.octets(), b.octets(), 64);
            if reply {
                ip.icmpv6_echo_reply(7, 3).write(&mut out, payload)
            } else {
                ip.icmpv6_echo_request(7, 3).write(&mut out, payload)
            }
        }
        _ => panic!("mixed families"),
    }
    .expect("echo packet");
    out
}

#[test]
fn echo_to_a_vip_is_answered_by_the_director() {
    let h = Harness::new(CONFIG);
    for (client, vip) in [
        ("198.18.2.1", "198.18.0.100"),
        ("2001:db8:2::1", "2001:db8::100"),
        ("198.18.2.1", "198.18.0.200"),
    ] {
        let f = Fixture {
            description: "echo request to a VIP",
            input: echo(lb_tests::CLIENT_MAC, DIRECTOR_MAC, client, vip, false),
            verdict: XDP_TX,
            output: echo(DIRECTOR_MAC, lb_tests::CLIENT_MAC, vip, client, true),
            slot: reason::ICMP_ECHO_REPLIED,
        };
        check(&h, &f);
    }
    // An echo *reply* to a VIP is not ours to answer.
    let f = passed(
        "echo reply to a VIP",
        echo(
            lb_tests::CLIENT_MAC,
            DIRECTOR_MAC,
            "198.18.2.1",
            "198.18.0.100",
            true,
        ),
        reason::PASS_NOT_TCP_UDP,
    );
    check(&h, &f);
}

#[test]
fn objects_load_with_btf() {
    // A Rust enum in an out-of-line BPF function's signature makes BTF the kernel rejects;
    // aya then silently loads without BTF (no source lines in verifier logs, no typed maps).
    let h = Harness::new(CONFIG);
    let info = h.director.director_program().info().expect("program info");
    assert!(info.btf_id().is_some(), "director loaded with BTF");
    let d = lb_userspace::decap::Decap::load(&[]).expect("decap object");
    assert!(
        d.program().info().expect("info").btf_id().is_some(),
        "decap loaded with BTF"
    );
}

#[test]
fn rings_hold_four_slots_per_element() {
    // The kernel rounds array elements up to 8 bytes: one u32 id per element cost 8 bytes a
    // slot (67 MB for all rings); four u16 ids per element cost 2 (17 MB).
    let h = Harness::new(CONFIG);
    let rings = &h.director.maps.rings;
    let want = lb_common::MAX_SERVICES * lb_common::RINGS_PER_SERVICE * RING_ENTRIES;
    assert_eq!(rings.len(), want);
    let bytes = u64::from(rings.len()) * std::mem::size_of::<RingEntry>() as u64;
    assert!(bytes < 17_000_000, "{bytes} bytes of rings");
    // The live ring as the controller wrote it reads back slot for slot.
    let meta = h.live_service(0);
    let ring = &h.desired.services[0].ring;
    for e in [0, 1, RING_ENTRIES / 2, RING_ENTRIES - 1] {
        let got = rings.get(&(meta.ring * RING_ENTRIES + e), 0).expect("ring");
        let from = (e * 4) as usize;
        let to = (from + 4).min(ring.len());
        let slots: Vec<u32> = (0..(to - from) as u32).map(|i| got.slot(i)).collect();
        assert_eq!(slots, ring[from..to], "element {e}");
    }
}

/// Whether `VIP_FILTER` has the bit of `addr` set.
fn filter_has(h: &Harness, addr: &str) -> bool {
    let ip: std::net::IpAddr = addr.parse().unwrap();
    let key = lb_tests::flow_key(ip, ip, 0, 0, 6);
    let bit = lb_common::vip_filter_bit(&key.src, key.family);
    h.director.maps.vip_filter.get(&(bit / 64), 0).unwrap() >> (bit % 64) & 1 != 0
}

#[test]
fn the_vip_filter_holds_every_vip_through_reloads_and_adoption() {
    lb_tests::require_root();
    let mut lab = lb_tests::Reconciled::new(CONFIG);
    let vips = ["198.18.0.100", "2001:db8::100", "198.18.0.200"];
    assert!(vips.iter().all(|v| filter_has(&lab.h, v)), "every VIP");
    let words: u32 = (0..lb_common::VIP_FILTER_WORDS)
        .map(|i| {
            lab.h
                .director
                .maps
                .vip_filter
                .get(&i, 0)
                .unwrap()
                .count_ones()
        })
        .sum();
    assert_eq!(words, 3, "and nothing else");
    // A packet for no VIP (its bit is clear) passes, counted as before the filter.
    assert!(!filter_has(&lab.h, "198.18.9.9"));
    let other = Pkt::tcp("198.18.2.1", "198.18.9.9", 40000, 80).build();
    let before = lab.h.reason(reason::PASS_NON_VIP);
    assert_eq!(lab.h.run(&other), (XDP_PASS, other.clone()));
    assert_eq!(lab.h.reason(reason::PASS_NON_VIP), before + 1);

    // The last service of 198.18.0.200 goes: its bit is cleared, the others stay.
    let without = &CONFIG[..CONFIG.find("  - name: all-ports").unwrap()];
    lab.h.config =
        lb_userspace::config::Config::parse(without, &lb_userspace::config::AnyHost).unwrap();
    lab.apply();
    assert!(!filter_has(&lab.h, "198.18.0.200"), "removed VIP");
    assert!(filter_has(&lab.h, "198.18.0.100") && filter_has(&lab.h, "2001:db8::100"));
    // And comes back.
    lab.h.config =
        lb_userspace::config::Config::parse(CONFIG, &lb_userspace::config::AnyHost).unwrap();
    lab.apply();
    assert!(filter_has(&lab.h, "198.18.0.200"), "VIP added again");
    let pkt = Pkt::tcp("198.18.2.1", "198.18.0.200", 40000, 8080).build();
    assert_eq!(lab.h.run(&pkt).0, XDP_TX, "and forwarded");

    // Maps pinned by a director that had no filter: adoption covers their VIPs.
    for i in 0..lb_common::VIP_FILTER_WORDS {
        lab.h.director.maps.vip_filter.set(i, 0, 0).unwrap();
    }
    // The filter is asked after the flow cache and before the table (it spares packets for
    // no VIP, NAT replies among them, the table's miss): with it empty, what the cache does
    // not answer passes, an established flow's first table hit too. (Adoption covers the
    // VIPs before the program sees a packet.)
    assert_eq!(
        lab.h.run(&pkt).0,
        XDP_PASS,
        "not in the cache, the filter decides"
    );
    let new = Pkt::tcp("198.18.2.1", "198.18.0.200", 40001, 8080).build();
    assert_eq!(
        lab.h.run(&new).0,
        XDP_PASS,
        "an empty filter hides the VIPs from new flows"
    );
    let mut state = lb_userspace::reconcile::MapState::read(&lab.h.director.maps).unwrap();
    state.cover_pinned_vips(&mut lab.h.director.maps).unwrap();
    assert!(vips.iter().all(|v| filter_has(&lab.h, v)), "covered again");
    assert_eq!(lab.h.run(&new).0, XDP_TX);
}

/// The bench driver's pacing (`BENCH_CFG[2]`, what the end-to-end bench's loss-bounded rate
/// search sets): frames go no faster than one per gap. A lower bound only, so a slow machine
/// cannot fail it; without pacing the same runs take a few percent of it.
#[test]
fn bench_driver_paces_frames_a_gap_apart() {
    lb_tests::require_root();
    let mut h = Harness::new(CONFIG);
    let floor = lb_tests::program_fd(&mut h.director, lb_userspace::dataplane::FLOOR_PROGRAM);
    let (mut next, mut cfg) = lb_tests::bench_driver(&mut h.director);
    next.set(0, &floor, 0).unwrap();
    let input = Pkt::tcp("198.18.9.1", "198.18.0.100", 40000, 80).build();
    let driver = h
        .director
        .loaded(lb_userspace::dataplane::BENCH_DRIVER_PROGRAM)
        .unwrap();
    let mut per_run = |gap_ns: u32| {
        cfg.set(2, gap_ns, 0).unwrap();
        let (verdict, _, avg) = lb_tests::run_repeated_on(driver, &input, 1, 2000);
        assert_eq!(verdict, XDP_TX, "the floor behind the driver");
        avg
    };
    let unpaced = per_run(0);
    let paced = per_run(5_000);
    assert!(
        paced >= std::time::Duration::from_nanos(4_900) && unpaced < paced / 4,
        "5 µs apart: {paced:?} per frame, unpaced {unpaced:?}"
    );
}

/// The bench driver's new 5-tuples (`BENCH_NEW_FLOW`, which the per-packet flow rows and the
/// end-to-end generator use): run k puts k into the low 16 bits of the source address, or
/// with `BENCH_CYCLE_DST` of the destination, and 1024 into that side's port, over IPv4 and
/// IPv6, with every checksum right: the floor behind it (a MAC swap) sends exactly the
/// packet etherparse builds with those fields.
#[test]
fn bench_driver_cycles_tuples_with_exact_checksums() {
    lb_tests::require_root();
    const NEW_FLOW: u32 = 2;
    const CYCLE_DST: u32 = 16;
    let mut h = Harness::new(CONFIG);
    let floor = lb_tests::program_fd(&mut h.director, lb_userspace::dataplane::FLOOR_PROGRAM);
    let (mut next, mut cfg) = lb_tests::bench_driver(&mut h.director);
    next.set(0, &floor, 0).unwrap();
    let driver = h
        .director
        .loaded(lb_userspace::dataplane::BENCH_DRIVER_PROGRAM)
        .unwrap();
    let low16 = |a: std::net::IpAddr, k: u16| -> std::net::IpAddr {
        match a {
            std::net::IpAddr::V4(a) => {
                let o = a.octets();
                std::net::Ipv4Addr::new(o[0], o[1], (k >> 8) as u8, k as u8).into()
            }
            std::net::IpAddr::V6(a) => {
                let mut s = a.segments();
                s[7] = k;
                std::net::Ipv6Addr::from(s).into()
            }
        }
    };
    let mut k = 0u16;
    for (src, dst) in [
        ("198.18.9.1", "198.18.0.100"),
        ("2001:db8:9::1", "2001:db8::100"),
    ] {
        let p = Pkt::tcp(src, dst, 40000, 80);
        for bits in [NEW_FLOW, NEW_FLOW | CYCLE_DST] {
            cfg.set(0, bits, 0).unwrap();
            for _ in 0..3 {
                k += 1;
                let (verdict, out) = lb_tests::run_program_on(driver, &p.build(), 1);
                assert_eq!(verdict, XDP_TX, "the floor behind the driver");
                let mut want = p.with_macs(p.dst_mac, p.src_mac);
                if bits & CYCLE_DST != 0 {
                    (want.dst, want.dport) = (low16(p.dst, k), 1024);
                } else {
                    (want.src, want.sport) = (low16(p.src, k), 1024);
                }
                assert_eq!(out, want.build(), "{src} run {k} (bits {bits})");
            }
        }
    }
}

/// The per-CPU flow cache (`FLOW_CACHE`) answers an IPv4 TCP flow's packets for a second
/// after the table did; SYN, FIN and RST go to the table and empty the slot. Shown by
/// changing the table entry's backend behind the cache's back: packets follow the cache
/// within the second, the table at a SYN, a FIN and after the second. Without the cache
/// every packet would follow the table at once.
#[test]
fn flow_cache_answers_for_a_second_and_the_table_decides_at_syn_fin_and_after() {
    // BPF_PROG_TEST_RUN runs on the calling CPU, and the cache is per CPU.
    lb_tests::pin_to(0, 0);
    let mut h = Harness::new(CONFIG);
    let ack = Pkt::tcp("198.18.2.77", "198.18.0.100", 41234, 80);
    let k = ack.key();
    let first = h.predicted_backend(0, &k);
    let other = other_backend(&h, 0, h.backend_mac(first));
    let (mac_first, mac_other) = (h.backend_mac(first), h.backend_mac(other));

    assert_eq!(dst_mac(&h, &ack), mac_first, "new flow, scheduled");
    assert_eq!(
        dst_mac(&h, &ack),
        mac_first,
        "table hit: the slot is filled"
    );
    point_table_at(&mut h, &ack, other);
    assert_eq!(dst_mac(&h, &ack), mac_first, "the cache answers");
    let before = h.reason(reason::FWD_DR);
    for _ in 0..5 {
        assert_eq!(dst_mac(&h, &ack), mac_first, "the cache answers");
    }
    assert_eq!(
        h.reason(reason::FWD_DR) - before,
        5,
        "and counts as forwarded"
    );

    let syn = ack.with_flags(lb_tests::TCP_SYN);
    assert_eq!(dst_mac(&h, &syn), mac_other, "a SYN goes to the table");
    assert_eq!(dst_mac(&h, &ack), mac_other, "and emptied the slot");

    point_table_at(&mut h, &ack, first);
    assert_eq!(dst_mac(&h, &ack), mac_other, "refilled from the table");
    let fin = ack.with_flags(lb_tests::TCP_FIN | lb_tests::TCP_ACK);
    assert_eq!(dst_mac(&h, &fin), mac_first, "a FIN goes to the table");
    assert_eq!(dst_mac(&h, &ack), mac_first, "and emptied the slot");

    point_table_at(&mut h, &ack, other);
    assert_eq!(dst_mac(&h, &ack), mac_first, "the cache answers");
    std::thread::sleep(std::time::Duration::from_millis(1100));
    assert_eq!(dst_mac(&h, &ack), mac_other, "for a second at most");
}

/// The destination MAC of `p`'s forwarded frame.
fn dst_mac(h: &Harness, p: &Pkt) -> [u8; 6] {
    let (verdict, out) = h.run(&p.build());
    assert_eq!(verdict, XDP_TX);
    <[u8; 6]>::try_from(&out[..6]).unwrap()
}

/// A backend of desired service `service` whose MAC is not `mac`.
fn other_backend(h: &Harness, service: usize, mac: [u8; 6]) -> u32 {
    h.backends_of(service)
        .into_iter()
        .find(|&id| h.backend_mac(id) != mac)
        .expect("another backend of the service")
}

/// `p`'s flow made (scheduled) and hit once in the table, which fills its cache slot where
/// there is a cache, then its table entry pointed at another backend of desired service
/// `service` behind the cache's back: (the MAC the slot answers with, the MAC the table
/// now gives).
fn fill_then_repoint(h: &mut Harness, p: &Pkt, service: usize) -> ([u8; 6], [u8; 6]) {
    let first = dst_mac(h, p);
    assert_eq!(dst_mac(h, p), first, "same backend on the table hit");
    let other = other_backend(h, service, first);
    (first, point_table_at(h, p, other))
}

/// Point `p`'s flow-table entry at backend `id` behind the cache's back, and return the
/// MAC a packet gets when the table decides (the cache's answer is the one before).
fn point_table_at(h: &mut Harness, p: &Pkt, id: u32) -> [u8; 6] {
    let k = p.key();
    let flows = &mut h.director.maps.flows;
    let mut v = flows.get(&k).expect("flow in the table");
    v.backend = id;
    flows.insert(&k, v).expect("rewrite the entry");
    h.backend_mac(id)
}

/// The flow cache is two-way: two flows whose keys pick the same set are both answered
/// from it; a third waits for a slot (its table hits do not evict a fresh one) and takes
/// the one a FIN empties. A direct-mapped cache would answer only the first.
#[test]
fn flow_cache_sets_hold_two_flows_and_a_third_takes_a_freed_slot() {
    lb_tests::pin_to(0, 0);
    let mut h = Harness::new(CONFIG);
    let bits = (lb_common::FLOW_CACHE_SLOTS / 2).trailing_zeros();
    let pkt = |i: u32| {
        Pkt::tcp(
            &format!("198.18.{}.{}", 2 + i / 64_512 % 200, 1 + i / 252 % 254),
            "198.18.0.100",
            (1024 + i % 64_512) as u16,
            80,
        )
    };
    let set_of = |p: &Pkt| lb_common::flow_cache_set(&lb_common::flow_cache_words(&p.key()), bits);
    let a = pkt(0);
    let mut same: Vec<Pkt> = (1..2_000_000)
        .map(pkt)
        .filter(|p| set_of(p) == set_of(&a))
        .take(2)
        .collect();
    assert_eq!(same.len(), 2, "two more flows in the first one's set");
    let c = same.pop().unwrap();
    let b = same.pop().unwrap();
    let ids = h.backends_of(0);
    // Each flow: new (scheduled), then a table hit that fills a slot if one is free.
    let mut cached = Vec::new();
    for p in [&a, &b, &c] {
        cached.push(fill_then_repoint(&mut h, p, 0));
    }
    assert_eq!(dst_mac(&h, &a), cached[0].0, "first flow: from the cache");
    assert_eq!(
        dst_mac(&h, &b),
        cached[1].0,
        "second flow, same set: from the cache"
    );
    assert_eq!(
        dst_mac(&h, &c),
        cached[2].1,
        "third flow: the set is full, the table"
    );

    // A's FIN empties its slot; C's next table hit takes it.
    let fin = a.with_flags(lb_tests::TCP_FIN | lb_tests::TCP_ACK);
    assert_eq!(dst_mac(&h, &fin), cached[0].1, "a FIN goes to the table");
    assert_eq!(
        dst_mac(&h, &c),
        cached[2].1,
        "table hit, fills the freed slot"
    );
    let was = *ids
        .iter()
        .find(|&&id| h.backend_mac(id) == cached[2].0)
        .unwrap();
    point_table_at(&mut h, &c, was);
    assert_eq!(
        dst_mac(&h, &c),
        cached[2].1,
        "third flow: now from the cache"
    );
    assert_eq!(
        dst_mac(&h, &b),
        cached[1].0,
        "second flow: still from the cache"
    );
}

/// IPv6 TCP flows are cached as IPv4 ones are (the slot keeps the source's two words):
/// within the second the cache answers, a SYN goes to the table.
#[test]
fn flow_cache_answers_ipv6_flows_too() {
    lb_tests::pin_to(0, 0);
    let mut h = Harness::new(CONFIG);
    let ack = Pkt::tcp("2001:db8:2::77", "2001:db8::100", 41234, 443);
    let (first, table) = fill_then_repoint(&mut h, &ack, 2);
    assert_eq!(dst_mac(&h, &ack), first, "the cache answers");
    let syn = ack.with_flags(lb_tests::TCP_SYN);
    assert_eq!(dst_mac(&h, &syn), table, "a SYN goes to the table");
}

/// The cache's key leaves the destination out (a hit is checked against its service's
/// VIP): the same client address and ports toward another VIP is another flow, balanced
/// over that VIP's backends, and the first flow keeps its answer.
#[test]
fn flow_cache_tells_flows_apart_by_their_vip() {
    lb_tests::pin_to(0, 0);
    let h = Harness::new(CONFIG);
    let web = Pkt::tcp("198.18.2.77", "198.18.0.100", 41234, 80);
    let all = Pkt::tcp("198.18.2.77", "198.18.0.200", 41234, 80);
    let web_mac = dst_mac(&h, &web);
    assert_eq!(dst_mac(&h, &web), web_mac, "table hit: the slot is filled");
    assert_eq!(dst_mac(&h, &web), web_mac, "from the cache");
    let all_ports: Vec<[u8; 6]> = h
        .backends_of(4)
        .into_iter()
        .map(|id| h.backend_mac(id))
        .collect();
    for _ in 0..3 {
        let mac = dst_mac(&h, &all);
        assert!(
            all_ports.contains(&mac),
            "{mac:02x?}: not an all-ports backend"
        );
        assert_eq!(
            dst_mac(&h, &web),
            web_mac,
            "the first flow keeps its backend"
        );
    }
}

/// `flow_cache_size: 0` turns the cache off: every packet follows the table at once.
#[test]
fn flow_cache_size_zero_leaves_every_packet_to_the_table() {
    lb_tests::pin_to(0, 0);
    let mut h = Harness::new(&CONFIG.replace(
        "flow_table_size: 4096",
        "flow_table_size: 4096\nflow_cache_size: 0",
    ));
    let ack = Pkt::tcp("198.18.2.77", "198.18.0.100", 41234, 80);
    let (_, mac) = fill_then_repoint(&mut h, &ack, 0);
    assert_eq!(
        dst_mac(&h, &ack),
        mac,
        "the table decides, no cache in front"
    );
}

/// UDP flows are cached too, but a slot answers only until the table would refresh the
/// flow's idle clock (`udp_idle_timeout` 1 s: every 125 ms), so the table keeps seeing the
/// flow as often as without the cache. Without UDP in the cache the first check fails;
/// with a slot valid for the whole second, the second.
#[test]
fn flow_cache_answers_udp_flows_until_the_table_would_refresh_their_clock() {
    lb_tests::pin_to(0, 0);
    let mut h = Harness::new(&format!("udp_idle_timeout: 1s\n{CONFIG}"));
    let refresh = std::time::Duration::from_millis(125);
    // A try counts when this VM did not stall half the refresh interval between the flow's
    // first packet (the slot is filled by the next) and the one that checks it.
    for sport in 5400u16..5405 {
        let p = Pkt::udp("198.18.2.78", "198.18.0.100", sport, 53);
        let filled = std::time::Instant::now();
        let (first, table) = fill_then_repoint(&mut h, &p, 1);
        let answer = dst_mac(&h, &p);
        if filled.elapsed() >= refresh / 2 {
            continue;
        }
        assert_eq!(answer, first, "the cache answers");
        std::thread::sleep(refresh + std::time::Duration::from_millis(75));
        assert_eq!(
            dst_mac(&h, &p),
            table,
            "no longer than the table's refresh interval"
        );
        return;
    }
    panic!("this VM stalled in every try");
}

/// A UDP flow answered from the cache keeps its table entry as without the cache: after
/// 0.9 s of packets 20 ms apart and a 0.7 s pause (under the 1 s timeout), the next packet
/// is the same flow and the sweep leaves it alone. Were the slot to answer for a second
/// from its fill, the table's clock would still be the first packet's, 1.6 s old, and the
/// flow would end.
#[test]
fn udp_flows_answered_from_the_cache_keep_their_idle_clock() {
    lb_tests::pin_to(0, 0);
    let idle = std::time::Duration::from_secs(1);
    let mut h = Harness::new(&format!("udp_idle_timeout: 1s\n{CONFIG}"));
    for sport in [5500u16, 5501, 5502] {
        let bytes = Pkt::udp("198.18.2.79", "198.18.0.100", sport, 53).build();
        assert_eq!(h.run(&bytes).0, XDP_TX);
        let flows = h.new_flows(1);
        let start = std::time::Instant::now();
        while start.elapsed() < std::time::Duration::from_millis(900) {
            assert_eq!(h.run(&bytes).0, XDP_TX);
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        assert_eq!(h.run(&bytes).0, XDP_TX);
        let last = std::time::Instant::now();
        std::thread::sleep(std::time::Duration::from_millis(700));
        let swept = lb_userspace::dataplane::sweep_idle_udp(&mut h.director.maps, idle).unwrap();
        assert_eq!(h.run(&bytes).0, XDP_TX);
        // Checked only when this VM did not stall the pause past the timeout.
        if last.elapsed() < idle - std::time::Duration::from_millis(50) {
            assert_eq!(swept, 0, "flow {sport} swept while active");
            assert_eq!(
                h.new_flows(1),
                flows,
                "flow {sport} started anew while active"
            );
            return;
        }
    }
    panic!("this VM stalled past the timeout in every try");
}
