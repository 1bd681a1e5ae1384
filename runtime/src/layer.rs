//! Checkpoints of lazily restored tasks: CRIU's dump made complete and, where a base layer
//! exists, incremental.
//!
//! # What CRIU's dump does with lazily restored memory
//!
//! `criu dump` decides page by page from `/proc/<pid>/pagemap` (or `PAGEMAP_SCAN`): only pages
//! that are present (or swapped) and not the shared zero page are dumped (criu/mem.c
//! `should_dump_page`, `generate_iovs`). A page of a userfaultfd-registered range that the
//! fetcher has not installed yet is not present, so CRIU neither touches it (no fault, nothing
//! fetched) nor dumps it: its pagemap simply has a hole there, and a restore of that dump would
//! give the task a zero page where data was. A checkpoint of a container whose memory is still
//! partly remote is therefore wrong unless something fills those holes. [`complete_dump`]
//! does, from what the fetcher reports ([`crate::residency`]), taken while the tasks were
//! frozen for the dump:
//!
//! | page in the dump | fetcher's state | base layer usable | written to the new layer |
//! |---|---|---|---|
//! | present | clean, same pid and address | yes | `PE_PARENT` (data dropped) |
//! | present | anything else | - | the dumped data |
//! | absent | any, same pid and address | yes | `PE_PARENT` |
//! | absent | any | no, or moved/forked | data read from the page source |
//! | absent | not lazily managed | - | nothing (a hole, as CRIU saw it) |
//!
//! Why "any" for absent pages: a page the fetcher manages that is absent from the dump was not
//! present when CRIU scanned the frozen task, so its content then was the checkpoint's (never
//! installed, or being installed right then), or zero because the source holds a zero page
//! there (then the source says so and it stays a hole). A page the task dropped
//! (`MADV_DONTNEED`, `munmap`) is no longer managed: the fetcher removes it on the event. The
//! report must therefore describe the frozen tasks; [`crate::fetcher::ResidencyProbe`] gives a
//! generation counter to prove that no address-space event happened between the report and
//! the end of the dump.
//!
//! "Same pid and address": `PE_PARENT` means "the parent layer holds this page for this pid at
//! this address", so a run the task `mremap`ped, or a forked child's inherited pages, are
//! copied instead. Ranges are only completed inside private anonymous VMAs of the new dump
//! (`mm-<pid>.img`): memory the task unmapped is not resurrected.
//!
//! A base layer is "usable" when the checkpoint the tasks were restored from (or the last
//! layer published since) is stored where the new layer goes, so that a `parent` link resolves
//! (the page server's store). Without one the new checkpoint is self-contained.

use std::collections::BTreeSet;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::images::write::PagemapWriter;
use crate::images::{ImageDir, ImageError, PageRange, PAGE_SIZE, PE_LAZY, PE_PARENT, PE_PRESENT};
use crate::residency::{PageState, Residency, ResidentRun};
use crate::source::{PageKind, PageSource, SourceError};

/// Pages read from the source per request when completing a dump.
const FETCH_PAGES: usize = 256;
/// Bytes of one batch read from the page source.
const FETCH_BYTES: usize = FETCH_PAGES * 4096;

/// Errors of completing a dump.
#[derive(Debug, thiserror::Error)]
pub enum LayerError {
    /// The dump's images could not be read.
    #[error("read the dump in {}", dir.display())]
    Images {
        /// The dump directory.
        dir: PathBuf,
        /// The reader's error.
        #[source]
        source: ImageError,
    },
    /// A file of the dump could not be read or written.
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
    /// Pages still remote could not be read from the page source.
    #[error("read {pages} remote pages of pid {pid} at {vaddr:#x} for the checkpoint")]
    Source {
        /// The task (the source's pid).
        pid: u32,
        /// Dump-time address in the source.
        vaddr: u64,
        /// Pages asked for.
        pages: u64,
        /// The source's error.
        #[source]
        source: SourceError,
    },
}

/// What [`complete_dump`] did, in pages.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct LayerSummary {
    /// Pages whose data the new layer holds (dumped or read from the source).
    pub data_pages: u64,
    /// Pages the new layer leaves to its parent (`PE_PARENT`).
    pub parent_pages: u64,
    /// Of `parent_pages`, pages CRIU had dumped but that were clean.
    pub clean_dropped: u64,
    /// Of `data_pages`, pages read from the page source (still remote, no usable parent).
    pub fetched_pages: u64,
}

/// Where a dumped page's data is.
#[derive(Debug, Clone, Copy)]
struct Dumped {
    vaddr: u64,
    pages: u64,
    flags: u32,
    /// Byte offset in the pages file (meaningful with `PE_PRESENT`).
    offset: u64,
}

