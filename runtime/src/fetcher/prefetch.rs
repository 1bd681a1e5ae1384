//! Per-task access-pattern detection around demand faults: which pages to install next to the
//! faulting one.
//!
//! * Random access (the default): the aligned `fault_around` window around the fault.
//! * Sequential: a fault at or just past the end of the previous window (forward scan) doubles
//!   the window, up to `max` pages, starting at the fault.
//! * Stride: three faults at the same distance `d` (|d| larger than the window, at most
//!   [`MAX_STRIDE`]) prefetch the next pages `page + d, page + 2d, ...`; the depth doubles
//!   while the stride holds (from 4 up to `max / 4`, at most [`MAX_STRIDE_DEPTH`]).
//!
//! Any other fault falls back to the small window. Pure arithmetic on addresses: no syscalls,
//! no allocation; unit-tested here.

use crate::images::PAGE_SIZE;

/// Largest stride followed, in bytes.
pub(crate) const MAX_STRIDE: u64 = 1 << 30;
/// Most pages prefetched for one stride fault.
pub(crate) const MAX_STRIDE_DEPTH: u64 = 64;

/// What to install after the faulting page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Plan {
    /// Pages `[start, start + pages * 4096)` (the faulting page may be inside).
    Window { start: u64, pages: u64 },
    /// `count` single pages at `first`, `first + stride`, ...
    Stride { first: u64, stride: i64, count: u64 },
}

/// Detector state of one task (kept by the fault thread).
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Detector {
    /// Start and end of the last window installed.
    win_start: u64,
    win_end: u64,
    /// Its size in pages.
    win: u64,
    /// Last faulting page.
    last: u64,
    /// Current stride candidate and how often it repeated.
    stride: i64,
    hits: u32,
    /// Last page covered by the stride prefetch.
    stride_end: u64,
}

impl Detector {
    /// Decides the prefetch for a fault at `page` (page-aligned). `around` is the aligned
    /// fault-around window in pages (power of two), `max` the largest window (0 = no detection).
    pub fn on_fault(&mut self, page: u64, around: u64, max: u64) -> Plan {
        let around = around.max(1);
        if max <= around {
            return aligned(page, around);
        }
        // Sequential: the fault lands in or just past the last window.
        if self.win_end != 0 && page >= self.win_start && page <= self.win_end + around * PAGE_SIZE
        {
            self.win = (self.win * 2).clamp(around, max);
            self.win_start = page;
            self.win_end = page + self.win * PAGE_SIZE;
            self.last = page;
            self.hits = 0;
            return Plan::Window {
                start: page,
                pages: self.win,
            };
        }
        let d = page.wrapping_sub(self.last) as i64;
        let big = d.unsigned_abs() > around * PAGE_SIZE && d.unsigned_abs() <= MAX_STRIDE;
        let continues = self.hits > 0 && page == self.stride_end.wrapping_add(self.stride as u64);
        if continues || (big && d == self.stride) {
            self.hits = self.hits.saturating_add(1);
        } else {
            self.stride = if big { d } else { 0 };
            self.hits = 0;
        }
        self.last = page;
        let plan = aligned(page, around);
        if let Plan::Window { start, pages } = plan {
            self.win = around;
            self.win_start = start;
            self.win_end = start + pages * PAGE_SIZE;
        }
        if self.hits > 0 && self.stride != 0 {
            let cap = (max / 4).clamp(4, MAX_STRIDE_DEPTH);
            let count = (4u64 << (self.hits - 1).min(8)).min(cap);
            self.stride_end = page.wrapping_add((self.stride * count as i64) as u64);
            return Plan::Stride {
                first: page.wrapping_add(self.stride as u64),
                stride: self.stride,
                count,
            };
        }
        plan
    }
}

fn aligned(page: u64, around: u64) -> Plan {
    let w = around * PAGE_SIZE;
    Plan::Window {
        start: page & !(w - 1),
        pages: around,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: u64 = PAGE_SIZE;

    #[test]
    fn off_means_aligned_window() {
        let mut d = Detector::default();
        for _ in 0..4 {
            assert_eq!(
                d.on_fault(0x10000 + 17 * P, 16, 16),
                Plan::Window {
                    start: 0x10000 + 16 * P,
                    pages: 16
                }
            );
        }
    }

    #[test]
    fn sequential_scan_grows_the_window() {
        let mut d = Detector::default();
        let base = 1 << 30;
        let mut page = base;
        let mut sizes = Vec::new();
        for _ in 0..8 {
            let Plan::Window { start, pages } = d.on_fault(page, 16, 256) else {
                panic!("not a window");
            };
            assert!(start <= page && page < start + pages * P);
            sizes.push(pages);
            page = start + pages * P; // the scan faults right after the window
        }
        assert_eq!(sizes, vec![16, 32, 64, 128, 256, 256, 256, 256]);
        // A random jump falls back to the small window.
        assert_eq!(
            d.on_fault(base + (1 << 28), 16, 256),
            Plan::Window {
                start: base + (1 << 28),
                pages: 16
            }
        );
    }

    #[test]
    fn stride_is_followed_and_deepens() {
        let mut d = Detector::default();
        let s = 100 * P;
        let base = 1 << 32;
        assert!(matches!(d.on_fault(base, 16, 256), Plan::Window { .. }));
        assert!(matches!(d.on_fault(base + s, 16, 256), Plan::Window { .. }));
        let p = d.on_fault(base + 2 * s, 16, 256);
        assert_eq!(
            p,
            Plan::Stride {
                first: base + 3 * s,
                stride: 100 * P as i64,
                count: 4
            }
        );
        // The next fault is just past the prefetched strides.
        let p = d.on_fault(base + 7 * s, 16, 256);
        assert_eq!(
            p,
            Plan::Stride {
                first: base + 8 * s,
                stride: 100 * P as i64,
                count: 8
            }
        );
        // Descending strides work too.
        let mut d = Detector::default();
        let top = 1 << 34;
        d.on_fault(top, 16, 256);
        d.on_fault(top - s, 16, 256);
        assert!(matches!(
            d.on_fault(top - 2 * s, 16, 256),
            Plan::Stride { stride, .. } if stride == -(100 * P as i64)
        ));
    }

    #[test]
    fn random_faults_stay_small() {
        let mut d = Detector::default();
        let mut x: u64 = 12345;
        for _ in 0..1000 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let page = (1 << 32) + ((x >> 20) % (1 << 20)) * P * 3;
            match d.on_fault(page, 16, 256) {
                Plan::Window { pages, .. } => assert!(pages <= 32, "{pages}"),
                Plan::Stride { .. } => panic!("random access seen as a stride"),
            }
        }
    }
}
