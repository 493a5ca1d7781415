//! Standard streams of container processes. The host opens one stream per stdin, stdout and
//! stderr to [`STDIO_VSOCK_PORT`] (host mode: the unix socket `<API socket>_1025`) and names it
//! with a [`StdioHello`] line; the request that creates the process claims its streams by token.
//! The process gets the stream sockets themselves as its fds 0, 1 and 2: its output goes to the
//! host without a copy through the agent.

use std::collections::HashMap;
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::{Condvar, Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use husk_protocols::agent::Stdio;
use husk_protocols::{valid_stdio_token, StdioHello, StdioStream};
use nix::sys::socket::{self, SockFlag};

use crate::host_vsock;

/// How long a request waits for the streams it names to arrive.
const CLAIM_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a peer may take to send its hello line.
const HELLO_TIMEOUT: Duration = Duration::from_secs(5);
/// Streams nobody claims within this time are closed.
const UNCLAIMED_TTL: Duration = Duration::from_secs(60);

/// Where stdio streams arrive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StdioEndpoint {
    Vsock(u32),
    Unix(PathBuf),
}

/// Why a process's streams cannot be had.
#[derive(Debug, thiserror::Error)]
pub enum StdioError {
    #[error("stdio.token {0:?}: expected 1 to 64 characters of [A-Za-z0-9_.-]")]
    BadToken(String),
    #[error("stdio: the host did not open the {stream} stream of token {token:?} in time")]
    Missing { token: String, stream: &'static str },
}

/// A process's claimed streams (`None`: the process gets /dev/null).
#[derive(Debug, Default)]
pub struct ProcessStdio {
    pub stdin: Option<OwnedFd>,
    pub stdout: Option<OwnedFd>,
    pub stderr: Option<OwnedFd>,
}

/// Streams that arrived and are not claimed yet.
#[derive(Debug, Default)]
pub struct StdioBroker {
    arrived: Mutex<HashMap<(String, StdioStream), (OwnedFd, Instant)>>,
    changed: Condvar,
}

impl StdioBroker {
    /// The agent's broker.
    pub fn global() -> &'static StdioBroker {
        static BROKER: OnceLock<StdioBroker> = OnceLock::new();
        BROKER.get_or_init(StdioBroker::default)
    }

    /// Listens on `endpoint` and accepts streams on a thread of its own.
    pub fn listen(&'static self, endpoint: &StdioEndpoint) -> Result<()> {
        let listener = Listener::bind(endpoint)?;
        std::thread::Builder::new()
            .name("agent-stdio".into())
            .spawn(move || loop {
                match listener.accept() {
                    // The hello is read on a thread per stream: a silent peer delays nobody.
                    Ok(stream) => {
                        let _ = std::thread::Builder::new()
                            .name("agent-stdio-hello".into())
                            .spawn(move || self.receive(stream));
                    }
                    Err(err) => eprintln!("husk-agent: accepting a stdio stream: {err}"),
                }
            })
            .context("starting the stdio thread")?;
        Ok(())
    }

    fn receive(&self, stream: OwnedFd) {
        let Some(hello) = read_hello(&stream) else { return };
        let mut arrived = self.arrived.lock().unwrap_or_else(PoisonError::into_inner);
        arrived.retain(|_, (_, at)| at.elapsed() < UNCLAIMED_TTL);
        arrived.insert((hello.token, hello.stream), (stream, Instant::now()));
        self.changed.notify_all();
    }

    /// Takes the streams `stdio` names, waiting for them to arrive.
    pub fn claim(&self, stdio: &Stdio) -> Result<ProcessStdio, StdioError> {
        self.claim_within(stdio, CLAIM_TIMEOUT)
    }

    fn claim_within(&self, stdio: &Stdio, timeout: Duration) -> Result<ProcessStdio, StdioError> {
        let wanted = [
            (stdio.stdin, StdioStream::Stdin),
            (stdio.stdout, StdioStream::Stdout),
            (stdio.stderr && !stdio.terminal, StdioStream::Stderr),
        ];
        if !wanted.iter().any(|(want, _)| *want) {
            return Ok(ProcessStdio::default());
        }
        if !valid_stdio_token(&stdio.token) {
            return Err(StdioError::BadToken(stdio.token.clone()));
        }
        let deadline = Instant::now() + timeout;
        let mut arrived = self.arrived.lock().unwrap_or_else(PoisonError::into_inner);
        loop {
            let missing = wanted
                .iter()
                .find(|(want, stream)| *want && !arrived.contains_key(&(stdio.token.clone(), *stream)));
            let Some((_, stream)) = missing else { break };
            let now = Instant::now();
            if now >= deadline {
                return Err(StdioError::Missing { token: stdio.token.clone(), stream: stream.name() });
            }
            arrived =
                self.changed.wait_timeout(arrived, deadline - now).unwrap_or_else(PoisonError::into_inner).0;
        }
        let mut take = |want: bool, stream| {
            want.then(|| arrived.remove(&(stdio.token.clone(), stream)).map(|(fd, _)| fd)).flatten()
        };
        Ok(ProcessStdio {
            stdin: take(wanted[0].0, StdioStream::Stdin),
            stdout: take(wanted[1].0, StdioStream::Stdout),
            stderr: take(wanted[2].0, StdioStream::Stderr),
        })
    }
}

