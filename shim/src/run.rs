//! `husk run`: one container in a microVM, without containerd: a rootfs directory (or an OCI
//! bundle) is shared into a fresh sandbox VM, the agent runs the command there with this
//! process's stdio attached (a terminal with `-t`), and the container's exit status becomes ours.
//! Everything (VM, mounts, sandbox directory) is gone when it returns, also on errors.

use std::io::{IsTerminal, Read, Write};
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::time::Duration;

use husk_protocols::agent::Stdio;
use husk_protocols::StdioStream;
use oci_spec::runtime::Spec;
use tokio::io::AsyncWriteExt;
use tokio::net::UnixStream;

use crate::agent_client::AgentError;
use crate::guest_image::{GuestImage, GuestImageError};
use crate::sandbox::{Access, Propagation, Sandbox, SandboxConfig, SandboxError};

/// The container's name in the guest (one per sandbox).
const CONTAINER_ID: &str = "run";
/// The shared directory's name for the rootfs.
const ROOTFS_NAME: &str = "rootfs";
/// How long output may keep flowing after the process exited (children holding the streams).
const OUTPUT_DRAIN_LIMIT: Duration = Duration::from_secs(5);

/// What to run.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// A rootfs directory, or an OCI bundle (a directory with `config.json`).
    pub target: PathBuf,
    /// The command (required for a rootfs; replaces the bundle's `process.args` if given).
    pub args: Vec<String>,
    pub tty: bool,
    pub interactive: bool,
    pub vcpus: u8,
    pub mem_mib: u64,
    /// The guest image directory (default: the located image).
    pub image: Option<PathBuf>,
    /// Where sandbox directories are made.
    pub sandbox_root: PathBuf,
    /// Added to the guest kernel's command line.
    pub kernel_params: String,
    /// The VMM's threads under their seccomp filters.
    pub seccomp: bool,
    /// The most host files the share holds for the guest.
    pub fs_max_fds: usize,
    pub agent_timeout: Duration,
}

/// Why `husk run` failed.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("{}: {reason}", path.display())]
    Target { path: PathBuf, reason: String },
    #[error("husk run needs root (KVM, bind mounts and the share's file ownership)")]
    NotRoot,
    #[error(transparent)]
    Image(#[from] GuestImageError),
    #[error(transparent)]
    Sandbox(Box<SandboxError>),
    #[error("{source}\n{report}")]
    Container { source: Box<AgentError>, report: String },
    #[error("attaching stdio: {0}")]
    Stdio(std::io::Error),
}

impl From<SandboxError> for RunError {
    fn from(err: SandboxError) -> RunError {
        RunError::Sandbox(Box::new(err))
    }
}

/// Runs the container; returns its exit status (code, or 128 + signal).
pub async fn run(options: &RunOptions) -> Result<i32, RunError> {
    if !nix::unistd::geteuid().is_root() {
        return Err(RunError::NotRoot);
    }
    let (mut spec, rootfs) = container_spec(options)?;
    let image = match &options.image {
        Some(dir) => GuestImage::open(dir)?,
        None => GuestImage::locate()?,
    };
    let config = SandboxConfig {
        id: format!("run-{}", std::process::id()),
        root: options.sandbox_root.clone(),
        image,
        vcpus: options.vcpus,
        mem_mib: options.mem_mib,
        extra_cmdline: options.kernel_params.clone(),
        agent_timeout: options.agent_timeout,
        console_to_stdout: false,
        sysctls: Default::default(),
        network: None,
        seccomp: options.seccomp,
        fs_max_fds: options.fs_max_fds,
        // `husk run` stays where its caller put it.
        cgroup: None,
    };
    let read_only = spec.root().as_ref().and_then(|r| r.readonly()).unwrap_or(false);
    let sandbox = Sandbox::boot(&config, |dir| {
        dir.share(&rootfs, ROOTFS_NAME, Access::ReadOnly, Propagation::Private).map(drop)
    })
    .await?;
    if let Some(root) = spec.root_mut() {
        root.set_path(PathBuf::from(ROOTFS_NAME));
        root.set_readonly(Some(read_only));
    }
    let result = run_container(&sandbox, &spec, options).await;
    let result = result
        .map_err(|source| RunError::Container { source: Box::new(source), report: sandbox.vm_report() });
    sandbox.shutdown().await;
    result?
}

