//! One tracked task (a restored process or a fork child) as shared by the fault thread and the
//! fill workers, and the install path both use: read a run of pages from the source by
//! dump-time address, then `UFFDIO_COPY` / `UFFDIO_ZEROPAGE` each contiguous piece at its
//! current address with one ioctl.
//!
//! # Write tracking
//!
//! A task whose ranges the fault thread re-registered with `MISSING|WP` is *tracked*: every
//! page is installed write-protected (`UFFDIO_COPY_MODE_WP`, atomically with the copy), so the
//! task's first write to it raises a synchronous write-protect fault; the fault thread sets the
//! page's bit in [`Task::dirty`] and only then lifts the protection ([`unprotect`]). A page
//! whose dirty bit is clear has therefore not been written since it arrived. Zero pages have no
//! protected install (`UFFDIO_ZEROPAGE` has no WP mode, and protecting them afterwards would
//! race with the task's other threads), so they are marked dirty when installed: conservative,
//! and free for a checkpoint, whose dump skips a zero page that is still zero.
//!
//! # A new layer
//!
//! Once a checkpoint of the running task has been published, the pages written before it are
//! in that layer: [`begin_layer`] (called while the task is frozen, right after the dump)
//! write-protects every dirty page again and clears its bit, so that the next checkpoint holds
//! only what is written from then on. It returns the bits it cleared; if the layer is not
//! published after all they are set again ([`restore_dirty`]), so a failed checkpoint never
//! loses a write. Two races are closed by construction: a write-protect fault being resolved
//! at the same moment (dirty bit, then unprotect) is serialised with it by [`Task::wp_gate`],
//! and a zero page being installed (dirty bit, then `UFFDIO_ZEROPAGE`, which leaves the page
//! writable) marks [`Task::zeroed`] first, which [`begin_layer`] reads after clearing: such
//! pages stay dirty for good.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering::{AcqRel, Relaxed};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize};
use std::sync::{Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

use libc::c_void;
use userfaultfd::Uffd;

use super::prefetch::Detector;
use super::space::{Bits, Space};
use super::FetchError;
use crate::images::PAGE_SIZE;
use crate::source::{PageKind, PageSource, SourceError};
use crate::stats::FetchCounters;

/// The page size as a length.
pub(crate) const PAGE: usize = crate::protocol::PAGE_SIZE;

/// The outcome of installing a run of pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Install {
    Done,
    /// The mm is changing (events pending): retry after draining events.
    Again,
    /// The task is gone.
    Gone,
    /// The range is no longer mapped or registered; nothing to install.
    Vanished,
}

/// What [`fetch_bits`] did.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Fetched {
    pub outcome: Install,
    /// Pages newly installed (not counting `EEXIST`).
    pub installed: u64,
    /// Bits dealt with from the start of the run (all of them unless `Again`/`Gone`/abort).
    pub done: usize,
}

/// Completed worker installs remembered for fork snapshots.
const RECENT: usize = 64;

/// The fill workers' runs of one task, for [`Task::fork_bits`]: the runs claimed and not
/// finished, and the last [`RECENT`] finished ones with the read epoch at completion.
#[derive(Debug)]
pub(crate) struct InstallLog {
    active: Vec<(usize, usize)>,
    recent: [(u64, usize, usize); RECENT],
    next: usize,
    /// Largest completion epoch overwritten in `recent` (+1; 0 = none).
    dropped: u64,
}

impl InstallLog {
    /// Records a run claimed by a worker (call with the log locked around the claim).
    pub fn begin(&mut self, b0: usize, n: usize) {
        self.active.push((b0, n));
    }

    /// Records the end of a run claimed with [`InstallLog::begin`].
    pub fn end(&mut self, b0: usize, n: usize, epoch: u64) {
        if let Some(i) = self.active.iter().position(|&r| r == (b0, n)) {
            self.active.swap_remove(i);
        }
        let old = self.recent[self.next];
        if old.2 > 0 {
            self.dropped = self.dropped.max(old.0 + 1);
        }
        self.recent[self.next] = (epoch, b0, n);
        self.next = (self.next + 1) % RECENT;
    }
}

