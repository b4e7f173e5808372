//! Types shared by the xdplb data plane (`lb-ebpf`) and the controller (`lb-userspace`).
//!
//! One definition of every map key and value lives here. All of them are `#[repr(C)]` with
//! explicit padding and derive `bytemuck::Pod`, so a struct with hidden padding fails to
//! compile. Fields in network byte order end in `_be`; addresses are raw network-order bytes.
#![no_std]

use bytemuck::{Pod, Zeroable};

/// Services (VIP, port, protocol) the director can hold at once. Sizes `SERVICES`,
/// `SERVICE_STATS` and, with [`RINGS_PER_SERVICE`], `RINGS`.
pub const MAX_SERVICES: u32 = 64;

/// Backends across all services; a backend id indexes `BACKENDS` and `BACKEND_STATS`.
pub const MAX_BACKENDS: u32 = 4096;

/// Slots of one Maglev lookup table. Must be prime (Maglev's permutation needs it); 65537
/// keeps the weight resolution under 0.01 % at up to a few hundred backends.
pub const RING_SIZE: u32 = 65537;

/// Each service owns two rings: userspace fills the inactive one and then flips
/// `ServiceMeta::ring`, so a packet never sees a half-written table.
pub const RINGS_PER_SERVICE: u32 = 2;

/// Ring slots per `RINGS` element ([`RingEntry`]).
pub const RING_SLOTS_PER_ENTRY: u32 = 4;

/// `RINGS` elements per ring: slot `i` of ring `r` is `slots[i % 4]` of element
/// `r * RING_ENTRIES + i / 4` (the last element's three spare slots are never read).
pub const RING_ENTRIES: u32 = RING_SIZE.div_ceil(RING_SLOTS_PER_ENTRY);

/// Value of `RINGS`: four ring slots, backend ids as u16. The kernel rounds every array
/// element up to 8 bytes, so one u32 id per element took 8 bytes a slot (67 MB for all
/// rings); four u16 ids take 2 (17 MB), and one service's live ring is 128 KiB of cache
/// footprint instead of 512 KiB for the slot read of every new flow.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct RingEntry {
    pub slots: [u16; RING_SLOTS_PER_ENTRY as usize],
}

/// A [`RingEntry`] slot that holds no backend ([`NO_BACKEND`] in a ring as userspace
/// builds it).
pub const RING_NONE: u16 = u16::MAX;

// Every backend id fits a ring slot, and none is mistaken for an empty one.
const _: () = assert!(MAX_BACKENDS <= RING_NONE as u32);

impl Default for RingEntry {
    fn default() -> Self {
        RingEntry {
            slots: [RING_NONE; RING_SLOTS_PER_ENTRY as usize],
        }
    }
}

impl RingEntry {
    /// Up to four slots of a ring as userspace builds it ([`NO_BACKEND`] for none); missing
    /// slots (past the end of the ring) hold none.
    pub fn pack(slots: &[u32]) -> RingEntry {
        let mut e = RingEntry::default();
        for (i, &id) in slots.iter().enumerate().take(RING_SLOTS_PER_ENTRY as usize) {
            e.set_slot(i as u32, id);
        }
        e
    }

    /// Set slot `i` (0..4) to backend `id` ([`NO_BACKEND`] for none).
    pub fn set_slot(&mut self, i: u32, id: u32) {
        self.slots[(i % RING_SLOTS_PER_ENTRY) as usize] = if id < MAX_BACKENDS {
            id as u16
        } else {
            RING_NONE
        };
    }

    /// Slot `i` (0..4) as a backend id, [`NO_BACKEND`] for none.
    #[inline(always)]
    pub fn slot(&self, i: u32) -> u32 {
        match self.slots[(i % RING_SLOTS_PER_ENTRY) as usize] {
            RING_NONE => NO_BACKEND,
            id => u32::from(id),
        }
    }
}

/// Default capacity of the connection table (5-tuple -> backend), both families together.
/// Overridable at load time (`flow_table_size` in the YAML), rounded up to a power of two;
/// the table has a [`flow_table::Set`] per [`flow_table::WAYS`] entries (see there). Also
/// the capacity of the NAT reply mappings (`NAT_REPLIES`, as many [`flow_table::ReplySet`]s).
pub const FLOW_TABLE_CAPACITY: u32 = 1 << 20;

/// The connection table's layout (`FLOWS`, an array of [`Set`]s): set-associative, 16 ways
/// per set, the set and a 16-bit tag from one hash of the 5-tuple ([`hash`]). One
/// definition for the data plane (`flow.rs`), the controller and the tests.
///
/// Why not the kernel's LRU hash (the table until the twenty-fourth session): its insert —
/// the per-CPU LRU list's rotation under its lock, the element copy, the bucket lock — is
/// about 150–200 ns on the bench VMs even when everything is in the CPU's caches, ~6× the
/// MAC-swap floor by itself; here a new flow writes one 64-byte way and a tag.
///
/// A set is a header line — the ways' tags (0: empty) and reference bits — and 16 ways of
/// 64 bytes: the key's five words and the [`FlowValue`]. A lookup reads the header, then
/// the way whose tag matches (one more line), and compares the whole key. An insert takes
/// the flow's own way, else an empty one, else evicts by CLOCK: from the set's hand, the
/// first way whose reference bit is clear, clearing the bits it passes (a second chance),
/// and the hand moves past it. So ways are taken in the order they were last taken (FIFO),
/// skipping those used since. A hit sets its way's bit; a new way's starts clear. The flow
/// cache in front sends a live flow to the table once a second, so an idle flow's way is
/// taken first.
///
/// Lock-free: a flow's packets stay on one CPU (RSS), but two CPUs may insert different
/// flows into the same way at once. The writer clears the tag, writes the way, then the
/// tag; the key's last word carries a 16-bit [`check`] of the value's backend and service,
/// written with the ports in one store, so a way whose key and value come from two writers
/// reads as no entry (its flow is scheduled again, as after an eviction), never as the
/// other flow's backend. A lookup passes such a way over (until 2026-12-07 it stopped
/// there, so the entry written again in another way was hidden and every packet of the
/// flow was scheduled anew until CLOCK took the torn way).
///
/// The NAT reply mappings (`NAT_REPLIES`) are a second table of this kind, of
/// [`ReplySet`]s: 128-byte ways, a [`NatReply`](super::NatReply) each.
pub mod flow_table {
    use super::{FlowKey, FlowValue};

    /// Ways per set.
    pub const WAYS: usize = 16;
    /// The key's last word: ports, protocol and family (48 bits); the top 16 bits hold the
    /// [`check`].
    pub const KEY_BITS: u64 = (1 << 48) - 1;
    pub const CHECK_SHIFT: u32 = 48;

    /// A set's first cache line.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
    pub struct Head {
        /// Each way's tag ([`tag`]); 0: empty.
        pub tags: [u16; WAYS],
        /// Bit `i`: way `i` was used since it was written or last passed over (see
        /// [`flow_table`]).
        pub refs: u32,
        /// The way the next eviction looks at first (modulo [`WAYS`]).
        pub hand: u32,
        pub _pad: [u32; 6],
    }

    /// What a way holds: a flow's [`FlowValue`] (`FLOWS`) or a NAT reply mapping
    /// ([`NatReply`](super::NatReply), `NAT_REPLIES`). Its backend and service ids make the
    /// way's [`check`].
    pub trait Value: Copy {
        /// (backend id, service id).
        fn ids(&self) -> (u32, u32);
    }

    impl Value for FlowValue {
        #[inline(always)]
        fn ids(&self) -> (u32, u32) {
            (self.backend, self.service)
        }
    }

    impl Value for super::NatReply {
        #[inline(always)]
        fn ids(&self) -> (u32, u32) {
            (self.backend, self.service)
        }
    }

    /// One entry: the key's words as the data plane loads them ([`FlowKey`]'s five 8-byte
    /// words; the last with the [`check`] in its top 16 bits) and the value. `FLOWS`' ways
    /// are 64 bytes, `NAT_REPLIES`' ([`ReplyWay`]) 128.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct Way<V = FlowValue> {
        pub key: [u64; 5],
        pub value: V,
    }

    /// The value of `FLOWS`: 17 cache lines (the array's values start on a page:
    /// `BPF_F_MMAPABLE`, so each set's lines are whole). `NAT_REPLIES`' ([`ReplySet`]): 33.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct Set<W = Way> {
        pub head: Head,
        pub ways: [W; WAYS],
    }

    /// A way of the NAT reply mappings (`NAT_REPLIES`): the reply's key (as the backend
    /// sends it) and what to restore; two cache lines.
    pub type ReplyWay = Way<super::NatReply>;
    /// A set of `NAT_REPLIES`.
    pub type ReplySet = Set<ReplyWay>;

    // SAFETY: `repr(C)` structs of plain words whose sizes (asserted below) leave no padding.
    unsafe impl bytemuck::Zeroable for Way {}
    unsafe impl bytemuck::Pod for Way {}
    unsafe impl bytemuck::Zeroable for ReplyWay {}
    unsafe impl bytemuck::Pod for ReplyWay {}
    unsafe impl bytemuck::Zeroable for Set {}
    unsafe impl bytemuck::Pod for Set {}
    unsafe impl bytemuck::Zeroable for ReplySet {}
    unsafe impl bytemuck::Pod for ReplySet {}

    const _: () = assert!(
        core::mem::size_of::<Head>() == 64
            && core::mem::size_of::<Way>() == 64
            && core::mem::size_of::<FlowKey>() == 40
            && core::mem::size_of::<ReplyWay>() == 128
            && core::mem::size_of::<Set>() == 64 + 64 * WAYS
            && core::mem::size_of::<ReplySet>() == 64 + 128 * WAYS
    );

    /// The 5-tuple's hash: `h = (((w0·C ⊕ w1)·C ⊕ w2)·C ⊕ w3)·C ⊕ ports`, then
    /// `(h ⊕ h >> 32)·C`, C the 64-bit golden ratio (each multiply moves what came before
    /// up before the next word joins; a product's high bits depend on every bit below
    /// them). The set is its top bits, the tag bits 16..32. The fold: a multiply moves a
    /// word's bits only upward, so without it the bits that tell IPv6 clients of one subnet
    /// apart (an address's last bytes, the top of `w1` as loaded) reached only the top 16
    /// bits of the hash: every such client with one source port had the same tag, and a
    /// lookup read the way of each flow of its set (`bench`: 2 tags among 100k clients).
    #[inline(always)]
    pub fn hash(w: &[u64; 5]) -> u64 {
        const C: u64 = 0x9e37_79b9_7f4a_7c15;
        let h = (w[0].wrapping_mul(C) ^ w[1]).wrapping_mul(C) ^ w[2];
        let h = (h.wrapping_mul(C) ^ w[3]).wrapping_mul(C) ^ (w[4] & KEY_BITS);
        (h ^ h >> 32).wrapping_mul(C)
    }

    /// The set of hash `h` in a table of 2^`bits` sets (`bits` in 1..=32).
    #[inline(always)]
    pub fn set_of(h: u64, bits: u32) -> u32 {
        h.wrapping_shr(64 - bits) as u32
    }

    /// The tag of hash `h`: never 0 (empty).
    #[inline(always)]
    pub fn tag(h: u64) -> u16 {
        (h >> 16) as u16 | 1
    }

    /// A value's check: 16 bits of its backend and service ids.
    #[inline(always)]
    pub fn check(backend: u32, service: u32) -> u64 {
        const C: u64 = 0x9e37_79b9_7f4a_7c15;
        ((u64::from(backend) << 32 | u64::from(service)).wrapping_mul(C) >> 48) << CHECK_SHIFT
    }

    /// `key` as a way holds it, with `value`'s check.
    pub fn way<V: Value>(key: &FlowKey, value: V) -> Way<V> {
        let mut w: [u64; 5] = bytemuck::cast(*key);
        let (backend, service) = value.ids();
        w[4] = w[4] & KEY_BITS | check(backend, service);
        Way { key: w, value }
    }

    impl<V: Value> Way<V> {
        /// Whether the key's check agrees with the value: not a way torn between two
        /// writers.
        #[inline(always)]
        pub fn intact(&self) -> bool {
            let (backend, service) = self.value.ids();
            self.key[4] & !KEY_BITS == check(backend, service)
        }

        /// The flow's key, if the way is [`Way::intact`].
        pub fn flow(&self) -> Option<FlowKey> {
            if !self.intact() {
                return None;
            }
            let mut w = self.key;
            w[4] &= KEY_BITS;
            Some(bytemuck::cast(w))
        }
    }

    /// Sets for a table of at least `entries` entries: a power of two, at least one.
    pub fn sets_for(entries: u32) -> u32 {
        (entries.div_ceil(WAYS as u32)).max(1).next_power_of_two()
    }
}

