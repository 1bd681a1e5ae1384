//! `evict::madvise` against a real multi-threaded process (memhog, on the host network): the
//! injected `MADV_DONTNEED` drops exactly the pages asked for (memhog's VERIFY then finds zero
//! pages there; without userfaultfd nothing brings them back), the process keeps serving, is
//! neither stopped nor traced afterwards, and a thread that is stopped, or whose seccomp filter
//! kills on `madvise`, is refused without being touched.

use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use distriproc_harness::{memhog_bin, memhog_query};
use distriproc_runtime::evict::{self, Advice, EvictError};

const MIB: u64 = 16;
/// x86_64 system call numbers.
const SYS_MADVISE: u32 = 28;
const SYS_PROCESS_MADVISE: u32 = 440;

fn root() -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if !root {
        if std::env::var_os("CI").is_some() {
            panic!("CI=true but not root: ptrace of another process needs root here");
        }
        eprintln!("SKIPPED: needs root");
    }
    root
}

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// A memhog server, killed on drop.
struct Memhog {
    child: Child,
    port: u16,
}

impl Drop for Memhog {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Memhog {
    /// Starts memhog; `kill_on`: a system call number its seccomp filter kills the process on.
    fn start(kill_on: Option<u32>) -> Result<Memhog> {
        let port = free_port()?;
        let mut cmd = Command::new(memhog_bin()?);
        cmd.args(["serve", "--mib", &MIB.to_string(), "--threads", "4"])
            .args(["--port", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        if let Some(nr) = kill_on {
            // SAFETY: between fork and exec the closure only makes two system calls on data
            // prepared before the fork.
            unsafe {
                cmd.pre_exec(move || install_kill_on(nr));
            }
        }
        let child = cmd.spawn().context("start memhog")?;
        let m = Memhog { child, port };
        let t0 = Instant::now();
        while memhog_query(m.pid(), port, "PING")
            .map(|r| r != "PONG")
            .unwrap_or(true)
        {
            ensure!(
                t0.elapsed() < Duration::from_secs(30),
                "memhog did not answer"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(m)
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn query(&self, cmd: &str) -> Result<String> {
        memhog_query(self.pid(), self.port, cmd)
    }

    /// The anonymous mapping that holds memhog's memory: (start, end).
    fn memory(&self) -> Result<(u64, u64)> {
        let maps = std::fs::read_to_string(format!("/proc/{}/maps", self.pid()))?;
        maps.lines()
            .filter_map(|l| {
                let mut f = l.split_whitespace();
                let (s, e) = f.next()?.split_once('-')?;
                let perms = f.next()?;
                let inode = f.nth(2)?;
                let name = f.next();
                let (s, e) = (
                    u64::from_str_radix(s, 16).ok()?,
                    u64::from_str_radix(e, 16).ok()?,
                );
                (perms.starts_with("rw") && inode == "0" && name.is_none() && e - s >= MIB << 20)
                    .then_some((s, e))
            })
            .max_by_key(|(s, e)| e - s)
            .context("no anonymous mapping of memhog's size")
    }

    /// Its threads, the main one first.
    fn threads(&self) -> Result<Vec<i32>> {
        let mut t: Vec<i32> = std::fs::read_dir(format!("/proc/{}/task", self.pid()))?
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
            .collect();
        t.sort_unstable();
        Ok(t)
    }

    /// State and TracerPid of thread `tid`.
    fn state(&self, tid: i32) -> Result<(String, String)> {
        let s = std::fs::read_to_string(format!("/proc/{}/task/{tid}/status", self.pid()))?;
        let f = |k: &str| {
            s.lines()
                .find_map(|l| l.strip_prefix(k))
                .map(|v| v.trim().to_owned())
                .unwrap_or_default()
        };
        Ok((f("State:"), f("TracerPid:")))
    }
}

/// seccomp filter: kill the process on system call `nr`, allow everything else.
fn install_kill_on(nr: u32) -> std::io::Result<()> {
    let prog = [
        libc::sock_filter {
            code: 0x20,
            jt: 0,
            jf: 0,
            k: 0,
        }, // ld [nr]
        libc::sock_filter {
            code: 0x15,
            jt: 0,
            jf: 1,
            k: nr,
        }, // jeq nr
        libc::sock_filter {
            code: 0x06,
            jt: 0,
            jf: 0,
            k: 0x8000_0000,
        }, // ret kill process
        libc::sock_filter {
            code: 0x06,
            jt: 0,
            jf: 0,
            k: 0x7fff_0000,
        }, // ret allow
    ];
    let fprog = libc::sock_fprog {
        len: 4,
        filter: prog.as_ptr().cast_mut(),
    };
    // SAFETY: prctl and seccomp with valid arguments; `fprog` points into `prog`, which lives
    // until the call returns (the kernel copies the program).
    unsafe {
        if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
            || libc::syscall(
                libc::SYS_seccomp,
                libc::SECCOMP_SET_MODE_FILTER,
                0,
                &fprog as *const libc::sock_fprog,
            ) != 0
        {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

#[test]
fn madvise_runs_in_a_thread_of_a_running_process() -> Result<()> {
    if !root() {
        return Ok(());
    }
    let m = Memhog::start(None)?;
    ensure!(m.query("VERIFY")?.starts_with("OK"), "VERIFY before");
    let (start, end) = m.memory()?;
    let threads = m.threads()?;
    ensure!(threads.len() >= 4, "memhog has {} threads", threads.len());
    // A worker thread, not the main one: the call acts on the whole address space.
    let tid = *threads.last().unwrap_or(&0);
    let before = m.state(tid)?;
    // Two batched ranges: the first and the last 1 MiB.
    let ranges = [(start, start + (1 << 20)), (end - (1 << 20), end)];
    let t0 = Instant::now();
    let done = evict::madvise(tid, &ranges, Advice::DontNeed)?;
    let took = t0.elapsed();
    ensure!(done.ranges == 2 && done.bytes == 2 << 20, "{done:?}");
    eprintln!("2 ranges (2 MiB) dropped in thread {tid} in {took:?}");
    // The pages are gone (zero now), the rest is intact, and the process serves on.
    let v = m.query("VERIFY")?;
    ensure!(
        v.starts_with("BAD page=0 "),
        "VERIFY after dropping the first MiB: {v}"
    );
    ensure!(m.query("PING")? == "PONG");
    let after = m.state(tid)?;
    ensure!(after.1 == "0", "thread {tid} still traced: {after:?}");
    ensure!(
        !after.0.starts_with('T') && !after.0.starts_with('t'),
        "thread {tid} left stopped: {after:?} (before: {before:?})"
    );
    // The main thread is blocked in accept(): the injected call interrupts it, and the
    // accept restarts when the thread is released, so the next query is answered.
    let main = threads[0];
    let mid = start + (4 << 20);
    evict::madvise(main, &[(mid, mid + 4096)], Advice::DontNeed)?;
    ensure!(
        m.query("PING")? == "PONG",
        "the main thread's accept did not restart"
    );
    let after = m.state(main)?;
    ensure!(
        after.1 == "0" && !after.0.starts_with('t'),
        "main thread left {after:?}"
    );
    // Nothing to do is nothing done.
    ensure!(evict::madvise(tid, &[], Advice::DontNeed)?.ranges == 0);
    Ok(())
}

#[test]
fn stopped_and_seccomp_filtered_tasks_are_left_alone() -> Result<()> {
    if !root() {
        return Ok(());
    }
    // Group-stopped: refused, and still stopped afterwards.
    let m = Memhog::start(None)?;
    let (start, _) = m.memory()?;
    let pid = m.pid() as i32;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGSTOP,
    )?;
    let t0 = Instant::now();
    while !m.state(pid)?.0.starts_with('T') {
        ensure!(
            t0.elapsed() < Duration::from_secs(5),
            "SIGSTOP did not stop memhog"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    match evict::madvise(pid, &[(start, start + 4096)], Advice::DontNeed) {
        Err(EvictError::Refused { .. }) => {}
        other => bail!("a stopped task was not refused: {other:?}"),
    }
    ensure!(
        m.state(pid)?.0.starts_with('T'),
        "the refusal resumed the task"
    );
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGCONT,
    )?;
    ensure!(
        m.query("VERIFY")?.starts_with("OK"),
        "VERIFY after the refusal"
    );

    // A filter that kills on madvise: refused, the process lives and its memory is intact.
    let k = Memhog::start(Some(SYS_MADVISE))?;
    let (start, _) = k.memory()?;
    let tid = *k.threads()?.last().unwrap_or(&0);
    match evict::madvise(tid, &[(start, start + 4096)], Advice::DontNeed) {
        Err(EvictError::Refused { why, .. }) => {
            ensure!(why.contains("seccomp"), "refused for another reason: {why}")
        }
        other => bail!("madvise under a killing seccomp filter was not refused: {other:?}"),
    }
    ensure!(
        k.query("VERIFY")?.starts_with("OK"),
        "memory changed after the refusal"
    );
    ensure!(k.state(tid)?.1 == "0", "left traced");
    // A process that is gone.
    let mut gone = Command::new("true").spawn()?;
    let gpid = gone.id() as i32;
    gone.wait()?;
    ensure!(
        matches!(
            evict::madvise(gpid, &[(0x1000, 0x2000)], Advice::DontNeed),
            Err(EvictError::Gone { .. })
        ),
        "an exited pid was not reported gone"
    );
    Ok(())
}

/// Whether page `addr` of `pid` is present (`/proc/<pid>/pagemap` bit 63).
fn present(pid: u32, addr: u64) -> Result<bool> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(format!("/proc/{pid}/pagemap"))?;
    let mut e = [0u8; 8];
    f.read_exact_at(&mut e, addr / 4096 * 8)?;
    Ok(u64::from_ne_bytes(e) >> 63 == 1)
}

/// The mappings of `m`.
fn maps(m: &Memhog) -> Result<String> {
    Ok(std::fs::read_to_string(format!("/proc/{}/maps", m.pid()))?)
}

/// Every other page from page 2 on, `n` of them, as one-page ranges.
fn every_other_page(start: u64, n: u64) -> Vec<(u64, u64)> {
    (0..n)
        .map(|i| start + (2 + 2 * i) * 4096)
        .map(|a| (a, a + 4096))
        .collect()
}

/// Checks that exactly the pages of `ranges` are gone from `m` (the pages between stay).
fn only_these_dropped(m: &Memhog, ranges: &[(u64, u64)]) -> Result<()> {
    for &(s, _) in ranges {
        ensure!(!present(m.pid(), s)?, "page {s:#x} was not dropped");
        ensure!(
            present(m.pid(), s - 4096)?,
            "page {:#x} was dropped too",
            s - 4096
        );
    }
    let v = m.query("VERIFY")?;
    ensure!(v.starts_with("BAD page=2 "), "VERIFY after: {v}");
    Ok(())
}

#[test]
fn many_ranges_go_in_few_calls_while_the_process_is_stopped() -> Result<()> {
    if !root() {
        return Ok(());
    }
    let m = Memhog::start(None)?;
    ensure!(m.query("VERIFY")?.starts_with("OK"), "VERIFY before");
    let (start, end) = m.memory()?;
    let n = 1500u64;
    ensure!(start + (2 + 2 * n) * 4096 <= end);
    let ranges = every_other_page(start, n);
    let maps_before = maps(&m)?;
    let mut p = evict::StoppedProcess::stop(m.pid() as i32)?;
    let t0 = Instant::now();
    let (done, err) = p.madvise_all(&ranges, Advice::DontNeed);
    let took = t0.elapsed();
    p.release()?;
    ensure!(err.is_none(), "{err:?}");
    ensure!(
        done.ranges == ranges.len() && done.bytes == n * 4096,
        "{done:?}"
    );
    // mmap, two process_madvise (1024 + 476 ranges), munmap.
    ensure!(
        done.calls == 4,
        "{} system calls for {n} ranges",
        done.calls
    );
    eprintln!("{n} ranges dropped with {} calls in {took:?}", done.calls);
    only_these_dropped(&m, &ranges)?;
    // The scratch area is gone again (the layout is as before), and the threads run.
    ensure!(
        maps(&m)? == maps_before,
        "the injector left the task's mappings changed"
    );
    ensure!(m.query("PING")? == "PONG");
    for tid in m.threads()? {
        let st = m.state(tid)?;
        ensure!(
            st.1 == "0" && !st.0.starts_with('t'),
            "thread {tid} left {st:?}"
        );
    }
    Ok(())
}

#[test]
fn a_filter_against_process_madvise_makes_it_one_madvise_per_range() -> Result<()> {
    if !root() {
        return Ok(());
    }
    let m = Memhog::start(Some(SYS_PROCESS_MADVISE))?;
    let (start, _) = m.memory()?;
    let ranges = every_other_page(start, 40);
    let mut p = evict::StoppedProcess::stop(m.pid() as i32)?;
    let t0 = Instant::now();
    let (done, err) = p.madvise_all(&ranges, Advice::DontNeed);
    let took = t0.elapsed();
    p.release()?;
    eprintln!("40 ranges dropped with {} calls in {took:?}", done.calls);
    ensure!(err.is_none(), "{err:?}");
    ensure!(done.ranges == 40 && done.calls == 40, "{done:?}");
    only_these_dropped(&m, &ranges)?;
    ensure!(m.query("PING")? == "PONG", "the process did not survive");
    Ok(())
}
