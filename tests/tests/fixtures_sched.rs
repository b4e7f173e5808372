//! Schedulers and persistence through BPF_PROG_TEST_RUN: rr/wrr splits per CPU, sh and
//! hash_fields stickiness, lc/wlc steering from active-flow counts, the data plane's
//! active-flow counting, persistence across ring changes and its expiry, and a reused
//! source port's new connection scheduled afresh.

use std::collections::{BTreeMap, HashMap};

use lb_tests::{Pkt, Reconciled, TCP_ACK, TCP_FIN, TCP_SYN, XDP_TX};
use lb_userspace::{
    health::{BackendKey, State},
    reconcile::Runtime,
};

const CONFIG: &str = "
interfaces:
  - name: lo
flow_table_size: 65536
services:
  - name: wrr
    vip: 198.18.0.100
    port: 80
    protocol: tcp
    mode: dr
    scheduler: wrr
    backends:
      - { address: 198.18.1.11, mac: '02:00:00:00:01:0b', weight: 300 }
      - { address: 198.18.1.12, mac: '02:00:00:00:01:0c', weight: 100 }
  - name: rr
    vip: 198.18.0.100
    port: 81
    protocol: tcp
    mode: dr
    scheduler: rr
    backends:
      - { address: 198.18.1.21, mac: '02:00:00:00:01:15', weight: 900 }
      - { address: 198.18.1.22, mac: '02:00:00:00:01:16', weight: 100 }
      - { address: 198.18.1.23, mac: '02:00:00:00:01:17', weight: 100 }
  - name: sh
    vip: 198.18.0.100
    port: 82
    protocol: udp
    mode: dr
    scheduler: sh
    backends:
      - { address: 198.18.1.31, mac: '02:00:00:00:01:1f' }
      - { address: 198.18.1.32, mac: '02:00:00:00:01:20' }
      - { address: 198.18.1.33, mac: '02:00:00:00:01:21' }
  - name: srcport
    vip: 198.18.0.100
    port: 83
    protocol: udp
    mode: dr
    hash_fields: [src_ip, dst_port]
    backends:
      - { address: 198.18.1.41, mac: '02:00:00:00:01:29' }
      - { address: 198.18.1.42, mac: '02:00:00:00:01:2a' }
      - { address: 198.18.1.43, mac: '02:00:00:00:01:2b' }
  - name: wlc
    vip: 198.18.0.100
    port: 84
    protocol: tcp
    mode: dr
    scheduler: wlc
    backends:
      - { address: 198.18.1.51, mac: '02:00:00:00:01:33' }
      - { address: 198.18.1.52, mac: '02:00:00:00:01:34' }
      - { address: 198.18.1.53, mac: '02:00:00:00:01:35' }
  - name: sticky
    vip: 198.18.0.100
    port: 85
    protocol: tcp
    mode: dr
    persistence: 2s
    backends:
      - { address: 198.18.1.61, mac: '02:00:00:00:01:3d' }
      - { address: 198.18.1.62, mac: '02:00:00:00:01:3e' }
      - { address: 198.18.1.63, mac: '02:00:00:00:01:3f' }
";

const VIP: &str = "198.18.0.100";

/// The reconciler's view of CONFIG applied to a loaded director.
struct Lab(Reconciled);

impl std::ops::Deref for Lab {
    type Target = Reconciled;
    fn deref(&self) -> &Reconciled {
        &self.0
    }
}

impl std::ops::DerefMut for Lab {
    fn deref_mut(&mut self) -> &mut Reconciled {
        &mut self.0
    }
}

impl Lab {
    fn new() -> Lab {
        Lab(Reconciled::new(CONFIG))
    }

    fn key(port: u16, proto: u8, addr: &str) -> BackendKey {
        Reconciled::key(VIP, port, proto, addr)
    }

    /// The backend (last octet of its address, from the MAC) a packet was sent to.
    fn send(&self, p: &Pkt) -> u8 {
        let (verdict, out) = self.h.run(&p.build());
        assert_eq!(verdict, XDP_TX, "{p:?}");
        out[5]
    }

    /// Drain a TCP backend (out of the ring) and apply.
    fn drain(&mut self, port: u16, addr: &str) {
        self.runtime.insert(
            Lab::key(port, 6, addr),
            Runtime {
                drained: true,
                ..Runtime::default()
            },
        );
        self.apply();
    }

