#!/usr/bin/env bash
# HTTP benchmark of the `idem serve` gateway, run by hand (not in CI):
#
#   bash bench/http.sh
#
# In one run, drives a trivial upstream (crates/idem-cli/examples/bench-upstream.rs)
#   direct   - wrk straight to the upstream
#   nginx    - through nginx as a plain reverse proxy, keep-alive to the upstream
#   memory   - through `idem serve --store memory:?max_bytes=2GiB` (MEMORY_STORE; the
#              default 16 MiB cap would fill during the run and answer 503)
#   fjall    - through `idem serve --store fjall:DIR` (the default durable store; DIR on
#              the project's disk)
#   redb     - through `idem serve --store redb:FILE` (FILE on the project's disk)
#   redis    - through `idem serve --store redis://…/?prefix=idem-bench-RANDOM` (REDIS_URL)
#   postgres - through `idem serve --store postgres://…?table=idem_bench_RANDOM.records`
#              (PG_URL; the schema is created before and dropped after)
#   idempotent-proxy-server
#            - (with redis; PEERS) the crates.io reverse proxy with an idempotency cache of
#              that name, on the same Redis (database IPX_REDIS_DB; its keys carry no
#              prefix of their own, but each holds this run's nonce, and exactly those are
#              deleted at the end), forwarding to the same upstream (its URL_PAYMENTS
#              variable); installed with `cargo install --locked` into
#              ~/.cache/idem/bench-tools when missing (its lock file's aws-lc-sys needs
#              cmake: installed with apt-get when missing)
#   pgbench  - (with postgres) no HTTP: pgbench running the Postgres store's own begin and
#              complete statements (bench/pg_begin_complete.sql), one transaction per new
#              key, with as many clients as wrk has connections, and again with the
#              gateway's pool size (10 connections)
# with two workloads:
#   new      - every request a POST with a fresh Idempotency-Key (bench/new_keys.lua)
#   replay   - POSTs cycling over REPLAY_KEYS keys completed beforehand (bench/replay.lua)
#   nokey    - (memory only) the same POSTs without a key, which idem passes through
#              unprotected: its cost as a plain reverse proxy, for comparison
# and prints a markdown table (req/s, p50, p99, ratios to direct and to nginx, peak RSS,
# CPU time per request of wrk, the proxy and the upstream, and of the store's server (Redis,
# Postgres), store calls and store writes per request, and the CPU that interrupts, kernel
# threads and other processes took), also written to $OUT. The Redis prefix's keys are
# deleted at the end.
#
# Every proxy (nginx, idem) is started fresh for each workload, so its peak RSS (VmHWM) is
# that workload's. Loopback only; every step is bounded; a trap stops what it started.
#
# Knobs (environment): DURATION (10s), WARMUP (3s), THREADS (2), CONNECTIONS (64),
# REPLAY_KEYS (100), PORT_BASE (38080: uses +1..+3), NGINX_WORKERS (nproc),
# STORES ("memory fjall redb redis postgres": the idem rows to run; drop redis or postgres when
# no such server is at hand), PEERS ("idempotent-proxy-server" when redis is in STORES; empty: none),
# IPX_VERSION (1.2.2), IPX_REDIS_DB (15), BENCH_TOOLS (~/.cache/idem/bench-tools), REDIS_URL (redis://127.0.0.1:6379, no path or query),
# PG_URL (postgres://postgres@127.0.0.1:5432/test, no query), PGBENCH_CLIENTS
# (CONNECTIONS), PGBENCH_POOL_CLIENTS (10, the gateway's default pool; empty: skip that row),
# PG_POOL (CONNECTIONS: the gateway's pool, the store URL's max_connections),
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
STORES=${STORES-memory fjall redb redis postgres}
# The default cap (16 MiB, ~85 k records) fills within one new-key run here, and a full
# store answers 503 at once: a row of cheap refusals would not measure the path.
# bench/memory_rss.sh runs the default cap.
MEMORY_STORE=${MEMORY_STORE:-memory:?max_bytes=2GiB}
REDIS_URL=${REDIS_URL:-redis://127.0.0.1:6379}
PG_URL=${PG_URL:-postgres://postgres@127.0.0.1:5432/test}
PGBENCH_CLIENTS=${PGBENCH_CLIENTS:-$CONNECTIONS}
PGBENCH_POOL_CLIENTS=${PGBENCH_POOL_CLIENTS-10}
# The gateway's Postgres pool (the store URL's max_connections): as many connections as
# pgbench has clients, so that both sides offer the database the same concurrency (the
# gateway's default is 10: the pgbench row with 10 clients is beside it).
PG_POOL=${PG_POOL:-$CONNECTIONS}
IPX_VERSION=${IPX_VERSION:-1.2.2}
IPX_REDIS_DB=${IPX_REDIS_DB:-15}
BENCH_TOOLS=${BENCH_TOOLS:-$HOME/.cache/idem/bench-tools}

UP_PORT=$((PORT_BASE + 1))
NGINX_PORT=$((PORT_BASE + 2))
IDEM_PORT=$((PORT_BASE + 3))
UPSTREAM=http://127.0.0.1:$UP_PORT
REQ_PATH=/payments
CLK_TCK=$(getconf CLK_TCK)
NONCE=$(date +%s)-$$

LOG_TAG=http.sh
# shellcheck source=bench/lib.sh
. "$ROOT/bench/lib.sh"

has_store() { case " $STORES " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }
# The peers run by default wherever their store does (idempotent-proxy-server: Redis).
if [ -z "${PEERS+set}" ]; then
    PEERS=""
    has_store redis && PEERS=idempotent-proxy-server
fi
has_peer() { case " $PEERS " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }
for peer in $PEERS; do
    case $peer in
    idempotent-proxy-server) has_store redis || die "PEERS: $peer needs redis in STORES" ;;
    *) die "PEERS: unknown peer '$peer' (idempotent-proxy-server)" ;;
    esac
