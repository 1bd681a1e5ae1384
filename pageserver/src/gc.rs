//! Retention: removing the layers no checkpoint needs, and squashing the deleted ones that
//! remain inside a chain.
//!
//! A run ([`run`], `distriproc-pageserver gc`, and every `gc_interval_s` inside the server):
//!
//! 1. With `expire_superseded_after_s` set, a checkpoint that has a layer over it published
//!    longer ago than that is deleted (its tombstone written, [`crate::layers::Tombstones`]):
//!    in a migration chain each checkpoint is superseded by the next one, so only the newest
//!    checkpoints stay restorable.
//! 2. Every deleted checkpoint that no checkpoint still restorable resolves pages through is
//!    removed.
//! 3. Every deleted checkpoint that remains with exactly one layer over it is squashed into
//!    that layer ([`crate::compact`]): chains stay as deep as the restorable checkpoints make
//!    them, and pages a later layer overwrote are freed.
//! 4. With `flatten_depth` set, a layer whose chain is deeper than that is made self-contained:
//!    everything it reads through the chain is copied into it in the same one-pass way
//!    (`compact::squash` over its whole chain), the layers below are left as they are. The
//!    server runs this right after an upload that made a chain too deep, so a container that
//!    migrates again and again never reaches the 32-layer limit, and no read goes through more
//!    than `flatten_depth` layers. It costs one more copy of the memory in the store per
//!    `flatten_depth` checkpoints, until the older ones are deleted.
//!
//! Safety against concurrent work on the same store, by this or another process: one run at a
//! time (`.distriproc/gc.lock`); an upload holds a shared `flock` on its parent's directory
//! until it is published, a read session on its checkpoint's directory while it lasts, and a
//! run skips a layer whose directory it cannot lock exclusively;
//! a deleted checkpoint is never accepted as a parent; layers are swapped or removed under the
//! store's exclusive index lock ([`Store::index_lock`]), so no index is built from half a
//! change. A removed layer is first renamed into `.distriproc/trash/` and deleted from there;
//! leftovers of a run cut short (trash, half-built squashes) are removed by the next run.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use nix::fcntl::{Flock, FlockArg};

use crate::checkpoint::Store;
use crate::compact::{self, COMPACT_DIR};
use crate::layers::{LayerMap, StoreSummary, Tombstones};
use crate::PageServerError;

/// The run lock under the state directory.
const GC_LOCK: &str = "gc.lock";
/// Where removed layers go before they are deleted.
const TRASH_DIR: &str = "trash";

/// What a run may do.
#[derive(Debug, Clone, Copy, Default)]
pub struct GcOptions {
    /// Delete checkpoints superseded (a layer over them published) longer ago than this.
    pub expire_superseded_after: Option<Duration>,
    /// Flatten layers whose chain is deeper than this (copy what they read through the chain
    /// into them).
    pub flatten_depth: Option<usize>,
    /// Report only: nothing is deleted, removed or squashed.
    pub dry_run: bool,
}

/// What a run did (or, dry, would do).
#[derive(Debug, Clone, Default)]
pub struct GcReport {
    /// Checkpoints deleted by the expiry.
    pub expired: Vec<String>,
    /// Layers removed.
    pub removed: Vec<String>,
    /// (squashed layer, the layer it went into, pages moved into that layer by its squash).
    pub squashed: Vec<(String, String, u64)>,
    /// (layer made self-contained, pages copied into it).
    pub flattened: Vec<(String, u64)>,
    /// Layers left alone this time, and why.
    pub skipped: Vec<(String, String)>,
    /// Bytes no longer used by checkpoint directories.
    pub freed_bytes: u64,
    /// The store before and after.
    pub before: StoreSummary,
    /// The store after the run.
    pub after: StoreSummary,
}

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> PageServerError {
    let path = path.to_path_buf();
    move |source| PageServerError::Io { what, path, source }
}

/// An exclusive, non-blocking `flock` on a directory or file, `None` if someone holds it.
fn try_lock(path: &Path) -> Option<Flock<File>> {
    let f = File::open(path).ok()?;
    Flock::lock(f, FlockArg::LockExclusiveNonblock).ok()
}

struct Run<'a> {
    store: &'a Store,
    dead: Tombstones,
    trash: PathBuf,
    seq: u64,
    report: GcReport,
}

