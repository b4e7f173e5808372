//! The connection table: an established flow keeps its backend whatever the rings say.

use aya_ebpf::btf_maps::Array as BtfArray;
use aya_ebpf::{
    helpers::{bpf_get_smp_processor_id, bpf_jiffies64, bpf_ktime_get_coarse_ns},
    macros::btf_map,
    Global,
};
use lb_common::cache_slot::{self, CLOCK, IDS_SHIFT, TUPLE};
use lb_common::flow_table::{self, Head, ReplySet, Set, Value, Way};
use lb_common::{
    mode, reason, udp_cache_ticks, udp_expired, udp_touch_ns, Backend, FlowKey, FlowValue,
    NatReply, ServiceMeta, FLOW_F_ENDED, FLOW_F_FIN_BACKEND, FLOW_F_FIN_CLIENT, FLOW_F_SNAT,
    IPPROTO_TCP, IPPROTO_UDP, UDP_IDLE_DEFAULT_NS,
};

use crate::select;
use lb_ebpf::STATUS_OK;

/// The connection table: a set-associative array of 2^[`FLOW_SET_BITS`] sets, both
/// families (layout and reasoning: [`lb_common::flow_table`]). Sized at load time by the
/// controller (`flow_table_size`). `BPF_F_MMAPABLE`: the values start on a page, so every
/// set's 17 lines are whole, and the controller reads and writes ways in place (a way, not
/// a whole set: the data plane may be writing another way of the same set).
#[btf_map]
static FLOWS: BtfArray<Set, 1, { lb_common::BPF_F_MMAPABLE as usize }> = BtfArray::new();

/// log2 of [`FLOWS`]' sets, set at load time with its size (a read-only global, see
/// `DEBUG_LOG`).
#[unsafe(no_mangle)]
static FLOW_SET_BITS: Global<u32> = Global::new(16);

/// `key`'s word `i` (of five; the last as a way holds it, without the check).
#[inline(always)]
fn key_word(key: &FlowKey, i: usize) -> u64 {
    let base = key as *const FlowKey as *const u8;
    // SAFETY: an 8-byte word inside the 8-aligned, 40-byte key (`i` < 5).
    let w = unsafe { lb_ebpf::load_u64(base.add(8 * i)) };
    if i == 4 {
        w & flow_table::KEY_BITS
    } else {
        w
    }
}

/// `key`'s hash ([`flow_table::hash`]). Its words are loaded where they are used, not
/// kept: every temporary kept costs the director's frame stack, which the NAT call chain
/// needs (512 bytes per chain).
#[inline(always)]
fn key_hash(key: &FlowKey) -> u64 {
    flow_table::hash(&[
        key_word(key, 0),
        key_word(key, 1),
        key_word(key, 2),
        key_word(key, 3),
        key_word(key, 4),
    ])
}

/// Whether `way` holds `key`.
#[inline(always)]
fn holds_key<V>(way: &Way<V>, key: &FlowKey) -> bool {
    way.key[0] == key_word(key, 0)
        && way.key[1] == key_word(key, 1)
        && way.key[2] == key_word(key, 2)
        && way.key[3] == key_word(key, 3)
        && way.key[4] & flow_table::KEY_BITS == key_word(key, 4)
}

/// The first empty way of the set headed by `head` (tag 0), or [`flow_table::WAYS`]: four
/// tags at a time.
#[inline(always)]
fn empty_way(head: &Head) -> usize {
    let mut q = 0;
    while q < flow_table::WAYS / 4 {
        let m = zero_lanes(tag_word(head, q));
        if m != 0 {
            // The lowest marked lane is a zero lane (a lane above one may be marked too).
            let mut l = 0;
            while l < 4 {
                if m & LANES_HI_0 << (16 * l) != 0 {
                    return q * 4 + l;
                }
                l += 1;
            }
        }
        q += 1;
    }
    flow_table::WAYS
}

const LANES_LO: u64 = 0x0001_0001_0001_0001;
const LANES_HI_0: u64 = 0x8000;
const LANES_HI: u64 = 0x8000_8000_8000_8000;

/// The top bit of each 16-bit lane of `x` that is 0 (exact up to the lowest such lane; a
/// lane above it may be marked too).
#[inline(always)]
fn zero_lanes(x: u64) -> u64 {
    x.wrapping_sub(LANES_LO) & !x & LANES_HI
}

/// The way of `set` whose tag is `tag` and which holds `key` intact, or
/// [`flow_table::WAYS`]. A torn way ([`Way::intact`]) is passed over: it is no entry, and
/// the entry written again after it (in another way) is the key's. One tag at a time:
/// comparing four at a time ([`empty_way`]'s way) took `xdplb_flow_find`'s frame 48 -> 80
/// bytes, which the NAT reply's call chain has no room for.
#[inline(always)]
fn way_of<V: Value>(set: &Set<Way<V>>, tag: u16, key: &FlowKey) -> usize {
    let mut i = 0;
    while i < flow_table::WAYS {
        let way = &set.ways[i];
        if set.head.tags[i] == tag && holds_key(way, key) && way.intact() {
            return i;
        }
        i += 1;
    }
    flow_table::WAYS
}

/// Tags `4q .. 4q + 4` of the set headed by `head` as one word.
#[inline(always)]
fn tag_word(head: &Head, q: usize) -> u64 {
    // SAFETY: 8 bytes inside the header's 32 bytes of tags (`q` < 4), 8-aligned (a set
    // starts on a cache line).
    unsafe { lb_ebpf::load_u64((head.tags.as_ptr() as *const u8).add(8 * q)) }
}

/// Publish or clear way `i`'s tag: stores the compiler keeps in order around the way's.
#[inline(always)]
fn set_tag(head: &mut Head, i: usize, tag: u16) {
    // SAFETY: a field of a live map value.
    unsafe { core::ptr::write_volatile(&mut head.tags[i], tag) };
}

