//! Running `madvise` inside a task with ptrace: seize one thread, stop it, point it at a
//! `syscall` instruction of its own vDSO with the call's registers, single-step over it, put
//! its registers back and let it go. See the module documentation of [`crate::evict`] for the
//! design and its hazards.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::ptrace;
use nix::sys::signal::Signal;
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

use super::seccomp::{self, SeccompData, AUDIT_ARCH_X86_64};
use super::EvictError;

/// How long a thread may take to stop after `PTRACE_INTERRUPT`. One that does not (it sleeps
/// uninterruptibly, in a page fault inside a system call for instance) makes the whole stop
/// fail; it is detached by the exit of the thread that seized it (see
/// [`StoppedProcess::stop`]).
pub const STOP_TIMEOUT: Duration = Duration::from_secs(1);

/// How long a wait for a stop yields the CPU before it sleeps.
const SPIN: Duration = Duration::from_micros(300);

/// `__NR_madvise` on x86_64.
const SYS_MADVISE: i32 = 28;
const _: () = assert!(SYS_MADVISE as i64 == libc::SYS_madvise);

/// `madvise(2)` advice values the injector may run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Advice {
    /// `MADV_DONTNEED`: drop the pages; the next access faults (MISSING under userfaultfd).
    DontNeed,
}

impl Advice {
    fn value(self) -> u64 {
        match self {
            Advice::DontNeed => libc::MADV_DONTNEED as u64,
        }
    }
}

/// What one injection did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Injected {
    /// Ranges the task advised.
    pub ranges: usize,
    /// Bytes they cover.
    pub bytes: u64,
    /// System calls the task ran for them (the vector path's scratch mapping included).
    pub calls: usize,
    /// Signals that arrived for the thread while it was held, delivered again on release.
    pub signals_redelivered: usize,
}

impl Injected {
    /// Adds what another injection did.
    pub fn add(&mut self, o: &Injected) {
        self.ranges += o.ranges;
        self.bytes += o.bytes;
        self.calls += o.calls;
        self.signals_redelivered += o.signals_redelivered;
    }
}

/// The errno of a system call's negative return value.
pub(super) fn errno_of(ret: i64) -> Errno {
    Errno::from_raw(i32::try_from(-ret).unwrap_or(libc::EINVAL))
}

/// The facts of `/proc/<tid>/status` the injector checks first.
struct Status {
    state: String,
    tracer: i32,
    stopped: bool,
    seccomp: u32,
}

fn status(tid: i32) -> Result<Status, EvictError> {
    let path = format!("/proc/{tid}/status");
    let text = std::fs::read_to_string(&path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            EvictError::Gone { tid }
        } else {
            EvictError::Io {
                what: "read",
                path: path.clone(),
                source: e,
            }
        }
    })?;
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .map(str::trim)
            .unwrap_or("")
    };
    Ok(Status {
        state: field("State:").to_owned(),
        tracer: field("TracerPid:").parse().unwrap_or(0),
        // "T (stopped)" is a group stop; "t (tracing stop)" a ptrace stop of another tracer.
        stopped: field("State:").starts_with('T') || field("State:").starts_with('t'),
        seccomp: field("Seccomp:").parse().unwrap_or(0),
    })
}

/// The address of a `syscall` instruction (`0f 05`) in the vDSO of process `pid`.
pub fn vdso_syscall(pid: i32) -> Result<u64, EvictError> {
    let maps_path = format!("/proc/{pid}/maps");
    let maps = std::fs::read_to_string(&maps_path).map_err(|source| EvictError::Io {
        what: "read",
        path: maps_path.clone(),
        source,
    })?;
    let (start, end) = maps
        .lines()
        .find(|l| l.ends_with("[vdso]"))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|r| r.split_once('-'))
        .and_then(|(s, e)| {
            Some((
                u64::from_str_radix(s, 16).ok()?,
                u64::from_str_radix(e, 16).ok()?,
            ))
        })
        .ok_or(EvictError::NoSyscallInstruction { pid })?;
    let mem_path = format!("/proc/{pid}/mem");
    let mem = File::open(&mem_path).map_err(|source| EvictError::Io {
        what: "open",
        path: mem_path.clone(),
        source,
    })?;
    let len = usize::try_from(end.saturating_sub(start))
        .unwrap_or(0)
        .min(1 << 16);
    let mut code = vec![0u8; len];
    mem.read_exact_at(&mut code, start)
        .map_err(|source| EvictError::Io {
            what: "read",
            path: mem_path,
            source,
        })?;
    code.windows(2)
        .position(|w| w == [0x0f, 0x05])
        .map(|off| start + off as u64)
        .ok_or(EvictError::NoSyscallInstruction { pid })
}

