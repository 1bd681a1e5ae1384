//! Entry point of `containerd-shim-distriproc-v2`.

use containerd_shim_distriproc_v2::service::{Service, RUNTIME_ID};

fn main() {
    if std::env::args().any(|a| a == "-v" || a == "--version" || a == "-version") {
        println!("{RUNTIME_ID} ({})", env!("CARGO_PKG_VERSION"));
        return;
    }
    // The hidden uffd keeper of a lazy restore (`fetcher::spawn_keeper`): no runtime needed.
    if std::env::args().nth(1).as_deref()
        == Some(containerd_shim_distriproc_v2::fetcher::KEEPER_ARG)
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
