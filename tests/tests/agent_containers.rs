//! Containers through the agent API in host mode: husk-agent serves on a unix socket on this
//! machine and creates real containers (namespaces, overlay rootfs, stdio streams) from OCI specs
//! over a busybox image, as it does inside the guest (needs root, like the agent); and the same
//! through a real VM (test host), with the image on virtio-fs and stdio on vsock.

// Test code: a failed expectation is a test failure.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use husk_shim::agent_client::AgentClient;
use husk_tests::host_agent::{
    busybox_spec, process_json, spec_json, spec_json_with_resources, start_container, stdio, terminal_stdio,
    HostAgent, TestStdio,
};
use husk_tests::{combined, describe, guest_dir, run, target_bin, VmHost};
use oci_spec::runtime::Spec;
use serde_json::json;

const SIGKILL: u32 = 9;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}

/// Creates and starts container `id` running `args` with stdout/stderr (and stdin) streams.
async fn run_container(client: &AgentClient, id: &str, args: &[&str], with_stdin: bool) -> TestStdio {
    run_spec(client, id, &busybox_spec(args), with_stdin).await
}

/// Creates and starts container `id` from `spec` with stdout/stderr (and stdin) streams.
async fn run_spec(client: &AgentClient, id: &str, spec: &Spec, with_stdin: bool) -> TestStdio {
    start_container(client, id, spec, with_stdin).await.unwrap()
}

#[test]
fn a_container_prints_to_its_stdout_stream_and_its_exit_code_is_reported() {
    let agent = HostAgent::with_busybox().unwrap();
    runtime().block_on(async {
        let client = agent.client().await.unwrap();
        let args = ["sh", "-c", "echo hello-from-container; echo to-stderr >&2; echo pid=$$; exit 3"];
        let mut streams = run_container(&client, "echo", &args, false).await;
        let (out, err) = streams.output().await;
        assert_eq!(out, "hello-from-container\npid=1\n", "its own pid namespace, its own output");
        assert_eq!(err, "to-stderr\n");
        let exit = client.wait_process("echo", "").await.unwrap();
        assert_eq!(exit.status, 3);
        assert!(exit.exited_at_unix_ns > 0);
        client.remove_container("echo", false).await.unwrap();
    });
    assert_eq!(
        std::fs::read_dir(agent.state_dir().join("bundles")).unwrap().count(),
        0,
        "the bundle is gone"
    );
}

#[test]
fn sigkill_ends_a_container_with_status_137_and_exec_runs_beside_its_init() {
    let agent = HostAgent::with_busybox().unwrap();
    runtime().block_on(async {
        let client = agent.client().await.unwrap();
        let _init = run_container(&client, "sleeper", &["sleep", "1000"], false).await;
        let exec_stdio = stdio("sleeper-exec", false);
        let mut exec = TestStdio::open(&client, &exec_stdio).await.unwrap();
        let args = ["sh", "-c", "echo init=$(cat /proc/1/comm) pids=$(ls /proc | grep -c '^[0-9]'); exit 5"];
        client.exec_process("sleeper", "e1", process_json(&args), exec_stdio).await.unwrap();
        let (out, _) = exec.output().await;
        // The container's init is pid 1; besides it only the exec's shell, its subshell, ls and
        // grep: nothing of the host's.
        let (init, pids) = out.trim().split_once(' ').unwrap();
        assert_eq!(init, "init=sleep", "{out}");
        let pids: u32 = pids.strip_prefix("pids=").unwrap().parse().unwrap();
        assert!((2..=6).contains(&pids), "the exec sees only the container's processes: {out}");
        assert_eq!(client.wait_process("sleeper", "e1").await.unwrap().status, 5);
        // Another container of the pod sees neither the sleeper nor the agent.
        let mut peer = run_container(&client, "peer", &["sh", "-c", "cat /proc/[0-9]*/comm"], false).await;
        let (seen, _) = peer.output().await;
        assert!(!seen.contains("sleep") && !seen.contains("husk-agent"), "peer sees: {seen}");
        assert_eq!(client.wait_process("peer", "").await.unwrap().status, 0);
        client.remove_container("peer", false).await.unwrap();
        let err = client.remove_container("sleeper", false).await.unwrap_err().to_string();
        assert!(err.contains("FAILED_PRECONDITION") && err.contains("running"), "{err}");
        client.signal_process("sleeper", "", SIGKILL, false).await.unwrap();
        assert_eq!(client.wait_process("sleeper", "").await.unwrap().status, 137);
        assert_eq!(client.wait_process("sleeper", "").await.unwrap().status, 137, "asked again, same answer");
        client.remove_container("sleeper", false).await.unwrap();
    });
}

