//! The ttrpc `Task` service: each RPC forwards to its `task_<verb>` method and converts the
//! error, so the logic is testable without ttrpc.

use async_trait::async_trait;
use containerd_shim::{
    api::{
        CheckpointTaskRequest, CloseIORequest, ConnectRequest, ConnectResponse, CreateTaskRequest,
        CreateTaskResponse, DeleteRequest, DeleteResponse, Empty, ExecProcessRequest, KillRequest,
        PauseRequest, PidsRequest, PidsResponse, ResizePtyRequest, ResumeRequest, ShutdownRequest,
        StartRequest, StartResponse, StateRequest, StateResponse, StatsRequest, StatsResponse,
        UpdateTaskRequest, WaitRequest, WaitResponse,
    },
    Task, TtrpcContext, TtrpcResult,
};

use log::info;

use crate::task::TaskService;

#[async_trait]
impl Task for TaskService {
    async fn state(&self, _: &TtrpcContext, req: StateRequest) -> TtrpcResult<StateResponse> {
        Ok(self.task_state(req).await?)
    }
    async fn create(
        &self,
        _: &TtrpcContext,
        req: CreateTaskRequest,
    ) -> TtrpcResult<CreateTaskResponse> {
        info!("create {} checkpoint={:?}", req.id, req.checkpoint);
        Ok(self.task_create(req).await?)
    }
    async fn start(&self, _: &TtrpcContext, req: StartRequest) -> TtrpcResult<StartResponse> {
        Ok(self.task_start(req).await?)
    }
    async fn delete(&self, _: &TtrpcContext, req: DeleteRequest) -> TtrpcResult<DeleteResponse> {
        Ok(self.task_delete(req).await?)
    }
    async fn pids(&self, _: &TtrpcContext, req: PidsRequest) -> TtrpcResult<PidsResponse> {
        Ok(self.task_pids(req).await?)
    }
    async fn pause(&self, _: &TtrpcContext, req: PauseRequest) -> TtrpcResult<Empty> {
        self.task_pause(req).await?;
        Ok(Empty::new())
    }
    async fn resume(&self, _: &TtrpcContext, req: ResumeRequest) -> TtrpcResult<Empty> {
        self.task_resume(req).await?;
        Ok(Empty::new())
    }
    async fn checkpoint(&self, _: &TtrpcContext, req: CheckpointTaskRequest) -> TtrpcResult<Empty> {
        self.task_checkpoint(req).await?;
        Ok(Empty::new())
    }
    async fn kill(&self, _: &TtrpcContext, req: KillRequest) -> TtrpcResult<Empty> {
        self.task_kill(req).await?;
        Ok(Empty::new())
    }
    async fn exec(&self, _: &TtrpcContext, req: ExecProcessRequest) -> TtrpcResult<Empty> {
        self.task_exec(req).await?;
        Ok(Empty::new())
    }
    async fn resize_pty(&self, _: &TtrpcContext, req: ResizePtyRequest) -> TtrpcResult<Empty> {
        self.task_resize_pty(req).await?;
        Ok(Empty::new())
    }
    async fn close_io(&self, _: &TtrpcContext, req: CloseIORequest) -> TtrpcResult<Empty> {
        self.task_close_io(req).await?;
        Ok(Empty::new())
    }
    async fn update(&self, _: &TtrpcContext, req: UpdateTaskRequest) -> TtrpcResult<Empty> {
        self.task_update(req).await?;
        Ok(Empty::new())
    }
    async fn wait(&self, _: &TtrpcContext, req: WaitRequest) -> TtrpcResult<WaitResponse> {
        Ok(self.task_wait(req).await?)
    }
    async fn stats(&self, _: &TtrpcContext, req: StatsRequest) -> TtrpcResult<StatsResponse> {
        Ok(self.task_stats(req).await?)
    }
    async fn connect(&self, _: &TtrpcContext, req: ConnectRequest) -> TtrpcResult<ConnectResponse> {
        Ok(self.task_connect(req).await?)
    }
    async fn shutdown(&self, _: &TtrpcContext, req: ShutdownRequest) -> TtrpcResult<Empty> {
        self.task_shutdown(req).await?;
        Ok(Empty::new())
    }
}
