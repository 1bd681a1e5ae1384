//! End-to-end remote checkpoints on a private containerd (2.1 and 1.7) with the real runc,
//! CRIU and `distriproc-pageserver` (in-process, on real sockets):
//!
//! (a) the page server runs in its own network namespace, reached over a veth pair this test
//!     creates; a 256 MiB, 2-process memhog is checkpointed as a remote checkpoint whose CRIU tar
//!     holds no page data, then `ctr c restore --live` restores it lazily with its memory fetched
//!     over the veth (VERIFY, SUM == EXPECT, remote bytes in the stats);
//! (c) in the same run: an unknown checkpoint, a store that holds other memory and a wrong token
//!     (before), a silent and a stopped server (after) each give a clear error at ctr within
//!     the configured timeouts; a fill-none restore whose server goes silent dies of SIGBUS
//!     after the client timeouts; the shim keeps serving throughout. The `criu` fetcher mode
//!     restores the same remote checkpoint over the veth too;
//! (b) 16 concurrent `ctr c restore --live` of one remote checkpoint from one page server
//!     (loopback), each container in its own netns, all VERIFY OK;
//! (d) in a grouped shim, a sibling answers State and Exec and has its exit reported within
//!     100 ms while a 1 GiB remote checkpoint of another member runs (one lock per container).
//!
//! They skip with a reason when the stack is missing and fail instead when `CI=true`. Run with
//! `--test-threads=1` (2 cores). Everything (namespace, veth, containerd, its shims and
//! containers) is removed by name or pid at the end, also on failure.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use distriproc_harness::{
    ip, memhog_query, memhog_query_timeout, require_stack_in, wait_for, Containerd, ContainerdOpts,
    NetNs, CONTAINERD_1_7_DIR, CONTAINERD_2_1_DIR, MEMHOG_IMAGE, MEMHOG_PORT,
};
use distriproc_pageserver::{Server, ServerHandle, ServerOptions};

const SHIM: &str = env!("CARGO_BIN_EXE_containerd-shim-distriproc-v2");
/// How long a task may take to reach a wanted status.
const STATUS_TIMEOUT: Duration = Duration::from_secs(30);
const TOKEN: &str = "e2e-remote-token";

fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

fn skip(why: &str) -> Result<()> {
    if in_ci() {
        bail!("CI=true but: {why}");
    }
    eprintln!("SKIPPED: {why}");
    Ok(())
}

fn server(store: &Path, listen: String) -> Result<ServerHandle> {
    let mut o = ServerOptions::for_store(store.to_path_buf());
    o.listen = vec![listen];
    o.token = Some(TOKEN.into());
    Ok(Server::start(o)?)
}

/// Writes the shim configuration: the page server and short timeouts (nothing may hang).
fn write_config(dir: &Path, address: &str, token: &str) -> Result<PathBuf> {
    write_config_with(dir, address, token, "")
}

/// [`write_config`] with more TOML appended (e.g. a `[fetcher]` table).
fn write_config_with(dir: &Path, address: &str, token: &str, extra: &str) -> Result<PathBuf> {
    let tf = dir.join("token");
    std::fs::write(&tf, format!("{token}\n"))?;
    let cfg = dir.join("shim.toml");
    std::fs::write(
        &cfg,
        format!(
            "[pageserver]\naddress = \"{address}\"\ntoken_file = \"{}\"\n\
             connect_timeout_ms = 2000\nio_timeout_ms = 5000\nretry_timeout_ms = 3000\n{extra}",
            tf.display()
        ),
    )?;
    Ok(cfg)
}

struct Setup {
    ctd: Containerd,
    dir: tempfile::TempDir,
}

fn start(containerd_dir: &str, tag: &str) -> Result<Option<Setup>> {
    if !require_stack_in(Path::new(containerd_dir)) {
        return Ok(None);
    }
    if Command::new("ip").arg("-V").output().is_err() {
        skip("needs iproute2 `ip` for network namespaces")?;
        return Ok(None);
    }
    let dir = tempfile::Builder::new()
        .prefix(&format!("dp-e2e-remote-{tag}-"))
        .tempdir()?;
    // A placeholder config; each test writes the page server's address before checkpointing.
    let cfg = write_config(dir.path(), "", TOKEN)?;
    let mut opts = ContainerdOpts::with_containerd_dir(containerd_dir).shim(SHIM);
    opts.env
        .push(("DISTRIPROC_CONFIG".into(), cfg.display().to_string()));
    let ctd = Containerd::start(opts)?;
    ctd.import_test_images()?;
    Ok(Some(Setup { ctd, dir }))
}

