//! Sending a checkpoint's pages to the page server while CRIU is still writing them.
//!
//! A checkpoint whose memory is all local (a container that was never lazily restored) has
//! CRIU write every page into the `pages-<n>.img` files of the checkpoint directory; uploading
//! them only after the dump makes the checkpoint take two full passes over the memory, one
//! after the other. With `[pageserver] upload_during_dump` a [`DumpStreamer`] thread follows
//! those files while `runc checkpoint` runs and sends what has been written so far as upload
//! parts (protocol v5); when the dump ends, [`crate::remote::publish`] sends the rest of each
//! pages file and the metadata images, and checks the receipt.
//!
//! Why this is safe: CRIU writes a pages file front to back and never rewrites it, and the
//! streamer reads only below a file's current size, which the kernel raises only after the
//! bytes are in the page cache. Nothing is trusted beyond that: the receipt must equal the
//! digest of the final local files (every pages file's size, every pagemap's contents), so a
//! file cut short, grown after it was sent or missed is a mismatch, and any failure of the
//! streamed upload makes `publish` upload the directory again the ordinary way under a new id
//! (the server discards an upload that never ended). A server older than v5 ends streaming
//! before anything is sent.
//!
//! The session is opened when the first pages file appears, so the freeze and CRIU's first
//! steps do not count against the server's idle limit; while CRIU writes nothing (its other
//! images) an empty part every [`KEEPALIVE`] keeps the session open.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use distriproc_runtime::error_chain;
use distriproc_runtime::remote::{Endpoint, RemoteOptions};
use distriproc_runtime::upload_client::Upload;

/// Idle time after which an empty part is sent.
pub const KEEPALIVE: Duration = Duration::from_secs(1);
/// Pause between looks at the directory when nothing new was written.
const POLL: Duration = Duration::from_millis(5);
/// Most bytes of one file sent before the other files are looked at again.
const MAX_PART: u64 = 64 << 20;

/// What a streamer sent before it was stopped.
#[derive(Default)]
pub struct Streamed {
    /// The open upload (`None` if streaming never started or failed).
    pub upload: Option<Upload>,
    /// Bytes sent of each pages file.
    pub sent: BTreeMap<String, u64>,
    /// Why streaming ended early, if it did.
    pub failed: Option<String>,
}

impl Streamed {
    /// Bytes sent in all.
    pub fn bytes(&self) -> u64 {
        self.sent.values().sum()
    }
}

/// A thread sending the pages files of a checkpoint directory while they are written.
pub struct DumpStreamer {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Streamed>>,
}

/// Whether `name` is one of CRIU's pages files.
pub fn is_pages_file(name: &str) -> bool {
    name.starts_with("pages-") && name.ends_with(".img")
}

impl DumpStreamer {
    /// Starts following `dir`; the upload will be the new checkpoint `opts.checkpoint`.
    pub fn start(dir: PathBuf, endpoint: Endpoint, opts: RemoteOptions) -> DumpStreamer {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::Builder::new()
            .name("dump-stream".into())
            .spawn(move || follow(&dir, &endpoint, &opts, &s))
            .ok();
        DumpStreamer { stop, thread }
    }

    /// Stops following (after the part being sent) and hands over what was sent. Blocks.
    pub fn stop(mut self) -> Streamed {
        self.stop.store(true, Relaxed);
        match self.thread.take().map(JoinHandle::join) {
            Some(Ok(s)) => s,
            Some(Err(_)) => Streamed {
                failed: Some("the streaming thread panicked".into()),
                ..Streamed::default()
            },
            None => Streamed {
                failed: Some("the streaming thread could not be started".into()),
                ..Streamed::default()
            },
        }
    }
}

impl Drop for DumpStreamer {
    fn drop(&mut self) {
        self.stop.store(true, Relaxed);
    }
}

/// The pages files of `dir` and their sizes, by name.
fn pages_files(dir: &Path) -> Vec<(String, u64)> {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut v: Vec<(String, u64)> = rd
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let meta = e.metadata().ok()?;
            (is_pages_file(&name) && meta.is_file()).then_some((name, meta.len()))
        })
        .collect();
    v.sort();
    v
}

fn follow(dir: &Path, endpoint: &Endpoint, opts: &RemoteOptions, stop: &AtomicBool) -> Streamed {
    let mut st = Streamed::default();
    let mut files: BTreeMap<String, std::fs::File> = BTreeMap::new();
    let mut last = Instant::now();
    while !stop.load(Relaxed) {
        let mut moved = false;
        for (name, size) in pages_files(dir) {
            if stop.load(Relaxed) {
                break;
            }
            let done = st.sent.get(&name).copied().unwrap_or(0);
            if size <= done {
                continue;
            }
            if st.upload.is_none() {
                match Upload::begin(endpoint, opts, None) {
                    Ok(up) if up.takes_parts() => st.upload = Some(up),
                    Ok(_) => {
                        st.failed = Some("the page server takes no upload parts (v5)".into());
                        return st;
                    }
                    Err(e) => {
                        st.failed = Some(error_chain(&e));
                        return st;
                    }
                }
            }
            let path = dir.join(&name);
            if !files.contains_key(&name) {
                match std::fs::File::open(&path) {
                    Ok(f) => {
                        files.insert(name.clone(), f);
                    }
                    Err(e) => {
                        st.failed = Some(format!("{}: {e}", path.display()));
                        st.upload = None;
                        return st;
                    }
                }
            }
            let (Some(up), Some(f)) = (st.upload.as_mut(), files.get_mut(&name)) else {
                break;
            };
            let n = (size - done).min(MAX_PART);
            if let Err(e) = up.send_part(&name, &path, f, done, n) {
                st.failed = Some(error_chain(&e));
                st.upload = None;
                return st;
            }
            st.sent.insert(name, done + n);
            moved = true;
            last = Instant::now();
        }
        if moved {
            continue;
        }
        if let (Some(up), Some((name, sent))) = (st.upload.as_mut(), st.sent.iter().next()) {
            if last.elapsed() >= KEEPALIVE {
                let path = dir.join(name);
                let Some(f) = files.get_mut(name) else { break };
                if let Err(e) = up.send_part(name, &path, f, *sent, 0) {
                    st.failed = Some(error_chain(&e));
                    st.upload = None;
                    return st;
                }
                last = Instant::now();
            }
        }
        std::thread::sleep(POLL);
    }
    st
}
