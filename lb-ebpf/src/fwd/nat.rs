//! NAT (LVS NAT, "half NAT") and full-NAT. The client's packet gets the backend's address and
//! port as destination (full-NAT: also a director address and port from the pool as
//! source); the backend's reply comes back through the director and is matched in
//! `NAT_REPLIES` (`flow::xdplb_reply_find`), which restores the VIP (and, full-NAT, the client); a
//! half-NAT reply the mapping answered is answered from the flow cache for up to a second
//! after (`flow::reply_cache_fill`). Checksums are updated
//! incrementally (RFC 1624); TTL / hop limit drops by one as in any router. TCP FIN in both
//! directions (then the last ACK) or RST ends the flow and its NAT state.

use aya_ebpf::bindings::{xdp_action, xdp_md};
use aya_ebpf::btf_maps::{Array as BtfArray, PerCpuArray as BtfPerCpuArray};
use aya_ebpf::{macros::btf_map, programs::XdpContext};
use lb_common::{
    flow_hash, flow_table::ReplyWay, reason, stage, Backend, FlowKey, FlowValue, NatReply,
    ReplyHop, SnatAddr, SnatConfig, AF_INET, FLOW_F_FIN_BACKEND, FLOW_F_FIN_CLIENT, FLOW_F_SNAT,
    IPPROTO_TCP, IPPROTO_UDP, MAX_SNAT_ADDRS, NAT_REPLY_F_FIN_BACKEND,
};
use lb_ebpf::{frame_len, ptr_at, STATUS_OK};
use network_types::ip::{Ipv4Hdr, Ipv6Hdr};

use crate::{
    csum,
    flow::{self, Choice},
    fwd::{ingress, route_in_mapping, route_to_backend, route_to_client, send, set_macs, Route},
    parse::Parsed,
};

/// `how` word of the NAT forward path: bit 0 full-NAT, bit 1 new flow, bit 2 answered by
/// the flow cache ([`HOW_CACHED`]), the backend id above.
const HOW_ID_SHIFT: u32 = 8;

/// The flow cache answered ([`Choice::cached`]): no entry, no FIN in it, and the reply
/// mapping is not due (the slot lasts until it is, see `flow::cache_fill`); a full-NAT
/// flow's source comes with the answer ([`Choice::snat`]).
const HOW_CACHED: u32 = 4;

/// Where a client packet builds the reply mapping it writes, and the key it writes it
/// under: off the NAT call's frame, which shares the 512-byte BPF stack with the
/// director's (see [`xdplb_nat_forward`]). [`xdplb_nat_forward`] leaves the write to its
/// caller ([`xdplb_reply_put`]: the table's loops inline there would cost the verifier a
/// walk of the rest of the NAT path per way, and a call there does not fit the stack). Per
/// CPU: a program run has its CPU to itself.
#[btf_map]
static NAT_REPLY_SCRATCH: BtfPerCpuArray<ReplyWay, 1> = BtfPerCpuArray::new();

/// Write or drop the reply mapping [`xdplb_nat_forward`] left in [`NAT_REPLY_SCRATCH`]
/// (`op`: `flow::REPLY_OPS`). Global: its loops over the set's ways are walked once.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn xdplb_reply_put(op: u32) -> u32 {
    let Some(way) = NAT_REPLY_SCRATCH.get_ptr(0) else {
        return 0;
    };
    // SAFETY: this CPU's scratch value.
    flow::reply_put(unsafe { &*way }, op)
}

/// Full-NAT source addresses (IPv4 first, then IPv6; see `SnatConfig`).
#[btf_map]
static SNAT_POOL: BtfArray<SnatAddr, { MAX_SNAT_ADDRS as usize }> = BtfArray::new();

#[btf_map]
static SNAT_CONFIG: BtfArray<SnatConfig, 1> = BtfArray::new();

/// Candidate source ports tried for a new full-NAT flow before giving up.
const SNAT_TRIES: u32 = 8;

const TCP_FIN: u8 = 0x01;
const TCP_RST: u8 = 0x04;

/// Where the transport checksum sits (TCP 16, UDP 6).
#[inline(always)]
fn l4_check_at(proto: u8) -> usize {
    if proto == IPPROTO_TCP {
        16
    } else {
        6
    }
}

#[inline(always)]
fn tcp_flags(ctx: &XdpContext, pkt: &Parsed) -> u8 {
    if pkt.key.proto != IPPROTO_TCP {
        return 0;
    }
    ptr_at::<u8>(ctx, pkt.l4() + 13)
        .map(|f| unsafe { *f })
        .unwrap_or(0)
}

