//! The production [`LazyBackend`]: the engine's in-process userfaultfd fetcher (`native`, the
//! default) or CRIU's own `criu lazy-pages` daemon (`criu`, the fallback and baseline).
//!
//! Both listen on `<work>/lazy-pages.socket` before `runc restore --lazy-pages` runs; pages
//! come from the local checkpoint directory (the embedded default) or, for a
//! remote checkpoint, from the page server: `RemotePages` in native mode, and in criu mode a
//! connection the shim opens and authenticates itself (`HELLO_CRIU`) and hands to
//! `criu lazy-pages --page-server --ps-socket FD`. Either way the server's digest of the
//! checkpoint must match the reference before the restore goes on. In native mode one session
//! stays open while the fetcher runs ([`REMOTE_KEEPALIVE`]): it is the checkpoint's lease at
//! the page server, whose retention leaves a checkpoint alone while a session reads it.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use distriproc_config::{FetcherConfig, FetcherMode};
use distriproc_runtime::{
    error_chain,
    fetcher::{keeper::KeeperLink, FetchError, FetcherHandle, FetcherOptions, LazyPagesServer},
    protocol::upload::MemoryDigest,
    remote::{open_criu_session, Endpoint, RemoteOptions, RemotePages},
    source::{LocalImages, PageSource},
};

use crate::{
    error::{Result, ShimError},
    lazy::{
        CriuStats, LazyBackend, LazySession, NativeStats, PagesFrom, RemoteSession, RemoteSlot,
        RemoteSummary, SessionStats,
    },
};

/// How long `criu lazy-pages --daemon` may take to listen.
const CRIU_DAEMON_START: Duration = Duration::from_secs(10);

/// The hidden subcommand that makes the shim binary a uffd keeper.
pub const KEEPER_ARG: &str = "distriproc-uffd-keeper";
/// The keeper's log, in the restore's work dir.
pub const KEEPER_LOG: &str = "uffd-keeper.log";

/// Starts this binary as the uffd keeper of one lazy restore (see
/// `distriproc_runtime::fetcher::keeper`): it holds a duplicate of every task uffd, so a shim
/// killed mid-restore leaves the tasks faulting into poison (SIGBUS), never into zero pages.
pub fn spawn_keeper(work: &Path) -> Result<Arc<KeeperLink>> {
    // /proc/self/exe, not the path it names: a shim serving a group outlives upgrades of its
    // binary, and once the file is replaced that path names another program or none
    // ("... (deleted)"); the link still executes the binary this shim runs.
    let exe = Path::new("/proc/self/exe");
    let name = std::env::current_exe()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| "containerd-shim-distriproc-v2".into());
    let log = work.join(KEEPER_LOG);
    let stderr = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log)
        .map_err(|e| ShimError::io("open the uffd keeper log", &log, e))?;
    let mut cmd = Command::new(exe);
    std::os::unix::process::CommandExt::arg0(&mut cmd, name.trim_end_matches(" (deleted)"));
    cmd.arg(KEEPER_ARG).stderr(stderr);
    let k = KeeperLink::spawn(cmd).map_err(|e| ShimError::LazyRestore {
        from: format!("in {}", work.display()),
        detail: error_chain(&e),
    })?;
    log::info!(
        "uffd keeper pid {} holds the userfaultfds of the restore in {} (log {})",
        k.pid(),
        work.display(),
        log.display()
    );
    Ok(Arc::new(k))
}

/// The lazy backend used by the shim.
pub fn backend() -> Option<Arc<dyn LazyBackend>> {
    Some(Arc::new(Fetchers))
}

/// Chooses the fetcher by `cfg.mode`.
#[derive(Debug, Default)]
pub struct Fetchers;

impl LazyBackend for Fetchers {
    fn is_lazy(&self) -> bool {
        true
    }

