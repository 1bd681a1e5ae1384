//! Listening, accepting and dispatching connections, and the validated options the server
//! runs with.
//!
//! Each listen address gets an acceptor thread; each connection its own thread. The first
//! four bytes decide the protocol: `DPPS` is a native hello ([`crate::native`]), a known CRIU
//! command is a CRIU session ([`crate::criu`]), anything else is dropped (and counted).

use std::collections::HashMap;
use std::io::{BufReader, Read};
use std::net::{SocketAddr, TcpListener};
use std::os::fd::AsFd;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use distriproc_config::pageserver::{
    load_token_grants, validate_checkpoint_id, CriuHeader, PageServerConfig, TokenGrant,
};
use distriproc_runtime::protocol::criu::looks_like_criu;
use distriproc_runtime::protocol::tls::{self, rustls};
use distriproc_runtime::protocol::{read_exact_or_eof, HelloReply, HelloStatus, MAGIC};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

use crate::access::AccessLogs;
use crate::checkpoint::Store;
use crate::metrics::Metrics;
use crate::stream::Stream;
use crate::PageServerError;
use distriproc_runtime::error_chain;

/// The options the server runs with (validated; see [`ServerOptions::from_config`]).
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// The store directory.
    pub store: PathBuf,
    /// `HOST:PORT` (port 0 picks a free port) or `unix:PATH`.
    pub listen: Vec<String>,
    /// Checkpoint for plain CRIU GET sessions.
    pub criu_default: Option<String>,
    /// Accept `criu dump --page-server` pushes.
    pub criu_push: bool,
    /// Pushed checkpoint name prefix.
    pub criu_push_prefix: String,
    /// CRIU header layout.
    pub criu_header: CriuHeader,
    /// Serve plain CRIU clients although a token is set.
    pub criu_unauthenticated: bool,
    /// The shared token (any checkpoint).
    pub token: Option<String>,
    /// Per-checkpoint tokens (`tokens_file`): each token reads or uploads only the checkpoint
    /// ids its patterns match.
    pub grants: Vec<TokenGrant>,
    /// Prometheus endpoint.
    pub metrics: Option<SocketAddr>,
    /// Write access logs.
    pub access_log: bool,
    /// Refuse native reads of non-lazy pages.
    pub lazy_only: bool,
    /// Most concurrent connections.
    pub max_clients: u64,
    /// Per-connection I/O and idle timeout.
    pub io_timeout: Duration,
    /// Indexes kept in memory.
    pub max_cached: usize,
    /// How long a native session polls for the next request after a reply (0: off).
    pub busy_poll: Duration,
    /// Largest native upload (all files together).
    pub max_upload_bytes: u64,
    /// TLS on the TCP listeners (`tls_cert_file`, `tls_key_file`, `tls_client_ca_file`);
    /// `None`: plaintext. Unix listeners are always plaintext.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// How often retention runs on the store (`None`: never by itself).
    pub gc_interval: Option<Duration>,
    /// Retention's expiry of superseded checkpoints (`None`: never).
    pub expire_superseded_after: Option<Duration>,
    /// Layers deeper than this are flattened after their upload (`None`: never).
    pub flatten_depth: Option<usize>,
}

