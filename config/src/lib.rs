//! One typed configuration for the DistriProc shim and page server.
//!
//! Owns the TOML file format, the defaults, validation with errors that name the key and the
//! file, the enums that name modes and policies, and the per-container annotations that
//! override them. It owns no behaviour: the runtime and the shim read these values.
//!
//! ```toml
//! # /etc/distriproc/shim.toml (every key optional; these are the defaults)
//! [fetcher]
//! mode = "native"              # native | criu
//! fill = "full"                # full | profile | none
//! fault_around_pages = 16      # aligned window installed around a random fault (power of two)
//! prefetch_max_pages = 256     # largest sequential/stride prefetch window (0 = off)
//! fill_batch_pages = 256       # pages per background-fill step (demand faults pre-empt it)
//! fill_threads = 2             # background fill workers
//! fault_threads = 1            # threads serving demand faults (raise to ~4 with a page server)
//! handshake_timeout_ms = 30000 # CRIU must hand over every task's userfaultfd within this
//! profile_dir = "/var/lib/distriproc/profiles"  # working-set profiles (fill = "profile")
//! profile_window_ms = 10000    # how long a first restore records its working set
//! track_writes = true          # uffd write-protect: re-checkpoints send only written pages
//! memory_budget = 0            # local memory per restored container: bytes or "256Mi"; 0 = unlimited
//! writeback = true             # push written pages to the page server (pages from a page server only)
//! writeback_interval_ms = 0    # ... this often (0 = only when the memory budget needs room)
//!
//! [pageserver]                 # optional: where remote checkpoints' pages live
//! address = ""                 # HOST:PORT or unix:PATH; empty = embedded default (local pages)
//! token_file = ""              # file holding the shared token
//! connect_timeout_ms = 5000
//! io_timeout_ms = 10000
//! retry_timeout_ms = 30000
//! max_connections = 8
//!
//! [store]                     # where checkpoints' memory lives without a page server
//! dir = "/var/lib/distriproc/store"  # node-local page store (a page server store directory)
//! mode = "local"               # local: pages in the store | inline: pages in containerd's tar
//! gc_interval_s = 600          # free entries no containerd image holds (0 = never)
//! gc_grace_s = 300             # never free an entry younger than this
//! gc_keep_namespaces = ["moby", "k8s.io"]  # checkpoints held outside containerd's images
//!
//! [runc]
//! binary = "runc"              # name or path of the runc binary
//! root = "/run/containerd/runc"
//! criu = ""                    # criu binary for runc (empty: runc's default, from PATH)
//! ```

pub mod pageserver;
mod size;

pub use size::ByteSize;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Environment variable that names the shim's configuration file.
pub const CONFIG_ENV: &str = "DISTRIPROC_CONFIG";
/// Where the shim looks for its configuration file when [`CONFIG_ENV`] is unset.
pub const DEFAULT_SHIM_CONFIG_PATH: &str = "/etc/distriproc/shim.toml";
/// Annotation that overrides `fetcher.fill` for one container.
pub const ANNOTATION_FILL: &str = "io.distriproc.fill-policy";
/// Annotation that overrides `fetcher.memory_budget` for one container (`"256Mi"`, bytes).
pub const ANNOTATION_MEMORY_BUDGET: &str = "io.distriproc.memory-budget";
/// Annotation that overrides `fetcher.writeback` for one container (`true`, `false`).
pub const ANNOTATION_WRITEBACK: &str = "io.distriproc.writeback";
/// Annotation that overrides `fetcher.writeback_interval_ms` for one container.
pub const ANNOTATION_WRITEBACK_INTERVAL: &str = "io.distriproc.writeback-interval-ms";
/// Shortest `fetcher.writeback_interval_ms` other than 0.
pub const MIN_WRITEBACK_INTERVAL_MS: u64 = 100;
/// Annotation that overrides `fetcher.mode` for one container.
pub const ANNOTATION_MODE: &str = "io.distriproc.fetcher-mode";

