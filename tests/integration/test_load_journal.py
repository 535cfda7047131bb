"""The load in three steps (stages/load.py): exported on the warehouse, applied by a process that has only the
run storage and the target (a Celery worker without the warehouse disk), recorded on the warehouse from the
journal. Against the real SQLite targets and the HubSpot-like API server: the same warehouse state as the
one-process load, a worker killed mid-batch and retried writes nothing twice, recording is idempotent, and a
journal a crashed run never recorded is recorded by the next run."""
from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from reconcile import runner
from reconcile.config import load_config
from reconcile.runstore import RunFolder

from ..unit import test_plan_load as sqlite_targets
from .test_api_load import add_renamed_kims, api, make as make_api, mkt  # noqa: F401  (api: the fixture)

REPO = Path(__file__).resolve().parents[2]


def with_runs_url(path: Path) -> Path:
    """Run storage beside the config, outside the warehouse's folder (as on a worker with shared storage)."""
    path.write_text(path.read_text() + "runs_url: runs\n")
    return path


@contextlib.contextmanager
def no_warehouse(cfg):
    """The warehouse folder is gone and a file stands in its place: opening or creating the warehouse fails."""
    folder = cfg.warehouse_path.parent
    away = folder.with_name(folder.name + ".away")
    folder.rename(away)
    folder.write_text("not a warehouse")
    try:
        yield
    finally:
        folder.unlink()
        away.rename(folder)


def apply_in_a_worker(path: Path, targets: list[str]) -> subprocess.Popen:
    """`runner.apply_load` in a process of its own, as a Celery worker runs the `load` task."""
    code = ("import sys; from reconcile import runner; from reconcile.config import load_config; "
            "cfg = load_config(sys.argv[1]); [runner.apply_load(cfg, 'contact', 'r1', t) for t in sys.argv[2:]]")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "include"), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, "-c", code, str(path), *targets], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def warehouse_state(cfg, run_id: str = "r1") -> dict:
    """What a load leaves in the warehouse (without timestamps and minted xids, which differ between runs)."""
    q = {
        "changes": f"""SELECT target, operation, coalesce(record_key, '-'), field, status, error, reason, after_raw,
                              CAST(before_image AS VARCHAR) FROM audit.changes WHERE run_id = '{run_id}' ORDER BY ALL""",
        "xref": "SELECT system, record_key, rule FROM identity.xref ORDER BY ALL",
        "history": "SELECT system, record_key, action, rule, note FROM identity.xref_history ORDER BY ALL",
        "ledger": "SELECT target, record_key, column_name, value_hash, run_id FROM audit.write_ledger ORDER BY ALL",
        "review": "SELECT kind, system, status, first_seen_run, last_seen_run FROM review.items ORDER BY ALL",
        "loads": """SELECT stage, result->>'status', result->>'applied', result->>'failed', result->>'reason'
                    FROM audit.stage_runs WHERE stage LIKE 'load:%' ORDER BY ALL""",
    }
    return {k: sqlite_targets.wh(cfg, sql) for k, sql in q.items()}


def targets_state(root: Path) -> dict:
    return {"crm": sqlite_targets.table(root / "systems" / "crm.db", "SELECT contactid, emailaddress1, firstname, "
                                        "lastname, telephone1, statecode FROM contact ORDER BY 1"),
            "marketing": sqlite_targets.table(root / "systems" / "marketing.db", "SELECT vid, email, firstname, "
                                              "lastname, phone FROM contacts ORDER BY 1"),
            "writes": sqlite_targets.table(root / "systems" / "marketing.db", "SELECT vid, firstname FROM write_log ORDER BY 1, 2")}


def nia(root: Path) -> None:
    """A CRM contact marketing lacks: the load creates her there (a link `created`, ledger rows)."""
    crm = sqlite3.connect(root / "systems" / "crm.db")
    crm.execute("INSERT INTO contact VALUES ('N1', 'nia@example.com', 'Nia', 'Long', NULL, 0, '2026-01-03 10:00:00')")
    crm.commit()
    crm.close()


