//! One tracked task (a restored process or a fork child) as shared by the fault thread and the
//! fill workers, and the install path both use: read a run of pages from the source by
//! dump-time address, then `UFFDIO_COPY` / `UFFDIO_ZEROPAGE` each contiguous piece at its
//! current address with one ioctl.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering::{AcqRel, Relaxed};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize};
use std::sync::{Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

use libc::c_void;
use userfaultfd::Uffd;

use super::prefetch::Detector;
use super::space::{Bits, Space};
use super::FetchError;
use crate::images::PAGE_SIZE;
use crate::source::{PageKind, PageSource, SourceError};
use crate::stats::FetchCounters;

pub(crate) const PAGE: usize = 4096;

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
    pub fn new(pid: u32, uffd: Uffd, space: Space, bits: Bits, forked: bool) -> Task {
        let clear = bits.count_clear();
        Task {
            pid,
            uffd,
            forked,
            space: RwLock::new(space),
            bits,
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
                PageKind::Data => copy_run(t, addr, &data[off..off + len * PAGE], wake, c)?,
                PageKind::Zero => zero_run(t, addr, len as u64, wake, c)?,
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

/// The loop `copy_run` and `zero_run` share: `op(off)` issues one ioctl for
/// `[dst + off, dst + len)`, and the loop goes on past partial progress and page by page past
/// `EEXIST` (counted as present, the page's waiter woken). Returns the outcome and the pages
/// newly installed.
fn install_loop(
    uffd: &Uffd,
    dst: u64,
    len: usize,
    c: &FetchCounters,
    mut op: impl FnMut(usize) -> userfaultfd::Result<usize>,
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
            Err(userfaultfd::Error::PartiallyCopied(n)) if n > 0 && n < len - off => {
                installed += (n / PAGE) as u64;
                off += n;
                continue;
            }
            Err(userfaultfd::Error::PartiallyCopied(_)) => return Ok((Install::Again, installed)),
            Err(userfaultfd::Error::CopyFailed(e) | userfaultfd::Error::ZeropageFailed(e)) => {
                e as i32
            }
            Err(e) => return Err(io::Error::other(e)),
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
/// EEXIST; counts the bytes copied. Returns the outcome and the pages newly installed.
pub(crate) fn copy_run(
    t: &Task,
    dst: u64,
    src: &[u8],
    wake: bool,
    c: &FetchCounters,
) -> Result<(Install, u64), FetchError> {
    let len = src.len();
    let (o, k) = install_loop(&t.uffd, dst, len, c, |off| {
        // SAFETY: `src[off..]` is a live buffer (or read-only mapping) of `len - off` bytes
        // borrowed for the call; `dst + off` is an address in the target task's registered
        // range, checked by the kernel, and the ioctl writes only into the target mm, never
        // into our memory.
        unsafe {
            t.uffd.copy(
                src[off..].as_ptr().cast::<c_void>(),
                (dst + off as u64) as *mut c_void,
                len - off,
                wake,
            )
        }
    })
    .map_err(|e| uffd_err("UFFDIO_COPY", t.pid, dst, e))?;
    c.bytes.fetch_add(k * PAGE_SIZE, Relaxed);
    Ok((o, k))
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
        }
    })
    .map_err(|e| uffd_err("UFFDIO_ZEROPAGE", t.pid, dst, e))?;
    c.zero_pages.fetch_add(k, Relaxed);
    Ok((o, k))
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
        let t = Task::new(1, uffd, space, Bits::new(n), false);
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
}
