//! The vsock benchmark runs through the real VM path and prints every named figure with its
//! host-local unix-socket baseline (small transfers, debug binaries: this checks the benchmark
//! works, not the numbers; `make bench` measures).

// Test code: a failed expectation is a test failure.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use husk_tests::{assert_figure_beside_baseline, assert_figure_records, run_benchmark};

#[test]
fn the_vsock_benchmark_prints_each_figure_beside_its_unix_socket_baseline() {
    let extra = ["--mib", "2", "--runs", "2", "--connects", "5"];
    let text = run_benchmark("husk-bench-vsock", &extra, &[], Duration::from_secs(300));
    for figure in ["vsock_mb_per_s.host_to_guest", "vsock_mb_per_s.guest_to_host", "vsock_connect_us"] {
        assert_figure_beside_baseline(&text, figure, "unix");
    }
    assert_figure_records(
        &text,
        &["vsock_mb_per_s.host_to_guest", "vsock_mb_per_s.guest_to_host", "vsock_connect_us"],
    );
}
