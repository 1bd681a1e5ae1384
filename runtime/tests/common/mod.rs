//! Shared helpers of the real-stack tests: probing for root and criu, building the lazyhog
//! workload, starting it in its own session, querying it, dumping and restoring with criu, and
//! killing everything started, by pid.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

pub const CRIU: &str = "/usr/local/sbin/criu";

/// Whether the real-stack tests can run here; prints why not. Panics instead when CI=true.
pub fn ready() -> bool {
    let why = if !nix::unistd::geteuid().is_root() {
        Some("not root".to_string())
    } else if !Path::new(CRIU).exists() {
        Some(format!("{CRIU} missing"))
    } else if !Path::new("/dev/userfaultfd").exists()
        && !Path::new("/proc/sys/vm/unprivileged_userfaultfd").exists()
    {
        Some("no userfaultfd".to_string())
    } else if Command::new("gcc").arg("--version").output().is_err() {
        Some("gcc missing".to_string())
    } else {
        None
    };
    match why {
        None => true,
        Some(w) if std::env::var("CI").as_deref() == Ok("true") => {
            panic!("real-stack test cannot run in CI: {w}")
        }
        Some(w) => {
            eprintln!("SKIP: real-stack test needs root, criu 4.2, userfaultfd and gcc: {w}");
            false
        }
    }
}

/// Builds tests/fixtures/lazyhog.c once per test binary.
pub fn lazyhog() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/lazyhog.c");
        let out =
            Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("lazyhog-{}", std::process::id()));
        let st = Command::new("gcc")
            .args(["-O2", "-Wall", "-o"])
            .arg(&out)
            .arg(&src)
            .arg("-lpthread")
            .status()
            .expect("run gcc");
        assert!(st.success(), "gcc failed on {}", src.display());
        out
    })
}

/// A scratch directory kept on failure for the logs (under CARGO_TARGET_TMPDIR).
pub fn scratch(name: &str) -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("lazy-{name}"));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// The workload as started by the test (before dump).
pub struct Workload {
    pub child: Option<Child>,
    pub pid: i32,
    pub port: u16,
    pub procs: u16,
}

impl Workload {
    pub fn start(
        dir: &Path,
        port: u16,
        mib: u32,
        procs: u16,
        threads: u16,
        zombie: bool,
    ) -> Result<Workload> {
        let args = [
            port.to_string(),
            mib.to_string(),
            procs.to_string(),
            threads.to_string(),
            u8::from(zombie).to_string(),
        ];
        Workload::spawn(dir, lazyhog(), &args, port, procs)
    }

    /// Starts `bin args` in `dir` in a new session with stdio on /dev/null and waits until each
    /// of `procs` ports from `port` answers PING with PONG.
    pub fn spawn(
        dir: &Path,
        bin: &Path,
        args: &[String],
        port: u16,
        procs: u16,
    ) -> Result<Workload> {
        let mut cmd = Command::new(bin);
        cmd.args(args)
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        // SAFETY: setsid() is async-signal-safe and touches no memory of the parent.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
                nix::unistd::setsid()
                    .map(|_| ())
                    .map_err(std::io::Error::from)
            });
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("spawn {}", bin.display()))?;
        let pid = i32::try_from(child.id())?;
        let w = Workload {
            child: Some(child),
            pid,
            port,
            procs,
        };
        for i in 0..procs {
            let r = query(port + i, "PING", Duration::from_secs(20))?;
            if r != "PONG" {
                bail!("{} proc {i} answered {r:?}", bin.display());
            }
        }
        Ok(w)
    }

    /// Reaps the original process after criu dump killed it.
    pub fn reap(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.wait();
        }
    }
}

impl Drop for Workload {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Sends one line to 127.0.0.1:port, retrying the connect until `timeout`; returns the reply.
pub fn query(port: u16, cmd: &str, timeout: Duration) -> Result<String> {
    let until = Instant::now() + timeout;
    loop {
        match TcpStream::connect(("127.0.0.1", port)) {
            Ok(mut s) => {
                s.set_read_timeout(Some(Duration::from_secs(60)))?;
                s.write_all(format!("{cmd}\n").as_bytes())?;
                let mut out = String::new();
                s.read_to_string(&mut out)?;
                return Ok(out.trim().to_string());
            }
            Err(e) if Instant::now() >= until => bail!("connect to port {port}: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    }
}

/// `criu dump -t PID -D imgdir -o dump.log -v4`, then reaps the workload and waits until every
/// pid of the tree has disappeared.
pub fn dump(w: &mut Workload, imgdir: &Path) -> Result<Vec<i32>> {
    let pids = tree_pids(w.pid);
    let out = Command::new(CRIU)
        .args(["dump", "-t", &w.pid.to_string(), "-D"])
        .arg(imgdir)
        .args(["-o", "dump.log", "-v4"])
        .output()?;
    if !out.status.success() {
        let log = std::fs::read_to_string(imgdir.join("dump.log")).unwrap_or_default();
        bail!("criu dump failed: {:?}\n{}", out.status, tail(&log, 40));
    }
    w.reap();
    wait_gone(&pids, Duration::from_secs(10))?;
    Ok(pids)
}

/// The pid and all its descendants (from /proc).
pub fn tree_pids(root: i32) -> Vec<i32> {
    let mut out = vec![root];
    let mut i = 0;
    while i < out.len() {
        let p = out[i];
        if let Ok(entries) = std::fs::read_dir(format!("/proc/{p}/task")) {
            for t in entries.flatten() {
                let children =
                    std::fs::read_to_string(t.path().join("children")).unwrap_or_default();
                for c in children.split_whitespace() {
                    if let Ok(c) = c.parse::<i32>() {
                        if !out.contains(&c) {
                            out.push(c);
                        }
                    }
                }
            }
        }
        i += 1;
    }
    out
}

pub fn wait_gone(pids: &[i32], timeout: Duration) -> Result<()> {
    let until = Instant::now() + timeout;
    while pids
        .iter()
        .any(|p| Path::new(&format!("/proc/{p}")).exists())
    {
        if Instant::now() > until {
            bail!("pids {pids:?} still exist");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

/// `criu restore -D imgdir -W workdir --lazy-pages --restore-detached -o restore.log -v4`.
pub fn restore(imgdir: &Path, workdir: &Path) -> Result<std::process::Output> {
    Ok(Command::new(CRIU)
        .args(["restore", "-D"])
        .arg(imgdir)
        .arg("-W")
        .arg(workdir)
        .args([
            "--lazy-pages",
            "--restore-detached",
            "-o",
            "restore.log",
            "-v4",
        ])
        .stdin(Stdio::null())
        .output()?)
}

pub fn restore_log(workdir: &Path) -> String {
    std::fs::read_to_string(workdir.join("restore.log")).unwrap_or_default()
}

/// SIGKILLs the given pids (the restored tree) and waits until they are gone.
pub fn kill_pids(pids: &[i32]) {
    for &p in pids {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(p),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    let _ = wait_gone(pids, Duration::from_secs(10));
}

/// Kills the given pids when dropped (restored processes are not our children).
pub struct KillOnDrop(pub Vec<i32>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        kill_pids(&self.0);
    }
}

pub fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
