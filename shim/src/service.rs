//! The `Shim` implementation: the `start` and `delete` actions and the server's lifecycle.
//!
//! `start` re-executes the binary as the ttrpc server (containerd-shim's `spawn`) and writes the
//! `address` file in the bundle; `delete` (containerd lost the shim) force-deletes the runc
//! container, unmounts the rootfs and reports the task as killed.
//!
//! Grouping: containers whose bundles name the same group ([`group_key`]) share one shim
//! process. `spawn` derives the ttrpc socket from the group, so the `start` of a second
//! container finds the first one's server listening on that socket and only writes the
//! `address` file. One process then serves several containers: everything per container
//! (bundle, runtime options, config, runc client, restore work dir, stats file, OOM watch,
//! events) lives in the [`crate::container::Container`], never in the process (its cwd is the
//! bundle of the container it was started for, which may be deleted long before the shim
//! exits), and Shutdown ends the process only once it holds no container.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::Arc,
};

use async_trait::async_trait;
use containerd_shim::protos::protobuf::MessageField;
use containerd_shim::{
    asynchronous::{spawn, ExitSignal, Shim},
    publisher::RemotePublisher,
    util::write_str_to_file,
    Config, DeleteResponse, Error, Flags, StartOpts,
};
use log::{info, warn};
use runc::options::DeleteOpts;

use crate::{
    create::bundle_annotations,
    error::ShimError,
    events::RemoteEvents,
    lazy::{EagerOnly, LazyBackend},
    options::ShimOptions,
    runc::RuncClient,
    task::TaskService,
};

/// The runtime type containerd knows this shim by.
pub const RUNTIME_ID: &str = "io.containerd.distriproc.v2";

/// Annotation naming the shim group of a container (DistriProc's own, checked first).
pub const GROUP_ANNOTATION: &str = "io.distriproc.group";
/// The runc v2 shim's grouping annotation, honoured the same way.
pub const RUNC_GROUP_ANNOTATION: &str = "io.containerd.runc.v2.group";
/// The CRI sandbox (pod) id: the containers of a Kubernetes pod share one shim.
pub const SANDBOX_ID_ANNOTATION: &str = "io.kubernetes.cri.sandbox-id";
/// Grouping annotations, most specific first.
pub const GROUP_ANNOTATIONS: [&str; 3] = [
    GROUP_ANNOTATION,
    RUNC_GROUP_ANNOTATION,
    SANDBOX_ID_ANNOTATION,
];
/// Longest accepted group value (a CRI sandbox id is 64 hex digits).
pub const MAX_GROUP_LEN: usize = 128;

/// The shim group of container `id`: the value of the first grouping annotation present
/// ([`GROUP_ANNOTATIONS`] order), else the container id (one shim per container).
///
/// A group value is 1 to [`MAX_GROUP_LEN`] characters of `[A-Za-z0-9._-]`, starting with a
/// letter or digit; anything else is refused rather than silently ungrouped.
pub fn group_key(id: &str, annotations: &HashMap<String, String>) -> Result<String, ShimError> {
    for annotation in GROUP_ANNOTATIONS {
        if let Some(value) = annotations.get(annotation) {
            let invalid = |reason: String| ShimError::InvalidGroup {
                annotation,
                value: value.clone(),
                reason,
            };
            if value.is_empty() {
                return Err(invalid("it is empty".into()));
            }
            if value.len() > MAX_GROUP_LEN {
                return Err(invalid(format!(
                    "{} bytes, at most {MAX_GROUP_LEN} allowed",
                    value.len()
                )));
            }
            if let Some(bad) = value
                .chars()
                .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
            {
                return Err(invalid(format!(
                    "character {bad:?} (allowed: A-Z a-z 0-9 . _ -)"
                )));
            }
            if !value.starts_with(|c: char| c.is_ascii_alphanumeric()) {
                return Err(invalid("it must start with a letter or a digit".into()));
            }
            return Ok(value.clone());
        }
    }
    Ok(id.to_owned())
}

/// The filesystem path of a `unix://` ttrpc address.
fn socket_path(address: &str) -> Option<&Path> {
    address
        .strip_prefix("unix://")
        .filter(|p| p.starts_with('/'))
        .map(Path::new)
}

