//! [`SandboxDir`]: one pod's directory on the host, `<root>/<id>/` (mode 0700), holding the VM's
//! hybrid vsock socket, its console log, and the two trees of the pod's share:
//!
//! - `mounts/`: host-private; the shim creates every mount point here (container rootfs and
//!   volumes) and nothing else writes to it.
//! - `shared/`: what the guest sees over virtio-fs: a read-only bind of `mounts/` that receives
//!   its mounts by (slave) propagation, so each rootfs and volume keeps its own flags (a rootfs stays
//!   writable) while the tree around them cannot be changed from the guest. A guest with root
//!   cannot plant a symlink or directory at a name the shim will mount on (Kata's CVE-2020-2026):
//!   the shim never resolves a path through anything the guest can write.
//!
//! `<id>` itself is a private mount, so none of this propagates into the node's other mount
//! namespaces. Dropping it unmounts whatever is still mounted below it and removes it, unless an
//! unmount failed (it never deletes through a mount): nothing of a pod survives its end.
//! [`SandboxDir::remove_leftover`] does the same for the directory of a shim that was killed.

use std::path::{Path, PathBuf};

use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};

use containerd_shim::mount::mount_rootfs;
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
    #[error("sharing {} with the guest: {source}", from.display())]
    Source { from: PathBuf, source: std::io::Error },
    #[error("mounting {fs_type} {source_path:?} at {}: {reason}", target.display())]
    Mount { fs_type: String, source_path: String, target: PathBuf, reason: String },
    #[error("{name:?}: not a plain name inside the shared directory")]
    Name { name: String },
    #[error("unmounting below {}: {reason}", path.display())]
    Unmount { path: PathBuf, reason: String },
    #[error("the node's kernel lacks {needs}, which Husk needs to confine a pod's mounts")]
    Kernel { needs: &'static str },
    #[error("{}: still mounted after unmounting; left in place", path.display())]
    StillMounted { path: PathBuf },
}

/// See the module documentation.
#[derive(Debug)]
pub struct SandboxDir {
    path: PathBuf,
    /// Names binds in `staging/` while their flags are set (see [`SandboxDir::share`]).
    next_staging: std::sync::atomic::AtomicU64,
}

impl SandboxDir {
    /// Creates `<root>/<id>` with its private `mounts/` and the guest's `shared/` view of it;
    /// fails if the sandbox exists.
    pub fn create(root: &Path, id: &str) -> Result<SandboxDir, SandboxDirError> {
        let root_error = |source| SandboxDirError::Create { path: root.to_path_buf(), source };
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(root).map_err(root_error)?;
        // Canonical: teardown finds the pod's mounts by this path in the mount table.
        let root = std::fs::canonicalize(root).map_err(root_error)?;
        let path = sandbox_path(&root, id)?;
        let create_error = |source| SandboxDirError::Create { path: path.clone(), source };
        match std::fs::DirBuilder::new().mode(0o700).create(&path) {
            Err(err) if err.kind() == std::io::ErrorKind::AlreadyExists => {
                return Err(SandboxDirError::Exists { id: id.to_owned(), path })
            }
            other => other.map_err(create_error)?,
        }
        // From here on, drop unmounts and removes whatever was made.
        let dir = SandboxDir { path, next_staging: Default::default() };
        dir.make_share_trees()?;
        Ok(dir)
    }

    /// `<id>` a private mount (nothing below propagates out), `mounts/` a shared one, `shared/` a
    /// read-only slave bind of it.
    fn make_share_trees(&self) -> Result<(), SandboxDirError> {
        let (mounts, shared) = (self.mounts(), self.shared());
        for dir in [&mounts, &shared, &self.staging()] {
            std::fs::DirBuilder::new()
                .mode(0o700)
                .create(dir)
                .map_err(|source| SandboxDirError::Create { path: dir.clone(), source })?;
        }
        let bind = |from: &Path, to: &Path| {
            mount(Some(from), to, None::<&str>, MsFlags::MS_BIND, None::<&str>)
                .map_err(|source| SandboxDirError::Bind { from: from.to_path_buf(), source })
        };
        let set = |at: &Path, flags: MsFlags| {
            mount(None::<&str>, at, None::<&str>, flags, None::<&str>)
                .map_err(|source| SandboxDirError::Bind { from: at.to_path_buf(), source })
        };
        bind(&self.path, &self.path)?;
        set(&self.path, MsFlags::MS_PRIVATE)?;
        bind(&mounts, &mounts)?;
        set(&mounts, MsFlags::MS_SHARED)?;
        bind(&mounts, &shared)?;
        set(&shared, MsFlags::MS_SLAVE)?;
        set(
            &shared,
            MsFlags::MS_BIND
                | MsFlags::MS_REMOUNT
                | MsFlags::MS_RDONLY
                | MsFlags::MS_NOSUID
                | MsFlags::MS_NODEV,
        )
    }

