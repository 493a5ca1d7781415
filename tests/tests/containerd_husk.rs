//! containerd 2.x runs containers in Husk microVMs: `ctr` against a private containerd (Debian's
//! package, `make containerd`) with the offline busybox image and the runtime
//! `io.containerd.husk.v2`, inside the test host (or directly on working KVM). After each test no
//! shim, sandbox directory, mount or shim socket is left behind. Every test's steps run one after
//! another beside one containerd in one boot of the test host ([`SESSION`]); each test asserts on
//! its own steps' output.

// Test code: a failed expectation is a test failure.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::OnceLock;
use std::time::Duration;

use husk_tests::batch::{chosen_test, BatchOutput};
use husk_tests::containerd::{beside_one_containerd, step_text, Steps, BUSYBOX as IMAGE};
use husk_tests::pod_cgroup::runtimeclass_memory_overhead;
use husk_tests::{target_bin, workspace_root};

/// Every test's steps below, run on first use.
static SESSION: OnceLock<BatchOutput> = OnceLock::new();
/// The whole session (~10 min in CI); each test's steps are bounded on their own as well.
const SESSION_BUDGET: Duration = Duration::from_secs(2700);

/// Each test's steps by a short name, in the order they run (the faults that end VMs, shims or
/// containerd last), with the test that reads them: a run of chosen tests runs only theirs.
const TESTS: &[TestSteps] = &[
    TestSteps {
        name: "run",
        test: "ctr_run_prints_the_output_returns_the_exit_status_gives_a_terminal_and_limits_cpu",
        steps: run_steps,
    },
    TestSteps {
        name: "tasks",
        test: "ctr_task_exec_metrics_pause_resume_and_kill_reach_the_guest",
        steps: tasks_steps,
    },
    TestSteps {
        name: "cri",
        test: "a_cri_pod_runs_its_containers_in_one_vm_sharing_a_volume_and_the_pods_namespaces",
        steps: cri_pod_steps,
    },
    TestSteps {
        name: "disk-full",
        test: "a_full_volume_fails_the_containers_writes_with_enospc_and_the_pod_keeps_serving",
        steps: disk_full_steps,
    },
    TestSteps {
        name: "cri-net",
        test: "cri_pods_get_their_cni_address_in_the_guest_and_reach_husk_and_runc_pods",
        steps: cri_net_steps,
    },
    TestSteps {
        name: "net-host",
        test: "a_host_network_container_is_refused_with_a_message_naming_why_and_leaves_nothing",
        steps: net_host_steps,
    },
    TestSteps {
        name: "bad-input",
        test: "malformed_annotations_specs_and_configurations_are_refused_by_name_and_leave_nothing",
        steps: bad_input_steps,
    },
    TestSteps {
        name: "hostile",
        test: "a_root_guest_cannot_steer_the_shims_mounts_onto_node_paths",
        steps: hostile_steps,
    },
    TestSteps {
        name: "hostile-guest",
        test: "a_root_guest_racing_a_create_flooding_vsock_and_making_setuid_files_gains_nothing_on_the_node",
        steps: hostile_guest_steps,
    },
    TestSteps {
        name: "rro",
        test: "a_recursive_read_only_volume_is_read_only_all_through_in_the_guest_and_in_the_pods_share",
        steps: rro_steps,
    },
    TestSteps {
        name: "nested",
        test:
            "a_privileged_container_runs_containerd_and_runc_with_a_bridge_network_nat_and_overlay_in_its_vm",
        steps: nested_steps,
    },
    TestSteps {
        name: "soak",
        test: "a_soak_of_pods_started_and_removed_in_rounds_leaves_the_node_as_it_was",
        steps: soak_steps,
    },
    TestSteps {
        name: "vm-dies",
        test: "when_a_pods_vm_dies_every_task_exits_with_an_error_and_the_console_is_logged",
        steps: vm_dies_steps,
    },
    TestSteps {
        name: "vm-panics",
        test: "a_guest_kernel_panic_ends_the_pods_tasks_with_the_panic_in_the_shims_log",
        steps: vm_panics_steps,
    },
    TestSteps {
        name: "agent-crash",
        test: "a_crashed_agent_ends_the_pods_tasks_and_the_guest_kernel_names_it",
        steps: agent_crash_steps,
    },
    TestSteps {
        name: "agent-hang",
        test: "a_hung_agent_fails_its_health_check_and_the_pods_tasks_exit_with_that_reason",
        steps: agent_hang_steps,
    },
    TestSteps {
        name: "vm-oom",
        test: "a_guest_filling_its_memory_is_charged_to_the_pods_cgroup_stays_within_it_and_keeps_serving",
        steps: vm_oom_steps,
    },
    TestSteps {
        name: "shim-kill",
        test: "a_killed_cri_pod_shim_is_cleaned_up_and_its_tasks_report_the_kill",
        steps: shim_kill_steps,
    },
    TestSteps {
        name: "restart",
        test: "containerd_restarting_under_a_running_pod_finds_it_serving_and_hears_its_exit",
        steps: restart_steps,
    },
];

/// A test's steps ([`husk_tests::containerd::Steps`] when chosen): a short name, the test that
/// reads them, and what makes them.
struct TestSteps {
    name: &'static str,
    test: &'static str,
    steps: fn() -> String,
}

/// The output of test `name`'s steps, which succeeded and left nothing of their pods.
fn steps_output(name: &str) -> String {
    let session = SESSION.get_or_init(|| {
        let chosen: Vec<Steps> = TESTS
            .iter()
            .filter(|test| chosen_test(test.test))
            .map(|test| Steps::new(test.name, (test.steps)()))
            .collect();
        beside_one_containerd("husk", &chosen, SESSION_BUDGET)
    });
    step_text(session.get(name))
}

