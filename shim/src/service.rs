//! The `Shim` implementation: the `start` and `delete` actions and the server's lifecycle.
//!
//! `start` re-executes the binary as the ttrpc server (containerd-shim's `spawn`) and writes the
//! `address` file in the bundle; `delete` (containerd lost the shim) force-deletes the runc
//! container, unmounts the rootfs and reports the task as killed.

use std::{path::PathBuf, sync::Arc};

use async_trait::async_trait;
use containerd_shim::protos::protobuf::MessageField;
use containerd_shim::{
    asynchronous::{spawn, ExitSignal, Shim},
    publisher::RemotePublisher,
    util::write_str_to_file,
    Config, DeleteResponse, Error, Flags, StartOpts,
};
use log::warn;
use runc::options::DeleteOpts;

use crate::{
    lazy::{EagerOnly, LazyBackend},
    options::ShimOptions,
    runc::RuncClient,
    task::{RemoteEvents, TaskService},
};

/// The runtime type containerd knows this shim by.
pub const RUNTIME_ID: &str = "io.containerd.distriproc.v2";

/// The shim process.
pub struct Service {
    exit: Arc<ExitSignal>,
    id: String,
    namespace: String,
    bundle: PathBuf,
}

/// The lazy backend restores use.
pub fn lazy_backend() -> Arc<dyn LazyBackend> {
    if std::env::var_os("DISTRIPROC_EAGER_RESTORE").is_some_and(|v| v == "1") {
        return Arc::new(EagerOnly);
    }
    crate::fetcher::backend().unwrap_or_else(|| Arc::new(EagerOnly))
}

#[async_trait]
impl Shim for Service {
    type T = TaskService;

    async fn new(_runtime_id: &str, args: &Flags, _config: &mut Config) -> Self {
        let bundle = if args.bundle.is_empty() {
            std::env::current_dir().unwrap_or_default()
        } else {
            PathBuf::from(&args.bundle)
        };
        Service {
            exit: Arc::new(ExitSignal::default()),
            id: args.id.clone(),
            namespace: args.namespace.clone(),
            bundle,
        }
    }

    async fn start_shim(&mut self, opts: StartOpts) -> Result<String, Error> {
        let grouping = opts.id.clone();
        let address = spawn(opts, &grouping, Vec::new()).await?;
        write_str_to_file("address", &address).await?;
        Ok(address)
    }

    async fn delete_shim(&mut self) -> Result<DeleteResponse, Error> {
        let opts = ShimOptions::load(&self.bundle).unwrap_or_default();
        match RuncClient::new(&opts, &self.namespace, &self.bundle) {
            Ok(r) => {
                let d = DeleteOpts::new().force(true);
                if let Err(e) = r.runc.delete(&self.id, Some(&d)).await {
                    warn!("runc delete {}: {}", self.id, r.describe(&e));
                }
            }
            Err(e) => warn!("runc for {}: {e}", self.id),
        }
        let rootfs = self.bundle.join("rootfs");
        if let Some(p) = rootfs.to_str() {
            if let Err(e) = containerd_shim::mount::umount_recursive(Some(p), 0) {
                warn!("unmount {p}: {e}");
            }
        }
        Ok(DeleteResponse {
            pid: 0,
            exit_status: 128 + 9,
            exited_at: MessageField::some(containerd_shim::util::timestamp()?),
            ..Default::default()
        })
    }

    async fn wait(&mut self) {
        self.exit.wait().await;
    }

    async fn create_task_service(&self, publisher: RemotePublisher) -> TaskService {
        let events = Arc::new(RemoteEvents::new(publisher, self.namespace.clone()));
        let svc = TaskService::new(&self.namespace, events, self.exit.clone(), lazy_backend());
        if let Err(e) = svc.watch_exits().await {
            log::error!("subscribe to exits: {e}");
        }
        svc
    }
}
