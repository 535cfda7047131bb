"""Extraction on SQLite: typed staging, quarantine, incremental and full, history, idempotency, errors."""
from __future__ import annotations

from datetime import datetime

import duckdb
import pytest

from reconcile import runner
from reconcile.config import load_config
from reconcile.errors import ReconcileError, SystemUnreachable

from ..conftest import BASE_CONFIG, sqlite_exec

T0 = datetime(2026, 2, 1, 2, 0, 0)


def published(cfg) -> duckdb.DuckDBPyConnection:
    return duckdb.connect(str(cfg.warehouse_path), read_only=True)


def rows(cfg, sql: str, params=()) -> list[tuple]:
    con = published(cfg)
    try:
        return con.execute(sql, params).fetchall()
    finally:
        con.close()


def test_staging_holds_canonical_values_raw_values_and_lineage(project):
    cfg = load_config(project / "reconcile.yaml")
    summary = runner.run_entity(cfg, "contact", run_id="r1", run_at=T0)
    assert summary["status"] == "dry_run"
    assert summary["extracted"] == {"crm": 3, "marketing": 2}
    assert summary["quarantined"] == {"crm": 0, "marketing": 0}
    got = rows(cfg, """SELECT _record_key, email, first_name, phone, lifecycle, active, _raw_emailaddress1,
                              _run_id, _extracted_at, _source_modified_at, length(_row_hash)
                       FROM staging.crm__contact ORDER BY _record_key""")
    assert got == [
        ("c1", "anna.berg@example.com", "Anna", "+14155550134", "customer", True, " Anna.Berg@Example.com ",
         "r1", T0, datetime(2026, 1, 1, 10), 32),
        ("c2", "bo@example.com", "Bo", "+14155550199", "lead", True, "bo@example.com", "r1", T0,
         datetime(2026, 1, 2, 10), 32),
        ("c3", "cy@example.com", "Cy", None, "lead", False, "cy@example.com", "r1", T0, datetime(2026, 1, 3, 10), 32),
    ]
    assert rows(cfg, "SELECT _record_key, phone, _source_modified_at FROM staging.marketing__contact ORDER BY 1") == [
        ("1", "+14155550134", datetime(2026, 1, 1, 9)), ("2", "+14155550100", datetime(2026, 1, 2, 9))]
    assert rows(cfg, "SELECT run_id, entity, status FROM audit.runs") == [("r1", "contact", "dry_run")]


def test_bad_rows_are_quarantined_with_reasons_never_dropped(project):
    crm = project / "systems" / "crm.db"
    sqlite_exec(crm, "INSERT INTO contact VALUES (NULL, 'x@example.com', 'NoKey', NULL, 'Prospect', 0, '2026-01-05 10:00:00')")
    sqlite_exec(crm, "INSERT INTO contact VALUES ('c2', 'dup@example.com', 'Dup', NULL, 'Prospect', 0, '2026-01-05 10:00:00')")
    sqlite_exec(crm, "INSERT INTO contact VALUES ('c4', 'mike.jones(at)example.com', 'Mike', NULL, 'Prospect', 0, '2026-01-05 10:00:00')")
    sqlite_exec(crm, "INSERT INTO contact VALUES ('c5', 'eve@example.com', 'Eve', NULL, 'Prospect', 0, '31/02/2026 25:61')")
    sqlite_exec(crm, "INSERT INTO contact VALUES ('c6', 'fay@example.com', 'Fay', NULL, 'Prospect', 7, '2026-01-05 10:00:00')")
    cfg = load_config(project / "reconcile.yaml")
    summary = runner.run_entity(cfg, "contact", run_id="r1", run_at=T0)
    assert summary["extracted"]["crm"] == 8
    assert summary["quarantined"]["crm"] == 6
    reasons = rows(cfg, "SELECT record_key, reason FROM audit.quarantine WHERE system = 'crm' ORDER BY record_key NULLS FIRST, reason")
    assert reasons == [
        (None, "null primary key (column contactid)"),
        ("c2", "duplicate primary key c2 (2 rows, column contactid)"),
        ("c2", "duplicate primary key c2 (2 rows, column contactid)"),
        ("c4", "invalid email in column emailaddress1: 'mike.jones(at)example.com'"),
        ("c5", "unparseable timestamp in column modifiedon: '31/02/2026 25:61'"),
        ("c6", "value '7' in column statecode is not a valid boolean (field active)"),
    ]
    raw = rows(cfg, "SELECT raw->>'firstname' FROM audit.quarantine WHERE record_key = 'c4'")
    assert raw == [("Mike",)]
    assert [r[0] for r in rows(cfg, "SELECT _record_key FROM staging.crm__contact ORDER BY 1")] == ["c1", "c3"]


