#!/usr/bin/env bash
# `make ui`: Airflow locally (api-server, scheduler, dag-processor, triggerer) with the demo deployment and the
# reconcile UI plugin; prints the URL and how to log in; Ctrl-C stops every process it started.
#
# Usage: bash scripts/ui.sh [DIR]   (default: demo). Environment: UI_PORT (default 8080), UI_USER / UI_PASSWORD
# (default admin / admin), UI_TRIGGER=0 to not trigger a first run. The demo in DIR is created when missing;
# AIRFLOW_HOME is the project-local .airflow/ (SQLite metadata DB), shared with `make demo`.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
DIR="${1:-demo}"
BIN="$ROOT/.venv/bin"
PORT="${UI_PORT:-8080}"
USER_NAME="${UI_USER:-admin}"
PASSWORD="${UI_PASSWORD:-admin}"
DAG_ID=reconcile_contact

die() { printf 'error: %s\n' "$*" >&2; exit 1; }
[[ -x "$BIN/reconcile" && -x "$BIN/airflow" ]] || die "no project virtualenv at .venv: run \`make venv\` first"
[[ "$PORT" =~ ^[0-9]+$ ]] || die "UI_PORT must be a port number, got '$PORT'"
if (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; then
  die "port $PORT is in use: stop what listens there or choose another, e.g. make ui UI_PORT=8090"
fi

if [[ ! -f "$DIR/reconcile.yaml" ]]; then
  echo "== no demo in $DIR yet: writing one"
  "$BIN/reconcile" demo init "$DIR"
fi
DIR_ABS="$(cd "$DIR" && pwd)"

# Project-local Airflow, as `make demo` uses it (scripts/airflow_env.sh), plus what a real deployment needs.
source "$ROOT/scripts/airflow_env.sh"
airflow_env "$DIR_ABS/reconcile.yaml"
export AIRFLOW__CORE__PLUGINS_FOLDER="$ROOT/plugins"
export AIRFLOW__CORE__EXECUTOR=LocalExecutor
export AIRFLOW__CORE__EXECUTION_API_SERVER_URL="http://127.0.0.1:$PORT/execution/"
export AIRFLOW__API__PORT="$PORT"
export AIRFLOW__API__HOST=127.0.0.1  # this machine only: the demo login is admin / admin
export AIRFLOW__API__BASE_URL="http://127.0.0.1:$PORT"
# Login: SimpleAuthManager with one known user; its password file is written here, not generated.
export AIRFLOW__CORE__AUTH_MANAGER=airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager
export AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS="$USER_NAME:admin"
export AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE="$AIRFLOW_HOME/ui-passwords.json"
printf '{"%s": "%s"}\n' "$USER_NAME" "$PASSWORD" >"$AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE"
chmod 600 "$AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE"
# Every process must sign and check the same JWTs (UI sessions, task tokens): one secret, kept in AIRFLOW_HOME.
SECRET_FILE="$AIRFLOW_HOME/ui-jwt-secret"
[[ -s "$SECRET_FILE" ]] || (umask 077 && "$BIN/python" -c 'import secrets; print(secrets.token_urlsafe(48))' >"$SECRET_FILE")
AIRFLOW__API_AUTH__JWT_SECRET="$(cat "$SECRET_FILE")"
export AIRFLOW__API_AUTH__JWT_SECRET
airflow_migrate

LOGS="$AIRFLOW_HOME/ui-logs"
mkdir -p "$LOGS"
PIDS=()
stop() {
  trap - INT TERM EXIT
  echo
  echo "== stopping Airflow (${#PIDS[@]} processes)"
  for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for _ in $(seq 1 40); do
    alive=0
    for pid in "${PIDS[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
    [[ $alive == 0 ]] && break
    sleep 0.5
  done
  for pid in "${PIDS[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
  echo "stopped; logs in $LOGS"
}
trap stop INT TERM EXIT

# A demo written by `make demo` reaches marketing through the local HubSpot-like API: serve it too.
source "$ROOT/scripts/demo_api.sh"
demo_api_start "$DIR_ABS" || exit 1
[[ -z "$DEMO_API_PID" ]] || PIDS+=("$DEMO_API_PID")

for component in api-server scheduler dag-processor triggerer; do
  "$BIN/airflow" "$component" >"$LOGS/$component.log" 2>&1 &
  PIDS+=($!)
done

echo "== waiting for the api-server on port $PORT (logs: $LOGS)"
for _ in $(seq 1 240); do
  if "$BIN/python" - "$PORT" <<'PY' 2>/dev/null; then break; fi
import sys, urllib.request
urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/api/v2/monitor/health", timeout=2)
PY
  for pid in "${PIDS[@]}"; do
    kill -0 "$pid" 2>/dev/null || { tail -n 20 "$LOGS"/*.log >&2; die "an Airflow process exited early; logs: $LOGS"; }
  done
  sleep 1
done

if [[ "${UI_TRIGGER:-1}" != 0 ]]; then
  # Wait until the dag processor has parsed the DAG, then run it once through the scheduler (real task logs
  # and durations in the UI); the demo's thresholds let it load without an approval.
  for _ in $(seq 1 120); do
    "$BIN/airflow" dags unpause "$DAG_ID" >/dev/null 2>&1 && break
    sleep 1
  done
  "$BIN/airflow" dags trigger "$DAG_ID" >/dev/null 2>&1 && echo "== triggered a run of $DAG_ID" \
    || echo "(could not trigger $DAG_ID yet: use the Trigger button in the UI)"
fi

cat <<MSG

Airflow with reconcile is up:   http://127.0.0.1:$PORT
  log in as:                    $USER_NAME / $PASSWORD   (UI_USER / UI_PASSWORD to change)
  reconcile pages:              Reconcile menu in the UI, or http://127.0.0.1:$PORT/reconcile/review
  the DAG:                      http://127.0.0.1:$PORT/dags/$DAG_ID   (Trigger runs another night)
  config:                       $RECONCILE_CONFIG
  logs:                         $LOGS (task logs in $AIRFLOW_HOME/logs)
Press Ctrl-C to stop.
MSG
# Until Ctrl-C (which also reaches the Airflow processes) or one of them exits on its own; either way the
# EXIT trap stops the others.
wait -n "${PIDS[@]}" || true
