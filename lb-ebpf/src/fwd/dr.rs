//! Direct routing (LVS DR): the backend holds the VIP on a non-ARPing interface, so only the
//! L2 header changes: destination := backend MAC, source := our interface's MAC, `XDP_TX`.

use aya_ebpf::{bindings::xdp_action, macros::map, maps::HashMap, programs::XdpContext};
use lb_common::{reason, Backend, IfaceInfo, MAX_IFACES};
use network_types::eth::EthHdr;

use crate::parse::ptr_at;

/// ifindex -> what we know of the interface (its MAC), filled by the controller on attach.
#[map]
static IFACES: HashMap<u32, IfaceInfo> = HashMap::with_max_entries(MAX_IFACES, 0);

#[inline(always)]
pub fn forward(ctx: &XdpContext, backend: &Backend) -> Result<u32, u32> {
    let ifindex = ctx.ingress_ifindex() as u32;
    let iface = unsafe { IFACES.get(&ifindex) }.ok_or(reason::PASS_UNKNOWN_IFACE)?;
    let eth: *mut EthHdr = ptr_at(ctx, 0).ok_or(reason::PASS_MALFORMED)?;
    unsafe {
        (*eth).dst_addr = backend.mac;
        (*eth).src_addr = iface.mac;
    }
    Ok(xdp_action::XDP_TX)
}
