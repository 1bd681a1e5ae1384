#!/usr/bin/env bash
# DistriProc demo: checkpoint and lazy restore through our shim, twice: with the embedded default
# (the checkpoint's memory stays in the node-local page store, served in-process by the shim's
# fetcher; no daemon) and with a local distriproc-pageserver holding it; next to the runc shim's
# checkpoint and eager restore of the same container, on a private containerd. Prints a small
# comparison table (checkpoint and restore times, what containerd stores, memory checks).
#
#   scripts/demo.sh                 1 GiB memhog (make demo runs this after deps + build)
#   MIB=4096 scripts/demo.sh        another size
#
# Environment: MIB (default 1024), PROCS (1), THREADS (2), DISTRIPROC_SHIM_BIN (default
# target/release/containerd-shim-distriproc-v2), DISTRIPROC_CONTAINERD_DIR (default
# /opt/distriproc/containerd/usr/bin = 2.1), ONLY=lazy|eager|remote (run one case),
# REMOTE=0 (leaves out the remote case: a checkpoint published to a local distriproc-pageserver
# on a unix socket, whose tar in containerd carries no page data; PAGESERVER_BIN overrides the
# binary).
# The containerd log (with the shim's lines) is copied to /tmp/distriproc-demo-containerd.log.
#
# Everything it starts (containerd, shims, containers) is stopped by pid at exit and its temp
# dir under /tmp is removed.
set -euo pipefail

cd "$(dirname "$0")/.."
MIB=${MIB:-1024}
PROCS=${PROCS:-1}
THREADS=${THREADS:-2}
ONLY=${ONLY:-}
PORT=7070
export DISTRIPROC_SHIM_BIN=${DISTRIPROC_SHIM_BIN:-$PWD/target/release/containerd-shim-distriproc-v2}
export CTD_NS=demo-$$
MEMHOG=$PWD/test-images/out/memhog
IMAGE=localhost/distriproc/memhog:latest
STATS_PREFIX=/tmp/distriproc-demo-stats
rm -f "$STATS_PREFIX"-*.json
REMOTE=${REMOTE:-1}
PAGESERVER_BIN=${PAGESERVER_BIN:-$PWD/target/release/distriproc-pageserver}

# shellcheck source=scripts/lib-containerd.sh
. scripts/lib-containerd.sh

die() {
    ctd_log "error: $*"
    exit 1
}
now_ns() { date +%s%N; }
secs() { awk -v a="$1" -v b="$2" 'BEGIN {printf "%.3f", (b - a) / 1e9}'; }

[[ $(id -u) == 0 ]] || die "the demo needs root (containerd, runc, CRIU)"
if [[ $ONLY != eager && ! -x $DISTRIPROC_SHIM_BIN ]]; then
    die "shim binary $DISTRIPROC_SHIM_BIN not found: run 'make build' (or ONLY=eager)"
fi
[[ -x $DISTRIPROC_SHIM_BIN ]] || unset DISTRIPROC_SHIM_BIN
if [[ ! -x $MEMHOG || ! -f test-images/out/memhog.oci.tar ]]; then
    make -s -C test-images >/dev/null || die "building test images failed (make -C test-images)"
fi
command -v criu >/dev/null || die "criu not found: run 'make deps'"
command -v python3 >/dev/null || die "python3 not found: run 'make deps'"

DEMO_DIR=$(mktemp -d /tmp/dpdemo.XXXXXX)
PS_PID=
# The shim reads this file at each container's Create (DISTRIPROC_CONFIG reaches it
# through containerd's environment); each case writes what it needs before it runs.
export DISTRIPROC_CONFIG=$DEMO_DIR/shim.toml
# The embedded default: checkpoints keep their memory in a node-local store (here the demo's).
local_config() { printf '[store]\ndir = "%s"\n' "$DEMO_DIR/local-store" >"$DISTRIPROC_CONFIG"; }
local_config