fn run_steps() -> String {
    let pty_run = target_bin("husk-pty-run");
    format!(
        "$husk --rm {IMAGE} t1 echo hi-from-a-microvm; echo \"echo-status=$?\"
$husk --rm {IMAGE} t2 sh -c 'echo to-stderr >&2; exit 7'; echo \"exit-status=$?\"
guest=$($husk --rm {IMAGE} t3 uname -r); echo \"guest-kernel=$guest host-kernel=$(uname -r)\"
{pty} 101 33 -- $husk --rm -t {IMAGE} t4 sh -c 'tty; stty size'; echo \"tty-status=$?\"
$husk --rm {IMAGE} t5 /no/such/program; echo \"missing-status=$?\"
printf '#!/bin/sh\\nexec 5>&-\\ncat <&3 > /tmp/logger.out & cat <&4 > /tmp/logger.err; wait\\n' > /tmp/logger; chmod +x /tmp/logger
$husk --rm --log-uri file:///tmp/file.log {IMAGE} t6 sh -c 'echo to-the-file; echo err-to-the-file >&2'
echo \"file-log: $(sort /tmp/file.log | tr '\\n' ' ')\"
$husk --rm --log-uri binary:///tmp/logger {IMAGE} t7 sh -c 'echo to-the-logger; echo err-to-the-logger >&2'
echo \"binary-log: $(cat /tmp/logger.out) / $(cat /tmp/logger.err)\"
# The quota, read from the guest's cgroup tree (a privileged container can mount it).
echo \"cpu-limit: $($husk --rm --privileged --cpus 1.5 {IMAGE} t8 sh -c 'mkdir -p /tmp/cg && mount -t cgroup2 none /tmp/cg && cat /tmp/cg$(cut -d: -f3 /proc/self/cgroup)/cpu.max')\"
echo \"seccomp: $($husk --rm --seccomp {IMAGE} t9 grep Seccomp: /proc/self/status | tr -d '\\t')\"",
        pty = pty_run.display()
    )
}

#[test]
fn ctr_run_prints_the_output_returns_the_exit_status_gives_a_terminal_and_limits_cpu() {
    let text = steps_output("run");
    assert!(text.contains("hi-from-a-microvm\necho-status=0"), "{text}");
    assert!(text.contains("to-stderr") && text.contains("exit-status=7"), "{text}");
    // The container ran on the guest's kernel, not on the kernel of the host running containerd.
    let kernels =
        text.lines().find_map(|l| l.strip_prefix("guest-kernel=")).unwrap_or_else(|| panic!("{text}"));
    let (guest, host) = kernels.split_once(" host-kernel=").unwrap();
    assert!(!guest.is_empty() && guest != host, "guest kernel {guest:?}, host kernel {host:?}");
    assert!(text.contains("/dev/pts/0") && text.contains("33 101"), "a terminal of ctr's size: {text}");
    assert!(text.contains("tty-status=0"), "{text}");
    assert!(!text.contains("missing-status=0"), "a missing program fails the run: {text}");
    // Log URIs in place of FIFOs: a file (both streams), a logging program (fds 3 and 4).
    assert!(text.contains("file-log: err-to-the-file to-the-file "), "{text}");
    assert!(text.contains("binary-log: to-the-logger / err-to-the-logger"), "{text}");
    // A CPU limit is the container's CFS quota in the guest, as runc sets it on the node.
    assert!(text.contains("cpu-limit: 150000 100000"), "{text}");
    // containerd's default seccomp profile filters the container's syscalls in the guest.
    assert!(text.contains("seccomp: Seccomp:2"), "{text}");
}

fn tasks_steps() -> String {
    format!(
        "ctr events > /tmp/husk-events 2>&1 & events_pid=$!
$husk -d {IMAGE} long sleep 1000 || exit 1
ctr task exec --exec-id e1 long sh -c 'echo from-exec; ls /proc | grep -c ^[0-9]; exit 3'; echo \"exec-status=$?\"
ctr task metrics long
ctr task ps long | tail -n +2 | wc -l | sed 's/^/ps-lines=/'
ctr task pause long && ctr task ls | grep '^long ' | sed 's/^/paused: /'
ctr task resume long && ctr task ls | grep '^long ' | sed 's/^/resumed: /'
ctr task kill -s SIGKILL long
i=0; until ctr task ls | grep -q '^long .*STOPPED' || [ $i -ge 100 ]; do sleep 0.2; i=$((i+1)); done
ctr task ls | grep '^long ' | sed 's/^/killed: /'
ctr task delete long; ctr container rm long
$husk --rm {IMAGE} victim sleep 1000 & run_pid=$!
i=0; until ctr task ls | grep -q '^victim .*RUNNING' || [ $i -ge 300 ]; do sleep 0.2; i=$((i+1)); done
ctr task kill -s SIGKILL victim; wait $run_pid; echo \"sigkill-status=$?\"
$husk -d {IMAGE} orphan sleep 1000 || exit 1
kill -9 $(ps -o pid,args | grep '[c]ontainerd-shim-husk-v2' | awk '{{print $1}}')
i=0; while ctr task ls | grep -q '^orphan .*RUNNING' && [ $i -lt 150 ]; do sleep 0.2; i=$((i+1)); done
ctr task ls | grep -q '^orphan .*RUNNING' || echo 'shim-killed: the task is no longer running'
ctr task delete orphan >/dev/null 2>&1; ctr container rm orphan
$husk --rm --memory-limit 33554432 {IMAGE} hog sh -c 'x=a; while :; do x=$x$x; done'; echo \"oom-status=$?\"
# The OOM event may follow the exit: wait for it (or 30 s), not for a fixed time.
i=0; until grep -q /tasks/oom /tmp/husk-events || [ $i -ge 150 ]; do sleep 0.2; i=$((i+1)); done
kill $events_pid; echo \"topics: $(grep -o '/tasks/[a-z-]*' /tmp/husk-events | sort -u | tr '\\n' ' ')\""
    )
}

#[test]
fn ctr_task_exec_metrics_pause_resume_and_kill_reach_the_guest() {
    let text = steps_output("tasks");
    assert!(text.contains("from-exec") && text.contains("exec-status=3"), "{text}");
    let metric = |name: &str| -> u64 {
        let line = text.lines().find(|l| l.starts_with(name)).unwrap_or_else(|| panic!("no {name}: {text}"));
        line.split_whitespace().nth(1).and_then(|v| v.parse().ok()).unwrap_or_else(|| panic!("{line}"))
    };
    assert!(metric("pids.current") >= 1, "{text}");
    assert!(metric("memory.usage") > 0, "{text}");
    assert!(text.contains("ps-lines=1"), "one process (sleep) in the container: {text}");
    assert!(text.lines().any(|l| l.starts_with("paused: ") && l.contains("PAUSED")), "{text}");
    assert!(text.lines().any(|l| l.starts_with("resumed: ") && l.contains("RUNNING")), "{text}");
    assert!(text.lines().any(|l| l.starts_with("killed: ") && l.contains("STOPPED")), "{text}");
    assert!(text.contains("sigkill-status=137"), "SIGKILL ends ctr run with 137: {text}");
    // A shim killed with its pod: containerd's `shim delete` cleans up (checked after every test's steps).
    assert!(text.contains("shim-killed: the task is no longer running"), "{text}");
    // A container over its memory limit is OOM-killed in the guest and containerd hears of it.
    assert!(text.contains("oom-status=137"), "{text}");
    let topics = text.lines().find_map(|l| l.strip_prefix("topics: ")).unwrap_or_else(|| panic!("{text}"));
    for topic in
        ["create", "start", "exec-added", "exec-started", "paused", "resumed", "oom", "exit", "delete"]
    {
        assert!(topics.split(' ').any(|t| t == format!("/tasks/{topic}")), "event /tasks/{topic}: {topics}");
    }
}

