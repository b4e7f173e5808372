//! ICMP to a VIP: echo requests are answered here; errors about a VIP flow (frag needed /
//! packet too big, unreachable, time exceeded) go to the backend that owns the flow; and the
//! TUN path's "too big" replies to clients are built here.

use aya_ebpf::{
    bindings::xdp_action,
    helpers::{bpf_xdp_adjust_head, bpf_xdp_adjust_tail},
    programs::XdpContext,
};
use lb_common::{
    reason, FlowKey, AF_INET, AF_INET6, DEFAULT_TTL, IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP,
    IPPROTO_UDP,
};
use lb_ebpf::{frame_len, ptr_at, put_words, STATUS_OK};
use network_types::{
    eth::EthHdr,
    ip::{Ipv4Hdr, Ipv6Hdr},
};

use crate::{
    csum, flow,
    fwd::word,
    parse::{IcmpHdr, Parsed},
    select,
};

const ICMP_ECHO_REPLY: u8 = 0;
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_FRAG_NEEDED: u8 = 4;
const ICMP_ECHO: u8 = 8;
const ICMP_TIME_EXCEEDED: u8 = 11;
const ICMPV6_DEST_UNREACH: u8 = 1;
const ICMPV6_PKT_TOO_BIG: u8 = 2;
const ICMPV6_TIME_EXCEED: u8 = 3;
const ICMPV6_ECHO_REQUEST: u8 = 128;
const ICMPV6_ECHO_REPLY: u8 = 129;
/// Bytes of the offending packet quoted in our "too big" replies: IPv4 header + 8 (RFC 792);
/// for IPv6 the header + 8 as well, which is what a host needs to find the socket.
const QUOTE4: usize = Ipv4Hdr::LEN + 8;
const QUOTE6: usize = Ipv6Hdr::LEN + 8;

/// What to do with an ICMP packet to a VIP.
pub enum Icmp {
    /// Answered in place: (XDP action, counter slot).
    Done(u32, u32),
    /// An error about a flow: forward it like the flow's packets (service mode, backend id).
    Steer(u8, u32),
}

#[inline(always)]
pub fn handle(ctx: &XdpContext, pkt: &Parsed) -> Result<Icmp, u32> {
    // out = [steer?, action or mode, slot or backend id]
    let mut slot = core::mem::MaybeUninit::<[u32; 3]>::uninit();
    // SAFETY: zeros are valid u32s.
    let out = unsafe { lb_ebpf::zeroed_in_place(&mut slot) };
    match handle_out(ctx, pkt, out) {
        STATUS_OK if out[0] != 0 => Ok(Icmp::Steer(out[1] as u8, out[2])),
        STATUS_OK => Ok(Icmp::Done(out[1], out[2])),
        slot => Err(slot),
    }
}

/// Out of line, like the other rare paths here, so the fast path's stack frame stays small
/// (the BPF stack is 512 bytes for the whole call chain); plain types only (`STATUS_OK`).
#[inline(never)]
fn handle_out(ctx: &XdpContext, pkt: &Parsed, out: &mut [u32; 3]) -> u32 {
    match classify(ctx, pkt) {
        Ok(Icmp::Done(action, slot)) => *out = [0, action, slot],
        Ok(Icmp::Steer(mode, id)) => *out = [1, mode as u32, id],
        Err(slot) => return slot,
    }
    STATUS_OK
}

#[inline(always)]
fn classify(ctx: &XdpContext, pkt: &Parsed) -> Result<Icmp, u32> {
    if !select::is_vip(pkt.key.dst, pkt.key.family) {
        return Err(reason::PASS_NON_VIP);
    }
    let icmp: *mut IcmpHdr = ptr_at(ctx, pkt.l4()).ok_or(reason::PASS_MALFORMED)?;
    let kind = unsafe { (*icmp).kind };
    match (pkt.key.family == AF_INET, kind) {
        (true, ICMP_ECHO) | (false, ICMPV6_ECHO_REQUEST) => echo(ctx, pkt, icmp),
        (true, ICMP_DEST_UNREACH | ICMP_TIME_EXCEEDED)
        | (false, ICMPV6_DEST_UNREACH | ICMPV6_PKT_TOO_BIG | ICMPV6_TIME_EXCEED) => steer(ctx, pkt),
        _ => Err(reason::PASS_NOT_TCP_UDP),
    }
}