cleanup() {
    local rc=$?
    if [[ -n $PS_PID ]]; then
        kill -TERM "$PS_PID" 2>/dev/null || true
        wait "$PS_PID" 2>/dev/null || true
    fi
    if [[ -n ${CTD_DIR:-} && -f ${CTD_LOG:-} ]]; then
        cp "$CTD_LOG" /tmp/distriproc-demo-containerd.log 2>/dev/null || true
    fi
    ctd_stop
    rm -rf "$DEMO_DIR"
    exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ctr with a timeout (seconds) so a hung call cannot hang the demo.
ctr_t() { ctd_t "$@"; }
task_pid() { ctr_t 30 tasks ls | awk -v id="$1" '$1 == id {print $2}'; }
task_status() { ctr_t 30 tasks ls | awk -v id="$1" '$1 == id {print $3}'; }
query() { # query PID TIMEOUT_MS CMD...
    local pid=$1 t=$2
    shift 2
    "$MEMHOG" query --pid "$pid" --port "$PORT" --timeout-ms "$t" "$@" 2>/dev/null
}
stats_file() { echo "$CTD_STATE/io.containerd.runtime.v2.task/$CTD_NS/$1/distriproc-lazy-stats.json"; }
declare -A R

# run_case LABEL RUNTIME: run memhog, checkpoint it, remove it, restore it, measure.
run_case() {
    local label=$1 runtime=$2 id="memhog-$1" ref="localhost/distriproc/checkpoint-$1:demo"
    local pid t0 t1 t2 reply expect

    ctd_log "[$label] starting memhog ($MIB MiB, $PROCS procs x $THREADS threads) with runtime $runtime"
    ctr_t 120 run -d --runtime "$runtime" "$IMAGE" "$id" /memhog serve --mib "$MIB" \
        --procs "$PROCS" --threads "$THREADS" --port "$PORT" >/dev/null ||
        { R[$label.error]="ctr run failed"; return 1; }
    pid=$(task_pid "$id")
    [[ -n $pid ]] || { R[$label.error]="no task pid after ctr run"; return 1; }
    reply=$(query "$pid" 300000 PING) || { R[$label.error]="memhog did not answer after start"; return 1; }
    expect=$(query "$pid" 300000 EXPECT) || { R[$label.error]="EXPECT failed"; return 1; }
    ctd_log "[$label] memhog ready (pid $pid): $expect"

    ctd_log "[$label] checkpointing: ctr containers checkpoint --task $id $ref"
    t0=$(now_ns)
    ctr_t 600 containers checkpoint --task "$id" "$ref" >/dev/null ||
        { R[$label.error]="checkpoint failed"; return 1; }
    t1=$(now_ns)
    R[$label.checkpoint]=$(secs "$t0" "$t1")
    R[$label.content]=$(ctr_t 60 images ls | awk -v r="$ref" '$1 == r {print $4 " " $5}')
    if [[ $label == lazy ]]; then
        R[$label.stored]=$(du -sh "$DEMO_DIR/local-store" 2>/dev/null | awk '{print $1}')
    elif [[ $label == remote ]]; then
        R[$label.stored]=$(du -sh "$DEMO_DIR/store" 2>/dev/null | awk '{print $1}')
    fi
    ctr_t 60 tasks kill -s SIGKILL "$id" >/dev/null 2>&1 || true
    for _ in $(seq 1 100); do
        [[ $(task_status "$id") == STOPPED || -z $(task_status "$id") ]] && break
        sleep 0.1
    done
    ctr_t 60 tasks rm -f "$id" >/dev/null 2>&1 || true
    ctr_t 60 containers rm "$id" >/dev/null || { R[$label.error]="container rm failed"; return 1; }

    ctd_log "[$label] restoring: ctr containers restore --live $id $ref"
    t0=$(now_ns)
    ctr_t 600 containers restore --live "$id" "$ref" </dev/null >/dev/null ||
        { R[$label.error]="restore failed (see $CTD_LOG)"; return 1; }
    t1=$(now_ns)
    R[$label.restore_cmd]=$(secs "$t0" "$t1")
    pid=$(task_pid "$id")
    [[ -n $pid ]] || { R[$label.error]="no task pid after restore"; return 1; }
    reply=$(query "$pid" 120000 PING) || { R[$label.error]="no PONG after restore"; return 1; }
    t2=$(now_ns)
    R[$label.ttfr]=$(secs "$t0" "$t2")
    [[ $reply == PONG ]] || { R[$label.error]="unexpected reply '$reply'"; return 1; }
    ctd_log "[$label] first response after $(secs "$t0" "$t2") s; checking memory"
    local tc
    tc=$(ctd_shim_connect_ns "$id")
    if [[ $tc != 0 ]]; then
        R[$label.unpack]=$(secs "$t0" "$tc")
        R[$label.shim_ttfr]=$(secs "$tc" "$t2")
    fi

    t1=$(now_ns)
    reply=$(query "$pid" 600000 SUM) || { R[$label.error]="SUM failed after restore"; return 1; }
    t2=$(now_ns)
    R[$label.sum_time]=$(secs "$t1" "$t2")
    if [[ $reply == "$expect" ]]; then R[$label.sum_ok]=yes; else R[$label.sum_ok]="NO ($reply)"; fi
    R[$label.verify]=$(query "$pid" 600000 VERIFY || echo failed)

    local f
    f=$(stats_file "$id")
    if [[ $runtime == io.containerd.distriproc.v2 ]]; then
        ctd_log "[$label] waiting for the background fill to complete ($f)"
        for _ in $(seq 1 600); do
            [[ $(json_field "$f" fill_complete_us -) != - ]] && break
            sleep 0.2
        done
        if [[ -f $f ]]; then
            cp "$f" "$STATS_PREFIX-$label.json"
            R[$label.stats]=$STATS_PREFIX-$label.json
        fi
    fi
    ctd_log "[$label] done: SUM matches EXPECT: ${R[$label.sum_ok]}; VERIFY: ${R[$label.verify]}"
    # Free the memory before the next case.
    ctr_t 60 tasks kill -s SIGKILL "$id" >/dev/null 2>&1 || true
    for _ in $(seq 1 100); do
        [[ $(task_status "$id") == STOPPED || -z $(task_status "$id") ]] && break
        sleep 0.1
    done
    ctr_t 60 tasks rm -f "$id" >/dev/null 2>&1 || true
    ctr_t 60 containers rm "$id" >/dev/null 2>&1 || true
}

ctd_start
ctd_log "importing test images"
ctr_t 120 images import test-images/out/memhog.oci.tar >/dev/null

start_pageserver() {
    [[ -x $PAGESERVER_BIN ]] || die "page server $PAGESERVER_BIN not found: run 'make build'"
    mkdir -p "$DEMO_DIR/store"
    printf 'distriproc-demo-%s\n' "$$" >"$DEMO_DIR/token"
    "$PAGESERVER_BIN" --store "$DEMO_DIR/store" --listen "unix:$DEMO_DIR/ps.sock" \
        --token-file "$DEMO_DIR/token" >"$DEMO_DIR/pageserver.log" 2>&1 &
    PS_PID=$!
    for _ in $(seq 1 100); do
        [[ -S $DEMO_DIR/ps.sock ]] && break
        kill -0 "$PS_PID" 2>/dev/null || die "page server exited: $(tail -5 "$DEMO_DIR/pageserver.log")"
        sleep 0.05
    done
    [[ -S $DEMO_DIR/ps.sock ]] || die "page server did not listen on $DEMO_DIR/ps.sock"
    ctd_log "page server (pid $PS_PID) on unix:$DEMO_DIR/ps.sock, store $DEMO_DIR/store"
}

CASES=()
[[ -z $ONLY || $ONLY == lazy ]] && CASES+=(lazy)
[[ ( -z $ONLY && $REMOTE == 1 ) || $ONLY == remote ]] && CASES+=(remote)
[[ -z $ONLY || $ONLY == eager ]] && CASES+=(eager)
status=0
for c in "${CASES[@]}"; do
    case $c in
    lazy)
        local_config
        run_case lazy io.containerd.distriproc.v2 || { ctd_log "[lazy] ${R[lazy.error]}"; status=1; }
        ;;
    remote)
        start_pageserver
        printf '[pageserver]\naddress = "unix:%s"\ntoken_file = "%s"\n' \
            "$DEMO_DIR/ps.sock" "$DEMO_DIR/token" >"$DISTRIPROC_CONFIG"
        run_case remote io.containerd.distriproc.v2 || { ctd_log "[remote] ${R[remote.error]}"; status=1; }
        local_config
        ;;
    eager)
        run_case eager io.containerd.runc.v2 || { ctd_log "[eager] ${R[eager.error]}"; status=1; }
        ;;
    esac
