//! Entry point of `containerd-shim-distriproc-v2`.

use std::path::{Path, PathBuf};

use containerd_shim_distriproc_v2::{
    lazy::STATS_FILE,
    service::{Service, RUNTIME_ID},
};

/// Where containerd (default root) keeps task bundles: `<this>/<namespace>/<id>`.
const TASK_STATE_DIR: &str = "/run/containerd/io.containerd.runtime.v2.task";

const USAGE: &str = "\
containerd-shim-distriproc-v2: the DistriProc containerd runtime v2 shim
(runtime type io.containerd.distriproc.v2). containerd starts it; it is not run by hand.

usage:
  containerd-shim-distriproc-v2 -namespace NS -address ADDR -publish-binary BIN -id ID [-debug] start|delete
                                   (containerd's shim protocol; the server is re-exec'd by `start`)
  containerd-shim-distriproc-v2 stats BUNDLE-DIR|CONTAINER-ID
                                   print <bundle>/distriproc-lazy-stats.json of a lazy restore
                                   (an id is looked up under /run/containerd/io.containerd.runtime.v2.task/*/)
  containerd-shim-distriproc-v2 -info  runtime options (protobuf Any) on stdin -> RuntimeInfo on stdout
  containerd-shim-distriproc-v2 -v|--version
  containerd-shim-distriproc-v2 -h|--help

configuration: runtime options config_body, else config_path, else $DISTRIPROC_CONFIG,
else /etc/distriproc/shim.toml; annotations io.distriproc.* per container.
shim groups: containers sharing io.distriproc.group, else io.containerd.runc.v2.group, else
io.kubernetes.cri.sandbox-id (a pod) are served by one shim process.
environment: DISTRIPROC_CONFIG, DISTRIPROC_EAGER_RESTORE=1, RUST_LOG (log level).
reference: docs/REFERENCE.md, man 8 containerd-shim-distriproc-v2.
";

/// `stats BUNDLE-DIR|CONTAINER-ID`: the stats file's path.
fn stats_path(arg: &str) -> Result<PathBuf, String> {
    let p = Path::new(arg);
    if p.is_file() {
        return Ok(p.to_path_buf());
    }
    if p.is_dir() {
        return Ok(p.join(STATS_FILE));
    }
    if arg.contains('/') || arg.is_empty() || arg.starts_with('.') {
        return Err(format!("{arg}: no such bundle directory"));
    }
    let found: Vec<PathBuf> = std::fs::read_dir(TASK_STATE_DIR)
        .map_err(|e| format!("{TASK_STATE_DIR}: {e}"))?
        .flatten()
        .map(|ns| ns.path().join(arg))
        .filter(|b| b.is_dir())
        .collect();
    match found.as_slice() {
        [b] => Ok(b.join(STATS_FILE)),
        [] => Err(format!(
            "no task {arg:?} under {TASK_STATE_DIR}/*/ (pass its bundle directory)"
        )),
        _ => Err(format!(
            "task {arg:?} exists in several namespaces: {found:?} (pass its bundle directory)"
        )),
    }
}

fn stats(args: &[String]) -> i32 {
    let [arg] = args else {
        eprintln!("usage: containerd-shim-distriproc-v2 stats BUNDLE-DIR|CONTAINER-ID");
        return 2;
    };
    let path = match stats_path(arg) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("containerd-shim-distriproc-v2 stats: {e}");
            return 1;
        }
    };
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            println!("{}", text.trim_end());
            0
        }
        Err(e) => {
            eprintln!(
                "containerd-shim-distriproc-v2 stats: {}: {e} (not a lazily restored task?)",
                path.display()
            );
            1
        }
    }
}

/// glibc malloc arenas the shim may use. By default glibc creates up to 8 per core as threads
/// contend, each keeping the memory it once held; a node runs one shim per pod, and the shim's
/// threads (the RPC runtime, a fetcher's fault and fill threads per restore) allocate little
/// on their hot paths, so two arenas keep its RSS small and flat over many restores.
#[cfg(target_env = "gnu")]
const MALLOC_ARENAS: libc::c_int = 2;

/// Bounds glibc's malloc arenas ([`MALLOC_ARENAS`]) unless `MALLOC_ARENA_MAX` says otherwise.
fn limit_malloc_arenas() {
    if std::env::var_os("MALLOC_ARENA_MAX").is_some() {
        return;
    }
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only sets an allocator parameter; it is called before any other thread
    // exists, and a refused value (return 0) leaves glibc's default in place.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, MALLOC_ARENAS);
    }
}

fn main() {
    limit_malloc_arenas();
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args
        .iter()
        .any(|a| a == "-v" || a == "--version" || a == "-version")
    {
        println!("{RUNTIME_ID} ({})", env!("CARGO_PKG_VERSION"));
        return;
    }
    // containerd-shim's flag parser refuses unknown flags with an opaque error: answer help here.
    if args
        .iter()
        .any(|a| matches!(a.as_str(), "-h" | "--help" | "-help"))
    {
        print!("{USAGE}");
        return;
    }
    // containerd 2.x asks for the runtime's introspection this way (before any shim runs).
    if args.iter().any(|a| a == "-info" || a == "--info") {
        std::process::exit(containerd_shim_distriproc_v2::info::main());
    }
    if args.first().map(String::as_str) == Some("stats") {
        std::process::exit(stats(&args[1..]));
    }
    // The hidden uffd keeper of a lazy restore (`fetcher::spawn_keeper`): no runtime needed.
    if args.first().map(String::as_str) == Some(containerd_shim_distriproc_v2::fetcher::KEEPER_ARG)
    {
        std::process::exit(distriproc_runtime::fetcher::keeper::keeper_main());
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("{RUNTIME_ID}: cannot start the async runtime: {e}");
            std::process::exit(1);
        }
    };
    rt.block_on(containerd_shim::asynchronous::run::<Service>(
        RUNTIME_ID, None,
    ));
}
