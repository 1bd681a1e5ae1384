//! Container stdio: pipes or a pty between the container and containerd's fifos.
//!
//! containerd hands the shim fifo paths (or `file://` URIs). The shim gives the container
//! anonymous pipes (or, for terminals, receives the pty master over a console socket) and copies
//! between them and the fifos on plain OS threads. Output fifos are opened read-write so a
//! reader going away never turns into SIGPIPE/EPIPE for the copy, and the container never sees
//! its stdout close. Copy threads hold a channel sender each; [`IoDone`] resolves when all output
//! has been copied, so TaskExit is published after the last byte.

use std::{
    fs::{File, OpenOptions},
    io::{Read, Write},
    os::{
        fd::{AsRawFd, OwnedFd},
        unix::{
            fs::OpenOptionsExt,
            net::{UnixListener, UnixStream},
        },
    },
    path::{Path, PathBuf},
    process::Stdio,
    sync::{Arc, Mutex},
    time::Duration,
};

use async_trait::async_trait;
use nix::{
    fcntl::OFlag,
    sys::eventfd::{EfdFlags, EventFd},
};

use crate::error::{Result, ShimError};

/// The fifo paths containerd gave for a process.
#[derive(Debug, Clone, Default)]
pub struct StdioPaths {
    pub stdin: String,
    pub stdout: String,
    pub stderr: String,
    pub terminal: bool,
}

/// Waits until every output copy thread has finished.
#[derive(Debug)]
pub struct IoDone(tokio::sync::mpsc::Receiver<()>);

impl IoDone {
    /// A handle plus the sender each copy thread keeps until it ends.
    pub fn new() -> (Self, tokio::sync::mpsc::Sender<()>) {
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        (IoDone(rx), tx)
    }

    /// Wait for all output to be copied, at most `limit` (daemonised children may hold pipes).
    pub async fn wait(mut self, limit: Duration) {
        let _ = tokio::time::timeout(limit, self.0.recv()).await;
    }
}

/// The container's ends of its stdio, handed to runc and dropped once runc has started.
#[derive(Debug, Default)]
pub struct ContainerStdio {
    stdin: Mutex<Option<OwnedFd>>,
    stdout: Mutex<Option<OwnedFd>>,
    stderr: Mutex<Option<OwnedFd>>,
}

impl ContainerStdio {
    fn stdio_of(slot: &Mutex<Option<OwnedFd>>) -> std::io::Result<Stdio> {
        match slot.lock().expect("stdio lock").as_ref() {
            Some(fd) => Ok(Stdio::from(fd.try_clone()?)),
            None => Ok(Stdio::null()),
        }
    }

    /// Stdio for a raw command (restore).
    pub fn stdio(&self) -> std::io::Result<(Stdio, Stdio, Stdio)> {
        Ok((
            Self::stdio_of(&self.stdin)?,
            Self::stdio_of(&self.stdout)?,
            Self::stdio_of(&self.stderr)?,
        ))
    }

    /// Drop the shim's copies of the container ends (so EOF reaches the copy threads).
    pub fn close(&self) {
        for s in [&self.stdin, &self.stdout, &self.stderr] {
            s.lock().expect("stdio lock").take();
        }
    }
}

#[async_trait]
impl runc::io::Io for ContainerStdio {
    async fn set(&self, cmd: &mut runc::Command) -> std::io::Result<()> {
        let (i, o, e) = self.stdio()?;
        cmd.stdin(i).stdout(o).stderr(e);
        Ok(())
    }

    async fn close_after_start(&self) {
        self.close();
    }
}

/// The shim's side of a process's stdio.
#[derive(Debug, Default)]
pub struct ShimStdio {
    /// Write end of the container's stdin (dropped by CloseIO).
    pub stdin: Arc<Mutex<Option<File>>>,
    /// Ends the stdin copy thread (set when there is one).
    stdin_stop: Option<Arc<EventFd>>,
    /// Pty master, for resize.
    pub console: Option<File>,
}

impl Drop for ShimStdio {
    /// The process is gone from the shim (deleted): its stdin copy thread must not outlive it.
    fn drop(&mut self) {
        self.close_stdin();
    }
}

impl ShimStdio {
    /// Close the container's stdin and end the stdin copy thread.
    pub fn close_stdin(&self) {
        self.stdin.lock().expect("stdin lock").take();
        if let Some(stop) = &self.stdin_stop {
            if let Err(e) = stop.write(1) {
                log::warn!("stop the stdin copy: {e}");
            }
        }
    }

