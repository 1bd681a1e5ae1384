//! Containers and their processes as the shim tracks them.
//!
//! A [`Container`] owns its runc client, rootfs mount, init [`Process`] and exec processes.
//! A [`Process`] records status, pid, stdio and exit; `exited` fires once its TaskExit has been
//! published (after its output was drained), which is what Wait returns on.

use std::{collections::HashMap, path::PathBuf};

use containerd_shim::api::Status;
use containerd_shim::protos::protobuf::well_known_types::timestamp::Timestamp;
use tokio::sync::watch;

use distriproc_config::ShimConfig;

use crate::{
    error::ShimError,
    io::{IoDone, ShimStdio, StdioPaths},
    options::ShimOptions,
};

/// Lifecycle status of a process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProcStatus {
    Created,
    Running,
    Paused,
    Stopped,
}

impl ProcStatus {
    /// containerd's status enum.
    pub fn api(self) -> Status {
        match self {
            ProcStatus::Created => Status::CREATED,
            ProcStatus::Running => Status::RUNNING,
            ProcStatus::Paused => Status::PAUSED,
            ProcStatus::Stopped => Status::STOPPED,
        }
    }

    /// Lower-case name for messages.
    pub fn name(self) -> &'static str {
        match self {
            ProcStatus::Created => "created",
            ProcStatus::Running => "running",
            ProcStatus::Paused => "paused",
            ProcStatus::Stopped => "stopped",
        }
    }
}

/// One process (init or exec).
#[derive(Debug)]
pub struct Process {
    pub exec_id: String,
    pub pid: u32,
    pub status: ProcStatus,
    pub stdio: StdioPaths,
    pub shim_io: ShimStdio,
    pub io_done: Option<IoDone>,
    pub exit_status: u32,
    pub exited_at: Option<Timestamp>,
    /// True once TaskExit was published.
    pub exited: watch::Sender<bool>,
    /// The exec's OCI process spec (JSON), exec processes only.
    pub spec: Option<serde_json::Value>,
}

impl Process {
    /// `Ok` if the process is in one of the `allowed` states, else FailedPrecondition: `op`
    /// (of container `id`) cannot be done in its state.
    pub fn require(
        &self,
        id: &str,
        op: &'static str,
        allowed: &[ProcStatus],
    ) -> Result<(), ShimError> {
        if allowed.contains(&self.status) {
            Ok(())
        } else {
            Err(precondition(id, op, self.status))
        }
    }

    /// `Ok` unless the process is in one of the `refused` states.
    pub fn refuse(
        &self,
        id: &str,
        op: &'static str,
        refused: &[ProcStatus],
    ) -> Result<(), ShimError> {
        if refused.contains(&self.status) {
            Err(precondition(id, op, self.status))
        } else {
            Ok(())
        }
    }

    pub fn new(exec_id: &str, stdio: StdioPaths) -> Self {
        Process {
            exec_id: exec_id.to_owned(),
            pid: 0,
            status: ProcStatus::Created,
            stdio,
            shim_io: ShimStdio::default(),
            io_done: None,
            exit_status: 0,
            exited_at: None,
            exited: watch::channel(false).0,
            spec: None,
        }
    }
}

/// What a created-from-checkpoint container restores from at Start.
#[derive(Debug, Clone)]
pub struct RestorePlan {
    pub images: PathBuf,
    pub work: PathBuf,
}

/// One container.
#[derive(Debug)]
pub struct Container {
    pub id: String,
    pub bundle: PathBuf,
    pub opts: ShimOptions,
    /// The bundle's OCI annotations, read once at Create.
    pub annotations: HashMap<String, String>,
    /// The shim configuration of this container (runtime options' config with the
    /// annotations applied), resolved once at Create.
    pub cfg: ShimConfig,
    /// The OCI runtime that runs its processes (runc).
    pub runc: std::sync::Arc<dyn crate::oci_runtime::OciRuntime>,
    pub init: Process,
    pub execs: HashMap<String, Process>,
    pub rootfs_mounted: bool,
    pub restore: Option<RestorePlan>,
    /// The thread watching a lazy restore's fetcher.
    pub lazy: Option<crate::lazy::Waiter>,
    /// What a checkpoint needs to complete its dump while memory is still lazily managed.
    pub lazy_view: Option<crate::lazy::CheckpointView>,
    /// The page-server checkpoint this container was lazily restored from: a checkpoint to the
    /// same page server is a layer over it.
    pub base_layer: crate::remote::SharedBase,
    /// The write-back of a remote-resident container (`crate::writeback`).
    pub writeback: Option<crate::writeback::WriteBack>,
}

impl Container {
    /// The init process or an exec process, or ProcessNotFound.
    pub fn get_process(&self, exec_id: &str) -> Result<&Process, ShimError> {
        self.process(exec_id)
            .ok_or_else(|| ShimError::ProcessNotFound {
                id: self.id.clone(),
                exec_id: exec_id.to_owned(),
            })
    }

    /// The init process or an exec process.
    pub fn process(&self, exec_id: &str) -> Option<&Process> {
        if exec_id.is_empty() {
            Some(&self.init)
        } else {
            self.execs.get(exec_id)
        }
    }

    /// Mutable access to the init process or an exec process.
    pub fn process_mut(&mut self, exec_id: &str) -> Option<&mut Process> {
        if exec_id.is_empty() {
            Some(&mut self.init)
        } else {
            self.execs.get_mut(exec_id)
        }
    }
}

/// FailedPrecondition: `op` of container `id` in `status`.
pub fn precondition(id: &str, op: &'static str, status: ProcStatus) -> ShimError {
    ShimError::FailedPrecondition {
        id: id.to_owned(),
        op,
        state: status.name().to_owned(),
    }
}