/// New source and/or destination for [`rewrite`] (`set`: 1 = source, 2 = destination;
/// above, the `flow::REPLY_OPS` its caller is left). 8-aligned: its addresses are read in
/// 8-byte words (the next hop's client check), and the verifier takes no misaligned stack
/// access (at 4-byte alignment the frame's layout decided, and once it fell on -28).
#[repr(C, align(8))]
struct Rewrite {
    src: [u8; 16],
    dst: [u8; 16],
    sport_be: u16,
    dport_be: u16,
    set: u32,
}

const SET_SRC: u32 = 1;
const SET_DST: u32 = 2;

/// Inline: an out-of-line function taking the XDP context let LLVM merge the `data` and
/// `data_end` loads into one 64-bit load, which the verifier rejects.
#[inline(always)]
fn rewrite_out(ctx: &XdpContext, pkt: &Parsed, rw: &Rewrite) -> u32 {
    let src = if rw.set & SET_SRC != 0 {
        Some((&rw.src, rw.sport_be))
    } else {
        None
    };
    let dst = if rw.set & SET_DST != 0 {
        Some((&rw.dst, rw.dport_be))
    } else {
        None
    };
    match rewrite(ctx, pkt, src, dst) {
        Ok(()) => STATUS_OK,
        Err(slot) => slot,
    }
}

/// Rewrite addresses/ports of the packet in place (`None` = keep), fixing the IPv4 header
/// checksum, the transport checksum (pseudo-header included) and decrementing the TTL.
/// Every field is loaded and stored as words (see `lb_ebpf::load_u32`); the new addresses
/// come from a 4-aligned [`Rewrite`] on the stack.
#[inline(always)]
fn rewrite(
    ctx: &XdpContext,
    pkt: &Parsed,
    src: Option<(&[u8; 16], u16)>,
    dst: Option<(&[u8; 16], u16)>,
) -> Result<(), u32> {
    use lb_ebpf::{load_u32, store_u32};
    let check_at = pkt.l4() + l4_check_at(pkt.key.proto);
    let l4check: *mut [u8; 2] = ptr_at(ctx, check_at).ok_or(reason::PASS_MALFORMED)?;
    let ports: *mut [u8; 4] = ptr_at(ctx, pkt.l4()).ok_or(reason::PASS_MALFORMED)?;
    // UDP over IPv4 may carry no checksum (0); it then stays 0.
    let udp_no_check = pkt.key.proto == IPPROTO_UDP && unsafe { *l4check } == [0, 0];
    let mut l4 = csum::Delta::default();
    // SAFETY (loads and stores below): bounds-checked packet fields, and 4-aligned words of
    // the caller's `Rewrite`.
    let old_ports = unsafe { load_u32(ports as *const u8) };
    // Memory order: the source port is the low half of the word, the destination the high.
    let mut new_ports = old_ports;
    if let Some((_, port)) = src {
        new_ports = (new_ports & 0xffff_0000) | u32::from(port);
    }
    if let Some((_, port)) = dst {
        new_ports = (new_ports & 0xffff) | (u32::from(port) << 16);
    }
    if pkt.key.family == AF_INET {
        let ip: *mut Ipv4Hdr = ptr_at(ctx, pkt.l3()).ok_or(reason::PASS_MALFORMED)?;
        let ip = unsafe { &mut *ip };
        if ip.ttl <= 1 {
            return Err(reason::PASS_TTL_EXPIRED);
        }
        let mut l3 = csum::Delta::default();
        l3.replace16(
            u16::from_ne_bytes([ip.ttl, ip.proto]),
            u16::from_ne_bytes([ip.ttl - 1, ip.proto]),
        );
        ip.ttl -= 1;
        for (field, new) in [
            (ip.src_addr.as_mut_ptr(), src),
            (ip.dst_addr.as_mut_ptr(), dst),
        ] {
            if let Some((a, _)) = new {
                let (old, new) = unsafe { (load_u32(field), load_u32(a.as_ptr())) };
                l3.replace(old, new);
                l4.replace(old, new);
                unsafe { store_u32(field, new) };
            }
        }
        ip.check = l3.apply(ip.check);
    } else {
        let ip: *mut Ipv6Hdr = ptr_at(ctx, pkt.l3()).ok_or(reason::PASS_MALFORMED)?;
        let ip = unsafe { &mut *ip };
        if ip.hop_limit <= 1 {
            return Err(reason::PASS_TTL_EXPIRED);
        }
        ip.hop_limit -= 1;
        for (field, new) in [
            (ip.src_addr.as_mut_ptr(), src),
            (ip.dst_addr.as_mut_ptr(), dst),
        ] {
            if let Some((a, _)) = new {
                for i in 0..4 {
                    let (old, new) =
                        unsafe { (load_u32(field.add(4 * i)), load_u32(a.as_ptr().add(4 * i))) };
                    l4.replace(old, new);
                    unsafe { store_u32(field.add(4 * i), new) };
                }
            }
        }
    }
    l4.replace(old_ports, new_ports);
    let mut check = l4.apply(unsafe { *l4check });
    if pkt.key.proto == IPPROTO_UDP {
        if udp_no_check {
            check = [0, 0];
        } else if check == [0, 0] {
            // A computed 0 is sent as all ones (RFC 768).
            check = [0xff, 0xff];
        }
    }
    unsafe {
        store_u32(ports as *mut u8, new_ports);
        *l4check = check;
    }
    Ok(())
}

