//! Where page contents come from: the [`PageSource`] trait, transport-neutral, and
//! [`LocalImages`], its implementation over a local CRIU image directory.
//!
//! A source answers "the pages of task `pid` at dump-time address `vaddr`" and says which of them
//! are zero (never dumped). It does not know about userfaultfd; the fetcher installs what it
//! returns. A remote page-server client implements the same trait.

use std::collections::HashMap;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::images::{
    ImageDir, ImageError, PageData, PageRange, PageSegment, PstreeEntry, PAGE_SIZE,
};

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

    /// Zero-copy read: up to `max` pages of `pid` at the page-aligned dump-time `vaddr` as a
    /// slice of memory the source keeps mapped for its whole life (data pages; empty for zero
    /// pages), with what they are. `None`: this source has no mapping for them, use
    /// [`PageSource::read_pages`]. The fill installs straight from the slice (no copy into a
    /// buffer first).
    fn mapped(&self, _pid: u32, _vaddr: u64, _max: usize) -> Option<(PageRead, &[u8])> {
        None
    }

    /// Fill workers per configured `fill_threads`: a source whose reads mostly wait for a
    /// round trip (a page server) keeps more of them busy, so that several requests are in
    /// flight while others' pages are installed. 1 for a local source.
    fn fill_workers_per_thread(&self) -> usize {
        1
    }

    /// The pstree and pagemaps of the image directory `dir`, when this source decoded them
    /// already, so that the fetcher's bind does not decode them a second time.
    fn decoded(&self, _dir: &Path) -> Option<&DecodedImages> {
        None
    }
}

/// What [`LocalImages::open`] decoded of an image directory, for the fetcher to reuse.
#[derive(Debug, Clone)]
pub struct DecodedImages {
    /// The directory.
    pub dir: PathBuf,
    /// `pstree.img`, in file order.
    pub pstree: Vec<PstreeEntry>,
    /// The entries of each task's top `pagemap-<pid>.img` (tasks with one).
    pub pagemaps: HashMap<u32, Vec<PageRange>>,
}

/// A read-only shared mapping of a whole pages file (also used by the page server to send
/// pages without reading them into a buffer first).
pub struct FileMapping {
    ptr: *const u8,
    len: usize,
}

// SAFETY: the mapping is read-only and lives until drop; sharing the pointer between threads
// only allows concurrent reads.
unsafe impl Send for FileMapping {}
// SAFETY: as above.
unsafe impl Sync for FileMapping {}

impl FileMapping {
    /// Maps `f` read-only at its current size; `None` for an empty file or when mmap fails
    /// (callers then read with pread).
    pub fn new(f: &File) -> Option<FileMapping> {
        let len = f.metadata().ok()?.len();
        let len = usize::try_from(len).ok().filter(|&l| l > 0)?;
        // SAFETY: a fresh read-only shared mapping of a file we hold open; no existing memory
        // is affected, and the result is checked.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                f.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return None;
        }
        Some(FileMapping {
            ptr: p.cast::<u8>().cast_const(),
            len,
        })
    }

    /// The bytes `[off, off + len)`, with their page tables populated (so that UFFDIO_COPY
    /// does not take its slow path of faulting on the source); `None` when out of range or
    /// when populating fails (e.g. the file was truncated).
    pub fn slice(&self, off: u64, len: usize) -> Option<&[u8]> {
        let off = usize::try_from(off).ok()?;
        if off.checked_add(len)? > self.len {
            return None;
        }
        // SAFETY: `off + len <= self.len`, so the range is inside our live mapping.
        let p = unsafe { self.ptr.add(off) };
        // SAFETY: madvise on a range of our own mapping; MADV_POPULATE_READ only faults its
        // pages in (it fails with EFAULT instead of a SIGBUS past a truncated file's end).
        let r = unsafe {
            libc::madvise(
                p.cast_mut().cast::<libc::c_void>(),
                len,
                libc::MADV_POPULATE_READ,
            )
        };
        if r != 0 {
            return None;
        }
        // SAFETY: the range is inside the mapping, which lives as long as `self`; it is
        // read-only and every page of it is backed (populated just above).
        Some(unsafe { std::slice::from_raw_parts(p, len) })
    }
}

impl Drop for FileMapping {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping created in `new`; no slice of it outlives `self`.
        unsafe {
            libc::munmap(self.ptr.cast_mut().cast::<libc::c_void>(), self.len);
        }
    }
}

struct TaskIndex {
    segments: Vec<PageSegment>,
    /// Indexes into `LocalImages::files` for each of the task's `PageMap::files`.
    files: Vec<usize>,
}

/// [`PageSource`] over the pages files of a local image directory. Indexes are built once at
/// open; a read is a binary search and one `pread` per run, with no allocation. Each pages
/// file is also mapped read-only, so the fill copies from the page cache straight into the
/// task ([`PageSource::mapped`]).
pub struct LocalImages {
    tasks: HashMap<u32, TaskIndex>,
    files: Vec<(PathBuf, File, Option<FileMapping>)>,
    decoded: DecodedImages,
}

