//! What a virtio device looks like from the host, for diagnosing a stall: the transport's status
//! and interrupt bits, and each queue's rings as the driver and the device left them in guest
//! memory (available and used indices, notification flags), plus the device's own counters.
//!
//! Reading is side-effect free for the guest: the rings are only loaded, never written, and a ring
//! address the driver made unreadable shows as such instead of failing the whole report.

use std::fmt;

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// Where a queue's rings are (as the driver configured them when it activated the device).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rings {
    pub size: u16,
    pub ready: bool,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
}

impl Rings {
    /// The ring addresses of `queue`.
    pub fn of(queue: &Queue) -> Rings {
        Rings {
            size: queue.size(),
            ready: queue.ready(),
            desc: queue.desc_table(),
            avail: queue.avail_ring(),
            used: queue.used_ring(),
        }
    }
}

/// One queue's indices and flags (`None` where guest memory could not be read).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueState {
    pub size: u16,
    pub ready: bool,
    /// `avail.idx`: chains the driver has made available so far (wrapping).
    pub avail_idx: Option<u16>,
    /// `avail.flags`: bit 0 is `VRING_AVAIL_F_NO_INTERRUPT` (the driver asks for no interrupts).
    pub avail_flags: Option<u16>,
    /// `used.idx`: chains the device has completed so far (wrapping).
    pub used_idx: Option<u16>,
    /// `used.flags`: bit 0 is `VRING_USED_F_NO_NOTIFY` (the device asks for no notifications).
    pub used_flags: Option<u16>,
}

impl QueueState {
    /// Loads the indices and flags of the rings at `rings` from `mem`.
    pub fn read(mem: &GuestMemoryMmap, rings: &Rings) -> QueueState {
        let load = |addr: u64| mem.read_obj::<u16>(GuestAddress(addr)).ok().map(u16::from_le);
        QueueState {
            size: rings.size,
            ready: rings.ready,
            avail_flags: load(rings.avail),
            avail_idx: rings.avail.checked_add(2).and_then(load),
            used_flags: load(rings.used),
            used_idx: rings.used.checked_add(2).and_then(load),
        }
    }
}

/// A device's transport and queues at one moment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceState {
    pub device_type: u32,
    /// The driver's `Status` register.
    pub status: u32,
    /// The device is serving its queues (the driver set `DRIVER_OK` and activation succeeded).
    pub activated: bool,
    /// `InterruptStatus` bits the driver has not acknowledged yet.
    pub interrupt_status: u32,
    /// Interrupts raised since the VM started (compare with the guest's `/proc/interrupts`).
    pub interrupts_raised: u64,
    /// Of those, raised again because the driver left the status unacknowledged (a lost edge).
    pub interrupts_raised_again: u64,
    /// Empty until the device is activated.
    pub queues: Vec<QueueState>,
    /// The device model's own counters, if it keeps any.
    pub device: Option<String>,
}

impl fmt::Display for DeviceState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "virtio device {} status={:#x} activated={} interrupt_status={:#x} interrupts_raised={} raised_again={}",
            self.device_type,
            self.status,
            self.activated,
            self.interrupt_status,
            self.interrupts_raised,
            self.interrupts_raised_again
        )?;
        for (index, queue) in self.queues.iter().enumerate() {
            write!(f, "; q{index}: {queue}")?;
        }
        if let Some(device) = &self.device {
            write!(f, "; {device}")?;
        }
        Ok(())
    }
}

impl fmt::Display for QueueState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let show = |value: Option<u16>| value.map_or_else(|| "unreadable".to_owned(), |v| v.to_string());
        let flags = |value: Option<u16>| value.map_or_else(|| "unreadable".to_owned(), |v| format!("{v:#x}"));
        write!(
            f,
            "size={} ready={} avail_idx={} avail_flags={} used_idx={} used_flags={}",
            self.size,
            self.ready,
            show(self.avail_idx),
            flags(self.avail_flags),
            show(self.used_idx),
            flags(self.used_flags)
        )?;
        // Chains made available and not yet completed (for RX: buffers the device may fill).
        if let (Some(avail), Some(used)) = (self.avail_idx, self.used_idx) {
            write!(f, " outstanding={}", avail.wrapping_sub(used))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn indices_and_flags_are_read_from_the_rings_and_bad_addresses_show_as_unreadable() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        mem.write_obj(1u16.to_le(), GuestAddress(0x1000)).unwrap(); // avail.flags: no interrupts
        mem.write_obj(300u16.to_le(), GuestAddress(0x1002)).unwrap();
        mem.write_obj(44u16.to_le(), GuestAddress(0x2002)).unwrap();
        let rings = Rings { size: 256, ready: true, desc: 0, avail: 0x1000, used: 0x2000 };
        let state = QueueState::read(&mem, &rings);
        assert_eq!(
            state,
            QueueState {
                size: 256,
                ready: true,
                avail_idx: Some(300),
                avail_flags: Some(1),
                used_idx: Some(44),
                used_flags: Some(0),
            }
        );
        assert!(state.to_string().ends_with("outstanding=256"), "{state}");
        let outside = QueueState::read(&mem, &Rings { avail: 0x10000, used: u64::MAX, ..rings });
        assert_eq!((outside.avail_idx, outside.used_idx, outside.used_flags), (None, None, None));
        assert!(outside.to_string().contains("avail_idx=unreadable"), "{outside}");
    }
}