/// Kills and removes a task and its container, ignoring what is already gone.
fn remove(ctd: &Containerd, id: &str) {
    let _ = ctd.ctr(&["tasks", "kill", "-s", "SIGKILL", id]);
    wait_for(
        || matches!(ctd.status(id).as_str(), "STOPPED" | "ABSENT" | "CREATED"),
        Duration::from_secs(10),
    );
    let _ = ctd.ctr(&["tasks", "rm", "-f", id]);
    let _ = ctd.ctr(&["containers", "rm", id]);
}

fn run_memhog(ctd: &Containerd, id: &str, mib: u64) -> Result<u32> {
    ctd.run_detached(
        &[],
        MEMHOG_IMAGE,
        id,
        &[
            "/memhog",
            "serve",
            "--mib",
            &mib.to_string(),
            "--procs",
            "2",
        ],
        STATUS_TIMEOUT,
    )?;
    let pid = ctd.task_pid(id)?;
    ensure!(memhog_query(pid, MEMHOG_PORT, "PING")? == "PONG");
    Ok(pid)
}

/// (name, size) of every member of a tar file.
fn tar_members(tar: &Path) -> Result<Vec<(String, u64)>> {
    let out = Command::new("tar").arg("tvf").arg(tar).output()?;
    ensure!(out.status.success(), "tar tvf {}", tar.display());
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            Some((f.get(5)?.to_string(), f.get(2)?.parse().ok()?))
        })
        .collect())
}

/// Checkpoints `id` as `image` and checks that the CRIU tar holds no page data; returns the
/// reference file's checkpoint id.
fn remote_checkpoint(ctd: &Containerd, id: &str, image: &str, mib: u64) -> Result<String> {
    let t0 = Instant::now();
    ctd.ctr_ok(&["containers", "checkpoint", "--task", id, image])?;
    let took = t0.elapsed();
    let blob = ctd.criu_blob(image)?;
    let size = std::fs::metadata(&blob)?.len();
    let members = tar_members(&blob)?;
    let pages: u64 = members
        .iter()
        .filter(|(n, _)| n.trim_start_matches("./").starts_with("pages-"))
        .map(|(_, s)| s)
        .sum();
    ensure!(
        members
            .iter()
            .any(|(n, _)| n.ends_with("distriproc-remote.json")),
        "no reference file in the CRIU tar: {members:?}"
    );
    // Only the pages CRIU restores eagerly stay (stack tops, file-backed pages): far below 1%.
    ensure!(
        pages < (mib << 20) / 100 && size < (mib << 20) / 20,
        "CRIU tar of a {mib} MiB container is {size} bytes with {pages} bytes of pages-*.img"
    );
    // A fresh container's pages went to the page server while CRIU wrote them.
    let streamed = streamed_bytes(ctd, id)?;
    ensure!(
        streamed > 0,
        "checkpoint of {id}: nothing was sent during the dump: {}",
        ctd.log_tail(20)
    );
    eprintln!(
        "remote checkpoint of {mib} MiB in {took:?}: CRIU tar {size} bytes, pages-*.img {pages} \
         bytes, {streamed} bytes sent during the dump"
    );
    let mut tmp = tempfile::tempdir()?;
    let out = Command::new("tar")
        .arg("xf")
        .arg(&blob)
        .arg("-C")
        .arg(tmp.path())
        .arg("./distriproc-remote.json")
        .output()?;
    if !out.status.success() {
        tmp = tempfile::tempdir()?;
        let out = Command::new("tar")
            .arg("xf")
            .arg(&blob)
            .arg("-C")
            .arg(tmp.path())
            .arg("distriproc-remote.json")
            .output()?;
        ensure!(out.status.success(), "extract the reference file");
    }
    let r: serde_json::Value =
        serde_json::from_slice(&std::fs::read(tmp.path().join("distriproc-remote.json"))?)?;
    Ok(r["checkpoint"]
        .as_str()
        .context("checkpoint id")?
        .to_string())
}

/// The bytes the shim's last checkpoint of `id` sent while CRIU was writing them (its log).
fn streamed_bytes(ctd: &Containerd, id: &str) -> Result<u64> {
    let log = ctd.log_text();
    let want = format!("checkpoint of {id}: ");
    let line = log
        .lines()
        .rev()
        .find(|l| l.contains(&want) && l.contains("bytes of pages were sent while CRIU wrote them"))
        .with_context(|| format!("no streamed upload logged for {id}: {}", ctd.log_tail(20)))?;
    let rest = &line[line.find(&want).unwrap_or(0) + want.len()..];
    Ok(rest
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0))
}

