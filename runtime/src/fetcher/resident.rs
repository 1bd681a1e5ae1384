//! What the fetcher tells others about the memory it manages: [`ResidencyProbe`].
//!
//! The fault thread registers each task when its userfaultfd arrives (forks included) and
//! unregisters it when it is gone; every registration and address-space event it applies
//! (fork, mremap, munmap, MADV_DONTNEED) bumps a generation counter. A checkpoint takes a snapshot of the lazy
//! ranges before the dump and compares the generation after it: equal means no range moved or
//! vanished in between, so the snapshot describes the frozen tasks. When the fetcher ends
//! (fill complete, every task gone, stopped) the registry empties: after that nothing tracks
//! the tasks' layout, and nothing of their memory is remote any more.
//!
//! [`ResidencyProbe::begin_layer`] starts a new layer once a checkpoint of the running tasks
//! was taken: written pages count as clean again from then on (see `task`'s module docs). The
//! [`LayerMark`] it returns must be committed once the checkpoint is published; dropped or
//! aborted, it marks the pages written again. Once the checkpoint's layer serves the fetcher
//! ([`ResidencyProbe::rebase`]), the pages it holds as the tasks have them may be evicted.
//! A write-back ([`ResidencyProbe::write_back`]) builds such a layer from the running tasks'
//! memory without a checkpoint. Checkpoints and write-backs take turns
//! ([`ResidencyProbe::layer_turn`]), so each layer's parent is the one published before it.

use std::sync::atomic::Ordering::SeqCst;
use std::sync::atomic::{AtomicI32, AtomicU64};
use std::sync::{Arc, Condvar, Mutex, PoisonError};

use super::rebase::{release_written, SourceCell};
use super::task::{begin_layer, restore_dirty, Task};
use crate::residency::{PageState, Residency, ResidentRun, TaskResidency};
use crate::source::PageSource;
use crate::stats::FetchCounters;

/// The tasks a fetcher serves, shared by the fault thread and [`ResidencyProbe`]s.
pub(crate) struct Registry {
    tasks: Mutex<Vec<Arc<Task>>>,
    generation: AtomicU64,
    evict: Mutex<EvictGate>,
    evict_cv: Condvar,
    /// The page source every read goes through ([`ResidencyProbe::rebase`] replaces it).
    pub source: Arc<SourceCell>,
    /// The fetcher's counters.
    pub counters: Arc<FetchCounters>,
    /// A host pid in the tasks' pid namespace (the container's init), 0 until known.
    pub ns_of: AtomicI32,
    /// Whether a new layer (a checkpoint or a write-back) is being built.
    layering: Mutex<bool>,
    layering_cv: Condvar,
}

/// The right to build the next layer of the tasks' memory ([`ResidencyProbe::layer_turn`]):
/// a checkpoint of the running container and a write-back never interleave, so each layer's
/// parent is the one published before it. Released on drop.
#[must_use = "the turn ends when this is dropped"]
pub struct LayerTurn {
    reg: Arc<Registry>,
}

impl std::fmt::Debug for LayerTurn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LayerTurn").finish_non_exhaustive()
    }
}

impl Drop for LayerTurn {
    fn drop(&mut self) {
        *self
            .reg
            .layering
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = false;
        self.reg.layering_cv.notify_all();
    }
}

/// Who may evict now: batches run one at a time, never while paused (a checkpoint) or once
/// the fetcher is closing.
#[derive(Default)]
struct EvictGate {
    paused: usize,
    busy: bool,
    closing: bool,
}

/// A running eviction batch ([`Registry::begin_batch`]); ends on drop.
pub(crate) struct Batch<'a>(&'a Registry);

impl Drop for Batch<'_> {
    fn drop(&mut self) {
        self.0.gate().busy = false;
        self.0.evict_cv.notify_all();
    }
}

/// Holds eviction off until dropped ([`ResidencyProbe::pause_eviction`]).
#[must_use = "eviction resumes when this is dropped"]
pub struct EvictionPause {
    reg: Arc<Registry>,
}

impl std::fmt::Debug for EvictionPause {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EvictionPause").finish_non_exhaustive()
    }
}

impl Drop for EvictionPause {
    fn drop(&mut self) {
        let mut g = self.reg.gate();
        g.paused = g.paused.saturating_sub(1);
    }
}

