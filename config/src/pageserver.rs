//! The page server's configuration file (`distriproc-pageserver --config FILE`), its defaults
//! and validation, and the rule for checkpoint ids. Command-line flags override file values;
//! the binary applies them and validates the result once.
//!
//! ```toml
//! # /etc/distriproc/pageserver.toml (every key optional; these are the defaults)
//! store = "/var/lib/distriproc/checkpoints"  # each subdirectory is a checkpoint
//! listen = ["0.0.0.0:7060"]                  # HOST:PORT or unix:PATH, one or more
//! criu_default = ""                          # checkpoint served to plain CRIU clients ("" = none)
//! criu_push = true                           # accept `criu dump --page-server` pushes
//! criu_push_prefix = "push-"                 # pushed checkpoints are named PREFIX<time>-<n>
//! criu_header = "auto"                       # auto | 4.1 | 4.2 (CRIU header layout)
//! criu_unauthenticated = false               # allow CRIU clients (no token) when a token is set
//! token_file = ""                            # shared token; "" = no authentication
//! tokens_file = ""                           # per-checkpoint tokens (see TokenGrant); "" = none
//! tls_cert_file = ""                         # PEM certificate chain: TLS on TCP listeners
//! tls_key_file = ""                          # PEM private key of tls_cert_file
//! tls_client_ca_file = ""                    # PEM CA: clients must present a certificate from it
//! metrics = ""                               # ADDR:PORT for Prometheus /metrics ("" = off)
//! access_log = true                          # append-only access log per checkpoint
//! lazy_only = false                          # refuse native reads of non-lazy pages
//! max_clients = 1024                         # concurrent connections
//! io_timeout_ms = 60000                      # idle/IO limit per connection
//! max_cached_checkpoints = 64                # checkpoint indexes kept in memory
//! busy_poll_us = 100                         # poll for a client's next request (µs, 0 = off)
//! gc_interval_s = 600                        # run retention this often (s, 0 = only `gc`)
//! expire_superseded_after_s = 0              # delete checkpoints superseded this long (0 = never)
//! flatten_depth = 16                         # copy a deeper layer's chain into it (0 = never)
//! ```

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::ConfigError;

/// Where the page server looks for its configuration file when none is named.
pub const DEFAULT_PAGESERVER_CONFIG_PATH: &str = "/etc/distriproc/pageserver.toml";
/// Default store directory.
pub const DEFAULT_STORE: &str = "/var/lib/distriproc/checkpoints";
/// Default listen address.
pub const DEFAULT_LISTEN: &str = "0.0.0.0:7060";
/// Longest checkpoint id (also the native protocol's limit).
pub const MAX_CHECKPOINT_ID_LEN: usize = 128;
/// Upper bound of `max_clients`.
pub const MAX_CLIENTS: u32 = 65_536;
/// Upper bound of `busy_poll_us`.
pub const MAX_BUSY_POLL_US: u64 = 1000;

/// Which CRIU page-server header layout to speak.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum CriuHeader {
    /// Detect per connection from the first header (4.2 when undecidable).
    #[default]
    #[serde(rename = "auto")]
    Auto,
    /// CRIU ≤ 4.1: 24-byte headers.
    #[serde(rename = "4.1")]
    V41,
    /// CRIU ≥ 4.2: 32-byte headers.
    #[serde(rename = "4.2")]
    V42,
}

impl std::str::FromStr for CriuHeader {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(Self::Auto),
            "4.1" => Ok(Self::V41),
            "4.2" => Ok(Self::V42),
            other => Err(format!(
                "unknown CRIU header layout {other:?} (expected auto, 4.1 or 4.2)"
            )),
        }
    }
}

