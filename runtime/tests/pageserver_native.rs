//! The page server (in-process, real TCP and unix sockets) against `RemotePages` and against
//! hostile clients, on a synthetic checkpoint written with CRIU's image layout: several tasks,
//! holes, lazy-absent ranges and a parent chain. Needs no root.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Result};
use distriproc_pageserver::{Server, ServerHandle, ServerOptions};
use distriproc_runtime::images::testutil::*;
use distriproc_runtime::images::{PE_LAZY, PE_PARENT, PE_PRESENT};
use distriproc_runtime::protocol::criu::{Command, HeaderLayout, PsIov};
use distriproc_runtime::protocol::{
    self, encode_request, read_response_header, Hello, HelloReply, HelloStatus, Range, RangeStatus,
    RequestKind, RequestStatus, HELLO_LEN, MAGIC, VERSION,
};
use distriproc_runtime::remote::{Endpoint, RemoteError, RemoteOptions, RemotePages};
use distriproc_runtime::source::{LocalImages, PageKind, PageSource, SourceError};

const BASE: u64 = 0x7f00_0000_0000;
/// Pages per task region.
const PAGES: u64 = 2048;

/// Deterministic page contents: every 8-byte word encodes (pid, page, word).
fn fill(pid: u32, page: u64, out: &mut [u8]) {
    for (w, chunk) in out.chunks_mut(8).enumerate() {
        let v = (u64::from(pid) << 48) ^ (page << 16) ^ w as u64 ^ 0x5a5a;
        chunk.copy_from_slice(&v.to_le_bytes());
    }
}

/// A store with checkpoint `ck` (pids 1 and 2, a parent `ck-parent` holding pid 1's first 64
/// pages) and returns the store path. Layout of each pid's region of PAGES pages from BASE:
/// [0,64) parent (pid 1) or present; every 10th page a hole; [1024,1040) lazy-absent (pid 2).
fn make_store(root: &Path) {
    let parent = root.join("ck-parent");
    let ck = root.join("ck");
    std::fs::create_dir_all(&parent).unwrap();
    std::fs::create_dir_all(&ck).unwrap();
    for d in [&parent, &ck] {
        write_inventory(d).unwrap();
        write_pstree(d, &[1, 2]).unwrap();
    }
    // Parent: pid 1, pages [0,64) present.
    let mut pages = vec![0u8; 64 * 4096];
    for (p, page) in pages.chunks_mut(4096).enumerate() {
        fill(1, p as u64, page);
    }
    write_pagemap(&parent, 1, 1, &[pm(BASE, 64, PE_PRESENT)]).unwrap();
    std::fs::write(parent.join("pages-1.img"), pages).unwrap();
    std::os::unix::fs::symlink("../ck-parent", ck.join("parent")).unwrap();
    for (pid, pages_id) in [(1u32, 1u32), (2, 2)] {
        let mut entries = Vec::new();
        let mut data = Vec::new();
        let mut p = 0u64;
        if pid == 1 {
            entries.push(pm(BASE, 64, PE_PARENT));
            p = 64;
        }
        while p < PAGES {
            if p % 10 == 9 {
                p += 1;
                continue;
            }
            if pid == 2 && (1024..1040).contains(&p) {
                entries.push(pm(BASE + p * 4096, 1, PE_LAZY));
                p += 1;
                continue;
            }
            // Runs of up to 9 present pages between holes.
            let start = p;
            while p < PAGES && p % 10 != 9 && !(pid == 2 && (1024..1040).contains(&p)) {
                let mut page = vec![0u8; 4096];
                fill(pid, p, &mut page);
                data.extend_from_slice(&page);
                p += 1;
            }
            let flags = if start < 128 {
                PE_PRESENT
            } else {
                PE_PRESENT | PE_LAZY
            };
            entries.push(pm(BASE + start * 4096, p - start, flags));
        }
        write_pagemap(&ck, pid, pages_id, &entries).unwrap();
        std::fs::write(ck.join(format!("pages-{pages_id}.img")), data).unwrap();
    }
}

fn start(root: &Path, f: impl FnOnce(&mut ServerOptions)) -> ServerHandle {
    let mut o = ServerOptions::for_store(root.to_path_buf());
    o.listen = vec![
        "127.0.0.1:0".into(),
        format!("unix:{}", root.join("ps.sock").display()),
    ];
    o.io_timeout = Duration::from_secs(10);
    f(&mut o);
    Server::start(o).expect("start page server")
}

