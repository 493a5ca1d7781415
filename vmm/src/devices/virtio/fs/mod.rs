//! virtio-fs (ID 26) served in-process: the guest mounts one host directory per VM (the sandbox's
//! shared directory) with `mount -t virtiofs <tag> <dir>`; requests are FUSE messages answered by
//! fuse-backend-rs's passthrough file system on the device's worker thread.
//!
//! Layout:
//! - [`share`]: the host side: the shared directory, its passthrough file system and the
//!   options that confine the guest to it.
//! - [`bounded`]: the bound on host files the guest may hold open through the share.
//! - [`whole_read`]: reads that stop short only at the end of the file (FUSE's meaning of short).
//! - [`request`]: serving one guest request (untrusted FUSE bytes in a descriptor chain).
//! - [`device`]: the virtio device: configuration space (tag), queues, worker.
//!
//! ## Cache mode and consistency
//! The share uses fuse-backend-rs's `auto` cache policy with 1 s entry and attribute timeouts:
//! - file data is close-to-open consistent: the guest drops cached pages of a file when it
//!   opens it and sees a changed size or mtime, so a host write is seen by the next open;
//! - names and attributes changed on the host (new, removed, renamed files, chmod) are seen by
//!   the guest within 1 s;
//! - guest writes go straight to the host file (no writeback cache): the host sees them as
//!   soon as the guest's write call returns.
//!
//! Guest-controlled: every FUSE message. A malformed one fails with an errno or is completed
//! empty; it never panics or blocks the worker.

pub mod bounded;
pub mod device;
pub mod request;
pub mod share;
#[cfg(any(test, feature = "fuzzing"))]
pub mod test_utils;
pub mod whole_read;

pub use bounded::DEFAULT_MAX_FDS;
pub use device::{FsDevice, FsError};
