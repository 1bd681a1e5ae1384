//! Retention of the node-local store: an entry lives while a containerd image holds the
//! checkpoint that references it.
//!
//! A checkpoint committed to the store ([`crate::store::commit`]) gets an owner record,
//! `<store>/.distriproc/owners/<id>.json` ([`Owner`]): the containerd (its API socket) and the
//! namespace the checkpoint was taken for. A sweep ([`sweep`]) runs after every checkpoint into
//! the store and every `gc_interval_s` in each shim process that uses the store. It asks every
//! recorded containerd which store entries its images still reference ([`CheckpointCatalog`]:
//! each image's checkpoint tar is read for its reference file, in every namespace), and marks
//! deleted the entries that are
//!
//! - older than `gc_grace_s` (containerd creates the image only after the shim's Checkpoint
//!   returned),
//! - not taken in one of `gc_keep_namespaces` (Docker keeps its checkpoints in its own
//!   directories and deletes containerd's image at once; CRI writes archives),
//! - referenced by no image of their containerd, and
//! - not leased: a running container restored from an entry, or whose next checkpoint would be
//!   a layer over it, holds a shared `flock` on it ([`crate::store::Entry`]).
//!
//! The page server's retention ([`distriproc_pageserver::gc::run`]) then removes what no other
//! layer reads, squashing a deleted parent into its one remaining layer. A containerd that
//! cannot be asked (not running, an unreadable image) keeps every entry it owns: nothing is
//! freed on a guess.

use std::collections::{BTreeMap, HashSet};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex as StdMutex};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use containerd_client::services::v1::{
    ListImagesRequest, ListNamespacesRequest, ReadContentRequest,
};
use containerd_client::{with_namespace, Client};
use distriproc_config::StoreConfig;
use distriproc_pageserver::checkpoint::Store;
use distriproc_pageserver::gc::{self, GcOptions};
use distriproc_pageserver::layers::Tombstones;
use distriproc_runtime::error_chain;
use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};
use tonic::Request;

use crate::remote::{RemoteReference, REFERENCE_FILE};

/// containerd's media type of a checkpoint's CRIU images tar.
pub const CHECKPOINT_MEDIA_TYPE: &str =
    "application/vnd.containerd.container.criu.checkpoint.criu.tar";
/// Index media types whose manifests may list a checkpoint tar.
const INDEX_MEDIA_TYPES: [&str; 2] = [
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
];
/// Owner records under the store's state directory.
const OWNERS_DIR: &str = "owners";
/// One sweep at a time per store.
const SWEEP_LOCK: &str = "retention.lock";
/// An index larger than this is not a checkpoint's.
const MAX_INDEX_BYTES: i64 = 4 << 20;
/// How much of a checkpoint tar one read fetches.
const READ_CHUNK: u64 = 256 << 10;
/// Bound on each call to containerd.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// Who a store entry was checkpointed for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Owner {
    /// containerd's API socket (the shim's `-address`).
    pub containerd: String,
    /// The containerd namespace of the checkpointed container.
    pub namespace: String,
    /// The checkpointed container.
    pub container: String,
    /// When the entry was committed (seconds since the epoch).
    pub created_unix: u64,
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn owners_dir(store: &Store) -> PathBuf {
    store.state_dir().join(OWNERS_DIR)
}

/// Records the owner of entry `id` of the store at `store_dir` (atomically replaced).
pub fn record_owner(store_dir: &Path, id: &str, owner: &Owner) -> std::io::Result<()> {
    let store = Store::open(store_dir, 1).map_err(std::io::Error::other)?;
    let dir = owners_dir(&store);
    std::fs::create_dir_all(&dir)?;
    let tmp = dir.join(format!(".{id}.tmp"));
    std::fs::write(
        &tmp,
        serde_json::to_vec(owner).map_err(std::io::Error::other)?,
    )?;
    File::open(&tmp)?.sync_all()?;
    std::fs::rename(&tmp, dir.join(format!("{id}.json")))
}

