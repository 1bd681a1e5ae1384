//! The checkpoint store and the page index of one checkpoint.
//!
//! A store is a directory; each subdirectory is a checkpoint: a CRIU images directory
//! (inventory.img and `pagemap-<pid>.img` / `pages-<id>.img`, `parent` chains followed). A
//! checkpoint is indexed on first use — every task pagemap found in the directory, resolved
//! through its parents by `distriproc_runtime::images` — and kept in a small cache. Reads are
//! `pread`s into the caller's buffer; no pages file is ever read whole.
//!
//! Checkpoint ids are plain names (see `distriproc_config::pageserver::validate_checkpoint_id`):
//! they cannot name anything outside the store.

use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use distriproc_config::pageserver::validate_checkpoint_id;
use distriproc_runtime::images::{ImageDir, PageData, PageSegment, PAGE_SIZE, PE_LAZY};
use distriproc_runtime::source::FileMapping;

use nix::fcntl::{Flock, FlockArg};

use crate::layers::Tombstones;
use crate::PageServerError;

/// Where the server keeps its own files inside the store (not a valid checkpoint id).
pub const STATE_DIR: &str = ".distriproc";
/// The index lock under [`STATE_DIR`] (see [`Store::index_lock`]).
const INDEX_LOCK: &str = "index.lock";

/// What a run of pages is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunKind {
    /// In `file` at byte `offset`; `lazy` if the dump marked the pages lazy.
    Data {
        /// Index for [`Checkpoint::read`].
        file: usize,
        /// Byte offset of the first page of the run.
        offset: u64,
        /// Whether the pagemap entry has `PE_LAZY`.
        lazy: bool,
    },
    /// Not dumped: zero pages.
    Zero,
    /// Dumped, but the data is not in the store (a `dump --lazy-pages` range).
    Absent,
}

struct Task {
    segments: Vec<PageSegment>,
    files: Vec<usize>,
    lazy_pages: u64,
    data_pages: u64,
}

/// The page index of one checkpoint.
pub struct Checkpoint {
    id: String,
    dir: PathBuf,
    tasks: HashMap<u32, Task>,
    files: Vec<(PathBuf, File)>,
    /// Read-only mappings of `files` (same index), for replies sent without a copy.
    maps: Vec<Option<FileMapping>>,
    /// Device and inode of `dir` when the index was built: a cached index whose directory was
    /// removed or replaced since is dropped, not served.
    dir_id: Option<(u64, u64)>,
}

/// Device and inode of `dir`, `None` if it cannot be read.
fn dir_identity(dir: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(dir).ok().map(|m| (m.dev(), m.ino()))
}

impl std::fmt::Debug for Checkpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checkpoint")
            .field("id", &self.id)
            .field("dir", &self.dir)
            .finish()
    }
}

impl Checkpoint {
    /// Indexes every task pagemap of the images directory `dir`.
    pub fn open(id: &str, dir: &Path) -> Result<Checkpoint, PageServerError> {
        let images = |source| PageServerError::Images {
            id: id.to_string(),
            source,
        };
        let img = ImageDir::open(dir).map_err(images)?;
        let pids = distriproc_runtime::images::task_pagemap_pids(dir).map_err(|source| {
            PageServerError::Io {
                what: "list",
                path: dir.to_path_buf(),
                source,
            }
        })?;
        // Every pagemap must belong to a task of pstree.img. A `criu dump --page-server` push
        // has no pstree.img (it stays with the dump's other images): nothing to check then.
        let tree = if dir.join("pstree.img").exists() {
            img.pstree().map_err(images)?
        } else {
            Vec::new()
        };
        if let Some(&pid) = pids
            .iter()
            .find(|p| !tree.is_empty() && !tree.iter().any(|t| t.pid == **p))
        {
            return Err(PageServerError::PidNotInPstree {
                id: id.to_string(),
                path: dir.join(format!("pagemap-{pid}.img")),
                pid,
            });
        }
        let mut tasks = HashMap::new();
        let mut files: Vec<(PathBuf, File)> = Vec::new();
        for pid in pids {
            let map = img.pagemap(pid).map_err(images)?;
            let mut idx = Vec::with_capacity(map.files.len());
            for (k, path) in map.files.iter().enumerate() {
                if let Some(i) = files.iter().position(|(p, _)| p == path) {
                    idx.push(i);
                    continue;
                }
                let used = map
                    .segments
                    .iter()
                    .any(|s| matches!(s.data, PageData::File { file, .. } if file == k));
                if !used {
                    idx.push(usize::MAX);
                    continue;
                }
                let f = File::open(path).map_err(|source| PageServerError::Io {
                    what: "open",
                    path: path.clone(),
                    source,
                })?;
                files.push((path.clone(), f));
                idx.push(files.len() - 1);
            }
            let lazy_pages = map.lazy_pages();
            let data_pages = map
                .segments
                .iter()
                .filter(|s| matches!(s.data, PageData::File { .. }))
                .map(|s| s.nr_pages)
                .sum();
            tasks.insert(
                pid,
                Task {
                    segments: map.segments,
                    files: idx,
                    lazy_pages,
                    data_pages,
                },
            );
        }
        let maps = files.iter().map(|(_, f)| FileMapping::new(f)).collect();
        Ok(Checkpoint {
            id: id.to_string(),
            dir: dir.to_path_buf(),
            tasks,
            files,
            maps,
            dir_id: dir_identity(dir),
        })
    }

