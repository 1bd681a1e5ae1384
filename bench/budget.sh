# shellcheck shell=bash
# The memory budget of `make bench`, sourced by bench/run.sh while its containerd runs (needs
# log/ctd_t/q/touch_us/checkpoint/remove_container/bundle_of/now_ns/write_shim_config/$PY/
# $WORK/$OUT/$MEMHOG/$THREADS, and bench/redis.sh's functions for the Redis part).
#
# One checkpoint each of memhog (BUDGET_MIB, default 1024) and of Redis (REDIS_KEYS keys of
# 1 KiB, as bench/redis.sh loads them), restored by our shim again and again with
# `fetcher.memory_budget` at BUDGET_PCTS percent of the memory (default "100 75 50 25"; 100 is
# no budget: the all-local baseline, measured once the fill is complete):
#
#   memhog  after the restore, TOUCH BUDGET_HOT_PCT (default 25) % of the pages (a hot set
#           spread over all memory) twice to bring it in, then BUDGET_PASSES (default 5) timed
#           passes: pages read per second; then SUM (every page: a scan larger than the budget)
#           timed, and checked against EXPECT
#   redis   the same with redis-benchmark GETs of random keys among the first REDIS_BUDGET_HOT_PCT
#           (default 25) % of the keys (one warm-up pass, one measured), DEBUG DIGEST checked
#           after; the fetcher's fault-around window is REDIS_FAULT_AROUND pages (as in
#           bench/redis.sh)
#
# The fill is `full` (it stops at 88 % of the budget). From the fetcher's statistics each run
# records the faults of the timed memhog passes (the counters right before and after them: the
# miss rate the report compares with the optimal policy's), the pages evicted, the refaults (demand faults on evicted pages), the batches and how
# long each held the workload stopped (p50/p99). One JSON line per run into $RUNS; the report
# compares each budget with the all-local run of the same repetition.
#
# Environment: BUDGET (1 to run), BUDGET_ONLY (run.sh: nothing else), BUDGET_MIB, BUDGET_PCTS,
# BUDGET_HOT_PCT, BUDGET_PASSES, BUDGET_REPS (default 2), BUDGET_REDIS (1: the Redis part),
# REDIS_BUDGET_HOT_PCT.

BUDGET_MIB=${BUDGET_MIB:-1024}
BUDGET_PCTS=${BUDGET_PCTS:-100 75 50 25}
BUDGET_HOT_PCT=${BUDGET_HOT_PCT:-25}
BUDGET_PASSES=${BUDGET_PASSES:-5}
BUDGET_REPS=${BUDGET_REPS:-2}
BUDGET_REDIS=${BUDGET_REDIS:-1}
REDIS_BUDGET_HOT_PCT=${REDIS_BUDGET_HOT_PCT:-25}

# budget_extra PCT MIB [MORE]: the [fetcher] lines of a restore under PCT % of MIB.
budget_extra() {
    local b=0
    ((${1} < 100)) && b=$(($2 * $1 / 100))
    printf 'memory_budget = "%sMi"\n%s' "$b" "${3:-}"
}

# budget_wait_fill BUNDLE: until the fill is complete (the all-local baseline), at most 600 s.
budget_wait_fill() {
    local i
    for i in $(seq 1 6000); do
        [[ -n $(json_field "$1/distriproc-lazy-stats.json" fill_complete_us) ]] && return 0
        sleep 0.1
    done
    return 1
}

