//! The pod's cgroup on the node: the shim process (its VMM, vCPU and device threads) joins the
//! cgroup the pod's sandbox container names (`linux.cgroupsPath`) before the VM's memory exists,
//! so everything the VM costs the node (guest RAM it touches, the VMM, the host page cache of the
//! share) is charged to the pod and limited by the pod's cgroup, as Kata's
//! `sandbox_cgroup_only`. The kubelet sizes that pod cgroup as the containers' limits plus the
//! RuntimeClass overhead (configs/runtimeclass.yaml says what the overhead must cover).
//!
//! When the pod's VM is gone the shim moves back to the cgroup it came from and removes the
//! pod's cgroup if it made it, as runc removes a container's.
//!
//! Paths are read as runc reads them on cgroup v2: absolute paths from the root of the cgroup
//! mount, relative ones from the shim's own cgroup, and the systemd driver's
//! `slice:prefix:name` as the cgroupfs path systemd would give that scope (the shim creates the
//! directory itself; it is not registered as a systemd unit).

use std::fs;
use std::path::{Component, Path, PathBuf};

use std::os::unix::fs::DirBuilderExt;

/// Where the node's cgroup v2 hierarchy is mounted.
const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// Why the shim could not join the pod's cgroup.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("linux.cgroupsPath {path:?}: {reason}")]
    Path { path: String, reason: String },
    #[error("reading this process's cgroup (/proc/self/cgroup): {0}")]
    Own(String),
    #[error("the pod's cgroup {}: {source}", path.display())]
    Join { path: PathBuf, source: std::io::Error },
}

/// The pod's cgroup, joined; dropping it leaves it (and removes it when the shim made it).
#[derive(Debug)]
pub struct PodCgroup {
    /// Full path of the pod's cgroup directory.
    path: PathBuf,
    /// Full path of the cgroup the shim was in before.
    origin: PathBuf,
    /// The shim created `path` (so it removes it).
    created: bool,
}

impl PodCgroup {
    /// Moves this process into `cgroups_path`, created with its missing parents (mode 0755, as
    /// runc makes them) and the controllers the root offers enabled down to it, so the pod's
    /// cgroup accounts memory, CPU and PIDs of its own.
    pub fn join(cgroups_path: &str) -> Result<PodCgroup, CgroupError> {
        let own = own_cgroup()?;
        let relative = resolve(cgroups_path, &own)?;
        let root = PathBuf::from(CGROUP_ROOT);
        let path = root.join(&relative);
        let origin = root.join(own.strip_prefix("/").unwrap_or(&own));
        let created = !path.exists();
        if let Err(source) = create_and_enter(&root, &relative) {
            if created {
                let _ = fs::remove_dir(&path);
            }
            return Err(CgroupError::Join { path, source });
        }
        tracing::info!(cgroup = %path.display(), created, "the shim joined the pod's cgroup");
        Ok(PodCgroup { path, origin, created })
    }

    /// Full path of the pod's cgroup directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Removes the pod's cgroup a shim that died (SIGKILL, the node's OOM killer) could not
    /// leave: only an empty one (rmdir), so a live pod's is never touched.
    pub fn remove_leftover(cgroups_path: &str) -> Result<(), CgroupError> {
        let path = Path::new(CGROUP_ROOT).join(resolve(cgroups_path, &own_cgroup()?)?);
        match fs::remove_dir(&path) {
            Err(err) if err.kind() != std::io::ErrorKind::NotFound => {
                Err(CgroupError::Join { path, source: err })
            }
            _ => Ok(()),
        }
    }
}

impl Drop for PodCgroup {
    fn drop(&mut self) {
        let procs = self.origin.join("cgroup.procs");
        if let Err(err) = fs::write(&procs, std::process::id().to_string()) {
            tracing::warn!(cgroup = %self.path.display(), origin = %self.origin.display(), %err,
                "cannot move the shim back out of the pod's cgroup");
            return;
        }
        if self.created {
            if let Err(err) = fs::remove_dir(&self.path) {
                tracing::warn!(cgroup = %self.path.display(), %err, "cannot remove the pod's cgroup");
            }
        }
    }
}

/// Creates `root/relative` and moves this process in. Each ancestor delegates the root's
/// controllers to its children (best effort: a controller an ancestor cannot pass on, e.g. one
/// with processes of its own, is still accounted higher up).
fn create_and_enter(root: &Path, relative: &Path) -> std::io::Result<()> {
    let controllers = fs::read_to_string(root.join("cgroup.controllers"))?;
    let enable: Vec<String> = controllers.split_whitespace().map(|c| format!("+{c}")).collect();
    let mut dir = root.to_path_buf();
    for name in relative.iter() {
        for controller in &enable {
            // One write per controller: one the kernel refuses must not hold back the others.
            let _ = fs::write(dir.join("cgroup.subtree_control"), controller);
        }
        dir.push(name);
        match fs::DirBuilder::new().mode(0o755).create(&dir) {
            Err(err) if err.kind() != std::io::ErrorKind::AlreadyExists => return Err(err),
            _ => {}
        }
    }
    fs::write(dir.join("cgroup.procs"), std::process::id().to_string())
}

