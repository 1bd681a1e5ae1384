//! Squashing a layer into its only child: the compaction that keeps chains short.
//!
//! When a deleted layer `P` has exactly one child `C`, nothing but `C` reads `P`'s pages, so
//! `P` can be merged into `C`: every `PE_PARENT` range of `C` that `P` holds data for becomes
//! data in `C`'s own pages file, the ranges `P` itself takes from its parent stay `PE_PARENT`,
//! and `C`'s link moves to `P`'s parent. The chain is one layer shorter, and `P`'s pages that
//! `C` had overwritten are freed with `P`. A run of such layers above `C` (deleted, each read
//! only by the layer below it) is merged in one pass: every page is copied once, from the
//! nearest layer that holds it.
//!
//! The new `C` is built beside the store (`.distriproc/compact/<C>`): the files it keeps are
//! hard links, each rewritten task gets a new pagemap and pages file ([`PagemapWriter`]). It is
//! indexed and must cover exactly the pages the old `C` covers before it replaces the old
//! directory in one `renameat2(RENAME_EXCHANGE)`, under the store's exclusive index lock (no
//! index is being built from either layer at that moment). `C` keeps the digest it was
//! published with (`layers::DIGEST_FILE`). Sessions that already hold `C`'s or `P`'s index go
//! on reading the files they opened.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use distriproc_runtime::images::write::PagemapWriter;
use distriproc_runtime::images::{read_pagemap, PageRange, PAGE_SIZE, PE_PARENT, PE_PRESENT};

use crate::checkpoint::{Checkpoint, Store};
use crate::layers::{layer_digest, parent_of, record_digest, DIGEST_FILE, PARENT_LINK};

/// Where squashed layers are built, under the state directory.
pub const COMPACT_DIR: &str = "compact";
/// Bytes copied per read from the parent's pages file.
const COPY_CHUNK: usize = 1 << 20;

/// What one squash did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Squashed {
    /// Pages moved from the parent into the child.
    pub pages_moved: u64,
    /// The child's new parent (the squashed layer's parent).
    pub new_parent: Option<String>,
}

/// Pid of a task pagemap file name (`pagemap-<pid>.img`).
fn task_pid(name: &str) -> Option<u32> {
    name.strip_prefix("pagemap-")?
        .strip_suffix(".img")?
        .parse()
        .ok()
}

/// A pagemap's ranges with the byte offset of each present one in its pages file.
struct Entries {
    pages_id: u32,
    ranges: Vec<(PageRange, u64)>,
}

fn entries(path: &Path) -> Result<Entries, String> {
    let (pages_id, list) = read_pagemap(path).map_err(|e| distriproc_runtime::error_chain(&e))?;
    let mut offset = 0;
    let mut ranges = Vec::with_capacity(list.len());
    for r in list {
        ranges.push((r, offset));
        if r.flags & PE_PRESENT != 0 {
            offset += r.nr_pages * PAGE_SIZE;
        }
    }
    Ok(Entries { pages_id, ranges })
}

/// Copies `pages` pages at byte `offset` of `from` into `w` as data at `vaddr`.
fn copy_pages(
    w: &mut PagemapWriter,
    from: &File,
    offset: u64,
    vaddr: u64,
    pages: u64,
    flags: u32,
    buf: &mut [u8],
) -> Result<(), String> {
    let mut done = 0;
    while done < pages {
        let n = (pages - done).min(COPY_CHUNK as u64 / PAGE_SIZE);
        let len = usize::try_from(n * PAGE_SIZE).map_err(|e| e.to_string())?;
        from.read_exact_at(&mut buf[..len], offset + done * PAGE_SIZE)
            .map_err(|e| format!("read pages at {:#x}: {e}", offset + done * PAGE_SIZE))?;
        w.data(vaddr + done * PAGE_SIZE, flags, &buf[..len])
            .map_err(|e| format!("write pages: {e}"))?;
        done += n;
    }
    Ok(())
}

/// One squashed layer's view of a task: its entries and pages file.
struct Level {
    entries: Entries,
    pages: Result<File, String>,
}

/// Where a piece of a `PE_PARENT` range of the child ends up.
enum Piece {
    /// Data in `levels[level]`'s pages file at `offset`.
    Data { level: usize, offset: u64 },
    /// Still in the parent of the last squashed layer.
    Parent,
    /// Not in the store at all (a lazy range of that layer's dump), with its flags.
    Absent(u32),
}

