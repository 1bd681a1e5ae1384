//! placeholder
pub mod fetcher;
pub mod images;
pub mod profile;
pub mod protocol;
pub mod remote;
pub mod runc_cmd;
pub mod source;
pub mod stats;
