//! The in-process replacement for `criu lazy-pages`: listens on `<work>/lazy-pages.socket`,
//! receives each restored task's userfaultfd from `criu restore --lazy-pages`, serves its page
//! faults from a [`PageSource`] and fills the rest in the background.
//!
//! It owns the handshake and the fault/fill loop. It does not run criu or runc, and it does not
//! know where pages live (that is the [`PageSource`]).
//!
//! # Handshake (criu/uffd.c)
//!
//! ```text
//! criu restore                                   fetcher (listening before restore starts)
//!   connect(lazy-pages.socket)  ───────────────▶ accept once, close the listener
//!   per pstree entry, in restore order:
//!     i32 pid (LE, virtual pid)  ──────────────▶ read exactly 4 bytes
//!     pid >= 0: 1 byte 0x00 + SCM_RIGHTS(uffd) ─▶ recvmsg; serve faults from now on
//!     pid <  0: zombie, nothing follows
//!   u32 0x52535446 "RSTF"       ───────────────▶ restore finished: background fill may start
//!   close                                        (the fetcher never writes to the socket)
//! ```
//!
//! # What is served how
//!
//! * Lazy iovs: `PE_LAZY` pagemap entries ∩ the VMAs of `mm-<pid>.img`, split at VMA ends (as
//!   criu/uffd.c `collect_iovs`). A fault inside one is served from the source at its dump-time
//!   address: the faulting page first (its thread is woken at once), then a prefetch chosen by
//!   the task's access-pattern detector (`prefetch.rs`): the aligned `fault_around_pages`
//!   window on random access, a window doubling up to `prefetch_max_pages` on a forward
//!   scan, the next pages of a constant stride. Only pages nobody claimed in the task's shared
//!   atomic bitmap are prefetched. A fault outside the iovs gets `UFFDIO_ZEROPAGE`, as do pages
//!   the source reports as zero.
//! * Events, applied before the faults read in the same batch: `FORK` adds the child's uffd
//!   with a copy of the parent's remaining state (same pid for the source); `REMAP` shifts the
//!   iovs (requests keep dump-time addresses); `UNMAP` and `REMOVE` drop the range. Deviation
//!   from criu: `REMOVE` does not `UFFDIO_UNREGISTER` (that splits the VMA and a later mremap of
//!   the region fails); later faults there get zero pages, as the kernel would give. A `REMOVE`
//!   of the evictor's own `madvise` (`budget.rs`: it announces its ranges first) leaves the
//!   range served: the pages are remote again.
//! * Copy errors: `EEXIST` counts the page as present and wakes it; `EAGAIN` re-queues the fault
//!   until the pending events are drained; `ESRCH`/`ENOSPC` mean the task is gone; `ENOENT`
//!   (range unmapped meanwhile) is skipped and the faulting thread woken.
//! * Idle tasks do not report their exit; a harmless `UFFDIO_WRITEPROTECT` probe once a second
//!   (`ESRCH` when the mm is gone) lets `wait()` return when every task has exited.
//!
//! # Threads
//!
//! One dedicated OS thread (the fault thread) runs an epoll loop over the stop eventfd, the
//! socket, every uffd and the workers' eventfd: it serves faults and address-space events only.
//! `fill_threads` fill workers (`fill.rs`) install everything else: first the runs of a replayed
//! working-set profile, then the background fill, in `fill_batch_pages` runs claimed in the
//! task's bitmap, each read from the source in one call and installed with one `UFFDIO_COPY`
//! per contiguous piece (DONTWAKE, then one wake). With `fault_threads > 1` the fault thread
//! only reads the uffds and applies events, and fault helpers (`fault.rs`) serve the faults,
//! several at once (for a remote source, where each fault waits for a round trip). So a demand fault never waits behind a fill
//! batch or a slow source read of the fill; the workers read-lock a task's layout only while
//! installing. Every lazy page has one bit: whoever claims it installs it, so fill, prefetch and
//! faults do not duplicate work (a faulting page is installed by the fault thread regardless;
//! `EEXIST` is harmless), and page counters count distinct pages. The fault path does no
//! allocation and no logging; one summary line is logged at the end. On an abnormal end (error
//! or `stop()`), the workers are stopped and pages never installed are poisoned
//! (`UFFDIO_POISON`, SIGBUS on access) so that no task silently reads zeros after the uffds
//! close.
//!
//! # The memory budget
//!
//! With `memory_budget` the fill stops short of the budget and, once
//! [`FetcherHandle::enable_eviction`] was called (the shim does when the restored init runs),
//! an evictor thread makes cold clean pages remote again to keep it (`budget.rs`). The fetcher
//! then serves for the tasks' whole life.
//!
//! # Fill policies
//!
//! * `full`: the workers fill everything once restore finished (and map zero pages into holes
//!   of up to 64 pages between lazy ranges, which would otherwise fault one by one).
//! * `none`: only faulted (and prefetched) pages move; the fetcher serves until every task
//!   exited or `stop()`.
//! * `profile`: the checkpoint's working-set profile ([`crate::profile`], under
//!   `profile_dir`, keyed by the checkpoint identity) is prefetched first as soon as restore
//!   finished, then everything else. Without a usable profile, the pages installed for demand
//!   faults (with their prefetch) are recorded, in first-touch order, until `profile_window`
//!   after restore finished; the profile is then saved and the fill starts. A corrupt profile
//!   is refused with a warning and a new one is recorded.
//!
//! Forks and the fill race: a fork child's bitmap is its parent's when the fork event is read,
//! minus the runs a fill worker had in flight or finished since that read began
//! (`Task::fork_bits`); the kernel holds off installs into the parent between the fork and
//! the read (EAGAIN), so every page marked present in the child really is there.

