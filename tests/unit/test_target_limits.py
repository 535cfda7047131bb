"""What may go out into a target: thresholds for every write kind (links included), and the target's limits
(maximum lengths, control / bidi / zero-width characters) checked before anything is sent."""
from __future__ import annotations

import sqlite3
from datetime import datetime
from pathlib import Path

import duckdb

from reconcile import runner
from reconcile.config import load_config

from ..conftest import write_sqlite


def wh(cfg, sql: str, params=()) -> list[tuple]:
    con = duckdb.connect(str(cfg.warehouse_path), read_only=True)
    try:
        return con.execute(sql, params).fetchall()
    finally:
        con.close()


def rows(path: Path, sql: str) -> list[tuple]:
    con = sqlite3.connect(path)
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


LINK_CONFIG = """\
version: 1
warehouse: warehouse/reconcile.duckdb
load: {mode: apply}
systems:
  crm: {url: "sqlite:///systems/crm.db", creates_identity: true, xid_column: reconcile_xid}
entities:
  contact:
    sources:
      crm:
        table: contact
        key: contactid
        modified_at: modifiedon
        fields:
          email: {column: emailaddress1, transform: email}
    fields:
      email: {owner: crm}
"""


def test_a_first_night_that_links_a_whole_system_waits_for_approval(tmp_path):
    db = tmp_path / "systems" / "crm.db"
    write_sqlite(db, "CREATE TABLE contact (contactid TEXT PRIMARY KEY, emailaddress1 TEXT, reconcile_xid TEXT, "
                     "modifiedon TEXT)", "contact",
                 [(f"c{i}", f"p{i}@example.com", None, "2026-01-01 10:00:00") for i in range(10)])
    (tmp_path / "reconcile.yaml").write_text(LINK_CONFIG)
    cfg = load_config(tmp_path / "reconcile.yaml")
    s = runner.run_entity(cfg, "contact", run_id="r1", run_at=datetime(2026, 2, 1))
    assert s["status"] == "awaiting_approval"
    assert wh(cfg, "SELECT target, required, reasons FROM audit.approvals WHERE run_id = 'r1'") == [
        ("crm", True, '["10 links > 20% of 10 records"]')]
    assert rows(db, "SELECT count(*) FROM contact WHERE reconcile_xid IS NOT NULL") == [(0,)]
    runner.decide_load(cfg, "contact", "r1", by="ana")
    assert rows(db, "SELECT count(*) FROM contact WHERE reconcile_xid IS NOT NULL") == [(10,)]


LIMITS_CONFIG = """\
version: 1
warehouse: warehouse/reconcile.duckdb
load: {mode: apply}
systems:
  crm: {url: "sqlite:///systems/crm.db", creates_identity: true}
  marketing:
    url: sqlite:///systems/marketing.db
    writes: {create: true, limits: {max_length: 65535}}
entities:
  contact:
    sources:
      crm:
        table: contact
        key: contactid
        fields: {email: {column: email, transform: email}, first_name: firstname, last_name: lastname}
      marketing:
        table: contacts
        key: vid
        fields: {email: {column: email, transform: email}, first_name: firstname, last_name: lastname}
    fields:
      email: {owner: crm}
      first_name: {owner: crm, send_to: [marketing]}
      last_name: {owner: crm, send_to: [marketing]}
    match:
      - {name: email, fields: [email]}
    gates:
      changes: {create: {max_share: 1}, update: {max_share: 1}}
"""


def test_values_over_the_targets_limits_are_held_with_their_reason_and_never_sent(tmp_path):
    crm, mkt = tmp_path / "systems" / "crm.db", tmp_path / "systems" / "marketing.db"
    write_sqlite(crm, "CREATE TABLE contact (contactid TEXT PRIMARY KEY, email TEXT, firstname TEXT, lastname TEXT)",
                 "contact", [("A", "ann@example.com", "x" * 1_000_000, "Anders"),       # a 1 MB value
                             ("B", "bo@example.com", "Bo\u202egnimrA", "Berg"),           # a bidi override
                             ("C", "cy@example.com", "Cyrus", "Vance"),                   # clean
                             ("D", "dee@example.com", "Dee", "Ng" * 25)])                 # over VARCHAR(40)
    write_sqlite(mkt, "CREATE TABLE contacts (vid INTEGER PRIMARY KEY, email TEXT, firstname TEXT, "
                      "lastname VARCHAR(40))", "contacts",
                 [(1, "bo@example.com", "Bo", "Berg"), (2, "cy@example.com", "Cy", "Vance")])
    (tmp_path / "reconcile.yaml").write_text(LIMITS_CONFIG)
    cfg = load_config(tmp_path / "reconcile.yaml")
    runner.run_entity(cfg, "contact", run_id="r1", run_at=datetime(2026, 2, 1))
    got = {(key or "new:" + email, op, st): why for key, email, op, st, why in wh(cfg, """
        SELECT c.record_key, g.email, c.operation, c.status, c.reason FROM audit.changes c
        JOIN golden.contact g USING (xid) WHERE c.target = 'marketing'""")}
    assert got[("new:ann@example.com", "create", "held")] == (
        "over the target's limits: value for firstname has 1000000 characters, more than 65535 "
        "(systems.marketing.writes.limits)")
    assert got[("1", "update", "held")] == ("over the target's limits: value for firstname holds U+202E, a bidi "
                                            "control character (systems.marketing.writes.limits)")
    assert got[("new:dee@example.com", "create", "held")] == (
        "over the target's limits: value for lastname has 50 characters, more than 40 "
        "(systems.marketing.writes.limits)")
    assert ("2", "update", "applied") in got
    assert rows(mkt, "SELECT vid, email, firstname, length(lastname) FROM contacts ORDER BY 1") == [
        (1, "bo@example.com", "Bo", 4), (2, "cy@example.com", "Cyrus", 5)]
    assert wh(cfg, "SELECT column_name, max_length FROM audit.column_limits WHERE system = 'marketing'") == [
        ("lastname", 40)]
