//! Hardening tests on the real stack (private containerd, runc, CRIU): what happens to a lazily
//! restored container when the process serving its page faults dies.
//!
//! `shim_killed_*`: memhog is restored with fill policy `none` (most pages stay missing), then
//! its shim is SIGKILLed. Without the uffd keeper the last reference to each task's
//! userfaultfd would close and the kernel would hand the tasks zero pages (perf-facts §3.2).
//! With it, the keeper poisons the missing pages: reading one gives SIGBUS. containerd is
//! SIGSTOPped around the kill so that its own clean-up of a dead shim (`shim delete`: runc
//! delete --force) cannot hide the outcome. The test checks that VERIFY never answers BAD (it
//! reads every page: the container either answers OK or dies), that the container's processes
//! are gone while containerd is still stopped, that containerd publishes a
//! TaskExit with a non-zero exit status (137: the shim's `delete` after a dead shim), and that
//! the keeper exits once its tasks are gone.
//!
//! They skip with a reason when the stack is missing and fail instead when `CI=true`.

use std::{
    io::Read,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use anyhow::{ensure, Context, Result};
use distriproc_harness::{
    memhog_query, memhog_query_timeout, require_stack_in, wait_for, Containerd, ContainerdOpts,
    CONTAINERD_1_7_DIR, CONTAINERD_2_1_DIR, DISTRIPROC_RUNTIME, MEMHOG_IMAGE, MEMHOG_PORT,
};

const SHIM: &str = env!("CARGO_BIN_EXE_containerd-shim-distriproc-v2");
const KEEPER_ARG: &str = "distriproc-uffd-keeper";

fn start(dir: &str) -> Result<Option<Containerd>> {
    if std::env::var_os("DISTRIPROC_EAGER_RESTORE").is_some() {
        eprintln!("SKIPPED: lazy test with DISTRIPROC_EAGER_RESTORE set");
        return Ok(None);
    }
    if !require_stack_in(Path::new(dir)) {
        return Ok(None);
    }
    let ctd = Containerd::start(ContainerdOpts::with_containerd_dir(dir).shim(SHIM))?;
    ctd.import_test_images()?;
    Ok(Some(ctd))
}

fn status(ctd: &Containerd, id: &str) -> String {
    ctd.task_status(id)
        .ok()
        .flatten()
        .unwrap_or_else(|| "ABSENT".into())
}

fn wait_status(ctd: &Containerd, id: &str, want: &str) -> Result<()> {
    let ok = wait_for(|| status(ctd, id) == want, Duration::from_secs(60));
    ensure!(
        ok,
        "task {id} is {} instead of {want}; log:\n{}",
        status(ctd, id),
        ctd.log_tail(40)
    );
    Ok(())
}

/// Command line of a process, NUL-separated fields joined by spaces.
fn cmdline(pid: u32) -> Option<String> {
    let b = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    Some(
        b.split(|c| *c == 0)
            .map(|s| String::from_utf8_lossy(s).into_owned())
            .collect::<Vec<_>>()
            .join(" "),
    )
}

fn ppid(pid: u32) -> Option<u32> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &s[s.rfind(')')? + 2..];
    rest.split_whitespace().nth(1)?.parse().ok()
}

/// Alive and not a zombie.
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            s.rfind(')')
                .and_then(|i| s[i + 2..].chars().next())
                .is_some_and(|st| st != 'Z' && st != 'X')
        })
        .unwrap_or(false)
}

/// Keeper processes whose parent is `shim`.
fn keepers_of(shim: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if cmdline(pid).is_some_and(|c| c.contains(KEEPER_ARG)) && ppid(pid) == Some(shim) {
            out.push(pid);
        }
    }
    out
}

/// The shim serving container `id` (its command line names the id).
fn shim_of(ctd: &Containerd, id: &str) -> Result<u32> {
    let pids = ctd.shim_pids();
    pids.iter()
        .copied()
        .find(|p| {
            cmdline(*p).is_some_and(|c| {
                c.split(' ')
                    .collect::<Vec<_>>()
                    .windows(2)
                    .any(|w| w == ["-id", id])
            })
        })
        .or_else(|| (pids.len() == 1).then(|| pids[0]))
        .with_context(|| format!("no shim for {id} among {pids:?}"))
}

fn signal(pid: u32, sig: nix::sys::signal::Signal) {
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), sig);
}

