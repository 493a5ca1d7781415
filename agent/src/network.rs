//! Pod networking inside the guest (UpdateInterface, UpdateRoutes) and the guest's loopback.
//!
//! The shim reads the pod's interface, addresses and routes from the pod's network namespace on the
//! host and sends them here; the guest NIC is found by its MAC (the VMM gave it the pod's), then
//! renamed, addressed and routed over rtnetlink. A request is checked whole before anything
//! changes, and every error names the field. In host mode (the test seam) only the check runs: the
//! answer is what the guest would be asked to become, and the host's network is never touched.
//!
//! The netlink work takes a [`Handle`], so a test can run it in a network namespace of its own.

use std::fmt::Display;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use futures_util::TryStreamExt;
use husk_protocols::agent::{
    Interface, IpAddress, Route, Routes, UpdateInterfaceRequest, UpdateRoutesRequest,
};
use rtnetlink::packet_route::address::{AddressAttribute, AddressFlags, AddressMessage};
use rtnetlink::packet_route::link::{LinkAttribute, LinkFlags, LinkLayerType, LinkMessage};
use rtnetlink::packet_route::route::{RouteMessage, RouteScope};
use rtnetlink::{Handle, LinkUnspec, RouteMessageBuilder};

use crate::container::CallError;
use crate::sandbox::Place;

/// Longest interface name the kernel takes (IFNAMSIZ less the NUL).
const IFNAME_MAX: usize = 15;
/// MTUs a request may set: IPv4's minimum (RFC 791) up to what a link can carry.
const MTU_RANGE: std::ops::RangeInclusive<u32> = 68..=65535;
/// IPv6's minimum MTU (RFC 8200): below it the kernel turns IPv6 off on the link.
const IPV6_MIN_MTU: u32 = 1280;
/// RT_SCOPE_LINK: the destination is on the link itself.
const SCOPE_LINK: u8 = 253;

/// An UpdateInterface request, checked: what the guest NIC is to become.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WantedInterface {
    pub name: String,
    pub mac: [u8; 6],
    /// 0: leave the NIC's MTU as it is.
    pub mtu: u32,
    pub addresses: Vec<(IpAddr, u8)>,
}

/// One route of an UpdateRoutes request, checked.
#[derive(Debug, Clone, PartialEq)]
pub struct WantedRoute {
    /// Its index in the request, so errors can name `routes[i]`.
    pub position: usize,
    pub destination: IpAddr,
    pub prefix_length: u8,
    pub gateway: Option<IpAddr>,
    pub device: Option<String>,
    pub source: Option<IpAddr>,
    pub scope: u8,
    /// Its priority (RTA_PRIORITY); 0: the kernel's default (0 for IPv4, 1024 for IPv6).
    pub metric: u32,
    /// The route as the request had it: the answer repeats it.
    pub request: Route,
}

