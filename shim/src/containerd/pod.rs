//! One pod as the shim serves it: its VM ([`Sandbox`], booted by the pod's first container and
//! shut down with its last), its containers and their processes. Every task call of containerd
//! lands here as a method; [`super::task::TaskService`] only translates.
//!
//! The state lock is held across short agent calls (create, start, kill...) so calls of one pod
//! apply in order, never across a wait: each started process has a watcher task that waits for
//! its exit in the guest, lets its output drain into containerd's FIFOs, records the exit and
//! publishes TaskExit. If the VM or the agent dies, those waits fail and every process of the
//! pod exits with status 255; the VM's end and the console's last lines are logged.

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, Weak};
use std::time::{Duration, Instant};

use containerd_shim::asynchronous::io::Stdio;
use containerd_shim::asynchronous::ExitSignal;
use containerd_shim_protos::api;
use containerd_shim_protos::events::task::{
    TaskCreate, TaskDelete, TaskExecAdded, TaskExecStarted, TaskExit, TaskIO, TaskOOM, TaskPaused,
    TaskResumed, TaskStart,
};
use containerd_shim_protos::topics;
use oci_spec::runtime::LinuxNamespaceType;
use tokio::sync::Mutex;

use super::bundle::{self, PodNetns, PodRole};
use super::error::ShimError;
use super::events::EventSink;
use super::metrics;
use super::process::{Exit, Process, Status};
use crate::agent_client::AgentError;
use crate::config::{Config, ConfigError};
use crate::guest_image::{Check, GuestImage};
use crate::network::PodNetwork;
use crate::phases::{self, Phase};
use crate::sandbox::{Access, Propagation, Sandbox, SandboxConfig};
use husk_vmm::rate_limit::RateLimit;
use husk_vmm::VmInspector;

/// How long output may still flow into a log file or logging program after the exit.
const LOG_DRAIN_LIMIT: Duration = Duration::from_secs(10);
/// How long a lost process's watcher waits for the VM's end to be recorded, for the report.
const VM_END_GRACE: Duration = Duration::from_secs(2);
/// OOM events a pod's guest may report: a burst, then one per period (the rest are dropped and
/// counted in the next one's log line).
const OOM_EVENTS: (u32, Duration) = (10, Duration::from_secs(1));
/// How many deleted containers' OOM kills are still published: a kill the guest queued before
/// the exit may reach the shim after `ctr run --rm` deleted the container.
const RECENTLY_DELETED: usize = 16;
/// Exit status of a process whose VM or agent went away.
const LOST_STATUS: u32 = 255;

/// See the module documentation.
pub struct Pod {
    namespace: String,
    config: Config,
    /// Why the configuration could not be read (then `config` is the defaults, and every create
    /// fails with this).
    config_error: Option<String>,
    events: Arc<EventSink>,
    exit: Arc<ExitSignal>,
    /// Shared with the OOM watcher, which checks that an OOM kill the guest reports is of one of
    /// the pod's containers.
    state: Arc<Mutex<State>>,
    /// Names the stdio streams of each process (unique in the pod).
    next_token: AtomicU64,
    /// The pod VM's devices, read by [`Pod::log_virtio_state`] without the state lock (which an
    /// agent call that hangs may hold).
    inspector: std::sync::Mutex<Option<(String, VmInspector)>>,
}

#[derive(Debug, Default)]
struct State {
    sandbox: Option<Arc<Sandbox>>,
    /// The pod's id, set by its sandbox container.
    pod_id: Option<String>,
    /// The namespace kinds of the pod's sandbox container (its members join those).
    sandbox_kinds: Vec<LinuxNamespaceType>,
    containers: HashMap<String, Container>,
    /// The last [`RECENTLY_DELETED`] containers deleted, newest last.
    deleted: VecDeque<String>,
    /// Why the pod's VM ended on its own, once its last container is gone (a container created
    /// for the pod afterwards is refused with it).
    lost_vm: Option<String>,
    /// containerd asked the shim to exit while containers were left: under CRI the pod's
    /// sandbox container is deleted (and the shim shut down) before its members when the VM
    /// dies, and no later Shutdown comes for the members, so the last delete ends the shim.
    shutdown_asked: bool,
}

/// The pod's sandbox container, as its members' namespaces need it: its id (what they join) and
/// the kinds of namespace it has.
#[derive(Debug)]
struct SandboxNamespaces {
    id: String,
    kinds: Vec<LinuxNamespaceType>,
}

#[derive(Debug)]
struct Container {
    bundle: String,
    init: Process,
    execs: HashMap<String, Process>,
    paused: bool,
}

