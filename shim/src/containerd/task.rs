//! The containerd task service (task API v3) over a [`Pod`]: each call is translated into the
//! pod's method and its error into a ttrpc status. Checkpoint and restore are not offered
//! (NotImplemented, the trait's default).

use std::sync::Arc;

use async_trait::async_trait;
use containerd_shim::{api, Task, TtrpcContext, TtrpcResult};
use containerd_shim_protos::protobuf::well_known_types::empty::Empty;

use super::pod::Pod;

/// See the module documentation.
#[derive(Debug, Clone)]
pub struct TaskService {
    pod: Arc<Pod>,
}

impl TaskService {
    pub fn new(pod: Arc<Pod>) -> TaskService {
        TaskService { pod }
    }
}

#[async_trait]
impl Task for TaskService {
    async fn create(
        &self,
        _: &TtrpcContext,
        req: api::CreateTaskRequest,
    ) -> TtrpcResult<api::CreateTaskResponse> {
        tracing::info!(container = %req.id, bundle = %req.bundle, "create");
        let pid = self
            .pod
            .create(&req)
            .await
            .inspect_err(|err| tracing::error!(container = %req.id, %err, "create failed"))?;
        Ok(api::CreateTaskResponse { pid, ..Default::default() })
    }

    async fn start(&self, _: &TtrpcContext, req: api::StartRequest) -> TtrpcResult<api::StartResponse> {
        tracing::info!(container = %req.id, exec = %req.exec_id, "start");
        let pid = self.pod.start(&req.id, &req.exec_id).await?;
        Ok(api::StartResponse { pid, ..Default::default() })
    }

    async fn exec(&self, _: &TtrpcContext, req: api::ExecProcessRequest) -> TtrpcResult<Empty> {
        tracing::info!(container = %req.id, exec = %req.exec_id, "exec");
        self.pod.exec(&req).await?;
        Ok(Empty::new())
    }

    async fn kill(&self, _: &TtrpcContext, req: api::KillRequest) -> TtrpcResult<Empty> {
        tracing::info!(container = %req.id, exec = %req.exec_id, signal = req.signal, all = req.all, "kill");
        self.pod.kill(&req).await?;
        Ok(Empty::new())
    }

    async fn wait(&self, _: &TtrpcContext, req: api::WaitRequest) -> TtrpcResult<api::WaitResponse> {
        let exit = self.pod.wait(&req.id, &req.exec_id).await?;
        Ok(api::WaitResponse {
            exit_status: exit.status,
            exited_at: Some(exit.at).into(),
            ..Default::default()
        })
    }

    async fn delete(&self, _: &TtrpcContext, req: api::DeleteRequest) -> TtrpcResult<api::DeleteResponse> {
        tracing::info!(container = %req.id, exec = %req.exec_id, "delete");
        Ok(self.pod.delete(&req.id, &req.exec_id).await?)
    }

    async fn state(&self, _: &TtrpcContext, req: api::StateRequest) -> TtrpcResult<api::StateResponse> {
        Ok(self.pod.state(&req.id, &req.exec_id).await?)
    }

    async fn pids(&self, _: &TtrpcContext, req: api::PidsRequest) -> TtrpcResult<api::PidsResponse> {
        let pids = self.pod.pids(&req.id).await?;
        let processes = pids
            .into_iter()
            .map(|pid| containerd_shim_protos::api::ProcessInfo { pid, ..Default::default() })
            .collect();
        Ok(api::PidsResponse { processes, ..Default::default() })
    }

    async fn resize_pty(&self, _: &TtrpcContext, req: api::ResizePtyRequest) -> TtrpcResult<Empty> {
        self.pod.resize_pty(&req).await?;
        Ok(Empty::new())
    }

    async fn close_io(&self, _: &TtrpcContext, req: api::CloseIORequest) -> TtrpcResult<Empty> {
        self.pod.close_io(&req).await?;
        Ok(Empty::new())
    }

    async fn update(&self, _: &TtrpcContext, req: api::UpdateTaskRequest) -> TtrpcResult<Empty> {
        tracing::info!(container = %req.id, "update");
        self.pod.update(&req).await?;
        Ok(Empty::new())
    }

    async fn stats(&self, _: &TtrpcContext, req: api::StatsRequest) -> TtrpcResult<api::StatsResponse> {
        Ok(self.pod.stats(&req.id).await?)
    }

    async fn pause(&self, _: &TtrpcContext, req: api::PauseRequest) -> TtrpcResult<Empty> {
        tracing::info!(container = %req.id, "pause");
        self.pod.pause(&req.id, true).await?;
        Ok(Empty::new())
    }

    async fn resume(&self, _: &TtrpcContext, req: api::ResumeRequest) -> TtrpcResult<Empty> {
        tracing::info!(container = %req.id, "resume");
        self.pod.pause(&req.id, false).await?;
        Ok(Empty::new())
    }

    async fn connect(
        &self,
        _: &TtrpcContext,
        _req: api::ConnectRequest,
    ) -> TtrpcResult<api::ConnectResponse> {
        Ok(api::ConnectResponse {
            shim_pid: self.pod.pid(),
            task_pid: self.pod.pid(),
            version: format!("husk {}", env!("CARGO_PKG_VERSION")),
            ..Default::default()
        })
    }

    async fn shutdown(&self, _: &TtrpcContext, req: api::ShutdownRequest) -> TtrpcResult<Empty> {
        tracing::info!(now = req.now, "shutdown");
        self.pod.shutdown().await;
        Ok(Empty::new())
    }
}
