//! The agent's vsock listeners answer the host only. The guest kernel's loopback transport lets
//! any process in the guest, a container's included, connect to a local vsock port; if the agent
//! API or the stdio port took such a connection, a container could create or exec into other
//! containers, or claim another process's streams. So every accepted connection whose peer is
//! not `VMADDR_CID_HOST` is closed before a byte is read from it.

use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};

use anyhow::{Context, Result};
use nix::sys::socket::{self, AddressFamily, SockFlag, SockType, VsockAddr};

/// The host's CID: the only peer the agent answers.
pub const HOST_CID: u32 = libc::VMADDR_CID_HOST;

/// A listening vsock socket on `port` (any local CID); `flags` adds e.g. `SOCK_NONBLOCK`.
pub fn bind(port: u32, flags: SockFlag) -> Result<OwnedFd> {
    let fd = socket::socket(AddressFamily::Vsock, SockType::Stream, SockFlag::SOCK_CLOEXEC | flags, None)
        .with_context(|| format!("creating a vsock socket for port {port}"))?;
    socket::bind(fd.as_raw_fd(), &VsockAddr::new(libc::VMADDR_CID_ANY, port))
        .with_context(|| format!("binding vsock port {port}"))?;
    socket::listen(&fd, socket::Backlog::new(64).context("listen backlog")?)
        .with_context(|| format!("listening on vsock port {port}"))?;
    Ok(fd)
}

/// Accepts one connection on `listener`: `Ok(None)` when it came from inside the guest (it is
/// closed, and logged with its CID), `Err` when accept itself failed (`WouldBlock` included).
pub fn accept(listener: &impl AsFd, flags: SockFlag) -> io::Result<Option<OwnedFd>> {
    let raw = socket::accept4(listener.as_fd().as_raw_fd(), SockFlag::SOCK_CLOEXEC | flags)?;
    // SAFETY: accept4 returned a new descriptor that nothing else owns.
    let stream = unsafe { OwnedFd::from_raw_fd(raw) };
    match peer_cid(&stream) {
        Some(HOST_CID) => Ok(Some(stream)),
        cid => {
            let port = socket::getsockname::<VsockAddr>(stream.as_raw_fd()).map(|a| a.port()).ok();
            eprintln!(
                "husk-agent: refused a vsock connection to port {} from CID {} (only the host may connect)",
                port.map_or_else(|| "?".into(), |p| p.to_string()),
                cid.map_or_else(|| "unknown".into(), |c| c.to_string()),
            );
            Ok(None)
        }
    }
}

fn peer_cid(stream: &OwnedFd) -> Option<u32> {
    socket::getpeername::<VsockAddr>(stream.as_raw_fd()).ok().map(|addr| addr.cid())
}
