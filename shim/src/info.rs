//! `containerd-shim-distriproc-v2 -info`: the runtime's introspection answer.
//!
//! containerd 2.x runs the shim binary with `-info`, the runtime options (a protobuf `Any`) on
//! stdin, and reads a `containerd.types.RuntimeInfo` protobuf from stdout (`ctr plugins
//! inspect-runtime`, the CRI's runtime features). As containerd's runc shim does, the answer
//! names the shim, echoes the options, and carries the OCI runtime's own `features` document
//! (`runc features`, from the binary the options or the configuration select).

use std::process::Command;

use containerd_shim::protos::protobuf::{well_known_types::any::Any, Message, MessageField};
use containerd_shim::protos::types::introspection::{RuntimeInfo, RuntimeVersion};

use crate::options;

/// The shim's name in the answer.
pub const NAME: &str = "containerd-shim-distriproc-v2";
/// Type URL of an OCI runtime features document (as containerd's runc shim sends it).
pub const FEATURES_TYPE_URL: &str =
    "types.containerd.io/opencontainers/runtime-spec/1/features/Features";

/// Errors of `-info`.
#[derive(Debug, thiserror::Error)]
pub enum InfoError {
    /// stdin was not a protobuf `Any`.
    #[error("the runtime options on stdin are not a protobuf Any: {0}")]
    Decode(#[from] containerd_shim::protos::protobuf::Error),
    /// The options could not be used.
    #[error("runtime options: {0}")]
    Options(String),
    /// The OCI runtime could not be run.
    #[error("cannot run `{binary} features`: {source}")]
    Spawn {
        /// The runtime binary.
        binary: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The OCI runtime refused or printed something else than JSON.
    #[error("`{binary} features` failed: {detail}")]
    Features {
        /// The runtime binary.
        binary: String,
        /// Its exit status or the parse error, and its stderr.
        detail: String,
    },
}

/// Builds the answer for the options in `stdin` (possibly empty).
pub fn runtime_info(stdin: &[u8]) -> Result<RuntimeInfo, InfoError> {
    let any = if stdin.is_empty() {
        None
    } else {
        Some(Any::parse_from_bytes(stdin)?)
    };
    let opts = options::decode(any.as_ref()).map_err(|e| InfoError::Options(e.to_string()))?;
    // The configuration may name the runc binary; an unreadable configuration does not stop
    // introspection (the runtime options' binary, else "runc", are used).
    let opts = match opts.load_config() {
        Ok(cfg) => opts.with_runc_config(&cfg.runc),
        Err(_) => opts,
    };
    let binary = opts.runc_binary().to_string();
    let out = Command::new(&binary)
        .arg("features")
        .output()
        .map_err(|source| InfoError::Spawn {
            binary: binary.clone(),
            source,
        })?;
    let features_err = |detail: String| InfoError::Features {
        binary: binary.clone(),
        detail,
    };
    if !out.status.success() {
        return Err(features_err(format!(
            "{}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    serde_json::from_slice::<serde_json::Value>(&out.stdout)
        .map_err(|e| features_err(format!("not JSON: {e}")))?;
    let mut features = Any::new();
    features.type_url = FEATURES_TYPE_URL.to_string();
    features.value = out.stdout;
    let mut version = RuntimeVersion::new();
    version.version = env!("CARGO_PKG_VERSION").to_string();
    let mut info = RuntimeInfo::new();
    info.name = NAME.to_string();
    info.version = MessageField::some(version);
    info.options = any.map_or_else(MessageField::none, MessageField::some);
    info.features = MessageField::some(features);
    Ok(info)
}

/// `-info`: reads stdin, writes the protobuf answer to stdout; the exit code.
pub fn main() -> i32 {
    use std::io::{Read, Write};
    let mut stdin = Vec::new();
    if let Err(e) = std::io::stdin().read_to_end(&mut stdin) {
        eprintln!("{NAME} -info: read stdin: {e}");
        return 1;
    }
    let bytes = match runtime_info(&stdin).and_then(|i| Ok(i.write_to_bytes()?)) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("{NAME} -info: {e}");
            return 1;
        }
    };
    let mut out = std::io::stdout();
    if let Err(e) = out.write_all(&bytes).and_then(|()| out.flush()) {
        eprintln!("{NAME} -info: write stdout: {e}");
        return 1;
    }
    0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn runc_options(binary: &str) -> Vec<u8> {
        let mut o = containerd_shim::protos::shim::oci::Options::new();
        o.binary_name = binary.to_string();
        let mut any = Any::new();
        any.type_url = format!("containerd.linux.runc.v1/{}", options::RUNC_OPTIONS);
        any.value = o.write_to_bytes().unwrap();
        any.write_to_bytes().unwrap()
    }

    #[test]
    fn answers_with_the_selected_runtimes_features() {
        let dir = tempfile::tempdir().unwrap();
        let fake = dir.path().join("fake-runc");
        std::fs::write(
            &fake,
            "#!/bin/sh\n[ \"$1\" = features ] && echo '{\"ociVersionMin\":\"1.0.0\"}'\n",
        )
        .unwrap();
        std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        let stdin = runc_options(fake.to_str().unwrap());
        let info = runtime_info(&stdin).unwrap();
        assert_eq!(info.name, NAME);
        assert_eq!(info.version.version, env!("CARGO_PKG_VERSION"));
        assert_eq!(info.features.type_url, FEATURES_TYPE_URL);
        assert!(String::from_utf8_lossy(&info.features.value).contains("ociVersionMin"));
        assert!(info.options.type_url.ends_with(options::RUNC_OPTIONS));
        // The answer decodes as containerd reads it.
        let back = RuntimeInfo::parse_from_bytes(&info.write_to_bytes().unwrap()).unwrap();
        assert_eq!(back.name, NAME);
    }

    #[test]
    fn a_missing_runtime_or_bad_options_are_clear_errors() {
        let e = runtime_info(&runc_options("/nonexistent/runc")).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/runc features"), "{e}");
        let e = runtime_info(b"\xff\xff\xff").unwrap_err();
        assert!(matches!(e, InfoError::Decode(_)), "{e}");
    }
}
