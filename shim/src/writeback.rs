//! Write-back: a remote-resident container's written pages go to the page server while it
//! runs, so that they can be evicted under a memory budget and a later checkpoint sends only
//! what was written since.
//!
//! A thread per lazily restored container whose pages come from a page server. A round runs
//! every `fetcher.writeback_interval_ms` (when pages were written), and whenever the pages
//! the memory budget cannot evict (`pinned_pages`, mostly written ones) reach a quarter of the
//! budget. A round, holding the fetcher's layer turn (no checkpoint runs meanwhile):
//!
//! 1. the fetcher writes the pages written since the last layer into a directory under the
//!    bundle as a write-back layer (`distriproc_runtime::fetcher::ResidencyProbe::write_back`:
//!    the tasks keep running; the module docs there say why the data is right);
//! 2. it is uploaded as a layer over the container's base layer (the checkpoint it was
//!    restored from, or the last layer published since), and the receipt must match;
//! 3. the layer becomes the base layer, and the fetcher reads from it
//!    (`crate::checkpoint_lazy::rebase`): the pages it holds may be evicted, and the old
//!    session's lease ends, so the page server's retention squashes the superseded write-back
//!    layer into the new one.
//!
//! A failed round changes nothing: the pages count as written again and stay resident, and
//! the next round retries after a pause. The thread ends with the fetcher (nothing remote any
//! more) or with the container.
//!
//! Not done: containers restored from the node-local store (its reader does not resolve
//! layers), nor from a page server other than `[pageserver] address` when one is set.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use distriproc_config::pageserver::PageServerClientConfig;
use distriproc_runtime::error_chain;
use distriproc_runtime::fetcher::WriteBackError;
use distriproc_runtime::protocol::upload::{pagemap_checksum, ParentRef};
use distriproc_runtime::remote::upload_checkpoint;
use log::{info, warn};

use crate::lazy::CheckpointView;
use crate::remote::{BaseLayer, SharedBase};

/// How often the thread looks at the fetcher.
const TICK: Duration = Duration::from_millis(50);
/// Shortest time between two rounds started by the budget.
const PRESSURE_SPACING: Duration = Duration::from_millis(200);
/// Pause after a failed round.
const RETRY_AFTER: Duration = Duration::from_secs(2);
/// Pause after a round refused for a lasting reason (moved memory, forked processes).
const REFUSED_AFTER: Duration = Duration::from_secs(30);

/// What one container's write-back works with.
#[derive(Debug)]
pub struct Params {
    /// The container id (for logs and layer ids).
    pub id: String,
    /// The fetcher.
    pub view: CheckpointView,
    /// The container's base layer.
    pub base: SharedBase,
    /// How to reach the page server.
    pub cfg: PageServerClientConfig,
    /// Rounds at this interval; `None`: only when the budget needs room.
    pub interval: Option<Duration>,
    /// The memory budget in pages (0 = none).
    pub budget_pages: u64,
    /// Where layers are built (a directory of the bundle).
    pub work: PathBuf,
}

/// A running write-back thread; told to stop on drop (it ends after the round it may be in,
/// without being waited for: the drop may run on the shim's event loop).
#[derive(Debug)]
pub struct WriteBack {
    stop: Arc<(Mutex<bool>, Condvar)>,
    _thread: JoinHandle<()>,
}

impl Drop for WriteBack {
    fn drop(&mut self) {
        *self.stop.0.lock().unwrap_or_else(PoisonError::into_inner) = true;
        self.stop.1.notify_all();
    }
}

/// Whether a container restored from `base` gets a write-back: its pages come from a page
/// server (not the node-local store) and an interval or a budget asks for one.
pub fn wanted(base: Option<&BaseLayer>, interval_ms: u64, budget_pages: u64) -> bool {
    base.is_some_and(|b| b.lease.is_none()) && (interval_ms > 0 || budget_pages > 0)
}

/// Starts the write-back of `c` (container `id`), just lazily restored with a budget of
/// `budget_pages`, when it gets one (`fetcher.writeback` and [`wanted`]); a thread that cannot
/// start is logged.
pub fn start(c: &mut crate::container::Container, id: &str, budget_pages: u64) {
    let interval_ms = c.cfg.fetcher.writeback_interval_ms;
    let Some(view) = c
        .lazy_view
        .clone()
        .filter(|v| c.cfg.fetcher.writeback && v.remote.is_remote())
    else {
        return;
    };
    if !wanted(c.base_layer.get().as_ref(), interval_ms, budget_pages) {
        return;
    }
    let p = Params {
        id: id.to_owned(),
        view,
        base: c.base_layer.clone(),
        cfg: c.cfg.pageserver.clone(),
        interval: (interval_ms > 0).then(|| Duration::from_millis(interval_ms)),
        budget_pages,
        work: c.bundle.join("work"),
    };
    match spawn(p) {
        Ok(w) => c.writeback = Some(w),
        Err(e) => warn!("{id}: no write-back (thread: {e})"),
    }
}

/// Starts the thread.
pub fn spawn(p: Params) -> io::Result<WriteBack> {
    let stop = Arc::new((Mutex::new(false), Condvar::new()));
    let s = stop.clone();
    let thread = std::thread::Builder::new()
        .name("dp-writeback".into())
        .spawn(move || run(p, &s))?;
    Ok(WriteBack {
        stop,
        _thread: thread,
    })
}

