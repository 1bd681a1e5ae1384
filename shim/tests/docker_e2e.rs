//! Docker end-to-end: a real `dockerd` (Debian's docker.io 26.x, `scripts/deps-docker.sh`)
//! drives our shim through a private containerd of the harness, and `docker checkpoint create`
//! + `docker start --checkpoint` restore a memhog container lazily.
//!
//! Everything is private to the test: dockerd runs with `--containerd <harness socket>`
//! (it starts no containerd of its own), `--containerd-namespace <harness namespace>`, its own
//! data root, exec root, pidfile and socket under the harness's temp dir, `--experimental`
//! (the checkpoint API), `--bridge none --iptables=false --ip6tables=false` (no host network
//! changes) and `cgroup-parent` = the harness namespace (so the harness's clean-up finds the
//! container cgroups). The system's /var/lib/docker and /run/docker.sock are never touched.
//! dockerd creates `/run/docker/plugins` unconditionally; the test removes it again when it
//! did not exist before (only if empty).
//!
//! Four containers, each checkpointed once and restored through our shim:
//! - runtime `distriproc` (daemon.json `runtimeType` only): full background fill, the shim's
//!   `<bundle>/distriproc-lazy-stats.json` reaches `finished`;
//! - runtime `distriproc-nofill` (daemon.json `options.ConfigPath` -> the shim reads a TOML
//!   file with `fill = "none"`): nothing is filled in the background;
//! - runtime `distriproc` with `docker run --annotation io.distriproc.fill-policy=none`;
//! - runtime `distriproc-remote` (`ConfigPath` -> `[pageserver] address` of an in-process
//!   `distriproc-pageserver` on loopback, with a token): `docker checkpoint create` uploads the
//!   memory to the page server, the checkpoint Docker stores holds the reference file
//!   `distriproc-remote.json` and no page data, and the restore fetches the pages remotely.
//!
//! In each case memhog's `SUM` over all memory equals `EXPECT` and `VERIFY` is OK after the
//! restore. Then the migration cycle: `distriproc-remote` with fill `none`, restored, 10 %
//! rewritten, `docker checkpoint create` of the restored container (a new layer at the page
//! server, nothing pulled), `docker start --checkpoint` of it, twice, every page checked.
//! Runs on containerd 2.1 (`docker_ctd21`) and 1.7 (`docker_ctd17`). Skips with a reason when
//! docker.io or the real stack is missing; fails instead when `CI=true`.
//!
//! The same file checks the deployment files under `deploy/` (docs/INTEGRATIONS.md):
//! `deploy_config_files_parse` (example TOML files and the Kubernetes ConfigMaps' TOML through
//! the configuration crate) and `deploy_check_ctd21` (runs `deploy/check.sh`: CRI-enabled
//! containerd 1.7 and 2.1 with the runtime snippets, Kubernetes schema validation).

use std::fs;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context, Result};
use distriproc_harness::{
    build_test_images, memhog_query, require_stack_in, run_with_timeout, unmount_under, wait_for,
    Containerd, ContainerdOpts, CONTAINERD_1_7_DIR, CONTAINERD_2_1_DIR, MEMHOG_IMAGE, MEMHOG_PORT,
};
use distriproc_pageserver::{Server, ServerHandle, ServerOptions};

const SHIM: &str = env!("CARGO_BIN_EXE_containerd-shim-distriproc-v2");
/// Debian's docker.io and docker-cli install these.
const DOCKERD: &str = "/usr/sbin/dockerd";
const DOCKER: &str = "/usr/bin/docker";
const MIN_DOCKER_MAJOR: u32 = 26;
const DOCKER_TIMEOUT: Duration = Duration::from_secs(120);
const LOG_TAIL: usize = 40;
/// memhog size per container: small enough for a shared 2-core machine, large enough that the
/// restore has thousands of lazy pages.
const MIB: &str = "64";
/// Token of the test's page server.
const REMOTE_TOKEN: &str = "docker-e2e-token";

/// Why Docker cannot be used here, or None.
fn docker_problems() -> Option<String> {
    let mut missing = Vec::new();
    let mut c = Command::new(DOCKERD);
    c.arg("--version").stdin(Stdio::null());
    match run_with_timeout(c, Duration::from_secs(20)) {
        Ok(Some(o)) if o.status.success() => {
            // "Docker version 26.1.5+dfsg1, build 411e817"
            let text = String::from_utf8_lossy(&o.stdout).into_owned();
            let major = text
                .split_whitespace()
                .nth(2)
                .and_then(|v| v.split('.').next())
                .and_then(|m| m.parse::<u32>().ok());
            match major {
                Some(m) if m >= MIN_DOCKER_MAJOR => {}
                _ => missing.push(format!(
                    "dockerd >= {MIN_DOCKER_MAJOR} (found {:?}; run `bash scripts/deps-docker.sh`)",
                    text.trim()
                )),
            }
        }
        _ => missing.push(format!(
            "{DOCKERD} (Debian docker.io >= {MIN_DOCKER_MAJOR}; run `bash scripts/deps-docker.sh`)"
        )),
    }
    if !Path::new(DOCKER).is_file() {
        missing.push(format!(
            "{DOCKER} (Debian docker-cli; run `bash scripts/deps-docker.sh`)"
        ));
    }
    (!missing.is_empty()).then(|| missing.join("; "))
}