    /// Unmounts and removes what a dead shim left of sandbox `id` under `root`; nothing there is
    /// not an error.
    pub fn remove_leftover(root: &Path, id: &str) -> Result<(), SandboxDirError> {
        let Ok(root) = std::fs::canonicalize(root) else { return Ok(()) };
        let path = sandbox_path(&root, id)?;
        if std::fs::symlink_metadata(&path).is_err() {
            return Ok(());
        }
        remove_unmounted(&path)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The directory the guest mounts over virtio-fs (read-only around the mounts it receives).
    pub fn shared(&self) -> PathBuf {
        self.path.join("shared")
    }

    /// Where binds get their flags before they move into `mounts/` (under the private `<id>`).
    fn staging(&self) -> PathBuf {
        self.path.join("staging")
    }

    /// The host-private tree the shim mounts into (seen by the guest as `shared/`).
    fn mounts(&self) -> PathBuf {
        self.path.join("mounts")
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
    /// (a recursive bind, `nosuid,nodev`, read-only as `access` says, receiving the node's
    /// later mounts under `from` as `propagation` says); returns its mount point. `name` may have
    /// several components (`<container>/mounts/0`) but no `..`.
    pub fn share(
        &self,
        from: &Path,
        name: &str,
        access: Access,
        propagation: Propagation,
    ) -> Result<PathBuf, SandboxDirError> {
        let is_dir = std::fs::metadata(from)
            .map_err(|source| SandboxDirError::Source { from: from.to_path_buf(), source })?
            .is_dir();
        let target = self.mount_point(name, is_dir)?;
        self.install(&target, is_dir, access, propagation, |staged| {
            mount(Some(from), staged, None::<&str>, MsFlags::MS_BIND | MsFlags::MS_REC, None::<&str>)
                .map_err(|source| SandboxDirError::Bind { from: from.to_path_buf(), source })
        })?;
        Ok(target)
    }

    /// Mounts a file system (as containerd describes a rootfs mount: type, source, options, e.g.
    /// an overlay of image layers) at `shared/<name>`, `nosuid,nodev`; returns its mount point.
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
        self.install(&target, true, Access::Writable, Propagation::Private, |staged| {
            mount_rootfs(fs, src, options, staged).map_err(|err| SandboxDirError::Mount {
                fs_type: fs_type.to_owned(),
                source_path: source.to_owned(),
                target: target.clone(),
                reason: err.to_string(),
            })
        })?;
        Ok(target)
    }

    /// Makes a mount with `make` in `staging/`, confines it there ([`confine`]), then moves it
    /// to `target` in the private tree, from where it propagates to the guest's view. Flags must
    /// be set before the move: a change of a mount's flags does not propagate, so a read-only
    /// volume would be writable in the view if it were made read-only in place.
    fn install(
        &self,
        target: &Path,
        is_dir: bool,
        access: Access,
        propagation: Propagation,
        make: impl FnOnce(&Path) -> Result<(), SandboxDirError>,
    ) -> Result<(), SandboxDirError> {
        let n = self.next_staging.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let staged = create_point(&self.staging().join(n.to_string()), is_dir)?;
        let confined = |()| confine(&staged, access, propagation);
        let installed = make(&staged).and_then(confined).and_then(|()| {
            mount(Some(&staged), target, None::<&str>, MsFlags::MS_MOVE, None::<&str>)
                .map_err(|source| SandboxDirError::Bind { from: staged.clone(), source })
        });
        if installed.is_err() {
            // Private first (a no-op when confine got that far): the unmount must not reach the
            // node through a peer of the mount's source.
            let _ = make_private(&staged);
            let _ = umount2(&staged, MntFlags::MNT_DETACH | MntFlags::UMOUNT_NOFOLLOW);
        }
        let _ = if is_dir { std::fs::remove_dir(&staged) } else { std::fs::remove_file(&staged) };
        installed
    }

    /// Unmounts everything below `shared/<name>` and removes it (a container going away).
    pub fn release(&self, name: &str) -> Result<(), SandboxDirError> {
        let path = self.mounts().join(checked_name(name)?);
        if std::fs::symlink_metadata(&path).is_err() {
            return Ok(());
        }
        remove_unmounted(&path)
    }

    /// Creates the mount point of `shared/<name>` in the private tree.
    fn mount_point(&self, name: &str, is_dir: bool) -> Result<PathBuf, SandboxDirError> {
        create_point(&self.mounts().join(checked_name(name)?), is_dir)
    }
}

/// Creates `target` as a mount point: a directory, or an empty file to bind a file onto (mode
/// 0600), with its parents (mode 0700); returns it.
fn create_point(target: &Path, is_dir: bool) -> Result<PathBuf, SandboxDirError> {
    let create_error = |path: &Path, source| SandboxDirError::Create { path: path.to_path_buf(), source };
    let mut dirs = std::fs::DirBuilder::new();
    dirs.recursive(true).mode(0o700);
    if is_dir {
        dirs.create(target).map_err(|e| create_error(target, e))?;
    } else {
        if let Some(parent) = target.parent() {
            dirs.create(parent).map_err(|e| create_error(parent, e))?;
        }
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(target)
            .map_err(|e| create_error(target, e))?;
    }
    Ok(target.to_path_buf())
}

/// Whether the guest may write through a share, on the node's side of it (the guest's own
/// mount options are the guest's to change).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Writable,
    /// runc's `ro`: the share's top mount is read-only, mounts under it keep their own flags.
    ReadOnly,
    /// `rro` (Kubernetes' recursive read-only volumes): read-only all through.
    RecursiveReadOnly,
}

