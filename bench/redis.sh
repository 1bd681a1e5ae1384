# shellcheck shell=bash
# Read-mostly Redis workload of `make bench`, sourced by bench/run.sh while its containerd runs
# (needs log/ctd_t/remove_container/now_ns/$PY/$RUNS/$WORK/$SHIM_CFG/$OUT).
#
# Debian's Redis (redis-tools ships the server as redis-check-rdb) in an image built by
# bench/build-redis-oci.sh, on the host network. REDIS_KEYS keys of 1 KiB (key:%012d, filled
# with one Lua loop per 100k keys) are loaded, DEBUG DIGEST is recorded, the container is
# checkpointed and restored: eager (runc shim) and ours with fill `none` (only touched pages
# ever move). redis-benchmark then GETs the hot half of the keys (-r REDIS_KEYS/2) twice: the
# first pass faults the hot set in, the second runs with the cold half still remote.
# DEBUG DIGEST after the runs must equal the one before the checkpoint.
#
# Environment: REDIS (1 to run), REDIS_KEYS (default 600000, about 0.8 GiB), REDIS_REPS (3),
# REDIS_REQUESTS (per pass, default 300000).

REDIS_KEYS=${REDIS_KEYS:-600000}
REDIS_REPS=${REDIS_REPS:-3}
REDIS_REQUESTS=${REDIS_REQUESTS:-300000}

rcli() { redis-cli -p "$1" "${@:2}"; }

redis_rps() { # redis_rps PORT HOTKEYS -> requests per second of GETs
    redis-benchmark -p "$1" -t get -n "$REDIS_REQUESTS" -r "$2" -c 16 -P 8 -q --csv 2>/dev/null |
        awk -F'"' '/^"GET"/ {print $4; exit}'
}

redis_wait() { # redis_wait PORT SECONDS
    local i
    for i in $(seq 1 $(($2 * 100))); do
        [[ $(rcli "$1" PING 2>/dev/null) == PONG ]] && return 0
        sleep 0.01
    done
    return 1
}

redis_checkpoint() { # redis_checkpoint RUNTIME PORT REF -> prints the digest
    local runtime=$1 port=$2 ref=$3 id=rck-$RANDOM i
    ctd_t 120 run -d --net-host --runtime "$runtime" localhost/distriproc/redis:latest "$id" \
        /redis-server --port "$port" --bind 127.0.0.1 --save "" --appendonly no \
        --enable-debug-command yes --protected-mode no >/dev/null || return 1
    redis_wait "$port" 30 || return 1
    for ((i = 0; i < REDIS_KEYS; i += 100000)); do
        rcli "$port" EVAL "for i=tonumber(ARGV[1]),tonumber(ARGV[2])-1 do redis.call('SET', string.format('key:%012d', i), string.rep('v', 1024)) end return 1" \
            0 "$i" "$((i + 100000 < REDIS_KEYS ? i + 100000 : REDIS_KEYS))" >/dev/null || return 1
    done
    local digest
    digest=$(rcli "$port" DEBUG DIGEST) || return 1
    ctd_t 900 containers checkpoint --task "$id" "$ref" >/dev/null || return 1
    remove_container "$id"
    echo "$digest"
}

redis_bench() {
    command -v redis-benchmark >/dev/null || {
        log "installing redis-tools (apt)"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q redis-tools >/dev/null || return 1
    }
    bash bench/build-redis-oci.sh "$WORK/redis.oci.tar" >/dev/null || return 1
    ctd_t 120 images import "$WORK/redis.oci.tar" >/dev/null || return 1
    local sys runtime port=16379 ref digest rep hot=$((REDIS_KEYS / 2)) rc=0
    for sys in eager ours-none; do
        port=$((port + 1))
        if [[ $sys == eager ]]; then runtime=io.containerd.runc.v2; else runtime=io.containerd.distriproc.v2; fi
        ref=localhost/bench/redis-$sys:1
        log "[redis $sys] loading $REDIS_KEYS keys of 1 KiB and checkpointing"
        digest=$(redis_checkpoint "$runtime" "$port" "$ref") || { log "error: redis checkpoint ($sys) failed"; rc=1; continue; }
        for rep in $(seq 1 "$REDIS_REPS"); do
            local id=rr-$sys-$rep err="" t0 t1 ready="" rps1="" rps2="" d2="" rss="" bundle
            bundle=$CTD_STATE/io.containerd.runtime.v2.task/$CTD_NS/$id
            rm -f "$WORK/redis-stats.json"
            printf '[fetcher]\nmode = "native"\nfill = "none"\n' >"$SHIM_CFG"
            t0=$(now_ns)
            ctd_t 900 containers restore --live "$id" "$ref" </dev/null >/dev/null 2>&1 || err="restore failed"
            if [[ -z $err ]] && redis_wait "$port" 120; then
                t1=$(now_ns)
                ready=$(((t1 - t0) / 1000))
                rps1=$(redis_rps "$port" "$hot")
                rps2=$(redis_rps "$port" "$hot")
                rss=$(rcli "$port" INFO memory | awk -F: '/^used_memory_rss:/ {print $2}' | tr -d '\r')
                if [[ $sys != eager ]]; then
                    # Fetcher stats before DEBUG DIGEST reads everything (rewritten every second).
                    sleep 1.2
                    cp "$bundle/distriproc-lazy-stats.json" "$WORK/redis-stats.json" 2>/dev/null || true
                fi
                d2=$(rcli "$port" DEBUG DIGEST) || err="DEBUG DIGEST failed"
            else
                err=${err:-"no PONG within 120 s"}
            fi
            local stats=null
            if [[ $sys != eager && -z $err ]]; then
                stats=$(cat "$WORK/redis-stats.json" 2>/dev/null || echo null)
            fi
            remove_container "$id"
            "$PY" - "$RUNS" <<EOF
import json, sys
run = {"kind": "redis", "system": "$sys", "mib": 0, "rep": $rep, "keys": $REDIS_KEYS, "hot_keys": $hot,
       "requests": $REDIS_REQUESTS, "ready_us": int("$ready") if "$ready" else None,
       "rps_first": float("$rps1") if "$rps1" else None, "rps_second": float("$rps2") if "$rps2" else None,
       "used_memory_rss": int("$rss") if "$rss" else None,
       "digest_ok": "$d2" == "$digest" and "$digest" != "", "sum_ok": "$d2" == "$digest" and "$digest" != "",
       "error": "$err" or None, "stats": json.loads(r'''$stats''' or "null")}
with open(sys.argv[1], "a") as f:
    f.write(json.dumps(run) + "\n")
EOF
            log "[redis $sys #$rep] ready ${ready:-?} us, GET rps first ${rps1:-?}, second ${rps2:-?}, digest ok: $([[ $d2 == "$digest" ]] && echo yes || echo no)${err:+, error: $err}"
        done
        ctd_t 120 images rm --sync "$ref" >/dev/null 2>&1 || true
    done
    printf '[fetcher]\nmode = "native"\nfill = "full"\n' >"$SHIM_CFG"
    return $rc
}
