//! `containerd-shim-husk-v2 -info`, as containerd's introspection service runs it (runtime options
//! on stdin, a `RuntimeInfo` protobuf on stdout), read as containerd reads it: its features carry
//! the type URL containerd's own runc shim answers with (`make containerd`), so containerd's CRI
//! can report recursive read-only mounts for the husk handler.

// Test code: a failed expectation is a test failure.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

use containerd_shim_protos::protobuf::Message;
use containerd_shim_protos::types::introspection::RuntimeInfo;

/// Runs `shim -info` with empty runtime options and decodes its answer.
fn info_of(shim: &Path) -> RuntimeInfo {
    let mut child = Command::new(shim)
        .arg("-info")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|err| panic!("running {}: {err}", shim.display()));
    child.stdin.take().unwrap().write_all(b"").unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(output.status.success(), "{} -info: {}", shim.display(), String::from_utf8_lossy(&output.stderr));
    RuntimeInfo::parse_from_bytes(&output.stdout).unwrap()
}

#[test]
fn info_reports_recursive_read_only_mounts_as_containerds_runc_shim_reports_its_features() {
    let husk = info_of(Path::new(env!("CARGO_BIN_EXE_containerd-shim-husk-v2")));
    assert_eq!(husk.name, "io.containerd.husk.v2");
    assert_eq!(husk.version.version, env!("CARGO_PKG_VERSION"));
    let features: serde_json::Value = serde_json::from_slice(&husk.features.value).unwrap();
    assert!(features["mountOptions"].as_array().unwrap().iter().any(|o| o == "rro"), "{features}");

    let runc_shim =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../build/containerd/bin/containerd-shim-runc-v2");
    assert!(runc_shim.exists(), "{} missing: run `make containerd`", runc_shim.display());
    let runc = info_of(&runc_shim);
    assert_eq!(
        husk.features.type_url, runc.features.type_url,
        "the features' type, as containerd registers it"
    );
    let runc_features: serde_json::Value = serde_json::from_slice(&runc.features.value).unwrap();
    assert!(
        runc_features["mountOptions"].as_array().is_some(),
        "runc's features are the same JSON: {runc_features}"
    );
}
