//! The pod's containers and their processes, as the agent API manages them: created from OCI
//! specs by the runtime child ([`helper`], run through [`runtime`]), rootfs from [`bundle`],
//! stdio from [`crate::stdio`], exits from [`crate::reaper`].

pub mod bundle;
pub mod cgroup;
pub mod exec_seccomp;
pub mod helper;
pub mod leftovers;
pub mod oom;
pub mod runtime;

use std::collections::HashMap;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use husk_protocols::agent::Stdio;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use self::bundle::Bundle;
use self::cgroup::{Cgroup, CgroupStats};
use self::oom::OomWatcher;
use self::runtime::{Runtime, RuntimeError};
use crate::reaper::{self, Exit, ExitWatch, Reaper};
use crate::stdio::{ProcessStdio, StdioBroker, StdioError};
use crate::tty::{ConsoleSocket, Tty, TtyError};

/// How long a forced removal waits for the container's init to die.
const KILL_TIMEOUT: Duration = Duration::from_secs(10);
/// How long WaitProcess waits, after a terminal process exited, for its output to reach the host.
const TTY_DRAIN_LIMIT: Duration = Duration::from_secs(5);

/// Why a call failed; each maps to one ttrpc status code.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    Internal(String),
}

impl From<StdioError> for CallError {
    fn from(err: StdioError) -> CallError {
        match err {
            StdioError::BadToken(_) => CallError::InvalidArgument(err.to_string()),
            StdioError::Missing { .. } => CallError::FailedPrecondition(err.to_string()),
        }
    }
}

impl From<TtyError> for CallError {
    fn from(err: TtyError) -> CallError {
        CallError::Internal(err.to_string())
    }
}

impl From<RuntimeError> for CallError {
    fn from(err: RuntimeError) -> CallError {
        CallError::Internal(err.to_string())
    }
}

/// Where containers come from and where their state goes.
#[derive(Debug, Clone)]
pub struct ContainerPaths {
    /// The pod's shared directory (`root.path` of a spec is relative to it).
    pub shared: PathBuf,
    /// The agent's state: bundles and the runtime's records.
    pub state: PathBuf,
}

/// A process the agent started: a container's init or an exec'd one.
#[derive(Debug)]
struct Process {
    pid: i32,
    exit: ExitWatch,
    /// The agent's handle on the process's stdin stream, for CloseStdin.
    stdin: Option<OwnedFd>,
    tty: Option<Tty>,
}

impl Process {
    fn new(pid: i32, io: ProcessIo) -> Process {
        Process { pid, exit: Reaper::global().watch(pid), stdin: io.stdin_handle, tty: io.tty }
    }

    fn exited(&self) -> bool {
        self.exit.borrow().is_some()
    }
}

#[derive(Debug)]
struct Container {
    bundle: Bundle,
    cgroup: Cgroup,
    init: Process,
    execs: HashMap<String, Process>,
    started: bool,
}

/// A table entry: reserved while its create call runs, so a second create of the id fails at once.
#[derive(Debug)]
enum Slot {
    Creating,
    Ready(Box<Container>),
}

/// Every container of the pod.
#[derive(Debug)]
pub struct Containers {
    paths: ContainerPaths,
    runtime: Runtime,
    oom: OomWatcher,
    table: Mutex<HashMap<String, Slot>>,
}

impl Containers {
    pub fn new(paths: ContainerPaths) -> std::io::Result<Containers> {
        let runtime = Runtime::new(paths.state.join("runtime"));
        Ok(Containers { paths, runtime, oom: OomWatcher::start()?, table: Mutex::new(HashMap::new()) })
    }

