"""Convergence on targets that do not stamp a modified time on our writes (no trigger, SQLite and PostgreSQL),
typed and text `modified_at` columns read incrementally, and restored records that are not taken for ours."""
from __future__ import annotations

from datetime import datetime

import duckdb
import pytest
import sqlalchemy as sa

from reconcile import runner
from reconcile.config import load_config

CONFIG = """\
version: 1
warehouse: warehouse/reconcile.duckdb
load: {{mode: apply}}
systems:
  crm: {{url_env: RT_CRM_URL, creates_identity: true}}
  marketing:
    url_env: RT_MKT_URL
    unique: [email]
    writes: {{create: true}}
entities:
  contact:
    sources:
      crm:
        table: {crm}
        key: contactid
        modified_at: modifiedon
        fields:
          email: {{column: emailaddress1, transform: email}}
          first_name: firstname
          phone: {{column: telephone1, transform: phone}}
      marketing:
        table: {mkt}
        key: vid
        modified_at: updated_at
        fields:
          email: {{column: email, transform: email}}
          first_name: firstname
          phone: {{column: phone, transform: phone}}
    fields:
      email: {{owner: crm}}
      first_name: {{owner: crm, send_to: [marketing]}}
      phone: {{owner: marketing, fallback: [crm], send_to: [crm]}}
    match:
      - {{name: email, fields: [email]}}
    gates:
      changes: {{create: {{max_share: 1}}, update: {{max_share: 1}}}}
"""

CRM_ROWS = [  # two months old: far behind the watermark, so an incremental read sees them only if stamped
    {"contactid": "A", "emailaddress1": "ann@example.com", "firstname": "Ann", "telephone1": None,
     "modifiedon": "2025-12-01 10:00:00"},
    {"contactid": "B", "emailaddress1": "bo@example.com", "firstname": "Bo", "telephone1": "4155550102",
     "modifiedon": "2025-12-01 10:00:00"},
    {"contactid": "C", "emailaddress1": "cy@example.com", "firstname": "Cyrus", "telephone1": None,
     "modifiedon": "2025-12-01 10:00:00"},
    {"contactid": "Z", "emailaddress1": "zed@example.com", "firstname": "Zed", "telephone1": None,
     "modifiedon": "2026-01-05 10:00:00"},  # the newest row: the watermark
]
MKT_ROWS = [
    {"vid": 1, "email": "ann@example.com", "firstname": "Annie", "phone": "+1 415 555 0101",
     "updated_at": "2025-12-01 09:00:00"},
    {"vid": 2, "email": "cy@example.com", "firstname": "Cy", "phone": None, "updated_at": "2025-12-01 09:00:00"},
    {"vid": 3, "email": "zed@example.com", "firstname": "Zed", "phone": None, "updated_at": "2026-01-05 09:00:00"},
]


def seed(engine, schema: str | None, crm: str, mkt: str, stamp=sa.Text) -> tuple[sa.Table, sa.Table]:
    """Plain tables, no trigger: nothing moves a modified time but the writer itself."""
    md = sa.MetaData(schema=schema)
    c = sa.Table(crm, md, sa.Column("contactid", sa.String(36), primary_key=True),
                 sa.Column("emailaddress1", sa.String(200)), sa.Column("firstname", sa.String(100)),
                 sa.Column("telephone1", sa.String(40)), sa.Column("modifiedon", stamp))
    m = sa.Table(mkt, md, sa.Column("vid", sa.Integer, primary_key=True, autoincrement=True),
                 sa.Column("email", sa.String(200), unique=True), sa.Column("firstname", sa.String(100)),
                 sa.Column("phone", sa.String(40)), sa.Column("updated_at", stamp))
    md.create_all(engine)

    def typed(rows, col):
        if stamp is sa.Text:
            return rows
        return [{**r, col: datetime.fromisoformat(r[col])} for r in rows]

    with engine.begin() as conn:
        conn.execute(c.insert(), typed(CRM_ROWS, "modifiedon"))
        conn.execute(m.insert(), typed(MKT_ROWS, "updated_at"))
        if engine.dialect.name == "postgresql":  # explicit ids above: move the sequence past them
            conn.execute(sa.text(f"SELECT setval(pg_get_serial_sequence('{m.fullname}', 'vid'), 100)"))
    return c, m


def night(cfg, n: int) -> dict:
    return runner.run_entity(cfg, "contact", run_id=f"r{n}", run_at=datetime(2026, 2, n, 2))


def wh(cfg, sql: str, params=()) -> list[tuple]:
    con = duckdb.connect(str(cfg.warehouse_path), read_only=True)
    try:
        return con.execute(sql, params).fetchall()
    finally:
        con.close()


