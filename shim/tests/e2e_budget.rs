//! The memory budget through containerd: memhog with 256 MiB, run with the annotation
//! `io.distriproc.memory-budget: 64Mi`, checkpointed and restored lazily; it then reads all its
//! memory several times over while the container's memory cgroup (its `anon` memory, sampled
//! all along) stays within the budget plus 10 %, its checksum stays right and every page
//! verifies, and the stats file shows pages evicted and faulted in again. Then a checkpoint of
//! the restored container, taken while most of its memory is evicted, restores into a third
//! container with every page intact (evicted pages come from the page source's copy). In two
//! shapes: one process with four threads, four processes. Runs on containerd 2.1 and 1.7.
//!
//! With a page server (in-process, loopback; containerd 2.1) and write-back off: pages the
//! restored container wrote stay resident (pinned) under the budget until a checkpoint
//! publishes them; the
//! checkpoint, which leaves the container running, makes the fetcher read from the new layer,
//! after which the written pages are evicted like any other and fault in again with the
//! content they were written with (`VERIFY` knows each page's last write, so a page served
//! from the older layer fails it). With write-back on (the default), the written pages go to
//! the page server as the budget needs room and are evicted without a checkpoint; 2 rewrites of
//! 256 MiB under 64 MiB stay within the budget and verify. `make soak` runs a 1 GiB memhog
//! under 256 MiB for 10 minutes per shape (ignored here).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use distriproc_harness::{
    memhog_query, require_stack_in, stopped_or_traced_thread, wait_for, Containerd, ContainerdOpts,
    CONTAINERD_1_7_DIR, CONTAINERD_2_1_DIR, MEMHOG_IMAGE, MEMHOG_PORT,
};
use distriproc_pageserver::{Server, ServerOptions};

const SHIM: &str = env!("CARGO_BIN_EXE_containerd-shim-distriproc-v2");
const T: Duration = Duration::from_secs(60);
const MIB: u64 = 1 << 20;
const BUDGET: u64 = 64 * MIB;

/// Where the memory of `pid` is accounted: its memory cgroup's `memory.stat`, and the key of
/// its anonymous memory there (`anon` under cgroup v2, `total_rss` under v1's memory
/// controller).
fn memory_stat_of(pid: u32) -> Result<(PathBuf, &'static str)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup"))?;
    for l in text.lines() {
        let mut f = l.splitn(3, ':');
        let (_, ctrl, path) = (f.next(), f.next().unwrap_or(""), f.next().unwrap_or(""));
        if ctrl.split(',').any(|c| c == "memory") {
            let dir = Path::new("/sys/fs/cgroup/memory").join(path.trim_start_matches('/'));
            return Ok((dir.join("memory.stat"), "total_rss"));
        }
    }
    let rel = text
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .context("no memory cgroup")?;
    let dir = Path::new("/sys/fs/cgroup").join(rel.trim_start_matches('/'));
    Ok((dir.join("memory.stat"), "anon"))
}

