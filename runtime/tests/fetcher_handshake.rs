//! The fetcher against a fake `criu restore` in this process: synthetic images, a real
//! userfaultfd over a region of this test process, the real socket protocol. Covers the
//! handshake's failure modes (timeouts, early close, bad marker, unknown pid, stop) and the
//! fault/fill path without criu.

use std::io::{IoSlice, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use distriproc_config::FillPolicy;
use distriproc_runtime::fetcher::{FetchError, FetcherOptions, LazyPagesServer, RESTORE_FINISHED};
use distriproc_runtime::images::testutil::{
    header, pm, push, write_inventory, write_pagemap, write_pstree,
};
use distriproc_runtime::images::{MmEntry, VmaEntry, MM_MAGIC, PE_LAZY, PE_PRESENT};
use distriproc_runtime::source::LocalImages;
use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};

const PID: u32 = 4242;
const PAGES: usize = 64;

fn uffd_available() -> bool {
    let ok = userfaultfd::UffdBuilder::new()
        .close_on_exec(true)
        .non_blocking(true)
        .user_mode_only(true)
        .create()
        .is_ok();
    if !ok {
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("userfaultfd unavailable in CI");
        }
        eprintln!("SKIP: userfaultfd unavailable (needs root or vm.unprivileged_userfaultfd=1)");
    }
    ok
}

fn page_byte(i: usize) -> u8 {
    u8::try_from(i % 251).unwrap() + 1
}

/// Images of one task whose only lazy VMA is `[base, base + PAGES pages)`: pages 0..8 and
/// 10..64 are lazy with data, 8..10 are a hole (zero).
fn write_images(dir: &Path, base: u64, pids: &[u32]) {
    write_inventory(dir).unwrap();
    write_pstree(dir, pids).unwrap();
    let mut b = header(MM_MAGIC);
    let vma = VmaEntry {
        start: base,
        end: base + (PAGES as u64) * 4096,
        flags: 0x22,
        status: 1 | (1 << 9),
        prot: 3,
        fd: -1,
        ..Default::default()
    };
    push(&mut b, &MmEntry { vmas: vec![vma] });
    std::fs::write(dir.join(format!("mm-{PID}.img")), b).unwrap();
    let f = PE_LAZY | PE_PRESENT;
    write_pagemap(
        dir,
        PID,
        1,
        &[pm(base, 8, f), pm(base + 10 * 4096, (PAGES - 10) as u64, f)],
    )
    .unwrap();
    let mut pages = Vec::new();
    for i in (0..8).chain(10..PAGES) {
        pages.extend(std::iter::repeat_n(page_byte(i), 4096));
    }
    std::fs::write(dir.join("pages-1.img"), pages).unwrap();
}

struct Region {
    ptr: *mut u8,
}

impl Region {
    fn new() -> Region {
        // SAFETY: a fresh private anonymous mapping; no existing memory is affected.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                PAGES * 4096,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        Region { ptr: p.cast() }
    }
    fn base(&self) -> u64 {
        self.ptr as u64
    }
    fn read(&self, page: usize) -> u8 {
        // SAFETY: `page < PAGES`, inside our mapping; a missing page is served by the fetcher.
        unsafe { std::ptr::read_volatile(self.ptr.add(page * 4096 + 17)) }
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly the mapping created in `new`.
        unsafe { libc::munmap(self.ptr.cast(), PAGES * 4096) };
    }
}

fn send_task(s: &UnixStream, pid: i32, uffd: &userfaultfd::Uffd) {
    (&*s).write_all(&pid.to_le_bytes()).unwrap();
    let fds = [uffd.as_raw_fd()];
    let cmsg = [ControlMessage::ScmRights(&fds)];
    sendmsg::<()>(
        s.as_raw_fd(),
        &[IoSlice::new(&[0u8])],
        &cmsg,
        MsgFlags::empty(),
        None,
    )
    .unwrap();
}

fn quick(fill: FillPolicy) -> FetcherOptions {
    FetcherOptions {
        fill,
        fill_batch_pages: 16,
        accept_timeout: Duration::from_secs(5),
        handshake_timeout: Duration::from_secs(5),
        restore_timeout: Duration::from_secs(5),
        ..Default::default()
    }
}

