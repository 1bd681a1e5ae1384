//! Remote checkpoints: memory in the page server, metadata in containerd's checkpoint.
//!
//! With a page server configured (`[pageserver] address`), the shim's Checkpoint runs
//! `runc checkpoint` into the directory containerd gave it as usual, then [`publish`]es it:
//!
//! 1. refuses nothing but skips (keeps the checkpoint local) when the directory has a
//!    `parent` link (pre-dump chains stay local);
//! 2. uploads every file of the directory to the page server as the new checkpoint
//!    `<container>-<unix ms>-<shim pid>` (native protocol, `protocol::upload`: token,
//!    limits, stored atomically); the server's receipt must match the local [`MemoryDigest`];
//! 3. strips the lazy pages locally ([`strip_lazy_pages`]): every `PE_LAZY` pagemap entry loses
//!    `PE_PRESENT` and its data leaves `pages-<id>.img`, which keeps only the pages CRIU restores
//!    eagerly (stacks' top pages, file-backed private pages: a few hundred KiB), and every
//!    `PE_PARENT` entry becomes `PE_LAZY` — the images then look like a
//!    `criu dump --lazy-pages` and `criu restore --lazy-pages` needs nothing else locally;
//! 4. writes the reference file [`REFERENCE_FILE`].
//!
//! # Layers
//!
//! A container lazily restored from a checkpoint of this page server remembers it
//! ([`BaseLayer`]). Its next checkpoint to the same server is a layer over it: the pages still
//! remote are `PE_PARENT` entries (`distriproc_runtime::layer`), the upload names the base as
//! its parent (protocol v3, checked by the server against the digest recorded at restore), and
//! the server links the new checkpoint to it; a restore of the layer reads those pages through
//! the chain. Checkpointing to another server, or without a server, copies them instead.
//!
//! containerd then tars a directory without the memory. On restore, a checkpoint directory
//! holding the reference file is served by `RemotePages` (or `criu lazy-pages --ps-socket`);
//! the page server's `Info` answer must match the reference's digest, so a store that holds
//! something else under that id is detected before anything runs.
//!
//! # `distriproc-remote.json`
//!
//! ```json
//! {"version":1,"endpoint":"10.0.0.5:7060","checkpoint":"web-1-1763772000123-4242",
//!  "lazy_pages":65536,"pages_bytes":268582912,"pagemap_checksum":"9f0c3a...16 hex"}
//! ```
//!
//! `endpoint` is where the checkpoint was published; a restoring shim uses its own configured
//! `[pageserver] address` when it has one (another host may reach the server by another name)
//! and the reference's endpoint otherwise. `pages_bytes` and `pagemap_checksum` describe the
//! stored (unstripped) images, as `protocol::upload::pagemap_checksum` computes them.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use distriproc_config::pageserver::PageServerClientConfig;
use distriproc_runtime::error_chain;
use distriproc_runtime::images::write::PagemapWriter;
use distriproc_runtime::images::{ImageDir, PAGE_SIZE, PE_LAZY, PE_PARENT, PE_PRESENT};
use distriproc_runtime::protocol::upload::{pagemap_checksum, MemoryDigest, ParentRef};
use distriproc_runtime::remote::{upload_checkpoint, Endpoint, RemoteOptions};

use crate::dump_stream::Streamed;
use serde::{Deserialize, Serialize};

/// The reference file a remote checkpoint leaves in its directory.
pub const REFERENCE_FILE: &str = "distriproc-remote.json";
/// Per-container opt-in/out: `true` or `false` (default: remote when a page server is
/// configured).
pub const ANNOTATION_REMOTE: &str = "io.distriproc.remote-checkpoint";

