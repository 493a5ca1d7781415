//! CRI conformance checks: each drives containerd's CRI plugin as the kubelet does through one
//! behaviour a pod's user relies on (lifecycle, stop, exec, logs, stats, namespaces, security
//! context, volumes, OOM), and passes or fails with what it saw. [`run_all`] runs every check
//! with one runtime handler in one pod of its own (a check that needs its own pod makes one), so
//! `husk` and `runc` are compared on the same containerd in the same run.
//!
//! A check's containers are stopped and removed after it, whatever its outcome; host-side
//! mounts it made are undone by the [`HostMount`] guards it holds.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use k8s_cri::v1::{
    Capability, ContainerConfig, ContainerMetadata, ContainerState, ContainerStatsRequest, ContainerStatus,
    ContainerStatusRequest, DnsConfig, ExecSyncRequest, ImageSpec, Int64Value, KeyValue,
    LinuxContainerConfig, LinuxContainerResources, LinuxContainerSecurityContext, LinuxPodSandboxConfig,
    LinuxSandboxSecurityContext, Mount, MountPropagation, NamespaceMode, NamespaceOption, PodSandboxConfig,
    PodSandboxMetadata, PodSandboxState, PodSandboxStatusRequest, RemoveContainerRequest,
    RemovePodSandboxRequest, ReopenContainerLogRequest, SecurityProfile, StatusRequest, StopContainerRequest,
    StopPodSandboxRequest, UpdateContainerResourcesRequest,
};
use nix::mount::{mount, umount2, MntFlags, MsFlags};

use crate::cri::{create, create_and_start, exec, exit_code_when_exited, run_pod, start_created, Cri, IMAGE};

/// The hostname, sysctls and DNS settings of the pod the checks run in.
const POD_HOSTNAME: &str = "conformance-pod";
const POD_SYSCTLS: [(&str, &str); 2] = [("kernel.shm_rmid_forced", "1"), ("fs.mqueue.msg_max", "100")];
const POD_DNS: (&str, &str, &str) = ("10.0.0.10", "conformance.example", "ndots:5");
/// The paths the kubelet masks and makes read-only in every container that is not privileged
/// (containerd applies what it is given).
const MASKED_PATHS: &[&str] = &[
    "/proc/asound",
    "/proc/acpi",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
];
const READONLY_PATHS: &[&str] = &["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"];
/// How long StopContainer may take for a container that exits on SIGTERM (runc: well under a
/// second; the grace period given is a minute).
const PROMPT_STOP: Duration = Duration::from_secs(10);
/// How long a check waits for what a container does on its own (a log line, a signal handler).
const EVENT_DEADLINE: Duration = Duration::from_secs(60);

/// The name of every check, in the order [`run_all`] runs them.
pub const CHECKS: &[&str] = &[
    "hostname_is_the_pods",
    "pod_sysctls_apply",
    "dns_config_is_the_pods",
    "each_container_has_its_own_pid_namespace",
    "exec_sync_returns_stdout_stderr_and_the_exit_code",
    "stop_returns_as_soon_as_sigterm_ends_the_container",
    "stop_kills_a_container_that_ignores_sigterm_after_the_grace_period",
    "stop_and_remove_are_idempotent",
    "runtime_default_seccomp_filters_the_container",
    "a_localhost_seccomp_profile_blocks_its_syscalls",
    "capabilities_are_dropped_and_added",
    "user_group_and_supplemental_groups_apply",
    "a_readonly_rootfs_refuses_writes",
    "masked_and_readonly_paths_apply",
    "the_cgroup_filesystem_shows_the_containers_cgroup",
    "container_logs_are_written_and_reopened",
    "container_stats_report_cpu_and_memory",
    "an_oom_kill_is_reported_as_oomkilled",
    "volumes_are_writable_or_read_only_as_asked",
    "a_removed_containers_volume_is_released_on_the_node",
    "host_mounts_propagate_into_an_rslave_volume",
    "a_recursive_read_only_volume_is_read_only_all_through",
    "env_and_working_dir_apply",
    "a_container_that_cannot_start_names_its_command_and_is_removable",
    "a_container_whose_volume_cannot_be_mounted_fails_and_leaves_no_mount",
    "a_container_that_cannot_enter_its_working_dir_fails_and_leaves_no_mount",
    "a_stop_its_caller_gave_up_on_leaves_the_container_stoppable_and_removable",
    "a_restarted_container_runs_as_a_new_attempt_in_the_same_pod",
    "containers_sharing_the_pods_pid_namespace_see_each_other",
    "update_container_resources_changes_the_memory_limit",
    "port_forward_reaches_a_listener_on_the_pods_loopback",
    "a_pods_stop_and_remove_are_idempotent",
    "removing_a_running_pod_stops_it_and_leaves_no_mount",
];

/// One check's outcome.
#[derive(Debug)]
pub struct Outcome {
    pub check: &'static str,
    pub handler: String,
    pub passed: bool,
    pub millis: u128,
    /// Why it failed (empty when it passed).
    pub detail: String,
}

impl Outcome {
    /// `check <name> <handler> pass|fail <ms> <detail>`: one line, for the test to parse.
    pub fn line(&self) -> String {
        let verdict = if self.passed { "pass" } else { "fail" };
        let detail = self.detail.replace('\n', " | ");
        format!("check {} {} {verdict} {} {detail}", self.check, self.handler, self.millis)
    }
}

/// Runs every check with `handler` in a pod of its own; `work` holds the pod's logs and the
/// checks' host files. Fails only when the pod itself cannot be run or removed.
pub async fn run_all(cri: &Cri, handler: &str, work: &Path) -> Result<Vec<Outcome>> {
    let work = work.join(handler);
    std::fs::create_dir_all(work.join("logs")).with_context(|| format!("creating {}", work.display()))?;
    let mut ctx = Checks::new(cri.clone(), handler, &work).await?;
    let mut outcomes = Vec::new();
    for &check in CHECKS {
        let started = Instant::now();
        let result = ctx.run(check).await;
        ctx.remove_containers().await;
        let detail = result.as_ref().err().map(|e| format!("{e:#}")).unwrap_or_default();
        let outcome = Outcome {
            check,
            handler: handler.into(),
            passed: result.is_ok(),
            millis: started.elapsed().as_millis(),
            detail,
        };
        println!("{}", outcome.line());
        outcomes.push(outcome);
    }
    let Checks { mut cri, pod, .. } = ctx;
    stop_and_remove_pod(&mut cri, &pod).await?;
    Ok(outcomes)
}

