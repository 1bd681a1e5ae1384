//! Hot/cold statistics from the access logs ([`crate::access`]) for
//! `distriproc-pageserver stats`: per checkpoint, how many sessions read it, and per task how
//! many of its dumped pages were ever read (hot: read by at least half of the sessions; cold:
//! never read), the hottest runs, and the order in which the first session read its pages.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fmt::Write as _;
use std::io::{BufRead, BufReader};
use std::path::Path;

use crate::checkpoint::{Checkpoint, Store};
use crate::PageServerError;
use distriproc_runtime::images::PAGE_SIZE;

/// What the log of one checkpoint says.
#[derive(Debug, Default)]
pub struct LogSummary {
    /// Sessions seen (start lines).
    pub sessions: u64,
    /// Sessions by protocol.
    pub by_proto: BTreeMap<String, u64>,
    /// Client labels.
    pub clients: BTreeSet<String>,
    /// Ranges served.
    pub ranges: u64,
    /// Pages served (data and zero).
    pub pages: u64,
    /// Data pages served.
    pub data_pages: u64,
    /// Per pid: page address → number of sessions that read it.
    pub heat: BTreeMap<u32, HashMap<u64, u32>>,
    /// Ranges (pid, vaddr, pages) of the first session, in order (at most 32).
    pub first_order: Vec<(u32, u64, u64)>,
    /// Lines that could not be parsed.
    pub bad_lines: u64,
}

/// Parses an access log.
pub fn summarize(path: &Path) -> Result<LogSummary, PageServerError> {
    let f = std::fs::File::open(path).map_err(|source| PageServerError::Io {
        what: "open access log",
        path: path.to_path_buf(),
        source,
    })?;
    let mut s = LogSummary::default();
    let mut seen: HashMap<String, HashSet<(u32, u64)>> = HashMap::new();
    let mut first: Option<String> = None;
    for line in BufReader::new(f).lines() {
        let line = line.map_err(|source| PageServerError::Io {
            what: "read access log",
            path: path.to_path_buf(),
            source,
        })?;
        let w: Vec<&str> = line.split(' ').collect();
        match w.as_slice() {
            ["S", _, sess, proto, _peer, client] => {
                s.sessions += 1;
                *s.by_proto.entry((*proto).to_string()).or_default() += 1;
                s.clients.insert((*client).to_string());
                if first.is_none() {
                    first = Some((*sess).to_string());
                }
            }
            ["R", _, sess, pid, vaddr, pages, data] => {
                let (Ok(pid), Ok(vaddr), Ok(pages), Ok(data)) = (
                    pid.parse::<u32>(),
                    u64::from_str_radix(vaddr, 16),
                    pages.parse::<u64>(),
                    data.parse::<u64>(),
                ) else {
                    s.bad_lines += 1;
                    continue;
                };
                s.ranges += 1;
                s.pages += pages;
                s.data_pages += data;
                if first.as_deref() == Some(*sess) && s.first_order.len() < 32 {
                    s.first_order.push((pid, vaddr, pages));
                }
                let set = seen.entry((*sess).to_string()).or_default();
                for i in 0..pages.min(1 << 20) {
                    set.insert((pid, vaddr + i * PAGE_SIZE));
                }
            }
            ["E", ..] => {}
            _ => s.bad_lines += 1,
        }
    }
    for set in seen.into_values() {
        for (pid, page) in set {
            *s.heat.entry(pid).or_default().entry(page).or_default() += 1;
        }
    }
    Ok(s)
}

