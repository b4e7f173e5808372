//! Packet parsing: Ethernet (+ one 802.1Q tag), IPv4/IPv6, TCP/UDP -> the flow key.
//! Every way a packet can fail to be ours returns a `reason::PASS_*` slot.

use aya_ebpf::programs::XdpContext;
use lb_common::{
    reason, FlowKey, AF_INET, AF_INET6, IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP,
};
pub use lb_ebpf::ptr_at;
use lb_ebpf::{load_u32, load_u64};
use network_types::{
    eth::EthHdr,
    ip::{Ipv4Hdr, Ipv6Hdr},
    tcp::TcpHdr,
    udp::UdpHdr,
};

// EtherTypes as they sit in memory (network order read as a native u16).
const ETH_P_IP: u16 = 0x0800_u16.to_be();
const ETH_P_IPV6: u16 = 0x86DD_u16.to_be();
const ETH_P_8021Q: u16 = 0x8100_u16.to_be();
const VLAN_HDR_LEN: usize = 4;

/// IPv6 next-header values that are extension headers, not transports (RFC 8200 §4, RFC 7045).
const IPV6_EXT_HEADERS: [u8; 8] = [0, 43, 44, 50, 51, 60, 135, 139];

/// ICMP header fields the director looks at (type, code, checksum, rest of header).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct IcmpHdr {
    pub kind: u8,
    pub code: u8,
    pub check: [u8; 2],
    pub rest: [u8; 4],
}

/// What the rest of the pipeline needs to know about a packet (56 bytes; also the argument
/// type of the global functions in `fwd`, so its layout is in the object's BTF).
pub struct Parsed {
    /// 5-tuple (ports 0 for ICMP; `key.proto` is ICMP/ICMPv6 then).
    pub key: FlowKey,
    /// Bytes of the whole frame (for byte counters).
    pub len: u64,
    /// Offset of the IP header (14, or 18 behind a VLAN tag): [`Parsed::l3`].
    l3: u8,
    /// Offset of the transport (or ICMP) header (at most 58): [`Parsed::l4`].
    l4: u8,
    /// IPv4 TOS / IPv6 traffic class (DSCP + ECN), copied to outer headers.
    pub tos: u8,
    /// IPv4 "don't fragment" (always true for IPv6, which routers never fragment).
    pub df: bool,
    /// TCP with FIN or RST: the client is ending the connection.
    pub tcp_end: bool,
    /// TCP SYN without ACK: the client is opening a connection (on a 5-tuple whose last
    /// connection it ended, a new one: see `flow::opens`).
    pub tcp_syn: bool,
}
const _: () = assert!(core::mem::size_of::<Parsed>() == 56);
// The 8-byte store of ports, protocol and family in `parse` (little-endian: `bpfel`).
const _: () = assert!(
    core::mem::offset_of!(FlowKey, sport_be) == 32
        && core::mem::offset_of!(FlowKey, dport_be) == 34
        && core::mem::offset_of!(FlowKey, proto) == 36
        && core::mem::offset_of!(FlowKey, family) == 37
        && core::mem::align_of::<FlowKey>() == 8
);

impl Parsed {
    /// Offset of the IP header.
    #[inline(always)]
    pub fn l3(&self) -> usize {
        usize::from(self.l3)
    }

    /// Offset of the transport (or ICMP) header.
    #[inline(always)]
    pub fn l4(&self) -> usize {
        usize::from(self.l4)
    }
}

/// Offset of the IP header: 14, or 18 behind one VLAN tag (for code that gets only `ctx`).
#[inline(always)]
pub fn l3_offset(ctx: &XdpContext) -> usize {
    match ptr_at::<EthHdr>(ctx, 0) {
        Some(eth) if unsafe { (*eth).ether_type } == ETH_P_8021Q => EthHdr::LEN + VLAN_HDR_LEN,
        _ => EthHdr::LEN,
    }
}

