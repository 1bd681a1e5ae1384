//! End-to-end tests on a private containerd with the real runc and CRIU, through `ctr`.
//!
//! Each test runs on containerd 2.1 and 1.7 (`*_ctd21`, `*_ctd17`; the harness's
//! `DISTRIPROC_CONTAINERD_DIR` only picks the default). They skip with a reason when the stack
//! is missing and fail instead when `CI=true`. Each containerd instance has its own namespace.

use std::{path::Path, time::Duration};

use anyhow::{bail, ensure, Context, Result};
use distriproc_harness::{
    require_stack_in, wait_for, Containerd, ContainerdOpts, BUSYBOX_IMAGE, CONTAINERD_1_7_DIR,
    CONTAINERD_2_1_DIR, DISTRIPROC_RUNTIME,
};

const SHIM: &str = env!("CARGO_BIN_EXE_containerd-shim-distriproc-v2");
/// How long a task may take to reach a wanted status.
const STATUS_TIMEOUT: Duration = Duration::from_secs(20);

fn start(dir: &str) -> Result<Option<Containerd>> {
    if !require_stack_in(Path::new(dir)) {
        return Ok(None);
    }
    let ctd = Containerd::start(ContainerdOpts::with_containerd_dir(dir).shim(SHIM))?;
    ctd.import_test_images()?;
    Ok(Some(ctd))
}

/// run -d, exec, pause/resume, kill, rm; then a foreground `run --rm` with its exit code.
fn plain_lifecycle(dir: &str) -> Result<()> {
    let Some(ctd) = start(dir)? else {
        return Ok(());
    };
    let rt = ["--runtime", DISTRIPROC_RUNTIME];
    ctd.ctr_ok(
        &[
            &["run", "-d"][..],
            &rt,
            &[BUSYBOX_IMAGE, "p1", "sleep", "1000"],
        ]
        .concat(),
    )?;
    ctd.wait_status("p1", "RUNNING", STATUS_TIMEOUT)?;
    let bundle = ctd.bundle_dir("p1");
    ensure!(
        bundle.join("address").is_file(),
        "no address file in {}",
        bundle.display()
    );

    let out = ctd.ctr_ok(&[
        "tasks",
        "exec",
        "--exec-id",
        "e1",
        "p1",
        "sh",
        "-c",
        "echo exec-ok; exit 0",
    ])?;
    ensure!(out.contains("exec-ok"), "exec output {out:?}");
    let out = ctd.ctr(&[
        "tasks",
        "exec",
        "--exec-id",
        "e2",
        "p1",
        "sh",
        "-c",
        "exit 7",
    ])?;
    ensure!(
        out.status.code() == Some(7),
        "exec exit status {:?}",
        out.status
    );

    ctd.ctr_ok(&["tasks", "pause", "p1"])?;
    ctd.wait_status("p1", "PAUSED", STATUS_TIMEOUT)?;
    ctd.ctr_ok(&["tasks", "resume", "p1"])?;
    ctd.wait_status("p1", "RUNNING", STATUS_TIMEOUT)?;
    let ps = ctd.ctr_ok(&["tasks", "ps", "p1"])?;
    ensure!(ps.lines().count() >= 2, "ps output {ps:?}");
    eprintln!("ctr t ps p1:\n{ps}");

    ctd.ctr_ok(&["tasks", "kill", "-s", "SIGKILL", "p1"])?;
    ctd.wait_status("p1", "STOPPED", STATUS_TIMEOUT)?;
    ctd.ctr_ok(&["tasks", "rm", "p1"])?;
    ensure!(ctd.status("p1") == "ABSENT");
    ensure!(
        !bundle.join("rootfs").join("bin").exists(),
        "rootfs still mounted"
    );
    ctd.ctr_ok(&["containers", "rm", "p1"])?;

    let out = ctd.ctr(
        &[
            &["run", "--rm"][..],
            &rt,
            &[BUSYBOX_IMAGE, "p2", "sh", "-c", "echo fg-out; exit 3"],
        ]
        .concat(),
    )?;
    ensure!(
        out.status.code() == Some(3),
        "run --rm exit {:?}, stderr {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(
        String::from_utf8_lossy(&out.stdout).contains("fg-out"),
        "run --rm stdout {:?}",
        String::from_utf8_lossy(&out.stdout)
    );
    // A create that runc refuses reports runc's own message.
    let out = ctd.ctr(
        &[
            &["run", "-d"][..],
            &rt,
            &[BUSYBOX_IMAGE, "p3", "/no/such/binary"],
        ]
        .concat(),
    )?;
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(!out.status.success(), "run of a missing binary succeeded");
    eprintln!("create error as ctr shows it: {:?}", err.trim());
    ensure!(
        err.contains("runc create of p3 failed") && err.contains("no such file"),
        "unclear create error: {err}"
    );
    let _ = ctd.ctr(&["containers", "rm", "p3"]);
    ensure!(
        !ctd.bundle_dir("p3").join("rootfs/bin").exists(),
        "rootfs of the failed create still mounted"
    );

    // Every shim of this instance has exited once its containers are gone.
    ensure!(
        wait_for(|| ctd.shim_pids().is_empty(), Duration::from_secs(20)),
        "shims still running: {:?}",
        ctd.shim_pids()
    );
    Ok(())
}

