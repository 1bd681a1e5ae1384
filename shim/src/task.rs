//! The containerd Task service (task API v2): the containers of one shim and the lifecycle
//! RPCs.
//!
//! [`TaskService`] holds the containers; each RPC's logic is a `task_<verb>` method returning
//! [`ShimError`] (`crate::rpc` is the ttrpc adapter that forwards to them). The heavy verbs
//! have their own files: `crate::restore` (Start of a container created from a checkpoint),
//! `crate::checkpoint`; exits are `crate::exits`, events `crate::events`, the stdio handed to
//! runc `crate::stdio`.
//!
//! Locking: each container has its own lock, held for the whole of one of its RPCs (a restore
//! or a checkpoint's upload included); the map of containers is locked only to look a
//! container up, and exits are routed by pid without it (`crate::exits::ExitRouting`), so in a
//! grouped shim (a Kubernetes pod) a long checkpoint of one member never delays its siblings'
//! RPCs or exits.

use std::{
    collections::HashMap,
    path::Path,
    sync::{Arc, Mutex as StdMutex},
    time::Duration,
};

use containerd_shim::{
    api::{
        CloseIORequest, ConnectRequest, ConnectResponse, DeleteRequest, DeleteResponse,
        ExecProcessRequest, KillRequest, PauseRequest, PidsRequest, PidsResponse, ResizePtyRequest,
        ResumeRequest, ShutdownRequest, StateRequest, StateResponse, StatsRequest, StatsResponse,
        UpdateTaskRequest, WaitRequest, WaitResponse,
    },
    protos::{
        events::task::{TaskDelete, TaskExecAdded, TaskPaused, TaskResumed},
        protobuf::MessageField,
        shim::oci::ProcessDetails,
        types::task::ProcessInfo,
    },
    util::convert_to_any,
    ExitSignal,
};
use log::warn;
use runc::options::{DeleteOpts, KillOpts};
use tokio::sync::{Mutex, OwnedMappedMutexGuard, OwnedMutexGuard};

use crate::{
    container::{Container, ProcStatus, Process},
    error::{Result, ShimError},
    events::{now, send, EventSink},
    exits::ExitRouting,
    io::StdioPaths,
    lazy::LazyBackend,
};

/// How long TaskExit waits for a process's output to drain.
pub(crate) const IO_DRAIN_LIMIT: Duration = Duration::from_secs(2);
/// How long Delete waits for a lazy restore's fetcher to wind down.
const LAZY_FINISH_LIMIT: Duration = Duration::from_secs(3);

/// A container's slot in the map: `None` while its Create runs (the creator holds the lock)
/// and once it is deleted, for callers that were waiting on it.
pub(crate) type Slot = Arc<Mutex<Option<Container>>>;

/// A locked container. Each container has its own lock, held for as long as one of its RPCs
/// runs (a restore or a checkpoint's upload included); the map of containers is only locked
/// to look a slot up, so the siblings of a grouped shim never wait for each other.
type ContainerGuard = OwnedMappedMutexGuard<Option<Container>, Container>;

pub(crate) struct Inner {
    pub(crate) namespace: String,
    pub(crate) containers: StdMutex<HashMap<String, Slot>>,
    pub(crate) exits: StdMutex<ExitRouting>,
    pub(crate) events: Arc<dyn EventSink>,
    pub(crate) exit: Arc<ExitSignal>,
    pub(crate) lazy: Arc<dyn LazyBackend>,
    /// Retention of the node-local stores this process checkpoints into.
    pub(crate) sweeper: Arc<crate::retention::Sweeper>,
}

/// The task service of one shim.
#[derive(Clone)]
pub struct TaskService {
    pub(crate) inner: Arc<Inner>,
}

