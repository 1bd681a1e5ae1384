//! Checkpoint of a container whose memory is still partly remote (a lazy restore whose fetcher
//! has not finished, e.g. fill policy `none`).
//!
//! CRIU's dump only writes the pages present in the tasks; pages the fetcher has not installed
//! would be missing from the checkpoint and read as zeros after its restore
//! (`distriproc_runtime::layer`). So, around `runc checkpoint`:
//!
//! 1. [`prepare`]: eviction (the memory budget) is paused, the container is frozen (`runc
//!    pause`, unless it already is) so that its address space cannot change, and the
//!    fetcher's residency is taken once its generation is stable (every event the tasks raised
//!    before the freeze has been applied).
//! 2. `runc checkpoint` dumps the frozen tasks (CRIU keeps the freezer state it found).
//! 3. [`complete`]: the generation must be unchanged (else the report may not describe the
//!    dump: refused, nothing published); then every page the fetcher still manages and the dump
//!    lacks is added to it: as a `PE_PARENT` entry when the checkpoint goes to the page server
//!    that holds the checkpoint the container was restored from (a layer over it,
//!    `crate::remote`), else copied in from the fetcher's page source. The container is thawed
//!    again if this module froze it and it keeps running.
//!
//! 4. When the container keeps running and the checkpoint goes to the page server, it becomes
//!    the container's base layer once published: the pages written before it count as clean
//!    again (the fetcher write-protects them while the tasks are still frozen), so the next
//!    checkpoint is a layer over this one holding only what was written in between. If the
//!    publish fails, they count as written again. [`rebase`] then has the fetcher read from
//!    the new layer (a verified session to it, which also becomes the lease), so that the
//!    pages it holds as the tasks have them (all not written since the dump) may be evicted
//!    under a memory budget: only pages whose copy at the source is current are.
//!
//! Refused with a clear error instead: memory still arriving through CRIU's own lazy-pages
//! daemon (no residency to complete from), and processes forked after the restore that still
//! have remote pages (the fetcher knows them only by their parent's pid).

use std::path::PathBuf;
use std::time::Duration;

use distriproc_runtime::fetcher::{EvictionPause, LayerMark};
use distriproc_runtime::layer::{complete_dump, LayerSummary};
use distriproc_runtime::residency::{PageState, Residency};
use log::{info, warn};

use crate::container::Container;
use crate::error::{Result, ShimError};
use crate::lazy::CheckpointView;
use distriproc_runtime::error_chain;

/// How long the fetcher's generation must stay still before the residency is taken.
const SETTLE: Duration = Duration::from_millis(20);
/// How long to wait for it to settle at most.
const SETTLE_LIMIT: Duration = Duration::from_secs(2);

/// A checkpoint in progress that must be completed from the fetcher's residency.
pub struct Pending {
    view: CheckpointView,
    generation: u64,
    taken: Residency,
    /// Whether [`prepare`] paused the container (and must resume it).
    paused_here: bool,
    /// No eviction (memory budget) runs until the checkpoint is over: it would stop the tasks
    /// CRIU is about to seize and change the memory the residency describes.
    _no_eviction: EvictionPause,
}

fn refused(id: &str, reason: String) -> ShimError {
    ShimError::CheckpointRefused {
        id: id.to_string(),
        reason,
    }
}

/// Decides whether the checkpoint of `c` needs completing and, if so, freezes the container
/// and takes the residency. `Ok(None)`: all memory is local, a plain dump is complete.
pub async fn prepare(c: &Container, id: &str, paused: bool) -> Result<Option<Pending>> {
    let still_lazy = c.lazy.as_ref().is_some_and(|w| !w.is_finished());
    if !still_lazy {
        return Ok(None);
    }
    let Some(view) = c.lazy_view.clone() else {
        return Err(refused(
            id,
            "its memory is still arriving through CRIU's lazy-pages daemon (fetcher mode \
             criu), whose pages a dump would miss; wait until the restore's fill completed, or \
             restore with fetcher mode native"
                .into(),
        ));
    };
    if view.probe.snapshot().tasks.is_empty() {
        return Ok(None); // the fetcher ended meanwhile: nothing is remote any more
    }
    let probe = view.probe.clone();
    let no_eviction = tokio::task::spawn_blocking(move || probe.pause_eviction())
        .await
        .map_err(|source| ShimError::Background {
            what: format!("pausing the eviction of {id} for its checkpoint"),
            source,
        })?;
    let paused_here = !paused;
    if paused_here {
        c.runc.pause(id).await?;
    }
    let taken = settle(&view).await;
    let pending = Pending {
        generation: taken.0,
        taken: taken.1,
        view,
        paused_here,
        _no_eviction: no_eviction,
    };
    if pending.taken.forked_remote_pages > 0 {
        let n = pending.taken.forked_remote_pages;
        undo(c, id, pending).await;
        return Err(refused(
            id,
            format!(
                "a process forked after the lazy restore still has {n} remote pages, which \
                 the checkpoint cannot name; retry once the fill has completed"
            ),
        ));
    }
    let remote = pending.taken.pages(PageState::Remote);
    info!(
        "checkpoint of {id}: {remote} pages still remote in {} tasks; the dump is completed \
         from the page source",
        pending.taken.tasks.len()
    );
    Ok(Some(pending))
}

