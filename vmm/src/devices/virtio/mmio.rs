//! The virtio-mmio transport, register layout version 2 (virtio 1.2, section 4.2.2).
//!
//! The driver drives it through 32-bit register accesses; every value is untrusted: unknown
//! registers read as zero, out-of-order or out-of-range writes are ignored, a device is activated
//! only with valid queues and the features it offered, and a status of 0 resets it.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::inspect::{DeviceState, QueueState, Rings};
use super::{DeviceContext, Interrupt, VirtioDevice, VIRTIO_F_VERSION_1};

/// Interrupt status bit: the configuration (here: the device status) changed.
const INTERRUPT_CONFIG_CHANGE: u32 = virtio_bindings::virtio_mmio::VIRTIO_MMIO_INT_CONFIG;
use crate::devices::BusDevice;

/// Size of one device's MMIO window (registers at 0x000, configuration space from 0x100).
pub const MMIO_WINDOW: u64 = 0x1000;
/// Offset of `QueueNotify`, where KVM's ioeventfds listen.
pub const QUEUE_NOTIFY_OFFSET: u64 = 0x50;

const MAGIC_VALUE: u32 = 0x7472_6976; // "virt"
const MMIO_VERSION: u32 = 2;
const VENDOR_ID: u32 = 0x4b53_5548; // "HUSK"
const CONFIG_SPACE_OFFSET: u64 = 0x100;

const STATUS_ACKNOWLEDGE: u32 = 1;
const STATUS_DRIVER: u32 = 2;
const STATUS_DRIVER_OK: u32 = 4;
const STATUS_FEATURES_OK: u32 = 8;
const STATUS_DEVICE_NEEDS_RESET: u32 = 0x40;

/// Register offsets.
mod reg {
    pub const MAGIC: u64 = 0x000;
    pub const VERSION: u64 = 0x004;
    pub const DEVICE_ID: u64 = 0x008;
    pub const VENDOR_ID: u64 = 0x00c;
    pub const DEVICE_FEATURES: u64 = 0x010;
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    pub const DRIVER_FEATURES: u64 = 0x020;
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    pub const QUEUE_SEL: u64 = 0x030;
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    pub const QUEUE_NUM: u64 = 0x038;
    pub const QUEUE_READY: u64 = 0x044;
    pub const QUEUE_NOTIFY: u64 = 0x050;
    pub const INTERRUPT_STATUS: u64 = 0x060;
    pub const INTERRUPT_ACK: u64 = 0x064;
    pub const STATUS: u64 = 0x070;
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    pub const QUEUE_DRIVER_LOW: u64 = 0x090;
    pub const QUEUE_DRIVER_HIGH: u64 = 0x094;
    pub const QUEUE_DEVICE_LOW: u64 = 0x0a0;
    pub const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
    pub const CONFIG_GENERATION: u64 = 0x0fc;
}

/// `VIRTIO_RING_F_EVENT_IDX`.
const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;

/// A transport as a snapshot keeps it: the driver's registers and, once the device is active, where
/// each queue's rings are and how far the device has gone in them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransportSnapshot {
    pub device_type: u32,
    pub status: u32,
    pub acked_features: u64,
    pub device_features_sel: u32,
    pub driver_features_sel: u32,
    pub queue_sel: u32,
    pub activated: bool,
    pub interrupt_status: u32,
    /// Empty unless activated.
    pub queues: Vec<QueueSnapshot>,
}

/// One active queue in a snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueSnapshot {
    pub size: u16,
    pub ready: bool,
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
    /// The next chain the device takes and the next used entry it writes: the same for a device
    /// at rest ([`super::VirtioDevice::restorable`]), `used.idx` in guest memory.
    pub next: u16,
}

/// Why a transport cannot be saved or restored.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TransportSnapshotError {
    #[error("virtio device {device_type}: its state cannot be saved yet")]
    NotRestorable { device_type: u32 },
    #[error("virtio device {device_type}: the driver is setting it up (status {status:#x})")]
    Negotiating { device_type: u32, status: u32 },
    #[error("virtio device {device_type}: {what}")]
    Mismatch { device_type: u32, what: &'static str },
}

