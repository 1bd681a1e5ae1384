//! `distriproc-pageserver`: the page server daemon beside the checkpoint store (see the
//! library's documentation), and its `stats` subcommand.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use distriproc_config::pageserver::{CriuHeader, PageServerConfig, DEFAULT_PAGESERVER_CONFIG_PATH};
use distriproc_pageserver::checkpoint::Store;
use distriproc_pageserver::gc::GcOptions;
use distriproc_pageserver::layers::{LayerMap, Tombstones};
use distriproc_pageserver::{Server, ServerOptions};
use nix::sys::signal::{SigSet, Signal};

/// Serves the memory of CRIU checkpoints to lazy restores, over DistriProc's native protocol
/// and CRIU's own page-server protocol.
///
/// Each subdirectory of the store is a checkpoint (a CRIU images directory; `parent` chains of
/// pre-dumps are followed). Checkpoints are indexed on first use; pages are read with pread.
/// Any number of clients are served at once, each connection on its own thread.
///
/// Native clients (the shim's fetcher) name the checkpoint and present the shared token in
/// their hello. Unmodified `criu lazy-pages --page-server --address A --port P` is served the
/// checkpoint named by --criu-default; `criu dump --page-server --address A --port P` pushes
/// into a new checkpoint named <prefix><time>-<n> (logged). The CRIU header layout (4.1: 24
/// bytes, 4.2: 32 bytes) is detected per connection.
///
/// Every flag overrides the same key of the configuration file (--config, default
/// /etc/distriproc/pageserver.toml when it exists); `max_cached_checkpoints` is set in the file
/// only. SIGTERM or SIGINT stops the server. Logs go to stderr (RUST_LOG, default info); the
/// listening addresses are printed on stdout.
///
/// Retention: `delete` marks checkpoints deleted, `gc` (and the server every gc_interval_s)
/// removes what no remaining checkpoint needs and squashes deleted layers into the one layer
/// over them; `expire_superseded_after_s` deletes checkpoints a newer layer replaced.
///
/// Exit status: 0 after SIGTERM/SIGINT (or a printed `stats`, `delete`, `gc`), 1 on a configuration or
/// start-up error (the message names the key and the file), 2 on a command-line usage error.
/// Reference: docs/REFERENCE.md, man 8 distriproc-pageserver.
#[derive(Parser, Debug)]
#[command(
    name = "distriproc-pageserver",
    version,
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Cmd>,
    #[command(flatten)]
    serve: ServeArgs,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Prints hot/cold statistics from the access logs of the store: sessions, pages read per
    /// task, hot pages (read by at least half of the sessions), cold pages (never read), the
    /// hottest runs and the first session's read order.
    Stats {
        /// The checkpoint store (required).
        #[arg(long, value_name = "DIR")]
        store: PathBuf,
        /// One checkpoint (default: every checkpoint with an access log).
        id: Option<String>,
    },
    /// Deletes checkpoints: they are no longer served or accepted as parents. A deleted
    /// checkpoint's pages stay on disk while layers over it read them; `gc` frees the rest.
    Delete {
        /// The checkpoint store (required).
        #[arg(long, value_name = "DIR")]
        store: PathBuf,
        /// The checkpoints (each must exist).
        #[arg(required = true)]
        ids: Vec<String>,
    },
    /// Runs retention once: removes deleted checkpoints no layer needs and squashes the ones
    /// a single layer still reads into it (what the server does every gc_interval_s).
    Gc {
        /// The checkpoint store (required).
        #[arg(long, value_name = "DIR")]
        store: PathBuf,
        /// First delete checkpoints superseded by a layer older than this many seconds
        /// [default: the configuration's expire_superseded_after_s, 0 = never].
        #[arg(long, value_name = "SECS")]
        expire_superseded_after_s: Option<u64>,
        /// Configuration file for expire_superseded_after_s [default
        /// /etc/distriproc/pageserver.toml if it exists].
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// Only report what would be expired and removed (default: act).
        #[arg(long)]
        dry_run: bool,
    },
}

