# shellcheck shell=bash
# Read-mostly Redis workload of `make bench`, sourced by bench/run.sh while its containerd runs
# (needs log/ctd_t/remove_container/now_ns/write_shim_config/$PY/$RUNS/$WORK/$OUT and,
# for the remote system, $PS_LO: a page server run.sh started).
#
# Debian's Redis (redis-tools ships the server as redis-check-rdb) in an image built by
# bench/build-redis-oci.sh, on the host network. REDIS_KEYS keys of 1 KiB (key:%012d, filled
# with one Lua loop per 100k keys) are loaded, DEBUG DIGEST is recorded, the container is
# checkpointed and restored:
#
#   eager             runc shim: every page restored before Redis runs (the all-local baseline)
#   ours-none         our shim, fill `none`, pages from the local checkpoint
#   ours-remote-none  our shim, fill `none`, pages at the page server (loopback)
#
# With fill `none` only touched pages ever move. After the restore, redis-benchmark GETs random
# keys among the first REDIS_HOT_PCTS percent of them (-r), in growing stages (10, 25, 50, 100 %
# by default), each stage twice: the first pass faults the new hot keys in, the second runs with
# the rest of memory still remote. Between the passes the fetcher's statistics give the fraction
# of memory still remote; each stage's throughput is compared with eager's at the same stage. DEBUG DIGEST after the stages must equal the one before the checkpoint.
#
# Environment: REDIS (1 to run), REDIS_KEYS (default 600000, about 0.8 GiB), REDIS_REPS (3),
# REDIS_REQUESTS (per pass, default 300000), REDIS_HOT_PCTS (default "10 25 50 100"),
# REDIS_SYSTEMS (default "eager ours-none ours-remote-none"), REDIS_FAULT_AROUND (the restores'
# fetcher.fault_around_pages, default 1: a GET touches a few small objects scattered over the
# heap, so the default 16-page window around each fault mostly moves cold keys and the "remote"
# fraction would shrink to a quarter after 10 % of the keys; an operator of such a workload
# sets the same per runtime in shim.toml).

REDIS_KEYS=${REDIS_KEYS:-600000}
REDIS_REPS=${REDIS_REPS:-3}
REDIS_REQUESTS=${REDIS_REQUESTS:-300000}
REDIS_HOT_PCTS=${REDIS_HOT_PCTS:-10 25 50 100}
REDIS_SYSTEMS=${REDIS_SYSTEMS:-eager ours-none ours-remote-none}
REDIS_FAULT_AROUND=${REDIS_FAULT_AROUND:-1}

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

# redis_remote_fraction STATS-FILE SINCE: "REMOTE INSTALLED FAULTS" from the fetcher's stats once
# the file was rewritten after SINCE (epoch seconds; the shim rewrites it every second, waited for
# up to 3 s): 1 - installed / lazy pages, the pages installed, the faults so far (empty if none).
redis_remote_fraction() {
    "$PY" - "$1" "$2" <<'EOF'
import json, os, sys, time
path, since = sys.argv[1], float(sys.argv[2])
deadline = time.time() + 3
while time.time() < deadline:
    try:
        if os.path.getmtime(path) > since:
            break
    except OSError:
        pass
    time.sleep(0.05)
try:
    s = json.load(open(path))
    inst = sum(s.get(k) or 0 for k in ("pages_faulted", "pages_prefetched", "pages_filled", "zero_pages"))
    print(round(max(0.0, 1 - inst / s["lazy_pages"]), 4) if s.get("lazy_pages") else "", inst, s.get("faults"))
except Exception:
    print("")
EOF
}

