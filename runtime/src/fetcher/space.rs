//! The lazy address space of one task as the fetcher tracks it: which ranges are still served
//! from the images (iovs), where they are now (after mremap), and which pages were claimed.
//!
//! Every lazy page of a task gets one bit at creation, in dump-time order (`orig`). A bit never
//! moves: mremap changes the current address of an iov, not its bits or dump-time address. The
//! bitmap ([`Bits`]) is atomic and shared by the fault thread and the fill workers: a set bit
//! means "claimed" (installed, being installed, or no longer lazy), so fill, prefetch and faults
//! never fetch the same page twice; a demand fault still installs its own page even when the
//! bit is set (another thread may be mid-copy; `EEXIST` is harmless).
//!
//! Pure bookkeeping, no syscalls: unit-tested on its own.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

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
    pub fn pages(&self) -> u64 {
        (self.end - self.start) / PAGE_SIZE
    }

    fn bit_end(&self) -> usize {
        self.bit + usize::try_from(self.pages()).unwrap_or(0)
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

/// An atomic bitmap: one bit per lazy page, set = claimed.
#[derive(Debug, Default)]
pub(crate) struct Bits {
    words: Box<[AtomicU64]>,
    len: usize,
}

impl Bits {
    pub fn new(len: usize) -> Bits {
        Bits {
            words: (0..len.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
            len,
        }
    }

    /// A copy of the current state (for a forked child).
    pub fn snapshot(&self) -> Bits {
        Bits {
            words: self
                .words
                .iter()
                .map(|w| AtomicU64::new(w.load(Ordering::Acquire)))
                .collect(),
            len: self.len,
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    /// Word `i` of the bitmap (bits `64 i ..`); 0 past its end (a bitmap of length 0 is
    /// all clear).
    pub fn word(&self, i: usize) -> u64 {
        self.words.get(i).map_or(0, |w| w.load(Ordering::Acquire))
    }

    /// Number of clear bits.
    pub fn count_clear(&self) -> u64 {
        let set: u64 = self
            .words
            .iter()
            .map(|w| u64::from(w.load(Ordering::Acquire).count_ones()))
            .sum();
        self.len as u64 - set
    }

    pub fn test(&self, b: usize) -> bool {
        self.words[b / 64].load(Ordering::Acquire) & (1 << (b % 64)) != 0
    }

    /// Sets bit `b`; true if it was clear (this caller claimed it).
    pub fn claim(&self, b: usize) -> bool {
        let m = 1u64 << (b % 64);
        self.words[b / 64].fetch_or(m, Ordering::AcqRel) & m == 0
    }

    /// Claims consecutive clear bits from `b0`, at most `max` and below `end`; stops at the first
    /// bit that is already set. Returns how many were claimed (0 if `b0` was set).
    pub fn claim_run(&self, b0: usize, max: usize, end: usize) -> usize {
        let mut n = 0;
        while n < max && b0 + n < end && self.claim(b0 + n) {
            n += 1;
        }
        n
    }

    /// Clears bit `b`; true if it was set.
    pub fn release(&self, b: usize) -> bool {
        let m = 1u64 << (b % 64);
        self.words[b / 64].fetch_and(!m, Ordering::AcqRel) & m != 0
    }

    /// Clears `n` bits from `b0`; returns how many were set.
    pub fn release_run(&self, b0: usize, n: usize) -> u64 {
        let mut cleared = 0;
        for b in b0..b0 + n {
            let m = 1u64 << (b % 64);
            if self.words[b / 64].fetch_and(!m, Ordering::AcqRel) & m != 0 {
                cleared += 1;
            }
        }
        cleared
    }

    /// The first clear bit in `[from, end)`.
    pub fn next_clear(&self, from: usize, end: usize) -> Option<usize> {
        let end = end.min(self.len);
        let mut b = from;
        while b < end {
            let w = self.words[b / 64].load(Ordering::Acquire) | ((1u64 << (b % 64)) - 1);
            if w == u64::MAX {
                b = (b / 64 + 1) * 64;
                continue;
            }
            let found = (b / 64) * 64 + w.trailing_ones() as usize;
            return (found < end).then_some(found);
        }
        None
    }
}

/// What [`Space::drop_range`] dropped.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Dropped {
    /// Bits that were still unclaimed.
    pub unclaimed: u64,
    /// The dropped bits, as `(first, count)` runs.
    pub runs: Vec<(usize, usize)>,
}

/// One task's current lazy ranges, plus the dump-time layout of its bits.
#[derive(Debug, Clone, Default)]
pub(crate) struct Space {
    /// Sorted by `start`, non-overlapping.
    pub iovs: Vec<Iov>,
    /// The iovs as created (dump-time layout), sorted by `bit` and by `img`. Never changes.
    orig: Arc<[Iov]>,
    /// Whether `iovs` are also sorted by `bit` (true until an mremap reorders them): then
    /// [`Space::pieces`] binary-searches instead of scanning every iov.
    bit_ordered: bool,
}

impl Space {
    /// The space and its number of pages (bits).
    pub fn new(ranges: &[(u64, u64)]) -> (Space, usize) {
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
        let orig: Arc<[Iov]> = iovs.clone().into();
        (
            Space {
                iovs,
                orig,
                bit_ordered: true,
            },
            bit,
        )
    }

    /// Index of the iov containing `addr`.
    pub fn lookup(&self, addr: u64) -> Option<usize> {
        let i = self.iovs.partition_point(|v| v.end <= addr);
        (i < self.iovs.len() && self.iovs[i].start <= addr).then_some(i)
    }

    pub fn bit_of(&self, k: usize, addr: u64) -> usize {
        self.iovs[k].bit + usize::try_from((addr - self.iovs[k].start) / PAGE_SIZE).unwrap_or(0)
    }

    /// Dump-time address of bit `b`.
    pub fn img_of(&self, b: usize) -> u64 {
        let i = self.orig.partition_point(|v| v.bit_end() <= b);
        let o = self.orig[i.min(self.orig.len().saturating_sub(1))];
        o.img + (b - o.bit) as u64 * PAGE_SIZE
    }

    /// The end (exclusive) of the dump-time iov holding bit `b`: runs never cross it, so their
    /// dump-time addresses stay contiguous.
    pub fn orig_end(&self, b: usize) -> usize {
        let i = self.orig.partition_point(|v| v.bit_end() <= b);
        self.orig.get(i).map_or(b, Iov::bit_end)
    }

    /// Bit of the dump-time address `img`, if it is lazy.
    pub fn bit_of_img(&self, img: u64) -> Option<usize> {
        let i = self
            .orig
            .partition_point(|v| v.img + v.pages() * PAGE_SIZE <= img);
        let o = self.orig.get(i)?;
        (o.img <= img).then(|| o.bit + usize::try_from((img - o.img) / PAGE_SIZE).unwrap_or(0))
    }

    /// Where bits `[b0, b0 + n)` are now: `(address, first bit, pages)` pieces in bit order.
    /// Bits of dropped ranges have no piece.
    pub fn pieces(&self, b0: usize, n: usize, out: &mut Vec<(u64, usize, usize)>) {
        out.clear();
        let b1 = b0 + n;
        if self.bit_ordered {
            let first = self.iovs.partition_point(|v| v.bit_end() <= b0);
            for iov in self.iovs[first..].iter().take_while(|v| v.bit < b1) {
                let (s, e) = (iov.bit.max(b0), iov.bit_end().min(b1));
                if s < e {
                    out.push((iov.start + (s - iov.bit) as u64 * PAGE_SIZE, s, e - s));
                }
            }
            return;
        }
        for iov in &self.iovs {
            let (s, e) = (iov.bit.max(b0), iov.bit_end().min(b1));
            if s < e {
                out.push((iov.start + (s - iov.bit) as u64 * PAGE_SIZE, s, e - s));
            }
        }
        out.sort_unstable_by_key(|p| p.1);
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
        removed
    }

    /// UNMAP / REMOVE: the range is no longer served from the images. Its bits are set (so
    /// nobody fills them); returns how many of them were still unclaimed, and the bit runs
    /// that were dropped.
    pub fn drop_range(&mut self, start: u64, end: u64, bits: &Bits) -> Dropped {
        let mut out = Dropped::default();
        for iov in self.cut(start, end) {
            for b in iov.bit..iov.bit_end() {
                out.unclaimed += u64::from(bits.claim(b));
            }
            out.runs.push((iov.bit, iov.bit_end() - iov.bit));
        }
        out
    }

    /// REMAP: `[from, from+len)` now lives at `to`; dump-time addresses and bits stay.
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
        self.bit_ordered = self.iovs.windows(2).all(|w| w[0].bit < w[1].bit);
    }

    /// All unclaimed runs, for poisoning on abnormal exit: `(address, pages)`.
    pub fn unclaimed_runs(&self, bits: &Bits) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        for iov in &self.iovs {
            let mut p = 0;
            while p < iov.pages() {
                if bits.test(iov.bit + usize::try_from(p).unwrap_or(0)) {
                    p += 1;
                    continue;
                }
                let s = p;
                while p < iov.pages() && !bits.test(iov.bit + usize::try_from(p).unwrap_or(0)) {
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
    fn bits_claim_release_and_scan() {
        let b = Bits::new(200);
        assert_eq!(b.next_clear(0, 200), Some(0));
        assert_eq!(b.claim_run(0, 70, 200), 70);
        assert!(!b.claim(3));
        assert_eq!(b.next_clear(0, 200), Some(70));
        assert!(b.claim(72));
        assert_eq!(b.claim_run(70, 10, 200), 2, "stops at the claimed bit 72");
        assert_eq!(b.next_clear(64, 200), Some(73));
        assert_eq!(b.release_run(70, 3), 3);
        assert_eq!(b.next_clear(0, 200), Some(70));
        assert_eq!(b.claim_run(190, 100, 200), 10);
        assert_eq!(b.next_clear(190, 200), None);
        assert_eq!(b.next_clear(199, 300), None);
        let s = b.snapshot();
        assert!(s.test(0) && !s.test(70) && s.len() == 200);
    }

    #[test]
    fn dump_time_addresses_of_bits() {
        let (s, n) = Space::new(&[(0, 4 * P), (10 * P, 12 * P)]);
        assert_eq!(n, 6);
        assert_eq!(s.img_of(0), 0);
        assert_eq!(s.img_of(5), 11 * P);
        assert_eq!(s.orig_end(1), 4);
        assert_eq!(s.orig_end(4), 6);
        assert_eq!(s.bit_of_img(11 * P), Some(5));
        assert_eq!(s.bit_of_img(5 * P), None);
        assert_eq!(s.bit_of_img(12 * P), None);
    }

    #[test]
    fn unmap_remove_and_remap() {
        let (mut s, n) = Space::new(&[(0, 8 * P)]);
        let bits = Bits::new(n);
        assert!(bits.claim(0));
        let d = s.drop_range(2 * P, 4 * P, &bits);
        assert_eq!((d.unclaimed, d.runs), (2, vec![(2, 2)]));
        assert_eq!(s.iovs.len(), 2);
        assert_eq!(s.lookup(3 * P), None);
        let k = s.lookup(5 * P).unwrap();
        assert_eq!(s.iovs[k].img, 4 * P);
        // move pages 4..6 to 100..102; dump-time addresses and bits stay.
        s.remap(4 * P, 100 * P, 2 * P);
        assert_eq!(s.lookup(4 * P), None);
        let k = s.lookup(101 * P).unwrap();
        assert_eq!(s.iovs[k].img + (101 * P - s.iovs[k].start), 5 * P);
        assert_eq!(s.bit_of(k, 101 * P), 5);
        assert!(bits.claim(5));
        assert_eq!(
            s.unclaimed_runs(&bits),
            vec![(P, 1), (6 * P, 2), (100 * P, 1)]
        );
        let mut out = Vec::new();
        let (fresh, _) = Space::new(&[(0, 2 * P), (5 * P, 9 * P)]);
        fresh.pieces(1, 3, &mut out);
        assert_eq!(out, vec![(P, 1, 1), (5 * P, 2, 2)]);
        assert_eq!(bits.count_clear(), 4);
        s.pieces(1, 7, &mut out);
        assert_eq!(
            out,
            vec![(P, 1, 1), (100 * P, 4, 2), (6 * P, 6, 2)],
            "dropped bits 2..4 have no piece"
        );
    }
}
