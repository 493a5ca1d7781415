//! The host's client of the agent API: reaches husk-agent over the VM's hybrid vsock socket
//! (`CONNECT <port>` / `OK <n>`, then ttrpc) or, in host mode, over a unix socket.
//!
//! Everything the agent sends is untrusted: it is read and decoded only on the client's
//! [`reply_thread`], which holds no capability and runs under a seccomp filter that lets it use
//! the connections it was handed and nothing else; the rest of the shim gets decoded messages.
//! The handshake reply is read byte by byte up to a bounded length (never past its newline, so
//! no ttrpc bytes are swallowed), and every call has a deadline.

mod handshake;
mod reply_thread;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use husk_protocols::agent::{
    CheckRequest, CheckResponse, CloseStdinRequest, ContainerRequest, ContainerStats, CreateContainerRequest,
    CreateSandboxRequest, ExecProcessRequest, GetOOMEventRequest, GuestDetails, GuestDetailsRequest,
    Interface, RemoveContainerRequest, ResizePtyRequest, Route, Routes, SignalProcessRequest, Stdio,
    UpdateContainerRequest, UpdateInterfaceRequest, UpdateRoutesRequest, WaitProcessRequest,
    WaitProcessResponse,
};
use husk_protocols::{
    agent_ttrpc, ForwardRequest, StdioHello, StdioStream, AGENT_API_VERSION, AGENT_VSOCK_PORT,
    FORWARD_VSOCK_PORT, STDIO_VSOCK_PORT,
};
use tokio::io::AsyncWriteExt;
use tokio::net::UnixStream;

use reply_thread::ReplyThread;
pub use reply_thread::REPLY_THREAD_NAME;

/// The generated client's method `$method` as a [`AgentClient::call`] argument: the request is
/// sent, and the reply decoded, on the reply thread.
macro_rules! rpc {
    ($method:ident) => {
        |rpc: agent_ttrpc::AgentClient, ctx, request| async move { rpc.$method(ctx, &request).await }
    };
}

/// Where the agent listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentAddress {
    /// The VM's hybrid vsock socket and the guest port (normally [`AGENT_VSOCK_PORT`]).
    HybridVsock { socket: PathBuf, port: u32 },
    /// A unix socket served by `husk-agent --listen unix:PATH`.
    Unix(PathBuf),
}

impl AgentAddress {
    /// The agent of the VM whose hybrid vsock socket is `socket`.
    pub fn vm(socket: &Path) -> AgentAddress {
        AgentAddress::HybridVsock { socket: socket.to_path_buf(), port: AGENT_VSOCK_PORT }
    }

    /// Where the same agent takes stdio streams: guest port [`STDIO_VSOCK_PORT`], or
    /// `<PATH>_1025` beside a host-mode agent's socket.
    pub fn stdio(&self) -> AgentAddress {
        self.port(STDIO_VSOCK_PORT)
    }

    /// Guest port `port` of the same VM (`<PATH>_<port>` beside a host-mode agent's socket).
    fn port(&self, port: u32) -> AgentAddress {
        match self {
            AgentAddress::HybridVsock { socket, .. } => {
                AgentAddress::HybridVsock { socket: socket.clone(), port }
            }
            AgentAddress::Unix(path) => {
                AgentAddress::Unix(PathBuf::from(format!("{}_{port}", path.display())))
            }
        }
    }
}

impl std::fmt::Display for AgentAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AgentAddress::HybridVsock { socket, port } => {
                write!(f, "vsock port {port} via {}", socket.display())
            }
            AgentAddress::Unix(path) => write!(f, "unix socket {}", path.display()),
        }
    }
}

