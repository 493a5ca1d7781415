//! Seccomp filters for the VMM's own threads: each vCPU and device thread installs the filter of
//! its [`ThreadRole`] (seccompiler) before it touches anything the guest controls, so code
//! execution gained through a device bug gets only the syscalls that device needs. Filters are
//! per thread (no `TSYNC`): the VMM lives inside the shim, whose other threads keep theirs. The
//! shim's thread that decodes the agent's replies has its role here too, so that every filter of
//! the process is built, and reported, in one place.
//!
//! A filtered thread must not start threads (they would inherit its filter): device threads are
//! made with the VM, before any vCPU runs ([`crate::threads`]), and a device's setup (sockets,
//! files, capability drops) runs on its own thread before the filter goes on.
//!
//! A forbidden syscall raises `SIGSYS`; the handler installed by [`install_reporter`] writes the
//! syscall number and the thread's name to stderr, then ends the process (a thread that tried one
//! is not trusted to go on; containerd cleans up after a shim that died).

use std::collections::BTreeMap;
use std::sync::OnceLock;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter, SeccompRule,
    TargetArch,
};

/// What a thread does, and so which syscalls it may make.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum ThreadRole {
    /// Runs the guest (`KVM_RUN`), emulates MMIO and port I/O, activates and resets devices (by
    /// handing their parked threads a job, and joining them).
    Vcpu,
    /// virtio-rng: reads `/dev/urandom` (opened during setup) into guest buffers.
    Rng,
    /// virtio-net: frames between guest buffers and a tap (opened before the VM started; its
    /// offloads are set during setup).
    Net,
    /// virtio-vsock: the hybrid vsock's unix sockets (accepts the host's connections, connects
    /// to `<socket>_<port>` for the host ports the guest may reach).
    Vsock,
    /// virtio-vsock whose guest may reach no host port (the shim's): [`ThreadRole::Vsock`]
    /// without `socket` and `connect`, so it serves only the connections the host opened.
    VsockNoConnect,
    /// virtio-fs: serves the pod's shared directory (file syscalls of a passthrough server).
    Fs,
    /// Not the VMM's: the shim's thread that reads and decodes the agent's replies (the guest's
    /// bytes) on connections opened for it; it may read and write them, and nothing else.
    AgentReplies,
}

/// Errors building or installing a filter.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("building the {role:?} seccomp filter: {source}")]
    Build { role: ThreadRole, source: seccompiler::BackendError },
    #[error("installing the {role:?} seccomp filter: {source}")]
    Install { role: ThreadRole, source: seccompiler::Error },
    #[error("installing the SIGSYS reporter: {0}")]
    Reporter(std::io::Error),
}

/// Readies the process's allocator for filtered threads: call first thing in `main`, before any
/// thread starts. glibc gives new threads malloc arenas of their own; shrinking one opens
/// `/proc/sys/vm/overcommit_memory` and choosing one past eight reads the CPU count from `/sys`,
/// both `openat`, which no filter allows (a device thread under load was stopped by it). With one
/// arena, memory goes back with `brk` and neither happens.
pub fn prepare_allocator() {
    // SAFETY: mallopt only sets an allocator parameter; M_ARENA_MAX takes any positive count.
    unsafe { libc::mallopt(libc::M_ARENA_MAX, 1) };
}

/// Installs the filter of `role` on the calling thread (for good: filters cannot be removed).
pub fn apply(role: ThreadRole) -> Result<(), SeccompError> {
    install_reporter()?;
    let program = program(role)?;
    THREAD_ROLE.with(|current| current.set(Some(role)));
    seccompiler::apply_filter(&program).map_err(|source| SeccompError::Install { role, source })
}

thread_local! {
    /// The filter this thread runs under, for the SIGSYS report (a plain TLS read there).
    static THREAD_ROLE: std::cell::Cell<Option<ThreadRole>> = const { std::cell::Cell::new(None) };
}

impl ThreadRole {
    fn name(self) -> &'static [u8] {
        match self {
            ThreadRole::Vcpu => b"vCPU",
            ThreadRole::Rng => b"virtio-rng",
            ThreadRole::Net => b"virtio-net",
            ThreadRole::Vsock | ThreadRole::VsockNoConnect => b"virtio-vsock",
            ThreadRole::Fs => b"virtio-fs",
            ThreadRole::AgentReplies => b"agent reply",
        }
    }
}

