//! A containerd bundle (`config.json` + rootfs) seen from Husk: which pod a container belongs to
//! (the CRI annotations), and the spec the guest gets. Host paths never reach the guest: the
//! rootfs and every bind-mounted host file or directory are shared under the pod's shared
//! directory, and the spec names them there; namespaces the host set up by path (the CNI network
//! namespace, the pause container's IPC/UTS) mean nothing inside the VM and are dropped or made
//! fresh.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use oci_spec::runtime::{LinuxNamespace, LinuxNamespaceType, Mount, MountBuilder, Spec};

use crate::sandbox::{Access, Propagation};

/// CRI's annotation naming the kind of container ("sandbox" for the pod's pause container).
pub const CONTAINER_TYPE_ANNOTATION: &str = "io.kubernetes.cri.container-type";
/// CRI's annotation naming the pod (the sandbox container's id).
pub const SANDBOX_ID_ANNOTATION: &str = "io.kubernetes.cri.sandbox-id";
pub use husk_protocols::GUEST_SHARED_DIR;

/// Why a bundle cannot be run.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("{}: {reason}", path.display())]
    Spec { path: PathBuf, reason: String },
    #[error("annotation {annotation}: {reason}")]
    Annotation { annotation: &'static str, reason: String },
    #[error("container id {id:?}: {reason}")]
    Id { id: String, reason: &'static str },
}

/// Longest container id containerd accepts (its `identifiers` package).
const MAX_ID_LEN: usize = 76;

/// Checks a container id as containerd's `identifiers.Validate` does: 1 to 76 characters,
/// letters and digits in runs joined by single `.`, `_` or `-`. The id names host directories
/// and shares, so nothing else may pass, even from a containerd that did not check.
pub fn check_id(id: &str) -> Result<(), BundleError> {
    let refuse = |reason| Err(BundleError::Id { id: id.to_owned(), reason });
    if id.is_empty() || id.len() > MAX_ID_LEN {
        return refuse("must be 1 to 76 characters");
    }
    let separator = |c: char| matches!(c, '.' | '_' | '-');
    if !id.chars().all(|c| c.is_ascii_alphanumeric() || separator(c)) {
        return refuse("may hold only letters, digits, '.', '_' and '-'");
    }
    if id.split(separator).any(str::is_empty) {
        return refuse("must start and end with a letter or digit, with one '.', '_' or '-' between them");
    }
    Ok(())
}

/// Where a container stands in its pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PodRole {
    /// The container that brings the pod (and its VM) up: CRI's sandbox, or any container started
    /// without CRI (`ctr run`), which is a pod of its own.
    Sandbox { pod_id: String },
    /// A container joining the running pod `pod_id`.
    Member { pod_id: String },
}

impl PodRole {
    /// The role the annotations give container `id`.
    pub fn of(id: &str, annotations: &HashMap<String, String>) -> Result<PodRole, BundleError> {
        let kind = annotations.get(CONTAINER_TYPE_ANNOTATION).map(String::as_str);
        match kind {
            None | Some("sandbox") => Ok(PodRole::Sandbox { pod_id: id.to_owned() }),
            Some("container") => match annotations.get(SANDBOX_ID_ANNOTATION) {
                Some(pod) if !pod.is_empty() => match check_id(pod) {
                    Ok(()) => Ok(PodRole::Member { pod_id: pod.clone() }),
                    Err(err) => Err(BundleError::Annotation {
                        annotation: SANDBOX_ID_ANNOTATION,
                        reason: err.to_string(),
                    }),
                },
                _ => Err(BundleError::Annotation {
                    annotation: SANDBOX_ID_ANNOTATION,
                    reason: format!("missing, but {CONTAINER_TYPE_ANNOTATION} is \"container\""),
                }),
            },
            Some(other) => Err(BundleError::Annotation {
                annotation: CONTAINER_TYPE_ANNOTATION,
                reason: format!("{other:?}: expected \"sandbox\" or \"container\""),
            }),
        }
    }

