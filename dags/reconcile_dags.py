"""Nightly reconciliation: one DAG per configured entity (`reconcile_<entity>`), built from reconcile.yaml.

Each run extracts every source system of the entity in parallel, loads them into the warehouse's staging
tables (`staging.<system>__<entity>`, declared as Assets so downstream DAGs can run when staging is fresh),
validates every staging table in parallel (Great Expectations) and applies the quality gates, links records
across systems to persistent ids (`identity.xref`), builds the golden records (`golden.<entity>`, also an
Asset), holds identities that would collide in a target system, plans the changes per target system
(`audit.changes`) and loads each target whose changes may be written (config `load.mode: apply`, thresholds
approved): `check_approval` exports each target's change set into the run storage, `load` writes it into the
target on any worker (journalled, opening no warehouse) and `record_loads` records the journals in the
warehouse; `purge_erased` removes erased people's values from the warehouse and the kept run files; finally
it records the run in `audit.runs` and publishes the warehouse file analysts read.

**Quality gates.** A staging table that fails an error-level gate fails its `validate` task, with the failed
expectations in the message, and raises an alert. The run goes on: `apply_gates` records every outcome and
blocks the writes that depend on the bad table, so `load` skips those targets (the library plans their changes
`blocked`) while the rest loads.

**Run state in Airflow.** `finish_run` records the run (status rules: `reconcile.report`), then shows its status
as its own task state, so the DAG run list tells the truth: `success` and `dry_run` succeed; `failed`,
`incomplete`, `blocked` and `awaiting_approval` fail `finish_run` and with it the DAG run, the message starting
`reconcile run <id> of <entity> ended <status> (recorded; not a crash)` with the reasons (a crash says
`failed`). Clearing and retrying it records the same status again. A load that wrote some changes but not all
(changes failed at the target, or stopped by `load.max_failure_rate`) fails its `load` task after journalling its
outcome (`record_loads` records it), and the run ends `incomplete`. A failed gate or an incomplete load is a
recorded outcome, not a crash: `finish_run` tells them apart from tasks that crashed. Holds standing from earlier runs (open review items
holding the same changes every night) are reported, not `blocked`: a night with nothing new is green.

**Approval.** A load over a change threshold needs a person. `check_approval` branches to `approve_load` (an
`ApprovalOperator`: Approve / Reject, default Reject, response timeout `$RECONCILE_APPROVAL_TIMEOUT_HOURS`,
12 h by default) only when some target waits for approval; its body counts the changes and samples ten. Approve
records the approval in `audit.approvals` and `load_approved` loads those targets; Reject, or no answer in
time, records a rejection and writes nothing. Targets that need no approval load meanwhile (`load`).

**Alerts** (`reconcile_alerts.ReconcileAlert`): error gates failed, an approval requested, and a run ending
`failed`, `incomplete`, `blocked` or `awaiting_approval` **when its status or causes differ from the previous
run's** (the same standing problem alerts once, not every night) go to the task log and `$RECONCILE_ALERT_FILE`
(JSON lines, default `$AIRFLOW_HOME/reconcile-alerts.jsonl`); Slack / email through the Airflow connections named
by `$RECONCILE_ALERT_SLACK_CONN_ID` / `$RECONCILE_ALERT_EMAIL_CONN_ID` when their providers are installed.

**Params.** `full`: a full snapshot of every source instead of an incremental read. `dry_run`: plan
everything, write nothing (the run ends `dry_run`; off = follow the config's `load.mode`). `approve`: pre-approve
this run's loads over a threshold (like `reconcile run --approve`), so nothing waits for a person.

* Config: `$RECONCILE_CONFIG`, default `config/reconcile.yaml` under the repository root.
* Every task is one call into the `reconcile` library and is safe to retry: each step is idempotent for
  the Airflow run id, which is also the run id in `audit.runs`.
* `begin_run` first finishes runs of the entity a killed process left behind (`runner.recover_runs`).
* Queues (CeleryExecutor): tasks that open the warehouse run on `queues.warehouse`; `extract`, `load` and
  `load_approved` on the default queue, or on their system's own `queue` (`<task>_on_<queue>`).
* `record_loads`, `purge_erased` and `finish_run` always run: what a load wrote is recorded even when another
  load failed, an erased person's values are removed even from a failed run, and `finish_run` records a
  failed run (and fails the DAG run) when an earlier task crashed.

Parse time reads only the local YAML file and the environment: no database, connection or Variable is touched.
"""
from __future__ import annotations