def test_incremental_reads_only_changed_rows_and_merges(project):
    cfg = load_config(project / "reconcile.yaml")
    runner.run_entity(cfg, "contact", run_id="r1", run_at=T0)
    crm = project / "systems" / "crm.db"
    sqlite_exec(crm, "UPDATE contact SET firstname = 'Bob', modifiedon = '2026-01-20 10:00:00' WHERE contactid = 'c2'")
    sqlite_exec(crm, "INSERT INTO contact VALUES ('c9', 'new@example.com', 'Nia', NULL, 'Customer', 0, '2026-01-21 10:00:00')")
    s2 = runner.run_entity(cfg, "contact", run_id="r2", run_at=datetime(2026, 2, 2, 2))
    assert s2["extract_mode"] == {"crm": "incremental", "marketing": "incremental"}
    # the two changed rows, plus c3 (modified at the old watermark, re-read by the 60-minute overlap)
    assert s2["extracted"]["crm"] == 3
    assert rows(cfg, "SELECT inserted, updated, deleted, staged FROM audit.extracts WHERE run_id = 'r2' AND system = 'crm'") == [(1, 1, 0, 4)]
    assert rows(cfg, "SELECT _record_key, first_name, _run_id FROM staging.crm__contact ORDER BY 1") == [
        ("c1", "Anna", "r1"), ("c2", "Bob", "r2"), ("c3", "Cy", "r2"), ("c9", "Nia", "r2")]
    history = rows(cfg, "SELECT _run_id, _record_key, first_name, _change FROM staging.crm__contact_history ORDER BY _run_id, _record_key")
    assert history == [("r1", "c1", "Anna", "insert"), ("r1", "c2", "Bo", "insert"), ("r1", "c3", "Cy", "insert"),
                       ("r2", "c2", "Bob", "update"), ("r2", "c9", "Nia", "insert")]


def test_full_snapshot_detects_hard_deletes_but_not_quarantined_keys(project):
    cfg = load_config(project / "reconcile.yaml")
    runner.run_entity(cfg, "contact", run_id="r1", run_at=T0)
    crm = project / "systems" / "crm.db"
    sqlite_exec(crm, "DELETE FROM contact WHERE contactid = 'c3'")
    sqlite_exec(crm, "UPDATE contact SET emailaddress1 = 'broken', modifiedon = '2026-01-22 00:00:00' WHERE contactid = 'c2'")
    s2 = runner.run_entity(cfg, "contact", run_id="r2", run_at=datetime(2026, 2, 2, 2), full=True)
    assert s2["extract_mode"]["crm"] == "full"
    assert s2["quarantined"]["crm"] == 1
    # c3 is gone from the source: deleted. c2's new version is bad: its last good version stays staged.
    assert rows(cfg, "SELECT _record_key, email FROM staging.crm__contact ORDER BY 1") == [
        ("c1", "anna.berg@example.com"), ("c2", "bo@example.com")]
    assert rows(cfg, "SELECT _record_key, _change FROM staging.crm__contact_history WHERE _run_id = 'r2'") == [("c3", "delete")]


def test_periodic_full_snapshot_and_config_change_force_full(project):
    text = BASE_CONFIG.replace("entities:\n", "extract:\n  full_every: 3\nentities:\n", 1)
    (project / "reconcile.yaml").write_text(text)
    cfg = load_config(project / "reconcile.yaml")
    modes = [runner.run_entity(cfg, "contact", run_id=f"r{i}", run_at=datetime(2026, 2, i, 2))["extract_mode"]["crm"]
             for i in range(1, 5)]
    assert modes == ["full", "incremental", "incremental", "full"]
    (project / "reconcile.yaml").write_text(text.replace("transform: trim}", "transform: [trim, upper]}"))
    cfg = load_config(project / "reconcile.yaml")
    s = runner.run_entity(cfg, "contact", run_id="r5", run_at=datetime(2026, 2, 5, 2))
    assert s["extract_mode"] == {"crm": "full", "marketing": "incremental"}
    assert rows(cfg, "SELECT first_name FROM staging.crm__contact WHERE _record_key = 'c1'") == [("ANNA",)]


def test_every_step_is_idempotent_for_a_run_id(project):
    cfg = load_config(project / "reconcile.yaml")
    m1 = runner.begin_run(cfg, "contact", "r1", T0)
    assert runner.begin_run(cfg, "contact", "r1", T0) == m1
    for system in ("crm", "marketing"):
        runner.extract_system(cfg, "contact", system, "r1")
        runner.extract_system(cfg, "contact", system, "r1")  # a retried task
    first = runner.load_staging(cfg, "contact", "r1")
    again = runner.load_staging(cfg, "contact", "r1")
    assert first == again
    for system in ("crm", "marketing"):
        runner.validate_system(cfg, "contact", system, "r1")
    assert runner.apply_gates(cfg, "contact", "r1") == runner.apply_gates(cfg, "contact", "r1")
    assert runner.finish_run(cfg, "contact", "r1")["status"] == "success"
    assert rows(cfg, "SELECT count(*) FROM staging.crm__contact_history") == [(3,)]
    assert rows(cfg, "SELECT count(*) FROM audit.sync_health") == [(2,)]
    assert rows(cfg, "SELECT count(*) FROM audit.extracts") == [(2,)]
    with pytest.raises(ReconcileError, match="already finished"):
        runner.begin_run(cfg, "contact", "r1", T0)


