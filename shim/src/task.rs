//! The containerd Task service (task API v2).
//!
//! [`TaskService`] holds the containers of this shim; each RPC's logic is a `task_<verb>` method
//! returning [`ShimError`], and the ttrpc `Task` impl at the bottom only forwards and converts the
//! error. Exits come from containerd-shim's exit monitor (the shim is a subreaper); an exit is
//! published as TaskExit once the process's output has been drained, and only then does Wait
//! return. Events leave through an [`EventSink`] so tests can capture them.
//!
//! Locking: each container has its own lock, held for the whole of one of its RPCs (a restore
//! or a checkpoint's upload included); the map of containers is locked only to look a
//! container up, and exits are routed by pid without it (`ExitRouting`), so in a grouped shim
//! (a Kubernetes pod) a long checkpoint of one member never delays its siblings' RPCs or exits.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::{Arc, Mutex as StdMutex},
    time::Duration,
};

use async_trait::async_trait;
use containerd_shim::{
    api::{
        CheckpointTaskRequest, CloseIORequest, ConnectRequest, ConnectResponse, CreateTaskRequest,
        CreateTaskResponse, DeleteRequest, DeleteResponse, Empty, ExecProcessRequest, KillRequest,
        PauseRequest, PidsRequest, PidsResponse, ResizePtyRequest, ResumeRequest, ShutdownRequest,
        StartRequest, StartResponse, StateRequest, StateResponse, StatsRequest, StatsResponse,
        UpdateTaskRequest, WaitRequest, WaitResponse,
    },
    event::Event,
    monitor::{monitor_subscribe, Subject, Topic},
    protos::{
        events::task::{
            TaskCheckpointed, TaskCreate, TaskDelete, TaskExecAdded, TaskExecStarted, TaskExit,
            TaskIO, TaskPaused, TaskResumed, TaskStart,
        },
        protobuf::{well_known_types::timestamp::Timestamp, Message, MessageDyn, MessageField},
        shim::oci::{CheckpointOptions, ProcessDetails},
        types::task::ProcessInfo,
    },
    util::convert_to_any,
    ExitSignal, Task, TtrpcContext, TtrpcResult,
};
use distriproc_config::ShimConfig;
use distriproc_runtime::error_chain;
use distriproc_runtime::protocol::upload::ParentRef;
use distriproc_runtime::runc_cmd::{CheckpointArgs, CriuFlags, RestoreArgs};
use log::{debug, info, warn};
use runc::options::{CreateOpts, DeleteOpts, ExecOpts, KillOpts};
use tokio::sync::{Mutex, OwnedMappedMutexGuard, OwnedMutexGuard};

use crate::store::MemoryDestination;
use crate::{
    container::{Container, ProcStatus, Process, RestorePlan},
    error::{Result, ShimError},
    io::{self, ConsoleSocket, StdioPaths},
    lazy::{self, LazyBackend},
    options::{self, ShimOptions},
    runc::RuncClient,
};

/// How long TaskExit waits for a process's output to drain.
const IO_DRAIN_LIMIT: Duration = Duration::from_secs(2);
/// How long to wait for runc to send a pty master.
const CONSOLE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long Delete waits for a lazy restore's fetcher to wind down.
const LAZY_FINISH_LIMIT: Duration = Duration::from_secs(3);
/// How long an exit of an unknown pid is kept.
const ORPHAN_EXIT_TTL: Duration = Duration::from_secs(60);
/// Exits of unknown pids kept for processes whose pid is not recorded yet.
const MAX_ORPHAN_EXITS: usize = 1024;
/// Above this many kept exits, those older than [`ORPHAN_EXIT_TTL`] are dropped.
const ORPHAN_PRUNE_AT: usize = 64;

/// Where events go. Order of calls is the order containerd sees.
pub trait EventSink: Send + Sync {
    fn publish(&self, topic: String, event: Box<dyn MessageDyn>);
}

/// An [`EventSink`] that forwards to containerd through the shim's publisher, in order.
pub struct RemoteEvents {
    tx: tokio::sync::mpsc::UnboundedSender<(String, Box<dyn MessageDyn>)>,
}

impl RemoteEvents {
    /// Start the forwarding task.
    pub fn new(publisher: containerd_shim::publisher::RemotePublisher, namespace: String) -> Self {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(String, Box<dyn MessageDyn>)>();
        tokio::spawn(async move {
            while let Some((topic, ev)) = rx.recv().await {
                let ctx = containerd_shim::Context::default();
                if let Err(e) = publisher.publish(ctx, &topic, &namespace, ev).await {
                    warn!("publish {topic}: {e}");
                }
            }
        });
        RemoteEvents { tx }
    }
}

impl EventSink for RemoteEvents {
    fn publish(&self, topic: String, event: Box<dyn MessageDyn>) {
        let _ = self.tx.send((topic, event));
    }
}

fn now() -> Timestamp {
    containerd_shim::util::timestamp().unwrap_or_default()
}

fn send<E: Event + MessageDyn>(sink: &dyn EventSink, e: E) {
    sink.publish(e.topic(), Box::new(e));
}

/// A container's slot in the map: `None` while its Create runs (the creator holds the lock)
/// and once it is deleted, for callers that were waiting on it.
type Slot = Arc<Mutex<Option<Container>>>;

/// A locked container. Each container has its own lock, held for as long as one of its RPCs
/// runs (a restore or a checkpoint's upload included); the map of containers is only locked
/// to look a slot up, so the siblings of a grouped shim never wait for each other.
type ContainerGuard = OwnedMappedMutexGuard<Option<Container>, Container>;

