//! The node-local page store: where a checkpoint's memory stays when no page server takes it
//! (`[store] mode = "local"`, the default).
//!
//! The store is a page server's store directory: checkpoint `<dir>/<id>` is a CRIU images
//! directory committed by the code a page-server upload uses
//! (`distriproc_pageserver::upload::commit`: indexed, digest recorded, synced, renamed into
//! place), so `distriproc-pageserver --store <dir>` serves it unchanged and its `delete` and
//! `gc` commands retain it.
//!
//! A checkpoint ([`commit`]) hard-links the files runc wrote into the store (copies them when
//! the store is on another filesystem), so the memory is written to disk once, by CRIU. Then,
//! as for a remote checkpoint, containerd's directory loses its lazy pages
//! (`crate::remote::strip_lazy_pages` writes new files, the store's links keep the old ones)
//! and gains the reference file with endpoint `store:<dir>` ([`endpoint`]). A lazily restored
//! container's next checkpoint to the same store is a layer over its base (`parent` link).
//!
//! A restore serves the pages in-process from `<dir>/<id>` (`LocalImages`, parent chains
//! followed) after checking it is there and holds the memory the reference describes
//! ([`open_entry`]). While the container runs it holds a shared `flock` on the entry, which
//! retention leaves alone; entries no containerd image references any more are freed by
//! `crate::retention`.

use std::fs::File;
use std::path::{Path, PathBuf};

use distriproc_config::StoreMode;
use distriproc_pageserver::checkpoint::Store;
use distriproc_pageserver::upload::{check_parent, incoming_root, Incoming};
use distriproc_runtime::error_chain;
use distriproc_runtime::protocol::upload::{pagemap_checksum, MemoryDigest, ParentRef};
use nix::fcntl::{Flock, FlockArg};

use crate::remote::{
    checkpoint_id, strip_lazy_pages, write_reference, RemoteCheckpointError, RemoteReference,
    REFERENCE_FILE,
};

/// Scheme of a reference endpoint that names a node-local store.
pub const SCHEME: &str = "store:";

/// The reference endpoint of the store at `dir`.
pub fn endpoint(dir: &Path) -> String {
    format!("{SCHEME}{}", dir.display())
}

/// The store directory a reference endpoint names, `None` for a page server.
pub fn parse_endpoint(endpoint: &str) -> Option<PathBuf> {
    endpoint.strip_prefix(SCHEME).map(PathBuf::from)
}

type Result<T> = std::result::Result<T, RemoteCheckpointError>;

fn store_err(dir: &Path, detail: String) -> RemoteCheckpointError {
    RemoteCheckpointError::Store {
        dir: dir.to_path_buf(),
        detail,
    }
}

/// Links (else copies) `src` to `dst` and syncs it.
fn place(src: &Path, dst: &Path) -> std::io::Result<()> {
    if std::fs::hard_link(src, dst).is_err() {
        std::fs::copy(src, dst)?;
    }
    File::open(dst)?.sync_all()
}

/// Commits the checkpoint runc wrote into `dump` to the store at `store_dir` as a new
/// checkpoint of `container` (a layer over `parent` when its pagemaps leave pages to it),
/// then leaves in `dump` only what containerd keeps: metadata, eager pages, the reference.
/// `Ok(None)`: kept inline (a CRIU pre-dump chain).
pub fn commit(
    dump: &Path,
    store_dir: &Path,
    container: &str,
    parent: Option<&ParentRef>,
) -> Result<Option<RemoteReference>> {
    if std::fs::symlink_metadata(dump.join("parent")).is_ok() {
        log::warn!(
            "checkpoint of {container} in {} has a parent chain: kept inline",
            dump.display()
        );
        return Ok(None);
    }
    std::fs::create_dir_all(store_dir).map_err(|e| store_err(store_dir, format!("create: {e}")))?;
    let store = Store::open(store_dir, 1).map_err(|e| store_err(store_dir, error_chain(&e)))?;
    let id = checkpoint_id(container);
    let incoming = incoming_root(&store);
    std::fs::create_dir_all(&incoming)
        .map_err(|e| store_err(store_dir, format!("create {}: {e}", incoming.display())))?;
    let mut guard = Incoming::create(&store, &id)
        .map_err(|e| store_err(store_dir, format!("create the entry {id:?}: {e}")))?;
    let tmp = guard.dir().to_path_buf();
    for e in std::fs::read_dir(dump)
        .map_err(|e| store_err(store_dir, format!("list {}: {e}", dump.display())))?
    {
        let e = e.map_err(|e| store_err(store_dir, format!("list {}: {e}", dump.display())))?;
        let name = e.file_name();
        if name == REFERENCE_FILE {
            continue;
        }
        let src = e.path();
        if !e.file_type().is_ok_and(|t| t.is_file()) {
            return Err(store_err(
                store_dir,
                format!(
                    "{}: not a regular file; only flat image directories are stored",
                    src.display()
                ),
            ));
        }
        place(&src, &tmp.join(&name))
            .map_err(|e| store_err(store_dir, format!("store {}: {e}", src.display())))?;
    }
    let checked = match parent {
        Some(p) => Some((
            p,
            check_parent(&store, &id, p).map_err(|why| {
                store_err(
                    store_dir,
                    format!("parent {:?} refused: {why}", p.checkpoint),
                )
            })?,
        )),
        None => None,
    };
    let (digest, _) = guard
        .commit(&store, &id, checked.as_ref().map(|(p, d)| (*p, d)))
        .map_err(|e| store_err(store_dir, format!("checkpoint {id:?}: {e}")))?;
    drop(checked);
    let lazy_pages = strip_lazy_pages(dump)?;
    let r = RemoteReference {
        version: 1,
        endpoint: endpoint(store_dir),
        checkpoint: id,
        lazy_pages,
        pages_bytes: digest.pages_bytes,
        pagemap_checksum: format!("{:016x}", digest.pagemap_checksum),
    };
    write_reference(dump, &r)?;
    Ok(Some(r))
}

