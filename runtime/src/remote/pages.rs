//! [`RemotePages`]: the session pool, batched and pipelined reads with retries, and the
//! [`PageSource`] the fetcher reads through.

use std::fmt;
use std::io::{self, BufReader, Read, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU16, AtomicU32, AtomicU64, Ordering::Relaxed};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::protocol::upload::MemoryDigest;
use crate::protocol::{
    bitmap_get, check_bitmap, encode_request, read_range_reply_header, read_response_header,
    ProtocolError, Range, RangeStatus, RequestKind, RequestStatus, ResponseHeader, HELLO_RESUME,
    MAX_RANGES, MAX_RANGE_PAGES, MAX_REQUEST_PAGES, PAGE_SIZE, REQ_FIRST_RUN, VERSION_RESUME,
};
use crate::source::{PageKind, PageRead, PageSource, SourceError};

use super::*;

/// Counters of a [`RemotePages`] (cheap snapshot).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct RemoteStats {
    /// Requests answered.
    pub requests: u64,
    /// Pages answered (data and zero).
    pub pages: u64,
    /// Data bytes received.
    pub bytes: u64,
    /// Connections opened (the first included).
    pub connects: u64,
    /// Transport failures that led to a retry.
    pub retries: u64,
}

/// The answer for one range of [`RemotePages::read_batch`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RangeAnswer {
    /// Outcome.
    pub status: RangeStatus,
    /// Pages answered from the range start (0 on error).
    pub pages: u32,
    /// Kind bitmap (bit set = data, written into the caller's buffer; clear = zero page, the
    /// buffer is left untouched).
    pub bitmap: Vec<u8>,
}

impl RangeAnswer {
    /// Whether page `i` of the range is data.
    pub fn is_data(&self, i: usize) -> bool {
        bitmap_get(&self.bitmap, i)
    }
}

struct Conn {
    r: BufReader<Stream>,
    wbuf: Vec<u8>,
    max_ranges: usize,
    max_pages: u32,
}

struct Pool {
    idle: Vec<Conn>,
    open: usize,
}

/// Stops a [`RemotePages::keep_alive`] thread when dropped.
pub struct KeepAlive {
    stop: std::sync::Arc<(Mutex<bool>, Condvar)>,
}

impl Drop for KeepAlive {
    fn drop(&mut self) {
        let (lock, cv) = &*self.stop;
        *lock.lock().unwrap_or_else(|e| e.into_inner()) = true;
        cv.notify_all();
    }
}

/// A [`PageSource`] over `distriproc-pageserver`'s native protocol. Share it with `Arc`; all
/// methods take `&self` and may be called from any number of threads.
pub struct RemotePages {
    endpoint: Endpoint,
    endpoint_text: String,
    opts: RemoteOptions,
    pool: Mutex<Pool>,
    freed: Condvar,
    next_id: AtomicU32,
    requests: AtomicU64,
    pages: AtomicU64,
    bytes: AtomicU64,
    connects: AtomicU64,
    /// The version the server answered the last hello with (0 before the first).
    server_version: AtomicU16,
    retries: AtomicU64,
}

impl fmt::Debug for RemotePages {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RemotePages")
            .field("endpoint", &self.endpoint_text)
            .field("checkpoint", &self.opts.checkpoint)
            .finish()
    }
}

impl RemotePages {
    /// Checks the options and opens a first session, so that an unreachable server, a wrong
    /// token or an unknown checkpoint is reported here rather than at the first fault.
    pub fn connect(endpoint: Endpoint, opts: RemoteOptions) -> Result<RemotePages, RemoteError> {
        let bad = |name, why: &str| RemoteError::BadOption {
            name,
            why: why.to_string(),
        };
        if opts.max_connections == 0 || opts.max_connections > MAX_CONNECTIONS {
            return Err(bad("max_connections", "must be 1..=64"));
        }
        if opts.pipeline_depth == 0 || opts.pipeline_depth > 64 {
            return Err(bad("pipeline_depth", "must be 1..=64"));
        }
        if opts.io_timeout.is_zero() || opts.connect_timeout.is_zero() {
            return Err(bad("io_timeout/connect_timeout", "must be greater than 0"));
        }
        if opts.backoff_initial.is_zero() || opts.backoff_max < opts.backoff_initial {
            return Err(bad("backoff", "need 0 < backoff_initial <= backoff_max"));
        }
        let rp = RemotePages {
            endpoint_text: endpoint.to_string(),
            endpoint,
            opts,
            pool: Mutex::new(Pool {
                idle: Vec::new(),
                open: 0,
            }),
            freed: Condvar::new(),
            next_id: AtomicU32::new(1),
            requests: AtomicU64::new(0),
            pages: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            connects: AtomicU64::new(0),
            server_version: AtomicU16::new(0),
            retries: AtomicU64::new(0),
        };
        let c = rp.open_conn()?;
        let mut p = rp.lock();
        p.open += 1;
        p.idle.push(c);
        drop(p);
        Ok(rp)
    }

