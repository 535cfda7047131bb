"""Extract: systems -> Parquet (parallel, no warehouse lock) -> staging tables (one writer, set-based SQL).

Three steps, so parallel Airflow tasks never contend for the DuckDB file:
1. `plan_extract` (writer): decide full or incremental per source from `audit.watermarks`;
2. `extract_source` (any number in parallel, on any worker): stream the source in batches into
   `<runs>/<run>/<entity>/<system>.parquet` in the run storage (runstore.py: local, or any fsspec URL);
3. `stage_entity` (writer, one transaction): type and transform in DuckDB, quarantine bad rows with their
   reason, merge into `staging.<system>__<entity>`, append changes to `..._history`, move watermarks.
Re-running any step for the same run id leaves the same state (step 3 is recorded in audit.stage_runs).
"""
from __future__ import annotations

import hashlib
import json
from datetime import datetime, timedelta
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from ..config.models import Config, SourceConfig
from ..connectors import connect
from ..errors import ReconcileError
from ..runstore import RunFolder
from ..transforms import EMAIL_PATTERN, apply_steps, quote_ident as q, sql_literal
from ..warehouse import SQL_TYPES, once, staging_table, table_exists

STAGE = "extract"
MAX_LENGTHS_KEY = b"reconcile.max_lengths"  # Parquet schema metadata: declared column lengths (JSON)


def source_columns(source: SourceConfig, xid_column: str | None = None) -> list[str]:
    """Source columns read: key, modified_at, every mapped column, stored IDs (each once, in config order)."""
    cols = [source.key] + ([source.modified_at] if source.modified_at else [])
    cols += [m.column for m in source.fields.values()]
    cols += list(source.external_ids.values()) + ([xid_column] if xid_column else [])
    return list(dict.fromkeys(cols))


