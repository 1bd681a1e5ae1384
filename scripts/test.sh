#!/usr/bin/env bash
# Runs the test suite in steps and prints a summary (used by `make test`, `make e2e`, ...).
#
#   scripts/test.sh all     unit + doc tests, e2e on containerd 2.1, then e2e on containerd 1.7,
#                           then the scripts (demo and a small benchmark, each must end correct)
#   scripts/test.sh scripts  `make demo` at 128 MiB and `make bench` at 128 MiB, one rep, strict
#                           (its migration section at 256 MiB, one rep)
#   scripts/test.sh unit    unit tests (lib and bin targets) and doc tests, in parallel
#   scripts/test.sh e2e     integration test targets (<crate>/tests/*.rs) on 2.1, then on 1.7
#   scripts/test.sh e2e-2 | e2e-1    one containerd series only
#
# Integration tests run with --test-threads=1: they share runc, CRIU, /run/containerd and the
# two cores of the machine. Tests pinned to one containerd carry its series in their name
# (`ctd17` / `containerd_1_7`, `ctd21` / `containerd_2_1`) and run once, in that series' pass;
# tests that use the default ($DISTRIPROC_CONTAINERD_DIR) run in both passes. The 1.7 pass
# covers the containerd-facing packages ($E2E_1_PACKAGES: the shim and the harness). Real-stack tests skip with a "SKIPPED:" reason when the stack is
# missing, and fail instead when CI=true. Logs: target/test-logs/<step>.log.
# Environment: CARGO (default cargo), CTD_2 / CTD_1 (containerd bin dirs), CARGO_TEST_ARGS
# (extra args after `--`, e.g. a test name filter), STEP_TIMEOUT (seconds per step, default
# 1800: a hung test fails its step instead of hanging the run).
set -euo pipefail

cd "$(dirname "$0")/.."
CARGO=${CARGO:-cargo}
OPT=${DISTRIPROC_OPT:-/opt/distriproc}
CTD_2=${CTD_2:-$OPT/containerd-2.1/usr/bin}
CTD_1=${CTD_1:-$OPT/containerd-1.7/usr/bin}
E2E_1_PACKAGES=${E2E_1_PACKAGES:-containerd-shim-distriproc-v2 distriproc-harness}
LOGS=target/test-logs
STEP_TIMEOUT=${STEP_TIMEOUT:-1800}
mkdir -p "$LOGS"
what=${1:-all}

declare -a names=() results=() times=() counts=()
failed=0
total_passed=0
total_failed=0
total_skipped=0

# step NAME ENV... -- CMD...: runs CMD with ENV, logs it, records pass/fail and test counts.
step() {
    local name=$1
    shift
    local -a envs=()
    while [[ $1 != -- ]]; do
        envs+=("$1")
        shift
    done
    shift
    local log=$LOGS/$name.log start rc=0
    echo
    echo "==> [$name] ${envs[*]} $*"
    start=$(date +%s)
    timeout --kill-after=30 "$STEP_TIMEOUT" env "${envs[@]}" "$@" 2>&1 | tee "$log" || rc=$?
    local took=$(($(date +%s) - start))
    local passed fail ignored skipped
    # (grep finds nothing in a script's log: not an error)
    passed=$({ grep -Eo 'test result: [a-zA-Z]+\. [0-9]+ passed' "$log" || true; } | awk '{s+=$4} END {print s+0}')
    fail=$({ grep -Eo '[0-9]+ failed' "$log" || true; } | awk '{s+=$1} END {print s+0}')
    ignored=$({ grep -Eo '[0-9]+ ignored' "$log" || true; } | awk '{s+=$1} END {print s+0}')
    skipped=$(grep -c '^SKIPPED' "$log" || true)
    names+=("$name")
    times+=("${took}s")
    counts+=("passed $passed, failed $fail, ignored $ignored, skipped(no stack) $skipped")
    total_passed=$((total_passed + passed))
    total_failed=$((total_failed + fail))
    total_skipped=$((total_skipped + skipped))
    if [[ $rc == 124 || $rc == 137 ]]; then
        counts[-1]+=" -- TIMED OUT after ${STEP_TIMEOUT}s (hung test: see the log's last lines)"
    fi
    if [[ $rc == 0 ]]; then
        results+=(PASS)
    else
        results+=(FAIL)
        failed=1
    fi
}

