//! The seam between a restoring shim and the lazy-pages engine.
//!
//! [`LazyBackend`] starts a page fetcher listening on `<work>/lazy-pages.socket` before
//! `runc restore --lazy-pages` runs; [`LazySession`] is the running fetcher. The production
//! backend wraps `distriproc_runtime::fetcher`; [`EagerOnly`] makes every restore eager (used
//! when lazy restore is switched off, and in tests). [`spawn_waiter`] is the per-restore thread
//! that keeps `<bundle>/distriproc-lazy-stats.json` current, logs one line per restore stage
//! (restored, first fault, fill progress every [`PROGRESS_EVERY`], fill complete, task exit,
//! summary; `id` and `stage` fields plus the figures as key=value pairs, see [`Stage`]) and
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
use distriproc_runtime::fetcher::{FetchError, ResidencyProbe};
use distriproc_runtime::protocol::upload::MemoryDigest;
use distriproc_runtime::remote::RemoteStats;
use distriproc_runtime::remote::{Endpoint, KeepAlive, RemoteOptions, RemotePages};
use distriproc_runtime::stats::FetchStats;

use crate::error::Result;

/// File in the bundle with the fetcher's statistics (FetchStats as JSON).
pub const STATS_FILE: &str = "distriproc-lazy-stats.json";

/// Where a restore's pages come from.
#[derive(Debug, Clone)]
pub enum PagesFrom {
    /// `pages-*.img` of the checkpoint directory (an inline checkpoint).
    Local,
    /// A checkpoint of the node-local store (`crate::store`), checked and leased.
    Store(Arc<crate::store::Entry>),
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
    /// (mode, fill policy, tuning, memory budget), with page data from `pages`, for a
    /// container whose cgroup memory limit is `memory_limit` bytes (0 = none).
    fn start(
        &self,
        work: &Path,
        images: &Path,
        cfg: &FetcherConfig,
        pages: &PagesFrom,
        memory_limit: u64,
    ) -> Result<Box<dyn LazySession>>;
}

/// What a checkpoint of a lazily restored container needs from its fetcher: where the memory
/// still managed lazily is ([`ResidencyProbe`]) and where its pages come from.
#[derive(Clone)]
pub struct CheckpointView {
    /// The fetcher's view of the tasks' lazy ranges.
    pub probe: ResidencyProbe,
    /// The fetcher's page-server session, when its pages come from one.
    pub remote: RemoteSlot,
}

/// A native fetcher's session with the page server: the client it reads through and the
/// lease that session holds at the server (a keep-alive: retention leaves a checkpoint alone
/// while a session reads it).
pub struct RemoteSession {
    /// The client.
    pub pages: Arc<RemotePages>,
    /// Its keep-alive.
    pub lease: KeepAlive,
}

/// The [`RemoteSession`] of a fetcher, shared by the session and the container's
/// [`CheckpointView`]: a published checkpoint that the fetcher then reads from replaces it
/// (`crate::checkpoint_lazy::rebase`). Empty when pages are not remote.
#[derive(Clone, Default)]
pub struct RemoteSlot(Arc<std::sync::Mutex<Option<RemoteSession>>>);

impl RemoteSlot {
    /// A slot holding `s`.
    pub fn new(s: Option<RemoteSession>) -> RemoteSlot {
        RemoteSlot(Arc::new(std::sync::Mutex::new(s)))
    }

    /// The current client, if pages are remote.
    pub fn pages(&self) -> Option<Arc<RemotePages>> {
        self.lock().as_ref().map(|s| s.pages.clone())
    }

    /// Whether pages are remote.
    pub fn is_remote(&self) -> bool {
        self.lock().is_some()
    }

    /// Ends the session (the fetcher ended): its lease is given up.
    pub fn clear(&self) {
        drop(self.lock().take());
    }