/// Why a call to the agent failed.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("connecting to the agent at {address}: {source}")]
    Connect { address: AgentAddress, source: std::io::Error },
    #[error("agent at {address}: the VM's vsock refused port {port}: {reply:?}")]
    HandshakeRefused { address: AgentAddress, port: u32, reply: String },
    #[error("agent at {address}: no answer within {timeout:?} ({what})")]
    Timeout { address: AgentAddress, what: &'static str, timeout: Duration },
    #[error("agent at {address}: {call}: {source}")]
    Call { address: AgentAddress, call: &'static str, source: ttrpc::Error },
    /// The agent answered with an error status (its message names the field or id at fault).
    #[error("agent at {address}: {call}: {code:?}: {message}")]
    Refused { address: AgentAddress, call: &'static str, code: ttrpc::Code, message: String },
    #[error("agent at {address} speaks API {agent}, this host speaks {AGENT_API_VERSION}")]
    ApiMismatch { address: AgentAddress, agent: u32 },
    #[error("agent at {address}: the thread reading its replies: {source}")]
    ReplyThread { address: AgentAddress, source: std::io::Error },
}

/// A connection to one agent (clones share it, and its reply thread).
#[derive(Clone)]
pub struct AgentClient {
    address: AgentAddress,
    rpc: agent_ttrpc::AgentClient,
    replies: Arc<ReplyThread>,
    timeout: Duration,
}

impl std::fmt::Debug for AgentClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentClient").field("address", &self.address).field("timeout", &self.timeout).finish()
    }
}

impl AgentClient {
    /// Connects to the agent at `address`; each call (and the connection) must finish within
    /// `timeout`. Must run inside a tokio runtime.
    pub async fn connect(address: AgentAddress, timeout: Duration) -> Result<AgentClient, AgentError> {
        let replies = start_reply_thread(&address).await?;
        AgentClient::connect_with(replies, address, timeout).await
    }

