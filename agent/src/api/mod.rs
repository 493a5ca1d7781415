//! The agent API (`husk_protocols::agent_ttrpc::Agent`) as served by husk-agent: the handlers live
//! here, the transports in [`server`]. Calls this agent does not implement yet answer
//! `NOT_FOUND` with the call's name (the generated default), never a made-up result.

pub mod server;

pub(crate) use server::accept_from_host;
use std::sync::{Mutex, PoisonError};

use async_trait::async_trait;
use husk_protocols::agent::{
    CheckRequest, CheckResponse, CloseStdinRequest, ContainerRequest, ContainerStats, CreateContainerRequest,
    CreateSandboxRequest, DestroySandboxRequest, Empty, ExecProcessRequest, GetOOMEventRequest, GuestDetails,
    GuestDetailsRequest, Interface, ListProcessesResponse, OOMEvent, RemoveContainerRequest,
    ResizePtyRequest, Routes, SignalProcessRequest, UpdateContainerRequest, UpdateInterfaceRequest,
    UpdateRoutesRequest, WaitProcessRequest, WaitProcessResponse,
};
use husk_protocols::agent_ttrpc::Agent;
use husk_protocols::AGENT_API_VERSION;
use ttrpc::r#async::TtrpcContext;

use crate::container::{CallError, ContainerPaths, Containers};
use crate::sandbox::{self, Place};
use crate::{guest_info, network};

/// The agent's API handlers.
#[derive(Debug)]
pub struct AgentService {
    place: Place,
    paths: ContainerPaths,
    containers: Containers,
    /// The id CreateSandbox was given (containers need it first).
    sandbox: Mutex<Option<String>>,
}

impl AgentService {
    pub fn new(place: Place, paths: ContainerPaths) -> std::io::Result<AgentService> {
        Ok(AgentService {
            place,
            containers: Containers::new(paths.clone())?,
            paths,
            sandbox: Mutex::new(None),
        })
    }

    fn sandbox(&self) -> std::sync::MutexGuard<'_, Option<String>> {
        self.sandbox.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn require_sandbox(&self) -> Result<(), CallError> {
        match self.sandbox().is_some() {
            true => Ok(()),
            false => Err(CallError::FailedPrecondition("CreateSandbox must come first".into())),
        }
    }
}

/// A ttrpc error status with `code` and `message`.
fn status(code: ttrpc::Code, message: impl Into<String>) -> ttrpc::Error {
    ttrpc::Error::RpcStatus(ttrpc::get_status(code, message.into()))
}

impl From<CallError> for ttrpc::Error {
    fn from(err: CallError) -> ttrpc::Error {
        let code = match err {
            CallError::InvalidArgument(_) => ttrpc::Code::INVALID_ARGUMENT,
            CallError::NotFound(_) => ttrpc::Code::NOT_FOUND,
            CallError::AlreadyExists(_) => ttrpc::Code::ALREADY_EXISTS,
            CallError::FailedPrecondition(_) => ttrpc::Code::FAILED_PRECONDITION,
            CallError::Internal(_) => ttrpc::Code::INTERNAL,
        };
        status(code, err.to_string())
    }
}

fn exit_time_ns(at: std::time::SystemTime) -> i64 {
    at.duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as i64)
}

#[async_trait]
impl Agent for AgentService {
    async fn check(&self, _ctx: &TtrpcContext, req: CheckRequest) -> ttrpc::Result<CheckResponse> {
        if req.api_version != AGENT_API_VERSION {
            return Err(status(
                ttrpc::Code::FAILED_PRECONDITION,
                format!(
                    "api_version: the host speaks agent API {}, this agent speaks {AGENT_API_VERSION}",
                    req.api_version
                ),
            ));
        }
        let uptime_ms =
            guest_info::uptime_ms().map_err(|err| status(ttrpc::Code::INTERNAL, format!("{err:#}")))?;
        Ok(CheckResponse {
            api_version: AGENT_API_VERSION,
            agent_version: env!("CARGO_PKG_VERSION").to_owned(),
            uptime_ms,
            agent_started_us: guest_info::agent_started_us(),
            agent_ready_us: guest_info::agent_ready_us(),
            ..Default::default()
        })
    }

    async fn get_guest_details(
        &self,
        _ctx: &TtrpcContext,
        _req: GuestDetailsRequest,
    ) -> ttrpc::Result<GuestDetails> {
        guest_info::details().map_err(|err| status(ttrpc::Code::INTERNAL, format!("{err:#}")))
    }

    async fn create_sandbox(&self, _ctx: &TtrpcContext, req: CreateSandboxRequest) -> ttrpc::Result<Empty> {
        if let Some(existing) = self.sandbox().as_ref() {
            return Err(
                CallError::AlreadyExists(format!("this guest already runs sandbox {existing}")).into()
            );
        }
        sandbox::create(&req, self.place, &self.paths.shared)?;
        *self.sandbox() = Some(req.sandbox_id);
        Ok(Empty::new())
    }

    async fn destroy_sandbox(
        &self,
        _ctx: &TtrpcContext,
        _req: DestroySandboxRequest,
    ) -> ttrpc::Result<Empty> {
        self.containers.remove_all().await;
        if self.sandbox().take().is_some() && self.place == Place::Guest {
            let _ = nix::mount::umount2(&self.paths.shared, nix::mount::MntFlags::MNT_DETACH);
        }
        Ok(Empty::new())
    }

