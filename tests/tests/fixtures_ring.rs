//! The ring fast path (`ring_fast_path: true`) through BPF_PROG_TEST_RUN: TCP packets on
//! clean ring slots go by the ring alone (counted as `fwd_dr_ring`), SYNs too, unrecorded;
//! a FIN or RST also ends an entry the table holds; a backend change dirties exactly the slots
//! it moves, which keep sending connections the table lacks to their held (old) backend
//! for `ring_fast_path_hold` and record them; the sweep cleans a dirty slot only after the
//! hold and when no flow there disagrees with the ring; a service that turns the fast path
//! off stays held that long.

use std::time::Duration;

use lb_common::{
    flow_hash, reason, FLOW_F_ENDED, RING_SIZE, SERVICE_F_RING_FAST, SERVICE_F_RING_HELD,
};
use lb_tests::{Pkt, Reconciled, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN, XDP_TX};
use lb_userspace::{dataplane::Swept, reconcile::Runtime};

/// `ring_fast_path_hold` of the `fast` service.
const HOLD: Duration = Duration::from_secs(2);

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
    ring_fast_path_hold: 2s
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
    Pkt::tcp(CLIENT, VIP, sport, dport).with_flags(flags)
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

fn recorded(lab: &Reconciled, sport: u16) -> bool {
    lab.h
        .director
        .maps
        .flows
        .get(&pkt(sport, 80, 0).key())
        .is_some()
}

/// The `fast` service's flags in `SERVICES`.
fn flags(lab: &Reconciled) -> u8 {
    let key = lb_userspace::reconcile::vip_key(&lab.h.config.services[0]);
    lab.h
        .director
        .maps
        .services
        .get(&key, 0)
        .expect("service")
        .flags
}