mod budget;
mod fault;
mod fill;
pub mod keeper;
mod prefetch;
mod rebase;
mod resident;
mod server;
mod space;
mod task;
mod writeback;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use distriproc_config::FillPolicy;

use crate::images::ImageError;
use crate::source::{PageSource, SourceError};
use crate::stats::FetchCounters;
pub use crate::stats::{FetchStats, LatencySummary, ProfileState};
pub use resident::{EvictionPause, LayerMark, LayerTurn, ResidencyProbe};
pub use writeback::{WriteBackError, WrittenBack, WRITEBACK_MARKER};

/// The socket name criu restore connects to, relative to its work dir.
pub const LAZY_PAGES_SOCKET: &str = "lazy-pages.socket";
/// The restore-finished marker, "RSTF".
pub const RESTORE_FINISHED: u32 = 0x5253_5446;
/// Upper bound of `fill_batch_pages`.
pub const MAX_FILL_BATCH_PAGES: usize = 4096;
/// Upper bound of `fault_around_pages`.
pub const MAX_FAULT_AROUND_PAGES: usize = 512;
/// Upper bound of `prefetch_max_pages`.
pub const MAX_PREFETCH_PAGES: usize = 2048;
/// Upper bound of `fill_threads`.
pub const MAX_FILL_THREADS: usize = 16;
/// Upper bound of `fault_threads`.
pub const MAX_FAULT_THREADS: usize = 16;

/// Fetcher tuning.
#[derive(Debug, Clone)]
pub struct FetcherOptions {
    /// What happens to pages nobody touched: `Full` fills them after restore finishes, `None`
    /// never moves them, `Profile` prefetches the recorded working set first, then fills.
    pub fill: FillPolicy,
    /// Pages per background-fill run (1..=[`MAX_FILL_BATCH_PAGES`]).
    pub fill_batch_pages: usize,
    /// Fill worker threads (1..=[`MAX_FILL_THREADS`]), times the source's
    /// [`PageSource::fill_workers_per_thread`] (2 for a page server: more requests in flight).
    pub fill_threads: usize,
    /// Threads serving demand faults (1..=[`MAX_FAULT_THREADS`]): 1 serves them on the fault
    /// thread itself (best for a local source: no hand-off); more hand them to helper threads
    /// so that the faults of several threads are served concurrently (a remote source).
    pub fault_threads: usize,
    /// Aligned window installed around a random fault, in pages (power of two, 1 = off).
    pub fault_around_pages: usize,
    /// Largest window of the sequential/stride prefetch, in pages: 0 turns detection off (only
    /// the fault-around window), else a power of two from `fault_around_pages` up to
    /// [`MAX_PREFETCH_PAGES`].
    pub prefetch_max_pages: usize,
    /// Where working-set profiles live (policy `profile`).
    pub profile_dir: PathBuf,
    /// How long after restore finished a recording restore records demand faults (and holds
    /// back the fill), and how long a replay counts profile misses.
    pub profile_window: Duration,
    /// Track which installed pages the tasks write (uffd write-protect, see `task.rs`), so that
    /// a checkpoint of a lazily restored container leaves unwritten pages to its parent layer.
    /// Costs one write-protect fault (~15 µs) on the first write to each installed page.
    pub track_writes: bool,
    /// Local memory budget in bytes (0 = unlimited): the fill stops short of it and, once
    /// [`FetcherHandle::enable_eviction`] was called, clean pages are evicted to keep it
    /// (`budget.rs`). With a budget the fetcher serves until the tasks are gone or `stop()`.
    pub memory_budget: u64,
    /// The container's cgroup memory limit in bytes (0 = none): the budget is lowered to fit
    /// under it, and one is set when the checkpoint's memory would not fit (so the fill does
    /// not run the container into its OOM killer).
    pub memory_limit: u64,
    /// How long to wait for criu to connect after `spawn`.
    pub accept_timeout: Duration,
    /// How long to wait for each pid / uffd message.
    pub handshake_timeout: Duration,
    /// How long to wait for the restore-finished marker after the last uffd.
    pub restore_timeout: Duration,
}

