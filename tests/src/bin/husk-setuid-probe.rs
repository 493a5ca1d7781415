//! `husk-setuid-probe`: prints the effective user id it runs with (`euid=N`).
//!
//! `husk-setuid-probe --exec-as UID PATH`: opens PATH as the caller (root, who may pass a sandbox's
//! 0700 directories), becomes UID (no supplementary groups, its gid and uid), then executes the
//! open file. A copy of this probe that a guest made setuid-root prints `euid=0` where its mount
//! honours setuid bits and `euid=UID` where the mount is `nosuid`: the hostile-guest test runs it
//! through a pod's share and through the volume's own node path.

use std::ffi::CString;
use std::os::fd::AsRawFd;

use anyhow::{bail, Context, Result};

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.as_slice() {
        [] => {
            // SAFETY: geteuid has no preconditions and cannot fail.
            println!("euid={}", unsafe { libc::geteuid() });
            Ok(())
        }
        [flag, uid, path] if flag == "--exec-as" => exec_as(uid.parse().context("UID")?, path),
        _ => bail!("usage: husk-setuid-probe [--exec-as UID PATH]"),
    }
}

/// Executes the file at `path`, opened before, as `uid`; returns only on failure.
fn exec_as(uid: u32, path: &str) -> Result<()> {
    let file = std::fs::File::open(path).with_context(|| format!("opening {path}"))?;
    // SAFETY: these change only this (single-threaded) process's credentials; each result is
    // checked before going on.
    let dropped = unsafe {
        libc::setgroups(0, std::ptr::null()) == 0 && libc::setgid(uid) == 0 && libc::setuid(uid) == 0
    };
    if !dropped {
        bail!("becoming uid {uid}: {}", std::io::Error::last_os_error());
    }
    let (name, empty) = (CString::new(path)?, CString::new("")?);
    // execveat's prototype takes `char *const argv[]`: the strings are only read.
    let argv = [name.as_ptr().cast_mut(), std::ptr::null_mut()];
    let envp = [std::ptr::null_mut()];
    // SAFETY: argv and envp are NULL-terminated arrays of C strings that outlive the call, and
    // the descriptor is open; execveat returns only when it failed.
    unsafe {
        libc::execveat(file.as_raw_fd(), empty.as_ptr(), argv.as_ptr(), envp.as_ptr(), libc::AT_EMPTY_PATH)
    };
    bail!("executing {path}: {}", std::io::Error::last_os_error())
}
