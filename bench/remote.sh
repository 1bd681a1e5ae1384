# shellcheck shell=bash
# The runtime-level remote path of `make bench`, sourced by bench/run.sh (needs its log/die/q/touch_us/
# now_ns/$PY/$RUNS/$WORK/$THREADS/$MEMHOG); run.sh also uses remote_netns/rtt_us/wait_listen for
# the page servers of its containerd remote systems.
#
# Below the shim: a plain memhog process is dumped with `criu dump` into a store directory;
# distriproc-pageserver serves that store (1) on 127.0.0.1 and (2) inside a network namespace
# reached over a veth pair, and (3) the veth server behind bench/delayproxy.py (userspace one-way
# delay; this kernel has no netem). bench/remote (LazyPagesServer + RemotePages + `criu restore
# --lazy-pages`) restores it; CRIU's own daemon does the same over the veth (`criu lazy-pages
# --page-server` against the page server's CRIU protocol). Process metadata and non-lazy pages
# are read from the local images directory in every case. The containerd path (the shim's
# `[pageserver]`) is measured by run.sh itself; this part adds the delay proxy.
#
# Environment: REMOTE_SIZES (MiB, default "256 1024"), REPS_REMOTE (default 3), DELAYS_US
# (one-way proxy delays in us, default "250"; empty: no proxy runs), REMOTE_CRIU (1: also CRIU's
# daemon over the veth).

REMOTE_SIZES=${REMOTE_SIZES:-256 1024}
REPS_REMOTE=${REPS_REMOTE:-3}
DELAYS_US=${DELAYS_US-250}
REMOTE_CRIU=${REMOTE_CRIU:-1}
R_NS=dpbench-$$
R_VH=dpbh$(($$ % 100000))
R_VN=dpbn$(($$ % 100000))
R_HOST_IP=10.77.$(($$ % 200 + 10)).1
R_NS_IP=10.77.$(($$ % 200 + 10)).2
R_PIDS=()
R_RESTORED=

remote_cleanup() {
    local p
    [[ -n $R_RESTORED ]] && kill -KILL "$R_RESTORED" 2>/dev/null || true
    for p in "${R_PIDS[@]}"; do
        kill -TERM "$p" 2>/dev/null || true
    done
    sleep 0.2
    for p in "${R_PIDS[@]}"; do
        kill -KILL "$p" 2>/dev/null || true
        wait "$p" 2>/dev/null || true
    done
    R_PIDS=()
    ip link del "$R_VH" 2>/dev/null || true
    ip netns del "$R_NS" 2>/dev/null || true
}

remote_netns() {
    [[ -e /run/netns/$R_NS ]] && return 0
    ip netns add "$R_NS" || return 1
    ip link add "$R_VH" type veth peer name "$R_VN" || return 1
    ip link set "$R_VN" netns "$R_NS" || return 1
    ip addr add "$R_HOST_IP/24" dev "$R_VH" || return 1
    ip link set "$R_VH" up || return 1
    ip netns exec "$R_NS" ip addr add "$R_NS_IP/24" dev "$R_VN" || return 1
    ip netns exec "$R_NS" ip link set "$R_VN" up || return 1
    ip netns exec "$R_NS" ip link set lo up || return 1
}

# rtt_us HOST PORT: median TCP connect time to HOST:PORT over 50 tries (µs), a cheap RTT probe.
rtt_us() {
    "$PY" - "$1" "$2" <<'EOF'
import socket, statistics, sys, time
v = []
for _ in range(50):
    t = time.perf_counter()
    try:
        s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=2)
        v.append((time.perf_counter() - t) * 1e6)
        s.close()
    except OSError:
        pass
print(round(statistics.median(v), 1) if v else "")
EOF
}

wait_listen() { # wait_listen HOST PORT [NETNS]
    local i
    for i in $(seq 1 200); do
        if [[ -n ${3:-} ]]; then
            ip netns exec "$3" bash -c "exec 3<>/dev/tcp/$1/$2" 2>/dev/null && return 0
        else
            bash -c "exec 3<>/dev/tcp/$1/$2" 2>/dev/null && return 0
        fi
        sleep 0.05
    done
    return 1
}