    fn start(
        &self,
        work: &Path,
        images: &Path,
        cfg: &FetcherConfig,
        pages: &PagesFrom,
        memory_limit: u64,
    ) -> Result<Box<dyn LazySession>> {
        match cfg.mode {
            FetcherMode::Native => start_native(work, images, cfg, pages, memory_limit),
            FetcherMode::Criu => start_criu(work, images, pages),
        }
    }
}

/// How often an otherwise idle page-server session of a restore is used, so that it stays
/// open (the server's `io_timeout_ms`, 60 s by default, must be longer).
pub(crate) const REMOTE_KEEPALIVE: std::time::Duration = std::time::Duration::from_secs(15);

fn remote_fail(endpoint: &Endpoint, opts: &RemoteOptions, e: &dyn std::error::Error) -> ShimError {
    ShimError::RemoteCheckpoint {
        checkpoint: opts.checkpoint.clone(),
        endpoint: endpoint.to_string(),
        detail: error_chain(e),
    }
}

/// A native session to the page server whose copy of the checkpoint has digest `expect`.
pub(crate) fn connect_verified(
    endpoint: &Endpoint,
    opts: &RemoteOptions,
    expect: MemoryDigest,
) -> Result<RemotePages> {
    let rp = RemotePages::connect(endpoint.clone(), opts.clone())
        .map_err(|e| remote_fail(endpoint, opts, &e))?;
    let found = rp.info().map_err(|e| remote_fail(endpoint, opts, &e))?;
    check_digest(endpoint, opts, found, expect)?;
    Ok(rp)
}

/// Fails unless the server's digest of the checkpoint is `expect`.
fn check_digest(
    endpoint: &Endpoint,
    opts: &RemoteOptions,
    found: MemoryDigest,
    expect: MemoryDigest,
) -> Result<()> {
    if found == expect {
        return Ok(());
    }
    Err(ShimError::RemoteCheckpoint {
        checkpoint: opts.checkpoint.clone(),
        endpoint: endpoint.to_string(),
        detail: format!(
            "the server holds {}, the reference file says {}: not the memory of this checkpoint",
            found.to_message(),
            expect.to_message()
        ),
    })
}

fn start_native(
    work: &Path,
    images: &Path,
    cfg: &FetcherConfig,
    pages: &PagesFrom,
    memory_limit: u64,
) -> Result<Box<dyn LazySession>> {
    let fail = |what: &str, e: &dyn std::error::Error| ShimError::LazyRestore {
        from: format!("from {}", images.display()),
        detail: format!("{what}: {}", error_chain(e)),
    };
    let (source, remote): (Arc<dyn PageSource>, Option<Arc<RemotePages>>) = match pages {
        PagesFrom::Local => (
            Arc::new(LocalImages::open(images).map_err(|e| fail("open images", &e))?),
            None,
        ),
        PagesFrom::Store(entry) => (
            Arc::new(LocalImages::open(&entry.dir).map_err(|e| fail("open the store entry", &e))?),
            None,
        ),
        PagesFrom::Remote {
            endpoint,
            opts,
            expect,
        } => {
            let rp = Arc::new(connect_verified(endpoint, opts, *expect)?);
            (rp.clone(), Some(rp))
        }
    };
    // While memory stays remote the session is the checkpoint's lease at the server.
    let remote = RemoteSlot::new(remote.map(|pages| RemoteSession {
        lease: pages.keep_alive(REMOTE_KEEPALIVE),
        pages,
    }));
    let opts = FetcherOptions {
        memory_limit,
        ..FetcherOptions::from_config(cfg)
    };
    let server = LazyPagesServer::bind(work, images, source.clone(), opts)
        .map_err(|e| fail("bind lazy-pages socket", &e))?;
    let keeper = spawn_keeper(work)?;
    let handle = server
        .with_keeper(keeper.clone())
        .spawn()
        .map_err(|e| fail("start fetcher", &e))?;
    let entry = match pages {
        PagesFrom::Store(e) => Some(e.clone()),
        _ => None,
    };
    drop(source);
    Ok(Box::new(Native {
        handle,
        remote,
        keeper,
        _entry: entry,
    }))
}