/// Interfaces the program may be attached to at once (entries of `IFACES`).
pub const MAX_IFACES: u32 = 64;

/// Ring slot value that means "no backend" (empty service, every weight zero).
pub const NO_BACKEND: u32 = u32::MAX;

/// `BPF_F_NO_COMMON_LRU`: per-CPU LRU lists for the connection table (uapi/linux/bpf.h).
pub const BPF_F_NO_COMMON_LRU: u32 = 1 << 1;

/// `BPF_F_MMAPABLE` (uapi/linux/bpf.h): an array whose values start on a page (the flow
/// cache, for its cache-line sets).
pub const BPF_F_MMAPABLE: u32 = 1 << 10;

/// Default slots of the per-CPU flow cache (`flow_cache_size`): two per 64-byte set, so
/// 2 MB per CPU; at 10k flows on a CPU about 1 % find their set full.
pub const FLOW_CACHE_SLOTS: u32 = 1 << 16;

/// The flow cache's set (of 2^`bits` per CPU) for a key's words ([`flow_cache_words`] or
/// [`flow_cache_reply_words`]): [`flow_cache_set_of`] the client's address and port — a
/// client flow's source address and port, a NAT reply's destination address and port. So a
/// half-NAT flow's slot and its replies' slot share a set, one cache line: the reply finds
/// it as its client packet left it (at 10k flows end to end, a reply's own set was one more
/// cold line per round trip). And every reply from one backend's port probes the same set
/// as a client flow first (the miss that leads to its reply slot): a line that stays warm.
#[inline(always)]
pub fn flow_cache_set(w: &[u64; 3], bits: u32) -> u32 {
    let port = flow_cache_client_port(w[2], w[2] & FLOW_CACHE_REPLY != 0);
    flow_cache_set_of(w[0], w[1], port, bits)
}

/// The client's port in a key's ports word (source port in its low 16 bits, destination
/// port above): a client flow's source port or, for a NAT reply (`reply`), its destination
/// port. The big-endian value as loaded (see [`flow_cache_set_of`]).
#[inline(always)]
pub fn flow_cache_client_port(ports: u64, reply: bool) -> u64 {
    let port = if reply { ports >> 16 } else { ports };
    port & 0xffff
}

/// The set of a client's address (its two words, see [`flow_cache_words`]) and port (the
/// big-endian value as loaded, host order of the 16 bits): the high bits of
/// `((a0·C ⊕ a1)·C ⊕ port)·C`, C the 64-bit golden ratio. A product's high bits depend on
/// every bit below them, and each multiply moves what came before up before the next word
/// joins in. (One multiply of the xor of the words put clients numbered in sequence — the
/// end-to-end bench's 10k — in a third of the sets.) `bits` in 1..=63.
#[inline(always)]
pub fn flow_cache_set_of(a0: u64, a1: u64, port: u64, bits: u32) -> u32 {
    const C: u64 = 0x9e37_79b9_7f4a_7c15;
    let h = (a0.wrapping_mul(C) ^ a1).wrapping_mul(C) ^ port;
    h.wrapping_mul(C).wrapping_shr(64 - bits) as u32
}

/// A key's words as the data plane loads them for the flow cache: the source address's
/// two (an IPv4 address has zeros above it, and a second word of 0) and the word of ports,
/// protocol and family. The destination is not among them: a cached answer is checked
/// against its service's VIP.
pub fn flow_cache_words(key: &FlowKey) -> [u64; 3] {
    let w: &[u64; 5] = bytemuck::cast_ref(key);
    [w[0], w[1], w[4]]
}

/// The mark of a NAT reply's slot in the flow cache: the top bit of the key's family byte
/// (bit 47 of its ports word), never set in a packet's key, so a reply's slot and a client
/// flow's never hold each other's words.
pub const FLOW_CACHE_REPLY: u64 = 1 << 47;

/// A NAT reply's words ([`flow_cache_words`] for the slot that answers it, keyed by the
/// reply as it arrives from the backend): its destination's two (the client; the source,
/// the backend, is checked against the backend id the slot holds) and the ports word, marked
/// with [`FLOW_CACHE_REPLY`].
pub fn flow_cache_reply_words(key: &FlowKey) -> [u64; 3] {
    let w: &[u64; 5] = bytemuck::cast_ref(key);
    [w[2], w[3], w[4] | FLOW_CACHE_REPLY]
}

/// The layout of a flow-cache slot's last two words (the data plane's `flow::CacheSlot`;
/// the first two are the key's address words): one definition for the data plane and the
/// tests that reach into `FLOW_CACHE`. Ids ride in bits the key and the clock leave free,
/// so a slot is 32 bytes and a 64-byte set holds two.
pub mod cache_slot {
    /// The tuple word's key bits (ports, protocol, family; see
    /// [`super::flow_cache_words`]). No tuple (these bits 0): an empty slot.
    pub const TUPLE: u64 = (1 << 48) - 1;
    /// Where a full-NAT flow's source port (network order, as stored) sits in the tuple
    /// word: its top 16 bits, padding in the key.
    pub const SNAT_PORT_SHIFT: u32 = 48;
    /// The clock word's clock bits: the `bpf_jiffies64` from which the slot no longer
    /// answers. 2^40 jiffies: 34 years at 1000 Hz from the kernel's start value (2^32 −
    /// 300 s of jiffies); past that every slot reads expired, so the cache stops answering,
    /// it never answers wrongly.
    pub const CLOCK: u64 = (1 << 40) - 1;
    /// Where the clock word's ids start ([`ids`]).
    pub const IDS_SHIFT: u32 = 40;
    pub const SNAT_ADDR_BITS: u32 = 6;
    pub const BACKEND_BITS: u32 = 12;
    pub const SERVICE_BITS: u32 = 6;
    const IDS_BITS: u32 = SNAT_ADDR_BITS + BACKEND_BITS + SERVICE_BITS;
    const _: () = assert!(
        super::MAX_SNAT_ADDRS <= 1 << SNAT_ADDR_BITS
            && super::MAX_BACKENDS <= 1 << BACKEND_BITS
            && super::MAX_SERVICES <= 1 << SERVICE_BITS
            && IDS_SHIFT + IDS_BITS == 64
            && CLOCK == (1 << IDS_SHIFT) - 1
    );

    /// A full-NAT flow's source as one word (the data plane's `Choice::snat`): the pool
    /// address's index << 16 | the port (network order, as stored). 0 for other flows.
    #[inline(always)]
    pub fn snat_word(index: u16, port_be: u16) -> u32 {
        u32::from(index) << 16 | u32::from(port_be)
    }

    /// A [`snat_word`]'s (pool address index, port in network order).
    #[inline(always)]
    pub fn snat_parts(snat: u32) -> (u32, u16) {
        (snat >> 16, snat as u16)
    }

    /// The tuple word of a slot: the key's word (its [`TUPLE`] bits) with the port of
    /// `snat` (a [`snat_word`]) above it.
    #[inline(always)]
    pub fn tuple(key_word: u64, snat: u32) -> u64 {
        key_word | u64::from(snat_parts(snat).1) << SNAT_PORT_SHIFT
    }

    /// The clock word's ids, from bit 0 (shift by [`IDS_SHIFT`] to store): the pool
    /// address's index of `snat` (a [`snat_word`]), the backend id above it, the service id
    /// on top.
    #[inline(always)]
    pub fn ids(service: u32, backend: u32, snat: u32) -> u64 {
        u64::from(service) << (SNAT_ADDR_BITS + BACKEND_BITS)
            | u64::from(backend) << SNAT_ADDR_BITS
            | u64::from(snat_parts(snat).0)
    }

    /// A slot's answer from its tuple and clock words: the ids ([`ids`]) with the full-NAT
    /// port above them. Never `u64::MAX` (the data plane's "no answer").
    #[inline(always)]
    pub fn answer(tuple: u64, clock: u64) -> u64 {
        clock >> IDS_SHIFT | (tuple >> SNAT_PORT_SHIFT) << IDS_BITS
    }

    /// An [`answer`]'s (service id, backend id).
    #[inline(always)]
    pub fn service_backend(answer: u64) -> (u32, u32) {
        let ids = answer as u32;
        (
            ids >> (SNAT_ADDR_BITS + BACKEND_BITS) & ((1 << SERVICE_BITS) - 1),
            ids >> SNAT_ADDR_BITS & ((1 << BACKEND_BITS) - 1),
        )
    }

    /// An [`answer`]'s full-NAT source, a [`snat_word`] (0 for other flows).
    #[inline(always)]
    pub fn snat(answer: u64) -> u32 {
        snat_word(
            (answer & ((1 << SNAT_ADDR_BITS) - 1)) as u16,
            (answer >> IDS_BITS) as u16,
        )
    }
}

/// Bounds of `flow_cache_size` other than 0 (off): powers of two from two sets (4 slots;
/// the data path reads 0 set bits as off) to 16M slots (512 MB per CPU).
pub const FLOW_CACHE_SLOTS_MAX: u32 = 1 << 24;

/// CPUs the flow cache serves at most: a backend's FIN or RST on a NAT flow empties the
/// flow's slot in every CPU's region, a loop the verifier walks once per CPU.
pub const MAX_CPUS: u32 = 1024;

/// Whether `slots` is a `flow_cache_size` the data plane can use: 0 (off), or a power of
/// two from 4 to [`FLOW_CACHE_SLOTS_MAX`]. (The config check and the loader ask this.)
pub fn flow_cache_size_valid(slots: u32) -> bool {
    slots == 0 || (slots.is_power_of_two() && (4..=FLOW_CACHE_SLOTS_MAX).contains(&slots))
}

pub const AF_INET: u8 = 4;
pub const AF_INET6: u8 = 6;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_ICMPV6: u8 = 58;
/// IPv4 payload of an outer IP header (IP-in-IP, RFC 2003).
pub const IPPROTO_IPIP: u8 = 4;
/// IPv6 payload of an outer IP header (RFC 2473).
pub const IPPROTO_IPV6: u8 = 41;

/// Hop limit / TTL of packets the director builds (outer headers, ICMP replies).
pub const DEFAULT_TTL: u8 = 64;

/// Distinct VIP addresses (for ICMP echo answers), `VIPS` capacity.
pub const MAX_VIPS: u32 = MAX_SERVICES;

/// Forwarding mode of a service (`ServiceMeta::mode`).
pub mod mode {
    /// Direct routing: rewrite MACs, send back out (`XDP_TX`).
    pub const DR: u8 = 1;
    /// IP-in-IP to the backend (IPIP, IPv6-in-IPv6, IPv4-in-IPv6); next hop by FIB lookup.
    pub const TUN: u8 = 2;
    /// Destination NAT to the backend; replies come back through the director.
    pub const NAT: u8 = 3;
    /// Source + destination NAT: the backend sees a director address (pool) as the client.
    pub const FULLNAT: u8 = 4;
}

