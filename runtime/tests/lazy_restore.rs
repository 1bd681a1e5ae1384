//! Lazy restore on the real stack without containerd: a workload is dumped with `criu dump`,
//! our fetcher listens on the work dir's lazy-pages.socket, and `criu restore --lazy-pages`
//! hands it the userfaultfds. Each test uses its own ports and directory.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Result};
use common::*;
use distriproc_config::FillPolicy;
use distriproc_runtime::fetcher::{
    FetchStats, FetcherHandle, FetcherOptions, LazyPagesServer, ProfileState,
};
use distriproc_runtime::source::LocalImages;

const T: Duration = Duration::from_secs(30);

struct Restored {
    handle: Option<FetcherHandle>,
    pids: KillOnDrop,
    work: PathBuf,
}

impl Drop for Restored {
    fn drop(&mut self) {
        if let Some(h) = self.handle.take() {
            h.stop();
            let _ = h.wait();
        }
    }
}

impl Restored {
    fn handle(&self) -> &FetcherHandle {
        self.handle.as_ref().expect("fetcher handle")
    }
    fn wait(&mut self) -> Result<FetchStats> {
        Ok(self.handle.take().expect("fetcher handle").wait()?)
    }
}

fn lazy_restore(
    name: &str,
    port: u16,
    mib: u32,
    procs: u16,
    threads: u16,
    zombie: bool,
    opts: FetcherOptions,
) -> Result<Restored> {
    let dir = scratch(name);
    let w = Workload::start(&dir, port, mib, procs, threads, zombie)?;
    restore_workload(name, &dir, w, opts)
}

/// Dumps the running workload `w` and restores it lazily with our fetcher.
fn restore_workload(
    name: &str,
    dir: &Path,
    mut w: Workload,
    opts: FetcherOptions,
) -> Result<Restored> {
    let img = dir.join("img");
    let work = dir.join("work");
    std::fs::create_dir_all(&img)?;
    std::fs::create_dir_all(&work)?;
    let pids = dump(&mut w, &img)?;
    restore_images(name, &img, &work, pids, opts)
}

/// Restores the images in `img` lazily with our fetcher (work dir `work`); `pids` are the
/// pids the restored tree will have.
fn restore_images(
    name: &str,
    img: &Path,
    work: &Path,
    pids: Vec<i32>,
    opts: FetcherOptions,
) -> Result<Restored> {
    std::fs::create_dir_all(work)?;
    let source = Arc::new(LocalImages::open(img)?);
    let server = LazyPagesServer::bind(work, img, source, opts)?;
    let handle = server.spawn()?;
    let r = Restored {
        handle: Some(handle),
        pids: KillOnDrop(pids),
        work: work.to_path_buf(),
    };
    let (img, work) = (img.to_path_buf(), work.to_path_buf());
    let t0 = Instant::now();
    let out = restore(&img, &work)?;
    let log = restore_log(&work);
    if !out.status.success() {
        r.handle().stop();
        bail!("criu restore failed: {:?}\n{}", out.status, tail(&log, 40));
    }
    eprintln!("{name}: criu restore took {:?}", t0.elapsed());
    ensure!(
        log.contains("Lazy restore skips"),
        "restore.log has no lazy path:\n{}",
        tail(&log, 40)
    );
    Ok(r)
}

fn verify(port: u16) -> Result<()> {
    let v = query(port, "VERIFY", T)?;
    ensure!(v.starts_with("OK"), "port {port}: VERIFY said {v}");
    Ok(())
}

fn installed(s: &FetchStats) -> u64 {
    s.pages_faulted + s.pages_prefetched + s.pages_filled
}

fn report(name: &str, s: &FetchStats) {
    let fill_ms = match (s.fill_complete_us, s.restore_finished_us) {
        (Some(f), Some(r)) if f > r => Some((f - r) as f64 / 1000.0),
        _ => None,
    };
    let mibps = fill_ms.map(|ms| (s.pages_filled * 4096) as f64 / (1 << 20) as f64 / (ms / 1000.0));
    eprintln!("{name}: {s:?}\n{name}: fill {fill_ms:?} ms, {mibps:?} MiB/s");
}

