//! What the controller asks the kernel about interfaces and neighbours (rtnetlink).

use std::{ffi::CString, net::IpAddr, time::Duration};

use futures::TryStreamExt as _;
use rtnetlink::packet_route::{
    address::AddressAttribute,
    link::LinkAttribute,
    neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourState},
    AddressFamily,
};

/// ifindex of an interface in our network namespace.
pub fn ifindex(name: &str) -> Option<u32> {
    let c = CString::new(name).ok()?;
    // SAFETY: `c` is a valid NUL-terminated string for the duration of the call.
    let idx = unsafe { libc::if_nametoindex(c.as_ptr()) };
    (idx != 0).then_some(idx)
}

pub struct Netlink {
    handle: rtnetlink::Handle,
}

impl Netlink {
    /// Must be called inside a tokio runtime (the connection runs as a task).
    pub fn new() -> std::io::Result<Self> {
        let (conn, handle, _) = rtnetlink::new_connection()?;
        tokio::spawn(conn);
        Ok(Netlink { handle })
    }

    /// The interface's own Ethernet address.
    pub async fn link_mac(&self, name: &str) -> anyhow::Result<[u8; 6]> {
        let mut links = self
            .handle
            .link()
            .get()
            .match_name(name.to_string())
            .execute();
        let Some(msg) = links.try_next().await? else {
            anyhow::bail!("interface {name} not found");
        };
        msg.attributes
            .iter()
            .find_map(|a| match a {
                LinkAttribute::Address(mac) if mac.len() == 6 => mac.as_slice().try_into().ok(),
                _ => None,
            })
            .ok_or_else(|| {
                anyhow::anyhow!(
                    "interface {name} has no Ethernet address; DR needs an Ethernet interface"
                )
            })
    }

    /// `ip route get ADDR`: `Some(true)` when the route goes through a gateway, `Some(false)`
    /// when ADDR is on a directly attached subnet, `None` when there is no route.
    pub async fn via_gateway(&self, addr: IpAddr) -> Option<bool> {
        use rtnetlink::packet_route::route::RouteAttribute;
        let msg = match addr {
            IpAddr::V4(a) => rtnetlink::RouteMessageBuilder::<std::net::Ipv4Addr>::new()
                .destination_prefix(a, 32)
                .build(),
            IpAddr::V6(a) => rtnetlink::RouteMessageBuilder::<std::net::Ipv6Addr>::new()
                .destination_prefix(a, 128)
                .build(),
        };
        let mut routes = self.handle.route().get(msg).execute();
        let route = routes.try_next().await.ok().flatten()?;
        Some(
            route
                .attributes
                .iter()
                .any(|a| matches!(a, RouteAttribute::Gateway(_) | RouteAttribute::Via(_))),
        )
    }

    /// Every address configured on this host (this network namespace).
    pub async fn local_addrs(&self) -> anyhow::Result<Vec<IpAddr>> {
        let mut out = Vec::new();
        let mut addrs = self.handle.address().get().execute();
        while let Some(msg) = addrs.try_next().await? {
            for a in &msg.attributes {
                if let AddressAttribute::Address(ip) | AddressAttribute::Local(ip) = a {
                    if !out.contains(ip) {
                        out.push(*ip);
                    }
                }
            }
        }
        Ok(out)
    }

    /// The neighbour table's MAC for `addr`, if it has a usable one.
    async fn neighbour(&self, addr: IpAddr) -> anyhow::Result<Option<[u8; 6]>> {
        let family = match addr {
            IpAddr::V4(_) => AddressFamily::Inet,
            IpAddr::V6(_) => AddressFamily::Inet6,
        };
        let mut neighbours = self
            .handle
            .neighbours()
            .get()
            .set_address_family(family)
            .execute();
        while let Some(msg) = neighbours.try_next().await? {
            let usable = matches!(
                msg.header.state,
                NeighbourState::Reachable
                    | NeighbourState::Stale
                    | NeighbourState::Delay
                    | NeighbourState::Probe
                    | NeighbourState::Permanent
                    | NeighbourState::Noarp
            );
            let dest = msg.attributes.iter().find_map(|a| match a {
                NeighbourAttribute::Destination(NeighbourAddress::Inet(a)) => Some(IpAddr::V4(*a)),
                NeighbourAttribute::Destination(NeighbourAddress::Inet6(a)) => Some(IpAddr::V6(*a)),
                _ => None,
            });
            if !usable || dest != Some(addr) {
                continue;
            }
            let mac = msg.attributes.iter().find_map(|a| match a {
                NeighbourAttribute::LinkLayerAddress(m) if m.len() == 6 => {
                    m.as_slice().try_into().ok()
                }
                _ => None,
            });
            if mac.is_some() {
                return Ok(mac);
            }
        }
        Ok(None)
    }

    /// The MAC of an on-link host: from the neighbour table, after making the kernel resolve
    /// it (a datagram to the discard port triggers ARP / neighbour discovery) if needed.
    pub async fn resolve(&self, addr: IpAddr, timeout: Duration) -> anyhow::Result<[u8; 6]> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut next_poke = tokio::time::Instant::now();
        loop {
            if let Some(mac) = self.neighbour(addr).await? {
                return Ok(mac);
            }
            let now = tokio::time::Instant::now();
            if now >= deadline {
                anyhow::bail!(
                    "no MAC address for backend {addr} after {timeout:?}: it must be on the same L2 segment as \
                     the director in DR mode; check it is up, or set `mac:` for it in the config"
                );
            }
            if now >= next_poke {
                poke(addr);
                next_poke = now + Duration::from_millis(500);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Make the kernel resolve the neighbour toward `addr` (a datagram to the discard port).
pub fn poke(addr: IpAddr) {
    let bind: IpAddr = match addr {
        IpAddr::V4(_) => std::net::Ipv4Addr::UNSPECIFIED.into(),
        IpAddr::V6(_) => std::net::Ipv6Addr::UNSPECIFIED.into(),
    };
    // Errors are fine: only the neighbour lookup it causes matters.
    if let Ok(sock) = std::net::UdpSocket::bind((bind, 0)) {
        let _ = sock.send_to(&[], (addr, 9));
    }
}