/// Which process a pid is, and the exits of pids not known yet. One lock for both, so an exit
/// is either routed to its process or kept for the start that is about to claim its pid.
#[derive(Default)]
struct ExitRouting {
    /// Pids of started processes: (container id, exec id).
    owners: HashMap<u32, (String, String)>,
    /// Exits of unknown pids: (code, time, when recorded).
    orphans: HashMap<u32, (u32, Timestamp, std::time::Instant)>,
}

struct Inner {
    namespace: String,
    containers: StdMutex<HashMap<String, Slot>>,
    exits: StdMutex<ExitRouting>,
    events: Arc<dyn EventSink>,
    exit: Arc<ExitSignal>,
    lazy: Arc<dyn LazyBackend>,
    /// Retention of the node-local stores this process checkpoints into.
    sweeper: Arc<crate::retention::Sweeper>,
}

/// The task service of one shim.
#[derive(Clone)]
pub struct TaskService {
    inner: Arc<Inner>,
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

    /// Subscribe to the exit monitor (now) and handle exits (in a task).
    pub async fn watch_exits(&self) -> Result<()> {
        let mut sub = monitor_subscribe(Topic::Pid).await?;
        let me = self.clone();
        tokio::spawn(async move {
            while let Some(ev) = sub.rx.recv().await {
                if let Subject::Pid(pid) = ev.subject {
                    if let Ok(pid) = u32::try_from(pid) {
                        me.handle_exit(pid, ev.exit_code).await;
                    }
                }
            }
        });
        Ok(())
    }

    /// Record an exit and publish it once the output is drained. The exit is handled in a task
    /// of its own: a container busy in a long RPC (a checkpoint's upload) delays its own exits
    /// only, not the next exit the monitor reports.
    pub async fn handle_exit(&self, pid: u32, code: i32) {
        let code = u32::try_from(code).unwrap_or(255);
        let at = now();
        let owner = {
            let mut r = self.inner.exits.lock().expect("exit routing lock");
            match r.owners.remove(&pid) {
                Some(o) => o,
                None => {
                    // Mostly runc's, CRIU's and keepers' own exits. Only an exit recorded while
                    // a start is under way can be claimed (see `claim_pid`), so old entries are
                    // useless: a shim serving many containers for long would otherwise keep
                    // them until the pid is reused.
                    if r.orphans.len() >= ORPHAN_PRUNE_AT {
                        r.orphans.retain(|_, e| e.2.elapsed() < ORPHAN_EXIT_TTL);
                    }
                    if r.orphans.len() < MAX_ORPHAN_EXITS {
                        r.orphans.insert(pid, (code, at, std::time::Instant::now()));
                    }
                    return;
                }
            }
        };
        let (id, exec_id) = owner;
        let Some(slot) = self.slot(&id) else {
            return;
        };
        let me = self.clone();
        tokio::spawn(async move {
            let mut g = slot.lock().await;
            let Some(c) = g.as_mut() else { return };
            if let Some(p) = c.process_mut(&exec_id) {
                if p.pid == pid && p.status != ProcStatus::Stopped {
                    me.mark_exited(&id, p, code, at);
                }
            }
        });
    }

    /// The slot of container `id`, if it is known.
    fn slot(&self, id: &str) -> Option<Slot> {
        self.inner
            .containers
            .lock()
            .expect("containers lock")
            .get(id)
            .cloned()
    }

    /// Container `id`, locked for the caller; waits while another RPC of the same container
    /// runs, never for another container.
    async fn container(&self, id: &str) -> Result<ContainerGuard> {
        let slot = self
            .slot(id)
            .ok_or_else(|| ShimError::NotFound(id.to_owned()))?;
        OwnedMutexGuard::try_map(slot.lock_owned().await, Option::as_mut)
            .map_err(|_| ShimError::NotFound(id.to_owned()))
    }

    fn mark_exited(&self, id: &str, p: &mut Process, code: u32, at: Timestamp) {
        debug!(
            "process {:?} of {id} (pid {}) exited {code}",
            p.exec_id, p.pid
        );
        p.status = ProcStatus::Stopped;
        p.exit_status = code;
        p.exited_at = Some(at.clone());
        let ev = TaskExit {
            container_id: id.to_owned(),
            id: if p.exec_id.is_empty() {
                id.to_owned()
            } else {
                p.exec_id.clone()
            },
            pid: p.pid,
            exit_status: code,
            exited_at: MessageField::some(at),
            ..Default::default()
        };
        let done = p.io_done.take();
        let exited = p.exited.clone();
        let events = self.inner.events.clone();
        tokio::spawn(async move {
            if let Some(d) = done {
                d.wait(IO_DRAIN_LIMIT).await;
            }
            send(events.as_ref(), ev);
            // send_replace: `send` drops the value when no Wait is subscribed yet.
            exited.send_replace(true);
        });
    }

    /// Route the exits of `pid` to process `exec_id` of container `id` from now on, or return
    /// its exit if it arrived before, during the start that began at `since`. An older exit of
    /// the same pid is a previous process's (pids wrap around; a grouped shim lives through
    /// many of them) and is dropped, not claimed.
    fn claim_pid(
        &self,
        id: &str,
        exec_id: &str,
        pid: u32,
        since: std::time::Instant,
    ) -> Option<(u32, Timestamp)> {
        let mut r = self.inner.exits.lock().expect("exit routing lock");
        match r.orphans.remove(&pid) {
            Some((code, at, recorded)) if recorded >= since => Some((code, at)),
            _ => {
                r.owners.insert(pid, (id.to_owned(), exec_id.to_owned()));
                None
            }
        }
    }

    /// Forget the pids of a deleted container's processes.
    fn release_pids(&self, id: &str) {
        self.inner
            .exits
            .lock()
            .expect("exit routing lock")
            .owners
            .retain(|_, o| o.0 != id);
    }

