//! Upload sessions (native protocol version 2, `distriproc_runtime::protocol::upload`): a
//! client (the shim's remote Checkpoint) sends a CRIU images directory that becomes the new
//! checkpoint `<store>/<id>`.
//!
//! The files are written into `<store>/.distriproc/incoming/<id>.upload`, each fsynced; after
//! the `End` message (whose file count must match) the new checkpoint is indexed (every task
//! pagemap, through its parents: a layer that does not resolve is refused), the directory is
//! renamed to `<store>/<id>` and the store directory fsynced, so a checkpoint appears whole or
//! not at all. An id already taken (or being uploaded) is refused with `Exists` at the hello.
//! A failed or abandoned upload leaves nothing behind; one cut short by the server's own death
//! is removed when a server next starts on the store ([`sweep_incoming`]: an upload in
//! progress holds an `flock` on its directory). The total size is limited by
//! `--max-upload-bytes`.
//!
//! Files may come in parts (protocol v5: pages sent while CRIU still writes them); each part is
//! appended to its file, and every file is fsynced before the checkpoint is indexed.
//!
//! A layered upload (protocol v3) names its parent first; see
//! `distriproc_runtime::protocol::upload` for what is checked. The new checkpoint then holds a
//! `parent -> ../<parent id>` link.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering::Relaxed;

use distriproc_runtime::fetcher::WRITEBACK_MARKER;
use distriproc_runtime::images::MAX_PARENT_DEPTH;
use distriproc_runtime::protocol::upload::{
    pagemap_checksum, FileHeader, FileKind, MemoryDigest, ParentRef, MAX_FILES,
};
use distriproc_runtime::protocol::{
    encode_response_header, Hello, HelloReply, HelloStatus, ProtocolError, RequestStatus,
    MAX_RANGES, MAX_REQUEST_PAGES, VERSION_LAYERS, VERSION_PARTS,
};
use nix::fcntl::{Flock, FlockArg};

use crate::checkpoint::{Checkpoint, Store};
use crate::layers::{layer_digest, record_digest, Tombstones, PARENT_LINK};
use crate::server::Ctx;
use crate::stream::Stream;
use crate::PageServerError;

/// Suffix of an upload's directory under `incoming/`.
const UPLOAD_SUFFIX: &str = ".upload";

/// A checkpoint being written into the store, `<store>/.distriproc/incoming/<id>.upload`:
/// removed unless committed; holds its `flock` until then (so [`sweep_incoming`] leaves it).
pub struct Incoming {
    tmp: PathBuf,
    published: bool,
    lock: Option<Flock<File>>,
}

/// Where [`Incoming`] directories are (created by their writer before the first one).
pub fn incoming_root(store: &Store) -> PathBuf {
    store.state_dir().join("incoming")
}

impl Incoming {
    /// Creates the incoming directory of checkpoint `id`. `create_dir` is the lock: a second
    /// writer of the same id fails here (`AlreadyExists`). [`incoming_root`] must exist.
    pub fn create(store: &Store, id: &str) -> std::io::Result<Incoming> {
        let tmp = incoming_root(store).join(format!("{id}{UPLOAD_SUFFIX}"));
        std::fs::create_dir(&tmp)?;
        let lock = File::open(&tmp)
            .ok()
            .and_then(|d| Flock::lock(d, FlockArg::LockExclusiveNonblock).ok());
        Ok(Incoming {
            tmp,
            published: false,
            lock,
        })
    }

    /// The directory the files go into.
    pub fn dir(&self) -> &Path {
        &self.tmp
    }

    /// [`commit`]s the directory as checkpoint `id`. Once it is a checkpoint its `flock` goes:
    /// the next upload may build on it (taking a shared lock on its parent).
    pub fn commit(
        &mut self,
        store: &Store,
        id: &str,
        parent: Option<(&ParentRef, &Parent)>,
    ) -> Result<(MemoryDigest, Checkpoint), CommitError> {
        let done = commit(store, id, &self.tmp, parent)?;
        self.published = true;
        drop(self.lock.take());
        Ok(done)
    }
}

