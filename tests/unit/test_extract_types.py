"""Columnar extraction (ADBC) gives exactly the strings the row path (SQLAlchemy) gives, type by type.

Every supported type - text, integer, decimal, timestamp with and without zone, boolean, NULL, unicode - read
from SQLite (always) and PostgreSQL / MariaDB (when their DSN is set), through `SqlConnector.read_batches`,
compared with the row path and with the literal strings staging has always held.
"""
from __future__ import annotations

import sqlite3
from datetime import datetime, timezone
from decimal import Decimal

import pyarrow as pa
import pytest
import sqlalchemy as sa

from reconcile.config.models import SourceConfig
from reconcile.connectors.sql import SqlConnector

COLUMNS = ["k", "txt", "num", "dec", "ts", "tstz", "flag", "uni"]


def _source(table: str) -> SourceConfig:
    return SourceConfig.model_validate({"table": table, "key": "k", "fields": {}})


def _read(conn: SqlConnector, table: str, columns: list[str], batch_size: int = 2) -> dict[str, list]:
    batches = list(conn.read_batches(_source(table), columns, None, batch_size))
    assert all(b.num_rows <= batch_size for b in batches)
    assert all(b.schema == pa.schema([(c, pa.string()) for c in columns]) for b in batches)
    return pa.concat_tables(batches).to_pydict()


def _row_path(conn: SqlConnector, table: str, columns: list[str]) -> dict[str, list]:
    stmt = conn.statement(_source(table), columns, None)
    return pa.concat_tables(list(conn._rows(stmt, columns, 1000))).to_pydict()


def _uses_columnar(conn: SqlConnector, table: str, columns: list[str]) -> bool:
    reader = conn._columnar(conn.statement(_source(table), columns, None), columns, 1000, table)
    if reader is None:
        return False
    list(reader)  # closes the driver connection
    return True


def test_sqlite_columnar_equals_the_row_path(tmp_path):
    db = tmp_path / "src.db"
    con = sqlite3.connect(db)
    with con:
        con.execute("CREATE TABLE t (k TEXT, txt TEXT, num INTEGER, dec REAL, ts TEXT, tstz TEXT, flag BOOLEAN, "
                    "uni TEXT)")
        con.executemany("INSERT INTO t VALUES (?, ?, ?, ?, ?, ?, ?, ?)", [
            ("a", "plain", 42, 12.5, "2026-01-01 08:00:00.000000", "2026-01-01T09:00:00Z", True, "Zoë Ångström"),
            ("b", "", -7, 3.0, "2026-01-01 08:00:00.123000", "2026-01-01T09:00:00+01:00", False, "日本語 ✓"),
            ("c", None, None, None, None, None, None, None),
        ])
    con.close()
    conn = SqlConnector("crm", f"sqlite:///{db}")
    assert _uses_columnar(conn, "t", COLUMNS)
    got = _read(conn, "t", COLUMNS)
    assert got == _row_path(conn, "t", COLUMNS)
    assert got == {
        "k": ["a", "b", "c"], "txt": ["plain", "", None], "num": ["42", "-7", None], "dec": ["12.5", "3", None],
        "ts": ["2026-01-01 08:00:00.000000", "2026-01-01 08:00:00.123000", None],
        "tstz": ["2026-01-01T09:00:00Z", "2026-01-01T09:00:00+01:00", None],
        "flag": ["1", "0", None], "uni": ["Zoë Ångström", "日本語 ✓", None],
    }


def test_sqlite_column_of_mixed_storage_classes_takes_the_row_path(tmp_path):
    """SQLite lets one column hold integers, reals, text and blobs: the row path renders them value by value."""
    db = tmp_path / "src.db"
    con = sqlite3.connect(db)
    with con:
        con.execute("CREATE TABLE t (k TEXT, v)")
        con.executemany("INSERT INTO t VALUES (?, ?)", [("a", 1), ("b", 2.5), ("c", "x"), ("d", None)])
        con.execute("CREATE TABLE b (k TEXT, v BLOB)")
        con.executemany("INSERT INTO b VALUES (?, ?)", [("a", b"\x01\xff"), ("b", None)])
    con.close()
    conn = SqlConnector("crm", f"sqlite:///{db}")
    assert not _uses_columnar(conn, "t", ["k", "v"])
    assert _read(conn, "t", ["k", "v"]) == {"k": ["a", "b", "c", "d"], "v": ["1", "2.5", "x", None]}
    assert not _uses_columnar(conn, "b", ["k", "v"])
    assert _read(conn, "b", ["k", "v"]) == {"k": ["a", "b"], "v": ["01ff", None]}


def test_sqlite_blob_in_a_text_column_takes_the_row_path(tmp_path):
    """TEXT affinity converts numbers to text but keeps blobs: a blob stored in a TEXT column (an application
    writing bytes) must not reach the columnar driver, which types the column as text and fails on it."""
    db = tmp_path / "src.db"
    con = sqlite3.connect(db)
    with con:
        con.execute("CREATE TABLE t (k TEXT PRIMARY KEY, name TEXT, note VARCHAR(20))")
        # The blob comes after the rows the driver types the column by.
        con.executemany("INSERT INTO t VALUES (?, ?, ?)", [(f"a{i:05}", "Ann", "x") for i in range(3000)]
                        + [("b", "Bo", b"\x00\xfe"), ("c", None, None)])
    con.close()
    conn = SqlConnector("crm", f"sqlite:///{db}")
    assert not _uses_columnar(conn, "t", ["k", "name", "note"])
    got = _read(conn, "t", ["k", "name", "note"], batch_size=1000)
    assert got["note"][-3:] == ["x", "00fe", None] and got["name"][-2:] == ["Bo", None]
    assert got == _row_path(conn, "t", ["k", "name", "note"])
    assert _uses_columnar(conn, "t", ["k", "name"])  # the columns without a blob still read columnar


