# shellcheck shell=bash
# Migration downtime of `make bench` (MIGRATION=1, the default; MIGRATION_ONLY=1 runs only this),
# sourced by bench/run.sh; migration_bench runs while run.sh's private containerd and its
# loopback page server ($PS_LO, store $WORK/ps-store) are up, and uses run.sh's helpers (log,
# now_ns, q, memhog_run, timed_restore, remove_container, write_shim_config, size_fits, bundle_of,
# json_field, $PY, $RUNS, $WORK, $CTD_LOG, $CTD_ROOT, $PORT_SEQ).
#
# A migration cycle through `ctr`: `ctr containers checkpoint --task` of a running memhog, remove
# the container, `ctr containers restore --live`, first PONG of the restored process. At each
# size of MIGRATION_SIZES, MIGRATION_REPS times:
#
#   eager              containerd's runc shim (io.containerd.runc.v2) on a fresh memhog: CRIU
#                      writes every page into the checkpoint, containerd stores it as content, the
#                      restore reads all of it back before the process runs
#   ours-first         our shim with [pageserver] (fill none): the first checkpoint of a fresh,
#                      never restored memhog (CRIU dumps all memory locally, the shim uploads the
#                      pages to the page server while CRIU writes them and containerd keeps CRIU's
#                      metadata), then a restore with fill none
#   store-first, store-recheckpoint  the same two with the default configuration: no page
#                      server, the memory goes to the node-local store ([store] dir = $WORK/store)
#   ours-recheckpoint  that restored container, its memory still at the page server, rewrites
#                      MIGRATION_WRITE_PCT % of its pages (memhog WRITE) and is checkpointed again:
#                      a layer over the checkpoint it was restored from that holds the written
#                      pages (checked: the new checkpoint's parent link in the store); removed
#                      and restored with fill none
#
# Per cycle: checkpoint time (the `ctr` command), removal time, TTFR (restore command start to
# the first PONG of a 1 ms poller started just before it), downtime = checkpoint start to that
# PONG, without the measurements taken while the checkpointed container runs on (for
# ours-recheckpoint: fetcher statistics and the ours-first container's VERIFY; `source_gap_s`);
# bytes sent to the page server (the shim's "published ... (N lazy pages, B bytes)" line: the
# pages of the upload), page-server store growth (`du -sb` of its store around the checkpoint),
# bytes pulled from the page server by the checkpoint (the shim's "N pages still remote read
# from the page source" line, and the fetcher's `bytes` in <bundle>/distriproc-lazy-stats.json
# before and after the checkpoint), containerd's content-store growth (the checkpoint image).
# Every restore is checked: VERIFY (every page holds the generator's content for its last write)
# and SUM == the EXPECT of the checkpointed process; the ours-first restore is checked after its
# re-checkpoint (a VERIFY before would fetch all of its memory and it would not be remote-resident).
#
# Environment: MIGRATION_SIZES (MiB, default "256 1024 4096 8192"; a size is skipped with a note
# when memory or disk cannot hold it), MIGRATION_REPS (default 3), MIGRATION_WRITE_PCT (default 10).

MIGRATION_SIZES=${MIGRATION_SIZES:-256 1024 4096 8192}
MIGRATION_REPS=${MIGRATION_REPS:-3}
MIGRATION_WRITE_PCT=${MIGRATION_WRITE_PCT:-10}
MIG_SKIPPED=()
# shellcheck disable=SC2034 # the MIG_* figures are read by run.sh (write_results)
MIG_START_UTC='' MIG_END_UTC='' MIG_UPTIME_START='' MIG_UPTIME_END=''

mig_du() { du -sb "$1" 2>/dev/null | awk '{print $1}'; }
mig_store() { echo "$WORK/ps-store"; }
mig_content() { echo "$CTD_ROOT/io.containerd.content.v1.content/blobs"; }
mig_s() { awk -v a="$1" -v b="$2" 'BEGIN {printf "%.6f", (b - a) / 1e9}'; }

# mig_fetched ID: the fetcher's `bytes` (pages moved from the page source) of container ID once
# the shim rewrote its statistics file (every second).
mig_fetched() {
    sleep 1.2
    json_field "$(bundle_of "$1")/distriproc-lazy-stats.json" bytes
}

