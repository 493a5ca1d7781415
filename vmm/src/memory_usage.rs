//! How much memory the VMM process uses besides the guest's own RAM, read from `/proc/self`.

use std::fs;
use std::ops::Range;

/// Resident memory of this process, split into guest RAM and everything else.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryUsage {
    /// `VmRSS` of the process, KiB.
    pub total_kib: u64,
    /// Resident pages of the guest RAM mappings (what the guest touched), KiB.
    pub guest_kib: u64,
}

impl MemoryUsage {
    /// The VMM's own footprint: process RSS minus touched guest RAM, in MiB.
    pub fn overhead_mib(&self) -> f64 {
        self.total_kib.saturating_sub(self.guest_kib) as f64 / 1024.0
    }

    /// Measures this process, counting mappings that start inside `guest_ranges` (host virtual
    /// addresses) as guest RAM. `None` when `/proc/self` cannot be read.
    pub fn measure(guest_ranges: &[Range<u64>]) -> Option<MemoryUsage> {
        let status = fs::read_to_string("/proc/self/status").ok()?;
        let smaps = fs::read_to_string("/proc/self/smaps").ok()?;
        Some(MemoryUsage { total_kib: vm_rss_kib(&status)?, guest_kib: rss_within(&smaps, guest_ranges) })
    }
}

fn vm_rss_kib(status: &str) -> Option<u64> {
    status.lines().find_map(|line| line.strip_prefix("VmRSS:")?.split_whitespace().next()?.parse().ok())
}

/// Sums the `Rss:` of every smaps mapping whose start address lies in one of `ranges`.
fn rss_within(smaps: &str, ranges: &[Range<u64>]) -> u64 {
    let mut inside = false;
    let mut total = 0;
    for line in smaps.lines() {
        if let Some(start) = mapping_start(line) {
            inside = ranges.iter().any(|r| r.contains(&start));
        } else if inside {
            if let Some(kib) =
                line.strip_prefix("Rss:").and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            {
                total += kib;
            }
        }
    }
    total
}

/// The start address of an smaps mapping header (`7f12a000-7f12b000 rw-p ...`).
fn mapping_start(line: &str) -> Option<u64> {
    let (range, _) = line.split_once(' ')?;
    let (start, end) = range.split_once('-')?;
    u64::from_str_radix(end, 16).ok()?;
    u64::from_str_radix(start, 16).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMAPS: &str = "\
55d0c0000000-55d0c0100000 r-xp 00000000 fd:01 123 /usr/bin/husk-vmm
Size:               1024 kB
Rss:                 800 kB
7f0000000000-7f0010000000 rw-p 00000000 00:00 0
Size:             262144 kB
Rss:               40960 kB
7fff00000000-7fff00021000 rw-p 00000000 00:00 0 [stack]
Rss:                  12 kB
";

    #[test]
    fn guest_rss_counts_only_mappings_inside_guest_ranges() {
        let guest = 0x7f00_0000_0000..0x7f00_1000_0000;
        assert_eq!(rss_within(SMAPS, std::slice::from_ref(&guest)), 40960);
        assert_eq!(rss_within(SMAPS, &[]), 0);
    }

    #[test]
    fn overhead_is_total_minus_guest() {
        let status = "Name:\thusk-vmm\nVmRSS:\t   46000 kB\n";
        let usage = MemoryUsage { total_kib: vm_rss_kib(status).unwrap(), guest_kib: 40960 };
        assert!((usage.overhead_mib() - 4.921875).abs() < 1e-9);
    }

    #[test]
    fn this_process_can_be_measured() {
        let usage = MemoryUsage::measure(&[]).unwrap();
        assert!(usage.total_kib > 0);
        assert_eq!(usage.guest_kib, 0);
    }
}