done

v() { echo "${R[$1]:--}"; }
us_to_s() { [[ $1 == - ]] && echo - || awk -v u="$1" 'BEGIN {printf "%.3f\n", u / 1e6}'; }
declare -A TITLE=([lazy]="default (local store)" [remote]="page server" [eager]="eager (runc shim)")
row() { # row LABEL VALUE...
    printf '%-44s' "$1"
    shift
    printf ' %-22s' "$@"
    printf '\n'
}
vals() { local c; for c in "${CASES[@]}"; do v "$c.$1"; done; }
stat_vals() { # stat_vals KEY [us]: a fetcher statistic per case ("-" for eager)
    local c f x
    for c in "${CASES[@]}"; do
        f=${R[$c.stats]:-/nonexistent}
        x=$(json_field "$f" "$1" -)
        if [[ $c == eager ]]; then echo "${3:--}"; elif [[ ${2:-} == us ]]; then us_to_s "$x"; else echo "$x"; fi
    done
}
titles=()
for c in "${CASES[@]}"; do titles+=("${TITLE[$c]}"); done
echo
echo "DistriProc demo: memhog $MIB MiB ($PROCS procs x $THREADS threads), containerd $CTD_VERSION"
row "" "${titles[@]}"
for spec in "checkpoint:checkpoint (ctr c checkpoint --task) [s]" \
    "content:checkpoint image in containerd" \
    "stored:memory in the store (local / page server)" \
    "restore_cmd:ctr c restore --live returned after [s]" \
    "ttfr:time to first response (PONG) [s]" \
    "unpack:  containerd: unpack checkpoint, reach shim" \
    "shim_ttfr:  shim: restore until first response [s]" \
    "sum_time:SUM over all memory after restore [s]" \
    "sum_ok:SUM == EXPECT" "verify:VERIFY"; do
    mapfile -t _v < <(vals "${spec%%:*}")
    row "${spec#*:}" "${_v[@]}"
done
mapfile -t _v < <(stat_vals fill_complete_us us "before resume")
row "time to full fill (fetcher start) [s]" "${_v[@]}"
mapfile -t _v < <(stat_vals time_to_first_fault_us us)
row "time to first fault [s]" "${_v[@]}"
for k in faults pages_faulted pages_prefetched pages_filled zero_pages bytes tasks \
    fault_latency_us.p50 fault_latency_us.p99 fault_latency_us.max remote.pages remote.bytes; do
    mapfile -t _v < <(stat_vals "$k")
    row "fetcher $k" "${_v[@]}"
done
for c in "${CASES[@]}"; do
    [[ -n ${R[$c.error]:-} ]] && echo "$c: FAILED: ${R[$c.error]}"
    [[ -n ${R[$c.stats]:-} ]] && echo "$c fetcher stats: ${R[$c.stats]}"
done
echo "Note: containerd untars each checkpoint into a temp dir before the shim runs. The runc shim's"
echo "tar holds all $MIB MiB of pages; ours (default and page server) holds CRIU's metadata and a"
echo "reference, the memory stays in the store, so neither checkpoint nor restore copies it again."
exit $status
