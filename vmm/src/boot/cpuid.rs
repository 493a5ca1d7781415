//! CPUID as the guest sees it: what KVM supports (`KVM_GET_SUPPORTED_CPUID`), normalised so each
//! vCPU reports its own APIC id, a topology of `num_vcpus` single-threaded cores in one package, the
//! hypervisor bit, and no performance-monitoring unit (the VMM does not virtualise one).

use kvm_bindings::kvm_cpuid_entry2;

const LEAF_VENDOR: u32 = 0x0;
const LEAF_FEATURES: u32 = 0x1;
const LEAF_CACHE_PARAMS: u32 = 0x4;
const LEAF_PERFMON: u32 = 0xa;
const LEAF_EXT_TOPOLOGY: u32 = 0xb;
const LEAF_V2_EXT_TOPOLOGY: u32 = 0x1f;
const LEAF_AMD_EXT_FEATURES: u32 = 0x8000_0001;
const LEAF_AMD_SIZES: u32 = 0x8000_0008;
const LEAF_AMD_TOPOLOGY: u32 = 0x8000_001e;

const ECX_HYPERVISOR: u32 = 1 << 31;
const ECX_TSC_DEADLINE: u32 = 1 << 24;
const EDX_HTT: u32 = 1 << 28;
const AMD_ECX_CMP_LEGACY: u32 = 1 << 1;
const TOPOLOGY_LEVEL_SMT: u32 = 1;
const TOPOLOGY_LEVEL_CORE: u32 = 2;

/// CPU vendor, from leaf 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Vendor {
    Intel,
    Amd,
    Other,
}

/// The vendor named by leaf 0 of `entries`.
pub fn vendor(entries: &[kvm_cpuid_entry2]) -> Vendor {
    let Some(leaf0) = entries.iter().find(|e| e.function == LEAF_VENDOR) else {
        return Vendor::Other;
    };
    let mut id = [0u8; 12];
    id[..4].copy_from_slice(&leaf0.ebx.to_le_bytes());
    id[4..8].copy_from_slice(&leaf0.edx.to_le_bytes());
    id[8..].copy_from_slice(&leaf0.ecx.to_le_bytes());
    match &id {
        b"GenuineIntel" => Vendor::Intel,
        b"AuthenticAMD" => Vendor::Amd,
        _ => Vendor::Other,
    }
}

/// Bits needed to number `n` items (ceil(log2(n))).
fn id_bits(n: u8) -> u32 {
    (n.max(1) as u32).next_power_of_two().trailing_zeros()
}

/// Rewrites `entries` (as returned by `KVM_GET_SUPPORTED_CPUID`) for vCPU `vcpu_id` of `num_vcpus`.
pub fn normalize(entries: &mut [kvm_cpuid_entry2], vcpu_id: u8, num_vcpus: u8) {
    let vendor = vendor(entries);
    let apic_id = vcpu_id as u32;
    let cpus = num_vcpus.max(1) as u32;
    for entry in entries.iter_mut() {
        match entry.function {
            LEAF_FEATURES => {
                entry.ecx |= ECX_HYPERVISOR;
                // EBX: [31:24] initial APIC id, [23:16] logical processors per package.
                entry.ebx = (entry.ebx & 0x0000_ffff) | (apic_id << 24) | ((cpus & 0xff) << 16);
                if cpus > 1 {
                    entry.edx |= EDX_HTT;
                } else {
                    entry.edx &= !EDX_HTT;
                }
            }
            LEAF_CACHE_PARAMS if vendor == Vendor::Intel => {
                // EAX: [31:26] cores per package - 1, [25:14] logical CPUs sharing this cache - 1
                // (cores have one thread: only the shared last-level cache spans them).
                let cache_level = (entry.eax >> 5) & 0x7;
                let sharing = if cache_level >= 3 { cpus - 1 } else { 0 };
                entry.eax = (entry.eax & 0x3fff) | ((cpus - 1) << 26) | (sharing << 14);
            }
            LEAF_PERFMON => {
                entry.eax = 0;
                entry.ebx = 0;
                entry.ecx = 0;
                entry.edx = 0;
            }
            LEAF_EXT_TOPOLOGY | LEAF_V2_EXT_TOPOLOGY => {
                let (shift, count, level_type) = match entry.index {
                    0 => (0, 1, TOPOLOGY_LEVEL_SMT),
                    1 => (id_bits(num_vcpus), cpus, TOPOLOGY_LEVEL_CORE),
                    _ => (0, 0, 0),
                };
                entry.eax = shift;
                entry.ebx = count;
                entry.ecx = (level_type << 8) | (entry.index & 0xff);
                entry.edx = apic_id;
            }
            LEAF_AMD_EXT_FEATURES if vendor == Vendor::Amd => {
                if cpus > 1 {
                    entry.ecx |= AMD_ECX_CMP_LEGACY;
                } else {
                    entry.ecx &= !AMD_ECX_CMP_LEGACY;
                }
            }
            LEAF_AMD_SIZES if vendor == Vendor::Amd => {
                // ECX: [15:12] APIC id bits for cores, [7:0] cores per package - 1.
                entry.ecx = (entry.ecx & !0xf0ff) | (id_bits(num_vcpus) << 12) | (cpus - 1);
            }
            LEAF_AMD_TOPOLOGY if vendor == Vendor::Amd => {
                entry.eax = apic_id;
                entry.ebx = apic_id & 0xff; // compute unit id, one thread per unit
                entry.ecx = 0; // node 0, one node
                entry.edx = 0;
            }
            _ => {}
        }
    }
}

