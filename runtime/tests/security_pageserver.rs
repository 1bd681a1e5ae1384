//! Security of the page server's native protocol, in-process over real TCP (no root needed):
//! per-checkpoint tokens (a client reads only the checkpoints its token allows), ids that try
//! to leave the store, absurd sizes refused before allocation, and thousands of random or
//! mutated messages after which the server still serves a valid client correctly.

// Byte patterns and the PRNG cut integers to bytes on purpose.
#![allow(clippy::cast_possible_truncation)]

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::path::Path;
use std::time::Duration;

use anyhow::{ensure, Result};
use distriproc_config::pageserver::PageServerConfig;
use distriproc_pageserver::{Server, ServerHandle, ServerOptions};
use distriproc_runtime::error_chain;
use distriproc_runtime::images::testutil::*;
use distriproc_runtime::images::PE_PRESENT;
use distriproc_runtime::protocol::upload::{FileHeader, FileKind};
use distriproc_runtime::protocol::{
    encode_request, read_response_header, Hello, HelloReply, HelloStatus, Range, RequestKind,
    RequestStatus, HELLO_UPLOAD, VERSION,
};
use distriproc_runtime::remote::{Endpoint, RemoteOptions, RemotePages};
use distriproc_runtime::source::{PageKind, PageSource};

const BASE: u64 = 0x7f00_0000_0000;
const PAGES: u64 = 64;

fn page(id: u8, p: u64) -> Vec<u8> {
    let mut v = vec![0u8; 4096];
    for (i, b) in v.iter_mut().enumerate() {
        *b = (p as u8) ^ (i as u8).wrapping_mul(31) ^ id;
    }
    v
}

/// A checkpoint of one task (pid 1) with PAGES present pages whose bytes depend on `id`.
fn make_checkpoint(dir: &Path, id: u8) {
    std::fs::create_dir_all(dir).unwrap();
    write_inventory(dir).unwrap();
    write_pstree(dir, &[1]).unwrap();
    write_pagemap(dir, 1, 1, &[pm(BASE, PAGES, PE_PRESENT)]).unwrap();
    let data: Vec<u8> = (0..PAGES).flat_map(|p| page(id, p)).collect();
    std::fs::write(dir.join("pages-1.img"), data).unwrap();
}

fn start(store: &Path, f: impl FnOnce(&mut ServerOptions)) -> ServerHandle {
    let mut o = ServerOptions::for_store(store.to_path_buf());
    o.io_timeout = Duration::from_secs(5);
    o.access_log = false;
    f(&mut o);
    Server::start(o).expect("start page server")
}

fn opts(ck: &str, token: &str) -> RemoteOptions {
    let mut o = RemoteOptions::new(ck);
    o.token = token.into();
    o.io_timeout = Duration::from_secs(10);
    o.retry_timeout = Duration::from_secs(2);
    o
}

fn tcp(h: &ServerHandle) -> Endpoint {
    Endpoint::Tcp(h.addrs()[0].clone())
}

/// Reads every page of `ck` through a client and compares with what `make_checkpoint` wrote.
fn check_all(h: &ServerHandle, ck: &str, token: &str, id: u8) -> Result<()> {
    let rp = RemotePages::connect(tcp(h), opts(ck, token))?;
    let mut buf = vec![0u8; 4096];
    for p in 0..PAGES {
        let r = rp.read_pages(1, BASE + p * 4096, &mut buf)?;
        ensure!(
            r.kind == PageKind::Data && r.pages == 1,
            "{ck} page {p}: {r:?}"
        );
        ensure!(buf == page(id, p), "{ck} page {p} differs");
    }
    Ok(())
}

fn hello_bytes(ck: &str, token: &str, flags: u16) -> Vec<u8> {
    Hello {
        version: VERSION,
        checkpoint: ck.into(),
        token: token.into(),
        client: "security-test".into(),
        criu_mode: false,
    }
    .encode_with_flags(flags)
    .unwrap()
}

fn raw_hello(h: &ServerHandle, bytes: &[u8]) -> Result<(TcpStream, HelloReply)> {
    let mut s = TcpStream::connect(&h.addrs()[0])?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.write_all(bytes)?;
    let r = HelloReply::read(&mut s)?;
    Ok((s, r))
}

