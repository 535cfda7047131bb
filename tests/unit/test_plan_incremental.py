"""Incremental plan: a run plans only the xids whose changes can differ from the last plan's, and writes
exactly the audit.changes a full plan from the same state writes, night after night: held creates stay held,
an edited record gets its one update, a configuration change plans everything again."""
from __future__ import annotations

import shutil
import sqlite3
from datetime import datetime

import duckdb

from reconcile import runner
from reconcile.config import load_config
from reconcile.stages import plan

from ..conftest import sqlite_exec, write_base_config

CHANGES = "SELECT * EXCLUDE (applied_at, load_attempt) FROM audit.changes WHERE run_id = ? ORDER BY change_id"


def _night(cfg, tmp_path, run_id: str, day: int) -> dict:
    """One night; its plan made incrementally, and in full on a copy of the warehouse just before the plan."""
    run_at = datetime(2026, 3, day, 2)
    manifest = runner.begin_run(cfg, "contact", run_id, run_at)
    for s in sorted(manifest["systems"]):
        runner.extract_system(cfg, "contact", s, run_id)
    runner.load_staging(cfg, "contact", run_id)
    for s in sorted(manifest["systems"]):
        runner.validate_system(cfg, "contact", s, run_id)
    runner.apply_gates(cfg, "contact", run_id)
    runner.resolve_identity(cfg, "contact", run_id)
    runner.build_golden(cfg, "contact", run_id)
    runner.guard_collisions(cfg, "contact", run_id)
    twin = tmp_path / f"full_{run_id}.duckdb"
    shutil.copyfile(cfg.state_dir / "work.duckdb", twin)

    summary = runner.plan_changes(cfg, "contact", run_id, approve=True)
    con = duckdb.connect(str(twin))
    try:
        con.execute("SET TimeZone = 'UTC'")
        full = plan.plan(con, cfg, "contact", run_id, run_at, full=True)
        expected = con.execute(CHANGES, [run_id]).fetchall()
    finally:
        con.close()
    con = duckdb.connect(str(cfg.state_dir / "work.duckdb"), read_only=True)
    try:
        got = con.execute(CHANGES, [run_id]).fetchall()
    finally:
        con.close()
    assert got == expected, f"{run_id}: audit.changes differs from a full plan"
    assert summary["targets"] == full["targets"]
    assert full["mode"] == "full" and full["xids_planned"] >= summary["xids_planned"]
    for target, state in runner.targets_to_load(cfg, "contact", run_id).items():
        if state == "ok":
            runner.load_changes(cfg, "contact", run_id, target)
    runner.finish_run(cfg, "contact", run_id)
    summary["all_xids"] = full["xids_planned"]
    return summary


def _changes(cfg, run_id: str) -> list[tuple]:
    con = duckdb.connect(str(cfg.state_dir / "work.duckdb"), read_only=True)
    try:
        return con.execute("SELECT target, operation, field, status, xid FROM audit.changes WHERE run_id = ? "
                           "ORDER BY ALL", [run_id]).fetchall()
    finally:
        con.close()


def test_incremental_plan_plans_only_changed_xids_and_equals_a_full_plan(project, tmp_path):
    options = dict(extract="{overlap_minutes: 0}", load="{mode: apply}",
                   gates="{changes: {create: {max_share: 1}, update: {max_share: 1}}}")
    config = write_base_config(project, marketing_writes="{create: true}", **options)
    crm = project / "systems" / "crm.db"
    con = sqlite3.connect(crm)
    with con:  # 20 people marketing lacks, and two CRM contacts sharing one email (their creates are held)
        con.executemany("INSERT INTO contact VALUES (?, ?, ?, NULL, 'Prospect', 0, '2025-12-01 10:00:00')",
                        [(f"p{i}", f"p{i}@example.com", f"P{i}") for i in range(20)])
        con.executemany("INSERT INTO contact VALUES (?, 'twin@example.com', ?, NULL, 'Prospect', 0, "
                        "'2025-12-01 10:00:00')", [("t1", "Tom"), ("t2", "Tim")])
    con.close()
    cfg = load_config(config)

    s1 = _night(cfg, tmp_path, "r1", 1)
    assert (s1["mode"], s1["reason"]) == ("full", "first plan")
    creates = [c for c in _changes(cfg, "r1") if c[1] == "create"]
    assert len(creates) >= 20 and sum(c[3] == "held" for c in creates) == 2  # the twins' creates

    # Our own writes come back (marketing's new records are extracted): planned incrementally, same as full.
    s2 = _night(cfg, tmp_path, "r2", 2)
    assert s2["mode"] == "incremental"
    # Quiet: the held twins are planned (and held) again; little else is looked at.
    s3 = _night(cfg, tmp_path, "r3", 3)
    assert s3["mode"] == "incremental" and s3["xids_planned"] < s3["all_xids"]
    held = {c[4] for c in _changes(cfg, "r3") if c[3] == "held"}
    assert len(held) == 2 and held == {c[4] for c in creates if c[3] == "held"}

    # One CRM first name edited: it goes to marketing; only that xid, the held twins and the records read
    # again at the watermarks are planned.
    sqlite_exec(crm, "UPDATE contact SET firstname = 'Annie', modifiedon = '2026-02-20 10:00:00' "
                     "WHERE contactid = 'c1'")
    s4 = _night(cfg, tmp_path, "r4", 4)
    r4 = _changes(cfg, "r4")
    edited = [c for c in r4 if c[3] != "held"]
    assert [c[:4] for c in edited] == [("marketing", "update", "first_name", "applied")]
    assert s4["mode"] == "incremental" and 3 <= s4["xids_planned"] <= 5 < s4["all_xids"]
    assert {c[4] for c in r4} == held | {edited[0][4]}

    # A target configuration change plans everything again.
    cfg = load_config(write_base_config(project, marketing_writes="{create: true, blanks_overwrite: true}", **options))
    s5 = _night(cfg, tmp_path, "r5", 5)
    assert (s5["mode"], s5["reason"]) == ("full", "entity or target configuration changed")
    assert s5["xids_planned"] == s5["all_xids"]
