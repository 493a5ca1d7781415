//! Test doubles for device models: [`GuestQueue`] plays the guest's driver of one split virtqueue
//! in guest memory (descriptors, available ring, reading the used ring), so device code runs
//! against a real `virtio_queue::Queue` without KVM. Used by unit tests and the fuzz targets
//! (feature `fuzzing`), which also write raw, malformed descriptors through it.

use std::sync::atomic::{fence, Ordering};

use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryError, GuestMemoryMmap};

/// Size in bytes of one descriptor, one available-ring entry and one used-ring element.
const DESC_SIZE: u64 = 16;
const AVAIL_ENTRY: u64 = 2;
const USED_ELEM: u64 = 8;

/// One descriptor as the driver writes it (virtio 1.2, 2.7.5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawDesc {
    pub addr: u64,
    pub len: u32,
    pub flags: u16,
    pub next: u16,
}

/// A buffer of a chain: where it is, how long, and whether the device may write it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Buffer {
    pub addr: u64,
    pub len: u32,
    pub writable: bool,
}

/// The driver's side of one split virtqueue.
#[derive(Debug)]
pub struct GuestQueue {
    size: u16,
    desc_table: u64,
    avail_ring: u64,
    used_ring: u64,
    /// Next free descriptor slot (handed out round-robin).
    next_desc: u16,
    avail_idx: u16,
    used_seen: u16,
}

impl GuestQueue {
    /// Bytes a queue of `size` entries occupies from its base (descriptor table, available ring,
    /// used ring, each aligned as the spec asks).
    pub fn footprint(size: u16) -> u64 {
        let size = u64::from(size);
        let avail = size * DESC_SIZE;
        let used = (avail + 6 + size * AVAIL_ENTRY).next_multiple_of(4);
        used + 6 + size * USED_ELEM
    }

    /// Lays out a queue of `size` entries (a power of two) at `base` and returns the driver side
    /// and the device's ready `Queue`.
    pub fn new(mem: &GuestMemoryMmap, base: u64, size: u16) -> Result<(GuestQueue, Queue), GuestMemoryError> {
        let avail_ring = base + u64::from(size) * DESC_SIZE;
        let used_ring = (avail_ring + 6 + u64::from(size) * AVAIL_ENTRY).next_multiple_of(4);
        let zeros = vec![0u8; GuestQueue::footprint(size) as usize];
        mem.write_slice(&zeros, GuestAddress(base))?;
        let mut queue =
            Queue::new(size).map_err(|_| GuestMemoryError::InvalidGuestAddress(GuestAddress(base)))?;
        let low = |addr: u64| Some(addr as u32);
        let high = |addr: u64| Some((addr >> 32) as u32);
        queue.set_desc_table_address(low(base), high(base));
        queue.set_avail_ring_address(low(avail_ring), high(avail_ring));
        queue.set_used_ring_address(low(used_ring), high(used_ring));
        queue.set_ready(true);
        let driver = GuestQueue {
            size,
            desc_table: base,
            avail_ring,
            used_ring,
            next_desc: 0,
            avail_idx: 0,
            used_seen: 0,
        };
        Ok((driver, queue))
    }

    /// Writes descriptor `index` verbatim (any flags, any `next`: malformed chains included).
    pub fn write_desc(
        &self,
        mem: &GuestMemoryMmap,
        index: u16,
        desc: RawDesc,
    ) -> Result<(), GuestMemoryError> {
        let at = self.desc_table + u64::from(index % self.size) * DESC_SIZE;
        let mut bytes = [0u8; DESC_SIZE as usize];
        bytes[0..8].copy_from_slice(&desc.addr.to_le_bytes());
        bytes[8..12].copy_from_slice(&desc.len.to_le_bytes());
        bytes[12..14].copy_from_slice(&desc.flags.to_le_bytes());
        bytes[14..16].copy_from_slice(&desc.next.to_le_bytes());
        mem.write_slice(&bytes, GuestAddress(at))
    }

    /// Puts `head` on the available ring and publishes it (index bumped after the entry is
    /// visible, as a driver does).
    pub fn publish(&mut self, mem: &GuestMemoryMmap, head: u16) -> Result<(), GuestMemoryError> {
        let slot = u64::from(self.avail_idx % self.size);
        mem.write_obj(head, GuestAddress(self.avail_ring + 4 + slot * AVAIL_ENTRY))?;
        fence(Ordering::Release);
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.set_avail_idx(mem, self.avail_idx)
    }

    /// Overwrites the available ring's index (a hostile driver may claim anything).
    pub fn set_avail_idx(&self, mem: &GuestMemoryMmap, idx: u16) -> Result<(), GuestMemoryError> {
        mem.write_obj(idx, GuestAddress(self.avail_ring + 2))
    }

    /// Writes `buffers` as one chain into the next free descriptor slots and publishes it;
    /// returns its head index.
    pub fn add_chain(&mut self, mem: &GuestMemoryMmap, buffers: &[Buffer]) -> Result<u16, GuestMemoryError> {
        let head = self.next_desc;
        for (i, buffer) in buffers.iter().enumerate() {
            let index = self.next_desc;
            self.next_desc = (self.next_desc + 1) % self.size;
            let last = i + 1 == buffers.len();
            let mut flags = if buffer.writable { VRING_DESC_F_WRITE as u16 } else { 0 };
            if !last {
                flags |= VRING_DESC_F_NEXT as u16;
            }
            let next = if last { 0 } else { self.next_desc };
            self.write_desc(mem, index, RawDesc { addr: buffer.addr, len: buffer.len, flags, next })?;
        }
        self.publish(mem, head)?;
        Ok(head)
    }

    /// The next chain the device completed: `(head index, bytes written)`.
    pub fn take_used(&mut self, mem: &GuestMemoryMmap) -> Option<(u16, u32)> {
        let idx: u16 = mem.read_obj(GuestAddress(self.used_ring + 2)).ok()?;
        if idx == self.used_seen {
            return None;
        }
        fence(Ordering::Acquire);
        let slot = u64::from(self.used_seen % self.size);
        let elem = self.used_ring + 4 + slot * USED_ELEM;
        let id: u32 = mem.read_obj(GuestAddress(elem)).ok()?;
        let len: u32 = mem.read_obj(GuestAddress(elem + 4)).ok()?;
        self.used_seen = self.used_seen.wrapping_add(1);
        Some((id as u16, len))
    }

    /// Chains published and not yet completed.
    pub fn in_flight(&self) -> u16 {
        self.avail_idx.wrapping_sub(self.used_seen)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_published_chain_reaches_the_device_and_its_completion_comes_back() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let (mut driver, mut queue) = GuestQueue::new(&mem, 0x1000, 8).unwrap();
        assert!(queue.is_valid(&mem));
        let buffers = [
            Buffer { addr: 0x8000, len: 16, writable: false },
            Buffer { addr: 0x9000, len: 32, writable: true },
        ];
        let head = driver.add_chain(&mem, &buffers).unwrap();
        let chain = queue.pop_descriptor_chain(&mem).unwrap();
        assert_eq!(chain.head_index(), head);
        let seen: Vec<_> = chain.map(|d| (d.addr().0, d.len(), d.is_write_only())).collect();
        assert_eq!(seen, [(0x8000, 16, false), (0x9000, 32, true)]);
        queue.add_used(&mem, head, 32).unwrap();
        assert_eq!(driver.take_used(&mem), Some((head, 32)));
        assert_eq!(driver.take_used(&mem), None);
        assert_eq!(driver.in_flight(), 0);
    }
}