# budget_record KIND PCT REP STATS-FILE: one JSON line into $RUNS from the B_* variables and
# the fetcher's final statistics (values reach Python through the environment).
budget_record() {
    B_KIND=$1 B_PCT=$2 B_REP=$3 B_STATS=$4 "$PY" - "$RUNS" <<'EOF'
import json, os, sys
e = os.environ
def num(k):
    v = e.get(k, "")
    try:
        return float(v) if "." in v else int(v)
    except ValueError:
        return None
def load(k):
    try:
        return json.load(open(e[k]))
    except (KeyError, OSError, ValueError):
        return None
stats, before, after = load("B_STATS"), load("B_STATS0"), load("B_STATS1")
run = {"kind": "budget-" + e["B_KIND"], "system": "ours", "mib": num("B_MIB"), "rep": num("B_REP"),
       "budget_pct": num("B_PCT"), "hot_pct": num("B_HOT"), "passes": num("B_PASSES"),
       "pass_us": [int(x) for x in e.get("B_PASS_US", "").split()],
       "hot_pages": num("B_HOT_PAGES"), "rps": num("B_RPS"), "sum_s": num("B_SUM_S"),
       "sum_ok": e.get("B_OK") == "true", "error": e.get("B_ERR") or None, "stats": stats,
       "stats_before_passes": before, "stats_after_passes": after}
with open(sys.argv[1], "a") as f:
    f.write(json.dumps(run) + "\n")
EOF
}

budget_memhog() {
    local port=17655 ref=localhost/bench/budget-memhog:1 out expect rep pct rc=0
    write_shim_config native full
    log "[budget memhog] $BUDGET_MIB MiB: checkpointing"
    out=$(checkpoint io.containerd.distriproc.v2 "$BUDGET_MIB" "$port" "$ref") || return 1
    expect=${out%%$'\t'*}
    local hot_pages=$((BUDGET_MIB * 256 * BUDGET_HOT_PCT / 100))
    for rep in $(seq 1 "$BUDGET_REPS"); do
        for pct in $BUDGET_PCTS; do
            local id=bm-$pct-$rep err="" passes="" sum="" sum_s="" ok=false bundle a b i
            bundle=$(bundle_of "$id")
            FETCHER_EXTRA=$(budget_extra "$pct" "$BUDGET_MIB") write_shim_config native full
            ctd_t 900 containers restore --live "$id" "$ref" </dev/null >/dev/null 2>&1 || err="restore failed"
            [[ -n $err ]] || q "$port" 600000 PING >/dev/null || err="no PONG"
            if [[ -z $err && $pct == 100 ]]; then
                budget_wait_fill "$bundle" || err="fill did not complete"
            fi
            if [[ -z $err ]]; then
                touch_us "$port" "$BUDGET_HOT_PCT" >/dev/null && touch_us "$port" "$BUDGET_HOT_PCT" >/dev/null ||
                    err="TOUCH failed"
                sleep 1.2 # the counters before the timed passes (the stats file is rewritten every second)
                cp "$bundle/distriproc-lazy-stats.json" "$WORK/budget-stats0.json" 2>/dev/null || echo null >"$WORK/budget-stats0.json"
                for i in $(seq 1 "$BUDGET_PASSES"); do
                    [[ -z $err ]] || break
                    passes+="$(touch_us "$port" "$BUDGET_HOT_PCT") " || err="TOUCH failed"
                done
            fi
            if [[ -z $err ]]; then
                sleep 1.2 # the counters after the timed passes
                cp "$bundle/distriproc-lazy-stats.json" "$WORK/budget-stats1.json" 2>/dev/null || echo null >"$WORK/budget-stats1.json"
            fi
            if [[ -z $err ]]; then
                a=$(now_ns)
                sum=$(q "$port" 600000 SUM) || err="SUM failed"
                b=$(now_ns)
                sum_s=$(awk -v a="$a" -v b="$b" 'BEGIN {printf "%.3f", (b - a) / 1e9}')
                [[ $sum == "$expect" ]] && ok=true
                [[ $ok == true ]] || err=${err:-"SUM != EXPECT"}
            fi
            sleep 1.2 # the shim rewrites the stats file every second
            cp "$bundle/distriproc-lazy-stats.json" "$WORK/budget-stats.json" 2>/dev/null || echo null >"$WORK/budget-stats.json"
            [[ -z $err ]] || { echo null >"$WORK/budget-stats0.json"; echo null >"$WORK/budget-stats1.json"; }
            remove_container "$id"
            B_STATS0=$WORK/budget-stats0.json B_STATS1=$WORK/budget-stats1.json \
            B_MIB=$BUDGET_MIB B_HOT=$BUDGET_HOT_PCT B_PASSES=$BUDGET_PASSES B_PASS_US=$passes \
                B_HOT_PAGES=$hot_pages B_SUM_S=$sum_s B_OK=$ok B_ERR=$err \
                budget_record memhog "$pct" "$rep" "$WORK/budget-stats.json"
            log "[budget memhog #$rep] budget ${pct}%: TOUCH $BUDGET_HOT_PCT passes (us) ${passes:-?}, SUM ${sum_s:-?} s, correct: $ok${err:+, error: $err}"
            [[ -z $err ]] || rc=1
        done
    done
    ctd_t 120 images rm --sync "$ref" >/dev/null 2>&1 || true
    return $rc
}

