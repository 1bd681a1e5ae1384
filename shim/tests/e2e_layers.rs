//! Remote-resident migration through `ctr` with checkpoint layers at the page server, on a
//! private containerd (2.1 and 1.7), real runc, CRIU, userfaultfd and `distriproc-pageserver`
//! (in-process, loopback):
//!
//! 1. a 1 GiB, 2-process memhog is checkpointed to the page server (the base layer);
//! 2. each cycle restores the last checkpoint lazily with fill `none`, rewrites 10 % of the
//!    pages (`WRITE 10`: a different tenth each cycle, so pages come from every depth of the
//!    chain) and checkpoints it again while the rest is still remote: the new checkpoint must
//!    be a layer over the one it was restored from (a `parent` link in the store, chain depth
//!    = cycle + 1), the checkpoint must pull < 1 % of the memory from the page server, and the
//!    store must grow by about the pages the container wrote (the fetcher's write tracking),
//!    not by what it read or by its memory;
//! 3. the last layer restores with every page right: `VERIFY` (the generator's content for
//!    each page's last write, so a zero-filled or stale page fails) and `SUM == EXPECT`;
//! 4. a page server stopped mid-upload fails the checkpoint at `ctr` with a clear error,
//!    leaves no partial checkpoint in the store (and none under `incoming/`), the container
//!    runs on, and the previous layer still restores intact once the server is back;
//! 5. (2.1) retention: every checkpoint but the newest deleted, one gc run squashes the chain
//!    into the newest layer (depth 1, about the memory's size stored), which restores with
//!    every page right and takes a new layer over it.
//!
//! Skips with a reason when the stack is missing (fails instead when `CI=true`).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use distriproc_harness::{
    memhog_query, memhog_query_timeout, require_stack_in, wait_for, Containerd, ContainerdOpts,
    CONTAINERD_1_7_DIR, CONTAINERD_2_1_DIR, MEMHOG_IMAGE, MEMHOG_PORT,
};
use distriproc_pageserver::{Server, ServerHandle, ServerOptions};

const SHIM: &str = env!("CARGO_BIN_EXE_containerd-shim-distriproc-v2");
const STATUS_TIMEOUT: Duration = Duration::from_secs(60);
const TOKEN: &str = "e2e-layers-token";
const MIB: u64 = 1024;
const PAGES: u64 = MIB * 256;
/// Share of the pages each cycle rewrites.
const WRITE_PCT: u64 = 10;

fn server(store: &Path, listen: &str) -> Result<ServerHandle> {
    let mut o = ServerOptions::for_store(store.to_path_buf());
    o.listen = vec![listen.to_string()];
    o.token = Some(TOKEN.into());
    // The chain of 20 migrations is kept whole here (flattening is tested in the page
    // server's own tests); with the default a layer deeper than 16 is made self-contained.
    o.flatten_depth = None;
    Ok(Server::start(o)?)
}

fn write_config(dir: &Path, address: &str) -> Result<PathBuf> {
    let tf = dir.join("token");
    std::fs::write(&tf, format!("{TOKEN}\n"))?;
    let cfg = dir.join("shim.toml");
    std::fs::write(
        &cfg,
        format!(
            "[pageserver]\naddress = \"{address}\"\ntoken_file = \"{}\"\n\
             connect_timeout_ms = 2000\nio_timeout_ms = 10000\nretry_timeout_ms = 3000\n",
            tf.display()
        ),
    )?;
    Ok(cfg)
}

/// Checkpoint ids in the store.
fn stored(store: &Path) -> BTreeSet<String> {
    std::fs::read_dir(store)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.path().is_dir())
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| !n.starts_with('.'))
        .collect()
}

/// Bytes of the files of one stored checkpoint (its own, not its parents').
fn layer_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.len())
        .sum()
}

