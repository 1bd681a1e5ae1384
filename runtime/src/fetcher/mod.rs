//! The in-process replacement for `criu lazy-pages`: listens on `<work>/lazy-pages.socket`,
//! receives each restored task's userfaultfd from `criu restore --lazy-pages`, serves its page
//! faults from a [`PageSource`] and fills the rest in the background.
//!
//! It owns the handshake and the fault/fill loop. It does not run criu or runc, and it does not
//! know where pages live (that is the [`PageSource`]).
//!
//! # Handshake (criu/uffd.c; docs/criu-facts.md §1)
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
//!   address, with an aligned window of `fault_around_pages` around it (only pages of the same
//!   iov not installed yet, per the task's bitmap). A fault outside gets `UFFDIO_ZEROPAGE`, as
//!   do pages the source reports as zero.
//! * Events, applied before the faults read in the same batch: `FORK` adds the child's uffd
//!   with a copy of the parent's remaining state (same pid for the source); `REMAP` shifts the
//!   iovs (requests keep dump-time addresses); `UNMAP` and `REMOVE` drop the range. Deviation
//!   from criu: `REMOVE` does not `UFFDIO_UNREGISTER` (that splits the VMA and a later mremap of
//!   the region fails); later faults there get zero pages, as the kernel would give.
//! * Copy errors: `EEXIST` counts the page as present and wakes it; `EAGAIN` re-queues the fault
//!   until the pending events are drained; `ESRCH`/`ENOSPC` mean the task is gone; `ENOENT`
//!   (range unmapped meanwhile) is skipped and the faulting thread woken.
//! * Idle tasks do not report their exit; a harmless `UFFDIO_WRITEPROTECT` probe once a second
//!   (`ESRCH` when the mm is gone) lets `wait()` return when every task has exited.
//!
//! One dedicated OS thread runs an epoll loop over the stop eventfd, the socket and every uffd.
//! Demand faults are served first (with a small aligned fault-around window); the background
//! fill copies `fill_batch_pages` at a time and only when no uffd is readable. The fault path
//! does no allocation and no logging; one summary line is logged at the end. On an abnormal
//! end (error or `stop()`), pages never installed are poisoned (`UFFDIO_POISON`, SIGBUS on
//! access) so that no task silently reads zeros after the uffds close.

mod server;
mod space;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use distriproc_config::FillPolicy;

use crate::images::ImageError;
use crate::source::{PageSource, SourceError};
use crate::stats::FetchCounters;
pub use crate::stats::{FetchStats, LatencySummary};

/// The socket name criu restore connects to, relative to its work dir.
pub const LAZY_PAGES_SOCKET: &str = "lazy-pages.socket";
/// The restore-finished marker, "RSTF".
pub const RESTORE_FINISHED: u32 = 0x5253_5446;
/// Upper bound of `fill_batch_pages`.
pub const MAX_FILL_BATCH_PAGES: usize = 4096;
/// Upper bound of `fault_around_pages`.
pub const MAX_FAULT_AROUND_PAGES: usize = 512;

/// Fetcher tuning.
#[derive(Debug, Clone)]
pub struct FetcherOptions {
    /// What happens to pages nobody touched: `Full` fills them after restore finishes, `None`
    /// never moves them, `Profile` behaves like `Full` for now.
    pub fill: FillPolicy,
    /// Pages per background copy (1..=[`MAX_FILL_BATCH_PAGES`]); faults are checked between.
    pub fill_batch_pages: usize,
    /// Aligned window installed around a fault, in pages (power of two, 1 = off).
    pub fault_around_pages: usize,
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
            fault_around_pages: 16,
            accept_timeout: Duration::from_secs(30),
            handshake_timeout: Duration::from_secs(30),
            restore_timeout: Duration::from_secs(300),
        }
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
        if opts.fill_batch_pages == 0 || opts.fill_batch_pages > MAX_FILL_BATCH_PAGES {
            return Err(FetchError::BadOption {
                name: "fill_batch_pages",
                value: opts.fill_batch_pages,
            });
        }
        if !opts.fault_around_pages.is_power_of_two()
            || opts.fault_around_pages > MAX_FAULT_AROUND_PAGES
        {
            return Err(FetchError::BadOption {
                name: "fault_around_pages",
                value: opts.fault_around_pages,
            });
        }
        Ok(LazyPagesServer {
            inner: server::Prepared::new(work_dir, images, source, opts)?,
        })
    }

    /// The socket path as criu sees it.
    pub fn socket_path(&self) -> &Path {
        &self.inner.socket_path
    }

    /// Runs the fetcher on a dedicated OS thread; returns at once.
    pub fn spawn(self) -> Result<FetcherHandle, FetchError> {
        let counters = Arc::new(FetchCounters::default());
        let (stop, thread) = self.inner.spawn(counters.clone())?;
        Ok(FetcherHandle {
            counters,
            stop,
            thread,
        })
    }
}

/// A running fetcher.
pub struct FetcherHandle {
    counters: Arc<FetchCounters>,
    stop: Arc<server::StopFd>,
    thread: JoinHandle<Result<(), FetchError>>,
}

impl FetcherHandle {
    /// A live snapshot of the counters (cheap: atomics).
    pub fn stats(&self) -> FetchStats {
        self.counters.snapshot()
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
        r.map(|()| self.counters.snapshot())
    }
}
