"""The HubSpot connector against the HubSpot-like server on 127.0.0.1 (reconcile.demo.hubspot_server), with
faults injected: paging, the search cap, 429 storms, 5xx, 207 partial batches, 409 on create, masking."""
from __future__ import annotations

import sqlite3
from datetime import datetime
from pathlib import Path

import pytest

from reconcile.config.models import ApiLimits, SourceConfig
from reconcile.config.resolve import with_token
from reconcile.connectors import WriteOp
from reconcile.connectors.hubspot import HubSpotConnector
from reconcile.demo.hubspot_server import HubSpotServer, ObjectType
from reconcile.errors import SystemUnreachable

TOKEN = "pat-na1-test-0000-secret"
DDL = """CREATE TABLE contacts (vid INTEGER PRIMARY KEY, email TEXT UNIQUE COLLATE NOCASE,
    firstname TEXT CHECK (firstname IS NULL OR length(firstname) <= 12), lastname TEXT,
    lastmodifieddate TEXT, createdate TEXT)"""
SOURCE = SourceConfig(table="contacts", key="hs_object_id", modified_at="lastmodifieddate",
                      fields={"email": "email", "first_name": "firstname"})
COLUMNS = ["hs_object_id", "lastmodifieddate", "email", "firstname"]


def seed(path: Path, n: int, modified=lambda i: f"2026-01-{1 + i // 10:02d}T10:00:{i % 10:02d}Z") -> Path:
    con = sqlite3.connect(path)
    con.execute(DDL)
    con.executemany("INSERT INTO contacts (vid, email, firstname, lastname, lastmodifieddate) VALUES (?, ?, ?, ?, ?)",
                    [(i + 1, f"p{i}@example.com", f"Name{i}", "Doe", modified(i)) for i in range(n)])
    con.commit()
    con.close()
    return path


def rows(path: Path, sql: str) -> list[tuple]:
    con = sqlite3.connect(path)
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


@pytest.fixture
def server(tmp_path):
    db = seed(tmp_path / "marketing.db", 35)
    with HubSpotServer(db, TOKEN, objects=[ObjectType("contacts", "contacts", "vid")], list_limit=10,
                       search_limit=10, search_max_results=25) as srv:
        srv.db_path = db
        yield srv


def hubspot(srv, **limits) -> HubSpotConnector:
    lim = {"page_size": 10, "search_page_size": 10, "search_max_results": 25, "max_wait_seconds": 0.5, **limits}
    return HubSpotConnector("marketing", with_token(srv.url, TOKEN), ApiLimits(**lim))


def read_all(conn, since=None, batch=7) -> list[dict]:
    return [r for t in conn.read_batches(SOURCE, COLUMNS, since, batch) for r in t.to_pylist()]


def test_full_read_pages_through_the_list_endpoint(server):
    conn = hubspot(server)
    got = read_all(conn)
    assert [r["hs_object_id"] for r in got] == [str(i) for i in range(1, 36)]
    assert got[0] == {"hs_object_id": "1", "lastmodifieddate": "2026-01-01T10:00:00Z", "email": "p0@example.com",
                      "firstname": "Name0"}
    pages = [p for m, p, s in server.requests if m == "GET" and p.startswith("/crm/v3/objects/contacts?")]
    assert len(pages) == 4  # 10 + 10 + 10 + 5, following the `after` cursor
    assert conn.columns(SOURCE)[:2] == ["hs_object_id", "email"]


def test_incremental_read_searches_and_rewindows_before_the_result_cap(server):
    conn = hubspot(server)
    got = read_all(conn, since=datetime(2026, 1, 1, 10, 0, 5))  # 30 of 35 match: more than the cap of 25
    ids = [int(r["hs_object_id"]) for r in got]
    assert sorted(ids) == list(range(6, 36)) and len(ids) == len(set(ids))
    searches = [p for m, p, s in server.requests if p.endswith("/search")]
    assert len(searches) >= 4 and all(s == 200 for m, p, s in server.requests)  # never a 400 for paging too far