fn covering<T>(items: &[T], a: u64, range: impl Fn(&T) -> (u64, u64)) -> Option<&T> {
    let i = items.partition_point(|x| range(x).1 <= a);
    items.get(i).filter(|x| range(x).0 <= a)
}

/// Completes the CRIU dump in `dir` with the pages the fetcher still manages (see the module
/// documentation). `taken` is the fetcher's report taken with the tasks frozen, before the dump
/// ran; `parent_usable` says whether `PE_PARENT` may refer to the base layer; `source` reads
/// pages that must be copied in. Rewrites each task's pagemap and pages file atomically.
pub fn complete_dump(
    dir: &Path,
    taken: &Residency,
    parent_usable: bool,
    source: &dyn PageSource,
) -> Result<LayerSummary, LayerError> {
    let images = |source| LayerError::Images {
        dir: dir.to_path_buf(),
        source,
    };
    let img = ImageDir::open(dir).map_err(images)?;
    let mut sum = LayerSummary::default();
    for t in &taken.tasks {
        if !dir.join(format!("pagemap-{}.img", t.pid)).exists() {
            continue; // exited before the dump
        }
        let (pages_id, entries) = img.pagemap_entries(t.pid).map_err(images)?;
        let vmas: Vec<(u64, u64)> = img
            .vmas(t.pid)
            .map_err(images)?
            .iter()
            .filter(|v| v.can_be_lazy())
            .map(|v| (v.start, v.end))
            .collect();
        let pages_path = dir.join(format!("pages-{pages_id}.img"));
        let pages_file = if entries.iter().any(|e| e.flags & PE_PRESENT != 0) {
            Some(File::open(&pages_path).map_err(|source| LayerError::Io {
                what: "open",
                path: pages_path.clone(),
                source,
            })?)
        } else {
            None
        };
        let dumped = with_offsets(&entries);
        let mut runs: Vec<ResidentRun> = t.runs.clone();
        runs.sort_by_key(|r| r.addr);
        let io = |what: &'static str, path: &Path| {
            let path = path.to_path_buf();
            move |source| LayerError::Io { what, path, source }
        };
        let mut w = PagemapWriter::create(dir, t.pid, pages_id).map_err(io("write in", dir))?;
        // Elementary intervals: every boundary of a dumped entry, a run or a VMA.
        let mut cuts = BTreeSet::new();
        for d in &dumped {
            cuts.insert(d.vaddr);
            cuts.insert(d.vaddr + d.pages * PAGE_SIZE);
        }
        for r in &runs {
            cuts.insert(r.addr);
            cuts.insert(r.addr + r.pages * PAGE_SIZE);
        }
        for &(s, e) in &vmas {
            cuts.insert(s);
            cuts.insert(e);
        }
        let cuts: Vec<u64> = cuts.into_iter().collect();
        let mut buf = vec![0u8; FETCH_BYTES];
        for pair in cuts.windows(2) {
            let (a, b) = (pair[0], pair[1]);
            let n = (b - a) / PAGE_SIZE;
            let d = covering(&dumped, a, |d| (d.vaddr, d.vaddr + d.pages * PAGE_SIZE));
            let r = covering(&runs, a, |r| (r.addr, r.addr + r.pages * PAGE_SIZE));
            let in_vma = covering(&vmas, a, |v| *v).is_some();
            // The run's source address of `a`, and whether PE_PARENT can name it.
            let img_at = r.map(|r| r.img + (a - r.addr));
            let same_place = r.is_some() && img_at == Some(a) && t.source_pid == t.pid;
            let parent_ok = parent_usable && same_place && in_vma;
            match (d, r) {
                (Some(_), Some(r)) if parent_ok && r.state == PageState::Clean => {
                    w.hole(a, n, PE_PARENT).map_err(io("write in", dir))?;
                    sum.parent_pages += n;
                    sum.clean_dropped += n;
                }
                (Some(d), _) if d.flags & PE_PRESENT != 0 => {
                    let off = d.offset + (a - d.vaddr);
                    let f = pages_file.as_ref().ok_or_else(|| {
                        io("read", &pages_path)(std::io::ErrorKind::NotFound.into())
                    })?;
                    copy_pages(f, &pages_path, off, n, d.flags, a, &mut w, &mut buf)?;
                    sum.data_pages += n;
                }
                (Some(d), _) => w.hole(a, n, d.flags).map_err(io("write in", dir))?,
                (None, Some(_)) if in_vma => {
                    if parent_ok {
                        w.hole(a, n, PE_PARENT).map_err(io("write in", dir))?;
                        sum.parent_pages += n;
                    } else {
                        let from = img_at.unwrap_or(a);
                        let got = fetch_pages(source, t.source_pid, from, a, n, &mut w, &mut buf)
                            .map_err(|e| match e {
                            Fetch::Source(source) => LayerError::Source {
                                pid: t.source_pid,
                                vaddr: from,
                                pages: n,
                                source,
                            },
                            Fetch::Io(source) => LayerError::Io {
                                what: "write in",
                                path: dir.to_path_buf(),
                                source,
                            },
                        })?;
                        sum.data_pages += got;
                        sum.fetched_pages += got;
                    }
                }
                _ => {}
            }
        }
        w.commit().map_err(io("replace the pagemap in", dir))?;
    }
    Ok(sum)
}