impl std::fmt::Debug for Pod {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pod")
            .field("namespace", &self.namespace)
            .field("events", &self.events)
            .finish_non_exhaustive()
    }
}

impl Container {
    fn process(&self, id: &str, exec_id: &str) -> Result<&Process, ShimError> {
        match exec_id {
            "" => Ok(&self.init),
            _ => self.execs.get(exec_id).ok_or_else(|| no_exec(id, exec_id)),
        }
    }
}

impl Pod {
    pub fn new(
        namespace: &str,
        config: Result<Config, ConfigError>,
        events: EventSink,
        exit: Arc<ExitSignal>,
    ) -> Pod {
        let (config, config_error) = match config {
            Ok(config) => (config, None),
            Err(err) => (Config::default(), Some(err.to_string())),
        };
        Pod {
            namespace: namespace.to_owned(),
            config,
            config_error,
            events: Arc::new(events),
            exit,
            state: Arc::new(Mutex::new(State::default())),
            next_token: AtomicU64::new(1),
            inspector: std::sync::Mutex::new(None),
        }
    }

    /// Create: boots the pod's VM for its sandbox container, shares the rootfs and volumes, joins
    /// stdio and creates the container in the guest. A failure leaves no share (and no VM when
    /// this container would have been the pod's first).
    pub async fn create(&self, req: &api::CreateTaskRequest) -> Result<u32, ShimError> {
        let id = req.id.as_str();
        bundle::check_id(id)?;
        if let Some(err) = &self.config_error {
            return Err(ShimError::InvalidArgument(format!("Husk's configuration: {err}")));
        }
        let bundle_dir = PathBuf::from(&req.bundle);
        let spec = bundle::load_spec(&bundle_dir)?;
        let annotations = bundle::annotations(&spec);
        let role = PodRole::of(id, &annotations)?;
        phases::mark(&sandbox_name(&self.namespace, role.pod_id()), id, Phase::TaskCreate);
        let mut state = self.state.lock().await;
        if state.containers.contains_key(id) {
            return Err(ShimError::AlreadyExists(format!("container {id}: exists in this pod")));
        }
        let sandbox = match (&role, &state.sandbox) {
            (PodRole::Sandbox { pod_id }, None) => {
                let sandbox = self.boot(pod_id, &spec, &annotations).await?;
                state.pod_id = Some(pod_id.clone());
                state.sandbox_kinds = bundle::namespace_kinds(&spec);
                state.sandbox = Some(Arc::clone(&sandbox));
                sandbox
            }
            (PodRole::Member { pod_id }, Some(sandbox)) if state.pod_id.as_ref() == Some(pod_id) => {
                Arc::clone(sandbox)
            }
            (PodRole::Sandbox { pod_id }, Some(_)) => {
                return Err(ShimError::AlreadyExists(format!("pod {pod_id}: its sandbox container exists")))
            }
            (PodRole::Member { pod_id }, _) => return Err(not_running(id, pod_id, &state)),
        };
        let pod = SandboxNamespaces {
            id: state.pod_id.clone().unwrap_or_default(),
            kinds: state.sandbox_kinds.clone(),
        };
        match self.create_in(&sandbox, id, &bundle_dir, spec, &pod, req).await {
            Ok(container) => {
                self.watch_exit(&sandbox, id, &container.init);
                state.containers.insert(id.to_owned(), container);
            }
            Err(err) => {
                if let Err(release) = sandbox.dir().release(id) {
                    tracing::warn!(container = id, %release, "removing the shares of a failed create");
                }
                if state.containers.is_empty() {
                    state.sandbox = None;
                    state.pod_id = None;
                    sandbox.shutdown().await;
                }
                return Err(err);
            }
        }
        drop(state);
        let io = TaskIO {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
            ..Default::default()
        };
        let event = TaskCreate {
            container_id: id.to_owned(),
            bundle: req.bundle.clone(),
            rootfs: req.rootfs.clone(),
            io: Some(io).into(),
            pid: self.pid(),
            ..Default::default()
        };
        self.events.publish(topics::TASK_CREATE_EVENT_TOPIC, Box::new(event)).await;
        Ok(self.pid())
    }

