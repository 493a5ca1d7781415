//! A pod's microVM: [`Sandbox::boot`] creates its [`SandboxDir`], starts the VM in this process
//! (Husk's VMM is a library) with the pod's vsock and virtio-fs share, waits for the agent and
//! sets the pod up in the guest. Dropping a sandbox stops the VM and removes the directory.
//!
//! A VM that ends, or an agent that does not answer, is reported with the VM's exit reason and
//! the guest console's last lines: "the agent did not answer" is never the whole message.

pub mod cgroup;
pub mod dir;
mod health;

use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use husk_protocols::agent::CreateSandboxRequest;
use husk_vmm::devices::legacy::Console;
use husk_vmm::devices::virtio::vsock::HostPorts;
use husk_vmm::{
    DeviceConfig, ReadyWait, VmConfig, VmExit, VmHandle, VmInspector, VmStopper, DEFAULT_CMDLINE,
};

pub use self::cgroup::{CgroupError, PodCgroup};
pub use self::dir::{Access, Propagation, SandboxDir, SandboxDirError};
use crate::agent_client::{AgentAddress, AgentClient, AgentError};
use crate::guest_image::GuestImage;
use crate::network::port_forward::PortForwarder;
use crate::network::PodNetwork;
use crate::phases::{self, Phase};

/// The virtio-fs tag of the pod's shared directory.
pub const SHARED_FS_TAG: &str = "husk-shared";
/// The guest's vsock CID.
const GUEST_CID: u64 = 3;

/// What a pod's VM looks like.
#[derive(Debug, Clone)]
pub struct SandboxConfig {
    pub id: String,
    /// Where sandbox directories live (e.g. `/run/husk/sandboxes`).
    pub root: PathBuf,
    pub image: GuestImage,
    pub vcpus: u8,
    pub mem_mib: u64,
    /// Added to the kernel command line.
    pub extra_cmdline: String,
    /// How long the agent may take to answer after the VM started.
    pub agent_timeout: Duration,
    /// Also copy the guest console to this process's stdout.
    pub console_to_stdout: bool,
    /// Pod-wide sysctls (the pod's `net.*`), set in the guest before any container.
    pub sysctls: std::collections::HashMap<String, String>,
    /// The pod's network namespace, attached: one guest NIC per interface.
    pub network: Option<Arc<PodNetwork>>,
    /// The VMM's threads under their seccomp filters.
    pub seccomp: bool,
    /// The most host files the pod's share holds for its guest.
    pub fs_max_fds: usize,
    /// The pod's cgroup on the node (the sandbox container's `linux.cgroupsPath`): the shim
    /// joins it before the VM exists, so the pod pays for its VM.
    pub cgroup: Option<String>,
}

/// Why a sandbox could not be brought up or used.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error(transparent)]
    Dir(#[from] SandboxDirError),
    #[error("sandbox {id}: {source}")]
    Cgroup { id: String, source: CgroupError },
    #[error("sandbox {id}: starting the VM: {source}")]
    Vm { id: String, source: husk_vmm::VmError },
    #[error("sandbox {id}: the agent did not come up: {source}\n{vm}\n--- guest console (last lines) ---\n{console}")]
    Agent { id: String, source: AgentError, vm: String, console: String },
    #[error("sandbox {id}: setting up the pod in the guest: {source}")]
    Setup { id: String, source: AgentError },
    #[error("sandbox {id}: configuring the guest's network ({what}): {source}")]
    GuestNetwork { id: String, what: String, source: AgentError },
    #[error("sandbox {id}: opening the console log: {source}")]
    Console { id: String, source: std::io::Error },
}

/// A running pod VM with its agent.
pub struct Sandbox {
    id: String,
    client: AgentClient,
    stopper: VmStopper,
    inspector: VmInspector,
    console: Console,
    /// Filled by the thread that waits for the VM when it ends.
    exit: Arc<Mutex<Option<VmExit>>>,
    /// Why the host stopped the VM on its own account (its exit reason only says "stopped").
    host_reason: OnceLock<String>,
    waiter: Mutex<Option<std::thread::JoinHandle<()>>>,
    network: Option<Arc<PodNetwork>>,
    /// `kubectl port-forward` into the guest, while the pod has a network namespace.
    port_forward: Mutex<Option<PortForwarder>>,
    // Dropped after the VM: it must be gone before its directory, and the shim leaves the pod's
    // cgroup last.
    dir: SandboxDir,
    _cgroup: Option<PodCgroup>,
}

