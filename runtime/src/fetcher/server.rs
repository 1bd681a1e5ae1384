//! The fetcher thread: the socket handshake as a non-blocking state machine, the epoll loop,
//! the fault path (with fault-around) and the background fill.

use std::collections::HashMap;
use std::io::{self, IoSliceMut, Read};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, IntoRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use distriproc_config::FillPolicy;
use libc::c_void;
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
use userfaultfd::{Event, EventBuffer, Uffd};

use super::space::{lazy_ranges, Space};
use super::{FetchError, FetcherOptions, LAZY_PAGES_SOCKET, RESTORE_FINISHED};
use crate::images::{ImageDir, PAGE_SIZE};
use crate::source::{PageKind, PageSource, SourceError};
use crate::stats::FetchCounters;

const TOKEN_STOP: u64 = 0;
const TOKEN_LISTEN: u64 = 1;
const TOKEN_CONN: u64 = 2;
const TOKEN_TASK: u64 = 16;
/// uffd messages read per `read(2)`.
const EVENT_BATCH: usize = 64;
/// How often idle tasks are probed for exit.
const PROBE_INTERVAL: Duration = Duration::from_secs(1);
/// An address no task maps, used for the exit probe (at `mmap_min_addr`).
const PROBE_ADDR: u64 = 0x10000;
const PAGE: usize = 4096;

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
}

/// Everything `bind` prepares: the listening socket and the lazy ranges of every task.
pub(crate) struct Prepared {
    pub socket_path: PathBuf,
    dirfd: OwnedFd,
    listener: Option<UnixListener>,
    plans: HashMap<u32, Vec<(u64, u64)>>,
    expected: usize,
    source: Arc<dyn PageSource>,
    opts: FetcherOptions,
}

impl Prepared {
    pub fn new(
        work_dir: &Path,
        images: &Path,
        source: Arc<dyn PageSource>,
        opts: FetcherOptions,
    ) -> Result<Prepared, FetchError> {
        let img = ImageDir::open(images)?;
        let tree = img.pstree()?;
        let mut plans = HashMap::new();
        for e in &tree {
            if !images.join(format!("mm-{}.img", e.pid)).exists() {
                continue; // a zombie: no memory
            }
            let vmas = img.vmas(e.pid)?;
            let (_, entries) = img.pagemap_entries(e.pid)?;
            plans.insert(e.pid, lazy_ranges(&entries, &vmas));
        }
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
            expected: tree.len(),
            source,
            opts,
        })
    }

    pub fn spawn(
        self,
        counters: Arc<FetchCounters>,
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
                let r = Loop::new(self, stop2, counters, t0).and_then(|mut lp| {
                    let r = lp.run();
                    lp.finish(&r);
                    r
                });
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

enum Conn {
    Pid { buf: [u8; 4], got: usize },
    Fd { pid: i32 },
    Marker { buf: [u8; 4], got: usize },
    Done,
}

/// The outcome of installing a run of pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Install {
    Done,
    /// The mm is changing (events pending): retry after draining events.
    Again,
    /// The task is gone.
    Gone,
    /// The range is no longer mapped or registered; nothing to install.
    Vanished,
}

