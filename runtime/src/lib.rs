//! placeholder
pub mod runc_cmd;
