//! Typed command lines for `runc checkpoint` and `runc restore`.
//!
//! The `runc` crate (0.3) leaves checkpoint and restore unimplemented, so the shim builds those
//! argument vectors here: [`GlobalArgs`] for the flags that go before the verb, and
//! [`CheckpointArgs`] / [`RestoreArgs`] for the verb and its flags, ending with the container id.
//! Only flags that runc 1.1.x accepts are produced (its `restore` has no `--parent-path`).
//! This module does not run anything; the shim spawns the command and owns its stdio.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

/// Flags placed before the runc verb (`runc [global] checkpoint|restore ...`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GlobalArgs {
    /// `--root`: runc's state directory (the shim uses `/run/containerd/runc/<namespace>`).
    pub root: Option<PathBuf>,
    /// `--log`: runc's log file (the shim uses `<bundle>/log.json`).
    pub log: Option<PathBuf>,
    /// `--log-format json` when true.
    pub log_json: bool,
    /// `--systemd-cgroup`.
    pub systemd_cgroup: bool,
    /// `--criu`: path of the CRIU binary (runc 1.1.x only).
    pub criu: Option<PathBuf>,
}

impl GlobalArgs {
    /// Global flags in runc's order.
    pub fn args(&self) -> Vec<OsString> {
        let mut a = Vec::new();
        if let Some(root) = &self.root {
            push_kv(&mut a, "--root", root);
        }
        if let Some(log) = &self.log {
            push_kv(&mut a, "--log", log);
        }
        if self.log_json {
            a.push("--log-format".into());
            a.push("json".into());
        }
        if self.systemd_cgroup {
            a.push("--systemd-cgroup".into());
        }
        if let Some(criu) = &self.criu {
            push_kv(&mut a, "--criu", criu);
        }
        a
    }
}

/// Flags shared by checkpoint and restore that describe what CRIU may treat as external.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CriuFlags {
    /// `--tcp-established`: dump/restore established TCP connections.
    pub tcp_established: bool,
    /// `--ext-unix-sk`: allow external unix sockets.
    pub ext_unix_sk: bool,
    /// `--shell-job`: the process tree was started from a terminal.
    pub shell_job: bool,
    /// `--file-locks`: dump/restore file locks.
    pub file_locks: bool,
    /// `--empty-ns <ns>` (repeated): namespaces to create empty instead of dumping them.
    pub empty_ns: Vec<String>,
}

impl CriuFlags {
    fn push(&self, a: &mut Vec<OsString>) {
        if self.tcp_established {
            a.push("--tcp-established".into());
        }
        if self.ext_unix_sk {
            a.push("--ext-unix-sk".into());
        }
        if self.shell_job {
            a.push("--shell-job".into());
        }
        if self.file_locks {
            a.push("--file-locks".into());
        }
        for ns in &self.empty_ns {
            a.push("--empty-ns".into());
            a.push(ns.into());
        }
    }
}

/// `runc checkpoint --image-path P --work-path W [flags] [--leave-running] <id>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckpointArgs {
    /// Directory the CRIU images are written to.
    pub image_path: PathBuf,
    /// CRIU work directory (dump.log lands here).
    pub work_path: Option<PathBuf>,
    /// Keep the container running after the dump (`--leave-running`).
    pub leave_running: bool,
    /// `--manage-cgroups-mode`.
    pub manage_cgroups_mode: Option<String>,
    /// Shared CRIU flags.
    pub criu: CriuFlags,
}

impl CheckpointArgs {
    /// A checkpoint into `image_path` that leaves the container running.
    pub fn new(image_path: impl Into<PathBuf>) -> Self {
        Self {
            image_path: image_path.into(),
            work_path: None,
            leave_running: true,
            manage_cgroups_mode: None,
            criu: CriuFlags::default(),
        }
    }