done
for store in $STORES; do
    case $store in
    memory | fjall | redb | redis | postgres) ;;
    *) die "STORES: unknown store '$store' (memory, fjall, redb, redis, postgres)" ;;
    esac
done

# Whole seconds of a wrk duration (10, 10s, 2m), for pgbench -T.
seconds() {
    case $1 in
    *m) echo $((${1%m} * 60)) ;;
    *s) echo "${1%s}" ;;
    *) echo "$1" ;;
    esac
}
# How long idempotent-proxy-server keeps a response (its REQUEST_TIMEOUT, ms): past the
# warm-up and the measured run of one workload.
IPX_TIMEOUT_MS=$((($(seconds "$WARMUP") + $(seconds "$DURATION") + 60) * 1000))
# The port of a store URL, or DEFAULT.
url_port() {
    local port
    port=$(sed -E 's|^[a-z+]*://([^@/]*@)?[^:/?]*(:([0-9]+))?.*$|\3|' <<<"$1")
    echo "${port:-$2}"
}

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
if has_store redis || has_store postgres; then
    command -v ss >/dev/null || die "ss not found (iproute2)"
fi
if has_store redis; then
    command -v redis-cli >/dev/null || die "redis-cli not found: apt-get install -y redis-tools, or leave redis out of STORES"
    [ "$(timeout 5 redis-cli -u "$REDIS_URL" ping 2>&1)" = PONG ] ||
        die "no Redis answers at $REDIS_URL: start one, set REDIS_URL, or leave redis out of STORES"