fn cri_pod_steps() -> String {
    format!(
        "vol=$(mktemp -d); logs=$(mktemp -d)
{probe} \"$CONTAINERD_ADDRESS\" $vol $logs; echo \"cri-status=$?\"
sed 's/^/writer-log: /' $logs/writer.log; rm -rf $vol $logs
echo \"host-boot-id=$(cat /proc/sys/kernel/random/boot_id)\"",
        probe = target_bin("husk-cri-pod").display()
    )
}

#[test]
fn a_cri_pod_runs_its_containers_in_one_vm_sharing_a_volume_and_the_pods_namespaces() {
    let text = steps_output("cri");
    assert!(text.contains("cri-status=0") && text.contains("pod-removed"), "{text}");
    assert!(text.contains("host-sees=from-the-writer"), "the writer's file reached the host volume: {text}");
    assert!(text.contains("reader-sees=from-the-writer"), "the reader sees the writer's file: {text}");
    let boot_id = |name: &str| {
        let key = format!("{name}-boot-id=");
        text.lines()
            .find_map(|l| l.strip_prefix(key.as_str()))
            .map(str::to_owned)
            .unwrap_or_else(|| panic!("{text}"))
    };
    assert_eq!(boot_id("writer"), boot_id("reader"), "both containers run on one guest kernel: {text}");
    // Both are in the pod's IPC and UTS namespaces (its sandbox container's): the pod's hostname
    // and IPC sysctl, the same namespaces.
    let view = |name: &str| {
        let key = format!("{name}-pod-view=");
        text.lines().find_map(|l| l.strip_prefix(key.as_str())).unwrap_or_else(|| panic!("{text}"))
    };
    assert!(view("writer").starts_with("husk-pod shm_rmid_forced=1 ipc:["), "{text}");
    assert_eq!(view("writer"), view("reader"), "{text}");
    assert_ne!(boot_id("writer"), boot_id("host"), "and not on the host's: {text}");
    assert!(
        text.contains("writer-log: ") && text.contains("stdout F writer-started"),
        "CRI's container log: {text}"
    );
}

/// `husk-cri-pod --fault FAULT` against a CRI pod, after the shell steps `before` and followed by
/// `after`; also reports the pod network namespaces left (`netns-left=`).
/// The probe is bounded (8 min, within the steps' own bound) so that a wedged pod fails with
/// containerd's log and what `after` finds.
fn cri_fault_steps(fault: &str, before: &str, after: &str) -> String {
    format!(
        "{before}
logs=$(mktemp -d); timeout 480 {probe} --fault {fault} \"$CONTAINERD_ADDRESS\" $logs; echo \"cri-status=$?\"; rm -rf $logs
{after}
echo \"netns-left=$(ls /var/run/netns 2>/dev/null | wc -l)\"",
        probe = target_bin("husk-cri-pod").display()
    )
}

/// The output of the fault test `name` ([`cri_fault_steps`]), whose pod went and took its
/// network namespace and cgroup with it.
fn cri_fault_output(name: &str) -> String {
    let text = steps_output(name);
    assert!(text.contains("cri-status=0") && text.contains("pod-removed"), "{text}");
    assert!(text.contains("netns-left=0"), "{text}");
    // The shim (VMM and all) runs in the pod's cgroup, with the kernel threads KVM makes for
    // the VM (`kvm-nx-lpage-recovery-<pid>`), and its cgroup goes with the pod, even when the
    // shim was killed.
    let runs = text.lines().find_map(|l| l.strip_prefix("sandbox-cgroup-runs=")).unwrap_or_default();
    assert!(runs.split(',').any(|comm| comm == "containerd-shim"), "{text}");
    assert!(runs.split(',').all(|comm| comm == "containerd-shim" || comm.starts_with("kvm-")), "{text}");
    assert!(text.contains("sandbox-cgroup-left=false"), "{text}");
    text
}

/// Shell steps printing the first `the VM ended: ...` the shims logged during the test's steps.
const VM_END: &str = "step_log | grep -o 'the VM ended: [a-z ]*' | head -1";

fn vm_dies_steps() -> String {
    let after = format!(
        "echo \"lost=$(step_log | grep -c 'lost the process') console=$(step_log | grep -c 'guest console')\"\n{VM_END}"
    );
    cri_fault_steps("reboot", "", &after)
}

#[test]
fn when_a_pods_vm_dies_every_task_exits_with_an_error_and_the_console_is_logged() {
    let text = cri_fault_output("vm-dies");
    assert!(text.contains("victim-pid1=init"), "a hostPID pod shares the VM's PID namespace: {text}");
    assert!(text.contains("victim-exit=255") && text.contains("bystander-exit=255"), "{text}");
    assert!(
        !text.contains("lost=0") && !text.contains("console=0"),
        "the shim logged why, with the console: {text}"
    );
    assert!(text.contains("the VM ended: guest requested a reboot"), "{text}");
}

fn vm_panics_steps() -> String {
    let after = format!("{VM_END}\necho \"panic-in-log=$(step_log | grep -c 'panic_on_oom is enabled')\"");
    cri_fault_steps("panic", "", &after)
}

#[test]
fn a_guest_kernel_panic_ends_the_pods_tasks_with_the_panic_in_the_shims_log() {
    let text = cri_fault_output("vm-panics");
    assert!(text.contains("victim-exit=255") && text.contains("bystander-exit=255"), "{text}");
    assert!(text.contains("the VM ended: guest kernel panicked"), "{text}");
    assert!(!text.contains("panic-in-log=0"), "the console's panic reached the shim's log: {text}");
}

fn agent_crash_steps() -> String {
    let after = format!("{VM_END}\necho \"init-killed=$(step_log | grep -c 'Attempted to kill init')\"");
    cri_fault_steps("agent-crash", "", &after)
}

#[test]
fn a_crashed_agent_ends_the_pods_tasks_and_the_guest_kernel_names_it() {
    let text = cri_fault_output("agent-crash");
    assert!(text.contains("victim-exit=255") && text.contains("bystander-exit=255"), "{text}");
    assert!(text.contains("the VM ended: guest kernel panicked"), "{text}");
    assert!(
        !text.contains("init-killed=0"),
        "the console's 'Attempted to kill init' reached the log: {text}"
    );
}

