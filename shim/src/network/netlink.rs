//! The netlink requests pod networking makes, on a handle inside the pod's network namespace:
//! reading links, addresses and routes, bringing a link up, and the tc redirection between a veth
//! and its tap (an ingress qdisc on each, a match-all u32 filter with a mirred egress redirect to
//! the other: what Kata calls `tcfilter`).

use std::net::IpAddr;

use futures_util::TryStreamExt;
use rtnetlink::packet_route::address::AddressAttribute;
use rtnetlink::packet_route::link::{
    InfoKind, LinkAttribute, LinkFlags, LinkInfo, LinkLayerType, LinkMessage,
};
use rtnetlink::packet_route::route::{RouteAddress, RouteAttribute, RouteMessage, RouteProtocol, RouteType};
use rtnetlink::packet_route::tc::TcHandle;
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::{Handle, LinkUnspec, RouteMessageBuilder};

use super::NetworkError;

/// The main routing table.
const MAIN_TABLE: u32 = 254;
/// `ETH_P_ALL` in network byte order, as tc filters take their protocol (`tc ... protocol all`):
/// the filters match every protocol.
const ETH_P_ALL: u16 = 0x0003_u16.to_be();
/// The parent handle of filters on an ingress qdisc (`ffff:`).
const INGRESS_PARENT: u32 = 0xffff_0000;

/// A link as pod networking needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    pub mac: Option<[u8; 6]>,
    pub mtu: u32,
    pub is_up: bool,
    pub is_loopback: bool,
    pub is_tun: bool,
}

impl Link {
    /// Whether this is a pod interface to carry into the guest: up, with a unicast MAC, and not a
    /// loopback or a tap (the kernel's fallback tunnels, `gretap0` and the like, are down and
    /// have a zero MAC).
    pub fn is_pod_interface(&self) -> bool {
        let unicast = self.mac.is_some_and(|mac| mac != [0; 6] && mac[0] & 1 == 0);
        self.is_up && unicast && !self.is_loopback && !self.is_tun
    }
}

/// A route of the main table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteEntry {
    pub ipv6: bool,
    pub destination: Option<(IpAddr, u8)>,
    pub gateway: Option<IpAddr>,
    pub source: Option<IpAddr>,
    pub oif: Option<u32>,
    pub scope: u8,
    /// `metric`: two default routes differ by it.
    pub priority: u32,
    /// An ECMP route (next hops in RTA_MULTIPATH, no single device).
    pub multipath: bool,
    /// Made by the kernel for an address (the guest's kernel makes its own).
    pub from_kernel: bool,
}