/// The real stack (harness) and Docker are present; otherwise prints a SKIPPED reason and
/// returns false, or panics when `CI=true`.
fn require_docker_stack(containerd_dir: &str) -> bool {
    if !require_stack_in(Path::new(containerd_dir)) {
        return false;
    }
    match docker_problems() {
        None => true,
        Some(reason) => {
            let ci = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
            if ci {
                panic!("docker e2e test cannot run (CI=true, so this is a failure): {reason}");
            }
            eprintln!("SKIPPED: docker e2e test needs: {reason}");
            false
        }
    }
}

/// A private dockerd attached to a harness containerd; stopped and cleaned up on drop (drop it
/// before the [`Containerd`]).
struct Dockerd {
    dir: PathBuf,
    socket: PathBuf,
    log: PathBuf,
    child: Option<Child>,
    remove_run_docker: bool,
}

impl Dockerd {
    /// Writes daemon.json (our runtimes, cgroup parent) and starts dockerd; waits until
    /// `docker version` answers (60 s). `remote_cfg` is the shim configuration of the runtime
    /// `distriproc-remote`.
    fn start(ctd: &Containerd, remote_cfg: &Path) -> Result<Dockerd> {
        let dir = ctd.dir().join("docker");
        for d in ["data", "exec", "cli"] {
            fs::create_dir_all(dir.join(d))
                .with_context(|| format!("creating {}", dir.join(d).display()))?;
        }
        let nofill = dir.join("shim-nofill.toml");
        fs::write(
            &nofill,
            "# read by the shim through runtimeoptions.v1.Options.config_path\n\
             [fetcher]\nfill = \"none\"\n",
        )?;
        let daemon_json = serde_json::json!({
            "runtimes": {
                "distriproc": { "runtimeType": "io.containerd.distriproc.v2" },
                "distriproc-nofill": {
                    "runtimeType": "io.containerd.distriproc.v2",
                    "options": { "ConfigPath": nofill }
                },
                "distriproc-remote": {
                    "runtimeType": "io.containerd.distriproc.v2",
                    "options": { "ConfigPath": remote_cfg }
                }
            },
            "cgroup-parent": format!("/{}", ctd.namespace()),
        });
        let cfg = dir.join("daemon.json");
        fs::write(&cfg, serde_json::to_vec_pretty(&daemon_json)?)?;

        let socket = dir.join("docker.sock");
        let log = dir.join("dockerd.log");
        let logf = fs::File::create(&log)?;
        let path = format!(
            "{}:{}:{}",
            ctd.dir().join("bin").display(),
            ctd.containerd_dir().display(),
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
        );
        let remove_run_docker = !Path::new("/run/docker").exists();
        let mut cmd = Command::new(DOCKERD);
        cmd.arg("--config-file")
            .arg(&cfg)
            .arg("--data-root")
            .arg(dir.join("data"))
            .arg("--exec-root")
            .arg(dir.join("exec"))
            .arg("--pidfile")
            .arg(dir.join("dockerd.pid"))
            .arg("--host")
            .arg(format!("unix://{}", socket.display()))
            .arg("--containerd")
            .arg(ctd.socket())
            .arg("--containerd-namespace")
            .arg(ctd.namespace())
            .arg("--containerd-plugins-namespace")
            .arg(format!("{}-plugins", ctd.namespace()))
            .args([
                "--experimental",
                "--bridge",
                "none",
                "--iptables=false",
                "--ip6tables=false",
                "--debug",
            ])
            .env("PATH", path)
            .env("TMPDIR", ctd.tmp_dir())
            .stdin(Stdio::null())
            .stdout(logf.try_clone()?)
            .stderr(logf)
            .process_group(0);
        let child = cmd.spawn().with_context(|| format!("starting {DOCKERD}"))?;
        let mut d = Dockerd {
            dir,
            socket,
            log,
            child: Some(child),
            remove_run_docker,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(st) = d.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                bail!(
                    "dockerd exited during start-up ({st}); log tail:\n{}",
                    d.log_tail()
                );
            }
            if d.socket.exists() {
                if let Ok(o) = d.docker_timeout(&["version"], Duration::from_secs(10)) {
                    if o.status.success() {
                        break;
                    }
                }
            }
            if Instant::now() > deadline {
                bail!(
                    "dockerd did not answer within 60 s; log tail:\n{}",
                    d.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(d)
    }

    fn log_tail(&self) -> String {
        let text = fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(LOG_TAIL)..].join("\n")
    }

    fn docker_timeout(&self, args: &[&str], timeout: Duration) -> Result<Output> {
        let mut cmd = Command::new(DOCKER);
        cmd.args(args)
            .env("DOCKER_HOST", format!("unix://{}", self.socket.display()))
            .env("DOCKER_CONFIG", self.dir.join("cli"))
            .stdin(Stdio::null());
        run_with_timeout(cmd, timeout)?.ok_or_else(|| {
            anyhow!(
                "`docker {}` timed out after {timeout:?}; dockerd log tail:\n{}",
                args.join(" "),
                self.log_tail()
            )
        })
    }

    /// Runs docker; its trimmed stdout, or an error with its stderr.
    fn docker(&self, args: &[&str]) -> Result<String> {
        let o = self.docker_timeout(args, DOCKER_TIMEOUT)?;
        if !o.status.success() {
            bail!(
                "`docker {}` failed ({}): {}",
                args.join(" "),
                o.status,
                String::from_utf8_lossy(&o.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&o.stdout).trim().to_string())
    }

    fn inspect(&self, name: &str, format: &str) -> Result<String> {
        self.docker(&["inspect", "--format", format, name])
    }

    fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if let Ok(None) = child.try_wait() {
            let t = Duration::from_secs(30);
            if let Ok(o) = self.docker_timeout(&["ps", "-aq"], t) {
                for id in String::from_utf8_lossy(&o.stdout).split_whitespace() {
                    let _ = self.docker_timeout(&["rm", "-f", id], t);
                }
            }
            if let Ok(pid) = libc::pid_t::try_from(child.id()) {
                // SAFETY: kill(2) on the pid of our own child; no memory is involved.
                unsafe {
                    libc::kill(pid, libc::SIGTERM);
                }
            }
            let deadline = Instant::now() + Duration::from_secs(20);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
        }
        let _ = child.wait();
        unmount_under(&self.dir);
        if self.remove_run_docker {
            // Only empty directories: anything else there is not ours.
            let _ = fs::remove_dir("/run/docker/plugins");
            let _ = fs::remove_dir("/run/docker");
        }
    }
}

impl Drop for Dockerd {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "docker e2e: test failed; dockerd log ({}) tail:\n{}",
                self.log.display(),
                self.log_tail()
            );
        }
        self.stop();
    }
}

