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
use tokio::sync::{Mutex, OwnedMappedMutexGuard, OwnedMutexGuard};

use crate::{
    container::{Container, ProcStatus, Process},
    error::{Result, ShimError},
    events::{now, send, EventSink},
    exits::ExitRouting,
    io::StdioPaths,
    lazy::LazyBackend,
    oci_runtime::{Runc, RuntimeFactory},
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
    /// Makes each container's OCI runtime (runc).
    pub(crate) runtimes: Arc<dyn RuntimeFactory>,
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
        Self::with_runtimes(namespace, containerd, events, exit, lazy, Arc::new(Runc))
    }

    /// [`TaskService::new`] with the containers' OCI runtimes made by `runtimes` (a stub in
    /// unit tests).
    pub fn with_runtimes(
        namespace: &str,
        containerd: &str,
        events: Arc<dyn EventSink>,
        exit: Arc<ExitSignal>,
        lazy: Arc<dyn LazyBackend>,
        runtimes: Arc<dyn RuntimeFactory>,
    ) -> Self {
        TaskService {
            inner: Arc::new(Inner {
                namespace: namespace.to_owned(),
                containers: StdMutex::new(HashMap::new()),
                exits: StdMutex::new(ExitRouting::default()),
                events,
                exit,
                lazy,
                runtimes,
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
            c.runc.kill(&req.id, req.signal, req.all).await
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
            if let Err(e) = c.runc.delete(&req.id).await {
                warn!("{e}");
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
        let pids = c.runc.ps(&req.id).await?;
        let mut processes = Vec::new();
        for pid in pids {
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
        c.runc.pause(&req.id).await?;
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
        c.runc.resume(&req.id).await?;
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
        c.runc.update(&req.id, &res).await
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
    use containerd_shim::api::{CreateTaskRequest, StartRequest};
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

    /// An OCI runtime that runs nothing: it records the verbs and writes the pid files.
    #[derive(Debug, Default)]
    struct StubRuntime {
        calls: StdMutex<Vec<String>>,
        /// The pid the next create or exec reports.
        next_pid: std::sync::atomic::AtomicU32,
        fail_create: bool,
    }

    impl StubRuntime {
        fn record(&self, verb: &str, id: &str) {
            self.calls.lock().unwrap().push(format!("{verb} {id}"));
        }
        fn pid_file(&self, path: Option<&std::path::PathBuf>) -> Result<()> {
            let pid = self
                .next_pid
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let path = path.expect("a pid file");
            std::fs::write(path, pid.to_string()).map_err(|e| ShimError::io("write", path, e))
        }
    }

    #[async_trait::async_trait]
    impl crate::oci_runtime::OciRuntime for StubRuntime {
        async fn create(&self, id: &str, _: &Path, opts: &runc::options::CreateOpts) -> Result<()> {
            self.record("create", id);
            if self.fail_create {
                return Err(ShimError::Runc {
                    verb: "create",
                    id: id.into(),
                    detail: "stub says no".into(),
                });
            }
            self.pid_file(opts.pid_file.as_ref())
        }
        async fn start(&self, id: &str) -> Result<()> {
            self.record("start", id);
            Ok(())
        }
        async fn exec(
            &self,
            id: &str,
            spec: &oci_spec::runtime::Process,
            opts: &runc::options::ExecOpts,
        ) -> Result<()> {
            self.record(&format!("exec {:?}", spec.args()), id);
            self.pid_file(opts.pid_file.as_ref())
        }
        async fn kill(&self, id: &str, signal: u32, all: bool) -> Result<()> {
            self.record(&format!("kill {signal} all={all}"), id);
            Ok(())
        }
        async fn delete(&self, id: &str) -> Result<()> {
            self.record("delete", id);
            Ok(())
        }
        async fn ps(&self, id: &str) -> Result<Vec<u32>> {
            self.record("ps", id);
            Ok(vec![4321, 4322])
        }
        async fn pause(&self, id: &str) -> Result<()> {
            self.record("pause", id);
            Ok(())
        }
        async fn resume(&self, id: &str) -> Result<()> {
            self.record("resume", id);
            Ok(())
        }
        async fn update(&self, id: &str, _: &oci_spec::runtime::LinuxResources) -> Result<()> {
            self.record("update", id);
            Ok(())
        }
        async fn run_raw(
            &self,
            _: Vec<std::ffi::OsString>,
            _: Option<(
                std::process::Stdio,
                std::process::Stdio,
                std::process::Stdio,
            )>,
        ) -> Result<crate::runc::RawOutput> {
            Err(ShimError::Unimplemented("run_raw"))
        }
        fn with_log_tail(&self, base: String) -> String {
            base
        }
    }

    struct Stubs(Arc<StubRuntime>);
    impl crate::oci_runtime::RuntimeFactory for Stubs {
        fn for_container(
            &self,
            _: &ShimOptions,
            _: &str,
            _: &Path,
        ) -> Result<Arc<dyn crate::oci_runtime::OciRuntime>> {
            Ok(self.0.clone())
        }
    }

    fn stub_service(stub: StubRuntime) -> (TaskService, Arc<Captured>, Arc<StubRuntime>) {
        let ev = Arc::new(Captured::default());
        let stub = Arc::new(stub);
        stub.next_pid
            .store(4321, std::sync::atomic::Ordering::SeqCst);
        let s = TaskService::with_runtimes(
            "test",
            "",
            ev.clone(),
            Arc::new(ExitSignal::default()),
            Arc::new(lazy::EagerOnly),
            Arc::new(Stubs(stub.clone())),
        );
        (s, ev, stub)
    }

    #[tokio::test]
    async fn lifecycle_through_the_process_layer() {
        let (s, ev, stub) = stub_service(StubRuntime::default());
        let dir = tempfile::tempdir().unwrap();
        let id = |exec: &str| (String::from("c"), exec.to_owned());
        let created = s
            .task_create(CreateTaskRequest {
                id: "c".into(),
                bundle: dir.path().display().to_string(),
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(created.pid, 4321);
        let state = |exec: &str| {
            let (id, exec_id) = id(exec);
            s.task_state(StateRequest {
                id,
                exec_id,
                ..Default::default()
            })
        };
        assert_eq!(
            state("").await.unwrap().status,
            ProcStatus::Created.api().into()
        );
        // A second Create of the same id is refused while the first exists.
        let again = s
            .task_create(CreateTaskRequest {
                id: "c".into(),
                bundle: dir.path().display().to_string(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert!(matches!(again, ShimError::AlreadyExists(_)), "{again}");
        s.task_start(StartRequest {
            id: "c".into(),
            ..Default::default()
        })
        .await
        .unwrap();
        assert_eq!(
            state("").await.unwrap().status,
            ProcStatus::Running.api().into()
        );
        // An exec: registered, started (pid 4322), its exit routed by pid.
        let spec = Any {
            type_url: "types.containerd.io/opencontainers/runtime-spec/1/Process".into(),
            value: br#"{"args":["true"],"cwd":"/","user":{"uid":0,"gid":0}}"#.to_vec(),
            ..Default::default()
        };
        s.task_exec(ExecProcessRequest {
            id: "c".into(),
            exec_id: "e".into(),
            spec: MessageField::some(spec),
            ..Default::default()
        })
        .await
        .unwrap();
        let started = s
            .task_start(StartRequest {
                id: "c".into(),
                exec_id: "e".into(),
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(started.pid, 4322);
        let pids = s
            .task_pids(PidsRequest {
                id: "c".into(),
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(pids.processes.len(), 2);
        s.handle_exit(4322, 3).await;
        let (cid, exec_id) = id("e");
        let w = s
            .task_wait(WaitRequest {
                id: cid,
                exec_id,
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(w.exit_status, 3);
        // Pause, resume, then SIGKILL of the init, whose exit is routed the same way.
        for pause in [true, false] {
            if pause {
                s.task_pause(PauseRequest {
                    id: "c".into(),
                    ..Default::default()
                })
                .await
                .unwrap();
            } else {
                s.task_resume(ResumeRequest {
                    id: "c".into(),
                    ..Default::default()
                })
                .await
                .unwrap();
            }
        }
        s.task_kill(KillRequest {
            id: "c".into(),
            signal: 9,
            all: true,
            ..Default::default()
        })
        .await
        .unwrap();
        s.handle_exit(4321, 137).await;
        let w = s
            .task_wait(WaitRequest {
                id: "c".into(),
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(w.exit_status, 137);
        // A stopped init cannot be started, paused or signalled again.
        assert!(s
            .task_pause(PauseRequest {
                id: "c".into(),
                ..Default::default()
            })
            .await
            .is_err());
        let d = s
            .task_delete(DeleteRequest {
                id: "c".into(),
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!((d.pid, d.exit_status), (4321, 137));
        assert!(matches!(
            state("").await.unwrap_err(),
            ShimError::NotFound(_)
        ));
        assert_eq!(
            *stub.calls.lock().unwrap(),
            [
                "create c",
                "start c",
                "exec Some([\"true\"]) c",
                "ps c",
                "pause c",
                "resume c",
                "kill 9 all=true c",
                "delete c"
            ]
        );
        let topics = ev.0.lock().unwrap().clone();
        let short: Vec<&str> = topics
            .iter()
            .map(|t| t.rsplit('/').next().unwrap_or(""))
            .collect();
        assert_eq!(
            short,
            [
                "create",
                "start",
                "exec-added",
                "exec-started",
                "exit",
                "paused",
                "resumed",
                "exit",
                "delete"
            ],
            "{topics:?}"
        );
    }

    #[tokio::test]
    async fn a_failed_create_frees_the_id() {
        let (s, ev, _) = stub_service(StubRuntime {
            fail_create: true,
            ..Default::default()
        });
        let dir = tempfile::tempdir().unwrap();
        let req = CreateTaskRequest {
            id: "c".into(),
            bundle: dir.path().display().to_string(),
            ..Default::default()
        };
        let e = s.task_create(req.clone()).await.unwrap_err();
        assert!(e.to_string().contains("stub says no"), "{e}");
        assert!(ev.0.lock().unwrap().is_empty());
        // The id is free again: the same Create fails the same way, not as AlreadyExists.
        let e = s.task_create(req).await.unwrap_err();
        assert!(matches!(e, ShimError::Runc { .. }), "{e}");
        assert!(s.inner.containers.lock().unwrap().is_empty());
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
            value: br#"{"args":["true"],"cwd":"/","user":{"uid":0,"gid":0}}"#.to_vec(),
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