impl Drop for Incoming {
    fn drop(&mut self) {
        if !self.published {
            let _ = std::fs::remove_dir_all(&self.tmp);
        }
    }
}

/// Removes upload directories left by a server that died mid-upload: those nobody holds the
/// `flock` of. Returns how many were removed.
pub fn sweep_incoming(store: &Store) -> usize {
    let incoming = incoming_root(store);
    let mut removed = 0;
    for e in std::fs::read_dir(&incoming).into_iter().flatten().flatten() {
        let path = e.path();
        if !e.file_name().to_string_lossy().ends_with(UPLOAD_SUFFIX) {
            continue;
        }
        let Ok(dir) = File::open(&path) else { continue };
        // Taken: a live upload (of this or another server on the same store) holds it.
        let Ok(lock) = Flock::lock(dir, FlockArg::LockExclusiveNonblock) else {
            continue;
        };
        if std::fs::remove_dir_all(&path).is_ok() {
            tracing::warn!(path = %path.display(), "removed an upload cut short by a server exit");
            removed += 1;
        }
        drop(lock);
    }
    removed
}

/// Layers in the chain that starts at `dir` (1 without a parent link); refuses a chain that
/// loops, leaves the store or is deeper than [`MAX_PARENT_DEPTH`].
fn chain_depth(store: &Store, dir: &Path) -> Result<usize, String> {
    let root = std::fs::canonicalize(store.root()).map_err(|e| format!("store: {e}"))?;
    let mut seen = HashSet::new();
    let mut at = std::fs::canonicalize(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let mut depth = 1;
    loop {
        seen.insert(at.clone());
        let link = at.join(PARENT_LINK);
        if std::fs::symlink_metadata(&link).is_err() {
            return Ok(depth);
        }
        let next = std::fs::canonicalize(&link)
            .map_err(|e| format!("{}: broken parent link ({e})", link.display()))?;
        if next.parent() != Some(root.as_path()) {
            return Err(format!("{} leaves the store", link.display()));
        }
        if !seen.insert(next.clone()) {
            return Err(format!("{}: the parent chain loops", link.display()));
        }
        depth += 1;
        if depth > MAX_PARENT_DEPTH {
            return Err(format!(
                "the chain below {} is deeper than {MAX_PARENT_DEPTH} layers",
                dir.display()
            ));
        }
        at = next;
    }
}

/// A checked parent: its directory, with a shared `flock` on it held until the upload ends
/// (retention leaves a layer alone while an upload builds on it, `crate::gc`).
pub struct Parent {
    dir: PathBuf,
    /// Layers in the parent's chain (itself included).
    depth: usize,
    _in_use: Flock<File>,
}

/// Bytes of an upload after which their writeback to disk is started (so that the fsync at
/// the end of the file has little left to write, instead of all of it).
const WRITEBACK_STEP: u64 = 8 << 20;

/// Starts writing `len` bytes of `f` at `offset` to disk without waiting (the file's fsync
/// still decides durability). Failures are left to that fsync.
fn start_writeback(f: &File, offset: u64, len: u64) {
    use std::os::fd::AsRawFd;
    let (Ok(off), Ok(n)) = (i64::try_from(offset), i64::try_from(len)) else {
        return;
    };
    // SAFETY: sync_file_range only reads the descriptor and the range arguments; `f` is an
    // open file for the duration of the call.
    unsafe {
        libc::sync_file_range(f.as_raw_fd(), off, n, libc::SYNC_FILE_RANGE_WRITE);
    }
}

/// A file of the upload being written: its bytes so far and how far writeback was started.
struct Received {
    f: File,
    written: u64,
    flushed: u64,
}

enum ReceiveError {
    Read(std::io::Error),
    Write(std::io::Error),
}

impl Received {
    fn new(f: File) -> Received {
        Received {
            f,
            written: 0,
            flushed: 0,
        }
    }

    /// Appends the next `n` bytes of `r`, starting the writeback of every [`WRITEBACK_STEP`].
    fn receive(&mut self, r: &mut impl Read, n: u64, buf: &mut [u8]) -> Result<(), ReceiveError> {
        let mut left = n;
        while left > 0 {
            let k = usize::try_from(left.min(buf.len() as u64)).unwrap_or(buf.len());
            r.read_exact(&mut buf[..k]).map_err(ReceiveError::Read)?;
            self.f.write_all(&buf[..k]).map_err(ReceiveError::Write)?;
            left -= k as u64;
            self.written += k as u64;
            if self.written - self.flushed >= WRITEBACK_STEP {
                start_writeback(&self.f, self.flushed, self.written - self.flushed);
                self.flushed = self.written;
            }
        }
        Ok(())
    }
}

/// How long an upload waits for a parent that retention holds.
const PARENT_LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// A shared `flock` on the parent's directory, waiting up to [`PARENT_LOCK_WAIT`] while
/// retention holds it; `Err(None)` if it still does.
fn lock_parent(dir: &Path) -> Result<Flock<File>, Option<std::io::Error>> {
    let deadline = std::time::Instant::now() + PARENT_LOCK_WAIT;
    loop {
        let d = File::open(dir).map_err(Some)?;
        match Flock::lock(d, FlockArg::LockSharedNonblock) {
            Ok(l) => return Ok(l),
            Err(_) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            Err(_) => return Err(None),
        }
    }
}

/// Checks the parent an upload of `child` names.
pub fn check_parent(store: &Store, child: &str, p: &ParentRef) -> Result<Parent, String> {
    if p.checkpoint == child {
        return Err(format!("checkpoint {child:?} cannot be its own parent"));
    }
    let dir = store.dir_of(&p.checkpoint).map_err(|e| e.to_string())?;
    if !dir.is_dir() {
        return Err(format!(
            "parent checkpoint {:?} is not in the store",
            p.checkpoint
        ));
    }
    let in_use = lock_parent(&dir).map_err(|e| match e {
        Some(e) => format!("{}: {e}", dir.display()),
        None => format!(
            "parent checkpoint {:?} is being removed or compacted",
            p.checkpoint
        ),
    })?;
    // Checked with the lock held: a deleted checkpoint is never given a new layer.
    if Tombstones::of(store).is_deleted(&p.checkpoint) {
        return Err(format!(
            "parent checkpoint {:?} was deleted from the store",
            p.checkpoint
        ));
    }
    let found = layer_digest(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    if found != p.digest {
        return Err(format!(
            "parent checkpoint {:?} holds {}, the upload names {}: not the layer it was taken \
             from",
            p.checkpoint,
            found.to_message(),
            p.digest.to_message()
        ));
    }
    let depth = chain_depth(store, &dir)?;
    if depth >= MAX_PARENT_DEPTH {
        return Err(format!(
            "parent checkpoint {:?} is {depth} layers deep; a child would exceed \
             {MAX_PARENT_DEPTH} (compact the chain: delete superseded checkpoints, then gc)",
            p.checkpoint
        ));
    }
    Ok(Parent {
        dir,
        depth,
        _in_use: in_use,
    })
}

/// Indexes the upload in `tmp` (through `parent`, linked absolutely for the check) and leaves
/// the link relative (`../<parent id>`), as it resolves once `tmp` is renamed into the store.
fn finish_layer(
    store: &Store,
    id: &str,
    tmp: &Path,
    parent: Option<(&ParentRef, &Path)>,
) -> Result<Checkpoint, String> {
    let link = tmp.join(PARENT_LINK);
    if let Some((_, dir)) = parent {
        std::os::unix::fs::symlink(dir, &link).map_err(|e| format!("link the parent: {e}"))?;
    }
    let index = {
        let _shared = store.index_lock(false).map_err(|e| e.to_string())?;
        Checkpoint::open(id, tmp).map_err(|e| distriproc_runtime::error_chain(&e))?
    };
    if let Some((p, _)) = parent {
        let new = tmp.join(".parent.tmp");
        std::os::unix::fs::symlink(format!("../{}", p.checkpoint), &new)
            .and_then(|()| std::fs::rename(&new, &link))
            .map_err(|e| format!("link the parent: {e}"))?;
    }
    Ok(index)
}

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> PageServerError {
    let path = path.to_path_buf();
    move |source| PageServerError::Io { what, path, source }
}

/// Why [`commit`] refused a directory.
#[derive(Debug)]
pub enum CommitError {
    /// The directory does not index as a checkpoint (through its parent, if any).
    Index(String),
    /// Writing to the store failed.
    Store(PageServerError),
    /// A checkpoint with the id appeared in the meantime.
    Exists,
}

impl std::fmt::Display for CommitError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CommitError::Index(why) => write!(f, "does not index as a checkpoint: {why}"),
            CommitError::Store(e) => write!(f, "{}", distriproc_runtime::error_chain(e)),
            CommitError::Exists => write!(f, "the checkpoint id is taken"),
        }
    }
}

