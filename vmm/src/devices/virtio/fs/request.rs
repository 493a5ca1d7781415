//! Serving one virtio-fs request: the FUSE message in the chain's readable buffers goes to the
//! server, its reply into the chain's writable buffers.
//!
//! Everything in the chain is guest-controlled. The server validates lengths, names and node ids
//! and answers with an errno; this layer makes sure every chain is completed with a used length
//! the guest can trust, whatever the server did:
//! - a chain whose buffers cannot be mapped is completed empty;
//! - a request the server fails on without replying gets an `EIO` reply (unless FUSE defines no
//!   reply for its opcode), so the guest's caller does not wait forever.

use fuse_backend_rs::abi::fuse_abi::{InHeader, OutHeader};
use fuse_backend_rs::transport::{Reader, VirtioFsWriter, Writer};
use vm_memory::{Bytes, GuestMemoryMmap};

use super::share::FsServer;
use crate::devices::virtio::queue::Chain;

/// FUSE opcodes that never get a reply: FORGET, INTERRUPT, BATCH_FORGET.
const NO_REPLY_OPCODES: [u32; 3] = [2, 36, 42];
const OUT_HEADER_LEN: u32 = std::mem::size_of::<OutHeader>() as u32;

/// Serves the request in `chain`; returns the bytes written into it (its used length).
pub fn serve(server: &FsServer, mem: &GuestMemoryMmap, chain: Chain<'_>) -> u32 {
    let reply_at = first_writable(&chain);
    let reader = match Reader::from_descriptor_chain(mem, chain.clone()) {
        Ok(reader) => reader,
        Err(err) => {
            crate::guest_log!(debug, %err, "virtio-fs: unreadable request chain; completed empty");
            return 0;
        }
    };
    let header: Option<InHeader> = reader.clone().read_obj().ok();
    let writer = match VirtioFsWriter::new(mem, chain) {
        Ok(writer) => Writer::VirtioFs(writer),
        Err(err) => {
            crate::guest_log!(debug, %err, "virtio-fs: unwritable reply buffers; completed empty");
            return 0;
        }
    };
    match server.handle_message(reader, writer, None, None) {
        Ok(written) => u32::try_from(written).unwrap_or(0),
        Err(err) => {
            crate::guest_log!(debug, %err, opcode = header.map(|h| h.opcode), "virtio-fs: request failed");
            header.and_then(|h| reply_after_error(mem, reply_at, &h)).unwrap_or(0)
        }
    }
}

/// The first device-writable buffer of the chain (where a reply starts) and its length.
fn first_writable(chain: &Chain<'_>) -> Option<(vm_memory::GuestAddress, u32)> {
    chain.clone().find(|d| d.is_write_only()).map(|d| (d.addr(), d.len()))
}

/// After the server failed on `request`: the reply it already wrote, if any, else an `EIO` reply
/// (none for opcodes without replies). Returns the used length.
fn reply_after_error(
    mem: &GuestMemoryMmap,
    reply_at: Option<(vm_memory::GuestAddress, u32)>,
    request: &InHeader,
) -> Option<u32> {
    if NO_REPLY_OPCODES.contains(&request.opcode) {
        return None;
    }
    let (addr, capacity) = reply_at.filter(|(_, len)| *len >= OUT_HEADER_LEN)?;
    let written: OutHeader = mem.read_obj(addr).ok()?;
    if written.unique == request.unique && (OUT_HEADER_LEN..=capacity).contains(&written.len) {
        return Some(written.len);
    }
    let eio = OutHeader { len: OUT_HEADER_LEN, error: -libc::EIO, unique: request.unique };
    mem.write_obj(eio, addr).ok()?;
    Some(OUT_HEADER_LEN)
}

#[cfg(test)]
mod tests {
    use fuse_backend_rs::abi::fuse_abi::{EntryOut, InitOut, MknodIn};
    use std::os::unix::fs::FileTypeExt;

    use super::super::share::keep_share_capabilities;
    use super::super::test_utils::{c_name, opcode, FsHarness, MEM_SIZE, ROOT};
    use super::*;
    use crate::devices::virtio::test_utils::Buffer;
    use vm_memory::ByteValued;

    fn ready() -> FsHarness {
        let mut h = FsHarness::new().unwrap();
        let reply = h.init().unwrap();
        assert_eq!(reply.header.error, 0);
        h
    }

    fn mknod(h: &mut FsHarness, name: &str, mode: u32, rdev: u32) -> i32 {
        let mut body = MknodIn { mode, rdev, umask: 0, padding: 0 }.as_slice().to_vec();
        body.extend_from_slice(&c_name(name));
        h.request(opcode::MKNOD, ROOT, &body).unwrap().header.error
    }

