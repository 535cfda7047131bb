"""Honest run statuses (reconcile.report): incomplete loads, standing vs new holds, alerts on a change of state,
exit codes, and a run killed mid-load finished by the next plain run."""
from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

from reconcile import cli, report, runner
from reconcile.config import load_config

from .test_plan_load import make, night, table, wh

ROOT = Path(__file__).parents[2]


def _sql(path: Path, sql: str, rows=()) -> None:
    con = sqlite3.connect(path)
    try:
        con.executemany(sql, rows) if rows else con.execute(sql)
        con.commit()
    finally:
        con.close()


def test_a_failing_row_ends_the_run_incomplete_with_exit_4(tmp_path, capsys):
    path = make(tmp_path)  # Eve's first name is too long for marketing's CHECK constraint
    code = cli.main(["run", "-c", str(path), "--run-id", "r1", "--json"])
    s = json.loads(capsys.readouterr().out)
    assert (code, s["status"]) == (cli.EXIT_INCOMPLETE, "incomplete")
    ((failure,),) = s["failures"].values()
    assert failure["count"] == 1 and "CHECK constraint failed" in failure["error"]
    assert s["reasons"][0].startswith("1 change(s) into marketing failed")
    assert s["alert"]["event"] == "run_incomplete"
    assert cli.main(["status", "-c", str(path)]) == 0
    assert "incomplete" in capsys.readouterr().out


def test_a_load_stopped_by_max_failure_rate_is_incomplete_and_lists_the_unattempted_changes(tmp_path):
    path = make(tmp_path, batch=1)
    _sql(tmp_path / "systems" / "crm.db", "INSERT INTO contact VALUES (?, ?, ?, 'Kim', NULL, 0, '2026-01-03')",
         [(f"K{i:03d}", f"k{i}@example.com", f"Bartholomew-{i}") for i in range(12)])  # too long for marketing
    _sql(tmp_path / "systems" / "marketing.db", "INSERT INTO contacts (vid, email, firstname, lastname) "
         "VALUES (?, ?, ?, 'Kim')", [(100 + i, f"k{i}@example.com", f"Old{i}") for i in range(12)])
    s = night(load_config(path), 1)
    # Records load in key order, one per batch: vids 100..109 fail, then 10 of 10 > load.max_failure_rate 5%
    assert s["status"] == "incomplete"
    assert s["changes"]["marketing"]["failed"] == 10 and s["changes"]["marketing"]["unattempted"] == 4
    u = s["unattempted"]["marketing"]
    assert u["count"] == u["listed"] == 4 and "load.max_failure_rate" in u["reason"]
    assert sorted(c["record_key"] for c in u["changes"]) == ["110", "111", "2", "3"]
    assert any(r.startswith("4 planned change(s) into marketing were not attempted: stopped") for r in s["reasons"])
    assert table(tmp_path / "systems" / "marketing.db",
                 "SELECT firstname FROM contacts WHERE vid IN (2, 110, 111) ORDER BY vid") == [
        ("Cy",), ("Old10",), ("Old11",)]  # never attempted: untouched


def test_standing_holds_neither_block_nor_alert_again_and_a_new_hold_does(tmp_path):
    path = make(tmp_path, create="true")
    crm = tmp_path / "systems" / "crm.db"
    _sql(crm, "UPDATE contact SET firstname = 'Eva' WHERE contactid = 'E'")  # no failing row in this test
    cfg = load_config(path)
    s1 = night(cfg, 1)  # A and B share a mailbox: held for review (new)
    assert s1["status"] == "blocked" and s1["held_new"] == {"marketing": 2}
    assert s1["alert"]["event"] == "run_blocked"
    s2 = night(cfg, 2)  # the same review items hold the same creates: standing, nothing new
    assert s2["status"] == "success" and s2["alert"] is None
    assert s2["held_new"] == {} and s2["held_standing"] == {"marketing": 2} and s2["holds_new"] == {}
    assert any("standing, not news" in n for n in s2["notes"])
    assert cli.exit_code(s2["status"]) == cli.EXIT_OK
    _sql(crm, "INSERT INTO contact VALUES ('F', 'info@shared.example', 'Fred', 'Hahn', NULL, 0, '2026-02-02 12:00:00')")
    s3 = night(cfg, 3, full=True)  # a third person at the shared mailbox: one new held create
    assert s3["status"] == "blocked" and s3["held_new"] == {"marketing": 1}
    assert s3["held_standing"] == {"marketing": 2}
    assert s3["alert"]["event"] == "run_blocked" and "newly held" in s3["alert"]["message"]
    assert cli.exit_code(s3["status"]) == cli.EXIT_BLOCKED


def test_alerts_fire_on_a_change_of_state():
    def run(status, *causes):
        return {"entity": "contact", "run_id": "r", "status": status, "reasons": ["why"], "causes": list(causes)}

    assert report.alert(run("success"), run("blocked", "blocked:gate:t:e")) is None
    assert report.alert(run("blocked", "blocked:gate:t:e"), None)["event"] == "run_blocked"
    assert report.alert(run("blocked", "blocked:gate:t:e"), run("blocked", "blocked:gate:t:e")) is None
    assert report.alert(run("blocked", "blocked:gate:t:e", "blocked:gate:u:e"), run("blocked", "blocked:gate:t:e"))
    assert report.alert(run("incomplete", "incomplete:failed:crm"), run("blocked", "incomplete:failed:crm"))
    assert report.alert(run("dry_run"), None) is None
    assert report.worst(["success", "blocked", "incomplete", "dry_run"]) == "incomplete"
    assert report.worst(["success", "something new"]) == "something new"  # unknown: as bad as failed