fn kill9(pid: u32) {
    signal(pid, nix::sys::signal::Signal::SIGKILL);
}

/// A SIGSTOPped process, continued on drop.
struct Frozen(u32);

impl Drop for Frozen {
    fn drop(&mut self) {
        signal(self.0, nix::sys::signal::Signal::SIGCONT);
    }
}

/// `ctr events` into a file, killed by pid on drop.
struct Events {
    child: Child,
    out: PathBuf,
}

impl Events {
    fn start(ctd: &Containerd) -> Result<Events> {
        let out = ctd.dir().join(format!("events-{}.txt", std::process::id()));
        let f = std::fs::File::create(&out)?;
        let child = Command::new(ctd.containerd_dir().join("ctr"))
            .arg("-a")
            .arg(ctd.socket())
            .arg("-n")
            .arg(ctd.namespace())
            .arg("events")
            .stdin(Stdio::null())
            .stdout(f)
            .stderr(Stdio::null())
            .spawn()
            .context("start ctr events")?;
        Ok(Events { child, out })
    }

    fn text(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = std::fs::File::open(&self.out) {
            let _ = f.read_to_string(&mut s);
        }
        s
    }

    /// The exit_status of the first /tasks/exit event of container `id`.
    fn exit_status(&self, id: &str) -> Option<u64> {
        self.text()
            .lines()
            .filter(|l| l.contains("/tasks/exit") && l.contains(id))
            .find_map(|l| {
                let i = l.find("exit_status")?;
                let tail = &l[i..];
                let digits: String = tail
                    .chars()
                    .skip_while(|c| !c.is_ascii_digit())
                    .take_while(char::is_ascii_digit)
                    .collect();
                digits.parse().ok()
            })
    }
}

impl Drop for Events {
    fn drop(&mut self) {
        kill9(self.child.id());
        let _ = self.child.wait();
    }
}

/// Runs memhog under our shim, checkpoints it and restores it lazily with fill `none`;
/// returns the restored task's pid.
fn lazy_memhog_fill_none(ctd: &Containerd, id: &str, mib: u64) -> Result<u32> {
    let src = format!("{id}-src");
    let image = format!("localhost/{id}-cp:1");
    ctd.ctr_ok(&[
        "run",
        "-d",
        "--runtime",
        DISTRIPROC_RUNTIME,
        "--annotation",
        "io.distriproc.fill-policy=none",
        MEMHOG_IMAGE,
        &src,
        "/memhog",
        "serve",
        "--mib",
        &mib.to_string(),
        "--procs",
        "2",
    ])?;
    wait_status(ctd, &src, "RUNNING")?;
    let pid = ctd.task_pid(&src)?;
    ensure!(memhog_query(pid, MEMHOG_PORT, "PING")? == "PONG");
    ctd.ctr_ok(&["containers", "checkpoint", "--task", &src, &image])?;
    ctd.ctr_ok(&["tasks", "kill", "-s", "SIGKILL", &src])?;
    wait_status(ctd, &src, "STOPPED")?;
    ctd.ctr_ok(&["tasks", "rm", &src])?;
    ctd.ctr_ok(&["containers", "rm", &src])?;
    ctd.ctr_ok(&["containers", "restore", "--live", id, &image])?;
    wait_status(ctd, id, "RUNNING")?;
    let pid = ctd.task_pid(id)?;
    ensure!(memhog_query(pid, MEMHOG_PORT, "PING")? == "PONG");
    Ok(pid)
}

/// Host pids of the processes in the pid namespace of `init` (init included).
fn pidns_members(init: u32) -> Vec<u32> {
    let Ok(ns) = std::fs::read_link(format!("/proc/{init}/ns/pid")) else {
        return vec![];
    };
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if std::fs::read_link(format!("/proc/{pid}/ns/pid")).ok() == Some(ns.clone()) {
            out.push(pid);
        }
    }
    out
}