#[test]
fn plain_lifecycle_ctd21() -> Result<()> {
    plain_lifecycle(CONTAINERD_2_1_DIR)
}

#[test]
fn plain_lifecycle_ctd17() -> Result<()> {
    plain_lifecycle(CONTAINERD_1_7_DIR)
}

/// containerd 2.x asks the shim binary for its runtime information (`-info`, options on stdin):
/// `ctr plugins inspect-runtime` shows our name and runc's features (1.7 has no such call).
#[test]
fn runtime_info_ctd21() -> Result<()> {
    let Some(ctd) = start(CONTAINERD_2_1_DIR)? else {
        return Ok(());
    };
    let out = ctd.ctr_ok(&[
        "plugins",
        "inspect-runtime",
        "--runtime",
        DISTRIPROC_RUNTIME,
    ])?;
    ensure!(
        out.contains("containerd-shim-distriproc-v2"),
        "inspect-runtime does not name our shim: {out}"
    );
    ensure!(
        out.contains("ociVersionMin") || out.contains("OCIVersionMin"),
        "inspect-runtime has no runc features: {out}"
    );
    Ok(())
}

/// Zero the data of `member` inside a tar file, in place (size unchanged).
fn corrupt_tar_member(tar: &Path, member: &str) -> Result<()> {
    let mut data = std::fs::read(tar)?;
    let mut off = 0usize;
    while off + 512 <= data.len() {
        let hdr = &data[off..off + 512];
        if hdr.iter().all(|b| *b == 0) {
            break;
        }
        let name = String::from_utf8_lossy(&hdr[..100])
            .trim_end_matches('\0')
            .to_string();
        let size_txt = String::from_utf8_lossy(&hdr[124..136]);
        let size = usize::from_str_radix(size_txt.trim_matches(|c: char| c == '\0' || c == ' '), 8)
            .unwrap_or(0);
        if name.trim_start_matches("./") == member {
            for b in &mut data[off + 512..off + 512 + size] {
                *b = 0xff;
            }
            std::fs::write(tar, data)?;
            return Ok(());
        }
        off += 512 + size.div_ceil(512) * 512;
    }
    bail!("{member} not found in {}", tar.display())
}

