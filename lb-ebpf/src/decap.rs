//! Backend-side decapsulation for TUN mode (`xdplb decap`): this kernel has no ipip device,
//! and operators would rather not set one up. An IP-in-IP packet (IPv4 or IPv6 outer, IPv4
//! or IPv6 inner) addressed to one of this host's addresses loses its outer header here and
//! continues up the stack as the client's original packet, to the VIP on `lo`. Everything
//! else passes untouched; every packet is counted by `decap_reason` slot.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::xdp_action,
    helpers::bpf_xdp_adjust_head,
    macros::{map, xdp},
    maps::{HashMap, PerCpuArray},
    programs::XdpContext,
    Global,
};
use lb_common::{
    decap_reason as reason, AddrKey, AF_INET, AF_INET6, IPPROTO_IPIP, IPPROTO_IPV6, MAX_VIPS,
};
use lb_ebpf::ptr_at;
use network_types::{
    eth::EthHdr,
    ip::{Ipv4Hdr, Ipv6Hdr},
};

/// Local addresses: outer destinations we decapsulate for (filled from the host's addresses).
#[map]
static DECAP_ADDRS: HashMap<AddrKey, u32> = HashMap::with_max_entries(256, 0);

/// With `FILTER_VIPS`, only inner destinations listed here (`--vip`) are decapsulated.
#[map]
static DECAP_VIPS: HashMap<AddrKey, u32> = HashMap::with_max_entries(MAX_VIPS, 0);

#[map]
static DECAP_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(reason::COUNT, 0);

/// Set at load time when `--vip` was given.
#[unsafe(no_mangle)]
static FILTER_VIPS: Global<u8> = Global::new(0);

const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86DD;

#[xdp]
pub fn xdplb_decap(ctx: XdpContext) -> u32 {
    let slot = match try_decap(&ctx) {
        Ok(()) => reason::DECAPPED,
        Err(slot) => slot,
    };
    if let Some(c) = DECAP_STATS.get_ptr_mut(slot) {
        unsafe { *c += 1 };
    }
    xdp_action::XDP_PASS
}

#[inline(always)]
fn known(map: &HashMap<AddrKey, u32>, addr: [u8; 16], family: u8) -> bool {
    let key = AddrKey {
        addr,
        family,
        _pad: [0; 3],
    };
    unsafe { map.get(&key) }.is_some()
}

#[inline(always)]
fn try_decap(ctx: &XdpContext) -> Result<(), u32> {
    let eth: *const EthHdr = ptr_at(ctx, 0).ok_or(reason::PASS_MALFORMED)?;
    let (dst_mac, src_mac, ether_type) =
        unsafe { ((*eth).dst_addr, (*eth).src_addr, (*eth).ether_type) };
    let (outer_len, inner_proto, mut outer_dst, family) = match u16::from_be(ether_type) {
        ETH_P_IP => {
            let ip: *const Ipv4Hdr = ptr_at(ctx, EthHdr::LEN).ok_or(reason::PASS_MALFORMED)?;
            let ip = unsafe { &*ip };
            // Ours are option-less and unfragmented (the director sets DF).
            if ip.vihl != 0x45
                || ip.frags[0] & 0x3f != 0
                || ip.frags[1] != 0
                || ip.proto != IPPROTO_IPIP
            {
                return Err(reason::PASS_NOT_TUNNEL);
            }
            let mut dst = [0u8; 16];
            dst[..4].copy_from_slice(&ip.dst_addr);
            (Ipv4Hdr::LEN, IPPROTO_IPIP, dst, AF_INET)
        }
        ETH_P_IPV6 => {
            let ip: *const Ipv6Hdr = ptr_at(ctx, EthHdr::LEN).ok_or(reason::PASS_MALFORMED)?;
            let ip = unsafe { &*ip };
            if ip.next_hdr != IPPROTO_IPIP && ip.next_hdr != IPPROTO_IPV6 {
                return Err(reason::PASS_NOT_TUNNEL);
            }
            (Ipv6Hdr::LEN, ip.next_hdr, ip.dst_addr, AF_INET6)
        }
        _ => return Err(reason::PASS_NOT_TUNNEL),
    };
    if !known(&DECAP_ADDRS, outer_dst, family) {
        return Err(reason::PASS_NOT_LOCAL);
    }
    let inner = EthHdr::LEN + outer_len;
    let (inner_type, inner_dst, inner_family) = if inner_proto == IPPROTO_IPIP {
        let ip: *const Ipv4Hdr = ptr_at(ctx, inner).ok_or(reason::PASS_MALFORMED)?;
        let ip = unsafe { &*ip };
        if ip.vihl >> 4 != 4 {
            return Err(reason::PASS_MALFORMED);
        }
        outer_dst = [0; 16];
        outer_dst[..4].copy_from_slice(&ip.dst_addr);
        (ETH_P_IP, outer_dst, AF_INET)
    } else {
        let ip: *const Ipv6Hdr = ptr_at(ctx, inner).ok_or(reason::PASS_MALFORMED)?;
        let ip = unsafe { &*ip };
        if ip.vcf[0] >> 4 != 6 {
            return Err(reason::PASS_MALFORMED);
        }
        (ETH_P_IPV6, ip.dst_addr, AF_INET6)
    };
    if FILTER_VIPS.load() != 0 && !known(&DECAP_VIPS, inner_dst, inner_family) {
        return Err(reason::PASS_NOT_VIP);
    }
    // The new Ethernet header goes right before the inner packet (over the outer header),
    // then the front is cut.
    let new: *mut EthHdr = ptr_at(ctx, outer_len).ok_or(reason::PASS_MALFORMED)?;
    unsafe {
        (*new).dst_addr = dst_mac;
        (*new).src_addr = src_mac;
        (*new).ether_type = inner_type.to_be();
    }
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, outer_len as i32) } != 0 {
        return Err(reason::PASS_ADJUST_FAILED);
    }
    Ok(())
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