/// Errors of publishing or using a remote checkpoint.
#[derive(Debug, thiserror::Error)]
pub enum RemoteCheckpointError {
    /// A file of the checkpoint directory could not be read or written.
    #[error("{what} {}", path.display())]
    Io {
        /// The operation.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The images could not be parsed.
    #[error("read the images of {}: {detail}", dir.display())]
    Images {
        /// The checkpoint directory.
        dir: PathBuf,
        /// The reader's error chain.
        detail: String,
    },
    /// The page server configuration or the reference is unusable.
    #[error("{0}")]
    Config(String),
    /// The page server failed or refused.
    #[error("page server: {0}")]
    Server(String),
    /// The node-local store failed or refused (`crate::store`).
    #[error("node-local store {}: {detail}", dir.display())]
    Store {
        /// The store directory.
        dir: PathBuf,
        /// What happened.
        detail: String,
    },
    /// The page server holds other memory than the reference describes.
    #[error("page server {endpoint} holds checkpoint {checkpoint:?} with {found}, the reference says {expected}: not the memory of this checkpoint")]
    Mismatch {
        /// Where.
        endpoint: String,
        /// The id.
        checkpoint: String,
        /// The server's digest.
        found: String,
        /// The reference's digest.
        expected: String,
    },
}

type Result<T> = std::result::Result<T, RemoteCheckpointError>;

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> RemoteCheckpointError {
    let path = path.to_path_buf();
    move |source| RemoteCheckpointError::Io { what, path, source }
}

/// The content of [`REFERENCE_FILE`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RemoteReference {
    /// Format version (1).
    pub version: u32,
    /// `HOST:PORT` or `unix:PATH` the checkpoint was published to.
    pub endpoint: String,
    /// The checkpoint id in the page server's store.
    pub checkpoint: String,
    /// Lazy pages whose data lives only in the page server.
    pub lazy_pages: u64,
    /// Bytes of the stored `pages-*.img`.
    pub pages_bytes: u64,
    /// Checksum of the stored `pagemap-*.img` (16 hex digits).
    pub pagemap_checksum: String,
}

impl RemoteReference {
    /// The digest the page server must report.
    pub fn digest(&self) -> Result<MemoryDigest> {
        let sum = u64::from_str_radix(&self.pagemap_checksum, 16).map_err(|e| {
            RemoteCheckpointError::Config(format!(
                "{REFERENCE_FILE}: pagemap_checksum {:?}: {e}",
                self.pagemap_checksum
            ))
        })?;
        Ok(MemoryDigest {
            pages_bytes: self.pages_bytes,
            pagemap_checksum: sum,
        })
    }
}

/// The stored checkpoint a container was lazily restored from.
#[derive(Debug, Clone)]
pub struct BaseLayer {
    /// The page server the restore read from (`Endpoint` text).
    pub endpoint: String,
    /// The checkpoint there and its digest as the reference recorded it.
    pub parent: ParentRef,
    /// For a node-local store entry: its lease, held while the container may build on it (the
    /// store's retention leaves a leased entry alone).
    pub lease: Option<std::sync::Arc<crate::store::Entry>>,
}

impl BaseLayer {
    /// The page server's address as `[pageserver] address` takes it (`endpoint` is the
    /// `Endpoint` text, `tcp:HOST:PORT` or `unix:PATH`).
    pub fn address(&self) -> &str {
        self.endpoint
            .strip_prefix("tcp:")
            .unwrap_or(self.endpoint.as_str())
    }

    /// Whether a checkpoint published with `cfg` goes to the server that holds this layer.
    pub fn same_server(&self, cfg: &PageServerClientConfig) -> bool {
        client(cfg, None, &self.parent.checkpoint, "layer")
            .is_ok_and(|(endpoint, _)| endpoint.to_string() == self.endpoint)
    }
}

impl BaseLayer {
    /// The layer a checkpoint just published with `cfg` (and described by `r`) becomes for
    /// the container's next checkpoint.
    pub fn published(cfg: &PageServerClientConfig, r: &RemoteReference) -> Result<BaseLayer> {
        let (endpoint, _) = client(cfg, None, &r.checkpoint, "layer")?;
        Ok(BaseLayer {
            endpoint: endpoint.to_string(),
            parent: ParentRef {
                checkpoint: r.checkpoint.clone(),
                digest: r.digest()?,
            },
            lease: None,
        })
    }

    /// The layer a checkpoint just committed to a node-local store (described by `r`) becomes
    /// for the container's next checkpoint.
    /// `lease` holds the entry.
    pub fn stored(
        r: &RemoteReference,
        lease: std::sync::Arc<crate::store::Entry>,
    ) -> Result<BaseLayer> {
        Ok(BaseLayer {
            endpoint: r.endpoint.clone(),
            parent: ParentRef {
                checkpoint: r.checkpoint.clone(),
                digest: r.digest()?,
            },
            lease: Some(lease),
        })
    }
}

