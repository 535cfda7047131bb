"""Nightly reconciliation: one DAG per configured entity (`reconcile_<entity>`), built from reconcile.yaml.

Each run extracts every source system of the entity in parallel, loads them into the warehouse's staging
tables (`staging.<system>__<entity>`, declared as Assets so downstream DAGs can run when staging is fresh),
validates every staging table in parallel (Great Expectations) and applies the quality gates, links records
across systems to persistent ids (`identity.xref`), builds the golden records (`golden.<entity>`, also an
Asset), holds identities that would collide in a target system, plans the changes per target system
(`audit.changes`) and loads each target whose changes may be written (config `load.mode: apply`, thresholds
approved); finally it records the run in `audit.runs` and publishes the warehouse file analysts read.

A run can end `blocked` (writes held back), `awaiting_approval` (a load over a threshold: its `load` task is
skipped; `reconcile approve` approves and loads it) or `dry_run`: all by design, not failures. Nothing in this
DAG waits for a person.

* Config: `$RECONCILE_CONFIG`, default `config/reconcile.yaml` under the repository root.
* Trigger with `{"full": true}` to force a full snapshot of every source instead of an incremental read.
* Every task is one call into the `reconcile` library and is safe to retry: each step is idempotent for
  the Airflow run id, which is also the run id in `audit.runs`.
* `finish_run` always runs: it records a failed run (and fails the DAG run) when an earlier task failed.

Parse time reads only the local YAML file: no database, connection or Variable is touched here.
"""
from __future__ import annotations

import logging
import os
from datetime import datetime, timedelta, timezone
from pathlib import Path

from airflow.sdk import Asset, Param, TriggerRule, dag, get_current_context, task

from reconcile.config import Config, load_config

CONFIG_ENV = "RECONCILE_CONFIG"
DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "config" / "reconcile.yaml"

log = logging.getLogger("reconcile")

# The warehouse stages are deterministic and already wait for the warehouse lock themselves: one quick retry
# covers a killed worker; more would only delay reporting a real failure.
DEFAULT_ARGS = {
    "owner": "reconcile",
    "retries": 1,
    "retry_delay": timedelta(seconds=30),
}
# Sources are other teams' production systems: ride out restarts and brief outages before failing the run.
EXTRACT_RETRIES = {
    "retries": 3,
    "retry_delay": timedelta(seconds=30),
    "retry_exponential_backoff": 2.0,
    "max_retry_delay": timedelta(minutes=10),
}


def config_path() -> Path:
    return Path(os.environ.get(CONFIG_ENV) or DEFAULT_CONFIG).expanduser()


def read_config() -> Config:
    """The config, or an error that says how to point Airflow at one (shown as the file's import error)."""
    path = config_path()
    if not path.is_file():
        raise FileNotFoundError(
            f"reconcile config not found at {path}: set the environment variable {CONFIG_ENV} to your "
            f"reconcile.yaml (default when unset: {DEFAULT_CONFIG}); `reconcile demo init DIR` writes a demo one"
        )
    return load_config(path)


def table_asset(table: str, entity: str) -> Asset:
    """A warehouse table as an Asset: stable name = the table, so analysts' DAGs can schedule on it."""
    return Asset(name=table, uri=f"reconcile://{entity}/{table}", group="reconcile")


def _connection_urls(cfg: Config, system: str) -> dict[str, str] | None:
    """URL of a system configured as an Airflow connection, looked up at run time (never logged)."""
    conn_id = cfg.systems[system].connection
    if not conn_id:
        return None
    from airflow.sdk import Connection

    return {system: Connection.get(conn_id).get_uri()}


