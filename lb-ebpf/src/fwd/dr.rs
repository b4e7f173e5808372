//! Direct routing (LVS DR): the backend holds the VIP on a non-ARPing interface, so only the
//! L2 header changes: destination := backend MAC, source := our interface's MAC, `XDP_TX`.

use aya_ebpf::{bindings::xdp_action, programs::XdpContext};
use lb_common::{reason, Backend};

use super::{iface, set_macs};

#[inline(always)]
pub fn forward(ctx: &XdpContext, backend: &Backend) -> Result<u32, u32> {
    let iface = iface(ctx.ingress_ifindex() as u32).ok_or(reason::PASS_UNKNOWN_IFACE)?;
    set_macs(ctx, backend.mac, iface.mac)?;
    Ok(xdp_action::XDP_TX)
}
