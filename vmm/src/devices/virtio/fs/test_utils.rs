//! [`FsHarness`]: the virtio-fs request path over real guest memory and a real split queue
//! (driven by [`GuestQueue`]), serving a fresh temporary directory, without KVM: tests and fuzz
//! targets play the guest's FUSE driver.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use fuse_backend_rs::abi::fuse_abi::{InHeader, InitIn, OutHeader};
use vm_memory::{ByteValued, Bytes, GuestAddress, GuestMemoryError, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::request;
use super::share::{self, FsServer};
use crate::devices::virtio::queue::RequestQueue;
use crate::devices::virtio::test_utils::{Buffer, GuestQueue};
use crate::devices::virtio::Interrupt;

/// FUSE opcodes used by tests.
pub mod opcode {
    pub const LOOKUP: u32 = 1;
    pub const FORGET: u32 = 2;
    pub const GETATTR: u32 = 3;
    pub const MKNOD: u32 = 8;
    pub const MKDIR: u32 = 9;
    pub const OPEN: u32 = 14;
    pub const RELEASE: u32 = 18;
    pub const INIT: u32 = 26;
    pub const DESTROY: u32 = 38;
}

/// The root's node id.
pub const ROOT: u64 = 1;
/// Guest memory size; addresses at or above it are outside guest memory.
pub const MEM_SIZE: u64 = 0x40_0000;
const QUEUE_BASE: u64 = 0;
const QUEUE_SIZE: u16 = 64;
const REQUEST_AT: u64 = 0x1_0000;
const REPLY_AT: u64 = 0x20_0000;
/// Room for a reply (a 1 MiB read plus its header).
pub const REPLY_LEN: u32 = 0x10_1000;

/// A FUSE reply as the guest reads it.
#[derive(Debug, Clone)]
pub struct Reply {
    /// The chain's used length.
    pub used: u32,
    pub header: OutHeader,
    /// What follows the header (the used length says how much is valid).
    pub body: Vec<u8>,
}

impl Reply {
    /// The reply body decoded as `T` (zeroes if too short).
    pub fn body_as<T: ByteValued + Default>(&self) -> T {
        T::from_slice(self.body.get(..std::mem::size_of::<T>()).unwrap_or_default())
            .copied()
            .unwrap_or_default()
    }
}

/// A request as a hostile driver may send it: any header values, a length field that may lie,
/// the message split across readable buffers of the given sizes, a reply buffer of any size.
#[derive(Debug, Clone, Default)]
pub struct RawRequest {
    pub opcode: u32,
    pub nodeid: u64,
    pub uid: u32,
    pub gid: u32,
    /// Replaces the header's length field (otherwise header + body).
    pub claimed_len: Option<u32>,
    pub body: Vec<u8>,
    /// Sizes of the readable buffers the message is split into (the rest goes in a last one).
    pub segments: Vec<u32>,
    /// Size of the device-writable reply buffer (capped at [`REPLY_LEN`]; 0 for none).
    pub reply_len: u32,
}

/// One virtio-fs request queue serving a temporary directory.
pub struct FsHarness {
    pub mem: GuestMemoryMmap,
    pub queue: GuestQueue,
    device_queue: RequestQueue,
    interrupt: Arc<Interrupt>,
    server: FsServer,
    dir: PathBuf,
    unique: u64,
}

impl FsHarness {
    /// A harness sharing a fresh directory (mode 0755, removed on drop).
    pub fn new() -> std::io::Result<FsHarness> {
        FsHarness::with_max_fds(super::DEFAULT_MAX_FDS)
    }

    /// [`FsHarness::new`], holding at most `max_fds` host files for the guest.
    pub fn with_max_fds(max_fds: usize) -> std::io::Result<FsHarness> {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "husk-fs-harness-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir)?;
        let server = share::serve_directory(&dir, max_fds).map_err(std::io::Error::other)?;
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)])
            .map_err(std::io::Error::other)?;
        let (queue, device_queue) =
            GuestQueue::new(&mem, QUEUE_BASE, QUEUE_SIZE).map_err(std::io::Error::other)?;
        let interrupt = Arc::new(Interrupt::new(EventFd::new(libc::EFD_NONBLOCK)?));
        let device_queue = RequestQueue::new("virtio-fs", device_queue);
        Ok(FsHarness { mem, queue, device_queue, interrupt, server, dir, unique: 0 })
    }

    /// The shared directory on the host.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// FUSE_INIT as Linux 6.1 sends it (protocol 7.37, the flags it asks for).
    pub fn init(&mut self) -> Result<Reply, GuestMemoryError> {
        let flags: u64 = 0x1_7fff_fffb;
        let init = InitIn { major: 7, minor: 37, max_readahead: 0x2_0000, flags: flags as u32 };
        let mut body = init.as_slice().to_vec();
        body.extend_from_slice(&((flags >> 32) as u32).to_le_bytes());
        body.extend_from_slice(&[0u8; 44]);
        self.request(opcode::INIT, 0, &body)
    }

    /// Sends one request from guest root with `body` after the header; returns the reply.
    pub fn request(&mut self, opcode: u32, nodeid: u64, body: &[u8]) -> Result<Reply, GuestMemoryError> {
        self.unique += 1;
        let header = InHeader {
            len: (std::mem::size_of::<InHeader>() + body.len()) as u32,
            opcode,
            unique: self.unique,
            nodeid,
            ..Default::default()
        };
        let mut bytes = header.as_slice().to_vec();
        bytes.extend_from_slice(body);
        self.mem.write_slice(&bytes, GuestAddress(REQUEST_AT))?;
        let chain = [
            Buffer { addr: REQUEST_AT, len: bytes.len() as u32, writable: false },
            Buffer { addr: REPLY_AT, len: REPLY_LEN, writable: true },
        ];
        let used = self.send_chain(&chain)?;
        let mut reply = vec![0u8; used.clamp(16, REPLY_LEN) as usize];
        self.mem.read_slice(&mut reply, GuestAddress(REPLY_AT))?;
        let header = OutHeader::from_slice(&reply[..16]).copied().unwrap_or_default();
        Ok(Reply { used, header, body: reply[16..].to_vec() })
    }

    /// Sends `request` as built; returns the used length.
    pub fn send_raw(&mut self, request: &RawRequest) -> Result<u32, GuestMemoryError> {
        self.unique += 1;
        let header = InHeader {
            len: request.claimed_len.unwrap_or((std::mem::size_of::<InHeader>() + request.body.len()) as u32),
            opcode: request.opcode,
            unique: self.unique,
            nodeid: request.nodeid,
            uid: request.uid,
            gid: request.gid,
            ..Default::default()
        };
        let mut bytes = header.as_slice().to_vec();
        bytes.extend_from_slice(&request.body);
        bytes.truncate((REPLY_AT - REQUEST_AT) as usize);
        self.mem.write_slice(&bytes, GuestAddress(REQUEST_AT))?;
        let mut buffers = Vec::new();
        let mut at = 0u32;
        let total = bytes.len() as u32;
        for size in request.segments.iter().take(usize::from(QUEUE_SIZE) - 2) {
            let size = (*size).min(total - at);
            if size == 0 {
                break;
            }
            buffers.push(Buffer { addr: REQUEST_AT + u64::from(at), len: size, writable: false });
            at += size;
        }
        if at < total {
            buffers.push(Buffer { addr: REQUEST_AT + u64::from(at), len: total - at, writable: false });
        }
        if request.reply_len > 0 {
            buffers.push(Buffer { addr: REPLY_AT, len: request.reply_len.min(REPLY_LEN), writable: true });
        }
        self.send_chain(&buffers)
    }

    /// The reply area's first bytes after [`FsHarness::send_raw`] (header and start of the body).
    pub fn reply_bytes(&self, len: usize) -> Vec<u8> {
        let mut bytes = vec![0u8; len.min(REPLY_LEN as usize)];
        let _ = self.mem.read_slice(&mut bytes, GuestAddress(REPLY_AT));
        bytes
    }

    /// Publishes `buffers` as one chain (the reply area is zeroed first), serves the queue and
    /// returns the chain's used length (0 if it was not completed).
    pub fn send_chain(&mut self, buffers: &[Buffer]) -> Result<u32, GuestMemoryError> {
        self.mem.write_slice(&[0u8; 16], GuestAddress(REPLY_AT))?;
        self.queue.add_chain(&self.mem, buffers)?;
        self.serve();
        Ok(self.queue.take_used(&self.mem).map_or(0, |(_, len)| len))
    }

    /// Serves whatever the driver made available.
    pub fn serve(&mut self) -> usize {
        let FsHarness { mem, device_queue, interrupt, server, .. } = self;
        device_queue.serve(mem, interrupt, |chain| request::serve(server, mem, chain))
    }
}

impl std::fmt::Debug for FsHarness {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FsHarness").field("dir", &self.dir).finish_non_exhaustive()
    }
}

impl Drop for FsHarness {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `name` as FUSE sends it: NUL-terminated.
pub fn c_name(name: &str) -> Vec<u8> {
    let mut bytes = name.as_bytes().to_vec();
    bytes.push(0);
    bytes
}
