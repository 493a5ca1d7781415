//! Runs inside the nested test host for its whole life (started by `tests/testhost/init`): holds
//! one idle KVM vCPU so that the test host kernel never live-patches its code when Husk's VMs come
//! and go.
//!
//! Why: KVM counts vCPUs whose local APIC is software-disabled in a static key
//! (`apic_sw_disabled`); every VM that starts takes it from 0 to 1 and, a second after its guest
//! enables the APIC, back to 0. Each transition rewrites kernel text with `text_poke_bp` (int3 plus
//! cross-CPU sync). Under QEMU's multi-threaded TCG that cross-modifying code occasionally wedges
//! both emulated CPUs for good (seen as a test host that stops printing, one vCPU spinning at
//! `asm_exc_int3`). One vCPU that never enables its APIC keeps the count above zero, so the key is
//! patched once, here, and never again.

use std::time::Duration;

use anyhow::{Context, Result};
use kvm_ioctls::Kvm;

fn main() -> Result<()> {
    let kvm = Kvm::new().context("opening /dev/kvm")?;
    let vm = kvm.create_vm().context("KVM_CREATE_VM")?;
    vm.create_irq_chip().context("KVM_CREATE_IRQCHIP")?;
    // Created with an in-kernel, software-disabled local APIC; never run, so it stays disabled.
    let _vcpu = vm.create_vcpu(0).context("KVM_CREATE_VCPU")?;
    println!("husk-testhost-pin-keys: holding one idle vCPU");
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}
