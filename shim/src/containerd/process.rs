//! One process of a container as containerd sees it (the init process, or an exec): its stdio
//! (containerd's FIFOs joined to the agent's vsock streams), its status and its exit, which Wait,
//! State and Delete read.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use containerd_shim::asynchronous::io::{IoTasks, Stdio};
use containerd_shim_protos::protobuf::well_known_types::timestamp::Timestamp;
use husk_protocols::agent;
use husk_protocols::StdioStream;
use tokio::sync::watch;

use super::error::ShimError;
use super::log_uri::{start_logger, Logger, OutputTarget};
use crate::agent_client::AgentClient;

/// How a process ended.
#[derive(Debug, Clone, PartialEq)]
pub struct Exit {
    /// The code, or 128 + the signal (as a shell and containerd report it).
    pub status: u32,
    pub at: Timestamp,
}

impl Exit {
    /// An exit at `unix_ns` nanoseconds since the epoch (0: now).
    pub fn at_unix_ns(status: u32, unix_ns: i64) -> Exit {
        let at = if unix_ns > 0 {
            Timestamp {
                seconds: unix_ns / 1_000_000_000,
                nanos: (unix_ns % 1_000_000_000) as i32,
                ..Default::default()
            }
        } else {
            Timestamp::now()
        };
        Exit { status, at }
    }
}

/// Where a process is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Created,
    Running,
    Stopped,
}

/// See the module documentation.
pub struct Process {
    /// "" for a container's init process.
    pub exec_id: String,
    pub stdio: Stdio,
    pub io: IoTasks,
    pub logs: LogCopies,
    /// An exec's OCI `process` (JSON), run when it is started.
    pub spec: Vec<u8>,
    started: bool,
    exit: Arc<watch::Sender<Option<Exit>>>,
}

impl std::fmt::Debug for Process {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Process")
            .field("exec_id", &self.exec_id)
            .field("stdio", &self.stdio)
            .field("status", &self.status())
            .finish_non_exhaustive()
    }
}

impl Process {
    pub fn new(exec_id: &str, stdio: Stdio, spec: Vec<u8>) -> Process {
        Process {
            exec_id: exec_id.to_owned(),
            stdio,
            io: IoTasks::default(),
            logs: LogCopies::default(),
            spec,
            started: false,
            exit: Arc::new(watch::Sender::new(None)),
        }
    }

    pub fn status(&self) -> Status {
        match (self.exit.borrow().is_some(), self.started) {
            (true, _) => Status::Stopped,
            (false, true) => Status::Running,
            (false, false) => Status::Created,
        }
    }

    pub fn mark_started(&mut self) {
        self.started = true;
    }

    pub fn exit(&self) -> Option<Exit> {
        self.exit.borrow().clone()
    }

    /// Records the exit (the first one counts) and wakes every waiter.
    pub fn set_exit(&self, exit: Exit) {
        record_exit(&self.exit, exit);
    }

