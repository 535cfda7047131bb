"""SqlWriter.apply writes a batch in a few statements and keeps the per-record contract.

On SQLite (always) and PostgreSQL / MariaDB (when their DSN is set): a batch of updates, creates and deletes
costs a handful of statements, not one per record; the keys of the creates come back in the order of the ops;
before-images are the values just before the write; a batch with one rejected record (a CHECK constraint)
still applies every other record, the rejected one fails alone with the database's message; a conflict is
skipped and never written.
"""
from __future__ import annotations

import pytest
import sqlalchemy as sa

from reconcile.config.models import SourceConfig
from reconcile.connectors.base import WriteOp
from reconcile.connectors.sql import SqlConnector


def _setup(url: str, table: str) -> SqlConnector:
    engine = sa.create_engine(url)
    md = sa.MetaData()
    t = sa.Table(table, md,
                 sa.Column("k", sa.Integer, primary_key=True, autoincrement=True),
                 sa.Column("email", sa.String(80)),
                 sa.Column("name", sa.String(40)),
                 sa.Column("stage", sa.String(20), sa.CheckConstraint("stage <> 'bogus'")),
                 sa.Column("modified", sa.String(30)))
    md.drop_all(engine)
    md.create_all(engine)
    with engine.begin() as c:
        c.execute(t.insert(), [{"email": f"p{i}@example.com", "name": f"P{i}", "stage": "lead",
                                "modified": "2026-01-01"} for i in range(1, 41)])
    engine.dispose()
    return SqlConnector("crm", url)


def _drop(url: str, table: str) -> None:
    engine = sa.create_engine(url)
    with engine.begin() as c:
        c.execute(sa.text(f"DROP TABLE {table}"))
    engine.dispose()


def _writer(conn: SqlConnector, table: str):
    return conn.writer(SourceConfig.model_validate({"table": table, "key": "k", "fields": {}}))


def _count_statements(conn: SqlConnector) -> list[str]:
    seen: list[str] = []
    sa.event.listen(conn.engine, "before_cursor_execute",
                    lambda _c, _cur, statement, *_a: seen.append(statement.split()[0].upper()))
    return seen


def _rows(conn: SqlConnector, table: str) -> dict[int, tuple]:
    with conn.engine.connect() as c:
        return {r[0]: tuple(r[1:]) for r in c.execute(sa.text(f"SELECT k, email, name, stage FROM {table}"))}


def _batch() -> list[WriteOp]:
    ops = []
    for i in range(1, 31):  # 30 updates over two column sets, preconditions as extracted
        values = {"name": f"N{i}"} if i % 2 else {"name": f"N{i}", "stage": "customer"}
        ops.append(WriteOp(f"u{i}", "update", str(i), values, {"modified": "2026-01-01"}))
    ops.insert(5, WriteOp("c1", "create", None, {"email": "new1@example.com", "name": "New1"}))
    ops.insert(12, WriteOp("c2", "create", None, {"email": "new2@example.com", "name": "New2"}))
    ops.append(WriteOp("c3", "create", None, {"email": "new3@example.com", "name": "New3", "stage": "lead"}))
    ops.append(WriteOp("d35", "delete", "35", {}, {"modified": "2026-01-01"}))
    ops.append(WriteOp("x39", "update", "39", {"name": "never"}, {"modified": "2025-12-31"}))  # a conflict
    return ops


