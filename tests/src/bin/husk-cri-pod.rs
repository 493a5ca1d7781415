//! `husk-cri-pod CONTAINERD_SOCKET VOLUME_DIR LOG_DIR`: drives one Kubernetes-style pod through
//! containerd's CRI plugin (what the kubelet does) with the RuntimeClass handler `husk`: a pod
//! sandbox, then two containers sharing the host directory VOLUME_DIR at /data. The writer puts a
//! file there, the reader reads it back through ExecSync, and both report their kernel's boot id
//! (one VM per pod: equal). Then the pod is stopped and removed. Prints `key=value` lines for
//! the test to check; exits non-zero when a CRI call fails.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use hyper_util::rt::TokioIo;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::{
    ContainerConfig, ContainerMetadata, CreateContainerRequest, ExecSyncRequest, ImageSpec,
    LinuxPodSandboxConfig, LinuxSandboxSecurityContext, Mount, NamespaceMode, NamespaceOption,
    PodSandboxConfig, PodSandboxMetadata, RemovePodSandboxRequest, RunPodSandboxRequest,
    StartContainerRequest, StopPodSandboxRequest,
};
use tonic::transport::{Channel, Endpoint, Uri};

const IMAGE: &str = "docker.io/library/busybox:husk";
const HANDLER: &str = "husk";

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [socket, volume, logs] = args.as_slice() else {
        bail!("usage: husk-cri-pod CONTAINERD_SOCKET VOLUME_DIR LOG_DIR");
    };
    let mut cri = RuntimeServiceClient::new(connect(PathBuf::from(socket)).await?);
    let sandbox_config = pod_config(logs);
    let pod = cri
        .run_pod_sandbox(RunPodSandboxRequest {
            config: Some(sandbox_config.clone()),
            runtime_handler: HANDLER.into(),
        })
        .await
        .context("RunPodSandbox")?
        .into_inner()
        .pod_sandbox_id;
    println!("pod={pod}");
    let result = exercise(&mut cri, &pod, &sandbox_config, volume).await;
    cri.stop_pod_sandbox(StopPodSandboxRequest { pod_sandbox_id: pod.clone() })
        .await
        .context("StopPodSandbox")?;
    cri.remove_pod_sandbox(RemovePodSandboxRequest { pod_sandbox_id: pod })
        .await
        .context("RemovePodSandbox")?;
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
        volume,
        "echo writer-started; echo from-the-writer > /data/shared; exec sleep 1000",
    )
    .await?;
    let reader =
        start(cri, pod, sandbox_config, "reader", volume, "echo reader-started; exec sleep 1000").await?;
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

fn pod_config(logs: &str) -> PodSandboxConfig {
    let host_network = NamespaceOption { network: NamespaceMode::Node.into(), ..Default::default() };
    PodSandboxConfig {
        metadata: Some(PodSandboxMetadata {
            name: "husk-pod".into(),
            uid: "husk-pod-uid".into(),
            namespace: "default".into(),
            attempt: 0,
        }),
        hostname: "husk-pod".into(),
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

/// Creates and starts a container running `script` with the volume at /data.
async fn start(
    cri: &mut RuntimeServiceClient<Channel>,
    pod: &str,
    sandbox_config: &PodSandboxConfig,
    name: &str,
    volume: &str,
    script: &str,
) -> Result<String> {
    let config = ContainerConfig {
        metadata: Some(ContainerMetadata { name: name.into(), attempt: 0 }),
        image: Some(ImageSpec { image: IMAGE.into(), ..Default::default() }),
        command: vec!["sh".into(), "-c".into(), script.into()],
        mounts: vec![Mount {
            container_path: "/data".into(),
            host_path: volume.into(),
            ..Default::default()
        }],
        log_path: format!("{name}.log"),
        ..Default::default()
    };
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
