//! Service lookup and backend selection: the VIP table, the Maglev rings, the backends.

use aya_ebpf::btf_maps::{
    Array as BtfArray, HashMap as BtfHashMap, LruHashMap as BtfLruHashMap,
    PerCpuArray as BtfPerCpuArray,
};
use aya_ebpf::{helpers::bpf_ktime_get_coarse_ns, macros::btf_map};
use lb_common::{
    flow_hash_fields, index_slot, mode, reason, sched, vip_filter_bit_of_halves, Backend, FlowKey,
    PersistKey, PersistValue, RingEntry, ServiceMeta, ServiceSlot, VipAddr, VipKey, BACKEND_F_DOWN,
    BACKEND_F_RESET, BACKEND_F_RETIRED, BACKEND_F_VALID, INDEX_SLOT_SHARED, MAX_BACKENDS,
    MAX_SERVICES, MAX_VIPS, NO_BACKEND, PERSIST_CAPACITY, RINGS_PER_SERVICE, RING_DIRTY_WORDS,
    RING_ENTRIES, RING_SIZE, RING_SLOTS_PER_ENTRY, SERVICE_F_RING_FAST, SERVICE_F_RING_HELD,
    SERVICE_INDEX_SLOTS, VIP_FILTER_WORDS,
};

#[btf_map]
static SERVICES: BtfHashMap<VipKey, ServiceMeta, { MAX_SERVICES as usize }> = BtfHashMap::new();

/// `SERVICES` by service id (see [`ServiceSlot`]): an established flow's service without
/// hashing the VIP.
#[btf_map]
static SERVICE_SLOTS: BtfArray<ServiceSlot, { MAX_SERVICES as usize }> = BtfArray::new();

/// The service of an established flow, by the id the flow recorded, if that still is the
/// service of the packet's destination (ids are reused; a removed service's slot is empty).
#[inline(always)]
pub fn service_by_id(id: u32, key: &FlowKey) -> Option<&'static ServiceMeta> {
    Some(&service_slot(id, key)?.meta)
}

/// [`service_by_id`]'s slot: its key says whether the service is an every-port one.
#[inline(always)]
fn service_slot(id: u32, key: &FlowKey) -> Option<&'static ServiceSlot> {
    let slot = SERVICE_SLOTS.get(id)?;
    let k = &slot.key;
    if k.family != key.family
        || k.proto != key.proto
        || (k.port_be != key.dport_be && k.port_be != 0)
        || !lb_ebpf::eq16(&k.addr, &key.dst)
    {
        return None;
    }
    Some(slot)
}

/// What a NAT reply (`key`, as it arrives from the backend) of a flow of `service` to
/// `backend` gets as its source: the service's VIP and port. `None` where the ids do not fit
/// the packet — not a NAT service of the packet's family and protocol, a backend no longer
/// usable or of another service, or not the packet's source address and port — or where
/// the port cannot be told from them: an every-port service whose backend has its own port
/// (the client's destination port is in the reply mapping only).
#[inline(always)]
pub fn reply_source(service: u32, id: u32, key: &FlowKey) -> Option<(&'static [u8; 16], u16)> {
    let slot = SERVICE_SLOTS.get(service)?;
    let b = backend(id)?;
    let k = &slot.key;
    if slot.meta.mode != mode::NAT
        || k.family != key.family
        || k.proto != key.proto
        || b.family != key.family
        || b.service != service
        || !lb_ebpf::eq16(&b.addr, &key.src)
    {
        return None;
    }
    let vip_port = match (k.port_be, b.port_be) {
        (0, 0) => key.sport_be,
        (0, _) => return None,
        (port, _) => port,
    };
    let backend_port = if b.port_be != 0 { b.port_be } else { vip_port };
    (key.sport_be == backend_port).then_some((&k.addr, vip_port))
}

/// All rings back to back, four slots per element: ring `r` is elements
/// `r * RING_ENTRIES .. (r + 1) * RING_ENTRIES` (see [`RingEntry`]).
#[btf_map]
static RINGS: BtfArray<RingEntry, { (MAX_SERVICES * RINGS_PER_SERVICE * RING_ENTRIES) as usize }> =
    BtfArray::new();