pub(crate) struct Task {
    /// Virtual pid (the source's key); fork children share their parent's.
    pub pid: u32,
    pub uffd: Uffd,
    /// Whether this is a fork child (profile replay targets the restored processes only).
    pub forked: bool,
    space: RwLock<Space>,
    pub bits: Bits,
    /// Whether writes are tracked (see the module docs).
    pub tracked: bool,
    /// Pages written since they were installed or since the last [`begin_layer`] (or installed
    /// as zero pages), by bit; only meaningful when `tracked`.
    pub dirty: Bits,
    /// Pages installed as zero pages (never write-protected, so always dirty), by bit.
    pub zeroed: Bits,
    /// Pages written since they arrived from the source, by bit: like `dirty`, but never
    /// cleared by a new layer (the source still holds the content they arrived with, not the
    /// layer's), so a page with this bit clear is identical to the source's copy and may be
    /// evicted. Only meaningful when `tracked`.
    pub written: Bits,
    /// Pages installed with data and still present (not evicted or dropped), by bit.
    pub installed: Bits,
    /// Pages evicted and not faulted in since, by bit (a demand fault there is a refault).
    pub evicted: Bits,
    /// Eviction policy state per bit (see `budget.rs`).
    pub heat: Box<[AtomicU8]>,
    /// Number of set bits in `installed`.
    pub resident: AtomicU64,
    /// The ranges an eviction is dropping right now (see `budget.rs`).
    evicting: Mutex<super::budget::Announced>,
    /// Incremented by the fault thread once it has handled everything it read with the
    /// `epoch` of the same value.
    pub handled: AtomicU64,
    /// Held while a write-protect fault is resolved and while [`begin_layer`] runs.
    wp_gate: Mutex<()>,
    /// Unclaimed bits.
    pub remaining: AtomicU64,
    /// Set by whoever sees ESRCH/ENOSPC; the fault thread then drops the task.
    pub gone: AtomicBool,
    /// Fill cursor (a bit index).
    cursor: AtomicUsize,
    /// Incremented by the fault thread before each read of the uffd.
    pub epoch: AtomicU64,
    log: Mutex<InstallLog>,
    /// Access-pattern detector of the fault path.
    det: Mutex<Detector>,
}

impl Task {
    pub fn new(
        pid: u32,
        uffd: Uffd,
        space: Space,
        bits: Bits,
        forked: bool,
        tracked: bool,
    ) -> Task {
        let clear = bits.count_clear();
        let dirty = Bits::new(if tracked { bits.len() } else { 0 });
        let zeroed = Bits::new(if tracked { bits.len() } else { 0 });
        let written = Bits::new(if tracked { bits.len() } else { 0 });
        let n = bits.len();
        Task {
            pid,
            uffd,
            forked,
            space: RwLock::new(space),
            bits,
            tracked,
            dirty,
            zeroed,
            written,
            installed: Bits::new(n),
            evicted: Bits::new(n),
            heat: (0..n).map(|_| AtomicU8::new(0)).collect(),
            resident: AtomicU64::new(0),
            evicting: Mutex::new(super::budget::Announced::default()),
            handled: AtomicU64::new(0),
            wp_gate: Mutex::new(()),
            remaining: AtomicU64::new(clear),
            gone: AtomicBool::new(false),
            cursor: AtomicUsize::new(0),
            epoch: AtomicU64::new(0),
            det: Mutex::new(Detector::default()),
            log: Mutex::new(InstallLog {
                active: Vec::with_capacity(16),
                recent: [(0, 0, 0); RECENT],
                next: 0,
                dropped: 0,
            }),
        }
    }

    /// Counts bits `[b0, b0 + n)` as installed with data (resident).
    pub fn mark_installed(&self, b0: usize, n: usize, c: &FetchCounters) {
        let mut k = 0;
        for b in b0..b0 + n {
            k += u64::from(self.installed.claim(b));
        }
        if k > 0 {
            self.resident.fetch_add(k, AcqRel);
            c.resident_pages.fetch_add(k, AcqRel);
        }
    }

    /// Counts bits `[b0, b0 + n)` as no longer resident; returns how many were.
    pub fn unmark_installed(&self, b0: usize, n: usize, c: &FetchCounters) -> u64 {
        let k = self.installed.release_run(b0, n);
        if k > 0 {
            self.resident.fetch_sub(k, AcqRel);
            c.resident_pages.fetch_sub(k, AcqRel);
        }
        k
    }

