//! Runs the lifecycle steps of [`super::helper`] as child processes of the agent and turns their
//! output into results.

use std::io::Read;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use super::helper::FIRST_STDIO_FD;
use crate::reaper::{self, Reaper};
use crate::signals;
use crate::stdio::ProcessStdio;

/// A failed step: what it was doing and what the runtime said.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("{step}: cannot run the container runtime: {source}")]
    Spawn { step: &'static str, source: std::io::Error },
    #[error("{step}: {message}")]
    Failed { step: &'static str, message: String },
}

/// The container runtime: libcontainer's state lives under `root`.
#[derive(Debug, Clone)]
pub struct Runtime {
    root: PathBuf,
}

impl Runtime {
    pub fn new(root: PathBuf) -> Runtime {
        Runtime { root }
    }

    /// Creates container `id` from the bundle; returns its init's pid (created, not started).
    /// With `console`, its pty master is sent to that socket.
    pub async fn create(
        &self,
        id: &str,
        bundle: &Path,
        stdio: ProcessStdio,
        console: Option<&Path>,
    ) -> Result<i32, RuntimeError> {
        self.start_process("create", id, bundle, stdio, console).await
    }

    pub async fn start(&self, id: &str) -> Result<(), RuntimeError> {
        self.step("start", &["start".into(), id.into()], None).await.map(drop)
    }

    /// Runs the OCI process in `process_json` in container `id`; returns its pid.
    pub async fn exec(
        &self,
        id: &str,
        process_json: &Path,
        stdio: ProcessStdio,
        console: Option<&Path>,
    ) -> Result<i32, RuntimeError> {
        self.start_process("exec", id, process_json, stdio, console).await
    }

    /// A step that starts a process (`create ID BUNDLE` or `exec ID PROCESS.JSON`, then the
    /// optional console socket) and prints its pid.
    async fn start_process(
        &self,
        step: &'static str,
        id: &str,
        file: &Path,
        stdio: ProcessStdio,
        console: Option<&Path>,
    ) -> Result<i32, RuntimeError> {
        let mut args = vec![step.to_owned(), id.to_owned(), file.display().to_string()];
        args.extend(console.map(|path| path.display().to_string()));
        let out = self.step(step, &args, Some(stdio)).await?;
        parse_pid(step, &out)
    }

    pub async fn kill_all(&self, id: &str, signal: u32) -> Result<(), RuntimeError> {
        self.step("kill", &["kill-all".into(), id.into(), signal.to_string()], None).await.map(drop)
    }

    pub async fn pause(&self, id: &str) -> Result<(), RuntimeError> {
        self.step("pause", &["pause".into(), id.into()], None).await.map(drop)
    }

    pub async fn resume(&self, id: &str) -> Result<(), RuntimeError> {
        self.step("resume", &["resume".into(), id.into()], None).await.map(drop)
    }

    /// Applies the OCI `linux.resources` in `resources_json` to the cgroup at `cgroups_path`.
    pub async fn update(
        &self,
        id: &str,
        cgroups_path: &Path,
        resources_json: &Path,
    ) -> Result<(), RuntimeError> {
        let args = [
            "update".to_owned(),
            id.to_owned(),
            cgroups_path.display().to_string(),
            resources_json.display().to_string(),
        ];
        self.step("update", &args, None).await.map(drop)
    }

    /// Deletes the container, killing what still runs in it.
    pub async fn delete(&self, id: &str) -> Result<(), RuntimeError> {
        self.step("delete", &["delete".into(), id.into()], None).await.map(drop)
    }

    async fn step(
        &self,
        step: &'static str,
        args: &[String],
        stdio: Option<ProcessStdio>,
    ) -> Result<String, RuntimeError> {
        let mut command = Command::new("/proc/self/exe");
        command.arg("runtime").arg(&self.root).args(args);
        command.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
        let spawn = move || -> std::io::Result<_> {
            let streams = stdio.map(process_streams).transpose()?;
            if let Some(streams) = &streams {
                pass_streams(&mut command, streams);
            }
            let (mut child, exit) = Reaper::global().spawn(signals::with_no_signals_blocked(&mut command))?;
            // The child has its copies; the agent must not hold the streams open.
            drop(streams);
            let mut stderr = child.stderr.take();
            let errors = std::thread::spawn(move || {
                let mut text = String::new();
                if let Some(stderr) = stderr.as_mut() {
                    let _ = stderr.read_to_string(&mut text);
                }
                text
            });
            let mut out = String::new();
            if let Some(stdout) = child.stdout.as_mut() {
                stdout.read_to_string(&mut out)?;
            }
            Ok((out, errors.join().unwrap_or_default(), exit))
        };
        let spawned = tokio::task::spawn_blocking(spawn)
            .await
            .map_err(|err| RuntimeError::Spawn { step, source: std::io::Error::other(err) })?;
        let (out, errors, exit) = spawned.map_err(|source| RuntimeError::Spawn { step, source })?;
        match reaper::exited(exit).await {
            Some(exit) if exit.status == 0 => Ok(out),
            Some(exit) => Err(RuntimeError::Failed { step, message: failure_message(&errors, exit.status) }),
            None => Err(RuntimeError::Failed { step, message: "the runtime's exit was lost".into() }),
        }
    }
}

fn parse_pid(step: &'static str, out: &str) -> Result<i32, RuntimeError> {
    out.trim()
        .parse()
        .map_err(|_| RuntimeError::Failed { step, message: format!("the runtime printed no pid: {out:?}") })
}

fn failure_message(errors: &str, status: i32) -> String {
    let errors = errors.trim();
    if errors.is_empty() {
        format!("the runtime failed with status {status}")
    } else {
        errors.to_owned()
    }
}

/// The three streams a process gets, /dev/null for those the host did not ask for.
fn process_streams(stdio: ProcessStdio) -> std::io::Result<[OwnedFd; 3]> {
    let or_null = |fd: Option<OwnedFd>, write: bool| match fd {
        Some(fd) => Ok(fd),
        None => std::fs::OpenOptions::new().read(!write).write(write).open("/dev/null").map(OwnedFd::from),
    };
    Ok([or_null(stdio.stdin, false)?, or_null(stdio.stdout, true)?, or_null(stdio.stderr, true)?])
}

/// Makes `streams` the child's fds 3, 4 and 5.
fn pass_streams(command: &mut Command, streams: &[OwnedFd; 3]) {
    let raw = streams.each_ref().map(|fd| fd.as_raw_fd());
    // SAFETY: runs in the forked child before exec and calls only fcntl and dup2 (async-signal-
    // safe) on descriptors that stay open in the parent until spawn returns. Going through copies
    // above 10 first keeps a source numbered 3 to 5 from being overwritten before it is used.
    unsafe {
        command.pre_exec(move || {
            let mut copies = [0; 3];
            for (copy, fd) in copies.iter_mut().zip(raw) {
                *copy = libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 10);
                if *copy < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            for (target, copy) in (FIRST_STDIO_FD..).zip(copies) {
                if libc::dup2(copy, target) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
}