/// `docker load` in Docker 26 with its own image store wants a docker-archive (manifest.json);
/// the test images are OCI layouts. Adds manifest.json (config, layers, RepoTags from the
/// index's `org.opencontainers.image.ref.name`) next to index.json and re-tars.
fn docker_archive(oci_tar: &Path, work: &Path) -> Result<PathBuf> {
    let x = work.join("oci-layout");
    fs::create_dir_all(&x)?;
    let run = |cmd: &mut Command| -> Result<()> {
        let o = cmd.output().with_context(|| format!("running {cmd:?}"))?;
        ensure!(
            o.status.success(),
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        );
        Ok(())
    };
    run(Command::new("tar")
        .arg("-C")
        .arg(&x)
        .arg("-xf")
        .arg(oci_tar))?;
    let read_json = |p: PathBuf| -> Result<serde_json::Value> {
        let t = fs::read(&p).with_context(|| format!("reading {}", p.display()))?;
        serde_json::from_slice(&t).with_context(|| format!("parsing {}", p.display()))
    };
    let blob = |digest: &serde_json::Value| -> Result<String> {
        let d = digest
            .as_str()
            .ok_or_else(|| anyhow!("digest {digest} is not a string"))?;
        Ok(format!("blobs/{}", d.replacen(':', "/", 1)))
    };
    let index = read_json(x.join("index.json"))?;
    let desc = &index["manifests"][0];
    let tag = desc["annotations"]["org.opencontainers.image.ref.name"]
        .as_str()
        .unwrap_or(MEMHOG_IMAGE)
        .to_string();
    let manifest = read_json(x.join(blob(&desc["digest"])?))?;
    let layers = manifest["layers"]
        .as_array()
        .ok_or_else(|| anyhow!("manifest without layers"))?
        .iter()
        .map(|l| blob(&l["digest"]))
        .collect::<Result<Vec<_>>>()?;
    let docker_manifest = serde_json::json!([{
        "Config": blob(&manifest["config"]["digest"])?,
        "RepoTags": [tag],
        "Layers": layers,
    }]);
    fs::write(
        x.join("manifest.json"),
        serde_json::to_vec(&docker_manifest)?,
    )?;
    let out = work.join("memhog.docker.tar");
    run(Command::new("tar")
        .arg("-C")
        .arg(&x)
        .arg("-cf")
        .arg(&out)
        .arg("."))?;
    fs::remove_dir_all(&x)?;
    Ok(out)
}