    /// Set the CRIU work directory.
    pub fn work_path(mut self, p: impl Into<PathBuf>) -> Self {
        self.work_path = Some(p.into());
        self
    }

    /// Keep (true) or destroy (false) the container after the dump.
    pub fn leave_running(mut self, v: bool) -> Self {
        self.leave_running = v;
        self
    }

    /// Set the shared CRIU flags.
    pub fn criu_flags(mut self, f: CriuFlags) -> Self {
        self.criu = f;
        self
    }

    /// The verb and its flags, ending with `id`.
    pub fn args(&self, id: &str) -> Vec<OsString> {
        let mut a: Vec<OsString> = vec!["checkpoint".into()];
        push_kv(&mut a, "--image-path", &self.image_path);
        if let Some(w) = &self.work_path {
            push_kv(&mut a, "--work-path", w);
        }
        self.criu.push(&mut a);
        if let Some(m) = &self.manage_cgroups_mode {
            a.push("--manage-cgroups-mode".into());
            a.push(m.into());
        }
        if self.leave_running {
            a.push("--leave-running".into());
        }
        a.push(id.into());
        a
    }
}

/// `runc restore --image-path P --work-path W --detach --pid-file F --no-subreaper --bundle B
/// [--console-socket S] [--lazy-pages] [flags] <id>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestoreArgs {
    /// Directory holding the CRIU images.
    pub image_path: PathBuf,
    /// CRIU work directory: restore.log and, for lazy restores, `lazy-pages.socket`.
    pub work_path: PathBuf,
    /// The OCI bundle.
    pub bundle: PathBuf,
    /// `--pid-file`.
    pub pid_file: Option<PathBuf>,
    /// `--console-socket` for terminal containers.
    pub console_socket: Option<PathBuf>,
    /// `--detach` (the shim always detaches).
    pub detach: bool,
    /// `--no-subreaper` (the shim is the subreaper).
    pub no_subreaper: bool,
    /// `--no-pivot`.
    pub no_pivot: bool,
    /// `--lazy-pages`: CRIU connects to `<work_path>/lazy-pages.socket` for the memory.
    pub lazy_pages: bool,
    /// Shared CRIU flags.
    pub criu: CriuFlags,
}

impl RestoreArgs {
    /// A detached restore of `bundle` from `image_path` using `work_path`.
    pub fn new(
        image_path: impl Into<PathBuf>,
        work_path: impl Into<PathBuf>,
        bundle: impl Into<PathBuf>,
    ) -> Self {
        Self {
            image_path: image_path.into(),
            work_path: work_path.into(),
            bundle: bundle.into(),
            pid_file: None,
            console_socket: None,
            detach: true,
            no_subreaper: true,
            no_pivot: false,
            lazy_pages: false,
            criu: CriuFlags::default(),
        }
    }

    /// Set `--pid-file`.
    pub fn pid_file(mut self, p: impl Into<PathBuf>) -> Self {
        self.pid_file = Some(p.into());
        self
    }

    /// Set `--console-socket`.
    pub fn console_socket(mut self, p: impl Into<PathBuf>) -> Self {
        self.console_socket = Some(p.into());
        self
    }

    /// Turn `--lazy-pages` on or off.
    pub fn lazy_pages(mut self, v: bool) -> Self {
        self.lazy_pages = v;
        self
    }

    /// Turn `--no-pivot` on or off.
    pub fn no_pivot(mut self, v: bool) -> Self {
        self.no_pivot = v;
        self
    }

    /// Set the shared CRIU flags.
    pub fn criu_flags(mut self, f: CriuFlags) -> Self {
        self.criu = f;
        self
    }

