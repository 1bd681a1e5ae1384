//! Native protocol sessions (`distriproc_runtime::protocol`): hello, token and checkpoint
//! checks, then requests answered in order from the checkpoint's index.
//!
//! A range is answered from its start until the first page that cannot be served (data not
//! in the store, or not lazy under `lazy_only`) — or, with `REQ_FIRST_RUN`, until the first
//! change of kind. If the very first page cannot be served the range gets an error status.
//! A malformed or oversized request gets a request-level error and the connection is closed.

use distriproc_runtime::error_chain;
use std::io::{BufReader, IoSlice, Write};
use std::sync::atomic::Ordering::Relaxed;
use std::time::Instant;

use distriproc_runtime::protocol::{
    self, bitmap_set, encode_range_reply_header, encode_response_header, read_ranges,
    read_request_header, Hello, HelloReply, HelloStatus, ProtocolError, Range, RangeReplyHeader,
    RangeStatus, RequestKind, RequestStatus, MAX_RANGES, MAX_REQUEST_PAGES, PAGE_SIZE,
    REQ_FIRST_RUN, VERSION,
};
use distriproc_runtime::protocol::{HELLO_RESUME, HELLO_UPLOAD, VERSION_RESUME, VERSION_UPLOAD};

use crate::checkpoint::{Checkpoint, RunKind};
use crate::server::Ctx;
use crate::stream::Stream;
use crate::PageServerError;

/// Constant-time comparison of two tokens (length leaks, content does not).
pub fn token_eq(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The outcome of checking a hello's token against the server's tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Auth {
    /// No authentication configured, the shared token, or a grant matching the checkpoint.
    Allowed,
    /// A token the server does not know (or none).
    UnknownToken,
    /// A known per-checkpoint token whose patterns do not match the checkpoint.
    NotAllowed,
}

/// Checks `token` for `checkpoint`: the shared token allows every checkpoint, a tokens-file
/// token only the ids its patterns match. Every configured token is compared (in constant time
/// per token), so the time taken does not tell which one matched.
pub fn authorize(opts: &crate::ServerOptions, token: &str, checkpoint: &str) -> Auth {
    if !opts.authenticates() {
        return Auth::Allowed;
    }
    let shared = opts.token.as_deref().is_some_and(|t| token_eq(token, t));
    let mut known = false;
    let mut allowed = false;
    for g in &opts.grants {
        if token_eq(token, &g.token) {
            known = true;
            allowed |= g.allows(checkpoint);
        }
    }
    if shared || allowed {
        Auth::Allowed
    } else if known {
        Auth::NotAllowed
    } else {
        Auth::UnknownToken
    }
}

fn perr(peer: &str) -> impl Fn(ProtocolError) -> PageServerError + '_ {
    move |source| PageServerError::Protocol {
        peer: peer.to_string(),
        source,
    }
}

fn send(w: &mut Stream, b: &[u8], peer: &str) -> Result<(), PageServerError> {
    w.write_all(b).map_err(|source| PageServerError::Protocol {
        peer: peer.to_string(),
        source: ProtocolError::Io {
            what: "write reply",
            source,
        },
    })
}