impl ServerOptions {
    /// From a validated configuration; reads the token file.
    pub fn from_config(cfg: &PageServerConfig) -> Result<ServerOptions, PageServerError> {
        let token = if cfg.token_file.as_os_str().is_empty() {
            None
        } else {
            let t =
                std::fs::read_to_string(&cfg.token_file).map_err(|source| PageServerError::Io {
                    what: "read token file",
                    path: cfg.token_file.clone(),
                    source,
                })?;
            let t = t.trim().to_string();
            if t.is_empty() || t.len() > distriproc_runtime::protocol::MAX_TOKEN_LEN {
                return Err(PageServerError::BadOption {
                    name: "token_file",
                    why: format!(
                        "{}: the token must be 1..={} bytes",
                        cfg.token_file.display(),
                        distriproc_runtime::protocol::MAX_TOKEN_LEN
                    ),
                });
            }
            Some(t)
        };
        let grants = if cfg.tokens_file.as_os_str().is_empty() {
            Vec::new()
        } else {
            load_token_grants(&cfg.tokens_file).map_err(|e| PageServerError::BadOption {
                name: "tokens_file",
                why: e.to_string(),
            })?
        };
        let tls = if cfg.tls_cert_file.as_os_str().is_empty() {
            None
        } else {
            let ca = (!cfg.tls_client_ca_file.as_os_str().is_empty())
                .then_some(cfg.tls_client_ca_file.as_path());
            Some(
                tls::server_config(&cfg.tls_cert_file, &cfg.tls_key_file, ca).map_err(|e| {
                    PageServerError::BadOption {
                        name: "tls_cert_file",
                        why: error_chain(&e),
                    }
                })?,
            )
        };
        Ok(ServerOptions {
            store: cfg.store.clone(),
            listen: cfg.listen.clone(),
            criu_default: (!cfg.criu_default.is_empty()).then(|| cfg.criu_default.clone()),
            criu_push: cfg.criu_push,
            criu_push_prefix: cfg.criu_push_prefix.clone(),
            criu_header: cfg.criu_header,
            criu_unauthenticated: cfg.criu_unauthenticated,
            token,
            grants,
            metrics: if cfg.metrics.is_empty() {
                None
            } else {
                Some(
                    cfg.metrics
                        .parse()
                        .map_err(|e| PageServerError::BadOption {
                            name: "metrics",
                            why: format!("{:?}: {e}", cfg.metrics),
                        })?,
                )
            },
            access_log: cfg.access_log,
            lazy_only: cfg.lazy_only,
            max_clients: u64::from(cfg.max_clients),
            io_timeout: Duration::from_millis(cfg.io_timeout_ms),
            max_cached: usize::try_from(cfg.max_cached_checkpoints).unwrap_or(64),
            busy_poll: Duration::from_micros(cfg.busy_poll_us),
            max_upload_bytes: distriproc_runtime::protocol::upload::MAX_UPLOAD_BYTES,
            tls,
            gc_interval: (cfg.gc_interval_s > 0).then(|| Duration::from_secs(cfg.gc_interval_s)),
            expire_superseded_after: (cfg.expire_superseded_after_s > 0)
                .then(|| Duration::from_secs(cfg.expire_superseded_after_s)),
            flatten_depth: (cfg.flatten_depth > 0)
                .then(|| usize::try_from(cfg.flatten_depth).unwrap_or(16)),
        })
    }

    /// Whether native clients must present a token (a shared token or a tokens file is set).
    pub fn authenticates(&self) -> bool {
        self.token.is_some() || !self.grants.is_empty()
    }

    /// Defaults for a store (as the config file's defaults, listening on 127.0.0.1:0).
    pub fn for_store(store: PathBuf) -> ServerOptions {
        let cfg = PageServerConfig {
            store,
            listen: vec!["127.0.0.1:0".into()],
            ..Default::default()
        };
        Self::from_config(&cfg).unwrap_or_else(|_| unreachable!("defaults carry no token file"))
    }
}

/// State shared by every connection.
pub(crate) struct Ctx {
    pub(crate) store: Store,
    pub(crate) logs: AccessLogs,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) opts: ServerOptions,
    pub(crate) push_seq: AtomicU64,
    /// Set while an upload's connection waits to run retention after a write-back upload.
    pub(crate) gc_soon: AtomicBool,
    conns: Mutex<HashMap<u64, Stream>>,
    next_conn: AtomicU64,
    stop: AtomicBool,
}

impl Ctx {
    /// Sets the store gauges (checkpoints, layers, bytes, depth) from a scan of the store.
    pub(crate) fn refresh_store_gauges(&self) {
        self.metrics
            .set_store(&crate::layers::LayerMap::scan(&self.store).summary());
    }

    /// One retention run, counted in the metrics.
    pub(crate) fn gc(&self) -> Result<crate::gc::GcReport, PageServerError> {
        let opts = crate::gc::GcOptions {
            expire_superseded_after: self.opts.expire_superseded_after,
            flatten_depth: self.opts.flatten_depth,
            dry_run: false,
        };
        let r = crate::gc::run(&self.store, opts)?;
        self.metrics.count_gc(&r);
        self.metrics.set_store(&r.after);
        Ok(r)
    }
}