/// Makes the complete images directory `tmp` (files synced) checkpoint `id` of `store`: indexed
/// (through `parent`, checked with [`check_parent`]), its digest recorded, the directory
/// synced, renamed to `<store>/<id>` and the store directory synced, so it appears whole or
/// not at all. The upload session and the shim's node-local store both commit this way.
/// Returns the digest and the index (its files stay open across the rename).
pub fn commit(
    store: &Store,
    id: &str,
    tmp: &Path,
    parent: Option<(&ParentRef, &Parent)>,
) -> Result<(MemoryDigest, Checkpoint), CommitError> {
    let dst = store.dir_of(id).map_err(CommitError::Store)?;
    let layer = parent.map(|(p, d)| (p, d.dir.as_path()));
    let index = finish_layer(store, id, tmp, layer).map_err(CommitError::Index)?;
    let digest = pagemap_checksum(tmp)
        .and_then(|d| record_digest(tmp, &d).map(|()| d))
        .map_err(|e| CommitError::Store(io("digest", tmp)(e)))?;
    File::open(tmp)
        .and_then(|d| d.sync_all())
        .map_err(|e| CommitError::Store(io("sync", tmp)(e)))?;
    // rename(2) onto an existing non-empty directory fails, so a racing publisher loses cleanly.
    if dst.exists() {
        return Err(CommitError::Exists);
    }
    std::fs::rename(tmp, &dst).map_err(|e| CommitError::Store(io("publish", &dst)(e)))?;
    if let Some(root) = dst.parent() {
        let _ = File::open(root).and_then(|d| d.sync_all());
    }
    Ok((digest, index.moved_to(&dst)))
}

