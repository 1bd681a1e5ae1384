//! Keeps docs/REFERENCE.md honest: its key tables must list exactly the keys of the shim's and
//! the page server's configuration (the defaults serialised), each with the right default.

use std::collections::BTreeMap;

use distriproc_config::{pageserver::PageServerConfig, ShimConfig};
use serde_json::Value;

fn reference() -> String {
    let p = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/REFERENCE.md");
    std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{p}: {e}"))
}

/// `key -> default` of the table between `<!-- keys:NAME -->` and `<!-- /keys -->`.
fn table(doc: &str, name: &str) -> BTreeMap<String, String> {
    let start = format!("<!-- keys:{name} -->");
    let body = doc
        .split_once(&start)
        .unwrap_or_else(|| panic!("no {start} in REFERENCE.md"))
        .1;
    let body = body
        .split_once("<!-- /keys -->")
        .expect("unterminated key table")
        .0;
    let mut out = BTreeMap::new();
    for line in body.lines().filter(|l| l.starts_with("| `")) {
        let cells: Vec<&str> = line.split(" | ").map(|c| c.trim()).collect();
        let key = cells[0]
            .trim_start_matches("| ")
            .trim_matches('`')
            .to_string();
        let default = cells
            .get(2)
            .unwrap_or_else(|| panic!("row without a default: {line}"))
            .trim_matches('`')
            .to_string();
        assert!(
            out.insert(key.clone(), default).is_none(),
            "{key} listed twice"
        );
    }
    assert!(!out.is_empty(), "empty key table {name}");
    out
}

/// Dotted key -> the default as a TOML/JSON literal (strings quoted, arrays inline).
fn flatten(prefix: &str, v: &Value, out: &mut BTreeMap<String, String>) {
    match v {
        Value::Object(m) => {
            for (k, v) in m {
                let key = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                flatten(&key, v, out);
            }
        }
        leaf => {
            out.insert(prefix.to_string(), leaf.to_string());
        }
    }
}

fn check(name: &str, doc: &BTreeMap<String, String>, defaults: Value) {
    let mut code = BTreeMap::new();
    flatten("", &defaults, &mut code);
    let missing: Vec<_> = code.keys().filter(|k| !doc.contains_key(*k)).collect();
    let extra: Vec<_> = doc.keys().filter(|k| !code.contains_key(*k)).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "{name}: keys of the configuration not in docs/REFERENCE.md: {missing:?}; keys in \
         docs/REFERENCE.md the configuration does not have: {extra:?}"
    );
    let wrong: Vec<_> = code
        .iter()
        .filter(|(k, v)| doc[*k] != **v)
        .map(|(k, v)| format!("{k}: documented {}, actual {v}", doc[k]))
        .collect();
    assert!(wrong.is_empty(), "{name}: wrong defaults: {wrong:#?}");
}

#[test]
fn shim_keys_and_defaults_match_the_reference() {
    let doc = reference();
    check(
        "shim",
        &table(&doc, "shim"),
        serde_json::to_value(ShimConfig::default()).unwrap(),
    );
}

#[test]
fn pageserver_keys_and_defaults_match_the_reference() {
    let doc = reference();
    check(
        "pageserver",
        &table(&doc, "pageserver"),
        serde_json::to_value(PageServerConfig::default()).unwrap(),
    );
}

#[test]
fn the_documented_defaults_parse_as_the_configuration() {
    // The tables' defaults written back as TOML files must parse (unknown keys are errors) and
    // give the defaults: the reference is a valid configuration.
    let doc = reference();
    let mut shim = String::new();
    let mut section = String::new();
    for (k, v) in table(&doc, "shim") {
        let (t, key) = k.split_once('.').expect("shim keys are table.key");
        if t != section {
            shim.push_str(&format!("[{t}]\n"));
            section = t.to_string();
        }
        shim.push_str(&format!("{key} = {v}\n"));
    }
    assert_eq!(
        ShimConfig::from_toml_str(&shim, "REFERENCE.md").unwrap(),
        ShimConfig::default()
    );
    let ps: String = table(&doc, "pageserver")
        .iter()
        .map(|(k, v)| format!("{k} = {v}\n"))
        .collect();
    assert_eq!(
        PageServerConfig::from_toml_str(&ps, "REFERENCE.md").unwrap(),
        PageServerConfig::default()
    );
}

