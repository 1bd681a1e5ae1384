//! `containerd-shim-distriproc-v2`: a containerd runtime v2 shim (task API v2) that runs plain
//! containers through runc, like the runc shim, and turns a create that carries a checkpoint
//! into a (lazy) `runc restore`.
//!
//! Layers, as in containerd's runc shim: [`service`] (shim lifecycle, grouping) → [`rpc`] (the
//! ttrpc adapter) → [`task`] (the containers of one shim, the lifecycle RPCs, one lock per
//! container), with one file per heavy verb ([`create`], [`start`], [`restore`],
//! [`checkpoint`]) and for [`exits`], [`events`] and [`stdio`] → [`container`] (containers,
//! processes and their state checks) → [`oci_runtime`] (the process layer, runc behind a trait)
//! → [`runc`] / [`runc_cmd`] / [`io`] (runc commands, stdio).
//! The lazy-pages engine is reached only through [`lazy::LazyBackend`]; this crate does not
//! read CRIU images or serve page faults itself.

pub mod checkpoint;
pub mod checkpoint_lazy;
pub mod container;
pub mod create;
pub mod criu_fixup;
pub mod dump_stream;
pub mod error;
pub mod events;
pub mod exits;
pub mod fetcher;
pub mod info;
pub mod io;
pub mod lazy;
pub mod oci_runtime;
pub mod oom;
pub mod options;
pub mod remote;
pub mod restore;
pub mod retention;
pub mod rpc;
pub mod runc;
pub mod runc_cmd;
pub mod service;
pub mod start;
pub mod stdio;
pub mod store;
pub mod task;
pub mod writeback;
