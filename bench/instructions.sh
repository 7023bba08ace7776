#!/usr/bin/env bash
# Instructions per request of `idem serve`, by path: a CPU measure that a busy machine
# does not disturb (unlike req/s), to judge a change to the hot path. Run by hand:
#
#   bash bench/instructions.sh
#
# Builds release, starts the bench upstream (crates/idem-cli/examples/bench-upstream.rs,
# natively) and `idem serve` under `valgrind --tool=callgrind`, and for each store sends
# an exact number of POSTs per path (bench/fixed_requests.py, keep-alive connections):
#   nokey   - no Idempotency-Key: passed through unprotected (the proxy alone)
#   new     - a fresh key each: claimed, forwarded, stored
#   replay  - keys completed beforehand: answered from the store, never forwarded
# Counters are dumped (and zeroed) with callgrind_control between the phases, so start-up,
# warm-up and seeding are not counted; each phase's instructions (Ir, every thread of the
# gateway, its tokio runtime included) are divided by its request count. Connection set-up
# is counted (CONNECTIONS per phase, a few per mille at the defaults). What remains
# time-dependent (the store watch, idle-connection checks, timers) is small; two runs of
# the same binary agree within about 1%: a change below that is noise.
#
# Prints a markdown table (also written to $OUT, the raw figures next to it as .tsv).
#
# Knobs (environment): REQUESTS (2000 per path), WARMUP_REQUESTS (200: new keys and
# pass-through requests before counting, so pools, caches and the allocator are warm),
# CONNECTIONS (4), REPLAY_KEYS (100), STORES ("memory"; "memory fjall redb" adds the durable
# stores, their files under the target directory), PORT_BASE (39180: uses +1 and +3), SKIP_BUILD
# (set: do not build), KEEP (set: keep the work directory with logs and callgrind dumps, for
# `callgrind_annotate`), OUT (target/bench-instructions/results.md), IDEM_ARGS (extra
# arguments to `idem serve`), IDEM_BIN and UP_BIN (binaries to measure instead of the
# release build's: a copy of an earlier build, for an A/B; with SKIP_BUILD).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
REQUESTS=${REQUESTS:-2000}
WARMUP_REQUESTS=${WARMUP_REQUESTS:-200}
CONNECTIONS=${CONNECTIONS:-4}
REPLAY_KEYS=${REPLAY_KEYS:-100}
STORES=${STORES:-memory}
PORT_BASE=${PORT_BASE:-39180}
OUT=${OUT:-$TARGET_DIR/bench-instructions/results.md}
IDEM_ARGS=${IDEM_ARGS:-}
export REPLAY_KEYS

UP_PORT=$((PORT_BASE + 1))
IDEM_PORT=$((PORT_BASE + 3))
UPSTREAM=http://127.0.0.1:$UP_PORT
REQ_PATH=/payments
NONCE=$(date +%s)-$$
LOAD="python3 $ROOT/bench/fixed_requests.py"

LOG_TAG=instructions.sh
# shellcheck source=bench/lib.sh
. "$ROOT/bench/lib.sh"
# valgrind is slow: TERM may take 20 s to end the gateway, start-up 120 s.
STOP_TENTHS=200
PORT_TENTHS=1200

for store in $STORES; do
    case $store in
    memory | fjall | redb) ;;
    *) die "STORES: unknown store '$store' (memory, fjall, redb)" ;;
    esac
done
for tool in valgrind callgrind_control python3 curl; do
    command -v "$tool" >/dev/null || die "$tool not found (apt-get install -y valgrind python3 curl)"
done
[ "$REQUESTS" -gt 0 ] && [ "$CONNECTIONS" -gt 0 ] || die "REQUESTS and CONNECTIONS must be positive"

build_gateway

mkdir -p "$TARGET_DIR/bench-instructions"
WORK=$(mktemp -d "$TARGET_DIR/bench-instructions/run.XXXXXX")

