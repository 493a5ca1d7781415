//! Puts devices on the VM: the legacy PC devices on the I/O-port bus, the virtio devices in the
//! MMIO gap (each with its irqfd, ioeventfds and command-line declaration).

use std::sync::{Arc, Mutex};

use vmm_sys_util::eventfd::EventFd;

use crate::boot::mptable;
use crate::devices::legacy::{
    Console, GuestEvents, GuestTimestamps, Serial, I8042, I8042_PORT_BASE, I8042_PORT_LEN, SERIAL_IRQ,
    SERIAL_PORT_BASE, SERIAL_PORT_LEN,
};
use crate::devices::virtio::fs::FsDevice;
use crate::devices::virtio::net::{NetConfig, NetDevice};
use crate::devices::virtio::vsock::{HostPorts, VsockDevice};
use crate::devices::virtio::{
    mmio::QUEUE_NOTIFY_OFFSET, rng::Rng, Interrupt, MmioTransport, VirtioDevice, MMIO_WINDOW,
};
use crate::devices::Bus;
use crate::exit::ExitNotifier;
use crate::layout;
use crate::threads::DeviceThread;
use crate::vm::Vm;
use crate::VmError;

/// A virtio device to give the guest.
#[derive(Debug, Clone)]
pub enum DeviceConfig {
    /// virtio-rng, fed from the host's `/dev/urandom`.
    Rng,
    /// Hybrid virtio-vsock: the guest is `guest_cid`; host clients connect to `socket`, guest
    /// connections to host port P reach `<socket>_P`.
    Vsock { guest_cid: u64, socket: std::path::PathBuf, host_ports: HostPorts },
    /// virtio-fs: the host directory `shared_dir`, mounted in the guest with
    /// `mount -t virtiofs <tag> <dir>`, holding at most `max_fds` host files for the guest.
    Fs { tag: String, shared_dir: std::path::PathBuf, max_fds: usize },
    /// virtio-net on an open tap (or another frame backend), with the guest NIC's MAC and MTU.
    Net(NetConfig),
}

impl DeviceConfig {
    /// The name of the device's thread (its `comm`, as the seccomp report and tests see it).
    fn thread_name(&self) -> &'static str {
        match self {
            DeviceConfig::Rng => "virtio-rng",
            DeviceConfig::Vsock { .. } => "virtio-vsock",
            DeviceConfig::Fs { .. } => "virtio-fs",
            DeviceConfig::Net(_) => "virtio-net",
        }
    }
}

/// First GSI for virtio devices (legacy ISA lines 0-4 are taken or reserved).
const VIRTIO_FIRST_GSI: u32 = 5;

/// MMIO base and GSI of the `index`th virtio device.
fn virtio_slot(index: usize) -> (u64, u32) {
    (layout::MMIO_GAP_START + index as u64 * MMIO_WINDOW, VIRTIO_FIRST_GSI + index as u32)
}

/// The most virtio devices the IOAPIC's pins leave room for.
pub const MAX_VIRTIO_DEVICES: usize = (mptable::IOAPIC_PINS as u32 - VIRTIO_FIRST_GSI) as usize;

/// `cmdline` with one `virtio_mmio.device=` declaration per device, placed before any ` -- `
/// (what follows it is for init, not the kernel).
pub fn cmdline_with_devices(cmdline: &str, count: usize) -> String {
    let declarations: String = (0..count)
        .map(|index| {
            let (base, gsi) = virtio_slot(index);
            format!(" virtio_mmio.device=4K@{base:#x}:{gsi}")
        })
        .collect();
    let (kernel, init) = match cmdline.split_once(" -- ") {
        Some((kernel, init)) => (kernel, Some(init)),
        None => (cmdline, None),
    };
    match init {
        Some(init) => format!("{kernel}{declarations} -- {init}"),
        None => format!("{kernel}{declarations}"),
    }
}

/// The virtio transports of a VM, in slot order (for [`crate::VmInspector`]).
pub type Transports = Vec<Arc<Mutex<MmioTransport>>>;

