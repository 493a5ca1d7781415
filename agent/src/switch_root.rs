//! Leaving the initramfs. The kernel unpacks the initramfs into `rootfs`, the root of the mount
//! tree, which can never be moved or unmounted: `pivot_root` into a container's rootfs fails on it
//! (EINVAL), and runtimes need `pivot_root`, since a chroot can be escaped. So PID 1 first copies
//! the initramfs into a tmpfs, frees the original files, makes the tmpfs the root
//! (`switch_root`, as an initrd's init does) and executes itself again from there.

use std::ffi::CString;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::Path;

use anyhow::{Context, Result};
use nix::mount::{mount, MsFlags};
use nix::sys::stat::{mknod, Mode, SFlag};

/// Set in the environment of the re-executed init: the root is the tmpfs already. Its value is
/// when the first process started (`guest_info::agent_started_us`).
const SWITCHED: &str = "HUSK_AGENT_SWITCHED_ROOT";
/// Where the tmpfs is built before it becomes `/`.
const NEW_ROOT: &str = "/.husk-root";

/// When the first process of this init started, as the process that re-executed it said.
pub fn first_start_us() -> Option<u64> {
    std::env::var(SWITCHED).ok()?.parse().ok()
}

/// Whether this init still runs from the initramfs.
pub fn needed() -> bool {
    std::env::var_os(SWITCHED).is_none()
}

/// Copies `/` into a tmpfs, makes it the root and executes `/init` again; returns only on failure
/// (before the initramfs was touched, unless the final move or exec failed).
pub fn switch_to_tmpfs() -> Result<std::convert::Infallible> {
    let new_root = Path::new(NEW_ROOT);
    fs::create_dir_all(new_root).with_context(|| format!("creating {NEW_ROOT}"))?;
    mount(Some("rootfs"), new_root, Some("tmpfs"), MsFlags::empty(), Some("mode=0755"))
        .context("mounting the new root tmpfs")?;
    let entries: Vec<_> = fs::read_dir("/")
        .context("listing the initramfs")?
        .filter_map(Result::ok)
        .filter(|entry| entry.path() != new_root)
        .collect();
    let copied =
        entries.iter().try_for_each(|entry| copy_tree(&entry.path(), &new_root.join(entry.file_name())));
    if let Err(err) = copied {
        let _ = nix::mount::umount2(new_root, nix::mount::MntFlags::MNT_DETACH);
        return Err(err);
    }
    // Free the initramfs's copy: it would stay in memory otherwise.
    for entry in &entries {
        let path = entry.path();
        let _ = if path.is_dir() && !path.is_symlink() {
            fs::remove_dir_all(&path)
        } else {
            fs::remove_file(&path)
        };
    }
    std::env::set_current_dir(new_root).context("entering the new root")?;
    mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>)
        .context("moving the new root onto /")?;
    nix::unistd::chroot(".").context("chroot into the new root")?;
    std::env::set_current_dir("/").context("chdir /")?;
    let init = CString::new("/init")?;
    let arg0 = CString::new("init")?;
    let env: Vec<CString> = std::env::vars_os()
        .map(|(k, v)| CString::new([k.as_bytes(), b"=", v.as_bytes()].concat()))
        .chain(std::iter::once(CString::new(format!("{SWITCHED}={}", crate::guest_info::agent_started_us()))))
        .collect::<Result<_, _>>()?;
    let err = nix::unistd::execve(&init, &[arg0], &env).unwrap_err();
    Err(err).context("executing /init from the new root")
}

/// Copies a file, directory (recursively), symlink or device node, keeping modes and owners.
fn copy_tree(from: &Path, to: &Path) -> Result<()> {
    let meta = fs::symlink_metadata(from).with_context(|| format!("reading {}", from.display()))?;
    let kind = meta.file_type();
    let what = || format!("copying {} to {}", from.display(), to.display());
    if kind.is_symlink() {
        std::os::unix::fs::symlink(fs::read_link(from)?, to).with_context(what)?;
    } else if kind.is_dir() {
        fs::create_dir(to).with_context(what)?;
        for entry in fs::read_dir(from).with_context(what)? {
            let entry = entry?;
            copy_tree(&entry.path(), &to.join(entry.file_name()))?;
        }
        fs::set_permissions(to, fs::Permissions::from_mode(meta.mode())).with_context(what)?;
    } else if kind.is_file() {
        fs::copy(from, to).with_context(what)?;
    } else if kind.is_char_device() || kind.is_block_device() {
        let sflag = if kind.is_char_device() { SFlag::S_IFCHR } else { SFlag::S_IFBLK };
        mknod(to, sflag, Mode::from_bits_truncate(meta.mode()), meta.rdev()).with_context(what)?;
    } else {
        return Ok(()); // FIFOs and sockets have no place in an initramfs
    }
    nix::unistd::fchownat(
        nix::fcntl::AT_FDCWD,
        to,
        Some(meta.uid().into()),
        Some(meta.gid().into()),
        nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
    )
    .with_context(what)
}
