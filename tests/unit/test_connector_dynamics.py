"""The Dynamics (Dataverse Web API) connector against the Dataverse-like server on 127.0.0.1
(reconcile.demo.dynamics_server): OData paging, incremental $filter, 429 with Retry-After, PATCH with
If-Match (412 = skipped_conflict), creates, and a whole run loading into it."""
from __future__ import annotations

import json
import sqlite3
import uuid
from datetime import datetime
from pathlib import Path

import duckdb
import pytest

from reconcile import runner
from reconcile.config import load_config
from reconcile.config.models import ApiLimits, SourceConfig
from reconcile.config.resolve import with_token
from reconcile.connectors import WriteOp
from reconcile.connectors.dynamics import DynamicsConnector
from reconcile.demo.dynamics_server import API, DynamicsServer, EntitySet

TOKEN = "eyJ0eXAiOiJKV1QiLCJhbGciOi.dataverse-test"
DDL = """CREATE TABLE contact (contactid TEXT PRIMARY KEY, emailaddress1 TEXT, firstname TEXT,
    lastname TEXT CHECK (lastname IS NULL OR length(lastname) <= 10), statecode INTEGER DEFAULT 0,
    modifiedon TEXT, createdon TEXT)"""
IDS = [str(uuid.UUID(int=i + 1)) for i in range(23)]
SOURCE = SourceConfig(table="contacts", key="contactid", modified_at="modifiedon",
                      fields={"email": "emailaddress1", "first_name": "firstname"})
COLUMNS = ["contactid", "modifiedon", "emailaddress1", "firstname"]


def seed(path: Path) -> Path:
    con = sqlite3.connect(path)
    con.execute(DDL)
    con.executemany("INSERT INTO contact (contactid, emailaddress1, firstname, lastname, modifiedon) VALUES (?, ?, ?, ?, ?)",
                    [(k, f"p{i}@example.com", f"Name{i}", "Doe", f"2026-01-{1 + i:02d}T10:00:00Z")
                     for i, k in enumerate(IDS)])
    con.commit()
    con.close()
    return path


def sql(path: Path, query: str, args=()) -> list[tuple]:
    con = sqlite3.connect(path)
    try:
        out = con.execute(query, args).fetchall()
        con.commit()
        return out
    finally:
        con.close()


@pytest.fixture
def server(tmp_path):
    db = seed(tmp_path / "crm.db")
    with DynamicsServer(db, TOKEN, [EntitySet("contacts", "contact", "contactid")], retry_after=0) as srv:
        srv.db_path = db
        yield srv


def dynamics(srv, **limits) -> DynamicsConnector:
    return DynamicsConnector("crm", with_token(srv.url + API, TOKEN),
                             ApiLimits(**{"page_size": 5, "max_wait_seconds": 0.5, **limits}))


def read_all(conn, since=None) -> list[dict]:
    return [r for t in conn.read_batches(SOURCE, COLUMNS, since, 4) for r in t.to_pylist()]


def test_full_and_incremental_reads_follow_the_next_link(server):
    conn = dynamics(server)
    got = read_all(conn)
    assert [r["contactid"] for r in got] == IDS and got[0]["firstname"] == "Name0"
    assert len([p for m, p, s in server.requests if m == "GET" and "/contacts?" in p]) == 5  # 5+5+5+5+3
    since = read_all(conn, datetime(2026, 1, 15, 10))
    assert [r["contactid"] for r in since] == IDS[14:]
    assert any("%24filter=modifiedon+ge+2026-01-15T10%3A00%3A00Z" in p or "modifiedon%20ge" in p
               for _, p, _ in server.requests)
    assert "firstname" in conn.columns(SOURCE)


def test_429_with_retry_after_is_honoured(server):
    server.inject(429, times=3, headers={"Retry-After": "0"})
    server.rate_limit = (3, 0.2)
    conn = dynamics(server)
    assert len(read_all(conn)) == 23
    assert conn.api.retries >= 3