/// The virtio devices on a new MMIO bus, each with its irqfd and one ioeventfd per queue; the
/// transports are also returned apart, for inspection.
pub fn virtio_devices(
    vm: &Vm,
    configs: &[DeviceConfig],
    seccomp: bool,
) -> Result<(Bus, Transports), VmError> {
    let io = |what| move |cause| VmError::Io { what, cause };
    let mut bus = Bus::default();
    let mut transports = Transports::new();
    for (index, config) in configs.iter().enumerate() {
        let (base, gsi) = virtio_slot(index);
        // The device's thread, made now: no thread is started once the vCPUs run (see `threads`).
        let thread = DeviceThread::spawn(config.thread_name()).map_err(io("a device thread"))?;
        let device: Box<dyn VirtioDevice> = match config {
            DeviceConfig::Rng => Box::new(Rng::new(thread)),
            DeviceConfig::Vsock { guest_cid, socket, host_ports } => {
                Box::new(VsockDevice::new(*guest_cid, socket.clone(), host_ports.clone(), thread))
            }
            DeviceConfig::Fs { tag, shared_dir, max_fds } => {
                Box::new(FsDevice::new(tag, shared_dir, *max_fds, thread)?)
            }
            DeviceConfig::Net(net) => Box::new(NetDevice::new(net.clone(), thread)),
        };
        let irq = EventFd::new(libc::EFD_NONBLOCK).map_err(io("virtio irq eventfd"))?;
        vm.fd()
            .register_irqfd(&irq, gsi)
            .map_err(|cause| VmError::Kvm { what: "KVM_IRQFD (virtio)", cause })?;
        let mut queue_events = Vec::new();
        for queue in 0..device.queue_max_sizes().len() {
            let event = EventFd::new(libc::EFD_NONBLOCK).map_err(io("virtio queue eventfd"))?;
            let address = kvm_ioctls::IoEventAddress::Mmio(base + QUEUE_NOTIFY_OFFSET);
            vm.fd()
                .register_ioevent(&event, &address, queue as u32)
                .map_err(|cause| VmError::Kvm { what: "KVM_IOEVENTFD (virtio)", cause })?;
            queue_events.push(event);
        }
        let transport =
            MmioTransport::new(device, vm.memory().clone(), Arc::new(Interrupt::new(irq)), queue_events)
                .map_err(io("virtio queue eventfds"))?
                .with_seccomp(seccomp);
        let transport = Arc::new(Mutex::new(transport));
        bus.insert(base, MMIO_WINDOW, transport.clone())?;
        transports.push(transport);
    }
    Ok((bus, transports))
}

/// COM1, the i8042 and the guest event port on a new I/O-port bus.
pub fn legacy_devices(
    vm: &Vm,
    console: &Console,
    notifier: &ExitNotifier,
    timestamps: &Arc<GuestTimestamps>,
) -> Result<(Bus, Arc<Mutex<Serial>>), VmError> {
    let serial_irq =
        EventFd::new(libc::EFD_NONBLOCK).map_err(|cause| VmError::Io { what: "serial eventfd", cause })?;
    vm.fd()
        .register_irqfd(&serial_irq, SERIAL_IRQ)
        .map_err(|cause| VmError::Kvm { what: "KVM_IRQFD (serial)", cause })?;
    let mut pio = Bus::default();
    let serial = Arc::new(Mutex::new(Serial::new(serial_irq, console.clone())));
    pio.insert(SERIAL_PORT_BASE.into(), SERIAL_PORT_LEN.into(), serial.clone())?;
    pio.insert(
        I8042_PORT_BASE.into(),
        I8042_PORT_LEN.into(),
        Arc::new(Mutex::new(I8042::new(notifier.clone()))),
    )?;
    pio.insert(
        husk_protocols::GUEST_EVENT_PORT.into(),
        1,
        Arc::new(Mutex::new(GuestEvents::new(timestamps.clone(), notifier.clone()))),
    )?;
    Ok((pio, serial))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_declarations_go_before_the_init_arguments() {
        assert_eq!(
            cmdline_with_devices("console=ttyS0", 2),
            "console=ttyS0 virtio_mmio.device=4K@0xd0000000:5 virtio_mmio.device=4K@0xd0001000:6"
        );
        assert_eq!(
            cmdline_with_devices("quiet -- --verbose", 1),
            "quiet virtio_mmio.device=4K@0xd0000000:5 -- --verbose"
        );
        assert_eq!(cmdline_with_devices("quiet", 0), "quiet");
    }
}
