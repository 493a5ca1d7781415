//! Virtio devices over the MMIO transport (virtio 1.2, "modern", version 2 registers).
//!
//! - [`mmio`]: the transport: registers, feature negotiation, queue setup, status and reset.
//! - [`VirtioDevice`]: what a device model implements; written against `virtio-queue` and guest
//!   memory only, so it is unit-tested with mock queues, without KVM.
//! - [`queue`]: serving a request queue chain by chain, robust to a hostile driver's rings.
//! - [`worker`]: the thread that serves a device's queue notifications (ioeventfds).
//! - [`rng`]: the entropy device.
//! - [`vsock`]: hybrid vsock over a host unix socket.
//! - [`fs`]: virtio-fs, one host directory served in-process.
//! - [`net`]: virtio-net on a tap.
//! - [`inspect`]: each device's rings and counters as the host sees them, for diagnosing stalls.
//!
//! Everything read from guest memory or written by the driver is untrusted: a malformed descriptor
//! chain is completed with zero bytes or dropped, never a panic.

pub mod fs;
pub mod inspect;
pub mod mmio;
pub mod net;
pub mod queue;
pub mod rng;
#[cfg(any(test, feature = "fuzzing"))]
pub mod test_utils;
pub mod vsock;
pub mod worker;

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;

use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

pub use mmio::{MmioTransport, MMIO_WINDOW};

/// `VIRTIO_F_VERSION_1`: every device offers it; the transport refuses drivers that do not accept it.
pub const VIRTIO_F_VERSION_1: u64 = 1 << virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
/// Interrupt status bit: a used buffer was added.
pub const INTERRUPT_USED_BUFFER: u32 = virtio_bindings::virtio_mmio::VIRTIO_MMIO_INT_VRING;

/// Errors activating a device.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    #[error("expected {expected} queues, the driver set up {found}")]
    QueueCount { expected: usize, found: usize },
    #[error("starting the device worker: {0}")]
    Worker(std::io::Error),
}

/// A device's interrupt: the MMIO `InterruptStatus` bits plus the irqfd that raises its line.
#[derive(Debug)]
pub struct Interrupt {
    status: AtomicU32,
    irq: EventFd,
    /// Times the line was raised (diagnostics: compare with the guest's interrupt count).
    raised: AtomicU64,
}

impl Interrupt {
    /// An interrupt raised through `irq` (registered with KVM as an irqfd).
    pub fn new(irq: EventFd) -> Interrupt {
        Interrupt { status: AtomicU32::new(0), irq, raised: AtomicU64::new(0) }
    }

    /// Sets `bits` in the interrupt status and raises the line.
    pub fn trigger(&self, bits: u32) {
        self.status.fetch_or(bits, Ordering::AcqRel);
        self.raised.fetch_add(1, Ordering::Relaxed);
        // A failed eventfd write (counter overflow) still leaves the line pending.
        let _ = self.irq.write(1);
    }

    /// The current interrupt status bits.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::Acquire)
    }

    /// How many times the line was raised.
    pub fn raised(&self) -> u64 {
        self.raised.load(Ordering::Relaxed)
    }

    /// Clears `bits` (the driver's `InterruptACK`).
    pub fn acknowledge(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::AcqRel);
    }
}

/// What a device gets when the driver sets `DRIVER_OK`.
#[derive(Debug)]
pub struct DeviceContext {
    pub mem: GuestMemoryMmap,
    /// Queues as the driver configured them, in index order.
    pub queues: Vec<Queue>,
    /// One eventfd per queue, written (by KVM through an ioeventfd) when the driver notifies it.
    pub queue_events: Vec<EventFd>,
    pub interrupt: Arc<Interrupt>,
    /// Features the driver accepted.
    pub acked_features: u64,
    /// Whether the device's thread installs its seccomp filter ([`crate::seccomp`]).
    pub seccomp: bool,
}

/// A virtio device model behind an [`MmioTransport`].
pub trait VirtioDevice: Send {
    /// Virtio device ID (e.g. 4 for entropy).
    fn device_type(&self) -> u32;
    /// The largest size of each queue; its length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Features offered (including [`VIRTIO_F_VERSION_1`]).
    fn device_features(&self) -> u64;
    /// Reads device configuration space at `offset` (bytes beyond it read as zero).
    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    /// Writes device configuration space (ignored unless the device has writable fields).
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    /// Starts serving the queues.
    fn activate(&mut self, context: DeviceContext) -> Result<(), ActivateError>;
    /// Stops serving and forgets the queues (driver reset or VM teardown).
    fn reset(&mut self);
    /// The device's own counters for a diagnostic report ([`inspect`]), if it keeps any.
    fn debug_state(&self) -> Option<String> {
        None
    }
}