/// `key -> default` of the man page's `| key | default | valid |` table.
fn man_table(page: &str) -> BTreeMap<String, String> {
    let p = format!("{}/../docs/man/{page}", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{p}: {e}"));
    let mut out = BTreeMap::new();
    let mut in_table = false;
    for line in text.lines() {
        if line.starts_with("| key | default |") {
            in_table = true;
            continue;
        }
        if !line.starts_with('|') {
            in_table = false;
            continue;
        }
        if in_table && !line.starts_with("|---") {
            let cells: Vec<&str> = line.split('|').map(str::trim).collect();
            out.insert(cells[1].to_string(), cells[2].to_string());
        }
    }
    out
}

#[test]
fn man_pages_list_the_same_keys_and_defaults() {
    for (page, defaults) in [
        (
            "containerd-shim-distriproc-v2.8.md",
            serde_json::to_value(ShimConfig::default()).unwrap(),
        ),
        (
            "distriproc-pageserver.8.md",
            serde_json::to_value(PageServerConfig::default()).unwrap(),
        ),
    ] {
        let mut code = BTreeMap::new();
        flatten("", &defaults, &mut code);
        let man = man_table(page);
        assert_eq!(
            man.keys().collect::<Vec<_>>(),
            code.keys().collect::<Vec<_>>(),
            "{page}: key table"
        );
        for (k, v) in &code {
            // The man page may add a note after the value: `"" (local pages)`.
            assert!(
                man[k].starts_with(v.as_str()),
                "{page}: {k}: {} vs {v}",
                man[k]
            );
        }
    }
}

#[test]
fn the_shim_answers_help_version_and_stats_without_starting() {
    use std::process::Command;
    let bin = env!("CARGO_BIN_EXE_containerd-shim-distriproc-v2");
    // No TTRPC_ADDRESS: a shim that tried to start would fail instead.
    for flag in ["-h", "--help", "-help"] {
        let o = Command::new(bin)
            .arg(flag)
            .env_remove("TTRPC_ADDRESS")
            .output()
            .unwrap();
        let out = String::from_utf8_lossy(&o.stdout);
        assert!(o.status.success(), "{flag}: {o:?}");
        assert!(
            out.contains("usage:") && out.contains("stats"),
            "{flag}: {out}"
        );
    }
    let o = Command::new(bin).arg("--version").output().unwrap();
    assert!(o.status.success());
    assert!(String::from_utf8_lossy(&o.stdout).starts_with("io.containerd.distriproc.v2 ("));
    let dir = tempfile::tempdir().unwrap();
    let o = Command::new(bin)
        .args(["stats", &dir.path().display().to_string()])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1), "{o:?}");
    std::fs::write(
        dir.path().join("distriproc-lazy-stats.json"),
        "{\"faults\":3}\n",
    )
    .unwrap();
    let o = Command::new(bin)
        .args(["stats", &dir.path().display().to_string()])
        .output()
        .unwrap();
    assert!(o.status.success(), "{o:?}");
    assert_eq!(String::from_utf8_lossy(&o.stdout), "{\"faults\":3}\n");
    let o = Command::new(bin).arg("stats").output().unwrap();
    assert_eq!(o.status.code(), Some(2), "{o:?}");
}

/// Annotation names of the table between `<!-- annotations -->` and `<!-- /annotations -->`.
fn annotation_table(doc: &str) -> std::collections::BTreeSet<String> {
    let body = doc
        .split_once("<!-- annotations -->")
        .expect("no <!-- annotations --> in REFERENCE.md")
        .1
        .split_once("<!-- /annotations -->")
        .expect("unterminated annotation table")
        .0;
    body.lines()
        .filter(|l| l.starts_with("| `"))
        .map(|l| {
            l.trim_start_matches("| `")
                .split('`')
                .next()
                .unwrap_or_default()
                .to_string()
        })
        .collect()
}

#[test]
fn annotations_match_the_reference() {
    use containerd_shim_distriproc_v2::{
        checkpoint::ANNOTATION_CHECKPOINT_EXIT, remote::ANNOTATION_REMOTE,
        service::GROUP_ANNOTATIONS,
    };
    let code: std::collections::BTreeSet<String> = [
        distriproc_config::ANNOTATION_FILL,
        distriproc_config::ANNOTATION_MODE,
        distriproc_config::ANNOTATION_MEMORY_BUDGET,
        distriproc_config::ANNOTATION_WRITEBACK,
        distriproc_config::ANNOTATION_WRITEBACK_INTERVAL,
        distriproc_config::ANNOTATION_STORE_MODE,
        ANNOTATION_REMOTE,
        ANNOTATION_CHECKPOINT_EXIT,
    ]
    .into_iter()
    .chain(GROUP_ANNOTATIONS)
    .map(str::to_string)
    .collect();
    let doc = annotation_table(&reference());
    assert_eq!(doc, code, "REFERENCE.md annotation table vs the code");
}