/// Serves one native session; the 4 magic bytes were already read from `r`.
pub(crate) fn serve(
    ctx: &Ctx,
    mut r: BufReader<Stream>,
    mut w: Stream,
    peer: &str,
) -> Result<(), PageServerError> {
    let (hello, flags) = match Hello::read_after_magic_with_flags(&mut r) {
        Ok(h) => h,
        Err(e) => {
            let reply = HelloReply::refuse(HelloStatus::Malformed, &e.to_string());
            let _ = send(&mut w, &reply.encode(), peer);
            return Err(perr(peer)(e));
        }
    };
    let refuse = |w: &mut Stream, status, msg: String| {
        let _ = send(w, &HelloReply::refuse(status, &msg).encode(), peer);
        Err(PageServerError::Criu {
            peer: peer.to_string(),
            what: format!("hello refused ({status}): {msg}"),
        })
    };
    match authorize(&ctx.opts, &hello.token, &hello.checkpoint) {
        Auth::Allowed => {}
        Auth::UnknownToken => {
            ctx.metrics.errors_auth.fetch_add(1, Relaxed);
            return refuse(
                &mut w,
                HelloStatus::Unauthorized,
                "wrong or missing token".into(),
            );
        }
        Auth::NotAllowed => {
            ctx.metrics.errors_auth.fetch_add(1, Relaxed);
            return refuse(
                &mut w,
                HelloStatus::Unauthorized,
                format!(
                    "this token is not allowed checkpoint {:?}",
                    hello.checkpoint
                ),
            );
        }
    }
    let version = hello.version.min(VERSION);
    if flags & HELLO_UPLOAD != 0 {
        if version < VERSION_UPLOAD || hello.criu_mode {
            return refuse(
                &mut w,
                HelloStatus::Malformed,
                format!("upload needs protocol version {VERSION_UPLOAD} and no other flag"),
            );
        }
        return crate::upload::serve(ctx, r, w, peer, &hello, version);
    }
    let resumed = flags & HELLO_RESUME != 0;
    if resumed && (version < VERSION_RESUME || flags & HELLO_UPLOAD != 0) {
        return refuse(
            &mut w,
            HelloStatus::Malformed,
            format!("resume needs protocol version {VERSION_RESUME} and a read session"),
        );
    }
    let ck = match ctx.store.get_for(&hello.checkpoint, resumed) {
        Ok(c) => c,
        Err(e @ PageServerError::BadCheckpointId { .. }) => {
            return refuse(&mut w, HelloStatus::BadCheckpointId, e.to_string())
        }
        Err(PageServerError::UnknownCheckpoint { id, .. }) => {
            return refuse(
                &mut w,
                HelloStatus::UnknownCheckpoint,
                format!("no checkpoint {id:?} in the store"),
            )
        }
        Err(e @ PageServerError::DeletedCheckpoint { .. }) => {
            return refuse(&mut w, HelloStatus::UnknownCheckpoint, e.to_string())
        }
        Err(e) => {
            let msg = error_chain(&e);
            return refuse(&mut w, HelloStatus::BadCheckpoint, msg);
        }
    };
    let max_ranges = u16::try_from(MAX_RANGES).unwrap_or(u16::MAX);
    send(
        &mut w,
        &HelloReply::ok(version, max_ranges, MAX_REQUEST_PAGES).encode(),
        peer,
    )?;
    ctx.metrics.sessions_native.fetch_add(1, Relaxed);
    // Held while the session reads: retention leaves a checkpoint alone while anyone reads it
    // (crate::gc). The directory of a cached index may have been renamed away meanwhile (a
    // squash): then there is nothing to hold.
    let _reading = std::fs::File::open(ck.dir())
        .ok()
        .and_then(|d| nix::fcntl::Flock::lock(d, nix::fcntl::FlockArg::LockSharedNonblock).ok());
    if hello.criu_mode {
        return crate::criu::serve(ctx, r, w, peer, None, Some(ck), &hello.client);
    }
    let mut log = ctx.logs.session(ck.id(), "native", peer, &hello.client);
    tracing::debug!(peer, checkpoint = ck.id(), session = log.session(), client = %hello.client, "native session");
    let mut ranges: Vec<Range> = Vec::with_capacity(MAX_RANGES);
    let mut out: Vec<u8> = Vec::with_capacity(1 << 20);
    let plain = w.is_plain();
    loop {
        if plain && !ctx.opts.busy_poll.is_zero() && r.buffer().is_empty() {
            r.get_ref().poll_readable(ctx.opts.busy_poll);
        }
        let h = match read_request_header(&mut r, MAX_RANGES) {
            Ok(Some(h)) => h,
            Ok(None) => return Ok(()),
            Err(e) if e.is_transport() => return Err(perr(peer)(e)),
            Err(e) => {
                out.clear();
                encode_response_header(0, RequestStatus::Malformed, 0, &e.to_string(), &mut out);
                let _ = send(&mut w, &out, peer);
                return Err(perr(peer)(e));
            }
        };
        if h.kind == RequestKind::Info {
            out.clear();
            if version < VERSION_UPLOAD {
                let msg = "info needs protocol version 2";
                encode_response_header(h.request_id, RequestStatus::Malformed, 0, msg, &mut out);
                let _ = send(&mut w, &out, peer);
                return Err(perr(peer)(ProtocolError::Invalid {
                    what: "request kind for version 1",
                    value: u64::from(RequestKind::Info.to_wire()),
                }));
            }
            match crate::layers::layer_digest(ck.dir()) {
                Ok(d) => encode_response_header(
                    h.request_id,
                    RequestStatus::Ok,
                    0,
                    &d.to_message(),
                    &mut out,
                ),
                Err(e) => encode_response_header(
                    h.request_id,
                    RequestStatus::StoreFailed,
                    0,
                    &format!("read {}: {e}", ck.dir().display()),
                    &mut out,
                ),
            }
            send(&mut w, &out, peer)?;
            continue;
        }
        if h.kind == RequestKind::Goodbye {
            out.clear();
            encode_response_header(h.request_id, RequestStatus::Ok, 0, "", &mut out);
            return send(&mut w, &out, peer);
        }
        if let Err(e) = read_ranges(&mut r, h.nr_ranges, MAX_REQUEST_PAGES, &mut ranges) {
            if e.is_transport() {
                return Err(perr(peer)(e));
            }
            out.clear();
            encode_response_header(
                h.request_id,
                RequestStatus::TooLarge,
                0,
                &e.to_string(),
                &mut out,
            );
            let _ = send(&mut w, &out, peer);
            return Err(perr(peer)(e));
        }
        let t0 = Instant::now();
        out.clear();
        encode_response_header(h.request_id, RequestStatus::Ok, h.nr_ranges, "", &mut out);
        // On a plain socket the page data is written from the files' mappings (one copy, into
        // the socket) instead of being read into `out` first.
        let mut zc = plain.then(Vec::new);
        for range in &ranges {
            let (status, pages, data) = answer_range(
                &ck,
                range,
                h.flags & REQ_FIRST_RUN != 0,
                ctx.opts.lazy_only,
                &mut out,
                zc.as_mut(),
            );
            if status == RangeStatus::Ok {
                log.range(range.pid, range.vaddr, pages, data);
                ctx.metrics.pages_data.fetch_add(data, Relaxed);
                ctx.metrics.pages_zero.fetch_add(pages - data, Relaxed);
                ctx.metrics
                    .bytes
                    .fetch_add(data * PAGE_SIZE as u64, Relaxed);
            } else {
                ctx.metrics.errors_range.fetch_add(1, Relaxed);
            }
        }
        match zc {
            Some(zc) if !zc.is_empty() => send_spliced(&mut w, &out, &zc, peer)?,
            _ => send(&mut w, &out, peer)?,
        }
        if out.capacity() > 4 << 20 {
            // Do not keep a 16 MiB buffer per idle connection after one large request.
            out = Vec::with_capacity(1 << 20);
        }
        ctx.metrics.requests_native.fetch_add(1, Relaxed);
        ctx.metrics.observe(t0.elapsed());
    }
}

