//! Corrupt, truncated and mismatched CRIU images, made from a real `criu dump` of the lazyhog
//! workload (and a child checkpoint of it with pages in its parent, see `make_dumps`), then
//! damaged copies. Each must give a clear error naming the file when the images are
//! opened — by the local page source the fetcher uses (`LocalImages`), by the image reader and
//! by the page server — and never serve wrong memory.
//!
//! Needs root and criu (see `common::ready`; skipped with a reason elsewhere, a failure in CI).

mod common;

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, ensure, Context, Result};
use common::*;
use distriproc_pageserver::checkpoint::Checkpoint;
use distriproc_runtime::error_chain;
use distriproc_runtime::images::testutil::{pm, write_pagemap};
use distriproc_runtime::images::{ImageDir, ImageError, PageData, PE_PARENT, PE_PRESENT};
use distriproc_runtime::source::{LocalImages, PageKind, PageSource, SourceError};

/// A real dump `pre/` of a 4 MiB lazyhog, and `dump/`: the same images as a child checkpoint
/// whose every other present pagemap entry is marked in-parent (its pages only in `pre/`), with
/// the `parent` link `../pre` CRIU writes. (This kernel has no soft-dirty tracking, so
/// `criu pre-dump --track-mem` cannot make the chain; the layout is CRIU's.)
struct Dumps {
    _root: tempfile::TempDir,
    pre: PathBuf,
    dump: PathBuf,
    pid: u32,
}

fn make_dumps() -> Result<Dumps> {
    let root = tempfile::tempdir()?;
    let pre = root.path().join("pre");
    let dump = root.path().join("dump");
    std::fs::create_dir_all(&pre)?;
    let port = 20_000 + u16::try_from(std::process::id() % 20_000)?;
    let mut w = Workload::start(root.path(), port, 4, 1, 1, false)?;
    let pid = u32::try_from(w.pid)?;
    common::dump(&mut w, &pre)?;
    let st = Command::new("cp").arg("-a").arg(&pre).arg(&dump).status()?;
    ensure!(st.success(), "cp -a {}", pre.display());
    let (pages_id, entries) = ImageDir::open(&pre)?.pagemap_entries(pid)?;
    let src = std::fs::File::open(pre.join(format!("pages-{pages_id}.img")))?;
    let (mut off, mut k) = (0u64, 0usize);
    let (mut data, mut out) = (Vec::new(), Vec::new());
    for e in entries {
        if e.flags & PE_PRESENT == 0 {
            out.push(pm(e.vaddr, e.nr_pages, e.flags));
            continue;
        }
        let len = e.nr_pages * 4096;
        if k % 2 == 1 {
            out.push(pm(e.vaddr, e.nr_pages, (e.flags & !PE_PRESENT) | PE_PARENT));
        } else {
            let mut b = vec![0u8; usize::try_from(len)?];
            src.read_exact_at(&mut b, off)?;
            data.extend_from_slice(&b);
            out.push(pm(e.vaddr, e.nr_pages, e.flags));
        }
        off += len;
        k += 1;
    }
    ensure!(k >= 2, "only {k} present entries in the dump");
    write_pagemap(&dump, pid, pages_id, &out)?;
    std::fs::write(dump.join(format!("pages-{pages_id}.img")), data)?;
    std::os::unix::fs::symlink("../pre", dump.join("parent"))?;
    Ok(Dumps {
        _root: root,
        pre,
        dump,
        pid,
    })
}

/// Copies the dumps into `to/pre` and `to/dump` (the parent link is relative, so it follows).
fn copy(d: &Dumps, to: &Path) -> Result<PathBuf> {
    for (src, name) in [(&d.pre, "pre"), (&d.dump, "dump")] {
        let st = Command::new("cp")
            .arg("-a")
            .arg(src)
            .arg(to.join(name))
            .status()?;
        ensure!(st.success(), "cp -a {}", src.display());
    }
    Ok(to.join("dump"))
}

/// Opens `dir` the three ways and returns the three error texts; each must fail.
fn open_errors(dir: &Path) -> Result<[String; 3]> {
    let local = match LocalImages::open(dir) {
        Ok(_) => bail!("LocalImages::open({}) succeeded", dir.display()),
        Err(e) => error_chain(&e),
    };
    let reader = match ImageDir::open(dir).and_then(|i| {
        for t in i.pstree()? {
            if dir.join(format!("pagemap-{}.img", t.pid)).exists() {
                i.vmas(t.pid)?;
                i.pagemap(t.pid)?;
            }
        }
        Ok(())
    }) {
        Ok(()) => bail!("image reader accepted {}", dir.display()),
        Err(e) => error_chain(&e),
    };
    let server = match Checkpoint::open("bad", dir) {
        Ok(_) => bail!("page server accepted {}", dir.display()),
        Err(e) => error_chain(&e),
    };
    Ok([local, reader, server])
}

fn expect_all(errs: &[String; 3], needles: &[&str]) -> Result<()> {
    for (who, e) in ["local source", "image reader", "page server"]
        .iter()
        .zip(errs)
    {
        for n in needles {
            ensure!(e.contains(n), "{who}: {n:?} not in {e:?}");
        }
    }
    Ok(())
}

