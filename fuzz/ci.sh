#!/bin/sh
# A short bounded fuzzing pass: each target for FUZZ_SECONDS (default 20) seconds, starting
# from the committed corpus. New inputs go to a scratch directory, so the committed corpus is
# never modified. Skips (exit 0) when nightly Rust or cargo-fuzz is not available.
set -eu

cd "$(dirname "$0")"
SECONDS_PER_TARGET="${FUZZ_SECONDS:-20}"
TARGETS="unaccepted_table accept_planner map_gpa_resume emulator_ops"

if ! cargo +nightly --version >/dev/null 2>&1; then
    echo "fuzz/ci.sh: skipped: no nightly toolchain (rustup toolchain install nightly)"
    exit 0
fi
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
    echo "fuzz/ci.sh: skipped: cargo-fuzz is not installed (cargo install cargo-fuzz)"
    exit 0
fi

SCRATCH="$(mktemp -d)"
trap 'rm -rf "$SCRATCH"' EXIT

cargo +nightly fuzz build --release
for t in $TARGETS; do
    mkdir -p "$SCRATCH/$t"
    echo "==> fuzz $t for ${SECONDS_PER_TARGET}s"
    # First corpus directory receives new inputs; the committed one is only read.
    cargo +nightly fuzz run --release "$t" "$SCRATCH/$t" "corpus/$t" -- \
        -max_total_time="$SECONDS_PER_TARGET" -rss_limit_mb=2048 -print_final_stats=1
done
echo "fuzz/ci.sh: every target ran ${SECONDS_PER_TARGET}s without findings"
