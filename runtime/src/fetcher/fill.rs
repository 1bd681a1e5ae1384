//! The fill workers: dedicated OS threads that install pages nobody faulted on yet, so the
//! fault thread only serves faults and events.
//!
//! Work, in priority order: the runs of a replayed working-set profile (as soon as restore
//! finished), then the background fill (policy `full`, or `profile` after the recorded set),
//! round-robin over the tasks in `fill_batch_pages` runs claimed in the shared bitmap. Each run
//! is read from the source in one call and installed with one `UFFDIO_COPY` per contiguous
//! piece (DONTWAKE, then one wake per piece). Workers report to the fault thread through an
//! eventfd: an error, a task that went away, a task with nothing left to claim.

use std::collections::VecDeque;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use super::budget::BudgetGate;
use super::rebase::SourceCell;
use super::server::StopFd;
use super::task::{fetch_bits, zero_run, Install, Task, PAGE};
use super::FetchError;
use crate::images::PAGE_SIZE;
use crate::profile::ProfileRun;
use crate::stats::FetchCounters;

/// Largest hole between two iovs that the fill maps zero pages into.
pub(crate) const MAX_HOLE_PAGES: u64 = 64;
/// Pause after an install met `EAGAIN` (the fault thread has events to read first).
const AGAIN_PAUSE: Duration = Duration::from_micros(200);
/// How often a fill held back by the memory budget looks again.
const BUDGET_RECHECK: Duration = Duration::from_millis(100);

#[derive(Default)]
struct State {
    tasks: Vec<Arc<Task>>,
    fill: bool,
    profile: VecDeque<ProfileRun>,
    stop: bool,
    busy: usize,
    error: Option<FetchError>,
    rr: usize,
}

struct Shared {
    st: Mutex<State>,
    cv: Condvar,
    /// Read it after claiming the bits to read (see `rebase`).
    src: Arc<SourceCell>,
    c: Arc<FetchCounters>,
    batch: usize,
    notify: Arc<StopFd>,
    abort: AtomicBool,
    /// The memory budget: the fill installs only below its [`super::budget::FILL_BELOW`]
    /// share.
    budget: Arc<BudgetGate>,
}

