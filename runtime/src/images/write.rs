//! Writing a task's pagemap and pages file, the way CRIU lays them out (see the module
//! documentation of [`crate::images`]): `pagemap-<pid>.img` is the common and pagemap magics,
//! a `PagemapHead { pages_id }`, then `PagemapEntry` records in address order;
//! `pages-<pages_id>.img` holds the 4096-byte pages of the `PE_PRESENT` entries, in entry order.
//!
//! [`PagemapWriter`] writes both under temporary names (`.<name>.tmp` in the same directory)
//! and renames them into place only in [`PagemapWriter::commit`], after an fsync: a reader never
//! sees a pagemap whose pages file does not match it, and a writer dropped half-way leaves the
//! original files untouched. Adjacent pages with the same flags are merged into one entry.
//! Entries carry the page count in both fields 2 and 5, so CRIU 4.1 and 4.2 read them.

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};

use prost::Message;

use super::{PagemapEntry, PagemapHead, IMG_COMMON_MAGIC, PAGEMAP_MAGIC, PAGE_SIZE, PE_PRESENT};

/// Writes one task's pagemap and pages file; see the module documentation.
#[derive(Debug)]
pub struct PagemapWriter {
    map_path: PathBuf,
    pages_path: PathBuf,
    map_tmp: PathBuf,
    pages_tmp: PathBuf,
    map: BufWriter<File>,
    pages: BufWriter<File>,
    /// The entry being extended: (vaddr, pages, flags).
    open: Option<(u64, u64, u32)>,
    /// End address of the last entry written, to refuse out-of-order input.
    last_end: u64,
    committed: bool,
}

/// Writes one image record: the message's length (u32, little endian), then the message.
pub fn write_message(w: &mut impl Write, m: &impl Message) -> io::Result<()> {
    let body = m.encode_to_vec();
    let len = u32::try_from(body.len()).map_err(io::Error::other)?;
    w.write_all(&len.to_le_bytes())?;
    w.write_all(&body)
}

/// Writes `inventory.img` into `dir`: the image version and `fdinfo_per_id`, nothing of a
/// dump (a stand-in for the dump's own, where only pages were received).
pub fn write_inventory(dir: &Path) -> io::Result<()> {
    let mut b = super::INVENTORY_MAGIC.to_le_bytes().to_vec();
    write_message(
        &mut b,
        &super::InventoryEntry {
            img_version: super::IMG_VERSION,
            fdinfo_per_id: Some(true),
        },
    )?;
    std::fs::write(dir.join("inventory.img"), b)
}

impl PagemapWriter {
    /// Starts `pagemap-<pid>.img` naming `pages-<pages_id>.img` in `dir`.
    pub fn create(dir: &Path, pid: u32, pages_id: u32) -> io::Result<PagemapWriter> {
        PagemapWriter::create_named(dir, &format!("pagemap-{pid}.img"), pages_id)
    }

    /// Starts the pagemap `map_name` (a task's `pagemap-<pid>.img`, or a shared memory
    /// segment's `pagemap-shmem-<id>.img`) naming `pages-<pages_id>.img` in `dir`.
    pub fn create_named(dir: &Path, map_name: &str, pages_id: u32) -> io::Result<PagemapWriter> {
        let map_name = map_name.to_owned();
        let pages_name = format!("pages-{pages_id}.img");
        let map_tmp = dir.join(format!(".{map_name}.tmp"));
        let pages_tmp = dir.join(format!(".{pages_name}.tmp"));
        let mut map = BufWriter::new(File::create(&map_tmp)?);
        let pages = BufWriter::with_capacity(1 << 20, File::create(&pages_tmp)?);
        map.write_all(&IMG_COMMON_MAGIC.to_le_bytes())?;
        map.write_all(&PAGEMAP_MAGIC.to_le_bytes())?;
        write_message(&mut map, &PagemapHead { pages_id })?;
        Ok(PagemapWriter {
            map_path: dir.join(map_name),
            pages_path: dir.join(pages_name),
            map_tmp,
            pages_tmp,
            map,
            pages,
            open: None,
            last_end: 0,
            committed: false,
        })
    }

    fn flush_open(&mut self) -> io::Result<()> {
        if let Some((vaddr, nr, flags)) = self.open.take() {
            let entry = PagemapEntry {
                vaddr,
                compat_nr_pages: u32::try_from(nr).unwrap_or(0),
                in_parent: None,
                flags: Some(flags),
                nr_pages: Some(nr),
            };
            write_message(&mut self.map, &entry)?;
        }
        Ok(())
    }

