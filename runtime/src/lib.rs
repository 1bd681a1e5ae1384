//! placeholder
pub mod fetcher;
pub mod images;
pub mod protocol;
pub mod remote;
pub mod runc_cmd;
pub mod source;
pub mod stats;
