//! Legacy PC devices: the 8250 serial console, the i8042 reset line and the guest event port.

pub mod console;
pub mod guest_events;
pub mod i8042;
pub mod serial;

pub use console::Console;
pub use guest_events::{GuestEvents, GuestTimestamps};
pub use i8042::{I8042, I8042_PORT_BASE, I8042_PORT_LEN};
pub use serial::{Serial, SERIAL_IRQ, SERIAL_PORT_BASE, SERIAL_PORT_LEN};