/// The compiled filter of `role`.
pub fn program(role: ThreadRole) -> Result<BpfProgram, SeccompError> {
    let rules = rules(role).map_err(|source| SeccompError::Build { role, source })?;
    let filter = SeccompFilter::new(rules, SeccompAction::Trap, SeccompAction::Allow, TargetArch::x86_64)
        .map_err(|source| SeccompError::Build { role, source })?;
    BpfProgram::try_from(filter).map_err(|source| SeccompError::Build { role, source })
}

type Rules = BTreeMap<i64, Vec<SeccompRule>>;

fn rules(role: ThreadRole) -> Result<Rules, seccompiler::BackendError> {
    let mut rules: Rules = BTreeMap::new();
    allow(&mut rules, COMMON);
    // No thread that handles guest data maps code: an exploit cannot make its own shellcode
    // executable (nor the guest's memory).
    for syscall in [libc::SYS_mmap, libc::SYS_mprotect] {
        rules.insert(syscall, vec![arg_lacks(2, libc::PROT_EXEC as u64)?]);
    }
    match role {
        ThreadRole::Vcpu => {
            // Nothing besides COMMON but its ioctls: activating a device hands its thread (made
            // with the VM) a job and resetting one joins it (locks and channels, no descriptor).
            let mut ioctls = Vec::new();
            for request in [kvm::run(), kvm::get_regs(), kvm::get_sregs()] {
                ioctls.push(arg_is(1, request)?);
            }
            rules.insert(libc::SYS_ioctl, ioctls);
        }
        ThreadRole::Rng => {}
        ThreadRole::Net => allow(&mut rules, NET),
        ThreadRole::Vsock | ThreadRole::VsockNoConnect => {
            allow(&mut rules, VSOCK);
            // std's set_nonblocking.
            rules.insert(libc::SYS_ioctl, vec![arg_is(1, libc::FIONBIO)?]);
            if role == ThreadRole::Vsock {
                // Unix sockets only: `<socket>_<port>` listeners of the host.
                rules.insert(libc::SYS_socket, vec![arg_is(0, libc::AF_UNIX as u64)?]);
                allow(&mut rules, &[libc::SYS_connect]);
            }
        }
        ThreadRole::Fs => {
            allow(&mut rules, FS);
            rules.insert(libc::SYS_ioctl, vec![arg_is(1, libc::FIONBIO)?]);
        }
        ThreadRole::AgentReplies => allow(&mut rules, AGENT_REPLIES),
    }
    Ok(rules)
}

fn allow(rules: &mut Rules, syscalls: &[i64]) {
    for syscall in syscalls {
        rules.insert(*syscall, Vec::new()); // no conditions: always allowed
    }
}

/// A rule matching when argument `index` equals `value` (compared as 64 bits: ioctl requests
/// are unsigned longs).
fn arg_is(index: u8, value: u64) -> Result<SeccompRule, seccompiler::BackendError> {
    let condition = SeccompCondition::new(index, SeccompCmpArgLen::Qword, SeccompCmpOp::Eq, value)?;
    SeccompRule::new(vec![condition])
}

/// A rule matching when argument `index` has none of the bits of `mask` set.
fn arg_lacks(index: u8, mask: u64) -> Result<SeccompRule, seccompiler::BackendError> {
    let condition = SeccompCondition::new(index, SeccompCmpArgLen::Dword, SeccompCmpOp::MaskedEq(mask), 0)?;
    SeccompRule::new(vec![condition])
}

/// Every VMM thread: memory, locks, time, signals, its own end, logging and eventfds.
const COMMON: &[i64] = &[
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_readv,
    libc::SYS_writev,
    libc::SYS_close,
    libc::SYS_futex,
    // mmap and mprotect: without PROT_EXEC only (see `rules`).
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_madvise,
    libc::SYS_brk,
    libc::SYS_rt_sigreturn,
    libc::SYS_rt_sigprocmask,
    libc::SYS_sigaltstack,
    libc::SYS_sched_yield,
    libc::SYS_sched_getaffinity,
    libc::SYS_clock_gettime,
    libc::SYS_clock_getres,
    libc::SYS_gettimeofday,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    libc::SYS_getrandom,
    libc::SYS_gettid,
    libc::SYS_getpid,
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_epoll_ctl,
    libc::SYS_fcntl,
    libc::SYS_exit,
    // Ending the process is no escalation, and the SIGSYS reporter's own way out.
    libc::SYS_exit_group,
    libc::SYS_rseq,
];