/// Key of `SERVICES`: a virtual service. IPv4 addresses occupy the first four bytes of
/// `addr` and the rest is zero. `port_be == 0` is the wildcard entry for every port.
#[repr(C, align(4))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Pod, Zeroable)]
pub struct VipKey {
    pub addr: [u8; 16],
    pub port_be: u16,
    pub proto: u8,
    /// [`AF_INET`] or [`AF_INET6`].
    pub family: u8,
}

impl VipKey {
    /// The service key of a flow's destination with port `port_be` (its own, or 0 for the
    /// every-port entry): five word moves. Built field by field, the address is copied in
    /// 2-byte pieces and the last word in three stores, and the kernel's hash then reads
    /// each word from several stores, which the store buffer cannot forward.
    #[inline(always)]
    pub fn of_flow(key: &FlowKey, port_be: u16) -> VipKey {
        let w: &[u32; 10] = bytemuck::cast_ref(key);
        let tail = u32::from(port_be) | u32::from(key.proto) << 16 | u32::from(key.family) << 24;
        // Little-endian (asserted below): the port's bytes first, then protocol and family.
        bytemuck::cast([w[4], w[5], w[6], w[7], tail])
    }
}

/// Value of `SERVICE_SLOTS`, indexed by service id: the service's key and meta, so a packet
/// of an established flow reaches its service from the flow's `service` id without hashing
/// the VIP. The data plane checks the packet against `key` (an id may be reused); an empty
/// slot is all zeros (family 0 matches no packet). 8-aligned (the size stays 40), so the
/// data plane compares the VIP in two word loads, not sixteen byte loads.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct ServiceSlot {
    pub key: VipKey,
    pub meta: ServiceMeta,
}

/// Value of `SERVICES`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct ServiceMeta {
    /// Index into `SERVICE_STATS`, `< MAX_SERVICES`.
    pub id: u32,
    /// Which ring of `RINGS` is live: elements `ring * RING_ENTRIES ..`, `< MAX_SERVICES * RINGS_PER_SERVICE`.
    pub ring: u32,
    /// One of [`mode`].
    pub mode: u8,
    /// [`SERVICE_F_DROP_NO_BACKEND`].
    pub flags: u8,
    /// One of [`sched`]: how the live ring is read for a new flow.
    pub scheduler: u8,
    /// [`hash`] bits: which 5-tuple fields a hashing scheduler uses; 0 = all five.
    pub hash_fields: u8,
    /// Round robin: length of the sequence in the live ring (`<= RING_SIZE`).
    pub rr_len: u32,
    /// Persistence timeout in seconds (LVS `-p`); 0 = off.
    pub persist_s: u32,
}

/// `ServiceMeta::scheduler`: how a new flow picks its slot of the live ring.
pub mod sched {
    /// Hash of the flow (`hash_fields`) into a (weighted) Maglev table. Also `sh` (source
    /// address only) and `lc`/`wlc` (the controller writes the table with shares derived
    /// from active-flow counts).
    pub const HASH: u8 = 0;
    /// The next slot of a smooth weighted round-robin sequence (`rr_len` long), advanced by
    /// a per-CPU cursor.
    pub const ROUND_ROBIN: u8 = 1;
}

/// `ServiceMeta::hash_fields` bits (0 = every field).
pub mod hash {
    pub const SRC_IP: u8 = 1;
    pub const SRC_PORT: u8 = 2;
    pub const DST_IP: u8 = 4;
    pub const DST_PORT: u8 = 8;
    pub const PROTO: u8 = 16;
    pub const ALL: u8 = SRC_IP | SRC_PORT | DST_IP | DST_PORT | PROTO;
}

/// Key of `PERSIST` (LVS persistence templates): a client of a service.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct PersistKey {
    /// Client address; IPv4 in the first four bytes.
    pub client: [u8; 16],
    pub service: u32,
}

/// Value of `PERSIST`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct PersistValue {
    pub backend: u32,
    pub _pad: u32,
    /// `bpf_ktime_get_coarse_ns()` of the client's last new flow.
    pub last_ns: u64,
}

/// Capacity of `PERSIST` (clients with a live template, LRU beyond).
pub const PERSIST_CAPACITY: u32 = 1 << 18;

/// The connection's 5-tuple as seen on the wire (client -> VIP), either family: the key of
/// `FLOWS` and `NAT_REPLIES` ([`flow_table`]).
/// 8-aligned so the data plane copies and hashes it in whole words.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct FlowKey {
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub sport_be: u16,
    pub dport_be: u16,
    pub proto: u8,
    pub family: u8,
    pub _pad: [u8; 2],
}

/// An IPv4 5-tuple in 16 bytes: what [`flow_hash`] mixes for an IPv4 flow. (The key of
/// `FLOWS4` and `NAT_REPLIES4`, LRU hashes, before layout 12: the kernel hashed and compared
/// the whole key, and 16 bytes cost one jhash round where [`FlowKey`]'s 40 cost three.)
#[repr(C, align(4))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct FlowKey4 {
    pub src: [u8; 4],
    pub dst: [u8; 4],
    pub sport_be: u16,
    pub dport_be: u16,
    pub proto: u8,
    pub _pad: [u8; 3],
}

// `FlowKey4::of` and the data plane's parser build keys from words assuming little-endian
// byte order (`bpfel-unknown-none`, x86-64, aarch64).
const _: () = assert!(cfg!(target_endian = "little"));

impl FlowKey4 {
    /// The IPv4 table's key of an [`AF_INET`] flow (addresses are in the first 4 bytes).
    /// Four word moves: built field by field, LLVM stores it byte by byte and zeroes the
    /// padding with a `memset` call, in the data plane's hottest path. (Two 8-byte moves,
    /// masked, measured 2 ns slower a DR hit.)
    #[inline(always)]
    pub fn of(key: &FlowKey) -> FlowKey4 {
        let w: &[u32; 10] = bytemuck::cast_ref(key);
        bytemuck::cast([w[0], w[4], w[8], u32::from_ne_bytes([key.proto, 0, 0, 0])])
    }

    /// The flow in its family-independent form.
    pub fn key(&self) -> FlowKey {
        let mut key = FlowKey {
            sport_be: self.sport_be,
            dport_be: self.dport_be,
            proto: self.proto,
            family: AF_INET,
            ..FlowKey::default()
        };
        key.src[..4].copy_from_slice(&self.src);
        key.dst[..4].copy_from_slice(&self.dst);
        key
    }
}

/// A flow's entry in `FLOWS` ([`flow_table::Way`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct FlowValue {
    /// Backend id (index of `BACKENDS`).
    pub backend: u32,
    /// Service id the flow was scheduled by.
    pub service: u32,
    /// Full-NAT: the source the backend sees (pool address index, port in network order).
    pub snat_addr: u16,
    pub snat_port_be: u16,
    /// [`FLOW_F_FIN_CLIENT`] | [`FLOW_F_FIN_BACKEND`] | [`FLOW_F_SNAT`] | [`FLOW_F_ENDED`].
    pub flags: u16,
    /// NAT: when the client side last made sure of the reply mapping, the low 16 bits of
    /// `bpf_jiffies64` (wrapping; a check is due a second, `CONFIG_HZ` jiffies, later).
    /// (Until 2026-11-24 in units of 2^28 ns of the coarse clock; an adopted table's old
    /// values only make one check come early or up to a second late. `flags` was a u32
    /// holding only the low bits before: same layout.)
    pub nat_checked: u16,
    /// `bpf_ktime_get_coarse_ns()` (CLOCK_MONOTONIC_COARSE: the clock as of the last tick)
    /// when a packet was last seen; UDP only (a TCP flow's is 0), refreshed at most every
    /// [`udp_touch_ns`], for the idle timeout. The coarse clock reads a stored value; the precise one reads the
    /// (paravirtual) clock source, ~20 ns more per new flow and per UDP packet on a VM.
    pub last_seen_ns: u64,
}

/// Coarsest granularity of `FlowValue::last_seen_ns` updates (saves a write on most packets).
pub const FLOW_TOUCH_NS: u64 = 1_000_000_000;

/// How stale a UDP flow's `last_seen_ns` may get before a packet refreshes it, for an idle
/// timeout of `idle_ns`: [`FLOW_TOUCH_NS`], or an eighth of the timeout if that is shorter.
pub const fn udp_touch_ns(idle_ns: u64) -> u64 {
    let eighth = idle_ns / 8;
    if eighth < FLOW_TOUCH_NS {
        eighth
    } else {
        FLOW_TOUCH_NS
    }
}

/// Whether a UDP flow whose `last_seen_ns` is `age_ns` old has ended, for an idle timeout of
/// `idle_ns`. `last_seen_ns` lags the flow's last packet by up to [`udp_touch_ns`], so the
/// flow ends only past the timeout plus that lag: a flow whose packets are never further
/// apart than the timeout is never ended, and a silent one ends within 1⅛ of it.
pub const fn udp_expired(age_ns: u64, idle_ns: u64) -> bool {
    age_ns > idle_ns.saturating_add(udp_touch_ns(idle_ns))
}

/// How many jiffies (`hz` per second) the flow cache may answer for a UDP flow whose table
/// entry's clock is `age_ns` old after the packet that fills the slot: until the table would
/// next refresh that clock ([`udp_touch_ns`]), so the table sees the flow as often as without
/// the cache and its idle timeout ([`udp_expired`]) and the controller's sweep judge the same
/// clock; at most a second, as for TCP. Rounded down twice (ns to jiffies by 2^30 instead of
/// 10^9, and one jiffy less, as `jiffies` may step before the coarse clock does); 0: do not
/// fill.
pub const fn udp_cache_ticks(age_ns: u64, idle_ns: u64, hz: u32) -> u64 {
    let touch = udp_touch_ns(idle_ns);
    if age_ns >= touch {
        return 0;
    }
    let ticks = ((touch - age_ns).saturating_mul(hz as u64)) >> 30;
    let ticks = if ticks > hz as u64 { hz as u64 } else { ticks };
    ticks.saturating_sub(1)
}

/// Default idle timeout of UDP flows (`udp_idle_timeout`).
pub const UDP_IDLE_DEFAULT_NS: u64 = 30_000_000_000;

/// `FlowValue::flags`: a FIN was seen from the client / from the backend.
pub const FLOW_F_FIN_CLIENT: u16 = 1;
pub const FLOW_F_FIN_BACKEND: u16 = 2;
/// `FlowValue::flags`: `snat_*` hold the flow's full-NAT source.
pub const FLOW_F_SNAT: u16 = 4;
/// `FlowValue::flags`: the flow's end was counted (`BACKEND_ACTIVE` decremented once).
pub const FLOW_F_ENDED: u16 = 8;

/// The value of a `NAT_REPLIES` way ([`flow_table::ReplyWay`]), keyed by a reply's 5-tuple
/// as it arrives from the backend (src = backend, dst = client or full-NAT source): what to
/// restore. 88 bytes, so a way is two cache lines: the key and the VIP, ports and flags in
/// the first, the ids, the next hop and the client in the second. The forward flow is not
/// kept: it is the client to the VIP ([`NatReply::flow`]). (Until layout 12 two LRU hashes,
/// `NAT_REPLIES4` and `NAT_REPLIES6`, of 128-byte values holding the flow too: 461 MB for
/// the default million entries, where this table takes 138 MB.)
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct NatReply {
    /// The VIP and port the client talks to (the reply's new source).
    pub vip: [u8; 16],
    pub vip_port_be: u16,
    pub client_port_be: u16,
    /// 1 = full-NAT (also rewrite the destination).
    pub fullnat: u8,
    /// [`NAT_REPLY_F_FIN_BACKEND`], so the reply path looks the forward flow up only while
    /// the connection closes.
    pub flags: u8,
    /// The client's family (a full-NAT flow's backend may be of the other).
    pub client_family: u8,
    pub _pad: u8,
    /// Service and backend ids of the flow, to count replies.
    pub service: u32,
    pub backend: u32,
    /// The next hop toward the client as last routed for this flow's replies: a reply that
    /// misses the flow cache reads it with the mapping it looked up anyway, where the
    /// per-CPU client slots of `NEXT_HOPS` (4,096, by client address) miss once clients
    /// outnumber them.
    pub hop: ReplyHop,
    /// The client: the reply's new destination in full-NAT, its own destination in NAT.
    pub client: [u8; 16],
    pub _pad2: [u8; 8],
}