#[test]
fn per_checkpoint_tokens_limit_what_a_client_reads() -> Result<()> {
    let d = tempfile::tempdir()?;
    let store = d.path().join("store");
    make_checkpoint(&store.join("ckpt-a1"), 1);
    make_checkpoint(&store.join("ckpt-a2"), 2);
    make_checkpoint(&store.join("ckpt-b1"), 3);
    make_checkpoint(&store.join("web-1"), 4);
    let tokens = d.path().join("tokens.toml");
    std::fs::write(
        &tokens,
        "\"team-a-token\" = [\"ckpt-a*\"]\n\"web-token\" = [\"web-1\", \"ckpt-b1\"]\n",
    )?;
    std::fs::write(d.path().join("shared"), "admin-token\n")?;
    // Through the configuration, as the binary loads it.
    let cfg = PageServerConfig::from_toml_str(
        &format!(
            "store = {:?}\nlisten = [\"127.0.0.1:0\"]\ntoken_file = {:?}\ntokens_file = {:?}\n\
             access_log = false\n",
            store.display().to_string(),
            d.path().join("shared").display().to_string(),
            tokens.display().to_string()
        ),
        "test.toml",
    )?;
    let o = ServerOptions::from_config(&cfg)?;
    ensure!(o.grants.len() == 2 && o.authenticates());
    let h = Server::start(o)?;

    // Allowed: each token reads its checkpoints, with the right bytes.
    check_all(&h, "ckpt-a1", "team-a-token", 1)?;
    check_all(&h, "ckpt-a2", "team-a-token", 2)?;
    check_all(&h, "web-1", "web-token", 4)?;
    check_all(&h, "ckpt-b1", "web-token", 3)?;
    // The shared token reads everything.
    check_all(&h, "ckpt-b1", "admin-token", 3)?;
    // Refused: a known token outside its patterns, an unknown token, no token.
    for (ck, token, want) in [
        (
            "ckpt-b1",
            "team-a-token",
            "not allowed checkpoint \"ckpt-b1\"",
        ),
        ("web-1", "team-a-token", "not allowed"),
        ("ckpt-a1", "web-token", "not allowed"),
        ("ckpt-a1", "guess", "wrong or missing token"),
        ("ckpt-a1", "", "wrong or missing token"),
        // Ids are matched exactly against the patterns, not as prefixes of other ids.
        ("web-10", "web-token", "not allowed"),
    ] {
        let e = RemotePages::connect(tcp(&h), opts(ck, token)).unwrap_err();
        let msg = error_chain(&e);
        ensure!(
            msg.contains("unauthorized") && msg.contains(want),
            "{ck} with {token:?}: {msg}"
        );
        let (_, r) = raw_hello(&h, &hello_bytes(ck, token, 0))?;
        ensure!(r.status == HelloStatus::Unauthorized, "{r:?}");
    }
    // An upload under an id outside the token's patterns is refused before any byte is stored.
    let (_, r) = raw_hello(&h, &hello_bytes("evil-1", "team-a-token", HELLO_UPLOAD))?;
    ensure!(r.status == HelloStatus::Unauthorized, "{r:?}");
    ensure!(!store.join("evil-1").exists());
    let m = h.metrics_text();
    ensure!(!m.contains("errors_total{kind=\"auth\"} 0"), "{m}");

    // A bad tokens file is refused at start with the file named, and the token not printed.
    std::fs::write(&tokens, "\"team-a-token\" = [\"../etc\"]\n")?;
    let e = ServerOptions::from_config(&cfg).unwrap_err().to_string();
    ensure!(
        e.contains("tokens_file") && e.contains("tokens.toml") && !e.contains("team-a-token"),
        "{e}"
    );
    Ok(())
}

