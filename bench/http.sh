#!/usr/bin/env bash
# HTTP benchmark of the `idem serve` gateway, run by hand (not in CI):
#
#   bash bench/http.sh
#
# In one run, drives a trivial upstream (crates/idem-cli/examples/bench-upstream.rs)
#   direct   - wrk straight to the upstream
#   nginx    - through nginx as a plain reverse proxy, keep-alive to the upstream
#   memory   - through `idem serve --store memory:`
#   redb     - through `idem serve --store redb:FILE` (FILE on the project's disk)
# with two workloads:
#   new      - every request a POST with a fresh Idempotency-Key (bench/new_keys.lua)
#   replay   - POSTs cycling over REPLAY_KEYS keys completed beforehand (bench/replay.lua)
#   nokey    - (memory only) the same POSTs without a key, which idem passes through
#              unprotected: its cost as a plain reverse proxy, for comparison
# and prints a markdown table (req/s, p50, p99, ratios to direct and to nginx, peak RSS,
# CPU time per request of wrk, the proxy and the upstream, and the CPU that interrupts,
# kernel threads and other processes took), also written to $OUT.
#
# Every proxy (nginx, idem) is started fresh for each workload, so its peak RSS (VmHWM) is
# that workload's. Loopback only; every step is bounded; a trap stops what it started.
#
# Knobs (environment): DURATION (10s), WARMUP (3s), THREADS (2), CONNECTIONS (64),
# REPLAY_KEYS (100), PORT_BASE (38080: uses +1..+3), NGINX_WORKERS (nproc),
# SKIP_BUILD (set: do not build), KEEP (set: keep the work directory with logs and wrk
# output), OUT (target/bench-http/results.md; the raw figures go next to it as .tsv).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
DURATION=${DURATION:-10s}
WARMUP=${WARMUP:-3s}
THREADS=${THREADS:-2}
CONNECTIONS=${CONNECTIONS:-64}
REPLAY_KEYS=${REPLAY_KEYS:-100}
PORT_BASE=${PORT_BASE:-38080}
NGINX_WORKERS=${NGINX_WORKERS:-$(nproc)}
OUT=${OUT:-$TARGET_DIR/bench-http/results.md}

UP_PORT=$((PORT_BASE + 1))
NGINX_PORT=$((PORT_BASE + 2))
IDEM_PORT=$((PORT_BASE + 3))
UPSTREAM=http://127.0.0.1:$UP_PORT
REQ_PATH=/payments
CLK_TCK=$(getconf CLK_TCK)
NONCE=$(date +%s)-$$

