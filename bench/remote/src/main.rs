//! `distriproc-bench-remote`: one lazy restore of a plain CRIU checkpoint with our fetcher
//! serving faults from `distriproc-pageserver` over the network.
//!
//! ```text
//! distriproc-bench-remote --images DIR --work DIR --endpoint HOST:PORT --checkpoint ID
//!                         [--fill full|none] [--stats FILE] [--criu /usr/local/sbin/criu]
//! ```
//! Connects to the page server (`RemotePages`), binds `WORK/lazy-pages.socket`
//! (`LazyPagesServer`), runs `criu restore --lazy-pages --restore-detached` on the images
//! directory (process metadata and non-lazy pages come from DIR; every lazy page crosses the
//! network), waits for the fill (policy `full`) or returns at once (`none`, the fetcher keeps
//! serving until the restored tree exits: then this process stays until it does), and writes
//! the fetcher's `FetchStats` plus the remote client's counters as JSON to FILE (default stdout).
//! The restored tree's root pid is in `WORK/restored.pid`.
//!
//! It deliberately does not manage the workload or the page server: bench/remote.sh does.

use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::time::Instant;

use distriproc_config::FillPolicy;
use distriproc_runtime::fetcher::{FetcherOptions, LazyPagesServer};
use distriproc_runtime::remote::{Endpoint, RemoteOptions, RemotePages};

struct Args {
    images: PathBuf,
    work: PathBuf,
    endpoint: String,
    checkpoint: String,
    fill: String,
    stats: Option<PathBuf>,
    criu: String,
}

fn parse() -> Result<Args, String> {
    let mut a = Args {
        images: PathBuf::new(),
        work: PathBuf::new(),
        endpoint: String::new(),
        checkpoint: String::new(),
        fill: "full".into(),
        stats: None,
        criu: "criu".into(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let mut v = || it.next().ok_or_else(|| format!("{k} needs a value"));
        match k.as_str() {
            "--images" => a.images = v()?.into(),
            "--work" => a.work = v()?.into(),
            "--endpoint" => a.endpoint = v()?,
            "--checkpoint" => a.checkpoint = v()?,
            "--fill" => a.fill = v()?,
            "--stats" => a.stats = Some(v()?.into()),
            "--criu" => a.criu = v()?,
            _ => return Err(format!("unknown argument {k:?} (see the file header)")),
        }
    }
    if a.images.as_os_str().is_empty()
        || a.work.as_os_str().is_empty()
        || a.endpoint.is_empty()
        || a.checkpoint.is_empty()
    {
        return Err("--images, --work, --endpoint and --checkpoint are required".into());
    }
    Ok(a)
}

fn run(a: Args) -> Result<(), String> {
    let t0 = Instant::now();
    let endpoint: Endpoint = a.endpoint.parse()?;
    let remote = Arc::new(
        RemotePages::connect(endpoint, RemoteOptions::new(&a.checkpoint))
            .map_err(|e| format!("connect to page server {}: {e}", a.endpoint))?,
    );
    let connect_us = t0.elapsed().as_micros() as u64;
    let opts = FetcherOptions {
        fill: a
            .fill
            .parse::<FillPolicy>()
            .map_err(|e| format!("--fill: {e}"))?,
        ..FetcherOptions::default()
    };
    std::fs::create_dir_all(&a.work).map_err(|e| format!("create {}: {e}", a.work.display()))?;
    let server = LazyPagesServer::bind(&a.work, &a.images, remote.clone(), opts)
        .map_err(|e| format!("bind lazy-pages socket in {}: {e}", a.work.display()))?;
    let handle = server.spawn().map_err(|e| format!("start fetcher: {e}"))?;
    let pidfile = a.work.join("restored.pid");
    let _ = std::fs::remove_file(&pidfile);
    let out = Command::new(&a.criu)
        .arg("restore")
        .arg("-D")
        .arg(&a.images)
        .arg("-W")
        .arg(&a.work)
        .args(["--lazy-pages", "--restore-detached", "-o", "restore.log", "-v4"])
        .arg("--pidfile")
        .arg(&pidfile)
        .output()
        .map_err(|e| format!("run {}: {e}", a.criu))?;
    let restore_us = t0.elapsed().as_micros() as u64;
    if !out.status.success() {
        handle.stop();
        let _ = handle.wait();
        return Err(format!(
            "criu restore failed ({}), see {}",
            out.status,
            a.work.join("restore.log").display()
        ));
    }
    let stats = handle.wait().map_err(|e| format!("fetcher: {e}"))?;
    let r = remote.stats();
    let mut v = serde_json::to_value(&stats).map_err(|e| e.to_string())?;
    if let Some(m) = v.as_object_mut() {
        m.insert("connect_us".into(), connect_us.into());
        m.insert("criu_restore_us".into(), restore_us.into());
        m.insert(
            "remote".into(),
            serde_json::json!({
                "requests": r.requests, "pages": r.pages, "bytes": r.bytes,
                "connects": r.connects, "retries": r.retries,
            }),
        );
    }
    let text = v.to_string();
    match a.stats {
        Some(p) => std::fs::write(&p, text + "\n").map_err(|e| format!("write {}: {e}", p.display()))?,
        None => println!("{text}"),
    }
    Ok(())
}

fn main() {
    let code = match parse().and_then(run) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("distriproc-bench-remote: {e}");
            1
        }
    };
    std::process::exit(code);
}
