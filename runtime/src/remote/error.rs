//! The page-server client's errors, each naming the endpoint.

use std::io;
use std::path::PathBuf;
use std::time::Duration;

use crate::protocol::{ProtocolError, RangeStatus};

/// Errors of the page-server client. Each names the endpoint.
#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    /// An option is out of range.
    #[error("invalid page-server client option {name}: {why}")]
    BadOption {
        /// The option.
        name: &'static str,
        /// What is wrong.
        why: String,
    },
    /// The connection could not be established.
    #[error("cannot connect to page server {endpoint}")]
    Connect {
        /// The endpoint.
        endpoint: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The session broke or the server said something invalid.
    #[error("page server {endpoint}, checkpoint {checkpoint:?}")]
    Protocol {
        /// The endpoint.
        endpoint: String,
        /// The checkpoint.
        checkpoint: String,
        /// What went wrong.
        #[source]
        source: ProtocolError,
    },
    /// The server refused a range.
    #[error("page server {endpoint}, checkpoint {checkpoint:?}: {status} for pid {pid}, {nr_pages} pages at {vaddr:#x}")]
    Range {
        /// The endpoint.
        endpoint: String,
        /// The checkpoint.
        checkpoint: String,
        /// Why.
        status: RangeStatus,
        /// Task.
        pid: u32,
        /// Dump-time address.
        vaddr: u64,
        /// Pages asked for.
        nr_pages: u32,
    },
    /// Every connection stayed busy longer than the I/O timeout.
    #[error("page server {endpoint}: no free connection within {after:?} ({max} in use)")]
    PoolTimeout {
        /// The endpoint.
        endpoint: String,
        /// The wait.
        after: Duration,
        /// The pool size.
        max: usize,
    },
    /// A local file of an upload could not be read.
    #[error("cannot read {} for the upload", path.display())]
    Upload {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Transport failures persisted past the retry timeout.
    #[error(
        "page server {endpoint} unreachable: gave up after {attempts} attempts in {elapsed:?}"
    )]
    GaveUp {
        /// The endpoint.
        endpoint: String,
        /// Attempts made.
        attempts: u32,
        /// Time since the first failure.
        elapsed: Duration,
        /// The last failure.
        #[source]
        last: Box<RemoteError>,
    },
}

impl RemoteError {
    /// A failure of the connection (retried on a new one), not an answer of the server.
    pub(crate) fn is_transport(&self) -> bool {
        match self {
            RemoteError::Connect { .. } => true,
            RemoteError::Protocol { source, .. } => source.is_transport(),
            _ => false,
        }
    }
}