    fn table(&self) -> std::sync::MutexGuard<'_, HashMap<String, Slot>> {
        self.table.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Creates container `id` (its init process exists, stopped before exec) from `oci_spec`; the
    /// namespaces it names by path are those of container `joins` (empty: none may be).
    pub async fn create(
        &self,
        id: &str,
        oci_spec: &[u8],
        stdio: &Stdio,
        joins: &str,
    ) -> Result<(), CallError> {
        check_id(id)?;
        let joins = {
            let mut table = self.table();
            let joins = match joins {
                "" => None,
                other => match table.get(other) {
                    Some(Slot::Ready(container)) => Some(container.init.pid),
                    _ => {
                        return Err(CallError::NotFound(format!(
                            "join_namespaces_of {other:?}: no such container"
                        )))
                    }
                },
            };
            match table.entry(id.to_owned()) {
                std::collections::hash_map::Entry::Occupied(_) => {
                    return Err(CallError::AlreadyExists(format!("container_id {id:?} is in use")))
                }
                std::collections::hash_map::Entry::Vacant(slot) => slot.insert(Slot::Creating),
            };
            joins
        };
        let created = self.create_reserved(id, oci_spec, stdio, joins).await;
        let mut table = self.table();
        match created {
            Ok(container) => {
                table.insert(id.to_owned(), Slot::Ready(Box::new(container)));
                Ok(())
            }
            Err(err) => {
                table.remove(id);
                Err(err)
            }
        }
    }

    async fn create_reserved(
        &self,
        id: &str,
        oci_spec: &[u8],
        stdio: &Stdio,
        joins: Option<i32>,
    ) -> Result<Container, CallError> {
        let bundle =
            Bundle::create(&self.paths.state.join("bundles"), id, &self.paths.shared, oci_spec, joins)?;
        check_terminal(stdio, bundle.terminal(), "oci_spec: process.terminal")?;
        let io = self.prepare_io(stdio).await?;
        let created = self.runtime.create(id, bundle.dir(), io.runtime_streams(), io.console_path()).await;
        let pid = match created {
            Ok(pid) => pid,
            Err(err) => {
                // The runtime may have left its record behind; the bundle goes with `bundle`.
                let _ = self.runtime.delete(id).await;
                return Err(err.into());
            }
        };
        match io.finish().await {
            Ok(io) => {
                let cgroup = Cgroup::locate(bundle.cgroups_path());
                self.oom.watch(id, cgroup.clone());
                Ok(Container {
                    bundle,
                    cgroup,
                    init: Process::new(pid, io),
                    execs: HashMap::new(),
                    started: false,
                })
            }
            Err(err) => {
                let _ = self.runtime.delete(id).await;
                Err(err)
            }
        }
    }

    /// Claims the streams `stdio` names and, for a terminal, binds the console socket.
    async fn prepare_io(&self, stdio: &Stdio) -> Result<PendingIo, CallError> {
        static CONSOLES: AtomicU64 = AtomicU64::new(0);
        let console = match stdio.terminal {
            true => {
                let dir = self.paths.state.join("consoles");
                std::fs::create_dir_all(&dir)
                    .map_err(|e| CallError::Internal(format!("{}: {e}", dir.display())))?;
                // A short name: socket paths are limited to 108 bytes.
                let n = CONSOLES.fetch_add(1, Ordering::Relaxed);
                Some(ConsoleSocket::bind(&dir.join(format!("{n}.sock")))?)
            }
            false => None,
        };
        let streams = claim(stdio).await?;
        let stdin_handle = keep_stdin(&streams)?;
        Ok(PendingIo { streams, console, stdin_handle })
    }

    /// Starts the container's init process.
    pub async fn start(&self, id: &str) -> Result<(), CallError> {
        self.with_container(id, |c| {
            if c.started {
                return Err(CallError::FailedPrecondition(format!("container {id} was already started")));
            }
            Ok(())
        })?;
        self.runtime.start(id).await?;
        self.with_container(id, |c| {
            c.started = true;
            Ok(())
        })
    }