    /// Boots the VM of the pod whose sandbox container has `spec` (and its `annotations`).
    async fn boot(
        &self,
        pod_id: &str,
        spec: &oci_spec::runtime::Spec,
        annotations: &HashMap<String, String>,
    ) -> Result<Arc<Sandbox>, ShimError> {
        let sizing = self.config.pod_sizing(annotations)?;
        let h = &self.config.hypervisor;
        let image = match h.image_dir.as_os_str().is_empty() {
            true => GuestImage::locate_checking(Check::Size)?,
            false => GuestImage::open_checking(&h.image_dir, Check::Size)?,
        };
        let id = sandbox_name(&self.namespace, pod_id);
        phases::mark(&id, "", Phase::GuestImageChecked);
        let network = attach_network(pod_id, bundle::pod_netns(spec)).await?;
        if network.is_some() {
            phases::mark(&id, "", Phase::NetworkAttached);
        }
        let config = SandboxConfig {
            id,
            root: self.config.runtime.sandbox_dir.clone(),
            image,
            vcpus: sizing.vcpus,
            mem_mib: sizing.memory_mib,
            extra_cmdline: h.kernel_params.clone(),
            agent_timeout: Duration::from_secs(self.config.agent.boot_timeout_s),
            console_to_stdout: false,
            sysctls: bundle::pod_net_sysctls(spec),
            network,
            seccomp: h.seccomp,
            fs_max_fds: h.virtio_fs_max_fds,
            cgroup: bundle::cgroups_path(spec),
        };
        tracing::info!(
            sandbox = pod_id,
            vcpus = sizing.vcpus,
            memory_mib = sizing.memory_mib,
            cgroup = config.cgroup.as_deref().unwrap_or(""),
            "booting the pod's VM"
        );
        let sandbox = match Sandbox::boot(&config, |_| Ok(())).await {
            Ok(sandbox) => Arc::new(sandbox),
            Err(err) => {
                if let Some(network) = &config.network {
                    if let Err(detach) = network.detach().await {
                        tracing::warn!(sandbox = pod_id, %detach, "removing the tc redirection of a failed boot");
                    }
                }
                return Err(err.into());
            }
        };
        self.watch_oom(&sandbox);
        *self.inspector.lock().unwrap_or_else(PoisonError::into_inner) =
            Some((sandbox.id().to_owned(), sandbox.inspector()));
        if let Some(timeout) = self.config.agent.health_timeout() {
            sandbox.watch_health(timeout);
        }
        Ok(sandbox)
    }

    async fn create_in(
        &self,
        sandbox: &Sandbox,
        id: &str,
        bundle_dir: &Path,
        spec: oci_spec::runtime::Spec,
        pod: &SandboxNamespaces,
        req: &api::CreateTaskRequest,
    ) -> Result<Container, ShimError> {
        let dir = sandbox.dir();
        let rootfs = bundle::rootfs_name(id);
        if req.rootfs.is_empty() {
            dir.share(
                &bundle::host_rootfs(bundle_dir, &spec),
                &rootfs,
                Access::Writable,
                Propagation::Private,
            )?;
        }
        for mount in &req.rootfs {
            dir.mount(&rootfs, &mount.type_, &mount.source, &mount.options)?;
        }
        let guest = bundle::guest_spec(id, spec, &pod.kinds);
        tracing::debug!(container = id, namespaces = ?bundle::namespace_kinds(&guest.spec), "the guest's spec");
        for share in &guest.shares {
            dir.share(&share.host, &share.name, share.access, share.propagation)?;
        }
        phases::mark(sandbox.id(), id, Phase::ContainerShared);
        let init =
            Process::new("", Stdio::new(&req.stdin, &req.stdout, &req.stderr, req.terminal), Vec::new());
        let client = sandbox.client();
        let created = async {
            let stdio = init.attach_stdio(client, &self.token(), id, &self.namespace).await?;
            let spec_json = serde_json::to_vec(&guest.spec)
                .map_err(|err| ShimError::InvalidArgument(format!("config.json: {err}")))?;
            let joins = if guest.joins_sandbox { pod.id.as_str() } else { "" };
            client
                .create_container_joining(id, spec_json, stdio, joins)
                .await
                .map_err(|err| agent_error(sandbox, err))
        };
        if let Err(err) = created.await {
            init.abort_io().await;
            return Err(err);
        }
        phases::mark(sandbox.id(), id, Phase::ContainerCreated);
        Ok(Container { bundle: req.bundle.clone(), init, execs: HashMap::new(), paused: false })
    }