/// The table entry of a flow (to read, or to update in place: NAT state, UDP clock). Marks
/// the way used (its reference bit, see [`lb_common::flow_table`]). A way whose key and
/// value two writers tore apart (its check disagrees) is no entry.
#[inline(always)]
pub fn entry(key: &FlowKey) -> Option<*mut FlowValue> {
    entry_at(xdplb_flow_find(key))
}

/// [`entry`] without the call, for the global functions (`xdplb_nat_forward`,
/// `xdplb_nat_reply`: the verifier walks them once anyway, and a call's frame would not fit
/// beside theirs in the 512-byte stack).
#[inline(always)]
pub fn entry_inline(key: &FlowKey) -> Option<*mut FlowValue> {
    entry_at(find(key))
}

/// The entry at [`xdplb_flow_find`]'s answer `at`.
#[inline(always)]
fn entry_at(at: u32) -> Option<*mut FlowValue> {
    let (set, i) = way_at(at)?;
    Some(&mut set.ways[i].value)
}

/// The set and way of [`xdplb_flow_find`]'s answer `at`.
#[inline(always)]
fn way_at(at: u32) -> Option<(&'static mut Set, usize)> {
    at_in(at, |i| FLOWS.get_ptr_mut(i))
}

/// The set and way of a table's answer `at` ([`xdplb_flow_find`], [`xdplb_reply_find`]),
/// the set from `set` (the table's array lookup by index).
#[inline(always)]
fn at_in<W>(
    at: u32,
    set: impl FnOnce(u32) -> Option<*mut Set<W>>,
) -> Option<(&'static mut Set<W>, usize)> {
    if at == NO_WAY {
        return None;
    }
    let set = set(at >> WAY_BITS)?;
    // SAFETY: a live array value; the way's index is below `WAYS`.
    Some((unsafe { &mut *set }, (at & WAY_MASK) as usize))
}

/// [`xdplb_flow_find`]'s answer: the set's index above [`WAY_BITS`] bits of the way's.
const WAY_BITS: u32 = flow_table::WAYS.trailing_zeros();
const WAY_MASK: u32 = flow_table::WAYS as u32 - 1;
/// [`xdplb_flow_find`]: no entry.
const NO_WAY: u32 = u32::MAX;

/// Where `key`'s entry is: its set's index << [`WAY_BITS`] | its way, with the way's
/// reference bit set; [`NO_WAY`] if the table holds none (or a torn way, see [`entry`]).
/// Out of line and global, so the verifier walks the 16 ways' compares once, not once per
/// state of every caller (inline, the debug-log director took 849k instructions, against
/// 195k before the table; the kernel gives up at 1M). Costs a call per table lookup.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn xdplb_flow_find(key: *const FlowKey) -> u32 {
    // SAFETY: null or valid, from `entry`.
    match unsafe { key.as_ref() } {
        Some(key) => find(key),
        None => NO_WAY,
    }
}

/// [`xdplb_flow_find`]'s work.
#[inline(always)]
fn find(key: &FlowKey) -> u32 {
    let h = key_hash(key);
    let index = flow_table::set_of(h, FLOW_SET_BITS.load());
    find_in(FLOWS.get_ptr_mut(index), index, h, key)
}

/// Where `key` (hash `h`) is in `set` (set `index` of its table, if the table has it): as
/// [`xdplb_flow_find`] answers, for either table.
#[inline(always)]
fn find_in<V: Value>(set: Option<*mut Set<Way<V>>>, index: u32, h: u64, key: &FlowKey) -> u32 {
    let Some(set) = set else {
        return NO_WAY;
    };
    // SAFETY: a live array value.
    let set = unsafe { &mut *set };
    let i = way_of(set, flow_table::tag(h), key);
    if i >= flow_table::WAYS {
        return NO_WAY;
    }
    let bit = 1u32 << i;
    if set.head.refs & bit == 0 {
        set.head.refs |= bit;
    }
    index << WAY_BITS | i as u32
}

/// Record `value` for `key`: in the flow's own way, else an empty one, else by CLOCK: from
/// the set's hand, the first way whose reference bit is clear (the bits passed are cleared:
/// a second chance; all set: the hand's way, every bit cleared), and the hand moves past it.
/// See [`lb_common::flow_table`]. The new way's bit stays clear: a flow earns its second
/// chance with its next packet, so a SYN flood's unanswered SYNs take each other's ways
/// before an established connection's. Out of line and global, as [`xdplb_flow_find`].
/// `own`: where the caller found the flow's entry ([`xdplb_flow_find`]; [`NO_WAY`]: it did
/// not, and the set is not searched again). 1: recorded; 0: not.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn xdplb_flow_insert(key: *const FlowKey, value: *const FlowValue, own: u32) -> u32 {
    // SAFETY: null or valid, from `lookup`.
    let (Some(key), Some(value)) = (unsafe { key.as_ref() }, unsafe { value.as_ref() }) else {
        return 0;
    };
    let h = key_hash(key);
    let index = flow_table::set_of(h, FLOW_SET_BITS.load());
    let Some((set, at)) = claim_in(FLOWS.get_ptr_mut(index), index, own) else {
        return 0;
    };
    // SAFETY: a way's value (offset 40 of an 8-aligned way) and a `FlowValue` (8-aligned).
    unsafe { copy_value(&mut set.ways[at].value, value) };
    publish(set, at, key, flow_table::tag(h));
    1
}

/// Copy a way's value in 8-byte words. As an assignment, LLVM made the copy a call of
/// bpf-linker's byte-loop `memmove` (a flow's 24 bytes as soon as the insert was shared
/// code, a reply mapping's 88 always), and a new NAT flow read 614-648 ns against 433-502.
///
/// # Safety
/// `to` and `from` 8-aligned.
#[inline(always)]
unsafe fn copy_value<V: Value>(to: &mut V, from: &V) {
    const { assert!(core::mem::size_of::<V>() % 8 == 0) };
    let (to, from) = (to as *mut V as *mut u8, from as *const V as *const u8);
    let mut w = 0;
    while w < core::mem::size_of::<V>() / 8 {
        // SAFETY: 8-byte words inside the two values, 8-aligned (the caller's word).
        unsafe { lb_ebpf::store_u64(to.add(8 * w), lb_ebpf::load_u64(from.add(8 * w))) };
        w += 1;
    }
}