impl std::fmt::Debug for Sandbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sandbox").field("id", &self.id).field("dir", &self.dir).finish_non_exhaustive()
    }
}

impl Sandbox {
    /// Boots the pod's VM and waits for its agent; with `prepare`, shares directories into the
    /// sandbox directory before the VM starts.
    pub async fn boot(
        config: &SandboxConfig,
        prepare: impl FnOnce(&SandboxDir) -> Result<(), SandboxDirError>,
    ) -> Result<Sandbox, SandboxError> {
        let id = config.id.clone();
        // Before anything of the VM exists: memory is charged to the cgroup that allocates it.
        let cgroup = match &config.cgroup {
            Some(path) => Some(
                PodCgroup::join(path).map_err(|source| SandboxError::Cgroup { id: id.clone(), source })?,
            ),
            None => None,
        };
        let dir = SandboxDir::create(&config.root, &id)?;
        prepare(&dir)?;
        let log = std::fs::File::create(dir.console_log())
            .map_err(|source| SandboxError::Console { id: id.clone(), source })?;
        // Kept: error reports take the console's last lines from its in-memory tail (the log
        // file stops at its limit, and the guest writes it).
        let console = Console::new(Some(log), config.console_to_stdout);
        let vm_config = VmConfig {
            vcpus: config.vcpus,
            mem_mib: config.mem_mib,
            kernel: config.image.kernel(),
            initrd: Some(config.image.initramfs()),
            cmdline: format!("{DEFAULT_CMDLINE} {}", config.extra_cmdline).trim_end().to_owned(),
            console: console.clone(),
            setup_started: None,
            console_input: None,
            seccomp: config.seccomp,
            devices: [
                DeviceConfig::Rng,
                // Every stream is opened from the host: the guest may connect to no host port.
                DeviceConfig::Vsock {
                    guest_cid: GUEST_CID,
                    socket: dir.vsock_socket(),
                    host_ports: HostPorts::Only(Vec::new()),
                },
                DeviceConfig::Fs {
                    tag: SHARED_FS_TAG.to_owned(),
                    shared_dir: dir.shared(),
                    max_fds: config.fs_max_fds,
                },
            ]
            .into_iter()
            .chain(config.network.iter().flat_map(|network| network.nics()).map(DeviceConfig::Net))
            .collect(),
        };
        let handle =
            VmHandle::start(vm_config).map_err(|source| SandboxError::Vm { id: id.clone(), source })?;
        let boot_clock = handle.boot_clock();
        phases::mark_instant(
            &id,
            "",
            Phase::VmCreated,
            boot_clock.vcpus_starting().unwrap_or_else(Instant::now),
        );
        let stopper = handle.stopper();
        let inspector = handle.inspector();
        let exit = Arc::new(Mutex::new(None));
        let recorded = Arc::clone(&exit);
        let sandbox_id = id.clone();
        let waiter = std::thread::Builder::new().name(format!("vm-{id}")).spawn(move || {
            let ended = handle.wait();
            phases::mark(&sandbox_id, "", Phase::VmGone);
            tracing::info!(sandbox = %sandbox_id, reason = %ended.reason, "the pod's VM ended");
            *recorded.lock().unwrap_or_else(PoisonError::into_inner) = Some(ended);
        });
        let waiter = match waiter {
            Ok(waiter) => waiter,
            Err(source) => return Err(SandboxError::Console { id, source }),
        };
        let address = AgentAddress::vm(&dir.vsock_socket());
        // The agent listens before it reports ready on the guest event port: connect once it has
        // (not on a timer); a VM that ended or an agent that never reported gets one attempt,
        // whose error goes with the VM's end and console below.
        let clock = boot_clock.clone();
        let agent_timeout = config.agent_timeout;
        let reported = tokio::task::spawn_blocking(move || clock.wait_ready(agent_timeout)).await;
        let retry_for = match reported {
            Ok(ReadyWait::Ready(_)) => config.agent_timeout,
            Ok(ReadyWait::Ended | ReadyWait::TimedOut) | Err(_) => Duration::ZERO,
        };
        let connected = AgentClient::connect_when_ready(address, config.agent_timeout, retry_for).await;
        let sandbox = match connected {
            Ok((client, check)) => {
                mark_boot(&id, &boot_clock, &check);
                Sandbox {
                    id: id.clone(),
                    client,
                    stopper,
                    inspector,
                    console,
                    exit,
                    host_reason: OnceLock::new(),
                    waiter: Mutex::new(Some(waiter)),
                    network: config.network.clone(),
                    port_forward: Mutex::new(None),
                    dir,
                    _cgroup: cgroup,
                }
            }
            Err(source) => {
                stopper.stop();
                let _ = waiter.join();
                let vm = describe_exit(&exit, None);
                let console = console_tail(&console);
                return Err(SandboxError::Agent { id, source, vm, console });
            }
        };
        sandbox.set_up(&config.sysctls).await?;
        phases::mark(&id, "", Phase::SandboxCreated);
        if sandbox.network.is_some() {
            sandbox.set_up_network().await?;
            phases::mark(&id, "", Phase::GuestNetworkConfigured);
        }
        sandbox.forward_ports().await;
        Ok(sandbox)
    }