/// The runs answering `range`, stopping at the first page that cannot be served (or at the
/// first change of kind with `first_run`). `Err` if the very first page cannot be served.
pub(crate) fn plan(
    ck: &Checkpoint,
    range: &Range,
    first_run: bool,
    lazy_only: bool,
    runs: &mut Vec<(u64, RunKind)>,
) -> Result<u64, RangeStatus> {
    range.check()?;
    runs.clear();
    if !ck.has_pid(range.pid) {
        return Err(RangeStatus::UnknownPid);
    }
    let want = u64::from(range.nr_pages);
    let mut done = 0u64;
    while done < want {
        let vaddr = range.vaddr + done * PAGE_SIZE as u64;
        let Some((n, kind)) = ck.run_at(range.pid, vaddr, want - done) else {
            return Err(RangeStatus::UnknownPid);
        };
        let bad = match kind {
            RunKind::Absent => Some(RangeStatus::NotHere),
            RunKind::Data { lazy: false, .. } if lazy_only => Some(RangeStatus::NotLazy),
            _ => None,
        };
        if let Some(status) = bad {
            if done == 0 {
                return Err(status);
            }
            break;
        }
        if first_run {
            if let Some((_, k0)) = runs.first() {
                let same = matches!(
                    (k0, kind),
                    (RunKind::Zero, RunKind::Zero) | (RunKind::Data { .. }, RunKind::Data { .. })
                );
                if !same {
                    break;
                }
            }
        }
        runs.push((n, kind));
        done += n;
    }
    Ok(done)
}