    /// Start: the container's init process, or an exec added before.
    pub async fn start(&self, id: &str, exec_id: &str) -> Result<u32, ShimError> {
        let mut state = self.state.lock().await;
        let (sandbox, container) = state.get_mut(id)?;
        let client = sandbox.client();
        if exec_id.is_empty() {
            expect_created(&container.init, id, exec_id)?;
            client.start_container(id).await.map_err(|err| agent_error(&sandbox, err))?;
            phases::mark(sandbox.id(), id, Phase::ContainerStarted);
            container.init.mark_started();
            drop(state);
            let event = TaskStart { container_id: id.to_owned(), pid: self.pid(), ..Default::default() };
            self.events.publish(topics::TASK_START_EVENT_TOPIC, Box::new(event)).await;
            return Ok(self.pid());
        }
        let process = container.execs.get_mut(exec_id).ok_or_else(|| no_exec(id, exec_id))?;
        expect_created(process, id, exec_id)?;
        let started = async {
            let stdio = process.attach_stdio(client, &self.token(), id, &self.namespace).await?;
            client
                .exec_process(id, exec_id, process.spec.clone(), stdio)
                .await
                .map_err(|err| agent_error(&sandbox, err))
        };
        if let Err(err) = started.await {
            process.abort_io().await;
            process.set_exit(Exit::at_unix_ns(LOST_STATUS, 0));
            return Err(err);
        }
        process.mark_started();
        self.watch_exit(&sandbox, id, process);
        drop(state);
        let event = TaskExecStarted {
            container_id: id.to_owned(),
            exec_id: exec_id.to_owned(),
            pid: self.pid(),
            ..Default::default()
        };
        self.events.publish(topics::TASK_EXEC_STARTED_EVENT_TOPIC, Box::new(event)).await;
        Ok(self.pid())
    }

    /// Exec: records the process to start (its stdio is joined at Start).
    pub async fn exec(&self, req: &api::ExecProcessRequest) -> Result<(), ShimError> {
        let (id, exec_id) = (req.id.as_str(), req.exec_id.as_str());
        if exec_id.is_empty() {
            return Err(ShimError::InvalidArgument(format!("container {id}: exec_id: empty")));
        }
        let spec = req.spec.as_ref().map(|any| any.value.clone()).unwrap_or_default();
        if spec.is_empty() {
            return Err(ShimError::InvalidArgument(format!("exec {id}/{exec_id}: spec: missing")));
        }
        let mut state = self.state.lock().await;
        let container = state.containers.get_mut(id).ok_or_else(|| no_container(id))?;
        if container.init.status() != Status::Running {
            return Err(ShimError::FailedPrecondition(format!("container {id}: not running")));
        }
        if container.execs.contains_key(exec_id) {
            return Err(ShimError::AlreadyExists(format!("exec {id}/{exec_id}: exists")));
        }
        let stdio = Stdio::new(&req.stdin, &req.stdout, &req.stderr, req.terminal);
        container.execs.insert(exec_id.to_owned(), Process::new(exec_id, stdio, spec));
        drop(state);
        let event =
            TaskExecAdded { container_id: id.to_owned(), exec_id: exec_id.to_owned(), ..Default::default() };
        self.events.publish(topics::TASK_EXEC_ADDED_EVENT_TOPIC, Box::new(event)).await;
        Ok(())
    }

    /// Kill: signals the process (with `all`, every process of the container).
    pub async fn kill(&self, req: &api::KillRequest) -> Result<(), ShimError> {
        let (id, exec_id) = (req.id.as_str(), req.exec_id.as_str());
        let state = self.state.lock().await;
        let (sandbox, container) = state.get(id)?;
        let process = container.process(id, exec_id)?;
        if sandbox.has_ended() {
            return Err(ShimError::NotFound(format!("process {id}/{exec_id:?}: the pod's VM has ended")));
        }
        if process.status() == Status::Stopped && !req.all {
            return Err(ShimError::NotFound(format!("process {id}/{exec_id:?}: already finished")));
        }
        if process.status() == Status::Created && !exec_id.is_empty() {
            return Err(ShimError::FailedPrecondition(format!("exec {id}/{exec_id}: not started")));
        }
        sandbox
            .client()
            .signal_process(id, exec_id, req.signal, req.all)
            .await
            .map_err(|err| agent_error(sandbox, err))
    }

    /// Wait: the process's exit (waits for it; not under the state lock).
    pub async fn wait(&self, id: &str, exec_id: &str) -> Result<Exit, ShimError> {
        let exited = {
            let state = self.state.lock().await;
            let (_, container) = state.get(id)?;
            container.process(id, exec_id)?.exited()
        };
        Ok(exited.await)
    }