# mig_shim_log ID: KEY=VALUE words from the shim's lines about container ID's checkpoint in
# containerd's log (docs/REFERENCE.md): remote_at_checkpoint_pages, complete_s, parent_pages,
# pulled_pages (the dump completion), checkpoint_id, sent_lazy_pages, sent_bytes, upload_s (the
# upload to the page server once the dump ended), streamed_bytes (pages sent while CRIU wrote them).
mig_shim_log() {
    "$PY" - "$CTD_LOG" "$1" <<'EOF'
import re, sys
cid = re.escape(sys.argv[2])
UNIT = {"s": 1, "ms": 1e3, "µs": 1e6, "us": 1e6, "ns": 1e9}
def dur(s):  # a Rust Duration's Debug form: 1.25s, 3.5ms, 12µs
    m = re.fullmatch(r"([0-9.]+)(s|ms|µs|us|ns)", s)
    return f"{float(m.group(1)) / UNIT[m.group(2)]:.6f}" if m else ""
q = r'\\?"'
pats = [
    (re.compile(r"checkpoint of " + cid + r": (\d+) pages still remote in \d+ tasks"),
     lambda m: {"remote_at_checkpoint_pages": m.group(1)}),
    (re.compile(r"checkpoint of " + cid + r": dump completed in (\S+): (\d+) pages left to layer "
                + q + r"[^\"\\]*" + q + r", (\d+) pages still remote read from the page source"),
     lambda m: {"complete_s": dur(m.group(1)), "parent_pages": m.group(2), "pulled_pages": m.group(3)}),
    (re.compile(r"checkpoint of " + cid + r" published as " + q + r"([^\"\\]+)" + q
                + r" at \S+ \((\d+) lazy pages, (\d+) bytes\) in ([0-9.]+(?:s|ms|µs|us|ns))"),
     lambda m: {"checkpoint_id": m.group(1), "sent_lazy_pages": m.group(2), "sent_bytes": m.group(3),
                "upload_s": dur(m.group(4))}),
    (re.compile(r"checkpoint of " + cid + r": (\d+) bytes of pages were sent while CRIU wrote them"),
     lambda m: {"streamed_bytes": m.group(1)}),
]
out = {}
for line in open(sys.argv[1], errors="replace"):
    if "checkpoint of" not in line:
        continue
    for p, f in pats:
        m = p.search(line)
        if m:
            out.update(f(m))
print(" ".join(f"{k}={v}" for k, v in out.items()))
EOF
}

# mig_record KEY=VALUE...: one migration run (kind "migration") appended to $RUNS; numbers and
# true/false are typed, empty values are null.
mig_record() {
    "$PY" - "$RUNS" "$@" <<'EOF'
import json, sys
TEXT = {"system", "sum", "expect", "expect_restored", "verify", "error", "checkpoint_id",
        "parent_id", "layer_of", "ref", "id", "write_reply"}
run = {"kind": "migration"}
for a in sys.argv[2:]:
    k, _, v = a.partition("=")
    if v == "":
        run[k] = None
    elif k in TEXT:
        run[k] = v
    elif v in ("true", "false"):
        run[k] = v == "true"
    else:
        try:
            run[k] = int(v)
        except ValueError:
            try:
                run[k] = float(v)
            except ValueError:
                run[k] = v
if run.get("pulled_pages") is not None:
    run["pulled_bytes"] = run["pulled_pages"] * 4096
for a, b, k in (("fetched_before", "fetched_after", "pulled_stats_bytes"),
                ("store_before", "store_after", "store_growth_bytes"),
                ("content_before", "content_after", "content_bytes")):
    if run.get(a) is not None and run.get(b) is not None:
        run[k] = run[b] - run[a]
with open(sys.argv[1], "a") as f:
    f.write(json.dumps(run) + "\n")
EOF
}

# mig_check PORT EXPECT PAGES: "VERIFY-reply<TAB>SUM-reply<TAB>EXPECT-reply<TAB>ok" of the
# memhog on PORT: ok (true/false) when VERIFY is OK for all PAGES pages and SUM == EXPECT (the
# reply of the checkpointed process) == the process's own EXPECT.
mig_check() {
    local v s e ok=false
    v=$(q "$1" 600000 VERIFY) || v="VERIFY failed"
    s=$(q "$1" 600000 SUM) || s="SUM failed"
    e=$(q "$1" 600000 EXPECT) || e="EXPECT failed"
    [[ $v == "OK pages=$3" && $s == "$2" && $e == "$2" ]] && ok=true
    printf '%s\t%s\t%s\t%s\n' "$v" "$s" "$e" "$ok"
}

