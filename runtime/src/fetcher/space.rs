//! The lazy address space of one task as the fetcher tracks it: which ranges are still served
//! from the images (iovs), where they are now (after mremap), and which pages were installed.
//!
//! Pure bookkeeping, no syscalls: unit-tested on its own.

use crate::images::{PageRange, VmaEntry, PAGE_SIZE};

/// A lazy range: current addresses `[start, end)`, dump-time address `img` of `start`, and the
/// bitmap index `bit` of its first page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Iov {
    pub start: u64,
    pub end: u64,
    pub img: u64,
    pub bit: usize,
}

impl Iov {
    fn pages(&self) -> u64 {
        (self.end - self.start) / PAGE_SIZE
    }
}

/// CRIU's `collect_iovs`: PE_LAZY pagemap entries intersected with the VMAs, split at VMA ends.
pub(crate) fn lazy_ranges(entries: &[PageRange], vmas: &[VmaEntry]) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    let mut v = 0;
    for e in entries.iter().filter(|e| e.is_lazy()) {
        let (mut start, end) = (e.vaddr, e.end());
        while v < vmas.len() && vmas[v].end <= start {
            v += 1;
        }
        let mut w = v;
        while start < end && w < vmas.len() && vmas[w].start < end {
            let s = start.max(vmas[w].start);
            let t = end.min(vmas[w].end);
            if s < t {
                out.push((s, t));
            }
            start = t.max(start);
            w += 1;
        }
    }
    out
}

/// One task's lazy ranges and installed-page bitmap.
#[derive(Debug, Clone, Default)]
pub(crate) struct Space {
    /// Sorted by `start`, non-overlapping.
    pub iovs: Vec<Iov>,
    copied: Vec<u64>,
    /// Pages in `iovs` not installed yet.
    pub remaining: u64,
    /// Fill cursor: iov index and page offset in it.
    cursor: (usize, u64),
}

impl Space {
    pub fn new(ranges: &[(u64, u64)]) -> Space {
        let mut iovs = Vec::with_capacity(ranges.len());
        let mut bit = 0usize;
        for &(start, end) in ranges {
            let iov = Iov {
                start,
                end,
                img: start,
                bit,
            };
            bit += usize::try_from(iov.pages()).unwrap_or(0);
            iovs.push(iov);
        }
        Space {
            iovs,
            copied: vec![0; bit.div_ceil(64)],
            remaining: bit as u64,
            cursor: (0, 0),
        }
    }

    /// Index of the iov containing `addr`.
    pub fn lookup(&self, addr: u64) -> Option<usize> {
        let i = self.iovs.partition_point(|v| v.end <= addr);
        (i < self.iovs.len() && self.iovs[i].start <= addr).then_some(i)
    }

    fn bit_of(&self, k: usize, addr: u64) -> usize {
        self.iovs[k].bit + usize::try_from((addr - self.iovs[k].start) / PAGE_SIZE).unwrap_or(0)
    }

    fn test(&self, b: usize) -> bool {
        self.copied[b / 64] & (1 << (b % 64)) != 0
    }

    /// Whether the page at `addr` (inside iov `k`) was installed.
    pub fn is_copied(&self, k: usize, addr: u64) -> bool {
        self.test(self.bit_of(k, addr))
    }

    /// Marks `n` pages from `addr` (inside iov `k`) installed.
    pub fn mark(&mut self, k: usize, addr: u64, n: u64) {
        let b0 = self.bit_of(k, addr);
        for b in b0..b0 + usize::try_from(n).unwrap_or(0) {
            let w = &mut self.copied[b / 64];
            if *w & (1 << (b % 64)) == 0 {
                *w |= 1 << (b % 64);
                self.remaining = self.remaining.saturating_sub(1);
            }
        }
    }

