#!/usr/bin/env bash
# Benchmark of the idem-http layer inside an axum app, run by hand (not in CI):
#
#   bash bench/layer.sh
#
# One app (bench/layer: POST /payments reads the body, counts, answers 201 with 33 bytes of
# JSON), built once in release, run afresh for each variant with the same load:
#   bare             - the app alone
#   idem             - behind idem_http::IdempotencyLayer over idem_core::MemoryStore
#   idempotent       - behind the `idempotent` crate's IdempotencyLayer (its memory store)
#   axum-idempotent  - behind axum_idempotent::IdempotentLayer (Idempotency-Key header mode)
#                      over a ruts MokaStore session store
# Every request is a POST with a fresh Idempotency-Key and a session cookie cycling over 64
# ids (bench/layer.lua; axum-idempotent caches per session and not at all without one).
# Before its run, each variant is checked once: the same POST twice with one key, counting
# the handler's runs (GET /__stats) and looking for a replay header. The variants run
# ROUNDS times, interleaved (bare, idem, idempotent, axum-idempotent, bare, ...), so drift
# on a busy machine spreads over all of them; the table shows each round and the ratios of
# the medians. bench/layer is a crate of its own (not a workspace member: CI never builds
# the peer crates); it shares this repository's target directory.
#
# Knobs (environment): DURATION (10s), WARMUP (3s), THREADS (2), CONNECTIONS (64),
# ROUNDS (2), VARIANTS ("bare idem idempotent axum-idempotent"), PORT (38090),
# SESSIONS (64), SKIP_BUILD (set: do not build), KEEP (set: keep the work directory),
# OUT (target/bench-layer/results.md; raw figures next to it as .tsv).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
DURATION=${DURATION:-10s}
WARMUP=${WARMUP:-3s}
THREADS=${THREADS:-2}
CONNECTIONS=${CONNECTIONS:-64}
ROUNDS=${ROUNDS:-2}
VARIANTS=${VARIANTS:-bare idem idempotent axum-idempotent}
PORT=${PORT:-38090}
SESSIONS=${SESSIONS:-64}
OUT=${OUT:-$TARGET_DIR/bench-layer/results.md}
CLK_TCK=$(getconf CLK_TCK)
URL=http://127.0.0.1:$PORT/payments
STATS=http://127.0.0.1:$PORT/__stats
BODY='{"amount":1250,"currency":"EUR","customer":"cus_42","note":"idem bench"}'

LOG_TAG=layer.sh
# shellcheck source=bench/lib.sh
. "$ROOT/bench/lib.sh"

for variant in $VARIANTS; do
    case $variant in
    bare | idem | idempotent | axum-idempotent) ;;
    *) die "VARIANTS: unknown variant '$variant'" ;;
    esac
done
if ! command -v wrk >/dev/null; then
    [ "$(id -u)" = 0 ] || die "wrk is needed: apt-get install -y wrk (as root)"
    log "installing wrk"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null
fi
for tool in curl wrk getconf; do command -v "$tool" >/dev/null || die "$tool not found"; done

if [ -z "${SKIP_BUILD:-}" ]; then
    log "building bench/layer (release)"
    # --ignore-rust-version: the `idempotent` crate declares a newer rust-version than the
    # project's toolchain, yet builds with it.
    cargo build --release --quiet --ignore-rust-version \
        --manifest-path "$ROOT/bench/layer/Cargo.toml" --target-dir "$TARGET_DIR"
fi
APP_BIN=$TARGET_DIR/release/idem-layer-bench
[ -x "$APP_BIN" ] || die "$APP_BIN missing"

