//! The local memory budget: a thread (the evictor) keeps the pages the fetcher installed at or
//! below `memory_budget` by making cold, clean pages remote again.
//!
//! # What may be evicted
//!
//! Only pages that are identical to the page source's copy: installed with data, tracked
//! (write-protected) and never written since they arrived (`Task::written` clear; the dirty
//! bit alone is not enough, since a new checkpoint layer clears it while the source still
//! serves the older content). Written pages stay until a checkpoint of the running container
//! has published them as a layer and the fetcher reads from it
//! ([`super::ResidencyProbe::rebase`]); zero pages and untracked tasks are never evicted. Such
//! pages are counted as *pinned*.
//!
//! # Which pages (the policy)
//!
//! The kernel gives no accessed bit for this memory (no idle-page tracking, no DAMON vaddr, no
//! soft-dirty), so the only evidence of use is a fault. The policy is a CLOCK over each task's
//! bits with a small per-page heat: a page installed by a demand fault starts at 1, pages
//! installed by prefetch or fill at 0, and a *refault* (a demand fault on a page that was
//! evicted) adds [`REFAULT_HEAT`] up to [`HEAT_MAX`]. The hand skips a page with heat and
//! lowers it by one, and evicts pages at 0. So prefetched pages nobody touched go first, and a
//! page evicted while still in use survives more laps each time it comes back. Tasks are served
//! largest resident set first.
//!
//! # How one batch runs
//!
//! 1. Victims are chosen from the task's bits (no system call) and the address-space
//!    generation is noted.
//! 2. Every thread of the process is stopped ([`crate::evict::StoppedProcess`]): nothing of
//!    the task runs, so it can neither write a victim nor change its address space, and every
//!    `UFFD_EVENT_REMOVE` until the release is ours. Threads blocked in a fault or an event
//!    stop only once the fault thread has served them.
//! 3. The evictor waits until the fault thread has handled everything it read from the task's
//!    userfaultfd (`Task::handled`), then requires the generation unchanged (no mremap, munmap
//!    or fork since the choice: the addresses are still the victims') and the task's mm alive
//!    (the resolved pid is the task's).
//! 4. Under the write-protect gate the victims are checked again (a write resolved before the
//!    stop made them dirty), and the ranges are announced to the fault thread
//!    (`Task::evicting`). `MADV_DONTNEED` then runs in one of the stopped threads (one
//!    `process_madvise` per 1024 ranges, `evict::Seized::madvise_all`). The fault thread
//!    recognises each `REMOVE` that continues an announced range exactly where the previous
//!    one ended and leaves the range in place; any other `REMOVE`
//!    is the task's own discard, as before.
//! 5. Once the fault thread has handled those events, the victims' bits are released: they are
//!    remote again, a later access faults and is served from the source like any remote page.
//!    The announcement is withdrawn and the threads are released.
//!
//! A batch never runs while a checkpoint holds [`super::ResidencyProbe::pause_eviction`], and
//! the fault thread keeps reading events until a running batch is over before it ends.

use std::collections::HashMap;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering::{Acquire, Relaxed};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use libc::c_void;

use super::resident::Registry;
use super::task::{Task, PAGE};
use crate::evict::{Advice, EvictError, StoppedProcess};
use crate::stats::FetchCounters;

/// Eviction starts when the resident pages exceed this share of the budget (per mille)...
pub(crate) const EVICT_ABOVE: u64 = 970;
/// ...and brings them down to this share.
pub(crate) const EVICT_TO: u64 = 920;
/// The background fill installs only while the resident pages are below this share.
pub(crate) const FILL_BELOW: u64 = 880;
/// Heat added by a refault.
const REFAULT_HEAT: u8 = 2;
/// Highest heat.
const HEAT_MAX: u8 = 6;
/// How often the evictor looks at the resident pages...
const TICK: Duration = Duration::from_millis(20);
/// ...and how often when they are close to the budget.
const TICK_NEAR: Duration = Duration::from_millis(1);
/// Pages evicted per batch at most (the process is stopped for the batch).
const MAX_BATCH_PAGES: usize = 8192;
/// Remote pages a run of victims may span between two of them.
pub(crate) const MAX_GAP: usize = 256;
/// Ranges per batch at most (one `madvise` each).
const MAX_BATCH_RANGES: usize = 512;
/// How long a task whose eviction was refused is left alone.
const REFUSED_BACKOFF: Duration = Duration::from_secs(1);
/// How long the evictor waits for the fault thread to catch up with a stopped task.
const SYNC_LIMIT: Duration = Duration::from_secs(10);