#[test]
fn ids_cannot_escape_the_store() -> Result<()> {
    let d = tempfile::tempdir()?;
    let store = d.path().join("store");
    make_checkpoint(&store.join("ck"), 1);
    // A checkpoint outside the store that escaping ids would reach.
    make_checkpoint(&d.path().join("outside"), 9);
    let h = start(&store, |_| {});
    for id in [
        "../outside",
        "..",
        ".",
        "ck/../../outside",
        "/etc",
        "ck/",
        "ck\0",
        "%2e%2e",
        "-rf",
        ".distriproc",
        "a b",
        "ck\\..\\outside",
        "\u{2025}outside",
    ] {
        let (_, r) = raw_hello(&h, &hello_bytes(id, "", 0))?;
        ensure!(
            r.status == HelloStatus::BadCheckpointId || r.status == HelloStatus::UnknownCheckpoint,
            "{id:?}: {r:?}"
        );
        // Uploads under the same ids are refused and write nothing.
        let (_, r) = raw_hello(&h, &hello_bytes(id, "", HELLO_UPLOAD))?;
        ensure!(r.status != HelloStatus::Ok, "upload {id:?}: {r:?}");
    }
    let mut names: Vec<_> = std::fs::read_dir(d.path())?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<Result<_, _>>()?;
    names.sort();
    ensure!(names == ["outside", "store"], "{names:?}");
    // Upload file names cannot leave the checkpoint directory either.
    let (mut s, r) = raw_hello(&h, &hello_bytes("new-1", "", HELLO_UPLOAD))?;
    ensure!(r.status == HelloStatus::Ok, "{r:?}");
    let mut b = Vec::new();
    // Encode a valid header, then splice a traversal name of the same length into it.
    FileHeader {
        kind: FileKind::File,
        name: "aa.img".into(),
        size: 4,
    }
    .encode(&mut b)?;
    let at = b.len() - 6;
    b[at..].copy_from_slice(b"../x.i");
    s.write_all(&b)?;
    s.write_all(b"abcd")?;
    let _ = s.shutdown(Shutdown::Write);
    let mut sink = Vec::new();
    let _ = s.read_to_end(&mut sink);
    ensure!(!store.join("x.i").exists() && !d.path().join("x.i").exists());
    ensure!(!store.join("new-1").exists());
    check_all(&h, "ck", "", 1)?;
    Ok(())
}

#[test]
fn absurd_sizes_are_refused_before_allocation() -> Result<()> {
    let d = tempfile::tempdir()?;
    let store = d.path().join("store");
    make_checkpoint(&store.join("ck"), 1);
    let h = start(&store, |_| {});
    // Hello fields of 64 KiB announced, nothing sent after the fixed part: refused at once
    // (the server does not wait for, or allocate, the announced bytes).
    for off in [8usize, 10, 12] {
        let mut b = hello_bytes("ck", "", 0);
        b[off..off + 2].copy_from_slice(&u16::MAX.to_le_bytes());
        let (_, r) = raw_hello(&h, &b[..16])?;
        ensure!(r.status == HelloStatus::Malformed, "offset {off}: {r:?}");
        ensure!(r.message.contains("length"), "{r:?}");
    }
    // Requests: u16::MAX ranges, 4 G pages in one range, a range wrapping the address space,
    // and an upload file of 2^63 bytes.
    let session = || -> Result<TcpStream> {
        let (s, r) = raw_hello(&h, &hello_bytes("ck", "", 0))?;
        ensure!(r.status == HelloStatus::Ok, "{r:?}");
        Ok(s)
    };
    let mut s = session()?;
    let mut req = Vec::new();
    encode_request(1, RequestKind::ReadPages, 0, &[], &mut req)?;
    req[6..8].copy_from_slice(&u16::MAX.to_le_bytes());
    s.write_all(&req)?;
    let r = read_response_header(&mut s)?;
    ensure!(r.status == RequestStatus::Malformed, "{r:?}");
    for range in [
        Range {
            pid: 1,
            vaddr: BASE,
            nr_pages: u32::MAX,
        },
        Range {
            pid: 1,
            vaddr: !4095,
            nr_pages: 2,
        },
    ] {
        let mut s = session()?;
        let mut req = Vec::new();
        req.extend_from_slice(&2u32.to_le_bytes());
        req.extend_from_slice(&RequestKind::ReadPages.to_wire().to_le_bytes());
        req.extend_from_slice(&1u16.to_le_bytes());
        req.extend_from_slice(&[0u8; 8]);
        req.extend_from_slice(&range.pid.to_le_bytes());
        req.extend_from_slice(&range.nr_pages.to_le_bytes());
        req.extend_from_slice(&range.vaddr.to_le_bytes());
        s.write_all(&req)?;
        let r = read_response_header(&mut s)?;
        if r.status == RequestStatus::Ok {
            let rr = distriproc_runtime::protocol::read_range_reply_header(&mut s, 2)?;
            ensure!(
                rr.status != distriproc_runtime::protocol::RangeStatus::Ok,
                "{rr:?}"
            );
        } else {
            ensure!(r.status == RequestStatus::TooLarge, "{range:?}: {r:?}");
        }
    }
    let (mut s, r) = raw_hello(&h, &hello_bytes("big-1", "", HELLO_UPLOAD))?;
    ensure!(r.status == HelloStatus::Ok, "{r:?}");
    let mut b = Vec::new();
    FileHeader {
        kind: FileKind::File,
        name: "pages-1.img".into(),
        size: 1,
    }
    .encode(&mut b)?;
    b[8..16].copy_from_slice(&(1u64 << 63).to_le_bytes());
    s.write_all(&b)?;
    let _ = s.shutdown(Shutdown::Write);
    let mut sink = Vec::new();
    let _ = s.read_to_end(&mut sink);
    ensure!(!store.join("big-1").exists());
    check_all(&h, "ck", "", 1)?;
    Ok(())
}