impl TaskService {
    /// A service publishing to `events`; call [`TaskService::watch_exits`] before any runc runs.
    /// `containerd` is containerd's API socket (the shim's `-address`), which the store's
    /// retention asks which checkpoints its images hold.
    pub fn new(
        namespace: &str,
        containerd: &str,
        events: Arc<dyn EventSink>,
        exit: Arc<ExitSignal>,
        lazy: Arc<dyn LazyBackend>,
    ) -> Self {
        TaskService {
            inner: Arc::new(Inner {
                namespace: namespace.to_owned(),
                containers: StdMutex::new(HashMap::new()),
                exits: StdMutex::new(ExitRouting::default()),
                events,
                exit,
                lazy,
                sweeper: Arc::new(crate::retention::Sweeper::new(
                    containerd,
                    Arc::new(crate::retention::Containerd),
                )),
            }),
        }
    }

    /// The slot of container `id`, if it is known.
    pub(crate) fn slot(&self, id: &str) -> Option<Slot> {
        self.inner
            .containers
            .lock()
            .expect("containers lock")
            .get(id)
            .cloned()
    }

    /// Container `id`, locked for the caller; waits while another RPC of the same container
    /// runs, never for another container.
    pub(crate) async fn container(&self, id: &str) -> Result<ContainerGuard> {
        let slot = self
            .slot(id)
            .ok_or_else(|| ShimError::NotFound(id.to_owned()))?;
        OwnedMutexGuard::try_map(slot.lock_owned().await, Option::as_mut)
            .map_err(|_| ShimError::NotFound(id.to_owned()))
    }

    pub(crate) fn watch_oom(&self, id: &str, pid: u32) {
        if let Err(e) = crate::oom::watch(id.to_owned(), pid, self.inner.events.clone()) {
            warn!("no oom events for {id}: {e}");
        }
    }

    pub(crate) fn events(&self) -> &dyn EventSink {
        self.inner.events.as_ref()
    }

    // ---- RPC logic ----

    /// State of a process.
    pub async fn task_state(&self, req: StateRequest) -> Result<StateResponse> {
        let c = self.container(&req.id).await?;
        let p = c.get_process(&req.exec_id)?;
        Ok(StateResponse {
            id: req.id.clone(),
            bundle: c.bundle.display().to_string(),
            pid: p.pid,
            status: p.status.api().into(),
            stdin: p.stdio.stdin.clone(),
            stdout: p.stdio.stdout.clone(),
            stderr: p.stdio.stderr.clone(),
            terminal: p.stdio.terminal,
            exit_status: p.exit_status,
            exited_at: MessageField::from_option(p.exited_at.clone()),
            exec_id: req.exec_id.clone(),
            ..Default::default()
        })
    }

    /// Wait until a process has exited (and its TaskExit was published).
    pub async fn task_wait(&self, req: WaitRequest) -> Result<WaitResponse> {
        let mut rx = {
            let c = self.container(&req.id).await?;
            c.get_process(&req.exec_id)?.exited.subscribe()
        };
        let _ = rx.wait_for(|v| *v).await;
        let (status, at) = match self.container(&req.id).await {
            Ok(c) => c
                .process(&req.exec_id)
                .map_or((0, None), |p| (p.exit_status, p.exited_at.clone())),
            Err(_) => (0, None),
        };
        Ok(WaitResponse {
            exit_status: status,
            exited_at: MessageField::from_option(at),
            ..Default::default()
        })
    }