log() { printf '[http.sh] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

# --- tools ---------------------------------------------------------------------------
if ! command -v wrk >/dev/null || ! command -v nginx >/dev/null; then
    [ "$(id -u)" = 0 ] || die "wrk and nginx are needed: apt-get install -y wrk nginx (as root)"
    log "installing wrk and nginx"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk nginx >/dev/null
fi
for tool in curl wrk nginx pgrep getconf; do
    command -v "$tool" >/dev/null || die "$tool not found"
done

if [ -z "${SKIP_BUILD:-}" ]; then
    log "building (release)"
    (cd "$ROOT" && cargo build --release --quiet -p idem-cli --bin idem --example bench-upstream)
fi
IDEM_BIN=$TARGET_DIR/release/idem
UP_BIN=$TARGET_DIR/release/examples/bench-upstream
[ -x "$IDEM_BIN" ] && [ -x "$UP_BIN" ] || die "binaries missing in $TARGET_DIR/release"

# The request body, exactly as the wrk scripts send it (for seeding replay keys).
BODY=$(sed -n "s/^local body = '\(.*\)'$/\1/p" "$ROOT/bench/replay.lua")
[ -n "$BODY" ] || die "cannot read the body from bench/replay.lua"

# --- work directory, on the project's disk (the redb file must not be on a tmpfs) ------
mkdir -p "$TARGET_DIR/bench-http"
WORK=$(mktemp -d "$TARGET_DIR/bench-http/run.XXXXXX")
WORK_FS=$(findmnt -no FSTYPE -T "$WORK" 2>/dev/null || stat -f -c %T "$WORK")
[ "$WORK_FS" = tmpfs ] && log "warning: $WORK is on a tmpfs; redb figures will not reflect a disk"

PIDS=()
cleanup() {
    local pid
    for pid in "${PIDS[@]}"; do stop_pid "$pid"; done
    if [ -n "${KEEP:-}" ]; then log "kept $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Whether PID is still running (a zombie counts as ended).
alive() {
    local stat
    read -r stat 2>/dev/null <"/proc/$1/stat" || return 1
    stat=${stat##*) }
    [ "${stat%% *}" != Z ]
}

# Stops one process this script started: TERM, then KILL after 5 s.
stop_pid() {
    local pid=$1 i
    kill -TERM "$pid" 2>/dev/null || return 0
    for i in $(seq 50); do alive "$pid" || break; sleep 0.1; done
    alive "$pid" && kill -KILL "$pid" 2>/dev/null
    wait "$pid" 2>/dev/null || true
}

forget_pid() {
    local keep=() pid
    for pid in "${PIDS[@]}"; do [ "$pid" = "$1" ] || keep+=("$pid"); done
    PIDS=("${keep[@]}")
}

port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# Waits until PORT accepts connections; fails (showing LOG) if PID ends or 10 s pass.
wait_port() {
    local port=$1 pid=$2 log=$3 i
    for i in $(seq 100); do
        port_busy "$port" && return 0
        alive "$pid" || break
        sleep 0.1
    done
    log "nothing listens on port $port; the end of $log:"
    tail -n 20 "$log" >&2 || true
    die "could not start the process on port $port"
}

# utime + stime of processes, in clock ticks.
cpu_ticks() {
    local pid stat total=0 fields
    for pid in "$@"; do
        read -r stat 2>/dev/null <"/proc/$pid/stat" || continue
        read -ra fields <<<"${stat##*) }"
        total=$((total + fields[11] + fields[12]))
    done
    echo "$total"
}

# utime + stime of all kernel threads (children of kthreadd: ksoftirqd, kworker, jbd2...).
kthread_ticks() {
    local file stat fields total=0
    for file in /proc/[0-9]*/stat; do
        read -r stat 2>/dev/null <"$file" || continue
        read -ra fields <<<"${stat##*) }"
        [ "${fields[1]}" = 2 ] && total=$((total + fields[11] + fields[12]))
    done
    echo "$total"
}

# Clock ticks of the whole machine: in processes (user, nice, system), in interrupts
# (irq, softirq: loopback TCP is largely here), and in all.
machine_ticks() {
    local _cpu user nice system idle iowait irq softirq steal _rest
    read -r _cpu user nice system idle iowait irq softirq steal _rest </proc/stat
    echo "$((user + nice + system)) $((irq + softirq)) $((user + nice + system + idle + iowait + irq + softirq + steal))"
}

# Sum of VmHWM (peak RSS) of processes, in KiB.
peak_rss_kib() {
    local pid total=0 kib
    for pid in "$@"; do
        kib=$(awk '/^VmHWM:/ { print $2 }' "/proc/$pid/status" 2>/dev/null || true)
        total=$((total + ${kib:-0}))
    done
    echo "$total"
}

upstream_posts() { curl -sf "$UPSTREAM/__stats" | sed 's/[^0-9]//g'; }

for port in "$UP_PORT" "$NGINX_PORT" "$IDEM_PORT"; do
    port_busy "$port" && die "port $port is in use; set PORT_BASE"
done

# --- the upstream ----------------------------------------------------------------------
"$UP_BIN" "127.0.0.1:$UP_PORT" >"$WORK/upstream.log" 2>&1 &
UP_PID=$!
PIDS+=("$UP_PID")
wait_port "$UP_PORT" "$UP_PID" "$WORK/upstream.log"

# --- nginx config ----------------------------------------------------------------------
mkdir -p "$WORK/nginx/tmp"
cat >"$WORK/nginx/nginx.conf" <<EOF
worker_processes $NGINX_WORKERS;
pid $WORK/nginx/nginx.pid;
error_log $WORK/nginx/error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    client_body_temp_path $WORK/nginx/tmp/body;
    proxy_temp_path $WORK/nginx/tmp/proxy;
    fastcgi_temp_path $WORK/nginx/tmp/fastcgi;
    uwsgi_temp_path $WORK/nginx/tmp/uwsgi;
    scgi_temp_path $WORK/nginx/tmp/scgi;
    keepalive_requests 10000000;
    upstream bench_upstream {
        server 127.0.0.1:$UP_PORT;
        keepalive 256;
        keepalive_requests 10000000;
    }
    server {
        listen 127.0.0.1:$NGINX_PORT;
        location / {
            proxy_pass http://bench_upstream;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto \$scheme;
            proxy_set_header X-Forwarded-Host \$host;
        }
    }
}
EOF
nginx -t -q -p "$WORK/nginx" -c "$WORK/nginx/nginx.conf" -e "$WORK/nginx/error.log" ||
    die "nginx rejects the generated config ($WORK/nginx/nginx.conf)"

# Starts TARGET's proxy; sets PROXY_PID (main process) and PROXY_PIDS (all its processes).
start_proxy() {
    local target=$1 workload=$2 pid
    case $target in
    direct) PROXY_PID=""; PROXY_PIDS=(); return ;;
    nginx)
        nginx -p "$WORK/nginx" -c "$WORK/nginx/nginx.conf" -e "$WORK/nginx/error.log" \
            -g 'daemon off;' >"$WORK/nginx.log" 2>&1 &
        pid=$!
        PIDS+=("$pid")
        wait_port "$NGINX_PORT" "$pid" "$WORK/nginx/error.log"
        sleep 0.2
        mapfile -t PROXY_PIDS < <(echo "$pid"; pgrep -P "$pid")
        ;;
    memory | redb)
        local store=memory:
        [ "$target" = redb ] && store=redb:$WORK/idem-$workload.redb
        "$IDEM_BIN" serve --listen "127.0.0.1:$IDEM_PORT" --upstream "$UPSTREAM" \
            --store "$store" >"$WORK/idem-$target-$workload.log" 2>&1 &
        pid=$!
        PIDS+=("$pid")
        wait_port "$IDEM_PORT" "$pid" "$WORK/idem-$target-$workload.log"
        PROXY_PIDS=("$pid")
        ;;
    esac
    PROXY_PID=$pid
}

