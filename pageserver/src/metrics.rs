//! Prometheus metrics: counters and a latency histogram as atomics, rendered in the text
//! exposition format (version 0.0.4) by a tiny HTTP server on `--metrics ADDR:PORT`
//! (`GET /metrics`; anything else is 404).
//!
//! | metric | type | labels |
//! |---|---|---|
//! | `distriproc_pageserver_requests_total` | counter | `proto` = native \| criu |
//! | `distriproc_pageserver_pages_total` | counter | `kind` = data \| zero |
//! | `distriproc_pageserver_bytes_total` | counter | page bytes sent |
//! | `distriproc_pageserver_errors_total` | counter | `kind` = range \| session \| auth |
//! | `distriproc_pageserver_request_duration_seconds` | histogram | request service time |
//! | `distriproc_pageserver_clients` | gauge | open connections |
//! | `distriproc_pageserver_sessions_total` | counter | `proto` |
//! | `distriproc_pageserver_checkpoints_cached` | gauge | indexes in memory |
//! | `distriproc_pageserver_checkpoints_pushed_total` | counter | CRIU pushes stored |
//! | `distriproc_pageserver_checkpoints_uploaded_total` | counter | native uploads stored |
//! | `distriproc_pageserver_upload_bytes_total` | counter | bytes of stored uploads |
//! | `distriproc_pageserver_store_checkpoints` | gauge | checkpoints not deleted |
//! | `distriproc_pageserver_store_layers` | gauge | checkpoint directories (deleted ones still read included) |
//! | `distriproc_pageserver_store_deleted` | gauge | deleted checkpoints still on disk |
//! | `distriproc_pageserver_store_bytes` | gauge | bytes of all checkpoint directories |
//! | `distriproc_pageserver_store_max_chain_depth` | gauge | layers in the deepest chain |
//! | `distriproc_pageserver_gc_runs_total` | counter | retention runs |
//! | `distriproc_pageserver_gc_layers_total` | counter | `action` = removed \| squashed \| expired \| flattened |
//! | `distriproc_pageserver_gc_freed_bytes_total` | counter | bytes freed by retention |
//!
//! The store gauges are set at start, after each upload and after each retention run.

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::TcpListener;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

/// Upper bounds of the latency histogram buckets, in seconds.
pub const LATENCY_BUCKETS: [f64; 14] = [
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0,
];

/// All counters of one server.
#[derive(Default)]
pub struct Metrics {
    /// Native requests answered.
    pub requests_native: AtomicU64,
    /// CRIU GETs answered.
    pub requests_criu: AtomicU64,
    /// Data pages sent.
    pub pages_data: AtomicU64,
    /// Zero pages announced.
    pub pages_zero: AtomicU64,
    /// Page bytes sent.
    pub bytes: AtomicU64,
    /// Ranges refused.
    pub errors_range: AtomicU64,
    /// Sessions ended by an error.
    pub errors_session: AtomicU64,
    /// Hellos refused for the token.
    pub errors_auth: AtomicU64,
    /// Open connections.
    pub clients: AtomicU64,
    /// Native sessions opened.
    pub sessions_native: AtomicU64,
    /// CRIU sessions opened.
    pub sessions_criu: AtomicU64,
    /// Pushes stored.
    pub pushes: AtomicU64,
    /// Native uploads stored.
    pub uploads: AtomicU64,
    /// Bytes of stored uploads.
    pub upload_bytes: AtomicU64,
    /// Checkpoint indexes cached (set by the server when it renders).
    pub checkpoints_cached: AtomicU64,
    /// Store gauges: checkpoints, layers, deleted, bytes, deepest chain.
    store: [AtomicU64; 5],
    /// Retention: runs, layers removed, squashed, expired, bytes freed, flattened.
    gc: [AtomicU64; 6],
    buckets: [AtomicU64; LATENCY_BUCKETS.len()],
    latency_count: AtomicU64,
    latency_sum_ns: AtomicU64,
}

impl Metrics {
    /// Sets the store gauges.
    pub fn set_store(&self, s: &crate::layers::StoreSummary) {
        for (g, v) in
            self.store
                .iter()
                .zip([s.checkpoints, s.layers, s.deleted, s.bytes, s.max_depth])
        {
            g.store(v, Relaxed);
        }
    }