def _converges(cfg, engine, m: sa.Table, stamp=sa.Text) -> None:
    s1 = night(cfg, 1)
    applied = dict(wh(cfg, "SELECT operation, count(*) FROM audit.changes WHERE run_id = 'r1' AND status = 'applied' "
                           "GROUP BY 1"))
    assert applied == {"update": 3, "create": 1}, (applied, s1)  # Ann/Cy's names, A's phone; B created
    with engine.connect() as conn:
        assert conn.execute(sa.select(m.c.firstname).where(m.c.vid == 1)).scalar() == "Ann"
    # the target stamped nothing: night 2 reads only the newest rows, staging still holds the old values
    s2 = night(cfg, 2)
    assert s2["extract_mode"] == {"crm": "incremental", "marketing": "incremental"}
    assert wh(cfg, "SELECT first_name FROM staging.marketing__contact WHERE _record_key = '1'") == [("Annie",)]
    assert wh(cfg, "SELECT target, operation, status FROM audit.changes WHERE run_id = 'r2'") == []
    assert all(c["applied"] == 0 for c in s2.get("changes", {}).values())
    # a person edits what we wrote afterwards (and the table stamps it this time): planned again
    with engine.begin() as conn:
        conn.execute(m.update().where(m.c.vid == 1).values(
            firstname="Anna-Lena",
            updated_at="2026-02-02 12:00:00" if stamp is sa.Text else datetime(2026, 2, 2, 12)))
    night(cfg, 3)
    assert wh(cfg, "SELECT record_key, field, after_value, status FROM audit.changes WHERE run_id = 'r3'") == [
        ("1", "first_name", "Ann", "applied")]
    night(cfg, 4)
    assert wh(cfg, "SELECT count(*) FROM audit.changes WHERE run_id = 'r4'") == [(0,)]


def test_sqlite_target_without_trigger_plans_nothing_on_night_2(tmp_path, monkeypatch):
    (tmp_path / "systems").mkdir()
    urls = {name: f"sqlite:///{tmp_path / 'systems' / name}.db" for name in ("crm", "marketing")}
    seed(sa.create_engine(urls["crm"]), None, "contact", "unused_contacts")
    engine = sa.create_engine(urls["marketing"])
    _, m = seed(engine, None, "unused_contact", "contacts")
    monkeypatch.setenv("RT_CRM_URL", urls["crm"])
    monkeypatch.setenv("RT_MKT_URL", urls["marketing"])
    (tmp_path / "reconcile.yaml").write_text(CONFIG.format(crm="contact", mkt="contacts"))
    _converges(load_config(tmp_path / "reconcile.yaml"), engine, m)


@pytest.mark.postgres
@pytest.mark.parametrize("stamp", [sa.Text, sa.DateTime], ids=["text_modified_at", "timestamp_modified_at"])
def test_postgresql_target_without_trigger_plans_nothing_on_night_2(tmp_path, monkeypatch, postgres_dsn,
                                                                      unique_name, stamp):
    engine = sa.create_engine(postgres_dsn)
    with engine.begin() as conn:
        conn.execute(sa.text(f'CREATE SCHEMA "{unique_name}"'))
    try:
        _, m = seed(engine, unique_name, "contact", "contacts", stamp)
        monkeypatch.setenv("RT_CRM_URL", postgres_dsn)
        monkeypatch.setenv("RT_MKT_URL", postgres_dsn)
        (tmp_path / "reconcile.yaml").write_text(CONFIG.format(crm=f"{unique_name}.contact",
                                                               mkt=f"{unique_name}.contacts"))
        _converges(load_config(tmp_path / "reconcile.yaml"), engine, m, stamp)
    finally:
        with engine.begin() as conn:
            conn.execute(sa.text(f'DROP SCHEMA "{unique_name}" CASCADE'))
        engine.dispose()


STAMP_CONFIG = """\
version: 1
warehouse: warehouse/reconcile.duckdb
extract: {{overlap_minutes: 0}}
systems:
  crm: {{url_env: RT_CRM_URL, creates_identity: true}}
entities:
  contact:
    sources:
      crm:
        table: {table}
        key: contactid
        modified_at: modifiedon
        fields:
          first_name: firstname
          {ref}
    fields:
      first_name: {{owner: crm}}
      {ref_field}
"""