# script_step NAME ENV... -- CMD...: a script counts as one test, passed when it exits 0.
script_step() {
    step "$@"
    local i=$((${#names[@]} - 1)) rc_pass=0
    [[ ${results[$i]} == PASS ]] && rc_pass=1
    counts[i]="script $([[ $rc_pass == 1 ]] && echo passed || echo FAILED) (log: $LOGS/${names[$i]}.log)"
    total_passed=$((total_passed + rc_pass))
    total_failed=$((total_failed + 1 - rc_pass))
}

e2e_step() { # e2e_step NAME CONTAINERD_DIR "PACKAGE ARGS" "SKIP ARGS"
    if [[ ! -x $2/containerd ]]; then
        names+=("$1")
        results+=(FAIL)
        times+=(0s)
        counts+=("containerd not found in $2 (run: make deps)")
        failed=1
        return
    fi
    # shellcheck disable=SC2086
    step "$1" DISTRIPROC_CONTAINERD_DIR="$2" -- \
        "$CARGO" test --no-fail-fast $3 --test '*' -- --test-threads=1 $4 ${CARGO_TEST_ARGS:-}
}

case "$what" in
all | unit)
    # shellcheck disable=SC2086
    step unit DISTRIPROC_CONTAINERD_DIR="$CTD_2" -- \
        "$CARGO" test --no-fail-fast --workspace --lib --bins -- ${CARGO_TEST_ARGS:-}
    step doc DISTRIPROC_CONTAINERD_DIR="$CTD_2" -- "$CARGO" test --no-fail-fast --workspace --doc
    ;;&
all | e2e | e2e-2)
    e2e_step e2e-containerd-2.1 "$CTD_2" --workspace "--skip ctd17 --skip containerd_1_7"
    ;;&
all | e2e | e2e-1)
    e2e_step e2e-containerd-1.7 "$CTD_1" "$(printf -- '-p %s ' $E2E_1_PACKAGES)" \
        "--skip ctd21 --skip containerd_2_1"
    ;;&
all | scripts)
    # Debug binaries (the e2e steps built them; a release build would add minutes).
    "$CARGO" build -q -p containerd-shim-distriproc-v2 -p distriproc-pageserver
    script_step demo DISTRIPROC_CONTAINERD_DIR="$CTD_2" MIB=128 \
        DISTRIPROC_SHIM_BIN="$PWD/target/debug/containerd-shim-distriproc-v2" \
        PAGESERVER_BIN="$PWD/target/debug/distriproc-pageserver" -- bash scripts/demo.sh
    script_step bench-smoke DISTRIPROC_CONTAINERD_DIR="$CTD_2" SIZES=128 REPS=1 BENCH_BUILD=debug \
        SYSTEMS="eager criu ours ours-none criu-remote ours-remote ours-remote-veth" REMOTE=0 REDIS=0 \
        MIGRATION_SIZES=256 MIGRATION_REPS=1 CHAIN_MIB=64 CHAIN_DEPTH=5 \
        BUDGET_MIB=64 BUDGET_PCTS="100 50" BUDGET_REPS=1 BUDGET_PASSES=2 BUDGET_REDIS=0 \
        BENCH_STRICT=1 BENCH_OUT=target/bench-smoke BENCH_DOC=target/bench-smoke/BENCHMARKS.md \
        BENCH_PNG_DIR=target/bench-smoke -- bash bench/run.sh
    ;;&
all | unit | e2e | e2e-1 | e2e-2 | scripts) ;;
*)
    echo "usage: scripts/test.sh all|unit|e2e|e2e-2|e2e-1|scripts" >&2
    exit 2
    ;;
esac

echo
echo "================================ test summary ================================"
for i in "${!names[@]}"; do
    printf '  %-22s %-4s %6s  %s\n' "${names[$i]}" "${results[$i]}" "${times[$i]}" "${counts[$i]}"
done
echo "  logs: $LOGS/"
if [[ $failed == 0 ]]; then
    echo "  RESULT: PASS"
else
    echo "  RESULT: FAIL"
fi
echo "=============================================================================="
# A failed step with no failed test (a build error, a timeout) still counts as one failure.
if [[ $failed != 0 && $total_failed == 0 ]]; then
    total_failed=1
fi
echo "tests: $total_passed passed, $total_failed failed, $total_skipped skipped"
exit "$failed"
