//! The host directory shared with the guest and the file system that serves it.
//!
//! Confinement (what keeps the guest inside the directory) comes from the passthrough file
//! system: every name is opened relative to its parent's descriptor with `O_NOFOLLOW` (a symlink
//! is returned to the guest as a symlink and resolved in the guest's namespace, never on the
//! host), names with `/` are refused, `..` at the root is the root, only regular files and
//! directories are ever opened, and file handles are never taken from the guest
//! (`inode_file_handles` off). On top of that Husk:
//! - confines the serving thread: its root is the share ([`crate::jail::enter_root`]) and it keeps only
//!   [`SHARE_CAPABILITIES`] ([`keep_share_capabilities`]);
//! - refuses device nodes: the serving thread holds no `CAP_MKNOD`, so a guest
//!   `mknod` of a character or block device fails with `EPERM` (FIFOs, sockets and overlayfs's
//!   0:0 whiteouts still work);
//! - refuses extended attributes consistently (`xattr` off: the guest sees `EOPNOTSUPP`), so the
//!   guest cannot set `security.*` or `trusted.*` attributes on host files.
//!
//! Ownership and modes are preserved: each request runs with the guest caller's uid and gid (the
//! VMM needs root for that), so guest root is root within the shared directory. Keep the shared
//! directory under a root-only parent on a `nosuid` mount: files the guest marks setuid must not
//! be reachable by host users.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use fuse_backend_rs::api::filesystem::FsOptions;
use fuse_backend_rs::api::server::Server;
use fuse_backend_rs::api::{Vfs, VfsOptions};
use fuse_backend_rs::passthrough::{CachePolicy, Config, PassthroughFs};

use super::bounded::BoundedFs;

/// How long the guest may cache names and attributes.
pub const CACHE_TIMEOUT: Duration = Duration::from_secs(1);

/// The FUSE server of one shared directory.
pub type FsServer = Server<BoundedFs<Arc<Vfs>>>;

/// Why a directory cannot be shared.
#[derive(Debug, thiserror::Error)]
pub enum ShareError {
    #[error("shared directory {}: {source}", dir.display())]
    Directory { dir: PathBuf, source: std::io::Error },
    #[error("shared directory {} is not a directory", .0.display())]
    NotADirectory(PathBuf),
    #[error("shared directory {}: path is not valid UTF-8", .0.display())]
    NotUtf8(PathBuf),
    #[error("serving shared directory {}: {reason}", dir.display())]
    Serve { dir: PathBuf, reason: String },
}

/// Builds the FUSE server for `dir` (which must exist and be a directory), holding at most
/// `max_fds` host files (inodes and open handles) for the guest.
pub fn serve_directory(dir: &Path, max_fds: usize) -> Result<FsServer, ShareError> {
    let metadata =
        std::fs::metadata(dir).map_err(|source| ShareError::Directory { dir: dir.to_path_buf(), source })?;
    if !metadata.is_dir() {
        return Err(ShareError::NotADirectory(dir.to_path_buf()));
    }
    let root_dir = dir.to_str().ok_or_else(|| ShareError::NotUtf8(dir.to_path_buf()))?.to_owned();
    let serve_error = |reason: String| ShareError::Serve { dir: dir.to_path_buf(), reason };
    let config = Config {
        root_dir,
        cache_policy: CachePolicy::Auto,
        entry_timeout: CACHE_TIMEOUT,
        attr_timeout: CACHE_TIMEOUT,
        writeback: false,
        xattr: false,
        inode_file_handles: false,
        // Imported below and mounted under Vfs, which checks names on the way in.
        do_import: false,
        ..Default::default()
    };
    let passthrough = PassthroughFs::<()>::new(config).map_err(|e| serve_error(e.to_string()))?;
    // import() sets umask(0), which is shared by every thread of the process (the whole shim's
    // files would be made 0666/0777): do it on a thread with a file-system context of its own.
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                own_fs_context_without_umask()?;
                passthrough.import()
            })
            .join()
            .unwrap_or_else(|_| Err(std::io::Error::other("the import thread panicked")))
    })
    .map_err(|e| serve_error(e.to_string()))?;
    let vfs = Vfs::new(vfs_options());
    vfs.mount(Box::new(passthrough), "/").map_err(|e| serve_error(format!("{e:?}")))?;
    Ok(Server::new(BoundedFs::new(Arc::new(vfs), max_fds)))
}

