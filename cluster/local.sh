#!/usr/bin/env bash
# A local Ray cluster (one head node on loopback, with the dashboard) to test jobs the way a cloud
# cluster runs them: `ray start` + `ray job submit`. Hand-written; every step is Ray's own CLI.
#
#   cluster/local.sh start                                  # head on 127.0.0.1, dashboard :8265
#   cluster/local.sh submit -- python jobs/prepare.py source=phantom:3 preset=tiny out=$PWD/outputs/cases
#   cluster/local.sh submit --no-wait -- python jobs/synthesize.py preset=tiny n=4 out=/abs/path
#   cluster/local.sh status [<submission-id>]               # resources + job list, or one job
#   cluster/local.sh logs <submission-id> [--follow]
#   cluster/local.sh stop                                   # the head this script started (its pids)
#   cluster/local.sh stop --all                             # `ray stop --force`: EVERY Ray process of this user
#   cluster/local.sh runtime-env                            # the JSON `submit` passes; for other clusters:
#       ray job submit --address <url> --working-dir . --runtime-env-json "$(cluster/local.sh runtime-env)" -- ...
#
# `submit` options before `--` go to `ray job submit` (--no-wait, --submission-id, --entrypoint-num-gpus...).
# Jobs run in an uploaded copy of the repository (cluster/runtime_env.yaml lists what is left out):
# give absolute output paths or s3:// URIs. `submit` forwards AWS_* and OMP_NUM_THREADS (and the names in
# FCAS_FORWARD_ENV) from this shell to the job. The repository's .venv/bin goes first on PATH before
# `ray start`, so the job driver and the workers run the project's Python, not the system's.
#
# The head carries the cloud node types' labels: resources cpu_worker = CPUs and gpu_worker = GPUs.
#
# Environment: FCAS_RAY_NUM_CPUS (default: nproc); FCAS_RAY_NUM_GPUS (default: what nvidia-smi lists);
# FCAS_RAY_PORT (GCS, default 6380) and FCAS_RAY_DASHBOARD_PORT (default 8265): a free port when that
# one is taken, 0 for any free one (keep them out of Ray's worker ports 10002-19999); FCAS_RAY_TEMP_DIR (Ray's --temp-dir, default /tmp/ray,
# whose ray_current_cluster file lets a plain `ray.init()` on this machine join this cluster);
# FCAS_RAY_STATE (pid, addresses and the head's log; default /tmp/fcas-ray-local-<uid>);
# FCAS_RAY_OBJECT_STORE_BYTES; RAY_AUTH_MODE (default token; `disabled` to opt out).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/.." && pwd)"
VENV_BIN="${FCAS_VENV_BIN:-$REPO/.venv/bin}"
if [[ ! -x "$VENV_BIN/ray" ]]; then
    echo "local.sh: $VENV_BIN/ray not found; run 'make install' first (or set FCAS_VENV_BIN)" >&2
    exit 2
fi
export PATH="$VENV_BIN:$PATH"
# Ray's token authentication, the same way for the head and every client this script runs (left unset,
# `ray start` turns it on when ~/.ray/auth_token exists but `ray job submit` does not send the token).
# Opt out with RAY_AUTH_MODE=disabled; the token comes from RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or
# ~/.ray/auth_token (made by `start` when none exists).
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"
PY="$VENV_BIN/python"
HOST=127.0.0.1
STATE="${FCAS_RAY_STATE:-${TMPDIR:-/tmp}/fcas-ray-local-$(id -u)}"
STATE_FILE="$STATE/cluster.env"
# Variables `submit` forwards from this shell into the job's runtime_env (S3 endpoint and credentials live
# in the environment only, never in configs).
FORWARD_ENV="AWS_ENDPOINT_URL AWS_ENDPOINT_URL_S3 AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY AWS_SESSION_TOKEN
AWS_DEFAULT_REGION AWS_REGION AWS_PROFILE OMP_NUM_THREADS ${FCAS_FORWARD_ENV:-}"

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}" >&2; exit 2; }

free_ports() {  # free_ports PORT...: each PORT when free on 127.0.0.1, else (or for 0) a free one; all distinct
    "$PY" - "$@" <<'EOF'
import socket, sys
held, out = [], []
def bind(port):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.bind(("127.0.0.1", port))
    except OSError:
        s.close()
        return None
    held.append(s)  # keep it bound until all are chosen, so no two come out the same
    return s.getsockname()[1]
for want in map(int, sys.argv[1:]):
    out.append((want and bind(want)) or bind(0))
print(*out)
EOF
}

load_state() {
    if [[ ! -f "$STATE_FILE" ]]; then
        echo "local.sh: no cluster started by this script (no $STATE_FILE); run 'cluster/local.sh start'" >&2
        exit 1
    fi
    # shellcheck disable=SC1090
    source "$STATE_FILE"
}