def _server_table(engine, name: str, tstz) -> sa.Table:
    md = sa.MetaData()
    t = sa.Table(name, md,
                 sa.Column("k", sa.String(10), primary_key=True),
                 sa.Column("txt", sa.String(50)),
                 sa.Column("num", sa.BigInteger),
                 sa.Column("dec", sa.Numeric(10, 2)),
                 sa.Column("ts", sa.DateTime),
                 sa.Column("tstz", tstz),
                 sa.Column("flag", sa.Boolean),
                 sa.Column("uni", sa.Unicode(50)))
    md.create_all(engine)
    with engine.begin() as c:
        c.execute(t.insert(), [
            {"k": "a", "txt": "plain", "num": 9007199254740993, "dec": Decimal("12.50"),
             "ts": datetime(2026, 1, 1, 8, 0, 0), "tstz": datetime(2026, 1, 1, 8, 0, 0, tzinfo=timezone.utc),
             "flag": True, "uni": "Zoë Ångström"},
            {"k": "b", "txt": "", "num": -7, "dec": Decimal("3"), "ts": datetime(2026, 1, 1, 8, 0, 0, 123000),
             "tstz": datetime(1969, 12, 31, 23, 59, 59, 500000, tzinfo=timezone.utc), "flag": False,
             "uni": "日本語 ✓"},
            {"k": "c", "txt": None, "num": None, "dec": None, "ts": None, "tstz": None, "flag": None, "uni": None},
        ])
    return t


@pytest.mark.postgres
def test_postgresql_columnar_equals_the_row_path(postgres_dsn, unique_name):
    engine = sa.create_engine(postgres_dsn)
    try:
        _server_table(engine, unique_name, sa.DateTime(timezone=True))
        conn = SqlConnector("crm", postgres_dsn)
        with conn.engine.connect() as c:  # the row path renders zoned values in the session's zone
            assert c.exec_driver_sql("SHOW TimeZone").scalar() in ("UTC", "Etc/UTC")
        assert _uses_columnar(conn, unique_name, COLUMNS)
        got = _read(conn, unique_name, COLUMNS)
        assert got == _row_path(conn, unique_name, COLUMNS)
        assert got == {
            "k": ["a", "b", "c"], "txt": ["plain", "", None], "num": ["9007199254740993", "-7", None],
            "dec": ["12.50", "3.00", None],
            "ts": ["2026-01-01 08:00:00", "2026-01-01 08:00:00.123000", None],
            "tstz": ["2026-01-01 08:00:00+00:00", "1969-12-31 23:59:59.500000+00:00", None],
            "flag": ["true", "false", None], "uni": ["Zoë Ångström", "日本語 ✓", None],
        }
    finally:
        with engine.begin() as c:
            c.execute(sa.text(f'DROP TABLE IF EXISTS "{unique_name}"'))
        engine.dispose()


@pytest.mark.postgres
def test_postgresql_types_the_columnar_path_cannot_render_take_the_row_path(postgres_dsn, unique_name):
    engine = sa.create_engine(postgres_dsn)
    try:
        with engine.begin() as c:
            c.execute(sa.text(f'CREATE TABLE "{unique_name}" (k text, u uuid)'))
            c.execute(sa.text(f"INSERT INTO \"{unique_name}\" VALUES ('a', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11')"))
        conn = SqlConnector("crm", postgres_dsn)
        assert not _uses_columnar(conn, unique_name, ["k", "u"])
        assert _read(conn, unique_name, ["k", "u"]) == {"k": ["a"], "u": ["a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"]}
    finally:
        with engine.begin() as c:
            c.execute(sa.text(f'DROP TABLE IF EXISTS "{unique_name}"'))
        engine.dispose()


@pytest.mark.mariadb
def test_mariadb_reads_the_same_strings_through_the_row_path(mariadb_dsn, unique_name):
    """No ADBC driver for MariaDB: SQLAlchemy reads it, with the values every other path gives."""
    engine = sa.create_engine(mariadb_dsn)
    try:
        _server_table(engine, unique_name, sa.DateTime)  # MariaDB has no zoned timestamp type
        conn = SqlConnector("crm", mariadb_dsn)
        assert not _uses_columnar(conn, unique_name, COLUMNS)
        assert _read(conn, unique_name, COLUMNS) == {
            "k": ["a", "b", "c"], "txt": ["plain", "", None], "num": ["9007199254740993", "-7", None],
            "dec": ["12.50", "3.00", None],
            # DATETIME without a fractional precision keeps whole seconds
            "ts": ["2026-01-01 08:00:00", "2026-01-01 08:00:00", None],
            "tstz": ["2026-01-01 08:00:00", "1969-12-31 23:59:59", None],
            "flag": ["1", "0", None], "uni": ["Zoë Ångström", "日本語 ✓", None],
        }
    finally:
        with engine.begin() as c:
            c.execute(sa.text(f"DROP TABLE IF EXISTS `{unique_name}`"))
        engine.dispose()