fn shim_killed(dir: &str) -> Result<()> {
    let Some(ctd) = start(dir)? else {
        return Ok(());
    };
    let events = Events::start(&ctd)?;
    let id = "hk1";
    let pid = lazy_memhog_fill_none(&ctd, id, 32)?;
    let members = pidns_members(pid);
    ensure!(members.len() >= 2, "memhog processes: {members:?}");
    let shim = shim_of(&ctd, id)?;
    let keepers = keepers_of(shim);
    ensure!(
        keepers.len() == 1,
        "expected one uffd keeper under shim {shim}, found {keepers:?}"
    );
    let keeper = keepers[0];
    let stats = ctd.lazy_stats(id)?;
    eprintln!("before the kill: shim {shim}, keeper {keeper}, memhog {members:?}, stats {stats}");
    let keeper_log = ctd.bundle_dir(id).join("work/uffd-keeper.log");

    // containerd is stopped while the shim dies, so its clean-up of a dead shim (runc delete
    // --force) cannot kill the container first: what happens next is the keeper's doing.
    let ctd_pid = ctd.pid().context("containerd pid")?;
    signal(ctd_pid, nix::sys::signal::Signal::SIGSTOP);
    let frozen = Frozen(ctd_pid);
    kill9(shim);
    ensure!(
        wait_for(|| !alive(shim), Duration::from_secs(10)),
        "shim {shim} still alive after SIGKILL"
    );
    // VERIFY reads every page of both processes: most were never fetched.
    let verify = memhog_query_timeout(pid, MEMHOG_PORT, "VERIFY", Duration::from_secs(10));
    match &verify {
        Ok(line) => {
            eprintln!("VERIFY after the shim died: {line}");
            ensure!(
                line.starts_with("OK"),
                "the restored container answered VERIFY with {line:?}: zeroed memory"
            )
        }
        Err(e) => eprintln!("VERIFY got no answer (the container died): {e:#}"),
    }
    // The container's processes die (SIGBUS on a poisoned page) with containerd still stopped.
    ensure!(
        wait_for(
            || members.iter().all(|p| !alive(*p)),
            Duration::from_secs(60)
        ),
        "memhog processes still alive: {:?}",
        members.iter().filter(|p| alive(**p)).collect::<Vec<_>>()
    );
    drop(frozen);
    ensure!(
        wait_for(|| !alive(keeper), Duration::from_secs(30)),
        "uffd keeper {keeper} still running after its tasks died"
    );
    let log = std::fs::read_to_string(&keeper_log).unwrap_or_default();
    eprintln!("keeper log:\n{log}");
    ensure!(
        log.contains("poisoned") && log.contains("every held task is gone"),
        "keeper log {}: {log}",
        keeper_log.display()
    );
    // containerd noticed: a TaskExit with a non-zero status, the task is no longer running.
    ensure!(
        wait_for(|| events.exit_status(id).is_some(), Duration::from_secs(60)),
        "no /tasks/exit event for {id}; events:\n{}\nlog:\n{}",
        events.text(),
        ctd.log_tail(40)
    );
    let code = events.exit_status(id).unwrap_or(0);
    eprintln!("TaskExit of {id}: exit_status {code}");
    ensure!(
        code != 0,
        "TaskExit with status 0 after the shim was killed"
    );
    ensure!(
        wait_for(|| status(&ctd, id) != "RUNNING", Duration::from_secs(60)),
        "task {id} still RUNNING"
    );
    let _ = ctd.ctr(&["tasks", "rm", "-f", id]);
    let _ = ctd.ctr(&["containers", "rm", id]);
    Ok(())
}

#[test]
fn shim_killed_during_lazy_restore_ctd21() -> Result<()> {
    shim_killed(CONTAINERD_2_1_DIR)
}

#[test]
fn shim_killed_during_lazy_restore_ctd17() -> Result<()> {
    shim_killed(CONTAINERD_1_7_DIR)
}

fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

fn threads(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task")).map_or(0, |d| d.count())
}

fn temp_checkpoints(ctd: &Containerd) -> Vec<String> {
    std::fs::read_dir(ctd.tmp_dir())
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("ctrd-checkpoint"))
        .collect()
}

