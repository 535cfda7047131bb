"""DAG integrity: dags/ parses cleanly against a generated demo config, and every DAG follows our rules."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import yaml

from reconcile.config import load_config
from reconcile.pipeline import STAGES, task_ids

REPO = Path(__file__).resolve().parents[2]
DAG_FILE = REPO / "dags" / "reconcile_dags.py"

# The stages of reconcile.pipeline.STAGES in their order (runner.run_entity follows it too), with the approval
# branch before the per-target load; extract, validate and load are mapped per system.
CHAIN = [t for s in task_ids() for t in (["check_approval", s] if s == "load" else [s])]
# The branch check_approval -> approve_load -> load_approved -> record_loads, taken only when a load needs approval.
APPROVAL = ["check_approval", "approve_load", "load_approved", "record_loads", "purge_erased", "finish_run"]
# Run even when an upstream task failed: gate outcomes are recorded after a failed gate; erased people's values
# are removed; the run is recorded.
ALL_DONE = {"apply_gates"} | {s.task for s in STAGES if s.always}
# Never imported when the DAG file is parsed: the dag processor parses every few seconds.
HEAVY_MODULES = {"duckdb", "pyarrow", "pandas", "great_expectations", "reconcile.runner", "reconcile.warehouse",
                 "reconcile.stages", "reconcile.connectors"}


def _assets(outlets: list) -> list:
    """The Assets among a task's outlets (the others are lineage tables for OpenLineage)."""
    from airflow.sdk import Asset

    return [a for a in outlets if isinstance(a, Asset)]


def test_no_import_errors(dag_bag):
    assert not dag_bag.import_errors, "\n".join(f"{f}: {e}" for f, e in dag_bag.import_errors.items())


def test_one_dag_per_entity(dag_bag, demo_config):
    cfg = load_config(demo_config)
    assert set(dag_bag.dag_ids) == {f"reconcile_{e}" for e in cfg.entities}


def test_dag_settings(dag_bag, demo_config, dag_id):
    cfg = load_config(demo_config)
    dag = dag_bag.dags[dag_id]
    entity = dag_id.removeprefix("reconcile_")
    assert set(dag.tags) == {"reconcile", entity}
    assert dag.schedule == cfg.schedule is not None  # explicit, straight from the config
    assert dag.catchup is False
    assert dag.max_active_runs == 1
    assert dag.doc_md and f"`{entity}`" in dag.doc_md
    assert dag.params["full"] is False
    assert dag.params["dry_run"] is False  # off: follow the config's load.mode
    assert dag.params["approve"] is False  # off: a load over a threshold waits for approval
    for t in dag.tasks:
        assert t.retries >= 1, f"{t.task_id} has no retries"


def test_dag_tasks(dag_bag, demo_config, dag_id):
    from airflow.sdk.definitions.mappedoperator import MappedOperator

    cfg = load_config(demo_config)
    dag = dag_bag.dags[dag_id]
    entity = dag_id.removeprefix("reconcile_")
    systems = sorted(cfg.entities[entity].sources)
    assert set(dag.task_ids) == set(CHAIN) | set(APPROVAL)

    extract = dag.get_task("extract")
    for task_id, arg in (("extract", "system"), ("validate", "system"), ("load", "target")):
        mapped = dag.get_task(task_id)  # one task instance per system, in parallel, named after it in the UI
        assert isinstance(mapped, MappedOperator), f"{task_id} must be mapped over the systems"
        # TaskFlow keeps expand(...) kwargs under op_kwargs_expand_input; this accessor covers both kinds.
        assert mapped._get_specified_expand_input().value == {arg: systems}
        assert arg in mapped.map_index_template
    assert extract.retries == 3
    assert extract.retry_exponential_backoff > 0
    assert extract.max_retry_delay and extract.max_retry_delay <= timedelta(hours=1)

    branches = {"check_approval": {"load", "approve_load"}}
    for task_id, following in zip(CHAIN, CHAIN[1:] + [None]):
        expected = branches.get(task_id) or ({following} if following else set())
        assert dag.get_task(task_id).downstream_task_ids == expected, task_id
    for task_id, following in zip(APPROVAL[1:], APPROVAL[2:]):
        assert dag.get_task(task_id).downstream_task_ids == {following}, task_id
    assert dag.get_task("finish_run").trigger_rule == "all_done", "finish_run must record failed runs too"
    assert dag.get_task("purge_erased").trigger_rule == "all_done", "erased values must go after a failure too"
    assert dag.get_task("record_loads").trigger_rule == "all_done", "what a load wrote is recorded, also after a failure"
    assert dag.get_task("apply_gates").trigger_rule == "all_done", "gates must be recorded after a failed gate"
    assert all(t.trigger_rule == "all_success" for t in dag.tasks if t.task_id not in ALL_DONE)

    outlets = _assets(dag.get_task("load_staging").outlets)
    assert sorted(a.name for a in outlets) == [f"staging.{s}__{entity}" for s in systems]
    assert sorted(a.uri for a in outlets) == [f"reconcile://{entity}/staging.{s}__{entity}" for s in systems]
    assert [a.name for a in _assets(dag.get_task("build_golden").outlets)] == [f"golden.{entity}"]


