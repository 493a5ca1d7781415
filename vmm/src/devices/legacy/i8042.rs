//! The i8042 keyboard controller, only for its CPU reset line: Linux's `reboot=k` writes 0xFE to
//! the command port, which ends the VM with [`ExitReason::Reboot`].

use vm_superio::Trigger;

use crate::devices::BusDevice;
use crate::exit::{ExitNotifier, ExitReason};

/// The controller's data port; the command/status port is at +4.
pub const I8042_PORT_BASE: u16 = 0x60;
/// Data port to command port inclusive.
pub const I8042_PORT_LEN: u16 = 5;

/// Reports a CPU reset as a reboot request.
#[derive(Debug)]
pub struct ResetLine(ExitNotifier);

impl Trigger for ResetLine {
    type E = std::convert::Infallible;

    fn trigger(&self) -> Result<(), Self::E> {
        self.0.notify(ExitReason::Reboot);
        Ok(())
    }
}

/// The i8042 as a bus device.
#[derive(Debug)]
pub struct I8042(vm_superio::I8042Device<ResetLine>);

impl I8042 {
    /// A controller whose reset line ends the VM through `exit`.
    pub fn new(exit: ExitNotifier) -> I8042 {
        I8042(vm_superio::I8042Device::new(ResetLine(exit)))
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        // Status 0: output buffer empty, input buffer empty, so the kernel never waits on us.
        match data {
            [byte] => *byte = self.0.read(offset as u8),
            _ => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let [byte] = data {
            let _ = self.0.write(offset as u8, *byte);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reset_command_requests_a_reboot_and_nothing_else_does() {
        let (exit, events) = ExitNotifier::new();
        let mut i8042 = I8042::new(exit);
        i8042.write(0, &[0xfe]);
        i8042.write(4, &[0xad]);
        assert!(events.try_recv().is_err(), "only 0xFE on the command port resets");
        let mut status = [0xffu8];
        i8042.read(4, &mut status);
        assert_eq!(status, [0]);
        i8042.write(4, &[0xfe]);
        assert_eq!(events.try_recv().unwrap(), ExitReason::Reboot);
    }
}