/// Faults wait (are retried) while the resident pages are above this share of the budget and
/// the evictor is making progress...
pub(crate) const THROTTLE_ABOVE: u64 = 1040;
/// ...but never longer than this: a thread blocked in a fault inside a system call cannot be
/// stopped, so a batch waiting to stop it must get it served.
pub(crate) const THROTTLE_LIMIT: Duration = Duration::from_millis(20);

/// What the fault path and the fill read of the budget.
#[derive(Debug, Default)]
pub(crate) struct BudgetGate {
    /// The budget in pages (0 = none).
    pub pages: u64,
    /// Set while the evictor runs and can make room: only then do faults above
    /// [`THROTTLE_ABOVE`] wait for it.
    pub throttle: AtomicBool,
}

impl BudgetGate {
    pub fn new(pages: u64) -> BudgetGate {
        BudgetGate {
            pages,
            throttle: AtomicBool::new(false),
        }
    }

    /// Whether a fault read at `t0` should wait for the evictor.
    pub fn hold_fault(&self, c: &FetchCounters, t0: Instant) -> bool {
        self.pages > 0
            && self.throttle.load(Relaxed)
            && c.resident_pages.load(Relaxed) > share(self.pages, THROTTLE_ABOVE)
            && t0.elapsed() < THROTTLE_LIMIT
    }

    /// Whether `n` more pages keep the resident pages within the budget (prefetch).
    pub fn room_for(&self, c: &FetchCounters, n: u64) -> bool {
        self.pages == 0 || c.resident_pages.load(Relaxed) + n <= self.pages
    }

    /// Whether the fill may install a run of `n` pages.
    pub fn fill_room(&self, c: &FetchCounters, n: u64) -> bool {
        self.pages == 0 || c.resident_pages.load(Relaxed) + n <= share(self.pages, FILL_BELOW)
    }
}

/// Memory kept free under a cgroup limit for what the budget does not count (pages restored
/// eagerly, page tables, the kernel's own): an eighth of the limit, at least this.
const LIMIT_HEADROOM_MIN: u64 = 32 << 20;

/// The budget a restore runs with, in bytes (0 = none): the configured `budget`, lowered to
/// fit a cgroup memory `limit` (0 = none) with headroom, and dropped when the checkpoint's
/// `lazy` bytes fit anyway (no eviction is needed then, and the fetcher may end once
/// everything is local).
pub(crate) fn effective_budget(budget: u64, limit: u64, lazy: u64) -> u64 {
    let mut b = budget;
    if limit > 0 {
        let cap = limit
            .saturating_sub((limit / 8).max(LIMIT_HEADROOM_MIN))
            .max(limit / 2);
        b = if b == 0 { cap } else { b.min(cap) };
    }
    if b >= lazy {
        0
    } else {
        b
    }
}

/// The budget share `permille` of `budget` pages.
pub(crate) fn share(budget: u64, permille: u64) -> u64 {
    budget.saturating_mul(permille) / 1000
}

/// The ranges an eviction is dropping from one task, each with the end of the `REMOVE` events
/// seen for it so far.
#[derive(Debug, Default)]
pub(crate) struct Announced {
    ranges: Vec<(u64, u64)>,
}

impl Announced {
    /// Announces `ranges` (sorted, not overlapping), replacing any earlier announcement.
    pub fn set(&mut self, ranges: &[(u64, u64)]) {
        self.ranges.clear();
        self.ranges.extend_from_slice(ranges);
    }

    /// Withdraws the announcement.
    pub fn clear(&mut self) {
        self.ranges.clear();
    }

