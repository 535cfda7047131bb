"""Shared fixtures: small hand-written systems and configs, and DSNs of real database servers.

PostgreSQL / MariaDB tests read RECONCILE_TEST_POSTGRES_DSN / RECONCILE_TEST_MARIADB_DSN (set by .ci/run)
and skip with that reason when they are absent, so `make test` also passes on a laptop without them.
"""
from __future__ import annotations

import os
import sqlite3
import textwrap
import uuid
from pathlib import Path

import pytest

BASE_CONFIG = """\
version: 1
warehouse: warehouse/reconcile.duckdb
schedule: "0 2 * * *"
systems:
  crm:
    url: sqlite:///systems/crm.db
    creates_identity: true
  marketing:
    url: sqlite:///systems/marketing.db
    unique: [email]
entities:
  contact:
    sources:
      crm:
        table: contact
        key: contactid
        modified_at: modifiedon
        fields:
          email: {column: emailaddress1, transform: email}
          first_name: {column: firstname, transform: trim}
          phone: {column: telephone1, transform: phone}
          lifecycle: {column: stage, transform: {map: {Prospect: lead, Customer: customer}}}
          active: {column: statecode, transform: {map: {"0": true, "1": false}}}
      marketing:
        table: contacts
        key: vid
        modified_at: updated_at
        fields:
          email: {column: email, transform: email}
          first_name: firstname
          phone: {column: phone, transform: phone}
    fields:
      email:      {owner: crm}
      first_name: {owner: crm, send_to: [marketing]}
      phone:      {owner: marketing, fallback: [crm], send_to: [crm]}
      lifecycle:  {owner: crm}
      active:     {owner: crm, type: boolean}
    eligibility:
      marketing: "email is not null and active"
"""

CRM_DDL = """CREATE TABLE contact (contactid TEXT, emailaddress1 TEXT, firstname TEXT, telephone1 TEXT,
                                  stage TEXT, statecode INTEGER, modifiedon TEXT)"""
MARKETING_DDL = """CREATE TABLE contacts (vid INTEGER PRIMARY KEY, email TEXT UNIQUE, firstname TEXT, phone TEXT,
                                         updated_at TEXT)"""

CRM_ROWS = [
    ("c1", " Anna.Berg@Example.com ", "Anna ", "(415) 555 0134", "Customer", 0, "2026-01-01 10:00:00"),
    ("c2", "bo@example.com", "Bo", "+1 415-555-0199", "Prospect", 0, "2026-01-02 10:00:00"),
    ("c3", "cy@example.com", "Cy", None, "Prospect", 1, "2026-01-03 10:00:00"),
]
MARKETING_ROWS = [
    (1, "anna.berg@example.com", "Anna", "4155550134", "2026-01-01T09:00:00Z"),
    (2, "dee@example.com", "Dee", "001 415 555 0100", "2026-01-02T09:00:00Z"),
]


def write_sqlite(path: Path, ddl: str, table: str, rows: list[tuple]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    con = sqlite3.connect(path)
    with con:
        con.execute(ddl)
        if rows:
            marks = ",".join("?" * len(rows[0]))
            con.executemany(f"INSERT INTO {table} VALUES ({marks})", rows)
    con.close()


def sqlite_exec(path: Path, sql: str, params: tuple = ()) -> None:
    con = sqlite3.connect(path)
    with con:
        con.execute(sql, params)
    con.close()


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A folder with reconcile.yaml and two small SQLite systems (crm, marketing)."""
    write_sqlite(tmp_path / "systems" / "crm.db", CRM_DDL, "contact", CRM_ROWS)
    write_sqlite(tmp_path / "systems" / "marketing.db", MARKETING_DDL, "contacts", MARKETING_ROWS)
    (tmp_path / "reconcile.yaml").write_text(BASE_CONFIG)
    return tmp_path


@pytest.fixture
def write_config(tmp_path: Path):
    """Write a config text (dedented) to tmp_path/reconcile.yaml and return its path."""

    def _write(text: str, name: str = "reconcile.yaml") -> Path:
        path = tmp_path / name
        path.write_text(textwrap.dedent(text))
        return path

    return _write


def _dsn(var: str) -> str:
    dsn = os.environ.get(var)
    if not dsn:
        pytest.skip(f"{var} is not set (CI sets it in .ci/run; export it to run against a real server)")
    return dsn


@pytest.fixture
def postgres_dsn() -> str:
    return _dsn("RECONCILE_TEST_POSTGRES_DSN")


@pytest.fixture
def mariadb_dsn() -> str:
    return _dsn("RECONCILE_TEST_MARIADB_DSN")


@pytest.fixture
def unique_name() -> str:
    return "rt_" + uuid.uuid4().hex[:10]