/// Serves an upload session whose hello (`version` already negotiated) was read.
pub(crate) fn serve(
    ctx: &Ctx,
    mut r: BufReader<Stream>,
    mut w: Stream,
    peer: &str,
    hello: &Hello,
    version: u16,
) -> Result<(), PageServerError> {
    let refuse = |w: &mut Stream, status, msg: String| {
        let _ = w.write_all(&HelloReply::refuse(status, &msg).encode());
        Err(PageServerError::Criu {
            peer: peer.to_string(),
            what: format!("upload of {:?} refused ({status}): {msg}", hello.checkpoint),
        })
    };
    let dst = match ctx.store.dir_of(&hello.checkpoint) {
        Ok(d) => d,
        Err(e) => return refuse(&mut w, HelloStatus::BadCheckpointId, e.to_string()),
    };
    let incoming = incoming_root(&ctx.store);
    std::fs::create_dir_all(&incoming).map_err(io("create", &incoming))?;
    if dst.exists() {
        return refuse(
            &mut w,
            HelloStatus::Exists,
            format!("checkpoint {:?} already exists", hello.checkpoint),
        );
    }
    let mut guard = match Incoming::create(&ctx.store, &hello.checkpoint) {
        Ok(g) => g,
        Err(e) => {
            return refuse(
                &mut w,
                HelloStatus::Exists,
                format!("checkpoint {:?} is being uploaded ({e})", hello.checkpoint),
            )
        }
    };
    let tmp = guard.dir().to_path_buf();
    let max_ranges = u16::try_from(MAX_RANGES).unwrap_or(u16::MAX);
    w.write_all(&HelloReply::ok(version, max_ranges, MAX_REQUEST_PAGES).encode())
        .map_err(|source| PageServerError::Protocol {
            peer: peer.to_string(),
            source: ProtocolError::Io {
                what: "write hello reply",
                source,
            },
        })?;
    tracing::info!(peer, checkpoint = %hello.checkpoint, client = %hello.client, "receiving an upload");
    let fail = |w: &mut Stream, status: RequestStatus, e: PageServerError| {
        let mut out = Vec::new();
        encode_response_header(0, status, 0, &distriproc_runtime::error_chain(&e), &mut out);
        let _ = w.write_all(&out);
        Err(e)
    };
    let perr = |source| PageServerError::Protocol {
        peer: peer.to_string(),
        source,
    };
    let mut files = 0u64;
    let mut total = 0u64;
    let mut parent: Option<(ParentRef, Parent)> = None;
    // Files being received (sent in parts, or the whole file now), and those received whole.
    let mut parts: HashMap<String, Received> = HashMap::new();
    let mut whole: HashSet<String> = HashSet::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let h = match FileHeader::read(&mut r) {
            Ok(h) => h,
            Err(e) if e.is_transport() => return Err(perr(e)),
            Err(e @ ProtocolError::Limit { .. }) => {
                return fail(&mut w, RequestStatus::TooLarge, perr(e))
            }
            Err(e) => return fail(&mut w, RequestStatus::Malformed, perr(e)),
        };
        if h.kind == FileKind::End {
            if h.size != files {
                let e = perr(ProtocolError::Invalid {
                    what: "upload file count",
                    value: h.size,
                });
                return fail(&mut w, RequestStatus::Malformed, e);
            }
            break;
        }
        if h.kind == FileKind::Parent {
            if version < VERSION_LAYERS || files > 0 || parent.is_some() {
                let e = perr(ProtocolError::Invalid {
                    what: "upload parent message (v3, once, before the files)",
                    value: u64::from(version),
                });
                return fail(&mut w, RequestStatus::Malformed, e);
            }
            let p = match ParentRef::read_body(&h, &mut r) {
                Ok(p) => p,
                Err(e) => return Err(perr(e)),
            };
            match check_parent(&ctx.store, &hello.checkpoint, &p) {
                Ok(dir) => parent = Some((p, dir)),
                Err(why) => {
                    let e = PageServerError::Criu {
                        peer: peer.to_string(),
                        what: format!("upload of {:?}: parent refused: {why}", hello.checkpoint),
                    };
                    return fail(&mut w, RequestStatus::BadParent, e);
                }
            }
            continue;
        }
        let part = h.kind == FileKind::Part;
        if part && version < VERSION_PARTS {
            let e = perr(ProtocolError::Invalid {
                what: "upload part message (v5)",
                value: u64::from(version),
            });
            return fail(&mut w, RequestStatus::Malformed, e);
        }
        let known = parts.contains_key(&h.name);
        if (part && whole.contains(&h.name)) || (!part && known) {
            let e = perr(ProtocolError::Invalid {
                what: "upload file sent both whole and in parts",
                value: h.size,
            });
            return fail(&mut w, RequestStatus::Malformed, e);
        }
        if !known {
            files += 1;
        }
        total = total.saturating_add(h.size);
        if files > MAX_FILES || total > ctx.opts.max_upload_bytes {
            let e = perr(ProtocolError::Limit {
                what: "upload bytes",
                value: total,
                limit: ctx.opts.max_upload_bytes,
            });
            return fail(&mut w, RequestStatus::TooLarge, e);
        }
        let path = tmp.join(&h.name);
        if !known {
            let f = match File::options().write(true).create_new(true).open(&path) {
                Ok(f) => f,
                Err(e) => return fail(&mut w, RequestStatus::Malformed, io("create", &path)(e)),
            };
            parts.insert(h.name.clone(), Received::new(f));
        }
        let Some(into) = parts.get_mut(&h.name) else {
            unreachable!("inserted above");
        };
        match into.receive(&mut r, h.size, &mut buf) {
            Ok(()) => {}
            Err(ReceiveError::Read(source)) => {
                return Err(perr(ProtocolError::Io {
                    what: "read upload data",
                    source,
                }))
            }
            Err(ReceiveError::Write(e)) => {
                return fail(&mut w, RequestStatus::StoreFailed, io("write", &path)(e))
            }
        }
        if !part {
            let done = parts.remove(&h.name).map(|p| p.f.sync_all());
            if let Some(Err(e)) = done {
                return fail(&mut w, RequestStatus::StoreFailed, io("sync", &path)(e));
            }
            whole.insert(h.name);
        }
    }
    for (name, p) in &parts {
        if let Err(e) = p.f.sync_all() {
            let path = tmp.join(name);
            return fail(&mut w, RequestStatus::StoreFailed, io("sync", &path)(e));
        }
    }
    drop(parts);
    let layer = parent.as_ref().map(|(p, d)| (p, d));
    // Once a checkpoint, no upload is in progress: the lock goes before the receipt does.
    let (digest, index) = match guard.commit(&ctx.store, &hello.checkpoint, layer) {
        Ok(done) => done,
        Err(CommitError::Index(why)) => {
            let status = if parent.is_some() {
                RequestStatus::BadParent
            } else {
                RequestStatus::Malformed
            };
            let e = PageServerError::Criu {
                peer: peer.to_string(),
                what: format!(
                    "upload of {:?} does not index as a checkpoint: {why}",
                    hello.checkpoint
                ),
            };
            return fail(&mut w, status, e);
        }
        Err(CommitError::Store(e)) => return fail(&mut w, RequestStatus::StoreFailed, e),
        Err(CommitError::Exists) => {
            let e = PageServerError::Criu {
                peer: peer.to_string(),
                what: format!(
                    "checkpoint {:?} appeared during the upload",
                    hello.checkpoint
                ),
            };
            return fail(&mut w, RequestStatus::StoreFailed, e);
        }
    };
    // The index built to check the upload serves its restores (its files stay open across
    // the rename): a layer deep in a chain is not resolved a second time.
    ctx.store.insert(index);
    ctx.metrics.uploads.fetch_add(1, Relaxed);
    ctx.metrics.upload_bytes.fetch_add(total, Relaxed);
    ctx.refresh_store_gauges();
    let parent_id = parent.as_ref().map_or("", |(p, _)| p.checkpoint.as_str());
    tracing::info!(peer, checkpoint = %hello.checkpoint, parent = parent_id, files, bytes = total, "upload stored");
    let mut out = Vec::new();
    encode_response_header(0, RequestStatus::Ok, 0, &digest.to_message(), &mut out);
    let sent = w.write_all(&out).map_err(|source| {
        perr(ProtocolError::Io {
            what: "write upload receipt",
            source,
        })
    });
    // Too deep now: flatten it at once (the client has its receipt; restores of the layer use
    // the index cached above until the flattened one is swapped in).
    let depth = parent.as_ref().map_or(1, |(_, d)| d.depth + 1);
    drop(parent);
    let writeback = writeback_run(&ctx.store.root().join(&hello.checkpoint));
    if ctx.opts.flatten_depth.is_some_and(|limit| depth > limit) {
        flatten_soon(ctx, &hello.checkpoint);
    } else if writeback >= WRITEBACK_SQUASH_RUN
        && ctx
            .gc_soon
            .compare_exchange(false, true, Relaxed, Relaxed)
            .is_ok()
    {
        // The client's fetcher moves its session to the new layer right after the receipt;
        // only then is the layer it leaves free to be squashed.
        std::thread::sleep(WRITEBACK_SQUASH_DELAY);
        ctx.gc_soon.store(false, Relaxed);
        flatten_soon(ctx, &hello.checkpoint);
    }
    sent
}