    /// Runs `process` (an OCI process as JSON) in the running container `id` as `exec_id`.
    pub async fn exec(
        &self,
        id: &str,
        exec_id: &str,
        process: &[u8],
        stdio: &Stdio,
    ) -> Result<(), CallError> {
        check_id(exec_id).map_err(|_| CallError::InvalidArgument(format!("exec_id {exec_id:?}: bad id")))?;
        let parsed: oci_spec::runtime::Process = serde_json::from_slice(process)
            .map_err(|err| CallError::InvalidArgument(format!("process: {err}")))?;
        check_terminal(stdio, parsed.terminal().unwrap_or(false), "process.terminal")?;
        let process_file = self.with_container(id, |c| {
            if !c.started || c.init.exited() {
                return Err(CallError::FailedPrecondition(format!("container {id} is not running")));
            }
            if c.execs.contains_key(exec_id) {
                return Err(CallError::AlreadyExists(format!(
                    "exec_id {exec_id:?} is in use in container {id}"
                )));
            }
            Ok(c.bundle.dir().join(format!("exec-{exec_id}.json")))
        })?;
        std::fs::write(&process_file, process)
            .map_err(|e| CallError::Internal(format!("writing {}: {e}", process_file.display())))?;
        let io = self.prepare_io(stdio).await?;
        let pid = self.runtime.exec(id, &process_file, io.runtime_streams(), io.console_path()).await;
        let _ = std::fs::remove_file(&process_file);
        let pid = pid?;
        let io = match io.finish().await {
            Ok(io) => io,
            Err(err) => {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
                return Err(err);
            }
        };
        self.with_container(id, |c| {
            c.execs.insert(exec_id.to_owned(), Process::new(pid, io));
            Ok(())
        })
    }

    /// Sends `signal` to the process (or, with `all`, to every process of the container).
    pub async fn signal(&self, id: &str, exec_id: &str, signal: u32, all: bool) -> Result<(), CallError> {
        let number = i32::try_from(signal).ok().and_then(|n| Signal::try_from(n).ok());
        let signal =
            number.ok_or_else(|| CallError::InvalidArgument(format!("signal {signal}: no such signal")))?;
        if all && exec_id.is_empty() {
            return Ok(self.runtime.kill_all(id, signal as u32).await?);
        }
        self.with_process(id, exec_id, |p| {
            if p.exited() {
                return Ok(());
            }
            kill(Pid::from_raw(p.pid), signal)
                .map_err(|e| CallError::Internal(format!("kill {}: {e}", p.pid)))
        })
    }

    /// Waits until the process exited.
    pub async fn wait(&self, id: &str, exec_id: &str) -> Result<Exit, CallError> {
        let (exit, drained) =
            self.with_process(id, exec_id, |p| Ok((p.exit.clone(), p.tty.as_ref().map(Tty::drained))))?;
        let exit = reaper::exited(exit)
            .await
            .ok_or_else(|| CallError::Internal("the process's exit was lost".into()))?;
        // An OOM kill that ended the process is reported before its exit.
        self.oom.check(id);
        if let Some(mut drained) = drained {
            let _ = tokio::time::timeout(TTY_DRAIN_LIMIT, drained.wait_for(|done| *done)).await;
        }
        Ok(exit)
    }

    /// The process reads EOF on stdin once it has read what was sent.
    pub fn close_stdin(&self, id: &str, exec_id: &str) -> Result<(), CallError> {
        self.with_process(id, exec_id, |p| {
            if let Some(stdin) = p.stdin.take() {
                let _ = nix::sys::socket::shutdown(stdin.as_raw_fd(), nix::sys::socket::Shutdown::Read);
            }
            Ok(())
        })
    }

    /// Sets the window size of the process's terminal.
    pub fn resize(&self, id: &str, exec_id: &str, columns: u32, rows: u32) -> Result<(), CallError> {
        let size = |value: u32, field: &str| {
            u16::try_from(value)
                .map_err(|_| CallError::InvalidArgument(format!("{field} {value}: at most 65535")))
        };
        let (columns, rows) = (size(columns, "columns")?, size(rows, "rows")?);
        self.with_process(id, exec_id, |p| match &p.tty {
            Some(tty) => Ok(tty.resize(columns, rows)?),
            None => Err(CallError::FailedPrecondition(format!("process {id}/{exec_id:?} has no terminal"))),
        })
    }