/// The owner records of `store` by entry id (unreadable records are skipped with a warning).
fn owners(store: &Store) -> BTreeMap<String, Owner> {
    let mut out = BTreeMap::new();
    for e in std::fs::read_dir(owners_dir(store))
        .into_iter()
        .flatten()
        .flatten()
    {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(id) = name.strip_suffix(".json") else {
            continue;
        };
        match std::fs::read(e.path())
            .map_err(|e| e.to_string())
            .and_then(|b| serde_json::from_slice::<Owner>(&b).map_err(|e| e.to_string()))
        {
            Ok(o) => {
                out.insert(id.to_owned(), o);
            }
            Err(why) => log::warn!("store retention: {}: {why}", e.path().display()),
        }
    }
    out
}

/// Which store entries a containerd's images hold.
#[async_trait]
pub trait CheckpointCatalog: Send + Sync {
    /// Ids of the checkpoints in the store with reference endpoint `endpoint` that images of
    /// the containerd at `address` reference, in any namespace. An error: nothing is known.
    async fn held(&self, address: &str, endpoint: &str) -> Result<HashSet<String>, String>;
}

/// What a sweep did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct SweepReport {
    /// Entries marked deleted (no image holds them).
    pub deleted: Vec<String>,
    /// Entries without an image but leased by a running container.
    pub leased: Vec<String>,
    /// Entries kept because their containerd could not be asked.
    pub unknown: Vec<String>,
    /// Bytes the page server's retention freed.
    pub freed_bytes: u64,
    /// Another sweep of the store was running.
    pub busy: bool,
}

/// The exclusive lock on entry `dir`, `None` while a shared lease (a restore or a container
/// building on the entry) holds it. Held while the entry is marked deleted, so no lease is
/// taken in between.
fn unleased(dir: &Path) -> Option<Flock<File>> {
    let f = File::open(dir).ok()?;
    Flock::lock(f, FlockArg::LockExclusiveNonblock).ok()
}

/// One retention pass over the store of `cfg` (see the module documentation).
pub async fn sweep(
    cfg: &StoreConfig,
    catalog: &dyn CheckpointCatalog,
) -> Result<SweepReport, String> {
    let store_dir = cfg.dir.clone();
    let store = Store::open(&store_dir, 1).map_err(|e| error_chain(&e))?;
    let lock_path = store.state_dir().join(SWEEP_LOCK);
    let lock_file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|e| format!("open {}: {e}", lock_path.display()))?;
    let Ok(_lock) = Flock::lock(lock_file, FlockArg::LockExclusiveNonblock) else {
        return Ok(SweepReport {
            busy: true,
            ..Default::default()
        });
    };
    let mut report = SweepReport::default();
    let tombstones = Tombstones::of(&store);
    let now = now_unix();
    let endpoint = crate::store::endpoint(&store_dir);
    let mut by_containerd: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let records = owners(&store);
    for (id, o) in &records {
        let young = now.saturating_sub(o.created_unix) < cfg.gc_grace_s;
        if !store.root().join(id).is_dir() {
            // Removed (by an earlier sweep's gc or `distriproc-pageserver delete` + `gc`).
            if !young {
                let _ = std::fs::remove_file(owners_dir(&store).join(format!("{id}.json")));
            }
            continue;
        }
        if young || tombstones.is_deleted(id) || cfg.gc_keep_namespaces.contains(&o.namespace) {
            continue;
        }
        by_containerd
            .entry(o.containerd.clone())
            .or_default()
            .push(id.clone());
    }
    for (address, ids) in by_containerd {
        let held = match catalog.held(&address, &endpoint).await {
            Ok(h) => h,
            Err(why) => {
                log::warn!(
                    "store retention {}: cannot list the checkpoints containerd {address} \
                     holds ({why}); keeping its {} entries",
                    store_dir.display(),
                    ids.len()
                );
                report.unknown.extend(ids);
                continue;
            }
        };
        for id in ids.into_iter().filter(|id| !held.contains(id)) {
            let Some(_exclusive) = unleased(&store.root().join(&id)) else {
                report.leased.push(id);
                continue;
            };
            tombstones
                .delete(&id)
                .map_err(|e| format!("mark {id:?} deleted: {e}"))?;
            log::info!(
                "store retention {}: checkpoint {id:?} of {:?} (namespace {:?}) is referenced \
                 by no image of containerd {address}: deleted",
                store_dir.display(),
                records[&id].container,
                records[&id].namespace
            );
            report.deleted.push(id);
        }
    }
    if !report.deleted.is_empty() {
        let gc_store = store_dir.clone();
        let gc = tokio::task::spawn_blocking(move || {
            let store = Store::open(&gc_store, 1)?;
            gc::run(&store, GcOptions::default())
        })
        .await
        .map_err(|e| format!("gc: {e}"))?
        .map_err(|e| format!("gc: {}", error_chain(&e)))?;
        report.freed_bytes = gc.freed_bytes;
        log::info!(
            "store retention {}: freed {} bytes",
            store_dir.display(),
            gc.freed_bytes
        );
    }
    Ok(report)
}

