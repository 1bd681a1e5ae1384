//! The shim's error type and its one mapping onto ttrpc status codes.
//!
//! Every RPC's logic returns [`ShimError`]; the ttrpc layer converts it once with
//! `From<ShimError> for ttrpc::Error`, so the code containerd sees (NotFound, AlreadyExists,
//! FailedPrecondition, InvalidArgument, Unimplemented, Internal) is decided in one place.

use std::path::PathBuf;

use containerd_shim::protos::ttrpc::{self, Code};

/// Result alias for the shim.
pub type Result<T, E = ShimError> = std::result::Result<T, E>;

/// What went wrong, with the container id or path it went wrong on.
#[derive(Debug, thiserror::Error)]
pub enum ShimError {
    /// No container with this id in this shim.
    #[error("container {0} not found")]
    NotFound(String),
    /// No exec process with this id in the container.
    #[error("process {exec_id} of container {id} not found")]
    ProcessNotFound { id: String, exec_id: String },
    /// The process has already exited.
    #[error("process {exec_id:?} of container {id} already finished")]
    ProcessFinished { id: String, exec_id: String },
    /// Id already in use.
    #[error("{0} already exists")]
    AlreadyExists(String),
    /// The request is malformed.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// Runtime options of a type the shim does not understand.
    #[error("unsupported runtime options type {type_url:?} (accepted: containerd.runc.v1.Options, runtimeoptions.v1.Options)")]
    UnknownOptions { type_url: String },
    /// The operation is not valid in the process's current state.
    #[error("cannot {op} container {id} in state {state}")]
    FailedPrecondition {
        id: String,
        op: &'static str,
        state: String,
    },
    /// A checkpoint that would lose memory still remote, refused before or after the dump.
    #[error("checkpoint of {id} refused: {reason}")]
    CheckpointRefused { id: String, reason: String },
    /// A runc command failed.
    #[error("runc {verb} of {id} failed: {detail}")]
    Runc {
        verb: &'static str,
        id: String,
        detail: String,
    },
    /// A checkpoint failed; `log` is the copy of CRIU's dump.log.
    #[error("checkpoint of {id} failed: {detail} (criu log: {})", log.display())]
    Checkpoint {
        id: String,
        detail: String,
        log: PathBuf,
    },
    /// A restore failed; `log` is CRIU's restore.log (named only if CRIU got to write it).
    #[error("restore of {id} failed: {detail}{}", log_hint(log))]
    Restore {
        id: String,
        detail: String,
        log: PathBuf,
    },
    /// A file system or descriptor operation failed.
    #[error("{context} {}: {source}", path.display())]
    Io {
        context: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A shim grouping annotation has a value the shim refuses to use.
    #[error("annotation {annotation}={value:?} is not a valid shim group: {reason}")]
    InvalidGroup {
        annotation: &'static str,
        value: String,
        reason: String,
    },
    /// The RPC is not served by this shim.
    #[error("{0} is not implemented by the distriproc shim")]
    Unimplemented(&'static str),
    /// The rootfs could not be mounted.
    #[error("mount rootfs of {id}: {detail}")]
    Mount { id: String, detail: String },
    /// A signal could not be sent to an exec process.
    #[error("kill {id}/{exec_id}: {errno}")]
    Signal {
        id: String,
        exec_id: String,
        errno: nix::errno::Errno,
    },
    /// A file the shim or runc wrote holds what it cannot parse (pid file, options).
    #[error("bad {what} {}: {detail}", path.display())]
    BadFile {
        what: &'static str,
        path: PathBuf,
        detail: String,
    },
    /// No memory cgroup could be found for the process.
    #[error("no memory cgroup for pid {pid} in {path}")]
    NoMemoryCgroup { pid: u32, path: String },
    /// A lazy restore could not be set up (its fetcher, keeper or CRIU's daemon).
    #[error("lazy restore {from}: {detail}")]
    LazyRestore { from: String, detail: String },
    /// The page server cannot serve the checkpoint a restore names.
    #[error("remote checkpoint {checkpoint:?} at page server {endpoint}: {detail}")]
    RemoteCheckpoint {
        checkpoint: String,
        endpoint: String,
        detail: String,
    },
    /// A checkpoint's dump could not be completed with the pages still remote.
    #[error("checkpoint of {id}: completing the dump in {} with the pages still remote failed: {detail}", dir.display())]
    CompleteDump {
        id: String,
        dir: PathBuf,
        detail: String,
    },
    /// A checkpoint's memory could not be stored where its configuration says.
    #[error("checkpoint of {id}: storing its memory {to} failed: {detail}")]
    Publish {
        id: String,
        to: String,
        detail: String,
    },
    /// A task the RPC handed work to ended abnormally (panicked or was cancelled).
    #[error("{what}: {source}")]
    Background {
        what: String,
        #[source]
        source: tokio::task::JoinError,
    },
    /// containerd-shim's own helpers (cgroups, metrics, the exit monitor).
    #[error("containerd-shim: {0}")]
    Shim(#[from] containerd_shim::Error),
}

fn log_hint(log: &std::path::Path) -> String {
    if log.exists() {
        format!(" (criu log: {})", log.display())
    } else {
        String::new()
    }
}

impl ShimError {
    /// Shorthand for an [`ShimError::Io`].
    pub fn io(context: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        ShimError::Io {
            context,
            path: path.into(),
            source,
        }
    }

    /// The ttrpc code this error maps to.
    pub fn code(&self) -> Code {
        match self {
            ShimError::NotFound(_)
            | ShimError::ProcessNotFound { .. }
            | ShimError::ProcessFinished { .. } => Code::NOT_FOUND,
            ShimError::AlreadyExists(_) => Code::ALREADY_EXISTS,
            ShimError::InvalidArgument(_)
            | ShimError::UnknownOptions { .. }
            | ShimError::InvalidGroup { .. } => Code::INVALID_ARGUMENT,
            ShimError::FailedPrecondition { .. } | ShimError::CheckpointRefused { .. } => {
                Code::FAILED_PRECONDITION
            }
            ShimError::Unimplemented(_) => Code::UNIMPLEMENTED,
            ShimError::Runc { .. }
            | ShimError::Checkpoint { .. }
            | ShimError::Restore { .. }
            | ShimError::Io { .. }
            | ShimError::Mount { .. }
            | ShimError::Signal { .. }
            | ShimError::BadFile { .. }
            | ShimError::NoMemoryCgroup { .. }
            | ShimError::LazyRestore { .. }
            | ShimError::RemoteCheckpoint { .. }
            | ShimError::CompleteDump { .. }
            | ShimError::Publish { .. }
            | ShimError::Background { .. }
            | ShimError::Shim(_) => Code::INTERNAL,
        }
    }
}

impl From<ShimError> for ttrpc::Error {
    fn from(e: ShimError) -> Self {
        ttrpc::Error::RpcStatus(ttrpc::get_status(e.code(), e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn code_of(e: ShimError) -> Code {
        match ttrpc::Error::from(e) {
            ttrpc::Error::RpcStatus(s) => s.code(),
            other => panic!("not a status: {other:?}"),
        }
    }

    #[test]
    fn not_found() {
        assert_eq!(code_of(ShimError::NotFound("c".into())), Code::NOT_FOUND);
        let e = ShimError::ProcessNotFound {
            id: "c".into(),
            exec_id: "e".into(),
        };
        assert_eq!(code_of(e), Code::NOT_FOUND);
        let e = ShimError::ProcessFinished {
            id: "c".into(),
            exec_id: String::new(),
        };
        assert_eq!(code_of(e), Code::NOT_FOUND);
    }

    #[test]
    fn already_exists() {
        assert_eq!(
            code_of(ShimError::AlreadyExists("c".into())),
            Code::ALREADY_EXISTS
        );
    }

    #[test]
    fn invalid_argument() {
        assert_eq!(
            code_of(ShimError::InvalidArgument("x".into())),
            Code::INVALID_ARGUMENT
        );
        let e = ShimError::UnknownOptions {
            type_url: "foo.Bar".into(),
        };
        assert!(e.to_string().contains("foo.Bar"));
        assert_eq!(code_of(e), Code::INVALID_ARGUMENT);
    }

    #[test]
    fn failed_precondition() {
        let e = ShimError::FailedPrecondition {
            id: "c".into(),
            op: "pause",
            state: "stopped".into(),
        };
        assert_eq!(e.to_string(), "cannot pause container c in state stopped");
        assert_eq!(code_of(e), Code::FAILED_PRECONDITION);
    }

    #[test]
    fn unimplemented() {
        assert_eq!(
            code_of(ShimError::Unimplemented("Frobnicate")),
            Code::UNIMPLEMENTED
        );
    }

    #[test]
    fn internal() {
        let e = ShimError::Restore {
            id: "c".into(),
            detail: "runc exited 1".into(),
            log: "/nonexistent/restore.log".into(),
        };
        assert_eq!(e.to_string(), "restore of c failed: runc exited 1");
        assert_eq!(code_of(e), Code::INTERNAL);
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("restore.log");
        std::fs::write(&log, "x").unwrap();
        let e = ShimError::Restore {
            id: "c".into(),
            detail: "runc exited 1".into(),
            log: log.clone(),
        };
        assert!(e
            .to_string()
            .ends_with(&format!("(criu log: {})", log.display())));
        let e = ShimError::io(
            "open",
            "/x",
            std::io::Error::from_raw_os_error(libc::ENOENT),
        );
        assert_eq!(code_of(e), Code::INTERNAL);
        let e = ShimError::Signal {
            id: "c".into(),
            exec_id: "e".into(),
            errno: nix::errno::Errno::EPERM,
        };
        assert_eq!(e.to_string(), "kill c/e: EPERM: Operation not permitted");
        assert_eq!(code_of(e), Code::INTERNAL);
    }
}