    /// Replaces the session (the old one's lease ends once reads under way are done).
    pub fn replace(&self, s: RemoteSession) {
        drop(self.lock().replace(s));
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<RemoteSession>> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl std::fmt::Debug for CheckpointView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CheckpointView")
            .field("probe", &self.probe)
            .finish_non_exhaustive()
    }
}

/// A lazy restore's statistics as its session reports them; the stats file
/// ([`STATS_FILE`]) is their JSON.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(untagged)]
pub enum SessionStats {
    /// The in-process fetcher.
    Native(Box<NativeStats>),
    /// CRIU's lazy-pages daemon (`fetcher.mode = "criu"`).
    Criu(CriuStats),
}

/// The in-process fetcher's counters, with the page server's when pages come from one.
#[derive(Debug, Clone, serde::Serialize)]
pub struct NativeStats {
    /// The fetcher's counters (the top level of the JSON).
    #[serde(flatten)]
    pub fetch: FetchStats,
    /// The page-server client's, when the pages are remote.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub remote: Option<RemoteSummary>,
}

/// Where a remote restore's pages come from and what was asked of it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RemoteSummary {
    /// The page server.
    pub endpoint: String,
    /// The checkpoint served.
    pub checkpoint: String,
    /// The client's counters.
    #[serde(flatten)]
    pub counters: RemoteStats,
}

/// What CRIU's lazy-pages daemon reports in its log.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CriuStats {
    /// Always `"criu"`: tells the two shapes of the stats file apart.
    pub mode: &'static str,
    /// Pages the daemon has sent.
    pub pages_transferred: u64,
    /// Pages it has to send.
    pub pages_total: u64,
    /// The daemon has exited.
    pub finished: bool,
}

/// A running fetcher.
pub trait LazySession: Send {
    /// The view a later checkpoint needs; `None` when the fetcher cannot give one (CRIU's
    /// daemon).
    fn checkpoint_view(&self) -> Option<CheckpointView> {
        None
    }
    /// Starts keeping the memory budget by eviction, now that the restored tasks run:
    /// `init_pid` is the container's init (host pid). Nothing to do without a budget or where
    /// eviction does not exist (CRIU's daemon).
    fn enable_eviction(&self, init_pid: i32) -> std::result::Result<(), FetchError> {
        let _ = init_pid;
        Ok(())
    }
    /// Current statistics.
    fn stats(&self) -> SessionStats;
    /// Abandon the restore (runc restore failed).
    fn stop(&self);
    /// Whether the fill has ended (the next `wait` returns at once).
    fn finished(&self) -> bool;
    /// Wait for the end of the fill: the final statistics, or why the fetcher failed.
    fn wait(self: Box<Self>) -> std::result::Result<SessionStats, FetchError>;
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
        _: u64,
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

fn write_stats(path: &Path, stats: &SessionStats) {
    let tmp = path.with_extension("json.tmp");
    let Ok(json) = serde_json::to_vec(stats) else {
        return;
    };
    if std::fs::write(&tmp, json).is_ok() {
        let _ = std::fs::rename(&tmp, path);
    }
}

/// One line of statistics: the counters people look at first.
pub fn summary(stats: &SessionStats) -> String {
    let s = match stats {
        SessionStats::Criu(c) => {
            return format!(
                "criu lazy-pages transferred {}/{} pages",
                c.pages_transferred, c.pages_total
            )
        }
        SessionStats::Native(n) => &n.fetch,
    };
    let ms = |us: Option<u64>| us.map_or_else(|| "-".to_owned(), |us| format!("{}ms", us / 1000));
    let budget = if s.budget_pages > 0 {
        format!(
            " budget={}MiB resident={}MiB evicted={} refaults={} pinned={} evict_batches={} \
             evict_refused={} evict_stop_p99={}us",
            s.budget_pages / 256,
            s.resident_pages / 256,
            s.pages_evicted,
            s.refaults,
            s.pinned_pages,
            s.evict_batches,
            s.evict_refused,
            s.evict_stop_us.p99,
        )
    } else {
        String::new()
    };
    let writeback = if s.writeback_layers > 0 {
        format!(
            " written_back={} writeback_layers={}",
            s.pages_written_back, s.writeback_layers
        )
    } else {
        String::new()
    };
    format!(
        "faults={} pages faulted/prefetched/filled/zero={}/{}/{}/{} bytes={} tasks={} \
         first_fault={} fill_complete={} fault_p99={}us{budget}{writeback}",
        s.faults,
        s.pages_faulted,
        s.pages_prefetched,
        s.pages_filled,
        s.zero_pages,
        s.bytes,
        s.tasks,
        ms(s.time_to_first_fault_us),
        ms(s.fill_complete_us),
        s.fault_latency_us.p99,
    )
}

/// How often the waiter logs the fill's progress while pages are being installed.
pub const PROGRESS_EVERY: Duration = Duration::from_secs(5);

/// The stages the waiter logs, each once (progress: every [`PROGRESS_EVERY`]), as the `stage`
/// field of a log line whose other fields are the figures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// runc restore returned: `restore_ms` (fetcher listening → CRIU's restore-finished
    /// message), `tasks`, `pages_total`.
    Restored,
    /// The first page fault: `first_fault_ms` since the fetcher started.
    FirstFault,
    /// While pages are being installed (none installed since the last line: no line):
    /// `pages_installed`, `pages_total`, `percent`, `mib_s` (since the last line), `faults`,
    /// `bytes`.
    Progress,
    /// The background fill installed every page: `fill_ms`, `pages_installed`, `mib_s` (average).
    FillComplete,
    /// The container went away before the fill ended; the fetcher is stopped.
    TaskExit,
    /// The fetcher ended: the summary (`lazy restore of ID finished: ...`) or the error.
    Finished,
}

