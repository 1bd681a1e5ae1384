//! The `distriproc-pageserver` binary: --help, a config file with flag overrides, listening on
//! TCP and unix sockets, token auth, garbage and hostile clients, /metrics over HTTP, the
//! `stats` subcommand, and a clean stop on SIGTERM. Every process started is killed and reaped
//! by pid.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use distriproc_runtime::images::testutil::*;
use distriproc_runtime::images::{PE_LAZY, PE_PRESENT};
use distriproc_runtime::remote::{Endpoint, RemoteOptions, RemotePages};
use distriproc_runtime::source::{PageKind, PageSource};

const BIN: &str = env!("CARGO_BIN_EXE_distriproc-pageserver");

struct Daemon {
    child: Option<Child>,
    addrs: Vec<String>,
    metrics: Option<String>,
}

impl Daemon {
    fn start(args: &[&str]) -> Daemon {
        let mut child = Command::new(BIN)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn distriproc-pageserver");
        let out = child.stdout.take().expect("stdout");
        let mut lines = BufReader::new(out).lines();
        let mut addrs = Vec::new();
        let mut metrics = None;
        let want = args.iter().filter(|a| **a == "--listen").count().max(1)
            + usize::from(args.contains(&"--metrics"));
        for _ in 0..want {
            let l = lines.next().expect("a line").expect("read stdout");
            if let Some(a) = l.strip_prefix("listening on ") {
                addrs.push(a.to_string());
            } else if let Some(m) = l.strip_prefix("metrics on ") {
                metrics = Some(m.to_string());
            }
        }
        Daemon {
            child: Some(child),
            addrs,
            metrics,
        }
    }

    fn pid(&self) -> i32 {
        i32::try_from(self.child.as_ref().expect("child").id()).expect("pid")
    }

