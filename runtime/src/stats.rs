//! Fetcher counters and a fixed-bucket latency histogram, all atomics: the fault path updates
//! them without locks or allocation, and [`crate::fetcher::FetcherHandle::stats`] snapshots them.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering::Relaxed};

use serde::Serialize;

/// Values below this many microseconds get one bucket each.
const LINEAR: u64 = 16;
/// Sub-buckets per power of two above [`LINEAR`] (relative error at most 1/8).
const SUB_BITS: u32 = 3;
/// Powers of two covered above [`LINEAR`] (up to 2^40 µs, about 12 days).
const OCTAVES: usize = 36;
/// Number of buckets.
pub const BUCKETS: usize = 16 + OCTAVES * (1 << SUB_BITS);

/// A log-linear histogram of microsecond values with a fixed set of atomic buckets.
pub struct LatencyHistogram {
    buckets: [AtomicU64; BUCKETS],
    count: AtomicU64,
    max: AtomicU64,
}

impl Default for LatencyHistogram {
    fn default() -> Self {
        LatencyHistogram {
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            count: AtomicU64::new(0),
            max: AtomicU64::new(0),
        }
    }
}

fn bucket_of(v: u64) -> usize {
    if v < LINEAR {
        return usize::try_from(v).unwrap_or(0);
    }
    let msb = 63 - v.leading_zeros(); // >= 4
    let sub = (v >> (msb - SUB_BITS)) & ((1 << SUB_BITS) - 1);
    let idx = 16 + (msb as usize - 4) * (1 << SUB_BITS) + usize::try_from(sub).unwrap_or(0);
    idx.min(BUCKETS - 1)
}

/// Largest value that falls into bucket `i`.
fn bucket_high(i: usize) -> u64 {
    if i < 16 {
        return i as u64;
    }
    let octave = (i - 16) >> SUB_BITS;
    let sub = ((i - 16) & ((1 << SUB_BITS) - 1)) as u64;
    let msb = u32::try_from(octave).unwrap_or(u32::MAX - 4) + 4;
    let base = 1u64 << msb;
    let step = 1u64 << (msb - SUB_BITS);
    base + (sub + 1) * step - 1
}

impl LatencyHistogram {
    /// Records one value in microseconds.
    pub fn record(&self, us: u64) {
        self.buckets[bucket_of(us)].fetch_add(1, Relaxed);
        self.count.fetch_add(1, Relaxed);
        self.max.fetch_max(us, Relaxed);
    }

    /// The value at quantile `q` (0..=1), as the upper bound of its bucket capped at the max.
    pub fn quantile(&self, q: f64) -> u64 {
        let count = self.count.load(Relaxed);
        if count == 0 {
            return 0;
        }
        // Rank of the wanted sample, 1-based.
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let rank = ((q * count as f64).ceil() as u64).clamp(1, count);
        let mut seen = 0;
        for (i, b) in self.buckets.iter().enumerate() {
            seen += b.load(Relaxed);
            if seen >= rank {
                return bucket_high(i).min(self.max.load(Relaxed));
            }
        }
        self.max.load(Relaxed)
    }

    /// A summary for reports.
    pub fn summary(&self) -> LatencySummary {
        LatencySummary {
            count: self.count.load(Relaxed),
            p50: self.quantile(0.5),
            p99: self.quantile(0.99),
            p999: self.quantile(0.999),
            max: self.max.load(Relaxed),
        }
    }
}

/// Quantiles of a [`LatencyHistogram`] in microseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct LatencySummary {
    /// Number of samples.
    pub count: u64,
    /// Median.
    pub p50: u64,
    /// 99th percentile.
    pub p99: u64,
    /// 99.9th percentile.
    pub p999: u64,
    /// Largest sample.
    pub max: u64,
}