    /// The pod's id (the shim's grouping key: one shim and one VM per pod).
    pub fn pod_id(&self) -> &str {
        match self {
            PodRole::Sandbox { pod_id } | PodRole::Member { pod_id } => pod_id,
        }
    }
}

/// Reads `<bundle>/config.json`.
pub fn load_spec(bundle: &Path) -> Result<Spec, BundleError> {
    let path = bundle.join("config.json");
    let bytes = std::fs::read(&path)
        .map_err(|err| BundleError::Spec { path: path.clone(), reason: err.to_string() })?;
    parse_spec(&bytes, &path)
}

/// Parses a `config.json` (read from `path`, named in errors).
pub fn parse_spec(bytes: &[u8], path: &Path) -> Result<Spec, BundleError> {
    serde_json::from_slice(bytes)
        .map_err(|err| BundleError::Spec { path: path.to_path_buf(), reason: err.to_string() })
}

/// The spec's annotations (none: empty).
pub fn annotations(spec: &Spec) -> HashMap<String, String> {
    spec.annotations().clone().unwrap_or_default()
}

/// The host rootfs of a bundle without rootfs mounts: `root.path`, relative to the bundle.
pub fn host_rootfs(bundle: &Path, spec: &Spec) -> PathBuf {
    let root = spec.root().as_ref().map(|r| r.path().clone()).unwrap_or_else(|| PathBuf::from("rootfs"));
    if root.is_absolute() {
        root
    } else {
        bundle.join(root)
    }
}

/// A host path the guest needs, and where in the shared directory it goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostShare {
    pub host: PathBuf,
    /// Relative to the shared directory.
    pub name: String,
    pub access: Access,
    /// `rslave`/`rshared`: the share receives what the node mounts under `host` later.
    pub propagation: Propagation,
}

/// The spec rewritten for the guest, and the host paths to share for it.
#[derive(Debug)]
pub struct GuestSpec {
    pub spec: Spec,
    pub shares: Vec<HostShare>,
    /// The spec joins namespaces of the pod's sandbox container (by path: the agent resolves
    /// them, `join_namespaces_of`).
    pub joins_sandbox: bool,
}

/// The namespaces a pod's container joins of its sandbox container's when CRI names them by
/// path (the pod's IPC and UTS, and its PID namespace when the pod shares one).
const JOINABLE: &[LinuxNamespaceType] =
    &[LinuxNamespaceType::Ipc, LinuxNamespaceType::Uts, LinuxNamespaceType::Pid];

/// Shared-directory name of container `id`'s rootfs.
pub fn rootfs_name(id: &str) -> String {
    format!("{id}/rootfs")
}

/// Where a pod's network comes from: the network namespace of its sandbox container's spec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PodNetns {
    /// No network namespace: the host's network (`hostNetwork`, `ctr run --net-host`).
    Host,
    /// A namespace of its own with nothing in it (`ctr run`): the VM gets no NIC.
    Empty,
    /// The namespace CNI set up, by path.
    Path(PathBuf),
}

/// The pod's network namespace as `spec` names it.
pub fn pod_netns(spec: &Spec) -> PodNetns {
    let namespaces = spec.linux().as_ref().and_then(|linux| linux.namespaces().clone()).unwrap_or_default();
    match namespaces.iter().find(|ns| ns.typ() == LinuxNamespaceType::Network) {
        None => PodNetns::Host,
        Some(ns) => match ns.path() {
            Some(path) if !path.as_os_str().is_empty() => PodNetns::Path(path.clone()),
            _ => PodNetns::Empty,
        },
    }
}

/// The cgroup a spec names on the node (`linux.cgroupsPath`; containerd always names one).
pub fn cgroups_path(spec: &Spec) -> Option<String> {
    let path = spec.linux().as_ref()?.cgroups_path().as_ref()?;
    Some(path.to_string_lossy().into_owned()).filter(|path| !path.is_empty())
}

/// The namespace kinds a spec asks for (a pod's sandbox container's tell what its members join).
pub fn namespace_kinds(spec: &Spec) -> Vec<LinuxNamespaceType> {
    let namespaces = spec.linux().as_ref().and_then(|linux| linux.namespaces().clone()).unwrap_or_default();
    namespaces.iter().map(|ns| ns.typ()).collect()
}

