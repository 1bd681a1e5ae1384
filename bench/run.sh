#!/usr/bin/env bash
# DistriProc benchmark (`make bench`): containers restored through containerd
# (`ctr containers restore --live`), side by side in one run, at several memory sizes:
#
#   eager      containerd's runc shim (io.containerd.runc.v2): CRIU restores every page first
#   criu       our shim with fetcher mode `criu`: CRIU's own `criu lazy-pages` daemon
#   ours       our shim, fetcher mode `native`, fill `full`, pages from the local checkpoint
#   ours-none  our shim, fill `none` (only touched pages move): read-mostly memhog TOUCH test
#   ours-profile  our shim, fill `profile`: rep 1 records the working set (TOUCH 10 right after
#              the restore), later reps replay it (profile hit rate)
#
# and the same with the checkpoint's memory at a distriproc-pageserver (the shim's `[pageserver]`:
# Checkpoint uploads the pages and containerd's tar keeps only CRIU's metadata), the page server
# on 127.0.0.1 (loopback TCP) or inside a network namespace this script creates (veth):
#
#   criu-remote, criu-remote-veth   fetcher mode `criu`: `criu lazy-pages --page-server`
#   ours-remote, ours-remote-veth   fetcher mode `native`, fill `full`
#   ours-remote-none                fill `none` over loopback (TOUCH test: remote fault latency)
#
# plus (unless BUDGET=0) memhog and Redis restored under memory budgets of 100/75/50/25 % of their
# memory (bench/budget.sh), (unless REDIS=0) Redis from Debian's packages, hot-half GETs after a fill-none restore vs
# eager (bench/redis.sh), (unless MIGRATION=0) migration downtime: checkpoint, remove, restore
# with the runc shim and ours, first and repeated checkpoints to the page server
# (bench/migration.sh), and (unless REMOTE=0) the runtime-level remote path (bench/remote.sh,
# bench/remote/: our fetcher with pages from distriproc-pageserver over loopback and over a veth
# into a netns this script creates, also behind bench/delayproxy.py; CRIU's daemon over the veth).
# A full run takes about 17 minutes on a 2-vCPU VM (8 GiB included). Everything started is
# stopped by pid at exit (containerd and its shims, containers, page servers, proxies, the netns
# and veth); no sysctl is changed.
#
# Every run appends one JSON object to bench/out/runs.jsonl; at the end bench/out/results.json
# (machine, command, runs) and bench/out/migration.json (the same for the migration runs, kind
# "migration") are written and bench/report.py renders docs/BENCHMARKS.md and docs/bench/*.png
# from them.
#
# Environment: SIZES (MiB, default "256 1024 4096 8192"; a size is skipped with a note when memory
# or disk cannot hold it), REPS (default 5), REPS_BIG (repetitions at sizes >= 4096 MiB, default 3),
# SYSTEMS (default: all of the above), SYSTEMS_HUGE (the systems run at sizes >= 8192 MiB, default
# "eager criu ours criu-remote ours-remote"),
# PROFILE_WINDOW_MS (recording window of fill profile, default 2000), THREADS (memhog
# threads, default 2), REMOTE (1: the runtime-level remote bench too; REMOTE_SIZES default
# "256 1024", REPS_REMOTE, DELAYS_US: one-way proxy delays, default "250"),
# REDIS (1; REDIS_KEYS, REDIS_REPS), BUDGET (1; BUDGET_ONLY, BUDGET_MIB, BUDGET_PCTS, BUDGET_REPS,
# BUDGET_REDIS: the memory budget, see bench/budget.sh), MIGRATION (1; MIGRATION_ONLY, MIGRATION_SIZES,
# MIGRATION_REPS, MIGRATION_WRITE_PCT: see bench/migration.sh), CHAIN (1, 0 with MIGRATION_ONLY:
# the page server serving a deep chain of layers, pageserver/examples/chain_depth.rs; CHAIN_MIB,
# default 1024, CHAIN_DEPTH, default 25), REPORT (1: render the doc; BENCH_DOC, BENCH_PNG_DIR: where,
# default docs/BENCHMARKS.md and docs/bench), BENCH_STRICT (1: exit 1 unless every run succeeded
# with all memory correct), BENCH_OUT (default bench/out),
# DISTRIPROC_CONTAINERD_DIR (default containerd 2.1).
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
SIZES=${SIZES:-256 1024 4096 8192}
REPS=${REPS:-5}
REPS_BIG=${REPS_BIG:-3}
SYSTEMS=${SYSTEMS:-eager criu ours ours-none ours-profile criu-remote ours-remote ours-remote-none ours-remote-veth criu-remote-veth}
SYSTEMS_HUGE=${SYSTEMS_HUGE:-eager criu ours criu-remote ours-remote}
THREADS=${THREADS:-2}
REMOTE=${REMOTE:-1}
# The migration section (bench/migration.sh); MIGRATION_ONLY=1 runs nothing else and keeps the
# previous results.json (the doc is rendered from it and the new migration.json).
MIGRATION=${MIGRATION:-1}
MIGRATION_ONLY=${MIGRATION_ONLY:-0}
CHAIN=${CHAIN:-$([[ $MIGRATION_ONLY == 1 ]] && echo 0 || echo 1)}
if [[ $MIGRATION_ONLY == 1 ]]; then
    SYSTEMS="" REDIS=0 REMOTE=0 MIGRATION=1
