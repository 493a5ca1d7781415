//! Fuzz target: virtio-fs request handling as a hostile guest drives it: FUSE messages with any
//! opcode, node id, caller, length field and body, split across descriptors at any points, with
//! reply buffers of any size, against a real shared directory. The VMM must never panic or hang;
//! every chain must be completed.

#![no_main]

use husk_vmm::devices::virtio::fs::test_utils::{opcode, FsHarness, RawRequest, ROOT};
use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;

/// Opcodes left out because they would allocate host disk in proportion to a number in the
/// request (FALLOCATE, COPY_FILE_RANGE): bounded by quotas in production, not in a fuzz loop.
const SKIPPED: [u32; 2] = [43, 47];
const MAX_REQUESTS: usize = 32;

#[derive(Debug, Arbitrary)]
struct Request {
    opcode: u8,
    /// 0: the root, 1..: a node id an earlier reply gave, else this value.
    node: u8,
    raw_nodeid: u64,
    uid: u8,
    claimed_len: Option<u32>,
    body: Vec<u8>,
    segments: Vec<u16>,
    reply_len: u16,
}

fuzz_target!(|requests: Vec<Request>| {
    // As on the device's serving thread: no device nodes on the host.
    static SHARE_CAPABILITIES_ONLY: std::sync::Once = std::sync::Once::new();
    SHARE_CAPABILITIES_ONLY.call_once(|| {
        let _ = husk_vmm::devices::virtio::fs::share::keep_share_capabilities();
    });
    let Ok(mut h) = FsHarness::new() else { return };
    let _ = std::fs::create_dir(h.dir().join("d"));
    let _ = std::fs::write(h.dir().join("d/f"), b"contents");
    let _ = std::os::unix::fs::symlink("/etc/passwd", h.dir().join("link"));
    if h.init().is_err() {
        return;
    }
    let mut nodes = vec![ROOT];
    for request in requests.into_iter().take(MAX_REQUESTS) {
        let opcode = u32::from(request.opcode % 52);
        if SKIPPED.contains(&opcode) {
            continue;
        }
        let nodeid = match request.node {
            0 => ROOT,
            n if usize::from(n) <= nodes.len() => nodes[usize::from(n) - 1],
            _ => request.raw_nodeid,
        };
        let raw = RawRequest {
            opcode,
            nodeid,
            // Root or an unprivileged caller.
            uid: if request.uid % 2 == 0 { 0 } else { 1000 },
            gid: if request.uid % 2 == 0 { 0 } else { 1000 },
            claimed_len: request.claimed_len,
            body: request.body,
            segments: request.segments.into_iter().map(u32::from).collect(),
            reply_len: u32::from(request.reply_len),
        };
        let Ok(used) = h.send_raw(&raw) else { continue };
        // Remember node ids from entry replies (LOOKUP, MKNOD, MKDIR, SYMLINK, LINK, CREATE).
        if used >= 24 && [opcode::LOOKUP, 8, 9, 6, 13, 35].contains(&opcode) {
            let reply = h.reply_bytes(24);
            let error = i32::from_le_bytes([reply[4], reply[5], reply[6], reply[7]]);
            if error == 0 && nodes.len() < 64 {
                nodes.push(u64::from_le_bytes(reply[16..24].try_into().unwrap_or_default()));
            }
        }
    }
});
