//! Lazy restore of 1 GiB of verifiable memory through containerd, in the three shapes a
//! workload takes: one process, several processes, several threads.
//!
//! For each shape: `ctr run --runtime io.containerd.distriproc.v2` memhog, `ctr c checkpoint
//! --task`, kill and remove, `ctr c restore --live`; the restored container must answer with
//! the checksum it had before (and VERIFY every page against the generator), CRIU's
//! restore.log must show the lazy path, and the fetcher's stats must show faults served by the
//! shim and, with the default fill policy (`full`), every lazy page filled in the background.
//! With the default configuration the memory goes to the node-local store, so containerd's
//! checkpoint content must stay under 1 MiB. Runs on containerd 2.1 and 1.7; skips with a reason without the stack, fails when CI=true.

use std::{path::Path, time::Duration};

use anyhow::{ensure, Context, Result};
use distriproc_harness::{
    memhog_query, require_stack_in, wait_for, Containerd, ContainerdOpts, CONTAINERD_1_7_DIR,
    CONTAINERD_2_1_DIR, MEMHOG_IMAGE, MEMHOG_PORT,
};

const SHIM: &str = env!("CARGO_BIN_EXE_containerd-shim-distriproc-v2");
const MIB: &str = "1024";

/// (name, procs, threads)
const SHAPES: [(&str, &str, &str); 3] = [
    ("single", "1", "1"),
    ("procs", "4", "1"),
    ("threads", "1", "4"),
];

fn one_shape(ctd: &Containerd, name: &str, procs: &str, threads: &str) -> Result<()> {
    let id = format!("g-{name}");
    let restored = format!("g-{name}-r");
    let image = format!("localhost/g-{name}-cp:1");
    ctd.run_detached(
        &[],
        MEMHOG_IMAGE,
        &id,
        &[
            "/memhog",
            "serve",
            "--mib",
            MIB,
            "--procs",
            procs,
            "--threads",
            threads,
            "--zero-pct",
            "5",
        ],
        Duration::from_secs(30),
    )?;
    let pid = ctd.task_pid(&id)?;
    // The first query waits for memhog to fill its memory.
    let sum = memhog_query(pid, MEMHOG_PORT, "SUM")?;
    let expect = memhog_query(pid, MEMHOG_PORT, "EXPECT")?;
    ensure!(
        sum == expect,
        "{name}: SUM {sum} != EXPECT {expect} before checkpoint"
    );

    ctd.checkpoint_and_remove(&id, &image, Duration::from_secs(30))?;
    // The default configuration keeps the memory in the node-local store: containerd's
    // checkpoint holds CRIU's metadata, the eager pages and the reference.
    let blob = ctd.criu_blob(&image)?;
    let tar_bytes = std::fs::metadata(&blob)?.len();
    ensure!(
        tar_bytes < 1 << 20,
        "{name}: containerd's checkpoint content is {tar_bytes} bytes (>= 1 MiB)"
    );

    ctd.ctr_ok(&["containers", "restore", "--live", &restored, &image])?;
    ctd.wait_status(&restored, "RUNNING", Duration::from_secs(30))?;
    let pid = ctd.task_pid(&restored)?;
    let verify = memhog_query(pid, MEMHOG_PORT, "VERIFY")?;
    ensure!(
        verify.starts_with("OK"),
        "{name}: VERIFY after lazy restore: {verify}"
    );
    let after = memhog_query(pid, MEMHOG_PORT, "SUM")?;
    ensure!(after == sum, "{name}: checksum changed: {sum} -> {after}");

    let bundle = ctd.bundle_dir(&restored);
    let log = std::fs::read_to_string(bundle.join("work/restore.log"))
        .with_context(|| format!("{name}: reading restore.log"))?;
    ensure!(
        log.contains("Lazy restore skips"),
        "{name}: restore.log does not show a lazy restore"
    );
    let filled = wait_for(
        || {
            ctd.lazy_stats(&restored)
                .map(|v| v["finished"] == true)
                .unwrap_or(false)
        },
        Duration::from_secs(120),
    );
    let stats = ctd.lazy_stats(&restored)?;
    ensure!(filled, "{name}: fill did not finish: {stats}");
    eprintln!("{name}: {stats}");
    ensure!(
        stats["faults"].as_u64().unwrap_or(0) > 0,
        "{name}: no faults served: {stats}"
    );
    let lazy = stats["lazy_pages"].as_u64().unwrap_or(0);
    ensure!(
        lazy > 200_000,
        "{name}: only {lazy} lazy pages for 1 GiB: {stats}"
    );
    let installed = [
        "pages_faulted",
        "pages_prefetched",
        "pages_filled",
        "pages_already_present",
    ]
    .iter()
    .map(|k| stats[*k].as_u64().unwrap_or(0))
    .sum::<u64>();
    ensure!(
        installed >= lazy,
        "{name}: {installed} pages installed of {lazy} lazy: {stats}"
    );

    ctd.ctr_ok(&["tasks", "kill", "-s", "SIGKILL", &restored])?;
    ctd.wait_status(&restored, "STOPPED", Duration::from_secs(30))?;
    ctd.ctr_ok(&["tasks", "rm", &restored])?;
    ctd.ctr_ok(&["containers", "rm", &restored])?;
    ctd.ctr_ok(&["images", "rm", &image])?;
    Ok(())
}

fn memhog_1gib(dir: &str) -> Result<()> {
    if std::env::var_os("DISTRIPROC_EAGER_RESTORE").is_some() {
        eprintln!("SKIPPED: lazy test with DISTRIPROC_EAGER_RESTORE set");
        return Ok(());
    }
    if !require_stack_in(Path::new(dir)) {
        return Ok(());
    }
    let ctd = Containerd::start(ContainerdOpts::with_containerd_dir(dir).shim(SHIM))?;
    ctd.import_test_images()?;
    for (name, procs, threads) in SHAPES {
        one_shape(&ctd, name, procs, threads).with_context(|| format!("shape {name}"))?;
    }
    Ok(())
}

#[test]
fn memhog_1gib_ctd21() -> Result<()> {
    memhog_1gib(CONTAINERD_2_1_DIR)
}

#[test]
fn memhog_1gib_ctd17() -> Result<()> {
    memhog_1gib(CONTAINERD_1_7_DIR)
}