    /// The pids of the container's init and exec'd processes that still run.
    pub fn pids(&self, id: &str) -> Result<Vec<u32>, CallError> {
        self.with_container(id, |c| {
            let all = std::iter::once(&c.init).chain(c.execs.values());
            Ok(all.filter(|p| !p.exited()).map(|p| p.pid as u32).collect())
        })
    }

    /// Removes the container: it must have stopped unless `force` (which kills it first).
    pub async fn remove(&self, id: &str, force: bool) -> Result<(), CallError> {
        let init = self.with_container(id, |c| {
            if c.started && !c.init.exited() && !force {
                return Err(CallError::FailedPrecondition(format!(
                    "container {id} is running; stop it first or remove with force"
                )));
            }
            Ok(c.init.exit.clone())
        })?;
        // The runtime's delete kills what still runs (a created container's init too).
        self.runtime.delete(id).await?;
        let _ = tokio::time::timeout(KILL_TIMEOUT, reaper::exited(init)).await;
        self.oom.forget(id);
        let removed = self.table().remove(id);
        if let Some(Slot::Ready(container)) = removed {
            container
                .bundle
                .remove()
                .map_err(|e| CallError::Internal(format!("removing the bundle: {e}")))?;
        }
        Ok(())
    }

    /// The container's cgroup figures.
    pub async fn stats(&self, id: &str) -> Result<CgroupStats, CallError> {
        let cgroup = self.with_container(id, |c| Ok(c.cgroup.clone()))?;
        tokio::task::spawn_blocking(move || cgroup.stats())
            .await
            .map_err(|e| CallError::Internal(format!("reading the cgroup: {e}")))
    }

    /// Freezes (`pause`) or thaws the container's processes.
    pub async fn freeze(&self, id: &str, pause: bool) -> Result<(), CallError> {
        self.with_container(id, |c| match c.started && !c.init.exited() {
            true => Ok(()),
            false => Err(CallError::FailedPrecondition(format!("container {id} is not running"))),
        })?;
        match pause {
            true => Ok(self.runtime.pause(id).await?),
            false => Ok(self.runtime.resume(id).await?),
        }
    }

    /// Applies new OCI `linux.resources` (JSON) to the container.
    pub async fn update(&self, id: &str, resources: &[u8]) -> Result<(), CallError> {
        let _: oci_spec::runtime::LinuxResources = serde_json::from_slice(resources)
            .map_err(|err| CallError::InvalidArgument(format!("resources: {err}")))?;
        let (file, cgroups_path) = self.with_container(id, |c| {
            Ok((c.bundle.dir().join("resources.json"), c.bundle.cgroups_path().to_path_buf()))
        })?;
        std::fs::write(&file, resources)
            .map_err(|e| CallError::Internal(format!("writing {}: {e}", file.display())))?;
        let updated = self.runtime.update(id, &cgroups_path, &file).await;
        let _ = std::fs::remove_file(&file);
        Ok(updated?)
    }

    /// The next container that had a process OOM-killed (waits for one).
    pub async fn next_oom(&self) -> Option<String> {
        self.oom.next().await
    }

    /// Removes every container, killing what runs (DestroySandbox, agent shutdown).
    pub async fn remove_all(&self) {
        let ids: Vec<String> = self.table().keys().cloned().collect();
        for id in ids {
            if let Err(err) = self.remove(&id, true).await {
                eprintln!("husk-agent: removing container {id}: {err}");
            }
        }
    }

    fn with_container<T>(
        &self,
        id: &str,
        f: impl FnOnce(&mut Container) -> Result<T, CallError>,
    ) -> Result<T, CallError> {
        match self.table().get_mut(id) {
            Some(Slot::Ready(container)) => f(container),
            Some(Slot::Creating) => {
                Err(CallError::FailedPrecondition(format!("container {id} is being created")))
            }
            None => Err(CallError::NotFound(format!("container_id {id:?}: no such container"))),
        }
    }

