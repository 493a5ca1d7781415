//! `husk-agent runtime ...`: the container runtime the agent runs as a short-lived child process
//! for each lifecycle step, as a shim runs runc. libcontainer waits for the processes it forks and
//! changes its caller (dumpable flag, OOM score); in a child of its own it can do both without
//! disturbing PID 1's reaper. What the step prints on stdout is its result (a pid); errors go to
//! stderr with their cause chain and a non-zero exit.
//!
//! ```text
//! husk-agent runtime ROOT create ID BUNDLE [CONSOLE]    stdio on fds 3, 4, 5; prints the init pid
//! husk-agent runtime ROOT start ID
//! husk-agent runtime ROOT exec ID PROCESS.JSON [CONSOLE] stdio on fds 3, 4, 5; prints the pid
//!
//! With CONSOLE (a unix socket path) the process gets a pty whose master is sent there.
//! husk-agent runtime ROOT kill-all ID SIGNAL
//! husk-agent runtime ROOT pause ID | resume ID
//! husk-agent runtime ROOT update ID CGROUPS_PATH RESOURCES.JSON   an OCI linux.resources object
//! husk-agent runtime ROOT delete ID
//! ```

use std::os::fd::{FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use libcontainer::container::builder::ContainerBuilder;
use libcontainer::container::Container;
use libcontainer::signal::Signal;
use libcontainer::syscall::syscall::SyscallType;
use oci_spec::runtime::{Process, Spec};

use super::exec_seccomp::SeccompExecutor;

/// First of the three fds (stdin, stdout, stderr) a process's streams arrive on.
pub const FIRST_STDIO_FD: i32 = 3;

/// Runs one step; `args` follow `runtime`.
pub fn main(args: &[String]) -> ExitCode {
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("{err:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &[String]) -> Result<()> {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let Some((root, step)) = args.split_first() else { bail!("usage: husk-agent runtime ROOT STEP ...") };
    let root = Path::new(root);
    match step {
        ["create", id, bundle, console @ ..] => {
            let container = with_stdio(builder(root, id)?)
                .with_console_socket(console.first().copied())
                .as_init(bundle)
                .with_systemd(false)
                .with_detach(true)
                .build()
                .context("creating the container")?;
            println!("{}", container.pid().context("the created container has no pid")?);
        }
        ["start", id] => load(root, id)?.start().context("starting the container")?,
        ["exec", id, process, console @ ..] => {
            let pid = with_seccomp(with_stdio(builder(root, id)?), root, id, Path::new(process))?
                .with_console_socket(console.first().copied())
                .as_tenant()
                .with_detach(true)
                .with_process(Some(PathBuf::from(process)))
                .build()
                .context("starting the process")?;
            println!("{pid}");
        }
        ["kill-all", id, signal] => {
            let signal = Signal::try_from(*signal).context("signal")?;
            load(root, id)?.kill(signal, true).context("signalling the container's processes")?
        }
        ["pause", id] => load(root, id)?.pause().context("pausing the container")?,
        ["resume", id] => load(root, id)?.resume().context("resuming the container")?,
        ["update", id, cgroups_path, resources] => update(id, cgroups_path, resources)?,
        ["delete", id] => load(root, id)?.delete(true).context("deleting the container")?,
        _ => bail!("husk-agent runtime: unknown step {step:?}"),
    }
    Ok(())
}

/// Applies new `linux.resources` to the container's cgroup.
fn update(id: &str, cgroups_path: &str, resources: &str) -> Result<()> {
    use libcgroups::common::{create_cgroup_manager, CgroupConfig, CgroupManager, ControllerOpt};
    let text = std::fs::read(resources).with_context(|| format!("reading {resources}"))?;
    let resources: oci_spec::runtime::LinuxResources = serde_json::from_slice(&text).context("resources")?;
    let config = CgroupConfig {
        cgroup_path: PathBuf::from(cgroups_path),
        systemd_cgroup: false,
        container_name: id.to_owned(),
    };
    let manager = create_cgroup_manager(config).context("the container's cgroup")?;
    let options = ControllerOpt {
        resources: &resources,
        disable_oom_killer: false,
        oom_score_adj: None,
        freezer_state: None,
    };
    manager.apply(&options).context("applying the resources")
}

fn builder(root: &Path, id: &str) -> Result<ContainerBuilder> {
    ContainerBuilder::new((*id).to_owned(), SyscallType::default())
        .with_root_path(root)
        .with_context(|| format!("container state directory {}", root.display()))
}

fn load(root: &Path, id: &str) -> Result<Container> {
    Container::load(root.join(id)).with_context(|| format!("container {id}"))
}

/// An exec'd process gets the container's seccomp filter (see [`super::exec_seccomp`]): the
/// executor that installs it, and `process` rewritten as it must be set up for that.
fn with_seccomp(
    builder: ContainerBuilder,
    root: &Path,
    id: &str,
    process: &Path,
) -> Result<ContainerBuilder> {
    let container = load(root, id)?;
    let config = container.bundle().join("config.json");
    let spec = Spec::load(&config).with_context(|| format!("the container's spec {}", config.display()))?;
    let Some(filter) = spec.linux().as_ref().and_then(|linux| linux.seccomp().clone()) else {
        return Ok(builder);
    };
    let text = std::fs::read(process).with_context(|| format!("reading {}", process.display()))?;
    let read: Process =
        serde_json::from_slice(&text).with_context(|| format!("the process {}", process.display()))?;
    let (executor, planned) = SeccompExecutor::plan(filter, read);
    let text = serde_json::to_vec(&planned).context("the process with CAP_SYS_ADMIN lent")?;
    // Rewritten in place: the file is this exec's own, and keeps its mode.
    std::fs::write(process, text).with_context(|| format!("rewriting {}", process.display()))?;
    Ok(builder.with_executor(executor))
}

/// The streams the agent passed on fds 3, 4 and 5 become the process's stdin, stdout, stderr.
fn with_stdio(builder: ContainerBuilder) -> ContainerBuilder {
    // SAFETY: the agent spawns this helper with exactly these three fds open for it (stream
    // sockets or /dev/null), and nothing else in this process owns them.
    let [stdin, stdout, stderr] = [0, 1, 2].map(|n| unsafe { OwnedFd::from_raw_fd(FIRST_STDIO_FD + n) });
    builder.with_stdin(stdin).with_stdout(stdout).with_stderr(stderr)
}
