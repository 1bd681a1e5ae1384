//! The page server with real CRIU: a workload is dumped with `criu dump`, then
//! (a) unmodified `criu lazy-pages --page-server` restores it from our server;
//! (b) `criu dump --page-server` pushes into our server, and our fetcher restores from it;
//! (c) our fetcher (`LazyPagesServer`) with `RemotePages` restores from our server over TCP;
//! (d) 16 concurrent `RemotePages` clients read a real checkpoint and match the local images.
//! The server runs in-process on real sockets. Each test has its own ports and directory.

mod common;

use distriproc_harness::NetNs;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use common::*;
use distriproc_pageserver::{Server, ServerHandle, ServerOptions};
use distriproc_runtime::fetcher::{FetchStats, FetcherOptions, LazyPagesServer};
use distriproc_runtime::images::{ImageDir, PageData, PAGE_SIZE};
use distriproc_runtime::remote::{Endpoint, RemoteOptions, RemotePages};
use distriproc_runtime::source::{LocalImages, PageKind, PageSource};

const T: Duration = Duration::from_secs(30);

fn server(store: &Path, criu_default: Option<&str>) -> Result<ServerHandle> {
    let mut o = ServerOptions::for_store(store.to_path_buf());
    o.listen = vec!["127.0.0.1:0".into()];
    o.criu_default = criu_default.map(str::to_string);
    Ok(Server::start(o)?)
}

fn port(h: &ServerHandle) -> Result<u16> {
    let a: std::net::SocketAddr = h.addrs()[0].parse()?;
    Ok(a.port())
}

/// A child process killed and reaped on drop.
struct Reaped(Option<Child>);