def _check_writes(url: str, table: str) -> None:
    conn = _setup(url, table)
    try:
        seen = _count_statements(conn)
        ops = _batch()
        out = _writer(conn, table).apply(ops)
        assert [o.ref for o in out] == [o.ref for o in ops]
        by = {o.ref: o for o in out}
        assert all(by[f"u{i}"].status == "applied" and by[f"u{i}"].key == str(i) for i in range(1, 31))
        assert by["u2"].before == {"name": "P2", "stage": "lead"} and by["u3"].before == {"name": "P3"}
        assert by["d35"].status == "applied" and by["d35"].before == {}
        assert by["x39"].status == "skipped_conflict" and "2025-12-31" in by["x39"].error
        rows = _rows(conn, table)
        for ref in ("c1", "c2", "c3"):  # each create's key is the row holding that create's values
            o = by[ref]
            assert o.status == "applied" and o.before is None
            assert rows[int(o.key)][0] == f"new{ref[1]}@example.com"
        assert rows[2] == ("p2@example.com", "N2", "customer") and rows[3][1] == "N3"
        assert 35 not in rows and rows[39][1] == "P39"
        # not one statement per record: one delete, one update per column set, and the creates as one
        # multi-row INSERT per column set where the key is generated in order (PostgreSQL, MariaDB), else
        # one INSERT each (SQLite, in-process)
        assert seen.count("DELETE") == 1 and seen.count("UPDATE") == 2, seen
        assert seen.count("INSERT") == (3 if conn.engine.dialect.name == "sqlite" else 2), seen
        assert "RELEASE" in seen and seen.count("SAVEPOINT") == 1, seen
    finally:
        conn.close()


def _check_rejected_record(url: str, table: str) -> None:
    conn = _setup(url, table)
    try:
        ops = [WriteOp(f"u{i}", "update", str(i), {"stage": "bogus" if i == 7 else "customer"},
                       {"modified": "2026-01-01"}) for i in range(1, 11)]
        ops += [WriteOp("c1", "create", None, {"email": "a@example.com", "stage": "lead"}),
                WriteOp("c2", "create", None, {"email": "b@example.com", "stage": "bogus"}),
                WriteOp("c3", "create", None, {"email": "c@example.com", "stage": "lead"})]
        out = _writer(conn, table).apply(ops)
        by = {o.ref: o for o in out}
        assert [o.ref for o in out] == [o.ref for o in ops]
        assert by["u7"].status == "failed" and by["u7"].error and by["u7"].before is None
        assert by["c2"].status == "failed" and by["c2"].key is None
        assert all(by[f"u{i}"].status == "applied" for i in range(1, 11) if i != 7)
        assert by["u1"].before == {"stage": "lead"}
        rows = _rows(conn, table)
        assert [rows[i][2] for i in range(1, 11)] == ["customer"] * 6 + ["lead"] + ["customer"] * 3
        assert rows[int(by["c1"].key)][0] == "a@example.com" and rows[int(by["c3"].key)][0] == "c@example.com"
        assert "b@example.com" not in {r[0] for r in rows.values()}
    finally:
        conn.close()


def test_sqlite_batch_is_a_few_statements(tmp_path):
    _check_writes(f"sqlite:///{tmp_path / 'crm.db'}", "contacts")


def test_sqlite_rejected_record_fails_alone(tmp_path):
    _check_rejected_record(f"sqlite:///{tmp_path / 'crm.db'}", "contacts")


def test_sqlite_a_record_written_twice_in_a_batch_keeps_op_order(tmp_path):
    """A rollback restores a record's columns with one op each: written in op order, one by one."""
    conn = _setup(f"sqlite:///{tmp_path / 'crm.db'}", "contacts")
    try:
        out = _writer(conn, "contacts").apply([
            WriteOp("a", "update", "1", {"name": "first"}, {"name": "P1"}),
            WriteOp("b", "update", "1", {"name": "second"}, {"name": "P1"})])
        assert [o.status for o in out] == ["applied", "applied"]
        assert _rows(conn, "contacts")[1][1] == "second"
    finally:
        conn.close()


@pytest.mark.postgres
def test_postgresql_batch(postgres_dsn, unique_name):
    _check_writes(postgres_dsn, unique_name)
    _check_rejected_record(postgres_dsn, unique_name)
    _drop(postgres_dsn, unique_name)


@pytest.mark.mariadb
def test_mariadb_batch(mariadb_dsn, unique_name):
    _check_writes(mariadb_dsn, unique_name)
    _check_rejected_record(mariadb_dsn, unique_name)
    _drop(mariadb_dsn, unique_name)