fi
# The memory-budget section (bench/budget.sh); BUDGET_ONLY=1 runs nothing else and keeps the
# other result files.
BUDGET=${BUDGET:-1}
BUDGET_ONLY=${BUDGET_ONLY:-0}
if [[ $BUDGET_ONLY == 1 ]]; then
    SYSTEMS="" REDIS=0 REMOTE=0 MIGRATION=0 CHAIN=0 BUDGET=1
fi
REPORT=${REPORT:-1}
OUT=${BENCH_OUT:-$ROOT/bench/out}
MEMHOG=$ROOT/test-images/out/memhog
IMAGE=localhost/distriproc/memhog:latest
# BENCH_BUILD=debug: debug binaries (the test suite's smoke run; figures are not comparable).
BUILD=${BENCH_BUILD:-release}
[[ $BUILD == release || $BUILD == debug ]] || { echo "BENCH_BUILD must be release or debug" >&2; exit 2; }
export DISTRIPROC_SHIM_BIN=${DISTRIPROC_SHIM_BIN:-$ROOT/target/$BUILD/containerd-shim-distriproc-v2}
PAGESERVER_BIN=${PAGESERVER_BIN:-$ROOT/target/$BUILD/distriproc-pageserver}
export DISTRIPROC_CONTAINERD_DIR=${DISTRIPROC_CONTAINERD_DIR:-/opt/distriproc/containerd-2.1/usr/bin}
export CTD_NS=bench-$$

# shellcheck source=scripts/lib-containerd.sh
. scripts/lib-containerd.sh

log() { ctd_log "$@"; }
die() {
    log "error: $*"
    exit 1
}
now_ns() { date +%s%N; }

[[ $(id -u) == 0 ]] || die "the benchmark needs root (containerd, runc, CRIU)"
command -v criu >/dev/null || die "criu not found: run 'make deps'"
# Debian's python3 (apt's python3-matplotlib lives there), not a pyenv shim on PATH.
PY=${PY:-/usr/bin/python3}
[[ -x $PY ]] || die "$PY not found (apt-get install python3)"

# Idempotent installs: matplotlib for the plots (Debian package).
if ! "$PY" -c 'import matplotlib' 2>/dev/null; then
    log "installing python3-matplotlib (apt)"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q python3-matplotlib >/dev/null ||
        { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q python3-matplotlib >/dev/null; } ||
        die "apt-get install python3-matplotlib failed"
fi

log "building the shim and the page server ($BUILD)"
BUILD_NOTE="$BUILD build of the working tree at $(git rev-parse --short HEAD)"
build_flag=()
[[ $BUILD == release ]] && build_flag=(--release)
if ! cargo build -q "${build_flag[@]}" -p containerd-shim-distriproc-v2 -p distriproc-pageserver; then
    # Figures of binaries that are not the tree's would be reported as the tree's: only with
    # DISTRIPROC_BENCH_ALLOW_STALE=1 (then the results' "build" says so).
    [[ ${DISTRIPROC_BENCH_ALLOW_STALE:-0} == 1 ]] ||
        die "cargo build failed (DISTRIPROC_BENCH_ALLOW_STALE=1 benchmarks the existing target/$BUILD binaries instead)"
    [[ -x $DISTRIPROC_SHIM_BIN && -x $PAGESERVER_BIN ]] ||
        die "cargo build failed and there are no earlier binaries in target/$BUILD"
    BUILD_NOTE="cargo build failed; used the existing target/$BUILD binaries (shim built $(date -u -r "$DISTRIPROC_SHIM_BIN" +%H:%MZ))"
    log "warning: $BUILD_NOTE"
fi
if [[ ! -x $MEMHOG || ! -f test-images/out/memhog.oci.tar ]]; then
    make -s -C test-images >/dev/null || die "building test images failed (make -C test-images)"
fi

mkdir -p "$OUT"
RUNS=$OUT/runs.jsonl
: >"$RUNS"
WORK=$(mktemp -d /tmp/dpbench.XXXXXX)
SHIM_CFG=$WORK/shim.toml
export DISTRIPROC_CONFIG=$SHIM_CFG
printf '[fetcher]\nmode = "native"\nfill = "full"\n[store]\ndir = "%s"\n' "$WORK/store" >"$SHIM_CFG"
START_UTC=$(date -u +%Y-%m-%dT%H:%M:%SZ)
UPTIME_START=$(uptime)
PORT_SEQ=17000
PROFILE_WINDOW_MS=${PROFILE_WINDOW_MS:-2000}
mkdir -p "$WORK/profiles"
QPID=
REMOTE_STATUS=skipped

