//! Create: the container's options and configuration resolved once, its rootfs mounted and
//! `runc create` run, or, for a checkpoint, the restore planned for Start.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::Arc,
};

use containerd_shim::{
    api::{CreateTaskRequest, CreateTaskResponse},
    protos::{
        events::task::{TaskCreate, TaskIO},
        protobuf::MessageField,
    },
};
use distriproc_config::ShimConfig;
use runc::options::CreateOpts;
use tokio::sync::Mutex;

use crate::{
    container::{Container, Process, RestorePlan},
    error::{Result, ShimError},
    events::send,
    io::StdioPaths,
    oci_runtime::OciRuntime,
    options::{self, ShimOptions},
    stdio::PendingStdio,
    task::{read_pid, unmount, Slot, TaskService},
};

impl TaskService {
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
        let runc = self
            .inner
            .runtimes
            .for_container(&opts, &self.inner.namespace, &bundle)?;
        let rootfs = bundle.join("rootfs");
        let mut rootfs_mounted = false;
        if !req.rootfs.is_empty() {
            std::fs::create_dir_all(&rootfs).map_err(|e| ShimError::io("create", &rootfs, e))?;
            for m in &req.rootfs {
                if let Err(e) = containerd_shim::util::mount_rootfs(m, &rootfs).await {
                    // The mounts made so far go with the failed Create.
                    unmount(&rootfs);
                    return Err(ShimError::Mount {
                        id: req.id.clone(),
                        detail: e.to_string(),
                    });
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
        runc: Arc<dyn OciRuntime>,
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
            if let Err(e) = runc.create(&req.id, &bundle, &copts).await {
                if let Some(c) = console {
                    c.abort();
                }
                return Err(e);
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
            base_layer: Default::default(),
            writeback: None,
        })
    }
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

/// The memory limit of the bundle's config.json (`linux.resources.memory.limit`) in bytes; 0
/// when there is none (absent, unreadable, or -1).
pub fn bundle_memory_limit(bundle: &Path) -> u64 {
    std::fs::read_to_string(bundle.join("config.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .and_then(|v| v.pointer("/linux/resources/memory/limit")?.as_i64())
        .and_then(|l| u64::try_from(l).ok())
        .unwrap_or(0)
}

/// The shim configuration for a container: the runtime options' config (config_body, else
/// `config_path`, else `$DISTRIPROC_CONFIG`, else /etc/distriproc/shim.toml, else defaults),
/// overridden by the bundle's `io.distriproc.*` annotations.
pub fn shim_config(bundle: &Path, opts: &ShimOptions) -> Result<ShimConfig> {
    config_with_annotations(opts, &bundle_annotations(bundle))
}

/// [`shim_config`] for annotations the caller has already read.
pub(crate) fn config_with_annotations(
    opts: &ShimOptions,
    annotations: &HashMap<String, String>,
) -> Result<ShimConfig> {
    let mut cfg = opts.load_config()?;
    cfg.apply_annotations(annotations)
        .map_err(|e| ShimError::InvalidArgument(e.to_string()))?;
    Ok(cfg)
}