    fn active(&self, addr: &str, port: u16, proto: u8) -> u64 {
        let id = self.ids.backends[&Lab::key(port, proto, addr)];
        self.h.director.maps.active_flows(id).expect("active")
    }
}

#[test]
fn wrr_splits_new_flows_by_weight_on_every_cpu_and_interleaves() {
    let lab = Lab::new();
    let mut sport = 10_000u16;
    for cpu in 0..lb_tests::cpus() {
        lb_tests::pin_to(0, cpu);
        let mut seq = Vec::new();
        for _ in 0..1000 {
            sport += 1;
            seq.push(lab.send(&Pkt::tcp("198.18.2.1", VIP, sport, 80)));
        }
        let a = seq.iter().filter(|&&b| b == 0x0b).count() as f64 / 1000.0;
        assert!(
            (a - 0.75).abs() <= 0.02,
            "CPU {cpu}: 3:1 split gave {a:.3} to the heavier backend"
        );
        // Smooth: never more than three in a row for 3:1.
        let longest = seq.chunk_by(|x, y| x == y).map(<[u8]>::len).max().unwrap();
        assert!(
            longest <= 3,
            "CPU {cpu}: a run of {longest}: {:?}",
            &seq[..16]
        );
    }
    // Established flows stay put whatever the cursor does.
    let first = lab.send(&Pkt::tcp("198.18.2.1", VIP, 10_001, 80));
    for _ in 0..5 {
        assert_eq!(lab.send(&Pkt::tcp("198.18.2.1", VIP, 10_001, 80)), first);
    }
}

#[test]
fn rr_ignores_weights() {
    let lab = Lab::new();
    lb_tests::pin_to(0, 0);
    let mut counts: BTreeMap<u8, usize> = BTreeMap::new();
    for sport in 0..300u16 {
        *counts
            .entry(lab.send(&Pkt::tcp("198.18.2.2", VIP, 20_000 + sport, 81)))
            .or_default() += 1;
    }
    assert_eq!(
        counts.values().copied().collect::<Vec<_>>(),
        vec![100, 100, 100]
    );
}

#[test]
fn sh_and_source_hash_fields_keep_a_client_on_one_backend() {
    let lab = Lab::new();
    for port in [82u16, 83] {
        let mut seen: BTreeMap<u8, usize> = BTreeMap::new();
        for client in 1..=60u8 {
            let src = format!("198.18.3.{client}");
            let first = lab.send(&Pkt::udp(&src, VIP, 30_000, port));
            for sport in 30_001..30_010u16 {
                assert_eq!(
                    lab.send(&Pkt::udp(&src, VIP, sport, port)),
                    first,
                    "port {port}: client {src} changed backend with its source port"
                );
            }
            *seen.entry(first).or_default() += 1;
        }
        assert_eq!(seen.len(), 3, "port {port}: clients spread: {seen:?}");
        assert!(seen.values().all(|&n| n >= 8), "port {port}: {seen:?}");
    }
}

#[test]
fn data_plane_counts_active_flows_and_wlc_steers_away_from_the_busy_backend() {
    let mut lab = Lab::new();
    let (a, b, c) = ("198.18.1.51", "198.18.1.52", "198.18.1.53");
    // 90 long-lived connections: count what the data plane counted.
    let mut owner = HashMap::new();
    for sport in 0..90u16 {
        let p = Pkt::tcp("198.18.4.1", VIP, 40_000 + sport, 84);
        owner.insert(sport, lab.send(&p));
    }
    let total: u64 = [a, b, c].iter().map(|x| lab.active(x, 84, 6)).sum();
    assert_eq!(total, 90, "one count per new flow");
    // A client FIN ends a DR flow's count once (a second FIN does not count again).
    let fin = Pkt::tcp("198.18.4.1", VIP, 40_000, 84).with_flags(TCP_FIN);
    lab.send(&fin);
    lab.send(&fin);
    let total: u64 = [a, b, c].iter().map(|x| lab.active(x, 84, 6)).sum();
    assert_eq!(total, 89);

    // The controller's view: `a` holds 200 long-lived connections, the others few.
    for (addr, n) in [(a, 200u64), (b, 5), (c, 5)] {
        lab.runtime.insert(
            Lab::key(84, 6, addr),
            Runtime {
                state: State::Up,
                active: n,
                ..Runtime::default()
            },
        );
    }
    lab.apply();
    let mut counts: BTreeMap<u8, usize> = BTreeMap::new();
    for sport in 0..400u16 {
        let p = Pkt::tcp("198.18.4.2", VIP, 50_000 + sport, 84);
        *counts.entry(lab.send(&p)).or_default() += 1;
    }
    let to_a = counts.get(&0x33).copied().unwrap_or(0);
    assert!(
        to_a * 100 <= 400 * 5,
        "new flows avoid the backend with many connections: {counts:?}"
    );
    // Established flows did not move.
    for (sport, mac) in owner.iter().take(20) {
        assert_eq!(
            lab.send(&Pkt::tcp("198.18.4.1", VIP, 40_000 + sport, 84)),
            *mac
        );
    }
}

