# shellcheck shell=bash
# Environment of the local stack. Source it: `source deploy/local/env.sh`.
#
# Everything lives under $LLMOPS_HOME (default <repo>/.llmops, git-ignored) and binds to
# 127.0.0.1 only. Connections are AIRFLOW_CONN_* env vars, so a fresh home needs no
# `airflow connections add`. Override any variable by exporting it before sourcing.

_llmops_env_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
export ROOT="${ROOT:-$(cd "$_llmops_env_dir/../.." && pwd)}"
unset _llmops_env_dir

export LLMOPS_HOME="${LLMOPS_HOME:-$ROOT/.llmops}"
export AIRFLOW_HOME="${AIRFLOW_HOME:-$LLMOPS_HOME/airflow}"
mkdir -p "$LLMOPS_HOME" "$AIRFLOW_HOME" "$LLMOPS_HOME/logs" "$LLMOPS_HOME/run"

# ports (all on 127.0.0.1)
export LLMOPS_BIND=127.0.0.1
export AIRFLOW_PORT="${AIRFLOW_PORT:-8080}"
export MLFLOW_PORT="${MLFLOW_PORT:-5000}"
export PROMETHEUS_PORT="${PROMETHEUS_PORT:-9090}"
export VLLM_PORT="${VLLM_PORT:-8011}"
export STATSD_PORT="${STATSD_PORT:-9125}"                     # UDP: Airflow's StatsD metrics
export STATSD_EXPORTER_PORT="${STATSD_EXPORTER_PORT:-9102}"   # their Prometheus /metrics

export AIRFLOW_URL="http://$LLMOPS_BIND:$AIRFLOW_PORT"
export MLFLOW_URL="http://$LLMOPS_BIND:$MLFLOW_PORT"
export PROMETHEUS_URL="http://$LLMOPS_BIND:$PROMETHEUS_PORT"

# Airflow core
export AIRFLOW__CORE__DAGS_FOLDER="${LLMOPS_DAGS_FOLDER:-$ROOT/dags}"
export AIRFLOW__CORE__PLUGINS_FOLDER="$ROOT/plugins"
export AIRFLOW__CORE__EXECUTOR=LocalExecutor
export AIRFLOW__DATABASE__SQL_ALCHEMY_CONN="sqlite:///$AIRFLOW_HOME/airflow.db"
export AIRFLOW__CORE__PARALLELISM="${AIRFLOW__CORE__PARALLELISM:-4}"   # 2 cores
export AIRFLOW__CORE__LOAD_EXAMPLES=False
export AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION=False
export AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS="${AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS:-admin:admin}"
export AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE="$AIRFLOW_HOME/simple_auth_manager_passwords.json.generated"
# task runners reach the execution API here (the default says localhost, which may be ::1)
export AIRFLOW__CORE__EXECUTION_API_SERVER_URL="$AIRFLOW_URL/execution/"
export AIRFLOW__API__HOST=$LLMOPS_BIND
export AIRFLOW__API__PORT=$AIRFLOW_PORT
export AIRFLOW__API__BASE_URL="$AIRFLOW_URL"
export AIRFLOW__API__WORKERS=1
# new recipe files appear within seconds rather than minutes
export AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL="${AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL:-10}"
export AIRFLOW__DAG_PROCESSOR__MIN_FILE_PROCESS_INTERVAL="${AIRFLOW__DAG_PROCESSOR__MIN_FILE_PROCESS_INTERVAL:-10}"
# parse in fresh interpreters: edits to llmops_provider/ (not only to dags/) show up without a restart
export AIRFLOW__DAG_PROCESSOR__PARSING_PRE_IMPORT_MODULES=False
export AIRFLOW__SCHEDULER__ENABLE_HEALTH_CHECK=False  # it would bind 0.0.0.0:8974

# Secrets generated once per home (never committed): stable across restarts so JWTs and
# encrypted connection fields stay valid.
_llmops_secrets="$LLMOPS_HOME/secrets.env"
if [ ! -s "$_llmops_secrets" ]; then
    (
        umask 077
        _rand() { head -c "$1" /dev/urandom | base64 | tr -d '\n'; }
        {
            echo "export AIRFLOW__API_AUTH__JWT_SECRET='$(_rand 48)'"
            echo "export AIRFLOW__API__SECRET_KEY='$(_rand 48)'"
            echo "export AIRFLOW__CORE__FERNET_KEY='$(head -c 32 /dev/urandom | base64 | tr '+/' '-_')'"
        } >"$_llmops_secrets.tmp" && mv "$_llmops_secrets.tmp" "$_llmops_secrets"
    )
fi
# shellcheck disable=SC1090
source "$_llmops_secrets"
unset _llmops_secrets

# Airflow's lifecycle metrics (DAG runs, task instances, scheduler, pools) over StatsD to the
# stack's statsd exporter (deploy/prometheus/statsd-mapping.yml), which Prometheus scrapes
export AIRFLOW__METRICS__STATSD_ON="${AIRFLOW__METRICS__STATSD_ON:-True}"
export AIRFLOW__METRICS__STATSD_HOST=$LLMOPS_BIND
export AIRFLOW__METRICS__STATSD_PORT=$STATSD_PORT
export AIRFLOW__METRICS__STATSD_PREFIX=airflow

# [llmops]
export AIRFLOW__LLMOPS__HOME="$LLMOPS_HOME"
export AIRFLOW__LLMOPS__RUNTIME_PYTHON="${AIRFLOW__LLMOPS__RUNTIME_PYTHON:-$ROOT/.venv-runtime/bin/python}"

# connections (ids used by the recipe defaults)
export AIRFLOW_CONN_MLFLOW_DEFAULT="{\"conn_type\": \"llmops_mlflow\", \"host\": \"$LLMOPS_BIND\", \"port\": $MLFLOW_PORT, \"schema\": \"http\"}"
export AIRFLOW_CONN_PROMETHEUS_DEFAULT="{\"conn_type\": \"llmops_prometheus\", \"host\": \"$LLMOPS_BIND\", \"port\": $PROMETHEUS_PORT, \"schema\": \"http\"}"
export AIRFLOW_CONN_SPARK_DEFAULT='{"conn_type": "spark", "host": "local[2]"}'
export AIRFLOW_CONN_VLLM_DEFAULT="{\"conn_type\": \"llmops_vllm\", \"host\": \"$LLMOPS_BIND\", \"port\": $VLLM_PORT, \"schema\": \"http\"}"

# engines
export SPARK_LOCAL_IP=127.0.0.1
if [ -z "${JAVA_HOME:-}" ] && command -v java >/dev/null 2>&1; then
    JAVA_HOME="$(dirname "$(dirname "$(readlink -f "$(command -v java)")")")"
    export JAVA_HOME
fi
# keep local clients off any proxy the shell may have
export NO_PROXY="127.0.0.1,localhost${NO_PROXY:+,$NO_PROXY}"
export no_proxy="$NO_PROXY"
export PATH="$ROOT/.venv/bin:$PATH"