/// What one checkpoint/restore through Docker produced.
struct Restored {
    id: String,
    stats: serde_json::Value,
}

/// `docker run` memhog under `runtime`, checkpoint it, stop it, `docker start --checkpoint`,
/// then check every page (SUM == EXPECT, VERIFY) and return the shim's lazy stats (after the
/// fill finished when `wait_fill`).
fn run_checkpoint_restore(
    ctd: &Containerd,
    d: &Dockerd,
    name: &str,
    runtime: &str,
    extra_run_args: &[&str],
    wait_fill: bool,
    after_checkpoint: &dyn Fn(&str) -> Result<()>,
) -> Result<Restored> {
    let mut args = vec![
        "run",
        "-d",
        "--name",
        name,
        "--runtime",
        runtime,
        "--network",
        "none",
    ];
    args.extend_from_slice(extra_run_args);
    args.extend_from_slice(&[MEMHOG_IMAGE, "/memhog", "serve", "--mib", MIB]);
    let id = d.docker(&args)?;
    ensure!(
        id.len() == 64,
        "docker run printed {id:?}, not a container id"
    );
    let pid: u32 = d.inspect(name, "{{.State.Pid}}")?.parse()?;
    let expect = memhog_query(pid, MEMHOG_PORT, "EXPECT")?;
    let sum = memhog_query(pid, MEMHOG_PORT, "SUM")?;
    ensure!(sum == expect, "{name} before checkpoint: {sum} != {expect}");

    d.docker(&["checkpoint", "create", name, "cp1"])?;
    after_checkpoint(&id)?;
    // Docker asks for exit-after-checkpoint only through runc's CheckpointOptions, which a
    // non-runc runtime does not get: our shim leaves the container running. Stop it.
    stop_after_checkpoint(d, name)?;
    let listed = d.docker(&["checkpoint", "ls", name])?;
    ensure!(
        listed.contains("cp1"),
        "docker checkpoint ls {name}: {listed:?}"
    );

    let new_pid = start_from_checkpoint(d, name, "cp1")?;
    let sum = memhog_query(new_pid, MEMHOG_PORT, "SUM")?;
    ensure!(
        sum == expect,
        "{name} after lazy restore: SUM {sum} != EXPECT {expect}"
    );
    let verify = memhog_query(new_pid, MEMHOG_PORT, "VERIFY")?;
    ensure!(verify.starts_with("OK"), "{name} VERIFY: {verify}");

    let log = ctd.log_text();
    ensure!(
        log.contains(&format!("restoring {id} from")) && log.contains("(lazy: true)"),
        "the shim did not log a lazy restore of {id}; containerd log tail:\n{}",
        ctd.log_tail(40)
    );
    if wait_fill {
        let done = wait_for(
            || {
                ctd.lazy_stats(&id)
                    .is_ok_and(|s| s["finished"] == serde_json::Value::Bool(true))
            },
            Duration::from_secs(60),
        );
        ensure!(
            done,
            "{name}: lazy stats never finished: {:?}",
            ctd.lazy_stats(&id).ok()
        );
        let finished_line = format!("lazy restore of {id} finished");
        ensure!(
            wait_for(
                || ctd.log_text().contains(&finished_line),
                Duration::from_secs(10)
            ),
            "no `{finished_line}` line in the containerd log"
        );
    }
    if !wait_fill {
        // No background fill: SUM touched every page, so demand faults (and their prefetch
        // windows) must have brought them in; the stats file is rewritten every second.
        let demand = |s: &serde_json::Value| {
            s["pages_faulted"].as_u64().unwrap_or(0) + s["pages_prefetched"].as_u64().unwrap_or(0)
        };
        let served = wait_for(
            || ctd.lazy_stats(&id).is_ok_and(|s| demand(&s) >= 1000),
            Duration::from_secs(10),
        );
        ensure!(
            served,
            "{name}: demand faults did not bring the pages in: {:?}",
            ctd.lazy_stats(&id).ok()
        );
    }
    let stats = ctd.lazy_stats(&id)?;
    ensure!(
        stats["lazy_pages"].as_u64().unwrap_or(0) > 1000,
        "{name}: too few lazy pages: {stats}"
    );
    ensure!(
        stats["faults"].as_u64().unwrap_or(0) > 0,
        "{name}: no faults served by the shim's fetcher: {stats}"
    );
    eprintln!("docker e2e: {name} ({runtime} {extra_run_args:?}) restored lazily: {stats}");
    d.docker(&["rm", "-f", name])?;
    Ok(Restored { id, stats })
}

