//! The ring fast path (`ring_fast_path: true`) through BPF_PROG_TEST_RUN: established TCP
//! packets on clean ring slots go by the ring alone (counted as `fwd_dr_ring`) with a
//! sampled share through the flow table; SYN and FIN take the table; a backend change
//! dirties exactly the slots it moves, whose flows keep their backend through the table;
//! the sweep cleans a dirty slot only when no flow there disagrees with the ring.

use std::time::Duration;

use lb_common::{flow_hash, reason, FLOW_F_ENDED, RING_SIZE};
use lb_tests::{Pkt, Reconciled, TCP_ACK, TCP_FIN, TCP_SYN, XDP_TX};
use lb_userspace::{dataplane::Swept, reconcile::Runtime};

const CONFIG: &str = "
interfaces:
  - name: lo
flow_table_size: 65536
services:
  - name: fast
    vip: 198.18.0.100
    port: 80
    protocol: tcp
    mode: dr
    ring_fast_path: true
    backends:
      - { address: 198.18.1.11, mac: '02:00:00:00:01:0b' }
      - { address: 198.18.1.12, mac: '02:00:00:00:01:0c' }
      - { address: 198.18.1.13, mac: '02:00:00:00:01:0d' }
  - name: plain
    vip: 198.18.0.100
    port: 81
    protocol: tcp
    mode: dr
    backends:
      - { address: 198.18.1.21, mac: '02:00:00:00:01:15' }
      - { address: 198.18.1.22, mac: '02:00:00:00:01:16' }
  - name: every-port
    vip: 198.18.0.101
    port: 0
    protocol: tcp
    mode: dr
    ring_fast_path: true
    backends:
      - { address: 198.18.1.31, mac: '02:00:00:00:01:1f' }
      - { address: 198.18.1.32, mac: '02:00:00:00:01:20' }
  - name: exact
    vip: 198.18.0.101
    port: 81
    protocol: tcp
    mode: dr
    backends:
      - { address: 198.18.1.41, mac: '02:00:00:00:01:29' }
";

const VIP: &str = "198.18.0.100";
const CLIENT: &str = "198.18.5.7";

fn pkt(sport: u16, dport: u16, flags: u8) -> Pkt {
    let mut p = Pkt::tcp(CLIENT, VIP, sport, dport);
    p.tcp_flags = flags;
    p
}

/// The backend (last octet of its MAC) a packet went to.
fn send(lab: &Reconciled, p: &Pkt) -> u8 {
    let (verdict, out) = lab.h.run(&p.build());
    assert_eq!(verdict, XDP_TX, "{p:?}");
    out[5]
}

/// Packets counted by the table's way and by the ring's.
fn counts(lab: &Reconciled) -> (u64, u64) {
    (
        lab.h.reason(reason::FWD_DR),
        lab.h.reason(reason::FWD_DR_RING),
    )
}

/// A sweep after the dirty slots' grace period.
fn sweep(lab: &mut Reconciled) -> Swept {
    std::thread::sleep(lb_userspace::reconcile::DIRTY_GRACE + Duration::from_millis(100));
    lab.h
        .director
        .sweep(Duration::from_secs(300))
        .expect("sweep")
}

fn slot(sport: u16) -> u32 {
    flow_hash(&pkt(sport, 80, 0).key()) % RING_SIZE
}

