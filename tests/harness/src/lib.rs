//! End-to-end test harness shared by the workspace's real-stack tests (docs/TESTING.md).
//!
//! It owns: a private containerd per test ([`Containerd`]: own root, state, socket, namespace
//! and temp dir under `/tmp`, CRI disabled, debug log, our shim first on its `PATH`), `ctr`
//! invocations with a timeout, importing the locally built test images (`test-images/`),
//! querying the `memhog` workload inside a container's network namespace, and the probe that
//! decides whether the real stack is present ([`require_stack`]).
//!
//! It deliberately does not know anything about the shim's internals: tests talk to containerd
//! through `ctr`, as users do, and read only the files the contract names (for example
//! `<bundle>/distriproc-lazy-stats.json`).
//!
//! Clean-up is by pid and by this instance's own names only: containerd (SIGTERM, then SIGKILL),
//! the shims whose command line carries this instance's socket address, the processes left in
//! this instance's namespace cgroups, mounts under its temp dir, and the temp dir itself.

mod netns;
pub use netns::{ip, NetNs};

use std::ffi::OsString;
use std::fs;
use std::io::Read;
use std::os::unix::fs::symlink;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

/// Default directory of `containerd`, `ctr` and `containerd-shim-runc-v2`.
pub const DEFAULT_CONTAINERD_DIR: &str = "/opt/distriproc/containerd/usr/bin";
/// containerd 1.7 as installed by `scripts/deps.sh`.
pub const CONTAINERD_1_7_DIR: &str = "/opt/distriproc/containerd-1.7/usr/bin";
/// containerd 2.1 as installed by `scripts/deps.sh`.
pub const CONTAINERD_2_1_DIR: &str = "/opt/distriproc/containerd-2.1/usr/bin";
/// Image reference of the busybox test image.
pub const BUSYBOX_IMAGE: &str = "localhost/distriproc/busybox:latest";
/// Image reference of the memhog test image (`/memhog` plus the busybox files).
pub const MEMHOG_IMAGE: &str = "localhost/distriproc/memhog:latest";
/// Runtime name of our shim.
pub const DISTRIPROC_RUNTIME: &str = "io.containerd.distriproc.v2";
/// Runtime name of containerd's Go runc shim.
pub const RUNC_RUNTIME: &str = "io.containerd.runc.v2";
/// Port memhog listens on by default.
pub const MEMHOG_PORT: u16 = 7070;
/// Name of the shim binary containerd looks up for [`DISTRIPROC_RUNTIME`].
pub const SHIM_BINARY_NAME: &str = "containerd-shim-distriproc-v2";

const SYSTEM_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
const LOG_TAIL_LINES: usize = 40;

static INSTANCE: AtomicU32 = AtomicU32::new(0);

/// Options for [`Containerd::start`]. `Default` reads nothing; unset fields fall back to the
/// environment at start time (`DISTRIPROC_CONTAINERD_DIR`, `DISTRIPROC_SHIM_BIN`).
#[derive(Debug, Clone)]
pub struct ContainerdOpts {
    /// Directory with `containerd`, `ctr`, `containerd-shim-runc-v2`; default
    /// `$DISTRIPROC_CONTAINERD_DIR`, else [`DEFAULT_CONTAINERD_DIR`].
    pub containerd_dir: Option<PathBuf>,
    /// Our shim binary, linked as `containerd-shim-distriproc-v2` first on containerd's PATH;
    /// default `$DISTRIPROC_SHIM_BIN`; with neither, only the runc runtime is available.
    /// Shim integration tests pass `env!("CARGO_BIN_EXE_containerd-shim-distriproc-v2")`.
    pub shim_bin: Option<PathBuf>,
    /// ctr namespace; default a unique `dpt-<pid>-<n>` per instance.
    pub namespace: Option<String>,
    /// Timeout of [`Containerd::ctr`]; default 120 s.
    pub ctr_timeout: Duration,
    /// TOML appended verbatim to the generated config.toml (runtime registration, plugin
    /// settings). It must use the config version of the binary ([`Containerd::config_version`]
    /// can't be known before start; check [`containerd_major_version`] first).
    pub extra_config: Option<String>,
    /// Extra environment for the containerd process (inherited by shims, runc and criu).
    pub env: Vec<(String, String)>,
}

impl Default for ContainerdOpts {
    fn default() -> Self {
        Self {
            containerd_dir: None,
            shim_bin: None,
            namespace: None,
            ctr_timeout: Duration::from_secs(120),
            extra_config: None,
            env: Vec::new(),
        }
    }
}

impl ContainerdOpts {
    /// Options for a given containerd directory (e.g. [`CONTAINERD_1_7_DIR`]).
    pub fn with_containerd_dir(dir: impl Into<PathBuf>) -> Self {
        Self {
            containerd_dir: Some(dir.into()),
            ..Self::default()
        }
    }