/// The residency once the generation stayed still for [`SETTLE`].
async fn settle(view: &CheckpointView) -> (u64, Residency) {
    let deadline = std::time::Instant::now() + SETTLE_LIMIT;
    loop {
        let g = view.probe.generation();
        tokio::time::sleep(SETTLE).await;
        let taken = view.probe.snapshot();
        if view.probe.generation() == g || std::time::Instant::now() > deadline {
            return (view.probe.generation(), taken);
        }
    }
}

/// The checkpoint failed or was refused: thaw what [`prepare`] froze.
pub async fn undo(c: &Container, id: &str, p: Pending) {
    if p.paused_here {
        if let Err(e) = c.runc.resume(id).await {
            warn!("checkpoint of {id}: resuming the container after a failed checkpoint: {e}");
        }
    }
}

/// Completes the dump in `image` (see the module docs), leaving the pages still remote to the
/// base layer when `parent_usable` (the new checkpoint goes to the page server that holds the
/// checkpoint the tasks were restored from) and copying them in otherwise; thaws the
/// container if [`prepare`] froze it and it still runs.
///
/// With `new_layer` (the container keeps running and the checkpoint will be its base layer
/// once published), the written pages count as clean again from the dump on: the returned
/// [`LayerMark`] is committed once the checkpoint is published, and undoes that if dropped.
pub async fn complete(
    c: &Container,
    id: &str,
    p: Pending,
    image: PathBuf,
    leave_running: bool,
    parent_usable: bool,
    new_layer: bool,
) -> Result<(LayerSummary, Option<LayerMark>)> {
    let moved = p.view.probe.generation() != p.generation;
    let result = if moved {
        Err(refused(
            id,
            "the address space of its processes changed while they were frozen for the dump; \
             nothing was published, retry"
                .into(),
        ))
    } else {
        let (taken, source, dir) = (p.taken.clone(), p.view.probe.source(), image.clone());
        tokio::task::spawn_blocking(move || {
            complete_dump(&dir, &taken, parent_usable, source.as_ref())
        })
        .await
        .map_err(|source| ShimError::Background {
            what: format!("completion of the checkpoint of {id}"),
            source,
        })?
        .map_err(|e| ShimError::CompleteDump {
            id: id.to_owned(),
            dir: image.clone(),
            detail: error_chain(&e),
        })
    };
    // Still frozen: the mark describes exactly the dump.
    let mark = (new_layer && leave_running && result.is_ok()).then(|| p.view.probe.begin_layer());
    if leave_running || result.is_err() {
        undo(c, id, p).await;
    }
    result.map(|s| (s, mark))
}

/// Makes the checkpoint `layer`, just published at the page server over what the fetcher of
/// `view` reads (its [`LayerMark`] committed), the fetcher's source: a session to it, verified
/// against its digest, replaces the old one (and its lease). Returns the written pages that
/// became evictable again. Nothing changes when the restore's pages are not remote, or when
/// the session cannot be opened (the error says why; the fetcher reads on from the old layer,
/// which still holds every page that is not written).
pub fn rebase(
    view: &mut CheckpointView,
    cfg: &distriproc_config::pageserver::PageServerClientConfig,
    layer: &crate::remote::BaseLayer,
) -> Result<u64> {
    if !view.remote.is_remote() {
        return Ok(0);
    }
    let (endpoint, opts) = crate::remote::client(
        cfg,
        Some(layer.address()),
        &layer.parent.checkpoint,
        "layer",
    )
    .map_err(|e| ShimError::RemoteCheckpoint {
        checkpoint: layer.parent.checkpoint.clone(),
        endpoint: layer.endpoint.clone(),
        detail: error_chain(&e),
    })?;
    let pages = std::sync::Arc::new(crate::fetcher::connect_verified(
        &endpoint,
        &opts,
        layer.parent.digest,
    )?);
    let released = view.probe.rebase(pages.clone());
    view.remote.replace(crate::lazy::RemoteSession {
        lease: pages.keep_alive(crate::fetcher::REMOTE_KEEPALIVE),
        pages,
    });
    Ok(released)
}