/// The way of `set` (set `index` of its table, if the table has it) a new entry takes: `own`
/// ([`xdplb_flow_find`]'s answer, if a way of this set), else [`claim`]'s. The caller
/// writes the value ([`copy_value`]) and [`publish`]es.
#[inline(always)]
fn claim_in<W>(
    set: Option<*mut Set<W>>,
    index: u32,
    own: u32,
) -> Option<(&'static mut Set<W>, usize)> {
    // SAFETY: a live array value.
    let set = unsafe { &mut *set? };
    let own = if own != NO_WAY && own >> WAY_BITS == index {
        (own & WAY_MASK) as usize
    } else {
        flow_table::WAYS
    };
    let at = claim(set, own);
    (at < flow_table::WAYS).then_some((set, at))
}

/// The way of `set` a new entry takes ([`xdplb_flow_insert`]): `own` if below
/// [`flow_table::WAYS`], else an empty one, else CLOCK's; its reference bit and tag
/// cleared, so no reader takes it for an entry while it is written ([`publish`] then).
#[inline(always)]
fn claim<W>(set: &mut Set<W>, own: usize) -> usize {
    let mut at = if own < flow_table::WAYS {
        own
    } else {
        empty_way(&set.head)
    };
    if at >= flow_table::WAYS {
        // One exit per way: the verifier walks 16 paths, not 2^16.
        let hand = set.head.hand as usize % flow_table::WAYS;
        let refs = set.head.refs;
        let mut passed = 0u32;
        at = hand;
        let mut k = 0;
        while k < flow_table::WAYS {
            let j = (hand + k) % flow_table::WAYS;
            if refs & 1 << j == 0 {
                at = j;
                break;
            }
            passed |= 1 << j;
            k += 1;
        }
        set.head.refs = refs & !passed;
        set.head.hand = (at as u32 + 1) % flow_table::WAYS as u32;
    }
    if at >= flow_table::WAYS {
        return flow_table::WAYS;
    }
    set.head.refs &= !(1u32 << at);
    set_tag(&mut set.head, at, 0);
    at
}

/// Finish way `at` of `set` ([`claim`]ed, its value written): `key`'s words with the
/// value's check, then the tag.
#[inline(always)]
fn publish<V: Value>(set: &mut Set<Way<V>>, at: usize, key: &FlowKey, tag: u16) {
    let way = &mut set.ways[at];
    let (backend, service) = way.value.ids();
    way.key = [
        key_word(key, 0),
        key_word(key, 1),
        key_word(key, 2),
        key_word(key, 3),
        key_word(key, 4) | flow_table::check(backend, service),
    ];
    set_tag(&mut set.head, at, tag);
}

/// End a flow (NAT close, RST): the next packet of this 5-tuple is a new flow. Inline,
/// for the NAT paths' global functions (see [`entry_inline`]).
#[inline(always)]
pub fn forget(key: &FlowKey) {
    let Some((set, i)) = way_at(find(key)) else {
        return;
    };
    let v = &set.ways[i].value;
    if v.flags & FLOW_F_ENDED == 0 {
        select::active_add(v.backend, -1);
    }
    set_tag(&mut set.head, i, 0);
}

/// The NAT reply mappings, by the reply's 5-tuple as the backend sends it: a table like
/// [`FLOWS`] (same hash, tags, CLOCK eviction and torn-way check; see
/// [`lb_common::flow_table`]) of 128-byte ways ([`lb_common::flow_table::ReplyWay`]), as
/// many entries as the flow table. (Until layout 12 two LRU hashes, one per family: a reply
/// past every cache read the bucket, the element's header and its value, three lines on
/// pages of their own, where this reads the set's header and the way; and they held 461 MB
/// for the default million entries, this 138 MB.)
#[btf_map]
static NAT_REPLIES: BtfArray<ReplySet, 1, { lb_common::BPF_F_MMAPABLE as usize }> = BtfArray::new();

/// log2 of [`NAT_REPLIES`]' sets, set at load time (as [`FLOW_SET_BITS`]).
#[unsafe(no_mangle)]
static REPLY_SET_BITS: Global<u32> = Global::new(16);

/// Where the reply mapping of `key` (a reply as it arrives) is, as [`xdplb_flow_find`]
/// answers for the flow table: [`reply_at`] reads it, [`reply_forget_at`] drops it. Out of
/// line and global for the verifier, as [`xdplb_flow_find`].
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn xdplb_reply_find(key: *const FlowKey) -> u32 {
    // SAFETY: null or valid, from the NAT reply path.
    let Some(key) = (unsafe { key.as_ref() }) else {
        return NO_WAY;
    };
    let h = key_hash(key);
    let index = flow_table::set_of(h, REPLY_SET_BITS.load());
    find_in(NAT_REPLIES.get_ptr_mut(index), index, h, key)
}

/// The mapping at [`xdplb_reply_find`]'s answer `at` (to read, or to update in place).
#[inline(always)]
pub fn reply_at(at: u32) -> Option<*mut NatReply> {
    let (set, i) = at_in(at, |i| NAT_REPLIES.get_ptr_mut(i))?;
    Some(&mut set.ways[i].value)
}

/// Drop the mapping at [`xdplb_reply_find`]'s answer `at` (its tag cleared).
#[inline(always)]
pub fn reply_forget_at(at: u32) {
    if let Some((set, i)) = at_in(at, |i| NAT_REPLIES.get_ptr_mut(i)) {
        set_tag(&mut set.head, i, 0);
    }
}

