//! Confining a device thread once its setup is done, as virtiofsd confines its process: a
//! file-system context of its own (`unshare(CLONE_FS)`: root, working directory and umask stop
//! being the process's), a directory as its root, and only the capabilities it needs. All three
//! are per thread, so the rest of the process (the shim, the other devices) keeps its own.

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use caps::{CapSet, Capability, CapsHashSet};

/// Gives the calling thread its own file-system context, so that [`enter_root`] and `umask`
/// change only this thread's.
pub fn own_fs_context() -> io::Result<()> {
    // SAFETY: unshare(CLONE_FS) only gives this thread a private copy of its fs context.
    if unsafe { libc::unshare(libc::CLONE_FS) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Makes `dir` the calling thread's root and working directory (its file-system context must be
/// its own: [`own_fs_context`]): a path the thread resolves afterwards, in an exploit too, names
/// nothing outside `dir`. Without `CAP_SYS_CHROOT` ([`keep_capabilities`]) and without `chroot`
/// in its seccomp filter, the thread cannot leave it again.
pub fn enter_root(dir: &Path) -> io::Result<()> {
    let path = CString::new(dir.as_os_str().as_bytes()).map_err(io::Error::other)?;
    // SAFETY: chroot(2) with a NUL-terminated path; it changes only this thread's root.
    if unsafe { libc::chroot(path.as_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    std::env::set_current_dir("/")
}

/// Leaves the calling thread only the capabilities in `keep`, effective and permitted (a switch
/// of the effective uid back to root would otherwise restore the others), nothing inheritable.
pub fn keep_capabilities(keep: &[Capability]) -> Result<(), caps::errors::CapsError> {
    let keep: CapsHashSet = keep.iter().copied().collect();
    caps::set(None, CapSet::Effective, &keep)?;
    caps::set(None, CapSet::Permitted, &keep)?;
    caps::clear(None, CapSet::Inheritable)
}