impl Default for FetcherOptions {
    fn default() -> Self {
        FetcherOptions {
            fill: FillPolicy::Full,
            fill_batch_pages: 256,
            fill_threads: 2,
            fault_threads: 1,
            fault_around_pages: 16,
            prefetch_max_pages: 256,
            profile_dir: PathBuf::from(crate::profile::DEFAULT_PROFILE_DIR),
            profile_window: Duration::from_secs(10),
            track_writes: true,
            memory_budget: 0,
            memory_limit: 0,
            accept_timeout: Duration::from_secs(30),
            handshake_timeout: Duration::from_secs(30),
            restore_timeout: Duration::from_secs(300),
        }
    }
}

impl FetcherOptions {
    /// The options the shim's configuration sets (every `[fetcher]` key); the socket
    /// timeouts keep their defaults.
    pub fn from_config(cfg: &distriproc_config::FetcherConfig) -> FetcherOptions {
        FetcherOptions {
            fill: cfg.fill,
            fill_batch_pages: cfg.fill_batch_pages as usize,
            fault_around_pages: cfg.fault_around_pages as usize,
            prefetch_max_pages: cfg.prefetch_max_pages as usize,
            fill_threads: cfg.fill_threads as usize,
            fault_threads: cfg.fault_threads as usize,
            handshake_timeout: Duration::from_millis(cfg.handshake_timeout_ms),
            profile_dir: cfg.profile_dir.clone(),
            profile_window: Duration::from_millis(cfg.profile_window_ms),
            track_writes: cfg.track_writes,
            memory_budget: cfg.memory_budget.bytes(),
            ..FetcherOptions::default()
        }
    }

    fn check(&self) -> Result<(), FetchError> {
        let bad = |name, value| Err(FetchError::BadOption { name, value });
        if self.fill_batch_pages == 0 || self.fill_batch_pages > MAX_FILL_BATCH_PAGES {
            return bad("fill_batch_pages", self.fill_batch_pages);
        }
        if !self.fault_around_pages.is_power_of_two()
            || self.fault_around_pages > MAX_FAULT_AROUND_PAGES
        {
            return bad("fault_around_pages", self.fault_around_pages);
        }
        if self.fill_threads == 0 || self.fill_threads > MAX_FILL_THREADS {
            return bad("fill_threads", self.fill_threads);
        }
        if self.fault_threads == 0 || self.fault_threads > MAX_FAULT_THREADS {
            return bad("fault_threads", self.fault_threads);
        }
        let p = self.prefetch_max_pages;
        if p != 0 && (!p.is_power_of_two() || p < self.fault_around_pages || p > MAX_PREFETCH_PAGES)
        {
            return bad("prefetch_max_pages", p);
        }
        Ok(())
    }
}