/// Fills `out` (in place: returning the struct by value costs the fast path stack copies).
#[inline(always)]
pub fn parse(ctx: &XdpContext, out: &mut Parsed) -> Result<(), u32> {
    let eth: *const EthHdr = ptr_at(ctx, 0).ok_or(reason::PASS_MALFORMED)?;
    let mut ether_type = unsafe { (*eth).ether_type };
    let mut l3 = EthHdr::LEN;
    if ether_type == ETH_P_8021Q {
        // TCI (2 bytes) then the encapsulated EtherType (2 bytes).
        let inner: *const [u8; VLAN_HDR_LEN] = ptr_at(ctx, l3).ok_or(reason::PASS_MALFORMED)?;
        let inner = unsafe { *inner };
        ether_type = u16::from_ne_bytes([inner[2], inner[3]]);
        l3 += VLAN_HDR_LEN;
    }
    let len = (ctx.data_end() - ctx.data()) as u64;
    let key = &mut out.key;
    let (family, (proto, l4, tos, df)) = match ether_type {
        ETH_P_IP => (AF_INET, parse_ipv4(ctx, l3, key)?),
        ETH_P_IPV6 => (AF_INET6, parse_ipv6(ctx, l3, key)?),
        // ARP, LLDP, a second VLAN tag (QinQ), ...
        _ => return Err(reason::PASS_NOT_IP),
    };
    // Ports (0 for ICMP), protocol, family and padding: the key's last 8 bytes.
    let ports = match proto {
        IPPROTO_TCP => {
            let tcp: *const TcpHdr = ptr_at(ctx, l4).ok_or(reason::PASS_MALFORMED)?;
            // Data offset below 5 words cannot hold a TCP header.
            if unsafe { (*tcp).doff() } < 5 {
                return Err(reason::PASS_MALFORMED);
            }
            out.tcp_end = unsafe { (*tcp).fin() != 0 || (*tcp).rst() != 0 };
            out.tcp_syn = unsafe { (*tcp).syn() != 0 && (*tcp).ack() == 0 };
            // SAFETY: bounds-checked above.
            unsafe { load_u32(tcp as *const u8) }
        }
        IPPROTO_UDP => {
            let udp: *const UdpHdr = ptr_at(ctx, l4).ok_or(reason::PASS_MALFORMED)?;
            // SAFETY: bounds-checked above.
            unsafe { load_u32(udp as *const u8) }
        }
        IPPROTO_ICMP | IPPROTO_ICMPV6 => {
            // Only ICMPv4 over IPv4 and ICMPv6 over IPv6 are ICMP to us.
            if (proto == IPPROTO_ICMP) != (family == AF_INET) {
                return Err(reason::PASS_NOT_TCP_UDP);
            }
            ptr_at::<IcmpHdr>(ctx, l4).ok_or(reason::PASS_MALFORMED)?;
            0
        }
        _ => return Err(reason::PASS_NOT_TCP_UDP),
    };
    // One 8-byte store (see `parse_ipv4`): the flow tables' keys and the flow hash read
    // these bytes back as words.
    // SAFETY: `sport_be` is at offset 32 of the 8-aligned, 40-byte `FlowKey` (asserted above).
    unsafe {
        (&mut key.sport_be as *mut u16 as *mut u64)
            .write(u64::from(ports) | u64::from(proto) << 32 | u64::from(family) << 40)
    };
    out.len = len;
    // Both fit a byte (18 + 40 at most); as bytes they stay bounded for the verifier where
    // it does not know them (a global function's argument, `fwd::nat`).
    out.l3 = l3 as u8;
    out.l4 = l4 as u8;
    out.tos = tos;
    out.df = df;
    Ok(())
}

/// Returns (transport protocol, transport header offset, TOS, DF).
#[inline(always)]
fn parse_ipv4(
    ctx: &XdpContext,
    l3: usize,
    key: &mut FlowKey,
) -> Result<(u8, usize, u8, bool), u32> {
    let ip: *const Ipv4Hdr = ptr_at(ctx, l3).ok_or(reason::PASS_MALFORMED)?;
    let ip = unsafe { &*ip };
    let ihl = (ip.vihl & 0x0f) as usize;
    let tot_len = u16::from_be_bytes(ip.tot_len) as usize;
    if ip.vihl >> 4 != 4
        || ihl < 5
        || tot_len < ihl * 4
        || l3 + tot_len > ctx.data_end() - ctx.data()
    {
        return Err(reason::PASS_MALFORMED);
    }
    if ihl != 5 {
        return Err(reason::PASS_IP_OPTIONS);
    }
    // MF flag or a non-zero fragment offset: any fragment (the first one included, since its
    // siblings carry no ports and would be balanced differently).
    if ip.frags[0] & 0x3f != 0 || ip.frags[1] != 0 {
        return Err(reason::PASS_FRAGMENT);
    }
    // SAFETY: the header was bounds-checked; `FlowKey` is 8-aligned (word stores are aligned).
    // Each address goes in with its 4 zero bytes as one 8-byte store: the address halves are
    // read back as 8-byte loads (`select::dst_halves`, `eq16`), and a load that needs two
    // stores' bytes cannot take them from the store buffer (it waits for both to retire).
    unsafe {
        (key.src.as_mut_ptr() as *mut u64).write(u64::from(load_u32(ip.src_addr.as_ptr())));
        (key.dst.as_mut_ptr() as *mut u64).write(u64::from(load_u32(ip.dst_addr.as_ptr())));
    }
    Ok((ip.proto, l3 + Ipv4Hdr::LEN, ip.tos, ip.frags[0] & 0x40 != 0))
}

#[inline(always)]
fn parse_ipv6(
    ctx: &XdpContext,
    l3: usize,
    key: &mut FlowKey,
) -> Result<(u8, usize, u8, bool), u32> {
    let ip: *const Ipv6Hdr = ptr_at(ctx, l3).ok_or(reason::PASS_MALFORMED)?;
    let ip = unsafe { &*ip };
    let payload_len = u16::from_be_bytes(ip.payload_len) as usize;
    if ip.vcf[0] >> 4 != 6 || l3 + Ipv6Hdr::LEN + payload_len > ctx.data_end() - ctx.data() {
        return Err(reason::PASS_MALFORMED);
    }
    let next = ip.next_hdr;
    let mut i = 0;
    while i < IPV6_EXT_HEADERS.len() {
        if next == IPV6_EXT_HEADERS[i] {
            return Err(reason::PASS_IPV6_EXT);
        }
        i += 1;
    }
    // SAFETY: the header was bounds-checked; `FlowKey` is 8-aligned (word stores are aligned).
    unsafe {
        let (s, d) = (
            key.src.as_mut_ptr() as *mut u64,
            key.dst.as_mut_ptr() as *mut u64,
        );
        let (a, b) = (ip.src_addr.as_ptr(), ip.dst_addr.as_ptr());
        s.write(load_u64(a));
        s.add(1).write(load_u64(a.add(8)));
        d.write(load_u64(b));
        d.add(1).write(load_u64(b.add(8)));
    }
    let tclass = (ip.vcf[0] << 4) | (ip.vcf[1] >> 4);
    Ok((next, l3 + Ipv6Hdr::LEN, tclass, true))
}
