//! Eviction: giving pages of a restored task's anonymous memory back, so that they are remote
//! again and fault in through the userfaultfd on their next access.
//!
//! # Why a system call inside the task
//!
//! On this kernel nothing outside a process can drop a page of its private anonymous memory:
//! `process_madvise` refuses `MADV_DONTNEED`, `MADV_FREE` and `MADV_REMOVE` (EINVAL) and
//! accepts `MADV_COLD`/`MADV_PAGEOUT` without effect (no swap), `UFFDIO_MOVE` across address
//! spaces and `process_mrelease` are EINVAL. Only the task's own `madvise(MADV_DONTNEED)`
//! works: the fetcher then receives `UFFD_EVENT_REMOVE` and the next access is a MISSING fault
//! again. [`inject::madvise`] therefore makes one of the task's threads run that call, the way
//! CRIU's compel runs its parasite, but without writing code into the task.
//!
//! # How
//!
//! 1. `/proc/<tid>/status` first: a thread traced by another process (a debugger, CRIU during
//!    a checkpoint), group-stopped or in strict seccomp mode is refused untouched.
//! 2. A `syscall` instruction (`0f 05`) is found in the task's own vDSO, so no instruction of
//!    the task is overwritten: its other threads, which keep running, never execute anything
//!    but their own code.
//! 3. `PTRACE_SEIZE` (no options: nothing is traced but this one stop; the tracee is not
//!    killed if the shim dies) and `PTRACE_INTERRUPT` stop one thread. Signals that arrive
//!    before that stop, or while the thread is held, are held back and delivered again when it
//!    is released (the first through `PTRACE_DETACH`, the others with `tgkill`).
//! 4. The seccomp filters of the task are read (`PTRACE_SECCOMP_GET_FILTER`) and run on the
//!    exact call ([`seccomp`]); unless all of them allow it the injector refuses, so a filter
//!    that kills or traps on `madvise` is never triggered.
//! 5. The registers are saved; for each range the thread is given `rax = SYS_madvise`, the
//!    arguments, `orig_rax = -1` (no system call restart applies to the injected call) and
//!    `rip` at the vDSO's `syscall`, and single-stepped over it; the result is read from
//!    `rax`.
//! 6. The saved registers are written back exactly (a system call the thread was blocked in
//!    restarts as after any signal-delivery stop) and the thread is detached. Every error path
//!    after the seize goes through the same release, so the task is never left stopped or
//!    with changed registers.
//!
//! [`StoppedProcess`] does steps 1 and 3 for every thread of the process (read again until no
//! new thread appears), so that nothing of it runs while the calls are made; one thread gets
//! steps 2 to 6. A stop is seen through `waitpid` or, since a subreaper's `waitpid(-1)` (the
//! shim's) collects the reports of every tracee of the process, through `/proc/<tid>/status`
//! and `PTRACE_GETSIGINFO`.
//!
//! # Hazards (and what the caller must do)
//!
//! - `madvise` of a userfaultfd-registered range blocks until the fetcher has read the
//!   `UFFD_EVENT_REMOVE` event: the injection must not run on the thread that reads the
//!   userfaultfd, or it waits forever.
//! - The threads are stopped for the length of the calls (each range's event is read by the
//!   fault thread in between). Batch ranges, do not inject per page: [`Seized::madvise_all`]
//!   runs up to 1024 ranges in one `process_madvise` of the task on itself (see `vector`),
//!   about 0.5 µs per range against 9 µs for one injected `madvise` each, and falls back to
//!   the latter where seccomp or the kernel refuses it.
//! - A thread asleep uninterruptibly (a page fault inside a system call, waiting for the
//!   fetcher) does not stop before it wakes: after [`inject::STOP_TIMEOUT`] the stop fails, and
//!   that thread stays seized until the thread that seized it exits (the kernel refuses to
//!   detach a running tracee). Run a stop on a thread that ends after it.
//! - If the shim dies while a thread runs the injected call, the kernel detaches it with the
//!   injected registers: the task would crash. The window is the length of a batch.
//! - The caller serialises injections with checkpoints of the same container (CRIU seizes
//!   every thread and would find them traced) and with other injections.
//! - x86_64 only (the register layout and the instruction).

pub mod inject;
pub mod seccomp;
mod vector;

pub use inject::{madvise, Advice, Injected, Seized, StoppedProcess, STOP_TIMEOUT};

/// Errors of running a system call in a task.
#[derive(Debug, thiserror::Error)]
pub enum EvictError {
    /// The thread is not in a state the injector may touch; nothing was done.
    #[error("task {tid} left alone: {why}")]
    Refused {
        /// The thread.
        tid: i32,
        /// Why.
        why: String,
    },
    /// The thread or its process exited.
    #[error("task {tid} is gone")]
    Gone {
        /// The thread.
        tid: i32,
    },
    /// The task's vDSO holds no `syscall` instruction (or it has no vDSO).
    #[error("no syscall instruction in the vDSO of process {pid}")]
    NoSyscallInstruction {
        /// The process.
        pid: i32,
    },
    /// A thread did not stop in time after `PTRACE_INTERRUPT`.
    #[error("task {tid} did not stop within {after:?} ({waiting_in})")]
    NoStop {
        /// The thread.
        tid: i32,
        /// The limit.
        after: std::time::Duration,
        /// Its state and kernel wait channel then.
        waiting_in: String,
    },
    /// A ptrace request failed.
    #[error("ptrace: {what} {tid}: {errno}")]
    Ptrace {
        /// The request.
        what: &'static str,
        /// The thread.
        tid: i32,
        /// The error.
        errno: nix::errno::Errno,
    },
    /// The thread stopped in a way the injector does not expect (it was released).
    #[error("task {tid} stopped unexpectedly: {status}")]
    UnexpectedStop {
        /// The thread.
        tid: i32,
        /// What waitpid said.
        status: String,
    },
    /// The injected call failed in the task.
    #[error("madvise({start:#x}..{end:#x}) in task {tid}: {errno}")]
    Call {
        /// The thread.
        tid: i32,
        /// The range.
        start: u64,
        /// Its end.
        end: u64,
        /// What the call returned.
        errno: nix::errno::Errno,
    },
    /// A file of `/proc` could not be read.
    #[error("{what} {path}: {source}")]
    Io {
        /// The operation.
        what: &'static str,
        /// The file.
        path: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Not on this architecture.
    #[error("{0}")]
    Unsupported(&'static str),
}

impl EvictError {
    fn ptrace(what: &'static str, tid: nix::unistd::Pid, errno: nix::errno::Errno) -> EvictError {
        EvictError::Ptrace {
            what,
            tid: tid.as_raw(),
            errno,
        }
    }
}
