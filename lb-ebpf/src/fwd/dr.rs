//! Direct routing (LVS DR): the backend holds the VIP on a non-ARPing interface, so only the
//! L2 header changes: destination := backend MAC, source := our interface's MAC, `XDP_TX`.

use aya_ebpf::{bindings::xdp_action, programs::XdpContext};
use lb_common::{reason, Backend};
use lb_ebpf::ptr_at;
use network_types::eth::EthHdr;

use super::iface;

#[inline(always)]
pub fn forward(ctx: &XdpContext, backend: &Backend) -> Result<u32, u32> {
    let iface = iface(ctx.ingress_ifindex() as u32).ok_or(reason::PASS_UNKNOWN_IFACE)?;
    // Copies first: written straight from map memory, LLVM may emit a memmove call the
    // verifier cannot follow (it cannot prove packet and map value do not overlap).
    let (dst, src) = (backend.mac, iface.mac);
    let eth: *mut EthHdr = ptr_at(ctx, 0).ok_or(reason::PASS_MALFORMED)?;
    // Three 16-bit stores per address: an array assignment would be a memmove call (an
    // out-of-line byte loop, see `lb_ebpf::zeroed_in_place`). Ethernet headers are 2-aligned.
    let w = eth as *mut u16;
    unsafe {
        for i in 0..3 {
            core::ptr::write_volatile(w.add(i), u16::from_ne_bytes([dst[2 * i], dst[2 * i + 1]]));
            core::ptr::write_volatile(
                w.add(3 + i),
                u16::from_ne_bytes([src[2 * i], src[2 * i + 1]]),
            );
        }
    }
    Ok(xdp_action::XDP_TX)
}
