//! The fault thread: the socket handshake as a non-blocking state machine, the epoll loop over
//! the uffds, the address-space events, the fault path (with fault-around and prefetch) and
//! the profile recorder. The background fill and the profile prefetch run on the fill workers
//! ([`super::fill`]).

use std::collections::HashMap;
use std::io::{self, IoSliceMut, Read};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, IntoRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering::{Relaxed, SeqCst};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use distriproc_config::FillPolicy;
use libc::c_void;
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
use userfaultfd::{Event, EventBuffer, FaultKind, RegisterMode, Uffd};

use super::budget::BudgetGate;
use super::fault::{self, FaultShared, Helpers, Recording, Scratch, Served};
use super::fill::Pool;
use super::resident::Registry;
use super::space::{lazy_ranges, Bits, Space};
use super::task::{poison, unprotect, Task, Unprotect, PAGE};
use super::{FetchError, FetcherOptions, LAZY_PAGES_SOCKET, RESTORE_FINISHED};
use crate::images::ImageDir;
use crate::profile::{checkpoint_key, Profile, Recorder};
use crate::source::PageSource;
use crate::stats::{FetchCounters, ProfileState};

const TOKEN_STOP: u64 = 0;
const TOKEN_LISTEN: u64 = 1;
const TOKEN_CONN: u64 = 2;
const TOKEN_FILL: u64 = 3;
const TOKEN_TASK: u64 = 16;
/// uffd messages read per `read(2)`.
const EVENT_BATCH: usize = 64;
/// How often idle tasks are probed for exit.
const PROBE_INTERVAL: Duration = Duration::from_secs(1);
/// An address no task maps, used for the exit probe (at `mmap_min_addr`).
pub(crate) const PROBE_ADDR: u64 = 0x10000;
/// Runs reserved for the profile recorder (16 bytes each).
const RECORD_RUNS: usize = 1 << 16;

/// The fetcher thread's handle.
pub(crate) type FetcherThread = JoinHandle<Result<(), FetchError>>;

/// The stop eventfd.
pub(crate) struct StopFd(OwnedFd);

