//! `husk-cri-pod CONTAINERD_SOCKET VOLUME_DIR LOG_DIR`: drives one Kubernetes-style pod through
//! containerd's CRI plugin (what the kubelet does) with the RuntimeClass handler `husk`: a pod
//! sandbox, then two containers sharing the host directory VOLUME_DIR at /data. The writer puts a
//! file there, the reader reads it back through ExecSync, and both report their kernel's boot id
//! (one VM per pod: equal). Then the pod is stopped and removed. Prints `key=value` lines for
//! the test to check; exits non-zero when a CRI call fails.
//!
//! `husk-cri-pod --bench RUNS CONTAINERD_SOCKET LOG_DIR`: `pod_start_ms`, from RunPodSandbox to the
//! return of StartContainer of the pod's one container (what a kubelet waits for before a pod
//! runs), with the handler `husk` beside `runc` in the same run; median of RUNS after a warm-up.
//!
//! `husk-cri-pod --vm-dies CONTAINERD_SOCKET LOG_DIR`: a privileged pod in the guest's own PID
//! namespace (`hostPID`) whose first container reboots the VM (`reboot -f`); prints the exit
//! codes both containers then report (`victim-exit=`, `bystander-exit=`).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use hyper_util::rt::TokioIo;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::{
    ContainerConfig, ContainerMetadata, ContainerState, ContainerStatusRequest, CreateContainerRequest,
    ExecSyncRequest, ImageSpec, LinuxContainerConfig, LinuxContainerSecurityContext, LinuxPodSandboxConfig,
    LinuxSandboxSecurityContext, Mount, NamespaceMode, NamespaceOption, PodSandboxConfig, PodSandboxMetadata,
    RemovePodSandboxRequest, RunPodSandboxRequest, StartContainerRequest, StopPodSandboxRequest,
};
use tonic::transport::{Channel, Endpoint, Uri};

const IMAGE: &str = "docker.io/library/busybox:husk";
const HANDLER: &str = "husk";

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let [flag, runs, socket, logs] = args.as_slice() {
        if flag == "--bench" {
            return bench(runs.parse().context("RUNS")?, socket, logs).await;
        }
    }
    if let [flag, socket, logs] = args.as_slice() {
        if flag == "--vm-dies" {
            return vm_dies(socket, logs).await;
        }
    }
    let [socket, volume, logs] = args.as_slice() else {
        bail!("usage: husk-cri-pod CONTAINERD_SOCKET VOLUME_DIR LOG_DIR | --bench RUNS CONTAINERD_SOCKET LOG_DIR");
    };
    let mut cri = RuntimeServiceClient::new(connect(PathBuf::from(socket)).await?);
    let sandbox_config = pod_config("husk-pod", logs);
    let pod = run_pod(&mut cri, &sandbox_config, HANDLER).await?;
    println!("pod={pod}");
    let result = exercise(&mut cri, &pod, &sandbox_config, volume).await;
    remove_pod(&mut cri, pod).await?;
    println!("pod-removed");
    result
}

async fn exercise(
    cri: &mut RuntimeServiceClient<Channel>,
    pod: &str,
    sandbox_config: &PodSandboxConfig,
    volume: &str,
) -> Result<()> {
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
    for (name, id) in [("writer", &writer), ("reader", &reader)] {
        println!(
            "{name}-boot-id={}",
            exec(cri, id, &["cat", "/proc/sys/kernel/random/boot_id"]).await?.trim()
        );
    }
    Ok(())
}

/// A container reboots its pod's VM; see the module documentation.
async fn vm_dies(socket: &str, logs: &str) -> Result<()> {
    let mut cri = RuntimeServiceClient::new(connect(PathBuf::from(socket)).await?);
    let mut config = pod_config("doomed-pod", logs);
    let node_pid = NamespaceOption {
        network: NamespaceMode::Node.into(),
        pid: NamespaceMode::Node.into(),
        ..Default::default()
    };
    if let Some(context) = config.linux.as_mut().and_then(|linux| linux.security_context.as_mut()) {
        context.namespace_options = Some(node_pid.clone());
        context.privileged = true;
    }
    let pod = run_pod(&mut cri, &config, HANDLER).await?;
    let result = async {
        let victim = start_privileged(&mut cri, &pod, &config, "victim", node_pid.clone()).await?;
        let bystander = start_privileged(&mut cri, &pod, &config, "bystander", node_pid).await?;
        // hostPID: the guest's PID 1 (the agent, /init) is in sight, as the node's is under runc.
        println!("victim-pid1={}", exec(&mut cri, &victim, &["cat", "/proc/1/comm"]).await?.trim());
        // The exec dies with the VM: its own result does not matter.
        let _ = exec(&mut cri, &victim, &["reboot", "-f"]).await;
        for (name, id) in [("victim", &victim), ("bystander", &bystander)] {
            println!("{name}-exit={}", exit_code_when_exited(&mut cri, id).await?);
        }
        Ok::<_, anyhow::Error>(())
    }
    .await;
    remove_pod(&mut cri, pod).await?;
    println!("pod-removed");
    result
}