    /// The run of not-installed pages around `addr` within `[lo, hi)` (clipped to iov `k`).
    pub fn uncopied_run(&self, k: usize, addr: u64, lo: u64, hi: u64) -> (u64, u64) {
        let iov = self.iovs[k];
        let (lo, hi) = (lo.max(iov.start), hi.min(iov.end));
        let mut s = addr;
        while s > lo && !self.is_copied(k, s - PAGE_SIZE) {
            s -= PAGE_SIZE;
        }
        let mut e = addr + PAGE_SIZE;
        while e < hi && !self.is_copied(k, e) {
            e += PAGE_SIZE;
        }
        (s, e)
    }

    /// The next run of at most `max` not-installed pages for the background fill:
    /// `(iov index, address, pages)`.
    pub fn next_unfilled(&mut self, max: u64) -> Option<(usize, u64, u64)> {
        if self.remaining == 0 {
            return None;
        }
        let (mut k, mut off) = self.cursor;
        if k >= self.iovs.len() {
            (k, off) = (0, 0);
        }
        let mut wrapped = false;
        loop {
            if k >= self.iovs.len() {
                if wrapped {
                    self.remaining = 0;
                    return None;
                }
                wrapped = true;
                (k, off) = (0, 0);
                continue;
            }
            let iov = self.iovs[k];
            let pages = iov.pages();
            while off < pages && self.test(iov.bit + usize::try_from(off).unwrap_or(0)) {
                off += 1;
            }
            if off < pages {
                let mut n = 1;
                while n < max
                    && off + n < pages
                    && !self.test(iov.bit + usize::try_from(off + n).unwrap_or(0))
                {
                    n += 1;
                }
                self.cursor = (k, off + n);
                return Some((k, iov.start + off * PAGE_SIZE, n));
            }
            k += 1;
            off = 0;
        }
    }

    fn count_uncopied(&self, iov: &Iov) -> u64 {
        (0..iov.pages())
            .filter(|&p| !self.test(iov.bit + usize::try_from(p).unwrap_or(0)))
            .count() as u64
    }

    /// Cuts `[start, end)` out of the iovs; returns the removed pieces (with their bits).
    fn cut(&mut self, start: u64, end: u64) -> Vec<Iov> {
        let mut removed = Vec::new();
        let mut out = Vec::with_capacity(self.iovs.len() + 1);
        for iov in std::mem::take(&mut self.iovs) {
            if iov.end <= start || iov.start >= end {
                out.push(iov);
                continue;
            }
            if iov.start < start {
                out.push(Iov { end: start, ..iov });
            }
            let s = iov.start.max(start);
            let e = iov.end.min(end);
            let skip = (s - iov.start) / PAGE_SIZE;
            removed.push(Iov {
                start: s,
                end: e,
                img: iov.img + (s - iov.start),
                bit: iov.bit + usize::try_from(skip).unwrap_or(0),
            });
            if iov.end > end {
                let skip = (end - iov.start) / PAGE_SIZE;
                out.push(Iov {
                    start: end,
                    end: iov.end,
                    img: iov.img + (end - iov.start),
                    bit: iov.bit + usize::try_from(skip).unwrap_or(0),
                });
            }
        }
        self.iovs = out;
        self.cursor = (0, 0);
        removed
    }

    /// UNMAP / REMOVE: the range is no longer served from the images.
    pub fn drop_range(&mut self, start: u64, end: u64) {
        for iov in self.cut(start, end) {
            let n = self.count_uncopied(&iov);
            self.remaining = self.remaining.saturating_sub(n);
        }
    }

    /// REMAP: `[from, from+len)` now lives at `to`; dump-time addresses stay.
    pub fn remap(&mut self, from: u64, to: u64, len: u64) {
        let moved = self.cut(from, from + len);
        for iov in moved {
            let shifted = Iov {
                start: iov.start - from + to,
                end: iov.end - from + to,
                ..iov
            };
            self.iovs.push(shifted);
        }
        self.iovs.sort_unstable_by_key(|v| v.start);
    }

