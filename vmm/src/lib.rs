//! Husk's virtual machine monitor: a library embedded in the containerd shim (one VM per pod), with
//! `husk-vmm` as a thin binary over it.
//!
//! Modules, one concern each:
//! - [`host`]: what this host's KVM is and whether it can run Husk guests.
//! - [`layout`]: the guest physical memory map.
//! - [`vm`]: the KVM VM, its memory and interrupt controllers.
//! - [`boot`]: loading Linux (kernel, initrd, command line, boot params), MP table, CPUID, registers.
//! - [`vcpu`]: vCPU threads and exit dispatch.
//! - [`device_manager`]: which device goes where (ports, MMIO slots, interrupts, cmdline).
//! - [`devices`]: buses and device models (legacy: serial, i8042, guest event port).
//! - [`exit`]: why a VM ended.
//! - [`memory_usage`]: the VMM's memory footprint besides guest RAM.
//! - [`rate_limit`]: limits on what the guest makes the host repeat (log lines, events).
//! - [`seccomp`]: the syscall filters of vCPU and device threads; [`threads`]: device threads,
//!   made with the VM before any vCPU runs.
//! - [`snapshot`]: a VM's state saved to a directory, and VMs restored from it.

pub mod boot;
pub mod device_manager;
pub mod devices;
pub mod exit;
pub mod host;
pub mod jail;
pub mod layout;
pub mod memory_usage;
pub mod rate_limit;
pub mod seccomp;
pub mod snapshot;
pub mod threads;
pub mod vcpu;
pub mod vm;

use std::os::unix::thread::JoinHandleExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Mutex, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_ioctls::{Kvm, VcpuFd};

use crate::boot::{cpuid, mptable, regs, BootError};
use crate::device_manager::Transports;
pub use crate::device_manager::{DeviceConfig, MAX_VIRTIO_DEVICES};
pub use crate::devices::legacy::ReadyWait;
use crate::devices::legacy::{Console, GuestTimestamps, Serial};
pub use crate::devices::virtio::inspect::DeviceState;
use crate::devices::virtio::MmioTransport;
use crate::devices::{Bus, BusError};
use crate::exit::ExitNotifier;
pub use crate::exit::ExitReason;
use crate::snapshot::{SnapshotError, SnapshotState};
use crate::vcpu::VcpuShared;
use crate::vm::{Vm, VmSetupError};

/// Kernel command line for Husk's guest kernel: serial console, reset through the i8042, reboot at
/// once on panic, no PCI or modules, and the fast-boot options of the guest image notes.
pub const DEFAULT_CMDLINE: &str =
    "console=ttyS0 reboot=k panic=-1 pci=off nomodules 8250.nr_uarts=1 no_timer_check io_delay=none quiet";

/// Console text that marks a kernel panic (the kernel then resets through the i8042).
const PANIC_MARKER: &str = "Kernel panic - not syncing";
/// Lines of console output included in error reports.
pub const CONSOLE_TAIL_LINES: usize = 30;

/// What to boot and how.
#[derive(Debug)]
pub struct VmConfig {
    /// Number of vCPUs (1 to [`mptable::MAX_VCPUS`], and no more than KVM allows).
    pub vcpus: u8,
    /// Guest RAM in MiB.
    pub mem_mib: u64,
    /// ELF `vmlinux` or bzImage.
    pub kernel: PathBuf,
    /// Initial ramdisk.
    pub initrd: Option<PathBuf>,
    /// Kernel command line.
    pub cmdline: String,
    /// Where the serial console goes.
    pub console: Console,
    /// Start point of `vmm_setup` (default: when [`VmHandle::start`] is called); the binary passes
    /// its process start.
    pub setup_started: Option<Instant>,
    /// Input for the serial console (the guest's debug console), e.g. the VMM's stdin.
    pub console_input: Option<std::os::fd::OwnedFd>,
    /// Virtio devices, placed in the MMIO gap in this order and declared on the command line.
    pub devices: Vec<DeviceConfig>,
    /// Whether vCPU and device threads run under their seccomp filters ([`seccomp`]); off only
    /// to tell whether a filter is what stops a guest.
    pub seccomp: bool,
}

