//! The uffd keeper: a small process that holds a duplicate of every task userfaultfd the
//! fetcher receives, so that the descriptor never closes when the fetcher's process dies.
//!
//! Why: when the last reference to a task's userfaultfd closes, the kernel resolves that task's
//! pending and later faults with zero-filled pages (CRIU's restorer closes the
//! task's own copy). A shim killed mid-restore would leave its containers running on zeroed
//! memory. With a keeper the uffd stays open; when the link to the fetcher ends without a
//! "done" message (the fetcher's process died) or with "abandon" (the fetcher failed), the keeper
//! takes over as a *poison server*: it UFFDIO_POISONs every lazy range it was told about (page
//! by page where a page is already present) and then answers each further fault with
//! UFFDIO_POISON, so the task gets SIGBUS, never zeros (a write-protect fault, on a page that
//! is present, is let through). It exits when all its tasks are gone.
//! On "done" (fill complete, or every task exited) it drops its duplicates and exits at once.
//!
//! Wire (SOCK_SEQPACKET, one message per datagram): `F` vpid(u32 LE) then (start, end) u64 LE
//! pairs with the uffd in SCM_RIGHTS; `D` done; `A` abandon (take over now).

use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use nix::sys::socket::{
    recvmsg, sendmsg, socketpair, AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags,
    SockFlag, SockType,
};
use userfaultfd::{Event, EventBuffer, FaultKind, Uffd};

use super::task::poison;

/// The descriptor number the keeper process finds its link on.
pub const KEEPER_FD: RawFd = 3;
/// Largest message: type, vpid and this many ranges.
const MAX_RANGES: usize = 4096;
const MSG_MAX: usize = 5 + MAX_RANGES * 16;
const PAGE: u64 = crate::images::PAGE_SIZE;
const PAGE_LEN: usize = 4096;
/// How often the poison server checks whether its tasks still exist.
const PROBE_EVERY: Duration = Duration::from_millis(500);
/// An address no task maps (page 0), for the exit probe.
const PROBE_ADDR: u64 = 0;