/// The report for one checkpoint (`ck` adds totals when its images can still be read).
pub fn report(id: &str, s: &LogSummary, ck: Option<&Checkpoint>) -> String {
    let mut o = String::new();
    let _ = writeln!(o, "checkpoint {id}");
    let _ = writeln!(
        o,
        "  sessions: {} ({})  clients: {}",
        s.sessions,
        s.by_proto
            .iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect::<Vec<_>>()
            .join(", "),
        s.clients.iter().cloned().collect::<Vec<_>>().join(", ")
    );
    let _ = writeln!(
        o,
        "  served: {} ranges, {} pages ({} data, {} MiB)",
        s.ranges,
        s.pages,
        s.data_pages,
        s.data_pages * PAGE_SIZE / (1 << 20)
    );
    let sessions = s.sessions.max(1);
    let mut pids: BTreeSet<u32> = s.heat.keys().copied().collect();
    if let Some(c) = ck {
        pids.extend(c.pids());
    }
    for pid in pids {
        let heat = s.heat.get(&pid);
        let touched = heat.map_or(0, |h| h.len() as u64);
        let hot = heat.map_or(0, |h| {
            h.values()
                .filter(|&&n| u64::from(n) * 2 >= sessions)
                .count() as u64
        });
        match ck.and_then(|c| c.task_pages(pid)) {
            Some((lazy, data)) => {
                let cold: u64 = ck.map_or(0, |c| {
                    c.data_ranges(pid)
                        .iter()
                        .flat_map(|&(v, n, _)| (0..n).map(move |i| v + i * PAGE_SIZE))
                        .filter(|p| heat.is_none_or(|h| !h.contains_key(p)))
                        .count() as u64
                });
                let pct = if data > 0 {
                    (data - cold) as f64 * 100.0 / data as f64
                } else {
                    0.0
                };
                let _ = writeln!(
                    o,
                    "  pid {pid}: {data} pages stored ({lazy} lazy); served {touched} distinct pages \
                     (data or zero; {pct:.1}% of stored read); hot (served to >= half of the \
                     sessions) {hot}; cold (stored, never read) {cold}"
                );
            }
            None => {
                let _ = writeln!(
                    o,
                    "  pid {pid}: served {touched} distinct pages; hot (served to >= half of the \
                     sessions) {hot}"
                );
            }
        }
        if let Some(h) = heat {
            let mut pages: Vec<(u64, u32)> = h.iter().map(|(&p, &n)| (p, n)).collect();
            pages.sort_unstable();
            let mut runs: Vec<(u64, u64, u32)> = Vec::new();
            for (p, n) in pages {
                match runs.last_mut() {
                    Some((start, len, m)) if *start + *len * PAGE_SIZE == p && *m == n => *len += 1,
                    _ => runs.push((p, 1, n)),
                }
            }
            runs.sort_by(|a, b| b.2.cmp(&a.2).then(b.1.cmp(&a.1)));
            for (start, len, n) in runs.iter().take(5) {
                let _ = writeln!(
                    o,
                    "    hot run {start:#x} +{len} pages: read by {n}/{} sessions",
                    s.sessions
                );
            }
        }
    }
    if !s.first_order.is_empty() {
        let _ = writeln!(
            o,
            "  first session's order (first {} ranges):",
            s.first_order.len()
        );
        for (pid, vaddr, pages) in s.first_order.iter().take(12) {
            let _ = writeln!(o, "    pid {pid} {vaddr:#x} +{pages}");
        }
    }
    if s.bad_lines > 0 {
        let _ = writeln!(o, "  ({} unparsable lines skipped)", s.bad_lines);
    }
    o
}

/// The store's layer totals, one line, and with `id` its chain.
pub fn store_report(store: &Store, id: Option<&str>) -> String {
    let map = crate::layers::LayerMap::scan(store);
    let s = map.summary();
    let mut o = format!(
        "store {}: {} checkpoints, {} layers ({} deleted, still read by layers over them), {} \
         bytes, deepest chain {} layers\n",
        store.root().display(),
        s.checkpoints,
        s.layers,
        s.deleted,
        s.bytes,
        s.max_depth
    );
    if let Some(id) = id.filter(|id| map.layers.contains_key(*id)) {
        let chain = map.chain(id);
        let _ = writeln!(
            o,
            "checkpoint {id}: {} layers: {}",
            chain.len(),
            chain.join(" <- ")
        );
    }
    o
}

/// `stats --store DIR [ID]`: the store's layers, then one checkpoint in detail or every
/// checkpoint with a log.
pub fn run(store_dir: &Path, id: Option<&str>) -> Result<String, PageServerError> {
    let store = Store::open(store_dir, 1)?;
    let head = store_report(&store, id);
    let logs = store.state_dir().join("access");
    let ids: Vec<String> = match id {
        Some(id) => {
            store.dir_of(id)?;
            vec![id.to_string()]
        }
        None => {
            let mut v: Vec<String> = std::fs::read_dir(&logs)
                .into_iter()
                .flatten()
                .flatten()
                .filter_map(|e| {
                    e.file_name()
                        .to_str()
                        .and_then(|n| n.strip_suffix(".log"))
                        .map(str::to_string)
                })
                .collect();
            v.sort();
            v
        }
    };
    if ids.is_empty() {
        return Ok(format!(
            "{head}no access logs in {} (nothing served yet, or access_log = false)\n",
            logs.display()
        ));
    }
    let mut out = head;
    for id in ids {
        let path = logs.join(format!("{id}.log"));
        if !path.exists() {
            let _ = writeln!(out, "checkpoint {id}: no access log ({})", path.display());
            continue;
        }
        let s = summarize(&path)?;
        let ck = store.get(&id).ok();
        out.push_str(&report(&id, &s, ck.as_deref()));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summarizes_a_log() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("a.log");
        std::fs::write(
            &p,
            "S 1 r-1 native tcp:1 ctr-a\nR 2 r-1 7 1000 2 2\nS 3 r-2 criu tcp:2 criu\n\
             R 4 r-2 7 2000 1 1\nR 5 r-1 7 3000 1 0\nE 6 r-1 2 3 8192\ngarbage\n",
        )
        .unwrap();
        let s = summarize(&p).unwrap();
        assert_eq!(s.sessions, 2);
        assert_eq!((s.ranges, s.pages, s.data_pages), (3, 4, 3));
        assert_eq!(s.bad_lines, 1);
        let h = &s.heat[&7];
        assert_eq!(h[&0x1000], 1);
        assert_eq!(h[&0x2000], 2);
        assert_eq!(s.first_order, vec![(7, 0x1000, 2), (7, 0x3000, 1)]);
        let r = report("a", &s, None);
        assert!(r.contains("sessions: 2 (criu 1, native 1)"), "{r}");
        assert!(r.contains("hot run 0x2000 +1 pages: read by 2/2"), "{r}");
    }
}