    /// The write-protect gate (see the module docs); the evictor holds it while it checks its
    /// victims.
    pub fn wp_gate(&self) -> MutexGuard<'_, ()> {
        self.wp_gate.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn evicting_lock(&self) -> MutexGuard<'_, super::budget::Announced> {
        self.evicting.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn detector(&self) -> MutexGuard<'_, Detector> {
        self.det.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn log(&self) -> MutexGuard<'_, InstallLog> {
        self.log.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The bitmap of a child forked from this task, for a fork event read at `epoch`.
    ///
    /// A fork holds off installs into the parent (`UFFDIO_COPY` fails with EAGAIN) until the
    /// event is read, so a page installed in the parent but absent from the child was installed
    /// by a worker after that read began, or is still being installed. Those runs are cleared
    /// in the child's copy (a later install there meets EEXIST where the page did exist). If
    /// the log overflowed meanwhile, the child starts with everything unclaimed.
    pub fn fork_bits(&self, epoch: u64) -> Bits {
        let log = self.log();
        let child = self.bits.snapshot();
        if log.dropped > epoch {
            return Bits::new(self.bits.len());
        }
        for &(b0, n) in &log.active {
            child.release_run(b0, n);
        }
        for &(e, b0, n) in &log.recent {
            if n > 0 && e >= epoch {
                child.release_run(b0, n);
            }
        }
        child
    }

    pub fn space(&self) -> RwLockReadGuard<'_, Space> {
        self.space.read().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn space_mut(&self) -> RwLockWriteGuard<'_, Space> {
        self.space.write().unwrap_or_else(PoisonError::into_inner)
    }

    /// Claims up to `max` consecutive bits from `b0` (below `end`).
    pub fn claim(&self, b0: usize, max: usize, end: usize) -> usize {
        let n = self.bits.claim_run(b0, max, end);
        self.remaining.fetch_sub(n as u64, AcqRel);
        n
    }

    /// Gives back `n` claimed bits from `b0` (an install that has to be retried or abandoned).
    pub fn release(&self, b0: usize, n: usize) {
        let c = self.bits.release_run(b0, n);
        self.remaining.fetch_add(c, AcqRel);
    }

    /// Claims the next unclaimed run for the background fill: `(first bit, pages)`. The run
    /// stays inside one dump-time iov, so its dump-time addresses are contiguous.
    pub fn claim_next(&self, space: &Space, max: usize) -> Option<(usize, usize)> {
        let len = self.bits.len();
        let mut from = self.cursor.load(Relaxed).min(len);
        let mut wrapped = false;
        loop {
            if self.remaining.load(Relaxed) == 0 {
                return None;
            }
            let Some(b) = self.bits.next_clear(from, len) else {
                if wrapped || from == 0 {
                    return None;
                }
                wrapped = true;
                from = 0;
                continue;
            };
            let n = self.claim(b, max, space.orig_end(b));
            if n > 0 {
                self.cursor.store(b + n, Relaxed);
                return Some((b, n));
            }
            from = b + 1;
        }
    }
}