/// Whether [`NAT_REPLIES`] may hold a mapping for the key of `src` and `dst` (16 address
/// bytes each, in map values: any alignment) and `ports` (the key's last word: ports,
/// protocol, family): a way of its set carries its tag. Never no where it holds one; yes
/// for another key of the same tag too, which costs a full-NAT source port search one more
/// try. The four tag words compared as words, without a branch per way (an exact compare
/// branches per way, and called in the port search's eight tries it took the verifier past
/// its million instructions), in registers (its frame is the array index's 8 bytes): out
/// of line, for `xdplb_nat_forward`, whose chain has room for no more (inline, its hash
/// cost that frame 8 bytes past the 512-byte stack), taking the key as its parts (a key
/// built on the frame to point at costs 40).
#[inline(never)]
pub fn reply_may_hold(src: &[u8; 16], dst: &[u8; 16], ports: u64) -> bool {
    // SAFETY: 8-byte loads inside the two addresses.
    let h = unsafe {
        let (s, d) = (src.as_ptr(), dst.as_ptr());
        flow_table::hash(&[
            lb_ebpf::load_u64(s),
            lb_ebpf::load_u64(s.add(8)),
            lb_ebpf::load_u64(d),
            lb_ebpf::load_u64(d.add(8)),
            ports,
        ])
    };
    let Some(set) = NAT_REPLIES.get_ptr(flow_table::set_of(h, REPLY_SET_BITS.load())) else {
        return true;
    };
    // SAFETY: a live array value.
    let head = unsafe { &(*set).head };
    let t = u64::from(flow_table::tag(h)).wrapping_mul(LANES_LO);
    let mut any = 0;
    let mut q = 0;
    while q < flow_table::WAYS / 4 {
        any |= zero_lanes(tag_word(head, q) ^ t);
        q += 1;
    }
    any != 0
}

/// [`reply_put`]: write the mapping (in its own way, else an empty one, else CLOCK's).
pub const REPLY_PUT: u32 = 1 << 9;
/// [`reply_put`]: write it only if the table has no mapping (intact) for its key.
pub const REPLY_PUT_IF_ABSENT: u32 = 1 << 10;
/// [`reply_put`]: drop the mapping of its key (wins over the others).
pub const REPLY_REMOVE: u32 = 1 << 11;
/// Every [`reply_put`] operation.
pub const REPLY_OPS: u32 = REPLY_PUT | REPLY_PUT_IF_ABSENT | REPLY_REMOVE;

/// Apply `op` ([`REPLY_OPS`]) to [`NAT_REPLIES`] with `src`: its key words are the reply's
/// key (without the check), its value the mapping. 1: done (or nothing to do); 0: no room.
/// The key's own way comes from [`xdplb_reply_find`], a call: found inline, each of the 16
/// ways it may be in reached the rest in a state of its own (the debug-log director
/// 279k -> 360k verified instructions).
#[inline(always)]
pub fn reply_put(src: &lb_common::flow_table::ReplyWay, op: u32) -> u32 {
    // SAFETY: five 8-aligned words are a `FlowKey` (any bits are one; `key_word` masks the
    // last as the table does).
    let key = unsafe { &*(src.key.as_ptr() as *const FlowKey) };
    let found = xdplb_reply_find(key);
    if op & REPLY_REMOVE != 0 {
        reply_forget_at(found);
        return 1;
    }
    if found != NO_WAY && op & REPLY_PUT == 0 {
        return 1;
    }
    let h = key_hash(key);
    let index = flow_table::set_of(h, REPLY_SET_BITS.load());
    let Some((set, at)) = claim_in(NAT_REPLIES.get_ptr_mut(index), index, found) else {
        return 0;
    };
    // SAFETY: both at offset 40 of an 8-aligned way (a table's, the scratch's).
    unsafe { copy_value(&mut set.ways[at].value, &src.value) };
    publish(set, at, key, flow_table::tag(h));
    1
}

/// The client ends a connection the ring fast path sends (FIN or RST on a clean slot): end
/// its entry, if the table holds one (begun while the slot was dirty), as a hit would.
#[inline(never)]
pub fn end(key: &FlowKey) {
    if let Some(v) = entry(key) {
        // SAFETY: a live map value.
        mark_ended(unsafe { &mut *v });
    }
}

/// The client ended the flow: mark its entry and stop counting it as active for its
/// backend (once).
#[inline(always)]
fn mark_ended(v: &mut FlowValue) {
    if v.flags & FLOW_F_ENDED == 0 {
        v.flags |= FLOW_F_ENDED;
        select::active_add(v.backend, -1);
    }
}

pub struct Choice {
    /// Backend id (valid: `select::backend(id)` is `Some`).
    pub id: u32,
    /// The flow was not in the table: it was scheduled now.
    pub new: bool,
    /// The flow's table entry when the fast path ([`established`]) found it, else null; the
    /// NAT path updates it in place without hashing the 5-tuple again.
    pub entry: *mut FlowValue,
    /// The answer came from [`FLOW_CACHE`]: for a NAT flow, its reply mapping is not due to
    /// be made sure of and its entry holds no FIN (see [`cache_fill`]).
    pub cached: bool,
    /// With `cached`, a full-NAT flow's source as its entry holds it
    /// (`lb_common::cache_slot::snat_word`). 0 otherwise.
    pub snat: u32,
}

impl Default for Choice {
    fn default() -> Self {
        Choice {
            id: 0,
            new: false,
            entry: core::ptr::null_mut(),
            cached: false,
            snat: 0,
        }
    }
}

/// How [`lookup_or_schedule`] goes about it (bits; one argument, as a BPF function takes at
/// most five).
pub mod how {
    /// Remember a newly scheduled flow (not for ICMP errors: they only look).
    pub const RECORD: u32 = 1;
    /// The client is ending the connection (see [`super::client_ends`]).
    pub const ENDING: u32 = 2;
    /// [`super::established`] just found no entry: do not look again.
    pub const ABSENT: u32 = 4;
    /// A TCP SYN (without ACK): the client is opening a connection (see [`super::opens`]).
    pub const OPENING: u32 = 8;
}

