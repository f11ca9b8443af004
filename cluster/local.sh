#!/usr/bin/env bash
# A one-machine Ray cluster for `ray job submit` (cluster/submit.sh): start | stop | status | env.
#
#   cluster/local.sh start     # Ray head on 127.0.0.1 only, dashboard + job server at http://127.0.0.1:8265
#   cluster/local.sh status    # exit 0 when running (prints addresses and `ray status`), 1 when not
#   cluster/local.sh env       # `eval "$(cluster/local.sh env)"` lets plain `ray job ...` reach it
#   cluster/local.sh stop      # stops this cluster's processes by pid; leaves any other Ray alone
#
# Everything listens on loopback; token authentication is ON, with a token of this cluster's
# own in the state directory (see cluster/README.md, "Authentication", for why).
#
# Environment (all optional):
#   NCDPO_CLUSTER_DIR     state dir: pid, addresses, token, head.log, Ray's logs (default /tmp/ncdpo-cluster-$UID)
#   NCDPO_RAY_PORT        GCS port (default 6379)
#   NCDPO_DASHBOARD_PORT  dashboard + job server port (default 8265)
#   NCDPO_CLIENT_PORT     Ray client server port (default 10001)
#   NCDPO_AGENT_PORT      dashboard agent HTTP port (default 52366: every local ray.init() takes 52365)
#   NCDPO_NUM_CPUS / NCDPO_NUM_GPUS   resources the head advertises (default: detected)
#   NCDPO_START_TIMEOUT / NCDPO_STOP_TIMEOUT   seconds (default 90 / 30)
#   NCDPO_VENV            the project's virtualenv (default <repo>/.venv; its bin/ goes first on PATH,
#                         so jobs find `ncdpo`); without one, `ray` from PATH is used (the images)
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STATE="${NCDPO_CLUSTER_DIR:-/tmp/ncdpo-cluster-$(id -u)}"
PORT="${NCDPO_RAY_PORT:-6379}"
DPORT="${NCDPO_DASHBOARD_PORT:-8265}"
CPORT="${NCDPO_CLIENT_PORT:-10001}"
APORT="${NCDPO_AGENT_PORT:-52366}"
START_TIMEOUT="${NCDPO_START_TIMEOUT:-90}"
STOP_TIMEOUT="${NCDPO_STOP_TIMEOUT:-30}"
VENV="${NCDPO_VENV:-$REPO/.venv}"

if [[ -x "$VENV/bin/ray" ]]; then
    export PATH="$VENV/bin:$PATH"
fi
RAY="$(command -v ray || true)"
PY="$(dirname "${RAY:-/usr/bin/python3}")/python"
[[ -x "$PY" ]] || PY="$(command -v python3)"

die() { echo "cluster/local.sh: error: $*" >&2; exit 2; }
say() { echo "cluster/local.sh: $*" >&2; }

# Pids of every process of this cluster: each inherits NCDPO_CLUSTER_ID from the head's
# `ray start`, including the ones Ray puts in sessions of their own (job drivers, workers).
cluster_pids() {
    local id="$1" f pid
    for f in $(grep -lsxz "NCDPO_CLUSTER_ID=$id" /proc/[0-9]*/environ 2>/dev/null || true); do
        pid="${f#/proc/}"; pid="${pid%/environ}"
        [[ "$pid" != "$$" ]] && echo "$pid"
    done
    return 0
}

head_alive() {  # the recorded head pid runs and is ours (not a recycled pid)
    [[ -f "$STATE/head.pid" && -f "$STATE/cluster_id" ]] || return 1
    local pid id
    pid="$(cat "$STATE/head.pid")"; id="$(cat "$STATE/cluster_id")"
    kill -0 "$pid" 2>/dev/null || return 1
    grep -qsxz "NCDPO_CLUSTER_ID=$id" "/proc/$pid/environ"
}

auth_env() {  # what a client of this cluster needs
    echo "export RAY_AUTH_MODE=token"
    echo "export RAY_AUTH_TOKEN_PATH=$STATE/auth_token"
    echo "export RAY_API_SERVER_ADDRESS=$(cat "$STATE/dashboard_url")"
    # Clients that talk to the GCS (ray status, ray.init(address=...)) would otherwise rewrite
    # 127.0.0.1 to the machine's interface address, where nothing listens.
    echo "export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0"
}

