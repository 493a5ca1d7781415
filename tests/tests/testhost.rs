//! The nested test host (`tests/testhost/run`): a real KVM inside, exit statuses passed through,
//! hung commands killed at the timeout with nothing left behind.

// Test code: a failed expectation is a test failure.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs;
use std::time::{Duration, Instant};

use husk_tests::{describe, run, target_bin, testhost_command};

const BOOT_BUDGET: Duration = Duration::from_secs(300);

/// How long a test-host run took since `started`, less the time it waited for the test-host lock
/// (another test's test host, two tests running at once, or another checkout's): the bounds
/// below are on the run's own time.
fn run_time(started: Instant, output: &std::process::Output) -> Duration {
    let stderr = String::from_utf8_lossy(&output.stderr);
    let waited: u64 = stderr
        .lines()
        .filter_map(|line| {
            line.split("waited ").nth(1)?.strip_suffix(" s for the test host lock")?.parse::<u64>().ok()
        })
        .sum();
    started.elapsed().saturating_sub(Duration::from_secs(waited))
}

#[test]
fn the_test_host_has_svm_and_a_kvm_device() {
    let output = run(&mut testhost_command(
        BOOT_BUDGET,
        &["sh", "-c", "grep -qw svm /proc/cpuinfo && test -c /dev/kvm"],
    ));
    assert_eq!(output.status.code(), Some(0), "{}", describe(&output));
}

#[test]
fn kvm_in_the_test_host_creates_and_runs_a_vm() {
    // `husk check` creates a VM and a vCPU through kvm-ioctls and runs a real-mode probe guest.
    let husk = target_bin("husk");
    let output = run(&mut testhost_command(
        BOOT_BUDGET,
        &[husk.to_str().unwrap(), "check", "--json", "--only", "kvm"],
    ));
    assert_eq!(output.status.code(), Some(0), "{}", describe(&output));
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).expect("husk check --json output");
    let kvm = &report["checks"][0];
    assert_eq!(kvm["name"], "kvm");
    assert_eq!(kvm["ok"], true, "{report:#}");
    assert_eq!(kvm["details"]["vm_probe"], "ok", "{report:#}");
    assert_eq!(kvm["details"]["kind"]["kind"], "nested", "{report:#}");
    assert_eq!(kvm["details"]["kind"]["vendor"], "amd", "{report:#}");
}

/// Also when QEMU stays after the test host powered off (seen once in CI): it is killed soon
/// after, and the status the command reported stands.
#[test]
fn output_streams_back_and_the_exit_status_is_unchanged_even_when_qemu_hangs_at_poweroff() {
    let started = Instant::now();
    let output =
        run(testhost_command(BOOT_BUDGET, &["sh", "-c", "echo to-stdout; echo to-stderr >&2; exit 7"])
            .env("HUSK_TESTHOST_NO_SHUTDOWN", "1"));
    let elapsed = run_time(started, &output);
    assert_eq!(output.status.code(), Some(7), "{}", describe(&output));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("to-stdout\n") && stdout.contains("to-stderr\n"), "{}", describe(&output));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("QEMU did not exit within 10s"), "{}", describe(&output));
    assert!(
        !stderr.contains("froze") && !stderr.contains("attempt 2"),
        "not an emulator fault: {}",
        describe(&output)
    );
    // A boot (~30 s under TCG) and the 10 s grace, not the heartbeat watchdog's 60 s.
    assert!(elapsed < Duration::from_secs(100), "took {elapsed:?}");
}

#[test]
fn a_hung_command_is_killed_at_the_timeout_and_qemu_does_not_survive() {
    let dir = tempfile::tempdir().unwrap();
    let pidfile = dir.path().join("qemu.pid");
    let started = Instant::now();
    let output =
        run(testhost_command(Duration::from_secs(20), &["sleep", "3600"])
            .env("HUSK_TESTHOST_PIDFILE", &pidfile));
    let elapsed = run_time(started, &output);

    assert_eq!(output.status.code(), Some(124), "{}", describe(&output));
    assert!(String::from_utf8_lossy(&output.stderr).contains("timeout"), "{}", describe(&output));
    // The 20 s budget plus boot and the kill grace period, far below the command's hour.
    assert!(elapsed < Duration::from_secs(120), "took {elapsed:?}");
    let pid = fs::read_to_string(&pidfile).expect("run writes QEMU's pid to HUSK_TESTHOST_PIDFILE");
    let comm = fs::read_to_string(format!("/proc/{}/comm", pid.trim())).unwrap_or_default();
    assert!(!comm.starts_with("qemu"), "QEMU (pid {}) survived the timeout", pid.trim());
}