/// [`route_and_send`] with a plain status (see `STATUS_OK`); inline like [`rewrite_out`].
#[inline(always)]
fn route_and_send_out(
    ctx: &XdpContext,
    family: u32,
    dst: &[u8; 16],
    (backend_id, hop): (u32, *mut ReplyHop),
    out: &mut u32,
) -> u32 {
    let ip_len = frame_len(ctx) - crate::parse::l3_offset(ctx);
    match route_and_send(ctx, family as u8, dst, (backend_id, hop), ip_len) {
        Ok(action) => {
            *out = action;
            STATUS_OK
        }
        Err(slot) => slot,
    }
}

#[inline(always)]
fn step(status: u32) -> Result<(), u32> {
    if status == STATUS_OK {
        Ok(())
    } else {
        Err(status)
    }
}

/// Not a backend: a reply, routed to the client.
const TO_CLIENT: u32 = u32::MAX;

/// Route toward the packet's (new) destination — backend `backend_id` or a client
/// ([`TO_CLIENT`]), next hops cached per CPU either way, and for a client also in its flow's
/// reply mapping where the reply looked it up (`hop`, else null) — set the MACs, send.
#[inline(always)]
fn route_and_send(
    ctx: &XdpContext,
    family: u8,
    dst: &[u8; 16],
    (backend_id, hop): (u32, *mut ReplyHop),
    ip_len: usize,
) -> Result<u32, u32> {
    let ingress = ingress(ctx);
    let found = if !hop.is_null() {
        // SAFETY: the reply mapping's field, from `mapped` (a live map value).
        route_in_mapping(ctx, ingress, family, dst, ip_len, unsafe { &mut *hop })?
    } else if backend_id == TO_CLIENT {
        route_to_client(ctx, ingress, family, dst, ip_len)?
    } else {
        route_to_backend(ctx, ingress, backend_id, family, dst, ip_len)?
    };
    let hop = match found {
        Route::Via(hop) => hop,
        // The rewritten packet goes to the kernel, which resolves the neighbour and forwards.
        Route::NoNeigh(_) => return Err(reason::PASS_NO_NEIGH),
        // Larger than the egress MTU: the kernel fragments or answers "too big".
        Route::TooBig(_) => return Err(reason::PASS_TOO_BIG_NO_DF),
    };
    set_macs(ctx, hop.dmac, hop.smac)?;
    send(ingress, hop.ifindex)
}

/// The full-NAT source of a flow: kept in the flow entry (`entry`, may be null) once
/// chosen, and in its flow-cache slot (`cached`: the slot answered; `snat` then holds it, as
/// `Choice::snat` has it); for a new flow an address of the backend's family from the pool
/// (by flow hash) and a port not used by another flow toward the same backend port. The
/// address goes to `src` (4-aligned: copied as words), the port is returned.
#[inline(always)]
fn snat_source(
    key: &FlowKey,
    entry: *mut FlowValue,
    (cached, snat): (bool, u32),
    backend: &Backend,
    dport_be: u16,
    src: &mut [u8; 16],
) -> Result<u16, u32> {
    let cfg = SNAT_CONFIG.get(0).ok_or(reason::PASS_SNAT_EXHAUSTED)?;
    let (base, count) = if backend.family == AF_INET {
        (0, cfg.v4_count)
    } else {
        (cfg.v4_count, cfg.v6_count)
    };
    if count == 0 || cfg.port_max < cfg.port_min {
        return Err(reason::PASS_SNAT_EXHAUSTED);
    }
    let chosen = if cached {
        Some(lb_common::cache_slot::snat_parts(snat))
    } else if entry.is_null() {
        return Err(reason::PASS_SNAT_EXHAUSTED);
    } else {
        // SAFETY: the flow's live table entry.
        let e = unsafe { &*entry };
        (e.flags & FLOW_F_SNAT != 0).then_some((u32::from(e.snat_addr), e.snat_port_be))
    };
    if let Some((index, port_be)) = chosen {
        let addr = SNAT_POOL.get(index).ok_or(reason::PASS_SNAT_EXHAUSTED)?;
        lb_ebpf::copy16(src, &addr.addr);
        return Ok(port_be);
    }
    let e = unsafe { &mut *entry };
    let hash = flow_hash(key);
    // checked_rem: a plain `%` by a runtime value carries a panic path the verifier rejects.
    let slot = base + hash.checked_rem(count).unwrap_or(0);
    let addr = &SNAT_POOL.get(slot).ok_or(reason::PASS_SNAT_EXHAUSTED)?.addr;
    let range = cfg.port_max - cfg.port_min + 1;
    // The reply key's last word (its ports, protocol and family, as `FlowKey` lays them
    // out) but for the candidate port, which goes in bits 16..32.
    let ports = u64::from(dport_be) | u64::from(key.proto) << 32 | u64::from(backend.family) << 40;
    let mut i = 0;
    while i < SNAT_TRIES {
        // Spread by the flow hash, step by a prime so the tries differ.
        let port = cfg.port_min
            + hash
                .wrapping_add(i.wrapping_mul(40503))
                .checked_rem(range)
                .unwrap_or(0);
        let port_be = (port as u16).to_be();
        if !flow::reply_may_hold(&backend.addr, addr, ports | u64::from(port_be) << 16) {
            e.snat_addr = slot as u16;
            e.snat_port_be = port_be;
            e.flags |= FLOW_F_SNAT;
            lb_ebpf::copy16(src, addr);
            return Ok(port_be);
        }
        i += 1;
    }
    Err(reason::PASS_SNAT_EXHAUSTED)
}