fn agent_hang_steps() -> String {
    // A short health check (the default is 30 s), written where the shims read their
    // configuration (the next test's steps find it as shipped again).
    let before = "sed -i 's/^health_timeout_s = .*/health_timeout_s = 10/' \"$HUSK_CONFIG\"";
    let after = "echo \"hung-reported=$(step_log | grep -c 'the agent answered no health check within 10s')\"
echo \"console-logged=$(step_log | grep 'its agent does not answer' | grep -c 'console=')\"";
    cri_fault_steps("agent-hang", before, after)
}

#[test]
fn a_hung_agent_fails_its_health_check_and_the_pods_tasks_exit_with_that_reason() {
    let text = cri_fault_output("agent-hang");
    assert!(text.contains("victim-exit=255") && text.contains("bystander-exit=255"), "{text}");
    assert!(!text.contains("hung-reported=0") && text.contains("hung-reported="), "{text}");
    assert!(!text.contains("console-logged=0"), "the console's tail is logged with it: {text}");
}

fn vm_oom_steps() -> String {
    let limit = format!("export HUSK_POD_MEMORY_MAX={}", runtimeclass_memory_overhead());
    cri_fault_steps("vm-oom", &limit, "")
}

/// A pod whose guest fills all its memory (a container without a limit): the guest's OOM killer
/// takes the hog, the node charges the guest's RAM to the pod's cgroup, and the pod stays within
/// the limit the kubelet gives a pod without container limits (the RuntimeClass overhead alone),
/// so the node's OOM killer takes nothing.
#[test]
fn a_guest_filling_its_memory_is_charged_to_the_pods_cgroup_stays_within_it_and_keeps_serving() {
    let text = cri_fault_output("vm-oom");
    assert!(text.contains("bystander-after=answers"), "the pod's VM and agent survive: {text}");
    assert!(!text.contains("guest-oom-kills=0\n") && text.contains("guest-oom-kills="), "{text}");
    assert!(text.contains("pod-cgroup-oom-kills=0\n"), "the node's OOM killer took nothing: {text}");
    let peak: f64 = text
        .lines()
        .find_map(|l| l.strip_prefix("pod-cgroup-peak-mib="))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{text}"));
    // hypervisor.memory_mib's default: the guest's RAM, which it touched all of.
    let guest_mib = 256.0;
    assert!(peak >= 0.75 * guest_mib, "the guest's RAM is charged to the pod: {peak} MiB: {text}");
}

fn shim_kill_steps() -> String {
    cri_fault_steps("shim-kill", "", "")
}

#[test]
fn a_killed_cri_pod_shim_is_cleaned_up_and_its_tasks_report_the_kill() {
    let text = cri_fault_output("shim-kill");
    assert!(text.contains("shims-killed=1"), "{text}");
    // CRI reports the exit of a task whose shim died as 255 (unknown).
    assert!(text.contains("victim-exit=255") && text.contains("bystander-exit=255"), "{text}");
}

/// The test suite's soak: pods at once, pods in all (`make soak` runs 20 and 200).
const SOAK: (usize, usize) = (4, 12);

fn soak_steps() -> String {
    format!(
        "logs=$(mktemp -d); {soak} \"$CONTAINERD_ADDRESS\" $logs {} {}; echo \"soak-status=$?\"; rm -rf $logs",
        SOAK.0,
        SOAK.1,
        soak = target_bin("husk-cri-soak").display()
    )
}

#[test]
fn a_soak_of_pods_started_and_removed_in_rounds_leaves_the_node_as_it_was() {
    let text = steps_output("soak");
    assert!(text.contains("soak-status=0") && text.contains("soak: no growth"), "{text}");
    let growth: Vec<&str> = text.lines().filter(|l| l.starts_with("soak_growth ")).collect();
    assert_eq!(growth.len(), 11, "every count is reported: {text}");
    for line in growth.iter().filter(|l| !l.contains("used_mib=") && !l.contains("containerd_threads=")) {
        // Below zero is fine: the warm-up's count can still hold files the kernel frees late.
        let value = line.split('=').nth(1).and_then(|v| v.split_whitespace().next()?.parse::<i64>().ok());
        assert!(value.is_some_and(|growth| growth <= 0), "no growth: {line}");
    }
}

fn restart_steps() -> String {
    format!(
        "$husk -d {IMAGE} survivor sleep 1000 || exit 1
$CONTAINERD_RESTART && echo containerd-restarted
ctr task ls | grep '^survivor ' | sed 's/^/after-restart: /'
echo \"exec=$(ctr task exec --exec-id e1 survivor echo still-serving)\"
ctr events > /tmp/husk-restart-events 2>&1 & events_pid=$!
# Subscribed once it hears an event: an exec's, until one arrives (at most 30 execs).
i=0; until grep -q /tasks/exec-started /tmp/husk-restart-events || [ $i -ge 30 ]; do ctr task exec --exec-id listening$i survivor true; i=$((i+1)); done
ctr task kill -s SIGKILL survivor
i=0; until grep -q '/tasks/exit' /tmp/husk-restart-events || [ $i -ge 150 ]; do sleep 0.2; i=$((i+1)); done
kill $events_pid
grep '/tasks/exit' /tmp/husk-restart-events | grep -q survivor && echo exit-event=survivor
ctr task ls | grep '^survivor ' | sed 's/^/after-kill: /'
ctr task delete survivor >/dev/null; ctr container rm survivor"
    )
}

#[test]
fn containerd_restarting_under_a_running_pod_finds_it_serving_and_hears_its_exit() {
    let text = steps_output("restart");
    assert!(text.contains("containerd-restarted"), "{text}");
    assert!(text.lines().any(|l| l.starts_with("after-restart: ") && l.contains("RUNNING")), "{text}");
    assert!(text.contains("exec=still-serving"), "the shim serves the new containerd: {text}");
    assert!(text.contains("exit-event=survivor"), "the shim's events reach the new containerd: {text}");
    assert!(text.lines().any(|l| l.starts_with("after-kill: ") && l.contains("STOPPED")), "{text}");
}

fn disk_full_steps() -> String {
    format!(
        "mkdir -p /tmp/husk-small && mount -t tmpfs -o size=4m tmpfs /tmp/husk-small || exit 1
$husk --rm --mount type=bind,src=/tmp/husk-small,dst=/data,options=rbind:rw {IMAGE} filler sh -c \
  'dd if=/dev/zero of=/data/fill bs=1M count=16 conv=fsync 2>&1 | grep -o \"No space left on device\" | head -1
   rm /data/fill && echo after-full > /data/after && cat /data/after'; echo \"filler-status=$?\"
echo \"host-sees=$(cat /tmp/husk-small/after)\"
umount /tmp/husk-small"
    )
}