/// Live counters of one fetcher (shared between its thread and its handle).
#[derive(Default)]
pub struct FetchCounters {
    /// Page-fault events served.
    pub faults: AtomicU64,
    /// Pages installed for a faulting address (distinct).
    pub pages_faulted: AtomicU64,
    /// Pages installed ahead of a fault (fault-around, sequential/stride prefetch, profile).
    pub pages_prefetched: AtomicU64,
    /// Pages installed by the background fill.
    pub pages_filled: AtomicU64,
    /// Pages installed with UFFDIO_ZEROPAGE.
    pub zero_pages: AtomicU64,
    /// Pages that were already present (EEXIST).
    pub pages_already_present: AtomicU64,
    /// First writes to installed pages (write-protect faults resolved).
    pub pages_written: AtomicU64,
    /// Bytes copied with UFFDIO_COPY.
    pub bytes: AtomicU64,
    /// Tasks whose userfaultfd arrived (forks included).
    pub tasks: AtomicU64,
    /// Tasks that went away (exit detected).
    pub tasks_exited: AtomicU64,
    /// Zombies announced by restore.
    pub zombies: AtomicU64,
    /// Pages poisoned (SIGBUS on access) because the fetcher ended before installing them.
    pub pages_poisoned: AtomicU64,
    /// Total lazy pages announced by the images of received tasks.
    pub lazy_pages: AtomicU64,
    /// Microseconds from spawn to the first fault, +1 (0 = none yet).
    pub first_fault_us: AtomicU64,
    /// Microseconds from spawn to the restore-finished marker, +1 (0 = not yet).
    pub restore_finished_us: AtomicU64,
    /// Microseconds from spawn to the end of the background fill, +1 (0 = not yet).
    pub fill_complete_us: AtomicU64,
    /// Set when the fetcher thread has ended.
    pub finished: AtomicBool,
    /// [`ProfileState`] as a number.
    pub profile_state: AtomicU8,
    /// Pages in the profile being replayed, or recorded so far.
    pub profile_pages: AtomicU64,
    /// Pages installed by the profile prefetch (also counted in `pages_prefetched`).
    pub profile_prefetched: AtomicU64,
    /// Pages demand-faulted (installed for a faulting address) during the profile window of a
    /// replay: the working set the profile did not cover in time.
    pub profile_misses: AtomicU64,
    /// Fault service latency.
    pub fault_latency: LatencyHistogram,
    /// The local memory budget in pages (0 = none).
    pub budget_pages: AtomicU64,
    /// Pages the fetcher installed with data that are still in the tasks (not evicted, not
    /// dropped by the tasks, task not gone).
    pub resident_pages: AtomicU64,
    /// Pages evicted (made remote again) to keep the budget.
    pub pages_evicted: AtomicU64,
    /// Eviction batches run (each stops one process once).
    pub evict_batches: AtomicU64,
    /// `madvise` calls the batches made (one per contiguous range).
    pub evict_calls: AtomicU64,
    /// Demand faults on pages that had been evicted.
    pub refaults: AtomicU64,
    /// Eviction batches refused or failed (the process was left as it was).
    pub evict_refused: AtomicU64,
    /// Installed pages the budget could not evict at its last pass (written, zero or untracked
    /// pages: only clean pages are evicted).
    pub pinned_pages: AtomicU64,
    /// How long each eviction batch held its process stopped.
    pub evict_stop_latency: LatencyHistogram,
    /// Written pages sent to the page server by write-back layers (each page once per layer).
    pub pages_written_back: AtomicU64,
    /// Write-back layers built.
    pub writeback_layers: AtomicU64,
}

fn opt(v: u64) -> Option<u64> {
    v.checked_sub(1)
}

impl FetchCounters {
    /// Sets a "+1" timestamp once.
    pub fn mark_once(cell: &AtomicU64, us: u64) {
        let _ = cell.compare_exchange(0, us.saturating_add(1), Relaxed, Relaxed);
    }