/// Marks the action [`xdplb_nat_forward`] returns when the packet ended a half-NAT flow: its
/// caller empties the reply's flow-cache slot on every CPU ([`after_forward`]). There, not
/// in the NAT path: that path's frame leaves no stack for one more call.
const CLOSED_HALF_NAT: u32 = 1 << 8;

/// What [`xdplb_nat_forward`] leaves to its caller (`out`: its answer, the XDP action with
/// these marks; the action returned): the reply mapping's write or removal
/// ([`xdplb_reply_put`]), and, where the packet ended a half-NAT flow, emptying on every
/// CPU the flow-cache slot of its replies, keyed by the reply key the close left in the
/// scratch way (with [`flow::REPLY_REMOVE`]). Out of line: off the director's frame.
#[inline(never)]
fn after_forward(out: u32) -> u32 {
    if out & flow::REPLY_OPS != 0 {
        xdplb_reply_put(out & flow::REPLY_OPS);
    }
    if out & CLOSED_HALF_NAT != 0 {
        if let Some(scratch) = NAT_REPLY_SCRATCH.get_ptr(0) {
            // SAFETY: this CPU's scratch value; five 8-aligned words hold a `FlowKey`.
            flow::cache_forget::<true>(unsafe { &*((*scratch).key.as_ptr() as *const FlowKey) });
        }
    }
    out & !(CLOSED_HALF_NAT | flow::REPLY_OPS)
}

/// The port a NAT flow reaches `backend` on: its own, or the client's destination port.
#[inline(always)]
fn backend_port(backend: &Backend, key: &FlowKey) -> u16 {
    if backend.port_be != 0 {
        backend.port_be
    } else {
        key.dport_be
    }
}

/// Client -> VIP packet of an established or new flow to backend `choice.id`.
#[inline(always)]
pub fn forward(ctx: &XdpContext, pkt: &Parsed, choice: &Choice, fullnat: bool) -> Result<u32, u32> {
    // In: a cached full-NAT flow's source (`Choice::snat`; a sixth argument a BPF call
    // cannot take). Out: the XDP action.
    let mut out = choice.snat;
    // Five arguments at most for a BPF call: flags and backend id share a word.
    match xdplb_nat_forward(
        ctx.ctx,
        pkt,
        choice.entry,
        u32::from(fullnat)
            | (u32::from(choice.new) << 1)
            | if choice.cached { HOW_CACHED } else { 0 }
            | (choice.id << HOW_ID_SHIFT),
        &mut out,
    ) {
        STATUS_OK if out & (CLOSED_HALF_NAT | flow::REPLY_OPS) != 0 => Ok(after_forward(out)),
        STATUS_OK => Ok(out),
        slot => Err(slot),
    }
}