/// checkpoint (--task) a running busybox, remove it, restore it live and see it running;
/// then a corrupt checkpoint fails clearly while containerd and the shim stay healthy.
fn checkpoint_restore(dir: &str) -> Result<()> {
    let Some(ctd) = start(dir)? else {
        return Ok(());
    };
    let rt = ["--runtime", DISTRIPROC_RUNTIME];
    let cmd = [
        "sh",
        "-c",
        "i=0; while true; do i=$((i+1)); echo tick $i > /tmp/ticks; sleep 0.2; done",
    ];
    ctd.ctr_ok(&[&["run", "-d"][..], &rt, &[BUSYBOX_IMAGE, "k1"], &cmd].concat())?;
    ctd.wait_status("k1", "RUNNING", STATUS_TIMEOUT)?;
    std::thread::sleep(Duration::from_millis(500));
    ctd.ctr_ok(&[
        "containers",
        "checkpoint",
        "--task",
        "--rw",
        "k1",
        "localhost/k1-cp:1",
    ])?;
    ctd.wait_status("k1", "RUNNING", STATUS_TIMEOUT)?;
    let pid_before = ctd.task_pid("k1")?;
    ctd.ctr_ok(&["tasks", "kill", "-s", "SIGKILL", "k1"])?;
    ctd.wait_status("k1", "STOPPED", STATUS_TIMEOUT)?;
    ctd.ctr_ok(&["tasks", "rm", "k1"])?;
    ctd.ctr_ok(&["containers", "rm", "k1"])?;

    let out = ctd.ctr(&[
        "containers",
        "restore",
        "--live",
        "--rw",
        "k1r",
        "localhost/k1-cp:1",
    ])?;
    ensure!(
        out.status.success(),
        "restore failed: {}\nlog:\n{}",
        String::from_utf8_lossy(&out.stderr),
        ctd.log_tail(60)
    );
    ctd.wait_status("k1r", "RUNNING", STATUS_TIMEOUT)?;
    let pid_after = ctd.task_pid("k1r")?;
    ensure!(
        pid_after > 0 && pid_after != pid_before,
        "restored pid {pid_after}"
    );
    // The restored loop keeps counting: the tick file changes.
    let t1 = ctd.ctr_ok(&[
        "tasks",
        "exec",
        "--exec-id",
        "t1",
        "k1r",
        "cat",
        "/tmp/ticks",
    ])?;
    std::thread::sleep(Duration::from_millis(700));
    let t2 = ctd.ctr_ok(&[
        "tasks",
        "exec",
        "--exec-id",
        "t2",
        "k1r",
        "cat",
        "/tmp/ticks",
    ])?;
    ensure!(
        t1.starts_with("tick ") && t1 != t2,
        "restored loop not running: {t1:?} {t2:?}"
    );
    let bundle = ctd.bundle_dir("k1r");
    let restore_log = std::fs::read_to_string(bundle.join("work").join("restore.log"))
        .context("reading restore.log in the work dir")?;
    if std::env::var_os("DISTRIPROC_EAGER_RESTORE").is_none() {
        // Lazy: CRIU left pages to the fetcher, which served faults and wrote its stats.
        ensure!(
            restore_log.contains("Lazy restore skips"),
            "restore was not lazy; restore.log tail: {}",
            &restore_log[restore_log.len().saturating_sub(2000)..]
        );
        let faulted = wait_for(
            || {
                ctd.lazy_stats("k1r")
                    .map(|v| v["faults"].as_u64().unwrap_or(0) > 0)
                    .unwrap_or(false)
            },
            Duration::from_secs(20),
        );
        ensure!(
            faulted,
            "no faults in lazy stats: {:?}",
            ctd.lazy_stats("k1r").ok()
        );
        // Once the fill is done the temporary checkpoint dir is removed.
        let cleaned = wait_for(
            || {
                std::fs::read_dir(ctd.tmp_dir())
                    .map(|d| {
                        !d.flatten().any(|e| {
                            e.file_name()
                                .to_string_lossy()
                                .starts_with("ctrd-checkpoint")
                        })
                    })
                    .unwrap_or(false)
            },
            Duration::from_secs(30),
        );
        ensure!(
            cleaned,
            "ctrd-checkpoint dir left in {}",
            ctd.tmp_dir().display()
        );
    }

    // Corrupt checkpoint of a fresh container (containerd 1.7 cannot checkpoint a restored
    // container again: its spec blob already exists), CRIU images corrupted in the store.
    ctd.ctr_ok(
        &[
            &["run", "-d"][..],
            &rt,
            &[BUSYBOX_IMAGE, "k2", "sleep", "1000"],
        ]
        .concat(),
    )?;
    ctd.wait_status("k2", "RUNNING", STATUS_TIMEOUT)?;
    ctd.ctr_ok(&[
        "containers",
        "checkpoint",
        "--task",
        "k2",
        "localhost/k2-cp:1",
    ])?;
    let blob = ctd.criu_blob("localhost/k2-cp:1")?;
    corrupt_tar_member(&blob, "inventory.img")?;
    let out = ctd.ctr(&[
        "containers",
        "restore",
        "--live",
        "k1bad",
        "localhost/k2-cp:1",
    ])?;
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    ensure!(!out.status.success(), "corrupt restore succeeded?");
    eprintln!("corrupt restore error as ctr shows it: {:?}", err.trim());
    ensure!(
        err.contains("restore of k1bad failed")
            && (err.contains("restore.log") || err.contains("inventory.img")),
        "unclear error: {err}"
    );
    // containerd and the first shim are still fine.
    ctd.ctr_ok(&["version"])?;
    ctd.wait_status("k1r", "RUNNING", STATUS_TIMEOUT)?;
    ctd.ctr_ok(&["tasks", "kill", "-s", "SIGKILL", "k1r"])?;
    ctd.wait_status("k1r", "STOPPED", STATUS_TIMEOUT)?;
    ctd.ctr_ok(&["tasks", "rm", "k1r"])?;
    ctd.ctr_ok(&["tasks", "kill", "-s", "SIGKILL", "k2"])?;

    // containerd 2.x passes `ctr t checkpoint` options to any runtime: --exit and
    // --image-path reach the shim (1.x drops them for non-runc runtimes).
    if ctd.version().starts_with('2') {
        ctd.ctr_ok(
            &[
                &["run", "-d"][..],
                &rt,
                &[BUSYBOX_IMAGE, "k3", "sleep", "1000"],
            ]
            .concat(),
        )?;
        ctd.wait_status("k3", "RUNNING", STATUS_TIMEOUT)?;
        let img = ctd.dir().join("k3-images");
        let img_s = img.display().to_string();
        ctd.ctr_ok(&[
            "tasks",
            "checkpoint",
            "--exit",
            "--image-path",
            &img_s,
            "k3",
        ])?;
        ensure!(img.join("inventory.img").is_file(), "no images in {img_s}");
        ctd.wait_status("k3", "STOPPED", STATUS_TIMEOUT)?;
        ctd.ctr_ok(&["tasks", "rm", "k3"])?;
    }
    Ok(())
}