/// Checkpoint-then-restore cycles through containerd (`DP_E2E_CYCLES`, default 100, about a
/// minute here): cycle i restores checkpoint i lazily, VERIFYs, waits for the fill, and
/// checkpoints the restored container as checkpoint i+1 (containerd 2.x only: 1.7 cannot
/// checkpoint a restored container). Each restore is a new container and so a new shim (containerd starts one per container), so
/// what can leak across cycles is what outlives a shim: `ctrd-checkpoint*` dirs, keeper or
/// shim processes, bundles. Each shim's descriptors and threads at the same point of its
/// life are also compared (a per-restore leak inside the shim would show as growth). The
/// in-process version with 100 cycles through one process is runtime/tests/hardening_lifetime.rs.
fn restore_cycles(dir: &str) -> Result<()> {
    let Some(ctd) = start(dir)? else {
        return Ok(());
    };
    let cycles: usize = std::env::var("DP_E2E_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100);
    let src = "hc-src";
    ctd.ctr_ok(&[
        "run",
        "-d",
        "--runtime",
        DISTRIPROC_RUNTIME,
        MEMHOG_IMAGE,
        src,
        "/memhog",
        "serve",
        "--mib",
        "16",
    ])?;
    wait_status(&ctd, src, "RUNNING")?;
    let pid = ctd.task_pid(src)?;
    ensure!(memhog_query(pid, MEMHOG_PORT, "PING")? == "PONG");
    ctd.ctr_ok(&[
        "containers",
        "checkpoint",
        "--task",
        src,
        "localhost/hc-cp:c0",
    ])?;
    ctd.ctr_ok(&["tasks", "kill", "-s", "SIGKILL", src])?;
    wait_status(&ctd, src, "STOPPED")?;
    ctd.ctr_ok(&["tasks", "rm", src])?;
    ctd.ctr_ok(&["containers", "rm", src])?;
    ensure!(
        wait_for(|| ctd.shim_pids().is_empty(), Duration::from_secs(30)),
        "shims left: {:?}",
        ctd.shim_pids()
    );
    let t0 = std::time::Instant::now();
    let mut seen: Vec<(usize, usize)> = Vec::new();
    for i in 0..cycles {
        let id = format!("hc{i}");
        let from = format!("localhost/hc-cp:c{i}");
        ctd.ctr_ok(&["containers", "restore", "--live", &id, &from])?;
        wait_status(&ctd, &id, "RUNNING")?;
        let pid = ctd.task_pid(&id)?;
        let v = memhog_query(pid, MEMHOG_PORT, "VERIFY")?;
        ensure!(v.starts_with("OK"), "cycle {i}: VERIFY {v}");
        // Fill complete: the keeper is released and the temp checkpoint dir removed.
        let shim = shim_of(&ctd, &id)?;
        ensure!(
            wait_for(
                || keepers_of(shim).is_empty() && temp_checkpoints(&ctd).is_empty(),
                Duration::from_secs(60)
            ),
            "cycle {i}: keeper {:?} or temp checkpoints {:?} left after the fill; stats {:?}",
            keepers_of(shim),
            temp_checkpoints(&ctd),
            ctd.lazy_stats(&id).ok()
        );
        seen.push((fd_count(shim), threads(shim)));
        // Checkpoint the restored container: the next cycle restores from this one.
        let next = format!("localhost/hc-cp:c{}", i + 1);
        ctd.ctr_ok(&["containers", "checkpoint", "--task", &id, &next])?;
        if i > 0 {
            let _ = ctd.ctr(&["images", "rm", &from]);
        }
        ctd.ctr_ok(&["tasks", "kill", "-s", "SIGKILL", &id])?;
        wait_status(&ctd, &id, "STOPPED")?;
        ctd.ctr_ok(&["tasks", "rm", &id])?;
        ctd.ctr_ok(&["containers", "rm", &id])?;
        ensure!(
            wait_for(|| !alive(shim), Duration::from_secs(30)),
            "cycle {i}: shim {shim} still running after its container was removed"
        );
        ensure!(
            !ctd.bundle_dir(&id).exists(),
            "cycle {i}: bundle {} left",
            ctd.bundle_dir(&id).display()
        );
    }
    eprintln!(
        "{cycles} restore cycles in {:?}; shim (fds, threads) after each fill: {seen:?}",
        t0.elapsed()
    );
    if let (Some(first), Some(max)) = (seen.first(), seen.iter().max()) {
        // Same point of a shim's life each time: no drift from cycle to cycle.
        ensure!(
            max.0 <= first.0 + 2,
            "shim descriptors drift across restores: {seen:?}"
        );
    }
    ensure!(
        ctd.shim_pids().is_empty(),
        "shims left: {:?}",
        ctd.shim_pids()
    );
    Ok(())
}

#[test]
fn restore_cycles_leave_nothing_ctd21() -> Result<()> {
    restore_cycles(CONTAINERD_2_1_DIR)
}