import logging
import os
from datetime import datetime, timedelta, timezone
from pathlib import Path

from airflow.providers.common.compat.lineage.entities import Column, Table
from airflow.sdk import Asset, Param, TriggerRule, dag, get_current_context, task

from reconcile.config import Config, load_config
from reconcile.lineage import Dataset, task_lineage
from reconcile.pipeline import task_ids

# Beside this file (Airflow puts the DAG bundle's folder on sys.path); listed in .airflowignore.
from reconcile_alerts import ReconcileAlert, conclude_run
from reconcile_approval import LoadApprovalOperator, approval_timeout

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
    # Eligibility expressions are parsed by begin_run, not here: sqlglot is slow to import and this file
    # is parsed often.
    return load_config(path, check_expressions=False)


def table_asset(table: str, entity: str) -> Asset:
    """A warehouse table as an Asset: stable name = the table, so analysts' DAGs can schedule on it."""
    return Asset(name=table, uri=f"reconcile://{entity}/{table}", group="reconcile")


def lineage_tables(datasets: list[Dataset]) -> list[Table]:
    """Datasets as Airflow lineage tables, which the OpenLineage provider emits as its datasets (with the
    columns as schema facet: the golden table's say where each field comes from)."""
    return [Table(cluster=d.namespace, database=d.database, name=d.table, description=d.description,
                  columns=[Column(name=n, data_type=t, description=desc) for n, t, desc in d.columns])
            for d in datasets]


def with_column_lineage(operator, datasets: list[Dataset]) -> None:
    """Column lineage for a task's OpenLineage COMPLETE event: the provider asks an operator for
    `get_openlineage_facets_on_complete` (its "OpenLineage methods"); this one returns the task's inlets and
    outlets as datasets (as the provider would), each output with `sources` (reconcile.lineage) carrying a
    `columnLineage` facet: output column <- input columns. OpenLineage is imported when the event is built,
    never at parse time."""
    sources = {(d.namespace, d.name): d.sources for d in datasets if d.sources}

    def get_openlineage_facets_on_complete(task_instance):
        from airflow.providers.openlineage.extractors import OperatorLineage
        from airflow.providers.openlineage.extractors.manager import ExtractorManager
        from openlineage.client.facet_v2 import column_lineage_dataset as cl

        inputs = [d for d in map(ExtractorManager.convert_to_ol_dataset, operator.inlets) if d]
        outputs = [d for d in map(ExtractorManager.convert_to_ol_dataset, operator.outlets) if d]
        for out in outputs:
            if (out.namespace, out.name) in sources:
                out.facets["columnLineage"] = cl.ColumnLineageDatasetFacet(fields={
                    column: cl.Fields(inputFields=[
                        cl.InputField(namespace=s.namespace, name=s.name, field=s.field, transformations=[
                            cl.Transformation(type="DIRECT", subtype=s.subtype, description=s.description)])
                        for s in columns])
                    for column, columns in sources[(out.namespace, out.name)]})
        return OperatorLineage(inputs=inputs, outputs=outputs)

    operator.get_openlineage_facets_on_complete = get_openlineage_facets_on_complete


def _connection_urls(cfg: Config, system: str) -> dict[str, str] | None:
    """URL of a system configured as an Airflow connection, looked up at run time (never logged)."""
    conn_id = cfg.systems[system].connection
    if not conn_id:
        return None
    from airflow.sdk import Connection

    return {system: Connection.get(conn_id).get_uri()}


def _all_connection_urls(cfg: Config, systems: list[str]) -> dict[str, str]:
    """The URLs of every system configured as an Airflow connection (begin_run may finish an abandoned run)."""
    return {k: v for s in systems for k, v in (_connection_urls(cfg, s) or {}).items()}


def _failed_tasks(ctx, systems: list[str], queues: dict) -> list[tuple[str, str | None, str]]:
    """This run's tasks that did not succeed, as (task, system or None, state) for `runner.finish_run`, which
    tells a recorded outcome (a failed gate, an incomplete load) from a crash. Mapped instances name their
    system: validate maps over `systems`, extract and load over their queue's systems (`queues`: queue ->
    systems), load_approved (each queue's) over approve_load's answer."""
    ti = ctx["ti"]
    out = []
    for key, state in sorted(_task_states(ctx).items()):
        if key == ti.task_id or state in ("success", "skipped"):
            continue
        base, _, index = key.rpartition("_")
        task, subject = (base, int(index)) if index.isdigit() and base else (key, None)
        mapped = next((m for m in ("load_approved", "extract", "load") if task == m or task.startswith(f"{m}_on_")),
                      None)
        queue = task.removeprefix(f"{mapped}_on_") if mapped and task != mapped else None
        over = None
        if task == "validate":
            over = systems
        elif mapped == "load_approved":
            over = list(ti.xcom_pull(task_ids="approve_load") or [])
        elif mapped:
            over = queues.get(queue, [])
        name = over[subject] if over is not None and subject is not None and subject < len(over) else None
        out.append((task, name, state))
    return out