    fn watch_oom(&self, id: &str, pid: u32) {
        if let Err(e) = crate::oom::watch(id.to_owned(), pid, self.inner.events.clone()) {
            warn!("no oom events for {id}: {e}");
        }
    }

    fn events(&self) -> &dyn EventSink {
        self.inner.events.as_ref()
    }

    // ---- RPC logic ----

    /// Create: mount the rootfs, `runc create` (or record a checkpoint to restore at Start).
    pub async fn task_create(&self, req: CreateTaskRequest) -> Result<CreateTaskResponse> {
        // The id is taken at once, by a slot locked until the container exists.
        let slot: Slot = Arc::new(Mutex::new(None));
        let mut guard = slot
            .clone()
            .try_lock_owned()
            .expect("a new slot is unlocked");
        {
            let mut cs = self.inner.containers.lock().expect("containers lock");
            if cs.contains_key(&req.id) {
                return Err(ShimError::AlreadyExists(format!("container {}", req.id)));
            }
            cs.insert(req.id.clone(), slot);
        }
        let since = std::time::Instant::now();
        let result = self.create_container(&req).await;
        match result {
            Ok(mut c) => {
                let pid = c.init.pid;
                let ev = TaskCreate {
                    container_id: req.id.clone(),
                    bundle: req.bundle.clone(),
                    rootfs: req.rootfs.clone(),
                    io: MessageField::some(TaskIO {
                        stdin: req.stdin.clone(),
                        stdout: req.stdout.clone(),
                        stderr: req.stderr.clone(),
                        terminal: req.terminal,
                        ..Default::default()
                    }),
                    checkpoint: req.checkpoint.clone(),
                    pid,
                    ..Default::default()
                };
                send(self.events(), ev);
                if pid > 0 {
                    if let Some((code, at)) = self.claim_pid(&req.id, "", pid, since) {
                        self.mark_exited(&req.id, &mut c.init, code, at);
                    }
                    self.watch_oom(&req.id, pid);
                }
                *guard = Some(c);
                Ok(CreateTaskResponse {
                    pid,
                    ..Default::default()
                })
            }
            Err(e) => {
                self.inner
                    .containers
                    .lock()
                    .expect("containers lock")
                    .remove(&req.id);
                Err(e)
            }
        }
    }

    /// Everything of Create but publishing it: options, config, rootfs, `runc create`.
    async fn create_container(&self, req: &CreateTaskRequest) -> Result<Container> {
        let opts = options::decode(req.options.as_ref())?;
        let bundle = PathBuf::from(&req.bundle);
        let annotations = bundle_annotations(&bundle);
        let cfg = config_with_annotations(&opts, &annotations)?;
        let opts = opts.with_runc_config(&cfg.runc);
        let runc = RuncClient::new(&opts, &self.inner.namespace, &bundle)?;
        let rootfs = bundle.join("rootfs");
        let mut rootfs_mounted = false;
        if !req.rootfs.is_empty() {
            std::fs::create_dir_all(&rootfs).map_err(|e| ShimError::io("create", &rootfs, e))?;
            for m in &req.rootfs {
                if let Err(e) = containerd_shim::util::mount_rootfs(m, &rootfs).await {
                    // The mounts made so far go with the failed Create.
                    unmount(&rootfs);
                    return Err(ShimError::Other(format!("mount rootfs of {}: {e}", req.id)));
                }
            }
            rootfs_mounted = true;
        }
        let result = self
            .create_inner(req, opts, (annotations, cfg), runc, rootfs_mounted)
            .await;
        if result.is_err() && rootfs_mounted {
            unmount(&rootfs);
        }
        result
    }

    async fn create_inner(
        &self,
        req: &CreateTaskRequest,
        opts: ShimOptions,
        (annotations, cfg): (HashMap<String, String>, ShimConfig),
        runc: RuncClient,
        rootfs_mounted: bool,
    ) -> Result<Container> {
        let bundle = PathBuf::from(&req.bundle);
        opts.save(&bundle)?;
        let stdio = StdioPaths {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
        };
        let mut init = Process::new("", stdio.clone());
        let images = if !req.checkpoint.is_empty() {
            req.checkpoint.clone()
        } else {
            opts.criu_image_path.clone()
        };
        let restore = if images.is_empty() {
            None
        } else {
            let work = if opts.criu_work_path.is_empty() {
                bundle.join("work")
            } else {
                PathBuf::from(&opts.criu_work_path)
            };
            Some(RestorePlan {
                images: PathBuf::from(images),
                work,
            })
        };
        if restore.is_none() {
            let pid_file = bundle.join("init.pid");
            let mut copts = CreateOpts::new()
                .pid_file(&pid_file)
                .no_pivot(opts.no_pivot_root)
                .no_new_keyring(opts.no_new_keyring);
            let mut pending = PendingStdio::new(&mut init)?;
            if let Some(path) = pending.console_path() {
                copts = copts.console_socket(&path);
            }
            if let Some(cs) = pending.take_pipes() {
                copts = copts.io(Arc::new(cs));
            }
            let console = pending.receive();
            if let Err(e) = runc.runc.create(&req.id, &bundle, Some(&copts)).await {
                if let Some(c) = console {
                    c.abort();
                }
                return Err(ShimError::Runc {
                    verb: "create",
                    id: req.id.clone(),
                    detail: runc.describe(&e),
                });
            }
            init.pid = read_pid(&pid_file)?;
            if let Some(c) = console {
                c.finish(&mut init, &req.id).await?;
            }
        }
        Ok(Container {
            id: req.id.clone(),
            bundle,
            opts,
            annotations,
            cfg,
            runc,
            init,
            execs: HashMap::new(),
            rootfs_mounted,
            restore,
            lazy: None,
            lazy_view: None,
            base_layer: None,
        })
    }

