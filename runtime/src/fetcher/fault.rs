//! The fault path: serve one demand fault (the faulting page first, woken at once, then the
//! detector's prefetch plan) and record it into the working-set profile. Runs on the fault
//! thread itself (`fault_threads = 1`, best with a local source: no hand-off) or on fault
//! helper threads fed by the fault thread (`fault_threads > 1`, for a remote source: faults of
//! several threads are then served concurrently instead of one round trip after the other).
//! No allocation, no logging.

use std::collections::VecDeque;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use libc::c_void;

use super::budget::BudgetGate;
use super::prefetch::Plan;
use super::rebase::SourceCell;
use super::server::StopFd;
use super::task::{fetch_bits, zero_run, Install, Task, PAGE};
use super::FetchError;
use crate::images::PAGE_SIZE;
use crate::profile::Recorder;
use crate::stats::FetchCounters;

/// Pause of a helper before retrying a fault that met EAGAIN (events pending).
const AGAIN_PAUSE: Duration = Duration::from_micros(50);
/// Queue slots reserved for fault helpers.
const QUEUE: usize = 1024;

/// Profile recording (policy `profile` without a usable profile).
pub(crate) struct Recording {
    pub key: String,
    pub rec: Recorder,
}

/// What every fault server shares.
pub(crate) struct FaultShared {
    /// Read it after claiming the bits to read (see `rebase`).
    pub src: Arc<SourceCell>,
    pub c: Arc<FetchCounters>,
    /// Aligned fault-around window and largest prefetch window, in pages.
    pub around: u64,
    pub max: u64,
    /// Whether a profile is replayed (demand faults in the window are misses).
    pub replay: bool,
    /// The memory budget: faults wait for the evictor above it, prefetch stops at it.
    pub budget: Arc<BudgetGate>,
    t0: Instant,
    /// End of the profile window in µs since `t0`, +1 (0 = not known yet).
    window_end: AtomicU64,
    recording: Mutex<Option<Recording>>,
    recording_on: AtomicBool,
}

impl FaultShared {
    pub fn new(
        src: Arc<SourceCell>,
        c: Arc<FetchCounters>,
        around: u64,
        max: u64,
        replay: bool,
        recording: Option<Recording>,
        t0: Instant,
    ) -> FaultShared {
        FaultShared {
            src,
            c,
            around,
            max,
            replay,
            budget: Arc::new(BudgetGate::default()),
            t0,
            window_end: AtomicU64::new(0),
            recording_on: AtomicBool::new(recording.is_some()),
            recording: Mutex::new(recording),
        }
    }

    /// The memory budget the fault path keeps to.
    pub fn with_budget(mut self, budget: Arc<BudgetGate>) -> FaultShared {
        self.budget = budget;
        self
    }

    fn now_us(&self) -> u64 {
        u64::try_from(self.t0.elapsed().as_micros()).unwrap_or(u64::MAX)
    }

    pub fn set_window_end(&self, at: Instant) {
        let us = u64::try_from(at.saturating_duration_since(self.t0).as_micros()).unwrap_or(0);
        self.window_end.store(us.saturating_add(1), Relaxed);
    }

    /// Whether the profile window is known and over.
    pub fn window_over(&self) -> bool {
        let w = self.window_end.load(Relaxed);
        w != 0 && self.now_us() + 1 >= w
    }

    /// Whether demand faults count as profile misses now (replay, inside the window).
    pub fn in_window(&self) -> bool {
        self.replay && !self.window_over()
    }

    pub fn is_recording(&self) -> bool {
        self.recording_on.load(Relaxed)
    }

    fn lock(&self) -> MutexGuard<'_, Option<Recording>> {
        self.recording
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Ends the recording and hands it over.
    pub fn take_recording(&self) -> Option<Recording> {
        self.recording_on.store(false, Relaxed);
        self.lock().take()
    }