/// Reads the `n` pages of bits `[b0, b0 + n)` (claimed by the caller, contiguous in dump-time
/// addresses) from `src` in `buf`-sized chunks and installs each piece at its current address.
/// The space is read-locked only while installing a chunk, never during the source read, so
/// events are not held up by a slow source. `wake = false` installs with DONTWAKE and wakes each
/// piece once afterwards. `abort` is checked between chunks. With `zero_copy`, a source that
/// keeps its pages mapped ([`PageSource::mapped`]) is installed from directly, in runs as long
/// as the source has contiguous (not limited by `buf`).
#[allow(clippy::too_many_arguments)]
pub(crate) fn fetch_bits(
    t: &Task,
    src: &dyn PageSource,
    buf: &mut [u8],
    c: &FetchCounters,
    b0: usize,
    n: usize,
    wake: bool,
    pieces: &mut Vec<(u64, usize, usize)>,
    abort: Option<&AtomicBool>,
    zero_copy: bool,
) -> Result<Fetched, FetchError> {
    let img0 = t.space().img_of(b0);
    let cap = buf.len() / PAGE;
    let mut out = Fetched {
        outcome: Install::Done,
        installed: 0,
        done: 0,
    };
    while out.done < n {
        if abort.is_some_and(|a| a.load(Relaxed)) {
            out.outcome = Install::Again;
            return Ok(out);
        }
        let vaddr = img0 + out.done as u64 * PAGE_SIZE;
        // A source that keeps its pages mapped is installed from straight away (the fill's
        // big runs); otherwise read into `buf` first.
        let m = if zero_copy {
            src.mapped(t.pid, vaddr, n - out.done)
        } else {
            None
        };
        let (r, data): (_, &[u8]) = match m {
            Some((r, d)) => (r, d),
            None => {
                let want = (n - out.done).min(cap);
                let r = src
                    .read_pages(t.pid, vaddr, &mut buf[..want * PAGE])
                    .map_err(|source| FetchError::Source {
                        pid: t.pid,
                        vaddr,
                        source,
                    })?;
                (r, &buf[..])
            }
        };
        if r.pages == 0 {
            return Err(FetchError::Source {
                pid: t.pid,
                vaddr,
                source: SourceError::NotHere { pid: t.pid, vaddr },
            });
        }
        let got = r.pages.min(n - out.done);
        let space = t.space();
        space.pieces(b0 + out.done, got, pieces);
        for &(addr, b, len) in pieces.iter() {
            let off = (b - b0 - out.done) * PAGE;
            let (res, installed) = match r.kind {
                PageKind::Data => {
                    let (res, k, unprotected) =
                        copy_run(t, addr, &data[off..off + len * PAGE], wake, c)?;
                    if unprotected {
                        (b..b + len).for_each(|d| {
                            t.written.claim(d);
                            t.dirty.claim(d);
                        });
                    }
                    // Done: every page of the piece is present. Otherwise the first `k` are
                    // (pages met with EEXIST were counted by whoever installed them).
                    let present = if res == Install::Done {
                        len
                    } else {
                        usize::try_from(k).unwrap_or(len).min(len)
                    };
                    t.mark_installed(b, present, c);
                    (res, k)
                }
                PageKind::Zero => {
                    if t.tracked {
                        // `zeroed` before `dirty`: see the module docs (a new layer).
                        (b..b + len).for_each(|d| {
                            t.zeroed.claim(d);
                            t.written.claim(d);
                            t.dirty.claim(d);
                        });
                    }
                    zero_run(t, addr, len as u64, wake, c)?
                }
            };
            out.installed += installed;
            if !wake && installed > 0 {
                let _ = t.uffd.wake(addr as *mut c_void, len * PAGE);
            }
            match res {
                Install::Done | Install::Vanished => {}
                other => {
                    // Pieces are in bit order: everything before this one is dealt with.
                    out.done = b - b0;
                    out.outcome = other;
                    return Ok(out);
                }
            }
        }
        drop(space);
        out.done += got;
    }
    Ok(out)
}

fn uffd_err(op: &'static str, pid: u32, addr: u64, source: io::Error) -> FetchError {
    FetchError::Uffd {
        op,
        pid,
        addr,
        source,
    }
}

fn errno_outcome(e: i32) -> Option<Install> {
    match e {
        libc::EAGAIN => Some(Install::Again),
        libc::ESRCH | libc::ENOSPC => Some(Install::Gone),
        libc::ENOENT => Some(Install::Vanished),
        _ => None,
    }
}

/// A failed install ioctl, independent of the `userfaultfd` crate's error type.
pub(crate) enum IoctlError {
    /// `EAGAIN` after this many bytes.
    Partial(usize),
    /// Any other errno.
    Errno(i32),
    Other(io::Error),
}

impl From<userfaultfd::Error> for IoctlError {
    fn from(e: userfaultfd::Error) -> IoctlError {
        match e {
            userfaultfd::Error::PartiallyCopied(n) => IoctlError::Partial(n),
            userfaultfd::Error::CopyFailed(e) | userfaultfd::Error::ZeropageFailed(e) => {
                IoctlError::Errno(e as i32)
            }
            e => IoctlError::Other(io::Error::other(e)),
        }
    }
}

