//! `kubectl port-forward` inside the guest. The shim catches connections to the pod's loopback
//! in its network namespace on the node and opens one vsock stream per connection to
//! [`FORWARD_VSOCK_PORT`], naming the port with a [`ForwardRequest`] line; the agent connects to
//! that port on the guest's loopback (the pod's containers share the guest's network namespace)
//! and copies bytes both ways. A port nobody listens on closes the stream, which the shim passes
//! on as a closed connection, as a refused connect looks to containerd under runc.

use std::os::fd::OwnedFd;
use std::time::Duration;

use husk_protocols::{ForwardRequest, FORWARD_VSOCK_PORT};
use tokio::io::unix::AsyncFd;
use tokio::io::AsyncReadExt;
use tokio::net::{TcpStream, UnixStream};

use crate::api::accept_from_host;

/// How long the host has to name the port, and the guest's listener to accept.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Forwards every connection the host opens, each on a task of its own.
pub async fn serve(listener: AsyncFd<OwnedFd>) {
    loop {
        match accept_from_host(&listener).await {
            Ok(stream) => drop(tokio::spawn(forward(stream))),
            Err(err) => {
                eprintln!("husk-agent: port forwarding: accepting on vsock port {FORWARD_VSOCK_PORT}: {err}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn forward(mut host: UnixStream) {
    let Ok(Some(request)) = tokio::time::timeout(REQUEST_TIMEOUT, read_request(&mut host)).await else {
        return;
    };
    let connected = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(request.target())).await;
    let Ok(Ok(mut target)) = connected else { return };
    // Either side's end (or error) ends the forward; both streams close when dropped.
    let _ = tokio::io::copy_bidirectional(&mut host, &mut target).await;
}

/// Reads the request line byte by byte: what follows it is the connection's data.
async fn read_request(stream: &mut UnixStream) -> Option<ForwardRequest> {
    let mut line = Vec::with_capacity(ForwardRequest::MAX_LEN);
    while line.len() < ForwardRequest::MAX_LEN {
        let byte = stream.read_u8().await.ok()?;
        if byte == b'\n' {
            return ForwardRequest::parse(std::str::from_utf8(&line).ok()?);
        }
        line.push(byte);
    }
    None
}
