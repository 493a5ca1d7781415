//! The virtio-mmio transport, register layout version 2 (virtio 1.2, section 4.2.2).
//!
//! The driver drives it through 32-bit register accesses; every value is untrusted: unknown
//! registers read as zero, out-of-order or out-of-range writes are ignored, a device is activated
//! only with valid queues and the features it offered, and a status of 0 resets it.

use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::{DeviceContext, Interrupt, VirtioDevice, VIRTIO_F_VERSION_1};
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
const STATUS_FAILED: u32 = 0x80;

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

/// One virtio device behind its MMIO registers.
pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    mem: GuestMemoryMmap,
    interrupt: Arc<Interrupt>,
    queues: Vec<Queue>,
    queue_events: Vec<EventFd>,
    device_features_sel: u32,
    driver_features_sel: u32,
    acked_features: u64,
    queue_sel: u32,
    status: u32,
    activated: bool,
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
    ) -> MmioTransport {
        let queues = fresh_queues(device.as_ref());
        MmioTransport {
            device,
            mem,
            interrupt,
            queues,
            queue_events,
            device_features_sel: 0,
            driver_features_sel: 0,
            acked_features: 0,
            queue_sel: 0,
            status: 0,
            activated: false,
        }
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
                if let Some(queue) = self.selected_queue() {
                    // try_set_size refuses sizes that are zero, not a power of two or too large.
                    let _ = queue.try_set_size(value as u16).ok().filter(|_| value <= u16::MAX as u32);
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
                self.status = value & !STATUS_DRIVER_OK | STATUS_FAILED;
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
            tracing::warn!(device = self.device.device_type(), "virtio-mmio: driver set up invalid queues");
            return false;
        }
        let queue_events =
            match self.queue_events.iter().map(EventFd::try_clone).collect::<Result<Vec<_>, _>>() {
                Ok(events) => events,
                Err(err) => {
                    tracing::error!(%err, "virtio-mmio: cannot clone queue eventfds");
                    return false;
                }
            };
        let queues = std::mem::replace(&mut self.queues, fresh_queues(self.device.as_ref()));
        let context = DeviceContext {
            mem: self.mem.clone(),
            queues,
            queue_events,
            interrupt: self.interrupt.clone(),
            acked_features: self.acked_features,
        };
        match self.device.activate(context) {
            Ok(()) => {
                self.activated = true;
                true
            }
            Err(err) => {
                tracing::error!(%err, device = self.device.device_type(), "virtio-mmio: activation failed");
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
