//! `containerd-shim-distriproc-v2`: a containerd runtime v2 shim (task API v2) that runs plain
//! containers through runc, like the runc shim, and turns a create that carries a checkpoint
//! into a (lazy) `runc restore`.
//!
//! Layers: [`service`] (shim lifecycle) → [`task`] (Task RPCs, events, exits) →
//! [`container`] (containers and processes) → [`runc`] / [`io`] (runc commands, stdio).
//! The lazy-pages engine is reached only through [`lazy::LazyBackend`]; this crate does not
//! read CRIU images or serve page faults itself.

pub mod checkpoint_lazy;
pub mod container;
pub mod criu_fixup;
pub mod dump_stream;
pub mod error;
pub mod fetcher;
pub mod info;
pub mod io;
pub mod lazy;
pub mod oom;
pub mod options;
pub mod remote;
pub mod retention;
pub mod runc;
pub mod service;
pub mod store;
pub mod task;
