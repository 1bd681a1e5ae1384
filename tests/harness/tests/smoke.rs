//! Proves the harness on the real stack: a private containerd 2.1 and 1.7 each import the test
//! images and run busybox and memhog under the runc runtime (io.containerd.runc.v2).

use std::path::Path;
use std::time::Duration;

use distriproc_harness::{
    memhog_query, require_stack_in, wait_for, Containerd, ContainerdOpts, BUSYBOX_IMAGE,
    CONTAINERD_1_7_DIR, CONTAINERD_2_1_DIR, MEMHOG_IMAGE, MEMHOG_PORT, RUNC_RUNTIME,
};

fn smoke(dir: &str, expect_config_version: u32) {
    if !require_stack_in(Path::new(dir)) {
        return;
    }
    let ctd = Containerd::start(ContainerdOpts::with_containerd_dir(dir)).expect("start");
    assert_eq!(ctd.config_version(), expect_config_version);
    ctd.import_test_images().expect("import test images");
    let images = ctd.ctr_ok(&["images", "ls", "-q"]).unwrap();
    assert!(
        images.contains(BUSYBOX_IMAGE) && images.contains(MEMHOG_IMAGE),
        "{images}"
    );

    let out = ctd
        .ctr_ok(&[
            "run",
            "--rm",
            "--runtime",
            RUNC_RUNTIME,
            BUSYBOX_IMAGE,
            "bb",
            "echo",
            "hello",
        ])
        .expect("busybox echo");
    assert_eq!(out.trim(), "hello");

    ctd.ctr_ok(&[
        "run",
        "-d",
        "--runtime",
        RUNC_RUNTIME,
        MEMHOG_IMAGE,
        "mh",
        "/memhog",
        "serve",
        "--mib",
        "16",
        "--procs",
        "2",
        "--threads",
        "2",
    ])
    .expect("memhog run");
    assert_eq!(ctd.task_status("mh").unwrap().as_deref(), Some("RUNNING"));
    let pid = ctd.task_pid("mh").unwrap();
    assert_eq!(memhog_query(pid, MEMHOG_PORT, "PING").unwrap(), "PONG");
    let sum = memhog_query(pid, MEMHOG_PORT, "SUM").unwrap();
    assert_eq!(sum, memhog_query(pid, MEMHOG_PORT, "EXPECT").unwrap());
    assert_eq!(
        memhog_query(pid, MEMHOG_PORT, "VERIFY").unwrap(),
        "OK pages=4096"
    );

    ctd.ctr_ok(&["tasks", "kill", "-s", "SIGKILL", "mh"])
        .unwrap();
    assert!(wait_for(
        || ctd.task_status("mh").ok().flatten().as_deref() == Some("STOPPED"),
        Duration::from_secs(20)
    ));
    assert_eq!(ctd.task_status("nope").unwrap(), None);
    assert!(ctd.log_text().contains("containerd successfully booted"));

    // Drop cleans up: no shim, no temp dir left behind.
    let dir = ctd.dir().to_path_buf();
    let sock = ctd.socket().to_string_lossy().into_owned();
    drop(ctd);
    assert!(!dir.exists(), "{} left behind", dir.display());
    let leftover = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .filter(|c| String::from_utf8_lossy(c).contains(&sock))
        .count();
    assert_eq!(leftover, 0, "processes still refer to {sock}");
}

#[test]
fn containerd_2_1_runs_busybox_and_memhog_with_runc() {
    smoke(CONTAINERD_2_1_DIR, 3);
}

#[test]
fn containerd_1_7_runs_busybox_and_memhog_with_runc() {
    smoke(CONTAINERD_1_7_DIR, 2);
}

/// The eager baseline the lazy shim is compared with: memhog checkpointed and restored by the
/// runc shim keeps every page (SUM == EXPECT, VERIFY OK) and answers on TCP again.
fn runc_checkpoint_restore(dir: &str) {
    if !require_stack_in(Path::new(dir)) {
        return;
    }
    let ctd = Containerd::start(ContainerdOpts::with_containerd_dir(dir)).expect("start");
    ctd.import_test_images().expect("import test images");
    ctd.ctr_ok(&[
        "run",
        "-d",
        "--runtime",
        RUNC_RUNTIME,
        MEMHOG_IMAGE,
        "cr",
        "/memhog",
        "serve",
        "--mib",
        "64",
        "--procs",
        "2",
        "--threads",
        "2",
        "--zero-pct",
        "10",
    ])
    .expect("memhog run");
    let pid = ctd.task_pid("cr").unwrap();
    let expect = memhog_query(pid, MEMHOG_PORT, "EXPECT").unwrap();
    assert_eq!(memhog_query(pid, MEMHOG_PORT, "SUM").unwrap(), expect);

    ctd.ctr_ok(&[
        "containers",
        "checkpoint",
        "--task",
        "cr",
        "localhost/cr-cp:1",
    ])
    .expect("checkpoint");
    ctd.ctr_ok(&["tasks", "kill", "-s", "SIGKILL", "cr"])
        .unwrap();
    assert!(wait_for(
        || ctd.task_status("cr").ok().flatten().as_deref() == Some("STOPPED"),
        Duration::from_secs(20)
    ));
    ctd.ctr_ok(&["tasks", "rm", "cr"]).unwrap();
    ctd.ctr_ok(&["containers", "rm", "cr"]).unwrap();

    ctd.ctr_ok(&["containers", "restore", "--live", "cr", "localhost/cr-cp:1"])
        .expect("restore");
    let pid = ctd.task_pid("cr").unwrap();
    assert_eq!(memhog_query(pid, MEMHOG_PORT, "PING").unwrap(), "PONG");
    assert_eq!(memhog_query(pid, MEMHOG_PORT, "SUM").unwrap(), expect);
    assert_eq!(
        memhog_query(pid, MEMHOG_PORT, "VERIFY").unwrap(),
        "OK pages=16384"
    );
    // The restored checkpoint was unpacked into the instance's TMPDIR, not /tmp.
    let unpacked = std::fs::read_dir(ctd.tmp_dir()).unwrap().count();
    assert!(
        unpacked >= 1,
        "no ctrd-checkpoint dir in {}",
        ctd.tmp_dir().display()
    );
}

#[test]
fn containerd_2_1_runc_checkpoint_restore_keeps_memory() {
    runc_checkpoint_restore(CONTAINERD_2_1_DIR);
}

#[test]
fn containerd_1_7_runc_checkpoint_restore_keeps_memory() {
    runc_checkpoint_restore(CONTAINERD_1_7_DIR);
}