#[test]
fn a_full_volume_fails_the_containers_writes_with_enospc_and_the_pod_keeps_serving() {
    let text = steps_output("disk-full");
    assert!(text.contains("No space left on device"), "the writer hears ENOSPC: {text}");
    assert!(
        text.contains("after-full") && text.contains("filler-status=0"),
        "the share still serves: {text}"
    );
    assert!(text.contains("host-sees=after-full"), "{text}");
}

fn cri_net_steps() -> String {
    format!(
        "logs=$(mktemp -d); {probe} \"$CONTAINERD_ADDRESS\" $logs; echo \"cri-status=$?\"; rm -rf $logs
echo \"taps-left=$(/usr/bin/ip -o link | grep -c _husk)\"; echo \"ingress-left=$(/usr/sbin/tc qdisc show | grep -c ingress)\"",
        probe = target_bin("husk-cri-net").display()
    )
}

#[test]
fn cri_pods_get_their_cni_address_in_the_guest_and_reach_husk_and_runc_pods() {
    let text = steps_output("cri-net");
    assert!(text.contains("cri-status=0") && text.contains("pods-removed"), "{text}");
    let value = |key: &str| {
        let key = format!("{key}=");
        text.lines()
            .find_map(|l| l.strip_prefix(key.as_str()))
            .unwrap_or_else(|| panic!("{key}: {text}"))
            .to_owned()
    };
    let pod_ip = value("web-husk-ip");
    assert!(pod_ip.starts_with("10.88."), "CNI's host-local range: {text}");
    assert_eq!(
        value("web-husk-guest-eth0"),
        format!("{pod_ip}/16"),
        "the guest NIC has the CNI address: {text}"
    );
    for transfer in ["husk-to-husk", "husk-to-runc", "runc-to-husk"] {
        assert_eq!(value(transfer), "intact", "{transfer}: {text}");
    }
    // SIGUSR1 made both Husk pods' shims dump their VM's rings, each NIC counting traffic.
    assert_eq!(value("virtio-dump-nics-moving"), "2", "{text}");
    for leftover in ["netns-left", "veths-left", "taps-left", "ingress-left"] {
        assert_eq!(value(leftover), "0", "{leftover}: {text}");
    }
}

fn net_host_steps() -> String {
    format!("$husk --rm --net-host {IMAGE} hostnet true; echo \"status=$?\"")
}

#[test]
fn a_host_network_container_is_refused_with_a_message_naming_why_and_leaves_nothing() {
    let text = steps_output("net-host");
    assert!(!text.contains("status=0"), "{text}");
    assert!(text.contains("host networking is not supported"), "{text}");
}

/// One bad input to `ctr run`: shell steps first (`setup`), the flags before the image (none
/// with `--config`: the spec names the rootfs), and what the error must say.
struct BadInput {
    label: &'static str,
    setup: &'static str,
    flags: &'static str,
    says: &'static [&'static str],
}

impl BadInput {
    /// `ctr run`'s arguments after the flags for container `id`.
    fn target(&self, id: &str) -> String {
        if self.flags.contains("--config") {
            id.to_owned()
        } else {
            format!("{IMAGE} {id} true")
        }
    }
}

/// The operator allows the sizing annotations (off by default).
const ALLOW_SIZING: &str =
    "sed -i 's/^enable_annotations = .*/enable_annotations = [\"vcpus\", \"memory_mib\"]/' \"$HUSK_CONFIG\"";

const BAD_INPUTS: &[BadInput] = &[
    BadInput {
        label: "sizing-annotations-off",
        setup: "",
        flags: "--annotation io.husk.vcpus=2",
        says: &["annotation io.husk.vcpus", "not allowed by runtime.enable_annotations (empty, the default"],
    },
    BadInput {
        label: "vcpus-not-a-number",
        setup: ALLOW_SIZING,
        flags: "--annotation io.husk.vcpus=lots",
        says: &["annotation io.husk.vcpus", "\"lots\" is not a whole number"],
    },
    BadInput {
        label: "memory-out-of-range",
        setup: ALLOW_SIZING,
        flags: "--annotation io.husk.memory_mib=8",
        says: &["annotation io.husk.memory_mib", "must be 64 to 16384"],
    },
    BadInput {
        label: "unknown-husk-annotation",
        setup: "",
        flags: "--annotation io.husk.kernel=mine",
        says: &["annotation io.husk.kernel", "not allowed by runtime.enable_annotations"],
    },
    BadInput {
        label: "unknown-container-type",
        setup: "",
        flags: "--annotation io.kubernetes.cri.container-type=vm",
        // Refused by `start`, which containerd quotes with its escapes.
        says: &["annotation io.kubernetes.cri.container-type", "vm", "expected", "sandbox"],
    },
    BadInput {
        label: "missing-mount-source",
        setup: "",
        flags: "--mount type=bind,src=/nonexistent/husk-volume,dst=/data,options=rbind:ro",
        says: &["sharing /nonexistent/husk-volume with the guest", "No such file or directory"],
    },
    BadInput {
        label: "spec-without-args",
        setup: "mkdir -p /tmp/husk-bad-root && printf '%s' '{\"ociVersion\":\"1.1.0\",\"process\":{\"user\":{\"uid\":0,\"gid\":0},\"args\":[],\"cwd\":\"/\"},\"root\":{\"path\":\"/tmp/husk-bad-root\"},\"linux\":{\"namespaces\":[{\"type\":\"pid\"},{\"type\":\"mount\"},{\"type\":\"network\"}]}}' > /tmp/husk-bad-spec.json",
        flags: "--config /tmp/husk-bad-spec.json",
        says: &["oci_spec: process.args is empty"],
    },
    BadInput {
        label: "config-vcpus-zero",
        setup: "printf '[hypervisor]\\nvcpus = 0\\n' > \"$HUSK_CONFIG\"",
        flags: "",
        says: &["husk.toml", "hypervisor.vcpus = 0: must be 1 to max_vcpus"],
    },
    BadInput {
        label: "config-unknown-key",
        setup: "printf '[hypervisor]\\nmemory = 512\\n' > \"$HUSK_CONFIG\"",
        flags: "",
        says: &["husk.toml", "unknown field `memory`"],
    },
    BadInput {
        label: "config-missing-image",
        setup: "printf '[hypervisor]\\nimage_dir = \"/nonexistent/husk-image\"\\n' > \"$HUSK_CONFIG\"",
        flags: "",
        says: &["/nonexistent/husk-image"],
    },
];