/// A seized thread; released (registers restored, signals delivered, detached) on drop, so that
/// no error path leaves the task stopped or changed.
struct Held {
    tid: Pid,
    saved: Option<libc::user_regs_struct>,
    signals: Vec<Signal>,
    released: bool,
}

impl Held {
    fn release(&mut self) -> Result<usize, EvictError> {
        self.released = true;
        let tid = self.tid;
        if let Some(regs) = self.saved.take() {
            ptrace::setregs(tid, regs)
                .map_err(|e| EvictError::ptrace("restore the registers of", tid, e))?;
        }
        let first = self.signals.first().copied();
        ptrace::detach(tid, first).map_err(|e| EvictError::ptrace("detach from", tid, e))?;
        // Further signals of the same stop go back through the kernel's queue.
        for s in self.signals.iter().skip(1) {
            // SAFETY: tgkill with plain integers; a failure only means the thread is gone.
            unsafe {
                libc::syscall(libc::SYS_tgkill, libc::getpid(), tid.as_raw(), *s as i32);
            }
        }
        Ok(self.signals.len())
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        if !self.released {
            if let Err(e) = self.release() {
                tracing::warn!(tid = self.tid.as_raw(), "releasing a seized thread: {e}");
            }
        }
    }
}

/// Waits for the next stop of `tid`. Signal-delivery stops are recorded (the signal is held
/// back and delivered on release) and the thread continued; the wait ends at a stop that is
/// not one, which is returned.
fn next_stop(h: &mut Held, resume: fn(Pid) -> nix::Result<()>) -> Result<WaitStatus, EvictError> {
    next_stop_by(h, resume, None)
}