/// Why a round did not publish.
#[derive(Debug, thiserror::Error)]
enum RoundError {
    #[error("build the layer")]
    Build(#[from] WriteBackError),
    #[error("prepare {}", dir.display())]
    Dir {
        dir: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("page server client: {0}")]
    Client(String),
    #[error("upload {id:?}")]
    Upload {
        id: String,
        #[source]
        source: distriproc_runtime::remote::RemoteError,
    },
    #[error("the page server stored {id:?} as {found}, the layer is {expected}")]
    Mismatch {
        id: String,
        found: String,
        expected: String,
    },
}

impl RoundError {
    /// Whether retrying soon cannot help.
    fn lasting(&self) -> bool {
        matches!(
            self,
            RoundError::Build(WriteBackError::Moved { .. } | WriteBackError::Forked { .. })
        )
    }
}

fn run(mut p: Params, stop: &(Mutex<bool>, Condvar)) {
    let mut last = Instant::now();
    let mut not_before = Instant::now();
    let mut seq = 0u64;
    loop {
        {
            let g = stop.0.lock().unwrap_or_else(PoisonError::into_inner);
            let (g, _) = stop
                .1
                .wait_timeout_while(g, TICK, |stopped| !*stopped)
                .unwrap_or_else(PoisonError::into_inner);
            if *g {
                return;
            }
        }
        if !p.view.remote.is_remote() {
            return; // the fetcher ended: nothing is remote any more
        }
        let now = Instant::now();
        if now < not_before {
            continue;
        }
        let s = p.view.probe.stats();
        let due = p.interval.is_some_and(|i| now - last >= i);
        let pressed = p.budget_pages > 0
            && s.pinned_pages.saturating_mul(4) >= p.budget_pages
            && now - last >= PRESSURE_SPACING;
        if !due && !pressed {
            continue;
        }
        let Some(_turn) = p.view.probe.try_layer_turn() else {
            continue; // a checkpoint is building the next layer
        };
        last = now;
        seq += 1;
        let t0 = Instant::now();
        match round(&mut p, seq) {
            Ok(None) => {}
            Ok(Some((id, pages, released))) => info!(
                "{}: write-back layer {id:?}: {pages} written pages in {:?}; {released} may be \
                 evicted again",
                p.id,
                t0.elapsed()
            ),
            Err(e) => {
                let pause = if e.lasting() {
                    REFUSED_AFTER
                } else {
                    RETRY_AFTER
                };
                warn!(
                    "{}: write-back failed, the written pages stay resident (retry in {pause:?}): {}",
                    p.id,
                    error_chain(&e)
                );
                not_before = Instant::now() + pause;
            }
        }
    }
}

/// One round (see the module docs): the published layer's id, its pages and the pages the
/// rebase released; `None` when nothing was written.
fn round(p: &mut Params, seq: u64) -> Result<Option<(String, u64, u64)>, RoundError> {
    let Some(base) = p.base.get() else {
        return Ok(None);
    };
    let dir = p.work.join(format!("writeback-{seq}"));
    let _cleanup = RemoveOnDrop(dir.clone());
    let prep = |source| RoundError::Dir {
        dir: dir.clone(),
        source,
    };
    match std::fs::remove_dir_all(&dir) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(prep(e)),
        _ => {}
    }
    std::fs::create_dir_all(&dir).map_err(prep)?;
    let Some(layer) = p.view.probe.write_back(&dir)? else {
        return Ok(None);
    };
    let (id, digest) = publish(p, &base, &dir)?;
    let pages = layer.pages;
    layer.commit();
    let next = BaseLayer {
        endpoint: base.endpoint.clone(),
        parent: ParentRef {
            checkpoint: id.clone(),
            digest,
        },
        lease: None,
    };
    p.base.set(Some(next.clone()));
    let released = match crate::checkpoint_lazy::rebase(&mut p.view, &p.cfg, &next) {
        Ok(n) => n,
        Err(e) => {
            warn!(
                "{}: the fetcher stays on its old layer after write-back {id:?}, the written \
                 pages stay resident: {e}",
                p.id
            );
            0
        }
    };
    Ok(Some((id, pages, released)))
}

/// Uploads the layer in `dir` over `base`; its id and digest.
fn publish(
    p: &Params,
    base: &BaseLayer,
    dir: &Path,
) -> Result<(String, distriproc_runtime::protocol::upload::MemoryDigest), RoundError> {
    let id = format!("{}-wb", crate::remote::checkpoint_id(&p.id));
    let (endpoint, opts) = crate::remote::client(&p.cfg, Some(base.address()), &id, &p.id)
        .map_err(|e| RoundError::Client(error_chain(&e)))?;
    if endpoint.to_string() != base.endpoint {
        return Err(RoundError::Client(format!(
            "the configured page server {endpoint} does not hold the base layer {:?} (at {})",
            base.parent.checkpoint, base.endpoint
        )));
    }
    let prep = |source| RoundError::Dir {
        dir: dir.to_path_buf(),
        source,
    };
    let mut files = Vec::new();
    for e in std::fs::read_dir(dir).map_err(prep)? {
        files.push(e.map_err(prep)?.file_name().to_string_lossy().into_owned());
    }
    files.sort();
    let expected = pagemap_checksum(dir).map_err(prep)?;
    let found =
        upload_checkpoint(&endpoint, &opts, dir, &files, Some(&base.parent)).map_err(|source| {
            RoundError::Upload {
                id: id.clone(),
                source,
            }
        })?;
    if found != expected {
        return Err(RoundError::Mismatch {
            id,
            found: found.to_message(),
            expected: expected.to_message(),
        });
    }
    Ok((id, found))
}

/// Removes a directory when dropped.
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
