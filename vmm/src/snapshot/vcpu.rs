//! One vCPU's state: what KVM holds for it, taken while its thread is out of `KVM_RUN` with no
//! I/O exit left to complete (see `vcpu::run`), and given to a new vCPU in the order KVM needs.

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_debugregs, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_sregs,
    kvm_vcpu_events, kvm_xcrs, kvm_xsave, CpuId, Msrs, KVM_MAX_CPUID_ENTRIES, KVM_MAX_MSR_ENTRIES,
};
use kvm_ioctls::{Kvm, VcpuFd};
use serde::{Deserialize, Serialize};

use super::{kvm_error as kvm, SnapshotError};

/// `IA32_TSC`.
const MSR_IA32_TSC: u32 = 0x10;
/// `IA32_TSC_DEADLINE`: written after the TSC (KVM takes it relative to the TSC it has then).
const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;
/// The x2APIC registers: KVM refuses them while the APIC is in xAPIC mode, and the LAPIC state
/// holds them anyway.
const X2APIC_MSRS: std::ops::RangeInclusive<u32> = 0x800..=0x8ff;

/// A vCPU's registers and the state of its local APIC, as KVM reports them.
#[derive(Debug, Serialize, Deserialize)]
pub struct VcpuState {
    pub cpuid: Vec<kvm_cpuid_entry2>,
    pub mp_state: kvm_mp_state,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub xsave: kvm_xsave,
    pub xcrs: kvm_xcrs,
    pub debug_regs: kvm_debugregs,
    pub lapic: kvm_lapic_state,
    pub msrs: Vec<kvm_msr_entry>,
    pub events: kvm_vcpu_events,
}

/// The MSRs worth saving on this host: KVM's list of the ones it migrates, less the x2APIC range.
/// Some of them may still be unreadable for a given guest (a feature its CPUID does not have):
/// [`VcpuState::save`] leaves those out.
pub fn msrs_to_save(kvm_fd: &Kvm) -> Result<Vec<u32>, SnapshotError> {
    let list = kvm_fd.get_msr_index_list().map_err(kvm("KVM_GET_MSR_INDEX_LIST"))?;
    Ok(list.as_slice().iter().copied().filter(|index| !X2APIC_MSRS.contains(index)).collect())
}

impl VcpuState {
    /// Reads the state of a stopped `vcpu`, with the MSRs of `msr_indices` it can read. The order
    /// is KVM's: the MP state first (reading it makes KVM accept pending INIT/SIPI events, which
    /// changes the rest), the events last (the other reads may change them).
    pub fn save(vcpu: &VcpuFd, msr_indices: &[u32]) -> Result<VcpuState, SnapshotError> {
        let mp_state = vcpu.get_mp_state().map_err(kvm("KVM_GET_MP_STATE"))?;
        let regs = vcpu.get_regs().map_err(kvm("KVM_GET_REGS"))?;
        let sregs = vcpu.get_sregs().map_err(kvm("KVM_GET_SREGS"))?;
        let xsave = vcpu.get_xsave().map_err(kvm("KVM_GET_XSAVE"))?;
        let xcrs = vcpu.get_xcrs().map_err(kvm("KVM_GET_XCRS"))?;
        let debug_regs = vcpu.get_debug_regs().map_err(kvm("KVM_GET_DEBUGREGS"))?;
        let lapic = vcpu.get_lapic().map_err(kvm("KVM_GET_LAPIC"))?;
        let cpuid = vcpu.get_cpuid2(KVM_MAX_CPUID_ENTRIES).map_err(kvm("KVM_GET_CPUID2"))?;
        let mut msrs = readable_msrs(vcpu, msr_indices)?;
        fix_zero_tsc_deadline(&mut msrs);
        let events = vcpu.get_vcpu_events().map_err(kvm("KVM_GET_VCPU_EVENTS"))?;
        Ok(VcpuState {
            cpuid: cpuid.as_slice().to_vec(),
            mp_state,
            regs,
            sregs,
            xsave,
            xcrs,
            debug_regs,
            lapic,
            msrs,
            events,
        })
    }

    /// Gives this state to `vcpu`, a new vCPU of a VM whose interrupt controllers exist. The order
    /// is KVM's: CPUID first (the MSRs and XCR0 it accepts depend on it); the registers before the
    /// events (setting them drops pending exceptions); the system registers (APIC base) before the
    /// LAPIC, the LAPIC before the MSRs (the TSC deadline needs it), the TSC deadline after the TSC;
    /// the events last. `svm`: the host is AMD's (see [`tr_for_svm`]).
    pub fn restore(&self, vcpu: &VcpuFd, svm: bool) -> Result<(), SnapshotError> {
        let cpuid =
            CpuId::from_entries(&self.cpuid).map_err(|_| SnapshotError::Invalid("too many CPUID entries"))?;
        vcpu.set_cpuid2(&cpuid).map_err(kvm("KVM_SET_CPUID2"))?;
        vcpu.set_mp_state(self.mp_state).map_err(kvm("KVM_SET_MP_STATE"))?;
        vcpu.set_regs(&self.regs).map_err(kvm("KVM_SET_REGS"))?;
        let mut sregs = self.sregs;
        if svm {
            tr_for_svm(&mut sregs);
        }
        vcpu.set_sregs(&sregs).map_err(kvm("KVM_SET_SREGS"))?;
        // SAFETY: KVM reads one `kvm_xsave` (4 KiB) from the reference. It would read more only
        // for a guest given dynamically enabled XSAVE features (AMX), which needs a permission
        // this VMM never asks for (ARCH_REQ_XCOMP_GUEST_PERM).
        unsafe { vcpu.set_xsave(&self.xsave) }.map_err(kvm("KVM_SET_XSAVE"))?;
        vcpu.set_xcrs(&self.xcrs).map_err(kvm("KVM_SET_XCRS"))?;
        vcpu.set_debug_regs(&self.debug_regs).map_err(kvm("KVM_SET_DEBUGREGS"))?;
        vcpu.set_lapic(&self.lapic).map_err(kvm("KVM_SET_LAPIC"))?;
        let (deadline, others): (Vec<_>, Vec<_>) =
            self.msrs.iter().copied().partition(|entry| entry.index == MSR_IA32_TSC_DEADLINE);
        for chunk in others.chunks(KVM_MAX_MSR_ENTRIES).chain(std::iter::once(deadline.as_slice())) {
            set_msrs(vcpu, chunk)?;
        }
        vcpu.set_vcpu_events(&self.events).map_err(kvm("KVM_SET_VCPU_EVENTS"))?;
        // Tells the guest's kvmclock it was stopped, so its watchdogs do not take the gap since
        // the snapshot for a lockup. EINVAL: the guest has not enabled kvmclock.
        match vcpu.kvmclock_ctrl() {
            Err(err) if err.errno() != libc::EINVAL => Err(kvm("KVM_KVMCLOCK_CTRL")(err)),
            _ => Ok(()),
        }
    }
}

