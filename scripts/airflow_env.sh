# Sourced by scripts/demo.sh (`make demo`) and scripts/ui.sh (`make ui`): the project-local Airflow they share.
# Expects ROOT (the repository), BIN (.venv/bin) and a die() function from the caller.

# airflow_env CONFIG: always project-local (even if the shell exports AIRFLOW_HOME or a database for another
# Airflow): never read or migrate anything but our own .airflow/airflow.db.
airflow_env() {
  export AIRFLOW_HOME="$ROOT/.airflow"
  export AIRFLOW__CORE__DAGS_FOLDER="$ROOT/dags"
  export AIRFLOW__CORE__LOAD_EXAMPLES=False
  export AIRFLOW__DATABASE__SQL_ALCHEMY_CONN="sqlite:///$AIRFLOW_HOME/airflow.db"
  unset AIRFLOW_CONFIG
  export RECONCILE_CONFIG="$1"
  mkdir -p "$AIRFLOW_HOME"
}

# airflow_migrate: migrate the SQLite metadata DB when new or when the installed Airflow version changed.
airflow_migrate() {
  local version stamp
  version="$("$BIN/python" -c 'import importlib.metadata as m; print(m.version("apache-airflow"))')"
  stamp="$AIRFLOW_HOME/.demo-migrated"
  if [[ -f "$AIRFLOW_HOME/airflow.db" && "$(cat "$stamp" 2>/dev/null)" == "$version" ]]; then
    echo "AIRFLOW_HOME=$AIRFLOW_HOME (Airflow $version, metadata DB up to date)"
  else
    echo "AIRFLOW_HOME=$AIRFLOW_HOME: migrating the SQLite metadata DB for Airflow $version (first run only) ..."
    if ! "$BIN/airflow" db migrate >"$AIRFLOW_HOME/demo-db-migrate.log" 2>&1; then
      tail -n 30 "$AIRFLOW_HOME/demo-db-migrate.log" >&2
      die "airflow db migrate failed; full log: $AIRFLOW_HOME/demo-db-migrate.log"
    fi
    echo "$version" >"$stamp"
  fi
}
