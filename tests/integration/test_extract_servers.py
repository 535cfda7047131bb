"""Extraction from real PostgreSQL and MariaDB servers (DSNs from the environment; CI sets them)."""
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
systems:
  crm:
    url_env: RT_CRM_URL
    creates_identity: true
entities:
  contact:
    sources:
      crm:
        table: {table}
        key: ContactId
        modified_at: modified_on
        fields:
          email: {{column: Email, transform: email}}
          first_name: {{column: first_name, transform: trim}}
          active: is_active
          score: score
    fields:
      email: {{owner: crm}}
      first_name: {{owner: crm}}
      active: {{owner: crm, type: boolean}}
      score: {{owner: crm, type: number}}
"""


def _seed(engine, schema: str | None, table: str) -> None:
    md = sa.MetaData(schema=schema)
    t = sa.Table(table, md,
                 sa.Column("ContactId", sa.String(36), primary_key=True),
                 sa.Column("Email", sa.String(200)),
                 sa.Column("first_name", sa.String(100)),
                 sa.Column("is_active", sa.Boolean),
                 sa.Column("score", sa.Numeric(10, 2)),
                 sa.Column("modified_on", sa.DateTime))
    md.create_all(engine)
    with engine.begin() as conn:
        conn.execute(t.insert(), [
            {"ContactId": "A-1", "Email": " Ann@Example.com", "first_name": " Ann", "is_active": True,
             "score": 12.5, "modified_on": datetime(2026, 1, 1, 8)},
            {"ContactId": "A-2", "Email": "not-an-email", "first_name": "Ben", "is_active": False,
             "score": None, "modified_on": datetime(2026, 1, 2, 8)},
            {"ContactId": "A-3", "Email": None, "first_name": "Cat", "is_active": None,
             "score": 3, "modified_on": datetime(2026, 1, 3, 8)},
        ])
    return t


def _run_and_check(tmp_path, monkeypatch, url: str, table: str) -> None:
    (tmp_path / "reconcile.yaml").write_text(CONFIG.format(table=table))
    monkeypatch.setenv("RT_CRM_URL", url)
    cfg = load_config(tmp_path / "reconcile.yaml")
    s = runner.run_entity(cfg, "contact", run_id="r1", run_at=datetime(2026, 2, 1))
    assert s["extracted"] == {"crm": 3} and s["quarantined"] == {"crm": 1}
    con = duckdb.connect(str(cfg.warehouse_path), read_only=True)
    got = con.execute("SELECT _record_key, email, first_name, active, score, _source_modified_at "
                      "FROM staging.crm__contact ORDER BY 1").fetchall()
    con.close()
    assert got == [("A-1", "ann@example.com", "Ann", True, 12.5, datetime(2026, 1, 1, 8)),
                   ("A-3", None, "Cat", None, 3.0, datetime(2026, 1, 3, 8))]
    # incremental second run: only rows at or after the watermark minus the overlap are read
    s2 = runner.run_entity(cfg, "contact", run_id="r2", run_at=datetime(2026, 2, 2))
    assert s2["extract_mode"] == {"crm": "incremental"} and s2["extracted"] == {"crm": 1}


@pytest.mark.postgres
def test_extract_from_postgresql(tmp_path, monkeypatch, postgres_dsn, unique_name):
    engine = sa.create_engine(postgres_dsn)
    with engine.begin() as conn:
        conn.execute(sa.text(f'CREATE SCHEMA "{unique_name}"'))
    try:
        _seed(engine, unique_name, "Contact")
        _run_and_check(tmp_path, monkeypatch, postgres_dsn, f"{unique_name}.Contact")
    finally:
        with engine.begin() as conn:
            conn.execute(sa.text(f'DROP SCHEMA "{unique_name}" CASCADE'))
        engine.dispose()


@pytest.mark.mariadb
def test_extract_from_mariadb(tmp_path, monkeypatch, mariadb_dsn, unique_name):
    engine = sa.create_engine(mariadb_dsn)
    try:
        _seed(engine, None, unique_name)
        _run_and_check(tmp_path, monkeypatch, mariadb_dsn, unique_name)
    finally:
        with engine.begin() as conn:
            conn.execute(sa.text(f"DROP TABLE IF EXISTS `{unique_name}`"))
        engine.dispose()
