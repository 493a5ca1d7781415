//! What kind of KVM this host offers, and whether Husk guests can run on it.
//!
//! Presence of `/dev/kvm` is not enough: some cloud machines expose a KVM that runs only
//! paravirtualised or tiny guests (PVM, "Pagetable-based Virtual Machine"), where an unmodified Linux
//! guest cannot run its user space. [`KvmReport::probe`] identifies the implementation from the loaded
//! module, checks the capabilities the VMM relies on, and proves that a VM and a vCPU can be created and
//! run by executing a few real-mode instructions.

use std::fs;
use std::os::raw::c_void;
use std::path::Path;

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::{Cap, Kvm, VcpuExit};
use serde::Serialize;
use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryMmap};

/// The KVM API version every supported kernel reports (stable since Linux 2.6.22).
const KVM_API_VERSION: i32 = 12;

/// Capabilities the VMM cannot work without.
const REQUIRED_CAPS: &[(Cap, &str)] = &[
    (Cap::Irqchip, "KVM_CAP_IRQCHIP"),
    (Cap::Irqfd, "KVM_CAP_IRQFD"),
    (Cap::Ioeventfd, "KVM_CAP_IOEVENTFD"),
    (Cap::UserMemory, "KVM_CAP_USER_MEMORY"),
    (Cap::ExtCpuid, "KVM_CAP_EXT_CPUID"),
    (Cap::SetTssAddr, "KVM_CAP_SET_TSS_ADDR"),
];

/// Guest-physical address of the probe guest's single page.
const PROBE_CODE_GPA: u64 = 0x1000;
/// I/O port the probe guest writes to (the conventional debug port).
const PROBE_PORT: u16 = 0xe9;
/// Byte the probe guest writes.
const PROBE_VALUE: u8 = 0x2a;
/// `mov al, 0x2a; out 0xe9, al; hlt` in 16-bit real mode.
const PROBE_CODE: [u8; 5] = [0xb0, PROBE_VALUE, 0xe6, PROBE_PORT as u8, 0xf4];

/// Which implementation of KVM the host kernel provides.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case", tag = "kind")]
pub enum KvmKind {
    /// Hardware virtualisation on bare metal (`kvm_intel` / `kvm_amd`, no hypervisor below us).
    Hardware { vendor: CpuVendor },
    /// Hardware virtualisation exposed to this machine by the hypervisor it runs under.
    Nested { vendor: CpuVendor },
    /// PVM (`kvm_pvm`): guest kernel code is emulated and guest user mode is not isolated properly.
    Pvm { native_mode: bool },
    /// No known vendor module is loaded (e.g. KVM built into the kernel); judged by the probe alone.
    Unknown,
}

impl KvmKind {
    /// The vendor extension behind this KVM, when known.
    pub fn vendor(&self) -> Option<CpuVendor> {
        match self {
            KvmKind::Hardware { vendor } | KvmKind::Nested { vendor } => Some(*vendor),
            KvmKind::Pvm { .. } | KvmKind::Unknown => None,
        }
    }
}

/// The CPU vendor extension behind hardware KVM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum CpuVendor {
    /// VT-x (`kvm_intel`).
    Intel,
    /// AMD-V / SVM (`kvm_amd`).
    Amd,
}

/// Why KVM cannot be opened or probed at all.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error("/dev/kvm does not exist: load kvm_intel or kvm_amd (and enable VT-x/AMD-V in the firmware)")]
    NoDevice,
    #[error("cannot open /dev/kvm: {0} (Husk needs read/write access to it)")]
    Open(kvm_ioctls::Error),
}

/// The result of probing this host's KVM.
#[derive(Debug, Clone, Serialize)]
pub struct KvmReport {
    /// Which implementation of KVM this is.
    pub kind: KvmKind,
    /// `KVM_GET_API_VERSION`.
    pub api_version: i32,
    /// `KVM_CAP_MAX_VCPUS`: the most vCPUs one VM may have.
    pub max_vcpus: usize,
    /// Required capabilities the kernel lacks.
    pub missing_caps: Vec<&'static str>,
    /// Outcome of creating a VM and running a real-mode guest in it: `Ok(())` or the failure.
    #[serde(serialize_with = "serialize_probe")]
    pub vm_probe: Result<(), String>,
}

fn serialize_probe<S: serde::Serializer>(probe: &Result<(), String>, s: S) -> Result<S::Ok, S::Error> {
    match probe {
        Ok(()) => s.serialize_str("ok"),
        Err(err) => s.serialize_str(err),
    }
}

impl KvmReport {
    /// Probes `/dev/kvm`: identifies the implementation, checks capabilities, runs a tiny guest.
    pub fn probe() -> Result<KvmReport, HostError> {
        if !Path::new("/dev/kvm").exists() {
            return Err(HostError::NoDevice);
        }
        let kvm = Kvm::new().map_err(HostError::Open)?;
        let missing_caps = REQUIRED_CAPS
            .iter()
            .filter(|(cap, _)| !kvm.check_extension(*cap))
            .map(|(_, name)| *name)
            .collect();
        Ok(KvmReport {
            kind: detect_kind(
                Path::new("/sys/module"),
                &fs::read_to_string("/proc/cpuinfo").unwrap_or_default(),
            ),
            api_version: kvm.get_api_version(),
            max_vcpus: kvm.get_max_vcpus(),
            missing_caps,
            vm_probe: run_probe_guest(&kvm),
        })
    }