/// Reads the hello line byte by byte (nothing after it may be consumed: it is the stream's data).
fn read_hello(stream: &OwnedFd) -> Option<StdioHello> {
    let timeout = nix::sys::time::TimeVal::new(HELLO_TIMEOUT.as_secs() as i64, 0);
    socket::setsockopt(stream, socket::sockopt::ReceiveTimeout, &timeout).ok()?;
    // SAFETY: a second owner of the descriptor for the duration of the read; ManuallyDrop keeps
    // it from being closed twice.
    let mut file = std::mem::ManuallyDrop::new(unsafe { std::fs::File::from_raw_fd(stream.as_raw_fd()) });
    let mut line = Vec::with_capacity(StdioHello::MAX_LEN);
    let mut byte = [0u8; 1];
    while line.len() < StdioHello::MAX_LEN {
        if file.read(&mut byte).ok()? == 0 {
            return None;
        }
        if byte[0] == b'\n' {
            let hello = StdioHello::parse(std::str::from_utf8(&line).ok()?);
            let no_timeout = nix::sys::time::TimeVal::new(0, 0);
            socket::setsockopt(stream, socket::sockopt::ReceiveTimeout, &no_timeout).ok()?;
            return hello;
        }
        line.push(byte[0]);
    }
    None
}

enum Listener {
    Unix(UnixListener),
    Vsock(OwnedFd),
}

impl Listener {
    fn bind(endpoint: &StdioEndpoint) -> Result<Listener> {
        match endpoint {
            StdioEndpoint::Unix(path) => {
                let _ = std::fs::remove_file(path);
                let listener = UnixListener::bind(path)
                    .with_context(|| format!("binding stdio socket {}", path.display()))?;
                Ok(Listener::Unix(listener))
            }
            StdioEndpoint::Vsock(port) => Ok(Listener::Vsock(host_vsock::bind(*port, SockFlag::empty())?)),
        }
    }

    /// The next stream; on vsock, the next from the host (see [`host_vsock`]).
    fn accept(&self) -> std::io::Result<OwnedFd> {
        match self {
            Listener::Unix(listener) => listener.accept().map(|(stream, _)| stream.into()),
            Listener::Vsock(fd) => loop {
                if let Some(stream) = host_vsock::accept(fd, SockFlag::empty())? {
                    return Ok(stream);
                }
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::os::unix::net::UnixStream;

    use super::*;

    fn open(path: &std::path::Path, hello: &[u8]) -> UnixStream {
        let mut stream = UnixStream::connect(path).unwrap();
        stream.write_all(hello).unwrap();
        stream
    }

    fn broker(dir: &std::path::Path) -> (&'static StdioBroker, PathBuf) {
        let broker: &'static StdioBroker = Box::leak(Box::default());
        let path = dir.join("stdio.sock");
        broker.listen(&StdioEndpoint::Unix(path.clone())).unwrap();
        (broker, path)
    }

    #[test]
    fn streams_are_matched_by_token_and_keep_the_bytes_after_the_hello() {
        let dir = tempfile::tempdir().unwrap();
        let (broker, path) = broker(dir.path());
        let _other = open(&path, b"other stdout\n");
        let _early = open(&path, b"tok-1 stdout\npayload-after-hello");
        let stdio = Stdio { token: "tok-1".into(), stdin: true, stdout: true, ..Default::default() };
        let late = std::thread::spawn(move || open(&path, b"tok-1 stdin\n"));
        let streams = broker.claim_within(&stdio, Duration::from_secs(10)).unwrap();
        let _late = late.join().unwrap();
        assert!(streams.stdin.is_some() && streams.stderr.is_none());
        let mut stdout = std::fs::File::from(streams.stdout.unwrap());
        let mut data = [0u8; 19];
        stdout.read_exact(&mut data).unwrap();
        assert_eq!(&data, b"payload-after-hello", "nothing after the newline was consumed");
    }

    #[test]
    fn a_missing_stream_and_a_bad_hello_are_named_errors_not_matches() {
        let dir = tempfile::tempdir().unwrap();
        let (broker, path) = broker(dir.path());
        let _bad = open(&path, b"tok-2 stdwhat\n");
        let _oversized = open(&path, &[b'x'; 200]);
        let stdio = Stdio { token: "tok-2".into(), stdout: true, ..Default::default() };
        let err = broker.claim_within(&stdio, Duration::from_millis(300)).unwrap_err();
        assert!(matches!(err, StdioError::Missing { stream: "stdout", .. }), "{err}");
        let bad_token = Stdio { token: "no spaces allowed".into(), stdout: true, ..Default::default() };
        assert!(matches!(broker.claim(&bad_token), Err(StdioError::BadToken(_))));
        assert!(
            broker.claim(&Stdio::default()).unwrap().stdout.is_none(),
            "no streams asked, none waited for"
        );
    }
}
