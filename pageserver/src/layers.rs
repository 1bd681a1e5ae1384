//! The layer graph of a store: which checkpoint is whose parent, which are deleted, and what
//! each one occupies.
//!
//! A checkpoint directory with a `parent -> ../<id>` link is a layer over checkpoint `<id>`
//! (see [`crate::upload`]). Deleting a checkpoint (`distriproc-pageserver delete`, or the
//! automatic expiry in [`crate::gc`]) writes a tombstone, `.distriproc/deleted/<id>`: from then
//! on the checkpoint is refused to new sessions and as a parent, but its directory stays as long
//! as a checkpoint that is not deleted resolves pages through it. [`crate::gc`] removes the rest.
//!
//! Each published layer records the digest it was published with (`distriproc-digest`, the
//! [`MemoryDigest`] text): compaction rewrites a layer's files without changing its memory, and
//! the digest a restore and a child upload check against is the one recorded. The record also
//! holds the checksum of the files it was written for: files changed since (by anything but
//! compaction, which records afresh) show as their own checksum, so a restore or a child
//! upload is refused as "not the memory of this checkpoint" rather than served other memory.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use distriproc_config::pageserver::validate_checkpoint_id;
use distriproc_runtime::fetcher::WRITEBACK_MARKER;
use distriproc_runtime::protocol::upload::{pagemap_checksum, MemoryDigest};

use crate::checkpoint::Store;

/// Name of the parent link in a layer (CRIU's name).
pub const PARENT_LINK: &str = "parent";
/// File in a checkpoint directory holding the digest it was published with.
pub const DIGEST_FILE: &str = "distriproc-digest";
/// Directory of tombstones under the state directory.
const DELETED_DIR: &str = "deleted";

/// The digest of the checkpoint in `dir`: the recorded one while its files are those it was
/// recorded for, else computed from its files (checkpoints published before digests were
/// recorded, CRIU pushes, and files changed behind the store's back).
pub fn layer_digest(dir: &Path) -> std::io::Result<MemoryDigest> {
    let files = pagemap_checksum(dir)?;
    let Ok(text) = std::fs::read_to_string(dir.join(DIGEST_FILE)) else {
        return Ok(files);
    };
    let mut lines = text.lines().map(str::trim);
    let Some(recorded) = lines.next().and_then(MemoryDigest::from_message) else {
        return Ok(files);
    };
    match lines
        .next()
        .and_then(|l| l.strip_prefix("files "))
        .and_then(MemoryDigest::from_message)
    {
        Some(was) if was != files => Ok(files),
        _ => Ok(recorded),
    }
}

/// Records `digest` as the digest of the checkpoint in `dir`, for the files `dir` holds now
/// (synced).
pub fn record_digest(dir: &Path, digest: &MemoryDigest) -> std::io::Result<()> {
    let files = pagemap_checksum(dir)?;
    let path = dir.join(DIGEST_FILE);
    let tmp = dir.join(format!(".{DIGEST_FILE}.tmp"));
    let f = std::fs::File::create(&tmp)?;
    let text = format!("{}\nfiles {}\n", digest.to_message(), files.to_message());
    std::io::Write::write_all(&mut &f, text.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, &path)
}

/// The parent id a checkpoint directory of the store at `root` links to, if any: `Ok(None)`
/// without a link, an error for a link that is broken or leaves the store.
pub fn parent_of(root: &Path, dir: &Path) -> Result<Option<String>, String> {
    let link = dir.join(PARENT_LINK);
    match std::fs::symlink_metadata(&link) {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("{}: {e}", link.display())),
    }
    let bad = |why: String| format!("{}: {why}", link.display());
    let target = std::fs::canonicalize(&link).map_err(|e| bad(format!("broken ({e})")))?;
    let root = std::fs::canonicalize(root).map_err(|e| bad(format!("store: {e}")))?;
    if target.parent() != Some(root.as_path()) {
        return Err(bad(format!("{} is not in the store", target.display())));
    }
    match target.file_name().and_then(|n| n.to_str()) {
        Some(id) if validate_checkpoint_id(id).is_ok() => Ok(Some(id.to_string())),
        _ => Err(bad(format!("{} is not a checkpoint", target.display()))),
    }
}

/// Tombstones of the store.
pub struct Tombstones {
    dir: PathBuf,
}

