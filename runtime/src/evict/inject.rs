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
    /// Signals that arrived for the thread while it was held, delivered again on release.
    pub signals_redelivered: usize,
}

/// The facts of `/proc/<tid>/status` the injector checks first.
struct Status {
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
fn next_stop_by(
    h: &mut Held,
    resume: fn(Pid) -> nix::Result<()>,
    deadline: Option<Instant>,
) -> Result<WaitStatus, EvictError> {
    let flags = if deadline.is_some() {
        WaitPidFlag::__WALL | WaitPidFlag::WNOHANG
    } else {
        WaitPidFlag::__WALL
    };
    let mut pause = Duration::from_micros(5);
    loop {
        let st = match waitpid(h.tid, Some(flags)) {
            Ok(WaitStatus::StillAlive) => {
                if deadline.is_some_and(|d| Instant::now() >= d) {
                    return Err(EvictError::NoStop {
                        tid: h.tid.as_raw(),
                        after: STOP_TIMEOUT,
                    });
                }
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_millis(1));
                continue;
            }
            Ok(st) => st,
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(EvictError::ptrace("wait for", h.tid, e)),
        };
        match st {
            WaitStatus::Stopped(_, sig) if sig != Signal::SIGTRAP => {
                h.signals.push(sig);
                resume(h.tid).map_err(|e| EvictError::ptrace("resume", h.tid, e))?;
            }
            WaitStatus::Exited(..) | WaitStatus::Signaled(..) => {
                h.released = true;
                return Err(EvictError::Gone {
                    tid: h.tid.as_raw(),
                });
            }
            other => return Ok(other),
        }
    }
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
    let pid = Pid::from_raw(tid);
    ptrace::seize(pid, ptrace::Options::empty()).map_err(|e| match e {
        Errno::ESRCH => EvictError::Gone { tid },
        e => EvictError::ptrace("seize", pid, e),
    })?;
    let mut h = Held {
        tid: pid,
        saved: None,
        signals: Vec::new(),
        released: false,
    };
    ptrace::interrupt(pid).map_err(|e| EvictError::ptrace("interrupt", pid, e))?;
    let deadline = Instant::now() + STOP_TIMEOUT;
    match next_stop_by(&mut h, |t| ptrace::cont(t, None), Some(deadline))? {
        WaitStatus::PtraceEvent(_, Signal::SIGTRAP, libc::PTRACE_EVENT_STOP) => Ok(h),
        // A group stop (SIGSTOP and the like) arrived first: the task is meant to stay stopped.
        WaitStatus::PtraceEvent(_, sig, libc::PTRACE_EVENT_STOP) => {
            drop(h);
            Err(EvictError::Refused {
                tid,
                why: format!("stopped by {sig}"),
            })
        }
        other => {
            drop(h);
            Err(EvictError::UnexpectedStop {
                tid,
                status: format!("{other:?}"),
            })
        }
    }
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
        let mut main: Option<Seized> = None;
        let mut others: Vec<Held> = Vec::new();
        loop {
            let mut fresh = 0;
            for tid in threads_of(pid)? {
                let known = main.as_ref().is_some_and(|m| m.tid == tid)
                    || others.iter().any(|h| h.tid.as_raw() == tid);
                if known {
                    continue;
                }
                fresh += 1;
                if main.is_none() {
                    match Seized::seize(tid) {
                        Ok(s) => main = Some(s),
                        Err(EvictError::Gone { .. }) => {}
                        Err(e) => return Err(e),
                    }
                    continue;
                }
                checked_status(tid)?;
                match stop_thread(tid) {
                    Ok(h) => others.push(h),
                    Err(EvictError::Gone { .. }) => {}
                    Err(e) => return Err(e),
                }
            }
            if fresh == 0 {
                break;
            }
        }
        let main = main.ok_or(EvictError::Gone { tid: pid })?;
        Ok(StoppedProcess { main, others })
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
        let syscall_at = vdso_syscall(tid)?;
        let pid = Pid::from_raw(tid);
        let mut h = stop_thread(tid)?;
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

    /// Runs `madvise` for each range in the held thread, in order; stops at the first call
    /// that fails (the ranges before it are done). Refuses, before running anything, when the
    /// task's seccomp filters would not allow every call.
    pub fn madvise(
        &mut self,
        ranges: &[(u64, u64)],
        advice: Advice,
    ) -> Result<Injected, EvictError> {
        let (tid, pid) = (self.tid, self.h.tid);
        if let Some(filters) = &self.filters {
            for &(start, end) in ranges {
                let d = SeccompData {
                    nr: SYS_MADVISE,
                    arch: AUDIT_ARCH_X86_64,
                    instruction_pointer: self.syscall_at + 2,
                    args: [start, end - start, advice.value(), 0, 0, 0],
                };
                let action = seccomp::action(filters, &d);
                if !seccomp::allows(action) {
                    return Err(EvictError::Refused {
                        tid,
                        why: format!(
                            "its seccomp filters answer madvise with action {action:#010x}"
                        ),
                    });
                }
            }
        }
        let mut done = Injected::default();
        for &(start, end) in ranges {
            let mut regs = self.saved;
            regs.rax = SYS_MADVISE as u64;
            regs.orig_rax = u64::MAX;
            regs.rdi = start;
            regs.rsi = end - start;
            regs.rdx = advice.value();
            regs.rip = self.syscall_at;
            ptrace::setregs(pid, regs)
                .map_err(|e| EvictError::ptrace("set the registers of", pid, e))?;
            // A signal may stop the thread before the instruction ran: step until it has.
            let ret = loop {
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
                    break now.rax as i64;
                }
            };
            if ret < 0 {
                let errno = Errno::from_raw(i32::try_from(-ret).unwrap_or(libc::EINVAL));
                return Err(EvictError::Call {
                    tid,
                    start,
                    end,
                    errno,
                });
            }
            done.ranges += 1;
            done.bytes += end - start;
        }
        Ok(done)
    }

    /// Releases the thread now; returns the number of signals delivered again.
    pub fn release(mut self) -> Result<usize, EvictError> {
        self.h.release()
    }
}