url_for() {
    case $1 in
    direct) echo "$UPSTREAM$REQ_PATH" ;;
    nginx) echo "http://127.0.0.1:$NGINX_PORT$REQ_PATH" ;;
    *) echo "http://127.0.0.1:$IDEM_PORT$REQ_PATH" ;;
    esac
}

# Completes the replay keys r-NONCE-1..REPLAY_KEYS through URL (one curl for all).
seed_replays() {
    local url=$1 nonce=$2 k args=() codes
    for k in $(seq "$REPLAY_KEYS"); do
        [ "$k" -gt 1 ] && args+=(--next)
        args+=(-s -o /dev/null -w '%{http_code}\n' -H 'Content-Type: application/json'
            -H "Idempotency-Key: r-$nonce-$k" --data-binary "$BODY" "$url")
    done
    codes=$(curl --max-time 30 "${args[@]}" | sort | uniq -c | tr -s ' \n' ' ')
    [ "$codes" = " $REPLAY_KEYS 201 " ] || die "seeding $url answered: $codes"
}

# Runs wrk; writes its output and "WRKCPU ticks" (its utime + stime) to FILE.
run_wrk() {
    local file=$1 duration=$2 script=$3 url=$4
    shift 4
    bash -c '
        out=$1; shift
        "$@" >"$out" 2>&1; rc=$?
        read -r stat </proc/$$/stat; read -ra f <<<"${stat##*) }"
        echo "WRKCPU $((f[13] + f[14]))" >>"$out"
        exit $rc' _ "$file" \
        timeout 300 wrk -t"$THREADS" -c"$CONNECTIONS" -d"$duration" --latency \
        -s "$ROOT/bench/$script" "$url" -- "$@" ||
        die "wrk failed: $(tail -5 "$file")"
}

RESULTS=$WORK/results.tsv
: >"$RESULTS"