/// Limits on numeric keys, checked by [`ShimConfig::validate`].
pub const MAX_FAULT_AROUND_PAGES: u32 = 512;
/// Largest background-fill step.
pub const MAX_FILL_BATCH_PAGES: u32 = 4096;
/// Largest prefetch window.
pub const MAX_PREFETCH_PAGES: u32 = 2048;
/// Most fill or fault threads.
pub const MAX_FETCHER_THREADS: u32 = 16;

/// How a lazily restored container's memory is filled after the restore.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FillPolicy {
    /// Fetch every page in the background until the container's memory is all local.
    #[default]
    Full,
    /// Prefetch the working set recorded by earlier restores first, then the rest.
    Profile,
    /// Remote-resident: only touched pages ever move.
    None,
}

impl std::str::FromStr for FillPolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "full" => Ok(Self::Full),
            "profile" => Ok(Self::Profile),
            "none" => Ok(Self::None),
            other => Err(format!(
                "unknown fill policy {other:?} (expected full, profile or none)"
            )),
        }
    }
}

/// Who serves the restored processes' userfaultfd page faults.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FetcherMode {
    /// The in-shim userfaultfd fetcher.
    #[default]
    Native,
    /// CRIU's own `criu lazy-pages` daemon (fallback and benchmark baseline).
    Criu,
}

impl std::str::FromStr for FetcherMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "native" => Ok(Self::Native),
            "criu" => Ok(Self::Criu),
            other => Err(format!(
                "unknown fetcher mode {other:?} (expected native or criu)"
            )),
        }
    }
}

/// `[fetcher]`: the lazy-restore fetcher.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FetcherConfig {
    pub mode: FetcherMode,
    pub fill: FillPolicy,
    pub fault_around_pages: u32,
    pub prefetch_max_pages: u32,
    pub fill_batch_pages: u32,
    pub fill_threads: u32,
    pub fault_threads: u32,
    pub handshake_timeout_ms: u64,
    pub profile_dir: PathBuf,
    pub profile_window_ms: u64,
    pub track_writes: bool,
    /// Local memory a lazily restored container may hold of its checkpoint's pages (0 =
    /// unlimited): beyond it, clean pages are evicted back to remote.
    pub memory_budget: ByteSize,
    /// Whether the pages a container restored from a page server wrote are pushed back to it
    /// (write-back layers), when the budget needs room or every `writeback_interval_ms`.
    pub writeback: bool,
    /// How often the pages a remote-resident container wrote are pushed to the page server as
    /// a write-back layer (0 = only when the memory budget needs room).
    pub writeback_interval_ms: u64,
}

impl Default for FetcherConfig {
    fn default() -> Self {
        Self {
            mode: FetcherMode::Native,
            fill: FillPolicy::Full,
            fault_around_pages: 16,
            prefetch_max_pages: 256,
            fill_batch_pages: 256,
            fill_threads: 2,
            fault_threads: 1,
            handshake_timeout_ms: 30_000,
            profile_dir: PathBuf::from("/var/lib/distriproc/profiles"),
            profile_window_ms: 10_000,
            track_writes: true,
            memory_budget: ByteSize(0),
            writeback: true,
            writeback_interval_ms: 0,
        }
    }
}

/// `[runc]`: how the shim runs runc.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RuncConfig {
    pub binary: String,
    pub root: PathBuf,
    pub criu: String,
}

impl Default for RuncConfig {
    fn default() -> Self {
        Self {
            binary: "runc".into(),
            root: PathBuf::from("/run/containerd/runc"),
            criu: String::new(),
        }
    }
}

/// The shim's whole configuration file.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ShimConfig {
    pub fetcher: FetcherConfig,
    pub runc: RuncConfig,
    pub pageserver: pageserver::PageServerClientConfig,
    pub store: StoreConfig,
}

/// Annotation that overrides `store.mode` for one container (`local` or `inline`).
pub const ANNOTATION_STORE_MODE: &str = "io.distriproc.checkpoint-store";

/// Where a checkpoint's memory goes when no page server takes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreMode {
    /// Into the node-local page store; containerd's checkpoint holds CRIU's metadata and a
    /// reference.
    #[default]
    Local,
    /// Inside containerd's checkpoint (self-contained, e.g. to push to a registry).
    Inline,
}