    /// Signal a process.
    pub async fn task_kill(&self, req: KillRequest) -> Result<()> {
        let c = self.container(&req.id).await?;
        let p = c.get_process(&req.exec_id)?;
        if p.status == ProcStatus::Stopped {
            return Err(ShimError::ProcessFinished {
                id: req.id.clone(),
                exec_id: req.exec_id.clone(),
            });
        }
        if req.exec_id.is_empty() {
            if c.restore.is_some() {
                return Err(crate::container::precondition(&req.id, "kill", p.status));
            }
            let opts = KillOpts::new().all(req.all);
            if let Err(e) = c.runc.runc.kill(&req.id, req.signal, Some(&opts)).await {
                let detail = c.runc.describe(&e);
                let lower = detail.to_lowercase();
                if lower.contains("not running")
                    || lower.contains("already finished")
                    || lower.contains("no such process")
                {
                    return Err(ShimError::ProcessFinished {
                        id: req.id.clone(),
                        exec_id: String::new(),
                    });
                }
                return Err(ShimError::Runc {
                    verb: "kill",
                    id: req.id.clone(),
                    detail,
                });
            }
            Ok(())
        } else {
            let sig =
                nix::sys::signal::Signal::try_from(i32::try_from(req.signal).unwrap_or(i32::MAX))
                    .map_err(|_| ShimError::InvalidArgument(format!("signal {}", req.signal)))?;
            let pid = i32::try_from(p.pid).unwrap_or(0);
            if pid <= 0 {
                return Err(crate::container::precondition(
                    &req.id,
                    "kill exec in",
                    p.status,
                ));
            }
            match nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig) {
                Ok(()) => Ok(()),
                Err(nix::errno::Errno::ESRCH) => Err(ShimError::ProcessFinished {
                    id: req.id.clone(),
                    exec_id: req.exec_id.clone(),
                }),
                Err(errno) => Err(ShimError::Signal {
                    id: req.id.clone(),
                    exec_id: req.exec_id.clone(),
                    errno,
                }),
            }
        }
    }

    /// Delete an exec process, or the container (runc delete, unmount, TaskDelete).
    pub async fn task_delete(&self, req: DeleteRequest) -> Result<DeleteResponse> {
        let slot = self
            .slot(&req.id)
            .ok_or_else(|| ShimError::NotFound(req.id.clone()))?;
        let mut held = slot.lock().await;
        let c = held
            .as_mut()
            .ok_or_else(|| ShimError::NotFound(req.id.clone()))?;
        if !req.exec_id.is_empty() {
            let p = c.get_process(&req.exec_id)?;
            p.refuse(
                &req.id,
                "delete running exec of",
                &[ProcStatus::Running, ProcStatus::Paused],
            )?;
            let p = c.execs.remove(&req.exec_id).expect("checked above");
            return Ok(DeleteResponse {
                pid: p.pid,
                exit_status: p.exit_status,
                exited_at: MessageField::from_option(p.exited_at),
                ..Default::default()
            });
        }
        c.init.refuse(
            &req.id,
            "delete",
            &[ProcStatus::Running, ProcStatus::Paused],
        )?;
        if c.init.status == ProcStatus::Stopped {
            // TaskDelete must follow TaskExit, which waits for the output to drain.
            let mut rx = c.init.exited.subscribe();
            let _ = tokio::time::timeout(IO_DRAIN_LIMIT * 2, rx.wait_for(|v| *v)).await;
        }
        if c.restore.is_none() {
            let opts = DeleteOpts::new().force(true);
            if let Err(e) = c.runc.runc.delete(&req.id, Some(&opts)).await {
                let detail = c.runc.describe(&e);
                if !detail.contains("does not exist") {
                    warn!("runc delete {}: {detail}", req.id);
                }
            }
        }
        if c.rootfs_mounted {
            unmount(&c.bundle.join("rootfs"));
        }
        let mut c = held.take().expect("checked above");
        self.inner
            .containers
            .lock()
            .expect("containers lock")
            .remove(&req.id);
        self.release_pids(&req.id);
        drop(held);
        if let Some(w) = c.lazy.take() {
            // The restored tasks are gone: let the fetcher end, log and clean up.
            let _ = tokio::task::spawn_blocking(move || w.finish(LAZY_FINISH_LIMIT)).await;
        }
        let at = c.init.exited_at.clone().unwrap_or_else(now);
        send(
            self.events(),
            TaskDelete {
                container_id: req.id.clone(),
                pid: c.init.pid,
                exit_status: c.init.exit_status,
                exited_at: MessageField::some(at.clone()),
                id: req.id.clone(),
                ..Default::default()
            },
        );
        Ok(DeleteResponse {
            pid: c.init.pid,
            exit_status: c.init.exit_status,
            exited_at: MessageField::some(at),
            ..Default::default()
        })
    }

    /// Register an exec process (started by a later Start).
    pub async fn task_exec(&self, req: ExecProcessRequest) -> Result<()> {
        let mut c = self.container(&req.id).await?;
        if c.execs.contains_key(&req.exec_id) || req.exec_id.is_empty() {
            return Err(ShimError::AlreadyExists(format!(
                "exec {:?} in {}",
                req.exec_id, req.id
            )));
        }
        c.init.refuse(&req.id, "exec in", &[ProcStatus::Stopped])?;
        let spec = req.spec.as_ref().ok_or_else(|| {
            ShimError::InvalidArgument(format!("exec {} has no spec", req.exec_id))
        })?;
        let mut v: serde_json::Value = serde_json::from_slice(&spec.value).map_err(|e| {
            ShimError::InvalidArgument(format!("exec spec of {}/{}: {e}", req.id, req.exec_id))
        })?;
        if let Some(o) = v.as_object_mut() {
            o.insert("terminal".into(), serde_json::Value::Bool(req.terminal));
        }
        let mut p = Process::new(
            &req.exec_id,
            StdioPaths {
                stdin: req.stdin.clone(),
                stdout: req.stdout.clone(),
                stderr: req.stderr.clone(),
                terminal: req.terminal,
            },
        );
        p.spec = Some(v);
        c.execs.insert(req.exec_id.clone(), p);
        send(
            self.events(),
            TaskExecAdded {
                container_id: req.id.clone(),
                exec_id: req.exec_id.clone(),
                ..Default::default()
            },
        );
        Ok(())
    }

    /// Pids of the container (`runc ps`), exec processes tagged with their exec id.
    pub async fn task_pids(&self, req: PidsRequest) -> Result<PidsResponse> {
        let c = self.container(&req.id).await?;
        let pids = c.runc.runc.ps(&req.id).await.map_err(|e| ShimError::Runc {
            verb: "ps",
            id: req.id.clone(),
            detail: c.runc.describe(&e),
        })?;
        let mut processes = Vec::new();
        for pid in pids {
            let pid = u32::try_from(pid).unwrap_or(0);
            let mut info = ProcessInfo {
                pid,
                ..Default::default()
            };
            if let Some(e) = c.execs.values().find(|p| p.pid == pid) {
                let d = ProcessDetails {
                    exec_id: e.exec_id.clone(),
                    ..Default::default()
                };
                if let Ok(any) = convert_to_any(Box::new(d)) {
                    info.info = MessageField::some(any);
                }
            }
            processes.push(info);
        }
        Ok(PidsResponse {
            processes,
            ..Default::default()
        })
    }

    /// `runc pause`.
    pub async fn task_pause(&self, req: PauseRequest) -> Result<()> {
        let mut c = self.container(&req.id).await?;
        c.init.require(&req.id, "pause", &[ProcStatus::Running])?;
        c.runc
            .runc
            .pause(&req.id)
            .await
            .map_err(|e| ShimError::Runc {
                verb: "pause",
                id: req.id.clone(),
                detail: c.runc.describe(&e),
            })?;
        c.init.status = ProcStatus::Paused;
        send(
            self.events(),
            TaskPaused {
                container_id: req.id.clone(),
                ..Default::default()
            },
        );
        Ok(())
    }

    /// `runc resume`.
    pub async fn task_resume(&self, req: ResumeRequest) -> Result<()> {
        let mut c = self.container(&req.id).await?;
        c.init.require(&req.id, "resume", &[ProcStatus::Paused])?;
        c.runc
            .runc
            .resume(&req.id)
            .await
            .map_err(|e| ShimError::Runc {
                verb: "resume",
                id: req.id.clone(),
                detail: c.runc.describe(&e),
            })?;
        c.init.status = ProcStatus::Running;
        send(
            self.events(),
            TaskResumed {
                container_id: req.id.clone(),
                ..Default::default()
            },
        );
        Ok(())
    }

    /// Resize a process's pty.
    pub async fn task_resize_pty(&self, req: ResizePtyRequest) -> Result<()> {
        let c = self.container(&req.id).await?;
        c.get_process(&req.exec_id)?
            .shim_io
            .resize(req.width, req.height)
    }

    /// Close a process's stdin.
    pub async fn task_close_io(&self, req: CloseIORequest) -> Result<()> {
        let c = self.container(&req.id).await?;
        if req.stdin {
            c.get_process(&req.exec_id)?.shim_io.close_stdin();
        }
        Ok(())
    }

    /// `runc update --resources`.
    pub async fn task_update(&self, req: UpdateTaskRequest) -> Result<()> {
        let c = self.container(&req.id).await?;
        let any = req.resources.as_ref().ok_or_else(|| {
            ShimError::InvalidArgument(format!("update of {} has no resources", req.id))
        })?;
        let res: oci_spec::runtime::LinuxResources = serde_json::from_slice(&any.value)
            .map_err(|e| ShimError::InvalidArgument(format!("resources of {}: {e}", req.id)))?;
        c.runc
            .runc
            .update(&req.id, &res)
            .await
            .map_err(|e| ShimError::Runc {
                verb: "update",
                id: req.id.clone(),
                detail: c.runc.describe(&e),
            })
    }

    /// cgroup metrics of the init process.
    pub async fn task_stats(&self, req: StatsRequest) -> Result<StatsResponse> {
        let pid = {
            let c = self.container(&req.id).await?;
            if c.init.pid == 0 || c.init.status == ProcStatus::Stopped {
                return Err(crate::container::precondition(
                    &req.id,
                    "get stats of",
                    c.init.status,
                ));
            }
            c.init.pid
        };
        let cg = containerd_shim::cgroup::get_cgroup(pid)?;
        let metrics = containerd_shim::cgroup::collect_metrics(&cg)?;
        let any = convert_to_any(Box::new(metrics))?;
        Ok(StatsResponse {
            stats: MessageField::some(any),
            ..Default::default()
        })
    }

    /// Shim and task pids.
    pub async fn task_connect(&self, req: ConnectRequest) -> Result<ConnectResponse> {
        let c = self.container(&req.id).await?;
        Ok(ConnectResponse {
            shim_pid: std::process::id(),
            task_pid: c.init.pid,
            ..Default::default()
        })
    }

    /// Exit the shim once it holds no containers.
    pub async fn task_shutdown(&self, _req: ShutdownRequest) -> Result<()> {
        if self
            .inner
            .containers
            .lock()
            .expect("containers lock")
            .is_empty()
        {
            self.inner.exit.signal();
        }
        Ok(())
    }
}