fn failed(what: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> NetworkError {
    let what = what.into();
    move |source| NetworkError::Netlink { what, source }
}

/// Every link of the namespace.
pub async fn links(handle: &Handle) -> Result<Vec<Link>, NetworkError> {
    let messages: Vec<LinkMessage> =
        handle.link().get().execute().try_collect().await.map_err(failed("listing links"))?;
    Ok(messages.iter().map(link_of).collect())
}

fn link_of(message: &LinkMessage) -> Link {
    let mut link = Link {
        index: message.header.index,
        name: String::new(),
        mac: None,
        mtu: 0,
        is_up: message.header.flags.contains(LinkFlags::Up),
        is_loopback: message.header.link_layer_type == LinkLayerType::Loopback,
        is_tun: false,
    };
    for attribute in &message.attributes {
        match attribute {
            LinkAttribute::IfName(name) => link.name.clone_from(name),
            LinkAttribute::Address(bytes) => link.mac = <[u8; 6]>::try_from(bytes.as_slice()).ok(),
            LinkAttribute::Mtu(mtu) => link.mtu = *mtu,
            LinkAttribute::LinkInfo(infos) => {
                link.is_tun |= infos.iter().any(|info| matches!(info, LinkInfo::Kind(InfoKind::Tun)));
            }
            _ => {}
        }
    }
    link
}

/// The addresses of link `index` (IPv6 link-local ones left out: every NIC makes its own).
pub async fn addresses(handle: &Handle, index: u32) -> Result<Vec<(IpAddr, u8)>, NetworkError> {
    let messages: Vec<_> = handle
        .address()
        .get()
        .set_link_index_filter(index)
        .execute()
        .try_collect()
        .await
        .map_err(failed(format!("listing the addresses of link {index}")))?;
    let mut found = Vec::new();
    for message in messages {
        // IFA_LOCAL is the interface's own address; IFA_ADDRESS is the peer's on point-to-point
        // links and the same as IFA_LOCAL elsewhere.
        let local = message.attributes.iter().find_map(|a| match a {
            AddressAttribute::Local(address) => Some(*address),
            _ => None,
        });
        let address = local.or_else(|| {
            message.attributes.iter().find_map(|a| match a {
                AddressAttribute::Address(address) => Some(*address),
                _ => None,
            })
        });
        if let Some(address) = address.filter(|address| !is_link_local(address)) {
            found.push((address, message.header.prefix_len));
        }
    }
    Ok(found)
}

/// Whether `address` is link-local (169.254/16, fe80::/10): every NIC makes its own.
pub fn is_link_local(address: &IpAddr) -> bool {
    match address {
        IpAddr::V4(v4) => v4.is_link_local(),
        IpAddr::V6(v6) => v6.segments()[0] & 0xffc0 == 0xfe80,
    }
}

/// The unicast routes of the main table, IPv4 and IPv6.
pub async fn routes(handle: &Handle) -> Result<Vec<RouteEntry>, NetworkError> {
    let mut found = Vec::new();
    let requests = [
        RouteMessageBuilder::<std::net::Ipv4Addr>::new().build(),
        RouteMessageBuilder::<std::net::Ipv6Addr>::new().build(),
    ];
    for request in requests {
        let messages: Vec<RouteMessage> =
            handle.route().get(request).execute().try_collect().await.map_err(failed("listing routes"))?;
        found.extend(messages.iter().filter_map(route_of));
    }
    Ok(found)
}

fn route_of(message: &RouteMessage) -> Option<RouteEntry> {
    let mut table = u32::from(message.header.table);
    let mut entry = RouteEntry {
        ipv6: message.header.address_family == AddressFamily::Inet6,
        destination: None,
        gateway: None,
        source: None,
        oif: None,
        scope: u8::from(message.header.scope),
        priority: 0,
        multipath: false,
        from_kernel: message.header.protocol == RouteProtocol::Kernel,
    };
    for attribute in &message.attributes {
        match attribute {
            RouteAttribute::Table(id) => table = *id,
            RouteAttribute::Destination(address) => {
                entry.destination = ip_of(address).map(|ip| (ip, message.header.destination_prefix_length));
            }
            RouteAttribute::Gateway(address) => entry.gateway = ip_of(address),
            RouteAttribute::PrefSource(address) => entry.source = ip_of(address),
            RouteAttribute::Oif(index) => entry.oif = Some(*index),
            RouteAttribute::Priority(priority) => entry.priority = *priority,
            RouteAttribute::MultiPath(_) => entry.multipath = true,
            _ => {}
        }
    }
    (table == MAIN_TABLE && message.header.kind == RouteType::Unicast).then_some(entry)
}

fn ip_of(address: &RouteAddress) -> Option<IpAddr> {
    match address {
        RouteAddress::Inet(v4) => Some(IpAddr::V4(*v4)),
        RouteAddress::Inet6(v6) => Some(IpAddr::V6(*v6)),
        _ => None,
    }
}

/// Sets link `index` up with `mtu`.
pub async fn set_up(handle: &Handle, index: u32, mtu: u32) -> Result<(), NetworkError> {
    let message = LinkUnspec::new_with_index(index).mtu(mtu).up().build();
    handle.link().set(message).execute().await.map_err(failed(format!("setting link {index} up")))
}

/// Redirects everything arriving on `from` to leave through `to`, and back. On error neither link
/// keeps an ingress qdisc of ours.
pub async fn redirect_both_ways(handle: &Handle, from: u32, to: u32) -> Result<(), NetworkError> {
    for (source, target) in [(from, to), (to, from)] {
        if let Err(err) = redirect(handle, source, target).await {
            for index in [from, to] {
                if let Err(cleanup) = remove_ingress(handle, index).await {
                    tracing::warn!(link = index, %cleanup, "undoing a half-made tc redirection");
                }
            }
            return Err(err);
        }
    }
    Ok(())
}

async fn redirect(handle: &Handle, source: u32, target: u32) -> Result<(), NetworkError> {
    handle
        .qdisc()
        .add(source as i32)
        .ingress()
        .execute()
        .await
        .map_err(failed(format!("adding an ingress qdisc to link {source}")))?;
    handle
        .traffic_filter(source as i32)
        .add()
        .parent(INGRESS_PARENT)
        .protocol(ETH_P_ALL)
        .redirect(target)
        .map_err(failed("building the redirect filter"))?
        .execute()
        .await
        .map_err(failed(format!("redirecting link {source} to link {target}")))
}

/// Removes the ingress qdisc of link `index` (and with it the redirect filter); a link or qdisc
/// that is already gone is not an error.
pub async fn remove_ingress(handle: &Handle, index: u32) -> Result<(), NetworkError> {
    let mut request = handle.qdisc().del(index as i32);
    request.message_mut().header.parent = TcHandle::INGRESS;
    request.message_mut().header.handle = TcHandle::from(INGRESS_PARENT);
    match request.execute().await {
        Ok(()) => Ok(()),
        Err(rtnetlink::Error::NetlinkError(message))
            if matches!(message.raw_code().abs(), libc::ENOENT | libc::ENODEV | libc::EINVAL) =>
        {
            Ok(())
        }
        Err(source) => {
            Err(NetworkError::Netlink { what: format!("removing the ingress qdisc of link {index}"), source })
        }
    }
}

/// Whether link `index` has an ingress qdisc.
pub async fn has_ingress(handle: &Handle, index: u32) -> Result<bool, NetworkError> {
    let qdiscs: Vec<_> = handle
        .qdisc()
        .get()
        .index(index as i32)
        .ingress()
        .execute()
        .try_collect()
        .await
        .map_err(failed("listing qdiscs"))?;
    Ok(qdiscs.iter().any(|q| q.header.index == index as i32 && q.header.parent == TcHandle::INGRESS))
}