/// virtio-net besides [`COMMON`]: the tap is read and written with read/write.
const NET: &[i64] = &[];

/// virtio-vsock besides [`COMMON`] and `ioctl(FIONBIO)` (and, for [`ThreadRole::Vsock`],
/// `socket(AF_UNIX)` and `connect`).
const VSOCK: &[i64] = &[
    libc::SYS_accept4,
    libc::SYS_shutdown,
    libc::SYS_getsockopt,
    libc::SYS_recvfrom,
    libc::SYS_sendto,
    libc::SYS_recvmsg,
    libc::SYS_sendmsg,
    libc::SYS_poll,
    libc::SYS_ppoll,
];

/// The agent's reply thread besides [`COMMON`]: its connections' socket calls (no `socket`,
/// `connect` or `accept`: they are opened for it).
const AGENT_REPLIES: &[i64] =
    &[libc::SYS_recvfrom, libc::SYS_sendto, libc::SYS_recvmsg, libc::SYS_sendmsg, libc::SYS_shutdown];

/// virtio-fs besides [`COMMON`]: what a passthrough FUSE server does to the shared directory,
/// including switching the thread's credentials to the caller's for creating files.
const FS: &[i64] = &[
    // Not open_by_handle_at: file handles are off (`inode_file_handles`), and a handle could
    // name any file of the file system (the thread keeps CAP_DAC_READ_SEARCH for linkat).
    libc::SYS_openat,
    libc::SYS_newfstatat,
    libc::SYS_fstat,
    libc::SYS_statx,
    libc::SYS_statfs,
    libc::SYS_fstatfs,
    libc::SYS_getdents64,
    libc::SYS_lseek,
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_preadv,
    libc::SYS_pwritev,
    libc::SYS_preadv2,
    libc::SYS_pwritev2,
    libc::SYS_copy_file_range,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
    libc::SYS_ftruncate,
    libc::SYS_fallocate,
    libc::SYS_mkdirat,
    libc::SYS_mknodat,
    libc::SYS_unlinkat,
    libc::SYS_renameat,
    libc::SYS_renameat2,
    libc::SYS_linkat,
    libc::SYS_symlinkat,
    libc::SYS_readlinkat,
    libc::SYS_faccessat,
    libc::SYS_faccessat2,
    libc::SYS_fchmod,
    libc::SYS_fchmodat,
    libc::SYS_fchown,
    libc::SYS_fchownat,
    libc::SYS_utimensat,
    libc::SYS_fgetxattr,
    libc::SYS_fsetxattr,
    libc::SYS_flistxattr,
    libc::SYS_fremovexattr,
    libc::SYS_getxattr,
    libc::SYS_lgetxattr,
    libc::SYS_setxattr,
    libc::SYS_lsetxattr,
    libc::SYS_listxattr,
    libc::SYS_llistxattr,
    libc::SYS_removexattr,
    libc::SYS_lremovexattr,
    libc::SYS_flock,
    libc::SYS_fchdir,
    libc::SYS_umask,
    libc::SYS_setresuid,
    libc::SYS_setresgid,
    libc::SYS_getuid,
    libc::SYS_getgid,
    libc::SYS_geteuid,
    libc::SYS_getegid,
    libc::SYS_capget,
    libc::SYS_capset,
    libc::SYS_prctl,
    libc::SYS_dup,
    libc::SYS_dup3,
];

/// KVM's vCPU ioctls a vCPU thread makes (`_IO`/`_IOR` of `KVMIO`).
mod kvm {
    use vmm_sys_util::{ioctl_io_nr, ioctl_ior_nr};

    const KVMIO: u32 = 0xAE;
    ioctl_io_nr!(KVM_RUN, KVMIO, 0x80);
    ioctl_ior_nr!(KVM_GET_REGS, KVMIO, 0x81, kvm_bindings::kvm_regs);
    ioctl_ior_nr!(KVM_GET_SREGS, KVMIO, 0x83, kvm_bindings::kvm_sregs);

