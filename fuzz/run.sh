#!/usr/bin/env bash
# fuzz/run.sh [SECONDS] [TARGET...]
# Runs every cargo-fuzz target (or the ones named) for SECONDS each (default
# 60), starting from the seed corpus in fuzz/corpus/<target>; new inputs go
# to a scratch directory, so the committed seeds stay small. Prints one line
# per target with its executions and coverage; exits 1 on any crash (the
# reproducer is left in fuzz/artifacts/<target>/).
#
# A longer run of one target: fuzz/run.sh 3600 wire_decode
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cd "$here"
secs=${1:-60}
shift || true
if ! rustup toolchain list | grep -q '^nightly'; then
    echo "fuzz: installing the nightly toolchain"
    rustup toolchain install nightly --profile minimal
fi
if ! command -v cargo-fuzz >/dev/null; then
    echo "fuzz: installing cargo-fuzz"
    cargo install cargo-fuzz --locked
fi
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    # Every fuzz target; make_seeds is the seed writer, not a target.
    mapfile -t targets < <(cargo +nightly fuzz list | grep -vx make_seeds)
fi
cargo +nightly fuzz build
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
failed=0
for t in "${targets[@]}"; do
    mkdir -p "$scratch/$t" "corpus/$t"
    log="$scratch/$t.log"
    if cargo +nightly fuzz run "$t" "$scratch/$t" "corpus/$t" -- \
        -max_total_time="$secs" -timeout=10 -print_final_stats=1 >"$log" 2>&1; then
        runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" || true)
        cov=$({ grep -E '^#[0-9]+.*(DONE|pulse|NEW|REDUCE)' "$log" || true; } | tail -n1 \
            | sed -n 's/.*cov: \([0-9]*\).*ft: \([0-9]*\).*/cov \1, features \2/p')
        echo "fuzz $t: ${runs:-?} executions in ${secs} s, ${cov:-coverage unknown}, no crash"
    else
        failed=1
        echo "fuzz $t: CRASH (see fuzz/artifacts/$t/)"
        grep -E 'panicked|ERROR|SUMMARY' "$log" | head -n 5 | sed 's/^/    | /'
    fi
done
exit "$failed"