#[test]
fn clean_slots_skip_the_table_and_changed_slots_keep_their_flows() {
    let mut lab = Reconciled::new(CONFIG);
    let sid = lab.ids.services[&lb_userspace::reconcile::vip_key(&lab.h.config.services[0])];

    // A new service starts all dirty: everything takes the table until a sweep.
    let owners: Vec<u8> = (2000..2030)
        .map(|s| send(&lab, &pkt(s, 80, TCP_SYN)))
        .collect();
    assert_eq!(send(&lab, &pkt(2000, 80, TCP_ACK)), owners[0]);
    assert_eq!(counts(&lab), (31, 0), "all slots dirty at first");
    let swept = sweep(&mut lab);
    assert_eq!(
        swept.cleaned,
        2 * RING_SIZE as usize,
        "every slot of both fast services"
    );
    assert!(swept.blocked.is_empty());

    // Clean: a flow's data packets go by the ring, about one in 64 still by the table (which
    // records a flow it lacks) — to the same backend either way. No SYN seen for this one.
    // (2048 packets: the chance that none is sampled is 1e-14.)
    let (table0, ring0) = counts(&lab);
    let to = send(&lab, &pkt(3000, 80, TCP_ACK));
    for _ in 0..2047 {
        assert_eq!(send(&lab, &pkt(3000, 80, TCP_ACK)), to);
    }
    let (table, ring) = counts(&lab);
    assert_eq!(table - table0 + ring - ring0, 2048);
    assert!(ring - ring0 >= 1900, "by the ring: {}", ring - ring0);
    assert!(table > table0, "sampled packets take the table");
    let k = pkt(3000, 80, 0).key();
    assert!(
        lab.h.director.maps.flows.get(&k).is_some(),
        "sampling recorded the flow"
    );

    // A SYN and a FIN take the table even on a clean slot; the FIN ends the flow's entry.
    let (table0, ring0) = counts(&lab);
    send(&lab, &pkt(2001, 80, TCP_FIN | TCP_ACK));
    send(&lab, &pkt(4000, 80, TCP_SYN));
    assert_eq!(counts(&lab), (table0 + 2, ring0));
    let ended = lab.h.director.maps.flows.get(&pkt(2001, 80, 0).key());
    assert!(ended.expect("entry").flags & FLOW_F_ENDED != 0);

    // Another service on the VIP without the fast path never takes it.
    let (table0, ring0) = counts(&lab);
    for s in 0..20 {
        send(&lab, &pkt(5000 + s, 81, TCP_ACK));
    }
    assert_eq!(counts(&lab), (table0 + 20, ring0));

    // A VIP's exact-port service wins over its every-port fast one: never by the ring.
    let to = |sport: u16, port: u16| {
        let mut p = Pkt::tcp(CLIENT, "198.18.0.101", sport, port);
        p.tcp_flags = TCP_ACK;
        send(&lab, &p)
    };
    let (table0, ring0) = counts(&lab);
    for s in 0..20 {
        assert_eq!(to(5100 + s, 81), 0x29, "the exact-port service's backend");
    }
    assert_eq!(counts(&lab), (table0 + 20, ring0));
    for s in 0..20 {
        assert!(matches!(to(5200 + s, 82), 0x1f | 0x20));
    }
    assert!(
        counts(&lab).1 > ring0,
        "other ports by the every-port service's ring"
    );

    // Drain the first flow's backend: its slots move, turn dirty before the ring flips, and
    // its established flows keep it through the table.
    let drained = owners[0];
    lab.runtime.insert(
        Reconciled::key(VIP, 80, 6, &format!("198.18.1.{drained}")),
        Runtime {
            drained: true,
            ..Runtime::default()
        },
    );
    lab.apply();
    let (table0, ring0) = counts(&lab);
    for _ in 0..32 {
        assert_eq!(send(&lab, &pkt(2000, 80, TCP_ACK)), drained, "kept");
    }
    assert_eq!(
        counts(&lab),
        (table0 + 32, ring0),
        "a dirty slot takes the table"
    );
    // A flow on a slot that kept its backend still goes by the ring.
    let stay = (2002..2030u16)
        .find(|&s| owners[(s - 2000) as usize] != drained)
        .expect("a flow on another backend");
    let (_, ring0) = counts(&lab);
    for _ in 0..64 {
        send(&lab, &pkt(stay, 80, TCP_ACK));
    }
    assert!(counts(&lab).1 > ring0, "unchanged slots stay clean");

    // The sweep keeps the slots where a flow still holds the drained backend dirty and
    // cleans the rest of the moved ones.
    let swept = sweep(&mut lab);
    let held: Vec<u16> = (2000..2030u16)
        .filter(|&s| owners[(s - 2000) as usize] == drained)
        .collect();
    for &s in &held {
        assert!(
            swept.blocked.contains(&(sid, slot(s))),
            "port {s} keeps its slot dirty"
        );
    }
    assert!(
        swept.cleaned > 0,
        "moved slots without old flows turn clean"
    );
    let (table0, ring0) = counts(&lab);
    for _ in 0..32 {
        assert_eq!(send(&lab, &pkt(2000, 80, TCP_ACK)), drained, "still kept");
    }
    assert_eq!(counts(&lab), (table0 + 32, ring0));
    // A new connection on a moved slot that no flow holds goes by the ring to its new
    // backend once clean.
    let moved = (6000..7000u16)
        .find(|&s| {
            !held.iter().any(|&h| slot(h) == slot(s))
                && send(&lab, &pkt(s, 80, TCP_SYN)) != drained
                && lab
                    .h
                    .director
                    .maps
                    .flows
                    .get(&pkt(s, 80, 0).key())
                    .is_some()
        })
        .expect("a flow");
    let (_, ring0) = counts(&lab);
    for _ in 0..64 {
        assert_ne!(send(&lab, &pkt(moved, 80, TCP_ACK)), drained);
    }
    assert!(counts(&lab).1 > ring0);

    // Other hash fields put every flow on another slot: all dirty again, and the flows keep
    // their backends through the table.
    lab.h.config.services[0].hash_fields = Some(vec![lb_userspace::config::HashField::SrcIp]);
    lab.apply();
    let (table0, ring0) = counts(&lab);
    for (i, &owner) in owners.iter().enumerate().skip(2) {
        assert_eq!(send(&lab, &pkt(2000 + i as u16, 80, TCP_ACK)), owner);
    }
    assert_eq!(
        counts(&lab),
        (table0 + 28, ring0),
        "all dirty after a hash change"
    );
}