/// The spec to run and the host rootfs directory.
fn container_spec(options: &RunOptions) -> Result<(Spec, PathBuf), RunError> {
    let target = &options.target;
    let invalid = |reason: String| RunError::Target { path: target.clone(), reason };
    let metadata = std::fs::metadata(target).map_err(|err| invalid(err.to_string()))?;
    if !metadata.is_dir() {
        return Err(invalid("not a directory (give a rootfs directory or an OCI bundle)".into()));
    }
    let bundle_config = target.join("config.json");
    let (mut spec, rootfs) = if bundle_config.is_file() {
        let spec = Spec::load(&bundle_config)
            .map_err(|err| RunError::Target { path: bundle_config.clone(), reason: err.to_string() })?;
        let root = spec.root().as_ref().map(|r| r.path().clone()).unwrap_or_else(|| PathBuf::from("rootfs"));
        let rootfs = if root.is_absolute() { root } else { target.join(root) };
        (spec, rootfs)
    } else {
        if options.args.is_empty() {
            return Err(invalid("no command given (husk run ROOTFS -- COMMAND...)".into()));
        }
        let mut spec = Spec::default();
        spec.set_hostname(Some("husk".into()));
        (spec, target.clone())
    };
    if !rootfs.is_dir() {
        return Err(RunError::Target {
            path: rootfs,
            reason: "the bundle's root.path is not a directory".into(),
        });
    }
    let mut process = spec.process().clone().unwrap_or_default();
    if !options.args.is_empty() {
        process.set_args(Some(options.args.clone()));
    }
    process.set_terminal(Some(options.tty));
    if options.tty {
        let mut env = process.env().clone().unwrap_or_default();
        env.push("TERM=xterm".into());
        process.set_env(Some(env));
    }
    spec.set_process(Some(process));
    Ok((spec, rootfs))
}

async fn run_container(
    sandbox: &Sandbox,
    spec: &Spec,
    options: &RunOptions,
) -> Result<Result<i32, RunError>, AgentError> {
    let client = sandbox.client();
    let stdio = Stdio {
        token: CONTAINER_ID.into(),
        stdin: options.interactive,
        stdout: true,
        stderr: !options.tty,
        terminal: options.tty,
        ..Default::default()
    };
    let stdin = match options.interactive {
        true => Some(client.open_stdio(&stdio.token, StdioStream::Stdin).await?),
        false => None,
    };
    let stdout = client.open_stdio(&stdio.token, StdioStream::Stdout).await?;
    let stderr = match stdio.stderr {
        true => Some(client.open_stdio(&stdio.token, StdioStream::Stderr).await?),
        false => None,
    };
    let spec_json = serde_json::to_vec(spec).unwrap_or_default();
    client.create_container(CONTAINER_ID, spec_json, stdio).await?;
    let _raw = match options.tty {
        true => {
            if let Some((columns, rows)) = window_size() {
                client.resize_pty(CONTAINER_ID, "", columns, rows).await?;
            }
            RawTerminal::enter()
        }
        false => None,
    };
    client.start_container(CONTAINER_ID).await?;
    let output = tokio::spawn(copy_output(stdout, stderr));
    if let Some(stdin) = stdin {
        if let Err(err) = forward_stdin(stdin) {
            return Ok(Err(RunError::Stdio(err)));
        }
    }
    let status = wait_forwarding_resizes(sandbox, options.tty).await?;
    let _ = tokio::time::timeout(OUTPUT_DRAIN_LIMIT, output).await;
    client.remove_container(CONTAINER_ID, true).await?;
    Ok(Ok(status))
}