#[test]
fn single_process_full_fill() -> Result<()> {
    if !ready() {
        return Ok(());
    }
    let mut r = lazy_restore("single", 17101, 32, 1, 0, false, FetcherOptions::default())?;
    verify(17101)?;
    let s = r.wait()?;
    report("single", &s);
    ensure!(s.tasks == 1, "{s:?}");
    ensure!(s.faults > 0, "no faults served: {s:?}");
    ensure!(
        installed(&s) == s.lazy_pages,
        "not every lazy page was installed: {s:?}"
    );
    ensure!(s.fill_complete_us.is_some());
    verify(17101)?;
    let _ = &r.work;
    Ok(())
}

#[test]
fn several_processes() -> Result<()> {
    if !ready() {
        return Ok(());
    }
    let mut r = lazy_restore("procs", 17111, 16, 3, 0, false, FetcherOptions::default())?;
    for i in 0..3 {
        verify(17111 + i)?;
    }
    let s = r.wait()?;
    report("procs", &s);
    ensure!(s.tasks == 3, "{s:?}");
    ensure!(installed(&s) == s.lazy_pages, "{s:?}");
    for i in 0..3 {
        verify(17111 + i)?;
    }
    Ok(())
}

#[test]
fn several_threads() -> Result<()> {
    if !ready() {
        return Ok(());
    }
    let opts = FetcherOptions {
        fill: FillPolicy::None,
        ..Default::default()
    };
    let r = lazy_restore("threads", 17121, 16, 1, 4, false, opts)?;
    std::thread::sleep(Duration::from_millis(300));
    verify(17121)?;
    let s = r.handle().stats();
    report("threads", &s);
    ensure!(s.faults > 0 && s.pages_filled == 0, "{s:?}");
    Ok(())
}

#[test]
fn fork_munmap_madvise_mremap_after_restore() -> Result<()> {
    if !ready() {
        return Ok(());
    }
    let opts = FetcherOptions {
        fill: FillPolicy::None,
        ..Default::default()
    };
    // Three processes so that each action meets memory that is still lazy (fill none):
    // 0 forks (the child verifies through its own uffd) and unmaps, 1 moves its region,
    // 2 drops pages with MADV_DONTNEED.
    let r = lazy_restore("events", 17131, 16, 3, 2, false, opts)?;
    let plan: [(u16, &[&str]); 3] = [
        (0, &["FORK", "MUNMAP", "VERIFY", "FORK"]),
        (1, &["MREMAP", "VERIFY"]),
        (2, &["DONTNEED", "VERIFY"]),
    ];
    for (i, cmds) in plan {
        for cmd in cmds {
            let v = query(17131 + i, cmd, T)?;
            ensure!(v.starts_with("OK"), "proc {i}: {cmd} said {v}");
        }
    }
    let s = r.handle().stats();
    report("events", &s);
    ensure!(s.tasks >= 5, "fork children were not tracked: {s:?}");
    ensure!(s.pages_filled == 0, "{s:?}");
    Ok(())
}

#[test]
fn zombie_at_dump_time() -> Result<()> {
    if !ready() {
        return Ok(());
    }
    let mut r = lazy_restore("zombie", 17141, 8, 1, 0, true, FetcherOptions::default())?;
    verify(17141)?;
    let s = r.wait()?;
    report("zombie", &s);
    ensure!(s.zombies == 1 && s.tasks == 1, "{s:?}");
    Ok(())
}

