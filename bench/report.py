#!/usr/bin/env python3
"""Render docs/BENCHMARKS.md and docs/bench/*.png from bench/out/results.json (make bench).

    bench/report.py [RESULTS_JSON] [--doc docs/BENCHMARKS.md] [--png-dir docs/bench]

Every figure in the document comes from the JSON; nothing is typed in by hand. Needs Debian's
python3-matplotlib for the plots (bench/run.sh installs it); without it the document is written
with a note instead of the pictures.
"""

import argparse
import json
import math
import os
import statistics
import sys
from collections import defaultdict

GIB = 1 << 30

CTD_SYSTEMS = [
    ("eager", "eager (runc shim)"),
    ("criu", "CRIU lazy-pages daemon (shim mode `criu`)"),
    ("ours", "ours, default config (node-local store), fill full"),
    ("ours-none", "ours, node-local store, fill none"),
    ("ours-profile", "ours, node-local store, fill profile (rep 1 records)"),
    ("criu-remote", "CRIU lazy-pages daemon, pages at the page server (loopback)"),
    ("ours-remote", "ours, pages at the page server (loopback), fill full"),
    ("ours-remote-none", "ours, pages at the page server (loopback), fill none"),
    ("criu-remote-veth", "CRIU lazy-pages daemon, pages at the page server (veth)"),
    ("ours-remote-veth", "ours, pages at the page server (veth), fill full"),
]
# Systems that fill everything in the background (their "all local" is the fill's end).
FILLING = {"ours", "ours-remote", "ours-remote-veth"}
REMOTE_ORDER = ["loopback", "veth", "veth+proxy", "criu-veth", "loopback-none", "veth-none"]


def med(v):
    v = [x for x in v if x is not None]
    return statistics.median(v) if v else None


def pct(v, p):
    v = sorted(x for x in v if x is not None)
    if not v:
        return None
    return v[min(len(v) - 1, max(0, math.ceil(p * len(v)) - 1))]


def fs(x, unit="s", nd=3):
    if x is None:
        return "–"
    if unit == "s":
        return f"{x:.{nd}f}"
    return f"{x:{nd}}"


def gib(b):
    return "–" if b is None else f"{b / GIB:.2f} GiB"


def pooled_local(runs, mib):
    return med([r.get("touch50_local_us") for r in runs
                if r["kind"] == "containerd" and r["mib"] == mib and not r.get("error")])


def ratio(a, b):
    if a is None or b is None or b == 0:
        return None
    return a / b


def fr(x):
    return "–" if x is None else (f"{x:.1f}x" if x >= 1 else f"{x:.2f}x")


# ---- per-run derived figures -------------------------------------------------------------

def all_local_s(r):
    """Seconds from the restore command to all memory local."""
    s, sys_ = r.get("stats") or {}, r["system"]
    if r["kind"] == "containerd":
        if sys_ == "eager":
            return r.get("restore_cmd_s")
        if sys_.startswith("criu"):
            c = r.get("criu_log") or {}
            if c.get("end_s") is not None and r.get("unpack_s") is not None:
                return r["unpack_s"] + c["end_s"]
            return None
        if sys_ in FILLING and s.get("fill_complete_us") is not None and r.get("unpack_s") is not None:
            return r["unpack_s"] + s["fill_complete_us"] / 1e6
        return None
    if sys_.startswith("criu"):
        c = r.get("criu_log") or {}
        return c.get("end_s")
    if s.get("fill_complete_us") is not None:
        return s["fill_complete_us"] / 1e6
    return None


def fill_gibps(r):
    """Bytes moved / (all local - first uffd activity), GiB/s."""
    s = r.get("stats") or {}
    if r["system"].startswith("criu"):
        c = r.get("criu_log") or {}
        pages = s.get("pages_transferred")
        if pages is None and r["kind"] == "remote":
            pages = r["mib"] * 256  # CRIU moved every lazy page (the daemon exits only then)
        if c.get("end_s") is None or c.get("first_pid_s") is None or not pages:
            return None
        dt = c["end_s"] - c["first_pid_s"]
        return pages * 4096 / GIB / dt if dt > 0 else None
    if s.get("fill_complete_us") is None or not s.get("bytes"):
        return None
    dt = (s["fill_complete_us"] - (s.get("time_to_first_fault_us") or 0)) / 1e6
    return s["bytes"] / GIB / dt if dt > 0 else None


def bytes_moved(r):
    s = r.get("stats") or {}
    if r["system"].startswith("criu"):
        if s.get("pages_transferred") is not None:
            return s["pages_transferred"] * 4096
        return r["mib"] << 20 if r["kind"] == "remote" else None
    if r["kind"] == "remote":
        return (s.get("remote") or {}).get("bytes")
    return s.get("bytes")


def fault_lat(r):
    if r["system"].startswith("criu"):
        return (r.get("criu_log") or {}).get("fault_latency_us") or {}
    return (r.get("stats") or {}).get("fault_latency_us") or {}


def faults(r):
    if r["system"].startswith("criu"):
        return (r.get("criu_log") or {}).get("faults")
    return (r.get("stats") or {}).get("faults")


def remote_key(r):
    s = r["system"]
    return "veth+proxy" if s.startswith("veth+proxy") and not s.endswith("-none") else s


# ---- aggregation -------------------------------------------------------------------------

def aggregate(runs):
    g = defaultdict(list)
    for r in runs:
        g[(r["kind"], r["system"], r["mib"])].append(r)
    out = {}
    for k, rs in g.items():
        ok = [r for r in rs if not r.get("error")]
        a = {
            "n": len(rs),
            "errors": [r["error"] for r in rs if r.get("error")],
            "sum_ok": sum(1 for r in rs if r.get("sum_ok")),
            "ttfr": [r.get("ttfr_s") for r in ok],
            "unpack": [r.get("unpack_s") for r in ok],
            "shim": [r.get("shim_ttfr_s") for r in ok],
            "restore_cmd": [r.get("restore_cmd_s") for r in ok],
            "all_local": [all_local_s(r) for r in ok],
            "fill": [fill_gibps(r) for r in ok],
            "bytes": [bytes_moved(r) for r in ok],
            "faults": [faults(r) for r in ok],
            "p50": [fault_lat(r).get("p50") for r in ok],
            "p99": [fault_lat(r).get("p99") for r in ok],
            "p999": [fault_lat(r).get("p999") for r in ok],
            "fmax": [fault_lat(r).get("max") for r in ok],
            "t_cold": [r.get("touch50_cold_us") for r in ok],
            "t_warm": [r.get("touch50_warm_us") for r in ok],
            "t_local": [r.get("touch50_local_us") for r in ok],
            "rtt": [r.get("rtt_connect_us") for r in ok],
            "delay": [r.get("proxy_delay_us") for r in ok],
            "ckpt": [r.get("checkpoint_s") for r in ok],
        }
        out[k] = a
    return out


def m(agg, kind, sys_, mib, key):
    a = agg.get((kind, sys_, mib))
    return med(a[key]) if a else None


def mx(agg, kind, sys_, mib, key):
    a = agg.get((kind, sys_, mib))
    return pct(a[key], 0.99) if a else None


def redis_stages(rk):
    """(system, hot_pct) -> medians of the stage: rps1, rps2, remote fraction."""
    g = defaultdict(list)
    for r in rk:
        if r.get("error"):
            continue
        for st in r.get("stages") or []:
            g[(r["system"], st["hot_pct"])].append(st)
    return {k: {"rps1": med([x.get("rps_first") for x in v]), "rps2": med([x.get("rps_second") for x in v]),
                "remote": med([x.get("remote_fraction") for x in v])} for k, v in g.items()}


# ---- plots -------------------------------------------------------------------------------

