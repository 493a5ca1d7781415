//! [`SandboxDir`]: one pod's directory on the host, `<root>/<id>/`, holding the VM's hybrid vsock
//! socket, its console log and `shared/`, the directory the guest sees over virtio-fs (container
//! rootfs and volumes are bind-mounted into it). Dropping it unmounts whatever is still mounted
//! below it and removes it: nothing of a pod survives its end.

use std::path::{Path, PathBuf};

use nix::mount::{mount, umount2, MntFlags, MsFlags};

/// Why a sandbox directory or one of its mounts cannot be made.
#[derive(Debug, thiserror::Error)]
pub enum SandboxDirError {
    #[error("sandbox directory {}: {source}", path.display())]
    Create { path: PathBuf, source: std::io::Error },
    #[error("sandbox {id:?} exists already at {}", path.display())]
    Exists { id: String, path: PathBuf },
    #[error("sharing {} with the guest: {source}", from.display())]
    Bind { from: PathBuf, source: nix::Error },
}

/// See the module documentation.
#[derive(Debug)]
pub struct SandboxDir {
    path: PathBuf,
    /// Bind mounts made under `shared/`, most recent last.
    mounts: Vec<PathBuf>,
}

impl SandboxDir {
    /// Creates `<root>/<id>/shared`; fails if the sandbox exists.
    pub fn create(root: &Path, id: &str) -> Result<SandboxDir, SandboxDirError> {
        let path = root.join(id);
        let create_error = |source| SandboxDirError::Create { path: path.clone(), source };
        std::fs::create_dir_all(root).map_err(create_error)?;
        match std::fs::create_dir(&path) {
            Err(err) if err.kind() == std::io::ErrorKind::AlreadyExists => {
                return Err(SandboxDirError::Exists { id: id.to_owned(), path })
            }
            other => other.map_err(create_error)?,
        }
        let dir = SandboxDir { path, mounts: Vec::new() };
        std::fs::create_dir(dir.shared())
            .map_err(|source| SandboxDirError::Create { path: dir.shared(), source })?;
        Ok(dir)
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

    /// Makes host directory `from` visible to the guest at `shared/<name>` (a bind mount,
    /// read-only if `read_only`); returns `name`'s path.
    pub fn share(&mut self, from: &Path, name: &str, read_only: bool) -> Result<PathBuf, SandboxDirError> {
        let target = self.shared().join(name);
        let bind_error = |source| SandboxDirError::Bind { from: from.to_path_buf(), source };
        std::fs::create_dir_all(&target)
            .map_err(|source| SandboxDirError::Create { path: target.clone(), source })?;
        mount(Some(from), &target, None::<&str>, MsFlags::MS_BIND | MsFlags::MS_REC, None::<&str>)
            .map_err(bind_error)?;
        self.mounts.push(target.clone());
        if read_only {
            let flags = MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY;
            mount(None::<&str>, &target, None::<&str>, flags, None::<&str>).map_err(bind_error)?;
        }
        Ok(target)
    }
}

impl Drop for SandboxDir {
    fn drop(&mut self) {
        for target in self.mounts.iter().rev() {
            if let Err(err) = umount2(target, MntFlags::MNT_DETACH) {
                tracing::warn!(path = %target.display(), %err, "unmounting a shared directory");
            }
        }
        if let Err(err) = std::fs::remove_dir_all(&self.path) {
            tracing::warn!(path = %self.path.display(), %err, "removing the sandbox directory");
        }
    }
}
