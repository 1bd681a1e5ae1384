//! Running runc from a subreaper without losing exit statuses.
//!
//! The shim reaps every child (`waitpid(-1)` on SIGCHLD inside containerd-shim) and reports exits
//! through its exit monitor. [`ShimExecutor`] therefore subscribes to that monitor *before*
//! spawning runc and takes runc's exit status from the monitor instead of `wait()`; it implements
//! the `runc` crate's `Spawner` so the crate's create/start/exec/kill/... use it too.
//! Checkpoint and restore, which the crate does not implement, are run from the typed argv of
//! `distriproc_runtime::runc_cmd` through the same executor ([`RuncClient::run_raw`]).

use std::{
    ffi::OsString,
    path::{Path, PathBuf},
    process::{ExitStatus, Stdio},
    sync::Arc,
};

use async_trait::async_trait;
use containerd_shim::monitor::{monitor_subscribe, monitor_unsubscribe, Subject, Topic};
use distriproc_runtime::runc_cmd::GlobalArgs;
use runc::{options::GlobalOpts, Command, Runc, Spawner};
use tokio::io::AsyncReadExt;

use crate::{
    error::{Result, ShimError},
    options::ShimOptions,
};

/// Spawns runc and collects its exit from the shim's exit monitor.
#[derive(Debug, Default)]
pub struct ShimExecutor;

#[async_trait]
impl Spawner for ShimExecutor {
    async fn execute(&self, cmd: Command) -> runc::Result<(ExitStatus, u32, String, String)> {
        let mut cmd = cmd;
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

/// runc for one container: the crate client plus what is needed to build raw command lines.
#[derive(Debug, Clone)]
pub struct RuncClient {
    pub runc: Arc<Runc>,
    pub binary: PathBuf,
    pub global: GlobalArgs,
    pub bundle: PathBuf,
}

impl RuncClient {
    /// runc with `--root <root>/<ns> --log <bundle>/log.json --log-format json`.
    pub fn new(opts: &ShimOptions, namespace: &str, bundle: &Path) -> Result<Self> {
        let root = opts.runc_root(namespace);
        let log = bundle.join("log.json");
        let mut g = GlobalOpts::new()
            .command(opts.runc_binary())
            .root(&root)
            .log(&log)
            .log_json()
            .systemd_cgroup(opts.systemd_cgroup);
        g.custom_spawner(Arc::new(ShimExecutor));
        let runc = g.build().map_err(|e| ShimError::Runc {
            verb: "setup",
            id: bundle.display().to_string(),
            detail: format!("{e} (binary {:?})", opts.runc_binary()),
        })?;
        let binary = runc::utils::binary_path(opts.runc_binary())
            .unwrap_or_else(|| PathBuf::from(opts.runc_binary()));
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
        // The container's bundle, not the shim's cwd: a grouped shim's cwd is the bundle of
        // the container it was started for, which may be deleted by now.
        if self.bundle.is_dir() {
            cmd.current_dir(&self.bundle);
        }
        log::debug!("run {:?}", cmd.as_std());
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
            ShimExecutor
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
}