impl StopFd {
    fn new() -> io::Result<StopFd> {
        // SAFETY: eventfd(2) takes no pointers; the result is checked below.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh descriptor that nothing else owns.
        Ok(StopFd(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    pub(crate) fn signal(&self) {
        let _ = nix::unistd::write(&self.0, &1u64.to_ne_bytes());
    }

    fn drain(&self) {
        let mut b = [0u8; 8];
        let _ = nix::unistd::read(self.0.as_raw_fd(), &mut b);
    }
}

/// What the `profile` policy found at bind.
pub(crate) enum ProfilePlan {
    /// Not the `profile` policy (or no key could be computed).
    Off,
    /// No usable profile: record one under this key.
    Record { key: String, refused: bool },
    /// Replay this profile.
    Replay(Profile),
}

/// Everything `bind` prepares: the listening socket and the lazy ranges of every task.
pub(crate) struct Prepared {
    pub socket_path: PathBuf,
    dirfd: OwnedFd,
    listener: Option<UnixListener>,
    plans: HashMap<u32, Vec<(u64, u64)>>,
    /// Per task, the VMAs holding lazy ranges (what CRIU's restorer registered), to re-register
    /// with write-protect when writes are tracked.
    vmas: HashMap<u32, Vec<(u64, u64)>>,
    expected: usize,
    source: Arc<dyn PageSource>,
    opts: FetcherOptions,
    profile: ProfilePlan,
    pub(crate) keeper: Option<Arc<super::keeper::KeeperLink>>,
}

impl Prepared {
    /// The page source the fetcher starts with.
    pub fn source(&self) -> Arc<dyn PageSource> {
        self.source.clone()
    }

    pub fn new(
        work_dir: &Path,
        images: &Path,
        source: Arc<dyn PageSource>,
        mut opts: FetcherOptions,
    ) -> Result<Prepared, FetchError> {
        let img = ImageDir::open(images)?;
        // A local source over the same directory decoded pstree and pagemaps already.
        let known = source.decoded(images);
        let decoded_tree;
        let tree = match known {
            Some(d) => &d.pstree,
            None => {
                decoded_tree = img.pstree()?;
                &decoded_tree
            }
        };
        let mut plans = HashMap::new();
        let mut lazy_vmas = HashMap::new();
        for e in tree {
            if !images.join(format!("mm-{}.img", e.pid)).exists() {
                continue; // a zombie: no memory
            }
            let vmas = img.vmas(e.pid)?;
            let ranges = match known.and_then(|d| d.pagemaps.get(&e.pid)) {
                Some(entries) => lazy_ranges(entries, &vmas),
                None => lazy_ranges(&img.pagemap_entries(e.pid)?.1, &vmas),
            };
            let holding: Vec<(u64, u64)> = vmas
                .iter()
                .filter(|v| v.can_be_lazy())
                .filter(|v| ranges.iter().any(|&(s, t)| s < v.end && t > v.start))
                .map(|v| (v.start, v.end))
                .collect();
            lazy_vmas.insert(e.pid, holding);
            plans.insert(e.pid, ranges);
        }
        let expected = tree.len();
        let lazy_bytes: u64 = plans.values().flatten().map(|&(s, t)| t - s).sum();
        let budget =
            super::budget::effective_budget(opts.memory_budget, opts.memory_limit, lazy_bytes);
        if budget != opts.memory_budget {
            tracing::info!(
                configured = opts.memory_budget,
                memory_limit = opts.memory_limit,
                lazy_bytes,
                budget,
                "memory budget adjusted to the checkpoint and the cgroup limit"
            );
        }
        opts.memory_budget = budget;
        let profile = if opts.fill == FillPolicy::Profile {
            load_profile(images, &opts.profile_dir)
        } else {
            ProfilePlan::Off
        };
        let socket_path = work_dir.join(LAZY_PAGES_SOCKET);
        let sock_err = |what, source| FetchError::Socket {
            what,
            path: socket_path.clone(),
            source,
        };
        let raw = nix::fcntl::open(
            work_dir,
            nix::fcntl::OFlag::O_PATH
                | nix::fcntl::OFlag::O_DIRECTORY
                | nix::fcntl::OFlag::O_CLOEXEC,
            nix::sys::stat::Mode::empty(),
        )
        .map_err(|e| sock_err("open the work dir of", io::Error::from(e)))?;
        // SAFETY: `raw` was just returned by open(2) and is owned by nobody else.
        let dirfd = unsafe { OwnedFd::from_raw_fd(raw) };
        let short = PathBuf::from(format!(
            "/proc/self/fd/{}/{LAZY_PAGES_SOCKET}",
            dirfd.as_raw_fd()
        ));
        match std::fs::remove_file(&short) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                return Err(sock_err("remove the stale socket", e))
            }
            _ => {}
        }
        let listener = UnixListener::bind(&short).map_err(|e| sock_err("bind", e))?;
        listener
            .set_nonblocking(true)
            .map_err(|e| sock_err("set non-blocking", e))?;
        Ok(Prepared {
            socket_path,
            dirfd,
            listener: Some(listener),
            plans,
            vmas: lazy_vmas,
            expected,
            source,
            opts,
            profile,
            keeper: None,
        })
    }

    /// The memory budget in pages (0 = none), when writes are tracked (only tracked pages
    /// can be evicted).
    pub fn budget_pages(&self) -> (u64, bool) {
        (
            self.opts.memory_budget / PAGE as u64,
            self.opts.track_writes,
        )
    }

    pub fn spawn(
        self,
        counters: Arc<FetchCounters>,
        reg: Arc<Registry>,
        budget: Arc<BudgetGate>,
    ) -> Result<(Arc<StopFd>, FetcherThread), FetchError> {
        let stop = Arc::new(StopFd::new().map_err(|source| FetchError::Sys {
            what: "eventfd",
            source,
        })?);
        let stop2 = stop.clone();
        let t0 = Instant::now();
        let thread = std::thread::Builder::new()
            .name("dp-fetcher".into())
            .spawn(move || {
                let c = counters.clone();
                let r =
                    Loop::new(self, stop2, counters, t0, reg.clone(), budget).and_then(|mut lp| {
                        let r = lp.run();
                        lp.finish(&r);
                        r
                    });
                reg.clear();
                c.finished.store(true, Relaxed);
                if let Err(e) = &r {
                    tracing::warn!(error = %e, "lazy-pages fetcher failed");
                }
                r
            })
            .map_err(|source| FetchError::Sys {
                what: "spawn the fetcher thread",
                source,
            })?;
        Ok((stop, thread))
    }
}

fn load_profile(images: &Path, dir: &Path) -> ProfilePlan {
    let key = match checkpoint_key(images) {
        Ok(k) => k,
        Err(e) => {
            tracing::warn!(error = %e, "no checkpoint identity: profile policy acts as full");
            return ProfilePlan::Off;
        }
    };
    match Profile::load(dir, &key) {
        Ok(Some(p)) => ProfilePlan::Replay(p),
        Ok(None) => ProfilePlan::Record {
            key,
            refused: false,
        },
        Err(e) => {
            tracing::warn!(error = %e, "working-set profile refused; restoring without it");
            ProfilePlan::Record { key, refused: true }
        }
    }
}

enum Conn {
    Pid { buf: [u8; 4], got: usize },
    Fd { pid: i32 },
    Marker { buf: [u8; 4], got: usize },
    Done,
}

struct Entry {
    task: Arc<Task>,
}

struct Loop {
    p: Prepared,
    epoll: Epoll,
    /// Keeps the eventfd registered in `epoll` open even if the handle is dropped.
    _stop: Arc<StopFd>,
    listener: Option<UnixListener>,
    conn: Option<UnixStream>,
    state: Conn,
    received: usize,
    finished: bool,
    tasks: Vec<Option<Entry>>,
    /// The tasks as [`super::ResidencyProbe`]s see them.
    reg: Arc<Registry>,
    pool: Pool,
    notify: Arc<StopFd>,
    fill_on: bool,
    /// End of the profile window (restore finished + `profile_window`), once known.
    window_end: Option<Instant>,
    replay: Option<Profile>,
    fs: Arc<FaultShared>,
    sc: Scratch,
    helpers: Option<Helpers>,
    /// Epoch of the uffd read being handled (see `Task::fork_bits`).
    read_epoch: u64,
    /// Faults of the current batch still to serve after this one.
    batch_left: usize,
    c: Arc<FetchCounters>,
    t0: Instant,
    deadline: Option<(Instant, &'static str, Duration)>,
    evbuf: EventBuffer,
    batch: Vec<Event>,
    faults: Vec<(u64, Instant)>,
    deferred: Vec<(usize, u64, Instant)>,
    deferred_spare: Vec<(usize, u64, Instant)>,
    /// Write-protect faults of the current batch, then those to retry (EAGAIN).
    wp_faults: Vec<u64>,
    deferred_wp: Vec<(usize, u64)>,
    deferred_wp_spare: Vec<(usize, u64)>,
    last_probe: Instant,
    stopped: bool,
}

fn sys(what: &'static str) -> impl Fn(nix::Error) -> FetchError {
    move |e| FetchError::Sys {
        what,
        source: io::Error::from(e),
    }
}

impl Loop {
    fn new(
        mut p: Prepared,
        stop: Arc<StopFd>,
        c: Arc<FetchCounters>,
        t0: Instant,
        reg: Arc<Registry>,
        budget: Arc<BudgetGate>,
    ) -> Result<Loop, FetchError> {
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC).map_err(sys("epoll_create"))?;
        epoll
            .add(
                stop.0.as_fd(),
                EpollEvent::new(EpollFlags::EPOLLIN, TOKEN_STOP),
            )
            .map_err(sys("epoll_ctl"))?;
        let listener = p.listener.take().ok_or(FetchError::Sys {
            what: "take the listening socket",
            source: io::Error::from(io::ErrorKind::NotFound),
        })?;
        epoll
            .add(
                &listener,
                EpollEvent::new(EpollFlags::EPOLLIN, TOKEN_LISTEN),
            )
            .map_err(sys("epoll_ctl"))?;
        let fa = p
            .opts
            .fault_around_pages
            .max(p.opts.prefetch_max_pages)
            .max(16);
        let accept = p.opts.accept_timeout;
        let notify = Arc::new(StopFd::new().map_err(|source| FetchError::Sys {
            what: "eventfd",
            source,
        })?);
        epoll
            .add(
                notify.0.as_fd(),
                EpollEvent::new(EpollFlags::EPOLLIN, TOKEN_FILL),
            )
            .map_err(sys("epoll_ctl"))?;
        let workers = p.opts.fill_threads * p.source.fill_workers_per_thread().clamp(1, 4);
        let pool = Pool::new(
            workers.min(super::MAX_FILL_THREADS),
            reg.source.clone(),
            c.clone(),
            p.opts.fill_batch_pages,
            notify.clone(),
            budget.clone(),
        )?;
        c.budget_pages.store(budget.pages, Relaxed);
        let (recording, replay) = match std::mem::replace(&mut p.profile, ProfilePlan::Off) {
            ProfilePlan::Off => (None, None),
            ProfilePlan::Record { key, refused } => {
                let st = if refused {
                    ProfileState::Refused
                } else {
                    ProfileState::Recording
                };
                c.profile_state.store(st.as_u8(), Relaxed);
                (
                    Some(Recording {
                        key,
                        rec: Recorder::with_capacity(RECORD_RUNS),
                    }),
                    None,
                )
            }
            ProfilePlan::Replay(prof) => {
                c.profile_state
                    .store(ProfileState::Replayed.as_u8(), Relaxed);
                c.profile_pages.store(prof.pages(), Relaxed);
                (None, Some(prof))
            }
        };
        let fs = Arc::new(
            FaultShared::new(
                reg.source.clone(),
                c.clone(),
                p.opts.fault_around_pages.max(1) as u64,
                p.opts.prefetch_max_pages as u64,
                replay.is_some(),
                recording,
                t0,
            )
            .with_budget(budget.clone()),
        );
        let helpers = if p.opts.fault_threads > 1 {
            Some(Helpers::new(
                p.opts.fault_threads,
                fs.clone(),
                notify.clone(),
                fa,
            )?)
        } else {
            None
        };
        Ok(Loop {
            epoll,
            _stop: stop,
            listener: Some(listener),
            conn: None,
            state: Conn::Pid {
                buf: [0; 4],
                got: 0,
            },
            received: 0,
            finished: false,
            tasks: Vec::new(),
            reg,
            c,
            t0,
            deadline: Some((t0 + accept, "criu to connect to lazy-pages.socket", accept)),
            evbuf: EventBuffer::new(EVENT_BATCH),
            batch: Vec::with_capacity(EVENT_BATCH),
            faults: Vec::with_capacity(EVENT_BATCH),
            deferred: Vec::with_capacity(EVENT_BATCH),
            deferred_spare: Vec::with_capacity(EVENT_BATCH),
            wp_faults: Vec::with_capacity(EVENT_BATCH),
            deferred_wp: Vec::with_capacity(EVENT_BATCH),
            deferred_wp_spare: Vec::with_capacity(EVENT_BATCH),
            last_probe: Instant::now(),
            pool,
            notify,
            fill_on: false,
            window_end: None,
            replay,
            fs,
            sc: Scratch::new(fa),
            helpers,
            read_epoch: 0,
            batch_left: 0,
            stopped: false,
            p,
        })
    }