/// `ctr c restore --live` that must fail with a message containing `want`, within `limit`.
fn restore_fails(
    ctd: &Containerd,
    name: &str,
    image: &str,
    want: &str,
    limit: Duration,
) -> Result<()> {
    let t0 = Instant::now();
    let out = ctd.ctr(&["containers", "restore", "--live", name, image])?;
    let took = t0.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    remove(ctd, name);
    ensure!(
        !out.status.success(),
        "restore {name} succeeded, expected {want:?}"
    );
    ensure!(
        stderr.contains(want),
        "restore {name}: ctr said {stderr:?}, expected it to contain {want:?}"
    );
    ensure!(
        took < limit,
        "restore {name} took {took:?} to fail (limit {limit:?})"
    );
    eprintln!(
        "restore {name} failed in {took:?} as expected: {}",
        stderr.trim()
    );
    Ok(())
}

fn over_veth(containerd_dir: &str, n: u8) -> Result<()> {
    let Some(Setup { ctd, dir }) = start(containerd_dir, &format!("veth{n}"))? else {
        return Ok(());
    };
    let ns = NetNs::create("dr", 232, n)?;
    let store = dir.path().join("store");
    std::fs::create_dir_all(&store)?;
    let listen = format!("{}:0", ns.ns_addr);
    let st = store.clone();
    let h = ns.run(move || server(&st, listen))?;
    let addr = h.addrs()[0].clone();
    let port: u16 = addr.rsplit_once(':').context("port")?.1.parse()?;
    ensure!(
        std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
        "page server visible on the host's loopback"
    );
    write_config(dir.path(), &addr, TOKEN)?;

    const MIB: u64 = 256;
    let pid = run_memhog(&ctd, "r1", MIB)?;
    let expect = memhog_query(pid, MEMHOG_PORT, "EXPECT")?;
    let ckid = remote_checkpoint(&ctd, "r1", "localhost/r1-cp:1", MIB)?;
    ensure!(
        store.join(&ckid).join("inventory.img").exists(),
        "{ckid} not in the store"
    );
    remove(&ctd, "r1");

    // (c) errors, each clear and bounded; the shim stays up between them.
    let img = "localhost/r1-cp:1";
    let lim = Duration::from_secs(30);
    let ck = store.join(&ckid);
    let away = store.join(format!("{ckid}.away"));
    std::fs::rename(&ck, &away)?;
    restore_fails(&ctd, "r1-unknown", img, "unknown checkpoint", lim)?;
    std::fs::create_dir(&ck)?;
    for e in std::fs::read_dir(&away)? {
        let e = e?;
        std::fs::copy(e.path(), ck.join(e.file_name()))?;
    }
    // A store that holds other memory under the id: one more page in its pages file (the index
    // stays valid, the digest does not match the reference).
    let pages = std::fs::read_dir(&ck)?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("pages-"))
        })
        .context("no pages file in the store")?;
    let len = std::fs::metadata(&pages)?.len();
    let f = std::fs::OpenOptions::new().write(true).open(&pages)?;
    f.set_len(len + 4096)?;
    restore_fails(
        &ctd,
        "r1-mismatch",
        img,
        "not the memory of this checkpoint",
        lim,
    )?;
    f.set_len(len)?;
    drop(f);
    std::fs::remove_dir_all(&away)?;
    write_config(dir.path(), &addr, "wrong-token")?;
    restore_fails(&ctd, "r1-token", img, "unauthorized", lim)?;
    write_config(dir.path(), &addr, TOKEN)?;

    // (a) the lazy restore over the veth.
    let t0 = Instant::now();
    ctd.ctr_ok(&["containers", "restore", "--live", "r1r", img])?;
    let pid = ctd.task_pid("r1r")?;
    let pong = memhog_query_timeout(pid, MEMHOG_PORT, "PING", Duration::from_secs(30))?;
    let ttfr = t0.elapsed();
    ensure!(pong == "PONG", "{pong}");
    let verify = memhog_query_timeout(pid, MEMHOG_PORT, "VERIFY", Duration::from_secs(60))?;
    ensure!(
        verify.starts_with("OK"),
        "VERIFY after remote restore: {verify}"
    );
    let sum = memhog_query(pid, MEMHOG_PORT, "SUM")?;
    ensure!(sum == expect, "SUM {sum} != EXPECT {expect}");
    let done = wait_for(
        || {
            ctd.lazy_stats("r1r")
                .map(|v| v["fill_complete_us"].as_u64().is_some())
                .unwrap_or(false)
        },
        Duration::from_secs(60),
    );
    let stats = ctd.lazy_stats("r1r")?;
    ensure!(done, "fill did not complete: {stats}");
    let remote_bytes = stats["remote"]["bytes"].as_u64().unwrap_or(0);
    ensure!(
        remote_bytes > (MIB << 20) / 2,
        "remote bytes {remote_bytes} for a {MIB} MiB container: {stats}"
    );
    ensure!(
        stats["remote"]["endpoint"]
            .as_str()
            .is_some_and(|e| e.contains(&ns.ns_addr)),
        "{stats}"
    );
    eprintln!(
        "FIGURES {containerd_dir}: restore over veth {addr}: TTFR {ttfr:?}, remote bytes {remote_bytes}, \
         faults {}, fault p50 {} us p99 {} us, fill complete {} ms",
        stats["faults"],
        stats["fault_latency_us"]["p50"],
        stats["fault_latency_us"]["p99"],
        stats["fill_complete_us"].as_u64().unwrap_or(0) / 1000
    );

    // Fetcher mode criu on the remote checkpoint: the shim authenticates a HELLO_CRIU session
    // and hands it to `criu lazy-pages --page-server --ps-socket FD`.
    write_config_with(dir.path(), &addr, TOKEN, "[fetcher]\nmode = \"criu\"\n")?;
    let t0 = Instant::now();
    ctd.ctr_ok(&["containers", "restore", "--live", "r1c", img])?;
    let cpid = ctd.task_pid("r1c")?;
    let v = memhog_query_timeout(cpid, MEMHOG_PORT, "VERIFY", Duration::from_secs(60))?;
    ensure!(
        v.starts_with("OK"),
        "VERIFY after criu-mode remote restore: {v}"
    );
    let cstats = ctd.lazy_stats("r1c")?;
    ensure!(cstats["mode"] == "criu", "{cstats}");
    eprintln!(
        "criu lazy-pages over the veth: VERIFY OK after {:?}",
        t0.elapsed()
    );
    remove(&ctd, "r1c");
    write_config(dir.path(), &addr, TOKEN)?;

    // (c) the server host stops answering (its address is gone, nothing replies): a restore
    // fails within the connect timeout; then the server goes away entirely (refused). r1r,
    // whose memory has all arrived, keeps running and the shim answers.
    // A restore with fill `none` keeps most of its memory remote; when the server host then
    // stops answering, the next untouched page fails after the client's timeouts: the fetcher
    // poisons what it never installed, the container dies of SIGBUS (no zero pages), the exit
    // reaches containerd and the shim stays up.
    write_config_with(dir.path(), &addr, TOKEN, "[fetcher]\nfill = \"none\"\n")?;
    ctd.ctr_ok(&["containers", "restore", "--live", "r1n", img])?;
    let npid = ctd.task_pid("r1n")?;
    ensure!(memhog_query(npid, MEMHOG_PORT, "PING")? == "PONG");
    write_config(dir.path(), &addr, TOKEN)?;
    ip(&[
        "netns", "exec", &ns.name, "ip", "addr", "flush", "dev", &ns.ns_if,
    ])?;
    let t0 = Instant::now();
    let touch = memhog_query_timeout(npid, MEMHOG_PORT, "TOUCH 100", Duration::from_secs(5));
    let died = wait_for(|| ctd.status("r1n") == "STOPPED", Duration::from_secs(60));
    ensure!(
        died,
        "r1n still {} {:?} after its page server went silent (TOUCH: {touch:?})",
        ctd.status("r1n"),
        t0.elapsed()
    );
    eprintln!(
        "page server silent during a fill-none restore: task stopped after {:?} (TOUCH: {:?})",
        t0.elapsed(),
        touch.map_err(|e| e.to_string())
    );
    ensure!(
        wait_for(
            || ctd
                .log_text()
                .contains("lazy restore of r1n ended with an error"),
            Duration::from_secs(10)
        ),
        "no fetcher error logged for r1n"
    );
    remove(&ctd, "r1n");
    restore_fails(&ctd, "r1-silent", img, "cannot connect to page server", lim)?;
    drop(h);
    drop(ns);
    restore_fails(&ctd, "r1-gone", img, "cannot connect to page server", lim)?;
    ensure!(memhog_query(pid, MEMHOG_PORT, "PING")? == "PONG");
    ensure!(
        ctd.status("r1r") == "RUNNING",
        "r1r is {}",
        ctd.status("r1r")
    );
    remove(&ctd, "r1r");
    Ok(())
}