pub(crate) fn read_pid(path: &Path) -> Result<u32> {
    let s = std::fs::read_to_string(path).map_err(|e| ShimError::io("read pid file", path, e))?;
    s.trim().parse().map_err(|_| ShimError::BadFile {
        what: "pid file",
        path: path.to_owned(),
        detail: format!("{:?} is not a pid", s.trim()),
    })
}

pub(crate) fn unmount(rootfs: &Path) {
    if let Some(p) = rootfs.to_str() {
        if let Err(e) = containerd_shim::mount::umount_recursive(Some(p), 0) {
            warn!("unmount {p}: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::create::shim_config;
    use crate::lazy;
    use crate::options::ShimOptions;
    use containerd_shim::api::CreateTaskRequest;
    use containerd_shim::protos::protobuf::{well_known_types::any::Any, MessageDyn};

    #[derive(Default)]
    struct Captured(StdMutex<Vec<String>>);
    impl EventSink for Captured {
        fn publish(&self, topic: String, _event: Box<dyn MessageDyn>) {
            self.0.lock().unwrap().push(topic);
        }
    }

    fn service() -> (TaskService, Arc<Captured>) {
        let ev = Arc::new(Captured::default());
        let s = TaskService::new(
            "test",
            "",
            ev.clone(),
            Arc::new(ExitSignal::default()),
            Arc::new(lazy::EagerOnly),
        );
        (s, ev)
    }

    #[tokio::test]
    async fn unknown_container_is_not_found() {
        let (s, _) = service();
        let e = s
            .task_state(StateRequest {
                id: "nope".into(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert!(matches!(e, ShimError::NotFound(_)));
        let e = s
            .task_pause(PauseRequest {
                id: "nope".into(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert!(matches!(e, ShimError::NotFound(_)));
    }

    #[tokio::test]
    async fn create_rejects_unknown_options_before_touching_runc() {
        let (s, ev) = service();
        let dir = tempfile::tempdir().unwrap();
        let mut any = Any::new();
        any.type_url = "example.Unknown".into();
        let e = s
            .task_create(CreateTaskRequest {
                id: "c".into(),
                bundle: dir.path().display().to_string(),
                options: MessageField::some(any),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert!(matches!(e, ShimError::UnknownOptions { .. }), "{e}");
        assert!(ev.0.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn create_from_checkpoint_records_state_and_pid_zero() {
        let (s, ev) = service();
        let dir = tempfile::tempdir().unwrap();
        let mut any = Any::new();
        any.type_url = String::new();
        let r = s
            .task_create(CreateTaskRequest {
                id: "c".into(),
                bundle: dir.path().display().to_string(),
                checkpoint: "/tmp/ctrd-checkpoint-test".into(),
                options: MessageField::some(any),
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(r.pid, 0);
        assert_eq!(*ev.0.lock().unwrap(), ["/tasks/create"]);
        let st = s
            .task_state(StateRequest {
                id: "c".into(),
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(st.status.enum_value(), Ok(ProcStatus::Created.api()));
        // Pause is refused before the restore ran; delete works and publishes TaskDelete.
        let e = s
            .task_pause(PauseRequest {
                id: "c".into(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert!(matches!(e, ShimError::FailedPrecondition { .. }));
        s.task_delete(DeleteRequest {
            id: "c".into(),
            ..Default::default()
        })
        .await
        .unwrap();
        assert_eq!(*ev.0.lock().unwrap(), ["/tasks/create", "/tasks/delete"]);
        // Shutdown with no containers signals the exit.
        s.task_shutdown(ShutdownRequest::default()).await.unwrap();
    }

    #[tokio::test]
    async fn only_exits_recorded_during_a_start_are_claimed() {
        let (s, ev) = service();
        // An exit of a pid no container has (a runc or keeper process) ...
        s.handle_exit(4242, 9).await;
        std::thread::sleep(Duration::from_millis(2));
        // ... is not claimed by a later process that reuses the pid.
        let since = std::time::Instant::now();
        assert!(s.claim_pid("c", "", 4242, since).is_none());
        // An exit recorded while the start is under way is.
        s.handle_exit(4243, 3).await;
        assert_eq!(s.claim_pid("c", "", 4243, since).map(|e| e.0), Some(3));
        assert!(s.claim_pid("c", "", 4243, since).is_none());
        assert!(ev.0.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_busy_container_does_not_hold_up_its_siblings() {
        let (s, ev) = service();
        let dir = tempfile::tempdir().unwrap();
        for id in ["busy", "sibling"] {
            s.task_create(CreateTaskRequest {
                id: id.into(),
                bundle: dir.path().display().to_string(),
                checkpoint: "/tmp/ctrd-checkpoint-test".into(),
                ..Default::default()
            })
            .await
            .unwrap();
        }
        // The sibling's init runs as pid 4300 (as a start would record it).
        {
            let mut c = s.container("sibling").await.unwrap();
            c.init.pid = 4300;
            c.init.status = ProcStatus::Running;
            assert!(s
                .claim_pid("sibling", "", 4300, std::time::Instant::now())
                .is_none());
        }
        // A long RPC of `busy` (a checkpoint uploading) holds its lock ...
        let held = s.container("busy").await.unwrap();
        let limit = Duration::from_millis(500);
        // ... while the sibling answers State, takes an exec and has its exit reported.
        let state = tokio::time::timeout(
            limit,
            s.task_state(StateRequest {
                id: "sibling".into(),
                ..Default::default()
            }),
        )
        .await
        .expect("State of a sibling waited for the busy container")
        .unwrap();
        assert_eq!(state.pid, 4300);
        let spec = containerd_shim::protos::protobuf::well_known_types::any::Any {
            type_url: "types.containerd.io/opencontainers/runtime-spec/1/Process".into(),
            value: br#"{"args":["true"],"cwd":"/"}"#.to_vec(),
            ..Default::default()
        };
        tokio::time::timeout(
            limit,
            s.task_exec(ExecProcessRequest {
                id: "sibling".into(),
                exec_id: "e1".into(),
                spec: MessageField::some(spec),
                ..Default::default()
            }),
        )
        .await
        .expect("Exec in a sibling waited for the busy container")
        .unwrap();
        s.handle_exit(4300, 7).await;
        let wait = tokio::time::timeout(
            limit,
            s.task_wait(WaitRequest {
                id: "sibling".into(),
                ..Default::default()
            }),
        )
        .await
        .expect("the sibling's exit waited for the busy container")
        .unwrap();
        assert_eq!(wait.exit_status, 7);
        // The busy container's own State waits for its RPC to end.
        let busy = s.task_state(StateRequest {
            id: "busy".into(),
            ..Default::default()
        });
        tokio::pin!(busy);
        assert!(tokio::time::timeout(Duration::from_millis(100), &mut busy)
            .await
            .is_err());
        drop(held);
        busy.await.unwrap();
        let topics: Vec<String> = ev.0.lock().unwrap().clone();
        assert!(
            topics.iter().any(|t| t.ends_with("/exit")),
            "no TaskExit: {topics:?}"
        );
    }

    #[tokio::test]
    async fn create_resolves_the_config_once_and_refuses_bad_annotations() {
        use distriproc_config::FillPolicy;
        let (s, ev) = service();
        let dir = tempfile::tempdir().unwrap();
        let create = |id: &str| CreateTaskRequest {
            id: id.into(),
            bundle: dir.path().display().to_string(),
            checkpoint: "/tmp/ctrd-checkpoint-test".into(),
            ..Default::default()
        };
        std::fs::write(
            dir.path().join("config.json"),
            r#"{"annotations":{"io.distriproc.fill-policy":"sometimes"}}"#,
        )
        .unwrap();
        let e = s.task_create(create("bad")).await.unwrap_err();
        assert!(matches!(e, ShimError::InvalidArgument(_)), "{e}");
        assert!(ev.0.lock().unwrap().is_empty());
        std::fs::write(
            dir.path().join("config.json"),
            r#"{"annotations":{"io.distriproc.fill-policy":"none"}}"#,
        )
        .unwrap();
        s.task_create(create("c")).await.unwrap();
        // Later changes to the bundle do not change the container's configuration.
        std::fs::write(dir.path().join("config.json"), "{}").unwrap();
        let c = s.container("c").await.unwrap();
        assert_eq!(c.cfg.fetcher.fill, FillPolicy::None);
        assert_eq!(c.annotations["io.distriproc.fill-policy"], "none");
    }

    #[test]
    fn fetcher_config_from_annotations() {
        use distriproc_config::{FetcherMode, FillPolicy};
        let dir = tempfile::tempdir().unwrap();
        let opts = ShimOptions::default();
        assert_eq!(
            shim_config(dir.path(), &opts).unwrap().fetcher.fill,
            FillPolicy::Full
        );
        std::fs::write(
            dir.path().join("config.json"),
            r#"{"annotations":{"io.distriproc.fill-policy":"none","io.distriproc.fetcher-mode":"criu"}}"#,
        )
        .unwrap();
        let cfg = shim_config(dir.path(), &opts).unwrap().fetcher;
        assert_eq!(cfg.fill, FillPolicy::None);
        assert_eq!(cfg.mode, FetcherMode::Criu);
        std::fs::write(
            dir.path().join("config.json"),
            r#"{"annotations":{"io.distriproc.fill-policy":"sometimes"}}"#,
        )
        .unwrap();
        let e = shim_config(dir.path(), &opts).unwrap_err();
        assert!(matches!(e, ShimError::InvalidArgument(_)), "{e}");
        let bad = ShimOptions {
            config_path: dir.path().join("missing.toml").display().to_string(),
            ..Default::default()
        };
        assert!(shim_config(dir.path(), &bad).is_err());
    }
}
