//! CRIU image reader: the small metadata images the lazy path needs (inventory, pstree, mm,
//! pagemap) and the index from dump-time addresses into `pages-<id>.img`.
//!
//! It owns parsing and validation of those files only; it does not read page data (see
//! [`crate::source`]) and does not write images.
//!
//! # Byte layout (all integers little-endian, host order as CRIU writes them)
//!
//! | offset | size | field | notes |
//! |---|---|---|---|
//! | 0 | 4 | head magic | `IMG_COMMON_MAGIC` 0x54564319; **absent in inventory.img** |
//! | 0 or 4 | 4 | type magic | INVENTORY 0x58313116, PSTREE 0x50273030, MM 0x57492820, PAGEMAP 0x56084025 |
//! | then | 4 | entry length `n` | checked against [`MAX_ENTRY_BYTES`] before allocating |
//! | then | `n` | proto2 message | see [`proto`]; EOF exactly here is a clean end |
//! | ... | | more entries | at most [`MAX_ENTRIES`] per file |
//!
//! `pagemap-<pid>.img` holds a `pagemap_head { pages_id }` and then `pagemap_entry { vaddr,
//! compat_nr_pages (2), in_parent (3), flags (4), nr_pages (5) }` records. CRIU 4.2 writes the page
//! count in field 5 and leaves field 2 at 0; older versions use field 2 only. We prefer field 5
//! when present. Flags: `PE_PARENT` 1 (data in `parent/`), `PE_LAZY` 2, `PE_PRESENT` 4 (data in
//! this directory's pages file); a missing flags field means `PE_PRESENT`.
//!
//! `pages-<id>.img` is raw: no magic, no framing, the 4096-byte pages of the `PE_PRESENT`
//! entries in pagemap order. `PE_PARENT` ranges are looked up in `parent/pagemap-<pid>.img`,
//! following the `parent` symlink chain up to [`MAX_PARENT_DEPTH`] levels.

pub mod proto;
pub mod write;

use std::fs::File;
use std::io::{self, BufReader, Read};
use std::path::{Path, PathBuf};

use prost::Message;

pub use proto::{InventoryEntry, MmEntry, PagemapEntry, PagemapHead, PstreeEntry, VmaEntry};

/// Page size of the images (x86_64).
pub const PAGE_SIZE: u64 = 4096;
/// Head magic of every image except inventory.img and raw images.
pub const IMG_COMMON_MAGIC: u32 = 0x5456_4319;
/// Type magic of inventory.img (its only magic).
pub const INVENTORY_MAGIC: u32 = 0x5831_3116;
/// Type magic of pstree.img.
pub const PSTREE_MAGIC: u32 = 0x5027_3030;
/// Type magic of `mm-<pid>.img`.
pub const MM_MAGIC: u32 = 0x5749_2820;
/// Type magic of `pagemap-<pid>.img`.
pub const PAGEMAP_MAGIC: u32 = 0x5608_4025;
/// The only inventory `img_version` we read (`CRTOOLS_IMAGES_V1_1`).
pub const IMG_VERSION: u32 = 2;

/// Largest single entry accepted (an mm entry with ~200k VMAs still fits).
pub const MAX_ENTRY_BYTES: u32 = 16 << 20;
/// Most entries accepted in one image file.
pub const MAX_ENTRIES: usize = 1 << 22;
/// Deepest `parent` chain followed.
pub const MAX_PARENT_DEPTH: usize = 32;
/// Largest page count of one pagemap entry (1 TiB).
pub const MAX_ENTRY_PAGES: u64 = 1 << 28;

/// Pagemap flag: the data is in the parent image directory.
pub const PE_PARENT: u32 = 1;
/// Pagemap flag: the pages may be restored lazily.
pub const PE_LAZY: u32 = 2;
/// Pagemap flag: the data is in this directory's pages file.
pub const PE_PRESENT: u32 = 4;

const MAP_PRIVATE: u32 = 0x2;
const MAP_ANONYMOUS: u32 = 0x20;
const MAP_LOCKED: u32 = 0x2000;
const MAP_HUGETLB: u32 = 0x4_0000;
const VMA_AREA_VSYSCALL: u32 = 1 << 2;
const VMA_AREA_VDSO: u32 = 1 << 3;
const VMA_AREA_VVAR: u32 = 1 << 12;