fn concurrent(containerd_dir: &str) -> Result<()> {
    concurrent_n(containerd_dir, 16, 32)
}

/// `n` concurrent lazy restores of one `mib` MiB remote checkpoint through one page server.
fn concurrent_n(containerd_dir: &str, n: usize, mib: u64) -> Result<()> {
    let Some(Setup { ctd, dir }) = start(containerd_dir, "conc")? else {
        return Ok(());
    };
    let store = dir.path().join("store");
    std::fs::create_dir_all(&store)?;
    let h = server(&store, "127.0.0.1:0".into())?;
    write_config(dir.path(), &h.addrs()[0], TOKEN)?;
    let pid = run_memhog(&ctd, "c1", mib)?;
    let expect = memhog_query(pid, MEMHOG_PORT, "EXPECT")?;
    remote_checkpoint(&ctd, "c1", "localhost/c1-cp:1", mib)?;
    remove(&ctd, "c1");
    let t0 = Instant::now();
    let results: Vec<Result<()>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..n)
            .map(|i| {
                let ctd = &ctd;
                let expect = &expect;
                s.spawn(move || -> Result<()> {
                    let name = format!("c1r{i}");
                    ctd.ctr_ok(&[
                        "containers",
                        "restore",
                        "--live",
                        &name,
                        "localhost/c1-cp:1",
                    ])?;
                    // Each container has its own netns: the same port everywhere.
                    let pid = ctd.task_pid(&name)?;
                    let v =
                        memhog_query_timeout(pid, MEMHOG_PORT, "VERIFY", Duration::from_secs(120))?;
                    ensure!(v.starts_with("OK"), "{name}: VERIFY {v}");
                    let sum = memhog_query(pid, MEMHOG_PORT, "SUM")?;
                    ensure!(&sum == expect, "{name}: SUM {sum} != EXPECT {expect}");
                    Ok(())
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| bail!("restore thread panicked"))
            })
            .collect()
    });
    let took = t0.elapsed();
    let mut remote_bytes = 0;
    for i in 0..n {
        if let Ok(v) = ctd.lazy_stats(&format!("c1r{i}")) {
            remote_bytes += v["remote"]["bytes"].as_u64().unwrap_or(0);
        }
    }
    for i in 0..n {
        remove(&ctd, &format!("c1r{i}"));
    }
    let failed: Vec<String> = results
        .iter()
        .enumerate()
        .filter_map(|(i, r)| r.as_ref().err().map(|e| format!("c1r{i}: {e:#}")))
        .collect();
    ensure!(
        failed.is_empty(),
        "{} of {n} failed:\n{}",
        failed.len(),
        failed.join("\n")
    );
    eprintln!(
        "FIGURES {containerd_dir}: {n} concurrent remote restores of {mib} MiB verified in {took:?}, \
         {remote_bytes} bytes from one page server; {}",
        h.metrics_text()
            .lines()
            .find(|l| l.starts_with("distriproc_pageserver_bytes_total"))
            .unwrap_or("")
    );
    Ok(())
}

