//! An address-range bus (I/O ports or MMIO): finds the device behind a guest access.
//!
//! The guest chooses addresses and sizes freely: an access that hits no device, or spans past its
//! device's range, is not dispatched (reads see all ones, as on real hardware).

use std::sync::{Arc, Mutex};

/// A device reachable through a [`Bus`]. `offset` is relative to the device's base address.
pub trait BusDevice: Send {
    /// Guest read of `data.len()` bytes at `offset`.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// Guest write of `data` at `offset`.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// Errors registering devices.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    #[error("bus range {base:#x}+{len:#x} overlaps a registered device or is empty")]
    Overlap { base: u64, len: u64 },
}

struct Range {
    base: u64,
    len: u64,
    device: Arc<Mutex<dyn BusDevice>>,
}

/// Devices by address range; shared by all vCPU threads.
#[derive(Default)]
pub struct Bus {
    ranges: Vec<Range>,
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.ranges.iter().map(|r| (r.base, r.len))).finish()
    }
}

impl Bus {
    /// Registers `device` at `base..base + len`.
    pub fn insert(&mut self, base: u64, len: u64, device: Arc<Mutex<dyn BusDevice>>) -> Result<(), BusError> {
        let end = base.checked_add(len).filter(|_| len > 0).ok_or(BusError::Overlap { base, len })?;
        if self.ranges.iter().any(|r| base < r.base + r.len && r.base < end) {
            return Err(BusError::Overlap { base, len });
        }
        let at = self.ranges.partition_point(|r| r.base < base);
        self.ranges.insert(at, Range { base, len, device });
        Ok(())
    }

    fn find(&self, addr: u64, size: usize) -> Option<(&Range, u64)> {
        let index = self.ranges.partition_point(|r| r.base <= addr).checked_sub(1)?;
        let range = &self.ranges[index];
        let offset = addr - range.base;
        (offset.checked_add(size as u64)? <= range.len).then_some((range, offset))
    }

    /// Dispatches a read; returns false (and fills `data` with ones) when no device answers.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((range, offset)) => {
                lock(&range.device).read(offset, data);
                true
            }
            None => {
                data.fill(0xff);
                false
            }
        }
    }

    /// Dispatches a write; returns false when no device takes it.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((range, offset)) => {
                lock(&range.device).write(offset, data);
                true
            }
            None => false,
        }
    }
}

/// Locks a device, recovering from a poisoned lock: a panic in one access must not take every
/// vCPU down with it (device state is simple register state, still consistent enough to serve).
fn lock(device: &Mutex<dyn BusDevice>) -> std::sync::MutexGuard<'_, dyn BusDevice + 'static> {
    device.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Recorder(Vec<(u64, Vec<u8>)>);

    impl BusDevice for Recorder {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.0.push((offset, data.to_vec()));
        }
    }

    #[test]
    fn accesses_reach_the_device_at_their_offset() {
        let device = Arc::new(Mutex::new(Recorder::default()));
        let mut bus = Bus::default();
        bus.insert(0x3f8, 8, device.clone()).unwrap();
        let mut byte = [0u8];
        assert!(bus.read(0x3fd, &mut byte));
        assert_eq!(byte, [5]);
        assert!(bus.write(0x3f8, b"x"));
        assert_eq!(device.lock().unwrap().0, vec![(0, vec![b'x'])]);
    }

    #[test]
    fn misses_and_accesses_spanning_past_a_device_are_not_dispatched() {
        let mut bus = Bus::default();
        bus.insert(0x60, 5, Arc::new(Mutex::new(Recorder::default()))).unwrap();
        let mut word = [0u8; 4];
        assert!(!bus.read(0x63, &mut word), "0x63..0x67 spans past 0x65");
        assert_eq!(word, [0xff; 4]);
        assert!(!bus.write(0x5f, &[0]));
        assert!(!bus.write(u64::MAX, &[0; 8]));
    }

    #[test]
    fn overlapping_and_empty_ranges_are_refused() {
        let mut bus = Bus::default();
        bus.insert(0x100, 0x10, Arc::new(Mutex::new(Recorder::default()))).unwrap();
        let other = || Arc::new(Mutex::new(Recorder::default()));
        assert!(bus.insert(0x10f, 1, other()).is_err());
        assert!(bus.insert(0xf8, 0x10, other()).is_err());
        assert!(bus.insert(0x200, 0, other()).is_err());
        assert!(bus.insert(u64::MAX, 2, other()).is_err());
        assert!(bus.insert(0x110, 1, other()).is_ok());
    }
}