    /// Starts `kubectl port-forward` support in the pod's namespace. A node that cannot (a kernel
    /// without `sk_lookup`, 5.9+) runs the pod without it and says why.
    async fn forward_ports(&self) {
        let Some(network) = &self.network else { return };
        match PortForwarder::start(network.netns(), self.client.clone(), &self.id).await {
            Ok(forwarder) => {
                *self.port_forward.lock().unwrap_or_else(PoisonError::into_inner) = Some(forwarder)
            }
            Err(err) => tracing::warn!(sandbox = %self.id, %err, "port forwarding to this pod will not work"),
        }
    }

    /// Gives the guest NICs the pod interfaces' addresses, then the routes through them, before
    /// any container starts.
    async fn set_up_network(&self) -> Result<(), SandboxError> {
        let Some(network) = &self.network else { return Ok(()) };
        let failed = |what: String| {
            let id = self.id.clone();
            move |source| SandboxError::GuestNetwork { id, what, source }
        };
        for interface in network.interfaces() {
            let what = format!("interface {} ({})", interface.name, interface.hw_addr);
            let configured = self.client.update_interface(&interface).await.map_err(failed(what))?;
            tracing::info!(
                sandbox = %self.id,
                interface = %configured.name,
                addresses = ?configured.addresses.iter().map(|a| format!("{}/{}", a.address, a.prefix_length)).collect::<Vec<_>>(),
                "guest NIC configured"
            );
        }
        let routes = network.routes();
        if !routes.is_empty() {
            self.client.update_routes(routes).await.map_err(failed("routes".into()))?;
        }
        Ok(())
    }

    async fn set_up(&self, sysctls: &std::collections::HashMap<String, String>) -> Result<(), SandboxError> {
        let host_time_unix_ns =
            SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as i64);
        let request = CreateSandboxRequest {
            sandbox_id: self.id.clone(),
            hostname: "husk".into(),
            shared_fs_tag: SHARED_FS_TAG.into(),
            host_time_unix_ns,
            sysctls: sysctls.clone(),
            ..Default::default()
        };
        self.client
            .create_sandbox(&request)
            .await
            .map_err(|source| SandboxError::Setup { id: self.id.clone(), source })
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn client(&self) -> &AgentClient {
        &self.client
    }

    pub fn dir(&self) -> &SandboxDir {
        &self.dir
    }

    /// Why the VM ended, if it did, with the console's last lines (for errors about the pod).
    pub fn vm_report(&self) -> String {
        format!(
            "{}\n--- guest console (last lines) ---\n{}",
            describe_exit(&self.exit, self.host_reason.get()),
            console_tail(&self.console)
        )
    }

    /// Reads the VM's virtio devices (rings, interrupts, counters) from another thread.
    pub fn inspector(&self) -> VmInspector {
        self.inspector.clone()
    }