#[test]
fn checkpoint_restore_ctd21() -> Result<()> {
    checkpoint_restore(CONTAINERD_2_1_DIR)
}

#[test]
fn checkpoint_restore_ctd17() -> Result<()> {
    checkpoint_restore(CONTAINERD_1_7_DIR)
}

/// Runs ctr inside a pty (`script`), as `ctr run -t` needs a console.
fn ctr_in_pty(ctd: &Containerd, args: &str) -> Result<std::process::Output> {
    let cmdline = format!(
        "{} -a {} -n {} {args}",
        ctd.containerd_dir().join("ctr").display(),
        ctd.socket().display(),
        ctd.namespace()
    );
    let mut cmd = std::process::Command::new("script");
    cmd.args(["-qec", &cmdline, "/dev/null"])
        .stdin(std::process::Stdio::null());
    distriproc_harness::run_with_timeout(cmd, Duration::from_secs(60))?
        .with_context(|| format!("`{cmdline}` timed out"))
}

/// `ctr run -t` and `ctr t exec -t`: the pty master comes over the console socket.
fn terminal(dir: &str) -> Result<()> {
    if std::process::Command::new("script")
        .arg("--version")
        .output()
        .is_err()
    {
        let why = "terminal test needs `script` (util-linux)";
        if std::env::var("CI").is_ok_and(|v| v == "true" || v == "1") {
            bail!("{why} (CI=true, so this is a failure)");
        }
        eprintln!("SKIPPED: {why}");
        return Ok(());
    }
    let Some(ctd) = start(dir)? else {
        return Ok(());
    };
    let out = ctr_in_pty(
        &ctd,
        &format!(
            "run -t --rm --runtime {DISTRIPROC_RUNTIME} {BUSYBOX_IMAGE} tt1 sh -c 'tty; exit 4'"
        ),
    )?;
    let text = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.code() == Some(4),
        "run -t exit {:?}: {text}",
        out.status
    );
    ensure!(text.contains("/dev/pts/"), "run -t output {text:?}");

    ctd.run_detached(
        &[],
        BUSYBOX_IMAGE,
        "tt2",
        &["sleep", "1000"],
        STATUS_TIMEOUT,
    )?;
    let out = ctr_in_pty(&ctd, "tasks exec -t --exec-id x1 tt2 sh -c 'tty; exit 5'")?;
    let text = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.code() == Some(5),
        "exec -t exit {:?}: {text}",
        out.status
    );
    ensure!(text.contains("/dev/pts/"), "exec -t output {text:?}");
    let metrics = ctd.ctr_ok(&["tasks", "metrics", "tt2"])?;
    ensure!(metrics.contains("memory"), "metrics {metrics:?}");
    ctd.ctr_ok(&["tasks", "kill", "-s", "SIGKILL", "tt2"])?;
    ctd.wait_status("tt2", "STOPPED", STATUS_TIMEOUT)?;
    ctd.ctr_ok(&["tasks", "rm", "tt2"])?;
    Ok(())
}

