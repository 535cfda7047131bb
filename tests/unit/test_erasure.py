"""Erasure that holds (issue 10 item 7): suppression by salted identifier hashes, consent kept, configured
columns blanked in the systems, and no readable copy left in any file under the warehouse folder."""
from __future__ import annotations

import json
import sqlite3
import subprocess
from datetime import datetime
from pathlib import Path

import duckdb
import pytest

from reconcile import runner
from reconcile.cli import main
from reconcile.config import load_config

CONFIG = """\
version: 1
warehouse: warehouse/reconcile.duckdb
load: {{mode: apply}}
systems:
  crm:
    url: sqlite:///systems/crm.db
    creates_identity: true
    writes: {{erase: {crm_erase}}}
  marketing:
    url: sqlite:///systems/marketing.db
    unique: [email]
    writes: {{create: true}}
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
      marketing:
        table: contacts
        key: vid
        modified_at: updated_at
        fields:
          email: {{column: email, transform: email}}
          first_name: firstname
          last_name: lastname
          opt_out: {{column: opt_out, transform: {{map: {{"0": false, "1": true}}}}}}
    fields:
      email: {{owner: crm, send_to: [marketing]}}
      first_name: {{owner: crm, send_to: [marketing]}}
      last_name: {{owner: crm, send_to: [marketing]}}
      phone: {{owner: crm}}
      opt_out: {{owner: marketing, type: boolean, strategy: most_restrictive, restrictive_values: [true]}}
    match:
      - {{name: email, fields: [email]}}
    gates:
      changes: {{create: {{max_share: 1}}, update: {{max_share: 1}}}}
"""

CRM_DDL = """CREATE TABLE contact (contactid TEXT PRIMARY KEY, emailaddress1 TEXT, firstname TEXT, lastname TEXT,
    telephone1 TEXT, jobtitle TEXT, billing_street TEXT, modifiedon TEXT NOT NULL DEFAULT (datetime('now')))"""
MKT_DDL = """CREATE TABLE contacts (vid INTEGER PRIMARY KEY, email TEXT UNIQUE, firstname TEXT, lastname TEXT,
    opt_out INTEGER NOT NULL DEFAULT 0, updated_at TEXT DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')))"""
CRM_ROWS = [
    ("A", "ann@example.com", "Ann", "Lee", "4155550101", "Buyer", "1 Main St", "2026-01-01 10:00:00"),
    ("C", "cyrus.vance@example.com", "Cyrus", "Vance", "4155550103", "Chief Whistler", "9 Elm Rd",
     "2026-01-02 10:00:00"),
]
MKT_ROWS = [
    (1, "ann@example.com", "Ann", "Lee", 0, "2026-01-01T09:00:00Z"),
    (2, "cyrus.vance@example.com", "Cyrus", "Vance", 1, "2026-01-01T09:00:00Z"),
]
ERASED_EMAIL = "cyrus.vance@example.com"


def make(tmp_path: Path, crm_erase: str = "anonymize") -> Path:
    for name, ddl, table, rows in (("crm", CRM_DDL, "contact", CRM_ROWS), ("marketing", MKT_DDL, "contacts", MKT_ROWS)):
        path = tmp_path / "systems" / f"{name}.db"
        path.parent.mkdir(parents=True, exist_ok=True)
        con = sqlite3.connect(path)
        con.executescript(ddl)
        con.executemany(f"INSERT INTO {table} VALUES ({','.join('?' * len(rows[0]))})", rows)
        con.commit()
        con.close()
    (tmp_path / "reconcile.yaml").write_text(CONFIG.format(crm_erase=crm_erase))
    return tmp_path / "reconcile.yaml"


def system(tmp_path: Path, name: str, sql: str, params=()) -> list[tuple]:
    con = sqlite3.connect(tmp_path / "systems" / f"{name}.db")
    try:
        rows = con.execute(sql, params).fetchall()
        con.commit()
        return rows
    finally:
        con.close()


def wh(cfg, sql: str, params=()) -> list[tuple]:
    con = duckdb.connect(str(cfg.warehouse_path), read_only=True)
    try:
        return con.execute(sql, params).fetchall()
    finally:
        con.close()


def night(cfg, n: int) -> dict:
    return runner.run_entity(cfg, "contact", run_id=f"r{n}", run_at=datetime(2026, 2, n, 2))


def erase(path: Path, email: str) -> int:
    return main(["erase", "--config", str(path), "--email", email, "--reason", "DSAR 7", "--by", "dpo"])


def files_holding(folder: Path, text: str) -> list[str]:
    """Every file under `folder` in which `text` is readable (grep -c over raw bytes, any case)."""
    out = subprocess.run(["grep", "-r", "-c", "-a", "-i", "-F", text, str(folder)], capture_output=True, text=True)
    return sorted(line for line in out.stdout.splitlines() if not line.endswith(":0"))


