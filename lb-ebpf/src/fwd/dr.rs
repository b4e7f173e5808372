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
    unsafe {
        (*eth).dst_addr = dst;
        (*eth).src_addr = src;
    }
    Ok(xdp_action::XDP_TX)
}
