//! Pod networking: the network namespace CNI made for the pod reaches the guest.
//!
//! For every interface in the namespace (CNI's veth, usually `eth0`) the shim creates a tap beside
//! it and redirects everything between the two with tc (Kata's `tcfilter` model); the guest NIC
//! on that tap gets the veth's MAC and MTU, and the agent gives it the veth's addresses and the
//! namespace's routes. The veth keeps its addresses, but all it receives goes to the guest. The
//! taps are not persistent: they disappear with the VM's file descriptors; [`PodNetwork::detach`]
//! removes the qdiscs from the veths.
//!
//! - [`netns`]: running netlink work inside the pod's namespace.
//! - [`netlink`]: the requests (links, addresses, routes, tc).
//! - [`port_forward`]: `kubectl port-forward`, from the namespace's loopback to the guest's
//!   ([`loopback`] catches the connections).

pub mod loopback;
pub mod netlink;
pub mod netns;
pub mod port_forward;

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use husk_protocols::agent::{Interface, IpAddress, Route};
use husk_vmm::devices::virtio::net::{MacAddr, NetConfig, Tap, TapError};

use self::netlink::{Link, RouteEntry};

/// Errors attaching a pod to its network namespace.
#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    #[error("network namespace {}: {source}", netns.display())]
    OpenNetns { netns: PathBuf, source: std::io::Error },
    #[error("entering network namespace {}: {source}", netns.display())]
    EnterNetns { netns: PathBuf, source: std::io::Error },
    #[error("network namespace {}: its helper thread ended without an answer", netns.display())]
    ThreadDied { netns: PathBuf },
    #[error("starting the network namespace helper thread: {source}")]
    Thread { source: std::io::Error },
    #[error("netlink: {what}: {source}")]
    Netlink { what: String, source: rtnetlink::Error },
    #[error("{what}: {source}")]
    Io { what: &'static str, source: std::io::Error },
    #[error(transparent)]
    Tap(#[from] TapError),
    #[error("link {name}: MTU {mtu} is outside what a virtio NIC takes (68 to 65535)")]
    Mtu { name: String, mtu: u32 },
}

/// One pod interface: the veth CNI made and the tap the guest NIC sits on.
#[derive(Debug)]
pub struct Endpoint {
    /// Its name in the pod's namespace, and the guest NIC's name.
    pub name: String,
    pub veth_index: u32,
    pub mac: MacAddr,
    pub mtu: u16,
    pub addresses: Vec<(IpAddr, u8)>,
    pub tap: Arc<Tap>,
}

/// A pod attached to its network namespace.
#[derive(Debug)]
pub struct PodNetwork {
    netns: PathBuf,
    endpoints: Vec<Endpoint>,
    routes: Vec<Route>,
}

impl PodNetwork {
    /// Creates a tap for every interface of the namespace at `netns` and redirects the interface
    /// to it. A namespace with only a loopback gives a pod without NICs. On error nothing is left:
    /// redirections made so far are removed and the taps closed.
    pub async fn attach(netns: &Path) -> Result<PodNetwork, NetworkError> {
        let (endpoints, routes) = netns::run_in(netns, |handle| async move {
            let mut endpoints: Vec<Endpoint> = Vec::new();
            let result = attach_all(&handle, &mut endpoints).await;
            match result {
                Ok(routes) => Ok((endpoints, routes)),
                Err(err) => {
                    for endpoint in &endpoints {
                        if let Err(cleanup) = netlink::remove_ingress(&handle, endpoint.veth_index).await {
                            tracing::warn!(interface = %endpoint.name, %cleanup, "undoing a failed attach");
                        }
                    }
                    Err(err)
                }
            }
        })
        .await?;
        Ok(PodNetwork { netns: netns.to_owned(), endpoints, routes })
    }

    /// The namespace this pod's network lives in.
    pub fn netns(&self) -> &Path {
        &self.netns
    }

    /// The pod's interfaces.
    pub fn endpoints(&self) -> &[Endpoint] {
        &self.endpoints
    }

    /// The guest NICs, one per endpoint, in order.
    pub fn nics(&self) -> Vec<NetConfig> {
        self.endpoints
            .iter()
            .map(|endpoint| NetConfig { backend: endpoint.tap.clone(), mac: endpoint.mac, mtu: endpoint.mtu })
            .collect()
    }

    /// What the agent gives each guest NIC (found in the guest by its MAC).
    pub fn interfaces(&self) -> Vec<Interface> {
        self.endpoints.iter().map(interface_of).collect()
    }

    /// The namespace's routes, for the agent.
    pub fn routes(&self) -> Vec<Route> {
        self.routes.clone()
    }

    /// Removes the redirections from the veths (the taps go with the VM). A namespace already
    /// deleted has nothing left to remove.
    pub async fn detach(&self) -> Result<(), NetworkError> {
        if !self.netns.exists() {
            return Ok(());
        }
        let veths: Vec<u32> = self.endpoints.iter().map(|endpoint| endpoint.veth_index).collect();
        netns::run_in(&self.netns, move |handle| async move {
            for index in veths {
                netlink::remove_ingress(&handle, index).await?;
            }
            Ok(())
        })
        .await
    }
}

/// Removes what a killed shim left in the pod's namespace at `netns`: the ingress qdiscs of the
/// pod interfaces (their taps died with the shim's VM). A namespace already gone has none.
pub async fn remove_leftovers(netns: &Path) -> Result<(), NetworkError> {
    if !netns.exists() {
        return Ok(());
    }
    netns::run_in(netns, |handle| async move {
        for link in netlink::links(&handle).await?.iter().filter(|link| link.is_pod_interface()) {
            netlink::remove_ingress(&handle, link.index).await?;
        }
        Ok(())
    })
    .await
}

/// Attaches every interface of the namespace (pushing each to `endpoints` as soon as it has a
/// redirection, so a failure can undo it); returns the routes that go through them.
async fn attach_all(
    handle: &rtnetlink::Handle,
    endpoints: &mut Vec<Endpoint>,
) -> Result<Vec<Route>, NetworkError> {
    let links = netlink::links(handle).await?;
    let (pod_links, skipped): (Vec<&Link>, Vec<&Link>) =
        links.iter().partition(|link| link.is_pod_interface());
    for link in skipped.iter().filter(|link| !link.is_loopback) {
        tracing::debug!(interface = %link.name, up = link.is_up, "not a pod interface (down, tap or no unicast MAC)");
    }
    for (number, link) in pod_links.into_iter().enumerate() {
        let Some(mac) = link.mac else { continue };
        let mtu = u16::try_from(link.mtu)
            .ok()
            .filter(|mtu| *mtu >= 68)
            .ok_or_else(|| NetworkError::Mtu { name: link.name.clone(), mtu: link.mtu })?;
        let tap = Tap::open(&format!("tap{number}_husk"))?;
        let tap_index = netlink::links(handle)
            .await?
            .into_iter()
            .find(|candidate| candidate.name == tap.name())
            .map(|candidate| candidate.index)
            .ok_or_else(|| NetworkError::Io {
                what: "finding the new tap",
                source: std::io::Error::from(std::io::ErrorKind::NotFound),
            })?;
        netlink::set_up(handle, tap_index, link.mtu).await?;
        let addresses = netlink::addresses(handle, link.index).await?;
        netlink::redirect_both_ways(handle, link.index, tap_index).await?;
        endpoints.push(Endpoint {
            name: link.name.clone(),
            veth_index: link.index,
            mac: MacAddr::new(mac),
            mtu,
            addresses,
            tap: Arc::new(tap),
        });
    }
    let routes = netlink::routes(handle).await?;
    Ok(routes.iter().filter_map(|route| guest_route(route, endpoints)).collect())
}

fn interface_of(endpoint: &Endpoint) -> Interface {
    Interface {
        name: endpoint.name.clone(),
        hw_addr: endpoint.mac.to_string(),
        mtu: u32::from(endpoint.mtu),
        addresses: endpoint
            .addresses
            .iter()
            .map(|(address, prefix)| IpAddress {
                address: address.to_string(),
                prefix_length: u32::from(*prefix),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    }
}

/// The agent's form of a namespace route through one of `endpoints`; `None` for routes the guest
/// makes itself (the kernel's routes for addresses, IPv6 link-local) or that use other links.
fn guest_route(route: &RouteEntry, endpoints: &[Endpoint]) -> Option<Route> {
    if route.from_kernel {
        return None;
    }
    if route.multipath {
        tracing::warn!(?route.destination, "multipath (ECMP) routes are not carried into the guest");
        return None;
    }
    let device = endpoints.iter().find(|endpoint| Some(endpoint.veth_index) == route.oif)?;
    let destination = match route.destination {
        // "default" is IPv4 to the agent unless a gateway says otherwise: name IPv6's outright.
        None | Some((_, 0)) if route.ipv6 => "::/0".to_owned(),
        None | Some((_, 0)) => "default".to_owned(),
        Some((address @ IpAddr::V6(_), _)) if netlink::is_link_local(&address) => return None,
        Some((address, prefix)) => format!("{address}/{prefix}"),
    };
    Some(Route {
        destination,
        gateway: route.gateway.map(|gateway| gateway.to_string()).unwrap_or_default(),
        device: device.name.clone(),
        source: route.source.map(|source| source.to_string()).unwrap_or_default(),
        scope: u32::from(route.scope),
        metric: route.priority,
        ..Default::default()
    })
}

#[cfg(test)]
mod tests;