impl Shared {
    /// Whether the budget leaves room for a fill run.
    fn fill_room(&self) -> bool {
        self.budget.fill_room(&self.c, self.batch as u64)
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.st.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A worker's buffers, allocated once.
struct Scratch {
    buf: Vec<u8>,
    pieces: Vec<(u64, usize, usize)>,
}

enum Job {
    Fill(Arc<Task>),
    Profile(Arc<Task>, ProfileRun),
}

/// The worker pool.
pub(crate) struct Pool {
    sh: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

impl Pool {
    pub fn new(
        threads: usize,
        src: Arc<SourceCell>,
        c: Arc<FetchCounters>,
        batch: usize,
        notify: Arc<StopFd>,
        budget: Arc<BudgetGate>,
    ) -> Result<Pool, FetchError> {
        let sh = Arc::new(Shared {
            st: Mutex::new(State::default()),
            cv: Condvar::new(),
            src,
            c,
            batch: batch.max(1),
            notify,
            abort: AtomicBool::new(false),
            budget,
        });
        let mut pool = Pool {
            sh,
            threads: Vec::new(),
        };
        for i in 0..threads.max(1) {
            let sh = pool.sh.clone();
            let h = std::thread::Builder::new()
                .name(format!("dp-fill-{i}"))
                .spawn(move || worker(&sh))
                .map_err(|source| FetchError::Sys {
                    what: "spawn a fill thread",
                    source,
                })?;
            pool.threads.push(h);
        }
        Ok(pool)
    }

    pub fn add_task(&self, t: Arc<Task>) {
        self.sh.lock().tasks.push(t);
        self.sh.cv.notify_all();
    }

    pub fn remove_task(&self, t: &Arc<Task>) {
        self.sh.lock().tasks.retain(|x| !Arc::ptr_eq(x, t));
    }

    /// Starts the background fill.
    pub fn enable_fill(&self) {
        self.sh.lock().fill = true;
        self.sh.cv.notify_all();
    }

    /// Queues a profile for prefetch (before the fill).
    pub fn push_profile(&self, runs: &[ProfileRun]) {
        self.sh.lock().profile.extend(runs.iter().copied());
        self.sh.cv.notify_all();
    }

    /// No queued profile runs and no worker busy.
    pub fn idle(&self) -> bool {
        let st = self.sh.lock();
        st.busy == 0 && st.profile.is_empty()
    }

    pub fn take_error(&self) -> Option<FetchError> {
        self.sh.lock().error.take()
    }

    /// Stops the workers and joins them. With `abort`, runs in progress are abandoned between
    /// chunks (their unfinished bits released, so they are poisoned); otherwise each worker
    /// finishes its current run.
    pub fn shutdown(&mut self, abort: bool) {
        if abort {
            self.sh.abort.store(true, Relaxed);
        }
        self.sh.lock().stop = true;
        self.sh.cv.notify_all();
        for h in self.threads.drain(..) {
            let _ = h.join();
        }
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.shutdown(true);
    }
}

fn next_job(sh: &Shared) -> Option<Job> {
    let mut st = sh.lock();
    loop {
        if st.stop {
            return None;
        }
        if let Some(run) = st.profile.pop_front() {
            let t = st
                .tasks
                .iter()
                .find(|t| !t.forked && t.pid == run.pid && !t.gone.load(Relaxed))
                .cloned();
            if let Some(t) = t {
                st.busy += 1;
                return Some(Job::Profile(t, run));
            }
            continue;
        }
        let room = sh.fill_room();
        if st.fill && !st.tasks.is_empty() && room {
            let n = st.tasks.len();
            for i in 0..n {
                let k = (st.rr + i) % n;
                let t = &st.tasks[k];
                if t.remaining.load(Relaxed) > 0 && !t.gone.load(Relaxed) {
                    let t = t.clone();
                    st.rr = k + 1;
                    st.busy += 1;
                    return Some(Job::Fill(t));
                }
            }
        }
        if st.fill && !room {
            // At the budget: look again when the tasks may have freed memory.
            st = sh
                .cv
                .wait_timeout(st, BUDGET_RECHECK)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
            continue;
        }
        st = sh.cv.wait(st).unwrap_or_else(PoisonError::into_inner);
    }
}

fn worker(sh: &Shared) {
    let mut sc = Scratch {
        buf: vec![0u8; sh.batch * PAGE],
        pieces: Vec::with_capacity(16),
    };
    while let Some(job) = next_job(sh) {
        let (t, r) = match job {
            Job::Fill(t) => {
                let r = fill_once(sh, &t, &mut sc);
                (t, r)
            }
            Job::Profile(t, run) => {
                let r = profile_run(sh, &t, run, &mut sc);
                (t, r)
            }
        };
        let mut st = sh.lock();
        st.busy -= 1;
        let tell = match r {
            Err(e) => {
                if st.error.is_none() {
                    st.error = Some(e);
                }
                st.stop = true;
                sh.cv.notify_all();
                true
            }
            Ok(again) => {
                // The fault thread re-checks for completion or reaps the task.
                let tell = t.gone.load(Relaxed) || t.remaining.load(Relaxed) == 0;
                if again {
                    drop(st);
                    std::thread::sleep(AGAIN_PAUSE);
                }
                tell
            }
        };
        if tell {
            sh.notify.signal();
        }
    }
}

/// Installs claimed bits, releasing what could not be installed. Returns true on `Again`.
fn install(
    sh: &Shared,
    t: &Task,
    b0: usize,
    n: usize,
    sc: &mut Scratch,
    counter: &AtomicU64,
    profile: bool,
) -> Result<bool, FetchError> {
    let r = fetch_bits(
        t,
        &*sh.src.get(),
        &mut sc.buf,
        &sh.c,
        b0,
        n,
        false,
        &mut sc.pieces,
        Some(&sh.abort),
        true,
    );
    t.log()
        .end(b0, n, t.epoch.load(std::sync::atomic::Ordering::Acquire));
    let f = match r {
        Ok(f) => f,
        Err(e) => {
            t.release(b0, n);
            return Err(e);
        }
    };
    counter.fetch_add(f.installed, Relaxed);
    if profile {
        sh.c.profile_prefetched.fetch_add(f.installed, Relaxed);
    }
    match f.outcome {
        Install::Done | Install::Vanished => Ok(false),
        Install::Gone => {
            t.gone.store(true, Relaxed);
            Ok(false)
        }
        Install::Again => {
            t.release(b0 + f.done, n - f.done);
            Ok(true)
        }
    }
}

fn fill_once(sh: &Shared, t: &Task, sc: &mut Scratch) -> Result<bool, FetchError> {
    let claimed = {
        let mut log = t.log();
        let space = t.space();
        let c = t.claim_next(&space, sh.batch);
        if let Some((b0, n)) = c {
            log.begin(b0, n);
        }
        c
    };
    let Some((b0, n)) = claimed else {
        return Ok(false);
    };
    let again = install(sh, t, b0, n, sc, &sh.c.pages_filled, false)?;
    if !again && !t.gone.load(Relaxed) {
        fill_hole_after(sh, t, b0 + n - 1, sc)?;
    }
    Ok(again)
}

/// When a fill run ends at the end of its iov and the next iov starts at most
/// [`MAX_HOLE_PAGES`] later, maps zero pages into the hole between them (pages never dumped:
/// zero, exactly what a fault there gets), so the task does not fault on each of them. Pages
/// that exist meanwhile give EEXIST; a hole that is not registered or not mapped gives ENOENT.
fn fill_hole_after(sh: &Shared, t: &Task, last: usize, sc: &mut Scratch) -> Result<(), FetchError> {
    let space = t.space();
    space.pieces(last, 1, &mut sc.pieces);
    let Some(&(addr, _, _)) = sc.pieces.first() else {
        return Ok(());
    };
    let Some(k) = space.lookup(addr) else {
        return Ok(());
    };
    let (iov, next) = (space.iovs[k], space.iovs.get(k + 1));
    let Some(next) = next.filter(|_| addr + PAGE_SIZE == iov.end) else {
        return Ok(());
    };
    let gap = (next.start - iov.end) / PAGE_SIZE;
    if gap == 0 || gap > MAX_HOLE_PAGES {
        return Ok(());
    }
    let (r, _) = zero_run(t, iov.end, gap, true, &sh.c)?;
    if r == Install::Gone {
        t.gone.store(true, Relaxed);
    }
    Ok(())
}

/// Prefetches one profile run: the bits of its dump-time pages that nobody claimed yet.
fn profile_run(
    sh: &Shared,
    t: &Task,
    run: ProfileRun,
    sc: &mut Scratch,
) -> Result<bool, FetchError> {
    let end_img = run.vaddr + u64::from(run.pages) * PAGE_SIZE;
    let mut img = run.vaddr;
    while img < end_img {
        if sh.abort.load(Relaxed) || t.gone.load(Relaxed) {
            return Ok(false);
        }
        let (b, limit) = {
            let space = t.space();
            match space.bit_of_img(img) {
                Some(b) => (b, space.orig_end(b)),
                None => {
                    img += PAGE_SIZE; // not lazy (anymore): skip the page
                    continue;
                }
            }
        };
        let want = usize::try_from((end_img - img) / PAGE_SIZE).unwrap_or(usize::MAX);
        let span = want.min(limit - b).min(sh.batch);
        // Claim and install the unclaimed sub-runs of [b, b + span).
        let mut i = 0;
        while i < span {
            if sh.abort.load(Relaxed) || t.gone.load(Relaxed) {
                return Ok(false);
            }
            let n = {
                let mut log = t.log();
                let n = t.claim(b + i, span - i, b + span);
                if n > 0 {
                    log.begin(b + i, n);
                }
                n
            };
            if n == 0 {
                i += 1;
                continue;
            }
            if install(sh, t, b + i, n, sc, &sh.c.pages_prefetched, true)? {
                // Events pending: the released bits are claimed again after a pause.
                std::thread::sleep(AGAIN_PAUSE);
                continue;
            }
            i += n;
        }
        img += span as u64 * PAGE_SIZE;
    }
    Ok(false)
}
