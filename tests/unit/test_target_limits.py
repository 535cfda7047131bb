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