/// The page server's configuration file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PageServerConfig {
    /// The checkpoint store.
    pub store: PathBuf,
    /// Listen addresses: `HOST:PORT` or `unix:PATH`.
    pub listen: Vec<String>,
    /// Checkpoint served to plain CRIU clients (empty: CRIU GET sessions are refused).
    pub criu_default: String,
    /// Accept `criu dump --page-server` pushes into new checkpoints.
    pub criu_push: bool,
    /// Name prefix of pushed checkpoints.
    pub criu_push_prefix: String,
    /// CRIU header layout.
    pub criu_header: CriuHeader,
    /// Whether CRIU clients (which cannot present a token) are served when a token is set.
    pub criu_unauthenticated: bool,
    /// File holding the shared token (empty: no authentication).
    pub token_file: PathBuf,
    /// File of per-checkpoint tokens ([`TokenGrant`], [`load_token_grants`]); empty: none.
    /// With it (or `token_file`) set, every native client must present a known token.
    pub tokens_file: PathBuf,
    /// PEM certificate chain: with it, TCP listeners speak TLS only (unix sockets stay plain).
    pub tls_cert_file: PathBuf,
    /// PEM private key of `tls_cert_file` (required with it).
    pub tls_key_file: PathBuf,
    /// PEM CA certificates: clients must present a certificate signed by one (mutual TLS).
    pub tls_client_ca_file: PathBuf,
    /// Prometheus endpoint (empty: off).
    pub metrics: String,
    /// Write the per-checkpoint access log.
    pub access_log: bool,
    /// Refuse native reads of pages that were not dumped as lazy.
    pub lazy_only: bool,
    /// Most concurrent connections.
    pub max_clients: u32,
    /// Per-connection I/O and idle timeout.
    pub io_timeout_ms: u64,
    /// Checkpoint indexes kept in memory.
    pub max_cached_checkpoints: u32,
    /// After each reply, how long a native session polls its socket for the next request
    /// before sleeping in `read` (µs, 0..=1000; 0 = off). A demand-fault client sends its
    /// next request within tens of µs; catching it without a sleep/wake-up cuts the fault
    /// latency where waking an idle CPU is slow (VMs). Costs up to this much CPU per request
    /// (the thread yields between polls and stops once a yield let another thread run).
    pub busy_poll_us: u64,
    /// How often the server runs retention (`distriproc-pageserver gc`) on its store, in
    /// seconds; 0 = never by itself.
    pub gc_interval_s: u64,
    /// Retention deletes a checkpoint once a layer over it has existed this long (seconds;
    /// 0 = never): in a migration chain only the newest checkpoints stay restorable.
    pub expire_superseded_after_s: u64,
    /// A layer whose chain is deeper than this is made self-contained by retention right after
    /// its upload (the pages it reads through the chain are copied into it; the layers below
    /// stay as they are): chains stay this short however often a container migrates
    /// (1..=31; 0 = never, then a chain stops at 32 layers).
    pub flatten_depth: u32,
}

impl Default for PageServerConfig {
    fn default() -> Self {
        PageServerConfig {
            store: PathBuf::from(DEFAULT_STORE),
            listen: vec![DEFAULT_LISTEN.to_string()],
            criu_default: String::new(),
            criu_push: true,
            criu_push_prefix: "push-".into(),
            criu_header: CriuHeader::Auto,
            criu_unauthenticated: false,
            token_file: PathBuf::new(),
            tokens_file: PathBuf::new(),
            tls_cert_file: PathBuf::new(),
            tls_key_file: PathBuf::new(),
            tls_client_ca_file: PathBuf::new(),
            metrics: String::new(),
            access_log: true,
            lazy_only: false,
            max_clients: 1024,
            io_timeout_ms: 60_000,
            max_cached_checkpoints: 64,
            busy_poll_us: 100,
            gc_interval_s: 600,
            expire_superseded_after_s: 0,
            flatten_depth: 16,
        }
    }
}