/// A container's base layer, shared by its checkpoints and its write-back (each replaces it
/// with the layer it publishes over it; `crate::writeback`). Hold the fetcher's layer turn
/// (`ResidencyProbe::layer_turn`) from reading it to replacing it.
#[derive(Debug, Clone, Default)]
pub struct SharedBase(std::sync::Arc<std::sync::Mutex<Option<BaseLayer>>>);

impl SharedBase {
    /// The layer now.
    pub fn get(&self) -> Option<BaseLayer> {
        self.lock().clone()
    }

    /// Replaces it.
    pub fn set(&self, b: Option<BaseLayer>) {
        *self.lock() = b;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<BaseLayer>> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Reads the reference file of `dir`; `None` for a local checkpoint.
pub fn read_reference(dir: &Path) -> Result<Option<RemoteReference>> {
    let path = dir.join(REFERENCE_FILE);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io("read", &path)(e)),
    };
    let r: RemoteReference = serde_json::from_str(&text)
        .map_err(|e| RemoteCheckpointError::Config(format!("{}: {e}", path.display())))?;
    if r.version != 1 {
        return Err(RemoteCheckpointError::Config(format!(
            "{}: version {} (this shim reads version 1)",
            path.display(),
            r.version
        )));
    }
    Ok(Some(r))
}

/// Whether a checkpoint of a container with `annotations` goes to the page server.
pub fn wanted(
    cfg: &PageServerClientConfig,
    annotations: &HashMap<String, String>,
) -> std::result::Result<bool, String> {
    let configured = !cfg.address.is_empty();
    match annotations.get(ANNOTATION_REMOTE).map(|s| s.trim()) {
        None => Ok(configured),
        Some("false") => Ok(false),
        Some("true") if configured => Ok(true),
        Some("true") => Err(format!(
            "annotation {ANNOTATION_REMOTE}=true but no [pageserver] address is configured"
        )),
        Some(v) => Err(format!(
            "annotation {ANNOTATION_REMOTE}={v:?}: expected true or false"
        )),
    }
}

/// The page-server endpoint and client options to reach checkpoint `id` (the configured
/// address, else `fallback`).
pub fn client(
    cfg: &PageServerClientConfig,
    fallback: Option<&str>,
    id: &str,
    label: &str,
) -> Result<(Endpoint, RemoteOptions)> {
    let mut cfg = cfg.clone();
    if cfg.address.is_empty() {
        cfg.address = fallback.unwrap_or_default().to_string();
    }
    RemoteOptions::from_config(&cfg, id, label)
        .map_err(|e| RemoteCheckpointError::Config(error_chain(&e)))?
        .ok_or_else(|| RemoteCheckpointError::Config("no page server address".into()))
}

/// A checkpoint id for container `container`: its id cut to allowed characters, the time and
/// the shim's pid.
pub fn checkpoint_id(container: &str) -> String {
    let base: String = container
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '_'
            }
        })
        .take(80)
        .collect();
    let base = base.trim_start_matches(['.', '-']);
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0);
    format!(
        "{}-{ms}-{}",
        if base.is_empty() { "ckpt" } else { base },
        std::process::id()
    )
}

/// Starts sending the pages files of the checkpoint directory `dir` while CRIU writes them
/// (`[pageserver] upload_during_dump`), for [`publish`]; `None` when it is off or the client
/// configuration is unusable (then `publish` reports that).
pub fn start_dump_stream(
    cfg: &PageServerClientConfig,
    container: &str,
    dir: &str,
) -> Option<crate::dump_stream::DumpStreamer> {
    if !cfg.upload_during_dump {
        return None;
    }
    let id = checkpoint_id(container);
    let (endpoint, opts) = client(cfg, None, &id, container).ok()?;
    Some(crate::dump_stream::DumpStreamer::start(
        PathBuf::from(dir),
        endpoint,
        opts,
    ))
}