def test_no_heavy_imports_at_parse_time(demo_config):
    # A fresh interpreter with Airflow already imported (as in the dag processor). Parse speed follows from
    # what is imported; it is measured by `make bench`, never asserted in a timed test.
    code = f"""
import json, runpy, sys
import airflow.sdk
sys.path.append({str(DAG_FILE.parent)!r})  # as the dag processor does: the bundle folder is importable
before = set(sys.modules)
runpy.run_path({str(DAG_FILE)!r})
print(json.dumps({{"new": sorted(set(sys.modules) - before)}}))
"""
    env = {**os.environ, "RECONCILE_CONFIG": str(demo_config)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    heavy = sorted(m for m in result["new"] if m.split(".")[0] in HEAVY_MODULES or m in HEAVY_MODULES
                   or any(m.startswith(h + ".") for h in HEAVY_MODULES))
    assert not heavy, f"parse-time imports of heavy modules: {heavy}"


def test_missing_config_is_a_clear_import_error(tmp_path, parse_dags):
    missing = tmp_path / "nowhere" / "reconcile.yaml"
    bag = parse_dags(missing)
    assert not bag.dag_ids
    (error,) = bag.import_errors.values()
    assert "RECONCILE_CONFIG" in error and str(missing) in error


def test_default_config_path(parse_dags):
    default = REPO / "config" / "reconcile.yaml"
    bag = parse_dags(None)
    if default.is_file():
        assert not bag.import_errors
    else:
        (error,) = bag.import_errors.values()
        assert "RECONCILE_CONFIG" in error and str(default) in error


def test_invalid_config_is_an_import_error(tmp_path, parse_dags):
    bad = tmp_path / "reconcile.yaml"
    bad.write_text("version: 1\nwarehouse: w.duckdb\nsystems: {}\nentities: {contact: {sources: {}}}\n")
    bag = parse_dags(bad)
    (error,) = bag.import_errors.values()
    assert str(bad) in error


def test_several_entities_and_no_schedule(demo_config, parse_dags):
    data = yaml.safe_load(demo_config.read_text())
    data["schedule"] = None
    data["entities"]["lead"] = data["entities"]["contact"]
    config = demo_config.parent / "two_entities.yaml"  # beside the demo: relative system paths still resolve
    config.write_text(yaml.safe_dump(data))
    bag = parse_dags(config)
    assert not bag.import_errors
    assert set(bag.dag_ids) == {"reconcile_contact", "reconcile_lead"}
    for dag in bag.dags.values():
        assert dag.schedule is None  # manual runs only
    assert {a.name for a in _assets(bag.dags["reconcile_lead"].get_task("load_staging").outlets)} == {
        "staging.crm__lead", "staging.marketing__lead", "staging.erp__lead"}


def test_approval_task(dag_bag, dag_id):
    """approve_load is Airflow's ApprovalOperator: no answer within a bounded time means Reject, no write."""
    from airflow.providers.standard.operators.hitl import ApprovalOperator
    from airflow.sdk.definitions.mappedoperator import MappedOperator
    from reconcile_alerts import ReconcileAlert

    dag = dag_bag.dags[dag_id]
    approve = dag.get_task("approve_load")
    assert isinstance(approve, ApprovalOperator)
    assert approve.options == ["Approve", "Reject"] and approve.multiple is False
    assert approve.defaults == ["Reject"]
    assert approve.response_timeout == timedelta(hours=12)  # default of RECONCILE_APPROVAL_TIMEOUT_HOURS
    assert approve.execution_timeout is None  # the wait is bounded by response_timeout, not a kill
    assert "check_approval" in approve.subject and "check_approval" in approve.body  # rendered per run
    assert any(isinstance(n, ReconcileAlert) and n.event == "approval_requested" for n in approve.notifiers)
    loads = dag.get_task("load_approved")
    assert isinstance(loads, MappedOperator) and "target" in loads.map_index_template
    assert dag.get_task("check_approval").task_type == "_BranchPythonDecoratedOperator"


def test_approval_timeout_from_the_environment(demo_config, parse_dags, monkeypatch):
    monkeypatch.setenv("RECONCILE_APPROVAL_TIMEOUT_HOURS", "1.5")
    bag = parse_dags(demo_config)
    assert bag.dags["reconcile_contact"].get_task("approve_load").response_timeout == timedelta(minutes=90)
    for bad in ("0", "-3", "soon", "inf"):
        monkeypatch.setenv("RECONCILE_APPROVAL_TIMEOUT_HOURS", bad)
        (error,) = parse_dags(demo_config).import_errors.values()
        assert "RECONCILE_APPROVAL_TIMEOUT_HOURS" in error and "never wait forever" in error


def test_branch_reaches_approval_only_when_a_load_waits_for_it():
    from reconcile_approval import follow

    assert follow({"crm": "ok", "marketing": "nothing", "erp": "dry_run"}) == ["load"]
    assert follow({"crm": "rejected", "marketing": "ok"}) == ["load"]
    assert follow({}) == ["load"]
    assert follow({"crm": "ok", "marketing": "awaiting_approval"}) == ["load", "approve_load"]


def test_queues(demo_config, parse_dags):
    """Tasks that open the warehouse go to the warehouse worker's queue; extracts and loads to any worker, or to
    their system's queue (one mapped `extract_on_<queue>`, `load_on_<queue>`, `load_approved_on_<queue>` per
    queue). The LocalExecutor ignores queues."""
    from airflow.sdk.definitions.mappedoperator import MappedOperator

    off_warehouse = {"extract", "load", "load_approved"}
    default = parse_dags(demo_config).dags["reconcile_contact"]
    default_queue = default.get_task("extract").queue
    assert default_queue != "reconcile_warehouse"  # Airflow's [operators] default_queue
    assert {t.task_id for t in default.tasks if t.queue == "reconcile_warehouse"} == set(default.task_ids) - off_warehouse
    assert {default.get_task(t).queue for t in off_warehouse} == {default_queue}

    data = yaml.safe_load(demo_config.read_text())
    data["queues"] = {"warehouse": "wh_disk"}
    data["systems"]["erp"]["queue"] = "onprem"
    config = demo_config.parent / "queues.yaml"
    config.write_text(yaml.safe_dump(data))
    dag = parse_dags(config).dags["reconcile_contact"]

    on_queues = {f"{t}_on_onprem" for t in off_warehouse}
    assert {t.task_id for t in dag.tasks if t.queue == "wh_disk"} == set(dag.task_ids) - off_warehouse - on_queues
    assert {dag.get_task(t).queue for t in on_queues} == {"onprem"}
    assert dag.get_task("load_on_onprem")._get_specified_expand_input().value == {"target": ["erp"]}
    assert dag.get_task("load")._get_specified_expand_input().value == {"target": ["crm", "marketing"]}
    for task_id in on_queues - {"extract_on_onprem"}:
        task = dag.get_task(task_id)
        assert task.upstream_task_ids == dag.get_task(task_id.removesuffix("_on_onprem")).upstream_task_ids
        assert task.downstream_task_ids == {"record_loads"}
    onprem = dag.get_task("extract_on_onprem")
    assert isinstance(onprem, MappedOperator) and onprem.queue == "onprem"
    assert onprem._get_specified_expand_input().value == {"system": ["erp"]}
    assert dag.get_task("extract")._get_specified_expand_input().value == {"system": ["crm", "marketing"]}
    assert dag.get_task("extract").queue == default_queue
    for task_id in ("extract", "extract_on_onprem"):
        task = dag.get_task(task_id)
        assert task.retries == 3 and "system" in task.map_index_template
        assert task.upstream_task_ids == {"begin_run"} and task.downstream_task_ids == {"load_staging"}


def test_bad_queue_name_is_a_config_error(demo_config, parse_dags):
    data = yaml.safe_load(demo_config.read_text())
    data["systems"]["erp"]["queue"] = "on prem!"
    config = demo_config.parent / "bad_queue.yaml"
    config.write_text(yaml.safe_dump(data))
    (error,) = parse_dags(config).import_errors.values()
    assert "queue" in error and "systems.erp" in error


def test_openlineage_datasets(dag_bag, demo_config):
    """Every task's inlets/outlets, as Airflow's OpenLineage provider turns them into datasets: the systems'
    source tables in, warehouse tables out; golden columns say where each field comes from."""
    from airflow.providers.openlineage.extractors.manager import ExtractorManager

    cfg = load_config(demo_config)
    dag = dag_bag.dags["reconcile_contact"]
    warehouse = f"duckdb://{cfg.warehouse_path}"

    def ol(objects):
        return {(d.namespace, d.name): d for d in map(ExtractorManager.convert_to_ol_dataset, objects) if d}

    sources = {("reconcile://crm", "crm.contact"), ("reconcile://marketing", "marketing.contacts"),
               ("reconcile://erp", "erp.customer")}
    staging = {(warehouse, f"staging.{s}__contact") for s in ("crm", "erp", "marketing")}
    assert set(ol(dag.get_task("extract").inlets)) == sources
    assert set(ol(dag.get_task("load_staging").inlets)) == sources
    assert set(ol(dag.get_task("load_staging").outlets)) == staging  # the Assets have no OpenLineage scheme
    assert set(ol(dag.get_task("build_golden").inlets)) == staging | {(warehouse, "identity.xref")}
    golden = ol(dag.get_task("build_golden").outlets)
    assert set(golden) == {(warehouse, "golden.contact"), (warehouse, "golden.contact_lineage")}
    columns = {f.name: f.description for f in golden[(warehouse, "golden.contact")].facets["schema"].fields}
    assert set(columns) == {"xid", *cfg.entities["contact"].fields}
    email = cfg.entities["contact"].fields["email"]
    assert columns["email"].startswith(f"owner {email.owner}; strategy {email.strategy}; from staging.")
    assert set(ol(dag.get_task("plan_changes").outlets)) == {(warehouse, "audit.changes")}
    assert set(ol(dag.get_task("load").inlets)) == {(warehouse, "audit.changes")}
    assert set(ol(dag.get_task("load").outlets)) <= sources and ol(dag.get_task("load").outlets)


def _column_lineage(facet) -> dict[str, list[tuple]]:
    """A columnLineage facet as {output column: [(namespace, dataset, column, subtype), ...]}."""
    return {column: [(f.namespace, f.name, f.field, f.transformations[0].subtype) for f in fields.inputFields]
            for column, fields in facet.fields.items()}


def test_openlineage_column_lineage(dag_bag, demo_config):
    """The provider's extractor for build_golden and load_staging (their OpenLineage methods) gives the golden
    table a columnLineage facet: every golden field <- the source columns of the systems that may supply it
    (owner first, then fallbacks), as the demo config maps them; staging columns <- their source column."""
    from airflow.providers.openlineage.extractors.manager import ExtractorManager

    cfg = load_config(demo_config)
    dag = dag_bag.dags["reconcile_contact"]
    warehouse = f"duckdb://{cfg.warehouse_path}"
    crm, marketing, erp = ("reconcile://crm", "crm.contact"), ("reconcile://marketing", "marketing.contacts"), \
        ("reconcile://erp", "erp.customer")

    lineage = ExtractorManager()._get_extractor(dag.get_task("build_golden")).extract_on_complete(None)
    assert {(d.namespace, d.name) for d in lineage.inputs} == {
        (warehouse, f"staging.{s}__contact") for s in ("crm", "erp", "marketing")} | {(warehouse, "identity.xref")}
    outputs = {(d.namespace, d.name): d for d in lineage.outputs}
    assert set(outputs) == {(warehouse, "golden.contact"), (warehouse, "golden.contact_lineage")}
    golden = outputs[(warehouse, "golden.contact")]
    assert "schema" in golden.facets  # the table-level facets are kept
    columns = _column_lineage(golden.facets["columnLineage"])
    assert set(columns) == {"xid", *cfg.entities["contact"].fields}
    assert columns["xid"] == [(warehouse, "identity.xref", "xid", "IDENTITY")]
    assert columns["email"] == [(*crm, "emailaddress1", "TRANSFORMATION")]  # owner crm, no fallback
    assert columns["phone"] == [(*marketing, "phone", "TRANSFORMATION"), (*crm, "telephone1", "TRANSFORMATION")]
    assert columns["company"] == [(*crm, "companyname", "TRANSFORMATION"), (*erp, "company_name", "TRANSFORMATION")]
    assert columns["billing_city"] == [(*erp, "billing_city", "TRANSFORMATION")]
    assert columns["email_opt_out_at"] == [(*marketing, "hs_email_optout_timestamp", "IDENTITY")]
    phone = golden.facets["columnLineage"].fields["phone"].inputFields
    assert [f.transformations[0].description for f in phone] == [
        "owner; strategy owner (transform: phone)", "fallback 1; strategy owner (transform: phone)"]
    assert "columnLineage" not in outputs[(warehouse, "golden.contact_lineage")].facets

    staged = ExtractorManager()._get_extractor(dag.get_task("load_staging")).extract_on_complete(None)
    erp_staging = {(d.namespace, d.name): d for d in staged.outputs}[(warehouse, "staging.erp__contact")]
    columns = _column_lineage(erp_staging.facets["columnLineage"])
    assert set(columns) == set(cfg.entities["contact"].sources["erp"].fields)
    assert columns["billing_city"] == [(*erp, "billing_city", "TRANSFORMATION")]