#[test]
fn terminal_ctd21() -> Result<()> {
    terminal(CONTAINERD_2_1_DIR)
}

#[test]
fn terminal_ctd17() -> Result<()> {
    terminal(CONTAINERD_1_7_DIR)
}

/// A lazily restored memhog answers VERIFY with every page intact; with fill policy `none`
/// (annotation) the fetcher serves faults only and never fills in the background.
fn lazy_memhog(dir: &str, mode: &str) -> Result<()> {
    if std::env::var_os("DISTRIPROC_EAGER_RESTORE").is_some() {
        eprintln!("SKIPPED: lazy test with DISTRIPROC_EAGER_RESTORE set");
        return Ok(());
    }
    let Some(ctd) = start(dir)? else {
        return Ok(());
    };
    use distriproc_harness::{memhog_query, MEMHOG_IMAGE, MEMHOG_PORT};
    // The criu-daemon variant also asks, by annotation, for its checkpoints to end it.
    let fetcher_mode = format!("io.distriproc.fetcher-mode={mode}");
    let mut annotations = vec!["io.distriproc.fill-policy=none", fetcher_mode.as_str()];
    let exits = mode == "criu";
    if exits {
        annotations.push("io.distriproc.checkpoint-exit=true");
    }
    ctd.run_detached(
        &annotations,
        MEMHOG_IMAGE,
        "m1",
        &[
            "/memhog",
            "serve",
            "--mib",
            "64",
            "--procs",
            "2",
            "--threads",
            "2",
        ],
        STATUS_TIMEOUT,
    )?;
    let pid = ctd.task_pid("m1")?;
    ensure!(memhog_query(pid, MEMHOG_PORT, "PING")? == "PONG");
    let sum = memhog_query(pid, MEMHOG_PORT, "SUM")?;
    ctd.ctr_ok(&[
        "containers",
        "checkpoint",
        "--task",
        "m1",
        "localhost/m1-cp:1",
    ])?;
    if exits {
        // `ctr containers checkpoint` sends runc's options without `exit`: the annotation ends
        // the container all the same.
        ctd.wait_status("m1", "STOPPED", STATUS_TIMEOUT)
            .with_context(|| {
                format!(
                    "io.distriproc.checkpoint-exit=true: the checkpoint did not end m1: {}",
                    ctd.log_tail(30)
                )
            })?;
    } else {
        ensure!(
            ctd.status("m1") == "RUNNING",
            "m1 did not run on after its checkpoint"
        );
        ctd.ctr_ok(&["tasks", "kill", "-s", "SIGKILL", "m1"])?;
        ctd.wait_status("m1", "STOPPED", STATUS_TIMEOUT)?;
    }
    ctd.ctr_ok(&["tasks", "rm", "m1"])?;
    ctd.ctr_ok(&["containers", "rm", "m1"])?;

    ctd.ctr_ok(&[
        "containers",
        "restore",
        "--live",
        "m1r",
        "localhost/m1-cp:1",
    ])?;
    ctd.wait_status("m1r", "RUNNING", STATUS_TIMEOUT)?;
    let pid = ctd.task_pid("m1r")?;
    let verify = memhog_query(pid, MEMHOG_PORT, "VERIFY")?;
    ensure!(
        verify.starts_with("OK"),
        "VERIFY after lazy restore: {verify}"
    );
    ensure!(
        memhog_query(pid, MEMHOG_PORT, "SUM")? == sum,
        "checksum changed"
    );
    let stats = ctd.lazy_stats("m1r")?;
    if mode == "native" {
        ensure!(
            stats["faults"].as_u64().unwrap_or(0) > 0,
            "no faults: {stats}"
        );
        ensure!(
            stats["pages_filled"].as_u64() == Some(0),
            "fill policy none filled: {stats}"
        );
    } else {
        ensure!(stats["mode"] == "criu", "criu daemon stats: {stats}");
        // CRIU's daemon pushes every page, then exits; its log gives the count.
        let done = wait_for(
            || {
                ctd.lazy_stats("m1r")
                    .map(|v| v["finished"] == true && v["pages_transferred"].as_u64() > Some(0))
                    .unwrap_or(false)
            },
            Duration::from_secs(60),
        );
        ensure!(
            done,
            "criu daemon did not finish: {:?}",
            ctd.lazy_stats("m1r").ok()
        );
    }
    let log = std::fs::read_to_string(ctd.bundle_dir("m1r").join("work/restore.log"))?;
    ensure!(
        log.contains("Lazy restore skips"),
        "restore.log does not show a lazy restore"
    );
    ctd.ctr_ok(&["tasks", "kill", "-s", "SIGKILL", "m1r"])?;
    ctd.wait_status("m1r", "STOPPED", STATUS_TIMEOUT)?;
    ctd.ctr_ok(&["tasks", "rm", "m1r"])?;
    Ok(())
}

