//! Health, drain and reconciliation as the data plane sees them: the reconciler's desired
//! state (config + health + drains) applied to a loaded director, then packets through
//! BPF_PROG_TEST_RUN.

use std::collections::HashMap;

use lb_common::reason;
use lb_tests::{Pkt, Reconciled, XDP_DROP, XDP_PASS, XDP_TX};
use lb_userspace::{
    health::{BackendKey, State},
    reconcile::{Changes, Runtime},
};

const CONFIG: &str = "
interfaces:
  - name: lo
flow_table_size: 4096
services:
  - name: keep
    vip: 198.18.0.100
    port: 80
    protocol: tcp
    mode: dr
    backends:
      - { address: 198.18.1.11, mac: '02:00:00:00:01:0b' }
      - { address: 198.18.1.12, mac: '02:00:00:00:01:0c' }
      - { address: 198.18.1.13, mac: '02:00:00:00:01:0d' }
  - name: reset
    vip: 198.18.0.100
    port: 81
    protocol: tcp
    mode: dr
    on_backend_down: reset
    backends:
      - { address: 198.18.1.21, mac: '02:00:00:00:01:15' }
      - { address: 198.18.1.22, mac: '02:00:00:00:01:16' }
  - name: sorry
    vip: 198.18.0.100
    port: 82
    protocol: tcp
    mode: dr
    on_all_down: pass
    backends:
      - { address: 198.18.1.31, mac: '02:00:00:00:01:1f' }
";

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

    fn key(&self, port: u16, addr: &str) -> BackendKey {
        Reconciled::key("198.18.0.100", port, 6, addr)
    }

    fn set(&mut self, port: u16, addr: &str, state: State, drained: bool) -> Changes {
        let key = self.key(port, addr);
        self.runtime.insert(
            key,
            Runtime {
                state,
                drained,
                ..Runtime::default()
            },
        );
        self.apply()
    }

    /// (verdict, destination MAC's last byte) for one packet.
    fn send(&self, sport: u16, dport: u16) -> (u32, u8) {
        let (verdict, out) = self
            .h
            .run(&Pkt::tcp("198.18.2.9", "198.18.0.100", sport, dport).build());
        (verdict, out[5])
    }

    fn mac_of(addr: &str) -> u8 {
        // The fixtures' MACs end in the address's last octet, in hex.
        addr.rsplit('.').next().unwrap().parse::<u8>().unwrap()
    }
}

#[test]
fn down_backend_leaves_the_ring_and_keep_lets_its_flows_finish() {
    let mut lab = Lab::new();
    // Flows on every backend of `keep`.
    let mut owner = HashMap::new();
    for sport in 20000..20060u16 {
        let (v, mac) = lab.send(sport, 80);
        assert_eq!(v, XDP_TX);
        owner.insert(sport, mac);
    }
    let victim = Lab::mac_of("198.18.1.12");
    assert!(owner.values().any(|&m| m == victim), "some flows on .12");

    let ch = lab.set(80, "198.18.1.12", State::Down, false);
    assert_eq!(
        ch.backends_written, 1,
        "only the failed backend's entry: {ch}"
    );
    assert_eq!(ch.rings_flipped, 1, "only its service's ring: {ch}");
    assert!(lab.apply().is_empty(), "nothing to write twice");

    for (&sport, &mac) in &owner {
        assert_eq!(
            lab.send(sport, 80),
            (XDP_TX, mac),
            "keep: flow {sport} stays on its backend, down or not"
        );
    }
    for sport in 21000..21100u16 {
        let (v, mac) = lab.send(sport, 80);
        assert_eq!(v, XDP_TX);
        assert_ne!(mac, victim, "new flow {sport} went to the down backend");
    }

    // Back up: it takes new flows again. The inactive ring still holds the table from
    // before the failure, so the flip writes no slot at all (slots are diffed).
    let ch = lab.set(80, "198.18.1.12", State::Up, false);
    assert_eq!((ch.rings_flipped, ch.ring_slots_written), (1, 0), "{ch}");
    assert!(
        (22000..22100u16).any(|sport| lab.send(sport, 80).1 == victim),
        "a backend that came back takes new flows"
    );
}

#[test]
fn reset_reschedules_established_flows_of_a_down_backend() {
    let mut lab = Lab::new();
    let victim = Lab::mac_of("198.18.1.21");
    let sport = (30000..30100u16)
        .find(|&p| lab.send(p, 81).1 == victim)
        .expect("a flow on .21");
    lab.set(81, "198.18.1.21", State::Down, false);
    assert_eq!(
        lab.send(sport, 81),
        (XDP_TX, Lab::mac_of("198.18.1.22")),
        "reset: the flow moves to the surviving backend"
    );
    // The flow entry now belongs to .22: it stays there when .21 returns.
    lab.set(81, "198.18.1.21", State::Up, false);
    assert_eq!(lab.send(sport, 81).1, Lab::mac_of("198.18.1.22"));
}

