//! The virtio-fs device: its configuration space (the mount tag and the number of request
//! queues), its queues (0: high priority, for FORGET; 1: requests) and the worker that serves them.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;

use super::request;
use super::share::{self, FsServer, ShareError};
use crate::devices::virtio::queue::RequestQueue;
use crate::devices::virtio::worker::{QueueHandler, Served, Worker};
use crate::devices::virtio::{ActivateError, DeviceContext, Interrupt, VirtioDevice, VIRTIO_F_VERSION_1};
use crate::seccomp::ThreadRole;
use crate::threads::DeviceThread;

const VIRTIO_ID_FS: u32 = virtio_bindings::virtio_ids::VIRTIO_ID_FS;
/// The high-priority queue and one request queue (Linux 6.1 uses one). The request queue is large:
/// the guest sizes its largest request (`max_pages`) to fit the queue, as no indirect descriptors
/// are offered.
const QUEUE_SIZES: &[u16] = &[128, 1024];
/// Length of the tag field in the configuration space.
pub const TAG_LEN: usize = 36;

/// Why a virtio-fs device cannot be created.
#[derive(Debug, thiserror::Error)]
pub enum FsError {
    #[error("virtio-fs tag {tag:?}: {reason}")]
    Tag { tag: String, reason: &'static str },
    #[error(transparent)]
    Share(#[from] ShareError),
}

/// A virtio-fs device sharing one host directory under a mount tag.
pub struct FsDevice {
    config: [u8; TAG_LEN + 4],
    dir: PathBuf,
    /// Built at creation, so a bad directory fails before the guest boots; the thread (made with
    /// the VM) takes both when the driver activates the device.
    served: Option<(FsServer, DeviceThread)>,
    worker: Option<Worker>,
}

impl FsDevice {
    /// Shares `dir` under `tag` (1 to 36 bytes, no NUL: the guest mounts it with
    /// `mount -t virtiofs <tag> <dir>`), holding at most `max_fds` host files for the guest
    /// ([`super::bounded`]), served by `thread`.
    pub fn new(tag: &str, dir: &Path, max_fds: usize, thread: DeviceThread) -> Result<FsDevice, FsError> {
        let config = config_space(tag)?;
        let server = share::serve_directory(dir, max_fds)?;
        Ok(FsDevice { config, dir: dir.to_path_buf(), served: Some((server, thread)), worker: None })
    }
}

impl std::fmt::Debug for FsDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FsDevice").field("dir", &self.dir).field("active", &self.worker.is_some()).finish()
    }
}

/// `struct virtio_fs_config`: the tag, NUL-padded, and `num_request_queues` (1), little-endian.
fn config_space(tag: &str) -> Result<[u8; TAG_LEN + 4], FsError> {
    let invalid = |reason| FsError::Tag { tag: tag.to_owned(), reason };
    if tag.is_empty() {
        return Err(invalid("must not be empty"));
    }
    if tag.len() > TAG_LEN {
        return Err(invalid("longer than 36 bytes"));
    }
    if tag.bytes().any(|b| b == 0) {
        return Err(invalid("contains a NUL byte"));
    }
    let mut config = [0u8; TAG_LEN + 4];
    config[..tag.len()].copy_from_slice(tag.as_bytes());
    config[TAG_LEN..].copy_from_slice(&1u32.to_le_bytes());
    Ok(config)
}

