"""SQL connector: any database SQLAlchemy can reach (SQLite, PostgreSQL, MariaDB/MySQL, ...).

Reads arrive as Arrow tables of strings: the raw values exactly as the source holds them, typed later in
DuckDB where bad values are quarantined rather than dropped. SQLite and PostgreSQL are read columnar through
their ADBC drivers (Arrow batches straight from the driver, converted to text by Arrow compute kernels);
other dialects, and sources whose column types the columnar path does not render exactly like the row path
(SQLite columns holding several storage classes, BLOBs, PostgreSQL uuid/json/arrays/...), stream through
SQLAlchemy with server-side cursors. Both paths give the same strings (tests/unit/test_extract_types.py).
Writes (`SqlWriter`) always go through SQLAlchemy. `extract_source` (stages/extract.py) is the reader's caller.
"""
from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timezone

import pyarrow as pa
import pyarrow.compute as pc
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

    def max_lengths(self, source: SourceConfig) -> dict[str, int]:
        if source.table is None:
            return {}
        schema, _, name = source.table.rpartition(".")
        try:
            with self.engine.connect() as conn:
                cols = sa.inspect(conn).get_columns(name, schema=schema or None)
        except Exception as e:
            raise self._fail("cannot read column types", e) from None
        return {c["name"]: c["type"].length for c in cols
                if isinstance(c["type"], sa.String) and getattr(c["type"], "length", None)}

    def statement(self, source: SourceConfig, columns: list[str], since: datetime | None) -> sa.Select:
        """The read: these columns, rows modified since `since` (incremental) or every row in key order."""
        stmt = sa.select(*[sa.column(c) for c in columns]).select_from(self._selectable(source))
        if since is not None and source.modified_at:
            stmt = stmt.where(self._modified_since(source, since))
        if source.modified_at is None or since is None:
            stmt = stmt.order_by(sa.column(source.key))
        return stmt

    def _modified_since(self, source: SourceConfig, since: datetime) -> sa.ColumnElement:
        """`modified_at` at or after `since` (naive UTC), compared as instants whatever the column's type.

        A typed date/time column is compared as it is (an index on it serves the read). Text, or a query's
        column of unknown type, is cast per dialect: SQLite holds every timestamp as text in one of several
        formats ('2026-01-01 10:00:00', '...T10:00:00.000Z'), which `julianday` reads alike (a text comparison
        would put '10:00:00' before '10:00:00.000000'); PostgreSQL refuses to compare text with a timestamp.
        Text that is no timestamp is read too (a row that staging then quarantines), never dropped unseen."""
        col = sa.column(source.modified_at)
        dialect = self.engine.dialect.name
        if dialect == "sqlite":
            parsed = sa.func.julianday(col)
            return sa.or_(parsed >= sa.func.julianday(sa.literal(since.isoformat(sep=" "))),
                          sa.and_(col.is_not(None), parsed.is_(None)))
        if self._typed_timestamp(source):
            return col >= sa.bindparam("since", since, type_=sa.DateTime())
        if dialect == "postgresql":
            iso = sa.literal_column(r"'^\s*[0-9]{4}-[0-9]{2}-[0-9]{2}([ T][0-9:.]*)?\s*(Z|[+-][0-9:]+)?\s*$'")
            text = sa.cast(col, sa.Text)
            parsed = sa.case((text.op("~")(iso), sa.cast(text, sa.DateTime(timezone=True))))
            return sa.or_(parsed >= sa.bindparam("since", since.replace(tzinfo=timezone.utc),
                                                 type_=sa.DateTime(timezone=True)),
                          sa.and_(col.is_not(None), sa.not_(text.op("~")(iso))))
        parsed = sa.cast(col, sa.DateTime())
        return sa.or_(parsed >= sa.bindparam("since", since, type_=sa.DateTime()),
                      sa.and_(col.is_not(None), parsed.is_(None)))

    def _typed_timestamp(self, source: SourceConfig) -> bool:
        """Is the table's `modified_at` column a date/time type (False for text, and for a query's column)?"""
        if source.table is None:
            return False
        schema, _, name = source.table.rpartition(".")
        with self.engine.connect() as conn:
            cols = sa.inspect(conn).get_columns(name, schema=schema or None)
        kind = next((c["type"] for c in cols if c["name"] == source.modified_at), None)
        return isinstance(kind, (sa.DateTime, sa.Date))

    def read_batches(self, source: SourceConfig, columns: list[str], since: datetime | None,
                     batch_size: int) -> Iterator[pa.Table]:
        stmt = self.statement(source, columns, since)
        try:
            yield from (self._columnar(stmt, columns, batch_size, source.table)
                        or self._rows(stmt, columns, batch_size))
        except Exception as e:
            raise self._fail(f"cannot read {source.table or 'query'}", e) from None

    def writer(self, source: SourceConfig) -> SqlWriter:
        return SqlWriter(self, source)

    def _rows(self, stmt, columns: list[str], batch_size: int) -> Iterator[pa.Table]:
        """The row path: a server-side cursor through SQLAlchemy, each batch converted column by column."""
        with self.engine.connect() as conn:
            result = conn.execution_options(stream_results=True, yield_per=batch_size).execute(stmt)
            for rows in result.partitions(batch_size):
                yield _to_arrow(columns, rows)

    def _columnar(self, stmt, columns: list[str], batch_size: int,
                  table: str | None = None) -> Iterator[pa.Table] | None:
        """The ADBC reader for this statement, or None where the row path must read it (see module doc).

        Uses the driver manager's low-level API: its DB-API module imports pandas, seconds per process."""
        import adbc_driver_manager

        backend = self.engine.dialect.name
        u = self.engine.url
        if backend == "sqlite" and u.database and u.database != ":memory:" and not u.database.startswith("file:"):
            import adbc_driver_sqlite

            if not self._sqlite_uniform(stmt, columns, table):
                return None
            db = adbc_driver_sqlite.connect(u.database)
            options = {"adbc.sqlite.query.batch_rows": str(batch_size)}
        elif backend == "postgresql" and u.drivername in ("postgresql", "postgresql+psycopg2", "postgresql+psycopg"):
            import adbc_driver_postgresql

            db = adbc_driver_postgresql.connect(u.set(drivername="postgresql").render_as_string(hide_password=False))
            options = {}
        else:
            return None
        handles = [db]
        try:
            conn = adbc_driver_manager.AdbcConnection(db)
            handles.append(conn)
            st = adbc_driver_manager.AdbcStatement(conn)
            handles.append(st)
            if options:
                st.set_options(**options)
            st.set_sql_query(str(stmt.compile(dialect=self.engine.dialect, compile_kwargs={"literal_binds": True})))
            stream, _ = st.execute_query()
            reader = pa.RecordBatchReader._import_from_c(stream.address)
            if all(_columnar_type(f.type) for f in reader.schema):
                return _columnar_batches(handles, reader, columns, batch_size)
            reader.close()
        except BaseException:
            _close(handles)
            raise
        _close(handles)
        return None

    def _sqlite_uniform(self, stmt, columns: list[str], table: str | None) -> bool:
        """True when every column holds one SQLite storage class (besides NULL) and no BLOB: the ADBC driver
        types a column by its first rows and fails, or passes raw bytes as text, on a later row of another
        class, while the row path renders mixed columns value by value. Columns of a table declared with TEXT
        affinity (CHAR, CLOB, TEXT) hold text, NULL or a blob (SQLite converts numbers stored there, never
        blobs), and an INTEGER PRIMARY KEY only integers. One pass over the rows, stopping at the first that
        breaks the rule."""
        declared: dict[str, tuple[str, bool]] = {}
        if table is not None:
            schema, _, name = table.rpartition(".")
            quote = self.engine.dialect.identifier_preparer.quote
            pragma = f"PRAGMA {quote(schema) + '.' if schema else ''}table_info({quote(name)})"
            with self.engine.connect() as conn:
                declared = {r[1]: (str(r[2] or "").upper(), bool(r[5])) for r in conn.exec_driver_sql(pragma)}
        text, todo = [], []
        for c in columns:
            ctype, pk = declared.get(c, ("", False))
            if ctype == "INTEGER" and pk:
                continue
            (text if any(k in ctype for k in ("CHAR", "CLOB", "TEXT")) else todo).append(c)
        sub = stmt.order_by(None).subquery("src")
        with self.engine.connect() as conn:
            # The storage class of each untyped column's first non-NULL value, then any row holding another one.
            kinds = {}
            for c in todo:
                got = conn.execute(sa.select(sa.func.typeof(sub.c[c])).where(sub.c[c].is_not(None)).limit(1)).first()
                kinds[c] = got[0] if got else None
            if "blob" in kinds.values():
                return False
            other = [sa.and_(sub.c[c].is_not(None), sa.func.typeof(sub.c[c]) != k) for c, k in kinds.items() if k]
            other += [sa.func.typeof(sub.c[c]) == "blob" for c in text]
            return not other or not conn.execute(sa.select(sa.exists().where(sa.or_(*other)))).scalar()

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