/// How a client (the shim) reaches a page server: the `[pageserver]` table a shim
/// configuration can embed, and the source of `distriproc_runtime::remote::RemoteOptions`.
///
/// ```toml
/// [pageserver]
/// address = "10.0.0.5:7060"   # HOST:PORT or unix:PATH ("" = no page server: local pages)
/// token_file = ""             # file with the shared token ("" = none)
/// connect_timeout_ms = 5000
/// io_timeout_ms = 10000       # per request read/write
/// retry_timeout_ms = 30000    # keep reconnecting this long after a failure, then fail
/// max_connections = 8         # per restore
/// tls_ca_file = ""            # PEM CA to trust: TLS to a TCP address ("" = plaintext)
/// tls_server_name = ""        # name in the server certificate ("" = the address's host)
/// tls_cert_file = ""          # PEM client certificate, for servers that require one
/// tls_key_file = ""           # its private key
/// upload_during_dump = true   # a first checkpoint sends its pages while CRIU writes them
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PageServerClientConfig {
    /// `HOST:PORT` or `unix:PATH`; empty means no page server.
    pub address: String,
    /// File holding the shared token.
    pub token_file: PathBuf,
    /// Limit on connecting and the hello.
    pub connect_timeout_ms: u64,
    /// Limit on each request's reads and writes.
    pub io_timeout_ms: u64,
    /// How long to retry after a transport failure.
    pub retry_timeout_ms: u64,
    /// Most connections per client.
    pub max_connections: u32,
    /// PEM CA certificates to trust; set: TLS to a TCP address.
    pub tls_ca_file: PathBuf,
    /// The name the server certificate must carry (empty: the host of `address`).
    pub tls_server_name: String,
    /// PEM client certificate (mutual TLS).
    pub tls_cert_file: PathBuf,
    /// Private key of `tls_cert_file`.
    pub tls_key_file: PathBuf,
    /// A checkpoint whose memory is all local (not a layer) sends its pages files to the page
    /// server while CRIU writes them (upload parts, protocol v5), instead of after the dump.
    pub upload_during_dump: bool,
}

impl Default for PageServerClientConfig {
    fn default() -> Self {
        PageServerClientConfig {
            address: String::new(),
            token_file: PathBuf::new(),
            connect_timeout_ms: 5_000,
            io_timeout_ms: 10_000,
            retry_timeout_ms: 30_000,
            max_connections: 8,
            tls_ca_file: PathBuf::new(),
            tls_server_name: String::new(),
            tls_cert_file: PathBuf::new(),
            tls_key_file: PathBuf::new(),
            upload_during_dump: true,
        }
    }
}

impl PageServerClientConfig {
    /// Checks every value; keys are named with `prefix` (e.g. "pageserver.") in errors.
    pub fn validate(&self, origin: &str, prefix: &str) -> Result<(), ConfigError> {
        let invalid = |key: &str, message: String| ConfigError::Invalid {
            origin: origin.to_string(),
            key: format!("{prefix}{key}"),
            message,
        };
        if !self.address.is_empty() {
            validate_listen(&self.address).map_err(|m| invalid("address", m))?;
        }
        for (key, v) in [
            ("connect_timeout_ms", self.connect_timeout_ms),
            ("io_timeout_ms", self.io_timeout_ms),
        ] {
            if v == 0 {
                return Err(invalid(key, "must be greater than 0".into()));
            }
        }
        if self.max_connections == 0 || self.max_connections > 64 {
            return Err(invalid(
                "max_connections",
                format!("{} is out of range 1..=64", self.max_connections),
            ));
        }
        let set = |p: &Path| !p.as_os_str().is_empty();
        if let Some(missing) = unpaired_tls_key(&self.tls_cert_file, &self.tls_key_file) {
            return Err(invalid(
                missing,
                "tls_cert_file and tls_key_file go together".into(),
            ));
        }
        if !set(&self.tls_ca_file) && (set(&self.tls_cert_file) || !self.tls_server_name.is_empty())
        {
            return Err(invalid(
                "tls_ca_file",
                "needed with tls_server_name or tls_cert_file (TLS settings without a CA)".into(),
            ));
        }
        if set(&self.tls_ca_file) && self.address.starts_with("unix:") {
            return Err(invalid(
                "tls_ca_file",
                "TLS is for TCP addresses; unix sockets are plaintext".into(),
            ));
        }
        Ok(())
    }