    /// The same index for the directory its files were renamed to (their handles stay open).
    pub fn moved_to(mut self, dir: &Path) -> Checkpoint {
        self.dir = dir.to_path_buf();
        self.dir_id = dir_identity(dir);
        self
    }

    /// The checkpoint id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Pids with a pagemap, sorted.
    pub fn pids(&self) -> Vec<u32> {
        let mut v: Vec<u32> = self.tasks.keys().copied().collect();
        v.sort_unstable();
        v
    }

    /// Whether task `pid` has a pagemap.
    pub fn has_pid(&self, pid: u32) -> bool {
        self.tasks.contains_key(&pid)
    }

    /// (lazy pages, pages with data in the store) of task `pid`.
    pub fn task_pages(&self, pid: u32) -> Option<(u64, u64)> {
        self.tasks.get(&pid).map(|t| (t.lazy_pages, t.data_pages))
    }

    /// The dumped page ranges of `pid` with data in the store: (vaddr, pages, lazy).
    pub fn data_ranges(&self, pid: u32) -> Vec<(u64, u64, bool)> {
        self.tasks.get(&pid).map_or_else(Vec::new, |t| {
            t.segments
                .iter()
                .filter(|s| matches!(s.data, PageData::File { .. }))
                .map(|s| (s.vaddr, s.nr_pages, s.flags & PE_LAZY != 0))
                .collect()
        })
    }

    /// The run of one kind starting at page-aligned `vaddr`, at most `max` pages (≥ 1).
    /// `None` if the task has no pagemap.
    pub fn run_at(&self, pid: u32, vaddr: u64, max: u64) -> Option<(u64, RunKind)> {
        let task = self.tasks.get(&pid)?;
        let i = task.segments.partition_point(|s| s.end() <= vaddr);
        Some(match task.segments.get(i) {
            Some(s) if s.vaddr <= vaddr => {
                let skip = (vaddr - s.vaddr) / PAGE_SIZE;
                let n = (s.nr_pages - skip).min(max);
                let kind = match s.data {
                    PageData::File { file, offset } => match task.files.get(file) {
                        Some(&g) if g != usize::MAX => RunKind::Data {
                            file: g,
                            offset: offset + skip * PAGE_SIZE,
                            lazy: s.flags & PE_LAZY != 0,
                        },
                        _ => RunKind::Absent,
                    },
                    PageData::Absent => RunKind::Absent,
                };
                (n, kind)
            }
            next => {
                let gap = next.map_or(u64::MAX, |s| (s.vaddr - vaddr) / PAGE_SIZE);
                (gap.min(max), RunKind::Zero)
            }
        })
    }

    /// `len` bytes of file `file` at `offset` as a slice of its mapping (page tables
    /// populated), to be written to a socket without a copy into a buffer; `None` when the
    /// file is not mapped or the range cannot be populated (then [`Checkpoint::read`] it).
    pub fn mapped(&self, file: usize, offset: u64, len: usize) -> Option<&[u8]> {
        self.maps.get(file)?.as_ref()?.slice(offset, len)
    }

    /// `pread`s `buf.len()` bytes of file `file` at `offset`.
    pub fn read(&self, file: usize, offset: u64, buf: &mut [u8]) -> Result<(), PageServerError> {
        let (path, f) = &self.files[file];
        f.read_exact_at(buf, offset)
            .map_err(|source| PageServerError::Io {
                what: "read",
                path: path.clone(),
                source,
            })
    }
}

