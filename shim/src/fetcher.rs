//! The production [`LazyBackend`]: the engine's in-process userfaultfd fetcher (`native`, the
//! default) or CRIU's own `criu lazy-pages` daemon (`criu`, the fallback and baseline).
//!
//! Both listen on `<work>/lazy-pages.socket` before `runc restore --lazy-pages` runs; pages
//! come from the local checkpoint directory (the embedded default of DESIGN.md).

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use distriproc_config::{FetcherConfig, FetcherMode};
use distriproc_runtime::{
    fetcher::{FetcherHandle, FetcherOptions, LazyPagesServer},
    source::LocalImages,
};

use crate::{
    error::{Result, ShimError},
    lazy::{LazyBackend, LazySession},
};

/// How long `criu lazy-pages --daemon` may take to listen.
const CRIU_DAEMON_START: Duration = Duration::from_secs(10);

/// The lazy backend used by the shim.
pub fn backend() -> Option<Arc<dyn LazyBackend>> {
    Some(Arc::new(Fetchers))
}

/// Chooses the fetcher by `cfg.mode`.
#[derive(Debug, Default)]
pub struct Fetchers;

/// The error and its sources, joined with ": ".
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

impl LazyBackend for Fetchers {
    fn is_lazy(&self) -> bool {
        true
    }

    fn start(
        &self,
        work: &Path,
        images: &Path,
        cfg: &FetcherConfig,
    ) -> Result<Box<dyn LazySession>> {
        match cfg.mode {
            FetcherMode::Native => start_native(work, images, cfg),
            FetcherMode::Criu => start_criu(work, images),
        }
    }
}

fn start_native(work: &Path, images: &Path, cfg: &FetcherConfig) -> Result<Box<dyn LazySession>> {
    let fail = |what: &str, e: &dyn std::error::Error| {
        ShimError::Other(format!(
            "lazy restore from {}: {what}: {}",
            images.display(),
            chain(e)
        ))
    };
    let source = LocalImages::open(images).map_err(|e| fail("open images", &e))?;
    let opts = FetcherOptions::from_config(cfg);
    let server = LazyPagesServer::bind(work, images, Arc::new(source), opts)
        .map_err(|e| fail("bind lazy-pages socket", &e))?;
    let handle = server.spawn().map_err(|e| fail("start fetcher", &e))?;
    Ok(Box::new(Native(handle)))
}

struct Native(FetcherHandle);

impl LazySession for Native {
    fn stats_json(&self) -> String {
        serde_json::to_string(&self.0.stats()).unwrap_or_default()
    }
    fn stop(&self) {
        self.0.stop();
    }
    fn finished(&self) -> bool {
        self.0.is_finished()
    }
    fn wait(self: Box<Self>) -> std::result::Result<String, String> {
        match self.0.wait() {
            Ok(s) => Ok(serde_json::to_string(&s).unwrap_or_default()),
            Err(e) => Err(chain(&e)),
        }
    }
}

/// `criu lazy-pages --daemon` serving from the images directory.
fn start_criu(work: &Path, images: &Path) -> Result<Box<dyn LazySession>> {
    let socket = work.join("lazy-pages.socket");
    let _ = std::fs::remove_file(&socket);
    let pidfile = work.join("lazy-pages.pid");
    let _ = std::fs::remove_file(&pidfile);
    // The daemon's parent exits once the socket listens; the shim's reaper collects it, so
    // readiness is judged by the socket and the pid file, not by waiting on the child.
    Command::new("criu")
        .arg("lazy-pages")
        .arg("--images-dir")
        .arg(images)
        .arg("--work-dir")
        .arg(work)
        .args(["--daemon", "--pidfile"])
        .arg(&pidfile)
        .arg("-o")
        .arg(work.join("lazy-pages.log"))
        .arg("-v4")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
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
            return Err(ShimError::Other(format!(
                "criu lazy-pages did not listen on {} within {:?} (see {})",
                socket.display(),
                CRIU_DAEMON_START,
                work.join("lazy-pages.log").display()
            )));
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

    /// `{"mode":"criu","pages_transferred":n,"pages_total":m}` from the daemon's log.
    fn stats(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let (n, m) = parse_transferred(&text).unwrap_or((0, 0));
        format!(
            "{{\"mode\":\"criu\",\"pages_transferred\":{n},\"pages_total\":{m},\"finished\":{}}}",
            !self.alive()
        )
    }
}

impl LazySession for CriuDaemon {
    fn stats_json(&self) -> String {
        self.stats()
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
    fn wait(self: Box<Self>) -> std::result::Result<String, String> {
        while self.alive() {
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(self.stats())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_joins_sources() {
        let inner = std::io::Error::other("inner");
        let e = ShimError::io("open", "/x", inner);
        assert_eq!(chain(&e), "open /x: inner: inner");
    }

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
        ) {
            Ok(_) => panic!("started on a missing checkpoint"),
            Err(e) => e,
        };
        let msg = e.to_string();
        assert!(msg.contains("no-such-checkpoint"), "{msg}");
    }
}
