//! The containerd harness the shim's tests stand on: a private containerd 2.x (Debian's package,
//! `make containerd`) runs in the test host, imports the offline busybox OCI image
//! (scripts/busybox-oci-image) and runs it with runc, the baseline Husk is compared with.

// Test code: a failed expectation is a test failure.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use husk_tests::{combined, describe, run, workspace_root, VmHost};

#[test]
fn a_private_containerd_runs_the_offline_busybox_image_with_runc() {
    let root = workspace_root();
    let image = root.join("build/test-scratch/busybox-oci-runc.tar");
    std::fs::create_dir_all(image.parent().unwrap()).unwrap();
    let made = run(Command::new(root.join("scripts/busybox-oci-image")).arg(&image));
    assert!(made.status.success(), "{}", describe(&made));
    let script = format!(
        "ctr images import {image} >/dev/null && ctr images ls -q
ctr run --rm --runtime io.containerd.runc.v2 docker.io/library/busybox:husk t1 echo hi-from-runc; echo \"echo-status=$?\"
ctr run --rm docker.io/library/busybox:husk t2 sh -c 'exit 7'; echo \"exit-status=$?\"",
        image = image.display()
    );
    let env = root.join("tests/containerd-env");
    let containerd = root.join("build/containerd");
    let args = [env.to_str().unwrap(), containerd.to_str().unwrap(), "--", "sh", "-c", &script];
    let output = run(&mut VmHost::detect().command_with(
        Duration::from_secs(600),
        &[Path::new("/usr/sbin/runc")],
        &args,
    ));
    let _ = std::fs::remove_file(&image);
    let text = combined(&output);
    assert!(output.status.success(), "{}", describe(&output));
    assert!(text.contains("docker.io/library/busybox:husk"), "the image imports: {text}");
    assert!(text.contains("hi-from-runc\necho-status=0"), "{text}");
    assert!(text.contains("exit-status=7"), "{text}");
}