cleanup() {
    local rc=$?
    [[ -n $QPID ]] && kill "$QPID" 2>/dev/null || true
    if [[ -n ${CTD_DIR:-} && -f ${CTD_LOG:-} ]]; then
        cp "$CTD_LOG" "$OUT/containerd.log" 2>/dev/null || true
    fi
    ctd_stop || true
    if declare -F stop_pageservers >/dev/null; then stop_pageservers || true; fi
    if declare -F remote_cleanup >/dev/null; then remote_cleanup || true; fi
    rm -rf "$WORK"
    exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# write_shim_config MODE FILL [PAGESERVER-ADDRESS]: the shim reads it at each container's Create
# (run or restore) and keeps it for that container's Checkpoint.
write_shim_config() {
    {
        printf '[fetcher]\nmode = "%s"\nfill = "%s"\nprofile_dir = "%s"\nprofile_window_ms = %s\n' \
            "$1" "$2" "$WORK/profiles" "$PROFILE_WINDOW_MS"
        # FETCHER_EXTRA: more [fetcher] lines (the Redis runs set their fault-around window).
        [[ -z ${FETCHER_EXTRA:-} ]] || printf '%s\n' "$FETCHER_EXTRA"
        # The node-local store (the default without a page server) lives in the run's directory.
        printf '[store]\ndir = "%s"\n' "$WORK/store"
        if [[ -n ${3:-} ]]; then
            printf '[pageserver]\naddress = "%s"\ntoken_file = "%s"\n' "$3" "$WORK/ps-token"
        fi
    } >"$SHIM_CFG"
}

# Page servers for the containerd remote systems, one store: 127.0.0.1 (loopback TCP) and, when a
# *-veth system runs, inside the netns of bench/remote.sh's remote_netns (reached over a veth).
PS_LO=
PS_VETH=
PS_PIDS=()
start_pageservers() {
    local ps=$PAGESERVER_BIN port=$((17500 + $$ % 400))
    mkdir -p "$WORK/ps-store"
    printf 'distriproc-bench-%s\n' "$$" >"$WORK/ps-token"
    "$ps" --store "$WORK/ps-store" --listen "127.0.0.1:$port" --token-file "$WORK/ps-token" \
        --no-access-log >"$OUT/pageserver-lo.log" 2>&1 &
    PS_PIDS+=($!)
    wait_listen 127.0.0.1 "$port" || die "page server on 127.0.0.1:$port did not listen ($OUT/pageserver-lo.log)"
    PS_LO=127.0.0.1:$port
    if [[ " $SYSTEMS " == *-veth* ]]; then
        remote_netns || die "creating netns $R_NS / veth failed"
        ip netns exec "$R_NS" "$ps" --store "$WORK/ps-store" --listen "$R_NS_IP:7061" \
            --token-file "$WORK/ps-token" --no-access-log >"$OUT/pageserver-veth.log" 2>&1 &
        PS_PIDS+=($!)
        wait_listen "$R_NS_IP" 7061 || die "page server on $R_NS_IP:7061 did not listen ($OUT/pageserver-veth.log)"
        PS_VETH=$R_NS_IP:7061
    fi
    log "page servers: loopback ${PS_LO}, veth ${PS_VETH:-none} (connect RTT medians: loopback $(rtt_us 127.0.0.1 "$port") us${PS_VETH:+, veth $(rtt_us "$R_NS_IP" 7061) us})"
}
stop_pageservers() {
    local p
    for p in "${PS_PIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
    for p in "${PS_PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
    PS_PIDS=()
}

# size_fits MIB: memory and disk for a memhog of MIB MiB, its checkpoint (dump dir, content-store
# blob, containerd's unpack) and a restore; prints why not and fails otherwise.
size_fits() {
    local mib=$1 avail_kb disk_kb
    avail_kb=$(awk '/MemAvailable/ {print $2}' /proc/meminfo)
    disk_kb=$(df -Pk /tmp | awk 'NR == 2 {print $4}')
    if ((avail_kb < (mib * 2 + 2048) * 1024)); then
        echo "MemAvailable $((avail_kb / 1024)) MiB < 2 x $mib MiB + 2 GiB"
        return 1
    fi
    if ((disk_kb < (mib * 3 + 4096) * 1024)); then
        echo "free disk under /tmp $((disk_kb / 1024)) MiB < 3 x $mib MiB + 4 GiB"
        return 1
    fi
}

task_pid() { ctd_t 30 tasks ls | awk -v id="$1" '$1 == id {print $2}'; }
task_status() { ctd_t 30 tasks ls | awk -v id="$1" '$1 == id {print $3}'; }
q() { # q PORT TIMEOUT_MS CMD... (host network: the container listens on the host's ports)
    local port=$1 t=$2
    shift 2
    "$MEMHOG" query --port "$port" --timeout-ms "$t" "$@" 2>/dev/null
}
# touch_us PORT PCT: microseconds memhog takes to read PCT % of its pages (TOUCH); fails with it.
touch_us() {
    local a b
    a=$(now_ns)
    q "$1" 600000 TOUCH "$2" >/dev/null || return 1
    b=$(now_ns)
    echo $(((b - a) / 1000))
}
bundle_of() { echo "$CTD_STATE/io.containerd.runtime.v2.task/$CTD_NS/$1"; }
# Figures from a `criu lazy-pages -v4` log as JSON: end_s (last line, seconds since the daemon
# started), first_pid_s ("Received PID"), faults, and the daemon-side fault service time per
# "#PF at ADDR" up to the "uffd_copy: ADDR/" that resolves it (us; log-timestamp resolution).
criu_log_json() {
    "$PY" - "$1" <<'EOF'
import json, re, sys
ts = re.compile(r"\(\s*([0-9]+\.[0-9]+)\)\s*(.*)")
pf = re.compile(r"#PF at (0x[0-9a-f]+)")
cp = re.compile(r"uffd_copy: (0x[0-9a-f]+)/")
end = first = None
pending, lat = {}, []
try:
    for line in open(sys.argv[1], errors="replace"):
        m = ts.match(line)
        if not m:
            continue
        t, rest = float(m.group(1)), m.group(2)
        end = t
        if first is None and "Received PID" in rest:
            first = t
        a = pf.search(rest)
        if a:
            pending[int(a.group(1), 16) & ~0xFFF] = t
            continue
        a = cp.search(rest)
        if a:
            k = int(a.group(1), 16)
            if k in pending:
                lat.append((t - pending.pop(k)) * 1e6)
except OSError:
    pass
lat.sort()
q = lambda p: round(lat[min(len(lat) - 1, int(p * len(lat)))], 1) if lat else None
print(json.dumps({"end_s": end, "first_pid_s": first, "faults": len(lat),
                  "fault_latency_us": {"p50": q(0.5), "p99": q(0.99), "p999": q(0.999),
                                       "max": round(lat[-1], 1) if lat else None}}))
EOF
}

remove_container() {
    local id=$1
    ctd_t 60 tasks kill -s SIGKILL "$id" >/dev/null 2>&1 || true
    for _ in $(seq 1 100); do
        local s
        s=$(task_status "$id")
        [[ $s == STOPPED || -z $s ]] && break
        sleep 0.1
    done
    ctd_t 60 tasks rm -f "$id" >/dev/null 2>&1 || true
    ctd_t 60 containers rm "$id" >/dev/null 2>&1 || true
    # containerd leaves the checkpoint it unpacked for a restore behind (the runc shim does not
    # remove it; ours does once its fill is done): whole copies of memory in our private temp dir.
    rm -rf "${CTD_DIR:?}"/tmp/ctrd-checkpoint* 2>/dev/null || true
}

# memhog_run RUNTIME MIB PORT ID: memhog in a new container ID under RUNTIME on the host network,
# answering on PORT once all its memory is filled. Prints its EXPECT reply; fails with a logged
# reason otherwise.
memhog_run() {
    local runtime=$1 mib=$2 port=$3 id=$4
    ctd_t 120 run -d --net-host --runtime "$runtime" "$IMAGE" "$id" /memhog serve --mib "$mib" \
        --threads "$THREADS" --port "$port" >/dev/null || { log "error: ctr run $id ($runtime, $mib MiB) failed"; return 1; }
    q "$port" 600000 PING >/dev/null || { log "error: memhog ($id) did not answer PING after start"; return 1; }
    q "$port" 600000 EXPECT || { log "error: memhog ($id) EXPECT failed"; return 1; }
}

# checkpoint RUNTIME MIB PORT REF: run memhog with RUNTIME on the host network, checkpoint it
# into image REF, remove the container. Prints "EXPECT-reply<TAB>checkpoint-seconds".
checkpoint() {
    local runtime=$1 mib=$2 port=$3 ref=$4 id=ck-$RANDOM expect t0 t1
    expect=$(memhog_run "$runtime" "$mib" "$port" "$id") || die "memhog under $runtime did not start"
    t0=$(now_ns)
    ctd_t 900 containers checkpoint --task "$id" "$ref" >/dev/null ||
        die "ctr containers checkpoint --task $id $ref failed (see $CTD_LOG)"
    t1=$(now_ns)
    remove_container "$id"
    printf '%s\t%s\n' "$expect" "$(awk -v a="$t0" -v b="$t1" 'BEGIN {printf "%.3f", (b - a) / 1e9}')"
}

# timed_restore ID REF PORT: `ctr containers restore --live ID REF` with a PING probe that starts
# just before the restore command and retries every 1 ms. Sets TR_T0 and TR_T1 (the restore
# command's start and end, epoch ns; the probe started at TR_T0), TR_TTFR_US (probe start to the
# first PONG, empty without one) and TR_ERR (empty on success).
TR_T0='' TR_T1='' TR_TTFR_US='' TR_ERR=''
timed_restore() {
    local id=$1 ref=$2 port=$3 qout=$WORK/q.out rc=0
    TR_ERR=
    rm -f "$qout"
    "$MEMHOG" query --port "$port" --timeout-ms 600000 --time-to-first-response PING >"$qout" 2>/dev/null &
    QPID=$!
    TR_T0=$(now_ns)
    ctd_t 900 containers restore --live "$id" "$ref" </dev/null >"$WORK/restore.out" 2>&1 || rc=$?
    TR_T1=$(now_ns)
    if [[ $rc != 0 ]]; then
        TR_ERR="ctr containers restore failed: $(tail -c 300 "$WORK/restore.out" | tr '\n"' ' _')"
        kill "$QPID" 2>/dev/null || true
    fi
    wait "$QPID" || true
    QPID=
    TR_TTFR_US=$(awk -F= '/^ttfr_us=/ {print $2}' "$qout" 2>/dev/null || true)
    [[ -z $TR_ERR && -z $TR_TTFR_US ]] && TR_ERR="no PONG within 600 s"
    return 0
}

# restore_run SYSTEM MIB REP REF PORT EXPECT CKPT_S: one restore + measurements, one JSON line.
restore_run() {
    local sys=$1 mib=$2 rep=$3 ref=$4 port=$5 expect=$6 ckpt_s=$7
    local id=r-$sys-$mib-$rep mode=native fill=full ps=""
    case $sys in
    criu*) mode=criu ;;
    *-none) fill=none ;;
    ours-profile) fill=profile ;;
    esac
    case $sys in
    *-remote-veth) ps=$PS_VETH ;;
    *-remote | *-remote-none) ps=$PS_LO ;;
    esac
    write_shim_config "$mode" "$fill" "$ps"
    sync
    local t0 t1 tc ttfr_us err
    timed_restore "$id" "$ref" "$port"
    t0=$TR_T0 t1=$TR_T1 ttfr_us=$TR_TTFR_US err=$TR_ERR
    tc=$(ctd_shim_connect_ns "$id")

    local bundle stats="$WORK/stats.json" criu_json="null" criu_log="" touch_cold="" touch_warm=""
    local sum="" sum_ok=false sum_s="" waited=0 touch_local=""
    bundle=$(bundle_of "$id")
    rm -f "$stats"
    if [[ -z $err && $sys != eager ]]; then
        if [[ $sys == *-none ]]; then
            # Read-mostly: TOUCH 50% of the pages with the rest remote, then again (all local).
            touch_cold=$(touch_us "$port" 50) || err="TOUCH 50 failed"
            touch_warm=$(touch_us "$port" 50) || err="TOUCH 50 failed"
            # Stats before SUM reads everything: what the read-mostly passes moved (the shim
            # rewrites the file every second).
            sleep 1.2
            cp "$bundle/distriproc-lazy-stats.json" "$stats" 2>/dev/null || true
        else
            if [[ $sys == ours-profile ]]; then
                # The working set: the first 10% of the pages, read right after the restore
                # (recorded by the first restore of this checkpoint, replayed by later ones).
                touch_cold=$(touch_us "$port" 10) || err="TOUCH 10 failed"
            fi
            # Wait for the fill to finish (the shim rewrites the stats file every second).
            while ((waited < 6000)); do
                if [[ $sys == criu* ]]; then
                    [[ $(json_field "$bundle/distriproc-lazy-stats.json" finished) == True ]] && break
                else
                    [[ -n $(json_field "$bundle/distriproc-lazy-stats.json" fill_complete_us) ]] && break
                fi
                sleep 0.1
                waited=$((waited + 1))
            done
            ((waited < 6000)) || err="fill did not complete within 600 s"
            # A recording restore writes its profile when the recording window closes.
            if [[ $sys == ours-profile ]]; then
                for _ in $(seq 1 $((PROFILE_WINDOW_MS / 100 + 50))); do
                    compgen -G "$WORK/profiles/*.profile" >/dev/null && break
                    sleep 0.1
                done
            fi
        fi
        if [[ $sys == criu* ]]; then
            # <bundle>/work is a symlink to containerd's per-task work dir.
            criu_log=$bundle/work/lazy-pages.log
            if [[ -f $criu_log ]]; then
                criu_json=$(criu_log_json "$criu_log")
                cp "$criu_log" "$OUT/last-criu-lazy-pages.log" 2>/dev/null || true
            fi
        fi
    fi
    if [[ -z $err ]]; then
        local a b
        a=$(now_ns)
        sum=$(q "$port" 600000 SUM) || err="SUM failed"
        b=$(now_ns)
        sum_s=$(awk -v a="$a" -v b="$b" 'BEGIN {printf "%.3f", (b - a) / 1e9}')
        [[ $sum == "$expect" ]] && sum_ok=true
        # The read-mostly pass with all memory local (the baseline of the fill-none figures).
        touch_local=$(touch_us "$port" 50) || err="TOUCH 50 failed"
    fi
    if [[ $sys != eager && $sys != *-none ]]; then
        cp "$bundle/distriproc-lazy-stats.json" "$stats" 2>/dev/null || true
    fi
    remove_container "$id"

    # The values go to Python as environment variables (R_*), never as generated code.
    R_SYS=$sys R_MIB=$mib R_REP=$rep R_MODE=$mode R_FILL=$fill R_PS=$ps R_CKPT_S=$ckpt_s \
        R_T0=$t0 R_T1=$t1 R_TC=${tc:-0} R_TTFR_US=$ttfr_us R_SUM_S=$sum_s R_SUM_OK=$sum_ok \
        R_SUM=$sum R_EXPECT=$expect R_TOUCH_COLD=$touch_cold R_TOUCH_WARM=$touch_warm \
        R_TOUCH_LOCAL=$touch_local R_CRIU_JSON=$criu_json R_ERR=$err \
        "$PY" - "$RUNS" "$stats" <<'EOF'