mkdir -p "$TARGET_DIR/bench-layer"
WORK=$(mktemp -d "$TARGET_DIR/bench-layer/run.XXXXXX")
APP_PID=""
cleanup() {
    [ -n "$APP_PID" ] && stop_pid "$APP_PID"
    if [ -n "${KEEP:-}" ]; then log "kept $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

cpu_ticks() {
    local stat fields
    read -r stat 2>/dev/null <"/proc/$1/stat" || { echo 0; return; }
    read -ra fields <<<"${stat##*) }"
    echo $((fields[11] + fields[12]))
}
peak_rss_kib() { awk '/^VmHWM:/ { print $2 }' "/proc/$1/status" 2>/dev/null || echo 0; }
posts() { curl -sf --max-time 5 "$STATS" | sed 's/[^0-9]//g'; }
# Share of all cores that processes other than wrk and the app took: user + nice + system
# of the whole machine, less theirs (as /proc/stat and /proc/PID/stat count them).
machine_ticks() {
    local _cpu user nice system idle iowait irq softirq steal _rest
    read -r _cpu user nice system idle iowait irq softirq steal _rest </proc/stat
    echo "$((user + nice + system)) $((user + nice + system + idle + iowait + irq + softirq + steal))"
}

port_busy "$PORT" && die "port $PORT is in use; set PORT"

# Runs wrk for DURATION with SCRIPT's ARGS; writes its output and "WRKCPU ticks" (its utime
# + stime) to FILE.
run_wrk() {
    local file=$1 duration=$2
    shift 2
    bash -c '
        out=$1; shift
        "$@" >"$out" 2>&1; rc=$?
        read -r stat </proc/$$/stat; read -ra f <<<"${stat##*) }"
        echo "WRKCPU $((f[13] + f[14]))" >>"$out"
        exit $rc' _ "$file" timeout 300 wrk -t"$THREADS" -c"$CONNECTIONS" -d"$duration" --latency \
        -s "$ROOT/bench/layer.lua" "$URL" -- "$@" || die "wrk failed: $(tail -3 "$file")"
}

start_app() {
    local variant=$1
    "$APP_BIN" "$variant" "127.0.0.1:$PORT" >"$WORK/app-$variant.log" 2>&1 &
    APP_PID=$!
    wait_port "$PORT" "$APP_PID" "$WORK/app-$variant.log"
}

# The same POST twice with one key: how many times the handler ran, whether the second
# answer says it is a replay, and whether both bodies match.
check_replay() {
    local variant=$1 key=check-$variant-$RANDOM$RANDOM p0 p1 h2
    p0=$(posts)
    curl -s -o "$WORK/first.txt" -H 'Content-Type: application/json' -H "Idempotency-Key: $key" \
        -H 'Cookie: session=benchsess000000000001A' --data-binary "$BODY" "$URL"
    h2=$(curl -s -D - -o "$WORK/second.txt" -H 'Content-Type: application/json' \
        -H "Idempotency-Key: $key" -H 'Cookie: session=benchsess000000000001A' \
        --data-binary "$BODY" "$URL" | tr -d '\r')
    p1=$(posts)
    local runs=$((p1 - p0)) replayed=no same=no
    grep -qiE '^(idempotent|idempotency)-replayed: *true' <<<"$h2" && replayed=yes
    cmp -s "$WORK/first.txt" "$WORK/second.txt" && same=yes
    echo "$runs $replayed $same"
}

RESULTS=$WORK/results.tsv
: >"$RESULTS"
declare -A CHECK
LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)
LOAD_MAX=0
nonce=$(date +%s)-$$
for round in $(seq "$ROUNDS"); do
    for variant in $VARIANTS; do
        start_app "$variant"
        [ "$round" = 1 ] && CHECK[$variant]=$(check_replay "$variant")
        log "round $round / $variant: warm-up $WARMUP, then $DURATION"
        run_wrk "$WORK/warm.txt" "$WARMUP" "$nonce-$round-$variant-w" "$SESSIONS"
        p0=$(posts)
        c0=$(cpu_ticks "$APP_PID")
        m0=$(machine_ticks)
        run_wrk "$WORK/wrk.txt" "$DURATION" "$nonce-$round-$variant-m" "$SESSIONS"
        m1=$(machine_ticks)
        c1=$(cpu_ticks "$APP_PID")
        p1=$(posts)
        rss=$(peak_rss_kib "$APP_PID")
        read -r now _ </proc/loadavg
        LOAD_MAX=$(awk -v a="$LOAD_MAX" -v b="$now" 'BEGIN { print (b > a ? b : a) }')
        stop_pid "$APP_PID"
        APP_PID=""
        result=$(grep '^RESULT ' "$WORK/wrk.txt") || die "no RESULT from wrk: $(tail -3 "$WORK/wrk.txt")"
        wrkcpu=$(awk '/^WRKCPU/ { print $2 }' "$WORK/wrk.txt")
        # requests= duration_us= p50_us= p99_us= status_errors= socket_errors=
        eval "${result#RESULT }"
        read -r mb0 mt0 <<<"$m0"
        read -r mb1 mt1 <<<"$m1"
        # shellcheck disable=SC2154
        printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$round" "$variant" "$requests" \
            "$duration_us" "$p50_us" "$p99_us" "$((status_errors + socket_errors))" "$((c1 - c0))" \
            "$rss" "$((p1 - p0))" "$((mb1 - mb0))" "$((mt1 - mt0))" "$wrkcpu" >>"$RESULTS"
        [ "$((status_errors + socket_errors))" = 0 ] ||
            log "warning: $variant had $status_errors non-2xx answers and $socket_errors socket errors"
    done