    /// `Ok(())` when Husk guests can run on this KVM, otherwise the reason they cannot.
    pub fn usable(&self) -> Result<(), String> {
        if self.api_version != KVM_API_VERSION {
            return Err(format!("KVM API version {} (expected {KVM_API_VERSION})", self.api_version));
        }
        if !self.missing_caps.is_empty() {
            return Err(format!("KVM lacks required capabilities: {}", self.missing_caps.join(", ")));
        }
        if let Err(err) = &self.vm_probe {
            return Err(format!("creating and running a probe VM failed: {err}"));
        }
        usable_kind(&self.kind)
    }

    /// One-line description of the KVM kind, for humans.
    pub fn kind_summary(&self) -> String {
        match &self.kind {
            KvmKind::Hardware { vendor } => format!("hardware {}", vendor.extension()),
            KvmKind::Nested { vendor } => format!("nested {} (this host is itself a VM)", vendor.extension()),
            KvmKind::Pvm { native_mode } => {
                format!("PVM (kvm_pvm, pvm_native={})", if *native_mode { 'Y' } else { 'N' })
            }
            KvmKind::Unknown => "unknown implementation (no kvm_intel, kvm_amd or kvm_pvm module)".to_owned(),
        }
    }
}

impl CpuVendor {
    fn extension(self) -> &'static str {
        match self {
            CpuVendor::Intel => "VT-x",
            CpuVendor::Amd => "AMD-V",
        }
    }
}

/// The KVM implementation of this host (cheap: reads sysfs and `/proc/cpuinfo`, creates no VM).
pub fn detect_kind_here() -> KvmKind {
    detect_kind(Path::new("/sys/module"), &fs::read_to_string("/proc/cpuinfo").unwrap_or_default())
}

/// `Ok(())` unless this kind of KVM cannot run an unmodified Linux guest, with the reason.
pub fn usable_kind(kind: &KvmKind) -> Result<(), String> {
    match kind {
        KvmKind::Pvm { .. } => Err("KVM here is PVM (module kvm_pvm, pagetable-based virtual machine), not hardware \
                                    virtualisation: guest kernel code is emulated and an unmodified Linux guest cannot \
                                    run its user space (SYSCALL from guest user mode does not enter the guest kernel). \
                                    Run Husk on a host with VT-x or AMD-V, or run VM tests in the nested test host \
                                    (tests/testhost/run)"
            .to_owned()),
        _ => Ok(()),
    }
}

/// Identifies the KVM implementation from the loaded modules (`sysfs_module`, normally
/// `/sys/module`) and the CPU flags in `cpuinfo`.
fn detect_kind(sysfs_module: &Path, cpuinfo: &str) -> KvmKind {
    if sysfs_module.join("kvm_pvm").exists() {
        let native =
            fs::read_to_string(sysfs_module.join("kvm_pvm/parameters/pvm_native")).unwrap_or_default();
        return KvmKind::Pvm { native_mode: native.trim() == "Y" };
    }
    let vendor = if sysfs_module.join("kvm_intel").exists() {
        CpuVendor::Intel
    } else if sysfs_module.join("kvm_amd").exists() {
        CpuVendor::Amd
    } else {
        return KvmKind::Unknown;
    };
    let under_hypervisor = cpuinfo
        .lines()
        .find(|line| line.starts_with("flags"))
        .is_some_and(|flags| flags.split_whitespace().any(|flag| flag == "hypervisor"));
    if under_hypervisor {
        KvmKind::Nested { vendor }
    } else {
        KvmKind::Hardware { vendor }
    }
}

