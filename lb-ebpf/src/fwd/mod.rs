//! Forwarding, one module per mode, and what both need to know about our interfaces.

pub mod dr;
pub mod tun;

use aya_ebpf::{macros::map, maps::HashMap};
use lb_common::{IfaceInfo, MAX_IFACES};

/// ifindex -> what we know of the interface (its MAC, TUN outer sources), filled by the
/// controller when it attaches.
#[map]
static IFACES: HashMap<u32, IfaceInfo> = HashMap::with_max_entries(MAX_IFACES, 0);

#[inline(always)]
pub fn iface(ifindex: u32) -> Option<&'static IfaceInfo> {
    unsafe { IFACES.get(&ifindex) }
}
