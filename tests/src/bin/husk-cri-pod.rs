//! `husk-cri-pod CONTAINERD_SOCKET VOLUME_DIR LOG_DIR`: drives one Kubernetes-style pod through
//! containerd's CRI plugin (what the kubelet does) with the RuntimeClass handler `husk`: a pod
//! sandbox, then two containers sharing the host directory VOLUME_DIR at /data. The writer puts a
//! file there, the reader reads it back through ExecSync, and both report their kernel's boot id
//! (one VM per pod: equal). The pod has a hostname and an IPC sysctl; both containers report
//! what they see of them and their IPC and UTS namespaces (`<name>-pod-view=`: the pod's
//! namespaces are shared, as under runc). Then the pod is stopped and removed. Prints
//! `key=value` lines for the test to check; exits non-zero when a CRI call fails.
//!
//! `husk-cri-pod --bench RUNS CONTAINERD_SOCKET LOG_DIR`: `pod_start_ms`, from RunPodSandbox to the
//! return of StartContainer of the pod's one container (what a kubelet waits for before a pod
//! runs), with the handler `husk` beside `runc` in the same run; median of RUNS after a warm-up.
//!
//! `husk-cri-pod --fault KIND CONTAINERD_SOCKET LOG_DIR`: a privileged pod in the guest's own PID
//! namespace (`hostPID`) with two containers, `victim` and `bystander`, and one fault:
//! - `reboot`: the victim reboots the VM (`reboot -f`);
//! - `panic`: the victim crashes the guest kernel (`vm.panic_on_oom`, then out of memory: the
//!   guest kernel has no sysrq);
//! - `vm-oom`: the victim, with no memory limit, allocates until the guest runs out of memory;
//! - `agent-crash`: the victim overwrites the agent's code (PID 1, through `/proc/1/mem`) with
//!   breakpoints: the agent dies and the guest kernel with it;
//! - `agent-hang`: the victim freezes the agent (moves PID 1 into a frozen cgroup): the VM runs
//!   on, the agent answers nothing;
//! - `shim-kill`: the probe kills the pod's shim (SIGKILL), the VM with it.
//!
//! The pod gets a cgroup on the node as the kubelet makes one (`/kubepods/<pod uid>`, limited to
//! `$HUSK_POD_MEMORY_MAX` bytes when set); the probe prints what runs in the sandbox's cgroup
//! (`sandbox-cgroup-runs=`) and, once the pod is removed, whether that cgroup is left
//! (`sandbox-cgroup-left=`).
//!
//! Then it prints the exit codes both containers report (`victim-exit=`, `bystander-exit=`)
//! and, for `vm-oom`, whether the bystander still answers (`bystander-after=`), the most the
//! pod's cgroup was charged (`pod-cgroup-peak-mib=`) and how many of its processes the node's OOM
//! killer took (`pod-cgroup-oom-kills=`).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use husk_tests::bench::Figure;
use husk_tests::cri::{
    connect, create_and_start, exec, exit_code_when_exited, pod_config, remove_pod, run_pod, start, Cri,
    HANDLER, IMAGE,
};
use husk_tests::pod_cgroup::PodCgroup;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::{
    ContainerConfig, ContainerMetadata, ImageSpec, LinuxContainerConfig, LinuxContainerSecurityContext,
    NamespaceMode, NamespaceOption, PodSandboxConfig,
};

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let [flag, runs, socket, logs] = args.as_slice() {
        if flag == "--bench" {
            return bench(runs.parse().context("RUNS")?, socket, logs).await;
        }
    }
    if let [flag, kind, socket, logs] = args.as_slice() {
        if flag == "--fault" {
            return fault(Fault::parse(kind)?, socket, logs).await;
        }
    }
    let [socket, volume, logs] = args.as_slice() else {
        bail!(
            "usage: husk-cri-pod CONTAINERD_SOCKET VOLUME_DIR LOG_DIR | --bench RUNS CONTAINERD_SOCKET LOG_DIR \
             | --fault reboot|panic|vm-oom|agent-crash|agent-hang|shim-kill CONTAINERD_SOCKET LOG_DIR"
        );
    };
    let mut cri = RuntimeServiceClient::new(connect(PathBuf::from(socket)).await?);
    let mut sandbox_config = pod_config("husk-pod", logs);
    if let Some(linux) = sandbox_config.linux.as_mut() {
        linux.sysctls.insert("kernel.shm_rmid_forced".into(), "1".into());
    }
    let pod = run_pod(&mut cri, &sandbox_config, HANDLER).await?;
    println!("pod={pod}");
    let result = exercise(&mut cri, &pod, &sandbox_config, volume).await;
    remove_pod(&mut cri, pod).await?;
    println!("pod-removed");
    result
}