impl Registry {
    pub fn new(source: Arc<dyn PageSource>, counters: Arc<FetchCounters>) -> Registry {
        Registry {
            tasks: Mutex::default(),
            generation: AtomicU64::default(),
            evict: Mutex::default(),
            evict_cv: Condvar::new(),
            source: Arc::new(SourceCell::new(source)),
            counters,
            ns_of: AtomicI32::new(0),
            layering: Mutex::new(false),
            layering_cv: Condvar::new(),
        }
    }

    fn gate(&self) -> std::sync::MutexGuard<'_, EvictGate> {
        self.evict.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Starts an eviction batch, unless eviction is paused or the fetcher is closing.
    pub fn begin_batch(&self) -> Option<Batch<'_>> {
        let mut g = self.gate();
        if g.paused > 0 || g.closing || g.busy {
            return None;
        }
        g.busy = true;
        Some(Batch(self))
    }

    /// Whether a batch is running.
    pub fn batch_running(&self) -> bool {
        self.gate().busy
    }

    /// No batch starts from now on (the fetcher is ending).
    pub fn close_eviction(&self) {
        self.gate().closing = true;
    }

    /// The tasks served now.
    pub fn tasks(&self) -> Vec<Arc<Task>> {
        self.lock().clone()
    }

    /// The address-space generation.
    pub fn generation(&self) -> u64 {
        self.generation.load(SeqCst)
    }

    pub fn add(&self, t: &Arc<Task>) {
        self.lock().push(t.clone());
        self.bump();
    }

    /// A task is gone. Not an address-space change: a snapshot that had it stays right for the
    /// dump (tasks that a checkpoint ends go away right after it).
    pub fn remove(&self, t: &Arc<Task>) {
        self.lock().retain(|x| !Arc::ptr_eq(x, t));
    }

    /// The fetcher ended: nothing is tracked any more.
    pub fn clear(&self) {
        self.lock().clear();
    }

    /// An address-space event was applied.
    pub fn bump(&self) {
        self.generation.fetch_add(1, SeqCst);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Arc<Task>>> {
        self.tasks.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The pages a [`ResidencyProbe::begin_layer`] counted as clean again, until the layer is
/// published ([`LayerMark::commit`]); dropped without a commit, they count as written again.
#[must_use = "commit the mark once the layer is published; dropping it undoes it"]
pub struct LayerMark {
    cleared: Vec<(Arc<Task>, Vec<usize>)>,
}

impl std::fmt::Debug for LayerMark {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LayerMark")
            .field("pages", &self.pages())
            .finish()
    }
}

impl LayerMark {
    /// Pages whose dirty bit was cleared.
    pub fn pages(&self) -> usize {
        self.cleared.iter().map(|(_, b)| b.len()).sum()
    }

    /// The bits of `t` the mark cleared.
    pub(crate) fn bits_of(&self, t: &Arc<Task>) -> &[usize] {
        self.cleared
            .iter()
            .find(|(x, _)| Arc::ptr_eq(x, t))
            .map_or(&[], |(_, b)| b.as_slice())
    }

    /// The layer was published: the pages stay clean until written again.
    pub fn commit(mut self) {
        self.cleared.clear();
    }

    /// The layer was not published: the pages count as written again.
    pub fn abort(self) {}
}

impl Drop for LayerMark {
    fn drop(&mut self) {
        for (t, bits) in self.cleared.drain(..) {
            restore_dirty(&t, bits.as_slice());
        }
    }
}

/// A cheap, cloneable view of a fetcher's lazily managed memory (see the module docs).
#[derive(Clone)]
pub struct ResidencyProbe {
    pub(crate) reg: Arc<Registry>,
}

impl std::fmt::Debug for ResidencyProbe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResidencyProbe")
            .field("generation", &self.generation())
            .finish_non_exhaustive()
    }
}

impl ResidencyProbe {
    /// Counter of registrations and address-space events; equal before and after a dump means
    /// a [`ResidencyProbe::snapshot`] taken before it still holds.
    pub fn generation(&self) -> u64 {
        self.reg.generation()
    }

    /// Holds eviction (the memory budget) off until the returned guard is dropped, waiting
    /// for a running batch to end first (a batch stops the tasks for a few milliseconds). A
    /// checkpoint takes it before it freezes the tasks and keeps it until they run again.
    pub fn pause_eviction(&self) -> EvictionPause {
        let mut g = self.reg.gate();
        g.paused += 1;
        while g.busy {
            g = self
                .reg
                .evict_cv
                .wait(g)
                .unwrap_or_else(PoisonError::into_inner);
        }
        drop(g);
        EvictionPause {
            reg: self.reg.clone(),
        }
    }

