//! `husk env` and configuration errors as a user meets them: the effective configuration with its
//! source, and a bad file named with the key before anything is started.

// Test code: a failed expectation is a test failure.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

use husk_tests::{combined, run, target_bin};

#[test]
fn husk_env_prints_the_effective_configuration_and_its_file() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("configuration.toml");
    std::fs::write(&file, "[hypervisor]\nvcpus = 2\nmemory_mib = 512\n").unwrap();
    let output = run(Command::new(target_bin("husk")).arg("--config").arg(&file).arg("env"));
    let text = combined(&output);
    assert!(output.status.success(), "{text}");
    assert!(text.contains(&format!("# from {}", file.display())), "{text}");
    assert!(text.contains("vcpus = 2") && text.contains("memory_mib = 512"), "{text}");
    assert!(text.contains("boot_timeout_s = 120"), "unset keys keep their defaults: {text}");
}

#[test]
fn a_bad_configuration_is_named_by_file_and_key_and_husk_run_starts_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("configuration.toml");
    std::fs::write(&file, "[hypervisor]\nmemory_mib = 8\n").unwrap();
    let output =
        run(Command::new(target_bin("husk")).arg("--config").arg(&file).args(["run", "/", "--", "true"]));
    let text = combined(&output);
    assert_eq!(output.status.code(), Some(125), "{text}");
    assert!(text.contains(file.to_str().unwrap()) && text.contains("hypervisor.memory_mib = 8"), "{text}");
    let output = run(Command::new(target_bin("husk")).args(["--config", "/nonexistent/husk.toml", "env"]));
    assert!(!output.status.success() && combined(&output).contains("/nonexistent/husk.toml"));
}