def test_a_storm_of_429_and_5xx_is_ridden_out(server):
    server.inject(429, times=4, headers={"Retry-After": "0"})
    server.inject(503, times=2)
    conn = hubspot(server)
    assert len(read_all(conn)) == 35
    assert conn.api.retries == 6


def test_rate_limit_headers_are_honoured_without_retry_after(server):
    server.rate_limit = (3, 0.3)  # HubSpot's secondly limit: 429 with X-HubSpot-RateLimit-* headers only
    conn = hubspot(server)
    assert len(read_all(conn)) == 35
    assert conn.api.retries >= 1 and [s for *_, s in server.requests].count(429) == conn.api.retries


def test_retries_exhausted_name_the_system_and_never_the_token(server):
    server.inject(500, times=10, body={"message": f"backend exploded while handling {TOKEN}"})
    conn = hubspot(server, max_retries=2)
    with pytest.raises(SystemUnreachable) as e:
        read_all(conn)
    assert "marketing" in str(e.value) and "3 attempts" in str(e.value) and TOKEN not in str(e.value)


def test_a_wrong_token_is_an_error_without_the_token(server):
    conn = HubSpotConnector("marketing", with_token(server.url, "wrong-token"), ApiLimits(max_retries=0))
    with pytest.raises(SystemUnreachable, match="HTTP 401") as e:
        conn.columns(SOURCE)
    assert "wrong-token" not in str(e.value)


def test_batch_update_with_3_of_100_failing_applies_97(tmp_path):
    db = seed(tmp_path / "m.db", 100)
    with HubSpotServer(db, TOKEN) as srv:
        w = HubSpotConnector("marketing", with_token(srv.url, TOKEN)).writer(SOURCE)
        bad = {7, 50, 93}
        ops = [WriteOp(str(i), "update", str(i), {"firstname": "Much-Too-Long-Name" if i in bad else f"New{i}"},
                       {"email": f"p{i - 1}@example.com"}) for i in range(1, 101)]
        out = w.apply(ops)
        assert [o.status for o in out].count("applied") == 97
        failed = {o.key: o.error for o in out if o.status == "failed"}
        assert set(failed) == {"7", "50", "93"} and all("CHECK constraint failed" in m for m in failed.values())
        assert out[0].before == {"firstname": "Name0"}
        assert rows(db, "SELECT count(*) FROM contacts WHERE firstname LIKE 'New%'") == [(97,)]
        assert rows(db, "SELECT firstname FROM contacts WHERE vid = 7") == [("Name6",)]
        batch_calls = [p for m, p, s in srv.requests if p.endswith("/batch/update")]
        assert len(batch_calls) == 1  # 100 per call


def test_a_record_changed_since_extraction_is_skipped_as_a_conflict(server):
    w = hubspot(server).writer(SOURCE)
    out = w.apply([WriteOp("a", "update", "1", {"firstname": "Ann"}, {"lastmodifieddate": "2026-01-01T10:00:00Z"}),
                   WriteOp("b", "update", "2", {"firstname": "Bob"}, {"lastmodifieddate": "2025-12-31T00:00:00Z"}),
                   WriteOp("c", "update", "999", {"firstname": "Cat"}, {})])
    assert [o.status for o in out] == ["applied", "skipped_conflict", "skipped_conflict"]
    assert "lastmodifieddate" in out[1].error and "no longer exists" in out[2].error
    assert rows(server.db_path, "SELECT firstname FROM contacts WHERE vid IN (1, 2) ORDER BY vid") == [
        ("Ann",), ("Name1",)]