fi
if has_store postgres; then
    # Debian ships pgbench with the server (postgresql-NN), not always on PATH.
    find_pgbench() {
        command -v pgbench 2>/dev/null ||
            find /usr/lib/postgresql/*/bin -name pgbench 2>/dev/null | sort -V | tail -1
    }
    if ! command -v psql >/dev/null || [ -z "$(find_pgbench)" ]; then
        [ "$(id -u)" = 0 ] || die "psql and pgbench are needed: apt-get install -y postgresql-client postgresql-contrib (as root)"
        log "installing psql and pgbench"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql-client >/dev/null
        [ -n "$(find_pgbench)" ] ||
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql-contrib >/dev/null
    fi
    PGBENCH=$(find_pgbench)
    [ -n "$PGBENCH" ] || die "pgbench not found: apt-get install -y postgresql-contrib"
    timeout 10 psql "$PG_URL" -XAtqc 'SELECT 1' >/dev/null ||
        die "cannot connect to Postgres at $PG_URL: set PG_URL, or leave postgres out of STORES"
fi

if [ -z "${SKIP_BUILD:-}" ]; then
    log "building (release)"
    (cd "$ROOT" && cargo build --release --quiet -p idem-cli --bin idem --example bench-upstream)
fi
IDEM_BIN=$TARGET_DIR/release/idem
IPX_BIN=$BENCH_TOOLS/bin/idempotent-proxy-server
if has_peer idempotent-proxy-server; then
    # It has no --version (it would start serving): cargo's install receipt tells.
    installed=$(grep -o "idempotent-proxy-server $IPX_VERSION " "$BENCH_TOOLS/.crates.toml" 2>/dev/null || true)
    if [ ! -x "$IPX_BIN" ] || [ -z "$installed" ]; then
        if ! command -v cmake >/dev/null; then
            [ "$(id -u)" = 0 ] || die "cmake is needed to build idempotent-proxy-server (aws-lc-sys): apt-get install -y cmake (as root)"
            log "installing cmake (to build idempotent-proxy-server's aws-lc-sys)"
            apt-get update -qq
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq cmake >/dev/null
        fi
        log "installing idempotent-proxy-server $IPX_VERSION into $BENCH_TOOLS (a few minutes)"
        nice -n 10 cargo install --quiet --locked --root "$BENCH_TOOLS" "idempotent-proxy-server@$IPX_VERSION" ||
            die "could not install idempotent-proxy-server $IPX_VERSION"
    fi
fi
UP_BIN=$TARGET_DIR/release/examples/bench-upstream
[ -x "$IDEM_BIN" ] && [ -x "$UP_BIN" ] || die "binaries missing in $TARGET_DIR/release"

# The request body, exactly as the wrk scripts send it (for seeding replay keys).
BODY=$(sed -n "s/^local body = '\(.*\)'$/\1/p" "$ROOT/bench/replay.lua")
[ -n "$BODY" ] || die "cannot read the body from bench/replay.lua"

# --- work directory, on the project's disk (the fjall and redb files must not be on a tmpfs) ------
mkdir -p "$TARGET_DIR/bench-http"
WORK=$(mktemp -d "$TARGET_DIR/bench-http/run.XXXXXX")
WORK_FS=$(findmnt -no FSTYPE -T "$WORK" 2>/dev/null || stat -f -c %T "$WORK")
[ "$WORK_FS" = tmpfs ] && log "warning: $WORK is on a tmpfs; fjall and redb figures will not reflect a disk"

# This run's names in the shared stores: a Redis key prefix and a Postgres schema.
RAND=$(od -An -N4 -tx4 /dev/urandom | tr -d ' \n')
REDIS_PREFIX=idem-bench-$RAND
IPX_REDIS_URL=${REDIS_URL%/}/$IPX_REDIS_DB
PG_SCHEMA=idem_bench_$RAND
PG_SCHEMA_MADE=""

PIDS=()
cleanup() {
    local pid deleted
    for pid in "${PIDS[@]}"; do stop_pid "$pid"; done
    if [ -n "$PG_SCHEMA_MADE" ]; then
        timeout 60 psql "$PG_URL" -XAtqc "DROP SCHEMA IF EXISTS \"$PG_SCHEMA\" CASCADE" >/dev/null 2>&1 &&
            log "dropped the Postgres schema $PG_SCHEMA" ||
            log "warning: could not drop the Postgres schema $PG_SCHEMA"
    fi
    if has_store redis; then
        deleted=$(timeout 300 redis-cli -u "$REDIS_URL" --scan --pattern "$REDIS_PREFIX:*" |
            timeout 300 xargs -r -n 1000 redis-cli -u "$REDIS_URL" del |
            awk '{ n += $1 } END { print n + 0 }') || true
        log "deleted ${deleted:-no} Redis keys under $REDIS_PREFIX:"
    fi
    if has_peer idempotent-proxy-server; then
        # Its keys are "ANON:POST:<Idempotency-Key>", and every key this run sent holds NONCE.
        deleted=$(timeout 300 redis-cli -u "$IPX_REDIS_URL" --scan --pattern "ANON:POST:*-$NONCE-*" |
            timeout 300 xargs -r -n 1000 redis-cli -u "$IPX_REDIS_URL" del |
            awk '{ n += $1 } END { print n + 0 }') || true
        log "deleted ${deleted:-no} idempotent-proxy-server keys (database $IPX_REDIS_DB) of this run"
    fi
    if [ -n "${KEEP:-}" ]; then log "kept $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

if has_store postgres; then
    psql "$PG_URL" -XAtqc "CREATE SCHEMA \"$PG_SCHEMA\"" >/dev/null ||
        die "cannot create the schema $PG_SCHEMA at $PG_URL"
    PG_SCHEMA_MADE=1
fi

forget_pid() {
    local keep=() pid
    for pid in "${PIDS[@]}"; do [ "$pid" = "$1" ] || keep+=("$pid"); done
    PIDS=("${keep[@]}")
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

# utime + stime of each kernel thread (children of kthreadd: ksoftirqd, kworker, jbd2...),
# as "pid ticks" lines in FILE.
kthread_snapshot() {
    local file stat fields
    for file in /proc/[0-9]*/stat; do
        read -r stat 2>/dev/null <"$file" || continue
        read -ra fields <<<"${stat##*) }"
        if [ "${fields[1]}" = 2 ]; then echo "${file//[^0-9]/} $((fields[11] + fields[12]))"; fi
    done >"$1"
}

# Kernel-thread ticks between two snapshots, over the threads alive at the end (kworkers
# come and go: one that ended takes its ticks with it, which must not count as negative).
kthread_delta() { awk 'NR == FNR { before[$1] = $2; next } { n += $2 - before[$1] } END { print n + 0 }' "$1" "$2"; }

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

# --- the shared stores' servers --------------------------------------------------------
# Local servers only: found by their listening port (empty when elsewhere: no CPU figures).
listener_pid() { ss -ltnpH "( sport = :$1 )" 2>/dev/null | sed -n 's/.*pid=\([0-9]*\).*/\1/p' | head -1; }
REDIS_PORT=$(url_port "$REDIS_URL" 6379)
PG_PORT=$(url_port "$PG_URL" 5432)
REDIS_PID="" PG_PID=""
has_store redis && REDIS_PID=$(listener_pid "$REDIS_PORT")
has_store postgres && PG_PID=$(listener_pid "$PG_PORT")

# CPU ticks of a server: its own, its children's (Postgres backends, walwriter...) and
# those of its children that ended (cutime + cstime), so backends that come and go count.
server_ticks() {
    local stat fields
    [ -n "$1" ] && read -r stat 2>/dev/null <"/proc/$1/stat" || { echo -; return; }
    read -ra fields <<<"${stat##*) }"
    # shellcheck disable=SC2046
    echo $((fields[11] + fields[12] + fields[13] + fields[14] + $(cpu_ticks $(pgrep -P "$1"))))
}

store_ticks() {
    case $1 in
    redis | ipx) server_ticks "$REDIS_PID" ;;
    postgres | pgbench*) server_ticks "$PG_PID" ;;
    *) echo - ;;
    esac
}