/// The sweeps of one shim process: one periodic sweep per store directory its containers
/// use, and one after each checkpoint into a store.
pub struct Sweeper {
    containerd: String,
    catalog: Arc<dyn CheckpointCatalog>,
    watched: StdMutex<HashSet<PathBuf>>,
}

impl Sweeper {
    /// Sweeps for the containerd at `containerd` (the shim's `-address`; empty: none, so
    /// nothing is recorded or swept).
    pub fn new(containerd: &str, catalog: Arc<dyn CheckpointCatalog>) -> Sweeper {
        Sweeper {
            containerd: containerd.to_owned(),
            catalog,
            watched: StdMutex::new(HashSet::new()),
        }
    }

    /// The owner record of a checkpoint of `container` in `namespace` taken now; `None`
    /// without a containerd address.
    pub fn owner(&self, namespace: &str, container: &str) -> Option<Owner> {
        (!self.containerd.is_empty()).then(|| Owner {
            containerd: self.containerd.clone(),
            namespace: namespace.to_owned(),
            container: container.to_owned(),
            created_unix: now_unix(),
        })
    }

    fn enabled(&self, cfg: &StoreConfig) -> bool {
        !self.containerd.is_empty() && cfg.gc_interval_s > 0 && cfg.dir.is_dir()
    }

    /// Starts the periodic sweep of `cfg`'s store in this process (once per directory).
    pub fn watch(self: &Arc<Self>, cfg: &StoreConfig) {
        if !self.enabled(cfg) {
            return;
        }
        let fresh = self
            .watched
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(cfg.dir.clone());
        if !fresh {
            return;
        }
        let (me, cfg) = (self.clone(), cfg.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(cfg.gc_interval_s));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tick.tick().await;
                me.run(&cfg).await;
            }
        });
    }

    /// Sweeps `cfg`'s store now, in the background.
    pub fn sweep_soon(self: &Arc<Self>, cfg: &StoreConfig) {
        if !self.enabled(cfg) {
            return;
        }
        let (me, cfg) = (self.clone(), cfg.clone());
        tokio::spawn(async move { me.run(&cfg).await });
    }

    async fn run(&self, cfg: &StoreConfig) {
        match sweep(cfg, self.catalog.as_ref()).await {
            Ok(r) if !r.leased.is_empty() => log::info!(
                "store retention {}: kept {} entries no image references while running                  containers hold them: {:?}",
                cfg.dir.display(),
                r.leased.len(),
                r.leased
            ),
            Ok(_) => {}
            Err(why) => log::warn!("store retention {}: {why}", cfg.dir.display()),
        }
    }
}

/// [`CheckpointCatalog`] over containerd's API.
pub struct Containerd;

