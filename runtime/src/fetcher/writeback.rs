//! Write-back: the pages the running tasks wrote, taken out of them as a pages-only layer, so
//! that once the layer is published and the fetcher reads from it
//! ([`super::ResidencyProbe::rebase`]) those pages may be evicted like any clean page.
//!
//! # What the layer holds
//!
//! One `pagemap-<pid>.img` and `pages-<n>.img` per task the fetcher serves, an
//! `inventory.img` (so it reads as an images directory) and the marker file
//! [`WRITEBACK_MARKER`]. Each pagemap covers exactly the task's lazy ranges as the fetcher
//! manages them now, at their checkpoint addresses (the addresses the source is read by): the
//! pages written since the last layer as data, everything else `PE_PARENT`. It is not a
//! checkpoint: no CRIU image of the tasks is in it, nothing restores from it. It is a layer of
//! the tasks' memory, and a later checkpoint of the container is a layer over it.
//!
//! # Why the data is right without stopping the tasks
//!
//! [`super::task::begin_layer`] write-protects every dirty page again and then clears its
//! dirty bit; only then are the pages read (`process_vm_readv`). A write after the protection
//! is a write-protect fault, and its page is marked dirty before the writer goes on
//! (`task::unprotect`, under the same gate). So a page whose dirty bit is still clear when the
//! layer is published was not written after it was read: the layer holds its content, and the
//! rebase releases it. A page written while it was read may hold torn data in the layer, but
//! its dirty bit is set: it stays pinned and goes into the next layer. A write between the
//! dirty test and the protection hits a page that is not protected yet, and is read after it.
//!
//! Refused instead (the pages stay pinned, nothing is lost): ranges a task moved (`mremap`:
//! the layer names pages at their checkpoint addresses, and a later checkpoint layers over
//! them only where they did not move), processes forked after the restore that still have
//! remote pages (they read their parent's pages by its pid), and any address-space change
//! while the layer was built (the generation).

use std::io::{self, IoSliceMut};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering::{Relaxed, SeqCst};
use std::sync::Arc;

use nix::sys::uio::{process_vm_readv, RemoteIoVec};
use nix::unistd::Pid;

use super::resident::{LayerMark, ResidencyProbe};
use super::task::{Task, PAGE};
use crate::images::write::{write_inventory, PagemapWriter};
use crate::images::{PAGE_SIZE, PE_LAZY, PE_PARENT, PE_PRESENT};

/// File that marks a layer directory as a write-back layer (the page server's retention
/// treats a write-back layer with a layer over it as deleted).
pub const WRITEBACK_MARKER: &str = "distriproc-writeback";
/// Pages read from a task per `process_vm_readv`.
const READ_PAGES: usize = 256;

