"""SQL connector: any database SQLAlchemy can reach (SQLite, PostgreSQL, MariaDB/MySQL, ...).

Reads stream with server-side cursors where the driver has them and arrive as Arrow tables of strings:
the raw values exactly as the source holds them, typed later in DuckDB where bad values are quarantined
rather than dropped.
"""
from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime

import pyarrow as pa
import sqlalchemy as sa
from sqlalchemy.pool import NullPool

from ..config.models import SourceConfig
from ..config.resolve import redact
from ..errors import ReconcileError, SystemUnreachable
from .base import Outcome, Values, WriteOp, conflict


class SqlConnector:
    def __init__(self, system: str, url: str):
        self.system = system
        self._url = url
        u = sa.engine.make_url(url)
        if u.get_backend_name() == "sqlite" and u.database and u.database != ":memory:" \
                and not u.database.startswith("file:"):
            from pathlib import Path

            if not Path(u.database).is_file():  # SQLite would silently create an empty database
                raise SystemUnreachable(f"system {system!r}: SQLite database file {u.database} does not exist")
        try:
            self.engine = sa.create_engine(url, poolclass=NullPool)
        except Exception as e:  # bad driver name, missing DBAPI, malformed URL
            raise SystemUnreachable(f"system {system!r} ({redact(url)}): cannot create engine: {e}") from None
        if u.get_backend_name() == "sqlite":
            _real_sqlite_transactions(self.engine)

    def _fail(self, what: str, err: Exception) -> SystemUnreachable:
        detail = str(getattr(err, "orig", None) or err).strip().splitlines()[0]
        return SystemUnreachable(f"system {self.system!r} ({redact(self._url)}): {what}: {detail}")

    def check(self) -> None:
        try:
            with self.engine.connect() as conn:
                conn.execute(sa.text("SELECT 1"))
        except Exception as e:
            raise self._fail("cannot connect", e) from None

    def _selectable(self, source: SourceConfig) -> sa.FromClause:
        if source.table is not None:
            schema, _, name = source.table.rpartition(".")
            return sa.table(name, schema=schema or None)
        return sa.text(source.query).columns().subquery("src")

    def columns(self, source: SourceConfig) -> list[str]:
        try:
            with self.engine.connect() as conn:
                if source.table is not None:
                    schema, _, name = source.table.rpartition(".")
                    insp = sa.inspect(conn)
                    if not insp.has_table(name, schema=schema or None):
                        raise ReconcileError(f"system {self.system!r}: table {source.table!r} does not exist")
                    return [c["name"] for c in insp.get_columns(name, schema=schema or None)]
                result = conn.execute(sa.text(f"SELECT * FROM ({source.query}) src WHERE 1 = 0"))
                return list(result.keys())
        except ReconcileError:
            raise
        except Exception as e:
            raise self._fail("cannot read columns", e) from None

    def read_batches(self, source: SourceConfig, columns: list[str], since: datetime | None,
                     batch_size: int) -> Iterator[pa.Table]:
        src = self._selectable(source)
        cols = [sa.column(c) for c in columns]
        stmt = sa.select(*cols).select_from(src)
        if since is not None and source.modified_at:
            stmt = stmt.where(sa.column(source.modified_at) >= sa.bindparam("since", since, type_=sa.DateTime()))
        if source.modified_at is None or since is None:
            stmt = stmt.order_by(sa.column(source.key))
        try:
            with self.engine.connect() as conn:
                result = conn.execution_options(stream_results=True, yield_per=batch_size).execute(stmt)
                for rows in result.partitions(batch_size):
                    yield _to_arrow(columns, rows)
        except Exception as e:
            raise self._fail(f"cannot read {source.table or 'query'}", e) from None

    def writer(self, source: SourceConfig) -> SqlWriter:
        return SqlWriter(self, source)

    def close(self) -> None:
        self.engine.dispose()


def _real_sqlite_transactions(engine) -> None:
    """pysqlite only begins a transaction at the first write, so each released SAVEPOINT would be its own
    committed (fsynced) transaction. SQLAlchemy's documented recipe: let SQLAlchemy emit BEGIN itself, so a
    batch is one transaction and per-record savepoints nest inside it."""

    @sa.event.listens_for(engine, "connect")
    def _connect(dbapi_connection, _record):
        dbapi_connection.isolation_level = None

    @sa.event.listens_for(engine, "begin")
    def _begin(conn):
        conn.exec_driver_sql("BEGIN")


def _to_arrow(columns: list[str], rows: list) -> pa.Table:
    """Rows -> Arrow table of strings, one column at a time (the connector boundary, in batches)."""
    arrays = []
    for values in zip(*rows) if rows else [[] for _ in columns]:
        arrays.append(_strings(list(values)))
    return pa.table(arrays, names=columns)


