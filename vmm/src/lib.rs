//! Husk's virtual machine monitor: a library embedded in the containerd shim (one VM per pod).
//!
//! Modules, one concern each:
//! - [`host`]: what this host's KVM is and whether it can run Husk guests.

pub mod host;