    /// Whether a `REMOVE` of `[start, end)` is the eviction's: it starts exactly where the
    /// events of an announced range have reached so far and stays inside the range (one
    /// `madvise` raises one event per VMA, in address order). It then counts as seen.
    pub fn take(&mut self, start: u64, end: u64) -> bool {
        for r in &mut self.ranges {
            if r.0 == start && end <= r.1 && start < end {
                r.0 = end;
                return true;
            }
        }
        false
    }
}

/// Adds the heat of a demand fault on bit `b` of `t`; a refault when the page had been evicted.
pub(crate) fn on_demand_fault(t: &Task, b: usize, c: &FetchCounters) {
    let Some(h) = t.heat.get(b) else {
        return;
    };
    if t.evicted.release(b) {
        c.refaults.fetch_add(1, Relaxed);
        let v = h.load(Relaxed);
        h.store(v.saturating_add(REFAULT_HEAT).min(HEAT_MAX), Relaxed);
    } else if h.load(Relaxed) == 0 {
        h.store(1, Relaxed);
    }
}

/// Resident pages of `t` that cannot be evicted: written, dirty or zero pages, or all of a
/// task whose writes are not tracked or that is a fork child.
fn pinned_pages(t: &Task) -> u64 {
    if !t.tracked || t.forked {
        return t.resident.load(Relaxed);
    }
    (0..t.installed.len().div_ceil(64))
        .map(|i| {
            let pinned = t.written.word(i) | t.dirty.word(i) | t.zeroed.word(i);
            u64::from((t.installed.word(i) & pinned).count_ones())
        })
        .sum()
}

/// Whether bit `b` of `t` may be evicted now (see the module docs).
fn evictable(t: &Task, b: usize) -> bool {
    t.tracked
        && t.bits.test(b)
        && t.installed.test(b)
        && !t.written.test(b)
        && !t.dirty.test(b)
        && !t.zeroed.test(b)
}

/// CLOCK over the bits of `t` from `*hand`: up to `want` victims, lowering the heat of the
/// pages it passes; stops after one lap. Victims come in runs of bits, at most `max_runs`; a
/// run may also hold gaps of up to [`MAX_GAP`] remote pages between its victims (dropping a
/// page that is not there does nothing, and one call instead of several costs less), which the
/// batch claims before the call so that nobody installs them meanwhile. Returns the runs and
/// the resident pages it had to skip as pinned.
pub(crate) fn choose(
    t: &Task,
    hand: &mut usize,
    want: usize,
    max_runs: usize,
) -> (Vec<(usize, usize)>, u64) {
    let n = t.bits.len();
    let mut runs: Vec<(usize, usize)> = Vec::new();
    let mut pinned = 0u64;
    let mut got = 0usize;
    if n == 0 {
        return (runs, 0);
    }
    // Whether every page since the end of the last run is remote (the run may grow over it).
    let mut gap_clean = false;
    let mut b = *hand % n;
    for _ in 0..n {
        if got >= want {
            break;
        }
        let mut victim = false;
        if t.installed.test(b) {
            if !evictable(t, b) {
                pinned += 1;
            } else {
                let h = &t.heat[b];
                let v = h.load(Relaxed);
                if v > 0 {
                    h.store(v - 1, Relaxed);
                } else {
                    victim = true;
                }
            }
        }
        if victim {
            let full = runs.len() >= max_runs;
            match runs.last_mut() {
                Some((s, len)) if b >= *s + *len && gap_clean && b - (*s + *len) <= MAX_GAP => {
                    *len = b + 1 - *s;
                }
                _ if full => break,
                _ => runs.push((b, 1)),
            }
            got += 1;
            gap_clean = true;
        } else if t.bits.test(b) {
            gap_clean = false;
        }
        b = (b + 1) % n;
        if b == 0 {
            gap_clean = false;
        }
    }
    *hand = b;
    (runs, pinned)
}

/// The host pid of the process with pid `vpid` in the pid namespace of host process `ns_of`.
pub(crate) fn resolve(ns_of: i32, vpid: u32) -> Option<i32> {
    let ns = std::fs::read_link(format!("/proc/{ns_of}/ns/pid")).ok()?;
    for e in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        if is_vpid(pid, vpid, &ns) {
            return Some(pid);
        }
    }
    None
}