    pub fn run() -> u64 {
        KVM_RUN()
    }
    pub fn get_regs() -> u64 {
        KVM_GET_REGS()
    }
    pub fn get_sregs() -> u64 {
        KVM_GET_SREGS()
    }
}

/// Installs, once per process, the `SIGSYS` handler that names a blocked syscall and ends the
/// process.
pub fn install_reporter() -> Result<(), SeccompError> {
    static INSTALLED: OnceLock<Result<(), i32>> = OnceLock::new();
    INSTALLED
        .get_or_init(|| {
            vmm_sys_util::signal::register_signal_handler(libc::SIGSYS, on_sigsys).map_err(|e| e.errno())
        })
        .map_err(|errno| SeccompError::Reporter(std::io::Error::from_raw_os_error(errno)))
}

extern "C" fn on_sigsys(_: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // Only async-signal-safe calls here, and only syscalls every filter allows: formatting into
    // a stack buffer, write(2), _exit(2).
    let mut message = [0u8; 160];
    let mut len = 0;
    let mut push = |bytes: &[u8]| {
        for byte in bytes {
            if len < message.len() {
                message[len] = *byte;
                len += 1;
            }
        }
    };
    push(b"husk-vmm: seccomp blocked syscall ");
    // SAFETY: the kernel passes a valid siginfo_t to an SA_SIGINFO handler; for SIGSYS from
    // seccomp its union holds the syscall number at the offset `si_syscall` has in the kernel's
    // layout (int si_signo, errno, code; then void *call_addr, int syscall).
    let syscall = unsafe { (*info.cast::<SigsysInfo>()).syscall };
    push(decimal(syscall).as_slice());
    push(b" on a ");
    // A const-initialised thread-local without destructor: reading it makes no syscall.
    let role = THREAD_ROLE.try_with(std::cell::Cell::get).ok().flatten();
    push(role.map_or(b"filtered".as_slice(), ThreadRole::name));
    push(b" thread; ending the process\n");
    // SAFETY: write(2) and _exit(2) are async-signal-safe; the buffer outlives the call.
    unsafe {
        libc::write(libc::STDERR_FILENO, message.as_ptr().cast(), len);
        libc::_exit(SIGSYS_EXIT_STATUS);
    }
}

/// What a process ended by a blocked syscall exits with (128 + SIGSYS, as a shell reports it).
pub const SIGSYS_EXIT_STATUS: i32 = 128 + libc::SIGSYS;

/// The kernel's siginfo layout for SIGSYS (`_sigsys` in the union), on x86_64.
#[repr(C)]
struct SigsysInfo {
    signo: libc::c_int,
    errno: libc::c_int,
    code: libc::c_int,
    _pad: libc::c_int,
    call_addr: *mut libc::c_void,
    syscall: libc::c_int,
    arch: libc::c_uint,
}

/// `value` in decimal digits, without allocating.
fn decimal(value: i32) -> DecimalBuf {
    let mut digits = [0u8; 12];
    let mut at = digits.len();
    let negative = value < 0;
    let mut rest = value.unsigned_abs();
    loop {
        at -= 1;
        digits[at] = b'0' + (rest % 10) as u8;
        rest /= 10;
        if rest == 0 {
            break;
        }
    }
    if negative {
        at -= 1;
        digits[at] = b'-';
    }
    DecimalBuf { digits, start: at }
}

struct DecimalBuf {
    digits: [u8; 12],
    start: usize,
}

impl DecimalBuf {
    fn as_slice(&self) -> &[u8] {
        &self.digits[self.start..]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `body` in a forked child under `filter` and returns how the child ended
    /// (`WEXITSTATUS`, 2 when the filter could not be installed, or 1000 + the signal).
    fn under_filter(filter: &BpfProgram, body: impl FnOnce() -> i32) -> i32 {
        // SAFETY: the child only runs `body` (syscalls, no locks held by other threads are
        // needed: the filters are built before forking) and then _exits.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork");
        if pid == 0 {
            let code = if seccompiler::apply_filter(filter).is_err() { 2 } else { body() };
            // SAFETY: ends the forked child without running the parent's destructors.
            unsafe { libc::_exit(code) };
        }
        let mut status = 0;
        // SAFETY: waits for the child this test forked.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        if libc::WIFEXITED(status) {
            libc::WEXITSTATUS(status)
        } else {
            1000 + libc::WTERMSIG(status)
        }
    }