#[test]
fn a_wedged_test_host_is_detected_and_the_command_rerun_then_given_up_on() {
    // The test host's kernel reporting a stalled CPU is what a wedged emulator looks like from
    // outside; this command fakes that report on every attempt.
    let fake_stall =
        "echo 'rcu: INFO: rcu_preempt detected stalls on CPUs/tasks:' > /dev/console; sleep 3600";
    let started = Instant::now();
    let output = run(testhost_command(Duration::from_secs(240), &["sh", "-c", fake_stall])
        .env("HUSK_TESTHOST_ATTEMPTS", "2"));
    let elapsed = run_time(started, &output);
    assert_eq!(output.status.code(), Some(124), "{}", describe(&output));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("froze") && stderr.contains("attempt 2 of 2"), "{}", describe(&output));
    assert!(stderr.contains("giving up"), "{}", describe(&output));
    assert!(elapsed < Duration::from_secs(200), "detected long before the timeout: took {elapsed:?}");

    // A test host frozen before its first heartbeat: its heartbeat port discarded, none arrives.
    let started = Instant::now();
    let output = run(testhost_command(Duration::from_secs(600), &["sleep", "3600"])
        .env("HUSK_TESTHOST_NO_HEARTBEAT", "1")
        .env("HUSK_TESTHOST_FIRST_BEAT_S", "20")
        .env("HUSK_TESTHOST_ATTEMPTS", "1"));
    let elapsed = run_time(started, &output);
    assert_eq!(output.status.code(), Some(124), "{}", describe(&output));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("none within 20s of boot") && stderr.contains("giving up"),
        "{}",
        describe(&output)
    );
    assert!(elapsed < Duration::from_secs(120), "detected long before the timeout: took {elapsed:?}");
}

#[test]
fn triple_faults_test_host_resets_kvm_panics_and_lost_output_are_rerun_then_given_up_on() {
    // What husk-vmm prints when a guest triple-faults, with no panic of the guest's own.
    let fake_fault = "echo 'husk-vmm: the VM ended: vCPU 0 triple fault (rip=0xfff0)' >&2; exit 3";
    let output =
        run(testhost_command(BOOT_BUDGET, &["sh", "-c", fake_fault]).env("HUSK_TESTHOST_ATTEMPTS", "2"));
    assert_eq!(output.status.code(), Some(3), "the last attempt's status: {}", describe(&output));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("triple-faulted") && stderr.contains("attempt 2 of 2"), "{}", describe(&output));
    assert!(stderr.contains("giving up"), "{}", describe(&output));

    // The test host's kernel resetting the machine without a panic.
    let reset = "echo b > /proc/sysrq-trigger; sleep 60";
    let output = run(testhost_command(BOOT_BUDGET, &["sh", "-c", reset]).env("HUSK_TESTHOST_ATTEMPTS", "2"));
    assert_eq!(output.status.code(), Some(125), "{}", describe(&output));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("reset itself") && stderr.contains("attempt 2 of 2"), "{}", describe(&output));

    // The test host's kernel panicking inside KVM while it runs a nested guest (its console's
    // trace, written by the command, then a reset with no status).
    let panic = "printf ' kvm_arch_vcpu_ioctl_run+0x8be/0x1750 [kvm]\\nKernel panic - not syncing: Fatal exception in interrupt\\n' >/dev/console
        echo b > /proc/sysrq-trigger; sleep 60";
    // One attempt: the rerun itself is shown above; here only that it counts as a fault.
    let output = run(testhost_command(BOOT_BUDGET, &["sh", "-c", panic]).env("HUSK_TESTHOST_ATTEMPTS", "1"));
    assert_eq!(output.status.code(), Some(125), "{}", describe(&output));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("panicked in KVM") && stderr.contains("giving up"), "{}", describe(&output));

    // The status arriving without the command's output (the test host powered off before its
    // serial port drained): what arrived is still shown.
    // (The command reports a status itself, waits for the console to send it, and powers off.)
    let cut = "echo HUSK_TESTHOST_STATUS=0 >/dev/console; last=
        while now=$(grep -o 'tx:[0-9]*' /proc/tty/driver/serial | tr '\\n' ' '); [ \"$now\" != \"$last\" ]; do
            last=$now; sleep 0.2
        done; poweroff -f";
    let output = run(testhost_command(BOOT_BUDGET, &["sh", "-c", cut]).env("HUSK_TESTHOST_ATTEMPTS", "2"));
    assert_eq!(output.status.code(), Some(0), "{}", describe(&output));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("output did not") && stderr.contains("attempt 2 of 2"), "{}", describe(&output));

    // A command that fails on its own is not rerun.
    let output = run(&mut testhost_command(
        BOOT_BUDGET,
        &["sh", "-c", "echo 'Kernel panic - not syncing' >&2; exit 4"],
    ));
    assert_eq!(output.status.code(), Some(4), "{}", describe(&output));
    assert!(!String::from_utf8_lossy(&output.stderr).contains("attempt 2"), "{}", describe(&output));
}