/// The pod the checks share and the containers the running check made.
struct Checks {
    cri: Cri,
    handler: String,
    work: PathBuf,
    pod: String,
    config: PodSandboxConfig,
    containers: Vec<String>,
}

impl Checks {
    async fn new(mut cri: Cri, handler: &str, work: &Path) -> Result<Checks> {
        let config = pod_config(&format!("conformance-{handler}"), &work.join("logs"));
        let pod = run_pod(&mut cri, &config, handler).await?;
        Ok(Checks { cri, handler: handler.into(), work: work.to_path_buf(), pod, config, containers: vec![] })
    }

    async fn run(&mut self, check: &str) -> Result<()> {
        match check {
            "hostname_is_the_pods" => self.hostname_is_the_pods().await,
            "pod_sysctls_apply" => self.pod_sysctls_apply().await,
            "dns_config_is_the_pods" => self.dns_config_is_the_pods().await,
            "each_container_has_its_own_pid_namespace" => self.own_pid_namespace().await,
            "exec_sync_returns_stdout_stderr_and_the_exit_code" => self.exec_sync().await,
            "stop_returns_as_soon_as_sigterm_ends_the_container" => self.prompt_stop().await,
            "stop_kills_a_container_that_ignores_sigterm_after_the_grace_period" => self.grace_stop().await,
            "stop_and_remove_are_idempotent" => self.idempotent_stop_and_remove().await,
            "runtime_default_seccomp_filters_the_container" => self.runtime_default_seccomp().await,
            "a_localhost_seccomp_profile_blocks_its_syscalls" => self.localhost_seccomp().await,
            "capabilities_are_dropped_and_added" => self.capabilities().await,
            "user_group_and_supplemental_groups_apply" => self.user_and_groups().await,
            "a_readonly_rootfs_refuses_writes" => self.readonly_rootfs().await,
            "masked_and_readonly_paths_apply" => self.masked_and_readonly_paths().await,
            "the_cgroup_filesystem_shows_the_containers_cgroup" => self.cgroup_filesystem().await,
            "container_logs_are_written_and_reopened" => self.logs().await,
            "container_stats_report_cpu_and_memory" => self.stats().await,
            "an_oom_kill_is_reported_as_oomkilled" => self.oom_kill().await,
            "volumes_are_writable_or_read_only_as_asked" => self.volumes().await,
            "a_removed_containers_volume_is_released_on_the_node" => self.volume_released().await,
            "host_mounts_propagate_into_an_rslave_volume" => self.rslave_propagation().await,
            "a_recursive_read_only_volume_is_read_only_all_through" => self.recursive_read_only().await,
            "env_and_working_dir_apply" => self.env_and_working_dir().await,
            "a_container_that_cannot_start_names_its_command_and_is_removable" => self.failed_start().await,
            "a_container_whose_volume_cannot_be_mounted_fails_and_leaves_no_mount" => {
                self.failed_volume_mount().await
            }
            "a_container_that_cannot_enter_its_working_dir_fails_and_leaves_no_mount" => {
                self.failed_working_dir().await
            }
            "a_stop_its_caller_gave_up_on_leaves_the_container_stoppable_and_removable" => {
                self.abandoned_stop().await
            }
            "a_restarted_container_runs_as_a_new_attempt_in_the_same_pod" => self.restart_attempt().await,
            "containers_sharing_the_pods_pid_namespace_see_each_other" => self.shared_pid_namespace().await,
            "update_container_resources_changes_the_memory_limit" => self.update_resources().await,
            "port_forward_reaches_a_listener_on_the_pods_loopback" => self.port_forward().await,
            "a_pods_stop_and_remove_are_idempotent" => self.pod_stop_and_remove().await,
            "removing_a_running_pod_stops_it_and_leaves_no_mount" => self.running_pod_removed().await,
            _ => bail!("no check named {check}"),
        }
    }

    // --- the checks -----------------------------------------------------------------------

    /// `kubectl port-forward` as containerd carries it out: a connection to `localhost:PORT` made
    /// inside the pod's network namespace on the node must reach a server the pod listens with
    /// on its own loopback only.
    async fn port_forward(&mut self) -> Result<()> {
        const PAGE: &str = "port-forward-reached";
        let script = format!("mkdir -p /tmp/www && echo {PAGE} > /tmp/www/index.html && exec httpd -f -p 127.0.0.1:8080 -h /tmp/www");
        self.shell("port-forward", &script, |_| {}).await?;
        let netns = self.pod_netns().await?;
        let deadline = Instant::now() + EVENT_DEADLINE;
        loop {
            let netns = netns.clone();
            let seen = tokio::task::spawn_blocking(move || http_get_inside(&netns, 8080)).await?;
            match seen {
                Ok(page) if page.contains(PAGE) => return Ok(()),
                seen if Instant::now() >= deadline => bail!(
                    "no page from 127.0.0.1:8080 in the pod's namespace within {EVENT_DEADLINE:?}: last {seen:?}"
                ),
                _ => tokio::time::sleep(Duration::from_millis(250)).await,
            }
        }
    }

    async fn hostname_is_the_pods(&mut self) -> Result<()> {
        let id = self.idle("hostname", |_| {}).await?;
        expect_output(&self.exec(&id, &["hostname"]).await?, POD_HOSTNAME)
    }

    async fn pod_sysctls_apply(&mut self) -> Result<()> {
        let id = self.idle("sysctls", |_| {}).await?;
        for (name, value) in POD_SYSCTLS {
            let path = format!("/proc/sys/{}", name.replace('.', "/"));
            let seen = self.exec(&id, &["cat", &path]).await?;
            ensure!(seen.trim() == value, "{name}: {} in the container, the pod sets {value}", seen.trim());
        }
        Ok(())
    }