async fn start_privileged(
    cri: &mut RuntimeServiceClient<Channel>,
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

/// The container's exit code once CRI reports it exited (within a minute).
async fn exit_code_when_exited(cri: &mut RuntimeServiceClient<Channel>, id: &str) -> Result<i32> {
    for _ in 0..300 {
        let request = ContainerStatusRequest { container_id: id.into(), verbose: false };
        let status = cri.container_status(request).await.context("ContainerStatus")?.into_inner().status;
        if let Some(status) = status.filter(|s| s.state == ContainerState::ContainerExited as i32) {
            return Ok(status.exit_code);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    bail!("container {id} did not exit")
}

/// RunPodSandbox with `handler`; returns the pod's id.
async fn run_pod(
    cri: &mut RuntimeServiceClient<Channel>,
    config: &PodSandboxConfig,
    handler: &str,
) -> Result<String> {
    let request = RunPodSandboxRequest { config: Some(config.clone()), runtime_handler: handler.into() };
    Ok(cri.run_pod_sandbox(request).await.context("RunPodSandbox")?.into_inner().pod_sandbox_id)
}

/// StopPodSandbox then RemovePodSandbox, as the kubelet ends a pod.
async fn remove_pod(cri: &mut RuntimeServiceClient<Channel>, pod: String) -> Result<()> {
    cri.stop_pod_sandbox(StopPodSandboxRequest { pod_sandbox_id: pod.clone() })
        .await
        .context("StopPodSandbox")?;
    cri.remove_pod_sandbox(RemovePodSandboxRequest { pod_sandbox_id: pod })
        .await
        .context("RemovePodSandbox")?;
    Ok(())
}

/// `pod_start_ms` with each handler; see the module documentation.
async fn bench(runs: usize, socket: &str, logs: &str) -> Result<()> {
    let mut cri = RuntimeServiceClient::new(connect(PathBuf::from(socket)).await?);
    println!("husk-cri-pod: {}", husk_tests::bench::vm_host_description());
    println!("start: RunPodSandbox sent; end: StartContainer of the pod's container returned");
    let mut medians = Vec::new();
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
    }
    let ((husk, husk_min, husk_max), (runc, runc_min, runc_max)) = (medians[0], medians[1]);
    println!(
        "pod_start_ms={husk:.1} (min {husk_min:.1} max {husk_max:.1}) runc_pod_start_ms={runc:.1} (min {runc_min:.1} max {runc_max:.1}) ratio={:.2}",
        husk / runc
    );
    Ok(())
}

fn pod_config(name: &str, logs: &str) -> PodSandboxConfig {
    let host_network = NamespaceOption { network: NamespaceMode::Node.into(), ..Default::default() };
    PodSandboxConfig {
        metadata: Some(PodSandboxMetadata {
            name: name.into(),
            uid: format!("{name}-uid"),
            namespace: "default".into(),
            attempt: 0,
        }),
        // A host-network pod has the node's hostname (runc refuses to set one without a UTS namespace).
        hostname: String::new(),
        log_directory: logs.into(),
        linux: Some(LinuxPodSandboxConfig {
            security_context: Some(LinuxSandboxSecurityContext {
                namespace_options: Some(host_network),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Creates and starts a container running `script` (with `volume` at /data).
async fn start(
    cri: &mut RuntimeServiceClient<Channel>,
    pod: &str,
    sandbox_config: &PodSandboxConfig,
    name: &str,
    volume: Option<&str>,
    script: &str,
) -> Result<String> {
    let mounts = volume.map(|host| Mount {
        container_path: "/data".into(),
        host_path: host.into(),
        ..Default::default()
    });
    let config = ContainerConfig {
        metadata: Some(ContainerMetadata { name: name.into(), attempt: 0 }),
        image: Some(ImageSpec { image: IMAGE.into(), ..Default::default() }),
        command: vec!["sh".into(), "-c".into(), script.into()],
        mounts: mounts.into_iter().collect(),
        // Unique in the log directory the benchmark's pods share.
        log_path: if volume.is_some() {
            format!("{name}.log")
        } else {
            format!("{}-{name}.log", &pod[..pod.len().min(12)])
        },
        ..Default::default()
    };
    create_and_start(cri, pod, sandbox_config, name, config).await
}

async fn create_and_start(
    cri: &mut RuntimeServiceClient<Channel>,
    pod: &str,
    sandbox_config: &PodSandboxConfig,
    name: &str,
    config: ContainerConfig,
) -> Result<String> {
    let request = CreateContainerRequest {
        pod_sandbox_id: pod.into(),
        config: Some(config),
        sandbox_config: Some(sandbox_config.clone()),
    };
    let id = cri
        .create_container(request)
        .await
        .with_context(|| format!("CreateContainer {name}"))?
        .into_inner()
        .container_id;
    cri.start_container(StartContainerRequest { container_id: id.clone() })
        .await
        .with_context(|| format!("StartContainer {name}"))?;
    println!("{name}={id}");
    Ok(id)
}

/// ExecSync: the command's stdout (a non-zero exit is an error).
async fn exec(cri: &mut RuntimeServiceClient<Channel>, id: &str, cmd: &[&str]) -> Result<String> {
    let request = ExecSyncRequest {
        container_id: id.into(),
        cmd: cmd.iter().map(|s| s.to_string()).collect(),
        timeout: 60,
    };
    let reply = cri.exec_sync(request).await.with_context(|| format!("ExecSync {cmd:?}"))?.into_inner();
    if reply.exit_code != 0 {
        bail!("{cmd:?} exited {}: {}", reply.exit_code, String::from_utf8_lossy(&reply.stderr));
    }
    Ok(String::from_utf8_lossy(&reply.stdout).into_owned())
}

async fn connect(socket: PathBuf) -> Result<Channel> {
    let endpoint = Endpoint::try_from("http://[::]:50051")?;
    let channel =
        endpoint
            .connect_with_connector(tower::service_fn(move |_: Uri| {
                let socket = socket.clone();
                async move {
                    Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(socket).await?))
                }
            }))
            .await
            .context("connecting to containerd's CRI socket")?;
    Ok(channel)
}