# One measurement: fresh proxy, seed (replay), warm up, measure, record, stop.
measure() {
    local target=$1 workload=$2 url script nonce args_w args_m
    url=$(url_for "$target")
    nonce=$NONCE-$target
    start_proxy "$target" "$workload"
    case $workload in
    new)
        script=new_keys.lua
        args_w=("$nonce-w")
        args_m=("$nonce-m")
        ;;
    nokey)
        script=new_keys.lua
        args_w=(none)
        args_m=(none)
        ;;
    replay)
        script=replay.lua
        seed_replays "$url" "$nonce"
        if [ "$target" = memory ] || [ "$target" = redb ]; then
            curl -s -D - -o /dev/null -H 'Content-Type: application/json' \
                -H "Idempotency-Key: r-$nonce-1" --data-binary "$BODY" "$url" |
                grep -qi '^idempotent-replayed: true' || die "$target does not replay r-$nonce-1"
        fi
        args_w=("$nonce" "$REPLAY_KEYS")
        args_m=("$nonce" "$REPLAY_KEYS")
        ;;
    esac
    log "$workload / $target: warm-up $WARMUP, then $DURATION"
    run_wrk "$WORK/wrk-warm.txt" "$WARMUP" "$script" "$url" "${args_w[@]}"

    local posts0 posts1 up0 up1 px0 px1 m0 m1 k0 k1 rss
    posts0=$(upstream_posts)
    up0=$(cpu_ticks "$UP_PID")
    px0=$(cpu_ticks "${PROXY_PIDS[@]}")
    k0=$(kthread_ticks)
    m0=$(machine_ticks)
    run_wrk "$WORK/wrk-$target-$workload.txt" "$DURATION" "$script" "$url" "${args_m[@]}"
    m1=$(machine_ticks)
    k1=$(kthread_ticks)
    px1=$(cpu_ticks "${PROXY_PIDS[@]}")
    up1=$(cpu_ticks "$UP_PID")
    posts1=$(upstream_posts)
    rss=$(peak_rss_kib "${PROXY_PIDS[@]}")
    if [ -n "$PROXY_PID" ]; then
        stop_pid "$PROXY_PID"
        forget_pid "$PROXY_PID"
    fi

    local result wrkcpu
    result=$(grep '^RESULT ' "$WORK/wrk-$target-$workload.txt") || die "no RESULT line from wrk"
    wrkcpu=$(awk '/^WRKCPU/ { print $2 }' "$WORK/wrk-$target-$workload.txt")
    # shellcheck disable=SC2086
    local $(echo "${result#RESULT }")
    local mp0 mi0 mt0 mp1 mi1 mt1
    read -r mp0 mi0 mt0 <<<"$m0"
    read -r mp1 mi1 mt1 <<<"$m1"
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' \
        "$workload" "$target" "$requests" "$duration_us" "$p50_us" "$p99_us" \
        "$status_errors" "$socket_errors" "$rss" "$wrkcpu" "$((px1 - px0))" \
        "$((up1 - up0))" "$((mp1 - mp0))" "$((mi1 - mi0))" "$((mt1 - mt0))" \
        "$((posts1 - posts0))" "$((k1 - k0))" >>"$RESULTS"
    if [ "$workload" = replay ] && [ -n "$PROXY_PID" ] && [ "$target" != nginx ] &&
        [ "$((posts1 - posts0))" != 0 ]; then
        log "warning: $((posts1 - posts0)) replays through $target reached the upstream"
    fi
    [ "$status_errors" = 0 ] && [ "$socket_errors" = 0 ] ||
        log "warning: $workload / $target had $status_errors non-2xx/3xx answers and $socket_errors socket errors"
}

LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)
for run in new:direct new:nginx new:memory new:redb nokey:memory \
    replay:direct replay:nginx replay:memory replay:redb; do
    measure "${run#*:}" "${run%%:*}"
done
LOAD_AFTER=$(cut -d' ' -f1-3 /proc/loadavg)

# --- report ----------------------------------------------------------------------------
WRK_VERSION=$(wrk -v 2>&1 | head -1 | awk '{ print $2 }' || true)
NGINX_VERSION=$(nginx -v 2>&1 | sed 's|.*nginx/||')
GIT_REV=$(cd "$ROOT" && git rev-parse --short HEAD 2>/dev/null || echo unknown)
(cd "$ROOT" && git diff --quiet HEAD -- 2>/dev/null) || GIT_REV="$GIT_REV (with uncommitted changes)"
CPU_MODEL=$(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo)
MEM_GIB=$(awk '/^MemTotal:/ { printf "%.0f", $2 / 1048576 }' /proc/meminfo)