def test_patch_carries_if_match_and_a_412_is_a_skipped_conflict(server):
    w = dynamics(server).writer(SOURCE)
    k0, k1 = IDS[0], IDS[1]
    # someone edits record 1 in Dynamics after our read, before our PATCH: its ETag no longer matches
    server.before("PATCH", f"({k1})", lambda: sql(server.db_path, "UPDATE contact SET lastname = 'Edited' "
                                                                  "WHERE contactid = ?", [k1]))
    out = w.apply([WriteOp("a", "update", k0, {"firstname": "Ann"}, {"modifiedon": "2026-01-01T10:00:00Z"}),
                   WriteOp("b", "update", k1, {"firstname": "Bob"}, {"modifiedon": "2026-01-02T10:00:00Z"}),
                   WriteOp("c", "update", IDS[2], {"lastname": "Far-Too-Long-Surname"}, {}),
                   WriteOp("d", "update", IDS[3], {"firstname": "Dee"}, {"modifiedon": "2025-01-01T00:00:00Z"})])
    assert [o.status for o in out] == ["applied", "skipped_conflict", "failed", "skipped_conflict"]
    assert "412 Precondition Failed" in out[1].error and "CHECK constraint failed" in out[2].error
    assert out[0].before == {"firstname": "Name0"}
    assert sql(server.db_path, "SELECT firstname, lastname FROM contact WHERE contactid IN (?, ?) ORDER BY contactid",
               [k0, k1]) == [("Ann", "Doe"), ("Name1", "Edited")]
    patches = [p for m, p, s in server.requests if m == "PATCH"]
    assert [s for m, p, s in server.requests if m == "PATCH"] == [204, 412, 400]  # d never sent
    assert len(patches) == 3


def test_create_find_and_delete(server):
    w = dynamics(server).writer(SOURCE)
    out = w.apply([WriteOp("n", "create", None, {"emailaddress1": "o'neil@example.com", "firstname": "Pat"})])
    assert out[0].status == "applied" and w.find({"emailaddress1": "o'neil@example.com"}) == out[0].key
    assert w.apply([WriteOp("d", "delete", out[0].key, {}, {})])[0].status == "applied"
    assert w.find({"emailaddress1": "o'neil@example.com"}) is None


CONFIG = """\
version: 1
warehouse: warehouse/reconcile.duckdb
load: {{mode: apply}}
systems:
  crm:
    api: dynamics
    base_url: {base_url}
    token_env: RT_DATAVERSE_TOKEN
    creates_identity: true
  erp: {{url: "sqlite:///erp.db"}}
entities:
  contact:
    sources:
      crm:
        table: contacts
        key: contactid
        modified_at: modifiedon
        fields:
          email: {{column: emailaddress1, transform: email}}
          last_name: lastname
      erp:
        table: customer
        key: id
        fields:
          email: {{column: email, transform: email}}
          last_name: last_name
    fields:
      email: {{owner: crm}}
      last_name: {{owner: erp, send_to: [crm]}}
    match:
      - {{name: email, fields: [email]}}
    gates:
      changes: {{update: {{max_share: 1}}}}
"""


def test_a_run_loads_into_dynamics_through_the_writer(tmp_path, server, monkeypatch):
    sql(tmp_path / "erp.db", "CREATE TABLE customer (id TEXT, email TEXT, last_name TEXT)")
    sql(tmp_path / "erp.db", "INSERT INTO customer VALUES ('E1', 'P0@example.com', 'Smith'), "
                             "('E2', 'p1@example.com', 'Jones')")
    monkeypatch.setenv("RT_DATAVERSE_TOKEN", TOKEN)
    (tmp_path / "reconcile.yaml").write_text(CONFIG.format(base_url=server.url + API))
    cfg = load_config(tmp_path / "reconcile.yaml")
    s = runner.run_entity(cfg, "contact", run_id="r1", run_at=datetime(2026, 2, 1, 2))
    assert s["changes"]["crm"]["applied"] == 2
    assert sql(server.db_path, "SELECT lastname FROM contact WHERE contactid IN (?, ?) ORDER BY contactid",
               IDS[:2]) == [("Smith",), ("Jones",)]
    con = duckdb.connect(str(cfg.warehouse_path), read_only=True)
    before = con.execute("SELECT DISTINCT before_image FROM audit.changes WHERE status = 'applied'").fetchall()
    con.close()
    assert [json.loads(b[0]) for b in before] == [{"lastname": "Doe"}]
    assert sorted(k for op, k in server.writes) == IDS[:2]