/// A store entry open for a restore: its directory, with a shared `flock` held while the
/// restored container may read it.
#[derive(Debug)]
pub struct Entry {
    /// `<store>/<id>`.
    pub dir: PathBuf,
    _lease: Flock<File>,
}

/// Takes the shared lease on entry `id` of the store at `store_dir` (just committed: no check
/// of its pages).
pub fn lease(store_dir: &Path, id: &str) -> Result<Entry> {
    let dir = store_dir.join(id);
    let f = File::open(&dir).map_err(|e| store_err(store_dir, format!("open {id:?}: {e}")))?;
    let lease = Flock::lock(f, FlockArg::LockSharedNonblock).map_err(|(_, e)| {
        store_err(
            store_dir,
            format!("checkpoint {id:?} is being removed or compacted ({e})"),
        )
    })?;
    Ok(Entry { dir, _lease: lease })
}

/// Opens checkpoint `id` of the store at `store_dir` for a restore: it must be there and hold
/// the memory `expect` describes (a truncated or rewritten entry is refused, not served).
pub fn open_entry(store_dir: &Path, id: &str, expect: MemoryDigest) -> Result<Entry> {
    distriproc_config::pageserver::validate_checkpoint_id(id)
        .map_err(|e| store_err(store_dir, format!("checkpoint {id:?}: {e}")))?;
    let dir = store_dir.join(id);
    if !dir.is_dir() {
        return Err(store_err(
            store_dir,
            format!(
                "has no checkpoint {id:?} on this node: its memory stays in the store of the \
                 node that took it (or the entry was deleted); restore it there, serve that \
                 store with distriproc-pageserver, or checkpoint with [store] mode = \"inline\""
            ),
        ));
    }
    let entry = lease(store_dir, id)?;
    let found = pagemap_checksum(&dir).map_err(|e| {
        store_err(
            store_dir,
            format!("checkpoint {id:?} is unreadable (corrupt?): {e}"),
        )
    })?;
    if found != expect {
        return Err(store_err(
            store_dir,
            format!(
                "checkpoint {id:?} holds {}, its reference says {}: the entry was truncated or \
                 changed; refusing to restore from it",
                found.to_message(),
                expect.to_message()
            ),
        ));
    }
    Ok(entry)
}

/// Where a checkpoint's memory goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MemoryDestination {
    /// Inside containerd's checkpoint (`[store] mode = "inline"`).
    Inline,
    /// The node-local store at this directory (the default).
    Store(PathBuf),
    /// The configured page server (`crate::remote`).
    PageServer,
}

impl MemoryDestination {
    /// The destination for a container with configuration `cfg` (annotations applied) and
    /// `annotations`: the page server when one is configured (or asked for), unless the
    /// container asks for an inline checkpoint; else the store mode's.
    pub fn of(
        cfg: &distriproc_config::ShimConfig,
        annotations: &std::collections::HashMap<String, String>,
    ) -> std::result::Result<MemoryDestination, String> {
        let inline_asked = annotations.contains_key(distriproc_config::ANNOTATION_STORE_MODE)
            && cfg.store.mode == StoreMode::Inline;
        if crate::remote::wanted(&cfg.pageserver, annotations)? && !inline_asked {
            return Ok(MemoryDestination::PageServer);
        }
        Ok(match cfg.store.mode {
            StoreMode::Local => MemoryDestination::Store(cfg.store.dir.clone()),
            StoreMode::Inline => MemoryDestination::Inline,
        })
    }

    /// For messages: "to the page server", "in the node-local store DIR".
    pub fn describe(&self) -> String {
        match self {
            MemoryDestination::Inline => "in the checkpoint".into(),
            MemoryDestination::Store(d) => format!("in the node-local store {}", d.display()),
            MemoryDestination::PageServer => "at the page server".into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn destination_follows_config_and_annotations() {
        let mut cfg = distriproc_config::ShimConfig::default();
        let none = HashMap::new();
        assert_eq!(
            MemoryDestination::of(&cfg, &none).unwrap(),
            MemoryDestination::Store(PathBuf::from(distriproc_config::DEFAULT_STORE_DIR))
        );
        cfg.store.mode = StoreMode::Inline;
        assert_eq!(
            MemoryDestination::of(&cfg, &none).unwrap(),
            MemoryDestination::Inline
        );
        cfg.pageserver.address = "127.0.0.1:7060".into();
        assert_eq!(
            MemoryDestination::of(&cfg, &none).unwrap(),
            MemoryDestination::PageServer
        );
        let inline = HashMap::from([(
            distriproc_config::ANNOTATION_STORE_MODE.to_string(),
            "inline".to_string(),
        )]);
        assert_eq!(
            MemoryDestination::of(&cfg, &inline).unwrap(),
            MemoryDestination::Inline
        );
        assert_eq!(endpoint(Path::new("/s")), "store:/s");
        assert_eq!(parse_endpoint("store:/s"), Some(PathBuf::from("/s")));
        assert_eq!(parse_endpoint("h:1"), None);
    }
}