#[inline(always)]
fn swap_macs(ctx: &XdpContext) -> Result<(), u32> {
    let eth: *mut EthHdr = ptr_at(ctx, 0).ok_or(reason::PASS_MALFORMED)?;
    unsafe { core::mem::swap(&mut (*eth).dst_addr, &mut (*eth).src_addr) };
    Ok(())
}

/// Echo reply in place: swap addresses (the checksums do not change for a swap) and fix
/// the ICMP checksum for the new type.
#[inline(always)]
fn echo(ctx: &XdpContext, pkt: &Parsed, icmp: *mut IcmpHdr) -> Result<Icmp, u32> {
    let reply = if pkt.key.family == AF_INET {
        let ip: *mut Ipv4Hdr = ptr_at(ctx, pkt.l3()).ok_or(reason::PASS_MALFORMED)?;
        unsafe { core::mem::swap(&mut (*ip).src_addr, &mut (*ip).dst_addr) };
        ICMP_ECHO_REPLY
    } else {
        let ip: *mut Ipv6Hdr = ptr_at(ctx, pkt.l3()).ok_or(reason::PASS_MALFORMED)?;
        unsafe { core::mem::swap(&mut (*ip).src_addr, &mut (*ip).dst_addr) };
        ICMPV6_ECHO_REPLY
    };
    unsafe {
        let old = u16::from_be_bytes([(*icmp).kind, (*icmp).code]);
        let new = u16::from_be_bytes([reply, (*icmp).code]);
        (*icmp).kind = reply;
        (*icmp).check = csum::replace_word((*icmp).check, old, new);
    }
    swap_macs(ctx)?;
    Ok(Icmp::Done(xdp_action::XDP_TX, reason::ICMP_ECHO_REPLIED))
}

/// An ICMP error quotes a packet our backend sent (VIP:port -> client); the flow it is
/// about is that packet's reverse. The error goes to the flow's backend.
#[inline(always)]
fn steer(ctx: &XdpContext, pkt: &Parsed) -> Result<Icmp, u32> {
    let inner = pkt.l4() + 8;
    let mut key = FlowKey::default();
    let ports_at;
    if pkt.key.family == AF_INET {
        let ip: *const Ipv4Hdr = ptr_at(ctx, inner).ok_or(reason::PASS_MALFORMED)?;
        let ip = unsafe { &*ip };
        // Quoted headers with options are not ours (we never forward those).
        if ip.vihl != 0x45 {
            return Err(reason::PASS_MALFORMED);
        }
        key.family = AF_INET;
        key.proto = ip.proto;
        key.src[..4].copy_from_slice(&ip.dst_addr);
        key.dst[..4].copy_from_slice(&ip.src_addr);
        ports_at = inner + Ipv4Hdr::LEN;
    } else {
        let ip: *const Ipv6Hdr = ptr_at(ctx, inner).ok_or(reason::PASS_MALFORMED)?;
        let ip = unsafe { &*ip };
        key.family = AF_INET6;
        key.proto = ip.next_hdr;
        key.src = ip.dst_addr;
        key.dst = ip.src_addr;
        ports_at = inner + Ipv6Hdr::LEN;
    }
    if key.proto != IPPROTO_TCP && key.proto != IPPROTO_UDP {
        return Err(reason::PASS_NOT_TCP_UDP);
    }
    let ports: *const [u8; 4] = ptr_at(ctx, ports_at).ok_or(reason::PASS_MALFORMED)?;
    let ports = unsafe { *ports };
    key.sport_be = u16::from_ne_bytes([ports[2], ports[3]]);
    key.dport_be = u16::from_ne_bytes([ports[0], ports[1]]);
    let svc = select::service(&key)?;
    // Only look: an error is no reason to create a flow.
    let choice = flow::lookup_or_schedule(svc, &key, 0)?;
    Ok(Icmp::Steer(svc.mode, choice.id))
}