#[test]
fn serves_faults_then_fills_everything() {
    if !uffd_available() {
        return;
    }
    let region = Region::new();
    let img = tempfile::tempdir().unwrap();
    // A work dir path longer than sun_path (108 bytes): bind goes through /proc/self/fd.
    let work = img.path().join("w".repeat(120));
    std::fs::create_dir_all(&work).unwrap();
    std::fs::write(work.join("lazy-pages.socket"), b"stale").unwrap();
    write_images(img.path(), region.base(), &[PID, 4243]);
    let src = Arc::new(LocalImages::open(img.path()).unwrap());
    let server = LazyPagesServer::bind(&work, img.path(), src, quick(FillPolicy::Full)).unwrap();
    let h = server.spawn().unwrap();

    let uffd = userfaultfd::UffdBuilder::new()
        .close_on_exec(true)
        .non_blocking(true)
        .user_mode_only(true)
        .create()
        .unwrap();
    uffd.register(region.ptr.cast(), PAGES * 4096).unwrap();
    // Connect through /proc/self/cwd-free short path: a symlink to the long dir.
    let link = img.path().join("l");
    std::os::unix::fs::symlink(&work, &link).unwrap();
    let s = UnixStream::connect(link.join("lazy-pages.socket")).unwrap();
    send_task(&s, i32::try_from(PID).unwrap(), &uffd);
    (&s).write_all(&(-4243i32).to_le_bytes()).unwrap(); // a zombie
    drop(uffd); // like the restorer: only the fetcher holds the uffd now

    // Faults are served before the restore-finished marker.
    assert_eq!(region.read(20), page_byte(20));
    assert_eq!(region.read(9), 0, "hole must read as zero");
    assert_eq!(region.read(0), page_byte(0));
    let st = h.stats();
    // Two faults at least (pages 20 and 9); page 0 may already be in by then, installed by
    // the fault-around window of page 9's fault (it zero-fills the hole and prefetches 0..16).
    assert!(st.faults >= 2, "{st:?}");
    assert_eq!(st.pages_filled, 0, "fill before the marker: {st:?}");
    assert!(st.pages_prefetched > 0, "fault-around: {st:?}");

    (&s).write_all(&RESTORE_FINISHED.to_le_bytes()).unwrap();
    let st = h.wait().unwrap();
    for i in 0..PAGES {
        let want = if (8..10).contains(&i) {
            0
        } else {
            page_byte(i)
        };
        assert_eq!(region.read(i), want, "page {i}");
    }
    assert_eq!(st.lazy_pages, (PAGES - 2) as u64, "{st:?}");
    assert_eq!(
        st.pages_faulted + st.pages_prefetched + st.pages_filled,
        st.lazy_pages,
        "{st:?}"
    );
    assert_eq!(st.zombies, 1);
    assert!(st.fill_complete_us.is_some());
    assert!(st.fault_latency_us.count >= 2);
}

#[test]
fn accept_timeout_and_stop() {
    let region = Region::new();
    let img = tempfile::tempdir().unwrap();
    write_images(img.path(), region.base(), &[PID]);
    let src = Arc::new(LocalImages::open(img.path()).unwrap());
    let mut o = quick(FillPolicy::Full);
    o.accept_timeout = Duration::from_millis(200);
    let h = LazyPagesServer::bind(img.path(), img.path(), src.clone(), o)
        .unwrap()
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    let e = h.wait().unwrap_err();
    assert!(matches!(e, FetchError::Timeout { .. }), "{e}");
    assert!(t0.elapsed() < Duration::from_secs(3));

    let h = LazyPagesServer::bind(img.path(), img.path(), src, quick(FillPolicy::Full))
        .unwrap()
        .spawn()
        .unwrap();
    h.stop();
    let e = h.wait().unwrap_err();
    assert!(matches!(e, FetchError::Stopped), "{e}");
}