/// Kills `name` if it still runs (our shim leaves a checkpointed container running: Docker asks
/// for the exit only through runc's options) and waits until Docker sees it stopped.
fn stop_after_checkpoint(d: &Dockerd, name: &str) -> Result<()> {
    if d.inspect(name, "{{.State.Running}}")? == "true" {
        d.docker(&["kill", name])?;
    }
    ensure!(
        wait_for(
            || {
                d.inspect(name, "{{.State.Running}}")
                    .is_ok_and(|r| r == "false")
            },
            Duration::from_secs(30),
        ),
        "{name} still running after docker kill"
    );
    Ok(())
}

/// `docker start --checkpoint CP NAME`; the new pid. Docker 26 re-tars its checkpoint
/// directory into containerd's content store; when that tar is byte-identical to the one
/// containerd wrote at checkpoint time (a small remote checkpoint) and containerd has not yet
/// garbage-collected it, the commit fails with "content sha256:...: already exists" (seen with
/// containerd 1.7). Docker does not treat that as success; a retry after containerd's GC goes
/// through.
fn start_from_checkpoint(d: &Dockerd, name: &str, cp: &str) -> Result<u32> {
    let mut attempt = 0;
    loop {
        attempt += 1;
        match d.docker(&["start", "--checkpoint", cp, name]) {
            Ok(_) => break,
            Err(e) if attempt < 10 && e.to_string().contains("already exists") => {
                eprintln!("docker e2e: {name}: retrying docker start --checkpoint: {e}");
                std::thread::sleep(Duration::from_secs(1));
            }
            Err(e) => return Err(e),
        }
    }
    let pid: u32 = d.inspect(name, "{{.State.Pid}}")?.parse()?;
    ensure!(
        pid != 0 && d.inspect(name, "{{.State.Running}}")? == "true",
        "{name} is not running after docker start --checkpoint {cp}"
    );
    Ok(pid)
}

/// The migration cycle through Docker: a remote checkpoint, a lazy restore with fill `none`,
/// 10 % of the pages rewritten, `docker checkpoint create` of the restored container (a layer
/// over the checkpoint it came from at the page server, nothing pulled), `docker start
/// --checkpoint` of that, twice; every page checked after each restore.
fn docker_migration_cycle(ctd: &Containerd, d: &Dockerd, store: &Path) -> Result<()> {
    let name = "dp-mig";
    d.docker(&[
        "run",
        "-d",
        "--name",
        name,
        "--runtime",
        "distriproc-remote",
        "--network",
        "none",
        "--annotation",
        "io.distriproc.fill-policy=none",
        MEMHOG_IMAGE,
        "/memhog",
        "serve",
        "--mib",
        MIB,
    ])?;
    let id = d.inspect(name, "{{.Id}}")?;
    let pid: u32 = d.inspect(name, "{{.State.Pid}}")?.parse()?;
    let mut expect = memhog_query(pid, MEMHOG_PORT, "EXPECT")?;
    d.docker(&["checkpoint", "create", name, "m0"])?;
    stop_after_checkpoint(d, name)?;
    let mut pid = start_from_checkpoint(d, name, "m0")?;
    let layers_before = |dir: &Path| -> Result<usize> {
        Ok(fs::read_dir(dir)?
            .flatten()
            .filter(|e| e.path().join("parent").exists())
            .count())
    };
    for cycle in 1..=2 {
        let got = memhog_query(pid, MEMHOG_PORT, "EXPECT")?;
        ensure!(
            got == expect,
            "{name} cycle {cycle}: EXPECT {got} != {expect}"
        );
        let wrote = memhog_query(pid, MEMHOG_PORT, "WRITE 10")?;
        ensure!(wrote.starts_with("OK"), "{name} WRITE 10: {wrote}");
        expect = memhog_query(pid, MEMHOG_PORT, "EXPECT")?;
        let fetched = ctd.lazy_stats(&id)?["bytes"].as_u64().unwrap_or(0);
        let layers = layers_before(store)?;
        let cp = format!("m{cycle}");
        d.docker(&["checkpoint", "create", name, &cp])?;
        // A layer over the checkpoint the container came from, and nothing pulled for it.
        ensure!(
            layers_before(store)? == layers + 1,
            "{name} cycle {cycle}: the checkpoint is not a new layer at the page server"
        );
        let log = ctd.log_text();
        let line = log
            .lines()
            .rev()
            .find(|l| l.contains(&format!("checkpoint of {id}: dump completed")))
            .with_context(|| format!("no dump completion logged for {id}"))?;
        ensure!(
            line.contains(" 0 pages still remote read from the page source"),
            "{name} cycle {cycle}: the checkpoint pulled memory: {line}"
        );
        stop_after_checkpoint(d, name)?;
        ensure!(
            fetched < 32 << 20,
            "{name} cycle {cycle}: {fetched} bytes were fetched before the checkpoint (fill none)"
        );
        pid = start_from_checkpoint(d, name, &cp)?;
        let sum = memhog_query(pid, MEMHOG_PORT, "SUM")?;
        ensure!(
            sum == expect,
            "{name} cycle {cycle} restored: SUM {sum} != EXPECT {expect}"
        );
        let verify = memhog_query(pid, MEMHOG_PORT, "VERIFY")?;
        ensure!(
            verify.starts_with("OK"),
            "{name} cycle {cycle} VERIFY: {verify}"
        );
        eprintln!("docker e2e: {name}: cycle {cycle} restored from layer {cp}: SUM and VERIFY OK");
    }
    d.docker(&["rm", "-f", name])?;
    Ok(())
}