    /// Records the exit later, from a task that does not hold the process.
    pub fn exit_recorder(&self) -> impl FnOnce(Exit) + Send + 'static {
        let slot = Arc::clone(&self.exit);
        move |exit| record_exit(&slot, exit)
    }

    /// Resolves when the process has exited (at once if it has).
    pub fn exited(&self) -> impl std::future::Future<Output = Exit> + Send + 'static {
        let mut receiver = self.exit.subscribe();
        async move {
            match receiver.wait_for(Option::is_some).await {
                Ok(exit) => exit.clone().unwrap_or_else(|| Exit::at_unix_ns(255, 0)),
                // The sender lives in the process record; gone means the process was deleted.
                Err(_) => Exit::at_unix_ns(255, 0),
            }
        }
    }

    /// Stops every stdio copy at once (a failed start, a deleted process).
    pub async fn abort_io(&self) {
        self.io.abort().await;
        self.logs.drain(Duration::ZERO).await;
    }

    /// Opens the agent streams this process's stdio asks for, joins them to containerd's FIFOs
    /// (or the log URI's file or logging program) and returns what to tell the agent. `token`
    /// names the streams (unique in the pod); `id` and `namespace` go to a logging program.
    pub async fn attach_stdio(
        &self,
        client: &AgentClient,
        token: &str,
        id: &str,
        namespace: &str,
    ) -> Result<agent::Stdio, ShimError> {
        let stdio = &self.stdio;
        if stdio.stdin.contains("://") {
            return Err(ShimError::InvalidArgument(format!("stdin: {:?}: must be a FIFO path", stdio.stdin)));
        }
        let target = OutputTarget::parse("stdout", &stdio.stdout)?;
        if target != OutputTarget::Fifo && !stdio.stderr.is_empty() && stdio.stderr != stdio.stdout {
            return Err(ShimError::InvalidArgument(format!(
                "stderr: {:?}: a log URI on stdout takes stderr too (give the same URI or none)",
                stdio.stderr
            )));
        }
        let want_stderr = !stdio.stderr.is_empty() && !stdio.terminal;
        if !stdio.stdin.is_empty() {
            let stream = client.open_stdio(token, StdioStream::Stdin).await?;
            self.io
                .copy_from_fifo(&stdio.stdin, stream)
                .map_err(|e| ShimError::io("stdin", &stdio.stdin, e))?;
        }
        let stdout = match stdio.stdout.is_empty() {
            true => None,
            false => Some(client.open_stdio(token, StdioStream::Stdout).await?),
        };
        let stderr = match want_stderr {
            true => Some(client.open_stdio(token, StdioStream::Stderr).await?),
            false => None,
        };
        match target {
            OutputTarget::Fifo => {
                if let Some(stream) = stdout {
                    self.io
                        .copy_to_fifo(stream, &stdio.stdout)
                        .map_err(|e| ShimError::io("stdout", &stdio.stdout, e))?;
                }
                if let Some(stream) = stderr {
                    self.io
                        .copy_to_fifo(stream, &stdio.stderr)
                        .map_err(|e| ShimError::io("stderr", &stdio.stderr, e))?;
                }
            }
            OutputTarget::File(path) => {
                let file = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&path)
                    .map_err(|e| ShimError::io("stdout", &stdio.stdout, e))?;
                let second = file.try_clone().map_err(|e| ShimError::io("stdout", &stdio.stdout, e))?;
                self.logs.copy(stdout, file, None);
                self.logs.copy(stderr, second, None);
            }
            OutputTarget::Binary { path, args } => {
                let (out, err, logger) = start_logger(&path, &args, id, namespace).await?;
                self.logs.copy(stdout, out, None);
                self.logs.copy(stderr, err, Some(logger));
            }
        }
        Ok(agent::Stdio {
            token: token.to_owned(),
            stdin: !stdio.stdin.is_empty(),
            stdout: !stdio.stdout.is_empty(),
            stderr: want_stderr,
            terminal: stdio.terminal,
            ..Default::default()
        })
    }
}

/// Output copies to a log URI's file or logging program (the shim crate's tasks take FIFOs).
#[derive(Debug, Clone, Default)]
pub struct LogCopies(Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>>);

impl LogCopies {
    /// Copies `from` (if any) into `to` until EOF; `logger` lives as long as the copy.
    fn copy(&self, from: Option<tokio::net::UnixStream>, to: std::fs::File, logger: Option<Logger>) {
        let copy = tokio::spawn(async move {
            if let Some(mut from) = from {
                let mut to = tokio::fs::File::from_std(to);
                let _ = tokio::io::copy(&mut from, &mut to).await;
                let _ = tokio::io::AsyncWriteExt::flush(&mut to).await;
            }
            if let Some(logger) = logger {
                // Its EOF is the end of both pipes; reaping may wait a moment, off the runtime.
                let _ = tokio::task::spawn_blocking(move || drop(logger)).await;
            }
        });
        self.0.lock().unwrap_or_else(PoisonError::into_inner).push(copy);
    }

    /// Waits up to `limit` for the copies to finish, then stops what still runs.
    pub async fn drain(&self, limit: Duration) {
        let copies: Vec<_> = std::mem::take(&mut *self.0.lock().unwrap_or_else(PoisonError::into_inner));
        for mut copy in copies {
            if tokio::time::timeout(limit, &mut copy).await.is_err() {
                copy.abort();
            }
        }
    }
}

fn record_exit(slot: &watch::Sender<Option<Exit>>, exit: Exit) {
    slot.send_if_modified(|current| current.is_none() && current.replace(exit).is_none());
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[tokio::test]
    async fn the_first_exit_counts_and_wakes_waiters() {
        let mut process = Process::new("", Stdio::default(), Vec::new());
        assert_eq!(process.status(), Status::Created);
        process.mark_started();
        assert_eq!(process.status(), Status::Running);
        let waiter = tokio::spawn(process.exited());
        process.set_exit(Exit::at_unix_ns(3, 1_500_000_000));
        process.set_exit(Exit::at_unix_ns(9, 0));
        let exit = waiter.await.unwrap();
        assert_eq!((exit.status, exit.at.seconds, exit.at.nanos), (3, 1, 500_000_000));
        assert_eq!(process.status(), Status::Stopped);
        assert_eq!(process.exited().await.status, 3);
    }
}
