//! Where page contents come from: the [`PageSource`] trait, transport-neutral, and
//! [`LocalImages`], its implementation over a local CRIU image directory.
//!
//! A source answers "the pages of task `pid` at dump-time address `vaddr`" and says which of them
//! are zero (never dumped). It does not know about userfaultfd; the fetcher installs what it
//! returns. A remote page-server client implements the same trait.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::images::{ImageDir, ImageError, PageData, PageSegment, PAGE_SIZE};

/// What a [`PageSource::read_pages`] call produced: the first `pages` pages of the request,
/// all of one kind. Callers ask again for the rest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageRead {
    /// Number of pages (at least 1) this answer covers, from the start of the request.
    pub pages: usize,
    /// The kind of all those pages.
    pub kind: PageKind,
}

/// Kind of a run of pages in a [`PageRead`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageKind {
    /// The buffer holds the data.
    Data,
    /// The pages were not dumped: they are zero. The buffer is left untouched.
    Zero,
}

/// Errors of a page source.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// The buffer is empty or not a whole number of pages, or the address is not aligned.
    #[error("bad request for pid {pid} at {vaddr:#x}: {len} bytes")]
    BadRequest {
        /// Task.
        pid: u32,
        /// Dump-time address.
        vaddr: u64,
        /// Buffer length.
        len: usize,
    },
    /// The source has no images for this task.
    #[error("no pages for pid {pid}")]
    UnknownPid {
        /// Task.
        pid: u32,
    },
    /// The pages exist but their data is not in this source (e.g. a `dump --lazy-pages` range).
    #[error("pages of pid {pid} at {vaddr:#x} are not in this source")]
    NotHere {
        /// Task.
        pid: u32,
        /// Dump-time address.
        vaddr: u64,
    },
    /// Reading a pages file failed.
    #[error("cannot read {} at offset {offset}", path.display())]
    Io {
        /// The pages file.
        path: PathBuf,
        /// Byte offset.
        offset: u64,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// Opening the images failed.
    #[error(transparent)]
    Images(#[from] ImageError),
}

/// A source of dump-time page contents.
pub trait PageSource: Send + Sync {
    /// Fill `buf` (a non-zero multiple of 4096 bytes) with the pages of task `pid` starting at
    /// the dump-time address `vaddr`. Returns how many pages from the start were answered and
    /// whether they are data (in `buf`) or zero; call again for the rest.
    fn read_pages(&self, pid: u32, vaddr: u64, buf: &mut [u8]) -> Result<PageRead, SourceError>;
}

struct TaskIndex {
    segments: Vec<PageSegment>,
    /// Indexes into `LocalImages::files` for each of the task's `PageMap::files`.
    files: Vec<usize>,
}

/// [`PageSource`] over the pages files of a local image directory. Indexes are built once at
/// open; a read is a binary search and one `pread` per run, with no allocation.
pub struct LocalImages {
    tasks: HashMap<u32, TaskIndex>,
    files: Vec<(PathBuf, File)>,
}

impl LocalImages {
    /// Indexes every task of the pstree in `dir` that has a pagemap (zombies have none).
    pub fn open(dir: &Path) -> Result<LocalImages, SourceError> {
        let img = ImageDir::open(dir)?;
        let mut tasks = HashMap::new();
        let mut files: Vec<(PathBuf, File)> = Vec::new();
        for entry in img.pstree()? {
            let pid = entry.pid;
            if !dir.join(format!("pagemap-{pid}.img")).exists() {
                continue;
            }
            let map = img.pagemap(pid)?;
            let mut idx = Vec::with_capacity(map.files.len());
            for path in map.files {
                if let Some(i) = files.iter().position(|(p, _)| *p == path) {
                    idx.push(i);
                    continue;
                }
                let used = map
                    .segments
                    .iter()
                    .any(|s| matches!(s.data, PageData::File { file, .. } if file == idx.len()));
                if !used {
                    // Never read (e.g. a pages file of a pagemap with only lazy-absent ranges).
                    idx.push(usize::MAX);
                    continue;
                }
                let f = File::open(&path).map_err(|source| {
                    SourceError::Images(ImageError::Io {
                        path: path.clone(),
                        source,
                    })
                })?;
                files.push((path, f));
                idx.push(files.len() - 1);
            }
            tasks.insert(
                pid,
                TaskIndex {
                    segments: map.segments,
                    files: idx,
                },
            );
        }
        Ok(LocalImages { tasks, files })
    }
}

impl PageSource for LocalImages {
    fn read_pages(&self, pid: u32, vaddr: u64, buf: &mut [u8]) -> Result<PageRead, SourceError> {
        let page = usize::try_from(PAGE_SIZE).unwrap_or(4096);
        if buf.is_empty() || !buf.len().is_multiple_of(page) || !vaddr.is_multiple_of(PAGE_SIZE) {
            return Err(SourceError::BadRequest {
                pid,
                vaddr,
                len: buf.len(),
            });
        }
        let task = self
            .tasks
            .get(&pid)
            .ok_or(SourceError::UnknownPid { pid })?;
        let want = buf.len() / page;
        let i = task.segments.partition_point(|s| s.end() <= vaddr);
        let seg = task.segments.get(i);
        match seg {
            Some(s) if s.vaddr <= vaddr => {
                let skip = (vaddr - s.vaddr) / PAGE_SIZE;
                let avail = usize::try_from(s.nr_pages - skip).unwrap_or(usize::MAX);
                let n = want.min(avail);
                let PageData::File { file, offset } = s.data else {
                    return Err(SourceError::NotHere { pid, vaddr });
                };
                let (path, f) = &self.files[task.files[file]];
                let off = offset + skip * PAGE_SIZE;
                f.read_exact_at(&mut buf[..n * page], off)
                    .map_err(|source| SourceError::Io {
                        path: path.clone(),
                        offset: off,
                        source,
                    })?;
                Ok(PageRead {
                    pages: n,
                    kind: PageKind::Data,
                })
            }
            next => {
                let gap = next.map_or(u64::MAX, |s| (s.vaddr - vaddr) / PAGE_SIZE);
                let n = usize::try_from(gap).unwrap_or(usize::MAX).min(want);
                Ok(PageRead {
                    pages: n,
                    kind: PageKind::Zero,
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::images::testutil::*;
    use crate::images::{PstreeEntry, PE_LAZY, PE_PRESENT, PSTREE_MAGIC};

    #[test]
    fn reads_runs_of_data_and_zero() {
        let d = tempfile::tempdir().unwrap();
        write_inventory(d.path()).unwrap();
        let mut b = header(PSTREE_MAGIC);
        push(
            &mut b,
            &PstreeEntry {
                pid: 9,
                ppid: 0,
                pgid: 9,
                sid: 9,
                threads: vec![9],
            },
        );
        std::fs::write(d.path().join("pstree.img"), b).unwrap();
        write_pagemap(
            d.path(),
            9,
            1,
            &[
                pm(0x10000, 2, PE_PRESENT),
                pm(0x14000, 1, PE_PRESENT | PE_LAZY),
                pm(0x15000, 1, PE_LAZY),
            ],
        )
        .unwrap();
        let mut pages = vec![0u8; 3 * 4096];
        pages[..4096].fill(1);
        pages[4096..8192].fill(2);
        pages[8192..].fill(3);
        std::fs::write(d.path().join("pages-1.img"), pages).unwrap();
        let src = LocalImages::open(d.path()).unwrap();
        let mut buf = vec![0u8; 8 * 4096];
        let r = src.read_pages(9, 0x11000, &mut buf).unwrap();
        assert_eq!(
            r,
            PageRead {
                pages: 1,
                kind: PageKind::Data
            }
        );
        assert_eq!(buf[0], 2);
        let r = src.read_pages(9, 0x12000, &mut buf).unwrap();
        assert_eq!(
            r,
            PageRead {
                pages: 2,
                kind: PageKind::Zero
            }
        );
        let r = src.read_pages(9, 0x14000, &mut buf).unwrap();
        assert_eq!(
            r,
            PageRead {
                pages: 1,
                kind: PageKind::Data
            }
        );
        assert_eq!(buf[4095], 3);
        assert!(matches!(
            src.read_pages(9, 0x15000, &mut buf),
            Err(SourceError::NotHere { .. })
        ));
        let r = src.read_pages(9, 0x16000, &mut buf).unwrap();
        assert_eq!(
            r,
            PageRead {
                pages: 8,
                kind: PageKind::Zero
            }
        );
        assert!(matches!(
            src.read_pages(8, 0x16000, &mut buf),
            Err(SourceError::UnknownPid { .. })
        ));
        assert!(matches!(
            src.read_pages(9, 0x16001, &mut buf),
            Err(SourceError::BadRequest { .. })
        ));
    }
}