impl Reaped {
    fn wait_timeout(&mut self, t: Duration) -> Result<std::process::ExitStatus> {
        let until = Instant::now() + t;
        let c = self.0.as_mut().context("no child")?;
        loop {
            if let Some(st) = c.try_wait()? {
                self.0 = None;
                return Ok(st);
            }
            if Instant::now() > until {
                bail!("child {} still running after {t:?}", c.id());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Reaped {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Where `criu lazy-pages --page-server` gets its pages.
enum PageServerArg {
    /// `--address 127.0.0.1 --port P`.
    Port(u16),
    /// `--ps-socket FD`: a connection this test opened (and authenticated).
    Socket(i32),
}

/// `criu lazy-pages --page-server`, ready (status fd) on return.
fn criu_lazy_pages(img: &Path, work: &Path, ps: PageServerArg) -> Result<Reaped> {
    let (r, w): (OwnedFd, OwnedFd) = nix::unistd::pipe()?;
    let wfd = w.as_raw_fd();
    let mut cmd = Command::new(CRIU);
    cmd.args(["lazy-pages", "-D"])
        .arg(img)
        .arg("-W")
        .arg(work)
        .arg("--page-server");
    let sfd = match ps {
        PageServerArg::Port(port) => {
            cmd.args(["--address", "127.0.0.1", "--port"])
                .arg(port.to_string());
            -1
        }
        PageServerArg::Socket(fd) => {
            cmd.args(["--ps-socket", &fd.to_string()]);
            fd
        }
    };
    cmd.args([
        "--status-fd",
        &wfd.to_string(),
        "-o",
        "lazy-pages.log",
        "-v4",
    ])
    .stdin(Stdio::null())
    .stdout(Stdio::null())
    .stderr(Stdio::null());
    // SAFETY: only async-signal-safe fcntl in the child, on an fd we own and keep open.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || {
            // Keep the write end across exec (pipe() fds are not CLOEXEC in nix, but be sure).
            for fd in [wfd, sfd] {
                if fd >= 0 && libc::fcntl(fd, libc::F_SETFD, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let child = Reaped(Some(cmd.spawn().context("spawn criu lazy-pages")?));
    drop(w);
    let mut f = std::fs::File::from(r);
    let mut b = [0u8; 1];
    // The status byte, or EOF if lazy-pages died.
    let n = std::io::Read::read(&mut f, &mut b)?;
    if n != 1 {
        let log = std::fs::read_to_string(work.join("lazy-pages.log")).unwrap_or_default();
        bail!("criu lazy-pages did not become ready:\n{}", tail(&log, 30));
    }
    Ok(child)
}

fn verify(port: u16) -> Result<()> {
    let v = query(port, "VERIFY", T)?;
    ensure!(v.starts_with("OK"), "port {port}: VERIFY said {v}");
    Ok(())
}

fn remote(port: u16, ck: &str) -> Result<RemotePages> {
    let mut o = RemoteOptions::new(ck);
    o.client = format!("test-{ck}");
    Ok(RemotePages::connect(
        Endpoint::Tcp(format!("127.0.0.1:{port}")),
        o,
    )?)
}

/// Restores `img` with our fetcher reading pages from `source`; verifies and waits for the
/// fill. The restored processes live until the returned guard drops.
fn restore_with(
    img: &Path,
    work: &Path,
    pids: Vec<i32>,
    source: Arc<dyn PageSource>,
    lazyhog_port: u16,
) -> Result<(FetchStats, KillOnDrop)> {
    std::fs::create_dir_all(work)?;
    let server = LazyPagesServer::bind(work, img, source, FetcherOptions::default())?;
    let handle = server.spawn()?;
    let kill = KillOnDrop(pids);
    let out = restore(img, work)?;
    if !out.status.success() {
        handle.stop();
        let _ = handle.wait();
        bail!(
            "criu restore failed: {:?}\n{}",
            out.status,
            tail(&restore_log(work), 40)
        );
    }
    verify(lazyhog_port)?;
    let s = handle.wait()?;
    verify(lazyhog_port)?;
    Ok((s, kill))
}

#[test]
fn a_criu_lazy_pages_restores_from_our_server() -> Result<()> {
    if !ready() {
        return Ok(());
    }
    let dir = scratch("ps-criu-get");
    let store = dir.join("store");
    let img = store.join("ck");
    let work = dir.join("work");
    std::fs::create_dir_all(&img)?;
    std::fs::create_dir_all(&work)?;
    let mut w = Workload::start(&dir, 17301, 32, 2, 0, false)?;
    let pids = dump(&mut w, &img)?;
    let h = server(&store, Some("ck"))?;
    let p = port(&h)?;
    let mut lp = criu_lazy_pages(&img, &work, PageServerArg::Port(p))?;
    let _kill = KillOnDrop(pids);
    let t0 = Instant::now();
    let out = restore(&img, &work)?;
    if !out.status.success() {
        bail!(
            "criu restore failed: {:?}\n{}\nlazy-pages.log:\n{}",
            out.status,
            tail(&restore_log(&work), 30),
            tail(
                &std::fs::read_to_string(work.join("lazy-pages.log")).unwrap_or_default(),
                30
            )
        );
    }
    eprintln!("a: criu restore took {:?}", t0.elapsed());
    verify(17301)?;
    verify(17302)?;
    let st = lp.wait_timeout(Duration::from_secs(60))?;
    let log = std::fs::read_to_string(work.join("lazy-pages.log")).unwrap_or_default();
    ensure!(st.success(), "criu lazy-pages: {st:?}\n{}", tail(&log, 30));
    ensure!(
        log.contains("UFFD transferred pages"),
        "lazy-pages.log:\n{}",
        tail(&log, 30)
    );
    verify(17301)?;
    verify(17302)?;
    let m = h.metrics_text();
    eprintln!(
        "a: {}",
        m.lines()
            .filter(|l| l.starts_with("distriproc_pageserver_requests_total")
                || l.starts_with("distriproc_pageserver_bytes_total"))
            .collect::<Vec<_>>()
            .join("; ")
    );
    ensure!(!m.contains("requests_total{proto=\"criu\"} 0"), "{m}");
    Ok(())
}

#[test]
fn b_criu_dump_pushes_to_our_server_then_lazy_restore() -> Result<()> {
    if !ready() {
        return Ok(());
    }
    let dir = scratch("ps-criu-push");
    let store = dir.join("store");
    let local = dir.join("local");
    std::fs::create_dir_all(&store)?;
    std::fs::create_dir_all(&local)?;
    let h = server(&store, None)?;
    let p = port(&h)?;
    let mut w = Workload::start(&dir, 17311, 24, 1, 2, false)?;
    let pids = tree_pids(w.pid);
    let out = Command::new(CRIU)
        .args(["dump", "-t", &w.pid.to_string(), "-D"])
        .arg(&local)
        .args(["--page-server", "--address", "127.0.0.1", "--port"])
        .arg(p.to_string())
        .args(["-o", "dump.log", "-v4"])
        .output()?;
    if !out.status.success() {
        let log = std::fs::read_to_string(local.join("dump.log")).unwrap_or_default();
        bail!(
            "criu dump --page-server failed: {:?}\n{}",
            out.status,
            tail(&log, 40)
        );
    }
    w.reap();
    wait_gone(&pids, Duration::from_secs(10))?;
    let pushed: Vec<PathBuf> = std::fs::read_dir(&store)?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("push-"))
        })
        .collect();
    ensure!(pushed.len() == 1, "pushed checkpoints: {pushed:?}");
    let id = pushed[0]
        .file_name()
        .and_then(|n| n.to_str())
        .context("push id")?
        .to_string();
    ensure!(
        !local.join(format!("pagemap-{}.img", w.pid)).exists(),
        "criu wrote the pagemap locally"
    );
    // What the server stored reads like a dump (4.2 field 5 and field 2 both set).
    let stored = ImageDir::open(&pushed[0])?;
    let pm = stored.pagemap(u32::try_from(w.pid)?)?;
    ensure!(
        pm.present_pages() > 0 && pm.lazy_pages() > 0,
        "{:?}",
        pm.entries.len()
    );
    let size = std::fs::metadata(&pm.files[0])?.len();
    ensure!(
        pm.present_pages() * PAGE_SIZE == size,
        "pages file size {size}"
    );
    // The restore needs the pagemaps (and the eager pages) locally, like after a plain dump.
    for e in std::fs::read_dir(&pushed[0])?.flatten() {
        let n = e.file_name();
        let n = n.to_string_lossy();
        if n.starts_with("pagemap-") || n.starts_with("pages-") {
            std::fs::copy(e.path(), local.join(&*n))?;
        }
    }
    let src = Arc::new(remote(p, &id)?);
    let (s, _kill) = restore_with(&local, &dir.join("work"), pids, src.clone(), 17311)?;
    eprintln!("b: pushed as {id}; fetcher {s:?}; client {:?}", src.stats());
    ensure!(
        s.pages_faulted + s.pages_prefetched + s.pages_filled >= s.lazy_pages,
        "{s:?}"
    );
    Ok(())
}

#[test]
fn c_fetcher_with_remote_pages_over_tcp() -> Result<()> {
    if !ready() {
        return Ok(());
    }
    let dir = scratch("ps-fetcher");
    let store = dir.join("store");
    let img = store.join("ck");
    std::fs::create_dir_all(&img)?;
    let mut w = Workload::start(&dir, 17321, 32, 3, 2, false)?;
    let pids = dump(&mut w, &img)?;
    let h = server(&store, None)?;
    let p = port(&h)?;
    let src = Arc::new(remote(p, "ck")?);
    let t0 = Instant::now();
    let (s, _kill) = restore_with(&img, &dir.join("work"), pids, src.clone(), 17321)?;
    eprintln!(
        "c: restore+fill {:?}; fetcher {s:?}; client {:?}",
        t0.elapsed(),
        src.stats()
    );
    for i in 0..3 {
        verify(17321 + i)?;
    }
    ensure!(s.tasks == 3, "{s:?}");
    ensure!(
        s.pages_faulted + s.pages_prefetched + s.pages_filled >= s.lazy_pages,
        "{s:?}"
    );
    drop(src);
    drop(h);
    let report = distriproc_pageserver::stats::run(&store, Some("ck"))?;
    eprintln!("{report}");
    ensure!(report.contains("test-ck"), "{report}");
    Ok(())
}

#[test]
fn d_sixteen_clients_read_a_real_checkpoint() -> Result<()> {
    if !ready() {
        return Ok(());
    }
    let dir = scratch("ps-16");
    let store = dir.join("store");
    let img = store.join("ck");
    std::fs::create_dir_all(&img)?;
    let mut w = Workload::start(&dir, 17331, 16, 1, 0, false)?;
    let pids = dump(&mut w, &img)?;
    let vpid = u32::try_from(pids[0])?;
    let h = server(&store, None)?;
    let p = port(&h)?;
    let local = Arc::new(LocalImages::open(&img)?);
    let ranges: Vec<(u64, u64)> = ImageDir::open(&img)?
        .pagemap(vpid)?
        .segments
        .iter()
        .filter(|s| matches!(s.data, PageData::File { .. }))
        .map(|s| (s.vaddr, s.nr_pages))
        .collect();
    let total: u64 = ranges.iter().map(|r| r.1).sum();
    let ranges = Arc::new(ranges);
    let t0 = Instant::now();
    let threads: Vec<_> = (0..16)
        .map(|i| {
            let local = local.clone();
            let ranges = ranges.clone();
            std::thread::spawn(move || -> Result<(u64, Duration)> {
                let rp = remote(p, "ck")?;
                let chunk = [1usize, 16, 64, 256][i % 4];
                let mut a = vec![0u8; chunk * 4096];
                let mut b = vec![0u8; chunk * 4096];
                let mut pages = 0;
                let mut worst = Duration::ZERO;
                for &(start, n) in ranges.iter() {
                    let mut off = 0;
                    while off < n {
                        let want = usize::try_from((n - off).min(chunk as u64))?;
                        let v = start + off * 4096;
                        let s = Instant::now();
                        let r = rp.read_pages(vpid, v, &mut a[..want * 4096])?;
                        worst = worst.max(s.elapsed());
                        let l = local.read_pages(vpid, v, &mut b[..r.pages * 4096])?;
                        ensure!(r == l && r.kind == PageKind::Data, "{v:#x}: {r:?} vs {l:?}");
                        ensure!(
                            a[..r.pages * 4096] == b[..r.pages * 4096],
                            "bytes at {v:#x}"
                        );
                        off += r.pages as u64;
                        pages += r.pages as u64;
                    }
                }
                Ok((pages, worst))
            })
        })
        .collect();
    let mut worst = Duration::ZERO;
    for t in threads {
        let (pages, wst) = t.join().expect("thread")?;
        ensure!(pages == total, "{pages} != {total}");
        worst = worst.max(wst);
    }
    let el = t0.elapsed();
    eprintln!(
        "d: 16 clients x {total} pages in {el:?} ({:.1} MiB/s), slowest read {worst:?}",
        (16 * total * 4096) as f64 / (1 << 20) as f64 / el.as_secs_f64()
    );
    Ok(())
}

#[test]
fn e_criu_lazy_pages_on_an_authenticated_socket() -> Result<()> {
    // The shim's `criu` fetcher mode: the shim connects, says hello with the token, the
    // checkpoint and HELLO_CRIU, and hands the socket to `criu lazy-pages --ps-socket FD`.
    if !ready() {
        return Ok(());
    }
    let dir = scratch("ps-criu-socket");
    let store = dir.join("store");
    let img = store.join("ck");
    let work = dir.join("work");
    std::fs::create_dir_all(&img)?;
    std::fs::create_dir_all(&work)?;
    let mut w = Workload::start(&dir, 17341, 16, 1, 0, false)?;
    let pids = dump(&mut w, &img)?;
    let mut o = ServerOptions::for_store(store.clone());
    o.token = Some("tok".into());
    let h = Server::start(o)?;
    let mut s = std::net::TcpStream::connect(&h.addrs()[0])?;
    let hello = distriproc_runtime::protocol::Hello {
        version: distriproc_runtime::protocol::VERSION,
        checkpoint: "ck".into(),
        token: "tok".into(),
        client: "criu-mode-test".into(),
        criu_mode: true,
    };
    std::io::Write::write_all(&mut s, &hello.encode()?)?;
    let r = distriproc_runtime::protocol::HelloReply::read(&mut s)?;
    ensure!(
        r.status == distriproc_runtime::protocol::HelloStatus::Ok,
        "{r:?}"
    );
    let mut lp = criu_lazy_pages(&img, &work, PageServerArg::Socket(s.as_raw_fd()))?;
    drop(s);
    let _kill = KillOnDrop(pids);
    let out = restore(&img, &work)?;
    ensure!(
        out.status.success(),
        "criu restore failed: {:?}\n{}",
        out.status,
        tail(&restore_log(&work), 30)
    );
    verify(17341)?;
    let st = lp.wait_timeout(Duration::from_secs(60))?;
    let log = std::fs::read_to_string(work.join("lazy-pages.log")).unwrap_or_default();
    ensure!(st.success(), "criu lazy-pages: {st:?}\n{}", tail(&log, 30));
    verify(17341)?;
    let m = h.metrics_text();
    ensure!(!m.contains("requests_total{proto=\"criu\"} 0"), "{m}");
    Ok(())
}

#[test]
fn f_restore_over_a_veth_from_a_server_in_its_own_netns() -> Result<()> {
    if !ready() {
        return Ok(());
    }
    if Command::new("ip").arg("-V").output().is_err() {
        if std::env::var("CI").as_deref() == Ok("true") {
            bail!("iproute2 `ip` missing in CI");
        }
        eprintln!("SKIP: needs iproute2 `ip` for network namespaces");
        return Ok(());
    }
    let dir = scratch("ps-netns");
    let store = dir.join("store");
    let img = store.join("ck");
    std::fs::create_dir_all(&img)?;
    let mut w = Workload::start(&dir, 17351, 32, 1, 0, false)?;
    let pids = dump(&mut w, &img)?;
    let ns = NetNs::create("dp", 231, 7)?;
    let listen = format!("{}:0", ns.ns_addr);
    let store2 = store.clone();
    let h = ns.run(move || {
        let mut o = ServerOptions::for_store(store2);
        o.listen = vec![listen];
        Ok(Server::start(o)?)
    })?;
    let addr = h.addrs()[0].clone();
    ensure!(addr.starts_with("10.231.7.2:"), "{addr}");
    // Not reachable on the host's loopback: the pages really cross the veth.
    let p: std::net::SocketAddr = addr.parse()?;
    ensure!(
        std::net::TcpStream::connect(("127.0.0.1", p.port())).is_err(),
        "server visible on host loopback"
    );
    let mut o = RemoteOptions::new("ck");
    o.client = "netns-test".into();
    let src = Arc::new(RemotePages::connect(Endpoint::Tcp(addr.clone()), o)?);
    let t0 = Instant::now();
    let (s, _kill) = restore_with(&img, &dir.join("work"), pids, src.clone(), 17351)?;
    eprintln!(
        "f: restore+fill over veth to {addr} in {:?}; client {:?}; faults {} p50 {} us p99 {} us",
        t0.elapsed(),
        src.stats(),
        s.faults,
        s.fault_latency_us.p50,
        s.fault_latency_us.p99
    );
    ensure!(
        s.pages_faulted + s.pages_prefetched + s.pages_filled >= s.lazy_pages,
        "{s:?}"
    );
    drop(src);
    drop(h);
    Ok(())
}
