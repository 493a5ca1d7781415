//! A container's bundle in the agent's state directory: `config.json` and `rootfs/`, an overlay
//! whose lower layer is the image directory in the shared file system and whose upper layer (the
//! container's writes) stays in the guest. Removing the bundle unmounts and deletes it all.

use std::path::{Component, Path, PathBuf};

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use oci_spec::runtime::{LinuxNamespaceType, Spec};

use super::CallError;

/// A mounted bundle; [`Bundle::remove`] (or drop) takes it down.
#[derive(Debug)]
pub struct Bundle {
    dir: PathBuf,
    mounted: bool,
    /// The spec's `process.terminal`.
    terminal: bool,
    /// The spec's `linux.cgroupsPath` (Husk's default when it had none).
    cgroups_path: PathBuf,
}

impl Bundle {
    /// Parses and checks `oci_spec`, mounts the rootfs overlay over `shared`/`root.path` and writes
    /// the spec the runtime will read into `<bundles>/<id>`.
    /// `joins`: the init process of the container whose namespaces this one joins where its spec
    /// names them by path (see [`join_namespaces`]).
    pub fn create(
        bundles: &Path,
        id: &str,
        shared: &Path,
        oci_spec: &[u8],
        joins: Option<i32>,
    ) -> Result<Bundle, CallError> {
        let mut spec: Spec = serde_json::from_slice(oci_spec)
            .map_err(|err| CallError::InvalidArgument(format!("oci_spec: {err}")))?;
        let lower = image_dir(&spec, shared)?;
        check_process(&spec)?;
        join_namespaces(&mut spec, joins)?;
        name_rootfs_propagation_for_libcontainer(&mut spec)?;
        let terminal = spec.process().as_ref().and_then(|p| p.terminal()).unwrap_or(false);
        let cgroups_path = spec
            .linux()
            .as_ref()
            .and_then(|linux| linux.cgroups_path().clone())
            .unwrap_or_else(|| PathBuf::from(format!("/husk/{id}")));
        let mut bundle = Bundle { dir: bundles.join(id), mounted: false, terminal, cgroups_path };
        if bundle.dir.exists() {
            return Err(CallError::AlreadyExists(format!(
                "container {id}: bundle {} exists",
                bundle.dir.display()
            )));
        }
        let internal =
            |what: &str, err: &dyn std::fmt::Display| CallError::Internal(format!("{what}: {err}"));
        for sub in ["upper", "work", "rootfs"] {
            std::fs::create_dir_all(bundle.dir.join(sub))
                .map_err(|e| internal(&format!("creating {}", bundle.dir.join(sub).display()), &e))?;
        }
        let options = format!(
            "lowerdir={},upperdir={},workdir={}",
            lower.display(),
            bundle.dir.join("upper").display(),
            bundle.dir.join("work").display()
        );
        mount(Some("overlay"), &bundle.rootfs(), Some("overlay"), MsFlags::empty(), Some(options.as_str()))
            .map_err(|e| internal(&format!("mounting the rootfs overlay ({options})"), &e))?;
        bundle.mounted = true;
        if let Some(root) = spec.root_mut() {
            root.set_path(bundle.rootfs());
        }
        if let Some(linux) = spec.linux_mut() {
            linux.set_cgroups_path(Some(bundle.cgroups_path.clone()));
        }
        spec.save(bundle.dir.join("config.json")).map_err(|e| internal("writing config.json", &e))?;
        Ok(bundle)
    }

    pub fn cgroups_path(&self) -> &Path {
        &self.cgroups_path
    }