/// Runs retention every `every` until `ctx.stop`.
fn gc_loop(ctx: &Ctx, every: Duration) {
    let mut next = std::time::Instant::now() + every;
    while !ctx.stop.load(Relaxed) {
        let now = std::time::Instant::now();
        if now < next {
            // Woken early by `ServerHandle::stop`.
            std::thread::park_timeout(next - now);
            continue;
        }
        next = std::time::Instant::now() + every;
        match ctx.gc() {
            Ok(r) if !r.removed.is_empty() || !r.squashed.is_empty() || !r.expired.is_empty() => {
                tracing::info!(
                    expired = r.expired.len(),
                    removed = r.removed.len(),
                    squashed = r.squashed.len(),
                    freed_bytes = r.freed_bytes,
                    "retention run"
                )
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %error_chain(&e), "retention run failed"),
        }
    }
}

/// The page server.
pub struct Server;

/// A running server.
pub struct ServerHandle {
    ctx: Arc<Ctx>,
    addrs: Vec<String>,
    metrics_addr: Option<SocketAddr>,
    threads: Vec<JoinHandle<()>>,
    metrics_stop: Arc<AtomicBool>,
    unix_paths: Vec<PathBuf>,
}

enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener),
}

impl Server {
    /// Opens the store, binds every listen address (and the metrics endpoint) and starts the
    /// acceptor threads. Returns once all sockets listen.
    pub fn start(opts: ServerOptions) -> Result<ServerHandle, PageServerError> {
        if let Some(id) = &opts.criu_default {
            validate_checkpoint_id(id).map_err(|why| PageServerError::BadOption {
                name: "criu_default",
                why,
            })?;
        }
        let store = Store::open(&opts.store, opts.max_cached)?;
        crate::upload::sweep_incoming(&store);
        let logs = AccessLogs::new(opts.access_log.then(|| store.state_dir().join("access")));
        let mut listeners = Vec::new();
        let mut addrs = Vec::new();
        let mut unix_paths = Vec::new();
        for a in &opts.listen {
            let lerr = |source| PageServerError::Listen {
                addr: a.clone(),
                source,
            };
            if let Some(p) = a.strip_prefix("unix:") {
                let path = PathBuf::from(p);
                if let Ok(m) = std::fs::symlink_metadata(&path) {
                    if m.file_type().is_socket() {
                        let _ = std::fs::remove_file(&path);
                    }
                }
                let l = UnixListener::bind(&path).map_err(lerr)?;
                l.set_nonblocking(true).map_err(lerr)?;
                addrs.push(format!("unix:{p}"));
                unix_paths.push(path);
                listeners.push(Listener::Unix(l));
            } else {
                let l = TcpListener::bind(a.as_str()).map_err(lerr)?;
                l.set_nonblocking(true).map_err(lerr)?;
                addrs.push(l.local_addr().map_err(lerr)?.to_string());
                listeners.push(Listener::Tcp(l));
            }
        }
        let metrics = Arc::new(Metrics::default());
        let ctx = Arc::new(Ctx {
            store,
            logs,
            metrics: metrics.clone(),
            opts: opts.clone(),
            push_seq: AtomicU64::new(1),
            gc_soon: AtomicBool::new(false),
            conns: Mutex::new(HashMap::new()),
            next_conn: AtomicU64::new(1),
            stop: AtomicBool::new(false),
        });
        ctx.refresh_store_gauges();
        let metrics_stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        if let Some(every) = opts.gc_interval {
            let c = ctx.clone();
            threads.push(
                std::thread::Builder::new()
                    .name("retention".into())
                    .spawn(move || gc_loop(&c, every))
                    .map_err(|source| PageServerError::Listen {
                        addr: "retention thread".into(),
                        source,
                    })?,
            );
        }
        let mut metrics_addr = None;
        if let Some(m) = opts.metrics {
            let l = TcpListener::bind(m).map_err(|source| PageServerError::Listen {
                addr: m.to_string(),
                source,
            })?;
            metrics_addr = l.local_addr().ok();
            let c = ctx.clone();
            threads.push(
                crate::metrics::serve(l, metrics, metrics_stop.clone(), move |m| {
                    m.checkpoints_cached.store(c.store.cached() as u64, Relaxed);
                })
                .map_err(|source| PageServerError::Listen {
                    addr: "metrics".into(),
                    source,
                })?,
            );
        }
        for (l, a) in listeners.into_iter().zip(addrs.clone()) {
            let c = ctx.clone();
            let t = std::thread::Builder::new()
                .name(format!("accept {a}"))
                .spawn(move || accept_loop(&c, l))
                .map_err(|source| PageServerError::Listen { addr: a, source })?;
            threads.push(t);
        }
        tracing::info!(store = %opts.store.display(), listen = ?addrs, metrics = ?metrics_addr, "page server listening");
        Ok(ServerHandle {
            ctx,
            addrs,
            metrics_addr,
            threads,
            metrics_stop,
            unix_paths,
        })
    }
}

