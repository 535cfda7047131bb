"""Quality gates: every expectation fails on a crafted bad table and passes on a good one; trends, collisions,
severity and persistence through whole runs."""
from __future__ import annotations

import json
import sqlite3
from datetime import datetime

import duckdb
import pytest

from reconcile import runner
from reconcile.config import load_config
from reconcile.stages import quality
from reconcile.transforms import register_functions
from reconcile.warehouse.ddl import ensure_schema

from ..conftest import BASE_CONFIG, sqlite_exec

RUN_AT = datetime(2026, 3, 1, 2)
GOOD = [("c1", "ann@example.com", "Ann", "lead", datetime(2026, 2, 28)),
        ("c2", "bo@example.com", "Bo", "customer", datetime(2026, 2, 27)),
        ("c3", "cy@example.com", "Cy", None, datetime(2026, 2, 26)),
        ("c4", None, "Di", "lead", datetime(2026, 2, 25))]


@pytest.fixture
def gate_cfg(project):
    text = BASE_CONFIG.replace("first_name: {owner: crm, send_to: [marketing]}",
                               "first_name: {owner: crm, send_to: [marketing], required: true}")
    text = text.replace("    eligibility:", "    gates:\n      freshness: {max_age_hours: 72}\n    eligibility:")
    (project / "reconcile.yaml").write_text(text)
    return load_config(project / "reconcile.yaml")


def validate(cfg, rows, history: list[dict] | None = None, extracted=(4, 0)) -> dict[str, dict]:
    """Validate a hand-written staging.crm__contact; returns {expectation: result}."""
    con = duckdb.connect()
    register_functions(con)
    ensure_schema(con)
    con.execute("""CREATE TABLE staging.crm__contact (_record_key VARCHAR, email VARCHAR, first_name VARCHAR,
                   lifecycle VARCHAR, _source_modified_at TIMESTAMP)""")
    if rows:
        con.executemany("INSERT INTO staging.crm__contact VALUES (?, ?, ?, ?, ?)", rows)
    con.execute("INSERT INTO audit.extracts VALUES ('now', 'contact', 'crm', 'full', NULL, ?, ?, ?, 0, 0, 0, ?, NULL)",
                [extracted[0], extracted[0] - extracted[1], extracted[1], len(rows)])
    for i, h in enumerate(history or []):
        con.execute("""INSERT INTO audit.sync_health (run_id, entity, system, run_at, staged, duplicate_rates,
                       volume_ok, duplicate_ok) VALUES (?, 'contact', 'crm', ?, ?, ?, ?, ?)""",
                    [f"h{i}", datetime(2026, 2, 1 + i), h.get("staged"), json.dumps(h.get("dup", {})),
                     h.get("volume_ok", True), h.get("dup_ok", True)])
    out = quality.validate_table(con, cfg, "contact", "crm", "now", RUN_AT)
    con.close()
    return {r["expectation"]: r for r in out["results"]}


def test_good_table_passes_every_expectation(gate_cfg):
    results = validate(gate_cfg, GOOD, history=[{"staged": 4, "dup": {"email": 0.0, "name_company": 0.0}}])
    assert {k: r["success"] for k, r in results.items()} == {
        "key_unique": True, "key_not_null": True, "required:first_name": True, "email_format:email": True,
        "picklist:lifecycle": True, "freshness": True, "volume": True, "duplicate_rate:email": True,
        "quarantine_rate": True}
    assert results["volume"]["threshold"] == {"min_value": 0, "max_value": 11, "baseline_median": 4.0, "echo_inserts": 0}
    assert results["freshness"]["gx_expectation"] == "expect_column_max_to_be_between"