import json, os, sys
e = os.environ
def num(k):
    try:
        return float(e.get(k, ""))
    except (TypeError, ValueError):
        return None
def whole(k):
    try:
        return int(e.get(k, "") or 0)
    except ValueError:
        return 0
sysname = e.get("R_SYS", "")
ps = e.get("R_PS", "")
t0, t1, tc = whole("R_T0"), whole("R_T1"), whole("R_TC")
ttfr = num("R_TTFR_US")
run = {
    "kind": "containerd", "system": sysname, "mib": whole("R_MIB"), "rep": whole("R_REP"),
    "fetcher_mode": e.get("R_MODE", ""), "fill": e.get("R_FILL", ""),
    "pageserver": ps or None,
    "pageserver_path": "veth" if sysname.endswith("-veth") else ("loopback" if ps else None),
    "checkpoint_s": num("R_CKPT_S"),
    "restore_cmd_s": (t1 - t0) / 1e9,
    "ttfr_s": None if ttfr is None else ttfr / 1e6,
    "unpack_s": (tc - t0) / 1e9 if tc else None,
    "sum_s": num("R_SUM_S"),
    "sum_ok": e.get("R_SUM_OK") == "true",
    "sum": e.get("R_SUM", ""), "expect": e.get("R_EXPECT", ""),
    "touch50_cold_us": num("R_TOUCH_COLD") if sysname.endswith("-none") else None,
    "touch50_warm_us": num("R_TOUCH_WARM"),
    "touch10_us": num("R_TOUCH_COLD") if sysname == "ours-profile" else None,
    "touch50_local_us": num("R_TOUCH_LOCAL"),
    "criu_log": json.loads(e.get("R_CRIU_JSON") or "null"),
    "error": e.get("R_ERR") or None,
}
if run["unpack_s"] is not None and run["ttfr_s"] is not None:
    run["shim_ttfr_s"] = run["ttfr_s"] - run["unpack_s"]