struct Native {
    handle: FetcherHandle,
    /// The page-server session (and its lease) while the fetcher runs, when pages are remote.
    remote: RemoteSlot,
    /// Released when the fill ends well, abandoned (poison server) otherwise.
    keeper: Arc<KeeperLink>,
    /// Keeps the node-local store entry leased while the fetcher runs.
    _entry: Option<Arc<crate::store::Entry>>,
}

/// The session's statistics: the fetcher's, and the page-server client's when pages are remote.
fn session_stats(
    stats: distriproc_runtime::fetcher::FetchStats,
    remote: Option<&Arc<RemotePages>>,
) -> SessionStats {
    SessionStats::Native(Box::new(NativeStats {
        fetch: stats,
        remote: remote.map(|r| RemoteSummary {
            endpoint: r.endpoint().to_string(),
            checkpoint: r.checkpoint().to_owned(),
            counters: r.stats(),
        }),
    }))
}

impl LazySession for Native {
    fn checkpoint_view(&self) -> Option<crate::lazy::CheckpointView> {
        Some(crate::lazy::CheckpointView {
            probe: self.handle.residency_probe(),
            remote: self.remote.clone(),
        })
    }
    fn enable_eviction(&self, init_pid: i32) -> std::result::Result<(), FetchError> {
        self.handle.enable_eviction(init_pid)
    }
    fn stats(&self) -> SessionStats {
        session_stats(self.handle.stats(), self.remote.pages().as_ref())
    }
    fn stop(&self) {
        self.handle.stop();
    }
    fn finished(&self) -> bool {
        self.handle.is_finished()
    }
    fn wait(self: Box<Self>) -> std::result::Result<SessionStats, FetchError> {
        let Native {
            handle,
            remote,
            keeper,
            ..
        } = *self;
        let r = match handle.wait() {
            Ok(s) => {
                keeper.release();
                Ok(session_stats(s, remote.pages().as_ref()))
            }
            Err(e) => {
                keeper.abandon();
                Err(e)
            }
        };
        // Nothing is remote any more: the lease ends with the fetcher, although the
        // container's checkpoint view still shares the slot.
        remote.clear();
        r
    }
}