/// Errors reading CRIU images. Each names the file and what is wrong with it.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// The file could not be opened or read.
    #[error("cannot read {}", path.display())]
    Io {
        /// The image file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// A magic number does not match the image type.
    #[error("{}: wrong magic {found:#010x}, expected {expected:#010x}", path.display())]
    BadMagic {
        /// The image file.
        path: PathBuf,
        /// What the file holds.
        found: u32,
        /// What this image type needs.
        expected: u32,
    },
    /// The file ends inside a length prefix or an entry.
    #[error("{}: truncated entry at offset {offset}", path.display())]
    Truncated {
        /// The image file.
        path: PathBuf,
        /// Offset of the entry's length prefix.
        offset: u64,
    },
    /// An entry is larger than [`MAX_ENTRY_BYTES`].
    #[error("{}: entry at offset {offset} claims {len} bytes, limit is {limit}", path.display())]
    EntryTooLarge {
        /// The image file.
        path: PathBuf,
        /// Offset of the entry's length prefix.
        offset: u64,
        /// The claimed length.
        len: u32,
        /// The limit.
        limit: u32,
    },
    /// The file has more than [`MAX_ENTRIES`] entries.
    #[error("{}: more than {limit} entries", path.display())]
    TooManyEntries {
        /// The image file.
        path: PathBuf,
        /// The limit.
        limit: usize,
    },
    /// An entry is not a valid protobuf message.
    #[error("{}: cannot decode {what} at offset {offset}", path.display())]
    Decode {
        /// The image file.
        path: PathBuf,
        /// The message type.
        what: &'static str,
        /// Offset of the entry's length prefix.
        offset: u64,
        /// The decoder's complaint.
        #[source]
        source: prost::DecodeError,
    },
    /// A required entry is missing.
    #[error("{}: no {what} entry", path.display())]
    Empty {
        /// The image file.
        path: PathBuf,
        /// The missing message.
        what: &'static str,
    },
    /// The inventory says the images are in a format we do not read.
    #[error("{}: unsupported image version {version} (fdinfo_per_id={fdinfo_per_id:?}), need {IMG_VERSION}", path.display())]
    UnsupportedVersion {
        /// inventory.img.
        path: PathBuf,
        /// Its `img_version`.
        version: u32,
        /// Its `fdinfo_per_id`.
        fdinfo_per_id: Option<bool>,
    },
    /// A value in an entry is impossible.
    #[error("{}: invalid {what} at {vaddr:#x}", path.display())]
    Invalid {
        /// The image file.
        path: PathBuf,
        /// What is wrong.
        what: &'static str,
        /// The address of the offending entry.
        vaddr: u64,
    },
    /// The pagemap's present pages need more bytes than its pages file has.
    #[error("{}: present pages need {needed} bytes of {}, which has {size}", path.display(), pages.display())]
    PagesPastEnd {
        /// The pagemap.
        path: PathBuf,
        /// The pages file.
        pages: PathBuf,
        /// Bytes the pagemap refers to.
        needed: u64,
        /// Size of the pages file.
        size: u64,
    },
    /// A `PE_PARENT` range but no `parent` link in the image directory.
    #[error("{}: pages at {vaddr:#x} are in the parent, but {} does not exist", path.display(), parent.display())]
    MissingParent {
        /// The pagemap.
        path: PathBuf,
        /// The expected parent link.
        parent: PathBuf,
        /// The first parent range.
        vaddr: u64,
    },
    /// The parent does not hold data for a `PE_PARENT` range.
    #[error("{}: parent has no data for {nr_pages} pages at {vaddr:#x}", path.display())]
    ParentRangeMissing {
        /// The child pagemap.
        path: PathBuf,
        /// Start of the uncovered range.
        vaddr: u64,
        /// Its length in pages.
        nr_pages: u64,
    },
    /// The `parent` chain is too deep (or loops).
    #[error("{}: parent chain deeper than {MAX_PARENT_DEPTH}", dir.display())]
    ParentTooDeep {
        /// The image directory at the top of the chain.
        dir: PathBuf,
    },
}

/// One pagemap entry with its flags normalised and its page count resolved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageRange {
    /// Dump-time address of the first page.
    pub vaddr: u64,
    /// Number of pages.
    pub nr_pages: u64,
    /// `PE_*` bits.
    pub flags: u32,
}

impl PageRange {
    /// End address (exclusive).
    pub fn end(&self) -> u64 {
        self.vaddr + self.nr_pages * PAGE_SIZE
    }
    /// Whether the range may be restored lazily.
    pub fn is_lazy(&self) -> bool {
        self.flags & PE_LAZY != 0
    }
}

/// Where the bytes of a [`PageSegment`] are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageData {
    /// In `PageMap::files[file]` at byte `offset`.
    File {
        /// Index into [`PageMap::files`].
        file: usize,
        /// Byte offset of the first page.
        offset: u64,
    },
    /// Not in these images (a `dump --lazy-pages` range served remotely).
    Absent,
}