@pytest.mark.parametrize("name,rows,kwargs", [
    ("key_unique", GOOD + [("c1", "x@example.com", "Xi", "lead", datetime(2026, 2, 28))], {}),
    ("key_not_null", GOOD + [(None, "x@example.com", "Xi", "lead", datetime(2026, 2, 28))], {}),
    ("required:first_name", GOOD + [("c9", "x@example.com", None, "lead", datetime(2026, 2, 28))], {}),
    ("email_format:email", GOOD + [("c9", "not-an-email", "Xi", "lead", datetime(2026, 2, 28))], {}),
    ("picklist:lifecycle", GOOD + [("c9", "x@example.com", "Xi", "Partner", datetime(2026, 2, 28))], {}),
    ("freshness", [r[:4] + (datetime(2026, 1, 1),) for r in GOOD], {}),
    ("volume", GOOD * 1, {"history": [{"staged": 40}, {"staged": 42}, {"staged": 41}]}),
    ("duplicate_rate:email", [("c1", "a@example.com", "A", "lead", RUN_AT), ("c2", "a@example.com", "B", "lead", RUN_AT),
                              ("c3", "c@example.com", "C", "lead", RUN_AT)],
     {"history": [{"staged": 3, "dup": {"email": 0.0}}]}),
    ("quarantine_rate", GOOD, {"extracted": (10, 4)}),
])
def test_each_expectation_fails_on_a_crafted_bad_table(gate_cfg, name, rows, kwargs):
    results = validate(gate_cfg, rows, **kwargs)
    assert results[name]["success"] is False, results[name]
    others = {k for k, r in results.items() if not r["success"]} - {name}
    assert not others, f"only {name} should fail, also failed: {others}"


def test_failing_values_are_sampled_for_review(gate_cfg):
    results = validate(gate_cfg, GOOD + [("c9", "not-an-email", "Xi", "lead", RUN_AT)])
    r = results["email_format:email"]
    assert (r["unexpected_count"], r["sample"], r["severity"]) == (1, ["not-an-email"], "error")


def _grow_crm(project, start: int, n: int, modified="2026-01-10 00:00:00") -> None:
    con = sqlite3.connect(project / "systems" / "crm.db")
    con.executemany("INSERT INTO contact VALUES (?, ?, ?, NULL, 'Prospect', 0, ?)",
                    [(f"g{i}", f"g{i}@example.com", f"G{i}", modified) for i in range(start, start + n)])
    con.commit()
    con.close()


def test_fourfold_growth_fails_the_volume_gate_and_blocks_writes(project):
    _grow_crm(project, 0, 37)  # 40 CRM contacts
    cfg = load_config(project / "reconcile.yaml")
    s1 = runner.run_entity(cfg, "contact", run_id="r1", run_at=RUN_AT)
    assert s1["gates"]["failed"] == 0
    _grow_crm(project, 100, 120, modified="2026-02-20 00:00:00")  # 160: the 4x explosion
    s2 = runner.run_entity(cfg, "contact", run_id="r2", run_at=datetime(2026, 3, 2, 2), dry_run=False)
    assert s2["status"] == "blocked"
    assert [(f["system"], f["expectation"], f["severity"]) for f in s2["gates"]["failures"]] == [
        ("crm", "volume", "error")]
    assert s2["gates"]["blocked"] == ["crm", "marketing"]
    con = duckdb.connect(str(cfg.warehouse_path), read_only=True)
    blocks = con.execute("SELECT target, field, source_system FROM audit.write_blocks WHERE run_id = 'r2' ORDER BY 1, 2").fetchall()
    health = con.execute("SELECT staged, volume_baseline, volume_ok FROM audit.sync_health WHERE run_id = 'r2' AND system = 'crm'").fetchone()
    con.close()
    # every write into crm, and every crm-owned field that is sent elsewhere (first_name -> marketing)
    assert blocks == [("crm", "*", "crm"), ("marketing", "first_name", "crm")]
    assert health == (160, 40.0, False)


def test_truncated_extract_fails_the_volume_gate(project):
    _grow_crm(project, 0, 37)
    cfg = load_config(project / "reconcile.yaml")
    runner.run_entity(cfg, "contact", run_id="r1", run_at=RUN_AT)
    sqlite_exec(project / "systems" / "crm.db", "DELETE FROM contact WHERE rowid % 2 = 0")  # half the rows vanish
    s2 = runner.run_entity(cfg, "contact", run_id="r2", run_at=datetime(2026, 3, 2, 2), full=True, dry_run=False)
    assert s2["staged"]["crm"] == 20
    assert ("crm", "volume") in {(f["system"], f["expectation"]) for f in s2["gates"]["failures"]}
    assert s2["status"] == "blocked"


