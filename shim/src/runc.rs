//! Running runc from a subreaper without losing exit statuses.
//!
//! The shim reaps every child (`waitpid(-1)` on SIGCHLD inside containerd-shim) and reports exits
//! through its exit monitor. [`ShimExecutor`] therefore subscribes to that monitor *before*
//! spawning runc and takes runc's exit status from the monitor instead of `wait()`; it implements
//! the `runc` crate's `Spawner` so the crate's create/start/exec/kill/... use it too.
//! Checkpoint and restore, which the crate does not implement, are run from the typed argv of
//! `crate::runc_cmd` through the same executor ([`RuncClient::run_raw`]).
//!
//! Every runc command, the crate's and the raw ones, runs the way containerd's runc shim
//! (go-runc, `pkg/process.NewRunc`) runs it, so that a wrapper chosen as `BinaryName` (such as
//! containerd's failpoint `runc-fp`, which reads `config.json` and `init.pid` from its working
//! directory) sees the same thing under both shims: the binary is resolved like Go's
//! `exec.LookPath` ([`resolve_binary`]), the working directory is the container's bundle (the
//! runc shim's own cwd), the environment is the shim's without `NOTIFY_SOCKET`, the argv starts
//! with `--root <root>/<ns> --log <bundle>/log.json --log-format json`. (go-runc's
//! `PdeathSignal` is not copied: the parent-death signal follows the forking thread, and a
//! tokio blocking-pool thread that exits when idle would kill a runc still at work.)

use std::{
    ffi::OsString,
    path::{Path, PathBuf},
    process::{ExitStatus, Stdio},
    sync::Arc,
};

use crate::runc_cmd::GlobalArgs;
use async_trait::async_trait;
use containerd_shim::monitor::{monitor_subscribe, monitor_unsubscribe, Subject, Topic};
use runc::{options::GlobalOpts, Command, Runc, Spawner};
use tokio::io::AsyncReadExt;

use crate::{
    error::{Result, ShimError},
    options::ShimOptions,
};

/// Spawns runc (in the container's bundle) and collects its exit from the shim's exit monitor.
#[derive(Debug, Default, Clone)]
pub struct ShimExecutor {
    /// Working directory of the commands: the container's bundle. `None`, or a directory that
    /// is gone (a bundle deleted under a grouped shim), leaves the shim's own.
    cwd: Option<PathBuf>,
}

impl ShimExecutor {
    /// An executor running its commands in `bundle`.
    pub fn in_dir(bundle: &Path) -> Self {
        Self {
            cwd: Some(bundle.to_path_buf()),
        }
    }

    /// Applies the working directory to `cmd`.
    fn prepare(&self, cmd: &mut Command) {
        if let Some(dir) = self.cwd.as_deref().filter(|d| d.is_dir()) {
            cmd.current_dir(dir);
        }
    }
}

#[async_trait]
impl Spawner for ShimExecutor {
    async fn execute(&self, cmd: Command) -> runc::Result<(ExitStatus, u32, String, String)> {
        let mut cmd = cmd;
        self.prepare(&mut cmd);
        // Subscribe first: the reaper may see runc's exit before `spawn` returns.
        let mut sub = monitor_subscribe(Topic::Pid)
            .await
            .map_err(|e| runc::error::Error::Other(Box::new(e)))?;
        let child = cmd.spawn();
        let mut child = match child {
            Ok(c) => c,
            Err(e) => {
                let _ = monitor_unsubscribe(sub.id).await;
                return Err(runc::error::Error::ProcessSpawnFailed(e));
            }
        };
        let pid = child.id().unwrap_or_default();
        let mut out = child.stdout.take();
        let mut err = child.stderr.take();
        let read_out = async {
            let mut s = Vec::new();
            if let Some(o) = out.as_mut() {
                let _ = o.read_to_end(&mut s).await;
            }
            s
        };
        let read_err = async {
            let mut s = Vec::new();
            if let Some(e) = err.as_mut() {
                let _ = e.read_to_end(&mut s).await;
            }
            s
        };
        let wait_exit = async {
            while let Some(ev) = sub.rx.recv().await {
                if let Subject::Pid(p) = ev.subject {
                    if u32::try_from(p).ok() == Some(pid) {
                        return Some(ev.exit_code);
                    }
                }
            }
            None
        };
        let (stdout, stderr, code) = tokio::join!(read_out, read_err, wait_exit);
        let _ = monitor_unsubscribe(sub.id).await;
        // The reaper already collected the child; keep tokio from trying again.
        drop(child);
        let code = code.unwrap_or(-1);
        Ok((
            exit_status_from_code(code),
            pid,
            String::from_utf8_lossy(&stdout).into_owned(),
            String::from_utf8_lossy(&stderr).into_owned(),
        ))
    }
}

