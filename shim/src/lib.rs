//! Host side of Husk: the containerd shim (`containerd-shim-husk-v2`) and the `husk` tool.
//!
//! - [`guest_image`]: locating and verifying the guest kernel + initramfs built by `make guest-image`.
//! - [`check`]: `husk check`, whether this host can run Husk and why not.
//! - [`config`]: `/etc/husk/configuration.toml` and the `io.husk.*` pod annotations it allows.
//! - [`agent_client`]: the agent API client (hybrid vsock or unix socket); the guest's replies are
//!   decoded on a confined thread of its own.
//! - [`network`]: the pod's network namespace carried into the guest (taps, tc, what the agent sets).
//! - [`sandbox`]: a pod's microVM: its host directory, the VM in this process, its agent.
//! - [`run`]: `husk run`, one container in a microVM without containerd.
//! - [`containerd`]: `containerd-shim-husk-v2`, pods in microVMs through containerd 2.x.

pub mod agent_client;
pub mod check;
pub mod config;
pub mod containerd;
pub mod guest_image;
pub mod network;
pub mod phases;
pub mod run;
pub mod sandbox;