/// One virtio device behind its MMIO registers.
pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    mem: GuestMemoryMmap,
    interrupt: Arc<Interrupt>,
    queues: Vec<Queue>,
    /// For `QueueNotify` writes that reach the transport (KVM's ioeventfds normally take them).
    queue_events: Vec<EventFd>,
    /// The device's copies, handed over at its (one) activation: made here, with the VM, so the
    /// vCPU that activates the device duplicates no descriptor.
    device_queue_events: Option<Vec<EventFd>>,
    device_features_sel: u32,
    driver_features_sel: u32,
    acked_features: u64,
    queue_sel: u32,
    status: u32,
    activated: bool,
    /// `QueueReady` of each queue as handed to the device (the register reads back what was written).
    active_ready: Vec<bool>,
    /// Where each queue's rings are, as handed to the device (for [`MmioTransport::state`]).
    active_rings: Vec<Rings>,
    /// Passed to the device: whether its thread filters its syscalls.
    seccomp: bool,
}

impl std::fmt::Debug for MmioTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MmioTransport")
            .field("device_type", &self.device.device_type())
            .field("status", &self.status)
            .field("activated", &self.activated)
            .finish()
    }
}

impl MmioTransport {
    /// Wraps `device`; `queue_events` (one per queue, registered by the caller as ioeventfds on
    /// `QueueNotify`) and `interrupt` are handed to the device when the driver activates it.
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: GuestMemoryMmap,
        interrupt: Arc<Interrupt>,
        queue_events: Vec<EventFd>,
    ) -> std::io::Result<MmioTransport> {
        let queues = fresh_queues(device.as_ref());
        let device_queue_events = queue_events.iter().map(EventFd::try_clone).collect::<Result<_, _>>()?;
        Ok(MmioTransport {
            device,
            mem,
            interrupt,
            queues,
            queue_events,
            device_queue_events: Some(device_queue_events),
            device_features_sel: 0,
            driver_features_sel: 0,
            acked_features: 0,
            queue_sel: 0,
            status: 0,
            activated: false,
            active_ready: Vec::new(),
            active_rings: Vec::new(),
            seccomp: false,
        })
    }

    /// The transport, its device's thread running under the device's seccomp filter.
    pub fn with_seccomp(mut self, seccomp: bool) -> MmioTransport {
        self.seccomp = seccomp;
        self
    }

    /// The transport's registers, each active queue's rings and the device's counters.
    pub fn state(&self) -> DeviceState {
        DeviceState {
            device_type: self.device.device_type(),
            status: self.status,
            activated: self.activated,
            interrupt_status: self.interrupt.status(),
            interrupts_raised: self.interrupt.raised(),
            interrupts_raised_again: self.interrupt.raised_again(),
            queues: self.active_rings.iter().map(|rings| QueueState::read(&self.mem, rings)).collect(),
            device: self.device.debug_state(),
        }
    }

    /// The transport's registers and queue positions, for a snapshot taken with the vCPUs
    /// stopped. A device that keeps more than its queues, or one the driver is still setting up,
    /// is refused.
    pub fn snapshot(&self) -> Result<TransportSnapshot, TransportSnapshotError> {
        let device_type = self.device.device_type();
        if !self.device.restorable() {
            return Err(TransportSnapshotError::NotRestorable { device_type });
        }
        if self.status != 0 && !self.activated {
            return Err(TransportSnapshotError::Negotiating { device_type, status: self.status });
        }
        let mut queues = Vec::with_capacity(self.active_rings.len());
        for rings in &self.active_rings {
            let used_idx = QueueState::read(&self.mem, rings).used_idx;
            let next = used_idx
                .ok_or(TransportSnapshotError::Mismatch { device_type, what: "used ring unreadable" })?;
            queues.push(QueueSnapshot {
                size: rings.size,
                ready: rings.ready,
                desc_table: rings.desc,
                avail_ring: rings.avail,
                used_ring: rings.used,
                next,
            });
        }
        Ok(TransportSnapshot {
            device_type,
            status: self.status,
            acked_features: self.acked_features,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            queue_sel: self.queue_sel,
            activated: self.activated,
            interrupt_status: self.interrupt.status(),
            queues,
        })
    }

    /// Puts a new transport (of a restored VM, its device made as the snapshot's was) in the
    /// state of `snapshot`: an active device is activated over the saved queues, told to look at
    /// every queue once (what the driver made available while it was saved), and a pending
    /// interrupt is raised again. Guest memory is the snapshot's, so the rings are where they were.
    pub fn restore(&mut self, snapshot: &TransportSnapshot) -> Result<(), TransportSnapshotError> {
        let device_type = self.device.device_type();
        let mismatch = |what| TransportSnapshotError::Mismatch { device_type, what };
        if snapshot.device_type != device_type {
            return Err(mismatch("another device type in the snapshot"));
        }
        if self.activated || self.status != 0 {
            return Err(mismatch("the transport is in use"));
        }
        self.device_features_sel = snapshot.device_features_sel;
        self.driver_features_sel = snapshot.driver_features_sel;
        self.queue_sel = snapshot.queue_sel;
        self.acked_features = snapshot.acked_features;
        if snapshot.activated {
            if snapshot.queues.len() != self.queues.len() || !self.features_acceptable() {
                return Err(mismatch("queues or features do not match the device"));
            }
            let event_idx = self.acked_features & VIRTIO_RING_F_EVENT_IDX != 0;
            for (queue, saved) in self.queues.iter_mut().zip(&snapshot.queues) {
                let state = virtio_queue::QueueState {
                    max_size: queue.max_size(),
                    next_avail: saved.next,
                    next_used: saved.next,
                    event_idx_enabled: event_idx,
                    size: saved.size,
                    ready: saved.ready,
                    desc_table: saved.desc_table,
                    avail_ring: saved.avail_ring,
                    used_ring: saved.used_ring,
                };
                *queue = Queue::try_from(state).map_err(|_| mismatch("a saved queue is invalid"))?;
            }
            if !self.activate() {
                return Err(mismatch("activation over the saved queues failed"));
            }
            for event in &self.queue_events {
                let _ = event.write(1);
            }
        }
        self.status = snapshot.status;
        if snapshot.interrupt_status != 0 {
            self.interrupt.trigger(snapshot.interrupt_status);
        }
        Ok(())
    }

    /// Number of queues the device has.
    pub fn queue_count(&self) -> usize {
        self.queues.len()
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        // Queues are configured between FEATURES_OK and DRIVER_OK only.
        let configurable = self.status & STATUS_FEATURES_OK != 0 && !self.activated;
        self.queues.get_mut(self.queue_sel as usize).filter(|_| configurable)
    }

    fn read_register(&self, offset: u64) -> u32 {
        let word = |features: u64, sel: u32| match sel {
            0 => features as u32,
            1 => (features >> 32) as u32,
            _ => 0,
        };
        match offset {
            reg::MAGIC => MAGIC_VALUE,
            reg::VERSION => MMIO_VERSION,
            reg::DEVICE_ID => self.device.device_type(),
            reg::VENDOR_ID => VENDOR_ID,
            reg::DEVICE_FEATURES => word(self.device.device_features(), self.device_features_sel),
            reg::QUEUE_NUM_MAX => self.queues.get(self.queue_sel as usize).map_or(0, |q| q.max_size().into()),
            reg::QUEUE_READY if self.activated => {
                self.active_ready.get(self.queue_sel as usize).copied().unwrap_or(false).into()
            }
            reg::QUEUE_READY => self.queues.get(self.queue_sel as usize).is_some_and(|q| q.ready()).into(),
            reg::INTERRUPT_STATUS => self.interrupt.status(),
            reg::STATUS => self.status,
            reg::CONFIG_GENERATION => 0,
            _ => 0,
        }
    }

    fn write_register(&mut self, offset: u64, value: u32) {
        match offset {
            reg::DEVICE_FEATURES_SEL => self.device_features_sel = value,
            reg::DRIVER_FEATURES_SEL => self.driver_features_sel = value,
            reg::DRIVER_FEATURES if self.status & STATUS_FEATURES_OK == 0 => {
                let shift = match self.driver_features_sel {
                    0 => 0,
                    1 => 32,
                    _ => return,
                };
                let mask = 0xffff_ffffu64 << shift;
                self.acked_features = (self.acked_features & !mask) | ((value as u64) << shift);
            }
            reg::QUEUE_SEL => self.queue_sel = value,
            reg::QUEUE_NUM => {
                // try_set_size refuses sizes that are zero, not a power of two or above the maximum.
                if let (Some(queue), Ok(size)) = (self.selected_queue(), u16::try_from(value)) {
                    let _ = queue.try_set_size(size);
                }
            }
            reg::QUEUE_READY => {
                if let Some(queue) = self.selected_queue() {
                    queue.set_ready(value == 1);
                }
            }
            reg::QUEUE_DESC_LOW => self.with_queue(|q| q.set_desc_table_address(Some(value), None)),
            reg::QUEUE_DESC_HIGH => self.with_queue(|q| q.set_desc_table_address(None, Some(value))),
            reg::QUEUE_DRIVER_LOW => self.with_queue(|q| q.set_avail_ring_address(Some(value), None)),
            reg::QUEUE_DRIVER_HIGH => self.with_queue(|q| q.set_avail_ring_address(None, Some(value))),
            reg::QUEUE_DEVICE_LOW => self.with_queue(|q| q.set_used_ring_address(Some(value), None)),
            reg::QUEUE_DEVICE_HIGH => self.with_queue(|q| q.set_used_ring_address(None, Some(value))),
            reg::QUEUE_NOTIFY => {
                // Normally KVM's ioeventfd takes this write; without it, forward it ourselves.
                if let Some(event) = self.queue_events.get(value as usize).filter(|_| self.activated) {
                    let _ = event.write(1);
                }
            }
            reg::INTERRUPT_ACK => self.interrupt.acknowledge(value),
            reg::STATUS => self.write_status(value),
            _ => {}
        }
    }

    fn with_queue(&mut self, set: impl FnOnce(&mut Queue)) {
        if let Some(queue) = self.selected_queue() {
            set(queue);
        }
    }

    /// Device status transitions (virtio 1.2, 3.1.1): 0 resets; otherwise bits are only added.
    fn write_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        if value & self.status != self.status {
            return; // clearing bits other than by a reset is not allowed
        }
        let added = value & !self.status;
        if added & STATUS_FEATURES_OK != 0 && !self.features_acceptable() {
            self.status = value & !STATUS_FEATURES_OK; // the driver reads it back and gives up
            return;
        }
        if added & STATUS_DRIVER_OK != 0 && !self.activated {
            let needed = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK;
            if value & needed != needed || !self.activate() {
                // Only the driver sets FAILED; the device says it needs a reset and tells the driver.
                self.status = value & !STATUS_DRIVER_OK | STATUS_DEVICE_NEEDS_RESET;
                self.interrupt.trigger(INTERRUPT_CONFIG_CHANGE);
                return;
            }
        }
        self.status = value;
    }

    /// The driver may accept only offered features, and must accept VERSION_1.
    fn features_acceptable(&self) -> bool {
        self.acked_features & !self.device.device_features() == 0
            && self.acked_features & VIRTIO_F_VERSION_1 != 0
    }

    fn activate(&mut self) -> bool {
        if !self.queues.iter().all(|q| q.is_valid(&self.mem)) {
            crate::guest_log!(
                warn,
                device = self.device.device_type(),
                "virtio-mmio: driver set up invalid queues"
            );
            return false;
        }
        // A second activation (after a reset) finds none: real devices refuse it anyway.
        let queue_events = self.device_queue_events.take().unwrap_or_default();
        self.active_ready = self.queues.iter().map(|q| q.ready()).collect();
        self.active_rings = self.queues.iter().map(Rings::of).collect();
        let queues = std::mem::replace(&mut self.queues, fresh_queues(self.device.as_ref()));
        let context = DeviceContext {
            mem: self.mem.clone(),
            queues,
            queue_events,
            interrupt: self.interrupt.clone(),
            acked_features: self.acked_features,
            seccomp: self.seccomp,
        };
        match self.device.activate(context) {
            Ok(()) => {
                self.activated = true;
                true
            }
            Err(err) => {
                crate::guest_log!(error, %err, device = self.device.device_type(), "virtio-mmio: activation failed");
                self.active_rings.clear();
                false
            }
        }
    }

    fn reset(&mut self) {
        self.device.reset();
        self.queues = fresh_queues(self.device.as_ref());
        self.status = 0;
        self.acked_features = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.queue_sel = 0;
        self.activated = false;
        self.active_ready.clear();
        self.active_rings.clear();
        self.interrupt.acknowledge(u32::MAX);
    }
}

