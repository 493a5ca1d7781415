//! virtio-rng (device ID 4): fills the guest's buffers with bytes from the host's `/dev/urandom`,
//! so the guest kernel's CRNG is seeded at boot and `getrandom` never stalls.

use std::fs::File;
use std::io::{Read, Write};

use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;

use super::queue::RequestQueue;
use super::worker::{QueueHandler, Served, Worker};
use super::{ActivateError, DeviceContext, Interrupt, VirtioDevice, VIRTIO_F_VERSION_1};
use crate::seccomp::ThreadRole;
use crate::threads::DeviceThread;
use std::sync::Arc;

const VIRTIO_ID_RNG: u32 = virtio_bindings::virtio_ids::VIRTIO_ID_RNG;
const QUEUE_SIZES: &[u16] = &[256];
/// Most bytes served per request: bounds the work one guest buffer can cause.
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;

/// The entropy device.
#[derive(Debug)]
pub struct Rng {
    /// Made with the VM; serves the device once activated.
    thread: Option<DeviceThread>,
    worker: Option<Worker>,
}

impl Rng {
    /// An entropy device whose queue `thread` will serve.
    pub fn new(thread: DeviceThread) -> Rng {
        Rng { thread: Some(thread), worker: None }
    }
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_RNG
    }

    fn queue_max_sizes(&self) -> &[u16] {
        QUEUE_SIZES
    }

    fn device_features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }

    fn activate(&mut self, context: DeviceContext) -> Result<(), ActivateError> {
        let DeviceContext { mem, queues, queue_events, interrupt, seccomp, .. } = context;
        let [queue]: [Queue; 1] = queues
            .try_into()
            .map_err(|q: Vec<Queue>| ActivateError::QueueCount { expected: 1, found: q.len() })?;
        let queue = RequestQueue::new("virtio-rng", queue);
        let thread = self.thread.take().ok_or(ActivateError::AlreadyServed)?;
        let worker = Worker::start(thread, seccomp.then_some(ThreadRole::Rng), move || {
            let source = File::open("/dev/urandom")?;
            let handler = RngQueue { mem, queue, interrupt, source, buffer: Vec::new() };
            Ok(Served { handler, queue_events, sources: Vec::new() })
        });
        self.worker = Some(worker.map_err(ActivateError::Worker)?);
        Ok(())
    }

    fn reset(&mut self) {
        self.worker = None;
    }

    /// Each request is served as soon as the driver makes it available.
    fn restorable(&self) -> bool {
        true
    }
}

/// The request queue and what serving it needs (lives on the worker thread).
#[derive(Debug)]
pub struct RngQueue {
    mem: GuestMemoryMmap,
    queue: RequestQueue,
    interrupt: Arc<Interrupt>,
    source: File,
    buffer: Vec<u8>,
}

impl RngQueue {
    /// Serves every available request; returns how many were completed.
    pub fn process(&mut self) -> usize {
        let RngQueue { mem, queue, interrupt, source, buffer } = self;
        queue.serve(mem, interrupt, |chain| fill(mem, source, buffer, chain))
    }
}

/// Writes random bytes from `source` into the chain's writable buffers; returns the count (0 for a
/// malformed chain, which is completed empty rather than left pending).
fn fill(
    mem: &GuestMemoryMmap,
    source: &mut File,
    buffer: &mut Vec<u8>,
    chain: virtio_queue::DescriptorChain<&GuestMemoryMmap>,
) -> u32 {
    let Ok(mut writer) = chain.writer(mem) else { return 0 };
    let wanted = writer.available_bytes().min(MAX_REQUEST_BYTES);
    buffer.resize(wanted, 0);
    if source.read_exact(buffer).is_err() || writer.write_all(buffer).is_err() {
        return 0;
    }
    wanted as u32
}

impl QueueHandler for RngQueue {
    fn process_queue(&mut self, _index: usize) {
        self.process();
    }