    /// Reads the token file (trimmed); empty when none is configured.
    pub fn token(&self) -> Result<String, ConfigError> {
        if self.token_file.as_os_str().is_empty() {
            return Ok(String::new());
        }
        std::fs::read_to_string(&self.token_file)
            .map(|t| t.trim().to_string())
            .map_err(|source| ConfigError::Read {
                path: self.token_file.clone(),
                source,
            })
    }
}

/// Which of a certificate/key pair is missing when only one is set (`None`: both or neither).
fn unpaired_tls_key(cert: &Path, key: &Path) -> Option<&'static str> {
    match (cert.as_os_str().is_empty(), key.as_os_str().is_empty()) {
        (false, true) => Some("tls_key_file"),
        (true, false) => Some("tls_cert_file"),
        _ => None,
    }
}

/// Checks that `id` names a checkpoint directly inside the store: 1..=128 characters from
/// `[A-Za-z0-9._-]`, not starting with `.` or `-` (so no `..`, no `/`, no hidden or option-like
/// names). Returns why not.
pub fn validate_checkpoint_id(id: &str) -> Result<(), String> {
    if id.is_empty() {
        return Err("empty checkpoint id".into());
    }
    if id.len() > MAX_CHECKPOINT_ID_LEN {
        return Err(format!(
            "checkpoint id is {} bytes, limit is {MAX_CHECKPOINT_ID_LEN}",
            id.len()
        ));
    }
    if id.starts_with('.') || id.starts_with('-') {
        return Err(format!("checkpoint id {id:?} starts with '.' or '-'"));
    }
    if let Some(c) = id
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(format!(
            "checkpoint id {id:?} contains {c:?} (allowed: A-Z a-z 0-9 . _ -)"
        ));
    }
    Ok(())
}

/// Most patterns per token in a tokens file.
pub const MAX_TOKEN_PATTERNS: usize = 1024;
/// Most tokens in a tokens file.
pub const MAX_TOKENS: usize = 4096;

/// One token of a tokens file and the checkpoint ids it may read or upload.
///
/// The tokens file (`tokens_file`) is TOML, one key per token, each listing id patterns:
///
/// ```toml
/// "4f1c9e0b27d6" = ["ckpt-a*", "web-1"]   # reads ckpt-a..., and web-1
/// "ops-7d2e" = ["*"]                       # everything
/// ```
///
/// A pattern is a checkpoint id in which `*` matches any run of characters (none included).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenGrant {
    /// The token a client presents.
    pub token: String,
    /// Id patterns it may use.
    pub patterns: Vec<String>,
}

impl TokenGrant {
    /// Whether this grant allows checkpoint `id`.
    pub fn allows(&self, id: &str) -> bool {
        self.patterns.iter().any(|p| pattern_matches(p, id))
    }
}

/// Whether checkpoint id `id` matches `pattern` (`*` = any run of characters).
pub fn pattern_matches(pattern: &str, id: &str) -> bool {
    let (p, s) = (pattern.as_bytes(), id.as_bytes());
    // Iterative glob with backtracking to the last `*`: linear in practice, no recursion.
    let (mut pi, mut si) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while si < s.len() {
        if pi < p.len() && p[pi] == b'*' {
            star = Some((pi, si));
            pi += 1;
        } else if pi < p.len() && p[pi] == s[si] {
            pi += 1;
            si += 1;
        } else if let Some((sp, ss)) = star {
            pi = sp + 1;
            si = ss + 1;
            star = Some((sp, ss + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == b'*')
}

/// Checks a checkpoint id pattern: an id (see [`validate_checkpoint_id`]) that may contain `*`.
pub fn validate_checkpoint_pattern(pattern: &str) -> Result<(), String> {
    if pattern.is_empty() {
        return Err("empty checkpoint pattern".into());
    }
    if pattern.len() > MAX_CHECKPOINT_ID_LEN {
        return Err(format!(
            "checkpoint pattern is {} bytes, limit is {MAX_CHECKPOINT_ID_LEN}",
            pattern.len()
        ));
    }
    if let Some(c) = pattern
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '*')))
    {
        return Err(format!(
            "checkpoint pattern {pattern:?} contains {c:?} (allowed: A-Z a-z 0-9 . _ - *)"
        ));
    }
    Ok(())
}

