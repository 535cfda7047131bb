"""Plan and gated load on small SQLite systems: ownership, no ping-pong, thresholds, dry run, exactly-once
loads that survive a kill, per-row failures, rollback."""
from __future__ import annotations

import hashlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import duckdb
import pytest

from reconcile import runner
from reconcile.config import load_config
from reconcile.runstore import RunFolder

from ..conftest import write_sqlite

CONFIG = """\
version: 1
warehouse: warehouse/reconcile.duckdb
load: {{mode: apply, batch_size: {batch}, pause_seconds: {pause}}}
systems:
  crm: {{url: "sqlite:///systems/crm.db", creates_identity: true}}
  marketing:
{marketing}    unique: [email]
    writes: {{create: {create}}}
entities:
  contact:
    sources:
      crm:
        table: contact
        key: contactid
        modified_at: modifiedon
        fields:
          email: {{column: emailaddress1, transform: email}}
          first_name: firstname
          last_name: lastname
          phone: {{column: telephone1, transform: phone}}
          active: {{column: statecode, transform: {{map: {{"0": true, "1": false}}}}}}
      marketing:
        table: contacts
        key: {marketing_key}
        modified_at: updated_at
        fields:
          email: {{column: email, transform: email}}
          first_name: firstname
          last_name: lastname
          phone: {{column: phone, transform: phone}}
    fields:
      email: {{owner: crm}}
      first_name: {{owner: crm, send_to: [marketing]}}
      last_name: {{owner: crm, send_to: [marketing]}}
      phone: {{owner: marketing, fallback: [crm], send_to: [crm]}}
      active: {{owner: crm, type: boolean}}
    eligibility:
      marketing: "email is not null and active"
    match:
      - {{name: email, fields: [email]}}
    gates:
      changes: {changes}
"""

CRM_DDL = """CREATE TABLE contact (contactid TEXT PRIMARY KEY, emailaddress1 TEXT, firstname TEXT, lastname TEXT,
    telephone1 TEXT, statecode INTEGER NOT NULL DEFAULT 0, modifiedon TEXT DEFAULT (datetime('now')));
CREATE TRIGGER contact_touch AFTER UPDATE ON contact WHEN NEW.modifiedon IS OLD.modifiedon
BEGIN UPDATE contact SET modifiedon = strftime('%Y-%m-%d %H:%M:%f', 'now') WHERE contactid = NEW.contactid; END;"""
MKT_DDL = """CREATE TABLE contacts (vid INTEGER PRIMARY KEY, email TEXT UNIQUE COLLATE NOCASE,
    firstname TEXT CHECK (firstname IS NULL OR length(firstname) <= 12), lastname TEXT, phone TEXT,
    updated_at TEXT DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')));
CREATE TRIGGER contacts_touch AFTER UPDATE ON contacts WHEN NEW.updated_at IS OLD.updated_at
BEGIN UPDATE contacts SET updated_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now') WHERE vid = NEW.vid; END;
CREATE TABLE write_log (vid INTEGER, firstname TEXT);
CREATE TRIGGER contacts_log AFTER UPDATE OF firstname ON contacts BEGIN INSERT INTO write_log VALUES (NEW.vid, NEW.firstname); END;"""

# The seed-000 scenario: two CRM contacts (two people) share one email; marketing has one contact for it.
CRM_ROWS = [
    ("A", "info@shared.example", "Maria", "Schmidt", "4155550101", 0, "2026-01-01 10:00:00"),
    ("B", "info@shared.example", "Tom", "Becker", "4155550102", 0, "2026-01-01 11:00:00"),
    ("C", "cy@example.com", "Cyrus", "Vance", None, 0, "2026-01-02 10:00:00"),
    ("D", "dee@example.com", "Dee", "Ng", "4155550104", 1, "2026-01-02 10:00:00"),   # inactive: not eligible
    ("E", "eve@example.com", "Evangelina-Maria", "Ortiz", None, 0, "2026-01-02 10:00:00"),
]
MKT_ROWS = [
    (1, "info@shared.example", "Maria", "Schmidt", "+1 415 555 0199", "2026-01-01T09:00:00Z"),
    (2, "cy@example.com", "Cy", "Vance", "(415) 555-0103", "2026-01-01T09:00:00Z"),
    (3, "eve@example.com", "Eve", "Ortiz", None, "2026-01-01T09:00:00Z"),
]