// In a way (after the 40-byte key): the VIP, ports and flags in its first cache line, the
// ids, the next hop and the client in its second.
const _: () = assert!(core::mem::size_of::<NatReply>() == 88);
const _: () = assert!(40 + core::mem::offset_of!(NatReply, service) == 64);

impl NatReply {
    /// The forward flow this mapping answers for (the client to the VIP), of protocol
    /// `proto` (the reply's).
    #[inline(always)]
    pub fn flow(&self, proto: u8) -> FlowKey {
        FlowKey {
            src: self.client,
            dst: self.vip,
            sport_be: self.client_port_be,
            dport_be: self.vip_port_be,
            proto,
            family: self.client_family,
            _pad: [0; 2],
        }
    }
}

/// [`NatReply::hop`]: it answers until jiffy `expires_j` (a second after the FIB's answer,
/// as the per-CPU next-hop cache's), for replies that come in on `ingress` and fit in `mtu`
/// (0: not asked yet).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct ReplyHop {
    /// `bpf_jiffies64`'s low 32 bits.
    pub expires_j: u32,
    pub ingress: u32,
    pub ifindex: u32,
    pub mtu: u32,
    pub smac: [u8; 6],
    pub dmac: [u8; 6],
    /// The client address's four big-endian words xor-ed: a hop whose mapping the LRU gave
    /// to another flow between a reply's lookup and its write (eviction ignores the
    /// reference bit when nothing else can go) does not answer for that flow's client.
    pub client_tag: u32,
}

/// `NatReply::flags`: the backend sent a FIN (mirrors the flow's [`FLOW_F_FIN_BACKEND`]).
pub const NAT_REPLY_F_FIN_BACKEND: u8 = 1;

/// Full-NAT source addresses (`SNAT_POOL`, an array); `SNAT_CONFIG` says how many of each
/// family and which port range.
pub const MAX_SNAT_ADDRS: u32 = 64;

/// Value of `SNAT_POOL`. 4-aligned (same layout): at alignment 1 every full-NAT packet's
/// source address was copied out of the map byte by byte.
#[repr(C, align(4))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct SnatAddr {
    pub addr: [u8; 16],
}

/// Value of `SNAT_CONFIG[0]`: pool layout. IPv4 addresses are slots `0..v4_count`, IPv6
/// addresses `v4_count..v4_count + v6_count`; ports `port_min..=port_max` (host order).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct SnatConfig {
    pub v4_count: u32,
    pub v6_count: u32,
    pub port_min: u32,
    pub port_max: u32,
}

/// `Backend::flags` bit: the slot holds a configured backend.
pub const BACKEND_F_VALID: u8 = 1;
/// `Backend::flags` bit: established flows to this backend are rescheduled on their next
/// packet (health check failed and the service's `on_backend_down` is `reset`).
pub const BACKEND_F_RESET: u8 = 2;
/// `Backend::flags` bit: the health check says down (the backend is out of the ring). Kept
/// in the map so a restarted controller and `xdplb status` know it; the data plane ignores it.
pub const BACKEND_F_DOWN: u8 = 4;
/// `Backend::flags` bit: drained by `xdplb drain` (out of the ring, flows finish). Kept in
/// the map so the drain survives a controller restart; the data plane ignores it.
pub const BACKEND_F_DRAINED: u8 = 8;
/// `Backend::flags` bit: removed from the config; kept (out of the ring) only so its
/// established flows can finish. Informational, like [`BACKEND_F_DOWN`].
pub const BACKEND_F_RETIRED: u8 = 16;

/// `ServiceMeta::flags` bit: when no backend is usable, drop new packets (counted as
/// `drop_no_backend`) instead of passing them to the kernel.
pub const SERVICE_F_DROP_NO_BACKEND: u8 = 1;

/// `ServiceMeta::flags` bit (`ring_fast_path: true`): a TCP packet whose ring slot is clean
/// ([`RING_DIRTY_WORDS`]) goes to the slot's backend without the flow table, a SYN too (the
/// connection is not recorded); only a FIN or RST looks its flow up, to end an entry the
/// table may hold. Such services also have [`SERVICE_F_RING_HELD`].
pub const SERVICE_F_RING_FAST: u8 = 2;

/// `ServiceMeta::flags` bit: connections of this service may be missing from the flow table
/// (it has, or within `ring_fast_path_hold` had, the ring fast path), so a non-SYN TCP
/// packet without an entry whose ring slot is dirty goes to the slot's held backend
/// (`RING_HELD`: its backend when it was last clean), if usable, and is recorded with it.
pub const SERVICE_F_RING_HELD: u8 = 4;

/// `RING_DIRTY`: per service, one bit per ring slot, set while a connection on that slot
/// may have another backend than the ring's: the slot's backend changed less than
/// `ring_fast_path_hold` ago (a connection the table does not hold keeps the held
/// backend), or the flow table holds a flow there with another backend. The controller
/// writes the held backend and sets the bit before the ring flips, and clears it once
/// both have passed. `RING_DIRTY_WORDS` u64 words per service, service `s`'s words at
/// `s * RING_DIRTY_WORDS ..`.
pub const RING_DIRTY_WORDS: u32 = RING_SIZE.div_ceil(64);

/// Slots of `SERVICE_INDEX` (a power of two): service id + 1 of the service whose (VIP,
/// port, protocol) hashes there ([`index_slot`]), 0 for none, [`INDEX_SLOT_SHARED`] when
/// two services share the slot. A new flow finds its service here (an array word and the
/// service's `SERVICE_SLOTS` key to check) instead of hashing into `SERVICES`; the ring
/// fast path finds its services here. With [`MAX_SERVICES`] services at most, two share a
/// slot rarely, and then `SERVICES` decides.
pub const SERVICE_INDEX_SLOTS: u32 = 1024;

/// A `SERVICE_INDEX` slot that two services hash to: the packet looks its
/// service up in `SERVICES`.
pub const INDEX_SLOT_SHARED: u32 = u32::MAX;

/// The `SERVICE_INDEX` slot of a service: its VIP as two 8-byte halves in memory order (as
/// [`vip_filter_bit_of_halves`]), port (network order; 0 for every port) and protocol.
#[inline(always)]
pub fn index_slot(lo: u64, hi: u64, family: u8, port_be: u16, proto: u8) -> u32 {
    let mix = u64::from(port_be) << 8 | u64::from(proto);
    vip_filter_bit_of_halves(lo ^ mix.rotate_left(40), hi, family) % SERVICE_INDEX_SLOTS
}

/// Value of `BACKENDS` (an array indexed by backend id).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct Backend {
    /// Backend address, network order; IPv4 in the first four bytes.
    pub addr: [u8; 16],
    /// Next-hop MAC for DR mode.
    pub mac: [u8; 6],
    pub family: u8,
    /// [`BACKEND_F_VALID`] | [`BACKEND_F_RESET`] | [`BACKEND_F_DOWN`] | [`BACKEND_F_DRAINED`].
    pub flags: u8,
    /// Service id the backend belongs to (for `xdplb status`; the data plane checks a cached
    /// NAT reply's ids with it).
    pub service: u32,
    /// Configured weight (for `xdplb status`; the ring already encodes it).
    pub weight: u32,
    /// NAT modes: the backend's port (network order); 0 = the client's destination port.
    pub port_be: u16,
    pub _pad: [u8; 2],
}

/// `IfaceInfo::flags` bits.
pub const IFACE_F_SRC4: u8 = 1;
pub const IFACE_F_SRC6: u8 = 2;
/// `IfaceInfo::flags`: the slot of `IFACE_SLOTS` holds an interface (set by the controller).
pub const IFACE_F_PRESENT: u8 = 4;

/// Interfaces with an ifindex below this are also kept in `IFACE_SLOTS`, an array indexed
/// by ifindex: an array lookup costs a few instructions, a hash lookup (`IFACES`) a hash.
pub const IFACE_SLOTS: u32 = 4096;

/// Value of `IFACES`, keyed by ifindex (u32): what the program needs about an interface it
/// is attached to. 8-aligned (the size stays 32): every field is bytes, and at alignment 1
/// LLVM assembled the MAC of every forwarded packet from six byte loads and shifts.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct IfaceInfo {
    pub mac: [u8; 6],
    /// [`IFACE_F_SRC4`] | [`IFACE_F_SRC6`]: which TUN outer sources are configured.
    pub flags: u8,
    pub _pad: u8,
    /// Outer IPv4 source for TUN packets leaving this interface.
    pub src4: [u8; 4],
    /// Outer IPv6 source for TUN packets leaving this interface.
    pub src6: [u8; 16],
    /// Low bits of `src4` / `src6` replaced by flow-hash bits (`tun_source_entropy`), 0 = none.
    pub src4_entropy_bits: u8,
    pub src6_entropy_bits: u8,
    pub _pad2: [u8; 2],
}

/// Key of `VIPS`: a VIP address (every service address), for answering ICMP echo.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct VipAddr {
    pub addr: [u8; 16],
    pub family: u8,
    pub _pad: [u8; 3],
}

/// `VIP_FILTER`: a bitmap of [`VIP_FILTER_BITS`] bits (u64 array elements) with the bit of
/// every VIP address set ([`vip_filter_bit`]). A packet whose destination's bit is clear is
/// for no VIP, so it can have no flow and no service: it skips those three hash lookups and
/// goes straight to the NAT-reply check (replies, the host's own traffic). A set bit may be
/// another address's (a collision): such a packet only takes the full way, as without the
/// filter. The controller sets a new VIP's bit before the service exists and clears a bit
/// only after the last service of its VIP is gone.
pub const VIP_FILTER_BITS: u32 = 65_536;
pub const VIP_FILTER_WORDS: u32 = VIP_FILTER_BITS / 64;

/// The `VIP_FILTER` bit of an address (`family`: [`AF_INET`] uses the first 4 bytes, the rest
/// zero, as in [`FlowKey`]).
#[inline(always)]
pub fn vip_filter_bit(addr: &[u8; 16], family: u8) -> u32 {
    let (lo, hi) = addr_halves(addr);
    vip_filter_bit_of_halves(lo, hi, family)
}

/// An address's two 8-byte halves in memory order, as the data plane loads them from a
/// [`FlowKey`] (the input of [`vip_filter_bit_of_halves`] and [`index_slot`]).
#[inline(always)]
pub fn addr_halves(addr: &[u8; 16]) -> (u64, u64) {
    let half = |i: usize| u64::from_ne_bytes(addr[8 * i..8 * i + 8].try_into().expect("8 bytes"));
    (half(0), half(1))
}

/// [`vip_filter_bit`] of an address given as its two 8-byte halves in memory order (the data
/// plane loads them as two aligned words from a [`FlowKey`]).
#[inline(always)]
pub fn vip_filter_bit_of_halves(lo: u64, hi: u64, family: u8) -> u32 {
    // MurmurHash3's 64-bit finaliser: addresses of a prefix differ in a few bits only.
    let mut x = lo ^ hi.rotate_left(29) ^ u64::from(family);
    x = (x ^ (x >> 33)).wrapping_mul(0xff51_afd7_ed55_8ccd);
    x = (x ^ (x >> 33)).wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    ((x ^ (x >> 33)) >> 48) as u32
}