_ORDER = {"delete": 0, "update": 1, "create": 2}  # a batch frees values before it writes new ones


def _first_line(e: Exception) -> str:
    """The database's own message of a rejected write, first line, bounded."""
    return str(getattr(e, "orig", None) or e).strip().splitlines()[0][:500]


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


def _columnar_type(t: pa.DataType) -> bool:
    """Arrow types the columnar path renders exactly as the row path does."""
    if isinstance(t, pa.BaseExtensionType):
        # PostgreSQL numeric arrives as its own text ('12.50'), what psycopg2's Decimal renders for a
        # declared scale; other extension types (uuid, json, ...) go the row path.
        return getattr(t, "type_name", None) == "numeric" and pa.types.is_string(t.storage_type)
    return (pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_null(t) or pa.types.is_boolean(t)
            or pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t)
            or pa.types.is_date32(t) or pa.types.is_timestamp(t))


def _close(handles: list) -> None:
    for h in reversed(handles):
        h.close()


def _columnar_batches(handles: list, reader: pa.RecordBatchReader, columns: list[str],
                      batch_size: int) -> Iterator[pa.Table]:
    """Driver batches -> Arrow tables of strings, re-cut to `batch_size` rows; closes the driver handles."""
    try:
        pending: list[pa.RecordBatch] = []
        rows = 0
        for batch in reader:
            pending.append(batch)
            rows += batch.num_rows
            while rows >= batch_size:
                table = pa.Table.from_batches(pending, reader.schema)
                yield _text_table(table.slice(0, batch_size), columns)
                rest = table.slice(batch_size)
                pending, rows = rest.to_batches(), rest.num_rows
        if rows:
            yield _text_table(pa.Table.from_batches(pending, reader.schema), columns)
    finally:
        reader.close()
        _close(handles)