/// Resolves `[cur, end)` through `levels[at..]`, calling `emit` in address order.
fn resolve(
    levels: &[Level],
    at: usize,
    mut cur: u64,
    end: u64,
    name: &str,
    emit: &mut dyn FnMut(u64, u64, Piece) -> Result<(), String>,
) -> Result<(), String> {
    let Some(level) = levels.get(at) else {
        return emit(cur, (end - cur) / PAGE_SIZE, Piece::Parent);
    };
    let ranges = &level.entries.ranges;
    let mut i = ranges.partition_point(|(e, _)| e.end() <= cur);
    while cur < end {
        let Some((pe, poff)) = ranges.get(i).filter(|(e, _)| e.vaddr <= cur) else {
            return Err(format!(
                "{name}: squashed layer {at} has no entry for the page at {cur:#x}"
            ));
        };
        let piece_end = pe.end().min(end);
        let pages = (piece_end - cur) / PAGE_SIZE;
        if pe.flags & PE_PRESENT != 0 {
            let offset = poff + (cur - pe.vaddr);
            emit(cur, pages, Piece::Data { level: at, offset })?;
        } else if pe.flags & PE_PARENT != 0 {
            resolve(levels, at + 1, cur, piece_end, name, emit)?;
        } else {
            emit(cur, pages, Piece::Absent(pe.flags))?;
        }
        cur = piece_end;
        i += 1;
    }
    Ok(())
}

/// Writes task `pid`'s pagemap of `child` into `out` with its `PE_PARENT` ranges resolved
/// through `parents` (nearest first). Returns the pages moved.
fn squash_task(child: &Path, parents: &[PathBuf], out: &Path, pid: u32) -> Result<u64, String> {
    let name = format!("pagemap-{pid}.img");
    let open = |dir: &Path, id: u32| {
        let path = dir.join(format!("pages-{id}.img"));
        File::open(&path).map_err(|e| format!("{}: {e}", path.display()))
    };
    let c = entries(&child.join(&name))?;
    let c_pages = open(child, c.pages_id)?;
    let mut levels = Vec::with_capacity(parents.len());
    for dir in parents {
        let entries = entries(&dir.join(&name)).map_err(|e| format!("{}: {e}", dir.display()))?;
        let pages = open(dir, entries.pages_id);
        levels.push(Level { entries, pages });
    }
    let mut w = PagemapWriter::create(out, pid, c.pages_id).map_err(|e| e.to_string())?;
    let mut buf = vec![0u8; COPY_CHUNK];
    let mut moved = 0;
    for (r, off) in &c.ranges {
        if r.flags & PE_PRESENT != 0 {
            copy_pages(
                &mut w, &c_pages, *off, r.vaddr, r.nr_pages, r.flags, &mut buf,
            )?;
            continue;
        }
        if r.flags & PE_PARENT == 0 {
            w.hole(r.vaddr, r.nr_pages, r.flags)
                .map_err(|e| e.to_string())?;
            continue;
        }
        let flags = r.flags;
        resolve(
            &levels,
            0,
            r.vaddr,
            r.end(),
            &name,
            &mut |va, pages, piece| match piece {
                Piece::Data { level, offset } => {
                    let from = levels[level].pages.as_ref().map_err(Clone::clone)?;
                    let data = (flags & !PE_PARENT) | PE_PRESENT;
                    moved += pages;
                    copy_pages(&mut w, from, offset, va, pages, data, &mut buf)
                }
                Piece::Parent => w.hole(va, pages, flags).map_err(|e| e.to_string()),
                Piece::Absent(f) => w.hole(va, pages, f).map_err(|e| e.to_string()),
            },
        )?;
    }
    w.commit().map_err(|e| e.to_string())?;
    Ok(moved)
}

/// The pages of `pid` with data in the store as maximal runs (vaddr, pages, lazy).
fn coverage(ck: &Checkpoint, pid: u32) -> Vec<(u64, u64, bool)> {
    let mut out: Vec<(u64, u64, bool)> = Vec::new();
    for (vaddr, pages, lazy) in ck.data_ranges(pid) {
        match out.last_mut() {
            Some(l) if l.0 + l.1 * PAGE_SIZE == vaddr && l.2 == lazy => l.1 += pages,
            _ => out.push((vaddr, pages, lazy)),
        }
    }
    out
}

