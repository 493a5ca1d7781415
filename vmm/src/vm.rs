//! The KVM virtual machine: guest memory, in-kernel interrupt controllers (PIC, IOAPIC, LAPICs)
//! and PIT, TSS and identity map.

use std::fs::File;
use std::os::raw::c_void;

use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Kvm, VmFd};
use vm_memory::{
    FileOffset, GuestAddress, GuestMemory, GuestMemoryMmap, GuestMemoryRegion, GuestRegionMmap, MmapRegion,
};

use crate::layout::{ram_regions, KVM_IDENTITY_MAP_ADDR, KVM_TSS_ADDR};

/// Errors creating the VM.
#[derive(Debug, thiserror::Error)]
pub enum VmSetupError {
    #[error("{what}: {cause}")]
    Kvm { what: &'static str, cause: kvm_ioctls::Error },
    #[error("allocating {mib} MiB of guest memory: {detail}")]
    Memory { mib: u64, detail: String },
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmSetupError {
    move |cause| VmSetupError::Kvm { what, cause }
}

/// A KVM VM and its memory.
///
/// Invariant: `fd` is declared before `memory`, so the VM (which holds the memory's host addresses)
/// is closed before the mappings are unmapped.
#[derive(Debug)]
pub struct Vm {
    fd: VmFd,
    memory: GuestMemoryMmap,
}

impl Vm {
    /// Creates a VM with `mem_bytes` of RAM laid out as [`ram_regions`] says.
    pub fn new(kvm: &Kvm, mem_bytes: u64) -> Result<Vm, VmSetupError> {
        let memory = GuestMemoryMmap::from_ranges(&guest_ranges(mem_bytes))
            .map_err(|e| VmSetupError::Memory { mib: mem_bytes >> 20, detail: e.to_string() })?;
        Vm::with_memory(kvm, memory)
    }

    /// Creates a VM whose `mem_bytes` of RAM (laid out as [`ram_regions`] says) start as the
    /// contents of `file` (the regions back to back, as [`crate::snapshot`] saves them), mapped
    /// privately: the guest's writes go to its own copies of the pages, never to the file, and
    /// pages it only reads stay shared with every other VM mapping the same file.
    pub fn from_memory_file(kvm: &Kvm, mem_bytes: u64, file: &File) -> Result<Vm, VmSetupError> {
        let error = |detail: String| VmSetupError::Memory { mib: mem_bytes >> 20, detail };
        let mut regions = Vec::new();
        let mut offset = 0u64;
        for (base, size) in guest_ranges(mem_bytes) {
            let file = file.try_clone().map_err(|e| error(format!("duplicating the memory file: {e}")))?;
            let mapping = MmapRegion::build(
                Some(FileOffset::new(file, offset)),
                size,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_NORESERVE,
            )
            .map_err(|e| error(format!("mapping the memory file at {offset:#x}: {e}")))?;
            let region = GuestRegionMmap::new(mapping, base)
                .ok_or_else(|| error(format!("region at {:#x} wraps around", base.0)))?;
            regions.push(region);
            offset += size as u64;
        }
        let memory = GuestMemoryMmap::from_regions(regions).map_err(|e| error(e.to_string()))?;
        Vm::with_memory(kvm, memory)
    }

    /// Creates the VM (TSS, identity map, in-kernel interrupt controllers and PIT) over `memory`.
    fn with_memory(kvm: &Kvm, memory: GuestMemoryMmap) -> Result<Vm, VmSetupError> {
        let fd = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
        fd.set_tss_address(KVM_TSS_ADDR as usize).map_err(kvm_err("KVM_SET_TSS_ADDR"))?;
        fd.set_identity_map_address(KVM_IDENTITY_MAP_ADDR).map_err(kvm_err("KVM_SET_IDENTITY_MAP_ADDR"))?;
        fd.create_irq_chip().map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
        let pit = kvm_pit_config { flags: KVM_PIT_SPEAKER_DUMMY, ..Default::default() };
        fd.create_pit2(pit).map_err(kvm_err("KVM_CREATE_PIT2"))?;

        let mib = memory.iter().map(|r| r.len()).sum::<u64>() >> 20;
        for (slot, region) in memory.iter().enumerate() {
            let host = memory
                .get_host_address(region.start_addr())
                .map_err(|e| VmSetupError::Memory { mib, detail: e.to_string() })?;
            let kvm_region = kvm_userspace_memory_region {
                slot: slot as u32,
                flags: 0,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: host.cast::<c_void>() as u64,
            };
            // SAFETY: the region is a live mapping owned by `memory`, which lives in the same `Vm` and
            // is dropped after `fd` (field order), and regions never overlap (built by `ram_regions`).
            unsafe { fd.set_user_memory_region(kvm_region) }
                .map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))?;
        }
        Ok(Vm { fd, memory })
    }

    /// The VM file descriptor.
    pub fn fd(&self) -> &VmFd {
        &self.fd
    }

    /// Guest memory.
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.memory
    }

    /// Guest RAM in bytes.
    pub fn mem_bytes(&self) -> u64 {
        self.memory.iter().map(|region| region.len()).sum()
    }

    /// Host virtual address ranges of guest RAM.
    pub fn host_ranges(&self) -> Vec<std::ops::Range<u64>> {
        self.memory
            .iter()
            .filter_map(|region| {
                let start = self.memory.get_host_address(region.start_addr()).ok()? as u64;
                Some(start..start + region.len())
            })
            .collect()
    }
}

/// Guest RAM's regions for `mem_bytes`, as guest addresses and sizes.
fn guest_ranges(mem_bytes: u64) -> Vec<(GuestAddress, usize)> {
    ram_regions(mem_bytes).into_iter().map(|(base, size)| (GuestAddress(base), size as usize)).collect()
}
