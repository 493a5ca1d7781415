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
use std::time::{Duration, Instant};

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
    #[error("the device served once and was reset: it is not activated again (its thread has ended)")]
    AlreadyServed,
}

/// How long interrupt status bits may wait unacknowledged before the line is raised again (see
/// [`Interrupt::raise_again_if_unacknowledged`]).
pub const UNACKNOWLEDGED_AFTER: Duration = Duration::from_secs(1);

/// A device's interrupt: the MMIO `InterruptStatus` bits plus the irqfd that raises its line.
///
/// The line is an edge (an ISA pin of the IOAPIC): the driver reads and acknowledges the status
/// only when an edge reaches it. An edge lost on the way (by the interrupt controller, or by the
/// nested emulator the tests run under) would leave bits set that nobody reads: a net device
/// whose guest has used up its RX buffers would wait forever for buffers the driver never learns
/// it may post. So a device's thread raises the line again while bits wait unacknowledged (what
/// a level-triggered line, QEMU's model, does by itself); a repeated edge costs the driver one
/// status read.
#[derive(Debug)]
pub struct Interrupt {
    status: AtomicU32,
    irq: EventFd,
    /// Times the line was raised (diagnostics: compare with the guest's `/proc/interrupts`).
    raised: AtomicU64,
    /// Of those, raised again for bits left unacknowledged.
    raised_again: AtomicU64,
    /// When the line was last raised, in nanoseconds since `epoch`.
    last_raised_ns: AtomicU64,
    epoch: Instant,
    /// [`UNACKNOWLEDGED_AFTER`], shorter in tests.
    recheck_after: Duration,
}

impl Interrupt {
    /// An interrupt raised through `irq` (registered with KVM as an irqfd).
    pub fn new(irq: EventFd) -> Interrupt {
        Interrupt::raised_again_after(irq, UNACKNOWLEDGED_AFTER)
    }

    /// [`Interrupt::new`], raising the line again after `recheck_after` instead.
    fn raised_again_after(irq: EventFd, recheck_after: Duration) -> Interrupt {
        Interrupt {
            status: AtomicU32::new(0),
            irq,
            raised: AtomicU64::new(0),
            raised_again: AtomicU64::new(0),
            last_raised_ns: AtomicU64::new(0),
            epoch: Instant::now(),
            recheck_after,
        }
    }

    /// Sets `bits` in the interrupt status and raises the line.
    pub fn trigger(&self, bits: u32) {
        self.status.fetch_or(bits, Ordering::AcqRel);
        self.raise();
    }

    fn raise(&self) {
        self.raised.fetch_add(1, Ordering::Relaxed);
        self.last_raised_ns.store(self.now_ns(), Ordering::Relaxed);
        // A failed eventfd write (counter overflow) still leaves the line pending.
        let _ = self.irq.write(1);
    }

    fn now_ns(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    /// The current interrupt status bits.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::Acquire)
    }

    /// How many times the line was raised.
    pub fn raised(&self) -> u64 {
        self.raised.load(Ordering::Relaxed)
    }

    /// How many of those were for bits left unacknowledged.
    pub fn raised_again(&self) -> u64 {
        self.raised_again.load(Ordering::Relaxed)
    }

    /// Clears `bits` (the driver's `InterruptACK`).
    pub fn acknowledge(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::AcqRel);
    }

    /// How long a device's thread may wait for its events before it must call
    /// [`Interrupt::raise_again_if_unacknowledged`]: `None` while no bit waits.
    pub fn recheck_in(&self) -> Option<Duration> {
        if self.status() == 0 {
            return None;
        }
        let since = self.now_ns().saturating_sub(self.last_raised_ns.load(Ordering::Relaxed));
        Some(self.recheck_after.saturating_sub(Duration::from_nanos(since)))
    }

    /// Raises the line again if status bits have waited [`UNACKNOWLEDGED_AFTER`] since it was last
    /// raised; true if it did.
    pub fn raise_again_if_unacknowledged(&self) -> bool {
        if self.recheck_in() != Some(Duration::ZERO) {
            return false;
        }
        self.raised_again.fetch_add(1, Ordering::Relaxed);
        crate::guest_log!(
            warn,
            status = self.status(),
            "virtio: an interrupt waited unacknowledged for {:?}; raised it again (an edge lost on its way to the guest?)",
            self.recheck_after
        );
        self.raise();
        true
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
    /// Whether a snapshot may save this device with its transport alone ([`mmio::TransportSnapshot`]):
    /// it keeps no state of its own beyond its queues, and completes what the driver makes
    /// available before the vCPUs stop (nothing in flight).
    fn restorable(&self) -> bool {
        false
    }
    /// The device's own counters for a diagnostic report ([`inspect`]), if it keeps any.
    fn debug_state(&self) -> Option<String> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Raises of the line seen on its eventfd so far (0 when none).
    fn edges(irq: &EventFd) -> u64 {
        irq.read().unwrap_or(0)
    }

    #[test]
    fn an_unacknowledged_interrupt_is_raised_again_once_per_period_and_an_acknowledged_one_never() {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let interrupt = Interrupt::raised_again_after(irq.try_clone().unwrap(), Duration::from_millis(20));
        assert_eq!(interrupt.recheck_in(), None, "nothing waits: no deadline");
        assert!(!interrupt.raise_again_if_unacknowledged());
        interrupt.trigger(INTERRUPT_USED_BUFFER);
        assert_eq!(edges(&irq), 1);
        assert!(interrupt.recheck_in().is_some_and(|left| left <= Duration::from_millis(20)));
        assert!(!interrupt.raise_again_if_unacknowledged(), "not before the period is over");
        let deadline = Instant::now() + Duration::from_secs(5);
        while interrupt.recheck_in() != Some(Duration::ZERO) {
            assert!(Instant::now() < deadline, "the period never ended");
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(interrupt.raise_again_if_unacknowledged());
        assert_eq!((edges(&irq), interrupt.raised(), interrupt.raised_again()), (1, 2, 1));
        assert!(!interrupt.raise_again_if_unacknowledged(), "the period starts again");
        interrupt.acknowledge(INTERRUPT_USED_BUFFER);
        assert_eq!(interrupt.recheck_in(), None);
        assert!(!interrupt.raise_again_if_unacknowledged());
        assert_eq!(edges(&irq), 0);
    }
}