/// Builds the squashed child in `out` (which must not exist).
fn build(
    store: &Store,
    parents: &[PathBuf],
    child_dir: &Path,
    out: &Path,
) -> Result<Squashed, String> {
    let Some(last) = parents.last() else {
        return Err("nothing to squash".into());
    };
    std::fs::create_dir(out).map_err(|e| format!("{}: {e}", out.display()))?;
    let mut tasks = Vec::new();
    let mut rewritten_pages = Vec::new();
    let names: Vec<String> = std::fs::read_dir(child_dir)
        .map_err(|e| format!("{}: {e}", child_dir.display()))?
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    for n in &names {
        if let Some(pid) = task_pid(n) {
            let e = entries(&child_dir.join(n))?;
            if e.ranges.iter().any(|(r, _)| r.flags & PE_PARENT != 0) {
                tasks.push(pid);
                rewritten_pages.push(format!("pages-{}.img", e.pages_id));
            }
        } else if n.starts_with("pagemap-") && n.ends_with(".img") {
            let e = entries(&child_dir.join(n))?;
            if e.ranges.iter().any(|(r, _)| r.flags & PE_PARENT != 0) {
                return Err(format!(
                    "{n} has parent ranges (only task pagemaps are squashed)"
                ));
            }
        }
    }
    let mut moved = 0;
    for pid in &tasks {
        moved += squash_task(child_dir, parents, out, *pid)?;
    }
    let written: Vec<String> = tasks.iter().map(|p| format!("pagemap-{p}.img")).collect();
    for n in &names {
        if n == PARENT_LINK
            || n == DIGEST_FILE
            || written.contains(n)
            || rewritten_pages.contains(n)
        {
            continue;
        }
        let from = child_dir.join(n);
        let meta = std::fs::symlink_metadata(&from).map_err(|e| e.to_string())?;
        if !meta.is_file() {
            return Err(format!("{} is not a regular file", from.display()));
        }
        std::fs::hard_link(&from, out.join(n)).map_err(|e| format!("link {n}: {e}"))?;
    }
    // The same memory in other files: the digest stays, recorded for the new files.
    let d = layer_digest(child_dir).map_err(|e| e.to_string())?;
    record_digest(out, &d).map_err(|e| e.to_string())?;
    let new_parent = parent_of(store.root(), last)?;
    if let Some(g) = &new_parent {
        // Absolute while `out` is outside the store, for the check below.
        std::os::unix::fs::symlink(store.root().join(g), out.join(PARENT_LINK))
            .map_err(|e| format!("link the parent: {e}"))?;
    }
    let id = child_dir
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default();
    let (old, new) = {
        let _shared = store.index_lock(false).map_err(|e| e.to_string())?;
        let old =
            Checkpoint::open(id, child_dir).map_err(|e| distriproc_runtime::error_chain(&e))?;
        let new = Checkpoint::open(id, out).map_err(|e| distriproc_runtime::error_chain(&e))?;
        (old, new)
    };
    let same = |p: &u32| {
        coverage(&old, *p) == coverage(&new, *p) && old.task_pages(*p) == new.task_pages(*p)
    };
    if old.pids() != new.pids() || !old.pids().iter().all(same) {
        return Err("the squashed layer does not cover the same pages".into());
    }
    if let Some(g) = &new_parent {
        let tmp = out.join(".parent.tmp");
        std::os::unix::fs::symlink(format!("../{g}"), &tmp)
            .and_then(|()| std::fs::rename(&tmp, out.join(PARENT_LINK)))
            .map_err(|e| format!("link the parent: {e}"))?;
    }
    for f in std::fs::read_dir(out).into_iter().flatten().flatten() {
        if f.file_type().is_ok_and(|t| t.is_file()) {
            File::open(f.path())
                .and_then(|f| f.sync_all())
                .map_err(|e| format!("sync: {e}"))?;
        }
    }
    File::open(out)
        .and_then(|d| d.sync_all())
        .map_err(|e| format!("sync: {e}"))?;
    Ok(Squashed {
        pages_moved: moved,
        new_parent,
    })
}

/// The directory a squash of `child` is built in.
pub fn work_dir(store: &Store, child: &str) -> PathBuf {
    store.state_dir().join(COMPACT_DIR).join(child)
}

/// Merges the layers `parents` (the chain above `child`, nearest first: each the parent of
/// the one before) into `child` in one pass and swaps the result into place; the old files of
/// `child` are moved to `trash` (to be removed by the caller once unlocked). The caller holds
/// the gc lock and has checked that none of `parents` has another child or an upload building
/// on it. The squashed layers themselves are left for the caller to remove.
pub fn squash(
    store: &Store,
    parents: &[String],
    child: &str,
    trash: &Path,
) -> Result<Squashed, String> {
    let child_dir = store.root().join(child);
    let mut below = child_dir.clone();
    for p in parents {
        if parent_of(store.root(), &below)?.as_deref() != Some(p.as_str()) {
            return Err(format!("{} is not a layer over {p}", below.display()));
        }
        below = store.root().join(p);
    }
    let parent_dirs: Vec<PathBuf> = parents.iter().map(|p| store.root().join(p)).collect();
    let out = work_dir(store, child);
    if let Some(d) = out.parent() {
        std::fs::create_dir_all(d).map_err(|e| format!("{}: {e}", d.display()))?;
    }
    let _ = std::fs::remove_dir_all(&out);
    let done = match build(store, &parent_dirs, &child_dir, &out) {
        Ok(s) => s,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&out);
            return Err(e);
        }
    };
    let swapped = {
        let _excl = store.index_lock(true).map_err(|e| e.to_string())?;
        nix::fcntl::renameat2(
            None,
            &out,
            None,
            &child_dir,
            nix::fcntl::RenameFlags::RENAME_EXCHANGE,
        )
    };
    if let Err(e) = swapped {
        let _ = std::fs::remove_dir_all(&out);
        return Err(format!("swap {} into place: {e}", child_dir.display()));
    }
    store.forget(child);
    // `out` now holds the old files of `child`.
    if std::fs::rename(&out, trash).is_err() {
        let _ = std::fs::remove_dir_all(&out);
    }
    if let Some(root) = child_dir.parent() {
        let _ = File::open(root).and_then(|d| d.sync_all());
    }
    Ok(done)
}
