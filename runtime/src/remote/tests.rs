use std::time::{Duration, Instant};

use crate::protocol::{HelloStatus, HELLO_RESUME};
use crate::source::PageSource;

use super::*;
use crate::protocol::upload::ParentRef;

#[test]
fn endpoints_parse() {
    assert_eq!(
        "127.0.0.1:7060".parse::<Endpoint>().unwrap(),
        Endpoint::Tcp("127.0.0.1:7060".into())
    );
    assert_eq!(
        "[::1]:7060".parse::<Endpoint>().unwrap(),
        Endpoint::Tcp("[::1]:7060".into())
    );
    assert_eq!(
        "unix:/run/x.sock".parse::<Endpoint>().unwrap(),
        Endpoint::Unix("/run/x.sock".into())
    );
    for bad in ["", "unix:", "host", "host:", ":7060", "h:99999"] {
        assert!(bad.parse::<Endpoint>().is_err(), "{bad}");
    }
    assert_eq!(
        Endpoint::Unix("/a".into()).to_string(),
        "unix:/a".to_string()
    );
}

#[test]
fn options_from_config() {
    use distriproc_config::pageserver::PageServerClientConfig;
    let d = tempfile::tempdir().unwrap();
    let tf = d.path().join("t");
    std::fs::write(&tf, "tok\n").unwrap();
    let cfg = PageServerClientConfig {
        address: "10.0.0.5:7060".into(),
        token_file: tf,
        io_timeout_ms: 250,
        ..Default::default()
    };
    let (ep, o) = RemoteOptions::from_config(&cfg, "ck", "ctr-1")
        .unwrap()
        .unwrap();
    assert_eq!(ep, Endpoint::Tcp("10.0.0.5:7060".into()));
    assert_eq!((o.token.as_str(), o.client.as_str()), ("tok", "ctr-1"));
    assert_eq!(o.io_timeout, Duration::from_millis(250));
    assert!(
        RemoteOptions::from_config(&PageServerClientConfig::default(), "ck", "c")
            .unwrap()
            .is_none()
    );
}

#[test]
fn options_are_checked() {
    let mut o = RemoteOptions::new("c");
    o.max_connections = 0;
    assert!(matches!(
        RemotePages::connect(Endpoint::Unix("/nonexistent".into()), o),
        Err(RemoteError::BadOption { .. })
    ));
}

#[test]
fn unreachable_server_is_a_connect_error() {
    let d = tempfile::tempdir().unwrap();
    let e = RemotePages::connect(
        Endpoint::Unix(d.path().join("none.sock")),
        RemoteOptions::new("c"),
    )
    .unwrap_err();
    assert!(matches!(e, RemoteError::Connect { .. }), "{e}");
    assert!(e.to_string().contains("none.sock"), "{e}");
}

#[test]
fn upload_then_read_and_info() {
    use crate::images::testutil::{pm, write_inventory, write_pagemap};
    use crate::images::{PE_LAZY, PE_PRESENT};
    use distriproc_pageserver::{Server, ServerOptions};
    let d = tempfile::tempdir().unwrap();
    let store = d.path().join("store");
    let img = d.path().join("img");
    std::fs::create_dir_all(&store).unwrap();
    std::fs::create_dir_all(&img).unwrap();
    write_inventory(&img).unwrap();
    write_pagemap(&img, 1, 1, &[pm(0x10000, 2, PE_LAZY | PE_PRESENT)]).unwrap();
    let mut pages = vec![7u8; 4096];
    pages.extend_from_slice(&[9u8; 4096]);
    std::fs::write(img.join("pages-1.img"), &pages).unwrap();
    let tf = d.path().join("token");
    std::fs::write(&tf, "sesame\n").unwrap();
    let mut so = ServerOptions::for_store(store.clone());
    so.token = Some("sesame".into());
    let srv = Server::start(so).unwrap();
    let ep: Endpoint = srv.addrs()[0].parse().unwrap();
    let mut o = RemoteOptions::new("up-1");
    o.token = "sesame".into();
    let files: Vec<String> = ["inventory.img", "pagemap-1.img", "pages-1.img"]
        .map(String::from)
        .to_vec();
    let local = crate::protocol::upload::pagemap_checksum(&img).unwrap();
    let got = upload_checkpoint(&ep, &o, &img, &files, None).unwrap();
    assert_eq!(got, local);
    assert!(store.join("up-1/pages-1.img").exists());
    // The same id again is refused; so is a wrong token.
    let e = upload_checkpoint(&ep, &o, &img, &files, None).unwrap_err();
    assert!(
        e.to_string().contains("exists") || format!("{e:?}").contains("Exists"),
        "{e:?}"
    );
    let mut bad = o.clone();
    bad.checkpoint = "up-2".into();
    bad.token = "wrong".into();
    let e = upload_checkpoint(&ep, &bad, &img, &files, None).unwrap_err();
    assert!(format!("{e:?}").contains("Unauthorized"), "{e:?}");
    assert!(!store.join("up-2").exists());
    // A file name that would escape the store never leaves the client.
    let mut o3 = o.clone();
    o3.checkpoint = "up-3".into();
    assert!(upload_checkpoint(&ep, &o3, &img, &["../x".to_string()], None).is_err());
    let rp = RemotePages::connect(ep, o).unwrap();
    assert_eq!(rp.info().unwrap(), local);
    let mut buf = vec![0u8; 8192];
    rp.read_pages(1, 0x10000, &mut buf).unwrap();
    assert_eq!(buf, pages);
    srv.shutdown();
}