    fn with_process<T>(
        &self,
        id: &str,
        exec_id: &str,
        f: impl FnOnce(&mut Process) -> Result<T, CallError>,
    ) -> Result<T, CallError> {
        self.with_container(id, |c| {
            if exec_id.is_empty() {
                return f(&mut c.init);
            }
            match c.execs.get_mut(exec_id) {
                Some(process) => f(process),
                None => Err(CallError::NotFound(format!(
                    "exec_id {exec_id:?}: no such process in container {id}"
                ))),
            }
        })
    }
}

/// Container and exec ids: what libcontainer and file names accept.
fn check_id(id: &str) -> Result<(), CallError> {
    let valid = !id.is_empty()
        && id.len() <= 128
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
        && !id.starts_with('.');
    if valid {
        Ok(())
    } else {
        Err(CallError::InvalidArgument(format!(
            "container_id {id:?}: expected 1 to 128 characters of [A-Za-z0-9_.-], not starting with `.`"
        )))
    }
}

/// `stdio.terminal` and the process's own `terminal` must agree.
fn check_terminal(stdio: &Stdio, process_terminal: bool, field: &str) -> Result<(), CallError> {
    if stdio.terminal == process_terminal {
        return Ok(());
    }
    Err(CallError::InvalidArgument(format!(
        "stdio.terminal is {} but {field} is {process_terminal}",
        stdio.terminal
    )))
}

/// A process's streams between claiming them and the runtime's step.
struct PendingIo {
    streams: ProcessStdio,
    console: Option<ConsoleSocket>,
    stdin_handle: Option<OwnedFd>,
}

/// What the agent keeps of a started process's streams.
struct ProcessIo {
    stdin_handle: Option<OwnedFd>,
    tty: Option<Tty>,
}

impl PendingIo {
    /// The streams the runtime passes on: the host's, or /dev/null when the pty carries them.
    fn runtime_streams(&self) -> ProcessStdio {
        if self.console.is_some() {
            return ProcessStdio::default();
        }
        let copy = |fd: &Option<OwnedFd>| fd.as_ref().and_then(|fd| fd.try_clone().ok());
        ProcessStdio {
            stdin: copy(&self.streams.stdin),
            stdout: copy(&self.streams.stdout),
            stderr: copy(&self.streams.stderr),
        }
    }

    fn console_path(&self) -> Option<&std::path::Path> {
        self.console.as_ref().map(ConsoleSocket::path)
    }

    /// After the runtime's step: receives the pty master and starts copying. The host's streams
    /// are released here (without a terminal the process holds its own copies).
    async fn finish(self) -> Result<ProcessIo, CallError> {
        let PendingIo { streams, console, stdin_handle } = self;
        let Some(console) = console else { return Ok(ProcessIo { stdin_handle, tty: None }) };
        let master = tokio::task::spawn_blocking(move || console.receive_master())
            .await
            .map_err(|e| CallError::Internal(format!("receiving the pty master: {e}")))??;
        let tty = Tty::start(master, streams.stdin, streams.stdout)
            .map_err(|e| CallError::Internal(format!("starting the terminal copy: {e}")))?;
        Ok(ProcessIo { stdin_handle, tty: Some(tty) })
    }
}

async fn claim(stdio: &Stdio) -> Result<ProcessStdio, CallError> {
    let stdio = stdio.clone();
    tokio::task::spawn_blocking(move || StdioBroker::global().claim(&stdio))
        .await
        .map_err(|e| CallError::Internal(format!("claiming stdio: {e}")))?
        .map_err(CallError::from)
}

fn keep_stdin(streams: &ProcessStdio) -> Result<Option<OwnedFd>, CallError> {
    streams
        .stdin
        .as_ref()
        .map(|fd| fd.try_clone())
        .transpose()
        .map_err(|e| CallError::Internal(format!("keeping the stdin stream: {e}")))
}