/// A run of pages with one data location, parents already resolved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageSegment {
    /// Dump-time address of the first page.
    pub vaddr: u64,
    /// Number of pages.
    pub nr_pages: u64,
    /// Flags of the top-level entry.
    pub flags: u32,
    /// Where the data is.
    pub data: PageData,
}

impl PageSegment {
    /// End address (exclusive).
    pub fn end(&self) -> u64 {
        self.vaddr + self.nr_pages * PAGE_SIZE
    }
}

/// The pagemap of one task, with `PE_PARENT` ranges resolved through the parent chain.
#[derive(Debug, Clone, Default)]
pub struct PageMap {
    /// Virtual pid.
    pub pid: u32,
    /// The entries of the top image directory, in file order (sorted, non-overlapping).
    pub entries: Vec<PageRange>,
    /// Data locations, sorted by address; addresses in no segment were not dumped (zero).
    pub segments: Vec<PageSegment>,
    /// Pages files referenced by [`PageData::File`].
    pub files: Vec<PathBuf>,
}

impl PageMap {
    /// Total pages with `PE_LAZY`.
    pub fn lazy_pages(&self) -> u64 {
        self.entries
            .iter()
            .filter(|e| e.is_lazy())
            .map(|e| e.nr_pages)
            .sum()
    }
    /// Total pages with data in the top directory's pages file.
    pub fn present_pages(&self) -> u64 {
        self.entries
            .iter()
            .filter(|e| e.flags & PE_PRESENT != 0)
            .map(|e| e.nr_pages)
            .sum()
    }
}

impl VmaEntry {
    /// CRIU's `vma_entry_can_be_lazy`: private anonymous, not locked or hugetlb, not vdso/vvar/vsyscall.
    pub fn can_be_lazy(&self) -> bool {
        self.flags & MAP_ANONYMOUS != 0
            && self.flags & MAP_PRIVATE != 0
            && self.flags & (MAP_LOCKED | MAP_HUGETLB) == 0
            && self.status & (VMA_AREA_VDSO | VMA_AREA_VVAR | VMA_AREA_VSYSCALL) == 0
    }
}

/// Pids of the task pagemaps (`pagemap-<pid>.img`, shared-memory pagemaps excluded) in `dir`,
/// sorted.
pub fn task_pagemap_pids(dir: &Path) -> io::Result<Vec<u32>> {
    let mut pids = Vec::new();
    for e in std::fs::read_dir(dir)? {
        if let Some(pid) = e?
            .file_name()
            .to_str()
            .and_then(|n| n.strip_prefix("pagemap-"))
            .and_then(|n| n.strip_suffix(".img"))
            .and_then(|n| n.parse::<u32>().ok())
        {
            pids.push(pid);
        }
    }
    pids.sort_unstable();
    Ok(pids)
}

/// An opened CRIU image directory.
#[derive(Debug, Clone)]
pub struct ImageDir {
    dir: PathBuf,
    inventory: InventoryEntry,
}

