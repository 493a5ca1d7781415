//! A CRI client as the kubelet uses one, for the pod tests and benchmarks: connect to containerd's
//! CRI socket, run and remove pod sandboxes, create and start containers, ExecSync into them.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use hyper_util::rt::TokioIo;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::{
    ContainerConfig, ContainerMetadata, ContainerState, ContainerStatusRequest, CreateContainerRequest,
    ExecSyncRequest, ImageSpec, LinuxPodSandboxConfig, LinuxSandboxSecurityContext, Mount, PodSandboxConfig,
    PodSandboxMetadata, PodSandboxStatusRequest, RemovePodSandboxRequest, RunPodSandboxRequest,
    StartContainerRequest, StopPodSandboxRequest,
};
use tonic::transport::{Channel, Endpoint, Uri};

/// The busybox image the pod tests import (`husk_tests::containerd::BUSYBOX`).
pub const IMAGE: &str = "docker.io/library/busybox:husk";
/// The RuntimeClass handler of Husk pods.
pub const HANDLER: &str = "husk";

/// A connected CRI runtime client.
pub type Cri = RuntimeServiceClient<Channel>;

/// The pod's IP address as CRI reports it (from CNI).
pub async fn pod_ip(cri: &mut Cri, pod: &str) -> Result<String> {
    let request = PodSandboxStatusRequest { pod_sandbox_id: pod.into(), verbose: false };
    let status = cri.pod_sandbox_status(request).await.context("PodSandboxStatus")?.into_inner().status;
    let ip = status.and_then(|s| s.network).map(|n| n.ip).unwrap_or_default();
    if ip.is_empty() {
        bail!("pod {pod}: CRI reports no IP address");
    }
    Ok(ip)
}

/// The container's exit code once CRI reports it exited (within a minute).
pub async fn exit_code_when_exited(cri: &mut Cri, id: &str) -> Result<i32> {
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
pub async fn run_pod(cri: &mut Cri, config: &PodSandboxConfig, handler: &str) -> Result<String> {
    let request = RunPodSandboxRequest { config: Some(config.clone()), runtime_handler: handler.into() };
    Ok(cri.run_pod_sandbox(request).await.context("RunPodSandbox")?.into_inner().pod_sandbox_id)
}

/// StopPodSandbox then RemovePodSandbox, as the kubelet ends a pod.
pub async fn remove_pod(cri: &mut Cri, pod: String) -> Result<()> {
    cri.stop_pod_sandbox(StopPodSandboxRequest { pod_sandbox_id: pod.clone() })
        .await
        .context("StopPodSandbox")?;
    cri.remove_pod_sandbox(RemovePodSandboxRequest { pod_sandbox_id: pod })
        .await
        .context("RemovePodSandbox")?;
    Ok(())
}

/// Pods started together by [`start_pods_at_once`].
#[derive(Debug, Default)]
pub struct PodBatch {
    /// Every pod sandbox that was created (to remove, whether its container started or not).
    pub pods: Vec<String>,
    /// Each started pod's RunPodSandbox sent to its StartContainer returned.
    pub start_ms: Vec<f64>,
    /// The first pod that failed to start.
    pub failure: Option<anyhow::Error>,
}

/// Starts `n` pods named `{prefix}-{i}` with `handler` at once, each with one idle busybox
/// container, its logs in `logs`.
pub async fn start_pods_at_once(
    cri: &Cri,
    logs: &str,
    handler: &str,
    prefix: &str,
    n: usize,
) -> Result<PodBatch> {
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            let mut cri = cri.clone();
            let config = pod_config(&format!("{prefix}-{i}"), logs);
            let handler = handler.to_owned();
            tokio::spawn(async move {
                let own = Instant::now();
                let pod = run_pod(&mut cri, &config, &handler).await?;
                let started = start(&mut cri, &pod, &config, "main", None, "exec sleep 100000").await;
                Ok::<_, anyhow::Error>((pod, started.map(|_| own.elapsed().as_secs_f64() * 1000.0)))
            })
        })
        .collect();
    let mut batch = PodBatch::default();
    for task in tasks {
        match task.await.context("a pod task")? {
            Ok((pod, started)) => {
                batch.pods.push(pod);
                match started {
                    Ok(ms) => batch.start_ms.push(ms),
                    Err(err) => drop(batch.failure.get_or_insert(err)),
                }
            }
            Err(err) => drop(batch.failure.get_or_insert(err)),
        }
    }
    Ok(batch)
}