#[test]
fn clean_slots_skip_the_table_and_changed_slots_keep_their_connections() {
    let mut lab = Reconciled::new(CONFIG);
    let sid = lab.ids.services[&lb_userspace::reconcile::vip_key(&lab.h.config.services[0])];
    assert_eq!(
        flags(&lab) & (SERVICE_F_RING_FAST | SERVICE_F_RING_HELD),
        SERVICE_F_RING_FAST | SERVICE_F_RING_HELD
    );

    // A new service starts all dirty: everything takes the table (and is recorded) until a
    // sweep, which cleans every slot at once (no connection can be missing from the table).
    let owners: Vec<u8> = (2000..2030)
        .map(|s| send(&lab, &pkt(s, 80, TCP_SYN)))
        .collect();
    assert_eq!(send(&lab, &pkt(2000, 80, TCP_ACK)), owners[0]);
    assert_eq!(counts(&lab), (31, 0), "all slots dirty at first");
    assert!(recorded(&lab, 2000));
    let swept = sweep(&mut lab);
    assert_eq!(
        swept.cleaned,
        2 * RING_SIZE as usize,
        "every slot of both fast services"
    );
    assert!(swept.blocked.is_empty());

    // Clean: new connections go by the ring, SYN and data alike, and are not recorded.
    let (table0, ring0) = counts(&lab);
    let fresh: Vec<u8> = (3000..3030)
        .map(|s| send(&lab, &pkt(s, 80, TCP_SYN)))
        .collect();
    for (i, &to) in fresh.iter().enumerate() {
        for _ in 0..64 {
            assert_eq!(send(&lab, &pkt(3000 + i as u16, 80, TCP_ACK)), to);
        }
        assert!(!recorded(&lab, 3000 + i as u16), "not recorded");
    }
    assert_eq!(counts(&lab), (table0, ring0 + 30 * 65), "all by the ring");

    // A FIN or RST goes by the ring too and ends the entry of a recorded connection (on a
    // clean slot its backend is the ring's); an unrecorded one stays unrecorded.
    let (table0, ring0) = counts(&lab);
    assert_eq!(send(&lab, &pkt(2001, 80, TCP_FIN | TCP_ACK)), owners[1]);
    assert_eq!(send(&lab, &pkt(3001, 80, TCP_RST)), fresh[1]);
    assert_eq!(counts(&lab), (table0, ring0 + 2));
    let ended = lab.h.director.maps.flows.get(&pkt(2001, 80, 0).key());
    assert!(ended.expect("entry").flags & FLOW_F_ENDED != 0);
    assert!(!recorded(&lab, 3001));

    // Another service on the VIP without the fast path never takes it.
    let (table0, ring0) = counts(&lab);
    for s in 0..20 {
        send(&lab, &pkt(5000 + s, 81, TCP_ACK));
    }
    assert_eq!(counts(&lab), (table0 + 20, ring0));

    // A VIP's exact-port service wins over its every-port fast one: never by the ring.
    let to = |sport: u16, port: u16| {
        let p = Pkt::tcp(CLIENT, "198.18.0.101", sport, port).with_flags(TCP_ACK);
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

    // Drain the backend of unrecorded connection 3000: its slots move and turn dirty, holding
    // it, before the ring flips. The unrecorded connections there keep it through the table
    // (and are recorded now); recorded ones keep theirs; a new connection (SYN) on a moved
    // slot goes to the new ring.
    let drained = fresh[0];
    lab.runtime.insert(
        Reconciled::key(VIP, 80, 6, &format!("198.18.1.{drained}")),
        Runtime {
            drained: true,
            ..Runtime::default()
        },
    );
    lab.apply();
    let (table0, ring0) = counts(&lab);
    let kept: Vec<u16> = (3000..3030u16)
        .filter(|&s| fresh[(s - 3000) as usize] == drained && s != 3001)
        .collect();
    for &s in &kept {
        assert_eq!(send(&lab, &pkt(s, 80, TCP_ACK)), drained, "port {s} kept");
        assert!(recorded(&lab, s), "port {s} recorded on its dirty slot");
    }
    let recorded_kept: Vec<u16> = (2000..2030u16)
        .filter(|&s| owners[(s - 2000) as usize] == drained && s != 2001)
        .collect();
    for &s in &recorded_kept {
        assert_eq!(
            send(&lab, &pkt(s, 80, TCP_ACK)),
            drained,
            "recorded {s} kept"
        );
    }
    assert_eq!(
        counts(&lab),
        (table0 + (kept.len() + recorded_kept.len()) as u64, ring0),
        "a dirty slot takes the table"
    );
    let moved = (10_000..20_000u16)
        .find(|&s| {
            !kept.iter().any(|&k| slot(k) == slot(s)) && {
                let (t0, _) = counts(&lab);
                let to = send(&lab, &pkt(s, 80, TCP_SYN));
                let by_table = counts(&lab).0 > t0;
                if by_table {
                    assert_ne!(to, drained, "a SYN on a moved slot takes the new ring");
                }
                by_table
            }
        })
        .expect("a port on a moved slot");
    assert!(recorded(&lab, moved), "a SYN on a dirty slot is recorded");
    // A flow on a slot that kept its backend still goes by the ring.
    let stay = (3002..3030u16)
        .find(|&s| fresh[(s - 3000) as usize] != drained)
        .expect("a connection on another backend");
    let (_, ring0) = counts(&lab);
    send(&lab, &pkt(stay, 80, TCP_ACK));
    assert_eq!(counts(&lab).1, ring0 + 1, "unchanged slots stay clean");

    // Within the hold the sweep cleans no moved slot; after it, it keeps those where a flow
    // still holds the drained backend and cleans the rest.
    assert_eq!(sweep(&mut lab).cleaned, 0, "held");
    std::thread::sleep(HOLD);
    let swept = sweep(&mut lab);
    for &s in &kept {
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
    assert_eq!(
        send(&lab, &pkt(kept[0], 80, TCP_ACK)),
        drained,
        "still kept"
    );
    assert_eq!(counts(&lab), (table0 + 1, ring0));

    // Turning the fast path off: the service stays held (no ring fast path, dirty slots
    // still hold) for its hold, then the next reconcile lets it go.
    lab.h.config.services[0].ring_fast_path = false;
    lab.apply();
    assert_eq!(
        flags(&lab) & (SERVICE_F_RING_FAST | SERVICE_F_RING_HELD),
        SERVICE_F_RING_HELD
    );
    let (table0, ring0) = counts(&lab);
    assert_eq!(
        send(&lab, &pkt(stay, 80, TCP_ACK)),
        fresh[(stay - 3000) as usize]
    );
    assert_eq!(counts(&lab), (table0 + 1, ring0), "by the table now");
    assert!(!lab.h.director.leaving_done());
    std::thread::sleep(HOLD);
    // The connections that keep slots dirty end (as if the LRU had let them go).
    for s in (2000..2030).chain(3000..3030) {
        let _ = lab.h.director.maps.flows.remove(&pkt(s, 80, 0).key());
    }
    let _ = sweep(&mut lab);
    assert!(lab.h.director.leaving_done(), "hold over, every slot clean");
    lab.apply();
    assert_eq!(flags(&lab) & (SERVICE_F_RING_FAST | SERVICE_F_RING_HELD), 0);
}

/// While a service's slots are held, a reload that would put its connections on other
/// slots (or give them to another scheduler) is refused; a `hash_fields` change that gets
/// through anyway (a restart with pinned maps) turns every slot dirty, and recorded flows
/// keep their backends.
#[test]
fn a_held_service_keeps_its_slots() {
    let mut lab = Reconciled::new(CONFIG);
    let owners: Vec<u8> = (2000..2030)
        .map(|s| send(&lab, &pkt(s, 80, TCP_SYN)))
        .collect();
    let mut cfg = lab.h.config.clone();
    cfg.services[0].hash_fields = Some(vec![lb_userspace::config::HashField::SrcIp]);
    let e = lab.h.director.held_hash_change(&cfg).expect("refused");
    assert!(
        e.contains("service fast") && e.contains("ring_fast_path: false"),
        "{e}"
    );
    let mut rr = lab.h.config.clone();
    rr.services[0].scheduler = lb_userspace::config::Scheduler::Rr;
    assert!(lab.h.director.held_hash_change(&rr).is_some());
    let mut more = lab.h.config.clone();
    more.services[0].backends.pop();
    assert!(
        lab.h.director.held_hash_change(&more).is_none(),
        "a backend change is fine"
    );

    let _ = sweep(&mut lab);
    lab.h.config = cfg;
    lab.apply();
    let (table0, ring0) = counts(&lab);
    for (i, &owner) in owners.iter().enumerate() {
        assert_eq!(send(&lab, &pkt(2000 + i as u16, 80, TCP_ACK)), owner);
    }
    assert_eq!(
        counts(&lab),
        (table0 + 30, ring0),
        "all dirty after a hash change"
    );
}

/// An exact port whose `SERVICE_INDEX` slot is its VIP's every-port fast service's (a hash
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
    let wild = lb_userspace::reconcile::index_slot_of(&key(0));
    let port = (1..=u16::MAX)
        .find(|&p| lb_userspace::reconcile::index_slot_of(&key(p)) == wild)
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
        let p = Pkt::tcp(CLIENT, "198.18.0.102", sport, dport).with_flags(TCP_ACK);
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

/// At most this many instructions processed by the verifier for any build of the director:
/// about a third of the kernel's limit (1M), so a kernel whose verifier explores more, or
/// the next feature, does not stop the director from loading. Before the NAT and TUN paths
/// became global functions (verified once, not once per caller state) this build took 969k.
/// 250k until the twenty-first session, when the TUN fast path went inline (a TUN hit
/// ~6-8 ns cheaper): the uncut director went 141k -> 236k, the largest stage cut to 319k.
/// Since 2026-12-06 a new flow's service lookup is a global function (`xdplb_service_id`):
/// the debug-log build 255k -> 195k, the largest stage cut 339k -> 228k.
const VERIFIER_BUDGET: u32 = 350_000;

#[test]
fn the_director_verifies_well_within_the_kernels_limit() {
    // The largest build: ring fast path compiled in (this config), with and without the
    // debug log, and every stage cut of the benchmark's breakdown.
    let check = |what: &str, h: lb_tests::Harness| {
        let info = h.director.director_program().info().expect("program info");
        let processed = info
            .verified_instruction_count()
            .expect("the kernel reports verified instructions");
        assert!(
            processed <= VERIFIER_BUDGET,
            "{what}: the verifier processed {processed} instructions, over the budget of \
             {VERIFIER_BUDGET} (the kernel gives up at 1M)"
        );
    };
    check("debug log", lb_tests::Harness::with_debug_log(CONFIG, true));
    for stage in 0..=lb_common::stage::LAST {
        check(
            &format!("stop after stage {stage}"),
            lb_tests::Harness::stopping_after(CONFIG, stage),
        );
    }
}

/// The data plane calls no `memcpy`, `memmove`, `memset`, `memcmp` or `bcmp` outside the
/// ICMP error paths. bpf-linker supplies them as byte loops, and LLVM calls them where a
/// copy's size or alignment does not suit its inline expansion. A way's 88-byte value copy,
/// written as an assignment, became such a call, and a new NAT flow cost 150–200 ns more
/// (twenty-sixth session; `flow::copy_value` copies in words now). Reads the object's
/// relocations, so it needs no kernel.
#[test]
fn the_data_path_calls_no_byte_loop_memory_functions() {
    use object::{Object, ObjectSection, ObjectSymbol, RelocationTarget, SymbolKind};
    let file = object::File::parse(lb_userspace::dataplane::OBJECT).expect("the BPF object");
    let functions: Vec<_> = file
        .symbols()
        .filter(|s| s.kind() == SymbolKind::Text && s.size() > 0)
        .filter_map(|s| Some((s.section_index()?, s.address(), s.size(), s.name().ok()?)))
        .collect();
    let byte_loops = ["memcpy", "memmove", "memset", "memcmp", "bcmp"];
    let mut calls = Vec::new();
    for section in file.sections() {
        for (offset, reloc) in section.relocations() {
            let RelocationTarget::Symbol(target) = reloc.target() else {
                continue;
            };
            let target = file
                .symbol_by_index(target)
                .and_then(|s| s.name().map(str::to_owned));
            let Ok(target) = target else { continue };
            if !byte_loops.contains(&target.as_str()) {
                continue;
            }
            let caller = functions
                .iter()
                .find(|(sec, addr, size, _)| {
                    *sec == section.index() && (*addr..addr + size).contains(&offset)
                })
                .map_or("?", |f| f.3);
            calls.push((caller.to_owned(), target));
        }
    }
    assert!(
        calls.iter().any(|(caller, _)| caller.contains("icmp")),
        "the ICMP error paths' calls are found (the check reads the object right): {calls:?}"
    );
    let hot: Vec<_> = calls
        .iter()
        .filter(|(caller, _)| !caller.contains("icmp"))
        .collect();
    assert!(hot.is_empty(), "byte-loop calls outside ICMP: {hot:?}");
}