    async fn dns_config_is_the_pods(&mut self) -> Result<()> {
        let id = self.idle("dns", |_| {}).await?;
        let resolv = self.exec(&id, &["cat", "/etc/resolv.conf"]).await?;
        let (server, search, option) = POD_DNS;
        for line in [format!("nameserver {server}"), format!("search {search}"), format!("options {option}")]
        {
            ensure!(resolv.lines().any(|l| l.trim() == line), "/etc/resolv.conf lacks {line:?}: {resolv:?}");
        }
        Ok(())
    }

    async fn own_pid_namespace(&mut self) -> Result<()> {
        let first = self.idle("pid-first", |_| {}).await?;
        let second = self.idle("pid-second", |_| {}).await?;
        for id in [&first, &second] {
            // PID 1 is the container's own command, and only its processes are visible.
            let init = self.exec(id, &["cat", "/proc/1/cmdline"]).await?.replace('\0', " ");
            ensure!(init.starts_with("sleep"), "PID 1 of the container runs {init:?}, not its command");
        }
        let ns = |out: String| out.trim().to_owned();
        let a = ns(self.exec(&first, &["readlink", "/proc/self/ns/pid"]).await?);
        let b = ns(self.exec(&second, &["readlink", "/proc/self/ns/pid"]).await?);
        ensure!(a != b, "both containers are in PID namespace {a}");
        Ok(())
    }

    async fn exec_sync(&mut self) -> Result<()> {
        let id = self.idle("exec", |_| {}).await?;
        let request = ExecSyncRequest {
            container_id: id.clone(),
            cmd: vec!["sh".into(), "-c".into(), "echo to-stdout; echo to-stderr >&2; exit 3".into()],
            timeout: 60,
        };
        let reply = self.cri.exec_sync(request).await.context("ExecSync")?.into_inner();
        let (out, err) = (String::from_utf8_lossy(&reply.stdout), String::from_utf8_lossy(&reply.stderr));
        ensure!(reply.exit_code == 3, "exit code {} (expected 3)", reply.exit_code);
        ensure!(out == "to-stdout\n" && err == "to-stderr\n", "stdout {out:?}, stderr {err:?}");
        Ok(())
    }

    async fn prompt_stop(&mut self) -> Result<()> {
        // busybox top, as the Kubernetes CRI validation suite runs it: it exits on SIGTERM.
        let id = self.create_and_start("top", vec!["top".into()], |_| {}).await?;
        let before = self.status(&id).await?;
        ensure!(
            before.state == ContainerState::ContainerRunning as i32,
            "state {} before stop",
            before.state
        );
        // A signal PID 1 has no handler for is dropped: stop once top catches SIGTERM (sent
        // earlier, it is lost under runc too; a guest's first exec of a binary is slower).
        let ready = self.wait_until_pid1_catches_sigterm(&id).await?;
        println!(
            "note {} stop: top caught SIGTERM {} ms after it was started",
            self.handler,
            ready.as_millis()
        );
        let took = self.stop(&id, 60).await?;
        ensure!(took < PROMPT_STOP, "StopContainer took {took:?} for a container that exits on SIGTERM");
        let status = self.status(&id).await?;
        ensure!(status.state == ContainerState::ContainerExited as i32, "state {} after stop", status.state);
        Ok(())
    }

    async fn grace_stop(&mut self) -> Result<()> {
        let id = self.shell("ignores-term", "trap '' TERM; while :; do sleep 0.1; done", |_| {}).await?;
        let took = self.stop(&id, 2).await?;
        ensure!(
            took >= Duration::from_secs(2),
            "StopContainer returned after {took:?}, before the grace period"
        );
        ensure!(
            took < Duration::from_secs(2) + PROMPT_STOP,
            "StopContainer took {took:?} for a 2 s grace period"
        );
        let status = self.status(&id).await?;
        ensure!(status.exit_code == 137, "exit code {} (SIGKILL: 137)", status.exit_code);
        Ok(())
    }

    async fn idempotent_stop_and_remove(&mut self) -> Result<()> {
        let id = self.idle("stopped-twice", |_| {}).await?;
        self.stop(&id, 1).await.context("the first StopContainer")?;
        self.stop(&id, 1).await.context("StopContainer of a stopped container")?;
        for call in ["the first RemoveContainer", "RemoveContainer of a removed container"] {
            self.cri
                .remove_container(RemoveContainerRequest { container_id: id.clone() })
                .await
                .context(call)?;
        }
        let status =
            self.cri.container_status(ContainerStatusRequest { container_id: id, verbose: false }).await;
        ensure!(status.is_err(), "ContainerStatus of a removed container answered");
        Ok(())
    }

    async fn runtime_default_seccomp(&mut self) -> Result<()> {
        let id =
            self.idle("seccomp-default", |c| security(c).seccomp = Some(SecurityProfile::default())).await?;
        expect_output(
            &self.exec(&id, &["sh", "-c", "grep Seccomp: /proc/self/status | tr -d '\\t'"]).await?,
            "Seccomp:2",
        )
    }

