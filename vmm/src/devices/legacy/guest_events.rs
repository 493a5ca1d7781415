//! The guest event port ([`husk_protocols::GUEST_EVENT_PORT`]): the agent reports that it is ready
//! (the boot timer's end point, as Firecracker's boot-timer device does) and that the guest is
//! powering off (there is no ACPI to do it).

use std::sync::{Arc, OnceLock};
use std::time::Instant;

use husk_protocols::GuestEvent;

use super::ByteRegisters;
use crate::exit::{ExitNotifier, ExitReason};

/// Moments of a VM's life, each recorded once.
#[derive(Debug, Default)]
pub struct GuestTimestamps {
    /// The first `KVM_RUN` of the boot vCPU.
    pub first_vcpu_entry: OnceLock<Instant>,
    /// The agent's [`GuestEvent::Ready`].
    pub guest_ready: OnceLock<Instant>,
}

/// The guest event port as a bus device.
#[derive(Debug)]
pub struct GuestEvents {
    timestamps: Arc<GuestTimestamps>,
    exit: ExitNotifier,
}

impl GuestEvents {
    /// A device recording into `timestamps` and ending the VM through `exit`.
    pub fn new(timestamps: Arc<GuestTimestamps>, exit: ExitNotifier) -> GuestEvents {
        GuestEvents { timestamps, exit }
    }
}

impl ByteRegisters for GuestEvents {
    fn read_register(&mut self, _offset: u8) -> u8 {
        0
    }

    fn write_register(&mut self, _offset: u8, value: u8) {
        match GuestEvent::from_byte(value) {
            Some(GuestEvent::Ready) => {
                let _ = self.timestamps.guest_ready.set(Instant::now());
            }
            Some(GuestEvent::Poweroff) => self.exit.notify(ExitReason::Poweroff),
            None => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::BusDevice;

    #[test]
    fn ready_is_recorded_once_and_poweroff_ends_the_vm() {
        let (exit, events) = ExitNotifier::new();
        let timestamps = Arc::new(GuestTimestamps::default());
        let mut device = GuestEvents::new(timestamps.clone(), exit);
        device.write(0, &[GuestEvent::Ready as u8]);
        let first = *timestamps.guest_ready.get().unwrap();
        device.write(0, &[GuestEvent::Ready as u8]);
        assert_eq!(*timestamps.guest_ready.get().unwrap(), first);
        device.write(0, &[0x77]);
        device.write(0, &[2, 2]);
        assert!(events.try_recv().is_err(), "unknown values and wide writes are ignored");
        device.write(0, &[GuestEvent::Poweroff as u8]);
        assert_eq!(events.try_recv().unwrap(), ExitReason::Poweroff);
    }
}
