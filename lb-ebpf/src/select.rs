//! Service lookup and backend selection: the VIP table, the Maglev rings, the backends.

use aya_ebpf::btf_maps::{Array as BtfArray, HashMap as BtfHashMap};
use aya_ebpf::macros::btf_map;
use lb_common::{
    flow_hash, reason, Backend, FlowKey, ServiceMeta, VipAddr, VipKey, BACKEND_F_RESET,
    BACKEND_F_VALID, MAX_BACKENDS, MAX_SERVICES, MAX_VIPS, NO_BACKEND, RINGS_PER_SERVICE,
    RING_SIZE,
};

#[btf_map]
static SERVICES: BtfHashMap<VipKey, ServiceMeta, { MAX_SERVICES as usize }> = BtfHashMap::new();

/// All rings back to back: ring `r` is slots `r * RING_SIZE .. (r + 1) * RING_SIZE`.
#[btf_map]
static RINGS: BtfArray<u32, { (MAX_SERVICES * RINGS_PER_SERVICE * RING_SIZE) as usize }> =
    BtfArray::new();

#[btf_map]
static BACKENDS: BtfArray<Backend, { MAX_BACKENDS as usize }> = BtfArray::new();

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
/// wildcard entry of the VIP.
#[inline(always)]
pub fn service(key: &FlowKey) -> Result<ServiceMeta, u32> {
    let mut vip = VipKey {
        addr: key.dst,
        port_be: key.dport_be,
        proto: key.proto,
        family: key.family,
    };
    if let Some(svc) = unsafe { SERVICES.get(&vip) } {
        return Ok(*svc);
    }
    vip.port_be = 0;
    match unsafe { SERVICES.get(&vip) } {
        Some(svc) => Ok(*svc),
        None => Err(reason::PASS_NON_VIP),
    }
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

/// Maglev: the flow hash picks a slot of the service's live ring.
#[inline(always)]
pub fn schedule(svc: &ServiceMeta, key: &FlowKey) -> Result<u32, u32> {
    let slot = svc.ring * RING_SIZE + flow_hash(key) % RING_SIZE;
    match RINGS.get(slot) {
        Some(&id) if id != NO_BACKEND => Ok(id),
        _ => Err(reason::PASS_NO_BACKEND),
    }
}