#[test]
fn layered_uploads_resolve_and_bad_parents_are_refused() {
    use crate::images::testutil::{pm, write_inventory, write_pagemap};
    use crate::images::{MAX_PARENT_DEPTH, PE_LAZY, PE_PARENT, PE_PRESENT};
    use crate::protocol::upload::pagemap_checksum;
    use distriproc_pageserver::{Server, ServerOptions};
    let d = tempfile::tempdir().unwrap();
    let store = d.path().join("store");
    std::fs::create_dir_all(&store).unwrap();
    let mut so = ServerOptions::for_store(store.clone());
    so.flatten_depth = None; // the chain must reach the depth limit
    let srv = Server::start(so).unwrap();
    let ep: Endpoint = srv.addrs()[0].parse().unwrap();
    let files: Vec<String> = ["inventory.img", "pagemap-1.img", "pages-1.img"]
        .map(String::from)
        .to_vec();
    // A layer: `entries` in its pagemap, `pages` as its pages file.
    let layer = |name: &str, entries: &[crate::images::PagemapEntry], pages: &[u8]| {
        let img = d.path().join(name);
        std::fs::create_dir_all(&img).unwrap();
        write_inventory(&img).unwrap();
        write_pagemap(&img, 1, 1, entries).unwrap();
        std::fs::write(img.join("pages-1.img"), pages).unwrap();
        img
    };
    let upload = |id: &str, img: &std::path::Path, parent: Option<&ParentRef>| {
        upload_checkpoint(&ep, &RemoteOptions::new(id), img, &files, parent)
    };
    let lazy = PE_LAZY | PE_PRESENT;
    // Base: pages 0x10000..0x13000 = 1, 2, 3.
    let mut base_pages = vec![1u8; 4096];
    base_pages.extend_from_slice(&[2u8; 4096]);
    base_pages.extend_from_slice(&[3u8; 4096]);
    let base = layer("base", &[pm(0x10000, 3, lazy)], &base_pages);
    let base_digest = upload("l0", &base, None).unwrap();
    // Child: page 2 rewritten (9), pages 1 and 3 left to the parent.
    let child = layer(
        "child",
        &[
            pm(0x10000, 1, PE_PARENT),
            pm(0x11000, 1, lazy),
            pm(0x12000, 1, PE_PARENT),
        ],
        &[9u8; 4096],
    );
    let p0 = ParentRef {
        checkpoint: "l0".into(),
        digest: base_digest,
    };
    let got = upload("l1", &child, Some(&p0)).unwrap();
    assert_eq!(got, pagemap_checksum(&child).unwrap());
    assert_eq!(
        std::fs::read_link(store.join("l1/parent")).unwrap(),
        std::path::Path::new("../l0")
    );
    let rp = RemotePages::connect(ep.clone(), RemoteOptions::new("l1")).unwrap();
    let mut buf = vec![0u8; 3 * 4096];
    rp.read_pages(1, 0x10000, &mut buf).unwrap();
    assert!(buf[..4096].iter().all(|b| *b == 1));
    assert!(buf[4096..8192].iter().all(|b| *b == 9));
    assert!(buf[8192..].iter().all(|b| *b == 3));
    // Refused with BadParent, nothing stored: a parent that is not there, one with other
    // memory than named, a child whose parent pages the chain does not hold.
    let bad = |id: &str, img: &std::path::Path, p: &ParentRef, want: &str| {
        let e = upload(id, img, Some(p)).unwrap_err();
        let text = format!("{e:?} {}", crate::error_chain(&e));
        assert!(
            text.contains("BadParent") || text.contains("parent refused"),
            "{text}"
        );
        assert!(text.contains(want), "{want}: {text}");
        assert!(!store.join(id).exists(), "{id} was stored");
    };
    let missing = ParentRef {
        checkpoint: "nope".into(),
        digest: base_digest,
    };
    bad("x1", &child, &missing, "not in the store");
    let mut other = p0.clone();
    other.digest.pagemap_checksum ^= 1;
    bad("x2", &child, &other, "not the layer it was taken from");
    let beyond = layer(
        "beyond",
        &[pm(0x10000, 1, lazy), pm(0x20000, 1, PE_PARENT)],
        &[5u8; 4096],
    );
    bad("x3", &beyond, &p0, "does not index");
    let own = ParentRef {
        checkpoint: "x4".into(),
        digest: base_digest,
    };
    bad("x4", &child, &own, "its own parent");
    // A chain may be MAX_PARENT_DEPTH layers deep, not deeper.
    let mut top = p0.clone();
    top.checkpoint = "l1".into();
    top.digest = got;
    for depth in 3..=MAX_PARENT_DEPTH {
        let id = format!("l{}", depth - 1);
        top.digest = upload(&id, &child, Some(&top)).unwrap();
        top.checkpoint = id;
    }
    bad("too-deep", &child, &top, "compact the chain");
    let rp = RemotePages::connect(ep, RemoteOptions::new(&top.checkpoint)).unwrap();
    rp.read_pages(1, 0x10000, &mut buf).unwrap();
    assert!(buf[..4096].iter().all(|b| *b == 1));
    assert!(buf[8192..].iter().all(|b| *b == 3));
    srv.shutdown();
}