# mig_eager MIB REP PORT: one eager cycle (runc shim).
mig_eager() {
    local mib=$1 rep=$2 port=$3 src=me-$1-$2-src dst=me-$1-$2 ref=localhost/bench/mig-eager-$1-$2:1
    local err="" expect="" c0="" c1="" t0=0 t1=0 t2=0 t3=0 down="" v="" s="" e="" ok=false
    expect=$(memhog_run io.containerd.runc.v2 "$mib" "$port" "$src") || err="memhog did not start"
    c0=$(mig_du "$(mig_content)")
    if [[ -z $err ]]; then
        t0=$(now_ns)
        ctd_t 900 containers checkpoint --task "$src" "$ref" >/dev/null 2>"$WORK/mig-ck.err" ||
            err="ctr containers checkpoint failed: $(tail -c 300 "$WORK/mig-ck.err" | tr '\n"' ' _')"
        t1=$(now_ns)
    fi
    t2=$(now_ns)
    remove_container "$src"
    t3=$(now_ns)
    TR_T0=0 TR_T1=0 TR_TTFR_US=""
    if [[ -z $err ]]; then
        timed_restore "$dst" "$ref" "$port"
        err=$TR_ERR
    fi
    if [[ -z $err ]]; then
        down=$(mig_s "$t0" "$((TR_T0 + TR_TTFR_US * 1000 - (t2 - t1)))")
        IFS=$'\t' read -r v s e ok < <(mig_check "$port" "$expect" $((mib * 256)))
        [[ $ok == true ]] || err="check after restore: $v, $s, EXPECT $e (checkpointed: $expect)"
    fi
    c1=$(mig_du "$(mig_content)")
    remove_container "$dst"
    ctd_t 120 images rm --sync "$ref" >/dev/null 2>&1 || true
    mig_record system=eager mib="$mib" rep="$rep" runtime=io.containerd.runc.v2 \
        checkpoint_s="$( ((t1)) && mig_s "$t0" "$t1")" remove_s="$(mig_s "$t2" "$t3")" \
        source_gap_s="$( ((t1)) && mig_s "$t1" "$t2")" \
        ttfr_s="${TR_TTFR_US:+$(mig_s 0 "$((TR_TTFR_US * 1000))")}" \
        restore_cmd_s="$( ((TR_T1)) && mig_s "$TR_T0" "$TR_T1")" downtime_s="$down" \
        content_before="$c0" content_after="$c1" verify="$v" sum="$s" expect="$expect" \
        expect_restored="$e" sum_ok="$ok" error="$err"
    log "[migration eager $mib MiB #$rep] checkpoint $( ((t1)) && mig_s "$t0" "$t1") s, downtime ${down:-?} s, verified: $ok${err:+, error: $err}"
}