/// The flow's backend: from the table, or scheduled now (and, with [`how::RECORD`],
/// remembered).
#[inline(always)]
pub fn lookup_or_schedule(svc: &ServiceMeta, key: &FlowKey, how: u32) -> Result<Choice, u32> {
    // Not `Choice::default()`: its zeroing was a call of the byte-loop `memset` on every
    // new flow (see `lb_ebpf::zeroed_in_place`); `lookup_out` writes the whole value.
    let mut out = core::mem::MaybeUninit::<Choice>::uninit();
    match lookup_out(svc, key, how, out.as_mut_ptr()) {
        // SAFETY: written in full when the status is OK.
        STATUS_OK => Ok(unsafe { out.assume_init() }),
        slot => Err(slot),
    }
}

/// Out of line: its temporaries (hash words, the new entry) stay off the caller's frame,
/// which must leave room for the forwarding call (the BPF stack is 512 bytes per chain).
#[inline(never)]
fn lookup_out(svc: &ServiceMeta, key: &FlowKey, how: u32, out: *mut Choice) -> u32 {
    match lookup(svc, key, how) {
        Ok(c) => {
            // SAFETY: the caller's slot; a plain write, no drop of what was there.
            unsafe { out.write(c) };
            STATUS_OK
        }
        Err(slot) => slot,
    }
}

/// What [`established`] found.
pub enum Established {
    /// A usable entry: the flow's service, its choice and the backend's entry (found by the
    /// liveness check; the caller need not look it up again).
    Hit(&'static ServiceMeta, Choice, &'static Backend),
    /// Not for a VIP address (the filter is sure): no flow or service can match; the table
    /// was not asked.
    NotVip,
    /// No entry: a new flow.
    Absent,
    /// An entry that does not hold as it is (an idle UDP flow, a removed or reset backend, a
    /// removed service): the full way decides.
    Stale,
}

/// The fast path: a packet of an established flow whose service (by the id the flow
/// recorded, checked against the packet's destination) and backend are still usable — a
/// [`FLOW_CACHE`] slot or one hash lookup (this table), and array reads. Otherwise the
/// packet goes the full way ([`crate::select::service`], then [`lookup_or_schedule`]),
/// told whether there was an entry at all, so a new flow is looked up once, not twice.
#[inline(always)]
pub fn established(key: &FlowKey, tcp_end: bool, tcp_syn: bool) -> Established {
    let hit = cached(key, tcp_end || tcp_syn);
    if hit != CACHE_MISS {
        let (service, id) = unpack(hit);
        if let (Some(svc), Some(backend)) =
            (select::service_by_id(service, key), select::backend(id))
        {
            return Established::Hit(
                svc,
                Choice {
                    id,
                    cached: true,
                    snat: cache_slot::snat(hit),
                    ..Choice::default()
                },
                backend,
            );
        }
    }
    // A NAT reply, the host's own traffic: the VIP filter, an array word, spares them the
    // table's miss (a hash walk). After the cache, whose hits do not pay for it.
    if !select::maybe_vip(key) {
        return Established::NotVip;
    }
    let Some(v) = entry(key) else {
        return Established::Absent;
    };
    let v = unsafe { &mut *v };
    let Some(svc) = select::service_by_id(v.service, key) else {
        return Established::Stale;
    };
    let Some((backend, age)) = still_live(v, key, client_ends(svc, tcp_end), tcp_syn) else {
        return Established::Stale;
    };
    if cacheable(key) && !tcp_end && !tcp_syn {
        // Filled here only: a new flow's entry is made further on, and its next packet
        // fills the slot.
        cache_fill(key, v, age, svc.mode);
    }
    Established::Hit(
        svc,
        Choice {
            id: v.backend,
            entry: v,
            ..Choice::default()
        },
        backend,
    )
}

/// One slot of [`FLOW_CACHE`]: a TCP or UDP flow of a DR, TUN, NAT or full-NAT service,
/// either family, as the flow table held it when the slot was filled — or the replies of a
/// half-NAT flow, as its reply mapping held them ([`reply_cache_fill`]). The destination
/// is not in a flow's slot: a hit is checked against its service's VIP, which only the
/// flow's own destination matches, so the source and the ports word name the flow. A
/// reply's slot holds the reply's destination (the client) and marked ports word instead;
/// its source must be the slot's backend. Ids ride in bits the key and clock leave free,
/// so two slots share a cache line.
#[repr(C)]
pub struct CacheSlot {
    /// The source address as two words (IPv4: its word, and 0).
    src: [u64; 2],
    /// The key's last word (ports, protocol, family; its top 16 bits are padding, 0) with
    /// a full-NAT flow's source port in those 16 bits. No tuple ([`TUPLE`] bits 0): an
    /// empty slot. (Layout: [`lb_common::cache_slot`].)
    tuple_snat_port: u64,
    /// `bpf_jiffies64` from which the slot no longer answers — at most a second after the
    /// table did, see [`cache_fill`] — in the low [`CLOCK`] bits, and the ids above (the
    /// full-NAT pool address's index, the backend id, the service id).
    expires_ids: u64,
}

/// One set of [`FLOW_CACHE`]: two slots, 64 bytes, one cache line (the array's values start
/// on a page, see there). A flow may sit in either slot of the set its key hashes to.
#[repr(C)]
pub struct CacheSet {
    slots: [CacheSlot; 2],
}

/// log2 of [`FLOW_CACHE`]'s sets per CPU, set at load time from `flow_cache_size` (a
/// read-only global, see `DEBUG_LOG`); 0: no cache, and the verifier removes its code.
#[unsafe(no_mangle)]
static CACHE_SET_BITS: Global<u32> = Global::new(0);