GENEROUS = "{create: {max_share: 1}, update: {max_share: 1}}"  # tiny tables: any change is over 10%
SQLITE_MARKETING = {"url": "sqlite:///systems/marketing.db"}


def write_systems(root: Path) -> None:
    """root/systems/crm.db and marketing.db with CRM_ROWS and MKT_ROWS."""
    for name, ddl, table, rows in (("crm", CRM_DDL, "contact", CRM_ROWS), ("marketing", MKT_DDL, "contacts", MKT_ROWS)):
        path = root / "systems" / f"{name}.db"
        path.parent.mkdir(parents=True, exist_ok=True)
        con = sqlite3.connect(path)
        con.executescript(ddl)
        con.executemany(f"INSERT INTO {table} VALUES ({','.join('?' * len(rows[0]))})", rows)
        con.commit()
        con.close()


def write_load_config(root: Path, create="false", changes=GENEROUS, batch=200, pause=0, marketing=SQLITE_MARKETING,
                      marketing_key="vid") -> Path:
    """CONFIG as root/reconcile.yaml; `marketing` says how marketing is reached (its system keys and values),
    `marketing_key` is its record key."""
    reach = "".join(f"    {key}: {value}\n" for key, value in marketing.items())
    (root / "reconcile.yaml").write_text(CONFIG.format(marketing=reach, marketing_key=marketing_key, create=create,
                                                       changes=changes, batch=batch, pause=pause))
    return root / "reconcile.yaml"


def make(tmp_path: Path, create="false", changes=GENEROUS, batch=200, pause=0) -> Path:
    write_systems(tmp_path)
    return write_load_config(tmp_path, create, changes, batch, pause)


def table(path: Path, sql: str) -> list[tuple]:
    con = sqlite3.connect(path)
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


def checksum(root: Path) -> str:
    h = hashlib.sha256()
    for name, t in (("crm", "contact"), ("marketing", "contacts")):
        h.update(repr(table(root / "systems" / f"{name}.db", f"SELECT * FROM {t} ORDER BY 1")).encode())
    return h.hexdigest()


def wh(cfg, sql: str, params=()) -> list[tuple]:
    con = duckdb.connect(str(cfg.warehouse_path), read_only=True)
    try:
        return con.execute(sql, params).fetchall()
    finally:
        con.close()


def night(cfg, n: int, **kw) -> dict:
    return runner.run_entity(cfg, "contact", run_id=f"r{n}", run_at=datetime(2026, 2, n, 2), **kw)


def test_seed_000_bidirectional_sync_never_homogenizes(tmp_path):
    cfg = load_config(make(tmp_path))
    s1 = night(cfg, 1)
    s2 = night(cfg, 2)
    crm = dict((r[0], r[1:]) for r in table(tmp_path / "systems" / "crm.db",
                                            "SELECT contactid, firstname, lastname, telephone1 FROM contact"))
    mkt = dict((r[0], r[1:]) for r in table(tmp_path / "systems" / "marketing.db",
                                            "SELECT vid, firstname, lastname, phone FROM contacts"))
    # neither CRM contact holds the other's (or the marketing contact's) data
    assert crm["A"] == ("Maria", "Schmidt", "4155550101") and crm["B"] == ("Tom", "Becker", "4155550102")
    # the shared marketing contact is left alone, so it cannot flap between them
    assert mkt[1] == ("Maria", "Schmidt", "+1 415 555 0199")
    assert table(tmp_path / "systems" / "marketing.db", "SELECT count(*) FROM write_log WHERE vid = 1") == [(0,)]
    # ... and the collision waits in review, with both sides
    items = wh(cfg, "SELECT details FROM review.items WHERE kind = 'collision' AND status = 'open'")
    assert len(items) == 1 and {s["first_name"] for s in json.loads(items[0][0])["sides"]} == {"Maria", "Tom"}
    # names flow CRM -> marketing, the phone marketing -> CRM, for the linked pair C <-> 2
    assert mkt[2][:2] == ("Cyrus", "Vance") and crm["C"][2] == "+14155550103"
    assert s1["changes"]["marketing"]["applied"] == 1 and s1["changes"]["crm"]["applied"] == 1
    assert s2["changes"] == {} or all(c["applied"] == 0 for c in s2["changes"].values())