/// The dump's entries with the byte offset of each in the pages file.
fn with_offsets(entries: &[PageRange]) -> Vec<Dumped> {
    let mut off = 0;
    entries
        .iter()
        .map(|e| {
            let d = Dumped {
                vaddr: e.vaddr,
                pages: e.nr_pages,
                flags: e.flags,
                offset: off,
            };
            if e.flags & PE_PRESENT != 0 {
                off += e.nr_pages * PAGE_SIZE;
            }
            d
        })
        .collect()
}

#[allow(clippy::too_many_arguments)]
fn copy_pages(
    f: &File,
    path: &Path,
    mut off: u64,
    n: u64,
    flags: u32,
    mut at: u64,
    w: &mut PagemapWriter,
    buf: &mut [u8],
) -> Result<(), LayerError> {
    let mut left = n;
    while left > 0 {
        let k = left.min(FETCH_PAGES as u64);
        let len = usize::try_from(k * PAGE_SIZE).unwrap_or(buf.len());
        f.read_exact_at(&mut buf[..len], off)
            .map_err(|source| LayerError::Io {
                what: "read",
                path: path.to_path_buf(),
                source,
            })?;
        w.data(at, flags, &buf[..len])
            .map_err(|source| LayerError::Io {
                what: "write pages for",
                path: path.to_path_buf(),
                source,
            })?;
        off += k * PAGE_SIZE;
        at += k * PAGE_SIZE;
        left -= k;
    }
    Ok(())
}

enum Fetch {
    Source(SourceError),
    Io(std::io::Error),
}