# Calls into the store so far. Redis: EVALSHA calls (every store operation is one script);
# for idempotent-proxy-server, its SET, GET and DEL commands (of the whole server: other
# clients' commands of those kinds count too).
# Postgres: committed transactions in the database (every store statement is one). A busy
# backend reports them at most once a second, an idle one 10 s later, an ending one at
# once: hence counting from before a proxy starts to after it stopped, after a pause for
# its backends to end.
store_calls() {
    case $1 in
    redis)
        redis-cli -u "$REDIS_URL" info commandstats | tr -d '\r' |
            awk -F'[=,:]' '$1 == "cmdstat_evalsha" { n = $3 } END { print n + 0 }'
        ;;
    ipx)
        # idempotent-proxy-server: SET NX (claim), SET XX (store), GET (replay, poll), DEL.
        redis-cli -u "$REDIS_URL" info commandstats | tr -d '\r' |
            awk -F'[=,:]' '$1 == "cmdstat_set" || $1 == "cmdstat_get" || $1 == "cmdstat_del" { n += $3 } END { print n + 0 }'
        ;;
    postgres | pgbench*)
        sleep 1.2
        psql "$PG_URL" -XAtqc 'SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()'
        ;;
    *) echo - ;;
    esac
}

# TCP data segments sent to PORT by each connection of PIDS ("local-address count" lines):
# the messages a client wrote to its store, pings and the like included.
store_segs() {
    local port=$1
    shift
    ss -tinpH state established "( dport = :$port )" 2>/dev/null | awk -v pids=" $* " '
        /users:\(/ {
            sock = ""
            if (match($0, /pid=[0-9]+/) && index(pids, " " substr($0, RSTART + 4, RLENGTH - 4) " ")) sock = $3
            next
        }
        sock != "" && match($0, /data_segs_out:[0-9]+/) { print sock, substr($0, RSTART + 14, RLENGTH - 14); sock = "" }'
}
segs_delta() { awk 'NR == FNR { before[$1] = $2; next } { n += $2 - before[$1] } END { print n + 0 }' "$1" "$2"; }

for port in "$UP_PORT" "$NGINX_PORT" "$IDEM_PORT"; do
    port_busy "$port" && die "port $port is in use; set PORT_BASE"
done

# --- the upstream ----------------------------------------------------------------------
start "$UP_PORT" "$WORK/upstream.log" "$UP_BIN" "127.0.0.1:$UP_PORT"
UP_PID=$STARTED

# --- nginx config ----------------------------------------------------------------------
write_nginx_conf "$WORK/nginx" "$NGINX_PORT" "$UP_PORT" "$NGINX_WORKERS"

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
    memory | fjall | redb | redis | postgres)
        local store
        case $target in
        memory) store=$MEMORY_STORE ;;
        fjall) store=fjall:$WORK/idem-$workload.fjall ;;
        redb) store=redb:$WORK/idem-$workload.redb ;;
        redis) store=${REDIS_URL%/}/?prefix=$REDIS_PREFIX ;;
        postgres) store=$PG_URL?table=$PG_SCHEMA.records\&max_connections=$PG_POOL ;;
        esac
        # No metrics listener: its default port (9090) may be another gateway's on this
        # machine, and any fixed one can be an outgoing connection's ephemeral port.
        start "$IDEM_PORT" "$WORK/idem-$target-$workload.log" "$IDEM_BIN" serve \
            --listen "127.0.0.1:$IDEM_PORT" --upstream "$UPSTREAM" --admin-listen off --store "$store"
        pid=$STARTED
        PROXY_PIDS=("$pid")
        ;;
    ipx)
        # It reads its settings from the environment and insists on a .env file in its
        # working directory (an empty one here). REQUEST_TIMEOUT (ms) is also how long it
        # keeps a response (10 s by default): set past the warm-up and the run, so that
        # replays stay replays. Logging stays at its default (info: a JSON line per
        # request, as idem logs one per keyed request).
        mkdir -p "$WORK/ipx"
        : >"$WORK/ipx/.env"
        (cd "$WORK/ipx" && exec env SERVER_ADDR="127.0.0.1:$IDEM_PORT" REDIS_URL="$IPX_REDIS_URL" \
            URL_PAYMENTS="$UPSTREAM$REQ_PATH" REQUEST_TIMEOUT="$IPX_TIMEOUT_MS" \
            "$IPX_BIN") >"$WORK/ipx-$workload.log" 2>&1 &
        pid=$!
        PIDS+=("$pid")
        wait_port "$IDEM_PORT" "$pid" "$WORK/ipx-$workload.log"
        PROXY_PIDS=("$pid")
        ;;
    esac
    PROXY_PID=$pid
}

url_for() {
    case $1 in
    direct) echo "$UPSTREAM$REQ_PATH" ;;
    nginx) echo "http://127.0.0.1:$NGINX_PORT$REQ_PATH" ;;
    # It forwards /URL_NAME to the URL in its URL_NAME variable.
    ipx) echo "http://127.0.0.1:$IDEM_PORT/URL_PAYMENTS" ;;
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

# Runs a command; writes its output and "WRKCPU ticks" (its utime + stime) to FILE.
run_counted() {
    local file=$1
    shift
    bash -c '
        out=$1; shift
        "$@" >"$out" 2>&1; rc=$?
        read -r stat </proc/$$/stat; read -ra f <<<"${stat##*) }"
        echo "WRKCPU $((f[13] + f[14]))" >>"$out"
        exit $rc' _ "$file" "$@"
}