/// Reads every present page of the intact dump through `LocalImages` and compares it with
/// the pages files directly (parent pages from the pre-dump): the baseline the corrupt copies
/// are measured against.
fn intact_reads_match(dir: &Path, pid: u32) -> Result<u64> {
    let src = LocalImages::open(dir)?;
    let map = ImageDir::open(dir)?.pagemap(pid)?;
    let mut buf = vec![0u8; 4096];
    let mut want = vec![0u8; 4096];
    let mut n = 0;
    for s in &map.segments {
        let PageData::File { file, offset } = s.data else {
            continue;
        };
        let f = std::fs::File::open(&map.files[file])?;
        for i in 0..s.nr_pages.min(64) {
            let r = src.read_pages(pid, s.vaddr + i * 4096, &mut buf)?;
            f.read_exact_at(&mut want, offset + i * 4096)?;
            ensure!(r.kind == PageKind::Data, "{:#x}: {r:?}", s.vaddr + i * 4096);
            ensure!(buf == want, "page {:#x} differs", s.vaddr + i * 4096);
            n += 1;
        }
    }
    ensure!(n > 0, "no data pages in {}", dir.display());
    Ok(n)
}

#[test]
fn bad_images_give_clear_errors_naming_the_file() -> Result<()> {
    if !ready() {
        return Ok(());
    }
    let d = make_dumps()?;
    let pid = d.pid;
    let pagemap = format!("pagemap-{pid}.img");
    let n = intact_reads_match(&d.dump, pid)?;
    eprintln!("intact dump: {n} pages read back correctly");
    // The dump really has pages in its parent.
    let map = ImageDir::open(&d.dump)?.pagemap(pid)?;
    ensure!(
        map.files.len() > 1
            && map
                .files
                .iter()
                .any(|f| f.starts_with(d.dump.join("parent"))),
        "no parent pages: {:?}",
        map.files
    );
    let work = tempfile::tempdir()?;
    let case = |name: &str| -> Result<PathBuf> {
        let c = work.path().join(name);
        std::fs::create_dir_all(&c)?;
        copy(&d, &c)
    };
    let pages_of = |dir: &Path| -> Result<PathBuf> {
        let (id, _) = ImageDir::open(dir)?.pagemap_entries(pid)?;
        Ok(dir.join(format!("pages-{id}.img")))
    };

    // 1. The pagemap points past the end of pages-N.img (the pages file lost its last page).
    let dir = case("short-pages")?;
    let pages = pages_of(&dir)?;
    let len = std::fs::metadata(&pages)?.len();
    ensure!(len >= 4096, "{} has no page to cut", pages.display());
    std::fs::OpenOptions::new()
        .write(true)
        .open(&pages)?
        .set_len(len - 4096)?;
    let errs = open_errors(&dir)?;
    expect_all(&errs, &[&pagemap, "pages-", "which has"])?;

    // 2. Wrong magic: of the pagemap, then of the inventory.
    let dir = case("magic-pagemap")?;
    std::fs::OpenOptions::new()
        .write(true)
        .open(dir.join(&pagemap))?
        .write_all_at(b"XXXX", 4)?;
    expect_all(&open_errors(&dir)?, &[&pagemap, "wrong magic"])?;
    let dir = case("magic-inventory")?;
    std::fs::OpenOptions::new()
        .write(true)
        .open(dir.join("inventory.img"))?
        .write_all_at(&[0xde, 0xad, 0xbe, 0xef], 0)?;
    expect_all(&open_errors(&dir)?, &["inventory.img", "wrong magic"])?;

    // 3. A missing parent: the pre-dump is gone, the dump still refers to it.
    let dir = case("missing-parent")?;
    std::fs::remove_dir_all(dir.parent().unwrap().join("pre"))?;
    expect_all(&open_errors(&dir)?, &[&pagemap, "parent", "does not exist"])?;

    // 4. Truncated entries: the pagemap cut inside its last entry; pstree.img cut short.
    let dir = case("truncated-pagemap")?;
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(dir.join(&pagemap))?;
    let len = f.metadata()?.len();
    f.set_len(len - 3)?;
    expect_all(&open_errors(&dir)?, &[&pagemap, "truncated entry"])?;
    let dir = case("truncated-pstree")?;
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(dir.join("pstree.img"))?;
    let len = f.metadata()?.len();
    f.set_len(len - 2)?;
    expect_all(&open_errors(&dir)?, &["pstree.img", "truncated entry"])?;

    // 5. A pagemap whose pid is not in pstree (files of another dump dropped in, or renamed):
    // the page server refuses the checkpoint naming the file; the local source never serves
    // that memory as a task's (the pstree task has no pagemap: its reads fail, no wrong data).
    let dir = case("pid-not-in-pstree")?;
    let stray = format!("pagemap-{}.img", pid + 100_000);
    std::fs::rename(dir.join(&pagemap), dir.join(&stray))?;
    let e = error_chain(&Checkpoint::open("bad", &dir).map(|_| ()).unwrap_err());
    ensure!(
        e.contains(&stray) && e.contains("not in pstree.img"),
        "page server: {e}"
    );
    let src = LocalImages::open(&dir).context("local source")?;
    let mut buf = vec![0u8; 4096];
    for s in map.segments.iter().take(8) {
        for p in [pid, pid + 100_000] {
            match src.read_pages(p, s.vaddr, &mut buf) {
                Err(SourceError::UnknownPid { .. }) => {}
                other => bail!("pid {p} at {:#x}: {other:?}", s.vaddr),
            }
        }
    }

    // 6. Garbage in an entry (a length prefix that claims 1 GiB): refused before allocating.
    let dir = case("huge-entry")?;
    std::fs::OpenOptions::new()
        .write(true)
        .open(dir.join(&pagemap))?
        .write_all_at(&(1u32 << 30).to_le_bytes(), 8)?;
    expect_all(&open_errors(&dir)?, &[&pagemap, "limit is"])?;

    // The image reader's errors are typed too, e.g. the short pages file.
    let dir = work.path().join("short-pages/dump");
    match ImageDir::open(&dir)?.pagemap(pid) {
        Err(ImageError::PagesPastEnd { path, .. }) => ensure!(path.ends_with(&pagemap)),
        other => bail!("{other:?}"),
    }
    Ok(())
}
