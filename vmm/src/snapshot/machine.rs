//! The VM's own state in KVM: the interrupt controllers (both PICs, the IOAPIC), the PIT and the
//! kvmclock. Given to a new VM after its vCPUs have theirs (as Firecracker orders it).

use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, kvm_pit_state2, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::VmFd;
use serde::{Deserialize, Serialize};

use super::{kvm_error as kvm, SnapshotError};

const IRQCHIPS: [u32; 3] = [KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_IRQCHIP_IOAPIC];

/// The interrupt controllers, PIT and clock of a VM.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MachineState {
    /// PIC master, PIC slave, IOAPIC.
    pub irqchips: Vec<kvm_irqchip>,
    pub pit: kvm_pit_state2,
    pub clock: kvm_clock_data,
}

impl MachineState {
    /// Reads the state of `vm`, whose vCPUs are stopped.
    pub fn save(vm: &VmFd) -> Result<MachineState, SnapshotError> {
        let mut irqchips = Vec::with_capacity(IRQCHIPS.len());
        for chip_id in IRQCHIPS {
            let mut chip = kvm_irqchip { chip_id, ..Default::default() };
            vm.get_irqchip(&mut chip).map_err(kvm("KVM_GET_IRQCHIP"))?;
            irqchips.push(chip);
        }
        let pit = vm.get_pit2().map_err(kvm("KVM_GET_PIT2"))?;
        let clock = vm.get_clock().map_err(kvm("KVM_GET_CLOCK"))?;
        Ok(MachineState { irqchips, pit, clock })
    }

    /// Gives this state to `vm` (its interrupt controllers and PIT made, its vCPUs restored).
    /// The clock goes on from where it was saved, not from the host's time since: a template
    /// restored days later would otherwise see its monotonic clock leap, and its watchdogs fire
    /// (the agent sets the wall clock).
    pub fn restore(&self, vm: &VmFd) -> Result<(), SnapshotError> {
        if self.irqchips.len() != IRQCHIPS.len()
            || self.irqchips.iter().zip(IRQCHIPS).any(|(chip, id)| chip.chip_id != id)
        {
            return Err(SnapshotError::Invalid("interrupt controllers"));
        }
        vm.set_pit2(&self.pit).map_err(kvm("KVM_SET_PIT2"))?;
        let clock = kvm_clock_data { clock: self.clock.clock, ..Default::default() };
        vm.set_clock(&clock).map_err(kvm("KVM_SET_CLOCK"))?;
        for chip in &self.irqchips {
            vm.set_irqchip(chip).map_err(kvm("KVM_SET_IRQCHIP"))?;
        }
        Ok(())
    }
}