fn bad_input_steps() -> String {
    let mut steps = String::from("cp \"$HUSK_CONFIG\" /tmp/husk-good.toml\n");
    for (i, bad) in BAD_INPUTS.iter().enumerate() {
        steps.push_str(&format!(
            "{setup}
$husk --rm {flags} {target} > /tmp/husk-bad-out 2>&1; echo \"{label}-status=$?\"
echo \"{label}-said: $(tr '\\n' ' ' < /tmp/husk-bad-out)\"
cp /tmp/husk-good.toml \"$HUSK_CONFIG\"; ctr container rm bad{i} >/dev/null 2>&1 || true
",
            setup = bad.setup,
            flags = bad.flags,
            target = bad.target(&format!("bad{i}")),
            label = bad.label,
        ));
    }
    steps
}

#[test]
fn malformed_annotations_specs_and_configurations_are_refused_by_name_and_leave_nothing() {
    let text = steps_output("bad-input");
    for bad in BAD_INPUTS {
        let status = format!("{}-status=", bad.label);
        let code =
            text.lines().find_map(|l| l.strip_prefix(status.as_str())).unwrap_or_else(|| panic!("{text}"));
        assert_ne!(code, "0", "{}: refused: {text}", bad.label);
        let said_key = format!("{}-said: ", bad.label);
        let said = text.lines().find_map(|l| l.strip_prefix(said_key.as_str())).unwrap_or_default();
        for part in bad.says {
            assert!(said.contains(part), "{}: the error names {part:?}: {said}", bad.label);
        }
    }
}

/// `ctr run` flags of a CRI pod's sandbox container, as CRI annotates it (the shim groups by them).
const SANDBOX: &str = "--annotation io.kubernetes.cri.container-type=sandbox";

/// `ctr run` flags of a member container of the CRI pod whose sandbox is `pod`.
fn member_of(pod: &str) -> String {
    format!("--annotation io.kubernetes.cri.container-type=container --annotation io.kubernetes.cri.sandbox-id={pod}")
}

fn hostile_steps() -> String {
    let (sandbox, member) = (SANDBOX, member_of("pwn"));
    format!(
        "mkdir -p /tmp/victim-dir /tmp/vol; echo precious > /tmp/victim-file; echo volume-content > /tmp/vol/f
$husk -d --privileged {sandbox} {IMAGE} pwn sleep 1000 || exit 1
ctr task exec --exec-id plant pwn sh -c 'mkdir -p /mnt/s && mount -t virtiofs husk-shared /mnt/s || exit 9
  mkdir /mnt/s/victim2 2>/dev/null; echo \"plant-dir=$?\"
  ln -s /tmp/victim-dir /mnt/s/victim2-rootfs 2>/dev/null; echo \"plant-link=$?\"
  touch /mnt/s/pwn/planted 2>/dev/null; echo \"plant-beside-rootfs=$?\"
  touch /mnt/s/pwn/rootfs/tmp/inside-rootfs; echo \"write-own-rootfs=$?\"'; echo \"exec-status=$?\"
$husk --rm --mount type=bind,src=/tmp/vol,dst=/data,options=rbind:rw {member} {IMAGE} victim2 cat /data/f
echo \"victim-status=$?\"
shares() {{ grep -E ' /run/husk/sandboxes/[^ ]*/(rootfs|mounts/[0-9]+) ' /proc/mounts; }}
echo \"shares-nosuid=$(shares | grep -c nosuid) shares=$(shares | wc -l)\"
ctr task kill -s SIGKILL pwn
i=0; until ctr task ls | grep -q '^pwn .*STOPPED' || [ $i -ge 100 ]; do sleep 0.2; i=$((i+1)); done
ctr task delete pwn; ctr container rm pwn
echo \"node: victim-file=$(cat /tmp/victim-file) victim-dir-entries=$(ls -A /tmp/victim-dir | wc -l) victim-mounts=$(grep -c victim /proc/mounts)\""
    )
}

/// The escape of issue 19, as an attacker would try it: the pod's privileged sandbox container
/// (root in the VM) mounts the pod's virtio-fs share and plants symlinks at the names the shim
/// will mount the next container's rootfs and volume on, pointing at node paths. The share's tree
/// is read-only to the guest (only the mounts in it are writable), so every plant fails, the next
/// container starts with its volume, and the node's files and mount table are untouched.
#[test]
fn a_root_guest_cannot_steer_the_shims_mounts_onto_node_paths() {
    let text = steps_output("hostile");
    for refused in ["plant-dir", "plant-link", "plant-beside-rootfs"] {
        assert!(text.contains(&format!("{refused}=1")), "{refused}: the guest's plant must fail: {text}");
    }
    assert!(
        text.contains("write-own-rootfs=0") && text.contains("exec-status=0"),
        "its rootfs stays writable: {text}"
    );
    assert!(
        text.contains("volume-content") && text.contains("victim-status=0"),
        "the next container runs: {text}"
    );
    let shares = text.lines().find(|l| l.starts_with("shares-nosuid=")).unwrap_or_else(|| panic!("{text}"));
    let counts: Vec<&str> = shares.split(['=', ' ']).collect();
    assert!(counts[3] != "0" && counts[1] == counts[3], "every share is nosuid on the node: {shares}");
    assert!(text.contains("node: victim-file=precious victim-dir-entries=0 victim-mounts=0"), "{text}");
}

/// Shim descriptors a finished exec may still hold for a moment (its stdio), not a leak.
const FD_NOISE: i64 = 4;