fn opts(ck: &str) -> RemoteOptions {
    let mut o = RemoteOptions::new(ck);
    o.io_timeout = Duration::from_secs(10);
    o.retry_timeout = Duration::from_secs(2);
    o
}

fn tcp(h: &ServerHandle) -> Endpoint {
    Endpoint::Tcp(h.addrs()[0].clone())
}

/// Reads the whole region of `pid` through `src` and checks every page.
fn check_region(src: &dyn PageSource, pid: u32, chunk: usize) -> Result<(u64, u64)> {
    let mut buf = vec![0u8; chunk * 4096];
    let mut want = vec![0u8; 4096];
    let (mut data, mut zero) = (0u64, 0u64);
    let mut p = 0u64;
    while p < PAGES {
        if pid == 2 && (1024..1040).contains(&p) && p % 10 != 9 {
            let e = src
                .read_pages(pid, BASE + p * 4096, &mut buf[..4096])
                .unwrap_err();
            ensure!(matches!(e, SourceError::NotHere { .. }), "{e}");
            p += 1;
            continue;
        }
        let n = usize::try_from((chunk as u64).min(PAGES - p))?;
        let r = src.read_pages(pid, BASE + p * 4096, &mut buf[..n * 4096])?;
        ensure!(r.pages >= 1 && r.pages <= n, "{r:?}");
        for i in 0..r.pages {
            let page = p + i as u64;
            match r.kind {
                PageKind::Zero => {
                    ensure!(page % 10 == 9, "pid {pid} page {page} zero");
                    zero += 1;
                }
                PageKind::Data => {
                    fill(pid, page, &mut want);
                    ensure!(
                        buf[i * 4096..(i + 1) * 4096] == want[..],
                        "pid {pid} page {page} differs"
                    );
                    data += 1;
                }
            }
        }
        p += r.pages as u64;
    }
    Ok((data, zero))
}

#[test]
fn remote_pages_match_local_images_tcp_and_unix() -> Result<()> {
    let d = tempfile::tempdir()?;
    make_store(d.path());
    let h = start(d.path(), |_| {});
    let local = LocalImages::open(&d.path().join("ck"))?;
    let l1 = check_region(&local, 1, 64)?;
    for ep in [tcp(&h), Endpoint::Unix(d.path().join("ps.sock"))] {
        let rp = RemotePages::connect(ep.clone(), opts("ck"))?;
        for pid in [1, 2] {
            let got = check_region(&rp, pid, 64)?;
            if pid == 1 {
                ensure!(got == l1, "{ep}: {got:?} vs local {l1:?}");
            }
        }
        let st = rp.stats();
        ensure!(st.requests > 100 && st.bytes > 0, "{st:?}");
    }
    // Batch: several ranges, pipelined, kinds in bitmaps.
    let rp = RemotePages::connect(tcp(&h), opts("ck"))?;
    let ranges: Vec<Range> = (0..40)
        .map(|i| Range {
            pid: 1 + (i % 2),
            vaddr: BASE + u64::from(i) * 50 * 4096,
            nr_pages: 20,
        })
        .collect();
    let mut buf = vec![0u8; 40 * 20 * 4096];
    let answers = rp.read_batch(&ranges, &mut buf)?;
    ensure!(answers.len() == 40);
    let mut want = vec![0u8; 4096];
    for (k, (r, a)) in ranges.iter().zip(&answers).enumerate() {
        ensure!(a.status == RangeStatus::Ok, "{r:?}: {a:?}");
        for i in 0..a.pages as usize {
            let page = (r.vaddr - BASE) / 4096 + i as u64;
            let data = page % 10 != 9 || (r.pid == 1 && page < 64);
            ensure!(a.is_data(i) == data, "{r:?} page {page} kind");
            if a.is_data(i) {
                fill(r.pid, page, &mut want);
                let off = k * 20 * 4096 + i * 4096;
                ensure!(buf[off..off + 4096] == want[..], "{r:?} page {page}");
            }
        }
    }
    // Errors per range.
    let bad = [
        Range {
            pid: 9,
            vaddr: BASE,
            nr_pages: 1,
        },
        Range {
            pid: 2,
            vaddr: BASE + 1024 * 4096,
            nr_pages: 4,
        },
    ];
    let mut buf = vec![0u8; 5 * 4096];
    let a = rp.read_batch(&bad, &mut buf)?;
    ensure!(a[0].status == RangeStatus::UnknownPid, "{a:?}");
    ensure!(a[1].status == RangeStatus::NotHere, "{a:?}");
    let e = rp.read_pages(9, BASE, &mut buf[..4096]).unwrap_err();
    ensure!(matches!(e, SourceError::UnknownPid { pid: 9 }), "{e}");
    // Access log and metrics saw it.
    let m = h.metrics_text();
    ensure!(m.contains("distriproc_pageserver_requests_total{proto=\"native\"}"));
    drop(rp);
    drop(h);
    let report = distriproc_pageserver::stats::run(d.path(), Some("ck"))?;
    eprintln!("{report}");
    ensure!(
        report.contains("pid 1:") && report.contains("sessions: "),
        "{report}"
    );
    Ok(())
}

