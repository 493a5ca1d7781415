//! `husk check` as an operator sees it, here and on the VM host.

// Test code: a failed expectation is a test failure.
#![allow(clippy::unwrap_used, clippy::expect_used)]
use std::path::Path;
use std::time::Duration;

use husk_tests::{describe, run, target_bin, VmHost};
use serde_json::Value;

fn check_json(output: &std::process::Output) -> Value {
    serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|err| panic!("not JSON ({err}): {}", describe(output)))
}

fn kvm_check(report: &Value) -> &Value {
    report["checks"].as_array().and_then(|c| c.iter().find(|c| c["name"] == "kvm")).expect("a kvm check")
}

#[test]
fn on_this_machine_the_verdict_matches_its_kvm() {
    let output = run(std::process::Command::new(target_bin("husk")).args(["check", "--json"]));
    let report = check_json(&output);
    let kvm = kvm_check(&report);
    if Path::new("/sys/module/kvm_pvm").exists() {
        // PVM cannot run unmodified Linux user space: not ready, and the reason is named.
        assert_ne!(output.status.code(), Some(0), "{}", describe(&output));
        assert_eq!(report["ready"], false);
        assert_eq!(kvm["ok"], false);
        assert!(kvm["summary"].as_str().unwrap().contains("PVM"), "{kvm:#}");
        assert_eq!(kvm["details"]["kind"]["kind"], "pvm", "{kvm:#}");
    } else if Path::new("/dev/kvm").exists() {
        assert_eq!(kvm["details"]["vm_probe"], "ok", "{kvm:#}");
    } else {
        assert_eq!(kvm["ok"], false);
        assert!(kvm["summary"].as_str().unwrap().contains("/dev/kvm"), "{kvm:#}");
    }
}

#[test]
fn text_output_names_each_failed_check_and_exits_non_zero() {
    // An empty guest-image directory always fails that check, whatever the machine.
    let empty = tempfile::tempdir().unwrap();
    let output = run(std::process::Command::new(target_bin("husk"))
        .args(["check", "--only", "guest-image"])
        .env("HUSK_GUEST_DIR", empty.path()));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(1), "{}", describe(&output));
    assert!(stdout.contains("NOT READY") && stdout.contains("[FAIL] guest image"), "{stdout}");
}

#[test]
fn on_the_vm_host_kvm_the_guest_image_cgroup2_and_the_shim_are_ready() {
    let husk = target_bin("husk");
    let args = [
        husk.to_str().unwrap(),
        "check",
        "--json",
        "--only",
        "kvm",
        "--only",
        "guest-image",
        "--only",
        "cgroup",
        "--only",
        "shim",
    ];
    let output = run(&mut VmHost::detect().command(Duration::from_secs(300), &args));
    let report = check_json(&output);
    assert_eq!(output.status.code(), Some(0), "{report:#}\n{}", describe(&output));
    assert_eq!(report["ready"], true);
    assert_eq!(kvm_check(&report)["details"]["vm_probe"], "ok");
}