/// Memory of the memhog restored under a smaller memory limit, and that limit (MiB).
const LIMITED_MIB: u64 = 256;
const LIMIT_MIB: u64 = 160;

/// A 256 MiB memhog checkpointed to the page server, its memory limit then lowered to
/// 160 MiB (`docker update`), started from the checkpoint: it restores and runs instead of
/// being OOM-killed (the shim derives a memory budget from the limit), reads all of its memory
/// right, rewrites 30 % of it (write-back makes the written pages evictable) and verifies.
fn restore_under_a_smaller_limit(ctd: &Containerd, d: &Dockerd) -> Result<()> {
    let name = "dp-limit";
    let mib = LIMITED_MIB.to_string();
    d.docker(&[
        "run",
        "-d",
        "--name",
        name,
        "--runtime",
        "distriproc-remote",
        "--network",
        "none",
        MEMHOG_IMAGE,
        "/memhog",
        "serve",
        "--mib",
        &mib,
        "--threads",
        "2",
    ])?;
    let pid: u32 = d.inspect(name, "{{.State.Pid}}")?.parse()?;
    let sum = memhog_query(pid, MEMHOG_PORT, "SUM")?;
    ensure!(
        sum == memhog_query(pid, MEMHOG_PORT, "EXPECT")?,
        "{name}: SUM before"
    );
    d.docker(&["checkpoint", "create", name, "cp1"])?;
    stop_after_checkpoint(d, name)?;
    let limit = format!("{LIMIT_MIB}m");
    d.docker(&["update", "--memory", &limit, "--memory-swap", &limit, name])?;
    let pid = start_from_checkpoint(d, name, "cp1")?;
    let id = d.inspect(name, "{{.Id}}")?;
    for i in 0..3 {
        let w = memhog_query(pid, MEMHOG_PORT, "WRITE 10")?;
        ensure!(w.starts_with("OK"), "{name}: WRITE {i}: {w}");
    }
    let expect = memhog_query(pid, MEMHOG_PORT, "EXPECT")?;
    let sum = memhog_query(pid, MEMHOG_PORT, "SUM")?;
    ensure!(sum == expect, "{name} under {limit}: SUM {sum} != {expect}");
    let verify = memhog_query(pid, MEMHOG_PORT, "VERIFY")?;
    ensure!(
        verify.starts_with("OK"),
        "{name} under {limit}: VERIFY {verify}"
    );
    ensure!(
        d.inspect(name, "{{.State.Running}}")? == "true"
            && d.inspect(name, "{{.State.OOMKilled}}")? == "false",
        "{name} did not survive under {limit}"
    );
    ensure!(
        d.inspect(name, "{{.HostConfig.Memory}}")? == (LIMIT_MIB << 20).to_string(),
        "{name}: the limit was not applied"
    );
    let stats = ctd.lazy_stats(&id)?;
    let budget = stats["budget_pages"].as_u64().unwrap_or(0);
    ensure!(
        budget > 0 && budget * 4096 < LIMIT_MIB << 20,
        "{name}: no budget below the limit: {stats}"
    );
    ensure!(
        stats["pages_evicted"].as_u64().unwrap_or(0) > 0,
        "{name}: nothing evicted under the limit: {stats}"
    );
    eprintln!(
        "docker e2e: {name}: {LIMITED_MIB} MiB restored and rewritten under {limit}: {stats}"
    );
    d.docker(&["rm", "-f", name])?;
    Ok(())
}

