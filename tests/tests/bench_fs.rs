//! The virtio-fs benchmark runs through the real VM path and prints every named figure beside the
//! same workload on the host directory (small sizes, debug binaries: this checks the benchmark
//! works, not the numbers; `make bench` measures).

// Test code: a failed expectation is a test failure.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use husk_tests::{combined, describe, guest_dir, run, target_bin, VmHost};

/// `name=<value>` in `line`, parsed.
fn value(line: &str, name: &str) -> f64 {
    line.split_whitespace()
        .find_map(|word| word.strip_prefix(name)?.strip_prefix('=')?.parse().ok())
        .unwrap_or(f64::NAN)
}

#[test]
fn the_virtio_fs_benchmark_prints_each_figure_beside_the_host_directory() {
    let (bench, vmm, guest) = (target_bin("husk-bench-fs"), target_bin("husk-vmm"), guest_dir());
    let (kernel, initrd) = (guest.join("vmlinux"), guest.join("initramfs.cpio"));
    let args = [
        bench.to_str().unwrap(),
        "--vmm",
        vmm.to_str().unwrap(),
        "--kernel",
        kernel.to_str().unwrap(),
        "--initrd",
        initrd.to_str().unwrap(),
        "--mib",
        "4",
        "--files",
        "100",
        "--runs",
        "1",
    ];
    let output = run(&mut VmHost::detect().command(Duration::from_secs(400), &args));
    assert_eq!(output.status.code(), Some(0), "{}", describe(&output));
    let text = combined(&output);
    for figure in [
        "virtiofs_seq_write_mb_per_s",
        "virtiofs_seq_read_mb_per_s",
        "virtiofs_create_per_s",
        "virtiofs_stat_per_s",
    ] {
        let line = text
            .lines()
            .find(|l| l.starts_with(&format!("{figure}=")))
            .unwrap_or_else(|| panic!("no {figure} line: {text}"));
        for name in [figure, "host", "ratio"] {
            assert!(value(line, name) > 0.0, "{figure}: no positive {name} value: {line}");
        }
    }
}