def all_tables_text(cfg) -> str:
    """Every value of every table of the published warehouse, as text."""
    con = duckdb.connect(str(cfg.warehouse_path), read_only=True)
    try:
        tables = con.execute("SELECT schema_name, table_name FROM duckdb_tables()").fetchall()
        return "\n".join(str(con.execute(f'SELECT * FROM "{s}"."{t}"').fetchall()) for s, t in tables)
    finally:
        con.close()


@pytest.mark.slow
def test_an_erased_person_reappearing_in_the_crm_is_suppressed_and_no_file_keeps_their_email(tmp_path):
    path = make(tmp_path)
    cfg = load_config(path)
    night(cfg, 1)
    warehouse = cfg.warehouse_path.parent
    assert files_holding(warehouse, ERASED_EMAIL), "the test must see the email before the erasure"
    assert erase(path, ERASED_EMAIL) == 0
    # At once: hashes, not the address; the files already hold no readable copy.
    assert wh(cfg, "SELECT matched_by, consent FROM identity.erasures") == [("email", '{"opt_out":"true"}')]
    assert files_holding(warehouse, ERASED_EMAIL) == []
    night(cfg, 2)  # the erasure is carried out in both systems
    assert system(tmp_path, "crm", "SELECT emailaddress1, firstname FROM contact WHERE contactid = 'C'") == [
        (None, None)]
    # The person comes back: a new CRM row with the erased email (differently written).
    system(tmp_path, "crm", "INSERT INTO contact VALUES ('N', ' Cyrus.Vance@Example.com ', 'Cyrus', 'Vance', NULL, "
                            "NULL, NULL, '2026-02-02 12:00:00')")
    s3 = night(cfg, 3)
    assert s3["status"] in ("success", "blocked"), s3
    # Not linked, nothing planned for it, nothing created anywhere (opt-out 1 can never become a new 0).
    assert wh(cfg, "SELECT count(*) FROM identity.xref WHERE system = 'crm' AND record_key = 'N'") == [(0,)]
    assert wh(cfg, "SELECT count(*) FROM audit.changes WHERE operation = 'create'") == [(0,)]
    assert system(tmp_path, "marketing", "SELECT count(*) FROM contacts") == [(2,)]
    items = wh(cfg, "SELECT system, status, title, details FROM review.items WHERE kind = 'erased_identifier'")
    assert len(items) == 1 and items[0][:2] == ("crm", "open")
    details = json.loads(items[0][3])
    assert details["record_key"] == "N" and details["matched"] == ["email"]
    assert details["consent"] == {"opt_out": "true"}
    # No readable copy in any file under the warehouse folder: working and published DuckDB files, run
    # folders (extracts, gate outcomes), Data Docs.
    assert files_holding(warehouse, ERASED_EMAIL) == []
    assert files_holding(warehouse, "cyrus.vance") == []
    night(cfg, 4)  # still suppressed, still one item
    assert wh(cfg, "SELECT count(*) FROM review.items WHERE kind = 'erased_identifier'") == [(1,)]
    assert wh(cfg, "SELECT count(*) FROM audit.changes WHERE operation = 'create'") == [(0,)]
    assert files_holding(warehouse, ERASED_EMAIL) == []


def test_identifiers_are_kept_as_salted_hashes_only(tmp_path, monkeypatch):
    import hashlib

    monkeypatch.setenv("RECONCILE_ERASURE_SALT", "pepper-for-the-test")
    path = make(tmp_path)
    cfg = load_config(path)
    night(cfg, 1)
    assert erase(path, ERASED_EMAIL) == 0
    rows = wh(cfg, "SELECT kind, hash, salt_id FROM identity.erased_identifiers ORDER BY kind")
    kinds = [k for k, _, _ in rows]
    assert {"email", "phone", "key:crm", "key:marketing", "xid"} <= set(kinds) or {"email", "phone", "xid"} <= set(kinds)
    salted = hashlib.sha256(f"pepper-for-the-test{'email'}:{ERASED_EMAIL}".encode()).hexdigest()
    assert ("email", salted) in [(k, h) for k, h, _ in rows]
    assert hashlib.sha256(f"email:{ERASED_EMAIL}".encode()).hexdigest() not in [h for _, h, _ in rows]
    text = all_tables_text(cfg)
    assert ERASED_EMAIL not in text.lower() and "4155550103" not in text and "+14155550103" not in text
    assert "pepper-for-the-test" not in text
    # Another salt later cannot match the stored hashes: refused with a clear error, never silently.
    monkeypatch.setenv("RECONCILE_ERASURE_SALT", "another")
    with pytest.raises(Exception, match="erasure salt changed"):
        night(cfg, 2)


