//! [`SandboxDir`]: one pod's directory on the host, `<root>/<id>/`, holding the VM's hybrid vsock
//! socket, its console log and `shared/`, the directory the guest sees over virtio-fs (container
//! rootfs and volumes are mounted into it). Dropping it unmounts whatever is still mounted below
//! it and removes it: nothing of a pod survives its end. [`SandboxDir::remove_leftover`] does the
//! same for the directory of a shim that was killed.

use std::path::{Path, PathBuf};

use containerd_shim::mount::{mount_rootfs, umount_recursive};
use nix::mount::{mount, MntFlags, MsFlags};

/// Why a sandbox directory or one of its mounts cannot be made.
#[derive(Debug, thiserror::Error)]
pub enum SandboxDirError {
    #[error("sandbox directory {}: {source}", path.display())]
    Create { path: PathBuf, source: std::io::Error },
    #[error("sandbox {id:?} exists already at {}", path.display())]
    Exists { id: String, path: PathBuf },
    #[error("sharing {} with the guest: {source}", from.display())]
    Bind { from: PathBuf, source: nix::Error },
    #[error("sharing {} with the guest: {source}", from.display())]
    Source { from: PathBuf, source: std::io::Error },
    #[error("mounting {fs_type} {source_path:?} at {}: {reason}", target.display())]
    Mount { fs_type: String, source_path: String, target: PathBuf, reason: String },
    #[error("{name:?}: not a plain name inside the shared directory")]
    Name { name: String },
    #[error("unmounting below {}: {reason}", path.display())]
    Unmount { path: PathBuf, reason: String },
}

/// See the module documentation.
#[derive(Debug)]
pub struct SandboxDir {
    path: PathBuf,
}

impl SandboxDir {
    /// Creates `<root>/<id>/shared`; fails if the sandbox exists.
    pub fn create(root: &Path, id: &str) -> Result<SandboxDir, SandboxDirError> {
        let path = sandbox_path(root, id)?;
        let create_error = |source| SandboxDirError::Create { path: path.clone(), source };
        std::fs::create_dir_all(root).map_err(create_error)?;
        match std::fs::create_dir(&path) {
            Err(err) if err.kind() == std::io::ErrorKind::AlreadyExists => {
                return Err(SandboxDirError::Exists { id: id.to_owned(), path })
            }
            other => other.map_err(create_error)?,
        }
        let dir = SandboxDir { path };
        std::fs::create_dir(dir.shared())
            .map_err(|source| SandboxDirError::Create { path: dir.shared(), source })?;
        Ok(dir)
    }