impl Stage {
    /// The `stage` field's value.
    pub fn name(self) -> &'static str {
        match self {
            Stage::Restored => "restored",
            Stage::FirstFault => "first-fault",
            Stage::Progress => "progress",
            Stage::FillComplete => "fill-complete",
            Stage::TaskExit => "task-exit",
            Stage::Finished => "finished",
        }
    }
}

/// The figures the stage lines use (native or criu fetcher).
#[derive(Debug, Default, Clone, Copy)]
struct Figures {
    installed: u64,
    total: u64,
    bytes: u64,
    faults: u64,
    tasks: u64,
    restore_us: Option<u64>,
    first_fault_us: Option<u64>,
    fill_us: Option<u64>,
}

impl Figures {
    fn of(stats: &SessionStats) -> Figures {
        match stats {
            SessionStats::Criu(c) => Figures {
                installed: c.pages_transferred,
                total: c.pages_total,
                bytes: c.pages_transferred * distriproc_runtime::images::PAGE_SIZE,
                ..Default::default()
            },
            SessionStats::Native(n) => {
                let s = &n.fetch;
                Figures {
                    installed: s.pages_faulted + s.pages_prefetched + s.pages_filled,
                    total: s.lazy_pages,
                    bytes: s.bytes,
                    faults: s.faults,
                    tasks: s.tasks,
                    restore_us: s.restore_finished_us,
                    first_fault_us: s.time_to_first_fault_us,
                    fill_us: s.fill_complete_us,
                }
            }
        }
    }

    fn percent(&self) -> u64 {
        (self.installed * 100).checked_div(self.total).unwrap_or(0)
    }
}

fn ms(us: Option<u64>) -> String {
    us.map_or_else(|| "-".into(), |us| (us / 1000).to_string())
}

fn mib_s(bytes: u64, d: Duration) -> String {
    if d.is_zero() {
        return "-".into();
    }
    format!("{:.1}", bytes as f64 / (1024.0 * 1024.0) / d.as_secs_f64())
}

