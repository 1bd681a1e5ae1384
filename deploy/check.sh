#!/usr/bin/env bash
# Validates what can be validated on one machine without Kubernetes:
#
#  1. containerd snippets (deploy/containerd/*.toml): for containerd 1.7 and 2.1 (the builds
#     under /opt/distriproc), a private containerd WITH CRI is started whose config.toml only
#     `imports` the snippet (the documented drop-in route). Checks: `containerd config dump`
#     shows the runtime `distriproc` with runtime_type io.containerd.distriproc.v2, the
#     annotation patterns and options.ConfigPath; the daemon starts, `ctr plugins ls` shows the
#     CRI plugins `ok`, and the CRI plugin logs the runtime it loaded.
#  2. Kubernetes manifests (deploy/kubernetes/*.yaml): parsed with PyYAML (apiVersion, kind,
#     metadata.name on every document), then validated against the Kubernetes schema with
#     kubernetes-validate --strict for Kubernetes 1.30 and 1.33 (PyPI; scripts/deps-docker.sh installs it into
#     $DISTRIPROC_OPT/k8s-validate). Without the validator: a SKIPPED line, or a failure when
#     CI=true.
#  3. deploy/docker/daemon.json parses and names the runtime.
#
# Everything runs under a fresh /tmp/dpk.XXXXXX; every process started is stopped by pid.
# Usage: deploy/check.sh [containerd|manifests|all]   (default all). Needs root for part 1.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
OPT=${DISTRIPROC_OPT:-/opt/distriproc}
VALIDATOR=${KUBERNETES_VALIDATE:-$OPT/k8s-validate/bin/kubernetes-validate}
K8S_VERSIONS=${K8S_VERSIONS:-1.30.0 1.33.0}
PY=${PYTHON:-/usr/bin/python3}
what=${1:-all}
failures=0
passes=0
skips=0

log() { printf '[check] %s\n' "$*" >&2; }
pass() {
    passes=$((passes + 1))
    log "PASS: $*"
}
fail() {
    failures=$((failures + 1))
    log "FAIL: $*"
}
skip() {
    if [[ ${CI:-} == true || ${CI:-} == 1 ]]; then
        fail "$* (CI=true: cannot skip)"
    else
        skips=$((skips + 1))
        echo "SKIPPED: $*"
    fi
}

WORK=$(mktemp -d /tmp/dpk.XXXXXX)
CTD_PID=
cleanup() {
    cleanup_ctd
    awk -v d="$WORK/" 'index($2, d) == 1 {print $2}' /proc/self/mounts | sort -r |
        while read -r m; do umount -l "$m" 2>/dev/null || true; done
    if [[ -n ${DISTRIPROC_KEEP_TMP:-} ]]; then
        log "DISTRIPROC_KEEP_TMP set, keeping $WORK"
    else
        rm -rf "$WORK"
    fi
}
trap cleanup EXIT