/// Options negotiated with the guest at FUSE_INIT: large requests, parallel lookups, automatic
/// invalidation of cached data on size/mtime change; nothing that needs a notification queue,
/// DAX or exclusive access.
fn vfs_options() -> VfsOptions {
    let defaults = VfsOptions::default();
    let unsupported = FsOptions::EXPLICIT_INVAL_DATA
        | FsOptions::PERFILE_DAX
        | FsOptions::WRITEBACK_CACHE
        | FsOptions::HANDLE_KILLPRIV_V2;
    VfsOptions {
        no_open: false,
        no_opendir: false,
        no_writeback: true,
        killpriv_v2: false,
        out_opts: defaults.out_opts - unsupported,
        ..defaults
    }
}

/// Gives the calling thread its own file-system context ([`crate::jail::own_fs_context`]: umask,
/// root and working directory) with umask 0: the passthrough server applies each request's own
/// umask to the modes the guest asks for, so the thread serving them must mask nothing more, and
/// only that thread may have umask 0 (the rest of the process keeps its own).
pub fn own_fs_context_without_umask() -> std::io::Result<()> {
    crate::jail::own_fs_context()?;
    // SAFETY: umask only sets this thread's (now unshared) file mode creation mask.
    unsafe { libc::umask(0) };
    Ok(())
}

/// What the thread serving the share may still do as root: act as the guest's caller
/// (`setresuid`/`setresgid` per request) and, for guest root, what root may do to files it does
/// not own (chown, permission bits, setgid bits). `CAP_DAC_READ_SEARCH` stays because the
/// passthrough server makes hard links with `linkat(fd, "", AT_EMPTY_PATH)`, which needs it
/// before Linux 6.10; what makes it dangerous, `open_by_handle_at` (a handle can name any file
/// of the file system, outside the share too), is refused by the thread's seccomp filter. Not
/// `CAP_MKNOD` (no device nodes on the host), `CAP_SYS_ADMIN`, `CAP_SYS_CHROOT`...
pub const SHARE_CAPABILITIES: &[caps::Capability] = &[
    caps::Capability::CAP_CHOWN,
    caps::Capability::CAP_DAC_OVERRIDE,
    caps::Capability::CAP_DAC_READ_SEARCH,
    caps::Capability::CAP_FOWNER,
    caps::Capability::CAP_FSETID,
    caps::Capability::CAP_SETGID,
    caps::Capability::CAP_SETUID,
];

/// Leaves the calling thread only [`SHARE_CAPABILITIES`]. Capabilities are per thread, so this
/// confines only the thread serving the guest's requests.
pub fn keep_share_capabilities() -> Result<(), caps::errors::CapsError> {
    crate::jail::keep_capabilities(SHARE_CAPABILITIES)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The import's umask(0) stays on its own thread: the process keeps its umask (the shim's
    /// sandbox files would otherwise be world-writable).
    #[test]
    fn serving_a_directory_leaves_the_process_umask_alone() {
        let dir = tempfile::tempdir().unwrap();
        // SAFETY: umask only sets this thread's file mode creation mask (restored below).
        let before = unsafe { libc::umask(0o027) };
        let served = serve_directory(dir.path(), super::super::DEFAULT_MAX_FDS);
        // SAFETY: as above; reading it back means setting it.
        let after = unsafe { libc::umask(before) };
        assert!(served.is_ok());
        assert_eq!(after, 0o027);
    }
}