try:
    run["stats"] = json.load(open(sys.argv[2]))
except Exception:
    run["stats"] = None
with open(sys.argv[1], "a") as f:
    f.write(json.dumps(run) + "\n")
EOF
    local shown=${ttfr_us:-?}
    log "[$sys $mib MiB #$rep] ttfr ${shown} us, restore cmd $(((t1 - t0) / 1000000)) ms, SUM ok: $sum_ok${err:+, error: $err}"
}

reps_for() { if (($1 >= 4096)); then echo "$REPS_BIG"; else echo "$REPS"; fi; }
# has SYSTEM [MIB]: SYSTEM runs (at MIB: sizes >= 8192 MiB run SYSTEMS_HUGE only).
has() {
    [[ " $SYSTEMS " == *" $1 "* ]] || return 1
    [[ -z ${2:-} ]] || (($2 < 8192)) || [[ " $SYSTEMS_HUGE " == *" $1 "* ]]
}

# bench/remote.sh: the netns/veth helpers (remote_netns, rtt_us, wait_listen) and, at the end,
# the runtime-level remote bench.
# shellcheck source=bench/remote.sh
. bench/remote.sh
# bench/migration.sh: checkpoint, move, restore (migration_bench, run below unless MIGRATION=0).
# shellcheck source=bench/migration.sh
. bench/migration.sh