def test_convergence_second_run_plans_nothing(tmp_path):
    cfg = load_config(make(tmp_path))
    night(cfg, 1)
    s2 = night(cfg, 2)
    assert wh(cfg, "SELECT count(*) FROM audit.changes WHERE run_id = 'r2' AND status IN ('planned', 'applied')") == [(0,)]
    # Eve's name fails marketing's CHECK constraint again, as every night: incomplete, but no news, no alert;
    # the shared mailbox stays held for review (standing since night 1, so not `blocked`)
    assert s2["status"] == "incomplete" and s2["alert"] is None
    assert s2["failures"]["marketing"][0]["count"] == 1 and "CHECK constraint" in s2["reasons"][0]
    assert s2["holds_new"] == {} and s2["holds_standing"] == {"marketing": 2}


def test_no_write_ever_goes_into_an_owned_field_and_eligibility_is_honoured(tmp_path):
    cfg = load_config(make(tmp_path, create="true"))
    night(cfg, 1)
    rows = wh(cfg, "SELECT target, operation, field, record_key, xid, status FROM audit.changes WHERE run_id = 'r1'")
    owners = {"email": "crm", "first_name": "crm", "last_name": "crm", "phone": "marketing", "active": "crm"}
    for target, op, field, *_ in rows:
        if op == "update":
            assert owners[field] != target, f"wrote {field} into its owner {target}"
            assert field in {"first_name", "last_name"} if target == "marketing" else field == "phone"
    d_xid = wh(cfg, "SELECT xid FROM identity.xref WHERE system = 'crm' AND record_key = 'D'")[0][0]
    assert not [r for r in rows if r[4] == d_xid and r[0] == "marketing"]  # inactive: not eligible
    creates = [r for r in rows if r[1] == "create"]
    assert [(c[0], c[5]) for c in creates] == [("marketing", "held"), ("marketing", "held")]  # A and B: one email


def test_threshold_triggers_approval_and_rejection_writes_nothing(tmp_path):
    cfg = load_config(make(tmp_path, changes="{update: {max: 0}}"))
    before = checksum(tmp_path)
    s = night(cfg, 1)
    assert s["status"] == "awaiting_approval"
    assert checksum(tmp_path) == before
    assert wh(cfg, "SELECT target, required, reasons FROM audit.approvals WHERE run_id = 'r1' ORDER BY 1") == [
        ("crm", True, '["1 updates > max 0"]'), ("marketing", True, '["2 updates > max 0"]')]
    runner.approve(cfg, "contact", "r1", by="ops", reject=True)
    assert runner.finish_run(cfg, "contact", "r1")["status"] == "blocked"
    assert checksum(tmp_path) == before
    assert wh(cfg, "SELECT DISTINCT status FROM audit.changes WHERE run_id = 'r1' AND operation = 'update'") == [("rejected",)]