/// Value of `SERVICE_STATS` and `BACKEND_STATS` (per-CPU arrays; userspace sums the CPUs).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct Counters {
    /// Client -> backend packets and bytes (as received).
    pub packets: u64,
    pub bytes: u64,
    pub new_flows: u64,
    /// Backend -> client packets and bytes, where the mode sees them (NAT, full-NAT).
    pub out_packets: u64,
    pub out_bytes: u64,
}

/// Slots of the per-CPU `REASONS` array: what the program did with each packet and why.
/// Every packet increments exactly one slot.
pub mod reason {
    /// Forwarded to a backend in DR mode (`XDP_TX`).
    pub const FWD_DR: u32 = 0;
    /// Not IPv4/IPv6 (ARP, LLDP, ...), or more than one VLAN tag.
    pub const PASS_NOT_IP: u32 = 1;
    /// IP packet whose destination is not a configured service.
    pub const PASS_NON_VIP: u32 = 2;
    /// Truncated or inconsistent header (bad IHL/version/length).
    pub const PASS_MALFORMED: u32 = 3;
    /// IPv4 fragment (first or later): no reliable 5-tuple.
    pub const PASS_FRAGMENT: u32 = 4;
    /// IPv4 header with options (IHL > 5).
    pub const PASS_IP_OPTIONS: u32 = 5;
    /// IPv6 with an extension header before the transport header.
    pub const PASS_IPV6_EXT: u32 = 6;
    /// Transport protocol other than TCP/UDP (ICMP, GRE, ...).
    pub const PASS_NOT_TCP_UDP: u32 = 7;
    /// VIP matched, but the service has no usable backend.
    pub const PASS_NO_BACKEND: u32 = 8;
    /// Packet arrived on an interface the controller did not register.
    pub const PASS_UNKNOWN_IFACE: u32 = 9;
    /// Forwarded, but the flow could not be recorded in the connection table.
    pub const FLOW_INSERT_FAILED: u32 = 10;
    /// Forwarded to a backend in TUN mode (encapsulated; `XDP_TX` or `XDP_REDIRECT`).
    pub const FWD_TUN: u32 = 11;
    /// TUN: no route to the backend (FIB lookup failed).
    pub const PASS_FIB_FAILED: u32 = 12;
    /// TUN: next hop's MAC unknown; the encapsulated packet goes to the kernel, which
    /// resolves the neighbour (and forwards it if forwarding is enabled).
    pub const PASS_NO_NEIGH: u32 = 13;
    /// TUN: encapsulated packet would exceed the egress MTU; ICMP "fragmentation needed" /
    /// "packet too big" sent back to the client.
    pub const ICMP_TOO_BIG_SENT: u32 = 14;
    /// TUN: too big, but IPv4 without DF: XDP cannot fragment, the kernel gets it.
    pub const PASS_TOO_BIG_NO_DF: u32 = 15;
    /// ICMP echo request to a VIP, answered by the director.
    pub const ICMP_ECHO_REPLIED: u32 = 16;
    /// ICMP error about a VIP flow, forwarded to the backend that owns the flow.
    pub const ICMP_ERROR_STEERED: u32 = 17;
    /// TUN: egress interface has no outer source address of the backend's family.
    pub const PASS_NO_TUN_SOURCE: u32 = 18;
    /// A packet-size change (`bpf_xdp_adjust_head`/`_tail`) failed.
    pub const PASS_ADJUST_FAILED: u32 = 19;
    /// NAT / full-NAT: client packet rewritten to the backend and forwarded.
    pub const FWD_NAT: u32 = 20;
    /// NAT / full-NAT: backend reply rewritten back to the VIP and forwarded to the client.
    pub const FWD_NAT_REPLY: u32 = 21;
    /// NAT: TTL / hop limit would expire; the kernel answers (time exceeded).
    pub const PASS_TTL_EXPIRED: u32 = 22;
    /// Full-NAT: no free source port found for a new flow; the kernel gets the packet.
    pub const PASS_SNAT_EXHAUSTED: u32 = 23;
    /// NAT flow ended by FIN in both directions or RST: its entries were removed.
    pub const NAT_FLOW_CLOSED: u32 = 24;
    /// VIP matched, no usable backend (all down or drained) and the service says
    /// `on_all_down: drop`: the packet was dropped.
    pub const DROP_NO_BACKEND: u32 = 25;
    /// Forwarded in DR mode by the ring alone (`ring_fast_path`), without the flow table.
    pub const FWD_DR_RING: u32 = 26;
    /// Forwarded in TUN mode by the ring alone (`ring_fast_path`), without the flow table.
    pub const FWD_TUN_RING: u32 = 27;

    /// Number of slots (size of `REASONS`).
    pub const COUNT: u32 = 28;

    /// Names printed by `xdplb stats` and used as metric labels, indexed by slot.
    pub const NAMES: [&str; COUNT as usize] = [
        "fwd_dr",
        "pass_not_ip",
        "pass_non_vip",
        "pass_malformed",
        "pass_fragment",
        "pass_ip_options",
        "pass_ipv6_ext",
        "pass_not_tcp_udp",
        "pass_no_backend",
        "pass_unknown_iface",
        "flow_insert_failed",
        "fwd_tun",
        "pass_fib_failed",
        "pass_no_neigh",
        "icmp_too_big_sent",
        "pass_too_big_no_df",
        "icmp_echo_replied",
        "icmp_error_steered",
        "pass_no_tun_source",
        "pass_adjust_failed",
        "fwd_nat",
        "fwd_nat_reply",
        "pass_ttl_expired",
        "pass_snat_exhausted",
        "nat_flow_closed",
        "drop_no_backend",
        "fwd_dr_ring",
        "fwd_tun_ring",
    ];
}

/// Slots of the decapsulation program's per-CPU `DECAP_STATS` array (TUN backends).
pub mod decap_reason {
    /// Outer header removed, inner packet handed to the stack.
    pub const DECAPPED: u32 = 0;
    /// Not an IP-in-IP packet (everything else the host receives).
    pub const PASS_NOT_TUNNEL: u32 = 1;
    /// Tunnel packet whose outer destination is not one of our addresses.
    pub const PASS_NOT_LOCAL: u32 = 2;
    /// Tunnel packet whose inner destination is not a listed VIP (`--vip`).
    pub const PASS_NOT_VIP: u32 = 3;
    /// Truncated or inconsistent headers.
    pub const PASS_MALFORMED: u32 = 4;
    /// `bpf_xdp_adjust_head` failed.
    pub const PASS_ADJUST_FAILED: u32 = 5;
    pub const COUNT: u32 = 6;
    pub const NAMES: [&str; COUNT as usize] = [
        "decapped",
        "pass_not_tunnel",
        "pass_not_local",
        "pass_not_vip",
        "pass_malformed",
        "pass_adjust_failed",
    ];
}

/// Key of the decapsulation program's `DECAP_ADDRS` (outer destinations we accept) and
/// `DECAP_VIPS` (inner destinations, when filtered) hash maps.
pub type AddrKey = VipAddr;

/// Stages of an established flow's packet, for the benchmark's stage breakdown: a director
/// loaded with `STOP_AFTER = n` ends such packets with `XDP_TX` after stage `n` (0, every
/// real load: the whole path).
pub mod stage {
    /// Ethernet, IP and transport headers parsed into the flow key.
    pub const PARSE: u8 = 1;
    /// The flow-table lookup (`FLOWS`).
    pub const FLOW_LOOKUP: u8 = 2;
    /// The flow's service by id, checked against the packet (`SERVICE_SLOTS`).
    pub const SERVICE: u8 = 3;
    /// The backend still usable, the flow still live (UDP clock, FIN/RST).
    pub const LIVENESS: u8 = 4;
    /// Forwarded (MACs, encapsulation or NAT), before the counters.
    pub const FORWARD: u8 = 5;
    /// NAT: the reply mapping made sure of (client side) or found, in the flow cache or the
    /// mapping table (reply side).
    pub const NAT_MAPPING: u8 = 6;
    /// NAT: addresses, ports, checksums and TTL rewritten.
    pub const NAT_REWRITE: u8 = 7;
    /// NAT: next hop known, MACs written, the action chosen (before the flow lifecycle and
    /// the counters).
    pub const NAT_ROUTE: u8 = 8;
    /// Not for a VIP (the filter, or the flow and service lookups, said so): where a NAT
    /// reply's own path starts.
    pub const NOT_VIP: u8 = 9;
    /// Ring fast path: the packet's fast-path service found (`SERVICE_INDEX`, checked
    /// against `SERVICE_SLOTS`).
    pub const RING_SERVICE: u8 = 10;
    /// Ring fast path: the slot's hash, dirty bit, backend id and backend checked.
    pub const RING_SLOT: u8 = 11;
    /// TUN: the next hop (cached FIB result) and the egress interface's tunnel source.
    pub const TUN_ROUTE: u8 = 12;
    /// TUN: room made for the outer header (`bpf_xdp_adjust_head`), MACs written.
    pub const TUN_ROOM: u8 = 13;
    /// TUN: the outer header written (before the send).
    pub const TUN_HEADER: u8 = 14;
    /// The highest stage (every cut from 0 to here is a build the benchmark may load).
    pub const LAST: u8 = TUN_HEADER;
    /// The stages of a DR flow hit, for the report.
    pub const DR_HIT: [(u8, &str); 5] = [
        (PARSE, "parse"),
        (FLOW_LOOKUP, "flow-table lookup"),
        (SERVICE, "service check"),
        (LIVENESS, "backend and flow liveness"),
        (FORWARD, "forward (MACs)"),
    ];
    /// The stages of a ring-fast-path hit (a TCP packet on a clean slot).
    pub const RING_HIT: [(u8, &str); 4] = [
        (PARSE, "parse"),
        (
            RING_SERVICE,
            "fast-path service (SERVICE_INDEX, SERVICE_SLOTS)",
        ),
        (RING_SLOT, "ring slot: hash, dirty bit, backend"),
        (FORWARD, "forward (MACs)"),
    ];
    /// The stages of a TUN flow hit (IPIP) after the ones it shares with DR. The cuts before
    /// [`TUN_ROOM`] leave the packet as it came; from there on it has the outer header's room
    /// again, which the benchmark's driver strips before each run.
    pub const TUN_HIT: [(u8, &str); 7] = [
        (PARSE, "parse"),
        (FLOW_LOOKUP, "flow-table lookup"),
        (SERVICE, "service check"),
        (LIVENESS, "backend and flow liveness"),
        (
            TUN_ROUTE,
            "next hop (cached), egress interface and tunnel source",
        ),
        (
            TUN_ROOM,
            "the driver's strip, then room (bpf_xdp_adjust_head) and MACs",
        ),
        (TUN_HEADER, "outer header (IPv4: its checksum)"),
    ];
    /// The stages of a NAT client packet of an established flow.
    pub const NAT_FORWARD: [(u8, &str); 8] = [
        (PARSE, "parse"),
        (FLOW_LOOKUP, "flow-table lookup"),
        (SERVICE, "service check"),
        (LIVENESS, "backend and flow liveness"),
        (
            NAT_MAPPING,
            "reply mapping (NAT_REPLIES) made sure of, when due (its write: after the call)",
        ),
        (NAT_REWRITE, "rewrite (addresses, ports, checksums, TTL)"),
        (NAT_ROUTE, "next hop (cached), MACs, send"),
        (FORWARD, "flow lifecycle (FIN/RST)"),
    ];
    /// The stages of a backend's reply in NAT mode.
    pub const NAT_REPLY: [(u8, &str); 5] = [
        (PARSE, "parse"),
        (NOT_VIP, "flow-cache miss, not a VIP (filter)"),
        (
            NAT_MAPPING,
            "flow cache (half-NAT), else the mapping lookup and lifecycle",
        ),
        (NAT_REWRITE, "rewrite (addresses, ports, checksums, TTL)"),
        (NAT_ROUTE, "next hop (cached), MACs, send"),
    ];
}