#[test]
fn stdin_reaches_the_container_and_close_stdin_ends_it() {
    let agent = HostAgent::with_busybox().unwrap();
    runtime().block_on(async {
        let client = agent.client().await.unwrap();
        let mut streams = run_container(&client, "cat", &["cat"], true).await;
        streams.write_stdin(b"piped through\n").await.unwrap();
        client.close_stdin("cat", "").await.unwrap();
        let (out, _) = tokio::time::timeout(Duration::from_secs(30), streams.output()).await.unwrap();
        assert_eq!(out, "piped through\n");
        assert_eq!(client.wait_process("cat", "").await.unwrap().status, 0, "cat saw EOF and exited");
        client.remove_container("cat", false).await.unwrap();
    });
}

#[test]
fn a_terminal_process_gets_a_pty_its_window_size_and_its_input() {
    let agent = HostAgent::with_busybox().unwrap();
    runtime().block_on(async {
        let client = agent.client().await.unwrap();
        let mut spec = busybox_spec(&["sh", "-c", "tty; stty size; read line; echo got=$line; exit 6"]);
        spec.process_mut().as_mut().unwrap().set_terminal(Some(true));
        let stdio = terminal_stdio("tty");
        let mut streams = TestStdio::open(&client, &stdio).await.unwrap();
        client.create_container("tty", spec_json(&spec), stdio.clone()).await.unwrap();
        client.resize_pty("tty", "", 100, 40).await.unwrap();
        client.start_container("tty").await.unwrap();
        streams.write_stdin(b"hello\n").await.unwrap();
        let (out, _) = tokio::time::timeout(Duration::from_secs(30), streams.output()).await.unwrap();
        assert!(out.contains("/dev/pts/"), "stdin and stdout are a terminal: {out:?}");
        assert!(out.contains("40 100\r\n"), "the window size set before start: {out:?}");
        assert!(out.contains("got=hello\r\n"), "input reached the process through the pty: {out:?}");
        assert_eq!(client.wait_process("tty", "").await.unwrap().status, 6);
        let err = client.resize_pty("nobody", "", 1, 1).await.unwrap_err().to_string();
        assert!(err.contains("NOT_FOUND"), "{err}");
        // A terminal the process does not ask for is a named error.
        let err = client
            .create_container("mismatch", spec_json(&busybox_spec(&["true"])), stdio)
            .await
            .unwrap_err();
        assert!(err.to_string().contains("stdio.terminal"), "{err}");
        client.remove_container("tty", false).await.unwrap();
    });
}

#[test]
fn a_memory_limit_oom_kills_and_reports_an_oom_event() {
    let agent = HostAgent::with_busybox().unwrap();
    runtime().block_on(async {
        let client = agent.client().await.unwrap();
        // sort keeps its whole input (one 64 MB line) in memory: far over the 16 MiB limit.
        let spec = busybox_spec(&["sh", "-c", "head -c 64000000 /dev/zero | sort > /dev/null"]);
        let limit = 16 << 20;
        let resources = json!({"memory": {"limit": limit, "swap": limit}});
        let stdio = stdio("oom", false);
        let mut streams = TestStdio::open(&client, &stdio).await.unwrap();
        client.create_container("oom", spec_json_with_resources(&spec, resources), stdio).await.unwrap();
        client.start_container("oom").await.unwrap();
        let (_, err) = streams.output().await;
        assert_eq!(client.wait_process("oom", "").await.unwrap().status, 137, "killed: {err}");
        let event =
            tokio::time::timeout(Duration::from_secs(10), client.next_oom_event()).await.unwrap().unwrap();
        assert_eq!(event, "oom");
        let stats = client.stats_container("oom").await.unwrap();
        assert!(stats.oom_kills >= 1 && stats.memory_limit_bytes == limit, "{stats:?}");
        client.remove_container("oom", false).await.unwrap();
    });
}

