"""Incremental golden records: a run rebuilds only the xids whose records, links or decisions changed, and
gets exactly the tables a full rebuild from the same state gets (golden rows, lineage, conflicts,
disagreements), night after night."""
from __future__ import annotations

import shutil
import sqlite3
from datetime import datetime

import duckdb

from reconcile import runner
from reconcile.config import load_config
from reconcile.stages import golden

from ..conftest import sqlite_exec, write_base_config

TABLES = {
    "golden": "SELECT * FROM golden.contact ORDER BY xid",
    "lineage": "SELECT * FROM golden.contact_lineage ORDER BY ALL",
    "conflicts": "SELECT * FROM golden.contact_conflicts WHERE run_id = $run ORDER BY ALL",
    "disagreements": "SELECT * FROM audit.disagreements WHERE run_id = $run ORDER BY ALL",
}


def _tables(con, run_id: str) -> dict[str, list[tuple]]:
    return {name: con.execute(sql, {"run": run_id} if "$run" in sql else {}).fetchall()
            for name, sql in TABLES.items()}


def _night(cfg, tmp_path, run_id: str, day: int) -> dict:
    """One night through identity; then golden built incrementally, and fully on a copy of the same state."""
    run_at = datetime(2026, 3, day, 2)
    manifest = runner.begin_run(cfg, "contact", run_id, run_at)
    for s in sorted(manifest["systems"]):
        runner.extract_system(cfg, "contact", s, run_id)
    runner.load_staging(cfg, "contact", run_id)
    for s in sorted(manifest["systems"]):
        runner.validate_system(cfg, "contact", s, run_id)
    runner.apply_gates(cfg, "contact", run_id)
    runner.resolve_identity(cfg, "contact", run_id)
    twin = tmp_path / f"full_{run_id}.duckdb"
    shutil.copyfile(cfg.state_dir / "work.duckdb", twin)

    summary = runner.build_golden(cfg, "contact", run_id)
    con = duckdb.connect(str(twin))
    try:
        con.execute("SET TimeZone = 'UTC'")
        full = golden.build(con, cfg, "contact", run_id, run_at, full=True)
        expected = _tables(con, run_id)
    finally:
        con.close()
    con = duckdb.connect(str(cfg.state_dir / "work.duckdb"), read_only=True)
    try:
        got = _tables(con, run_id)
    finally:
        con.close()
    for name in TABLES:
        assert got[name] == expected[name], f"{run_id}: {name} differs from a full rebuild"
    same = ("records", "changed", "removed", "conflicts", "disagreements")
    assert {k: summary[k] for k in same} == {k: full[k] for k in same}
    assert full["mode"] == "full" and full["rebuilt"] == full["records"]
    runner.finish_run(cfg, "contact", run_id)
    return summary


def _read_xids(cfg, run_id: str) -> int:
    """Xids of the records this run's extracts read: changed ones, and the unchanged ones an incremental read
    takes again because their modified time equals the watermark (`>=`, so an edit in the same second as
    the last read is never missed)."""
    con = duckdb.connect(str(cfg.state_dir / "work.duckdb"), read_only=True)
    try:
        return con.execute("""
            SELECT count(DISTINCT x.xid) FROM identity.xref x JOIN (
                SELECT 'crm' AS system, _record_key FROM staging.crm__contact WHERE _run_id = $r
                UNION ALL SELECT 'marketing', _record_key FROM staging.marketing__contact WHERE _run_id = $r) t
            ON t.system = x.system AND t._record_key = x.record_key WHERE x.entity = 'contact'""",
                           {"r": run_id}).fetchone()[0]
    finally:
        con.close()


def test_incremental_golden_rebuilds_only_changed_xids_and_equals_a_full_rebuild(project, tmp_path):
    config = write_base_config(project, extract="{overlap_minutes: 0}")
    crm, marketing = project / "systems" / "crm.db", project / "systems" / "marketing.db"
    con = sqlite3.connect(crm)
    with con:
        con.executemany("INSERT INTO contact VALUES (?, ?, ?, NULL, 'Prospect', 0, '2025-12-01 10:00:00')",
                        [(f"p{i}", f"p{i}@example.com", f"P{i}") for i in range(20)])
    con.close()
    cfg = load_config(config)

    s1 = _night(cfg, tmp_path, "r1", 1)
    assert (s1["mode"], s1["reason"]) == ("full", "first build")
    people = s1["records"]  # the 23 CRM contacts, and any marketing contact identity minted an xid for
    assert people >= 23

    # One CRM first name edited: its xid is rebuilt (with any xid whose links identity touched this run),
    # not the others.
    sqlite_exec(crm, "UPDATE contact SET firstname = 'Bobby', modifiedon = '2026-02-20 10:00:00' "
                     "WHERE contactid = 'c2'")
    s2 = _night(cfg, tmp_path, "r2", 2)
    assert (s2["mode"], s2["changed"], s2["records"]) == ("incremental", 1, people)
    assert 1 <= s2["rebuilt"] == _read_xids(cfg, "r2") <= 3  # c2, and the records read again at the watermark

    # Nothing changed: only the records read again at the watermarks (one per system here) are rebuilt.
    s3 = _night(cfg, tmp_path, "r3", 3)
    assert (s3["mode"], s3["changed"]) == ("incremental", 0) and s3["rebuilt"] == _read_xids(cfg, "r3") <= 2

    # Anna's CRM phone and her marketing record's phone change; a new CRM contact gets a new xid and golden row.
    sqlite_exec(crm, "UPDATE contact SET telephone1 = '+1 415 555 0111', modifiedon = '2026-02-21 10:00:00' "
                     "WHERE contactid = 'c1'")
    sqlite_exec(marketing, "UPDATE contacts SET phone = '4155550199', updated_at = '2026-02-21T09:00:00Z' WHERE vid = 1")
    sqlite_exec(crm, "INSERT INTO contact VALUES ('c9', 'nine@example.com', 'Nina', NULL, 'Customer', 0, "
                     "'2026-02-22 10:00:00')")
    s4 = _night(cfg, tmp_path, "r4", 4)
    assert (s4["mode"], s4["changed"], s4["records"]) == ("incremental", 2, people + 1)
    assert 2 <= s4["rebuilt"] == _read_xids(cfg, "r4") <= 4  # Anna, Nina, and what is read at the watermarks

    # A full snapshot (every row read again, so every xid is dirty) that finds a CRM-only contact deleted: its
    # golden row goes, every other row stays as it was (same values, same run that last changed them).
    sqlite_exec(crm, "DELETE FROM contact WHERE contactid = 'p5'")
    cfg = load_config(write_base_config(project, extract="{overlap_minutes: 0, full_every: 1}"))
    s5 = _night(cfg, tmp_path, "r5", 5)
    assert (s5["mode"], s5["changed"], s5["removed"], s5["records"]) == ("incremental", 0, 1, people)
    assert s5["rebuilt"] >= people

    # A configuration change that decides golden values rebuilds everything.
    cfg = load_config(write_base_config(project, extract="{overlap_minutes: 0}",
                                        fields={"email": "{owner: crm, fallback: [marketing]}"}))
    s6 = _night(cfg, tmp_path, "r6", 6)
    assert (s6["mode"], s6["reason"], s6["rebuilt"]) == ("full", "entity configuration changed", people)