def test_two_eligible_crm_contacts_with_one_email_are_held_for_marketing_only(project):
    crm = project / "systems" / "crm.db"
    sqlite_exec(crm, "INSERT INTO contact VALUES ('c7', 'INFO@shared.example ', 'Maria', NULL, 'Customer', 0, '2026-01-05 10:00:00')")
    sqlite_exec(crm, "INSERT INTO contact VALUES ('c8', 'info@shared.example', 'Tom', NULL, 'Prospect', 0, '2026-01-05 11:00:00')")
    # an inactive contact with the same email is not eligible for marketing: it is not part of the collision
    sqlite_exec(crm, "INSERT INTO contact VALUES ('c9', 'info@shared.example', 'Old', NULL, 'Prospect', 1, '2026-01-05 11:00:00')")
    cfg = load_config(project / "reconcile.yaml")
    s = runner.run_entity(cfg, "contact", run_id="r1", run_at=RUN_AT, dry_run=False)
    assert s["status"] == "blocked"
    assert s["gates"]["held"] == {"marketing": 2}
    assert s["gates"]["failed"] == 0 and s["gates"]["blocked"] == []
    con = duckdb.connect(str(cfg.warehouse_path), read_only=True)
    holds = con.execute("""SELECT h.target, x.system || ':' || x.record_key FROM audit.holds h
                           JOIN identity.xref x ON x.xid = h.identity WHERE h.run_id = 'r1' ORDER BY 2""").fetchall()
    xid_of = dict(con.execute("SELECT record_key, xid FROM identity.xref WHERE system = 'crm'").fetchall())
    items = con.execute("SELECT kind, system, status, details FROM review.items WHERE kind = 'collision'").fetchall()
    con.close()
    assert holds == [("marketing", "crm:c7"), ("marketing", "crm:c8")]
    (kind, system, status, details), = items
    details = json.loads(details)
    assert (kind, system, status, details["field"], details["value"], details["priority"]) == (
        "collision", "marketing", "open", "email", "info@shared.example", 1.0)  # stored: it holds writes back
    assert sorted((side["identity"], side["first_name"]) for side in details["sides"]) == sorted(
        [(xid_of["c7"], "Maria"), (xid_of["c8"], "Tom")])
    # the next run keeps the same review item (no duplicates); fixing the data resolves it
    s2 = runner.run_entity(cfg, "contact", run_id="r2", run_at=datetime(2026, 3, 2, 2))
    assert s2["gates"]["held"] == {"marketing": 2}
    sqlite_exec(crm, "UPDATE contact SET emailaddress1 = 'tom@example.com', modifiedon = '2026-02-01 00:00:00' WHERE contactid = 'c8'")
    s3 = runner.run_entity(cfg, "contact", run_id="r3", run_at=datetime(2026, 3, 3, 2))
    assert s3["status"] == "dry_run" and s3["gates"]["held"] == {}
    con = duckdb.connect(str(cfg.warehouse_path), read_only=True)
    assert con.execute("SELECT count(*), min(status), min(last_seen_run) FROM review.items "
                       "WHERE kind = 'collision'").fetchone() == (1, "resolved", "r2")
    con.close()


def test_gate_results_persist_across_runs_and_warnings_do_not_block(project, capsys):
    text = BASE_CONFIG.replace("    eligibility:", "    gates:\n      severity: {volume: warn}\n    eligibility:")
    (project / "reconcile.yaml").write_text(text)
    _grow_crm(project, 0, 37)
    cfg = load_config(project / "reconcile.yaml")
    runner.run_entity(cfg, "contact", run_id="r1", run_at=RUN_AT)
    _grow_crm(project, 100, 120, modified="2026-02-20 00:00:00")
    s2 = runner.run_entity(cfg, "contact", run_id="r2", run_at=datetime(2026, 3, 2, 2))
    assert s2["status"] == "dry_run"
    assert s2["gates"]["warned"] == 1 and s2["gates"]["failed"] == 0 and s2["gates"]["blocked"] == []
    con = duckdb.connect(str(cfg.warehouse_path), read_only=True)
    per_run = con.execute("SELECT run_id, count(*), count(*) FILTER (WHERE NOT success) FROM audit.quality_results "
                          "GROUP BY 1 ORDER BY 1").fetchall()
    con.close()
    assert per_run[0][0] == "r1" and per_run[1][0] == "r2"
    assert per_run[0][1] == per_run[1][1] > 10
    assert (per_run[0][2], per_run[1][2]) == (0, 1)
    from reconcile.cli import main

    assert main(["gates", "--config", str(project / "reconcile.yaml"), "--run", "r2", "--failed"]) == 0
    out = capsys.readouterr().out
    assert "staging.crm__contact" in out and "volume" in out and "warned" in out