PIDS=()
cleanup() {
    local pid
    for pid in "${PIDS[@]}"; do stop_pid "$pid"; done
    if [ -n "${KEEP:-}" ]; then log "kept $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

for port in "$UP_PORT" "$IDEM_PORT"; do
    port_busy "$port" && die "port $port is in use; set PORT_BASE"
done

upstream_posts() { curl -sf "$UPSTREAM/__stats" | sed 's/[^0-9]//g'; }

start "$UP_PORT" "$WORK/upstream.log" "$UP_BIN" "127.0.0.1:$UP_PORT" 1

# Dumps callgrind's counters (which zeroes them) and prints the instructions since the
# last dump. Dump N of process PID is the file callgrind.out.PID.N. (Called in a
# subshell, so the count comes from the files, not a variable.)
dump_ir() {
    local pid=$1 file dumps
    dumps=$(find "$WORK" -maxdepth 1 -name "callgrind.out.$pid.*" | wc -l)
    callgrind_control -d "$pid" >/dev/null 2>&1 || die "callgrind_control -d $pid failed"
    file=$WORK/callgrind.out.$pid.$((dumps + 1))
    for _ in $(seq 600); do [ -s "$file" ] && grep -q '^totals:' "$file" && break; sleep 0.1; done
    [ -s "$file" ] || die "no callgrind dump $file"
    awk '/^(totals|summary):/ { print $2; exit }' "$file"
}

printf 'store\tpath\trequests\tinstructions\tper_request\n' >"$WORK/results.tsv"
for store in $STORES; do
    case $store in
    memory) url=memory: ;;
    fjall) url=fjall:$WORK/idem.fjall ;;
    redb) url=redb:$WORK/idem.redb ;;
    esac
    log "$store: starting idem serve under callgrind"
    # The admin listener on a port of the OS's choosing: its default (9090) may be taken.
    # shellcheck disable=SC2086
    start "$IDEM_PORT" "$WORK/idem-$store.log" \
        valgrind --tool=callgrind --callgrind-out-file="$WORK/callgrind.out.%p" \
        "$IDEM_BIN" serve --listen "127.0.0.1:$IDEM_PORT" --upstream "$UPSTREAM" \
        --store "$url" --admin-listen 127.0.0.1:0 $IDEM_ARGS
    pid=$STARTED
    nonce=$NONCE-$store
    $LOAD "127.0.0.1:$IDEM_PORT" "$REQ_PATH" nokey "$WARMUP_REQUESTS" "$CONNECTIONS" "$nonce"
    $LOAD "127.0.0.1:$IDEM_PORT" "$REQ_PATH" new "$WARMUP_REQUESTS" "$CONNECTIONS" "$nonce-warm"
    $LOAD "127.0.0.1:$IDEM_PORT" "$REQ_PATH" seed "$REPLAY_KEYS" 1 "$nonce"
    dump_ir "$pid" >/dev/null
    for path in nokey new replay; do
        before=$(upstream_posts)
        $LOAD "127.0.0.1:$IDEM_PORT" "$REQ_PATH" "$path" "$REQUESTS" "$CONNECTIONS" "$nonce"
        ir=$(dump_ir "$pid")
        forwarded=$(($(upstream_posts) - before))
        case $path in
        replay) [ "$forwarded" = 0 ] || die "$store: $forwarded replays reached the upstream" ;;
        *) [ "$forwarded" = "$REQUESTS" ] || die "$store $path: $forwarded of $REQUESTS reached the upstream" ;;
        esac
        printf '%s\t%s\t%s\t%s\t%s\n' "$store" "$path" "$REQUESTS" "$ir" $((ir / REQUESTS)) >>"$WORK/results.tsv"
        log "$store $path: $((ir / REQUESTS)) instructions/request"
    done
    stop_pid "$pid"
done

mkdir -p "$(dirname "$OUT")"
cp "$WORK/results.tsv" "${OUT%.md}.tsv"
{
    echo "instructions per request of \`idem serve\` (callgrind Ir, all threads), $REQUESTS requests per path over $CONNECTIONS connections, $IDEM_BIN"
    echo
    echo "| store | path | instructions/request |"
    echo "|---|---|---:|"
    awk -F'\t' 'NR > 1 { printf "| %s | %s | %d |\n", $1, $2, $5 }' "$WORK/results.tsv"
} | tee "$OUT"