impl std::str::FromStr for StoreMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "local" => Ok(Self::Local),
            "inline" => Ok(Self::Inline),
            other => Err(format!(
                "unknown store mode {other:?} (expected local or inline)"
            )),
        }
    }
}

/// The `[store]` section: the node-local page store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StoreConfig {
    /// The store directory (the same layout a page server serves).
    pub dir: PathBuf,
    /// Where checkpoints' memory goes without a page server.
    pub mode: StoreMode,
    /// How often a shim sweeps the store for entries no containerd image holds any more (and
    /// after each checkpoint into it); 0 = never (`distriproc-pageserver delete` only).
    pub gc_interval_s: u64,
    /// An entry younger than this is never freed (containerd creates the image holding a
    /// checkpoint only after the shim's Checkpoint returns).
    pub gc_grace_s: u64,
    /// Namespaces whose checkpoints are never freed by the sweep: their owners keep the
    /// checkpoint outside containerd's images (Docker's checkpoint directories, CRI archives).
    pub gc_keep_namespaces: Vec<String>,
}

/// Default of `store.dir`.
pub const DEFAULT_STORE_DIR: &str = "/var/lib/distriproc/store";

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            dir: PathBuf::from(DEFAULT_STORE_DIR),
            mode: StoreMode::Local,
            gc_interval_s: 600,
            gc_grace_s: 300,
            gc_keep_namespaces: vec!["moby".into(), "k8s.io".into()],
        }
    }
}

/// A configuration that could not be read or is invalid. Always names where it came from.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid config {origin}: {message}")]
    Parse { origin: String, message: String },
    #[error("invalid config {origin}: key `{key}`: {message}")]
    Invalid {
        origin: String,
        key: String,
        message: String,
    },
}

/// Deserializes TOML text; a syntax error, an unknown key or a bad value names `origin`.
pub(crate) fn parse_toml<T: serde::de::DeserializeOwned>(
    text: &str,
    origin: &str,
) -> Result<T, ConfigError> {
    toml::from_str(text).map_err(|e| ConfigError::Parse {
        origin: origin.to_string(),
        message: e.to_string().trim().replace('\n', " "),
    })
}

/// Reads a configuration file; the error names it.
pub(crate) fn read_config_file(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })
}

impl ShimConfig {
    /// Parses and validates TOML text; `origin` names the file (or "runtime options") in errors.
    pub fn from_toml_str(text: &str, origin: &str) -> Result<Self, ConfigError> {
        let cfg: ShimConfig = parse_toml(text, origin)?;
        cfg.validate(origin)?;
        Ok(cfg)
    }