def test_data_docs_are_built_per_run(project):
    cfg = load_config(project / "reconcile.yaml")
    s = runner.run_entity(cfg, "contact", run_id="r1", run_at=RUN_AT)
    index = s["gates"]["data_docs"]
    html = open(index, encoding="utf-8").read()
    assert "staging.crm__contact" in html and "staging.marketing__contact" in html
    crm_docs = cfg.warehouse_path.parent / "data_docs" / "r1" / "crm"
    assert (crm_docs / "index.html").exists()
    assert list((crm_docs / "validations").rglob("*.html"))


def test_picklist_of_a_map_to_booleans_compares_values_as_staged(gate_cfg, project):
    # A string field whose map yields booleans is staged as 'true'/'false' (transforms.sql_literal): the
    # picklist must allow exactly those, not Python's 'True'/'False'.
    text = (project / "reconcile.yaml").read_text().replace(
        "lifecycle: {column: stage, transform: {map: {Prospect: lead, Customer: customer}}}",
        "lifecycle: {column: stage, transform: {map: {Prospect: true, Customer: false}}}")
    (project / "reconcile.yaml").write_text(text)
    cfg = load_config(project / "reconcile.yaml")
    rows = [(k, e, n, "true" if i % 2 else "false", m) for i, (k, e, n, _, m) in enumerate(GOOD)]
    result = validate(cfg, rows)["picklist:lifecycle"]
    assert result["success"], result
    assert result["threshold"]["value_set"] == ["false", "true"]
    bad = validate(cfg, rows[:-1] + [(rows[-1][0], rows[-1][1], rows[-1][2], "True", rows[-1][4])])
    assert not bad["picklist:lifecycle"]["success"]


def _validated(cfg, run_id: str) -> dict[str, tuple]:
    con = duckdb.connect(str(cfg.warehouse_path), read_only=True)
    try:
        return {s: (n, v) for s, n, v in con.execute(
            "SELECT system, rows_validated, validation FROM audit.sync_health WHERE run_id = ?", [run_id]).fetchall()}
    finally:
        con.close()


def test_row_gates_validate_only_changed_rows_and_a_bad_changed_row_fails(project):
    text = BASE_CONFIG.replace("first_name: {owner: crm, send_to: [marketing]}",
                               "first_name: {owner: crm, send_to: [marketing], required: true}")
    (project / "reconcile.yaml").write_text(text)
    cfg = load_config(project / "reconcile.yaml")
    crm = project / "systems" / "crm.db"
    night = iter(range(1, 10))

    def run(run_id: str) -> dict:
        return runner.run_entity(cfg, "contact", run_id=run_id, run_at=datetime(2026, 3, next(night), 2))

    assert run("r1")["gates"]["failed"] == 0
    assert _validated(cfg, "r1") == {"crm": (3, "full"), "marketing": (2, "full")}

    sqlite_exec(crm, "UPDATE contact SET firstname = 'Bobby', modifiedon = '2026-02-20 10:00:00' WHERE contactid = 'c2'")
    assert run("r2")["gates"]["failed"] == 0
    assert _validated(cfg, "r2") == {"crm": (1, "changed"), "marketing": (0, "changed")}  # c2 only

    sqlite_exec(crm, "UPDATE contact SET firstname = NULL, modifiedon = '2026-02-21 10:00:00' WHERE contactid = 'c3'")
    s3 = run("r3")
    assert _validated(cfg, "r3")["crm"] == (1, "changed")
    assert [(f["system"], f["expectation"]) for f in s3["gates"]["failures"]] == [("crm", "required:first_name")]
    assert s3["gates"]["blocked"]

    # Nothing changed, but last night a row failed: every row is checked again and the bad one still fails.
    s4 = run("r4")
    assert _validated(cfg, "r4")["crm"] == (3, "full")
    assert [(f["system"], f["expectation"]) for f in s4["gates"]["failures"]] == [("crm", "required:first_name")]

    sqlite_exec(crm, "UPDATE contact SET firstname = 'Cy', modifiedon = '2026-02-22 10:00:00' WHERE contactid = 'c3'")
    assert run("r5")["gates"]["failed"] == 0
    assert run("r6")["gates"]["failed"] == 0
    assert _validated(cfg, "r6") == {"crm": (0, "changed"), "marketing": (0, "changed")}