/// Out of line (stack budget) and a *global* function (exported, so its BTF linkage is
/// global): the verifier checks it once, on its own, with arguments it knows only by type,
/// instead of once per state a caller reaches it in. As a static function it was 509k of
/// the director's 746k verified instructions. Plain types only (see `STATUS_OK`); pointer
/// arguments may be null as far as the verifier knows, so they are checked. `out` holds
/// a cached full-NAT flow's source on the way in (see [`forward`]).
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn xdplb_nat_forward(
    ctx: *mut xdp_md,
    pkt: *const Parsed,
    entry: *mut FlowValue,
    how: u32,
    out: *mut u32,
) -> u32 {
    // SAFETY: null or valid, from `forward` (the verifier holds callers to the types).
    let (Some(pkt), Some(out)) = (unsafe { pkt.as_ref() }, unsafe { out.as_mut() }) else {
        return reason::PASS_MALFORMED;
    };
    match forward_inner(&XdpContext::new(ctx), pkt, entry, how, *out) {
        Ok(action) => {
            *out = action;
            STATUS_OK
        }
        Err(slot) => slot,
    }
}

#[inline(always)]
fn forward_inner(
    ctx: &XdpContext,
    pkt: &Parsed,
    entry: *mut FlowValue,
    how: u32,
    cached_snat: u32,
) -> Result<u32, u32> {
    let backend = crate::select::backend(how >> HOW_ID_SHIFT).ok_or(reason::PASS_NO_BACKEND)?;
    let flags = tcp_flags(ctx, pkt);
    // The flow's entry: from the fast path's lookup; looked up here only when it is needed
    // and the caller had none (a flow scheduled just now, an ICMP error; not for a flow the
    // cache answered). `pkt.tcp_end`: TCP with FIN or RST (the parser's summary).
    let (fullnat, new, closing) = (how & 1 != 0, how & 2 != 0, pkt.tcp_end);
    let entry = if !entry.is_null() || how & HOW_CACHED != 0 || (new && !fullnat && !closing) {
        entry
    } else {
        flow::entry_inline(&pkt.key).unwrap_or(core::ptr::null_mut())
    };
    let mut slot = core::mem::MaybeUninit::<Rewrite>::uninit();
    // SAFETY: all zeros is a valid rewrite (nothing set); 40 bytes, 8-aligned.
    let rw = unsafe { lb_ebpf::zeroed_in_place(&mut slot) };
    step(prepare_out(
        pkt,
        entry,
        backend,
        how,
        cached_snat,
        closing,
        rw,
    ))?;
    // The reply mapping's write, if due, is the caller's (`rw.set`'s `flow::REPLY_OPS`).
    if crate::stop_after(stage::NAT_MAPPING) {
        return Ok(xdp_action::XDP_TX | rw.set & flow::REPLY_OPS);
    }
    step(rewrite_out(ctx, pkt, rw))?;
    if crate::stop_after(stage::NAT_REWRITE) {
        return Ok(xdp_action::XDP_TX | rw.set & flow::REPLY_OPS);
    }
    let mut action = 0;
    step(route_and_send_out(
        ctx,
        u32::from(backend.family),
        &backend.addr,
        (how >> HOW_ID_SHIFT, core::ptr::null_mut()),
        &mut action,
    ))?;
    if crate::stop_after(stage::NAT_ROUTE) {
        return Ok(xdp_action::XDP_TX | rw.set & flow::REPLY_OPS);
    }
    if lifecycle_client(&pkt.key, entry, backend, rw, flags) {
        return Ok(action | CLOSED_HALF_NAT | rw.set & flow::REPLY_OPS);
    }
    Ok(action | rw.set & flow::REPLY_OPS)
}

