"""Whole runs with marketing behind the HubSpot-like API server on 127.0.0.1 (started here, state in SQLite):
the seed-000 scenario, a 429 storm the load rides out, a 409 on create held as a link candidate, and a load
killed mid-way then resumed, exactly once, verified from the server's own state."""
from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from datetime import datetime
from pathlib import Path

import duckdb
import pytest

from reconcile import review, runner
from reconcile.config import load_config
from reconcile.demo.hubspot_server import HubSpotServer, ObjectType

from ..unit.test_plan_load import GENEROUS, add_renamed_kims, write_load_config, write_systems

TOKEN = "pat-eu1-integration-secret"


@pytest.fixture
def api(tmp_path, monkeypatch):
    """The systems (CRM as SQLite; marketing's SQLite behind the HubSpot-like server) and the server."""
    write_systems(tmp_path)
    monkeypatch.setenv("RT_HUBSPOT_TOKEN", TOKEN)
    srv = HubSpotServer(tmp_path / "systems" / "marketing.db", TOKEN,
                        objects=[ObjectType("contacts", "contacts", "vid", modified="updated_at")]).start()
    yield srv
    srv.stop()


def make(tmp_path: Path, srv, create="false", changes=GENEROUS, batch=200, pause=0):
    hubspot = {"api": "hubspot", "base_url": srv.url, "token_env": "RT_HUBSPOT_TOKEN",
               "limits": "{max_wait_seconds: 0.5}"}
    return write_load_config(tmp_path, create, changes, batch, pause, marketing=hubspot, marketing_key="hs_object_id")


def mkt(tmp_path: Path, sql: str) -> list[tuple]:
    con = sqlite3.connect(tmp_path / "systems" / "marketing.db")
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


def wh(cfg, sql: str) -> list[tuple]:
    con = duckdb.connect(str(cfg.warehouse_path), read_only=True)
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


def night(cfg, n: int) -> dict:
    return runner.run_entity(cfg, "contact", run_id=f"r{n}", run_at=datetime(2026, 2, n, 2))


def test_seed_000_through_the_api_two_crm_contacts_never_collapse_into_one_api_contact(tmp_path, api):
    cfg = load_config(make(tmp_path, api, create="true"))
    s1 = night(cfg, 1)
    s2 = night(cfg, 2)
    # one API contact for the shared address, untouched (no write to it, ever), and no second one created
    assert mkt(tmp_path, "SELECT vid, firstname, lastname, phone FROM contacts WHERE email = 'info@shared.example'") == [
        (1, "Maria", "Schmidt", "+1 415 555 0199")]
    assert ("update", "1") not in api.writes and mkt(tmp_path, "SELECT count(*) FROM write_log WHERE vid = 1") == [(0,)]
    assert wh(cfg, "SELECT operation, status FROM audit.changes WHERE target = 'marketing' AND operation = 'create' "
                   "AND run_id = 'r1'") == [("create", "held"), ("create", "held")]
    # names flow CRM -> API (Cy becomes Cyrus), the phone API -> CRM
    assert mkt(tmp_path, "SELECT firstname FROM contacts WHERE vid = 2") == [("Cyrus",)]
    crm = sqlite3.connect(tmp_path / "systems" / "crm.db")
    assert crm.execute("SELECT telephone1 FROM contact WHERE contactid = 'C'").fetchone() == ("+14155550103",)
    crm.close()
    assert s1["changes"]["marketing"]["applied"] >= 1 and s1["extract_mode"]["marketing"] == "full"
    # night 2 reads the API incrementally (search) and converges: nothing left to write
    assert s2["extract_mode"]["marketing"] == "incremental"
    assert wh(cfg, "SELECT count(*) FROM audit.changes WHERE run_id = 'r2' AND status IN ('planned', 'applied')") == [(0,)]
    assert any(p.endswith("/search") for _, p, _ in api.requests)


def test_a_429_storm_is_ridden_out_by_the_load(tmp_path, api):
    cfg = load_config(make(tmp_path, api))
    api.inject(429, times=5, path="/batch/", headers={"Retry-After": "0"})
    api.rate_limit = (4, 0.3)
    s = night(cfg, 1)
    assert s["changes"]["marketing"]["applied"] == 1 and s["changes"]["marketing"]["failed"] == 1  # Eve: CHECK
    assert mkt(tmp_path, "SELECT firstname FROM contacts WHERE vid = 2") == [("Cyrus",)]
    assert [s for *_, s in api.requests].count(429) >= 5


