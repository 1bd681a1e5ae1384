//! Checkpoint: `runc checkpoint` honouring runc's CheckpointOptions, then the memory published
//! where the container's configuration says (the node-local store, a page server, or kept in
//! containerd's tar), as a layer over the checkpoint the container was restored from when it
//! is stored there.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
};

use containerd_shim::{
    api::CheckpointTaskRequest,
    protos::{events::task::TaskCheckpointed, protobuf::Message, shim::oci::CheckpointOptions},
};
use distriproc_runtime::error_chain;
use log::{debug, info, warn};

use crate::{
    container::ProcStatus,
    error::{Result, ShimError},
    events::send,
    options,
    runc_cmd::{CheckpointArgs, CriuFlags},
    store::MemoryDestination,
    task::TaskService,
};

impl TaskService {
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
        c.init.require(
            &req.id,
            "checkpoint",
            &[ProcStatus::Running, ProcStatus::Paused],
        )?;
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
        // No write-back round runs while this checkpoint builds the next layer (its parent is
        // the base layer read here; crate::writeback).
        let _turn = match c.lazy_view.as_ref().map(|v| v.probe.clone()) {
            Some(probe) => Some(
                tokio::task::spawn_blocking(move || probe.layer_turn())
                    .await
                    .map_err(|source| ShimError::Background {
                        what: format!("waiting for the write-back of {} to finish", req.id),
                        source,
                    })?,
            ),
            None => None,
        };
        // A checkpoint to the page server or store the container was restored from is a layer
        // over that checkpoint: the pages still remote stay there (crate::remote::BaseLayer).
        let base = match (&c.base_layer.get(), &dest) {
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
            .map_err(|source| ShimError::Background {
                what: format!("publish of the checkpoint of {}", req.id),
                source,
            })?
            .map_err(|e| ShimError::Publish {
                id: req.id.clone(),
                to: dest.describe(),
                detail: error_chain(&e),
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
                            if !matches!(dest, MemoryDestination::Store(_)) {
                                let ps = cfg.pageserver.clone();
                                rebase_fetcher(&mut c, &req.id, &ps, &b).await;
                            }
                            c.base_layer.set(Some(b));
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
}

/// Has the fetcher of `c` read from the layer `b` just published (see
/// [`crate::checkpoint_lazy::rebase`]); a failure only leaves the written pages pinned.
async fn rebase_fetcher(
    c: &mut crate::container::Container,
    id: &str,
    cfg: &distriproc_config::pageserver::PageServerClientConfig,
    b: &crate::remote::BaseLayer,
) {
    let Some(mut view) = c.lazy_view.clone() else {
        return;
    };
    let (cfg, b) = (cfg.clone(), b.clone());
    let r = tokio::task::spawn_blocking(move || {
        crate::checkpoint_lazy::rebase(&mut view, &cfg, &b).map(|n| (view, n, b))
    })
    .await;
    match r {
        Ok(Ok((view, n, b))) => {
            if view.remote.is_remote() {
                info!(
                    "checkpoint of {id}: the fetcher reads from {:?} now; {n} pages written \
                     before it may be evicted again",
                    b.parent.checkpoint
                );
            }
            c.lazy_view = Some(view);
        }
        Ok(Err(e)) => warn!(
            "checkpoint of {id}: the fetcher stays on its old layer, written pages stay \
             resident: {e}"
        ),
        Err(e) => warn!("checkpoint of {id}: rebase of the fetcher: {e}"),
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

#[cfg(test)]
mod tests {
    use super::*;
    use containerd_shim::protos::protobuf::{well_known_types::any::Any, MessageField};

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
}
