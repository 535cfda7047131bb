#!/usr/bin/env bash
# `make demo`: fresh demo systems (marketing served by a local HubSpot-like API) -> project-local Airflow ->
# two nights of the reconcile_contact DAG -> summary.
#
# Usage: bash scripts/demo.sh [DIR]   (default: demo; relative to the repository root). Re-runnable: every
# call regenerates the demo systems and the warehouse; the Airflow metadata DB (SQLite in .airflow/) is
# migrated only when new or when the installed Airflow version changed.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
DIR="${1:-demo}"
BIN="$ROOT/.venv/bin"
ENTITY=contact
DAG_ID="reconcile_$ENTITY"

step() { printf '\n== %s\n' "$*"; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

[[ -x "$BIN/reconcile" && -x "$BIN/airflow" ]] || die "no project virtualenv at .venv: run \`make venv\` first"

step "1/4 Demo systems in $DIR: CRM and ERP as SQLite, marketing behind a local HubSpot-like API"
rm -rf "$DIR/warehouse"  # the warehouse (and its run state) from an earlier demo: start clean
API_PORT="$("$BIN/python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
"$BIN/reconcile" demo init "$DIR" --force --api-port "$API_PORT"
DIR_ABS="$(cd "$DIR" && pwd)"
CONFIG="$DIR_ABS/reconcile.yaml"
# The HubSpot-like API over systems/marketing.db (state persists between the nights), stopped on exit.
source "$ROOT/scripts/demo_api.sh"
demo_api_start "$DIR_ABS" || exit 1
trap 'kill "$DEMO_API_PID" 2>/dev/null || true' EXIT

step "2/4 Project-local Airflow"
source "$ROOT/scripts/airflow_env.sh"
airflow_env "$CONFIG"
airflow_migrate

step "3/4 Two nights: airflow dags test $DAG_ID (RECONCILE_CONFIG=$CONFIG)"
echo "night 1 applies the demo's changes; night 2 finds nothing left to write (convergence)"
# Show reconcile's progress lines live (the rest of Airflow's output goes to the log only).
show_progress() {
  local line msg
  while IFS= read -r line; do
    case "$line" in
      *"[reconcile]"*)
        msg="${line#*] }"; msg="${msg%%\[reconcile\]*}"; msg="${msg%"${msg##*[![:space:]]}"}"
        echo "  $msg" ;;
      *"new_state=up_for_retry"*) echo "  ! a task failed and will be retried after its retry delay (see the log)" ;;
    esac
  done
}
# `dags test` waits for ever on a human-in-the-loop task. The demo's thresholds are set so that no load needs
# approval; should one ever need it, stop that test run (the lines pass through until then) instead of hanging.
HITL_WAIT="Waiting for Human-in-the-loop input"
stop_at_approval() {  # $1: pid of `airflow dags test`
  local line
  while IFS= read -r line; do
    printf '%s\n' "$line"
    if [[ "$line" == *"$HITL_WAIT"* ]]; then
      echo "  ! the run waits for an approval (a load over a change threshold): stopping the test run" >&2
      kill -TERM "$1" 2>/dev/null
      for _ in 1 2 3 4 5 6 7 8 9 10; do kill -0 "$1" 2>/dev/null || return 0; sleep 0.5; done
      kill -KILL "$1" 2>/dev/null
      return 0
    fi
  done
}
run_night() {  # $1: night number, $2: logical date
  local night=$1 logical=$2 start=$SECONDS rc final first airflow_pid run_id
  LOG="$AIRFLOW_HOME/demo-dags-test-night$night.log"
  echo "-- night $night (logical date $logical), full log: $LOG"
  : >"$LOG"
  set +e
  PYTHONUNBUFFERED=1 "$BIN/airflow" dags test "$DAG_ID" "$logical" >>"$LOG" 2>&1 &
  airflow_pid=$!
  # A background job of a script ignores Ctrl-C: pass it on.
  trap 'kill -TERM "$airflow_pid" 2>/dev/null; exit 130' INT TERM
  tail -n +1 -F --pid="$airflow_pid" "$LOG" 2>/dev/null | stop_at_approval "$airflow_pid" | show_progress
  wait "$airflow_pid" 2>/dev/null  # (quiet: a test run stopped at an approval is reported below)
  rc=$?
  trap - INT TERM
  set -e
  if grep -q "$HITL_WAIT" "$LOG"; then
    run_id="$("$BIN/reconcile" status --config "$CONFIG" --json --limit 1 \
      | "$BIN/python" -c 'import json, sys; print(json.load(sys.stdin)[0]["run_id"])')"
    echo "night $night stopped at approve_load: \`airflow dags test\` has no one to ask. With a scheduler and an"
    echo "api-server the approval waits in the Airflow UI (Required actions; no answer in time rejects). Here,"
    echo "approve and load from the CLI, or reject:"
    echo "  $BIN/reconcile approve --config $CONFIG --run '$run_id' --by \$USER [--reject]"
    exit 3
  fi
  # `dags test` exits non-zero when the run failed, but check the run's final state as well. A run that ended
  # blocked, incomplete or awaiting approval fails its finish_run task on purpose (red in the run list), after
  # recording: that is an outcome to read below, not a crash.
  final="$(grep -o "DagRun Finished: dag_id=$DAG_ID, .*state=[a-z_]*" "$LOG" | tail -n 1 | grep -o 'state=[a-z_]*$' || true)"
  if [[ $rc -ne 0 || "$final" != "state=success" ]] && ! grep -q "(recorded; not a crash)" "$LOG"; then
    # The first task error (the cause) and the run's own verdict, then the end of the log.
    first="$(grep -n -m 1 "Task failed with exception" "$LOG" | cut -d: -f1 || true)"
    if [[ -n "$first" ]]; then
      echo "--- first task error:" >&2
      awk -v s="$first" 'NR > s && !/^[[:space:]]/ && !/^Traceback/ {print; exit}' "$LOG" | cut -c1-400 >&2
    fi
    grep -o "reconcile run .* failed: .*" "$LOG" | tail -n 1 | cut -c1-400 >&2 || true
    echo "--- last lines of the log:" >&2
    tail -n 5 "$LOG" | cut -c1-300 >&2
    die "night $night: the DAG run of $DAG_ID did not succeed (exit $rc, ${final:-no final state logged}); full log: $LOG"
  fi
  recorded="$("$BIN/reconcile" status --config "$CONFIG" --json --limit 1 \
    | "$BIN/python" -c 'import json, sys; print(json.load(sys.stdin)[0]["status"])')"
  echo "night $night: DAG run finished in $((SECONDS - start))s, run $recorded"
}
today="$(date -u +%Y-%m-%d)"
run_night 1 "${today}T01:00:00+00:00"
run_night 2 "${today}T02:00:00+00:00"

