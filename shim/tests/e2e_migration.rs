//! The migration cycle through `ctr`: checkpoint, restore lazily with fill `none`, checkpoint
//! the restored container while most of its memory is still remote, restore that checkpoint,
//! and check every page (`VERIFY`, `SUM` against the first checkpoint's).
//!
//! CRIU's dump writes only the pages present in the tasks; without the shim completing the
//! dump from the fetcher's residency, the second checkpoint would miss every page still remote
//! and its restore would read zeros there (VERIFY answers BAD). Runs on containerd 2.1 and 1.7;
//! on 1.7 the previous checkpoint image must be removed before the container is checkpointed
//! again (containerd 1.7's checkpoint fails on the already stored spec blob and ctr then writes
//! an index without the CRIU images: "media type not found" at restore; fixed in 2.0).

use std::{path::Path, time::Duration};

use anyhow::{ensure, Result};
use distriproc_harness::{
    memhog_query, require_stack_in, Containerd, ContainerdOpts, CONTAINERD_1_7_DIR,
    CONTAINERD_2_1_DIR, MEMHOG_IMAGE, MEMHOG_PORT,
};

const SHIM: &str = env!("CARGO_BIN_EXE_containerd-shim-distriproc-v2");
const STATUS_TIMEOUT: Duration = Duration::from_secs(30);
/// Checkpoint → restore cycles after the first checkpoint.
const CYCLES: usize = 2;

fn kill_rm(ctd: &Containerd, id: &str) -> Result<()> {
    ctd.remove_container(id, STATUS_TIMEOUT)
}

fn migration_cycle(dir: &str) -> Result<()> {
    if std::env::var_os("DISTRIPROC_EAGER_RESTORE").is_some() {
        eprintln!("SKIPPED: lazy test with DISTRIPROC_EAGER_RESTORE set");
        return Ok(());
    }
    if !require_stack_in(Path::new(dir)) {
        return Ok(());
    }
    let ctd = Containerd::start(ContainerdOpts::with_containerd_dir(dir).shim(SHIM))?;
    ctd.import_test_images()?;
    let ctd1 = !ctd.version().starts_with('2');
    ctd.run_detached(
        &["io.distriproc.fill-policy=none"],
        MEMHOG_IMAGE,
        "g0",
        &["/memhog", "serve", "--mib", "64", "--procs", "2"],
        STATUS_TIMEOUT,
    )?;
    let pid = ctd.task_pid("g0")?;
    let sum = memhog_query(pid, MEMHOG_PORT, "SUM")?;
    ensure!(sum.starts_with("SUM "), "SUM: {sum}");
    ctd.ctr_ok(&[
        "containers",
        "checkpoint",
        "--task",
        "g0",
        "localhost/g-cp:0",
    ])?;
    kill_rm(&ctd, "g0")?;

    let mut completed_before = 0;
    for i in 1..=CYCLES {
        let (id, prev, next) = (
            format!("g{i}"),
            format!("localhost/g-cp:{}", i - 1),
            format!("localhost/g-cp:{i}"),
        );
        ctd.ctr_ok(&["containers", "restore", "--live", &id, &prev])?;
        ctd.wait_status(&id, "RUNNING", STATUS_TIMEOUT)?;
        let pid = ctd.task_pid(&id)?;
        ensure!(memhog_query(pid, MEMHOG_PORT, "TOUCH 10")? == "OK");
        if ctd1 {
            ctd.ctr_ok(&["images", "rm", "--sync", &prev])?;
        }
        // Most of the memory is still remote: the dump must be completed.
        ctd.ctr_ok(&["containers", "checkpoint", "--task", &id, &next])?;
        let completed = ctd
            .log_text()
            .matches("pages still remote read from the page source")
            .count();
        ensure!(
            completed > completed_before,
            "cycle {i}: the checkpoint was not completed from the page source:\n{}",
            ctd.log_tail(40)
        );
        completed_before = completed;
        let stats = ctd.lazy_stats(&id)?;
        ensure!(
            stats["pages_filled"].as_u64() == Some(0),
            "cycle {i}: the checkpoint pulled pages into the container: {stats}"
        );
        // The container was frozen for the dump and runs on, intact.
        ctd.wait_status(&id, "RUNNING", STATUS_TIMEOUT)?;
        let verify = memhog_query(pid, MEMHOG_PORT, "VERIFY")?;
        ensure!(
            verify.starts_with("OK"),
            "cycle {i}: VERIFY after checkpoint {verify}"
        );
        kill_rm(&ctd, &id)?;
    }
    // The last checkpoint, taken with most memory remote, holds every page.
    let last = format!("localhost/g-cp:{CYCLES}");
    ctd.ctr_ok(&["containers", "restore", "--live", "gz", &last])?;
    ctd.wait_status("gz", "RUNNING", STATUS_TIMEOUT)?;
    let pid = ctd.task_pid("gz")?;
    let verify = memhog_query(pid, MEMHOG_PORT, "VERIFY")?;
    ensure!(
        verify.starts_with("OK"),
        "VERIFY after {CYCLES} cycles: {verify}"
    );
    ensure!(
        memhog_query(pid, MEMHOG_PORT, "SUM")? == sum,
        "checksum changed after {CYCLES} cycles"
    );
    kill_rm(&ctd, "gz")?;
    Ok(())
}

#[test]
fn migration_cycle_ctd21() -> Result<()> {
    migration_cycle(CONTAINERD_2_1_DIR)
}

#[test]
fn migration_cycle_ctd17() -> Result<()> {
    migration_cycle(CONTAINERD_1_7_DIR)
}