# Runs wrk; writes its output and "WRKCPU ticks" (its utime + stime) to FILE.
run_wrk() {
    local file=$1 duration=$2 script=$3 url=$4
    shift 4
    run_counted "$file" timeout 300 wrk -t"$THREADS" -c"$CONNECTIONS" -d"$duration" --latency \
        -s "$ROOT/bench/$script" "$url" -- "$@" ||
        die "wrk failed: $(tail -5 "$file")"
}

RESULTS=$WORK/results.tsv
: >"$RESULTS"

# One measurement: fresh proxy, seed (replay), warm up, measure, record, stop.
measure() {
    local target=$1 workload=$2 url script nonce args_w args_m c0 c1 seeded=0
    url=$(url_for "$target")
    nonce=$NONCE-$target
    # Calls into the store (redis, postgres) are counted from before the proxy starts to
    # after it stopped, so that Postgres' statistics are complete (a backend reports its
    # last second of work when idle for 10 s, or when it ends); the calls cover the warm-up
    # and the measured run, less the seeding.
    c0=$(store_calls "$target")
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
        seeded=$((2 * REPLAY_KEYS))
        case $target in
        memory | fjall | redb | redis | postgres)
            seeded=$((seeded + 1))
            curl -s -D - -o /dev/null -H 'Content-Type: application/json' \
                -H "Idempotency-Key: r-$nonce-1" --data-binary "$BODY" "$url" |
                grep -qi '^idempotent-replayed: true' || die "$target does not replay r-$nonce-1"
            ;;
        ipx)
            # No replay header: a replay is an answer that did not reach the upstream. Each
            # of its operations is two Redis commands (SET NX, then SET XX or GET).
            seeded=$((seeded + 2))
            local before
            before=$(upstream_posts)
            curl -s -o /dev/null -H 'Content-Type: application/json' \
                -H "Idempotency-Key: r-$nonce-1" --data-binary "$BODY" "$url"
            [ "$(upstream_posts)" = "$before" ] || die "$target does not replay r-$nonce-1"
            ;;
        esac
        args_w=("$nonce" "$REPLAY_KEYS")
        args_m=("$nonce" "$REPLAY_KEYS")
        ;;
    esac
    log "$workload / $target: warm-up $WARMUP, then $DURATION"
    run_wrk "$WORK/wrk-warm.txt" "$WARMUP" "$script" "$url" "${args_w[@]}"

    # The writes of the proxy's connections to its store (redis, postgres), over the
    # measured run.
    local store_port="" segs=- warm
    case $target in
    redis | ipx) store_port=$REDIS_PORT ;;
    postgres) store_port=$PG_PORT ;;
    esac
    [ -n "$store_port" ] && store_segs "$store_port" "${PROXY_PIDS[@]}" >"$WORK/segs0.txt"
    warm=$(sed -n 's/^RESULT requests=\([0-9]*\) .*/\1/p' "$WORK/wrk-warm.txt")

    local posts0 posts1 up0 up1 px0 px1 m0 m1 st0 st1 rss
    posts0=$(upstream_posts)
    up0=$(cpu_ticks "$UP_PID")
    px0=$(cpu_ticks "${PROXY_PIDS[@]}")
    st0=$(store_ticks "$target")
    kthread_snapshot "$WORK/kthreads0.txt"
    m0=$(machine_ticks)
    run_wrk "$WORK/wrk-$target-$workload.txt" "$DURATION" "$script" "$url" "${args_m[@]}"
    m1=$(machine_ticks)
    note_load
    kthread_snapshot "$WORK/kthreads1.txt"
    st1=$(store_ticks "$target")
    px1=$(cpu_ticks "${PROXY_PIDS[@]}")
    up1=$(cpu_ticks "$UP_PID")
    posts1=$(upstream_posts)
    rss=$(peak_rss_kib "${PROXY_PIDS[@]}")
    if [ -n "$store_port" ]; then
        store_segs "$store_port" "${PROXY_PIDS[@]}" >"$WORK/segs1.txt"
        segs=$(segs_delta "$WORK/segs0.txt" "$WORK/segs1.txt")
    fi
    if [ -n "$PROXY_PID" ]; then
        stop_pid "$PROXY_PID"
        forget_pid "$PROXY_PID"
    fi
    c1=$(store_calls "$target")

    local result wrkcpu
    result=$(grep '^RESULT ' "$WORK/wrk-$target-$workload.txt") || die "no RESULT line from wrk"
    wrkcpu=$(awk '/^WRKCPU/ { print $2 }' "$WORK/wrk-$target-$workload.txt")
    # shellcheck disable=SC2086
    local $(echo "${result#RESULT }")
    local mp0 mi0 mt0 mp1 mi1 mt1
    read -r mp0 mi0 mt0 <<<"$m0"
    read -r mp1 mi1 mt1 <<<"$m1"
    record "$workload" "$target" "$requests" "$duration_us" "$p50_us" "$p99_us" \
        "$status_errors" "$socket_errors" "$rss" "$wrkcpu" "$((px1 - px0))" \
        "$((up1 - up0))" "$((mp1 - mp0))" "$((mi1 - mi0))" "$((mt1 - mt0))" \
        "$((posts1 - posts0))" "$(kthread_delta "$WORK/kthreads0.txt" "$WORK/kthreads1.txt")" "$(minus "$st1" "$st0")" \
        "$(minus "$(minus "$c1" "$c0")" "$seeded")" "$segs" "$((warm + requests))"
    if [ "$workload" = replay ] && [ -n "$PROXY_PID" ] && [ "$target" != nginx ] &&
        [ "$((posts1 - posts0))" != 0 ]; then
        log "warning: $((posts1 - posts0)) replays through $target reached the upstream"
    fi
    [ "$status_errors" = 0 ] && [ "$socket_errors" = 0 ] ||
        log "warning: $workload / $target had $status_errors non-2xx/3xx answers and $socket_errors socket errors"
}