    fn elapsed_us(&self) -> u64 {
        u64::try_from(self.t0.elapsed().as_micros()).unwrap_or(u64::MAX)
    }

    fn has_fill_work(&self) -> bool {
        self.tasks
            .iter()
            .flatten()
            .any(|e| e.task.remaining.load(Relaxed) > 0)
    }

    /// Starts the profile prefetch and the fill when their time has come.
    fn update_policy(&mut self) {
        if !self.finished {
            return;
        }
        let now = Instant::now();
        if self.window_end.is_none() {
            let end = now + self.p.opts.profile_window;
            self.window_end = Some(end);
            self.fs.set_window_end(end);
            if let Some(p) = &self.replay {
                self.pool.push_profile(&p.runs);
            }
        }
        if self.fs.is_recording() && self.window_end.is_some_and(|w| now >= w) {
            self.save_profile();
        }
        if !self.fill_on {
            let on = match self.p.opts.fill {
                FillPolicy::None => false,
                FillPolicy::Full => true,
                FillPolicy::Profile => !self.fs.is_recording(),
            };
            if on {
                self.fill_on = true;
                self.pool.enable_fill();
            }
        }
    }

    fn save_profile(&mut self) {
        let Some(r) = self.fs.take_recording() else {
            return;
        };
        let pages = r.rec.pages();
        if pages == 0 {
            tracing::info!(key = %r.key, "no demand faults in the profile window: no profile saved");
            return;
        }
        let prof = r.rec.into_profile(r.key);
        match prof.save(&self.p.opts.profile_dir) {
            Ok(path) => {
                self.c
                    .profile_state
                    .store(ProfileState::Recorded.as_u8(), Relaxed);
                tracing::info!(path = %path.display(), pages, runs = prof.runs.len(), "working-set profile saved");
            }
            Err(e) => {
                self.c
                    .profile_state
                    .store(ProfileState::SaveFailed.as_u8(), Relaxed);
                tracing::warn!(error = %e, "cannot save the working-set profile");
            }
        }
    }

