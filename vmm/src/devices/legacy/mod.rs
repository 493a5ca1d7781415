//! Legacy PC devices: the 8250 serial console, the i8042 reset line and the guest event port.

pub mod console;
pub mod console_input;
pub mod guest_events;
pub mod i8042;
pub mod serial;

pub use console::Console;
pub use guest_events::{GuestEvents, GuestTimestamps, ReadyWait};
pub use i8042::{I8042, I8042_PORT_BASE, I8042_PORT_LEN};
pub use serial::{Serial, SerialState, SERIAL_IRQ, SERIAL_PORT_BASE, SERIAL_PORT_LEN};

use crate::devices::BusDevice;

/// A device of one-byte registers, as the legacy PC devices are. Wider accesses are not something
/// such hardware answers: reads see all ones and writes are dropped.
pub trait ByteRegisters: Send {
    /// Reads the register at `offset`.
    fn read_register(&mut self, offset: u8) -> u8;
    /// Writes `value` to the register at `offset`.
    fn write_register(&mut self, offset: u8, value: u8);
}

impl<T: ByteRegisters> BusDevice for T {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match (u8::try_from(offset), data) {
            (Ok(offset), [byte]) => *byte = self.read_register(offset),
            (_, data) => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Ok(offset), [value]) = (u8::try_from(offset), data) {
            self.write_register(offset, *value);
        }
    }
}
