//! The process layer: what the shim asks of the OCI runtime for one container, behind
//! [`OciRuntime`]. Production uses runc ([`crate::runc::RuncClient`], through [`Runc`]); the
//! task logic's unit tests use a stub, so they run without spawning anything.
//!
//! Each method returns a [`ShimError`] that already names the verb and the container and
//! carries the runtime's own log tail; [`OciRuntime::kill`] reports a process that is no longer
//! running as [`ShimError::ProcessFinished`], and [`OciRuntime::delete`] a container the
//! runtime no longer knows as success.

use std::ffi::OsString;
use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;

use async_trait::async_trait;
use oci_spec::runtime::{LinuxResources, Process};
use runc::options::{CreateOpts, DeleteOpts, ExecOpts, KillOpts};

use crate::error::{Result, ShimError};
use crate::options::ShimOptions;
use crate::runc::{RawOutput, RuncClient};

/// The OCI runtime of one container.
#[async_trait]
pub trait OciRuntime: Send + Sync + std::fmt::Debug {
    /// `create`: the init process exists, stopped before the user's program, its pid in
    /// `opts.pid_file`.
    async fn create(&self, id: &str, bundle: &Path, opts: &CreateOpts) -> Result<()>;
    /// `start` of a created container.
    async fn start(&self, id: &str) -> Result<()>;
    /// `exec --detach` of `spec`, its pid in `opts.pid_file`.
    async fn exec(&self, id: &str, spec: &Process, opts: &ExecOpts) -> Result<()>;
    /// `kill` of the init process (of every process with `all`).
    async fn kill(&self, id: &str, signal: u32, all: bool) -> Result<()>;
    /// `delete --force`.
    async fn delete(&self, id: &str) -> Result<()>;
    /// `ps`: the pids of the container.
    async fn ps(&self, id: &str) -> Result<Vec<u32>>;
    /// `pause` (freeze).
    async fn pause(&self, id: &str) -> Result<()>;
    /// `resume` (thaw).
    async fn resume(&self, id: &str) -> Result<()>;
    /// `update --resources`.
    async fn update(&self, id: &str, resources: &LinuxResources) -> Result<()>;
    /// The runtime with `args` after its global options (checkpoint and restore, whose command
    /// lines the shim builds), with the given stdio (None: null stdin, piped output).
    async fn run_raw(
        &self,
        args: Vec<OsString>,
        stdio: Option<(Stdio, Stdio, Stdio)>,
    ) -> Result<RawOutput>;
    /// `base` with the last messages of the runtime's log, for error reports.
    fn with_log_tail(&self, base: String) -> String;
}

/// Makes the [`OciRuntime`] of each container at Create.
pub trait RuntimeFactory: Send + Sync {
    /// The runtime for the container in `bundle`, as its options say.
    fn for_container(
        &self,
        opts: &ShimOptions,
        namespace: &str,
        bundle: &Path,
    ) -> Result<Arc<dyn OciRuntime>>;
}

/// runc, as the runtime options name it (binary, root, systemd cgroups, criu).
#[derive(Debug, Default, Clone, Copy)]
pub struct Runc;

impl RuntimeFactory for Runc {
    fn for_container(
        &self,
        opts: &ShimOptions,
        namespace: &str,
        bundle: &Path,
    ) -> Result<Arc<dyn OciRuntime>> {
        Ok(Arc::new(RuncClient::new(opts, namespace, bundle)?))
    }
}

impl RuncClient {
    fn failed(&self, verb: &'static str, id: &str, e: &runc::error::Error) -> ShimError {
        ShimError::Runc {
            verb,
            id: id.to_owned(),
            detail: self.describe(e),
        }
    }
}

#[async_trait]
impl OciRuntime for RuncClient {
    async fn create(&self, id: &str, bundle: &Path, opts: &CreateOpts) -> Result<()> {
        self.runc
            .create(id, bundle, Some(opts))
            .await
            .map(|_| ())
            .map_err(|e| self.failed("create", id, &e))
    }

    async fn start(&self, id: &str) -> Result<()> {
        self.runc
            .start(id)
            .await
            .map(|_| ())
            .map_err(|e| self.failed("start", id, &e))
    }

    async fn exec(&self, id: &str, spec: &Process, opts: &ExecOpts) -> Result<()> {
        self.runc
            .exec(id, spec, Some(opts))
            .await
            .map_err(|e| self.failed("exec", id, &e))
    }

    async fn kill(&self, id: &str, signal: u32, all: bool) -> Result<()> {
        let opts = KillOpts::new().all(all);
        match self.runc.kill(id, signal, Some(&opts)).await {
            Ok(()) => Ok(()),
            Err(e) => {
                let detail = self.describe(&e);
                let lower = detail.to_lowercase();
                if lower.contains("not running")
                    || lower.contains("already finished")
                    || lower.contains("no such process")
                {
                    return Err(ShimError::ProcessFinished {
                        id: id.to_owned(),
                        exec_id: String::new(),
                    });
                }
                Err(ShimError::Runc {
                    verb: "kill",
                    id: id.to_owned(),
                    detail,
                })
            }
        }
    }

    async fn delete(&self, id: &str) -> Result<()> {
        let opts = DeleteOpts::new().force(true);
        match self.runc.delete(id, Some(&opts)).await {
            Ok(()) => Ok(()),
            Err(e) => {
                let detail = self.describe(&e);
                if detail.contains("does not exist") {
                    return Ok(());
                }
                Err(ShimError::Runc {
                    verb: "delete",
                    id: id.to_owned(),
                    detail,
                })
            }
        }
    }

    async fn ps(&self, id: &str) -> Result<Vec<u32>> {
        let pids = self
            .runc
            .ps(id)
            .await
            .map_err(|e| self.failed("ps", id, &e))?;
        Ok(pids
            .into_iter()
            .map(|p| u32::try_from(p).unwrap_or(0))
            .collect())
    }

    async fn pause(&self, id: &str) -> Result<()> {
        self.runc
            .pause(id)
            .await
            .map_err(|e| self.failed("pause", id, &e))
    }

    async fn resume(&self, id: &str) -> Result<()> {
        self.runc
            .resume(id)
            .await
            .map_err(|e| self.failed("resume", id, &e))
    }

    async fn update(&self, id: &str, resources: &LinuxResources) -> Result<()> {
        self.runc
            .update(id, resources)
            .await
            .map_err(|e| self.failed("update", id, &e))
    }

    async fn run_raw(
        &self,
        args: Vec<OsString>,
        stdio: Option<(Stdio, Stdio, Stdio)>,
    ) -> Result<RawOutput> {
        RuncClient::run_raw(self, args, stdio).await
    }

    fn with_log_tail(&self, base: String) -> String {
        RuncClient::with_log_tail(self, base)
    }
}