/// [`next_stop`], giving up at `deadline` (a thread in an uninterruptible sleep does not stop
/// before it wakes).
///
/// The stop is seen either through `waitpid` or, when another thread of this process
/// collected its report first (a subreaper's `waitpid(-1)` loop, as in containerd's shims,
/// reports the stops of every tracee of the process), through `/proc/<tid>/status` being in
/// tracing stop, the kind of stop then read with `PTRACE_GETSIGINFO`. A resume clears the
/// report of the stop it ends, so no stop is seen twice.
fn next_stop_by(
    h: &mut Held,
    resume: fn(Pid) -> nix::Result<()>,
    deadline: Option<Instant>,
) -> Result<WaitStatus, EvictError> {
    let tid = h.tid.as_raw();
    let started = Instant::now();
    let mut pause = Duration::from_micros(2);
    loop {
        let st = match waitpid(h.tid, Some(WaitPidFlag::__WALL | WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => match stop_without_report(h)? {
                Some(st) => st,
                None => {
                    if deadline.is_some_and(|d| Instant::now() >= d) {
                        return Err(EvictError::NoStop {
                            tid,
                            after: STOP_TIMEOUT,
                            waiting_in: waiting_in(tid),
                        });
                    }
                    // A stop usually follows within microseconds (a single step, an
                    // interrupt): yield first, sleep (with backoff) only after that.
                    if started.elapsed() < SPIN {
                        std::thread::yield_now();
                    } else {
                        std::thread::sleep(pause);
                        pause = (pause * 2).min(Duration::from_millis(1));
                    }
                    continue;
                }
            },
            Ok(st) => st,
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(EvictError::ptrace("wait for", h.tid, e)),
        };
        pause = Duration::from_micros(2);
        match st {
            WaitStatus::Stopped(_, sig) if sig != Signal::SIGTRAP => {
                h.signals.push(sig);
                resume(h.tid).map_err(|e| EvictError::ptrace("resume", h.tid, e))?;
            }
            WaitStatus::Exited(..) | WaitStatus::Signaled(..) => {
                h.released = true;
                return Err(EvictError::Gone { tid });
            }
            other => return Ok(other),
        }
    }
}

/// The stop `h` is in when someone else collected its report: `None` while it runs.
fn stop_without_report(h: &mut Held) -> Result<Option<WaitStatus>, EvictError> {
    let tid = h.tid.as_raw();
    match state_of(tid) {
        None | Some('Z' | 'X') => {
            h.released = true;
            return Err(EvictError::Gone { tid });
        }
        Some('t') => {}
        Some(_) => return Ok(None),
    }
    let info = match ptrace::getsiginfo(h.tid) {
        Ok(i) => i,
        // Not (or no longer) in a stop that has one: look again.
        Err(Errno::ESRCH | Errno::EINVAL) => return Ok(None),
        Err(e) => return Err(EvictError::ptrace("read the stop of", h.tid, e)),
    };
    let Ok(sig) = Signal::try_from(info.si_signo) else {
        return Ok(None);
    };
    Ok(Some(if info.si_code >> 8 == libc::PTRACE_EVENT_STOP {
        WaitStatus::PtraceEvent(h.tid, sig, libc::PTRACE_EVENT_STOP)
    } else {
        WaitStatus::Stopped(h.tid, sig)
    }))
}

/// `/proc/<tid>/status`, refused when the thread must be left alone.
fn checked_status(tid: i32) -> Result<Status, EvictError> {
    let st = status(tid)?;
    if st.tracer != 0 {
        return Err(EvictError::Refused {
            tid,
            why: format!("traced by pid {}", st.tracer),
        });
    }
    if st.stopped {
        return Err(EvictError::Refused {
            tid,
            why: "stopped".into(),
        });
    }
    if st.seccomp == 1 {
        return Err(EvictError::Refused {
            tid,
            why: "strict seccomp mode".into(),
        });
    }
    Ok(st)
}

/// Seizes thread `tid` and waits for its interrupt stop.
fn stop_thread(tid: i32) -> Result<Held, EvictError> {
    let mut h = interrupt_thread(tid)?;
    wait_interrupted(&mut h)?;
    Ok(h)
}

/// Seizes thread `tid` and asks it to stop (`PTRACE_INTERRUPT`), without waiting.
fn interrupt_thread(tid: i32) -> Result<Held, EvictError> {
    let pid = Pid::from_raw(tid);
    ptrace::seize(pid, ptrace::Options::empty()).map_err(|e| match e {
        Errno::ESRCH => EvictError::Gone { tid },
        e => EvictError::ptrace("seize", pid, e),
    })?;
    let h = Held {
        tid: pid,
        saved: None,
        signals: Vec::new(),
        released: false,
    };
    ptrace::interrupt(pid).map_err(|e| EvictError::ptrace("interrupt", pid, e))?;
    Ok(h)
}

/// Waits for the interrupt stop of a thread [`interrupt_thread`] seized.
fn wait_interrupted(h: &mut Held) -> Result<(), EvictError> {
    let tid = h.tid.as_raw();
    let deadline = Instant::now() + STOP_TIMEOUT;
    match next_stop_by(h, |t| ptrace::cont(t, None), Some(deadline))? {
        WaitStatus::PtraceEvent(_, Signal::SIGTRAP, libc::PTRACE_EVENT_STOP) => Ok(()),
        // A group stop (SIGSTOP and the like) arrived first: the task is meant to stay stopped.
        WaitStatus::PtraceEvent(_, sig, libc::PTRACE_EVENT_STOP) => Err(EvictError::Refused {
            tid,
            why: format!("stopped by {sig}"),
        }),
        other => Err(EvictError::UnexpectedStop {
            tid,
            status: format!("{other:?}"),
        }),
    }
}

/// The state letter of thread `tid` (`/proc/<tid>/stat`, the field after the command name);
/// `None` when it is gone.
fn state_of(tid: i32) -> Option<char> {
    use std::io::Read;
    let mut buf = [0u8; 512];
    let mut f = File::open(format!("/proc/{tid}/stat")).ok()?;
    let n = f.read(&mut buf).ok()?;
    let text = &buf[..n];
    let close = text.iter().rposition(|&b| b == b')')?;
    text[close + 1..]
        .iter()
        .find(|b| !b.is_ascii_whitespace())
        .map(|&b| char::from(b))
}

/// Where thread `tid` sleeps: its state and kernel wait channel, for an error message.
fn waiting_in(tid: i32) -> String {
    let state = status(tid).ok().map_or_else(String::new, |s| s.state);
    let wchan = std::fs::read_to_string(format!("/proc/{tid}/wchan")).unwrap_or_default();
    format!(
        "{state}, in {}",
        if wchan.is_empty() { "?" } else { &wchan }
    )
}

/// The threads of process `pid` (`/proc/<pid>/task`).
fn threads_of(pid: i32) -> Result<Vec<i32>, EvictError> {
    let path = format!("/proc/{pid}/task");
    let rd = std::fs::read_dir(&path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            EvictError::Gone { tid: pid }
        } else {
            EvictError::Io {
                what: "list",
                path: path.clone(),
                source: e,
            }
        }
    })?;
    let mut tids: Vec<i32> = rd
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect();
    tids.sort_unstable();
    Ok(tids)
}