done
LOAD_AFTER=$(cut -d' ' -f1-3 /proc/loadavg)

CHECKS=""
for variant in $VARIANTS; do CHECKS="$CHECKS $variant=${CHECK[$variant]// /,}"; done

REPORT=$(awk -F'\t' -v hz="$CLK_TCK" -v checks="$CHECKS" '
    function rate(r) { return r >= 1000 ? sprintf("%.1f k", r / 1000) : sprintf("%.0f", r) }
    function ms(us) { return us >= 10000 ? sprintf("%.0f ms", us / 1000) : sprintf("%.2f ms", us / 1000) }
    function median(list,    n, a, i, j, t) {
        n = split(list, a, " ")
        for (i = 1; i <= n; i++) for (j = i + 1; j <= n; j++) if (a[j] + 0 < a[i] + 0) { t = a[i]; a[i] = a[j]; a[j] = t }
        return n % 2 ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2
    }
    {
        v = $2; r = $3 / ($4 / 1e6)
        if (!(v in seen)) { seen[v] = 1; order[++nv] = v }
        rps[v] = rps[v] " " r; p50[v] = p50[v] " " $5; p99[v] = p99[v] " " $6
        cells[v] = cells[v] (cells[v] == "" ? "" : " / ") rate(r)
        p50c[v] = p50c[v] (p50c[v] == "" ? "" : " / ") ms($5)
        p99c[v] = p99c[v] (p99c[v] == "" ? "" : " / ") ms($6)
        cpu[v] = cpu[v] " " ($8 * 1e6 / hz / $3)
        errs[v] += $7; runs[v] += $10; reqs[v] += $3
        if ($9 > rss[v]) rss[v] = $9
        other = $11 - $8 - $13
        busy[v] = busy[v] (busy[v] == "" ? "" : " / ") sprintf("%.0f%%", $12 > 0 && other > 0 ? 100 * other / $12 : 0)
        wcpu[v] = wcpu[v] " " ($13 * 1e6 / hz / $3)
    }
    END {
        n = split(checks, cs, " ")
        for (i = 1; i <= n; i++) { split(cs[i], kv, "="); split(kv[2], f, ","); crun[kv[1]] = f[1]; crep[kv[1]] = f[2]; csame[kv[1]] = f[3] }
        for (i = 1; i <= nv; i++) { v = order[i]; m[v] = median(rps[v]) }
        best = ""
        for (i = 1; i <= nv; i++) { v = order[i]; if (v != "bare" && v != "idem" && (best == "" || m[v] > m[best])) best = v }
        print "| variant | req/s (each round) | p50 | p99 | median req/s | ÷ bare | idem ÷ this | p50 ÷ bare | p99 ÷ bare | CPU µs/req wrk / app | peak RSS | handler runs per request | replay check: runs for 2 POSTs / replay header / same body | other | errors |"
        print "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|"
        for (i = 1; i <= nv; i++) {
            v = order[i]
            printf "| %s | %s | %s | %s | %s | %s | %s | %s | %s | %.1f / %.1f | %.1f MiB | %.3f | %s / %s / %s | %s | %d |\n",
                v, cells[v], p50c[v], p99c[v], rate(m[v]),
                ("bare" in m && m["bare"] > 0 ? sprintf("%.2f×", m[v] / m["bare"]) : "–"),
                (v != "bare" && v != "idem" && "idem" in m ? sprintf("%.2f×", m["idem"] / m[v]) : "–"),
                ("bare" in m ? sprintf("%.1f×", median(p50[v]) / median(p50["bare"])) : "–"),
                ("bare" in m ? sprintf("%.1f×", median(p99[v]) / median(p99["bare"])) : "–"),
                median(wcpu[v]), median(cpu[v]), rss[v] / 1024, (reqs[v] > 0 ? runs[v] / reqs[v] : 0),
                crun[v], crep[v], csame[v], busy[v], errs[v]
        }
        print ""
        if (best != "" && "idem" in m) {
            print "| target | needed | this run | |"
            print "|---|---:|---:|---|"
            if ("bare" in m) {
                r = m["idem"] / m["bare"]; printf "| idem ÷ bare, req/s | ≥ 0.9× | %.2f× | %s |\n", r, (r >= 0.9 ? "**met**" : "**missed**")
                r = median(p99["idem"]) / median(p99["bare"]); printf "| idem p99 ÷ bare p99 | ≤ 2× | %.1f× | %s |\n", r, (r <= 2 ? "**met**" : "**missed**")
            }
            r = m["idem"] / m[best]; printf "| idem ÷ best peer (%s), req/s | ≥ 1.3× | %.2f× | %s |\n", best, r, (r >= 1.3 ? "**met**" : "**missed**")
        }
    }' "$RESULTS")

CPU_MODEL=$(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo)
GIT_REV=$(cd "$ROOT" && git rev-parse --short HEAD 2>/dev/null || echo unknown)
(cd "$ROOT" && git diff --quiet HEAD -- 2>/dev/null) || GIT_REV="$GIT_REV (with uncommitted changes)"
VERSIONS=$(awk '/^name = "(idempotent|axum-idempotent|ruts|axum|hyper|tokio)"$/ { n = $3; getline; printf "%s %s, ", n, $3 }' \
    "$ROOT/bench/layer/Cargo.lock" | tr -d '"' | sed 's/, $//')
mkdir -p "$(dirname "$OUT")"
{
    echo "# idem-http layer benchmark, $(date -u +%Y-%m-%dT%H:%MZ)"
    echo
    echo "wrk -t$THREADS -c$CONNECTIONS -d$DURATION --latency after a $WARMUP warm-up, new keys (bench/layer.lua, $SESSIONS session cookies), $ROUNDS interleaved rounds; each app started afresh. \"idem ÷ this\": idem's median req/s over this peer's. \"CPU µs/req\": CPU time (user + system) per request of wrk and of the app (medians over the rounds). \"other\": CPU that every other process took during each round, as a share of all cores (a disturbance: near 0% on a quiet machine). Ratios are of medians over the rounds."
    echo
    echo "$REPORT"
    echo
    echo "Machine: $(nproc) cores ($CPU_MODEL), Linux $(uname -r); $(rustc -V 2>/dev/null || echo rustc unknown), release build of $GIT_REV; $VERSIONS. Load average before: $LOAD_BEFORE, after: $LOAD_AFTER, highest 1-minute load at the end of a run: $LOAD_MAX."
} | tee "$OUT"
cp "$RESULTS" "${OUT%.md}.tsv"
log "written to $OUT"