/// Why no write-back layer was built.
#[derive(Debug, thiserror::Error)]
pub enum WriteBackError {
    /// The tasks' host pids cannot be found (the container's init is not known yet).
    #[error("the restored tasks' host pids are not known yet")]
    NoHost,
    /// A task moved part of its lazy memory.
    #[error("task {pid} moved lazy memory (mremap): a write-back layer names pages at their checkpoint addresses")]
    Moved {
        /// The task's pid in its namespace.
        pid: u32,
    },
    /// A process forked after the restore still reads remote pages.
    #[error("a process forked after the restore still has {pages} remote pages, read by its parent's pid")]
    Forked {
        /// Its remote pages.
        pages: u64,
    },
    /// The address space of a task changed while the layer was built.
    #[error("the tasks' address space changed while the layer was built")]
    Changed,
    /// A task is gone.
    #[error("task {pid} is gone")]
    Gone {
        /// The task's pid in its namespace.
        pid: u32,
    },
    /// Pages could not be read from a task.
    #[error("read {pages} pages at {addr:#x} of task {pid}")]
    Read {
        /// The task's pid in its namespace.
        pid: u32,
        /// First address.
        addr: u64,
        /// Pages.
        pages: usize,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The layer's files could not be written.
    #[error("write the write-back layer in {}", dir.display())]
    Io {
        /// The layer directory.
        dir: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

/// A write-back layer written into its directory, waiting to be published.
#[must_use = "commit once the layer is published; dropping it marks the pages written again"]
#[derive(Debug)]
pub struct WrittenBack {
    mark: LayerMark,
    probe: ResidencyProbe,
    /// Pages of data in the layer.
    pub pages: u64,
    /// Tasks the layer covers.
    pub tasks: usize,
}

impl WrittenBack {
    /// The layer was published: its pages count as clean from now on (until written again),
    /// and become evictable once the fetcher reads from the layer
    /// ([`ResidencyProbe::rebase`]).
    pub fn commit(self) {
        let c = &self.probe.reg.counters;
        c.pages_written_back.fetch_add(self.pages, Relaxed);
        c.writeback_layers.fetch_add(1, Relaxed);
        self.mark.commit();
    }
}

impl ResidencyProbe {
    /// Writes the pages the tasks wrote since the last layer into the empty directory `dir`
    /// as a write-back layer (see the module docs). `Ok(None)`: nothing was written. The tasks
    /// keep running; hold the [`super::LayerTurn`] until the layer is published or dropped.
    pub fn write_back(&self, dir: &Path) -> Result<Option<WrittenBack>, WriteBackError> {
        // Taken first: any change from here on (a move, a fork, a discard) refuses the layer.
        let generation = self.generation();
        let tasks = self.reg.tasks();
        let forked: u64 = tasks
            .iter()
            .filter(|t| t.forked)
            .map(|t| t.remaining.load(SeqCst))
            .sum();
        if forked > 0 {
            return Err(WriteBackError::Forked { pages: forked });
        }
        let own: Vec<Arc<Task>> = tasks.into_iter().filter(|t| !t.forked).collect();
        if own.is_empty() {
            return Ok(None);
        }
        if let Some(t) = own
            .iter()
            .find(|t| t.space().iovs.iter().any(|v| v.start != v.img))
        {
            return Err(WriteBackError::Moved { pid: t.pid });
        }
        let ns_of = self.reg.ns_of.load(SeqCst);
        if ns_of <= 0 {
            return Err(WriteBackError::NoHost);
        }
        let mark = self.begin_layer();
        if mark.pages() == 0 {
            return Ok(None);
        }
        let io_err = |source| WriteBackError::Io {
            dir: dir.to_path_buf(),
            source,
        };
        let mut pages = 0;
        let mut buf = vec![0u8; READ_PAGES * PAGE];
        for (i, t) in own.iter().enumerate() {
            let mut cleared: Vec<usize> = mark.bits_of(t).to_vec();
            cleared.sort_unstable();
            let host = if cleared.is_empty() {
                0
            } else {
                super::budget::resolve(ns_of, t.pid).ok_or(WriteBackError::Gone { pid: t.pid })?
            };
            let mut iovs = t.space().iovs.clone();
            iovs.sort_by_key(|v| v.img);
            let pages_id = u32::try_from(i + 1).unwrap_or(u32::MAX);
            let mut w = PagemapWriter::create(dir, t.pid, pages_id).map_err(io_err)?;
            for iov in &iovs {
                if iov.start != iov.img {
                    return Err(WriteBackError::Moved { pid: t.pid });
                }
                let n = usize::try_from(iov.pages()).unwrap_or(0);
                let mut c = cleared.partition_point(|&b| b < iov.bit);
                let mut p = 0;
                while p < n {
                    let data = cleared.get(c) == Some(&(iov.bit + p));
                    let s = p;
                    while p < n && (cleared.get(c) == Some(&(iov.bit + p))) == data {
                        if data {
                            c += 1;
                        }
                        p += 1;
                        if data && p - s == READ_PAGES {
                            break;
                        }
                    }
                    let addr = iov.start + s as u64 * PAGE_SIZE;
                    let len = (p - s) * PAGE;
                    if !data {
                        w.hole(addr, (p - s) as u64, PE_PARENT).map_err(io_err)?;
                        continue;
                    }
                    read_task(host, t.pid, addr, &mut buf[..len])?;
                    w.data(addr, PE_PRESENT | PE_LAZY, &buf[..len])
                        .map_err(io_err)?;
                    pages += (p - s) as u64;
                }
            }
            w.commit().map_err(io_err)?;
        }
        write_inventory(dir).map_err(io_err)?;
        std::fs::write(
            dir.join(WRITEBACK_MARKER),
            "pages written by the running tasks; not a checkpoint\n",
        )
        .map_err(io_err)?;
        if self.generation() != generation {
            return Err(WriteBackError::Changed);
        }
        Ok(Some(WrittenBack {
            mark,
            probe: self.clone(),
            pages,
            tasks: own.len(),
        }))
    }
}

/// Reads `buf.len()` bytes at `addr` of host process `host` (task `pid`).
fn read_task(host: i32, pid: u32, addr: u64, buf: &mut [u8]) -> Result<(), WriteBackError> {
    let want = buf.len();
    let err = |source| WriteBackError::Read {
        pid,
        addr,
        pages: want / PAGE,
        source,
    };
    let remote = [RemoteIoVec {
        base: usize::try_from(addr).unwrap_or(usize::MAX),
        len: want,
    }];
    match process_vm_readv(Pid::from_raw(host), &mut [IoSliceMut::new(buf)], &remote) {
        Ok(n) if n == want => Ok(()),
        Ok(n) => Err(err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("{n} of {want} bytes"),
        ))),
        Err(nix::errno::Errno::ESRCH) => Err(WriteBackError::Gone { pid }),
        Err(e) => Err(err(io::Error::from(e))),
    }
}