struct Tracked {
    pid: u32,
    uffd: Uffd,
    space: Space,
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
    tasks: Vec<Option<Tracked>>,
    c: Arc<FetchCounters>,
    t0: Instant,
    deadline: Option<(Instant, &'static str, Duration)>,
    evbuf: EventBuffer,
    batch: Vec<Event>,
    faults: Vec<(u64, Instant)>,
    deferred: Vec<(usize, u64, Instant)>,
    deferred_spare: Vec<(usize, u64, Instant)>,
    fault_buf: Vec<u8>,
    fill_buf: Vec<u8>,
    fill_next: usize,
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
        let fa = p.opts.fault_around_pages.max(1);
        let fb = p.opts.fill_batch_pages.max(1);
        let accept = p.opts.accept_timeout;
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
            c,
            t0,
            deadline: Some((t0 + accept, "criu to connect to lazy-pages.socket", accept)),
            evbuf: EventBuffer::new(EVENT_BATCH),
            batch: Vec::with_capacity(EVENT_BATCH),
            faults: Vec::with_capacity(EVENT_BATCH),
            deferred: Vec::with_capacity(EVENT_BATCH),
            deferred_spare: Vec::with_capacity(EVENT_BATCH),
            fault_buf: vec![0; fa * PAGE],
            fill_buf: vec![0; fb * PAGE],
            fill_next: 0,
            last_probe: Instant::now(),
            stopped: false,
            p,
        })
    }

    fn elapsed_us(&self) -> u64 {
        u64::try_from(self.t0.elapsed().as_micros()).unwrap_or(u64::MAX)
    }

    fn fill_enabled(&self) -> bool {
        self.finished && self.p.opts.fill != FillPolicy::None
    }

    fn has_fill_work(&self) -> bool {
        self.tasks.iter().flatten().any(|t| t.space.remaining > 0)
    }

    fn run(&mut self) -> Result<(), FetchError> {
        let mut evs = [EpollEvent::empty(); 32];
        loop {
            let fill_ready = self.fill_enabled() && self.has_fill_work();
            let timeout = if fill_ready {
                EpollTimeout::ZERO
            } else if !self.deferred.is_empty() {
                EpollTimeout::from(1u16)
            } else {
                let mut wait = if self.finished {
                    Some(PROBE_INTERVAL)
                } else {
                    None
                };
                if let Some((at, _, _)) = self.deadline {
                    let left = at.saturating_duration_since(Instant::now());
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
                    t => {
                        let slot = usize::try_from(t - TOKEN_TASK).unwrap_or(usize::MAX);
                        self.drain(slot)?;
                    }
                }
            }
            self.retry_deferred()?;
            if n == 0 && fill_ready {
                self.fill_step()?;
            }
            if self.received == self.p.expected && self.finished {
                if self.tasks.iter().all(Option::is_none) {
                    return Ok(());
                }
                if self.fill_enabled() && !self.has_fill_work() && self.deferred.is_empty() {
                    FetchCounters::mark_once(&self.c.fill_complete_us, self.elapsed_us());
                    return Ok(());
                }
                if !fill_ready && self.last_probe.elapsed() >= PROBE_INTERVAL {
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
        let space = Space::new(ranges);
        self.c.lazy_pages.fetch_add(space.remaining, Relaxed);
        set_nonblocking(&fd)?;
        // SAFETY: `fd` is an owned userfaultfd; `Uffd` takes the ownership and closes it on drop.
        let uffd = unsafe { Uffd::from_raw_fd(fd.into_raw_fd()) };
        self.insert(Tracked {
            pid: vpid,
            uffd,
            space,
        })
    }

    fn insert(&mut self, t: Tracked) -> Result<(), FetchError> {
        let slot = self.tasks.len();
        self.epoll
            .add(
                &t.uffd,
                EpollEvent::new(EpollFlags::EPOLLIN, TOKEN_TASK + slot as u64),
            )
            .map_err(sys("epoll_ctl"))?;
        self.tasks.push(Some(t));
        self.c.tasks.fetch_add(1, Relaxed);
        Ok(())
    }

    fn task_gone(&mut self, slot: usize) {
        if let Some(t) = self.tasks.get_mut(slot).and_then(Option::take) {
            let _ = self.epoll.delete(&t.uffd);
            self.c.tasks_exited.fetch_add(1, Relaxed);
        }
        self.deferred.retain(|d| d.0 != slot);
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
                Some(t) => match t.uffd.read_events(&mut self.evbuf) {
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
                },
            };
            if gone {
                self.batch = batch;
                self.task_gone(slot);
                return Ok(());
            }
            if batch.is_empty() {
                self.batch = batch;
                return Ok(());
            }
            // The kernel hands out pending faults before events in one read, but a fault may
            // have been raised after the event it follows (e.g. on the new address of an
            // mremap, or in the parent after a fork). So apply the address-space events of the
            // batch first, then serve its faults.
            let mut faults = std::mem::take(&mut self.faults);
            let mut r = Ok(());
            for ev in batch.drain(..) {
                match ev {
                    Event::Pagefault { addr, .. } => faults.push((addr as u64, Instant::now())),
                    other => {
                        if r.is_ok() {
                            r = self.handle_event(slot, other);
                        }
                    }
                }
            }
            self.batch = batch;
            for (addr, t0) in faults.drain(..) {
                if r.is_ok() {
                    r = self.fault(slot, addr, t0);
                }
            }
            self.faults = faults;
            r?;
        }
    }

    fn fault(&mut self, slot: usize, addr: u64, t0: Instant) -> Result<(), FetchError> {
        if self.c.faults.fetch_add(1, Relaxed) == 0 {
            FetchCounters::mark_once(&self.c.first_fault_us, self.elapsed_us());
        }
        self.serve(slot, addr, t0)
    }

    fn handle_event(&mut self, slot: usize, ev: Event) -> Result<(), FetchError> {
        match ev {
            Event::Pagefault { addr, .. } => self.fault(slot, addr as u64, Instant::now())?,
            Event::Fork { uffd } => {
                // SAFETY: borrowing the fd only to set a flag; `uffd` keeps owning it.
                let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(uffd.as_raw_fd()) };
                set_nonblocking(&fd)?;
                let Some(parent) = self.tasks.get(slot).and_then(Option::as_ref) else {
                    return Ok(());
                };
                let child = Tracked {
                    pid: parent.pid,
                    uffd,
                    space: parent.space.clone(),
                };
                self.c.lazy_pages.fetch_add(child.space.remaining, Relaxed);
                self.insert(child)?;
            }
            Event::Remap { from, to, len } => {
                if let Some(t) = self.tasks.get_mut(slot).and_then(Option::as_mut) {
                    t.space.remap(from as u64, to as u64, len as u64);
                }
            }
            Event::Remove { start, end } => {
                // MADV_DONTNEED/REMOVE: the range is no longer served from the images; later
                // faults in it get UFFDIO_ZEROPAGE, which is what the kernel would do. Unlike
                // criu/uffd.c we do not UFFDIO_UNREGISTER the range: that splits the VMA, and a
                // later mremap() of the whole region then fails with EFAULT (seen in
                // tests/lazy_restore.rs).
                if let Some(t) = self.tasks.get_mut(slot).and_then(Option::as_mut) {
                    t.space.drop_range(start as u64, end as u64);
                }
            }
            Event::Unmap { start, end } => {
                if let Some(t) = self.tasks.get_mut(slot).and_then(Option::as_mut) {
                    t.space.drop_range(start as u64, end as u64);
                }
            }
        }
        Ok(())
    }

    /// Serves one fault; on EAGAIN it is queued and retried after the events are drained.
    fn serve(&mut self, slot: usize, addr: u64, t0: Instant) -> Result<(), FetchError> {
        let page = addr & !(PAGE_SIZE - 1);
        let Some(t) = self.tasks.get_mut(slot).and_then(Option::as_mut) else {
            return Ok(());
        };
        let c = &*self.c;
        let out = match t.space.lookup(page) {
            None => {
                let r = zero_run(&t.uffd, page, 1, c)
                    .map_err(|e| uffd_err("UFFDIO_ZEROPAGE", t.pid, page, e))?;
                match r {
                    Install::Done => {
                        c.zero_pages.fetch_add(1, Relaxed);
                    }
                    Install::Vanished => {
                        let _ = t.uffd.wake(page as *mut c_void, PAGE);
                    }
                    _ => {}
                }
                r
            }
            Some(k) => {
                let w = self.p.opts.fault_around_pages.max(1) as u64 * PAGE_SIZE;
                let lo = page & !(w - 1);
                let (s, e) = t.space.uncopied_run(k, page, lo, lo + w);
                let (r, _) = fetch(t, &*self.p.source, &mut self.fault_buf, c, k, page, 1)?;
                if r == Install::Vanished {
                    // Unmapped under us: let the thread retry its access.
                    let _ = t.uffd.wake(page as *mut c_void, PAGE);
                }
                if r == Install::Done || r == Install::Vanished {
                    c.pages_faulted.fetch_add(1, Relaxed);
                    record_latency(c, t0);
                    let mut extra = 0;
                    if s < page {
                        let (r2, n) = fetch(
                            t,
                            &*self.p.source,
                            &mut self.fault_buf,
                            c,
                            k,
                            s,
                            (page - s) / PAGE_SIZE,
                        )?;
                        extra += n;
                        if r2 == Install::Gone {
                            self.task_gone(slot);
                            return Ok(());
                        }
                    }
                    if page + PAGE_SIZE < e {
                        let from = page + PAGE_SIZE;
                        let (r3, n) = fetch(
                            t,
                            &*self.p.source,
                            &mut self.fault_buf,
                            c,
                            k,
                            from,
                            (e - from) / PAGE_SIZE,
                        )?;
                        extra += n;
                        if r3 == Install::Gone {
                            self.c.pages_prefetched.fetch_add(extra, Relaxed);
                            self.task_gone(slot);
                            return Ok(());
                        }
                    }
                    self.c.pages_prefetched.fetch_add(extra, Relaxed);
                    return Ok(());
                }
                r
            }
        };
        match out {
            Install::Done | Install::Vanished => {
                if out == Install::Done && t0.elapsed() > Duration::ZERO {
                    record_latency(&self.c, t0);
                }
            }
            Install::Again => self.deferred.push((slot, addr, t0)),
            Install::Gone => self.task_gone(slot),
        }
        Ok(())
    }

    fn retry_deferred(&mut self) -> Result<(), FetchError> {
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

    fn fill_step(&mut self) -> Result<(), FetchError> {
        let n = self.tasks.len();
        let batch = self.p.opts.fill_batch_pages as u64;
        for i in 0..n {
            let slot = (self.fill_next + i) % n;
            let Some(t) = self.tasks[slot].as_mut() else {
                continue;
            };
            let Some((k, addr, pages)) = t.space.next_unfilled(batch) else {
                continue;
            };
            self.fill_next = slot;
            let (r, done) = fetch(
                t,
                &*self.p.source,
                &mut self.fill_buf,
                &self.c,
                k,
                addr,
                pages,
            )?;
            self.c.pages_filled.fetch_add(done, Relaxed);
            if r == Install::Gone {
                self.task_gone(slot);
            }
            return Ok(());
        }
        Ok(())
    }

    /// Idle tasks do not report their exit: probe each uffd's mm with a harmless ioctl.
    fn probe_exits(&mut self) {
        self.last_probe = Instant::now();
        for slot in 0..self.tasks.len() {
            let Some(t) = self.tasks[slot].as_ref() else {
                continue;
            };
            let r = t
                .uffd
                .remove_write_protection(PROBE_ADDR as *mut c_void, PAGE, false);
            if let Err(userfaultfd::Error::SystemError(e)) = r {
                if e as i32 == libc::ESRCH {
                    self.task_gone(slot);
                }
            }
        }
    }

    /// Summary line; on an abnormal end, poison what was never installed.
    fn finish(&mut self, r: &Result<(), FetchError>) {
        let abnormal = r.is_err() || self.stopped;
        let mut poisoned = 0u64;
        if abnormal {
            for t in self.tasks.iter().flatten() {
                for (addr, pages) in t.space.uncopied_runs() {
                    if poison(&t.uffd, addr, pages) {
                        poisoned += pages;
                    }
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
            "lazy-pages fetcher finished"
        );
    }
}

fn record_latency(c: &FetchCounters, t0: Instant) {
    c.fault_latency
        .record(u64::try_from(t0.elapsed().as_micros()).unwrap_or(u64::MAX));
}

fn uffd_err(op: &'static str, pid: u32, addr: u64, source: io::Error) -> FetchError {
    FetchError::Uffd {
        op,
        pid,
        addr,
        source,
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

/// Reads `pages` pages at `addr` (inside iov `k`) from the source and installs them.
/// Returns the outcome and how many pages were dealt with.
fn fetch(
    t: &mut Tracked,
    src: &dyn PageSource,
    buf: &mut [u8],
    c: &FetchCounters,
    k: usize,
    addr: u64,
    pages: u64,
) -> Result<(Install, u64), FetchError> {
    let iov = t.space.iovs[k];
    let img = iov.img + (addr - iov.start);
    let cap = (buf.len() / PAGE) as u64;
    let mut done = 0u64;
    while done < pages {
        let want = (pages - done).min(cap);
        let want_bytes = usize::try_from(want).unwrap_or(0) * PAGE;
        let vaddr = img + done * PAGE_SIZE;
        let r = src
            .read_pages(t.pid, vaddr, &mut buf[..want_bytes])
            .map_err(|source| FetchError::Source {
                pid: t.pid,
                vaddr,
                source,
            })?;
        if r.pages == 0 {
            return Err(FetchError::Source {
                pid: t.pid,
                vaddr,
                source: SourceError::NotHere { pid: t.pid, vaddr },
            });
        }
        let got = (r.pages as u64).min(want);
        let dst = addr + done * PAGE_SIZE;
        let res = match r.kind {
            PageKind::Data => copy_run(
                &t.uffd,
                dst,
                &buf[..usize::try_from(got).unwrap_or(0) * PAGE],
                c,
            )
            .map_err(|e| uffd_err("UFFDIO_COPY", t.pid, dst, e))?,
            PageKind::Zero => {
                let r = zero_run(&t.uffd, dst, got, c)
                    .map_err(|e| uffd_err("UFFDIO_ZEROPAGE", t.pid, dst, e))?;
                if r == Install::Done {
                    c.zero_pages.fetch_add(got, Relaxed);
                }
                r
            }
        };
        match res {
            Install::Done | Install::Vanished => {
                t.space.mark(k, dst, got);
                done += got;
            }
            other => return Ok((other, done)),
        }
    }
    Ok((Install::Done, done))
}

fn errno_outcome(e: i32) -> Option<Install> {
    match e {
        libc::EAGAIN => Some(Install::Again),
        libc::ESRCH | libc::ENOSPC => Some(Install::Gone),
        libc::ENOENT => Some(Install::Vanished),
        _ => None,
    }
}

/// UFFDIO_COPY of `src` to `dst`, page by page past EEXIST.
fn copy_run(uffd: &Uffd, dst: u64, src: &[u8], c: &FetchCounters) -> io::Result<Install> {
    let len = src.len();
    let mut off = 0usize;
    while off < len {
        let rest = len - off;
        // SAFETY: `src[off..]` is a live buffer of `rest` bytes we own for the call; `dst` is an
        // address in the target task's registered range, checked by the kernel, and the ioctl
        // writes only into the target mm, never into our memory.
        let r = unsafe {
            uffd.copy(
                src[off..].as_ptr().cast::<c_void>(),
                (dst + off as u64) as *mut c_void,
                rest,
                true,
            )
        };
        match r {
            Ok(n) if n > 0 => {
                c.bytes.fetch_add(n as u64, Relaxed);
                off += n;
            }
            Ok(_) => return Ok(Install::Again),
            Err(userfaultfd::Error::PartiallyCopied(n)) if n > 0 && n < rest => {
                c.bytes.fetch_add(n as u64, Relaxed);
                off += n;
            }
            Err(userfaultfd::Error::PartiallyCopied(_)) => return Ok(Install::Again),
            Err(userfaultfd::Error::CopyFailed(e)) if e as i32 == libc::EEXIST => {
                c.pages_already_present.fetch_add(1, Relaxed);
                let _ = uffd.wake((dst + off as u64) as *mut c_void, PAGE);
                off += PAGE;
            }
            Err(userfaultfd::Error::CopyFailed(e)) => {
                return errno_outcome(e as i32)
                    .ok_or_else(|| io::Error::from_raw_os_error(e as i32))
            }
            Err(e) => return Err(io::Error::other(e)),
        }
    }
    Ok(Install::Done)
}

/// UFFDIO_ZEROPAGE of `pages` pages at `dst`, page by page past EEXIST.
fn zero_run(uffd: &Uffd, dst: u64, pages: u64, c: &FetchCounters) -> io::Result<Install> {
    let len = usize::try_from(pages).unwrap_or(0) * PAGE;
    let mut off = 0usize;
    while off < len {
        // SAFETY: the ioctl only maps zero pages into the target task's registered range; the
        // kernel validates the range. No memory of ours is touched.
        let r = unsafe { uffd.zeropage((dst + off as u64) as *mut c_void, len - off, true) };
        match r {
            Ok(n) if n > 0 => off += n,
            Ok(_) => return Ok(Install::Again),
            Err(userfaultfd::Error::ZeropageFailed(e)) if e as i32 == libc::EEXIST => {
                c.pages_already_present.fetch_add(1, Relaxed);
                let _ = uffd.wake((dst + off as u64) as *mut c_void, PAGE);
                off += PAGE;
            }
            Err(userfaultfd::Error::ZeropageFailed(e)) => {
                return errno_outcome(e as i32)
                    .ok_or_else(|| io::Error::from_raw_os_error(e as i32))
            }
            Err(e) => return Err(io::Error::other(e)),
        }
    }
    Ok(Install::Done)
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
/// once our uffd is closed. Best effort.
fn poison(uffd: &Uffd, addr: u64, pages: u64) -> bool {
    let mut arg = UffdioPoison {
        range: UffdioRange {
            start: addr,
            len: pages * PAGE_SIZE,
        },
        mode: 0,
        updated: 0,
    };
    // SAFETY: `arg` is a live, correctly laid out uffdio_poison for the duration of the call.
    unsafe { uffdio_poison(uffd.as_raw_fd(), &mut arg) }.is_ok()
}