#[derive(Args, Debug)]
struct ServeArgs {
    /// Configuration file (TOML; unknown keys are errors) [default
    /// /etc/distriproc/pageserver.toml if it exists, else built-in defaults].
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// The checkpoint store: each subdirectory is a checkpoint [config: store; default
    /// /var/lib/distriproc/checkpoints].
    #[arg(long, value_name = "DIR")]
    store: Option<PathBuf>,
    /// Listen on HOST:PORT or unix:PATH; repeat for several [config: listen; default
    /// 0.0.0.0:7060].
    #[arg(long, value_name = "ADDR")]
    listen: Vec<String>,
    /// Checkpoint served to plain CRIU lazy-pages clients [config: criu_default; default
    /// none: CRIU lazy-pages sessions are refused].
    #[arg(long, value_name = "ID")]
    criu_default: Option<String>,
    /// CRIU header layout: auto (detect per connection), 4.1 or 4.2 [config: criu_header;
    /// default auto].
    #[arg(long, value_name = "LAYOUT")]
    criu_header: Option<CriuHeader>,
    /// Refuse `criu dump --page-server` pushes [config: criu_push = false; default: pushes
    /// accepted].
    #[arg(long)]
    no_criu_push: bool,
    /// Name prefix of pushed checkpoints [config: criu_push_prefix; default "push-"].
    #[arg(long, value_name = "PREFIX")]
    criu_push_prefix: Option<String>,
    /// Serve plain CRIU clients (which cannot present a token) even with --token-file
    /// [config: criu_unauthenticated; default off].
    #[arg(long)]
    criu_unauthenticated: bool,
    /// File holding the shared token native clients must present [config: token_file;
    /// default none: no authentication].
    #[arg(long, value_name = "FILE")]
    token_file: Option<PathBuf>,
    /// File of per-checkpoint tokens, TOML `"TOKEN" = ["ckpt-a*", ...]`: each token reads or
    /// uploads only the checkpoint ids its patterns match [config: tokens_file; default none].
    #[arg(long, value_name = "FILE")]
    tokens_file: Option<PathBuf>,
    /// PEM certificate chain: TCP listeners speak TLS [config: tls_cert_file; default none:
    /// plaintext].
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert [config: tls_key_file; default none].
    #[arg(long, value_name = "FILE")]
    tls_key: Option<PathBuf>,
    /// PEM CA: TLS clients must present a certificate signed by it [config: tls_client_ca_file;
    /// default none: no client certificates].
    #[arg(long, value_name = "FILE")]
    tls_client_ca: Option<PathBuf>,
    /// Serve Prometheus metrics at http://ADDR:PORT/metrics [config: metrics; default off].
    #[arg(long, value_name = "ADDR:PORT")]
    metrics: Option<String>,
    /// Do not write access logs (<store>/.distriproc/access/<id>.log) [config: access_log =
    /// false; default: written].
    #[arg(long)]
    no_access_log: bool,
    /// Refuse native reads of pages not dumped as lazy [config: lazy_only; default off].
    #[arg(long)]
    lazy_only: bool,
    /// Most concurrent connections [config: max_clients; default 1024].
    #[arg(long, value_name = "N")]
    max_clients: Option<u32>,
    /// Per-connection I/O and idle timeout in ms [config: io_timeout_ms; default 60000].
    #[arg(long, value_name = "MS")]
    io_timeout_ms: Option<u64>,
    /// After each reply, poll the connection this long for the client's next request before
    /// sleeping, in µs (0..=1000) [config: busy_poll_us; default 0: off].
    #[arg(long, value_name = "US")]
    busy_poll_us: Option<u64>,
    /// Run retention (see `gc`) every this many seconds, 0 = never by itself [config:
    /// gc_interval_s; default 600].
    #[arg(long, value_name = "SECS")]
    gc_interval_s: Option<u64>,
    /// Retention deletes a checkpoint once a layer over it has existed this long, 0 = never
    /// [config: expire_superseded_after_s; default 0].
    #[arg(long, value_name = "SECS")]
    expire_superseded_after_s: Option<u64>,
    /// Flatten a layer whose chain is deeper than this right after its upload, 0 = never
    /// [config: flatten_depth; default 16; 0..=31].
    #[arg(long, value_name = "N")]
    flatten_depth: Option<u32>,
    /// Largest native upload (remote checkpoint) in bytes [default 4 TiB].
    #[arg(long, value_name = "BYTES")]
    max_upload_bytes: Option<u64>,
}