/// Whether host process `pid` is `vpid` in pid namespace `ns` (a `/proc/*/ns/pid` link).
fn is_vpid(pid: i32, vpid: u32, ns: &std::path::Path) -> bool {
    let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
        return false;
    };
    let last = status
        .lines()
        .find_map(|l| l.strip_prefix("NSpid:"))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|v| v.parse::<u32>().ok());
    last == Some(vpid)
        && std::fs::read_link(format!("/proc/{pid}/ns/pid")).is_ok_and(|l| l.as_path() == ns)
}

/// What the evictor keeps per task.
#[derive(Default)]
struct PerTask {
    hand: usize,
    host_pid: Option<i32>,
    refused_until: Option<Instant>,
}

struct Shared {
    reg: Arc<Registry>,
    c: Arc<FetchCounters>,
    gate: Arc<BudgetGate>,
    budget: u64,
    /// A host process in the tasks' pid namespace.
    ns_of: i32,
    stop: Mutex<bool>,
    cv: Condvar,
}

/// The evictor thread of one fetcher.
pub(crate) struct Evictor {
    sh: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl Evictor {
    /// Starts evicting to keep `budget` pages; `ns_of` is a host pid in the restored tasks'
    /// pid namespace (the container's init).
    pub fn spawn(
        reg: Arc<Registry>,
        c: Arc<FetchCounters>,
        gate: Arc<BudgetGate>,
        ns_of: i32,
    ) -> std::io::Result<Evictor> {
        let sh = Arc::new(Shared {
            reg,
            c,
            budget: gate.pages,
            gate,
            ns_of,
            stop: Mutex::new(false),
            cv: Condvar::new(),
        });
        let sh2 = sh.clone();
        let thread = std::thread::Builder::new()
            .name("dp-evictor".into())
            .spawn(move || run(&sh2))?;
        Ok(Evictor {
            sh,
            thread: Some(thread),
        })
    }

    /// Stops the thread (after its current batch) and joins it.
    pub fn shutdown(&mut self) {
        self.sh.gate.throttle.store(false, Relaxed);
        *self.sh.stop.lock().unwrap_or_else(PoisonError::into_inner) = true;
        self.sh.cv.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Evictor {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn run(sh: &Shared) {
    let mut per: HashMap<usize, PerTask> = HashMap::new();
    let mut warned_pinned = false;
    sh.gate.throttle.store(true, Relaxed);
    loop {
        // Close to the budget the resident pages are looked at often (faults may be waiting).
        let tick = if sh.c.resident_pages.load(Relaxed) > share(sh.budget, FILL_BELOW) {
            TICK_NEAR
        } else {
            TICK
        };
        {
            let stop = sh.stop.lock().unwrap_or_else(PoisonError::into_inner);
            let (stop, _) = sh
                .cv
                .wait_timeout(stop, tick)
                .unwrap_or_else(PoisonError::into_inner);
            if *stop || sh.c.finished.load(Relaxed) {
                sh.gate.throttle.store(false, Relaxed);
                return;
            }
        }
        sh.c.pinned_pages.store(
            sh.reg.tasks().iter().map(|t| pinned_pages(t)).sum(),
            Relaxed,
        );
        let resident = sh.c.resident_pages.load(Relaxed);
        if resident <= share(sh.budget, EVICT_ABOVE) {
            continue;
        }
        let mut want = resident.saturating_sub(share(sh.budget, EVICT_TO));
        let mut tasks = sh.reg.tasks();
        tasks.retain(|t| !t.forked && !t.gone.load(Relaxed));
        tasks.sort_by_key(|t| std::cmp::Reverse(t.resident.load(Relaxed)));
        per.retain(|k, _| tasks.iter().any(|t| key(t) == *k));
        let mut evicted_now = 0u64;
        for t in &tasks {
            if want == 0 {
                break;
            }
            let st = per.entry(key(t)).or_default();
            if st.refused_until.is_some_and(|u| Instant::now() < u) {
                continue;
            }
            let Some(_batch) = sh.reg.begin_batch() else {
                break;
            };
            let take = usize::try_from(want)
                .unwrap_or(usize::MAX)
                .min(MAX_BATCH_PAGES);
            match evict_batch(sh, t, st, take) {
                Ok((evicted, _)) => {
                    want = want.saturating_sub(evicted);
                    evicted_now += evicted;
                }
                Err(e) => {
                    sh.c.evict_refused.fetch_add(1, Relaxed);
                    st.refused_until = Some(Instant::now() + REFUSED_BACKOFF);
                    if matches!(e, EvictError::Gone { .. }) {
                        st.host_pid = None;
                    }
                    tracing::warn!(pid = t.pid, error = %e, "eviction refused; the task is left alone for a while");
                }
            }
        }
        // Faults wait for room only while room is being made.
        let stuck = want > 0 && evicted_now == 0;
        sh.gate.throttle.store(!stuck, Relaxed);
        let over = sh.c.resident_pages.load(Relaxed) > sh.budget;
        if over && stuck && !warned_pinned {
            warned_pinned = true;
            tracing::warn!(
                budget_pages = sh.budget,
                resident_pages = sh.c.resident_pages.load(Relaxed),
                pinned_pages = sh.c.pinned_pages.load(Relaxed),
                "the memory budget cannot be kept: the pages left are written, zero or \
                 untracked, and only clean pages are evicted"
            );
        }
    }
}

/// Appends bit `b` to `runs`, growing the last run when `b` follows it.
fn push_bit(runs: &mut Vec<(usize, usize)>, b: usize) {
    match runs.last_mut() {
        Some((s, n)) if *s + *n == b => *n += 1,
        _ => runs.push((b, 1)),
    }
}

fn key(t: &Arc<Task>) -> usize {
    Arc::as_ptr(t) as usize
}

/// Waits until the fault thread has handled everything it read from `t`'s userfaultfd.
fn synced(t: &Task) -> bool {
    let until = Instant::now() + SYNC_LIMIT;
    loop {
        if t.handled.load(Acquire) == t.epoch.load(Acquire) {
            return true;
        }
        if Instant::now() > until || t.gone.load(Relaxed) {
            return false;
        }
        std::thread::sleep(Duration::from_micros(50));
    }
}

/// One batch for task `t` (see the module docs). Returns the pages evicted and those pinned.
fn evict_batch(
    sh: &Shared,
    t: &Arc<Task>,
    st: &mut PerTask,
    want: usize,
) -> Result<(u64, u64), EvictError> {
    let generation = sh.reg.generation();
    let (runs, pinned) = choose(t, &mut st.hand, want, MAX_BATCH_RANGES);
    if runs.is_empty() {
        return Ok((0, pinned));
    }
    let host = match st.host_pid {
        Some(p) => p,
        None => {
            let p = resolve(sh.ns_of, t.pid).ok_or(EvictError::Gone {
                tid: i32::try_from(t.pid).unwrap_or(-1),
            })?;
            st.host_pid = Some(p);
            p
        }
    };
    // On a thread of its own: a thread of the task that does not stop in time stays seized
    // until the thread that seized it exits (`StoppedProcess::stop`).
    let stopped_at = Instant::now();
    let evicted = std::thread::scope(|scope| {
        std::thread::Builder::new()
            .name("dp-evict-batch".into())
            .spawn_scoped(scope, || {
                let mut proc = StoppedProcess::stop(host)?;
                let r = evict_stopped(sh, t, &mut proc, &runs, generation);
                let released = proc.release();
                let evicted = r?;
                released.map(|_| evicted)
            })
            .map_err(|source| EvictError::Io {
                what: "spawn",
                path: "an eviction thread".into(),
                source,
            })?
            .join()
            .unwrap_or(Err(EvictError::Unsupported("the eviction thread panicked")))
    });
    sh.c.evict_stop_latency
        .record(u64::try_from(stopped_at.elapsed().as_micros()).unwrap_or(u64::MAX));
    let evicted = evicted?;
    sh.c.evict_batches.fetch_add(1, Relaxed);
    Ok((evicted, pinned))
}

/// Steps 3 to 5 of a batch, with every thread of the task stopped.
fn evict_stopped(
    sh: &Shared,
    t: &Task,
    proc: &mut StoppedProcess,
    runs: &[(usize, usize)],
    generation: u64,
) -> Result<u64, EvictError> {
    let tid = proc.pid();
    if !synced(t) || sh.reg.generation() != generation {
        return Ok(0);
    }
    // The task's mm must still be the one behind the uffd (ESRCH: it is gone).
    if let Err(userfaultfd::Error::SystemError(e)) =
        t.uffd
            .remove_write_protection(super::server::PROBE_ADDR as *mut c_void, PAGE, false)
    {
        if e as i32 == libc::ESRCH {
            return Err(EvictError::Gone { tid });
        }
    }
    // Victims again, under the gate: a write resolved before the stop made its page dirty.
    // Remote pages inside a run are claimed here, so that nobody installs them until the
    // call is over; anything else ends the range.
    // Per segment (a stretch of bits that is one call, or a few where it crosses iovs): the
    // end of its ranges in `ranges` and its victims.
    let mut segs: Vec<(usize, Vec<(usize, usize)>)> = Vec::with_capacity(runs.len());
    let mut gaps: Vec<(usize, usize)> = Vec::new();
    let mut ranges: Vec<(u64, u64)> = Vec::with_capacity(runs.len());
    {
        let _gate = t.wp_gate();
        let space = t.space();
        let mut pieces = Vec::new();
        for &(b0, n) in runs {
            let mut seg = b0;
            let mut victims = Vec::new();
            for b in b0..=b0 + n {
                let keep = b < b0 + n
                    && if evictable(t, b) {
                        push_bit(&mut victims, b);
                        true
                    } else if t.claim(b, 1, b + 1) == 1 {
                        push_bit(&mut gaps, b);
                        true
                    } else {
                        false
                    };
                if keep {
                    continue;
                }
                if !victims.is_empty() {
                    space.pieces(seg, b - seg, &mut pieces);
                    for &(addr, _, len) in &pieces {
                        ranges.push((addr, addr + (len * PAGE) as u64));
                    }
                    segs.push((ranges.len(), std::mem::take(&mut victims)));
                }
                seg = b + 1;
            }
        }
        t.evicting_lock().set(&ranges);
    }
    let (injected, err) = proc.madvise_all(&ranges, Advice::DontNeed);
    let done = injected.ranges;
    sh.c.evict_calls.fetch_add(injected.calls as u64, Relaxed);
    // The events of the calls made are read (each call waited for that); wait until they are
    // handled, so that none is taken for the task's own discard once the announcement is gone.
    let caught_up = synced(t);
    let mut evicted = 0u64;
    if caught_up {
        let _space = t.space_mut();
        // A failed call ends the batch: only the segments whose calls were all made count.
        for (_, victims) in segs.iter().filter(|(end, _)| *end <= done) {
            for &(b0, n) in victims {
                t.unmark_installed(b0, n, &sh.c);
                for b in b0..b0 + n {
                    t.evicted.claim(b);
                }
                t.release(b0, n);
                evicted += n as u64;
            }
        }
        t.evicting_lock().clear();
    }
    for &(b0, n) in &gaps {
        t.release(b0, n);
    }
    // Anything that waited on these pages (a fault read before the stop) tries again now.
    for &(s, e) in &ranges[..done] {
        let _ = t
            .uffd
            .wake(s as *mut c_void, usize::try_from(e - s).unwrap_or(0));
    }
    sh.c.pages_evicted.fetch_add(evicted, Relaxed);
    match err {
        Some(e) => Err(e),
        None => Ok(evicted),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn announced_ranges_take_their_events_in_order_only() {
        let mut a = Announced::default();
        a.set(&[(0x1000, 0x5000), (0x9000, 0xa000)]);
        assert!(!a.take(0x2000, 0x3000), "not where the range's events are");
        assert!(a.take(0x1000, 0x3000), "first VMA of the range");
        assert!(
            !a.take(0x1000, 0x3000),
            "seen already: a second one is the task's"
        );
        assert!(a.take(0x3000, 0x5000));
        assert!(!a.take(0x5000, 0x6000), "beyond the range");
        assert!(!a.take(0x9000, 0xb000), "reaches past the range");
        assert!(a.take(0x9000, 0xa000));
        a.clear();
        assert!(!a.take(0x9000, 0xa000));
    }

    fn task(pages: usize) -> Option<Task> {
        let uffd = userfaultfd::UffdBuilder::new()
            .close_on_exec(true)
            .user_mode_only(true)
            .create()
            .ok()?;
        let base = 0x10_0000u64;
        let (space, n) = super::super::space::Space::new(&[(base, base + pages as u64 * 4096)]);
        Some(Task::new(
            1,
            uffd,
            space,
            super::super::space::Bits::new(n),
            false,
            true,
        ))
    }

    fn install(t: &Task, bits: std::ops::Range<usize>) {
        let c = FetchCounters::default();
        for b in bits {
            t.bits.claim(b);
            t.mark_installed(b, 1, &c);
        }
    }

    #[test]
    fn the_clock_takes_cold_clean_pages_and_spans_remote_gaps() {
        let Some(t) = task(1024) else {
            eprintln!("SKIP: userfaultfd unavailable");
            return;
        };
        install(&t, 0..8);
        install(&t, 20..24); // 8..20 stays remote: a gap a run may span
        install(&t, 24..26);
        t.heat[24].store(1, Relaxed); // touched once: skipped on this lap
        t.written.claim(25); // written: pinned, never evicted
        install(&t, 40..42);
        t.heat[2].store(2, Relaxed);
        let mut hand = 0;
        let (runs, pinned) = choose(&t, &mut hand, 1000, 16);
        assert_eq!(pinned, 1);
        // 0..8 without page 2 (hot), then 20..24 over the remote gap 8..20, then 40..42 (the
        // installed pages 24 and 25 in between end the run).
        assert_eq!(runs, vec![(0, 2), (3, 21), (40, 2)]);
        assert_eq!(t.heat[2].load(Relaxed), 1, "a lap lowers the heat by one");
        assert_eq!(t.heat[24].load(Relaxed), 0);
        let (runs, _) = choose(&t, &mut hand, 1000, 16);
        assert_eq!(
            runs,
            vec![(0, 2), (3, 22), (40, 2)],
            "page 24 is cold on the next lap"
        );
        // `want` bounds the victims, and the hand goes on from where it stopped.
        let mut hand = 0;
        let (runs, _) = choose(&t, &mut hand, 3, 16);
        assert_eq!(runs, vec![(0, 3)]);
        assert_eq!(hand, 3);
        // A refault heats the page up.
        t.evicted.claim(5);
        let c = FetchCounters::default();
        on_demand_fault(&t, 5, &c);
        assert_eq!(c.refaults.load(Relaxed), 1);
        assert_eq!(t.heat[5].load(Relaxed), REFAULT_HEAT);
        on_demand_fault(&t, 6, &c);
        assert_eq!(c.refaults.load(Relaxed), 1, "not evicted: a first fault");
    }

    #[test]
    fn budgets_from_the_configuration_and_the_cgroup_limit() {
        const M: u64 = 1 << 20;
        assert_eq!(effective_budget(0, 0, 1024 * M), 0);
        assert_eq!(effective_budget(256 * M, 0, 1024 * M), 256 * M);
        assert_eq!(
            effective_budget(2048 * M, 0, 1024 * M),
            0,
            "fits: no budget"
        );
        assert_eq!(
            effective_budget(0, 512 * M, 1024 * M),
            448 * M,
            "limit minus an eighth"
        );
        assert_eq!(
            effective_budget(0, 128 * M, 1024 * M),
            96 * M,
            "at least 32 MiB kept"
        );
        assert_eq!(
            effective_budget(0, 40 * M, 1024 * M),
            20 * M,
            "at most half kept"
        );
        assert_eq!(effective_budget(256 * M, 512 * M, 1024 * M), 256 * M);
        assert_eq!(
            effective_budget(0, 2048 * M, 1024 * M),
            0,
            "the limit fits it"
        );
    }

    #[test]
    fn shares_of_the_budget() {
        assert_eq!(share(1000, EVICT_ABOVE), 970);
        assert_eq!(share(0, EVICT_TO), 0);
        assert!(share(u64::MAX, FILL_BELOW) > 0);
        const { assert!(FILL_BELOW < EVICT_TO && EVICT_TO < EVICT_ABOVE) };
    }
}
