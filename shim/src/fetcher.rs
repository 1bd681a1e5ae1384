//! The production [`LazyBackend`](crate::lazy::LazyBackend): the engine's in-process fetcher.
//!
//! Until `distriproc_runtime::fetcher` lands this returns no backend and restores are eager.

use std::sync::Arc;

use crate::lazy::LazyBackend;

/// The lazy backend, if the engine provides one.
pub fn backend() -> Option<Arc<dyn LazyBackend>> {
    None
}