#[test]
fn sixteen_concurrent_clients() -> Result<()> {
    let d = tempfile::tempdir()?;
    make_store(d.path());
    let h = start(d.path(), |_| {});
    let ep = tcp(&h);
    let shared = Arc::new(RemotePages::connect(ep.clone(), opts("ck"))?);
    let t0 = Instant::now();
    let threads: Vec<_> = (0..16)
        .map(|i| {
            let ep = ep.clone();
            let shared = shared.clone();
            std::thread::spawn(move || -> Result<(u64, Vec<Duration>)> {
                // Half the threads have their own client, half share one.
                let own;
                let src: &dyn PageSource = if i % 2 == 0 {
                    own = RemotePages::connect(ep, opts("ck"))?;
                    &own
                } else {
                    &*shared
                };
                let mut lat = Vec::new();
                let mut pages = 0;
                for round in 0..2 {
                    for pid in [1u32, 2] {
                        let s = Instant::now();
                        let (a, b) = check_region(src, pid, 16 + (i + round) % 48)?;
                        lat.push(s.elapsed());
                        pages += a + b;
                    }
                }
                Ok((pages, lat))
            })
        })
        .collect();
    let mut pages = 0;
    for t in threads {
        let (p, _) = t.join().expect("thread")?;
        pages += p;
    }
    let el = t0.elapsed();
    let m = h.metrics_text();
    let reqs: u64 = m
        .lines()
        .find(|l| l.starts_with("distriproc_pageserver_requests_total{proto=\"native\"}"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    eprintln!(
        "16 clients: {pages} pages, {reqs} requests in {el:?}: {:.0} requests/s, {:.1} MiB/s",
        reqs as f64 / el.as_secs_f64(),
        (pages * 4096) as f64 / (1 << 20) as f64 / el.as_secs_f64()
    );
    ensure!(pages == 16 * 2 * (2 * PAGES - 14), "{pages}");
    Ok(())
}

fn raw(h: &ServerHandle) -> TcpStream {
    let s = TcpStream::connect(&h.addrs()[0]).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s
}

fn hello(ck: &str, token: &str) -> Vec<u8> {
    Hello {
        version: VERSION,
        checkpoint: ck.into(),
        token: token.into(),
        client: "test".into(),
        criu_mode: false,
    }
    .encode()
    .unwrap()
}

fn refused(h: &ServerHandle, bytes: &[u8]) -> Result<HelloReply> {
    let mut s = raw(h);
    s.write_all(bytes)?;
    Ok(HelloReply::read(&mut s)?)
}

/// Reads until EOF; the server must close within the read timeout.
fn closed(mut s: TcpStream) -> Result<()> {
    let mut sink = Vec::new();
    let _ = s.read_to_end(&mut sink);
    Ok(())
}

#[test]
fn hostile_clients_get_clear_errors_and_the_server_stays_up() -> Result<()> {
    let d = tempfile::tempdir()?;
    make_store(d.path());
    std::fs::write(d.path().join("token"), "s3cret\n")?;
    let h = start(d.path(), |o| o.token = Some("s3cret".into()));

    // Garbage: neither protocol; the connection is dropped.
    let mut s = raw(&h);
    s.write_all(b"GET / HTTP/1.0\r\n\r\n")?;
    closed(s)?;
    // Absurd lengths in the hello: refused before allocation, with the field named.
    let mut b = hello("ck", "s3cret");
    b[10..12].copy_from_slice(&u16::MAX.to_le_bytes());
    let r = refused(&h, &b[..HELLO_LEN])?;
    ensure!(
        r.status == HelloStatus::Malformed && r.message.contains("token length"),
        "{r:?}"
    );
    // Wrong token, missing token.
    let r = refused(&h, &hello("ck", "nope"))?;
    ensure!(r.status == HelloStatus::Unauthorized, "{r:?}");
    let r = refused(&h, &hello("ck", ""))?;
    ensure!(r.status == HelloStatus::Unauthorized, "{r:?}");
    // Unknown checkpoint.
    let r = refused(&h, &hello("nope", "s3cret"))?;
    ensure!(
        r.status == HelloStatus::UnknownCheckpoint && r.message.contains("nope"),
        "{r:?}"
    );
    // Path-escaping ids.
    for id in ["..", "../ck", "ck/../ck", "/etc", ".distriproc", "a\\b"] {
        let r = refused(&h, &hello(id, "s3cret"))?;
        ensure!(r.status == HelloStatus::BadCheckpointId, "{id}: {r:?}");
    }
    // The client reports refusals clearly.
    let mut o = opts("nope");
    o.token = "s3cret".into();
    let e = RemotePages::connect(tcp(&h), o).unwrap_err();
    let msg = format!("{e}: {}", std::error::Error::source(&e).unwrap());
    ensure!(
        msg.contains("unknown checkpoint") && msg.contains("nope"),
        "{msg}"
    );
    let e = RemotePages::connect(tcp(&h), opts("ck")).unwrap_err();
    let msg = format!("{e}: {}", std::error::Error::source(&e).unwrap());
    ensure!(msg.contains("unauthorized"), "{msg}");
    ensure!(matches!(e, RemoteError::Protocol { .. }));
    // After a good hello: absurd range count, then a bad kind: request-level errors, closed.
    let good = |h: &ServerHandle| -> Result<TcpStream> {
        let mut s = raw(h);
        s.write_all(&hello("ck", "s3cret"))?;
        let r = HelloReply::read(&mut s)?;
        ensure!(r.status == HelloStatus::Ok, "{r:?}");
        Ok(s)
    };
    let mut s = good(&h)?;
    let mut req = Vec::new();
    encode_request(5, RequestKind::ReadPages, 0, &[], &mut req)?;
    req[6..8].copy_from_slice(&u16::MAX.to_le_bytes());
    s.write_all(&req)?;
    let r = read_response_header(&mut s)?;
    ensure!(
        r.status == RequestStatus::Malformed && r.message.contains("ranges per request"),
        "{r:?}"
    );
    closed(s)?;
    let mut s = good(&h)?;
    req[4..6].copy_from_slice(&0u16.to_le_bytes());
    s.write_all(&req)?;
    let r = read_response_header(&mut s)?;
    ensure!(r.status == RequestStatus::Malformed, "{r:?}");
    // Too many pages in total (each range within limits).
    let mut s = good(&h)?;
    let big: Vec<Range> = (0..5)
        .map(|i| Range {
            pid: 1,
            vaddr: BASE + i * 0x40_0000,
            nr_pages: protocol::MAX_RANGE_PAGES,
        })
        .collect();
    let mut req = Vec::new();
    req.extend_from_slice(&7u32.to_le_bytes());
    req.extend_from_slice(&1u16.to_le_bytes());
    req.extend_from_slice(&5u16.to_le_bytes());
    req.extend_from_slice(&[0u8; 8]);
    for r in &big {
        req.extend_from_slice(&r.pid.to_le_bytes());
        req.extend_from_slice(&r.nr_pages.to_le_bytes());
        req.extend_from_slice(&r.vaddr.to_le_bytes());
    }
    s.write_all(&req)?;
    let r = read_response_header(&mut s)?;
    ensure!(r.status == RequestStatus::TooLarge, "{r:?}");
    // Absurd single range: per-range OutOfRange, session continues.
    let mut s = good(&h)?;
    let mut req = Vec::new();
    encode_request(
        8,
        RequestKind::ReadPages,
        0,
        &[Range {
            pid: 1,
            vaddr: u64::MAX - 4095,
            nr_pages: 1,
        }],
        &mut req,
    )?;
    s.write_all(&req)?;
    let r = read_response_header(&mut s)?;
    ensure!(r.status == RequestStatus::Ok && r.nr_ranges == 1, "{r:?}");
    let rr = protocol::read_range_reply_header(&mut s, 1)?;
    ensure!(rr.status == RangeStatus::OutOfRange, "{rr:?}");
    // Truncated hello then close; CRIU client with no token configured is refused.
    let mut s = raw(&h);
    s.write_all(&MAGIC)?;
    s.write_all(&[1, 0])?;
    drop(s);
    let mut s = raw(&h);
    let mut get = [0u8; 32];
    PsIov::new(Command::Get, 1, BASE, 1).encode(HeaderLayout::V42, &mut get)?;
    s.write_all(&get)?;
    closed(s)?;

    // Still up and serving correctly.
    let mut o = opts("ck");
    o.token = "s3cret".into();
    let rp = RemotePages::connect(tcp(&h), o)?;
    check_region(&rp, 1, 32)?;
    let m = h.metrics_text();
    ensure!(!m.contains("errors_total{kind=\"auth\"} 0"), "{m}");
    Ok(())
}

#[test]
fn criu_get_sessions_without_criu() -> Result<()> {
    // The CRIU GET path byte for byte, both layouts, against the synthetic checkpoint.
    let d = tempfile::tempdir()?;
    make_store(d.path());
    let h = start(d.path(), |o| o.criu_default = Some("ck".into()));
    for layout in [HeaderLayout::V42, HeaderLayout::V41] {
        let mut s = raw(&h);
        let mut b = [0u8; 32];
        let n = PsIov::new(Command::Get, 20, BASE + 200 * 4096, 2).encode(layout, &mut b)?;
        s.write_all(&b[..n])?;
        let mut rb = [0u8; 32];
        s.read_exact(&mut rb[..n])?;
        let r = PsIov::decode(layout, &rb[..n])?;
        ensure!(r.command == Command::AddF && r.flags == 4, "{r:?}");
        ensure!(r.nr_pages == 20 && r.vaddr == BASE + 200 * 4096 && r.dst_id == 2);
        let mut data = vec![0u8; 20 * 4096];
        s.read_exact(&mut data)?;
        let mut want = vec![0u8; 4096];
        for i in 0..20u64 {
            let page = 200 + i;
            if page % 10 == 9 {
                want.fill(0);
            } else {
                fill(2, page, &mut want);
            }
            let o = usize::try_from(i)? * 4096;
            ensure!(data[o..o + 4096] == want[..], "{layout}: page {page}");
        }
        let n = PsIov::new(Command::Close, 0, 0, 0).encode(layout, &mut b)?;
        s.write_all(&b[..n])?;
        let mut st = [0u8; 4];
        s.read_exact(&mut st)?;
        ensure!(st == [0; 4]);
    }
    // A GET for an unknown pid: CRIU has no error reply; the server closes.
    let mut s = raw(&h);
    let mut b = [0u8; 32];
    PsIov::new(Command::Get, 1, BASE, 77).encode(HeaderLayout::V42, &mut b)?;
    s.write_all(&b)?;
    let mut rb = Vec::new();
    s.read_to_end(&mut rb)?;
    ensure!(rb.is_empty());
    Ok(())
}

#[test]
fn client_reconnects_with_backoff_and_gives_up_in_bounded_time() -> Result<()> {
    let d = tempfile::tempdir()?;
    make_store(d.path());
    let h1 = start(d.path(), |o| o.listen = vec!["127.0.0.1:0".into()]);
    let addr = h1.addrs()[0].clone();
    let mut o = opts("ck");
    o.retry_timeout = Duration::from_secs(10);
    o.backoff_initial = Duration::from_millis(10);
    o.backoff_max = Duration::from_millis(200);
    let rp = RemotePages::connect(Endpoint::Tcp(addr.clone()), o.clone())?;
    let mut short = o.clone();
    short.retry_timeout = Duration::from_secs(1);
    let rp_short = RemotePages::connect(Endpoint::Tcp(addr.clone()), short)?;
    let mut buf = vec![0u8; 8 * 4096];
    ensure!(rp.read_pages(1, BASE, &mut buf)?.kind == PageKind::Data);
    ensure!(rp_short.read_pages(1, BASE, &mut buf)?.kind == PageKind::Data);

    // The server goes away and comes back on the same port: the read retries until it is up.
    h1.shutdown();
    let root = d.path().to_path_buf();
    let a2 = addr.clone();
    let restart = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(400));
        start(&root, |o| o.listen = vec![a2])
    });
    let t0 = Instant::now();
    check_region(&rp, 1, 64)?;
    let h2 = restart.join().expect("restart thread");
    let st = rp.stats();
    eprintln!("reconnected after {:?}: {st:?}", t0.elapsed());
    ensure!(st.retries > 0 && st.connects >= 2, "{st:?}");

    // Gone for good: the call fails after the retry timeout, naming the endpoint.
    h2.shutdown();
    let t0 = Instant::now();
    let e = rp_short.read_pages(1, BASE, &mut buf).unwrap_err();
    let el = t0.elapsed();
    let chain = format!(
        "{e}: {}",
        std::error::Error::source(&e)
            .map(|s| s.to_string())
            .unwrap_or_default()
    );
    eprintln!("gave up after {el:?}: {chain}");
    ensure!(el < Duration::from_secs(4), "took {el:?}");
    ensure!(
        chain.contains("unreachable") && chain.contains(&addr),
        "{chain}"
    );
    Ok(())
}