    /// Connects through the reply thread `replies` (the socket is opened here, on a thread that
    /// may open sockets; the thread reads the handshake's reply and then every ttrpc frame).
    async fn connect_with(
        replies: Arc<ReplyThread>,
        address: AgentAddress,
        timeout: Duration,
    ) -> Result<AgentClient, AgentError> {
        let connecting = async {
            let stream = handshake::dial(&address).await?;
            let for_thread = address.clone();
            let rpc = replies
                .run(async move {
                    let stream = handshake::complete(stream, &for_thread).await?;
                    let socket = ttrpc::r#async::transport::Socket::new(stream);
                    Ok(agent_ttrpc::AgentClient::new(ttrpc::r#async::Client::new(socket)))
                })
                .await
                .map_err(reply_thread_error(&address))??;
            Ok(AgentClient { address: address.clone(), rpc, replies: replies.clone(), timeout })
        };
        tokio::time::timeout(timeout, connecting).await.map_err(|_| AgentError::Timeout {
            address: address.clone(),
            what: "connect",
            timeout,
        })?
    }

    /// Connects and checks, retrying while the agent is not up yet (the VM is still booting) until
    /// `wait` runs out; then fails with the last error.
    pub async fn connect_when_ready(
        address: AgentAddress,
        timeout: Duration,
        wait: Duration,
    ) -> Result<(AgentClient, CheckResponse), AgentError> {
        let deadline = tokio::time::Instant::now() + wait;
        let replies = start_reply_thread(&address).await?;
        loop {
            let attempt = async {
                let client = AgentClient::connect_with(replies.clone(), address.clone(), timeout).await?;
                let check = client.check().await?;
                Ok((client, check))
            };
            match attempt.await {
                Ok(ready) => return Ok(ready),
                // Another API version will not change by retrying.
                Err(err @ AgentError::ApiMismatch { .. }) => return Err(err),
                Err(err) if tokio::time::Instant::now() >= deadline => return Err(err),
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    }

    /// Where this client is connected.
    pub fn address(&self) -> &AgentAddress {
        &self.address
    }

    /// The version handshake; fails on an agent that speaks another API version.
    pub async fn check(&self) -> Result<CheckResponse, AgentError> {
        let request = CheckRequest { api_version: AGENT_API_VERSION, ..Default::default() };
        let response = self.call("Check", request, rpc!(check)).await?;
        if response.api_version != AGENT_API_VERSION {
            return Err(AgentError::ApiMismatch {
                address: self.address.clone(),
                agent: response.api_version,
            });
        }
        Ok(response)
    }

    /// The guest's kernel, CPUs, memory, shares and cgroup controllers.
    pub async fn guest_details(&self) -> Result<GuestDetails, AgentError> {
        self.call("GetGuestDetails", GuestDetailsRequest::new(), rpc!(get_guest_details)).await
    }

    /// Sets the guest up for the pod; once per VM, before any container.
    pub async fn create_sandbox(&self, request: &CreateSandboxRequest) -> Result<(), AgentError> {
        self.call("CreateSandbox", request.clone(), rpc!(create_sandbox)).await.map(drop)
    }

    /// Kills the pod's containers and unmounts the share in the guest (the VM is stopped next).
    /// Configures the guest NIC with `interface.hw_addr`; returns it as the guest now has it.
    pub async fn update_interface(&self, interface: &Interface) -> Result<Interface, AgentError> {
        let request =
            UpdateInterfaceRequest { interface: Some(interface.clone()).into(), ..Default::default() };
        self.call("UpdateInterface", request, rpc!(update_interface)).await
    }

    /// Adds `routes` in the guest; returns the routes applied.
    pub async fn update_routes(&self, routes: Vec<Route>) -> Result<Vec<Route>, AgentError> {
        let request = UpdateRoutesRequest {
            routes: Some(Routes { routes, ..Default::default() }).into(),
            ..Default::default()
        };
        Ok(self.call("UpdateRoutes", request, rpc!(update_routes)).await?.routes)
    }

    pub async fn destroy_sandbox(
        &self,
        request: &husk_protocols::agent::DestroySandboxRequest,
    ) -> Result<(), AgentError> {
        self.call("DestroySandbox", request.clone(), rpc!(destroy_sandbox)).await.map(drop)
    }

    /// Creates a container from its OCI spec (JSON); its streams must be opened with
    /// [`AgentClient::open_stdio`] (before or while this call runs).
    pub async fn create_container(
        &self,
        id: &str,
        oci_spec: Vec<u8>,
        stdio: Stdio,
    ) -> Result<(), AgentError> {
        self.create_container_joining(id, oci_spec, stdio, "").await
    }

    /// [`AgentClient::create_container`], the namespaces the spec names by path being those of
    /// container `joins` (the pod's sandbox container).
    pub async fn create_container_joining(
        &self,
        id: &str,
        oci_spec: Vec<u8>,
        stdio: Stdio,
        joins: &str,
    ) -> Result<(), AgentError> {
        let request = CreateContainerRequest {
            container_id: id.to_owned(),
            oci_spec,
            stdio: Some(stdio).into(),
            join_namespaces_of: joins.to_owned(),
            ..Default::default()
        };
        self.call("CreateContainer", request, rpc!(create_container)).await.map(drop)
    }

    pub async fn start_container(&self, id: &str) -> Result<(), AgentError> {
        let request = ContainerRequest { container_id: id.to_owned(), ..Default::default() };
        self.call("StartContainer", request, rpc!(start_container)).await.map(drop)
    }

    /// Runs an OCI `process` (JSON) in a running container as `exec_id`.
    pub async fn exec_process(
        &self,
        id: &str,
        exec_id: &str,
        process: Vec<u8>,
        stdio: Stdio,
    ) -> Result<(), AgentError> {
        let request = ExecProcessRequest {
            container_id: id.to_owned(),
            exec_id: exec_id.to_owned(),
            process,
            stdio: Some(stdio).into(),
            ..Default::default()
        };
        self.call("ExecProcess", request, rpc!(exec_process)).await.map(drop)
    }

    /// Signals the process (`exec_id` "" is the container's init; `all`: every process).
    pub async fn signal_process(
        &self,
        id: &str,
        exec_id: &str,
        signal: u32,
        all: bool,
    ) -> Result<(), AgentError> {
        let request = SignalProcessRequest {
            container_id: id.to_owned(),
            exec_id: exec_id.to_owned(),
            signal,
            all,
            ..Default::default()
        };
        self.call("SignalProcess", request, rpc!(signal_process)).await.map(drop)
    }

    /// Waits for the process to exit, however long that takes (no deadline).
    pub async fn wait_process(&self, id: &str, exec_id: &str) -> Result<WaitProcessResponse, AgentError> {
        let request = WaitProcessRequest {
            container_id: id.to_owned(),
            exec_id: exec_id.to_owned(),
            ..Default::default()
        };
        self.wait("WaitProcess", request, rpc!(wait_process)).await
    }

    /// Guest pids of the container's processes that still run.
    pub async fn list_processes(&self, id: &str) -> Result<Vec<u32>, AgentError> {
        let request = ContainerRequest { container_id: id.to_owned(), ..Default::default() };
        self.call("ListProcesses", request, rpc!(list_processes)).await.map(|r| r.pids)
    }

    /// The container's cgroup figures (CPU, memory, pids, I/O, OOM kills).
    pub async fn stats_container(&self, id: &str) -> Result<ContainerStats, AgentError> {
        let request = ContainerRequest { container_id: id.to_owned(), ..Default::default() };
        self.call("StatsContainer", request, rpc!(stats_container)).await
    }

    /// Applies an OCI `linux.resources` object (JSON) to the container.
    pub async fn update_container(&self, id: &str, resources: Vec<u8>) -> Result<(), AgentError> {
        let request = UpdateContainerRequest { container_id: id.to_owned(), resources, ..Default::default() };
        self.call("UpdateContainer", request, rpc!(update_container)).await.map(drop)
    }

    pub async fn pause_container(&self, id: &str) -> Result<(), AgentError> {
        let request = ContainerRequest { container_id: id.to_owned(), ..Default::default() };
        self.call("PauseContainer", request, rpc!(pause_container)).await.map(drop)
    }

    pub async fn resume_container(&self, id: &str) -> Result<(), AgentError> {
        let request = ContainerRequest { container_id: id.to_owned(), ..Default::default() };
        self.call("ResumeContainer", request, rpc!(resume_container)).await.map(drop)
    }

    /// Waits (no deadline) for the next container of the pod to have a process OOM-killed.
    pub async fn next_oom_event(&self) -> Result<String, AgentError> {
        self.wait("GetOOMEvent", GetOOMEventRequest::new(), rpc!(get_oom_event))
            .await
            .map(|event| event.container_id)
    }

    /// Sets the window size of the process's terminal.
    pub async fn resize_pty(
        &self,
        id: &str,
        exec_id: &str,
        columns: u32,
        rows: u32,
    ) -> Result<(), AgentError> {
        let request = ResizePtyRequest {
            container_id: id.to_owned(),
            exec_id: exec_id.to_owned(),
            columns,
            rows,
            ..Default::default()
        };
        self.call("ResizePty", request, rpc!(resize_pty)).await.map(drop)
    }

    pub async fn close_stdin(&self, id: &str, exec_id: &str) -> Result<(), AgentError> {
        let request = CloseStdinRequest {
            container_id: id.to_owned(),
            exec_id: exec_id.to_owned(),
            ..Default::default()
        };
        self.call("CloseStdin", request, rpc!(close_stdin)).await.map(drop)
    }

    /// Removes a container (with `force`, kills it first).
    pub async fn remove_container(&self, id: &str, force: bool) -> Result<(), AgentError> {
        let request = RemoveContainerRequest { container_id: id.to_owned(), force, ..Default::default() };
        self.call("RemoveContainer", request, rpc!(remove_container)).await.map(drop)
    }

    /// Opens one standard stream of a process to be created with `token`.
    pub async fn open_stdio(&self, token: &str, stream: StdioStream) -> Result<UnixStream, AgentError> {
        let hello = StdioHello { token: token.to_owned(), stream }.render();
        self.open_stream(self.address.stdio(), "stdio connect", &hello).await
    }

    /// Opens a stream to TCP port `request.port` of the guest's loopback (port forwarding).
    pub async fn open_forward(&self, request: ForwardRequest) -> Result<UnixStream, AgentError> {
        self.open_stream(self.address.port(FORWARD_VSOCK_PORT), "port-forward connect", &request.render())
            .await
    }

    /// A stream to `address`, opened within this client's deadline and named with `first_line`.
    async fn open_stream(
        &self,
        address: AgentAddress,
        what: &'static str,
        first_line: &str,
    ) -> Result<UnixStream, AgentError> {
        let opening = handshake::open_patiently(&self.replies, &address);
        let mut connection = tokio::time::timeout(self.timeout, opening)
            .await
            .map_err(|_| AgentError::Timeout { address: address.clone(), what, timeout: self.timeout })??;
        connection
            .write_all(first_line.as_bytes())
            .await
            .map_err(|source| AgentError::Connect { address: address.clone(), source })?;
        Ok(connection)
    }

    fn context(&self) -> ttrpc::context::Context {
        ttrpc::context::with_timeout(self.timeout.as_nanos().try_into().unwrap_or(i64::MAX))
    }

    /// Runs one call on the reply thread (`send` makes its future there: see [`rpc!`]) with this
    /// client's deadline, enforced here too: a guest that stops reading must not hang the host.
    async fn call<Request, Response, Reply>(
        &self,
        call: &'static str,
        request: Request,
        send: impl FnOnce(agent_ttrpc::AgentClient, ttrpc::context::Context, Request) -> Reply,
    ) -> Result<Response, AgentError>
    where
        Request: Send + 'static,
        Response: Send + 'static,
        Reply: Future<Output = ttrpc::Result<Response>> + Send + 'static,
    {
        let reply = self.replies.run(send(self.rpc.clone(), self.context(), request));
        match tokio::time::timeout(self.timeout, reply).await {
            Ok(outcome) => self.outcome(call, outcome),
            Err(_) => {
                Err(AgentError::Timeout { address: self.address.clone(), what: call, timeout: self.timeout })
            }
        }
    }

    /// [`AgentClient::call`] without a deadline, for calls that last as long as what they wait
    /// for (a process's exit, the next OOM kill).
    async fn wait<Request, Response, Reply>(
        &self,
        call: &'static str,
        request: Request,
        send: impl FnOnce(agent_ttrpc::AgentClient, ttrpc::context::Context, Request) -> Reply,
    ) -> Result<Response, AgentError>
    where
        Request: Send + 'static,
        Response: Send + 'static,
        Reply: Future<Output = ttrpc::Result<Response>> + Send + 'static,
    {
        let outcome =
            self.replies.run(send(self.rpc.clone(), ttrpc::context::with_timeout(0), request)).await;
        self.outcome(call, outcome)
    }

    fn outcome<Response>(
        &self,
        call: &'static str,
        outcome: std::io::Result<ttrpc::Result<Response>>,
    ) -> Result<Response, AgentError> {
        let address = self.address.clone();
        match outcome {
            Ok(Ok(response)) => Ok(response),
            Ok(Err(ttrpc::Error::RpcStatus(status))) => Err(AgentError::Refused {
                address,
                call,
                code: status.code.enum_value_or_default(),
                message: status.message,
            }),
            Ok(Err(source)) => Err(AgentError::Call { address, call, source }),
            Err(source) => Err(AgentError::ReplyThread { address, source }),
        }
    }
}

async fn start_reply_thread(address: &AgentAddress) -> Result<Arc<ReplyThread>, AgentError> {
    ReplyThread::start().await.map(Arc::new).map_err(reply_thread_error(address))
}

/// An error of the reply thread serving the agent at `address`.
fn reply_thread_error(address: &AgentAddress) -> impl Fn(std::io::Error) -> AgentError + '_ {
    move |source| AgentError::ReplyThread { address: address.clone(), source }
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncReadExt;

    use super::handshake::MAX_HANDSHAKE_REPLY;
    use super::*;

    #[tokio::test(flavor = "current_thread")]
    async fn a_silent_vsock_peer_times_out_with_the_address_in_the_error() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("vsock.sock");
        let _listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
        let err =
            AgentClient::connect(AgentAddress::vm(&socket), Duration::from_millis(200)).await.unwrap_err();
        let text = err.to_string();
        assert!(matches!(err, AgentError::Timeout { .. }), "{text}");
        assert!(text.contains("vsock.sock") && text.contains("connect"), "{text}");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_refused_port_is_reported_with_the_reply() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("vsock.sock");
        let listener = tokio::net::UnixListener::bind(&socket).unwrap();
        tokio::spawn(async move {
            let (mut peer, _) = listener.accept().await.unwrap();
            let mut request = [0u8; 13];
            peer.read_exact(&mut request).await.unwrap();
            assert_eq!(&request, b"CONNECT 1024\n");
            peer.write_all(b"no listener on that port, and a very long reply after it\n").await.unwrap();
        });
        let err = AgentClient::connect(AgentAddress::vm(&socket), Duration::from_secs(5)).await.unwrap_err();
        let AgentError::HandshakeRefused { reply, .. } = &err else { panic!("{err}") };
        assert_eq!(reply.len(), MAX_HANDSHAKE_REPLY, "the reply is cut at the bound");
    }
}