    /// Delete: an exec that ended, or a container that is not running (its guest side, shares and
    /// stdio go); the pod's VM goes with its last container.
    pub async fn delete(&self, id: &str, exec_id: &str) -> Result<api::DeleteResponse, ShimError> {
        let mut state = self.state.lock().await;
        let container = state.containers.get_mut(id).ok_or_else(|| no_container(id))?;
        if !exec_id.is_empty() {
            let process = container.execs.get(exec_id).ok_or_else(|| no_exec(id, exec_id))?;
            if process.status() == Status::Running {
                return Err(ShimError::FailedPrecondition(format!("exec {id}/{exec_id}: still running")));
            }
            let process = container.execs.remove(exec_id).ok_or_else(|| no_exec(id, exec_id))?;
            process.abort_io().await;
            return Ok(self.delete_response(process.exit()));
        }
        if container.init.status() == Status::Running {
            return Err(ShimError::FailedPrecondition(format!(
                "container {id}: still running (kill it first)"
            )));
        }
        let container = state.containers.remove(id).ok_or_else(|| no_container(id))?;
        state.note_deleted(id);
        let exit = container.init.exit();
        if let Some(sandbox) = state.sandbox.clone() {
            self.remove_in_guest(&sandbox, id, &container).await;
            if state.containers.is_empty() {
                state.sandbox = None;
                state.lost_vm = sandbox.end_reason();
                tracing::info!(
                    sandbox = state.pod_id.as_deref().unwrap_or(id),
                    "last container deleted: stopping the pod's VM"
                );
                sandbox.shutdown().await;
            }
        }
        let exit_shim = state.containers.is_empty() && state.shutdown_asked;
        if let Some(pod_id) = &state.pod_id {
            phases::mark(&sandbox_name(&self.namespace, pod_id), id, Phase::ContainerDeleted);
        }
        drop(state);
        let response = self.delete_response(exit);
        let event = TaskDelete {
            container_id: id.to_owned(),
            pid: response.pid,
            exit_status: response.exit_status,
            exited_at: response.exited_at.clone(),
            ..Default::default()
        };
        self.events.publish(topics::TASK_DELETE_EVENT_TOPIC, Box::new(event)).await;
        if exit_shim {
            tracing::info!(
                container = id,
                "last container deleted after containerd's shutdown: the shim exits"
            );
            self.exit.signal();
        }
        Ok(response)
    }

    async fn remove_in_guest(&self, sandbox: &Sandbox, id: &str, container: &Container) {
        if !sandbox.has_ended() {
            if let Err(err) = sandbox.client().remove_container(id, true).await {
                tracing::warn!(container = id, %err, "removing the container in the guest");
            }
        }
        for process in std::iter::once(&container.init).chain(container.execs.values()) {
            process.abort_io().await;
        }
        if let Err(err) = sandbox.dir().release(id) {
            tracing::warn!(container = id, %err, "removing the container's shares");
        }
    }

    fn delete_response(&self, exit: Option<Exit>) -> api::DeleteResponse {
        let exit = exit.unwrap_or_else(|| Exit::at_unix_ns(0, 0));
        api::DeleteResponse {
            pid: self.pid(),
            exit_status: exit.status,
            exited_at: Some(exit.at).into(),
            ..Default::default()
        }
    }

    /// State: what containerd and `ctr task ls` show.
    pub async fn state(&self, id: &str, exec_id: &str) -> Result<api::StateResponse, ShimError> {
        let state = self.state.lock().await;
        let (_, container) = state.get(id)?;
        let process = container.process(id, exec_id)?;
        let status = match process.status() {
            Status::Created => api::Status::CREATED,
            Status::Running if container.paused => api::Status::PAUSED,
            Status::Running => api::Status::RUNNING,
            Status::Stopped => api::Status::STOPPED,
        };
        let exit = process.exit();
        Ok(api::StateResponse {
            id: id.to_owned(),
            bundle: container.bundle.clone(),
            pid: self.pid(),
            status: status.into(),
            stdin: process.stdio.stdin.clone(),
            stdout: process.stdio.stdout.clone(),
            stderr: process.stdio.stderr.clone(),
            terminal: process.stdio.terminal,
            exit_status: exit.as_ref().map_or(0, |e| e.status),
            exited_at: exit.map(|e| e.at).into(),
            exec_id: exec_id.to_owned(),
            ..Default::default()
        })
    }

    /// Pids: the guest pids of the container's processes.
    pub async fn pids(&self, id: &str) -> Result<Vec<u32>, ShimError> {
        let state = self.state.lock().await;
        let (sandbox, _) = state.get(id)?;
        sandbox.client().list_processes(id).await.map_err(|err| agent_error(sandbox, err))
    }