#[async_trait]
impl CheckpointCatalog for Containerd {
    async fn held(&self, address: &str, endpoint: &str) -> Result<HashSet<String>, String> {
        let path = address
            .strip_prefix("unix://")
            .unwrap_or(address)
            .to_owned();
        let channel = tokio::time::timeout(CALL_TIMEOUT, containerd_client::connect(&path))
            .await
            .map_err(|_| format!("connect {path}: timed out"))?
            .map_err(|e| format!("connect {path}: {e}"))?;
        let client = Client::from(channel);
        let namespaces = call(client.namespaces().list(ListNamespacesRequest::default()))
            .await?
            .namespaces;
        let mut held = HashSet::new();
        let mut seen = HashSet::new();
        for ns in namespaces.iter().map(|n| n.name.as_str()) {
            let images = call(
                client
                    .images()
                    .list(with_namespace!(ListImagesRequest::default(), ns)),
            )
            .await?
            .images;
            for image in images {
                let Some(target) = image.target else { continue };
                for tar in checkpoint_tars(&client, ns, &target).await? {
                    if !seen.insert(tar.clone()) {
                        continue;
                    }
                    let reader = BlobReader::new(&client, ns, &tar.0, tar.1);
                    let found = tokio::task::spawn_blocking(move || reference_in_tar(reader))
                        .await
                        .map_err(|e| e.to_string())?
                        .map_err(|e| {
                            format!("image {:?}: checkpoint {}: {e}", image.name, tar.0)
                        })?;
                    if let Some(r) = found.filter(|r| r.endpoint == endpoint) {
                        held.insert(r.checkpoint);
                    }
                }
            }
        }
        Ok(held)
    }
}