/// Cached indexes by id, and ids in insertion order (oldest first) for eviction.
type Cache = (HashMap<String, Arc<Checkpoint>>, VecDeque<String>);

/// The store: checkpoint directories and a cache of their indexes.
pub struct Store {
    root: PathBuf,
    max_cached: usize,
    cache: Mutex<Cache>,
}

impl Store {
    /// Opens the store directory (it must exist) and creates its state directory.
    pub fn open(root: &Path, max_cached: usize) -> Result<Store, PageServerError> {
        let meta = std::fs::metadata(root).map_err(|source| PageServerError::Io {
            what: "open store",
            path: root.to_path_buf(),
            source,
        })?;
        if !meta.is_dir() {
            return Err(PageServerError::Io {
                what: "open store",
                path: root.to_path_buf(),
                source: std::io::Error::other("not a directory"),
            });
        }
        let state = root.join(STATE_DIR);
        std::fs::create_dir_all(&state).map_err(|source| PageServerError::Io {
            what: "create",
            path: state,
            source,
        })?;
        Ok(Store {
            root: root.to_path_buf(),
            max_cached: max_cached.max(1),
            cache: Mutex::new((HashMap::new(), VecDeque::new())),
        })
    }

    /// The store directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The server's own state directory inside the store.
    pub fn state_dir(&self) -> PathBuf {
        self.root.join(STATE_DIR)
    }

    /// The directory of checkpoint `id`, after checking the id.
    pub fn dir_of(&self, id: &str) -> Result<PathBuf, PageServerError> {
        validate_checkpoint_id(id).map_err(|why| PageServerError::BadCheckpointId {
            id: id.chars().take(160).collect(),
            why,
        })?;
        Ok(self.root.join(id))
    }

    /// The index of checkpoint `id`, built on first use and cached. A deleted checkpoint is
    /// refused even while its directory stays for the layers over it.
    pub fn get(&self, id: &str) -> Result<Arc<Checkpoint>, PageServerError> {
        self.get_for(id, false)
    }

    /// As [`Store::get`]; with `resumed` (a client already reading it, protocol
    /// `HELLO_RESUME`) a deleted checkpoint is served as long as its pages are stored.
    pub fn get_for(&self, id: &str, resumed: bool) -> Result<Arc<Checkpoint>, PageServerError> {
        let dir = self.dir_of(id)?;
        if !resumed && Tombstones::of(self).is_deleted(id) {
            self.forget(id);
            return Err(PageServerError::DeletedCheckpoint { id: id.to_string() });
        }
        let cached = self.lock().0.get(id).cloned();
        if let Some(c) = cached {
            if c.dir_id.is_some() && c.dir_id == dir_identity(&dir) {
                return Ok(c);
            }
            // The directory was removed or replaced behind the server's back.
            self.forget(id);
        }
        let ck = {
            let _shared = self.index_lock(false)?;
            if !dir.is_dir() {
                return Err(PageServerError::UnknownCheckpoint {
                    id: id.to_string(),
                    dir,
                });
            }
            Arc::new(Checkpoint::open(id, &dir)?)
        };
        Ok(self.cache(ck))
    }

    /// Caches an index built elsewhere (an upload's), replacing any older one of its id.
    pub fn insert(&self, ck: Checkpoint) {
        self.forget(&ck.id);
        self.cache(Arc::new(ck));
    }

    /// Adds `ck` unless an index of its id is cached already; the cached one.
    fn cache(&self, ck: Arc<Checkpoint>) -> Arc<Checkpoint> {
        let id = ck.id.clone();
        let id = id.as_str();
        let mut g = self.lock();
        let (map, order) = &mut *g;
        if let Some(c) = map.get(id) {
            return c.clone();
        }
        map.insert(id.to_string(), ck.clone());
        order.push_back(id.to_string());
        while order.len() > self.max_cached {
            if let Some(old) = order.pop_front() {
                map.remove(&old);
            }
        }
        ck
    }

    /// Drops the cached index of `id` (its files were rewritten or removed; sessions holding
    /// it keep reading the files they opened).
    pub fn forget(&self, id: &str) {
        let mut g = self.lock();
        let (map, order) = &mut *g;
        if map.remove(id).is_some() {
            order.retain(|o| o != id);
        }
    }

