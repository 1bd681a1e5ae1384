//! `distriproc-pageserver`: the page server daemon that sits beside the checkpoint store.
//!
//! Not built yet: the page server, its native protocol and CRIU wire compatibility are
//! tracked by the page-server issue. Until then this binary says so and exits non-zero, and
//! the shim serves pages from the local checkpoint directory (the embedded default).

use std::process::ExitCode;

fn main() -> ExitCode {
    eprintln!(
        "distriproc-pageserver: not available in this build; lazy restores use the embedded \
         default (pages served from the local checkpoint directory by the shim)"
    );
    ExitCode::from(2)
}