/// An exact port whose `FAST_SERVICES` slot is its VIP's every-port fast service's (a hash
/// collision) still belongs to its own service: `SERVICES` decides, never the ring.
#[test]
fn a_colliding_exact_port_is_not_taken_by_an_every_port_fast_service() {
    let vip: std::net::Ipv4Addr = "198.18.0.102".parse().unwrap();
    let key = |port: u16| lb_common::VipKey {
        addr: lb_userspace::dataplane::addr_bytes(vip.into()).0,
        port_be: port.to_be(),
        proto: lb_common::IPPROTO_TCP,
        family: lb_common::AF_INET,
    };
    let wild = lb_userspace::reconcile::fast_slot_of(&key(0));
    let port = (1..=u16::MAX)
        .find(|&p| lb_userspace::reconcile::fast_slot_of(&key(p)) == wild)
        .expect("1,024 slots: some port collides");
    let yaml = format!(
        "
interfaces:
  - name: lo
flow_table_size: 65536
services:
  - name: every-port
    vip: {vip}
    port: 0
    protocol: tcp
    mode: dr
    ring_fast_path: true
    backends:
      - {{ address: 198.18.1.31, mac: '02:00:00:00:01:1f' }}
  - name: exact
    vip: {vip}
    port: {port}
    protocol: tcp
    mode: dr
    backends:
      - {{ address: 198.18.1.41, mac: '02:00:00:00:01:29' }}
"
    );
    let mut lab = Reconciled::new(&yaml);
    assert_eq!(sweep(&mut lab).cleaned, RING_SIZE as usize);
    let to = |sport: u16, dport: u16| {
        let mut p = Pkt::tcp(CLIENT, "198.18.0.102", sport, dport);
        p.tcp_flags = TCP_ACK;
        send(&lab, &p)
    };
    for s in 0..50 {
        assert_eq!(to(7000 + s, port), 0x29, "port {port}: the exact service");
    }
    assert_eq!(counts(&lab).1, 0, "never by the ring");
    for s in 0..50 {
        assert_eq!(to(7000 + s, port.wrapping_add(1).max(1)), 0x1f);
    }
    assert!(
        counts(&lab).1 > 0,
        "other ports by the every-port service's ring"
    );
}