/// Choose the flow's NAT addresses (full-NAT source allocation; a flow the cache answered
/// brings its own, `cached_snat`) and make sure the reply mapping exists; `rw` gets the
/// rewrite to apply.
#[inline(always)]
fn prepare_out(
    pkt: &Parsed,
    entry: *mut FlowValue,
    backend: &Backend,
    how: u32,
    cached_snat: u32,
    closing: bool,
    rw: &mut Rewrite,
) -> u32 {
    let key = &pkt.key;
    let (fullnat, new, id) = (how & 1 != 0, how & 2 != 0, how >> HOW_ID_SHIFT);
    let dport_be = backend_port(backend, key);
    // The source the backend sees (`rw.src`; applied only with `SET_SRC`, full-NAT).
    let sport_be = if fullnat {
        let cached = (how & HOW_CACHED != 0, cached_snat);
        match snat_source(key, entry, cached, backend, dport_be, &mut rw.src) {
            Ok(port) => port,
            Err(slot) => return slot,
        }
    } else {
        lb_ebpf::copy16(&mut rw.src, &key.src);
        key.sport_be
    };
    // What the backend's reply will look like, and what it must get back (built only when
    // the mapping is due to be made sure of).
    if how & HOW_CACHED == 0 && mapping_due(entry, new, closing) {
        let Some(scratch) = NAT_REPLY_SCRATCH.get_ptr_mut(0) else {
            return reason::PASS_MALFORMED;
        };
        // SAFETY: this CPU's scratch value; every field is written below.
        let scratch = unsafe { &mut *scratch };
        set_scratch_key(scratch, key, backend, &rw.src, sport_be, dport_be);
        let reply = &mut scratch.value;
        lb_ebpf::copy16(&mut reply.vip, &key.dst);
        lb_ebpf::copy16(&mut reply.client, &key.src);
        reply.vip_port_be = key.dport_be;
        reply.client_port_be = key.sport_be;
        reply.fullnat = u8::from(fullnat);
        // A mapping made again (after eviction) keeps the close in view.
        reply.flags = if !entry.is_null() && unsafe { (*entry).flags } & FLOW_F_FIN_BACKEND != 0 {
            NAT_REPLY_F_FIN_BACKEND
        } else {
            0
        };
        reply._pad = 0;
        reply.client_family = key.family;
        reply.service = backend.service;
        reply.backend = id;
        // Not asked yet (no packet fits an MTU of 0): the first reply that misses the
        // flow cache routes and keeps the answer. The other hop fields are left as the
        // scratch value has them.
        reply.hop.mtu = 0;
        // A new flow's mapping replaces any; an older flow's is written only where it is
        // missing (evicted), so its cached next hop and flags stay.
        rw.set = if new {
            flow::REPLY_PUT
        } else {
            flow::REPLY_PUT_IF_ABSENT
        };
    }
    lb_ebpf::copy16(&mut rw.dst, &backend.addr);
    rw.dport_be = dport_be;
    rw.set |= SET_DST;
    if fullnat {
        rw.sport_be = sport_be;
        rw.set |= SET_SRC;
    }
    STATUS_OK
}

/// The scratch way's key words: the reply key of `key`'s flow to `backend` (the backend's
/// address and port to `src` and `sport_be`, the client's or the full-NAT source), written
/// in place (the table adds the check when it writes the way): a key built on the
/// frame first cost `xdplb_nat_forward` stack it does not have.
#[inline(always)]
fn set_scratch_key(
    scratch: &mut ReplyWay,
    key: &FlowKey,
    backend: &Backend,
    src: &[u8; 16],
    sport_be: u16,
    dport_be: u16,
) {
    // SAFETY: five 8-aligned words hold a `FlowKey` exactly.
    let k = unsafe { &mut *(scratch.key.as_mut_ptr() as *mut FlowKey) };
    lb_ebpf::copy16(&mut k.src, &backend.addr);
    lb_ebpf::copy16(&mut k.dst, src);
    k.sport_be = dport_be;
    k.dport_be = sport_be;
    k.proto = key.proto;
    k.family = backend.family;
    k._pad = [0; 2];
}

/// Whether this client packet makes sure of the reply mapping: for a new flow, a FIN or RST,
/// an entry the caller did not have, and otherwise once a second per flow (`JIFFIES_HZ`
/// jiffies; it remakes a mapping LRU eviction took, where a hash lookup on every packet
/// would cost ~30 ns); the entry then records the time.
#[inline(always)]
fn mapping_due(entry: *mut FlowValue, new: bool, closing: bool) -> bool {
    if entry.is_null() {
        return true;
    }
    let e = unsafe { &mut *entry };
    let (now, hz) = crate::fwd::jiffies();
    let now = now as u16;
    if new || closing || u32::from(now.wrapping_sub(e.nat_checked)) >= hz {
        e.nat_checked = now;
        return true;
    }
    false
}

/// Flow lifecycle on a client packet: RST ends the flow; so does the client's last ACK
/// after FIN from both sides (when the client closed first); a FIN is remembered. Whether
/// it ended a half-NAT flow, whose replies the flow cache may hold on any CPU.
#[inline(always)]
fn lifecycle_client(
    key: &FlowKey,
    entry: *mut FlowValue,
    backend: &Backend,
    rw: &mut Rewrite,
    flags: u8,
) -> bool {
    if entry.is_null() {
        return false;
    }
    let e = unsafe { &mut *entry };
    let both = FLOW_F_FIN_CLIENT | FLOW_F_FIN_BACKEND;
    if flags & TCP_RST != 0
        || (e.flags & both == both && flags & TCP_FIN == 0 && key.proto == IPPROTO_TCP)
    {
        let (src, sport) = if rw.set & SET_SRC != 0 {
            (rw.src, rw.sport_be)
        } else {
            (key.src, key.sport_be)
        };
        let Some(scratch) = NAT_REPLY_SCRATCH.get_ptr_mut(0) else {
            return false;
        };
        // SAFETY: this CPU's scratch value; the caller drops the mapping of its key (and,
        // half-NAT, empties the flow-cache slots of its replies: `after_forward`).
        set_scratch_key(
            unsafe { &mut *scratch },
            key,
            backend,
            &src,
            sport,
            rw.dport_be,
        );
        rw.set |= flow::REPLY_REMOVE;
        close(key);
        return rw.set & SET_SRC == 0;
    } else if flags & TCP_FIN != 0 {
        e.flags |= FLOW_F_FIN_CLIENT;
    }
    false
}

