//! Attaching to real network namespaces made with iproute2 (`ip netns`), as CNI leaves them: a veth
//! with an address and a default route. Needs root (as the shim does); skipped with a message
//! otherwise.

use std::os::fd::AsFd;
use std::path::PathBuf;
use std::process::Command;

use super::*;

/// A named network namespace, deleted on drop.
struct TestNetns {
    name: String,
}

impl TestNetns {
    /// A namespace holding `eth0` (one end of a veth pair whose other end stays inside too, so
    /// nothing touches the host's namespace) with `setup` run as `ip -n NAME ...` commands.
    fn new(tag: &str, setup: &[String]) -> Option<TestNetns> {
        let name = format!("husk-shim-{tag}-{}", std::process::id());
        if !ip(&["netns", "add", &name]) {
            eprintln!("skipped: `ip netns add` failed (needs root and iproute2)");
            return None;
        }
        let netns = TestNetns { name };
        for command in setup {
            let args: Vec<&str> = command.split_whitespace().collect();
            assert!(ip(&[&["-n", &netns.name], args.as_slice()].concat()), "ip -n {} {command}", netns.name);
        }
        Some(netns)
    }

    fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    /// `ip -n NAME ARGS` output.
    fn show(&self, args: &[&str]) -> String {
        let output = Command::new("ip").args(["-n", &self.name]).args(args).output().unwrap();
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// `tc ARGS` output inside the namespace.
    fn tc(&self, args: &[&str]) -> String {
        let output =
            Command::new("ip").args(["netns", "exec", &self.name, "tc"]).args(args).output().unwrap();
        String::from_utf8_lossy(&output.stdout).into_owned()
    }
}

impl Drop for TestNetns {
    fn drop(&mut self) {
        ip(&["netns", "delete", &self.name]);
    }
}

fn ip(args: &[&str]) -> bool {
    Command::new("ip").args(args).output().map(|out| out.status.success()).unwrap_or(false)
}

/// A namespace as CNI's bridge plugin leaves it (`eth0`, its peer in the `peer` namespace), with a
/// second veth pair left down (like the kernel's fallback tunnels): not a pod interface.
fn cni_like(peer: &TestNetns) -> Vec<String> {
    vec![
        format!(
            "link add eth0 address 0a:58:0a:58:00:05 mtu 1450 type veth peer name peer0 netns {}",
            peer.name
        ),
        "addr add 10.88.0.5/16 dev eth0".into(),
        "link set eth0 up".into(),
        "route add default via 10.88.0.1 dev eth0".into(),
        "route add 10.99.0.0/24 dev eth0 scope link".into(),
        "route add 10.100.0.0/16 via 10.88.0.254 dev eth0 metric 300".into(),
        "link add junk0 type veth peer name junk1".into(),
    ]
}

#[tokio::test(flavor = "current_thread")]
async fn a_cni_veth_gets_a_tap_with_tc_redirection_both_ways_and_detach_removes_it() {
    let Some(peer) = TestNetns::new("peer", &[]) else { return };
    let Some(netns) = TestNetns::new("attach", &cni_like(&peer)) else { return };
    let network = PodNetwork::attach(&netns.path()).await.unwrap();
    let names: Vec<&str> = network.endpoints().iter().map(|e| e.name.as_str()).collect();
    assert_eq!(names, ["eth0"], "only the up interface with a MAC is the pod's");
    let eth0 = &network.endpoints()[0];
    assert_eq!(eth0.mac.to_string(), "0a:58:0a:58:00:05");
    assert_eq!(eth0.mtu, 1450);
    let interface = network.interfaces().into_iter().find(|i| i.name == "eth0").unwrap();
    assert_eq!(interface.hw_addr, "0a:58:0a:58:00:05");
    assert_eq!(interface.addresses.len(), 1);
    assert_eq!(
        (interface.addresses[0].address.as_str(), interface.addresses[0].prefix_length),
        ("10.88.0.5", 16)
    );
    let routes: Vec<_> =
        network.routes().into_iter().map(|r| (r.destination, r.gateway, r.device, r.scope)).collect();
    assert!(routes.contains(&("default".into(), "10.88.0.1".into(), "eth0".into(), 0)), "{routes:?}");
    assert!(routes.contains(&("10.99.0.0/24".into(), String::new(), "eth0".into(), 253)), "{routes:?}");
    let metric = network.routes().into_iter().find(|r| r.destination == "10.100.0.0/16").map(|r| r.metric);
    assert_eq!(metric, Some(300), "the metric travels with the route");
    assert!(
        !routes.iter().any(|r| r.0 == "10.88.0.0/16"),
        "the kernel's route for the address is the guest's to make"
    );

    let tap = eth0.tap.name().to_owned();
    let links = netns.show(&["link", "show", &tap]);
    assert!(links.contains("UP") && links.contains("mtu 1450"), "{links}");
    for dev in ["eth0", tap.as_str()] {
        let filters = netns.tc(&["filter", "show", "dev", dev, "ingress"]);
        assert!(filters.contains("mirred") && filters.contains("Redirect"), "{dev}: {filters}");
        assert!(filters.contains("protocol all"), "every protocol is redirected: {filters}");
    }
    let eth0_filters = netns.tc(&["filter", "show", "dev", "eth0", "ingress"]);
    assert!(eth0_filters.contains(&format!("to device {tap}")), "{eth0_filters}");

    network.detach().await.unwrap();
    let qdiscs = netns.tc(&["qdisc", "show", "dev", "eth0"]);
    assert!(!qdiscs.contains("ingress"), "{qdiscs}");
    drop(network);
    assert!(!netns.show(&["link"]).contains("_husk"), "the taps close with their last handle");
}

#[tokio::test(flavor = "current_thread")]
async fn a_namespace_with_only_loopback_gives_no_nics() {
    let Some(netns) = TestNetns::new("empty", &["link set lo up".into()]) else { return };
    let network = PodNetwork::attach(&netns.path()).await.unwrap();
    assert!(network.nics().is_empty());
    assert!(network.routes().is_empty());
}

#[tokio::test(flavor = "current_thread")]
async fn a_missing_namespace_is_named_in_the_error() {
    let err = PodNetwork::attach(Path::new("/run/netns/husk-no-such-netns")).await.unwrap_err();
    assert!(err.to_string().contains("/run/netns/husk-no-such-netns"), "{err}");
}

#[tokio::test(flavor = "current_thread")]
async fn a_killed_shims_redirection_is_removed_by_remove_leftovers() {
    let Some(peer) = TestNetns::new("left-peer", &[]) else { return };
    let Some(netns) = TestNetns::new("leftover", &cni_like(&peer)) else { return };
    let network = PodNetwork::attach(&netns.path()).await.unwrap();
    drop(network); // the shim dies: its tap goes, the veth keeps its qdisc
    assert!(netns.tc(&["qdisc", "show", "dev", "eth0"]).contains("ingress"));
    remove_leftovers(&netns.path()).await.unwrap();
    assert!(!netns.tc(&["qdisc", "show", "dev", "eth0"]).contains("ingress"));
    remove_leftovers(Path::new("/run/netns/husk-gone")).await.unwrap();
}

/// Connects from inside the namespace at `netns` to `target` (`None`: refused).
async fn connect_inside(netns: &Path, target: &'static str) -> Option<std::net::TcpStream> {
    netns::run_in(netns, move |_| async move { Ok(std::net::TcpStream::connect(target).ok()) }).await.unwrap()
}

#[tokio::test(flavor = "current_thread")]
async fn every_loopback_connection_of_the_namespace_reaches_the_catchers_sockets_until_it_is_dropped() {
    let Some(netns) = TestNetns::new("loopback", &["link set lo up".into()]) else { return };
    let path = netns.path();
    let (v4, v6) = netns::run_in(&path, |_| async {
        let v4 = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let v6 = std::net::TcpListener::bind("[::1]:0").unwrap();
        Ok((v4, v6))
    })
    .await
    .unwrap();
    let namespace = std::fs::File::open(&path).unwrap();
    let catcher = loopback::LoopbackCatcher::attach(&namespace, v4.as_fd(), Some(v6.as_fd())).unwrap();
    for (target, listener, port) in
        [("127.0.0.1:8080", &v4, 8080), ("[::1]:9090", &v6, 9090), ("127.0.0.1:22", &v4, 22)]
    {
        let _client = connect_inside(&path, target).await.unwrap_or_else(|| panic!("{target} refused"));
        let (accepted, _) = listener.accept().unwrap();
        assert_eq!(accepted.local_addr().unwrap().port(), port, "{target}: the port asked for");
    }
    // Only 127.0.0.1 and ::1: the rest of 127/8 is left alone.
    assert!(connect_inside(&path, "127.0.0.2:8080").await.is_none(), "127.0.0.2 was caught");
    drop(catcher);
    assert!(connect_inside(&path, "127.0.0.1:8080").await.is_none(), "detached with the catcher");
}
