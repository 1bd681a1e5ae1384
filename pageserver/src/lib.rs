//! `distriproc-pageserver`: the long-running page server beside the checkpoint store.
//!
//! It owns serving checkpoint memory: the store of checkpoint directories and their page
//! indexes ([`checkpoint`]), the native protocol sessions of DistriProc's fetchers
//! ([`native`]), CRIU's own page-server protocol for unmodified `criu lazy-pages` and
//! `criu dump --page-server` ([`criu`], [`push`]), the per-checkpoint access log and its
//! hot/cold statistics ([`access`], [`stats`]), Prometheus metrics ([`metrics`]), and
//! retention: the layer graph of the store ([`layers`]), deleting and collecting checkpoints
//! ([`gc`]) and squashing deleted layers into the layer over them ([`compact`]).
//!
//! It deliberately does not define wire formats or parse CRIU images: both live in
//! `distriproc_runtime` (`protocol`, `images`) and are shared with the client side. It does
//! not restore anything either; restores run in the shim.
//!
//! # Usage
//!
//! ```text
//! distriproc-pageserver --store /srv/ckpt --listen 0.0.0.0:7060 --listen unix:/run/ps.sock \
//!     --token-file /etc/distriproc/pageserver.token --criu-default web-1 \
//!     --criu-unauthenticated --metrics 127.0.0.1:9460
//! # unmodified CRIU, restoring /srv/ckpt/web-1 (local metadata images in IMG):
//! criu lazy-pages -D IMG --page-server --address HOST --port 7060 &
//! criu restore -D IMG --lazy-pages
//! # unmodified CRIU, pushing a dump into the store (logged as push-<time>-<n>):
//! criu dump -t PID -D IMG --page-server --address HOST --port 7060
//! # the shim's remote Checkpoint uploads images as a new checkpoint (native protocol v2):
//! #   HELLO_UPLOAD, files, End -> stored atomically as /srv/ckpt/<id> (see `upload`)
//! # TLS on the TCP listeners (clients: [pageserver] tls_ca_file), clients must also present a
//! # certificate from client-ca.pem (optional), and per-checkpoint tokens
//! # ("TOKEN" = ["ckpt-a*", ...]: a token reads and uploads only the ids its patterns match):
//! distriproc-pageserver --store /srv/ckpt --tls-cert server.crt --tls-key server.key \
//!     --tls-client-ca client-ca.pem --tokens-file /etc/distriproc/pageserver-tokens.toml
//! # hot/cold pages per checkpoint, from the access logs:
//! distriproc-pageserver stats --store /srv/ckpt web-1
//! # retention: delete, then collect (also every gc_interval_s inside the server):
//! distriproc-pageserver delete --store /srv/ckpt web-0
//! distriproc-pageserver gc --store /srv/ckpt --expire-superseded-after-s 86400
//! ```
//!
//! The shim reads pages with `distriproc_runtime::remote::RemotePages` (native protocol), or
//! opens a native session with the `HELLO_CRIU` flag and hands the socket to
//! `criu lazy-pages --page-server --ps-socket FD`.
//!
//! Threads, not async: one acceptor thread per listen address and one thread per connection.
//! A connection reads a request, answers it with `pread`s into one reusable buffer, and writes
//! the answer; clients pipeline by sending several requests before reading answers, and run
//! several connections at once for parallelism.

pub mod access;
pub mod checkpoint;
pub mod compact;
pub mod criu;
pub mod gc;
pub mod layers;
pub mod metrics;
pub mod native;
pub mod push;
pub mod server;
pub mod stats;
mod stream;
pub mod upload;

use std::path::PathBuf;

use distriproc_runtime::images::ImageError;
use distriproc_runtime::protocol::ProtocolError;

pub use server::{Server, ServerHandle, ServerOptions};

/// Errors of the page server. Each names the checkpoint, file, address or peer concerned.
#[derive(Debug, thiserror::Error)]
pub enum PageServerError {
    /// A checkpoint id that is not a plain name inside the store.
    #[error("bad checkpoint id {id:?}: {why}")]
    BadCheckpointId {
        /// The id as received.
        id: String,
        /// What is wrong with it.
        why: String,
    },
    /// No such checkpoint directory in the store.
    #[error("unknown checkpoint {id:?} (no directory {})", dir.display())]
    UnknownCheckpoint {
        /// The id.
        id: String,
        /// Where it was looked for.
        dir: PathBuf,
    },
    /// The checkpoint was deleted (`distriproc-pageserver delete` or expiry); its pages may
    /// still serve the layers over it, but it is not served or extended itself.
    #[error("checkpoint {id:?} was deleted from the store")]
    DeletedCheckpoint {
        /// The id.
        id: String,
    },
    /// The checkpoint's images cannot be read.
    #[error("checkpoint {id:?} is unreadable")]
    Images {
        /// The id.
        id: String,
        /// The reader's error.
        #[source]
        source: ImageError,
    },
    /// A pagemap of a task that pstree.img does not list (images from different dumps, or a
    /// renamed file): the checkpoint is refused rather than served with the wrong task's memory.
    #[error("checkpoint {id:?}: {} is for pid {pid}, which is not in pstree.img", path.display())]
    PidNotInPstree {
        /// The checkpoint.
        id: String,
        /// The pagemap file.
        path: PathBuf,
        /// Its pid.
        pid: u32,
    },
    /// A file or directory operation failed.
    #[error("cannot {what} {}", path.display())]
    Io {
        /// The operation.
        what: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Binding a listen address failed.
    #[error("cannot listen on {addr}")]
    Listen {
        /// The address.
        addr: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A peer broke the protocol or the connection failed.
    #[error("session with {peer}")]
    Protocol {
        /// The peer.
        peer: String,
        /// What went wrong.
        #[source]
        source: ProtocolError,
    },
    /// A CRIU session asked for something the server cannot do.
    #[error("criu session with {peer}: {what}")]
    Criu {
        /// The peer.
        peer: String,
        /// What was refused.
        what: String,
    },
    /// A connection that speaks neither protocol.
    #[error("connection from {peer} speaks neither protocol (first bytes {first}); closed")]
    UnknownProtocol {
        /// The peer.
        peer: String,
        /// The first bytes received, in hex.
        first: String,
    },
    /// An invalid option.
    #[error("invalid option {name}: {why}")]
    BadOption {
        /// The option.
        name: &'static str,
        /// What is wrong.
        why: String,
    },
}