/// The flow table's answer for recently seen TCP and UDP flows of DR, TUN and NAT services,
/// for a second or less (see [`cache_fill`]); a region of
/// 2^[`CACHE_SET_BITS`] two-way sets per CPU (the controller sizes the array for every
/// possible CPU; a CPU indexes its own region by `bpf_get_smp_processor_id`, which the
/// verifier inlines).
///
/// A hit costs one cache line, three multiplies and a few compares, where the table costs
/// five multiplies, the set's header, the way and a key compare — and, with many flows,
/// cache misses on both. A plain array, not a per-CPU one: a per-CPU array finds
/// each value through a pointer table (one more dependent load, cold with many flows: at
/// 10k flows end to end the direct-mapped per-CPU version cost as much as the table it
/// saved). `BPF_F_MMAPABLE` only for its layout: the kernel then starts the values on a
/// page, so each set is one cache line.
///
/// What the table would decide differently is kept out: SYN, FIN and RST go to the table
/// and empty the flow's slot; the service and backend are checked on every hit as on a
/// table hit (a removed or reset backend misses at once). A UDP flow's slot answers only
/// until the table would next refresh the flow's clock ([`lb_common::udp_cache_ticks`]):
/// the table then sees the flow as often as without the cache, so its idle timeout is
/// judged on the same clock. A NAT flow's answers only until its reply mapping is due to be
/// made sure of, never once a FIN was seen, and a backend's FIN or RST empties it on every
/// CPU ([`cache_forget`]); so do full-NAT flows', which also hold the source their entry
/// chose (the pool address's index and the port).
/// A half-NAT flow's replies are cached too, keyed by the reply (see [`reply_cache_fill`]),
/// so they skip the `NAT_REPLIES` lookup.
/// What the slot does not see — the controller removing the table entry, eviction —
/// reaches packets within the second. The table entry's reference bit is set once a
/// second, when the slot is refilled. Not pinned: a new program starts empty.
#[btf_map]
static FLOW_CACHE: BtfArray<CacheSet, 1, { lb_common::BPF_F_MMAPABLE as usize }> = BtfArray::new();

/// [`cached`], [`reply_cached`]: no answer.
pub const CACHE_MISS: u64 = u64::MAX;

/// Whether [`FLOW_CACHE`] may hold `key`'s flow: TCP or UDP, with the cache on. Checked
/// inline before [`cache_fill`], so other flows' table hits do not pay its call.
/// ([`cached`] checks it inside: the same check before its call, in the director's frame,
/// cost that frame the stack slot the NAT call chain needs.)
#[inline(always)]
fn cacheable(key: &FlowKey) -> bool {
    CACHE_SET_BITS.load() != 0 && (key.proto == IPPROTO_TCP || key.proto == IPPROTO_UDP)
}

/// A [`cached`] answer as (service id, backend id).
#[inline(always)]
pub fn unpack(hit: u64) -> (u32, u32) {
    cache_slot::service_backend(hit)
}

/// Whether `slot` holds the flow whose key words ([`cache_set`]) are `w`.
#[inline(always)]
fn holds(slot: &CacheSlot, w: &[u64; 3]) -> bool {
    slot.src[0] == w[0] && slot.src[1] == w[1] && slot.tuple_snat_port & TUPLE == w[2]
}

/// The cached ids of `key`'s flow ([`cache_slot::answer`]), or [`CACHE_MISS`]. With
/// `bypass` (SYN, FIN, RST: the table decides) the flow's slot is emptied.
#[inline(always)]
fn cached(key: &FlowKey, bypass: bool) -> u64 {
    probe::<CLIENT>(key, bypass)
}

/// A NAT reply's cached ids ([`unpack`]), or [`CACHE_MISS`]: the ids of the flow whose
/// reply mapping `key` (the reply as it arrives) matched when the slot was filled, see
/// [`reply_cache_fill`]. The caller checks them against the packet
/// (`select::reply_source`). With `bypass` (SYN, FIN, RST) the slot is emptied.
#[inline(always)]
pub fn reply_cached(key: &FlowKey, bypass: bool) -> u64 {
    probe::<REPLY>(key, bypass)
}

/// [`cached`] and [`reply_cached`]: the answer of the slot keyed by `key`'s client-flow
/// words or, with `R`, its reply words. Inline (until 2026-12-06 out of line, for the
/// stack): a BPF-to-BPF call and its return cost ~8 ns where the kernel returns through a
/// return thunk (AMD's SRSO "Safe RET" on the EPYC VMs here; a DR hit 54 -> 46 ns
/// inlined). The 16 bytes it costs the director's frame (144 -> 160) the NAT call chain
/// now has: its reply mapping is built in a per-CPU scratch value (`fwd::nat`).
#[inline(always)]
fn probe<const R: bool>(key: &FlowKey, bypass: bool) -> u64 {
    if !cacheable(key) {
        return CACHE_MISS;
    }
    let (set, w) = cache_set::<R>(key);
    let Some(set) = set else {
        return CACHE_MISS;
    };
    // SAFETY: a live array value, this CPU's.
    let set = unsafe { &mut *set };
    let c = if holds(&set.slots[0], &w) {
        &mut set.slots[0]
    } else if holds(&set.slots[1], &w) {
        &mut set.slots[1]
    } else {
        return CACHE_MISS;
    };
    if bypass {
        c.tuple_snat_port = 0;
        return CACHE_MISS;
    }
    let e = c.expires_ids;
    if unsafe { bpf_jiffies64() } >= e & CLOCK {
        return CACHE_MISS;
    }
    cache_slot::answer(c.tuple_snat_port, e)
}

