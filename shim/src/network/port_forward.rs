//! `kubectl port-forward` for a pod whose processes run in a VM. containerd's CRI plugin forwards
//! a port by connecting to `localhost:PORT` inside the pod's network namespace on the node
//! (IPv4, then IPv6); there nothing listens, the pod's sockets are in the guest. So the shim
//! listens there: one socket per family on the namespace's loopback, given every loopback
//! connection of any port by [`LoopbackCatcher`], and each connection it accepts is carried over
//! vsock to the agent, which connects to the same port on the guest's loopback. Only the node's
//! own processes in that namespace (containerd) can reach these sockets: the pod's traffic goes
//! to the guest, never through the namespace's loopback.

use std::fs::File;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener as StdTcpListener};
use std::os::fd::AsFd;
use std::path::Path;
use std::sync::Arc;

use husk_protocols::ForwardRequest;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use super::loopback::LoopbackCatcher;
use super::{netns, NetworkError};
use crate::agent_client::{AgentClient, AgentError};

/// Forwarded connections open at once; more are closed as they arrive.
pub const MAX_FORWARDED_CONNECTIONS: usize = 256;

/// A pod's port forwarding; stops (detaching the program, closing its sockets and every
/// forwarded connection) when dropped.
#[derive(Debug)]
pub struct PortForwarder {
    accepting: tokio::task::AbortHandle,
    _catcher: LoopbackCatcher,
}

impl Drop for PortForwarder {
    fn drop(&mut self) {
        self.accepting.abort(); // its JoinSet of connections goes with it
    }
}

impl PortForwarder {
    /// Starts forwarding the loopback of the namespace at `netns` to the guest of `agent`.
    pub async fn start(
        netns: &Path,
        agent: AgentClient,
        sandbox: &str,
    ) -> Result<PortForwarder, NetworkError> {
        let (v4, v6) = netns::run_in(netns, |_| async { bind_loopback() }).await?;
        let namespace = File::open(netns)
            .map_err(|source| NetworkError::OpenNetns { netns: netns.to_owned(), source })?;
        let catcher = LoopbackCatcher::attach(&namespace, v4.as_fd(), v6.as_ref().map(|v6| v6.as_fd()))
            .map_err(|source| NetworkError::Io {
                what: "catching the pod namespace's loopback connections",
                source,
            })?;
        let v6 = v6.map(listener).transpose()?;
        let accepting = tokio::spawn(accept(listener(v4)?, v6, agent, sandbox.to_owned())).abort_handle();
        Ok(PortForwarder { accepting, _catcher: catcher })
    }
}

/// Sockets on the namespace's loopback (run inside it). IPv6 is left out where the namespace
/// has none (`disable_ipv6`): then no connection to `::1` can be made there either.
fn bind_loopback() -> Result<(StdTcpListener, Option<StdTcpListener>), NetworkError> {
    let bind = |ip: std::net::IpAddr| StdTcpListener::bind(SocketAddr::new(ip, 0));
    let v4 = bind(Ipv4Addr::LOCALHOST.into())
        .map_err(|source| NetworkError::Io { what: "listening on 127.0.0.1 in the pod namespace", source })?;
    Ok((v4, bind(Ipv6Addr::LOCALHOST.into()).ok()))
}

fn listener(socket: StdTcpListener) -> Result<TcpListener, NetworkError> {
    let io = |source| NetworkError::Io { what: "serving a port-forward listener", source };
    socket.set_nonblocking(true).map_err(io)?;
    TcpListener::from_std(socket).map_err(io)
}

async fn accept(v4: TcpListener, v6: Option<TcpListener>, agent: AgentClient, sandbox: String) {
    let slots = Arc::new(Semaphore::new(MAX_FORWARDED_CONNECTIONS));
    let mut connections = JoinSet::new();
    loop {
        let accepted = tokio::select! {
            accepted = v4.accept() => accepted,
            accepted = accept_if_any(v6.as_ref()) => accepted,
        };
        while connections.try_join_next().is_some() {}
        let stream = match accepted {
            Ok((stream, _)) => stream,
            // Descriptors or memory short for a moment: the next one may do.
            Err(_) => {
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::warn!(
                sandbox,
                limit = MAX_FORWARDED_CONNECTIONS,
                "port-forward: too many connections; closing one"
            );
            continue;
        };
        let agent = agent.clone();
        let sandbox = sandbox.clone();
        connections.spawn(async move {
            if let Err(err) = forward(stream, &agent).await {
                tracing::info!(sandbox, %err, "port-forward: connection ended");
            }
            drop(slot);
        });
    }
}

/// The next connection of `listener`; never, without one.
async fn accept_if_any(listener: Option<&TcpListener>) -> std::io::Result<(TcpStream, SocketAddr)> {
    match listener {
        Some(listener) => listener.accept().await,
        None => std::future::pending().await,
    }
}

#[derive(Debug, thiserror::Error)]
enum ForwardError {
    #[error("to guest port {port}: {source}")]
    Agent { port: u16, source: AgentError },
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// Carries one accepted connection to the same port of the guest's loopback.
async fn forward(mut stream: TcpStream, agent: &AgentClient) -> Result<(), ForwardError> {
    let wanted = stream.local_addr()?;
    let request = ForwardRequest { ipv6: wanted.is_ipv6(), port: wanted.port() };
    let mut guest = agent
        .open_forward(request)
        .await
        .map_err(|source| ForwardError::Agent { port: request.port, source })?;
    tokio::io::copy_bidirectional(&mut stream, &mut guest).await?;
    Ok(())
}