def test_failed_extraction_is_recorded_and_names_the_system(project):
    (project / "systems" / "marketing.db").unlink()
    (project / "systems" / "marketing.db").mkdir()  # unreadable as a database
    cfg = load_config(project / "reconcile.yaml")
    with pytest.raises(SystemUnreachable, match="system 'marketing'"):
        runner.run_entity(cfg, "contact", run_id="r1", run_at=T0)
    assert rows(cfg, "SELECT status, error LIKE '%marketing%' FROM audit.runs WHERE run_id = 'r1'") == [("failed", True)]
    # staging was not touched by the failed run: nothing half-loaded
    assert rows(cfg, "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'staging'") == [(0,)]


def test_unreachable_database_never_prints_the_password(project):
    text = BASE_CONFIG.replace("url: sqlite:///systems/marketing.db", "url_env: MKT_URL")
    (project / "reconcile.yaml").write_text(text)
    cfg = load_config(project / "reconcile.yaml")
    with pytest.raises(SystemUnreachable) as exc:
        runner.run_entity(cfg, "contact", run_id="r1", run_at=T0,
                          url_overrides={"marketing": "postgresql+psycopg2://app:TopSecret@127.0.0.1:1/nodb"})
    assert "TopSecret" not in str(exc.value)
    assert "system 'marketing'" in str(exc.value) and "***" in str(exc.value)


def test_missing_column_is_named(project):
    sqlite_exec(project / "systems" / "marketing.db", "ALTER TABLE contacts RENAME COLUMN firstname TO first")
    cfg = load_config(project / "reconcile.yaml")
    with pytest.raises(ReconcileError, match="table 'contacts' has no column\\(s\\) 'firstname'"):
        runner.run_entity(cfg, "contact", run_id="r1", run_at=T0)


def test_query_source_and_batches(project):
    text = BASE_CONFIG.replace("        table: contacts\n", "        query: select * from contacts where vid > 0\n        batch_size: 1\n")
    text = text.replace("first_name: {owner: crm, send_to: [marketing]}", "first_name: {owner: crm}")  # read-only
    (project / "reconcile.yaml").write_text(text)
    cfg = load_config(project / "reconcile.yaml")
    s = runner.run_entity(cfg, "contact", run_id="r1", run_at=T0)
    assert s["extracted"]["marketing"] == 2
    assert rows(cfg, "SELECT _record_key FROM staging.marketing__contact ORDER BY 1") == [("1",), ("2",)]


def test_missing_sqlite_file_is_reported_not_created(project):
    (project / "systems" / "marketing.db").unlink()
    cfg = load_config(project / "reconcile.yaml")
    with pytest.raises(SystemUnreachable, match="marketing.db does not exist"):
        runner.run_entity(cfg, "contact", run_id="r1", run_at=T0)
    assert not (project / "systems" / "marketing.db").exists()


def test_an_older_warehouse_gains_new_columns_without_losing_data(project):
    cfg = load_config(project / "reconcile.yaml")
    runner.run_entity(cfg, "contact", run_id="r1", run_at=T0)
    work = cfg.state_dir / "work.duckdb"
    con = duckdb.connect(str(work))
    con.execute("ALTER TABLE audit.sync_health DROP COLUMN changes_failed")  # as an older version made it
    con.close()
    s = runner.run_entity(cfg, "contact", run_id="r2", run_at=datetime(2026, 2, 2, 2))
    assert s["status"] == "dry_run"
    assert rows(cfg, "SELECT run_id, changes_failed FROM audit.sync_health WHERE system = 'crm' ORDER BY 1") == [
        ("r1", None), ("r2", 0)]


def test_extract_command_stops_after_staging(project, capsys):
    from reconcile.cli import main

    assert main(["extract", "--config", str(project / "reconcile.yaml"), "--json"]) == 0
    import json as _json

    out = _json.loads(capsys.readouterr().out)
    assert out["status"] == "success" and "gates" not in out and out["staged"] == {"crm": 3, "marketing": 2}
    cfg = load_config(project / "reconcile.yaml")
    assert rows(cfg, "SELECT count(*) FROM audit.stage_runs WHERE stage <> 'extract'") == [(0,)]
