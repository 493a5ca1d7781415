//! One process of a container as containerd sees it (the init process, or an exec): its stdio
//! (containerd's FIFOs joined to the agent's vsock streams), its status and its exit, which Wait,
//! State and Delete read.

use std::sync::Arc;

use containerd_shim::asynchronous::io::{IoTasks, Stdio};
use containerd_shim_protos::protobuf::well_known_types::timestamp::Timestamp;
use husk_protocols::agent;
use husk_protocols::StdioStream;
use tokio::sync::watch;

use super::error::ShimError;
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

    /// Opens the agent streams this process's stdio asks for, joins them to containerd's FIFOs
    /// and returns what to tell the agent. `token` names the streams (unique in the pod).
    pub async fn attach_stdio(&self, client: &AgentClient, token: &str) -> Result<agent::Stdio, ShimError> {
        let stdio = &self.stdio;
        for (name, uri) in [("stdin", &stdio.stdin), ("stdout", &stdio.stdout), ("stderr", &stdio.stderr)] {
            check_fifo_uri(name, uri)?;
        }
        let want_stderr = !stdio.stderr.is_empty() && !stdio.terminal;
        if !stdio.stdin.is_empty() {
            let stream = client.open_stdio(token, StdioStream::Stdin).await?;
            self.io
                .copy_from_fifo(&stdio.stdin, stream)
                .map_err(|e| ShimError::io("stdin", &stdio.stdin, e))?;
        }
        if !stdio.stdout.is_empty() {
            let stream = client.open_stdio(token, StdioStream::Stdout).await?;
            self.io
                .copy_to_fifo(stream, &stdio.stdout)
                .map_err(|e| ShimError::io("stdout", &stdio.stdout, e))?;
        }
        if want_stderr {
            let stream = client.open_stdio(token, StdioStream::Stderr).await?;
            self.io
                .copy_to_fifo(stream, &stdio.stderr)
                .map_err(|e| ShimError::io("stderr", &stdio.stderr, e))?;
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

fn record_exit(slot: &watch::Sender<Option<Exit>>, exit: Exit) {
    slot.send_if_modified(|current| current.is_none() && current.replace(exit).is_none());
}

/// containerd hands FIFO paths, or log URIs (`binary://`, `file://`) when a client asked for
/// them; Husk joins FIFOs (CRI and `ctr` use them).
fn check_fifo_uri(stream: &'static str, uri: &str) -> Result<(), ShimError> {
    match uri.split_once("://") {
        Some((scheme, _)) => Err(ShimError::InvalidArgument(format!(
            "{stream}: {uri:?}: {scheme}:// log URIs are not supported by Husk; give a FIFO path"
        ))),
        None => Ok(()),
    }
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

    #[test]
    fn log_uris_are_refused_by_stream_name() {
        let err = check_fifo_uri("stdout", "binary:///usr/bin/logger?x=1").unwrap_err().to_string();
        assert!(err.contains("stdout") && err.contains("binary://"), "{err}");
        check_fifo_uri("stdin", "/run/containerd/fifo/1/c-stdin").unwrap();
    }
}