impl Access {
    /// The access a bind mount's `options` ask for.
    pub fn of_options(options: &[String]) -> Access {
        if options.iter().any(|o| o == "rro") {
            Access::RecursiveReadOnly
        } else if options.iter().any(|o| o == "ro") {
            Access::ReadOnly
        } else {
            Access::Writable
        }
    }
}

/// Whether a share receives the mounts the node makes under its source after the share was made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Propagation {
    /// CRI's default (`rprivate`): it does not.
    Private,
    /// `rslave` (and the node-to-pod half of `rshared`): it does, as a slave of the source's
    /// mounts; the guest sees them as the share's content over virtio-fs.
    FromNode,
}

/// Confines the mount tree at `at` (in `staging/`): first private (or, for
/// [`Propagation::FromNode`], a slave) all through, with plain mount(2) before anything can fail,
/// so that nothing done to it (an unmount at teardown, or of a failed install) propagates to the
/// node it was bound from (a bind of a shared mount is a peer of it; a slave's events never reach
/// its master); then `nosuid,nodev` all through, so nothing the guest writes there runs setuid or opens
/// a device on the node; then read-only as `access` says.
/// `mount_setattr(2)` (Linux 5.12) changes only the flags named, where a remount would also drop
/// the source's own (`noexec`...).
fn confine(at: &Path, access: Access, propagation: Propagation) -> Result<(), SandboxDirError> {
    match propagation {
        Propagation::Private => make_private(at)?,
        Propagation::FromNode => make_slave(at)?,
    }
    set_mount_attr(at, true, MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV)?;
    match access {
        Access::Writable => Ok(()),
        Access::ReadOnly => set_mount_attr(at, false, MOUNT_ATTR_RDONLY),
        Access::RecursiveReadOnly => set_mount_attr(at, true, MOUNT_ATTR_RDONLY),
    }
}

/// Makes the mount tree at `at` private (`MS_REC | MS_PRIVATE`).
fn make_private(at: &Path) -> Result<(), SandboxDirError> {
    mount(None::<&str>, at, None::<&str>, MsFlags::MS_REC | MsFlags::MS_PRIVATE, None::<&str>)
        .map_err(|source| SandboxDirError::Bind { from: at.to_path_buf(), source })
}

/// Makes the mount tree at `at` a slave of its peers (`MS_REC | MS_SLAVE`); one that had none
/// becomes private.
fn make_slave(at: &Path) -> Result<(), SandboxDirError> {
    mount(None::<&str>, at, None::<&str>, MsFlags::MS_REC | MsFlags::MS_SLAVE, None::<&str>)
        .map_err(|source| SandboxDirError::Bind { from: at.to_path_buf(), source })
}

const MOUNT_ATTR_RDONLY: u64 = 0x1;
const MOUNT_ATTR_NOSUID: u64 = 0x2;
const MOUNT_ATTR_NODEV: u64 = 0x4;
const AT_RECURSIVE: libc::c_uint = 0x8000;