    /// Sets the shim binary.
    pub fn shim(mut self, bin: impl Into<PathBuf>) -> Self {
        self.shim_bin = Some(bin.into());
        self
    }
}

/// A private containerd daemon, stopped and cleaned up on drop.
pub struct Containerd {
    dir: PathBuf,
    containerd_dir: PathBuf,
    socket: PathBuf,
    namespace: String,
    log: PathBuf,
    version: String,
    config_version: u32,
    ctr_timeout: Duration,
    child: Option<Child>,
    shim_bin: Option<PathBuf>,
    keep: bool,
}

/// The containerd binary's version string (e.g. `2.1.9+unknown`), from `containerd --version`.
pub fn containerd_version(containerd_dir: &Path) -> Result<String> {
    let bin = containerd_dir.join("containerd");
    let out = Command::new(&bin)
        .arg("--version")
        .output()
        .with_context(|| format!("running {} --version", bin.display()))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let v = text
        .split_whitespace()
        .nth(2)
        .ok_or_else(|| anyhow!("unexpected `{} --version` output: {text:?}", bin.display()))?;
    Ok(v.trim_start_matches('v').to_string())
}

/// Major version of the containerd in `containerd_dir` (1 or 2).
pub fn containerd_major_version(containerd_dir: &Path) -> Result<u32> {
    let v = containerd_version(containerd_dir)?;
    v.split('.')
        .next()
        .and_then(|m| m.parse().ok())
        .ok_or_else(|| anyhow!("cannot parse containerd version {v:?}"))
}

