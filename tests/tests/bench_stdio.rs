//! The container stdio and exec benchmark runs a pod through the real VM path and prints each
//! named figure beside its host-mode agent baseline (small transfers, debug binaries: this checks
//! the benchmark works, not the numbers; `make bench` measures).

// Test code: a failed expectation is a test failure.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use husk_tests::{assert_figure_beside_baseline, assert_figure_records, run_benchmark};

#[test]
fn the_stdio_benchmark_prints_each_figure_beside_its_host_mode_baseline() {
    let extra = ["--mib", "4", "--runs", "2", "--execs", "3"];
    let text = run_benchmark("husk-bench-stdio", &extra, &[], Duration::from_secs(600));
    for figure in ["stdio_mb_per_s", "exec_ms"] {
        assert_figure_beside_baseline(&text, figure, "host_mode");
    }
    assert_figure_records(&text, &["stdio_mb_per_s", "exec_ms"]);
}