def _text_table(table: pa.Table, columns: list[str]) -> pa.Table:
    return pa.table([_text(table.column(i)) for i in range(len(columns))], names=columns)


def _text(arr: pa.ChunkedArray) -> pa.ChunkedArray:
    """One column as the row path's strings, by Arrow kernels (no Python per value)."""
    t = arr.type
    if isinstance(t, pa.BaseExtensionType):
        arr = pa.chunked_array([c.storage for c in arr.chunks], t.storage_type)
        t = t.storage_type
    if pa.types.is_timestamp(t):
        return _iso_timestamps(arr)
    return arr.cast(pa.string())


def _iso_timestamps(arr: pa.ChunkedArray) -> pa.ChunkedArray:
    """datetime.isoformat(sep=' '): seconds, '.ffffff' only when there are microseconds, '+00:00' when zoned
    (ADBC delivers zoned values in UTC)."""
    zoned = arr.type.tz is not None
    us = arr.cast(pa.timestamp("us", arr.type.tz)).cast(pa.timestamp("us"))
    secs = pc.floor_temporal(us, unit="second")
    text = pc.strftime(secs.cast(pa.timestamp("s")), format="%Y-%m-%d %H:%M:%S")
    micros = pc.subtract(us.cast(pa.int64()), secs.cast(pa.int64()))
    fraction = pc.if_else(pc.equal(micros, 0), "",
                          pc.binary_join_element_wise(".", pc.utf8_lpad(micros.cast(pa.string()), 6, "0"), ""))
    return pc.binary_join_element_wise(text, fraction, "+00:00" if zoned else "", "")