    pub async fn resize_pty(&self, req: &api::ResizePtyRequest) -> Result<(), ShimError> {
        let state = self.state.lock().await;
        let (sandbox, container) = state.get(&req.id)?;
        container.process(&req.id, &req.exec_id)?;
        sandbox
            .client()
            .resize_pty(&req.id, &req.exec_id, req.width, req.height)
            .await
            .map_err(|err| agent_error(sandbox, err))
    }

    /// CloseIO: the process reads EOF on stdin once containerd's writer has delivered the rest.
    pub async fn close_io(&self, req: &api::CloseIORequest) -> Result<(), ShimError> {
        let state = self.state.lock().await;
        let (_, container) = state.get(&req.id)?;
        let process = container.process(&req.id, &req.exec_id)?;
        if req.stdin {
            process.io.close_input();
        }
        Ok(())
    }

    pub async fn update(&self, req: &api::UpdateTaskRequest) -> Result<(), ShimError> {
        let resources = req.resources.as_ref().map(|any| any.value.clone()).unwrap_or_default();
        if resources.is_empty() {
            return Err(ShimError::InvalidArgument(format!("update {}: resources: missing", req.id)));
        }
        let state = self.state.lock().await;
        let (sandbox, _) = state.get(&req.id)?;
        sandbox.client().update_container(&req.id, resources).await.map_err(|err| agent_error(sandbox, err))
    }

    /// Stats: the container's cgroup figures in the guest, as containerd's cgroup v2 metrics.
    pub async fn stats(&self, id: &str) -> Result<api::StatsResponse, ShimError> {
        let state = self.state.lock().await;
        let (sandbox, _) = state.get(id)?;
        let stats = sandbox.client().stats_container(id).await.map_err(|err| agent_error(sandbox, err))?;
        Ok(api::StatsResponse { stats: Some(metrics::to_any(&stats)?).into(), ..Default::default() })
    }

    pub async fn pause(&self, id: &str, pause: bool) -> Result<(), ShimError> {
        let mut state = self.state.lock().await;
        let (sandbox, container) = state.get_mut(id)?;
        let client = sandbox.client();
        let done = match pause {
            true => client.pause_container(id).await,
            false => client.resume_container(id).await,
        };
        done.map_err(|err| agent_error(&sandbox, err))?;
        container.paused = pause;
        drop(state);
        match pause {
            true => {
                let event = TaskPaused { container_id: id.to_owned(), ..Default::default() };
                self.events.publish(topics::TASK_PAUSED_EVENT_TOPIC, Box::new(event)).await;
            }
            false => {
                let event = TaskResumed { container_id: id.to_owned(), ..Default::default() };
                self.events.publish(topics::TASK_RESUMED_EVENT_TOPIC, Box::new(event)).await;
            }
        }
        Ok(())
    }

    /// Shutdown: the shim exits now if no container is left, otherwise when its last one is
    /// deleted.
    pub async fn shutdown(&self) {
        let mut state = self.state.lock().await;
        state.shutdown_asked = true;
        if state.containers.is_empty() {
            self.exit.signal();
        }
    }

    /// The pid containerd knows the tasks by: the shim's own (the guest's pids mean nothing on
    /// the host; a pid there must be a live process for containerd's checks).
    /// Logs each virtio device of the pod's VM (rings, interrupts, counters), one line per device,
    /// then `virtio state dumped`: what the shim answers SIGUSR1 with, to explain a stalled pod.
    /// Blocks briefly on busy devices: call it off the async runtime's threads.
    pub fn log_virtio_state(&self) {
        let inspector = self.inspector.lock().unwrap_or_else(PoisonError::into_inner).clone();
        let Some((sandbox, inspector)) = inspector else {
            tracing::info!("virtio state dumped: this shim has not booted a VM");
            return;
        };
        let Some(devices) = inspector.virtio_state() else {
            tracing::info!(sandbox = %sandbox, "virtio state dumped: the VM is gone");
            return;
        };
        for (slot, device) in devices.iter().enumerate() {
            match device {
                Some(device) => tracing::info!(sandbox = %sandbox, slot, state = %device, "virtio state"),
                None => {
                    tracing::info!(sandbox = %sandbox, slot, "virtio state: busy (a vCPU holds the device)")
                }
            }
        }
        tracing::info!(sandbox = %sandbox, devices = devices.len(), "virtio state dumped");
    }

    pub fn pid(&self) -> u32 {
        std::process::id()
    }

    fn token(&self) -> String {
        format!("s{}", self.next_token.fetch_add(1, Ordering::Relaxed))
    }

