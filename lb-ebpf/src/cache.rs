//! The flow cache: each CPU's copy of its recent established DR/TUN flows, in front of the
//! connection table (`FLOWS4`/`FLOWS6`).
//!
//! A connection-table hit costs a kernel hash (jhash over the key), a bucket line and two
//! element lines (a 48-byte element header puts the value on the element's second line).
//! A cache hit costs one multiply and one 64-byte line that only this CPU writes (two
//! IPv4 flows or one IPv6 flow). At 10k flows and more the table's lines no longer fit the
//! CPU's caches and each of them is a miss; the cache's one line is a miss at most.
//!
//! The table stays the truth. A cached flow is used only while it is fresh ([`FRESH`],
//! ~0.27 s since the table last confirmed it); the first packet after that goes the
//! table's way, which refreshes the UDP clock and the LRU reference bit and confirms the
//! flow again. If the table lost a flow the cache saw active within the last two windows
//! (LRU eviction: cache hits do not mark the table's entry referenced), the flow is
//! recorded again with its backend rather than rescheduled. A TCP FIN or RST always goes
//! the table's way (it ends the flow there). Every hit still checks the service (by id,
//! against the packet's destination) and the backend (removed, reset), as a table hit
//! does, so the controller never has to touch the cache.
//!
//! Per CPU, so no line bounces between CPUs and no reader sees a half-written flow; RSS
//! keeps a flow on one CPU. A flow that moves to another CPU is looked up in the table
//! there. A flow a CPU ended (a RST through another CPU) can still be answered by the
//! first CPU's copy for at most one window — to its old backend, still usable.

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

/// A cached flow: its 5-tuple (`K`), backend, service and when the table last confirmed it
/// (`stamp`, in units of 2^[`UNIT_SHIFT`] ns of the coarse monotonic clock, wrapping).
/// An all-zero key (protocol 0) is an empty way.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Cached<K> {
    pub key: K,
    pub backend: u32,
    pub service: u32,
    pub stamp: u32,
}

/// Two IPv4 flows (28 bytes each) to a cache line.
#[repr(C, align(64))]
pub struct Line4 {
    pub ways: [Cached<FlowKey4>; 2],
}

/// One IPv6 flow (52 bytes) to a cache line.
#[repr(C, align(64))]
pub struct Line6 {
    pub ways: [Cached<FlowKey>; 1],
}

/// 0: the cache is off (the bench's same-run comparison). A read-only global: with 1, the
/// verifier removes the test.
#[unsafe(no_mangle)]
static FLOW_CACHE: Global<u8> = Global::new(1);

/// Whether packets look in the cache at all.
#[inline(always)]
pub fn enabled() -> bool {
    FLOW_CACHE.load() != 0
}

/// log2 of each CPU's lines (per family), set at load time from the table's size
/// (`lb_common::flow_cache_line_bits`); CPU `c`'s lines are `c << CACHE_LINE_BITS ..`.
#[unsafe(no_mangle)]
static CACHE_LINE_BITS: Global<u32> = Global::new(10);

#[map]
static FLOW_CACHE4: Array<Line4> = Array::with_max_entries(2 << 10, BPF_F_MMAPABLE);

#[map]
static FLOW_CACHE6: Array<Line6> = Array::with_max_entries(2 << 10, BPF_F_MMAPABLE);

const UNIT_SHIFT: u32 = 24;
/// 16 units, ~0.27 s: how long the cache answers for a flow without asking the table.
pub const FRESH: u32 = 16;

#[inline(always)]
fn now() -> u32 {
    (unsafe { bpf_ktime_get_coarse_ns() } >> UNIT_SHIFT) as u32
}

/// A key the cache can hold: compared and hashed as aligned words.
trait Key: Copy {
    type Words: AsRef<[u32]>;
    fn words(&self) -> &Self::Words;
}

impl Key for FlowKey4 {
    type Words = [u32; 4];
    #[inline(always)]
    fn words(&self) -> &[u32; 4] {
        // SAFETY: 16 bytes, 4-aligned, no padding the data plane leaves unset.
        unsafe { &*(self as *const Self as *const [u32; 4]) }
    }
}

impl Key for FlowKey {
    type Words = [u32; 10];
    #[inline(always)]
    fn words(&self) -> &[u32; 10] {
        // SAFETY: 40 bytes, 8-aligned; parsing writes every byte, padding included.
        unsafe { &*(self as *const Self as *const [u32; 10]) }
    }
}

#[inline(always)]
fn same<K: Key>(a: &K, b: &K) -> bool {
    let (a, b) = (a.words().as_ref(), b.words().as_ref());
    let mut i = 0;
    while i < a.len() {
        if a[i] != b[i] {
            return false;
        }
        i += 1;
    }
    true
}

/// This CPU's line index for `k` (multiplicative hashing of the key's words).
#[inline(always)]
fn index<K: Key>(k: &K) -> u32 {
    let mut h: u64 = 0;
    for w in k.words().as_ref() {
        h = (h ^ *w as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
    let bits = CACHE_LINE_BITS.load();
    let cpu = unsafe { bpf_get_smp_processor_id() };
    (cpu << bits) | (((h >> 32) as u32) & ((1u32 << bits) - 1))
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

#[inline(always)]
fn find_in<K: Key, const N: usize>(ways: &[Cached<K>; N], k: &K, out: &mut [u32; 2]) -> u32 {
    for way in ways {
        if same(&way.key, k) {
            let age = now().wrapping_sub(way.stamp);
            *out = [way.backend, way.service];
            return if age < FRESH {
                found::FRESH
            } else if age < 2 * FRESH {
                found::RECENT
            } else {
                found::NOTHING
            };
        }
    }
    found::NOTHING
}

/// What the cache knows of a flow ([`found`]), its backend and service in `out`. Out of
/// line, with plain numbers out: the caller's frame must leave room for the forwarding
/// call.
#[inline(never)]
pub fn find(key: &FlowKey, out: &mut [u32; 2]) -> u32 {
    if key.family == AF_INET {
        let k = FlowKey4::of(key);
        match FLOW_CACHE4.get(index(&k)) {
            Some(l) => find_in(&l.ways, &k, out),
            None => found::NOTHING,
        }
    } else {
        match FLOW_CACHE6.get(index(key)) {
            Some(l) => find_in(&l.ways, key, out),
            None => found::NOTHING,
        }
    }
}

#[inline(always)]
fn fill_in<K: Key, const N: usize>(ways: &mut [Cached<K>; N], k: &K, backend: u32, service: u32) {
    let stamp = now();
    // The way that holds the flow already, else the one confirmed longest ago.
    let mut pick = 0;
    let mut oldest = 0;
    for (i, way) in ways.iter().enumerate() {
        if same(&way.key, k) {
            pick = i;
            break;
        }
        let age = stamp.wrapping_sub(way.stamp);
        if age > oldest {
            (pick, oldest) = (i, age);
        }
    }
    ways[pick] = Cached {
        key: *k,
        backend,
        service,
        stamp,
    };
}

/// Remember (or confirm again) a flow the table just vouched for.
#[inline(never)]
pub fn fill(key: &FlowKey, backend: u32, service: u32) {
    if key.family == AF_INET {
        let k = FlowKey4::of(key);
        if let Some(l) = FLOW_CACHE4.get_ptr_mut(index(&k)) {
            fill_in(unsafe { &mut (*l).ways }, &k, backend, service);
        }
    } else if let Some(l) = FLOW_CACHE6.get_ptr_mut(index(key)) {
        fill_in(unsafe { &mut (*l).ways }, key, backend, service);
    }
}