    async fn create_container(
        &self,
        _ctx: &TtrpcContext,
        req: CreateContainerRequest,
    ) -> ttrpc::Result<Empty> {
        self.require_sandbox()?;
        let stdio = req.stdio.clone().unwrap_or_default();
        self.containers.create(&req.container_id, &req.oci_spec, &stdio, &req.join_namespaces_of).await?;
        Ok(Empty::new())
    }

    async fn start_container(&self, _ctx: &TtrpcContext, req: ContainerRequest) -> ttrpc::Result<Empty> {
        self.containers.start(&req.container_id).await?;
        Ok(Empty::new())
    }

    async fn remove_container(
        &self,
        _ctx: &TtrpcContext,
        req: RemoveContainerRequest,
    ) -> ttrpc::Result<Empty> {
        self.containers.remove(&req.container_id, req.force).await?;
        Ok(Empty::new())
    }

    async fn exec_process(&self, _ctx: &TtrpcContext, req: ExecProcessRequest) -> ttrpc::Result<Empty> {
        let stdio = req.stdio.clone().unwrap_or_default();
        self.containers.exec(&req.container_id, &req.exec_id, &req.process, &stdio).await?;
        Ok(Empty::new())
    }

    async fn signal_process(&self, _ctx: &TtrpcContext, req: SignalProcessRequest) -> ttrpc::Result<Empty> {
        self.containers.signal(&req.container_id, &req.exec_id, req.signal, req.all).await?;
        Ok(Empty::new())
    }

    async fn wait_process(
        &self,
        _ctx: &TtrpcContext,
        req: WaitProcessRequest,
    ) -> ttrpc::Result<WaitProcessResponse> {
        let exit = self.containers.wait(&req.container_id, &req.exec_id).await?;
        Ok(WaitProcessResponse {
            status: exit.status,
            exited_at_unix_ns: exit_time_ns(exit.at),
            ..Default::default()
        })
    }

    async fn list_processes(
        &self,
        _ctx: &TtrpcContext,
        req: ContainerRequest,
    ) -> ttrpc::Result<ListProcessesResponse> {
        let pids = self.containers.pids(&req.container_id)?;
        Ok(ListProcessesResponse { pids, ..Default::default() })
    }

    async fn stats_container(
        &self,
        _ctx: &TtrpcContext,
        req: ContainerRequest,
    ) -> ttrpc::Result<ContainerStats> {
        let s = self.containers.stats(&req.container_id).await?;
        Ok(ContainerStats {
            cpu_usage_usec: s.cpu_usage_usec,
            cpu_user_usec: s.cpu_user_usec,
            cpu_system_usec: s.cpu_system_usec,
            memory_usage_bytes: s.memory_usage_bytes,
            memory_limit_bytes: s.memory_limit_bytes,
            memory_max_usage_bytes: s.memory_max_usage_bytes,
            pids_current: s.pids_current,
            pids_limit: s.pids_limit,
            io_read_bytes: s.io_read_bytes,
            io_write_bytes: s.io_write_bytes,
            oom_kills: s.oom_kills,
            ..Default::default()
        })
    }

    async fn update_container(
        &self,
        _ctx: &TtrpcContext,
        req: UpdateContainerRequest,
    ) -> ttrpc::Result<Empty> {
        self.containers.update(&req.container_id, &req.resources).await?;
        Ok(Empty::new())
    }

    async fn pause_container(&self, _ctx: &TtrpcContext, req: ContainerRequest) -> ttrpc::Result<Empty> {
        self.containers.freeze(&req.container_id, true).await?;
        Ok(Empty::new())
    }

    async fn resume_container(&self, _ctx: &TtrpcContext, req: ContainerRequest) -> ttrpc::Result<Empty> {
        self.containers.freeze(&req.container_id, false).await?;
        Ok(Empty::new())
    }

    async fn get_oom_event(&self, _ctx: &TtrpcContext, _req: GetOOMEventRequest) -> ttrpc::Result<OOMEvent> {
        match self.containers.next_oom().await {
            Some(container_id) => Ok(OOMEvent { container_id, ..Default::default() }),
            None => Err(CallError::Internal("the OOM watcher stopped".into()).into()),
        }
    }

    async fn resize_pty(&self, _ctx: &TtrpcContext, req: ResizePtyRequest) -> ttrpc::Result<Empty> {
        self.containers.resize(&req.container_id, &req.exec_id, req.columns, req.rows)?;
        Ok(Empty::new())
    }

    async fn close_stdin(&self, _ctx: &TtrpcContext, req: CloseStdinRequest) -> ttrpc::Result<Empty> {
        self.containers.close_stdin(&req.container_id, &req.exec_id)?;
        Ok(Empty::new())
    }

    async fn update_interface(
        &self,
        _ctx: &TtrpcContext,
        req: UpdateInterfaceRequest,
    ) -> ttrpc::Result<Interface> {
        Ok(network::update_interface(&req, self.place).await?)
    }

    async fn update_routes(&self, _ctx: &TtrpcContext, req: UpdateRoutesRequest) -> ttrpc::Result<Routes> {
        Ok(network::update_routes(&req, self.place).await?)
    }
}