# A - B, or "-" when either is unknown.
minus() { if [ "$1" = - ] || [ "$2" = - ]; then echo -; else echo $(($1 - $2)); fi; }

# One row of $RESULTS, tab-separated.
record() { (IFS=$'\t'; echo "$*") >>"$RESULTS"; }

# pgbench running the Postgres store's begin + complete (bench/pg_begin_complete.sql) on
# the records table the postgres gateway rows created, with CLIENTS connections: what the
# database alone manages for new keys, measured like a row of the table.
measure_pgbench() {
    local clients=$1 target=pgbench-$1 file=$WORK/pgbench-$1.txt secs
    secs=$(seconds "$DURATION")
    log "new / pgbench -c $clients: ${secs}s"
    local c0 c1 m0 m1 st0 st1
    c0=$(store_calls "$target")
    st0=$(store_ticks "$target")
    kthread_snapshot "$WORK/kthreads0.txt"
    m0=$(machine_ticks)
    PGOPTIONS="-c search_path=$PG_SCHEMA" run_counted "$file" \
        timeout 300 "$PGBENCH" -n -M prepared -c "$clients" -j "$(( THREADS < clients ? THREADS : clients ))" \
        -T "$secs" --log --log-prefix="$WORK/pgblog-$clients" \
        -f "$ROOT/bench/pg_begin_complete.sql" "$PG_URL" ||
        die "pgbench failed: $(tail -5 "$file")"
    m1=$(machine_ticks)
    note_load
    kthread_snapshot "$WORK/kthreads1.txt"
    st1=$(store_ticks "$target")
    c1=$(store_calls "$target")

    local tps txns failed cpu lat
    tps=$(sed -n 's/^tps = \([0-9.]*\) (without initial connection time).*/\1/p' "$file")
    txns=$(sed -n 's/^number of transactions actually processed: \([0-9]*\).*/\1/p' "$file")
    failed=$(sed -n 's/^number of failed transactions: \([0-9]*\).*/\1/p' "$file")
    cpu=$(awk '/^WRKCPU/ { print $2 }' "$file")
    [ -n "$tps" ] && [ -n "$txns" ] || die "cannot read pgbench's results: $(tail -5 "$file")"
    # The latency of each transaction (third field of pgbench's log, in microseconds).
    lat=$(cat "$WORK/pgblog-$clients".* | awk '$3 ~ /^[0-9]+$/ { print $3 }' | sort -n |
        awk '{ v[NR] = $1 } END { i = int(NR * 0.5); j = int(NR * 0.99); if (i < 1) i = 1; if (j < 1) j = 1; print v[i] + 0, v[j] + 0 }')
    rm -f "$WORK/pgblog-$clients".*
    local mp0 mi0 mt0 mp1 mi1 mt1
    read -r mp0 mi0 mt0 <<<"$m0"
    read -r mp1 mi1 mt1 <<<"$m1"
    record new "$target" "$txns" "$(awk -v n="$txns" -v t="$tps" 'BEGIN { printf "%d", n / t * 1e6 }')" \
        ${lat% *} ${lat#* } "${failed:-0}" 0 0 "$cpu" 0 0 "$((mp1 - mp0))" "$((mi1 - mi0))" \
        "$((mt1 - mt0))" 0 "$(kthread_delta "$WORK/kthreads0.txt" "$WORK/kthreads1.txt")" "$(minus "$st1" "$st0")" "$(minus "$c1" "$c0")" - "$txns"
}

LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)
LOAD_MAX=0
# Keeps the highest 1-minute load average seen (called at the end of each measurement).
note_load() {
    local now
    read -r now _ </proc/loadavg
    LOAD_MAX=$(awk -v a="$LOAD_MAX" -v b="$now" 'BEGIN { print (b > a ? b : a) }')
}
RUNS=(new:direct new:nginx)
for store in memory fjall redb redis postgres; do
    has_store "$store" || continue
    RUNS+=("new:$store")
    [ "$store" = redis ] && has_peer idempotent-proxy-server && RUNS+=(new:ipx)
    if [ "$store" = postgres ]; then
        RUNS+=("pgbench:$PGBENCH_CLIENTS")
        [ -n "$PGBENCH_POOL_CLIENTS" ] && [ "$PGBENCH_POOL_CLIENTS" != "$PGBENCH_CLIENTS" ] &&
            RUNS+=("pgbench:$PGBENCH_POOL_CLIENTS")
    fi
