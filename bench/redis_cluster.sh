#!/usr/bin/env bash
# `idem serve` on a Redis Cluster beside the same gateway on one Redis node, run by hand
# (not in CI):
#
#   bash bench/redis_cluster.sh
#
# Starts a 3-primary Redis Cluster of its own (redis-server and redis-cli from PATH, no
# persistence, ports PORT_BASE+10..+12, removed at the end) and the bench upstream
# (crates/idem-cli/examples/bench-upstream.rs), then, each with a gateway started afresh:
#   node     - idem serve --store redis://REDIS_NODE/?prefix=RANDOM (the machine's Redis)
#   cluster  - idem serve --store redis+cluster://three primaries/?prefix=RANDOM
# and for each, wrk -t$THREADS -c$CONNECTIONS -d$DURATION with fresh keys
# (bench/new_keys.lua), after WARMUP. Prints req/s, p50/p99, non-2xx answers, and the CPU
# per request of the gateway and of the Redis server processes (the one node, or the three
# primaries together). Everything runs on this machine's cores, so the cluster's three
# servers compete with the gateway: read the CPU columns as well as req/s.
#
# Knobs (environment): DURATION (10s), WARMUP (3s), THREADS (2), CONNECTIONS (64),
# REDIS_NODE (127.0.0.1:6379), PORT_BASE (38300: uses +1, +3, +10..+12), SKIP_BUILD.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
DURATION=${DURATION:-10s}
WARMUP=${WARMUP:-3s}
THREADS=${THREADS:-2}
CONNECTIONS=${CONNECTIONS:-64}
REDIS_NODE=${REDIS_NODE:-127.0.0.1:6379}
PORT_BASE=${PORT_BASE:-38300}
UP_PORT=$((PORT_BASE + 1))
IDEM_PORT=$((PORT_BASE + 3))
CLUSTER_PORTS=($((PORT_BASE + 10)) $((PORT_BASE + 11)) $((PORT_BASE + 12)))

LOG_TAG=redis_cluster.sh
# shellcheck source=bench/lib.sh
. "$ROOT/bench/lib.sh"

for tool in wrk redis-server redis-cli; do command -v "$tool" >/dev/null || die "$tool not found"; done
build_gateway
[ "$(timeout 5 redis-cli -u "redis://$REDIS_NODE" ping 2>&1)" = PONG ] || die "no Redis at $REDIS_NODE"

WORK=$(mktemp -d)
PIDS=()
PREFIX=idem-cluster-bench-$(od -An -N4 -tx4 /dev/urandom | tr -d ' \n')
cleanup() {
    local pid
    for pid in "${PIDS[@]}"; do stop_pid "$pid"; done
    timeout 120 redis-cli -u "redis://$REDIS_NODE" --scan --pattern "$PREFIX:*" |
        timeout 120 xargs -r -n 1000 redis-cli -u "redis://$REDIS_NODE" del >/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT

# CPU ticks (user + system) of the given processes.
ticks() {
    local pid total=0
    for pid in "$@"; do
        total=$((total + $(awk '{ print $14 + $15 }' "/proc/$pid/stat" 2>/dev/null || echo 0)))
    done
    echo "$total"
}

log "starting a 3-primary cluster on ports ${CLUSTER_PORTS[*]}"
CLUSTER_PIDS=()
for port in "${CLUSTER_PORTS[@]}"; do
    port_busy "$port" && die "port $port is taken (set PORT_BASE)"
    start "$port" "$WORK/redis-$port.log" redis-server --port "$port" --bind 127.0.0.1 \
        --cluster-enabled yes --cluster-config-file "$WORK/nodes-$port.conf" \
        --cluster-node-timeout 5000 --save "" --appendonly no --dir "$WORK"
    CLUSTER_PIDS+=("$STARTED")
done
addresses=()
for port in "${CLUSTER_PORTS[@]}"; do addresses+=("127.0.0.1:$port"); done
timeout 60 redis-cli --cluster create "${addresses[@]}" --cluster-replicas 0 --cluster-yes \
    >"$WORK/create.log" 2>&1 || { cat "$WORK/create.log" >&2; die "redis-cli --cluster create failed"; }
for _ in $(seq 100); do
    redis-cli -p "${CLUSTER_PORTS[0]}" cluster info | tr -d '\r' | grep -q '^cluster_state:ok' && break
    sleep 0.1
done
redis-cli -p "${CLUSTER_PORTS[0]}" cluster info | tr -d '\r' | grep -q '^cluster_state:ok' ||
    die "the cluster did not become ready"
NODE_PORT=${REDIS_NODE##*:}
NODE_PID=$(pgrep -f "redis-server .*:$NODE_PORT" | head -1 || true)
[ -n "$NODE_PID" ] || log "warning: no redis-server process found for $REDIS_NODE; its CPU is not counted"

start "$UP_PORT" "$WORK/upstream.log" "$UP_BIN" "127.0.0.1:$UP_PORT"
CLK_TCK=$(getconf CLK_TCK)
printf '| store | req/s | p50 | p99 | non-2xx | gateway CPU µs/req | Redis CPU µs/req |\n|---|---:|---:|---:|---:|---:|---:|\n' \
    >"$WORK/table"
for target in node cluster; do
    case $target in
    node)
        store="redis://$REDIS_NODE/?prefix=$PREFIX"
        servers=($NODE_PID)
        ;;
    cluster)
        store="redis+cluster://$(IFS=,; echo "${addresses[*]}")/?prefix=$PREFIX"
        servers=("${CLUSTER_PIDS[@]}")
        ;;
    esac
    start "$IDEM_PORT" "$WORK/idem-$target.log" "$IDEM_BIN" serve --listen "127.0.0.1:$IDEM_PORT" \
        --upstream "http://127.0.0.1:$UP_PORT" --store "$store" --admin-listen off
    idem_pid=$STARTED
    log "$target: warm-up $WARMUP, then $DURATION"
    wrk -t"$THREADS" -c"$CONNECTIONS" -d"$WARMUP" -s "$ROOT/bench/new_keys.lua" \
        "http://127.0.0.1:$IDEM_PORT/payments" -- "warm-$target-$$" >/dev/null 2>&1
    g0=$(ticks "$idem_pid")
    r0=$(ticks "${servers[@]}")
    wrk -t"$THREADS" -c"$CONNECTIONS" -d"$DURATION" --latency -s "$ROOT/bench/new_keys.lua" \
        "http://127.0.0.1:$IDEM_PORT/payments" -- "run-$target-$$" >"$WORK/wrk-$target" 2>&1
    g1=$(ticks "$idem_pid")
    r1=$(ticks "${servers[@]}")
    result=$(grep '^RESULT' "$WORK/wrk-$target") || die "wrk printed no result for $target"
    eval "${result#RESULT }"
    awk -v t="$target" -v n="$requests" -v d="$duration_us" -v p50="$p50_us" -v p99="$p99_us" \
        -v e="$((status_errors + socket_errors))" -v g="$((g1 - g0))" -v r="$((r1 - r0))" \
        -v hz="$CLK_TCK" 'BEGIN {
        printf "| %s | %.1f k | %.2f ms | %.2f ms | %d | %.1f | %.1f |\n", t, n / (d / 1e6) / 1000,
            p50 / 1000, p99 / 1000, e, g * 1e6 / hz / n, r * 1e6 / hz / n }' >>"$WORK/table"
    stop_pid "$idem_pid"
done
echo
echo "wrk -t$THREADS -c$CONNECTIONS -d$DURATION, fresh keys; node: redis://$REDIS_NODE, cluster: 3 primaries on this machine, no replicas"
echo
cat "$WORK/table"
