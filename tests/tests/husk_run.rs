//! `husk run`: a container in its own microVM without containerd, through the real VM path (the
//! VM runs inside the husk process, on the test host's KVM where this machine's cannot run it).

// Test code: a failed expectation is a test failure.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use husk_shim::agent_client::REPLY_THREAD_NAME;
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
$husk run $rootfs -- sh -c 'echo host=$(hostname) pid=$$ cpus=$(grep -c ^processor /proc/cpuinfo); echo to-stderr >&2; exit 3'; echo \"exit-status=$?\"
echo piped-in | $husk run -i $rootfs -- cat; echo \"cat-status=$?\"
echo typed | $husk run -i -t $rootfs -- sh -c 'read line; echo tty=$(tty) got=$line'; echo \"tty-status=$?\"
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

#[test]
fn a_container_cannot_reach_the_agent_over_the_guests_loopback_vsock() {
    // The guest kernel has the vsock loopback transport: a container could connect to the
    // agent's ports unless the agent answers the host's CID only.
    let rootfs = busybox_rootfs("husk-run-vsock-rootfs");
    let probe = workspace_root().join("target/x86_64-unknown-linux-gnu/guest/husk-vsock-test");
    std::fs::copy(&probe, rootfs.join("bin/husk-vsock-test")).expect("the guest build of husk-vsock-test");
    // Port 4000: a listener of the container's own, the control that keeps its connection open.
    // The probes start once it accepts (the rootfs is read-only: no file to say so), within 30 s.
    let inside = "husk-vsock-test listen 4000 >/dev/null &
i=0; until [ \"$(husk-vsock-test probe 1 4000)\" = kept-open ] || [ $i -ge 300 ]; do sleep 0.1; i=$((i+1)); done
for target in '1 4000' '1 1024' '1 1025' '3 1024' '3 1025'; do
    echo \"probe $target: $(husk-vsock-test probe $target)\"
done";
    let (husk, root) = (target_bin("husk"), rootfs.to_string_lossy().into_owned());
    let command = [husk.to_str().unwrap(), "run", &root, "--", "sh", "-c", inside];
    let output = run(&mut VmHost::detect().command(Duration::from_secs(600), &command));
    let _ = std::fs::remove_dir_all(&rootfs);
    let text = combined(&output);
    assert!(output.status.success(), "{}", describe(&output));
    assert!(text.contains("probe 1 4000: kept-open"), "the probe tells an open connection: {text}");
    for target in ["1 1024", "1 1025", "3 1024", "3 1025"] {
        assert!(text.contains(&format!("probe {target}: closed-by-peer")), "{target}: {text}");
    }
}

#[test]
fn the_vmms_vcpu_and_device_threads_run_under_their_seccomp_filters() {
    let rootfs = busybox_rootfs("husk-run-seccomp-rootfs");
    // While the container sleeps, list the husk process's threads with their seccomp mode
    // (0: none, 2: filter).
    let script = format!(
        "{husk} run {rootfs} -- sh -c 'echo container-started; sleep 8' > /tmp/husk-run.out & run=$!
# Every device thread is set up and filtered before the guest can use its device, so before the
# container (on the share) starts: wait for its first line (60 s).
i=0; until grep -q container-started /tmp/husk-run.out 2>/dev/null || [ $i -ge 600 ]; do sleep 0.1; i=$((i+1)); done
for task in /proc/$run/task/*; do echo \"thread $(cat $task/comm) $(grep Seccomp: $task/status)\"; done
for task in /proc/$run/task/*; do [ \"$(cat $task/comm)\" = virtio-fs ] && echo \"fs-root=$(readlink $task/root) fs-$(grep CapPrm: $task/status | tr -d '\\t')\"; done
for task in /proc/$run/task/*; do [ \"$(cat $task/comm)\" = virtio-vsock ] && echo \"vsock-root=$(readlink $task/root) vsock-$(grep CapPrm: $task/status | tr -d '\\t')\"; done
for task in /proc/$run/task/*; do [ \"$(cat $task/comm)\" = {replies} ] && echo \"replies-$(grep CapPrm: $task/status | tr -d '\\t')\"; done
wait $run; echo \"run-status=$?\"",
        husk = target_bin("husk").display(),
        rootfs = rootfs.display(),
        replies = REPLY_THREAD_NAME,
    );
    let output = run(&mut VmHost::detect().command(Duration::from_secs(600), &["sh", "-c", &script]));
    let _ = std::fs::remove_dir_all(&rootfs);
    let text = combined(&output);
    assert!(output.status.success() && text.contains("run-status=0"), "{}", describe(&output));
    let mode = |thread: &str| -> Vec<&str> {
        text.lines()
            .filter_map(|l| l.strip_prefix(&format!("thread {thread} ")))
            .map(|rest| rest.trim_start_matches("Seccomp:").trim())
            .collect()
    };
    for thread in ["vcpu0", "virtio-vsock", "virtio-fs", "virtio-rng", REPLY_THREAD_NAME] {
        assert_eq!(mode(thread), ["2"], "{thread} runs under a filter: {text}");
    }
    assert_eq!(mode("husk"), ["0"], "the process's own thread is not filtered: {text}");
    assert!(
        mode("vmm-launcher").is_empty(),
        "device threads are made with the VM, none by a launcher: {text}"
    );
    // The share's thread has the share as its root and keeps only CAP_CHOWN, CAP_DAC_OVERRIDE,
    // CAP_DAC_READ_SEARCH, CAP_FOWNER, CAP_FSETID, CAP_SETGID and CAP_SETUID (bits 0-4, 6, 7).
    let fs = text.lines().find_map(|l| l.strip_prefix("fs-root=")).unwrap_or_else(|| panic!("{text}"));
    assert!(fs.starts_with("/run/husk/sandboxes/") && fs.contains("/shared "), "{text}");
    assert!(fs.ends_with("fs-CapPrm:00000000000000df"), "{text}");
    // The vsock thread's root is the sandbox directory of its socket, and it keeps no capability
    // (its guest reaches no host port, so its filter has no socket or connect either).
    let vsock = text.lines().find_map(|l| l.strip_prefix("vsock-root=")).unwrap_or_else(|| panic!("{text}"));
    let (root, caps) = vsock.split_once(' ').unwrap_or_else(|| panic!("{text}"));
    assert!(root.starts_with("/run/husk/sandboxes/") && !root.contains("/shared"), "{text}");
    assert_eq!(caps, "vsock-CapPrm:0000000000000000", "{text}");
    // The thread that decodes the agent's replies keeps no capability either.
    let replies = text.lines().find(|l| l.starts_with("replies-")).unwrap_or_else(|| panic!("{text}"));
    assert_eq!(replies, "replies-CapPrm:0000000000000000", "{text}");
}
