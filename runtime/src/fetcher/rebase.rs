//! A new base for a running fetcher: the page source replaced by one that serves a newer
//! layer of the same tasks, and the pages that layer holds as the tasks have them made
//! evictable again.
//!
//! The memory budget may only evict a page whose copy at the page source is current
//! (`Task::written` clear: never written since it arrived). After a checkpoint of the running
//! container has been published as a layer, every page that was not written since the dump
//! (dirty bit clear: [`super::ResidencyProbe::begin_layer`] cleared them all at the dump) is
//! identical to that layer's copy, so once the fetcher reads from that layer those pages may go
//! remote again. [`SourceCell`] is the replaceable source the fault thread and the fill
//! workers read through, and [`release_written`] clears `written` where the dirty bit shows
//! that the new base holds the page's content.
//!
//! Why a read through the old source cannot install stale data after the swap: every read
//! takes the source after claiming the page's bit, and a page whose content differs between
//! the old and the new source is a written one, which is installed (its bit claimed) until it
//! is evicted, which needs `written` clear, which [`release_written`] does only after the
//! swap. Pages that stayed remote or clean hold the same content in both layers.

use std::sync::{Arc, PoisonError, RwLock};

use super::task::Task;
use crate::source::PageSource;

/// The fetcher's page source, replaceable while it runs.
pub(crate) struct SourceCell(RwLock<Arc<dyn PageSource>>);

impl SourceCell {
    pub fn new(src: Arc<dyn PageSource>) -> SourceCell {
        SourceCell(RwLock::new(src))
    }

    /// The current source; take it after claiming the bits to read (see the module docs).
    pub fn get(&self) -> Arc<dyn PageSource> {
        self.0
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Replaces the source; reads already under way finish on the old one.
    pub fn set(&self, src: Arc<dyn PageSource>) -> Arc<dyn PageSource> {
        std::mem::replace(
            &mut *self.0.write().unwrap_or_else(PoisonError::into_inner),
            src,
        )
    }
}

/// Clears `written` for every page of `t` whose dirty bit is clear (not written since the
/// layer the source now serves was dumped) and that is not a zero page (never protected, so
/// its dirty bit proves nothing); returns how many. Serialised with write-protect faults by
/// the task's gate: a write resolved meanwhile sets both bits again.
pub(crate) fn release_written(t: &Task) -> u64 {
    if !t.tracked || t.forked {
        return 0;
    }
    let _gate = t.wp_gate();
    let mut n = 0;
    for b in 0..t.written.len() {
        if t.written.test(b) && !t.dirty.test(b) && !t.zeroed.test(b) && t.written.release(b) {
            n += 1;
        }
    }
    n
}