/// `struct mount_attr` of `mount_setattr(2)`.
#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

/// Sets `attributes` on the mount at `at`, and on every mount below it with `recursive`; never
/// through a symlink.
fn set_mount_attr(at: &Path, recursive: bool, attributes: u64) -> Result<(), SandboxDirError> {
    let error = |source| SandboxDirError::Bind { from: at.to_path_buf(), source };
    let path = std::ffi::CString::new(at.as_os_str().as_encoded_bytes())
        .map_err(|_| error(nix::errno::Errno::EINVAL))?;
    let attr = MountAttr { attr_set: attributes, attr_clr: 0, propagation: 0, userns_fd: 0 };
    let flags = libc::AT_SYMLINK_NOFOLLOW as libc::c_uint | if recursive { AT_RECURSIVE } else { 0 };
    // SAFETY: `path` is NUL-terminated and `attr` a valid mount_attr of the size passed; the
    // kernel only reads both.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            libc::AT_FDCWD,
            path.as_ptr(),
            flags,
            &raw const attr,
            std::mem::size_of::<MountAttr>(),
        )
    };
    if rc != 0 {
        let errno = nix::errno::Errno::last();
        if errno == nix::errno::Errno::ENOSYS {
            return Err(SandboxDirError::Kernel { needs: "mount_setattr(2), Linux 5.12 or later" });
        }
        return Err(error(errno));
    }
    Ok(())
}

impl Drop for SandboxDir {
    fn drop(&mut self) {
        if let Err(err) = remove_unmounted(&self.path) {
            tracing::warn!(path = %self.path.display(), %err, "removing the sandbox directory");
        }
    }
}