    /// A consistent-enough snapshot.
    pub fn snapshot(&self) -> FetchStats {
        FetchStats {
            faults: self.faults.load(Relaxed),
            pages_faulted: self.pages_faulted.load(Relaxed),
            pages_prefetched: self.pages_prefetched.load(Relaxed),
            pages_filled: self.pages_filled.load(Relaxed),
            zero_pages: self.zero_pages.load(Relaxed),
            pages_already_present: self.pages_already_present.load(Relaxed),
            pages_written: self.pages_written.load(Relaxed),
            bytes: self.bytes.load(Relaxed),
            tasks: self.tasks.load(Relaxed),
            tasks_exited: self.tasks_exited.load(Relaxed),
            zombies: self.zombies.load(Relaxed),
            pages_poisoned: self.pages_poisoned.load(Relaxed),
            lazy_pages: self.lazy_pages.load(Relaxed),
            time_to_first_fault_us: opt(self.first_fault_us.load(Relaxed)),
            restore_finished_us: opt(self.restore_finished_us.load(Relaxed)),
            fill_complete_us: opt(self.fill_complete_us.load(Relaxed)),
            finished: self.finished.load(Relaxed),
            fault_latency_us: self.fault_latency.summary(),
            profile_state: ProfileState::from_u8(self.profile_state.load(Relaxed)),
            profile_pages: self.profile_pages.load(Relaxed),
            profile_prefetched: self.profile_prefetched.load(Relaxed),
            profile_misses: self.profile_misses.load(Relaxed),
            profile_hit_rate: hit_rate(
                self.profile_state.load(Relaxed),
                self.profile_prefetched.load(Relaxed),
                self.profile_misses.load(Relaxed),
            ),
            budget_pages: self.budget_pages.load(Relaxed),
            resident_pages: self.resident_pages.load(Relaxed),
            pages_evicted: self.pages_evicted.load(Relaxed),
            evict_batches: self.evict_batches.load(Relaxed),
            evict_calls: self.evict_calls.load(Relaxed),
            refaults: self.refaults.load(Relaxed),
            evict_refused: self.evict_refused.load(Relaxed),
            pinned_pages: self.pinned_pages.load(Relaxed),
            evict_stop_us: self.evict_stop_latency.summary(),
            pages_written_back: self.pages_written_back.load(Relaxed),
            writeback_layers: self.writeback_layers.load(Relaxed),
        }
    }
}

fn hit_rate(state: u8, prefetched: u64, misses: u64) -> Option<f64> {
    if ProfileState::from_u8(state) != ProfileState::Replayed || prefetched + misses == 0 {
        return None;
    }
    #[allow(clippy::cast_precision_loss)]
    Some(prefetched as f64 / (prefetched + misses) as f64)
}

/// What the fetcher does with working-set profiles (fill policy `profile`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ProfileState {
    /// Not the `profile` policy.
    #[default]
    Off,
    /// No (valid) profile for this checkpoint: recording one during the profile window.
    Recording,
    /// A profile was recorded and saved.
    Recorded,
    /// Recording ended but the profile could not be saved (logged).
    SaveFailed,
    /// The checkpoint's profile was loaded and is replayed (prefetched first).
    Replayed,
    /// A profile file existed but was refused (corrupt or unreadable, logged); recording anew.
    Refused,
}

impl ProfileState {
    /// The stored number.
    pub fn as_u8(self) -> u8 {
        match self {
            ProfileState::Off => 0,
            ProfileState::Recording => 1,
            ProfileState::Recorded => 2,
            ProfileState::SaveFailed => 3,
            ProfileState::Replayed => 4,
            ProfileState::Refused => 5,
        }
    }

    fn from_u8(v: u8) -> ProfileState {
        match v {
            1 => ProfileState::Recording,
            2 => ProfileState::Recorded,
            3 => ProfileState::SaveFailed,
            4 => ProfileState::Replayed,
            5 => ProfileState::Refused,
            _ => ProfileState::Off,
        }
    }
}

