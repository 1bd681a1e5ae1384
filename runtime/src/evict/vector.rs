//! Many ranges in one injected system call: `process_madvise` of the task on itself.
//!
//! Each injected call costs a register write, a single-step and its stop report, so a batch of
//! a thousand scattered ranges spent most of its stop in ptrace round trips. A process may
//! `process_madvise` its own memory with any advice (only a *remote* caller is limited to
//! `COLD`/`PAGEOUT`/`WILLNEED`), and `PIDFD_SELF_THREAD` names the calling thread's mm without
//! a pidfd. So the held thread runs:
//!
//! 1. `mmap` of a private anonymous scratch area in the task (never registered with a
//!    userfaultfd, so nothing of it concerns the fetcher), into which the injector writes the
//!    iovecs through `/proc/<tid>/mem`;
//! 2. `process_madvise(PIDFD_SELF_THREAD, scratch, n, advice, 0)` per [`MAX_IOV`] ranges (the
//!    kernel copies the iovecs in before it acts on any; each range of a userfaultfd-registered
//!    VMA still raises its `UFFD_EVENT_REMOVE`, as `madvise` does);
//! 3. `munmap` of the scratch area.
//!
//! The task's seccomp filters must allow all three calls (checked first, as for `madvise`);
//! when they do not, or the kernel has no `PIDFD_SELF_THREAD` (before 6.14: `EBADF`), nothing
//! is done and the caller falls back to one `madvise` per range. The scratch area exists only
//! while the process is stopped; a shim killed in between leaves it behind (16 KiB at most)
//! with the hazard every injection has (the thread keeps the injected registers).

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;

use super::inject::{errno_of, Injected, Seized};
use super::EvictError;

/// Most ranges of one `process_madvise` (the kernel's `UIO_MAXIOV`).
pub const MAX_IOV: usize = 1024;
/// `__NR_process_madvise` on x86_64.
const SYS_PROCESS_MADVISE: i32 = 440;
const _: () = assert!(SYS_PROCESS_MADVISE as i64 == libc::SYS_process_madvise);
/// `__NR_mmap` and `__NR_munmap` on x86_64.
const SYS_MMAP: i32 = 9;
const SYS_MUNMAP: i32 = 11;
const _: () = assert!(SYS_MMAP as i64 == libc::SYS_mmap && SYS_MUNMAP as i64 == libc::SYS_munmap);
/// `PIDFD_SELF_THREAD` (linux/pidfd.h, 6.14): the calling thread.
const PIDFD_SELF_THREAD: i64 = -10_000;
/// Bytes of one iovec.
const IOV_BYTES: usize = 16;

/// Runs `advice` over `ranges` (in order) with `process_madvise` in the held thread. Returns
/// how many ranges from the start are done: all of them, or fewer when the task does not
/// allow or support the call (0: nothing was done) or a call stopped short (the caller goes on
/// one range at a time, which names the failing one). `Err` only when the thread could not be
/// driven (ptrace failed); the ranges done then are unknown to the caller, which must treat
/// the batch as failed.
pub(super) fn madvise(
    s: &mut Seized,
    ranges: &[(u64, u64)],
    advice: u64,
) -> Result<Injected, EvictError> {
    let mut done = Injected::default();
    let len = (ranges.len().min(MAX_IOV) * IOV_BYTES).next_multiple_of(4096) as u64;
    let prot = (libc::PROT_READ | libc::PROT_WRITE) as u64;
    let flags = (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS) as u64;
    let mmap_args = [0, len, prot, flags, u64::MAX, 0];
    let pm_args = |at: u64, n: usize| [PIDFD_SELF_THREAD as u64, at, n as u64, advice, 0, 0];
    if s.allows(SYS_MMAP, mmap_args).is_err()
        || s.allows(SYS_MUNMAP, [0, len, 0, 0, 0, 0]).is_err()
        || s.allows(SYS_PROCESS_MADVISE, pm_args(0, 1)).is_err()
    {
        return Ok(done);
    }
    let at = s.syscall(SYS_MMAP, mmap_args)?;
    done.calls += 1;
    if at < 0 {
        return Ok(done);
    }
    let at = at as u64;
    let unmap_allowed = s.allows(SYS_MUNMAP, [at, len, 0, 0, 0, 0]).is_ok();
    let result = advise_chunks(s, at, ranges, &pm_args, &mut done);
    if unmap_allowed {
        let ret = s.syscall(SYS_MUNMAP, [at, len, 0, 0, 0, 0])?;
        done.calls += 1;
        if ret < 0 {
            tracing::warn!(tid = s.tid(), errno = %errno_of(ret), "munmap of the eviction scratch area failed");
        }
    }
    result.map(|()| done)
}

/// The `process_madvise` calls of [`madvise`], with the scratch area at `at`.
fn advise_chunks(
    s: &mut Seized,
    at: u64,
    ranges: &[(u64, u64)],
    pm_args: &dyn Fn(u64, usize) -> [u64; 6],
    done: &mut Injected,
) -> Result<(), EvictError> {
    let tid = s.tid();
    let mem_path = format!("/proc/{tid}/mem");
    let mem = OpenOptions::new()
        .write(true)
        .open(&mem_path)
        .map_err(|source| EvictError::Io {
            what: "open",
            path: mem_path.clone(),
            source,
        })?;
    let mut iov = Vec::with_capacity(MAX_IOV * IOV_BYTES);
    for chunk in ranges.chunks(MAX_IOV) {
        if s.allows(SYS_PROCESS_MADVISE, pm_args(at, chunk.len()))
            .is_err()
        {
            return Ok(());
        }
        iov.clear();
        for &(start, end) in chunk {
            iov.extend_from_slice(&start.to_ne_bytes());
            iov.extend_from_slice(&(end - start).to_ne_bytes());
        }
        mem.write_all_at(&iov, at)
            .map_err(|source| EvictError::Io {
                what: "write the iovecs into",
                path: mem_path.clone(),
                source,
            })?;
        let ret = s.syscall(SYS_PROCESS_MADVISE, pm_args(at, chunk.len()))?;
        done.calls += 1;
        // Bytes advised, from the first range on (a failure after some returns their count).
        let mut left = u64::try_from(ret).unwrap_or(0);
        for &(start, end) in chunk {
            if left < end - start {
                return Ok(());
            }
            left -= end - start;
            done.ranges += 1;
            done.bytes += end - start;
        }
    }
    Ok(())
}