/// Write-back layers on top of a chain from which retention runs soon after the upload: the
/// superseded ones (all but the newest, once the fetcher left them) are squashed into the
/// newest, so a container writing back every few seconds keeps its chain short, and each
/// squash copies the pages of a few layers, not of one per interval.
const WRITEBACK_SQUASH_RUN: usize = 4;
/// How long after such an upload retention runs (on the upload's connection, once its receipt
/// is sent; one at a time).
const WRITEBACK_SQUASH_DELAY: std::time::Duration = std::time::Duration::from_secs(1);

/// Write-back layers at the top of the chain of the layer in `dir` (`dir` included).
fn writeback_run(dir: &Path) -> usize {
    let mut n = 0;
    let mut at = dir.to_path_buf();
    while n <= MAX_PARENT_DEPTH && at.join(WRITEBACK_MARKER).is_file() {
        n += 1;
        at = at.join(PARENT_LINK);
    }
    n
}

/// Runs retention until it gets the store's gc lock (another run may hold it), for at most a
/// minute.
fn flatten_soon(ctx: &Ctx, id: &str) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        match ctx.gc() {
            Ok(r) => {
                tracing::info!(
                    checkpoint = id,
                    flattened = r.flattened.len(),
                    "retention after a deep upload"
                );
                return;
            }
            Err(e) if std::time::Instant::now() < deadline => {
                tracing::debug!(error = %distriproc_runtime::error_chain(&e), "retention busy; retrying");
                std::thread::sleep(std::time::Duration::from_millis(200));
            }
            Err(e) => {
                tracing::warn!(checkpoint = id, error = %distriproc_runtime::error_chain(&e), "retention after a deep upload failed");
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::net::TcpStream;
    use std::time::{Duration, Instant};

    use distriproc_runtime::protocol::upload::{FileHeader, FileKind};
    use distriproc_runtime::protocol::{
        read_response_header, Hello, HelloReply, HelloStatus, RequestStatus, HELLO_UPLOAD, VERSION,
    };

    use crate::{Server, ServerOptions};

    fn hello(id: &str, version: u16) -> Vec<u8> {
        Hello {
            version,
            checkpoint: id.into(),
            token: String::new(),
            client: "t".into(),
            criu_mode: false,
        }
        .encode_with_flags(HELLO_UPLOAD)
        .unwrap()
    }

    fn file(name: &str, size: u64) -> Vec<u8> {
        let mut b = Vec::new();
        FileHeader {
            kind: FileKind::File,
            name: name.into(),
            size,
        }
        .encode(&mut b)
        .unwrap();
        b
    }

    fn end(files: u64) -> Vec<u8> {
        let mut b = Vec::new();
        FileHeader {
            kind: FileKind::End,
            name: String::new(),
            size: files,
        }
        .encode(&mut b)
        .unwrap();
        b
    }

    fn empty(dir: &std::path::Path) -> bool {
        std::fs::read_dir(dir).map_or(true, |mut d| d.next().is_none())
    }

    #[test]
    fn failed_and_abandoned_uploads_leave_nothing() {
        let d = tempfile::tempdir().unwrap();
        let mut o = ServerOptions::for_store(d.path().to_path_buf());
        o.max_upload_bytes = 10_000;
        let srv = Server::start(o).unwrap();
        let addr = srv.addrs()[0].clone();
        let incoming = d.path().join(".distriproc/incoming");
        let connect = |id: &str, version| {
            let mut s = TcpStream::connect(&addr).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            s.write_all(&hello(id, version)).unwrap();
            let r = HelloReply::read(&mut s).unwrap();
            (s, r)
        };
        // Version 1 sessions cannot upload.
        let (_, r) = connect("v1", 1);
        assert_eq!(r.status, HelloStatus::Malformed);
        // Abandoned mid-file: the incoming directory goes away, nothing is published.
        let (mut s, r) = connect("gone", VERSION);
        assert_eq!(r.status, HelloStatus::Ok);
        s.write_all(&file("pages-1.img", 8192)).unwrap();
        s.write_all(&[1u8; 100]).unwrap();
        drop(s);
        // A wrong file count at the end is refused.
        let (mut s, _) = connect("count", VERSION);
        s.write_all(&file("a.img", 3)).unwrap();
        s.write_all(b"abc").unwrap();
        s.write_all(&end(2)).unwrap();
        assert_eq!(
            read_response_header(&mut s).unwrap().status,
            RequestStatus::Malformed
        );
        // Parts need version 5.
        let (mut s, r) = connect("old", 4);
        assert_eq!(r.status, HelloStatus::Ok);
        let mut b = Vec::new();
        FileHeader {
            kind: FileKind::Part,
            name: "pages-1.img".into(),
            size: 3,
        }
        .encode(&mut b)
        .unwrap();
        s.write_all(&b).unwrap();
        assert_eq!(
            read_response_header(&mut s).unwrap().status,
            RequestStatus::Malformed
        );
        // Over the server's limit: refused before the data is read.
        let (mut s, _) = connect("big", VERSION);
        s.write_all(&file("pages-1.img", 20_000)).unwrap();
        assert_eq!(
            read_response_header(&mut s).unwrap().status,
            RequestStatus::TooLarge
        );
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest);
        let t0 = Instant::now();
        while !empty(&incoming) && t0.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(empty(&incoming), "incoming uploads left behind");
        for id in ["v1", "gone", "count", "old", "big"] {
            assert!(!d.path().join(id).exists(), "{id} was published");
        }
        srv.shutdown();
    }

    #[test]
    fn sweep_removes_cut_uploads_and_keeps_live_ones() {
        use nix::fcntl::{Flock, FlockArg};

        use crate::checkpoint::Store;

        let d = tempfile::tempdir().unwrap();
        let store = Store::open(d.path(), 4).unwrap();
        let incoming = store.state_dir().join("incoming");
        std::fs::create_dir_all(incoming.join("cut.upload")).unwrap();
        std::fs::write(incoming.join("cut.upload/pages-1.img"), b"partial").unwrap();
        std::fs::create_dir_all(incoming.join("live.upload")).unwrap();
        std::fs::create_dir_all(incoming.join("other")).unwrap();
        let live = std::fs::File::open(incoming.join("live.upload")).unwrap();
        let lock = Flock::lock(live, FlockArg::LockExclusiveNonblock).unwrap();
        assert_eq!(super::sweep_incoming(&store), 1);
        assert!(
            !incoming.join("cut.upload").exists(),
            "a cut upload was kept"
        );
        assert!(
            incoming.join("live.upload").exists(),
            "a live upload was removed"
        );
        assert!(
            incoming.join("other").exists(),
            "a foreign entry was removed"
        );
        drop(lock);
        assert_eq!(super::sweep_incoming(&store), 1);
        assert!(!incoming.join("live.upload").exists());
    }
}
