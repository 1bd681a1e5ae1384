//! Start of a container created from a checkpoint: `runc restore`, lazily when the backend
//! is, with its pages from the checkpoint's own files, the node-local store or a page server.

use distriproc_runtime::error_chain;
use distriproc_runtime::protocol::upload::ParentRef;
use log::info;

use crate::{
    container::{Container, ProcStatus, RestorePlan},
    error::{Result, ShimError},
    lazy,
    runc_cmd::{CriuFlags, RestoreArgs},
    stdio::PendingStdio,
    task::{read_pid, TaskService},
};

impl TaskService {
    /// `runc restore` of a created-from-checkpoint container (lazy when the backend is).
    pub(crate) async fn restore(&self, c: &mut Container, plan: &RestorePlan) -> Result<()> {
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
                .start(
                    &plan.work,
                    &plan.images,
                    &shim_cfg.fetcher,
                    &pages,
                    crate::create::bundle_memory_limit(&c.bundle),
                )
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
        if let Some(s) = &session {
            if let Err(e) = s.enable_eviction(i32::try_from(c.init.pid).unwrap_or(-1)) {
                log::warn!(
                    "{id}: the memory budget is not kept (no eviction): {}",
                    error_chain(&e)
                );
            }
        }
        if let Some(console) = console {
            console.finish(&mut c.init, &id).await?;
        }
        c.init.status = ProcStatus::Running;
        c.restore = None;
        match session {
            Some(s) => {
                c.lazy_view = s.checkpoint_view();
                c.base_layer.set(base_layer);
                let budget_pages = match s.stats() {
                    lazy::SessionStats::Native(n) => n.fetch.budget_pages,
                    lazy::SessionStats::Criu(_) => 0,
                };
                crate::writeback::start(c, &id, budget_pages);
                let w = lazy::spawn_waiter(id.clone(), s, c.bundle.clone(), plan.images.clone())
                    .map_err(|e| ShimError::io("spawn lazy waiter for", &c.bundle, e))?;
                c.lazy = Some(w);
            }
            None => lazy::remove_if_temp_checkpoint(&plan.images),
        }
        Ok(())
    }
}