def build_dag(cfg: Config, entity: str):
    """The DAG `reconcile_<entity>`, the same stages in the same order as `runner.run_entity` (the CLI).

    begin_run -> extract[system] -> load_staging -> validate[system] -> apply_gates -> resolve_identity
    -> build_golden -> guard_collisions -> plan_changes -> load[target] -> finish_run; [system] and [target] are
    one mapped task instance per system, named after it in the UI. Every body is one library call with plain
    values read from the task context (load first asks the library whether the target may be written).
    """
    systems = sorted(cfg.entities[entity].sources)
    per_system = {"map_index_template": "{{ task.op_kwargs['system'] }}"}

    @dag(
        dag_id=f"reconcile_{entity}",
        schedule=cfg.schedule,
        start_date=datetime(2026, 1, 1, tzinfo=timezone.utc),
        catchup=False,
        max_active_runs=1,
        tags=["reconcile", entity],
        doc_md=f"{__doc__}\n**This DAG:** entity `{entity}` from {', '.join(systems)} (config `{cfg.path}`).",
        default_args=DEFAULT_ARGS,
        params={"full": Param(False, type="boolean", description="Force a full snapshot of every source")},
    )
    def reconcile_entity():
        @task
        def begin_run() -> dict:
            from reconcile import runner

            ctx = get_current_context()
            manifest = runner.begin_run(cfg, entity, ctx["run_id"], ctx["dag_run"].run_after,
                                        full=True if ctx["params"]["full"] else None)
            return {system: plan["mode"] for system, plan in manifest["systems"].items()}

        @task(**per_system, **EXTRACT_RETRIES)
        def extract(system: str) -> dict:
            from reconcile import runner

            return runner.extract_system(cfg, entity, system, get_current_context()["run_id"],
                                         url_overrides=_connection_urls(cfg, system), progress=log.info)

        @task(outlets=[table_asset(f"staging.{system}__{entity}", entity) for system in systems])
        def load_staging() -> dict:
            from reconcile import runner

            return runner.load_staging(cfg, entity, get_current_context()["run_id"], progress=log.info)

        @task(**per_system)
        def validate(system: str) -> dict:
            from reconcile import runner

            return runner.validate_system(cfg, entity, system, get_current_context()["run_id"], progress=log.info)

        @task
        def apply_gates() -> dict:
            from reconcile import runner

            return runner.apply_gates(cfg, entity, get_current_context()["run_id"], progress=log.info)

        @task
        def resolve_identity() -> dict:
            from reconcile import runner

            return runner.resolve_identity(cfg, entity, get_current_context()["run_id"], progress=log.info)

        @task(outlets=[table_asset(f"golden.{entity}", entity)])
        def build_golden() -> dict:
            from reconcile import runner

            return runner.build_golden(cfg, entity, get_current_context()["run_id"], progress=log.info)

        @task
        def guard_collisions() -> dict:
            from reconcile import runner

            return runner.guard_collisions(cfg, entity, get_current_context()["run_id"], progress=log.info)

        @task
        def plan_changes() -> dict:
            from reconcile import runner

            return runner.plan_changes(cfg, entity, get_current_context()["run_id"], progress=log.info)

        @task(map_index_template="{{ task.op_kwargs['target'] }}")
        def load(target: str) -> dict:
            from airflow.sdk.exceptions import AirflowSkipException
            from reconcile import runner

            run_id = get_current_context()["run_id"]
            state = runner.targets_to_load(cfg, entity, run_id)[target]
            if state != "ok":  # awaiting_approval, rejected, dry_run, nothing: shown as skipped, never written
                hint = (f"; `reconcile approve --run '{run_id}' --entity {entity} --target {target} --by NAME` "
                        f"approves and loads it" if state == "awaiting_approval" else "")
                raise AirflowSkipException(f"not loading {target}: {state}{hint}")
            return runner.load_changes(cfg, entity, run_id, target, url_overrides=_connection_urls(cfg, target),
                                       progress=log.info)

        @task(trigger_rule=TriggerRule.ALL_DONE)  # always runs: a failed run is recorded, then fails visibly
        def finish_run() -> dict:
            from airflow.sdk.exceptions import AirflowFailException
            from reconcile import runner

            ctx = get_current_context()
            ti, run_id = ctx["ti"], ctx["run_id"]
            states = ti.get_task_states(dag_id=ti.dag_id, run_ids=[run_id]).get(run_id, {})
            bad = {t: s for t, s in states.items() if t != ti.task_id and s not in ("success", "skipped")}
            failed = sorted(t for t, s in bad.items() if s == "failed") or sorted(bad)  # the cause, not the fallout
            error = f"task(s) failed: {', '.join(failed)}" if bad else None
            summary = runner.finish_run(cfg, entity, run_id, status="failed" if bad else "success",
                                        error=error, progress=log.info)
            if summary["status"] == "failed":
                ti.xcom_push(key="summary", value=summary)
                raise AirflowFailException(f"reconcile run {run_id} of {entity} failed: {summary.get('error')}")
            if summary["status"] != "success":  # blocked, awaiting_approval, dry_run: by design, not failures
                log.warning("run %s of %s ended %s: see its summary (changes, gates)", run_id, entity,
                            summary["status"])
            return summary

        (begin_run() >> extract.expand(system=systems) >> load_staging() >> validate.expand(system=systems)
         >> apply_gates() >> resolve_identity() >> build_golden() >> guard_collisions() >> plan_changes()
         >> load.expand(target=systems) >> finish_run())

    return reconcile_entity()


_cfg = read_config()
for _entity in sorted(_cfg.entities):
    globals()[f"reconcile_{_entity}"] = build_dag(_cfg, _entity)
