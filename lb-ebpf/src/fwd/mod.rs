//! Forwarding, one module per mode, and what they share: our interfaces, the kernel FIB
//! lookup for the next hop, and sending out of the right port.

pub mod dr;
pub mod nat;
pub mod tun;

use aya_ebpf::btf_maps::{
    Array as BtfArray, DevMapHash as BtfDevMapHash, HashMap as BtfHashMap,
    PerCpuArray as BtfPerCpuArray,
};
use aya_ebpf::{
    bindings::{
        bpf_fib_lookup as FibLookup, xdp_action, BPF_FIB_LKUP_RET_FRAG_NEEDED,
        BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS,
    },
    helpers::{bpf_fib_lookup, bpf_jiffies64},
    macros::btf_map,
    programs::XdpContext,
    Global,
};
use lb_common::{
    reason, IfaceInfo, ReplyHop, AF_INET6, IFACE_F_PRESENT, IFACE_SLOTS, MAX_BACKENDS, MAX_IFACES,
};

/// ifindex -> what we know of the interface (its MAC, TUN outer sources), filled by the
/// controller when it attaches.
#[btf_map]
static IFACES: BtfHashMap<u32, IfaceInfo, { MAX_IFACES as usize }> = BtfHashMap::new();

/// Egress ports for `XDP_REDIRECT` when the FIB picks another interface than the ingress
/// one, keyed by ifindex; the controller adds every interface it attaches to.
#[btf_map]
static TX_PORTS: BtfDevMapHash<{ MAX_IFACES as usize }> = BtfDevMapHash::new();

/// Write the frame's Ethernet destination and source: one word and one half-word store
/// each (an array assignment would be a byte-loop `memmove` call, see
/// `lb_ebpf::zeroed_in_place`).
#[inline(always)]
pub fn set_macs(ctx: &XdpContext, dst: [u8; 6], src: [u8; 6]) -> Result<(), u32> {
    let eth = lb_ebpf::ptr_at::<[u8; 12]>(ctx, 0).ok_or(reason::PASS_MALFORMED)? as *mut u8;
    // SAFETY: 12 bytes, bounds-checked.
    unsafe {
        lb_ebpf::store_u32(eth, u32::from_ne_bytes([dst[0], dst[1], dst[2], dst[3]]));
        lb_ebpf::store_u16(eth.add(4), u16::from_ne_bytes([dst[4], dst[5]]));
        lb_ebpf::store_u32(
            eth.add(6),
            u32::from_ne_bytes([src[0], src[1], src[2], src[3]]),
        );
        lb_ebpf::store_u16(eth.add(10), u16::from_ne_bytes([src[4], src[5]]));
    }
    Ok(())
}

#[inline(always)]
pub fn iface(ifindex: u32) -> Option<&'static IfaceInfo> {
    // Fast path: small ifindexes live in an array too (no hash per packet).
    if let Some(i) = IFACE_SLOTS_MAP.get(ifindex) {
        if i.flags & IFACE_F_PRESENT != 0 {
            return Some(i);
        }
    }
    unsafe { IFACES.get(&ifindex) }
}

/// `IFACES` again, as an array indexed by ifindex (< `IFACE_SLOTS`).
#[btf_map(name = "IFACE_SLOTS")]
static IFACE_SLOTS_MAP: BtfArray<IfaceInfo, { IFACE_SLOTS as usize }> = BtfArray::new();

// Address families as the kernel FIB helper wants them (not our AF_INET/AF_INET6 tags).
const FIB_AF_INET: u8 = 2;
const FIB_AF_INET6: u8 = 10;

/// Where the kernel would send a packet.
pub struct NextHop {
    pub ifindex: u32,
    pub smac: [u8; 6],
    pub dmac: [u8; 6],
    /// The route's MTU (the kernel reports it on success too); 0 if unknown.
    pub mtu: u32,
}

/// The kernel's timer ticks per second (`CONFIG_HZ`), set at load time by the controller (a
/// read-only global, see `DEBUG_LOG`). The per-packet freshness checks count in jiffies:
/// `bpf_jiffies64` reads one variable, where `bpf_ktime_get_coarse_ns` walks the
/// timekeeper's seqcount, and that cost a TUN hit ~4 ns (`bench --only stages`).
#[unsafe(no_mangle)]
static JIFFIES_HZ: Global<u32> = Global::new(100);

/// Jiffies now, and the kernel's jiffies per second ([`JIFFIES_HZ`]).
#[inline(always)]
pub fn jiffies() -> (u64, u32) {
    (unsafe { bpf_jiffies64() }, JIFFIES_HZ.load())
}