done
has_store memory && RUNS+=(nokey:memory)
RUNS+=(replay:direct replay:nginx)
for store in memory fjall redb redis postgres; do
    has_store "$store" && RUNS+=("replay:$store")
    [ "$store" = redis ] && has_peer idempotent-proxy-server && RUNS+=(replay:ipx)
done
for run in "${RUNS[@]}"; do
    case $run in
    pgbench:*) measure_pgbench "${run#*:}" ;;
    *) measure "${run#*:}" "${run%%:*}" ;;
    esac
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
        -v dur="$DURATION" -v keys="$REPLAY_KEYS" -v pgc="$PGBENCH_CLIENTS" '
    function rate(r) { return r >= 1000 ? sprintf("%.1f k", r / 1000) : sprintf("%.0f", r) }
    function ms(us) { return us >= 10000 ? sprintf("%.0f ms", us / 1000) : sprintf("%.2f ms", us / 1000) }
    function ratio(a, b) { return b > 0 ? sprintf("%.2f×", a / b) : "–" }
    function mib(k) { return sprintf("%.1f MiB", k / 1024) }
    function us_per(ticks, n) { return n > 0 && ticks != "-" ? sprintf("%.1f", ticks * 1e6 / hz / n) : "–" }
    function per(x, n) { return n > 0 && x != "-" ? sprintf("%.2f", x / n) : "–" }
    function verdict(ok) { return ok ? "**met**" : "**missed**" }
    function target(what, key, base, need,    r) {
        if (!(key in rps) || !(base in rps) || rps[base] <= 0) return
        r = rps[key] / rps[base]
        printf "| %s | ≥ %.2g× | %.2f× | %s |\n", what, need, r, verdict(r >= need)
    }
    {
        w = $1; t = $2; key = w SUBSEP t
        rps[key] = $3 / ($4 / 1e6); n[key] = $3; p50[key] = $5; p99[key] = $6
        errs[key] = $7 + $8; rss[key] = $9; wcpu[key] = $10; pcpu[key] = $11; ucpu[key] = $12
        kthr[key] = $17; scpu[key] = $18; calls[key] = $19; segs[key] = $20; ncalls[key] = $21
        other[key] = $13 - $10 - $11 - $12 - $17 - ($18 == "-" ? 0 : $18)
        irq[key] = $14; total[key] = $15; posts[key] = $16
        order[++rows] = key
    }
    END {
        label["new"] = "new keys"; label["replay"] = "replays"; label["nokey"] = "no key (pass-through)"
        name["direct"] = "direct"; name["nginx"] = "nginx"
        name["memory"] = "idem memory:"; name["fjall"] = "idem fjall: (default)"; name["redb"] = "idem redb:"
        name["redis"] = "idem redis://"; name["postgres"] = "idem postgres://"
        name["ipx"] = "idempotent-proxy-server (Redis)"
        printf "wrk -t%s -c%s -d%s --latency; replays cycle over %s keys; \"no key\" rows are compared with the new-key rows of direct and nginx (same POSTs, with a key). \"pgbench\" rows: no HTTP, pgbench running the Postgres store'"'"'s begin and complete statements, one transaction (= one new key) each, with N clients (req/s = transactions/s, latencies per transaction, its CPU in the wrk slot). \"CPU µs/req\": CPU time (user + system) per request of wrk, the proxy and the upstream; \"store CPU\": of the Redis or Postgres server (all its processes). \"store calls / writes\": per request, calls into the store (Redis: EVALSHA calls, and for idempotent-proxy-server its SET, GET and DEL commands; Postgres: committed transactions in the database, each store statement being one; over the warm-up and the measured run, less the seeding of replay keys) and TCP data segments the proxy sent to the store over the measured run (a segment can carry several pipelined calls). \"irq\": interrupt and softirq time, \"kthreads\": kernel threads (ksoftirqd carrying loopback TCP, jbd2 and kworkers doing fsync), \"other\": every other process on the machine (a disturbance: should be near 0%%); each a share of all cores during the run.\n\n", threads, conns, dur, keys
        print "| workload | path | req/s | p50 | p99 | ÷ direct | ÷ nginx | peak RSS | CPU µs/req wrk / proxy / upstream | store CPU µs/req | store calls / writes per req | irq | kthreads | other | upstream POSTs | errors |"
        print "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
        for (i = 1; i <= rows; i++) {
            key = order[i]; split(key, kt, SUBSEP); w = kt[1]; t = kt[2]
            base = w == "nokey" ? "new" : w
            d = rps[base SUBSEP "direct"]; g = rps[base SUBSEP "nginx"]
            bench = t ~ /^pgbench-/
            if (bench) name[t] = "pgbench begin + complete, -c " substr(t, 9)
            proxy = (t == "direct" || bench) ? "–" : us_per(pcpu[key], n[key])
            printf "| %s | %s | %s | %s | %s | %s | %s | %s | %s / %s / %s | %s | %s / %s | %.0f%% | %.0f%% | %.0f%% | %s | %d |\n",
                label[w], name[t], rate(rps[key]), ms(p50[key]), ms(p99[key]),
                (bench ? "–" : ratio(rps[key], d)), (t == "direct" || bench ? "–" : ratio(rps[key], g)),
                (t == "direct" || bench ? "–" : mib(rss[key])),
                us_per(wcpu[key], n[key]), proxy, (bench ? "–" : us_per(ucpu[key], n[key])),
                us_per(scpu[key], n[key]), per(calls[key], ncalls[key]), per(segs[key], n[key]),
                (total[key] > 0 ? 100 * irq[key] / total[key] : 0),
                (total[key] > 0 ? 100 * kthr[key] / total[key] : 0),
                (total[key] > 0 && other[key] > 0 ? 100 * other[key] / total[key] : 0),
                (bench ? "–" : posts[key]), errs[key]
        }
        print ""
        print "| target | needed | this run | |"
        print "|---|---:|---:|---|"
        target("new keys, idem memory: ÷ nginx", "new" SUBSEP "memory", "new" SUBSEP "nginx", 1.0)
        target("new keys, idem fjall: (the durable default) ÷ nginx", "new" SUBSEP "fjall", "new" SUBSEP "nginx", 0.8)
        target("new keys, idem redb: ÷ nginx", "new" SUBSEP "redb", "new" SUBSEP "nginx", 0.8)
        target("new keys, idem redis:// ÷ nginx", "new" SUBSEP "redis", "new" SUBSEP "nginx", 0.6)
        target("new keys, idem redis:// ÷ idempotent-proxy-server (same Redis)", "new" SUBSEP "redis", "new" SUBSEP "ipx", 2.5)
        target("new keys, idem postgres:// ÷ pgbench -c " pgc " (same statements)", "new" SUBSEP "postgres", "new" SUBSEP "pgbench-" pgc, 0.8)
        target("no key (pass-through), idem memory: ÷ nginx", "nokey" SUBSEP "memory", "new" SUBSEP "nginx", 0.95)
        target("replays, idem memory: ÷ nginx", "replay" SUBSEP "memory", "replay" SUBSEP "nginx", 1.5)
        target("replays, idem fjall: ÷ nginx", "replay" SUBSEP "fjall", "replay" SUBSEP "nginx", 1.5)
        target("replays, idem redb: ÷ nginx", "replay" SUBSEP "redb", "replay" SUBSEP "nginx", 1.5)
        for (i = 1; i <= rows; i++) {
            key = order[i]; split(key, kt, SUBSEP)
            # The memory rows run with a raised cap (MEMORY_STORE): their RSS under new keys
            # is what that cap allows; bench/memory_rss.sh measures the default one.
            if (((kt[2] == "memory" && kt[1] == "replay") || kt[2] == "fjall" || kt[2] == "redb") && kt[1] != "nokey")
                printf "| peak RSS, %s, %s | < 64 MiB | %s | %s |\n", label[kt[1]], name[kt[2]], mib(rss[key]), verdict(rss[key] < 65536)
        }
    }' "$RESULTS"
)

