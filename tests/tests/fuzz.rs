//! Bounded fuzz runs in the test suite: every target in fuzz/ runs from its committed corpus for a
//! limited time (`HUSK_FUZZ_SECONDS`, default 30) and must finish without a crash, hang or leak.

// Test code: a failed expectation is a test failure.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

use husk_tests::{combined, describe, run, workspace_root};

fn fuzz(target: &str) {
    let seconds = std::env::var("HUSK_FUZZ_SECONDS").unwrap_or_else(|_| "30".into());
    let root = workspace_root();
    let output =
        run(Command::new(root.join("fuzz/run")).args(["--time", &seconds, target]).current_dir(&root));
    assert!(output.status.success(), "fuzz target {target} failed: {}", describe(&output));
    let text = combined(&output);
    let executed: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("stat::number_of_executed_units:"))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0);
    println!("fuzz {target}: {executed} inputs in {seconds} s");
    assert!(executed > 1000, "the fuzzer actually ran: {text}");
}

#[test]
fn vsock_queue_fuzz_target_survives_a_bounded_run() {
    fuzz("vsock_queue");
}

#[test]
fn fs_request_fuzz_target_survives_a_bounded_run() {
    fuzz("fs_request");
}

#[test]
fn net_queue_fuzz_target_survives_a_bounded_run() {
    fuzz("net_queue");
}

#[test]
fn agent_reply_fuzz_target_survives_a_bounded_run() {
    fuzz("agent_reply");
}

#[test]
fn oci_spec_fuzz_target_survives_a_bounded_run() {
    fuzz("oci_spec");
}

#[test]
fn configuration_fuzz_target_survives_a_bounded_run() {
    fuzz("configuration");
}