/// The ids of the chain from `id` down to its base, newest first.
fn chain(store: &Path, id: &str) -> Result<Vec<String>> {
    let mut out = vec![id.to_string()];
    let mut at = store.join(id);
    while let Ok(link) = std::fs::read_link(at.join("parent")) {
        let name = link
            .file_name()
            .and_then(|n| n.to_str())
            .context("parent link name")?
            .to_string();
        ensure!(
            link == Path::new("..").join(&name),
            "{}: parent link {link:?} is not ../<id>",
            at.display()
        );
        ensure!(out.len() < 64, "parent chain of {id} loops");
        out.push(name.clone());
        at = store.join(name);
    }
    Ok(out)
}

/// The single new checkpoint id in the store since `before`.
fn new_id(store: &Path, before: &BTreeSet<String>) -> Result<String> {
    let now = stored(store);
    let new: Vec<&String> = now.difference(before).collect();
    ensure!(new.len() == 1, "expected one new checkpoint, found {new:?}");
    Ok(new[0].clone())
}

/// The fetcher's remote bytes of container `id` once its stats file was rewritten.
fn fetched_bytes(ctd: &Containerd, id: &str) -> Result<u64> {
    std::thread::sleep(Duration::from_millis(1200));
    let s = ctd.lazy_stats(id)?;
    s["bytes"].as_u64().context("stats bytes")
}

