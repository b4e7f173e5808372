//! TUN (LVS "TUN", Katran's default): the packet, from its IP header on, is wrapped in an
//! outer IP header to the backend — IPv4 in IPv4 (IPIP), IPv6 in IPv6, or IPv4 in IPv6 by
//! the backend's family. The next hop comes from the kernel FIB (`bpf_fib_lookup`), which
//! also checks the egress MTU: too big gets ICMP back to the client, never a silent drop.

use aya_ebpf::{
    bindings::{xdp_action, xdp_md},
    helpers::bpf_xdp_adjust_head,
    programs::XdpContext,
};
use lb_common::{
    reason, stage, tunnel_hash, Backend, IfaceInfo, AF_INET, AF_INET6, DEFAULT_TTL, IFACE_F_SRC4,
    IFACE_F_SRC6, IPPROTO_IPIP, IPPROTO_IPV6,
};
use lb_ebpf::{frame_len, ptr_at, put_words, store_u16, STATUS_OK};
use network_types::{
    eth::EthHdr,
    ip::{Ipv4Hdr, Ipv6Hdr},
};

use crate::{
    csum,
    fwd::{cached_route_to_backend, iface, ingress, route_to_backend, send, set_macs, word, Route},
    parse::Parsed,
};

const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86DD;

/// Outer source address word: the last 32 bits of the egress interface's address, with its
/// low `bits` bits taken from the flow hash when entropy is configured (so backend NICs
/// spread tunnels over queues). Host-order value of big-endian bytes.
#[inline(always)]
fn source_tail(tail: u32, bits: u8, hash: u32) -> u32 {
    let mask: u32 = match bits {
        0 => 0,
        1..=31 => (1u32 << bits) - 1,
        _ => u32::MAX,
    };
    (tail & !mask) | (hash & mask)
}

/// What became of a TUN packet that was not passed to the kernel.
pub enum Tun {
    /// Encapsulated and sent with this XDP action.
    Sent(u32),
    /// Would exceed the path MTU; the client may send inner packets of this size. The caller
    /// answers with ICMP (not from here: the call chain would exceed the 512-byte BPF stack).
    TooBig(u32),
}

/// Encapsulate and send toward `backend`. The usual case is inline in the director: the
/// backend's next hop cached on this CPU ([`cached_route_to_backend`]), its interface with
/// a tunnel source. Everything else (asking the FIB, a missing neighbour, too big) is
/// [`xdplb_tun_forward`]'s, a call. On the EPYC VM, whose kernel returns through SRSO's
/// "Safe RET" thunk, that call cost every TUN hit 6-8 ns until the twenty-first session
/// (`bench --only stages`: the next-hop step +14-17 -> +4-7 ns). The verifier walks this
/// inline part once per caller state (the director 141k -> 236k instructions; all of TUN
/// inline took 307k and did not fit the stack; see README, Verifier budget).
#[inline(always)]
pub fn forward(ctx: &XdpContext, pkt: &Parsed, backend: &Backend, id: u32) -> Result<Tun, u32> {
    let ingress = ingress(ctx);
    let inner_len = frame_len(ctx) - pkt.l3();
    let (hdr_len, needs) = outer(backend);
    if let Some(hop) = cached_route_to_backend(
        ingress,
        id,
        backend.family,
        &backend.addr,
        inner_len + hdr_len,
    ) {
        if let Some(egress) = iface(hop.ifindex) {
            if egress.flags & needs != 0 {
                if crate::stop_after(stage::TUN_ROUTE) {
                    return Ok(Tun::Sent(xdp_action::XDP_TX));
                }
                let to = (&hop.dmac, &hop.smac, hop.ifindex);
                return wrap(ctx, pkt, backend, to, false, egress, ingress).map(Tun::Sent);
            }
        }
    }
    // out = [XDP action or 0, inner MTU when too big]
    let mut out = [0u32; 2];
    match xdplb_tun_forward(ctx.ctx, pkt, backend, id, &mut out) {
        STATUS_OK if out[1] != 0 => Ok(Tun::TooBig(out[1])),
        STATUS_OK => Ok(Tun::Sent(out[0])),
        slot => Err(slot),
    }
}

/// Out of line (stack budget) and global, verified once like `fwd::nat::xdplb_nat_forward`;
/// plain types only (see `STATUS_OK`).
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn xdplb_tun_forward(
    ctx: *mut xdp_md,
    pkt: *const Parsed,
    backend: *const Backend,
    id: u32,
    out: *mut [u32; 2],
) -> u32 {
    // SAFETY: null or valid, from `forward`.
    let (Some(pkt), Some(backend), Some(out)) =
        (unsafe { (pkt.as_ref(), backend.as_ref(), out.as_mut()) })
    else {
        return reason::PASS_MALFORMED;
    };
    match encapsulate(&XdpContext::new(ctx), pkt, backend, id) {
        Ok(Tun::Sent(action)) => *out = [action, 0],
        Ok(Tun::TooBig(mtu)) => *out = [0, mtu.max(1)],
        Err(slot) => return slot,
    }
    STATUS_OK
}

/// The outer header's length for `backend`, and the interface flag its source needs.
#[inline(always)]
fn outer(backend: &Backend) -> (usize, u8) {
    if backend.family == AF_INET6 {
        (Ipv6Hdr::LEN, IFACE_F_SRC6)
    } else {
        (Ipv4Hdr::LEN, IFACE_F_SRC4)
    }
}