def plots(agg, sizes, remote_systems, png_dir, runs_all):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    os.makedirs(png_dir, exist_ok=True)
    files = []

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for sys_, label in CTD_SYSTEMS:
        if sys_ in ("ours-none", "ours-profile", "ours-remote-none"):
            continue
        pts = [(s, m(agg, "containerd", sys_, s, "ttfr")) for s in sizes]
        pts = [(x, y) for x, y in pts if y is not None]
        if pts:
            ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o",
                    ls="--" if "remote" in sys_ else "-", label=f"{label}")
    ys = [m(agg, "containerd", "ours", s, "unpack") for s in sizes]
    if any(y is not None for y in ys):
        ax.plot(sizes, ys, ls=":", color="black", label="containerd unpack of the checkpoint tar (ours)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(sizes)
    ax.set_xticklabels([f"{s} MiB" if s < 1024 else f"{s // 1024} GiB" for s in sizes])
    ax.set_xlabel("memhog memory")
    ax.set_ylabel("time to first response [s] (median)")
    ax.set_title("Time to first response vs memory size")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    p = os.path.join(png_dir, "ttfr.png")
    fig.savefig(p, dpi=110)
    plt.close(fig)
    files.append(("Time to first response vs size (log-log; medians)", "bench/ttfr.png"))

    fig, ax = plt.subplots(figsize=(7, 4.2))
    series = [("containerd", "criu", "CRIU daemon, local images"), ("containerd", "ours", "ours, local images"),
              ("containerd", "criu-remote", "CRIU daemon, page server loopback"),
              ("containerd", "ours-remote", "ours, page server loopback"),
              ("containerd", "criu-remote-veth", "CRIU daemon, page server veth"),
              ("containerd", "ours-remote-veth", "ours, page server veth")]
    series = [x for x in series if any(m(agg, x[0], x[1], s, "fill") for s in sizes)]
    w = 0.8 / max(1, len(series))
    for i, (kind, sys_, label) in enumerate(series):
        ys = [m(agg, kind, sys_, s, "fill") or 0 for s in sizes]
        ax.bar([j + i * w for j in range(len(sizes))], ys, w, label=label)
    ax.set_xticks([j + w * (len(series) - 1) / 2 for j in range(len(sizes))])
    ax.set_xticklabels([f"{s} MiB" if s < 1024 else f"{s // 1024} GiB" for s in sizes])
    ax.set_ylabel("fill throughput [GiB/s] (median)")
    ax.set_title("Background fill throughput (first uffd to all memory local)")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(png_dir, "fill.png"), dpi=110)
    plt.close(fig)
    files.append(("Fill throughput (medians)", "bench/fill.png"))
    rs = redis_stages([r for r in runs_all if r["kind"] == "redis"])
    if rs:
        fig, ax = plt.subplots(figsize=(7, 4.2))
        for sys_, label in (("ours-none", "ours, local checkpoint"), ("ours-remote-none", "ours, page server (loopback)")):
            pts = sorted((x["remote"], ratio(x["rps2"], (rs.get(("eager", hp)) or {}).get("rps2")))
                         for (sy, hp), x in rs.items() if sy == sys_ and x["remote"] is not None)
            pts = [(a, 100 * b) for a, b in pts if b is not None]
            if pts:
                ax.plot([100 * a for a, _ in pts], [b for _, b in pts], marker="o", label=label)
        ax.axhline(90, ls=":", color="black", label="target: 90 % of all local")
        ax.set_xlabel("memory left remote during the pass [%]")
        ax.set_ylabel("GET/s vs eager (all local), same keys [%]")
        ax.set_title("Redis read-mostly throughput vs fraction of memory remote (fill none)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(os.path.join(png_dir, "redis.png"), dpi=110)
        plt.close(fig)
        files.append(("Redis GET throughput vs fraction of memory remote (medians)", "bench/redis.png"))
    return files


# ---- document ----------------------------------------------------------------------------

def size_label(s):
    return f"{s} MiB" if s < 1024 else f"{s // 1024} GiB"


def restore_sections(w, meta, runs, args):
    """The restore sections (results.json: the containerd, Redis and runtime-level runs); returns
    the plots."""
    agg = aggregate(runs)
    sizes = sorted({r["mib"] for r in runs if r["kind"] != "redis"})
    remote_systems = []
    for r in runs:
        if r["kind"] == "remote" and r["system"] not in remote_systems:
            remote_systems.append(r["system"])
    pics = plots(agg, sizes, remote_systems, args.png_dir, runs)

    w("## Command and machine")
    w("")
    w("```sh")
    w(meta["command"])
    w("```")
    w("")
    w(f"- Run: {meta['started_utc']} to {meta['finished_utc']}, git `{meta['git_head']}` ({meta.get('build', '')}).")
    w(f"- Machine: {meta['nproc']} vCPUs, {meta['cpu_model']}, {meta['mem_total']} RAM, kernel {meta['kernel']}; "
      f"containerd {meta['containerd']}, {meta['runc']}, {meta['criu']}.")
    w(f"- Load: at start `{meta['uptime_start'].strip()}`; at end `{meta['uptime_end'].strip()}`.")
    w("- **Noise caveat**: a 2-vCPU Firecracker guest shared with other engineers' builds and tests "
      "(see the load averages above); waking a thread on the other vCPU costs ~90 µs here and freed "
      "guest memory is returned to the host, so fresh allocations re-fault. Treat "
      "single figures as ±30 %; ratios within one run are more robust than absolute values.")
    import datetime as _dt
    try:
        dur = (_dt.datetime.fromisoformat(meta["finished_utc"].rstrip("Z"))
               - _dt.datetime.fromisoformat(meta["started_utc"].rstrip("Z"))).total_seconds() / 60
    except (KeyError, ValueError):
        dur = None
    w(f"- Repetitions: {meta['reps']} per system at sizes below 4 GiB, {meta['reps_big']} at 4 GiB and "
      f"above (this run took {'?' if dur is None else f'{dur:.0f}'} minutes after the build); the remote runtime-level runs use "
      "`REPS_REMOTE` (default 3, capped the same way). Quoted: median, and p99 of the runs (with so "
      "few runs p99 is the worst run).")
    w(f"- memhog: {meta['threads']} threads, one process, every page non-zero; the container runs on "
      "the host network (`ctr run --net-host`) so a `memhog query --time-to-first-response PING` "
      "client can poll the port every 1 ms from *before* the restore command (a container network "
      "namespace does not exist before the restore).")
    w("")
    w("### What is measured")
    w("")
    w("- **TTFR**: restore command start to the first `PONG` (the 1 ms poller started just before). "
      "Split into *containerd unpack* (until containerd's debug log says `connecting to shim <id>`: "
      "reading the checkpoint from the content store and untarring all pages into a temp dir) and "
      "*shim* (the rest: runc/CRIU restore, faults until the reply).")
    w("- **All local**: until every page is resident. Eager: the restore command returns. Ours: "
      "unpack + the fetcher's `fill_complete_us`. CRIU daemon: unpack + the last line of its "
      "`lazy-pages.log` (it exits when all pages are copied).")
    w("- **Fill throughput**: bytes installed / (all local - first uffd activity): our "
      "`fill_complete_us - time_to_first_fault_us`, CRIU's log time from `Received PID` to its last line.")
    w("- **Fault service latency**: ours from the fetcher's histogram (fault event read to page "
      "installed); CRIU's from its `-v4` log, `#PF at A` to the `uffd_copy: A` line (daemon side, "
      "µs log resolution; the shim runs CRIU with `-v4`, which logs every copy: a handicap for CRIU "
      "that we note rather than hide). With fill `full` and an idle workload there are only a handful "
      "of faults, so the latency percentiles that matter come from the fill `none` runs, whose "
      "`TOUCH 50` reads fault in half of memory.")
    w("- **Correctness**: after every restore (and after the fill) `SUM` over all memory is compared "
      "with `EXPECT` (computed from the generator).")
    w("")

    # --- containerd table
    w("## Through containerd (`ctr c restore --live`)")
    w("")
    w("Medians (p99 of runs in brackets), seconds unless stated.")
    w("")
    w("| size | system | runs (SUM ok) | TTFR | unpack | shim part | restore cmd | all local | fill GiB/s | bytes moved | faults | fault p50 / p99 / p99.9 µs |")
    w("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for s in sizes:
        for sys_, label in CTD_SYSTEMS:
            a = agg.get(("containerd", sys_, s))
            if not a:
                continue
            b = med(a["bytes"])
            fl = f"{fs(med(a['p50']), 'n', '')} / {fs(med(a['p99']), 'n', '')} / {fs(med(a['p999']), 'n', '')}" \
                if sys_ != "eager" else "–"
            w(f"| {size_label(s)} | {label} | {a['n']} ({a['sum_ok']}) | {fs(med(a['ttfr']))} ({fs(pct(a['ttfr'], .99))}) "
              f"| {fs(med(a['unpack']))} | {fs(med(a['shim']))} | {fs(med(a['restore_cmd']))} "
              f"| {fs(med(a['all_local']))} ({fs(pct(a['all_local'], .99))}) | {fs(med(a['fill']), 's', 2)} "
              f"| {'–' if b is None else f'{b / GIB:.2f} GiB'} | {fs(med(a['faults']), 'n', '')} | {fl} |")
    w("")
    errs = [(k, e) for k, a in agg.items() for e in a["errors"]]
    if errs:
        w("Failed runs (excluded from the medians):")
        w("")
        for (kind, sys_, s), e in errs:
            w(f"- {kind} {sys_} {size_label(s)}: {e}")
        w("")

    # --- ratios
    w("### Ratios")
    w("")
    w("Eager: the runc shim's checkpoint tar carries every page (containerd unpacks them all before "
      "the shim runs). Ours and CRIU's daemon (our shim, mode `criu`) run with the default "
      "configuration: the pages stay in the node-local store and containerd's tar holds CRIU's "
      "metadata and a reference. Remote: the pages are at the page server.")
    w("")
    w("| size | TTFR eager / ours | TTFR CRIU / ours | TTFR eager / ours remote | TTFR CRIU (local) / ours remote | TTFR CRIU remote / ours remote | shim part eager / ours | all local: ours / eager | fill ours / CRIU: local, loopback, veth |")
    w("|---|---|---|---|---|---|---|---|---|")
    for s in sizes:
        c = lambda sys_, k: m(agg, "containerd", sys_, s, k)
        fills = ", ".join(fr(ratio(c(o, "fill"), c(k, "fill"))) for o, k in
                          (("ours", "criu"), ("ours-remote", "criu-remote"), ("ours-remote-veth", "criu-remote-veth")))
        w(f"| {size_label(s)} | {fr(ratio(c('eager', 'ttfr'), c('ours', 'ttfr')))} | {fr(ratio(c('criu', 'ttfr'), c('ours', 'ttfr')))} "
          f"| {fr(ratio(c('eager', 'ttfr'), c('ours-remote', 'ttfr')))} | {fr(ratio(c('criu', 'ttfr'), c('ours-remote', 'ttfr')))} "
          f"| {fr(ratio(c('criu-remote', 'ttfr'), c('ours-remote', 'ttfr')))} "
          f"| {fr(ratio(c('eager', 'shim'), c('ours', 'shim')))} "
          f"| {fr(ratio(c('ours', 'all_local'), c('eager', 'all_local')))} | {fills} |")
    w("")

    # --- read-mostly
    w("### Read-mostly: fill `none`, half of memory never fetched")
    w("")
    w("memhog `TOUCH 50` reads 50 % of the pages. *First pass*: right after a lazy restore with "
      "fill `none` (every touched page is faulted in; the other half stays remote for good). "
      "*Second pass*: the same pages again, now local, with 50 % of memory still remote. *All "
      "local*: the same pass once all memory is resident (every containerd run does it after its "
      "`SUM`; median over all systems' runs of that size). The ratio for the shim row is the median "
      "of the per-run ratios (all-local pass / second pass of the same process); remote rows use the "
      "pooled all-local median. Redis follows below.")
    w("")
    w("| size | where the pages are | first pass ms | second pass ms | all local ms | second pass throughput vs all local | fault p50 / p99 / p99.9 µs | bytes moved (shim: before SUM; remote: incl. SUM) |")
    w("|---|---|---|---|---|---|---|---|")
    rows = [("containerd", "ours-none", "local images (shim)"),
            ("containerd", "ours-remote-none", "page server, loopback (shim)")] + \
           [("remote", x, f"page server, {x[:-5]} (runtime level)") for x in ("loopback-none", "veth-none")]
    touch_ratio = {}
    for s in sizes:
        loc = pooled_local(runs, s)
        for kind, sys_, label in rows:
            a = agg.get((kind, sys_, s))
            if not a:
                continue
            cold, warm = med(a["t_cold"]), med(a["t_warm"])
            b = med(a["bytes"])
            if kind == "containerd":
                rt = med([r["touch50_local_us"] / r["touch50_warm_us"] for r in runs
                          if r["kind"] == kind and r["system"] == sys_ and r["mib"] == s and not r.get("error")
                          and r.get("touch50_local_us") and r.get("touch50_warm_us")])
                touch_ratio[(s, sys_)] = rt
            else:
                rt = ratio(loc, warm)
            w(f"| {size_label(s)} | {label} | {fs(cold and cold / 1e3, 's', 1)} | {fs(warm and warm / 1e3, 's', 1)} "
              f"| {fs(loc and loc / 1e3, 's', 1)} | {('–' if rt is None else f'{100 * rt:.0f} %')} "
              f"| {fs(med(a['p50']), 'n', '')} / {fs(med(a['p99']), 'n', '')} / {fs(med(a['p999']), 'n', '')} "
              f"| {'–' if b is None else f'{b / GIB:.2f} GiB'} |")
    w("")

    # --- profile
    prof_rows = []
    for sz in sizes:
        rs = [r for r in runs if r["kind"] == "containerd" and r["system"] == "ours-profile"
              and r["mib"] == sz and not r.get("error")]
        if not rs:
            continue
        rec = [r for r in rs if (r.get("stats") or {}).get("profile_state") == "recorded"]
        rep = [r for r in rs if (r.get("stats") or {}).get("profile_state") == "replayed"]
        st = lambda r, k: (r.get("stats") or {}).get(k)
        prof_rows.append((sz, {
            "rec_touch": med([r.get("touch10_us") for r in rec]),
            "rep_touch": med([r.get("touch10_us") for r in rep]),
            "plain_touch": None,
            "pages": med([st(r, "profile_pages") for r in rep + rec]),
            "hit": med([st(r, "profile_hit_rate") for r in rep]),
            "hit_min": min([st(r, "profile_hit_rate") for r in rep if st(r, "profile_hit_rate") is not None], default=None),
            "misses": med([st(r, "profile_misses") for r in rep]),
            "n_rec": len(rec), "n_rep": len(rep),
            "faults_rep": med([st(r, "faults") for r in rep]),
        }))
    if prof_rows:
        w("### Working-set profile: fill `profile`, record then replay")
        w("")
        w("The first restore of a checkpoint with fill `profile` records the pages touched in its "
          "recording window (`PROFILE_WINDOW_MS`); every later restore of the same checkpoint "
          "prefetches them first, then fills the rest. The workload touches the first 10 % of its "
          "pages (`TOUCH 10`) right after the restore. Hit rate is the fetcher's "
          "`profile_hit_rate` = prefetched / (prefetched + pages demand-faulted during the replay "
          "window); touches of installed pages are invisible to userfaultfd, so it is an upper bound "
          "when the workload touches less than it recorded (here it touches the same pages, so the "
          "TOUCH 10 time of a replay against the recording run is the direct evidence).")
        w("")
        w("| size | recording runs | replay runs | TOUCH 10 ms, recording run | TOUCH 10 ms, replay (median) | profile pages | hit rate, median (min) | misses | faults per replay |")
        w("|---|---|---|---|---|---|---|---|---|")
        for sz, x in prof_rows:
            hit = "–" if x["hit"] is None else f"{100 * x['hit']:.1f} % ({100 * x['hit_min']:.1f} %)"
            w(f"| {size_label(sz)} | {x['n_rec']} | {x['n_rep']} | {fs(x['rec_touch'] and x['rec_touch'] / 1e3, 's', 1)} "
              f"| {fs(x['rep_touch'] and x['rep_touch'] / 1e3, 's', 1)} | {fs(x['pages'], 'n', '')} | {hit} "
              f"| {fs(x['misses'], 'n', '')} | {fs(x['faults_rep'], 'n', '')} |")
        w("")

    # --- redis
    rk = [r for r in runs if r["kind"] == "redis"]
    red = {}
    redis_labels = (("eager", "eager (runc shim)"), ("ours-none", "ours, fill none, local checkpoint"),
                    ("ours-remote-none", "ours, fill none, pages at the page server (loopback)"))
    stage_rows = redis_stages(rk)
    if rk:
        for sys_, _ in redis_labels:
            rs = [r for r in rk if r["system"] == sys_]
            ok = [r for r in rs if not r.get("error")]
            if rs:
                red[sys_] = {
                    "n": len(rs), "ok": sum(1 for r in rs if r.get("digest_ok")),
                    "ready": med([r.get("ready_us") for r in ok]),
                    "rps1": med([r.get("rps_first") for r in ok]),
                    "rps2": med([r.get("rps_second") for r in ok]),
                    "rss": med([r.get("used_memory_rss") for r in ok]),
                    "bytes": med([(r.get("stats") or {}).get("bytes") for r in ok]),
                    "p50": med([((r.get("stats") or {}).get("fault_latency_us") or {}).get("p50") for r in ok]),
                    "p99": med([((r.get("stats") or {}).get("fault_latency_us") or {}).get("p99") for r in ok]),
                    "errors": [r["error"] for r in rs if r.get("error")],
                }
        r0 = rk[0]
        pcts = sorted({st["hot_pct"] for r in rk for st in r.get("stages") or []})
        w("### Redis: GET throughput against the fraction of memory left remote")
        w("")
        w(f"Debian's Redis 7 (`redis-check-rdb` binary + its libraries in an image built by "
          f"`bench/build-redis-oci.sh`), {r0['keys']} keys of 1 KiB (`key:%012d`), persistence off. "
          "After the restore, `redis-benchmark -t get -r HOT -n "
          f"{r0['requests']} -c 16 -P 8` GETs random keys among the first HOT keys, in growing stages "
          f"({', '.join(f'{p} %' for p in pcts)} of the keys), each stage twice: the first pass faults "
          "the new hot keys in, the second runs with the rest of memory still remote. With fill `none` "
          f"only touched pages ever move (restores here use `fault_around_pages = {r0.get('fault_around_pages', 16)}`: "
          "a GET touches a few small objects scattered over the heap, so a wider window around each "
          "fault mostly moves cold keys); *remote* is the fraction of the checkpoint's lazy pages not "
          "installed during the second pass (fetcher statistics between the passes). *vs eager* is the "
          "second pass against eager's second pass at the same stage (all memory local). `DEBUG DIGEST` "
          "after the stages equals the one before the checkpoint (digest ok). Ready = restore command "
          "to the first `PING` answered (redis-cli polled every 10 ms). redis-benchmark shares the 2 "
          "vCPUs with Redis, so it measures both. A pass of random GETs does not reach every hot key "
          "of the wide stages, so their second pass still faults in keys the first one missed (not a "
          "steady state: compare the narrow stages).")
        w("")
        w("| hot keys | eager GET/s | ours, local checkpoint: remote / GET/s / vs eager | ours, page server: remote / GET/s / vs eager |")
        w("|---|---|---|---|")
        for hp in pcts:
            e = stage_rows.get(("eager", hp)) or {}
            cells = []
            for sys_ in ("ours-none", "ours-remote-none"):
                x = stage_rows.get((sys_, hp))
                if not x:
                    cells.append("–")
                    continue
                rt = ratio(x["rps2"], e.get("rps2"))
                rem = "–" if x["remote"] is None else f"{100 * x['remote']:.0f} %"
                cells.append(f"{rem} / {fs(x['rps2'], 'n', ',.0f')} / {'–' if rt is None else f'{100 * rt:.0f} %'}")
            w(f"| {hp} % | {fs(e.get('rps2'), 'n', ',.0f')} | {cells[0]} | {cells[1]} |")
        w("")
        w("| system | runs (digest ok) | ready s | GET/s first pass, 50 % | GET/s second pass, 50 % | RSS after GETs | bytes moved before DIGEST | fault p50 / p99 µs |")
        w("|---|---|---|---|---|---|---|---|")
        for sys_, label in redis_labels:
            x = red.get(sys_)
            if not x:
                continue
            w(f"| {label} | {x['n']} ({x['ok']}) | {fs(x['ready'] and x['ready'] / 1e6)} | {fs(x['rps1'], 'n', ',.0f')} "
              f"| {fs(x['rps2'], 'n', ',.0f')} | {gib(x['rss'])} "
              f"| {gib(x['bytes'])} | {fs(x['p50'], 'n', '')} / {fs(x['p99'], 'n', '')} |")
        w("")
        for sys_, x in red.items():
            for e in x["errors"]:
                w(f"- failed redis run ({sys_}): {e}")
        if any(x["errors"] for x in red.values()):
            w("")

    # --- remote
    if remote_systems:
        w("## Remote page server, runtime level (below the shim, with a delay proxy)")
        w("")
        w("The same path one level down, plus a userspace delay proxy: `bench/remote` drives the "
          "runtime directly (no containerd, no shim): a plain memhog "
          "process is dumped with `criu dump`; `distriproc-pageserver` serves the images over "
          "loopback, from inside a network namespace over a veth pair, and through "
          "`bench/delayproxy.py` (userspace one-way delay in each direction; this kernel has no "
          "netem); our fetcher (`LazyPagesServer` + `RemotePages`) serves the faults and the fill, "
          "`criu restore --lazy-pages` rebuilds the process. `criu-veth` is CRIU's own daemon "
          "(`criu lazy-pages --page-server`) against the same page server's CRIU protocol over the "
          "veth. No containerd unpack is involved: this is what a checkpoint whose pages live at "
          "the page server would give (process metadata and non-lazy pages still come from a local "
          "images directory).")
        w("")
        w("| size | path | runs (SUM ok) | connect RTT µs | TTFR | all local | fill GiB/s | bytes moved | faults | fault p50 / p99 / p99.9 µs |")
        w("|---|---|---|---|---|---|---|---|---|---|")
        for s in sizes:
            for sys_ in remote_systems:
                a = agg.get(("remote", sys_, s))
                if not a:
                    continue
                b = med(a["bytes"])
                rtt = med(a["rtt"])
                w(f"| {size_label(s)} | {sys_} | {a['n']} ({a['sum_ok']}) | {fs(rtt, 'n', '') if rtt else '–'} "
                  f"| {fs(med(a['ttfr']))} ({fs(pct(a['ttfr'], .99))}) | {fs(med(a['all_local']))} "
                  f"| {fs(med(a['fill']), 's', 2)} | {'–' if b is None else f'{b / GIB:.2f} GiB'} "
                  f"| {fs(med(a['faults']), 'n', '')} | {fs(med(a['p50']), 'n', '')} / {fs(med(a['p99']), 'n', '')} / {fs(med(a['p999']), 'n', '')} |")
        w("")

    if pics:
        w("## Plots")
        w("")
        for title, path in pics:
            w(f"![{title}]({path})")
            w("")
    else:
        w("(Plots not rendered: python3-matplotlib is missing.)")
        w("")

    # --- targets
    w("## Targets of issue 4")
    w("")
    big = 4096 if 4096 in sizes else max(sizes)
    small = min(sizes)
    c = lambda sys_, k, s=big: m(agg, "containerd", sys_, s, k)
    rr = lambda sys_, k, s=big: m(agg, "remote", sys_, s, k)
    def verdict(x, ok):
        if x is None:
            return "**not measured**"
        return "**met**" if ok(x) else "**not met**"

    e_o = ratio(c("eager", "ttfr"), c("ours", "ttfr"))
    c_o = ratio(c("criu", "ttfr"), c("ours", "ttfr"))
    flat = ratio(c("ours", "ttfr"), c("ours", "ttfr", small))
    e_s = ratio(c("eager", "shim"), c("ours", "shim"))
    flat_shim = ratio(c("ours", "shim"), c("ours", "shim", small))
    e_r = ratio(c("eager", "ttfr"), c("ours-remote", "ttfr"))
    c_r = ratio(c("criu", "ttfr"), c("ours-remote", "ttfr"))
    cr_r = ratio(c("criu-remote", "ttfr"), c("ours-remote", "ttfr"))
    flat_r = ratio(c("ours-remote", "ttfr"), c("ours-remote", "ttfr", small))
    w(f"1. **TTFR at {size_label(big)} ≤ 1/30 of eager, ≤ 1/2 of CRIU's daemon, roughly flat "
      f"{size_label(small)}→{size_label(big)}.** Judged on the medians through containerd.")
    w(f"   - Checkpoint memory at the page server (containerd's tar holds CRIU's metadata only): "
      f"eager / ours remote = {fr(e_r)} ({verdict(e_r, lambda v: v >= 30)} for 30x); CRIU's daemon as "
      f"users run it (local checkpoint) / ours remote = {fr(c_r)} ({verdict(c_r, lambda v: v >= 2)} for 2x); "
      f"CRIU's daemon fetching from the same page server / ours remote = {fr(cr_r)} "
      f"({verdict(cr_r, lambda v: v >= 2)} for 2x); ours remote {size_label(big)} / {size_label(small)} = "
      f"{fr(flat_r)} ({verdict(flat_r, lambda v: v <= 1.5)} for flat, taken as ≤ 1.5x). TTFR "
      + ", ".join(f"{size_label(x)} {fs(c('ours-remote', 'ttfr', x))} s" for x in sizes
                  if c('ours-remote', 'ttfr', x) is not None) + ".")
    ttfrs = [v for v in (c("ours", "ttfr", x) for x in sizes) if v is not None]
    spread = ratio(max(ttfrs), min(ttfrs)) if ttfrs else None
    w(f"   - Default configuration (no page server: the memory stays in the node-local store, "
      f"containerd's tar holds CRIU's metadata and a reference): eager/ours = {fr(e_o)} "
      f"({verdict(e_o, lambda v: v >= 30)} for 30x), CRIU/ours = {fr(c_o)} "
      f"({verdict(c_o, lambda v: v >= 2)} for 2x), ours {size_label(big)}/{size_label(small)} = "
      f"{fr(flat)}; slowest / fastest size {fr(spread)} ({verdict(spread, lambda v: v <= 1.5)} for "
      "flat within 1.5x). TTFR " + ", ".join(f"{size_label(x)} {fs(c('ours', 'ttfr', x))} s"
                                           for x in sizes if c('ours', 'ttfr', x) is not None) + ".")
    share = ratio(c("ours", "unpack"), c("ours", "ttfr"))
    w(f"   - Where the time goes: containerd's unpack of the checkpoint tar before it calls the shim is "
      f"{fs(c('ours', 'unpack'))} s of ours' {fs(c('ours', 'ttfr'))} s at {size_label(big)} "
      f"({'–' if share is None else f'{100 * share:.0f} %'}); eager's unpack {fs(c('eager', 'unpack'))} s, "
      f"CRIU's {fs(c('criu', 'unpack'))} s. Our shim's own part is {fs(c('ours', 'shim'))} s "
      f"(eager's {fs(c('eager', 'shim'))} s: {fr(e_s)}; CRIU's {fs(c('criu', 'shim'))} s; ours "
      f"{size_label(big)}/{size_label(small)} = {fr(flat_shim)}). Eager's unpack carries every "
      "page; with the memory in the store or at the page server the tar is metadata only.")
    f_l = ratio(c("ours", "fill"), c("criu", "fill"))
    f_lo = ratio(c("ours-remote", "fill"), c("criu-remote", "fill"))
    f_v = ratio(c("ours-remote-veth", "fill"), c("criu-remote-veth", "fill"))
    w(f"2. **Background fill ≥ 3x CRIU's daemon.** At {size_label(big)}: local images ours "
      f"{fs(c('ours', 'fill'), 's', 2)} vs CRIU {fs(c('criu', 'fill'), 's', 2)} GiB/s = {fr(f_l)} "
      f"({verdict(f_l, lambda v: v >= 3)}); page server over loopback {fs(c('ours-remote', 'fill'), 's', 2)} vs "
      f"{fs(c('criu-remote', 'fill'), 's', 2)} GiB/s = {fr(f_lo)} ({verdict(f_lo, lambda v: v >= 3)}); over the veth "
      f"{fs(c('ours-remote-veth', 'fill'), 's', 2)} vs {fs(c('criu-remote-veth', 'fill'), 's', 2)} GiB/s = {fr(f_v)} "
      f"({verdict(f_v, lambda v: v >= 3)}). Per size (local, loopback, veth):")
    for x in sizes:
        w(f"   - {size_label(x)}: " + ", ".join(
            fr(ratio(c(o, "fill", x), c(k, "fill", x))) for o, k in
            (("ours", "criu"), ("ours-remote", "criu-remote"), ("ours-remote-veth", "criu-remote-veth"))))
    # fault latency: from the fill-none runs (enough faults)
    p50s = [(x, c("ours-none", "p50", x)) for x in sizes]
    p99s = [(x, c("ours-remote-none", "p99", x)) for x in sizes]
    p99rt = [(x, rr("loopback-none", "p99", x)) for x in sizes]
    p50w = max((v for _, v in p50s if v is not None), default=None)
    p99w = max((v for _, v in p99s if v is not None), default=None)
    per = lambda xs: ", ".join(f"{size_label(x)} {fs(v, 'n', '')}" for x, v in xs if v is not None)
    w(f"3. **Fault service p50 ≤ 25 µs from local images; p99 ≤ 150 µs over loopback TCP.** "
      f"Judged on the worst size (median over runs of each run's percentile), from the fill `none` "
      f"runs (thousands of faults each). Local images through the shim, p50: {per(p50s)} µs "
      f"({verdict(p50w, lambda v: v <= 25)}). Page server over loopback through the shim, p99: {per(p99s)} µs "
      f"({verdict(p99w, lambda v: v <= 150)}); runtime level: {per(p99rt) or '–'} µs. A fault's service "
      "time includes the fault-around prefetch (up to 16 pages), so it is per fault, not per page; on "
      "this VM a wake-up on the other vCPU alone costs ~90 µs, and the histograms "
      "include the faults of `SUM`, which reads all memory (fill none runs no background fill).")
    ratios_none = [v for v in touch_ratio.values() if v is not None]
    rn = min(ratios_none) if ratios_none else None
    w("4. **With 50 % of memory remote the read-mostly workload keeps ≥ 90 % of its fully local "
      "throughput; profile hit rate ≥ 80 % on the second restore.**")
    for sys_, label in (("ours-remote-none", "pages at the page server"), ("ours-none", "local checkpoint")):
        near = [(abs(x["remote"] - 0.5), hp, x) for (sy, hp), x in stage_rows.items()
                if sy == sys_ and x["remote"] is not None]
        if not near:
            w(f"   - Redis, {label}: **not measured**.")
            continue
        _, hp, x = min(near)
        e = (stage_rows.get(("eager", hp)) or {}).get("rps2")
        rt = ratio(x["rps2"], e)
        w(f"   - Redis, {label} (fill none): at the stage with the remote fraction nearest 50 % "
          f"(GETs on {hp} % of the keys, {100 * x['remote']:.0f} % of memory remote) the second pass runs "
          f"{fs(x['rps2'], 'n', ',.0f')} GET/s vs eager {fs(e, 'n', ',.0f')} GET/s = "
          f"{'–' if rt is None else f'{100 * rt:.0f} %'} ({verdict(rt, lambda v: v >= 0.9)}); every stage "
          "in the Redis table above. Differences of ±10 % are within this machine's noise.")
    pooled = [ratio(pooled_local(runs, sz), m(agg, "containerd", "ours-none", sz, "t_warm")) for sz in sizes]
    pooled = [v for v in pooled if v is not None]
    w(f"   - memhog: the second `TOUCH 50` pass with half of memory remote runs at "
      f"{'–' if rn is None else f'{100 * rn:.0f} %'} of the all-local pass of the same process "
      f"(median of per-run ratios, worst size) ({verdict(rn, lambda v: v >= 0.9)}); against the pooled "
      f"all-local median of all runs of that size it is "
      f"{'–' if not pooled else f'{100 * min(pooled):.0f} %'} at the worst size. These passes take "
      "tens of milliseconds, so single runs swing by tens of percent on this machine.")
    hits = [x["hit_min"] for _, x in prof_rows if x["hit_min"] is not None]
    hw = min(hits) if hits else None
    if hw is None:
        w("   - Profile hit rate: **not measured** (no replayed `ours-profile` run).")
    else:
        w(f"   - Profile hit rate on the restores after the recording one: worst run {100 * hw:.1f} % "
          f"({verdict(hw, lambda v: v >= 0.8)} for 80 %); per size in the profile table above.")
    w("")
    w("## Gaps and what would close them")
    w("")
    if meta.get("skipped_sizes"):
        w("- Sizes skipped for lack of memory or disk: " + "; ".join(meta["skipped_sizes"]) + ".")
    w("- Inline checkpoints (`[store] mode = \"inline\"`, for checkpoints that travel as OCI "
      "images): containerd unpacks the whole tar before any shim runs, so their TTFR grows with "
      "size whatever the runtime does; they are not measured here.")
    if cr_r is not None and cr_r < 2:
        rf = med([(r.get("stats") or {}).get("restore_finished_us") for r in runs
                  if r["kind"] == "containerd" and r["system"] == "ours-remote" and r["mib"] == big
                  and not r.get("error")])
        w(f"- TTFR against CRIU's daemon fetching from the same page server ({fr(cr_r)}): with the memory "
          f"remote both restores are a constant {fs(c('ours-remote', 'ttfr'))} s vs "
          f"{fs(c('criu-remote', 'ttfr'))} s at {size_label(big)}, made of containerd's own work "
          f"({fs(c('ours-remote', 'unpack'))} s: snapshot, metadata untar, shim start) and `runc restore` "
          f"rebuilding the process tree, namespaces and mounts with CRIU (ours: fetcher start to "
          f"`restored` {'–' if rf is None else f'{rf / 1e6:.3f}'} s), which no lazy-pages server can shorten; "
          "the first faults are a few ms of it. Halving it needs a faster CRIU/runc restore "
          "(pre-created namespaces and mounts, a warm CRIU), not faster page serving.")
    fills = [(lbl, ratio(c(o, "fill"), c(k, "fill")), c(o, "fill"), c(k, "fill")) for lbl, o, k in
             (("local images", "ours", "criu"), ("page server over loopback", "ours-remote", "criu-remote"),
              ("page server over the veth", "ours-remote-veth", "criu-remote-veth"))]
    short = [(lbl, x, o, k) for lbl, x, o, k in fills if x is not None and x < 3]
    if short:
        w("- Fill below 3x CRIU's daemon at " + size_label(big) + ": " + "; ".join(
            f"{lbl} {fr(x)} ({fs(o, 's', 2)} vs {fs(k, 's', 2)} GiB/s)" for lbl, x, o, k in short) + ". "
          "Our local fill copies straight from the mapped pages files with both fill workers; one vCPU "
          "of this VM installs at most ~2.6-2.9 GiB/s with UFFDIO_COPY (page "
          "allocation, copy and PTE install per 4 KiB page), so 2 vCPUs cap any fill near 5.5-6 GiB/s, "
          "and during a restore through containerd the workload, containerd, the poller and (for "
          "remote pages) the page server and loopback softirqs share them. Where CRIU's daemon "
          "itself reaches 2+ GiB/s, 3x needs more cores, not a different fetcher; remote fill keeps "
          "4 requests in flight per restore (2 per fill thread), so more fill threads is the knob "
          "on a larger machine.")
    if p99w is not None and p99w > 150:
        w(f"- Loopback p99 ({fs(p99w, 'n', '')} µs at the worst size): each remote fault is a request/response "
          "on a TCP connection served by the page server's thread, with the fault thread, the "
          "page server, the workload and the kernel's loopback softirq on 2 vCPUs; the tail is "
          "scheduling (a cross-vCPU wake costs ~90 µs here). Closing it: pin the fetcher and page "
          "server to distinct cores, busy-poll the connection briefly before sleeping, and measure "
          "on a machine with cores to spare.")
    w("- CRIU's daemon runs with `-v4` inside the shim (its log is our only source of its "
      "transferred-page count and timing); a quieter log level would make it somewhat faster.")
    w("- The profile workload is memhog's sequential `TOUCH 10`; a Redis hot-key profile (record on one restore, replay on the next) is not in `make bench` yet.")
    w("")
    return pics


MIG_SYSTEMS = [
    ("eager", "eager (runc shim)"),
    ("ours-first", "ours, first checkpoint (a fresh container)"),
    ("ours-recheckpoint", "ours, re-checkpoint (restored with fill none, WRITE {pct})"),
    ("store-first", "ours, default config (node-local store): first checkpoint"),
    ("store-recheckpoint", "ours, default config: re-checkpoint (fill none, WRITE {pct})"),
]
MIB = 1 << 20


def migration_section(w, meta, runs, standalone):
    """The Migration section (migration.json: bench/migration.sh's runs)."""
    sizes = sorted({r["mib"] for r in runs})
    pct_w = meta.get("write_pct", 10)
    g = defaultdict(list)
    for r in runs:
        g[(r["system"], r["mib"])].append(r)
    nmax = max(len(v) for v in g.values())
    tail = "p99" if nmax >= 100 else "max"

    def vals(sys_, mib, key):
        return [r.get(key) for r in g.get((sys_, mib), []) if not r.get("error")]

    def mm(sys_, mib, key):
        return med(vals(sys_, mib, key))

    def cell(sys_, mib, key, scale=1.0, nd=3):
        v = [x for x in vals(sys_, mib, key) if x is not None]
        if not v:
            return "–"
        return f"{med(v) / scale:.{nd}f} ({pct(v, 0.99) / scale:.{nd}f})"

    w("## Migration: checkpoint, remove, restore")
    w("")
    w("A migration cycle through a private containerd and `ctr`: `ctr containers checkpoint --task` "
      "of a running memhog, the container removed, `ctr containers restore --live`, the first `PONG` "
      "of the restored process (bench/migration.sh). Three cycles per repetition and size:")
    w("")
    w("- **eager**: containerd's runc shim (`io.containerd.runc.v2`) on a fresh memhog: CRIU writes "
      "every page into the checkpoint, containerd stores it as content, the restore reads all of it "
      "back before the process runs.")
    w("- **ours-first**: our shim with `[pageserver]` (a `distriproc-pageserver` on 127.0.0.1, as the "
      "remote systems above): the first checkpoint of a fresh, never restored memhog. CRIU dumps all "
      "memory into the local checkpoint directory, the shim sends the pages files to the page server "
      "while CRIU writes them (`upload_during_dump`) and the rest after the dump, and containerd's "
      "checkpoint keeps CRIU's metadata; restored with fill `none`.")
    w(f"- **ours-recheckpoint**: that restored container, its memory still at the page server, rewrites "
      f"{pct_w} % of its pages (memhog `WRITE {pct_w}`) and is checkpointed again: the checkpoint is a "
      "layer over the one it was restored from and holds the written pages (every run checks the new "
      "checkpoint's `parent` link in the store); removed and restored with fill `none`.")
    w("")
    w("```sh")
    w(meta["command"])
    w("```")
    w("")
    w(f"- Run: {meta['started_utc']} to {meta['finished_utc']}, git `{meta['git_head']}` ({meta.get('build', '')}); "
      f"containerd {meta['containerd']}, {meta['runc']}, {meta['criu']}.")
    w(f"- Machine: {meta['nproc']} vCPUs, {meta['cpu_model']}, {meta['mem_total']} RAM, kernel {meta['kernel']}.")
    w(f"- Load (a shared machine; load averages around the run): at start `{meta['uptime_start'].strip()}`; "
      f"at end `{meta['uptime_end'].strip()}`.")
    w(f"- Repetitions: {meta.get('migration_reps', '?')} per size; quoted: median ({tail} of the runs in "
      "brackets" + (": with so few runs that is the worst run" if tail == "max" else "") + "). "
      "memhog: one process, " + f"{meta.get('threads', 2)} threads, every page non-zero, on the host network.")
    if meta.get("skipped_sizes"):
        w("- Sizes skipped for lack of memory or disk: " + "; ".join(meta["skipped_sizes"]) + ".")
    w("")
    w("### What is measured")
    w("")
    w("- **Checkpoint**: the `ctr containers checkpoint --task` command (the container is frozen for "
      "the dump and runs on after it). *Upload*: the part of it after the dump that the shim spends "
      "publishing to the page server (its `published ... in T` log line); for ours-first most pages "
      "were already sent while CRIU wrote them, which is not in it.")
    w("- **Removal**: SIGKILL, task and container deleted. **TTFR**: restore command start to the first "
      "`PONG` of a poller started just before it (retrying every 1 ms).")
    w("- **Downtime**: checkpoint start to that first `PONG` (= checkpoint + removal + TTFR). For "
      "ours-recheckpoint the measurements taken while the checkpointed container runs on (its fetcher "
      "statistics, and the check of the ours-first restore, whose `VERIFY` fetches the rest of its "
      "memory) sit between the checkpoint and the removal and are left out.")
    w("- **Sent**: the pages the shim uploaded to the page server (the `N bytes` of its `published` "
      "line). **Store growth**: `du -sb` of the page server's store before and after the checkpoint "
      "(pages, CRIU's metadata, index). **Pulled**: what the checkpoint read from the page server: the "
      "shim's `N pages still remote read from the page source` (x 4 KiB) and the fetcher's `bytes` in "
      "`<bundle>/distriproc-lazy-stats.json` before and after the checkpoint; a never restored "
      "container has nothing remote (0). **Content**: growth of containerd's content store by the "
      "checkpoint image (eager: CRIU's images with all pages; ours: metadata and the reference).")
    w("- **Correctness**: after every restore `VERIFY` (every page holds the generator's content for "
      "its last write) and `SUM` == the `EXPECT` of the checkpointed process; the ours-first restore is "
      "checked after its re-checkpoint (a `VERIFY` before it would fetch all memory, and the container "
      "would no longer be remote-resident). A failed check fails the run (`BENCH_STRICT=1`).")
    w("")
    for s in sizes:
        w(f"### {size_label(s)}")
        w("")
        w(f"Median ({tail}); seconds, MiB.")
        w("")
        w("| system | runs (verified) | checkpoint | upload | removal | TTFR | downtime | sent | store growth | pulled: log / stats | content |")
        w("|---|---|---|---|---|---|---|---|---|---|---|")
        for sys_, label in MIG_SYSTEMS:
            rs = g.get((sys_, s))
            if not rs:
                continue
            ok = sum(1 for r in rs if r.get("sum_ok") and not r.get("error"))
            pulled = "–" if sys_ == "eager" else \
                f"{cell(sys_, s, 'pulled_bytes', MIB, 1)} / {cell(sys_, s, 'pulled_stats_bytes', MIB, 1) if sys_ != 'ours-first' else '–'}"
            w(f"| {label.format(pct=pct_w)} | {len(rs)} ({ok}) | {cell(sys_, s, 'checkpoint_s')} "
              f"| {cell(sys_, s, 'upload_s')} | {cell(sys_, s, 'remove_s')} | {cell(sys_, s, 'ttfr_s')} "
              f"| {cell(sys_, s, 'downtime_s')} | {cell(sys_, s, 'sent_bytes', MIB, 1)} "
              f"| {cell(sys_, s, 'store_growth_bytes', MIB, 1)} | {pulled} | {cell(sys_, s, 'content_bytes', MIB, 1)} |")
        w("")
        written = mm("ours-recheckpoint", s, "written_pages")
        remote = med([r["remote_at_checkpoint_pages"] / (s * 256) for r in g.get(("ours-recheckpoint", s), [])
                      if not r.get("error") and r.get("remote_at_checkpoint_pages") is not None])
        gap = mm("ours-recheckpoint", s, "source_gap_s")
        layered = [r for r in g.get(("ours-recheckpoint", s), []) if not r.get("error")]
        if written is not None:
            w(f"ours-recheckpoint: `WRITE {pct_w}` rewrote {written:.0f} pages ({written * 4096 / MIB:.1f} MiB); "
              f"{'–' if remote is None else f'{100 * remote:.0f} %'} of the pages were still at the page "
              f"server when the checkpoint froze the container; every new checkpoint "
              f"({len(layered)}) is a layer over its ours-first checkpoint; left out of its downtime: "
              f"{fs(gap)} s (median) of measurements while it ran on.")
            w("")
        errs = [(r["system"], r["rep"], r["error"]) for k, rs in g.items() if k[1] == s for r in rs if r.get("error")]
        for sys_, rep, e in errs:
            w(f"- failed run ({sys_} #{rep}, excluded from the medians): {e}")
        if errs:
            w("")

    w("### Ratios")
    w("")
    w("| size | checkpoint: eager / ours-first | re-checkpoint / ours-first checkpoint | downtime: eager / ours-first | downtime: eager / ours-recheckpoint | store growth: re-checkpoint / first |")
    w("|---|---|---|---|---|---|")
    for s in sizes:
        c = lambda sys_, k: mm(sys_, s, k)
        rr = ratio(c("ours-recheckpoint", "checkpoint_s"), c("ours-first", "checkpoint_s"))
        sg = ratio(c("ours-recheckpoint", "store_growth_bytes"), c("ours-first", "store_growth_bytes"))
        w(f"| {size_label(s)} | {fr(ratio(c('eager', 'checkpoint_s'), c('ours-first', 'checkpoint_s')))} "
          f"| {'–' if rr is None else f'{rr:.2f}'} "
          f"| {fr(ratio(c('eager', 'downtime_s'), c('ours-first', 'downtime_s')))} "
          f"| {fr(ratio(c('eager', 'downtime_s'), c('ours-recheckpoint', 'downtime_s')))} "
          f"| {'–' if sg is None else f'{100 * sg:.1f} %'} |")
    w("")

    big = 4096 if 4096 in sizes else max(sizes)
    small, large = min(sizes), max(sizes)
    c = lambda sys_, k, s=big: mm(sys_, s, k)

    def verdict(x, ok):
        if x is None:
            return "**not measured**"
        return "**met**" if ok(x) else "**not met**"

    w("### Migration targets")
    w("")
    re_r = ratio(c("ours-recheckpoint", "checkpoint_s"), c("ours-first", "checkpoint_s"))
    w(f"1. **Re-checkpoint of a remote-resident {size_label(big)} container with {pct_w} % written in at "
      f"most 1/10 of its first checkpoint's time.** ours-recheckpoint {fs(c('ours-recheckpoint', 'checkpoint_s'))} s "
      f"vs ours-first {fs(c('ours-first', 'checkpoint_s'))} s = "
      f"{'–' if re_r is None else f'{re_r:.3f} (1/{1 / re_r:.1f})'} ({verdict(re_r, lambda v: v <= 0.1)}). "
      "Per size: " + ", ".join(
          f"{size_label(x)} {r:.3f}" for x in sizes
          for r in [ratio(mm('ours-recheckpoint', x, 'checkpoint_s'), mm('ours-first', x, 'checkpoint_s'))]
          if r is not None) + ".")
    e_f = ratio(c("eager", "checkpoint_s"), c("ours-first", "checkpoint_s"))
    up = c("ours-first", "upload_s")
    ck = c("ours-first", "checkpoint_s")
    ek = c("eager", "checkpoint_s")
    sent = c("ours-first", "sent_bytes")
    rate = None if not up or sent is None else sent / MIB / up
    miss = ""
    if e_f is not None and e_f < 4:
        rest = None if ck is None or up is None else ck - up
        streamed = c("ours-first", "streamed_bytes")
        miss = (f" It misses by {4 / e_f:.1f}x: 4x needs the first checkpoint in {fs(ek / 4)} s, it takes "
                f"{fs(ck)} s. CRIU writes all memory into the local checkpoint directory while the shim "
                f"sends it to the page server "
                f"({'–' if streamed is None else f'{streamed / MIB:.0f} MiB'} of {'–' if sent is None else f'{sent / MIB:.0f} MiB'} "
                f"sent during the dump); what is left after the dump takes {fs(up)} s "
                f"({'–' if up is None or not ck else f'{100 * up / ck:.0f} %'} of the checkpoint), the dump "
                f"and containerd's part the other {fs(rest)} s (eager's checkpoint / that part = "
                f"{fr(ratio(ek, rest))}).")
    w(f"2. **First remote checkpoint at least 4x faster than the runc shim's checkpoint of the same "
      f"container.** At {size_label(big)}: eager {fs(ek)} s / ours-first {fs(ck)} s = {fr(e_f)} "
      f"({verdict(e_f, lambda v: v >= 4)}). Per size: " + ", ".join(
          f"{size_label(x)} {fr(r)}" for x in sizes
          for r in [ratio(mm('eager', x, 'checkpoint_s'), mm('ours-first', x, 'checkpoint_s'))]
          if r is not None) + "." + miss)
    dt = lambda sys_: ratio(mm(sys_, large, "downtime_s"), mm(sys_, small, "downtime_s"))
    w(f"3. **With write-back on, downtime within 2x from 256 MiB to 8 GiB.** **Not built**: write-back "
      "(`writeback_interval_ms`) does not exist yet, so nothing is measured against this target. For "
      f"reference, without it downtime {size_label(large)} / {size_label(small)} is: eager {fr(dt('eager'))}, "
      f"ours-first {fr(dt('ours-first'))}, ours-recheckpoint {fr(dt('ours-recheckpoint'))} "
      f"(ours-recheckpoint {fs(mm('ours-recheckpoint', small, 'downtime_s'))} s at {size_label(small)}, "
      f"{fs(mm('ours-recheckpoint', large, 'downtime_s'))} s at {size_label(large)}).")
    halves = [(x, ratio(mm("store-first", x, "checkpoint_s"), mm("eager", x, "checkpoint_s")))
              for x in (1024, 4096) if x in sizes]
    worst = max((r for _, r in halves if r is not None), default=None)
    w(f"4. **With the default configuration (node-local store) the checkpoint takes at most 1/2 of "
      f"the runc shim's at 1 and 4 GiB.** store-first / eager checkpoint: " + ", ".join(
          f"{size_label(x)} {fs(mm('store-first', x, 'checkpoint_s'))} s / {fs(mm('eager', x, 'checkpoint_s'))} s = "
          f"{'–' if r is None else f'{r:.2f}'}" for x, r in halves) +
      f" ({verdict(worst, lambda v: v <= 0.5)}). CRIU writes the memory once, into containerd's "
      "temporary directory; the shim hard-links those files into the store and containerd's tar "
      "keeps only the metadata, where the runc shim's checkpoint writes every page a second time "
      "into containerd's content store. Re-checkpoint of a container restored from the store: "
      + ", ".join(f"{size_label(x)} {fs(mm('store-recheckpoint', x, 'checkpoint_s'))} s" for x in sizes
                  if mm('store-recheckpoint', x, 'checkpoint_s') is not None) + ".")
    w("")
    w("### Migration gaps")
    w("")
    streamed = ", ".join(
        f"{size_label(x)} {100 * r:.0f} %" for x in sizes
        for r in [ratio(mm("ours-first", x, "streamed_bytes"), mm("ours-first", x, "sent_bytes"))]
        if r is not None)
    w(f"- First checkpoint: CRIU writes all memory into the local checkpoint directory and the shim "
      f"reads it back to send it, during the dump (share of the pages sent before CRIU ended: "
      f"{streamed or '–'}); the memory still passes through the node's page cache once. CRIU writing "
      "straight to the page server (`criu dump --page-server`, which the page server accepts) would "
      "save that pass but not the dump itself.")
    rk, rup, rco = c("ours-recheckpoint", "checkpoint_s"), c("ours-recheckpoint", "upload_s"), c("ours-recheckpoint", "complete_s")
    w(f"- Re-checkpoint at {size_label(big)}: {fs(rk)} s, of which the upload of the written pages "
      f"{fs(rup)} s and the completion of the dump from the fetcher's residency {fs(rco)} s; the rest is "
      "freezing the container, CRIU's dump of the pages present in it and containerd's part.")
    w(f"- Write-back (`writeback_interval_ms`) is not built. Without it the downtime of a first "
      f"migration grows with memory: ours-first {fs(mm('ours-first', small, 'downtime_s'))} s at "
      f"{size_label(small)}, {fs(mm('ours-first', large, 'downtime_s'))} s at {size_label(large)}.")
    w("")


def chain_section(w, d):
    """The page server serving a deep chain of layers (pageserver/examples/chain_depth.rs)."""
    m = d.get("meta", {})
    w("## Chain depth: serving a deep chain of layers")
    w("")
    w(f"A {d['mib']} MiB base checkpoint and {d['depth'] - 1} layers over it, each rewriting "
      f"{d['pct']} % of the pages at scattered addresses (as a container migrated again and again "
      "writes them), served by an in-process page server over loopback TCP: the session open "
      "(the first builds the chain's index), single-page reads at random addresses "
      f"({d['reads']} of them), and a sequential read of all memory in 1 MiB requests; then the "
      "same top layer after every checkpoint below it was deleted and `gc` squashed the chain into "
      "it. Every page read is checked. The page server flattens a chain deeper than "
      "`flatten_depth` (16) right after its upload, so a store reaches the depth measured here only "
      "with `flatten_depth = 0`.")
    w("")
    w("```sh")
    w(m.get("command", "cargo run --release -p distriproc-pageserver --example chain_depth"))
    w("```")
    w("")
    if m:
        w(f"- Run: {m.get('started_utc', '?')} to {m.get('finished_utc', '?')}, git `{m.get('git_head', '?')}`; "
          f"load at the end: `{m.get('uptime', '')}`.")
        w("")
    w("| checkpoint | depth | session open (index) ms | read p50 µs | read p99 µs | sequential GiB/s |")
    w("|---|---|---|---|---|---|")
    for name, depth, f in [("base checkpoint", 1, d["base"]), ("top layer", d["depth"], d["deep"]),
                           ("top layer after gc", 1, d["squashed"])]:
        w(f"| {name} | {depth} | {f['open_ms']:.1f} | {f['p50_us']:.0f} | {f['p99_us']:.0f} | {f['seq_gib_s']:.2f} |")
    w("")
    b, t, q = d["base"], d["deep"], d["squashed"]
    slower = t["p50_us"] > 1.15 * b["p50_us"] or t["seq_gib_s"] < 0.9 * b["seq_gib_s"]
    w(f"- At depth {d['depth']}: read p50 {t['p50_us'] / b['p50_us']:.2f}x, p99 {t['p99_us'] / b['p99_us']:.2f}x "
      f"and sequential {t['seq_gib_s'] / b['seq_gib_s']:.2f}x the base's, the index built in "
      f"{t['open_ms']:.0f} ms at the first session"
      + (": measurably slower (more than 15 % on p50 or 10 % sequential), because the scattered layers "
         "cut the index into many short runs in different files (one `pread` each), not because of the "
         "lookup; `gc` or the server's flattening remove it." if slower else
         ": within 15 % on p50 and 10 % sequential of the base."))
    w(f"- After `gc` ({d['gc_s']:.2f} s, {d['gc_freed_mib']} MiB freed, {d['store_mib_after']} MiB left): "
      f"p50 {q['p50_us'] / b['p50_us']:.2f}x, p99 {q['p99_us'] / b['p99_us']:.2f}x, sequential "
      f"{q['seq_gib_s'] / b['seq_gib_s']:.2f}x the base's.")
    w("")


# Share of the budget the resident pages may reach before eviction starts (EVICT_ABOVE in
# runtime/src/fetcher/budget.rs): the capacity the optimal policy is given.
BUDGET_EVICT_ABOVE = 0.97


def optimal_cycle_misses(hot, capacity):
    """Misses per pass of Belady's optimal policy (MIN, demand paging) on a loop over `hot`
    distinct pages with `capacity` frames, in steady state. On a loop the page used furthest in
    the future is always the one just used, so MIN evicts the most recently used page: each pass
    hits the capacity - 1 pages kept from the previous one and misses the rest."""
    if hot <= capacity:
        return 0
    return hot - max(capacity - 1, 0)


def budget_policy_table(w, mem, med_or_none):
    """The eviction policy's miss rate in memhog's timed passes against the optimal policy."""
    def delta(r, k):
        a, b = r.get("stats_before_passes") or {}, r.get("stats_after_passes") or {}
        if k not in a or k not in b:
            return None
        return b[k] - a[k]

    rows = []
    for pct in sorted({r["budget_pct"] for r in mem}, reverse=True):
        rs = [r for r in mem if r["budget_pct"] == pct]
        miss, moved, opt = [], [], []
        for r in rs:
            reads = (r.get("passes") or 0) * (r.get("hot_pages") or 0)
            f = delta(r, "faults")
            inst = [delta(r, k) for k in ("pages_faulted", "pages_prefetched", "pages_filled")]
            if not reads or f is None or None in inst:
                continue
            miss.append(f / reads)
            moved.append(sum(inst) / reads)
            cap = int(((r.get("stats") or {}).get("budget_pages") or 0) * BUDGET_EVICT_ABOVE)
            opt.append(0.0 if pct == 100 or not cap else
                       optimal_cycle_misses(r["hot_pages"], cap) / r["hot_pages"])
        rows.append((pct, med_or_none(miss), med_or_none(moved), med_or_none(opt)))
    if not any(m is not None for _, m, _, _ in rows):
        return
    w("Miss rate of the eviction policy (CLOCK with refault heat) in the timed passes: demand "
      "faults per hot-page read, and pages brought in per read (a fault installs its aligned "
      "16-page window, so one fault can serve several reads), against the optimal policy "
      "(Belady's MIN with demand paging, computed for the loop the passes make over the hot "
      f"set, with {BUDGET_EVICT_ABOVE:.0%} of the budget as its capacity: the most the budget "
      "holds before eviction starts).")
    w("")
    w("| budget | faults per read | pages in per read | optimal (MIN) misses per read |")
    w("|---|---|---|---|")
    pc = lambda x: "-" if x is None else f"{100 * x:.2f} %"
    for pct, m, mv, o in rows:
        label = "none (all local)" if pct == 100 else f"{pct} %"
        w(f"| {label} | {pc(m)} | {pc(mv)} | {pc(o)} |")
    w("")


def budget_section(w, d):
    """The Memory budget section (budget.json: bench/budget.sh's runs)."""
    meta, runs = d.get("meta", {}), d.get("runs", [])
    if not runs:
        return
    w("## Memory budget: a restored container with less local memory than it has")
    w("")
    w(f"Command: `{meta.get('command', 'make bench')}` ({meta.get('started_utc', '?')} to "
      f"{meta.get('finished_utc', '?')}, {meta.get('nproc', '?')} vCPU {meta.get('cpu_model', '')}; "
      f"load at start `{meta.get('uptime_start', '')}`). One checkpoint each of memhog and Redis, "
      "restored by our shim with `fetcher.memory_budget` at a share of the memory (100 % = no "
      "budget, measured once the fill is complete: the all-local baseline), fill `full` (it stops "
      "at 88 % of the budget). Clean pages are evicted (made remote again) to keep the budget; "
      "the workloads only read, so write-back does not run. Ratios compare medians with the "
      "all-local runs of the same run.")
    w("")

    def stats(r, k, default=None):
        st = r.get("stats") or {}
        return st.get(k, default)

    def per_page(r, q):
        st = r.get("stats") or {}
        b, n = st.get("evict_batches") or 0, st.get("pages_evicted") or 0
        v = (st.get("evict_stop_us") or {}).get(q)
        return v / (n / b) if b and n and v is not None else None

    def med_or_none(v):
        v = [x for x in v if x is not None]
        return med(v) if v else None

    def f0(x, unit=""):
        return "-" if x is None else f"{x:,.0f}{unit}"

    def share_s(a, b):
        r = ratio(a, b)
        return "-" if r is None else f"{100 * r:.0f} %"

    mem = [r for r in runs if r["kind"] == "budget-memhog"]
    if mem:
        r0 = mem[0]
        w(f"### memhog, {r0.get('mib')} MiB")
        w("")
        w(f"A hot set of {r0.get('hot_pct')} % of the pages spread over all memory (`TOUCH "
          f"{r0.get('hot_pct')}`, {r0.get('hot_pages')} pages) read twice to bring it in, then "
          f"{r0.get('passes')} timed passes (pages read per second, median over passes and runs); "
          "then `SUM` reads every page (a scan larger than the budget) and must equal `EXPECT`. "
          "Eviction cost per page: a batch's stop time divided by the batch's mean size (p50 and "
          "p99 of the batches). Refault rate: demand faults on evicted pages per evicted page.")
        w("")
        w("| budget | hot-set pages/s | of all-local | SUM (scan) | pages evicted | refault rate | "
          "batches | stop per batch p50 / p99 | per evicted page p50 / p99 | correct |")
        w("|---|---|---|---|---|---|---|---|---|---|")
        def rate(r):
            us = [u for u in r.get("pass_us") or [] if u]
            return [r["hot_pages"] / (u / 1e6) for u in us] if r.get("hot_pages") else []
        base = med_or_none([x for r in mem if r.get("budget_pct") == 100 for x in rate(r)])
        for pct in sorted({r["budget_pct"] for r in mem}, reverse=True):
            rs = [r for r in mem if r["budget_pct"] == pct]
            tput = med_or_none([x for r in rs for x in rate(r)])
            ev = med_or_none([stats(r, "pages_evicted") for r in rs])
            rf = med_or_none([(stats(r, "refaults") or 0) / stats(r, "pages_evicted")
                              for r in rs if stats(r, "pages_evicted")])
            label = "none (all local)" if pct == 100 else f"{pct} % ({r0.get('mib') * pct // 100} MiB)"
            w(f"| {label} | {f0(tput)} | {share_s(tput, base)} | "
              f"{fs(med_or_none([r.get('sum_s') for r in rs]))} | {f0(ev)} | "
              f"{'-' if rf is None else f'{rf:.2f}'} | {f0(med_or_none([stats(r, 'evict_batches') for r in rs]))} | "
              f"{f0(med_or_none([(stats(r, 'evict_stop_us') or {}).get('p50') for r in rs]), ' µs')} / "
              f"{f0(med_or_none([(stats(r, 'evict_stop_us') or {}).get('p99') for r in rs]), ' µs')} | "
              f"{f0(med_or_none([per_page(r, 'p50') for r in rs]), ' µs')} / "
              f"{f0(med_or_none([per_page(r, 'p99') for r in rs]), ' µs')} | "
              f"{sum(1 for r in rs if r.get('sum_ok'))}/{len(rs)} |")
        w("")
        budget_policy_table(w, mem, med_or_none)
    red = [r for r in runs if r["kind"] == "budget-redis"]
    if red:
        r0 = red[0]
        w(f"### Redis, about {r0.get('mib')} MiB of keys")
        w("")
        w(f"`redis-benchmark -t get` on random keys among the first {r0.get('hot_pct')} % (one "
          "warm-up pass, one measured); `DEBUG DIGEST` must equal the one taken before the "
          "checkpoint.")
        w("")
        w("| budget | GET/s | of all-local | pages evicted | refault rate | stop per batch p50 / p99 | digest |")
        w("|---|---|---|---|---|---|---|")
        base = med_or_none([r.get("rps") for r in red if r.get("budget_pct") == 100])
        half = None
        for pct in sorted({r["budget_pct"] for r in red}, reverse=True):
            rs = [r for r in red if r["budget_pct"] == pct]
            rps = med_or_none([r.get("rps") for r in rs])
            if pct == 50:
                half = rps
            ev = med_or_none([stats(r, "pages_evicted") for r in rs])
            rf = med_or_none([(stats(r, "refaults") or 0) / stats(r, "pages_evicted")
                              for r in rs if stats(r, "pages_evicted")])
            label = "none (all local)" if pct == 100 else f"{pct} %"
            w(f"| {label} | {f0(rps)} | {share_s(rps, base)} | {f0(ev)} | "
              f"{'-' if rf is None else f'{rf:.2f}'} | "
              f"{f0(med_or_none([(stats(r, 'evict_stop_us') or {}).get('p50') for r in rs]), ' µs')} / "
              f"{f0(med_or_none([(stats(r, 'evict_stop_us') or {}).get('p99') for r in rs]), ' µs')} | "
              f"{sum(1 for r in rs if r.get('sum_ok'))}/{len(rs)} |")
        w("")
        if half and base:
            share = 100 * half / base
            w(f"Target: at least 70 % of all-local throughput at a 50 % budget for the hot-key Redis "
              f"workload. Measured: {share:.0f} % ({'met' if share >= 70 else f'missed by {70 - share:.0f} points'}).")
            w("")
    bad = [r for r in runs if r.get("error")]
    for r in bad:
        w(f"- failed run ({r['kind']}, budget {r.get('budget_pct')} %, #{r.get('rep')}): {r['error']}")
    if bad:
        w("")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("results", nargs="?", default="bench/out/results.json")
    ap.add_argument("--migration", default=None,
                    help="migration runs (default: migration.json next to RESULTS, when present)")
    ap.add_argument("--chain", default=None,
                    help="chain-depth figures (default: chain_depth.json next to RESULTS, when present)")
    ap.add_argument("--budget", default=None,
                    help="memory-budget runs (default: budget.json next to RESULTS, when present)")
    ap.add_argument("--doc", default="docs/BENCHMARKS.md")
    ap.add_argument("--png-dir", default="docs/bench")
    args = ap.parse_args()
    meta, runs = None, []
    if os.path.exists(args.results):
        data = json.load(open(args.results))
        meta, runs = data["meta"], data["runs"]
    mig_path = args.migration or os.path.join(os.path.dirname(args.results) or ".", "migration.json")
    mig_meta, mig_runs = meta, [r for r in runs if r["kind"] == "migration"]
    if os.path.exists(mig_path):
        data = json.load(open(mig_path))
        mig_meta, mig_runs = data["meta"], data["runs"]
    runs = [r for r in runs if r["kind"] != "migration"]
    if not runs and not mig_runs:
        sys.exit(f"bench/report.py: no runs in {args.results} or {mig_path}")

    L = []
    w = L.append
    w("# Benchmarks")
    w("")
    w("<!-- Generated by bench/report.py from bench/out/results.json"
      + (" and bench/out/migration.json" if mig_runs else "") + " (make bench). Do not edit by hand. -->")
    w("")
    w("Lazy restore through containerd (`ctr containers restore --live`) next to an eager restore and "
      "CRIU's own lazy-pages daemon, with the `memhog` workload (verifiable pages, a TCP server). "
      "All figures below are produced by one run of the command; the raw per-run data is "
      "`bench/out/results.json`."
      + (" The [migration section](#migration-checkpoint-remove-restore) comes from its own run "
         "(its command is given there; raw data `bench/out/migration.json`)." if mig_runs and runs else ""))
    w("")
    pics = restore_sections(w, meta, runs, args) if runs else None
    if mig_runs:
        migration_section(w, mig_meta, mig_runs, standalone=not runs)
    chain_path = args.chain or os.path.join(os.path.dirname(args.results) or ".", "chain_depth.json")
    if os.path.exists(chain_path):
        chain_section(w, json.load(open(chain_path)))
    budget_path = args.budget or os.path.join(os.path.dirname(args.results) or ".", "budget.json")
    if os.path.exists(budget_path):
        budget_section(w, json.load(open(budget_path)))
    # The soak's figures (make soak, not a bench run) are kept as written, after the rest.
    soak_path = os.path.join(args.png_dir, "soak.md")
    if os.path.exists(soak_path):
        w(open(soak_path).read().rstrip("\n"))
        w("")
    os.makedirs(os.path.dirname(args.doc) or ".", exist_ok=True)
    open(args.doc, "w").write("\n".join(L))
    print(f"wrote {args.doc}" + (f" and {len(pics)} plots in {args.png_dir}" if pics else ""))



if __name__ == "__main__":
    main()