/// This process's cgroup v2 path (`0::/path` of `/proc/self/cgroup`).
fn own_cgroup() -> Result<PathBuf, CgroupError> {
    let text = fs::read_to_string("/proc/self/cgroup").map_err(|err| CgroupError::Own(err.to_string()))?;
    parse_own(&text).ok_or_else(|| {
        CgroupError::Own(format!("no cgroup v2 entry (0::) in {text:?}: the node must use cgroup v2"))
    })
}

fn parse_own(text: &str) -> Option<PathBuf> {
    text.lines().find_map(|line| line.strip_prefix("0::")).map(PathBuf::from)
}

/// `cgroups_path` as a path relative to the cgroup root, the shim's own cgroup being `own`.
fn resolve(cgroups_path: &str, own: &Path) -> Result<PathBuf, CgroupError> {
    let refuse =
        |reason: &str| CgroupError::Path { path: cgroups_path.to_owned(), reason: reason.to_owned() };
    let path = match systemd_path(cgroups_path) {
        Some(path) => path.ok_or_else(|| refuse("not a systemd slice:prefix:name"))?,
        None if cgroups_path.starts_with('/') => PathBuf::from(cgroups_path),
        None => own.join(cgroups_path),
    };
    let mut relative = PathBuf::new();
    for component in path.components() {
        match component {
            Component::RootDir | Component::CurDir => {}
            Component::Normal(name) => relative.push(name),
            Component::ParentDir | Component::Prefix(_) => {
                return Err(refuse("must not leave its parent (..)"))
            }
        }
    }
    if relative.as_os_str().is_empty() {
        return Err(refuse("names the root cgroup, which a pod cannot have"));
    }
    Ok(relative)
}

/// The systemd driver's `slice:prefix:name` as a cgroupfs path (`None`: not that form, e.g. a
/// path with a `/`; `Some(None)`: that form, malformed): the slice nests by its dashes (`a-b.slice` is `a.slice/a-b.slice`) and
/// the unit is the scope `prefix-name.scope`.
fn systemd_path(cgroups_path: &str) -> Option<Option<PathBuf>> {
    if cgroups_path.contains('/') {
        return None;
    }
    let mut parts = cgroups_path.split(':');
    let (slice, prefix, name) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() {
        return Some(None);
    }
    let slice = if slice.is_empty() { "system.slice" } else { slice };
    let Some(stem) = slice.strip_suffix(".slice") else { return Some(None) };
    if name.is_empty() || stem.is_empty() || stem.split('-').any(str::is_empty) {
        return Some(None);
    }
    let mut path = PathBuf::from("/");
    let mut nested = String::new();
    for part in stem.split('-') {
        if !nested.is_empty() {
            nested.push('-');
        }
        nested.push_str(part);
        path.push(format!("{nested}.slice"));
    }
    path.push(match prefix {
        "" => format!("{name}.scope"),
        _ => format!("{prefix}-{name}.scope"),
    });
    Some(Some(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resolved(path: &str) -> Result<String, String> {
        resolve(path, Path::new("/system.slice/containerd.service"))
            .map(|p| p.display().to_string())
            .map_err(|err| err.to_string())
    }

    #[test]
    fn cgroupfs_paths_are_read_as_runc_reads_them() {
        assert_eq!(resolved("/default/web").unwrap(), "default/web");
        assert_eq!(resolved("/kubepods/burstable/pod1/abc").unwrap(), "kubepods/burstable/pod1/abc");
        assert_eq!(resolved("pods/abc").unwrap(), "system.slice/containerd.service/pods/abc");
    }

    #[test]
    fn systemd_paths_become_the_scope_systemd_would_make() {
        assert_eq!(
            resolved("kubepods-burstable-pod12.slice:cri-containerd:abc").unwrap(),
            "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod12.slice/cri-containerd-abc.scope"
        );
        assert_eq!(resolved(":husk:abc").unwrap(), "system.slice/husk-abc.scope");
        for bad in ["kubepods.slice:cri:", "kube--pods.slice:p:n", "kubepods:p:n", "a.slice:b:c:d"] {
            let err = resolved(bad).unwrap_err();
            assert!(err.contains("linux.cgroupsPath") && err.contains("systemd"), "{bad}: {err}");
        }
    }

    #[test]
    fn a_path_that_leaves_its_parent_or_names_the_root_is_refused_by_name() {
        for bad in ["/kubepods/../../etc", "../escape", "/", "/./"] {
            let err = resolved(bad).unwrap_err();
            assert!(err.starts_with(&format!("linux.cgroupsPath {bad:?}")), "{err}");
        }
    }

    #[test]
    fn the_own_cgroup_is_the_unified_entry() {
        let text = "12:memory:/old\n0::/system.slice/containerd.service\n";
        assert_eq!(parse_own(text), Some(PathBuf::from("/system.slice/containerd.service")));
        assert_eq!(parse_own("4:cpu:/x\n"), None);
    }
}