#[test]
fn fill_none_moves_only_touched_pages() -> Result<()> {
    if !ready() {
        return Ok(());
    }
    let opts = FetcherOptions {
        fill: FillPolicy::None,
        ..Default::default()
    };
    let mut r = lazy_restore("none", 17151, 64, 1, 0, false, opts)?;
    let v = query(17151, "TOUCH 20", T)?;
    ensure!(v == "OK", "TOUCH said {v}");
    std::thread::sleep(Duration::from_millis(500));
    ensure!(query(17151, "PING", T)? == "PONG");
    let s = r.handle().stats();
    report("none", &s);
    ensure!(s.pages_filled == 0, "{s:?}");
    // 20 pages were touched; a detected stride may serve some of them before they fault.
    ensure!(s.faults > 0 && installed(&s) >= 20, "{s:?}");
    ensure!(installed(&s) < s.lazy_pages / 4, "too much moved: {s:?}");
    ensure!(!r.handle().is_finished());
    // Once the task is gone, wait() returns (exit probe), without stop().
    kill_pids(&r.pids.0);
    let t0 = Instant::now();
    let s = r.wait()?;
    ensure!(
        t0.elapsed() < Duration::from_secs(5),
        "wait took {:?}",
        t0.elapsed()
    );
    ensure!(s.tasks_exited == 1, "{s:?}");
    Ok(())
}

#[test]
fn fill_full_completes_and_wait_returns() -> Result<()> {
    if !ready() {
        return Ok(());
    }
    let mut r = lazy_restore("full", 17161, 128, 1, 0, false, FetcherOptions::default())?;
    let s = r.wait()?;
    report("full", &s);
    ensure!(s.fill_complete_us.is_some(), "{s:?}");
    ensure!(installed(&s) == s.lazy_pages, "{s:?}");
    ensure!(s.pages_filled > s.lazy_pages / 2, "{s:?}");
    verify(17161)?;
    Ok(())
}