    /// The store's index lock (`.distriproc/index.lock`): held shared while a chain of layers
    /// is read to build an index, exclusively by [`crate::gc`] while it swaps or removes a
    /// layer, so an index never mixes a layer's old and new files. Across processes too.
    pub fn index_lock(&self, exclusive: bool) -> Result<Flock<File>, PageServerError> {
        let path = self.state_dir().join(INDEX_LOCK);
        let f = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|source| PageServerError::Io {
                what: "open",
                path: path.clone(),
                source,
            })?;
        let arg = if exclusive {
            FlockArg::LockExclusive
        } else {
            FlockArg::LockShared
        };
        Flock::lock(f, arg).map_err(|(_, e)| PageServerError::Io {
            what: "lock",
            path,
            source: e.into(),
        })
    }

    /// Number of indexes in the cache.
    pub fn cached(&self) -> usize {
        self.lock().0.len()
    }

    /// Checkpoint ids in the store (subdirectories with a valid name), sorted.
    pub fn list(&self) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(&self.root)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.path().is_dir())
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|n| validate_checkpoint_id(n).is_ok())
            .collect();
        v.sort();
        v
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Cache> {
        self.cache.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use distriproc_runtime::images::testutil::*;
    use distriproc_runtime::images::PE_PRESENT;

    #[test]
    fn runs_and_ids() {
        let root = tempfile::tempdir().unwrap();
        let d = root.path().join("ck1");
        std::fs::create_dir(&d).unwrap();
        write_inventory(&d).unwrap();
        write_pagemap(
            &d,
            5,
            1,
            &[
                pm(0x10000, 2, PE_PRESENT | PE_LAZY),
                pm(0x14000, 1, PE_PRESENT),
                pm(0x15000, 1, PE_LAZY),
            ],
        )
        .unwrap();
        let mut pages = vec![1u8; 3 * 4096];
        pages[8192..].fill(3);
        std::fs::write(d.join("pages-1.img"), pages).unwrap();
        let store = Store::open(root.path(), 2).unwrap();
        let ck = store.get("ck1").unwrap();
        assert_eq!(ck.pids(), vec![5]);
        assert_eq!(
            ck.run_at(5, 0x11000, 100),
            Some((
                1,
                RunKind::Data {
                    file: 0,
                    offset: 4096,
                    lazy: true
                }
            ))
        );
        assert_eq!(ck.run_at(5, 0x12000, 100), Some((2, RunKind::Zero)));
        assert_eq!(ck.run_at(5, 0x15000, 100), Some((1, RunKind::Absent)));
        assert_eq!(ck.run_at(5, 0x16000, 7), Some((7, RunKind::Zero)));
        assert_eq!(ck.run_at(6, 0x16000, 7), None);
        let mut b = [0u8; 4096];
        ck.read(0, 8192, &mut b).unwrap();
        assert_eq!(b[0], 3);
        assert!(matches!(
            store.get("nope"),
            Err(PageServerError::UnknownCheckpoint { .. })
        ));
        for bad in ["..", "../x", "a/b", ".distriproc", "/etc"] {
            assert!(
                matches!(store.get(bad), Err(PageServerError::BadCheckpointId { .. })),
                "{bad}"
            );
        }
        assert_eq!(store.list(), vec!["ck1".to_string()]);
    }

    #[test]
    fn a_cached_index_of_a_removed_or_replaced_directory_is_not_served() {
        let root = tempfile::tempdir().unwrap();
        let make = |dir: &Path, byte: u8| {
            std::fs::create_dir(dir).unwrap();
            write_inventory(dir).unwrap();
            write_pagemap(dir, 5, 1, &[pm(0x10000, 1, PE_PRESENT | PE_LAZY)]).unwrap();
            std::fs::write(dir.join("pages-1.img"), [byte; 4096]).unwrap();
        };
        let d = root.path().join("ck");
        make(&d, 1);
        let store = Store::open(root.path(), 4).unwrap();
        let first = store.get("ck").unwrap();
        std::fs::rename(&d, root.path().join("away")).unwrap();
        assert!(matches!(
            store.get("ck"),
            Err(PageServerError::UnknownCheckpoint { .. })
        ));
        // Other files under the same id: a new index, not the one cached before.
        make(&d, 2);
        let second = store.get("ck").unwrap();
        assert!(!Arc::ptr_eq(&first, &second));
        let mut b = [0u8; 4096];
        second.read(0, 0, &mut b).unwrap();
        assert_eq!(b[0], 2);
        assert!(Arc::ptr_eq(&second, &store.get("ck").unwrap()));
    }
}