/// One's-complement sum (not folded) of the quoted bytes, word by word.
#[inline(always)]
fn quote_sum<const N: usize>(quote: &[u8; N]) -> u32 {
    let mut sum = 0u32;
    let mut i = 0;
    while 4 * i < N {
        sum = csum::add_u32s(sum, &[word(quote, i)]);
        i += 1;
    }
    sum
}

/// The encapsulated packet would not fit the egress MTU: tell the client, from the VIP, how
/// big its packets may be (`mtu` is already net of our outer header). The frame becomes the
/// reply in place: cut after the quoted bytes, then grown at the front by the new IP + ICMP
/// headers, so the quote never moves; the L2 header (MACs swapped, any VLAN tag kept) is
/// copied to the new front.
#[inline(always)]
pub fn too_big(ctx: &XdpContext, pkt: &Parsed, mtu: u32) -> Result<(u32, u32), u32> {
    match too_big_out(ctx, pkt, mtu) {
        STATUS_OK => Ok((xdp_action::XDP_TX, reason::ICMP_TOO_BIG_SENT)),
        slot => Err(slot),
    }
}

/// Out of line (stack budget); plain types only (see `STATUS_OK`).
#[inline(never)]
fn too_big_out(ctx: &XdpContext, pkt: &Parsed, mtu: u32) -> u32 {
    match build_too_big(ctx, pkt, mtu) {
        Ok(()) => STATUS_OK,
        Err(slot) => slot,
    }
}