    /// Start the init process (`runc start`, or restore) or an exec process (`runc exec`).
    pub async fn task_start(&self, req: StartRequest) -> Result<StartResponse> {
        let mut c = self.container(&req.id).await?;
        let since = std::time::Instant::now();
        let pid = if req.exec_id.is_empty() {
            if c.init.status != ProcStatus::Created {
                return Err(precondition(&req.id, "start", c.init.status));
            }
            if let Some(plan) = c.restore.clone() {
                self.restore(&mut c, &plan).await?;
                self.watch_oom(&req.id, c.init.pid);
            } else {
                c.runc
                    .runc
                    .start(&req.id)
                    .await
                    .map_err(|e| ShimError::Runc {
                        verb: "start",
                        id: req.id.clone(),
                        detail: c.runc.describe(&e),
                    })?;
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
        if c.init.status == ProcStatus::Stopped {
            return Err(precondition(&c.id, "exec in", c.init.status));
        }
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
        if p.status != ProcStatus::Created {
            return Err(precondition(&id, "start exec of", p.status));
        }
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
        if let Err(e) = runc.runc.exec(&id, &spec, Some(&eopts)).await {
            if let Some(c) = console {
                c.abort();
            }
            return Err(ShimError::Runc {
                verb: "exec",
                id,
                detail: runc.describe(&e),
            });
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

    /// `runc restore` of a created-from-checkpoint container (lazy when the backend is).
    async fn restore(&self, c: &mut Container, plan: &RestorePlan) -> Result<()> {
        let id = c.id.clone();
        std::fs::create_dir_all(&plan.work).map_err(|e| ShimError::io("create", &plan.work, e))?;
        let restore_log = plan.work.join("restore.log");
        let stdio = c.init.stdio.clone();
        let pid_file = c.bundle.join("init.pid");
        let mut args = RestoreArgs::new(&plan.images, &plan.work, &c.bundle)
            .pid_file(&pid_file)
            .no_pivot(c.opts.no_pivot_root);
        if stdio.terminal {
            args = args.criu_flags(CriuFlags {
                shell_job: true,
                ..Default::default()
            });
        }
        let mut pending = PendingStdio::new(&mut c.init)?;
        if let Some(path) = pending.console_path() {
            args = args.console_socket(path);
        }
        let pipes = pending.take_pipes();
        let restore_err = |detail: String| ShimError::Restore {
            id: id.clone(),
            detail,
            log: restore_log.clone(),
        };
        let reference = crate::remote::read_reference(&plan.images)
            .map_err(|e| restore_err(error_chain(&e)))?;
        if reference.is_some() && !self.inner.lazy.is_lazy() {
            return Err(restore_err(format!(
                "{} keeps its memory in {} and needs a lazy restore, but lazy restore is off",
                plan.images.display(),
                reference.as_ref().map_or("", |r| r.endpoint.as_str())
            )));
        }
        let mut base_layer = None;
        let session = if self.inner.lazy.is_lazy() {
            let shim_cfg = &c.cfg;
            let in_store = reference
                .as_ref()
                .and_then(|r| crate::store::parse_endpoint(&r.endpoint));
            let pages = match (&reference, in_store) {
                (None, _) => lazy::PagesFrom::Local,
                (Some(r), Some(store)) => {
                    let expect = r.digest().map_err(|e| restore_err(error_chain(&e)))?;
                    let entry = crate::store::open_entry(&store, &r.checkpoint, expect)
                        .map_err(|e| restore_err(error_chain(&e)))?;
                    info!(
                        "restoring {id} from checkpoint {:?} of the node-local store {}",
                        r.checkpoint,
                        store.display()
                    );
                    let entry = std::sync::Arc::new(entry);
                    base_layer = crate::remote::BaseLayer::stored(r, entry.clone()).ok();
                    lazy::PagesFrom::Store(entry)
                }
                (Some(r), None) => {
                    let (endpoint, opts) = crate::remote::client(
                        &shim_cfg.pageserver,
                        Some(&r.endpoint),
                        &r.checkpoint,
                        &id,
                    )
                    .map_err(|e| restore_err(error_chain(&e)))?;
                    let expect = r.digest().map_err(|e| restore_err(error_chain(&e)))?;
                    info!(
                        "restoring {id} from remote checkpoint {:?} at {endpoint}",
                        r.checkpoint
                    );
                    base_layer = Some(crate::remote::BaseLayer {
                        endpoint: endpoint.to_string(),
                        parent: ParentRef {
                            checkpoint: r.checkpoint.clone(),
                            digest: expect,
                        },
                        lease: None,
                    });
                    lazy::PagesFrom::Remote {
                        endpoint,
                        opts: Box::new(opts),
                        expect,
                    }
                }
            };
            let s = self
                .inner
                .lazy
                .start(&plan.work, &plan.images, &shim_cfg.fetcher, &pages)
                .map_err(|e| ShimError::Restore {
                    id: id.clone(),
                    detail: e.to_string(),
                    log: restore_log.clone(),
                })?;
            args = args.lazy_pages(true);
            Some(s)
        } else {
            None
        };
        let console = pending.receive();
        let stdio_fds = match &pipes {
            Some(cs) => Some(
                cs.stdio()
                    .map_err(|e| ShimError::io("dup stdio of", &c.bundle, e))?,
            ),
            None => None,
        };
        info!(
            "restoring {id} from {} (lazy: {})",
            plan.images.display(),
            session.is_some()
        );
        let out = c.runc.run_raw(args.args(&id), stdio_fds).await;
        if let Some(cs) = &pipes {
            cs.close();
        }
        let failed = match out {
            Ok(o) if o.status.success() => None,
            Ok(o) => Some(c.runc.with_log_tail(format!(
                "runc restore {}",
                crate::runc::outcome(&o.status, &o.stdout, &o.stderr)
            ))),
            Err(e) => Some(e.to_string()),
        };
        if let Some(detail) = failed {
            if let Some(s) = &session {
                s.stop();
            }
            if let Some(c) = console {
                c.abort();
            }
            return Err(ShimError::Restore {
                id,
                detail,
                log: restore_log,
            });
        }
        c.init.pid = read_pid(&pid_file)?;
        if let Some(console) = console {
            console.finish(&mut c.init, &id).await?;
        }
        c.init.status = ProcStatus::Running;
        c.restore = None;
        match session {
            Some(s) => {
                c.lazy_view = s.checkpoint_view();
                c.base_layer = base_layer;
                let w = lazy::spawn_waiter(id.clone(), s, c.bundle.clone(), plan.images.clone())
                    .map_err(|e| ShimError::io("spawn lazy waiter for", &c.bundle, e))?;
                c.lazy = Some(w);
            }
            None => lazy::remove_if_temp_checkpoint(&plan.images),
        }
        Ok(())
    }

    /// State of a process.
    pub async fn task_state(&self, req: StateRequest) -> Result<StateResponse> {
        let c = self.container(&req.id).await?;
        let p = process(&c, &req.exec_id)?;
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
            process(&c, &req.exec_id)?.exited.subscribe()
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
        let p = process(&c, &req.exec_id)?;
        if p.status == ProcStatus::Stopped {
            return Err(ShimError::ProcessFinished {
                id: req.id.clone(),
                exec_id: req.exec_id.clone(),
            });
        }
        if req.exec_id.is_empty() {
            if c.restore.is_some() {
                return Err(precondition(&req.id, "kill", p.status));
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
                return Err(precondition(&req.id, "kill exec in", p.status));
            }
            match nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig) {
                Ok(()) => Ok(()),
                Err(nix::errno::Errno::ESRCH) => Err(ShimError::ProcessFinished {
                    id: req.id.clone(),
                    exec_id: req.exec_id.clone(),
                }),
                Err(e) => Err(ShimError::Other(format!(
                    "kill {}/{}: {e}",
                    req.id, req.exec_id
                ))),
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
            let p = process(c, &req.exec_id)?;
            if matches!(p.status, ProcStatus::Running | ProcStatus::Paused) {
                return Err(precondition(&req.id, "delete running exec of", p.status));
            }
            let p = c.execs.remove(&req.exec_id).expect("checked above");
            return Ok(DeleteResponse {
                pid: p.pid,
                exit_status: p.exit_status,
                exited_at: MessageField::from_option(p.exited_at),
                ..Default::default()
            });
        }
        if matches!(c.init.status, ProcStatus::Running | ProcStatus::Paused) {
            return Err(precondition(&req.id, "delete", c.init.status));
        }
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
        if c.init.status == ProcStatus::Stopped {
            return Err(precondition(&req.id, "exec in", c.init.status));
        }
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
        if c.init.status != ProcStatus::Running {
            return Err(precondition(&req.id, "pause", c.init.status));
        }
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
        if c.init.status != ProcStatus::Paused {
            return Err(precondition(&req.id, "resume", c.init.status));
        }
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

    /// `runc checkpoint` honouring runc's CheckpointOptions.
    pub async fn task_checkpoint(&self, req: CheckpointTaskRequest) -> Result<()> {
        let mut copts = decode_checkpoint_options(&req)?;
        let mut c = self.container(&req.id).await?;
        copts.exit = exit_after_checkpoint(&req, &copts, &c.annotations)?;
        debug!(
            "checkpoint of {}: options {:?} ({} bytes), exit: {}",
            req.id,
            req.options.as_ref().map_or("", |a| a.type_url.as_str()),
            req.options.as_ref().map_or(0, |a| a.value.len()),
            copts.exit
        );
        if !matches!(c.init.status, ProcStatus::Running | ProcStatus::Paused) {
            return Err(precondition(&req.id, "checkpoint", c.init.status));
        }
        let image = if req.path.is_empty() {
            copts.image_path.clone()
        } else {
            req.path.clone()
        };
        if image.is_empty() {
            return Err(ShimError::InvalidArgument(format!(
                "checkpoint of {} has no image path",
                req.id
            )));
        }
        let default_work = copts.work_path.is_empty();
        let work = if default_work {
            c.bundle.join("work").join("criu-work")
        } else {
            PathBuf::from(&copts.work_path)
        };
        std::fs::create_dir_all(&work).map_err(|e| ShimError::io("create", &work, e))?;
        let (cfg, annotations) = (&c.cfg, &c.annotations);
        let dest = MemoryDestination::of(cfg, annotations)
            .map_err(|e| ShimError::InvalidArgument(format!("checkpoint of {}: {e}", req.id)))?;
        let remote = dest == MemoryDestination::PageServer;
        let store_cfg = cfg.store.clone();
        // A checkpoint to the page server or store the container was restored from is a layer
        // over that checkpoint: the pages still remote stay there (crate::remote::BaseLayer).
        let base = match (&c.base_layer, &dest) {
            (Some(b), MemoryDestination::PageServer) if b.same_server(&cfg.pageserver) => {
                Some(b.parent.clone())
            }
            (Some(b), MemoryDestination::Store(dir))
                if b.endpoint == crate::store::endpoint(dir) =>
            {
                Some(b.parent.clone())
            }
            _ => None,
        };
        // Memory still remote must be completed into the dump (crate::checkpoint_lazy).
        let paused = c.init.status == ProcStatus::Paused;
        let pending = crate::checkpoint_lazy::prepare(&c, &req.id, paused).await?;
        let args = checkpoint_args(&copts, &image, &work);
        // All memory local (no layer): the pages go to the page server while CRIU writes them.
        let streamer = (remote && pending.is_none() && base.is_none())
            .then(|| crate::remote::start_dump_stream(&cfg.pageserver, &req.id, &image))
            .flatten();
        let out = match c.runc.run_raw(args.args(&req.id), None).await {
            Ok(out) => out,
            Err(e) => {
                if let Some(p) = pending {
                    crate::checkpoint_lazy::undo(&c, &req.id, p).await;
                }
                return Err(e);
            }
        };
        if !out.status.success() {
            if let Some(p) = pending {
                crate::checkpoint_lazy::undo(&c, &req.id, p).await;
            }
            let copy = c.bundle.join("criu-dump.log");
            let _ = std::fs::copy(work.join("dump.log"), &copy);
            return Err(ShimError::Checkpoint {
                id: req.id.clone(),
                detail: c.runc.with_log_tail(format!(
                    "runc checkpoint {}",
                    crate::runc::outcome(&out.status, &out.stdout, &out.stderr)
                )),
                log: copy,
            });
        }
        if default_work {
            let _ = std::fs::remove_dir_all(&work);
        }
        match crate::criu_fixup::mark_misfired_lazy(Path::new(&image)) {
            Ok(fixed) => {
                for (pid, n) in fixed {
                    info!(
                        "checkpoint of {}: CRIU marked no page of task {pid} lazy (a page-aligned \
                         stack pointer, its is_stack misfire): {n} pages marked lazy",
                        req.id
                    );
                }
            }
            Err(e) => warn!(
                "checkpoint of {}: lazy flags of the dump not checked: {e}",
                req.id
            ),
        }
        let mut parent = None;
        let mut mark = None;
        if let Some(p) = pending {
            let t0 = std::time::Instant::now();
            let dir = PathBuf::from(&image);
            let (s, m) = crate::checkpoint_lazy::complete(
                &c,
                &req.id,
                p,
                dir,
                !copts.exit,
                base.is_some(),
                dest != MemoryDestination::Inline,
            )
            .await?;
            mark = m;
            info!(
                "checkpoint of {}: dump completed in {:?}: {} pages left to layer {:?}, {} \
                 pages still remote read from the page source",
                req.id,
                t0.elapsed(),
                s.parent_pages,
                base.as_ref().map_or("", |b| b.checkpoint.as_str()),
                s.fetched_pages,
            );
            if s.parent_pages > 0 {
                parent = base;
            }
        }
        if dest != MemoryDestination::Inline {
            let (dir, ps, cid) = (
                PathBuf::from(&image),
                cfg.pageserver.clone(),
                req.id.clone(),
            );
            let t0 = std::time::Instant::now();
            let to = dest.clone();
            let owner = self.inner.sweeper.owner(&self.inner.namespace, &req.id);
            let published = tokio::task::spawn_blocking(move || match to {
                MemoryDestination::Store(store) => {
                    let r = crate::store::commit(&dir, &store, &cid, parent.as_ref())?;
                    if let (Some(r), Some(o)) = (&r, owner) {
                        if let Err(e) = crate::retention::record_owner(&store, &r.checkpoint, &o) {
                            warn!(
                                "checkpoint of {cid}: no owner record for {:?} ({e}): the \
                                 store's retention will keep it until it is deleted by hand",
                                r.checkpoint
                            );
                        }
                    }
                    Ok(r)
                }
                _ => {
                    let streamed = streamer.map(crate::dump_stream::DumpStreamer::stop);
                    crate::remote::publish(&dir, &ps, &cid, parent.as_ref(), streamed)
                }
            })
            .await
            .map_err(|e| ShimError::Other(format!("publish of {}: {e}", req.id)))?
            .map_err(|e| {
                ShimError::Other(format!(
                    "checkpoint of {}: storing its memory {} failed: {}",
                    req.id,
                    dest.describe(),
                    error_chain(&e)
                ))
            })?;
            if let Some(r) = published {
                info!(
                    "checkpoint of {} published as {:?} at {} ({} lazy pages, {} bytes) in {:?}",
                    req.id,
                    r.checkpoint,
                    r.endpoint,
                    r.lazy_pages,
                    r.pages_bytes,
                    t0.elapsed()
                );
                // The container runs on: its next checkpoint is a layer over this one, holding
                // only the pages written from the dump on.
                if let Some(m) = mark.take() {
                    let layer = match &dest {
                        MemoryDestination::Store(dir) => crate::store::lease(dir, &r.checkpoint)
                            .and_then(|l| crate::remote::BaseLayer::stored(&r, Arc::new(l))),
                        _ => crate::remote::BaseLayer::published(&cfg.pageserver, &r),
                    };
                    match layer {
                        Ok(b) => {
                            info!(
                                "checkpoint of {}: {} written pages count as clean again; the \
                                 next checkpoint is a layer over {:?}",
                                req.id,
                                m.pages(),
                                r.checkpoint
                            );
                            m.commit();
                            c.base_layer = Some(b);
                        }
                        Err(e) => warn!(
                            "checkpoint of {}: {} cannot be the next base layer: {}",
                            req.id,
                            r.checkpoint,
                            error_chain(&e)
                        ),
                    }
                }
            }
        }
        send(
            self.events(),
            TaskCheckpointed {
                container_id: req.id.clone(),
                checkpoint: image,
                ..Default::default()
            },
        );
        if matches!(dest, MemoryDestination::Store(_)) {
            // The store grew: free what containerd no longer holds (crate::retention).
            self.inner.sweeper.watch(&store_cfg);
            self.inner.sweeper.sweep_soon(&store_cfg);
        }
        Ok(())
    }

    /// Resize a process's pty.
    pub async fn task_resize_pty(&self, req: ResizePtyRequest) -> Result<()> {
        let c = self.container(&req.id).await?;
        process(&c, &req.exec_id)?
            .shim_io
            .resize(req.width, req.height)
    }

    /// Close a process's stdin.
    pub async fn task_close_io(&self, req: CloseIORequest) -> Result<()> {
        let c = self.container(&req.id).await?;
        if req.stdin {
            process(&c, &req.exec_id)?.shim_io.close_stdin();
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
                return Err(precondition(&req.id, "get stats of", c.init.status));
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

/// The stdio of a process runc is about to start: pipes (set up now and recorded in the
/// process), or a console socket on which runc sends the pty master while it runs.
enum PendingStdio {
    Pipes(Option<io::ContainerStdio>),
    Console(ConsoleSocket),
}

impl PendingStdio {
    /// Pipes or a console socket, as the process's stdio asks.
    fn new(p: &mut Process) -> Result<Self> {
        if p.stdio.terminal {
            return Ok(PendingStdio::Console(ConsoleSocket::new()?));
        }
        let (cs, ss, done) = io::setup_pipes(&p.stdio)?;
        p.shim_io = ss;
        p.io_done = Some(done);
        Ok(PendingStdio::Pipes(Some(cs)))
    }

    /// The console socket to give runc (`--console-socket`).
    fn console_path(&self) -> Option<PathBuf> {
        match self {
            PendingStdio::Console(s) => Some(s.path()),
            PendingStdio::Pipes(_) => None,
        }
    }

    /// The container's ends of the pipes, to give runc as its stdio.
    fn take_pipes(&mut self) -> Option<io::ContainerStdio> {
        match self {
            PendingStdio::Pipes(cs) => cs.take(),
            PendingStdio::Console(_) => None,
        }
    }

    /// Start waiting for the pty master (call right before runc runs).
    fn receive(self) -> Option<PendingConsole> {
        match self {
            PendingStdio::Console(s) => {
                Some(PendingConsole(tokio::task::spawn_blocking(move || {
                    s.receive(CONSOLE_TIMEOUT)
                })))
            }
            PendingStdio::Pipes(_) => None,
        }
    }
}

/// A pty master on its way from runc.
struct PendingConsole(tokio::task::JoinHandle<Result<std::fs::File>>);

impl PendingConsole {
    /// runc failed: stop waiting.
    fn abort(self) {
        self.0.abort();
    }

    /// Take the pty master and copy the process's stdio through it.
    async fn finish(self, p: &mut Process, what: &str) -> Result<()> {
        let master = self
            .0
            .await
            .map_err(|e| ShimError::Other(format!("console of {what}: {e}")))??;
        let (ss, done) = io::setup_console(&p.stdio, master)?;
        p.shim_io = ss;
        p.io_done = Some(done);
        Ok(())
    }
}

fn process<'a>(c: &'a Container, exec_id: &str) -> Result<&'a Process> {
    c.process(exec_id)
        .ok_or_else(|| ShimError::ProcessNotFound {
            id: c.id.clone(),
            exec_id: exec_id.to_owned(),
        })
}

fn precondition(id: &str, op: &'static str, status: ProcStatus) -> ShimError {
    ShimError::FailedPrecondition {
        id: id.to_owned(),
        op,
        state: status.name().to_owned(),
    }
}

fn read_pid(path: &Path) -> Result<u32> {
    let s = std::fs::read_to_string(path).map_err(|e| ShimError::io("read pid file", path, e))?;
    s.trim()
        .parse()
        .map_err(|_| ShimError::Other(format!("bad pid {:?} in {}", s.trim(), path.display())))
}

fn unmount(rootfs: &Path) {
    if let Some(p) = rootfs.to_str() {
        if let Err(e) = containerd_shim::mount::umount_recursive(Some(p), 0) {
            warn!("unmount {p}: {e}");
        }
    }
}

/// Annotation making every checkpoint of the container end it. runc's CheckpointOptions can
/// only ask for the exit (`exit` is false by default, so "leave running" and "not said" are
/// the same message), and nerdctl, Docker and `ctr tasks checkpoint` send them empty to any
/// runtime but `io.containerd.runc.*`: a front end that means "stop it" cannot say so to us.
pub const ANNOTATION_CHECKPOINT_EXIT: &str = "io.distriproc.checkpoint-exit";

/// Whether the checkpoint ends the container: when its options ask for it, or when
/// [`ANNOTATION_CHECKPOINT_EXIT`] is `true`; else it runs on (as under the runc shim).
pub fn exit_after_checkpoint(
    req: &CheckpointTaskRequest,
    copts: &CheckpointOptions,
    annotations: &std::collections::HashMap<String, String>,
) -> Result<bool> {
    match annotations.get(ANNOTATION_CHECKPOINT_EXIT).map(|v| v.trim()) {
        None | Some("false") => Ok(copts.exit),
        Some("true") => Ok(true),
        Some(v) => Err(ShimError::InvalidArgument(format!(
            "checkpoint of {}: annotation {ANNOTATION_CHECKPOINT_EXIT}={v:?}: expected true or false",
            req.id
        ))),
    }
}

/// Decode the request's CheckpointOptions (absent or empty Any = defaults).
pub fn decode_checkpoint_options(req: &CheckpointTaskRequest) -> Result<CheckpointOptions> {
    let Some(any) = req.options.as_ref() else {
        return Ok(CheckpointOptions::default());
    };
    match options::type_name(&any.type_url) {
        "" => Ok(CheckpointOptions::default()),
        options::CHECKPOINT_OPTIONS => {
            CheckpointOptions::parse_from_bytes(&any.value).map_err(|e| {
                ShimError::InvalidArgument(format!("checkpoint options of {}: {e}", req.id))
            })
        }
        _ => Err(ShimError::UnknownOptions {
            type_url: any.type_url.clone(),
        }),
    }
}

/// `runc checkpoint` arguments for the given options.
pub fn checkpoint_args(o: &CheckpointOptions, image: &str, work: &Path) -> CheckpointArgs {
    let mut a = CheckpointArgs::new(image)
        .work_path(work)
        .leave_running(!o.exit)
        .criu_flags(CriuFlags {
            tcp_established: o.open_tcp,
            ext_unix_sk: o.external_unix_sockets,
            shell_job: o.terminal,
            file_locks: o.file_locks,
            empty_ns: o.empty_namespaces.clone(),
        });
    if !o.cgroups_mode.is_empty() {
        a.manage_cgroups_mode = Some(o.cgroups_mode.clone());
    }
    a
}

/// The OCI annotations of the bundle's config.json (empty if unreadable).
pub fn bundle_annotations(bundle: &Path) -> HashMap<String, String> {
    std::fs::read_to_string(bundle.join("config.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .and_then(|v| v.get("annotations").cloned())
        .and_then(|a| serde_json::from_value(a).ok())
        .unwrap_or_default()
}

/// The shim configuration for a container: the runtime options' config (config_body, else
/// `config_path`, else `$DISTRIPROC_CONFIG`, else /etc/distriproc/shim.toml, else defaults),
/// overridden by the bundle's `io.distriproc.*` annotations.
pub fn shim_config(bundle: &Path, opts: &ShimOptions) -> Result<ShimConfig> {
    config_with_annotations(opts, &bundle_annotations(bundle))
}

/// [`shim_config`] for annotations the caller has already read.
fn config_with_annotations(
    opts: &ShimOptions,
    annotations: &HashMap<String, String>,
) -> Result<ShimConfig> {
    let mut cfg = opts.load_config()?;
    cfg.apply_annotations(annotations)
        .map_err(|e| ShimError::InvalidArgument(e.to_string()))?;
    Ok(cfg)
}

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

#[cfg(test)]
mod tests {
    use super::*;
    use containerd_shim::protos::protobuf::well_known_types::any::Any;

    #[derive(Default)]
    struct Captured(StdMutex<Vec<String>>);
    impl EventSink for Captured {
        fn publish(&self, topic: String, _event: Box<dyn MessageDyn>) {
            self.0.lock().unwrap().push(topic);
        }
    }

    #[test]
    fn checkpoint_exits_when_its_options_or_the_annotation_say_so() {
        use std::collections::HashMap;
        let ann = |v: Option<&str>| -> HashMap<String, String> {
            v.map(|v| HashMap::from([(ANNOTATION_CHECKPOINT_EXIT.to_string(), v.to_string())]))
                .unwrap_or_default()
        };
        let with = |exit: bool| {
            let o = CheckpointOptions {
                exit,
                ..Default::default()
            };
            let mut any = Any::new();
            any.type_url = format!("type.googleapis.com/{}", options::CHECKPOINT_OPTIONS);
            any.value = o.write_to_bytes().unwrap();
            CheckpointTaskRequest {
                id: "c".into(),
                options: MessageField::some(any),
                ..Default::default()
            }
        };
        let bare = CheckpointTaskRequest {
            id: "c".into(),
            ..Default::default()
        };
        let exit = |req: &CheckpointTaskRequest, a: Option<&str>| {
            let copts = decode_checkpoint_options(req).unwrap();
            exit_after_checkpoint(req, &copts, &ann(a))
        };
        // Without the annotation the options decide (absent or empty: run on).
        assert!(!exit(&bare, None).unwrap());
        assert!(!exit(&with(false), None).unwrap());
        assert!(exit(&with(true), None).unwrap());
        assert!(exit(&with(true), Some("false")).unwrap());
        // With it every checkpoint ends the container: runc's options cannot say "run on".
        assert!(exit(&bare, Some("true")).unwrap());
        assert!(exit(&with(false), Some("true")).unwrap());
        let e = exit(&bare, Some("yes")).unwrap_err().to_string();
        assert!(e.contains(ANNOTATION_CHECKPOINT_EXIT), "{e}");
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
    fn checkpoint_options_map_to_flags() {
        let o = CheckpointOptions {
            exit: true,
            open_tcp: true,
            file_locks: true,
            terminal: true,
            external_unix_sockets: true,
            empty_namespaces: vec!["network".into()],
            ..Default::default()
        };
        let a = checkpoint_args(&o, "/img", Path::new("/w"));
        assert!(!a.leave_running);
        let v: Vec<String> = a
            .args("c")
            .into_iter()
            .map(|s| s.into_string().unwrap())
            .collect();
        for f in [
            "--tcp-established",
            "--file-locks",
            "--shell-job",
            "--ext-unix-sk",
            "--empty-ns",
        ] {
            assert!(v.iter().any(|x| x == f), "{f} missing in {v:?}");
        }
        let a = checkpoint_args(&CheckpointOptions::default(), "/img", Path::new("/w"));
        assert!(a.leave_running);
    }

    #[test]
    fn checkpoint_options_decoding() {
        let mut req = CheckpointTaskRequest::default();
        assert!(!decode_checkpoint_options(&req).unwrap().exit);
        let o = CheckpointOptions {
            exit: true,
            ..Default::default()
        };
        let mut any = Any::new();
        any.type_url = "containerd.runc.v1.CheckpointOptions".into();
        any.value = o.write_to_bytes().unwrap();
        req.options = MessageField::some(any.clone());
        assert!(decode_checkpoint_options(&req).unwrap().exit);
        any.type_url = "x.Other".into();
        req.options = MessageField::some(any);
        assert!(decode_checkpoint_options(&req).is_err());
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