#[test]
fn remote_over_veth_ctd21() -> Result<()> {
    over_veth(CONTAINERD_2_1_DIR, 21)
}

#[test]
fn remote_over_veth_ctd17() -> Result<()> {
    over_veth(CONTAINERD_1_7_DIR, 17)
}

/// Issue 6 item 4: 32 concurrent restores (16 MiB each) through one page server.
#[test]
fn remote_concurrent32_ctd21() -> Result<()> {
    concurrent_n(CONTAINERD_2_1_DIR, 32, 16)
}

#[test]
fn remote_concurrent_ctd21() -> Result<()> {
    concurrent(CONTAINERD_2_1_DIR)
}

#[test]
fn remote_concurrent_ctd17() -> Result<()> {
    concurrent(CONTAINERD_1_7_DIR)
}

/// Shim configuration with a long reconnect deadline (`retry_timeout_ms`) and more TOML.
fn write_config_retry(dir: &Path, address: &str, retry_ms: u64, extra: &str) -> Result<()> {
    let tf = dir.join("token");
    std::fs::write(&tf, format!("{TOKEN}\n"))?;
    std::fs::write(
        dir.join("shim.toml"),
        format!(
            "[pageserver]\naddress = \"{address}\"\ntoken_file = \"{}\"\n\
             connect_timeout_ms = 2000\nio_timeout_ms = 5000\nretry_timeout_ms = {retry_ms}\n{extra}",
            tf.display()
        ),
    )?;
    Ok(())
}

/// A TCP proxy that delays every chunk from the server to the client by `delay`; stops with
/// the test process (threads only, loopback).
fn delay_proxy(target: String, delay: Duration) -> Result<String> {
    use std::io::{Read, Write};
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = l.local_addr()?.to_string();
    std::thread::spawn(move || {
        for c in l.incoming().flatten() {
            let Ok(s) = std::net::TcpStream::connect(&target) else {
                continue;
            };
            let (Ok(mut c2), Ok(mut s2)) = (c.try_clone(), s.try_clone()) else {
                continue;
            };
            let (mut c, mut s) = (c, s);
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut c2, &mut s2);
                let _ = s2.shutdown(std::net::Shutdown::Write);
            });
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 1 << 16];
                while let Ok(n) = s.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    std::thread::sleep(delay);
                    if c.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
                let _ = c.shutdown(std::net::Shutdown::Write);
            });
        }
    });
    Ok(addr)
}