redis_bench() {
    command -v redis-benchmark >/dev/null || {
        log "installing redis-tools (apt)"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q redis-tools >/dev/null || return 1
    }
    bash bench/build-redis-oci.sh "$WORK/redis.oci.tar" >/dev/null || return 1
    ctd_t 120 images import "$WORK/redis.oci.tar" >/dev/null || return 1
    local sys runtime port=16379 ref digest rep rc=0 ps
    for sys in $REDIS_SYSTEMS; do
        port=$((port + 1))
        ps=""
        case $sys in
        eager) runtime=io.containerd.runc.v2 ;;
        ours-none) runtime=io.containerd.distriproc.v2 ;;
        ours-remote-none)
            runtime=io.containerd.distriproc.v2
            ps=${PS_LO:-}
            [[ -n $ps ]] || { log "[redis $sys] skipped: no page server (no *-remote system in SYSTEMS)"; continue; }
            ;;
        *) log "error: unknown REDIS_SYSTEMS entry $sys"; rc=1; continue ;;
        esac
        ref=localhost/bench/redis-$sys:1
        write_shim_config native full "$ps"
        log "[redis $sys] loading $REDIS_KEYS keys of 1 KiB and checkpointing${ps:+ to the page server $ps}"
        digest=$(redis_checkpoint "$runtime" "$port" "$ref") || { log "error: redis checkpoint ($sys) failed"; rc=1; continue; }
        for rep in $(seq 1 "$REDIS_REPS"); do
            local id=rr-$sys-$rep err="" t0 t1 ready="" d2="" rss="" bundle stages="" pct
            bundle=$CTD_STATE/io.containerd.runtime.v2.task/$CTD_NS/$id
            rm -f "$WORK/redis-stats.json"
            FETCHER_EXTRA="fault_around_pages = $REDIS_FAULT_AROUND" write_shim_config native none "$ps"
            t0=$(now_ns)
            ctd_t 900 containers restore --live "$id" "$ref" </dev/null >/dev/null 2>&1 || err="restore failed"
            if [[ -z $err ]] && redis_wait "$port" 120; then
                t1=$(now_ns)
                ready=$(((t1 - t0) / 1000))
                for pct in $REDIS_HOT_PCTS; do
                    local hot=$((REDIS_KEYS * pct / 100)) remote="" installed="" nfaults="" rps1 rps2
                    rps1=$(redis_rps "$port" "$hot")
                    if [[ $sys != eager ]]; then
                        # What stays remote during the second pass.
                        read -r remote installed nfaults < <(redis_remote_fraction \
                            "$bundle/distriproc-lazy-stats.json" "$(date +%s.%N)")
                    fi
                    rps2=$(redis_rps "$port" "$hot")
                    stages+="{\"hot_pct\": $pct, \"hot_keys\": $hot, \"remote_fraction\": ${remote:-null}, \"pages_installed\": ${installed:-null}, \"faults\": ${nfaults:-null}, \"rps_first\": ${rps1:-null}, \"rps_second\": ${rps2:-null}},"
                    log "[redis $sys #$rep] GETs on ${pct}% of the keys: ${rps1:-?} GET/s, then with ${remote:-0} of memory remote ${rps2:-?} GET/s"
                done
                rss=$(rcli "$port" INFO memory | awk -F: '/^used_memory_rss:/ {print $2}' | tr -d '\r')
                if [[ $sys != eager ]]; then
                    # Fetcher stats before DEBUG DIGEST reads everything.
                    sleep 1.1
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
stages = json.loads("[" + r'''$stages'''.rstrip(",") + "]")
half = next((s for s in stages if s["hot_pct"] == 50), stages[0] if stages else {})
run = {"kind": "redis", "system": "$sys", "mib": 0, "rep": $rep, "keys": $REDIS_KEYS,
       "fault_around_pages": $REDIS_FAULT_AROUND,
       "hot_keys": half.get("hot_keys"), "requests": $REDIS_REQUESTS,
       "pageserver": "$ps" or None, "stages": stages,
       "ready_us": int("$ready") if "$ready" else None,
       "rps_first": half.get("rps_first"), "rps_second": half.get("rps_second"),
       "used_memory_rss": int("$rss") if "$rss" else None,
       "digest_ok": "$d2" == "$digest" and "$digest" != "", "sum_ok": "$d2" == "$digest" and "$digest" != "",
       "error": "$err" or None, "stats": json.loads(r'''$stats''' or "null")}
with open(sys.argv[1], "a") as f:
    f.write(json.dumps(run) + "\n")
EOF
            log "[redis $sys #$rep] ready ${ready:-?} us, digest ok: $([[ $d2 == "$digest" ]] && echo yes || echo no)${err:+, error: $err}"
        done
        ctd_t 120 images rm --sync "$ref" >/dev/null 2>&1 || true
    done
    write_shim_config native full
    return $rc
}