impl VirtioDevice for FsDevice {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_FS
    }

    fn queue_max_sizes(&self) -> &[u16] {
        QUEUE_SIZES
    }

    fn device_features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        for (i, byte) in data.iter_mut().enumerate() {
            *byte = offset
                .checked_add(i as u64)
                .and_then(|at| self.config.get(at as usize))
                .copied()
                .unwrap_or(0);
        }
    }

    fn activate(&mut self, context: DeviceContext) -> Result<(), ActivateError> {
        let DeviceContext { mem, queues, queue_events, interrupt, seccomp, .. } = context;
        let found = queues.len();
        let [hiprio, requests]: [Queue; 2] = queues
            .try_into()
            .map_err(|_| ActivateError::QueueCount { expected: QUEUE_SIZES.len(), found })?;
        let (server, thread) = self.served.take().ok_or(ActivateError::AlreadyServed)?;
        let dir = self.dir.clone();
        let worker = Worker::start(thread, seccomp.then_some(ThreadRole::Fs), move || {
            share::own_fs_context_without_umask()?;
            // Done with host paths: the thread's root becomes the share, and it keeps only the
            // capabilities serving needs (without them the guest could create device nodes on
            // the host, or open files by handle). A failure means the share is not served.
            crate::jail::enter_root(&dir)?;
            share::keep_share_capabilities().map_err(std::io::Error::other)?;
            let handler = FsQueues {
                mem,
                queues: [RequestQueue::new("virtio-fs", hiprio), RequestQueue::new("virtio-fs", requests)],
                interrupt,
                server,
            };
            Ok(Served { handler, queue_events, sources: Vec::new() })
        });
        self.worker = Some(worker.map_err(ActivateError::Worker)?);
        Ok(())
    }

    fn reset(&mut self) {
        self.worker = None;
    }
}

/// The worker's state: both queues and the server.
struct FsQueues {
    mem: GuestMemoryMmap,
    queues: [RequestQueue; 2],
    interrupt: Arc<Interrupt>,
    server: FsServer,
}

impl QueueHandler for FsQueues {
    fn process_queue(&mut self, index: usize) {
        let FsQueues { mem, queues, interrupt, server } = self;
        if let Some(queue) = queues.get_mut(index) {
            queue.serve(mem, interrupt, |chain| request::serve(server, mem, chain));
        }
    }

    fn interrupt(&self) -> Option<&Interrupt> {
        Some(&self.interrupt)
    }
}

impl std::fmt::Debug for FsQueues {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FsQueues").field("queues", &self.queues).finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::fs::DEFAULT_MAX_FDS;

    fn thread() -> DeviceThread {
        DeviceThread::spawn("test-fs").unwrap()
    }

    #[test]
    fn config_space_holds_the_tag_and_one_request_queue() {
        let dir = tempfile::tempdir().unwrap();
        let device = FsDevice::new("rootfs", dir.path(), DEFAULT_MAX_FDS, thread()).unwrap();
        let mut config = [0xffu8; TAG_LEN + 8];
        device.read_config(0, &mut config);
        assert_eq!(&config[..7], b"rootfs\0");
        assert!(config[6..TAG_LEN].iter().all(|b| *b == 0), "NUL-padded");
        assert_eq!(&config[TAG_LEN..TAG_LEN + 4], &1u32.to_le_bytes());
        assert_eq!(&config[TAG_LEN + 4..], &[0; 4], "beyond the structure reads as zero");
        let exactly_36 = "t".repeat(TAG_LEN);
        FsDevice::new(&exactly_36, dir.path(), DEFAULT_MAX_FDS, thread()).unwrap();
    }

    #[test]
    fn bad_tags_and_directories_are_refused_with_the_reason() {
        let dir = tempfile::tempdir().unwrap();
        let message = |tag: &str, path: &Path| {
            FsDevice::new(tag, path, DEFAULT_MAX_FDS, thread()).unwrap_err().to_string()
        };
        assert!(message("", dir.path()).contains("must not be empty"));
        assert!(message(&"x".repeat(37), dir.path()).contains("longer than 36 bytes"));
        assert!(message("a\0b", dir.path()).contains("NUL"));
        let missing = dir.path().join("missing");
        assert!(message("t", &missing).contains(&format!("shared directory {}", missing.display())));
        let file = dir.path().join("file");
        std::fs::write(&file, b"").unwrap();
        assert!(message("t", &file).contains("is not a directory"));
    }
}
