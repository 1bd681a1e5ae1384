//! The seam between a restoring shim and the lazy-pages engine.
//!
//! [`LazyBackend`] starts a page fetcher listening on `<work>/lazy-pages.socket` before
//! `runc restore --lazy-pages` runs; [`LazySession`] is the running fetcher. The production
//! backend wraps `distriproc_runtime::fetcher`; [`EagerOnly`] makes every restore eager (used
//! when lazy restore is switched off, and in tests). [`spawn_waiter`] is the per-restore thread
//! that keeps `<bundle>/distriproc-lazy-stats.json` current, logs one summary line at the end and
//! removes containerd's temporary `ctrd-checkpoint*` directory once pages are no longer needed.

use std::{
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use distriproc_config::FetcherConfig;
use distriproc_runtime::protocol::upload::MemoryDigest;
use distriproc_runtime::remote::{Endpoint, RemoteOptions};

use crate::error::Result;

/// File in the bundle with the fetcher's statistics (FetchStats as JSON).
pub const STATS_FILE: &str = "distriproc-lazy-stats.json";

/// Where a restore's pages come from.
#[derive(Debug, Clone)]
pub enum PagesFrom {
    /// `pages-*.img` of the checkpoint directory (the embedded default).
    Local,
    /// The page server (a remote checkpoint, `crate::remote`).
    Remote {
        /// The page server.
        endpoint: Endpoint,
        /// Checkpoint id, token, timeouts.
        opts: Box<RemoteOptions>,
        /// What the server must hold for the checkpoint (from the reference file).
        expect: MemoryDigest,
    },
}

/// Starts page fetchers for lazy restores.
pub trait LazyBackend: Send + Sync {
    /// Whether restores through this backend are lazy at all.
    fn is_lazy(&self) -> bool;
    /// Listen on `<work>/lazy-pages.socket` and start serving pages of `images` as `cfg` says
    /// (mode, fill policy, tuning), with page data from `pages`.
    fn start(
        &self,
        work: &Path,
        images: &Path,
        cfg: &FetcherConfig,
        pages: &PagesFrom,
    ) -> Result<Box<dyn LazySession>>;
}

/// A running fetcher.
pub trait LazySession: Send {
    /// Current statistics as JSON.
    fn stats_json(&self) -> String;
    /// Abandon the restore (runc restore failed).
    fn stop(&self);
    /// Whether the fill has ended (the next `wait` returns at once).
    fn finished(&self) -> bool;
    /// Wait for the end of the fill; final statistics as JSON, or the error text.
    fn wait(self: Box<Self>) -> std::result::Result<String, String>;
}

/// No lazy restore: runc restores eagerly.
#[derive(Debug, Default)]
pub struct EagerOnly;

impl LazyBackend for EagerOnly {
    fn is_lazy(&self) -> bool {
        false
    }

    fn start(
        &self,
        _: &Path,
        _: &Path,
        _: &FetcherConfig,
        _: &PagesFrom,
    ) -> Result<Box<dyn LazySession>> {
        Err(crate::error::ShimError::Unimplemented("lazy restore"))
    }
}

/// Remove `dir` if it is one of containerd's restore temp dirs (`ctrd-checkpoint*`).
pub fn remove_if_temp_checkpoint(dir: &Path) {
    let is_temp = dir
        .file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with("ctrd-checkpoint"));
    if is_temp {
        if let Err(e) = std::fs::remove_dir_all(dir) {
            log::warn!("remove checkpoint dir {}: {e}", dir.display());
        }
    }
}

fn write_stats(path: &Path, json: &str) {
    let tmp = path.with_extension("json.tmp");
    if std::fs::write(&tmp, json).is_ok() {
        let _ = std::fs::rename(&tmp, path);
    }
}