impl ImageDir {
    /// Opens `dir` and checks its inventory.img.
    pub fn open(dir: &Path) -> Result<ImageDir, ImageError> {
        let path = dir.join("inventory.img");
        let mut r = EntryReader::open(&path, INVENTORY_MAGIC)?;
        let inventory: InventoryEntry = r.require("inventory_entry")?;
        if inventory.img_version != IMG_VERSION || inventory.fdinfo_per_id != Some(true) {
            return Err(ImageError::UnsupportedVersion {
                path,
                version: inventory.img_version,
                fdinfo_per_id: inventory.fdinfo_per_id,
            });
        }
        Ok(ImageDir {
            dir: dir.to_path_buf(),
            inventory,
        })
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// The inventory entry.
    pub fn inventory(&self) -> &InventoryEntry {
        &self.inventory
    }

    /// All process entries of pstree.img (zombies included), in file order.
    pub fn pstree(&self) -> Result<Vec<PstreeEntry>, ImageError> {
        let path = self.dir.join("pstree.img");
        let mut r = EntryReader::open(&path, PSTREE_MAGIC)?;
        let mut out = Vec::new();
        while let Some(e) = r.next::<PstreeEntry>("pstree_entry")? {
            out.push(e);
        }
        if out.is_empty() {
            return Err(ImageError::Empty {
                path,
                what: "pstree_entry",
            });
        }
        Ok(out)
    }

    /// The VMAs of task `pid` from `mm-<pid>.img`, checked to be sorted and non-overlapping.
    pub fn vmas(&self, pid: u32) -> Result<Vec<VmaEntry>, ImageError> {
        let path = self.dir.join(format!("mm-{pid}.img"));
        let mut r = EntryReader::open(&path, MM_MAGIC)?;
        let mm: MmEntry = r.require("mm_entry")?;
        let mut prev_end = 0;
        for v in &mm.vmas {
            if v.start % PAGE_SIZE != 0 || v.end % PAGE_SIZE != 0 || v.end <= v.start {
                return Err(ImageError::Invalid {
                    path,
                    what: "vma bounds",
                    vaddr: v.start,
                });
            }
            if v.start < prev_end {
                return Err(ImageError::Invalid {
                    path,
                    what: "vma order (unsorted or overlapping)",
                    vaddr: v.start,
                });
            }
            prev_end = v.end;
        }
        Ok(mm.vmas)
    }

    /// The entries of `pagemap-<pid>.img` in this directory only, without touching pages files or
    /// parents. Enough to know which ranges are lazy (lazy ranges never live in a parent).
    pub fn pagemap_entries(&self, pid: u32) -> Result<(u32, Vec<PageRange>), ImageError> {
        read_pagemap(&self.dir.join(format!("pagemap-{pid}.img")))
    }

    /// The pagemap of task `pid` with every data location resolved: present ranges point into
    /// this directory's pages file (checked to be large enough), `PE_PARENT` ranges are looked up
    /// through the `parent` chain.
    pub fn pagemap(&self, pid: u32) -> Result<PageMap, ImageError> {
        resolve_pagemap(&self.dir, pid, 0)
    }
}

/// The `pages_id` and entries of one pagemap file (a task's or a shared-memory one), as
/// written: parents not followed, pages files not touched.
pub fn read_pagemap(path: &Path) -> Result<(u32, Vec<PageRange>), ImageError> {
    let mut r = EntryReader::open(path, PAGEMAP_MAGIC)?;
    let head: PagemapHead = r.require("pagemap_head")?;
    let mut entries: Vec<PageRange> = Vec::new();
    while let Some(e) = r.next::<PagemapEntry>("pagemap_entry")? {
        let nr_pages = e.nr_pages.unwrap_or(u64::from(e.compat_nr_pages));
        let mut flags = e.flags.unwrap_or(PE_PRESENT);
        if e.in_parent == Some(true) {
            flags |= PE_PARENT;
        }
        let invalid = |what| ImageError::Invalid {
            path: path.to_path_buf(),
            what,
            vaddr: e.vaddr,
        };
        if nr_pages == 0 {
            return Err(invalid("page count 0"));
        }
        if nr_pages > MAX_ENTRY_PAGES {
            return Err(invalid("page count over MAX_ENTRY_PAGES"));
        }
        if e.vaddr % PAGE_SIZE != 0 {
            return Err(invalid("unaligned address"));
        }
        if e.vaddr.checked_add(nr_pages * PAGE_SIZE).is_none() {
            return Err(invalid("range past the end of the address space"));
        }
        if let Some(prev) = entries.last() {
            if e.vaddr < prev.end() {
                return Err(invalid("entry order (unsorted or overlapping)"));
            }
        }
        entries.push(PageRange {
            vaddr: e.vaddr,
            nr_pages,
            flags,
        });
    }
    Ok((head.pages_id, entries))
}

fn resolve_pagemap(dir: &Path, pid: u32, depth: usize) -> Result<PageMap, ImageError> {
    if depth > MAX_PARENT_DEPTH {
        return Err(ImageError::ParentTooDeep {
            dir: dir.to_path_buf(),
        });
    }
    let path = dir.join(format!("pagemap-{pid}.img"));
    let (pages_id, entries) = read_pagemap(&path)?;
    let pages = dir.join(format!("pages-{pages_id}.img"));
    let mut map = PageMap {
        pid,
        entries,
        segments: Vec::new(),
        files: Vec::new(),
    };
    let needed: u64 = map.present_pages() * PAGE_SIZE;
    if needed > 0 {
        let size = std::fs::metadata(&pages)
            .map_err(|source| ImageError::Io {
                path: pages.clone(),
                source,
            })?
            .len();
        if needed > size {
            return Err(ImageError::PagesPastEnd {
                path,
                pages,
                needed,
                size,
            });
        }
    }
    map.files.push(pages);
    let mut parent: Option<PageMap> = None;
    let mut offset = 0u64;
    for e in &map.entries {
        if e.flags & PE_PRESENT != 0 {
            map.segments.push(PageSegment {
                vaddr: e.vaddr,
                nr_pages: e.nr_pages,
                flags: e.flags,
                data: PageData::File { file: 0, offset },
            });
            offset += e.nr_pages * PAGE_SIZE;
        } else if e.flags & PE_PARENT != 0 {
            if parent.is_none() {
                let link = dir.join("parent");
                if !link.exists() {
                    return Err(ImageError::MissingParent {
                        path: path.clone(),
                        parent: link,
                        vaddr: e.vaddr,
                    });
                }
                parent = Some(resolve_pagemap(&link, pid, depth + 1)?);
            }
            let Some(p) = parent.as_ref() else {
                continue;
            };
            let base = map.files.len();
            // Parent file indexes are shifted by `base` once all parent files are appended below.
            let mut cur = e.vaddr;
            let end = e.end();
            let mut i = p.segments.partition_point(|s| s.end() <= cur);
            while cur < end {
                let covered = p.segments.get(i).filter(|s| s.vaddr <= cur);
                let Some(s) = covered else {
                    let gap_end = p.segments.get(i).map_or(end, |s| s.vaddr.min(end));
                    return Err(ImageError::ParentRangeMissing {
                        path: path.clone(),
                        vaddr: cur,
                        nr_pages: (gap_end - cur) / PAGE_SIZE,
                    });
                };
                let piece_end = s.end().min(end);
                let skip = cur - s.vaddr;
                let data = match s.data {
                    PageData::File { file, offset } => PageData::File {
                        file: file + base,
                        offset: offset + skip,
                    },
                    PageData::Absent => PageData::Absent,
                };
                map.segments.push(PageSegment {
                    vaddr: cur,
                    nr_pages: (piece_end - cur) / PAGE_SIZE,
                    flags: e.flags,
                    data,
                });
                cur = piece_end;
                i += 1;
            }
        } else {
            map.segments.push(PageSegment {
                vaddr: e.vaddr,
                nr_pages: e.nr_pages,
                flags: e.flags,
                data: PageData::Absent,
            });
        }
    }
    if let Some(p) = parent {
        map.files.extend(p.files);
    }
    Ok(map)
}

/// Reads length-prefixed protobuf entries after checking the magics.
struct EntryReader {
    path: PathBuf,
    r: BufReader<File>,
    offset: u64,
    count: usize,
    buf: Vec<u8>,
}

impl EntryReader {
    fn open(path: &Path, type_magic: u32) -> Result<EntryReader, ImageError> {
        let file = File::open(path).map_err(|source| ImageError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let mut r = EntryReader {
            path: path.to_path_buf(),
            r: BufReader::new(file),
            offset: 0,
            count: 0,
            buf: Vec::new(),
        };
        let first = r.magic()?;
        let found = if type_magic == INVENTORY_MAGIC {
            first
        } else if first != IMG_COMMON_MAGIC {
            return Err(ImageError::BadMagic {
                path: r.path,
                found: first,
                expected: IMG_COMMON_MAGIC,
            });
        } else {
            r.magic()?
        };
        if found != type_magic {
            return Err(ImageError::BadMagic {
                path: r.path,
                found,
                expected: type_magic,
            });
        }
        Ok(r)
    }

    fn magic(&mut self) -> Result<u32, ImageError> {
        match self.read_u32()? {
            Some(v) => Ok(v),
            None => Err(ImageError::Truncated {
                path: self.path.clone(),
                offset: self.offset,
            }),
        }
    }

    /// Reads a u32; `None` on EOF exactly at the start.
    fn read_u32(&mut self) -> Result<Option<u32>, ImageError> {
        let mut b = [0u8; 4];
        let mut got = 0;
        while got < 4 {
            match self.r.read(&mut b[got..]) {
                Ok(0) if got == 0 => return Ok(None),
                Ok(0) => {
                    return Err(ImageError::Truncated {
                        path: self.path.clone(),
                        offset: self.offset,
                    })
                }
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(source) => {
                    return Err(ImageError::Io {
                        path: self.path.clone(),
                        source,
                    })
                }
            }
        }
        self.offset += 4;
        Ok(Some(u32::from_le_bytes(b)))
    }

    fn next<M: Message + Default>(&mut self, what: &'static str) -> Result<Option<M>, ImageError> {
        let at = self.offset;
        let Some(len) = self.read_u32()? else {
            return Ok(None);
        };
        if len > MAX_ENTRY_BYTES {
            return Err(ImageError::EntryTooLarge {
                path: self.path.clone(),
                offset: at,
                len,
                limit: MAX_ENTRY_BYTES,
            });
        }
        if self.count >= MAX_ENTRIES {
            return Err(ImageError::TooManyEntries {
                path: self.path.clone(),
                limit: MAX_ENTRIES,
            });
        }
        self.buf.clear();
        let n = (&mut self.r)
            .take(u64::from(len))
            .read_to_end(&mut self.buf)
            .map_err(|source| ImageError::Io {
                path: self.path.clone(),
                source,
            })?;
        if n != self.buf.len() || self.buf.len() as u64 != u64::from(len) {
            return Err(ImageError::Truncated {
                path: self.path.clone(),
                offset: at,
            });
        }
        self.offset += u64::from(len);
        self.count += 1;
        M::decode(self.buf.as_slice())
            .map(Some)
            .map_err(|source| ImageError::Decode {
                path: self.path.clone(),
                what,
                offset: at,
                source,
            })
    }

    fn require<M: Message + Default>(&mut self, what: &'static str) -> Result<M, ImageError> {
        match self.next(what)? {
            Some(m) => Ok(m),
            None => Err(ImageError::Empty {
                path: self.path.clone(),
                what,
            }),
        }
    }
}

/// Encodes images the way CRIU writes them; for tests of this crate and its users.
pub mod testutil {
    use super::*;