fn hostile_guest_steps() -> String {
    let (sandbox, member) = (SANDBOX, member_of("attacker"));
    let vsock_tool = workspace_root().join("target/x86_64-unknown-linux-gnu/guest/husk-vsock-test");
    format!(
        "mkdir -p /tmp/tools /tmp/vol2 /tmp/race-victim && cp {vsock_tool} /tmp/tools/ && echo volume-content > /tmp/vol2/f
cp {probe} /tmp/vol2/setuid-probe && chmod 0755 /tmp/vol2/setuid-probe || exit 1
$husk -d --privileged --mount type=bind,src=/tmp/tools,dst=/tools,options=rbind:ro {sandbox} {IMAGE} attacker sleep 1000 || exit 1
ctr task exec --exec-id mount attacker sh -c 'mkdir -p /mnt/s && mount -t virtiofs husk-shared /mnt/s'; echo \"mount-status=$?\"
# Plants at every name of the next container's share, over and over while it is being created:
# new directories and links (and a rename of its directory) count when they succeed.
ctr task exec --detach --log-uri file:///tmp/race.log --exec-id race attacker sh -c 'n=0; ok=0; while [ ! -e /tmp/stop ]; do
  for name in target target/rootfs target/mounts target/mounts/0 target-rootfs; do
    mkdir /mnt/s/$name 2>/dev/null && ok=$((ok+1))
    ln -s /tmp/race-victim /mnt/s/$name.link 2>/dev/null && ok=$((ok+1))
  done
  mv /mnt/s/target /mnt/s/moved 2>/dev/null && ok=$((ok+1))
  n=$((n+1)); echo \"$n $ok\" > /tmp/race; done'
i=0; until [ -n \"$(ctr task exec --exec-id w$i attacker cat /tmp/race 2>/dev/null)\" ] || [ $i -ge 60 ]; do sleep 0.5; i=$((i+1)); done
echo \"race-started: $(ctr task exec --exec-id r1 attacker cat /tmp/race)\"
# The next container makes the probe in its volume setuid-root (as root in the guest may).
$husk -d --log-uri file:///tmp/target.log --mount type=bind,src=/tmp/vol2,dst=/data,options=rbind:rw {member} {IMAGE} target \\
  sh -c 'cat /data/f; chmod 4755 /data/setuid-probe && echo chmod-done; exec sleep 1000'; echo \"target-status=$?\"
i=0; until grep -q chmod-done /tmp/target.log 2>/dev/null || [ $i -ge 300 ]; do sleep 0.2; i=$((i+1)); done
echo \"race-ended: $(ctr task exec --exec-id r2 attacker sh -c 'cat /tmp/race; touch /tmp/stop')\"
echo \"target-log: $(tr '\\n' ' ' < /tmp/target.log)\"
echo \"probe-mode: $(stat -c '%a %u' /tmp/vol2/setuid-probe)\"
share=$(awk '$2 ~ /\\/target\\/mounts\\/0$/ {{ print $2; exit }}' /proc/mounts)
echo \"via-share: $({probe} --exec-as 65534 \"$share/setuid-probe\" 2>&1)\"
echo \"via-node-path: $({probe} --exec-as 65534 /tmp/vol2/setuid-probe 2>&1)\"
# `ctr run --privileged` lists the node's devices in the spec (its disk /dev/vda among them): in
# the VM the same numbers name the guest's devices (it has no disk: nothing to read).
echo \"devices: in-pod=$(ctr task exec --exec-id dev attacker sh -c '[ -b /dev/vda ] && echo listed; head -c 4096 /dev/vda 2>/dev/null | md5sum | cut -c1-12' | tr '\\n' ' ')node=$(head -c 4096 /dev/vda | md5sum | cut -c1-12)\"
# Guest connections to a host port nobody may reach, 200 at once then 100 in a row.
shim=$(ps -o pid,args | grep '[c]ontainerd-shim-husk-v2' | awk '{{ print $1 }}' | head -1)
fds_before=$(ls /proc/$shim/fd | wc -l)
ctr task exec --exec-id flood attacker sh -c 'i=0; while [ $i -lt 200 ]; do /tools/husk-vsock-test connect 5000 </dev/null >/dev/null 2>&1 & i=$((i+1)); done; wait
  r=0; for j in $(seq 100); do /tools/husk-vsock-test connect 5000 </dev/null >/dev/null 2>&1 || r=$((r+1)); done; echo \"flood-refused=$r\"'
echo \"shim-fds: before=$fds_before after=$(ls /proc/$shim/fd | wc -l) port-files=$(ls /run/husk/sandboxes/*/ | grep -c _5000)\"
echo \"after-flood: $(ctr task exec --exec-id after target cat /data/f)\"
for task in target attacker; do
  ctr task kill -s SIGKILL $task
  i=0; until ctr task ls | grep -q \"^$task .*STOPPED\" || [ $i -ge 100 ]; do sleep 0.2; i=$((i+1)); done
  ctr task delete $task; ctr container rm $task
done
echo \"node: race-victim-entries=$(ls -A /tmp/race-victim | wc -l) race-victim-mounts=$(grep -c race-victim /proc/mounts)\"",
        vsock_tool = vsock_tool.display(),
        probe = target_bin("husk-setuid-probe").display(),
    )
}

/// The rest of the hostile-guest suite (issue 19), through a pod as an attacker would use it: a
/// privileged sandbox container (root in the VM) mounts the share and keeps planting directories
/// and links at every name of the next container while that container is created (the race
/// the read-only share view closes: every plant fails, and the next container gets its volume);
/// that container makes a copy of a probe in its volume setuid-root, which through the pod's
/// share runs as its caller on the node (`nosuid`); the node's disk, listed as a device of the
/// privileged container, reads as the guest's device of that number (none); and the attacker floods vsock with
/// connections to a host port it may not reach: all refused, no host descriptor or file made, and
/// the pod keeps serving.
#[test]
fn a_root_guest_racing_a_create_flooding_vsock_and_making_setuid_files_gains_nothing_on_the_node() {
    let text = steps_output("hostile-guest");
    let field =
        |key: &str| text.lines().find_map(|l| l.strip_prefix(key)).unwrap_or_else(|| panic!("{key}: {text}"));
    assert!(text.contains("mount-status=0") && text.contains("target-status=0"), "{text}");
    let counts = |key: &str| -> (u64, u64) {
        let value = field(key);
        let mut numbers =
            value.split_whitespace().map(|n| n.parse::<u64>().unwrap_or_else(|_| panic!("{key} {value}")));
        (numbers.next().unwrap(), numbers.next().unwrap())
    };
    let (started, _) = counts("race-started: ");
    let (ended, planted) = counts("race-ended: ");
    assert!(started >= 1 && ended > started, "the plants ran before and during the create: {text}");
    assert_eq!(planted, 0, "no plant succeeded: {text}");
    assert!(field("target-log: ").contains("volume-content chmod-done"), "{text}");
    // The guest made it setuid-root on the node (the control below runs it as root), and the
    // pod's share does not honour that.
    assert_eq!(field("probe-mode: "), "4755 0", "{text}");
    assert_eq!(field("via-share: "), "euid=65534", "{text}");
    assert_eq!(field("via-node-path: "), "euid=0", "{text}");
    // The node's disk is listed in the container (its device node exists there), but what it
    // reads is not the node's disk (the guest's device of that number, if it has one).
    let devices = field("devices: ");
    let (in_pod, node) = devices.split_once(" node=").unwrap_or_else(|| panic!("{devices}"));
    let in_pod = in_pod.strip_prefix("in-pod=listed ").unwrap_or_else(|| panic!("not listed: {devices}"));
    assert!(node.len() == 12 && node != "d41d8cd98f00", "the node reads its disk: {devices}");
    assert_ne!(in_pod, node, "the pod reads the node's disk: {devices}");
    assert!(text.contains("flood-refused=100"), "{text}");
    let fds = field("shim-fds: ");
    let number = |key: &str| -> i64 {
        fds.split_whitespace()
            .find_map(|w| w.strip_prefix(key))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{key}: {fds}"))
    };
    assert!(number("after=") - number("before=") <= FD_NOISE, "the shim holds no more descriptors: {fds}");
    assert_eq!(number("port-files="), 0, "no host socket was made for the guest: {fds}");
    assert_eq!(field("after-flood: "), "volume-content", "the pod keeps serving: {text}");
    assert!(text.contains("node: race-victim-entries=0 race-victim-mounts=0"), "{text}");
}

/// A privileged container becomes a node of its own inside its VM (`tests/nested-node/node.sh`):
/// the test host's containerd, runc, CNI plugins, iproute2 (`/usr/bin/ip`) and nft, given to it as read-only
/// volumes with their shared libraries, run a busybox container with a CNI bridge network, on
/// overlayfs over a tmpfs, in a delegated cgroup tree that enforces their limits, and reaching a namespace
/// behind a veth only through an nftables masquerade.
fn nested_steps() -> String {
    let root = workspace_root();
    format!(
        "mkdir -p /tmp/nested-images && ctr images export /tmp/nested-images/busybox.tar {IMAGE} || exit 1
md5sum < /tmp/nested-images/busybox.tar > /tmp/nested-images/busybox.tar.md5
libs=; for dir in /lib/x86_64-linux-gnu /usr/lib/x86_64-linux-gnu /lib64; do
  [ -d $dir ] && libs=\"$libs --mount type=bind,src=$dir,dst=$dir,options=rbind:ro\"; done
$husk --rm --privileged --memory-limit 536870912 $libs \\
  --mount type=bind,src={containerd},dst=/usr/local/bin,options=rbind:ro \\
  --mount type=bind,src=/usr/sbin,dst=/usr/sbin,options=rbind:ro \\
  --mount type=bind,src=/usr/bin/ip,dst=/usr/bin/ip,options=rbind:ro \\
  --mount type=bind,src=/usr/lib/cni,dst=/opt/cni/bin,options=rbind:ro \\
  --mount type=bind,src={scripts},dst=/nested,options=rbind:ro \\
  --mount type=bind,src=/tmp/nested-images,dst=/images,options=rbind:ro \\
  {IMAGE} nested-node sh /nested/node.sh; echo \"nested-status=$?\"
rm -rf /tmp/nested-images",
        containerd = root.join("build/containerd/bin").display(),
        scripts = root.join("tests/nested-node").display(),
    )
}

/// Security-focused CI runners run Docker or containerd inside a privileged pod; inside a Husk VM
/// that is safe, and it works as under runc: bridges, veth, netfilter NAT, overlayfs, network
/// namespaces and a delegated cgroup tree (issue 20).
#[test]
fn a_privileged_container_runs_containerd_and_runc_with_a_bridge_network_nat_and_overlay_in_its_vm() {
    let text = steps_output("nested");
    let field =
        |key: &str| text.lines().find_map(|l| l.strip_prefix(key)).unwrap_or_else(|| panic!("{key}: {text}"));
    assert_eq!(field("nested-status="), "0", "{text}");
    assert!(field("nested-cgroup-controllers=").contains("memory"), "{text}");
    assert_eq!(field("nested-root-fs="), "overlay", "the nested container's root: {text}");
    let address = field("nested-address=");
    assert!(address.starts_with("10.99.0.") && address.ends_with("/24"), "a bridge address: {text}");
    // The nested containers' cgroups are below the pod container's own, and their limits hold.
    assert!(field("nested-cgroup=").ends_with("/nested-node/nested"), "{text}");
    assert_eq!(field("nested-oom-status="), "137", "a nested container over its memory limit: {text}");
    assert_eq!(field("nested-gateway="), "reached", "{text}");
    // The outside namespace has no route to 10.99.0.0/24: the answer came back through the
    // masquerade, which the outside saw as the veth's address.
    assert_eq!(field("nested-outside-peer="), "192.0.2.1", "{text}");
    let packets: u64 = field("nested-masquerade-packets=").parse().unwrap_or_else(|_| panic!("{text}"));
    assert!(packets >= 1, "{text}");
}

/// A volume with a submount of its own, given `rro` (Kubernetes' recursive read-only volumes; the
/// shim reports the option to containerd with `-info`): the container reads the submount's file
/// and cannot write there, and neither can root in the guest through the pod's share (where the
/// guest's own mount options do not count).
fn rro_steps() -> String {
    format!(
        "mkdir -p /tmp/rro/sub && mount -t tmpfs -o size=1m tmpfs /tmp/rro/sub && echo from-the-node > /tmp/rro/sub/f || exit 1
$husk --rm --privileged --mount type=bind,src=/tmp/rro,dst=/data,options=rbind:rro {IMAGE} rro sh -c '
  echo \"rro-read=$(cat /data/sub/f)\"
  touch /data/sub/written 2>/dev/null && echo rro-container=written || echo rro-container=refused
  mkdir -p /mnt/s && mount -t virtiofs husk-shared /mnt/s || exit 9
  sub=$(ls -d /mnt/s/*/mounts/0/sub)
  echo \"rro-share-read=$(cat $sub/f)\"
  touch $sub/written 2>/dev/null && echo rro-share=written || echo rro-share=refused'; echo \"rro-status=$?\"
echo \"rro-node-files=$(ls /tmp/rro/sub | tr '\\n' ' ')\"
umount /tmp/rro/sub && echo rro-node-unmounted; rm -rf /tmp/rro",
    )
}

#[test]
fn a_recursive_read_only_volume_is_read_only_all_through_in_the_guest_and_in_the_pods_share() {
    let text = steps_output("rro");
    assert!(text.contains("rro-status=0"), "{text}");
    assert!(
        text.contains("rro-read=from-the-node") && text.contains("rro-share-read=from-the-node"),
        "{text}"
    );
    assert!(text.contains("rro-container=refused"), "the container wrote under its rro volume: {text}");
    assert!(text.contains("rro-share=refused"), "root in the guest wrote through the share: {text}");
    assert!(text.contains("rro-node-files=f \n"), "nothing was written on the node: {text}");
    assert!(text.contains("rro-node-unmounted"), "the node's submount is released: {text}");
}
