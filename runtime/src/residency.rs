//! Where the lazily managed memory of restored tasks is: still remote, installed and clean
//! (identical to the checkpoint it came from), or dirty (written since it arrived).
//!
//! The fetcher reports it (`FetcherHandle::residency`, `begin_layer`); the layer builder
//! ([`crate::layer`]) turns it, with CRIU's dump of the same tasks, into an incremental
//! checkpoint. Pure data: no syscalls.

/// State of a run of lazily managed pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageState {
    /// Never installed: the only copy is the checkpoint's (the page source's).
    Remote,
    /// Installed and not written since (or since the last layer began): equal to the base
    /// layer's copy.
    Clean,
    /// Written since it arrived (or since the last layer began), or not tracked.
    Dirty,
}

/// One run of pages with one state, at its current address and its dump-time address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResidentRun {
    /// Current address of the first page in the task.
    pub addr: u64,
    /// Address of the first page in the checkpoint the fetcher serves from.
    pub img: u64,
    /// Number of pages.
    pub pages: u64,
    /// What they are.
    pub state: PageState,
}

/// The lazily managed memory of one task.
#[derive(Debug, Clone)]
pub struct TaskResidency {
    /// The task's (virtual) pid.
    pub pid: u32,
    /// The pid whose pages the source serves for it (its own, or its parent's for a task forked
    /// after the restore).
    pub source_pid: u32,
    /// Whether writes are tracked (uffd write-protect). Untracked tasks report installed pages
    /// as dirty.
    pub tracked: bool,
    /// Every page of the task's current lazy ranges, in address order.
    pub runs: Vec<ResidentRun>,
}

/// The lazily managed memory of every task of a restore.
#[derive(Debug, Clone, Default)]
pub struct Residency {
    /// One entry per live task.
    pub tasks: Vec<TaskResidency>,
    /// Pages still remote in tasks forked after the restore, which are not in `tasks` (a
    /// checkpoint cannot complete them and must refuse while this is not 0).
    pub forked_remote_pages: u64,
}

impl Residency {
    /// The entry of task `pid`.
    pub fn task(&self, pid: u32) -> Option<&TaskResidency> {
        self.tasks.iter().find(|t| t.pid == pid)
    }

    /// Pages in `state` over all tasks.
    pub fn pages(&self, state: PageState) -> u64 {
        self.tasks
            .iter()
            .flat_map(|t| t.runs.iter())
            .filter(|r| r.state == state)
            .map(|r| r.pages)
            .sum()
    }
}