async fn exercise(cri: &mut Cri, pod: &str, sandbox_config: &PodSandboxConfig, volume: &str) -> Result<()> {
    let writer = start(
        cri,
        pod,
        sandbox_config,
        "writer",
        Some(volume),
        "echo writer-started; echo from-the-writer > /data/shared; exec sleep 1000",
    )
    .await?;
    let reader =
        start(cri, pod, sandbox_config, "reader", Some(volume), "echo reader-started; exec sleep 1000")
            .await?;
    let host_file = PathBuf::from(volume).join("shared");
    for _ in 0..300 {
        if host_file.exists() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!("host-sees={}", std::fs::read_to_string(&host_file).unwrap_or_default().trim());
    println!("reader-sees={}", exec(cri, &reader, &["cat", "/data/shared"]).await?.trim());
    let pod_view = "echo \"$(hostname) shm_rmid_forced=$(cat /proc/sys/kernel/shm_rmid_forced) \
        $(readlink /proc/self/ns/ipc) $(readlink /proc/self/ns/uts)\"";
    for (name, id) in [("writer", &writer), ("reader", &reader)] {
        println!(
            "{name}-boot-id={}",
            exec(cri, id, &["cat", "/proc/sys/kernel/random/boot_id"]).await?.trim()
        );
        println!("{name}-pod-view={}", exec(cri, id, &["sh", "-c", pod_view]).await?.trim());
    }
    Ok(())
}

/// How long the exec that causes a fault may take to end (with the VM, or on its own).
const FAULT_EXEC_LIMIT: Duration = Duration::from_secs(120);

/// What `--fault` does to the pod; see the module documentation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    Reboot,
    Panic,
    VmOom,
    AgentCrash,
    AgentHang,
    ShimKill,
}