/// An `ExitStatus` for the monitor's exit code (signals arrive as 128 + signo).
fn exit_status_from_code(code: i32) -> ExitStatus {
    use std::os::unix::process::ExitStatusExt;
    if code > 128 && code < 128 + 65 {
        ExitStatus::from_raw(code - 128)
    } else {
        ExitStatus::from_raw((code & 0xff) << 8)
    }
}

/// Output of a raw runc invocation.
#[derive(Debug)]
pub struct RawOutput {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

/// A runc binary (`BinaryName`) that cannot be run.
#[derive(Debug, thiserror::Error)]
pub enum BinaryError {
    /// A bare name not found as an executable file in any `$PATH` directory.
    #[error("runc binary {name:?} not found in $PATH ({path})")]
    NotInPath {
        /// The name looked up.
        name: String,
        /// The `$PATH` searched.
        path: String,
    },
    /// A path that is not an executable file.
    #[error("runc binary {}: {reason}", path.display())]
    NotExecutable {
        /// The path (made absolute).
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
}

/// Why `path` cannot be executed, if it cannot.
fn not_executable(path: &Path) -> Option<String> {
    use std::os::unix::fs::PermissionsExt;
    match std::fs::metadata(path) {
        Err(e) => Some(e.to_string()),
        Ok(m) if !m.is_file() => Some("not a regular file".into()),
        Ok(m) if m.permissions().mode() & 0o111 == 0 => Some("not executable".into()),
        Ok(_) => None,
    }
}

/// The runc binary `name` as the runc shim finds it (Go's `exec.LookPath`, then run from the
/// shim's cwd): a name containing `/` is a path, relative ones taken from `cwd` (the bundle);
/// a bare name is the first executable regular file of that name in a `$PATH` directory.
pub fn resolve_binary(name: &str, cwd: &Path) -> std::result::Result<PathBuf, BinaryError> {
    if name.contains('/') {
        let path = cwd.join(name);
        return match not_executable(&path) {
            None => Ok(path),
            Some(reason) => Err(BinaryError::NotExecutable { path, reason }),
        };
    }
    let search = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&search)
        .map(|dir| {
            // An empty $PATH entry means the current directory, as in Go and the shells.
            let dir = if dir.as_os_str().is_empty() {
                cwd.to_path_buf()
            } else {
                cwd.join(dir)
            };
            dir.join(name)
        })
        .find(|p| not_executable(p).is_none())
        .ok_or_else(|| BinaryError::NotInPath {
            name: name.to_owned(),
            path: search.to_string_lossy().into_owned(),
        })
}

/// runc for one container: the crate client plus what is needed to build raw command lines.
#[derive(Debug, Clone)]
pub struct RuncClient {
    pub runc: Arc<Runc>,
    /// The resolved binary (absolute unless `$PATH` names relative directories).
    pub binary: PathBuf,
    pub global: GlobalArgs,
    pub bundle: PathBuf,
    executor: ShimExecutor,
}

impl RuncClient {
    /// runc with `--root <root>/<ns> --log <bundle>/log.json --log-format json`, run in `bundle`.
    pub fn new(opts: &ShimOptions, namespace: &str, bundle: &Path) -> Result<Self> {
        let setup_err = |detail: String| ShimError::Runc {
            verb: "setup",
            id: bundle.display().to_string(),
            detail,
        };
        let binary =
            resolve_binary(opts.runc_binary(), bundle).map_err(|e| setup_err(e.to_string()))?;
        let root = opts.runc_root(namespace);
        let log = bundle.join("log.json");
        let executor = ShimExecutor::in_dir(bundle);
        let mut g = GlobalOpts::new()
            .command(&binary)
            .root(&root)
            .log(&log)
            .log_json()
            .systemd_cgroup(opts.systemd_cgroup);
        g.custom_spawner(Arc::new(executor.clone()));
        let runc = g
            .build()
            .map_err(|e| setup_err(format!("{e} (binary {})", binary.display())))?;
        Ok(Self {
            runc: Arc::new(runc),
            binary,
            global: GlobalArgs {
                root: Some(root),
                log: Some(log),
                log_json: true,
                systemd_cgroup: opts.systemd_cgroup,
                criu: (!opts.criu.is_empty()).then(|| PathBuf::from(&opts.criu)),
            },
            bundle: bundle.to_path_buf(),
            executor,
        })
    }