/// The infra workload (test-images/memhog): several processes and threads, checksums.
#[test]
fn memhog_checksum_after_lazy_restore() -> Result<()> {
    if !ready() {
        return Ok(());
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let bin = root.join("test-images/out/memhog");
    if !bin.exists() {
        let _ = Command::new("make")
            .arg("-C")
            .arg(root.join("test-images"))
            .arg("memhog")
            .status();
    }
    if !bin.exists() {
        ensure!(
            std::env::var("CI").as_deref() != Ok("true"),
            "{} missing in CI",
            bin.display()
        );
        eprintln!(
            "SKIP: {} not built (make -C test-images memhog)",
            bin.display()
        );
        return Ok(());
    }
    let dir = scratch("memhog");
    let args: Vec<String> = "serve --mib 48 --procs 2 --threads 2 --port 17171 --zero-pct 10"
        .split(' ')
        .map(String::from)
        .collect();
    let w = Workload::spawn(&dir, &bin, &args, 17171, 1)?;
    let opts = FetcherOptions {
        fill: FillPolicy::None,
        ..Default::default()
    };
    let r = restore_workload("memhog", &dir, w, opts)?;
    let expect = query(17171, "EXPECT", T)?;
    let sum = query(17171, "SUM", T)?;
    ensure!(
        sum.starts_with("SUM ") && sum == expect,
        "SUM {sum} vs EXPECT {expect}"
    );
    let v = query(17171, "VERIFY", T)?;
    ensure!(v.starts_with("OK"), "VERIFY said {v}");
    let s = r.handle().stats();
    report("memhog", &s);
    ensure!(s.tasks == 2 && s.faults > 0 && s.pages_filled == 0, "{s:?}");
    Ok(())
}

/// Dumps a fresh lazyhog and returns (dir, images dir, pids of the dumped tree).
fn dumped(
    name: &str,
    port: u16,
    mib: u32,
    procs: u16,
    threads: u16,
) -> Result<(PathBuf, PathBuf, Vec<i32>)> {
    let dir = scratch(name);
    let mut w = Workload::start(&dir, port, mib, procs, threads, false)?;
    let img = dir.join("img");
    std::fs::create_dir_all(&img)?;
    let pids = dump(&mut w, &img)?;
    Ok((dir, img, pids))
}

/// Policy `profile`: restore 1 records the pages a TOUCH needs, restore 2 of the same
/// checkpoint prefetches them before the same TOUCH arrives.
#[test]
fn profile_recorded_then_replayed() -> Result<()> {
    if !ready() {
        return Ok(());
    }
    let port = 17201;
    let (dir, img, pids) = dumped("profile", port, 64, 1, 0)?;
    let profiles = dir.join("profiles");
    let opts = FetcherOptions {
        fill: FillPolicy::Profile,
        profile_dir: profiles.clone(),
        profile_window: Duration::from_secs(3),
        ..Default::default()
    };
    // Restore 1: no profile yet; record until 3 s after restore finished, then fill.
    let mut r = restore_images(
        "profile-1",
        &img,
        &dir.join("work1"),
        pids.clone(),
        opts.clone(),
    )?;
    let v = query(port, "TOUCH 200", T)?;
    ensure!(v == "OK", "TOUCH said {v}");
    let s1 = r.wait()?;
    report("profile-1", &s1);
    ensure!(s1.profile_state == ProfileState::Recorded, "{s1:?}");
    ensure!(s1.profile_pages >= 200, "{s1:?}");
    ensure!(installed(&s1) == s1.lazy_pages, "{s1:?}");
    verify(port)?;
    let files: Vec<_> = std::fs::read_dir(&profiles)?
        .flatten()
        .map(|e| e.path())
        .collect();
    eprintln!("profile-1: profile files {files:?}");
    ensure!(files.len() == 1, "{files:?}");
    drop(r); // kills the restored tree
    wait_gone(&pids, T)?;

    // Restore 2 of the same images: the profile is replayed first.
    let mut r = restore_images(
        "profile-2",
        &img,
        &dir.join("work2"),
        pids.clone(),
        opts.clone(),
    )?;
    let v = query(port, "TOUCH 200", T)?;
    ensure!(v == "OK", "TOUCH said {v}");
    let s2 = r.wait()?;
    report("profile-2", &s2);
    ensure!(s2.profile_state == ProfileState::Replayed, "{s2:?}");
    ensure!(s2.profile_pages == s1.profile_pages, "{s1:?}\n{s2:?}");
    let hit = s2.profile_hit_rate.unwrap_or(0.0);
    eprintln!(
        "profile-2: hit rate {hit:.3} ({} prefetched, {} demand misses in the window; restore 1 \
         faulted {} pages)",
        s2.profile_prefetched, s2.profile_misses, s1.pages_faulted
    );
    ensure!(hit > 0.8, "profile hit rate {hit}: {s2:?}");
    ensure!(s2.pages_faulted < s1.pages_faulted, "{s1:?}\n{s2:?}");
    ensure!(installed(&s2) == s2.lazy_pages, "{s2:?}");
    verify(port)?;
    drop(r);
    wait_gone(&pids, T)?;

    // A corrupt profile is refused with a warning and recorded anew.
    let file = &files[0];
    let mut bytes = std::fs::read(file)?;
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(file, &bytes)?;
    let mut r = restore_images("profile-3", &img, &dir.join("work3"), pids, opts)?;
    verify(port)?;
    let s3 = r.wait()?;
    report("profile-3", &s3);
    ensure!(s3.profile_state == ProfileState::Recorded, "{s3:?}");
    ensure!(installed(&s3) == s3.lazy_pages, "{s3:?}");
    Ok(())
}

/// A sequential scan (VERIFY reads every page in order) with fill `none`: the growing prefetch
/// window serves it with far fewer faults than pages; the same images restored with detection
/// off (fixed 16-page fault-around) for comparison, and with three fault helpers.
#[test]
fn sequential_scan_prefetch() -> Result<()> {
    if !ready() {
        return Ok(());
    }
    let port = 17211;
    let (dir, img, pids) = dumped("seq", port, 64, 1, 0)?;
    let mut faults = Vec::new();
    for (i, max, fault_threads) in [(1, 256usize, 1usize), (2, 0, 1), (3, 256, 3)] {
        let opts = FetcherOptions {
            fill: FillPolicy::None,
            prefetch_max_pages: max,
            fault_threads,
            ..Default::default()
        };
        let name = format!("seq-{max}-{fault_threads}t");
        let r = restore_images(
            &name,
            &img,
            &dir.join(format!("work{i}")),
            pids.clone(),
            opts,
        )?;
        let t0 = Instant::now();
        verify(port)?;
        let took = t0.elapsed();
        let s = r.handle().stats();
        report(&name, &s);
        eprintln!(
            "{name}: VERIFY scan of {} lazy pages took {took:?} with {} faults ({} faulted, {} \
             prefetched)",
            s.lazy_pages, s.faults, s.pages_faulted, s.pages_prefetched
        );
        ensure!(s.pages_filled == 0, "{s:?}");
        faults.push(s.faults);
        if max > 0 {
            ensure!(
                s.faults * 10 < s.lazy_pages,
                "{} faults for {} pages",
                s.faults,
                s.lazy_pages
            );
        }
        drop(r);
        wait_gone(&pids, T)?;
    }
    ensure!(
        faults[0] * 4 < faults[1],
        "prefetch on/off faults: {faults:?}"
    );
    Ok(())
}

/// Fill workers and demand faults at once: two processes, four threads checking pages
/// continuously, a VERIFY scan and a fork racing the background fill (two fill threads, small
/// batches); the same images restored again with three fault helper threads.
#[test]
fn fill_races_multithreaded_faults() -> Result<()> {
    if !ready() {
        return Ok(());
    }
    let port = 17221;
    let (dir, img, pids) = dumped("race", port, 96, 2, 4)?;
    for fault_threads in [1usize, 3] {
        let opts = FetcherOptions {
            fill: FillPolicy::Full,
            fill_threads: 2,
            fill_batch_pages: 64,
            fault_threads,
            ..Default::default()
        };
        let name = format!("race-{fault_threads}");
        let work = dir.join(format!("work{fault_threads}"));
        let mut r = restore_images(&name, &img, &work, pids.clone(), opts)?;
        // Process 1 forks while the fill runs: its child verifies every page through its
        // own uffd (pages the fill put into the parent after the fork must still come).
        let q = std::thread::spawn(move || -> Result<()> {
            let v = query(port + 1, "FORK", T)?;
            ensure!(v.starts_with("OK"), "FORK said {v}");
            verify(port + 1)?;
            Ok(())
        });
        verify(port)?;
        q.join()
            .map_err(|_| anyhow::anyhow!("query thread panicked"))??;
        let s = r.wait()?;
        report(&name, &s);
        ensure!(s.tasks >= 3, "fork child not tracked: {s:?}");
        ensure!(s.faults > 0 && s.pages_filled > 0, "{s:?}");
        // The fork child's lazy pages count in lazy_pages; it may exit before all are filled.
        ensure!(installed(&s) <= s.lazy_pages, "pages counted twice: {s:?}");
        ensure!(
            s.fill_complete_us.is_some() && s.pages_poisoned == 0,
            "{s:?}"
        );
        verify(port)?;
        verify(port + 1)?;
        drop(r);
        wait_gone(&pids, T)?;
    }
    Ok(())
}

/// Background fill of the same 256 MiB checkpoint with one and with two fill workers (and a
/// plain full fill check each time). Prints the throughput; no timing is asserted.
#[test]
fn fill_throughput_one_and_two_workers() -> Result<()> {
    if !ready() {
        return Ok(());
    }
    let port = 17231;
    let (dir, img, pids) = dumped("fillrate", port, 256, 1, 0)?;
    for (i, threads) in [(1, 1usize), (2, 2), (3, 1), (4, 2)] {
        let opts = FetcherOptions {
            fill: FillPolicy::Full,
            fill_threads: threads,
            fill_batch_pages: 512,
            ..Default::default()
        };
        let name = format!("fill-{threads}w-{i}");
        let mut r = restore_images(
            &name,
            &img,
            &dir.join(format!("work{i}")),
            pids.clone(),
            opts,
        )?;
        let s = r.wait()?;
        report(&name, &s);
        ensure!(installed(&s) == s.lazy_pages, "{s:?}");
        verify(port)?;
        drop(r);
        wait_gone(&pids, T)?;
    }
    Ok(())
}
