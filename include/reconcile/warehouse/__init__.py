"""The warehouse: the bus every stage reads and writes.

Two files, on purpose:
- the *working* database (`<state_dir>/work.duckdb`), opened by one writer at a time under a file lock;
- the *published* database at the config's `warehouse:` path, which analysts open. It is replaced
  atomically (copy, then rename) when a run finishes, so an analyst holding it open keeps a consistent
  snapshot and never blocks or sees a half-finished run.
Parallel extract tasks never open either file: they write Parquet into the run's folder (runstore.py).

Also the SQL toolkit every stage shares: `table_exists`, `transaction`, `SQL_TYPES` (field type -> DuckDB
type), `upsert_review_items` and `once` (a stage at most once per run id).
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import duckdb

from ..config.models import Config
from ..errors import ReconcileError
from ..transforms import register_functions, sql_literal
from .ddl import ensure_schema

__all__ = ["compact", "connect", "once", "open_work", "publish", "open_published", "ensure_schema", "safe_name", "staging_table",
           "table_exists", "transaction", "SQL_TYPES", "upsert_review_items"]

# Canonical field type -> DuckDB column type (staging, golden, collision identities).
SQL_TYPES = {"string": "VARCHAR", "boolean": "BOOLEAN", "integer": "BIGINT", "number": "DOUBLE", "date": "DATE",
             "timestamp": "TIMESTAMP"}

LOCK_WAIT_SECONDS = 1800


def connect(cfg: Config, path: str | Path = ":memory:", read_only: bool = False) -> duckdb.DuckDBPyConnection:
    """A DuckDB database with the config's resource settings (`duckdb:` memory limit, spill folder, threads):
    past the limit DuckDB spills to the state folder instead of growing until the machine runs out."""
    settings = cfg.duckdb_settings()
    Path(settings["temp_directory"]).mkdir(parents=True, exist_ok=True)
    return duckdb.connect(str(path), read_only=read_only, config=settings)


def staging_table(system: str, entity: str) -> str:
    """The staging table of one system's entity, e.g. staging.crm__contact."""
    return f"staging.{system}__{entity}"


def table_exists(con, qualified: str) -> bool:
    """Whether `schema.table` exists in the warehouse."""
    schema, _, name = qualified.partition(".")
    return bool(con.execute("SELECT count(*) FROM information_schema.tables WHERE table_schema = ? AND table_name = ?",
                            [schema, name]).fetchone()[0])


@contextlib.contextmanager
def transaction(con) -> Iterator[None]:
    """BEGIN ... COMMIT, or ROLLBACK on any error (also KeyboardInterrupt), then re-raise."""
    con.execute("BEGIN TRANSACTION")
    try:
        yield
    except BaseException:
        con.execute("ROLLBACK")
        raise
    con.execute("COMMIT")


def upsert_review_items(con, items_sql: str, entity: str, kind: str, run_id: str, run_at) -> None:
    """Open review items from a query yielding (item_id, system, title, details), in one statement.

    Item ids are deterministic, so a situation seen again updates its item (title, details, last seen);
    an item a steward decided or ignored keeps that status and is never reopened."""
    con.execute(
        f"""INSERT INTO review.items (item_id, entity, kind, system, status, title, details, first_seen_run,
                                     last_seen_run, created_at, updated_at)
            SELECT item_id, ?, ?, system, 'open', title, details, ?, ?, ?, ? FROM ({items_sql})
            ON CONFLICT (item_id) DO UPDATE SET
                status = CASE WHEN review.items.status IN ('decided', 'ignored') THEN review.items.status
                              ELSE 'open' END,
                title = excluded.title, details = excluded.details,
                last_seen_run = excluded.last_seen_run, updated_at = excluded.updated_at""",
        [entity, kind, run_id, run_id, run_at, run_at])