/// xorshift64*: deterministic, no dependency.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

fn mutate(rng: &mut Rng, mut b: Vec<u8>) -> Vec<u8> {
    for _ in 0..=rng.below(4) {
        if b.is_empty() {
            b.push(rng.next() as u8);
            continue;
        }
        let i = rng.below(b.len());
        match rng.below(6) {
            0 => b[i] ^= 1 << rng.below(8),
            1 => b[i] = rng.next() as u8,
            2 => b.truncate(i),
            3 => {
                // An interesting value in a 16- or 32-bit field.
                let v: [u8; 4] = match rng.below(4) {
                    0 => [0xff; 4],
                    1 => [0; 4],
                    2 => [0, 0, 0, 0x80],
                    _ => [1, 0, 0, 0],
                };
                let n = v.len().min(b.len() - i);
                b[i..i + n].copy_from_slice(&v[..n]);
            }
            4 => {
                let extra: Vec<u8> = (0..rng.below(64)).map(|_| rng.next() as u8).collect();
                b.splice(i..i, extra);
            }
            _ => b.extend_from_slice(&b.clone()[i..]),
        }
    }
    b
}

#[test]
fn thousands_of_hostile_messages_then_a_valid_client() -> Result<()> {
    let d = tempfile::tempdir()?;
    let store = d.path().join("store");
    make_checkpoint(&store.join("ck"), 1);
    let h = start(&store, |o| {
        o.token = Some("s3cret".into());
        o.criu_default = Some("ck".into());
        o.io_timeout = Duration::from_millis(500);
    });
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let good = hello_bytes("ck", "s3cret", 0);
    let mut req = Vec::new();
    encode_request(
        1,
        RequestKind::ReadPages,
        1,
        &[
            Range {
                pid: 1,
                vaddr: BASE,
                nr_pages: 4,
            },
            Range {
                pid: 2,
                vaddr: BASE + 4096,
                nr_pages: 1,
            },
        ],
        &mut req,
    )?;
    let mut upload = hello_bytes("up-1", "s3cret", HELLO_UPLOAD);
    FileHeader {
        kind: FileKind::File,
        name: "inventory.img".into(),
        size: 8,
    }
    .encode(&mut upload)?;
    upload.extend_from_slice(&[0x16, 0x31, 0x31, 0x58, 0, 0, 0, 0]);
    FileHeader {
        kind: FileKind::End,
        name: String::new(),
        size: 1,
    }
    .encode(&mut upload)?;
    let mut criu = [0u8; 32];
    distriproc_runtime::protocol::criu::PsIov::new(
        distriproc_runtime::protocol::criu::Command::Get,
        1,
        BASE,
        distriproc_runtime::protocol::criu::encode_pm(1, 1),
    )
    .encode(
        distriproc_runtime::protocol::criu::HeaderLayout::V42,
        &mut criu,
    )?;

    const N: usize = 3000;
    let mut sent = 0usize;
    for i in 0..N {
        let msg = match i % 6 {
            0 => (0..rng.below(256)).map(|_| rng.next() as u8).collect(),
            1 => mutate(&mut rng, good.clone()),
            // A good hello, then a mutated request stream.
            2 | 3 => {
                let mut m = good.clone();
                let mut r = req.clone();
                r.extend_from_slice(&req);
                m.extend(mutate(&mut rng, r));
                m
            }
            4 => mutate(&mut rng, upload.clone()),
            _ => mutate(&mut rng, criu.to_vec()),
        };
        let Ok(mut s) = TcpStream::connect(&h.addrs()[0]) else {
            continue;
        };
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        s.set_write_timeout(Some(Duration::from_secs(5)))?;
        let _ = s.write_all(&msg);
        let _ = s.shutdown(Shutdown::Write);
        let mut sink = Vec::new();
        let _ = s.read_to_end(&mut sink);
        sent += 1;
    }
    ensure!(sent == N, "only {sent} of {N} connections were accepted");
    // Still up, and serving the right bytes.
    check_all(&h, "ck", "s3cret", 1)?;
    let m = h.metrics_text();
    ensure!(m.contains("errors_total"), "{m}");
    Ok(())
}