/// Awaits a containerd call with [`CALL_TIMEOUT`].
async fn call<T>(
    f: impl std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> Result<T, String> {
    tokio::time::timeout(CALL_TIMEOUT, f)
        .await
        .map_err(|_| "containerd did not answer in time".to_string())?
        .map(tonic::Response::into_inner)
        .map_err(|s| format!("{}: {}", s.code(), s.message()))
}

/// The checkpoint tars (digest, size) an image's target is or lists.
async fn checkpoint_tars(
    client: &Client,
    ns: &str,
    target: &containerd_client::types::Descriptor,
) -> Result<Vec<(String, u64)>, String> {
    if target.media_type == CHECKPOINT_MEDIA_TYPE {
        return Ok(vec![(target.digest.clone(), target.size.max(0) as u64)]);
    }
    if !INDEX_MEDIA_TYPES.contains(&target.media_type.as_str()) || target.size > MAX_INDEX_BYTES {
        return Ok(Vec::new());
    }
    let bytes = read_all(client, ns, &target.digest).await?;
    #[derive(Deserialize)]
    struct Index {
        #[serde(default)]
        manifests: Vec<Desc>,
    }
    #[derive(Deserialize)]
    struct Desc {
        #[serde(rename = "mediaType", default)]
        media_type: String,
        digest: String,
        #[serde(default)]
        size: u64,
    }
    let index: Index =
        serde_json::from_slice(&bytes).map_err(|e| format!("index {}: {e}", target.digest))?;
    Ok(index
        .manifests
        .into_iter()
        .filter(|d| d.media_type == CHECKPOINT_MEDIA_TYPE)
        .map(|d| (d.digest, d.size))
        .collect())
}

/// A whole (small) blob.
async fn read_all(client: &Client, ns: &str, digest: &str) -> Result<Vec<u8>, String> {
    read_range(client.content(), ns, digest, 0, 0).await
}

/// `size` bytes of blob `digest` from `offset` (0: to the end).
async fn read_range(
    mut content: containerd_client::services::v1::content_client::ContentClient<
        tonic::transport::Channel,
    >,
    ns: &str,
    digest: &str,
    offset: u64,
    size: u64,
) -> Result<Vec<u8>, String> {
    let req = ReadContentRequest {
        digest: digest.to_owned(),
        offset: i64::try_from(offset).map_err(|e| e.to_string())?,
        size: i64::try_from(size).map_err(|e| e.to_string())?,
    };
    let mut stream = call(content.read(with_namespace!(req, ns))).await?;
    let mut out = Vec::new();
    loop {
        let next = tokio::time::timeout(CALL_TIMEOUT, stream.message())
            .await
            .map_err(|_| format!("read {digest}: containerd did not answer in time"))?
            .map_err(|s| format!("read {digest}: {}: {}", s.code(), s.message()))?;
        match next {
            Some(m) => out.extend_from_slice(&m.data),
            None => return Ok(out),
        }
    }
}

/// A containerd blob as `Read + Seek`, fetched in [`READ_CHUNK`]s (for `tar`, which skips
/// the file data it does not need by seeking). Used on a blocking thread.
struct BlobReader {
    content:
        containerd_client::services::v1::content_client::ContentClient<tonic::transport::Channel>,
    ns: String,
    digest: String,
    size: u64,
    pos: u64,
    buf: Vec<u8>,
    buf_at: u64,
    rt: tokio::runtime::Handle,
}

impl BlobReader {
    fn new(client: &Client, ns: &str, digest: &str, size: u64) -> BlobReader {
        BlobReader {
            content: client.content(),
            ns: ns.to_owned(),
            digest: digest.to_owned(),
            size,
            pos: 0,
            buf: Vec::new(),
            buf_at: 0,
            rt: tokio::runtime::Handle::current(),
        }
    }
}

impl Read for BlobReader {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        if self.pos >= self.size || out.is_empty() {
            return Ok(0);
        }
        let in_buf = self.pos >= self.buf_at && self.pos < self.buf_at + self.buf.len() as u64;
        if !in_buf {
            let len = READ_CHUNK.min(self.size - self.pos);
            self.buf = self
                .rt
                .block_on(read_range(
                    self.content.clone(),
                    &self.ns,
                    &self.digest,
                    self.pos,
                    len,
                ))
                .map_err(std::io::Error::other)?;
            self.buf_at = self.pos;
            if self.buf.is_empty() {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    format!("{} ends before its size {}", self.digest, self.size),
                ));
            }
        }
        let from = usize::try_from(self.pos - self.buf_at).map_err(std::io::Error::other)?;
        let n = out.len().min(self.buf.len() - from);
        out[..n].copy_from_slice(&self.buf[from..from + n]);
        self.pos += n as u64;
        Ok(n)
    }
}

impl Seek for BlobReader {
    fn seek(&mut self, to: SeekFrom) -> std::io::Result<u64> {
        let next = match to {
            SeekFrom::Start(p) => Some(p),
            SeekFrom::Current(d) => self.pos.checked_add_signed(d),
            SeekFrom::End(d) => self.size.checked_add_signed(d),
        };
        self.pos = next.ok_or_else(|| std::io::Error::other("seek before the start"))?;
        Ok(self.pos)
    }
}