/// Parses a tokens file's text (see [`TokenGrant`]); `origin` names the file in errors. Tokens
/// are 1..=1024 bytes without surrounding whitespace, each with 1..=[`MAX_TOKEN_PATTERNS`]
/// valid patterns.
pub fn parse_token_grants(text: &str, origin: &str) -> Result<Vec<TokenGrant>, ConfigError> {
    let map: std::collections::BTreeMap<String, Vec<String>> =
        toml::from_str(text).map_err(|e| ConfigError::Parse {
            origin: origin.to_string(),
            message: e.to_string().trim().replace('\n', " "),
        })?;
    let invalid = |key: &str, message: String| ConfigError::Invalid {
        origin: origin.to_string(),
        key: key.to_string(),
        message,
    };
    if map.len() > MAX_TOKENS {
        return Err(invalid(
            "tokens",
            format!("{} tokens, limit is {MAX_TOKENS}", map.len()),
        ));
    }
    let mut out = Vec::with_capacity(map.len());
    for (i, (token, patterns)) in map.into_iter().enumerate() {
        // The key is a secret: errors name its position, never its text.
        let key = format!("token #{}", i + 1);
        if token.is_empty() || token.len() > 1024 || token.trim() != token {
            return Err(invalid(
                &key,
                "a token must be 1..=1024 bytes without surrounding whitespace".into(),
            ));
        }
        if patterns.is_empty() || patterns.len() > MAX_TOKEN_PATTERNS {
            return Err(invalid(
                &key,
                format!("needs 1..={MAX_TOKEN_PATTERNS} checkpoint patterns"),
            ));
        }
        for p in &patterns {
            validate_checkpoint_pattern(p).map_err(|m| invalid(&key, m))?;
        }
        out.push(TokenGrant { token, patterns });
    }
    Ok(out)
}

/// Reads a tokens file (see [`parse_token_grants`]).
pub fn load_token_grants(path: &Path) -> Result<Vec<TokenGrant>, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    parse_token_grants(&text, &path.display().to_string())
}

/// Checks a listen address: `HOST:PORT` or `unix:PATH` (absolute).
pub fn validate_listen(addr: &str) -> Result<(), String> {
    if let Some(p) = addr.strip_prefix("unix:") {
        if !Path::new(p).is_absolute() {
            return Err(format!("{addr:?}: unix socket path must be absolute"));
        }
        return Ok(());
    }
    match addr.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => Ok(()),
        _ => Err(format!("{addr:?} is not HOST:PORT or unix:PATH")),
    }
}

impl PageServerConfig {
    /// Parses and validates TOML text; `origin` names the file in errors.
    pub fn from_toml_str(text: &str, origin: &str) -> Result<Self, ConfigError> {
        let cfg: PageServerConfig = crate::parse_toml(text, origin)?;
        cfg.validate(origin)?;
        Ok(cfg)
    }