/// Every executable mapping of PID 1 (not the kernel's [vdso]) overwritten with int3: the next
/// instruction any agent thread runs traps, and a fault kills even init.
const CRASH_THE_AGENT: &str = r#"for range in $(awk '$2 ~ /x/ && $6 !~ /^\[/ { print $1 }' /proc/1/maps); do
    start=$((0x${range%-*})); end=$((0x${range#*-}))
    tr '\000' '\314' </dev/zero | dd of=/proc/1/mem bs=4096 seek=$((start / 4096)) count=$(((end - start) / 4096)) conv=notrunc 2>/dev/null
done"#;

/// PID 1 moved into a cgroup of its own, which is then frozen. (A privileged CRI container of
/// Husk shares the guest's cgroup namespace: a fresh cgroup2 mount shows the guest's root.)
const FREEZE_THE_AGENT: &str =
    "mkdir -p /tmp/cg && mount -t cgroup2 none /tmp/cg && mkdir /tmp/cg/frozen-agent &&
    echo 1 > /tmp/cg/frozen-agent/cgroup.procs && echo 1 > /tmp/cg/frozen-agent/cgroup.freeze";

impl Fault {
    fn parse(kind: &str) -> Result<Fault> {
        Ok(match kind {
            "reboot" => Fault::Reboot,
            "panic" => Fault::Panic,
            "vm-oom" => Fault::VmOom,
            "agent-crash" => Fault::AgentCrash,
            "agent-hang" => Fault::AgentHang,
            "shim-kill" => Fault::ShimKill,
            _ => bail!(
                "--fault {kind:?}: expected reboot, panic, vm-oom, agent-crash, agent-hang or shim-kill"
            ),
        })
    }

    /// What the victim runs in the pod's guest to cause it (none: the probe does it).
    fn command(self) -> Option<&'static [&'static str]> {
        Some(match self {
            Fault::Reboot => &["reboot", "-f"],
            Fault::Panic => {
                &["sh", "-c", "echo 1 > /proc/sys/vm/panic_on_oom && x=a && while :; do x=$x$x; done"]
            }
            // Doubling a shell string until the guest's memory is gone (no cgroup limit).
            Fault::VmOom => &["sh", "-c", "x=a; while :; do x=$x$x; done"],
            Fault::AgentCrash => &["sh", "-c", CRASH_THE_AGENT],
            Fault::AgentHang => &["sh", "-c", FREEZE_THE_AGENT],
            Fault::ShimKill => return None,
        })
    }
}

/// SIGKILLs the Husk shims of the containerd at `socket` (found by the `-address` they were
/// started with); returns how many.
fn kill_shims(socket: &str) -> Result<usize> {
    let mut killed = 0;
    for entry in std::fs::read_dir("/proc").context("/proc")?.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else { continue };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else { continue };
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        let is_shim = args.first().is_some_and(|a| a.ends_with(b"containerd-shim-husk-v2"));
        let ours = args.windows(2).any(|w| w[0] == b"-address" && w[1] == socket.as_bytes());
        if is_shim && ours {
            // SAFETY: kill(2) with a pid read from /proc and a valid signal number.
            if unsafe { libc::kill(pid, libc::SIGKILL) } == 0 {
                killed += 1;
            }
        }
    }
    Ok(killed)
}

/// A fault hits a pod; see the module documentation.
async fn fault(fault: Fault, socket: &str, logs: &str) -> Result<()> {
    let mut cri = RuntimeServiceClient::new(connect(PathBuf::from(socket)).await?);
    let mut config = pod_config("doomed-pod", logs);
    let memory_max = match std::env::var("HUSK_POD_MEMORY_MAX") {
        Ok(bytes) => Some(bytes.parse().context("HUSK_POD_MEMORY_MAX")?),
        Err(_) => None,
    };
    let cgroup = PodCgroup::create("doomed-pod-uid", memory_max)?;
    let node_pid = NamespaceOption { pid: NamespaceMode::Node.into(), ..Default::default() };
    if let Some(linux) = config.linux.as_mut() {
        linux.cgroup_parent = cgroup.cgroup_parent().to_owned();
        if let Some(context) = linux.security_context.as_mut() {
            context.namespace_options = Some(node_pid.clone());
            context.privileged = true;
        }
    }
    let pod = run_pod(&mut cri, &config, HANDLER).await?;
    println!("sandbox-cgroup-runs={}", cgroup.sandbox_commands(&pod)?.join(","));
    let result = async {
        let victim = start_privileged(&mut cri, &pod, &config, "victim", node_pid.clone()).await?;
        let bystander = start_privileged(&mut cri, &pod, &config, "bystander", node_pid).await?;
        // hostPID: the guest's PID 1 (the agent, /init) is in sight, as the node's is under runc.
        println!("victim-pid1={}", exec(&mut cri, &victim, &["cat", "/proc/1/comm"]).await?.trim());
        match fault.command() {
            // The exec may die with the VM or the process: its result is for diagnosis only.
            Some(command) => {
                match tokio::time::timeout(FAULT_EXEC_LIMIT, exec(&mut cri, &victim, command)).await {
                    Ok(Ok(output)) => println!("fault-output={}", output.trim().replace('\n', " | ")),
                    Ok(Err(err)) => println!("fault-exec-error={}", format!("{err:#}").replace('\n', " | ")),
                    Err(_) => println!("fault-exec-error=no answer within {FAULT_EXEC_LIMIT:?}"),
                }
            }
            None => println!("shims-killed={}", kill_shims(socket)?),
        }
        if fault == Fault::VmOom {
            // The guest's OOM killer took the hog (or the victim's sleep); the pod lives on.
            let after = exec(&mut cri, &bystander, &["cat", "/proc/sys/kernel/random/boot_id"]).await;
            println!("bystander-after={}", if after.is_ok() { "answers" } else { "silent" });
            let count = "dmesg | grep -c 'Out of memory: Killed process' || true";
            let oom_kills = exec(&mut cri, &bystander, &["sh", "-c", count]).await;
            println!("guest-oom-kills={}", oom_kills.map(|text| text.trim().to_owned()).unwrap_or_default());
            println!("pod-cgroup-peak-mib={:.1}", cgroup.peak_mib()?);
            println!("pod-cgroup-oom-kills={}", cgroup.oom_kills()?);
            return Ok::<_, anyhow::Error>(());
        }
        for (name, id) in [("victim", &victim), ("bystander", &bystander)] {
            println!("{name}-exit={}", exit_code_when_exited(&mut cri, id).await?);
        }
        Ok::<_, anyhow::Error>(())
    }
    .await;
    remove_pod(&mut cri, pod.clone()).await?;
    println!("pod-removed");
    println!("sandbox-cgroup-left={}", cgroup.sandbox(&pod).exists());
    cgroup.remove()?;
    result
}

async fn start_privileged(
    cri: &mut Cri,
    pod: &str,
    sandbox_config: &PodSandboxConfig,
    name: &str,
    namespaces: NamespaceOption,
) -> Result<String> {
    let config = ContainerConfig {
        metadata: Some(ContainerMetadata { name: name.into(), attempt: 0 }),
        image: Some(ImageSpec { image: IMAGE.into(), ..Default::default() }),
        command: vec!["sleep".into(), "1000".into()],
        linux: Some(LinuxContainerConfig {
            security_context: Some(LinuxContainerSecurityContext {
                privileged: true,
                namespace_options: Some(namespaces),
                ..Default::default()
            }),
            ..Default::default()
        }),
        log_path: format!("{name}.log"),
        ..Default::default()
    };
    create_and_start(cri, pod, sandbox_config, name, config).await
}

/// `pod_start_ms` with each handler; see the module documentation.
async fn bench(runs: usize, socket: &str, logs: &str) -> Result<()> {
    let mut cri = RuntimeServiceClient::new(connect(PathBuf::from(socket)).await?);
    println!("husk-cri-pod: {}", husk_tests::bench::vm_host_description());
    println!("start: RunPodSandbox sent; end: StartContainer of the pod's container returned");
    let mut medians = Vec::new();
    let mut samples = Vec::new();
    for handler in [HANDLER, "runc"] {
        let mut times = Vec::new();
        for run in 0..=runs {
            let config = pod_config(&format!("bench-{handler}-{run}"), logs);
            let started = Instant::now();
            let pod = run_pod(&mut cri, &config, handler).await?;
            start(&mut cri, &pod, &config, "main", None, "exec sleep 1000").await?;
            if run > 0 {
                times.push(started.elapsed().as_secs_f64() * 1000.0);
            }
            remove_pod(&mut cri, pod).await?;
        }
        medians.push(husk_tests::bench::spread(&times));
        samples.push(times);
    }
    let ((husk, husk_min, husk_max), (runc, runc_min, runc_max)) = (medians[0], medians[1]);
    println!(
        "pod_start_ms={husk:.1} (min {husk_min:.1} max {husk_max:.1}) runc_pod_start_ms={runc:.1} (min {runc_min:.1} max {runc_max:.1}) ratio={:.2}",
        husk / runc
    );
    Figure::new(
        "pod_start_ms",
        "ms",
        "RunPodSandbox sent",
        "StartContainer of the pod's container returned (after a warm-up pod)",
    )
    .samples(&samples[0])
    .beside("runc_pod_start_ms", "runc", &samples[1])
    .emit();
    Ok(())
}