def test_approval_then_load(tmp_path):
    cfg = load_config(make(tmp_path, changes="{update: {max: 0}}"))
    night(cfg, 1)
    assert runner.approve(cfg, "contact", "r1", by="ops", targets=["marketing"]) == ["marketing"]
    runner.load_changes(cfg, "contact", "r1", "marketing")
    s = runner.finish_run(cfg, "contact", "r1")
    # Cy's name applied; Eve's fails marketing's CHECK constraint; nothing into crm yet
    assert (s["changes"]["marketing"]["applied"], s["changes"]["marketing"]["failed"]) == (1, 1)
    assert s["changes"]["crm"]["applied"] == 0
    assert s["status"] == "incomplete"  # Eve's failed write; and crm still waits
    assert any("the load into crm waits for approval" in r for r in s["reasons"])


def test_dry_run_writes_nothing(tmp_path):
    cfg = load_config(make(tmp_path, create="true"))
    before = checksum(tmp_path)
    s = night(cfg, 1, dry_run=True)
    assert s["status"] == "dry_run"
    assert checksum(tmp_path) == before
    assert wh(cfg, "SELECT count(*) FROM audit.changes WHERE run_id = 'r1' AND status = 'dry_run'")[0][0] >= 3


def test_a_per_row_constraint_failure_leaves_the_rest_applied(tmp_path):
    cfg = load_config(make(tmp_path))
    s = night(cfg, 1)
    # E's first name is too long for marketing's CHECK constraint: that change fails alone
    failed = wh(cfg, "SELECT record_key, field, error FROM audit.changes WHERE run_id = 'r1' AND status = 'failed'")
    assert [(k, f) for k, f, _ in failed] == [("3", "first_name")]
    assert "CHECK constraint failed" in failed[0][2]
    assert s["changes"]["marketing"]["failed"] == 1 and s["changes"]["marketing"]["applied"] == 1
    assert table(tmp_path / "systems" / "marketing.db", "SELECT firstname FROM contacts WHERE vid IN (2, 3) ORDER BY vid") == [
        ("Cyrus",), ("Eve",)]


def test_rollback_restores_the_before_state(tmp_path):
    cfg = load_config(make(tmp_path))
    before = checksum(tmp_path)
    night(cfg, 1)
    assert checksum(tmp_path) != before
    out = runner.rollback(cfg, "contact", "r1")
    assert sum(r["restored"] for r in out) == 2
    after = {r[0]: r[1:] for r in table(tmp_path / "systems" / "marketing.db", "SELECT vid, firstname, lastname FROM contacts")}
    assert after[2] == ("Cy", "Vance")
    assert table(tmp_path / "systems" / "crm.db", "SELECT telephone1 FROM contact WHERE contactid = 'C'") == [(None,)]
    assert wh(cfg, "SELECT DISTINCT status FROM audit.changes WHERE run_id = 'r1' AND status <> 'failed' "
                   "AND status <> 'held'") == [("rolled_back",)]


def test_rollback_skips_values_edited_since(tmp_path):
    cfg = load_config(make(tmp_path))
    night(cfg, 1)
    con = sqlite3.connect(tmp_path / "systems" / "marketing.db")
    con.execute("UPDATE contacts SET firstname = 'Cyrus J' WHERE vid = 2")
    con.commit()
    con.close()
    out = {r["target"]: r for r in runner.rollback(cfg, "contact", "r1")}
    assert out["marketing"]["restored"] == 0 and out["marketing"]["skipped"][0]["record_key"] == "2"
    assert table(tmp_path / "systems" / "marketing.db", "SELECT firstname FROM contacts WHERE vid = 2") == [("Cyrus J",)]


def add_renamed_kims(root, n: int = 12) -> None:
    """n people in both systems whose CRM first name (New<i>) differs from marketing's (Old<i>): n updates for
    the marketing load (twelve are enough for several batches of a few)."""
    crm = sqlite3.connect(root / "systems" / "crm.db")
    crm.executemany("INSERT INTO contact VALUES (?, ?, ?, 'Kim', NULL, 0, '2026-01-03 10:00:00')",
                    [(f"K{i:03d}", f"k{i}@example.com", f"New{i}") for i in range(n)])
    crm.commit()
    crm.close()
    mkt = sqlite3.connect(root / "systems" / "marketing.db")
    mkt.executemany("INSERT INTO contacts (vid, email, firstname, lastname) VALUES (?, ?, ?, 'Kim')",
                    [(100 + i, f"k{i}@example.com", f"Old{i}") for i in range(n)])
    mkt.commit()
    mkt.close()