    /// Reads and validates a TOML file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        Self::from_toml_str(&read_config_file(path)?, &path.display().to_string())
    }

    /// The file named by `$DISTRIPROC_CONFIG`, else [`DEFAULT_SHIM_CONFIG_PATH`] if it exists,
    /// else the defaults. A file named by the environment must exist.
    pub fn load_default() -> Result<Self, ConfigError> {
        if let Some(p) = std::env::var_os(CONFIG_ENV).filter(|p| !p.is_empty()) {
            return Self::load(Path::new(&p));
        }
        let default = Path::new(DEFAULT_SHIM_CONFIG_PATH);
        if default.exists() {
            return Self::load(default);
        }
        Ok(Self::default())
    }

    /// Checks value ranges; the error names the key.
    pub fn validate(&self, origin: &str) -> Result<(), ConfigError> {
        let invalid = |key: &str, message: String| ConfigError::Invalid {
            origin: origin.to_string(),
            key: key.to_string(),
            message,
        };
        let f = &self.fetcher;
        if f.writeback_interval_ms != 0 && f.writeback_interval_ms < MIN_WRITEBACK_INTERVAL_MS {
            return Err(invalid(
                "fetcher.writeback_interval_ms",
                format!(
                    "{} ms: 0 (off) or at least {MIN_WRITEBACK_INTERVAL_MS}",
                    f.writeback_interval_ms
                ),
            ));
        }
        if !f.fault_around_pages.is_power_of_two() || f.fault_around_pages > MAX_FAULT_AROUND_PAGES
        {
            return Err(invalid(
                "fetcher.fault_around_pages",
                format!(
                    "{} is not a power of two in 1..={MAX_FAULT_AROUND_PAGES}",
                    f.fault_around_pages
                ),
            ));
        }
        let p = f.prefetch_max_pages;
        if p != 0 && (!p.is_power_of_two() || p < f.fault_around_pages || p > MAX_PREFETCH_PAGES) {
            return Err(invalid(
                "fetcher.prefetch_max_pages",
                format!(
                    "{p} must be 0 or a power of two between fetcher.fault_around_pages ({}) \
                     and {MAX_PREFETCH_PAGES}",
                    f.fault_around_pages
                ),
            ));
        }
        for (key, v) in [
            ("fetcher.fill_threads", f.fill_threads),
            ("fetcher.fault_threads", f.fault_threads),
        ] {
            if v == 0 || v > MAX_FETCHER_THREADS {
                return Err(invalid(
                    key,
                    format!("{v} is out of range 1..={MAX_FETCHER_THREADS}"),
                ));
            }
        }
        if !f.profile_dir.is_absolute() {
            return Err(invalid(
                "fetcher.profile_dir",
                format!("{} is not an absolute path", f.profile_dir.display()),
            ));
        }
        if f.fill_batch_pages == 0 || f.fill_batch_pages > MAX_FILL_BATCH_PAGES {
            return Err(invalid(
                "fetcher.fill_batch_pages",
                format!(
                    "{} is out of range 1..={MAX_FILL_BATCH_PAGES}",
                    f.fill_batch_pages
                ),
            ));
        }
        if f.handshake_timeout_ms == 0 {
            return Err(invalid(
                "fetcher.handshake_timeout_ms",
                "must be greater than 0".into(),
            ));
        }
        if self.runc.binary.is_empty() {
            return Err(invalid("runc.binary", "must not be empty".into()));
        }
        if !self.runc.root.is_absolute() {
            return Err(invalid(
                "runc.root",
                format!("{} is not an absolute path", self.runc.root.display()),
            ));
        }
        self.pageserver.validate(origin, "pageserver.")?;
        if !self.store.dir.is_absolute() {
            return Err(invalid(
                "store.dir",
                format!("{} is not an absolute path", self.store.dir.display()),
            ));
        }
        if self.store.gc_grace_s == 0 {
            return Err(invalid(
                "store.gc_grace_s",
                "must be at least 1: containerd creates the image that holds a checkpoint \
                 only after the shim's Checkpoint returned"
                    .into(),
            ));
        }
        if self.store.gc_keep_namespaces.iter().any(|n| n.is_empty()) {
            return Err(invalid(
                "store.gc_keep_namespaces",
                "a namespace must not be empty".into(),
            ));
        }
        Ok(())
    }

    /// Applies the per-container annotations ([`ANNOTATION_FILL`], [`ANNOTATION_MODE`],
    /// [`ANNOTATION_MEMORY_BUDGET`], [`ANNOTATION_WRITEBACK`], [`ANNOTATION_WRITEBACK_INTERVAL`],
    /// [`ANNOTATION_STORE_MODE`]).
    pub fn apply_annotations(
        &mut self,
        annotations: &HashMap<String, String>,
    ) -> Result<(), ConfigError> {
        let invalid = |key: &str, message: String| ConfigError::Invalid {
            origin: "annotations".into(),
            key: key.into(),
            message,
        };
        if let Some(v) = annotations.get(ANNOTATION_FILL) {
            self.fetcher.fill = v.parse().map_err(|m| invalid(ANNOTATION_FILL, m))?;
        }
        if let Some(v) = annotations.get(ANNOTATION_MEMORY_BUDGET) {
            self.fetcher.memory_budget = v
                .parse()
                .map_err(|m| invalid(ANNOTATION_MEMORY_BUDGET, m))?;
        }
        if let Some(v) = annotations.get(ANNOTATION_WRITEBACK) {
            self.fetcher.writeback = match v.trim() {
                "true" => true,
                "false" => false,
                other => {
                    return Err(invalid(
                        ANNOTATION_WRITEBACK,
                        format!("{other:?}: expected true or false"),
                    ))
                }
            };
        }
        if let Some(v) = annotations.get(ANNOTATION_WRITEBACK_INTERVAL) {
            let ms: u64 = v.trim().parse().map_err(|e| {
                invalid(
                    ANNOTATION_WRITEBACK_INTERVAL,
                    format!("{v:?}: {e} (milliseconds expected)"),
                )
            })?;
            if ms != 0 && ms < MIN_WRITEBACK_INTERVAL_MS {
                return Err(invalid(
                    ANNOTATION_WRITEBACK_INTERVAL,
                    format!("{ms} ms: 0 (off) or at least {MIN_WRITEBACK_INTERVAL_MS}"),
                ));
            }
            self.fetcher.writeback_interval_ms = ms;
        }
        if let Some(v) = annotations.get(ANNOTATION_MODE) {
            self.fetcher.mode = v.parse().map_err(|m| invalid(ANNOTATION_MODE, m))?;
        }
        if let Some(v) = annotations.get(ANNOTATION_STORE_MODE) {
            self.store.mode = v
                .trim()
                .parse()
                .map_err(|m| invalid(ANNOTATION_STORE_MODE, m))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_gives_defaults() {
        let cfg = ShimConfig::from_toml_str("", "t.toml").unwrap();
        assert_eq!(cfg, ShimConfig::default());
        assert_eq!(cfg.fetcher.fill, FillPolicy::Full);
        assert_eq!(cfg.fetcher.mode, FetcherMode::Native);
    }

    #[test]
    fn full_file_parses() {
        let cfg = ShimConfig::from_toml_str(
            "[fetcher]\nmode = \"criu\"\nfill = \"none\"\nfault_around_pages = 1\n\
             fill_batch_pages = 1024\nhandshake_timeout_ms = 5\nmemory_budget = \"1Gi\"\n\
             [runc]\nbinary = \"/usr/sbin/runc\"\nroot = \"/run/x\"\ncriu = \"/usr/local/sbin/criu\"\n",
            "t.toml",
        )
        .unwrap();
        assert_eq!(cfg.fetcher.mode, FetcherMode::Criu);
        assert_eq!(cfg.fetcher.fill, FillPolicy::None);
        assert_eq!(cfg.fetcher.fill_batch_pages, 1024);
        assert_eq!(cfg.fetcher.memory_budget, ByteSize(1 << 30));
        assert_eq!(cfg.runc.root, PathBuf::from("/run/x"));
        let n = ShimConfig::from_toml_str("[fetcher]\nmemory_budget = 4096\n", "t.toml").unwrap();
        assert_eq!(n.fetcher.memory_budget, ByteSize(4096));
        let bad = ShimConfig::from_toml_str("[fetcher]\nmemory_budget = \"4MB\"\n", "t.toml");
        assert!(bad.unwrap_err().to_string().contains("memory_budget"));
    }

    #[test]
    fn unknown_key_is_refused_with_its_name_and_file() {
        let err =
            ShimConfig::from_toml_str("[fetcher]\nfil = \"full\"\n", "/etc/x.toml").unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("/etc/x.toml"), "{msg}");
        assert!(msg.contains("fil"), "{msg}");
    }

    #[test]
    fn bad_enum_value_is_refused() {
        let err = ShimConfig::from_toml_str("[fetcher]\nfill = \"some\"\n", "a.toml").unwrap_err();
        assert!(err.to_string().contains("some"), "{err}");
    }

    #[test]
    fn out_of_range_value_names_the_key() {
        let err =
            ShimConfig::from_toml_str("[fetcher]\nfault_around_pages = 3\n", "a.toml").unwrap_err();
        assert!(
            err.to_string().contains("fetcher.fault_around_pages"),
            "{err}"
        );
        let err =
            ShimConfig::from_toml_str("[fetcher]\nprefetch_max_pages = 8\n", "a.toml").unwrap_err();
        assert!(
            err.to_string().contains("fetcher.prefetch_max_pages"),
            "{err}"
        );
        let err = ShimConfig::from_toml_str("[fetcher]\nwriteback_interval_ms = 5\n", "a.toml")
            .unwrap_err();
        assert!(
            err.to_string().contains("fetcher.writeback_interval_ms"),
            "{err}"
        );
        let err = ShimConfig::from_toml_str("[fetcher]\nfill_threads = 0\n", "a.toml").unwrap_err();
        assert!(err.to_string().contains("fetcher.fill_threads"), "{err}");
        let err =
            ShimConfig::from_toml_str("[pageserver]\naddress = \"nope\"\n", "a.toml").unwrap_err();
        assert!(err.to_string().contains("pageserver.address"), "{err}");
        let err = ShimConfig::from_toml_str("[runc]\nroot = \"rel\"\n", "a.toml").unwrap_err();
        assert!(err.to_string().contains("runc.root"), "{err}");
    }

    #[test]
    fn annotations_override_and_are_validated() {
        let mut cfg = ShimConfig::default();
        let mut ann = HashMap::new();
        ann.insert(ANNOTATION_FILL.to_string(), "none".to_string());
        ann.insert(ANNOTATION_MODE.to_string(), "criu".to_string());
        cfg.apply_annotations(&ann).unwrap();
        assert_eq!(cfg.fetcher.fill, FillPolicy::None);
        assert_eq!(cfg.fetcher.mode, FetcherMode::Criu);
        ann.insert(ANNOTATION_MEMORY_BUDGET.to_string(), "256Mi".to_string());
        cfg.apply_annotations(&ann).unwrap();
        assert_eq!(cfg.fetcher.memory_budget, ByteSize(256 << 20));
        ann.insert(ANNOTATION_MEMORY_BUDGET.to_string(), "lots".to_string());
        let err = cfg.apply_annotations(&ann).unwrap_err();
        assert!(err.to_string().contains(ANNOTATION_MEMORY_BUDGET), "{err}");
        ann.remove(ANNOTATION_MEMORY_BUDGET);
        ann.insert(
            ANNOTATION_WRITEBACK_INTERVAL.to_string(),
            "2000".to_string(),
        );
        cfg.apply_annotations(&ann).unwrap();
        assert_eq!(cfg.fetcher.writeback_interval_ms, 2000);
        for bad in ["20", "soon"] {
            ann.insert(ANNOTATION_WRITEBACK_INTERVAL.to_string(), bad.to_string());
            let err = cfg.apply_annotations(&ann).unwrap_err();
            assert!(
                err.to_string().contains(ANNOTATION_WRITEBACK_INTERVAL),
                "{err}"
            );
        }
        ann.remove(ANNOTATION_WRITEBACK_INTERVAL);
        ann.insert(ANNOTATION_WRITEBACK.to_string(), "false".to_string());
        cfg.apply_annotations(&ann).unwrap();
        assert!(!cfg.fetcher.writeback);
        ann.insert(ANNOTATION_WRITEBACK.to_string(), "no".to_string());
        let err = cfg.apply_annotations(&ann).unwrap_err();
        assert!(err.to_string().contains(ANNOTATION_WRITEBACK), "{err}");
        ann.remove(ANNOTATION_WRITEBACK);
        ann.insert(ANNOTATION_FILL.to_string(), "lots".to_string());
        let err = cfg.apply_annotations(&ann).unwrap_err();
        assert!(err.to_string().contains(ANNOTATION_FILL), "{err}");
    }

    #[test]
    fn load_reports_missing_file() {
        let err = ShimConfig::load(Path::new("/nonexistent/distriproc.toml")).unwrap_err();
        assert!(
            err.to_string().contains("/nonexistent/distriproc.toml"),
            "{err}"
        );
    }

    #[test]
    fn load_reads_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("shim.toml");
        std::fs::write(&p, "[fetcher]\nfill = \"profile\"\n").unwrap();
        assert_eq!(
            ShimConfig::load(&p).unwrap().fetcher.fill,
            FillPolicy::Profile
        );
    }
}
