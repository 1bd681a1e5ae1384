//! CRIU page-server sessions (`distriproc_runtime::protocol::criu`): lazy GETs from an
//! unmodified `criu lazy-pages --page-server`, and the OPEN2/ADD_F/PARENT/CLOSE pushes of
//! `criu dump --page-server` (stored by [`crate::push`]).
//!
//! The header layout (CRIU 4.1: 24 bytes, 4.2: 32 bytes) is fixed by configuration or
//! detected from the first header of the connection. Plain CRIU clients cannot present a
//! token: when the server has one they are refused unless `criu_unauthenticated` is set — or
//! they come through a native hello with the `HELLO_CRIU` flag (the shim's `criu` fetcher
//! mode), which authenticates and names the checkpoint.
//!
//! CRIU has no "not found" reply. A GET that cannot be answered (unknown pid, pages not in the
//! store, no default checkpoint) is logged and the connection is closed, which CRIU reports as
//! "Remote side closed connection". Zero pages inside a GET are sent as zero bytes (CRIU
//! copies what it receives). A GET for more than [`MAX_GET_PAGES`] pages is answered with
//! fewer pages, which CRIU accepts (it re-targets the read to the count in the reply).
//!
//! CRIU sessions have no idle timeout once their first header has arrived (CRIU cannot
//! reconnect, and it may stay silent while a long restore runs); TCP keepalive detects
//! vanished peers instead.

use std::io::{BufReader, Read, Write};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Instant;

use distriproc_config::pageserver::CriuHeader;
use distriproc_runtime::images::PE_PRESENT;
use distriproc_runtime::protocol::criu::{
    detect_layout, Command, HeaderLayout, PsIov, V41_LEN, V42_LEN,
};
use distriproc_runtime::protocol::{read_exact_or_eof, ProtocolError, Range, PAGE_SIZE};

use crate::access::SessionLog;
use crate::checkpoint::{Checkpoint, RunKind};
use crate::native::plan;
use crate::push::Push;
use crate::server::Ctx;
use crate::stream::Stream;
use crate::PageServerError;

/// Most pages answered to one GET (CRIU asks for at most 4 MiB).
pub const MAX_GET_PAGES: u32 = 1024;

fn cerr(peer: &str, what: impl Into<String>) -> PageServerError {
    PageServerError::Criu {
        peer: peer.to_string(),
        what: what.into(),
    }
}

fn io_err<'a>(
    peer: &'a str,
    what: &'static str,
) -> impl Fn(std::io::Error) -> PageServerError + 'a {
    move |source| PageServerError::Protocol {
        peer: peer.to_string(),
        source: ProtocolError::Io { what, source },
    }
}

/// Reads the next header; `Ok(None)` on a clean end of stream.
fn read_header(
    r: &mut BufReader<Stream>,
    layout: HeaderLayout,
    peer: &str,
) -> Result<Option<PsIov>, PageServerError> {
    let mut b = [0u8; V42_LEN];
    let len = layout.len();
    if !read_exact_or_eof(r, &mut b[..len]).map_err(io_err(peer, "read criu header"))? {
        return Ok(None);
    }
    PsIov::decode(layout, &b[..len])
        .map(Some)
        .map_err(|source| PageServerError::Protocol {
            peer: peer.to_string(),
            source,
        })
}

/// Serves one CRIU session. `first4` holds the bytes already read to tell CRIU from native
/// clients (`None` when coming from a native `HELLO_CRIU` session, which also fixes `ck`).
pub(crate) fn serve(
    ctx: &Ctx,
    mut r: BufReader<Stream>,
    mut w: Stream,
    peer: &str,
    first4: Option<[u8; 4]>,
    fixed: Option<Arc<Checkpoint>>,
    client: &str,
) -> Result<(), PageServerError> {
    if fixed.is_none() {
        ctx.metrics.sessions_criu.fetch_add(1, Relaxed);
        if ctx.opts.authenticates() && !ctx.opts.criu_unauthenticated {
            ctx.metrics.errors_auth.fetch_add(1, Relaxed);
            return Err(cerr(
                peer,
                "plain CRIU clients cannot authenticate and a token is configured \
                 (set criu_unauthenticated, or connect through a native HELLO_CRIU session)",
            ));
        }
    }
    let mut first = [0u8; V42_LEN];
    let start = match first4 {
        Some(b) => {
            first[..4].copy_from_slice(&b);
            4
        }
        None => 0,
    };
    if !read_exact_or_eof(&mut r, &mut first[start..V41_LEN])
        .map_err(io_err(peer, "read criu header"))?
    {
        if start == 0 {
            return Ok(());
        }
        return Err(cerr(peer, "connection closed inside the first header"));
    }
    let layout = match ctx.opts.criu_header {
        CriuHeader::V41 => HeaderLayout::V41,
        CriuHeader::V42 => HeaderLayout::V42,
        CriuHeader::Auto => {
            let mut f = [0u8; V41_LEN];
            f.copy_from_slice(&first[..V41_LEN]);
            detect_layout(&f)
        }
    };
    if layout == HeaderLayout::V42 {
        r.read_exact(&mut first[V41_LEN..V42_LEN])
            .map_err(io_err(peer, "read criu header"))?;
    }
    let mut hdr = Some(
        PsIov::decode(layout, &first[..layout.len()]).map_err(|source| {
            PageServerError::Protocol {
                peer: peer.to_string(),
                source,
            }
        })?,
    );
    tracing::debug!(peer, %layout, "criu session");
    // CRIU cannot reconnect: an idle session (restore still running, no faults yet) must not
    // be dropped by the idle timeout. Dead peers are found by TCP keepalive instead.
    w.wait_forever_with_keepalive()
        .map_err(io_err(peer, "set keepalive"))?;
    let mut s = Session {
        ctx,
        peer,
        client,
        layout,
        ck: fixed,
        log: None,
        push: None,
        out: Vec::new(),
    };
    while let Some(h) = hdr {
        match h.command {
            Command::Get => s.get(&h, &mut w)?,
            Command::Open | Command::Open2 => {
                s.push_mut()?.open(h.dst_id)?;
                if h.command == Command::Open2 {
                    w.write_all(&[0u8])
                        .map_err(io_err(peer, "send has_parent"))?;
                }
            }
            Command::Parent => {
                w.write_all(&0i32.to_le_bytes())
                    .map_err(io_err(peer, "send has_parent"))?;
            }
            Command::Add | Command::AddF | Command::Hole => {
                let flags = match h.command {
                    Command::Add => PE_PRESENT,
                    Command::Hole => distriproc_runtime::images::PE_PARENT,
                    _ => u32::from(h.flags),
                };
                s.push_mut()?.add(&h, flags, &mut r)?;
            }
            Command::Close | Command::ForceClose => {
                if let Some(p) = s.push.take() {
                    let id = p.commit()?;
                    ctx.metrics.pushes.fetch_add(1, Relaxed);
                    tracing::info!(peer, checkpoint = %id, "stored checkpoint pushed by criu dump");
                }
                w.write_all(&0i32.to_le_bytes())
                    .map_err(io_err(peer, "send close status"))?;
                // Like CRIU's server: wait for the client to close first (no TIME_WAIT here).
                let mut sink = [0u8; 64];
                while matches!(r.read(&mut sink), Ok(n) if n > 0) {}
                return Ok(());
            }
        }
        hdr = read_header(&mut r, layout, peer)?;
    }
    if s.push.is_some() {
        return Err(cerr(peer, "push ended without CLOSE; discarded"));
    }
    Ok(())
}