fn layers(containerd_dir: &str, cycles: usize) -> Result<()> {
    if std::env::var_os("DISTRIPROC_EAGER_RESTORE").is_some() {
        eprintln!("SKIPPED: lazy test with DISTRIPROC_EAGER_RESTORE set");
        return Ok(());
    }
    if !require_stack_in(Path::new(containerd_dir)) {
        return Ok(());
    }
    let dir = tempfile::Builder::new()
        .prefix("dp-e2e-layers-")
        .tempdir()?;
    let store = dir.path().join("store");
    std::fs::create_dir_all(&store)?;
    let mut srv = Some(server(&store, "127.0.0.1:0")?);
    let addr = srv.as_ref().context("server")?.addrs()[0].clone();
    let cfg = write_config(dir.path(), &addr)?;
    let mut opts = ContainerdOpts::with_containerd_dir(containerd_dir).shim(SHIM);
    opts.env
        .push(("DISTRIPROC_CONFIG".into(), cfg.display().to_string()));
    let ctd = Containerd::start(opts)?;
    ctd.import_test_images()?;
    let ctd1 = !ctd.version().starts_with('2');

    ctd.run_detached(
        &["io.distriproc.fill-policy=none"],
        MEMHOG_IMAGE,
        "l0",
        &[
            "/memhog",
            "serve",
            "--mib",
            &MIB.to_string(),
            "--procs",
            "2",
        ],
        STATUS_TIMEOUT,
    )?;
    let pid = ctd.task_pid("l0")?;
    ensure!(memhog_query_timeout(pid, MEMHOG_PORT, "PING", STATUS_TIMEOUT)? == "PONG");
    let before = stored(&store);
    let t0 = Instant::now();
    ctd.ctr_ok(&[
        "containers",
        "checkpoint",
        "--task",
        "l0",
        "localhost/l-cp:0",
    ])?;
    let first = t0.elapsed();
    let mut top = new_id(&store, &before)?;
    eprintln!(
        "first checkpoint of {MIB} MiB in {first:?}: {top}, {} MiB stored",
        layer_bytes(&store.join(&top)) >> 20
    );
    ctd.remove_container("l0", STATUS_TIMEOUT)?;

    let mut written_total = 0u64;
    for i in 1..=cycles {
        let (id, prev, next) = (
            format!("l{i}"),
            format!("localhost/l-cp:{}", i - 1),
            format!("localhost/l-cp:{i}"),
        );
        ctd.ctr_ok(&["containers", "restore", "--live", &id, &prev])?;
        ctd.wait_status(&id, "RUNNING", STATUS_TIMEOUT)?;
        let pid = ctd.task_pid(&id)?;
        let w = memhog_query_timeout(
            pid,
            MEMHOG_PORT,
            &format!("WRITE {WRITE_PCT}"),
            STATUS_TIMEOUT,
        )?;
        let written: u64 = w
            .strip_prefix("OK pages=")
            .and_then(|n| n.parse().ok())
            .with_context(|| format!("cycle {i}: WRITE answered {w:?}"))?;
        ensure!(
            written.abs_diff(PAGES * WRITE_PCT / 100) < PAGES / 100,
            "cycle {i}: WRITE {WRITE_PCT} rewrote {written} of {PAGES} pages"
        );
        written_total += written;
        if ctd1 {
            // containerd 1.7 cannot checkpoint over the stored spec blob of the image the
            // container came from (docs/INTEGRATIONS.md).
            ctd.ctr_ok(&["images", "rm", "--sync", &prev])?;
        }
        let pulled_before = fetched_bytes(&ctd, &id)?;
        let before = stored(&store);
        let t0 = Instant::now();
        ctd.ctr_ok(&["containers", "checkpoint", "--task", &id, &next])?;
        let took = t0.elapsed();
        let new = new_id(&store, &before)?;
        let pulled = fetched_bytes(&ctd, &id)?.saturating_sub(pulled_before);
        let grew = layer_bytes(&store.join(&new));
        let depth = chain(&store, &new)?;
        eprintln!(
            "cycle {i}: {written} pages rewritten, checkpoint in {took:?}: layer {new} over \
             {}, {} MiB stored ({:.1} % of the memory), {pulled} bytes pulled, depth {}",
            depth.get(1).map_or("-", String::as_str),
            grew >> 20,
            grew as f64 * 100.0 / (MIB << 20) as f64,
            depth.len()
        );
        ensure!(
            depth.get(1) == Some(&top) && depth.len() == i + 1,
            "cycle {i}: {new} should be a layer over {top} at depth {}: chain {depth:?}",
            i + 1
        );
        ensure!(
            pulled < (MIB << 20) / 100,
            "cycle {i}: the checkpoint pulled {pulled} bytes from the page server (limit 1 %)"
        );
        // The layer holds the pages the container wrote (the fetcher tracks writes; the pages
        // its read-ahead installed and the container only read stay with the parent), plus
        // CRIU's metadata: never the memory again.
        ensure!(
            grew >= written * 4096 && grew <= written * 4096 * 11 / 10 + (8 << 20),
            "cycle {i}: the store grew by {grew} bytes for {written} rewritten pages; \
             fetcher {}\n{}",
            ctd.lazy_stats(&id)?,
            ctd.log_tail(30)
        );
        let tracked = ctd.lazy_stats(&id)?["pages_written"].as_u64().unwrap_or(0);
        ensure!(
            tracked >= written,
            "cycle {i}: the fetcher saw {tracked} first writes for {written} rewritten pages"
        );
        ctd.wait_status(&id, "RUNNING", STATUS_TIMEOUT)?;
        ctd.remove_container(&id, STATUS_TIMEOUT)?;
        top = new;
    }

    // Every page of the last layer, through the chain.
    let last = format!("localhost/l-cp:{cycles}");
    ctd.ctr_ok(&["containers", "restore", "--live", "lz", &last])?;
    ctd.wait_status("lz", "RUNNING", STATUS_TIMEOUT)?;
    let pid = ctd.task_pid("lz")?;
    let verify = memhog_query_timeout(pid, MEMHOG_PORT, "VERIFY", STATUS_TIMEOUT)?;
    ensure!(
        verify == format!("OK pages={PAGES}"),
        "VERIFY after {cycles} layers: {verify}"
    );
    let sum = memhog_query_timeout(pid, MEMHOG_PORT, "SUM", STATUS_TIMEOUT)?;
    let expect = memhog_query_timeout(pid, MEMHOG_PORT, "EXPECT", STATUS_TIMEOUT)?;
    ensure!(
        sum == expect,
        "SUM {sum} != EXPECT {expect} after {cycles} layers"
    );
    eprintln!("{cycles} layers ({written_total} pages rewritten in all): {verify}, {sum}");
    ctd.remove_container("lz", STATUS_TIMEOUT)?;

    // The page server stops while a checkpoint is uploading.
    ctd.ctr_ok(&["containers", "restore", "--live", "lk", &last])?;
    ctd.wait_status("lk", "RUNNING", STATUS_TIMEOUT)?;
    let pid = ctd.task_pid("lk")?;
    memhog_query_timeout(pid, MEMHOG_PORT, "WRITE 60", STATUS_TIMEOUT)?;
    if ctd1 {
        ctd.ctr_ok(&["images", "rm", "--sync", &last])?;
    }
    let before = stored(&store);
    let incoming = store.join(".distriproc/incoming");
    let ctr = {
        let (sock, ns) = (ctd.socket().to_path_buf(), ctd.namespace().to_string());
        let ctr_bin = ctd.containerd_dir().join("ctr");
        std::thread::spawn(move || {
            std::process::Command::new(ctr_bin)
                .arg("--address")
                .arg(sock)
                .args(["-n", &ns, "containers", "checkpoint", "--task", "lk"])
                .arg("localhost/l-cp:cut")
                .output()
        })
    };
    let uploading = wait_for(
        || {
            std::fs::read_dir(&incoming)
                .into_iter()
                .flatten()
                .flatten()
                .any(|e| e.file_name().to_string_lossy().ends_with(".upload"))
        },
        STATUS_TIMEOUT,
    );
    ensure!(uploading, "no upload started:\n{}", ctd.log_tail(30));
    if let Some(s) = srv.take() {
        s.shutdown();
    }
    let out = ctr.join().map_err(|_| anyhow::anyhow!("ctr thread"))??;
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    ensure!(
        !out.status.success() && stderr.contains("page server"),
        "checkpoint with the page server stopped mid-upload: {:?} {stderr}",
        out.status
    );
    eprintln!(
        "checkpoint cut by the page server's stop: {}",
        stderr.trim()
    );
    ensure!(
        stored(&store) == before,
        "a partial checkpoint is visible in the store: {:?}",
        stored(&store).difference(&before).collect::<Vec<_>>()
    );
    ensure!(
        std::fs::read_dir(&incoming).map_or(0, |d| d.count()) == 0,
        "the cut upload left files under {}",
        incoming.display()
    );
    ctd.wait_status("lk", "RUNNING", STATUS_TIMEOUT)?;
    ctd.remove_container("lk", STATUS_TIMEOUT)?;
    // The server is back on the same store and address: the previous layer is intact.
    let back = server(&store, &addr)?;
    if ctd1 {
        // The image was removed for the cut checkpoint; the layer is still at the server.
        ensure!(
            stored(&store).contains(&top),
            "{top} is gone from the store"
        );
    } else {
        ctd.ctr_ok(&["containers", "restore", "--live", "lb", &last])?;
        ctd.wait_status("lb", "RUNNING", STATUS_TIMEOUT)?;
        let pid = ctd.task_pid("lb")?;
        let verify = memhog_query_timeout(pid, MEMHOG_PORT, "VERIFY", STATUS_TIMEOUT)?;
        ensure!(
            verify.starts_with("OK"),
            "VERIFY of {last} after the cut upload: {verify}"
        );
        ensure!(memhog_query(pid, MEMHOG_PORT, "SUM")? == sum);
        ctd.remove_container("lb", STATUS_TIMEOUT)?;
        retention(&ctd, &store, &back, &top, &last, &sum)?;
    }
    Ok(())
}