#[test]
fn lazy_memhog_ctd21() -> Result<()> {
    lazy_memhog(CONTAINERD_2_1_DIR, "native")
}

#[test]
fn lazy_memhog_criu_daemon_ctd21() -> Result<()> {
    lazy_memhog(CONTAINERD_2_1_DIR, "criu")
}

#[test]
fn lazy_memhog_ctd17() -> Result<()> {
    lazy_memhog(CONTAINERD_1_7_DIR, "native")
}

/// A container that exceeds its memory limit produces a /tasks/oom event.
fn oom_event(dir: &str) -> Result<()> {
    let Some(ctd) = start(dir)? else {
        return Ok(());
    };
    let events_out = ctd.dir().join("events.txt");
    let mut events = std::process::Command::new(ctd.containerd_dir().join("ctr"))
        .arg("-a")
        .arg(ctd.socket())
        .args(["-n", ctd.namespace(), "events"])
        .stdin(std::process::Stdio::null())
        .stdout(std::fs::File::create(&events_out)?)
        .stderr(std::process::Stdio::null())
        .spawn()?;
    let out = ctd.ctr(&[
        "run",
        "--rm",
        "--runtime",
        DISTRIPROC_RUNTIME,
        "--memory-limit",
        "33554432",
        BUSYBOX_IMAGE,
        "oom1",
        "sh",
        "-c",
        "a=$(head -c 200000000 /dev/zero | tr '\\000' x); echo survived",
    ]);
    let seen = wait_for(
        || {
            std::fs::read_to_string(&events_out)
                .map(|t| t.contains("/tasks/oom"))
                .unwrap_or(false)
        },
        Duration::from_secs(20),
    );
    // Our own child, ended by pid.
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(events.id())?),
        nix::sys::signal::Signal::SIGTERM,
    );
    let _ = events.wait();
    let out = out?;
    ensure!(
        !String::from_utf8_lossy(&out.stdout).contains("survived"),
        "the memory limit did not apply"
    );
    ensure!(
        seen,
        "no /tasks/oom event; events:\n{}",
        std::fs::read_to_string(&events_out).unwrap_or_default()
    );
    Ok(())
}

#[test]
fn oom_event_ctd21() -> Result<()> {
    oom_event(CONTAINERD_2_1_DIR)
}

#[test]
fn oom_event_ctd17() -> Result<()> {
    oom_event(CONTAINERD_1_7_DIR)
}

/// containerd loses the shim (killed by us, by pid): it runs `<shim> delete`, which
/// force-deletes the runc container and unmounts the rootfs.
fn shim_killed(dir: &str) -> Result<()> {
    let Some(ctd) = start(dir)? else {
        return Ok(());
    };
    ctd.run_detached(&[], BUSYBOX_IMAGE, "s1", &["sleep", "1000"], STATUS_TIMEOUT)?;
    let task_pid = ctd.task_pid("s1")?;
    let shims = ctd.shim_pids();
    ensure!(shims.len() == 1, "expected one shim, found {shims:?}");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(shims[0])?),
        nix::sys::signal::Signal::SIGKILL,
    )?;
    let gone = wait_for(
        || !Path::new(&format!("/proc/{task_pid}")).exists(),
        Duration::from_secs(30),
    );
    ensure!(
        gone,
        "container process {task_pid} survived its shim; log:\n{}",
        ctd.log_tail(30)
    );
    let root = format!("/run/containerd/runc/{}", ctd.namespace());
    let list = std::process::Command::new("runc")
        .args(["--root", &root, "list", "-q"])
        .output()?;
    ensure!(
        !String::from_utf8_lossy(&list.stdout)
            .lines()
            .any(|l| l == "s1"),
        "runc still knows s1"
    );
    ensure!(
        !ctd.bundle_dir("s1").join("rootfs/bin").exists(),
        "rootfs still mounted"
    );
    // The container record is still there and can be removed.
    let _ = ctd.ctr(&["tasks", "rm", "s1"]);
    ctd.ctr_ok(&["containers", "rm", "s1"])?;
    Ok(())
}

