//! The boot benchmark runs and prints every named figure for Husk and the QEMU microvm baseline
//! (one run, debug binaries: this checks the benchmark works, not the numbers; `make bench` measures).

// Test code: a failed expectation is a test failure.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::time::Duration;

use husk_tests::{assert_figure_records, run_benchmark};

#[test]
fn the_boot_benchmark_prints_husk_and_qemu_figures_side_by_side() {
    let qemu = Path::new("/usr/bin/qemu-system-x86_64");
    assert!(qemu.exists(), "qemu-system-x86_64 is needed for the baseline (package qemu-system-x86)");
    let files = [qemu, Path::new("/usr/share/qemu")];
    let text = run_benchmark("husk-bench-boot", &["--runs", "1"], &files, Duration::from_secs(300));
    for figure in ["vmm_setup_ms", "boot_to_init_ms", "start_to_ready_ms", "vmm_rss_overhead_mib"] {
        let row =
            text.lines().find(|l| l.starts_with(figure)).unwrap_or_else(|| panic!("no {figure} row: {text}"));
        let husk: f64 = row.split_whitespace().nth(1).and_then(|v| v.parse().ok()).unwrap_or(f64::NAN);
        assert!(husk > 0.0, "{figure} has no Husk value: {row}");
    }
    let side_by_side = text.lines().find(|l| l.starts_with("start_to_ready_ms")).unwrap();
    let qemu_value: f64 =
        side_by_side.split_whitespace().nth(2).and_then(|v| v.parse().ok()).unwrap_or(f64::NAN);
    assert!(qemu_value > 0.0, "no QEMU baseline: {side_by_side}");
    assert_figure_records(&text, &["start_to_ready_ms", "boot_to_agent_ms", "vmm_rss_overhead_mib"]);
}