impl Run<'_> {
    fn trash_path(&mut self, id: &str) -> PathBuf {
        self.seq += 1;
        self.trash
            .join(format!("{id}.{}.{}", std::process::id(), self.seq))
    }

    /// Renames layer `id` into the trash under the exclusive index lock.
    fn remove(&mut self, id: &str) -> Result<(), String> {
        let dir = self.store.root().join(id);
        let to = self.trash_path(id);
        {
            let _excl = self.store.index_lock(true).map_err(|e| e.to_string())?;
            std::fs::rename(&dir, &to).map_err(|e| format!("move {id} to the trash: {e}"))?;
        }
        self.store.forget(id);
        self.dead.clear(id);
        Ok(())
    }
}

/// Removes what an earlier run left in the trash and in the squash work area.
fn sweep(store: &Store) {
    for sub in [TRASH_DIR, COMPACT_DIR] {
        for e in std::fs::read_dir(store.state_dir().join(sub))
            .into_iter()
            .flatten()
            .flatten()
        {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// Runs retention once over `store`; see the module documentation.
pub fn run(store: &Store, opts: GcOptions) -> Result<GcReport, PageServerError> {
    let lock_path = store.state_dir().join(GC_LOCK);
    let lock_file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(io("open", &lock_path))?;
    let _run = Flock::lock(lock_file, FlockArg::LockExclusiveNonblock).map_err(|(_, e)| {
        PageServerError::Io {
            what: "lock (another gc is running on the store)",
            path: lock_path.clone(),
            source: e.into(),
        }
    })?;
    let trash = store.state_dir().join(TRASH_DIR);
    if !opts.dry_run {
        sweep(store);
        std::fs::create_dir_all(&trash).map_err(io("create", &trash))?;
    }
    let mut run = Run {
        store,
        dead: Tombstones::of(store),
        trash,
        seq: 0,
        report: GcReport::default(),
    };
    let map = LayerMap::scan(store);
    run.report.before = map.summary();

    // 1. Expiry of superseded checkpoints.
    let mut deleted: std::collections::BTreeSet<String> = map
        .layers
        .iter()
        .filter(|(_, l)| l.deleted)
        .map(|(id, _)| id.clone())
        .collect();
    if let Some(age) = opts.expire_superseded_after {
        let now = SystemTime::now();
        for (id, l) in &map.layers {
            if l.deleted {
                continue;
            }
            let superseded = map.children(id).iter().any(|c| {
                map.layers[*c]
                    .published
                    .checked_add(age)
                    .is_some_and(|t| t <= now)
            });
            if superseded {
                if !opts.dry_run {
                    run.dead
                        .delete(id)
                        .map_err(io("write a tombstone for", &store.root().join(id)))?;
                }
                tracing::info!(checkpoint = %id, "expired: superseded for longer than the retention");
                run.report.expired.push(id.clone());
                deleted.insert(id.clone());
            }
        }
    }

    // 2. Deleted and needed by nobody.
    let mut view = map;
    for id in &deleted {
        if let Some(l) = view.layers.get_mut(id) {
            l.deleted = true;
        }
    }
    let needed = view.needed();
    for id in deleted.iter().filter(|id| !needed.contains(*id)) {
        let Some(bytes) = view.layers.get(id).map(|l| l.bytes) else {
            continue;
        };
        if opts.dry_run {
            run.report.removed.push(id.clone());
            run.report.freed_bytes += bytes;
            continue;
        }
        let Some(_busy) = try_lock(&store.root().join(id)) else {
            run.report.skipped.push((
                id.clone(),
                "in use: an upload builds on it or a restore reads it".into(),
            ));
            continue;
        };
        match run.remove(id) {
            Ok(()) => {
                tracing::info!(checkpoint = %id, bytes, "removed a deleted checkpoint nothing needs");
                run.report.removed.push(id.clone());
                run.report.freed_bytes += bytes;
            }
            Err(why) => run.report.skipped.push((id.clone(), why)),
        }
    }

    // 3. Squash deleted layers that one layer still reads, each run of them into the layer
    //    below it in one pass.
    let mut tried = std::collections::BTreeSet::new();
    loop {
        if opts.dry_run {
            break;
        }
        let view = LayerMap::scan(store);
        let squashable = |id: &str| {
            view.layers
                .get(id)
                .is_some_and(|l| l.deleted && l.bad_link.is_none())
                && view.children(id).len() == 1
        };
        let candidate = view.layers.iter().find_map(|(id, l)| {
            let p = l.parent.as_deref()?;
            if squashable(id) || !squashable(p) || tried.contains(id) {
                return None;
            }
            let mut run = vec![p.to_string()];
            while let Some(up) = view.layers[run.last()?].parent.as_deref() {
                if !squashable(up) || run.iter().any(|r| r == up) {
                    break;
                }
                run.push(up.to_string());
            }
            Some((id.clone(), run))
        });
        let Some((child, parents)) = candidate else {
            break;
        };
        tried.insert(child.clone());
        let mut held = Vec::new();
        for p in &parents {
            match try_lock(&store.root().join(p)) {
                Some(l) => held.push(l),
                None => break,
            }
        }
        if held.len() < parents.len() {
            let busy = parents[held.len()].clone();
            run.report.skipped.push((
                busy,
                "in use: an upload builds on it or a restore reads it".into(),
            ));
            continue;
        }
        let before: u64 = parents
            .iter()
            .chain(std::iter::once(&child))
            .map(|id| view.layers[id].bytes)
            .sum();
        let to = run.trash_path(&child);
        match compact::squash(store, &parents, &child, &to) {
            Ok(s) => {
                for p in &parents {
                    if let Err(why) = run.remove(p) {
                        run.report.skipped.push((p.clone(), why));
                    }
                }
                let after = LayerMap::scan(store)
                    .layers
                    .get(&child)
                    .map_or(0, |l| l.bytes);
                run.report.freed_bytes += before.saturating_sub(after);
                tracing::info!(layers = ?parents, into = %child, pages = s.pages_moved, "squashed deleted layers");
                for p in parents {
                    run.report.squashed.push((p, child.clone(), s.pages_moved));
                }
            }
            Err(why) => {
                tracing::warn!(layers = ?parents, into = %child, %why, "squash failed; the layers are kept");
                run.report
                    .skipped
                    .push((parents[0].clone(), format!("squash into {child}: {why}")));
            }
        }
        drop(held);
    }
    // 4. Flatten chains that grew too deep, shallowest first (a flattened layer makes the
    //    layers over it shallower).
    if let (Some(limit), false) = (opts.flatten_depth, opts.dry_run) {
        let mut tried = std::collections::BTreeSet::new();
        loop {
            let view = LayerMap::scan(store);
            let candidate = view
                .layers
                .iter()
                .filter(|(id, l)| l.bad_link.is_none() && !tried.contains(*id))
                .map(|(id, _)| view.chain(id))
                .filter(|c| c.len() > limit)
                .min_by_key(Vec::len);
            let Some(chain) = candidate else { break };
            let child = chain[0].to_string();
            let parents: Vec<String> = chain[1..].iter().map(|p| p.to_string()).collect();
            tried.insert(child.clone());
            let to = run.trash_path(&child);
            match compact::squash(store, &parents, &child, &to) {
                Ok(s) => {
                    tracing::info!(layer = %child, depth = chain.len(), pages = s.pages_moved, "flattened a deep layer");
                    run.report.flattened.push((child, s.pages_moved));
                }
                Err(why) => {
                    tracing::warn!(layer = %child, %why, "flatten failed; the layer is kept as it is");
                    run.report.skipped.push((child, format!("flatten: {why}")));
                }
            }
        }
    }
    if !opts.dry_run {
        sweep(store);
    }
    run.report.after = if opts.dry_run {
        run.report.before
    } else {
        LayerMap::scan(store).summary()
    };
    Ok(run.report)
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use distriproc_runtime::images::testutil::{write_inventory, write_pstree};
    use distriproc_runtime::images::write::PagemapWriter;
    use distriproc_runtime::images::{PAGE_SIZE, PE_LAZY, PE_PARENT, PE_PRESENT};

    use super::*;
    use crate::checkpoint::{Checkpoint, RunKind};
    use crate::layers::{layer_digest, parent_of, PARENT_LINK};

    const PID: u32 = 1;
    const BASE: u64 = 0x10000;
    const PAGES: u64 = 64;

    fn page(tag: u8, i: u64) -> Vec<u8> {
        let mut p = vec![tag; 4096];
        p[..8].copy_from_slice(&i.to_le_bytes());
        p
    }

    /// A layer where pages `written` hold `tag` and the rest are in the parent (all present
    /// without a parent); the last 4 pages are a lazy range kept out of the store.
    fn layer(store: &Path, id: &str, parent: Option<&str>, tag: u8, written: std::ops::Range<u64>) {
        let d = store.join(id);
        std::fs::create_dir(&d).unwrap();
        write_inventory(&d).unwrap();
        write_pstree(&d, &[PID]).unwrap();
        let mut w = PagemapWriter::create(&d, PID, 1).unwrap();
        for i in 0..PAGES - 4 {
            let va = BASE + i * PAGE_SIZE;
            if parent.is_none() || written.contains(&i) {
                w.data(va, PE_PRESENT, &page(tag, i)).unwrap();
            } else {
                w.hole(va, 1, PE_PARENT).unwrap();
            }
        }
        w.hole(BASE + (PAGES - 4) * PAGE_SIZE, 4, PE_LAZY).unwrap();
        w.commit().unwrap();
        if let Some(p) = parent {
            std::os::unix::fs::symlink(format!("../{p}"), d.join(PARENT_LINK)).unwrap();
        }
    }

    /// Every page of `id` as served (tag byte per page, 0 for absent).
    fn served(store: &Path, id: &str) -> Vec<u8> {
        let ck = Checkpoint::open(id, &store.join(id)).unwrap();
        let mut buf = vec![0u8; 4096];
        (0..PAGES)
            .map(
                |i| match ck.run_at(PID, BASE + i * PAGE_SIZE, 1).unwrap().1 {
                    RunKind::Data { file, offset, .. } => {
                        ck.read(file, offset, &mut buf).unwrap();
                        assert_eq!(
                            buf[..8],
                            i.to_le_bytes(),
                            "page {i} of {id} is another page"
                        );
                        buf[8]
                    }
                    _ => 0,
                },
            )
            .collect()
    }

    fn chain() -> (tempfile::TempDir, Store) {
        let root = tempfile::tempdir().unwrap();
        let store = Store::open(root.path(), 4).unwrap();
        layer(root.path(), "a", None, b'a', 0..0);
        layer(root.path(), "b", Some("a"), b'b', 0..8);
        layer(root.path(), "c", Some("b"), b'c', 4..12);
        layer(root.path(), "d", Some("c"), b'd', 10..20);
        (root, store)
    }

    #[test]
    fn squashes_deleted_layers_and_removes_what_nothing_needs() {
        let (root, store) = chain();
        let before = served(root.path(), "d");
        let expect: Vec<u8> = (0..PAGES)
            .map(|i| match i {
                10..20 => b'd',
                4..10 => b'c',
                0..4 => b'b',
                60.. => 0,
                _ => b'a',
            })
            .collect();
        assert_eq!(before, expect);
        let digest = layer_digest(&root.path().join("d")).unwrap();
        let t = Tombstones::of(&store);
        t.delete("b").unwrap();
        t.delete("c").unwrap();

        let dry = run(
            &store,
            GcOptions {
                dry_run: true,
                ..Default::default()
            },
        )
        .unwrap();
        assert!(dry.removed.is_empty() && dry.squashed.is_empty());
        assert!(root.path().join("b").exists());

        let r = run(&store, GcOptions::default()).unwrap();
        assert_eq!(r.before.max_depth, 4);
        assert_eq!(r.after.max_depth, 2, "{r:?}");
        assert_eq!(r.squashed.len(), 2, "{r:?}");
        assert!(!root.path().join("b").exists() && !root.path().join("c").exists());
        assert_eq!(
            parent_of(root.path(), &root.path().join("d"))
                .unwrap()
                .as_deref(),
            Some("a")
        );
        assert_eq!(
            served(root.path(), "d"),
            expect,
            "squashing changed the memory"
        );
        assert_eq!(served(root.path(), "a"), {
            let mut v = vec![b'a'; 60];
            v.extend([0; 4]);
            v
        });
        // The layer keeps the digest restores and child uploads check against.
        assert_eq!(layer_digest(&root.path().join("d")).unwrap(), digest);
        assert!(Tombstones::of(&store).list().is_empty());
        // Freed: b's pages 4..8 (c rewrote them) and c's 10..12 (d rewrote them).
        assert!(r.freed_bytes >= 6 * PAGE_SIZE, "{r:?}");
        // d holds the 20 pages 0..20 now.
        let pages = std::fs::metadata(root.path().join("d/pages-1.img"))
            .unwrap()
            .len();
        assert_eq!(pages, 20 * PAGE_SIZE);

        // Deleting the top frees the whole line.
        t.delete("d").unwrap();
        t.delete("a").unwrap();
        let r = run(&store, GcOptions::default()).unwrap();
        assert_eq!(r.removed.len(), 2, "{r:?}");
        assert_eq!(r.after.layers, 0);
        assert!(std::fs::read_dir(store.state_dir().join(TRASH_DIR))
            .unwrap()
            .next()
            .is_none());
    }

    #[test]
    fn layers_in_use_are_kept_and_a_second_run_waits() {
        let (root, store) = chain();
        let t = Tombstones::of(&store);
        t.delete("c").unwrap();
        // An upload building on c holds a shared lock on it: c stays.
        let f = File::open(root.path().join("c")).unwrap();
        let held = Flock::lock(f, FlockArg::LockSharedNonblock).unwrap();
        let r = run(&store, GcOptions::default()).unwrap();
        assert!(r.squashed.is_empty(), "{r:?}");
        assert_eq!(r.skipped.len(), 1, "{r:?}");
        assert!(root.path().join("c").exists());
        drop(held);
        // One run at a time.
        let lock = File::open(store.state_dir().join(GC_LOCK)).unwrap();
        let busy = Flock::lock(lock, FlockArg::LockExclusiveNonblock).unwrap();
        assert!(run(&store, GcOptions::default()).is_err());
        drop(busy);
        let r = run(&store, GcOptions::default()).unwrap();
        assert_eq!(r.squashed, vec![("c".into(), "d".into(), 6)]);
    }

    #[test]
    fn deep_chains_are_flattened_and_the_layers_below_kept() {
        let (root, store) = chain();
        let before: Vec<Vec<u8>> = ["a", "b", "c", "d"]
            .iter()
            .map(|id| served(root.path(), id))
            .collect();
        let opts = GcOptions {
            flatten_depth: Some(2),
            ..Default::default()
        };
        let r = run(&store, opts).unwrap();
        // c (depth 3) is flattened; d is then 2 deep and stays a layer over c.
        assert_eq!(r.flattened, vec![("c".into(), 52)], "{r:?}");
        assert_eq!(r.after.max_depth, 2);
        assert_eq!(r.after.layers, 4);
        assert!(parent_of(root.path(), &root.path().join("c"))
            .unwrap()
            .is_none());
        assert_eq!(
            parent_of(root.path(), &root.path().join("d"))
                .unwrap()
                .as_deref(),
            Some("c")
        );
        for (id, want) in ["a", "b", "c", "d"].iter().zip(&before) {
            assert_eq!(&served(root.path(), id), want, "{id} changed");
        }
    }

    #[test]
    fn expiry_deletes_superseded_checkpoints_only() {
        let (root, store) = chain();
        let opts = GcOptions {
            expire_superseded_after: Some(std::time::Duration::ZERO),
            ..Default::default()
        };
        let r = run(&store, opts).unwrap();
        assert_eq!(r.expired, vec!["a", "b", "c"]);
        // d stays restorable with everything it reads squashed into it.
        assert_eq!(r.after.layers, 1);
        assert_eq!(r.after.max_depth, 1);
        assert!(parent_of(root.path(), &root.path().join("d"))
            .unwrap()
            .is_none());
        assert_eq!(
            served(root.path(), "d")[..20],
            {
                let mut v = vec![b'b'; 4];
                v.extend([b'c'; 6]);
                v.extend([b'd'; 10]);
                v
            }[..]
        );
        assert!(matches!(
            store.get("a"),
            Err(PageServerError::UnknownCheckpoint { .. })
        ));
    }

    #[test]
    fn superseded_write_back_layers_are_squashed_and_the_newest_kept() {
        let (root, store) = chain();
        let marker = distriproc_runtime::fetcher::WRITEBACK_MARKER;
        for id in ["b", "c", "d"] {
            std::fs::write(root.path().join(id).join(marker), "").unwrap();
        }
        let before = served(root.path(), "d");
        let map = LayerMap::scan(&store);
        assert!(map.layers["b"].deleted && map.layers["c"].deleted);
        assert!(!map.layers["d"].deleted && !map.layers["a"].deleted);
        // A write-back layer is deleted only for retention: sessions still open it.
        assert!(store.get("b").is_ok());

        let r = run(&store, GcOptions::default()).unwrap();
        assert_eq!(r.squashed.len(), 2, "{r:?}");
        assert!(r.removed.is_empty(), "{r:?}");
        assert_eq!(r.after.max_depth, 2, "{r:?}");
        assert_eq!(
            served(root.path(), "d"),
            before,
            "squashing changed the memory"
        );
        assert!(
            root.path().join("d").join(marker).is_file(),
            "d lost its marker"
        );
        // The newest write-back layer (nothing over it) and the checkpoint below stay.
        let again = run(&store, GcOptions::default()).unwrap();
        assert!(
            again.squashed.is_empty() && again.removed.is_empty(),
            "{again:?}"
        );
        assert!(root.path().join("d").exists() && root.path().join("a").exists());
    }
}
