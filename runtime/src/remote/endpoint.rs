//! Where the page server listens ([`Endpoint`]) and how a client talks to it
//! ([`RemoteOptions`]).

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use crate::protocol::tls::TlsClient;

use super::*;

/// Where the page server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// `HOST:PORT` (resolved at each connect; IPv6 as `[::1]:PORT`).
    Tcp(String),
    /// `unix:PATH`.
    Unix(PathBuf),
}

impl FromStr for Endpoint {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Some(p) = s.strip_prefix("unix:") {
            if p.is_empty() {
                return Err(format!("{s:?}: empty unix socket path"));
            }
            return Ok(Endpoint::Unix(PathBuf::from(p)));
        }
        match s.rsplit_once(':') {
            Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => {
                Ok(Endpoint::Tcp(s.to_string()))
            }
            _ => Err(format!(
                "{s:?} is not HOST:PORT or unix:PATH (e.g. 10.0.0.5:7060, unix:/run/ps.sock)"
            )),
        }
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Tcp(a) => write!(f, "tcp:{a}"),
            Endpoint::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// Client settings.
#[derive(Debug, Clone)]
pub struct RemoteOptions {
    /// The checkpoint to read (a directory name in the server's store).
    pub checkpoint: String,
    /// The shared token (empty if the server needs none).
    pub token: String,
    /// Who is restoring (recorded in the server's access log), e.g. the container id.
    pub client: String,
    /// Limit on establishing a connection (TCP connect and hello).
    pub connect_timeout: Duration,
    /// Limit on each read or write of a request/response.
    pub io_timeout: Duration,
    /// How long to keep retrying after a transport failure before giving up.
    pub retry_timeout: Duration,
    /// First backoff delay between retries (doubles up to `backoff_max`).
    pub backoff_initial: Duration,
    /// Largest backoff delay.
    pub backoff_max: Duration,
    /// Most connections open at once (1..=64): concurrent callers beyond it wait.
    pub max_connections: usize,
    /// Most requests outstanding on one connection in [`RemotePages::read_batch`].
    pub pipeline_depth: usize,
    /// TLS for TCP endpoints ([`crate::protocol::tls`]); `None`: plaintext. Unix endpoints
    /// are always plaintext.
    pub tls: Option<TlsClient>,
}

impl RemoteOptions {
    /// Defaults for a checkpoint id: 5 s connect, 10 s I/O, 30 s of retries, 8 connections.
    pub fn new(checkpoint: &str) -> RemoteOptions {
        RemoteOptions {
            checkpoint: checkpoint.to_string(),
            token: String::new(),
            client: format!("pid-{}", std::process::id()),
            connect_timeout: Duration::from_secs(5),
            io_timeout: Duration::from_secs(10),
            retry_timeout: Duration::from_secs(30),
            backoff_initial: Duration::from_millis(10),
            backoff_max: Duration::from_secs(1),
            max_connections: 8,
            pipeline_depth: 8,
            tls: None,
        }
    }
}

impl RemoteOptions {
    /// Options for `checkpoint` from the client configuration (timeouts, pool size, token).
    /// Returns the endpoint too; `None` when no page server is configured.
    pub fn from_config(
        cfg: &distriproc_config::pageserver::PageServerClientConfig,
        checkpoint: &str,
        client: &str,
    ) -> Result<Option<(Endpoint, RemoteOptions)>, distriproc_config::ConfigError> {
        if cfg.address.is_empty() {
            return Ok(None);
        }
        let endpoint = cfg.address.parse::<Endpoint>().map_err(|message| {
            distriproc_config::ConfigError::Invalid {
                origin: "page server client".into(),
                key: "address".into(),
                message,
            }
        })?;
        let mut o = RemoteOptions::new(checkpoint);
        o.token = cfg.token()?;
        o.client = client.to_string();
        o.connect_timeout = Duration::from_millis(cfg.connect_timeout_ms);
        o.io_timeout = Duration::from_millis(cfg.io_timeout_ms);
        o.retry_timeout = Duration::from_millis(cfg.retry_timeout_ms);
        o.max_connections = usize::try_from(cfg.max_connections).unwrap_or(8);
        if !cfg.tls_ca_file.as_os_str().is_empty() {
            // The name the certificate must carry: tls_server_name, else the address's host.
            let name = if cfg.tls_server_name.is_empty() {
                let host = cfg.address.rsplit_once(':').map_or("", |(h, _)| h);
                host.trim_start_matches('[')
                    .trim_end_matches(']')
                    .to_string()
            } else {
                cfg.tls_server_name.clone()
            };
            let cert = (!cfg.tls_cert_file.as_os_str().is_empty())
                .then_some((cfg.tls_cert_file.as_path(), cfg.tls_key_file.as_path()));
            o.tls = Some(TlsClient::new(&cfg.tls_ca_file, &name, cert).map_err(|e| {
                distriproc_config::ConfigError::Invalid {
                    origin: "page server client".into(),
                    key: "tls_ca_file".into(),
                    message: tls_error_text(&e),
                }
            })?);
        }
        Ok(Some((endpoint, o)))
    }
}

/// Most connections a [`RemotePages`] may open.
pub const MAX_CONNECTIONS: usize = 64;