    /// The endpoint.
    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// The checkpoint id.
    pub fn checkpoint(&self) -> &str {
        &self.opts.checkpoint
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> RemoteStats {
        RemoteStats {
            requests: self.requests.load(Relaxed),
            pages: self.pages.load(Relaxed),
            bytes: self.bytes.load(Relaxed),
            connects: self.connects.load(Relaxed),
            retries: self.retries.load(Relaxed),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Pool> {
        self.pool.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn proto(&self, source: ProtocolError) -> RemoteError {
        RemoteError::Protocol {
            endpoint: self.endpoint_text.clone(),
            checkpoint: self.opts.checkpoint.clone(),
            source,
        }
    }

    fn open_conn(&self) -> Result<Conn, RemoteError> {
        // After the first session, a server that speaks version 4 is told this is the same
        // client (it keeps serving a checkpoint deleted since then).
        let flags = if self.server_version.load(Relaxed) >= VERSION_RESUME {
            HELLO_RESUME
        } else {
            0
        };
        let (r, reply) = open_session(&self.endpoint, &self.opts, false, flags)?;
        self.server_version.store(reply.version, Relaxed);
        self.connects.fetch_add(1, Relaxed);
        Ok(Conn {
            r,
            wbuf: Vec::with_capacity(4096),
            max_ranges: usize::from(reply.max_ranges).min(MAX_RANGES),
            max_pages: reply.max_request_pages.min(MAX_REQUEST_PAGES),
        })
    }

    /// Takes an idle connection, or opens one if under the limit, or waits for one.
    fn checkout(&self) -> Result<Conn, RemoteError> {
        let until = Instant::now() + self.opts.io_timeout;
        let mut p = self.lock();
        loop {
            if let Some(c) = p.idle.pop() {
                return Ok(c);
            }
            if p.open < self.opts.max_connections {
                p.open += 1;
                drop(p);
                return self.open_conn().inspect_err(|_| {
                    self.lock().open -= 1;
                    self.freed.notify_one();
                });
            }
            let now = Instant::now();
            if now >= until {
                return Err(RemoteError::PoolTimeout {
                    endpoint: self.endpoint_text.clone(),
                    after: self.opts.io_timeout,
                    max: self.opts.max_connections,
                });
            }
            p = self
                .freed
                .wait_timeout(p, until - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    fn checkin(&self, c: Option<Conn>) {
        let mut p = self.lock();
        match c {
            Some(c) => p.idle.push(c),
            None => p.open -= 1,
        }
        drop(p);
        self.freed.notify_one();
    }

    /// Runs `op` on a pooled connection; on a transport failure the connection is dropped and
    /// `op` is retried on a new one with exponential backoff until the retry timeout.
    fn with_retry<T>(
        &self,
        mut op: impl FnMut(&mut Conn) -> Result<T, RemoteError>,
    ) -> Result<T, RemoteError> {
        let mut first_failure: Option<Instant> = None;
        let mut delay = self.opts.backoff_initial;
        let mut attempts = 0u32;
        loop {
            attempts += 1;
            let res = self.checkout().and_then(|mut c| {
                let r = op(&mut c);
                // A connection that failed in any way may be mid-message: never reuse it.
                self.checkin(if r.is_ok() { Some(c) } else { None });
                r
            });
            match res {
                Ok(v) => return Ok(v),
                Err(e) if e.is_transport() => {
                    let start = *first_failure.get_or_insert_with(Instant::now);
                    let elapsed = start.elapsed();
                    if elapsed >= self.opts.retry_timeout {
                        return Err(RemoteError::GaveUp {
                            endpoint: self.endpoint_text.clone(),
                            attempts,
                            elapsed,
                            last: Box::new(e),
                        });
                    }
                    self.retries.fetch_add(1, Relaxed);
                    std::thread::sleep(delay.min(self.opts.retry_timeout - elapsed));
                    delay = (delay * 2).min(self.opts.backoff_max);
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn send(&self, c: &mut Conn, what: &'static str) -> Result<(), RemoteError> {
        let r = c.r.get_mut().write_all(&c.wbuf);
        c.wbuf.clear();
        r.map_err(|source| self.proto(ProtocolError::Io { what, source }))
    }

    fn next_id(&self) -> u32 {
        let id = self.next_id.fetch_add(1, Relaxed);
        if id == 0 {
            self.next_id.fetch_add(1, Relaxed)
        } else {
            id
        }
    }

    /// Reads the response header of request `id`; fails when it answers another request or
    /// reports a request-level error.
    fn read_ok_header(&self, c: &mut Conn, id: u32) -> Result<ResponseHeader, RemoteError> {
        let h = read_response_header(&mut c.r).map_err(|e| self.proto(e))?;
        if h.request_id != id {
            return Err(self.proto(ProtocolError::OutOfOrder {
                expected: id,
                got: h.request_id,
            }));
        }
        if h.status != RequestStatus::Ok {
            return Err(self.proto(ProtocolError::RequestFailed {
                request_id: id,
                status: h.status,
                message: h.message,
            }));
        }
        Ok(h)
    }

    /// Reads a response header for `id` with `nr` ranges and fails on a request-level error.
    fn expect_response(&self, c: &mut Conn, id: u32, nr: usize) -> Result<(), RemoteError> {
        let h = self.read_ok_header(c, id)?;
        if usize::from(h.nr_ranges) != nr {
            return Err(self.proto(ProtocolError::Invalid {
                what: "response range count",
                value: u64::from(h.nr_ranges),
            }));
        }
        Ok(())
    }

    /// Reads one range reply; data pages go to their page positions in `buf`.
    fn read_range(
        &self,
        c: &mut Conn,
        range: &Range,
        buf: &mut [u8],
        bitmap: &mut Vec<u8>,
    ) -> Result<(RangeStatus, u32), RemoteError> {
        let h = read_range_reply_header(&mut c.r, range.nr_pages).map_err(|e| self.proto(e))?;
        bitmap.clear();
        if h.status != RangeStatus::Ok {
            return Ok((h.status, 0));
        }
        bitmap.resize(h.bitmap_len(), 0);
        c.r.read_exact(bitmap).map_err(|source| {
            self.proto(ProtocolError::Io {
                what: "read kind bitmap",
                source,
            })
        })?;
        check_bitmap(bitmap, h.nr_pages, h.data_pages).map_err(|e| self.proto(e))?;
        let n = h.nr_pages as usize;
        let mut i = 0;
        while i < n {
            if !bitmap_get(bitmap, i) {
                i += 1;
                continue;
            }
            let start = i;
            while i < n && bitmap_get(bitmap, i) {
                i += 1;
            }
            c.r.read_exact(&mut buf[start * PAGE_SIZE..i * PAGE_SIZE])
                .map_err(|source| {
                    self.proto(ProtocolError::Io {
                        what: "read page data",
                        source,
                    })
                })?;
        }
        self.requests.fetch_add(1, Relaxed);
        self.pages.fetch_add(u64::from(h.nr_pages), Relaxed);
        self.bytes
            .fetch_add(u64::from(h.data_pages) * PAGE_SIZE as u64, Relaxed);
        Ok((RangeStatus::Ok, h.nr_pages))
    }

    /// Reads many ranges at once: `buf` holds the ranges' pages back to back (its length must
    /// be the sum of their sizes). Requests are cut to the server's limits and pipelined on one
    /// connection. Per-range errors are returned in the answers, not as `Err`.
    pub fn read_batch(
        &self,
        ranges: &[Range],
        buf: &mut [u8],
    ) -> Result<Vec<RangeAnswer>, RemoteError> {
        let total: u64 = ranges.iter().map(|r| u64::from(r.nr_pages)).sum();
        if total * PAGE_SIZE as u64 != buf.len() as u64 {
            return Err(RemoteError::BadOption {
                name: "read_batch buffer",
                why: format!("{} bytes for {total} pages", buf.len()),
            });
        }
        if let Some(r) = ranges.iter().find(|r| r.check().is_err()) {
            return Err(RemoteError::Range {
                endpoint: self.endpoint_text.clone(),
                checkpoint: self.opts.checkpoint.clone(),
                status: RangeStatus::OutOfRange,
                pid: r.pid,
                vaddr: r.vaddr,
                nr_pages: r.nr_pages,
            });
        }
        self.with_retry(|c| {
            // Cut into requests within the server's limits.
            let mut chunks: Vec<(usize, usize)> = Vec::new();
            let mut start = 0;
            while start < ranges.len() {
                let mut end = start;
                let mut pages = 0u32;
                while end < ranges.len()
                    && end - start < c.max_ranges
                    && pages + ranges[end].nr_pages <= c.max_pages
                {
                    pages += ranges[end].nr_pages;
                    end += 1;
                }
                if end == start {
                    // A range larger than the server's request limit.
                    return Err(self.proto(ProtocolError::Limit {
                        what: "range pages vs server request limit",
                        value: u64::from(ranges[start].nr_pages),
                        limit: u64::from(c.max_pages),
                    }));
                }
                chunks.push((start, end));
                start = end;
            }
            let mut answers = Vec::with_capacity(ranges.len());
            let mut offsets = Vec::with_capacity(ranges.len());
            let mut off = 0usize;
            for r in ranges {
                offsets.push(off);
                off += r.nr_pages as usize * PAGE_SIZE;
            }
            let mut sent: Vec<(u32, usize, usize)> = Vec::new();
            let mut next = 0;
            let mut done = 0;
            while done < chunks.len() {
                while next < chunks.len() && sent.len() - done < self.opts.pipeline_depth {
                    let (s, e) = chunks[next];
                    let id = self.next_id();
                    encode_request(id, RequestKind::ReadPages, 0, &ranges[s..e], &mut c.wbuf)
                        .map_err(|e| self.proto(e))?;
                    sent.push((id, s, e));
                    next += 1;
                }
                self.send(c, "send request")?;
                let (id, s, e) = sent[done];
                self.expect_response(c, id, e - s)?;
                for k in s..e {
                    let r = &ranges[k];
                    let len = r.nr_pages as usize * PAGE_SIZE;
                    let mut bitmap = Vec::new();
                    let (status, pages) =
                        self.read_range(c, r, &mut buf[offsets[k]..offsets[k] + len], &mut bitmap)?;
                    answers.push(RangeAnswer {
                        status,
                        pages,
                        bitmap,
                    });
                }
                done += 1;
            }
            Ok(answers)
        })
    }

    /// One range with `REQ_FIRST_RUN`: the server answers only the leading run of one kind.
    /// A refused range is not a connection failure: the connection stays in the pool.
    fn read_first_run(&self, range: Range, buf: &mut [u8]) -> Result<PageRead, RemoteError> {
        self.with_retry(|c| {
            let pages = range.nr_pages.min(c.max_pages).min(MAX_RANGE_PAGES);
            let r = Range {
                nr_pages: pages,
                ..range
            };
            let id = self.next_id();
            encode_request(id, RequestKind::ReadPages, REQ_FIRST_RUN, &[r], &mut c.wbuf)
                .map_err(|e| self.proto(e))?;
            self.send(c, "send request")?;
            self.expect_response(c, id, 1)?;
            let mut bm = Vec::new();
            let (status, n) = self.read_range(c, &r, buf, &mut bm)?;
            if status != RangeStatus::Ok {
                return Ok(Err(RemoteError::Range {
                    endpoint: self.endpoint_text.clone(),
                    checkpoint: self.opts.checkpoint.clone(),
                    status,
                    pid: r.pid,
                    vaddr: r.vaddr,
                    nr_pages: r.nr_pages,
                }));
            }
            let data = bitmap_get(&bm, 0);
            if (0..n as usize).any(|i| bitmap_get(&bm, i) != data) {
                return Err(self.proto(ProtocolError::Invalid {
                    what: "mixed kinds in a first-run reply",
                    value: u64::from(n),
                }));
            }
            Ok(Ok(PageRead {
                pages: n as usize,
                kind: if data { PageKind::Data } else { PageKind::Zero },
            }))
        })?
    }

    /// What the server holds for the checkpoint ([`RequestKind::Info`], protocol version 2):
    /// its page bytes and pagemap checksum, to compare with a remote checkpoint's reference.
    pub fn info(&self) -> Result<MemoryDigest, RemoteError> {
        self.with_retry(|c| {
            let id = self.next_id();
            encode_request(id, RequestKind::Info, 0, &[], &mut c.wbuf)
                .map_err(|e| self.proto(e))?;
            self.send(c, "send info request")?;
            let h = self.read_ok_header(c, id)?;
            MemoryDigest::from_message(&h.message).ok_or_else(|| {
                self.proto(ProtocolError::Invalid {
                    what: "info answer",
                    value: h.message.len() as u64,
                })
            })
        })
    }

    /// Keeps a session with the server open while `self` lives: when no request was sent for
    /// `every`, a pooled connection answers an `Info` request. An open session is
    /// the server's lease on the checkpoint (retention leaves a checkpoint alone while a
    /// session reads it), so the checkpoint of a container whose memory stays remote is kept
    /// even when the container faults nothing for longer than the server's idle limit
    /// (`io_timeout_ms`, which must be longer than `every`). Ends when the returned guard or
    /// the last other `Arc` of `self` is dropped.
    pub fn keep_alive(self: &std::sync::Arc<Self>, every: Duration) -> KeepAlive {
        let stop = std::sync::Arc::new((Mutex::new(false), Condvar::new()));
        let weak = std::sync::Arc::downgrade(self);
        let s = stop.clone();
        let mut seen = self.requests.load(Relaxed);
        let spawned = std::thread::Builder::new()
            .name("ps-keepalive".into())
            .spawn(move || {
                let (lock, cv) = &*s;
                let mut stopped = lock.lock().unwrap_or_else(|e| e.into_inner());
                loop {
                    stopped = cv
                        .wait_timeout(stopped, every)
                        .unwrap_or_else(|e| e.into_inner())
                        .0;
                    if *stopped {
                        return;
                    }
                    let Some(rp) = weak.upgrade() else { return };
                    drop(stopped);
                    // A request since the last look used a connection: nothing to do.
                    let now = rp.requests.load(Relaxed);
                    if now != seen {
                        seen = now;
                    } else if let Err(e) = rp.info() {
                        tracing::warn!(
                            checkpoint = rp.checkpoint(),
                            "page server keepalive failed: {}",
                            crate::error_chain(&e)
                        );
                    }
                    drop(rp);
                    stopped = lock.lock().unwrap_or_else(|e| e.into_inner());
                }
            });
        if let Err(e) = &spawned {
            tracing::warn!("page server keepalive thread not started: {e}");
        }
        KeepAlive { stop }
    }

    /// Ends every idle session politely (Goodbye). Busy connections close when dropped.
    pub fn close(&self) {
        let idle = std::mem::take(&mut self.lock().idle);
        for mut c in idle {
            // A dead or hung server must not hold up a drop for the full I/O timeout.
            let _ =
                c.r.get_ref()
                    .set_timeouts(self.opts.io_timeout.min(Duration::from_secs(1)));
            if encode_request(0, RequestKind::Goodbye, 0, &[], &mut c.wbuf).is_ok()
                && self.send(&mut c, "send goodbye").is_ok()
            {
                let _ = read_response_header(&mut c.r);
            }
            self.lock().open -= 1;
        }
    }
}

impl Drop for RemotePages {
    fn drop(&mut self) {
        self.close();
    }
}

impl PageSource for RemotePages {
    /// Two fill workers per `fill_threads`: each waits for a round trip most of the time
    /// (1 GiB over loopback, 3 runs: 2.33 GiB/s with 2 workers, 2.86 with 4).
    fn fill_workers_per_thread(&self) -> usize {
        2
    }

    fn read_pages(&self, pid: u32, vaddr: u64, buf: &mut [u8]) -> Result<PageRead, SourceError> {
        if buf.is_empty()
            || !buf.len().is_multiple_of(PAGE_SIZE)
            || !vaddr.is_multiple_of(PAGE_SIZE as u64)
        {
            return Err(SourceError::BadRequest {
                pid,
                vaddr,
                len: buf.len(),
            });
        }
        let want = u32::try_from(buf.len() / PAGE_SIZE)
            .unwrap_or(u32::MAX)
            .min(MAX_RANGE_PAGES);
        let range = Range {
            pid,
            vaddr,
            nr_pages: want,
        };
        if range.check().is_err() {
            return Err(SourceError::BadRequest {
                pid,
                vaddr,
                len: buf.len(),
            });
        }
        match self.read_first_run(range, buf) {
            Ok(r) => Ok(r),
            Err(RemoteError::Range {
                status: RangeStatus::UnknownPid,
                ..
            }) => Err(SourceError::UnknownPid { pid }),
            Err(RemoteError::Range {
                status: RangeStatus::NotHere | RangeStatus::NotLazy,
                ..
            }) => Err(SourceError::NotHere { pid, vaddr }),
            Err(RemoteError::Range {
                status: RangeStatus::OutOfRange,
                ..
            }) => Err(SourceError::BadRequest {
                pid,
                vaddr,
                len: buf.len(),
            }),
            Err(e) => Err(SourceError::Io {
                path: PathBuf::from(format!(
                    "{} checkpoint {}",
                    self.endpoint_text, self.opts.checkpoint
                )),
                offset: vaddr,
                source: io::Error::other(e),
            }),
        }
    }
}