alive() { [[ -n "${PID:-}" && -n "$(running "$PID")" ]]; }

cmd_start() {
    if [[ -f "$STATE_FILE" ]]; then
        source "$STATE_FILE"
        if alive; then
            echo "local.sh: already running (pid $PID, dashboard $DASHBOARD)"; return 0
        fi
        rm -f "$STATE_FILE"
    fi
    mkdir -p "$STATE"
    if [[ "$RAY_AUTH_MODE" == token && -z "${RAY_AUTH_TOKEN:-}" && ! -s "${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token}" ]]; then
        [[ -n "${RAY_AUTH_TOKEN_PATH:-}" ]] && { echo "local.sh: RAY_AUTH_TOKEN_PATH=$RAY_AUTH_TOKEN_PATH is empty or missing" >&2; exit 1; }
        ray get-auth-token --generate >/dev/null   # writes ~/.ray/auth_token
    fi
    local port dash client agent agent_grpc env_agent metrics node_manager object_manager num_cpus
    # every listening port explicit and free, so several heads (and the in-process ray.init() of
    # tests) can share one machine
    read -r port dash client agent agent_grpc env_agent metrics node_manager object_manager < <(
        free_ports "${FCAS_RAY_PORT:-6380}" "${FCAS_RAY_DASHBOARD_PORT:-8265}" 0 0 0 0 0 0 0)
    num_cpus="${FCAS_RAY_NUM_CPUS:-$(nproc)}"
    # the node-type labels of the cloud clusters (cluster/aws.yaml), so a pipeline configured to ask
    # for them runs here unchanged: cpu_worker = CPUs, gpu_worker = GPUs
    local num_gpus="${FCAS_RAY_NUM_GPUS:-$( (nvidia-smi -L 2>/dev/null || true) | grep -c '^GPU' || true)}"
    local resources="{\"cpu_worker\": $num_cpus"
    (( num_gpus > 0 )) && resources+=", \"gpu_worker\": $num_gpus"
    resources+="}"
    local args=(start --head --block
        --node-ip-address="$HOST" --port="$port"
        --include-dashboard=true --dashboard-host="$HOST" --dashboard-port="$dash"
        --ray-client-server-port="$client" --dashboard-agent-listen-port="$agent"
        --dashboard-agent-grpc-port="$agent_grpc" --runtime-env-agent-port="$env_agent"
        --metrics-export-port="$metrics" --node-manager-port="$node_manager"
        --object-manager-port="$object_manager"
        --num-cpus="$num_cpus" --num-gpus="$num_gpus" --resources="$resources" --disable-usage-stats)
    [[ -n "${FCAS_RAY_TEMP_DIR:-}" ]] && args+=(--temp-dir="$FCAS_RAY_TEMP_DIR")
    [[ -n "${FCAS_RAY_OBJECT_STORE_BYTES:-}" ]] && args+=(--object-store-memory="$FCAS_RAY_OBJECT_STORE_BYTES")
    # RAY_ADDRESS from the calling shell must not make this head try to join another cluster.
    # setsid: the head and everything it spawns form one process group, which `stop` ends by its id.
    (unset RAY_ADDRESS; exec setsid ray "${args[@]}") >"$STATE/head.log" 2>&1 </dev/null &
    PID=$!
    DASHBOARD="http://$HOST:$dash"
    cat >"$STATE_FILE" <<EOF
PID=$PID
GCS_ADDRESS=$HOST:$port
DASHBOARD=$DASHBOARD
EOF
    # wait for the job API (the dashboard) and then for the node's dashboard agent, which runs the jobs: the
    # head gives a submission only 10 s to find an agent ("No available agent to submit job"), and on a loaded
    # machine the agent comes up later than the dashboard. 401 is an answer too: with Ray's token
    # authentication on (RAY_AUTH_MODE=token, or a token in ~/.ray/auth_token) the ray CLI sends the token
    local deadline=$((SECONDS + ${FCAS_RAY_START_TIMEOUT:-90})) what url
    for what in dashboard agent; do
        url="$DASHBOARD/api/version"
        [[ "$what" == agent ]] && url="http://$HOST:$agent/api/healthz"
        until [[ "$(curl -sS --noproxy '*' -o /dev/null -w '%{http_code}' "$url" 2>/dev/null)" =~ ^(200|401)$ ]]; do
            if ! alive; then
                echo "local.sh: ray start exited; its log ($STATE/head.log):" >&2
                tail -n 30 "$STATE/head.log" >&2
                rm -f "$STATE_FILE"; exit 1
            fi
            if (( SECONDS > deadline )); then
                echo "local.sh: the $what did not answer at $url; stopping (log: $STATE/head.log)" >&2
                cmd_stop; exit 1
            fi
            sleep 0.5
        done
    done
    echo "Ray head running: pid $PID, GCS $HOST:$port, dashboard $DASHBOARD, $num_cpus CPUs, $num_gpus GPUs"
    echo "  submit: cluster/local.sh submit -- python jobs/<job>.py ..."
    echo "     or: RAY_AUTH_MODE=$RAY_AUTH_MODE ray job submit --address $DASHBOARD --working-dir . -- python jobs/<job>.py ..."
}