/// Every checkpoint but the newest is deleted and collected: the chain is squashed into the
/// newest layer, which restores with every page right and still takes a layer over it (the
/// digest the shim recorded at restore is the one the squashed layer keeps).
fn retention(
    ctd: &Containerd,
    store: &Path,
    srv: &ServerHandle,
    top: &str,
    last: &str,
    sum: &str,
) -> Result<()> {
    let st = distriproc_pageserver::checkpoint::Store::open(store, 4)?;
    let dead = distriproc_pageserver::layers::Tombstones::of(&st);
    let others: Vec<String> = stored(store).into_iter().filter(|id| id != top).collect();
    for id in &others {
        dead.delete(id)?;
    }
    let t0 = Instant::now();
    let r = srv.gc()?;
    eprintln!(
        "gc of {} deleted layers in {:?}: {} squashed, {} removed, {} MiB freed; store {} MiB, \
         depth {} -> {}",
        others.len(),
        t0.elapsed(),
        r.squashed.len(),
        r.removed.len(),
        r.freed_bytes >> 20,
        r.after.bytes >> 20,
        r.before.max_depth,
        r.after.max_depth
    );
    ensure!(
        r.after.layers == 1 && r.after.max_depth == 1 && r.skipped.is_empty(),
        "after gc: {r:?}"
    );
    ensure!(
        stored(store) == BTreeSet::from([top.to_string()]),
        "left in the store: {:?}",
        stored(store)
    );
    ensure!(
        r.after.bytes <= (MIB << 20) + (64 << 20),
        "the squashed chain holds {} bytes for {MIB} MiB of memory",
        r.after.bytes
    );
    ctd.ctr_ok(&["containers", "restore", "--live", "lg", last])?;
    ctd.wait_status("lg", "RUNNING", STATUS_TIMEOUT)?;
    let pid = ctd.task_pid("lg")?;
    let verify = memhog_query_timeout(pid, MEMHOG_PORT, "VERIFY", STATUS_TIMEOUT)?;
    ensure!(
        verify == format!("OK pages={PAGES}"),
        "VERIFY of {last} after gc squashed its chain: {verify}"
    );
    ensure!(
        memhog_query(pid, MEMHOG_PORT, "SUM")? == sum,
        "SUM after gc"
    );
    memhog_query_timeout(
        pid,
        MEMHOG_PORT,
        &format!("WRITE {WRITE_PCT}"),
        STATUS_TIMEOUT,
    )?;
    let before = stored(store);
    ctd.ctr_ok(&[
        "containers",
        "checkpoint",
        "--task",
        "lg",
        "localhost/l-cp:gc",
    ])?;
    let new = new_id(store, &before)?;
    let depth = chain(store, &new)?;
    ensure!(
        depth == [new.clone(), top.to_string()],
        "the checkpoint after gc should be a layer over {top}: {depth:?}"
    );
    ctd.remove_container("lg", STATUS_TIMEOUT)?;
    ctd.ctr_ok(&["containers", "restore", "--live", "lh", "localhost/l-cp:gc"])?;
    ctd.wait_status("lh", "RUNNING", STATUS_TIMEOUT)?;
    let pid = ctd.task_pid("lh")?;
    let verify = memhog_query_timeout(pid, MEMHOG_PORT, "VERIFY", STATUS_TIMEOUT)?;
    let sum = memhog_query_timeout(pid, MEMHOG_PORT, "SUM", STATUS_TIMEOUT)?;
    let expect = memhog_query_timeout(pid, MEMHOG_PORT, "EXPECT", STATUS_TIMEOUT)?;
    ensure!(
        verify == format!("OK pages={PAGES}") && sum == expect,
        "layer over the squashed chain: VERIFY {verify}, SUM {sum} EXPECT {expect}"
    );
    ctd.remove_container("lh", STATUS_TIMEOUT)?;
    Ok(())
}

