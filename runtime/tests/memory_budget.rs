//! The memory budget on the real stack without containerd: memhog is dumped with `criu dump`
//! and restored lazily with a budget far below its memory; it reads all of it again and again
//! while the evictor keeps the installed pages (and the process's resident memory) within the
//! budget, and its checksum stays right (evicted pages fault in again from the images, never
//! as zeros).

mod common;

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Result};
use common::*;
use distriproc_config::FillPolicy;
use distriproc_runtime::fetcher::{FetchStats, FetcherHandle, FetcherOptions, LazyPagesServer};
use distriproc_runtime::source::LocalImages;

const T: Duration = Duration::from_secs(60);
const MIB: u64 = 1 << 20;

fn memhog() -> Option<std::path::PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let bin = root.join("test-images/out/memhog");
    if !bin.exists() {
        let _ = std::process::Command::new("make")
            .arg("-C")
            .arg(root.join("test-images"))
            .arg("memhog")
            .status();
    }
    if bin.exists() {
        return Some(bin);
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "{} missing in CI",
        bin.display()
    );
    eprintln!("SKIP: {} not built", bin.display());
    None
}

/// Anonymous resident memory of `pid` (kB of `RssAnon` in /proc/PID/status), in bytes.
fn rss_anon(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("RssAnon:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

/// A memhog checkpoint made by [`dump_memhog`].
struct Dumped {
    img: std::path::PathBuf,
    work: std::path::PathBuf,
    /// The pids the restored tree will have.
    pids: Vec<i32>,
    /// Its EXPECT reply before the dump.
    expect: String,
}

/// Starts memhog (`mib` MiB, `procs` processes, `threads` threads, 5 % zero pages) in a fresh
/// scratch directory `name` and dumps it with `criu dump`.
fn dump_memhog(
    bin: &Path,
    name: &str,
    port: u16,
    mib: u64,
    procs: u16,
    threads: u16,
) -> Result<Dumped> {
    let dir = scratch(name);
    let args: Vec<String> =
        format!("serve --mib {mib} --procs {procs} --threads {threads} --port {port} --zero-pct 5")
            .split(' ')
            .map(String::from)
            .collect();
    let mut w = Workload::spawn(&dir, bin, &args, port, 1)?;
    let (img, work) = (dir.join("img"), dir.join("work"));
    std::fs::create_dir_all(&img)?;
    std::fs::create_dir_all(&work)?;
    let expect = query(port, "EXPECT", T)?;
    let pids = dump(&mut w, &img)?;
    Ok(Dumped {
        img,
        work,
        pids,
        expect,
    })
}

struct Restored {
    handle: Option<FetcherHandle>,
    pids: KillOnDrop,
}

impl Drop for Restored {
    fn drop(&mut self) {
        if let Some(h) = self.handle.take() {
            h.stop();
            let _ = h.wait();
        }
    }
}

fn restore_memhog(
    name: &str,
    port: u16,
    mib: u64,
    procs: u16,
    threads: u16,
    opts: FetcherOptions,
) -> Result<Option<Restored>> {
    if !ready() {
        return Ok(None);
    }
    let Some(bin) = memhog() else {
        return Ok(None);
    };
    let d = dump_memhog(&bin, name, port, mib, procs, threads)?;
    let (img, work, pids) = (d.img, d.work, d.pids);
    let source = Arc::new(LocalImages::open(&img)?);
    let handle = LazyPagesServer::bind(&work, &img, source, opts)?.spawn()?;
    let r = Restored {
        handle: Some(handle),
        pids: KillOnDrop(pids.clone()),
    };
    let out = restore(&img, &work)?;
    if !out.status.success() {
        bail!(
            "criu restore failed: {:?}\n{}",
            out.status,
            tail(&restore_log(&work), 40)
        );
    }
    // Restored without a pid namespace: the pids are the host's.
    r.handle.as_ref().unwrap().enable_eviction(pids[0])?;
    Ok(Some(r))
}

/// Highest resident figures seen while `f` runs: (fetcher's resident pages, RssAnon sum).
fn sampling<F: FnOnce() -> Result<()>>(
    h: &FetcherHandle,
    pids: &[i32],
    f: F,
) -> Result<(u64, u64)> {
    let stop = AtomicBool::new(false);
    let (max_res, max_rss) = (AtomicU64::new(0), AtomicU64::new(0));
    let r = std::thread::scope(|sc| {
        sc.spawn(|| {
            while !stop.load(Relaxed) {
                max_res.fetch_max(h.stats().resident_pages * 4096, Relaxed);
                max_rss.fetch_max(pids.iter().map(|&p| rss_anon(p)).sum(), Relaxed);
                std::thread::sleep(Duration::from_millis(2));
            }
        });
        let r = f();
        stop.store(true, Relaxed);
        r
    });
    r.map(|()| (max_res.load(Relaxed), max_rss.load(Relaxed)))
}

fn report(name: &str, s: &FetchStats) {
    eprintln!(
        "{name}: resident={} evicted={} batches={} calls={} refaults={} refused={} pinned={} \
         faults={} faulted={} prefetched={} filled={} stop_us p50={} p99={} max={}",
        s.resident_pages,
        s.pages_evicted,
        s.evict_batches,
        s.evict_calls,
        s.refaults,
        s.evict_refused,
        s.pinned_pages,
        s.faults,
        s.pages_faulted,
        s.pages_prefetched,
        s.pages_filled,
        s.evict_stop_us.p50,
        s.evict_stop_us.p99,
        s.evict_stop_us.max,
    );
}

/// 64 MiB read three times over under a 16 MiB budget, fill `full` (which stops short of
/// the budget): resident memory stays within the budget plus 10 %, the sums are right.
#[test]
fn reads_under_a_quarter_budget_stay_within_it() -> Result<()> {
    let budget = 16 * MIB;
    let opts = FetcherOptions {
        fill: FillPolicy::Full,
        memory_budget: budget,
        ..Default::default()
    };
    let Some(mut r) = restore_memhog("budget-reads", 17381, 64, 1, 4, opts)? else {
        return Ok(());
    };
    let port = 17381;
    let expect = query(port, "EXPECT", T)?;
    let h = r.handle.as_ref().unwrap();
    let pids = r.pids.0.clone();
    let t0 = Instant::now();
    let (max_res, max_rss) = sampling(h, &pids, || {
        for _ in 0..3 {
            let sum = query(port, "SUM", T)?;
            ensure!(sum == expect, "SUM {sum} vs EXPECT {expect}");
        }
        Ok(())
    })?;
    let s = h.stats();
    report("budget-reads", &s);
    eprintln!(
        "budget-reads: 3 SUMs in {:?}; max resident {} MiB, max RssAnon {} MiB (budget {} MiB)",
        t0.elapsed(),
        max_res / MIB,
        max_rss / MIB,
        budget / MIB
    );
    ensure!(
        max_res <= budget + budget / 10,
        "resident pages reached {max_res} bytes"
    );
    // The process's own memory besides the lazy region (stacks, memhog's tables) is small.
    ensure!(
        max_rss <= budget + budget / 10 + 4 * MIB,
        "RssAnon reached {max_rss} bytes"
    );
    ensure!(
        s.pages_evicted > 0 && s.evict_batches > 0 && s.refaults > 0,
        "{s:?}"
    );
    ensure!(s.evict_refused == 0, "{s:?}");
    let v = query(port, "VERIFY", T)?;
    ensure!(v.starts_with("OK"), "VERIFY said {v}");
    // Between batches no thread is left stopped or traced (a batch may be running right now:
    // hold eviction off, which waits for it to end, then look).
    {
        let _pause = h.residency_probe().pause_eviction();
        let pids: Vec<u32> = pids.iter().map(|&p| p as u32).collect();
        if let Some(t) = distriproc_harness::stopped_or_traced_thread(&pids) {
            bail!("{t} with no batch running");
        }
    }
    // Written pages stay (they cannot be evicted before write-back exists) and are counted as
    // pinned; the data stays right.
    let wrote = query(port, "WRITE 10", T)?;
    ensure!(wrote.starts_with("OK"), "WRITE said {wrote}");
    let expect = query(port, "EXPECT", T)?;
    let sum = query(port, "SUM", T)?;
    ensure!(sum == expect, "after WRITE: SUM {sum} vs EXPECT {expect}");
    let s = h.stats();
    report("budget-reads after WRITE", &s);
    ensure!(s.pinned_pages > 0, "{s:?}");
    let h = r.handle.take().unwrap();
    h.stop();
    let _ = h.wait();
    Ok(())
}

/// A memory cgroup of the test's own (v1's memory controller or v2), removed on drop.
struct LimitedCgroup {
    dir: std::path::PathBuf,
    v1: bool,
}

impl LimitedCgroup {
    fn create(name: &str, limit: u64) -> Result<LimitedCgroup> {
        let v1 = Path::new("/sys/fs/cgroup/memory/memory.limit_in_bytes").exists();
        let dir = if v1 {
            Path::new("/sys/fs/cgroup/memory").join(name)
        } else {
            Path::new("/sys/fs/cgroup").join(name)
        };
        let _ = std::fs::remove_dir(&dir);
        std::fs::create_dir(&dir)?;
        let cg = LimitedCgroup { dir, v1 };
        let (file, value) = if v1 {
            ("memory.limit_in_bytes", limit.to_string())
        } else {
            ("memory.max", limit.to_string())
        };
        std::fs::write(cg.dir.join(file), value)
            .map_err(|e| anyhow::anyhow!("set {file} of {}: {e}", cg.dir.display()))?;
        if !v1 {
            // No swap either: anonymous memory beyond the limit is an OOM kill.
            let _ = std::fs::write(cg.dir.join("memory.swap.max"), "0");
        }
        Ok(cg)
    }

    fn procs_file(&self) -> std::path::PathBuf {
        self.dir.join("cgroup.procs")
    }

    /// OOM kills in the cgroup so far.
    fn oom_kills(&self) -> u64 {
        let (file, key) = if self.v1 {
            ("memory.oom_control", "oom_kill ")
        } else {
            ("memory.events", "oom_kill ")
        };
        std::fs::read_to_string(self.dir.join(file))
            .ok()
            .and_then(|t| {
                t.lines()
                    .find_map(|l| l.strip_prefix(key))
                    .and_then(|v| v.trim().parse().ok())
            })
            .unwrap_or(0)
    }
}

impl Drop for LimitedCgroup {
    fn drop(&mut self) {
        for _ in 0..100 {
            if std::fs::remove_dir(&self.dir).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// `criu restore` as `common::restore`, but inside `cg` (criu is moved into it before it
/// runs, the restored tree inherits it, and criu leaves cgroups alone).
fn restore_in(img: &Path, work: &Path, cg: &LimitedCgroup) -> Result<std::process::Output> {
    use std::os::unix::process::CommandExt;
    let procs = cg.procs_file();
    let mut cmd = std::process::Command::new(CRIU);
    cmd.args(["restore", "-D"])
        .arg(img)
        .arg("-W")
        .arg(work)
        .args([
            "--lazy-pages",
            "--restore-detached",
            "--manage-cgroups=ignore",
            "-o",
            "restore.log",
            "-v4",
        ])
        .stdin(std::process::Stdio::null());
    let procs = std::ffi::CString::new(procs.as_os_str().as_encoded_bytes())?;
    // SAFETY: between fork and exec the closure only makes async-signal-safe calls (getpid,
    // open, write, close) on data prepared before the fork; it formats the pid into a stack
    // buffer and allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            let mut buf = [0u8; 16];
            let mut n = libc::getpid().unsigned_abs();
            let mut i = buf.len();
            loop {
                i -= 1;
                buf[i] = b'0' + (n % 10) as u8;
                n /= 10;
                if n == 0 {
                    break;
                }
            }
            let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let len = buf.len() - i;
            let w = libc::write(fd, buf[i..].as_ptr().cast(), len);
            libc::close(fd);
            if w != len as isize {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ok(cmd.output()?)
}

/// A container whose memory limit is below its checkpoint's size: without a budget the
/// fill runs it into the cgroup's OOM killer; with the limit given to the fetcher (the shim
/// reads it from the bundle) the fetcher keeps a budget under it, and it runs, its memory
/// intact.
#[test]
fn a_memory_limit_below_the_checkpoint_sets_a_budget() -> Result<()> {
    if !ready() {
        return Ok(());
    }
    let Some(bin) = memhog() else {
        return Ok(());
    };
    let limit = 40 * MIB;
    for (case, memory_limit, port) in [("unbudgeted", 0, 17391u16), ("budgeted", limit, 17393)] {
        let d = dump_memhog(&bin, &format!("limit-{case}"), port, 64, 1, 2)?;
        let (img, work, pids, expect) = (d.img, d.work, d.pids, d.expect);
        let cg = LimitedCgroup::create(
            &format!("distriproc-test-{}-{case}", std::process::id()),
            limit,
        )?;
        let opts = FetcherOptions {
            fill: FillPolicy::Full,
            memory_limit,
            ..Default::default()
        };
        let source = Arc::new(LocalImages::open(&img)?);
        let handle = LazyPagesServer::bind(&work, &img, source, opts)?.spawn()?;
        let mut r = Restored {
            handle: Some(handle),
            pids: KillOnDrop(pids.clone()),
        };
        let out = restore_in(&img, &work, &cg)?;
        ensure!(
            out.status.success(),
            "{case}: criu restore failed: {}",
            tail(&restore_log(&work), 30)
        );
        r.handle.as_ref().unwrap().enable_eviction(pids[0])?;
        let sum = query(port, "SUM", Duration::from_secs(20));
        let s = r.handle.as_ref().unwrap().stats();
        report(case, &s);
        let kills = cg.oom_kills();
        eprintln!("{case}: SUM {sum:?}, {kills} OOM kills in the cgroup");
        if memory_limit == 0 {
            ensure!(
                kills > 0 && sum.map_or(true, |v| v != expect),
                "{case}: the fill was expected to run memhog into its cgroup's OOM killer"
            );
        } else {
            ensure!(kills == 0, "{case}: {kills} OOM kills");
            ensure!(
                sum.as_deref().ok() == Some(expect.as_str()),
                "{case}: SUM {sum:?}"
            );
            ensure!(
                s.budget_pages > 0 && s.budget_pages * 4096 < limit,
                "{case}: {s:?}"
            );
            ensure!(s.pages_evicted > 0, "{case}: {s:?}");
            let v = query(port, "VERIFY", T)?;
            ensure!(v.starts_with("OK"), "{case}: VERIFY said {v}");
        }
        let h = r.handle.take().unwrap();
        h.stop();
        let _ = h.wait();
        drop(r);
    }
    Ok(())
}