    fn run(&mut self) -> Result<(), FetchError> {
        let mut evs = [EpollEvent::empty(); 32];
        loop {
            let timeout = if !self.deferred.is_empty() || !self.deferred_wp.is_empty() {
                EpollTimeout::from(1u16)
            } else {
                let now = Instant::now();
                let mut wait = if self.finished {
                    Some(PROBE_INTERVAL)
                } else {
                    None
                };
                if let Some((at, _, _)) = self.deadline {
                    let left = at.saturating_duration_since(now);
                    wait = Some(wait.map_or(left, |w| w.min(left)));
                }
                if let (true, Some(at)) = (self.fs.is_recording(), self.window_end) {
                    let left = at.saturating_duration_since(now);
                    wait = Some(wait.map_or(left, |w| w.min(left)));
                }
                match wait {
                    // Round up so a deadline is never missed by a sub-millisecond early wake.
                    Some(w) => {
                        EpollTimeout::from(u16::try_from(w.as_millis() + 1).unwrap_or(u16::MAX))
                    }
                    None => EpollTimeout::NONE,
                }
            };
            let n = match self.epoll.wait(&mut evs, timeout) {
                Ok(n) => n,
                Err(nix::Error::EINTR) => 0,
                Err(e) => return Err(sys("epoll_wait")(e)),
            };
            for ev in &evs[..n] {
                match ev.data() {
                    TOKEN_STOP => {
                        self.stopped = true;
                        return if self.finished {
                            Ok(())
                        } else {
                            Err(FetchError::Stopped)
                        };
                    }
                    TOKEN_LISTEN => self.accept()?,
                    TOKEN_CONN => self.conn_readable()?,
                    TOKEN_FILL => {
                        self.notify.drain();
                        if let Some(e) = self.pool.take_error() {
                            return Err(e);
                        }
                        if let Some(e) = self.helpers.as_ref().and_then(Helpers::take_error) {
                            return Err(e);
                        }
                        for slot in 0..self.tasks.len() {
                            if self.tasks[slot]
                                .as_ref()
                                .is_some_and(|e| e.task.gone.load(Relaxed))
                            {
                                self.task_gone(slot);
                            }
                        }
                    }
                    t => {
                        let slot = usize::try_from(t - TOKEN_TASK).unwrap_or(usize::MAX);
                        self.drain(slot)?;
                    }
                }
            }
            self.retry_deferred()?;
            self.update_policy();
            if self.received == self.p.expected && self.finished {
                if self.tasks.iter().all(Option::is_none) {
                    return Ok(());
                }
                // Under a budget pages go back and forth for the container's whole life.
                if self.fill_on
                    && self.p.opts.memory_budget == 0
                    && self.deferred.is_empty()
                    && !self.has_fill_work()
                    && self.pool.idle()
                {
                    FetchCounters::mark_once(&self.c.fill_complete_us, self.elapsed_us());
                    return Ok(());
                }
                if self.last_probe.elapsed() >= PROBE_INTERVAL {
                    self.probe_exits();
                }
            }
            if let Some((at, what, after)) = self.deadline {
                if Instant::now() >= at {
                    return Err(FetchError::Timeout { what, after });
                }
            }
        }
    }