struct Session<'a> {
    ctx: &'a Ctx,
    peer: &'a str,
    client: &'a str,
    layout: HeaderLayout,
    ck: Option<Arc<Checkpoint>>,
    log: Option<SessionLog>,
    push: Option<Push>,
    out: Vec<u8>,
}

impl Session<'_> {
    fn push_mut(&mut self) -> Result<&mut Push, PageServerError> {
        if !self.ctx.opts.criu_push {
            return Err(cerr(
                self.peer,
                "pushes (criu dump --page-server) are disabled",
            ));
        }
        if self.push.is_none() {
            self.push = Some(Push::begin(self.ctx, self.peer)?);
        }
        self.push
            .as_mut()
            .ok_or_else(|| cerr(self.peer, "no push session"))
    }

    fn checkpoint(&mut self) -> Result<Arc<Checkpoint>, PageServerError> {
        if let Some(c) = &self.ck {
            return Ok(c.clone());
        }
        let Some(id) = &self.ctx.opts.criu_default else {
            return Err(cerr(
                self.peer,
                "GET from a plain CRIU client, but no --criu-default checkpoint is configured",
            ));
        };
        let c = self.ctx.store.get(id)?;
        self.ck = Some(c.clone());
        Ok(c)
    }

    fn get(&mut self, h: &PsIov, w: &mut Stream) -> Result<(), PageServerError> {
        let t0 = Instant::now();
        let ck = self.checkpoint()?;
        let log = self.log.get_or_insert_with(|| {
            self.ctx
                .logs
                .session(ck.id(), "criu", self.peer, self.client)
        });
        let pid = u32::try_from(h.dst_id)
            .map_err(|_| cerr(self.peer, format!("GET for pid {:#x}", h.dst_id)))?;
        if h.nr_pages == 0 {
            return Err(cerr(self.peer, "GET for 0 pages"));
        }
        let range = Range {
            pid,
            vaddr: h.vaddr,
            nr_pages: u32::try_from(h.nr_pages.min(u64::from(MAX_GET_PAGES))).unwrap_or(1),
        };
        let mut runs = Vec::new();
        let pages = plan(&ck, &range, false, false, &mut runs).map_err(|status| {
            self.ctx.metrics.errors_range.fetch_add(1, Relaxed);
            cerr(
                self.peer,
                format!(
                    "GET of {} pages at {:#x} for pid {pid} in checkpoint {}: {status}; \
                     closing (CRIU has no error reply)",
                    h.nr_pages,
                    h.vaddr,
                    ck.id()
                ),
            )
        })?;
        let reply = PsIov {
            command: Command::AddF,
            flags: u16::try_from(PE_PRESENT).unwrap_or(4),
            nr_pages: pages,
            vaddr: h.vaddr,
            dst_id: h.dst_id,
        };
        self.out.clear();
        self.out.resize(self.layout.len(), 0);
        reply
            .encode(self.layout, &mut self.out)
            .map_err(|source| PageServerError::Protocol {
                peer: self.peer.to_string(),
                source,
            })?;
        let mut data = 0u64;
        for (n, kind) in &runs {
            let at = self.out.len();
            let len = usize::try_from(*n).unwrap_or(0) * PAGE_SIZE;
            self.out.resize(at + len, 0);
            if let RunKind::Data { file, offset, .. } = *kind {
                ck.read(file, offset, &mut self.out[at..])?;
                data += n;
            }
        }
        w.write_all(&self.out)
            .map_err(io_err(self.peer, "send pages"))?;
        log.range(pid, h.vaddr, pages, data);
        let m = &self.ctx.metrics;
        m.requests_criu.fetch_add(1, Relaxed);
        m.pages_data.fetch_add(data, Relaxed);
        m.pages_zero.fetch_add(pages - data, Relaxed);
        m.bytes.fetch_add(pages * PAGE_SIZE as u64, Relaxed);
        m.observe(t0.elapsed());
        Ok(())
    }
}