step "4/4 Result"
"$BIN/reconcile" status --config "$CONFIG" --limit 2
echo
echo "What each night wrote (audit.changes; held = waiting in the review queue):"
"$BIN/reconcile" status --config "$CONFIG" --json --limit 2 | "$BIN/python" -c '
import json, sys
for r in reversed(json.load(sys.stdin)):
    ch = (r["summary"] or {}).get("changes", {})
    applied = sum(c["applied"] for c in ch.values()); held = sum(c["held"] for c in ch.values())
    todo = sum(c["planned"] - c["held"] - c["applied"] - c["failed"] - c["skipped_conflict"] for c in ch.values())
    print("  %s: %s, applied %d, held %d, not written %d" % (r["run_id"], r["status"], applied, held, todo))
'
echo
read -r status run_id < <("$BIN/reconcile" status --config "$CONFIG" --json --limit 1 \
  | "$BIN/python" -c 'import json, sys; r = json.load(sys.stdin)[0]; print(r["status"], r["run_id"])')
case "$status" in
  blocked)
    echo "(blocked: the quality gates or the collision guard newly held some writes back for review, e.g."
    echo " people sharing one mailbox; nothing unsafe was written. The DAG run is red on purpose so it is seen."
    echo " Alerts are in ${RECONCILE_ALERT_FILE:-$AIRFLOW_HOME/reconcile-alerts.jsonl})" ;;
  incomplete)
    echo "(incomplete: some changes failed at a target or were not attempted; see the run's failures and"
    echo " unattempted in \`$BIN/reconcile status --config $CONFIG --json --limit 1\`)" ;;
  awaiting_approval)
    echo "(awaiting_approval: a load exceeds a safety threshold and was not approved. To approve and"
    echo " load it: $BIN/reconcile approve --config $CONFIG --run '$run_id' --by \$USER)" ;;
  dry_run)
    echo "(dry_run: changes were planned into audit.changes but nothing was written: load.mode is dry_run)" ;;
esac
WAREHOUSE="$DIR_ABS/warehouse/reconcile.duckdb"
Q1="SELECT 'crm' AS system, count(*) AS records FROM staging.crm__contact UNION ALL SELECT 'marketing', count(*) FROM staging.marketing__contact UNION ALL SELECT 'erp', count(*) FROM staging.erp__contact"
Q2="SELECT system, record_key, reason FROM audit.quarantine ORDER BY system"
cat <<MSG

Warehouse (published, open it read-only): $WAREHOUSE
Try, with the duckdb CLI:
  duckdb -readonly "$WAREHOUSE" "$Q1"
  duckdb -readonly "$WAREHOUSE" "$Q2"
or without it:
  $BIN/python -c "import duckdb; duckdb.connect('$WAREHOUSE', read_only=True).sql(\"$Q1\").show()"
  $BIN/python -c "import duckdb; duckdb.connect('$WAREHOUSE', read_only=True).sql(\"$Q2\").show()"
Airflow logs: $AIRFLOW_HOME/demo-dags-test-night1.log and -night2.log
MSG
