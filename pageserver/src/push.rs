//! Storing a checkpoint pushed by `criu dump --page-server` (OPEN2 / ADD_F / CLOSE).
//!
//! The push is written into `<store>/.distriproc/incoming/<id>` and renamed to `<store>/<id>`
//! only after CLOSE, so a broken push never appears as a checkpoint. `<id>` is
//! `<criu_push_prefix><unix seconds>-<n>`. Per pagemap the server writes CRIU-compatible
//! images:
//!
//! * `pagemap-<pid>.img` (or `pagemap-shmem-<id>.img`): common magic, PAGEMAP magic, a
//!   `pagemap_head { pages_id }`, then one `pagemap_entry` per ADD_F with the flags explicit
//!   and the page count in **both** field 2 (read by CRIU ≤ 4.1) and field 5 (preferred by CRIU
//!   ≥ 4.2, `init_compat_pagemap_entry`), so every reader sees the count.
//! * `pages-<pages_id>.img`: the raw pages of the `PE_PRESENT` entries, in entry order,
//!   streamed to disk as they arrive (never held in memory).
//!
//! The rest of a checkpoint (inventory, pstree, mm, core...) stays where `criu dump -D` wrote
//! it; a pushed directory gets a minimal `inventory.img` (image version 2) so that it can be
//! indexed and served on its own, and a `distriproc-push.txt` saying where it came from.
//! Copying the dump's own images into the directory later completes it. Parents are not
//! offered to pushes (OPEN2 answers `has_parent = 0`).

use std::collections::HashSet;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering::Relaxed;

use distriproc_runtime::images::write::{write_inventory, PagemapWriter};
use distriproc_runtime::images::{PAGE_SIZE, PE_LAZY, PE_PARENT, PE_PRESENT};
use distriproc_runtime::protocol::criu::{decode_pm, PsIov, PS_TYPE_PID};
use distriproc_runtime::protocol::ProtocolError;

use crate::server::Ctx;
use crate::PageServerError;

/// Most pagemaps in one push.
pub const MAX_PUSH_PAGEMAPS: usize = 65_536;

struct OpenMap {
    dst_id: u64,
    pagemap_path: PathBuf,
    writer: PagemapWriter,
    last_end: u64,
}

/// Pages received per read of a pushed range.
const RECEIVE_PAGES: u64 = 256;

/// A push in progress.
pub struct Push {
    id: String,
    tmp: PathBuf,
    dst: PathBuf,
    peer: String,
    open: Option<OpenMap>,
    seen: HashSet<u64>,
    next_pages_id: u32,
    pages: u64,
    committed: bool,
}

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> PageServerError {
    let path = path.to_path_buf();
    move |source| PageServerError::Io { what, path, source }
}

impl Push {
    /// Creates the incoming directory of a new pushed checkpoint.
    pub(crate) fn begin(ctx: &Ctx, peer: &str) -> Result<Push, PageServerError> {
        let secs = crate::access::unix_ms() / 1000;
        let incoming = ctx.store.state_dir().join("incoming");
        std::fs::create_dir_all(&incoming).map_err(io("create", &incoming))?;
        loop {
            let n = ctx.push_seq.fetch_add(1, Relaxed);
            let id = format!("{}{secs}-{n}", ctx.opts.criu_push_prefix);
            let dst = ctx.store.dir_of(&id)?;
            let tmp = incoming.join(&id);
            if dst.exists() || tmp.exists() {
                continue;
            }
            std::fs::create_dir(&tmp).map_err(io("create", &tmp))?;
            tracing::info!(peer, checkpoint = %id, "receiving a push from criu dump");
            return Ok(Push {
                id,
                tmp,
                dst,
                peer: peer.to_string(),
                open: None,
                seen: HashSet::new(),
                next_pages_id: 1,
                pages: 0,
                committed: false,
            });
        }
    }

    fn bad(&self, what: String) -> PageServerError {
        PageServerError::Criu {
            peer: self.peer.clone(),
            what: format!("push {}: {what}", self.id),
        }
    }

    fn close_current(&mut self) -> Result<(), PageServerError> {
        if let Some(m) = self.open.take() {
            m.writer.commit().map_err(io("write", &m.pagemap_path))?;
        }
        Ok(())
    }