    /// The verb and its flags, ending with `id`.
    pub fn args(&self, id: &str) -> Vec<OsString> {
        let mut a: Vec<OsString> = vec!["restore".into()];
        push_kv(&mut a, "--image-path", &self.image_path);
        push_kv(&mut a, "--work-path", &self.work_path);
        if self.detach {
            a.push("--detach".into());
        }
        if let Some(p) = &self.pid_file {
            push_kv(&mut a, "--pid-file", p);
        }
        if self.no_subreaper {
            a.push("--no-subreaper".into());
        }
        push_kv(&mut a, "--bundle", &self.bundle);
        if let Some(s) = &self.console_socket {
            push_kv(&mut a, "--console-socket", s);
        }
        if self.no_pivot {
            a.push("--no-pivot".into());
        }
        if self.lazy_pages {
            a.push("--lazy-pages".into());
        }
        self.criu.push(&mut a);
        a.push(id.into());
        a
    }
}

fn push_kv(a: &mut Vec<OsString>, flag: &str, value: &Path) {
    a.push(flag.into());
    a.push(value.as_os_str().to_owned());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: Vec<OsString>) -> Vec<String> {
        v.into_iter()
            .map(|o| o.into_string().expect("utf-8"))
            .collect()
    }

    #[test]
    fn global_args_match_containerd_prefix() {
        let g = GlobalArgs {
            root: Some("/run/containerd/runc/ns".into()),
            log: Some("/b/log.json".into()),
            log_json: true,
            systemd_cgroup: true,
            criu: None,
        };
        assert_eq!(
            s(g.args()),
            [
                "--root",
                "/run/containerd/runc/ns",
                "--log",
                "/b/log.json",
                "--log-format",
                "json",
                "--systemd-cgroup"
            ]
        );
        assert!(GlobalArgs::default().args().is_empty());
    }

    #[test]
    fn checkpoint_default_leaves_running() {
        let a = CheckpointArgs::new("/img").work_path("/b/work/criu-work");
        assert_eq!(
            s(a.args("c1")),
            [
                "checkpoint",
                "--image-path",
                "/img",
                "--work-path",
                "/b/work/criu-work",
                "--leave-running",
                "c1"
            ]
        );
    }

    #[test]
    fn checkpoint_exit_and_all_flags() {
        let a = CheckpointArgs::new("/img")
            .leave_running(false)
            .criu_flags(CriuFlags {
                tcp_established: true,
                ext_unix_sk: true,
                shell_job: true,
                file_locks: true,
                empty_ns: vec!["network".into()],
            });
        assert_eq!(
            s(a.args("c1")),
            [
                "checkpoint",
                "--image-path",
                "/img",
                "--tcp-established",
                "--ext-unix-sk",
                "--shell-job",
                "--file-locks",
                "--empty-ns",
                "network",
                "c1"
            ]
        );
    }

    #[test]
    fn restore_matches_go_shim_command_line() {
        let a = RestoreArgs::new("/tmp/ctrd-checkpoint1", "/b/work", "/b").pid_file("/b/init.pid");
        assert_eq!(
            s(a.args("c1")),
            [
                "restore",
                "--image-path",
                "/tmp/ctrd-checkpoint1",
                "--work-path",
                "/b/work",
                "--detach",
                "--pid-file",
                "/b/init.pid",
                "--no-subreaper",
                "--bundle",
                "/b",
                "c1"
            ]
        );
    }

    #[test]
    fn restore_lazy_with_console() {
        let a = RestoreArgs::new("/img", "/w", "/b")
            .console_socket("/tmp/pty.sock")
            .lazy_pages(true)
            .no_pivot(true)
            .criu_flags(CriuFlags {
                shell_job: true,
                ..Default::default()
            });
        let v = s(a.args("id"));
        assert_eq!(v.last().map(String::as_str), Some("id"));
        for flag in [
            "--console-socket",
            "--lazy-pages",
            "--no-pivot",
            "--shell-job",
        ] {
            assert!(v.iter().any(|x| x == flag), "{flag} missing from {v:?}");
        }
        let i = v.iter().position(|x| x == "--console-socket").unwrap();
        assert_eq!(v[i + 1], "/tmp/pty.sock");
    }
}