# mig_ours MIB REP PORT [FLAVOUR]: an ours-first cycle, then an ours-recheckpoint cycle of the
# container it restored; FLAVOUR "store": the same with the default configuration (the node-local
# store, no page server), recorded as store-first and store-recheckpoint.
mig_ours() {
    local mib=$1 rep=$2 port=$3 pages=$(($1 * 256)) store flavour=${4:-remote}
    local sys1=ours-first sys2=ours-recheckpoint ps=$PS_LO
    local s0=mo-$1-$2-src r1=mo-$1-$2 r2=mr-$1-$2
    local ref1=localhost/bench/mig-first-$1-$2:1 ref2=localhost/bench/mig-re-$1-$2:1
    store=$(mig_store)
    if [[ $flavour == store ]]; then
        sys1=store-first sys2=store-recheckpoint ps="" store=$WORK/store
        s0=ms-$1-$2-src r1=ms-$1-$2 r2=msr-$1-$2
        ref1=localhost/bench/mig-sfirst-$1-$2:1 ref2=localhost/bench/mig-sre-$1-$2:1
    fi
    write_shim_config native none "$ps"
    # --- ours-first: a fresh memhog, its first checkpoint goes to the page server.
    local err1="" expect="" st0="" st1="" c0="" c1="" a0=0 a1=0 a2=0 a3=0 down1="" ttfr1="" rcmd1=""
    local first_log="" first_id=""
    expect=$(memhog_run io.containerd.distriproc.v2 "$mib" "$port" "$s0") || err1="memhog did not start"
    st0=$(mig_du "$store") c0=$(mig_du "$(mig_content)")
    if [[ -z $err1 ]]; then
        a0=$(now_ns)
        ctd_t 900 containers checkpoint --task "$s0" "$ref1" >/dev/null 2>"$WORK/mig-ck.err" ||
            err1="ctr containers checkpoint failed: $(tail -c 300 "$WORK/mig-ck.err" | tr '\n"' ' _')"
        a1=$(now_ns)
    fi
    a2=$(now_ns)
    remove_container "$s0"
    a3=$(now_ns)
    TR_T0=0 TR_T1=0 TR_TTFR_US=""
    if [[ -z $err1 ]]; then
        timed_restore "$r1" "$ref1" "$port"
        err1=$TR_ERR
    fi
    if [[ -z $err1 ]]; then
        down1=$(mig_s "$a0" "$((TR_T0 + TR_TTFR_US * 1000 - (a2 - a1)))")
        ttfr1=$(mig_s 0 "$((TR_TTFR_US * 1000))") rcmd1=$(mig_s "$TR_T0" "$TR_T1")
    fi
    st1=$(mig_du "$store") c1=$(mig_du "$(mig_content)")
    first_log=$(mig_shim_log "$s0")
    first_id=$(sed -n 's/.*checkpoint_id=\([^ ]*\).*/\1/p' <<<"$first_log")
    [[ -n $err1 || -n $first_id ]] || err1="no published checkpoint in the shim's log"

    # --- ours-recheckpoint: the restored container (fill none: its memory is at the page server)
    # rewrites some of its pages and is checkpointed again.
    local err2="" e1="" wrote="" written="" expect2="" f0="" f1="" st2="" st3="" c2="" c3=""
    local b0=0 b1=0 b2=0 b3=0 down2="" ttfr2="" rcmd2="" re_log="" re_id="" parent=""
    local v1="" s1="" x1="" ok1=false v2="" s2="" x2="" ok2=false
    if [[ -n $err1 ]]; then
        err2="ours-first failed"
    else
        # EXPECT comes from the generator and memhog's WRITE state: cheap, no page fetched.
        e1=$(q "$port" 600000 EXPECT) || e1="EXPECT failed"
        [[ $e1 == "$expect" ]] || err1="EXPECT after restore $e1, checkpointed $expect"
        wrote=$(q "$port" 600000 "WRITE $MIGRATION_WRITE_PCT") || wrote="WRITE failed"
        written=${wrote#OK pages=}
        [[ $written =~ ^[0-9]+$ ]] || { err2="WRITE $MIGRATION_WRITE_PCT answered: $wrote"; written=""; }
        expect2=$(q "$port" 600000 EXPECT) || err2="EXPECT after WRITE failed"
        f0=$(mig_fetched "$r1")
        st2=$(mig_du "$store") c2=$(mig_du "$(mig_content)")
    fi
    if [[ -z $err2 ]]; then
        b0=$(now_ns)
        ctd_t 900 containers checkpoint --task "$r1" "$ref2" >/dev/null 2>"$WORK/mig-ck.err" ||
            err2="ctr containers checkpoint failed: $(tail -c 300 "$WORK/mig-ck.err" | tr '\n"' ' _')"
        b1=$(now_ns)
        # The checkpointed container runs on: what its checkpoint pulled, then the check of the
        # ours-first restore (VERIFY fetches the rest of its memory). Not part of the downtime.
        f1=$(mig_fetched "$r1")
    fi
    if [[ -z $err1 ]]; then
        IFS=$'\t' read -r v1 s1 x1 ok1 < <(mig_check "$port" "$expect2" "$pages")
        [[ $ok1 == true ]] || err1="check after restore (after its re-checkpoint): $v1, $s1, EXPECT $x1 (expected $expect2)"
    fi
    b2=$(now_ns)
    remove_container "$r1"
    b3=$(now_ns)
    TR_T0=0 TR_T1=0 TR_TTFR_US=""
    if [[ -z $err2 ]]; then
        timed_restore "$r2" "$ref2" "$port"
        err2=$TR_ERR
    fi
    if [[ -z $err2 ]]; then
        down2=$(mig_s "$b0" "$((TR_T0 + TR_TTFR_US * 1000 - (b2 - b1)))")
        ttfr2=$(mig_s 0 "$((TR_TTFR_US * 1000))") rcmd2=$(mig_s "$TR_T0" "$TR_T1")
    fi
    st3=$(mig_du "$store") c3=$(mig_du "$(mig_content)")
    re_log=$(mig_shim_log "$r1")
    re_id=$(sed -n 's/.*checkpoint_id=\([^ ]*\).*/\1/p' <<<"$re_log")
    if [[ -n $re_id ]]; then
        parent=$(readlink "$store/$re_id/parent" 2>/dev/null || true)
        parent=${parent#../}
    fi
    if [[ -z $err2 ]]; then
        [[ -n $re_id ]] || err2="no published checkpoint in the shim's log"
        [[ -z $re_id || $parent == "$first_id" ]] ||
            err2="checkpoint $re_id is not a layer over $first_id (parent: ${parent:-none})"
    fi
    if [[ -z $err2 ]]; then
        IFS=$'\t' read -r v2 s2 x2 ok2 < <(mig_check "$port" "$expect2" "$pages")
        [[ $ok2 == true ]] || err2="check after restore: $v2, $s2, EXPECT $x2 (checkpointed: $expect2)"
    fi
    remove_container "$r2"
    ctd_t 120 images rm --sync "$ref2" >/dev/null 2>&1 || true
    ctd_t 120 images rm --sync "$ref1" >/dev/null 2>&1 || true
    rm -rf "${store:?}/"*
    # shellcheck disable=SC2086 # the shim-log words are KEY=VALUE pairs
    mig_record system="$sys1" mib="$mib" rep="$rep" runtime=io.containerd.distriproc.v2 fill=none \
        pageserver="$ps" checkpoint_s="$( ((a1)) && mig_s "$a0" "$a1")" remove_s="$(mig_s "$a2" "$a3")" \
        source_gap_s="$( ((a1)) && mig_s "$a1" "$a2")" ttfr_s="$ttfr1" restore_cmd_s="$rcmd1" downtime_s="$down1" \
        store_before="$st0" store_after="$st1" content_before="$c0" content_after="$c1" \
        pulled_pages=0 $first_log verify="$v1" sum="$s1" expect="$expect2" expect_restored="$x1" \
        sum_ok="$ok1" error="$err1"
    # shellcheck disable=SC2086
    mig_record system="$sys2" mib="$mib" rep="$rep" runtime=io.containerd.distriproc.v2 fill=none \
        pageserver="$ps" write_pct="$MIGRATION_WRITE_PCT" written_pages="$written" \
        checkpoint_s="$( ((b1)) && mig_s "$b0" "$b1")" remove_s="$(mig_s "$b2" "$b3")" \
        source_gap_s="$( ((b1)) && mig_s "$b1" "$b2")" ttfr_s="$ttfr2" restore_cmd_s="$rcmd2" \
        downtime_s="$down2" store_before="$st2" store_after="$st3" content_before="$c2" \
        content_after="$c3" fetched_before="$f0" fetched_after="$f1" $re_log parent_id="$parent" \
        layer_of="$first_id" verify="$v2" sum="$s2" expect="$expect2" expect_restored="$x2" \
        sum_ok="$ok2" error="$err2"
    log "[migration $sys1 $mib MiB #$rep] checkpoint $( ((a1)) && mig_s "$a0" "$a1") s, downtime ${down1:-?} s, $((${st1:-0} - ${st0:-0})) bytes stored, verified: $ok1${err1:+, error: $err1}"
    log "[migration $sys2 $mib MiB #$rep] $written pages written, checkpoint $( ((b1)) && mig_s "$b0" "$b1") s, downtime ${down2:-?} s, $((${st3:-0} - ${st2:-0})) bytes stored, layer over ${parent:-?}, verified: $ok2${err2:+, error: $err2}"
}

# shellcheck disable=SC2034 # the MIG_* figures are read by run.sh (write_results)
migration_bench() {
    MIG_START_UTC=$(date -u +%Y-%m-%dT%H:%M:%SZ)
    MIG_UPTIME_START=$(uptime)
    local mib rep why port rc=0 before
    if [[ -z ${PS_LO:-} ]]; then
        log "error: [migration] no page server"
        return 1
    fi
    for mib in $MIGRATION_SIZES; do
        if ! why=$(size_fits "$mib"); then
            log "[migration $mib MiB] skipped: $why"
            MIG_SKIPPED+=("$mib MiB: $why")
            continue
        fi
        for rep in $(seq 1 "$MIGRATION_REPS"); do
            port=$((PORT_SEQ++))
            before=$(wc -l <"$RUNS")
            mig_eager "$mib" "$rep" "$port"
            port=$((PORT_SEQ++))
            mig_ours "$mib" "$rep" "$port"
            port=$((PORT_SEQ++))
            mig_ours "$mib" "$rep" "$port" store
            # A failed cycle fails the section (BENCH_STRICT also checks every run).
            grep -q '"error": "' <(tail -n +"$((before + 1))" "$RUNS") && rc=1
        done
    done
    write_shim_config native full
    MIG_END_UTC=$(date -u +%Y-%m-%dT%H:%M:%SZ)
    MIG_UPTIME_END=$(uptime)
    return $rc
}