    fn accept(&mut self) -> Result<(), FetchError> {
        let Some(l) = self.listener.as_ref() else {
            return Ok(());
        };
        match l.accept() {
            Ok((s, _)) => {
                let err = |source| FetchError::Sys {
                    what: "set up the lazy-pages connection",
                    source,
                };
                s.set_nonblocking(true).map_err(err)?;
                self.epoll
                    .add(
                        &s,
                        EpollEvent::new(EpollFlags::EPOLLIN | EpollFlags::EPOLLRDHUP, TOKEN_CONN),
                    )
                    .map_err(sys("epoll_ctl"))?;
                self.conn = Some(s);
                if let Some(l) = self.listener.take() {
                    let _ = self.epoll.delete(&l);
                }
                // The listener is closed now: criu connects once.
                let _ = nix::unistd::unlinkat(
                    Some(self.p.dirfd.as_raw_fd()),
                    LAZY_PAGES_SOCKET,
                    nix::unistd::UnlinkatFlags::NoRemoveDir,
                );
                self.next_message();
                Ok(())
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(()),
            Err(source) => Err(FetchError::Socket {
                what: "accept on",
                path: self.p.socket_path.clone(),
                source,
            }),
        }
    }

    /// Sets the state and deadline for the next message after a task was announced.
    fn next_message(&mut self) {
        let now = Instant::now();
        if self.received >= self.p.expected {
            self.state = Conn::Marker {
                buf: [0; 4],
                got: 0,
            };
            let t = self.p.opts.restore_timeout;
            self.deadline = Some((now + t, "the restore-finished marker", t));
        } else {
            self.state = Conn::Pid {
                buf: [0; 4],
                got: 0,
            };
            let t = self.p.opts.handshake_timeout;
            self.deadline = Some((now + t, "a pid or userfaultfd from restore", t));
        }
    }

    fn conn_readable(&mut self) -> Result<(), FetchError> {
        loop {
            let Some(conn) = self.conn.as_mut() else {
                return Ok(());
            };
            match &mut self.state {
                Conn::Pid { buf, got } | Conn::Marker { buf, got } => {
                    match conn.read(&mut buf[*got..]) {
                        Ok(0) => {
                            let what = if matches!(self.state, Conn::Pid { .. }) {
                                "a pid"
                            } else {
                                "the restore-finished marker"
                            };
                            return Err(FetchError::Closed { what });
                        }
                        Ok(n) => *got += n,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                        Err(source) => {
                            return Err(FetchError::Sys {
                                what: "read lazy-pages.socket",
                                source,
                            })
                        }
                    }
                    if *got < 4 {
                        continue;
                    }
                    let v = *buf;
                    if matches!(self.state, Conn::Pid { .. }) {
                        let pid = i32::from_le_bytes(v);
                        if pid < 0 {
                            self.c.zombies.fetch_add(1, Relaxed);
                            self.received += 1;
                            self.next_message();
                        } else {
                            self.state = Conn::Fd { pid };
                        }
                    } else {
                        let value = u32::from_le_bytes(v);
                        if value != RESTORE_FINISHED {
                            return Err(FetchError::BadMarker { value });
                        }
                        self.finished = true;
                        FetchCounters::mark_once(&self.c.restore_finished_us, self.elapsed_us());
                        self.track_all();
                        self.deadline = None;
                        self.state = Conn::Done;
                        if let Some(c) = self.conn.take() {
                            let _ = self.epoll.delete(&c);
                        }
                        return Ok(());
                    }
                }
                Conn::Fd { pid } => {
                    let pid = *pid;
                    let mut byte = [0u8; 1];
                    let mut iov = [IoSliceMut::new(&mut byte)];
                    let mut cmsg = nix::cmsg_space!(std::os::fd::RawFd);
                    let r = recvmsg::<()>(
                        conn.as_raw_fd(),
                        &mut iov,
                        Some(&mut cmsg),
                        MsgFlags::MSG_CMSG_CLOEXEC | MsgFlags::MSG_DONTWAIT,
                    );
                    let msg = match r {
                        Ok(m) => m,
                        Err(nix::Error::EAGAIN) => return Ok(()),
                        Err(nix::Error::EINTR) => continue,
                        Err(e) => return Err(sys("recvmsg on lazy-pages.socket")(e)),
                    };
                    let mut fds = Vec::new();
                    if let Ok(cmsgs) = msg.cmsgs() {
                        for c in cmsgs {
                            if let ControlMessageOwned::ScmRights(v) = c {
                                fds.extend(v);
                            }
                        }
                    }
                    let bytes = msg.bytes;
                    // SAFETY: SCM_RIGHTS installed these descriptors in our table for us alone.
                    let mut owned: Vec<OwnedFd> = fds
                        .into_iter()
                        .map(|f| unsafe { OwnedFd::from_raw_fd(f) })
                        .collect();
                    if bytes == 0 && owned.is_empty() {
                        return Err(FetchError::Closed {
                            what: "a userfaultfd",
                        });
                    }
                    if owned.is_empty() {
                        return Err(FetchError::NoUffd { pid });
                    }
                    let fd = owned.swap_remove(0);
                    self.add_task(pid, fd)?;
                    self.received += 1;
                    self.next_message();
                }
                Conn::Done => return Ok(()),
            }
        }
    }

    fn add_task(&mut self, pid: i32, fd: OwnedFd) -> Result<(), FetchError> {
        let vpid = u32::try_from(pid).map_err(|_| FetchError::UnknownPid { pid })?;
        let Some(ranges) = self.p.plans.get(&vpid) else {
            return Err(FetchError::UnknownPid { pid });
        };
        let (space, nbits) = Space::new(ranges);
        set_nonblocking(&fd)?;
        if let Some(k) = &self.p.keeper {
            k.hold(vpid, fd.as_fd(), ranges)?;
        }
        // SAFETY: `fd` is an owned userfaultfd; `Uffd` takes the ownership and closes it on drop.
        let uffd = unsafe { Uffd::from_raw_fd(fd.into_raw_fd()) };
        // Registered for write-protect once restore finished (`track_all`); what is installed
        // before that lands unprotected and counts as written.
        let tracked = self.p.opts.track_writes;
        let task = Task::new(vpid, uffd, space, Bits::new(nbits), false, tracked);
        self.c.lazy_pages.fetch_add(nbits as u64, Relaxed);
        self.insert(task)
    }

    /// Once restore finished (the tasks' layout is final; while CRIU's restorer still runs the
    /// kernel refuses the registration of ranges it is still moving), re-registers the lazy
    /// VMAs of every restored task with `MISSING|WP`.
    fn track_all(&self) {
        if !self.p.opts.track_writes {
            return;
        }
        for e in self.tasks.iter().flatten().filter(|e| !e.task.forked) {
            self.track_writes(e.task.pid, &e.task.uffd);
        }
    }

    /// Re-registers the task's lazy VMAs with `MISSING|WP` (`task.rs`, write tracking). A VMA
    /// the kernel refuses stays as CRIU registered it: a protected copy there fails with
    /// `EINVAL`, and the pages installed unprotected instead count as written (`copy_run`).
    /// False, with a warning, when no VMA could be re-registered.
    fn track_writes(&self, vpid: u32, uffd: &Uffd) -> bool {
        let vmas = self.p.vmas.get(&vpid).map_or(&[][..], Vec::as_slice);
        let mut tracked = 0usize;
        for &(start, end) in vmas {
            let r = uffd.register_with_mode(
                start as *mut c_void,
                usize::try_from(end - start).unwrap_or(0),
                RegisterMode::MISSING | RegisterMode::WRITE_PROTECT,
            );
            let why = match r {
                Ok(ioctls) if ioctls.contains(userfaultfd::IoctlFlags::WRITE_PROTECT) => {
                    tracked += 1;
                    continue;
                }
                Ok(ioctls) => format!("UFFDIO_WRITEPROTECT not offered (ioctls {ioctls:?})"),
                Err(e) => format!("UFFDIO_REGISTER MISSING|WP: {e:?}"),
            };
            tracing::debug!(
                pid = vpid,
                start = format_args!("{start:#x}"),
                end = format_args!("{end:#x}"),
                "writes in this range are not tracked ({why}): its installed pages count as \
                 written"
            );
        }
        if tracked == 0 && !vmas.is_empty() {
            tracing::warn!(
                pid = vpid,
                "writes of this task are not tracked (no lazy VMA accepts uffd write-protect); \
                 a checkpoint of it keeps every page it installed"
            );
        }
        tracked > 0
    }

    fn insert(&mut self, t: Task) -> Result<(), FetchError> {
        let slot = self.tasks.len();
        self.epoll
            .add(
                &t.uffd,
                EpollEvent::new(EpollFlags::EPOLLIN, TOKEN_TASK + slot as u64),
            )
            .map_err(sys("epoll_ctl"))?;
        let task = Arc::new(t);
        self.pool.add_task(task.clone());
        self.reg.add(&task);
        self.tasks.push(Some(Entry { task }));
        self.c.tasks.fetch_add(1, Relaxed);
        Ok(())
    }

    fn task_gone(&mut self, slot: usize) {
        if let Some(e) = self.tasks.get_mut(slot).and_then(Option::take) {
            let _ = self.epoll.delete(&e.task.uffd);
            e.task.gone.store(true, Relaxed);
            // Its memory went with it.
            let n = e.task.bits.len();
            e.task.unmark_installed(0, n, &self.c);
            self.pool.remove_task(&e.task);
            self.reg.remove(&e.task);
            self.c.tasks_exited.fetch_add(1, Relaxed);
        }
        self.deferred.retain(|d| d.0 != slot);
        self.deferred_wp.retain(|d| d.0 != slot);
    }

    /// Reads and handles every pending message of one uffd.
    fn drain(&mut self, slot: usize) -> Result<(), FetchError> {
        loop {
            let mut batch = std::mem::take(&mut self.batch);
            let gone = match self.tasks.get(slot).and_then(Option::as_ref) {
                None => {
                    self.batch = batch;
                    return Ok(());
                }
                Some(e) => {
                    self.read_epoch = e.task.epoch.fetch_add(1, SeqCst) + 1;
                    let r = e.task.uffd.read_events(&mut self.evbuf);
                    match r {
                        Ok(it) => {
                            // Unknown event types are skipped.
                            batch.extend(it.flatten());
                            false
                        }
                        Err(userfaultfd::Error::ReadEof) => true,
                        Err(userfaultfd::Error::SystemError(e)) if e as i32 == libc::EBADF => true,
                        Err(e) => {
                            self.batch = batch;
                            return Err(FetchError::Sys {
                                what: "read a userfaultfd",
                                source: io::Error::other(e),
                            });
                        }
                    }
                }
            };
            if gone {
                self.batch = batch;
                self.task_gone(slot);
                return Ok(());
            }
            if batch.is_empty() {
                self.batch = batch;
                self.mark_handled(slot);
                return Ok(());
            }
            // The kernel hands out pending faults before events in one read, but a fault may
            // have been raised after the event it follows (e.g. on the new address of an
            // mremap, or in the parent after a fork). So apply the address-space events of the
            // batch first, then serve its faults.
            let mut faults = std::mem::take(&mut self.faults);
            let mut wp = std::mem::take(&mut self.wp_faults);
            let mut r = Ok(());
            for ev in batch.drain(..) {
                match ev {
                    Event::Pagefault {
                        kind: FaultKind::WriteProtected,
                        addr,
                        ..
                    } => wp.push(addr as u64),
                    Event::Pagefault { addr, .. } => faults.push((addr as u64, Instant::now())),
                    other => {
                        if r.is_ok() {
                            r = self.handle_event(slot, other);
                        }
                    }
                }
            }
            self.batch = batch;
            for addr in wp.drain(..) {
                if r.is_ok() {
                    r = self.write_fault(slot, addr);
                }
            }
            self.wp_faults = wp;
            let n = faults.len();
            for (i, (addr, t0)) in faults.drain(..).enumerate() {
                if r.is_ok() {
                    self.batch_left = n - i - 1;
                    r = self.fault(slot, addr, t0);
                }
            }
            self.batch_left = 0;
            self.faults = faults;
            r?;
            self.mark_handled(slot);
        }
    }

    /// Everything read from the task's uffd so far has been handled (the evictor waits for
    /// this, `budget.rs`).
    fn mark_handled(&self, slot: usize) {
        if let Some(e) = self.tasks.get(slot).and_then(Option::as_ref) {
            e.task.handled.store(self.read_epoch, SeqCst);
        }
    }

    fn fault(&mut self, slot: usize, addr: u64, t0: Instant) -> Result<(), FetchError> {
        if self.c.faults.fetch_add(1, Relaxed) == 0 {
            FetchCounters::mark_once(&self.c.first_fault_us, self.elapsed_us());
        }
        self.serve(slot, addr, t0)
    }

    /// A tracked task's first write to a page since it arrived (see `task.rs`); served on
    /// this thread, never behind a source read.
    fn write_fault(&mut self, slot: usize, addr: u64) -> Result<(), FetchError> {
        let Some(e) = self.tasks.get(slot).and_then(Option::as_ref) else {
            return Ok(());
        };
        let page = addr & !(PAGE as u64 - 1);
        match unprotect(&e.task, page)? {
            Unprotect::Done => {
                self.c.pages_written.fetch_add(1, Relaxed);
            }
            Unprotect::Again => self.deferred_wp.push((slot, page)),
            Unprotect::Gone => self.task_gone(slot),
        }
        Ok(())
    }

    fn handle_event(&mut self, slot: usize, ev: Event) -> Result<(), FetchError> {
        match ev {
            Event::Pagefault {
                kind: FaultKind::WriteProtected,
                addr,
                ..
            } => self.write_fault(slot, addr as u64)?,
            Event::Pagefault { addr, .. } => self.fault(slot, addr as u64, Instant::now())?,
            Event::Fork { uffd } => {
                // SAFETY: borrowing the fd only to set a flag; `uffd` keeps owning it.
                let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(uffd.as_raw_fd()) };
                set_nonblocking(&fd)?;
                let Some(parent) = self.tasks.get(slot).and_then(Option::as_ref) else {
                    return Ok(());
                };
                // The child's memory is the parent's as of the fork: what was installed there
                // is present in the child too.
                let p = &parent.task;
                if let Some(k) = &self.p.keeper {
                    let ranges = self.p.plans.get(&p.pid).map_or(&[][..], Vec::as_slice);
                    k.hold(p.pid, fd, ranges)?;
                }
                // Layout first (its read guard ends with the statement), then the bitmap under
                // the install log's lock: never both locks at once here.
                let space = p.space().clone();
                let bits = p.fork_bits(self.read_epoch);
                // The child inherits the registration (and the protection of every page).
                let child = Task::new(p.pid, uffd, space, bits, true, p.tracked);
                self.c
                    .lazy_pages
                    .fetch_add(child.remaining.load(Relaxed), Relaxed);
                self.insert(child)?;
            }
            Event::Remap { from, to, len } => {
                if let Some(e) = self.tasks.get(slot).and_then(Option::as_ref) {
                    e.task.space_mut().remap(from as u64, to as u64, len as u64);
                }
                self.reg.bump();
            }
            Event::Remove { start, end } => self.range_gone(slot, start as u64, end as u64, true),
            Event::Unmap { start, end } => self.range_gone(slot, start as u64, end as u64, false),
        }
        Ok(())
    }