/// A snapshot of a fetcher's counters. Times are microseconds since `LazyPagesServer::spawn`.
///
/// Page counters count distinct pages: a page is counted by whoever installed it (the kernel
/// accepts one `UFFDIO_COPY`/`UFFDIO_ZEROPAGE` per page and task), so `pages_faulted +
/// pages_prefetched + pages_filled` is the number of lazy pages installed.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct FetchStats {
    /// Page-fault events served.
    pub faults: u64,
    /// Pages installed because a task faulted on them.
    pub pages_faulted: u64,
    /// Pages installed around faults.
    pub pages_prefetched: u64,
    /// Pages installed by the background fill.
    pub pages_filled: u64,
    /// Pages installed with UFFDIO_ZEROPAGE.
    pub zero_pages: u64,
    /// Pages found already present (EEXIST).
    pub pages_already_present: u64,
    /// Installed pages the tasks wrote since they arrived (tracked tasks only).
    pub pages_written: u64,
    /// Bytes copied with UFFDIO_COPY.
    pub bytes: u64,
    /// Tasks served (forks included).
    pub tasks: u64,
    /// Tasks that went away.
    pub tasks_exited: u64,
    /// Zombies announced by restore.
    pub zombies: u64,
    /// Pages poisoned on an abnormal end.
    pub pages_poisoned: u64,
    /// Lazy pages announced by the images of the received tasks.
    pub lazy_pages: u64,
    /// Time to the first fault.
    pub time_to_first_fault_us: Option<u64>,
    /// Time to the restore-finished marker.
    pub restore_finished_us: Option<u64>,
    /// Time to the end of the background fill.
    pub fill_complete_us: Option<u64>,
    /// The fetcher thread has ended.
    pub finished: bool,
    /// Fault service time: from reading the fault event to the page being installed.
    pub fault_latency_us: LatencySummary,
    /// Profile recording / replay state.
    pub profile_state: ProfileState,
    /// Pages of the replayed profile (replay) or recorded so far (recording).
    pub profile_pages: u64,
    /// Pages installed by the profile prefetch.
    pub profile_prefetched: u64,
    /// Distinct pages demand-faulted during the profile window of a replay.
    pub profile_misses: u64,
    /// Replay only: `profile_prefetched / (profile_prefetched + profile_misses)`, the fraction of
    /// the demand-touched working set that was already prefetched. Touches of installed pages
    /// are invisible to userfaultfd, so this assumes the recorded set is touched again (true for
    /// a repeatable start-up); it is an upper bound when the workload touches less.
    pub profile_hit_rate: Option<f64>,
    /// The local memory budget in pages (0 = none).
    pub budget_pages: u64,
    /// Pages installed with data and still in the tasks.
    pub resident_pages: u64,
    /// Pages evicted to keep the budget.
    pub pages_evicted: u64,
    /// Eviction batches run.
    pub evict_batches: u64,
    /// `madvise` calls the batches made (one per contiguous range).
    pub evict_calls: u64,
    /// Demand faults on evicted pages.
    pub refaults: u64,
    /// Eviction batches refused or failed.
    pub evict_refused: u64,
    /// Resident pages the last eviction pass could not evict (written, zero or untracked).
    pub pinned_pages: u64,
    /// How long eviction batches held their process stopped, µs.
    pub evict_stop_us: LatencySummary,
    /// Written pages sent to the page server in write-back layers.
    pub pages_written_back: u64,
    /// Write-back layers built.
    pub writeback_layers: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_monotonic_and_cover_their_values() {
        let mut prev = 0;
        for v in (0..100_000u64).chain([1 << 30, 1 << 39, u64::MAX]) {
            let b = bucket_of(v);
            assert!(b >= prev || v > 100_000);
            prev = b;
            if b < BUCKETS - 1 {
                assert!(bucket_high(b) >= v, "v={v} b={b} high={}", bucket_high(b));
                assert!(bucket_high(b) as f64 <= v as f64 * 1.126 + 1.0, "v={v}");
            }
        }
    }

    #[test]
    fn quantiles() {
        let h = LatencyHistogram::default();
        assert_eq!(h.summary(), LatencySummary::default());
        for v in 1..=1000 {
            h.record(v);
        }
        let s = h.summary();
        assert_eq!(s.count, 1000);
        assert!((480..=560).contains(&s.p50), "{s:?}");
        assert!((980..=1000).contains(&s.p99), "{s:?}");
        assert_eq!(s.max, 1000);
        assert_eq!(s.p999, 1000);
    }
}