    /// Starts a new layer: every tracked task's written pages are write-protected again and
    /// count as clean (installed, identical to the layer being built) from now on. For a
    /// checkpoint, call it while the tasks are frozen, after the dump that the new layer
    /// holds; a write-back calls it on the running tasks before it reads the pages it cleared
    /// (`writeback`'s module docs say why that is right).
    pub fn begin_layer(&self) -> LayerMark {
        let tasks = self.reg.lock().clone();
        LayerMark {
            cleared: tasks
                .into_iter()
                .filter(|t| t.tracked && !t.forked)
                .map(|t| {
                    let bits = begin_layer(&t);
                    (t, bits)
                })
                .collect(),
        }
    }

    /// Waits for the turn to build the next layer (see [`LayerTurn`]): a checkpoint takes it
    /// before it freezes the tasks and keeps it until its layer serves the fetcher.
    pub fn layer_turn(&self) -> LayerTurn {
        let mut g = self
            .reg
            .layering
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        while *g {
            g = self
                .reg
                .layering_cv
                .wait(g)
                .unwrap_or_else(PoisonError::into_inner);
        }
        *g = true;
        LayerTurn {
            reg: self.reg.clone(),
        }
    }

    /// The turn if nobody holds it.
    pub fn try_layer_turn(&self) -> Option<LayerTurn> {
        let mut g = self
            .reg
            .layering
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if *g {
            return None;
        }
        *g = true;
        Some(LayerTurn {
            reg: self.reg.clone(),
        })
    }

    /// The fetcher's counters now.
    pub fn stats(&self) -> crate::stats::FetchStats {
        self.reg.counters.snapshot()
    }

    /// The source the fetcher reads from now (the last one [`ResidencyProbe::rebase`] set):
    /// it serves every page as the tasks' memory last published holds it.
    pub fn source(&self) -> Arc<dyn PageSource> {
        self.reg.source.get()
    }

    /// Makes `source` the fetcher's page source: it must serve the layer that a checkpoint of
    /// the running tasks published, whose [`LayerMark`] was committed (every page not written
    /// since that dump is as the layer holds it). The pages not written since then become
    /// evictable again (see `rebase`); returns how many.
    pub fn rebase(&self, source: Arc<dyn PageSource>) -> u64 {
        drop(self.reg.source.set(source));
        self.reg.tasks().iter().map(|t| release_written(t)).sum()
    }

    /// The current lazy ranges of every task the fetcher serves: unclaimed pages are `Remote`;
    /// a claimed (installed or being installed) page is `Clean` if the task's writes are
    /// tracked and it has not written it, else `Dirty`. Forked children are counted in
    /// `forked_remote_pages` only (they carry their parent's pid for the source, not their
    /// own).
    pub fn snapshot(&self) -> Residency {
        let tasks = self.reg.lock().clone();
        let mut out = Residency::default();
        for t in tasks {
            if t.forked {
                out.forked_remote_pages += t.remaining.load(SeqCst);
                continue;
            }
            let space = t.space();
            let mut runs = Vec::with_capacity(space.iovs.len());
            for iov in &space.iovs {
                let mut p = 0u64;
                let pages = iov.pages();
                let state = |p: u64| {
                    let b = iov.bit + usize::try_from(p).unwrap_or(usize::MAX);
                    if !t.bits.test(b) {
                        PageState::Remote
                    } else if t.tracked && !t.dirty.test(b) {
                        PageState::Clean
                    } else {
                        PageState::Dirty
                    }
                };
                while p < pages {
                    let st = state(p);
                    let s = p;
                    while p < pages && state(p) == st {
                        p += 1;
                    }
                    runs.push(ResidentRun {
                        addr: iov.start + s * 4096,
                        img: iov.img + s * 4096,
                        pages: p - s,
                        state: st,
                    });
                }
            }
            runs.sort_by_key(|r| r.addr);
            out.tasks.push(TaskResidency {
                pid: t.pid,
                source_pid: t.pid,
                tracked: t.tracked,
                runs,
            });
        }
        out
    }
}