/// Every thread of a process held stopped, one of them ready to run calls
/// ([`Seized::madvise`]). While it is held nothing of the process runs, so its address space
/// changes only through the calls the injector makes (and other processes sharing it with
/// `CLONE_VM` without `CLONE_THREAD`, a `vfork` child for instance). Dropping it releases every
/// thread.
pub struct StoppedProcess {
    main: Seized,
    others: Vec<Held>,
}

impl StoppedProcess {
    /// Stops every thread of process `pid` (threads created meanwhile included: the list is
    /// read again until it holds no thread that is not stopped). Refused untouched, like
    /// [`Seized::seize`], when any thread is traced, stopped or in strict seccomp mode; fails
    /// with [`EvictError::NoStop`] when a thread does not stop within [`STOP_TIMEOUT`]: the
    /// threads already stopped are released, but the one that did not stop can only be
    /// detached by the exit of the calling thread (the kernel refuses `PTRACE_DETACH` of a
    /// running tracee and drops its pending stop when its tracer exits), so call this on a
    /// thread that ends after the batch.
    pub fn stop(pid: i32) -> Result<StoppedProcess, EvictError> {
        if !cfg!(target_arch = "x86_64") {
            return Err(EvictError::Unsupported(
                "remote system calls are implemented for x86_64 only",
            ));
        }
        // Every thread is asked to stop first and waited for after, so that they stop
        // together rather than one after the other.
        let mut held: Vec<(Held, Status)> = Vec::new();
        loop {
            let mut asked = Vec::new();
            for tid in threads_of(pid)? {
                if held.iter().any(|(h, _)| h.tid.as_raw() == tid) {
                    continue;
                }
                let st = match checked_status(tid) {
                    Ok(st) => st,
                    Err(EvictError::Gone { .. }) => continue,
                    Err(e) => return Err(e),
                };
                match interrupt_thread(tid) {
                    Ok(h) => asked.push((h, st)),
                    Err(EvictError::Gone { .. }) => {}
                    Err(e) => return Err(e),
                }
            }
            if asked.is_empty() {
                break;
            }
            for (mut h, st) in asked {
                match wait_interrupted(&mut h) {
                    Ok(()) => held.push((h, st)),
                    Err(EvictError::Gone { .. }) => {}
                    Err(e) => return Err(e),
                }
            }
        }
        if held.is_empty() {
            return Err(EvictError::Gone { tid: pid });
        }
        let (h, st) = held.remove(0);
        let main = Seized::from_held(h, &st)?;
        Ok(StoppedProcess {
            main,
            others: held.into_iter().map(|(h, _)| h).collect(),
        })
    }

    /// The thread that runs the calls.
    pub fn pid(&self) -> i32 {
        self.main.tid
    }

    /// Threads held.
    pub fn threads(&self) -> usize {
        1 + self.others.len()
    }

