//! `containerd-shim-husk-v2`: the containerd runtime `io.containerd.husk.v2` (task API v3,
//! containerd 2.x). One shim process serves one pod and holds its VM (Husk's VMM is a library);
//! the containers of a CRI pod reach the same shim through their grouping key, the pod id.
//!
//! - [`bundle`]: pod grouping from the CRI annotations, and the guest's view of a bundle.
//! - [`pod`]: the pod's VM, containers and processes; every task call's behaviour.
//! - [`process`]: one process: stdio joined to containerd's FIFOs, status, exit.
//! - [`log_uri`]: `file://` and `binary://` log URIs in place of FIFOs.
//! - [`task`]: the ttrpc task service over the pod.
//! - [`events`], [`metrics`], [`error`]: what containerd gets back.
//! - [`features`]: the runtime's OCI features, for `-info`.
//!
//! The shim crate runs the process model: `start` spawns (or finds) the pod's shim server and
//! prints its address, `delete` cleans up after a shim that died, and the server serves tasks
//! until containerd shuts it down with no container left.

pub mod bundle;
pub mod error;
pub mod events;
pub mod features;
pub mod log_uri;
pub mod metrics;
pub mod pod;
pub mod process;
pub mod task;

use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;
use containerd_shim::asynchronous::util::write_str_to_file;
use containerd_shim::asynchronous::{spawn, ExitSignal, Shim};
use containerd_shim::publisher::RemotePublisher;
use containerd_shim::{api, Config as ShimConfig, Error, Flags, StartOpts};
use containerd_shim_protos::protobuf::well_known_types::any::Any;
use containerd_shim_protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim_protos::types::introspection::RuntimeInfo;

use self::bundle::{PodNetns, PodRole};
use self::events::EventSink;
use self::pod::{sandbox_name, Pod};
use self::task::TaskService;
use crate::config::Config;
use crate::phases::{self, Phase};
use crate::sandbox::{PodCgroup, SandboxDir};

/// The runtime name containerd knows Husk by (`ctr run --runtime io.containerd.husk.v2`).
pub const RUNTIME_ID: &str = "io.containerd.husk.v2";
/// Exit status reported for the tasks of a shim that was killed (128 + SIGKILL).
const KILLED_STATUS: u32 = 137;

/// The shim-crate side of the process model; see the module documentation.
pub struct HuskShim {
    namespace: String,
    id: String,
    debug: bool,
    /// The server's socket (`unix://...`; empty for `start` and `delete`).
    socket: String,
    exit: Arc<ExitSignal>,
}

impl std::fmt::Debug for HuskShim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HuskShim")
            .field("namespace", &self.namespace)
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

/// What the shim crate must know about Husk before it starts: Husk logs with `tracing` to the
/// bundle's `log` FIFO itself, and starts no child processes, so it needs no reaper.
pub fn shim_config() -> ShimConfig {
    ShimConfig { no_setup_logger: true, no_reaper: true, no_sub_reaper: true, ..Default::default() }
}

#[async_trait]
impl Shim for HuskShim {
    type T = TaskService;

    async fn new(_runtime_id: &str, args: &Flags, _config: &mut ShimConfig) -> Self {
        HuskShim {
            namespace: args.namespace.clone(),
            id: args.id.clone(),
            debug: args.debug,
            socket: args.socket.clone(),
            exit: Arc::new(ExitSignal::default()),
        }
    }

    /// `-info`: the runtime's features (recursive read-only mounts among them), asked by
    /// containerd before any pod exists.
    fn runtime_info(runtime_id: &str, options: Option<&Any>) -> Result<RuntimeInfo, Error> {
        features::runtime_info(runtime_id, options).map_err(|err| Error::Other(err.to_string()))
    }

    /// `start`: one shim per pod, so the grouping key is the pod's id; a container of a running
    /// pod gets that pod's shim address.
    async fn start_shim(&mut self, opts: StartOpts) -> Result<String, Error> {
        let spec =
            bundle::load_spec(Path::new(".")).map_err(|err| Error::InvalidArgument(err.to_string()))?;
        let role = PodRole::of(&opts.id, &bundle::annotations(&spec))
            .map_err(|err| Error::InvalidArgument(err.to_string()))?;
        let address = spawn(opts, role.pod_id(), Vec::new()).await?;
        // The server removes the socket named here when it exits (and containerd reads it).
        write_str_to_file("address", &address).await?;
        Ok(address)
    }