/// The loop `copy_run` and `zero_run` share: `op(off)` issues one ioctl for
/// `[dst + off, dst + len)`, and the loop goes on past partial progress and page by page past
/// `EEXIST` (counted as present, the page's waiter woken). Returns the outcome and the pages
/// newly installed.
fn install_loop(
    uffd: &Uffd,
    dst: u64,
    len: usize,
    c: &FetchCounters,
    mut op: impl FnMut(usize) -> Result<usize, IoctlError>,
) -> io::Result<(Install, u64)> {
    let mut off = 0usize;
    let mut installed = 0u64;
    while off < len {
        let r = op(off);
        let e = match r {
            Ok(n) if n > 0 => {
                installed += (n / PAGE) as u64;
                off += n;
                continue;
            }
            Ok(_) => return Ok((Install::Again, installed)),
            // UFFDIO_COPY's EAGAIN: `n` bytes were copied before the mm changed.
            Err(IoctlError::Partial(n)) if n > 0 && n < len - off => {
                installed += (n / PAGE) as u64;
                off += n;
                continue;
            }
            Err(IoctlError::Partial(_)) => return Ok((Install::Again, installed)),
            Err(IoctlError::Errno(e)) => e,
            Err(IoctlError::Other(e)) => return Err(e),
        };
        if e == libc::EEXIST {
            c.pages_already_present.fetch_add(1, Relaxed);
            let _ = uffd.wake((dst + off as u64) as *mut c_void, PAGE);
            off += PAGE;
            continue;
        }
        return errno_outcome(e)
            .map(|o| (o, installed))
            .ok_or_else(|| io::Error::from_raw_os_error(e));
    }
    Ok((Install::Done, installed))
}

/// UFFDIO_COPY of `src` to `dst` in `t` (one ioctl for the whole run), page by page past
/// EEXIST; counts the bytes copied. Returns the outcome, the pages newly installed and whether
/// some of them were installed without write protection although `t` is tracked (a VMA whose
/// re-registration with WP failed: `EINVAL` for a protected copy there), in which case the
/// caller must count the run as written.
pub(crate) fn copy_run(
    t: &Task,
    dst: u64,
    src: &[u8],
    wake: bool,
    c: &FetchCounters,
) -> Result<(Install, u64, bool), FetchError> {
    let len = src.len();
    let unprotected = std::cell::Cell::new(false);
    let (o, k) = install_loop(&t.uffd, dst, len, c, |off| {
        // SAFETY: `src[off..]` is a live buffer (or read-only mapping) of `len - off` bytes
        // borrowed for the call; `dst + off` is an address in the target task's registered
        // range, checked by the kernel, and the ioctl writes only into the target mm, never
        // into our memory.
        unsafe {
            let protected = if t.tracked && !unprotected.get() {
                copy_protected(
                    &t.uffd,
                    src[off..].as_ptr().cast::<c_void>(),
                    (dst + off as u64) as *mut c_void,
                    len - off,
                    wake,
                )
            } else {
                Err(IoctlError::Errno(libc::EINVAL))
            };
            if !t.tracked || matches!(protected, Err(IoctlError::Errno(libc::EINVAL))) {
                unprotected.set(t.tracked);
                t.uffd
                    .copy(
                        src[off..].as_ptr().cast::<c_void>(),
                        (dst + off as u64) as *mut c_void,
                        len - off,
                        wake,
                    )
                    .map_err(IoctlError::from)
            } else {
                protected
            }
        }
    })
    .map_err(|e| uffd_err("UFFDIO_COPY", t.pid, dst, e))?;
    c.bytes.fetch_add(k * PAGE_SIZE, Relaxed);
    Ok((o, k, unprotected.get()))
}

/// UFFDIO_ZEROPAGE of `pages` pages at `dst` in `t`, page by page past EEXIST; counts them in
/// `zero_pages`. Returns the outcome and the pages newly installed.
pub(crate) fn zero_run(
    t: &Task,
    dst: u64,
    pages: u64,
    wake: bool,
    c: &FetchCounters,
) -> Result<(Install, u64), FetchError> {
    let len = usize::try_from(pages).unwrap_or(0) * PAGE;
    let (o, k) = install_loop(&t.uffd, dst, len, c, |off| {
        // SAFETY: the ioctl only maps zero pages into the target task's registered range; the
        // kernel validates the range. No memory of ours is touched.
        unsafe {
            t.uffd
                .zeropage((dst + off as u64) as *mut c_void, len - off, wake)
                .map_err(IoctlError::from)
        }
    })
    .map_err(|e| uffd_err("UFFDIO_ZEROPAGE", t.pid, dst, e))?;
    c.zero_pages.fetch_add(k, Relaxed);
    Ok((o, k))
}

