//! Per-CPU counters: per service, per backend, and one slot per action/reason.

use aya_ebpf::btf_maps::PerCpuArray as BtfPerCpuArray;
use aya_ebpf::macros::btf_map;
use lb_common::{reason, Counters, MAX_BACKENDS, MAX_SERVICES};

#[btf_map]
static SERVICE_STATS: BtfPerCpuArray<Counters, { MAX_SERVICES as usize }> = BtfPerCpuArray::new();

#[btf_map]
static BACKEND_STATS: BtfPerCpuArray<Counters, { MAX_BACKENDS as usize }> = BtfPerCpuArray::new();

#[btf_map]
static REASONS: BtfPerCpuArray<u64, { reason::COUNT as usize }> = BtfPerCpuArray::new();

#[inline(always)]
pub fn reason(slot: u32) {
    if let Some(c) = REASONS.get_ptr_mut(slot) {
        unsafe { *c += 1 };
    }
}

#[inline(always)]
fn add(c: Option<*mut Counters>, bytes: u64, new: bool) {
    if let Some(c) = c {
        let c = unsafe { &mut *c };
        c.packets += 1;
        c.bytes += bytes;
        // A branch, not `+= new as u64`: most packets are not new, and skip the write.
        if new {
            c.new_flows += 1;
        }
    }
}

/// Count a forwarded packet against its service and backend.
#[inline(always)]
pub fn forwarded(service: u32, backend: u32, bytes: u64, new: bool) {
    add(SERVICE_STATS.get_ptr_mut(service), bytes, new);
    add(BACKEND_STATS.get_ptr_mut(backend), bytes, new);
}

/// Count a backend's reply (NAT modes) against its service and backend.
#[inline(always)]
pub fn replied(service: u32, backend: u32, bytes: u64) {
    for c in [
        SERVICE_STATS.get_ptr_mut(service),
        BACKEND_STATS.get_ptr_mut(backend),
    ]
    .into_iter()
    .flatten()
    {
        let c = unsafe { &mut *c };
        c.out_packets += 1;
        c.out_bytes += bytes;
    }
}
