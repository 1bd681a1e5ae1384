//! Runtime options carried by `CreateTaskRequest.options`, decoded only after checking the type.
//!
//! Accepted: absent, an empty `Any` (type_url ""; what `ctr c restore` sends), runc's
//! `containerd.runc.v1.Options` (containerd 2.x insists on it for task options) and CRI/Docker's
//! `runtimeoptions.v1.Options`. The type is matched on the segment after the last `/`.
//! Anything else is an `InvalidArgument` naming the type. The decoded options are kept as JSON in
//! the bundle (`options.json`) so the `delete` action can find runc's root again.
//!
//! The shim configuration ([`ShimOptions::load_config`]) comes from the first of:
//! `runtimeoptions.v1.Options.config_body` (TOML text; containerd 2.x CRI sends the runtime's
//! whole `options` table there when it has no `ConfigPath`), `config_path`, `$DISTRIPROC_CONFIG`,
//! `/etc/distriproc/shim.toml`, the defaults. The `io.distriproc.*` annotations then override
//! it per container.

use std::path::{Path, PathBuf};

use containerd_shim::protos::{
    protobuf::{well_known_types::any::Any, Message},
    shim::oci::Options as RuncOptionsProto,
};
use serde::{Deserialize, Serialize};

use crate::error::{Result, ShimError};

/// runc's options message name.
pub const RUNC_OPTIONS: &str = "containerd.runc.v1.Options";
/// CRI's generic options message name.
pub const RUNTIME_OPTIONS: &str = "runtimeoptions.v1.Options";
/// runc's checkpoint options message name.
pub const CHECKPOINT_OPTIONS: &str = "containerd.runc.v1.CheckpointOptions";
/// Default runc state root prefix; the namespace is appended.
pub const DEFAULT_RUNC_ROOT: &str = "/run/containerd/runc";
/// Name of the file in the bundle that keeps the decoded options.
pub const OPTIONS_FILE: &str = "options.json";

/// The runtime options the shim honours.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ShimOptions {
    /// runc binary name or path ("" = `runc` from PATH).
    pub binary_name: String,
    /// runc state root prefix ("" = [`DEFAULT_RUNC_ROOT`]).
    pub root: String,
    /// `--systemd-cgroup`.
    pub systemd_cgroup: bool,
    /// `--no-pivot` for create/restore.
    pub no_pivot_root: bool,
    /// `--no-new-keyring` for create.
    pub no_new_keyring: bool,
    /// CRIU image directory to restore from instead of the request's checkpoint.
    pub criu_image_path: String,
    /// CRIU work directory for restore.
    pub criu_work_path: String,
    /// From `runtimeoptions.v1.Options.config_path`: a shim configuration file.
    pub config_path: String,
    /// From `runtimeoptions.v1.Options.config_body`: the shim configuration as TOML text
    /// (wins over `config_path`).
    pub config_body: String,
    /// CRIU binary for runc's `--criu` ("" = runc's default); from the shim configuration.
    pub criu: String,
}

impl ShimOptions {
    /// runc binary to run.
    pub fn runc_binary(&self) -> &str {
        if self.binary_name.is_empty() {
            "runc"
        } else {
            &self.binary_name
        }
    }

    /// runc `--root` for `namespace`.
    pub fn runc_root(&self, namespace: &str) -> PathBuf {
        let root = if self.root.is_empty() {
            DEFAULT_RUNC_ROOT
        } else {
            &self.root
        };
        Path::new(root).join(namespace)
    }

    /// The shim configuration these options carry: `config_body` (TOML text), else the file
    /// `config_path`, else `$DISTRIPROC_CONFIG`, else /etc/distriproc/shim.toml, else the
    /// defaults. Errors name the key and where it came from.
    pub fn load_config(&self) -> Result<distriproc_config::ShimConfig> {
        let cfg = if !self.config_body.trim().is_empty() {
            distriproc_config::ShimConfig::from_toml_str(
                &strip_options_fields(&self.config_body),
                CONFIG_BODY_ORIGIN,
            )
        } else if self.config_path.is_empty() {
            distriproc_config::ShimConfig::load_default()
        } else {
            distriproc_config::ShimConfig::load(Path::new(&self.config_path))
        };
        cfg.map_err(|e| ShimError::InvalidArgument(e.to_string()))
    }