def test_a_load_applied_without_the_warehouse_then_recorded_equals_the_one_process_load(tmp_path):
    cfgs = {}
    for way in ("one_process", "split"):
        root = tmp_path / way
        path = with_runs_url(sqlite_targets.make(root, create="true", changes="{create: {max: 0}, update: {max: 0}}"))
        nia(root)
        cfgs[way] = cfg = load_config(path)
        assert sqlite_targets.night(cfg, 1)["status"] == "awaiting_approval"
        assert runner.approve(cfg, "contact", "r1", by="ops") == ["crm", "marketing"]
    for target in ("crm", "marketing"):
        runner.load_changes(cfgs["one_process"], "contact", "r1", target)

    split = cfgs["split"]
    assert runner.export_loads(split, "contact", "r1") == {"crm": "ok", "marketing": "ok"}
    with no_warehouse(split):
        worker = apply_in_a_worker(split.path, ["crm", "marketing"])
        assert worker.wait(timeout=300) == 0, worker.stderr.read().decode()
    # applied, not recorded yet: the warehouse still plans every change
    assert sqlite_targets.wh(split, "SELECT DISTINCT status FROM audit.changes WHERE run_id = 'r1' "
                                    "AND status NOT IN ('held', 'blocked')") == [("planned",)]
    recorded = runner.record_loads(split, "contact", "r1")
    assert sorted(recorded) == ["crm", "marketing"]

    summaries = {way: runner.finish_run(cfg, "contact", "r1") for way, cfg in cfgs.items()}
    want, got = warehouse_state(cfgs["one_process"]), warehouse_state(split)
    assert got == want
    assert targets_state(tmp_path / "split") == targets_state(tmp_path / "one_process")
    assert summaries["split"]["status"] == summaries["one_process"]["status"] == "incomplete"  # Eve: CHECK
    assert summaries["split"]["changes"] == summaries["one_process"]["changes"]
    # and the load did something worth comparing: a create linked and ledgered, updates, a failure
    assert [(s, r) for s, _, r in got["xref"] if r == "created"] == [("marketing", "created")]  # Nia
    assert any(row[1] == "create" and row[4] == "applied" for row in got["changes"])
    assert any(row[4] == "failed" for row in got["changes"]) and len(got["ledger"]) >= 4


def _journal(cfg, target: str) -> RunFolder:
    load = RunFolder(cfg, "r1", "contact").sub(f"load/{target}")
    return load.sub(load.read_json("current.json")["export"])