fn load_config(a: &ServeArgs) -> Result<(PageServerConfig, String)> {
    let (mut cfg, origin) = match &a.config {
        Some(p) => (PageServerConfig::load(p)?, p.display().to_string()),
        None if Path::new(DEFAULT_PAGESERVER_CONFIG_PATH).exists() => (
            PageServerConfig::load(Path::new(DEFAULT_PAGESERVER_CONFIG_PATH))?,
            DEFAULT_PAGESERVER_CONFIG_PATH.to_string(),
        ),
        None => (PageServerConfig::default(), "defaults".to_string()),
    };
    if let Some(s) = &a.store {
        cfg.store = std::path::absolute(s).with_context(|| format!("--store {}", s.display()))?;
    }
    if !a.listen.is_empty() {
        cfg.listen = a.listen.clone();
    }
    if let Some(v) = &a.criu_default {
        cfg.criu_default = v.clone();
    }
    if let Some(v) = a.criu_header {
        cfg.criu_header = v;
    }
    if a.no_criu_push {
        cfg.criu_push = false;
    }
    if let Some(v) = &a.criu_push_prefix {
        cfg.criu_push_prefix = v.clone();
    }
    if a.criu_unauthenticated {
        cfg.criu_unauthenticated = true;
    }
    if let Some(v) = &a.token_file {
        cfg.token_file = v.clone();
    }
    if let Some(v) = &a.tokens_file {
        cfg.tokens_file = v.clone();
    }
    if let Some(v) = &a.tls_cert {
        cfg.tls_cert_file = v.clone();
    }
    if let Some(v) = &a.tls_key {
        cfg.tls_key_file = v.clone();
    }
    if let Some(v) = &a.tls_client_ca {
        cfg.tls_client_ca_file = v.clone();
    }
    if let Some(v) = &a.metrics {
        cfg.metrics = v.clone();
    }
    if a.no_access_log {
        cfg.access_log = false;
    }
    if a.lazy_only {
        cfg.lazy_only = true;
    }
    if let Some(v) = a.max_clients {
        cfg.max_clients = v;
    }
    if let Some(v) = a.io_timeout_ms {
        cfg.io_timeout_ms = v;
    }
    if let Some(v) = a.busy_poll_us {
        cfg.busy_poll_us = v;
    }
    if let Some(v) = a.gc_interval_s {
        cfg.gc_interval_s = v;
    }
    if let Some(v) = a.expire_superseded_after_s {
        cfg.expire_superseded_after_s = v;
    }
    if let Some(v) = a.flatten_depth {
        cfg.flatten_depth = v;
    }
    let origin = format!("{origin} + command line");
    cfg.validate(&origin)?;
    Ok((cfg, origin))
}

fn serve(a: &ServeArgs) -> Result<()> {
    let (cfg, origin) = load_config(a)?;
    let mut opts = ServerOptions::from_config(&cfg)?;
    if let Some(v) = a.max_upload_bytes {
        opts.max_upload_bytes = v;
    }
    // Block the stop signals before any thread starts, so that only sigwait sees them.
    let mut sigs = SigSet::empty();
    sigs.add(Signal::SIGTERM);
    sigs.add(Signal::SIGINT);
    sigs.thread_block().context("block SIGTERM/SIGINT")?;
    let handle = Server::start(opts).with_context(|| format!("start page server ({origin})"))?;
    {
        let mut out = std::io::stdout().lock();
        for a in handle.addrs() {
            writeln!(out, "listening on {a}")?;
        }
        if let Some(m) = handle.metrics_addr() {
            writeln!(out, "metrics on http://{m}/metrics")?;
        }
        out.flush()?;
    }
    let sig = sigs.wait().context("wait for a stop signal")?;
    tracing::info!("{sig:?}: stopping");
    handle.shutdown();
    Ok(())
}