/// A backend's next hop as the FIB last answered it on this CPU (see [`route_to_backend`]).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct CachedHop {
    /// `bpf_jiffies64` after which the entry is stale: a second ([`JIFFIES_HZ`] jiffies)
    /// after the FIB answered, so route, neighbour and MTU changes reach a backend's packets
    /// within that time.
    pub expires_j: u64,
    /// The destination and ingress interface the answer was for.
    pub addr: [u8; 16],
    pub ingress: u32,
    pub ifindex: u32,
    pub mtu: u32,
    pub smac: [u8; 6],
    pub dmac: [u8; 6],
    pub family: u8,
    pub _pad: [u8; 3],
}

/// Slots of [`NEXT_HOPS`] for NAT replies' routes to clients, after the backends' ones; a
/// client address picks one by the top bits of a hash (a collision only means another FIB
/// lookup). 4,096 (229 KB per CPU): with 1,024, a thousand clients' replies collided often
/// enough to cost 23 ns each on average (NAT reply at 1k flows 126-128 -> 103-104 ns,
/// alternating quick runs). 131,072 were tried in the twenty-first session and read slower
/// at 100k flows, but that try likely kept the then 10-bit index (`(h >> 22) % slots`), so
/// it used 1,024 of them: not a result either way.
const CLIENT_HOP_BITS: u32 = 12;
const CLIENT_HOP_SLOTS: u32 = 1 << CLIENT_HOP_BITS;

/// Per CPU: the FIB's last answer toward each backend (by id) and toward recently seen
/// clients (NAT replies; slots after the backends'), so most TUN and NAT packets skip
/// `bpf_fib_lookup` (the largest cost of those paths). Not pinned: a program replacement
/// starts with an empty cache.
#[btf_map]
static NEXT_HOPS: BtfPerCpuArray<CachedHop, { (MAX_BACKENDS + CLIENT_HOP_SLOTS) as usize }> =
    BtfPerCpuArray::new();

/// Big-endian word `i` of an address (host-order value), 0 past its end: one 4-byte load
/// (assembled from bytes, each word cost 4 loads, 6 shifts and ors, and spilled registers
/// in the TUN header). `a` must be 4-aligned where it is on the stack (the verifier rejects
/// misaligned stack access): addresses in our `repr(C)` structs and map values are.
#[inline(always)]
pub fn word<const N: usize>(a: &[u8; N], i: usize) -> u32 {
    if 4 * i + 4 > N {
        return 0;
    }
    // SAFETY: 4 bytes of `a` (checked above).
    u32::from_be(unsafe { lb_ebpf::load_u32(a.as_ptr().add(4 * i)) })
}

/// The interface the packet came in on. Each read is three dependent loads (the verifier
/// expands the context field to `rxq->dev->ifindex`), so a path reads it once and passes
/// it on ([`route_to_backend`], [`send`]).
#[inline(always)]
pub fn ingress(ctx: &XdpContext) -> u32 {
    ctx.ingress_ifindex() as u32
}

/// [`route`] toward backend `id` (at `dst`), from the cache (see [`route_cached`]);
/// `ingress` is [`ingress`].
#[inline(always)]
pub fn route_to_backend(
    ctx: &XdpContext,
    ingress: u32,
    id: u32,
    family: u8,
    dst: &[u8; 16],
    tot_len: usize,
) -> Result<Route, u32> {
    Ok(route_cached(ctx, ingress, id, family, dst, tot_len)?.0)
}

/// [`route`] toward a client (a NAT reply's destination), from the cache slot its address
/// hashes to (see [`route_cached`]).
#[inline(always)]
pub fn route_to_client(
    ctx: &XdpContext,
    ingress: u32,
    family: u8,
    dst: &[u8; 16],
    tot_len: usize,
) -> Result<Route, u32> {
    Ok(route_to_client_until(ctx, ingress, family, (dst, client_tag(dst)), tot_len)?.0)
}

/// [`route_to_client`] for `dst` and its [`client_tag`], and until which jiffy its answer
/// holds ([`route_cached`]).
#[inline(always)]
fn route_to_client_until(
    ctx: &XdpContext,
    ingress: u32,
    family: u8,
    (dst, tag): (&[u8; 16], u32),
    tot_len: usize,
) -> Result<(Route, u64), u32> {
    let h = tag.wrapping_mul(0x9e37_79b9);
    let slot = MAX_BACKENDS + (h >> (32 - CLIENT_HOP_BITS));
    route_cached(ctx, ingress, slot, family, dst, tot_len)
}