    /// Bytes of an image: magics, then each message with its u32 length.
    pub fn image<M: Message>(type_magic: u32, entries: &[&dyn Fn() -> M]) -> Vec<u8> {
        let mut out = Vec::new();
        if type_magic != INVENTORY_MAGIC {
            out.extend_from_slice(&IMG_COMMON_MAGIC.to_le_bytes());
        }
        out.extend_from_slice(&type_magic.to_le_bytes());
        for e in entries {
            let body = e().encode_to_vec();
            let len = u32::try_from(body.len()).unwrap_or(u32::MAX);
            out.extend_from_slice(&len.to_le_bytes());
            out.extend_from_slice(&body);
        }
        out
    }

    /// Appends one length-prefixed message to `out`.
    pub fn push<M: Message>(out: &mut Vec<u8>, m: &M) {
        let body = m.encode_to_vec();
        let len = u32::try_from(body.len()).unwrap_or(u32::MAX);
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(&body);
    }

    /// Magics of an image of `type_magic`.
    pub fn header(type_magic: u32) -> Vec<u8> {
        let mut out = Vec::new();
        if type_magic != INVENTORY_MAGIC {
            out.extend_from_slice(&IMG_COMMON_MAGIC.to_le_bytes());
        }
        out.extend_from_slice(&type_magic.to_le_bytes());
        out
    }