    fn interrupt(&self) -> Option<&Interrupt> {
        Some(&self.interrupt)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::INTERRUPT_USED_BUFFER;
    use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::{split::Descriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::QueueT;
    use vm_memory::{Bytes, GuestAddress};
    use vmm_sys_util::eventfd::EventFd;

    fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
    }

    fn rng_queue(mem: &GuestMemoryMmap, descs: &[RawDescriptor]) -> (RngQueue, EventFd) {
        let mock = MockSplitQueue::new(mem, 16);
        mock.add_desc_chains(descs, 0).unwrap();
        let queue: Queue = mock.create_queue().unwrap();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let interrupt = Arc::new(Interrupt::new(irq.try_clone().unwrap()));
        let source = File::open("/dev/urandom").unwrap();
        (
            RngQueue {
                mem: mem.clone(),
                queue: RequestQueue::new("test", queue),
                interrupt,
                source,
                buffer: Vec::new(),
            },
            irq,
        )
    }

    fn used_len(rng: &RngQueue, slot: u64) -> u32 {
        // used ring: flags(2) idx(2) then elements of (id u32, len u32)
        rng.mem.read_obj(GuestAddress(rng.queue.queue().used_ring() + 4 + slot * 8 + 4)).unwrap()
    }

    #[test]
    fn writable_buffers_are_filled_and_completed_with_their_length() {
        let mem = memory();
        let descs = [
            RawDescriptor::from(Descriptor::new(
                0x8000,
                64,
                (VRING_DESC_F_WRITE | VRING_DESC_F_NEXT) as u16,
                1,
            )),
            RawDescriptor::from(Descriptor::new(0x9000, 32, VRING_DESC_F_WRITE as u16, 0)),
        ];
        let (mut rng, irq) = rng_queue(&mem, &descs);
        assert_eq!(rng.process(), 1);
        assert_eq!(used_len(&rng, 0), 96);
        let mut bytes = [0u8; 64];
        mem.read_slice(&mut bytes, GuestAddress(0x8000)).unwrap();
        assert!(bytes.iter().any(|b| *b != 0), "random bytes were written");
        assert_eq!(irq.read().unwrap(), 1, "the driver is interrupted");
        assert_eq!(rng.interrupt.status() & INTERRUPT_USED_BUFFER, INTERRUPT_USED_BUFFER);
    }

    #[test]
    fn a_chain_pointing_outside_guest_memory_is_completed_empty() {
        let mem = memory();
        let descs = [RawDescriptor::from(Descriptor::new(0xffff_0000, 4096, VRING_DESC_F_WRITE as u16, 0))];
        let (mut rng, _irq) = rng_queue(&mem, &descs);
        assert_eq!(rng.process(), 1);
        assert_eq!(used_len(&rng, 0), 0);
    }

    #[test]
    fn a_corrupt_avail_index_stops_the_queue_instead_of_spinning() {
        let mem = memory();
        let descs = [RawDescriptor::from(Descriptor::new(0x8000, 16, VRING_DESC_F_WRITE as u16, 0))];
        let (mut rng, _irq) = rng_queue(&mem, &descs);
        // The driver claims 1000 new buffers in a 16-entry queue.
        let avail_idx = GuestAddress(rng.queue.queue().avail_ring() + 2);
        mem.write_obj(1000u16, avail_idx).unwrap();
        assert_eq!(rng.process(), 0);
        assert!(rng.queue.is_broken());
        assert_eq!(rng.process(), 0, "ignored until reset");
    }

    #[test]
    fn read_only_buffers_get_nothing_and_huge_requests_are_capped() {
        let mem = memory();
        let descs = [
            RawDescriptor::from(Descriptor::new(0x8000, 64, 0, 0)),
            RawDescriptor::from(Descriptor::new(0x1_0000, 0x8_0000, VRING_DESC_F_WRITE as u16, 0)),
        ];
        let (mut rng, _irq) = rng_queue(&mem, &descs);
        assert_eq!(rng.process(), 2);
        assert_eq!(used_len(&rng, 0), 0);
        assert_eq!(used_len(&rng, 1), MAX_REQUEST_BYTES as u32);
    }
}