impl Tombstones {
    /// The tombstones of `store`.
    pub fn of(store: &Store) -> Tombstones {
        Tombstones {
            dir: store.state_dir().join(DELETED_DIR),
        }
    }

    /// Whether checkpoint `id` is deleted.
    pub fn is_deleted(&self, id: &str) -> bool {
        self.dir.join(id).exists()
    }

    /// Marks `id` deleted (idempotent; the file holds the deletion time).
    pub fn delete(&self, id: &str) -> std::io::Result<()> {
        std::fs::create_dir_all(&self.dir)?;
        let secs = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let tmp = self.dir.join(format!(".{id}.tmp"));
        std::fs::write(&tmp, format!("{secs}\n"))?;
        std::fs::rename(&tmp, self.dir.join(id))
    }

    /// Forgets the tombstone of a checkpoint whose directory is gone.
    pub fn clear(&self, id: &str) {
        let _ = std::fs::remove_file(self.dir.join(id));
    }

    /// Ids with a tombstone.
    pub fn list(&self) -> BTreeSet<String> {
        std::fs::read_dir(&self.dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|n| validate_checkpoint_id(n).is_ok())
            .collect()
    }
}

/// One checkpoint directory of the store.
#[derive(Debug, Clone)]
pub struct LayerInfo {
    /// Its parent, if it is a layer.
    pub parent: Option<String>,
    /// A parent link that is broken or leaves the store (the layer is served as it is; no
    /// checkpoint of the store is kept for it).
    pub bad_link: Option<String>,
    /// Tombstoned, or a write-back layer with a layer over it (see [`LayerMap::scan`]).
    pub deleted: bool,
    /// A write-back layer ([`WRITEBACK_MARKER`]).
    pub writeback: bool,
    /// Bytes of its files.
    pub bytes: u64,
    /// When it was published (the directory's modification time).
    pub published: SystemTime,
}

/// The layer graph of a store at one moment.
#[derive(Debug, Default)]
pub struct LayerMap {
    /// Every checkpoint directory, by id.
    pub layers: BTreeMap<String, LayerInfo>,
}

/// Totals of a [`LayerMap`], as `stats` and the metrics show them.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct StoreSummary {
    /// Checkpoints that are not deleted.
    pub checkpoints: u64,
    /// Checkpoint directories (including deleted ones still holding pages for others).
    pub layers: u64,
    /// Deleted checkpoints still on disk.
    pub deleted: u64,
    /// Bytes of all checkpoint directories.
    pub bytes: u64,
    /// Layers in the deepest chain.
    pub max_depth: u64,
}

