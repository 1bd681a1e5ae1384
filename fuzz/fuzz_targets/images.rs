//! The CRIU image reader (`images::ImageDir`) on a directory built from the input.
//!
//! Input layout: byte 0 = flags (bit 0: a `parent` symlink pointing at the directory itself,
//! so the parent chain recurses up to its depth limit; bit 1: a `parent` symlink to a missing
//! directory). Then records `[file: u8][len: u16 LE][bytes]`, file being
//! 0 inventory.img, 1 pstree.img, 2 mm-1.img, 3 pagemap-1.img, 4 pages-1.img (the record's
//! first 4 bytes are its size as u32 LE: a sparse file, the contents are never parsed),
//! 5 pagemap-2.img, 6 mm-2.img. The reader then runs as the page server and the fetcher run it:
//! open, pstree, and vmas / pagemap_entries / pagemap for pids 1, 2 and those of pstree (the
//! first two pstree tasks are given the files of pids 1 and 2).
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use distriproc_runtime::images::ImageDir;
use libfuzzer_sys::fuzz_target;

const FILES: [&str; 7] = [
    "inventory.img",
    "pstree.img",
    "mm-1.img",
    "pagemap-1.img",
    "pages-1.img",
    "pagemap-2.img",
    "mm-2.img",
];

fn dir() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let base = if std::path::Path::new("/dev/shm").is_dir() {
            PathBuf::from("/dev/shm")
        } else {
            std::env::temp_dir()
        };
        let d = base.join(format!("distriproc-fuzz-images-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).expect("create fuzz dir");
        d
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&flags, mut rest)) = data.split_first() else {
        return;
    };
    let d = dir();
    if let Ok(entries) = std::fs::read_dir(d) {
        for e in entries.flatten() {
            let _ = std::fs::remove_file(e.path());
        }
    }
    while rest.len() >= 3 {
        let which = usize::from(rest[0]) % FILES.len();
        let len = usize::from(u16::from_le_bytes([rest[1], rest[2]])).min(rest.len() - 3);
        let bytes = &rest[3..3 + len];
        rest = &rest[3 + len..];
        let path = d.join(FILES[which]);
        if which == 4 {
            let mut s = [0u8; 4];
            let n = bytes.len().min(4);
            s[..n].copy_from_slice(&bytes[..n]);
            let size = u64::from(u32::from_le_bytes(s));
            let f = std::fs::File::create(&path).expect("create pages file");
            f.set_len(size).expect("size pages file");
        } else {
            std::fs::write(&path, bytes).expect("write image file");
        }
    }
    if flags & 1 != 0 {
        let _ = std::os::unix::fs::symlink(".", d.join("parent"));
    } else if flags & 2 != 0 {
        let _ = std::os::unix::fs::symlink("missing-parent", d.join("parent"));
    }
    let Ok(img) = ImageDir::open(d) else {
        return;
    };
    let mut pids = vec![1u32, 2];
    if let Ok(tree) = img.pstree() {
        // The first two tasks of pstree get the mm/pagemap records of pids 1 and 2 (real dumps
        // name their files after real pids).
        for (i, p) in tree.iter().take(2).enumerate() {
            if p.pid > 2 {
                for kind in ["mm", "pagemap"] {
                    let from = d.join(format!("{kind}-{}.img", i + 1));
                    let _ = std::fs::hard_link(from, d.join(format!("{kind}-{}.img", p.pid)));
                }
            }
        }
        pids.extend(tree.iter().take(4).map(|p| p.pid));
    }
    pids.sort_unstable();
    pids.dedup();
    for pid in pids {
        if let Ok(vmas) = img.vmas(pid) {
            for w in vmas.windows(2) {
                assert!(w[0].end <= w[1].start);
            }
            for v in &vmas {
                let _ = v.can_be_lazy();
            }
        }
        let _ = img.pagemap_entries(pid);
        if let Ok(map) = img.pagemap(pid) {
            let _ = (map.lazy_pages(), map.present_pages());
            for s in &map.segments {
                assert!(s.nr_pages > 0);
                if let distriproc_runtime::images::PageData::File { file, .. } = s.data {
                    assert!(file < map.files.len());
                }
            }
        }
    }
});
