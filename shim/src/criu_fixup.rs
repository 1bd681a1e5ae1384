//! A correction to what CRIU's dump wrote, applied before anything else reads it.
//!
//! CRIU 4.x's `is_stack()` (criu/mem.c) tests `(sp ^ vaddr) & ~PAGE_MASK`: the offset of a
//! thread's stack pointer within its page, not its page. So when some thread's stack pointer
//! is page-aligned at the freeze (about 1 in 256 per thread), every page of that task counts
//! as a stack page and CRIU marks none of them lazy; otherwise no page counts (the real stack
//! page included, which a lazy restore serves like any other). A task hit by that would be
//! restored eagerly, and a remote checkpoint would keep all of its memory in containerd's tar.
//! [`mark_misfired_lazy`] gives such a task the flags CRIU gives every other: `PE_LAZY` on each
//! present page of a VMA that can be lazy (`VmaEntry::can_be_lazy`); the pages files are not
//! touched, so the data stays where it is.

use std::path::Path;

use distriproc_runtime::error_chain;
use distriproc_runtime::images::{
    task_pagemap_pids, write::mark_lazy, ImageDir, PE_LAZY, PE_PRESENT,
};

/// Marks lazy the lazy-able present pages of every task of the dump in `dir` that CRIU left
/// without a single lazy page (see the module documentation); (pid, pages marked) per task
/// corrected.
pub fn mark_misfired_lazy(dir: &Path) -> Result<Vec<(u32, u64)>, String> {
    let img = ImageDir::open(dir).map_err(|e| error_chain(&e))?;
    let mut fixed = Vec::new();
    for pid in task_pagemap_pids(dir).map_err(|e| format!("{}: {e}", dir.display()))? {
        let (pages_id, entries) = img.pagemap_entries(pid).map_err(|e| error_chain(&e))?;
        let lazy = entries.iter().any(|e| e.flags & PE_LAZY != 0);
        let present = entries.iter().any(|e| e.flags & PE_PRESENT != 0);
        if lazy || !present {
            continue;
        }
        let ranges: Vec<(u64, u64)> = img
            .vmas(pid)
            .map_err(|e| error_chain(&e))?
            .iter()
            .filter(|v| v.can_be_lazy())
            .map(|v| (v.start, v.end))
            .collect();
        let n = mark_lazy(dir, pid, pages_id, &entries, &ranges)
            .map_err(|e| format!("{}: pagemap-{pid}.img: {e}", dir.display()))?;
        if n > 0 {
            fixed.push((pid, n));
        }
    }
    Ok(fixed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use distriproc_runtime::images::testutil::{pm, write_inventory, write_mm, write_pagemap};

    #[test]
    fn only_a_task_without_lazy_pages_is_corrected() {
        let d = tempfile::tempdir().unwrap();
        write_inventory(d.path()).unwrap();
        // Task 1 as CRIU writes it normally; task 2 hit by the misfire.
        write_pagemap(d.path(), 1, 1, &[pm(0x10000, 4, PE_PRESENT | PE_LAZY)]).unwrap();
        write_pagemap(d.path(), 2, 2, &[pm(0x10000, 4, PE_PRESENT)]).unwrap();
        write_mm(d.path(), 1, &[(0x10000, 0x14000)]).unwrap();
        write_mm(d.path(), 2, &[(0x10000, 0x14000)]).unwrap();
        std::fs::write(d.path().join("pages-1.img"), [1u8; 4 * 4096]).unwrap();
        std::fs::write(d.path().join("pages-2.img"), [2u8; 4 * 4096]).unwrap();
        assert_eq!(mark_misfired_lazy(d.path()).unwrap(), vec![(2, 4)]);
        let img = ImageDir::open(d.path()).unwrap();
        let (_, e) = img.pagemap_entries(2).unwrap();
        assert_eq!(e.len(), 1);
        assert_eq!(e[0].flags, PE_PRESENT | PE_LAZY);
        assert_eq!(img.pagemap(2).unwrap().present_pages(), 4);
        // Nothing left to correct.
        assert!(mark_misfired_lazy(d.path()).unwrap().is_empty());
    }
}