/// Rewrites `spec` for container `id` in the guest: `root.path` names the shared rootfs, bind
/// mounts of host paths name their shares, the pod's `/dev/shm` becomes a tmpfs of the guest.
/// Namespaces: the network namespace is the VM's own; one given by host path (CRI's way to join
/// the pod sandbox's) is left out when the sandbox container (whose kinds are `sandbox_kinds`)
/// has none of that kind, so a hostPID/hostIPC pod shares the VM's; otherwise it stays by path
/// for the agent to join the sandbox container's ([`JOINABLE`] kinds) or is made fresh; a
/// hostname gets a UTS namespace to be set in.
pub fn guest_spec(id: &str, mut spec: Spec, sandbox_kinds: &[LinuxNamespaceType]) -> GuestSpec {
    if let Some(root) = spec.root_mut() {
        root.set_path(PathBuf::from(rootfs_name(id)));
    }
    let mut shares = Vec::new();
    let mounts = spec.mounts().clone().unwrap_or_default();
    let mounts = mounts.into_iter().map(|mount| guest_mount(id, mount, &mut shares)).collect();
    spec.set_mounts(Some(mounts));
    let has_hostname = spec.hostname().as_ref().is_some_and(|name| !name.is_empty());
    let mut joins_sandbox = false;
    if let Some(linux) = spec.linux_mut() {
        let mut namespaces: Vec<LinuxNamespace> = linux
            .namespaces()
            .clone()
            .unwrap_or_default()
            .into_iter()
            .filter(|ns| ns.typ() != LinuxNamespaceType::Network)
            .filter(|ns| ns.path().is_none() || sandbox_kinds.contains(&ns.typ()))
            .map(|mut ns| {
                if !JOINABLE.contains(&ns.typ()) {
                    ns.set_path(None);
                }
                ns
            })
            .collect();
        // A host-network pod shares the node's UTS namespace and still names its hostname; in the
        // guest the "node" is the pod's VM, so the container gets a UTS namespace of its own.
        if has_hostname && !namespaces.iter().any(|ns| ns.typ() == LinuxNamespaceType::Uts) {
            let mut uts = LinuxNamespace::default();
            uts.set_typ(LinuxNamespaceType::Uts);
            namespaces.push(uts);
        }
        joins_sandbox = namespaces.iter().any(|ns| ns.path().is_some());
        linux.set_namespaces(Some(namespaces));
        // The container shares the VM's network namespace, where the pod's net.* sysctls are set
        // once for the whole pod (`pod_net_sysctls`); runtimes refuse them outside a namespace of
        // the container's own.
        if let Some(sysctls) = linux.sysctl().clone() {
            let kept: HashMap<String, String> =
                sysctls.into_iter().filter(|(key, _)| !key.starts_with("net.")).collect();
            linux.set_sysctl(Some(kept));
        }
    }
    GuestSpec { spec, shares, joins_sandbox }
}

/// The pod-wide `net.*` sysctls of the sandbox container's spec (CRI puts the pod's there, e.g.
/// `net.ipv4.ip_unprivileged_port_start`): set in the VM's network namespace at boot.
pub fn pod_net_sysctls(spec: &Spec) -> HashMap<String, String> {
    let sysctls = spec.linux().as_ref().and_then(|linux| linux.sysctl().clone()).unwrap_or_default();
    sysctls.into_iter().filter(|(key, _)| key.starts_with("net.")).collect()
}