/// Writes `out` with the slices of `zc` inserted at their positions in it (`(position,
/// bytes)`, positions ascending), with as few `writev` calls as the socket allows.
fn send_spliced(
    w: &mut Stream,
    out: &[u8],
    zc: &[(usize, &[u8])],
    peer: &str,
) -> Result<(), PageServerError> {
    let mut v: Vec<IoSlice<'_>> = Vec::with_capacity(2 * zc.len() + 1);
    let mut at = 0;
    for &(pos, data) in zc {
        if pos > at {
            v.push(IoSlice::new(&out[at..pos]));
        }
        v.push(IoSlice::new(data));
        at = pos;
    }
    if at < out.len() {
        v.push(IoSlice::new(&out[at..]));
    }
    let mut bufs = &mut v[..];
    while !bufs.is_empty() {
        match w.write_vectored(bufs) {
            Ok(0) => {
                return Err(PageServerError::Protocol {
                    peer: peer.to_string(),
                    source: ProtocolError::Io {
                        what: "write reply",
                        source: std::io::ErrorKind::WriteZero.into(),
                    },
                })
            }
            Ok(n) => IoSlice::advance_slices(&mut bufs, n),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(source) => {
                return Err(PageServerError::Protocol {
                    peer: peer.to_string(),
                    source: ProtocolError::Io {
                        what: "write reply",
                        source,
                    },
                })
            }
        }
    }
    Ok(())
}

/// Appends the reply to one range to `out`; returns (status, pages, data pages). With `zc`,
/// data runs that are mapped are not copied into `out`: `(position in out, bytes)` is pushed
/// to `zc` instead (the bytes go to the socket right there).
fn answer_range<'a>(
    ck: &'a Checkpoint,
    range: &Range,
    first_run: bool,
    lazy_only: bool,
    out: &mut Vec<u8>,
    mut zc: Option<&mut Vec<(usize, &'a [u8])>>,
) -> (RangeStatus, u64, u64) {
    let mut runs = Vec::new();
    let fail = |out: &mut Vec<u8>, status| {
        encode_range_reply_header(
            &RangeReplyHeader {
                status,
                nr_pages: 0,
                data_pages: 0,
            },
            out,
        );
        (status, 0, 0)
    };
    let pages = match plan(ck, range, first_run, lazy_only, &mut runs) {
        Ok(p) => p,
        Err(status) => return fail(out, status),
    };
    let data: u64 = runs
        .iter()
        .filter(|(_, k)| matches!(k, RunKind::Data { .. }))
        .map(|(n, _)| n)
        .sum();
    let mark = out.len();
    encode_range_reply_header(
        &RangeReplyHeader {
            status: RangeStatus::Ok,
            nr_pages: u32::try_from(pages).unwrap_or(0),
            data_pages: u32::try_from(data).unwrap_or(0),
        },
        out,
    );
    let bm_at = out.len();
    out.resize(
        bm_at + protocol::bitmap_len(u32::try_from(pages).unwrap_or(0)),
        0,
    );
    let mut i = 0usize;
    for (n, kind) in &runs {
        let n = usize::try_from(*n).unwrap_or(0);
        if let RunKind::Data { .. } = kind {
            for k in i..i + n {
                bitmap_set(&mut out[bm_at..], k);
            }
        }
        i += n;
    }
    let zc_mark = zc.as_ref().map_or(0, |z| z.len());
    for (n, kind) in &runs {
        if let RunKind::Data { file, offset, .. } = *kind {
            let at = out.len();
            let len = usize::try_from(*n).unwrap_or(0) * PAGE_SIZE;
            if let Some(z) = zc.as_mut() {
                if let Some(d) = ck.mapped(file, offset, len) {
                    z.push((at, d));
                    continue;
                }
            }
            out.resize(at + len, 0);
            if let Err(e) = ck.read(file, offset, &mut out[at..]) {
                tracing::warn!("checkpoint {}: {}", ck.id(), error_chain(&e));
                out.truncate(mark);
                if let Some(z) = zc.as_mut() {
                    z.truncate(zc_mark);
                }
                return fail(out, RangeStatus::ReadFailed);
            }
        }
    }
    (RangeStatus::Ok, pages, data)
}