/// A netlink connection in the calling thread's network namespace; its reader task ends with it.
#[derive(Debug)]
pub struct Netlink {
    pub handle: Handle,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Netlink {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Opens a netlink connection; must be called on a tokio runtime (it spawns the reader task).
pub fn connect() -> Result<Netlink, CallError> {
    let (connection, handle, _unsolicited) = rtnetlink::new_connection()
        .map_err(|err| CallError::Internal(format!("opening a netlink socket: {err}")))?;
    Ok(Netlink { handle, task: tokio::spawn(connection) })
}

/// UpdateInterface: the guest NIC with `hw_addr` gets the name, MTU and addresses asked for.
/// Answers the interface as the guest now has it (in host mode: as asked).
pub async fn update_interface(
    request: &UpdateInterfaceRequest,
    place: Place,
) -> Result<Interface, CallError> {
    let wanted = check_interface(request)?;
    if place == Place::Host {
        return Ok(request.interface.clone().unwrap_or_default());
    }
    let netlink = connect()?;
    apply_interface(&netlink.handle, &wanted).await
}

/// UpdateRoutes: adds (or replaces) the routes in the guest's main table. Answers the routes
/// applied, in the order applied (in host mode: the ones that would be).
pub async fn update_routes(request: &UpdateRoutesRequest, place: Place) -> Result<Routes, CallError> {
    let wanted = check_routes(request)?;
    if place == Place::Host {
        return Ok(answer(&wanted));
    }
    let netlink = connect()?;
    apply_routes(&netlink.handle, &wanted).await
}

/// Brings the guest's `lo` up: the kernel leaves it down, and the pod's containers, which share
/// the guest's network namespace, expect 127.0.0.1 to answer. Runs before the API's runtime
/// exists, so on a small runtime of its own.
pub fn loopback_up() -> Result<(), CallError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .map_err(|err| CallError::Internal(format!("starting a runtime for netlink: {err}")))?;
    runtime.block_on(async {
        let netlink = connect()?;
        let up = LinkUnspec::new_with_name("lo").up().build();
        set_link(&netlink.handle, up, "setting lo up").await
    })
}

fn invalid(message: String) -> CallError {
    CallError::InvalidArgument(message)
}

/// Checks an UpdateInterface request whole, before anything in the guest changes.
pub fn check_interface(request: &UpdateInterfaceRequest) -> Result<WantedInterface, CallError> {
    let Some(interface) = request.interface.as_ref() else {
        return Err(invalid("interface is missing".into()));
    };
    let mac = parse_mac(&interface.hw_addr).ok_or_else(|| {
        invalid(format!(
            "interface.hw_addr {:?}: six colon-separated hex bytes, e.g. 52:54:00:12:34:56",
            interface.hw_addr
        ))
    })?;
    check_nic_mac(&interface.hw_addr, mac)?;
    check_link_name("interface.name", &interface.name)?;
    let mtu = interface.mtu;
    if mtu != 0 && !MTU_RANGE.contains(&mtu) {
        return Err(invalid(format!("interface.mtu {mtu}: 0 (leave as is) or 68..=65535")));
    }
    let addresses = interface
        .addresses
        .iter()
        .enumerate()
        .map(|(i, address)| check_address(&format!("interface.addresses[{i}]"), address))
        .collect::<Result<Vec<_>, _>>()?;
    if mtu != 0 && mtu < IPV6_MIN_MTU && addresses.iter().any(|(ip, _)| ip.is_ipv6()) {
        return Err(invalid(format!(
            "interface.mtu {mtu}: below {IPV6_MIN_MTU}, the least IPv6 works with, and the interface has IPv6 addresses"
        )));
    }
    Ok(WantedInterface { name: interface.name.clone(), mac, mtu, addresses })
}

/// A MAC a NIC of the guest can have: not all zero (the guest's `lo` has that one, and the NIC is
/// found by its MAC) and not multicast (the first octet's low bit), broadcast included.
fn check_nic_mac(text: &str, mac: [u8; 6]) -> Result<(), CallError> {
    let what = match mac {
        [0, 0, 0, 0, 0, 0] => "all zero, no NIC's MAC (the guest's lo has it)",
        [first, ..] if first & 1 == 1 => "a multicast MAC (the first octet's low bit is set), no NIC's",
        _ => return Ok(()),
    };
    Err(invalid(format!("interface.hw_addr {text:?}: {what}")))
}

fn check_address(field: &str, address: &IpAddress) -> Result<(IpAddr, u8), CallError> {
    let ip = unicast(&format!("{field}.address"), &address.address)?;
    // The guest's lo has the loopback networks; a NIC with one of them would steal it.
    if ip.to_canonical().is_loopback() {
        return Err(invalid(format!("{field}.address {:?}: a loopback address", address.address)));
    }
    let max = max_prefix(ip);
    match u8::try_from(address.prefix_length) {
        Ok(length) if length <= max => Ok((ip, length)),
        _ => Err(invalid(format!("{field}.prefix_length {} > {max}", address.prefix_length))),
    }
}

/// Checks an UpdateRoutes request whole, and puts its routes in the order to apply them: those
/// without a gateway first (a gateway must be reachable when its route is added). IPv6 link-local
/// routes are left out: the guest's kernel makes its own.
pub fn check_routes(request: &UpdateRoutesRequest) -> Result<Vec<WantedRoute>, CallError> {
    let routes = request.routes.as_ref().map_or(&[][..], |routes| routes.routes.as_slice());
    let mut wanted = Vec::with_capacity(routes.len());
    for (position, route) in routes.iter().enumerate() {
        let route = check_route(position, route)?;
        if !is_ipv6_link_local(route.destination) {
            wanted.push(route);
        }
    }
    wanted.sort_by_key(|route| route.gateway.is_some());
    Ok(wanted)
}

fn check_route(position: usize, route: &Route) -> Result<WantedRoute, CallError> {
    let field = format!("routes[{position}]");
    let gateway = optional_ip(&format!("{field}.gateway"), &route.gateway)?;
    let source = optional_ip(&format!("{field}.source"), &route.source)?;
    let (destination, prefix_length) = match route.destination.as_str() {
        // The family of "default" is its gateway's (or its source's); IPv4 without either.
        "default" => match gateway.or(source) {
            Some(IpAddr::V6(_)) => (IpAddr::V6(Ipv6Addr::UNSPECIFIED), 0),
            _ => (IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0),
        },
        cidr => parse_cidr(&format!("{field}.destination"), cidr)?,
    };
    for (name, ip) in [("gateway", gateway), ("source", source)] {
        if let Some(ip) = ip.filter(|ip| ip.is_ipv4() != destination.is_ipv4()) {
            return Err(invalid(format!(
                "{field}.{name} {ip}: {}, but destination {:?} is {}",
                family(ip),
                route.destination,
                family(destination)
            )));
        }
    }
    let device = match route.device.as_str() {
        "" => None,
        name => {
            check_link_name(&format!("{field}.device"), name)?;
            Some(name.to_owned())
        }
    };
    let scope =
        u8::try_from(route.scope).map_err(|_| invalid(format!("{field}.scope {} > 255", route.scope)))?;
    if gateway.is_some() && scope >= SCOPE_LINK {
        return Err(invalid(format!(
            "{field}.scope {scope}: a route through a gateway needs a scope below {SCOPE_LINK} (link)"
        )));
    }
    if gateway.is_none() && device.is_none() {
        return Err(invalid(format!("{field}: neither gateway nor device, nowhere to send it")));
    }
    Ok(WantedRoute {
        position,
        destination,
        prefix_length,
        gateway,
        device,
        source,
        scope,
        metric: route.metric,
        request: route.clone(),
    })
}

/// A link name the kernel takes and a shell can quote without surprises.
fn check_link_name(field: &str, name: &str) -> Result<(), CallError> {
    let sane = (1..=IFNAME_MAX).contains(&name.len())
        && name != "."
        && name != ".."
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    match sane {
        true => Ok(()),
        false => {
            Err(invalid(format!("{field} {name:?}: 1 to {IFNAME_MAX} bytes of [A-Za-z0-9_.-], not . or ..")))
        }
    }
}

/// An address an interface, gateway or source can have: not unspecified, multicast or IPv4's
/// limited broadcast (255.255.255.255).
fn unicast(field: &str, text: &str) -> Result<IpAddr, CallError> {
    let ip: IpAddr = text.parse().map_err(|_| invalid(format!("{field} {text:?}: not an IP address")))?;
    // An IPv4-mapped IPv6 address is judged as the IPv4 one it maps.
    let canonical = ip.to_canonical();
    let broadcast = canonical == IpAddr::V4(Ipv4Addr::BROADCAST);
    match canonical.is_unspecified() || canonical.is_multicast() || broadcast {
        true => Err(invalid(format!("{field} {text:?}: not a unicast address"))),
        false => Ok(ip),
    }
}

fn optional_ip(field: &str, text: &str) -> Result<Option<IpAddr>, CallError> {
    match text {
        "" => Ok(None),
        text => unicast(field, text).map(Some),
    }
}

/// `ADDRESS/LENGTH` naming a network (no host bits set, as the kernel requires of IPv4 routes).
fn parse_cidr(field: &str, text: &str) -> Result<(IpAddr, u8), CallError> {
    let bad = || invalid(format!("{field} {text:?}: \"default\" or a CIDR such as 10.88.0.0/16"));
    let (address, length) = text.split_once('/').ok_or_else(bad)?;
    let address: IpAddr = address.parse().map_err(|_| bad())?;
    let length: u8 = length.parse().map_err(|_| bad())?;
    let max = max_prefix(address);
    if length > max {
        return Err(invalid(format!("{field} {text:?}: prefix length {length} > {max}")));
    }
    let network = network_of(address, length);
    if network != address {
        return Err(invalid(format!("{field} {text:?}: host bits set (the network is {network}/{length})")));
    }
    Ok((address, length))
}

fn max_prefix(ip: IpAddr) -> u8 {
    match ip {
        IpAddr::V4(_) => 32,
        IpAddr::V6(_) => 128,
    }
}

fn family(ip: IpAddr) -> &'static str {
    match ip {
        IpAddr::V4(_) => "IPv4",
        IpAddr::V6(_) => "IPv6",
    }
}