@pytest.mark.slow
def test_a_worker_killed_mid_batch_is_retried_from_the_journal_writing_and_recording_everything_once(tmp_path, api):
    add_renamed_kims(tmp_path)
    path = with_runs_url(make_api(tmp_path, api, changes="{update: {max: 0}}", batch=5))
    cfg = load_config(path)
    assert sqlite_targets.night(cfg, 1)["status"] == "awaiting_approval"
    runner.approve(cfg, "contact", "r1", by="ops", targets=["marketing"])
    assert runner.export_loads(cfg, "contact", "r1", ["marketing"]) == {"marketing": "ok"}
    expected = sqlite_targets.wh(cfg, "SELECT count(*) FROM audit.changes WHERE run_id = 'r1' "
                                      "AND target = 'marketing' AND status = 'planned'")[0][0]
    assert expected == 14  # 12 new first names + Cy's + Eve's: batches of 5, 5 and 4 records

    with no_warehouse(cfg):
        worker = apply_in_a_worker(path, ["marketing"])

        def kill() -> None:  # while the second batch's request is in flight: the API writes it, nobody journals it
            worker.send_signal(signal.SIGKILL)
            worker.wait()

        api.before("POST", "/batch/update", lambda: None)
        api.before("POST", "/batch/update", kill)
        assert worker.wait(timeout=300) == -signal.SIGKILL, worker.stderr.read().decode()  # at its second batch
        journal = _journal(cfg, "marketing")
        assert {n for n in journal.names() if n.startswith(("intent", "outcome"))} == {
            "intent-000001.json", "outcome-000001.json", "intent-000002.json"}
        assert len([w for w in api.writes if w[0] == "update"]) == 10
        # the retry (on any worker: it needs only the run storage and the API), configured with another batch
        # size: it cuts the batches its journal numbers, of 5, or it would write the second batch's records again
        cfg.load.batch_size = 3
        retried = runner.apply_load(cfg, "contact", "r1", "marketing")
    assert (retried["status"], retried["applied"], retried["failed"]) == ("done", expected - 1, 1)
    runner.record_loads(cfg, "contact", "r1")
    runner.finish_run(cfg, "contact", "r1")

    updates = Counter(k for op, k in api.writes if op == "update")
    assert set(updates.values()) == {1} and len(updates) == expected - 1  # every record once; Eve's never
    assert mkt(tmp_path, "SELECT vid, count(*) FROM write_log GROUP BY vid HAVING count(*) <> 1") == []
    assert sqlite_targets.wh(cfg, """SELECT status, error IS NOT DISTINCT FROM 'verified after an interrupted load', count(*)
                                     FROM audit.changes WHERE run_id = 'r1' AND target = 'marketing'
                                     GROUP BY ALL ORDER BY ALL""") == [
        ("applied", False, expected - 1 - 5), ("applied", True, 5), ("failed", False, 1)]
    assert sqlite_targets.wh(cfg, """SELECT count(*), count(DISTINCT change_id) FROM audit.write_ledger
                                     WHERE run_id = 'r1' AND target = 'marketing'""") == [(expected - 1,) * 2]

    # Recording the same journal again (as after a crash just before `recorded.json`) changes nothing.
    before = warehouse_state(cfg)
    Path(_journal(cfg, "marketing").path("recorded.json")).unlink()
    assert runner.record_loads(cfg, "contact", "r1")["marketing"]["applied"] == expected - 1
    assert warehouse_state(cfg) == before
    assert runner.record_loads(cfg, "contact", "r1") == {}  # nothing new in the journal
    assert warehouse_state(cfg) == before


def test_a_journal_a_crashed_run_never_recorded_is_recorded_by_the_next_run_once(tmp_path):
    path = with_runs_url(sqlite_targets.make(tmp_path, changes="{update: {max: 0}}"))
    cfg = load_config(path)
    assert sqlite_targets.night(cfg, 1)["status"] == "awaiting_approval"
    runner.approve(cfg, "contact", "r1", by="ops", targets=["marketing"])
    runner.export_loads(cfg, "contact", "r1", ["marketing"])
    runner.apply_load(cfg, "contact", "r1", "marketing")  # ... and the run's process dies before record_loads
    log = tmp_path / "systems" / "marketing.db"
    assert sqlite_targets.table(log, "SELECT vid, firstname FROM write_log") == [(2, "Cyrus")]
    assert sqlite_targets.wh(cfg, "SELECT count(*) FROM audit.write_ledger WHERE run_id = 'r1'") == [(0,)]

    s2 = sqlite_targets.night(cfg, 2)

    assert [r["run_id"] for r in s2["recovered"]] == ["r1"]
    assert sqlite_targets.wh(cfg, """SELECT status, count(*) FROM audit.changes WHERE run_id = 'r1'
                                     AND target = 'marketing' AND operation = 'update' GROUP BY 1 ORDER BY 1""") == [
        ("applied", 1), ("failed", 1)]  # Cy's name; Eve's fails marketing's CHECK
    ledger = sqlite_targets.wh(cfg, "SELECT record_key, column_name FROM audit.write_ledger WHERE run_id = 'r1'")
    assert ledger == [("2", "firstname")]
    assert sqlite_targets.wh(cfg, "SELECT summary->>'$.recovered_by' FROM audit.runs WHERE run_id = 'r1'") == [("r2",)]
    # written once, never again by r2 (the value is ours: the ledger says so), nor recorded again by r3
    assert sqlite_targets.table(log, "SELECT vid, firstname FROM write_log") == [(2, "Cyrus")]
    before = warehouse_state(cfg)
    sqlite_targets.night(cfg, 3)
    assert warehouse_state(cfg)["ledger"] == before["ledger"]
    assert warehouse_state(cfg, "r1")["changes"] == before["changes"]