    /// UNMAP and REMOVE: the range is no longer served from the images; later faults in it
    /// get UFFDIO_ZEROPAGE, which is what the kernel would do. Unlike criu/uffd.c we do not
    /// UFFDIO_UNREGISTER on REMOVE: that splits the VMA, and a later mremap() of the whole
    /// region then fails with EFAULT (seen in tests/lazy_restore.rs). A REMOVE that continues
    /// a range the evictor announced is its own `madvise`: the range stays served
    /// (`budget.rs`).
    fn range_gone(&mut self, slot: usize, start: u64, end: u64, remove: bool) {
        if let Some(e) = self.tasks.get(slot).and_then(Option::as_ref) {
            let t = &e.task;
            if remove && t.evicting_lock().take(start, end) {
                return;
            }
            let dropped = t.space_mut().drop_range(start, end, &t.bits);
            t.remaining.fetch_sub(dropped.unclaimed, Relaxed);
            for (b0, n) in dropped.runs {
                t.unmark_installed(b0, n, &self.c);
            }
        }
        self.reg.bump();
    }

    /// Serves one fault (or hands it to a helper); on EAGAIN it is queued and retried after
    /// the events are drained.
    fn serve(&mut self, slot: usize, addr: u64, t0: Instant) -> Result<(), FetchError> {
        let Some(e) = self.tasks.get(slot).and_then(Option::as_ref) else {
            return Ok(());
        };
        let task = e.task.clone();
        if let Some(h) = &self.helpers {
            h.push(task, addr, t0);
            return Ok(());
        }
        // Faults of other threads read in the same batch wait for this one. (Not the uffd's
        // readiness: a scanning thread, woken at once, faults again before its prefetch.)
        let left = self.batch_left;
        let waiting = || left > 0;
        match fault::serve(&self.fs, &task, addr, t0, &mut self.sc, &waiting)? {
            Served::Done => {}
            Served::Again => self.deferred.push((slot, addr, t0)),
            Served::Gone => self.task_gone(slot),
        }
        Ok(())
    }

