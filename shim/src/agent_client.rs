//! The host's client of the agent API: reaches husk-agent over the VM's hybrid vsock socket
//! (`CONNECT <port>` / `OK <n>`, then ttrpc) or, in host mode, over a unix socket.
//!
//! Everything the agent sends is untrusted: the handshake reply is read byte by byte up to a bounded
//! length (never past its newline, so no ttrpc bytes are swallowed), and every call has a deadline.

use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::time::Duration;

use husk_protocols::agent::{
    CheckRequest, CheckResponse, CloseStdinRequest, ContainerRequest, ContainerStats, CreateContainerRequest,
    CreateSandboxRequest, ExecProcessRequest, GetOOMEventRequest, GuestDetails, GuestDetailsRequest,
    Interface, RemoveContainerRequest, ResizePtyRequest, Route, Routes, SignalProcessRequest, Stdio,
    UpdateContainerRequest, UpdateInterfaceRequest, UpdateRoutesRequest, WaitProcessRequest,
    WaitProcessResponse,
};
use husk_protocols::{
    agent_ttrpc, StdioHello, StdioStream, AGENT_API_VERSION, AGENT_VSOCK_PORT, STDIO_VSOCK_PORT,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

/// Longest hybrid vsock reply line accepted (`OK 4294967295\n` is 14 bytes).
const MAX_HANDSHAKE_REPLY: usize = 32;
/// How often a hybrid vsock `CONNECT` the VMM closed unanswered is tried: a guest starved of CPU
/// (many VMs on few cores) may miss the VMM's connect deadline while its agent listens.
const HANDSHAKE_ATTEMPTS: u32 = 5;
const HANDSHAKE_RETRY_PAUSE: Duration = Duration::from_millis(100);

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
        match self {
            AgentAddress::HybridVsock { socket, .. } => {
                AgentAddress::HybridVsock { socket: socket.clone(), port: STDIO_VSOCK_PORT }
            }
            AgentAddress::Unix(path) => {
                AgentAddress::Unix(PathBuf::from(format!("{}_{STDIO_VSOCK_PORT}", path.display())))
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
}

/// A connection to one agent (clones share it).
#[derive(Clone)]
pub struct AgentClient {
    address: AgentAddress,
    rpc: agent_ttrpc::AgentClient,
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
        let stream = tokio::time::timeout(timeout, open_stream(&address))
            .await
            .map_err(|_| AgentError::Timeout { address: address.clone(), what: "connect", timeout })??;
        let socket = ttrpc::r#async::transport::Socket::new(stream);
        let rpc = agent_ttrpc::AgentClient::new(ttrpc::r#async::Client::new(socket));
        Ok(AgentClient { address, rpc, timeout })
    }

    /// Connects and checks, retrying while the agent is not up yet (the VM is still booting) until
    /// `wait` runs out; then fails with the last error.
    pub async fn connect_when_ready(
        address: AgentAddress,
        timeout: Duration,
        wait: Duration,
    ) -> Result<(AgentClient, CheckResponse), AgentError> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let attempt = async {
                let client = AgentClient::connect(address.clone(), timeout).await?;
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
        let response = self.call("Check", self.rpc.check(self.context(), &request)).await?;
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
        self.call("GetGuestDetails", self.rpc.get_guest_details(self.context(), &GuestDetailsRequest::new()))
            .await
    }

    /// Sets the guest up for the pod; once per VM, before any container.
    pub async fn create_sandbox(&self, request: &CreateSandboxRequest) -> Result<(), AgentError> {
        self.call("CreateSandbox", self.rpc.create_sandbox(self.context(), request)).await.map(drop)
    }

    /// Kills the pod's containers and unmounts the share in the guest (the VM is stopped next).
    /// Configures the guest NIC with `interface.hw_addr`; returns it as the guest now has it.
    pub async fn update_interface(&self, interface: &Interface) -> Result<Interface, AgentError> {
        let request =
            UpdateInterfaceRequest { interface: Some(interface.clone()).into(), ..Default::default() };
        self.call("UpdateInterface", self.rpc.update_interface(self.context(), &request)).await
    }

    /// Adds `routes` in the guest; returns the routes applied.
    pub async fn update_routes(&self, routes: Vec<Route>) -> Result<Vec<Route>, AgentError> {
        let request = UpdateRoutesRequest {
            routes: Some(Routes { routes, ..Default::default() }).into(),
            ..Default::default()
        };
        Ok(self.call("UpdateRoutes", self.rpc.update_routes(self.context(), &request)).await?.routes)
    }

    pub async fn destroy_sandbox(
        &self,
        request: &husk_protocols::agent::DestroySandboxRequest,
    ) -> Result<(), AgentError> {
        self.call("DestroySandbox", self.rpc.destroy_sandbox(self.context(), request)).await.map(drop)
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
        self.call("CreateContainer", self.rpc.create_container(self.context(), &request)).await.map(drop)
    }

    pub async fn start_container(&self, id: &str) -> Result<(), AgentError> {
        let request = ContainerRequest { container_id: id.to_owned(), ..Default::default() };
        self.call("StartContainer", self.rpc.start_container(self.context(), &request)).await.map(drop)
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
        self.call("ExecProcess", self.rpc.exec_process(self.context(), &request)).await.map(drop)
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
        self.call("SignalProcess", self.rpc.signal_process(self.context(), &request)).await.map(drop)
    }

    /// Waits for the process to exit, however long that takes (no deadline).
    pub async fn wait_process(&self, id: &str, exec_id: &str) -> Result<WaitProcessResponse, AgentError> {
        let request = WaitProcessRequest {
            container_id: id.to_owned(),
            exec_id: exec_id.to_owned(),
            ..Default::default()
        };
        self.rpc
            .wait_process(ttrpc::context::with_timeout(0), &request)
            .await
            .map_err(|source| self.call_error("WaitProcess", source))
    }

    /// Guest pids of the container's processes that still run.
    pub async fn list_processes(&self, id: &str) -> Result<Vec<u32>, AgentError> {
        let request = ContainerRequest { container_id: id.to_owned(), ..Default::default() };
        self.call("ListProcesses", self.rpc.list_processes(self.context(), &request)).await.map(|r| r.pids)
    }

    /// The container's cgroup figures (CPU, memory, pids, I/O, OOM kills).
    pub async fn stats_container(&self, id: &str) -> Result<ContainerStats, AgentError> {
        let request = ContainerRequest { container_id: id.to_owned(), ..Default::default() };
        self.call("StatsContainer", self.rpc.stats_container(self.context(), &request)).await
    }

    /// Applies an OCI `linux.resources` object (JSON) to the container.
    pub async fn update_container(&self, id: &str, resources: Vec<u8>) -> Result<(), AgentError> {
        let request = UpdateContainerRequest { container_id: id.to_owned(), resources, ..Default::default() };
        self.call("UpdateContainer", self.rpc.update_container(self.context(), &request)).await.map(drop)
    }

    pub async fn pause_container(&self, id: &str) -> Result<(), AgentError> {
        let request = ContainerRequest { container_id: id.to_owned(), ..Default::default() };
        self.call("PauseContainer", self.rpc.pause_container(self.context(), &request)).await.map(drop)
    }

    pub async fn resume_container(&self, id: &str) -> Result<(), AgentError> {
        let request = ContainerRequest { container_id: id.to_owned(), ..Default::default() };
        self.call("ResumeContainer", self.rpc.resume_container(self.context(), &request)).await.map(drop)
    }

    /// Waits (no deadline) for the next container of the pod to have a process OOM-killed.
    pub async fn next_oom_event(&self) -> Result<String, AgentError> {
        self.rpc
            .get_oom_event(ttrpc::context::with_timeout(0), &GetOOMEventRequest::new())
            .await
            .map(|event| event.container_id)
            .map_err(|source| self.call_error("GetOOMEvent", source))
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
        self.call("ResizePty", self.rpc.resize_pty(self.context(), &request)).await.map(drop)
    }

    pub async fn close_stdin(&self, id: &str, exec_id: &str) -> Result<(), AgentError> {
        let request = CloseStdinRequest {
            container_id: id.to_owned(),
            exec_id: exec_id.to_owned(),
            ..Default::default()
        };
        self.call("CloseStdin", self.rpc.close_stdin(self.context(), &request)).await.map(drop)
    }

    /// Removes a container (with `force`, kills it first).
    pub async fn remove_container(&self, id: &str, force: bool) -> Result<(), AgentError> {
        let request = RemoveContainerRequest { container_id: id.to_owned(), force, ..Default::default() };
        self.call("RemoveContainer", self.rpc.remove_container(self.context(), &request)).await.map(drop)
    }

    /// Opens one standard stream of a process to be created with `token`.
    pub async fn open_stdio(&self, token: &str, stream: StdioStream) -> Result<UnixStream, AgentError> {
        let address = self.address.stdio();
        let mut connection =
            tokio::time::timeout(self.timeout, open_stream_patiently(&address)).await.map_err(|_| {
                AgentError::Timeout { address: address.clone(), what: "stdio connect", timeout: self.timeout }
            })??;
        let hello = StdioHello { token: token.to_owned(), stream }.render();
        connection
            .write_all(hello.as_bytes())
            .await
            .map_err(|source| AgentError::Connect { address: address.clone(), source })?;
        Ok(connection)
    }

    fn context(&self) -> ttrpc::context::Context {
        ttrpc::context::with_timeout(self.timeout.as_nanos().try_into().unwrap_or(i64::MAX))
    }

    fn call_error(&self, call: &'static str, source: ttrpc::Error) -> AgentError {
        let address = self.address.clone();
        match source {
            ttrpc::Error::RpcStatus(status) => AgentError::Refused {
                address,
                call,
                code: status.code.enum_value_or_default(),
                message: status.message,
            },
            source => AgentError::Call { address, call, source },
        }
    }

    /// Runs one call with this client's deadline (enforced here too: a guest that stops reading
    /// must not hang the host).
    async fn call<T>(
        &self,
        call: &'static str,
        request: impl std::future::Future<Output = ttrpc::Result<T>>,
    ) -> Result<T, AgentError> {
        match tokio::time::timeout(self.timeout, request).await {
            Ok(Ok(response)) => Ok(response),
            Ok(Err(source)) => Err(self.call_error(call, source)),
            Err(_) => {
                Err(AgentError::Timeout { address: self.address.clone(), what: call, timeout: self.timeout })
            }
        }
    }
}

/// A byte stream to the agent: the unix socket itself, or the VM's vsock socket after the hybrid
/// handshake.
async fn open_stream(address: &AgentAddress) -> Result<UnixStream, AgentError> {
    let connect_error = |source| AgentError::Connect { address: address.clone(), source };
    match address {
        AgentAddress::Unix(path) => UnixStream::connect(path).await.map_err(connect_error),
        AgentAddress::HybridVsock { socket, port } => {
            let mut stream = UnixStream::connect(socket).await.map_err(connect_error)?;
            stream.write_all(format!("CONNECT {port}\n").as_bytes()).await.map_err(connect_error)?;
            let reply = read_reply_line(&mut stream).await.map_err(connect_error)?;
            if !is_ok_reply(&reply) {
                return Err(AgentError::HandshakeRefused { address: address.clone(), port: *port, reply });
            }
            Ok(stream)
        }
    }
}

/// [`open_stream`], tried again while the VMM closes the `CONNECT` unanswered (it does when the
/// guest reset the connection or did not answer it in time), at most [`HANDSHAKE_ATTEMPTS`] times. (The agent's own connection needs no such retry: it is opened
/// by [`AgentClient::connect_when_ready`], which retries any failure.)
async fn open_stream_patiently(address: &AgentAddress) -> Result<UnixStream, AgentError> {
    let mut attempt = 1;
    loop {
        match open_stream(address).await {
            Err(AgentError::Connect { source, .. })
                if source.kind() == ErrorKind::UnexpectedEof && attempt < HANDSHAKE_ATTEMPTS =>
            {
                attempt += 1;
                tokio::time::sleep(HANDSHAKE_RETRY_PAUSE).await;
            }
            done => return done,
        }
    }
}

/// Reads one line (without its newline), at most [`MAX_HANDSHAKE_REPLY`] bytes, not a byte more.
async fn read_reply_line(stream: &mut UnixStream) -> std::io::Result<String> {
    let mut line = Vec::with_capacity(MAX_HANDSHAKE_REPLY);
    loop {
        let byte = stream.read_u8().await?;
        if byte == b'\n' {
            break;
        }
        line.push(byte);
        if line.len() >= MAX_HANDSHAKE_REPLY {
            break;
        }
    }
    Ok(String::from_utf8_lossy(&line).into_owned())
}

/// `OK <host port>`, as the VMM answers an accepted `CONNECT`.
fn is_ok_reply(line: &str) -> bool {
    line.strip_prefix("OK ").is_some_and(|port| port.parse::<u32>().is_ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_well_formed_ok_line_accepts_the_handshake() {
        assert!(is_ok_reply("OK 1073741824"));
        for bad in ["", "OK", "OK ", "OK x", "ERR 1", "ok 1", "OK 1 2"] {
            assert!(!is_ok_reply(bad), "{bad:?}");
        }
    }

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

    /// A fake VMM that closes the first `unanswered` connections after their `CONNECT` line (as
    /// for a guest that missed the connect deadline) and accepts the rest; returns its count of
    /// connections.
    fn vmm_closing_first(socket: &Path, unanswered: u32) -> tokio::task::JoinHandle<u32> {
        let listener = tokio::net::UnixListener::bind(socket).unwrap();
        tokio::spawn(async move {
            let mut seen = 0;
            while let Ok(Ok((mut peer, _))) =
                tokio::time::timeout(Duration::from_secs(2), listener.accept()).await
            {
                seen += 1;
                let mut request = [0u8; 13];
                peer.read_exact(&mut request).await.unwrap();
                if seen > unanswered {
                    peer.write_all(b"OK 1073741824\n").await.unwrap();
                    return seen;
                }
            }
            seen
        })
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_connect_the_vmm_closed_unanswered_is_tried_again() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("vsock.sock");
        let vmm = vmm_closing_first(&socket, 2);
        open_stream_patiently(&AgentAddress::vm(&socket)).await.unwrap();
        assert_eq!(vmm.await.unwrap(), 3);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_port_that_is_always_closed_fails_after_the_attempts_naming_the_address() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("vsock.sock");
        let vmm = vmm_closing_first(&socket, u32::MAX);
        let err = open_stream_patiently(&AgentAddress::vm(&socket)).await.unwrap_err();
        let text = err.to_string();
        assert!(matches!(err, AgentError::Connect { .. }) && text.contains("vsock port 1024"), "{text}");
        assert_eq!(vmm.await.unwrap(), HANDSHAKE_ATTEMPTS);
    }
}
