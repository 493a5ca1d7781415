//! The 8250 UART at COM1 (vm-superio), its output going to the [`Console`] and its interrupt to
//! GSI 4 through an irqfd.

use std::io;

use serde::{Deserialize, Serialize};
use vm_superio::serial::NoEvents;
use vm_superio::Trigger;
use vmm_sys_util::eventfd::EventFd;

use super::{ByteRegisters, Console};

/// COM1's I/O base.
pub const SERIAL_PORT_BASE: u16 = 0x3f8;
/// Registers of an 8250.
pub const SERIAL_PORT_LEN: u16 = 8;
/// COM1's legacy interrupt line.
pub const SERIAL_IRQ: u32 = 4;

/// An interrupt line backed by an eventfd registered with KVM as an irqfd.
#[derive(Debug)]
pub struct IrqLine(pub EventFd);

impl Trigger for IrqLine {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// COM1 as a bus device.
#[derive(Debug)]
pub struct Serial(vm_superio::Serial<IrqLine, NoEvents, Console>);

impl Serial {
    /// A UART raising `irq` and writing to `console`.
    pub fn new(irq: EventFd, console: Console) -> Serial {
        Serial(vm_superio::Serial::new(IrqLine(irq), console))
    }
}

impl Serial {
    /// Queues `input` for the guest to read, as much as the receive FIFO takes; returns how many
    /// bytes were taken (0 when the FIFO is full: retry after the guest has read).
    pub fn enqueue_input(&mut self, input: &[u8]) -> usize {
        let room = self.0.fifo_capacity().min(input.len());
        if room == 0 {
            return 0;
        }
        // The bytes are queued before the interrupt is raised: a failed trigger still took them
        // (and the guest sees them at its next poll), so they must not be offered again.
        let _ = self.0.enqueue_raw_bytes(&input[..room]);
        room
    }
}

/// The UART's registers and the input the guest has not read, as a snapshot keeps them
/// (vm-superio's own state struct, in a form serde can write).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialState {
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    pub in_buffer: Vec<u8>,
}

impl Serial {
    /// The UART's state.
    pub fn state(&self) -> SerialState {
        let s = self.0.state();
        SerialState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }

    /// Puts the UART in `state`, keeping its interrupt line and console.
    pub fn set_state(&mut self, state: &SerialState) -> io::Result<()> {
        let s = vm_superio::serial::SerialState {
            baud_divisor_low: state.baud_divisor_low,
            baud_divisor_high: state.baud_divisor_high,
            interrupt_enable: state.interrupt_enable,
            interrupt_identification: state.interrupt_identification,
            line_control: state.line_control,
            line_status: state.line_status,
            modem_control: state.modem_control,
            modem_status: state.modem_status,
            scratch: state.scratch,
            in_buffer: state.in_buffer.clone(),
        };
        let irq = IrqLine(self.0.interrupt_evt().0.try_clone()?);
        let restored = vm_superio::Serial::from_state(&s, irq, NoEvents, self.0.writer().clone())
            .map_err(|e| io::Error::other(format!("serial state: {e:?}")))?;
        self.0 = restored;
        Ok(())
    }
}

impl ByteRegisters for Serial {
    fn read_register(&mut self, offset: u8) -> u8 {
        self.0.read(offset)
    }

    fn write_register(&mut self, offset: u8, value: u8) {
        // Errors are the interrupt eventfd failing; the byte itself already reached the console.
        let _ = self.0.write(offset, value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::BusDevice;

    #[test]
    fn the_state_round_trips_through_a_new_uart_with_its_unread_input() {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut serial = Serial::new(irq.try_clone().unwrap(), Console::new(None, false));
        serial.write(3, &[0x03]); // LCR: 8 data bits
        serial.write(1, &[0x01]); // IER: received data interrupt
        serial.write(7, &[0x5a]); // scratch
        serial.enqueue_input(b"ab");
        let state = serial.state();
        let json = serde_json::to_string(&state).unwrap();

        let mut restored = Serial::new(irq.try_clone().unwrap(), Console::new(None, false));
        restored.set_state(&serde_json::from_str(&json).unwrap()).unwrap();
        assert_eq!(restored.state(), state);
        let mut byte = [0u8];
        restored.read(0, &mut byte);
        assert_eq!(&byte, b"a", "the guest reads the input it had not read");
        let too_much = SerialState { in_buffer: vec![0; 4096], ..state };
        assert!(restored.set_state(&too_much).is_err(), "more input than the FIFO holds");
    }

    #[test]
    fn transmitted_bytes_reach_the_console_and_raise_the_interrupt() {
        let console = Console::new(None, false);
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut serial = Serial::new(irq.try_clone().unwrap(), console.clone());
        serial.write(1, &[0x02]); // IER: THR empty interrupt
        for byte in b"hello\n" {
            serial.write(0, &[*byte]);
        }
        assert_eq!(console.tail_text(), "hello");
        assert!(irq.read().unwrap() > 0);
    }

    #[test]
    fn restoring_ier_reasserts_pending_interrupts() {
        // Linux's 8250 console masks IER around every printk and relies on the UART raising the
        // interrupt again on restore; without it typed input and queued output stall for good.
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut serial = Serial::new(irq.try_clone().unwrap(), Console::default());
        serial.write(1, &[0x00]); // IER masked, as during a printk
        assert_eq!(serial.enqueue_input(b"ls\n"), 3);
        assert!(irq.read().is_err(), "no interrupt while masked");
        serial.write(1, &[0x01]); // IER restored: received data available
        assert!(irq.read().unwrap() > 0, "pending input raises the interrupt on restore");
        serial.write(1, &[0x02]); // transmitter holding register empty
        assert!(irq.read().unwrap() > 0, "an empty THR raises the interrupt on enable");
    }

    #[test]
    fn wide_accesses_are_ignored() {
        let mut serial = Serial::new(EventFd::new(libc::EFD_NONBLOCK).unwrap(), Console::default());
        let mut word = [0u8; 2];
        serial.read(0, &mut word);
        assert_eq!(word, [0xff, 0xff]);
        serial.write(0, b"ab");
    }
}