    #[test]
    fn every_role_builds_a_filter() {
        let roles = [
            ThreadRole::Vcpu,
            ThreadRole::Rng,
            ThreadRole::Net,
            ThreadRole::Vsock,
            ThreadRole::VsockNoConnect,
            ThreadRole::Fs,
            ThreadRole::AgentReplies,
        ];
        for role in roles {
            let program = program(role).unwrap();
            assert!(!program.is_empty(), "{role:?}");
        }
    }

    #[test]
    fn a_filtered_thread_is_stopped_at_a_forbidden_syscall_and_allowed_ones_pass() {
        let vcpu = program(ThreadRole::Vcpu).unwrap();
        install_reporter().unwrap();
        let status = under_filter(&vcpu, || {
            // Allowed: a write and an eventfd.
            // SAFETY: plain syscalls on a buffer and flags this closure owns.
            let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK) };
            if fd < 0 {
                return 3;
            }
            // Forbidden for a vCPU: opening a file.
            // SAFETY: a NUL-terminated path literal.
            unsafe { libc::open(c"/etc/hostname".as_ptr(), libc::O_RDONLY) };
            4 // not reached: the reporter ends the process
        });
        assert_eq!(status, SIGSYS_EXIT_STATUS, "the open(2) was blocked and reported");
    }

    #[test]
    fn the_vsock_thread_may_open_unix_sockets_only() {
        let vsock = program(ThreadRole::Vsock).unwrap();
        install_reporter().unwrap();
        let unix = under_filter(&vsock, || {
            // SAFETY: creating a socket this child owns.
            let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0) };
            if fd < 0 {
                3
            } else {
                0
            }
        });
        assert_eq!(unix, 0, "AF_UNIX is allowed");
        let inet = under_filter(&vsock, || {
            // SAFETY: as above.
            unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
            4
        });
        assert_eq!(inet, SIGSYS_EXIT_STATUS, "AF_INET is not");
    }

    #[test]
    fn a_vsock_thread_whose_guest_reaches_no_host_port_cannot_open_a_socket() {
        let vsock = program(ThreadRole::VsockNoConnect).unwrap();
        install_reporter().unwrap();
        let unix = under_filter(&vsock, || {
            // SAFETY: creating a socket this child would own.
            unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0) };
            4
        });
        assert_eq!(unix, SIGSYS_EXIT_STATUS, "not even AF_UNIX");
        let connect = under_filter(&vsock, || {
            // SAFETY: connect on a descriptor that is no socket, with a null address: refused
            // by the filter before the kernel looks at either.
            unsafe { libc::connect(-1, std::ptr::null(), 0) };
            4
        });
        assert_eq!(connect, SIGSYS_EXIT_STATUS, "nor connect");
    }

    #[test]
    fn no_filtered_thread_may_map_code() {
        let fs = program(ThreadRole::Fs).unwrap();
        install_reporter().unwrap();
        let map = |prot: libc::c_int| {
            under_filter(&fs, || {
                // SAFETY: an anonymous private mapping this child owns and never uses.
                let at = unsafe {
                    libc::mmap(
                        std::ptr::null_mut(),
                        4096,
                        prot,
                        libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                        -1,
                        0,
                    )
                };
                if at == libc::MAP_FAILED {
                    3
                } else {
                    0
                }
            })
        };
        assert_eq!(map(libc::PROT_READ | libc::PROT_WRITE), 0, "data mappings are allowed");
        assert_eq!(map(libc::PROT_READ | libc::PROT_EXEC), SIGSYS_EXIT_STATUS, "code mappings are not");
    }

    #[test]
    fn numbers_print_in_decimal() {
        assert_eq!(decimal(0).as_slice(), b"0");
        assert_eq!(decimal(257).as_slice(), b"257");
        assert_eq!(decimal(-38).as_slice(), b"-38");
    }
}
