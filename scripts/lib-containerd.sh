# shellcheck shell=bash
# A private containerd for scripts (the shell twin of tests/harness): source this file, then
#
#   ctd_start            # starts containerd under a fresh /tmp/dpd.XXXXXX; sets CTD_* variables
#   ctd ctr-args...      # runs `ctr -a $CTD_SOCK -n $CTD_NS ctr-args...`
#   ctd_stop             # kills what ctd_start started (by pid), unmounts, removes the temp dir
#
# Inputs (environment):
#   DISTRIPROC_CONTAINERD_DIR  directory with containerd, ctr, containerd-shim-runc-v2
#                              (default /opt/distriproc/containerd/usr/bin)
#   DISTRIPROC_SHIM_BIN        containerd-shim-distriproc-v2 binary to put first on containerd's
#                              PATH (optional; without it only the runc runtime is available)
#   CTD_NS                     namespace (default distriproc-<pid>; make it unique per instance:
#                              container cgroups /<ns>/<id> are cleaned up by this name)
# Outputs: CTD_DIR CTD_SOCK CTD_PID CTD_LOG CTD_ROOT CTD_STATE CTD_BIN_DIR CTD_VERSION

ctd_log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

ctd() { "$CTD_BIN_DIR/ctr" -a "$CTD_SOCK" -n "$CTD_NS" "$@"; }

# ctd_t SECONDS ctr-args...: ctd with a timeout (the ctr process is killed when it expires).
ctd_t() {
    local t=$1
    shift
    timeout --kill-after=5 "$t" "$CTD_BIN_DIR/ctr" -a "$CTD_SOCK" -n "$CTD_NS" "$@"
}

# json_field FILE KEY[.SUB] [MISSING]: the value at that key path of a JSON file (such as a lazy
# restore's distriproc-lazy-stats.json), or MISSING (default empty) when the file, the key or the
# value is absent.
json_field() {
    "${PY:-python3}" - "$1" "$2" "${3:-}" <<'EOF'
import json, sys
try:
    v = json.load(open(sys.argv[1]))
    for k in sys.argv[2].split("."):
        v = v[k]
    print(sys.argv[3] if v is None else v)
except Exception:
    print(sys.argv[3])
EOF
}

# ctd_shim_connect_ns ID: epoch ns of the last "connecting to shim ID" line of the containerd log
# (0 when there is none): when containerd, done unpacking a checkpoint, reached the task's shim.
ctd_shim_connect_ns() {
    "${PY:-python3}" - "$CTD_LOG" "$1" <<'EOF'
import datetime, re, sys
last = None
pat = re.compile(r'time="([0-9T:.\-]+)Z" .*msg="connecting to shim ' + re.escape(sys.argv[2]) + '"')
for line in open(sys.argv[1], errors="replace"):
    m = pat.search(line)
    if m:
        last = m.group(1)
if last is None:
    print(0)
else:
    base, _, frac = last.partition(".")
    t = datetime.datetime.strptime(base, "%Y-%m-%dT%H:%M:%S").replace(tzinfo=datetime.timezone.utc)
    print(int(t.timestamp()) * 10**9 + int((frac + "000000000")[:9]))
EOF
}

