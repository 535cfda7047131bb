"""Several entities, one warehouse: runs interleave stage by stage, and publishing one entity's run never
exposes another entity's run that is still in progress (warehouse.publish keeps that entity's last
published state)."""
from __future__ import annotations

import copy
import subprocess
import sys
import time
from datetime import datetime

import duckdb
import pytest
import yaml

from reconcile import runner
from reconcile.config import load_config

from ..conftest import BASE_CONFIG, sqlite_exec

T1, T2, T3 = datetime(2026, 2, 1, 2), datetime(2026, 2, 2, 2), datetime(2026, 2, 3, 2)
NEW_CRM_ROW = ("INSERT INTO contact VALUES ('c9', 'nia@example.com', 'Nia', NULL, 'Prospect', 0, "
               "'2026-01-20 10:00:00')")


@pytest.fixture
def two_entities(project):
    """The project's config with a second entity, `lead`, read from the same systems (it writes nothing)."""
    data = yaml.safe_load(BASE_CONFIG)
    lead = copy.deepcopy(data["entities"]["contact"])
    for field in lead["fields"].values():
        field.pop("send_to", None)
    lead.pop("eligibility")
    data["entities"]["lead"] = lead
    (project / "reconcile.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    return load_config(project / "reconcile.yaml")


def _published(cfg, sql: str, params=()) -> list[tuple]:
    con = duckdb.connect(str(cfg.warehouse_path), read_only=True)
    try:
        return con.execute(sql, params).fetchall()
    finally:
        con.close()


def _half_run(cfg, entity: str, run_id: str, run_at: datetime) -> None:
    """A run that has extracted and staged, and stopped there (its next task not started yet)."""
    runner.begin_run(cfg, entity, run_id, run_at)
    for system in ("crm", "marketing"):
        runner.extract_system(cfg, entity, system, run_id)
    runner.load_staging(cfg, entity, run_id)


def test_publishing_never_shows_another_entitys_half_done_run(two_entities, project):
    cfg = two_entities
    crm = project / "systems" / "crm.db"

    # lead's first run is half-way when contact's run finishes and publishes: lead is not there at all.
    _half_run(cfg, "lead", "lead_1", T1)
    runner.run_entity(cfg, "contact", run_id="contact_1", run_at=T1)
    assert _published(cfg, "SELECT run_id, status FROM audit.runs ORDER BY 1") == [("contact_1", "dry_run")]
    assert _published(cfg, "SELECT count(*) FROM information_schema.tables WHERE table_name LIKE '%lead%'") == [(0,)]
    assert _published(cfg, "SELECT DISTINCT entity FROM audit.stage_runs") == [("contact",)]

    # lead finishes its run (same run id: every stage done so far is kept) and publishes itself.
    runner.run_entity(cfg, "lead", run_id="lead_1", run_at=T1)
    assert _published(cfg, "SELECT run_id, status FROM audit.runs ORDER BY 1") == [
        ("contact_1", "dry_run"), ("lead_1", "dry_run")]
    lead_golden = _published(cfg, "SELECT * FROM golden.lead ORDER BY xid")

    # A new CRM record; lead's second run stages it, then contact runs and publishes: lead's published state
    # is still its first run's, everywhere (runs, stages, staging tables, their history, golden).
    sqlite_exec(crm, NEW_CRM_ROW)
    _half_run(cfg, "lead", "lead_2", T2)
    runner.run_entity(cfg, "contact", run_id="contact_2", run_at=T2)
    assert _published(cfg, "SELECT run_id, status FROM audit.runs ORDER BY 1") == [
        ("contact_1", "dry_run"), ("contact_2", "dry_run"), ("lead_1", "dry_run")]
    assert _published(cfg, "SELECT DISTINCT run_id FROM audit.stage_runs WHERE entity = 'lead'") == [("lead_1",)]
    assert _published(cfg, "SELECT _record_key, _run_id FROM staging.crm__lead ORDER BY 1") == [
        ("c1", "lead_1"), ("c2", "lead_1"), ("c3", "lead_1")]
    assert _published(cfg, "SELECT count(*) FROM staging.crm__lead_history WHERE _run_id = 'lead_2'") == [(0,)]
    assert _published(cfg, "SELECT count(*) FROM audit.extracts WHERE run_id = 'lead_2'") == [(0,)]
    assert [k for (k,) in _published(cfg, "SELECT _record_key FROM staging.crm__contact ORDER BY 1")] == [
        "c1", "c2", "c3", "c9"]  # contact's own run is published in full
    assert _published(cfg, "SELECT * FROM golden.lead ORDER BY xid") == lead_golden

    # lead's second run finishes: now it is published, and contact's published state is untouched by it.
    contact_golden = _published(cfg, "SELECT * FROM golden.contact ORDER BY xid")
    runner.run_entity(cfg, "lead", run_id="lead_2", run_at=T2)
    assert [k for (k,) in _published(cfg, "SELECT _record_key FROM staging.crm__lead ORDER BY 1")] == [
        "c1", "c2", "c3", "c9"]
    assert _published(cfg, "SELECT * FROM golden.contact ORDER BY xid") == contact_golden
    assert _published(cfg, "SELECT run_id FROM audit.runs WHERE status = 'running'") == []


ANALYST_CHECK = """
import sys, duckdb
con = duckdb.connect(sys.argv[1], read_only=True)
running = con.execute("SELECT count(*) FROM audit.runs WHERE status = 'running'").fetchone()[0]
bad = []
for entity in ("contact", "lead"):
    finished = {r for (r,) in con.execute("SELECT run_id FROM audit.runs WHERE entity = ?", [entity]).fetchall()}
    for (table,) in con.execute("SELECT table_name FROM information_schema.tables WHERE table_schema = 'staging' "
                                "AND table_name LIKE ?", [f"%__{entity}"]).fetchall():
        seen = {r for (r,) in con.execute(f"SELECT DISTINCT _run_id FROM staging.{table}").fetchall()}
        bad += [f"staging.{table} holds run {r} not finished in audit.runs" for r in seen - finished]
    staged = {r for (r,) in con.execute("SELECT DISTINCT run_id FROM audit.stage_runs WHERE entity = ?",
                                        [entity]).fetchall()}
    bad += [f"{entity}: stages of unfinished run {r}" for r in staged - finished]
print(running, "; ".join(bad))
"""


@pytest.mark.slow  # entity runs in two processes at once, an analyst sampling the published file meanwhile
def test_two_entities_running_at_once_each_published_state_consistent(two_entities, project):
    cfg = two_entities
    runner.run_entity(cfg, "contact", run_id="contact_0", run_at=T1)
    sqlite_exec(project / "systems" / "crm.db", NEW_CRM_ROW)
    code = ("import sys; from datetime import datetime; from reconcile import runner; "
            "from reconcile.config import load_config; cfg = load_config(sys.argv[1]); "
            "[runner.run_entity(cfg, sys.argv[2], run_id=f'{sys.argv[2]}_{i}', run_at=datetime(2026, 2, 2 + i, 2)) "
            "for i in (1, 2)]")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(cfg.path), entity], stderr=subprocess.PIPE, text=True)
             for entity in ("contact", "lead")]
    samples = 0
    while any(p.poll() is None for p in procs):
        if cfg.warehouse_path.exists():
            check = subprocess.run([sys.executable, "-c", ANALYST_CHECK, str(cfg.warehouse_path)],
                                   capture_output=True, text=True, timeout=120)
            if check.returncode == 0:  # (a reader may race the atomic rename on open; that is not a state)
                running, _, problems = check.stdout.strip().partition(" ")
                assert running == "0" and not problems, check.stdout
                samples += 1
        time.sleep(0.2)
    for p in procs:
        assert p.returncode == 0, p.stderr.read()[-3000:]
    assert samples >= 3

    runs = _published(cfg, "SELECT entity, run_id, status FROM audit.runs ORDER BY 1, 2")
    assert runs == [("contact", "contact_0", "dry_run"), ("contact", "contact_1", "dry_run"),
                    ("contact", "contact_2", "dry_run"), ("lead", "lead_1", "dry_run"), ("lead", "lead_2", "dry_run")]
    for entity in ("contact", "lead"):
        keys = [k for (k,) in _published(cfg, f"SELECT _record_key FROM staging.crm__{entity} ORDER BY 1")]
        assert keys == ["c1", "c2", "c3", "c9"], entity
        assert _published(cfg, f"SELECT count(*) FROM golden.{entity}") == _published(
            cfg, "SELECT count(*) FROM golden.contact")