fn docker_lazy_restore(containerd_dir: &str) -> Result<()> {
    if !require_docker_stack(containerd_dir) {
        return Ok(());
    }
    let out = build_test_images()?;
    let ctd = Containerd::start(ContainerdOpts::with_containerd_dir(containerd_dir).shim(SHIM))?;
    // The page server of the `distriproc-remote` runtime: in-process, loopback, with a token.
    let remote_dir = ctd.dir().join("remote");
    fs::create_dir_all(remote_dir.join("store"))?;
    let mut so = ServerOptions::for_store(remote_dir.join("store"));
    so.listen = vec!["127.0.0.1:0".into()];
    so.token = Some(REMOTE_TOKEN.into());
    let server: ServerHandle = Server::start(so)?;
    let address = server
        .addrs()
        .first()
        .cloned()
        .ok_or_else(|| anyhow!("page server bound no address"))?;
    fs::write(remote_dir.join("token"), format!("{REMOTE_TOKEN}\n"))?;
    let remote_cfg = remote_dir.join("shim-remote.toml");
    fs::write(
        &remote_cfg,
        format!(
            "[pageserver]\naddress = \"{address}\"\ntoken_file = \"{}\"\n\
             connect_timeout_ms = 2000\nio_timeout_ms = 5000\nretry_timeout_ms = 3000\n",
            remote_dir.join("token").display()
        ),
    )?;
    let d = Dockerd::start(&ctd, &remote_cfg)?;
    let info: serde_json::Value =
        serde_json::from_str(&d.docker(&["info", "--format", "{{json .Runtimes}}"])?)?;
    let names: Vec<&String> = info
        .as_object()
        .map(|o| o.keys().collect())
        .unwrap_or_default();
    ensure!(
        info.get("distriproc").is_some() && info.get("distriproc-nofill").is_some(),
        "docker info does not list our runtimes: {names:?}"
    );
    let tar = docker_archive(&out.join("memhog.oci.tar"), &ctd.dir().join("docker"))?;
    let loaded = d.docker(&["load", "--input", tar.to_str().context("tar path")?])?;
    ensure!(loaded.contains(MEMHOG_IMAGE), "docker load: {loaded}");

    // 1. runtimeType only: default configuration, full background fill.
    let none = |_: &str| Ok(());
    let r = run_checkpoint_restore(&ctd, &d, "dp-full", "distriproc", &[], true, &none)?;
    ensure!(
        r.stats["pages_filled"].as_u64().unwrap_or(0) > 0,
        "dp-full: the background fill filled nothing: {}",
        r.stats
    );

    // 2. daemon.json options.ConfigPath -> runtimeoptions.v1.Options.config_path -> fill none.
    let r = run_checkpoint_restore(&ctd, &d, "dp-cfg", "distriproc-nofill", &[], false, &none)?;
    ensure!(
        r.stats["pages_filled"].as_u64() == Some(0) && r.stats["fill_complete_us"].is_null(),
        "dp-cfg: ConfigPath's fill = \"none\" was not applied (container {}): {}",
        r.id,
        r.stats
    );

    // 3. docker run --annotation io.distriproc.fill-policy=none.
    let r = run_checkpoint_restore(
        &ctd,
        &d,
        "dp-ann",
        "distriproc",
        &["--annotation", "io.distriproc.fill-policy=none"],
        false,
        &none,
    )?;
    ensure!(
        r.stats["pages_filled"].as_u64() == Some(0) && r.stats["fill_complete_us"].is_null(),
        "dp-ann: the fill-policy annotation was not applied (container {}): {}",
        r.id,
        r.stats
    );

    // 4. Remote checkpoint: the memory goes to the page server at `docker checkpoint create`;
    //    what Docker keeps (and tars back at `docker start --checkpoint`) has no page data.
    let data = ctd.dir().join("docker/data/containers");
    let stored = |id: &str| -> Result<()> {
        let cp = data.join(id).join("checkpoints/cp1");
        ensure!(
            cp.join("distriproc-remote.json").is_file(),
            "{}: no distriproc-remote.json: the checkpoint was not published",
            cp.display()
        );
        let mut page_bytes = 0;
        for e in fs::read_dir(&cp)? {
            let e = e?;
            if e.file_name().to_string_lossy().starts_with("pages-") {
                page_bytes += e.metadata()?.len();
            }
        }
        ensure!(
            page_bytes < 8 << 20,
            "{}: {page_bytes} bytes of pages-*.img left locally for {MIB} MiB of memory",
            cp.display()
        );
        eprintln!("docker e2e: dp-remote: Docker's checkpoint keeps {page_bytes} bytes of pages");
        Ok(())
    };
    let r = run_checkpoint_restore(
        &ctd,
        &d,
        "dp-remote",
        "distriproc-remote",
        &[],
        true,
        &stored,
    )?;
    ensure!(
        r.stats["remote"]["bytes"].as_u64().unwrap_or(0) >= 32 << 20,
        "dp-remote: the memory did not come from the page server: {}",
        r.stats
    );

    // 5. The migration cycle: checkpoints of a restored container, restored again. (Docker
    //    removes containerd's checkpoint image once it has copied it, so containerd 1.7's
    //    second-checkpoint failure that `ctr` meets does not arise here.)
    docker_migration_cycle(&ctd, &d, &remote_dir.join("store"))?;

    // 6. A memory limit below the checkpoint's size.
    restore_under_a_smaller_limit(&ctd, &d)?;
    drop(d);
    drop(ctd);
    drop(server);
    Ok(())
}