#[test]
fn persistence_holds_across_ring_changes_until_down_or_expired() {
    let mut lab = Lab::new();
    let client = "198.18.5.7";
    let first = lab.send(&Pkt::tcp(client, VIP, 1000, 85));
    let addr = format!("198.18.1.{first}");
    // Without persistence the other ports would spread; with it they follow the first.
    for sport in 1001..1040u16 {
        assert_eq!(lab.send(&Pkt::tcp(client, VIP, sport, 85)), first);
    }
    // Drained (out of the ring): persistent clients still reach it, as in LVS.
    lab.drain(85, &addr);
    for sport in 2000..2010u16 {
        assert_eq!(
            lab.send(&Pkt::tcp(client, VIP, sport, 85)),
            first,
            "template kept across the ring change"
        );
    }
    // Another client never sees the drained backend.
    for sport in 0..30u16 {
        assert_ne!(
            lab.send(&Pkt::tcp("198.18.5.8", VIP, 3000 + sport, 85)),
            first
        );
    }
    // Expiry: after the timeout (2 s) the client is scheduled afresh (not to the drained one).
    std::thread::sleep(std::time::Duration::from_millis(2200));
    let next = lab.send(&Pkt::tcp(client, VIP, 4000, 85));
    assert_ne!(next, first, "expired template");
    for sport in 4001..4010u16 {
        assert_eq!(
            lab.send(&Pkt::tcp(client, VIP, sport, 85)),
            next,
            "new template"
        );
    }
    // Down: the template is not honoured.
    let next_addr = format!("198.18.1.{next}");
    lab.runtime.insert(
        Lab::key(85, 6, &next_addr),
        Runtime {
            state: State::Down,
            ..Runtime::default()
        },
    );
    lab.apply();
    let moved = lab.send(&Pkt::tcp(client, VIP, 5000, 85));
    assert_ne!(moved, next, "a down backend loses its persistent clients");
}

/// A client that ended a connection (FIN/RST) and opens a new one from the same source
/// port — clients reuse ports — gets it scheduled afresh, as with IPVS: not stuck to the
/// old backend, here a drained one. The ended flow's other packets, and a SYN on a flow the
/// client has not ended (a retransmission), keep their backend.
#[test]
fn a_syn_on_a_connection_the_client_ended_is_scheduled_afresh() {
    let mut lab = Lab::new();
    let pkt = |sport: u16, flags: u8| Pkt::tcp("198.18.6.1", VIP, sport, 80).with_flags(flags);
    // Two connections on one backend: the first ends, the other stays open.
    let owner = lab.send(&pkt(6000, TCP_SYN));
    let open = (6001..6010)
        .find(|&sport| lab.send(&pkt(sport, TCP_SYN)) == owner)
        .expect("wrr 3:1 sends one of every four to each backend at least");
    lab.send(&pkt(6000, TCP_FIN | TCP_ACK));
    let owner_addr = format!("198.18.1.{owner}");
    let owner_active = lab.active(&owner_addr, 80, 6);

    lab.drain(80, &owner_addr);
    assert_eq!(
        lab.send(&pkt(6000, TCP_ACK)),
        owner,
        "the ended connection's last ACK"
    );
    assert_eq!(
        lab.send(&pkt(open, TCP_SYN)),
        owner,
        "a retransmitted SYN of a connection not ended"
    );
    let again = lab.send(&pkt(6000, TCP_SYN));
    assert_ne!(again, owner, "a new connection on the reused port");
    assert_eq!(
        lab.send(&pkt(6000, TCP_ACK)),
        again,
        "the new connection's packets follow it"
    );
    // Counted once: the ended flow left its backend's count at its FIN, the new one adds one.
    assert_eq!(lab.active(&owner_addr, 80, 6), owner_active);
    assert_eq!(lab.active(&format!("198.18.1.{again}"), 80, 6), 1);
}