def _stamps(tmp_path, monkeypatch, engine, url: str, schema: str | None, uuid_col: bool,
            name: str = "stamped") -> sa.Table:
    """Text modified times in several ISO forms; night 2 reads only the row changed since night 1."""
    md = sa.MetaData(schema=schema)
    cols = [sa.Column("contactid", sa.String(36), primary_key=True), sa.Column("firstname", sa.Text),
            sa.Column("modifiedon", sa.Text)]
    if uuid_col:  # a uuid column sends PostgreSQL's read down the row path (bound parameters)
        cols.append(sa.Column("ref", sa.Uuid))
    t = sa.Table(name, md, *cols)
    md.create_all(engine)
    rows = [{"contactid": "A", "firstname": "Ann", "modifiedon": "2025-12-01 10:00:00"},
            {"contactid": "B", "firstname": "Bo", "modifiedon": "2025-12-02T10:00:00Z"},
            {"contactid": "C", "firstname": "Cy", "modifiedon": "2026-01-05T10:00:00.000Z"}]
    with engine.begin() as conn:
        conn.execute(t.insert(), rows)
    monkeypatch.setenv("RT_CRM_URL", url)
    (tmp_path / "reconcile.yaml").write_text(STAMP_CONFIG.format(
        table=f"{schema}.{name}" if schema else name, ref="ref: ref" if uuid_col else "",
        ref_field="ref: {owner: crm}" if uuid_col else ""))
    cfg = load_config(tmp_path / "reconcile.yaml")
    s1 = runner.run_entity(cfg, "contact", run_id="r1", run_at=datetime(2026, 2, 1))
    assert s1["extracted"] == {"crm": 3}
    with engine.begin() as conn:  # the newest row changes within the same second, stamped in another form
        conn.execute(t.update().where(t.c.contactid == "C").values(firstname="Cyrus",
                                                                   modifiedon="2026-01-05 10:00:00"))
    s2 = runner.run_entity(cfg, "contact", run_id="r2", run_at=datetime(2026, 2, 2))
    assert s2["extract_mode"] == {"crm": "incremental"} and s2["extracted"] == {"crm": 1}
    assert wh(cfg, "SELECT _record_key, first_name FROM staging.crm__contact ORDER BY 1") == [
        ("A", "Ann"), ("B", "Bo"), ("C", "Cyrus")]
    return t


@pytest.mark.postgres
@pytest.mark.parametrize("uuid_col", [False, True], ids=["columnar", "row_path"])
def test_text_modified_at_on_postgresql_reads_only_the_changed_row(tmp_path, monkeypatch, postgres_dsn,
                                                                    unique_name, uuid_col):
    engine = sa.create_engine(postgres_dsn)
    with engine.begin() as conn:
        conn.execute(sa.text(f'CREATE SCHEMA "{unique_name}"'))
    try:
        _stamps(tmp_path, monkeypatch, engine, postgres_dsn, unique_name, uuid_col)
    finally:
        with engine.begin() as conn:
            conn.execute(sa.text(f'DROP SCHEMA "{unique_name}" CASCADE'))
        engine.dispose()


@pytest.mark.mariadb
def test_text_modified_at_on_mariadb_reads_only_the_changed_row(tmp_path, monkeypatch, mariadb_dsn, unique_name):
    engine = sa.create_engine(mariadb_dsn)
    try:
        _stamps(tmp_path, monkeypatch, engine, mariadb_dsn, None, False, unique_name)
    finally:
        with engine.begin() as conn:
            conn.execute(sa.text(f"DROP TABLE IF EXISTS `{unique_name}`"))
        engine.dispose()


def test_text_modified_at_on_sqlite_compares_instants_not_strings(tmp_path, monkeypatch):
    url = f"sqlite:///{tmp_path / 'crm.db'}"
    _stamps(tmp_path, monkeypatch, sa.create_engine(url), url, None, False)


RESTORE_CONFIG = """\
version: 1
warehouse: warehouse/reconcile.duckdb
extract: {mode: full}
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
    gates:
      volume: {max_shrink: 0.2, tolerance_rows: 0}
      changes: {link: {max_share: 1}}
"""


def test_restored_records_are_a_source_change_not_our_creates(tmp_path):
    """Night 1 writes the xid into every CRM record (the ledger knows them all); 30% are deleted, then restored
    with that xid: not records reconcile created, so the volume band is not shifted by them."""
    from ..conftest import sqlite_exec, write_sqlite

    db = tmp_path / "systems" / "crm.db"
    write_sqlite(db, "CREATE TABLE contact (contactid TEXT PRIMARY KEY, emailaddress1 TEXT, reconcile_xid TEXT, "
                     "modifiedon TEXT)", "contact",
                 [(f"c{i:02}", f"p{i}@example.com", None, "2026-01-01 10:00:00") for i in range(20)])
    (tmp_path / "reconcile.yaml").write_text(RESTORE_CONFIG)
    cfg = load_config(tmp_path / "reconcile.yaml")
    night(cfg, 1)
    assert wh(cfg, "SELECT count(*) FROM audit.write_ledger") == [(20,)]
    sqlite_exec(db, "CREATE TABLE backup AS SELECT * FROM contact WHERE contactid < 'c06'")
    sqlite_exec(db, "DELETE FROM contact WHERE contactid < 'c06'")
    night(cfg, 2)  # 14 of 20: the band (at least 16) fails, as it should
    sqlite_exec(db, "INSERT INTO contact SELECT * FROM backup")
    night(cfg, 3)
    assert wh(cfg, "SELECT _change, count(*) FROM staging.crm__contact_history WHERE _run_id = 'r3' GROUP BY 1") == [
        ("insert", 6)]
    assert wh(cfg, "SELECT run_id, staged, volume_ok FROM audit.sync_health WHERE system = 'crm' ORDER BY 1") == [
        ("r1", 20, True), ("r2", 14, False), ("r3", 20, True)]