    /// Fill what containerd's options left unset from the configuration's `[runc]` table.
    pub fn with_runc_config(mut self, cfg: &distriproc_config::RuncConfig) -> Self {
        if self.binary_name.is_empty() {
            self.binary_name = cfg.binary.clone();
        }
        if self.root.is_empty() {
            self.root = cfg.root.display().to_string();
        }
        if self.criu.is_empty() {
            self.criu = cfg.criu.clone();
        }
        self
    }

    /// Write the options into `<bundle>/options.json`.
    pub fn save(&self, bundle: &Path) -> Result<()> {
        let path = bundle.join(OPTIONS_FILE);
        let text = serde_json::to_string(self).map_err(|e| ShimError::BadFile {
            what: "runtime options for",
            path: path.clone(),
            detail: e.to_string(),
        })?;
        std::fs::write(&path, text).map_err(|e| ShimError::io("write", path, e))
    }

    /// Read `<bundle>/options.json`; a missing file means defaults.
    pub fn load(bundle: &Path) -> Result<Self> {
        let path = bundle.join(OPTIONS_FILE);
        match std::fs::read_to_string(&path) {
            Ok(t) => serde_json::from_str(&t).map_err(|e| ShimError::BadFile {
                what: "runtime options file",
                path,
                detail: e.to_string(),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(e) => Err(ShimError::io("read", path, e)),
        }
    }
}

/// How errors in `config_body` name their origin.
pub const CONFIG_BODY_ORIGIN: &str = "runtime options config_body";

/// containerd's CRI marshals the runtime's whole `options` table into `config_body`, so the
/// options message's own fields (`TypeUrl`, `ConfigPath`, `ConfigBody`) can appear as
/// top-level keys there; they are not shim configuration keys and are dropped.
fn strip_options_fields(body: &str) -> String {
    let mut top = true;
    let mut out = String::with_capacity(body.len());
    for line in body.lines() {
        let t = line.trim_start();
        if t.starts_with('[') {
            top = false;
        }
        let key = t.split('=').next().unwrap_or("").trim();
        if top && matches!(key, "TypeUrl" | "ConfigPath" | "ConfigBody") && t.contains('=') {
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// The part of a type URL after the last `/` (`type.googleapis.com/x.Y` → `x.Y`).
pub fn type_name(type_url: &str) -> &str {
    type_url.rsplit('/').next().unwrap_or(type_url)
}

/// `runtimeoptions.v1.Options` (containerd pkg/runtimeoptions/v1/api.proto).
#[derive(Clone, PartialEq, prost::Message)]
struct RuntimeOptionsProto {
    #[prost(string, tag = "1")]
    type_url: String,
    #[prost(string, tag = "2")]
    config_path: String,
    #[prost(bytes = "vec", tag = "3")]
    config_body: Vec<u8>,
}

/// Decode the runtime options of a Create request.
pub fn decode(any: Option<&Any>) -> Result<ShimOptions> {
    let Some(any) = any else {
        return Ok(ShimOptions::default());
    };
    match type_name(&any.type_url) {
        "" => Ok(ShimOptions::default()),
        RUNC_OPTIONS => {
            let o = RuncOptionsProto::parse_from_bytes(&any.value)
                .map_err(|e| ShimError::InvalidArgument(format!("decode {RUNC_OPTIONS}: {e}")))?;
            Ok(ShimOptions {
                binary_name: o.binary_name,
                root: o.root,
                systemd_cgroup: o.systemd_cgroup,
                no_pivot_root: o.no_pivot_root,
                no_new_keyring: o.no_new_keyring,
                criu_image_path: o.criu_image_path,
                criu_work_path: o.criu_work_path,
                ..Default::default()
            })
        }
        RUNTIME_OPTIONS => {
            let o = <RuntimeOptionsProto as prost::Message>::decode(any.value.as_slice()).map_err(
                |e| ShimError::InvalidArgument(format!("decode {RUNTIME_OPTIONS}: {e}")),
            )?;
            let config_body = String::from_utf8(o.config_body).map_err(|e| {
                ShimError::InvalidArgument(format!(
                    "{RUNTIME_OPTIONS}: config_body is not UTF-8 TOML: {e}"
                ))
            })?;
            Ok(ShimOptions {
                config_path: o.config_path,
                config_body,
                ..Default::default()
            })
        }
        _ => Err(ShimError::UnknownOptions {
            type_url: any.type_url.clone(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn any(type_url: &str, value: Vec<u8>) -> Any {
        let mut a = Any::new();
        a.type_url = type_url.into();
        a.value = value;
        a
    }

    #[test]
    fn absent_and_empty_any_are_defaults() {
        assert_eq!(decode(None).unwrap(), ShimOptions::default());
        assert_eq!(
            decode(Some(&any("", vec![]))).unwrap(),
            ShimOptions::default()
        );
    }

    #[test]
    fn runc_options_by_bare_and_prefixed_url() {
        let o = RuncOptionsProto {
            binary_name: "/usr/sbin/runc".into(),
            root: "/run/x".into(),
            systemd_cgroup: true,
            criu_work_path: "/w".into(),
            ..Default::default()
        };
        let bytes = o.write_to_bytes().unwrap();
        for url in [
            RUNC_OPTIONS,
            "type.googleapis.com/containerd.runc.v1.Options",
        ] {
            let d = decode(Some(&any(url, bytes.clone()))).unwrap();
            assert_eq!(d.binary_name, "/usr/sbin/runc");
            assert_eq!(d.runc_root("ns"), Path::new("/run/x/ns"));
            assert!(d.systemd_cgroup);
            assert_eq!(d.criu_work_path, "/w");
        }
    }

    #[test]
    fn runtime_options_config_path() {
        let o = RuntimeOptionsProto {
            type_url: "io.containerd.distriproc.v2".into(),
            config_path: "/etc/distriproc/shim.toml".into(),
            config_body: vec![],
        };
        let bytes = prost::Message::encode_to_vec(&o);
        let d = decode(Some(&any(RUNTIME_OPTIONS, bytes))).unwrap();
        assert_eq!(d.config_path, "/etc/distriproc/shim.toml");
        assert_eq!(d.runc_binary(), "runc");
        assert_eq!(
            d.runc_root("default"),
            Path::new("/run/containerd/runc/default")
        );
    }

    fn runtime_options(config_path: &str, body: &str) -> Any {
        let o = RuntimeOptionsProto {
            type_url: "io.containerd.distriproc.v2".into(),
            config_path: config_path.into(),
            config_body: body.as_bytes().to_vec(),
        };
        any(RUNTIME_OPTIONS, prost::Message::encode_to_vec(&o))
    }

    #[test]
    fn runtime_options_config_body_is_the_configuration() {
        // What containerd 2.x CRI sends for an `options` table without ConfigPath.
        let body = "TypeUrl = \"io.containerd.distriproc.v2\"\n\
                    [fetcher]\nfill = \"none\"\nfault_threads = 4\n\
                    [runc]\nroot = \"/run/body\"\n";
        let d = decode(Some(&runtime_options("", body))).unwrap();
        assert_eq!(d.config_body, body);
        let cfg = d.load_config().unwrap();
        assert_eq!(cfg.fetcher.fill, distriproc_config::FillPolicy::None);
        assert_eq!(cfg.fetcher.fault_threads, 4);
        assert_eq!(cfg.runc.root, Path::new("/run/body"));
        // Kept in options.json, so Start and Checkpoint see the same configuration.
        let dir = tempfile::tempdir().unwrap();
        d.save(dir.path()).unwrap();
        assert_eq!(ShimOptions::load(dir.path()).unwrap().config_body, body);
        // The body wins over a config_path (containerd never sends both).
        let d = decode(Some(&runtime_options("/nonexistent/shim.toml", body))).unwrap();
        assert_eq!(d.load_config().unwrap().fetcher.fault_threads, 4);
    }

    #[test]
    fn config_body_errors_name_the_key_and_runtime_options() {
        for (body, key) in [
            ("[fetcher]\nfil = \"none\"\n", "fil"),
            ("colour = 1\n", "colour"),
            (
                "[fetcher]\nfault_around_pages = 3\n",
                "fetcher.fault_around_pages",
            ),
        ] {
            let d = decode(Some(&runtime_options("", body))).unwrap();
            let e = d.load_config().unwrap_err();
            assert!(matches!(e, ShimError::InvalidArgument(_)), "{e}");
            let msg = e.to_string();
            assert!(msg.contains(key), "{body:?}: {msg}");
            assert!(msg.contains("runtime options"), "{body:?}: {msg}");
        }
        let bad = RuntimeOptionsProto {
            type_url: String::new(),
            config_path: String::new(),
            config_body: vec![0xff, 0xfe],
        };
        let e = decode(Some(&any(
            RUNTIME_OPTIONS,
            prost::Message::encode_to_vec(&bad),
        )))
        .unwrap_err();
        assert!(e.to_string().contains("config_body"), "{e}");
    }

    #[test]
    fn config_path_errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("shim.toml");
        std::fs::write(&p, "[fetcher]\nfill = \"sometimes\"\n").unwrap();
        let d = decode(Some(&runtime_options(&p.display().to_string(), ""))).unwrap();
        let e = d.load_config().unwrap_err().to_string();
        assert!(
            e.contains(&p.display().to_string()) && e.contains("sometimes"),
            "{e}"
        );
        std::fs::write(&p, "[runc]\nbinry = \"x\"\n").unwrap();
        let e = d.load_config().unwrap_err().to_string();
        assert!(
            e.contains(&p.display().to_string()) && e.contains("binry"),
            "{e}"
        );
    }

    #[test]
    fn unknown_type_is_invalid_argument() {
        let e = decode(Some(&any("containerd.linux.runc.CreateOptions", vec![]))).unwrap_err();
        assert!(matches!(e, ShimError::UnknownOptions { .. }), "{e}");
        assert!(e
            .to_string()
            .contains("containerd.linux.runc.CreateOptions"));
    }

    #[test]
    fn garbage_runc_options_is_invalid_argument() {
        let e = decode(Some(&any(RUNC_OPTIONS, vec![0xff, 0xff, 0xff]))).unwrap_err();
        assert!(matches!(e, ShimError::InvalidArgument(_)), "{e}");
    }

    #[test]
    fn save_and_load_roundtrip() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(
            ShimOptions::load(dir.path()).unwrap(),
            ShimOptions::default()
        );
        let o = ShimOptions {
            root: "/r".into(),
            ..Default::default()
        };
        o.save(dir.path()).unwrap();
        assert_eq!(ShimOptions::load(dir.path()).unwrap(), o);
    }

    #[test]
    fn runc_config_fills_only_unset_options() {
        let cfg = distriproc_config::RuncConfig {
            binary: "/opt/runc".into(),
            root: "/run/cfg".into(),
            criu: "/usr/local/sbin/criu".into(),
        };
        let o = ShimOptions::default().with_runc_config(&cfg);
        assert_eq!(o.runc_binary(), "/opt/runc");
        assert_eq!(o.runc_root("ns"), Path::new("/run/cfg/ns"));
        assert_eq!(o.criu, "/usr/local/sbin/criu");
        let o = ShimOptions {
            binary_name: "/x/runc".into(),
            ..Default::default()
        }
        .with_runc_config(&cfg);
        assert_eq!(o.runc_binary(), "/x/runc");
        let bad = ShimOptions {
            config_path: "/nonexistent/shim.toml".into(),
            ..Default::default()
        };
        let e = bad.load_config().unwrap_err();
        assert!(e.to_string().contains("/nonexistent/shim.toml"), "{e}");
    }

    #[test]
    fn type_name_segments() {
        assert_eq!(type_name("a/b/c.D"), "c.D");
        assert_eq!(type_name("c.D"), "c.D");
        assert_eq!(type_name(""), "");
    }
}
