//! One typed configuration for the DistriProc shim and page server.
//!
//! Owns the TOML file format, defaults, validation and the enums that name modes and
//! policies. Does not own any behaviour: the runtime and shim read these values.

use serde::{Deserialize, Serialize};

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
