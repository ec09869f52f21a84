#!/usr/bin/env bash
# Runs the decoder fuzz target for a bounded time on stable Rust, from the committed corpus.
#
#   core/fuzz/fuzz.sh [SECONDS]      (default 60)
#
# Installs cargo-fuzz when it is missing. New inputs go to a scratch directory, so the
# committed corpus (corpus/decode) is only read. A crash fails the run: the input stays in
# core/fuzz/artifacts/decode/ and is printed in hex, so a CI log alone can reproduce it.
set -euo pipefail
cd "$(dirname "$0")"
seconds="${1:-60}"

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "== installing cargo-fuzz"
    cargo install cargo-fuzz --locked --version 0.13.2
fi

scratch="$(mktemp -d)"
log="$scratch/fuzz.log"
trap 'rm -rf "$scratch"' EXIT
mkdir "$scratch/corpus"

# -s none: no AddressSanitizer, whose -Zsanitizer flag is the one part of cargo-fuzz that
# needs nightly (README.md). libFuzzer prints a line per new input: keep that in the log.
echo "== fuzzing decode for ${seconds}s (corpus: $(ls corpus/decode | wc -l) committed inputs)"
if cargo fuzz run decode -s none "$scratch/corpus" corpus/decode -- \
        -max_total_time="$seconds" -print_final_stats=1 >"$log" 2>&1; then
    grep -E "INITED|^Done|stat::number_of_executed_units|stat::new_units_added" "$log" || tail -5 "$log"
    exit 0
fi
echo "!! the decode fuzz target failed; log tail:"
tail -60 "$log"
for f in artifacts/decode/*; do
    [ -e "$f" ] || continue
    echo "-- $f ($(wc -c <"$f") bytes), add it to core/src/codec/tests.rs as a regression test:"
    od -An -tx1 -v "$f" | head -64
done
exit 1