#[btf_map]
static BACKENDS: BtfArray<Backend, { MAX_BACKENDS as usize }> = BtfArray::new();

/// Bitmap of the VIP addresses (see [`lb_common::vip_filter_bit`]).
#[btf_map]
static VIP_FILTER: BtfArray<u64, { VIP_FILTER_WORDS as usize }> = BtfArray::new();

/// Whether `key`'s destination may be a VIP address. False means certainly not: no flow
/// and no service can match the packet.
#[inline(always)]
pub fn maybe_vip(key: &FlowKey) -> bool {
    let (lo, hi) = dst_halves(key);
    let bit = vip_filter_bit_of_halves(lo, hi, key.family);
    match VIP_FILTER.get(bit / 64) {
        Some(w) => (*w >> (bit % 64)) & 1 != 0,
        None => true,
    }
}

/// The packet's destination as two 8-byte halves (see [`lb_common::addr_halves`]).
#[inline(always)]
fn dst_halves(key: &FlowKey) -> (u64, u64) {
    // `FlowKey` is 8-aligned and `dst` sits at offset 16: two aligned loads (a byte array
    // read through `from_ne_bytes` would be sixteen byte loads).
    let dst = key.dst.as_ptr() as *const u64;
    // SAFETY: 16 bytes, 8-aligned (above).
    unsafe { (dst.read(), dst.add(1).read()) }
}

/// Every VIP address (of any service): ICMP echo to one is answered by the director.
#[btf_map]
static VIPS: BtfHashMap<VipAddr, u32, { MAX_VIPS as usize }> = BtfHashMap::new();

#[inline(always)]
pub fn is_vip(addr: [u8; 16], family: u8) -> bool {
    let key = VipAddr {
        addr,
        family,
        _pad: [0; 3],
    };
    unsafe { VIPS.get(&key) }.is_some()
}

/// The service this flow's destination belongs to: exact port first, then the port-0
/// wildcard entry of the VIP. A reference into the map, not a copy: the caller's frame
/// stays small (the BPF stack is 512 bytes per call chain), and map values stay valid for
/// the program's run (RCU).
///
/// `SERVICE_INDEX` answers first: an array word and the named service's `SERVICE_SLOTS`
/// key, against a jhash of the 20-byte key, a bucket walk and a compare in `SERVICES` (in
/// kernel calls, whose returns this kernel's "Safe RET" makes dear). Every service is in
/// the index, so where the packet's slot names a service of its exact port, that is its
/// service. Anything else (a shared slot, no service named, an every-port service) asks
/// `SERVICES` for the id. Either way the service is read from its `SERVICE_SLOTS` entry,
/// checked against the packet: one kind of map value for the verifier to follow on. (A
/// second index step for every-port services, and a `SERVICES` value on one branch, took
/// its count for the director from 255k to 369k and 521k instructions.)
#[inline(always)]
pub fn service(key: &FlowKey) -> Result<&'static ServiceMeta, u32> {
    let id = xdplb_service_id(key);
    match service_slot(id, key) {
        Some(slot) => Ok(&slot.meta),
        None => Err(reason::PASS_NON_VIP),
    }
}

/// [`service`]'s id: out of line and global, so the verifier walks its branches once,
/// not once per state of every caller, and each caller goes on with one unknown id.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn xdplb_service_id(key: *const FlowKey) -> u32 {
    // SAFETY: null or valid, from `service`.
    let Some(key) = (unsafe { key.as_ref() }) else {
        return NO_SERVICE;
    };
    match indexed(key) {
        NO_SERVICE => service_hashed(key),
        id => id,
    }
}

/// No service: [`indexed`], [`service_hashed`].
const NO_SERVICE: u32 = u32::MAX;