/// `TSS_BUSY` in a segment type.
const TSS_BUSY: u8 = 0x2;

/// On AMD, KVM reports the task register busy whatever its cached type (it adds the bit), while
/// the type the guest's own `LTR` left in the cache is "available" (9). AMD's processors do not
/// look at that type again, but QEMU's emulation of them (the nested test host) allows port I/O
/// from user space only through a TSS cached as available: a restored guest's `ioperm`'d port
/// writes (the agent's events to the VMM) would fault. (Intel's VM entry requires the busy type:
/// left alone there.)
fn tr_for_svm(sregs: &mut kvm_sregs) {
    sregs.tr.type_ &= !TSS_BUSY;
}

/// The values of the MSRs of `indices` that `vcpu` can read, in that order. KVM stops reading a
/// batch at the first MSR it refuses: that one is left out and the rest read on.
fn readable_msrs(vcpu: &VcpuFd, indices: &[u32]) -> Result<Vec<kvm_msr_entry>, SnapshotError> {
    let mut read = Vec::with_capacity(indices.len());
    let mut next = 0;
    while next < indices.len() {
        let batch = &indices[next..indices.len().min(next + KVM_MAX_MSR_ENTRIES)];
        let entries: Vec<kvm_msr_entry> =
            batch.iter().map(|&index| kvm_msr_entry { index, ..Default::default() }).collect();
        let mut msrs = Msrs::from_entries(&entries).map_err(|_| SnapshotError::Invalid("too many MSRs"))?;
        let count = vcpu.get_msrs(&mut msrs).map_err(kvm("KVM_GET_MSRS"))?.min(batch.len());
        read.extend_from_slice(&msrs.as_slice()[..count]);
        // KVM stopped at `batch[count]` (refused, skipped) or read the whole batch.
        next += if count < batch.len() { count + 1 } else { count };
    }
    Ok(read)
}

/// A TSC deadline of 0 (no timer armed at the snapshot) would arm none after the restore either,
/// and a guest that armed its timer just before could wait forever: Firecracker's fix, the
/// deadline set to the saved TSC, fires at once and lets the guest re-arm.
fn fix_zero_tsc_deadline(msrs: &mut [kvm_msr_entry]) {
    let Some(tsc) = msrs.iter().find(|entry| entry.index == MSR_IA32_TSC).map(|entry| entry.data) else {
        return;
    };
    for entry in msrs.iter_mut().filter(|entry| entry.index == MSR_IA32_TSC_DEADLINE && entry.data == 0) {
        entry.data = tsc;
    }
}

fn set_msrs(vcpu: &VcpuFd, entries: &[kvm_msr_entry]) -> Result<(), SnapshotError> {
    if entries.is_empty() {
        return Ok(());
    }
    let msrs = Msrs::from_entries(entries).map_err(|_| SnapshotError::Invalid("too many MSRs"))?;
    let set = vcpu.set_msrs(&msrs).map_err(kvm("KVM_SET_MSRS"))?;
    match entries.get(set) {
        Some(refused) => Err(SnapshotError::MsrRefused { index: refused.index }),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn on_amd_the_task_register_is_restored_available_as_ltr_left_it() {
        let mut sregs = kvm_sregs::default();
        sregs.tr.type_ = 11;
        tr_for_svm(&mut sregs);
        assert_eq!(sregs.tr.type_, 9);
    }

    #[test]
    fn a_zero_tsc_deadline_becomes_the_saved_tsc_and_an_armed_one_stays() {
        let entry = |index, data| kvm_msr_entry { index, data, ..Default::default() };
        let mut msrs = vec![entry(MSR_IA32_TSC, 5000), entry(MSR_IA32_TSC_DEADLINE, 0)];
        fix_zero_tsc_deadline(&mut msrs);
        assert_eq!(msrs[1].data, 5000);
        let mut msrs = vec![entry(MSR_IA32_TSC, 5000), entry(MSR_IA32_TSC_DEADLINE, 7000)];
        fix_zero_tsc_deadline(&mut msrs);
        assert_eq!(msrs[1].data, 7000);
    }
}
