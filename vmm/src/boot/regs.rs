//! Initial vCPU state for the Linux 64-bit boot protocol: long mode with an identity-mapped first
//! GiB, a flat GDT, `rsi` pointing at the zero page; plus FPU, MSRs and the local APIC's LINT pins.

use kvm_bindings::{kvm_fpu, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs, Msrs};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress, GuestMemory};

use crate::layout::{
    BOOT_STACK_POINTER, GDT_START, IDT_START, PDPT_START, PD_START, PML4_START, ZERO_PAGE_START,
};

/// Errors setting up a vCPU's boot state.
#[derive(Debug, thiserror::Error)]
pub enum RegsError {
    #[error("writing boot tables (GDT, IDT, page tables) to guest memory")]
    Tables,
    #[error("{what}: {cause}")]
    Kvm { what: &'static str, cause: kvm_ioctls::Error },
    #[error("KVM accepted {set} of {wanted} boot MSRs")]
    Msrs { set: usize, wanted: usize },
    #[error("building the MSR list: {0:?}")]
    MsrList(vmm_sys_util::fam::Error),
}

fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> RegsError {
    move |cause| RegsError::Kvm { what, cause }
}

const X86_CR0_PE: u64 = 0x1;
const X86_CR0_PG: u64 = 0x8000_0000;
const X86_CR4_PAE: u64 = 0x20;
const EFER_LME: u64 = 0x100;
const EFER_LMA: u64 = 0x400;
/// Present + writable; `PAGE_HUGE` marks a 2 MiB page in the page directory.
const PAGE_PRESENT_RW: u64 = 0x3;
const PAGE_HUGE: u64 = 0x80;

/// GDT: null, 64-bit code, data, TSS (the kernel replaces it at once).
pub const GDT: [u64; 4] =
    [0, gdt_entry(0xa09b, 0, 0xfffff), gdt_entry(0xc093, 0, 0xfffff), gdt_entry(0x808b, 0, 0xfffff)];

/// Packs a segment descriptor from its flags (access byte and flags nibble), base and limit.
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << 32)
        | ((flags as u64 & 0xf0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << 32)
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
}

/// The KVM segment register matching GDT entry `index`.
pub fn segment(index: usize) -> kvm_segment {
    let entry = GDT[index];
    let bit = |n: u32| ((entry >> n) & 1) as u8;
    let granular = bit(55) == 1;
    let raw_limit = (((entry >> 32) & 0x000f_0000) | (entry & 0xffff)) as u32;
    let present = bit(47);
    kvm_segment {
        base: ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000),
        limit: if granular { (raw_limit << 12) | 0xfff } else { raw_limit },
        selector: (index * 8) as u16,
        type_: ((entry >> 40) & 0xf) as u8,
        present,
        dpl: ((entry >> 45) & 0x3) as u8,
        db: bit(54),
        s: bit(44),
        l: bit(53),
        g: bit(55),
        avl: bit(52),
        unusable: if present == 1 { 0 } else { 1 },
        padding: 0,
    }
}

/// Writes the GDT, an empty IDT and the identity map of the first GiB (2 MiB pages).
pub fn write_boot_tables<M: GuestMemory>(mem: &M) -> Result<(), RegsError> {
    let gdt: Vec<u8> = GDT.iter().flat_map(|e| e.to_le_bytes()).collect();
    mem.write_slice(&gdt, GuestAddress(GDT_START)).map_err(|_| RegsError::Tables)?;
    mem.write_obj(0u64, GuestAddress(IDT_START)).map_err(|_| RegsError::Tables)?;
    mem.write_obj(PDPT_START | PAGE_PRESENT_RW, GuestAddress(PML4_START)).map_err(|_| RegsError::Tables)?;
    mem.write_obj(PD_START | PAGE_PRESENT_RW, GuestAddress(PDPT_START)).map_err(|_| RegsError::Tables)?;
    let pd: Vec<u8> =
        (0..512u64).flat_map(|i| ((i << 21) | PAGE_PRESENT_RW | PAGE_HUGE).to_le_bytes()).collect();
    mem.write_slice(&pd, GuestAddress(PD_START)).map_err(|_| RegsError::Tables)
}

/// Special registers for long mode with the tables of [`write_boot_tables`].
pub fn long_mode_sregs(mut sregs: kvm_sregs) -> kvm_sregs {
    sregs.gdt.base = GDT_START;
    sregs.gdt.limit = (std::mem::size_of_val(&GDT) - 1) as u16;
    sregs.idt.base = IDT_START;
    sregs.idt.limit = 7;
    sregs.cs = segment(1);
    let data = segment(2);
    (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss) = (data, data, data, data, data);
    sregs.tr = segment(3);
    sregs.cr3 = PML4_START;
    sregs.cr4 |= X86_CR4_PAE;
    sregs.cr0 |= X86_CR0_PE | X86_CR0_PG;
    sregs.efer |= EFER_LME | EFER_LMA;
    sregs
}

/// General registers at the kernel's 64-bit entry point.
pub fn boot_regs(entry: u64) -> kvm_regs {
    kvm_regs {
        rflags: 0x2,
        rip: entry,
        rsp: BOOT_STACK_POINTER,
        rbp: BOOT_STACK_POINTER,
        rsi: ZERO_PAGE_START,
        ..Default::default()
    }
}