#[test]
fn a_pids_limit_is_enforced_and_stats_and_updates_follow_the_container() {
    let agent = HostAgent::with_busybox().unwrap();
    runtime().block_on(async {
        let client = agent.client().await.unwrap();
        // A failed fork ends a shell, so the forking runs in a child shell.
        let script = "read go; sh -c 'for i in $(seq 1 10); do sleep 30 & done'; echo forked; i=0; \
                      while [ $i -lt 30000 ]; do i=$((i+1)); done; echo counted; read done";
        let spec = busybox_spec(&["sh", "-c", script]);
        let stdio = stdio("pids", true);
        let mut streams = TestStdio::open(&client, &stdio).await.unwrap();
        let resources = json!({"pids": {"limit": 5}});
        client.create_container("pids", spec_json_with_resources(&spec, resources), stdio).await.unwrap();
        client.start_container("pids").await.unwrap();
        let before = client.stats_container("pids").await.unwrap();
        assert_eq!(before.pids_limit, 5, "{before:?}");
        streams.write_stdin(b"go\n").await.unwrap();
        let mut out = Vec::new();
        let stdout = streams.stdout.as_mut().unwrap();
        while !String::from_utf8_lossy(&out).contains("counted") {
            let mut chunk = [0u8; 256];
            let read = tokio::io::AsyncReadExt::read(stdout, &mut chunk).await.unwrap();
            assert!(read > 0, "stdout ended early: {}", String::from_utf8_lossy(&out));
            out.extend_from_slice(&chunk[..read]);
        }
        let during = client.stats_container("pids").await.unwrap();
        assert!((2..=5).contains(&during.pids_current), "the limit held: {during:?}");
        assert!(during.cpu_usage_usec > before.cpu_usage_usec, "CPU time moved: {before:?} -> {during:?}");
        assert!(during.memory_usage_bytes > 0, "{during:?}");
        client
            .update_container("pids", serde_json::to_vec(&json!({"pids": {"limit": 50}})).unwrap())
            .await
            .unwrap();
        assert_eq!(client.stats_container("pids").await.unwrap().pids_limit, 50, "the update applied");
        let err = client.update_container("pids", b"[1]".to_vec()).await.unwrap_err().to_string();
        assert!(err.contains("INVALID_ARGUMENT") && err.contains("resources"), "{err}");
        client.pause_container("pids").await.unwrap();
        client.resume_container("pids").await.unwrap();
        streams.write_stdin(b"done\n").await.unwrap();
        let (_, err) = streams.output().await;
        assert!(err.contains("can't fork"), "forks beyond the limit failed: {err}");
        assert_eq!(client.wait_process("pids", "").await.unwrap().status, 0);
        let err = client.pause_container("pids").await.unwrap_err().to_string();
        assert!(err.contains("FAILED_PRECONDITION"), "{err}");
        client.remove_container("pids", true).await.unwrap();
    });
}