budget_redis() {
    command -v redis-benchmark >/dev/null || {
        log "installing redis-tools (apt)"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q redis-tools >/dev/null || return 1
    }
    bash bench/build-redis-oci.sh "$WORK/redis.oci.tar" >/dev/null || return 1
    ctd_t 120 images import "$WORK/redis.oci.tar" >/dev/null || return 1
    local port=16479 ref=localhost/bench/budget-redis:1 digest rep pct rc=0
    # Redis's memory: the keys and their overhead, about 1.4 KiB each.
    local mib=$((REDIS_KEYS * 1400 / 1048576)) hot=$((REDIS_KEYS * REDIS_BUDGET_HOT_PCT / 100))
    write_shim_config native full
    log "[budget redis] $REDIS_KEYS keys (~$mib MiB): checkpointing"
    digest=$(redis_checkpoint io.containerd.distriproc.v2 "$port" "$ref") || return 1
    for rep in $(seq 1 "$BUDGET_REPS"); do
        for pct in $BUDGET_PCTS; do
            local id=br-$pct-$rep err="" rps="" d2="" ok=false bundle
            bundle=$(bundle_of "$id")
            FETCHER_EXTRA=$(budget_extra "$pct" "$mib" "fault_around_pages = $REDIS_FAULT_AROUND") \
                write_shim_config native full
            ctd_t 900 containers restore --live "$id" "$ref" </dev/null >/dev/null 2>&1 || err="restore failed"
            [[ -n $err ]] || redis_wait "$port" 120 || err="no PONG"
            if [[ -z $err && $pct == 100 ]]; then
                budget_wait_fill "$bundle" || err="fill did not complete"
            fi
            if [[ -z $err ]]; then
                redis_rps "$port" "$hot" >/dev/null
                rps=$(redis_rps "$port" "$hot")
                sleep 1.2
                cp "$bundle/distriproc-lazy-stats.json" "$WORK/budget-stats.json" 2>/dev/null || echo null >"$WORK/budget-stats.json"
                d2=$(rcli "$port" DEBUG DIGEST) || err="DEBUG DIGEST failed"
                [[ $d2 == "$digest" ]] && ok=true
                [[ $ok == true ]] || err=${err:-"DEBUG DIGEST differs"}
            fi
            remove_container "$id"
            B_MIB=$mib B_HOT=$REDIS_BUDGET_HOT_PCT B_RPS=$rps B_OK=$ok B_ERR=$err \
                budget_record redis "$pct" "$rep" "$WORK/budget-stats.json"
            log "[budget redis #$rep] budget ${pct}%: ${rps:-?} GET/s on ${REDIS_BUDGET_HOT_PCT}% of the keys, digest ok: $ok${err:+, error: $err}"
            [[ -z $err ]] || rc=1
        done
    done
    ctd_t 120 images rm --sync "$ref" >/dev/null 2>&1 || true
    write_shim_config native full
    return $rc
}

budget_bench() {
    local rc=0
    budget_memhog || rc=1
    if [[ $BUDGET_REDIS == 1 ]]; then
        # shellcheck source=bench/redis.sh
        declare -F redis_checkpoint >/dev/null || . bench/redis.sh
        budget_redis || rc=1
    fi
    return $rc
}