#[test]
fn a_kept_alive_session_holds_its_checkpoint_past_the_idle_limit() {
    use crate::images::testutil::{pm, write_inventory, write_pagemap};
    use crate::images::{PE_LAZY, PE_PRESENT};
    use distriproc_pageserver::layers::Tombstones;
    use distriproc_pageserver::{Server, ServerOptions};
    let d = tempfile::tempdir().unwrap();
    let store = d.path().join("store");
    for id in ["idle", "kept"] {
        let img = store.join(id);
        std::fs::create_dir_all(&img).unwrap();
        write_inventory(&img).unwrap();
        write_pagemap(&img, 1, 1, &[pm(0x10000, 1, PE_LAZY | PE_PRESENT)]).unwrap();
        std::fs::write(img.join("pages-1.img"), [5u8; 4096]).unwrap();
    }
    let mut opts = ServerOptions::for_store(store.clone());
    opts.gc_interval = None;
    opts.io_timeout = Duration::from_millis(600);
    let srv = Server::start(opts).unwrap();
    let ep: Endpoint = srv.addrs()[0].parse().unwrap();
    let idle = RemotePages::connect(ep.clone(), RemoteOptions::new("idle")).unwrap();
    let kept =
        std::sync::Arc::new(RemotePages::connect(ep.clone(), RemoteOptions::new("kept")).unwrap());
    let guard = kept.keep_alive(Duration::from_millis(200));
    // Both are deleted while their readers live; only the kept-alive one still has a
    // session once the server's idle limit has passed.
    std::thread::sleep(Duration::from_millis(1500));
    let st = distriproc_pageserver::checkpoint::Store::open(&store, 4).unwrap();
    Tombstones::of(&st).delete("idle").unwrap();
    Tombstones::of(&st).delete("kept").unwrap();
    let r = srv.gc().unwrap();
    assert!(r.removed.iter().any(|x| x == "idle"), "{r:?}");
    assert!(r.skipped.iter().any(|(x, _)| x == "kept"), "{r:?}");
    assert!(store.join("kept").is_dir());
    let mut buf = vec![0u8; 4096];
    kept.read_pages(1, 0x10000, &mut buf).unwrap();
    assert!(buf.iter().all(|b| *b == 5));
    drop(idle);
    // The reader is gone: the next run removes it.
    drop(guard);
    drop(kept);
    let t0 = Instant::now();
    loop {
        let r = srv.gc().unwrap();
        if r.removed.iter().any(|x| x == "kept") {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(5), "{r:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
    srv.shutdown();
}

#[test]
fn retention_keeps_what_the_live_layers_read() {
    use crate::images::testutil::{pm, write_inventory, write_pagemap};
    use crate::images::{PE_LAZY, PE_PARENT, PE_PRESENT};
    use distriproc_pageserver::layers::Tombstones;
    use distriproc_pageserver::{Server, ServerOptions};
    let d = tempfile::tempdir().unwrap();
    let store = d.path().join("store");
    std::fs::create_dir_all(&store).unwrap();
    let mut opts = ServerOptions::for_store(store.clone());
    opts.gc_interval = None;
    let srv = Server::start(opts).unwrap();
    let ep: Endpoint = srv.addrs()[0].parse().unwrap();
    let files: Vec<String> = ["inventory.img", "pagemap-1.img", "pages-1.img"]
        .map(String::from)
        .to_vec();
    let lazy = PE_LAZY | PE_PRESENT;
    // l0 holds pages 0..8 = 100..108; layer k rewrites page k with 200 + k.
    let img = d.path().join("l0");
    std::fs::create_dir_all(&img).unwrap();
    write_inventory(&img).unwrap();
    write_pagemap(&img, 1, 1, &[pm(0x10000, 8, lazy)]).unwrap();
    let base: Vec<u8> = (0..8u8).flat_map(|i| [100 + i; 4096]).collect();
    std::fs::write(img.join("pages-1.img"), &base).unwrap();
    let mut top = ParentRef {
        checkpoint: "l0".into(),
        digest: upload_checkpoint(&ep, &RemoteOptions::new("l0"), &img, &files, None).unwrap(),
    };
    for k in 1..8u64 {
        let img = d.path().join(format!("l{k}"));
        std::fs::create_dir_all(&img).unwrap();
        write_inventory(&img).unwrap();
        let mut e = vec![pm(0x10000, k, PE_PARENT)];
        e.push(pm(0x10000 + k * 4096, 1, lazy));
        if k < 7 {
            e.push(pm(0x10000 + (k + 1) * 4096, 7 - k, PE_PARENT));
        }
        write_pagemap(&img, 1, 1, &e).unwrap();
        std::fs::write(
            img.join("pages-1.img"),
            [200 + u8::try_from(k).unwrap(); 4096],
        )
        .unwrap();
        let id = format!("l{k}");
        let digest =
            upload_checkpoint(&ep, &RemoteOptions::new(&id), &img, &files, Some(&top)).unwrap();
        top = ParentRef {
            checkpoint: id,
            digest,
        };
    }
    let expect: Vec<u8> = std::iter::once(100).chain(201..208).collect();
    let read = |id: &str| {
        let rp = RemotePages::connect(ep.clone(), RemoteOptions::new(id)).unwrap();
        let mut buf = vec![0u8; 8 * 4096];
        rp.read_pages(1, 0x10000, &mut buf).unwrap();
        buf.chunks(4096)
            .map(|p| {
                assert!(p.iter().all(|b| *b == p[0]));
                p[0]
            })
            .collect::<Vec<u8>>()
    };
    assert_eq!(read("l7"), expect);
    // Delete l1..l6 (l0 and l7 stay restorable): one retention run squashes them into l7.
    let st = distriproc_pageserver::checkpoint::Store::open(&store, 4).unwrap();
    for k in 1..7 {
        Tombstones::of(&st).delete(&format!("l{k}")).unwrap();
    }
    let r = srv.gc().unwrap();
    assert_eq!(r.squashed.len(), 6, "{r:?}");
    assert_eq!(r.after.max_depth, 2, "{r:?}");
    assert_eq!(read("l7"), expect, "l7 reads other memory after the squash");
    assert_eq!(read("l0"), (100..108).collect::<Vec<u8>>());
    let m = srv.metrics_text();
    assert!(
        m.contains("distriproc_pageserver_store_max_chain_depth 2"),
        "{m}"
    );
    assert!(
        m.contains("distriproc_pageserver_gc_layers_total{action=\"squashed\"} 6"),
        "{m}"
    );
    // A deleted checkpoint is refused by name; a layer over it too.
    Tombstones::of(&st).delete("l0").unwrap();
    let e = RemotePages::connect(ep.clone(), RemoteOptions::new("l0")).unwrap_err();
    assert!(
        crate::error_chain(&e).contains("was deleted"),
        "{}",
        crate::error_chain(&e)
    );
    let p0 = ParentRef {
        checkpoint: "l0".into(),
        digest: top.digest,
    };
    let e = upload_checkpoint(&ep, &RemoteOptions::new("x"), &img, &files, Some(&p0)).unwrap_err();
    assert!(
        crate::error_chain(&e).contains("was deleted"),
        "{}",
        crate::error_chain(&e)
    );
    // A client already reading l0 (a reconnect, HELLO_RESUME) is still served: l0's pages
    // are stored for l7, and a container running from l0 must keep its memory.
    let hello = |flags: u16| {
        let mut s = std::net::TcpStream::connect(srv.addrs()[0].as_str()).unwrap();
        let h = crate::protocol::Hello {
            version: crate::protocol::VERSION,
            checkpoint: "l0".into(),
            token: String::new(),
            client: "t".into(),
            criu_mode: false,
        };
        std::io::Write::write_all(&mut s, &h.encode_with_flags(flags).unwrap()).unwrap();
        crate::protocol::HelloReply::read(&mut s).unwrap()
    };
    assert_eq!(hello(HELLO_RESUME).status, HelloStatus::Ok);
    let r = hello(0);
    assert_eq!(r.status, HelloStatus::UnknownCheckpoint);
    assert!(r.message.contains("was deleted"), "{}", r.message);
    // The squashed l7 keeps its digest: a restore of it can still be checkpointed over it.
    let img8 = d.path().join("l1");
    upload_checkpoint(&ep, &RemoteOptions::new("l8"), &img8, &files, Some(&top)).unwrap();
    assert_eq!(read("l8")[..2], [100, 201]);
    srv.shutdown();
}

#[test]
fn deep_uploads_are_flattened_by_the_server() {
    use crate::images::testutil::{pm, write_inventory, write_pagemap};
    use crate::images::{PE_LAZY, PE_PARENT, PE_PRESENT};
    use distriproc_pageserver::{Server, ServerOptions};
    let d = tempfile::tempdir().unwrap();
    let store = d.path().join("store");
    std::fs::create_dir_all(&store).unwrap();
    let mut opts = ServerOptions::for_store(store.clone());
    opts.gc_interval = None;
    opts.flatten_depth = Some(3);
    let srv = Server::start(opts).unwrap();
    let ep: Endpoint = srv.addrs()[0].parse().unwrap();
    let files: Vec<String> = ["inventory.img", "pagemap-1.img", "pages-1.img"]
        .map(String::from)
        .to_vec();
    let lazy = PE_LAZY | PE_PRESENT;
    let img = d.path().join("f0");
    std::fs::create_dir_all(&img).unwrap();
    write_inventory(&img).unwrap();
    write_pagemap(&img, 1, 1, &[pm(0x10000, 8, lazy)]).unwrap();
    std::fs::write(img.join("pages-1.img"), vec![100u8; 8 * 4096]).unwrap();
    let mut top = ParentRef {
        checkpoint: "f0".into(),
        digest: upload_checkpoint(&ep, &RemoteOptions::new("f0"), &img, &files, None).unwrap(),
    };
    // Ten migrations, each rewriting page k % 8: no chain ever goes past 4 layers.
    let mut want = [100u8; 8];
    for k in 1..=10u64 {
        let page = k % 8;
        let img = d.path().join(format!("f{k}"));
        std::fs::create_dir_all(&img).unwrap();
        write_inventory(&img).unwrap();
        let mut e = Vec::new();
        if page > 0 {
            e.push(pm(0x10000, page, PE_PARENT));
        }
        e.push(pm(0x10000 + page * 4096, 1, lazy));
        if page < 7 {
            e.push(pm(0x10000 + (page + 1) * 4096, 7 - page, PE_PARENT));
        }
        write_pagemap(&img, 1, 1, &e).unwrap();
        let tag = u8::try_from(k).unwrap();
        std::fs::write(img.join("pages-1.img"), [tag; 4096]).unwrap();
        want[usize::try_from(page).unwrap()] = tag;
        let id = format!("f{k}");
        // The digest recorded at upload stays the layer's even once it is flattened.
        let digest =
            upload_checkpoint(&ep, &RemoteOptions::new(&id), &img, &files, Some(&top)).unwrap();
        top = ParentRef {
            checkpoint: id,
            digest,
        };
    }
    let st = distriproc_pageserver::checkpoint::Store::open(&store, 4).unwrap();
    // Flattening runs right after each upload's receipt (a quick next upload may land
    // over a layer still being flattened): wait for the last one.
    let t0 = std::time::Instant::now();
    let depth = loop {
        let d = distriproc_pageserver::layers::LayerMap::scan(&st)
            .summary()
            .max_depth;
        if d <= 4 || t0.elapsed() > Duration::from_secs(10) {
            break d;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(depth <= 4, "chains {depth} deep with flatten_depth 3");
    let rp = RemotePages::connect(ep, RemoteOptions::new("f10")).unwrap();
    let mut buf = vec![0u8; 8 * 4096];
    rp.read_pages(1, 0x10000, &mut buf).unwrap();
    let got: Vec<u8> = buf.chunks(4096).map(|p| p[0]).collect();
    assert_eq!(got, want);
    let m = srv.metrics_text();
    let flattened: u64 = m
        .lines()
        .find_map(|l| {
            l.strip_prefix("distriproc_pageserver_gc_layers_total{action=\"flattened\"} ")
        })
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    assert!(flattened >= 2, "{m}");
    srv.shutdown();
}