/// The shim process.
pub struct Service {
    exit: Arc<ExitSignal>,
    id: String,
    namespace: String,
    /// containerd's API socket (`-address`).
    address: String,
    bundle: PathBuf,
    /// The ttrpc socket the server listens on (`-socket`; empty for start/delete).
    socket: String,
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
            address: args.address.clone(),
            bundle,
            socket: args.socket.clone(),
        }
    }

    async fn start_shim(&mut self, opts: StartOpts) -> Result<String, Error> {
        // containerd runs `start` in the container's bundle.
        let grouping = group_key(&opts.id, &bundle_annotations(&self.bundle))
            .map_err(|e| Error::InvalidArgument(e.to_string()))?;
        if grouping != opts.id {
            info!("container {} joins shim group {grouping:?}", opts.id);
        }
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
        // Only the serving process gets here, with its server up. Its cwd is the bundle of the
        // container it was started for, deleted with that container while the group's other
        // containers live on, and a deleted cwd breaks whatever resolves paths against it (the
        // runc client's setup fails with "Invalid path"). Serve from "/"; every path the shim
        // uses is absolute.
        if let Err(e) = std::env::set_current_dir("/") {
            warn!("chdir /: {e}");
        }
        self.exit.wait().await;
        // containerd-shim removes the socket named by the `address` file of its cwd: the bundle
        // of the first container of the group, often deleted by now. Remove it here.
        if let Some(p) = socket_path(&self.socket) {
            let is_socket = std::fs::symlink_metadata(p)
                .is_ok_and(|m| std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()));
            if is_socket {
                if let Err(e) = std::fs::remove_file(p) {
                    warn!("remove socket {}: {e}", p.display());
                }
            }
        }
    }

    async fn create_task_service(&self, publisher: RemotePublisher) -> TaskService {
        let events = Arc::new(RemoteEvents::new(publisher, self.namespace.clone()));
        let svc = TaskService::new(
            &self.namespace,
            &self.address,
            events,
            self.exit.clone(),
            lazy_backend(),
        );
        if let Err(e) = svc.watch_exits().await {
            log::error!("subscribe to exits: {e}");
        }
        svc
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ann(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn group_defaults_to_the_container_id() {
        assert_eq!(group_key("c1", &ann(&[])).unwrap(), "c1");
        assert_eq!(
            group_key("c1", &ann(&[("io.distriproc.fill-policy", "none")])).unwrap(),
            "c1"
        );
    }

    #[test]
    fn group_annotations_in_order() {
        let sandbox = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
        assert_eq!(
            group_key("c", &ann(&[(SANDBOX_ID_ANNOTATION, sandbox)])).unwrap(),
            sandbox
        );
        assert_eq!(
            group_key(
                "c",
                &ann(&[
                    (SANDBOX_ID_ANNOTATION, sandbox),
                    (RUNC_GROUP_ANNOTATION, "g-runc")
                ])
            )
            .unwrap(),
            "g-runc"
        );
        assert_eq!(
            group_key(
                "c",
                &ann(&[
                    (SANDBOX_ID_ANNOTATION, sandbox),
                    (RUNC_GROUP_ANNOTATION, "g-runc"),
                    (GROUP_ANNOTATION, "g.dp_1"),
                ])
            )
            .unwrap(),
            "g.dp_1"
        );
    }

    #[test]
    fn invalid_groups_are_refused_with_the_annotation_named() {
        let long = "a".repeat(MAX_GROUP_LEN + 1);
        for (value, why) in [
            ("", "empty"),
            (long.as_str(), "at most"),
            ("a/b", "'/'"),
            ("a b", "' '"),
            ("é", "'é'"),
            ("-a", "start with"),
            (".a", "start with"),
        ] {
            let e = group_key("c", &ann(&[(GROUP_ANNOTATION, value)])).unwrap_err();
            assert!(matches!(e, ShimError::InvalidGroup { .. }), "{e}");
            let msg = e.to_string();
            assert!(msg.contains(GROUP_ANNOTATION) && msg.contains(why), "{msg}");
        }
        // An invalid value of an earlier annotation is not skipped for a later valid one.
        let e = group_key(
            "c",
            &ann(&[(GROUP_ANNOTATION, "a b"), (SANDBOX_ID_ANNOTATION, "ok")]),
        )
        .unwrap_err();
        assert!(e.to_string().contains(GROUP_ANNOTATION), "{e}");
        assert_eq!(
            group_key("c", &ann(&[(GROUP_ANNOTATION, &"a".repeat(MAX_GROUP_LEN))])).unwrap(),
            "a".repeat(MAX_GROUP_LEN)
        );
    }

    #[test]
    fn group_from_the_bundle_config() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(
            group_key("c", &bundle_annotations(dir.path())).unwrap(),
            "c"
        );
        std::fs::write(
            dir.path().join("config.json"),
            r#"{"ociVersion":"1.0.2","annotations":{"io.distriproc.group":"pod-7"}}"#,
        )
        .unwrap();
        assert_eq!(
            group_key("c", &bundle_annotations(dir.path())).unwrap(),
            "pod-7"
        );
    }

    #[test]
    fn socket_paths() {
        assert_eq!(
            socket_path("unix:///run/containerd/s/ab"),
            Some(Path::new("/run/containerd/s/ab"))
        );
        assert_eq!(socket_path("vsock://3:1"), None);
        assert_eq!(socket_path(""), None);
    }
}