/// Map names, shared so userspace never spells them twice.
pub mod maps {
    pub const SERVICES: &str = "SERVICES";
    pub const RINGS: &str = "RINGS";
    pub const BACKENDS: &str = "BACKENDS";
    /// The connection table, both families ([`super::flow_table`]).
    pub const FLOWS: &str = "FLOWS";
    pub const IFACES: &str = "IFACES";
    pub const SERVICE_STATS: &str = "SERVICE_STATS";
    pub const BACKEND_STATS: &str = "BACKEND_STATS";
    pub const REASONS: &str = "REASONS";
    pub const VIPS: &str = "VIPS";
    pub const TX_PORTS: &str = "TX_PORTS";
    /// The NAT reply mappings ([`super::flow_table::ReplySet`]s), both families.
    pub const NAT_REPLIES: &str = "NAT_REPLIES";
    pub const SNAT_POOL: &str = "SNAT_POOL";
    pub const SNAT_CONFIG: &str = "SNAT_CONFIG";
    pub const META: &str = "META";
    pub const PERSIST: &str = "PERSIST";
    pub const BACKEND_ACTIVE: &str = "BACKEND_ACTIVE";
    pub const RR_CURSOR: &str = "RR_CURSOR";
    pub const IFACE_SLOTS: &str = "IFACE_SLOTS";
    pub const SERVICE_SLOTS: &str = "SERVICE_SLOTS";
    pub const VIP_FILTER: &str = "VIP_FILTER";
    pub const SERVICE_INDEX: &str = "SERVICE_INDEX";
    pub const RING_DIRTY: &str = "RING_DIRTY";
    pub const RING_HELD: &str = "RING_HELD";
    /// The per-CPU flow cache (not pinned: each program load starts with an empty one,
    /// sized by `flow_cache_size`).
    pub const FLOW_CACHE: &str = "FLOW_CACHE";
    /// Every map the director pins, in a stable order.
    pub const ALL: [&str; 23] = [
        SERVICES,
        RINGS,
        BACKENDS,
        FLOWS,
        IFACES,
        SERVICE_STATS,
        BACKEND_STATS,
        REASONS,
        VIPS,
        TX_PORTS,
        NAT_REPLIES,
        SNAT_POOL,
        SNAT_CONFIG,
        META,
        PERSIST,
        BACKEND_ACTIVE,
        RR_CURSOR,
        IFACE_SLOTS,
        SERVICE_SLOTS,
        VIP_FILTER,
        SERVICE_INDEX,
        RING_DIRTY,
        RING_HELD,
    ];
}

/// Slots of `META` (an array of u64 the controller writes; the data plane never reads it):
/// what a restarted controller needs to know before it adopts pinned maps.
pub mod meta {
    /// [`super::LAYOUT_VERSION`] of the maps.
    pub const LAYOUT: u32 = 0;
    /// Hash of the running program (object bytes and load-time constants).
    pub const PROGRAM: u32 = 1;
    /// Number of slots.
    pub const COUNT: u32 = 4;
}

/// Version of the maps' meaning. Bump it whenever a map's key or value changes meaning
/// without changing size (a size change is caught by the typed map wrappers anyway): a
/// controller refuses to adopt pinned maps of another layout. History: 2 = reply counters
/// (`Counters::out_*`, `NatReply::{service, backend}`); 3 = schedulers (`ServiceMeta`
/// grew), persistence, active-flow counts; 4 = `IFACE_SLOTS`; 5 = `SERVICE_SLOTS` (flow hits
/// skip the `SERVICES` hash); 6 = `FLOWS` split into `FLOWS4` (16-byte keys) and `FLOWS6`;
/// 7 = `RINGS` packs four u16 slots per element ([`RingEntry`]); 8 = `RING_DIRTY` and
/// `FAST_SERVICES` (the ring fast path); 9 = `RING_HELD` (new connections on clean slots
/// are not recorded); 10 = `NAT_REPLIES` split into `NAT_REPLIES4` (16-byte keys) and
/// `NAT_REPLIES6`; 11 = `NatReply::hop` (a flow's next hop toward its client). Not bumped
/// when `FAST_SERVICES` became `SERVICE_INDEX` with every service in it (twenty-third
/// session): each program reads the other's index right (this one asks `SERVICES` where
/// the index names no service of the packet; the one before checks the ring-fast flag of
/// what the index names), and a renamed map is a new pin, created empty and filled by the
/// adopting controller; so a director of layout 11 is still adopted, its connections kept
/// (the old `FAST_SERVICES` pin stays unused until `xdplb detach` removes the directory).
/// 12 = `FLOWS4` and `FLOWS6` (LRU hashes) replaced by `FLOWS`, one set-associative array
/// for both families ([`flow_table`]), and `NAT_REPLIES4` and `NAT_REPLIES6` by
/// `NAT_REPLIES`, another ([`flow_table::ReplySet`]).
pub const LAYOUT_VERSION: u64 = 12;

/// A pending incremental Internet checksum update (RFC 1624 eq. 3: HC' = ~(~HC + ~m + m'))
/// over words read in memory byte order, as the data plane loads them from the packet: one's
/// complement sums do not care about byte order as long as every word is read the same way,
/// and a 32-bit word counts as its two 16-bit halves (2^16 = 1 modulo 0xffff). Plain
/// arithmetic: the kernel's `bpf_csum_diff` costs a helper call per field.
#[derive(Clone, Copy, Debug, Default)]
pub struct CsumDelta(u64);

impl CsumDelta {
    /// A 32-bit word (at an even offset of the covered data) changed from `old` to `new`.
    #[inline(always)]
    pub fn replace(&mut self, old: u32, new: u32) {
        self.0 += u64::from(!old) + u64::from(new);
    }

    /// A 16-bit word (at an even offset) changed from `old` to `new`.
    #[inline(always)]
    pub fn replace16(&mut self, old: u16, new: u16) {
        self.0 += u64::from(!old) + u64::from(new);
    }

    /// The checksum `check` (its two bytes as they sit in the packet) after the changes.
    #[inline(always)]
    pub fn apply(self, check: [u8; 2]) -> [u8; 2] {
        let s = self.0 + u64::from(!u16::from_ne_bytes(check));
        // Four 16-bit parts (at most 4 × 0xffff), then two folds reach 16 bits.
        let mut s = (s & 0xffff) + ((s >> 16) & 0xffff) + ((s >> 32) & 0xffff) + (s >> 48);
        s = (s & 0xffff) + (s >> 16);
        s = (s & 0xffff) + (s >> 16);
        (!(s as u16)).to_ne_bytes()
    }
}

/// Flow hash used to pick a ring slot on a miss. Deterministic across directors (same
/// 5-tuple -> same slot), so identical rings on several directors pick the same backend.
/// A word-wise multiply-xorshift mix; kept here so tests and tools can compute it too.
/// IPv4 flows are mixed as their [`FlowKey4`] (four words), not all ten of [`FlowKey`] (six
/// of them zero): the mix is a serial chain of multiplies, and the data plane runs it
/// for every new flow and every TUN packet (outer source entropy, IPv6 flow label).
/// (Changed with map layout 6: directors of older versions pick other slots for new flows.)
#[inline(always)]
pub fn flow_hash(key: &FlowKey) -> u32 {
    if key.family == AF_INET {
        hash_words::<4>(bytemuck::cast_ref(&FlowKey4::of(key)))
    } else {
        hash_words::<10>(bytemuck::cast_ref(key))
    }
}

/// [`flow_hash`] over the fields `fields` selects ([`hash`] bits; 0 = all): the others are
/// zeroed first, so e.g. source-only hashing maps every flow of a client to one slot.
#[inline(always)]
pub fn flow_hash_fields(key: &FlowKey, fields: u8) -> u32 {
    if fields == 0 || fields == hash::ALL {
        return flow_hash(key);
    }
    // Masks, not branches: five `if`s made 32 paths for the verifier to walk at every call.
    let mask = |bit: u8| 0u32.wrapping_sub(u32::from(fields & bit != 0));
    let mut k = *key;
    let (src, dst) = (mask(hash::SRC_IP), mask(hash::DST_IP));
    // Words 0-3 are the source address, 4-7 the destination.
    let words: &mut [u32; 10] = bytemuck::cast_mut(&mut k);
    for (i, w) in words.iter_mut().take(8).enumerate() {
        *w &= if i < 4 { src } else { dst };
    }
    k.sport_be &= mask(hash::SRC_PORT) as u16;
    k.dport_be &= mask(hash::DST_PORT) as u16;
    k.proto &= mask(hash::PROTO) as u8;
    flow_hash(&k)
}

/// The per-flow hash a TUN packet's outer header carries (the IPv6 flow label; the
/// source's host bits where entropy is configured). Not a scheduling input, so it need not
/// match [`flow_hash`] on other directors or versions: IPv4 flows hash as there (four
/// words); IPv6 flows fold their ten words to four first (source, destination, ports,
/// protocol and family), four multiply rounds in the serial chain instead of ten, on every
/// IPv6-in-IPv6 packet.
#[inline(always)]
pub fn tunnel_hash(key: &FlowKey) -> u32 {
    if key.family == AF_INET {
        return flow_hash(key);
    }
    let w: &[u32; 10] = bytemuck::cast_ref(key);
    hash_words::<4>(&[
        w[0] ^ w[1] ^ w[2] ^ w[3],
        w[4] ^ w[5] ^ w[6] ^ w[7],
        w[8],
        w[9],
    ])
}

#[inline(always)]
fn hash_words<const N: usize>(words: &[u32; N]) -> u32 {
    let mut h: u32 = 0x9e37_79b9;
    let mut i = 0;
    // Fixed bound so the verifier sees a finite loop (it is unrolled anyway).
    while i < N {
        h ^= words[i];
        h = h.wrapping_mul(0x85eb_ca6b);
        h ^= h >> 13;
        i += 1;
    }
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: every type is repr(C) with explicit padding and derives bytemuck::Pod, which
    // proves there are no padding bytes and every bit pattern is valid.
    unsafe impl aya::Pod for super::VipKey {}
    unsafe impl aya::Pod for super::ServiceMeta {}
    unsafe impl aya::Pod for super::ServiceSlot {}
    unsafe impl aya::Pod for super::RingEntry {}
    const _: () = assert!(core::mem::size_of::<super::ServiceSlot>() == 40);
    unsafe impl aya::Pod for super::FlowKey {}
    unsafe impl aya::Pod for super::FlowKey4 {}
    unsafe impl aya::Pod for super::FlowValue {}
    unsafe impl aya::Pod for super::flow_table::Set {}
    unsafe impl aya::Pod for super::flow_table::ReplySet {}
    unsafe impl aya::Pod for super::Backend {}
    unsafe impl aya::Pod for super::IfaceInfo {}
    const _: () = assert!(core::mem::size_of::<super::IfaceInfo>() == 32);
    unsafe impl aya::Pod for super::Counters {}
    unsafe impl aya::Pod for super::PersistKey {}
    unsafe impl aya::Pod for super::PersistValue {}
    unsafe impl aya::Pod for super::VipAddr {}
    unsafe impl aya::Pod for super::NatReply {}
    unsafe impl aya::Pod for super::SnatAddr {}
    unsafe impl aya::Pod for super::SnatConfig {}
}