    /// Waits for the process's exit in the guest; then drains its output, records the exit and
    /// publishes TaskExit.
    fn watch_exit(&self, sandbox: &Arc<Sandbox>, id: &str, process: &Process) {
        let client = sandbox.client().clone();
        let sandbox_id = sandbox.id().to_owned();
        let sandbox = Arc::downgrade(sandbox);
        let (id, exec_id) = (id.to_owned(), process.exec_id.clone());
        let (io, logs) = (process.io.clone(), process.logs.clone());
        let recorder = process.exit_recorder();
        let events = Arc::clone(&self.events);
        let pid = self.pid();
        tokio::spawn(async move {
            let exit = match client.wait_process(&id, &exec_id).await {
                Ok(ended) => {
                    if exec_id.is_empty() {
                        phases::mark(&sandbox_id, &id, Phase::ExitSeen);
                    }
                    Exit::at_unix_ns(ended.status as u32, ended.exited_at_unix_ns)
                }
                Err(err) => {
                    if let Some(sandbox) = sandbox.upgrade() {
                        sandbox.ended_within(VM_END_GRACE).await;
                    }
                    let report = vm_report(&sandbox);
                    tracing::error!(container = %id, exec = %exec_id, %err, %report, "lost the process: the pod's VM or agent is gone");
                    Exit::at_unix_ns(LOST_STATUS, 0)
                }
            };
            io.shutdown().await;
            logs.drain(LOG_DRAIN_LIMIT).await;
            recorder(exit.clone());
            let event = TaskExit {
                container_id: id.clone(),
                id: if exec_id.is_empty() { id.clone() } else { exec_id.clone() },
                pid,
                exit_status: exit.status,
                exited_at: Some(exit.at).into(),
                ..Default::default()
            };
            events.publish(topics::TASK_EXIT_EVENT_TOPIC, Box::new(event)).await;
        });
    }

    /// Publishes TaskOOM for the OOM kills the agent reports, while the VM lives. The guest may
    /// lie: a kill of a container that is not this pod's (another pod's id: containerd would mark
    /// that pod's container OOM-killed) is dropped, and so is what exceeds [`OOM_EVENTS`].
    fn watch_oom(&self, sandbox: &Arc<Sandbox>) {
        let client = sandbox.client().clone();
        let events = Arc::clone(&self.events);
        let state = Arc::clone(&self.state);
        let pod_id = sandbox.id().to_owned();
        tokio::spawn(async move {
            let filter = OomFilter::default();
            while let Ok(container_id) = client.next_oom_event().await {
                let is_member = state.lock().await.is_member(&container_id);
                let Some(suppressed) = filter.admit(&pod_id, &container_id, is_member, Instant::now()) else {
                    continue;
                };
                tracing::info!(sandbox = %pod_id, container = %container_id, suppressed, "OOM kill in the guest");
                let event = TaskOOM { container_id, ..Default::default() };
                events.publish(topics::TASK_OOM_EVENT_TOPIC, Box::new(event)).await;
            }
        });
    }
}

/// Which OOM kills the guest reports reach containerd: only of the pod's own containers, and no
/// more than [`OOM_EVENTS`] allows.
#[derive(Debug)]
struct OomFilter(RateLimit);

impl Default for OomFilter {
    fn default() -> Self {
        OomFilter(RateLimit::new(OOM_EVENTS.0, OOM_EVENTS.1))
    }
}

impl OomFilter {
    /// `Some(n)` (with the events held back since the last one passed) when the kill of
    /// `container_id` (`is_member`: one of the pod's containers) is published at `now`.
    fn admit(&self, pod_id: &str, container_id: &str, is_member: bool, now: Instant) -> Option<u64> {
        if !is_member {
            husk_vmm::guest_log!(warn, sandbox = %pod_id, container = %container_id,
                "the guest reported an OOM kill of a container not in this pod; dropped");
            return None;
        }
        self.0.admit(now)
    }
}

impl State {
    /// Whether `id` is one of the pod's containers, or was until recently.
    fn is_member(&self, id: &str) -> bool {
        self.containers.contains_key(id) || self.deleted.iter().any(|d| d == id)
    }

    fn note_deleted(&mut self, id: &str) {
        if self.deleted.len() == RECENTLY_DELETED {
            self.deleted.pop_front();
        }
        self.deleted.push_back(id.to_owned());
    }

    fn get(&self, id: &str) -> Result<(&Arc<Sandbox>, &Container), ShimError> {
        let container = self.containers.get(id).ok_or_else(|| no_container(id))?;
        let sandbox = self.sandbox.as_ref().ok_or_else(|| no_container(id))?;
        Ok((sandbox, container))
    }