impl ServerHandle {
    /// The bound addresses (`IP:PORT` with the real port, or `unix:PATH`), in listen order.
    pub fn addrs(&self) -> &[String] {
        &self.addrs
    }

    /// The bound metrics address.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// The metrics text, as `/metrics` would serve it.
    pub fn metrics_text(&self) -> String {
        self.ctx
            .metrics
            .checkpoints_cached
            .store(self.ctx.store.cached() as u64, Relaxed);
        self.ctx.metrics.render()
    }

    /// Runs retention now (as the `gc_interval_s` timer does).
    pub fn gc(&self) -> Result<crate::gc::GcReport, PageServerError> {
        self.ctx.gc()
    }

    /// Open connections.
    pub fn clients(&self) -> u64 {
        self.ctx.metrics.clients.load(Relaxed)
    }

    /// Stops accepting, closes every open connection and joins the acceptor threads.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        self.ctx.stop.store(true, Relaxed);
        self.metrics_stop.store(true, Relaxed);
        for s in self
            .ctx
            .conns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
        {
            s.shutdown();
        }
        for t in &self.threads {
            t.thread().unpark();
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        for p in &self.unix_paths {
            let _ = std::fs::remove_file(p);
        }
    }
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        self.stop();
    }
}

fn accept_loop(ctx: &Arc<Ctx>, l: Listener) {
    while !ctx.stop.load(Relaxed) {
        let accepted = match &l {
            Listener::Tcp(l) => l.accept().map(|(s, _)| Stream::Tcp(s)),
            Listener::Unix(l) => l.accept().map(|(s, _)| Stream::Unix(s)),
        };
        let s = match accepted {
            Ok(s) => s,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                // Sleep until a connection arrives, waking now and then to see `stop`.
                let fd = match &l {
                    Listener::Tcp(l) => l.as_fd(),
                    Listener::Unix(l) => l.as_fd(),
                };
                let mut fds = [PollFd::new(fd, PollFlags::POLLIN)];
                let _ = poll(&mut fds, PollTimeout::from(100u16));
                continue;
            }
            Err(e) => {
                tracing::warn!("accept failed: {e}");
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        let c = ctx.clone();
        if let Err(e) = std::thread::Builder::new()
            .name("conn".into())
            .spawn(move || connection(&c, s))
        {
            tracing::warn!("cannot start a connection thread: {e}");
        }
    }
}

fn connection(ctx: &Ctx, s: Stream) {
    let peer = s.peer();
    let id = ctx.next_conn.fetch_add(1, Relaxed);
    let active = ctx.metrics.clients.fetch_add(1, Relaxed) + 1;
    struct Leave<'a>(&'a Ctx, u64);
    impl Drop for Leave<'_> {
        fn drop(&mut self) {
            self.0.metrics.clients.fetch_sub(1, Relaxed);
            self.0
                .conns
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&self.1);
        }
    }
    let _leave = Leave(ctx, id);
    let res = (|| -> Result<(), PageServerError> {
        let ioerr = |source| PageServerError::Io {
            what: "set up connection from",
            path: PathBuf::from(&peer),
            source,
        };
        s.set_timeouts(ctx.opts.io_timeout).map_err(ioerr)?;
        let s = match (&ctx.opts.tls, s) {
            (Some(cfg), Stream::Tcp(t)) => match start_tls(ctx, cfg, t, &peer)? {
                Some(s) => s,
                None => return Ok(()),
            },
            (_, s) => s,
        };
        let plain_tcp_under_tls = ctx.opts.tls.is_some() && matches!(s, Stream::Tcp(_));
        let w = s.try_clone().map_err(ioerr)?;
        if let Ok(k) = s.try_clone() {
            ctx.conns
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(id, k);
        }
        let mut r = BufReader::with_capacity(64 * 1024, s);
        let mut first = [0u8; 4];
        if !read_exact_or_eof(&mut r, &mut first).map_err(ioerr)? {
            return Ok(());
        }
        if first == MAGIC && plain_tcp_under_tls {
            ctx.metrics.errors_auth.fetch_add(1, Relaxed);
            let mut w = w;
            let _ = std::io::Write::write_all(
                &mut w,
                &HelloReply::refuse(
                    HelloStatus::Malformed,
                    "this page server requires TLS on TCP (configure the client's tls_ca_file)",
                )
                .encode(),
            );
            return Err(PageServerError::Criu {
                peer: peer.clone(),
                what: "plaintext native hello refused: TLS required".into(),
            });
        }
        if first == MAGIC {
            if active > ctx.opts.max_clients {
                let mut w = w;
                let _ = std::io::Write::write_all(
                    &mut w,
                    &HelloReply::refuse(
                        HelloStatus::Busy,
                        &format!("server at its limit of {} clients", ctx.opts.max_clients),
                    )
                    .encode(),
                );
                return Ok(());
            }
            return crate::native::serve(ctx, r, w, &peer);
        }
        if active > ctx.opts.max_clients {
            return Err(PageServerError::Criu {
                peer: peer.clone(),
                what: format!("refused: at the limit of {} clients", ctx.opts.max_clients),
            });
        }
        if looks_like_criu(&first) {
            return crate::criu::serve(ctx, r, w, &peer, Some(first), None, "criu");
        }
        // Neither protocol: drop the connection without answering.
        let mut rest = [0u8; 12];
        let n = r.read(&mut rest).unwrap_or(0);
        Err(PageServerError::UnknownProtocol {
            peer: peer.clone(),
            first: first
                .iter()
                .chain(&rest[..n])
                .map(|b| format!("{b:02x}"))
                .collect(),
        })
    })();
    if let Err(e) = res {
        ctx.metrics.errors_session.fetch_add(1, Relaxed);
        tracing::warn!("{}", error_chain(&e));
    }
}