def source_hash(cfg: Config, entity: str, system: str) -> str:
    """Changes when anything that shapes the staged values changes; forces a full extract."""
    ent = cfg.entities[entity]
    src = ent.sources[system]
    payload = {
        "source": src.model_dump(mode="json"),
        "types": {f: ent.fields[f].type for f in src.fields if f in ent.fields},
        "region": cfg.systems[system].phone_region or cfg.defaults.phone_region,
        "xid_column": cfg.systems[system].xid_column,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def plan_extract(con, cfg: Config, entity: str, run_at: datetime, full: bool | None = None) -> dict:
    """Per source: {"mode", "since", "columns", "source_hash"}. `full=True` forces a full snapshot."""
    ent = cfg.entity(entity)
    plans = {}
    for system, source in sorted(ent.sources.items()):
        row = con.execute(
            "SELECT watermark, source_hash, runs_since_full FROM audit.watermarks WHERE entity = ? AND system = ?",
            [entity, system],
        ).fetchone()
        shash = source_hash(cfg, entity, system)
        mode = "full"
        since = None
        reason = "first extract" if row is None else None
        if full is True:
            reason = "requested"
        elif cfg.extract.mode == "full":
            reason = "extract.mode is full"
        elif cfg.systems[system].files:
            reason = "a file export is a full snapshot"
        elif source.modified_at is None:
            reason = "source has no modified_at"
        elif row is not None and row[1] != shash:
            reason = "source config changed"
        elif row is not None and row[2] + 1 >= cfg.extract.full_every:
            reason = f"periodic full snapshot (extract.full_every = {cfg.extract.full_every})"
        elif row is not None and row[0] is None:
            reason = "no watermark yet"
        elif row is not None:
            mode = "incremental"
            since = row[0] - timedelta(minutes=cfg.extract.overlap_minutes)
        plans[system] = {
            "mode": mode,
            "reason": reason,
            "since": since.isoformat() if since else None,
            "columns": source_columns(source, cfg.systems[system].xid_column),
            "source_hash": shash,
            "batch_size": source.batch_size or cfg.extract.batch_size,
        }
    return plans


def extract_source(cfg: Config, entity: str, system: str, plan: dict, folder: RunFolder, url: str,
                   progress=None) -> dict:
    """Stream one source into `<system>.parquet` of the run folder. Touches no warehouse file; safe in parallel.

    The file appears whole when the read completes (runstore): a retried task, on this worker or another,
    replaces it; a killed one leaves nothing that staging reads."""
    source = cfg.entity(entity).sources[system]
    columns = plan["columns"]
    conn = connect(system, url, cfg.systems[system])
    rows = 0
    try:
        real = conn.columns(source)
        missing = [c for c in columns if c not in real]
        if missing:
            where = f"{'files' if cfg.systems[system].files else 'table'} {source.table!r}" if source.table else "its query"
            raise ReconcileError(
                f"system {system!r}: {where} has no column(s) {', '.join(map(repr, missing))} "
                f"(mapped in entities.{entity}.sources.{system}); it has: {', '.join(real)}"
            )
        since = datetime.fromisoformat(plan["since"]) if plan["since"] else None
        # The target's declared text lengths travel with the extract, for the plan's limits (stage_entity).
        lengths = {c: n for c, n in conn.max_lengths(source).items() if c in columns}
        schema = pa.schema([(c, pa.string()) for c in columns], metadata={MAX_LENGTHS_KEY: json.dumps(lengths)})
        with folder.writing(f"{system}.parquet") as fh, pq.ParquetWriter(fh, schema) as writer:
            for batch in conn.read_batches(source, columns, since, plan["batch_size"]):
                writer.write_table(batch.cast(schema))
                rows += batch.num_rows
                if progress:
                    progress(f"  {system}: {rows} rows read")
    finally:
        conn.close()
    return {"system": system, "rows": rows, "path": folder.url(f"{system}.parquet"), "mode": plan["mode"]}


def _typed(expr: str, ftype: str) -> str:
    if ftype == "string":
        return expr
    if ftype == "timestamp":
        return f"TRY_CAST(TRY_CAST({expr} AS TIMESTAMPTZ) AS TIMESTAMP)"
    if ftype == "integer":  # never round: '12.5' is not an integer (quarantined), '12.0' is 12
        return (f"(CASE WHEN TRY_CAST({expr} AS DOUBLE) = floor(TRY_CAST({expr} AS DOUBLE)) "
                f"THEN TRY_CAST(TRY_CAST({expr} AS DOUBLE) AS BIGINT) END)")
    return f"TRY_CAST({expr} AS {SQL_TYPES[ftype]})"


def stage_entity(con, cfg: Config, entity: str, run_id: str, run_at: datetime, manifest: dict,
                 folder: RunFolder, progress=None) -> dict:
    """Load every extracted source of an entity into staging, in one transaction. Returns counts per system."""
    ent = cfg.entity(entity)

    def _body() -> dict:
        results: dict[str, dict] = {}
        for system in sorted(manifest["systems"]):
            plan = manifest["systems"][system]
            name = f"{system}.parquet"
            if not folder.exists(name):
                raise ReconcileError(f"extract of {system!r} for run {run_id!r} is missing ({folder.url(name)}); "
                                     f"run extract first")
            with folder.local(name) as path:
                results[system] = _stage_source(con, cfg, entity, system, ent.sources[system], plan, path, run_id,
                                                run_at)
            if progress:
                r = results[system]
                progress(f"  staged {system}: {r['staged']} rows ({r['inserted']} new, {r['updated']} changed, "
                         f"{r['deleted']} deleted), {r['quarantined']} quarantined")
        return results

    return once(con, run_id, entity, STAGE, run_at, _body)


def _stage_source(con, cfg: Config, entity: str, system: str, source: SourceConfig, plan: dict, path: Path,
                  run_id: str, run_at: datetime) -> dict:
    ent = cfg.entities[entity]
    region = cfg.systems[system].phone_region or cfg.defaults.phone_region
    table = staging_table(system, entity)
    history = f"{table}_history"
    columns = plan["columns"]

    con.execute(f"CREATE OR REPLACE TEMP TABLE _ext AS SELECT * FROM read_parquet({sql_literal(str(path))})")
    _record_column_limits(con, entity, system, run_id, path)
    extracted = con.execute("SELECT count(*) FROM _ext").fetchone()[0]

    key = f"NULLIF(CAST({q(source.key)} AS VARCHAR), '')"
    canon, checks = [], []
    for fname, mapping in source.fields.items():
        ftype = ent.fields[fname].type
        text_expr = apply_steps(q(mapping.column), mapping.steps, region)
        typed = _typed(text_expr, ftype)
        canon.append(f"{typed} AS {q(fname)}")
        if ftype != "string":
            checks.append(
                f"CASE WHEN ({text_expr}) IS NOT NULL AND {typed} IS NULL THEN 'value ' || "
                f"{sql_literal(chr(39))} || CAST({q(mapping.column)} AS VARCHAR) || {sql_literal(chr(39))} || "
                f"' in column {mapping.column} is not a valid {ftype} (field {fname})' END"
            )
        if any(s.name == "email" for s in mapping.steps):
            checks.append(
                f"CASE WHEN ({text_expr}) IS NOT NULL AND NOT regexp_full_match({text_expr}, "
                f"{sql_literal(EMAIL_PATTERN)}) THEN 'invalid email in column {mapping.column}: ' || "
                f"{sql_literal(chr(39))} || CAST({q(mapping.column)} AS VARCHAR) || {sql_literal(chr(39))} END"
            )
    if source.modified_at:
        mod = _typed(q(source.modified_at), "timestamp")
        checks.append(
            f"CASE WHEN {q(source.modified_at)} IS NOT NULL AND {mod} IS NULL THEN 'unparseable timestamp in column "
            f"{source.modified_at}: ' || {sql_literal(chr(39))} || {q(source.modified_at)} || {sql_literal(chr(39))} END"
        )
    else:
        mod = "CAST(NULL AS TIMESTAMP)"
    checks.insert(0, f"CASE WHEN {key} IS NULL THEN 'null primary key (column {source.key})' END")
    checks.insert(1, f"CASE WHEN {key} IS NOT NULL AND count(*) OVER (PARTITION BY {key}) > 1 THEN "
                     f"'duplicate primary key ' || {key} || ' (' || count(*) OVER (PARTITION BY {key}) || ' rows, column "
                     f"{source.key})' END")
    raw = [f"{q(c)} AS {q('_raw_' + c)}" for c in columns]
    # Stored IDs: our cross-system id as the system holds it, and other systems' keys it holds.
    ids = []
    xid_col = cfg.systems[system].xid_column
    if xid_col:
        ids.append(f"NULLIF(trim(CAST({q(xid_col)} AS VARCHAR)), '') AS _xid")
    for other, col in sorted(source.external_ids.items()):
        ids.append(f"NULLIF(trim(CAST({q(col)} AS VARCHAR)), '') AS {q('_ext_' + other)}")
    raw = ids + raw
    raw_struct = "to_json(struct_pack(" + ", ".join(f"{q(c)} := {q(c)}" for c in columns) + "))"
    fields = list(source.fields)
    hashed = fields + (["_xid"] if xid_col else []) + ["_ext_" + o for o in sorted(source.external_ids)]
    row_hash = "md5(concat_ws(chr(31), " + ", ".join(
        f"coalesce(CAST({q(f)} AS VARCHAR), chr(0))" for f in hashed) + "))"

    con.execute(f"""
        CREATE OR REPLACE TEMP TABLE _cand AS
        SELECT {key} AS _record_key, {mod} AS _source_modified_at, {', '.join(canon)}, {', '.join(raw)},
               {raw_struct} AS _raw_json,
               concat_ws('; ', {', '.join(checks)}) AS _reasons
        FROM _ext
    """)
    con.execute(
        """INSERT INTO audit.quarantine (run_id, entity, system, record_key, reason, raw, quarantined_at)
           SELECT ?, ?, ?, _record_key, _reasons, _raw_json, ? FROM _cand WHERE _reasons <> ''""",
        [run_id, entity, system, run_at],
    )
    quarantined = con.execute("SELECT count(*) FROM _cand WHERE _reasons <> ''").fetchone()[0]
    con.execute(f"""
        CREATE OR REPLACE TEMP TABLE _good AS
        SELECT * EXCLUDE (_raw_json, _reasons), {sql_literal(run_id)} AS _run_id,
               CAST({sql_literal(run_at.isoformat())} AS TIMESTAMP) AS _extracted_at
        FROM _cand WHERE _reasons = ''
    """)
    con.execute(f"CREATE OR REPLACE TEMP TABLE _good AS SELECT *, {row_hash} AS _row_hash FROM _good")

    if not table_exists(con, table):
        con.execute(f"CREATE TABLE {table} AS SELECT * FROM _good LIMIT 0")
    prev = table
    full = plan["mode"] == "full"
    bad_keys = "(SELECT _record_key FROM _cand WHERE _reasons <> '' AND _record_key IS NOT NULL)"

    counts = con.execute(f"""
        SELECT count(*) FILTER (WHERE p._record_key IS NULL),
               count(*) FILTER (WHERE p._record_key IS NOT NULL AND p._row_hash <> g._row_hash)
        FROM _good g LEFT JOIN {prev} p USING (_record_key)
    """).fetchone()
    inserted, updated = counts
    # Keys gone from a full snapshot are deletions, unless the key is only missing because its row was quarantined.
    con.execute(f"""
        CREATE OR REPLACE TEMP TABLE _deleted AS
        SELECT * FROM {prev}
        WHERE {'TRUE' if full else 'FALSE'}
          AND _record_key NOT IN (SELECT _record_key FROM _good)
          AND _record_key NOT IN {bad_keys}
    """)
    deleted = con.execute("SELECT count(*) FROM _deleted").fetchone()[0]

    # History: every new version and every deletion, per run (the snapshots that let runs be compared).
    con.execute(f"""
        CREATE TABLE IF NOT EXISTS {history} AS
        SELECT *, CAST(NULL AS VARCHAR) AS _change FROM _good LIMIT 0
    """)
    _add_missing_columns(con, history, "_good")
    con.execute(f"""
        INSERT INTO {history} BY NAME
        SELECT g.*, CASE WHEN p._record_key IS NULL THEN 'insert' ELSE 'update' END AS _change
        FROM _good g LEFT JOIN {prev} p USING (_record_key)
        WHERE p._record_key IS NULL OR p._row_hash <> g._row_hash
    """)
    con.execute(f"""
        INSERT INTO {history} BY NAME
        SELECT * EXCLUDE (_run_id, _extracted_at), {sql_literal(run_id)} AS _run_id,
               CAST({sql_literal(run_at.isoformat())} AS TIMESTAMP) AS _extracted_at, 'delete' AS _change
        FROM _deleted
    """)
    echoes = _mark_echoes(con, table, history, entity, system, run_id, columns, source.modified_at)

    # New current state: this run's good rows, plus earlier rows this extract did not replace or delete.
    keep = (["_record_key"] + fields + hashed[len(fields):] + ["_run_id", "_extracted_at", "_source_modified_at",
                                                                "_row_hash"] + ["_raw_" + c for c in columns])
    selected = f"SELECT {', '.join(map(q, keep))} FROM _good"
    if not full and _layout(con, table) == _layout(con, f"({selected})"):
        # An incremental extract into an unchanged layout: replace only the rows it read (a quiet night
        # touches a few rows, not the whole table).
        con.execute(f"DELETE FROM {table} WHERE _record_key IN (SELECT _record_key FROM _good)")
        con.execute(f"INSERT INTO {table} BY NAME {selected}")
    else:
        con.execute(f"""
            CREATE OR REPLACE TABLE {table} AS
            SELECT {', '.join(map(q, keep))} FROM (
                SELECT * FROM _good
                UNION ALL BY NAME
                SELECT * FROM {prev}
                WHERE _record_key NOT IN (SELECT _record_key FROM _good)
                  AND _record_key NOT IN (SELECT _record_key FROM _deleted))
            ORDER BY _record_key""")
    staged = con.execute(f"SELECT count(*) FROM {table}").fetchone()[0]

    newest = con.execute("SELECT max(_source_modified_at) FROM _good").fetchone()[0]
    old = con.execute(
        "SELECT watermark, runs_since_full, last_full_run_id FROM audit.watermarks WHERE entity = ? AND system = ?",
        [entity, system],
    ).fetchone()
    watermark = max([w for w in (newest, old[0] if old else None) if w is not None], default=None)
    runs_since_full = 0 if full else ((old[1] if old else 0) + 1)
    con.execute(
        """INSERT OR REPLACE INTO audit.watermarks (entity, system, watermark, source_hash, runs_since_full,
                                                    last_full_run_id) VALUES (?, ?, ?, ?, ?, ?)""",
        [entity, system, watermark, plan["source_hash"], runs_since_full,
         run_id if full else (old[2] if old else None)],
    )
    con.execute(
        """INSERT OR REPLACE INTO audit.extracts (run_id, entity, system, mode, since, extracted, accepted,
                                                  quarantined, inserted, updated, deleted, staged, watermark)
           VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)""",
        [run_id, entity, system, plan["mode"], plan["since"], extracted, extracted - quarantined, quarantined,
         inserted, updated, deleted, staged, watermark],
    )
    for t in ("_ext", "_cand", "_good", "_deleted"):
        con.execute(f"DROP TABLE IF EXISTS {t}")
    return {"mode": plan["mode"], "extracted": extracted, "quarantined": quarantined, "echoes": echoes,
            "accepted": extracted - quarantined, "staged": staged,
            "inserted": inserted, "updated": updated, "deleted": deleted}


def _record_column_limits(con, entity: str, system: str, run_id: str, path: Path) -> None:
    """audit.column_limits: the declared lengths the extract read (replaced by every extract)."""
    raw = (pq.read_schema(path).metadata or {}).get(MAX_LENGTHS_KEY)
    if raw is None:  # an extract written before lengths were recorded: keep what is known
        return
    lengths = json.loads(raw)
    con.execute("DELETE FROM audit.column_limits WHERE entity = ? AND system = ?", [entity, system])
    con.execute("""INSERT INTO audit.column_limits (entity, system, column_name, max_length, run_id)
                   SELECT ?, ?, unnest(?::VARCHAR[]), unnest(?::BIGINT[]), ?""",
                [entity, system, list(lengths), list(lengths.values()), run_id])


def _mark_echoes(con, table: str, history: str, entity: str, system: str, run_id: str, columns: list[str],
                 modified_at: str | None) -> dict:
    """Our own writes coming back: a new version is an echo (not a user edit) when every column that changed
    since the previous version holds exactly what reconcile last wrote there (audit.write_ledger); a record we
    created (the ledger holds its create) seen for the first time is an echo_insert. Counted apart, so they
    are neither user edits nor volume anomalies. A record deleted and restored, or re-imported, is a source
    change even where it holds values we once wrote: it was staged before, and we never created it."""
    # Only the records this run staged a new version of (a quiet night: few), not the whole ledger.
    con.execute(f"""
        CREATE OR REPLACE TEMP TABLE _ledger AS
        SELECT record_key, column_name, value_hash, created FROM (
            SELECT w.record_key, w.column_name, w.value_hash,
                   bool_or(c.operation = 'create') OVER (PARTITION BY w.record_key) AS created,
                   row_number() OVER (PARTITION BY w.record_key, w.column_name ORDER BY w.written_at DESC) AS rn
            FROM audit.write_ledger w JOIN audit.changes c ON c.change_id = w.change_id AND c.status = 'applied'
            SEMI JOIN (SELECT _record_key FROM {history} WHERE _run_id = ? AND _change IN ('insert', 'update')) h
                ON h._record_key = w.record_key
            WHERE w.entity = ? AND w.target = ? AND w.run_id <> ?) WHERE rn = 1
    """, [run_id, entity, system, run_id])

    def written(c: str) -> str:
        return (f"EXISTS (SELECT 1 FROM _ledger l WHERE l.record_key = h._record_key AND l.column_name = "
                f"{sql_literal(c)} AND l.value_hash = md5(coalesce(CAST(h.{q('_raw_' + c)} AS VARCHAR), chr(0))))")

    # The system stamps its modified time on our writes: that column never counts as a user edit.
    explained = " AND ".join(
        f"(h.{q('_raw_' + c)} IS NOT DISTINCT FROM p.{q('_raw_' + c)} OR {written(c)})"
        for c in columns if c != modified_at) or "TRUE"
    con.execute(f"""
        UPDATE {history} h SET _change = 'echo'
        WHERE h._run_id = {sql_literal(run_id)} AND h._change = 'update'
          AND h._record_key IN (SELECT record_key FROM _ledger)
          AND EXISTS (SELECT 1 FROM {table} p WHERE p._record_key = h._record_key AND {explained})
    """)
    # A record we created: every value we wrote is still there (the other columns hold the system's defaults).
    con.execute(f"""
        UPDATE {history} h SET _change = 'echo_insert'
        WHERE h._run_id = {sql_literal(run_id)} AND h._change = 'insert'
          AND h._record_key IN (SELECT record_key FROM _ledger WHERE created)
          AND h._record_key NOT IN (SELECT _record_key FROM {history} WHERE _run_id <> {sql_literal(run_id)})
          AND NOT EXISTS (SELECT 1 FROM _ledger l WHERE l.record_key = h._record_key AND l.value_hash <>
                          md5(coalesce(CASE l.column_name {' '.join(f"WHEN {sql_literal(c)} THEN CAST(h.{q('_raw_' + c)} AS VARCHAR)" for c in columns)} END, chr(0))))
    """)
    return dict(con.execute(f"""SELECT _change, count(*) FROM {history} WHERE _run_id = ? AND _change LIKE 'echo%'
                                GROUP BY 1""", [run_id]).fetchall())


def _layout(con, relation: str) -> list[tuple[str, str]]:
    """(column, type) of a table or a parenthesised query, in order."""
    return con.execute(f"SELECT column_name, column_type FROM (DESCRIBE {relation})").fetchall()


def _add_missing_columns(con, table: str, like: str) -> None:
    """Schema evolution for history tables: a newly mapped field becomes a new (nullable) column."""
    have = {name for name, _ in _layout(con, table)}
    for name, ctype in _layout(con, like):
        if name not in have:
            con.execute(f"ALTER TABLE {table} ADD COLUMN {q(name)} {ctype}")