/// `address` with all but its first `length` bits cleared.
fn network_of(address: IpAddr, length: u8) -> IpAddr {
    match address {
        IpAddr::V4(v4) => {
            let mask = u32::MAX.checked_shl(32 - u32::from(length)).unwrap_or(0);
            IpAddr::V4(Ipv4Addr::from(u32::from(v4) & mask))
        }
        IpAddr::V6(v6) => {
            let mask = u128::MAX.checked_shl(128 - u32::from(length)).unwrap_or(0);
            IpAddr::V6(Ipv6Addr::from(u128::from(v6) & mask))
        }
    }
}

/// fe80::/10: what the kernel gives every IPv6 link by itself.
fn is_ipv6_link_local(ip: IpAddr) -> bool {
    matches!(ip, IpAddr::V6(v6) if v6.segments()[0] & 0xffc0 == 0xfe80)
}

/// `aa:bb:cc:dd:ee:ff`, either case.
fn parse_mac(text: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = text.split(':');
    for byte in &mut mac {
        let part =
            parts.next().filter(|part| part.len() == 2 && part.bytes().all(|b| b.is_ascii_hexdigit()))?;
        *byte = u8::from_str_radix(part, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

fn format_mac(mac: &[u8]) -> String {
    mac.iter().map(|byte| format!("{byte:02x}")).collect::<Vec<_>>().join(":")
}

/// A netlink failure as a call error; the kernel's errno reads best on its own.
fn failed(what: impl Display) -> impl FnOnce(rtnetlink::Error) -> CallError {
    move |err| match err {
        rtnetlink::Error::NetlinkError(message) => CallError::Internal(format!("{what}: {message}")),
        other => CallError::Internal(format!("{what}: {other}")),
    }
}

/// What UpdateInterface needs to know of a guest link.
#[derive(Debug)]
struct Link {
    index: u32,
    name: String,
    mac: Vec<u8>,
    mtu: u32,
    /// IFF_LOOPBACK, or a loopback link layer: never the NIC a request means, whatever its MAC.
    loopback: bool,
}

impl Link {
    fn of(message: &LinkMessage) -> Link {
        let loopback = message.header.flags.contains(LinkFlags::Loopback)
            || message.header.link_layer_type == LinkLayerType::Loopback;
        let mut link =
            Link { index: message.header.index, name: String::new(), mac: Vec::new(), mtu: 0, loopback };
        for attribute in &message.attributes {
            match attribute {
                LinkAttribute::IfName(name) => link.name.clone_from(name),
                LinkAttribute::Address(mac) => link.mac.clone_from(mac),
                LinkAttribute::Mtu(mtu) => link.mtu = *mtu,
                _ => {}
            }
        }
        link
    }
}

async fn list_links(handle: &Handle) -> Result<Vec<Link>, CallError> {
    let messages: Vec<LinkMessage> =
        handle.link().get().execute().try_collect().await.map_err(failed("listing the guest's links"))?;
    Ok(messages.iter().map(Link::of).collect())
}

/// `lo 00:00:00:00:00:00, eth0 52:54:00:12:34:56`: what an error shows of the guest's links.
fn seen<'a>(links: impl IntoIterator<Item = &'a Link>) -> String {
    let shown: Vec<String> = links.into_iter().map(Link::shown).collect();
    shown.join(", ")
}

impl Link {
    /// `eth0 52:54:00:12:34:56`, as [`seen`] shows it.
    fn shown(&self) -> String {
        format!("{} {}", self.name, format_mac(&self.mac))
    }
}

async fn set_link(handle: &Handle, message: LinkMessage, what: &str) -> Result<(), CallError> {
    handle.link().set(message).execute().await.map_err(failed(what))
}

/// Makes the NIC with `wanted.mac` what `wanted` says; answers it as the kernel then reports it.
pub async fn apply_interface(handle: &Handle, wanted: &WantedInterface) -> Result<Interface, CallError> {
    let links = list_links(handle).await?;
    let nic = find_nic(&links, wanted.mac)?;
    let index = nic.index;
    if nic.name != wanted.name {
        // Two NICs swapping names land here too: the request cannot say which to rename first.
        if let Some(other) = links.iter().find(|link| link.name == wanted.name) {
            return Err(CallError::AlreadyExists(format!(
                "interface.name {:?}: link {} ({}) holds that name, so the NIC {} cannot take it",
                wanted.name,
                other.index,
                other.shown(),
                nic.shown()
            )));
        }
        // The kernel renames only links that are down.
        let down = LinkUnspec::new_with_index(index).down().build();
        set_link(handle, down, &format!("setting {} down", nic.name)).await?;
        let rename = LinkUnspec::new_with_index(index).name(wanted.name.clone()).build();
        set_link(handle, rename, &format!("renaming {} to {}", nic.name, wanted.name)).await?;
    }
    if wanted.mtu != 0 {
        let mtu = LinkUnspec::new_with_index(index).mtu(wanted.mtu).build();
        set_link(handle, mtu, &format!("setting the MTU of {} to {}", wanted.name, wanted.mtu)).await?;
    }
    let up = LinkUnspec::new_with_index(index).up().build();
    set_link(handle, up, &format!("setting {} up", wanted.name)).await?;
    for &(ip, length) in &wanted.addresses {
        add_address(handle, index, ip, length).await?;
    }
    read_interface(handle, index).await
}

/// The one link, loopback aside, with `mac`.
fn find_nic(links: &[Link], mac: [u8; 6]) -> Result<&Link, CallError> {
    let matching: Vec<&Link> = links.iter().filter(|link| !link.loopback && link.mac == mac).collect();
    match matching[..] {
        [nic] => Ok(nic),
        [] => Err(CallError::NotFound(format!(
            "interface.hw_addr {}: no guest NIC has it (seen: {})",
            format_mac(&mac),
            seen(links)
        ))),
        _ => Err(CallError::FailedPrecondition(format!(
            "interface.hw_addr {}: {} guest links have it, which one is meant is not known: {}",
            format_mac(&mac),
            matching.len(),
            seen(matching.iter().copied())
        ))),
    }
}

async fn add_address(handle: &Handle, index: u32, ip: IpAddr, length: u8) -> Result<(), CallError> {
    let mut request = handle.address().add(index, ip, length).replace();
    if ip.is_ipv6() {
        // The host already checked the pod's address for duplicates (CNI, on the veth it comes
        // from); a second DAD here would only keep it tentative, so unusable by the containers
        // about to start, for a second or more.
        request.message_mut().attributes.push(AddressAttribute::Flags(AddressFlags::Nodad));
    }
    request.execute().await.map_err(failed(format!("adding address {ip}/{length}")))
}

/// The interface with `index` as the kernel has it: name, MAC, MTU and addresses other than the
/// IPv6 link-local ones (those are the kernel's, not the pod's).
async fn read_interface(handle: &Handle, index: u32) -> Result<Interface, CallError> {
    let links: Vec<LinkMessage> = handle
        .link()
        .get()
        .match_index(index)
        .execute()
        .try_collect()
        .await
        .map_err(failed(format!("reading link {index} back")))?;
    let Some(link) = links.first().map(Link::of) else {
        return Err(CallError::Internal(format!("link {index} vanished while being set up")));
    };
    let messages: Vec<AddressMessage> = handle
        .address()
        .get()
        .set_link_index_filter(index)
        .execute()
        .try_collect()
        .await
        .map_err(failed(format!("reading the addresses of {} back", link.name)))?;
    let addresses = messages
        .iter()
        .filter_map(address_of)
        .filter(|&(ip, _)| !is_ipv6_link_local(ip))
        .map(|(ip, length)| IpAddress {
            address: ip.to_string(),
            prefix_length: length.into(),
            ..Default::default()
        })
        .collect();
    Ok(Interface {
        name: link.name,
        hw_addr: format_mac(&link.mac),
        mtu: link.mtu,
        addresses,
        ..Default::default()
    })
}

/// The interface's own address in `message`: IFA_LOCAL where there is one (on IPv4 IFA_ADDRESS
/// is the peer's on point-to-point links), else IFA_ADDRESS.
fn address_of(message: &AddressMessage) -> Option<(IpAddr, u8)> {
    let local = message.attributes.iter().find_map(|attribute| match attribute {
        AddressAttribute::Local(ip) => Some(*ip),
        _ => None,
    });
    let address = message.attributes.iter().find_map(|attribute| match attribute {
        AddressAttribute::Address(ip) => Some(*ip),
        _ => None,
    });
    local.or(address).map(|ip| (ip, message.header.prefix_len))
}

/// Adds (or replaces) `routes` in the main table, in the order given; every device is resolved
/// before the first route changes.
pub async fn apply_routes(handle: &Handle, routes: &[WantedRoute]) -> Result<Routes, CallError> {
    let links = list_links(handle).await?;
    let devices = routes.iter().map(|route| device_index(&links, route)).collect::<Result<Vec<_>, _>>()?;
    for (route, device) in routes.iter().zip(devices) {
        let message = route_message(route, device)?;
        handle.route().add(message).replace().execute().await.map_err(failed(format!(
            "routes[{}]: adding {}",
            route.position,
            describe(route)
        )))?;
    }
    Ok(answer(routes))
}

fn device_index(links: &[Link], route: &WantedRoute) -> Result<Option<u32>, CallError> {
    let Some(device) = &route.device else { return Ok(None) };
    match links.iter().find(|link| link.name == *device) {
        Some(link) => Ok(Some(link.index)),
        None => Err(CallError::NotFound(format!(
            "routes[{}].device {device:?}: no such link in the guest (seen: {})",
            route.position,
            seen(links)
        ))),
    }
}

fn route_message(route: &WantedRoute, device: Option<u32>) -> Result<RouteMessage, CallError> {
    let fail = |err| CallError::Internal(format!("routes[{}]: {err}", route.position));
    let mut builder = RouteMessageBuilder::<IpAddr>::new()
        .destination_prefix(route.destination, route.prefix_length)
        .map_err(fail)?
        .scope(RouteScope::from(route.scope));
    if let Some(gateway) = route.gateway {
        builder = builder.gateway(gateway).map_err(fail)?;
    }
    if let Some(source) = route.source {
        builder = builder.pref_source(source).map_err(fail)?;
    }
    if let Some(index) = device {
        builder = builder.output_interface(index);
    }
    // With NLM_F_REPLACE the kernel replaces the route with the same destination, table, TOS and
    // priority: a distinct metric keeps a second default route beside the first.
    if route.metric != 0 {
        builder = builder.priority(route.metric);
    }
    Ok(builder.build())
}

/// The route as `ip route` would print it, for errors.
fn describe(route: &WantedRoute) -> String {
    let mut text = format!("{}/{}", route.destination, route.prefix_length);
    if let Some(gateway) = route.gateway {
        text += &format!(" via {gateway}");
    }
    if let Some(device) = &route.device {
        text += &format!(" dev {device}");
    }
    if let Some(source) = route.source {
        text += &format!(" src {source}");
    }
    text += &format!(" scope {}", route.scope);
    if route.metric != 0 {
        text += &format!(" metric {}", route.metric);
    }
    text
}

/// The routes as the request had them, metric and all.
fn answer(routes: &[WantedRoute]) -> Routes {
    Routes { routes: routes.iter().map(|route| route.request.clone()).collect(), ..Default::default() }
}

#[cfg(test)]
mod tests {
    use nix::errno::Errno;
    use nix::sched::CloneFlags;
    use rtnetlink::packet_route::route::{RouteAddress, RouteAttribute, RouteHeader};
    use rtnetlink::LinkVeth;

    use super::*;

    fn interface(name: &str, hw_addr: &str, mtu: u32, addresses: &[(&str, u32)]) -> UpdateInterfaceRequest {
        let addresses = addresses
            .iter()
            .map(|&(address, prefix_length)| IpAddress {
                address: address.into(),
                prefix_length,
                ..Default::default()
            })
            .collect();
        let interface =
            Interface { name: name.into(), hw_addr: hw_addr.into(), mtu, addresses, ..Default::default() };
        UpdateInterfaceRequest { interface: Some(interface).into(), ..Default::default() }
    }

    fn route(destination: &str, gateway: &str, device: &str, scope: u32) -> Route {
        Route {
            destination: destination.into(),
            gateway: gateway.into(),
            device: device.into(),
            scope,
            ..Default::default()
        }
    }

    fn routes(routes: Vec<Route>) -> UpdateRoutesRequest {
        UpdateRoutesRequest {
            routes: Some(Routes { routes, ..Default::default() }).into(),
            ..Default::default()
        }
    }

    fn invalid_argument<T: std::fmt::Debug>(result: Result<T, CallError>) -> String {
        match result {
            Err(CallError::InvalidArgument(message)) => message,
            other => panic!("expected InvalidArgument, got {other:?}"),
        }
    }

    const GOOD_MAC: &str = "52:54:00:12:34:56";

    #[test]
    fn interface_errors_name_the_field() {
        let cases: &[(UpdateInterfaceRequest, &str)] = &[
            (UpdateInterfaceRequest::default(), "interface is missing"),
            (interface("eth0", "zz", 0, &[]), "interface.hw_addr \"zz\": "),
            (interface("eth0", "52:54:00:12:34", 0, &[]), "interface.hw_addr \"52:54:00:12:34\": "),
            (interface("eth0", "52:54:00:12:34:5g", 0, &[]), "interface.hw_addr "),
            (
                interface("eth0", "00:00:00:00:00:00", 0, &[]),
                "interface.hw_addr \"00:00:00:00:00:00\": all zero",
            ),
            (
                interface("eth0", "01:00:5e:00:00:01", 0, &[]),
                "interface.hw_addr \"01:00:5e:00:00:01\": a multicast MAC",
            ),
            (
                interface("eth0", "33:33:00:00:00:01", 0, &[]),
                "interface.hw_addr \"33:33:00:00:00:01\": a multicast MAC",
            ),
            (
                interface("eth0", "FF:FF:FF:FF:FF:FF", 0, &[]),
                "interface.hw_addr \"FF:FF:FF:FF:FF:FF\": a multicast MAC",
            ),
            (interface("", GOOD_MAC, 0, &[]), "interface.name \"\": "),
            (interface("sixteen-bytes-xx", GOOD_MAC, 0, &[]), "interface.name \"sixteen-bytes-xx\": "),
            (interface("eth/0", GOOD_MAC, 0, &[]), "interface.name \"eth/0\": "),
            (interface("..", GOOD_MAC, 0, &[]), "interface.name \"..\": "),
            (interface("eth0", GOOD_MAC, 67, &[]), "interface.mtu 67: "),
            (interface("eth0", GOOD_MAC, 65536, &[]), "interface.mtu 65536: "),
            (
                interface("eth0", GOOD_MAC, 0, &[("10.88.0.5", 16), ("10.88.0.6", 40)]),
                "interface.addresses[1].prefix_length 40 > 32",
            ),
            (
                interface("eth0", GOOD_MAC, 0, &[("fd00::5", 129)]),
                "interface.addresses[0].prefix_length 129 > 128",
            ),
            (
                interface("eth0", GOOD_MAC, 0, &[("10.88.0.300", 16)]),
                "interface.addresses[0].address \"10.88.0.300\": not an IP",
            ),
            (
                interface("eth0", GOOD_MAC, 0, &[("224.0.0.1", 4)]),
                "interface.addresses[0].address \"224.0.0.1\": not a unicast",
            ),
            (interface("eth0", GOOD_MAC, 1000, &[("fd00::5", 64)]), "interface.mtu 1000: below 1280"),
            (
                interface("eth0", GOOD_MAC, 0, &[("10.88.0.5", 16), ("127.0.0.1", 8)]),
                "interface.addresses[1].address \"127.0.0.1\": a loopback address",
            ),
            (
                interface("eth0", GOOD_MAC, 0, &[("127.1.2.3", 16)]),
                "interface.addresses[0].address \"127.1.2.3\": a loopback address",
            ),
            (
                interface("eth0", GOOD_MAC, 0, &[("::1", 128)]),
                "interface.addresses[0].address \"::1\": a loopback address",
            ),
            (
                interface("eth0", GOOD_MAC, 0, &[("::ffff:127.0.0.1", 104)]),
                "interface.addresses[0].address \"::ffff:127.0.0.1\": a loopback address",
            ),
            (
                interface("eth0", GOOD_MAC, 0, &[("255.255.255.255", 32)]),
                "interface.addresses[0].address \"255.255.255.255\": not a unicast",
            ),
            (
                interface("eth0", GOOD_MAC, 0, &[("::ffff:255.255.255.255", 128)]),
                "interface.addresses[0].address \"::ffff:255.255.255.255\": not a unicast",
            ),
        ];
        for (request, expected) in cases {
            let message = invalid_argument(check_interface(request));
            assert!(message.starts_with(expected), "{message:?} should start with {expected:?}");
        }
    }

    #[test]
    fn a_good_interface_is_taken_whatever_the_case_of_its_mac() {
        let request = interface("eth0", "52:54:00:AB:cd:EF", 1400, &[("10.88.0.5", 16), ("fd00::5", 64)]);
        let wanted = check_interface(&request).unwrap();
        assert_eq!(wanted.mac, [0x52, 0x54, 0x00, 0xab, 0xcd, 0xef]);
        // Locally administered unicast MACs (the second-lowest bit of the first octet) are fine.
        check_interface(&interface("eth0", "02:00:00:00:00:01", 0, &[])).unwrap();
        check_interface(&interface("eth0", "fe:ff:ff:ff:ff:ff", 0, &[])).unwrap();
        assert_eq!(wanted.addresses, [("10.88.0.5".parse().unwrap(), 16), ("fd00::5".parse().unwrap(), 64)]);
        assert_eq!(format_mac(&wanted.mac), "52:54:00:ab:cd:ef");
    }

    #[test]
    fn route_errors_name_the_field() {
        let cases: &[(Route, &str)] = &[
            (route("nowhere", "", "eth0", 0), "routes[0].destination \"nowhere\": \"default\" or a CIDR"),
            (route("10.99.0.0", "", "eth0", 0), "routes[0].destination \"10.99.0.0\": "),
            (
                route("10.99.0.0/33", "", "eth0", 0),
                "routes[0].destination \"10.99.0.0/33\": prefix length 33 > 32",
            ),
            (
                route("10.99.0.1/24", "", "eth0", 0),
                "routes[0].destination \"10.99.0.1/24\": host bits set (the network is 10.99.0.0/24)",
            ),
            (route("default", "10.88.0.x", "eth0", 0), "routes[0].gateway \"10.88.0.x\": not an IP"),
            (
                route("default", "255.255.255.255", "eth0", 0),
                "routes[0].gateway \"255.255.255.255\": not a unicast",
            ),
            (
                route("10.99.0.0/24", "fd00::1", "eth0", 0),
                "routes[0].gateway fd00::1: IPv6, but destination \"10.99.0.0/24\" is IPv4",
            ),
            (route("10.99.0.0/24", "", "eth 0", 253), "routes[0].device \"eth 0\": "),
            (route("10.99.0.0/24", "", "eth0", 256), "routes[0].scope 256 > 255"),
            (route("default", "10.88.0.1", "eth0", 253), "routes[0].scope 253: a route through a gateway"),
            (route("10.99.0.0/24", "", "", 253), "routes[0]: neither gateway nor device"),
            (
                Route { source: "nope".into(), ..route("default", "10.88.0.1", "eth0", 0) },
                "routes[0].source \"nope\": ",
            ),
            (
                Route { source: "10.88.0.5".into(), ..route("default", "fd00::1", "eth0", 0) },
                "routes[0].source 10.88.0.5: IPv4, but destination \"default\" is IPv6",
            ),
        ];
        for (bad, expected) in cases {
            let message = invalid_argument(check_routes(&routes(vec![bad.clone()])));
            assert!(message.starts_with(expected), "{message:?} should start with {expected:?}");
        }
        let second =
            routes(vec![route("default", "10.88.0.1", "eth0", 0), route("10.99.0.0/24", "", "eth0", 300)]);
        assert!(invalid_argument(check_routes(&second)).starts_with("routes[1].scope 300 > 255"));
    }

    #[test]
    fn routes_without_gateway_come_first_and_ipv6_link_local_ones_are_left_to_the_kernel() {
        let request = routes(vec![
            route("default", "10.88.0.1", "eth0", 0),
            route("fe80::/64", "", "eth0", 0),
            route("10.99.0.0/24", "", "eth0", 253),
            route("default", "fd00::1", "eth0", 0),
            route("fd00:1::/64", "", "eth0", 0),
        ]);
        let wanted = check_routes(&request).unwrap();
        let order: Vec<(usize, String)> = wanted.iter().map(|r| (r.position, describe(r))).collect();
        assert_eq!(
            order,
            [
                (2, "10.99.0.0/24 dev eth0 scope 253".to_owned()),
                (4, "fd00:1::/64 dev eth0 scope 0".to_owned()),
                (0, "0.0.0.0/0 via 10.88.0.1 dev eth0 scope 0".to_owned()),
                (3, "::/0 via fd00::1 dev eth0 scope 0".to_owned()),
            ]
        );
        assert!(check_routes(&UpdateRoutesRequest::default()).unwrap().is_empty());
    }

    #[test]
    fn a_routes_metric_is_kept_and_answered() {
        let request = routes(vec![
            Route { metric: 200, ..route("default", "10.88.0.3", "eth0", 0) },
            Route { metric: 100, ..route("default", "10.88.0.2", "eth0", 0) },
            route("10.99.0.0/24", "", "eth0", 253),
        ]);
        let wanted = check_routes(&request).unwrap();
        let metrics: Vec<(usize, u32)> = wanted.iter().map(|r| (r.position, r.metric)).collect();
        assert_eq!(metrics, [(2, 0), (0, 200), (1, 100)]);
        assert_eq!(describe(&wanted[1]), "0.0.0.0/0 via 10.88.0.3 dev eth0 scope 0 metric 200");
        assert_eq!(describe(&wanted[0]), "10.99.0.0/24 dev eth0 scope 253");

        let message = route_message(&wanted[1], Some(2)).unwrap();
        assert!(message.attributes.contains(&RouteAttribute::Priority(200)), "{message:?}");
        let message = route_message(&wanted[0], Some(2)).unwrap();
        let priority = message.attributes.iter().any(|a| matches!(a, RouteAttribute::Priority(_)));
        assert!(!priority, "metric 0 leaves the priority to the kernel: {message:?}");

        let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let answered = runtime.block_on(update_routes(&request, Place::Host)).unwrap();
        let answered: Vec<(&str, u32)> =
            answered.routes.iter().map(|r| (r.gateway.as_str(), r.metric)).collect();
        assert_eq!(answered, [("", 0), ("10.88.0.3", 200), ("10.88.0.2", 100)]);
    }

    #[test]
    fn host_mode_checks_and_answers_without_touching_the_host() {
        let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let request = interface("eth0", GOOD_MAC, 1400, &[("10.88.0.5", 16)]);
        let answered = runtime.block_on(update_interface(&request, Place::Host)).unwrap();
        assert_eq!(Some(&answered), request.interface.as_ref());
        let bad = interface("eth0", "zz", 0, &[]);
        invalid_argument(runtime.block_on(update_interface(&bad, Place::Host)));

        let request =
            routes(vec![route("default", "10.88.0.1", "eth0", 0), route("10.88.0.0/16", "", "eth0", 253)]);
        let answered = runtime.block_on(update_routes(&request, Place::Host)).unwrap();
        let destinations: Vec<&str> = answered.routes.iter().map(|r| r.destination.as_str()).collect();
        assert_eq!(destinations, ["10.88.0.0/16", "default"]);
    }

    const NIC_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];

    /// The guest path for real, in a network namespace of the test's own (needs root).
    #[test]
    fn configures_a_nic_and_its_routes_in_a_network_namespace() {
        if let Err(panic) = std::thread::spawn(in_a_new_network_namespace).join() {
            std::panic::resume_unwind(panic);
        }
    }

    fn in_a_new_network_namespace() {
        // Only this thread moves: the namespace goes away with it.
        match nix::sched::unshare(CloneFlags::CLONE_NEWNET) {
            Ok(()) => {}
            Err(Errno::EPERM) => {
                println!("skipped: unshare(CLONE_NEWNET) needs root (EPERM)");
                return;
            }
            Err(err) => panic!("unshare(CLONE_NEWNET): {err}"),
        }
        loopback_up().unwrap();
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(configure_and_check());
    }

    async fn configure_and_check() {
        let netlink = connect().unwrap();
        let handle = &netlink.handle;
        assert!(link_flags(handle, "lo").await.contains(LinkFlags::Up), "lo should be up");
        // A veth stands in for the guest's virtio NIC (this machine's kernel has no dummy links);
        // its peer up gives it a carrier, as a NIC plugged into the VMM has.
        let nic = LinkVeth::new("nic0", "nic0-peer").address(NIC_MAC.to_vec()).build();
        handle.link().add(nic).execute().await.unwrap();
        let peer_up = LinkUnspec::new_with_name("nic0-peer").up().build();
        handle.link().set(peer_up).execute().await.unwrap();

        let request = request_eth0();
        let answered = apply_interface(handle, &check_interface(&request).unwrap()).await.unwrap();
        assert_eq!(
            (answered.name.as_str(), answered.hw_addr.as_str(), answered.mtu),
            ("eth0", GOOD_MAC, 1400)
        );
        let mut addresses: Vec<(String, u32)> =
            answered.addresses.iter().map(|a| (a.address.clone(), a.prefix_length)).collect();
        addresses.sort();
        assert_eq!(addresses, [("10.88.0.5".to_owned(), 16), ("fd00::5".to_owned(), 64)]);
        assert!(link_flags(handle, "eth0").await.contains(LinkFlags::Up), "eth0 should be up");
        let links = list_links(handle).await.unwrap();
        assert!(links.iter().any(|l| l.name == "eth0" && l.mac == NIC_MAC && l.mtu == 1400), "{links:?}");
        assert!(!links.iter().any(|l| l.name == "nic0"), "{links:?}");

        // Again: nothing to rename, addresses replaced in place.
        let again = apply_interface(handle, &check_interface(&request).unwrap()).await.unwrap();
        assert_eq!(again.addresses.len(), 2, "{again:?}");

        let elsewhere = check_interface(&interface("eth1", "52:54:00:00:00:01", 0, &[])).unwrap();
        match apply_interface(handle, &elsewhere).await {
            Err(CallError::NotFound(message)) => {
                assert!(message.starts_with("interface.hw_addr 52:54:00:00:00:01: "), "{message}");
                assert!(message.contains("eth0 52:54:00:12:34:56"), "{message}");
            }
            other => panic!("expected NotFound, got {other:?}"),
        }

        // lo has the all-zero MAC; even past check_interface (which refuses it) it is never the NIC.
        let zero = WantedInterface { name: "eth9".into(), mac: [0; 6], mtu: 0, addresses: Vec::new() };
        match apply_interface(handle, &zero).await {
            Err(CallError::NotFound(message)) => {
                assert!(message.starts_with("interface.hw_addr 00:00:00:00:00:00: "), "{message}")
            }
            other => panic!("expected NotFound, got {other:?}"),
        }
        let names: Vec<String> = list_links(handle).await.unwrap().into_iter().map(|l| l.name).collect();
        assert!(
            names.iter().any(|name| name == "lo") && !names.iter().any(|name| name == "eth9"),
            "{names:?}"
        );

        let request = routes(vec![
            // Its gateway is reachable only through the third route: applied after it.
            route("10.100.0.0/16", "10.99.0.1", "eth0", 0),
            route("default", "10.88.0.1", "eth0", 0),
            route("10.99.0.0/24", "", "eth0", 253),
            route("fe80::/64", "", "eth0", 0),
            route("default", "fd00::1", "eth0", 0),
            // Two more defaults, kept apart from the first and from each other by their metrics.
            Route { metric: 100, ..route("default", "10.88.0.2", "eth0", 0) },
            Route { metric: 200, ..route("default", "10.88.0.3", "eth0", 0) },
            Route { metric: 100, ..route("default", "fd00::2", "eth0", 0) },
        ]);
        let applied = apply_routes(handle, &check_routes(&request).unwrap()).await.unwrap();
        let applied: Vec<(&str, &str, u32)> =
            applied.routes.iter().map(|r| (r.destination.as_str(), r.gateway.as_str(), r.metric)).collect();
        assert_eq!(
            applied,
            [
                ("10.99.0.0/24", "", 0),
                ("10.100.0.0/16", "10.99.0.1", 0),
                ("default", "10.88.0.1", 0),
                ("default", "fd00::1", 0),
                ("default", "10.88.0.2", 100),
                ("default", "10.88.0.3", 200),
                ("default", "fd00::2", 100),
            ]
        );

        let eth0 = links.iter().find(|l| l.name == "eth0").map(|l| l.index).unwrap();
        let v4_defaults = [
            ("default".to_owned(), "10.88.0.1".to_owned(), eth0, 0, 0),
            ("default".to_owned(), "10.88.0.2".to_owned(), eth0, 0, 100),
            ("default".to_owned(), "10.88.0.3".to_owned(), eth0, 0, 200),
        ];
        let v4 = main_routes(handle, RouteMessageBuilder::<Ipv4Addr>::new().build()).await;
        for expected in v4_defaults.iter().cloned().chain([
            ("10.99.0.0/24".to_owned(), String::new(), eth0, SCOPE_LINK, 0),
            ("10.100.0.0/16".to_owned(), "10.99.0.1".to_owned(), eth0, 0, 0),
        ]) {
            assert!(v4.contains(&expected), "{expected:?} not in {v4:?}");
        }
        // The kernel gives an IPv6 route without a metric 1024 (IP6_RT_PRIO_USER).
        let v6_defaults = [
            ("default".to_owned(), "fd00::1".to_owned(), eth0, 0, 1024),
            ("default".to_owned(), "fd00::2".to_owned(), eth0, 0, 100),
        ];
        let v6 = main_routes(handle, RouteMessageBuilder::<Ipv6Addr>::new().build()).await;
        for expected in &v6_defaults {
            assert!(v6.contains(expected), "{expected:?} not in {v6:?}");
        }

        // Again: each route replaces itself, none another, none is doubled.
        apply_routes(handle, &check_routes(&request).unwrap()).await.unwrap();
        let defaults = |routes: Vec<(String, String, u32, u8, u32)>| {
            let mut defaults: Vec<_> = routes.into_iter().filter(|r| r.0 == "default").collect();
            defaults.sort_by_key(|r| r.4);
            defaults
        };
        let v4 = main_routes(handle, RouteMessageBuilder::<Ipv4Addr>::new().build()).await;
        assert_eq!(defaults(v4), v4_defaults);
        let v6 = main_routes(handle, RouteMessageBuilder::<Ipv6Addr>::new().build()).await;
        let mut v6_sorted = v6_defaults.to_vec();
        v6_sorted.sort_by_key(|r| r.4);
        assert_eq!(defaults(v6), v6_sorted);

        let missing = check_routes(&routes(vec![route("10.99.0.0/24", "", "eth9", 253)])).unwrap();
        match apply_routes(handle, &missing).await {
            Err(CallError::NotFound(message)) => {
                assert!(message.starts_with("routes[0].device \"eth9\": no such link"), "{message}")
            }
            other => panic!("expected NotFound, got {other:?}"),
        }

        // A second NIC asking for eth0's name: the error says which link holds it.
        let second = LinkVeth::new("nic1", "nic1-peer").address(SECOND_MAC.to_vec()).build();
        handle.link().add(second).execute().await.unwrap();
        let taken = check_interface(&interface("eth0", "52:54:00:12:34:57", 0, &[])).unwrap();
        match apply_interface(handle, &taken).await {
            Err(CallError::AlreadyExists(message)) => assert_eq!(
                message,
                format!(
                    "interface.name \"eth0\": link {eth0} (eth0 52:54:00:12:34:56) holds that name, \
                     so the NIC nic1 52:54:00:12:34:57 cannot take it"
                )
            ),
            other => panic!("expected AlreadyExists, got {other:?}"),
        }

        // Two links with the NIC's MAC: which one is meant is not guessed.
        let twin = LinkVeth::new("twin0", "twin0-peer").address(NIC_MAC.to_vec()).build();
        handle.link().add(twin).execute().await.unwrap();
        match apply_interface(handle, &check_interface(&request_eth0()).unwrap()).await {
            Err(CallError::FailedPrecondition(message)) => {
                assert!(
                    message.starts_with("interface.hw_addr 52:54:00:12:34:56: 2 guest links have it"),
                    "{message}"
                );
                assert!(message.ends_with(": eth0 52:54:00:12:34:56, twin0 52:54:00:12:34:56"), "{message}");
            }
            other => panic!("expected FailedPrecondition, got {other:?}"),
        }
        let names: Vec<String> = list_links(handle).await.unwrap().into_iter().map(|l| l.name).collect();
        assert!(
            names.iter().any(|name| name == "eth0") && names.iter().any(|name| name == "twin0"),
            "{names:?}"
        );
    }

    const SECOND_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x57];

    fn request_eth0() -> UpdateInterfaceRequest {
        interface("eth0", GOOD_MAC, 1400, &[("10.88.0.5", 16), ("fd00::5", 64)])
    }

    async fn link_flags(handle: &Handle, name: &str) -> LinkFlags {
        let links: Vec<LinkMessage> =
            handle.link().get().match_name(name).execute().try_collect().await.unwrap();
        links[0].header.flags
    }

    /// The main table's routes of one family as (destination, gateway, oif, scope, priority).
    async fn main_routes(handle: &Handle, family: RouteMessage) -> Vec<(String, String, u32, u8, u32)> {
        let messages: Vec<RouteMessage> = handle.route().get(family).execute().try_collect().await.unwrap();
        messages.iter().filter(|m| m.header.table == RouteHeader::RT_TABLE_MAIN).map(summary).collect()
    }

    fn summary(message: &RouteMessage) -> (String, String, u32, u8, u32) {
        let show = |address: &RouteAddress| match address {
            RouteAddress::Inet(v4) => v4.to_string(),
            RouteAddress::Inet6(v6) => v6.to_string(),
            other => format!("{other:?}"),
        };
        let length = message.header.destination_prefix_length;
        let (mut destination, mut gateway, mut oif, mut priority) =
            ("default".to_owned(), String::new(), 0, 0);
        for attribute in &message.attributes {
            match attribute {
                RouteAttribute::Destination(address) if length > 0 => {
                    destination = format!("{}/{length}", show(address))
                }
                RouteAttribute::Gateway(address) => gateway = show(address),
                RouteAttribute::Oif(index) => oif = *index,
                RouteAttribute::Priority(value) => priority = *value,
                _ => {}
            }
        }
        (destination, gateway, oif, u8::from(message.header.scope), priority)
    }
}