    async fn localhost_seccomp(&mut self) -> Result<()> {
        let profile = self.work.join("no-mkdir.json");
        let denied = r#"{"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [
            {"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO"}]}"#;
        std::fs::write(&profile, denied).with_context(|| format!("writing {}", profile.display()))?;
        let localhost = SecurityProfile {
            profile_type: k8s_cri::v1::security_profile::ProfileType::Localhost as i32,
            localhost_ref: profile.display().to_string(),
        };
        let script = "mkdir /tmp/blocked 2>/dev/null && exit 0; [ -d /tmp/blocked ] && exit 1; exit 42";
        let id = self.shell("seccomp-localhost", script, |c| security(c).seccomp = Some(localhost)).await?;
        let code = exit_code_when_exited(&mut self.cri, &id).await?;
        ensure!(code == 42, "mkdir under a profile that denies it: exit {code} (0: it was allowed)");
        Ok(())
    }

    async fn capabilities(&mut self) -> Result<()> {
        let id = self
            .idle("capabilities", |c| {
                security(c).capabilities = Some(Capability {
                    add_capabilities: vec!["NET_ADMIN".into()],
                    drop_capabilities: vec!["ALL".into()],
                    ..Default::default()
                })
            })
            .await?;
        // CAP_NET_ADMIN is bit 12.
        let caps = self.exec(&id, &["sh", "-c", "grep CapEff: /proc/self/status | tr -d '\\t'"]).await?;
        expect_output(&caps, "CapEff:0000000000001000")
    }

    async fn user_and_groups(&mut self) -> Result<()> {
        let id = self
            .idle("user", |c| {
                let security = security(c);
                security.run_as_user = Some(Int64Value { value: 1000 });
                security.run_as_group = Some(Int64Value { value: 2000 });
                security.supplemental_groups = vec![3000];
            })
            .await?;
        let ids = self.exec(&id, &["sh", "-c", "echo $(id -u) $(id -g) $(id -G)"]).await?;
        let seen: Vec<&str> = ids.split_whitespace().collect();
        ensure!(seen.first() == Some(&"1000") && seen.get(1) == Some(&"2000"), "uid gid groups: {ids:?}");
        ensure!(seen[2..].contains(&"3000"), "supplemental group 3000 missing: {ids:?}");
        Ok(())
    }

    async fn readonly_rootfs(&mut self) -> Result<()> {
        let id = self.idle("readonly-rootfs", |c| security(c).readonly_rootfs = true).await?;
        let wrote = self.exec(&id, &["touch", "/written"]).await;
        ensure!(wrote.is_err(), "a file was written to a read-only rootfs");
        Ok(())
    }

    async fn masked_and_readonly_paths(&mut self) -> Result<()> {
        let id = self.idle("masked-paths", |_| {}).await?;
        // The kubelet's defaults (those this kernel has): masked by a mount over them (/dev/null
        // on a file, an empty read-only tmpfs on a directory), /proc/sys read-only.
        let masked = "for p in /proc/kcore /proc/keys /proc/timer_list /sys/firmware; do
            [ -e $p ] || continue; grep -q \" $p \" /proc/mounts && echo masked $p || echo open $p; done";
        let seen = self.exec(&id, &["sh", "-c", masked]).await?;
        ensure!(seen.contains("masked /sys/firmware"), "/sys/firmware is not masked: {seen:?}");
        ensure!(!seen.contains("open "), "paths containerd masks are open: {seen:?}");
        let wrote = self.exec(&id, &["sh", "-c", "echo 1 > /proc/sys/kernel/shm_rmid_forced"]).await;
        ensure!(wrote.is_err(), "/proc/sys is writable");
        Ok(())
    }

    async fn cgroup_filesystem(&mut self) -> Result<()> {
        let id = self.idle("cgroupfs", |c| resources(c).memory_limit_in_bytes = 64 << 20).await?;
        let max = self.exec(&id, &["cat", "/sys/fs/cgroup/memory.max"]).await?;
        ensure!(max.trim() == (64u64 << 20).to_string(), "/sys/fs/cgroup/memory.max reads {:?}", max.trim());
        Ok(())
    }

    async fn logs(&mut self) -> Result<()> {
        let script = "echo line-one; echo line-err >&2; until [ -e /tmp/go ]; do sleep 0.1; done; \
            echo line-two; exec sleep 100000";
        let id = self.shell("logs", script, |_| {}).await?;
        let log = self.work.join("logs/logs.log");
        wait_for_log(&log, &["stdout F line-one", "stderr F line-err"]).await?;
        let rotated = log.with_extension("log.1");
        std::fs::rename(&log, &rotated).context("rotating the log")?;
        self.cri
            .reopen_container_log(ReopenContainerLogRequest { container_id: id.clone() })
            .await
            .context("ReopenContainerLog")?;
        self.exec(&id, &["touch", "/tmp/go"]).await?;
        wait_for_log(&log, &["stdout F line-two"]).await.context("after ReopenContainerLog")
    }

    async fn stats(&mut self) -> Result<()> {
        let id = self
            .shell("stats", "i=0; while [ $i -lt 100000 ]; do i=$((i+1)); done; exec sleep 100000", |_| {})
            .await?;
        let stats = self
            .cri
            .container_stats(ContainerStatsRequest { container_id: id })
            .await
            .context("ContainerStats")?
            .into_inner()
            .stats
            .context("ContainerStats: no stats")?;
        let memory = stats.memory.and_then(|m| m.working_set_bytes).map_or(0, |v| v.value);
        let cpu = stats.cpu.and_then(|c| c.usage_core_nano_seconds).map_or(0, |v| v.value);
        ensure!(memory > 0 && cpu > 0, "working set {memory} bytes, CPU {cpu} ns");
        Ok(())
    }

    async fn oom_kill(&mut self) -> Result<()> {
        let id = self
            .shell("oom", "x=a; while :; do x=$x$x; done", |c| resources(c).memory_limit_in_bytes = 32 << 20)
            .await?;
        let code = exit_code_when_exited(&mut self.cri, &id).await?;
        let status = self.status(&id).await?;
        ensure!(code == 137 && status.reason == "OOMKilled", "exit {code}, reason {:?}", status.reason);
        Ok(())
    }

    async fn volumes(&mut self) -> Result<()> {
        let (rw, ro) = (self.host_dir("volume-rw")?, self.host_dir("volume-ro")?);
        std::fs::write(ro.join("present"), "from-the-node").context("the read-only volume's file")?;
        let mounts = vec![volume(&rw, "/rw", false), volume(&ro, "/ro", true)];
        let id = self.idle("volumes", |c| c.mounts = mounts).await?;
        self.exec(&id, &["sh", "-c", "echo from-the-container > /rw/written"]).await?;
        let written = std::fs::read_to_string(rw.join("written")).unwrap_or_default();
        ensure!(written == "from-the-container\n", "the node reads {written:?} from the writable volume");
        expect_output(&self.exec(&id, &["cat", "/ro/present"]).await?, "from-the-node")?;
        let wrote = self.exec(&id, &["touch", "/ro/written"]).await;
        ensure!(wrote.is_err(), "a file was written to a read-only volume");
        Ok(())
    }

    async fn volume_released(&mut self) -> Result<()> {
        let dir = self.host_dir("released")?;
        let tmpfs = HostMount::tmpfs(&dir)?;
        let id = self.idle("released", |c| c.mounts = vec![volume(&dir, "/data", true)]).await?;
        self.stop_and_remove(&id).await?;
        tmpfs.unmount().context("unmounting the volume's tmpfs once its container is removed")
    }

    async fn rslave_propagation(&mut self) -> Result<()> {
        let dir = self.host_dir("propagation")?;
        let _shared = HostMount::shared_bind(&dir)?;
        let mut mount = volume(&dir, "/data", false);
        mount.propagation = MountPropagation::PropagationHostToContainer as i32;
        let id = self.idle("rslave", |c| c.mounts = vec![mount]).await?;
        let sub = dir.join("sub");
        std::fs::create_dir_all(&sub).context("the submount's directory")?;
        let submount = HostMount::tmpfs(&sub)?;
        std::fs::write(sub.join("late"), "mounted-after-start").context("the submount's file")?;
        let seen = self.exec(&id, &["cat", "/data/sub/late"]).await;
        drop(submount);
        expect_output(&seen.context("a mount made on the node after the start")?, "mounted-after-start")
    }

    async fn recursive_read_only(&mut self) -> Result<()> {
        // The kubelet asks for recursive read-only mounts only of a handler that reports them
        // (containerd 2.1 dereferences a nil pointer when asked anyway).
        let status = self.cri.status(StatusRequest { verbose: false }).await.context("Status")?.into_inner();
        let handler = status.runtime_handlers.iter().find(|h| h.name == self.handler);
        let reported =
            handler.and_then(|h| h.features.as_ref()).is_some_and(|f| f.recursive_read_only_mounts);
        ensure!(reported, "the handler does not report recursive read-only mounts (CRI Status)");
        let dir = self.host_dir("rro")?;
        let sub = dir.join("sub");
        std::fs::create_dir_all(&sub).context("the submount's directory")?;
        let _submount = HostMount::tmpfs(&sub)?;
        let mut mount = volume(&dir, "/data", true);
        mount.recursive_read_only = true;
        let id = self.idle("rro", |c| c.mounts = vec![mount]).await?;
        let wrote = self.exec(&id, &["touch", "/data/sub/written"]).await;
        ensure!(wrote.is_err(), "a file was written under a recursive read-only volume's submount");
        Ok(())
    }

    async fn env_and_working_dir(&mut self) -> Result<()> {
        let id = self
            .idle("env", |c| {
                c.envs = vec![KeyValue { key: "GREETING".into(), value: "hello pod".into() }];
                c.working_dir = "/tmp".into();
            })
            .await?;
        expect_output(&self.exec(&id, &["sh", "-c", "echo \"$GREETING\" $(pwd)"]).await?, "hello pod /tmp")
    }

    async fn failed_start(&mut self) -> Result<()> {
        let started = self.create_and_start("no-binary", vec!["/no/such/binary".into()], |_| {}).await;
        let err = match started {
            Ok(_) => bail!("a container whose command does not exist started"),
            Err(err) => format!("{err:#}"),
        };
        ensure!(err.contains("/no/such/binary"), "the error does not name the command: {err}");
        // A container that was created and failed to start is removed with the others (what is
        // left after the pod is checked by the test).
        Ok(())
    }

    /// A file given as a volume over a directory of the image: the runtime's mount fails (at
    /// StartContainer, where containerd makes the task), and once the container is removed
    /// nothing it mounted for it on the node is left (Husk binds volumes into the pod's share
    /// before the guest mounts them).
    async fn failed_volume_mount(&mut self) -> Result<()> {
        let file = self.host_dir("not-a-directory")?.join("file");
        std::fs::write(&file, "a file").context("the volume's file")?;
        let id = self.fail_to_start("bad-volume", |c| c.mounts = vec![volume(&file, "/etc", true)]).await?;
        self.remove_leaving_no_mount(&id).await
    }

    /// A working directory that is a file of the image: the container fails to start and leaves
    /// no mount once removed.
    async fn failed_working_dir(&mut self) -> Result<()> {
        let id = self.fail_to_start("bad-cwd", |c| c.working_dir = "/bin/sh".into()).await?;
        self.remove_leaving_no_mount(&id).await
    }

    /// The kubelet's StopContainer can be cancelled by its deadline while the container still
    /// has grace left (the CRI validation suite saw every later call fail with `context
    /// canceled`): the next StopContainer and RemoveContainer must still work.
    async fn abandoned_stop(&mut self) -> Result<()> {
        let id = self.shell("abandoned", "trap '' TERM; while :; do sleep 1; done", |_| {}).await?;
        let request = StopContainerRequest { container_id: id.clone(), timeout: 60 };
        let gave_up = tokio::time::timeout(Duration::from_secs(2), self.cri.stop_container(request)).await;
        ensure!(gave_up.is_err(), "StopContainer returned before its caller gave up: {gave_up:?}");
        let took = self.stop(&id, 0).await.context("StopContainer after an abandoned one")?;
        ensure!(took < PROMPT_STOP, "StopContainer after an abandoned one took {took:?}");
        self.remove_leaving_no_mount(&id).await
    }

    async fn restart_attempt(&mut self) -> Result<()> {
        let first = self.shell("restarted", "exit 3", |_| {}).await?;
        let code = exit_code_when_exited(&mut self.cri, &first).await?;
        ensure!(code == 3, "the first attempt exited {code}");
        let second = self
            .idle("restarted", |c| {
                c.metadata = Some(ContainerMetadata { name: "restarted".into(), attempt: 1 });
                c.log_path = "restarted-1.log".into();
            })
            .await?;
        expect_output(&self.exec(&second, &["echo", "second-attempt"]).await?, "second-attempt")
    }

    async fn shared_pid_namespace(&mut self) -> Result<()> {
        let logs = self.work.join("shared-pid-logs");
        std::fs::create_dir_all(&logs).context("the shared-PID pod's log directory")?;
        let mut config = pod_config(&format!("conformance-{}-shared-pid", self.handler), &logs);
        let shared = NamespaceOption { pid: NamespaceMode::Pod as i32, ..namespaces() };
        if let Some(security) = config.linux.as_mut().and_then(|l| l.security_context.as_mut()) {
            security.namespace_options = Some(shared.clone());
        }
        let pod = run_pod(&mut self.cri, &config, &self.handler).await?;
        let seen = self.two_containers_in(&pod, &config, shared).await;
        let removed = stop_and_remove_pod(&mut self.cri, &pod).await;
        let seen = seen?;
        removed?;
        ensure!(
            seen.lines().any(|l| l.starts_with("sleep 4242")),
            "the other container's sleep is not visible: {seen:?}"
        );
        Ok(())
    }

    /// Starts `sleep 4242` and an idle container in `pod` (PID namespaces as `namespaces` says);
    /// what the second sees of every process's command line.
    async fn two_containers_in(
        &mut self,
        pod: &str,
        config: &PodSandboxConfig,
        namespaces: NamespaceOption,
    ) -> Result<String> {
        let with_namespaces = |name: &str, command: &[&str]| {
            let mut container = idle_config(name);
            container.command = command.iter().map(|s| s.to_string()).collect();
            security(&mut container).namespace_options = Some(namespaces.clone());
            container
        };
        create_and_start(
            &mut self.cri,
            pod,
            config,
            "sleeper",
            with_namespaces("sleeper", &["sleep", "4242"]),
        )
        .await?;
        let looker = create_and_start(
            &mut self.cri,
            pod,
            config,
            "looker",
            with_namespaces("looker", &["sleep", "100000"]),
        )
        .await?;
        let list = "for f in /proc/[0-9]*/cmdline; do tr '\\0' ' ' < $f; echo; done";
        exec(&mut self.cri, &looker, &["sh", "-c", list]).await
    }

    async fn update_resources(&mut self) -> Result<()> {
        let id = self.idle("resized", |c| resources(c).memory_limit_in_bytes = 64 << 20).await?;
        let linux = LinuxContainerResources { memory_limit_in_bytes: 96 << 20, ..Default::default() };
        let request = UpdateContainerResourcesRequest {
            container_id: id.clone(),
            linux: Some(linux),
            ..Default::default()
        };
        self.cri.update_container_resources(request).await.context("UpdateContainerResources")?;
        let max = self.exec(&id, &["cat", "/sys/fs/cgroup/memory.max"]).await?;
        expect_output(&max, &(96u64 << 20).to_string())
    }

    async fn pod_stop_and_remove(&mut self) -> Result<()> {
        let logs = self.work.join("second-pod-logs");
        std::fs::create_dir_all(&logs).context("the second pod's log directory")?;
        let config = pod_config(&format!("conformance-{}-second", self.handler), &logs);
        let pod = run_pod(&mut self.cri, &config, &self.handler).await?;
        let container = create_and_start(&mut self.cri, &pod, &config, "idle", idle_config("idle"));
        let started = container.await;
        let stopped = stop_and_remove_pod(&mut self.cri, &pod).await;
        started?;
        stopped?;
        let request = PodSandboxStatusRequest { pod_sandbox_id: pod, verbose: false };
        ensure!(
            self.cri.pod_sandbox_status(request).await.is_err(),
            "PodSandboxStatus of a removed pod answered"
        );
        Ok(())
    }

    /// RemovePodSandbox of a pod whose container runs (containerd stops it first): the pod, its
    /// container and every mount naming either (the pod's /dev/shm, Husk's share) are gone.
    async fn running_pod_removed(&mut self) -> Result<()> {
        let logs = self.work.join("removed-pod-logs");
        std::fs::create_dir_all(&logs).context("the removed pod's log directory")?;
        let config = pod_config(&format!("conformance-{}-removed", self.handler), &logs);
        let pod = run_pod(&mut self.cri, &config, &self.handler).await?;
        let started = create_and_start(&mut self.cri, &pod, &config, "idle", idle_config("idle")).await;
        let removed =
            self.cri.remove_pod_sandbox(RemovePodSandboxRequest { pod_sandbox_id: pod.clone() }).await;
        let container = started?;
        removed.context("RemovePodSandbox of a running pod")?;
        let request = PodSandboxStatusRequest { pod_sandbox_id: pod.clone(), verbose: false };
        ensure!(
            self.cri.pod_sandbox_status(request).await.is_err(),
            "PodSandboxStatus of a removed pod answered"
        );
        for id in [&pod, &container] {
            let left = mounts_naming(id)?;
            ensure!(left.is_empty(), "mounts left of the removed pod's {id}: {left:?}");
        }
        Ok(())
    }

    // --- helpers ---------------------------------------------------------------------------

    /// A container running `sleep` (its PID 1), changed by `adjust`, started.
    async fn idle(&mut self, name: &str, adjust: impl FnOnce(&mut ContainerConfig)) -> Result<String> {
        self.create_and_start(name, vec!["sleep".into(), "100000".into()], adjust).await
    }

    /// A container running the shell `script`, changed by `adjust`, started.
    async fn shell(
        &mut self,
        name: &str,
        script: &str,
        adjust: impl FnOnce(&mut ContainerConfig),
    ) -> Result<String> {
        self.create_and_start(name, vec!["sh".into(), "-c".into(), script.into()], adjust).await
    }

    async fn create_and_start(
        &mut self,
        name: &str,
        command: Vec<String>,
        adjust: impl FnOnce(&mut ContainerConfig),
    ) -> Result<String> {
        let mut config = idle_config(name);
        config.command = command;
        adjust(&mut config);
        let id = create(&mut self.cri, &self.pod, &self.config, name, config).await?;
        // Removed after the check even when it fails to start.
        self.containers.push(id.clone());
        start_created(&mut self.cri, &id, name).await?;
        Ok(id)
    }

    /// Waits (within [`EVENT_DEADLINE`]) until the container's PID 1 has a SIGTERM handler;
    /// how long that took from the call.
    async fn wait_until_pid1_catches_sigterm(&mut self, id: &str) -> Result<Duration> {
        let started = Instant::now();
        // SIGTERM is signal 15: bit 14 of SigCgt, in its fourth hex digit from the right.
        let catches = "[ $(( 0x$(awk '/^SigCgt:/ { print $2 }' /proc/1/status) & 0x4000 )) != 0 ]";
        while self.exec(id, &["sh", "-c", catches]).await.is_err() {
            ensure!(
                started.elapsed() < EVENT_DEADLINE,
                "PID 1 had no SIGTERM handler after {EVENT_DEADLINE:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(started.elapsed())
    }

    /// Creates a container changed by `adjust` whose start must fail; its id.
    async fn fail_to_start(
        &mut self,
        name: &str,
        adjust: impl FnOnce(&mut ContainerConfig),
    ) -> Result<String> {
        let mut config = idle_config(name);
        adjust(&mut config);
        let id = create(&mut self.cri, &self.pod, &self.config, name, config).await?;
        self.containers.push(id.clone());
        let started = start_created(&mut self.cri, &id, name).await;
        ensure!(started.is_err(), "the container {name} started");
        Ok(id)
    }

    /// Stops and removes container `id`, then fails if a mount on the node still names it.
    async fn remove_leaving_no_mount(&mut self, id: &str) -> Result<()> {
        self.stop_and_remove(id).await?;
        let left = mounts_naming(id)?;
        ensure!(left.is_empty(), "mounts left of the removed container: {left:?}");
        Ok(())
    }

    async fn exec(&mut self, id: &str, cmd: &[&str]) -> Result<String> {
        exec(&mut self.cri, id, cmd).await
    }

    /// StopContainer with a grace period of `timeout_s`; how long it took.
    async fn stop(&mut self, id: &str, timeout_s: i64) -> Result<Duration> {
        let started = Instant::now();
        let request = StopContainerRequest { container_id: id.into(), timeout: timeout_s };
        self.cri.stop_container(request).await.context("StopContainer")?;
        Ok(started.elapsed())
    }

    async fn stop_and_remove(&mut self, id: &str) -> Result<()> {
        self.stop(id, 0).await?;
        self.cri
            .remove_container(RemoveContainerRequest { container_id: id.into() })
            .await
            .context("RemoveContainer")?;
        self.containers.retain(|c| c != id);
        Ok(())
    }

    /// Stops and removes what the last check left (a failure to do so shows in the next checks).
    async fn remove_containers(&mut self) {
        for id in std::mem::take(&mut self.containers) {
            if let Err(err) = self.stop_and_remove(&id).await {
                println!("cleanup {id}: {err:#}");
            }
        }
    }

    async fn status(&mut self, id: &str) -> Result<ContainerStatus> {
        let request = ContainerStatusRequest { container_id: id.into(), verbose: false };
        let reply = self.cri.container_status(request).await.context("ContainerStatus")?.into_inner();
        reply.status.context("ContainerStatus: no status")
    }

    /// The pod's network namespace on the node, from the sandbox's OCI spec in containerd's
    /// verbose PodSandboxStatus.
    async fn pod_netns(&mut self) -> Result<PathBuf> {
        let request = PodSandboxStatusRequest { pod_sandbox_id: self.pod.clone(), verbose: true };
        let reply = self.cri.pod_sandbox_status(request).await.context("PodSandboxStatus")?.into_inner();
        let info = reply.info.get("info").context("PodSandboxStatus: no verbose info")?;
        let info: serde_json::Value = serde_json::from_str(info).context("PodSandboxStatus: verbose info")?;
        let namespaces =
            info["runtimeSpec"]["linux"]["namespaces"].as_array().context("no namespaces in the spec")?;
        let path = namespaces
            .iter()
            .find(|ns| ns["type"] == "network")
            .and_then(|ns| ns["path"].as_str())
            .context("the sandbox's spec names no network namespace path")?;
        Ok(PathBuf::from(path))
    }

    /// A fresh directory of this handler's work directory, for a volume.
    fn host_dir(&self, name: &str) -> Result<PathBuf> {
        let dir = self.work.join(name);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(dir)
    }
}

/// A pod as the kubelet asks for one: its own hostname, sysctls and DNS settings, PID namespace
/// per container, its logs in `logs`.
fn pod_config(name: &str, logs: &Path) -> PodSandboxConfig {
    let (server, search, option) = POD_DNS;
    let sysctls: HashMap<String, String> =
        POD_SYSCTLS.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    PodSandboxConfig {
        metadata: Some(PodSandboxMetadata {
            name: name.into(),
            uid: format!("{name}-uid"),
            namespace: "default".into(),
            attempt: 0,
        }),
        hostname: POD_HOSTNAME.into(),
        log_directory: logs.display().to_string(),
        dns_config: Some(DnsConfig {
            servers: vec![server.into()],
            searches: vec![search.into()],
            options: vec![option.into()],
        }),
        linux: Some(LinuxPodSandboxConfig {
            sysctls,
            security_context: Some(LinuxSandboxSecurityContext {
                namespace_options: Some(namespaces()),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The kubelet's default: the pod's network and IPC, a PID namespace per container.
fn namespaces() -> NamespaceOption {
    NamespaceOption {
        network: NamespaceMode::Pod as i32,
        pid: NamespaceMode::Container as i32,
        ipc: NamespaceMode::Pod as i32,
        ..Default::default()
    }
}

/// A busybox container named `name` that sleeps, logging to `<name>.log` of the pod's directory.
fn idle_config(name: &str) -> ContainerConfig {
    ContainerConfig {
        metadata: Some(ContainerMetadata { name: name.into(), attempt: 0 }),
        image: Some(ImageSpec { image: IMAGE.into(), ..Default::default() }),
        command: vec!["sleep".into(), "100000".into()],
        log_path: format!("{name}.log"),
        linux: Some(LinuxContainerConfig {
            resources: Some(LinuxContainerResources::default()),
            security_context: Some(LinuxContainerSecurityContext {
                namespace_options: Some(namespaces()),
                masked_paths: MASKED_PATHS.iter().map(|p| p.to_string()).collect(),
                readonly_paths: READONLY_PATHS.iter().map(|p| p.to_string()).collect(),
                ..Default::default()
            }),
        }),
        ..Default::default()
    }
}

fn security(config: &mut ContainerConfig) -> &mut LinuxContainerSecurityContext {
    let linux = config.linux.get_or_insert_with(Default::default);
    linux.security_context.get_or_insert_with(Default::default)
}

fn resources(config: &mut ContainerConfig) -> &mut LinuxContainerResources {
    let linux = config.linux.get_or_insert_with(Default::default);
    linux.resources.get_or_insert_with(Default::default)
}

fn volume(host: &Path, container: &str, readonly: bool) -> Mount {
    Mount {
        container_path: container.into(),
        host_path: host.display().to_string(),
        readonly,
        ..Default::default()
    }
}

/// StopPodSandbox and RemovePodSandbox, each twice (the kubelet retries both; the second call
/// must succeed too), and the pod reported not ready in between.
async fn stop_and_remove_pod(cri: &mut Cri, pod: &str) -> Result<()> {
    for call in ["the first StopPodSandbox", "StopPodSandbox of a stopped pod"] {
        cri.stop_pod_sandbox(StopPodSandboxRequest { pod_sandbox_id: pod.into() }).await.context(call)?;
    }
    let request = PodSandboxStatusRequest { pod_sandbox_id: pod.into(), verbose: false };
    let status = cri.pod_sandbox_status(request).await.context("PodSandboxStatus")?.into_inner().status;
    let state = status.map(|s| s.state).unwrap_or_default();
    ensure!(state == PodSandboxState::SandboxNotready as i32, "pod state {state} after StopPodSandbox");
    for call in ["the first RemovePodSandbox", "RemovePodSandbox of a removed pod"] {
        cri.remove_pod_sandbox(RemovePodSandboxRequest { pod_sandbox_id: pod.into() }).await.context(call)?;
    }
    Ok(())
}

/// `GET /` from `127.0.0.1:port` inside the network namespace at `netns`, as containerd's port
/// forwarding connects (on a thread of its own: `setns` moves only the calling thread).
fn http_get_inside(netns: &Path, port: u16) -> Result<String> {
    use std::io::{Read, Write};
    let namespace = std::fs::File::open(netns).with_context(|| format!("opening {}", netns.display()))?;
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                nix::sched::setns(&namespace, nix::sched::CloneFlags::CLONE_NEWNET)
                    .context("entering the pod's namespace")?;
                let address = std::net::SocketAddr::from(([127, 0, 0, 1], port));
                let mut stream = std::net::TcpStream::connect_timeout(&address, Duration::from_secs(5))?;
                stream.set_read_timeout(Some(Duration::from_secs(10)))?;
                stream.write_all(b"GET / HTTP/1.0\r\n\r\n")?;
                let mut reply = String::new();
                stream.read_to_string(&mut reply)?;
                Ok(reply)
            })
            .join()
            .map_err(|_| anyhow::anyhow!("the namespace thread panicked"))?
    })
}

/// The mount points on the node (this process's mount namespace, the shims' and containerd's)
/// whose path names `id`: a container's rootfs and volumes, a pod's shm and share.
fn mounts_naming(id: &str) -> Result<Vec<String>> {
    let table = std::fs::read_to_string("/proc/self/mountinfo").context("reading /proc/self/mountinfo")?;
    Ok(table
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .filter(|point| point.contains(id))
        .map(str::to_owned)
        .collect())
}

fn expect_output(seen: &str, expected: &str) -> Result<()> {
    ensure!(seen.trim() == expected, "read {:?}, expected {expected:?}", seen.trim());
    Ok(())
}

/// Waits (within [`EVENT_DEADLINE`]) until the CRI log file `log` holds every line of `wanted`.
async fn wait_for_log(log: &Path, wanted: &[&str]) -> Result<()> {
    let deadline = Instant::now() + EVENT_DEADLINE;
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        let missing: Vec<&&str> = wanted.iter().filter(|w| !text.lines().any(|l| l.contains(**w))).collect();
        if missing.is_empty() {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "{} lacks {missing:?} after {EVENT_DEADLINE:?}: {text:?}",
            log.display()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A mount the check made on the node, unmounted (lazily, as a last resort) when dropped.
struct HostMount(Option<PathBuf>);

impl HostMount {
    fn tmpfs(at: &Path) -> Result<HostMount> {
        mount(Some("tmpfs"), at, Some("tmpfs"), MsFlags::empty(), Some("size=4m,mode=0755"))
            .with_context(|| format!("mounting a tmpfs on {}", at.display()))?;
        Ok(HostMount(Some(at.to_path_buf())))
    }

    /// `at` bound onto itself and made a shared mount (propagation needs a peer group).
    fn shared_bind(at: &Path) -> Result<HostMount> {
        mount(Some(at), at, None::<&str>, MsFlags::MS_BIND, None::<&str>)
            .with_context(|| format!("binding {} onto itself", at.display()))?;
        let guard = HostMount(Some(at.to_path_buf()));
        mount(None::<&str>, at, None::<&str>, MsFlags::MS_SHARED, None::<&str>)
            .with_context(|| format!("making {} shared", at.display()))?;
        Ok(guard)
    }

    /// Unmounts it now, not lazily: fails while anything holds it (then it is detached when
    /// dropped).
    fn unmount(mut self) -> Result<()> {
        let Some(at) = self.0.clone() else { return Ok(()) };
        umount2(&at, MntFlags::empty()).with_context(|| format!("umount {}", at.display()))?;
        self.0 = None;
        Ok(())
    }
}

impl Drop for HostMount {
    fn drop(&mut self) {
        if let Some(at) = self.0.take() {
            let _ = umount2(&at, MntFlags::MNT_DETACH);
        }
    }
}