    #[test]
    fn init_negotiates_large_requests_and_lookup_finds_host_files() {
        let mut h = FsHarness::new().unwrap();
        let init = h.init().unwrap();
        assert_eq!(init.header.error, 0);
        let out: InitOut = init.body_as();
        assert_eq!(out.major, 7);
        assert!(out.max_write >= 128 * 1024, "large writes: {}", out.max_write);
        std::fs::write(h.dir().join("hello.txt"), b"hi").unwrap();
        let reply = h.request(opcode::LOOKUP, ROOT, &c_name("hello.txt")).unwrap();
        assert_eq!(reply.header.error, 0);
        assert_eq!(reply.used, reply.header.len);
        let entry: EntryOut = reply.body_as();
        assert_eq!(entry.attr.size, 2);
        assert_eq!(entry.attr.mode & libc::S_IFMT, libc::S_IFREG);
        let missing = h.request(opcode::LOOKUP, ROOT, &c_name("absent")).unwrap();
        assert_eq!(missing.header.error, -libc::ENOENT);
    }

    #[test]
    fn names_cannot_climb_out_of_the_shared_directory() {
        let mut h = ready();
        let parent: EntryOut = h.request(opcode::LOOKUP, ROOT, &c_name("..")).unwrap().body_as();
        let root: EntryOut = h.request(opcode::LOOKUP, ROOT, &c_name(".")).unwrap().body_as();
        assert_eq!(parent.attr.ino, root.attr.ino, "`..` of the root is the root");
        for name in ["../etc", "/etc", "a/../../etc"] {
            let reply = h.request(opcode::LOOKUP, ROOT, &c_name(name)).unwrap();
            assert_eq!(reply.header.error, -libc::EINVAL, "{name}");
        }
        // A symlink pointing outside is a symlink to the guest, never followed on the host.
        std::os::unix::fs::symlink("/etc", h.dir().join("escape")).unwrap();
        let link: EntryOut = h.request(opcode::LOOKUP, ROOT, &c_name("escape")).unwrap().body_as();
        assert_eq!(link.attr.mode & libc::S_IFMT, libc::S_IFLNK);
        let through = h.request(opcode::LOOKUP, link.nodeid, &c_name("passwd")).unwrap();
        assert_ne!(through.header.error, 0, "a lookup under a symlink does not reach /etc/passwd");
    }

    #[test]
    fn device_nodes_are_refused_once_the_serving_thread_keeps_only_the_share_capabilities() {
        let mut h = ready();
        keep_share_capabilities().unwrap();
        let dev_null = libc::makedev(1, 3) as u32;
        assert_eq!(mknod(&mut h, "null", libc::S_IFCHR | 0o666, dev_null), -libc::EPERM);
        assert!(!h.dir().join("null").exists(), "nothing was created on the host");
        assert_eq!(mknod(&mut h, "disk", libc::S_IFBLK | 0o600, libc::makedev(8, 0) as u32), -libc::EPERM);
        assert_eq!(mknod(&mut h, "fifo", libc::S_IFIFO | 0o600, 0), 0);
        assert!(std::fs::metadata(h.dir().join("fifo")).unwrap().file_type().is_fifo());
        // overlayfs whiteouts (0:0 character devices) stay possible.
        assert_eq!(mknod(&mut h, "whiteout", libc::S_IFCHR, 0), 0);
    }

    #[test]
    fn malformed_requests_fail_with_an_errno_or_complete_empty() {
        let mut h = ready();
        // Shorter than a FUSE header: nothing can be answered.
        h.mem.write_slice(&[1u8, 2, 3], vm_memory::GuestAddress(0x1_0000)).unwrap();
        let short = [
            Buffer { addr: 0x1_0000, len: 3, writable: false },
            Buffer { addr: 0x20_0000, len: 4096, writable: true },
        ];
        assert_eq!(h.send_chain(&short).unwrap(), 0);
        // A name without its NUL, an unknown opcode, a header claiming 4 GiB.
        let no_nul = h.request(opcode::LOOKUP, ROOT, b"abc").unwrap();
        assert_eq!((no_nul.used, no_nul.header.error), (16, -libc::EINVAL));
        assert_eq!(h.request(9999, ROOT, &[]).unwrap().header.error, -libc::ENOSYS);
        // Node ids the guest was never given.
        assert_ne!(h.request(opcode::GETATTR, 0xdead_beef, &[0u8; 16]).unwrap().header.error, 0);
        // Buffers outside guest memory, reply buffers too small for a header.
        let outside = [
            Buffer { addr: MEM_SIZE + 0x1000, len: 64, writable: false },
            Buffer { addr: 0x20_0000, len: 4096, writable: true },
        ];
        assert_eq!(h.send_chain(&outside).unwrap(), 0);
        h.mem.write_slice(&[0u8; 64], vm_memory::GuestAddress(0x1_0000)).unwrap();
        let tiny_reply = [
            Buffer { addr: 0x1_0000, len: 64, writable: false },
            Buffer { addr: 0x20_0000, len: 4, writable: true },
        ];
        assert_eq!(h.send_chain(&tiny_reply).unwrap(), 0);
        // Still serving.
        assert_eq!(h.request(opcode::LOOKUP, ROOT, &c_name(".")).unwrap().header.error, 0);
    }
}