    /// Unmounts and removes what a dead shim left of sandbox `id` under `root`; nothing there is
    /// not an error.
    pub fn remove_leftover(root: &Path, id: &str) -> Result<(), SandboxDirError> {
        let path = sandbox_path(root, id)?;
        if !path.exists() {
            return Ok(());
        }
        unmount_below(&path)?;
        std::fs::remove_dir_all(&path).map_err(|source| SandboxDirError::Create { path, source })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The directory the guest mounts over virtio-fs.
    pub fn shared(&self) -> PathBuf {
        self.path.join("shared")
    }

    /// The VM's hybrid vsock socket.
    pub fn vsock_socket(&self) -> PathBuf {
        self.path.join("vsock.sock")
    }

    /// The guest console log.
    pub fn console_log(&self) -> PathBuf {
        self.path.join("console.log")
    }

    /// Makes host path `from` (a directory or a file) visible to the guest at `shared/<name>`
    /// (a bind mount, read-only if `read_only`); returns that path. `name` may have several
    /// components (`<container>/mounts/0`) but no `..`.
    pub fn share(&self, from: &Path, name: &str, read_only: bool) -> Result<PathBuf, SandboxDirError> {
        let is_dir = std::fs::metadata(from)
            .map_err(|source| SandboxDirError::Source { from: from.to_path_buf(), source })?
            .is_dir();
        let target = self.mount_point(name, is_dir)?;
        let bind_error = |source| SandboxDirError::Bind { from: from.to_path_buf(), source };
        mount(Some(from), &target, None::<&str>, MsFlags::MS_BIND | MsFlags::MS_REC, None::<&str>)
            .map_err(bind_error)?;
        if read_only {
            let flags = MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY;
            mount(None::<&str>, &target, None::<&str>, flags, None::<&str>).map_err(bind_error)?;
        }
        Ok(target)
    }

    /// Mounts a file system (as containerd describes a rootfs mount: type, source, options, e.g.
    /// an overlay of image layers) at `shared/<name>`; returns that path.
    pub fn mount(
        &self,
        name: &str,
        fs_type: &str,
        source: &str,
        options: &[String],
    ) -> Result<PathBuf, SandboxDirError> {
        let target = self.mount_point(name, true)?;
        let fs = Some(fs_type).filter(|t| !t.is_empty());
        let src = Some(source).filter(|s| !s.is_empty());
        mount_rootfs(fs, src, options, &target).map_err(|err| SandboxDirError::Mount {
            fs_type: fs_type.to_owned(),
            source_path: source.to_owned(),
            target: target.clone(),
            reason: err.to_string(),
        })?;
        Ok(target)
    }

    /// Unmounts everything below `shared/<name>` and removes it (a container going away).
    pub fn release(&self, name: &str) -> Result<(), SandboxDirError> {
        let path = self.shared().join(checked_name(name)?);
        if !path.exists() {
            return Ok(());
        }
        unmount_below(&path)?;
        std::fs::remove_dir_all(&path).map_err(|source| SandboxDirError::Create { path, source })
    }

    /// Creates `shared/<name>` (a directory, or an empty file to bind a file onto).
    fn mount_point(&self, name: &str, is_dir: bool) -> Result<PathBuf, SandboxDirError> {
        let target = self.shared().join(checked_name(name)?);
        let create_error = |path: &Path, source| SandboxDirError::Create { path: path.to_path_buf(), source };
        if is_dir {
            std::fs::create_dir_all(&target).map_err(|e| create_error(&target, e))?;
        } else {
            if let Some(parent) = target.parent() {
                std::fs::create_dir_all(parent).map_err(|e| create_error(parent, e))?;
            }
            std::fs::File::create(&target).map_err(|e| create_error(&target, e))?;
        }
        Ok(target)
    }
}

impl Drop for SandboxDir {
    fn drop(&mut self) {
        if let Err(err) = unmount_below(&self.path) {
            tracing::warn!(path = %self.path.display(), %err, "unmounting the sandbox's shares");
        }
        if let Err(err) = std::fs::remove_dir_all(&self.path) {
            tracing::warn!(path = %self.path.display(), %err, "removing the sandbox directory");
        }
    }
}

fn sandbox_path(root: &Path, id: &str) -> Result<PathBuf, SandboxDirError> {
    Ok(root.join(checked_name(id)?))
}

/// `name` as a relative path without `.`/`..` or a root: it cannot leave the directory it is
/// joined to.
fn checked_name(name: &str) -> Result<&Path, SandboxDirError> {
    let path = Path::new(name);
    let plain = !name.is_empty() && path.components().all(|c| matches!(c, std::path::Component::Normal(_)));
    plain.then_some(path).ok_or_else(|| SandboxDirError::Name { name: name.to_owned() })
}

/// Unmounts every mount at or below `path`, deepest first (lazily: a share still open on the
/// host must not keep the pod's directory alive).
fn unmount_below(path: &Path) -> Result<(), SandboxDirError> {
    let unmount_error = |reason: String| SandboxDirError::Unmount { path: path.to_path_buf(), reason };
    let text = path.to_str().ok_or_else(|| unmount_error("not UTF-8".into()))?;
    umount_recursive(Some(text), MntFlags::MNT_DETACH.bits()).map_err(|err| unmount_error(err.to_string()))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn names_cannot_leave_the_shared_directory() {
        for bad in ["", "..", "../x", "/etc", "a/../../b", "./a"] {
            assert!(checked_name(bad).is_err(), "{bad:?} accepted");
        }
        assert_eq!(checked_name("c1/mounts/0").unwrap(), Path::new("c1/mounts/0"));
    }

    #[test]
    fn create_refuses_an_existing_sandbox_and_drop_removes_it() {
        let root = tempfile::tempdir().unwrap();
        let dir = SandboxDir::create(root.path(), "pod").unwrap();
        assert!(dir.shared().is_dir());
        assert!(matches!(SandboxDir::create(root.path(), "pod"), Err(SandboxDirError::Exists { .. })));
        let path = dir.path().to_path_buf();
        drop(dir);
        assert!(!path.exists());
        SandboxDir::remove_leftover(root.path(), "pod").unwrap();
    }
}
