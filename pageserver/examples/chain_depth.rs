//! How a checkpoint's chain depth affects serving it: a base checkpoint and a layer DEPTH-1
//! layers over it (each rewriting PCT % of the pages, scattered, as a migrated container's
//! writes are), served by an in-process page server over loopback TCP; then the same top
//! layer after retention squashed the chain below it into it. For each: the time to open a
//! session (the first one builds the chain's index), the runs in the index, single-page read
//! latency (p50, p99) at random addresses, and a sequential read of all memory in 1 MiB
//! requests (GiB/s). Every page read is checked (its index and the layer that last wrote it).
//!
//! `cargo run --release -p distriproc-pageserver --example chain_depth -- [--mib 1024]
//! [--depth 25] [--pct 10] [--reads 20000] [--json FILE]`; `make bench` runs it.

use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use distriproc_pageserver::checkpoint::Store;
use distriproc_pageserver::layers::Tombstones;
use distriproc_pageserver::{Server, ServerOptions};
use distriproc_runtime::images::testutil::{write_inventory, write_pstree};
use distriproc_runtime::images::write::PagemapWriter;
use distriproc_runtime::images::{PE_LAZY, PE_PARENT, PE_PRESENT};
use distriproc_runtime::remote::{Endpoint, RemoteOptions, RemotePages};
use distriproc_runtime::source::PageSource;

const PID: u32 = 1;
const BASE: u64 = 0x7f00_0000_0000;
const PAGE: usize = 4096;

/// A 64-bit mix of the page index and layer (splitmix64), for a scattered write pattern.
fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// Whether layer `k` (1..) rewrote page `i`.
fn written(i: u64, k: u64, pct: u64) -> bool {
    mix(i.wrapping_mul(1_000_003) ^ k) % 100 < pct
}

fn fill(page: &mut [u8], i: u64, layer: u64) {
    page[..8].copy_from_slice(&i.to_le_bytes());
    page[8..16].copy_from_slice(&layer.to_le_bytes());
}

fn write_layer(store: &Path, k: u64, pages: u64, pct: u64) -> Result<()> {
    let d = store.join(format!("c{k}"));
    std::fs::create_dir(&d)?;
    write_inventory(&d)?;
    write_pstree(&d, &[PID])?;
    let mut w = PagemapWriter::create(&d, PID, 1)?;
    let mut page = vec![0u8; PAGE];
    for i in 0..pages {
        let va = BASE + i * PAGE as u64;
        if k == 0 || written(i, k, pct) {
            fill(&mut page, i, k);
            w.data(va, PE_PRESENT | PE_LAZY, &page)?;
        } else {
            w.hole(va, 1, PE_PARENT)?;
        }
    }
    w.commit()?;
    if k > 0 {
        std::os::unix::fs::symlink(format!("../c{}", k - 1), d.join("parent"))?;
    }
    Ok(())
}

/// The layer whose copy of page `i` the top layer `top` serves.
fn owner(i: u64, top: u64, pct: u64) -> u64 {
    (1..=top).rev().find(|k| written(i, *k, pct)).unwrap_or(0)
}

struct Figures {
    open: Duration,
    p50: Duration,
    p99: Duration,
    seq_gib_s: f64,
}

fn measure(
    ep: &Endpoint,
    id: &str,
    top: u64,
    pages: u64,
    pct: u64,
    reads: usize,
) -> Result<Figures> {
    let t0 = Instant::now();
    let rp = RemotePages::connect(ep.clone(), RemoteOptions::new(id))?;
    let mut one = vec![0u8; PAGE];
    rp.read_pages(PID, BASE, &mut one)?;
    let open = t0.elapsed();
    let check = |buf: &[u8], i: u64| -> Result<()> {
        let got_i = u64::from_le_bytes(buf[..8].try_into()?);
        let got_k = u64::from_le_bytes(buf[8..16].try_into()?);
        let want = owner(i, top, pct);
        ensure!(
            got_i == i && got_k == want,
            "{id}: page {i} holds page {got_i} of layer {got_k}, expected layer {want}"
        );
        Ok(())
    };
    let mut lat = Vec::with_capacity(reads);
    for n in 0..reads {
        let i = mix(n as u64 ^ 0x5eed) % pages;
        let t = Instant::now();
        rp.read_pages(PID, BASE + i * PAGE as u64, &mut one)?;
        lat.push(t.elapsed());
        check(&one, i)?;
    }
    lat.sort();
    let mut buf = vec![0u8; 256 * PAGE];
    let t = Instant::now();
    let mut i = 0;
    while i < pages {
        let n = (pages - i).min(256);
        let b = &mut buf[..n as usize * PAGE];
        rp.read_pages(PID, BASE + i * PAGE as u64, b)?;
        for (j, p) in b.chunks(PAGE).enumerate() {
            check(p, i + j as u64)?;
        }
        i += n;
    }
    let secs = t.elapsed().as_secs_f64();
    Ok(Figures {
        open,
        p50: lat[lat.len() / 2],
        p99: lat[lat.len() * 99 / 100],
        seq_gib_s: (pages * PAGE as u64) as f64 / secs / f64::from(1u32 << 30),
    })
}

