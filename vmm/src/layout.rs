//! Guest physical memory layout (x86_64), the same shape Firecracker and Cloud Hypervisor use.
//!
//! ```text
//! 0x0000_0500  GDT                    0x0000_7000  zero page (boot_params)
//! 0x0000_8ff0  boot stack top         0x0000_9000  PML4, 0xa000 PDPT, 0xb000 PD (identity map 0-1 GiB)
//! 0x0002_0000  kernel command line    0x0009_fc00  EBDA: MP table
//! 0x0010_0000  high memory: kernel (vmlinux loads at its physical address, 16 MiB for ours)
//! ...          initrd at the top of low RAM, page aligned
//! 0xd000_0000  32-bit MMIO gap (virtio-mmio devices), up to 4 GiB; RAM above continues at 4 GiB
//! ```

/// Global descriptor table.
pub const GDT_START: u64 = 0x500;
/// Interrupt descriptor table (empty; the kernel installs its own).
pub const IDT_START: u64 = 0x520;
/// `boot_params` ("zero page").
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack pointer.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Page-map level 4 table of the boot identity map.
pub const PML4_START: u64 = 0x9000;
/// Page-directory-pointer table.
pub const PDPT_START: u64 = 0xa000;
/// Page directory (512 × 2 MiB pages = 1 GiB identity mapped).
pub const PD_START: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// Longest command line accepted (the kernel's COMMAND_LINE_SIZE on x86_64).
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// Extended BIOS data area, where the MP table lives; RAM below it is usable by the guest.
pub const EBDA_START: u64 = 0x9fc00;
/// Start of high memory (1 MiB); the kernel is loaded at or above it.
pub const HIMEM_START: u64 = 0x10_0000;
/// Start of the 32-bit MMIO gap below 4 GiB.
pub const MMIO_GAP_START: u64 = 0xd000_0000;
/// End of the 32-bit MMIO gap.
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// Address of the IOAPIC.
pub const IOAPIC_ADDR: u32 = 0xfec0_0000;
/// Address of the local APIC.
pub const APIC_ADDR: u32 = 0xfee0_0000;
/// KVM's TSS (three pages) sits just below the IOAPIC-less top of the 32-bit space.
pub const KVM_TSS_ADDR: u64 = 0xfffb_d000;
/// KVM's identity-map page for real-mode emulation on Intel, just below the TSS.
pub const KVM_IDENTITY_MAP_ADDR: u64 = 0xfffb_c000;

/// RAM regions for `mem_bytes` of guest memory: below the MMIO gap, and the rest above 4 GiB.
pub fn ram_regions(mem_bytes: u64) -> Vec<(u64, u64)> {
    if mem_bytes <= MMIO_GAP_START {
        vec![(0, mem_bytes)]
    } else {
        vec![(0, MMIO_GAP_START), (MMIO_GAP_END, mem_bytes - MMIO_GAP_START)]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_above_the_gap_moves_past_4_gib() {
        assert_eq!(ram_regions(512 << 20), vec![(0, 512 << 20)]);
        assert_eq!(
            ram_regions(4 << 30),
            vec![(0, MMIO_GAP_START), (MMIO_GAP_END, (4 << 30) - MMIO_GAP_START)]
        );
    }
}