/// Errors of the keeper link.
#[derive(Debug, thiserror::Error)]
pub enum KeeperError {
    /// Creating the link or starting the keeper process failed.
    #[error("cannot {what} for the uffd keeper")]
    Start {
        /// The step.
        what: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Handing a uffd to the keeper failed (the keeper is gone).
    #[error("cannot hand the userfaultfd of pid {pid} to the uffd keeper (pid {keeper})")]
    Send {
        /// The task's virtual pid.
        pid: u32,
        /// The keeper's pid.
        keeper: u32,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

/// The fetcher's end of the link to a keeper process.
#[derive(Debug)]
pub struct KeeperLink {
    sock: OwnedFd,
    child: Mutex<Option<Child>>,
    pid: u32,
    ended: Mutex<bool>,
}

impl KeeperLink {
    /// Starts `cmd` (a program that calls [`run_keeper`] on descriptor [`KEEPER_FD`]) with the
    /// other end of a fresh SOCK_SEQPACKET pair as its descriptor 3; stdin and stdout are
    /// /dev/null, stderr is whatever `cmd` says.
    pub fn spawn(mut cmd: Command) -> Result<KeeperLink, KeeperError> {
        let (ours, theirs) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .map_err(|e| KeeperError::Start {
            what: "create a socket pair",
            source: e.into(),
        })?;
        let raw = theirs.as_raw_fd();
        // SAFETY: only async-signal-safe dup2/fcntl run in the child, on a descriptor this
        // function owns and keeps open until after spawn.
        unsafe {
            cmd.pre_exec(move || {
                if raw == KEEPER_FD {
                    if libc::fcntl(raw, libc::F_SETFD, 0) < 0 {
                        return Err(io::Error::last_os_error());
                    }
                } else if libc::dup2(raw, KEEPER_FD) < 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .map_err(|source| KeeperError::Start {
                what: "start the keeper process",
                source,
            })?;
        drop(theirs);
        Ok(KeeperLink {
            sock: ours,
            pid: child.id(),
            child: Mutex::new(Some(child)),
            ended: Mutex::new(false),
        })
    }

    /// The keeper process's pid.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Hands a duplicate of task `pid`'s uffd to the keeper, with the lazy ranges (start, end)
    /// to poison should the fetcher die.
    pub fn hold(
        &self,
        pid: u32,
        uffd: BorrowedFd<'_>,
        ranges: &[(u64, u64)],
    ) -> Result<(), KeeperError> {
        let mut msg = Vec::with_capacity(5 + ranges.len().min(MAX_RANGES) * 16);
        msg.push(b'F');
        msg.extend_from_slice(&pid.to_le_bytes());
        // Ranges past the limit are still covered: every later fault is poisoned.
        for (s, e) in ranges.iter().take(MAX_RANGES) {
            msg.extend_from_slice(&s.to_le_bytes());
            msg.extend_from_slice(&e.to_le_bytes());
        }
        let fds = [uffd.as_raw_fd()];
        let cmsg = [ControlMessage::ScmRights(&fds)];
        sendmsg::<()>(
            self.sock.as_raw_fd(),
            &[IoSlice::new(&msg)],
            &cmsg,
            MsgFlags::MSG_NOSIGNAL,
            None,
        )
        .map(|_| ())
        .map_err(|e| KeeperError::Send {
            pid,
            keeper: self.pid,
            source: e.into(),
        })
    }

    fn end(&self, what: u8) {
        let mut ended = self.ended.lock().unwrap_or_else(|p| p.into_inner());
        if *ended {
            return;
        }
        *ended = true;
        let _ = nix::sys::socket::send(self.sock.as_raw_fd(), &[what], MsgFlags::MSG_NOSIGNAL);
        if let Some(mut c) = self.child.lock().unwrap_or_else(|p| p.into_inner()).take() {
            // After 'D' it exits at once: reap it (unless a reaper of the caller, like the
            // shim's, already did). After 'A' it lives as long as its tasks.
            let until = Instant::now() + Duration::from_secs(if what == b'D' { 2 } else { 0 });
            while matches!(c.try_wait(), Ok(None)) && Instant::now() < until {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    }

    /// The fill is complete or every task is gone: the keeper drops its duplicates and exits.
    pub fn release(&self) {
        self.end(b'D');
    }

    /// The fetcher ended abnormally: the keeper poisons what is missing and serves every later
    /// fault with poison until its tasks are gone.
    pub fn abandon(&self) {
        self.end(b'A');
    }
}

impl Drop for KeeperLink {
    fn drop(&mut self) {
        // Not told how the fill ended: the safe side.
        self.abandon();
    }
}

struct Held {
    pid: u32,
    uffd: Uffd,
    ranges: Vec<(u64, u64)>,
}

fn parse(buf: &[u8], fd: OwnedFd) -> Option<Held> {
    let pid = u32::from_le_bytes(buf.get(1..5)?.try_into().ok()?);
    let ranges = buf[5..]
        .chunks_exact(16)
        .map(|c| {
            let s = u64::from_le_bytes(c[..8].try_into().unwrap_or_default());
            let e = u64::from_le_bytes(c[8..].try_into().unwrap_or_default());
            (s, e)
        })
        .collect();
    // SAFETY: `fd` is an owned userfaultfd received over SCM_RIGHTS; `Uffd` takes ownership.
    let uffd = unsafe { Uffd::from_raw_fd(fd.into_raw_fd()) };
    Some(Held { pid, uffd, ranges })
}

fn log(msg: &str) {
    eprintln!("distriproc uffd keeper (pid {}): {msg}", std::process::id());
}

/// The keeper's main: reads the link on `fd` until "done" (returns 0 at once) or until the
/// link ends otherwise, then poisons and serves faults with poison until every held task is
/// gone. Returns the process exit code.
pub fn run_keeper(fd: OwnedFd) -> i32 {
    let mut held: Vec<Held> = Vec::new();
    let mut buf = vec![0u8; MSG_MAX];
    let why = loop {
        let mut iov = [IoSliceMut::new(&mut buf)];
        let mut cmsg = nix::cmsg_space!(RawFd);
        let r = recvmsg::<()>(
            fd.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::MSG_CMSG_CLOEXEC,
        );
        let msg = match r {
            Ok(m) => m,
            Err(nix::Error::EINTR) => continue,
            Err(e) => break format!("the link to the fetcher failed: {e}"),
        };
        let mut fds = Vec::new();
        if let Ok(c) = msg.cmsgs() {
            for m in c {
                if let ControlMessageOwned::ScmRights(v) = m {
                    fds.extend(v);
                }
            }
        }
        let n = msg.bytes;
        // SAFETY: SCM_RIGHTS installed these descriptors in our table for us alone.
        let mut owned: Vec<OwnedFd> = fds
            .into_iter()
            .map(|f| unsafe { OwnedFd::from_raw_fd(f) })
            .collect();
        if n == 0 {
            break "the fetcher's process is gone (link closed without 'done')".to_owned();
        }
        match buf[0] {
            b'D' => return 0,
            b'A' => break "the fetcher abandoned the restore".to_owned(),
            b'F' if !owned.is_empty() => {
                if let Some(h) = parse(&buf[..n], owned.swap_remove(0)) {
                    held.push(h);
                }
            }
            _ => {}
        }
    };
    drop(fd);
    if held.is_empty() {
        return 0;
    }
    log(&format!(
        "{why}; {} task userfaultfd(s) held: poisoning pages never fetched so the tasks get \
         SIGBUS instead of zero pages",
        held.len()
    ));
    let mut poisoned = 0u64;
    for h in &held {
        for &(s, e) in &h.ranges {
            poisoned += poison(&h.uffd, s, e.saturating_sub(s) / PAGE);
        }
    }
    log(&format!("poisoned {poisoned} missing pages"));
    serve_poison(held);
    log("every held task is gone; exiting");
    0
}

/// Answers every fault with UFFDIO_POISON until each task's mm is gone.
fn serve_poison(mut held: Vec<Held>) {
    let mut evbuf = EventBuffer::new(64);
    let mut last_probe = Instant::now();
    let mut served = 0u64;
    while !held.is_empty() {
        let mut pfds: Vec<libc::pollfd> = held
            .iter()
            .map(|h| libc::pollfd {
                fd: h.uffd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        // SAFETY: `pfds` is a live array of `pfds.len()` pollfd structs.
        let n = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, 200) };
        let mut gone = vec![false; held.len()];
        let mut born = Vec::new();
        if n > 0 {
            for (i, p) in pfds.iter().enumerate() {
                if p.revents == 0 {
                    continue;
                }
                let h = &held[i];
                match h.uffd.read_events(&mut evbuf) {
                    Ok(it) => {
                        for ev in it.flatten() {
                            match ev {
                                Event::Pagefault {
                                    kind: FaultKind::WriteProtected,
                                    addr,
                                    ..
                                } => {
                                    // A present page the task writes (tracked writes): its
                                    // data is real, so let the write through.
                                    let page = (addr as u64) & !(PAGE - 1);
                                    served += 1;
                                    let _ = h.uffd.remove_write_protection(
                                        page as *mut libc::c_void,
                                        PAGE_LEN,
                                        true,
                                    );
                                }
                                Event::Pagefault { addr, .. } => {
                                    let page = (addr as u64) & !(PAGE - 1);
                                    served += 1;
                                    if poison(&h.uffd, page, 1) == 0 {
                                        // Present already (or gone): wake the waiter.
                                        let _ = h.uffd.wake(page as *mut libc::c_void, PAGE_LEN);
                                    }
                                }
                                Event::Fork { uffd } => born.push(Held {
                                    pid: h.pid,
                                    uffd,
                                    ranges: h.ranges.clone(),
                                }),
                                _ => {}
                            }
                        }
                    }
                    Err(userfaultfd::Error::ReadEof) => gone[i] = true,
                    Err(userfaultfd::Error::SystemError(e))
                        if e as i32 == libc::EAGAIN || e as i32 == libc::EINTR => {}
                    Err(_) => gone[i] = true,
                }
            }
        }
        if last_probe.elapsed() >= PROBE_EVERY {
            last_probe = Instant::now();
            for (i, h) in held.iter().enumerate() {
                let r = h.uffd.remove_write_protection(
                    PROBE_ADDR as *mut libc::c_void,
                    PAGE_LEN,
                    false,
                );
                if let Err(userfaultfd::Error::SystemError(e)) = r {
                    if e as i32 == libc::ESRCH {
                        gone[i] = true;
                    }
                }
            }
        }
        let mut i = 0;
        held.retain(|_| {
            let keep = !gone[i];
            i += 1;
            keep
        });
        for b in born {
            let mut b = b;
            let total: u64 = b
                .ranges
                .iter()
                .map(|&(s, e)| poison(&b.uffd, s, e.saturating_sub(s) / PAGE))
                .sum();
            b.ranges.shrink_to_fit();
            log(&format!(
                "forked task of pid {}: poisoned {total} pages",
                b.pid
            ));
            held.push(b);
        }
    }
    log(&format!("served {served} faults with poison"));
}

/// [`run_keeper`] on descriptor [`KEEPER_FD`], after closing every other inherited descriptor
/// above it. For the hidden keeper subcommand of a binary.
pub fn keeper_main() -> i32 {
    // SAFETY: close_range(2) takes no pointers; closing inherited descriptors we never use.
    unsafe {
        libc::syscall(libc::SYS_close_range, KEEPER_FD + 1, u32::MAX, 0u32);
    }
    // SAFETY: descriptor 3 was set up by `KeeperLink::spawn` for this process alone.
    let fd = unsafe { OwnedFd::from_raw_fd(KEEPER_FD) };
    run_keeper(fd)
}