    /// A 4.2-style pagemap entry (count in field 5, field 2 zero).
    pub fn pm(vaddr: u64, nr_pages: u64, flags: u32) -> PagemapEntry {
        PagemapEntry {
            vaddr,
            compat_nr_pages: 0,
            in_parent: None,
            flags: Some(flags),
            nr_pages: Some(nr_pages),
        }
    }

    /// Writes inventory.img into `dir`.
    pub fn write_inventory(dir: &Path) -> io::Result<()> {
        super::write::write_inventory(dir)
    }

    /// Writes `pagemap-<pid>.img` into `dir`.
    pub fn write_pagemap(
        dir: &Path,
        pid: u32,
        pages_id: u32,
        entries: &[PagemapEntry],
    ) -> io::Result<()> {
        let mut b = header(PAGEMAP_MAGIC);
        push(&mut b, &PagemapHead { pages_id });
        for e in entries {
            push(&mut b, e);
        }
        std::fs::write(dir.join(format!("pagemap-{pid}.img")), b)
    }

    /// Writes `mm-<pid>.img` into `dir` with one private anonymous read-write VMA per range.
    pub fn write_mm(dir: &Path, pid: u32, ranges: &[(u64, u64)]) -> io::Result<()> {
        let vmas = ranges
            .iter()
            .map(|&(start, end)| VmaEntry {
                start,
                end,
                pgoff: 0,
                shmid: 0,
                prot: 3,
                flags: MAP_PRIVATE | MAP_ANONYMOUS,
                status: 1 | (1 << 9),
                fd: -1,
                madv: None,
                fdflags: None,
            })
            .collect();
        let mut b = header(MM_MAGIC);
        push(&mut b, &MmEntry { vmas });
        std::fs::write(dir.join(format!("mm-{pid}.img")), b)
    }