#[inline(always)]
fn encapsulate(ctx: &XdpContext, pkt: &Parsed, backend: &Backend, id: u32) -> Result<Tun, u32> {
    let ingress = ingress(ctx);
    let inner_len = frame_len(ctx) - pkt.l3();
    let (hdr_len, needs) = outer(backend);
    let outer_len = inner_len + hdr_len;

    // Route to the backend; the kernel also compares the outer size with the path MTU.
    let fib = match route_to_backend(ctx, ingress, id, backend.family, &backend.addr, outer_len)? {
        Route::Via(hop) => (hop, false),
        Route::NoNeigh(hop) => (hop, true),
        Route::TooBig(mtu) => {
            if !pkt.df {
                return Err(reason::PASS_TOO_BIG_NO_DF);
            }
            // The client must send inner packets that fit once wrapped.
            let mtu = mtu as usize;
            let inner_mtu = if mtu > hdr_len { mtu - hdr_len } else { 0 };
            return Ok(Tun::TooBig(inner_mtu as u32));
        }
    };
    let (fib, no_neigh) = fib;

    let egress: &IfaceInfo = iface(fib.ifindex).ok_or(reason::PASS_UNKNOWN_IFACE)?;
    if egress.flags & needs == 0 {
        return Err(reason::PASS_NO_TUN_SOURCE);
    }
    if crate::stop_after(stage::TUN_ROUTE) {
        return Ok(Tun::Sent(xdp_action::XDP_TX));
    }
    // A missing neighbour: hand the encapsulated packet to our own stack, which resolves
    // the next hop (and forwards the packet if forwarding is enabled).
    let dst_mac = if no_neigh {
        iface(ingress).map_or(&fib.dmac, |i| &i.mac)
    } else {
        &fib.dmac
    };
    let to = (dst_mac, &fib.smac, fib.ifindex);
    wrap(ctx, pkt, backend, to, no_neigh, egress, ingress).map(Tun::Sent)
}

/// Make room, write the MACs and the outer header, send `to` (destination MAC, source MAC,
/// interface): the XDP action (or, `no_neigh`, `PASS_NO_NEIGH` with the frame for our own
/// stack).
#[inline(always)]
fn wrap(
    ctx: &XdpContext,
    pkt: &Parsed,
    backend: &Backend,
    to: (&[u8; 6], &[u8; 6], u32),
    no_neigh: bool,
    egress: &IfaceInfo,
    ingress: u32,
) -> Result<u32, u32> {
    let (hdr_len, _) = outer(backend);
    let outer6 = hdr_len == Ipv6Hdr::LEN;
    let inner_len = frame_len(ctx) - pkt.l3();
    let outer_len = inner_len + hdr_len;

    // Make room: the new frame is Ethernet (14) + outer header + the inner IP packet; a VLAN
    // tag of the input is dropped (the egress is chosen by the FIB, not by the tag).
    let delta = pkt.l3() as i32 - EthHdr::LEN as i32 - hdr_len as i32;
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, delta) } != 0 {
        return Err(reason::PASS_ADJUST_FAILED);
    }
    set_macs(ctx, *to.0, *to.1)?;
    if crate::stop_after(stage::TUN_ROOM) {
        return Ok(xdp_action::XDP_TX);
    }
    let inner_proto = if pkt.key.family == AF_INET {
        IPPROTO_IPIP
    } else {
        IPPROTO_IPV6
    };
    // Ether type and outer header, in word stores (built field by field in a byte array
    // they cost a store, a load and a store per byte, and the checksum a load per byte).
    let b = &backend.addr;
    if outer6 {
        let h = ptr_at::<[u8; 2 + Ipv6Hdr::LEN]>(ctx, EthHdr::LEN - 2)
            .ok_or(reason::PASS_MALFORMED)? as *mut u8;
        // The flow's hash fills the flow label (and the source's host bits with entropy).
        let hash = tunnel_hash(&pkt.key);
        let s6 = &egress.src6;
        let tail = source_tail(word(s6, 3), egress.src6_entropy_bits, hash);
        let words = [
            (6 << 28) | ((pkt.tos as u32) << 20) | (hash & 0x000f_ffff),
            ((inner_len as u32) << 16) | ((inner_proto as u32) << 8) | DEFAULT_TTL as u32,
            word(s6, 0),
            word(s6, 1),
            word(s6, 2),
            tail,
            word(b, 0),
            word(b, 1),
            word(b, 2),
            word(b, 3),
        ];
        // SAFETY: 42 bytes from offset 12, bounds-checked.
        unsafe {
            store_u16(h, ETH_P_IPV6.to_be());
            put_words(h.add(2), &words);
        }
    } else {
        let h = ptr_at::<[u8; 2 + Ipv4Hdr::LEN]>(ctx, EthHdr::LEN - 2)
            .ok_or(reason::PASS_MALFORMED)? as *mut u8;
        // The flow hash only where entropy fills the source's host bits (opt-in): the hash
        // is a serial chain of multiplies.
        let src = match egress.src4_entropy_bits {
            0 => word(&egress.src4, 0),
            bits => source_tail(word(&egress.src4, 0), bits, tunnel_hash(&pkt.key)),
        };
        // Version/IHL, TOS, length | id 0, DF | TTL, protocol, checksum | source | destination.
        let mut words = [
            0x4500_0000 | ((pkt.tos as u32) << 16) | outer_len as u32,
            0x0000_4000,
            ((DEFAULT_TTL as u32) << 24) | ((IPPROTO_IPIP as u32) << 16),
            src,
            word(b, 0),
        ];
        words[2] |= u32::from(u16::from_be_bytes(csum::finish(csum::add_u32s(0, &words))));
        // SAFETY: 22 bytes from offset 12, bounds-checked.
        unsafe {
            store_u16(h, ETH_P_IP.to_be());
            put_words(h.add(2), &words);
        }
    }
    if crate::stop_after(stage::TUN_HEADER) {
        return Ok(xdp_action::XDP_TX);
    }
    if no_neigh {
        return Err(reason::PASS_NO_NEIGH);
    }
    send(ingress, to.2)
}