/// Publishes the checkpoint in `dir` to the page server (see the module documentation), as a
/// layer over `parent` when its pagemaps leave pages to it. `Ok(None)`: kept local (a CRIU
/// parent chain).
pub fn publish(
    dir: &Path,
    cfg: &PageServerClientConfig,
    container: &str,
    parent: Option<&ParentRef>,
    streamed: Option<Streamed>,
) -> Result<Option<RemoteReference>> {
    if std::fs::symlink_metadata(dir.join("parent")).is_ok() {
        log::warn!(
            "checkpoint of {container} in {} has a parent chain: kept local",
            dir.display()
        );
        return Ok(None);
    }
    let digest = pagemap_checksum(dir).map_err(io("read pagemaps in", dir))?;
    let mut files = Vec::new();
    for e in std::fs::read_dir(dir).map_err(io("list", dir))? {
        let e = e.map_err(io("list", dir))?;
        let ft = e.file_type().map_err(io("stat in", dir))?;
        let name = e.file_name().to_string_lossy().into_owned();
        if name == REFERENCE_FILE {
            continue;
        }
        if !ft.is_file() {
            return Err(RemoteCheckpointError::Config(format!(
                "{}: {name} is not a regular file; only flat image directories are published",
                dir.display()
            )));
        }
        files.push(name);
    }
    files.sort();
    let mut done = None;
    let tried_streaming = streamed.is_some();
    if let Some(st) = streamed.filter(|_| parent.is_none()) {
        let streamed_bytes = st.bytes();
        match finish_streamed(dir, &files, st) {
            Ok((id, receipt)) if receipt == digest => {
                log::info!(
                    "checkpoint of {container}: {streamed_bytes} bytes of pages were sent while \
                     CRIU wrote them"
                );
                done = Some((id, receipt));
            }
            Ok((id, receipt)) => log::warn!(
                "checkpoint of {container}: the upload streamed during the dump stored other \
                 memory ({} instead of {}); uploading it again. {id:?} is left on the page \
                 server, referenced by nothing (distriproc-pageserver delete {id})",
                receipt.to_message(),
                digest.to_message()
            ),
            Err(why) => log::warn!(
                "checkpoint of {container}: the upload during the dump did not complete \
                 ({why}); uploading it after the dump"
            ),
        }
    }
    let (id, receipt) = match done {
        Some(d) => d,
        None => {
            if tried_streaming {
                // A new id: its time in ms must differ from the abandoned upload's.
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
            let id = checkpoint_id(container);
            let (endpoint, opts) = client(cfg, None, &id, container)?;
            let receipt = upload_checkpoint(&endpoint, &opts, dir, &files, parent)
                .map_err(|e| RemoteCheckpointError::Server(error_chain(&e)))?;
            (id, receipt)
        }
    };
    if receipt != digest {
        let (endpoint, _) = client(cfg, None, &id, container)?;
        return Err(RemoteCheckpointError::Mismatch {
            endpoint: endpoint.to_string(),
            checkpoint: id,
            found: receipt.to_message(),
            expected: digest.to_message(),
        });
    }
    let lazy_pages = strip_lazy_pages(dir)?;
    let r = RemoteReference {
        version: 1,
        endpoint: cfg.address.clone(),
        checkpoint: id,
        lazy_pages,
        pages_bytes: digest.pages_bytes,
        pagemap_checksum: format!("{:016x}", digest.pagemap_checksum),
    };
    write_reference(dir, &r)?;
    Ok(Some(r))
}

/// Writes `r` as the reference file of `dir` (atomically).
pub fn write_reference(dir: &Path, r: &RemoteReference) -> Result<()> {
    let path = dir.join(REFERENCE_FILE);
    let tmp = dir.join(format!(".{REFERENCE_FILE}.tmp"));
    let json = serde_json::to_string(r).unwrap_or_default();
    std::fs::write(&tmp, json).map_err(io("write", &tmp))?;
    std::fs::rename(&tmp, &path).map_err(io("write", &path))
}

/// Completes an upload streamed during the dump: the rest of every pages file it sent part
/// of, the other files whole; the id and the receipt.
fn finish_streamed(
    dir: &Path,
    files: &[String],
    st: Streamed,
) -> std::result::Result<(String, MemoryDigest), String> {
    let mut up = match (st.upload, st.failed) {
        (Some(up), _) => up,
        (None, Some(why)) => return Err(why),
        (None, None) => return Err("nothing was written while it ran".into()),
    };
    let id = up.checkpoint().to_string();
    for name in files {
        let Some(&sent) = st.sent.get(name) else {
            up.send_file(dir, name).map_err(|e| error_chain(&e))?;
            continue;
        };
        let path = dir.join(name);
        let mut f = File::open(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        let size = f
            .metadata()
            .map_err(|e| format!("{}: {e}", path.display()))?
            .len();
        if size < sent {
            return Err(format!(
                "{} shrank below the {sent} bytes already sent",
                path.display()
            ));
        }
        up.send_part(name, &path, &mut f, sent, size - sent)
            .map_err(|e| error_chain(&e))?;
    }
    if let Some(gone) = st.sent.keys().find(|n| !files.contains(n)) {
        return Err(format!("{gone} was sent but is no longer in the directory"));
    }
    let receipt = up.finish().map_err(|e| error_chain(&e))?;
    Ok((id, receipt))
}

/// Removes the data of every lazy page from the task pagemaps and pages files of `dir`
/// (entries with `PE_LAZY` lose `PE_PRESENT`, `PE_PARENT` entries become `PE_LAZY`: their data
/// is in the page server's parent layer; the pages file keeps the other present pages in
/// pagemap order). Returns the pages left to the page server.
pub fn strip_lazy_pages(dir: &Path) -> Result<u64> {
    let img = ImageDir::open(dir).map_err(|e| RemoteCheckpointError::Images {
        dir: dir.to_path_buf(),
        detail: error_chain(&e),
    })?;
    let mut removed = 0u64;
    for pid in distriproc_runtime::images::task_pagemap_pids(dir).map_err(io("list", dir))? {
        let (pages_id, entries) =
            img.pagemap_entries(pid)
                .map_err(|e| RemoteCheckpointError::Images {
                    dir: dir.to_path_buf(),
                    detail: error_chain(&e),
                })?;
        let pages_path = dir.join(format!("pages-{pages_id}.img"));
        let mut src =
            std::io::BufReader::new(File::open(&pages_path).map_err(io("open", &pages_path))?);
        let mut out =
            PagemapWriter::create(dir, pid, pages_id).map_err(io("write", &pages_path))?;
        for e in &entries {
            let put = if e.flags & PE_PARENT != 0 && e.flags & PE_PRESENT == 0 {
                // Its data is in the page server's parent layer.
                removed += e.nr_pages;
                out.hole(e.vaddr, e.nr_pages, PE_LAZY)
            } else if e.flags & PE_PRESENT != 0 && e.flags & PE_LAZY != 0 {
                removed += e.nr_pages;
                let len = i64::try_from(e.nr_pages * PAGE_SIZE).unwrap_or(i64::MAX);
                src.seek_relative(len).map_err(io("read", &pages_path))?;
                out.hole(e.vaddr, e.nr_pages, e.flags & !PE_PRESENT)
            } else if e.flags & PE_PRESENT != 0 {
                out.copy_from(e.vaddr, e.nr_pages, e.flags, &mut src)
            } else {
                out.hole(e.vaddr, e.nr_pages, e.flags)
            };
            put.map_err(io("copy pages from", &pages_path))?;
        }
        out.commit().map_err(io("replace", &pages_path))?;
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use distriproc_runtime::images::testutil::{pm, write_inventory, write_pagemap};
    use std::io::Write;

    #[test]
    fn strip_keeps_eager_pages_and_marks_lazy_absent() {
        let d = tempfile::tempdir().unwrap();
        write_inventory(d.path()).unwrap();
        write_pagemap(
            d.path(),
            1,
            1,
            &[
                pm(0x1000, 1, PE_PRESENT),
                pm(0x10000, 2, PE_LAZY | PE_PRESENT),
                pm(0x20000, 1, PE_PRESENT),
                pm(0x30000, 3, PE_PARENT),
            ],
        )
        .unwrap();
        let mut pages = vec![1u8; 4096];
        pages.extend_from_slice(&[2u8; 8192]);
        pages.extend_from_slice(&[3u8; 4096]);
        std::fs::write(d.path().join("pages-1.img"), &pages).unwrap();
        assert_eq!(strip_lazy_pages(d.path()).unwrap(), 5);
        let after = std::fs::read(d.path().join("pages-1.img")).unwrap();
        assert_eq!(after.len(), 8192);
        assert!(after[..4096].iter().all(|b| *b == 1));
        assert!(after[4096..].iter().all(|b| *b == 3));
        let img = ImageDir::open(d.path()).unwrap();
        let (_, e) = img.pagemap_entries(1).unwrap();
        assert_eq!(e[1].flags, PE_LAZY);
        assert_eq!(e[2].flags, PE_PRESENT);
        assert_eq!((e[3].flags, e[3].nr_pages), (PE_LAZY, 3));
        let map = img.pagemap(1).unwrap();
        assert_eq!(map.present_pages(), 2);
    }

    #[test]
    fn annotation_and_reference() {
        let none = PageServerClientConfig::default();
        let set = PageServerClientConfig {
            address: "127.0.0.1:7060".into(),
            ..Default::default()
        };
        let a = |v: &str| HashMap::from([(ANNOTATION_REMOTE.to_string(), v.to_string())]);
        assert!(!wanted(&none, &HashMap::new()).unwrap());
        assert!(wanted(&set, &HashMap::new()).unwrap());
        assert!(!wanted(&set, &a("false")).unwrap());
        assert!(wanted(&none, &a("true")).is_err());
        assert!(wanted(&set, &a("yes")).is_err());
        let id = checkpoint_id("../we ird/id");
        distriproc_config::pageserver::validate_checkpoint_id(&id).unwrap();
        let d = tempfile::tempdir().unwrap();
        assert!(read_reference(d.path()).unwrap().is_none());
        std::fs::write(
            d.path().join(REFERENCE_FILE),
            r#"{"version":1,"endpoint":"h:1","checkpoint":"c","lazy_pages":1,"pages_bytes":4096,"pagemap_checksum":"00000000000000ff"}"#,
        )
        .unwrap();
        let r = read_reference(d.path()).unwrap().unwrap();
        assert_eq!(r.digest().unwrap().pagemap_checksum, 255);
        std::fs::write(d.path().join(REFERENCE_FILE), "{}").unwrap();
        assert!(read_reference(d.path()).is_err());
    }

    #[test]
    fn publish_streams_pages_written_during_the_dump_and_falls_back() {
        use distriproc_pageserver::{Server, ServerOptions};
        let d = tempfile::tempdir().unwrap();
        let store = d.path().join("store");
        std::fs::create_dir_all(&store).unwrap();
        let srv = Server::start(ServerOptions::for_store(store.clone())).unwrap();
        let cfg = PageServerClientConfig {
            address: srv.addrs()[0].clone(),
            ..Default::default()
        };
        let pages: Vec<u8> = (1..=4u8).flat_map(|i| [i; 4096]).collect();
        let dump = |dir: &Path| {
            std::fs::create_dir_all(dir).unwrap();
            write_inventory(dir).unwrap();
            write_pagemap(dir, 1, 1, &[pm(0x10000, 4, PE_LAZY | PE_PRESENT)]).unwrap();
        };
        // "CRIU" writes half of the pages, then the rest while the streamer follows.
        let img = d.path().join("img");
        std::fs::create_dir_all(&img).unwrap();
        let streamer = start_dump_stream(&cfg, "c", img.to_str().unwrap()).unwrap();
        let mut f = File::create(img.join("pages-1.img")).unwrap();
        f.write_all(&pages[..8192]).unwrap();
        let t0 = std::time::Instant::now();
        std::thread::sleep(std::time::Duration::from_millis(300));
        f.write_all(&pages[8192..]).unwrap();
        drop(f);
        dump(&img);
        let st = streamer.stop();
        assert!(st.failed.is_none(), "{:?}", st.failed);
        assert!(
            st.bytes() >= 8192,
            "only {} bytes streamed in {:?}",
            st.bytes(),
            t0.elapsed()
        );
        let r = publish(&img, &cfg, "c", None, Some(st)).unwrap().unwrap();
        assert_eq!(
            std::fs::read(store.join(&r.checkpoint).join("pages-1.img")).unwrap(),
            pages
        );
        let rp = distriproc_runtime::remote::RemotePages::connect(
            cfg.address.parse().unwrap(),
            RemoteOptions::new(&r.checkpoint),
        )
        .unwrap();
        assert_eq!(rp.info().unwrap(), r.digest().unwrap());
        // A streamed upload that failed: the directory is uploaded after the dump instead.
        let img2 = d.path().join("img2");
        dump(&img2);
        std::fs::write(img2.join("pages-1.img"), &pages).unwrap();
        let failed = Streamed {
            failed: Some("the page server went away".into()),
            ..Streamed::default()
        };
        let r2 = publish(&img2, &cfg, "c", None, Some(failed))
            .unwrap()
            .unwrap();
        assert_ne!(r2.checkpoint, r.checkpoint);
        assert_eq!(
            std::fs::read(store.join(&r2.checkpoint).join("pages-1.img")).unwrap(),
            pages
        );
        srv.shutdown();
    }
}