fn delete(store: &Path, ids: &[String]) -> Result<()> {
    let store = Store::open(store, 1)?;
    let dead = Tombstones::of(&store);
    for id in ids {
        let dir = store.dir_of(id)?;
        anyhow::ensure!(
            dir.is_dir(),
            "no checkpoint {id:?} in {}",
            store.root().display()
        );
    }
    let map = LayerMap::scan(&store);
    let mut out = std::io::stdout().lock();
    for id in ids {
        dead.delete(id)
            .with_context(|| format!("write the tombstone of {id:?}"))?;
        let over = map.children(id).len();
        writeln!(
            out,
            "deleted {id}{}",
            if over > 0 {
                format!(" ({over} layers over it keep its pages until they are deleted)")
            } else {
                String::new()
            }
        )?;
    }
    Ok(())
}

fn gc(store: &Path, expire: Option<u64>, config: Option<&Path>, dry_run: bool) -> Result<()> {
    let cfg = match config {
        Some(p) => PageServerConfig::load(p)?,
        None if Path::new(DEFAULT_PAGESERVER_CONFIG_PATH).exists() => {
            PageServerConfig::load(Path::new(DEFAULT_PAGESERVER_CONFIG_PATH))?
        }
        None => PageServerConfig::default(),
    };
    let secs = expire.unwrap_or(cfg.expire_superseded_after_s);
    let store = Store::open(store, 1)?;
    let opts = GcOptions {
        expire_superseded_after: (secs > 0).then(|| std::time::Duration::from_secs(secs)),
        flatten_depth: (cfg.flatten_depth > 0)
            .then(|| usize::try_from(cfg.flatten_depth).unwrap_or(16)),
        dry_run,
    };
    let r = distriproc_pageserver::gc::run(&store, opts)?;
    let would = if dry_run { "would be " } else { "" };
    let mut out = std::io::stdout().lock();
    for id in &r.expired {
        writeln!(out, "{would}expired {id}")?;
    }
    for id in &r.removed {
        writeln!(out, "{would}removed {id}")?;
    }
    for (layer, into, pages) in &r.squashed {
        writeln!(out, "squashed {layer} into {into} ({pages} pages moved)")?;
    }
    for (id, pages) in &r.flattened {
        writeln!(out, "flattened {id} ({pages} pages copied in)")?;
    }
    for (id, why) in &r.skipped {
        writeln!(out, "kept {id}: {why}")?;
    }
    writeln!(
        out,
        "{} bytes {would}freed; store: {} checkpoints, {} layers, {} bytes, deepest chain {}",
        r.freed_bytes, r.after.checkpoints, r.after.layers, r.after.bytes, r.after.max_depth
    )?;
    Ok(())
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match cli.command {
        Some(Cmd::Stats { store, id }) => {
            let text = distriproc_pageserver::stats::run(&store, id.as_deref())?;
            print!("{text}");
            Ok(())
        }
        Some(Cmd::Delete { store, ids }) => delete(&store, &ids),
        Some(Cmd::Gc {
            store,
            expire_superseded_after_s,
            config,
            dry_run,
        }) => gc(
            &store,
            expire_superseded_after_s,
            config.as_deref(),
            dry_run,
        ),
        None => serve(&cli.serve),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    /// Every serve flag's help says its default (or that it is off / none by default).
    #[test]
    fn every_flag_names_its_default() {
        let cmd = Cli::command();
        for a in cmd.get_arguments() {
            let id = a.get_id().as_str();
            if matches!(id, "help" | "version") {
                continue;
            }
            let help = a
                .get_long_help()
                .or(a.get_help())
                .map(|h| h.to_string())
                .unwrap_or_default();
            assert!(help.contains("default"), "--{id}: {help:?}");
        }
        let stats = cmd.find_subcommand("stats").unwrap();
        assert!(stats.get_arguments().any(|a| a.get_id() == "store"));
    }
}