fn guest_mount(id: &str, mount: Mount, shares: &mut Vec<HostShare>) -> Mount {
    let options = mount.options().clone().unwrap_or_default();
    let is_bind =
        mount.typ().as_deref() == Some("bind") || options.iter().any(|o| o == "bind" || o == "rbind");
    let Some(source) = mount.source().clone().filter(|s| is_bind && s.is_absolute()) else {
        return mount;
    };
    if mount.destination() == Path::new("/dev/shm") {
        // The pod's shm lives in host memory; a guest-side tmpfs is what IPC in the VM can use.
        return MountBuilder::default()
            .destination("/dev/shm")
            .typ("tmpfs")
            .source("shm")
            .options(["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"].map(String::from).to_vec())
            .build()
            .unwrap_or(mount);
    }
    let name = format!("{id}/mounts/{}", shares.len());
    let access = Access::of_options(&options);
    // Mounts cannot propagate out of the VM: `rshared` gives the node-to-pod half, as `rslave`.
    let from_node = options.iter().any(|o| matches!(o.as_str(), "rslave" | "slave" | "rshared" | "shared"));
    let propagation = if from_node { Propagation::FromNode } else { Propagation::Private };
    shares.push(HostShare { host: source, name: name.clone(), access, propagation });
    let mut mount = mount;
    mount.set_source(Some(Path::new(GUEST_SHARED_DIR).join(&name)));
    mount
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn annotated(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn container_ids_are_checked_as_containerd_does() {
        for good in ["c1", "a.b-c_d", "0123456789abcdef", &"x".repeat(76)] {
            assert!(check_id(good).is_ok(), "{good}");
        }
        for bad in ["", "../x", "a/b", "-a", "a-", "a..b", "a b", "ä", &"x".repeat(77)] {
            let err = check_id(bad).unwrap_err().to_string();
            assert!(err.starts_with("container id "), "{bad}: {err}");
        }
    }

    #[test]
    fn cri_annotations_group_containers_into_their_pod() {
        assert_eq!(PodRole::of("c1", &HashMap::new()).unwrap(), PodRole::Sandbox { pod_id: "c1".into() });
        let sandbox = annotated(&[(CONTAINER_TYPE_ANNOTATION, "sandbox"), (SANDBOX_ID_ANNOTATION, "p")]);
        assert_eq!(PodRole::of("p", &sandbox).unwrap(), PodRole::Sandbox { pod_id: "p".into() });
        let member = annotated(&[(CONTAINER_TYPE_ANNOTATION, "container"), (SANDBOX_ID_ANNOTATION, "p")]);
        assert_eq!(PodRole::of("c2", &member).unwrap().pod_id(), "p");
        let orphan = annotated(&[(CONTAINER_TYPE_ANNOTATION, "container")]);
        let err = PodRole::of("c3", &orphan).unwrap_err().to_string();
        assert!(err.contains(SANDBOX_ID_ANNOTATION), "{err}");
        let escaping =
            annotated(&[(CONTAINER_TYPE_ANNOTATION, "container"), (SANDBOX_ID_ANNOTATION, "../p")]);
        let err = PodRole::of("c5", &escaping).unwrap_err().to_string();
        assert!(err.contains(SANDBOX_ID_ANNOTATION) && err.contains("\"../p\""), "{err}");
        let odd = annotated(&[(CONTAINER_TYPE_ANNOTATION, "vm")]);
        assert!(PodRole::of("c4", &odd).unwrap_err().to_string().contains("\"vm\""));
    }

    #[test]
    fn the_guest_spec_names_shares_and_no_host_path() {
        let spec: Spec = serde_json::from_value(serde_json::json!({
            "ociVersion": "1.0.2",
            "root": {"path": "/var/lib/containerd/x/rootfs"},
            "mounts": [
                {"destination": "/proc", "type": "proc", "source": "proc"},
                {"destination": "/etc/hosts", "type": "bind", "source": "/var/lib/cri/hosts", "options": ["rbind", "ro"]},
                {"destination": "/data", "source": "/srv/vol", "options": ["rbind", "rw"]},
                {"destination": "/dev/shm", "type": "bind", "source": "/run/cri/shm", "options": ["rbind"]},
                {"destination": "/live", "type": "bind", "source": "/srv/live", "options": ["rbind", "rslave"]}
            ],
            "linux": {"namespaces": [
                {"type": "pid"},
                {"type": "network", "path": "/var/run/netns/cni-1"},
                {"type": "ipc", "path": "/proc/42/ns/ipc"},
                {"type": "uts", "path": "/proc/42/ns/uts"}
            ]}
        }))
        .unwrap();
        let guest = guest_spec("c1", spec, &[LinuxNamespaceType::Ipc]);
        assert_eq!(guest.spec.root().as_ref().unwrap().path(), Path::new("c1/rootfs"));
        assert_eq!(
            guest.shares,
            vec![
                HostShare {
                    host: "/var/lib/cri/hosts".into(),
                    name: "c1/mounts/0".into(),
                    access: Access::ReadOnly,
                    propagation: Propagation::Private
                },
                HostShare {
                    host: "/srv/vol".into(),
                    name: "c1/mounts/1".into(),
                    access: Access::Writable,
                    propagation: Propagation::Private
                },
                HostShare {
                    host: "/srv/live".into(),
                    name: "c1/mounts/2".into(),
                    access: Access::Writable,
                    propagation: Propagation::FromNode
                },
            ]
        );
        let mounts = guest.spec.mounts().clone().unwrap();
        assert_eq!(mounts[0].source().as_deref(), Some(Path::new("proc")));
        assert_eq!(mounts[1].source().as_deref(), Some(Path::new("/run/husk/shared/c1/mounts/0")));
        assert_eq!(mounts[2].source().as_deref(), Some(Path::new("/run/husk/shared/c1/mounts/1")));
        assert_eq!(mounts[3].typ().as_deref(), Some("tmpfs"));
        let namespaces = guest.spec.linux().as_ref().unwrap().namespaces().clone().unwrap();
        let kinds: Vec<_> = namespaces.iter().map(|ns| (ns.typ(), ns.path().clone())).collect();
        // The pod's IPC namespace is joined (the agent resolves the path to the sandbox
        // container's); its UTS namespace is the VM's (the sandbox has none).
        assert_eq!(
            kinds,
            vec![(LinuxNamespaceType::Pid, None), (LinuxNamespaceType::Ipc, Some("/proc/42/ns/ipc".into()))]
        );
        assert!(guest.joins_sandbox);

        let named: Spec = serde_json::from_value(serde_json::json!({
            "ociVersion": "1.0.2", "hostname": "pod-a", "linux": {"namespaces": [{"type": "mount"}]}
        }))
        .unwrap();
        let namespaces =
            guest_spec("c2", named, &[]).spec.linux().as_ref().unwrap().namespaces().clone().unwrap();
        assert!(namespaces.iter().any(|ns| ns.typ() == LinuxNamespaceType::Uts), "{namespaces:?}");
    }

    #[test]
    fn the_pod_network_comes_from_the_sandbox_spec_and_its_net_sysctls_go_vm_wide() {
        let spec = |linux: serde_json::Value| -> Spec {
            serde_json::from_value(serde_json::json!({"ociVersion": "1.0.2", "linux": linux})).unwrap()
        };
        let cni = spec(serde_json::json!({
            "namespaces": [{"type": "network", "path": "/var/run/netns/cni-1"}, {"type": "ipc"}],
            "sysctl": {"net.ipv4.ip_unprivileged_port_start": "0", "kernel.shm_rmid_forced": "1"}
        }));
        assert_eq!(pod_netns(&cni), PodNetns::Path(PathBuf::from("/var/run/netns/cni-1")));
        assert_eq!(
            pod_netns(&spec(serde_json::json!({"namespaces": [{"type": "network"}]}))),
            PodNetns::Empty
        );
        assert_eq!(pod_netns(&spec(serde_json::json!({"namespaces": [{"type": "pid"}]}))), PodNetns::Host);
        let net = pod_net_sysctls(&cni);
        assert_eq!(net.keys().collect::<Vec<_>>(), ["net.ipv4.ip_unprivileged_port_start"]);
        let guest = guest_spec("c1", cni, &[LinuxNamespaceType::Network, LinuxNamespaceType::Ipc]);
        let left = guest.spec.linux().as_ref().unwrap().sysctl().clone().unwrap();
        assert_eq!(
            left.keys().collect::<Vec<_>>(),
            ["kernel.shm_rmid_forced"],
            "net.* are the VM's, not the container's"
        );
    }
}