/// Unmounts everything at or below `path`, then removes it, unless something there is still
/// mounted (a removal would delete through it, into a volume or the node's files).
fn remove_unmounted(path: &Path) -> Result<(), SandboxDirError> {
    unmount_below(path)?;
    if !mounts_below(path)?.is_empty() {
        return Err(SandboxDirError::StillMounted { path: path.to_path_buf() });
    }
    std::fs::remove_dir_all(path)
        .map_err(|source| SandboxDirError::Create { path: path.to_path_buf(), source })
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

/// Unmounts every mount at or below `path` (lazily: a share still open on the
/// host must not keep the pod's directory alive; never through a symlink).
///
/// Only the outermost mounts are named: they are the shim's own mount points, in the private
/// tree, and a lazy unmount takes everything below each at once. A mount inside a volume the
/// guest writes is never unmounted by a path the guest could redirect.
fn unmount_below(path: &Path) -> Result<(), SandboxDirError> {
    for target in outermost(mounts_below(path)?) {
        // Stacked mounts at one point come off one by one; EINVAL: nothing mounted there any more.
        loop {
            match umount2(&target, MntFlags::MNT_DETACH | MntFlags::UMOUNT_NOFOLLOW) {
                Ok(()) => continue,
                Err(nix::errno::Errno::EINVAL | nix::errno::Errno::ENOENT) => break,
                Err(err) => {
                    return Err(SandboxDirError::Unmount {
                        path: path.to_path_buf(),
                        reason: format!("{}: {err}", target.display()),
                    })
                }
            }
        }
    }
    Ok(())
}

/// Mount points at or below `path` (the component-wise prefix: `/a/c1` is not below `/a/c`),
/// deepest first, from this process's mount table.
fn mounts_below(path: &Path) -> Result<Vec<PathBuf>, SandboxDirError> {
    let table = std::fs::read_to_string("/proc/self/mountinfo").map_err(|err| SandboxDirError::Unmount {
        path: path.to_path_buf(),
        reason: format!("reading /proc/self/mountinfo: {err}"),
    })?;
    let mut below: Vec<PathBuf> = table
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(|point| PathBuf::from(unescape_mount_point(point)))
        .filter(|point| point.starts_with(path))
        .collect();
    below.sort_by_key(|point| std::cmp::Reverse(point.components().count()));
    below.dedup();
    Ok(below)
}

/// The mount points of `points` that lie below no other one of them.
fn outermost(mut points: Vec<PathBuf>) -> Vec<PathBuf> {
    points.sort_by_key(|point| point.components().count());
    let mut kept: Vec<PathBuf> = Vec::new();
    for point in points {
        if !kept.iter().any(|outer| point.starts_with(outer)) {
            kept.push(point);
        }
    }
    kept
}

/// A mountinfo mount point with its octal escapes (`\040` for a space...) decoded.
fn unescape_mount_point(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .filter(|d| bytes[i] == b'\\' && d.iter().all(|b| (b'0'..=b'7').contains(b)));
        match octal {
            Some(digits) => {
                out.push(
                    digits.iter().fold(0u8, |value, digit| value.wrapping_mul(8).wrapping_add(digit - b'0')),
                );
                i += 4;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
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
    fn only_the_outermost_mounts_are_unmounted_by_path() {
        let points = ["/s/a/b", "/s/a", "/s/c/d/e", "/s/c/d", "/s/c/x", "/s/cd"].map(PathBuf::from).to_vec();
        let kept = outermost(points);
        assert_eq!(kept, ["/s/a", "/s/cd", "/s/c/d", "/s/c/x"].map(PathBuf::from).to_vec());
    }

    #[test]
    fn mount_points_with_escapes_are_decoded() {
        assert_eq!(unescape_mount_point(r"/run/a\040b/c\134d"), r"/run/a b/c\d");
        assert_eq!(unescape_mount_point(r"/plain\09"), r"/plain\09", "not an escape: kept");
    }

    /// The `statvfs` mount flags of `path` (`ST_RDONLY`, `ST_NOSUID`...).
    fn mount_flags(path: &Path) -> u64 {
        let c_path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a zeroed statvfs is valid plain data; statvfs only writes to it.
        let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
        // SAFETY: `c_path` is NUL-terminated and `stat` a valid out-pointer.
        assert_eq!(unsafe { libc::statvfs(c_path.as_ptr(), &mut stat) }, 0);
        stat.f_flag
    }

    fn is_read_only(path: &Path) -> bool {
        mount_flags(path) & libc::ST_RDONLY != 0
    }

    /// What the guest sees: the shim's mounts, writable where they are, and a tree around them it
    /// cannot plant anything in. Needs root (mounts), as the shim does.
    #[test]
    fn the_guest_view_takes_the_shims_mounts_but_refuses_new_names() {
        let root = tempfile::tempdir().unwrap();
        let volume = tempfile::tempdir().unwrap();
        let dir = SandboxDir::create(root.path(), "pod").unwrap();
        let shared = dir.shared();
        for planted in [shared.join("c1"), shared.join("x")] {
            let err = std::os::unix::fs::symlink("/etc", &planted).unwrap_err();
            assert_eq!(err.raw_os_error(), Some(libc::EROFS), "{}", planted.display());
        }
        dir.share(volume.path(), "c1/mounts/0", Access::Writable, Propagation::Private).unwrap();
        std::fs::write(shared.join("c1/mounts/0/written-by-guest"), b"x").unwrap();
        assert!(volume.path().join("written-by-guest").is_file(), "the volume is writable through the view");
        assert!(std::fs::create_dir(shared.join("c1/mounts/9")).is_err(), "no new names beside it");
        dir.share(volume.path(), "c1/mounts/1", Access::ReadOnly, Propagation::Private).unwrap();
        assert!(is_read_only(&shared.join("c1/mounts/1")), "a read-only share is read-only in the view");
        assert!(std::fs::write(shared.join("c1/mounts/1/more"), b"x").is_err());
        assert!(is_read_only(&shared) && !is_read_only(&shared.join("c1/mounts/0")));
        assert_ne!(
            mount_flags(&shared.join("c1/mounts/0")) & libc::ST_NOSUID,
            0,
            "shares are nosuid on the node"
        );
        let mode = |path: &Path| {
            std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(path).unwrap().permissions())
        };
        assert_eq!(mode(dir.path()) & 0o777, 0o700);
        dir.release("c1").unwrap();
        assert!(!shared.join("c1").exists(), "released in the view too");
        assert!(volume.path().join("written-by-guest").is_file(), "a release never deletes into a volume");
        let path = dir.path().to_path_buf();
        drop(dir);
        assert!(!path.exists());
        assert!(mounts_below(root.path()).unwrap().is_empty());
    }

    /// A node's volume `<node>/volume`, a shared mount (bound onto itself), with a directory
    /// `sub` for a submount.
    struct NodeVolume {
        volume: PathBuf,
        sub: PathBuf,
    }

    impl NodeVolume {
        fn shared(node: &Path) -> NodeVolume {
            let (volume, sub) = (node.join("volume"), node.join("volume/sub"));
            std::fs::create_dir_all(&sub).unwrap();
            let none = None::<&str>;
            mount(Some(&volume), &volume, none, MsFlags::MS_BIND, none).unwrap();
            mount(none, &volume, none, MsFlags::MS_SHARED, none).unwrap();
            NodeVolume { volume, sub }
        }

        /// Asserts that the volume and its submount are still mounted on the node, then
        /// unmounts both.
        fn assert_left_alone_then_unmount(self, node: &Path) {
            let left = mounts_below(node).unwrap();
            assert!(
                left.contains(&self.sub) && left.contains(&self.volume),
                "the node's mounts stay: {left:?}"
            );
            umount2(&self.sub, MntFlags::MNT_DETACH).unwrap();
            umount2(&self.volume, MntFlags::MNT_DETACH).unwrap();
        }
    }

    fn mount_tmpfs(at: &Path) {
        mount(Some("tmpfs"), at, Some("tmpfs"), MsFlags::empty(), None::<&str>).unwrap();
    }

    /// A volume that is a shared mount with a submount of its own (a kubelet volume on a systemd
    /// node): its submount is confined in the view too, and the pod's teardown leaves the node's
    /// mounts alone. Needs root.
    #[test]
    fn a_pods_teardown_never_unmounts_the_nodes_mounts_under_a_volume() {
        let root = tempfile::tempdir().unwrap();
        let node = tempfile::tempdir().unwrap();
        let NodeVolume { volume, sub } = NodeVolume::shared(node.path());
        mount_tmpfs(&sub);
        let dir = SandboxDir::create(root.path(), "pod").unwrap();
        dir.share(&volume, "c1/mounts/0", Access::ReadOnly, Propagation::Private).unwrap();
        let seen = dir.shared().join("c1/mounts/0/sub");
        assert_ne!(mount_flags(&seen) & libc::ST_NOSUID, 0, "submounts are nosuid in the view too");
        assert!(is_read_only(&dir.shared().join("c1/mounts/0")) && !is_read_only(&seen), "ro is the top's");
        dir.release("c1").unwrap();
        drop(dir);
        NodeVolume { volume, sub }.assert_left_alone_then_unmount(node.path());
    }

    /// A recursive read-only volume (`rro`) is read-only all through in the guest's view, its
    /// submounts included, whatever the guest remounts on its side. Needs root.
    #[test]
    fn a_recursive_read_only_share_is_read_only_below_its_top_too() {
        let root = tempfile::tempdir().unwrap();
        let node = tempfile::tempdir().unwrap();
        let NodeVolume { volume, sub } = NodeVolume::shared(node.path());
        mount_tmpfs(&sub);
        let dir = SandboxDir::create(root.path(), "pod").unwrap();
        let rro = Access::of_options(&["rbind".into(), "rro".into()]);
        assert_eq!(rro, Access::RecursiveReadOnly);
        dir.share(&volume, "c1/mounts/0", rro, Propagation::Private).unwrap();
        let seen = dir.shared().join("c1/mounts/0/sub");
        assert!(is_read_only(&dir.shared().join("c1/mounts/0")) && is_read_only(&seen), "rro is all through");
        assert!(std::fs::write(seen.join("written"), "x").is_err(), "a write under the submount failed");
        assert!(!is_read_only(&sub), "the node's own submount stays writable");
        dir.release("c1").unwrap();
        drop(dir);
        NodeVolume { volume, sub }.assert_left_alone_then_unmount(node.path());
    }

    /// An `rslave` volume: what the node mounts under it later appears in the guest's view (a
    /// private one's does not), and the pod's teardown leaves that mount on the node. Needs root.
    #[test]
    fn an_rslave_share_receives_the_nodes_later_mounts_and_its_teardown_leaves_them() {
        let root = tempfile::tempdir().unwrap();
        let node = tempfile::tempdir().unwrap();
        let NodeVolume { volume, sub } = NodeVolume::shared(node.path());
        let dir = SandboxDir::create(root.path(), "pod").unwrap();
        dir.share(&volume, "c1/mounts/0", Access::ReadOnly, Propagation::FromNode).unwrap();
        dir.share(&volume, "c1/mounts/1", Access::ReadOnly, Propagation::Private).unwrap();
        mount_tmpfs(&sub);
        std::fs::write(sub.join("late"), b"mounted after the share").unwrap();
        let shared = dir.shared();
        assert!(shared.join("c1/mounts/0/sub/late").is_file(), "the rslave share sees the node's new mount");
        assert!(!shared.join("c1/mounts/1/sub/late").exists(), "the private one does not");
        dir.release("c1").unwrap();
        drop(dir);
        NodeVolume { volume, sub }.assert_left_alone_then_unmount(node.path());
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