    fn stop(&mut self) -> std::process::ExitStatus {
        let mut c = self.child.take().expect("child");
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(i32::try_from(c.id()).expect("pid")),
            nix::sys::signal::Signal::SIGTERM,
        )
        .expect("SIGTERM");
        let until = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(st) = c.try_wait().expect("wait") {
                return st;
            }
            if Instant::now() > until {
                let _ = c.kill();
                let _ = c.wait();
                panic!("page server ignored SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn checkpoint(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    write_inventory(dir).unwrap();
    write_pstree(dir, &[3]).unwrap();
    write_pagemap(dir, 3, 1, &[pm(0x40_0000, 8, PE_PRESENT | PE_LAZY)]).unwrap();
    let pages: Vec<u8> = (1..=8u8).flat_map(|b| [b; 4096]).collect();
    std::fs::write(dir.join("pages-1.img"), pages).unwrap();
}

fn http_get(addr: &str, path: &str) -> String {
    let mut s = TcpStream::connect(addr).expect("connect metrics");
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

#[test]
fn help_documents_every_flag() {
    let out = Command::new(BIN).arg("--help").output().unwrap();
    assert!(out.status.success());
    let t = String::from_utf8_lossy(&out.stdout);
    for f in [
        "--store",
        "--listen",
        "--criu-default",
        "--criu-header",
        "--token-file",
        "--metrics",
        "--config",
        "--max-clients",
        "--io-timeout-ms",
        "stats",
    ] {
        assert!(t.contains(f), "--help lacks {f}:\n{t}");
    }
    let out = Command::new(BIN)
        .args(["stats", "--help"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("--store"));
}

#[test]
fn bad_configuration_is_refused_with_the_key() {
    let d = tempfile::tempdir().unwrap();
    let cfg = d.path().join("ps.toml");
    std::fs::write(&cfg, "listen = [\"127.0.0.1:0\"]\nmax_clientz = 3\n").unwrap();
    let out = Command::new(BIN)
        .arg("--config")
        .arg(&cfg)
        .arg("--store")
        .arg(d.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(e.contains("max_clientz") && e.contains("ps.toml"), "{e}");
    let out = Command::new(BIN)
        .args(["--store", "/nonexistent-store", "--listen", "127.0.0.1:0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(e.contains("/nonexistent-store"), "{e}");
    let out = Command::new(BIN)
        .arg("--store")
        .arg(d.path())
        .args(["--listen", "nowhere"])
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && e.contains("listen"), "{e}");
}

#[test]
fn daemon_serves_checks_tokens_survives_garbage_and_stops_on_sigterm() {
    let d = tempfile::tempdir().unwrap();
    let store = d.path().join("store");
    checkpoint(&store.join("ck"));
    std::fs::write(d.path().join("token"), "t0ken\n").unwrap();
    let cfg = d.path().join("ps.toml");
    std::fs::write(&cfg, "listen = [\"127.0.0.1:1\"]\nio_timeout_ms = 5000\n").unwrap();
    let sock = d.path().join("ps.sock");
    let sock_arg = format!("unix:{}", sock.display());
    let token = d.path().join("token");
    let mut dm = Daemon::start(&[
        "--config",
        cfg.to_str().unwrap(),
        "--store",
        store.to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
        "--listen",
        &sock_arg,
        "--token-file",
        token.to_str().unwrap(),
        "--metrics",
        "127.0.0.1:0",
    ]);
    assert!(dm.pid() > 0);
    assert_eq!(dm.addrs.len(), 2, "{:?}", dm.addrs);
    let tcp = dm.addrs[0].clone();
    assert!(
        !tcp.ends_with(":1"),
        "flag did not override the file: {tcp}"
    );

    // Garbage and hostile bytes; each connection is dropped, the daemon stays up.
    for junk in [
        &b"\x00\x00\x00\x00garbage"[..],
        b"DPPS\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff",
        b"\x07\x00\x00\x00\x00\x00\x00\x00\xff\xff\xff\xff\xff\xff\xff\xff",
        b"GET /metrics HTTP/1.0\r\n\r\n",
    ] {
        let mut s = TcpStream::connect(&tcp).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(junk).unwrap();
        let _ = s.shutdown(std::net::Shutdown::Write);
        let mut sink = Vec::new();
        let _ = s.read_to_end(&mut sink);
    }

    let mut o = RemoteOptions::new("ck");
    let e = RemotePages::connect(Endpoint::Tcp(tcp.clone()), o.clone()).unwrap_err();
    let chain = format!("{e}: {}", std::error::Error::source(&e).unwrap());
    assert!(chain.contains("unauthorized"), "{chain}");
    o.token = "t0ken".into();
    for ep in [Endpoint::Tcp(tcp.clone()), Endpoint::Unix(sock.clone())] {
        let rp = RemotePages::connect(ep, o.clone()).unwrap();
        let mut buf = vec![0u8; 16 * 4096];
        let r = rp.read_pages(3, 0x40_0000, &mut buf).unwrap();
        assert_eq!((r.pages, r.kind), (8, PageKind::Data));
        assert!((1..=8u8).all(|b| buf[usize::from(b - 1) * 4096] == b));
        let r = rp.read_pages(3, 0x40_8000, &mut buf).unwrap();
        assert_eq!(r.kind, PageKind::Zero);
    }

    // One refused hello (wrong token) and one plain CRIU client (cannot present a token).
    let maddr = dm.metrics.clone().unwrap();
    let maddr = maddr
        .trim_start_matches("http://")
        .trim_end_matches("/metrics");
    let m = http_get(maddr, "/metrics");
    assert!(m.starts_with("HTTP/1.1 200"), "{m}");
    assert!(
        m.contains("distriproc_pageserver_requests_total{proto=\"native\"} 4"),
        "{m}"
    );
    assert!(
        m.contains("distriproc_pageserver_errors_total{kind=\"auth\"} 2"),
        "{m}"
    );
    assert!(
        m.contains("distriproc_pageserver_checkpoints_cached 1"),
        "{m}"
    );
    assert!(
        m.contains("request_duration_seconds_bucket{le=\"+Inf\"} 4"),
        "{m}"
    );
    let nf = http_get(maddr, "/other");
    assert!(nf.starts_with("HTTP/1.1 404"), "{nf}");

    let st = dm.stop();
    assert!(st.success(), "{st:?}");
    assert!(!sock.exists(), "unix socket left behind");

    let out = Command::new(BIN)
        .args(["stats", "--store", store.to_str().unwrap(), "ck"])
        .output()
        .unwrap();
    let t = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{t}");
    assert!(
        t.contains("sessions: 2 (native 2)") && t.contains("pid 3: 8 pages stored"),
        "{t}"
    );
    let out = Command::new(BIN)
        .args(["stats", "--store", store.to_str().unwrap(), "../x"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("bad checkpoint id"));
}

#[test]
fn delete_and_gc_through_the_binary_while_a_server_serves() {
    let store = tempfile::tempdir().unwrap();
    checkpoint(&store.path().join("base"));
    checkpoint(&store.path().join("lone"));
    let run = |args: &[&str]| {
        let out = Command::new(BIN).args(args).output().unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.code(), text)
    };
    let s = store.path().to_str().unwrap();
    let mut d = Daemon::start(&[
        "--store",
        s,
        "--listen",
        "127.0.0.1:0",
        "--gc-interval-s",
        "0",
    ]);
    let ep: Endpoint = d.addrs[0].parse().unwrap();
    // A session already open on a checkpoint keeps reading it after delete.
    let rp = RemotePages::connect(ep.clone(), RemoteOptions::new("lone")).unwrap();
    let (code, t) = run(&["delete", "--store", s, "nope"]);
    assert_eq!(code, Some(1), "{t}");
    assert!(t.contains("no checkpoint \"nope\""), "{t}");
    let (code, t) = run(&["delete", "--store", s, "lone"]);
    assert_eq!(code, Some(0), "{t}");
    assert!(t.contains("deleted lone"), "{t}");
    let (code, t) = run(&["gc", "--store", s, "--dry-run"]);
    assert_eq!(code, Some(0), "{t}");
    assert!(t.contains("would be removed lone"), "{t}");
    assert!(store.path().join("lone").exists());
    let e = RemotePages::connect(ep.clone(), RemoteOptions::new("lone")).unwrap_err();
    assert!(
        distriproc_runtime::error_chain(&e).contains("was deleted"),
        "{}",
        distriproc_runtime::error_chain(&e)
    );
    // gc leaves it while the session reads it (from another process: the session's flock).
    let (code, t) = run(&["gc", "--store", s]);
    assert_eq!(code, Some(0), "{t}");
    assert!(t.contains("kept lone: in use"), "{t}");
    let mut buf = vec![0u8; 8 * 4096];
    rp.read_pages(3, 0x40_0000, &mut buf).unwrap();
    assert!(buf[7 * 4096..].iter().all(|b| *b == 8));
    // Once nobody reads it, it goes.
    drop(rp);
    let t0 = Instant::now();
    let t = loop {
        let (code, t) = run(&["gc", "--store", s]);
        assert_eq!(code, Some(0), "{t}");
        if t.contains("removed lone") || t0.elapsed() > Duration::from_secs(10) {
            break t;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(
        t.contains("removed lone") && t.contains("1 checkpoints, 1 layers"),
        "{t}"
    );
    assert!(!store.path().join("lone").exists());
    let (_, t) = run(&["stats", "--store", s]);
    assert!(t.contains("1 checkpoints, 1 layers (0 deleted"), "{t}");
    assert!(d.stop().success());
}