def test_a_load_killed_mid_way_resumes_and_applies_every_change_exactly_once(tmp_path):
    path = make(tmp_path, changes="{update: {max: 0}}", batch=1, pause=0.3)
    add_renamed_kims(tmp_path)
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
    log = tmp_path / "systems" / "marketing.db"
    deadline = time.monotonic() + 60
    while table(log, "SELECT count(*) FROM write_log")[0][0] < 4 and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    written = table(log, "SELECT count(*) FROM write_log")[0][0]
    assert 4 <= written < expected, "the load must have been interrupted mid-way"
    # re-run the load: it verifies the interrupted change and applies exactly the remaining ones
    runner.load_changes(cfg, "contact", "r1", "marketing")
    runner.finish_run(cfg, "contact", "r1")  # publishes what the load recorded
    assert table(log, "SELECT vid, count(*) FROM write_log GROUP BY vid HAVING count(*) <> 1") == []
    assert table(log, "SELECT count(*) FROM write_log")[0][0] == expected - 1  # E's name fails its CHECK
    assert wh(cfg, "SELECT status, count(*) FROM audit.changes WHERE run_id = 'r1' AND target = 'marketing' "
                   "AND operation = 'update' GROUP BY 1 ORDER BY 1") == [("applied", expected - 1), ("failed", 1)]


def test_a_sql_target_is_loaded_in_batches_of_2000_unless_load_batch_size_says_otherwise(tmp_path):
    """A batch is one target transaction and one intent and one outcome in the journal: into SQL, 2,000 records
    unless `load.batch_size` is set."""
    intents = {}
    for size in (None, 200):
        root = tmp_path / str(size)
        path = make(root, batch=size or 200)
        if size is None:
            path.write_text(path.read_text().replace(" batch_size: 200,", ""))
        add_renamed_kims(root, 450)
        cfg = load_config(path)
        assert cfg.load.batch_size == size
        night(cfg, 1)
        assert wh(cfg, "SELECT status, count(*) FROM audit.changes WHERE run_id = 'r1' AND target = 'marketing' "
                       "GROUP BY 1 ORDER BY 1") == [("applied", 451), ("failed", 1)]  # + Cy's; Eve's: CHECK
        assert table(root / "systems" / "marketing.db", "SELECT count(*) FROM contacts WHERE firstname LIKE 'New%'") \
            == [(450,)]
        load = RunFolder(cfg, "r1", "contact").sub("load/marketing")
        journal = load.sub(load.read_json("current.json")["export"])
        intents[size] = sorted(n for n in journal.names() if n.startswith("intent-"))
        assert [journal.read_json(n)["batch_size"] for n in intents[size]] == [size or 2000] * len(intents[size])
    assert intents == {None: ["intent-000001.json"],
                       200: ["intent-000001.json", "intent-000002.json", "intent-000003.json"]}