    /// Appends bits to the profile being recorded (the demand-touched set, with its prefetch).
    fn record(&self, task: &Task, b: usize, n: usize) {
        if n == 0 || task.forked || !self.is_recording() || self.window_over() {
            return;
        }
        let img = task.space().img_of(b);
        if let Some(r) = self.lock().as_mut() {
            r.rec
                .push(task.pid, img, u32::try_from(n).unwrap_or(u32::MAX));
            self.c.profile_pages.store(r.rec.pages(), Relaxed);
        }
    }
}

/// A piece of a prefetch window: lazy bits `[lo, hi)` of one iov, or a hole `(address, pages)`.
#[derive(Debug, Clone, Copy)]
enum Span {
    Bits(usize, usize),
    Zero(u64, u64),
}

/// Buffers of one fault server, allocated once.
pub(crate) struct Scratch {
    buf: Vec<u8>,
    pieces: Vec<(u64, usize, usize)>,
    spans: Vec<Span>,
}

impl Scratch {
    /// Buffers for windows of up to `pages` pages.
    pub fn new(pages: usize) -> Scratch {
        Scratch {
            buf: vec![0; pages.max(16) * PAGE],
            pieces: Vec::with_capacity(16),
            spans: Vec::with_capacity(2 * pages + 2),
        }
    }
}

/// The outcome of serving a fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Served {
    Done,
    /// Events are pending (EAGAIN): serve it again after they were read.
    Again,
    /// The task is gone.
    Gone,
}

fn record_latency(c: &FetchCounters, t0: Instant) {
    c.fault_latency
        .record(u64::try_from(t0.elapsed().as_micros()).unwrap_or(u64::MAX));
}

/// Serves one fault: the faulting page first (woken at once), then the prefetch plan, unless
/// `waiting()` says other faults wait (demand first; the detector keeps its state, so a
/// stream's next fault still grows its window).
pub(crate) fn serve(
    fs: &FaultShared,
    task: &Task,
    addr: u64,
    t0: Instant,
    sc: &mut Scratch,
    waiting: &dyn Fn() -> bool,
) -> Result<Served, FetchError> {
    let c = &*fs.c;
    let page = addr & !(PAGE_SIZE - 1);
    let found = {
        let sp = task.space();
        sp.lookup(page).map(|k| sp.bit_of(k, page))
    };
    let Some(bit) = found else {
        let (r, _) = zero_run(task, page, 1, true, c)?;
        return Ok(match r {
            Install::Done => {
                record_latency(c, t0);
                Served::Done
            }
            Install::Vanished => {
                let _ = task.uffd.wake(page as *mut c_void, PAGE);
                Served::Done
            }
            Install::Again => Served::Again,
            Install::Gone => Served::Gone,
        });
    };
    // Over the budget the fault waits a little for the evictor to make room.
    if fs.budget.hold_fault(c, t0) {
        return Ok(Served::Again);
    }
    // The faulting page is installed even when someone else claimed it (it may be mid-copy
    // on a fill worker); EEXIST then just wakes the thread.
    let newly = task.claim(bit, 1, bit + 1) == 1;
    let f = fetch_bits(
        task,
        &*fs.src.get(),
        &mut sc.buf,
        c,
        bit,
        1,
        true,
        &mut sc.pieces,
        None,
        false,
    )?;
    match f.outcome {
        Install::Again => {
            if newly {
                task.release(bit, 1);
            }
            return Ok(Served::Again);
        }
        Install::Gone => return Ok(Served::Gone),
        Install::Vanished => {
            // Unmapped under us: let the thread retry its access.
            let _ = task.uffd.wake(page as *mut c_void, PAGE);
        }
        Install::Done => {}
    }
    c.pages_faulted.fetch_add(f.installed, Relaxed);
    super::budget::on_demand_fault(task, bit, c);
    if fs.in_window() {
        c.profile_misses.fetch_add(f.installed, Relaxed);
    }
    if newly {
        fs.record(task, bit, 1);
    }
    record_latency(c, t0);
    if waiting() || !fs.budget.room_for(c, fs.around) {
        let _ = task.detector().on_fault(page, fs.around, fs.max);
        return Ok(Served::Done);
    }
    // Prefetch around the fault, after the faulting thread was woken.
    let plan = task.detector().on_fault(page, fs.around, fs.max);
    let gone = match plan {
        Plan::Window { start, pages } => prefetch_window(fs, task, start, pages, sc)?,
        Plan::Stride {
            first,
            stride,
            count,
        } => {
            let mut gone = false;
            for i in 0..count {
                let a = first.wrapping_add((stride * i as i64) as u64);
                let b = {
                    let sp = task.space();
                    sp.lookup(a).map(|k| sp.bit_of(k, a))
                };
                if let Some(b) = b {
                    if prefetch_bits(fs, task, b, b + 1, sc)? {
                        gone = true;
                        break;
                    }
                }
            }
            gone
        }
    };
    Ok(if gone { Served::Gone } else { Served::Done })
}