#[test]
fn drained_backend_takes_no_new_flows_but_keeps_its_own() {
    let mut lab = Lab::new();
    let victim = Lab::mac_of("198.18.1.13");
    let sport = (40000..40100u16)
        .find(|&p| lab.send(p, 80).1 == victim)
        .expect("a flow on .13");
    lab.set(80, "198.18.1.13", State::Up, true);
    assert_eq!(
        lab.send(sport, 80),
        (XDP_TX, victim),
        "drain: flow finishes"
    );
    for p in 41000..41100u16 {
        assert_ne!(
            lab.send(p, 80).1,
            victim,
            "drained backend got new flow {p}"
        );
    }
}

#[test]
fn all_down_drops_or_passes_new_packets_as_configured() {
    let mut lab = Lab::new();
    // One established flow on `keep` before everything fails.
    let (_, owner) = lab.send(50000, 80);
    for a in ["198.18.1.11", "198.18.1.12", "198.18.1.13"] {
        lab.set(80, a, State::Down, false);
    }
    let before = lab.h.reason(reason::DROP_NO_BACKEND);
    assert_eq!(lab.send(50001, 80).0, XDP_DROP, "on_all_down: drop");
    assert_eq!(lab.h.reason(reason::DROP_NO_BACKEND), before + 1);
    assert_eq!(
        lab.send(50000, 80),
        (XDP_TX, owner),
        "keep: the established flow still reaches its backend"
    );

    lab.set(82, "198.18.1.31", State::Down, false);
    let before = lab.h.reason(reason::PASS_NO_BACKEND);
    assert_eq!(lab.send(50002, 82).0, XDP_PASS, "on_all_down: pass");
    assert_eq!(lab.h.reason(reason::PASS_NO_BACKEND), before + 1);

    // A pending backend (never checked yet) is not in the ring either.
    lab.set(82, "198.18.1.31", State::Pending, false);
    assert_eq!(lab.send(50003, 82).0, XDP_PASS);
    lab.set(82, "198.18.1.31", State::Up, false);
    assert_eq!(lab.send(50004, 82).0, XDP_TX);
}

/// The reconciler keeps `SERVICE_SLOTS` (the flow-hit path's view of services) in step
/// with `SERVICES`: a changed service reaches its slot, a removed service's slot is emptied
/// and its flows stop being forwarded.
#[test]
fn reconciler_keeps_service_slots_in_step() {
    let mut lab = Lab::new();
    let mirrors = |lab: &Lab| {
        for (key, id) in &lab.ids.services {
            let meta = lab.h.director.maps.services.get(key, 0).expect("service");
            let slot = lab.h.director.maps.service_slots.get(id, 0).expect("slot");
            assert_eq!(
                (slot.key, slot.meta),
                (*key, meta),
                "slot {id} mirrors SERVICES"
            );
        }
    };
    mirrors(&lab);
    let id_of = |lab: &Lab, port: u16| {
        lab.ids
            .services
            .iter()
            .find(|(k, _)| k.port_be == port.to_be())
            .map(|(_, v)| *v)
            .expect("service id")
    };
    let (keep, sorry) = (id_of(&lab, 80), id_of(&lab, 82));
    assert_eq!(lab.send(45000, 82).0, XDP_TX);

    // "keep" changes (on_all_down: pass), "sorry" (port 82) goes.
    let changed = CONFIG[..CONFIG.find("  - name: sorry").unwrap()].replace(
        "    mode: dr\n    backends:\n      - { address: 198.18.1.11",
        "    mode: dr\n    on_all_down: pass\n    backends:\n      - { address: 198.18.1.11",
    );
    assert_ne!(changed, CONFIG[..CONFIG.find("  - name: sorry").unwrap()]);
    lab.h.config =
        lb_userspace::config::Config::parse(&changed, &lb_userspace::config::AnyHost).unwrap();
    lab.apply();
    mirrors(&lab);
    let slot = |id: u32| lab.h.director.maps.service_slots.get(&id, 0).unwrap();
    assert_eq!(slot(keep).meta.flags, 0, "keep's slot follows its change");
    assert_eq!(
        slot(sorry),
        lb_common::ServiceSlot::default(),
        "removed service's slot is empty"
    );
    assert_eq!(
        lab.send(45000, 82).0,
        XDP_PASS,
        "its flows are not forwarded"
    );
}
