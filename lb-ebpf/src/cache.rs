//! The flow cache: each CPU's copy of its recent established DR/TUN IPv4 flows, in front of
//! the connection table (`FLOWS4`).
//!
//! A connection-table hit costs a kernel hash (jhash), a bucket line and two element lines
//! (a 48-byte element header puts the value on the element's second line). A cache hit
//! costs one multiply and one 64-byte line that this CPU alone writes (two 32-byte ways):
//! at 10k flows and more the table's lines no longer fit the CPU caches, and each line is a
//! miss.
//!
//! The table stays the truth. A cached entry is used only while it is fresh
//! ([`FRESH_UNITS`], ~0.27 s since the table last confirmed it); the first packet after
//! that goes the table's way, which refreshes the UDP clock and the LRU reference bit and
//! re-confirms the entry. If the table lost a flow the cache saw active within the last
//! two windows (LRU eviction: cache hits do not mark the table's entry referenced), the
//! flow is recorded again with its backend rather than rescheduled. A TCP FIN or RST
//! always goes the table's way (it ends the flow there). Every hit still checks the
//! service (by id, against the packet's destination) and the backend (removed, reset),
//! as a table hit does, so the controller never needs to touch the cache.

use aya_ebpf::{
    helpers::{bpf_get_smp_processor_id, bpf_ktime_get_coarse_ns},
    macros::map,
    maps::Array,
    Global,
};
use lb_common::{FlowKey, FlowKey4, AF_INET};

/// `BPF_F_MMAPABLE`: the array's values start on a page, so each 64-byte line is one cache
/// line (without it they start 16 bytes into one).
const BPF_F_MMAPABLE: u32 = 1 << 10;

/// A cached flow: 32 bytes, two to a cache line.
#[repr(C, align(32))]
#[derive(Clone, Copy)]
pub struct Cached4 {
    /// Its 5-tuple (`proto` 0: an empty way).
    pub key: FlowKey4,
    pub backend: u32,
    pub service: u32,
    /// When the table last confirmed it, in units of 2^[`UNIT_SHIFT`] ns of the coarse
    /// monotonic clock (wrapping).
    pub stamp: u32,
    pub _pad: u32,
}

#[repr(C, align(64))]
pub struct Line4 {
    pub ways: [Cached4; 2],
}

/// Lines per CPU: `1 << LINE_BITS`, set at load time. CPU `c`'s lines are
/// `c << LINE_BITS ..`.
#[unsafe(no_mangle)]
static CACHE_LINE_BITS: Global<u32> = Global::new(10);

#[map]
static FLOW_CACHE4: Array<Line4> = Array::with_max_entries(2 << 10, BPF_F_MMAPABLE);

const UNIT_SHIFT: u32 = 24;
/// ~0.27 s: how long the cache answers for a flow without asking the table.
pub const FRESH_UNITS: u32 = 16;

#[inline(always)]
fn now() -> u32 {
    (unsafe { bpf_ktime_get_coarse_ns() } >> UNIT_SHIFT) as u32
}

/// The line `key` belongs in, on this CPU.
#[inline(always)]
fn line(k: &FlowKey4) -> Option<*mut Line4> {
    let w: &[u32; 4] = unsafe { &*(k as *const FlowKey4 as *const [u32; 4]) };
    let a = (w[0] as u64) | ((w[1] as u64) << 32);
    let b = (w[2] as u64) | ((w[3] as u64) << 32);
    let mut h = (a ^ b.rotate_left(29)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    h ^= h >> 29;
    let bits = CACHE_LINE_BITS.load();
    let cpu = unsafe { bpf_get_smp_processor_id() };
    let idx = (cpu << bits) | ((h as u32) & ((1u32 << bits) - 1));
    FLOW_CACHE4.get_ptr_mut(idx)
}

#[inline(always)]
fn same(a: &FlowKey4, b: &FlowKey4) -> bool {
    let a: &[u32; 4] = unsafe { &*(a as *const FlowKey4 as *const [u32; 4]) };
    let b: &[u32; 4] = unsafe { &*(b as *const FlowKey4 as *const [u32; 4]) };
    a[0] == b[0] && a[1] == b[1] && a[2] == b[2] && a[3] == b[3]
}

/// What [`find`] found.
pub mod found {
    /// The cache does not know the flow (or knew it too long ago).
    pub const NOTHING: u32 = 0;
    /// Fresh: use it.
    pub const FRESH: u32 = 1;
    /// Seen active within the last two windows: ask the table, and keep this backend if
    /// the table lost the flow.
    pub const RECENT: u32 = 2;
}

/// What the cache knows of a flow ([`found`]), its backend and service in `out`. Out of
/// line, with plain numbers out: the caller's frame must leave room for the forwarding
/// call.
#[inline(never)]
pub fn find(key: &FlowKey, out: &mut [u32; 2]) -> u32 {
    if key.family != AF_INET {
        return found::NOTHING;
    }
    let k = FlowKey4::of(key);
    let Some(l) = line(&k) else {
        return found::NOTHING;
    };
    let l = unsafe { &*l };
    let way = if same(&l.ways[0].key, &k) {
        &l.ways[0]
    } else if same(&l.ways[1].key, &k) {
        &l.ways[1]
    } else {
        return found::NOTHING;
    };
    let age = now().wrapping_sub(way.stamp);
    *out = [way.backend, way.service];
    if age < FRESH_UNITS {
        found::FRESH
    } else if age < 2 * FRESH_UNITS {
        found::RECENT
    } else {
        found::NOTHING
    }
}

/// Remember (or re-confirm) a flow the table just vouched for.
#[inline(never)]
pub fn fill(key: &FlowKey, backend: u32, service: u32) {
    if key.family != AF_INET {
        return;
    }
    let k = FlowKey4::of(key);
    let Some(l) = line(&k) else {
        return;
    };
    let l = unsafe { &mut *l };
    let stamp = now();
    // The way that holds it already, else the one confirmed longer ago.
    let i = if same(&l.ways[0].key, &k) {
        0
    } else if same(&l.ways[1].key, &k) {
        1
    } else if stamp.wrapping_sub(l.ways[0].stamp) >= stamp.wrapping_sub(l.ways[1].stamp) {
        0
    } else {
        1
    };
    l.ways[i] = Cached4 {
        key: k,
        backend,
        service,
        stamp,
        _pad: 0,
    };
}
