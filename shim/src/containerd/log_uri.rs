//! Log URIs: instead of FIFOs a client (`ctr run --log-uri`, nerdctl, docker) may name where a
//! process's output goes, as containerd's shims understand it:
//! - `file:///path`: stdout and stderr appended to one file;
//! - `binary:///path?key=value`: a logging program started for the process with stdout on fd 3,
//!   stderr on fd 4 and a pipe on fd 5 it closes once ready, `CONTAINER_ID` and
//!   `CONTAINER_NAMESPACE` in its environment and each query pair as arguments (`key value`).

use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::error::ShimError;

/// How long a logging program may take to say it is ready (close fd 5).
const LOGGER_READY_TIMEOUT: Duration = Duration::from_secs(10);

/// Where a process's output goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OutputTarget {
    /// A FIFO path (or nothing): the shim crate's copies.
    Fifo,
    File(PathBuf),
    Binary {
        path: PathBuf,
        args: Vec<String>,
    },
}

impl OutputTarget {
    /// Parses `uri` (the request's `stdout`); `stream` names the field in errors.
    pub fn parse(stream: &str, uri: &str) -> Result<OutputTarget, ShimError> {
        let Some((scheme, rest)) = uri.split_once("://") else { return Ok(OutputTarget::Fifo) };
        let invalid = |why: &str| ShimError::InvalidArgument(format!("{stream}: {uri:?}: {why}"));
        let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
        if !path.starts_with('/') {
            return Err(invalid("the path must be absolute"));
        }
        match scheme {
            "file" if query.is_empty() => Ok(OutputTarget::File(PathBuf::from(path))),
            "file" => Err(invalid("file:// takes no query")),
            "binary" => {
                let args = query
                    .split('&')
                    .filter(|pair| !pair.is_empty())
                    .flat_map(|pair| match pair.split_once('=') {
                        Some((key, value)) if !value.is_empty() => vec![key.to_owned(), value.to_owned()],
                        Some((key, _)) => vec![key.to_owned()],
                        None => vec![pair.to_owned()],
                    })
                    .collect();
                Ok(OutputTarget::Binary { path: PathBuf::from(path), args })
            }
            other => Err(invalid(&format!("unknown scheme {other}:// (use a FIFO, file:// or binary://)"))),
        }
    }
}

/// A logging program of one process; killed and reaped on drop if it still runs.
#[derive(Debug)]
pub struct Logger {
    child: Child,
}

impl Drop for Logger {
    fn drop(&mut self) {
        // It normally ends by itself when its fds 3 and 4 reach EOF; give it a moment.
        for _ in 0..20 {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The write ends of a logger's stdout and stderr pipes, and the logger.
pub type LoggerPipes = (std::fs::File, std::fs::File, Logger);

/// Starts the logging program `path` for container `id` of `namespace`; returns once it is ready.
pub async fn start_logger(
    path: &PathBuf,
    args: &[String],
    id: &str,
    namespace: &str,
) -> Result<LoggerPipes, ShimError> {
    let fail = |what: &str, err: &dyn std::fmt::Display| {
        ShimError::InvalidArgument(format!("logging program {}: {what}: {err}", path.display()))
    };
    // Close-on-exec, so the logger holds only fds 3-5 (its own write ends would keep it waiting).
    let pipe = || nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| fail("pipe", &e));
    let ((out_read, out_write), (err_read, err_write), (ready_read, ready_write)) =
        (pipe()?, pipe()?, pipe()?);
    let mut command = Command::new(path);
    command
        .args(args)
        .env("CONTAINER_ID", id)
        .env("CONTAINER_NAMESPACE", namespace)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let fds = [out_read.as_raw_fd(), err_read.as_raw_fd(), ready_write.as_raw_fd()];
    // SAFETY: between fork and exec the closure only calls fcntl and dup2 (async-signal-safe) on
    // fds this process owns and keeps open until spawn returns, and allocates nothing. The fds
    // are first moved above 9 (close-on-exec) so no dup2 overwrites one still to be placed.
    unsafe {
        command.pre_exec(move || {
            let mut high = [0; 3];
            for (slot, fd) in high.iter_mut().zip(fds) {
                *slot = libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 10);
                if *slot < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            for (target, fd) in (3..).zip(high) {
                if libc::dup2(fd, target) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let child = command.spawn().map_err(|e| fail("starting it", &e))?;
    let logger = Logger { child };
    drop((out_read, err_read, ready_write, command));
    wait_ready(ready_read).await.map_err(|why| fail("readiness", &why))?;
    Ok((std::fs::File::from(out_write), std::fs::File::from(err_write), logger))
}

/// Waits until every writer of the ready pipe has closed it (the logger is set up).
async fn wait_ready(ready: OwnedFd) -> Result<(), String> {
    let wait = tokio::task::spawn_blocking(move || {
        let mut file = std::fs::File::from(ready);
        let mut byte = [0u8; 1];
        loop {
            match std::io::Read::read(&mut file, &mut byte) {
                Ok(0) => return Ok(()),
                Ok(_) => continue,
                Err(err) if err.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(err) => return Err(err.to_string()),
            }
        }
    });
    match tokio::time::timeout(LOGGER_READY_TIMEOUT, wait).await {
        Ok(Ok(result)) => result,
        Ok(Err(join)) => Err(join.to_string()),
        Err(_) => Err(format!("fd 5 not closed within {LOGGER_READY_TIMEOUT:?}")),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn uris_parse_as_containerd_writes_them() {
        assert_eq!(OutputTarget::parse("stdout", "/run/fifo/1-stdout").unwrap(), OutputTarget::Fifo);
        assert_eq!(OutputTarget::parse("stdout", "").unwrap(), OutputTarget::Fifo);
        assert_eq!(
            OutputTarget::parse("stdout", "file:///var/log/c1.log").unwrap(),
            OutputTarget::File("/var/log/c1.log".into())
        );
        assert_eq!(
            OutputTarget::parse("stdout", "binary:///usr/bin/logger?tag=c1&verbose").unwrap(),
            OutputTarget::Binary {
                path: "/usr/bin/logger".into(),
                args: vec!["tag".into(), "c1".into(), "verbose".into()]
            }
        );
        for bad in ["tcp://host:1", "file://relative/x", "file:///x?y=1"] {
            let err = OutputTarget::parse("stdout", bad).unwrap_err().to_string();
            assert!(err.starts_with("stdout: ") && err.contains(bad), "{err}");
        }
    }

    #[tokio::test]
    async fn a_logger_gets_both_streams_after_it_said_ready() {
        let dir = tempfile::tempdir().unwrap();
        let script = dir.path().join("logger");
        let out = dir.path().join("out");
        let text = format!("#!/bin/sh\nexec 5>&-\ncat <&3 > {0}.1 & cat <&4 > {0}.2; wait\n", out.display());
        std::fs::write(&script, text).unwrap();
        std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        let (mut stdout, mut stderr, logger) = start_logger(&script, &[], "c1", "default").await.unwrap();
        std::io::Write::write_all(&mut stdout, b"to-out\n").unwrap();
        std::io::Write::write_all(&mut stderr, b"to-err\n").unwrap();
        drop((stdout, stderr, logger));
        assert_eq!(std::fs::read_to_string(format!("{}.1", out.display())).unwrap(), "to-out\n");
        assert_eq!(std::fs::read_to_string(format!("{}.2", out.display())).unwrap(), "to-err\n");
    }
}
