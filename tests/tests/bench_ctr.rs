//! The containerd benchmark runs `ctr run` with Husk and with runc on one private containerd and
//! prints each named figure beside its runc baseline (two runs, debug binaries: this checks the
//! benchmark works, not the numbers; `make bench` measures).

// Test code: a failed expectation is a test failure.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use husk_tests::{assert_figure_beside_baseline, describe, run, target_bin, workspace_root, VmHost};

#[test]
fn the_containerd_benchmark_prints_each_figure_beside_runc() {
    let root = workspace_root();
    let image = root.join("build/test-scratch/busybox-oci-bench.tar");
    std::fs::create_dir_all(image.parent().unwrap()).unwrap();
    let made = run(Command::new(root.join("scripts/busybox-oci-image")).arg(&image));
    assert!(made.status.success(), "{}", describe(&made));
    let (env, containerd, bench) =
        (root.join("tests/containerd-env"), root.join("build/containerd"), target_bin("husk-bench-ctr"));
    let args = [
        env.to_str().unwrap(),
        containerd.to_str().unwrap(),
        "--",
        bench.to_str().unwrap(),
        "--runs",
        "2",
        image.to_str().unwrap(),
    ];
    let output = run(&mut VmHost::detect().command_with(
        Duration::from_secs(900),
        &[Path::new("/usr/sbin/runc")],
        &args,
    ));
    let _ = std::fs::remove_file(&image);
    assert_eq!(output.status.code(), Some(0), "{}", describe(&output));
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    for (figure, baseline) in [
        ("ctr_run_ms", "runc_ctr_run_ms"),
        ("shim_rss_mib", "runc_shim_rss_mib"),
        ("pod_overhead_mib", "runc_pod_overhead_mib"),
    ] {
        assert_figure_beside_baseline(&text, figure, baseline);
    }
}
