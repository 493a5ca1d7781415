//! Intel MultiProcessor Specification 1.4 table: how the guest learns its CPUs, the IOAPIC and the
//! interrupt routing without ACPI. Without it Linux boots one CPU and scans 0xF0000 in 16-byte steps.

use vm_memory::{Bytes, GuestAddress, GuestMemory};

use crate::layout::{APIC_ADDR, EBDA_START, IOAPIC_ADDR};

/// IOAPIC pins routed 1:1 to GSIs (legacy ISA IRQs 0-15, virtio-mmio devices above).
pub const IOAPIC_PINS: u8 = 24;
/// The most vCPUs whose entries fit in the 1 KiB EBDA next to everything else.
pub const MAX_VCPUS: u8 = 32;

const FLOATING_POINTER_LEN: usize = 16;
const HEADER_LEN: usize = 44;
const LAPIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const CPU_ENABLED: u8 = 1;
const CPU_BOOT_PROCESSOR: u8 = 2;
const INTERRUPT_INT: u8 = 0;
const INTERRUPT_NMI: u8 = 1;
const INTERRUPT_EXTINT: u8 = 3;

/// Errors building or writing the MP table.
#[derive(Debug, thiserror::Error)]
pub enum MpTableError {
    #[error("{0} vCPUs requested; the MP table describes 1 to {MAX_VCPUS}")]
    VcpuCount(u8),
    #[error("the MP table does not fit in guest memory at {EBDA_START:#x}")]
    Write,
}

/// The table's bytes, to be placed at [`EBDA_START`]: the floating pointer, then the
/// configuration table it points to.
pub fn build(num_vcpus: u8) -> Result<Vec<u8>, MpTableError> {
    if num_vcpus == 0 || num_vcpus > MAX_VCPUS {
        return Err(MpTableError::VcpuCount(num_vcpus));
    }
    let ioapic_id = num_vcpus; // IDs 0..num_vcpus are the local APICs
    let mut entries = Vec::new();
    let mut count: u16 = 0;
    for cpu in 0..num_vcpus {
        let flags = CPU_ENABLED | if cpu == 0 { CPU_BOOT_PROCESSOR } else { 0 };
        entries.extend_from_slice(&[0, cpu, LAPIC_VERSION, flags]);
        entries.extend_from_slice(&0x600u32.to_le_bytes()); // CPU signature: family 6
        entries.extend_from_slice(&0x201u32.to_le_bytes()); // features: FPU, APIC
        entries.extend_from_slice(&[0; 8]);
        count += 1;
    }
    entries.extend_from_slice(&[1, 0]);
    entries.extend_from_slice(b"ISA   ");
    count += 1;
    entries.extend_from_slice(&[2, ioapic_id, IOAPIC_VERSION, 1]);
    entries.extend_from_slice(&IOAPIC_ADDR.to_le_bytes());
    count += 1;
    for pin in 0..IOAPIC_PINS {
        entries.extend_from_slice(&[3, INTERRUPT_INT, 0, 0, 0, pin, ioapic_id, pin]);
        count += 1;
    }
    // LINT0 of the boot CPU takes ExtINT (the PIC); LINT1 of every CPU takes NMI.
    entries.extend_from_slice(&[4, INTERRUPT_EXTINT, 0, 0, 0, 0, 0, 0]);
    entries.extend_from_slice(&[4, INTERRUPT_NMI, 0, 0, 0, 0, 0xff, 1]);
    count += 2;

    let table_len = HEADER_LEN + entries.len();
    let mut header = Vec::with_capacity(table_len);
    header.extend_from_slice(b"PCMP");
    header.extend_from_slice(&(table_len as u16).to_le_bytes());
    header.extend_from_slice(&[4, 0]); // spec revision 1.4, checksum (filled below)
    header.extend_from_slice(b"HUSK    ");
    header.extend_from_slice(b"HUSK-VMM    ");
    header.extend_from_slice(&[0; 4]); // OEM table pointer
    header.extend_from_slice(&[0; 2]); // OEM table size
    header.extend_from_slice(&count.to_le_bytes());
    header.extend_from_slice(&APIC_ADDR.to_le_bytes());
    header.extend_from_slice(&[0; 4]); // extended table length, checksum, reserved
    header.extend_from_slice(&entries);
    header[7] = checksum(&header);

    let mut table = Vec::with_capacity(FLOATING_POINTER_LEN + table_len);
    table.extend_from_slice(b"_MP_");
    table.extend_from_slice(&((EBDA_START as u32) + FLOATING_POINTER_LEN as u32).to_le_bytes());
    table.extend_from_slice(&[1, 4, 0, 0, 0, 0, 0, 0]); // length 1 (16 bytes), rev 1.4, checksum, features
    table[10] = checksum(&table);
    table.extend_from_slice(&header);
    Ok(table)
}

/// Writes the MP table for `num_vcpus` into guest memory at [`EBDA_START`].
pub fn write<M: GuestMemory>(mem: &M, num_vcpus: u8) -> Result<(), MpTableError> {
    let table = build(num_vcpus)?;
    mem.write_slice(&table, GuestAddress(EBDA_START)).map_err(|_| MpTableError::Write)
}

/// The byte that makes the sum of `bytes` (including it, currently 0) zero.
fn checksum(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0u8, |sum, b| sum.wrapping_add(*b)).wrapping_neg()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |s, b| s.wrapping_add(*b))
    }

    #[test]
    fn structures_checksum_to_zero_and_point_at_each_other() {
        let table = build(4).unwrap();
        assert_eq!(&table[..4], b"_MP_");
        assert_eq!(sum(&table[..16]), 0);
        let pointer = u32::from_le_bytes(table[4..8].try_into().unwrap()) as u64;
        assert_eq!(pointer, EBDA_START + 16);
        let config = &table[16..];
        assert_eq!(&config[..4], b"PCMP");
        let len = u16::from_le_bytes([config[4], config[5]]) as usize;
        assert_eq!(len, config.len());
        assert_eq!(sum(config), 0);
        assert!(table.len() <= 1024, "fits the EBDA's first KiB");
    }

    #[test]
    fn every_vcpu_has_an_enabled_processor_entry_and_only_cpu0_boots() {
        let table = build(3).unwrap();
        let entries = &table[16 + HEADER_LEN..];
        let cpus: Vec<&[u8]> = entries.chunks(20).take(3).collect();
        for (id, entry) in cpus.iter().enumerate() {
            assert_eq!(entry[0], 0, "processor entry");
            assert_eq!(entry[1] as usize, id, "APIC id");
            assert_ne!(entry[3] & CPU_ENABLED, 0);
            assert_eq!(entry[3] & CPU_BOOT_PROCESSOR != 0, id == 0);
        }
        let count = u16::from_le_bytes([table[16 + 34], table[16 + 35]]);
        assert_eq!(count as usize, 3 + 1 + 1 + IOAPIC_PINS as usize + 2);
    }

    #[test]
    fn vcpu_counts_outside_the_table_are_refused() {
        assert!(matches!(build(0), Err(MpTableError::VcpuCount(0))));
        assert!(build(MAX_VCPUS).unwrap().len() <= 1024);
        assert!(matches!(build(MAX_VCPUS + 1), Err(MpTableError::VcpuCount(_))));
    }
}