/// The reference file of a checkpoint tar, `None` for a checkpoint without one (inline).
fn reference_in_tar<R: Read + Seek>(r: R) -> Result<Option<RemoteReference>, String> {
    let mut archive = tar::Archive::new(r);
    for entry in archive.entries_with_seek().map_err(|e| e.to_string())? {
        let mut entry = entry.map_err(|e| e.to_string())?;
        let path = entry.path().map_err(|e| e.to_string())?.into_owned();
        let top = path
            .components()
            .filter(|c| !matches!(c, std::path::Component::CurDir))
            .collect::<Vec<_>>();
        if top.len() == 1 && top[0].as_os_str() == REFERENCE_FILE {
            let mut text = Vec::new();
            entry
                .by_ref()
                .take(1 << 20)
                .read_to_end(&mut text)
                .map_err(|e| e.to_string())?;
            let r: RemoteReference =
                serde_json::from_slice(&text).map_err(|e| format!("{REFERENCE_FILE}: {e}"))?;
            return Ok(Some(r));
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    struct Fixed(Mutex<Result<HashSet<String>, String>>);

    #[async_trait]
    impl CheckpointCatalog for Fixed {
        async fn held(&self, _: &str, _: &str) -> Result<HashSet<String>, String> {
            self.0.lock().unwrap().clone()
        }
    }

    fn entry(store: &Path, id: &str, ns: &str, age_s: u64) {
        std::fs::create_dir_all(store.join(id)).unwrap();
        record_owner(
            store,
            id,
            &Owner {
                containerd: "/run/c.sock".into(),
                namespace: ns.into(),
                container: "c".into(),
                created_unix: now_unix() - age_s,
            },
        )
        .unwrap();
    }

    fn cfg(dir: &Path) -> StoreConfig {
        StoreConfig {
            dir: dir.to_path_buf(),
            gc_grace_s: 60,
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn deletes_only_old_unheld_unleased_entries_of_swept_namespaces() {
        let d = tempfile::tempdir().unwrap();
        entry(d.path(), "held", "default", 600);
        entry(d.path(), "gone", "default", 600);
        entry(d.path(), "young", "default", 1);
        entry(d.path(), "docker", "moby", 600);
        entry(d.path(), "leased", "default", 600);
        let _lease = Flock::lock(
            File::open(d.path().join("leased")).unwrap(),
            FlockArg::LockSharedNonblock,
        )
        .unwrap();
        let catalog = Fixed(Mutex::new(Ok(HashSet::from(["held".to_string()]))));
        let r = sweep(&cfg(d.path()), &catalog).await.unwrap();
        assert_eq!(r.deleted, vec!["gone".to_string()]);
        assert_eq!(r.leased, vec!["leased".to_string()]);
        let store = Store::open(d.path(), 1).unwrap();
        let t = Tombstones::of(&store);
        // Removed by the page server's retention (or at least marked deleted).
        assert!(t.is_deleted("gone") || !d.path().join("gone").exists());
        for kept in ["held", "young", "docker", "leased"] {
            assert!(!t.is_deleted(kept), "{kept}");
        }
    }

    #[tokio::test]
    async fn an_unreachable_containerd_frees_nothing() {
        let d = tempfile::tempdir().unwrap();
        entry(d.path(), "a", "default", 600);
        let catalog = Fixed(Mutex::new(Err("connection refused".into())));
        let r = sweep(&cfg(d.path()), &catalog).await.unwrap();
        assert!(r.deleted.is_empty());
        assert_eq!(r.unknown, vec!["a".to_string()]);
        assert!(!Tombstones::of(&Store::open(d.path(), 1).unwrap()).is_deleted("a"));
    }

    #[test]
    fn finds_the_reference_in_a_checkpoint_tar_and_none_inline() {
        let r = RemoteReference {
            version: 1,
            endpoint: "store:/s".into(),
            checkpoint: "abc".into(),
            lazy_pages: 1,
            pages_bytes: 4096,
            pagemap_checksum: "00".into(),
        };
        let mut b = tar::Builder::new(Vec::new());
        let add = |b: &mut tar::Builder<Vec<u8>>, name: &str, data: &[u8]| {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_cksum();
            b.append_data(&mut h, name, data).unwrap();
        };
        add(&mut b, "core-1.img", &[7u8; 10000]);
        add(&mut b, REFERENCE_FILE, &serde_json::to_vec(&r).unwrap());
        add(&mut b, "pages-1.img", &[1u8; 8192]);
        let tar = b.into_inner().unwrap();
        let found = reference_in_tar(std::io::Cursor::new(tar)).unwrap();
        assert_eq!(found, Some(r));
        let mut b = tar::Builder::new(Vec::new());
        add(&mut b, "pages-1.img", &[1u8; 8192]);
        let tar = b.into_inner().unwrap();
        assert_eq!(reference_in_tar(std::io::Cursor::new(tar)).unwrap(), None);
    }
}
