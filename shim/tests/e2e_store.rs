//! The node-local page store (`[store]`, the default without a page server), end to end on a
//! private containerd with real runc, CRIU and userfaultfd, through `ctr`.
//!
//! A memhog checkpointed with the default configuration leaves its memory in the store and a
//! small tar in containerd; the lazy restore serves it in-process (VERIFY and SUM as before).
//! `io.distriproc.checkpoint-store=inline` keeps the pages in containerd's tar. A store entry
//! that is truncated, or missing, fails the restore at `ctr` with an error naming the
//! checkpoint and the store, promptly. Runs on containerd 2.1 and 1.7.

use std::{path::Path, time::Duration};

use anyhow::{ensure, Context, Result};
use distriproc_harness::{
    memhog_query, require_stack_in, Containerd, ContainerdOpts, CONTAINERD_1_7_DIR,
    CONTAINERD_2_1_DIR, MEMHOG_IMAGE, MEMHOG_PORT,
};

const SHIM: &str = env!("CARGO_BIN_EXE_containerd-shim-distriproc-v2");
const STATUS_TIMEOUT: Duration = Duration::from_secs(30);
const MIB: u64 = 64;

fn start(dir: &str) -> Result<Option<Containerd>> {
    if !require_stack_in(Path::new(dir)) {
        return Ok(None);
    }
    let ctd = Containerd::start(ContainerdOpts::with_containerd_dir(dir).shim(SHIM))?;
    ctd.import_test_images()?;
    Ok(Some(ctd))
}

/// Runs memhog `id` with `annotations`, checkpoints it into `image` and removes it; its SUM.
fn checkpoint_memhog(
    ctd: &Containerd,
    annotations: &[&str],
    id: &str,
    image: &str,
) -> Result<String> {
    let mib = MIB.to_string();
    ctd.run_detached(
        annotations,
        MEMHOG_IMAGE,
        id,
        &[
            "/memhog",
            "serve",
            "--mib",
            &mib,
            "--procs",
            "2",
            "--threads",
            "2",
        ],
        STATUS_TIMEOUT,
    )?;
    let pid = ctd.task_pid(id)?;
    let sum = memhog_query(pid, MEMHOG_PORT, "SUM")?;
    ctd.checkpoint_and_remove(id, image, STATUS_TIMEOUT)?;
    Ok(sum)
}

/// The store entries (checkpoint directories) of the harness's store.
fn entries(store: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(store)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with('.'))
        .collect();
    v.sort();
    v
}

fn restore_ok(ctd: &Containerd, id: &str, image: &str, sum: &str) -> Result<()> {
    ctd.ctr_ok(&["containers", "restore", "--live", id, image])?;
    ctd.wait_status(id, "RUNNING", STATUS_TIMEOUT)?;
    let pid = ctd.task_pid(id)?;
    let verify = memhog_query(pid, MEMHOG_PORT, "VERIFY")?;
    ensure!(
        verify.starts_with("OK"),
        "{id}: VERIFY after restore: {verify}"
    );
    ensure!(
        memhog_query(pid, MEMHOG_PORT, "SUM")? == sum,
        "{id}: checksum changed"
    );
    let log = std::fs::read_to_string(ctd.bundle_dir(id).join("work/restore.log"))?;
    ensure!(
        log.contains("Lazy restore skips"),
        "{id}: restore was not lazy"
    );
    ctd.ctr_ok(&["tasks", "kill", "-s", "SIGKILL", id])?;
    ctd.wait_status(id, "STOPPED", STATUS_TIMEOUT)?;
    ctd.ctr_ok(&["tasks", "rm", id])?;
    ctd.ctr_ok(&["containers", "rm", id])?;
    Ok(())
}

/// A restore that must fail promptly at `ctr` with an error containing every one of `want`.
fn restore_fails(ctd: &Containerd, id: &str, image: &str, want: &[&str]) -> Result<()> {
    let t0 = std::time::Instant::now();
    let out = ctd.ctr(&["containers", "restore", "--live", id, image])?;
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    ensure!(
        !out.status.success(),
        "{id}: restore from a bad store entry succeeded"
    );
    eprintln!(
        "{id}: error as ctr shows it ({:?}): {}",
        t0.elapsed(),
        err.trim()
    );
    ensure!(
        t0.elapsed() < Duration::from_secs(30),
        "{id}: the failing restore took {:?}",
        t0.elapsed()
    );
    for w in want {
        ensure!(err.contains(w), "{id}: error lacks {w:?}: {err}");
    }
    let _ = ctd.ctr(&["containers", "rm", id]);
    Ok(())
}