    /// Runs `madvise` in one of the held threads (see [`Seized::madvise`]).
    pub fn madvise(
        &mut self,
        ranges: &[(u64, u64)],
        advice: Advice,
    ) -> Result<Injected, EvictError> {
        self.main.madvise(ranges, advice)
    }

    /// Runs `madvise` over all `ranges` in one of the held threads (see
    /// [`Seized::madvise_all`]).
    pub fn madvise_all(
        &mut self,
        ranges: &[(u64, u64)],
        advice: Advice,
    ) -> (Injected, Option<EvictError>) {
        self.main.madvise_all(ranges, advice)
    }

    /// Releases every thread; returns the number of signals delivered again.
    pub fn release(self) -> Result<usize, EvictError> {
        let mut n = 0;
        let mut first_err = None;
        for mut h in self.others {
            match h.release() {
                Ok(k) => n += k,
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        match self.main.release() {
            Ok(k) => n += k,
            Err(e) => {
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(n), Err)
    }
}

/// Runs `madvise(start, end - start, advice)` for each range in the context of thread `tid`
/// (any thread of the task: the call acts on the whole address space). Refuses, without
/// touching the task, a thread that is traced by someone else, group-stopped, under strict
/// seccomp, or whose seccomp filters would not allow the call.
pub fn madvise(tid: i32, ranges: &[(u64, u64)], advice: Advice) -> Result<Injected, EvictError> {
    if ranges.is_empty() {
        return Ok(Injected::default());
    }
    let mut s = Seized::seize(tid)?;
    let mut done = s.madvise(ranges, advice)?;
    done.signals_redelivered = s.release()?;
    Ok(done)
}

/// One thread of a task held stopped by the injector, with what it needs to run calls in it.
/// Dropping it releases the thread (registers restored, held signals delivered, detached).
pub struct Seized {
    h: Held,
    tid: i32,
    saved: libc::user_regs_struct,
    syscall_at: u64,
    /// The task's seccomp filters, when it has any (mode 2).
    filters: Option<Vec<Vec<seccomp::Insn>>>,
}

impl Seized {
    /// Seizes and stops thread `tid` (see the module docs of [`crate::evict`] for what is
    /// refused untouched). While the thread is held the task's other threads run on; a
    /// `madvise` of a userfaultfd-registered range issued through [`Seized::madvise`] blocks
    /// until the userfaultfd's reader has read the `UFFD_EVENT_REMOVE`.
    pub fn seize(tid: i32) -> Result<Seized, EvictError> {
        if !cfg!(target_arch = "x86_64") {
            return Err(EvictError::Unsupported(
                "remote system calls are implemented for x86_64 only",
            ));
        }
        let st = checked_status(tid)?;
        let h = stop_thread(tid)?;
        Seized::from_held(h, &st)
    }

    /// Makes a stopped thread ready to run calls: its registers saved, the `syscall`
    /// instruction found, its seccomp filters read (`st`: its status before the seize).
    fn from_held(mut h: Held, st: &Status) -> Result<Seized, EvictError> {
        let (pid, tid) = (h.tid, h.tid.as_raw());
        let syscall_at = vdso_syscall(tid)?;
        let saved = ptrace::getregs(pid)
            .map_err(|e| EvictError::ptrace("read the registers of", pid, e))?;
        h.saved = Some(saved);
        let filters = if st.seccomp == 2 {
            Some(seccomp::read_filters(tid).map_err(|source| EvictError::Io {
                what: "read the seccomp filters of",
                path: format!("task {tid}"),
                source,
            })?)
        } else {
            None
        };
        Ok(Seized {
            h,
            tid,
            saved,
            syscall_at,
            filters,
        })
    }

    /// The held thread.
    pub fn tid(&self) -> i32 {
        self.tid
    }

    /// Whether the task's seccomp filters (if any) allow system call `nr` with `args` from
    /// the vDSO's `syscall` instruction; `Err` names the filter's action.
    pub(super) fn allows(&self, nr: i32, args: [u64; 6]) -> Result<(), u32> {
        let Some(filters) = &self.filters else {
            return Ok(());
        };
        let d = SeccompData {
            nr,
            arch: AUDIT_ARCH_X86_64,
            instruction_pointer: self.syscall_at + 2,
            args,
        };
        let action = seccomp::action(filters, &d);
        if seccomp::allows(action) {
            Ok(())
        } else {
            Err(action)
        }
    }

    /// Runs system call `nr` with `args` in the held thread and returns what it returned
    /// (`-errno` on failure). The caller checked it with [`Seized::allows`].
    pub(super) fn syscall(&mut self, nr: i32, args: [u64; 6]) -> Result<i64, EvictError> {
        let (tid, pid) = (self.tid, self.h.tid);
        let mut regs = self.saved;
        regs.rax = nr as u64;
        regs.orig_rax = u64::MAX;
        regs.rdi = args[0];
        regs.rsi = args[1];
        regs.rdx = args[2];
        regs.r10 = args[3];
        regs.r8 = args[4];
        regs.r9 = args[5];
        regs.rip = self.syscall_at;
        ptrace::setregs(pid, regs)
            .map_err(|e| EvictError::ptrace("set the registers of", pid, e))?;
        // A signal may stop the thread before the instruction ran: step until it has.
        loop {
            ptrace::step(pid, None).map_err(|e| EvictError::ptrace("single-step", pid, e))?;
            match next_stop(&mut self.h, |t| ptrace::step(t, None))? {
                WaitStatus::Stopped(_, Signal::SIGTRAP) => {}
                other => {
                    return Err(EvictError::UnexpectedStop {
                        tid,
                        status: format!("{other:?}"),
                    })
                }
            }
            let now = ptrace::getregs(pid)
                .map_err(|e| EvictError::ptrace("read the registers of", pid, e))?;
            if now.rip != self.syscall_at {
                return Ok(now.rax as i64);
            }
        }
    }

    /// Runs `madvise` for each range in the held thread, in order; stops at the first call
    /// that fails (the ranges before it are done). Refuses, before running anything, when the
    /// task's seccomp filters would not allow every call.
    pub fn madvise(
        &mut self,
        ranges: &[(u64, u64)],
        advice: Advice,
    ) -> Result<Injected, EvictError> {
        let tid = self.tid;
        for &(start, end) in ranges {
            let args = [start, end - start, advice.value(), 0, 0, 0];
            if let Err(action) = self.allows(SYS_MADVISE, args) {
                return Err(EvictError::Refused {
                    tid,
                    why: format!("its seccomp filters answer madvise with action {action:#010x}"),
                });
            }
        }
        let mut done = Injected::default();
        for &(start, end) in ranges {
            let ret = self.syscall(SYS_MADVISE, [start, end - start, advice.value(), 0, 0, 0])?;
            done.calls += 1;
            if ret < 0 {
                return Err(EvictError::Call {
                    tid,
                    start,
                    end,
                    errno: errno_of(ret),
                });
            }
            done.ranges += 1;
            done.bytes += end - start;
        }
        Ok(done)
    }

    /// Runs `madvise` over all `ranges`, with as few system calls as the task allows (one
    /// `process_madvise` per 1024 ranges, see the `vector` module; else
    /// one `madvise` each), in order. Returns what was done and, if a call failed, why the
    /// rest was not (the ranges counted in the first are done).
    pub fn madvise_all(
        &mut self,
        ranges: &[(u64, u64)],
        advice: Advice,
    ) -> (Injected, Option<EvictError>) {
        let mut done = Injected::default();
        if ranges.len() > 1 {
            match super::vector::madvise(self, ranges, advice.value()) {
                Ok(d) if d.ranges == ranges.len() => return (d, None),
                Ok(d) => done = d,
                Err(e) => return (Injected::default(), Some(e)),
            }
        }
        let rest = &ranges[done.ranges..];
        match self.madvise(rest, advice) {
            Ok(d) => {
                done.add(&d);
                (done, None)
            }
            Err(e) => (done, Some(e)),
        }
    }

    /// Releases the thread now; returns the number of signals delivered again.
    pub fn release(mut self) -> Result<usize, EvictError> {
        self.h.release()
    }
}