#[repr(C)]
struct UffdioCopy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}

const _: () = assert!(std::mem::size_of::<UffdioCopy>() == 40);

nix::ioctl_readwrite!(uffdio_copy, 0xAA, 0x03, UffdioCopy);

const UFFDIO_COPY_MODE_DONTWAKE: u64 = 1 << 0;
const UFFDIO_COPY_MODE_WP: u64 = 1 << 1;

/// `UFFDIO_COPY` with `MODE_WP`: the page arrives write-protected in one step (the `userfaultfd`
/// crate's `copy` has no WP mode). Same results as `Uffd::copy`.
///
/// # Safety
///
/// `src` must be readable for `len` bytes for the duration of the call.
unsafe fn copy_protected(
    uffd: &Uffd,
    src: *const c_void,
    dst: *mut c_void,
    len: usize,
    wake: bool,
) -> Result<usize, IoctlError> {
    let mut arg = UffdioCopy {
        dst: dst as u64,
        src: src as u64,
        len: len as u64,
        mode: UFFDIO_COPY_MODE_WP | if wake { 0 } else { UFFDIO_COPY_MODE_DONTWAKE },
        copy: 0,
    };
    // SAFETY: `arg` is a live, correctly laid out uffdio_copy; the caller guarantees `src`.
    match unsafe { uffdio_copy(uffd.as_raw_fd(), &mut arg) } {
        Ok(_) => Ok(usize::try_from(arg.copy).unwrap_or(0)),
        Err(nix::Error::EAGAIN) => Err(IoctlError::Partial(usize::try_from(arg.copy).unwrap_or(0))),
        Err(e) => Err(IoctlError::Errno(e as i32)),
    }
}

/// What resolving a write-protect fault came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Unprotect {
    Done,
    /// The mm is changing: retry after draining events.
    Again,
    /// The task is gone.
    Gone,
}

/// Resolves a write-protect fault at `page` of `t`: marks the page dirty first (so that a
/// residency snapshot taken after the write sees it), then lifts the protection and wakes the
/// writer. A page outside the lazy ranges (there is none after a `REMOVE`) is only unprotected.
pub(crate) fn unprotect(t: &Task, page: u64) -> Result<Unprotect, FetchError> {
    let _gate = t.wp_gate.lock().unwrap_or_else(PoisonError::into_inner);
    if t.tracked {
        let sp = t.space();
        if let Some(k) = sp.lookup(page) {
            let b = sp.bit_of(k, page);
            t.written.claim(b);
            t.dirty.claim(b);
        }
    }
    match t
        .uffd
        .remove_write_protection(page as *mut c_void, PAGE, true)
    {
        Ok(()) => Ok(Unprotect::Done),
        Err(userfaultfd::Error::SystemError(e)) => match e as i32 {
            libc::EAGAIN => Ok(Unprotect::Again),
            libc::ESRCH | libc::ENOSPC => Ok(Unprotect::Gone),
            // Unmapped meanwhile: let the writer retry (it faults afresh or segfaults, as it
            // would without us).
            libc::ENOENT => {
                let _ = t.uffd.wake(page as *mut c_void, PAGE);
                Ok(Unprotect::Done)
            }
            other => Err(uffd_err(
                "UFFDIO_WRITEPROTECT",
                t.pid,
                page,
                io::Error::from_raw_os_error(other),
            )),
        },
        Err(e) => Err(uffd_err(
            "UFFDIO_WRITEPROTECT",
            t.pid,
            page,
            io::Error::other(e),
        )),
    }
}