def test_a_create_refused_with_409_is_held_with_the_existing_id(tmp_path, api):
    crm = sqlite3.connect(tmp_path / "systems" / "crm.db")
    crm.execute("INSERT INTO contact VALUES ('F', 'fay@example.com', 'Fay', 'Wu', NULL, 0, '2026-01-02 10:00:00')")
    crm.commit()
    crm.close()
    cfg = load_config(make(tmp_path, api, create="true", changes="{create: {max: 0}, update: {max_share: 1}}"))
    assert night(cfg, 1)["status"] == "awaiting_approval"  # the create of Fay waits
    # meanwhile someone adds Fay in the marketing tool: the create now meets HubSpot's unique email
    api_db = sqlite3.connect(tmp_path / "systems" / "marketing.db")
    api_db.execute("INSERT INTO contacts (vid, email, firstname) VALUES (77, 'Fay@Example.com', 'Fay')")
    api_db.commit()
    api_db.close()
    runner.approve(cfg, "contact", "r1", by="ops", targets=["marketing"])
    runner.load_changes(cfg, "contact", "r1", "marketing")
    runner.finish_run(cfg, "contact", "r1")
    held = wh(cfg, "SELECT status, reason, error FROM audit.changes WHERE run_id = 'r1' AND operation = 'create' "
                   "AND xid = (SELECT xid FROM identity.xref WHERE system = 'crm' AND record_key = 'F')")
    assert len(held) == 1 and held[0][0] == "held" and "record 77" in held[0][1] and "Existing ID: 77" in held[0][2]
    item = wh(cfg, "SELECT kind, system, details FROM review.items WHERE kind = 'link_candidate'")
    assert [(k, s, json.loads(d)["record_key"]) for k, s, d in item] == [("link_candidate", "marketing", "77")]
    item_id = wh(cfg, "SELECT item_id FROM review.items WHERE kind = 'link_candidate'")[0][0]
    fay = wh(cfg, "SELECT xid FROM identity.xref WHERE system = 'crm' AND record_key = 'F'")[0][0]
    decided = review.decide(cfg, "link", by="steward", reason="same person", item_id=item_id)
    assert [(d["action"], d["system"], d["record_key"], d["xid"]) for d in decided] == [("link", "marketing", "77", fay)]
    assert mkt(tmp_path, "SELECT count(*) FROM contacts WHERE email = 'fay@example.com'") == [(1,)]
    assert Counter(s for *_, s in api.requests)[409] == 2  # the batch, then the record alone: never again


@pytest.mark.slow
def test_a_load_killed_mid_way_resumes_exactly_once_against_the_api(tmp_path, api):
    add_renamed_kims(tmp_path)
    path = make(tmp_path, api, changes="{update: {max: 0}}", batch=1, pause=0.3)
    cfg = load_config(path)
    assert night(cfg, 1)["status"] == "awaiting_approval"
    expected = wh(cfg, "SELECT count(*) FROM audit.changes WHERE run_id = 'r1' AND target = 'marketing' "
                       "AND status = 'planned'")[0][0]
    assert expected == 14  # 12 new first names + Cy's + Eve's
    cmd = [sys.executable, "-m", "reconcile.cli", "approve", "--config", str(path), "--run", "r1",
           "--target", "marketing", "--by", "test"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[2] / "include"),
                                                        os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while len([w for w in api.writes if w[0] == "update"]) < 4 and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    written = len([w for w in api.writes if w[0] == "update"])
    assert 4 <= written < expected, "the load must have been interrupted mid-way"
    runner.load_changes(cfg, "contact", "r1", "marketing")
    runner.finish_run(cfg, "contact", "r1")
    # the server's own record: every record written once, none twice, Eve's too-long name never
    updates = Counter(k for op, k in api.writes if op == "update")
    assert set(updates.values()) == {1} and len(updates) == expected - 1
    assert mkt(tmp_path, "SELECT vid, count(*) FROM write_log GROUP BY vid HAVING count(*) <> 1") == []
    assert mkt(tmp_path, "SELECT count(*) FROM contacts WHERE firstname LIKE 'New%'") == [(12,)]
    assert wh(cfg, "SELECT status, count(*) FROM audit.changes WHERE run_id = 'r1' AND target = 'marketing' "
                   "AND operation = 'update' GROUP BY 1 ORDER BY 1") == [("applied", expected - 1), ("failed", 1)]


def test_a_run_killed_mid_create_is_finished_by_the_next_run_linked_and_ledgered(tmp_path, api):
    # SIGKILL lands while the create request is in flight: the API writes the contact, the run never records it.
    crm = sqlite3.connect(tmp_path / "systems" / "crm.db")
    crm.execute("INSERT INTO contact VALUES ('N1', 'nia@example.com', 'Nia', 'Long', NULL, 0, '2026-01-03 10:00:00')")
    crm.commit()
    crm.close()
    path = make(tmp_path, api, create="true")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[2] / "include"),
                                                        os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-m", "reconcile.cli", "run", "--config", str(path), "--run-id", "k1"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def kill() -> None:
        proc.send_signal(signal.SIGKILL)
        proc.wait()

    api.before("POST", "/batch/create", kill)
    assert proc.wait(timeout=300) == -signal.SIGKILL, "the run must have been killed at its create"
    assert mkt(tmp_path, "SELECT count(*) FROM contacts WHERE email = 'nia@example.com'") == [(1,)]
    cfg = load_config(path)

    s2 = runner.run_entity(cfg, "contact", run_id="k2")  # a plain run: finishes k1 first

    assert [r["run_id"] for r in s2["recovered"]] == ["k1"]
    (change_id, key, status, error), = wh(cfg, "SELECT change_id, record_key, status, error FROM audit.changes "
                                               "WHERE run_id = 'k1' AND operation = 'create' "
                                               "AND after_raw LIKE '%nia@example.com%'")
    assert (status, error) == ("applied", "verified after an interrupted load")
    assert wh(cfg, f"SELECT rule FROM identity.xref WHERE system = 'marketing' AND record_key = '{key}'") == [
        ("created",)]
    assert wh(cfg, f"SELECT count(*) FROM audit.write_ledger WHERE change_id = '{change_id}'")[0][0] > 0
    # created once, never again by k2
    assert mkt(tmp_path, "SELECT count(*) FROM contacts WHERE email = 'nia@example.com'") == [(1,)]
    assert wh(cfg, "SELECT count(*) FROM audit.changes WHERE run_id = 'k2' AND operation = 'create' "
                   "AND status = 'applied'") == [(0,)]
