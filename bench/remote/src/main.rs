//! `distriproc-bench-remote`: one lazy restore of a plain CRIU checkpoint with our fetcher
//! serving faults from `distriproc-pageserver` over the network.
//!
//! ```text
//! distriproc-bench-remote --images DIR --work DIR --endpoint HOST:PORT --checkpoint ID
//!                         [--fill full|none] [--stats FILE] [--criu /usr/local/sbin/criu]
//!                         [--set KEY=VALUE]...
//! ```
//! `--endpoint local` serves the pages from the images directory itself (`LocalImages`, no
//! page server): the runtime-level baseline of the local fill. `--set` overrides a `[fetcher]`
//! key (as in shim.toml, e.g. `--set fill_batch_pages=512`) or, prefixed `pageserver.`, a
//! page-server client key (`--set pageserver.max_connections=4`), validated like the shim's file.
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
use distriproc_runtime::source::{LocalImages, PageSource};

struct Args {
    images: PathBuf,
    work: PathBuf,
    endpoint: String,
    checkpoint: String,
    fill: String,
    stats: Option<PathBuf>,
    criu: String,
    set: Vec<String>,
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
        set: Vec::new(),
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
            "--set" => a.set.push(v()?),
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
    let (mut fetcher, mut pageserver) =
        (String::from("[fetcher]\n"), String::from("[pageserver]\n"));
    for kv in &a.set {
        let (k, v) = kv
            .split_once('=')
            .ok_or_else(|| format!("--set {kv:?}: expected KEY=VALUE"))?;
        let (v, k) = (v.trim(), k.trim());
        let (table, k) = match k.strip_prefix("pageserver.") {
            Some(k) => (&mut pageserver, k),
            None => (&mut fetcher, k.strip_prefix("fetcher.").unwrap_or(k)),
        };
        let quoted = v.parse::<f64>().is_err() && v != "true" && v != "false";
        if quoted {
            table.push_str(&format!("{k} = {v:?}\n"));
        } else {
            table.push_str(&format!("{k} = {v}\n"));
        }
    }
    let toml = fetcher + &pageserver;
    let cfg =
        distriproc_config::ShimConfig::from_toml_str(&toml, "--set").map_err(|e| e.to_string())?;
    let mut opts = FetcherOptions::from_config(&cfg.fetcher);
    opts.fill = a
        .fill
        .parse::<FillPolicy>()
        .map_err(|e| format!("--fill: {e}"))?;
    let (source, remote): (Arc<dyn PageSource>, Option<Arc<RemotePages>>) = if a.endpoint == "local"
    {
        let l = LocalImages::open(&a.images).map_err(|e| format!("open images: {e}"))?;
        (Arc::new(l), None)
    } else {
        let endpoint: Endpoint = a.endpoint.parse()?;
        let r = Arc::new(
            RemotePages::connect(endpoint, RemoteOptions::new(&a.checkpoint))
                .map_err(|e| format!("connect to page server {}: {e}", a.endpoint))?,
        );
        (r.clone(), Some(r))
    };
    let connect_us = t0.elapsed().as_micros() as u64;
    std::fs::create_dir_all(&a.work).map_err(|e| format!("create {}: {e}", a.work.display()))?;
    let server = LazyPagesServer::bind(&a.work, &a.images, source, opts)
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
        .args([
            "--lazy-pages",
            "--restore-detached",
            "-o",
            "restore.log",
            "-v4",
        ])
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
    let r = remote.map(|r| r.stats()).unwrap_or_default();
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
        Some(p) => {
            std::fs::write(&p, text + "\n").map_err(|e| format!("write {}: {e}", p.display()))?
        }
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