/// Starts a new layer for `t` (see the module docs): write-protects its dirty pages again and
/// clears their bits; returns the bits cleared. Call only while the task is frozen.
pub(crate) fn begin_layer(t: &Task) -> Vec<usize> {
    let mut cleared = Vec::new();
    if !t.tracked {
        return cleared;
    }
    let _gate = t.wp_gate.lock().unwrap_or_else(PoisonError::into_inner);
    let sp = t.space();
    for iov in &sp.iovs {
        let pages = usize::try_from(iov.pages()).unwrap_or(0);
        let mut p = 0;
        while p < pages {
            if !t.dirty.test(iov.bit + p) || t.zeroed.test(iov.bit + p) {
                p += 1;
                continue;
            }
            let s = p;
            while p < pages && t.dirty.test(iov.bit + p) && !t.zeroed.test(iov.bit + p) {
                p += 1;
            }
            let addr = iov.start + s as u64 * PAGE_SIZE;
            // Not protected (the mm is changing, the task is gone): the pages stay dirty.
            if t.uffd
                .write_protect(addr as *mut c_void, (p - s) * PAGE)
                .is_err()
            {
                continue;
            }
            for b in iov.bit + s..iov.bit + p {
                if t.dirty.release(b) {
                    if t.zeroed.test(b) {
                        t.dirty.claim(b);
                    } else {
                        cleared.push(b);
                    }
                }
            }
        }
    }
    cleared
}

/// Sets the dirty bits a [`begin_layer`] cleared again (its layer was not published).
pub(crate) fn restore_dirty(t: &Task, bits: &[usize]) {
    for &b in bits {
        t.dirty.claim(b);
    }
}

#[repr(C)]
struct UffdioRange {
    start: u64,
    len: u64,
}

#[repr(C)]
struct UffdioPoison {
    range: UffdioRange,
    mode: u64,
    updated: i64,
}

const _: () = assert!(std::mem::size_of::<UffdioPoison>() == 32);

nix::ioctl_readwrite!(uffdio_poison, 0xAA, 0x08, UffdioPoison);