#[test]
fn hung_server_times_out() -> Result<()> {
    // Accepts and answers the hello, then never answers a request.
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = l.local_addr()?.to_string();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop2 = stop.clone();
    l.set_nonblocking(true)?;
    let fake = std::thread::spawn(move || {
        let mut held = Vec::new();
        while !stop2.load(std::sync::atomic::Ordering::Relaxed) {
            match l.accept() {
                Ok((mut s, _)) => {
                    s.set_nonblocking(false).unwrap();
                    if Hello::read(&mut s).is_ok() {
                        let _ = s.write_all(&HelloReply::ok(VERSION, 16, 1024).encode());
                    }
                    held.push(s);
                }
                Err(_) => std::thread::sleep(Duration::from_millis(5)),
            }
        }
    });
    let mut o = opts("ck");
    o.io_timeout = Duration::from_millis(300);
    o.retry_timeout = Duration::from_secs(1);
    let rp = RemotePages::connect(Endpoint::Tcp(addr.clone()), o)?;
    let mut buf = vec![0u8; 4096];
    let t0 = Instant::now();
    let e = rp.read_pages(1, BASE, &mut buf).unwrap_err();
    let el = t0.elapsed();
    eprintln!("hung server: failed after {el:?}: {e}");
    ensure!(
        el >= Duration::from_millis(300) && el < Duration::from_secs(3),
        "{el:?}"
    );
    ensure!(matches!(e, SourceError::Io { .. }), "{e}");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    drop(rp);
    fake.join().expect("fake server");
    Ok(())
}