/// The containerd directory tests should use: `$DISTRIPROC_CONTAINERD_DIR` or the default.
pub fn containerd_dir_from_env() -> PathBuf {
    std::env::var_os("DISTRIPROC_CONTAINERD_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_CONTAINERD_DIR))
}

/// The config.toml the harness writes for a containerd of config `version` (2 for 1.x, 3 for
/// 2.x) living in `dir`.
pub fn config_toml(config_version: u32, dir: &Path, extra: Option<&str>) -> String {
    let disabled = if config_version >= 3 {
        // 2.x splits CRI into several plugins; NRI would open a host-wide socket.
        r#""io.containerd.grpc.v1.cri", "io.containerd.cri.v1.images", "io.containerd.cri.v1.runtime", "io.containerd.podsandbox.controller.v1.podsandbox", "io.containerd.nri.v1.nri""#
    } else {
        r#""io.containerd.grpc.v1.cri", "io.containerd.nri.v1.nri""#
    };
    let d = dir.display();
    let mut s = format!(
        "version = {config_version}\nroot = \"{d}/root\"\nstate = \"{d}/state\"\n\
         disabled_plugins = [{disabled}]\n\n[grpc]\n  address = \"{d}/c.sock\"\n\n\
         [debug]\n  level = \"debug\"\n"
    );
    if let Some(extra) = extra {
        s.push('\n');
        s.push_str(extra);
        s.push('\n');
    }
    s
}

impl Containerd {
    /// Starts a private containerd and waits until `ctr version` answers (30 s).
    pub fn start(opts: ContainerdOpts) -> Result<Containerd> {
        let containerd_dir = opts
            .containerd_dir
            .clone()
            .unwrap_or_else(containerd_dir_from_env);
        for bin in ["containerd", "ctr", "containerd-shim-runc-v2"] {
            let p = containerd_dir.join(bin);
            if !p.is_file() {
                bail!("{} not found (run `make deps`)", p.display());
            }
        }
        let version = containerd_version(&containerd_dir)?;
        let major = containerd_major_version(&containerd_dir)?;
        let config_version = if major >= 2 { 3 } else { 2 };
        let shim_bin = opts
            .shim_bin
            .clone()
            .or_else(|| std::env::var_os("DISTRIPROC_SHIM_BIN").map(PathBuf::from));

        sweep_stale_dirs();
        let n = INSTANCE.fetch_add(1, Ordering::Relaxed);
        let namespace = opts
            .namespace
            .clone()
            .unwrap_or_else(|| format!("dpt-{}-{n}", std::process::id()));
        let dir = tempfile::Builder::new()
            .prefix("dpt.")
            .tempdir_in("/tmp")
            .context("creating the containerd temp dir under /tmp")?
            .keep();
        let mut ctd = Containerd {
            socket: dir.join("c.sock"),
            log: dir.join("containerd.log"),
            dir,
            containerd_dir: containerd_dir.clone(),
            namespace,
            version,
            config_version,
            ctr_timeout: opts.ctr_timeout,
            child: None,
            shim_bin: None,
            keep: std::env::var_os("DISTRIPROC_KEEP_TMP").is_some(),
        };
        // From here on, Drop cleans up whatever was created.
        let bin_dir = ctd.dir.join("bin");
        for d in [
            bin_dir.clone(),
            ctd.dir.join("tmp"),
            ctd.dir.join("root"),
            ctd.dir.join("state"),
        ] {
            fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
        }
        if let Some(shim) = shim_bin {
            let shim = shim
                .canonicalize()
                .with_context(|| format!("shim binary {} not found", shim.display()))?;
            symlink(&shim, bin_dir.join(SHIM_BINARY_NAME)).with_context(|| {
                format!("linking {} into {}", shim.display(), bin_dir.display())
            })?;
            ctd.shim_bin = Some(shim);
        }
        let config = ctd.dir.join("config.toml");
        fs::write(
            &config,
            config_toml(config_version, &ctd.dir, opts.extra_config.as_deref()),
        )
        .with_context(|| format!("writing {}", config.display()))?;

        let mut path = OsString::from(bin_dir.as_os_str());
        path.push(":");
        path.push(containerd_dir.as_os_str());
        path.push(":");
        path.push(std::env::var_os("PATH").unwrap_or_default());
        path.push(":");
        path.push(SYSTEM_PATH);
        let log = fs::File::create(&ctd.log)
            .with_context(|| format!("creating {}", ctd.log.display()))?;
        let mut cmd = Command::new(containerd_dir.join("containerd"));
        cmd.arg("--config")
            .arg(&config)
            .env("PATH", path)
            // containerd unpacks restored checkpoints into ctrd-checkpoint* temp dirs and never
            // removes them: keep them inside our dir.
            .env("TMPDIR", ctd.dir.join("tmp"))
            .env_remove("XDG_RUNTIME_DIR")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .process_group(0);
        // Our shim's node-local page store inside our dir, unless the test names its own
        // configuration file.
        let shim_config = ctd.dir.join("shim.toml");
        fs::write(
            &shim_config,
            format!("[store]\ndir = {:?}\n", ctd.dir.join("store")),
        )
        .with_context(|| format!("writing {}", shim_config.display()))?;
        cmd.env("DISTRIPROC_CONFIG", &shim_config);
        for (k, v) in &opts.env {
            cmd.env(k, v);
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {}", containerd_dir.join("containerd").display()))?;
        ctd.child = Some(child);

        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = ctd.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                bail!(
                    "containerd {} exited during start-up ({status}); log tail:\n{}",
                    ctd.version,
                    ctd.log_tail(LOG_TAIL_LINES)
                );
            }
            if ctd.socket.exists() {
                if let Ok(out) = ctd.ctr_timeout(&["version"], Duration::from_secs(10)) {
                    if out.status.success() {
                        break;
                    }
                }
            }
            if Instant::now() > deadline {
                bail!(
                    "containerd {} did not answer on {} within 30 s; log tail:\n{}",
                    ctd.version,
                    ctd.socket.display(),
                    ctd.log_tail(LOG_TAIL_LINES)
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
        Ok(ctd)
    }

    /// Runs `ctr -a <socket> -n <namespace> args...` with the default timeout (killed on
    /// timeout; the error names the command and shows the containerd log tail).
    pub fn ctr(&self, args: &[&str]) -> Result<Output> {
        self.ctr_timeout(args, self.ctr_timeout)
    }

    /// [`Containerd::ctr`] with an explicit timeout.
    pub fn ctr_timeout(&self, args: &[&str], timeout: Duration) -> Result<Output> {
        let mut cmd = Command::new(self.containerd_dir.join("ctr"));
        cmd.arg("-a")
            .arg(&self.socket)
            .arg("-n")
            .arg(&self.namespace)
            .args(args);
        cmd.stdin(Stdio::null());
        match run_with_timeout(cmd, timeout)? {
            Some(out) => Ok(out),
            None => Err(anyhow!(
                "`ctr {}` timed out after {:?} (killed); containerd log tail:\n{}",
                args.join(" "),
                timeout,
                self.log_tail(LOG_TAIL_LINES)
            )),
        }
    }

    /// `ctr run -d --runtime io.containerd.distriproc.v2 [--annotation A]... IMAGE ID CMD...`,
    /// then waits up to `timeout` for the task to be RUNNING.
    pub fn run_detached(
        &self,
        annotations: &[&str],
        image: &str,
        id: &str,
        cmd: &[&str],
        timeout: Duration,
    ) -> Result<()> {
        let mut args = vec!["run", "-d", "--runtime", DISTRIPROC_RUNTIME];
        for a in annotations {
            args.extend(["--annotation", a]);
        }
        args.extend([image, id]);
        args.extend(cmd);
        self.ctr_ok(&args)?;
        self.wait_status(id, "RUNNING", timeout)
    }

    /// `ctr containers checkpoint --task ID IMAGE`, then kills the task (SIGKILL), waits up to
    /// `timeout` for it to stop and removes task and container: the usual prelude of a restore.
    pub fn checkpoint_and_remove(&self, id: &str, image: &str, timeout: Duration) -> Result<()> {
        self.ctr_ok(&["containers", "checkpoint", "--task", id, image])?;
        self.ctr_ok(&["tasks", "kill", "-s", "SIGKILL", id])?;
        self.wait_status(id, "STOPPED", timeout)?;
        self.ctr_ok(&["tasks", "rm", id])?;
        self.ctr_ok(&["containers", "rm", id])?;
        Ok(())
    }

    /// The content-store path of the CRIU tar (`...checkpoint.criu.tar`) of checkpoint image
    /// `image` (as `ctr images ls` names it).
    pub fn criu_blob(&self, image: &str) -> Result<PathBuf> {
        let ls = self.ctr_ok(&["images", "ls"])?;
        let line = ls
            .lines()
            .find(|l| l.starts_with(image))
            .with_context(|| format!("image {image} not in {ls}"))?;
        let digest = line
            .split_whitespace()
            .find(|f| f.starts_with("sha256:"))
            .context("no digest")?;
        let index = self.ctr_ok(&["content", "get", digest])?;
        let v: serde_json::Value = serde_json::from_str(&index)?;
        for m in v["manifests"].as_array().context("no manifests")? {
            if m["mediaType"] == "application/vnd.containerd.container.criu.checkpoint.criu.tar" {
                let hex = m["digest"]
                    .as_str()
                    .context("digest")?
                    .trim_start_matches("sha256:");
                return Ok(self
                    .root_dir()
                    .join("io.containerd.content.v1.content/blobs/sha256")
                    .join(hex));
            }
        }
        bail!("no CRIU tar in {index}")
    }

    /// Runs ctr and returns its stdout; fails with its stderr unless it exits 0.
    pub fn ctr_ok(&self, args: &[&str]) -> Result<String> {
        let out = self.ctr(args)?;
        if !out.status.success() {
            bail!(
                "`ctr {}` failed ({}): {}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Builds the test image tarballs if needed (`make -C test-images`) and imports both.
    pub fn import_test_images(&self) -> Result<()> {
        let out = build_test_images()?;
        for tar in ["busybox.oci.tar", "memhog.oci.tar"] {
            let p = out.join(tar);
            let p = p
                .to_str()
                .ok_or_else(|| anyhow!("non-UTF-8 path {}", p.display()))?;
            self.ctr_ok(&["images", "import", p])?;
        }
        Ok(())
    }

    /// Pid of task `id` as `ctr tasks ls` reports it (the container's init in the host pidns).
    pub fn task_pid(&self, id: &str) -> Result<u32> {
        let row = self
            .task_row(id)?
            .ok_or_else(|| anyhow!("task {id} not found in namespace {}", self.namespace))?;
        row.1
            .parse()
            .with_context(|| format!("task {id}: bad pid {:?}", row.1))
    }

    /// Status of task `id` (`RUNNING`, `STOPPED`, `PAUSED`, `CREATED`, ...), None if absent.
    pub fn task_status(&self, id: &str) -> Result<Option<String>> {
        Ok(self.task_row(id)?.map(|r| r.2))
    }

    /// Status of task `id` as [`Containerd::task_status`] reports it, `ABSENT` when there is
    /// no such task (or `ctr` failed: the caller compares against a wanted status anyway).
    pub fn status(&self, id: &str) -> String {
        self.task_status(id)
            .ok()
            .flatten()
            .unwrap_or_else(|| "ABSENT".into())
    }

    /// Waits up to `timeout` for task `id` to be in status `want` (`ABSENT` = no task); the
    /// error names the status it stayed in and shows the containerd log tail.
    pub fn wait_status(&self, id: &str, want: &str, timeout: Duration) -> Result<()> {
        if wait_for(|| self.status(id) == want, timeout) {
            return Ok(());
        }
        bail!(
            "task {id} is {} instead of {want} after {timeout:?}; containerd log tail:\n{}",
            self.status(id),
            self.log_tail(LOG_TAIL_LINES)
        )
    }

    /// SIGKILLs task `id`, waits up to `timeout` for it to stop, removes the task and the
    /// container.
    pub fn remove_container(&self, id: &str, timeout: Duration) -> Result<()> {
        self.ctr_ok(&["tasks", "kill", "-s", "SIGKILL", id])?;
        self.wait_status(id, "STOPPED", timeout)?;
        self.ctr_ok(&["tasks", "rm", id])?;
        self.ctr_ok(&["containers", "rm", id])?;
        Ok(())
    }

    fn task_row(&self, id: &str) -> Result<Option<(String, String, String)>> {
        let out = self.ctr_ok(&["tasks", "ls"])?;
        Ok(out.lines().skip(1).find_map(|l| {
            let mut f = l.split_whitespace();
            match (f.next(), f.next(), f.next()) {
                (Some(t), Some(p), Some(s)) if t == id => {
                    Some((t.to_string(), p.to_string(), s.to_string()))
                }
                _ => None,
            }
        }))
    }

    /// The whole containerd log so far (includes the shims' log lines).
    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The last `n` lines of the containerd log.
    pub fn log_tail(&self, n: usize) -> String {
        let text = self.log_text();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// The bundle directory of task `id`: `<state>/io.containerd.runtime.v2.task/<ns>/<id>`.
    pub fn bundle_dir(&self, id: &str) -> PathBuf {
        self.state_dir()
            .join("io.containerd.runtime.v2.task")
            .join(&self.namespace)
            .join(id)
    }

    /// `<bundle>/distriproc-lazy-stats.json` of task `id` (written by our shim).
    pub fn lazy_stats_path(&self, id: &str) -> PathBuf {
        self.bundle_dir(id).join("distriproc-lazy-stats.json")
    }

    /// Reads and parses `<bundle>/distriproc-lazy-stats.json` of task `id`.
    pub fn lazy_stats(&self, id: &str) -> Result<serde_json::Value> {
        let p = self.lazy_stats_path(id);
        let text = fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?;
        serde_json::from_str(&text).with_context(|| format!("parsing {}", p.display()))
    }

    /// The instance's temp dir (config, log, socket, root, state, tmp).
    pub fn dir(&self) -> &Path {
        &self.dir
    }
    /// containerd's gRPC socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }
    /// The ctr namespace of this instance.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }
    /// containerd's `root` directory.
    pub fn root_dir(&self) -> PathBuf {
        self.dir.join("root")
    }
    /// containerd's `state` directory.
    pub fn state_dir(&self) -> PathBuf {
        self.dir.join("state")
    }
    /// The TMPDIR of containerd (where restored checkpoints are unpacked).
    pub fn tmp_dir(&self) -> PathBuf {
        self.dir.join("tmp")
    }
    /// Path of the containerd log file.
    pub fn log_path(&self) -> &Path {
        &self.log
    }
    /// containerd's version string, e.g. `1.7.24~ds1`.
    pub fn version(&self) -> &str {
        &self.version
    }
    /// The config.toml version used (2 for containerd 1.x, 3 for 2.x).
    pub fn config_version(&self) -> u32 {
        self.config_version
    }
    /// The directory containerd and ctr come from.
    pub fn containerd_dir(&self) -> &Path {
        &self.containerd_dir
    }
    /// The shim binary linked into containerd's PATH, if any.
    pub fn shim_bin(&self) -> Option<&Path> {
        self.shim_bin.as_deref()
    }
    /// Pid of the containerd daemon.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Pids of shim processes started by this containerd (their command line carries
    /// `-address <our socket>`).
    pub fn shim_pids(&self) -> Vec<u32> {
        let sock = self.socket.to_string_lossy().into_owned();
        let mut pids = Vec::new();
        let Ok(rd) = fs::read_dir("/proc") else {
            return pids;
        };
        for e in rd.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            let Ok(cmdline) = fs::read(e.path().join("cmdline")) else {
                continue;
            };
            let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
            if args
                .windows(2)
                .any(|w| w[0] == b"-address" && w[1] == sock.as_bytes())
            {
                pids.push(pid);
            }
        }
        pids
    }

    /// Pids of processes in this instance's container cgroups (`/sys/fs/cgroup/**/<ns>/`).
    fn container_pids(&self) -> Vec<u32> {
        let mut pids = Vec::new();
        for dir in self.namespace_cgroup_dirs() {
            collect_cgroup_pids(&dir, &mut pids);
        }
        pids.sort_unstable();
        pids.dedup();
        pids
    }

    fn namespace_cgroup_dirs(&self) -> Vec<PathBuf> {
        let root = Path::new("/sys/fs/cgroup");
        let mut dirs = vec![root.join(&self.namespace)];
        if let Ok(rd) = fs::read_dir(root) {
            for e in rd.flatten() {
                let d = e.path().join(&self.namespace);
                if d.is_dir() {
                    dirs.push(d);
                }
            }
        }
        dirs.retain(|d| d.is_dir());
        dirs
    }

    fn stop(&mut self) {
        // 1. Tasks and containers, through containerd while it is alive (short timeouts).
        let alive = self
            .child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)));
        if alive {
            let t = Duration::from_secs(15);
            if let Ok(Some(out)) = self.ctr_quiet(&["tasks", "ls", "-q"], t) {
                for id in out.lines().filter(|l| !l.is_empty()) {
                    let _ = self.ctr_quiet(&["tasks", "kill", "-s", "SIGKILL", id], t);
                    let _ = self.ctr_quiet(&["tasks", "rm", "-f", id], t);
                }
            }
            if let Ok(Some(out)) = self.ctr_quiet(&["containers", "ls", "-q"], t) {
                for id in out.lines().filter(|l| !l.is_empty()) {
                    let _ = self.ctr_quiet(&["containers", "rm", id], t);
                }
            }
        }
        // 2. containerd itself: SIGTERM, then SIGKILL after 10 s.
        if let Some(mut child) = self.child.take() {
            if let Ok(None) = child.try_wait() {
                signal(child.id(), libc::SIGTERM);
                let deadline = Instant::now() + Duration::from_secs(10);
                while Instant::now() < deadline {
                    if let Ok(Some(_)) = child.try_wait() {
                        break;
                    }
                    thread::sleep(Duration::from_millis(50));
                }
                let _ = child.kill();
            }
            let _ = child.wait();
        }
        // 3. Leftover shims of this instance and processes left in our container cgroups.
        for pid in self.shim_pids() {
            signal(pid, libc::SIGKILL);
        }
        for pid in self.container_pids() {
            signal(pid, libc::SIGKILL);
        }
        thread::sleep(Duration::from_millis(100));
        for dir in self.namespace_cgroup_dirs() {
            remove_cgroup_tree(&dir);
        }
        let _ = fs::remove_dir_all(Path::new("/run/containerd/runc").join(&self.namespace));
        // 4. Mounts under our dir (deepest first), then the dir.
        unmount_under(&self.dir);
        if self.keep {
            eprintln!(
                "harness: DISTRIPROC_KEEP_TMP set, keeping {}",
                self.dir.display()
            );
        } else if let Err(e) = fs::remove_dir_all(&self.dir) {
            eprintln!("harness: could not remove {}: {e}", self.dir.display());
        }
    }

    fn ctr_quiet(&self, args: &[&str], timeout: Duration) -> Result<Option<String>> {
        let mut cmd = Command::new(self.containerd_dir.join("ctr"));
        cmd.arg("-a")
            .arg(&self.socket)
            .arg("-n")
            .arg(&self.namespace)
            .args(args);
        cmd.stdin(Stdio::null());
        Ok(
            run_with_timeout(cmd, timeout)?
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned()),
        )
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        if thread::panicking() {
            eprintln!(
                "harness: test failed; containerd {} log ({}) tail:\n{}",
                self.version,
                self.log.display(),
                self.log_tail(LOG_TAIL_LINES)
            );
        }
        self.stop();
    }
}

fn signal(pid: u32, sig: libc::c_int) {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return;
    };
    if pid <= 1 {
        return;
    }
    // SAFETY: kill(2) with a positive pid has no memory-safety preconditions.
    unsafe {
        libc::kill(pid, sig);
    }
}

fn collect_cgroup_pids(dir: &Path, pids: &mut Vec<u32>) {
    if let Ok(text) = fs::read_to_string(dir.join("cgroup.procs")) {
        pids.extend(text.lines().filter_map(|l| l.trim().parse::<u32>().ok()));
    }
    if let Ok(rd) = fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                collect_cgroup_pids(&e.path(), pids);
            }
        }
    }
}

