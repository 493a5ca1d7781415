//! Reports guest events to the VMM through [`GUEST_EVENT_PORT`] (see `husk_protocols::GuestEvent`).

use husk_protocols::{GuestEvent, GUEST_EVENT_PORT};

/// Writes `event` to the guest event port; fails when this process may not do port I/O.
/// Under a VMM without the port (e.g. QEMU) the write is simply ignored by the hypervisor.
pub fn send(event: GuestEvent) -> std::io::Result<()> {
    // SAFETY: ioperm only changes this process's I/O permission bitmap (PID 1 has CAP_SYS_RAWIO).
    if unsafe { libc::ioperm(GUEST_EVENT_PORT.into(), 1, 1) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a one-byte port write, permitted by the ioperm above; it touches no memory and the
    // VMM's device has no side effect on this process.
    unsafe {
        std::arch::asm!("out dx, al", in("dx") GUEST_EVENT_PORT, in("al") event as u8,
            options(nomem, nostack, preserves_flags));
    }
    Ok(())
}