#[test]
fn figures_latency_and_throughput() -> Result<()> {
    // Prints figures only (no timing assertions): sequential 1-page reads on one connection
    // (round-trip latency), and 64-page pipelined batches (throughput).
    let d = tempfile::tempdir()?;
    make_store(d.path());
    let h = start(d.path(), |_| {});
    for ep in [tcp(&h), Endpoint::Unix(d.path().join("ps.sock"))] {
        let rp = RemotePages::connect(ep.clone(), opts("ck"))?;
        let mut buf = vec![0u8; 4096];
        let mut lat = Vec::with_capacity(4000);
        let t0 = Instant::now();
        for i in 0..4000u64 {
            let p = 64 + (i * 7) % (PAGES - 64);
            let s = Instant::now();
            rp.read_pages(1, BASE + p * 4096, &mut buf)?;
            lat.push(s.elapsed());
        }
        let el = t0.elapsed();
        lat.sort();
        eprintln!(
            "{ep}: 1-page reads: {:.0} requests/s, p50 {:?}, p99 {:?}, max {:?}",
            4000.0 / el.as_secs_f64(),
            lat[2000],
            lat[3960],
            lat[3999]
        );
        let ranges: Vec<Range> = (0..256u64)
            .map(|i| Range {
                pid: if i % 2 == 0 { 1 } else { 2 },
                vaddr: BASE + (i / 2 % 30) * 64 * 4096,
                nr_pages: 16,
            })
            .collect();
        let mut big = vec![0u8; 256 * 16 * 4096];
        let t0 = Instant::now();
        let mut n = 0;
        while t0.elapsed() < Duration::from_millis(500) {
            rp.read_batch(&ranges, &mut big)?;
            n += 1;
        }
        let el = t0.elapsed();
        eprintln!(
            "{ep}: batches of 256 x 16 pages: {:.0} ranges/s, {:.0} MiB/s",
            f64::from(n) * 256.0 / el.as_secs_f64(),
            f64::from(n) * 256.0 * 16.0 * 4096.0 / f64::from(1 << 20) / el.as_secs_f64()
        );
    }
    Ok(())
}
