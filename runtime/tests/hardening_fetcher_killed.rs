//! The fetcher's process is SIGKILLed during a lazy restore (fill policy `none`, so most pages
//! are still missing): the restored process must die (SIGBUS from poisoned pages), never run on
//! zero pages.
//!
//! The fetcher runs in a child process (this test binary re-executed with `DP_HARDENING_ROLE`
//! set, running only the `role_*` entry below), so the test can kill it by pid; its uffd keeper
//! is this binary again. The test process is a child subreaper, so the restored tree (detached
//! by criu) is reparented to it and its exit signal can be read with waitpid.
//!
//! `fetcher_killed_without_keeper_*` is the control: the same kill with no keeper shows the
//! kernel behaviour the keeper exists for (the last uffd reference closes, missing pages read
//! as zeros: on this kernel lazyhog then dies of SIGSEGV on its zeroed data, or VERIFY
//! answers BAD).

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use common::*;
use distriproc_config::FillPolicy;
use distriproc_runtime::fetcher::keeper::{keeper_main, KeeperLink};
use distriproc_runtime::fetcher::{FetcherOptions, LazyPagesServer};
use distriproc_runtime::source::LocalImages;
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

const ROLE: &str = "DP_HARDENING_ROLE";

fn self_cmd(test: &str, role: &str) -> Result<Command> {
    let mut c = Command::new(std::env::current_exe()?);
    c.args([test, "--exact", "--nocapture", "--test-threads=1"])
        .env(ROLE, role);
    Ok(c)
}

/// Child role: the uffd keeper (descriptor 3 is its link).
#[test]
fn role_keeper() {
    if std::env::var(ROLE).as_deref() != Ok("keeper") {
        return;
    }
    std::process::exit(keeper_main());
}

/// Child role: a fetcher on `$DP_IMG` / `$DP_WORK`, fill `none`, with a keeper unless
/// `$DP_NO_KEEPER` is set; prints READY once bound and then runs until killed.
#[test]
fn role_fetcher() {
    if std::env::var(ROLE).as_deref() != Ok("fetcher") {
        return;
    }
    let run = || -> Result<()> {
        let img = std::env::var("DP_IMG")?;
        let work = std::env::var("DP_WORK")?;
        let opts = FetcherOptions {
            fill: FillPolicy::None,
            ..FetcherOptions::default()
        };
        let source = Arc::new(LocalImages::open(Path::new(&img))?);
        let mut server = LazyPagesServer::bind(Path::new(&work), Path::new(&img), source, opts)?;
        if std::env::var_os("DP_NO_KEEPER").is_none() {
            let keeper = KeeperLink::spawn(self_cmd("role_keeper", "keeper")?)?;
            eprintln!("keeper pid {}", keeper.pid());
            server = server.with_keeper(Arc::new(keeper));
        }
        let handle = server.spawn()?;
        println!("READY");
        let _ = handle.wait();
        // Normally killed before this.
        std::thread::sleep(Duration::from_secs(3600));
        Ok(())
    };
    if let Err(e) = run() {
        eprintln!("fetcher role failed: {e:#}");
        std::process::exit(1);
    }
}

struct KillChild(Child);