/// End a NAT flow: its table entry. (Its reply mapping and flow-cache slots: the
/// caller's.)
#[inline(always)]
fn close(flow_key: &FlowKey) {
    flow::forget(flow_key);
    crate::stats::reason(reason::NAT_FLOW_CLOSED);
}

/// A packet that is not for a VIP may be a backend's reply to a NAT flow: restore the VIP
/// (and, full-NAT, the client) and send it toward the client. `PASS_NON_VIP` otherwise.
#[inline(always)]
pub fn reply(ctx: &XdpContext, pkt: &Parsed) -> Result<u32, u32> {
    let mut out = 0u32;
    match xdplb_nat_reply(ctx.ctx, pkt, &mut out) {
        STATUS_OK => Ok(out),
        slot => Err(slot),
    }
}

/// Out of line (stack budget) and global, verified once like [`xdplb_nat_forward`].
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn xdplb_nat_reply(ctx: *mut xdp_md, pkt: *const Parsed, out: *mut u32) -> u32 {
    // SAFETY: null or valid, from `reply`.
    let (Some(pkt), Some(out)) = (unsafe { pkt.as_ref() }, unsafe { out.as_mut() }) else {
        return reason::PASS_MALFORMED;
    };
    match reply_inner(&XdpContext::new(ctx), pkt) {
        Ok(action) => {
            *out = action;
            STATUS_OK
        }
        Err(slot) => slot,
    }
}

#[inline(always)]
fn reply_inner(ctx: &XdpContext, pkt: &Parsed) -> Result<u32, u32> {
    if pkt.key.proto != IPPROTO_TCP && pkt.key.proto != IPPROTO_UDP {
        return Err(reason::PASS_NON_VIP);
    }
    let mut slot = core::mem::MaybeUninit::<Rewrite>::uninit();
    // SAFETY: all zeros is a valid rewrite (nothing set); 40 bytes, 8-aligned.
    let rw = unsafe { lb_ebpf::zeroed_in_place(&mut slot) };
    // A half-NAT reply the flow cache knows (no FIN or RST from the backend so far, so no
    // lifecycle); else the mapping.
    // Where the reply's next hop is kept: in its mapping, if it was looked up (else null:
    // the per-CPU client slots).
    let (service, backend, family, hop) = match cached_reply(pkt, rw) {
        NO_REPLY => mapped(ctx, pkt, rw)?,
        ids => {
            let (service, backend) = flow::unpack(ids);
            (
                service,
                backend,
                u32::from(pkt.key.family),
                core::ptr::null_mut(),
            )
        }
    };
    if crate::stop_after(stage::NAT_MAPPING) {
        return Ok(xdp_action::XDP_TX);
    }
    step(rewrite_out(ctx, pkt, rw))?;
    if crate::stop_after(stage::NAT_REWRITE) {
        return Ok(xdp_action::XDP_TX);
    }
    let mut action = 0;
    step(route_and_send_out(
        ctx,
        family,
        &rw.dst,
        (TO_CLIENT, hop),
        &mut action,
    ))?;
    if crate::stop_after(stage::NAT_ROUTE) {
        return Ok(xdp_action::XDP_TX);
    }
    crate::stats::replied(service, backend, pkt.len);
    Ok(action)
}

/// [`cached_reply`]: the flow cache does not answer.
const NO_REPLY: u64 = flow::CACHE_MISS;

/// A half-NAT reply the flow cache answers: `rw` gets the VIP and port from the service
/// the slot names (`select::reply_source`); the slot's ids (`flow::unpack`), else
/// [`NO_REPLY`]. Inline, with the probe (until 2026-12-06 two calls out of line, which
/// the reply's frame no longer needs: 264 -> 256 bytes with them in).
#[inline(always)]
fn cached_reply(pkt: &Parsed, rw: &mut Rewrite) -> u64 {
    let hit = flow::reply_cached(&pkt.key, pkt.tcp_end || pkt.tcp_syn);
    if hit == flow::CACHE_MISS {
        return NO_REPLY;
    }
    let (service, backend) = flow::unpack(hit);
    let Some((vip, vip_port)) = crate::select::reply_source(service, backend, &pkt.key) else {
        return NO_REPLY;
    };
    lb_ebpf::copy16(&mut rw.src, vip);
    rw.sport_be = vip_port;
    rw.set = SET_SRC;
    lb_ebpf::copy16(&mut rw.dst, &pkt.key.dst);
    hit
}

