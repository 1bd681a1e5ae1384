//! The per-checkpoint access log: which pages were served, in what order, to which session.
//!
//! One append-only text file per checkpoint, `<store>/.distriproc/access/<id>.log`. Each
//! session buffers its lines and appends them in one `write` (at most every
//! [`FLUSH_BYTES`] bytes or [`FLUSH_INTERVAL`], and at its end), so sessions never interleave
//! inside a line. Lines, space-separated:
//!
//! ```text
//! S <unix_ms> <session> <proto> <peer> <client>        session start (proto: native | criu)
//! R <unix_ms> <session> <pid> <vaddr hex> <pages> <data_pages>   a range served, in order
//! E <unix_ms> <session> <ranges> <pages> <bytes>       session end
//! ```
//!
//! `session` is `<server start unix_ms>-<n>`, unique per server run. Peer and client labels
//! have whitespace replaced by `_`. The `stats` subcommand reads these files.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// A session appends its buffer when it grows past this.
pub const FLUSH_BYTES: usize = 64 * 1024;
/// ... or when this much time passed since its last append.
pub const FLUSH_INTERVAL: Duration = Duration::from_millis(500);

/// Milliseconds since the epoch.
pub fn unix_ms() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis())
}

/// The access-log files of a store.
pub struct AccessLogs {
    dir: Option<PathBuf>,
    files: Mutex<std::collections::HashMap<String, Arc<File>>>,
    run: u128,
    next: AtomicU64,
}

impl AccessLogs {
    /// Logs under `dir` (created on first use); `None` disables logging.
    pub fn new(dir: Option<PathBuf>) -> AccessLogs {
        AccessLogs {
            dir,
            files: Mutex::new(Default::default()),
            run: unix_ms(),
            next: AtomicU64::new(1),
        }
    }

    /// The log file path of checkpoint `id` (a validated id).
    pub fn path_of(&self, id: &str) -> Option<PathBuf> {
        self.dir.as_ref().map(|d| d.join(format!("{id}.log")))
    }

    fn file(&self, id: &str) -> Option<Arc<File>> {
        let path = self.path_of(id)?;
        let mut g = self.files.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(f) = g.get(id) {
            return Some(f.clone());
        }
        let dir = path.parent()?;
        if let Err(e) = std::fs::create_dir_all(dir) {
            tracing::warn!("access log disabled: cannot create {}: {e}", dir.display());
            return None;
        }
        match OpenOptions::new().create(true).append(true).open(&path) {
            Ok(f) => {
                let f = Arc::new(f);
                g.insert(id.to_string(), f.clone());
                Some(f)
            }
            Err(e) => {
                tracing::warn!("access log disabled: cannot open {}: {e}", path.display());
                None
            }
        }
    }

    /// Starts the log of one session on checkpoint `id`.
    pub fn session(&self, id: &str, proto: &str, peer: &str, client: &str) -> SessionLog {
        let session = format!("{}-{}", self.run, self.next.fetch_add(1, Relaxed));
        let mut s = SessionLog {
            file: self.file(id),
            buf: Vec::new(),
            session,
            last: Instant::now(),
            ranges: 0,
            pages: 0,
            bytes: 0,
        };
        if s.file.is_some() {
            let _ = writeln!(
                s.buf,
                "S {} {} {proto} {} {}",
                unix_ms(),
                s.session,
                label(peer),
                label(client)
            );
        }
        s
    }
}

fn label(s: &str) -> String {
    if s.is_empty() {
        return "-".into();
    }
    s.chars()
        .map(|c| {
            if c.is_whitespace() || c.is_control() {
                '_'
            } else {
                c
            }
        })
        .collect()
}

/// The access log of one session.
pub struct SessionLog {
    file: Option<Arc<File>>,
    buf: Vec<u8>,
    session: String,
    last: Instant,
    ranges: u64,
    pages: u64,
    bytes: u64,
}

impl SessionLog {
    /// The session id.
    pub fn session(&self) -> &str {
        &self.session
    }

    /// Records one range served.
    pub fn range(&mut self, pid: u32, vaddr: u64, pages: u64, data_pages: u64) {
        self.ranges += 1;
        self.pages += pages;
        self.bytes += data_pages * 4096;
        if self.file.is_none() {
            return;
        }
        let _ = writeln!(
            self.buf,
            "R {} {} {pid} {vaddr:x} {pages} {data_pages}",
            unix_ms(),
            self.session
        );
        if self.buf.len() >= FLUSH_BYTES || self.last.elapsed() >= FLUSH_INTERVAL {
            self.flush();
        }
    }

    /// Appends the buffered lines.
    pub fn flush(&mut self) {
        self.last = Instant::now();
        if let Some(f) = &self.file {
            if !self.buf.is_empty() {
                let _ = (&**f).write_all(&self.buf);
            }
        }
        self.buf.clear();
    }
}

impl Drop for SessionLog {
    fn drop(&mut self) {
        if self.file.is_some() {
            let _ = writeln!(
                self.buf,
                "E {} {} {} {} {}",
                unix_ms(),
                self.session,
                self.ranges,
                self.pages,
                self.bytes
            );
        }
        self.flush();
    }
}