fn fresh_queues(device: &dyn VirtioDevice) -> Vec<Queue> {
    // Queue::new only fails for a max size that is zero or not a power of two: a device bug,
    // filtered out here rather than offered to the driver.
    device.queue_max_sizes().iter().filter_map(|&size| Queue::new(size).ok()).collect()
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_SPACE_OFFSET {
            self.device.read_config(offset - CONFIG_SPACE_OFFSET, data);
        } else if let Ok(bytes) = <&mut [u8; 4]>::try_from(&mut *data) {
            *bytes = self.read_register(offset).to_le_bytes();
        } else {
            data.fill(0); // registers are 32 bits wide
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_SPACE_OFFSET {
            self.device.write_config(offset - CONFIG_SPACE_OFFSET, data);
        } else if let Ok(bytes) = <[u8; 4]>::try_from(data) {
            self.write_register(offset, u32::from_le_bytes(bytes));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use vm_memory::{Bytes, GuestAddress};

    #[derive(Debug, Default)]
    struct Calls {
        activated: Vec<(usize, u64, u16)>, // queues, acked features, first queue size
        resets: usize,
        restorable: bool,
        /// The first queue's next available and used entries at each activation.
        positions: Vec<(u16, u16)>,
    }

    struct MockDevice(Arc<Mutex<Calls>>);

    const MOCK_FEATURE: u64 = 1 << 3;

    impl VirtioDevice for MockDevice {
        fn device_type(&self) -> u32 {
            42
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[64]
        }
        fn device_features(&self) -> u64 {
            VIRTIO_F_VERSION_1 | MOCK_FEATURE
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8 + 1);
        }
        fn activate(&mut self, context: DeviceContext) -> Result<(), super::super::ActivateError> {
            let size = context.queues[0].size();
            let mut calls = self.0.lock().unwrap();
            calls.activated.push((context.queues.len(), context.acked_features, size));
            calls.positions.push((context.queues[0].next_avail(), context.queues[0].next_used()));
            Ok(())
        }
        fn restorable(&self) -> bool {
            self.0.lock().unwrap().restorable
        }
        fn reset(&mut self) {
            self.0.lock().unwrap().resets += 1;
        }
    }

    fn transport() -> (MmioTransport, Arc<Mutex<Calls>>, EventFd) {
        let calls = Arc::new(Mutex::new(Calls::default()));
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let notify = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let interrupt = Arc::new(Interrupt::new(irq));
        let t = MmioTransport::new(
            Box::new(MockDevice(calls.clone())),
            mem,
            interrupt,
            vec![notify.try_clone().unwrap()],
        )
        .unwrap();
        (t, calls, notify)
    }

    fn w(t: &mut MmioTransport, offset: u64, value: u32) {
        t.write(offset, &value.to_le_bytes());
    }

    fn r(t: &mut MmioTransport, offset: u64) -> u32 {
        let mut bytes = [0u8; 4];
        t.read(offset, &mut bytes);
        u32::from_le_bytes(bytes)
    }

    /// ACKNOWLEDGE, DRIVER, the driver's features, FEATURES_OK; returns the status read back.
    fn negotiate(t: &mut MmioTransport, features: u64) -> u32 {
        w(t, reg::STATUS, STATUS_ACKNOWLEDGE);
        w(t, reg::STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        for sel in 0..2 {
            w(t, reg::DRIVER_FEATURES_SEL, sel);
            w(t, reg::DRIVER_FEATURES, (features >> (32 * sel)) as u32);
        }
        w(t, reg::STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK);
        r(t, reg::STATUS)
    }

    fn setup_queue(t: &mut MmioTransport, desc: u64) {
        w(t, reg::QUEUE_SEL, 0);
        w(t, reg::QUEUE_NUM, 16);
        w(t, reg::QUEUE_DESC_LOW, desc as u32);
        w(t, reg::QUEUE_DESC_HIGH, (desc >> 32) as u32);
        w(t, reg::QUEUE_DRIVER_LOW, 0x2000);
        w(t, reg::QUEUE_DEVICE_LOW, 0x3000);
        w(t, reg::QUEUE_READY, 1);
    }

    const ALL_OK: u32 = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK;

    #[test]
    fn an_active_transport_restores_over_its_saved_queues_and_looks_at_them_once() {
        let (mut t, calls, _) = transport();
        calls.lock().unwrap().restorable = true;
        let features = VIRTIO_F_VERSION_1 | MOCK_FEATURE;
        negotiate(&mut t, features);
        setup_queue(&mut t, 0x1000);
        w(&mut t, reg::STATUS, ALL_OK);
        // The device has completed 5 chains (used.idx in guest memory).
        t.mem.write_obj(5u16.to_le(), GuestAddress(0x3002)).unwrap();
        let saved = t.snapshot().unwrap();
        let expected = QueueSnapshot {
            size: 16,
            ready: true,
            desc_table: 0x1000,
            avail_ring: 0x2000,
            used_ring: 0x3000,
            next: 5,
        };
        assert_eq!((saved.status, saved.activated, saved.queues.as_slice()), (ALL_OK, true, &[expected][..]));
        let saved: TransportSnapshot = serde_json::from_str(&serde_json::to_string(&saved).unwrap()).unwrap();

        let (mut restored, restored_calls, notify) = transport();
        restored.restore(&saved).unwrap();
        assert_eq!(r(&mut restored, reg::STATUS), ALL_OK);
        assert_eq!(r(&mut restored, reg::QUEUE_READY), 1);
        let calls = restored_calls.lock().unwrap();
        assert_eq!(calls.activated, vec![(1, features, 16)]);
        assert_eq!(calls.positions, vec![(5, 5)], "the device goes on where it was");
        assert_eq!(notify.read().unwrap(), 1, "and looks at its queue once");
    }

    #[test]
    fn devices_with_state_of_their_own_or_being_set_up_are_not_saved_and_mismatches_not_restored() {
        let (mut t, calls, _) = transport();
        assert_eq!(t.snapshot(), Err(TransportSnapshotError::NotRestorable { device_type: 42 }));
        calls.lock().unwrap().restorable = true;
        let untouched = t.snapshot().unwrap();
        assert!(!untouched.activated && untouched.queues.is_empty());
        negotiate(&mut t, VIRTIO_F_VERSION_1);
        assert!(matches!(t.snapshot(), Err(TransportSnapshotError::Negotiating { device_type: 42, .. })));

        let (mut other, _, _) = transport();
        let err = other.restore(&TransportSnapshot { device_type: 7, ..untouched.clone() }).unwrap_err();
        assert!(err.to_string().contains("another device type"), "{err}");
        let broken = TransportSnapshot {
            activated: true,
            status: ALL_OK,
            acked_features: VIRTIO_F_VERSION_1,
            ..untouched
        };
        let err = other.restore(&broken).unwrap_err();
        assert!(err.to_string().contains("queues or features"), "{err}");
    }

    #[test]
    fn identity_registers_describe_a_version_2_device() {
        let (mut t, _, _) = transport();
        assert_eq!(r(&mut t, reg::MAGIC), MAGIC_VALUE);
        assert_eq!(r(&mut t, reg::VERSION), 2);
        assert_eq!(r(&mut t, reg::DEVICE_ID), 42);
        assert_eq!(r(&mut t, reg::QUEUE_NUM_MAX), 64);
        w(&mut t, reg::DEVICE_FEATURES_SEL, 1);
        assert_eq!(r(&mut t, reg::DEVICE_FEATURES), (VIRTIO_F_VERSION_1 >> 32) as u32);
        w(&mut t, reg::DEVICE_FEATURES_SEL, 0);
        assert_eq!(r(&mut t, reg::DEVICE_FEATURES), MOCK_FEATURE as u32);
        let mut config = [0u8; 2];
        t.read(CONFIG_SPACE_OFFSET + 4, &mut config);
        assert_eq!(config, [5, 5], "config space reaches the device");
    }

    #[test]
    fn the_full_init_sequence_activates_the_device_with_the_drivers_queue() {
        let (mut t, calls, notify) = transport();
        assert_ne!(negotiate(&mut t, VIRTIO_F_VERSION_1 | MOCK_FEATURE) & STATUS_FEATURES_OK, 0);
        setup_queue(&mut t, 0x1000);
        w(&mut t, reg::STATUS, ALL_OK);
        assert_eq!(r(&mut t, reg::STATUS), ALL_OK);
        assert_eq!(calls.lock().unwrap().activated, vec![(1, VIRTIO_F_VERSION_1 | MOCK_FEATURE, 16)]);
        assert_eq!(r(&mut t, reg::QUEUE_READY), 1, "reads back what the driver wrote");
        // Without an ioeventfd, a QueueNotify write is forwarded to the queue's eventfd.
        w(&mut t, reg::QUEUE_NOTIFY, 0);
        assert_eq!(notify.read().unwrap(), 1);
        w(&mut t, reg::QUEUE_NOTIFY, 7); // no such queue: ignored
        assert!(notify.read().is_err());
    }

    #[test]
    fn drivers_without_version_1_or_with_unoffered_features_are_refused() {
        let (mut t, _, _) = transport();
        assert_eq!(negotiate(&mut t, MOCK_FEATURE) & STATUS_FEATURES_OK, 0, "legacy drivers are refused");
        let (mut t, _, _) = transport();
        assert_eq!(negotiate(&mut t, VIRTIO_F_VERSION_1 | 1 << 40) & STATUS_FEATURES_OK, 0);
    }

    #[test]
    fn invalid_queues_fail_activation_instead_of_reaching_the_device() {
        let (mut t, calls, _) = transport();
        negotiate(&mut t, VIRTIO_F_VERSION_1);
        setup_queue(&mut t, 0xdead_0000_0000); // descriptor table outside guest memory
        w(&mut t, reg::STATUS, ALL_OK);
        let status = r(&mut t, reg::STATUS);
        assert_eq!(status & (STATUS_DEVICE_NEEDS_RESET | STATUS_DRIVER_OK), STATUS_DEVICE_NEEDS_RESET);
        assert_ne!(r(&mut t, reg::INTERRUPT_STATUS) & INTERRUPT_CONFIG_CHANGE, 0, "the driver is told");
        assert!(calls.lock().unwrap().activated.is_empty());
    }

    #[test]
    fn queue_writes_outside_the_configuration_window_are_ignored() {
        let (mut t, calls, _) = transport();
        // Before FEATURES_OK: ignored.
        w(&mut t, reg::QUEUE_READY, 1);
        assert_eq!(r(&mut t, reg::QUEUE_READY), 0);
        negotiate(&mut t, VIRTIO_F_VERSION_1);
        w(&mut t, reg::QUEUE_NUM, 3); // not a power of two: refused, stays at the maximum
        w(&mut t, reg::QUEUE_NUM, 0x1_0010); // above 16 bits: refused, not truncated to 16
        setup_queue(&mut t, 0x1000);
        w(&mut t, reg::STATUS, ALL_OK);
        // After DRIVER_OK: ignored; the device keeps what it was given.
        w(&mut t, reg::QUEUE_NUM, 32);
        assert_eq!(calls.lock().unwrap().activated[0].2, 16);
        w(&mut t, reg::QUEUE_SEL, 99);
        assert_eq!(r(&mut t, reg::QUEUE_NUM_MAX), 0, "no such queue");
    }

    #[test]
    fn status_zero_resets_and_clearing_bits_otherwise_is_refused() {
        let (mut t, calls, _) = transport();
        negotiate(&mut t, VIRTIO_F_VERSION_1);
        setup_queue(&mut t, 0x1000);
        w(&mut t, reg::STATUS, ALL_OK);
        w(&mut t, reg::STATUS, STATUS_ACKNOWLEDGE);
        assert_eq!(r(&mut t, reg::STATUS), ALL_OK, "bits are only cleared by a reset");
        w(&mut t, reg::STATUS, 0);
        assert_eq!(r(&mut t, reg::STATUS), 0);
        assert_eq!(calls.lock().unwrap().resets, 1);
        assert_eq!(r(&mut t, reg::QUEUE_READY), 0);
        // And the device can be brought up again.
        negotiate(&mut t, VIRTIO_F_VERSION_1);
        setup_queue(&mut t, 0x1000);
        w(&mut t, reg::STATUS, ALL_OK);
        assert_eq!(calls.lock().unwrap().activated.len(), 2);
    }

    #[test]
    fn interrupt_status_is_read_and_acknowledged_by_the_driver() {
        let (mut t, _, _) = transport();
        t.interrupt.trigger(super::super::INTERRUPT_USED_BUFFER);
        assert_eq!(r(&mut t, reg::INTERRUPT_STATUS), 1);
        w(&mut t, reg::INTERRUPT_ACK, 1);
        assert_eq!(r(&mut t, reg::INTERRUPT_STATUS), 0);
    }

    #[test]
    fn register_accesses_that_are_not_32_bits_wide_do_nothing() {
        let (mut t, _, _) = transport();
        let mut byte = [0xffu8];
        t.read(reg::MAGIC, &mut byte);
        assert_eq!(byte, [0]);
        t.write(reg::STATUS, &[1]);
        t.write(reg::STATUS, &[1, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(r(&mut t, reg::STATUS), 0);
        assert_eq!(r(&mut t, 0x0c0), 0, "unknown registers read as zero");
    }
}