fn store_default(dir: &str) -> Result<()> {
    let Some(ctd) = start(dir)? else {
        return Ok(());
    };
    let store = ctd.dir().join("store");
    let sum = checkpoint_memhog(&ctd, &[], "s1", "localhost/s1-cp:1")?;
    let tar = std::fs::metadata(ctd.criu_blob("localhost/s1-cp:1")?)?.len();
    ensure!(
        tar < 1 << 20,
        "containerd's checkpoint content is {tar} bytes"
    );
    let stored = entries(&store);
    ensure!(
        stored.len() == 1,
        "store entries after one checkpoint: {stored:?}"
    );
    let entry = store.join(&stored[0]);
    let pages: u64 = std::fs::read_dir(&entry)?
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("pages-"))
        .map(|e| e.metadata().map(|m| m.len()).unwrap_or(0))
        .sum();
    ensure!(
        pages >= MIB << 20,
        "the store entry holds {pages} bytes of pages for {MIB} MiB"
    );
    restore_ok(&ctd, "s1r", "localhost/s1-cp:1", &sum)?;
    // Restored twice from the same entry: it stays in the store.
    restore_ok(&ctd, "s1r2", "localhost/s1-cp:1", &sum)?;

    // Inline on request: the pages travel in containerd's tar, nothing new in the store.
    let isum = checkpoint_memhog(
        &ctd,
        &["io.distriproc.checkpoint-store=inline"],
        "s2",
        "localhost/s2-cp:1",
    )?;
    let tar = std::fs::metadata(ctd.criu_blob("localhost/s2-cp:1")?)?.len();
    ensure!(tar > MIB << 20, "inline checkpoint tar is only {tar} bytes");
    ensure!(
        entries(&store).len() == 1,
        "inline checkpoint went to the store"
    );
    restore_ok(&ctd, "s2r", "localhost/s2-cp:1", &isum)?;

    // A truncated store entry is refused, not served as zeros.
    let pages_file = std::fs::read_dir(&entry)?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("pages-"))
        })
        .context("no pages file in the store entry")?;
    let f = std::fs::OpenOptions::new().write(true).open(&pages_file)?;
    f.set_len(f.metadata()?.len() / 2)?;
    drop(f);
    restore_fails(
        &ctd,
        "s1bad",
        "localhost/s1-cp:1",
        &[&stored[0], "truncated"],
    )?;

    // A missing entry (a checkpoint taken on another node): a clear error naming the store.
    std::fs::remove_dir_all(&entry)?;
    let store_s = store.display().to_string();
    restore_fails(
        &ctd,
        "s1gone",
        "localhost/s1-cp:1",
        &[&stored[0], &store_s, "has no checkpoint"],
    )?;
    ctd.ctr_ok(&["version"])?;
    Ok(())
}

#[test]
fn store_default_ctd21() -> Result<()> {
    store_default(CONTAINERD_2_1_DIR)
}

#[test]
fn store_default_ctd17() -> Result<()> {
    store_default(CONTAINERD_1_7_DIR)
}

/// Waits until `pred` holds for the store's entries, up to `timeout`.
fn wait_entries(store: &Path, timeout: Duration, pred: impl Fn(&[String]) -> bool) -> Vec<String> {
    let t0 = std::time::Instant::now();
    loop {
        let e = entries(store);
        if pred(&e) || t0.elapsed() > timeout {
            return e;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Retention: deleting a checkpoint image in containerd frees its store entry (the shims sweep
/// every `gc_interval_s`), while an entry a running container was restored from stays until
/// that container is gone.
fn store_retention(dir: &str) -> Result<()> {
    let Some(ctd) = start(dir)? else {
        return Ok(());
    };
    let store = ctd.dir().join("store");
    // The shim reads its configuration at each Create: sweep every second, a short grace
    // period (containerd creates the image only after the shim's Checkpoint returns).
    std::fs::write(
        ctd.dir().join("shim.toml"),
        format!(
            "[store]\ndir = {:?}\ngc_interval_s = 1\ngc_grace_s = 3\n",
            store
        ),
    )?;
    checkpoint_memhog(&ctd, &[], "g1", "localhost/g1-cp:1")?;
    let first = entries(&store);
    let sum2 = checkpoint_memhog(&ctd, &[], "g2", "localhost/g2-cp:1")?;
    let both = entries(&store);
    ensure!(
        both.len() == 2,
        "store entries after two checkpoints: {both:?}"
    );
    let e1 = first
        .first()
        .context("no entry after the first checkpoint")?
        .clone();
    let e2 = both
        .iter()
        .find(|e| **e != e1)
        .context("no second entry")?
        .clone();
    // Restored and running: its shim sweeps the store every second.
    ctd.ctr_ok(&[
        "containers",
        "restore",
        "--live",
        "g2r",
        "localhost/g2-cp:1",
    ])?;
    ctd.wait_status("g2r", "RUNNING", STATUS_TIMEOUT)?;
    std::thread::sleep(Duration::from_secs(3));
    ensure!(
        entries(&store) == both,
        "entries whose images exist were freed: {:?} of {both:?}",
        entries(&store)
    );
    ctd.ctr_ok(&["images", "rm", "--sync", "localhost/g1-cp:1"])?;
    ctd.ctr_ok(&["images", "rm", "--sync", "localhost/g2-cp:1"])?;
    let left = wait_entries(&store, Duration::from_secs(20), |e| !e.contains(&e1));
    ensure!(
        !left.contains(&e1),
        "entry {e1} of a deleted image still in the store after 20 s"
    );
    ensure!(
        left.contains(&e2),
        "entry {e2} freed while container g2r runs from it"
    );
    let pid = ctd.task_pid("g2r")?;
    let verify = memhog_query(pid, MEMHOG_PORT, "VERIFY")?;
    ensure!(verify.starts_with("OK"), "g2r: VERIFY: {verify}");
    ensure!(
        memhog_query(pid, MEMHOG_PORT, "SUM")? == sum2,
        "g2r: checksum changed"
    );
    ctd.remove_container("g2r", STATUS_TIMEOUT)?;
    // The next container that starts sweeps again: the entry nothing holds any more goes.
    let mib = "8".to_string();
    ctd.run_detached(
        &[],
        MEMHOG_IMAGE,
        "g3",
        &["/memhog", "serve", "--mib", &mib],
        STATUS_TIMEOUT,
    )?;
    let left = wait_entries(&store, Duration::from_secs(20), |e| e.is_empty());
    ensure!(
        left.is_empty(),
        "entries left after their images and containers went: {left:?}"
    );
    ctd.remove_container("g3", STATUS_TIMEOUT)?;
    Ok(())
}

#[test]
fn store_retention_ctd21() -> Result<()> {
    store_retention(CONTAINERD_2_1_DIR)
}

#[test]
fn store_retention_ctd17() -> Result<()> {
    store_retention(CONTAINERD_1_7_DIR)
}