    /// All not-installed runs, for poisoning on abnormal exit: `(address, pages)`.
    pub fn uncopied_runs(&self) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        for iov in &self.iovs {
            let mut p = 0;
            while p < iov.pages() {
                if self.test(iov.bit + usize::try_from(p).unwrap_or(0)) {
                    p += 1;
                    continue;
                }
                let s = p;
                while p < iov.pages() && !self.test(iov.bit + usize::try_from(p).unwrap_or(0)) {
                    p += 1;
                }
                out.push((iov.start + s * PAGE_SIZE, p - s));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::images::{PE_LAZY, PE_PRESENT};

    const P: u64 = PAGE_SIZE;

    fn vma(start: u64, end: u64) -> VmaEntry {
        VmaEntry {
            start,
            end,
            flags: 0x22,
            fd: -1,
            ..Default::default()
        }
    }

    #[test]
    fn lazy_ranges_split_at_vma_ends() {
        let entries = [
            PageRange {
                vaddr: 0,
                nr_pages: 2,
                flags: PE_PRESENT,
            },
            PageRange {
                vaddr: 10 * P,
                nr_pages: 10,
                flags: PE_LAZY | PE_PRESENT,
            },
            PageRange {
                vaddr: 30 * P,
                nr_pages: 2,
                flags: PE_LAZY,
            },
        ];
        let vmas = [
            vma(0, 2 * P),
            vma(8 * P, 14 * P),
            vma(14 * P, 16 * P),
            vma(17 * P, 40 * P),
        ];
        assert_eq!(
            lazy_ranges(&entries, &vmas),
            vec![
                (10 * P, 14 * P),
                (14 * P, 16 * P),
                (17 * P, 20 * P),
                (30 * P, 32 * P)
            ]
        );
    }

    #[test]
    fn fill_cursor_marks_and_remaining() {
        let mut s = Space::new(&[(0, 4 * P), (10 * P, 12 * P)]);
        assert_eq!(s.remaining, 6);
        s.mark(0, P, 1);
        assert_eq!(s.remaining, 5);
        assert_eq!(s.next_unfilled(8), Some((0, 0, 1)));
        assert_eq!(s.next_unfilled(8), Some((0, 2 * P, 2)));
        s.mark(0, 0, 1);
        s.mark(0, 2 * P, 2);
        assert_eq!(s.next_unfilled(1), Some((1, 10 * P, 1)));
        s.mark(1, 10 * P, 2);
        assert_eq!(s.remaining, 0);
        assert_eq!(s.next_unfilled(8), None);
        assert_eq!(s.uncopied_run(0, 0, 0, 4 * P), (0, P));
    }

    #[test]
    fn fault_around_run_skips_copied() {
        let mut s = Space::new(&[(0, 16 * P)]);
        s.mark(0, 2 * P, 1);
        s.mark(0, 9 * P, 1);
        assert_eq!(s.uncopied_run(0, 5 * P, 0, 16 * P), (3 * P, 9 * P));
        assert_eq!(s.uncopied_run(0, 5 * P, 4 * P, 8 * P), (4 * P, 8 * P));
    }

    #[test]
    fn unmap_remove_and_remap() {
        let mut s = Space::new(&[(0, 8 * P)]);
        s.mark(0, 0, 1);
        s.drop_range(2 * P, 4 * P);
        assert_eq!(s.iovs.len(), 2);
        assert_eq!(s.remaining, 5);
        assert_eq!(s.lookup(3 * P), None);
        let k = s.lookup(5 * P).unwrap();
        assert_eq!(s.iovs[k].img, 4 * P);
        // move pages 4..6 to 100..102; dump-time addresses stay.
        s.remap(4 * P, 100 * P, 2 * P);
        assert_eq!(s.lookup(4 * P), None);
        let k = s.lookup(101 * P).unwrap();
        assert_eq!(s.iovs[k].img + (101 * P - s.iovs[k].start), 5 * P);
        s.mark(k, 101 * P, 1);
        assert_eq!(s.remaining, 4);
        assert_eq!(s.uncopied_runs(), vec![(P, 1), (6 * P, 2), (100 * P, 1)]);
        let c = s.clone();
        assert_eq!(c.remaining, 4);
    }
}