/// UFFDIO_POISON (Linux 6.6+): later accesses get SIGBUS instead of silently reading zeros
/// once our uffd is closed. Best effort; skips pages that are present (EEXIST). Returns the
/// pages poisoned.
pub(crate) fn poison(uffd: &Uffd, addr: u64, pages: u64) -> u64 {
    let end = addr + pages * PAGE_SIZE;
    let mut at = addr;
    let mut done = 0;
    while at < end {
        let mut arg = UffdioPoison {
            range: UffdioRange {
                start: at,
                len: end - at,
            },
            mode: 0,
            updated: 0,
        };
        // SAFETY: `arg` is a live, correctly laid out uffdio_poison for the duration of the call.
        let r = unsafe { uffdio_poison(uffd.as_raw_fd(), &mut arg) };
        let ok = u64::try_from(arg.updated).unwrap_or(0);
        done += ok / PAGE_SIZE;
        match r {
            Ok(_) => break,
            Err(nix::Error::EEXIST) => at += ok + PAGE_SIZE,
            Err(_) if ok > 0 => at += ok,
            Err(_) => break,
        }
    }
    done
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fork_bits_leave_recent_worker_runs_unclaimed() {
        let Ok(uffd) = userfaultfd::UffdBuilder::new()
            .close_on_exec(true)
            .user_mode_only(true)
            .create()
        else {
            eprintln!("SKIP: userfaultfd unavailable");
            return;
        };
        let (space, n) = Space::new(&[(0x10000, 0x10000 + 128 * PAGE_SIZE)]);
        let t = Task::new(1, uffd, space, Bits::new(n), false, false);
        // Installed long ago (before the fork): present in the child too.
        assert_eq!(t.claim(0, 8, n), 8);
        t.log().begin(0, 8);
        t.log().end(0, 8, 1);
        // In flight at the fork, and finished after the read of epoch 5 began.
        assert_eq!(t.claim(20, 4, n), 4);
        t.log().begin(20, 4);
        assert_eq!(t.claim(40, 2, n), 2);
        t.log().begin(40, 2);
        t.log().end(40, 2, 5);
        let c = t.fork_bits(5);
        assert!((0..8).all(|b| c.test(b)));
        assert!((20..24).chain(40..42).all(|b| !c.test(b)));
        assert_eq!(c.count_clear(), 128 - 8);
        assert_eq!(t.remaining.load(Relaxed), 128 - 14);
        // An overflowing log makes the child start from scratch.
        for i in 0..=RECENT {
            t.log().begin(60 + i, 1);
            t.log().end(60 + i, 1, 7);
        }
        assert_eq!(t.fork_bits(6).count_clear(), 128);
        assert_eq!(t.fork_bits(9).count_clear(), 128 - 14 + 4);
    }

    /// Bit 57 of the page's pagemap entry: write-protected by userfaultfd.
    fn uffd_wp(addr: u64) -> bool {
        use std::os::unix::fs::FileExt;
        let f = std::fs::File::open("/proc/self/pagemap").unwrap();
        let mut e = [0u8; 8];
        f.read_exact_at(&mut e, addr / PAGE_SIZE * 8).unwrap();
        u64::from_le_bytes(e) & (1 << 57) != 0
    }

    #[test]
    fn tracked_installs_are_protected_until_the_first_write_is_resolved() {
        let Ok(uffd) = userfaultfd::UffdBuilder::new()
            .close_on_exec(true)
            .user_mode_only(true)
            .create()
        else {
            eprintln!("SKIP: userfaultfd unavailable");
            return;
        };
        let len = 4 * PAGE;
        // SAFETY: a fresh private anonymous mapping, unmapped at the end of the test and not
        // used by anything else.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(base, libc::MAP_FAILED);
        let mode = userfaultfd::RegisterMode::MISSING | userfaultfd::RegisterMode::WRITE_PROTECT;
        match uffd.register_with_mode(base, len, mode) {
            Ok(io) if io.contains(userfaultfd::IoctlFlags::WRITE_PROTECT) => {}
            other => {
                eprintln!("SKIP: no uffd write-protect here: {other:?}");
                return;
            }
        }
        let a = base as u64;
        let (space, n) = Space::new(&[(a, a + len as u64)]);
        let t = Task::new(1, uffd, space, Bits::new(n), false, true);
        let c = FetchCounters::default();
        let data = vec![0x5au8; PAGE];
        assert_eq!(
            copy_run(&t, a, &data, true, &c).unwrap(),
            (Install::Done, 1, false)
        );
        assert!(uffd_wp(a), "a tracked install must arrive write-protected");
        // SAFETY: page 0 of the mapping is installed; reading it does not fault.
        assert_eq!(unsafe { *(base as *const u8) }, 0x5a);
        assert!(!t.dirty.test(0));
        assert_eq!(unprotect(&t, a).unwrap(), Unprotect::Done);
        assert!(
            t.dirty.test(0),
            "the page must be marked dirty before it is writable"
        );
        assert!(!uffd_wp(a));
        // SAFETY: page 0 is installed and no longer protected: the write does not fault.
        unsafe { *(base as *mut u8) = 1 };
        assert!(!t.dirty.test(1));
        // A new layer: the written page is protected again and clean; undone, dirty again.
        let cleared = begin_layer(&t);
        assert_eq!(cleared, vec![0]);
        assert!(
            uffd_wp(a),
            "begin_layer must protect the written page again"
        );
        assert!(!t.dirty.test(0));
        restore_dirty(&t, &cleared);
        assert!(t.dirty.test(0));
        assert_eq!(begin_layer(&t), vec![0]);
        assert_eq!(unprotect(&t, a).unwrap(), Unprotect::Done);
        assert!(
            t.dirty.test(0),
            "a write after the new layer is tracked again"
        );
        // A zero page stays dirty across layers (it is never protected).
        let (_, k) = zero_run(&t, a + 2 * PAGE as u64, 1, true, &c).unwrap();
        assert_eq!(k, 1);
        t.zeroed.claim(2);
        t.dirty.claim(2);
        let cleared = begin_layer(&t);
        assert_eq!(cleared, vec![0]);
        assert!(t.dirty.test(2), "a zero page must stay dirty");
        // An untracked task installs writable pages.
        let plain = Task::new(1, t.uffd, Space::new(&[]).0, Bits::new(0), false, false);
        assert_eq!(
            copy_run(&plain, a + PAGE as u64, &data, true, &c).unwrap(),
            (Install::Done, 1, false)
        );
        assert!(!uffd_wp(a + PAGE as u64));
        drop(plain);
        // SAFETY: the mapping created above, no longer used.
        unsafe { libc::munmap(base, len) };
    }
}