    fn retry_deferred(&mut self) -> Result<(), FetchError> {
        if !self.deferred_wp.is_empty() {
            let spare = std::mem::take(&mut self.deferred_wp_spare);
            let mut list = std::mem::replace(&mut self.deferred_wp, spare);
            let mut r = Ok(());
            for (slot, page) in list.drain(..) {
                if r.is_ok() {
                    r = self.write_fault(slot, page);
                }
            }
            self.deferred_wp_spare = list;
            r?;
        }
        if self.deferred.is_empty() {
            return Ok(());
        }
        let spare = std::mem::take(&mut self.deferred_spare);
        let mut list = std::mem::replace(&mut self.deferred, spare);
        let mut r = Ok(());
        for (slot, addr, t0) in list.drain(..) {
            if r.is_ok() {
                r = self.serve(slot, addr, t0);
            }
        }
        self.deferred_spare = list;
        r
    }

    /// No eviction batch starts any more; one that runs needs this thread to read the
    /// `REMOVE` events of its calls, so they are read and handled until it is over.
    fn quiesce_eviction(&mut self) {
        self.reg.close_eviction();
        let until = Instant::now() + Duration::from_secs(10);
        while self.reg.batch_running() && Instant::now() < until {
            for slot in 0..self.tasks.len() {
                if let Err(e) = self.drain(slot) {
                    tracing::debug!(error = %e, "reading events while an eviction ends");
                }
            }
            std::thread::sleep(Duration::from_micros(100));
        }
    }