/// Issue 6 item 1 (a), (b) and (c): the page server is stopped during a fill-none restore and
/// started again on the same address: the fetcher reconnects (within `retry_timeout_ms`) and
/// the container's memory is correct (VERIFY reads every page). Then a restore through a
/// proxy adding 20 ms to every server reply: faults complete, nothing times out. Then the
/// server gone past the deadline: exit status 135 at containerd, the other container lives.
fn server_restart_and_slow(containerd_dir: &str) -> Result<()> {
    let Some(Setup { ctd, dir }) = start(containerd_dir, "restart")? else {
        return Ok(());
    };
    let store = dir.path().join("store");
    std::fs::create_dir_all(&store)?;
    let h = server(&store, "127.0.0.1:0".into())?;
    let addr = h.addrs()[0].clone();
    write_config_retry(dir.path(), &addr, 60_000, "")?;
    const MIB: u64 = 32;
    let pid = run_memhog(&ctd, "s1", MIB)?;
    let expect = memhog_query(pid, MEMHOG_PORT, "EXPECT")?;
    let img = "localhost/s1-cp:1";
    remote_checkpoint(&ctd, "s1", img, MIB)?;
    remove(&ctd, "s1");

    write_config_retry(dir.path(), &addr, 60_000, "[fetcher]\nfill = \"none\"\n")?;
    ctd.ctr_ok(&["containers", "restore", "--live", "s1r", img])?;
    let rpid = ctd.task_pid("s1r")?;
    ensure!(memhog_query(rpid, MEMHOG_PORT, "PING")? == "PONG");
    drop(h);
    let t0 = Instant::now();
    let verify = std::thread::spawn(move || {
        memhog_query_timeout(rpid, MEMHOG_PORT, "VERIFY", Duration::from_secs(120))
    });
    std::thread::sleep(Duration::from_secs(3));
    let h = server(&store, addr.clone())?;
    let v = verify
        .join()
        .map_err(|_| anyhow::anyhow!("VERIFY thread panicked"))??;
    ensure!(v.starts_with("OK"), "VERIFY after the server restart: {v}");
    let sum = memhog_query(rpid, MEMHOG_PORT, "SUM")?;
    ensure!(sum == expect, "SUM {sum} != EXPECT {expect}");
    let stats = ctd.lazy_stats("s1r")?;
    eprintln!(
        "page server restarted on {addr} after 3 s: VERIFY OK {:?} after the stop; remote {}",
        t0.elapsed(),
        stats["remote"]
    );
    remove(&ctd, "s1r");

    let slow = delay_proxy(addr.clone(), Duration::from_millis(20))?;
    write_config_retry(dir.path(), &slow, 60_000, "")?;
    let t0 = Instant::now();
    ctd.ctr_ok(&["containers", "restore", "--live", "s1slow", img])?;
    let spid = ctd.task_pid("s1slow")?;
    let v = memhog_query_timeout(spid, MEMHOG_PORT, "VERIFY", Duration::from_secs(120))?;
    ensure!(v.starts_with("OK"), "VERIFY through the slow proxy: {v}");
    ensure!(memhog_query(spid, MEMHOG_PORT, "SUM")? == expect);
    ensure!(
        !ctd.log_text()
            .contains("lazy restore of s1slow ended with an error"),
        "fetcher error through the slow proxy:\n{}",
        ctd.log_tail(30)
    );
    eprintln!(
        "through a 20 ms/reply proxy: VERIFY OK after {:?}; stats {}",
        t0.elapsed(),
        ctd.lazy_stats("s1slow")?
    );

    // (b) The server gone longer than `retry_timeout_ms` (3 s): the fill-none container dies
    // of SIGBUS on poisoned pages, containerd gets exit status 135 (128 + SIGBUS), the shim
    // logs why; s1slow (another shim) keeps answering.
    write_config_retry(dir.path(), &addr, 3000, "[fetcher]\nfill = \"none\"\n")?;
    let events_out = dir.path().join("events.txt");
    let mut events = Command::new(ctd.containerd_dir().join("ctr"))
        .arg("-a")
        .arg(ctd.socket())
        .arg("-n")
        .arg(ctd.namespace())
        .arg("events")
        .stdin(std::process::Stdio::null())
        .stdout(std::fs::File::create(&events_out)?)
        .stderr(std::process::Stdio::null())
        .spawn()?;
    ctd.ctr_ok(&["containers", "restore", "--live", "s1dl", img])?;
    let dpid = ctd.task_pid("s1dl")?;
    ensure!(memhog_query(dpid, MEMHOG_PORT, "PING")? == "PONG");
    drop(h);
    let t0 = Instant::now();
    let touch = memhog_query_timeout(dpid, MEMHOG_PORT, "TOUCH 100", Duration::from_secs(5));
    ensure!(
        wait_for(|| ctd.status("s1dl") == "STOPPED", Duration::from_secs(60)),
        "s1dl still {} after its page server went away (TOUCH {touch:?})",
        ctd.status("s1dl")
    );
    let exit_status = || -> Option<u64> {
        let text = std::fs::read_to_string(&events_out).unwrap_or_default();
        text.lines()
            .filter(|l| l.contains("/tasks/exit") && l.contains("s1dl"))
            .find_map(|l| {
                let tail = &l[l.find("exit_status")?..];
                let d: String = tail
                    .chars()
                    .skip_while(|c| !c.is_ascii_digit())
                    .take_while(char::is_ascii_digit)
                    .collect();
                d.parse().ok()
            })
    };
    wait_for(|| exit_status().is_some(), Duration::from_secs(20));
    let _ = events.kill();
    let _ = events.wait();
    let code = exit_status();
    eprintln!(
        "page server gone past retry_timeout_ms: s1dl stopped after {:?}, TaskExit exit_status {code:?}",
        t0.elapsed(),
    );
    ensure!(
        code == Some(135),
        "s1dl TaskExit exit_status {code:?}, expected 135 (SIGBUS); events:\n{}",
        std::fs::read_to_string(&events_out).unwrap_or_default()
    );
    let _ = ctd.ctr(&["tasks", "rm", "s1dl"]);
    ensure!(
        wait_for(
            || ctd
                .log_text()
                .contains("lazy restore of s1dl ended with an error"),
            Duration::from_secs(10)
        ),
        "no fetcher error logged for s1dl"
    );
    ensure!(memhog_query(spid, MEMHOG_PORT, "PING")? == "PONG");
    let _ = ctd.ctr(&["containers", "rm", "s1dl"]);
    remove(&ctd, "s1slow");
    Ok(())
}