    /// `delete`: containerd runs it after each task's delete, and when the shim serving this
    /// container died (SIGKILL, OOM). A dead shim's VM died with it, so what is left is its
    /// directory and mounts on the host; a shim still serving the pod's other containers owns
    /// them and removes them itself.
    async fn delete_shim(&mut self) -> Result<api::DeleteResponse, Error> {
        let response = api::DeleteResponse {
            exit_status: KILLED_STATUS,
            exited_at: Some(Timestamp::now()).into(),
            ..Default::default()
        };
        let socket = ShimSocket::of_bundle().await;
        if socket == ShimSocket::Serving {
            return Ok(response);
        }
        // A configuration broken since the pod started must not keep its leftovers: the
        // defaults name the sandbox directory then.
        let config = Config::load(None).map(|loaded| loaded.config).unwrap_or_else(|err| {
            tracing::warn!(container = %self.id, %err, "reading Husk's configuration; cleaning up with the defaults");
            Config::default()
        });
        let spec = bundle::load_spec(Path::new(".")).ok();
        let role = spec.as_ref().and_then(|spec| PodRole::of(&self.id, &bundle::annotations(spec)).ok());
        let role = role.unwrap_or_else(|| PodRole::Sandbox { pod_id: self.id.clone() });
        let dir_name = sandbox_name(&self.namespace, role.pod_id());
        let leftover = match role {
            PodRole::Sandbox { .. } => dir_name,
            // The member's mounts, in the private tree (the guest's view follows them).
            PodRole::Member { .. } => format!("{dir_name}/mounts/{}", self.id),
        };
        SandboxDir::remove_leftover(&config.runtime.sandbox_dir, &leftover)
            .map_err(|err| Error::Other(format!("cleaning up after the shim of {}: {err}", self.id)))?;
        if let (Some(spec), PodRole::Sandbox { .. }) = (&spec, &role) {
            if let PodNetns::Path(netns) = bundle::pod_netns(spec) {
                if let Err(err) = crate::network::remove_leftovers(&netns).await {
                    tracing::warn!(container = %self.id, netns = %netns.display(), %err, "removing the pod's tc redirection");
                }
            }
            if let Some(cgroup) = bundle::cgroups_path(spec) {
                if let Err(err) = PodCgroup::remove_leftover(&cgroup) {
                    tracing::warn!(container = %self.id, %err, "removing the dead shim's pod cgroup");
                }
            }
        }
        if let ShimSocket::Dead(path) = socket {
            if let Err(err) = tokio::fs::remove_file(&path).await {
                tracing::debug!(path, %err, "removing a dead shim's socket");
            }
        }
        Ok(response)
    }

    async fn wait(&mut self) {
        self.exit.wait().await;
        // The shim crate removes the socket named in the bundle's address file, but containerd may
        // have removed the bundle by now (a pod's first container is often deleted before the
        // shim exits): remove it by the name the server was given.
        let path = self.socket.trim_start_matches("unix://");
        if !path.is_empty() {
            if let Err(err) = tokio::fs::remove_file(path).await {
                tracing::debug!(path, %err, "removing the shim's socket");
            }
        }
    }

    async fn create_task_service(&self, publisher: RemotePublisher) -> TaskService {
        init_logging(self.debug);
        // A bad configuration fails every create, naming the file and key (Pod::create).
        let config = Config::load(None).map(|loaded| loaded.config);
        if let Err(err) = &config {
            tracing::error!(%err, "reading Husk's configuration: every create will fail");
        }
        tracing::info!(namespace = %self.namespace, id = %self.id, "containerd-shim-husk-v2 serving");
        phases::mark(&sandbox_name(&self.namespace, &self.id), "", Phase::ShimServing);
        // Husk forwards its events itself (see `events`); the crate's publisher only names the address.
        let events = EventSink::new(&publisher.address, &self.namespace);
        let pod = Arc::new(Pod::new(&self.namespace, config, events, Arc::clone(&self.exit)));
        log_virtio_state_on_sigusr1(&pod);
        TaskService::new(pod)
    }
}

/// SIGUSR1 makes the serving shim log its VM's virtio rings and counters into containerd's log
/// (as containerd itself dumps its goroutines on SIGUSR1): what a test or an operator looks at
/// when a pod's network or share stops moving. Only the serving process listens (`start` and
/// `delete` never get here).
fn log_virtio_state_on_sigusr1(pod: &Arc<Pod>) {
    use tokio::signal::unix::{signal, SignalKind};
    let mut signals = match signal(SignalKind::user_defined1()) {
        Ok(signals) => signals,
        Err(err) => {
            tracing::warn!(%err, "cannot listen for SIGUSR1: no virtio state dumps");
            return;
        }
    };
    let pod = Arc::downgrade(pod);
    tokio::spawn(async move {
        while signals.recv().await.is_some() {
            let Some(pod) = pod.upgrade() else { return };
            // Off the runtime's threads: it waits on device locks, and a VM ending meanwhile
            // tears its devices down on this thread.
            let _ = tokio::task::spawn_blocking(move || pod.log_virtio_state()).await;
        }
    });
}

/// The shim socket named in the bundle's `address` file.
#[derive(Debug, PartialEq)]
enum ShimSocket {
    /// A shim answers there.
    Serving,
    /// Nobody answers: its shim died without removing it.
    Dead(String),
    /// The bundle names none.
    Unknown,
}

impl ShimSocket {
    async fn of_bundle() -> ShimSocket {
        let Ok(address) = tokio::fs::read_to_string("address").await else { return ShimSocket::Unknown };
        let path = address.trim().trim_start_matches("unix://");
        match tokio::net::UnixStream::connect(path).await {
            Ok(_) => ShimSocket::Serving,
            Err(_) => ShimSocket::Dead(path.to_owned()),
        }
    }
}

/// Logs go to the `log` FIFO containerd reads in the bundle (the shim's working directory), or
/// to stderr when there is none; `RUST_LOG` overrides the level.
fn init_logging(debug: bool) {
    use std::os::unix::fs::OpenOptionsExt;
    let level = if debug { "debug" } else { "info" };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    let fifo = std::fs::OpenOptions::new().write(true).custom_flags(libc::O_NONBLOCK).open("log");
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_ansi(false);
    let installed = match fifo {
        Ok(fifo) => builder.with_writer(std::sync::Mutex::new(fifo)).try_init(),
        Err(_) => builder.with_writer(std::io::stderr).try_init(),
    };
    if installed.is_err() {
        eprintln!("containerd-shim-husk-v2: a logger was installed already");
    }
}