    /// Counts one retention run.
    pub fn count_gc(&self, r: &crate::gc::GcReport) {
        let n = |v: usize| v as u64;
        for (c, v) in self.gc.iter().zip([
            1,
            n(r.removed.len()),
            n(r.squashed.len()),
            n(r.expired.len()),
            r.freed_bytes,
            n(r.flattened.len()),
        ]) {
            c.fetch_add(v, Relaxed);
        }
    }

    /// Records the service time of one request.
    pub fn observe(&self, d: Duration) {
        let s = d.as_secs_f64();
        for (i, b) in LATENCY_BUCKETS.iter().enumerate() {
            if s <= *b {
                self.buckets[i].fetch_add(1, Relaxed);
                break;
            }
        }
        self.latency_count.fetch_add(1, Relaxed);
        self.latency_sum_ns
            .fetch_add(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX), Relaxed);
    }

    /// The text exposition.
    pub fn render(&self) -> String {
        let mut o = String::new();
        let p = "distriproc_pageserver";
        let c = |o: &mut String, name: &str, help: &str, ty: &str| {
            let _ = writeln!(o, "# HELP {p}_{name} {help}\n# TYPE {p}_{name} {ty}");
        };
        c(
            &mut o,
            "requests_total",
            "Page requests answered.",
            "counter",
        );
        let _ = writeln!(
            o,
            "{p}_requests_total{{proto=\"native\"}} {}\n{p}_requests_total{{proto=\"criu\"}} {}",
            self.requests_native.load(Relaxed),
            self.requests_criu.load(Relaxed)
        );
        c(&mut o, "pages_total", "Pages answered.", "counter");
        let _ = writeln!(
            o,
            "{p}_pages_total{{kind=\"data\"}} {}\n{p}_pages_total{{kind=\"zero\"}} {}",
            self.pages_data.load(Relaxed),
            self.pages_zero.load(Relaxed)
        );
        c(&mut o, "bytes_total", "Page bytes sent.", "counter");
        let _ = writeln!(o, "{p}_bytes_total {}", self.bytes.load(Relaxed));
        c(
            &mut o,
            "errors_total",
            "Refused ranges, failed sessions, refused credentials.",
            "counter",
        );
        let _ = writeln!(
            o,
            "{p}_errors_total{{kind=\"range\"}} {}\n{p}_errors_total{{kind=\"session\"}} {}\n{p}_errors_total{{kind=\"auth\"}} {}",
            self.errors_range.load(Relaxed),
            self.errors_session.load(Relaxed),
            self.errors_auth.load(Relaxed)
        );
        c(
            &mut o,
            "request_duration_seconds",
            "Time to serve one request.",
            "histogram",
        );
        let mut cum = 0;
        for (i, b) in LATENCY_BUCKETS.iter().enumerate() {
            cum += self.buckets[i].load(Relaxed);
            let _ = writeln!(o, "{p}_request_duration_seconds_bucket{{le=\"{b}\"}} {cum}");
        }
        let count = self.latency_count.load(Relaxed);
        let _ = writeln!(
            o,
            "{p}_request_duration_seconds_bucket{{le=\"+Inf\"}} {count}\n{p}_request_duration_seconds_sum {}\n{p}_request_duration_seconds_count {count}",
            self.latency_sum_ns.load(Relaxed) as f64 / 1e9
        );
        c(&mut o, "clients", "Open client connections.", "gauge");
        let _ = writeln!(o, "{p}_clients {}", self.clients.load(Relaxed));
        c(&mut o, "sessions_total", "Sessions opened.", "counter");
        let _ = writeln!(
            o,
            "{p}_sessions_total{{proto=\"native\"}} {}\n{p}_sessions_total{{proto=\"criu\"}} {}",
            self.sessions_native.load(Relaxed),
            self.sessions_criu.load(Relaxed)
        );
        c(
            &mut o,
            "checkpoints_cached",
            "Checkpoint indexes in memory.",
            "gauge",
        );
        let _ = writeln!(
            o,
            "{p}_checkpoints_cached {}",
            self.checkpoints_cached.load(Relaxed)
        );
        c(
            &mut o,
            "checkpoints_pushed_total",
            "Checkpoints stored from criu dump --page-server.",
            "counter",
        );
        let _ = writeln!(
            o,
            "{p}_checkpoints_pushed_total {}",
            self.pushes.load(Relaxed)
        );
        c(
            &mut o,
            "checkpoints_uploaded_total",
            "Checkpoints stored from native uploads (remote checkpoints).",
            "counter",
        );
        let _ = writeln!(
            o,
            "{p}_checkpoints_uploaded_total {}",
            self.uploads.load(Relaxed)
        );
        c(
            &mut o,
            "upload_bytes_total",
            "Bytes of stored native uploads.",
            "counter",
        );
        let _ = writeln!(
            o,
            "{p}_upload_bytes_total {}",
            self.upload_bytes.load(Relaxed)
        );
        let gauges = [
            (
                "store_checkpoints",
                "Checkpoints in the store that are not deleted.",
            ),
            (
                "store_layers",
                "Checkpoint directories, deleted ones other layers still read included.",
            ),
            (
                "store_deleted",
                "Deleted checkpoints still on disk for the layers over them.",
            ),
            ("store_bytes", "Bytes of all checkpoint directories."),
            ("store_max_chain_depth", "Layers in the deepest chain."),
        ];
        for ((name, help), v) in gauges.iter().zip(&self.store) {
            c(&mut o, name, help, "gauge");
            let _ = writeln!(o, "{p}_{name} {}", v.load(Relaxed));
        }
        let g = |i: usize| self.gc[i].load(Relaxed);
        c(&mut o, "gc_runs_total", "Retention runs.", "counter");
        let _ = writeln!(o, "{p}_gc_runs_total {}", g(0));
        c(
            &mut o,
            "gc_layers_total",
            "Layers retention removed, squashed or expired.",
            "counter",
        );
        let _ = writeln!(
            o,
            "{p}_gc_layers_total{{action=\"removed\"}} {}\n{p}_gc_layers_total{{action=\"squashed\"}} {}\n{p}_gc_layers_total{{action=\"expired\"}} {}\n{p}_gc_layers_total{{action=\"flattened\"}} {}",
            g(1),
            g(2),
            g(3),
            g(5)
        );
        c(
            &mut o,
            "gc_freed_bytes_total",
            "Bytes retention freed.",
            "counter",
        );
        let _ = writeln!(o, "{p}_gc_freed_bytes_total {}", g(4));
        o
    }
}