class SqlWriter:
    """Writes into one table of a SQL system, one transaction per batch. The preconditions
    (`WriteOp.expected`) are checked set-based inside that transaction, then the batch is written in a few
    statements inside one savepoint: deletes, updates grouped by column set, creates grouped by column set
    (executemany; creates as one multi-row INSERT ... RETURNING in parameter order where the database has it).
    If that savepoint fails (a rejected value, a constraint), it is rolled back and the batch is written again
    one savepoint per record, so the rejected record fails alone and the rest commit."""

    # Each batch costs a commit (an fsync) and two journal files: 2,000 records amortise them (at 200, the
    # commit was most of a batch of xid updates into SQLite) and keep a batch's key list within every
    # database's bind-parameter limit (SQLite's is 32,766).
    load_batch = 2000

    def __init__(self, connector: SqlConnector, source: SourceConfig):
        if source.table is None:
            raise ReconcileError(f"system {connector.system!r}: cannot write through a query source; "
                                 f"configure 'table' to make it a target")
        self.c = connector
        schema, _, name = source.table.rpartition(".")
        self.table = sa.table(name, schema=schema or None)
        self.key = source.key
        self._types: dict | None = None   # declared column types, read once for multi-row creates
        self._inserts: dict[tuple, tuple[str, list[str]]] = {}  # column set -> compiled INSERT (`_insert_sql`)

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
        outcomes: list[Outcome | None] = [None] * len(ops)
        with self._begin() as conn:
            keys = [o.key for o in ops if o.key is not None]
            cols = sorted({c for o in ops for c in [*(o.expected or {}), *o.values]})
            now = self._current(conn, keys, cols)
            todo = []
            for i, o in enumerate(ops):
                why = None if o.op == "create" else conflict(o.expected, now.get(o.key), o.key)
                if why:
                    outcomes[i] = Outcome(o.ref, "skipped_conflict", key=o.key, error=why)
                else:
                    todo.append(o)
            written = self._batch(conn, todo) if self._batchable(todo) else None
            done = iter(written or [])
            for i, o in enumerate(ops):
                if outcomes[i] is not None:
                    continue
                if written is not None:
                    key = next(done)
                else:
                    sp = conn.begin_nested()
                    try:
                        key = self._write(conn, o)
                        sp.commit()
                    except Exception as e:  # a constraint violation or a rejected value: this record fails alone
                        sp.rollback()
                        outcomes[i] = Outcome(o.ref, "failed", key=o.key, error=_first_line(e))
                        continue
                before = None if o.op == "create" else {c: now[o.key].get(c) for c in o.values}
                outcomes[i] = Outcome(o.ref, "applied", key=key, before=before)
        return outcomes

    def _batchable(self, ops: list[WriteOp]) -> bool:
        """Whether the batch can be written set-wise: more than one op, each record written at most once (so
        the order of the statements cannot matter), and a database that counts the rows of an executemany
        (an update whose record vanished must not pass as applied)."""
        keys = [o.key for o in ops if o.op != "create"]
        return len(ops) > 1 and len(set(keys)) == len(keys) and self.c.engine.dialect.supports_sane_multi_rowcount

    def _batch(self, conn, ops: list[WriteOp]) -> list[str | None] | None:
        """Write the ops in one savepoint, a few statements; the written keys in op order, or None if the
        database rejected anything (the savepoint is rolled back: nothing of the batch is written)."""
        keys: dict[int, str | None] = {}
        groups: dict[tuple, list[int]] = {}
        for i, o in enumerate(ops):
            groups.setdefault((_ORDER[o.op], tuple(sorted(o.values))), []).append(i)
        sp = conn.begin_nested()
        try:
            for (_, columns), idx in sorted(groups.items()):  # deletes, then updates, then creates
                op, t = ops[idx[0]].op, self._t(columns)
                if op == "delete":
                    conn.execute(sa.delete(t).where(t.c[self.key] == sa.bindparam("_k")),
                                 [{"_k": ops[i].key} for i in idx])
                elif op == "update":
                    stmt = sa.update(t).where(t.c[self.key] == sa.bindparam("_k")).values(
                        {t.c[c]: sa.bindparam(f"_v{n}") for n, c in enumerate(columns)})
                    params = [{"_k": ops[i].key, **{f"_v{n}": ops[i].values[c] for n, c in enumerate(columns)}}
                              for i in idx]
                    if conn.execute(stmt, params).rowcount != len(idx):
                        raise ReconcileError("a record of the batch was not found for update")
                else:
                    keys.update(zip(idx, self._create(conn, columns, [ops[i].values for i in idx])))
                for i in idx:
                    keys.setdefault(i, ops[i].key)
            sp.commit()
        except (sa.exc.StatementError, ReconcileError):  # the database rejected a record (or one vanished)
            sp.rollback()
            return None
        return [keys[i] for i in range(len(ops))]

    def _create(self, conn, columns: tuple, rows: list[dict]) -> list[str | None]:
        """Insert rows of one column set; their new keys in row order. One multi-row INSERT ... RETURNING
        (sorted by parameter order) where the key is an integer the database generates in ascending order
        (serial, identity, auto_increment: the sentinel SQLAlchemy needs to give the keys back in order),
        else one INSERT ... RETURNING per row (`_insert_each`)."""
        t = self._serial_table(conn, columns) if len(rows) > 1 else None
        if t is None:
            return self._insert_each(conn, columns, rows)
        got = conn.execute(sa.insert(t).returning(t.c[self.key], sort_by_parameter_order=True), rows).all()
        return [None if r[0] is None else str(r[0]) for r in got]

    def _serial_table(self, conn, columns: tuple) -> sa.Table | None:
        """The table with these columns (their declared types) and its generated integer key, or None if the
        key is not one or the database cannot return a multi-row insert's keys in parameter order."""
        if not self.c.engine.dialect.insert_executemany_returning_sort_by_parameter_order:
            return None
        if self._types is None:
            insp = sa.inspect(conn)
            cols = insp.get_columns(self.table.name, schema=self.table.schema)
            key = next((c for c in cols if c["name"] == self.key), None)
            serial = (key is not None and isinstance(key["type"], sa.Integer) and key.get("autoincrement") is True
                      and insp.get_pk_constraint(self.table.name, schema=self.table.schema)["constrained_columns"]
                      == [self.key])
            self._types = {c["name"]: c["type"] for c in cols} if serial else {}
        if not self._types or not set(columns) <= set(self._types):
            return None
        return sa.Table(self.table.name, sa.MetaData(),
                        sa.Column(self.key, self._types[self.key], primary_key=True, autoincrement=True),
                        *[sa.Column(c, self._types[c]) for c in columns if c != self.key], schema=self.table.schema)

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
        return self._insert_each(conn, tuple(o.values), [o.values])[0]

    def _insert_each(self, conn, columns: tuple, rows: list[dict]) -> list[str | None]:
        """Insert rows of one column set one statement each; their new keys in row order (RETURNING where the
        database has it, else the key given or the cursor's lastrowid). The INSERT is compiled once per column
        set and sent as the driver's own SQL: SQLAlchemy's statement building per row cost ~1 ms, more than
        the insert itself (SQLite: a create per record, it has no ordered multi-row RETURNING)."""
        sql, order = self._insert_sql(conn, columns)
        returning = conn.dialect.insert_returning
        keys = []
        for row in rows:
            params = tuple(row[c] for c in order) if conn.dialect.positional else {
                f"_v{n}": row[c] for n, c in enumerate(columns)}
            result = conn.exec_driver_sql(sql, params)
            if returning:
                key = result.scalar()
            else:
                key = row[self.key] if self.key in row else result.lastrowid or None
            keys.append(None if key is None else str(key))
        return keys

    def _insert_sql(self, conn, columns: tuple) -> tuple[str, list[str]]:
        """The INSERT of these columns in the driver's paramstyle, and the columns in parameter order."""
        if columns not in self._inserts:
            t = self._t(columns)
            stmt = sa.insert(t).values({t.c[c]: sa.bindparam(f"_v{n}") for n, c in enumerate(columns)})
            if conn.dialect.insert_returning:
                stmt = stmt.returning(t.c[self.key])
            compiled = stmt.compile(dialect=conn.dialect)
            order = [columns[int(p[2:])] for p in compiled.positiontup or []]
            self._inserts[columns] = (compiled.string, order)
        return self._inserts[columns]