    /// Run `runc [global] <args>` with the given stdio (None = null stdin, piped out/err).
    pub async fn run_raw(
        &self,
        args: Vec<OsString>,
        stdio: Option<(Stdio, Stdio, Stdio)>,
    ) -> Result<RawOutput> {
        let mut cmd = Command::new(&self.binary);
        cmd.args(self.global.args()).args(args);
        cmd.env_remove("NOTIFY_SOCKET");
        log::debug!("run {:?} in {}", cmd.as_std(), self.bundle.display());
        match stdio {
            Some((i, o, e)) => {
                cmd.stdin(i).stdout(o).stderr(e);
            }
            None => {
                cmd.stdin(Stdio::null())
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped());
            }
        }
        let (status, _pid, stdout, stderr) =
            self.executor
                .execute(cmd)
                .await
                .map_err(|e| ShimError::Runc {
                    verb: "spawn",
                    id: self.bundle.display().to_string(),
                    detail: e.to_string(),
                })?;
        Ok(RawOutput {
            status,
            stdout,
            stderr,
        })
    }

    /// The last messages of `<bundle>/log.json`, for error reports.
    pub fn log_tail(&self) -> String {
        log_json_tail(&self.bundle.join("log.json"), 3)
    }

    /// Describe a failed crate call, with the log.json tail.
    pub fn describe(&self, e: &runc::error::Error) -> String {
        let base = match e {
            runc::error::Error::CommandFailed {
                status,
                stdout,
                stderr,
            } => outcome(status, stdout, stderr),
            other => other.to_string(),
        };
        self.with_log_tail(base)
    }

    /// `base` plus the runc log tail, if any.
    pub fn with_log_tail(&self, base: String) -> String {
        let tail = self.log_tail();
        if tail.is_empty() {
            base
        } else {
            format!("{base}; runc log: {tail}")
        }
    }
}

/// "exit status: 1; stderr: ...; stdout: ..." without the empty parts.
pub fn outcome(status: &ExitStatus, stdout: &str, stderr: &str) -> String {
    let mut s = status.to_string();
    for (name, text) in [("stderr", stderr.trim()), ("stdout", stdout.trim())] {
        if !text.is_empty() {
            s.push_str(&format!("; {name}: {text:?}"));
        }
    }
    s
}

/// Join the `msg` fields of the last `n` lines of a runc JSON log.
pub fn log_json_tail(path: &Path, n: usize) -> String {
    let Ok(text) = std::fs::read_to_string(path) else {
        return String::new();
    };
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let start = lines.len().saturating_sub(n);
    lines[start..]
        .iter()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .ok()
                .and_then(|v| v.get("msg").and_then(|m| m.as_str()).map(str::to_owned))
                .unwrap_or_else(|| (*l).to_owned())
        })
        .collect::<Vec<_>>()
        .join(" | ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_roundtrip() {
        assert_eq!(exit_status_from_code(0).code(), Some(0));
        assert_eq!(exit_status_from_code(3).code(), Some(3));
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(exit_status_from_code(137).signal(), Some(9));
    }

    #[test]
    fn outcome_skips_empty_output() {
        let st = exit_status_from_code(1);
        assert_eq!(outcome(&st, "", " "), "exit status: 1");
        assert_eq!(
            outcome(&st, "", "boom\n"),
            "exit status: 1; stderr: \"boom\""
        );
    }

    #[test]
    fn log_tail_reads_msgs() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("log.json");
        std::fs::write(
            &p,
            "{\"level\":\"error\",\"msg\":\"a\"}\n{\"level\":\"error\",\"msg\":\"b\"}\nplain\n",
        )
        .unwrap();
        assert_eq!(log_json_tail(&p, 2), "b | plain");
        assert_eq!(log_json_tail(&dir.path().join("none"), 2), "");
    }

    #[test]
    fn binaries_resolve_like_go_lookpath() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let exe = dir.path().join("myrunc");
        std::fs::write(&exe, "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).unwrap();
        let plain = dir.path().join("plain");
        std::fs::write(&plain, "").unwrap();
        // Paths: relative ones from the bundle; a file without an x bit is refused.
        assert_eq!(resolve_binary("./myrunc", dir.path()).unwrap(), exe);
        assert_eq!(
            resolve_binary(exe.to_str().unwrap(), Path::new("/")).unwrap(),
            exe
        );
        let e = resolve_binary("./plain", dir.path())
            .unwrap_err()
            .to_string();
        assert!(e.contains("not executable"), "{e}");
        let e = resolve_binary("./gone", dir.path())
            .unwrap_err()
            .to_string();
        assert!(e.contains("No such file"), "{e}");
        // A bare name is searched in $PATH (sh is on every test machine); an unknown one names
        // the search path.
        assert!(resolve_binary("sh", dir.path()).unwrap().is_absolute());
        let e = resolve_binary("no-such-runc-here", dir.path())
            .unwrap_err()
            .to_string();
        assert!(e.contains("not found in $PATH"), "{e}");
    }
}
