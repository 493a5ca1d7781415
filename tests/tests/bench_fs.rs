//! The virtio-fs benchmark runs through the real VM path and prints every named figure beside the
//! same workload on the host directory (small sizes, debug binaries: this checks the benchmark
//! works, not the numbers; `make bench` measures).

// Test code: a failed expectation is a test failure.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use husk_tests::{assert_figure_beside_baseline, assert_figure_records, run_benchmark};

#[test]
fn the_virtio_fs_benchmark_prints_each_figure_beside_the_host_directory() {
    let extra = ["--mib", "4", "--files", "100", "--runs", "1"];
    let text = run_benchmark("husk-bench-fs", &extra, &[], Duration::from_secs(400));
    for figure in [
        "virtiofs_seq_write_mb_per_s",
        "virtiofs_seq_read_mb_per_s",
        "virtiofs_create_per_s",
        "virtiofs_stat_per_s",
    ] {
        assert_figure_beside_baseline(&text, figure, "host");
    }
    assert_figure_records(
        &text,
        &[
            "virtiofs_seq_write_mb_per_s",
            "virtiofs_seq_read_mb_per_s",
            "virtiofs_create_per_s",
            "virtiofs_stat_per_s",
        ],
    );
}