def test_an_erasure_is_carried_out_in_every_system_through_the_gates(tmp_path):
    from reconcile.cli import main

    path = make(tmp_path)
    cfg = load_config(path)
    night(cfg, 1)
    assert main(["erase", "--config", str(path), "--email", "cy@example.com", "--reason", "DSAR 42",
                 "--by", "privacy"]) == 0
    s2 = night(cfg, 2)  # erasures are bounded in number (default 50), not by a share of the table
    erased = wh(cfg, "SELECT target, record_key, status FROM audit.changes WHERE run_id = 'r2' AND operation = 'erase' "
                     "ORDER BY 1")
    assert erased == [("crm", "C", "applied"), ("marketing", "2", "applied")]
    # anonymised (the default): every mapped column but the key is blanked
    assert table(tmp_path / "systems" / "crm.db", "SELECT emailaddress1, firstname, telephone1 FROM contact "
                                                  "WHERE contactid = 'C'") == [(None, None, None)]
    assert table(tmp_path / "systems" / "marketing.db", "SELECT email, firstname FROM contacts WHERE vid = 2") == [
        (None, None)]
    # the warehouse keeps no value of the person: staging (and its history), lineage, planned changes
    leaks = wh(cfg, """SELECT count(*) FROM (
        SELECT email FROM staging.crm__contact_history WHERE _record_key = 'C' AND (email IS NOT NULL OR
               first_name IS NOT NULL OR _raw_firstname IS NOT NULL)
        UNION ALL SELECT email FROM staging.marketing__contact WHERE _record_key = '2' AND email IS NOT NULL
        UNION ALL SELECT value FROM golden.contact_lineage l JOIN identity.xref x USING (xid)
                  WHERE x.record_key = 'C' AND l.value IS NOT NULL
        UNION ALL SELECT after_value FROM audit.changes WHERE record_key IN ('C', '2') AND after_value IS NOT NULL)""")
    assert leaks == [(0,)]
    s3 = night(cfg, 3)  # done once: never planned again, and the person does not come back
    assert wh(cfg, "SELECT count(*) FROM audit.changes WHERE run_id = 'r3' AND xid = "
                   "(SELECT xid FROM identity.xref WHERE system = 'crm' AND record_key = 'C')") == [(0,)]
    assert s2["changes"]["crm"]["applied"] >= 1 and s3["golden"]["records"] == s2["golden"]["records"]


def test_a_failed_error_gate_blocks_creates_built_from_the_failing_system(tmp_path):
    path = make(tmp_path, create="true")
    text = path.read_text().replace("    gates:\n", "    gates:\n      systems:\n        crm: {volume: {min_rows: 100}}\n")
    path.write_text(text)
    con = sqlite3.connect(tmp_path / "systems" / "crm.db")  # a CRM contact marketing does not have yet
    con.execute("INSERT INTO contact VALUES ('F', 'fay@example.com', 'Fay', 'Wu', NULL, 0, '2026-01-02 10:00:00')")
    con.commit()
    con.close()
    cfg = load_config(path)
    before = checksum(tmp_path)
    s = night(cfg, 1)
    assert ("crm", "volume") in {(f["system"], f["expectation"]) for f in s["gates"]["failures"]}
    statuses = wh(cfg, "SELECT target, operation, status FROM audit.changes WHERE run_id = 'r1' "
                       "AND status NOT IN ('held') GROUP BY ALL ORDER BY ALL")
    assert statuses and all(st == "blocked" for _, _, st in statuses), statuses
    assert ("marketing", "create", "blocked") in statuses
    assert checksum(tmp_path) == before and s["status"] == "blocked"


def test_a_user_edit_after_our_write_is_not_taken_for_an_echo(tmp_path):
    cfg = load_config(make(tmp_path))
    night(cfg, 1)  # writes C's phone into the CRM
    con = sqlite3.connect(tmp_path / "systems" / "crm.db")
    con.execute("UPDATE contact SET lastname = 'Vance-Ross' WHERE contactid = 'C'")  # a person edits C as well
    con.commit()
    con.close()
    night(cfg, 2)
    assert wh(cfg, "SELECT _record_key, _change FROM staging.crm__contact_history WHERE _run_id = 'r2' "
                   "ORDER BY 1") == [("C", "update")]
    night(cfg, 3)
    m = sqlite3.connect(tmp_path / "systems" / "marketing.db")
    assert m.execute("SELECT lastname FROM contacts WHERE vid = 2").fetchone() == ("Vance-Ross",)
    m.close()
