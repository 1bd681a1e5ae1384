//! The image reader against a real `criu dump` of a process this test starts.

mod common;

use common::*;
use distriproc_runtime::images::{ImageDir, PageData, PAGE_SIZE, PE_LAZY, PE_PRESENT};
use distriproc_runtime::source::{LocalImages, PageKind, PageSource};

/// lazyhog's page pattern (see tests/fixtures/lazyhog.c).
fn word(seed: u64, page: u64, w: u64) -> u64 {
    let mut x = (seed << 48)
        ^ page.wrapping_mul(0x9E37_79B9_7F4A_7C15)
        ^ w.wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x ^= x >> 31;
    x | 1
}

#[test]
fn reads_a_real_dump() -> anyhow::Result<()> {
    if !ready() {
        return Ok(());
    }
    let dir = scratch("criu-images");
    let img = dir.join("img");
    std::fs::create_dir_all(&img)?;
    let mib = 8u32;
    let mut w = Workload::start(&dir, 17001, mib, 1, 0, false)?;
    let pid = w.pid;
    dump(&mut w, &img)?;

    let d = ImageDir::open(&img)?;
    let tree = d.pstree()?;
    assert_eq!(tree.len(), 1);
    assert_eq!(i32::try_from(tree[0].pid)?, pid);
    let vpid = tree[0].pid;

    // The region is the one anonymous private VMA of exactly `mib` MiB.
    let vmas = d.vmas(vpid)?;
    let len = u64::from(mib) << 20;
    let region: Vec<_> = vmas
        .iter()
        .filter(|v| v.end - v.start == len && v.can_be_lazy())
        .collect();
    assert_eq!(region.len(), 1, "{vmas:#?}");
    let base = region[0].start;

    let pm = d.pagemap(vpid)?;
    let size = std::fs::metadata(&pm.files[0])?.len();
    assert_eq!(
        pm.present_pages() * PAGE_SIZE,
        size,
        "present pages vs pages-N.img size"
    );
    assert!(pm.entries.iter().any(|e| e.flags == PE_LAZY | PE_PRESENT));
    assert!(pm
        .segments
        .iter()
        .all(|s| matches!(s.data, PageData::File { .. })));

    // Read the whole region back and compare with the generator; every 10th page was never
    // touched and must come back as a hole (zero).
    let src = LocalImages::open(&img)?;
    let mut buf = vec![0u8; 64 * 4096];
    let pages = len / PAGE_SIZE;
    let mut p = 0u64;
    let mut zero = 0;
    while p < pages {
        let want = usize::try_from((pages - p).min(64))?;
        let r = src.read_pages(vpid, base + p * PAGE_SIZE, &mut buf[..want * 4096])?;
        for i in 0..r.pages {
            let page = p + i as u64;
            if r.kind == PageKind::Zero {
                assert_eq!(page % 10, 9, "page {page} reported zero");
                zero += 1;
                continue;
            }
            let bytes = &buf[i * 4096..(i + 1) * 4096];
            for wi in 0..512u64 {
                let off = usize::try_from(wi)? * 8;
                let v = u64::from_le_bytes(bytes[off..off + 8].try_into()?);
                let want = if page % 10 == 9 { 0 } else { word(1, page, wi) };
                assert_eq!(v, want, "page {page} word {wi}");
            }
        }
        p += r.pages as u64;
    }
    assert!(zero > 0 && zero <= pages / 10);
    Ok(())
}
