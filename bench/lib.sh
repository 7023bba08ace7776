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