/// MSRs a freshly reset x86 CPU would have, as Linux expects them at entry.
pub fn boot_msrs() -> Vec<kvm_msr_entry> {
    const MSR_IA32_TSC: u32 = 0x10;
    const MSR_IA32_SYSENTER_CS: u32 = 0x174;
    const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
    const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
    const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
    const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
    const MSR_STAR: u32 = 0xc000_0081;
    const MSR_LSTAR: u32 = 0xc000_0082;
    const MSR_CSTAR: u32 = 0xc000_0083;
    const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
    const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
    const MISC_ENABLE_FAST_STRING: u64 = 1;
    const MTRR_ENABLE_WRITEBACK: u64 = (1 << 11) | 6;
    let entry = |index, data| kvm_msr_entry { index, data, ..Default::default() };
    vec![
        entry(MSR_IA32_SYSENTER_CS, 0),
        entry(MSR_IA32_SYSENTER_ESP, 0),
        entry(MSR_IA32_SYSENTER_EIP, 0),
        entry(MSR_STAR, 0),
        entry(MSR_CSTAR, 0),
        entry(MSR_KERNEL_GS_BASE, 0),
        entry(MSR_SYSCALL_MASK, 0),
        entry(MSR_LSTAR, 0),
        entry(MSR_IA32_TSC, 0),
        entry(MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        entry(MSR_MTRR_DEF_TYPE, MTRR_ENABLE_WRITEBACK),
    ]
}

/// Puts `vcpu` in the state the Linux 64-bit boot protocol requires, entering at `entry`.
pub fn setup_vcpu(vcpu: &VcpuFd, entry: u64) -> Result<(), RegsError> {
    let sregs = vcpu.get_sregs().map_err(kvm("KVM_GET_SREGS"))?;
    vcpu.set_sregs(&long_mode_sregs(sregs)).map_err(kvm("KVM_SET_SREGS"))?;
    vcpu.set_regs(&boot_regs(entry)).map_err(kvm("KVM_SET_REGS"))?;
    setup_fpu_msrs_lapic(vcpu)
}

/// FPU, MSRs and LAPIC, for every vCPU (application processors start through INIT/SIPI).
pub fn setup_fpu_msrs_lapic(vcpu: &VcpuFd) -> Result<(), RegsError> {
    let fpu = kvm_fpu { fcw: 0x37f, mxcsr: 0x1f80, ..Default::default() };
    vcpu.set_fpu(&fpu).map_err(kvm("KVM_SET_FPU"))?;
    let entries = boot_msrs();
    let msrs = Msrs::from_entries(&entries).map_err(RegsError::MsrList)?;
    let set = vcpu.set_msrs(&msrs).map_err(kvm("KVM_SET_MSRS"))?;
    if set != entries.len() {
        return Err(RegsError::Msrs { set, wanted: entries.len() });
    }
    let mut lapic = vcpu.get_lapic().map_err(kvm("KVM_GET_LAPIC"))?;
    set_lint_delivery(&mut lapic.regs, LAPIC_LVT_LINT0, DELIVERY_EXTINT);
    set_lint_delivery(&mut lapic.regs, LAPIC_LVT_LINT1, DELIVERY_NMI);
    vcpu.set_lapic(&lapic).map_err(kvm("KVM_SET_LAPIC"))
}

const LAPIC_LVT_LINT0: usize = 0x350;
const LAPIC_LVT_LINT1: usize = 0x360;
const DELIVERY_NMI: u32 = 4;
const DELIVERY_EXTINT: u32 = 7;

/// Sets the delivery mode (bits 8-10) of the LVT register at `offset` in the LAPIC register page.
fn set_lint_delivery(regs: &mut [std::os::raw::c_char; 1024], offset: usize, mode: u32) {
    let mut bytes = [0u8; 4];
    for (b, r) in bytes.iter_mut().zip(&regs[offset..offset + 4]) {
        *b = *r as u8;
    }
    let value = (u32::from_le_bytes(bytes) & !0x700) | (mode << 8);
    for (r, b) in regs[offset..offset + 4].iter_mut().zip(value.to_le_bytes()) {
        *r = b as std::os::raw::c_char;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    #[test]
    fn gdt_entries_decode_to_flat_long_mode_segments() {
        let code = segment(1);
        assert_eq!((code.base, code.limit, code.selector), (0, 0xffff_ffff, 8));
        assert_eq!((code.l, code.db, code.present, code.s, code.type_), (1, 0, 1, 1, 0xb));
        let data = segment(2);
        assert_eq!((data.db, data.l, data.type_, data.selector), (1, 0, 3, 16));
        assert_eq!(segment(0).unusable, 1);
    }

    #[test]
    fn long_mode_is_enabled_with_our_page_tables() {
        let sregs = long_mode_sregs(kvm_sregs::default());
        assert_eq!(sregs.cr3, PML4_START);
        assert_ne!(sregs.cr0 & X86_CR0_PG, 0);
        assert_ne!(sregs.efer & EFER_LMA, 0);
        let regs = boot_regs(0x100_0000);
        assert_eq!((regs.rip, regs.rsi), (0x100_0000, ZERO_PAGE_START));
    }

    #[test]
    fn the_identity_map_covers_the_first_gib_with_2mib_pages() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        write_boot_tables(&mem).unwrap();
        let pml4: u64 = mem.read_obj(GuestAddress(PML4_START)).unwrap();
        assert_eq!(pml4 & !0xfff, PDPT_START);
        let last: u64 = mem.read_obj(GuestAddress(PD_START + 511 * 8)).unwrap();
        assert_eq!(last, (511 << 21) | PAGE_PRESENT_RW | PAGE_HUGE);
    }

    #[test]
    fn lint_delivery_modes_keep_other_bits() {
        let mut regs = [0 as std::os::raw::c_char; 1024];
        regs[LAPIC_LVT_LINT0] = 0x1f; // vector bits stay
        set_lint_delivery(&mut regs, LAPIC_LVT_LINT0, DELIVERY_EXTINT);
        assert_eq!(regs[LAPIC_LVT_LINT0] as u8, 0x1f);
        assert_eq!(regs[LAPIC_LVT_LINT0 + 1] as u8 & 0x7, 7);
    }
}