    /// Why the VM ended, if it has.
    pub fn end_reason(&self) -> Option<String> {
        let exit = self.exit.lock().unwrap_or_else(PoisonError::into_inner);
        exit.as_ref().map(|ended| end_reason(ended, self.host_reason.get()))
    }

    /// Stops the VM of an agent that does not answer, recording `why` for the pod's reports.
    fn end_unresponsive(&self, why: &str) {
        let _ = self.host_reason.set(why.to_owned());
        tracing::error!(
            sandbox = %self.id,
            reason = why,
            console = %console_tail(&self.console),
            "stopping the pod's VM: its agent does not answer"
        );
        self.stopper.stop();
    }

    /// Whether the VM has ended (on its own, or stopped).
    pub fn has_ended(&self) -> bool {
        self.exit.lock().unwrap_or_else(PoisonError::into_inner).is_some()
    }

    /// Waits up to `limit` for the VM to end (a dropped agent connection comes a moment before
    /// the VM's end is recorded); returns whether it has.
    pub async fn ended_within(&self, limit: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        while !self.has_ended() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.has_ended()
    }

    /// Removes the pod's containers in the guest and stops the VM (also done, without the
    /// guest's part, by drop).
    pub async fn shutdown(&self) {
        let destroy = husk_protocols::agent::DestroySandboxRequest {
            sandbox_id: self.id.clone(),
            ..Default::default()
        };
        if let Err(err) = self.client.destroy_sandbox(&destroy).await {
            tracing::warn!(sandbox = %self.id, %err, "DestroySandbox failed; stopping the VM anyway");
        }
        self.stop();
        drop(self.port_forward.lock().unwrap_or_else(PoisonError::into_inner).take());
        if let Some(network) = &self.network {
            if let Err(err) = network.detach().await {
                tracing::warn!(sandbox = %self.id, %err, "removing the pod's tc redirection");
            }
        }
    }

    fn stop(&self) {
        self.stopper.stop();
        let waiter = self.waiter.lock().unwrap_or_else(PoisonError::into_inner).take();
        if let Some(waiter) = waiter {
            let _ = waiter.join();
        }
    }
}

/// The boot's phases the VMM and the guest observed, stamped when they happened: the kernel's
/// entry (the boot vCPU's first run) and the agent's ready report, both seen by the VMM; between
/// them the agent's start, placed back from the report by the interval the guest's own clock
/// measured (its clock may start late or run slow against the host's: under emulation the
/// kernel's part would otherwise be undercounted by seconds); then the connection, now.
fn mark_boot(id: &str, clock: &husk_vmm::BootClock, check: &husk_protocols::agent::CheckResponse) {
    let (entry, ready) = (clock.kernel_entry(), clock.guest_ready());
    if let Some(entry) = entry {
        phases::mark_instant(id, "", Phase::KernelEntered, entry);
    }
    let agent_ran = Duration::from_micros(check.agent_ready_us.saturating_sub(check.agent_started_us));
    if let Some(started) = ready.filter(|_| check.agent_started_us > 0).and_then(|r| r.checked_sub(agent_ran))
    {
        phases::mark_instant(id, "", Phase::AgentStarted, entry.map_or(started, |e| started.max(e)));
    }
    if let Some(ready) = ready {
        phases::mark_instant(id, "", Phase::AgentReady, ready);
    }
    phases::mark(id, "", Phase::AgentConnected);
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        self.stop();
    }
}

fn describe_exit(exit: &Mutex<Option<VmExit>>, host_reason: Option<&String>) -> String {
    match exit.lock().unwrap_or_else(PoisonError::into_inner).as_ref() {
        Some(ended) => format!("the VM ended: {}", end_reason(ended, host_reason)),
        None => "the VM was still running".into(),
    }
}

fn end_reason(ended: &VmExit, host_reason: Option<&String>) -> String {
    match host_reason {
        Some(why) => format!("{}: {why}", ended.reason),
        None => ended.reason.to_string(),
    }
}

fn console_tail(console: &Console) -> String {
    console.tail_lines(husk_vmm::CONSOLE_TAIL_LINES)
}