port_free() {
    "$PY" - "$1" <<'EOF'
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT from a stopped cluster is fine
try:
    s.bind(("127.0.0.1", int(sys.argv[1])))
except OSError:
    sys.exit(1)
finally:
    s.close()
EOF
}

jobs_api_up() {  # the job server answers an authenticated request
    "$PY" - "http://127.0.0.1:$DPORT/api/jobs/" "$STATE/auth_token" <<'EOF'
import sys, urllib.request
token = open(sys.argv[2]).read().strip()
req = urllib.request.Request(sys.argv[1], headers={"Authorization": f"Bearer {token}"})
try:
    with urllib.request.urlopen(req, timeout=3) as r:
        sys.exit(0 if r.status == 200 else 1)
except Exception:
    sys.exit(1)
EOF
}

cmd_start() {
    [[ -n "$RAY" ]] || die "no 'ray' found (make install, or put ray[default] on PATH)"
    # Ray's unix sockets live under <state>/ray/session_<date>_<pid>/sockets/...: the OS caps
    # socket paths at 107 bytes.
    (( ${#STATE} <= 60 )) || die "NCDPO_CLUSTER_DIR '$STATE' is too long for Ray's unix sockets (60 chars max)"
    if head_alive; then
        say "already running (pid $(cat "$STATE/head.pid")), dashboard $(cat "$STATE/dashboard_url")"
        return 0
    fi
    rm -f "$STATE/head.pid" "$STATE/cluster_id" "$STATE/gcs_address" "$STATE/dashboard_url" "$STATE/env"
    local p
    for p in "$PORT" "$DPORT" "$CPORT" "$APORT"; do
        port_free "$p" || die "port $p on 127.0.0.1 is in use (another Ray? set NCDPO_RAY_PORT / NCDPO_DASHBOARD_PORT / NCDPO_CLIENT_PORT / NCDPO_AGENT_PORT)"
    done
    mkdir -p "$STATE" && chmod 700 "$STATE"
    if [[ ! -s "$STATE/auth_token" ]]; then
        (umask 077 && "$PY" -c 'import secrets; print(secrets.token_hex(32), end="")' > "$STATE/auth_token")
    fi
    local id
    id="$("$PY" -c 'import secrets; print(secrets.token_hex(8))')"
    echo "$id" > "$STATE/cluster_id"

    local extra=()
    [[ -n "${NCDPO_NUM_CPUS:-}" ]] && extra+=("--num-cpus=$NCDPO_NUM_CPUS")
    [[ -n "${NCDPO_NUM_GPUS:-}" ]] && extra+=("--num-gpus=$NCDPO_NUM_GPUS")
    # setsid: the head outlives this shell and its terminal; `--block` keeps `ray start` as the
    # parent that shuts its children down on SIGTERM (our stop). A private --temp-dir keeps Ray's
    # "current cluster" file away from /tmp/ray, so a plain `ray.init()` elsewhere on the machine
    # (e.g. a local `ncdpo train`) starts its own Ray instead of joining this one. No drain on
    # SIGTERM: with one node there is nowhere to move work, and a running job would hold the
    # stop for Ray's 30 s drain timeout.
    env -u RAY_ADDRESS -u RAY_AUTH_TOKEN \
        NCDPO_CLUSTER_ID="$id" \
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 \
        RAY_USAGE_STATS_ENABLED=0 \
        RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=0 \
        RAY_AUTH_MODE=token \
        RAY_AUTH_TOKEN_PATH="$STATE/auth_token" \
        nohup setsid "$RAY" start --head --block \
            --node-ip-address=127.0.0.1 \
            --port="$PORT" \
            --include-dashboard=true \
            --dashboard-host=127.0.0.1 \
            --dashboard-port="$DPORT" \
            --dashboard-agent-listen-port="$APORT" \
            --ray-client-server-port="$CPORT" \
            --disable-usage-stats \
            --temp-dir="$STATE/ray" \
            "${extra[@]}" \
        > "$STATE/head.log" 2>&1 < /dev/null &
    local pid=$!
    echo "$pid" > "$STATE/head.pid"
    echo "127.0.0.1:$PORT" > "$STATE/gcs_address"
    echo "http://127.0.0.1:$DPORT" > "$STATE/dashboard_url"
    auth_env > "$STATE/env"

    local t0=$SECONDS
    until jobs_api_up; do
        if ! kill -0 "$pid" 2>/dev/null; then
            tail -n 30 "$STATE/head.log" >&2 || true
            cmd_stop >/dev/null 2>&1 || true
            die "the Ray head exited during start-up (log: $STATE/head.log)"
        fi
        if (( SECONDS - t0 > START_TIMEOUT )); then
            tail -n 30 "$STATE/head.log" >&2 || true
            cmd_stop >/dev/null 2>&1 || true
            die "the job server did not answer within ${START_TIMEOUT}s (log: $STATE/head.log)"
        fi
        sleep 1
    done
    say "started in $((SECONDS - t0))s: pid $pid, GCS 127.0.0.1:$PORT, dashboard/jobs http://127.0.0.1:$DPORT"
    say "submit with: cluster/submit.sh CONFIG    plain ray CLI: eval \"\$(cluster/local.sh env)\""
}

cmd_stop() {
    if [[ ! -f "$STATE/cluster_id" ]]; then
        say "not running (no state in $STATE)"
        return 0
    fi
    local id pid pids t0
    id="$(cat "$STATE/cluster_id")"
    pid="$(cat "$STATE/head.pid" 2>/dev/null || true)"
    if [[ -n "$pid" ]] && head_alive; then
        kill -TERM "$pid" 2>/dev/null || true   # `ray start --block` shuts its children down
        t0=$SECONDS
        while kill -0 "$pid" 2>/dev/null && (( SECONDS - t0 < STOP_TIMEOUT )); do sleep 0.5; done
    fi
    # Whatever is left (job drivers in their own sessions, stragglers): TERM, then KILL.
    pids="$(cluster_pids "$id")"
    if [[ -n "$pids" ]]; then
        # shellcheck disable=SC2086
        kill -TERM $pids 2>/dev/null || true
        t0=$SECONDS
        while [[ -n "$(cluster_pids "$id")" ]] && (( SECONDS - t0 < 5 )); do sleep 0.5; done
        pids="$(cluster_pids "$id")"
        # shellcheck disable=SC2086
        [[ -n "$pids" ]] && kill -KILL $pids 2>/dev/null || true
        t0=$SECONDS
        while [[ -n "$(cluster_pids "$id")" ]] && (( SECONDS - t0 < 5 )); do sleep 0.2; done
    fi
    pids="$(cluster_pids "$id")"
    [[ -z "$pids" ]] || die "processes still alive after SIGKILL: $(echo "$pids" | tr '\n' ' ')"
    rm -f "$STATE/head.pid" "$STATE/cluster_id" "$STATE/gcs_address" "$STATE/dashboard_url" "$STATE/env"
    say "stopped (logs kept in $STATE/ray)"
}

cmd_status() {
    if ! head_alive; then
        echo "not running"
        return 1
    fi
    local id n
    id="$(cat "$STATE/cluster_id")"
    n="$(cluster_pids "$id" | wc -l)"
    echo "running: pid $(cat "$STATE/head.pid"), $n processes"
    echo "GCS address:        $(cat "$STATE/gcs_address")"
    echo "dashboard and jobs: $(cat "$STATE/dashboard_url")"
    echo "auth token:         $STATE/auth_token"
    (
        # shellcheck disable=SC1091
        source "$STATE/env"
        timeout 30 "$RAY" status --address "$(cat "$STATE/gcs_address")" 2>/dev/null | sed -n '/^Resources/,$p'
    ) || true
}

cmd_env() {
    head_alive || die "not running (cluster/local.sh start)"
    auth_env
}

case "${1:-}" in
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    env) cmd_env ;;
    *) echo "usage: cluster/local.sh start|stop|status|env" >&2; exit 2 ;;
esac