#[cfg(test)]
extern crate std;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn udp_flows_end_only_past_the_timeout_plus_the_clock_lag() {
        const S: u64 = 1_000_000_000;
        // Short timeouts: the clock is refreshed every eighth of it.
        assert_eq!(udp_touch_ns(S), S / 8);
        assert_eq!(udp_touch_ns(4 * S), S / 2);
        // Long ones: every second.
        assert_eq!(udp_touch_ns(30 * S), S);
        assert_eq!(udp_touch_ns(3600 * S), S);
        for idle in [S, 2 * S, 30 * S, 3600 * S] {
            // A packet just before the refresh leaves the clock one touch behind it; a next
            // packet a whole timeout later still finds its flow.
            let lag = udp_touch_ns(idle);
            assert!(!udp_expired(idle + lag, idle), "{idle}");
            assert!(udp_expired(idle + lag + 1, idle), "{idle}");
            assert!(
                idle + lag <= idle + idle / 8,
                "ends within 1 1/8 of the timeout"
            );
        }
        assert!(!udp_expired(0, 0) && udp_expired(1, 0));
    }

    #[test]
    fn udp_cache_ticks_end_before_the_table_would_refresh() {
        const S: u64 = 1_000_000_000;
        for hz in [100u32, 250, 300, 1000] {
            let tick = S / u64::from(hz);
            for idle in [0, S / 2, S, 30 * S, 3600 * S] {
                let touch = udp_touch_ns(idle);
                for age in [
                    0,
                    1,
                    touch / 3,
                    touch / 2,
                    touch.saturating_sub(tick),
                    touch,
                ] {
                    let t = udp_cache_ticks(age, idle, hz);
                    // One jiffy of the two clocks' skew on top: still within the touch
                    // (0: no slot).
                    assert!(
                        t == 0 || age + (t + 1) * tick <= touch,
                        "hz {hz} idle {idle} age {age}: {t} ticks"
                    );
                    assert!(t < u64::from(hz), "at most a second");
                }
            }
            // A just refreshed clock under the default timeout: most of the second.
            let fresh = udp_cache_ticks(0, 30 * S, hz);
            assert!(fresh >= u64::from(hz) * 9 / 10 - 1, "hz {hz}: {fresh}");
            assert_eq!(udp_cache_ticks(0, 0, hz), 0, "no timeout: never cached");
        }
        assert!(!udp_expired(u64::MAX, u64::MAX), "no overflow");
    }

    #[test]
    fn vip_filter_bits_spread_and_tell_families_apart() {
        let mut a = [0u8; 16];
        a[..4].copy_from_slice(&[198, 18, 0, 100]);
        let bit = vip_filter_bit(&a, AF_INET);
        assert!(bit < VIP_FILTER_BITS);
        assert_eq!(bit, vip_filter_bit(&a, AF_INET), "deterministic");
        assert_ne!(bit, vip_filter_bit(&a, AF_INET6), "the family counts");
        // A /16 of IPv4 VIPs and a /112 of IPv6 ones: few share a bit.
        // no_std crate: a bitmap stands in for a set.
        let mut seen = [0u64; VIP_FILTER_WORDS as usize];
        let mut distinct = 0;
        let mut insert = |bit: u32| {
            let (w, m) = ((bit / 64) as usize, 1u64 << (bit % 64));
            if seen[w] & m == 0 {
                seen[w] |= m;
                distinct += 1;
            }
        };
        for i in 0..4096u32 {
            let mut v4 = [0u8; 16];
            v4[..4].copy_from_slice(&[198, 18, (i >> 8) as u8, i as u8]);
            insert(vip_filter_bit(&v4, AF_INET));
            let mut v6 = [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
            v6[14..].copy_from_slice(&(i as u16).to_be_bytes());
            insert(vip_filter_bit(&v6, AF_INET6));
        }
        assert!(
            distinct > 7000,
            "{distinct} distinct bits for 8192 addresses"
        );
    }

    /// RFC 1071 checksum of `data` from scratch (big-endian words), as packet bytes.
    fn checksum(data: &[u8]) -> [u8; 2] {
        let mut sum: u32 = data
            .chunks(2)
            .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
            .sum();
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        (!(sum as u16)).to_be_bytes()
    }

    #[test]
    fn csum_delta_matches_a_checksum_from_scratch() {
        // A fixed pseudo-random sequence (xorshift), so failures reproduce.
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for round in 0..20_000 {
            let mut data = [0u8; 40];
            for b in data.iter_mut() {
                *b = next() as u8;
            }
            // Extremes too: all zeros and all ones around the changed words.
            if round % 7 == 0 {
                data = [if round % 2 == 0 { 0 } else { 0xff }; 40];
            }
            let before = checksum(&data);
            let mut delta = CsumDelta::default();
            // Change up to ten 32-bit words and one 16-bit word, read in memory order.
            for _ in 0..(next() % 11) {
                let at = 4 * (next() % 10) as usize;
                let old = u32::from_ne_bytes(data[at..at + 4].try_into().unwrap());
                let new = match next() % 3 {
                    0 => 0,
                    1 => u32::MAX,
                    _ => next() as u32,
                };
                delta.replace(old, new);
                data[at..at + 4].copy_from_slice(&new.to_ne_bytes());
            }
            let at = 2 * (next() % 20) as usize;
            let old = u16::from_ne_bytes([data[at], data[at + 1]]);
            let new = next() as u16;
            delta.replace16(old, new);
            data[at..at + 2].copy_from_slice(&new.to_ne_bytes());
            let after = delta.apply(before);
            // One's complement has two zeros: an update may give 0xffff where a fresh sum
            // gives 0x0000 (RFC 1624 §3 shows eq. 3 avoids it unless the data sums to zero).
            let fresh = checksum(&data);
            assert!(
                after == fresh
                    || (after, fresh) == ([0xff, 0xff], [0, 0])
                    || (after, fresh) == ([0, 0], [0xff, 0xff]),
                "round {round}: {after:02x?} != {fresh:02x?}"
            );
        }
    }

    /// 198.18.2.1:40000 -> 198.18.0.100:80, TCP.
    fn v4_key() -> FlowKey {
        let mut key = FlowKey {
            sport_be: 40000u16.to_be(),
            dport_be: 80u16.to_be(),
            proto: IPPROTO_TCP,
            family: AF_INET,
            ..FlowKey::default()
        };
        key.src[..4].copy_from_slice(&[198, 18, 2, 1]);
        key.dst[..4].copy_from_slice(&[198, 18, 0, 100]);
        key
    }

    /// An IPv6 UDP flow.
    fn v6_key() -> FlowKey {
        FlowKey {
            src: [0x20, 1, 0xd, 0xb8, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12],
            dst: [0x20, 1, 0xd, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x64],
            sport_be: 40000u16.to_be(),
            dport_be: 443u16.to_be(),
            proto: IPPROTO_UDP,
            family: AF_INET6,
            _pad: [0; 2],
        }
    }

    #[test]
    fn flow_table_ways_hold_key_and_value_with_a_check_of_the_value() {
        use flow_table::*;
        for key in [v4_key(), v6_key()] {
            let words: [u64; 5] = bytemuck::cast(key);
            let h = hash(&words);
            assert_ne!(tag(h), 0, "0 marks an empty way");
            assert!(set_of(h, 4) < 16);
            let value = FlowValue {
                backend: 7,
                service: 3,
                ..FlowValue::default()
            };
            let way = way(&key, value);
            assert_eq!(way.key[4] & KEY_BITS, words[4], "the key's own bits");
            assert_eq!(way.key[4] & !KEY_BITS, check(7, 3), "the check above them");
            assert_eq!(way.flow(), Some(key));
            // The hash ignores the check's bits: a stored key hashes as the packet's.
            assert_eq!(hash(&way.key), h);
            // A value from another writer: no flow.
            for (backend, service) in [(8, 3), (7, 4)] {
                let torn = Way {
                    value: FlowValue {
                        backend,
                        service,
                        ..value
                    },
                    ..way
                };
                assert_eq!(torn.flow(), None, "backend {backend}, service {service}");
            }
        }
        assert_eq!(sets_for(1024), 64);
        assert_eq!(sets_for(1000), 64, "rounded up to a power of two");
        assert_eq!(sets_for(1), 1);
        assert_eq!(sets_for(FLOW_TABLE_CAPACITY), FLOW_TABLE_CAPACITY / 16);
    }

    /// A reply mapping's way: the same key words and check as a flow's, two cache lines,
    /// what a half-NAT reply reads (VIP, ports, flags; ids, next hop) in them; the forward
    /// flow comes from the mapping.
    #[test]
    fn reply_ways_hold_their_key_and_check_like_flow_ways() {
        use super::flow_table::*;
        use super::NatReply;
        use core::mem::offset_of;
        let key = FlowKey {
            src: [198, 18, 5, 11, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            dst: [198, 18, 2, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            sport_be: 8080u16.to_be(),
            dport_be: 40000u16.to_be(),
            proto: super::IPPROTO_TCP,
            family: super::AF_INET,
            _pad: [0; 2],
        };
        let value = NatReply {
            backend: 4,
            service: 2,
            ..NatReply::default()
        };
        let way = way(&key, value);
        assert_eq!(way.key[4] & !KEY_BITS, check(4, 2));
        assert_eq!(way.flow(), Some(key));
        let torn = Way {
            value: NatReply {
                backend: 5,
                ..value
            },
            ..way
        };
        assert_eq!(torn.flow(), None, "a value from another writer: no mapping");
        let at = |field: usize| (offset_of!(ReplyWay, value) + field) / 64;
        assert_eq!(at(offset_of!(NatReply, vip)), 0);
        assert_eq!(at(offset_of!(NatReply, flags)), 0);
        assert_eq!(at(offset_of!(NatReply, service)), 1);
        assert_eq!(at(offset_of!(NatReply, hop) + 31), 1);
        assert_eq!(at(offset_of!(NatReply, client) + 15), 1);
        assert_eq!(core::mem::size_of::<ReplyWay>(), 128, "two lines");
        assert_eq!(core::mem::size_of::<ReplySet>(), 64 * 33);
        // The client's flow to the VIP 198.18.0.100:80 that the reply answers.
        let forward = FlowKey {
            src: key.dst,
            dst: [198, 18, 0, 100, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            sport_be: key.dport_be,
            dport_be: 80u16.to_be(),
            ..key
        };
        let mapping = NatReply {
            vip: forward.dst,
            vip_port_be: forward.dport_be,
            client: forward.src,
            client_port_be: forward.sport_be,
            client_family: forward.family,
            ..value
        };
        assert_eq!(
            mapping.flow(key.proto),
            forward,
            "the forward flow, from the mapping"
        );
    }

    /// 65,536 IPv4 clients (sequential addresses and ports, as the benches' drivers make
    /// them) spread over 4,096 sets: no set gets more than twice its share.
    #[test]
    fn flow_table_hash_spreads_sequential_clients_over_the_sets() {
        let mut counts = [0u32; 4096];
        for i in 0..65_536u32 {
            let mut key = v4_key();
            key.src[2..4].copy_from_slice(&(i as u16).to_be_bytes());
            key.sport_be = (40_000 + (i % 7) as u16).to_be();
            let words: [u64; 5] = bytemuck::cast(key);
            counts[flow_table::set_of(flow_table::hash(&words), 12) as usize] += 1;
        }
        let max = *counts.iter().max().unwrap();
        assert!(max <= 32, "fullest set {max} of a mean of 16");
    }

    /// 65,536 IPv6 clients of one subnet numbered in sequence (their addresses' last two
    /// bytes), one source port: their tags tell them apart, so a set's lookup reads only
    /// its own flow's way. (Before the hash's fold they had 2 tags: a multiply moves bits
    /// only upward, and these bits sit at the top of the address's second word.)
    #[test]
    fn flow_table_tags_tell_sequential_ipv6_clients_apart() {
        let mut tags = std::collections::HashSet::new();
        let mut sets = std::collections::HashSet::new();
        for i in 0..65_536u32 {
            let mut key = v4_key();
            key.family = AF_INET6;
            key.src = [0x20, 0x01, 0x0d, 0xb8, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
            key.src[14..16].copy_from_slice(&(i as u16).to_be_bytes());
            let words: [u64; 5] = bytemuck::cast(key);
            let h = flow_table::hash(&words);
            tags.insert(flow_table::tag(h));
            sets.insert(flow_table::set_of(h, 12));
        }
        assert!(tags.len() > 20_000, "{} tags", tags.len());
        assert!(sets.len() > 4_000, "{} of 4096 sets used", sets.len());
    }

    #[test]
    fn vip_keys_of_flows_are_their_destinations() {
        for key in [v4_key(), {
            let mut k = v4_key();
            k.family = AF_INET6;
            k.dst = [
                0x20, 0x01, 0x0d, 0xb8, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,
            ];
            k
        }] {
            for port_be in [key.dport_be, 0] {
                let want = VipKey {
                    addr: key.dst,
                    port_be,
                    proto: key.proto,
                    family: key.family,
                };
                assert_eq!(VipKey::of_flow(&key, port_be), want);
            }
        }
    }

    #[test]
    fn ipv4_flow_keys_round_trip_through_16_bytes() {
        assert_eq!(core::mem::size_of::<FlowKey4>(), 16);
        let key = v4_key();
        let k4 = FlowKey4::of(&key);
        assert_eq!(k4.src, [198, 18, 2, 1]);
        assert_eq!(k4.dst, [198, 18, 0, 100]);
        assert_eq!((k4.sport_be, k4.dport_be), (key.sport_be, key.dport_be));
        assert_eq!((k4.proto, k4._pad), (IPPROTO_TCP, [0; 3]));
        assert_eq!(k4.key(), key);
    }

    #[test]
    fn ring_slots_pack_four_to_an_element() {
        assert_eq!(core::mem::size_of::<RingEntry>(), 8);
        assert_eq!(RING_ENTRIES * RING_SLOTS_PER_ENTRY, RING_SIZE + 3);
        let e = RingEntry::pack(&[7, NO_BACKEND, MAX_BACKENDS - 1, 0]);
        let slots: [u32; 4] = core::array::from_fn(|i| e.slot(i as u32));
        assert_eq!(slots, [7, NO_BACKEND, MAX_BACKENDS - 1, 0]);
        // A slot index picks its place in the element whatever ring position it came from.
        assert_eq!(e.slot(4 * 1000 + 2), MAX_BACKENDS - 1);
        // The ring's last element has one slot (65537 = 4 × 16384 + 1): the rest hold none.
        let last = RingEntry::pack(&[3]);
        assert_eq!(last.slots, [3, RING_NONE, RING_NONE, RING_NONE]);
        assert_eq!(last.slot(1), NO_BACKEND);
        // Ids beyond the backend table can never be stored as real backends.
        assert_eq!(RingEntry::pack(&[MAX_BACKENDS]).slot(0), NO_BACKEND);
    }

    #[test]
    fn ipv4_flows_hash_as_their_four_words() {
        let key = v4_key();
        let k4 = FlowKey4::of(&key);
        assert_eq!(flow_hash(&key), hash_words::<4>(bytemuck::cast_ref(&k4)));
        // Every field still counts.
        let mut other = key;
        other.sport_be ^= 1;
        assert_ne!(flow_hash(&other), flow_hash(&key));
        other = key;
        other.proto = IPPROTO_UDP;
        assert_ne!(flow_hash(&other), flow_hash(&key));
        // Source-only hashing ignores the rest.
        other = key;
        other.dst[3] ^= 1;
        other.dport_be ^= 1;
        assert_eq!(
            flow_hash_fields(&other, hash::SRC_IP),
            flow_hash_fields(&key, hash::SRC_IP)
        );
    }

    #[test]
    fn tunnel_hashes_spread_ipv6_flows_and_keep_ipv4_ones() {
        let key = v4_key();
        assert_eq!(tunnel_hash(&key), flow_hash(&key));
        let mut v6 = v6_key();
        let base = tunnel_hash(&v6);
        // Every field counts.
        for change in 0..5 {
            let mut k = v6;
            match change {
                0 => k.src[15] ^= 1,
                1 => k.dst[0] ^= 1,
                2 => k.sport_be ^= 1,
                3 => k.dport_be ^= 0x100,
                _ => k.proto = IPPROTO_TCP,
            }
            assert_ne!(tunnel_hash(&k), base, "change {change}");
        }
        // 65,536 clients (the low 16 bits of the source, as the bench varies them, and the
        // port) spread evenly over 256 buckets of the 20-bit flow label.
        let mut buckets = [0u32; 256];
        for i in 0..65_536u32 {
            v6.src[14..16].copy_from_slice(&(i as u16).to_be_bytes());
            v6.sport_be = ((i >> 4) as u16 | 1024).to_be();
            buckets[((tunnel_hash(&v6) & 0x000f_ffff) >> 12) as usize] += 1;
        }
        let (min, max) = (buckets.iter().min().unwrap(), buckets.iter().max().unwrap());
        assert!(
            *min > 256 / 2 && *max < 256 * 3 / 2,
            "{min}..{max} of 256 each"
        );
    }

    #[test]
    fn hash_fields_mask_exactly_the_fields_left_out() {
        // The masks must zero what the field list leaves out, and nothing else: the hash of
        // each combination equals the full hash of a key with those fields zeroed by hand.
        for key in [v4_key(), v6_key()] {
            for fields in 1..hash::ALL {
                let mut zeroed = key;
                if fields & hash::SRC_IP == 0 {
                    zeroed.src = [0; 16];
                }
                if fields & hash::DST_IP == 0 {
                    zeroed.dst = [0; 16];
                }
                if fields & hash::SRC_PORT == 0 {
                    zeroed.sport_be = 0;
                }
                if fields & hash::DST_PORT == 0 {
                    zeroed.dport_be = 0;
                }
                if fields & hash::PROTO == 0 {
                    zeroed.proto = 0;
                }
                assert_eq!(
                    flow_hash_fields(&key, fields),
                    flow_hash(&zeroed),
                    "fields {fields:#x}"
                );
            }
        }
    }

    #[test]
    fn flow_cache_slots_give_back_every_id_they_hold() {
        use cache_slot::*;
        for (service, backend, snat) in [
            (0, 0, 0),
            (
                MAX_SERVICES - 1,
                MAX_BACKENDS - 1,
                snat_word(MAX_SNAT_ADDRS as u16 - 1, 0xffff),
            ),
            (5, 1234, snat_word(33, 0x204e)),
            (MAX_SERVICES - 1, 0, 0),
            (0, MAX_BACKENDS - 1, 0),
            (0, 0, snat_word(1, 0)),
        ] {
            let key_word = TUPLE; // every key bit set: none may leak into the ids
            let tuple = cache_slot::tuple(key_word, snat);
            let clock = CLOCK | ids(service, backend, snat) << IDS_SHIFT;
            assert_eq!(tuple & TUPLE, key_word, "the key stays whole");
            assert_eq!(clock & CLOCK, CLOCK, "the clock stays whole");
            let a = answer(tuple, clock);
            assert_ne!(a, u64::MAX);
            assert_eq!(service_backend(a), (service, backend));
            assert_eq!(cache_slot::snat(a), snat);
        }
    }

    #[test]
    fn flow_cache_sets_spread_clients_numbered_in_sequence() {
        // 10k flows in 2^15 two-slot sets, as the end-to-end bench runs them: random keys
        // leave about 1.3 % without a slot (their set holds two others); the one-multiply
        // hash this replaced left 39 % of clients numbered in sequence without one.
        let key = |src: [u8; 4], sport: u16| {
            FlowKey4 {
                src,
                dst: [198, 18, 8, 100],
                sport_be: sport.to_be(),
                dport_be: 80u16.to_be(),
                proto: IPPROTO_TCP,
                _pad: [0; 3],
            }
            .key()
        };
        let unplaced = |keys: &mut dyn Iterator<Item = FlowKey>| {
            let mut sets = std::collections::HashMap::<u32, u32>::new();
            for k in keys {
                *sets
                    .entry(flow_cache_set(&flow_cache_words(&k), 15))
                    .or_default() += 1;
            }
            sets.values().map(|&n| n.saturating_sub(2)).sum::<u32>()
        };
        let clients =
            unplaced(&mut (0..10_000u32).map(|s| key([198, 18, (s >> 8) as u8, s as u8], 1024)));
        let ports = unplaced(&mut (0..10_000u16).map(|p| key([198, 18, 9, 1], 1024 + p)));
        let grid = unplaced(
            &mut (0..10_000u16).map(|i| key([198, 18, 9, (i / 100) as u8], 30_000 + i % 100 * 7)),
        );
        for (what, n) in [("clients", clients), ("ports", ports), ("grid", grid)] {
            assert!(n < 250, "{what}: {n} of 10000 flows without a slot");
        }
        // The words are the key's source and ports word (the destination is not in them).
        let (a, b) = (key([198, 18, 9, 1], 1024), key([198, 18, 9, 2], 1024));
        let (wa, wb) = (flow_cache_words(&a), flow_cache_words(&b));
        assert_ne!(wa[0], wb[0]);
        assert_eq!((wa[1], wa[2]), (wb[1], wb[2]));
        assert_eq!(wa[2] as u16, 1024u16.to_be());
        assert_eq!(
            wa[2] >> 48,
            0,
            "the top 16 bits are padding (the slot keeps its backend there)"
        );
        let mut v6 = a;
        v6.family = AF_INET6;
        v6.src = [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 7];
        assert_ne!(
            flow_cache_words(&v6)[1],
            0,
            "IPv6: both halves of the source"
        );
        // A reply's words: its destination (the client) and the marked ports word, which
        // no packet's own words equal.
        let r = flow_cache_reply_words(&a);
        assert_eq!(r[0], u64::from(u32::from_ne_bytes([198, 18, 8, 100])));
        assert_eq!(r[2], wa[2] | FLOW_CACHE_REPLY);
        assert_ne!(r[2], wa[2]);
        assert_eq!(flow_cache_words(&a)[2] & FLOW_CACHE_REPLY, 0);
        assert_eq!(flow_cache_words(&v6)[2] & FLOW_CACHE_REPLY, 0);
    }

    #[test]
    fn a_half_nat_flows_replies_share_its_flow_cache_set() {
        // Client 198.18.9.1:40000 to the VIP; its backend 198.18.5.11:8080 answers.
        let flow = FlowKey4 {
            src: [198, 18, 9, 1],
            dst: [198, 18, 8, 100],
            sport_be: 40000u16.to_be(),
            dport_be: 80u16.to_be(),
            proto: IPPROTO_TCP,
            _pad: [0; 3],
        }
        .key();
        let reply = |backend: [u8; 4], cport: u16| {
            FlowKey4 {
                src: backend,
                dst: [198, 18, 9, 1],
                sport_be: 8080u16.to_be(),
                dport_be: cport.to_be(),
                proto: IPPROTO_TCP,
                _pad: [0; 3],
            }
            .key()
        };
        let set = |w: &[u64; 3]| flow_cache_set(w, 15);
        let client_set = set(&flow_cache_words(&flow));
        assert_eq!(
            set(&flow_cache_reply_words(&reply([198, 18, 5, 11], 40000))),
            client_set,
            "the reply's slot is in its flow's set"
        );
        assert_ne!(
            set(&flow_cache_reply_words(&reply([198, 18, 5, 11], 40001))),
            client_set,
            "the client's port picks the set"
        );
        // A reply probed as a client flow: the set of the backend's address and port, the
        // same for every client of that backend.
        assert_eq!(
            set(&flow_cache_words(&reply([198, 18, 5, 11], 40000))),
            set(&flow_cache_words(&reply([198, 18, 5, 11], 50000))),
        );
        // The set follows the client's address and port only (with the other fields, the
        // tag words still tell flows apart).
        let mut other_vip = flow;
        other_vip.dst[3] = 101;
        other_vip.dport_be = 443u16.to_be();
        assert_eq!(set(&flow_cache_words(&other_vip)), client_set);
        assert_ne!(flow_cache_words(&other_vip), flow_cache_words(&flow));
    }
}