/// The service `SERVICE_INDEX` names for `key`'s exact (VIP, port, protocol), if that
/// service has this exact port; else [`NO_SERVICE`].
#[inline(always)]
fn indexed(key: &FlowKey) -> u32 {
    let (lo, hi) = dst_halves(key);
    let slot = index_slot(lo, hi, key.family, key.dport_be, key.proto);
    let Some(&id) = SERVICE_INDEX.get(slot) else {
        return NO_SERVICE;
    };
    if id == 0 || id == INDEX_SLOT_SHARED {
        return NO_SERVICE;
    }
    match service_slot(id - 1, key) {
        Some(s) if s.key.port_be != 0 => id - 1,
        _ => NO_SERVICE,
    }
}

/// The id of [`service`] by the `SERVICES` hash alone ([`NO_SERVICE`] for none).
#[inline(always)]
fn service_hashed(key: &FlowKey) -> u32 {
    match unsafe { SERVICES.get(&VipKey::of_flow(key, key.dport_be)) } {
        Some(svc) => svc.id,
        None => match unsafe { SERVICES.get(&VipKey::of_flow(key, 0)) } {
            Some(svc) => svc.id,
            None => NO_SERVICE,
        },
    }
}

/// Every service by [`index_slot`] of (VIP, port, protocol): id + 1, 0 for none,
/// [`INDEX_SLOT_SHARED`] for two (see [`lb_common::SERVICE_INDEX_SLOTS`]).
#[btf_map]
static SERVICE_INDEX: BtfArray<u32, { SERVICE_INDEX_SLOTS as usize }> = BtfArray::new();

/// Dirty ring slots of each service (see [`lb_common::RING_DIRTY_WORDS`]).
#[btf_map]
static RING_DIRTY: BtfArray<u64, { (MAX_SERVICES * RING_DIRTY_WORDS) as usize }> = BtfArray::new();

/// The ring-fast-path service of `key`'s destination, if it has one: `SERVICE_INDEX` (exact
/// port, then every port), checked against the service's own key, so a slot another
/// service shares, a removed service or a reused id never match a foreign packet; an
/// every-port service is confirmed through [`service`], where exact ports win. Inline,
/// without [`service`]'s call where the index tells (a TCP packet of a fast-path service
/// pays no call at all: with the call, the hit at 1M flows read 82 ns against 68).
#[inline(always)]
pub fn fast_service(key: &FlowKey) -> Option<&'static ServiceMeta> {
    let (lo, hi) = dst_halves(key);
    let id = *SERVICE_INDEX.get(index_slot(lo, hi, key.family, key.dport_be, key.proto))?;
    let svc = match id {
        // No service on this exact port: perhaps one on every port of the VIP — but an
        // exact-port service wins over it, so [`service`] decides.
        0 => match *SERVICE_INDEX.get(index_slot(lo, hi, key.family, 0, key.proto))? {
            0 => return None,
            _ => service(key).ok()?,
        },
        INDEX_SLOT_SHARED => service(key).ok()?,
        id => {
            let slot = service_slot(id - 1, key)?;
            // An every-port service met here by a slot collision: [`service`] decides too.
            if slot.key.port_be == 0 {
                service(key).ok()?
            } else {
                &slot.meta
            }
        }
    };
    if svc.flags & SERVICE_F_RING_FAST == 0 {
        return None;
    }
    Some(svc)
}

/// The ring fast path (`ring_fast_path: true`): for a TCP packet of such a service (its
/// [`fast_service`]), the backend of its ring slot when the slot is clean (every connection
/// there has the ring's backend) and the backend usable — no flow-table lookup: its id and
/// entry. `None` sends the packet the table's way: a dirty slot, no usable backend.
#[inline(always)]
pub fn ring_fast(svc: &'static ServiceMeta, key: &FlowKey) -> Option<(u32, &'static Backend)> {
    let pos = ring_pos(svc, key);
    if dirty(svc, pos)? {
        return None;
    }
    let id = ring_slot(svc, pos)?;
    Some((id, backend(id)?))
}