/// Waits for the container's exit; with a terminal, our window size follows it (SIGWINCH).
async fn wait_forwarding_resizes(sandbox: &Sandbox, tty: bool) -> Result<i32, AgentError> {
    let client = sandbox.client();
    let wait = client.wait_process(CONTAINER_ID, "");
    tokio::pin!(wait);
    let mut resized = match tty {
        true => tokio::signal::unix::signal(tokio::signal::unix::SignalKind::window_change()).ok(),
        false => None,
    };
    loop {
        let next_resize = async {
            match resized.as_mut() {
                Some(signal) => signal.recv().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            exit = &mut wait => return Ok(exit?.status),
            Some(()) = next_resize => {
                if let Some((columns, rows)) = window_size() {
                    // A resize racing the exit is harmless; the exit is what matters.
                    let _ = client.resize_pty(CONTAINER_ID, "", columns, rows).await;
                }
            }
        }
    }
}

/// Copies the container's stdout and stderr streams to ours until they end.
async fn copy_output(mut stdout: UnixStream, stderr: Option<UnixStream>) {
    let out = async {
        let _ = tokio::io::copy(&mut stdout, &mut tokio::io::stdout()).await;
        let _ = tokio::io::stdout().flush().await;
    };
    let err = async {
        if let Some(mut stderr) = stderr {
            let _ = tokio::io::copy(&mut stderr, &mut tokio::io::stderr()).await;
        }
    };
    tokio::join!(out, err);
}

/// Copies our stdin into the container's on a thread of its own (a blocking read of a terminal
/// must not hold the runtime), then ends the stream so the process reads EOF.
fn forward_stdin(stream: UnixStream) -> std::io::Result<()> {
    let mut stream = stream.into_std()?;
    stream.set_nonblocking(false)?;
    std::thread::Builder::new().name("husk-run-stdin".into()).spawn(move || {
        let mut buffer = [0u8; 16 * 1024];
        let mut input = std::io::stdin().lock();
        loop {
            match input.read(&mut buffer) {
                Ok(0) | Err(_) => break,
                Ok(read) => {
                    if stream.write_all(&buffer[..read]).is_err() {
                        return;
                    }
                }
            }
        }
        let _ = stream.shutdown(std::net::Shutdown::Write);
    })?;
    Ok(())
}

/// Our terminal's size, if stdout is one.
fn window_size() -> Option<(u32, u32)> {
    let mut size = libc::winsize { ws_row: 0, ws_col: 0, ws_xpixel: 0, ws_ypixel: 0 };
    // SAFETY: TIOCGWINSZ writes one winsize into `size`, which lives across the call.
    let result = unsafe { libc::ioctl(libc::STDOUT_FILENO, libc::TIOCGWINSZ, &mut size) };
    (result == 0 && size.ws_col > 0).then_some((size.ws_col.into(), size.ws_row.into()))
}

/// Our stdin in raw mode while a container's terminal is attached; restored on drop.
struct RawTerminal(nix::sys::termios::Termios);

impl RawTerminal {
    fn enter() -> Option<RawTerminal> {
        let stdin = std::io::stdin();
        if !stdin.is_terminal() {
            return None;
        }
        let saved = nix::sys::termios::tcgetattr(stdin.as_fd()).ok()?;
        let mut raw = saved.clone();
        nix::sys::termios::cfmakeraw(&mut raw);
        nix::sys::termios::tcsetattr(stdin.as_fd(), nix::sys::termios::SetArg::TCSANOW, &raw).ok()?;
        Some(RawTerminal(saved))
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        let stdin = std::io::stdin();
        let _ = nix::sys::termios::tcsetattr(stdin.as_fd(), nix::sys::termios::SetArg::TCSANOW, &self.0);
    }
}
