//! Where the agent API is served: guest vsock port [`AGENT_VSOCK_PORT`] inside a VM, or a unix
//! socket on the host (`husk-agent --listen unix:PATH`, the test seam). The server runs on a tokio
//! runtime of its own thread, so PID 1's signal loop never waits on it.

use std::path::PathBuf;
use std::sync::Arc;

use std::os::fd::OwnedFd;

use anyhow::{bail, Context, Result};
use husk_protocols::agent_ttrpc::create_agent;
use husk_protocols::{AGENT_VSOCK_PORT, FORWARD_VSOCK_PORT, STDIO_VSOCK_PORT};
use nix::sys::socket::SockFlag;
use tokio::io::unix::AsyncFd;
use tokio::net::UnixStream;
use ttrpc::r#async::transport::Listener;

use crate::host_vsock;
use crate::port_forward;
use crate::stdio::StdioEndpoint;

use super::AgentService;

/// Where to listen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// Any CID, this port (inside a VM).
    Vsock(u32),
    /// A unix socket path (host mode). An existing socket file is replaced.
    Unix(String),
}

impl Endpoint {
    /// The guest's endpoint.
    pub fn guest() -> Endpoint {
        Endpoint::Vsock(AGENT_VSOCK_PORT)
    }

    /// Parses `--listen` values: `unix:PATH` or `vsock:PORT`.
    pub fn parse(text: &str) -> Result<Endpoint> {
        if let Some(path) = text.strip_prefix("unix:") {
            if path.is_empty() {
                bail!("--listen unix:PATH needs a path");
            }
            return Ok(Endpoint::Unix(path.to_owned()));
        }
        if let Some(port) = text.strip_prefix("vsock:") {
            return Ok(Endpoint::Vsock(port.parse().with_context(|| format!("--listen {text}: bad port"))?));
        }
        bail!("--listen {text:?}: expected unix:PATH or vsock:PORT")
    }

    /// Where stdio streams for processes of this endpoint's agent arrive: vsock port
    /// [`STDIO_VSOCK_PORT`], or `<PATH>_1025` beside a unix socket (the name a hybrid vsock gives
    /// a port's socket).
    pub fn stdio(&self) -> StdioEndpoint {
        match self {
            Endpoint::Vsock(_) => StdioEndpoint::Vsock(STDIO_VSOCK_PORT),
            Endpoint::Unix(path) => StdioEndpoint::Unix(PathBuf::from(format!("{path}_{STDIO_VSOCK_PORT}"))),
        }
    }

    fn ttrpc_address(&self) -> String {
        match self {
            Endpoint::Vsock(port) => format!("vsock://-1:{port}"),
            Endpoint::Unix(path) => format!("unix://{path}"),
        }
    }
}

/// A server that is bound and serving.
#[derive(Debug)]
pub struct RunningServer {
    pub endpoint: Endpoint,
    /// The serving thread (it ends only on a fatal error).
    _thread: std::thread::JoinHandle<()>,
}

/// Binds `endpoint` and serves the agent API on a thread of its own; returns once it listens, so
/// a ready report after this call means the API answers.
pub fn start(endpoint: Endpoint, service: AgentService) -> Result<RunningServer> {
    if let Endpoint::Unix(path) = &endpoint {
        // A stale socket from an earlier run would make bind fail.
        let _ = std::fs::remove_file(path);
    }
    let (bound, bound_rx) = std::sync::mpsc::sync_channel::<Result<()>>(1);
    let serving = endpoint.clone();
    let thread = std::thread::Builder::new()
        .name("agent-api".into())
        .spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(runtime) => runtime,
                Err(err) => {
                    let _ = bound.send(Err(err).context("starting the API runtime"));
                    return;
                }
            };
            runtime.block_on(serve(serving, service, bound));
        })
        .context("starting the API thread")?;
    match bound_rx.recv() {
        Ok(Ok(())) => Ok(RunningServer { endpoint, _thread: thread }),
        Ok(Err(err)) => Err(err),
        Err(_) => bail!("the API thread ended before it listened"),
    }
}

async fn serve(endpoint: Endpoint, service: AgentService, bound: std::sync::mpsc::SyncSender<Result<()>>) {
    let services = create_agent(Arc::new(service));
    let server = match &endpoint {
        Endpoint::Vsock(port) => host_listener(*port).map(|l| ttrpc::r#async::Server::new().add_listener(l)),
        Endpoint::Unix(_) => ttrpc::r#async::Server::new()
            .bind(&endpoint.ttrpc_address())
            .map_err(|err| anyhow::anyhow!("binding {}: {err}", endpoint.ttrpc_address())),
    };
    let mut server = match server {
        Ok(server) => server.register_service(services),
        Err(err) => {
            let _ = bound.send(Err(err));
            return;
        }
    };
    if let Err(err) = server.start().await {
        let _ = bound.send(Err(anyhow::anyhow!("serving {}: {err}", endpoint.ttrpc_address())));
        return;
    }
    // In a VM, port forwarding too (a host-mode agent shares the host's loopback: nothing to do).
    if let Endpoint::Vsock(_) = endpoint {
        match listen(FORWARD_VSOCK_PORT) {
            Ok(listener) => drop(tokio::spawn(port_forward::serve(listener))),
            Err(err) => {
                let _ = bound.send(Err(err));
                return;
            }
        }
    }
    let _ = bound.send(Ok(()));
    // `start` spawned the accept loop on this runtime; keep the runtime alive for it.
    std::future::pending::<()>().await;
}

/// The API's vsock listener as ttrpc takes it: connections from the host only ([`host_vsock`]).
fn host_listener(port: u32) -> Result<Listener> {
    let listener = listen(port)?;
    let accepted = futures_util::stream::unfold(listener, |listener| async move {
        let stream = accept_from_host(&listener).await;
        Some((stream, listener))
    });
    Ok(Listener::new(accepted))
}

/// A vsock listener on `port` for this runtime, to take with [`accept_from_host`].
pub(crate) fn listen(port: u32) -> Result<AsyncFd<OwnedFd>> {
    let socket = host_vsock::bind(port, SockFlag::SOCK_NONBLOCK)?;
    // SAFETY: the OwnedFd keeps its descriptor open, and names the same one, for as long as the
    // AsyncFd that owns it lives.
    unsafe { AsyncFd::register(socket) }
        .map_err(std::io::Error::from)
        .with_context(|| format!("registering vsock port {port}"))
}

pub(crate) async fn accept_from_host(listener: &AsyncFd<OwnedFd>) -> std::io::Result<UnixStream> {
    loop {
        let mut ready = listener.readable().await?;
        match ready.try_io(|fd| host_vsock::accept(fd.get_ref(), SockFlag::SOCK_NONBLOCK)) {
            // A connected vsock stream reads, writes and shuts down as a unix stream does; ttrpc
            // only does those.
            Ok(Ok(Some(stream))) => {
                return UnixStream::from_std(std::os::unix::net::UnixStream::from(stream))
            }
            Ok(Ok(None)) | Err(_) => continue, // refused, or not ready after all
            Ok(Err(err)) => return Err(err),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_values_are_parsed_or_named_in_the_error() {
        assert_eq!(Endpoint::parse("unix:/run/a.sock").unwrap(), Endpoint::Unix("/run/a.sock".into()));
        assert_eq!(Endpoint::parse("vsock:1024").unwrap(), Endpoint::Vsock(1024));
        for bad in ["unix:", "vsock:x", "tcp:1", "/run/a.sock"] {
            let err = Endpoint::parse(bad).unwrap_err().to_string();
            assert!(err.contains("--listen"), "{bad}: {err}");
        }
    }
}
