//! Start: the init process (`runc start`, or the restore of a container created from a
//! checkpoint, `crate::restore`) or an exec process (`runc exec`).

use std::sync::Arc;

use containerd_shim::{
    api::{StartRequest, StartResponse},
    protos::events::task::{TaskExecStarted, TaskStart},
};
use runc::options::ExecOpts;

use crate::{
    container::{Container, ProcStatus},
    error::{Result, ShimError},
    events::send,
    stdio::PendingStdio,
    task::{read_pid, TaskService},
};

impl TaskService {
    /// Start the init process (`runc start`, or restore) or an exec process (`runc exec`).
    pub async fn task_start(&self, req: StartRequest) -> Result<StartResponse> {
        let mut c = self.container(&req.id).await?;
        let since = std::time::Instant::now();
        let pid = if req.exec_id.is_empty() {
            c.init.require(&req.id, "start", &[ProcStatus::Created])?;
            if let Some(plan) = c.restore.clone() {
                self.restore(&mut c, &plan).await?;
                self.watch_oom(&req.id, c.init.pid);
            } else {
                c.runc.start(&req.id).await?;
                c.init.status = ProcStatus::Running;
            }
            let pid = c.init.pid;
            // Containers that live long keep their node's store swept (crate::retention).
            self.inner.sweeper.watch(&c.cfg.store);
            send(
                self.events(),
                TaskStart {
                    container_id: req.id.clone(),
                    pid,
                    ..Default::default()
                },
            );
            if let Some((code, at)) = self.claim_pid(&req.id, "", pid, since) {
                self.mark_exited(&req.id, &mut c.init, code, at);
            }
            pid
        } else {
            self.start_exec(&mut c, &req.exec_id).await?
        };
        Ok(StartResponse {
            pid,
            ..Default::default()
        })
    }

    async fn start_exec(&self, c: &mut Container, exec_id: &str) -> Result<u32> {
        let since = std::time::Instant::now();
        c.init.refuse(&c.id, "exec in", &[ProcStatus::Stopped])?;
        let id = c.id.clone();
        let runc = c.runc.clone();
        let bundle = c.bundle.clone();
        let p = c
            .execs
            .get_mut(exec_id)
            .ok_or_else(|| ShimError::ProcessNotFound {
                id: id.clone(),
                exec_id: exec_id.to_owned(),
            })?;
        p.require(&id, "start exec of", &[ProcStatus::Created])?;
        let spec_json = p.spec.clone().unwrap_or_default();
        let spec: oci_spec::runtime::Process = serde_json::from_value(spec_json)
            .map_err(|e| ShimError::InvalidArgument(format!("exec spec of {id}/{exec_id}: {e}")))?;
        let pid_file = bundle.join(format!("{exec_id}.pid"));
        let mut eopts = ExecOpts::new().pid_file(&pid_file).detach(true);
        let mut pending = PendingStdio::new(p)?;
        if let Some(path) = pending.console_path() {
            eopts = eopts.console_socket(&path);
        }
        if let Some(cs) = pending.take_pipes() {
            eopts = eopts.io(Arc::new(cs));
        }
        let console = pending.receive();
        if let Err(e) = runc.exec(&id, &spec, &eopts).await {
            if let Some(c) = console {
                c.abort();
            }
            return Err(e);
        }
        p.pid = read_pid(&pid_file)?;
        p.status = ProcStatus::Running;
        if let Some(c) = console {
            c.finish(p, &format!("{id}/{exec_id}")).await?;
        }
        let pid = p.pid;
        send(
            self.events(),
            TaskExecStarted {
                container_id: id.clone(),
                exec_id: exec_id.to_owned(),
                pid,
                ..Default::default()
            },
        );
        if let Some((code, at)) = self.claim_pid(&id, exec_id, pid, since) {
            self.mark_exited(&id, p, code, at);
        }
        Ok(pid)
    }
}