def test_a_create_whose_email_exists_is_held_with_the_existing_id(server):
    w = hubspot(server).writer(SOURCE)
    out = w.apply([WriteOp("new", "create", None, {"email": "new@example.com", "firstname": "New"}),
                   WriteOp("dup", "create", None, {"email": "P3@example.com", "firstname": "Dup"}),
                   WriteOp("bad", "create", None, {"email": "x@example.com", "firstname": "Far-Too-Long-Name"})])
    assert [o.status for o in out] == ["applied", "held", "failed"]
    assert out[1].existing_key == "4" and "already exists" in out[1].error
    assert "CHECK constraint failed" in out[2].error
    assert rows(server.db_path, "SELECT vid, firstname FROM contacts WHERE email = 'new@example.com'") == [
        (int(out[0].key), "New")]
    assert rows(server.db_path, "SELECT count(*) FROM contacts") == [(36,)]  # the 409 was never retried
    assert [p for m, p, s in server.requests if s == 409] == ["/crm/v3/objects/contacts/batch/create",
                                                              "/crm/v3/objects/contacts"]


def test_find_and_archive(server):
    w = hubspot(server).writer(SOURCE)
    assert w.find({"email": "p9@example.com", "firstname": "Name9"}) == "10"
    assert w.find({"email": "p9@example.com", "firstname": "Other"}) is None
    out = w.apply([WriteOp("d", "delete", "10", {}, {})])
    assert out[0].status == "applied" and w.current(["10", "11"], ["email"]) == {"11": {"email": "p10@example.com"}}


def test_the_api_demo_reads_marketing_through_the_server(tmp_path, monkeypatch):
    from reconcile.config import load_config, resolve_url
    from reconcile.connectors import connect
    from reconcile.demo import init_demo
    from reconcile.demo.hubspot_server import DEMO_TOKEN_ENV
    from reconcile.stages.extract import source_columns

    srv = None
    try:
        init_demo(tmp_path, people=20)  # the systems first: the port is known once the server listens
        srv = HubSpotServer(tmp_path / "systems" / "marketing.db", TOKEN).start()
        init_demo(tmp_path, people=20, force=True, api_port=int(srv.url.rsplit(":", 1)[1]))
        monkeypatch.setenv(DEMO_TOKEN_ENV, TOKEN)
        cfg = load_config(tmp_path / "reconcile.yaml")
        assert cfg.system_kind("marketing") == "hubspot" and cfg.system_kind("crm") == "sql"
        source = cfg.entities["contact"].sources["marketing"]
        conn = connect("marketing", resolve_url(cfg, "marketing"), cfg.systems["marketing"])
        cols = source_columns(source, None)
        assert set(cols) <= set(conn.columns(source))
        got = [r for t in conn.read_batches(source, cols, None, 50) for r in t.to_pylist()]
        assert len(got) == rows(tmp_path / "systems" / "marketing.db", "SELECT count(*) FROM contacts")[0][0]
        assert TOKEN not in (tmp_path / "reconcile.yaml").read_text()
    finally:
        if srv:
            srv.stop()


def test_an_api_system_behind_an_airflow_connection_takes_url_and_token_from_its_uri(server, tmp_path, monkeypatch):
    from reconcile.config import load_config, resolve_url
    from reconcile.config.resolve import redact
    from reconcile.connectors import connect

    (tmp_path / "reconcile.yaml").write_text("""\
version: 1
warehouse: wh.duckdb
systems:
  marketing: {api: hubspot, connection: hubspot_portal, creates_identity: true}
entities:
  contact:
    sources:
      marketing: {table: contacts, key: hs_object_id, modified_at: lastmodifieddate, fields: {email: email}}
    fields:
      email: {owner: marketing}
""")
    cfg = load_config(tmp_path / "reconcile.yaml")
    # what the DAG passes in from Connection.get(...).get_uri(), or AIRFLOW_CONN_<ID> outside Airflow
    monkeypatch.setenv("AIRFLOW_CONN_HUBSPOT_PORTAL", with_token(server.url, TOKEN))
    url = resolve_url(cfg, "marketing")
    assert TOKEN not in redact(url) and redact(url) == server.url
    conn = connect("marketing", url, cfg.systems["marketing"])
    assert "email" in conn.columns(cfg.entities["contact"].sources["marketing"])
    assert resolve_url(cfg, "marketing", {"marketing": "https://:other@example.invalid"}) == \
        "https://:other@example.invalid"