    /// Resize the pty.
    pub fn resize(&self, width: u32, height: u32) -> Result<()> {
        let Some(c) = &self.console else {
            return Ok(());
        };
        let ws = libc::winsize {
            ws_row: u16::try_from(height).unwrap_or(u16::MAX),
            ws_col: u16::try_from(width).unwrap_or(u16::MAX),
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCSWINSZ reads a `winsize` from a valid pointer; the fd is an open pty master.
        let r = unsafe { libc::ioctl(c.as_raw_fd(), libc::TIOCSWINSZ, &ws) };
        if r < 0 {
            return Err(ShimError::io(
                "resize pty",
                "console",
                std::io::Error::last_os_error(),
            ));
        }
        Ok(())
    }
}

fn pipe() -> Result<(OwnedFd, OwnedFd)> {
    nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(|e| ShimError::io("create pipe", "", e.into()))
}

/// Open an output destination: a fifo read-write (never blocks, never EPIPE) or a `file://`.
fn open_output(uri: &str) -> Result<File> {
    if let Some(path) = uri.strip_prefix("file://") {
        if let Some(parent) = Path::new(path).parent() {
            std::fs::create_dir_all(parent).map_err(|e| ShimError::io("create", parent, e))?;
        }
        return OpenOptions::new()
            .append(true)
            .create(true)
            .open(path)
            .map_err(|e| ShimError::io("open log file", path, e));
    }
    if uri.contains("://") {
        return Err(ShimError::InvalidArgument(format!(
            "unsupported stdio uri {uri} (fifo paths and file:// are supported)"
        )));
    }
    OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(uri)
        .map_err(|e| ShimError::io("open fifo", uri, e))
}

/// Copy `src` to `dst` until EOF/EIO, on a thread; `done` is dropped at the end.
fn spawn_output_copy(
    name: &str,
    mut src: File,
    mut dst: File,
    done: tokio::sync::mpsc::Sender<()>,
) -> Result<()> {
    std::thread::Builder::new()
        .name(format!("io-{name}"))
        .spawn(move || {
            let mut buf = vec![0u8; 32 * 1024];
            loop {
                match src.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => {
                        if dst.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(_) => break, // EIO once the pty slave closes
                }
            }
            drop(done);
        })
        .map_err(|e| ShimError::io("spawn io thread", name, e))?;
    Ok(())
}

/// Copy the stdin fifo into `dst` (shared so CloseIO can drop it) on a thread; the returned
/// eventfd ends the thread (see [`ShimStdio::close_stdin`]).
///
/// The fifo is opened non-blocking and waited on with poll(2) together with the stop eventfd:
/// a blocking open or read would keep the thread (and the write end it holds) until a client
/// writes and closes, which a detached container's client never does, so every such process
/// would leave a thread and a pipe behind in a shim serving many containers. A fifo opened
/// for reading reports POLLHUP only once a writer came and went, so "no client yet" still
/// waits and "client closed" is EOF, as with the blocking calls.
fn spawn_stdin_copy(path: String, dst: Arc<Mutex<Option<File>>>) -> Result<Arc<EventFd>> {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    use std::os::fd::AsFd;
    let stop = Arc::new(
        EventFd::from_value_and_flags(0, EfdFlags::EFD_CLOEXEC)
            .map_err(|e| ShimError::io("create stdin stop eventfd for", &path, e.into()))?,
    );
    let stopped = stop.clone();
    std::thread::Builder::new()
        .name("io-stdin".into())
        .spawn(move || {
            let Ok(mut src) = OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
                .open(&path)
            else {
                return;
            };
            let mut buf = vec![0u8; 32 * 1024];
            loop {
                let mut fds = [
                    PollFd::new(src.as_fd(), PollFlags::POLLIN),
                    PollFd::new(stopped.as_fd(), PollFlags::POLLIN),
                ];
                match poll(&mut fds, PollTimeout::NONE) {
                    Ok(_) | Err(nix::errno::Errno::EINTR) => {}
                    Err(_) => break,
                }
                if fds[1].revents().is_some_and(|r| !r.is_empty()) {
                    // CloseIO or delete: the owner has dropped (or is dropping) the write end.
                    return;
                }
                if fds[0].revents().is_none_or(|r| r.is_empty()) {
                    continue;
                }
                let n = match src.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => n,
                    Err(e)
                        if matches!(
                            e.kind(),
                            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted
                        ) =>
                    {
                        continue
                    }
                    Err(_) => break,
                };
                let mut guard = dst.lock().expect("stdin lock");
                match guard.as_mut() {
                    Some(f) => {
                        if f.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                    None => return,
                }
            }
            dst.lock().expect("stdin lock").take();
        })
        .map_err(|e| ShimError::io("spawn io thread", "stdin", e))?;
    Ok(stop)
}

/// Pipes for a non-terminal process: the container's ends and the running copy threads.
pub fn setup_pipes(paths: &StdioPaths) -> Result<(ContainerStdio, ShimStdio, IoDone)> {
    let (done, tx) = IoDone::new();
    let cs = ContainerStdio::default();
    let mut ss = ShimStdio::default();
    if !paths.stdin.is_empty() {
        let (r, w) = pipe()?;
        *cs.stdin.lock().expect("stdio lock") = Some(r);
        *ss.stdin.lock().expect("stdin lock") = Some(File::from(w));
        ss.stdin_stop = Some(spawn_stdin_copy(paths.stdin.clone(), ss.stdin.clone())?);
    }
    for (name, uri, slot) in [
        ("stdout", &paths.stdout, &cs.stdout),
        ("stderr", &paths.stderr, &cs.stderr),
    ] {
        if uri.is_empty() {
            continue;
        }
        let dst = open_output(uri)?;
        let (r, w) = pipe()?;
        *slot.lock().expect("stdio lock") = Some(w);
        spawn_output_copy(name, File::from(r), dst, tx.clone())?;
    }
    Ok((cs, ss, done))
}

/// A console socket runc connects to and sends the pty master over.
#[derive(Debug)]
pub struct ConsoleSocket {
    dir: tempfile::TempDir,
    listener: UnixListener,
}

impl ConsoleSocket {
    /// Listen on a fresh socket under the temp dir (short path, below the sun_path limit).
    pub fn new() -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("dp-pty")
            .tempdir()
            .map_err(|e| ShimError::io("create console dir", std::env::temp_dir(), e))?;
        let path = dir.path().join("pty.sock");
        let listener =
            UnixListener::bind(&path).map_err(|e| ShimError::io("bind console", &path, e))?;
        Ok(Self { dir, listener })
    }