    pub fn terminal(&self) -> bool {
        self.terminal
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn rootfs(&self) -> PathBuf {
        self.dir.join("rootfs")
    }

    /// Unmounts the rootfs and deletes the bundle.
    pub fn remove(mut self) -> std::io::Result<()> {
        self.take_down()
    }

    fn take_down(&mut self) -> std::io::Result<()> {
        if self.mounted {
            umount2(&self.rootfs(), MntFlags::MNT_DETACH).map_err(std::io::Error::from)?;
            self.mounted = false;
        }
        match std::fs::remove_dir_all(&self.dir) {
            Err(err) if err.kind() != std::io::ErrorKind::NotFound => Err(err),
            _ => Ok(()),
        }
    }
}

impl Drop for Bundle {
    fn drop(&mut self) {
        if let Err(err) = self.take_down() {
            eprintln!("husk-agent: removing bundle {}: {err}", self.dir.display());
        }
    }
}

/// Namespaces the spec gives by path are the host's names for another container's (CRI puts a
/// pod's containers in its sandbox's IPC, UTS and PID namespaces that way): each becomes the
/// same kind of namespace of `joins`'s process here. A namespace of another kind, or one by path
/// without a container to join, is refused by name.
fn join_namespaces(spec: &mut Spec, joins: Option<i32>) -> Result<(), CallError> {
    let Some(linux) = spec.linux_mut() else { return Ok(()) };
    let Some(mut namespaces) = linux.namespaces().clone() else { return Ok(()) };
    let refuse = |why: String| CallError::InvalidArgument(format!("oci_spec: linux.namespaces: {why}"));
    for namespace in &mut namespaces {
        let Some(path) = namespace.path().clone().filter(|p| !p.as_os_str().is_empty()) else { continue };
        let kind = match namespace.typ() {
            LinuxNamespaceType::Ipc => "ipc",
            LinuxNamespaceType::Uts => "uts",
            LinuxNamespaceType::Pid => "pid",
            other => {
                return Err(refuse(format!(
                    "{other:?} namespace {}: only ipc, uts and pid can be joined",
                    path.display()
                )))
            }
        };
        let pid = joins.ok_or_else(|| {
            refuse(format!("{kind} namespace {}: no container to join (join_namespaces_of)", path.display()))
        })?;
        let joined = PathBuf::from(format!("/proc/{pid}/ns/{kind}"));
        if let Err(err) = std::fs::symlink_metadata(&joined) {
            return Err(CallError::FailedPrecondition(format!(
                "joining the pod's {kind} namespace ({}): {err}: has its sandbox container exited?",
                joined.display()
            )));
        }
        namespace.set_path(Some(joined));
    }
    linux.set_namespaces(Some(namespaces));
    Ok(())
}

/// `root.path`: a directory inside the shared file system, named relative to it.
fn image_dir(spec: &Spec, shared: &Path) -> Result<PathBuf, CallError> {
    let invalid = |why: String| CallError::InvalidArgument(format!("oci_spec: root.path {why}"));
    let root =
        spec.root().as_ref().ok_or_else(|| CallError::InvalidArgument("oci_spec: root is missing".into()))?;
    let path = root.path();
    if path.as_os_str().is_empty() || !path.components().all(|c| matches!(c, Component::Normal(_))) {
        return Err(invalid(format!(
            "{}: must be relative to the shared directory, without `..` or `.`",
            path.display()
        )));
    }
    let dir = shared.join(path);
    match std::fs::symlink_metadata(&dir) {
        Ok(meta) if meta.is_dir() => Ok(dir),
        Ok(_) => Err(invalid(format!("{}: not a directory in the shared directory", path.display()))),
        Err(err) => {
            Err(invalid(format!("{}: {err} (in the shared directory {})", path.display(), shared.display())))
        }
    }
}

/// containerd names `linux.rootfsPropagation` as runc reads it (`rslave` for a pod with an
/// `rslave` volume, `rshared`, `rprivate`); libcontainer knows only the plain names and always
/// applies them recursively, so the `r` forms mean the same there.
fn name_rootfs_propagation_for_libcontainer(spec: &mut Spec) -> Result<(), CallError> {
    let Some(linux) = spec.linux_mut() else { return Ok(()) };
    let Some(given) = linux.rootfs_propagation().clone() else { return Ok(()) };
    let plain = match given.as_str() {
        "shared" | "rshared" => "shared",
        "slave" | "rslave" => "slave",
        "private" | "rprivate" => "private",
        "unbindable" | "runbindable" => "unbindable",
        _ => {
            return Err(CallError::InvalidArgument(format!(
                "oci_spec: linux.rootfsPropagation {given:?}: expected shared, slave, private or unbindable (or their r forms)"
            )))
        }
    };
    linux.set_rootfs_propagation(Some(plain.to_owned()));
    Ok(())
}

fn check_process(spec: &Spec) -> Result<(), CallError> {
    let process = spec
        .process()
        .as_ref()
        .ok_or_else(|| CallError::InvalidArgument("oci_spec: process is missing".into()))?;
    if process.args().as_ref().is_none_or(|args| args.is_empty()) {
        return Err(CallError::InvalidArgument("oci_spec: process.args is empty".into()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(namespaces: serde_json::Value) -> Spec {
        serde_json::from_value(
            serde_json::json!({"ociVersion": "1.0.2", "linux": {"namespaces": namespaces}}),
        )
        .unwrap()
    }

    fn paths(spec: &Spec) -> Vec<Option<PathBuf>> {
        let namespaces = spec.linux().as_ref().unwrap().namespaces().clone().unwrap();
        namespaces.iter().map(|ns| ns.path().clone()).collect()
    }

    /// What the shim reports to containerd as the runtime's mount options is what this
    /// runtime's parser takes (mount(2) flags, or mount_setattr(2) attributes over the tree).
    #[test]
    fn every_mount_option_reported_to_containerd_is_one_libcontainer_applies() {
        use libcontainer::syscall::linux::{MountOption, MountRecursive};
        use std::str::FromStr;
        let plain = MountOption::known_options();
        for option in husk_protocols::GUEST_MOUNT_OPTIONS {
            let known = plain.iter().any(|o| o == option) || MountRecursive::from_str(option).is_ok();
            assert!(known, "{option} is reported but libcontainer does not apply it");
        }
        for option in plain {
            assert!(
                husk_protocols::GUEST_MOUNT_OPTIONS.contains(&option.as_str()),
                "{option} is not reported"
            );
        }
    }

    #[test]
    fn rootfs_propagation_takes_the_names_libcontainer_knows_and_refuses_others_by_name() {
        for (given, plain) in [("rslave", "slave"), ("rshared", "shared"), ("private", "private")] {
            let mut spec: Spec =
                serde_json::from_value(serde_json::json!({"linux": {"rootfsPropagation": given}})).unwrap();
            name_rootfs_propagation_for_libcontainer(&mut spec).unwrap();
            assert_eq!(spec.linux().as_ref().unwrap().rootfs_propagation().as_deref(), Some(plain));
        }
        let mut spec: Spec =
            serde_json::from_value(serde_json::json!({"linux": {"rootfsPropagation": "sideways"}})).unwrap();
        let err = name_rootfs_propagation_for_libcontainer(&mut spec).unwrap_err().to_string();
        assert!(err.contains("linux.rootfsPropagation") && err.contains("sideways"), "{err}");
    }

    #[test]
    fn namespaces_named_by_path_become_the_joined_containers() {
        let mut member = spec(serde_json::json!([
            {"type": "pid"},
            {"type": "ipc", "path": "/proc/4242/ns/ipc"},
            {"type": "uts", "path": "/proc/4242/ns/uts"},
            {"type": "mount"}
        ]));
        let me = std::process::id() as i32;
        join_namespaces(&mut member, Some(me)).unwrap();
        assert_eq!(
            paths(&member),
            [
                None,
                Some(format!("/proc/{me}/ns/ipc").into()),
                Some(format!("/proc/{me}/ns/uts").into()),
                None
            ]
        );
        // A container whose process is gone cannot be joined; the error says so.
        let mut late = spec(serde_json::json!([{"type": "ipc", "path": "/proc/1/ns/ipc"}]));
        let err = join_namespaces(&mut late, Some(i32::MAX)).unwrap_err().to_string();
        assert!(err.contains("has its sandbox container exited"), "{err}");
    }

    #[test]
    fn a_namespace_by_path_without_a_container_to_join_or_of_another_kind_is_refused_by_name() {
        let mut orphan = spec(serde_json::json!([{"type": "ipc", "path": "/proc/1/ns/ipc"}]));
        let err = join_namespaces(&mut orphan, None).unwrap_err().to_string();
        assert!(err.contains("linux.namespaces") && err.contains("join_namespaces_of"), "{err}");
        let mut mount = spec(serde_json::json!([{"type": "mount", "path": "/proc/1/ns/mnt"}]));
        let err = join_namespaces(&mut mount, Some(17)).unwrap_err().to_string();
        assert!(err.contains("Mount") && err.contains("only ipc, uts and pid"), "{err}");
    }
}