/// Remember the table's answer `v` for `key` ([`cacheable`]; a hit of a flow of a service
/// in `svc_mode`) for a second, or less where the table has more to do sooner: a UDP
/// flow's, whose table clock is `age` ns old, until the table would refresh it
/// ([`udp_cache_ticks`]); a NAT or full-NAT flow's until its reply mapping is due to be
/// made sure of again (a second after the last time, see `fwd::nat`), and not at all once
/// either side sent a FIN (the table entry follows the close). A full-NAT flow's slot
/// holds the source its entry chose (none chosen: not cached). Where: see [`cache_put`].
#[inline(never)]
fn cache_fill(key: &FlowKey, v: *const FlowValue, age: u64, svc_mode: u8) {
    // SAFETY: the flow's live table entry.
    let v = unsafe { &*v };
    let nat = svc_mode == mode::NAT || svc_mode == mode::FULLNAT;
    let snat = if svc_mode == mode::FULLNAT {
        if v.flags & FLOW_F_SNAT == 0 {
            return;
        }
        cache_slot::snat_word(v.snat_addr, v.snat_port_be)
    } else {
        0
    };
    let (now, hz) = crate::fwd::jiffies();
    let mut ticks = if key.proto == IPPROTO_UDP {
        udp_cache_ticks(age, UDP_IDLE_NS.load(), hz)
    } else {
        u64::from(hz)
    };
    if nat {
        if v.flags & (FLOW_F_FIN_CLIENT | FLOW_F_FIN_BACKEND) != 0 {
            return;
        }
        // Due now (this packet makes sure of it): a second from now; else the rest of it.
        let since = u64::from((now as u16).wrapping_sub(v.nat_checked));
        if since < u64::from(hz) && u64::from(hz) - since < ticks {
            ticks = u64::from(hz) - since;
        }
    }
    if ticks == 0 {
        return;
    }
    cache_put::<CLIENT>(key, v.service, v.backend, snat, now, now + ticks);
}

/// Remember a NAT reply's flow ids (`service`, `backend`) for a second: the caller matched
/// `key` (the reply as it arrives) to a mapping that restores exactly what
/// `select::reply_source` finds from those ids, on a half-NAT flow (full-NAT's client is in
/// the mapping only), without FIN or RST from the backend so far (the table follows the
/// close from there). What the table does not show the slot — the mapping evicted or swept,
/// the client's RST or last ACK — is a miss within the second or, for the close, empties
/// the slot on every CPU ([`cache_forget`]).
#[inline(never)]
pub fn reply_cache_fill(key: &FlowKey, service: u32, backend: u32) {
    if !cacheable(key) {
        return;
    }
    let (now, hz) = crate::fwd::jiffies();
    cache_put::<REPLY>(key, service, backend, 0, now, now + u64::from(hz));
}

/// Put the ids (and `snat`, a full-NAT flow's source as [`Choice::snat`] has it) in `key`'s
/// slot (its client-flow words or, with `R`, its reply words) from jiffy `now` until jiffy
/// `expires`: in the key's own slot of its set, else in an empty or expired one. A slot
/// that answers for another key still is not taken: with more flows than slots, flows that
/// share a set would otherwise take it from each other on every packet, each paying the
/// write and none the hit.
#[inline(always)]
fn cache_put<const R: bool>(
    key: &FlowKey,
    service: u32,
    backend: u32,
    snat: u32,
    now: u64,
    expires: u64,
) {
    let (Some(set), w) = cache_set::<R>(key) else {
        return;
    };
    // SAFETY: a live array value, this CPU's.
    let set = unsafe { &mut *set };
    let free = |s: &CacheSlot| s.tuple_snat_port & TUPLE == 0 || now >= s.expires_ids & CLOCK;
    let c = if holds(&set.slots[0], &w) {
        &mut set.slots[0]
    } else if holds(&set.slots[1], &w) {
        &mut set.slots[1]
    } else if free(&set.slots[0]) {
        &mut set.slots[0]
    } else if free(&set.slots[1]) {
        &mut set.slots[1]
    } else {
        return;
    };
    c.src = [w[0], w[1]];
    c.tuple_snat_port = cache_slot::tuple(w[2], snat);
    c.expires_ids = expires & CLOCK | cache_slot::ids(service, backend, snat) << IDS_SHIFT;
}

/// [`cache_set`] and its kin: a client flow's slot, keyed by its source and ports word.
const CLIENT: bool = false;
/// A NAT reply's slot, keyed by its destination and the marked ports word.
const REPLY: bool = true;

/// `key`'s set on this CPU and its three words, as [`lb_common::flow_cache_words`] has
/// them (with `R`, [`lb_common::flow_cache_reply_words`]): the source address (each
/// family's stored by the parser as whole 8-byte words, IPv4's with zeros above; with `R`
/// the destination's), and ports, protocol and family; the set within the CPU's region is
/// [`lb_common::flow_cache_set`]'s.
#[inline(always)]
fn cache_set<const R: bool>(key: &FlowKey) -> (Option<*mut CacheSet>, [u64; 3]) {
    let (i, w) = cache_index::<R>(key);
    let bits = CACHE_SET_BITS.load();
    let cpu = unsafe { bpf_get_smp_processor_id() };
    (FLOW_CACHE.get_ptr_mut(cpu << bits | i), w)
}

/// [`cache_set`]'s set within a CPU's region, and the key words.
#[inline(always)]
fn cache_index<const R: bool>(key: &FlowKey) -> (u32, [u64; 3]) {
    let base = key as *const FlowKey as *const u8;
    let (addr, mark) = if R {
        (16, lb_common::FLOW_CACHE_REPLY)
    } else {
        (0, 0)
    };
    // SAFETY: 8-byte words inside the 8-aligned, 40-byte key (offsets 0 or 16, 8 or 24, and
    // 32).
    let w = unsafe {
        [
            lb_ebpf::load_u64(base.add(addr)),
            lb_ebpf::load_u64(base.add(addr + 8)),
            lb_ebpf::load_u64(base.add(32)) | mark,
        ]
    };
    // The set of the client's address and port (`lb_common::flow_cache_set`, with the
    // reply mark known here rather than tested).
    let port = lb_common::flow_cache_client_port(w[2], R);
    (
        lb_common::flow_cache_set_of(w[0], w[1], port, CACHE_SET_BITS.load()),
        w,
    )
}

/// CPUs with a region in [`FLOW_CACHE`] (the possible ones), set at load time with
/// [`CACHE_SET_BITS`].
#[unsafe(no_mangle)]
static CACHE_CPUS: Global<u32> = Global::new(0);