/// Advertises the LAPIC's TSC-deadline timer mode. `KVM_GET_SUPPORTED_CPUID` leaves the bit clear
/// because KVM emulates it in the in-kernel LAPIC (`KVM_CAP_TSC_DEADLINE_TIMER`); without it Linux
/// falls back to the periodic-calibrated LAPIC timer.
pub fn enable_tsc_deadline(entries: &mut [kvm_cpuid_entry2]) {
    for entry in entries.iter_mut().filter(|e| e.function == LEAF_FEATURES) {
        entry.ecx |= ECX_TSC_DEADLINE;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaf(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 { function, index, ..Default::default() }
    }

    fn vendor_leaf(name: &[u8; 12]) -> kvm_cpuid_entry2 {
        let word = |i: usize| u32::from_le_bytes(name[i..i + 4].try_into().unwrap());
        kvm_cpuid_entry2 { function: 0, ebx: word(0), edx: word(4), ecx: word(8), ..Default::default() }
    }

    fn find(entries: &[kvm_cpuid_entry2], function: u32, index: u32) -> kvm_cpuid_entry2 {
        *entries.iter().find(|e| e.function == function && e.index == index).unwrap()
    }

    #[test]
    fn leaf1_carries_apic_id_cpu_count_and_hypervisor_bit() {
        let mut entries =
            vec![vendor_leaf(b"GenuineIntel"), kvm_cpuid_entry2 { function: 1, ebx: 0x0800, ..leaf(1, 0) }];
        normalize(&mut entries, 2, 4);
        let l1 = find(&entries, 1, 0);
        assert_eq!(l1.ebx >> 24, 2);
        assert_eq!((l1.ebx >> 16) & 0xff, 4);
        assert_eq!(l1.ebx & 0xffff, 0x0800, "CLFLUSH size kept");
        assert_ne!(l1.ecx & ECX_HYPERVISOR, 0);
        assert_ne!(l1.edx & EDX_HTT, 0);

        normalize(&mut entries, 0, 1);
        assert_eq!(find(&entries, 1, 0).edx & EDX_HTT, 0, "one CPU: no HTT");
    }

    #[test]
    fn extended_topology_describes_single_thread_cores() {
        let mut entries = vec![vendor_leaf(b"GenuineIntel"), leaf(0xb, 0), leaf(0xb, 1), leaf(0xb, 2)];
        normalize(&mut entries, 3, 5);
        let (smt, core, end) = (find(&entries, 0xb, 0), find(&entries, 0xb, 1), find(&entries, 0xb, 2));
        assert_eq!((smt.eax, smt.ebx, smt.ecx >> 8), (0, 1, TOPOLOGY_LEVEL_SMT));
        assert_eq!((core.eax, core.ebx, core.ecx >> 8), (3, 5, TOPOLOGY_LEVEL_CORE), "5 CPUs need 3 id bits");
        assert_eq!(end.ecx >> 8, 0, "no further levels");
        assert!([smt, core, end].iter().all(|e| e.edx == 3), "x2APIC id");
    }

    #[test]
    fn amd_leaves_count_cores_and_number_them() {
        let mut entries = vec![vendor_leaf(b"AuthenticAMD"), leaf(0x8000_0008, 0), leaf(0x8000_001e, 0)];
        normalize(&mut entries, 1, 2);
        assert_eq!(vendor(&entries), Vendor::Amd);
        assert_eq!(find(&entries, 0x8000_0008, 0).ecx & 0xff, 1);
        assert_eq!((find(&entries, 0x8000_0008, 0).ecx >> 12) & 0xf, 1);
        assert_eq!(find(&entries, 0x8000_001e, 0).eax, 1);
    }

    #[test]
    fn tsc_deadline_is_advertised_in_leaf1() {
        let mut entries = vec![leaf(1, 0), leaf(7, 0)];
        enable_tsc_deadline(&mut entries);
        assert_ne!(find(&entries, 1, 0).ecx & ECX_TSC_DEADLINE, 0);
        assert_eq!(find(&entries, 7, 0).ecx, 0);
    }

    #[test]
    fn the_pmu_is_hidden() {
        let mut entries = vec![kvm_cpuid_entry2 { function: 0xa, eax: 0x0703_0402, ..leaf(0xa, 0) }];
        normalize(&mut entries, 0, 1);
        assert_eq!(find(&entries, 0xa, 0).eax, 0);
    }
}
