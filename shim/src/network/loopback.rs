//! Catching every TCP connection to a network namespace's loopback (`127.0.0.1`, `::1`, any port)
//! on two listening sockets, with an `sk_lookup` BPF program attached to the namespace (Linux
//! 5.9+: the kernel asks it which socket takes a new connection before it looks for a listener
//! of that port; Cloudflare's way of serving all ports from one socket). A connection accepted
//! this way keeps the address it was made to as its local address, so the port it wanted is
//! known. The program is 35 instructions, assembled here: no BPF toolchain, no object file.
//!
//! The program stays attached for as long as [`LoopbackCatcher`] holds its link (or the namespace
//! lives); dropping it detaches it.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

/// `bpf(2)` commands, program and map types, attach type and helpers (linux/bpf.h).
const BPF_MAP_CREATE: libc::c_int = 0;
const BPF_MAP_UPDATE_ELEM: libc::c_int = 2;
const BPF_PROG_LOAD: libc::c_int = 5;
const BPF_LINK_CREATE: libc::c_int = 28;
const BPF_MAP_TYPE_SOCKMAP: u32 = 15;
const BPF_PROG_TYPE_SK_LOOKUP: u32 = 30;
const BPF_SK_LOOKUP: u32 = 36;
const HELPER_MAP_LOOKUP_ELEM: i32 = 1;
const HELPER_SK_RELEASE: i32 = 86;
const HELPER_SK_ASSIGN: i32 = 124;
/// `SK_PASS`: the lookup goes on (to the socket assigned, or as usual).
const SK_PASS: i32 = 1;

/// Offsets in `struct bpf_sk_lookup`.
const CTX_FAMILY: i16 = 8;
const CTX_PROTOCOL: i16 = 12;
const CTX_LOCAL_IP4: i16 = 40;
const CTX_LOCAL_IP6: i16 = 44;

/// Keys of the socket map: the IPv4 and the IPv6 listener.
const KEY_V4: u32 = 0;
const KEY_V6: u32 = 1;

/// The namespace's loopback connections, caught by a BPF program.
#[derive(Debug)]
pub struct LoopbackCatcher {
    // The link holds the program, the program its map; dropping the link detaches the program.
    _link: OwnedFd,
    _program: OwnedFd,
    _sockets: OwnedFd,
}

impl LoopbackCatcher {
    /// Steers connections to `127.0.0.1` to `v4` and those to `::1` to `v6` (listening TCP
    /// sockets of the namespace `netns`, whatever port they are bound to).
    pub fn attach(
        netns: &File,
        v4: BorrowedFd<'_>,
        v6: Option<BorrowedFd<'_>>,
    ) -> io::Result<LoopbackCatcher> {
        let sockets = create_socket_map()?;
        update(&sockets, KEY_V4, v4).map_err(context("adding the IPv4 listener to the socket map"))?;
        if let Some(v6) = v6 {
            update(&sockets, KEY_V6, v6).map_err(context("adding the IPv6 listener to the socket map"))?;
        }
        let program = load(&program(sockets.as_raw_fd()))?;
        let link =
            link(&program, netns).map_err(context("attaching the sk_lookup program to the namespace"))?;
        Ok(LoopbackCatcher { _link: link, _program: program, _sockets: sockets })
    }
}

fn context(what: &'static str) -> impl Fn(io::Error) -> io::Error {
    move |err| io::Error::new(err.kind(), format!("{what}: {err}"))
}

/// One BPF instruction (`struct bpf_insn`).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Insn {
    code: u8,
    /// Destination register in the low nibble, source in the high one.
    regs: u8,
    off: i16,
    imm: i32,
}

/// Opcodes (class | size or operation | mode or source), as linux/bpf.h composes them.
mod op {
    pub const LDX_W: u8 = 0x61; // BPF_LDX | BPF_W | BPF_MEM
    pub const STX_W: u8 = 0x63; // BPF_STX | BPF_W | BPF_MEM
    pub const LD_DW_IMM: u8 = 0x18; // BPF_LD | BPF_DW | BPF_IMM
    pub const MOV64_X: u8 = 0xbf; // BPF_ALU64 | BPF_MOV | BPF_X
    pub const MOV64_K: u8 = 0xb7; // BPF_ALU64 | BPF_MOV | BPF_K
    pub const ADD64_K: u8 = 0x07; // BPF_ALU64 | BPF_ADD | BPF_K
    pub const JEQ_K: u8 = 0x15; // BPF_JMP | BPF_JEQ | BPF_K
    pub const JNE_K: u8 = 0x55; // BPF_JMP | BPF_JNE | BPF_K
    pub const JA: u8 = 0x05; // BPF_JMP | BPF_JA
    pub const CALL: u8 = 0x85; // BPF_JMP | BPF_CALL
    pub const EXIT: u8 = 0x95; // BPF_JMP | BPF_EXIT
    /// `src_reg` of a 64-bit immediate load that names a map by file descriptor.
    pub const PSEUDO_MAP_FD: u8 = 1;
}

fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> Insn {
    Insn { code, regs: dst | (src << 4), off, imm }
}

/// A jump to be pointed at a label once the program is laid out.
enum Target {
    Pass,
    V6,
    Lookup,
}

/// The program: for a TCP connection to 127.0.0.1 or ::1, assign the listener of its family from
/// the socket map; let everything else through untouched.
fn program(map_fd: i32) -> Vec<Insn> {
    // In the ctx, addresses are in network byte order: a 32-bit load of 127.0.0.1 on this
    // little-endian machine reads 0x0100007f, of ::1's last word 0x01000000.
    const LOOPBACK_V4: i32 = 0x0100_007f;
    const LOOPBACK_V6_LAST: i32 = 0x0100_0000;
    let ldx = |dst, off| insn(op::LDX_W, dst, 6, off, 0);
    let mut jumps: Vec<(usize, Target)> = Vec::new();
    let mut code: Vec<Insn> = Vec::new();
    // Conditional jumps test r2; `goto` has no register (its fields must be zero).
    let mut jump = |code: &mut Vec<Insn>, op, imm, target| {
        jumps.push((code.len(), target));
        code.push(insn(op, if op == op::JA { 0 } else { 2 }, 0, 0, imm));
    };
    code.push(insn(op::MOV64_X, 6, 1, 0, 0)); // r6 = ctx
    code.push(ldx(2, CTX_PROTOCOL));
    jump(&mut code, op::JNE_K, libc::IPPROTO_TCP, Target::Pass);
    code.push(ldx(2, CTX_FAMILY));
    jump(&mut code, op::JEQ_K, libc::AF_INET6, Target::V6);
    jump(&mut code, op::JNE_K, libc::AF_INET, Target::Pass);
    code.push(ldx(2, CTX_LOCAL_IP4));
    jump(&mut code, op::JNE_K, LOOPBACK_V4, Target::Pass);
    code.push(insn(op::MOV64_K, 3, 0, 0, KEY_V4 as i32));
    jump(&mut code, op::JA, 0, Target::Lookup);
    let v6 = code.len();
    for (word, expected) in [(0, 0), (1, 0), (2, 0), (3, LOOPBACK_V6_LAST)] {
        code.push(ldx(2, CTX_LOCAL_IP6 + 4 * word));
        jump(&mut code, op::JNE_K, expected, Target::Pass);
    }
    code.push(insn(op::MOV64_K, 3, 0, 0, KEY_V6 as i32));
    let lookup = code.len();
    code.extend([
        insn(op::STX_W, 10, 3, -4, 0), // the key on the stack
        insn(op::LD_DW_IMM, 1, op::PSEUDO_MAP_FD, 0, map_fd),
        Insn::default(), // the immediate's upper half
        insn(op::MOV64_X, 2, 10, 0, 0),
        insn(op::ADD64_K, 2, 0, 0, -4),
        insn(op::CALL, 0, 0, 0, HELPER_MAP_LOOKUP_ELEM),
    ]);
    jumps.push((code.len(), Target::Pass));
    code.push(insn(op::JEQ_K, 0, 0, 0, 0)); // no listener of that family: as usual
    code.extend([
        insn(op::MOV64_X, 7, 0, 0, 0), // the socket, to release
        insn(op::MOV64_X, 1, 6, 0, 0),
        insn(op::MOV64_X, 2, 7, 0, 0),
        insn(op::MOV64_K, 3, 0, 0, 0),
        insn(op::CALL, 0, 0, 0, HELPER_SK_ASSIGN),
        insn(op::MOV64_X, 1, 7, 0, 0),
        insn(op::CALL, 0, 0, 0, HELPER_SK_RELEASE),
    ]);
    let pass = code.len();
    code.extend([insn(op::MOV64_K, 0, 0, 0, SK_PASS), insn(op::EXIT, 0, 0, 0, 0)]);
    for (at, target) in jumps {
        let to = match target {
            Target::Pass => pass,
            Target::V6 => v6,
            Target::Lookup => lookup,
        };
        // Jumps count instructions after the jump itself; the program is far shorter than i16.
        code[at].off = (to - at - 1) as i16;
    }
    code
}