impl LayerMap {
    /// Reads the store's checkpoint directories, links and tombstones.
    ///
    /// A write-back layer (the pages a running container wrote, published by its shim; marked
    /// by [`WRITEBACK_MARKER`]) counts as deleted once a layer is over it: no image refers to
    /// it, only the fetcher that wrote it reads it, and that fetcher moves to the layer over
    /// it. Retention then squashes it into that layer (or keeps it while a session reads it).
    /// Sessions are not refused for it: only a tombstone does that.
    pub fn scan(store: &Store) -> LayerMap {
        let dead = Tombstones::of(store).list();
        let mut layers = BTreeMap::new();
        for id in store.list() {
            let dir = store.root().join(&id);
            let (parent, bad_link) = match parent_of(store.root(), &dir) {
                Ok(p) => (p, None),
                Err(why) => (None, Some(why)),
            };
            let mut bytes = 0;
            for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
                if let Ok(m) = e.metadata() {
                    if m.is_file() {
                        bytes += m.len();
                    }
                }
            }
            let published = std::fs::metadata(&dir)
                .and_then(|m| m.modified())
                .unwrap_or(SystemTime::UNIX_EPOCH);
            layers.insert(
                id.clone(),
                LayerInfo {
                    parent,
                    bad_link,
                    deleted: dead.contains(&id),
                    writeback: dir.join(WRITEBACK_MARKER).is_file(),
                    bytes,
                    published,
                },
            );
        }
        let covered: BTreeSet<String> = layers.values().filter_map(|l| l.parent.clone()).collect();
        for (id, l) in &mut layers {
            if l.writeback && covered.contains(id) {
                l.deleted = true;
            }
        }
        LayerMap { layers }
    }

    /// Ids whose parent is `id`.
    pub fn children(&self, id: &str) -> Vec<&str> {
        self.layers
            .iter()
            .filter(|(_, l)| l.parent.as_deref() == Some(id))
            .map(|(c, _)| c.as_str())
            .collect()
    }

    /// The chain from `id` up to its base (`id` first); stops at a missing parent or a loop.
    pub fn chain(&self, id: &str) -> Vec<&str> {
        let mut out: Vec<&str> = Vec::new();
        let mut at = self.layers.get_key_value(id);
        while let Some((k, l)) = at {
            if out.contains(&k.as_str()) {
                break;
            }
            out.push(k.as_str());
            at = l
                .parent
                .as_deref()
                .and_then(|p| self.layers.get_key_value(p));
        }
        out
    }

    /// Checkpoints that must stay on disk: those not deleted and every layer they resolve
    /// pages through.
    pub fn needed(&self) -> BTreeSet<String> {
        let mut keep = BTreeSet::new();
        for (id, l) in &self.layers {
            if !l.deleted {
                keep.extend(self.chain(id).into_iter().map(str::to_string));
            }
        }
        keep
    }

    /// Totals.
    pub fn summary(&self) -> StoreSummary {
        let mut s = StoreSummary::default();
        for (id, l) in &self.layers {
            s.layers += 1;
            s.bytes += l.bytes;
            if l.deleted {
                s.deleted += 1;
            } else {
                s.checkpoints += 1;
            }
            s.max_depth = s.max_depth.max(self.chain(id).len() as u64);
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layer(store: &Path, id: &str, parent: Option<&str>) {
        let d = store.join(id);
        std::fs::create_dir(&d).unwrap();
        std::fs::write(d.join("pages-1.img"), vec![0u8; 4096]).unwrap();
        if let Some(p) = parent {
            std::os::unix::fs::symlink(format!("../{p}"), d.join(PARENT_LINK)).unwrap();
        }
    }

    #[test]
    fn graph_needed_and_summary() {
        let root = tempfile::tempdir().unwrap();
        let store = Store::open(root.path(), 4).unwrap();
        layer(root.path(), "a", None);
        layer(root.path(), "b", Some("a"));
        layer(root.path(), "c", Some("b"));
        layer(root.path(), "x", None);
        layer(root.path(), "odd", None);
        std::os::unix::fs::symlink("/etc", root.path().join("odd/parent")).unwrap();
        let t = Tombstones::of(&store);
        t.delete("a").unwrap();
        t.delete("b").unwrap();
        t.delete("x").unwrap();
        t.delete("odd").unwrap();
        assert!(t.is_deleted("a") && !t.is_deleted("c"));
        let m = LayerMap::scan(&store);
        assert_eq!(m.chain("c"), vec!["c", "b", "a"]);
        assert_eq!(m.children("a"), vec!["b"]);
        let needed: Vec<String> = m.needed().into_iter().collect();
        // c is live, so b and a stay; x and odd (its link leaves the store) are not needed.
        assert_eq!(needed, vec!["a", "b", "c"]);
        let s = m.summary();
        assert_eq!(
            (s.checkpoints, s.layers, s.deleted, s.max_depth),
            (1, 5, 4, 3)
        );
        assert_eq!(s.bytes, 5 * 4096);
        assert!(m.layers["odd"].bad_link.is_some());
    }

    #[test]
    fn recorded_digest_wins_over_the_files() {
        let d = tempfile::tempdir().unwrap();
        let computed = layer_digest(d.path()).unwrap();
        let rec = MemoryDigest {
            pages_bytes: 7,
            pagemap_checksum: 9,
        };
        record_digest(d.path(), &rec).unwrap();
        assert_eq!(layer_digest(d.path()).unwrap(), rec);
        assert_ne!(computed, rec);
        // Files changed since the record: their own checksum, not the record.
        std::fs::write(d.path().join("pages-1.img"), [0u8; 4096]).unwrap();
        let changed = layer_digest(d.path()).unwrap();
        assert_eq!(changed, pagemap_checksum(d.path()).unwrap());
        assert_ne!(changed, rec);
        // A record without the files line (older stores) is taken as it is.
        std::fs::write(
            d.path().join(DIGEST_FILE),
            format!("{}\n", rec.to_message()),
        )
        .unwrap();
        assert_eq!(layer_digest(d.path()).unwrap(), rec);
    }
}