#[test]
fn handshake_errors() {
    let region = Region::new();
    let img = tempfile::tempdir().unwrap();
    write_images(img.path(), region.base(), &[PID, 4243]);
    let src = Arc::new(LocalImages::open(img.path()).unwrap());
    let start = |o| {
        let h = LazyPagesServer::bind(img.path(), img.path(), src.clone(), o)
            .unwrap()
            .spawn()
            .unwrap();
        let s = UnixStream::connect(img.path().join("lazy-pages.socket")).unwrap();
        (h, s)
    };

    // Closed before the pid is complete.
    let (h, s) = start(quick(FillPolicy::Full));
    (&s).write_all(&[1, 2]).unwrap();
    drop(s);
    let e = h.wait().unwrap_err();
    assert!(matches!(e, FetchError::Closed { .. }), "{e}");

    // A pid that is not in pstree.img.
    let (h, s) = start(quick(FillPolicy::Full));
    let uffd = userfaultfd::UffdBuilder::new()
        .user_mode_only(true)
        .create();
    if let Ok(uffd) = uffd {
        send_task(&s, 999, &uffd);
        let e = h.wait().unwrap_err();
        assert!(matches!(e, FetchError::UnknownPid { pid: 999 }), "{e}");
    } else {
        h.stop();
        let _ = h.wait();
    }

    // Two zombies, then a wrong marker.
    let (h, s) = start(quick(FillPolicy::Full));
    (&s).write_all(&(-1i32).to_le_bytes()).unwrap();
    (&s).write_all(&(-2i32).to_le_bytes()).unwrap();
    (&s).write_all(&0xdead_beef_u32.to_le_bytes()).unwrap();
    let e = h.wait().unwrap_err();
    assert!(
        matches!(e, FetchError::BadMarker { value: 0xdead_beef }),
        "{e}"
    );

    // Silence after the last task: the restore timeout fires.
    let mut o = quick(FillPolicy::Full);
    o.restore_timeout = Duration::from_millis(200);
    let (h, s) = start(o);
    (&s).write_all(&(-1i32).to_le_bytes()).unwrap();
    (&s).write_all(&(-2i32).to_le_bytes()).unwrap();
    let e = h.wait().unwrap_err();
    assert!(
        matches!(
            e,
            FetchError::Timeout {
                what: "the restore-finished marker",
                ..
            }
        ),
        "{e}"
    );
    drop(s);

    // Only zombies and the marker: nothing to serve, wait() returns Ok.
    let (h, s) = start(quick(FillPolicy::Full));
    (&s).write_all(&(-1i32).to_le_bytes()).unwrap();
    (&s).write_all(&(-2i32).to_le_bytes()).unwrap();
    (&s).write_all(&RESTORE_FINISHED.to_le_bytes()).unwrap();
    let st = h.wait().unwrap();
    assert_eq!(st.zombies, 2);

    // Bad options are refused at bind.
    let mut o = quick(FillPolicy::Full);
    o.fault_around_pages = 3;
    assert!(matches!(
        LazyPagesServer::bind(img.path(), img.path(), src.clone(), o),
        Err(FetchError::BadOption { .. })
    ));
}

#[test]
fn stop_poisons_what_was_never_installed() {
    if !uffd_available() {
        return;
    }
    let region = Region::new();
    let img = tempfile::tempdir().unwrap();
    write_images(img.path(), region.base(), &[PID]);
    let src = Arc::new(LocalImages::open(img.path()).unwrap());
    let mut o = quick(FillPolicy::None);
    o.fault_around_pages = 1;
    let h = LazyPagesServer::bind(img.path(), img.path(), src, o)
        .unwrap()
        .spawn()
        .unwrap();
    let uffd = userfaultfd::UffdBuilder::new()
        .close_on_exec(true)
        .non_blocking(true)
        .user_mode_only(true)
        .create()
        .unwrap();
    uffd.register(region.ptr.cast(), PAGES * 4096).unwrap();
    let s = UnixStream::connect(img.path().join("lazy-pages.socket")).unwrap();
    send_task(&s, i32::try_from(PID).unwrap(), &uffd);
    drop(uffd);
    (&s).write_all(&RESTORE_FINISHED.to_le_bytes()).unwrap();
    assert_eq!(region.read(3), page_byte(3));
    std::thread::sleep(Duration::from_millis(100));
    assert!(!h.is_finished(), "fill none keeps serving");
    h.stop();
    let st = h.wait().unwrap();
    assert_eq!(st.pages_filled, 0);
    assert_eq!(st.pages_faulted, 1, "{st:?}");
    assert_eq!(st.pages_poisoned, st.lazy_pages - 1, "{st:?}");
    // A never-installed page must not read as zero now that the fetcher is gone: SIGBUS.
    // SAFETY: the child only reads memory and calls _exit.
    match unsafe { nix::unistd::fork() }.unwrap() {
        nix::unistd::ForkResult::Child => {
            let v = region.read(30);
            // SAFETY: _exit is async-signal-safe.
            unsafe { libc::_exit(i32::from(v)) };
        }
        nix::unistd::ForkResult::Parent { child } => {
            let st = nix::sys::wait::waitpid(child, None).unwrap();
            assert!(
                matches!(
                    st,
                    nix::sys::wait::WaitStatus::Signaled(_, nix::sys::signal::Signal::SIGBUS, _)
                ),
                "{st:?}"
            );
        }
    }
    // Installed pages are still fine.
    assert_eq!(region.read(3), page_byte(3));
}