ctd_start() {
    CTD_BIN_DIR=${DISTRIPROC_CONTAINERD_DIR:-/opt/distriproc/containerd/usr/bin}
    CTD_NS=${CTD_NS:-distriproc-$$}
    local bin
    for bin in containerd ctr containerd-shim-runc-v2; do
        if [[ ! -x $CTD_BIN_DIR/$bin ]]; then
            ctd_log "error: $CTD_BIN_DIR/$bin not found (run: make deps)"
            return 1
        fi
    done
    CTD_VERSION=$("$CTD_BIN_DIR/containerd" --version | awk '{print $3}')
    CTD_VERSION=${CTD_VERSION#v}
    local major=${CTD_VERSION%%.*} config_version
    if [[ $major -ge 2 ]]; then config_version=3; else config_version=2; fi

    CTD_DIR=$(mktemp -d /tmp/dpd.XXXXXX)
    CTD_SOCK=$CTD_DIR/c.sock
    CTD_ROOT=$CTD_DIR/root
    CTD_STATE=$CTD_DIR/state
    CTD_LOG=$CTD_DIR/containerd.log
    mkdir -p "$CTD_DIR/bin" "$CTD_DIR/tmp" "$CTD_ROOT" "$CTD_STATE"
    if [[ -n ${DISTRIPROC_SHIM_BIN:-} ]]; then
        if [[ ! -x $DISTRIPROC_SHIM_BIN ]]; then
            ctd_log "error: shim binary $DISTRIPROC_SHIM_BIN not found (run: make build)"
            return 1
        fi
        ln -s "$(readlink -f "$DISTRIPROC_SHIM_BIN")" "$CTD_DIR/bin/containerd-shim-distriproc-v2"
    fi
    local disabled
    if [[ $config_version == 3 ]]; then
        disabled='"io.containerd.grpc.v1.cri", "io.containerd.cri.v1.images", "io.containerd.cri.v1.runtime", "io.containerd.podsandbox.controller.v1.podsandbox", "io.containerd.sandbox.controller.v1.shim", "io.containerd.nri.v1.nri"'
    else
        disabled='"io.containerd.grpc.v1.cri", "io.containerd.nri.v1.nri"'
    fi
    cat >"$CTD_DIR/config.toml" <<EOF
version = $config_version
root = "$CTD_ROOT"
state = "$CTD_STATE"
disabled_plugins = [$disabled]

[grpc]
  address = "$CTD_SOCK"

[debug]
  level = "debug"
EOF
    # TMPDIR: containerd unpacks each restored checkpoint into a ctrd-checkpoint* temp dir and
    # never removes it; keep those inside our directory.
    PATH="$CTD_DIR/bin:$CTD_BIN_DIR:$PATH" TMPDIR="$CTD_DIR/tmp" XDG_RUNTIME_DIR= setsid "$CTD_BIN_DIR/containerd" \
        --config "$CTD_DIR/config.toml" >>"$CTD_LOG" 2>&1 </dev/null &
    CTD_PID=$!
    local i
    for i in $(seq 1 200); do
        if ctd_t 10 version >/dev/null 2>&1; then
            ctd_log "containerd $CTD_VERSION (pid $CTD_PID) ready at $CTD_SOCK"
            return 0
        fi
        if ! kill -0 "$CTD_PID" 2>/dev/null; then
            ctd_log "error: containerd exited during start-up; log tail:"
            tail -n 20 "$CTD_LOG" >&2
            return 1
        fi
        sleep 0.05
    done
    ctd_log "error: containerd did not answer on $CTD_SOCK within 10 s; log tail:"
    tail -n 20 "$CTD_LOG" >&2
    return 1
}

# Pids of shims started by this containerd (their command line carries our socket address).
ctd_shim_pids() {
    local p
    for p in /proc/[0-9]*; do
        if { tr '\0' ' ' <"$p/cmdline"; } 2>/dev/null | grep -qF -- "-address $CTD_SOCK "; then
            echo "${p#/proc/}"
        fi
    done
}

ctd_stop() {
    [[ -n ${CTD_DIR:-} && -d $CTD_DIR ]] || return 0
    local t c p i
    if [[ -n ${CTD_PID:-} ]] && kill -0 "$CTD_PID" 2>/dev/null; then
        for t in $(ctd_t 15 tasks ls -q 2>/dev/null); do
            ctd_t 15 tasks kill -s SIGKILL "$t" >/dev/null 2>&1 || true
        done
        for t in $(ctd_t 15 tasks ls -q 2>/dev/null); do
            for i in 1 2 3; do
                ctd_t 15 tasks rm -f "$t" >/dev/null 2>&1 && break
                sleep 0.2
            done
        done
        for c in $(ctd_t 15 containers ls -q 2>/dev/null); do
            ctd_t 15 containers rm "$c" >/dev/null 2>&1 || true
        done
        kill -TERM "$CTD_PID" 2>/dev/null || true
        for i in $(seq 1 100); do
            kill -0 "$CTD_PID" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL "$CTD_PID" 2>/dev/null || true
        wait "$CTD_PID" 2>/dev/null || true
    fi
    for p in $(ctd_shim_pids); do
        kill -KILL "$p" 2>/dev/null || true
    done
    # Container processes left in this namespace's cgroups (runc puts them in /<ns>/<id>).
    local d
    for d in /sys/fs/cgroup/"$CTD_NS" /sys/fs/cgroup/*/"$CTD_NS"; do
        [[ -d $d ]] || continue
        find "$d" -name cgroup.procs -exec cat {} + 2>/dev/null | while read -r p; do
            kill -KILL "$p" 2>/dev/null || true
        done
    done
    sleep 0.1
    for d in /sys/fs/cgroup/"$CTD_NS" /sys/fs/cgroup/*/"$CTD_NS"; do
        [[ -d $d ]] && find "$d" -depth -type d -exec rmdir {} + 2>/dev/null || true
    done
    rm -rf "/run/containerd/runc/$CTD_NS"
    # Mounts under our root (rootfs overlays, snapshots), deepest first.
    awk -v d="$CTD_DIR/" 'index($2, d) == 1 {print $2}' /proc/self/mounts | sort -r |
        while read -r m; do umount -l "$m" 2>/dev/null || true; done
    rm -rf "$CTD_DIR"
    CTD_DIR=
}