/// [`route`] to `dst`, answered from [`NEXT_HOPS`] slot `slot` while fresh, for the same
/// destination, ingress interface and a packet within the cached MTU. Only complete answers
/// are cached: a missing neighbour, a too-big packet or a failure asks the FIB every time.
/// With the answer, the jiffy until which it holds (0: not cached).
#[inline(always)]
fn route_cached(
    ctx: &XdpContext,
    ingress: u32,
    slot: u32,
    family: u8,
    dst: &[u8; 16],
    tot_len: usize,
) -> Result<(Route, u64), u32> {
    let Some(c) = NEXT_HOPS.get_ptr_mut(slot) else {
        return Ok((route(ctx, ingress, family, dst, tot_len)?, 0));
    };
    let c = unsafe { &mut *c };
    if fresh(c, ingress, family, dst, tot_len) {
        return Ok((
            Route::Via(NextHop {
                ifindex: c.ifindex,
                smac: c.smac,
                dmac: c.dmac,
                mtu: c.mtu,
            }),
            c.expires_j,
        ));
    }
    let (now, hz) = jiffies();
    let r = route(ctx, ingress, family, dst, tot_len)?;
    let mut until = 0;
    if let Route::Via(hop) = &r {
        if hop.mtu != 0 {
            until = now + u64::from(hz);
            c.expires_j = until;
            lb_ebpf::copy16(&mut c.addr, dst);
            c.ingress = ingress;
            c.ifindex = hop.ifindex;
            c.mtu = hop.mtu;
            c.smac = hop.smac;
            c.dmac = hop.dmac;
            c.family = family;
        }
    }
    Ok((r, until))
}

/// [`route`] toward a NAT flow's client with the answer the flow keeps in its reply mapping
/// (`hop`, its client's address implied) while it holds: until its jiffy, for the same
/// ingress interface and a packet within its MTU; else [`route_to_client`], whose answer
/// (the client slot's, or the FIB's) it then keeps until that answer's own jiffy, so a
/// route change reaches the flow within a second either way. For replies that missed the
/// flow cache: they looked the mapping up anyway, and the client slots of [`NEXT_HOPS`]
/// answer only while clients are few. A reply flow's packets come in on one receive queue,
/// so one CPU writes it (two writing at once during a route change could mix their answers
/// for a packet).
#[inline(always)]
pub fn route_in_mapping(
    ctx: &XdpContext,
    ingress: u32,
    family: u8,
    dst: &[u8; 16],
    tot_len: usize,
    hop: &mut ReplyHop,
) -> Result<Route, u32> {
    let now = jiffies().0 as u32;
    let tag = client_tag(dst);
    // Wrapping: fresh while the expiry is ahead, by at most 2^31 jiffies.
    if (hop.expires_j.wrapping_sub(now) as i32) > 0
        && hop.ingress == ingress
        && tot_len as u32 <= hop.mtu
        && hop.client_tag == tag
    {
        return Ok(Route::Via(NextHop {
            ifindex: hop.ifindex,
            smac: hop.smac,
            dmac: hop.dmac,
            mtu: hop.mtu,
        }));
    }
    let (r, expires_j) = route_to_client_until(ctx, ingress, family, (dst, tag), tot_len)?;
    if let Route::Via(h) = &r {
        if expires_j != 0 {
            hop.expires_j = expires_j as u32;
            hop.ingress = ingress;
            hop.ifindex = h.ifindex;
            hop.mtu = h.mtu;
            hop.smac = h.smac;
            hop.dmac = h.dmac;
            hop.client_tag = tag;
        }
    }
    Ok(r)
}

/// A client address's big-endian words xor-ed: [`ReplyHop::client_tag`], and before a
/// multiply the hash that picks its client slot of [`NEXT_HOPS`].
#[inline(always)]
fn client_tag(dst: &[u8; 16]) -> u32 {
    word(dst, 0) ^ word(dst, 1) ^ word(dst, 2) ^ word(dst, 3)
}

/// Backend `id`'s next hop if [`NEXT_HOPS`] has it (see [`route_cached`]), without asking
/// the FIB: the TUN fast path, inline in the director. The entry itself, not a copy: a
/// pointer is one register to keep across the helper calls that follow.
#[inline(always)]
pub fn cached_route_to_backend(
    ingress: u32,
    id: u32,
    family: u8,
    dst: &[u8; 16],
    tot_len: usize,
) -> Option<&'static CachedHop> {
    let c = unsafe { &*NEXT_HOPS.get_ptr_mut(id)? };
    fresh(c, ingress, family, dst, tot_len).then_some(c)
}

