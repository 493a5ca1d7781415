//! vCPU threads: run the guest and route its I/O and MMIO exits to the buses.
//!
//! Every exit is caused by the guest, so nothing here may panic: unknown ports read as all ones,
//! unexpected exits end the VM with an error.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::Instant;

use kvm_bindings::{KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vmm_sys_util::signal::{register_signal_handler, SIGRTMIN};

use crate::devices::legacy::GuestTimestamps;
use crate::devices::Bus;
use crate::exit::{ExitNotifier, ExitReason};

/// What every vCPU thread shares.
#[derive(Debug, Clone)]
pub struct VcpuShared {
    pub pio: Arc<Bus>,
    pub mmio: Arc<Bus>,
    pub exit: ExitNotifier,
    pub stop: Arc<AtomicBool>,
    pub timestamps: Arc<GuestTimestamps>,
    /// Whether the thread runs under the vCPU seccomp filter.
    pub seccomp: bool,
}

/// The signal that kicks a vCPU thread out of `KVM_RUN`.
pub fn kick_signal() -> i32 {
    SIGRTMIN()
}

extern "C" fn on_kick(_: i32, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// Installs the (empty) kick handler once per process: its only job is to make `KVM_RUN` return
/// `EINTR` so the thread sees the stop flag.
pub fn install_kick_handler() -> io::Result<()> {
    // The outcome is kept: a failed install must fail every later VM too (kicking a thread without
    // the handler would kill the whole process).
    static INSTALLED: OnceLock<Result<(), i32>> = OnceLock::new();
    INSTALLED
        .get_or_init(|| register_signal_handler(kick_signal(), on_kick).map_err(|e| e.errno()))
        .map_err(io::Error::from_raw_os_error)
}

/// Starts vCPU `index` on its own thread. The thread hands its vCPU back when it was stopped
/// (for a snapshot to read its state), nothing when the VM ended.
pub fn spawn(index: u8, vcpu: VcpuFd, shared: VcpuShared) -> io::Result<JoinHandle<Option<VcpuFd>>> {
    std::thread::Builder::new().name(format!("vcpu{index}")).spawn(move || {
        crate::threads::mask_process_signals();
        run(index, vcpu, &shared)
    })
}

/// Reports a vCPU thread that unwinds, so `VmHandle::wait` does not wait forever for an exit.
struct PanicGuard<'a>(u8, &'a ExitNotifier);

impl Drop for PanicGuard<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.1.notify(ExitReason::Error(format!("vCPU {} thread panicked", self.0)));
        }
    }
}

fn run(index: u8, mut vcpu: VcpuFd, shared: &VcpuShared) -> Option<VcpuFd> {
    let _guard = PanicGuard(index, &shared.exit);
    if shared.seccomp {
        // Before the guest runs a single instruction on this vCPU.
        if let Err(err) = crate::seccomp::apply(crate::seccomp::ThreadRole::Vcpu) {
            shared.exit.notify(ExitReason::Error(format!("vCPU {index}: {err}")));
            return None;
        }
    }
    loop {
        if shared.stop.load(Ordering::Acquire) {
            complete_pending_io(&mut vcpu);
            return Some(vcpu);
        }
        if index == 0 {
            let _ = shared.timestamps.first_vcpu_entry.set(Instant::now());
        }
        let end = match vcpu.run() {
            Ok(VcpuExit::Shutdown) => {
                Some(ExitReason::TripleFault { vcpu: index, state: describe_state(&vcpu) })
            }
            Ok(exit) => handle_exit(index, exit, shared),
            Err(err) if err.errno() == libc::EINTR || err.errno() == libc::EAGAIN => None,
            Err(err) => Some(ExitReason::Error(format!("KVM_RUN on vCPU {index}: {err}"))),
        };
        if let Some(reason) = end {
            shared.exit.notify(reason);
            return None;
        }
    }
}

/// An I/O or MMIO exit is completed by the next `KVM_RUN` (the value read goes into the guest's
/// register then): entering once with `immediate_exit` set completes it and returns at once, so
/// the vCPU's state holds the finished instruction (KVM's documented way before saving state).
fn complete_pending_io(vcpu: &mut VcpuFd) {
    vcpu.set_kvm_immediate_exit(1);
    let _ = vcpu.run();
    vcpu.set_kvm_immediate_exit(0);
}

/// The registers that say where a vCPU was when it stopped (one line, for the exit message). After
/// a shutdown on AMD these are KVM's reset values, not the faulting state (see `ExitReason`).
fn describe_state(vcpu: &VcpuFd) -> String {
    let regs = match vcpu.get_regs() {
        Ok(regs) => format!("rip={:#x} rsp={:#x} rflags={:#x}", regs.rip, regs.rsp, regs.rflags),
        Err(err) => format!("registers unreadable: {err}"),
    };
    let sregs = match vcpu.get_sregs() {
        Ok(s) => format!(
            "cr0={:#x} cr2={:#x} cr3={:#x} cr4={:#x} efer={:#x} cs={:#x} idt={:#x}/{:#x}",
            s.cr0, s.cr2, s.cr3, s.cr4, s.efer, s.cs.selector, s.idt.base, s.idt.limit
        ),
        Err(err) => format!("system registers unreadable: {err}"),
    };
    format!("{regs} {sregs}")
}

/// Handles one exit; `Some` ends the VM.
fn handle_exit(index: u8, exit: VcpuExit<'_>, shared: &VcpuShared) -> Option<ExitReason> {
    match exit {
        VcpuExit::IoIn(port, data) => {
            shared.pio.read(port.into(), data);
            None
        }
        VcpuExit::IoOut(port, data) => {
            shared.pio.write(port.into(), data);
            None
        }
        VcpuExit::MmioRead(addr, data) => {
            shared.mmio.read(addr, data);
            None
        }
        VcpuExit::MmioWrite(addr, data) => {
            shared.mmio.write(addr, data);
            None
        }
        VcpuExit::Hlt | VcpuExit::Intr | VcpuExit::IrqWindowOpen => None,
        VcpuExit::SystemEvent(kind, _) => Some(match kind {
            KVM_SYSTEM_EVENT_SHUTDOWN => ExitReason::Poweroff,
            KVM_SYSTEM_EVENT_RESET => ExitReason::Reboot,
            KVM_SYSTEM_EVENT_CRASH => ExitReason::GuestPanic,
            other => ExitReason::Error(format!("vCPU {index}: unknown KVM system event {other}")),
        }),
        VcpuExit::FailEntry(reason, cpu) => Some(ExitReason::Error(format!(
            "vCPU {index}: KVM_EXIT_FAIL_ENTRY (hardware entry failure reason {reason:#x}, host cpu {cpu})"
        ))),
        VcpuExit::InternalError => Some(ExitReason::Error(format!(
            "vCPU {index}: KVM_EXIT_INTERNAL_ERROR (instruction emulation failed)"
        ))),
        other => Some(ExitReason::Error(format!("vCPU {index}: unexpected exit {other:?}"))),
    }
}