#[inline(always)]
fn build_too_big(ctx: &XdpContext, pkt: &Parsed, mtu: u32) -> Result<(), u32> {
    // Never an ICMP error about an ICMP packet (RFC 1122 3.2.2, RFC 4443 2.4).
    if pkt.key.proto == IPPROTO_ICMP || pkt.key.proto == IPPROTO_ICMPV6 {
        return Err(reason::PASS_TOO_BIG_NO_DF);
    }
    let v4 = pkt.key.family == AF_INET;
    let (ip_len, quote_len) = if v4 {
        (Ipv4Hdr::LEN, QUOTE4)
    } else {
        (Ipv6Hdr::LEN, QUOTE6)
    };
    let grow = ip_len + 8;
    // From the frame, not `pkt`: after the global TUN function the verifier takes `pkt` for
    // changed (it could write through its pointer), so `pkt.l3()` is any byte to it.
    let l3 = crate::parse::l3_offset(ctx);
    // Addresses of the offending packet, before anything moves: big-endian words (IPv4:
    // the first). Words, not byte arrays: LLVM splits a byte array into 32 values, which the
    // helper calls below made it spill one stack slot each (a 344-byte frame).
    let (mut client, mut vip) = ([0u32; 4], [0u32; 4]);
    if v4 {
        let ip = ptr_at::<[u8; Ipv4Hdr::LEN]>(ctx, l3).ok_or(reason::PASS_MALFORMED)?;
        // SAFETY: bounds-checked packet memory.
        let ip = unsafe { &*ip };
        client[0] = word(ip, 3);
        vip[0] = word(ip, 4);
    } else {
        let ip = ptr_at::<[u8; Ipv6Hdr::LEN]>(ctx, l3).ok_or(reason::PASS_MALFORMED)?;
        // SAFETY: bounds-checked packet memory.
        let ip = unsafe { &*ip };
        for i in 0..4 {
            client[i] = word(ip, 2 + i);
            vip[i] = word(ip, 6 + i);
        }
    }
    let delta = (l3 + quote_len) as i32 - frame_len(ctx) as i32;
    if unsafe { bpf_xdp_adjust_tail(ctx.ctx, delta) } != 0 {
        return Err(reason::PASS_ADJUST_FAILED);
    }
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -(grow as i32)) } != 0 {
        return Err(reason::PASS_ADJUST_FAILED);
    }
    // L2 header: old one now starts at `grow` (> l3, so the copy does not overlap).
    let old: *const EthHdr = ptr_at(ctx, grow).ok_or(reason::PASS_MALFORMED)?;
    let new: *mut EthHdr = ptr_at(ctx, 0).ok_or(reason::PASS_MALFORMED)?;
    unsafe {
        (*new).dst_addr = (*old).src_addr;
        (*new).src_addr = (*old).dst_addr;
        (*new).ether_type = (*old).ether_type;
    }
    if l3 > EthHdr::LEN {
        let tag: *const [u8; 4] = ptr_at(ctx, grow + EthHdr::LEN).ok_or(reason::PASS_MALFORMED)?;
        let out: *mut [u8; 4] = ptr_at(ctx, EthHdr::LEN).ok_or(reason::PASS_MALFORMED)?;
        unsafe { *out = *tag };
    }
    if v4 {
        // IPv4 header, ICMP header and the quote, bounds-checked at once.
        let p = ptr_at::<[u8; Ipv4Hdr::LEN + 8 + QUOTE4]>(ctx, l3).ok_or(reason::PASS_MALFORMED)?
            as *mut u8;
        // Type, code, checksum | unused, next-hop MTU (RFC 1191).
        let mut icmp = [
            (u32::from(ICMP_DEST_UNREACH) << 24) | (u32::from(ICMP_FRAG_NEEDED) << 16),
            mtu & 0xffff,
        ];
        let sum = quote_sum::<QUOTE4>(unsafe { &*(p.add(Ipv4Hdr::LEN + 8) as *const _) });
        icmp[0] |= u32::from(u16::from_be_bytes(csum::finish(csum::add_u32s(sum, &icmp))));
        // Version/IHL, TOS, length | id, fragment | TTL, protocol, checksum | source | dest.
        let mut ip = [
            0x4500_0000 | (Ipv4Hdr::LEN + 8 + QUOTE4) as u32,
            0,
            (u32::from(DEFAULT_TTL) << 24) | (u32::from(IPPROTO_ICMP) << 16),
            vip[0],
            client[0],
        ];
        ip[2] |= u32::from(u16::from_be_bytes(csum::finish(csum::add_u32s(0, &ip))));
        // SAFETY: 56 bytes from `p`, bounds-checked.
        unsafe {
            put_words(p, &ip);
            put_words(p.add(Ipv4Hdr::LEN), &icmp);
        }
    } else {
        let p = ptr_at::<[u8; Ipv6Hdr::LEN + 8 + QUOTE6]>(ctx, l3).ok_or(reason::PASS_MALFORMED)?
            as *mut u8;
        // IPv6 links carry at least 1280 bytes (RFC 8200 §5).
        let mut icmp = [u32::from(ICMPV6_PKT_TOO_BIG) << 24, mtu.max(1280)];
        let payload = (8 + QUOTE6) as u32;
        // Pseudo-header (RFC 8200 §8.1): addresses, upper-layer length, next header.
        let mut sum = csum::add_u32s(csum::add_u32s(0, &vip), &client);
        sum += payload + u32::from(IPPROTO_ICMPV6);
        sum += quote_sum::<QUOTE6>(unsafe { &*(p.add(Ipv6Hdr::LEN + 8) as *const _) });
        icmp[0] |= u32::from(u16::from_be_bytes(csum::finish(csum::add_u32s(sum, &icmp))));
        let head = [
            6 << 28,
            (payload << 16) | (u32::from(IPPROTO_ICMPV6) << 8) | u32::from(DEFAULT_TTL),
        ];
        // SAFETY: 96 bytes from `p`, bounds-checked.
        unsafe {
            put_words(p, &head);
            put_words(p.add(8), &vip);
            put_words(p.add(24), &client);
            put_words(p.add(Ipv6Hdr::LEN), &icmp);
        }
    }
    Ok(())
}