def _task_states(ctx) -> dict[str, str]:
    """This run's task states by task id (mapped instances as `<task>_<map_index>`), from the Task SDK."""
    ti, run_id = ctx["ti"], ctx["run_id"]
    return ti.get_task_states(dag_id=ti.dag_id, run_ids=[run_id]).get(run_id, {})


def _of_task(states: dict[str, str], task_id: str) -> dict[str, str]:
    """The states of one task: unmapped (`validate`) or its mapped instances (`validate_0`, ...)."""
    return {k: v for k, v in states.items()
            if k == task_id or (k.rsplit("_", 1)[0] == task_id and k.rsplit("_", 1)[1].isdigit())}


def build_dag(cfg: Config, entity: str):
    """The DAG `reconcile_<entity>`: the tasks of `reconcile.pipeline.STAGES` in their order (as
    `runner.run_entity` runs them for the CLI), with the approval branch before the per-target load:
    check_approval -> load[target] -> purge_erased, and, only when a load waits for approval, check_approval ->
    approve_load -> load_approved[target] -> purge_erased. [system] and [target] are one mapped task instance per
    system, named after it in the UI (extract_on_<queue>[system] for systems with a queue). Every body is one
    library call with plain values read from the task context.
    """
    systems = sorted(cfg.entities[entity].sources)
    # Celery queues (the LocalExecutor ignores them): every task that opens the working warehouse runs on the
    # warehouse worker's queue; extracts and loads run on any worker, or on their system's own queue.
    warehouse = {"queue": cfg.queues.warehouse}
    queues: dict[str | None, list[str]] = {}  # queue (None: the default queue) -> its systems
    for system in systems:
        queues.setdefault(cfg.systems[system].queue, []).append(system)
    per_system = {"map_index_template": "{{ task.op_kwargs['system'] }}"}
    per_target = {"map_index_template": "{{ task.op_kwargs['target'] }}"}
    # OpenLineage: what each task reads and writes (systems and warehouse tables), beside the Assets.
    datasets = task_lineage(cfg, entity)
    lineage = {t: {"inlets": lineage_tables(io["inputs"]), "outlets": lineage_tables(io["outputs"])}
               for t, io in datasets.items()}

    @dag(
        dag_id=f"reconcile_{entity}",
        schedule=cfg.schedule,
        start_date=datetime(2026, 1, 1, tzinfo=timezone.utc),
        catchup=False,
        max_active_runs=1,
        tags=["reconcile", entity],
        doc_md=f"{__doc__}\n**This DAG:** entity `{entity}` from {', '.join(systems)} (config `{cfg.path}`).",
        default_args=DEFAULT_ARGS,
        params={
            "full": Param(False, type="boolean", description="Force a full snapshot of every source"),
            "dry_run": Param(False, type="boolean",
                             description="Plan everything, write nothing (off: follow the config's load.mode)"),
            "approve": Param(False, type="boolean",
                             description="Pre-approve this run's loads over a threshold (no approval task)"),
        },
    )
    def reconcile_entity():
        @task(**warehouse)
        def begin_run() -> dict:
            from reconcile import runner

            ctx = get_current_context()
            manifest = runner.begin_run(cfg, entity, ctx["run_id"], ctx["dag_run"].run_after,
                                        full=True if ctx["params"]["full"] else None,
                                        url_overrides=_all_connection_urls(cfg, systems), progress=log.info)
            return {system: plan["mode"] for system, plan in manifest["systems"].items()}

        @task(**per_system, **EXTRACT_RETRIES, **lineage["extract"])
        def extract(system: str) -> dict:
            from reconcile import runner

            return runner.extract_system(cfg, entity, system, get_current_context()["run_id"],
                                         url_overrides=_connection_urls(cfg, system), progress=log.info)

        @task(inlets=lineage["load_staging"]["inlets"], **warehouse,
              outlets=[table_asset(f"staging.{system}__{entity}", entity) for system in systems]
              + lineage["load_staging"]["outlets"])
        def load_staging() -> dict:
            from reconcile import runner

            return runner.load_staging(cfg, entity, get_current_context()["run_id"], progress=log.info)

        @task(**per_system, **warehouse)
        def validate(system: str) -> dict:
            from airflow.sdk.exceptions import AirflowFailException
            from reconcile import runner

            ctx = get_current_context()
            result = runner.validate_system(cfg, entity, system, ctx["run_id"], progress=log.info)
            if result["errors"]:  # already saved for apply_gates: fail visibly, without a retry
                message = (f"error gate(s) failed on staging.{system}__{entity}: {', '.join(result['errors'])}; "
                           f"writes depending on {system} are blocked")
                if result["new_errors"]:  # alert on news only: a gate failing night after night alerted once
                    ReconcileAlert("gates_failed", message, {"entity": entity, "system": system,
                                                             "failed": result["errors"], "new": result["new_errors"],
                                                             "warnings": result["warnings"]})(ctx)
                raise AirflowFailException(message)
            return result

        # Runs after a failed gate too (all_done): gate outcomes must be recorded and writes blocked.
        @task(trigger_rule=TriggerRule.ALL_DONE, **warehouse)
        def apply_gates() -> dict:
            from airflow.sdk.exceptions import AirflowSkipException
            from reconcile import runner

            ctx = get_current_context()
            not_run = {k: v for k, v in _of_task(_task_states(ctx), "validate").items()
                       if v not in ("success", "failed")}
            if not_run:  # staging never completed: nothing to gate; finish_run reports the cause
                raise AirflowSkipException(f"validation did not run ({not_run}): an earlier task failed")
            return runner.apply_gates(cfg, entity, ctx["run_id"], progress=log.info)

        @task(**warehouse, **lineage["resolve_identity"])
        def resolve_identity() -> dict:
            from reconcile import runner

            return runner.resolve_identity(cfg, entity, get_current_context()["run_id"], progress=log.info)

        @task(inlets=lineage["build_golden"]["inlets"], **warehouse,
              outlets=[table_asset(f"golden.{entity}", entity)] + lineage["build_golden"]["outlets"])
        def build_golden() -> dict:
            from reconcile import runner

            return runner.build_golden(cfg, entity, get_current_context()["run_id"], progress=log.info)

        @task(**warehouse)
        def guard_collisions() -> dict:
            from reconcile import runner

            return runner.guard_collisions(cfg, entity, get_current_context()["run_id"], progress=log.info)

        @task(**warehouse, **lineage["plan_changes"])
        def plan_changes() -> dict:
            from reconcile import runner

            ctx = get_current_context()
            return runner.plan_changes(cfg, entity, ctx["run_id"], dry_run=True if ctx["params"]["dry_run"] else None,
                                       approve=bool(ctx["params"]["approve"]), progress=log.info)

        @task.branch(**warehouse)
        def check_approval() -> list[str]:
            """`load` always; `approve_load` only when a target's load waits for approval."""
            import reconcile_approval

            ctx = get_current_context()
            follow, request = reconcile_approval.branch(cfg, entity, ctx["run_id"],
                                                        ctx["ti"].xcom_pull(task_ids="plan_changes") or {})
            if request:
                ctx["ti"].xcom_push(key="approval", value=request)
            return follow

        def load_target(target: str) -> dict:
            from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException
            from reconcile import runner

            run_id = get_current_context()["run_id"]
            state = runner.load_state(cfg, entity, run_id, target)  # exported by check_approval / approve_load
            if state != "ok":  # awaiting_approval, rejected, dry_run, nothing: shown as skipped, never written
                hint = ("; approve_load asks for approval" if state == "awaiting_approval" else "")
                raise AirflowSkipException(f"not loading {target}: {state}{hint}")
            result = runner.apply_load(cfg, entity, run_id, target, url_overrides=_connection_urls(cfg, target),
                                       progress=log.info)
            if result["failed"] or result["status"] == "stopped":  # journalled: fail visibly, no retry
                raise AirflowFailException(
                    f"load into {target} incomplete: {result['failed']} change(s) failed"
                    f"{'; ' + result['reason'] if result.get('reason') else ''} (recorded by record_loads; the "
                    f"run ends incomplete)")
            return result

        @task(**per_target, **lineage["load"])
        def load(target: str) -> dict:
            return load_target(target)

        @task(**per_target, **lineage["load"])
        def load_approved(target: str, on_queue: str | None = None) -> dict:
            from airflow.sdk.exceptions import AirflowSkipException

            if cfg.systems[target].queue != on_queue:  # approve_load answers every queue's targets at once
                raise AirflowSkipException(f"{target} loads on its own queue ({cfg.systems[target].queue or 'default'})")
            return load_target(target)

        # Always runs once the loads are done (also after one failed): what they wrote goes into the warehouse.
        @task(trigger_rule=TriggerRule.ALL_DONE, **warehouse)
        def record_loads() -> dict:
            from reconcile import runner

            return runner.record_loads(cfg, entity, get_current_context()["run_id"], progress=log.info)

        approve_load = LoadApprovalOperator(
            task_id="approve_load",
            **warehouse,  # records the answer in the warehouse
            reconcile_config=cfg,
            entity=entity,
            subject="{{ ti.xcom_pull(task_ids='check_approval', key='approval')['subject'] }}",
            body="{{ ti.xcom_pull(task_ids='check_approval', key='approval')['body'] }}",
            defaults=LoadApprovalOperator.REJECT,  # no answer means no write
            response_timeout=approval_timeout(),
            notifiers=[ReconcileAlert("approval_requested",
                                      f"loads of {entity} over a change threshold wait for approval "
                                      f"(Airflow: Required actions; no answer rejects them)", {"entity": entity})],
        )

        # Always runs, also after a failure: a run re-extracts an erased person until the systems are anonymised.
        @task(trigger_rule=TriggerRule.ALL_DONE, **warehouse)
        def purge_erased() -> dict:
            from reconcile import runner

            return runner.purge_erased(cfg, entity, get_current_context()["run_id"], progress=log.info)

        @task(trigger_rule=TriggerRule.ALL_DONE, **warehouse)  # always runs: a failed run is recorded, then fails visibly
        def finish_run() -> dict:
            from reconcile import runner

            ctx = get_current_context()
            summary = runner.finish_run(cfg, entity, ctx["run_id"], progress=log.info,
                                        failed_tasks=_failed_tasks(ctx, systems, queues))
            return conclude_run(ctx, summary)

        # One mapped `extract` (and `load`, `load_approved`) per queue: on the default queue, and
        # `<task>_on_<queue>` for the systems with one.
        def on_queues(mapped, name: str, per: dict) -> list:
            return [mapped.override(task_id=f"{name}_on_{queue}", queue=queue).expand(**over) if queue
                    else mapped.expand(**over)
                    for queue, over in sorted(per.items(), key=lambda kv: kv[0] or "")]

        extracts = on_queues(extract, "extract", {q: {"system": on} for q, on in queues.items()})
        # The stages in pipeline.STAGES order; the approval branch sits between planning and the per-target load.
        tasks = {"begin_run": begin_run(), "extract": extracts, "load_staging": load_staging(),
                 "validate": validate.expand(system=systems), "apply_gates": apply_gates(),
                 "resolve_identity": resolve_identity(), "build_golden": build_golden(),
                 "guard_collisions": guard_collisions(), "plan_changes": plan_changes(),
                 "load": on_queues(load, "load", {q: {"target": on} for q, on in queues.items()}),
                 "record_loads": record_loads(), "purge_erased": purge_erased(), "finish_run": finish_run()}
        for name in ("load_staging", "build_golden"):  # staging columns <- source columns; golden fields <- them
            with_column_lineage(tasks[name].operator, datasets[name]["outputs"])
        order = task_ids()
        if set(order) != set(tasks):
            raise RuntimeError(f"reconcile_{entity}: the DAG's tasks {sorted(tasks)} do not match "
                               f"reconcile.pipeline.STAGES {order}")
        branch = check_approval()
        for upstream, downstream in zip(order, order[1:]):
            if downstream == "load":
                tasks[upstream] >> branch >> tasks["load"]
            else:
                tasks[upstream] >> tasks[downstream]
        after_load = tasks[order[order.index("load") + 1]]
        # Every queue's load_approved maps over approve_load's answer (XCom can be mapped over only whole).
        approved = [load_approved.override(task_id=f"load_approved_on_{q}", queue=q).partial(on_queue=q).expand(
                        target=approve_load.output) if q else load_approved.expand(target=approve_load.output)
                    for q in sorted(queues, key=lambda q: q or "")]
        branch >> approve_load >> approved >> after_load

    return reconcile_entity()


_cfg = read_config()
for _entity in sorted(_cfg.entities):
    globals()[f"reconcile_{_entity}"] = build_dag(_cfg, _entity)
