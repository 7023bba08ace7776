#!/usr/bin/env bash
# Resident memory of `idem serve --store memory:` under a stream of new keys, run by hand:
#
#   bash bench/memory_rss.sh
#
# Starts the bench upstream (crates/idem-cli/examples/bench-upstream.rs) and the gateway,
# drives `wrk -t$THREADS -c$CONNECTIONS -d$DURATION` with bench/new_keys.lua (a POST with a
# fresh Idempotency-Key each), samples the gateway's VmRSS every $EVERY seconds, and prints
# one line per sample and a summary: requests, answers that were not 2xx (a full store's
# 503s), p50/p99, and peak RSS (VmHWM); for stores that group commits (fjall, redb), the
# commits per second and operations per commit, read from the gateway's /metrics.
#
# Knobs (environment): DURATION (60s), THREADS (2), CONNECTIONS (64), EVERY (5),
# STORE (memory:), KEEP (set: keep the work directory with the logs), PORT_BASE (38180: uses +1, +3, +4), IDEM_BIN and UP_BIN (the release
# binaries under the target dir; SKIP_BUILD=1 to use them as they are).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
DURATION=${DURATION:-60s}
THREADS=${THREADS:-2}
CONNECTIONS=${CONNECTIONS:-64}
EVERY=${EVERY:-5}
STORE=${STORE:-memory:}
PORT_BASE=${PORT_BASE:-38180}
UP_PORT=$((PORT_BASE + 1))
IDEM_PORT=$((PORT_BASE + 3))
ADMIN_PORT=$((PORT_BASE + 4))

LOG_TAG=memory_rss.sh
# shellcheck source=bench/lib.sh
. "$ROOT/bench/lib.sh"
PORT_TENTHS=300

build_gateway
command -v wrk >/dev/null || die "wrk not found"

WORK=$(mktemp -d)
PIDS=()
cleanup() {
    local pid
    for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
    [ -n "${KEEP:-}" ] && log "kept $WORK" || rm -rf "$WORK"
}
trap cleanup EXIT

kib() { awk -v f="$2:" '$1 == f { print $2 }' "/proc/$1/status" 2>/dev/null || echo 0; }

start "$UP_PORT" "$WORK/upstream.log" "$UP_BIN" "127.0.0.1:$UP_PORT"
start "$IDEM_PORT" "$WORK/idem.log" "$IDEM_BIN" serve --listen "127.0.0.1:$IDEM_PORT" \
    --upstream "http://127.0.0.1:$UP_PORT" --store "$STORE" --admin-listen "127.0.0.1:$ADMIN_PORT"
IDEM_PID=$STARTED
log "gateway $IDEM_PID on $STORE, start RSS $(kib "$IDEM_PID" VmRSS) KiB"

wrk -t"$THREADS" -c"$CONNECTIONS" -d"$DURATION" --latency -s "$ROOT/bench/new_keys.lua" \
    "http://127.0.0.1:$IDEM_PORT/payments" -- "rss-$$" >"$WORK/wrk.out" 2>&1 &
WRK_PID=$!
start=$(date +%s)
while kill -0 "$WRK_PID" 2>/dev/null; do
    sleep "$EVERY"
    kill -0 "$WRK_PID" 2>/dev/null || break
    printf 't=%3ss  VmRSS %6.1f MiB\n' "$(($(date +%s) - start))" \
        "$(awk -v k="$(kib "$IDEM_PID" VmRSS)" 'BEGIN { print k / 1024 }')"
done
wait "$WRK_PID" || true
result=$(grep '^RESULT' "$WORK/wrk.out" || true)
[ -n "$result" ] || { log "wrk failed:"; cat "$WORK/wrk.out" >&2; exit 1; }
field() { sed -n "s/.*$1=\([0-9]*\).*/\1/p" <<<"$result"; }
printf 'store %s, %s: %s requests (%s not 2xx), p50 %.2f ms, p99 %.2f ms, peak RSS %.1f MiB, end RSS %.1f MiB\n' \
    "$STORE" "$DURATION" "$(field requests)" "$(field status_errors)" \
    "$(awk -v u="$(field p50_us)" 'BEGIN { print u / 1000 }')" \
    "$(awk -v u="$(field p99_us)" 'BEGIN { print u / 1000 }')" \
    "$(awk -v k="$(kib "$IDEM_PID" VmHWM)" 'BEGIN { print k / 1024 }')" \
    "$(awk -v k="$(kib "$IDEM_PID" VmRSS)" 'BEGIN { print k / 1024 }')"
# Group commit, over the whole run (warm-up included: there is none).
metric() { curl -s "http://127.0.0.1:$ADMIN_PORT/metrics" | awk -v m="$1" '$1 == m { print $2 }'; }
commits=$(metric idem_store_commits_total)
if [ -n "$commits" ] && [ "$commits" != 0 ]; then
    awk -v c="$commits" -v o="$(metric idem_store_committed_operations_total)" \
        -v d="$(field duration_us)" -v r="$(field requests)" -v s="$STORE" 'BEGIN {
        printf "store %s: %.0f durable commits/s, %.1f operations per commit, %.2f commits per request\n", \
            s, c / (d / 1e6), o / c, c / r }'
fi
