#!/usr/bin/env bash
# The memory store's latency as records accumulate, the old store (one mutex around one
# map) and this one side by side, interleaved so that a busy machine hurts both alike:
#
#   bash bench/memory_growth.sh
#
# Each round runs crates/idem-core/benches/memory_growth.rs once per store, in a process of
# its own (so each one's resident memory is its own). Knobs (environment): ROUNDS (2),
# RECORDS (1000000), WINDOW (100000), CALLERS (64), THREADS (2).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
ROUNDS=${ROUNDS:-2}
args=(--records "${RECORDS:-1000000}" --window "${WINDOW:-100000}"
    --callers "${CALLERS:-64}" --threads "${THREADS:-2}")
cd "$ROOT"
cargo bench --quiet -p idem-core --bench memory_growth --no-run
for round in $(seq "$ROUNDS"); do
    for store in locked dashmap sharded; do
        echo "## round $round"
        cargo bench --quiet -p idem-core --bench memory_growth -- --store "$store" "${args[@]}"
        echo
    done
done