    /// OPEN / OPEN2: starts the pagemap `dst_id` (`id << 8 | type`).
    pub(crate) fn open(&mut self, dst_id: u64) -> Result<(), PageServerError> {
        self.close_current()?;
        let (ty, id) = decode_pm(dst_id).map_err(|source| PageServerError::Protocol {
            peer: self.peer.clone(),
            source,
        })?;
        if !self.seen.insert(dst_id) {
            return Err(self.bad(format!("pagemap {dst_id:#x} opened twice")));
        }
        if self.seen.len() > MAX_PUSH_PAGEMAPS {
            return Err(self.bad(format!("more than {MAX_PUSH_PAGEMAPS} pagemaps")));
        }
        let name = if ty == PS_TYPE_PID {
            format!("pagemap-{id}.img")
        } else {
            format!("pagemap-shmem-{id}.img")
        };
        let pages_id = self.next_pages_id;
        self.next_pages_id += 1;
        let pagemap_path = self.tmp.join(&name);
        let writer = PagemapWriter::create_named(&self.tmp, &name, pages_id)
            .map_err(io("create", &pagemap_path))?;
        self.open = Some(OpenMap {
            dst_id,
            pagemap_path,
            writer,
            last_end: 0,
        });
        Ok(())
    }

    /// ADD / ADD_F / HOLE: one pagemap entry, and its pages from `r` if `PE_PRESENT`.
    pub(crate) fn add(
        &mut self,
        h: &PsIov,
        flags: u32,
        r: &mut impl Read,
    ) -> Result<(), PageServerError> {
        if self.open.as_ref().is_none_or(|m| m.dst_id != h.dst_id) {
            // CRIU's server does the same ("Deprecated IO w/o open").
            self.open(h.dst_id)?;
        }
        if flags & !(PE_PARENT | PE_LAZY | PE_PRESENT) != 0 {
            return Err(self.bad(format!("unknown pagemap flags {flags:#x}")));
        }
        let len = h.nr_pages.checked_mul(PAGE_SIZE);
        let end = len.and_then(|l| h.vaddr.checked_add(l));
        let Some(end) = end.filter(|_| h.nr_pages > 0 && h.vaddr.is_multiple_of(PAGE_SIZE)) else {
            return Err(self.bad(format!("bad range: {} pages at {:#x}", h.nr_pages, h.vaddr)));
        };
        let peer = self.peer.clone();
        let id = self.id.clone();
        let Some(m) = self.open.as_mut() else {
            return Err(self.bad("no open pagemap".into()));
        };
        if h.vaddr < m.last_end {
            return Err(PageServerError::Criu {
                peer,
                what: format!(
                    "push {id}: range at {:#x} overlaps or precedes the previous one",
                    h.vaddr
                ),
            });
        }
        m.last_end = end;
        if flags & PE_PRESENT == 0 {
            return m
                .writer
                .hole(h.vaddr, h.nr_pages, flags)
                .map_err(io("write", &m.pagemap_path));
        }
        // Received in bounded reads, so that a receive error is told from a write error.
        let mut buf = Vec::new();
        let (mut at, mut left) = (h.vaddr, h.nr_pages);
        while left > 0 {
            let n = left.min(RECEIVE_PAGES);
            buf.resize(usize::try_from(n * PAGE_SIZE).unwrap_or(usize::MAX), 0);
            r.read_exact(&mut buf)
                .map_err(|source| PageServerError::Protocol {
                    peer: peer.clone(),
                    source: if source.kind() == std::io::ErrorKind::UnexpectedEof {
                        ProtocolError::Closed {
                            what: "pushed page data",
                        }
                    } else {
                        ProtocolError::Io {
                            what: "receive pushed pages",
                            source,
                        }
                    },
                })?;
            m.writer
                .data(at, flags, &buf)
                .map_err(io("write", &m.pagemap_path))?;
            at += n * PAGE_SIZE;
            left -= n;
        }
        self.pages += h.nr_pages;
        Ok(())
    }

    /// CLOSE: flushes everything and publishes the checkpoint; returns its id.
    pub(crate) fn commit(mut self) -> Result<String, PageServerError> {
        self.close_current()?;
        let inv = self.tmp.join("inventory.img");
        write_inventory(&self.tmp).map_err(io("write", &inv))?;
        let note = self.tmp.join("distriproc-push.txt");
        std::fs::write(
            &note,
            format!(
                "pushed by criu dump --page-server from {} at unix ms {}: {} pagemaps, {} pages\n\
                 inventory.img is a stand-in; copy the dump's own images here to complete it\n",
                self.peer,
                crate::access::unix_ms(),
                self.seen.len(),
                self.pages
            ),
        )
        .map_err(io("write", &note))?;
        std::fs::rename(&self.tmp, &self.dst).map_err(io("publish", &self.dst))?;
        self.committed = true;
        Ok(self.id.clone())
    }
}

impl Drop for Push {
    fn drop(&mut self) {
        if !self.committed {
            self.open = None;
            let _ = std::fs::remove_dir_all(&self.tmp);
            tracing::warn!(peer = %self.peer, checkpoint = %self.id, "push discarded (no CLOSE)");
        }
    }
}