/// A container that keeps running is checkpointed twice: the second checkpoint is a layer over
/// the first and holds only the pages written between the two (the fetcher counts the pages
/// written before the first as clean again once it is published), and it restores right.
fn layers_of_a_running_container(containerd_dir: &str) -> Result<()> {
    if std::env::var_os("DISTRIPROC_EAGER_RESTORE").is_some()
        || !require_stack_in(Path::new(containerd_dir))
    {
        eprintln!("SKIPPED: needs the lazy stack");
        return Ok(());
    }
    const SMALL_MIB: u64 = 256;
    let dir = tempfile::Builder::new()
        .prefix("dp-e2e-running-")
        .tempdir()?;
    let store = dir.path().join("store");
    std::fs::create_dir_all(&store)?;
    let srv = server(&store, "127.0.0.1:0")?;
    let cfg = write_config(dir.path(), &srv.addrs()[0])?;
    let mut opts = ContainerdOpts::with_containerd_dir(containerd_dir).shim(SHIM);
    opts.env
        .push(("DISTRIPROC_CONFIG".into(), cfg.display().to_string()));
    let ctd = Containerd::start(opts)?;
    ctd.import_test_images()?;
    ctd.run_detached(
        &["io.distriproc.fill-policy=none"],
        MEMHOG_IMAGE,
        "r0",
        &[
            "/memhog",
            "serve",
            "--mib",
            &SMALL_MIB.to_string(),
            "--procs",
            "2",
        ],
        STATUS_TIMEOUT,
    )?;
    let pid = ctd.task_pid("r0")?;
    ensure!(memhog_query_timeout(pid, MEMHOG_PORT, "PING", STATUS_TIMEOUT)? == "PONG");
    ctd.ctr_ok(&[
        "containers",
        "checkpoint",
        "--task",
        "r0",
        "localhost/r-cp:0",
    ])?;
    let base = stored(&store);
    ctd.remove_container("r0", STATUS_TIMEOUT)?;
    ctd.ctr_ok(&["containers", "restore", "--live", "r1", "localhost/r-cp:0"])?;
    ctd.wait_status("r1", "RUNNING", STATUS_TIMEOUT)?;
    let pid = ctd.task_pid("r1")?;
    let mut layers = Vec::new();
    let mut before = base;
    for round in 1..=3 {
        let t0 = Instant::now();
        let w = memhog_query_timeout(
            pid,
            MEMHOG_PORT,
            &format!("WRITE {WRITE_PCT}"),
            STATUS_TIMEOUT,
        )?;
        let write_time = t0.elapsed();
        let written: u64 = w
            .strip_prefix("OK pages=")
            .and_then(|n| n.parse().ok())
            .with_context(|| format!("WRITE answered {w:?}"))?;
        let image = format!("localhost/r-cp:{round}");
        ctd.ctr_ok(&["containers", "checkpoint", "--task", "r1", &image])?;
        ctd.wait_status("r1", "RUNNING", STATUS_TIMEOUT)?;
        let new = new_id(&store, &before)?;
        let grew = layer_bytes(&store.join(&new));
        let depth = chain(&store, &new)?;
        eprintln!(
            "running container, checkpoint {round}: {written} pages written since the last (in \
             {write_time:?}), layer {new} of {} KiB, chain {depth:?}",
            grew >> 10
        );
        ensure!(
            depth.len() == round + 1 && layers.last().is_none_or(|l| depth.get(1) == Some(l)),
            "checkpoint {round} should be a layer over the previous one: {depth:?}"
        );
        ensure!(
            grew >= written * 4096 && grew <= written * 4096 * 11 / 10 + (8 << 20),
            "checkpoint {round}: the layer holds {grew} bytes for {written} pages written since \
             the previous checkpoint\n{}",
            ctd.log_tail(30)
        );
        layers.push(new);
        before = stored(&store);
    }
    let sum = memhog_query_timeout(pid, MEMHOG_PORT, "SUM", STATUS_TIMEOUT)?;
    ctd.remove_container("r1", STATUS_TIMEOUT)?;
    ctd.ctr_ok(&["containers", "restore", "--live", "r2", "localhost/r-cp:3"])?;
    ctd.wait_status("r2", "RUNNING", STATUS_TIMEOUT)?;
    let pid = ctd.task_pid("r2")?;
    let verify = memhog_query_timeout(pid, MEMHOG_PORT, "VERIFY", STATUS_TIMEOUT)?;
    ensure!(
        verify == format!("OK pages={}", SMALL_MIB * 256),
        "VERIFY of the third layer: {verify}"
    );
    ensure!(
        memhog_query(pid, MEMHOG_PORT, "SUM")? == sum,
        "SUM of the third layer"
    );
    ctd.remove_container("r2", STATUS_TIMEOUT)?;
    Ok(())
}

#[test]
fn layers_of_a_running_container_ctd21() -> Result<()> {
    layers_of_a_running_container(CONTAINERD_2_1_DIR)
}

#[test]
fn layers_ctd21() -> Result<()> {
    layers(CONTAINERD_2_1_DIR, 20)
}

#[test]
fn layers_ctd17() -> Result<()> {
    layers(CONTAINERD_1_7_DIR, 3)
}
