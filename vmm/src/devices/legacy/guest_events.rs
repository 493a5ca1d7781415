//! The guest event port ([`husk_protocols::GUEST_EVENT_PORT`]): the agent reports that it is ready
//! (the boot timer's end point, as Firecracker's boot-timer device does) and that the guest is
//! powering off (there is no ACPI to do it).

use std::sync::{Arc, Condvar, Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use husk_protocols::GuestEvent;

use super::ByteRegisters;
use crate::exit::{ExitNotifier, ExitReason};

/// Moments of a VM's life, each recorded once.
#[derive(Debug, Default)]
pub struct GuestTimestamps {
    /// The VM made (memory, guest loaded, devices), its vCPU threads about to start.
    pub vcpus_starting: OnceLock<Instant>,
    /// The first `KVM_RUN` of the boot vCPU.
    pub first_vcpu_entry: OnceLock<Instant>,
    /// The agent's [`GuestEvent::Ready`].
    pub guest_ready: OnceLock<Instant>,
    /// Whether the VM has ended; with `changed`, what [`GuestTimestamps::wait_ready`] waits for.
    ended: Mutex<bool>,
    changed: Condvar,
}

/// How [`GuestTimestamps::wait_ready`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadyWait {
    /// The agent reported ready at this moment.
    Ready(Instant),
    /// The VM ended first.
    Ended,
    TimedOut,
}

impl GuestTimestamps {
    /// Records the agent's ready report (the first one counts) and wakes the waiters.
    pub fn set_ready(&self, at: Instant) {
        let _ = self.guest_ready.set(at);
        let _guard = self.ended.lock().unwrap_or_else(PoisonError::into_inner);
        self.changed.notify_all();
    }

    /// Records that the VM ended and wakes the waiters.
    pub fn set_ended(&self) {
        *self.ended.lock().unwrap_or_else(PoisonError::into_inner) = true;
        self.changed.notify_all();
    }

    /// Blocks until the agent reports ready, the VM ends, or `timeout` passes.
    pub fn wait_ready(&self, timeout: Duration) -> ReadyWait {
        let deadline = Instant::now() + timeout;
        let mut ended = self.ended.lock().unwrap_or_else(PoisonError::into_inner);
        loop {
            if let Some(at) = self.guest_ready.get() {
                return ReadyWait::Ready(*at);
            }
            if *ended {
                return ReadyWait::Ended;
            }
            let Some(left) = deadline.checked_duration_since(Instant::now()) else {
                return ReadyWait::TimedOut;
            };
            ended = self.changed.wait_timeout(ended, left).unwrap_or_else(PoisonError::into_inner).0;
        }
    }
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
            Some(GuestEvent::Ready) => self.timestamps.set_ready(Instant::now()),
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

    /// A waiter wakes when the agent reports ready (with that moment) or the VM ends, and gives
    /// up at its timeout.
    #[test]
    fn a_ready_waiter_wakes_on_the_report_or_the_end() {
        let timestamps = Arc::new(GuestTimestamps::default());
        assert_eq!(timestamps.wait_ready(Duration::from_millis(20)), ReadyWait::TimedOut);
        let (exit, _events) = ExitNotifier::new();
        let mut device = GuestEvents::new(timestamps.clone(), exit);
        let waiter = {
            let timestamps = timestamps.clone();
            std::thread::spawn(move || timestamps.wait_ready(Duration::from_secs(60)))
        };
        device.write(0, &[GuestEvent::Ready as u8]);
        let ready = *timestamps.guest_ready.get().unwrap();
        assert_eq!(waiter.join().unwrap(), ReadyWait::Ready(ready));

        let ended = Arc::new(GuestTimestamps::default());
        let waiter = {
            let ended = ended.clone();
            std::thread::spawn(move || ended.wait_ready(Duration::from_secs(60)))
        };
        ended.set_ended();
        assert_eq!(waiter.join().unwrap(), ReadyWait::Ended);
    }
}