/// Creates a VM with one page of memory and one vCPU, runs `PROBE_CODE` in real mode and checks
/// that the expected port write and halt come back.
fn run_probe_guest(kvm: &Kvm) -> Result<(), String> {
    let vm = kvm.create_vm().map_err(|e| format!("KVM_CREATE_VM: {e}"))?;
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(PROBE_CODE_GPA), 0x1000)])
        .map_err(|e| format!("allocating probe memory: {e}"))?;
    mem.write_slice(&PROBE_CODE, GuestAddress(PROBE_CODE_GPA))
        .map_err(|e| format!("writing probe code: {e}"))?;
    let host_addr: *mut u8 =
        mem.get_host_address(GuestAddress(PROBE_CODE_GPA)).map_err(|e| format!("probe memory: {e}"))?;
    let region = kvm_userspace_memory_region {
        slot: 0,
        flags: 0,
        guest_phys_addr: PROBE_CODE_GPA,
        memory_size: 0x1000,
        userspace_addr: host_addr.cast::<c_void>() as u64,
    };
    // SAFETY: `region` describes the 4 KiB mapping owned by `mem`, which outlives `vm` (declared after
    // it, so dropped first) and is not remapped while the VM exists.
    unsafe { vm.set_user_memory_region(region) }.map_err(|e| format!("KVM_SET_USER_MEMORY_REGION: {e}"))?;
    let mut vcpu = vm.create_vcpu(0).map_err(|e| format!("KVM_CREATE_VCPU: {e}"))?;

    let mut sregs = vcpu.get_sregs().map_err(|e| format!("KVM_GET_SREGS: {e}"))?;
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    vcpu.set_sregs(&sregs).map_err(|e| format!("KVM_SET_SREGS: {e}"))?;
    let mut regs = vcpu.get_regs().map_err(|e| format!("KVM_GET_REGS: {e}"))?;
    regs.rip = PROBE_CODE_GPA;
    regs.rflags = 0x2;
    vcpu.set_regs(&regs).map_err(|e| format!("KVM_SET_REGS: {e}"))?;

    match vcpu.run().map_err(|e| format!("KVM_RUN: {e}"))? {
        VcpuExit::IoOut(PROBE_PORT, [PROBE_VALUE]) => {}
        other => {
            return Err(format!(
                "probe guest: expected a write of {PROBE_VALUE:#x} to port {PROBE_PORT:#x}, got {other:?}"
            ))
        }
    }
    match vcpu.run().map_err(|e| format!("KVM_RUN: {e}"))? {
        VcpuExit::Hlt => Ok(()),
        other => Err(format!("probe guest: expected HLT, got {other:?}")),
    }
}

/// The open-file limit a VMM asks for: virtio-fs (fuse-backend-rs passthrough) holds one
/// descriptor per inode the guest has looked up, so a container rootfs with tens of thousands of
/// files needs far more than the usual 1024 (or init's 4096); vsock holds one host socket per
/// connection besides. virtiofsd asks for the same million.
pub const WANTED_FD_LIMIT: u64 = 1 << 20;

/// Raises this process's open-file limit towards [`WANTED_FD_LIMIT`]: both limits when the
/// process may (root, and no more than `fs.nr_open`), else the soft limit up to the hard one.
/// Returns the soft limit now in force.
pub fn raise_fd_limit() -> std::io::Result<u64> {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: `limit` is a valid out-pointer for getrlimit.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let nr_open = fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|text| text.trim().parse::<u64>().ok())
        .unwrap_or(WANTED_FD_LIMIT);
    let wanted = WANTED_FD_LIMIT.min(nr_open);
    if limit.rlim_max < wanted {
        let raised = libc::rlimit { rlim_cur: wanted, rlim_max: wanted };
        // SAFETY: `raised` is an initialised rlimit; raising the hard limit needs
        // CAP_SYS_RESOURCE, and without it the call fails with EPERM and changes nothing.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            return Ok(wanted);
        }
    }
    if limit.rlim_cur < limit.rlim_max {
        limit.rlim_cur = limit.rlim_max;
        // SAFETY: `limit` is an initialised rlimit; raising the soft limit up to the hard one needs
        // no privilege.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(limit.rlim_cur)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake_sysfs(modules: &[&str]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for module in modules {
            fs::create_dir_all(dir.path().join(module).join("parameters")).unwrap();
        }
        dir
    }

    #[test]
    fn pvm_module_wins_over_cpu_flags() {
        let sysfs = fake_sysfs(&["kvm", "kvm_pvm"]);
        fs::write(sysfs.path().join("kvm_pvm/parameters/pvm_native"), "Y\n").unwrap();
        assert_eq!(
            detect_kind(sysfs.path(), "flags : fpu vmx hypervisor"),
            KvmKind::Pvm { native_mode: true }
        );
    }

    #[test]
    fn hypervisor_flag_means_nested() {
        let sysfs = fake_sysfs(&["kvm", "kvm_amd"]);
        assert_eq!(
            detect_kind(sysfs.path(), "flags\t\t: fpu svm hypervisor\n"),
            KvmKind::Nested { vendor: CpuVendor::Amd }
        );
        let sysfs = fake_sysfs(&["kvm", "kvm_intel"]);
        assert_eq!(
            detect_kind(sysfs.path(), "flags\t\t: fpu vmx\n"),
            KvmKind::Hardware { vendor: CpuVendor::Intel }
        );
        assert_eq!(detect_kind(fake_sysfs(&["kvm"]).path(), ""), KvmKind::Unknown);
    }

    #[test]
    fn pvm_is_reported_unusable_even_when_the_probe_runs() {
        let report = KvmReport {
            kind: KvmKind::Pvm { native_mode: true },
            api_version: KVM_API_VERSION,
            max_vcpus: 1024,
            missing_caps: vec![],
            vm_probe: Ok(()),
        };
        let reason = report.usable().unwrap_err();
        assert!(reason.contains("PVM") && reason.contains("user space"), "{reason}");
    }
}