/// The ring slot of `key` in `svc`'s ring (its `hash_fields`).
#[inline(always)]
fn ring_pos(svc: &ServiceMeta, key: &FlowKey) -> u32 {
    let hash = if svc.hash_fields == 0 {
        lb_common::flow_hash(key)
    } else {
        masked_hash(key, svc.hash_fields)
    };
    hash % RING_SIZE
}

/// Whether ring slot `pos` of `svc` is dirty (see [`lb_common::RING_DIRTY_WORDS`]).
#[inline(always)]
fn dirty(svc: &ServiceMeta, pos: u32) -> Option<bool> {
    let word = RING_DIRTY.get(svc.id * RING_DIRTY_WORDS + pos / 64)?;
    Some((*word >> (pos % 64)) & 1 != 0)
}

/// Held backends of ring slots (see [`SERVICE_F_RING_HELD`]), one ring per service.
#[btf_map]
static RING_HELD: BtfArray<RingEntry, { (MAX_SERVICES * RING_ENTRIES) as usize }> = BtfArray::new();

/// For a connection of `svc` the flow table does not hold (a non-SYN packet without an
/// entry): the held backend of its slot, if the slot is dirty and that backend usable. The
/// connection may have begun on the fast path before the slot changed, unrecorded.
#[inline(always)]
pub fn held(svc: &ServiceMeta, key: &FlowKey) -> Option<u32> {
    if svc.flags & SERVICE_F_RING_HELD == 0 {
        return None;
    }
    match held_out(svc, key) {
        NO_BACKEND => None,
        id => Some(id),
    }
}

/// Out of line (a miss path): its hash stays off the caller's frame (the BPF stack is 512
/// bytes per call chain); [`NO_BACKEND`] for none.
#[inline(never)]
fn held_out(svc: &ServiceMeta, key: &FlowKey) -> u32 {
    let pos = ring_pos(svc, key);
    if dirty(svc, pos) != Some(true) {
        return NO_BACKEND;
    }
    let Some(entry) = RING_HELD.get(svc.id * RING_ENTRIES + pos / RING_SLOTS_PER_ENTRY) else {
        return NO_BACKEND;
    };
    let id = entry.slot(pos);
    if backend(id).is_none() {
        return NO_BACKEND;
    }
    id
}

/// [`flow_hash_fields`] out of line: its masked copy of the key stays off the caller's
/// frame (the BPF stack is 512 bytes per call chain).
#[inline(never)]
fn masked_hash(key: &FlowKey, fields: u8) -> u32 {
    flow_hash_fields(key, fields)
}

/// Controller bookkeeping (layout and program version); never read here, but it lives in
/// the object so it is created and pinned with the other maps.
#[btf_map]
static META: BtfArray<u64, { lb_common::meta::COUNT as usize }> = BtfArray::new();

/// A usable backend by id: `None` if the slot was removed, or if its flows must be
/// rescheduled (down with `on_backend_down: reset`).
#[inline(always)]
pub fn backend(id: u32) -> Option<&'static Backend> {
    let b = BACKENDS.get(id)?;
    if b.flags & (BACKEND_F_VALID | BACKEND_F_RESET) != BACKEND_F_VALID {
        return None;
    }
    Some(b)
}

/// Round robin: each CPU's position in its service's sequence. Per CPU, so advancing it
/// needs no atomic and no cache line bounces; every CPU walks the same smooth sequence, so
/// each CPU's split follows the weights on its own.
#[btf_map]
static RR_CURSOR: BtfPerCpuArray<u32, { MAX_SERVICES as usize }> = BtfPerCpuArray::new();

/// Persistence templates (LVS `-p`): client of a service -> backend, last use. A common
/// LRU list: a client's flows can arrive on any CPU.
#[btf_map]
static PERSIST: BtfLruHashMap<PersistKey, PersistValue, { PERSIST_CAPACITY as usize }> =
    BtfLruHashMap::new();

/// Active flows per backend (for `lc`/`wlc` and `status`): +1 when a flow is recorded, -1
/// when it ends (FIN/RST, NAT close, rescheduling); the controller corrects it from the
/// flow table for flows the table evicted. Per CPU, so no atomics: a flow may start on one
/// CPU and end on another, so a CPU's value can be negative; the sum over CPUs is the count.
#[btf_map]
static BACKEND_ACTIVE: BtfPerCpuArray<i64, { MAX_BACKENDS as usize }> = BtfPerCpuArray::new();