    /// Idle tasks do not report their exit: probe each uffd's mm with a harmless ioctl.
    fn probe_exits(&mut self) {
        self.last_probe = Instant::now();
        for slot in 0..self.tasks.len() {
            let Some(e) = self.tasks[slot].as_ref() else {
                continue;
            };
            let r = e
                .task
                .uffd
                .remove_write_protection(PROBE_ADDR as *mut c_void, PAGE, false);
            if let Err(userfaultfd::Error::SystemError(err)) = r {
                if err as i32 == libc::ESRCH {
                    self.task_gone(slot);
                }
            }
        }
    }

    /// Stops the workers, saves a recorded profile, logs the summary line; on an abnormal end,
    /// poisons what was never installed.
    fn finish(&mut self, r: &Result<(), FetchError>) {
        let abnormal = r.is_err() || self.stopped;
        self.quiesce_eviction();
        if let Some(h) = self.helpers.as_mut() {
            h.shutdown();
        }
        self.pool.shutdown(abnormal);
        if !abnormal {
            self.save_profile();
        }
        if !abnormal {
            // Nobody serves write-protect faults after this (the keeper may still hold the
            // uffds for a while): lift the protection of every lazy page, waking any writer.
            for e in self.tasks.iter().flatten().filter(|e| e.task.tracked) {
                let iovs: Vec<(u64, u64)> = e
                    .task
                    .space()
                    .iovs
                    .iter()
                    .map(|v| (v.start, v.pages()))
                    .collect();
                for (start, pages) in iovs {
                    let len = usize::try_from(pages).unwrap_or(0) * PAGE;
                    let _ = e
                        .task
                        .uffd
                        .remove_write_protection(start as *mut c_void, len, true);
                }
            }
        }
        let mut poisoned = 0u64;
        if abnormal {
            for e in self.tasks.iter().flatten() {
                let runs = e.task.space().unclaimed_runs(&e.task.bits);
                for (addr, pages) in runs {
                    poisoned += poison(&e.task.uffd, addr, pages);
                }
            }
            self.c.pages_poisoned.fetch_add(poisoned, Relaxed);
        }
        let s = self.c.snapshot();
        tracing::info!(
            ok = r.is_ok(),
            stopped = self.stopped,
            tasks = s.tasks,
            zombies = s.zombies,
            lazy_pages = s.lazy_pages,
            faults = s.faults,
            pages_faulted = s.pages_faulted,
            pages_prefetched = s.pages_prefetched,
            pages_filled = s.pages_filled,
            zero_pages = s.zero_pages,
            already_present = s.pages_already_present,
            poisoned,
            bytes = s.bytes,
            first_fault_us = ?s.time_to_first_fault_us,
            fill_complete_us = ?s.fill_complete_us,
            p50_us = s.fault_latency_us.p50,
            p99_us = s.fault_latency_us.p99,
            max_us = s.fault_latency_us.max,
            profile = ?s.profile_state,
            profile_hit_rate = ?s.profile_hit_rate,
            "lazy-pages fetcher finished"
        );
    }
}

fn set_nonblocking(fd: &impl AsFd) -> Result<(), FetchError> {
    nix::fcntl::fcntl(
        fd.as_fd().as_raw_fd(),
        nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
    )
    .map(|_| ())
    .map_err(sys("fcntl(O_NONBLOCK) on a userfaultfd"))
}