fn remove_cgroup_tree(dir: &Path) {
    if let Ok(rd) = fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                remove_cgroup_tree(&e.path());
            }
        }
    }
    let _ = fs::remove_dir(dir);
}

/// Removes `/tmp/dpt.*` dirs left by test processes that were killed before their Drop ran:
/// older than 10 minutes and named in no running process's command line (containerd's
/// `--config`, the shims' `-address`, ctr's `-a` all carry the dir). Kills nothing.
fn sweep_stale_dirs() {
    let Ok(rd) = fs::read_dir("/tmp") else { return };
    let stale: Vec<PathBuf> = rd
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("dpt."))
        .map(|e| e.path())
        .filter(|d| {
            fs::metadata(d.join("config.toml"))
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age > Duration::from_secs(600))
        })
        .collect();
    if stale.is_empty() {
        return;
    }
    let mut cmdlines = Vec::new();
    if let Ok(rd) = fs::read_dir("/proc") {
        for e in rd.flatten() {
            if let Ok(c) = fs::read(e.path().join("cmdline")) {
                cmdlines.push(String::from_utf8_lossy(&c).into_owned());
            }
        }
    }
    for d in stale {
        let name = format!("{}/", d.display());
        if cmdlines.iter().any(|c| c.contains(&name)) {
            continue;
        }
        unmount_under(&d);
        if fs::remove_dir_all(&d).is_ok() {
            eprintln!("harness: removed stale {}", d.display());
        }
    }
}