    /// [`State::get`] with the container to change (and the VM handle, cloned, to call on).
    fn get_mut(&mut self, id: &str) -> Result<(Arc<Sandbox>, &mut Container), ShimError> {
        let sandbox = self.sandbox.clone().ok_or_else(|| no_container(id))?;
        let container = self.containers.get_mut(id).ok_or_else(|| no_container(id))?;
        Ok((sandbox, container))
    }
}

/// The pod's network for its VM: CNI's namespace attached, none for an empty namespace; host
/// networking is refused (a VM cannot share the node's network stack).
async fn attach_network(pod_id: &str, netns: PodNetns) -> Result<Option<Arc<PodNetwork>>, ShimError> {
    match netns {
        PodNetns::Host => Err(ShimError::InvalidArgument(format!(
            "pod {pod_id}: host networking is not supported: the sandbox's OCI spec has no network namespace \
             (hostNetwork: true, or ctr run --net-host); a Husk pod's network is its VM's own"
        ))),
        PodNetns::Empty => Ok(None),
        PodNetns::Path(path) => {
            let network = PodNetwork::attach(&path).await?;
            tracing::info!(
                sandbox = pod_id,
                netns = %path.display(),
                interfaces = ?network.endpoints().iter().map(|e| (&e.name, e.tap.name())).collect::<Vec<_>>(),
                "pod network attached"
            );
            Ok(Some(Arc::new(network)))
        }
    }
}

/// The sandbox directory's name for pod `pod_id` of containerd namespace `namespace` (ids are
/// unique per namespace only).
pub fn sandbox_name(namespace: &str, pod_id: &str) -> String {
    format!("{namespace}-{pod_id}")
}

fn expect_created(process: &Process, id: &str, exec_id: &str) -> Result<(), ShimError> {
    match process.status() {
        Status::Created => Ok(()),
        _ => Err(ShimError::FailedPrecondition(format!("process {id}/{exec_id:?}: started already"))),
    }
}

/// A member container for a pod this shim does not run (any more).
fn not_running(id: &str, pod_id: &str, state: &State) -> ShimError {
    match (&state.lost_vm, state.pod_id.as_deref()) {
        (Some(reason), Some(lost)) if lost == pod_id => ShimError::FailedPrecondition(format!(
            "container {id}: pod {pod_id} is gone: its VM ended ({reason}) and its sandbox container was deleted"
        )),
        _ => ShimError::FailedPrecondition(format!(
            "container {id}: pod {pod_id} does not run in this shim (create its sandbox container first)"
        )),
    }
}

fn no_container(id: &str) -> ShimError {
    ShimError::NotFound(format!("container {id}: no such task in this shim"))
}

fn no_exec(id: &str, exec_id: &str) -> ShimError {
    ShimError::NotFound(format!("exec {id}/{exec_id}: no such process"))
}

/// An agent failure, with the VM's state and console tail when the VM is the reason.
fn agent_error(sandbox: &Sandbox, source: AgentError) -> ShimError {
    let report = match (&source, sandbox.has_ended()) {
        (AgentError::Refused { .. }, false) => String::new(),
        _ => format!("\n{}", sandbox.vm_report()),
    };
    ShimError::Agent { source: Box::new(source), report }
}

fn vm_report(sandbox: &Weak<Sandbox>) -> String {
    sandbox.upgrade().map_or_else(|| "the VM was shut down".into(), |s| s.vm_report())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_guest_cannot_report_oom_kills_of_other_pods_containers_or_flood_containerd() {
        let filter = OomFilter::default();
        let now = Instant::now();
        assert_eq!(filter.admit("pod", "other-pods-container", false, now), None);
        let published = (0..1000).filter(|_| filter.admit("pod", "hog", true, now).is_some()).count();
        assert_eq!(published, OOM_EVENTS.0 as usize, "a burst, then the rest are held back");
        assert_eq!(filter.admit("pod", "hog", true, now + OOM_EVENTS.1), Some(1000 - OOM_EVENTS.0 as u64));
    }

    #[test]
    fn an_oom_kill_reported_after_its_container_was_deleted_still_counts_for_a_while() {
        let mut state = State::default();
        state.note_deleted("hog");
        assert!(state.is_member("hog") && !state.is_member("other"));
        (0..RECENTLY_DELETED).for_each(|n| state.note_deleted(&format!("later-{n}")));
        assert!(!state.is_member("hog"), "only the last {RECENTLY_DELETED} deleted count");
        assert_eq!(state.deleted.len(), RECENTLY_DELETED);
    }
}