/// One line from FetchStats JSON: the counters people look at first.
pub fn summary(json: &str) -> String {
    let v: serde_json::Value = serde_json::from_str(json).unwrap_or_default();
    let n = |k: &str| v.get(k).and_then(|x| x.as_u64()).unwrap_or(0);
    let ms = |k: &str| {
        v.get(k)
            .and_then(|x| x.as_u64())
            .map_or_else(|| "-".to_owned(), |us| format!("{}ms", us / 1000))
    };
    if v.get("mode").and_then(|m| m.as_str()) == Some("criu") {
        return format!(
            "criu lazy-pages transferred {}/{} pages",
            n("pages_transferred"),
            n("pages_total")
        );
    }
    format!(
        "faults={} pages faulted/prefetched/filled/zero={}/{}/{}/{} bytes={} tasks={} \
         first_fault={} fill_complete={} fault_p99={}us",
        n("faults"),
        n("pages_faulted"),
        n("pages_prefetched"),
        n("pages_filled"),
        n("zero_pages"),
        n("bytes"),
        n("tasks"),
        ms("time_to_first_fault_us"),
        ms("fill_complete_us"),
        v.pointer("/fault_latency_us/p99")
            .and_then(|x| x.as_u64())
            .unwrap_or(0),
    )
}

/// The thread watching a lazy restore; [`Waiter::finish`] ends it when the container goes away.
#[derive(Debug)]
pub struct Waiter {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Waiter {
    /// Ask the fetcher to end if it still runs (its tasks are gone) and wait up to `limit` for
    /// the summary line, the final stats and the checkpoint clean-up.
    pub fn finish(mut self, limit: Duration) {
        self.stop.store(true, Ordering::SeqCst);
        let Some(t) = self.thread.take() else { return };
        let deadline = Instant::now() + limit;
        while !t.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        if t.is_finished() {
            let _ = t.join();
        }
    }
}

/// Watch a session on its own thread until the fill ends: stats file every second, one
/// summary line at the end, then the temporary checkpoint dir is removed.
pub fn spawn_waiter(
    id: String,
    session: Box<dyn LazySession>,
    bundle: PathBuf,
    images: PathBuf,
) -> std::io::Result<Waiter> {
    let stop = Arc::new(AtomicBool::new(false));
    let stop2 = stop.clone();
    let thread = std::thread::Builder::new()
        .name(format!("lazy-{id}"))
        .spawn(move || {
            let stats = bundle.join(STATS_FILE);
            let mut last = Instant::now() - Duration::from_secs(1);
            while !session.finished() {
                if stop2.load(Ordering::SeqCst) {
                    session.stop();
                    break;
                }
                if last.elapsed() >= Duration::from_secs(1) {
                    write_stats(&stats, &session.stats_json());
                    last = Instant::now();
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            match session.wait() {
                Ok(json) => {
                    write_stats(&stats, &json);
                    log::info!("lazy restore of {id} finished: {}", summary(&json));
                }
                Err(e) => log::error!("lazy restore of {id} ended with an error: {e}"),
            }
            remove_if_temp_checkpoint(&images);
        })?;
    Ok(Waiter {
        stop,
        thread: Some(thread),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU32;

    struct Fake(Arc<AtomicU32>);
    impl LazySession for Fake {
        fn stats_json(&self) -> String {
            format!("{{\"faults\":{}}}", self.0.load(Ordering::SeqCst))
        }
        fn stop(&self) {}
        fn finished(&self) -> bool {
            self.0.fetch_add(1, Ordering::SeqCst) >= 1
        }
        fn wait(self: Box<Self>) -> std::result::Result<String, String> {
            Ok("{\"faults\":7}".into())
        }
    }

    #[test]
    fn waiter_writes_stats_and_removes_temp_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let images = dir.path().join("ctrd-checkpoint123");
        let keep = dir.path().join("checkpoint");
        std::fs::create_dir(&images).unwrap();
        std::fs::create_dir(&keep).unwrap();
        let w = spawn_waiter(
            "c".into(),
            Box::new(Fake(Arc::new(AtomicU32::new(0)))),
            dir.path().into(),
            images.clone(),
        )
        .unwrap();
        w.finish(Duration::from_secs(5));
        let stats = dir.path().join(STATS_FILE);
        for _ in 0..100 {
            if !images.exists() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        assert!(!images.exists());
        assert_eq!(std::fs::read_to_string(stats).unwrap(), "{\"faults\":7}");
        remove_if_temp_checkpoint(&keep);
        let line = summary(
            r#"{"faults":2,"pages_faulted":2,"time_to_first_fault_us":105610,"fault_latency_us":{"p99":50}}"#,
        );
        assert!(
            line.starts_with("faults=2 pages faulted/prefetched/filled/zero=2/0/0/0"),
            "{line}"
        );
        assert!(line.contains("first_fault=105ms fill_complete=-"), "{line}");
        assert!(keep.exists());
    }
}
