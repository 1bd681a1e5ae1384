//! Entry point of `containerd-shim-distriproc-v2`.

use containerd_shim_distriproc_v2::service::{Service, RUNTIME_ID};

#[tokio::main]
async fn main() {
    if std::env::args().any(|a| a == "-v" || a == "--version" || a == "-version") {
        println!("{RUNTIME_ID} ({})", env!("CARGO_PKG_VERSION"));
        return;
    }
    containerd_shim::asynchronous::run::<Service>(RUNTIME_ID, None).await;
}