/// Add `delta` to a backend's active-flow count on this CPU.
#[inline(always)]
pub fn active_add(id: u32, delta: i64) {
    if let Some(p) = BACKEND_ACTIVE.get_ptr_mut(id) {
        // SAFETY: this CPU's slot.
        unsafe { *p += delta };
    }
}

/// A new flow's backend by the service's scheduler: a hash of the chosen fields into the
/// live ring, or the next slot of the round-robin sequence.
#[inline(always)]
pub fn schedule(svc: &ServiceMeta, key: &FlowKey) -> Result<u32, u32> {
    let pos = if svc.scheduler == sched::ROUND_ROBIN {
        let cursor = RR_CURSOR
            .get_ptr_mut(svc.id)
            .ok_or(reason::PASS_NO_BACKEND)?;
        // SAFETY: this CPU's slot; no other CPU touches it.
        let c = unsafe { *cursor };
        unsafe { *cursor = c.wrapping_add(1) };
        // checked_rem: a runtime `%` would bring a panic path the verifier rejects; an
        // empty sequence (rr_len 0) means no backend.
        c.checked_rem(svc.rr_len).ok_or(reason::PASS_NO_BACKEND)?
    } else {
        ring_pos(svc, key)
    };
    ring_slot(svc, pos).ok_or(reason::PASS_NO_BACKEND)
}

/// The backend id in slot `pos` of the service's live ring, `None` for an empty slot.
#[inline(always)]
fn ring_slot(svc: &ServiceMeta, pos: u32) -> Option<u32> {
    let entry = RINGS.get(svc.ring * RING_ENTRIES + pos / RING_SLOTS_PER_ENTRY)?;
    match entry.slot(pos) {
        NO_BACKEND => None,
        id => Some(id),
    }
}

/// [`schedule`] behind the service's persistence (see [`choose_inner`]). Inline in its one
/// caller, `flow::lookup_out`, itself out of line (until 2026-12-06 one more call, which on
/// this kernel's "Safe RET" returns cost every new flow a few ns).
#[inline(always)]
pub fn choose(svc: &ServiceMeta, key: &FlowKey) -> Result<u32, u32> {
    choose_inner(svc, key)
}

/// A client seen within `persist_s` gets the backend of its template (unless that backend
/// is down, reset or removed); otherwise it is scheduled and the template (re)written.
#[inline(always)]
fn choose_inner(svc: &ServiceMeta, key: &FlowKey) -> Result<u32, u32> {
    if svc.persist_s == 0 {
        return schedule(svc, key);
    }
    let pk = PersistKey {
        client: key.src,
        service: svc.id,
    };
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    let timeout = u64::from(svc.persist_s) * 1_000_000_000;
    if let Some(t) = PERSIST.get_ptr_mut(&pk) {
        // SAFETY: a live map value; racing writers only move `last_ns` forward.
        let t = unsafe { &mut *t };
        let id = t.backend;
        if now.saturating_sub(t.last_ns) <= timeout && persistent_target(id) {
            t.last_ns = now;
            return Ok(id);
        }
    }
    let id = schedule(svc, key)?;
    let t = PersistValue {
        backend: id,
        _pad: 0,
        last_ns: now,
    };
    let _ = PERSIST.insert(&pk, &t, 0);
    Ok(id)
}

/// A template's backend still takes its clients: configured, not down, not being reset,
/// not removed. (Drained backends keep their persistent clients, as in LVS.)
#[inline(always)]
fn persistent_target(id: u32) -> bool {
    match BACKENDS.get(id) {
        Some(b) => {
            b.flags & (BACKEND_F_VALID | BACKEND_F_RESET | BACKEND_F_DOWN | BACKEND_F_RETIRED)
                == BACKEND_F_VALID
        }
        None => false,
    }
}