/// Lazily unmounts every mount point under `dir`, deepest first.
pub fn unmount_under(dir: &Path) {
    let Ok(text) = fs::read_to_string("/proc/self/mountinfo") else {
        return;
    };
    let prefix = format!("{}/", dir.display());
    let mut points: Vec<String> = text
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(unescape_mount_path)
        .filter(|p| p.starts_with(&prefix))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.len()));
    for p in points {
        let _ = nix::mount::umount2(p.as_str(), nix::mount::MntFlags::MNT_DETACH);
    }
}

fn unescape_mount_path(s: &str) -> String {
    s.replace("\\040", " ")
        .replace("\\011", "\t")
        .replace("\\012", "\n")
        .replace("\\134", "\\")
}

/// Runs `cmd` with piped stdout/stderr; Some(output) if it ended within `timeout`, None if it
/// was killed at the timeout.
pub fn run_with_timeout(mut cmd: Command, timeout: Duration) -> Result<Option<Output>> {
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .with_context(|| format!("spawning {:?}", cmd.get_program()))?;
    let mut so = child.stdout.take().context("child stdout")?;
    let mut se = child.stderr.take().context("child stderr")?;
    let t_out = thread::spawn(move || {
        let mut v = Vec::new();
        let _ = so.read_to_end(&mut v);
        v
    });
    let t_err = thread::spawn(move || {
        let mut v = Vec::new();
        let _ = se.read_to_end(&mut v);
        v
    });
    let deadline = Instant::now() + timeout;
    let status: Option<ExitStatus> = loop {
        if let Some(st) = child.try_wait()? {
            break Some(st);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        thread::sleep(Duration::from_millis(5));
    };
    let stdout = t_out.join().unwrap_or_default();
    let stderr = t_err.join().unwrap_or_default();
    Ok(status.map(|status| Output {
        status,
        stdout,
        stderr,
    }))
}

/// Polls `cond` every 20 ms until it returns true (-> true) or `timeout` passes (-> false).
pub fn wait_for<F: FnMut() -> bool>(mut cond: F, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// The first thread of the processes `pids` that is stopped (`State` T or t) or traced
/// (`TracerPid` not 0), as "tid of pid is STATE"; None when every thread runs untraced.
/// Processes gone meanwhile count as untouched.
pub fn stopped_or_traced_thread(pids: &[u32]) -> Option<String> {
    for p in pids {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{p}/task")) else {
            continue;
        };
        for t in tasks.flatten() {
            let st = std::fs::read_to_string(t.path().join("status")).unwrap_or_default();
            let field = |n: &str| {
                st.lines()
                    .find_map(|l| l.strip_prefix(n))
                    .map(str::trim)
                    .unwrap_or("")
                    .to_owned()
            };
            let state = field("State:");
            let tracer = field("TracerPid:");
            if state.starts_with('T')
                || state.starts_with('t')
                || (!tracer.is_empty() && tracer != "0")
            {
                return Some(format!(
                    "thread {} of {p} is {state} (TracerPid {tracer})",
                    t.file_name().to_string_lossy()
                ));
            }
        }
    }
    None
}

/// The repository root (two levels above this crate).
pub fn repo_root() -> PathBuf {
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    here.parent()
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .unwrap_or_else(|| here.into())
}

/// Runs `make -C test-images` (serialised across processes by a lock file) and returns the
/// output directory holding `memhog`, `busybox.oci.tar` and `memhog.oci.tar`.
pub fn build_test_images() -> Result<PathBuf> {
    let dir = repo_root().join("test-images");
    let out = dir.join("out");
    let lock_path = Path::new("/tmp/distriproc-test-images.lock");
    let lock = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(lock_path)
        .with_context(|| format!("opening {}", lock_path.display()))?;
    let _guard = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| anyhow!("locking {}: {e}", lock_path.display()))?;
    let mut cmd = Command::new("make");
    cmd.arg("-s").arg("-C").arg(&dir).stdin(Stdio::null());
    let o = run_with_timeout(cmd, Duration::from_secs(300))?
        .ok_or_else(|| anyhow!("`make -C {}` timed out", dir.display()))?;
    if !o.status.success() {
        bail!(
            "`make -C {}` failed ({}):\n{}{}",
            dir.display(),
            o.status,
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
    }
    Ok(out)
}

/// Path of the memhog binary (building the test images if needed).
pub fn memhog_bin() -> Result<PathBuf> {
    let p = repo_root().join("test-images/out/memhog");
    if !p.is_file() {
        build_test_images()?;
    }
    Ok(p)
}

/// `memhog query --pid PID --port PORT CMD` (30 s timeout): the reply line.
pub fn memhog_query(pid: u32, port: u16, cmd: &str) -> Result<String> {
    memhog_query_timeout(pid, port, cmd, Duration::from_secs(30))
}

/// [`memhog_query`] with an explicit timeout.
pub fn memhog_query_timeout(pid: u32, port: u16, cmd: &str, timeout: Duration) -> Result<String> {
    let bin = memhog_bin()?;
    let mut c = Command::new(&bin);
    c.arg("query")
        .arg("--pid")
        .arg(pid.to_string())
        .arg("--port")
        .arg(port.to_string())
        .arg("--timeout-ms")
        .arg(timeout.as_millis().to_string())
        .args(cmd.split_whitespace())
        .stdin(Stdio::null());
    let o = run_with_timeout(c, timeout + Duration::from_secs(10))?
        .ok_or_else(|| anyhow!("memhog query {cmd} (pid {pid}) hung past its own timeout"))?;
    if !o.status.success() {
        bail!(
            "memhog query --pid {pid} --port {port} {cmd} failed ({}): {}",
            o.status,
            String::from_utf8_lossy(&o.stderr).trim()
        );
    }
    let text = String::from_utf8_lossy(&o.stdout);
    Ok(text.lines().next().unwrap_or_default().trim().to_string())
}

/// Checks that the real stack is present: root, userfaultfd, criu, runc, containerd (in
/// `$DISTRIPROC_CONTAINERD_DIR` or the default dir). When something is missing it prints the
/// reason and returns false (the caller returns early = skip); with `CI=true` it panics instead,
/// because CI must run these tests.
pub fn require_stack() -> bool {
    require_stack_in(&containerd_dir_from_env())
}

/// Contract name of [`require_stack`].
pub fn skip_unless_root_and_stack() -> bool {
    require_stack()
}

/// [`require_stack`] for a given containerd directory.
pub fn require_stack_in(containerd_dir: &Path) -> bool {
    match stack_problems(containerd_dir) {
        None => true,
        Some(reason) => {
            let ci = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
            if ci {
                panic!("real-stack test cannot run (CI=true, so this is a failure): {reason}");
            }
            eprintln!("SKIPPED: real-stack test needs: {reason}");
            false
        }
    }
}

/// Why the real stack is unusable here, or None when everything is present.
pub fn stack_problems(containerd_dir: &Path) -> Option<String> {
    let mut missing = Vec::new();
    if !nix::unistd::geteuid().is_root() {
        missing.push("root (run as root)".to_string());
    }
    if !userfaultfd_available() {
        missing.push("userfaultfd (neither /dev/userfaultfd nor the syscall works)".to_string());
    }
    if !runs_ok("criu", &["--version"]) {
        missing.push("criu >= 4.2 in PATH (run `make deps`)".to_string());
    }
    if !runs_ok("runc", &["--version"]) {
        missing.push("runc in PATH (run `make deps`)".to_string());
    }
    for bin in ["containerd", "ctr", "containerd-shim-runc-v2"] {
        if !containerd_dir.join(bin).is_file() {
            missing.push(format!(
                "{} (run `make deps`)",
                containerd_dir.join(bin).display()
            ));
        }
    }
    if missing.is_empty() {
        None
    } else {
        Some(missing.join("; "))
    }
}

fn runs_ok(bin: &str, args: &[&str]) -> bool {
    let mut c = Command::new(bin);
    c.args(args).stdin(Stdio::null());
    let path = format!(
        "{}:{SYSTEM_PATH}",
        std::env::var("PATH").unwrap_or_default()
    );
    c.env("PATH", path);
    matches!(run_with_timeout(c, Duration::from_secs(10)), Ok(Some(o)) if o.status.success())
}

fn userfaultfd_available() -> bool {
    if Path::new("/dev/userfaultfd").exists() {
        return true;
    }
    // SAFETY: userfaultfd(2) takes only flags; on success we own the returned fd and close it.
    let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | libc::O_NONBLOCK) };
    if fd >= 0 {
        if let Ok(fd) = libc::c_int::try_from(fd) {
            // SAFETY: fd was just returned by userfaultfd(2) and is not used elsewhere.
            unsafe { libc::close(fd) };
        }
        return true;
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_v3_disables_cri_plugins() {
        let s = config_toml(3, Path::new("/tmp/dpt.x"), Some("[plugins]\n"));
        assert!(s.starts_with("version = 3\n"));
        assert!(s.contains("\"io.containerd.cri.v1.runtime\""));
        assert!(s.contains("address = \"/tmp/dpt.x/c.sock\""));
        assert!(s.ends_with("[plugins]\n\n"));
    }

    #[test]
    fn config_v2_for_containerd_1() {
        let s = config_toml(2, Path::new("/tmp/dpt.y"), None);
        assert!(s.starts_with("version = 2\n"));
        assert!(s.contains("root = \"/tmp/dpt.y/root\""));
        assert!(!s.contains("cri.v1"));
    }

    #[test]
    fn run_with_timeout_kills() {
        let mut c = Command::new("sleep");
        c.arg("5");
        let t = Instant::now();
        assert!(run_with_timeout(c, Duration::from_millis(100))
            .unwrap()
            .is_none());
        assert!(t.elapsed() < Duration::from_secs(3));
        let mut c = Command::new("echo");
        c.arg("hi");
        let o = run_with_timeout(c, Duration::from_secs(5))
            .unwrap()
            .unwrap();
        assert_eq!(o.stdout, b"hi\n");
    }

    #[test]
    fn wait_for_times_out() {
        assert!(!wait_for(|| false, Duration::from_millis(50)));
        let mut n = 0;
        assert!(wait_for(
            || {
                n += 1;
                n > 2
            },
            Duration::from_secs(1)
        ));
    }

    #[test]
    fn mount_paths_unescape() {
        assert_eq!(unescape_mount_path("/a\\040b"), "/a b");
    }
}