/// Installs a window that may span several iovs; the holes between them (pages never dumped,
/// or dropped) get zero pages, as a fault there would (ENOENT where nothing is registered).
/// True if the task is gone.
fn prefetch_window(
    fs: &FaultShared,
    task: &Task,
    start: u64,
    pages: u64,
    sc: &mut Scratch,
) -> Result<bool, FetchError> {
    let end = start + pages * PAGE_SIZE;
    let mut spans = std::mem::take(&mut sc.spans);
    spans.clear();
    {
        let sp = task.space();
        let mut i = sp.iovs.partition_point(|v| v.end <= start);
        let mut prev: Option<u64> = None;
        while i < sp.iovs.len() && sp.iovs[i].start < end {
            let iov = sp.iovs[i];
            if let Some(pe) = prev.filter(|&pe| pe < iov.start) {
                spans.push(Span::Zero(pe, (iov.start - pe) / PAGE_SIZE));
            }
            let (a, z) = (start.max(iov.start), end.min(iov.end));
            let b = sp.bit_of(i, a);
            spans.push(Span::Bits(b, b + ((z - a) / PAGE_SIZE) as usize));
            prev = Some(iov.end);
            i += 1;
        }
    }
    let mut r = Ok(false);
    for &span in &spans {
        let g = match span {
            Span::Bits(lo, hi) => prefetch_bits(fs, task, lo, hi, sc),
            Span::Zero(addr, n) => {
                zero_run(task, addr, n, true, &fs.c).map(|(res, _)| res == Install::Gone)
            }
        };
        match g {
            Ok(false) => {}
            other => {
                r = other;
                break;
            }
        }
    }
    sc.spans = spans;
    r
}

/// Installs the unclaimed pages among bits `[lo, hi)` (one current iov). True if the task is
/// gone.
fn prefetch_bits(
    fs: &FaultShared,
    task: &Task,
    lo: usize,
    hi: usize,
    sc: &mut Scratch,
) -> Result<bool, FetchError> {
    let mut b = lo;
    while b < hi {
        let n = task.claim(b, hi - b, hi);
        if n == 0 {
            b += 1;
            continue;
        }
        let f = fetch_bits(
            task,
            &*fs.src.get(),
            &mut sc.buf,
            &fs.c,
            b,
            n,
            true,
            &mut sc.pieces,
            None,
            true,
        )?;
        fs.c.pages_prefetched.fetch_add(f.installed, Relaxed);
        fs.record(task, b, f.done);
        match f.outcome {
            Install::Done | Install::Vanished => {}
            Install::Again => {
                // Events are pending: leave the rest to later faults or the fill.
                task.release(b + f.done, n - f.done);
                return Ok(false);
            }
            Install::Gone => return Ok(true),
        }
        b += n;
    }
    Ok(false)
}

#[derive(Default)]
struct HState {
    jobs: VecDeque<(Arc<Task>, u64, Instant)>,
    stop: bool,
    error: Option<FetchError>,
}

