//! The i8042 keyboard controller, only for its CPU reset line: Linux's `reboot=k` writes 0xFE to
//! the command port, which ends the VM with [`ExitReason::Reboot`].

use vm_superio::Trigger;

use super::ByteRegisters;
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

impl ByteRegisters for I8042 {
    fn read_register(&mut self, offset: u8) -> u8 {
        // Status 0: output buffer empty, input buffer empty, so the kernel never waits on us.
        self.0.read(offset)
    }

    fn write_register(&mut self, offset: u8, value: u8) {
        // The only effect is the reset line, whose trigger cannot fail.
        let _ = self.0.write(offset, value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::BusDevice;

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
