#!/usr/bin/env bash
# New keys through `idem serve` on the durable stores, with the gateway's memory over time,
# run by hand (not in CI):
#
#   bash bench/durable_rss.sh
#
# For each of TARGETS (default "nginx redb fjall"), started afresh: wrk -t2 -c64 for
# DURATION (60s) with bench/new_keys.lua (a POST with a fresh key each) against the trivial
# upstream (crates/idem-cli/examples/bench-upstream.rs); `nginx` is nginx as a plain reverse
# proxy with keep-alive to the same upstream, the baseline (bench/lib.sh's, as bench/http.sh
# runs it). Prints req/s, the ratio to nginx when it ran, the proxy's RSS every 10 s and
# its peak (VmHWM). Store files go under
# target/durable-rss/, on the project's disk. bench/http.sh is the full comparison; this is
# the long run that shows whether a store's memory stays bounded.
#
# Knobs (environment): DURATION (60s), THREADS (2), CONNECTIONS (64), TARGETS, FJALL_QUERY
# (settings appended to the fjall URL, e.g. "?cache_mib=4&memtable_mib=4"), PORT_BASE (39080:
# uses +1 and +2), NGINX_WORKERS (nproc), SKIP_BUILD (set: do not build).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
DURATION=${DURATION:-60s}
THREADS=${THREADS:-2}
CONNECTIONS=${CONNECTIONS:-64}
TARGETS=${TARGETS:-nginx redb fjall}
FJALL_QUERY=${FJALL_QUERY:-}
PORT_BASE=${PORT_BASE:-39080}
NGINX_WORKERS=${NGINX_WORKERS:-$(nproc)}
UP_PORT=$((PORT_BASE + 1))
PROXY_PORT=$((PORT_BASE + 2))

LOG_TAG=durable_rss.sh
# shellcheck source=bench/lib.sh
. "$ROOT/bench/lib.sh"
for tool in wrk curl; do command -v "$tool" >/dev/null || die "$tool not found"; done

build_gateway

mkdir -p "$TARGET_DIR/durable-rss"
WORK=$(mktemp -d "$TARGET_DIR/durable-rss/run.XXXXXX")
PIDS=()
cleanup() {
    local pid
    for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
    rm -rf "$WORK"
}
trap cleanup EXIT

start "$UP_PORT" "$WORK/upstream.log" "$UP_BIN" "127.0.0.1:$UP_PORT"

if [[ " $TARGETS " == *" nginx "* ]]; then
    command -v nginx >/dev/null || die "nginx not found"
    write_nginx_conf "$WORK/nginx" "$PROXY_PORT" "$UP_PORT" "$NGINX_WORKERS"
fi

NGINX_RATE=""
for target in $TARGETS; do
    case $target in
    nginx)
        proxy_log=$WORK/nginx.log
        nginx -p "$WORK/nginx" -c "$WORK/nginx/nginx.conf" -e "$WORK/nginx/error.log" \
            -g 'daemon off;' >"$proxy_log" 2>&1 &
        ;;
    redb | fjall)
        case $target in
        redb) store=redb:$WORK/idem.redb ;;
        fjall) store=fjall:$WORK/idem.fjall$FJALL_QUERY ;;
        esac
        proxy_log=$WORK/idem-$target.log
        "$IDEM_BIN" serve --listen "127.0.0.1:$PROXY_PORT" --upstream "http://127.0.0.1:$UP_PORT" \
            --admin-listen off --store "$store" >"$proxy_log" 2>&1 &
        ;;
    *) die "TARGETS: unknown target '$target' (nginx, redb, fjall)" ;;
    esac
    pid=$!
    PIDS+=("$pid")
    wait_port "$PROXY_PORT" "$pid" "$proxy_log"
    # RSS of the proxy and its children (nginx workers), in MiB, every 10 s.
    (
        while sleep 10; do
            kib=0
            for p in $pid $(pgrep -P "$pid" || true); do
                k=$(awk '/^VmRSS:/ { print $2 }' "/proc/$p/status" 2>/dev/null || echo 0)
                kib=$((kib + k))
            done
            printf '%s ' "$((kib / 1024))"
        done
    ) >"$WORK/rss-$target" &
    sampler=$!
    wrk -t"$THREADS" -c"$CONNECTIONS" -d"$DURATION" --latency -s "$ROOT/bench/new_keys.lua" \
        "http://127.0.0.1:$PROXY_PORT/payments" -- "$target-$$" >"$WORK/wrk-$target" 2>&1
    kill "$sampler" 2>/dev/null || true
    wait "$sampler" 2>/dev/null || true
    peak=0
    for p in $pid $(pgrep -P "$pid" || true); do
        k=$(awk '/^VmHWM:/ { print $2 }' "/proc/$p/status" 2>/dev/null || echo 0)
        peak=$((peak + k))
    done
    result=$(grep '^RESULT' "$WORK/wrk-$target" || die "wrk printed no result for $target")
    requests=$(sed -E 's/.*requests=([0-9]+).*/\1/' <<<"$result")
    duration_us=$(sed -E 's/.*duration_us=([0-9]+).*/\1/' <<<"$result")
    rate=$(awk -v r="$requests" -v d="$duration_us" 'BEGIN { printf "%.0f", r / (d / 1e6) }')
    ratio=""
    [ "$target" = nginx ] && NGINX_RATE=$rate
    [ -n "$NGINX_RATE" ] && [ "$target" != nginx ] &&
        ratio=$(awk -v a="$rate" -v b="$NGINX_RATE" 'BEGIN { printf " (%.2fx nginx)", a / b }')
    printf '%-6s %8s req/s%s  %s  RSS MiB every 10 s: %s peak %s MiB\n' "$target" "$rate" \
        "$ratio" "$(sed -E 's/^RESULT //; s/requests=[0-9]+ duration_us=[0-9]+ //' <<<"$result")" \
        "$(cat "$WORK/rss-$target")" "$((peak / 1024))"
    kill -TERM "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
done
