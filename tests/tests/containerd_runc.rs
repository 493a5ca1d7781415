//! The containerd harness the shim's tests stand on: a private containerd 2.x (Debian's package,
//! `make containerd`) runs in the test host, imports the offline busybox OCI image
//! (scripts/busybox-oci-image) and runs it with runc, the baseline Husk is compared with.

// Test code: a failed expectation is a test failure.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use husk_tests::containerd::{run_beside_containerd, ImageTar, BUSYBOX};
use husk_tests::{combined, describe};

#[test]
fn a_private_containerd_runs_the_offline_busybox_image_with_runc() {
    let image = ImageTar::busybox("runc");
    let script = format!(
        "ctr images import {image} >/dev/null && ctr images ls -q
ctr run --rm --runtime io.containerd.runc.v2 {BUSYBOX} t1 echo hi-from-runc; echo \"echo-status=$?\"
ctr run --rm {BUSYBOX} t2 sh -c 'exit 7'; echo \"exit-status=$?\"",
        image = image.path().display()
    );
    let output = run_beside_containerd(false, Duration::from_secs(600), &["sh", "-c", &script]);
    let text = combined(&output);
    assert!(output.status.success(), "{}", describe(&output));
    assert!(text.contains(BUSYBOX), "the image imports: {text}");
    assert!(text.contains("hi-from-runc\necho-status=0"), "{text}");
    assert!(text.contains("exit-status=7"), "{text}");
}