/// Reads `n` pages of `pid` at `from` from the source and writes the data ones at `at`;
/// zero pages stay holes. Returns the data pages written.
fn fetch_pages(
    source: &dyn PageSource,
    pid: u32,
    mut from: u64,
    mut at: u64,
    n: u64,
    w: &mut PagemapWriter,
    buf: &mut [u8],
) -> Result<u64, Fetch> {
    let mut left = n;
    let mut data = 0;
    while left > 0 {
        let k = left.min(FETCH_PAGES as u64);
        let len = usize::try_from(k * PAGE_SIZE).unwrap_or(buf.len());
        let got = source
            .read_pages(pid, from, &mut buf[..len])
            .map_err(Fetch::Source)?;
        let m = (got.pages as u64).clamp(1, k);
        if got.kind == PageKind::Data {
            let bytes = usize::try_from(m * PAGE_SIZE).unwrap_or(len);
            w.data(at, PE_LAZY | PE_PRESENT, &buf[..bytes])
                .map_err(Fetch::Io)?;
            data += m;
        }
        from += m * PAGE_SIZE;
        at += m * PAGE_SIZE;
        left -= m;
    }
    Ok(data)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::images::testutil::{pm, write_inventory, write_mm, write_pagemap};
    use crate::residency::TaskResidency;
    use crate::source::PageRead;

    /// Serves page `v` of any pid as 4096 bytes of `(v >> 12) as u8`; zero at 0x90000.
    struct Pattern;
    impl PageSource for Pattern {
        fn read_pages(
            &self,
            _pid: u32,
            vaddr: u64,
            buf: &mut [u8],
        ) -> Result<PageRead, SourceError> {
            if vaddr == 0x90000 {
                return Ok(PageRead {
                    pages: 1,
                    kind: PageKind::Zero,
                });
            }
            buf[..4096].fill((vaddr >> 12).to_le_bytes()[0]);
            Ok(PageRead {
                pages: 1,
                kind: PageKind::Data,
            })
        }
    }

    fn run(addr: u64, img: u64, pages: u64, state: PageState) -> ResidentRun {
        ResidentRun {
            addr,
            img,
            pages,
            state,
        }
    }

    /// A dump of pid 1: VMA 0x10000..0xa0000; CRIU dumped 0x10000 (2 pages, lazy) and
    /// 0x30000 (1 page); a stack page 0x50000 (eager).
    fn dump() -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        write_inventory(d.path()).unwrap();
        write_mm(d.path(), 1, &[(0x10000, 0xa0000)]).unwrap();
        write_pagemap(
            d.path(),
            1,
            1,
            &[
                pm(0x10000, 2, PE_LAZY | PE_PRESENT),
                pm(0x30000, 1, PE_LAZY | PE_PRESENT),
                pm(0x50000, 1, PE_PRESENT),
            ],
        )
        .unwrap();
        let mut pages = vec![0xd1u8; 8192];
        pages.extend_from_slice(&[0xd3; 4096]);
        pages.extend_from_slice(&[0xd5; 4096]);
        std::fs::write(d.path().join("pages-1.img"), pages).unwrap();
        d
    }

    fn residency() -> Residency {
        Residency {
            tasks: vec![TaskResidency {
                pid: 1,
                source_pid: 1,
                tracked: true,
                runs: vec![
                    run(0x10000, 0x10000, 1, PageState::Dirty),
                    run(0x11000, 0x11000, 1, PageState::Clean),
                    run(0x12000, 0x12000, 0x1e, PageState::Remote),
                    run(0x30000, 0x30000, 1, PageState::Dirty),
                    run(0x31000, 0x31000, 0x1f, PageState::Remote),
                    run(0x90000, 0x90000, 1, PageState::Remote),
                    // Outside every VMA of the new dump: unmapped, not resurrected.
                    run(0xb0000, 0xb0000, 4, PageState::Remote),
                ],
            }],
            forked_remote_pages: 0,
        }
    }

    fn entries(d: &Path) -> Vec<(u64, u64, u32)> {
        let img = ImageDir::open(d).unwrap();
        let (_, e) = img.pagemap_entries(1).unwrap();
        e.iter().map(|e| (e.vaddr, e.nr_pages, e.flags)).collect()
    }

    #[test]
    fn with_a_parent_only_written_pages_keep_data() {
        let d = dump();
        let s = complete_dump(d.path(), &residency(), true, &Pattern).unwrap();
        assert_eq!(
            entries(d.path()),
            vec![
                (0x10000, 1, PE_LAZY | PE_PRESENT),
                (0x11000, 0x1f, PE_PARENT),
                (0x30000, 1, PE_LAZY | PE_PRESENT),
                (0x31000, 0x1f, PE_PARENT),
                (0x50000, 1, PE_PRESENT),
                (0x90000, 1, PE_PARENT),
            ]
        );
        assert_eq!(s.clean_dropped, 1);
        assert_eq!(s.fetched_pages, 0);
        let pages = std::fs::read(d.path().join("pages-1.img")).unwrap();
        assert_eq!(pages.len(), 3 * 4096);
        assert_eq!((pages[0], pages[4096], pages[8192]), (0xd1, 0xd3, 0xd5));
    }

    #[test]
    fn without_a_parent_remote_pages_are_copied_in() {
        let d = dump();
        let s = complete_dump(d.path(), &residency(), false, &Pattern).unwrap();
        // Dumped and copied pages are contiguous with equal flags: one merged entry.
        assert_eq!(
            entries(d.path()),
            vec![
                (0x10000, 0x40, PE_LAZY | PE_PRESENT),
                (0x50000, 1, PE_PRESENT)
            ],
            "the zero page at 0x90000 stays a hole"
        );
        assert_eq!(s.fetched_pages, 0x1e + 0x1f);
        let pages = std::fs::read(d.path().join("pages-1.img")).unwrap();
        let at = |p: usize| pages[p * 4096];
        assert_eq!((at(0), at(1), at(2)), (0xd1, 0xd1, 0x12));
        assert_eq!((at(0x20), at(0x21), at(0x40)), (0xd3, 0x31, 0xd5));
    }

    #[test]
    fn moved_and_forked_pages_are_copied_not_parented() {
        let d = dump();
        let mut r = residency();
        r.tasks[0].runs = vec![run(0x12000, 0x712000, 2, PageState::Remote)];
        let s = complete_dump(d.path(), &r, true, &Pattern).unwrap();
        assert_eq!(s.parent_pages, 0);
        assert_eq!(s.fetched_pages, 2);
        let e = entries(d.path());
        // The two dumped pages at 0x10000 and the two copied ones merge.
        assert!(e.contains(&(0x10000, 4, PE_LAZY | PE_PRESENT)), "{e:x?}");
        assert!(!e.iter().any(|&(_, _, f)| f & PE_PARENT != 0), "{e:x?}");
        let d = dump();
        let mut r = residency();
        r.tasks[0].source_pid = 9;
        let s = complete_dump(d.path(), &r, true, &Pattern).unwrap();
        assert_eq!(s.parent_pages, 0);
        assert!(s.fetched_pages > 0);
    }
}