/// The anonymous memory `memory_stat_of` names, in bytes.
fn cgroup_anon((stat, key): &(PathBuf, &'static str)) -> Result<u64> {
    let text = std::fs::read_to_string(stat).with_context(|| format!("read {}", stat.display()))?;
    text.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
        .with_context(|| format!("no {key} in {}", stat.display()))
}

/// Highest anonymous memory of the cgroup while `f` runs.
fn max_anon_during<F: FnOnce() -> Result<()>>(cg: &(PathBuf, &'static str), f: F) -> Result<u64> {
    let first = cgroup_anon(cg)?;
    let stop = AtomicBool::new(false);
    let max = AtomicU64::new(first);
    let r = std::thread::scope(|sc| {
        sc.spawn(|| {
            while !stop.load(Relaxed) {
                max.fetch_max(cgroup_anon(cg).unwrap_or(0), Relaxed);
                std::thread::sleep(Duration::from_millis(5));
            }
        });
        let r = f();
        stop.store(true, Relaxed);
        r
    });
    r.map(|()| max.load(Relaxed))
}

/// `pid` and its descendants.
fn tree(pid: u32) -> Vec<u32> {
    let mut out = vec![pid];
    let mut i = 0;
    while i < out.len() {
        let kids = std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", out[i]))
            .unwrap_or_default();
        out.extend(
            kids.split_whitespace()
                .filter_map(|k| k.parse::<u32>().ok()),
        );
        i += 1;
    }
    out
}

fn n(v: &serde_json::Value, k: &str) -> u64 {
    v[k].as_u64().unwrap_or(0)
}

fn one_shape(ctd: &Containerd, name: &str, procs: &str, threads: &str) -> Result<()> {
    let (id, restored, again) = (
        format!("b-{name}"),
        format!("b-{name}-r"),
        format!("b-{name}-r2"),
    );
    let (image, image2) = (
        format!("localhost/b-{name}-cp:1"),
        format!("localhost/b-{name}-cp:2"),
    );
    let budget = format!("io.distriproc.memory-budget={}Mi", BUDGET / MIB);
    ctd.run_detached(
        &[budget.as_str()],
        MEMHOG_IMAGE,
        &id,
        &[
            "/memhog",
            "serve",
            "--mib",
            "256",
            "--procs",
            procs,
            "--threads",
            threads,
            "--zero-pct",
            "5",
        ],
        T,
    )?;
    let pid = ctd.task_pid(&id)?;
    let sum = memhog_query(pid, MEMHOG_PORT, "SUM")?;
    ensure!(
        sum == memhog_query(pid, MEMHOG_PORT, "EXPECT")?,
        "{name}: SUM before"
    );
    ctd.checkpoint_and_remove(&id, &image, T)?;

    ctd.ctr_ok(&["containers", "restore", "--live", &restored, &image])?;
    ctd.wait_status(&restored, "RUNNING", T)?;
    let pid = ctd.task_pid(&restored)?;
    let cg = memory_stat_of(pid)?;
    let t0 = Instant::now();
    let max = max_anon_during(&cg, || {
        for i in 0..3 {
            let s = memhog_query(pid, MEMHOG_PORT, "SUM")?;
            ensure!(s == sum, "{name}: SUM {i} after restore {s} != {sum}");
        }
        let v = memhog_query(pid, MEMHOG_PORT, "VERIFY")?;
        ensure!(v.starts_with("OK"), "{name}: VERIFY under the budget: {v}");
        Ok(())
    })?;
    let stats = ctd.lazy_stats(&restored)?;
    eprintln!(
        "{name}: 3 SUMs + VERIFY in {:?}, cgroup anon at most {} MiB (budget {} MiB): {stats}",
        t0.elapsed(),
        max / MIB,
        BUDGET / MIB
    );
    ensure!(
        n(&stats, "budget_pages") == BUDGET / 4096,
        "{name}: budget not applied: {stats}"
    );
    ensure!(
        n(&stats, "pages_evicted") > 0 && n(&stats, "refaults") > 0,
        "{name}: nothing evicted: {stats}"
    );
    ensure!(n(&stats, "evict_refused") == 0, "{name}: {stats}");
    // memhog's own anonymous memory besides its 256 MiB (stacks, tables) is a few MiB; the
    // workload read all 256 MiB, so the reading must be above the budget's fill share.
    ensure!(
        max > BUDGET / 2,
        "{name}: the cgroup's anon memory reads {max} bytes"
    );
    ensure!(
        max <= BUDGET + BUDGET / 10 + 8 * MIB,
        "{name}: the cgroup's anon memory reached {} MiB",
        max / MIB
    );
    ensure!(ctd.status(&restored) == "RUNNING", "{name}: not running");
    // Between batches no thread of the container is stopped or traced.
    ensure!(
        wait_for(
            || stopped_or_traced_thread(&tree(pid)).is_none(),
            Duration::from_secs(5)
        ),
        "{name}: a thread of the container stays stopped or traced"
    );

    // A checkpoint while most of the memory is evicted, restored again. (containerd 1.7
    // cannot checkpoint over the stored spec blob of the image the container came from, see
    // docs/INTEGRATIONS.md; the restore holds its pages' store entry by a lease.)
    ctd.ctr_ok(&["images", "rm", "--sync", &image])?;
    ctd.ctr_ok(&["containers", "checkpoint", "--task", &restored, &image2])?;
    ctd.remove_container(&restored, T)?;
    ctd.ctr_ok(&["containers", "restore", "--live", &again, &image2])?;
    ctd.wait_status(&again, "RUNNING", T)?;
    let pid = ctd.task_pid(&again)?;
    let v = memhog_query(pid, MEMHOG_PORT, "VERIFY")?;
    ensure!(
        v.starts_with("OK"),
        "{name}: VERIFY after the checkpoint under a budget: {v}"
    );
    let s = memhog_query(pid, MEMHOG_PORT, "SUM")?;
    ensure!(
        s == sum,
        "{name}: SUM after the second restore {s} != {sum}"
    );
    ctd.remove_container(&again, T)?;
    ctd.ctr_ok(&["images", "rm", &image2])?;
    Ok(())
}

/// Whether a lazy test can run on the containerd in `dir` (says why not when it cannot).
fn lazy_stack_in(dir: &str) -> bool {
    if std::env::var_os("DISTRIPROC_EAGER_RESTORE").is_some() {
        eprintln!("SKIPPED: lazy test with DISTRIPROC_EAGER_RESTORE set");
        return false;
    }
    require_stack_in(Path::new(dir))
}

fn memory_budget(dir: &str) -> Result<()> {
    if !lazy_stack_in(dir) {
        return Ok(());
    }
    let ctd = Containerd::start(ContainerdOpts::with_containerd_dir(dir).shim(SHIM))?;
    ctd.import_test_images()?;
    for (name, procs, threads) in [("threads", "1", "4"), ("procs", "4", "1")] {
        one_shape(&ctd, name, procs, threads).with_context(|| format!("shape {name}"))?;
    }
    Ok(())
}

#[test]
fn memory_budget_ctd21() -> Result<()> {
    memory_budget(CONTAINERD_2_1_DIR)
}

#[test]
fn memory_budget_ctd17() -> Result<()> {
    memory_budget(CONTAINERD_1_7_DIR)
}

/// The restored memhog's memory, its share rewritten after the restore, and its budget.
const REMOTE_MIB: u64 = 256;
const REMOTE_WRITE_PCT: u64 = 10;

/// An in-process page server on loopback (with a token) and containerd 2.1 whose shim
/// publishes checkpoints to it. Fields drop in order: containerd, the server, its store.
struct WithPageServer {
    ctd: Containerd,
    _srv: distriproc_pageserver::ServerHandle,
    dir: tempfile::TempDir,
}

fn with_page_server() -> Result<WithPageServer> {
    let dir = tempfile::Builder::new()
        .prefix("dp-e2e-budget-ps-")
        .tempdir()?;
    let store = dir.path().join("store");
    std::fs::create_dir_all(&store)?;
    let mut so = ServerOptions::for_store(store);
    so.listen = vec!["127.0.0.1:0".into()];
    so.token = Some("e2e-budget-token".into());
    let srv = Server::start(so)?;
    let token = dir.path().join("token");
    std::fs::write(&token, "e2e-budget-token\n")?;
    let cfg = dir.path().join("shim.toml");
    std::fs::write(
        &cfg,
        format!(
            "[pageserver]\naddress = \"{}\"\ntoken_file = \"{}\"\n",
            srv.addrs()[0],
            token.display()
        ),
    )?;
    let mut opts = ContainerdOpts::with_containerd_dir(CONTAINERD_2_1_DIR).shim(SHIM);
    opts.env
        .push(("DISTRIPROC_CONFIG".into(), cfg.display().to_string()));
    let ctd = Containerd::start(opts)?;
    ctd.import_test_images()?;
    Ok(WithPageServer {
        ctd,
        _srv: srv,
        dir,
    })
}

#[test]
fn written_pages_evict_once_a_checkpoint_published_them_ctd21() -> Result<()> {
    if !lazy_stack_in(CONTAINERD_2_1_DIR) {
        return Ok(());
    }
    let env = with_page_server()?;
    let ctd = &env.ctd;
    let budget = format!("io.distriproc.memory-budget={}Mi", BUDGET / MIB);
    let mib = REMOTE_MIB.to_string();
    // Without write-back, which would publish the written pages before the checkpoint does.
    ctd.run_detached(
        &[budget.as_str(), "io.distriproc.writeback=false"],
        MEMHOG_IMAGE,
        "bw",
        &[
            "/memhog",
            "serve",
            "--mib",
            &mib,
            "--threads",
            "2",
            "--zero-pct",
            "5",
        ],
        T,
    )?;
    // (SUM answers once memhog filled its memory: the checkpoint holds all of it.)
    let pid = ctd.task_pid("bw")?;
    let s = memhog_query(pid, MEMHOG_PORT, "SUM")?;
    ensure!(s == memhog_query(pid, MEMHOG_PORT, "EXPECT")?, "SUM before");
    ctd.checkpoint_and_remove("bw", "localhost/bw-cp:1", T)?;
    ctd.ctr_ok(&[
        "containers",
        "restore",
        "--live",
        "bw-r",
        "localhost/bw-cp:1",
    ])?;
    ctd.wait_status("bw-r", "RUNNING", T)?;
    let pid = ctd.task_pid("bw-r")?;
    let w = memhog_query(pid, MEMHOG_PORT, &format!("WRITE {REMOTE_WRITE_PCT}"))?;
    ensure!(w.starts_with("OK"), "WRITE: {w}");
    let expect = memhog_query(pid, MEMHOG_PORT, "EXPECT")?;
    let written = REMOTE_MIB * 256 * REMOTE_WRITE_PCT / 100; // pages
                                                             // Before any checkpoint the written pages have no current copy at the page server.
    let s = memhog_query(pid, MEMHOG_PORT, "SUM")?;
    ensure!(s == expect, "SUM after WRITE {s} != {expect}");
    // Every page the fetcher manages that was written (a write-protect fault each) is pinned.
    // (The stats file is rewritten every second or so. Pages CRIU restored eagerly, a stack
    // page or so, are not the fetcher's.)
    let (pinned, wp) = (
        |v: &serde_json::Value| n(v, "pinned_pages"),
        |v: &serde_json::Value| n(v, "pages_written"),
    );
    wait_for(
        || {
            ctd.lazy_stats("bw-r")
                .is_ok_and(|v| wp(&v) >= written * 9 / 10 && pinned(&v) >= wp(&v))
        },
        Duration::from_secs(10),
    );
    let before = ctd.lazy_stats("bw-r")?;
    ensure!(
        n(&before, "budget_pages") == BUDGET / 4096,
        "budget not applied: {before}"
    );
    ensure!(
        wp(&before) >= written * 9 / 10 && pinned(&before) >= wp(&before),
        "the written pages are not pinned: {before}"
    );

    // A checkpoint that leaves the container running publishes them as a layer, which the
    // fetcher then reads from.
    ctd.ctr_ok(&[
        "containers",
        "checkpoint",
        "--task",
        "bw-r",
        "localhost/bw-cp:2",
    ])?;
    ensure!(
        ctd.status("bw-r") == "RUNNING",
        "the checkpoint stopped the container"
    );
    ensure!(
        ctd.log_text().contains("the fetcher reads from"),
        "no rebase in the shim's log: {}",
        ctd.log_tail(30)
    );
    let cg = memory_stat_of(pid)?;
    let max = max_anon_during(&cg, || {
        for i in 0..3 {
            let s = memhog_query(pid, MEMHOG_PORT, "SUM")?;
            ensure!(s == expect, "SUM {i} after the checkpoint {s} != {expect}");
        }
        let v = memhog_query(pid, MEMHOG_PORT, "VERIFY")?;
        ensure!(v.starts_with("OK"), "VERIFY after the checkpoint: {v}");
        Ok(())
    })?;
    wait_for(
        || {
            ctd.lazy_stats("bw-r")
                .is_ok_and(|v| pinned(&v) < wp(&before) / 4)
        },
        Duration::from_secs(10),
    );
    let after = ctd.lazy_stats("bw-r")?;
    eprintln!(
        "before the checkpoint: {before}\nafter it: {after}\nanon at most {} MiB",
        max / MIB
    );
    // Zero pages (5 %) stay pinned; the written ones are evictable now.
    ensure!(
        pinned(&after) < wp(&before) / 4,
        "written pages still pinned after the checkpoint: {after}"
    );
    ensure!(
        n(&after, "pages_evicted") > n(&before, "pages_evicted"),
        "nothing evicted after the checkpoint: {after}"
    );
    ensure!(
        max <= BUDGET + BUDGET / 10 + 8 * MIB,
        "the cgroup's anon memory reached {} MiB",
        max / MIB
    );
    ctd.remove_container("bw-r", T)?;
    Ok(())
}

/// Write-back layers in the page server's store.
fn writeback_layers_in(store: &Path) -> usize {
    std::fs::read_dir(store)
        .map(|d| {
            d.flatten()
                .filter(|e| e.path().join("distriproc-writeback").is_file())
                .count()
        })
        .unwrap_or(0)
}

/// Rewrites of every page after the restore in [`written_pages_are_written_back_and_evicted_ctd21`].
const WRITEBACK_PASSES: u64 = 2;

/// With write-back (the budget's pressure, and an interval): memhog rewrites all of its
/// 256 MiB twice under a 64 MiB budget. The written pages go to the page server as
/// write-back layers and are evicted, the cgroup's anon memory stays within the budget plus
/// 10 %, every page reads back with its last write (`VERIFY` fails on a page served from an
/// older layer), superseded write-back layers are squashed away, and a checkpoint taken
/// afterwards (a layer over the write-back layers) restores into a new container intact.
#[test]
fn written_pages_are_written_back_and_evicted_ctd21() -> Result<()> {
    if !lazy_stack_in(CONTAINERD_2_1_DIR) {
        return Ok(());
    }
    let env = with_page_server()?;
    let (ctd, store) = (&env.ctd, env.dir.path().join("store"));
    let mib = REMOTE_MIB.to_string();
    // (Annotations go with the checkpoint to the restored container.)
    let budget = format!("io.distriproc.memory-budget={}Mi", BUDGET / MIB);
    ctd.run_detached(
        &[budget.as_str(), "io.distriproc.writeback-interval-ms=1000"],
        MEMHOG_IMAGE,
        "wb",
        &["/memhog", "serve", "--mib", &mib, "--threads", "2"],
        T,
    )?;
    let pid = ctd.task_pid("wb")?;
    // (SUM answers once memhog filled its memory: the checkpoint holds all of it.)
    let s = memhog_query(pid, MEMHOG_PORT, "SUM")?;
    ensure!(s == memhog_query(pid, MEMHOG_PORT, "EXPECT")?, "SUM before");
    ctd.checkpoint_and_remove("wb", "localhost/wb-cp:1", T)?;
    ctd.ctr_ok(&[
        "containers",
        "restore",
        "--live",
        "wb-r",
        "localhost/wb-cp:1",
    ])?;
    ctd.wait_status("wb-r", "RUNNING", T)?;
    let pid = ctd.task_pid("wb-r")?;
    let cg = memory_stat_of(pid)?;
    let t0 = Instant::now();
    let max = max_anon_during(&cg, || {
        for i in 0..WRITEBACK_PASSES * 100 / REMOTE_WRITE_PCT {
            let w = memhog_query(pid, MEMHOG_PORT, &format!("WRITE {REMOTE_WRITE_PCT}"))?;
            ensure!(w.starts_with("OK"), "WRITE {i}: {w}");
        }
        let expect = memhog_query(pid, MEMHOG_PORT, "EXPECT")?;
        let s = memhog_query(pid, MEMHOG_PORT, "SUM")?;
        ensure!(s == expect, "SUM after the writes {s} != {expect}");
        let v = memhog_query(pid, MEMHOG_PORT, "VERIFY")?;
        ensure!(v.starts_with("OK"), "VERIFY after the writes: {v}");
        Ok(())
    })?;
    let took = t0.elapsed();
    let st = ctd.lazy_stats("wb-r")?;
    eprintln!(
        "{WRITEBACK_PASSES} rewrites of {REMOTE_MIB} MiB, SUM and VERIFY in {took:?}; anon at \
         most {} MiB; write-back layers in the store: {}; stats: {st}",
        max / MIB,
        writeback_layers_in(&store)
    );
    ensure!(
        n(&st, "budget_pages") == BUDGET / 4096,
        "budget not applied: {st}"
    );
    // More was written than fits: most of it went to the page server and was evicted.
    let total = REMOTE_MIB * 256;
    ensure!(
        n(&st, "pages_written_back") >= total - BUDGET / 4096,
        "too few pages written back: {st}"
    );
    ensure!(
        n(&st, "writeback_layers") >= 2 && n(&st, "pages_evicted") >= total,
        "no write-back and eviction: {st}"
    );
    ensure!(
        max <= BUDGET + BUDGET / 10 + 8 * MIB,
        "the cgroup's anon memory reached {} MiB",
        max / MIB
    );
    // Superseded write-back layers are squashed into the newest.
    let layers = n(&st, "writeback_layers");
    wait_for(|| writeback_layers_in(&store) <= 5, Duration::from_secs(20));
    ensure!(
        writeback_layers_in(&store) <= 5,
        "{} write-back layers in the store of {layers} published",
        writeback_layers_in(&store)
    );

    // A checkpoint now is a layer over the write-back layers; it restores intact.
    ctd.checkpoint_and_remove("wb-r", "localhost/wb-cp:2", T)?;
    ctd.ctr_ok(&[
        "containers",
        "restore",
        "--live",
        "wb-r2",
        "localhost/wb-cp:2",
    ])?;
    ctd.wait_status("wb-r2", "RUNNING", T)?;
    let pid = ctd.task_pid("wb-r2")?;
    let v = memhog_query(pid, MEMHOG_PORT, "VERIFY")?;
    ensure!(
        v.starts_with("OK"),
        "VERIFY of the checkpoint over write-back: {v}"
    );
    ensure!(
        wait_for(
            || stopped_or_traced_thread(&tree(pid)).is_none(),
            Duration::from_secs(5)
        ),
        "a thread of the restored memhog stays stopped or traced"
    );
    ctd.remove_container("wb-r2", T)?;
    Ok(())
}

/// Memory of the soaked memhog, its budget, and how long it runs (`SOAK_SECS`, default 600).
const SOAK_MIB: u64 = 1024;
const SOAK_BUDGET: u64 = 256 * MIB;

fn soak_secs() -> u64 {
    std::env::var("SOAK_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(600)
}

/// The soak (`make soak`; not in `make test`): a 1 GiB memhog restored from the page server
/// under `io.distriproc.memory-budget: 256Mi` with write-back every 5 s rewrites and reads
/// pages spread over all of its memory (`WRITE 10`, `TOUCH 25`: every 100th page block, the
/// residue moving each time) for `SOAK_SECS`, with SUM checked every minute. The cgroup's
/// anon memory, sampled every 5 ms, never exceeds the budget plus 10 %; at the end SUM and
/// VERIFY are right, no thread is stopped or traced, and the container goes away with its
/// write-back directories.
fn soak(name: &str, procs: &str, threads: &str) -> Result<()> {
    if !lazy_stack_in(CONTAINERD_2_1_DIR) {
        return Ok(());
    }
    let env = with_page_server()?;
    let ctd = &env.ctd;
    let (id, restored) = (format!("soak-{name}"), format!("soak-{name}-r"));
    let image = format!("localhost/soak-{name}-cp:1");
    let budget = format!("io.distriproc.memory-budget={}Mi", SOAK_BUDGET / MIB);
    let mib = SOAK_MIB.to_string();
    ctd.run_detached(
        &[budget.as_str(), "io.distriproc.writeback-interval-ms=5000"],
        MEMHOG_IMAGE,
        &id,
        &[
            "/memhog",
            "serve",
            "--mib",
            &mib,
            "--procs",
            procs,
            "--threads",
            threads,
        ],
        T,
    )?;
    let pid = ctd.task_pid(&id)?;
    let s = memhog_query(pid, MEMHOG_PORT, "SUM")?;
    ensure!(s == memhog_query(pid, MEMHOG_PORT, "EXPECT")?, "SUM before");
    ctd.checkpoint_and_remove(&id, &image, T)?;
    ctd.ctr_ok(&["containers", "restore", "--live", &restored, &image])?;
    ctd.wait_status(&restored, "RUNNING", T)?;
    let pid = ctd.task_pid(&restored)?;
    let cg = memory_stat_of(pid)?;
    let secs = soak_secs();
    let (mut writes, mut sums) = (0u64, 0u64);
    let t0 = Instant::now();
    let max = max_anon_during(&cg, || {
        let mut last_sum = Instant::now();
        // (Ends after the round that passes SOAK_SECS.)
        while t0.elapsed() < Duration::from_secs(secs) {
            let w = memhog_query(pid, MEMHOG_PORT, "WRITE 10")?;
            ensure!(w.starts_with("OK"), "WRITE {writes}: {w}");
            let r = memhog_query(pid, MEMHOG_PORT, "TOUCH 25")?;
            ensure!(r.starts_with("OK"), "TOUCH: {r}");
            writes += 1;
            if last_sum.elapsed() >= Duration::from_secs(60) {
                let (s, e) = (
                    memhog_query(pid, MEMHOG_PORT, "SUM")?,
                    memhog_query(pid, MEMHOG_PORT, "EXPECT")?,
                );
                ensure!(s == e, "SUM after {writes} writes {s} != {e}");
                sums += 1;
                last_sum = Instant::now();
            }
        }
        let (s, e) = (
            memhog_query(pid, MEMHOG_PORT, "SUM")?,
            memhog_query(pid, MEMHOG_PORT, "EXPECT")?,
        );
        ensure!(s == e, "SUM at the end {s} != {e}");
        let v = memhog_query(pid, MEMHOG_PORT, "VERIFY")?;
        ensure!(v.starts_with("OK"), "VERIFY at the end: {v}");
        Ok(())
    })?;
    let st = ctd.lazy_stats(&restored)?;
    eprintln!(
        "soak {name}: {:?}, {writes} x (WRITE 10, TOUCH 25), {sums} SUMs on the way; anon at \
         most {} MiB (budget {} MiB); stats: {st}",
        t0.elapsed(),
        max / MIB,
        SOAK_BUDGET / MIB
    );
    ensure!(
        max <= SOAK_BUDGET + SOAK_BUDGET / 10,
        "the cgroup's anon memory reached {} MiB",
        max / MIB
    );
    ensure!(
        n(&st, "writeback_layers") > 0 && n(&st, "pages_evicted") > 0,
        "no write-back or eviction: {st}"
    );
    // Between batches no thread of the container is stopped or traced.
    ensure!(
        wait_for(
            || stopped_or_traced_thread(&tree(pid)).is_none(),
            Duration::from_secs(5)
        ),
        "a thread of the soaked memhog stays stopped or traced"
    );
    let work = ctd.bundle_dir(&restored).join("work");
    ctd.remove_container(&restored, T)?;
    let left: Vec<_> = std::fs::read_dir(&work)
        .map(|d| {
            d.flatten()
                .filter(|e| e.file_name().to_string_lossy().starts_with("writeback-"))
                .map(|e| e.path())
                .collect()
        })
        .unwrap_or_default();
    ensure!(left.is_empty(), "write-back directories left: {left:?}");
    Ok(())
}

#[test]
#[ignore = "a 10-minute soak: make soak"]
fn soak_1gib_under_256mib_threads_ctd21() -> Result<()> {
    soak("threads", "1", "4")
}

#[test]
#[ignore = "a 10-minute soak: make soak"]
fn soak_1gib_under_256mib_procs_ctd21() -> Result<()> {
    soak("procs", "4", "1")
}