#[test]
fn the_spec_user_capabilities_and_rlimits_apply() {
    let agent = HostAgent::with_busybox().unwrap();
    runtime().block_on(async {
        let client = agent.client().await.unwrap();
        let script =
            "echo uid=$(id -u) gid=$(id -g); ulimit -n; grep -E '^(CapEff|NoNewPrivs)' /proc/self/status; \
                      chown 1:1 /tmp 2>&1 || echo chown-refused";
        let mut spec = busybox_spec(&["sh", "-c", script]);
        let mut value = serde_json::to_value(&spec).unwrap();
        value["process"]["user"] = json!({"uid": 65534, "gid": 65534});
        value["process"]["rlimits"] = json!([{"type": "RLIMIT_NOFILE", "hard": 321, "soft": 123}]);
        spec = serde_json::from_value(value).unwrap();
        let mut streams = run_spec(&client, "user", &spec, false).await;
        let (out, _) = streams.output().await;
        assert!(out.contains("uid=65534 gid=65534"), "{out}");
        assert!(out.contains("123\n"), "the soft RLIMIT_NOFILE: {out}");
        // The default spec's set: AUDIT_WRITE (29), NET_BIND_SERVICE (10), KILL (5); no CHOWN.
        assert!(out.contains("CapEff:\t0000000020000420"), "exactly the spec's capabilities: {out}");
        assert!(out.contains("NoNewPrivs:\t1"), "{out}");
        assert!(out.contains("chown-refused"), "{out}");
        // Output ends before the exit is reaped: wait, then remove.
        assert_eq!(client.wait_process("user", "").await.unwrap().status, 0);
        client.remove_container("user", false).await.unwrap();
    });
}

#[test]
fn a_read_only_rootfs_refuses_writes_and_a_writable_one_keeps_them_off_the_image() {
    let agent = HostAgent::with_busybox().unwrap();
    runtime().block_on(async {
        let client = agent.client().await.unwrap();
        // The default spec's root is read-only.
        let mut ro = run_container(&client, "ro", &["sh", "-c", "touch /new-file"], false).await;
        let (_, err) = ro.output().await;
        assert!(err.contains("Read-only file system"), "{err}");
        assert_ne!(client.wait_process("ro", "").await.unwrap().status, 0);
        let mut spec = busybox_spec(&["sh", "-c", "echo written > /new-file && cat /new-file"]);
        spec.root_mut().as_mut().unwrap().set_readonly(Some(false));
        let rw_stdio = stdio("rw", false);
        let mut rw = TestStdio::open(&client, &rw_stdio).await.unwrap();
        client.create_container("rw", spec_json(&spec), rw_stdio).await.unwrap();
        client.start_container("rw").await.unwrap();
        assert_eq!(rw.output().await.0, "written\n");
        assert_eq!(client.wait_process("rw", "").await.unwrap().status, 0);
        for id in ["ro", "rw"] {
            client.remove_container(id, false).await.unwrap();
        }
    });
    assert!(!agent.shared.join("busybox/new-file").exists(), "the image is untouched");
}

#[test]
fn bad_specs_and_unknown_ids_get_named_errors_and_leave_nothing_behind() {
    let agent = HostAgent::with_busybox().unwrap();
    runtime().block_on(async {
        let client = agent.client().await.unwrap();
        let create = |id: &'static str, spec: Vec<u8>| {
            let client = &client;
            async move { client.create_container(id, spec, Default::default()).await.unwrap_err().to_string() }
        };
        let err = create("bad-json", b"{not json".to_vec()).await;
        assert!(err.contains("INVALID_ARGUMENT") && err.contains("oci_spec"), "{err}");
        let mut escape = busybox_spec(&["true"]);
        escape.root_mut().as_mut().unwrap().set_path("../../etc".into());
        let err = create("escape", spec_json(&escape)).await;
        assert!(err.contains("INVALID_ARGUMENT") && err.contains("root.path"), "{err}");
        let mut missing = busybox_spec(&["true"]);
        missing.root_mut().as_mut().unwrap().set_path("no-such-image".into());
        let err = create("missing", spec_json(&missing)).await;
        assert!(err.contains("root.path no-such-image"), "{err}");
        let err = create("no-binary", spec_json(&busybox_spec(&["/bin/not-there"]))).await;
        assert!(err.contains("INTERNAL") || err.contains("not-there"), "{err}");
        let err = create("Bad/Id", spec_json(&busybox_spec(&["true"]))).await;
        assert!(err.contains("container_id"), "{err}");
        let err = client.start_container("nobody").await.unwrap_err().to_string();
        assert!(err.contains("NOT_FOUND") && err.contains("nobody"), "{err}");
        let err = client.wait_process("nobody", "").await.unwrap_err().to_string();
        assert!(err.contains("NOT_FOUND"), "{err}");
        // Still serving, and the failed creates left no bundle, mount or runtime record.
        let mut ok = run_container(&client, "ok", &["echo", "still-serving"], false).await;
        assert_eq!(ok.output().await.0, "still-serving\n");
        assert_eq!(client.wait_process("ok", "").await.unwrap().status, 0);
        client.remove_container("ok", false).await.unwrap();
    });
    let bundles = agent.state_dir().join("bundles");
    assert_eq!(std::fs::read_dir(&bundles).unwrap().count(), 0, "no bundle left");
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!mounts.contains(agent.state_dir().to_str().unwrap()), "no mount left: {mounts}");
}