#[test]
fn docker_ctd21() -> Result<()> {
    docker_lazy_restore(CONTAINERD_2_1_DIR)
}

#[test]
fn docker_ctd17() -> Result<()> {
    docker_lazy_restore(CONTAINERD_1_7_DIR)
}

/// The TOML embedded in a Kubernetes ConfigMap under `key: |` (indented block after the key).
fn configmap_toml(yaml: &str, key: &str) -> Option<String> {
    let mut lines = yaml.lines();
    lines.find(|l| l.trim() == format!("{key}: |"))?;
    let block: Vec<&str> = lines
        .take_while(|l| l.trim().is_empty() || l.starts_with("    "))
        .collect();
    Some(
        block
            .iter()
            .map(|l| l.get(4..).unwrap_or(""))
            .collect::<Vec<_>>()
            .join("\n"),
    )
}

/// The configuration files under deploy/ are valid for the shim's and the page server's own
/// parsers (unknown keys and bad values are errors there), and point at each other.
#[test]
fn deploy_config_files_parse() -> Result<()> {
    use distriproc_config::{pageserver::PageServerConfig, ShimConfig, DEFAULT_SHIM_CONFIG_PATH};
    let deploy = distriproc_harness::repo_root().join("deploy");
    let shim = ShimConfig::load(&deploy.join("distriproc/shim.toml"))?;
    ensure!(
        shim == ShimConfig::default(),
        "deploy/distriproc/shim.toml must list the defaults: {shim:?}"
    );
    let ps = PageServerConfig::load(&deploy.join("distriproc/pageserver.toml"))?;
    ensure!(
        ps == PageServerConfig::default(),
        "deploy/distriproc/pageserver.toml must list the defaults: {ps:?}"
    );
    for (file, key) in [
        ("kubernetes/pageserver.yaml", "pageserver.toml"),
        ("kubernetes/pageserver-daemonset.yaml", "pageserver.toml"),
    ] {
        let text = fs::read_to_string(deploy.join(file))?;
        let toml = configmap_toml(&text, key)
            .ok_or_else(|| anyhow!("deploy/{file}: no ConfigMap key {key}"))?;
        let cfg = PageServerConfig::from_toml_str(&toml, &format!("deploy/{file}"))?;
        ensure!(
            text.contains(&format!("mountPath: {}", cfg.store.display())),
            "deploy/{file}: the store {} is not a mounted volume",
            cfg.store.display()
        );
    }
    let daemon: serde_json::Value =
        serde_json::from_slice(&fs::read(deploy.join("docker/daemon.json"))?)?;
    ensure!(
        daemon["runtimes"]["distriproc"]["options"]["ConfigPath"] == DEFAULT_SHIM_CONFIG_PATH,
        "deploy/docker/daemon.json: ConfigPath is not {DEFAULT_SHIM_CONFIG_PATH}"
    );
    for f in [
        "containerd/distriproc-containerd-1.7.toml",
        "containerd/distriproc-containerd-2.x.toml",
    ] {
        let text = fs::read_to_string(deploy.join(f))?;
        ensure!(
            text.contains(&format!("ConfigPath = \"{DEFAULT_SHIM_CONFIG_PATH}\"")),
            "deploy/{f}: ConfigPath is not {DEFAULT_SHIM_CONFIG_PATH}"
        );
    }
    Ok(())
}

/// deploy/check.sh: CRI-enabled containerd 1.7 and 2.1 accept the snippets and resolve the
/// runtime; the Kubernetes manifests parse and pass the schema validator. Runs once, in the
/// containerd 2.1 pass (it starts both versions itself).
#[test]
fn deploy_check_ctd21() -> Result<()> {
    if !require_stack_in(Path::new(CONTAINERD_2_1_DIR)) {
        return Ok(());
    }
    let script = distriproc_harness::repo_root().join("deploy/check.sh");
    let mut cmd = Command::new("bash");
    cmd.arg(&script).stdin(Stdio::null());
    let o = run_with_timeout(cmd, Duration::from_secs(300))?
        .ok_or_else(|| anyhow!("{} timed out", script.display()))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    eprintln!("{text}");
    for line in text.lines().filter(|l| l.starts_with("SKIPPED")) {
        // Surface the check's own skips in this test's output (scripts/test.sh counts them).
        println!("{line}");
    }
    ensure!(
        o.status.success(),
        "{} failed ({})",
        script.display(),
        o.status
    );
    Ok(())
}