    /// Writes `pstree.img` into `dir`: one single-threaded task per pid, each the leader of its
    /// own process group and session, parent 0.
    pub fn write_pstree(dir: &Path, pids: &[u32]) -> io::Result<()> {
        let mut b = header(PSTREE_MAGIC);
        for &pid in pids {
            push(
                &mut b,
                &PstreeEntry {
                    pid,
                    ppid: 0,
                    pgid: pid,
                    sid: pid,
                    threads: vec![pid],
                },
            );
        }
        std::fs::write(dir.join("pstree.img"), b)
    }
}

#[cfg(test)]
mod tests {
    use super::testutil::*;
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        let s: String = s.split_whitespace().collect();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    #[test]
    fn reads_observed_pstree_bytes() {
        let d = tempfile::tempdir().unwrap();
        write_inventory(d.path()).unwrap();
        let bytes = hex("19435654 30302750 12000000 08fe9701 1000 18fe9701 20fe9701 28fe9701");
        std::fs::write(d.path().join("pstree.img"), bytes).unwrap();
        let img = ImageDir::open(d.path()).unwrap();
        let t = img.pstree().unwrap();
        assert_eq!(t.len(), 1);
        // Varint fe 97 01 is 19454.
        assert_eq!((t[0].pid, t[0].ppid, t[0].sid), (19454, 0, 19454));
        assert_eq!(t[0].threads, vec![19454]);
    }

    #[test]
    fn pagemap_field5_preferred_and_field2_fallback() {
        let d = tempfile::tempdir().unwrap();
        // 4.1 style: field 2 only; 4.2 style observed bytes `08 <vaddr> 10 00 20 04 28 01`.
        let mut b = header(PAGEMAP_MAGIC);
        push(&mut b, &PagemapHead { pages_id: 1 });
        push(
            &mut b,
            &PagemapEntry {
                vaddr: 0x1000,
                compat_nr_pages: 2,
                in_parent: None,
                flags: None,
                nr_pages: None,
            },
        );
        let raw = hex("08 80 40 10 00 20 06 28 03"); // vaddr 0x2000... varint 0x80 0x40 = 0x2000
        b.extend_from_slice(&u32::try_from(raw.len()).unwrap().to_le_bytes());
        b.extend_from_slice(&raw);
        std::fs::write(d.path().join("pagemap-7.img"), &b).unwrap();
        std::fs::write(d.path().join("pages-1.img"), vec![0u8; 5 * 4096]).unwrap();
        write_inventory(d.path()).unwrap();
        let img = ImageDir::open(d.path()).unwrap();
        let pm = img.pagemap(7);
        // 0x1000 + 2 pages ends at 0x3000 > 0x2000: overlapping.
        assert!(matches!(pm, Err(ImageError::Invalid { .. })), "{pm:?}");

        let mut b = header(PAGEMAP_MAGIC);
        push(&mut b, &PagemapHead { pages_id: 1 });
        push(
            &mut b,
            &PagemapEntry {
                vaddr: 0x1000,
                compat_nr_pages: 1,
                in_parent: None,
                flags: None,
                nr_pages: None,
            },
        );
        b.extend_from_slice(&u32::try_from(raw.len()).unwrap().to_le_bytes());
        b.extend_from_slice(&raw);
        std::fs::write(d.path().join("pagemap-7.img"), &b).unwrap();
        let pm = img.pagemap(7).unwrap();
        assert_eq!(
            pm.entries,
            vec![
                PageRange {
                    vaddr: 0x1000,
                    nr_pages: 1,
                    flags: PE_PRESENT
                },
                PageRange {
                    vaddr: 0x2000,
                    nr_pages: 3,
                    flags: PE_LAZY | PE_PRESENT
                },
            ]
        );
        assert_eq!(
            pm.segments[1].data,
            PageData::File {
                file: 0,
                offset: 4096
            }
        );
        assert_eq!(pm.lazy_pages(), 3);
    }

    #[test]
    fn wrong_magic_truncation_and_limits() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("inventory.img"), hex("19435654 16313158")).unwrap();
        let e = ImageDir::open(d.path()).unwrap_err();
        assert!(
            matches!(
                e,
                ImageError::BadMagic {
                    found: 0x54564319,
                    ..
                }
            ),
            "{e}"
        );
        assert!(e.to_string().contains("inventory.img"), "{e}");

        write_inventory(d.path()).unwrap();
        let img = ImageDir::open(d.path()).unwrap();
        let mut b = header(PSTREE_MAGIC);
        b.extend_from_slice(&hex("12000000 08 fe"));
        std::fs::write(d.path().join("pstree.img"), &b).unwrap();
        assert!(matches!(
            img.pstree(),
            Err(ImageError::Truncated { offset: 8, .. })
        ));