# remote_run VARIANT MIB REP ENDPOINT CKPT PORT EXPECT [RTT_US] [DELAY_US]
remote_run() {
    local variant=$1 mib=$2 rep=$3 ep=$4 ck=$5 port=$6 expect=$7 rtt=${8:-} delay=${9:-}
    local w=$WORK/rw-$variant-$mib-$rep qout=$WORK/rq.out err="" t0 t1 stats=$WORK/rstats.json
    local criu_json=null touch_cold="" touch_warm="" summed=0 sum="" sum_ok=false
    rm -rf "$w" "$stats" "$qout"
    mkdir -p "$w"
    "$MEMHOG" query --port "$port" --timeout-ms 600000 --time-to-first-response PING >"$qout" 2>/dev/null &
    QPID=$!
    t0=$(now_ns)
    if [[ $variant == criu-veth ]]; then
        # CRIU's daemon, fetching from the page server's CRIU protocol over the veth.
        criu lazy-pages --page-server --address "${ep%:*}" --port "${ep##*:}" -D "$R_STORE/$ck" \
            -W "$w" -o "$w/lazy-pages.log" -v4 </dev/null >/dev/null 2>&1 &
        local lp=$!
        for _ in $(seq 1 400); do [[ -S $w/lazy-pages.socket ]] && break; sleep 0.005; done
        criu restore -D "$R_STORE/$ck" -W "$w" --lazy-pages --restore-detached -o restore.log -v4 \
            --pidfile "$w/restored.pid" </dev/null >/dev/null 2>&1 || err="criu restore failed ($w/restore.log)"
        t1=$(now_ns)
        [[ -n $err ]] && kill "$lp" 2>/dev/null
        wait "$lp" 2>/dev/null || true
        criu_json=$(criu_log_json "$w/lazy-pages.log")
    elif [[ $variant == *-none ]]; then
        # fill none: the fetcher serves faults until the restored tree exits; the workload
        # reads 50% of its pages (first pass remote, second pass local), then SUM reads all.
        "$BENCH_REMOTE" --images "$R_STORE/$ck" --work "$w" --endpoint "$ep" --checkpoint "$ck" \
            --fill none --stats "$stats" 2>"$w/err" &
        local bp=$!
        wait "$QPID" || true
        t1=$(now_ns)
        touch_cold=$(touch_us "$port" 50) || err="TOUCH 50 failed"
        touch_warm=$(touch_us "$port" 50) || err="TOUCH 50 failed"
        sum=$(q "$port" 600000 SUM) || err="SUM failed"
        [[ $sum == "$expect" ]] && sum_ok=true
        summed=1
        kill -KILL "$(cat "$w/restored.pid" 2>/dev/null || echo 0)" 2>/dev/null || true
        for _ in $(seq 1 200); do kill -0 "$bp" 2>/dev/null || break; sleep 0.05; done
        kill -KILL "$bp" 2>/dev/null || true
        wait "$bp" || err=${err:-"bench-remote failed: $(tail -c 300 "$w/err" | tr '\n"' ' _')"}
    else
        "$BENCH_REMOTE" --images "$R_STORE/$ck" --work "$w" --endpoint "$ep" --checkpoint "$ck" \
            --stats "$stats" 2>"$w/err" || err="bench-remote failed: $(tail -c 300 "$w/err" | tr '\n"' ' _')"
        t1=$(now_ns)
    fi
    [[ -n $err ]] && kill "$QPID" 2>/dev/null
    wait "$QPID" 2>/dev/null || true
    QPID=
    local ttfr_us
    ttfr_us=$(awk -F= '/^ttfr_us=/ {print $2}' "$qout" 2>/dev/null || true)
    [[ -z $err && -z $ttfr_us ]] && err="no PONG"
    R_RESTORED=$(cat "$w/restored.pid" 2>/dev/null || true)
    if [[ -z $err && $summed == 0 ]]; then
        sum=$(q "$port" 600000 SUM) || err="SUM failed"
        [[ $sum == "$expect" ]] && sum_ok=true
    fi
    if [[ -n $R_RESTORED ]]; then
        kill -KILL "$R_RESTORED" 2>/dev/null || true
        for _ in $(seq 1 200); do kill -0 "$R_RESTORED" 2>/dev/null || break; sleep 0.05; done
        R_RESTORED=
    fi
    "$PY" - "$RUNS" "$stats" <<EOF
import json, sys
run = {"kind": "remote", "system": "$variant", "mib": $mib, "rep": $rep, "endpoint": "$ep",
       "fill": "none" if "$variant".endswith("-none") else "full",
       "touch50_cold_us": int("$touch_cold") if "$touch_cold" else None,
       "touch50_warm_us": int("$touch_warm") if "$touch_warm" else None,
       "rtt_connect_us": float("$rtt") if "$rtt" else None,
       "proxy_delay_us": int("$delay") if "$delay" else None,
       "ttfr_s": int("$ttfr_us") / 1e6 if "$ttfr_us" else None,
       "restore_cmd_s": ($t1 - $t0) / 1e9,
       "sum_ok": "$sum_ok" == "true", "sum": "$sum", "expect": "$expect",
       "criu_log": json.loads(r'''$criu_json''' or "null"),
       "error": "$err" or None}
try:
    run["stats"] = json.load(open(sys.argv[2]))
except Exception:
    run["stats"] = None
with open(sys.argv[1], "a") as f:
    f.write(json.dumps(run) + "\n")
EOF
    log "[remote $variant $mib MiB #$rep] ttfr ${ttfr_us:-?} us, SUM ok: $sum_ok${err:+, error: $err}"
    rm -rf "$w"
}

remote_bench() {
    BENCH_REMOTE=$ROOT/target/release/distriproc-bench-remote
    log "[remote] building bench/remote (distriproc-bench-remote)"
    if ! (cd bench/remote && CARGO_TARGET_DIR=$ROOT/target cargo build -q --release --offline); then
        [[ ${DISTRIPROC_BENCH_ALLOW_STALE:-0} == 1 && -x $BENCH_REMOTE ]] ||
            { log "error: building bench/remote failed"; return 1; }
        log "warning: building bench/remote failed; using the existing $BENCH_REMOTE"
    fi
    local ps=$PAGESERVER_BIN
    R_STORE=$WORK/store
    mkdir -p "$R_STORE"
    remote_netns || { log "error: creating netns $R_NS / veth failed"; return 1; }
    local mib port=18500 rc=0
    for mib in $REMOTE_SIZES; do
        local ck=memhog-$mib n=$REPS_REMOTE expect pid
        port=$((port + 1))
        (($(reps_for "$mib") < n)) && n=$(reps_for "$mib")
        log "[remote $mib MiB] starting memhog and dumping it with criu into $R_STORE/$ck"
        setsid "$MEMHOG" serve --mib "$mib" --threads "$THREADS" --port "$port" </dev/null >/dev/null 2>&1 &
        pid=$!
        q "$port" 600000 PING >/dev/null || { log "error: memhog did not start"; rc=1; continue; }
        expect=$(q "$port" 600000 EXPECT)
        mkdir -p "$R_STORE/$ck"
        if ! criu dump -t "$pid" -D "$R_STORE/$ck" -o dump.log -v2 </dev/null >/dev/null 2>&1; then
            log "error: criu dump failed ($R_STORE/$ck/dump.log)"
            kill -KILL "$pid" 2>/dev/null || true
            rc=1
            continue
        fi
        wait "$pid" 2>/dev/null || true
        # Page servers for this checkpoint: loopback, and inside the netns (CRIU clients get $ck).
        local pl=$((port + 1000)) pn=7060 p
        "$ps" --store "$R_STORE" --listen "127.0.0.1:$pl" --criu-default "$ck" --no-access-log \
            >"$WORK/ps-lo.log" 2>&1 &
        R_PIDS+=($!)
        ip netns exec "$R_NS" "$ps" --store "$R_STORE" --listen "$R_NS_IP:$pn" --criu-default "$ck" \
            --no-access-log >"$WORK/ps-ns.log" 2>&1 &
        R_PIDS+=($!)
        wait_listen 127.0.0.1 "$pl" && wait_listen "$R_NS_IP" "$pn" ||
            { log "error: page servers did not listen"; rc=1; remote_cleanup; remote_netns; continue; }
        local rtt_lo rtt_veth
        rtt_lo=$(rtt_us 127.0.0.1 "$pl")
        rtt_veth=$(rtt_us "$R_NS_IP" "$pn")
        local proxies=() d
        for d in $DELAYS_US; do
            local pp=$((pl + 100 + d % 97))
            "$PY" bench/delayproxy.py --listen "127.0.0.1:$pp" --target "$R_NS_IP:$pn" --delay-us "$d" \
                >"$WORK/proxy-$d.log" 2>&1 &
            R_PIDS+=($!)
            wait_listen 127.0.0.1 "$pp" || { log "error: delay proxy ($d us) did not listen"; continue; }
            proxies+=("$d:$pp:")  # a connect probe would only time the handshake with the proxy
        done
        log "[remote $mib MiB] connect RTT medians: loopback ${rtt_lo} us, veth ${rtt_veth} us, proxies ${proxies[*]:-none}"
        local rep
        for rep in $(seq 1 "$n"); do
            remote_run loopback "$mib" "$rep" "127.0.0.1:$pl" "$ck" "$port" "$expect" "$rtt_lo"
            remote_run veth "$mib" "$rep" "$R_NS_IP:$pn" "$ck" "$port" "$expect" "$rtt_veth"
            remote_run loopback-none "$mib" "$rep" "127.0.0.1:$pl" "$ck" "$port" "$expect" "$rtt_lo"
            remote_run veth-none "$mib" "$rep" "$R_NS_IP:$pn" "$ck" "$port" "$expect" "$rtt_veth"
            local x
            for x in "${proxies[@]}"; do
                IFS=: read -r d pp rt <<<"$x"
                remote_run "veth+proxy${d}us" "$mib" "$rep" "127.0.0.1:$pp" "$ck" "$port" "$expect" "$rt" "$d"
            done
            if [[ $REMOTE_CRIU == 1 ]]; then
                remote_run criu-veth "$mib" "$rep" "$R_NS_IP:$pn" "$ck" "$port" "$expect" "$rtt_veth"
            fi
        done
        # Stop this size's servers and proxies; free the images.
        for p in "${R_PIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
        for p in "${R_PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
        R_PIDS=()
        rm -rf "${R_STORE:?}/$ck"
    done
    remote_cleanup
    return $rc
}