    /// Reads and validates a TOML file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        Self::from_toml_str(&crate::read_config_file(path)?, &path.display().to_string())
    }

    /// Checks every value; the error names the key and `origin` (a file, or "command line").
    pub fn validate(&self, origin: &str) -> Result<(), ConfigError> {
        let invalid = |key: &str, message: String| ConfigError::Invalid {
            origin: origin.to_string(),
            key: key.to_string(),
            message,
        };
        if !self.store.is_absolute() {
            return Err(invalid(
                "store",
                format!("{} is not an absolute path", self.store.display()),
            ));
        }
        if self.listen.is_empty() {
            return Err(invalid("listen", "needs at least one address".into()));
        }
        for a in &self.listen {
            validate_listen(a).map_err(|m| invalid("listen", m))?;
        }
        if !self.criu_default.is_empty() {
            validate_checkpoint_id(&self.criu_default).map_err(|m| invalid("criu_default", m))?;
        }
        validate_checkpoint_id(&format!("{}x", self.criu_push_prefix))
            .map_err(|m| invalid("criu_push_prefix", m))?;
        if self.criu_push_prefix.len() > 64 {
            return Err(invalid(
                "criu_push_prefix",
                "longer than 64 characters".into(),
            ));
        }
        if !self.metrics.is_empty() && self.metrics.parse::<std::net::SocketAddr>().is_err() {
            return Err(invalid(
                "metrics",
                format!("{:?} is not IP:PORT", self.metrics),
            ));
        }
        if self.max_clients == 0 || self.max_clients > MAX_CLIENTS {
            return Err(invalid(
                "max_clients",
                format!("{} is out of range 1..={MAX_CLIENTS}", self.max_clients),
            ));
        }
        if self.io_timeout_ms == 0 {
            return Err(invalid("io_timeout_ms", "must be greater than 0".into()));
        }
        if self.max_cached_checkpoints == 0 {
            return Err(invalid(
                "max_cached_checkpoints",
                "must be greater than 0".into(),
            ));
        }
        if self.flatten_depth >= 32 {
            return Err(invalid(
                "flatten_depth",
                format!(
                    "{} is out of range 0..=31 (chains stop at 32 layers)",
                    self.flatten_depth
                ),
            ));
        }
        if self.busy_poll_us > MAX_BUSY_POLL_US {
            return Err(invalid(
                "busy_poll_us",
                format!(
                    "{} is out of range 0..={MAX_BUSY_POLL_US}",
                    self.busy_poll_us
                ),
            ));
        }
        let set = |p: &Path| !p.as_os_str().is_empty();
        if let Some(missing) = unpaired_tls_key(&self.tls_cert_file, &self.tls_key_file) {
            return Err(invalid(
                missing,
                "tls_cert_file and tls_key_file go together".into(),
            ));
        }
        if set(&self.tls_client_ca_file) && !set(&self.tls_cert_file) {
            return Err(invalid(
                "tls_client_ca_file",
                "client certificates need TLS: set tls_cert_file and tls_key_file".into(),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_patterns() {
        for (p, id, m) in [
            ("ckpt-a*", "ckpt-a1", true),
            ("ckpt-a*", "ckpt-a", true),
            ("ckpt-a*", "ckpt-b1", false),
            ("*", "x", true),
            ("web-1", "web-1", true),
            ("web-1", "web-10", false),
            ("a*b*c", "axxbyyc", true),
            ("a*b*c", "axxbyy", false),
            ("*-prod", "db-prod", true),
            ("*-prod", "db-prod2", false),
        ] {
            assert_eq!(pattern_matches(p, id), m, "{p} {id}");
        }
        let g = parse_token_grants(
            "\"t1\" = [\"ckpt-a*\", \"web-1\"]\nt2 = [\"*\"]\n",
            "t.toml",
        )
        .unwrap();
        assert_eq!(g.len(), 2);
        assert!(g[0].allows("ckpt-a7") && g[0].allows("web-1") && !g[0].allows("web-2"));
        for (text, what) in [
            ("t = []", "patterns"),
            ("t = [\"../x\"]", "contains"),
            ("\" t\" = [\"*\"]", "whitespace"),
            ("t = \"x\"", "invalid"),
        ] {
            let e = parse_token_grants(text, "t.toml").unwrap_err().to_string();
            assert!(e.contains(what) && e.contains("t.toml"), "{text}: {e}");
            assert!(!e.contains("\"t\""), "secret in error: {e}");
        }
    }

    #[test]
    fn empty_file_gives_defaults() {
        let c = PageServerConfig::from_toml_str("", "p.toml").unwrap();
        assert_eq!(c, PageServerConfig::default());
        assert_eq!(c.listen, vec![DEFAULT_LISTEN.to_string()]);
    }

    #[test]
    fn full_file_parses() {
        let c = PageServerConfig::from_toml_str(
            "store = \"/srv/ck\"\nlisten = [\"127.0.0.1:1\", \"unix:/run/p.sock\"]\n\
             criu_default = \"a-1\"\ncriu_header = \"4.1\"\ntoken_file = \"/etc/t\"\n\
             metrics = \"127.0.0.1:9\"\naccess_log = false\nmax_clients = 3\n\
             io_timeout_ms = 5\ncriu_push = false\nlazy_only = true\nbusy_poll_us = 0\n",
            "p.toml",
        )
        .unwrap();
        assert_eq!(c.busy_poll_us, 0);
        let e = PageServerConfig::from_toml_str("busy_poll_us = 1001\n", "/etc/p.toml")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("busy_poll_us") && e.contains("/etc/p.toml"),
            "{e}"
        );
        assert_eq!(c.criu_header, CriuHeader::V41);
        assert_eq!(c.listen.len(), 2);
        assert!(!c.access_log && c.lazy_only && !c.criu_push);
    }

    #[test]
    fn errors_name_key_and_file() {
        let e = PageServerConfig::from_toml_str("stor = \"/x\"\n", "/etc/p.toml").unwrap_err();
        assert!(e.to_string().contains("/etc/p.toml") && e.to_string().contains("stor"));
        for (text, key) in [
            ("store = \"rel\"", "store"),
            ("listen = []", "listen"),
            ("listen = [\"nope\"]", "listen"),
            ("listen = [\"unix:rel.sock\"]", "listen"),
            ("criu_default = \"../x\"", "criu_default"),
            ("metrics = \"x\"", "metrics"),
            ("max_clients = 0", "max_clients"),
            ("io_timeout_ms = 0", "io_timeout_ms"),
            ("criu_push_prefix = \"a/\"", "criu_push_prefix"),
        ] {
            let e = PageServerConfig::from_toml_str(text, "p.toml").unwrap_err();
            assert!(e.to_string().contains(key), "{text}: {e}");
        }
        let e = PageServerConfig::from_toml_str("criu_header = \"5\"", "p.toml").unwrap_err();
        assert!(e.to_string().contains("5"), "{e}");
    }

    #[test]
    fn client_config() {
        #[derive(Deserialize)]
        struct Wrap {
            pageserver: PageServerClientConfig,
        }
        let w: Wrap = toml::from_str("[pageserver]\naddress = \"unix:/run/p.sock\"\n").unwrap();
        w.pageserver.validate("s.toml", "pageserver.").unwrap();
        assert_eq!(w.pageserver.io_timeout_ms, 10_000);
        assert!(toml::from_str::<Wrap>("[pageserver]\nadress = \"x\"\n").is_err());
        let bad = PageServerClientConfig {
            address: "nohost".into(),
            ..Default::default()
        };
        let e = bad.validate("s.toml", "pageserver.").unwrap_err();
        assert!(e.to_string().contains("pageserver.address"), "{e}");
        let bad = PageServerClientConfig {
            max_connections: 0,
            ..Default::default()
        };
        assert!(bad.validate("s.toml", "pageserver.").is_err());
        assert_eq!(PageServerClientConfig::default().token().unwrap(), "");
    }

    #[test]
    fn checkpoint_ids() {
        for ok in ["a", "ckpt-1", "A.b_c-9", &"x".repeat(128)] {
            assert!(validate_checkpoint_id(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            ".",
            "..",
            "../etc",
            "a/b",
            "/abs",
            ".hidden",
            "-opt",
            "a b",
            "a\0b",
            "é",
            &"x".repeat(129),
        ] {
            assert!(validate_checkpoint_id(bad).is_err(), "{bad:?}");
        }
    }
}