/// What the waiter has logged of one restore.
struct StageLog {
    id: String,
    first_fault: bool,
    fill_complete: bool,
    /// Time, bytes and pages installed at the last progress line.
    last: (Instant, u64, u64),
}

impl StageLog {
    /// Logs `restored` from the first snapshot.
    fn start(id: &str, stats: &SessionStats) -> StageLog {
        let f = Figures::of(stats);
        let id = id.to_owned();
        log::info!(
            id = id.as_str(), stage = Stage::Restored.name(), restore_ms = ms(f.restore_us).as_str(),
            tasks = f.tasks, pages_total = f.total;
            "lazy restore of {id}: restored, fetcher serving faults"
        );
        StageLog {
            id,
            first_fault: false,
            fill_complete: false,
            last: (Instant::now(), f.bytes, f.installed),
        }
    }

    /// Logs the stages a new snapshot reached; a progress line when `progress_due`.
    fn observe(&mut self, stats: &SessionStats, progress_due: bool) {
        let f = Figures::of(stats);
        let id = self.id.as_str();
        if !self.first_fault && f.first_fault_us.is_some() {
            self.first_fault = true;
            log::info!(
                id = id, stage = Stage::FirstFault.name(), first_fault_ms = ms(f.first_fault_us).as_str();
                "lazy restore of {id}: first page fault"
            );
        }
        if !self.fill_complete && f.fill_us.is_some() {
            self.fill_complete = true;
            let avg = mib_s(f.bytes, Duration::from_micros(f.fill_us.unwrap_or(0)));
            log::info!(
                id = id, stage = Stage::FillComplete.name(), fill_ms = ms(f.fill_us).as_str(),
                pages_installed = f.installed, pages_total = f.total, mib_s = avg.as_str();
                "lazy restore of {id}: fill complete"
            );
        } else if progress_due && !self.fill_complete && f.installed != self.last.2 {
            // Only while pages move: an idle `fill = "none"` container logs nothing.
            let (t, b, _) = self.last;
            let rate = mib_s(f.bytes.saturating_sub(b), t.elapsed());
            log::info!(
                id = id, stage = Stage::Progress.name(), pages_installed = f.installed,
                pages_total = f.total, percent = f.percent(), mib_s = rate.as_str(),
                faults = f.faults, bytes = f.bytes;
                "lazy restore of {id}: filling"
            );
            self.last = (Instant::now(), f.bytes, f.installed);
        }
    }
}