struct HShared {
    st: Mutex<HState>,
    /// Faults queued and not yet picked up.
    queued: AtomicUsize,
    /// Helpers waiting for work.
    idle: AtomicUsize,
    cv: Condvar,
    fs: Arc<FaultShared>,
    notify: Arc<StopFd>,
}

impl HShared {
    fn lock(&self) -> MutexGuard<'_, HState> {
        self.st.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Fault helper threads: the fault thread reads the uffds and applies events, the helpers
/// serve the faults, several at a time.
pub(crate) struct Helpers {
    sh: Arc<HShared>,
    threads: Vec<JoinHandle<()>>,
}

impl Helpers {
    pub fn new(
        n: usize,
        fs: Arc<FaultShared>,
        notify: Arc<StopFd>,
        pages: usize,
    ) -> Result<Helpers, FetchError> {
        let sh = Arc::new(HShared {
            st: Mutex::new(HState {
                jobs: VecDeque::with_capacity(QUEUE),
                ..HState::default()
            }),
            cv: Condvar::new(),
            queued: AtomicUsize::new(0),
            idle: AtomicUsize::new(0),
            fs,
            notify,
        });
        let mut h = Helpers {
            sh,
            threads: Vec::new(),
        };
        for i in 0..n {
            let sh = h.sh.clone();
            let t = std::thread::Builder::new()
                .name(format!("dp-fault-{i}"))
                .spawn(move || helper(&sh, pages))
                .map_err(|source| FetchError::Sys {
                    what: "spawn a fault helper thread",
                    source,
                })?;
            h.threads.push(t);
        }
        Ok(h)
    }

    /// Queues a fault.
    pub fn push(&self, task: Arc<Task>, addr: u64, t0: Instant) {
        self.sh.lock().jobs.push_back((task, addr, t0));
        self.sh.queued.fetch_add(1, Relaxed);
        self.sh.cv.notify_one();
    }

    pub fn take_error(&self) -> Option<FetchError> {
        self.sh.lock().error.take()
    }

    /// Stops and joins the helpers (queued faults are dropped: the fetcher is ending).
    pub fn shutdown(&mut self) {
        {
            let mut st = self.sh.lock();
            st.stop = true;
            clear_queue(&mut st, &self.sh.queued);
        }
        self.sh.cv.notify_all();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for Helpers {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn clear_queue(st: &mut HState, queued: &AtomicUsize) {
    st.jobs.clear();
    queued.store(0, Relaxed);
}

fn helper(sh: &HShared, pages: usize) {
    let mut sc = Scratch::new(pages);
    loop {
        let (task, addr, t0) = {
            let mut st = sh.lock();
            loop {
                if st.stop {
                    return;
                }
                if let Some(j) = st.jobs.pop_front() {
                    sh.queued.fetch_sub(1, Relaxed);
                    break j;
                }
                sh.idle.fetch_add(1, Relaxed);
                st = sh.cv.wait(st).unwrap_or_else(PoisonError::into_inner);
                sh.idle.fetch_sub(1, Relaxed);
            }
        };
        loop {
            if task.gone.load(Relaxed) {
                break;
            }
            // Skip the prefetch only when queued faults find no idle helper: a stream's next
            // fault goes to another helper, which prefetches beyond this window (pipelining).
            let waiting = || sh.queued.load(Relaxed) > sh.idle.load(Relaxed);
            match serve(&sh.fs, &task, addr, t0, &mut sc, &waiting) {
                Ok(Served::Done) => break,
                Ok(Served::Again) => {
                    if sh.lock().stop {
                        return;
                    }
                    std::thread::sleep(AGAIN_PAUSE);
                }
                Ok(Served::Gone) => {
                    task.gone.store(true, Relaxed);
                    sh.notify.signal();
                    break;
                }
                Err(e) => {
                    let mut st = sh.lock();
                    if st.error.is_none() {
                        st.error = Some(e);
                    }
                    drop(st);
                    sh.notify.signal();
                    break;
                }
            }
        }
    }
}
