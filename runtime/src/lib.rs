//! placeholder
pub mod images;
pub mod runc_cmd;
pub mod source;