def test_a_run_killed_mid_load_is_finished_by_the_next_plain_run_exactly_once(tmp_path):
    path = make(tmp_path, batch=1, pause=0.3)
    _sql(tmp_path / "systems" / "crm.db", "INSERT INTO contact VALUES (?, ?, ?, 'Kim', NULL, 0, '2026-01-03')",
         [(f"K{i:03d}", f"k{i}@example.com", f"New{i}") for i in range(12)])
    _sql(tmp_path / "systems" / "marketing.db", "INSERT INTO contacts (vid, email, firstname, lastname) "
         "VALUES (?, ?, ?, 'Kim')", [(100 + i, f"k{i}@example.com", f"Old{i}") for i in range(12)])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "include"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-m", "reconcile.cli", "run", "-c", str(path), "--run-id", "r1"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = tmp_path / "systems" / "marketing.db"
    deadline = time.monotonic() + 120
    while table(log, "SELECT count(*) FROM write_log")[0][0] < 4 and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    written = table(log, "SELECT count(*) FROM write_log")[0][0]
    assert 4 <= written < 13, "the load must have been interrupted mid-way"
    cfg = load_config(path)

    s2 = runner.run_entity(cfg, "contact", run_id="r2")  # a plain run (now, after r1): finds r1 abandoned,
    # its process gone, finishes it, then runs

    assert s2["recovered"] == [{"run_id": "r1", "status": "incomplete"}]  # Eve's name fails its CHECK
    (r1,) = wh(cfg, "SELECT status, owner, summary->>'$.recovered_by' FROM audit.runs WHERE run_id = 'r1'")
    assert r1 == ("incomplete", None, "r2")
    assert wh(cfg, "SELECT status, count(*) FROM audit.changes WHERE run_id = 'r1' AND target = 'marketing' "
                   "GROUP BY 1 ORDER BY 1") == [("applied", 13), ("failed", 1)]
    # the target's own record: every first name written once, none twice; r2 had nothing left to write
    assert table(log, "SELECT vid, count(*) FROM write_log GROUP BY vid HAVING count(*) <> 1") == []
    assert table(log, "SELECT count(*) FROM write_log")[0][0] == 13
    assert table(log, "SELECT count(*) FROM contacts WHERE firstname LIKE 'New%'") == [(12,)]
    assert wh(cfg, "SELECT count(*) FROM audit.changes WHERE run_id = 'r2' AND status = 'applied'") == [(0,)]
    runs = runner.finish_run(cfg, "contact", "r1")  # finishing it again keeps who recovered it
    assert runs["recovered_by"] == "r2"


def test_a_run_whose_process_is_alive_is_not_recovered(tmp_path):
    cfg = load_config(make(tmp_path))
    runner.begin_run(cfg, "contact", "r1", datetime(2026, 2, 1, 2), hold=True)  # this process: alive
    runner.begin_run(cfg, "contact", "r2", datetime(2026, 2, 2, 2))
    assert wh_work(cfg, "SELECT run_id, status, owner FROM audit.runs ORDER BY 1") == [
        ("r1", "running", runner.owner_id()), ("r2", "running", None)]


def wh_work(cfg, sql: str) -> list[tuple]:
    import duckdb

    con = duckdb.connect(str(cfg.state_dir / "work.duckdb"), read_only=True)
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


def test_every_stage_has_its_seconds_in_the_summary_in_audit_runs_and_in_run_status(tmp_path):
    from reconcile import pipeline, queries

    path = make(tmp_path)
    cfg = load_config(path)
    s = runner.run_entity(cfg, "contact", run_id="r1")
    systems = sorted(cfg.entities["contact"].sources)
    expected = (["begin_run"] + [f"extract:{x}" for x in systems] + ["load_staging"]
                + [f"validate:{x}" for x in systems]
                + ["apply_gates", "resolve_identity", "build_golden", "guard_collisions", "plan_changes"]
                + [f"load:{t}" for t in s["changes"]] + ["record_loads", "purge_erased"])
    assert list(s["stages"]) == expected  # pipeline order, task names
    assert all(isinstance(v, float) and v >= 0 for v in s["stages"].values())
    assert [t for t in pipeline.task_ids() if t not in {k.split(":")[0] for k in s["stages"]}] == ["finish_run"]
    stored = json.loads(wh(cfg, "SELECT summary FROM audit.runs WHERE run_id = 'r1'")[0][0])
    assert stored["stages"] == s["stages"]
    # The stages that record a result also keep their own seconds (what an Airflow run's summary shows).
    recorded = dict(wh(cfg, "SELECT stage, seconds FROM audit.stage_runs WHERE run_id = 'r1'"))
    assert set(recorded) >= {"extract", "gates", "identity", "golden", "guard", "plan"}
    assert all(v is not None and v >= 0 for v in recorded.values())
    shown = queries.run_status(cfg, "r1")["stages"]
    assert [x["stage"] for x in shown] == expected and all(x["seconds"] is not None for x in shown)