def _strings(values: list) -> pa.Array:
    try:
        arr = pa.array(values)
        if pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type):
            return arr.cast(pa.string())
        if pa.types.is_null(arr.type):
            return pa.array(values, type=pa.string())
        if pa.types.is_binary(arr.type) or pa.types.is_large_binary(arr.type):
            raise pa.ArrowInvalid("binary")
        if pa.types.is_timestamp(arr.type):
            return pa.array([None if v is None else v.isoformat(sep=" ") for v in values], type=pa.string())
        return arr.cast(pa.string())
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, OverflowError):
        # Mixed types in one column (SQLite allows it) or exotic types: fall back to str().
        return pa.array([None if v is None else (v.hex() if isinstance(v, bytes) else str(v)) for v in values],
                        type=pa.string())


class SqlWriter:
    """Writes into one table of a SQL system: one transaction per batch, one savepoint per record, so a
    rejected row fails alone and the rest of the batch commits. The precondition (`WriteOp.expected`) is
    checked inside the same transaction, just before the record's write."""

    def __init__(self, connector: SqlConnector, source: SourceConfig):
        if source.table is None:
            raise ReconcileError(f"system {connector.system!r}: cannot write through a query source; "
                                 f"configure 'table' to make it a target")
        self.c = connector
        schema, _, name = source.table.rpartition(".")
        self.table = sa.table(name, schema=schema or None)
        self.key = source.key

    def _begin(self):
        try:
            return self.c.engine.begin()
        except Exception as e:
            raise self.c._fail("cannot connect to write", e) from None

    def current(self, keys: list[str], columns: list[str]) -> dict[str, Values]:
        with self._begin() as conn:
            return self._current(conn, keys, columns)

    def _current(self, conn, keys: list[str], columns: list[str]) -> dict[str, Values]:
        if not keys:
            return {}
        cols = list(dict.fromkeys([self.key] + columns))
        stmt = sa.select(*[sa.column(c) for c in cols]).select_from(self.table).where(
            sa.column(self.key).in_(keys))
        rows = conn.execute(stmt).fetchall()
        out = {}
        if rows:
            for rec in _to_arrow(cols, rows).to_pylist():
                out[rec[self.key]] = {c: rec[c] for c in columns}
        return out

    def find(self, values: dict[str, object]) -> str | None:
        stmt = sa.select(sa.column(self.key)).select_from(self.table)
        for k, v in values.items():
            stmt = stmt.where(sa.column(k) == v)
        with self._begin() as conn:
            row = conn.execute(stmt.limit(1)).fetchone()
        return None if row is None else str(row[0])

    def apply(self, ops: list[WriteOp]) -> list[Outcome]:
        outcomes = []
        with self._begin() as conn:
            keys = [o.key for o in ops if o.key is not None]
            cols = sorted({c for o in ops for c in [*(o.expected or {}), *o.values]})
            now = self._current(conn, keys, cols)
            for o in ops:
                if o.op != "create":
                    why = conflict(o.expected, now.get(o.key), o.key)
                    if why:
                        outcomes.append(Outcome(o.ref, "skipped_conflict", key=o.key, error=why))
                        continue
                sp = conn.begin_nested()
                try:
                    key = self._write(conn, o)
                    sp.commit()
                except Exception as e:  # a constraint violation or a rejected value: this record fails alone
                    sp.rollback()
                    detail = str(getattr(e, "orig", None) or e).strip().splitlines()[0]
                    outcomes.append(Outcome(o.ref, "failed", key=o.key, error=detail[:500]))
                    continue
                before = None if o.op == "create" else {c: now[o.key].get(c) for c in o.values}
                outcomes.append(Outcome(o.ref, "applied", key=key, before=before))
        return outcomes

    def _t(self, columns) -> sa.TableClause:
        cols = list(dict.fromkeys([*columns, self.key]))
        return sa.table(self.table.name, *[sa.column(c) for c in cols], schema=self.table.schema)

    def _write(self, conn, o: WriteOp) -> str | None:
        t = self._t(o.values)
        if o.op == "delete":
            conn.execute(sa.delete(t).where(t.c[self.key] == o.key))
            return o.key
        if o.op == "update":
            stmt = sa.update(t).where(t.c[self.key] == o.key).values({t.c[k]: v for k, v in o.values.items()})
            if conn.execute(stmt).rowcount != 1:
                raise ReconcileError(f"record {o.key} was not found for update")
            return o.key
        stmt = sa.insert(t).values({t.c[k]: v for k, v in o.values.items()})
        if self.c.engine.dialect.insert_returning:  # the new key (RETURNING where the database has it)
            row = conn.execute(stmt.returning(t.c[self.key])).fetchone()
            return None if row is None or row[0] is None else str(row[0])
        pk = conn.execute(stmt).inserted_primary_key
        return str(pk[0]) if pk and pk[0] is not None else None