fn arg(args: &[String], name: &str, default: u64) -> Result<u64> {
    match args.iter().position(|a| a == name) {
        Some(p) => args
            .get(p + 1)
            .with_context(|| format!("{name} needs a value"))?
            .parse()
            .with_context(|| name.to_string()),
        None => Ok(default),
    }
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let mib = arg(&args, "--mib", 1024)?;
    let depth = arg(&args, "--depth", 25)?.max(2);
    let pct = arg(&args, "--pct", 10)?;
    let reads = usize::try_from(arg(&args, "--reads", 20_000)?)?;
    let json = args
        .iter()
        .position(|a| a == "--json")
        .and_then(|p| args.get(p + 1));
    let pages = mib * 256;
    let tmp = tempfile::Builder::new()
        .prefix("dp-chain-depth-")
        .tempdir()?;
    let store = tmp.path();
    let t = Instant::now();
    for k in 0..depth {
        write_layer(store, k, pages, pct)?;
    }
    eprintln!(
        "wrote a {mib} MiB base and {} layers of {pct} % in {:?}",
        depth - 1,
        t.elapsed()
    );
    let mut opts = ServerOptions::for_store(store.to_path_buf());
    opts.gc_interval = None;
    opts.access_log = false;
    let srv = Server::start(opts)?;
    let ep: Endpoint = srv.addrs()[0].parse().map_err(anyhow::Error::msg)?;
    let top = depth - 1;
    let top_id = format!("c{top}");
    let base = measure(&ep, "c0", 0, pages, pct, reads)?;
    let deep = measure(&ep, &top_id, top, pages, pct, reads)?;
    let st = Store::open(store, 4)?;
    for k in 0..top {
        Tombstones::of(&st).delete(&format!("c{k}"))?;
    }
    let t = Instant::now();
    let r = srv.gc()?;
    let gc_time = t.elapsed();
    ensure!(
        r.after.max_depth == 1,
        "gc left depth {}",
        r.after.max_depth
    );
    let squashed = measure(&ep, &top_id, top, pages, pct, reads)?;
    srv.shutdown();

    let rows = [
        ("base checkpoint", 1, &base),
        ("top layer", depth, &deep),
        ("top layer after gc", 1, &squashed),
    ];
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "| {mib} MiB, {pct} % per layer | depth | open (index) ms | read p50 µs | read p99 µs | sequential GiB/s |"
    )?;
    writeln!(out, "|---|---|---|---|---|---|")?;
    for (name, d, f) in rows {
        writeln!(
            out,
            "| {name} | {d} | {:.1} | {:.0} | {:.0} | {:.2} |",
            f.open.as_secs_f64() * 1e3,
            f.p50.as_secs_f64() * 1e6,
            f.p99.as_secs_f64() * 1e6,
            f.seq_gib_s
        )?;
    }
    writeln!(
        out,
        "\ngc squashed {} layers into the top one in {:.2} s, freeing {} MiB ({} MiB left).",
        r.squashed.len(),
        gc_time.as_secs_f64(),
        r.freed_bytes >> 20,
        r.after.bytes >> 20
    )?;
    if let Some(path) = json {
        let row = |f: &Figures| {
            format!(
                "{{\"open_ms\": {:.3}, \"p50_us\": {:.1}, \"p99_us\": {:.1}, \"seq_gib_s\": {:.3}}}",
                f.open.as_secs_f64() * 1e3,
                f.p50.as_secs_f64() * 1e6,
                f.p99.as_secs_f64() * 1e6,
                f.seq_gib_s
            )
        };
        std::fs::write(
            path,
            format!(
                "{{\"mib\": {mib}, \"depth\": {depth}, \"pct\": {pct}, \"reads\": {reads}, \
                 \"base\": {}, \"deep\": {}, \"squashed\": {}, \"gc_s\": {:.3}, \
                 \"gc_freed_mib\": {}, \"store_mib_after\": {}}}\n",
                row(&base),
                row(&deep),
                row(&squashed),
                gc_time.as_secs_f64(),
                r.freed_bytes >> 20,
                r.after.bytes >> 20
            ),
        )?;
    }
    Ok(())
}