/// A reply by its mapping (`NAT_REPLIES`): `rw` gets what to restore, the
/// flow's lifecycle moves on, and a half-NAT flow's reply is remembered in the flow cache
/// where the cache would restore the same ([`flow::reply_cache_fill`]). (service id,
/// backend id, the client's family, the mapping's next hop to the client: null if this
/// packet ended the flow, whose mapping another CPU's insert may then reuse at once).
#[inline(always)]
fn mapped(
    ctx: &XdpContext,
    pkt: &Parsed,
    rw: &mut Rewrite,
) -> Result<(u32, u32, u32, *mut ReplyHop), u32> {
    let r = flow::reply_at(flow::xdplb_reply_find(&pkt.key)).ok_or(reason::PASS_NON_VIP)?;
    // SAFETY: a live array value.
    let r = unsafe { &mut *r };
    // Word copies: an array assignment here was two calls of a byte-loop memmove per reply.
    lb_ebpf::copy16(&mut rw.src, &r.vip);
    rw.sport_be = r.vip_port_be;
    rw.set = SET_SRC;
    if r.fullnat != 0 {
        lb_ebpf::copy16(&mut rw.dst, &r.client);
        rw.dport_be = r.client_port_be;
        rw.set |= SET_DST;
    } else {
        lb_ebpf::copy16(&mut rw.dst, &pkt.key.dst);
    }
    let (service, backend) = (r.service, r.backend);
    let mut hop = &mut r.hop as *mut ReplyHop;
    if pkt.key.proto == IPPROTO_TCP && lifecycle_backend(&pkt.key, r, tcp_flags(ctx, pkt)) {
        hop = core::ptr::null_mut();
    }
    if r.fullnat == 0 && !pkt.tcp_end && !pkt.tcp_syn && r.flags & NAT_REPLY_F_FIN_BACKEND == 0 {
        if let Some((vip, port)) = crate::select::reply_source(service, backend, &pkt.key) {
            if port == r.vip_port_be && lb_ebpf::eq16(vip, &r.vip) {
                flow::reply_cache_fill(&pkt.key, service, backend);
            }
        }
    }
    Ok((service, backend, u32::from(r.client_family), hop))
}

/// Flow lifecycle on a backend packet (`r`: its mapping): RST ends the flow; so does the
/// backend's last ACK after FIN from both sides (when the backend closed first); a FIN is
/// remembered. The flow entry is looked up only for those: a packet without FIN or RST
/// before the backend's FIN ends nothing. Whether it ended the flow (and its mapping, found
/// again: keeping where the lookup found it cost the reply's frame 16 bytes, past the
/// 512-byte stack).
#[inline(always)]
fn lifecycle_backend(reply: &FlowKey, r: &mut NatReply, flags: u8) -> bool {
    if flags & (TCP_FIN | TCP_RST) == 0 && r.flags & NAT_REPLY_F_FIN_BACKEND == 0 {
        return false;
    }
    // The forward flow (`NatReply::flow`), built in this CPU's scratch way (which only a
    // client packet's run uses otherwise): on the frame, its 40 bytes took the reply's
    // call chain past the 512-byte stack.
    let Some(scratch) = NAT_REPLY_SCRATCH.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: this CPU's scratch value; five 8-aligned words hold a `FlowKey` exactly.
    let flow_key = unsafe { &mut *((*scratch).key.as_mut_ptr() as *mut FlowKey) };
    lb_ebpf::copy16(&mut flow_key.src, &r.client);
    lb_ebpf::copy16(&mut flow_key.dst, &r.vip);
    flow_key.sport_be = r.client_port_be;
    flow_key.dport_be = r.vip_port_be;
    flow_key.proto = reply.proto;
    flow_key.family = r.client_family;
    flow_key._pad = [0; 2];
    let flow_key: &FlowKey = flow_key;
    if flags & (TCP_FIN | TCP_RST) != 0 {
        // The client's CPU may have the flow cached, another CPU its replies (this one's
        // slot went with the FIN or RST): their next packets go to the table.
        flow::cache_forget::<false>(flow_key);
        flow::cache_forget::<true>(reply);
    }
    let Some(e) = flow::entry(flow_key) else {
        return false;
    };
    let e = unsafe { &mut *e };
    let both = FLOW_F_FIN_CLIENT | FLOW_F_FIN_BACKEND;
    if flags & TCP_RST != 0 || (e.flags & both == both && flags & TCP_FIN == 0) {
        close(flow_key);
        flow::reply_forget_at(flow::xdplb_reply_find(reply));
        return true;
    } else if flags & TCP_FIN != 0 {
        e.flags |= FLOW_F_FIN_BACKEND;
        r.flags |= NAT_REPLY_F_FIN_BACKEND;
    }
    false
}