impl Drop for KillChild {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Waits for `pid` (reparented to us) and returns how it ended.
fn wait_exit(pid: i32, timeout: Duration) -> Result<WaitStatus> {
    let until = Instant::now() + timeout;
    loop {
        match waitpid(Pid::from_raw(pid), Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) => {}
            Ok(s) => return Ok(s),
            Err(e) => bail!("waitpid {pid}: {e}"),
        }
        if Instant::now() > until {
            bail!("restored pid {pid} still running after {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Dumps lazyhog, restores it lazily through a fetcher in a child process, kills that process
/// and returns VERIFY's answer (or error) and how the restored process ended.
fn kill_fetcher(name: &str, port: u16, keeper: bool) -> Result<(Result<String>, WaitStatus)> {
    // SAFETY: prctl(PR_SET_CHILD_SUBREAPER) takes no pointers.
    let r = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    ensure!(r == 0, "PR_SET_CHILD_SUBREAPER failed");
    let dir = scratch(name);
    let mut w = Workload::start(&dir, port, 32, 1, 0, false)?;
    let img = dir.join("img");
    let work = dir.join("work");
    std::fs::create_dir_all(&img)?;
    std::fs::create_dir_all(&work)?;
    let pids = dump(&mut w, &img)?;
    let _guard = KillOnDrop(pids.clone());

    let mut cmd = self_cmd("role_fetcher", "fetcher")?;
    cmd.env("DP_IMG", &img)
        .env("DP_WORK", &work)
        .stdin(Stdio::null())
        .stdout(Stdio::piped());
    if !keeper {
        cmd.env("DP_NO_KEEPER", "1");
    }
    let mut child = KillChild(cmd.spawn().context("start the fetcher process")?);
    let out = child.0.stdout.take().context("fetcher stdout")?;
    let mut line = String::new();
    let mut rd = BufReader::new(out);
    loop {
        line.clear();
        if rd.read_line(&mut line)? == 0 {
            bail!("the fetcher process ended before READY");
        }
        if line.trim().ends_with("READY") {
            break;
        }
    }
    let out = restore(&img, &work)?;
    if !out.status.success() {
        bail!(
            "criu restore failed: {:?}\n{}",
            out.status,
            tail(&restore_log(&work), 40)
        );
    }
    ensure!(query(port, "PING", Duration::from_secs(30))? == "PONG");
    let fetcher_pid = child.0.id();
    eprintln!("{name}: killing the fetcher process {fetcher_pid}");
    let _ = child.0.kill();
    let _ = child.0.wait();
    // VERIFY reads every page; nearly all are missing (fill none).
    let verify = query(port, "VERIFY", Duration::from_secs(5));
    eprintln!("{name}: VERIFY after the kill: {verify:?}");
    if !keeper {
        // Nothing makes it fail: it runs on, on zeros.
        kill_pids(&pids);
    }
    let status = wait_exit(pids[0], Duration::from_secs(60)).inspect_err(|_| {
        // Still running: stop it for the next test, report.
        kill_pids(&pids);
    })?;
    eprintln!("{name}: restored pid {} ended: {status:?}", pids[0]);
    Ok((verify, status))
}

#[test]
fn fetcher_killed_with_keeper_gives_sigbus_not_zeros() -> Result<()> {
    if std::env::var_os(ROLE).is_some() || !ready() {
        return Ok(());
    }
    let (verify, status) = kill_fetcher("hardening-keeper", 17401, true)?;
    if let Ok(v) = &verify {
        ensure!(
            v.starts_with("OK") || v.is_empty(),
            "VERIFY answered {v:?} after the fetcher died: zeroed memory"
        );
    }
    ensure!(
        matches!(
            status,
            WaitStatus::Signaled(_, nix::sys::signal::Signal::SIGBUS, _)
        ),
        "the restored process ended with {status:?}, not SIGBUS"
    );
    Ok(())
}

#[test]
fn fetcher_killed_without_keeper_reads_zeros_control() -> Result<()> {
    if std::env::var_os(ROLE).is_some() || !ready() {
        return Ok(());
    }
    let (verify, status) = kill_fetcher("hardening-nokeeper", 17411, false)?;
    // The kernel resolved the missing pages with zeros: the silent corruption the keeper
    // prevents. Measured here: VERIFY gets no answer and the process dies of SIGSEGV (zeroed
    // pointers in its own data), or VERIFY answers BAD; never the clean SIGBUS of poison.
    let v = verify.unwrap_or_else(|e| format!("{e:#}"));
    ensure!(
        v.starts_with("BAD")
            || !matches!(
                status,
                WaitStatus::Signaled(_, nix::sys::signal::Signal::SIGBUS, _)
            ),
        "without a keeper: VERIFY {v:?}, then {status:?}: expected zero-page damage"
    );
    eprintln!("control: {v} then {status:?}");
    Ok(())
}