    /// The socket path for `--console-socket`.
    pub fn path(&self) -> PathBuf {
        self.dir.path().join("pty.sock")
    }

    /// Accept runc's connection and receive the pty master (blocking; run off the runtime).
    pub fn receive(self, timeout: Duration) -> Result<File> {
        let path = self.path();
        self.listener
            .set_nonblocking(true)
            .map_err(|e| ShimError::io("console", &path, e))?;
        let deadline = std::time::Instant::now() + timeout;
        let stream: UnixStream = loop {
            match self.listener.accept() {
                Ok((s, _)) => break s,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if std::time::Instant::now() > deadline {
                        return Err(ShimError::io(
                            "no pty master received on",
                            &path,
                            std::io::Error::from(std::io::ErrorKind::TimedOut),
                        ));
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(e) => return Err(ShimError::io("accept console", &path, e)),
            }
        };
        stream
            .set_nonblocking(false)
            .map_err(|e| ShimError::io("console", &path, e))?;
        recv_fd(&stream).map_err(|e| ShimError::io("receive pty master on", &path, e))
    }
}

fn recv_fd(stream: &UnixStream) -> std::io::Result<File> {
    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
    use std::os::fd::FromRawFd;
    let mut buf = [0u8; 4096];
    let mut iov = [std::io::IoSliceMut::new(&mut buf)];
    let mut cmsg = nix::cmsg_space!([std::os::fd::RawFd; 1]);
    let msg = recvmsg::<()>(
        stream.as_raw_fd(),
        &mut iov,
        Some(&mut cmsg),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )?;
    for c in msg.cmsgs()? {
        if let ControlMessageOwned::ScmRights(fds) = c {
            if let Some(&fd) = fds.first() {
                // SAFETY: the kernel just installed `fd` in our table via SCM_RIGHTS; we own it.
                return Ok(unsafe { File::from_raw_fd(fd) });
            }
        }
    }
    Err(std::io::Error::new(
        std::io::ErrorKind::InvalidData,
        "no file descriptor in console message",
    ))
}

/// Start copying between a received pty master and the fifos.
pub fn setup_console(paths: &StdioPaths, master: File) -> Result<(ShimStdio, IoDone)> {
    let (done, tx) = IoDone::new();
    let mut ss = ShimStdio::default();
    if !paths.stdin.is_empty() {
        let w = master
            .try_clone()
            .map_err(|e| ShimError::io("dup pty", "console", e))?;
        *ss.stdin.lock().expect("stdin lock") = Some(w);
        ss.stdin_stop = Some(spawn_stdin_copy(paths.stdin.clone(), ss.stdin.clone())?);
    }
    if !paths.stdout.is_empty() {
        let dst = open_output(&paths.stdout)?;
        let r = master
            .try_clone()
            .map_err(|e| ShimError::io("dup pty", "console", e))?;
        spawn_output_copy("console", r, dst, tx)?;
    }
    ss.console = Some(master);
    Ok((ss, done))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn pipes_copy_to_fifo_and_finish() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        nix::unistd::mkfifo(&out, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let paths = StdioPaths {
            stdout: out.display().to_string(),
            ..Default::default()
        };
        // A reader like containerd's. It reports over a channel so a lost EOF fails the test
        // within a bound instead of hanging it (unit tests share the process with others).
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn({
            let out = out.clone();
            move || {
                let _ = tx.send(std::fs::read(out).map_err(|e| e.to_string()));
            }
        });
        let (cs, _ss, done) = setup_pipes(&paths).unwrap();
        let (_, o, _) = cs.stdio().unwrap();
        cs.close();
        let mut child = std::process::Command::new("/bin/echo")
            .arg("hello")
            .stdout(o)
            .spawn()
            .unwrap();
        child.wait().unwrap();
        done.wait(Duration::from_secs(5)).await;
        // The shim keeps its read-write fd open only inside the (finished) thread, so the
        // reader sees EOF now.
        let got = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("the fifo reader saw no EOF within 30 s")
            .unwrap();
        assert_eq!(got, b"hello\n");
    }

    /// Waits up to 5 s for the last strong reference of `w` to go.
    fn gone<T>(w: &std::sync::Weak<T>) -> bool {
        let until = std::time::Instant::now() + Duration::from_secs(5);
        while w.upgrade().is_some() {
            if std::time::Instant::now() > until {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        true
    }

    fn stdin_fifo(dir: &Path) -> String {
        let p = dir.join("stdin");
        nix::unistd::mkfifo(&p, nix::sys::stat::Mode::S_IRWXU).unwrap();
        p.display().to_string()
    }

    #[test]
    fn stdin_copy_ends_when_the_process_is_dropped_without_a_client() {
        // A detached container: no client ever opens the stdin fifo.
        let dir = tempfile::tempdir().unwrap();
        let paths = StdioPaths {
            stdin: stdin_fifo(dir.path()),
            ..Default::default()
        };
        let (cs, ss, _done) = setup_pipes(&paths).unwrap();
        let copy = Arc::downgrade(&ss.stdin);
        std::thread::sleep(Duration::from_millis(50));
        assert!(copy.upgrade().is_some(), "the copy thread ended on its own");
        drop(ss);
        assert!(gone(&copy), "the stdin copy thread outlived its process");
        // The container's stdin sees EOF.
        let mut r = File::from(cs.stdin.lock().unwrap().take().unwrap());
        let mut got = Vec::new();
        r.read_to_end(&mut got).unwrap();
        assert!(got.is_empty());
    }

    #[test]
    fn stdin_is_copied_until_the_client_closes() {
        let dir = tempfile::tempdir().unwrap();
        let paths = StdioPaths {
            stdin: stdin_fifo(dir.path()),
            ..Default::default()
        };
        let (cs, ss, _done) = setup_pipes(&paths).unwrap();
        let mut r = File::from(cs.stdin.lock().unwrap().take().unwrap());
        // The client connects a little later, writes and closes.
        std::thread::sleep(Duration::from_millis(50));
        let mut w = OpenOptions::new().write(true).open(&paths.stdin).unwrap();
        w.write_all(b"hello").unwrap();
        drop(w);
        let mut got = Vec::new();
        r.read_to_end(&mut got).unwrap();
        assert_eq!(got, b"hello");
        // EOF reached the container: the thread dropped the write end and ended.
        assert!(ss.stdin.lock().unwrap().is_none());
        let until = std::time::Instant::now() + Duration::from_secs(5);
        while Arc::strong_count(&ss.stdin) > 1 && std::time::Instant::now() < until {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(
            Arc::strong_count(&ss.stdin),
            1,
            "the copy thread still runs"
        );
    }

    #[test]
    fn unsupported_uri_is_rejected() {
        let e = open_output("binary:///bin/logger").unwrap_err();
        assert!(matches!(e, ShimError::InvalidArgument(_)));
    }

    #[test]
    fn file_uri_appends() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("sub/log");
        let mut f = open_output(&format!("file://{}", p.display())).unwrap();
        f.write_all(b"x").unwrap();
        assert_eq!(std::fs::read(p).unwrap(), b"x");
    }
}
