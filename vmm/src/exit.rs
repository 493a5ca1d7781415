//! Why a VM stopped, and how devices and vCPU threads report it.

use std::sync::mpsc::{channel, Receiver, Sender};

/// Why the VM ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitReason {
    /// The guest powered off (the agent signalled it on the guest event port).
    Poweroff,
    /// The guest asked for a reset through the i8042 controller (`reboot=k`).
    Reboot,
    /// The guest kernel panicked (its panic message is in the console tail).
    GuestPanic,
    /// A vCPU triple-faulted (`KVM_EXIT_SHUTDOWN`); `state` is its registers as KVM reports them
    /// afterwards (instruction and stack pointers, control registers). On Intel they are where the
    /// vCPU faulted; on AMD, KVM reinitialises the vCPU on a shutdown intercept before returning, so
    /// they read as the reset state (`rip=0xfff0 cs=0xf000`), whatever the guest was doing.
    TripleFault { vcpu: u8, state: String },
    /// The host stopped the VM ([`crate::VmHandle::stop`]).
    Stopped,
    /// KVM or the VMM failed.
    Error(String),
}

impl ExitReason {
    /// True for the ends a guest asks for itself (poweroff, reboot).
    pub fn is_clean(&self) -> bool {
        matches!(self, ExitReason::Poweroff | ExitReason::Reboot | ExitReason::Stopped)
    }
}

impl std::fmt::Display for ExitReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExitReason::Poweroff => write!(f, "guest powered off"),
            ExitReason::Reboot => write!(f, "guest requested a reboot"),
            ExitReason::GuestPanic => write!(f, "guest kernel panicked"),
            ExitReason::TripleFault { vcpu, state } => write!(f, "vCPU {vcpu} triple fault ({state})"),
            ExitReason::Stopped => write!(f, "stopped by the host"),
            ExitReason::Error(err) => write!(f, "VMM error: {err}"),
        }
    }
}

/// Where devices and vCPU threads send exit requests; the first one received wins.
#[derive(Debug, Clone)]
pub struct ExitNotifier(Sender<ExitReason>);

impl ExitNotifier {
    /// A notifier and the receiver the VM handle waits on.
    pub fn new() -> (ExitNotifier, Receiver<ExitReason>) {
        let (tx, rx) = channel();
        (ExitNotifier(tx), rx)
    }

    /// Requests that the VM end for `reason` (ignored once the VM is gone).
    pub fn notify(&self, reason: ExitReason) {
        let _ = self.0.send(reason);
    }
}