def once(con, run_id: str, entity: str, stage: str, run_at, body) -> dict:
    """Run a stage's `body()` at most once per (run id, entity), in one transaction.

    This is what makes every stage safe to retry: a re-run for the same run id returns the recorded result
    (audit.stage_runs) and changes nothing; a failure rolls the whole stage back.
    """
    import json
    import time

    done = con.execute("SELECT result FROM audit.stage_runs WHERE run_id = ? AND entity = ? AND stage = ?",
                       [run_id, entity, stage]).fetchone()
    if done:
        return json.loads(done[0])
    t0 = time.monotonic()
    with transaction(con):
        result = body()
        con.execute("INSERT INTO audit.stage_runs (run_id, entity, stage, finished_at, result, seconds) "
                    "VALUES (?, ?, ?, ?, ?, ?)",
                    [run_id, entity, stage, run_at, json.dumps(result, default=str), round(time.monotonic() - t0, 3)])
    return result


def safe_name(run_id: str) -> str:
    """A run id made safe as a folder name (Airflow run ids contain ':' and '+')."""
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in run_id)


@contextlib.contextmanager
def _lock(path: Path, wait: float, shared: bool = False) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        deadline = time.monotonic() + wait
        announced = False
        while True:
            try:
                fcntl.flock(fh, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
                break
            except OSError as e:
                if e.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                if time.monotonic() > deadline:
                    raise ReconcileError(
                        f"the working warehouse {path.parent / 'work.duckdb'} is held by another reconcile process "
                        f"for over {wait:.0f}s; is a run stuck?"
                    ) from None
                if not announced:
                    print(f"waiting for another reconcile process to release {path} ...", file=sys.stderr)
                    announced = True
                time.sleep(0.5)
        try:
            if not shared:
                fh.seek(0)
                fh.truncate()
                fh.write(str(os.getpid()))
                fh.flush()
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


@contextlib.contextmanager
def open_work(cfg: Config, wait: float = LOCK_WAIT_SECONDS,
              read_only: bool = False) -> Iterator[duckdb.DuckDBPyConnection]:
    """Open the working database: for writing (one process at a time, schema ensured), or read-only
    (any number of readers at once, e.g. parallel validation tasks, while no writer holds it)."""
    state = cfg.state_dir
    state.mkdir(parents=True, exist_ok=True)
    with _lock(state / "work.lock", wait, shared=read_only):
        if read_only and not (state / "work.duckdb").exists():
            raise ReconcileError(f"no working warehouse at {state / 'work.duckdb'} yet: nothing has been extracted")
        con = connect(cfg, state / "work.duckdb", read_only=read_only)
        try:
            con.execute("SET TimeZone = 'UTC'")
            register_functions(con)
            if not read_only:
                ensure_schema(con)
            yield con
            if not read_only:
                con.execute("CHECKPOINT")
        finally:
            con.close()


def publish(cfg: Config, entity: str | None = None, wait: float = LOCK_WAIT_SECONDS) -> Path:
    """Copy the working database to the published path atomically. Returns the published path.

    Several entities share one warehouse, and their runs interleave: `entity` (the one publishing) goes out
    as it stands in the working database; every *other* entity with a run still in progress keeps the state
    it last published itself, so an analyst never sees half of another entity's run (`_keep_published`)."""
    target = cfg.warehouse_path
    target.parent.mkdir(parents=True, exist_ok=True)
    work = cfg.state_dir / "work.duckdb"
    with _lock(cfg.state_dir / "work.lock", wait):
        if not work.exists():
            raise ReconcileError(f"nothing to publish: {work} does not exist yet (run `reconcile run` first)")
        con = connect(cfg, work)
        try:
            con.execute("CHECKPOINT")
        finally:
            con.close()
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        shutil.copyfile(work, tmp)
        try:
            _keep_published(cfg, tmp, target, entity)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        os.replace(tmp, target)  # atomic: readers keep the old file until they reopen
    return target


def compact(cfg: Config, wait: float = LOCK_WAIT_SECONDS) -> Path:
    """Rewrite the working database into a fresh file holding only its live rows, then replace it.

    DuckDB reuses the blocks of blanked or deleted values without wiping them: after an erasure
    (stages/privacy.py) the old file would still hold readable copies. The next `publish` copies the fresh
    file, and the replaced files' blocks belong to no file any more."""
    state = cfg.state_dir
    work = state / "work.duckdb"
    fresh = state / "work_compact.duckdb"
    with _lock(state / "work.lock", wait):
        if not work.exists():
            raise ReconcileError(f"nothing to compact: {work} does not exist yet")
        for leftover in (fresh, fresh.with_name(fresh.name + ".wal")):
            leftover.unlink(missing_ok=True)
        con = connect(cfg, fresh)
        try:
            con.execute(f"ATTACH {sql_literal(str(work))} AS old_work")
            con.execute("COPY FROM DATABASE old_work TO work_compact")
            con.execute("DETACH old_work")
            con.execute("CHECKPOINT")
        except BaseException:
            con.close()
            fresh.unlink(missing_ok=True)
            raise
        con.close()
        os.replace(fresh, work)
        work.with_name(work.name + ".wal").unlink(missing_ok=True)  # checkpointed: nothing pending in it
    return work


def _entity_table_names(cfg: Config, entity: str) -> set[str]:
    """The tables named after one entity: staging.<system>__<entity>[_history], golden.<entity>[_...]."""
    names = {f"staging.{s}__{entity}{h}" for s in cfg.systems for h in ("", "_history")}
    return names | {f"golden.{entity}{suffix}" for suffix in ("", "_lineage", "_conflicts")}


def _tables(con, database: str) -> set[str]:
    return {f"{s}.{t}" for s, t in con.execute("SELECT schema_name, table_name FROM duckdb_tables() "
                                                "WHERE database_name = ?", [database]).fetchall()}


def _keep_published(cfg: Config, copy: Path, previous: Path, entity: str | None) -> None:
    """In `copy` (of the working database), put back the previously published state of every entity, other
    than `entity`, whose run is in progress: its rows in tables with an `entity` column, its own tables."""
    con = connect(cfg, copy)
    try:
        running = [e for (e,) in con.execute(
            "SELECT DISTINCT entity FROM audit.runs WHERE status = 'running' AND entity IS DISTINCT FROM ? "
            "ORDER BY 1", [entity]).fetchall()]
        if not running:
            return
        had = previous.exists()
        if had:
            con.execute(f"ATTACH {sql_literal(str(previous))} AS prev (READ_ONLY)")
        by_entity = [f"{s}.{t}" for s, t in con.execute(
            "SELECT table_schema, table_name FROM information_schema.columns WHERE table_catalog = current_database() "
            "AND column_name = 'entity' ORDER BY 1, 2").fetchall()]
        here = _tables(con, con.execute("SELECT current_database()").fetchone()[0])
        old = _tables(con, "prev") if had else set()
        for other in running:
            for table in by_entity:
                con.execute(f"DELETE FROM {table} WHERE entity = ?", [other])
                if table in old:
                    con.execute(f"INSERT INTO {table} BY NAME SELECT * FROM prev.{table} WHERE entity = ?", [other])
            names = _entity_table_names(cfg, other)
            for table in sorted(here & names):
                con.execute(f"DROP TABLE {table}")
            for table in sorted(old & names):
                con.execute(f"CREATE TABLE {table} AS SELECT * FROM prev.{table}")
        if had:
            con.execute("DETACH prev")
        con.execute("CHECKPOINT")
    finally:
        con.close()


def open_published(cfg: Config) -> duckdb.DuckDBPyConnection:
    """Open the published warehouse read-only (what analysts and `reconcile status` read)."""
    path = cfg.warehouse_path
    if not path.exists():
        raise ReconcileError(f"no warehouse at {path} yet: run `reconcile run --config {cfg.path}` first")
    return connect(cfg, path, read_only=True)