# bench_group NAME MIB REPS RUNTIME PAGESERVER SYSTEM...: one memhog checkpoint (under RUNTIME,
# published to PAGESERVER when set), restored REPS times by each SYSTEM in turn; nothing
# without systems.
bench_group() {
    local name=$1 mib=$2 n=$3 runtime=$4 ps=$5 port ref expect ck rep s
    shift 5
    (($#)) || return 0
    port=$((PORT_SEQ++))
    ref=localhost/bench/$name-$mib:1
    write_shim_config native full "$ps"
    log "[$name $mib MiB] checkpointing memhog under $runtime${ps:+ to the page server $ps}"
    IFS=$'\t' read -r expect ck < <(checkpoint "$runtime" "$mib" "$port" "$ref")
    log "[$name $mib MiB] checkpoint in containerd: $(ctd_t 60 images ls | awk -v r="$ref" '$1 == r {print $4, $5}')"
    for rep in $(seq 1 "$n"); do
        for s in "$@"; do
            restore_run "$s" "$mib" "$rep" "$ref" "$port" "$expect" "$ck"
        done
    done
    ctd_t 120 images rm --sync "$ref" >/dev/null 2>&1 || true
}

# write_results FILE SELECT: FILE = {"meta": machine, command, load; "runs": the runs of $RUNS
# SELECT keeps}: "migration" keeps the migration runs (bench/migration.sh; their own start, end
# and load), "restore" every other run.
write_results() {
    local up_start=$UPTIME_START up_end=$UPTIME_END started=$START_UTC finished=""
    if [[ $2 == migration ]]; then
        up_start=$MIG_UPTIME_START up_end=$MIG_UPTIME_END started=$MIG_START_UTC finished=$MIG_END_UTC
    fi
    # The values go to Python as environment variables (W_*), never as generated code.
    W_SIZES=$SIZES W_REPS=$REPS W_REPS_BIG=$REPS_BIG W_THREADS=$THREADS W_STARTED=$started \
        W_FINISHED=$finished W_UP_START=$up_start W_UP_END=$up_end W_CTD=$CTD_VERSION \
        W_REMOTE_STATUS=$REMOTE_STATUS W_BUILD=$BUILD_NOTE W_REDIS_STATUS=$REDIS_STATUS \
        W_BUDGET_STATUS=$BUDGET_STATUS \
        W_SYSTEMS=$SYSTEMS W_SYSTEMS_HUGE=$SYSTEMS_HUGE W_REMOTE_SIZES=${REMOTE_SIZES:-} \
        W_SKIPPED=$(printf '%s\n' "${SKIPPED_SIZES[@]}") W_MIG_SIZES=$MIGRATION_SIZES \
        W_MIG_REPS=$MIGRATION_REPS W_WRITE_PCT=$MIGRATION_WRITE_PCT \
        W_MIG_STATUS=$MIGRATION_STATUS W_MIG_SKIPPED=$(printf '%s\n' "${MIG_SKIPPED[@]}") \
        "$PY" - "$RUNS" "$1" "$2" <<'EOF'
import json, os, platform, subprocess, sys
e = os.environ
def sh(c):
    try:
        return subprocess.run(c, shell=True, capture_output=True, text=True).stdout.strip()
    except Exception:
        return ""
def ints(k):
    return [int(s) for s in e.get(k, "").split()]
def lines(k):
    return [x for x in e.get(k, "").splitlines() if x]
select = sys.argv[3]
runs = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
def section(r):
    return "migration" if r["kind"] == "migration" else "budget" if r["kind"].startswith("budget-") else "restore"
runs = [r for r in runs if section(r) == select]
keys = ("SIZES", "REPS", "REPS_BIG", "SYSTEMS", "SYSTEMS_HUGE", "REMOTE_SIZES", "MIGRATION",
        "MIGRATION_ONLY", "MIGRATION_SIZES", "MIGRATION_REPS", "MIGRATION_WRITE_PCT", "BUDGET",
        "BUDGET_ONLY", "BUDGET_MIB", "BUDGET_PCTS", "BUDGET_HOT_PCT", "BUDGET_PASSES", "BUDGET_REPS",
        "BUDGET_REDIS", "REDIS_KEYS")
meta = {
    "command": "make bench" + "".join(f" {k}={os.environ[k]!r}" for k in keys if k in os.environ),
    "sizes_mib": ints("W_SIZES"),
    "reps": int(e["W_REPS"]), "reps_big": int(e["W_REPS_BIG"]), "threads": int(e["W_THREADS"]),
    "started_utc": e.get("W_STARTED", ""),
    "finished_utc": e.get("W_FINISHED") or sh("date -u +%Y-%m-%dT%H:%M:%SZ"),
    "uptime_start": e.get("W_UP_START", ""), "uptime_end": e.get("W_UP_END", ""),
    "nproc": sh("nproc"),
    "cpu_model": sh("awk -F': ' '/model name/ {print $2; exit}' /proc/cpuinfo"),
    "kernel": platform.release(),
    "mem_total": sh("awk '/MemTotal/ {print $2 \" kB\"}' /proc/meminfo"),
    "containerd": e.get("W_CTD", ""),
    "runc": sh("runc --version | head -n 1"),
    "criu": sh("criu --version | head -n 1"),
    "git_head": sh("git rev-parse --short HEAD"),
    "remote_status": e.get("W_REMOTE_STATUS", ""),
    "build": e.get("W_BUILD", ""),
    "redis_status": e.get("W_REDIS_STATUS", ""),
    "budget_status": e.get("W_BUDGET_STATUS", ""),
    "systems": e.get("W_SYSTEMS", "").split(), "systems_huge": e.get("W_SYSTEMS_HUGE", "").split(),
    "remote_sizes_mib": ints("W_REMOTE_SIZES"),
    "skipped_sizes": lines("W_SKIPPED"),
}
if select == "migration":
    meta.update({
        "migration_sizes_mib": ints("W_MIG_SIZES"),
        "migration_reps": int(e["W_MIG_REPS"]), "write_pct": int(e["W_WRITE_PCT"]),
        "migration_status": e.get("W_MIG_STATUS", ""),
        "skipped_sizes": lines("W_MIG_SKIPPED"),
    })
json.dump({"meta": meta, "runs": runs}, open(sys.argv[2], "w"), indent=1)
print(f"wrote {sys.argv[2]} ({len(runs)} runs)")
EOF
}

ctd_start
log "importing test images"
ctd_t 120 images import test-images/out/memhog.oci.tar >/dev/null
if [[ $SYSTEMS == *-remote* || $MIGRATION == 1 ]]; then
    start_pageservers
fi
SKIPPED_SIZES=()

for mib in $SIZES; do
    [[ -n $SYSTEMS ]] || break
    n=$(reps_for "$mib")
    if ! why=$(size_fits "$mib"); then
        log "[$mib MiB] skipped: $why"
        SKIPPED_SIZES+=("$mib MiB: $why")
        continue
    fi
    eager=()
    has eager "$mib" && eager=(eager)
    bench_group eager "$mib" "$n" io.containerd.runc.v2 "" "${eager[@]}"
    lazy=()
    for s in criu ours ours-none ours-profile; do has "$s" "$mib" && lazy+=("$s"); done
    bench_group lazy "$mib" "$n" io.containerd.distriproc.v2 "" "${lazy[@]}"
    remote=()
    for s in criu-remote ours-remote ours-remote-none ours-remote-veth criu-remote-veth; do
        has "$s" "$mib" && remote+=("$s")
    done
    # The shim uploads the pages to the page server and strips them from the checkpoint.
    bench_group remote "$mib" "$n" io.containerd.distriproc.v2 "$PS_LO" "${remote[@]}"
    rm -rf "${WORK:?}/ps-store/"*
done
MIGRATION_STATUS=skipped
if [[ $MIGRATION == 1 ]]; then
    if migration_bench; then MIGRATION_STATUS=ran; else MIGRATION_STATUS="failed (see log)"; fi
fi
write_shim_config native full
REDIS_STATUS=skipped
if [[ ${REDIS:-1} == 1 ]]; then
    # shellcheck source=bench/redis.sh
    . bench/redis.sh
    if redis_bench; then REDIS_STATUS=ran; else REDIS_STATUS="failed (see log)"; fi
fi
BUDGET_STATUS=skipped
if [[ $BUDGET == 1 ]]; then
    # shellcheck source=bench/budget.sh
    . bench/budget.sh
    if budget_bench; then BUDGET_STATUS=ran; else BUDGET_STATUS="failed (see log)"; fi
fi
stop_pageservers
cp "$CTD_LOG" "$OUT/containerd.log" 2>/dev/null || true
ctd_stop

if [[ $REMOTE == 1 ]]; then
    if remote_bench; then REMOTE_STATUS=ran; else REMOTE_STATUS="failed (see log)"; fi
fi

# The page server alone: a deep chain of layers vs its base and vs the chain after gc.
CHAIN_STATUS=skipped
if [[ $CHAIN == 1 ]]; then
    chain_args=(--mib "${CHAIN_MIB:-1024}" --depth "${CHAIN_DEPTH:-25}")
    chain_start=$(date -u +%Y-%m-%dT%H:%M:%SZ)
    log "chain depth: ${chain_args[*]}"
    profile=(--release)
    [[ $BUILD == release ]] || profile=()
    if "${CARGO:-cargo}" run -q "${profile[@]}" -p distriproc-pageserver --example chain_depth -- \
        "${chain_args[@]}" --json "$OUT/chain_depth.json" >"$WORK/chain_depth.txt" \
        2>>"$WORK/chain_depth.log"; then
        CHAIN_STATUS=ran
        "$PY" - "$OUT/chain_depth.json" "$chain_start" "$(date -u +%Y-%m-%dT%H:%M:%SZ)" \
            "cargo run --release -p distriproc-pageserver --example chain_depth -- ${chain_args[*]}" <<'CHAINEOF'
import json, subprocess, sys
d = json.load(open(sys.argv[1]))
sh = lambda c: subprocess.run(c, shell=True, capture_output=True, text=True).stdout.strip()
d["meta"] = {"started_utc": sys.argv[2], "finished_utc": sys.argv[3], "command": sys.argv[4],
             "git_head": sh("git rev-parse --short HEAD"), "uptime": sh("uptime")}
json.dump(d, open(sys.argv[1], "w"), indent=1)
CHAINEOF
        cat "$WORK/chain_depth.txt"
    else
        CHAIN_STATUS="failed (see $WORK/chain_depth.log)"
        log "chain depth failed: $(tail -n 3 "$WORK/chain_depth.log")"
    fi
fi

UPTIME_END=$(uptime)
# A migration-only or budget-only run leaves results.json (the last full run) as it is.
RESULT_FILES=()
if [[ $MIGRATION_ONLY != 1 && $BUDGET_ONLY != 1 ]]; then
    write_results "$OUT/results.json" restore
    RESULT_FILES+=("$OUT/results.json")
fi
if [[ $MIGRATION == 1 ]]; then
    write_results "$OUT/migration.json" migration
    RESULT_FILES+=("$OUT/migration.json")
fi
if [[ $BUDGET == 1 ]]; then
    write_results "$OUT/budget.json" budget
    RESULT_FILES+=("$OUT/budget.json")
fi
if [[ $REPORT == 1 ]]; then
    # One document from both files: results.json (the restore sections) and migration.json.
    "$PY" bench/report.py "$OUT/results.json" --migration "$OUT/migration.json" \
        --chain "$OUT/chain_depth.json" --budget "$OUT/budget.json" --doc "${BENCH_DOC:-docs/BENCHMARKS.md}" --png-dir "${BENCH_PNG_DIR:-docs/bench}"
fi
if [[ ${BENCH_STRICT:-0} == 1 && $CHAIN_STATUS != ran && $CHAIN_STATUS != skipped ]]; then
    echo "bench: chain depth $CHAIN_STATUS" >&2
    exit 1
fi
if [[ ${BENCH_STRICT:-0} == 1 ]]; then
    # Every run must have succeeded with all memory correct (the test suite's smoke run).
    "$PY" - "${RESULT_FILES[@]}" <<'EOF'
import json, sys
runs = [r for f in sys.argv[1:] for r in json.load(open(f))["runs"]]
bad = [r for r in runs if r.get("error") or not r.get("sum_ok", r.get("digest_ok"))]
for r in bad:
    print(f"FAILED: {r['kind']} {r['system']} {r['mib']} MiB #{r['rep']}: {r.get('error') or 'SUM != EXPECT'}")
if not runs or bad:
    sys.exit(f"bench: {len(bad)} of {len(runs)} runs failed")
print(f"bench: all {len(runs)} runs correct")
EOF
fi