    fn add(&mut self, vaddr: u64, pages: u64, flags: u32) -> io::Result<()> {
        if pages == 0 {
            return Ok(());
        }
        if !vaddr.is_multiple_of(PAGE_SIZE) || vaddr < self.last_end {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "pagemap entry at {vaddr:#x} is unaligned or before {:#x}",
                    self.last_end
                ),
            ));
        }
        let end = vaddr + pages * PAGE_SIZE;
        match &mut self.open {
            Some((v, n, f)) if *f == flags && *v + *n * PAGE_SIZE == vaddr => *n += pages,
            _ => {
                self.flush_open()?;
                self.open = Some((vaddr, pages, flags));
            }
        }
        self.last_end = end;
        Ok(())
    }

    /// Pages at `vaddr` whose data is `bytes` (a multiple of 4096); `flags` must hold
    /// `PE_PRESENT`.
    pub fn data(&mut self, vaddr: u64, flags: u32, bytes: &[u8]) -> io::Result<()> {
        if flags & PE_PRESENT == 0 || !(bytes.len() as u64).is_multiple_of(PAGE_SIZE) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "data entry without PE_PRESENT or not whole pages",
            ));
        }
        self.add(vaddr, bytes.len() as u64 / PAGE_SIZE, flags)?;
        self.pages.write_all(bytes)
    }

    /// `pages` pages at `vaddr` whose data are the next `pages * 4096` bytes of `r`; `flags`
    /// must hold `PE_PRESENT`. A shorter `r` is an `UnexpectedEof` error.
    pub fn copy_from(
        &mut self,
        vaddr: u64,
        pages: u64,
        flags: u32,
        r: &mut impl io::Read,
    ) -> io::Result<()> {
        if flags & PE_PRESENT == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "data entry without PE_PRESENT",
            ));
        }
        self.add(vaddr, pages, flags)?;
        let want = pages * PAGE_SIZE;
        let got = io::copy(&mut io::Read::take(&mut *r, want), &mut self.pages)?;
        if got != want {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("{got} of the {want} bytes of the pages at {vaddr:#x}"),
            ));
        }
        Ok(())
    }

    /// `pages` pages at `vaddr` without data here (`PE_PARENT`, or `PE_LAZY` served remotely).
    pub fn hole(&mut self, vaddr: u64, pages: u64, flags: u32) -> io::Result<()> {
        if flags & PE_PRESENT != 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "hole entry with PE_PRESENT",
            ));
        }
        self.add(vaddr, pages, flags)
    }

    /// Writes the last entry, syncs both files and renames them over the originals.
    pub fn commit(mut self) -> io::Result<()> {
        self.flush_open()?;
        self.map.flush()?;
        self.pages.flush()?;
        self.map.get_ref().sync_all()?;
        self.pages.get_ref().sync_all()?;
        std::fs::rename(&self.pages_tmp, &self.pages_path)?;
        std::fs::rename(&self.map_tmp, &self.map_path)?;
        self.committed = true;
        Ok(())
    }
}

impl Drop for PagemapWriter {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_file(&self.map_tmp);
            let _ = std::fs::remove_file(&self.pages_tmp);
        }
    }
}