/// Empty `key`'s slot on every CPU (with `R`, the slot of `key` as a NAT reply): the
/// backend ended a NAT flow or began to (FIN, RST), or the client did, which the other
/// side's CPU may not see, and the table must decide its next packets. Out of line: the
/// loop stays out of the callers' verification.
#[inline(never)]
pub fn cache_forget<const R: bool>(key: &FlowKey) {
    if !cacheable(key) {
        return;
    }
    let (i, w) = cache_index::<R>(key);
    let bits = CACHE_SET_BITS.load();
    let mut cpu = 0;
    while cpu < CACHE_CPUS.load() && cpu < lb_common::MAX_CPUS {
        if let Some(set) = FLOW_CACHE.get_ptr_mut(cpu << bits | i) {
            // SAFETY: a live array value.
            let set = unsafe { &mut *set };
            for c in &mut set.slots {
                if holds(c, &w) {
                    c.tuple_snat_port = 0;
                }
            }
        }
        cpu += 1;
    }
}

/// The service and backend ids of an established flow as [`established`] would find them
/// before its checks: from [`FLOW_CACHE`], else the table (the benchmark's stage cuts).
#[inline(always)]
pub fn found(key: &FlowKey) -> Option<(u32, u32)> {
    match cached(key, false) {
        CACHE_MISS => entry(key).map(|v| unsafe { ((*v).service, (*v).backend) }),
        hit => Some(unpack(hit)),
    }
}

/// In DR and TUN only the client's side is seen: its FIN/RST (`tcp_end`) ends the flow.
#[inline(always)]
pub fn client_ends(svc: &ServiceMeta, tcp_end: bool) -> bool {
    tcp_end && (svc.mode == mode::DR || svc.mode == mode::TUN)
}

/// Whether a SYN (`opening`) starts a new connection on this entry's 5-tuple: the client
/// ended the last one (FIN/RST, DR and TUN) and now reuses the source port. As IPVS does
/// (`conn_reuse_mode`), that connection is scheduled afresh — else it would stick to the old
/// backend even if drained, re-weighted or no longer the client's persistent one. A SYN on
/// a flow the client has not ended (a retransmission) stays.
#[inline(always)]
pub fn opens(v: &FlowValue, opening: bool) -> bool {
    opening && v.flags & FLOW_F_ENDED != 0
}

/// Whether an established entry still holds: not an idle UDP flow, not a connection the
/// client ended and now opens again ([`opens`]), and its backend was neither removed from
/// the config nor reset (those flows are rescheduled). If so, refresh the UDP clock (when
/// it is older than `udp_touch_ns`) and, when the client `ending` the connection, stop
/// counting it as active for its backend (once). `Some`: the backend's entry, and the
/// age of the entry's UDP clock after this packet (0: TCP, or just refreshed).
#[inline(always)]
fn still_live(
    v: &mut FlowValue,
    key: &FlowKey,
    ending: bool,
    opening: bool,
) -> Option<(&'static Backend, u64)> {
    let age = if key.proto == IPPROTO_UDP {
        unsafe { bpf_ktime_get_coarse_ns() }.saturating_sub(v.last_seen_ns)
    } else {
        0
    };
    let idle = UDP_IDLE_NS.load();
    if udp_expired(age, idle) || opens(v, opening) {
        return None;
    }
    let backend = select::backend(v.backend)?;
    let age = if age > udp_touch_ns(idle) {
        v.last_seen_ns += age;
        0
    } else {
        age
    };
    if ending {
        mark_ended(v);
    }
    Some((backend, age))
}

/// Idle timeout of UDP flows in ns, set at load time (`udp_idle_timeout`).
#[unsafe(no_mangle)]
static UDP_IDLE_NS: Global<u64> = Global::new(UDP_IDLE_DEFAULT_NS);

#[inline(always)]
fn lookup(svc: &ServiceMeta, key: &FlowKey, how: u32) -> Result<Choice, u32> {
    let (record, ending, opening) = (
        how & how::RECORD != 0,
        how & how::ENDING != 0,
        how & how::OPENING != 0,
    );
    // The clock is read only where it is needed: UDP hits (idle timeout) and new UDP flows; the
    // coarse one (the last tick's time, ~4 ms steps), for timeouts of a second and more.
    let own = if how & how::ABSENT != 0 {
        NO_WAY
    } else {
        xdplb_flow_find(key)
    };
    let entry = entry_at(own);
    if let Some(v) = entry {
        let v = unsafe { &mut *v };
        if still_live(v, key, ending, opening).is_some() {
            // No entry pointer out of this out-of-line function: LLVM copies the returned
            // `Choice` with 32-bit loads, and the verifier rejects a pointer filled by halves.
            return Ok(Choice {
                id: v.backend,
                ..Choice::default()
            });
        }
        // Rescheduled below: the old backend loses the flow.
        if record && v.flags & FLOW_F_ENDED == 0 {
            select::active_add(v.backend, -1);
        }
    }
    // A connection the table lacks but the ring fast path may have sent unrecorded before
    // its slot changed: the slot's held backend. A SYN opens a new one: the ring decides.
    let held = match entry {
        None if !opening => select::held(svc, key),
        _ => None,
    };
    let id = match held {
        Some(id) => id,
        None => select::choose(svc, key)?,
    };
    select::backend(id).ok_or(reason::PASS_NO_BACKEND)?;
    if record {
        let value = FlowValue {
            backend: id,
            service: svc.id,
            // The idle clock is UDP's; a TCP flow leaves it 0 (a helper call less per new
            // connection).
            last_seen_ns: if key.proto == IPPROTO_UDP {
                unsafe { bpf_ktime_get_coarse_ns() }
            } else {
                0
            },
            ..FlowValue::default()
        };
        if xdplb_flow_insert(key, &value, own) == 0 {
            crate::stats::reason(reason::FLOW_INSERT_FAILED);
        } else {
            select::active_add(id, 1);
        }
    }
    Ok(Choice {
        id,
        new: true,
        ..Choice::default()
    })
}