/// Errors starting a VM. Each names what the user can change.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("{0}")]
    Host(#[from] host::HostError),
    #[error("this host's KVM cannot run Husk guests: {0}")]
    UnusableKvm(String),
    #[error("vcpus: {requested} requested, this VMM supports 1 to {max} (KVM allows {kvm_max})")]
    Vcpus { requested: u8, max: u8, kvm_max: usize },
    #[error("devices: {count} virtio devices requested, at most {MAX_VIRTIO_DEVICES}")]
    TooManyDevices { count: usize },
    #[error("memory: {mib} MiB is more than this VMM supports ({} MiB)", MAX_MEM_BYTES >> 20)]
    MemoryTooLarge { mib: u64 },
    #[error("memory: {mib} MiB is too small (at least {min} MiB)")]
    MemoryTooSmall { mib: u64, min: u64 },
    #[error(transparent)]
    Fs(#[from] devices::virtio::fs::FsError),
    #[error(transparent)]
    Setup(#[from] VmSetupError),
    #[error(transparent)]
    Boot(#[from] BootError),
    #[error(transparent)]
    MpTable(#[from] mptable::MpTableError),
    #[error("vCPU {index}: {cause}")]
    Regs { index: u8, cause: regs::RegsError },
    #[error("{what}: {cause}")]
    Kvm { what: &'static str, cause: kvm_ioctls::Error },
    #[error("registering a device: {0}")]
    Bus(#[from] BusError),
    #[error("{what}: {cause}")]
    Io { what: &'static str, cause: std::io::Error },
    #[error(transparent)]
    Seccomp(#[from] seccomp::SeccompError),
    #[error("snapshot {dir}: {cause}")]
    Snapshot { dir: PathBuf, cause: SnapshotError },
    #[error("restoring vCPU {index}: {cause}")]
    RestoreVcpu { index: usize, cause: SnapshotError },
}

/// What to restore from a snapshot ([`VmHandle::restore`]), and how to run it.
#[derive(Debug)]
pub struct RestoreConfig {
    /// The snapshot directory ([`snapshot`]).
    pub snapshot: PathBuf,
    /// Where the serial console goes.
    pub console: Console,
    /// Start point of `vmm_setup` (default: when [`VmHandle::restore`] is called).
    pub setup_started: Option<Instant>,
    /// Input for the serial console.
    pub console_input: Option<std::os::fd::OwnedFd>,
    /// Whether vCPU threads run under their seccomp filter.
    pub seccomp: bool,
}

/// The largest guest memory (the boot page tables and e820 describe at most this much).
pub const MAX_MEM_BYTES: u64 = 1 << 40;

/// The smallest guest that can hold a kernel and an initramfs.
pub const MIN_MEM_MIB: u64 = 32;

/// How long the boot took, with stated start and end points.
#[derive(Debug, Clone, Copy, Default)]
pub struct BootTimings {
    /// `setup_started` (process start for `husk-vmm`) to the boot vCPU's first `KVM_RUN`.
    pub vmm_setup: Option<Duration>,
    /// First `KVM_RUN` to the boot-timer write: the agent (`/init`) reporting ready on the guest
    /// event port.
    pub boot_to_init: Option<Duration>,
}

/// The moments of a VM's boot, readable from any thread while it runs (the VM's owner may have
/// moved its [`VmHandle`] to a thread that waits for its end).
#[derive(Debug, Clone)]
pub struct BootClock {
    setup_started: Instant,
    /// Restored from a snapshot: no boot to time.
    restored: bool,
    timestamps: Arc<GuestTimestamps>,
}

impl BootClock {
    /// When [`VmHandle::start`] began (or `VmConfig::setup_started`).
    pub fn setup_started(&self) -> Instant {
        self.setup_started
    }

    /// The VM made (memory, guest loaded, devices), its vCPU threads about to start.
    pub fn vcpus_starting(&self) -> Option<Instant> {
        self.timestamps.vcpus_starting.get().copied()
    }

    /// The boot vCPU's first `KVM_RUN`: the guest kernel's entry.
    pub fn kernel_entry(&self) -> Option<Instant> {
        self.timestamps.first_vcpu_entry.get().copied()
    }

    /// The agent's ready report on the guest event port.
    pub fn guest_ready(&self) -> Option<Instant> {
        self.timestamps.guest_ready.get().copied()
    }

    /// Blocks until the agent reports ready, the VM ends, or `timeout` passes.
    pub fn wait_ready(&self, timeout: Duration) -> ReadyWait {
        self.timestamps.wait_ready(timeout)
    }

    /// Boot timings so far.
    pub fn timings(&self) -> BootTimings {
        let (entry, ready) = (self.kernel_entry(), self.guest_ready());
        BootTimings {
            vmm_setup: entry.map(|e| e.duration_since(self.setup_started)),
            boot_to_init: entry.zip(ready).filter(|_| !self.restored).map(|(e, r)| r.duration_since(e)),
        }
    }
}

/// How a VM ended.
#[derive(Debug, Clone)]
pub struct VmExit {
    pub reason: ExitReason,
    /// The last [`CONSOLE_TAIL_LINES`] console lines.
    pub console_tail: String,
    pub timings: BootTimings,
    /// Process memory when the VM ended (vCPUs stopped, guest RAM still mapped).
    pub memory: Option<memory_usage::MemoryUsage>,
}

/// Stops a running VM from any thread.
#[derive(Debug, Clone)]
pub struct VmStopper(ExitNotifier);

impl VmStopper {
    /// Ends the VM with [`ExitReason::Stopped`] (no effect once it has ended).
    pub fn stop(&self) {
        self.0.notify(ExitReason::Stopped);
    }
}

/// Reads the state of a running VM's virtio devices from any thread (for diagnosing a stalled
/// device; see [`devices::virtio::inspect`]). It does not keep the devices alive: once the VM is
/// gone it reads nothing.
#[derive(Debug, Clone)]
pub struct VmInspector(Weak<Transports>);

impl VmInspector {
    /// Each virtio device's transport, queues and counters, in slot order (`None` for a device
    /// whose transport stayed locked for [`INSPECT_LOCK_WAIT`]: a vCPU is in it, e.g. resetting a
    /// device whose worker is stuck); `None` once the VM has been torn down.
    pub fn virtio_state(&self) -> Option<Vec<Option<DeviceState>>> {
        let transports = self.0.upgrade()?;
        Some(transports.iter().map(|transport| state_unless_busy(transport)).collect())
    }
}

/// How long [`VmInspector::virtio_state`] waits for a transport a vCPU holds.
pub const INSPECT_LOCK_WAIT: Duration = Duration::from_millis(500);

fn state_unless_busy(transport: &Mutex<MmioTransport>) -> Option<DeviceState> {
    let deadline = Instant::now() + INSPECT_LOCK_WAIT;
    loop {
        match transport.try_lock() {
            Ok(transport) => return Some(transport.state()),
            Err(std::sync::TryLockError::Poisoned(poisoned)) => return Some(poisoned.into_inner().state()),
            Err(std::sync::TryLockError::WouldBlock) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(std::sync::TryLockError::WouldBlock) => return None,
        }
    }
}

/// A running VM. Dropping it stops the VM and joins its threads.
#[derive(Debug)]
pub struct VmHandle {
    exits: Receiver<ExitReason>,
    notifier: ExitNotifier,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<Option<VcpuFd>>>,
    serial: Arc<Mutex<Serial>>,
    input_thread: Option<JoinHandle<()>>,
    console: Console,
    timestamps: Arc<GuestTimestamps>,
    setup_started: Instant,
    restored: bool,
    transports: Arc<Transports>,
    /// The devices, kept here so that they go on this handle's thread once the vCPU threads are
    /// joined (a vCPU thread under its filter may not do what a device's teardown does).
    _devices: [Arc<Bus>; 2],
    // Declared last: dropped after the vCPU threads are joined.
    vm: Vm,
}

impl VmHandle {
    /// Creates the VM, loads the guest and starts its vCPUs.
    pub fn start(config: VmConfig) -> Result<VmHandle, VmError> {
        let setup_started = config.setup_started.unwrap_or_else(Instant::now);
        let (kvm, mem_bytes) = validate(&config)?;
        let vm = Vm::new(&kvm, mem_bytes)?;
        tracing::debug!(
            elapsed_us = setup_started.elapsed().as_micros(),
            mem_mib = config.mem_mib,
            "VM created"
        );
        let entry = boot::load_linux(
            vm.memory(),
            mem_bytes,
            &config.kernel,
            config.initrd.as_deref(),
            &device_manager::cmdline_with_devices(&config.cmdline, config.devices.len()),
        )?;
        tracing::debug!(elapsed_us = setup_started.elapsed().as_micros(), kernel = %config.kernel.display(), "guest loaded");
        mptable::write(vm.memory(), config.vcpus)?;
        regs::write_boot_tables(vm.memory()).map_err(|cause| VmError::Regs { index: 0, cause })?;

        let devices = Devices::new(&vm, &config.console, &config.devices, config.seccomp)?;
        let vcpus = create_vcpus(&kvm, &vm, config.vcpus, entry)?;
        tracing::debug!(
            elapsed_us = setup_started.elapsed().as_micros(),
            vcpus = config.vcpus,
            "vCPUs configured"
        );
        let run = RunOptions {
            restored: false,
            console: config.console,
            console_input: config.console_input,
            seccomp: config.seccomp,
        };
        VmHandle::launch(vm, devices, vcpus, run, setup_started)
    }

    /// Restores the VM saved in `config.snapshot` and starts its vCPUs where they stopped. The
    /// guest's agent was ready when the snapshot was taken: the restored VM counts as ready once
    /// its vCPUs start.
    pub fn restore(config: RestoreConfig) -> Result<VmHandle, VmError> {
        let setup_started = config.setup_started.unwrap_or_else(Instant::now);
        let snapshot_error = |cause| VmError::Snapshot { dir: config.snapshot.clone(), cause };
        let (state, memory) = snapshot::read(&config.snapshot).map_err(snapshot_error)?;
        if state.vcpus.is_empty() || state.vcpus.len() > usize::from(mptable::MAX_VCPUS) {
            return Err(snapshot_error(SnapshotError::Invalid("vCPUs")));
        }
        if !(MIN_MEM_MIB << 20..=MAX_MEM_BYTES).contains(&state.mem_bytes) {
            return Err(snapshot_error(SnapshotError::Invalid("memory size")));
        }
        let kind = host::detect_kind_here();
        if let Err(reason) = host::usable_kind(&kind) {
            return Err(VmError::UnusableKvm(reason));
        }
        let svm = kind.vendor() == Some(host::CpuVendor::Amd);
        let kvm = Kvm::new().map_err(host::HostError::Open)?;
        let vm = Vm::from_memory_file(&kvm, state.mem_bytes, &memory)?;
        let configs = restored_device_configs(&state).map_err(snapshot_error)?;
        let devices = Devices::new(&vm, &config.console, &configs, config.seccomp)?;
        devices
            .serial
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .set_state(&state.serial)
            .map_err(|cause| VmError::Io { what: "restoring the serial port", cause })?;
        let vcpus = restore_vcpus(&vm, &state, svm)?;
        state.machine.restore(vm.fd()).map_err(snapshot_error)?;
        // Last: a device's restore may raise its interrupt, which the interrupt controllers'
        // state would otherwise overwrite.
        for (transport, saved) in devices.transports.iter().zip(&state.virtio) {
            transport
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .restore(saved)
                .map_err(|cause| snapshot_error(cause.into()))?;
        }
        tracing::debug!(
            elapsed_us = setup_started.elapsed().as_micros(),
            vcpus = vcpus.len(),
            mem_mib = state.mem_bytes >> 20,
            "VM restored"
        );
        let timestamps = Arc::clone(&devices.timestamps);
        let run = RunOptions {
            restored: true,
            console: config.console,
            console_input: config.console_input,
            seccomp: config.seccomp,
        };
        let handle = VmHandle::launch(vm, devices, vcpus, run, setup_started)?;
        timestamps.set_ready(Instant::now());
        Ok(handle)
    }

    /// Stops the VM's vCPUs where they are and saves the VM into `dir` ([`snapshot`]); the VM
    /// is gone afterwards. Meant for a guest at rest (its agent ready, nothing in flight).
    pub fn snapshot(mut self, dir: &Path) -> Result<(), VmError> {
        let snapshot_error = |cause| VmError::Snapshot { dir: dir.to_path_buf(), cause };
        let expected = self.threads.len();
        let vcpus = self.stop_vcpus();
        if vcpus.len() != expected || self.exits.try_recv().is_ok() {
            return Err(snapshot_error(SnapshotError::Ended));
        }
        let serial = self.serial.lock().unwrap_or_else(std::sync::PoisonError::into_inner).state();
        let virtio = self
            .transports
            .iter()
            .map(|transport| transport.lock().unwrap_or_else(std::sync::PoisonError::into_inner).snapshot())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|cause| snapshot_error(cause.into()))?;
        let kvm = Kvm::new().map_err(host::HostError::Open)?;
        let msrs = snapshot::vcpu::msrs_to_save(&kvm).map_err(snapshot_error)?;
        let vcpus = vcpus
            .iter()
            .map(|fd| snapshot::vcpu::VcpuState::save(fd, &msrs))
            .collect::<Result<Vec<_>, _>>()
            .map_err(snapshot_error)?;
        let machine = snapshot::machine::MachineState::save(self.vm.fd()).map_err(snapshot_error)?;
        let mem_bytes = self.vm.mem_bytes();
        let state =
            SnapshotState { version: snapshot::FORMAT_VERSION, mem_bytes, vcpus, machine, serial, virtio };
        snapshot::write(dir, &state, self.vm.memory()).map_err(snapshot_error)
    }

    /// Makes the handle over a VM whose devices and vCPUs are set up, and starts the vCPUs.
    fn launch(
        vm: Vm,
        devices: Devices,
        vcpus: Vec<VcpuFd>,
        run: RunOptions,
        setup_started: Instant,
    ) -> Result<VmHandle, VmError> {
        vcpu::install_kick_handler()
            .map_err(|cause| VmError::Io { what: "installing the vCPU kick signal", cause })?;
        let shared = VcpuShared {
            pio: Arc::new(devices.pio),
            mmio: Arc::new(devices.mmio),
            exit: devices.notifier.clone(),
            stop: Arc::new(AtomicBool::new(false)),
            timestamps: devices.timestamps.clone(),
            seccomp: run.seccomp,
        };
        let mut handle = VmHandle {
            exits: devices.exits,
            notifier: devices.notifier,
            stop: shared.stop.clone(),
            threads: Vec::with_capacity(vcpus.len()),
            serial: devices.serial.clone(),
            console: run.console,
            input_thread: None,
            timestamps: devices.timestamps,
            setup_started,
            restored: run.restored,
            transports: Arc::new(devices.transports),
            _devices: [shared.pio.clone(), shared.mmio.clone()],
            vm,
        };
        if let Some(input) = run.console_input {
            let thread = devices::legacy::console_input::spawn(input, devices.serial, handle.stop.clone())
                .map_err(|cause| VmError::Io { what: "starting the console input thread", cause })?;
            handle.input_thread = Some(thread);
        }
        let _ = handle.timestamps.vcpus_starting.set(Instant::now());
        for (index, fd) in vcpus.into_iter().enumerate() {
            let thread = vcpu::spawn(index as u8, fd, shared.clone())
                .map_err(|cause| VmError::Io { what: "starting a vCPU thread", cause })?;
            handle.threads.push(thread);
        }
        Ok(handle)
    }

    /// A handle that stops this VM from another thread.
    pub fn stopper(&self) -> VmStopper {
        VmStopper(self.notifier.clone())
    }

    /// A handle that reads this VM's device state from another thread.
    pub fn inspector(&self) -> VmInspector {
        VmInspector(Arc::downgrade(&self.transports))
    }

    /// A reader of this VM's boot moments for other threads.
    pub fn boot_clock(&self) -> BootClock {
        BootClock {
            setup_started: self.setup_started,
            restored: self.restored,
            timestamps: Arc::clone(&self.timestamps),
        }
    }

    /// Boot timings so far.
    pub fn timings(&self) -> BootTimings {
        self.boot_clock().timings()
    }

    /// Blocks until the VM ends (guest poweroff/reboot/panic, error, or [`VmStopper::stop`]), then
    /// stops every vCPU and joins its thread.
    pub fn wait(mut self) -> VmExit {
        let reason = self.exits.recv().unwrap_or(ExitReason::Stopped);
        self.timestamps.set_ended();
        let reason = match reason {
            ExitReason::Reboot | ExitReason::TripleFault { .. }
                if self.console.tail_text().contains(PANIC_MARKER) =>
            {
                ExitReason::GuestPanic
            }
            other => other,
        };
        self.shutdown();
        self.console.finish();
        let memory = memory_usage::MemoryUsage::measure(&self.vm.host_ranges());
        VmExit {
            reason,
            console_tail: self.console.tail_lines(CONSOLE_TAIL_LINES),
            timings: self.timings(),
            memory,
        }
    }

    /// Stops all vCPU threads: raise the stop flag, then kick each thread out of `KVM_RUN` until it
    /// has exited (a kick that lands just before `KVM_RUN` is repeated, so none is lost).
    fn shutdown(&mut self) {
        drop(self.stop_vcpus());
        // It polls the stop flag, so it ends within one poll interval.
        if let Some(thread) = self.input_thread.take() {
            let _ = thread.join();
        }
    }

    /// Stops and joins the vCPU threads; returns the vCPUs of those that were running (a thread
    /// whose vCPU ended the VM returns none).
    fn stop_vcpus(&mut self) -> Vec<VcpuFd> {
        self.stop.store(true, Ordering::Release);
        let mut stopped = Vec::with_capacity(self.threads.len());
        for thread in self.threads.drain(..) {
            while !thread.is_finished() {
                // SAFETY: the pthread is alive (not yet joined), and the kick signal has a handler.
                unsafe { libc::pthread_kill(thread.as_pthread_t(), vcpu::kick_signal()) };
                std::thread::sleep(Duration::from_millis(5));
            }
            if let Ok(Some(fd)) = thread.join() {
                stopped.push(fd);
            }
        }
        stopped
    }
}

/// How a VM's handle runs it.
struct RunOptions {
    /// The VM comes from a snapshot.
    restored: bool,
    console: Console,
    console_input: Option<std::os::fd::OwnedFd>,
    seccomp: bool,
}

/// A VM's devices and the channels its vCPUs report through, before the vCPUs run.
struct Devices {
    notifier: ExitNotifier,
    exits: Receiver<ExitReason>,
    timestamps: Arc<GuestTimestamps>,
    pio: Bus,
    serial: Arc<Mutex<Serial>>,
    mmio: Bus,
    transports: Transports,
}

impl Devices {
    /// The legacy devices and the virtio devices of `configs` of `vm`.
    fn new(vm: &Vm, console: &Console, configs: &[DeviceConfig], seccomp: bool) -> Result<Devices, VmError> {
        let (notifier, exits) = ExitNotifier::new();
        let timestamps = Arc::new(GuestTimestamps::default());
        let (pio, serial) = device_manager::legacy_devices(vm, console, &notifier, &timestamps)?;
        if seccomp {
            seccomp::install_reporter()?;
        }
        let (mmio, transports) = device_manager::virtio_devices(vm, configs, seccomp)?;
        Ok(Devices { notifier, exits, timestamps, pio, serial, mmio, transports })
    }
}

/// The virtio devices to make for a restored VM, in the snapshot's slot order.
fn restored_device_configs(state: &SnapshotState) -> Result<Vec<DeviceConfig>, SnapshotError> {
    state
        .virtio
        .iter()
        .map(|saved| match saved.device_type {
            virtio_bindings::virtio_ids::VIRTIO_ID_RNG => Ok(DeviceConfig::Rng),
            device_type => {
                Err(devices::virtio::mmio::TransportSnapshotError::NotRestorable { device_type }.into())
            }
        })
        .collect()
}

/// Creates the snapshot's vCPUs in `vm` and gives each its saved state.
fn restore_vcpus(vm: &Vm, state: &SnapshotState, svm: bool) -> Result<Vec<VcpuFd>, VmError> {
    let mut vcpus = Vec::with_capacity(state.vcpus.len());
    for (index, saved) in state.vcpus.iter().enumerate() {
        let fd = vm
            .fd()
            .create_vcpu(index as u64)
            .map_err(|cause| VmError::Kvm { what: "KVM_CREATE_VCPU", cause })?;
        saved.restore(&fd, svm).map_err(|cause| VmError::RestoreVcpu { index, cause })?;
        vcpus.push(fd);
    }
    Ok(vcpus)
}

/// Checks the configuration (the user's mistakes first, so they are reported whatever the host),
/// then the host's KVM; returns KVM and the memory size in bytes.
fn validate(config: &VmConfig) -> Result<(Kvm, u64), VmError> {
    if config.mem_mib < MIN_MEM_MIB {
        return Err(VmError::MemoryTooSmall { mib: config.mem_mib, min: MIN_MEM_MIB });
    }
    let mem_bytes = config
        .mem_mib
        .checked_mul(1 << 20)
        .filter(|bytes| *bytes <= MAX_MEM_BYTES)
        .ok_or(VmError::MemoryTooLarge { mib: config.mem_mib })?;
    boot::check_readable(&config.kernel, config.initrd.as_deref())?;
    if config.devices.len() > MAX_VIRTIO_DEVICES {
        return Err(VmError::TooManyDevices { count: config.devices.len() });
    }
    if let Err(reason) = host::usable_kind(&host::detect_kind_here()) {
        return Err(VmError::UnusableKvm(reason));
    }
    let kvm = Kvm::new().map_err(host::HostError::Open)?;
    let kvm_max = kvm.get_max_vcpus();
    if config.vcpus == 0 || config.vcpus > mptable::MAX_VCPUS || config.vcpus as usize > kvm_max {
        return Err(VmError::Vcpus { requested: config.vcpus, max: mptable::MAX_VCPUS, kvm_max });
    }
    Ok((kvm, mem_bytes))
}

/// Creates `count` vCPUs with normalised CPUID; vCPU 0 is set up to enter the kernel at `entry`,
/// the others wait for the guest's INIT/SIPI.
fn create_vcpus(kvm: &Kvm, vm: &Vm, count: u8, entry: boot::KernelEntry) -> Result<Vec<VcpuFd>, VmError> {
    let mut supported = kvm
        .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .map_err(|cause| VmError::Kvm { what: "KVM_GET_SUPPORTED_CPUID", cause })?;
    if kvm.check_extension(kvm_ioctls::Cap::TscDeadlineTimer) {
        cpuid::enable_tsc_deadline(supported.as_mut_slice());
    }
    let mut vcpus = Vec::with_capacity(count as usize);
    for index in 0..count {
        let fd = vm
            .fd()
            .create_vcpu(index.into())
            .map_err(|cause| VmError::Kvm { what: "KVM_CREATE_VCPU", cause })?;
        let mut vcpu_cpuid = supported.clone();
        cpuid::normalize(vcpu_cpuid.as_mut_slice(), index, count);
        fd.set_cpuid2(&vcpu_cpuid).map_err(|cause| VmError::Kvm { what: "KVM_SET_CPUID2", cause })?;
        let setup = if index == 0 { regs::setup_vcpu(&fd, entry.0) } else { regs::setup_fpu_msrs_lapic(&fd) };
        setup.map_err(|cause| VmError::Regs { index, cause })?;
        vcpus.push(fd);
    }
    Ok(vcpus)
}

impl Drop for VmHandle {
    fn drop(&mut self) {
        self.shutdown();
    }
}
