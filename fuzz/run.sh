#!/bin/sh
# Runs every fuzz target (or those named) for a bounded time: FUZZ_SECONDS each (default 60),
# one after the other, at low priority. New inputs go to a scratch corpus under
# fuzz/target/corpus/<target> (seeded from the committed fuzz/corpus/<target>), so a run does not
# dirty the repository; crashes land in fuzz/artifacts/<target>/ and fail the script.
#
#   fuzz/run.sh                      # all targets, 60 s each
#   FUZZ_SECONDS=600 fuzz/run.sh images
#
# Needs cargo-fuzz (installed here if missing) and nightly features, which the stable
# toolchain provides with RUSTC_BOOTSTRAP=1.
set -eu
cd "$(dirname "$0")"
SECS="${FUZZ_SECONDS:-60}"
export RUSTC_BOOTSTRAP=1
command -v cargo-fuzz >/dev/null 2>&1 || cargo install cargo-fuzz --locked
TARGETS="${*:-native_server native_client criu_header images}"
nice -n 10 cargo fuzz build -O $TARGETS 2>&1 | tail -n 3 || true
fail=0
for t in $TARGETS; do
    scratch="target/corpus/$t"
    mkdir -p "$scratch" "artifacts/$t"
    cp -n corpus/"$t"/* "$scratch"/ 2>/dev/null || true
    echo "== $t: ${SECS}s"
    if ! nice -n 10 cargo fuzz run -O "$t" "$scratch" -- \
        -max_total_time="$SECS" -rss_limit_mb=2048 -max_len=65536 -print_final_stats=1 \
        >"target/fuzz-$t.log" 2>&1; then
        echo "!! $t failed, see fuzz/target/fuzz-$t.log and fuzz/artifacts/$t/"
        fail=1
    fi
    grep -E '^stat::number_of_executed_units|^stat::peak_rss_mb|Done [0-9]+ runs' \
        "target/fuzz-$t.log" || true
    echo "   corpus: $(ls "$scratch" | wc -l) inputs"
done
exit $fail