/// The thread watching a lazy restore; [`Waiter::finish`] ends it when the container goes away.
#[derive(Debug)]
pub struct Waiter {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Waiter {
    /// Whether the watched fetcher has ended (its memory is all local, or it gave up).
    pub fn is_finished(&self) -> bool {
        self.thread
            .as_ref()
            .is_none_or(std::thread::JoinHandle::is_finished)
    }

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
            let now = session.stats();
            write_stats(&stats, &now);
            let mut stages = StageLog::start(&id, &now);
            let mut last = Instant::now();
            let mut last_progress = Instant::now();
            while !session.finished() {
                if stop2.load(Ordering::SeqCst) {
                    stages.observe(&session.stats(), false);
                    log::info!(
                        id = id.as_str(), stage = Stage::TaskExit.name();
                        "lazy restore of {id}: the container exited before the fill ended, stopping the fetcher"
                    );
                    session.stop();
                    break;
                }
                if last.elapsed() >= Duration::from_secs(1) {
                    let now = session.stats();
                    write_stats(&stats, &now);
                    let due = last_progress.elapsed() >= PROGRESS_EVERY;
                    stages.observe(&now, due);
                    if due {
                        last_progress = Instant::now();
                    }
                    last = Instant::now();
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            match session.wait() {
                Ok(last) => {
                    write_stats(&stats, &last);
                    stages.observe(&last, false);
                    let f = Figures::of(&last);
                    log::info!(
                        id = id.as_str(), stage = Stage::Finished.name(),
                        pages_installed = f.installed, pages_total = f.total, bytes = f.bytes,
                        faults = f.faults, first_fault_ms = ms(f.first_fault_us).as_str(),
                        fill_ms = ms(f.fill_us).as_str();
                        "lazy restore of {id} finished: {}", summary(&last)
                    );
                }
                Err(e) => log::error!(
                    id = id.as_str(), stage = Stage::Finished.name();
                    "lazy restore of {id} ended with an error: {}",
                    distriproc_runtime::error_chain(&e)
                ),
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

    fn native(f: impl FnOnce(&mut FetchStats)) -> SessionStats {
        let mut fetch = FetchStats::default();
        f(&mut fetch);
        SessionStats::Native(Box::new(NativeStats {
            fetch,
            remote: None,
        }))
    }

    fn criu(pages_transferred: u64, pages_total: u64) -> SessionStats {
        SessionStats::Criu(CriuStats {
            mode: "criu",
            pages_transferred,
            pages_total,
            finished: false,
        })
    }

    struct Fake(Arc<AtomicU32>);
    impl LazySession for Fake {
        fn stats(&self) -> SessionStats {
            let n = u64::from(self.0.load(Ordering::SeqCst));
            native(|s| s.faults = n)
        }
        fn stop(&self) {}
        fn finished(&self) -> bool {
            self.0.fetch_add(1, Ordering::SeqCst) >= 1
        }
        fn wait(self: Box<Self>) -> std::result::Result<SessionStats, FetchError> {
            Ok(native(|s| s.faults = 7))
        }
    }

    /// Keeps log lines formatted as containerd-shim's logger writes them to containerd's log.
    struct Capture(std::sync::Mutex<Vec<String>>);

    struct Kv(String);
    impl<'k> log::kv::VisitSource<'k> for Kv {
        fn visit_pair(
            &mut self,
            k: log::kv::Key<'k>,
            v: log::kv::Value<'k>,
        ) -> std::result::Result<(), log::kv::Error> {
            self.0.push_str(&format!(" {k}=\"{v}\""));
            Ok(())
        }
    }

    impl log::Log for Capture {
        fn enabled(&self, _: &log::Metadata) -> bool {
            true
        }
        fn log(&self, r: &log::Record) {
            let mut kv = Kv(String::new());
            let _ = r.key_values().visit(&mut kv);
            let line = format!(
                "level={}{} msg=\"{}\"",
                r.level().as_str().to_lowercase(),
                kv.0,
                r.args()
            );
            self.0.lock().unwrap().push(line);
        }
        fn flush(&self) {}
    }

    fn captured(id: &str) -> Vec<String> {
        static LOGGER: std::sync::OnceLock<&'static Capture> = std::sync::OnceLock::new();
        let l = LOGGER.get_or_init(|| {
            let l: &'static Capture = Box::leak(Box::new(Capture(Default::default())));
            let _ = log::set_logger(l);
            log::set_max_level(log::LevelFilter::Info);
            l
        });
        let tag = format!("id=\"{id}\"");
        l.0.lock()
            .unwrap()
            .iter()
            .filter(|x| x.contains(&tag))
            .cloned()
            .collect()
    }

    #[test]
    fn one_key_value_line_per_stage() {
        let _ = captured("stages-1");
        let mut s = StageLog::start(
            "stages-1",
            &native(|s| {
                s.tasks = 2;
                s.lazy_pages = 1000;
                s.restore_finished_us = Some(312_000);
            }),
        );
        s.observe(
            &native(|s| {
                s.tasks = 2;
                s.lazy_pages = 1000;
            }),
            false,
        );
        let quarter = native(|s| {
            s.lazy_pages = 1000;
            s.pages_faulted = 10;
            s.pages_filled = 240;
            s.bytes = 1_048_576;
            s.faults = 9;
            s.time_to_first_fault_us = Some(4000);
        });
        s.observe(&quarter, true);
        s.observe(&quarter, true);
        s.observe(
            &native(|s| {
                s.lazy_pages = 1000;
                s.pages_faulted = 10;
                s.pages_filled = 990;
                s.bytes = 4_096_000;
                s.time_to_first_fault_us = Some(4000);
                s.fill_complete_us = Some(2_000_000);
            }),
            true,
        );
        s.observe(&native(|s| s.fill_complete_us = Some(2_000_000)), true);
        let lines = captured("stages-1");
        let stages: Vec<&str> = lines
            .iter()
            .map(|l| {
                l.split("stage=\"")
                    .nth(1)
                    .unwrap()
                    .split('"')
                    .next()
                    .unwrap()
            })
            .collect();
        assert_eq!(
            stages,
            ["restored", "first-fault", "progress", "fill-complete"],
            "{lines:#?}"
        );
        assert!(
            lines[0].contains("restore_ms=\"312\" tasks=\"2\" pages_total=\"1000\""),
            "{}",
            lines[0]
        );
        assert!(lines[1].contains("first_fault_ms=\"4\""), "{}", lines[1]);
        assert!(
            lines[2].contains("pages_installed=\"250\" pages_total=\"1000\" percent=\"25\""),
            "{}",
            lines[2]
        );
        assert!(lines[2].contains("mib_s=\""), "{}", lines[2]);
        assert!(
            lines[3].contains("fill_ms=\"2000\" pages_installed=\"1000\"")
                && lines[3].contains("mib_s=\"2.0\""),
            "{}",
            lines[3]
        );
        // criu lazy-pages: transferred/total are the progress figures.
        let mut c = StageLog::start("stages-criu", &criu(0, 8));
        c.observe(&criu(4, 8), true);
        let lines = captured("stages-criu");
        assert!(lines[1].contains("percent=\"50\""), "{lines:#?}");
    }

    #[test]
    fn waiter_writes_stats_and_removes_temp_checkpoint() {
        let _ = captured("c"); // installs the capturing logger before the waiter logs
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
        let lines = captured("c");
        assert!(
            lines
                .first()
                .is_some_and(|l| l.contains("stage=\"restored\"")),
            "{lines:#?}"
        );
        assert!(
            lines
                .last()
                .is_some_and(|l| l.contains("stage=\"finished\"")
                    && l.contains("msg=\"lazy restore of c finished: faults=7")),
            "{lines:#?}"
        );
        let stats = dir.path().join(STATS_FILE);
        for _ in 0..100 {
            if !images.exists() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        assert!(!images.exists());
        let written: serde_json::Value =
            serde_json::from_slice(&std::fs::read(stats).unwrap()).unwrap();
        assert_eq!(written["faults"], 7, "{written}");
        assert!(written.get("remote").is_none(), "{written}");
        assert!(written["fault_latency_us"]["p99"].is_u64(), "{written}");
        remove_if_temp_checkpoint(&keep);
        let line = summary(&native(|s| {
            s.faults = 2;
            s.pages_faulted = 2;
            s.time_to_first_fault_us = Some(105_610);
            s.fault_latency_us.p99 = 50;
        }));
        assert!(
            line.starts_with("faults=2 pages faulted/prefetched/filled/zero=2/0/0/0"),
            "{line}"
        );
        assert!(line.contains("first_fault=105ms fill_complete=-"), "{line}");
        assert!(!line.contains("budget="), "{line}");
        let line = summary(&native(|s| {
            s.budget_pages = 65536;
            s.resident_pages = 65000;
            s.pages_evicted = 12;
            s.refaults = 3;
        }));
        assert!(
            line.contains(" budget=256MiB resident=253MiB evicted=12 refaults=3 pinned=0"),
            "{line}"
        );
        assert!(keep.exists());
    }
}
