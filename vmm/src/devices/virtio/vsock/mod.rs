//! virtio-vsock in user space, Firecracker-style "hybrid" vsock: the guest's vsock is a unix
//! socket on the host (issue "Virtio devices I").
//!
//! Layout, one concern per file as in Firecracker's device:
//! - [`packet`]: the packet header and the validation of untrusted guest bytes.
//! - [`csm`]: one connection's state machine and credit-based flow control.
//! - [`handshake`]: the `CONNECT <port>` / `OK <port>` exchange on the host's unix socket.
//! - [`muxer`]: the host's unix sockets and the routing of packets to connections.
//! - [`device`]: the virtio device, its queues and its event loop.
//! - `test_utils`: the device's loop over mock queues and real host sockets, for tests and fuzzing.

pub mod csm;
pub mod device;
pub mod handshake;
pub mod muxer;
pub mod packet;
#[cfg(any(test, feature = "fuzzing"))]
pub mod test_utils;

pub use device::VsockDevice;

/// The host ports the guest may connect to: a guest connection to port P goes to the listener
/// at `<socket>_P`, and only for an allowed P; others are reset without a look at the host.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum HostPorts {
    /// Whatever listeners exist (`husk-vmm` without `--vsock-host-port`: a debugging aid).
    #[default]
    Any,
    /// These ports only (the shim: none, its guest connects nowhere on its own).
    Only(Vec<u32>),
}

impl HostPorts {
    /// Whether the guest may reach any host port at all (the device's thread then keeps no way
    /// to connect: see [`crate::seccomp::ThreadRole::VsockNoConnect`]).
    pub fn any_allowed(&self) -> bool {
        !matches!(self, HostPorts::Only(ports) if ports.is_empty())
    }

    /// Whether a guest connection to host `port` may be tried.
    pub fn allows(&self, port: u32) -> bool {
        match self {
            HostPorts::Any => true,
            HostPorts::Only(ports) => ports.contains(&port),
        }
    }
}