impl LocalImages {
    /// Indexes every task of the pstree in `dir` that has a pagemap (zombies have none).
    pub fn open(dir: &Path) -> Result<LocalImages, SourceError> {
        let img = ImageDir::open(dir)?;
        let mut tasks = HashMap::new();
        let mut files: Vec<(PathBuf, File, Option<FileMapping>)> = Vec::new();
        let pstree = img.pstree()?;
        let mut pagemaps = HashMap::new();
        for entry in &pstree {
            let pid = entry.pid;
            if !dir.join(format!("pagemap-{pid}.img")).exists() {
                continue;
            }
            let map = img.pagemap(pid)?;
            pagemaps.insert(pid, map.entries);
            let mut idx = Vec::with_capacity(map.files.len());
            for path in map.files {
                if let Some(i) = files.iter().position(|(p, _, _)| *p == path) {
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
                let m = FileMapping::new(&f);
                files.push((path, f, m));
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
        Ok(LocalImages {
            tasks,
            files,
            decoded: DecodedImages {
                dir: dir.to_path_buf(),
                pstree,
                pagemaps,
            },
        })
    }

    /// The segment answering `vaddr` of `pid`: `Ok(Some((segment, pages from vaddr)))`, or
    /// `Ok(None)` with the zero pages up to the next segment (at most `want`).
    fn locate(
        &self,
        pid: u32,
        vaddr: u64,
        want: usize,
    ) -> Result<(&TaskIndex, Located<'_>), SourceError> {
        let task = self
            .tasks
            .get(&pid)
            .ok_or(SourceError::UnknownPid { pid })?;
        let i = task.segments.partition_point(|s| s.end() <= vaddr);
        Ok(match task.segments.get(i) {
            Some(s) if s.vaddr <= vaddr => {
                let skip = (vaddr - s.vaddr) / PAGE_SIZE;
                let avail = usize::try_from(s.nr_pages - skip).unwrap_or(usize::MAX);
                (task, Ok((s, want.min(avail))))
            }
            next => {
                let gap = next.map_or(u64::MAX, |s| (s.vaddr - vaddr) / PAGE_SIZE);
                (
                    task,
                    Err(usize::try_from(gap).unwrap_or(usize::MAX).min(want)),
                )
            }
        })
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
        let want = buf.len() / page;
        match self.locate(pid, vaddr, want)? {
            (task, Ok((s, n))) => {
                let PageData::File { file, offset } = s.data else {
                    return Err(SourceError::NotHere { pid, vaddr });
                };
                let (path, f, _) = &self.files[task.files[file]];
                let off = offset + (vaddr - s.vaddr);
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
            (_, Err(n)) => Ok(PageRead {
                pages: n,
                kind: PageKind::Zero,
            }),
        }
    }

    fn mapped(&self, pid: u32, vaddr: u64, max: usize) -> Option<(PageRead, &[u8])> {
        if max == 0 || !vaddr.is_multiple_of(PAGE_SIZE) {
            return None;
        }
        match self.locate(pid, vaddr, max).ok()? {
            (task, Ok((s, n))) => {
                let PageData::File { file, offset } = s.data else {
                    return None;
                };
                let (_, _, m) = self.files.get(*task.files.get(file)?)?;
                let data = m.as_ref()?.slice(offset + (vaddr - s.vaddr), n * PAGE)?;
                let r = PageRead {
                    pages: n,
                    kind: PageKind::Data,
                };
                Some((r, data))
            }
            (_, Err(n)) => Some((
                PageRead {
                    pages: n,
                    kind: PageKind::Zero,
                },
                &[],
            )),
        }
    }

    fn decoded(&self, dir: &Path) -> Option<&DecodedImages> {
        (self.decoded.dir == dir).then_some(&self.decoded)
    }
}

const PAGE: usize = crate::protocol::PAGE_SIZE;

/// Where a read starts: in a segment (with the pages available from there), or in a hole of
/// zero pages (how many, up to the next segment).
type Located<'a> = Result<(&'a PageSegment, usize), usize>;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::images::testutil::*;
    use crate::images::{PE_LAZY, PE_PRESENT};

    #[test]
    fn reads_runs_of_data_and_zero() {
        let d = tempfile::tempdir().unwrap();
        write_inventory(d.path()).unwrap();
        write_pstree(d.path(), &[9]).unwrap();
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
        // The zero-copy view answers the same, from the mapping.
        let (r, m) = src.mapped(9, 0x10000, 8).unwrap();
        assert_eq!(
            r,
            PageRead {
                pages: 2,
                kind: PageKind::Data
            }
        );
        assert_eq!((m.len(), m[0], m[4096]), (8192, 1, 2));
        let (r, m) = src.mapped(9, 0x12000, 8).unwrap();
        assert_eq!((r.pages, r.kind, m.len()), (2, PageKind::Zero, 0));
        assert!(src.mapped(9, 0x15000, 8).is_none());
        assert!(src.mapped(8, 0x10000, 8).is_none());
        // What open decoded is offered for the same directory only.
        let dec = src.decoded(d.path()).unwrap();
        assert_eq!(dec.pstree.len(), 1);
        assert_eq!(dec.pagemaps[&9].len(), 3);
        assert!(src.decoded(Path::new("/elsewhere")).is_none());
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
