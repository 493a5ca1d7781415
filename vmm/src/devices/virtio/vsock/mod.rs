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