REPORT=$(
    awk -F'\t' -v hz="$CLK_TCK" -v conns="$CONNECTIONS" -v threads="$THREADS" \
        -v dur="$DURATION" -v keys="$REPLAY_KEYS" '
    function rate(r) { return r >= 1000 ? sprintf("%.1f k", r / 1000) : sprintf("%.0f", r) }
    function ms(us) { return us >= 10000 ? sprintf("%.0f ms", us / 1000) : sprintf("%.2f ms", us / 1000) }
    function ratio(a, b) { return b > 0 ? sprintf("%.2f×", a / b) : "–" }
    function mib(k) { return sprintf("%.1f MiB", k / 1024) }
    function us_per(ticks, n) { return n > 0 ? sprintf("%.1f", ticks * 1e6 / hz / n) : "–" }
    function verdict(ok) { return ok ? "**met**" : "**missed**" }
    {
        w = $1; t = $2; key = w SUBSEP t
        rps[key] = $3 / ($4 / 1e6); n[key] = $3; p50[key] = $5; p99[key] = $6
        errs[key] = $7 + $8; rss[key] = $9; wcpu[key] = $10; pcpu[key] = $11; ucpu[key] = $12
        kthr[key] = $17; other[key] = $13 - $10 - $11 - $12 - $17
        irq[key] = $14; total[key] = $15; posts[key] = $16
        order[++rows] = key
    }
    END {
        label["new"] = "new keys"; label["replay"] = "replays"; label["nokey"] = "no key (pass-through)"
        name["direct"] = "direct"; name["nginx"] = "nginx"
        name["memory"] = "idem memory:"; name["redb"] = "idem redb:"
        printf "wrk -t%s -c%s -d%s --latency; replays cycle over %s keys; \"no key\" rows are compared with the new-key rows of direct and nginx (same POSTs, with a key). \"CPU µs/req\": CPU time (user + system) per request of wrk, the proxy and the upstream. \"irq\": interrupt and softirq time, \"kthreads\": kernel threads (ksoftirqd carrying loopback TCP, jbd2 and kworkers doing fsync), \"other\": every other process on the machine (a disturbance: should be near 0%%); each a share of all cores during the run.\n\n", threads, conns, dur, keys
        print "| workload | path | req/s | p50 | p99 | ÷ direct | ÷ nginx | peak RSS | CPU µs/req wrk / proxy / upstream | irq | kthreads | other | upstream POSTs | errors |"
        print "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
        for (i = 1; i <= rows; i++) {
            key = order[i]; split(key, kt, SUBSEP); w = kt[1]; t = kt[2]
            base = w == "nokey" ? "new" : w
            d = rps[base SUBSEP "direct"]; g = rps[base SUBSEP "nginx"]
            proxy = t == "direct" ? "–" : us_per(pcpu[key], n[key])
            printf "| %s | %s | %s | %s | %s | %s | %s | %s | %s / %s / %s | %.0f%% | %.0f%% | %.0f%% | %d | %d |\n",
                label[w], name[t], rate(rps[key]), ms(p50[key]), ms(p99[key]),
                ratio(rps[key], d), (t == "direct" ? "–" : ratio(rps[key], g)),
                (t == "direct" ? "–" : mib(rss[key])),
                us_per(wcpu[key], n[key]), proxy, us_per(ucpu[key], n[key]),
                (total[key] > 0 ? 100 * irq[key] / total[key] : 0),
                (total[key] > 0 ? 100 * kthr[key] / total[key] : 0),
                (total[key] > 0 && other[key] > 0 ? 100 * other[key] / total[key] : 0), posts[key], errs[key]
        }
        g_new = rps["new" SUBSEP "nginx"]; g_rep = rps["replay" SUBSEP "nginx"]
        print ""
        print "| target | needed | this run | |"
        print "|---|---:|---:|---|"
        r = rps["new" SUBSEP "memory"] / g_new
        printf "| new keys, idem memory: ÷ nginx | ≥ 1.0× | %.2f× | %s |\n", r, verdict(r >= 1.0)
        r = rps["new" SUBSEP "redb"] / g_new
        printf "| new keys, idem redb: ÷ nginx | ≥ 0.8× | %.2f× | %s |\n", r, verdict(r >= 0.8)
        r = rps["replay" SUBSEP "memory"] / g_rep
        printf "| replays, idem memory: ÷ nginx | ≥ 1.5× | %.2f× | %s |\n", r, verdict(r >= 1.5)
        r = rps["replay" SUBSEP "redb"] / g_rep
        printf "| replays, idem redb: ÷ nginx | ≥ 1.5× | %.2f× | %s |\n", r, verdict(r >= 1.5)
        for (i = 1; i <= rows; i++) {
            key = order[i]; split(key, kt, SUBSEP)
            if ((kt[2] == "memory" || kt[2] == "redb") && kt[1] != "nokey")
                printf "| peak RSS, %s, %s | < 64 MiB | %s | %s |\n", label[kt[1]], name[kt[2]], mib(rss[key]), verdict(rss[key] < 65536)
        }
    }' "$RESULTS"
)

MACHINE="Machine: $(nproc) cores ($CPU_MODEL), ${MEM_GIB} GiB, Linux $(uname -r); wrk $WRK_VERSION, nginx $NGINX_VERSION ($NGINX_WORKERS workers); $(rustc -V 2>/dev/null || echo rustc unknown), release build of $GIT_REV; redb file on $WORK_FS (project disk). Load average before: $LOAD_BEFORE, after: $LOAD_AFTER."

mkdir -p "$(dirname "$OUT")"
{
    echo "# HTTP gateway benchmark, $(date -u +%Y-%m-%dT%H:%MZ)"
    echo
    echo '```sh'
    echo "bash bench/http.sh"
    echo '```'
    echo
    echo "$REPORT"
    echo
    echo "$MACHINE"
} | tee "$OUT"
cp "$RESULTS" "${OUT%.md}.tsv"
log "written to $OUT (raw figures: ${OUT%.md}.tsv)"