        let mut b = header(PSTREE_MAGIC);
        b.extend_from_slice(&hex("0100"));
        std::fs::write(d.path().join("pstree.img"), &b).unwrap();
        assert!(matches!(img.pstree(), Err(ImageError::Truncated { .. })));

        let mut b = header(PSTREE_MAGIC);
        b.extend_from_slice(&(MAX_ENTRY_BYTES + 1).to_le_bytes());
        std::fs::write(d.path().join("pstree.img"), &b).unwrap();
        assert!(matches!(
            img.pstree(),
            Err(ImageError::EntryTooLarge { .. })
        ));

        std::fs::write(d.path().join("pstree.img"), header(PSTREE_MAGIC)).unwrap();
        assert!(matches!(img.pstree(), Err(ImageError::Empty { .. })));

        let mut b = header(MM_MAGIC);
        b.extend_from_slice(&hex("03000000 ffffff"));
        std::fs::write(d.path().join("mm-1.img"), &b).unwrap();
        assert!(matches!(img.vmas(1), Err(ImageError::Decode { .. })));
    }

    #[test]
    fn pages_past_end_detected() {
        let d = tempfile::tempdir().unwrap();
        write_inventory(d.path()).unwrap();
        write_pagemap(d.path(), 3, 1, &[pm(0x10000, 4, PE_PRESENT | PE_LAZY)]).unwrap();
        std::fs::write(d.path().join("pages-1.img"), vec![0u8; 3 * 4096]).unwrap();
        let e = ImageDir::open(d.path()).unwrap().pagemap(3).unwrap_err();
        assert!(
            matches!(
                e,
                ImageError::PagesPastEnd {
                    needed: 16384,
                    size: 12288,
                    ..
                }
            ),
            "{e}"
        );
    }

    #[test]
    fn parent_chain_resolves_and_missing_parent_fails() {
        let root = tempfile::tempdir().unwrap();
        let p = root.path().join("p");
        let c = root.path().join("c");
        std::fs::create_dir_all(&p).unwrap();
        std::fs::create_dir_all(&c).unwrap();
        write_inventory(&p).unwrap();
        write_inventory(&c).unwrap();
        // parent: 4 pages at 0x10000 in pages-1.img
        write_pagemap(&p, 5, 1, &[pm(0x10000, 4, PE_PRESENT)]).unwrap();
        std::fs::write(p.join("pages-1.img"), vec![1u8; 4 * 4096]).unwrap();
        // child: page 0 new, pages 1..3 from parent, then a lazy present page
        write_pagemap(
            &c,
            5,
            1,
            &[
                pm(0x10000, 1, PE_PRESENT),
                pm(0x11000, 2, PE_PARENT),
                pm(0x20000, 1, PE_PRESENT | PE_LAZY),
            ],
        )
        .unwrap();
        std::fs::write(c.join("pages-1.img"), vec![2u8; 2 * 4096]).unwrap();
        let img = ImageDir::open(&c).unwrap();
        let e = img.pagemap(5).unwrap_err();
        assert!(
            matches!(e, ImageError::MissingParent { vaddr: 0x11000, .. }),
            "{e}"
        );

        std::os::unix::fs::symlink("../p", c.join("parent")).unwrap();
        let m = img.pagemap(5).unwrap();
        assert_eq!(m.files.len(), 2);
        assert_eq!(m.segments[1].vaddr, 0x11000);
        assert_eq!(
            m.segments[1].data,
            PageData::File {
                file: 1,
                offset: 4096
            }
        );
        assert_eq!(
            m.segments[2].data,
            PageData::File {
                file: 0,
                offset: 4096
            }
        );

        // a parent range the parent does not have
        write_pagemap(&c, 5, 1, &[pm(0x13000, 2, PE_PARENT)]).unwrap();
        let e = img.pagemap(5).unwrap_err();
        assert!(
            matches!(
                e,
                ImageError::ParentRangeMissing {
                    vaddr: 0x14000,
                    nr_pages: 1,
                    ..
                }
            ),
            "{e}"
        );
    }

    #[test]
    fn vma_lazy_rule() {
        let mut v = VmaEntry {
            start: 0x1000,
            end: 0x2000,
            flags: MAP_PRIVATE | MAP_ANONYMOUS,
            status: 1 | (1 << 9),
            fd: -1,
            ..Default::default()
        };
        assert!(v.can_be_lazy());
        v.status |= VMA_AREA_VDSO;
        assert!(!v.can_be_lazy());
        v.status = 1;
        v.flags |= MAP_LOCKED;
        assert!(!v.can_be_lazy());
        v.flags = 0x1 | MAP_ANONYMOUS;
        assert!(!v.can_be_lazy());
    }
}
