//! TUN (LVS "TUN", Katran's default): the packet, from its IP header on, is wrapped in an
//! outer IP header to the backend — IPv4 in IPv4 (IPIP), IPv6 in IPv6, or IPv4 in IPv6 by
//! the backend's family. The next hop comes from the kernel FIB (`bpf_fib_lookup`), which
//! also checks the egress MTU: too big gets ICMP back to the client, never a silent drop.

use aya_ebpf::{helpers::bpf_xdp_adjust_head, programs::XdpContext};
use lb_common::{
    flow_hash, reason, Backend, IfaceInfo, AF_INET, AF_INET6, DEFAULT_TTL, IFACE_F_SRC4,
    IFACE_F_SRC6, IPPROTO_IPIP, IPPROTO_IPV6,
};
use lb_ebpf::{frame_len, ptr_at, STATUS_OK};
use network_types::{
    eth::EthHdr,
    ip::{Ipv4Hdr, Ipv6Hdr},
};

use crate::{
    csum,
    fwd::{iface, route_to_backend, send, Route},
    parse::Parsed,
};

const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86DD;

/// Outer source address: the egress interface's, with its low `bits` bits taken from the
/// flow hash when entropy is configured (so backend NICs spread tunnels over queues).
#[inline(always)]
fn source<const N: usize>(base: [u8; N], bits: u8, hash: u32) -> [u8; N] {
    let mut out = base;
    let bits = if bits > 32 { 32 } else { bits as u32 };
    if bits == 0 {
        return out;
    }
    let mask: u32 = if bits == 32 {
        u32::MAX
    } else {
        (1u32 << bits) - 1
    };
    let tail = u32::from_be_bytes([out[N - 4], out[N - 3], out[N - 2], out[N - 1]]);
    let tail = (tail & !mask) | (hash & mask);
    out[N - 4..].copy_from_slice(&tail.to_be_bytes());
    out
}

/// What became of a TUN packet that was not passed to the kernel.
pub enum Tun {
    /// Encapsulated and sent with this XDP action.
    Sent(u32),
    /// Would exceed the path MTU; the client may send inner packets of this size. The caller
    /// answers with ICMP (not from here: the call chain would exceed the 512-byte BPF stack).
    TooBig(u32),
}

/// Encapsulate and send toward `backend`.
#[inline(always)]
pub fn forward(ctx: &XdpContext, pkt: &Parsed, backend: &Backend, id: u32) -> Result<Tun, u32> {
    // out = [XDP action or 0, inner MTU when too big]
    let mut out = [0u32; 2];
    match forward_out(ctx, pkt, backend, id, &mut out) {
        STATUS_OK if out[1] != 0 => Ok(Tun::TooBig(out[1])),
        STATUS_OK => Ok(Tun::Sent(out[0])),
        slot => Err(slot),
    }
}

/// Out of line (stack budget); plain types only (see `STATUS_OK`).
#[inline(never)]
fn forward_out(
    ctx: &XdpContext,
    pkt: &Parsed,
    backend: &Backend,
    id: u32,
    out: &mut [u32; 2],
) -> u32 {
    match encapsulate(ctx, pkt, backend, id) {
        Ok(Tun::Sent(action)) => *out = [action, 0],
        Ok(Tun::TooBig(mtu)) => *out = [0, mtu.max(1)],
        Err(slot) => return slot,
    }
    STATUS_OK
}

#[inline(always)]
fn encapsulate(ctx: &XdpContext, pkt: &Parsed, backend: &Backend, id: u32) -> Result<Tun, u32> {
    let ingress = ctx.ingress_ifindex() as u32;
    let inner_len = frame_len(ctx) - pkt.l3;
    let outer6 = backend.family == AF_INET6;
    let hdr_len = if outer6 { Ipv6Hdr::LEN } else { Ipv4Hdr::LEN };
    let outer_len = inner_len + hdr_len;

    // Route to the backend; the kernel also compares the outer size with the path MTU.
    let fib = match route_to_backend(ctx, id, backend.family, &backend.addr, outer_len)? {
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
    let hash = flow_hash(&pkt.key);
    let needs = if outer6 { IFACE_F_SRC6 } else { IFACE_F_SRC4 };
    if egress.flags & needs == 0 {
        return Err(reason::PASS_NO_TUN_SOURCE);
    }

    // Make room: the new frame is Ethernet (14) + outer header + the inner IP packet; a VLAN
    // tag of the input is dropped (the egress is chosen by the FIB, not by the tag).
    let delta = pkt.l3 as i32 - EthHdr::LEN as i32 - hdr_len as i32;
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, delta) } != 0 {
        return Err(reason::PASS_ADJUST_FAILED);
    }
    let eth: *mut EthHdr = ptr_at(ctx, 0).ok_or(reason::PASS_MALFORMED)?;
    let (dst_mac, src_mac) = if no_neigh {
        // Hand the encapsulated packet to our own stack: it resolves the next hop (and
        // forwards the packet if forwarding is enabled).
        let own = iface(ingress).map(|i| i.mac).unwrap_or(fib.dmac);
        (own, fib.smac)
    } else {
        (fib.dmac, fib.smac)
    };
    unsafe {
        (*eth).dst_addr = dst_mac;
        (*eth).src_addr = src_mac;
        (*eth).ether_type = if outer6 { ETH_P_IPV6 } else { ETH_P_IP }.to_be();
    }
    let inner_proto = if pkt.key.family == AF_INET {
        IPPROTO_IPIP
    } else {
        IPPROTO_IPV6
    };
    if outer6 {
        let ip: *mut Ipv6Hdr = ptr_at(ctx, EthHdr::LEN).ok_or(reason::PASS_MALFORMED)?;
        let label = hash & 0x000f_ffff;
        let vcf: u32 = (6 << 28) | ((pkt.tos as u32) << 20) | label;
        let mut dst = [0u8; 16];
        dst.copy_from_slice(&backend.addr);
        unsafe {
            (*ip).vcf = vcf.to_be_bytes();
            (*ip).payload_len = (inner_len as u16).to_be_bytes();
            (*ip).next_hdr = inner_proto;
            (*ip).hop_limit = DEFAULT_TTL;
            (*ip).src_addr = source(egress.src6, egress.src6_entropy_bits, hash);
            (*ip).dst_addr = dst;
        }
    } else {
        let ip: *mut Ipv4Hdr = ptr_at(ctx, EthHdr::LEN).ok_or(reason::PASS_MALFORMED)?;
        let src = source(egress.src4, egress.src4_entropy_bits, hash);
        let dst = [
            backend.addr[0],
            backend.addr[1],
            backend.addr[2],
            backend.addr[3],
        ];
        let len = (outer_len as u16).to_be_bytes();
        // Version/IHL, TOS, length, id 0, DF, TTL, protocol, checksum 0, source, destination.
        let mut h: [u8; 20] = [
            0x45,
            pkt.tos,
            len[0],
            len[1],
            0,
            0,
            0x40,
            0,
            DEFAULT_TTL,
            IPPROTO_IPIP,
            0,
            0,
            src[0],
            src[1],
            src[2],
            src[3],
            dst[0],
            dst[1],
            dst[2],
            dst[3],
        ];
        let check = csum::finish(csum::add_words(0, &h));
        h[10] = check[0];
        h[11] = check[1];
        unsafe { *(ip as *mut [u8; 20]) = h };
    }
    if no_neigh {
        return Err(reason::PASS_NO_NEIGH);
    }
    send(ctx, fib.ifindex).map(Tun::Sent)
}