STORES_INFO=""
if has_store redis; then
    STORES_INFO="$STORES_INFO Redis $(redis-cli -u "$REDIS_URL" info server | tr -d '\r' | sed -n 's/^redis_version://p') at $REDIS_URL (appendonly $(redis-cli -u "$REDIS_URL" config get appendonly | tr -d '\r' | tail -1), appendfsync $(redis-cli -u "$REDIS_URL" config get appendfsync | tr -d '\r' | tail -1); the gateway's pool: 4 connections);"
    has_peer idempotent-proxy-server &&
        STORES_INFO="$STORES_INFO idempotent-proxy-server $IPX_VERSION on the same Redis (database $IPX_REDIS_DB; its pool: up to 10 connections; REQUEST_TIMEOUT=$IPX_TIMEOUT_MS ms, which is also how long it keeps a response; logging at its default, info);"
fi
if has_store postgres; then
    STORES_INFO="$STORES_INFO Postgres $(psql "$PG_URL" -XAtqc 'SHOW server_version' | cut -d' ' -f1) at ${PG_URL%%\?*} (synchronous_commit $(psql "$PG_URL" -XAtqc 'SHOW synchronous_commit'), fsync $(psql "$PG_URL" -XAtqc 'SHOW fsync'); the gateway's pool: $PG_POOL connections), pgbench $("$PGBENCH" --version | awk '{ print $3 }');"
fi
MACHINE="Machine: $(nproc) cores ($CPU_MODEL), ${MEM_GIB} GiB, Linux $(uname -r); wrk $WRK_VERSION, nginx $NGINX_VERSION ($NGINX_WORKERS workers);$STORES_INFO $(rustc -V 2>/dev/null || echo rustc unknown), release build of $GIT_REV; fjall and redb files on $WORK_FS (project disk). Load average before: $LOAD_BEFORE, after: $LOAD_AFTER, highest 1-minute load seen at the end of a measurement: $LOAD_MAX."

mkdir -p "$(dirname "$OUT")"
{
    echo "# HTTP gateway benchmark, $(date -u +%Y-%m-%dT%H:%MZ)"
    echo
    echo '```sh'
    if [ "$STORES" = "memory fjall redb redis postgres" ]; then
        echo "bash bench/http.sh"
    else
        echo "STORES=\"$STORES\" bash bench/http.sh"
    fi
    echo '```'
    echo
    echo "$REPORT"
    echo
    echo "$MACHINE"
} | tee "$OUT"
cp "$RESULTS" "${OUT%.md}.tsv"
log "written to $OUT (raw figures: ${OUT%.md}.tsv)"
