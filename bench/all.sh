#!/usr/bin/env bash
# Every row of BENCHMARKS.md's summary table in one run, run by hand on a quiet machine
# (not in CI; about 30 minutes after the builds):
#
#   bash bench/all.sh
#
# Builds everything first (idem, the bench upstream, bench/layer, the memory_growth bench,
# idempotent-proxy-server), then runs, one after another and nothing else in between:
#   1. bench/http.sh              - every store, new keys / replays / pass-through, nginx,
#                                   idempotent-proxy-server and pgbench beside them
#   2. bench/layer.sh             - the idem-http layer in axum vs bare and the peer layers
#   3. bench/concurrency-probe.sh - 256 concurrent requests with one key, every peer
#   4. bench/instructions.sh      - instructions per request (memory and fjall)
#   5. bench/memory_rss.sh        - 60 s of new keys per store (memory, fjall, redb, redis,
#                                   postgres): RSS over time and its peak
#   6. bench/memory_growth.sh     - the memory store's latency as records accumulate (1 round)
#   7. bench/fdatasync.py         - how many durable appends per second this disk makes, with
#                                   1-8 parallel streams: the floor under the durable stores
# Each script's own output goes to OUT_DIR/<script>.md (the full log next to it as .log).
# The Redis prefix and Postgres schema of step 5 are this run's own and removed at the end.
#
# Knobs (environment): OUT_DIR (target/bench-all/<UTC time>), SKIP (space-separated step
# names to leave out: http layer probe instructions rss growth disk), REDIS_URL
# (redis://127.0.0.1:6379), PG_URL (postgres://postgres@127.0.0.1:5432/test); every knob
# of the scripts themselves passes through (DURATION, CONNECTIONS, ...).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
OUT_DIR=${OUT_DIR:-$TARGET_DIR/bench-all/$(date -u +%Y%m%dT%H%MZ)}
SKIP=${SKIP:-}
REDIS_URL=${REDIS_URL:-redis://127.0.0.1:6379}
PG_URL=${PG_URL:-postgres://postgres@127.0.0.1:5432/test}
export REDIS_URL PG_URL

log() { printf '\n[all.sh] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }
skipped() { [[ " $SKIP " == *" $1 "* ]]; }
mkdir -p "$OUT_DIR"

log "building (release): idem, bench-upstream, bench/layer, memory_growth, the peer"
(cd "$ROOT" && cargo build --release --quiet -p idem-cli --bin idem --example bench-upstream)
cargo build --release --quiet --ignore-rust-version \
    --manifest-path "$ROOT/bench/layer/Cargo.toml" --target-dir "$TARGET_DIR"
(cd "$ROOT" && cargo bench --quiet -p idem-core --bench memory_growth --no-run)

# Runs one step: its output to OUT_DIR/NAME.log, and its results file, if it writes one,
# to OUT_DIR/NAME.md.
step() {
    local name=$1 script=$2
    shift 2
    if skipped "$name"; then
        log "skipping $name"
        return
    fi
    log "$name: $script ($(cut -d' ' -f1-3 /proc/loadavg) load before)"
    # A step that fails is reported and the run goes on: the others still measure.
    OUT="$OUT_DIR/$name.md" "$@" bash "$ROOT/bench/$script" 2>&1 | tee "$OUT_DIR/$name.log" ||
        FAILED+=("$name")
}
FAILED=()

RAND=$(od -An -N4 -tx4 /dev/urandom | tr -d ' \n')
RSS_PREFIX=idem-rss-$RAND
RSS_SCHEMA=idem_rss_$RAND
RSS_DIR=$(mktemp -d "$TARGET_DIR/bench-all-rss.XXXXXX")
cleanup() {
    rm -rf "$RSS_DIR"
    if command -v redis-cli >/dev/null; then
        redis-cli -u "$REDIS_URL" --scan --pattern "$RSS_PREFIX*" |
            xargs -r -n 500 redis-cli -u "$REDIS_URL" del >/dev/null || true
    fi
    if command -v psql >/dev/null; then
        psql "$PG_URL" -XAtqc "DROP SCHEMA IF EXISTS $RSS_SCHEMA CASCADE" >/dev/null 2>&1 || true
    fi
}
trap cleanup EXIT

# http.sh runs first and builds: that is a no-op now, and it installs
# idempotent-proxy-server when missing, before its first measurement.
step http http.sh env
export SKIP_BUILD=1
step layer layer.sh env
step probe concurrency-probe.sh env
step instructions instructions.sh env STORES="${INSTRUCTION_STORES:-memory fjall}"
if ! skipped rss; then
    psql "$PG_URL" -XAtqc "CREATE SCHEMA $RSS_SCHEMA" >/dev/null
    for store in memory: "fjall:$RSS_DIR/idem.fjall" "redb:$RSS_DIR/idem.redb" \
        "${REDIS_URL%/}/?prefix=$RSS_PREFIX" "$PG_URL?table=$RSS_SCHEMA.records"; do
        log "rss: bench/memory_rss.sh, STORE=$store"
        STORE=$store bash "$ROOT/bench/memory_rss.sh" 2>&1 | tee -a "$OUT_DIR/rss.log"
    done
    grep '^store ' "$OUT_DIR/rss.log" >"$OUT_DIR/rss.md" || true
fi
if ! skipped growth; then
    log "growth: bench/memory_growth.sh (1 round)"
    ROUNDS=${ROUNDS:-1} bash "$ROOT/bench/memory_growth.sh" 2>&1 | tee "$OUT_DIR/growth.log"
fi
if ! skipped disk; then
    log "disk: bench/fdatasync.py"
    python3 "$ROOT/bench/fdatasync.py" "$TARGET_DIR" | tee "$OUT_DIR/disk.md"
fi
log "done: $OUT_DIR"
[ "${#FAILED[@]}" = 0 ] || die "these steps failed (see their .log): ${FAILED[*]}"
