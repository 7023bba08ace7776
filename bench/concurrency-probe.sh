#!/usr/bin/env bash
# What N concurrent requests with ONE Idempotency-Key do, through each peer; run by hand
# (not in CI):
#
#   bash bench/concurrency-probe.sh
#
# For each target and each upstream delay, the probe (bench/layer/src/bin/probe.rs) opens
# N connections (256), then sends the same POST with one key on all of them at once, and
# reports how many reached the upstream (its POST counter, GET /__stats), the status codes
# the clients got, how many answers say they are replays, how many distinct bodies came
# back, errors, latencies, and what one more request with the key gets afterwards.
# The upstream is the bench app (bench/layer) without a layer, answering 201 after DELAY
# ms: with 0 the first request may finish before the others arrive (they then meet a
# completed key); with 500 all of them meet a key still in flight.
#
# Targets:
#   idem-memory              - idem serve --store memory:
#   idem-redis               - idem serve --store redis://…/?prefix=idem-probe-RANDOM
#   idempotent-proxy-server  - the crates.io proxy, on the same Redis (database IPX_REDIS_DB)
#   layer-idem               - the bench app behind idem_http::IdempotencyLayer (memory)
#   layer-idempotent         - behind the `idempotent` crate's layer (its memory store)
#   layer-axum-idempotent    - behind axum-idempotent's layer (MokaStore sessions; the probe
#                              sends one session cookie, as one client retrying would)
# (the layer targets count runs in the app's own handler).
#
# Knobs: N (256), DELAYS ("0 500"), TARGETS (all of the above), PORT_BASE (38110: uses
# +1, +2), REDIS_URL (redis://127.0.0.1:6379), IPX_REDIS_DB (15), IPX_VERSION (1.2.2),
# BENCH_TOOLS (~/.cache/idem/bench-tools), SKIP_BUILD, KEEP, OUT
# (target/bench-probe/results.md). idempotent-proxy-server is installed as bench/http.sh
# does (cargo install --locked into BENCH_TOOLS) when missing. The Redis keys this run
# made are deleted at the end.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
N=${N:-256}
DELAYS=${DELAYS:-0 500}
TARGETS=${TARGETS:-idem-memory idem-redis idempotent-proxy-server layer-idem layer-idempotent layer-axum-idempotent}
PORT_BASE=${PORT_BASE:-38110}
REDIS_URL=${REDIS_URL:-redis://127.0.0.1:6379}
IPX_REDIS_DB=${IPX_REDIS_DB:-15}
IPX_VERSION=${IPX_VERSION:-1.2.2}
BENCH_TOOLS=${BENCH_TOOLS:-$HOME/.cache/idem/bench-tools}
OUT=${OUT:-$TARGET_DIR/bench-probe/results.md}
UP_PORT=$((PORT_BASE + 1))
PX_PORT=$((PORT_BASE + 2))
NONCE=$(date +%s)-$$
RAND=$(od -An -N4 -tx4 /dev/urandom | tr -d ' \n')
REDIS_PREFIX=idem-probe-$RAND
IPX_REDIS_URL=${REDIS_URL%/}/$IPX_REDIS_DB
IPX_BIN=$BENCH_TOOLS/bin/idempotent-proxy-server

LOG_TAG=probe
# shellcheck source=bench/lib.sh
. "$ROOT/bench/lib.sh"

has_target() { case " $TARGETS " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }
for target in $TARGETS; do
    case $target in
    idem-memory | idem-redis | idempotent-proxy-server | layer-idem | layer-idempotent | layer-axum-idempotent) ;;
    *) die "TARGETS: unknown target '$target'" ;;
    esac
done
uses_redis() { has_target idem-redis || has_target idempotent-proxy-server; }
if uses_redis; then
    command -v redis-cli >/dev/null || die "redis-cli not found (apt-get install -y redis-tools)"
    [ "$(timeout 5 redis-cli -u "$REDIS_URL" ping 2>&1)" = PONG ] || die "no Redis at $REDIS_URL"
fi

if [ -z "${SKIP_BUILD:-}" ]; then
    log "building (release): idem, bench/layer"
    (cd "$ROOT" && cargo build --release --quiet -p idem-cli --bin idem)
    cargo build --release --quiet --ignore-rust-version \
        --manifest-path "$ROOT/bench/layer/Cargo.toml" --target-dir "$TARGET_DIR"
fi
IDEM_BIN=$TARGET_DIR/release/idem
APP_BIN=$TARGET_DIR/release/idem-layer-bench
PROBE_BIN=$TARGET_DIR/release/probe
for bin in "$APP_BIN" "$PROBE_BIN"; do [ -x "$bin" ] || die "$bin missing"; done
if has_target idem-memory || has_target idem-redis; then [ -x "$IDEM_BIN" ] || die "$IDEM_BIN missing"; fi
if has_target idempotent-proxy-server &&
    ! grep -q "idempotent-proxy-server $IPX_VERSION " "$BENCH_TOOLS/.crates.toml" 2>/dev/null; then
    if ! command -v cmake >/dev/null; then
        [ "$(id -u)" = 0 ] || die "cmake is needed to build idempotent-proxy-server (aws-lc-sys)"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq cmake >/dev/null
    fi
    log "installing idempotent-proxy-server $IPX_VERSION into $BENCH_TOOLS"
    nice -n 10 cargo install --quiet --locked --root "$BENCH_TOOLS" "idempotent-proxy-server@$IPX_VERSION"