/// Serves `GET /metrics` on `listener` until `stop` is set; `refresh` runs before each render.
pub fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    stop: Arc<AtomicBool>,
    refresh: impl Fn(&Metrics) + Send + 'static,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    listener.set_nonblocking(true)?;
    std::thread::Builder::new()
        .name("metrics".into())
        .spawn(move || {
            while !stop.load(Relaxed) {
                let (mut s, _) = match listener.accept() {
                    Ok(x) => x,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(50));
                        continue;
                    }
                    Err(_) => continue,
                };
                let _ = s.set_nonblocking(false);
                let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
                let _ = s.set_write_timeout(Some(Duration::from_secs(5)));
                let mut req = [0u8; 1024];
                let n = s.read(&mut req).unwrap_or(0);
                let line = String::from_utf8_lossy(&req[..n]);
                let resp = if line.starts_with("GET /metrics ") || line.starts_with("GET /metrics\r")
                {
                    refresh(&metrics);
                    let body = metrics.render();
                    format!(
                        "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    )
                } else {
                    "HTTP/1.1 404 Not Found\r\nContent-Length: 10\r\nConnection: close\r\n\r\nnot found\n".to_string()
                };
                let _ = s.write_all(resp.as_bytes());
            }
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_histogram() {
        let m = Metrics::default();
        m.observe(Duration::from_micros(30));
        m.observe(Duration::from_millis(3));
        m.observe(Duration::from_secs(3));
        m.requests_native.fetch_add(2, Relaxed);
        let t = m.render();
        assert!(
            t.contains("distriproc_pageserver_requests_total{proto=\"native\"} 2"),
            "{t}"
        );
        assert!(
            t.contains("request_duration_seconds_bucket{le=\"0.00005\"} 1"),
            "{t}"
        );
        assert!(
            t.contains("request_duration_seconds_bucket{le=\"0.005\"} 2"),
            "{t}"
        );
        assert!(
            t.contains("request_duration_seconds_bucket{le=\"+Inf\"} 3"),
            "{t}"
        );
        assert!(t.contains("request_duration_seconds_count 3"), "{t}");
    }
}
