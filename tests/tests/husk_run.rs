//! `husk run`: a container in its own microVM without containerd, through the real VM path (the
//! VM runs inside the husk process, on the test host's KVM where this machine's cannot run it).

// Test code: a failed expectation is a test failure.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use husk_tests::{combined, describe, run, target_bin, workspace_root, VmHost};

/// A busybox rootfs under build/ (which the test host sees), made by scripts/busybox-rootfs.
fn busybox_rootfs(name: &str) -> PathBuf {
    let dir = workspace_root().join("build/test-scratch").join(name);
    let _ = std::fs::remove_dir_all(&dir);
    let made = run(Command::new(workspace_root().join("scripts/busybox-rootfs")).arg(&dir));
    assert!(made.status.success(), "{}", describe(&made));
    dir
}

#[test]
fn husk_run_runs_a_command_in_a_microvm_and_returns_its_status() {
    let rootfs = busybox_rootfs("husk-run-rootfs");
    let husk = target_bin("husk");
    let script = format!(
        "husk={husk}; rootfs={rootfs}
$husk run $rootfs -- echo hi; echo \"echo-status=$?\"
$husk run $rootfs -- sh -c 'echo to-stderr >&2; exit 3'; echo \"exit-status=$?\"
echo piped-in | $husk run -i $rootfs -- cat; echo \"cat-status=$?\"
echo typed | $husk run -i -t $rootfs -- sh -c 'read line; echo tty=$(tty) got=$line'; echo \"tty-status=$?\"
$husk run $rootfs -- sh -c 'echo host=$(hostname) pid=$$ cpus=$(grep -c ^processor /proc/cpuinfo)'
$husk run {missing} -- true; echo \"missing-status=$?\"
$husk run $rootfs; echo \"no-command-status=$?\"
echo \"left=$(ls /run/husk/sandboxes 2>/dev/null | wc -l) mounts=$(grep -c /run/husk /proc/self/mountinfo)\"",
        husk = husk.display(),
        rootfs = rootfs.display(),
        missing = rootfs.with_file_name("no-such-rootfs").display(),
    );
    let output = run(&mut VmHost::detect().command(Duration::from_secs(900), &["sh", "-c", &script]));
    let _ = std::fs::remove_dir_all(&rootfs);
    let text = combined(&output);
    assert!(output.status.success(), "{}", describe(&output));
    assert!(text.contains("hi\necho-status=0"), "output and status 0: {text}");
    assert!(
        text.contains("to-stderr") && text.contains("exit-status=3"),
        "a non-zero status comes back: {text}"
    );
    assert!(text.contains("piped-in\ncat-status=0"), "stdin reaches the container, EOF ends it: {text}");
    assert!(
        text.contains("tty=/dev/pts/0 got=typed") && text.contains("tty-status=0"),
        "-t gives a terminal: {text}"
    );
    assert!(
        text.contains("host=husk pid=1 cpus=1"),
        "the container's own hostname, pid namespace and VM: {text}"
    );
    assert!(
        text.contains("no-such-rootfs: No such file or directory") && text.contains("missing-status=125"),
        "{text}"
    );
    assert!(text.contains("no command given") && text.contains("no-command-status=125"), "{text}");
    assert!(text.contains("left=0 mounts=0"), "no sandbox directory or mount survives: {text}");
}