runtime_env_json() {  # cluster/runtime_env.yaml + the forwarded variables that are set in this shell
    # shellcheck disable=SC2086
    "$PY" - "$HERE/runtime_env.yaml" $FORWARD_ENV <<'EOF'
import json, os, sys
import yaml
with open(sys.argv[1]) as f:
    env = yaml.safe_load(f) or {}
env.setdefault("env_vars", {})
for name in sys.argv[2:]:
    if os.environ.get(name):
        env["env_vars"][name] = os.environ[name]
print(json.dumps(env))
EOF
}

cmd_submit() {
    load_state
    local opts=()
    while [[ $# -gt 0 && "$1" != "--" ]]; do opts+=("$1"); shift; done
    [[ "${1:-}" == "--" ]] || { echo "local.sh submit: put the job command after '--'" >&2; exit 2; }
    shift
    [[ $# -gt 0 ]] || { echo "local.sh submit: no job command after '--'" >&2; exit 2; }
    ray job submit --address "$DASHBOARD" --working-dir "$REPO" \
        --runtime-env-json "$(runtime_env_json)" "${opts[@]}" -- "$@"
}

cmd_status() {
    load_state
    if [[ $# -gt 0 ]]; then
        ray job status --address "$DASHBOARD" "$@"
    else
        alive && echo "head pid $PID (alive), GCS $GCS_ADDRESS, dashboard $DASHBOARD" || echo "head pid $PID: not running"
        (unset RAY_ADDRESS; ray status --address "$GCS_ADDRESS")
        ray job list --address "$DASHBOARD"
    fi
}

cmd_logs() {
    load_state
    [[ $# -gt 0 ]] || { echo "local.sh logs: give a submission id (see 'local.sh status')" >&2; exit 2; }
    ray job logs --address "$DASHBOARD" "$@"
}

descendants() {  # descendants ROOT: ROOT and every process below it (workers run in sessions of their own)
    ps -eo pid=,ppid= | awk -v root="$1" '
        { parent[$1] = $2 }
        END {
            keep[root] = 1; n = 1
            while (n) { n = 0; for (p in parent) if (!(p in keep) && (parent[p] in keep)) { keep[p] = 1; n = 1 } }
            for (p in keep) print p
        }'
}

running() {  # running PID...: those that still run (a zombie waits for its reaper and runs nothing)
    local p st
    for p in "$@"; do
        st="$(ps -o stat= -p "$p" 2>/dev/null || true)"
        [[ -n "$st" && "$st" != Z* ]] && echo "$p"
    done
    return 0
}

cmd_stop() {
    if [[ "${1:-}" == "--all" ]]; then
        ray stop --force
        rm -f "$STATE_FILE"; return 0
    fi
    load_state
    # the head's process group (gcs_server, raylet, dashboard) and every descendant (workers), by id
    local pids left
    pids="$(descendants "$PID" | tr '\n' ' ')"
    if [[ -n "$(running $pids)" ]]; then
        kill -TERM -- "-$PID" 2>/dev/null || true
        # shellcheck disable=SC2086
        kill -TERM $pids 2>/dev/null || true
        local deadline=$((SECONDS + ${FCAS_RAY_STOP_GRACE:-10}))
        while left="$(running $pids)"; [[ -n "$left" ]] && (( SECONDS < deadline )); do sleep 0.3; done
        kill -KILL -- "-$PID" 2>/dev/null || true
        # shellcheck disable=SC2086
        [[ -n "$left" ]] && kill -KILL $left 2>/dev/null || true
        echo "stopped Ray head (pid $PID) and its $(wc -w <<<"$pids") processes"
    else
        kill -KILL -- "-$PID" 2>/dev/null || true   # what is left of its process group, if anything
        echo "Ray head (pid $PID) was not running"
    fi
    rm -f "$STATE_FILE"
}

sub="${1:-}"
[[ $# -gt 0 ]] && shift
case "$sub" in
    start) cmd_start "$@" ;;
    submit) cmd_submit "$@" ;;
    status) cmd_status "$@" ;;
    logs) cmd_logs "$@" ;;
    stop) cmd_stop "$@" ;;
    runtime-env) runtime_env_json ;;
    *) usage ;;
esac