/// `criu lazy-pages --daemon` serving from the images directory, or from the page server on a
/// connection the shim opened and authenticated (`--page-server --ps-socket FD`).
fn start_criu(work: &Path, images: &Path, pages: &PagesFrom) -> Result<Box<dyn LazySession>> {
    let socket = work.join("lazy-pages.socket");
    let _ = std::fs::remove_file(&socket);
    let pidfile = work.join("lazy-pages.pid");
    let _ = std::fs::remove_file(&pidfile);
    // The daemon's parent exits once the socket listens; the shim's reaper collects it, so
    // readiness is judged by the socket and the pid file, not by waiting on the child.
    let mut cmd = Command::new("criu");
    // A store checkpoint's pages are in its store entry, not in containerd's directory.
    let pages_dir = match pages {
        PagesFrom::Store(entry) => entry.dir.as_path(),
        _ => images,
    };
    cmd.arg("lazy-pages")
        .arg("--images-dir")
        .arg(pages_dir)
        .arg("--work-dir")
        .arg(work)
        .args(["--daemon", "--pidfile"])
        .arg(&pidfile)
        .arg("-o")
        .arg(work.join("lazy-pages.log"))
        .arg("-v4")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    // Keeps the page-server connection open in the shim until the daemon has inherited it.
    let _socket = match pages {
        PagesFrom::Local | PagesFrom::Store(_) => None,
        PagesFrom::Remote {
            endpoint,
            opts,
            expect,
        } => {
            // The digest check needs a native session; CRIU's own session has no such request.
            drop(connect_verified(endpoint, opts, *expect)?);
            let fd =
                open_criu_session(endpoint, opts).map_err(|e| remote_fail(endpoint, opts, &e))?;
            let raw = std::os::fd::AsRawFd::as_raw_fd(&fd);
            cmd.args(["--page-server", "--ps-socket", &raw.to_string()]);
            // SAFETY: only the async-signal-safe fcntl runs in the child, on a descriptor this
            // function owns and keeps open until after spawn.
            unsafe {
                std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || {
                    if libc::fcntl(raw, libc::F_SETFD, 0) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
            Some(fd)
        }
    };
    cmd.spawn()
        .map_err(|e| ShimError::io("run criu lazy-pages for", images, e))?;
    let deadline = Instant::now() + CRIU_DAEMON_START;
    let read_pid = || {
        std::fs::read_to_string(&pidfile)
            .ok()
            .and_then(|s| s.trim().parse::<i32>().ok())
            .filter(|p| *p > 0)
    };
    let pid = loop {
        if let (true, Some(pid)) = (socket.exists(), read_pid()) {
            break pid;
        }
        if Instant::now() > deadline {
            return Err(ShimError::LazyRestore {
                from: format!("in {}", work.display()),
                detail: format!(
                    "criu lazy-pages did not listen on {} within {:?} (see {})",
                    socket.display(),
                    CRIU_DAEMON_START,
                    work.join("lazy-pages.log").display()
                ),
            });
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    Ok(Box::new(CriuDaemon {
        pid,
        log: work.join("lazy-pages.log"),
    }))
}

/// The last "UFFD transferred pages: (n/m)" of a `criu lazy-pages` log.
fn parse_transferred(log: &str) -> Option<(u64, u64)> {
    let l = log
        .lines()
        .rev()
        .find(|l| l.contains("UFFD transferred pages:"))?;
    let rest = l.split("UFFD transferred pages:").nth(1)?.trim();
    let inner = rest.strip_prefix('(')?.split(')').next()?;
    let (a, b) = inner.split_once('/')?;
    Some((a.trim().parse().ok()?, b.trim().parse().ok()?))
}

struct CriuDaemon {
    pid: i32,
    log: PathBuf,
}

impl CriuDaemon {
    fn alive(&self) -> bool {
        self.pid > 0
            && nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid), None).is_ok()
            && !std::fs::read_to_string(format!("/proc/{}/stat", self.pid))
                .map(|s| s.contains(") Z "))
                .unwrap_or(true)
    }

    /// Pages transferred and to transfer, from the daemon's log.
    fn criu_stats(&self) -> SessionStats {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let (n, m) = parse_transferred(&text).unwrap_or((0, 0));
        SessionStats::Criu(CriuStats {
            mode: "criu",
            pages_transferred: n,
            pages_total: m,
            finished: !self.alive(),
        })
    }
}

impl LazySession for CriuDaemon {
    fn stats(&self) -> SessionStats {
        self.criu_stats()
    }
    fn stop(&self) {
        if self.pid > 0 {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(self.pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
    fn finished(&self) -> bool {
        !self.alive()
    }
    fn wait(self: Box<Self>) -> std::result::Result<SessionStats, FetchError> {
        while self.alive() {
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(self.criu_stats())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn criu_log_transferred_pages() {
        let log = "(00.1) uffd: 1-12: uffd_copy: 0x7fff/12288\n\
                   (00.179580) uffd: 1-12: UFFD transferred pages: (8/8)\n";
        assert_eq!(parse_transferred(log), Some((8, 8)));
        assert_eq!(parse_transferred("(00.1) nothing"), None);
    }

    #[test]
    fn native_start_on_missing_images_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let e = match Fetchers.start(
            dir.path(),
            &dir.path().join("no-such-checkpoint"),
            &FetcherConfig::default(),
            &PagesFrom::Local,
            0,
        ) {
            Ok(_) => panic!("started on a missing checkpoint"),
            Err(e) => e,
        };
        let msg = e.to_string();
        assert!(msg.contains("no-such-checkpoint"), "{msg}");
    }
}