/// A source that takes `delay` per read and counts how many reads overlap.
struct SlowSource {
    inner: LocalImages,
    delay: Duration,
    now: std::sync::atomic::AtomicUsize,
    max: std::sync::atomic::AtomicUsize,
}

impl distriproc_runtime::source::PageSource for SlowSource {
    fn read_pages(
        &self,
        pid: u32,
        vaddr: u64,
        buf: &mut [u8],
    ) -> Result<distriproc_runtime::source::PageRead, distriproc_runtime::source::SourceError> {
        use std::sync::atomic::Ordering::SeqCst;
        let n = self.now.fetch_add(1, SeqCst) + 1;
        self.max.fetch_max(n, SeqCst);
        std::thread::sleep(self.delay);
        let r = self.inner.read_pages(pid, vaddr, buf);
        self.now.fetch_sub(1, SeqCst);
        r
    }
}

/// Four threads fault at once on a slow source: with fault helpers their reads overlap, with
/// the fault thread alone they are served one after the other. Data is right either way.
#[test]
fn fault_helpers_serve_concurrent_faults_in_parallel() {
    if !uffd_available() {
        return;
    }
    for helpers in [4usize, 1] {
        let region = Region::new();
        let img = tempfile::tempdir().unwrap();
        write_images(img.path(), region.base(), &[PID]);
        let src = Arc::new(SlowSource {
            inner: LocalImages::open(img.path()).unwrap(),
            delay: Duration::from_millis(40),
            now: Default::default(),
            max: Default::default(),
        });
        let mut o = quick(FillPolicy::None);
        o.fault_around_pages = 1;
        o.prefetch_max_pages = 0;
        o.fault_threads = helpers;
        let h = LazyPagesServer::bind(img.path(), img.path(), src.clone(), o)
            .unwrap()
            .spawn()
            .unwrap();
        let uffd = userfaultfd::UffdBuilder::new()
            .close_on_exec(true)
            .non_blocking(true)
            .user_mode_only(true)
            .create()
            .unwrap();
        uffd.register(region.ptr.cast(), PAGES * 4096).unwrap();
        let s = UnixStream::connect(img.path().join("lazy-pages.socket")).unwrap();
        send_task(&s, i32::try_from(PID).unwrap(), &uffd);
        drop(uffd);
        (&s).write_all(&RESTORE_FINISHED.to_le_bytes()).unwrap();
        let base = usize::try_from(region.base()).unwrap();
        let t0 = Instant::now();
        let threads: Vec<_> = [12usize, 24, 36, 48]
            .into_iter()
            .map(|p| {
                std::thread::spawn(move || {
                    // SAFETY: inside the test's mapping; the fetcher serves the fault.
                    unsafe { std::ptr::read_volatile((base + p * 4096 + 5) as *const u8) }
                })
            })
            .collect();
        for (t, p) in threads.into_iter().zip([12usize, 24, 36, 48]) {
            assert_eq!(t.join().unwrap(), page_byte(p));
        }
        let took = t0.elapsed();
        let max = src.max.load(std::sync::atomic::Ordering::SeqCst);
        eprintln!(
            "fault_threads={helpers}: 4 concurrent faults took {took:?}, {max} reads overlapped"
        );
        if helpers > 1 {
            assert!(max >= 2, "reads did not overlap with {helpers} helpers");
        } else {
            assert_eq!(max, 1);
        }
        h.stop();
        let st = h.wait().unwrap();
        assert_eq!(st.pages_faulted, 4, "{st:?}");
    }
}
