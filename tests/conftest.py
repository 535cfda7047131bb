"""Shared fixtures: small hand-written systems and configs, and DSNs of real database servers.

PostgreSQL / MariaDB tests read RECONCILE_TEST_POSTGRES_DSN / RECONCILE_TEST_MARIADB_DSN (set by .ci/run)
and skip with that reason when they are absent, so `make test` also passes on a laptop without them.
"""
from __future__ import annotations

import atexit
import os
import re
import shutil
import sqlite3
import tempfile
import textwrap
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DAGS_FOLDER = REPO / "dags"


def airflow_test_env() -> str:
    """Point Airflow at a throwaway AIRFLOW_HOME with its own SQLite metadata DB (never the project's `.airflow`
    that `make` exports, never a database configured in the caller's shell), our dags folder, no examples.
    Returns the home. tests/dags and tests/integration call it at conftest import, before anything imports
    airflow (which reads its config once); they share one home per pytest process, and each xdist worker has
    its own (one SQLite file is not for two processes at once)."""
    var = f"_RECONCILE_TEST_AIRFLOW_HOME_{os.environ.get('PYTEST_XDIST_WORKER', 'main')}"
    home = os.environ.get(var)
    if not home:
        home = tempfile.mkdtemp(prefix="reconcile-test-airflow-")
        os.environ[var] = home
        atexit.register(shutil.rmtree, home, True)
    os.environ.update({
        "AIRFLOW_HOME": home,
        "AIRFLOW__CORE__DAGS_FOLDER": str(DAGS_FOLDER),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home}/airflow.db",
    })
    return home


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


def _once(text: str, old: str, new: str) -> str:
    if text.count(old) != 1:
        raise AssertionError(f"test setup: {old!r} is in BASE_CONFIG {text.count(old)} times, not once")
    return text.replace(old, new)


def write_base_config(folder: Path, *, extract: str | None = None, load: str | None = None,
                      runs_url: str | None = None, systems_dir: Path | None = None,
                      crm_batch_size: int | None = None, marketing_writes: str | None = None,
                      gates: str | None = None, fields: dict[str, str] | None = None) -> Path:
    """Write BASE_CONFIG, with what a test varies, to folder/reconcile.yaml and return its path.

    `extract`, `load`, `marketing_writes` and `gates` (the contact entity's) are YAML flow mappings; `runs_url`
    is set as given; `systems_dir` is where the SQLite systems are (for a config outside the project folder);
    `crm_batch_size` is the CRM source's; `fields` replaces field rules (name -> rule). Every place a change
    goes must be in BASE_CONFIG exactly once, so a changed base fails here instead of being silently ignored.
    """
    text = BASE_CONFIG
    top = "".join(f"{key}: {value}\n" for key, value in
                  (("extract", extract), ("load", load), ("runs_url", runs_url)) if value is not None)
    text = _once(text, "schedule:", top + "schedule:")
    if systems_dir is not None:
        for system in ("crm", "marketing"):
            text = _once(text, f"sqlite:///systems/{system}.db", f"sqlite:///{systems_dir}/{system}.db")
    if crm_batch_size is not None:
        key = "        key: contactid\n"
        text = _once(text, key, f"{key}        batch_size: {crm_batch_size}\n")
    if marketing_writes is not None:
        text = _once(text, "    unique: [email]\n", f"    unique: [email]\n    writes: {marketing_writes}\n")
    if gates is not None:
        text = _once(text, "    eligibility:\n", f"    gates: {gates}\n    eligibility:\n")
    for name, rule in (fields or {}).items():  # six spaces in: the entity's field rule, not a source's column
        text, n = re.subn(rf"(?m)^      {name}: .*$", lambda _: f"      {name}: {rule}", text)
        if n != 1:
            raise AssertionError(f"test setup: field rule {name!r} is in BASE_CONFIG {n} times, not once")
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "reconcile.yaml"
    path.write_text(text)
    return path


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
    write_base_config(tmp_path)
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