#[test]
fn remote_server_restart_and_slow_ctd21() -> Result<()> {
    server_restart_and_slow(CONTAINERD_2_1_DIR)
}

/// Pids of processes whose command line contains every one of `words`.
fn processes_with(words: &[&str]) -> Vec<u32> {
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    rd.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| {
                    let c = String::from_utf8_lossy(&c).replace('\0', " ");
                    words.iter().all(|w| c.contains(w))
                })
                .unwrap_or(false)
        })
        .collect()
}

/// The socket of the shim serving `id` (its bundle's `address` file).
fn shim_socket(ctd: &Containerd, id: &str) -> Result<String> {
    let f = ctd.bundle_dir(id).join("address");
    Ok(std::fs::read_to_string(&f)
        .with_context(|| format!("read {}", f.display()))?
        .trim()
        .to_string())
}

/// One lock per container: in a grouped shim, while a 1 GiB remote checkpoint of one member
/// is dumping and uploading, a sibling answers State and Exec, runs an exec process and has
/// its exit reported, each within 100 ms (the exec's `runc exec` within 2 s), all before that
/// checkpoint ends. Asked of the shim directly over its ttrpc socket, so that `ctr`'s own
/// start-up is not what is measured.
fn sibling_during_checkpoint(containerd_dir: &str) -> Result<()> {
    use containerd_shim_protos::api::{
        DeleteRequest, ExecProcessRequest, KillRequest, StartRequest, StateRequest, WaitRequest,
    };
    use containerd_shim_protos::protobuf::{well_known_types::any::Any, MessageField};
    use containerd_shim_protos::{Client, TaskClient};
    let Some(Setup { ctd, dir }) = start(containerd_dir, "group")? else {
        return Ok(());
    };
    let store = dir.path().join("store");
    std::fs::create_dir_all(&store)?;
    let h = server(&store, "127.0.0.1:0".into())?;
    write_config(dir.path(), &h.addrs()[0], TOKEN)?;
    let group = "io.distriproc.group=e2e-lock";
    ctd.run_detached(
        &[group],
        MEMHOG_IMAGE,
        "sib",
        &["/memhog", "serve", "--mib", "8"],
        STATUS_TIMEOUT,
    )?;
    ctd.run_detached(
        &[group],
        MEMHOG_IMAGE,
        "big",
        &["/memhog", "serve", "--mib", "1024"],
        STATUS_TIMEOUT,
    )?;
    let big = ctd.task_pid("big")?;
    ensure!(memhog_query(big, MEMHOG_PORT, "PING")? == "PONG");
    let socket = shim_socket(&ctd, "sib")?;
    ensure!(
        socket == shim_socket(&ctd, "big")?,
        "sib and big are not served by one shim"
    );
    let client = TaskClient::new(Client::connect(&socket)?);
    let ctx = || ttrpc_ctx(Duration::from_secs(10));
    let limit = Duration::from_millis(100);
    let image = "localhost/big-cp:1";
    std::thread::scope(|scope| -> Result<()> {
        let checkpoint = scope.spawn(|| {
            ctd.ctr_timeout(
                &["containers", "checkpoint", "--task", "big", image],
                Duration::from_secs(300),
            )
        });
        ensure!(
            wait_for(
                || !processes_with(&["runc", "checkpoint", "big"]).is_empty(),
                Duration::from_secs(30)
            ),
            "runc checkpoint of big never started"
        );
        std::thread::sleep(Duration::from_millis(200));
        let t0 = Instant::now();
        let state = client.state(
            ctx(),
            &StateRequest {
                id: "sib".into(),
                ..Default::default()
            },
        )?;
        let state_took = t0.elapsed();
        ensure!(state.pid > 0, "State of sib: {state:?}");
        let spec = Any {
            type_url: "types.containerd.io/opencontainers/runtime-spec/1/Process".into(),
            value: br#"{"args":["/memhog","--no-such-option"],"cwd":"/","user":{"uid":0,"gid":0},"env":["PATH=/"]}"#.to_vec(),
            ..Default::default()
        };
        let t0 = Instant::now();
        client.exec(
            ctx(),
            &ExecProcessRequest {
                id: "sib".into(),
                exec_id: "probe".into(),
                spec: MessageField::some(spec),
                ..Default::default()
            },
        )?;
        let exec_took = t0.elapsed();
        let t0 = Instant::now();
        client.start(
            ctx(),
            &StartRequest {
                id: "sib".into(),
                exec_id: "probe".into(),
                ..Default::default()
            },
        )?;
        let start_took = t0.elapsed();
        client.wait(
            ctx(),
            &WaitRequest {
                id: "sib".into(),
                exec_id: "probe".into(),
                ..Default::default()
            },
        )?;
        client.delete(
            ctx(),
            &DeleteRequest {
                id: "sib".into(),
                exec_id: "probe".into(),
                ..Default::default()
            },
        )?;
        let t0 = Instant::now();
        client.kill(
            ctx(),
            &KillRequest {
                id: "sib".into(),
                signal: 9,
                ..Default::default()
            },
        )?;
        let w = client.wait(
            ctx(),
            &WaitRequest {
                id: "sib".into(),
                ..Default::default()
            },
        )?;
        let exit_took = t0.elapsed();
        let still_checkpointing = !checkpoint.is_finished();
        eprintln!(
            "during big's checkpoint: State {state_took:?}, Exec {exec_took:?}, exec Start \
             {start_took:?}, kill to exit reported {exit_took:?} (status {}); checkpoint still \
             running: {still_checkpointing}",
            w.exit_status
        );
        ensure!(w.exit_status == 137, "sib's exit status {}", w.exit_status);
        ensure!(state_took < limit, "State of sib took {state_took:?}");
        ensure!(exec_took < limit, "Exec in sib took {exec_took:?}");
        ensure!(
            start_took < Duration::from_secs(2),
            "Start of sib's exec took {start_took:?}"
        );
        ensure!(
            exit_took < limit,
            "sib's exit was reported after {exit_took:?}"
        );
        ensure!(
            still_checkpointing,
            "big's checkpoint ended before the probes did: they prove nothing"
        );
        let out = checkpoint
            .join()
            .map_err(|_| anyhow::anyhow!("checkpoint thread panicked"))??;
        ensure!(
            out.status.success(),
            "checkpoint of big: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    })?;
    remove(&ctd, "sib");
    remove(&ctd, "big");
    Ok(())
}

fn ttrpc_ctx(timeout: Duration) -> containerd_shim_protos::ttrpc::context::Context {
    containerd_shim_protos::ttrpc::context::with_timeout(
        i64::try_from(timeout.as_nanos()).unwrap_or(i64::MAX),
    )
}

#[test]
fn remote_sibling_during_checkpoint_ctd21() -> Result<()> {
    sibling_during_checkpoint(CONTAINERD_2_1_DIR)
}

#[test]
fn remote_sibling_during_checkpoint_ctd17() -> Result<()> {
    sibling_during_checkpoint(CONTAINERD_1_7_DIR)
}