def test_the_salt_is_generated_once_outside_the_tables(tmp_path, monkeypatch):
    from reconcile.stages.privacy import SALT_FILE, erasure_salt

    monkeypatch.delenv("RECONCILE_ERASURE_SALT", raising=False)
    cfg = load_config(make(tmp_path))
    first = erasure_salt(cfg)
    assert len(first) == 64 and erasure_salt(cfg) == first
    salt_file = cfg.state_dir / SALT_FILE
    assert salt_file.stat().st_mode & 0o077 == 0  # the owner's only


@pytest.mark.parametrize("crm_erase,blanked,kept", [
    # named extra columns: the unmapped job title goes too; billing is not named, so it stays
    ("{columns: [jobtitle]}", ["emailaddress1", "firstname", "lastname", "telephone1", "jobtitle"],
     ["billing_street", "modifiedon"]),
    # every column but the key, modified_at and what the law requires to keep
    ("{columns: all, retain: [billing_street]}", ["emailaddress1", "firstname", "lastname", "telephone1", "jobtitle"],
     ["billing_street", "modifiedon"]),
])
def test_writes_erase_blanks_named_or_all_columns_but_the_retained(tmp_path, crm_erase, blanked, kept):
    path = make(tmp_path, crm_erase=crm_erase)
    cfg = load_config(path)
    night(cfg, 1)
    assert erase(path, ERASED_EMAIL) == 0
    night(cfg, 2)
    assert wh(cfg, "SELECT status FROM audit.changes WHERE operation = 'erase' AND target = 'crm'") == [("applied",)]
    spec = json.loads(wh(cfg, "SELECT after_raw FROM audit.changes WHERE operation = 'erase' AND target = 'crm'")[0][0])
    assert spec == {"mode": "anonymize", "columns": sorted(blanked)}  # `all` resolved: exactly what was blanked
    row = dict(zip(blanked + kept, system(tmp_path, "crm", f"SELECT {', '.join(blanked + kept)} FROM contact "
                                                           f"WHERE contactid = 'C'")[0]))
    assert all(row[c] is None for c in blanked), row
    assert row["billing_street"] == "9 Elm Rd" and row["modifiedon"] is not None
    assert system(tmp_path, "crm", "SELECT jobtitle FROM contact WHERE contactid = 'A'") == [("Buyer",)]


def test_erase_columns_and_retain_apply_to_anonymize_only():
    from pydantic import ValidationError

    from reconcile.config.models import WriteSettings

    assert WriteSettings(erase="delete").erase_settings.mode == "delete"
    assert WriteSettings(erase={"columns": "all", "retain": ["billing_street"]}).erase_settings.columns == "all"
    with pytest.raises(ValidationError, match="apply to mode anonymize"):
        WriteSettings(erase={"mode": "delete", "retain": ["billing_street"]})


def test_review_items_naming_an_erased_person_are_blanked_others_and_erasure_items_kept(project):
    from reconcile.stages.privacy import purge_erased
    from reconcile.warehouse import open_work

    cfg = load_config(project / "reconcile.yaml")
    items = [("i1", "candidate", {"system": "crm", "record_key": "c9", "candidates": [{"xid": "X1"}]}),
             ("i2", "duplicate", {"records": [{"system": "crm", "record_key": "c1"}], "values": {"email": "a@b.c"}}),
             ("i3", "conflict", {"system": "crm", "record_key": "c2", "xid": "X2"}),
             ("i4", "erased_identifier", {"system": "crm", "record_key": "c1", "erased_xid": "X1"})]
    with open_work(cfg) as con:
        con.execute("INSERT INTO identity.erasures (entity, xid, request_id, requested_at, requested_by, reason, "
                    "matched_by, status) VALUES ('contact', 'X1', 'e1', now(), 'dpo', 'r', 'email', 'requested')")
        con.execute("INSERT INTO identity.erased_records (entity, system, record_key, xid, request_id) "
                    "VALUES ('contact', 'crm', 'c1', 'X1', 'e1')")
        for item_id, kind, details in items:
            con.execute("INSERT INTO review.items (item_id, entity, kind, system, status, title, details, first_seen_run, "
                        "last_seen_run, created_at, updated_at) VALUES (?, 'contact', ?, 'crm', 'open', 't', ?, 'r', 'r', "
                        "now(), now())", [item_id, kind, json.dumps(details)])
        assert purge_erased(con, cfg, "contact")["review.items"] == 2
        rows = dict(con.execute("SELECT item_id, CAST(details AS VARCHAR) FROM review.items").fetchall())
        assert purge_erased(con, cfg, "contact").get("review.items") is None  # nothing left to blank
    assert json.loads(rows["i1"]) == {"erased": True} and json.loads(rows["i2"]) == {"erased": True}
    assert json.loads(rows["i3"])["xid"] == "X2" and json.loads(rows["i4"])["erased_xid"] == "X1"