/// Errors of the fetcher.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// Reading the checkpoint's images failed.
    #[error("cannot read checkpoint images")]
    Images(#[from] ImageError),
    /// An option is out of range.
    #[error("invalid fetcher option {name}: {value}")]
    BadOption {
        /// The option.
        name: &'static str,
        /// Its value.
        value: usize,
    },
    /// Setting up the socket failed.
    #[error("cannot {what} {}", path.display())]
    Socket {
        /// The step.
        what: &'static str,
        /// The socket path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A system call of the loop failed.
    #[error("{what} failed")]
    Sys {
        /// The call.
        what: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Nothing arrived in time.
    #[error("timed out after {after:?} waiting for {what}")]
    Timeout {
        /// What was awaited.
        what: &'static str,
        /// The configured timeout.
        after: Duration,
    },
    /// criu closed the connection too early.
    #[error("restore closed lazy-pages.socket while the fetcher waited for {what}")]
    Closed {
        /// What was awaited.
        what: &'static str,
    },
    /// A pid message was not followed by a userfaultfd.
    #[error("no userfaultfd came with pid {pid}")]
    NoUffd {
        /// The virtual pid.
        pid: i32,
    },
    /// A pid that is not in pstree.img.
    #[error("restore sent pid {pid}, which has no images")]
    UnknownPid {
        /// The virtual pid.
        pid: i32,
    },
    /// The end marker had a wrong value.
    #[error("unexpected restore-finished marker {value:#010x}")]
    BadMarker {
        /// What arrived.
        value: u32,
    },
    /// The page source failed for a task's pages.
    #[error("cannot read pages of pid {pid} at {vaddr:#x}")]
    Source {
        /// The virtual pid.
        pid: u32,
        /// Dump-time address.
        vaddr: u64,
        /// The source's error.
        #[source]
        source: SourceError,
    },
    /// A userfaultfd operation failed in an unexpected way.
    #[error("{op} on the userfaultfd of pid {pid} at {addr:#x} failed")]
    Uffd {
        /// The ioctl.
        op: &'static str,
        /// The virtual pid.
        pid: u32,
        /// Target address.
        addr: u64,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The uffd keeper could not take a task's userfaultfd.
    #[error("uffd keeper")]
    Keeper(#[from] keeper::KeeperError),
    /// `stop()` was called before restore finished.
    #[error("fetcher stopped before the restore finished")]
    Stopped,
    /// The fetcher thread panicked.
    #[error("fetcher thread panicked")]
    Panicked,
}

/// A bound, listening lazy-pages socket with the checkpoint's lazy ranges loaded.
pub struct LazyPagesServer {
    inner: server::Prepared,
}

impl LazyPagesServer {
    /// Binds and listens on `<work_dir>/lazy-pages.socket` (via `/proc/self/fd/<dirfd>/` so long
    /// paths work; a stale socket is removed first) before returning, so `criu restore
    /// --lazy-pages` can connect right after. Reads pstree, mm and pagemap images of `images`.
    pub fn bind(
        work_dir: &Path,
        images: &Path,
        source: Arc<dyn PageSource>,
        opts: FetcherOptions,
    ) -> Result<LazyPagesServer, FetchError> {
        opts.check()?;
        Ok(LazyPagesServer {
            inner: server::Prepared::new(work_dir, images, source, opts)?,
        })
    }

    /// Hands a duplicate of every task userfaultfd (and those of forked children) to `keeper`
    /// as the fetcher receives it, so that the uffds outlive this process (see [`keeper`]).
    pub fn with_keeper(mut self, keeper: Arc<keeper::KeeperLink>) -> LazyPagesServer {
        self.inner.keeper = Some(keeper);
        self
    }

    /// The socket path as criu sees it.
    pub fn socket_path(&self) -> &Path {
        &self.inner.socket_path
    }

    /// Runs the fetcher on dedicated OS threads (the fault thread and the fill workers);
    /// returns at once.
    pub fn spawn(self) -> Result<FetcherHandle, FetchError> {
        let counters = Arc::new(FetchCounters::default());
        let reg = Arc::new(resident::Registry::new(
            self.inner.source(),
            counters.clone(),
        ));
        let (pages, tracked) = self.inner.budget_pages();
        let budget = Arc::new(budget::BudgetGate::new(pages));
        let (stop, thread) = self
            .inner
            .spawn(counters.clone(), reg.clone(), budget.clone())?;
        Ok(FetcherHandle {
            counters,
            stop,
            thread,
            probe: ResidencyProbe { reg },
            budget,
            tracked,
            evictor: std::sync::Mutex::new(None),
        })
    }
}

/// A running fetcher.
pub struct FetcherHandle {
    counters: Arc<FetchCounters>,
    stop: Arc<server::StopFd>,
    thread: JoinHandle<Result<(), FetchError>>,
    probe: ResidencyProbe,
    /// The memory budget.
    budget: Arc<budget::BudgetGate>,
    /// Whether writes are tracked (only then can pages be evicted).
    tracked: bool,
    evictor: std::sync::Mutex<Option<budget::Evictor>>,
}

impl FetcherHandle {
    /// A live snapshot of the counters (cheap: atomics).
    pub fn stats(&self) -> FetchStats {
        self.counters.snapshot()
    }

    /// A view of the memory this fetcher manages, usable after [`FetcherHandle::wait`] took
    /// the handle (a checkpoint of the restored tasks needs it; see [`crate::layer`]).
    pub fn residency_probe(&self) -> ResidencyProbe {
        self.probe.clone()
    }

    /// Starts keeping the memory budget by eviction (see `budget.rs`). `ns_of` is a host pid
    /// in the restored tasks' pid namespace (the container's init), through which their host
    /// pids are found. Without a budget, or called again, it does nothing.
    pub fn enable_eviction(&self, ns_of: i32) -> Result<(), FetchError> {
        self.probe
            .reg
            .ns_of
            .store(ns_of, std::sync::atomic::Ordering::SeqCst);
        if self.budget.pages == 0 || !self.tracked {
            if self.budget.pages > 0 {
                tracing::warn!(
                    "memory budget set but writes are not tracked (fetcher.track_writes = \
                     false): nothing can be evicted, only the fill is held back"
                );
            }
            return Ok(());
        }
        let mut ev = self.evictor.lock().unwrap_or_else(|p| p.into_inner());
        if ev.is_none() {
            *ev = Some(
                budget::Evictor::spawn(
                    self.probe.reg.clone(),
                    self.counters.clone(),
                    self.budget.clone(),
                    ns_of,
                )
                .map_err(|source| FetchError::Sys {
                    what: "spawn the evictor thread",
                    source,
                })?,
            );
        }
        Ok(())
    }

    /// Asks the fetcher to end now (restore failed, or the container is going away). Pages not
    /// installed yet are poisoned.
    pub fn stop(&self) {
        self.stop.signal();
    }

    /// Whether the fetcher thread has ended.
    pub fn is_finished(&self) -> bool {
        self.thread.is_finished()
    }

    /// Blocks until the fill is complete, every task is gone, `stop()` was called, or an error.
    pub fn wait(self) -> Result<FetchStats, FetchError> {
        let r = self.thread.join().map_err(|_| FetchError::Panicked)?;
        if let Some(mut ev) = self
            .evictor
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            ev.shutdown();
        }
        r.map(|()| self.counters.snapshot())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_from_config_and_checks() {
        let cfg = distriproc_config::FetcherConfig {
            fill: FillPolicy::Profile,
            fault_around_pages: 32,
            fill_batch_pages: 1024,
            handshake_timeout_ms: 1500,
            ..Default::default()
        };
        let o = FetcherOptions::from_config(&cfg);
        assert_eq!(o.fill, FillPolicy::Profile);
        assert_eq!(o.fault_around_pages, 32);
        assert_eq!(o.fill_batch_pages, 1024);
        assert_eq!(o.handshake_timeout, Duration::from_millis(1500));
        assert_eq!(o.fill_threads, FetcherOptions::default().fill_threads);
        assert!(o.check().is_ok());
        assert!(FetcherOptions::from_config(&Default::default())
            .check()
            .is_ok());
        let bad = [
            FetcherOptions {
                fill_threads: 0,
                ..Default::default()
            },
            FetcherOptions {
                prefetch_max_pages: 100,
                ..Default::default()
            },
            FetcherOptions {
                prefetch_max_pages: 8, // below fault_around_pages
                ..Default::default()
            },
            FetcherOptions {
                prefetch_max_pages: MAX_PREFETCH_PAGES * 2,
                ..Default::default()
            },
        ];
        for o in bad {
            assert!(
                matches!(o.check(), Err(FetchError::BadOption { .. })),
                "{o:?}"
            );
        }
        let off = FetcherOptions {
            prefetch_max_pages: 0,
            ..Default::default()
        };
        assert!(off.check().is_ok());
    }
}