# check_containerd SERIES BIN_DIR SNIPPET: the snippet is imported by a private CRI-enabled
# containerd; config dump, plugin status and the CRI log must show the runtime.
check_containerd() {
    local series=$1 bin=$2 snippet=$3
    local d=$WORK/ctd-$series
    if [[ ! -x $bin/containerd || ! -x $bin/ctr ]]; then
        skip "containerd $series not found in $bin (run: make deps)"
        return
    fi
    if [[ $(id -u) != 0 ]]; then
        skip "containerd $series check needs root"
        return
    fi
    local version major cfgver disabled cri_plugins
    version=$("$bin/containerd" --version | awk '{print $3}')
    major=${version#v}
    major=${major%%.*}
    if [[ $major -ge 2 ]]; then
        cfgver=3
        # NRI would open a host-wide socket; everything CRI stays enabled.
        disabled='"io.containerd.nri.v1.nri"'
        cri_plugins="io.containerd.cri.v1.runtime io.containerd.cri.v1.images io.containerd.grpc.v1.cri"
    else
        cfgver=2
        disabled='"io.containerd.nri.v1.nri"'
        cri_plugins="io.containerd.grpc.v1.cri"
    fi
    mkdir -p "$d/root" "$d/state" "$d/tmp" "$d/cni-conf" "$d/cni-bin"
    cp "$snippet" "$d/distriproc.toml"
    # Private everything; CRI's streaming server on loopback with a kernel-chosen port, CNI
    # config and binaries in empty private dirs (no pod networking is attempted).
    local cri_table
    if [[ $cfgver == 3 ]]; then
        cri_table="[plugins.'io.containerd.grpc.v1.cri']
  stream_server_address = \"127.0.0.1\"
  stream_server_port = \"0\"
[plugins.'io.containerd.cri.v1.runtime'.cni]
  conf_dir = \"$d/cni-conf\"
  bin_dirs = [\"$d/cni-bin\"]"
    else
        cri_table="[plugins.\"io.containerd.grpc.v1.cri\"]
  stream_server_address = \"127.0.0.1\"
  stream_server_port = \"0\"
  [plugins.\"io.containerd.grpc.v1.cri\".cni]
    conf_dir = \"$d/cni-conf\"
    bin_dir = \"$d/cni-bin\""
    fi
    # The main file also carries an operator's own runc options (as a real config would): the
    # drop-in must add our runtime without losing them or the default runtime.
    local runc_table
    if [[ $cfgver == 3 ]]; then
        runc_table="[plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc.options]
  BinaryName = \"runc\""
    else
        # containerd 1.7 drops its built-in runtimes once a file names any runtime: the main
        # file must declare runc itself (as `containerd config default` output does).
        runc_table="[plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.runc]
  runtime_type = \"io.containerd.runc.v2\"
[plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.runc.options]
  BinaryName = \"runc\""
    fi
    # 2.x: the documented drop-in route (imports). 1.7: pasted into the main file (its imports
    # merge is one level deep and would replace the main file's `containerd` table).
    local imports=""
    if [[ $cfgver == 3 ]]; then
        imports="imports = [\"$d/distriproc.toml\"]"
    fi
    cat >"$d/config.toml" <<EOF
version = $cfgver
$imports
root = "$d/root"
state = "$d/state"
disabled_plugins = [$disabled]

[grpc]
  address = "$d/c.sock"
[ttrpc]
  address = "$d/c.sock.ttrpc"
[debug]
  level = "debug"

$cri_table
$runc_table
EOF
    if [[ $cfgver == 2 ]]; then
        { echo; grep -v '^version *=' "$snippet"; } >>"$d/config.toml"
    fi
    # 1. The merged configuration.
    if ! "$bin/containerd" --config "$d/config.toml" config dump >"$d/dump.toml" 2>"$d/dump.err"; then
        fail "containerd $version: config dump with $(basename "$snippet") failed: $(tail -3 "$d/dump.err")"
        return
    fi
    local table
    if [[ $cfgver == 3 ]]; then table=io.containerd.cri.v1.runtime; else table=io.containerd.grpc.v1.cri; fi
    if "$PY" - "$d/dump.toml" "$table" <<'PYEOF'; then
import sys, tomllib
dump = tomllib.load(open(sys.argv[1], "rb"))
rt = dump["plugins"][sys.argv[2]]["containerd"]["runtimes"]["distriproc"]
problems = []
if rt.get("runtime_type") != "io.containerd.distriproc.v2":
    problems.append(f"runtime_type = {rt.get('runtime_type')!r}")
for k in ("pod_annotations", "container_annotations"):
    if rt.get(k) != ["io.distriproc.*"]:
        problems.append(f"{k} = {rt.get(k)!r}")
if (rt.get("options") or {}).get("ConfigPath") != "/etc/distriproc/shim.toml":
    problems.append(f"options = {rt.get('options')!r}")
runc = dump["plugins"][sys.argv[2]]["containerd"]["runtimes"].get("runc") or {}
if runc.get("runtime_type") != "io.containerd.runc.v2":
    problems.append(f"the default runtime runc is gone or changed: {runc!r}")
elif (runc.get("options") or {}).get("BinaryName") != "runc":
    problems.append(f"the main file's runc options were lost: {runc.get('options')!r}")
if problems:
    sys.exit("runtimes in the dump: " + "; ".join(problems))
print(f"config dump: plugins.{sys.argv[2]}.containerd.runtimes.distriproc = {rt}")
PYEOF
        pass "containerd $version: config dump resolves runtime distriproc from $(basename "$snippet")"
    else
        fail "containerd $version: config dump does not show the runtime as configured ($d/dump.toml)"
        return
    fi

    # 2. The daemon with CRI enabled.
    TMPDIR=$d/tmp XDG_RUNTIME_DIR='' setsid "$bin/containerd" --config "$d/config.toml" \
        >"$d/containerd.log" 2>&1 </dev/null &
    CTD_PID=$!
    local ok=0
    for _ in $(seq 1 300); do
        if timeout 10 "$bin/ctr" -a "$d/c.sock" version >/dev/null 2>&1; then
            ok=1
            break
        fi
        kill -0 "$CTD_PID" 2>/dev/null || break
        sleep 0.1
    done
    if [[ $ok != 1 ]]; then
        fail "containerd $version with CRI and $(basename "$snippet") did not start; log tail: $(tail -5 "$d/containerd.log")"
        cleanup_ctd
        return
    fi
    local plugins p status
    plugins=$(timeout 30 "$bin/ctr" -a "$d/c.sock" plugins ls)
    for p in $cri_plugins; do
        status=$(awk -v p="$p" '$1 "." $2 == p {print $NF}' <<<"$plugins")
        if [[ $status == ok ]]; then
            pass "containerd $version: plugin $p ok"
        else
            fail "containerd $version: plugin $p status '${status:-absent}'"
        fi
    done
    # The CRI plugin logs the configuration it runs with; it must carry our runtime.
    local seen=0
    for _ in $(seq 1 50); do
        # 1.7: `distriproc:{Type:io.containerd.distriproc.v2 ...`; 2.x: JSON with runtimeType.
        if grep -qE 'distriproc[^a-zA-Z]{0,6}(Type|runtimeType)[^a-zA-Z]{0,6}io\.containerd\.distriproc\.v2' \
            "$d/containerd.log"; then
            seen=1
            break
        fi
        sleep 0.1
    done
    if [[ $seen == 1 ]] && ! grep -E 'level=(error|fatal)' "$d/containerd.log" | grep -iE 'distriproc|runtime' | grep -q .; then
        pass "containerd $version: CRI plugin loaded runtime distriproc (io.containerd.distriproc.v2), no runtime errors logged"
    else
        fail "containerd $version: CRI log does not show runtime distriproc cleanly ($d/containerd.log)"
        grep -E 'level=(error|fatal)' "$d/containerd.log" | tail -5 >&2 || true
    fi
    cleanup_ctd
}

cleanup_ctd() {
    if [[ -n $CTD_PID ]] && kill -0 "$CTD_PID" 2>/dev/null; then
        kill -TERM "$CTD_PID" 2>/dev/null || true
        for _ in $(seq 1 100); do
            kill -0 "$CTD_PID" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL "$CTD_PID" 2>/dev/null || true
    fi
    wait "$CTD_PID" 2>/dev/null || true
    CTD_PID=
}

check_manifests() {
    local f
    for f in "$HERE"/kubernetes/*.yaml; do
        if "$PY" - "$f" <<'PYEOF'; then
import sys, yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d is not None]
if not docs:
    sys.exit("no documents")
for d in docs:
    for k in ("apiVersion", "kind"):
        if not d.get(k):
            sys.exit(f"a document without {k}")
    if not (d.get("metadata") or {}).get("name"):
        sys.exit(f"{d['kind']} without metadata.name")
print(", ".join(f"{d['kind']}/{d['metadata']['name']}" for d in docs))
PYEOF
            pass "YAML parses: $(basename "$f")"
        else
            fail "YAML: $(basename "$f")"
        fi
    done
    if [[ -x $VALIDATOR ]]; then
        local v
        for v in $K8S_VERSIONS; do
            if "$VALIDATOR" --strict --quiet -k "$v" "$HERE"/kubernetes/*.yaml; then
                pass "kubernetes-validate --strict -k $v: all manifests"
            else
                fail "kubernetes-validate --strict -k $v"
            fi
        done
    else
        skip "Kubernetes schema validation: $VALIDATOR not installed (run: bash scripts/deps-docker.sh)"
    fi
    if "$PY" - "$HERE/docker/daemon.json" <<'PYEOF'; then
import json, sys
d = json.load(open(sys.argv[1]))
assert d["runtimes"]["distriproc"]["runtimeType"] == "io.containerd.distriproc.v2", d
PYEOF
        pass "docker/daemon.json parses and names io.containerd.distriproc.v2"
    else
        fail "docker/daemon.json"
    fi
}

case $what in
all | containerd)
    check_containerd 1.7 "$OPT/containerd-1.7/usr/bin" "$HERE/containerd/distriproc-containerd-1.7.toml"
    check_containerd 2.1 "$OPT/containerd-2.1/usr/bin" "$HERE/containerd/distriproc-containerd-2.x.toml"
    ;;&
all | manifests)
    check_manifests
    ;;
containerd) ;;
*)
    echo "usage: deploy/check.sh [containerd|manifests|all]" >&2
    exit 2
    ;;
esac

echo "deploy-check: $passes passed, $failures failed, $skips skipped"
[[ $failures == 0 ]]