#[test]
fn shim_killed_ctd21() -> Result<()> {
    shim_killed(CONTAINERD_2_1_DIR)
}

#[test]
fn shim_killed_ctd17() -> Result<()> {
    shim_killed(CONTAINERD_1_7_DIR)
}

/// The engine logs through `tracing`, the shim through `log`: the engine's events must reach
/// containerd's log all the same. A restore whose working-set profile cannot be read (the
/// profile directory is a file) raises the fetcher's warning, and the fetcher's per-restore
/// summary follows when the container is gone; both must be in containerd's log (which the
/// shim's log reaches through its log fifo).
fn engine_log(dir: &str) -> Result<()> {
    if std::env::var_os("DISTRIPROC_EAGER_RESTORE").is_some() {
        eprintln!("SKIPPED: lazy test with DISTRIPROC_EAGER_RESTORE set");
        return Ok(());
    }
    if !require_stack_in(Path::new(dir)) {
        return Ok(());
    }
    use distriproc_harness::{memhog_query, MEMHOG_IMAGE, MEMHOG_PORT};
    let tmp = tempfile::tempdir()?;
    let not_a_dir = tmp.path().join("profiles-is-a-file");
    std::fs::write(&not_a_dir, "not a directory")?;
    let cfg = tmp.path().join("shim.toml");
    std::fs::write(
        &cfg,
        format!(
            "[fetcher]\nfill = \"profile\"\nprofile_dir = \"{}\"\n",
            not_a_dir.display()
        ),
    )?;
    let mut opts = ContainerdOpts::with_containerd_dir(dir).shim(SHIM);
    opts.env
        .push(("DISTRIPROC_CONFIG".into(), cfg.display().to_string()));
    let ctd = Containerd::start(opts)?;
    ctd.import_test_images()?;
    ctd.run_detached(
        &[],
        MEMHOG_IMAGE,
        "lg",
        &["/memhog", "serve", "--mib", "16"],
        STATUS_TIMEOUT,
    )?;
    let pid = ctd.task_pid("lg")?;
    ensure!(memhog_query(pid, MEMHOG_PORT, "PING")? == "PONG");
    ctd.checkpoint_and_remove("lg", "localhost/lg-cp:1", STATUS_TIMEOUT)?;
    ctd.ctr_ok(&[
        "containers",
        "restore",
        "--live",
        "lgr",
        "localhost/lg-cp:1",
    ])?;
    ctd.wait_status("lgr", "RUNNING", STATUS_TIMEOUT)?;
    let pid = ctd.task_pid("lgr")?;
    let verify = memhog_query(pid, MEMHOG_PORT, "VERIFY")?;
    ensure!(
        verify.starts_with("OK"),
        "VERIFY after the restore: {verify}"
    );
    let warned = |log: &str| {
        log.lines()
            .find(|l| {
                l.contains("working-set profile refused")
                    && l.contains("profiles-is-a-file")
                    && l.contains("level=warn")
            })
            .map(str::to_owned)
    };
    ensure!(
        wait_for(
            || warned(&ctd.log_text()).is_some(),
            Duration::from_secs(10)
        ),
        "the fetcher's warning is not in containerd's log:\n{}",
        ctd.log_tail(40)
    );
    eprintln!("{}", warned(&ctd.log_text()).unwrap_or_default());
    ctd.ctr_ok(&["tasks", "kill", "-s", "SIGKILL", "lgr"])?;
    ctd.wait_status("lgr", "STOPPED", STATUS_TIMEOUT)?;
    ctd.ctr_ok(&["tasks", "rm", "lgr"])?;
    ensure!(
        wait_for(
            || ctd.log_text().contains("lazy-pages fetcher finished"),
            Duration::from_secs(10)
        ),
        "the fetcher's per-restore summary is not in containerd's log:\n{}",
        ctd.log_tail(40)
    );
    let _ = ctd.ctr(&["containers", "rm", "lgr"]);
    Ok(())
}

#[test]
fn engine_log_ctd21() -> Result<()> {
    engine_log(CONTAINERD_2_1_DIR)
}

#[test]
fn engine_log_ctd17() -> Result<()> {
    engine_log(CONTAINERD_1_7_DIR)
}