/// Removes `pods` (StopPodSandbox, RemovePodSandbox) concurrently.
pub async fn remove_pods(cri: &Cri, pods: Vec<String>) -> Result<()> {
    let removals: Vec<_> = pods
        .into_iter()
        .map(|pod| {
            let mut cri = cri.clone();
            tokio::spawn(async move { remove_pod(&mut cri, pod).await })
        })
        .collect();
    for removal in removals {
        removal.await.context("a removal task")??;
    }
    Ok(())
}

/// A pod named `name` on the CNI network, its container logs in `logs`.
pub fn pod_config(name: &str, logs: &str) -> PodSandboxConfig {
    PodSandboxConfig {
        metadata: Some(PodSandboxMetadata {
            name: name.into(),
            uid: format!("{name}-uid"),
            namespace: "default".into(),
            attempt: 0,
        }),
        hostname: name.into(),
        log_directory: logs.into(),
        linux: Some(LinuxPodSandboxConfig {
            security_context: Some(LinuxSandboxSecurityContext::default()),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Creates and starts a container running `script` (with `volume` at /data).
pub async fn start(
    cri: &mut Cri,
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

/// [`create`] then [`start_created`]; prints `<name>=<id>`.
pub async fn create_and_start(
    cri: &mut Cri,
    pod: &str,
    sandbox_config: &PodSandboxConfig,
    name: &str,
    config: ContainerConfig,
) -> Result<String> {
    let id = create(cri, pod, sandbox_config, name, config).await?;
    start_created(cri, &id, name).await?;
    println!("{name}={id}");
    Ok(id)
}

/// CreateContainer of `config` (named `name` in errors) in `pod`; returns its id.
pub async fn create(
    cri: &mut Cri,
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
    let reply = cri.create_container(request).await.with_context(|| format!("CreateContainer {name}"))?;
    Ok(reply.into_inner().container_id)
}

/// StartContainer of the created container `id` (named `name` in errors).
pub async fn start_created(cri: &mut Cri, id: &str, name: &str) -> Result<()> {
    cri.start_container(StartContainerRequest { container_id: id.into() })
        .await
        .with_context(|| format!("StartContainer {name}"))?;
    Ok(())
}

/// The longest any CRI call may take, below the 900 s a VM test gives its whole test host.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(300);
/// How long [`exec`] lets a command run in the container (CRI's ExecSync timeout).
pub const EXEC_TIMEOUT_S: u64 = 60;
/// How much longer than its ExecSync timeout a call may take before the client gives up on it:
/// containerd kills the command at the timeout but then waits for its stdio, which a child that
/// outlived it can hold open for good.
const EXEC_GRACE: Duration = Duration::from_secs(15);

/// ExecSync: the command's stdout (a non-zero exit is an error), within [`EXEC_TIMEOUT_S`].
pub async fn exec(cri: &mut Cri, id: &str, cmd: &[&str]) -> Result<String> {
    exec_within(cri, id, cmd, EXEC_TIMEOUT_S).await
}

/// [`exec`] with a timeout of `timeout_s` seconds; a call that has not returned
/// [`EXEC_GRACE`] after that is abandoned with an error naming the command.
pub async fn exec_within(cri: &mut Cri, id: &str, cmd: &[&str], timeout_s: u64) -> Result<String> {
    let request = ExecSyncRequest {
        container_id: id.into(),
        cmd: cmd.iter().map(|s| s.to_string()).collect(),
        timeout: timeout_s as i64,
    };
    let limit = Duration::from_secs(timeout_s) + EXEC_GRACE;
    let reply = tokio::time::timeout(limit, cri.exec_sync(request))
        .await
        .map_err(|_| {
            anyhow::anyhow!(
                "ExecSync {cmd:?} in {id}: no reply within {limit:?} (its timeout was {timeout_s} s)"
            )
        })?
        .with_context(|| format!("ExecSync {cmd:?}"))?
        .into_inner();
    if reply.exit_code != 0 {
        bail!("{cmd:?} exited {}: {}", reply.exit_code, String::from_utf8_lossy(&reply.stderr));
    }
    Ok(String::from_utf8_lossy(&reply.stdout).into_owned())
}

/// A CRI client channel over containerd's unix socket.
pub async fn connect(socket: PathBuf) -> Result<Channel> {
    // Every call has a deadline (those with their own, shorter ones say more when they expire).
    let endpoint = Endpoint::try_from("http://[::]:50051")?.timeout(CALL_TIMEOUT);
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