/// TLS on an accepted TCP connection: a TLS client (first byte a handshake record) gets the
/// handshake (errors end the connection, logged); anything else goes on in plaintext, where
/// `connection` refuses a native hello and CRIU clients (which have no TLS) are served under
/// the usual CRIU rules (`criu_unauthenticated`). `None`: closed before the first byte.
fn start_tls(
    ctx: &Ctx,
    cfg: &Arc<rustls::ServerConfig>,
    t: std::net::TcpStream,
    peer: &str,
) -> Result<Option<Stream>, PageServerError> {
    let ioerr = |what: &'static str| {
        move |source| PageServerError::Io {
            what,
            path: PathBuf::from(peer),
            source,
        }
    };
    let mut first = [0u8; 1];
    if t.peek(&mut first).map_err(ioerr("read from"))? == 0 {
        return Ok(None);
    }
    if !tls::looks_like_tls(first[0]) {
        // Plaintext: only CRIU may go on (a native hello is refused in `connection`).
        return Ok(Some(Stream::Tcp(t)));
    }
    let sock = t.try_clone().map_err(ioerr("set up tls for"))?;
    let conn = rustls::ServerConnection::new(cfg.clone()).map_err(|e| PageServerError::Io {
        what: "start tls with",
        path: PathBuf::from(peer),
        source: std::io::Error::other(e),
    })?;
    let mut s = rustls::StreamOwned::new(conn, t);
    while s.conn.is_handshaking() {
        if let Err(e) = s.conn.complete_io(&mut s.sock) {
            ctx.metrics.errors_auth.fetch_add(1, Relaxed);
            return Err(PageServerError::Io {
                what: "tls handshake with",
                path: PathBuf::from(peer),
                source: e,
            });
        }
    }
    Ok(Some(Stream::Tls {
        tls: Arc::new(Mutex::new(s)),
        sock,
    }))
}