#[test]
fn a_stopped_host_mode_agent_leaves_no_container_mount_or_cgroup_behind() {
    let agent = HostAgent::with_busybox().unwrap();
    let state = agent.state_dir();
    runtime().block_on(async {
        let client = agent.client().await.unwrap();
        run_container(&client, "left-running", &["sleep", "1000"], false).await;
        assert_eq!(client.list_processes("left-running").await.unwrap().len(), 1);
    });
    drop(agent); // SIGTERM
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!mounts.contains(state.to_str().unwrap()), "no rootfs mount left: {mounts}");
    let cgroups = ["/sys/fs/cgroup/husk/left-running", "/sys/fs/cgroup/pids/husk/left-running"];
    assert!(cgroups.iter().all(|c| !std::path::Path::new(c).exists()), "no cgroup left");
}

/// The VM path: a pod in a real guest, containers whose rootfs comes from the host over virtio-fs,
/// stdio over vsock streams.
#[test]
fn a_pod_in_a_vm_runs_containers_from_the_virtio_fs_share() {
    let (vmm, probe, guest) = (target_bin("husk-vmm"), target_bin("husk-pod-probe"), guest_dir());
    let script = format!(
        "work=$(mktemp -d); sock=$work/vsock.sock; mkdir $work/share
{vmm} --kernel {kernel} --initrd {initrd} --mem 512 --vsock $sock --fs share=$work/share \
  --console $work/console.log & vmm=$!
{probe} --vsock $sock --share $work/share --wait-s 120; probe=$?
kill -TERM $vmm; wait $vmm; echo \"vmm-status=$? probe-status=$probe\"
echo '--- console'; cat $work/console.log; rm -rf $work",
        vmm = vmm.display(),
        probe = probe.display(),
        kernel = guest.join("vmlinux").display(),
        initrd = guest.join("initramfs.cpio").display(),
    );
    let output = run(&mut VmHost::detect().command(Duration::from_secs(600), &["sh", "-c", &script]));
    let text = combined(&output);
    assert!(text.contains("vmm-status=0 probe-status=0"), "{}", describe(&output));
    assert!(text.contains("first-stdout=hello-from-vm pid=1"), "{text}");
    assert!(text.contains("first-stderr=on-stderr") && text.contains("first-status=7"), "{text}");
    assert!(text.contains("exec-stdout=exec-sees-init=sleep") && text.contains("exec-status=4"), "{text}");
    assert!(text.contains("exec-tty=go|30 120|/dev/pts/"), "a terminal exec, resized: {text}");
    assert!(text.contains("exec-tty-status=0"), "{text}");
    assert!(text.contains("sleeper-status=137"), "{text}");
    assert!(
        text.contains("oom-status=137") && text.contains("oom-event=oom"),
        "an OOM kill and its event: {text}"
    );
    assert!(text.contains("oom-stats=kills:1 memory_limit:16777216 pids_limit:20 cpu_usec:"), "{text}");
    assert!(!text.contains("cpu_usec:0\n"), "CPU time was counted: {text}");
    assert!(text.contains("bad-spec-error=") && text.contains("INVALID_ARGUMENT"), "{text}");
    assert!(text.contains("unknown-id-error=") && text.contains("NOT_FOUND"), "{text}");
    assert!(text.contains("still-serving=true"), "{text}");
}
