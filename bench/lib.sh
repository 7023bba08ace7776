# Shell shared by the bench/*.sh scripts (sourced, not run). Set LOG_TAG first, the tag of
# log lines:
#
#   LOG_TAG=http.sh
#   . "$ROOT/bench/lib.sh"
#
# build_gateway needs ROOT and TARGET_DIR. Settings a script may change: STOP_TENTHS (50: how long stop_pid waits after TERM before
# it kills, in tenths of a second), PORT_TENTHS (100: how long wait_port waits). `start`
# adds what it starts to the script's array PIDS.

log() { printf '[%s] %s\n' "$LOG_TAG" "$*" >&2; }
die() { log "error: $*"; exit 1; }

# Whether PID is still running (a zombie counts as ended).
alive() {
    local stat
    read -r stat 2>/dev/null <"/proc/$1/stat" || return 1
    stat=${stat##*) }
    [ "${stat%% *}" != Z ]
}

# Stops one process this script started: TERM, then KILL after STOP_TENTHS tenths of a second.
stop_pid() {
    local pid=$1 i
    kill -TERM "$pid" 2>/dev/null || return 0
    for i in $(seq "${STOP_TENTHS:-50}"); do alive "$pid" || break; sleep 0.1; done
    alive "$pid" && kill -KILL "$pid" 2>/dev/null
    wait "$pid" 2>/dev/null || true
}

# Whether something accepts connections on 127.0.0.1:PORT.
port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# Waits until PORT accepts connections; fails (showing the end of LOG) if PID ends or
# PORT_TENTHS tenths of a second pass.
wait_port() {
    local port=$1 pid=$2 log=$3 i
    for i in $(seq "${PORT_TENTHS:-100}"); do
        port_busy "$port" && return 0
        alive "$pid" || break
        sleep 0.1
    done
    log "nothing listens on port $port; the end of $log:"
    tail -n 20 "$log" >&2 || true
    die "could not start the process on port $port"
}

# Starts COMMAND in the background with its output in LOG, adds it to PIDS, sets STARTED to
# its pid, and waits until PORT accepts connections.
start() {
    local port=$1 log=$2
    shift 2
    "$@" >"$log" 2>&1 &
    STARTED=$!
    PIDS+=("$STARTED")
    wait_port "$port" "$STARTED" "$log"
}

# Builds the gateway and the bench upstream in release (unless SKIP_BUILD is set) and sets
# IDEM_BIN and UP_BIN to them, unless the caller set those already (an A/B of saved
# binaries).
build_gateway() {
    if [ -z "${SKIP_BUILD:-}" ]; then
        log "building (release)"
        (cd "$ROOT" && cargo build --release --quiet -p idem-cli --bin idem --example bench-upstream)
    fi
    IDEM_BIN=${IDEM_BIN:-$TARGET_DIR/release/idem}
    UP_BIN=${UP_BIN:-$TARGET_DIR/release/examples/bench-upstream}
    [ -x "$IDEM_BIN" ] && [ -x "$UP_BIN" ] || die "binaries missing: $IDEM_BIN $UP_BIN"
}

# Writes DIR/nginx.conf: nginx as a plain reverse proxy to 127.0.0.1:UPSTREAM_PORT with
# WORKERS workers, keep-alive to the upstream, no access log, and the X-Forwarded-*
# headers idem adds (the baseline every gateway row is compared with); checks it with
# nginx -t.
write_nginx_conf() {
    local dir=$1 listen_port=$2 upstream_port=$3 workers=$4
    mkdir -p "$dir/tmp"
    cat >"$dir/nginx.conf" <<EOF
worker_processes $workers;
pid $dir/nginx.pid;
error_log $dir/error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    client_body_temp_path $dir/tmp/body;
    proxy_temp_path $dir/tmp/proxy;
    fastcgi_temp_path $dir/tmp/fastcgi;
    uwsgi_temp_path $dir/tmp/uwsgi;
    scgi_temp_path $dir/tmp/scgi;
    keepalive_requests 10000000;
    upstream bench_upstream {
        server 127.0.0.1:$upstream_port;
        keepalive 256;
        keepalive_requests 10000000;
    }
    server {
        listen 127.0.0.1:$listen_port;
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
    nginx -t -q -p "$dir" -c "$dir/nginx.conf" -e "$dir/error.log" ||
        die "nginx rejects the generated config ($dir/nginx.conf)"
}