/// Rewrites `pagemap-<pid>.img` of `dir` (atomically; its pages file is untouched) with
/// `PE_LAZY` added to every present page inside one of `lazy` (sorted, non-overlapping address
/// ranges `[start, end)`); entries are split where a range starts or ends, their data stays in
/// the same order. Returns the pages newly marked.
pub fn mark_lazy(
    dir: &Path,
    pid: u32,
    pages_id: u32,
    entries: &[super::PageRange],
    lazy: &[(u64, u64)],
) -> io::Result<u64> {
    use super::PE_LAZY;
    let name = format!("pagemap-{pid}.img");
    let tmp = dir.join(format!(".{name}.tmp"));
    let mut map = BufWriter::new(File::create(&tmp)?);
    let res = (|| {
        map.write_all(&IMG_COMMON_MAGIC.to_le_bytes())?;
        map.write_all(&PAGEMAP_MAGIC.to_le_bytes())?;
        write_message(&mut map, &PagemapHead { pages_id })?;
        let mut marked = 0u64;
        let mut put = |vaddr: u64, end: u64, flags: u32| -> io::Result<()> {
            let nr = (end - vaddr) / PAGE_SIZE;
            if nr == 0 {
                return Ok(());
            }
            write_message(
                &mut map,
                &PagemapEntry {
                    vaddr,
                    compat_nr_pages: u32::try_from(nr).unwrap_or(0),
                    in_parent: None,
                    flags: Some(flags),
                    nr_pages: Some(nr),
                },
            )
        };
        for e in entries {
            if e.flags & PE_PRESENT == 0 || e.flags & PE_LAZY != 0 {
                put(e.vaddr, e.end(), e.flags)?;
                continue;
            }
            let mut at = e.vaddr;
            for &(start, end) in lazy {
                if end <= at || start >= e.end() {
                    continue;
                }
                let (from, to) = (start.max(at), end.min(e.end()));
                put(at, from, e.flags)?;
                put(from, to, e.flags | PE_LAZY)?;
                marked += (to - from) / PAGE_SIZE;
                at = to;
            }
            put(at, e.end(), e.flags)?;
        }
        map.flush()?;
        map.get_ref().sync_all()?;
        Ok(marked)
    })();
    match res {
        Ok(marked) => {
            std::fs::rename(&tmp, dir.join(&name))?;
            Ok(marked)
        }
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            Err(e)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::images::testutil::write_inventory;
    use crate::images::{ImageDir, PE_LAZY, PE_PARENT};

    #[test]
    fn merges_adjacent_entries_and_commits_atomically() {
        let d = tempfile::tempdir().unwrap();
        write_inventory(d.path()).unwrap();
        let mut w = PagemapWriter::create(d.path(), 7, 3).unwrap();
        w.data(0x10000, PE_LAZY | PE_PRESENT, &[1u8; 4096]).unwrap();
        w.data(0x11000, PE_LAZY | PE_PRESENT, &[2u8; 8192]).unwrap();
        w.hole(0x13000, 4, PE_PARENT).unwrap();
        w.hole(0x17000, 1, PE_PARENT).unwrap();
        w.data(0x20000, PE_PRESENT, &[3u8; 4096]).unwrap();
        assert!(w.hole(0x1f000, 1, PE_PARENT).is_err(), "out of order");
        assert!(
            !d.path().join("pagemap-7.img").exists(),
            "visible before commit"
        );
        w.commit().unwrap();
        let img = ImageDir::open(d.path()).unwrap();
        let (pages_id, e) = img.pagemap_entries(7).unwrap();
        assert_eq!(pages_id, 3);
        let got: Vec<_> = e.iter().map(|e| (e.vaddr, e.nr_pages, e.flags)).collect();
        assert_eq!(
            got,
            vec![
                (0x10000, 3, PE_LAZY | PE_PRESENT),
                (0x13000, 5, PE_PARENT),
                (0x20000, 1, PE_PRESENT)
            ]
        );
        let pages = std::fs::read(d.path().join("pages-3.img")).unwrap();
        assert_eq!(pages.len(), 4 * 4096);
        assert_eq!(pages[0], 1);
        assert_eq!(pages[4096], 2);
        assert_eq!(pages[3 * 4096], 3);
    }

    #[test]
    fn a_dropped_writer_leaves_nothing() {
        let d = tempfile::tempdir().unwrap();
        let mut w = PagemapWriter::create(d.path(), 1, 1).unwrap();
        w.data(0x1000, PE_PRESENT, &[0u8; 4096]).unwrap();
        drop(w);
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 0);
    }

    #[test]
    fn mark_lazy_splits_entries_at_the_ranges_and_keeps_the_data() {
        let d = tempfile::tempdir().unwrap();
        write_inventory(d.path()).unwrap();
        let mut w = PagemapWriter::create(d.path(), 2, 5).unwrap();
        w.data(0x10000, PE_PRESENT, &[1u8; 4 * 4096]).unwrap();
        w.hole(0x20000, 2, PE_PARENT).unwrap();
        w.data(0x30000, PE_PRESENT | PE_LAZY, &[2u8; 4096]).unwrap();
        w.data(0x40000, PE_PRESENT, &[3u8; 4096]).unwrap();
        w.commit().unwrap();
        let img = ImageDir::open(d.path()).unwrap();
        let (pages_id, e) = img.pagemap_entries(2).unwrap();
        let pages = std::fs::read(d.path().join("pages-5.img")).unwrap();
        // Pages 0x11000..0x13000 and everything from 0x38000 on can be lazy.
        let n = mark_lazy(
            d.path(),
            2,
            pages_id,
            &e,
            &[(0x11000, 0x13000), (0x38000, 0x50000)],
        )
        .unwrap();
        assert_eq!(n, 3);
        let (_, after) = img.pagemap_entries(2).unwrap();
        let got: Vec<_> = after
            .iter()
            .map(|e| (e.vaddr, e.nr_pages, e.flags))
            .collect();
        assert_eq!(
            got,
            vec![
                (0x10000, 1, PE_PRESENT),
                (0x11000, 2, PE_PRESENT | PE_LAZY),
                (0x13000, 1, PE_PRESENT),
                (0x20000, 2, PE_PARENT),
                (0x30000, 1, PE_PRESENT | PE_LAZY),
                (0x40000, 1, PE_PRESENT | PE_LAZY),
            ]
        );
        assert_eq!(std::fs::read(d.path().join("pages-5.img")).unwrap(), pages);
        let present: u64 = after
            .iter()
            .filter(|e| e.flags & PE_PRESENT != 0)
            .map(|e| e.nr_pages)
            .sum();
        assert_eq!(present, 6);
        assert!(!d.path().join(".pagemap-2.img.tmp").exists());
    }
}
