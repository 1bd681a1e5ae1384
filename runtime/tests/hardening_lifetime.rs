//! Lifetime: many checkpoint-then-lazy-restore cycles through ONE long-lived process hosting
//! the fetcher and its uffd keeper, the way a shim does for each restore, with no growth in
//! the process's descriptors, threads or memory, no keeper left behind and no leftover files.
//!
//! Why not through containerd: containerd starts one shim process per container (this shim
//! has no grouping), and a restore is always a new container, so no single shim instance ever
//! sees more than one restore. The per-restore state of a shim is the fetcher (threads, uffds,
//! sockets, the keeper process) and its work dir; this test cycles exactly that in one process.
//!
//! Cycles: `DP_LIFETIME_CYCLES` (default 100, about 200 s on the 2-core test VM; the whole
//! suite stays well under its 30-minute budget). Each is a dump and a lazy restore of 4 MiB. The containerd-level 100 cycles are in shim/tests/e2e_hardening.rs.

mod common;

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Result};
use common::*;
use distriproc_config::FillPolicy;
use distriproc_runtime::fetcher::keeper::{keeper_main, KeeperLink};
use distriproc_runtime::fetcher::{FetcherOptions, LazyPagesServer};
use distriproc_runtime::source::LocalImages;

const ROLE: &str = "DP_LIFETIME_ROLE";

/// Child role: the uffd keeper (descriptor 3 is its link).
#[test]
fn role_keeper() {
    if std::env::var(ROLE).as_deref() != Ok("keeper") {
        return;
    }
    std::process::exit(keeper_main());
}

fn status_field(name: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix(name)
                .and_then(|r| r.trim_start_matches(':').split_whitespace().next())
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

#[derive(Debug, Clone, Copy, PartialEq)]
struct Usage {
    fds: usize,
    threads: u64,
    rss_kib: u64,
}

fn usage() -> Usage {
    Usage {
        fds: std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count()),
        threads: status_field("Threads"),
        rss_kib: status_field("VmRSS"),
    }
}

/// Live (non-zombie) children of this process whose command line runs the keeper role.
fn live_keepers() -> Vec<u32> {
    let me = std::process::id();
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let Some(i) = stat.rfind(')') else { continue };
        let f: Vec<&str> = stat[i + 2..].split_whitespace().collect();
        if f.first() == Some(&"Z") || f.get(1) != Some(&me.to_string().as_str()) {
            continue;
        }
        let env = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
        if env.windows(ROLE.len()).any(|w| w == ROLE.as_bytes()) {
            out.push(pid);
        }
    }
    out
}

fn cycle(dir: &Path, i: usize, port: u16) -> Result<()> {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir)?;
    let mut w = Workload::start(dir, port, 4, 1, 0, false)?;
    let img = dir.join("img");
    let work = dir.join("work");
    std::fs::create_dir_all(&img)?;
    std::fs::create_dir_all(&work)?;
    let pids = dump(&mut w, &img)?;
    let guard = KillOnDrop(pids.clone());
    let opts = FetcherOptions {
        fill: if i.is_multiple_of(2) {
            FillPolicy::Full
        } else {
            FillPolicy::None
        },
        ..FetcherOptions::default()
    };
    let source = Arc::new(LocalImages::open(&img)?);
    let mut cmd = Command::new(std::env::current_exe()?);
    cmd.args(["role_keeper", "--exact", "--test-threads=1"])
        .env(ROLE, "keeper");
    let keeper = Arc::new(KeeperLink::spawn(cmd)?);
    let handle = LazyPagesServer::bind(&work, &img, source, opts)?
        .with_keeper(keeper.clone())
        .spawn()?;
    let out = restore(&img, &work)?;
    if !out.status.success() {
        handle.stop();
        let _ = handle.wait();
        keeper.abandon();
        anyhow::bail!(
            "cycle {i}: criu restore failed\n{}",
            tail(&restore_log(&work), 30)
        );
    }
    let v = query(port, "VERIFY", Duration::from_secs(30))?;
    ensure!(v.starts_with("OK"), "cycle {i}: VERIFY {v}");
    // The container goes away: its tasks exit, the fetcher ends, the keeper is released.
    drop(guard);
    wait_gone(&pids, Duration::from_secs(30))?;
    let r = handle.wait();
    match r {
        Ok(_) => keeper.release(),
        Err(e) => {
            keeper.abandon();
            anyhow::bail!("cycle {i}: fetcher: {e}");
        }
    }
    drop(keeper);
    std::fs::remove_dir_all(dir)?;
    Ok(())
}

#[test]
fn many_lazy_restores_in_one_process_leak_nothing() -> Result<()> {
    if std::env::var_os(ROLE).is_some() || !ready() {
        return Ok(());
    }
    let cycles: usize = std::env::var("DP_LIFETIME_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100);
    let dir = scratch("lifetime");
    let t0 = Instant::now();
    let warmup = 3.min(cycles);
    let mut base = None;
    for i in 0..cycles {
        // A fresh port per cycle: no TIME_WAIT clash with the previous restored process.
        let port = 17500 + u16::try_from(i % 400).unwrap_or(0);
        cycle(&dir.join("c"), i, port)?;
        if i + 1 == warmup {
            base = Some(usage());
        }
        if (i + 1).is_multiple_of(10) {
            eprintln!("cycle {}: {:?} after {:?}", i + 1, usage(), t0.elapsed());
        }
    }
    let end = usage();
    let keepers = live_keepers();
    eprintln!(
        "{cycles} cycles in {:?}: baseline {base:?}, end {end:?}, live keepers {keepers:?}",
        t0.elapsed()
    );
    ensure!(keepers.is_empty(), "keepers still running: {keepers:?}");
    if let Some(b) = base {
        ensure!(end.fds <= b.fds, "descriptors grew: {b:?} -> {end:?}");
        ensure!(end.threads <= b.threads, "threads grew: {b:?} -> {end:?}");
        // The allocator may keep some pages; a leak per cycle would show as far more.
        ensure!(
            end.rss_kib <= b.rss_kib + 16 * 1024,
            "RSS grew by more than 16 MiB: {b:?} -> {end:?}"
        );
    }
    let left: Vec<_> = std::fs::read_dir(&dir)?
        .flatten()
        .map(|e| e.path())
        .collect();
    ensure!(left.is_empty(), "left behind: {left:?}");
    Ok(())
}