/// `bpf(cmd, attr)`: what the command returns. Every pointer in `attr` names a local of the
/// caller, alive through the call.
fn bpf<T>(cmd: libc::c_int, attr: &mut T) -> io::Result<i64> {
    // SAFETY: `attr` is the repr(C) attribute struct of `cmd`, valid for its size; the kernel
    // reads it (and writes only into buffers it points to, owned by the caller).
    let done = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr as *mut T, std::mem::size_of::<T>()) };
    if done < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(done)
}

/// [`bpf`] for a command that makes a descriptor.
fn bpf_fd<T>(cmd: libc::c_int, attr: &mut T) -> io::Result<OwnedFd> {
    let fd = bpf(cmd, attr)?;
    // SAFETY: a successful command returns a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

#[repr(C)]
#[derive(Default)]
struct MapCreate {
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
}

#[repr(C)]
#[derive(Default)]
struct MapUpdate {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

#[repr(C)]
#[derive(Default)]
struct ProgLoad {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
}

#[repr(C)]
#[derive(Default)]
struct LinkCreate {
    prog_fd: u32,
    target_fd: u32,
    attach_type: u32,
    flags: u32,
}

fn create_socket_map() -> io::Result<OwnedFd> {
    let mut attr = MapCreate { map_type: BPF_MAP_TYPE_SOCKMAP, key_size: 4, value_size: 8, max_entries: 2 };
    bpf_fd(BPF_MAP_CREATE, &mut attr).map_err(context("creating the BPF socket map"))
}

fn update(map: &OwnedFd, key: u32, socket: BorrowedFd<'_>) -> io::Result<()> {
    let value = socket.as_raw_fd() as u64;
    let mut attr = MapUpdate {
        map_fd: map.as_raw_fd() as u32,
        key: &key as *const u32 as u64,
        value: &value as *const u64 as u64,
        ..Default::default()
    };
    bpf(BPF_MAP_UPDATE_ELEM, &mut attr).map(drop)
}

fn load(code: &[Insn]) -> io::Result<OwnedFd> {
    // No GPL-only helper is called: any licence string loads.
    const LICENSE: &[u8] = b"Apache-2.0\0";
    let mut log = vec![0u8; 16 * 1024];
    let mut name = [0u8; 16];
    name[..13].copy_from_slice(b"husk_loopback");
    let mut attr = ProgLoad {
        prog_type: BPF_PROG_TYPE_SK_LOOKUP,
        insn_cnt: code.len() as u32,
        insns: code.as_ptr() as u64,
        license: LICENSE.as_ptr() as u64,
        log_level: 1,
        log_size: log.len() as u32,
        log_buf: log.as_mut_ptr() as u64,
        prog_name: name,
        expected_attach_type: BPF_SK_LOOKUP,
        ..Default::default()
    };
    bpf_fd(BPF_PROG_LOAD, &mut attr).map_err(|err| {
        let verifier = String::from_utf8_lossy(&log);
        let verifier = verifier.trim_end_matches('\0').trim();
        io::Error::new(err.kind(), format!("loading the sk_lookup program: {err}; verifier: {verifier}"))
    })
}

fn link(program: &OwnedFd, netns: &File) -> io::Result<OwnedFd> {
    let mut attr = LinkCreate {
        prog_fd: program.as_raw_fd() as u32,
        target_fd: netns.as_raw_fd() as u32,
        attach_type: BPF_SK_LOOKUP,
        flags: 0,
    };
    bpf_fd(BPF_LINK_CREATE, &mut attr)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_jump_lands_inside_the_program_and_the_map_load_is_whole() {
        let code = program(42);
        assert_eq!(code.len(), 35);
        for (at, insn) in code.iter().enumerate() {
            if insn.code & 0x07 == 0x05 && insn.code != op::CALL && insn.code != op::EXIT {
                let to = at as i64 + 1 + i64::from(insn.off);
                assert!(to > at as i64 && to < code.len() as i64, "jump at {at} to {to}");
            }
        }
        let map = code.iter().position(|insn| insn.code == op::LD_DW_IMM).unwrap();
        assert_eq!((code[map].imm, code[map + 1]), (42, Insn::default()));
        assert_eq!(code.last().unwrap().code, op::EXIT);
    }
}