/// Whether `c` answers for this destination, ingress interface and a packet of `tot_len`
/// IP bytes: fresh, and the packet within its MTU.
#[inline(always)]
fn fresh(c: &CachedHop, ingress: u32, family: u8, dst: &[u8; 16], tot_len: usize) -> bool {
    c.expires_j > jiffies().0
        && c.ingress == ingress
        && c.family == family
        && tot_len as u32 <= c.mtu
        && lb_ebpf::eq16(&c.addr, dst)
}

pub enum Route {
    Via(NextHop),
    /// Route known, next hop's MAC not (yet): the kernel must resolve it.
    NoNeigh(NextHop),
    /// A packet of the given size would exceed this path MTU.
    TooBig(u32),
}

/// The FIB helper's 64-byte parameter block, off the frames of the paths that ask (the BPF
/// stack is 512 bytes for the whole call chain; on the NAT functions' frames it took 64).
/// Per CPU: a program run has its CPU to itself.
#[btf_map]
static FIB_SCRATCH: BtfPerCpuArray<FibLookup, 1> = BtfPerCpuArray::new();

/// FIB lookup for `dst` (our `family` tag) from the `ingress` interface, checking `tot_len`
/// (IP bytes) against the MTU. No route, blackhole, forwarding disabled: `PASS_FIB_FAILED`.
#[inline(always)]
pub fn route(
    ctx: &XdpContext,
    ingress: u32,
    family: u8,
    dst: &[u8; 16],
    tot_len: usize,
) -> Result<Route, u32> {
    let fib = FIB_SCRATCH.get_ptr_mut(0).ok_or(reason::PASS_FIB_FAILED)?
        as *mut core::mem::MaybeUninit<FibLookup>;
    // SAFETY: this CPU's scratch value; the kernel's parameter struct is plain data (64
    // bytes, 4-aligned).
    let fib = unsafe { lb_ebpf::zeroed_in_place(&mut *fib) };
    fib.ifindex = ingress;
    fib.__bindgen_anon_1.tot_len = tot_len as u16;
    // The address in words (a copy of the array here was a call of bpf-linker's byte-loop
    // `memmove`, 16 iterations, on every IPv6 lookup).
    if family == AF_INET6 {
        fib.family = FIB_AF_INET6;
        // SAFETY: the union's IPv6 view, 16 bytes, 4-aligned in the scratch value.
        let dst6 = unsafe { &mut *(&raw mut fib.__bindgen_anon_4.ipv6_dst as *mut [u8; 16]) };
        lb_ebpf::copy16(dst6, dst);
    } else {
        fib.family = FIB_AF_INET;
        // SAFETY: the first 4 of `dst`'s 16 bytes (4-aligned in every caller's struct).
        fib.__bindgen_anon_4.ipv4_dst = unsafe { lb_ebpf::load_u32(dst.as_ptr()) };
    }
    let rc = unsafe {
        bpf_fib_lookup(
            ctx.ctx as *mut _,
            fib,
            core::mem::size_of::<FibLookup>() as i32,
            0,
        )
    } as u32;
    let hop = NextHop {
        ifindex: fib.ifindex,
        smac: fib.smac,
        dmac: fib.dmac,
        // On success the kernel stores the route's MTU where `tot_len` was.
        mtu: if rc == BPF_FIB_LKUP_RET_SUCCESS {
            u32::from(unsafe { fib.__bindgen_anon_1.mtu_result })
        } else {
            0
        },
    };
    match rc {
        BPF_FIB_LKUP_RET_SUCCESS => Ok(Route::Via(hop)),
        BPF_FIB_LKUP_RET_NO_NEIGH => Ok(Route::NoNeigh(hop)),
        BPF_FIB_LKUP_RET_FRAG_NEEDED => Ok(Route::TooBig(
            unsafe { fib.__bindgen_anon_1.mtu_result } as u32,
        )),
        _ => Err(reason::PASS_FIB_FAILED),
    }
}

/// Out of `ifindex`: back where it came from (`ingress`: `XDP_TX`) or through the devmap.
#[inline(always)]
pub fn send(ingress: u32, ifindex: u32) -> Result<u32, u32> {
    if ifindex == ingress {
        return Ok(xdp_action::XDP_TX);
    }
    // Flags: on a missing port the helper returns XDP_PASS (the controller adds every port).
    TX_PORTS
        .redirect(ifindex, xdp_action::XDP_PASS as u64)
        .map_err(|_| reason::PASS_UNKNOWN_IFACE)
}