fi

mkdir -p "$TARGET_DIR/bench-probe"
WORK=$(mktemp -d "$TARGET_DIR/bench-probe/run.XXXXXX")
PIDS=()
stop_all() {
    local pid
    for pid in "${PIDS[@]}"; do stop_pid "$pid"; done
    PIDS=()
}
cleanup() {
    local deleted
    stop_all
    if has_target idem-redis; then
        deleted=$(timeout 60 redis-cli -u "$REDIS_URL" --scan --pattern "$REDIS_PREFIX:*" |
            timeout 60 xargs -r redis-cli -u "$REDIS_URL" del | awk '{ n += $1 } END { print n + 0 }') || true
        log "deleted ${deleted:-no} Redis keys under $REDIS_PREFIX:"
    fi
    if has_target idempotent-proxy-server; then
        deleted=$(timeout 60 redis-cli -u "$IPX_REDIS_URL" --scan --pattern "ANON:POST:p-$NONCE-*" |
            timeout 60 xargs -r redis-cli -u "$IPX_REDIS_URL" del | awk '{ n += $1 } END { print n + 0 }') || true
        log "deleted ${deleted:-no} idempotent-proxy-server keys (database $IPX_REDIS_DB)"
    fi
    if [ -n "${KEEP:-}" ]; then log "kept $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

for port in "$UP_PORT" "$PX_PORT"; do port_busy "$port" && die "port $port is in use; set PORT_BASE"; done

RESULTS=$WORK/results.txt
: >"$RESULTS"
for delay in $DELAYS; do
    for target in $TARGETS; do
        key=p-$NONCE-$target-$delay
        case $target in
        layer-*)
            start "$PX_PORT" "$WORK/$target-$delay.log" "$APP_BIN" "${target#layer-}" "127.0.0.1:$PX_PORT" "$delay"
            url=http://127.0.0.1:$PX_PORT/payments
            stats=http://127.0.0.1:$PX_PORT/__stats
            ;;
        *)
            start "$UP_PORT" "$WORK/upstream-$target-$delay.log" "$APP_BIN" bare "127.0.0.1:$UP_PORT" "$delay"
            stats=http://127.0.0.1:$UP_PORT/__stats
            case $target in
            idem-memory | idem-redis)
                store=memory:
                [ "$target" = idem-redis ] && store=${REDIS_URL%/}/?prefix=$REDIS_PREFIX
                start "$PX_PORT" "$WORK/$target-$delay.log" "$IDEM_BIN" serve --listen "127.0.0.1:$PX_PORT" \
                    --upstream "http://127.0.0.1:$UP_PORT" --admin-listen off --store "$store"
                url=http://127.0.0.1:$PX_PORT/payments
                ;;
            idempotent-proxy-server)
                # Its settings come from the environment; it insists on a .env file.
                mkdir -p "$WORK/ipx"
                : >"$WORK/ipx/.env"
                start "$PX_PORT" "$WORK/$target-$delay.log" env -C "$WORK/ipx" \
                    SERVER_ADDR="127.0.0.1:$PX_PORT" REDIS_URL="$IPX_REDIS_URL" \
                    URL_PAYMENTS="http://127.0.0.1:$UP_PORT/payments" "$IPX_BIN"
                url=http://127.0.0.1:$PX_PORT/URL_PAYMENTS
                ;;
            esac
            ;;
        esac
        log "$target, upstream delay $delay ms: $N concurrent requests with one key"
        line=$("$PROBE_BIN" "$url" "$stats" "$N" "$key") || die "probe failed against $target"
        echo "$target $delay $line" >>"$RESULTS"
        log "  $line"
        stop_all
    done
done

GIT_REV=$(cd "$ROOT" && git rev-parse --short HEAD 2>/dev/null || echo unknown)
(cd "$ROOT" && git diff --quiet HEAD -- 2>/dev/null) || GIT_REV="$GIT_REV (with uncommitted changes)"
mkdir -p "$(dirname "$OUT")"
{
    echo "# Concurrency probe, $(date -u +%Y-%m-%dT%H:%MZ)"
    echo
    echo "$N clients, one connection each, send the same POST with one Idempotency-Key at once. \"runs\": POSTs the upstream (or the app's handler) counted; \"replayed\": answers with a replay header; \"bodies\": distinct response bodies; \"then\": one more request with the key afterwards (/replayed: it says so; /ran-again: it reached the upstream)."
    echo
    echo "| target | upstream delay | runs | statuses (code: count) | replayed | bodies | errors | p50 | max | then |"
    echo "|---|---:|---:|---|---:|---:|---:|---:|---:|---|"
    while read -r target delay fields; do
        # shellcheck disable=SC2086
        declare $fields
        # shellcheck disable=SC2154
        echo "| $target | $delay ms | $runs | ${statuses//,/, } | $replayed | $bodies | $errors | $p50_ms ms | $max_ms ms | $then |"
    done <"$RESULTS"
    echo
    echo "Release build of $GIT_REV; idempotent-proxy-server $IPX_VERSION; Redis at $REDIS_URL. Load average at the end: $(cut -d' ' -f1-3 /proc/loadavg)."
} | tee "$OUT"
log "written to $OUT"
