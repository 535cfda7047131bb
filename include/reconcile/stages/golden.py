"""Golden records: staging + identity.xref -> golden.<entity>, its lineage (SCD-2), conflicts, disagreements.

`build` is the single writer the runner's `build_golden` step calls after identity resolution; `erase` is
what `reconcile erase` calls; `find_xids` and `person_report` are the read side of `reconcile lineage`.
Everything is set-based DuckDB SQL: Python only generates the statements from the config.

Incremental: after a first full build, a run rebuilds only the *dirty* xids: those with a linked record
extracted or deleted since the last build (staging `_run_id`, `_history` deletes), a link made or undone
(identity.xref_history), an erasure, or a golden row or current lineage that no longer matches the xid's
status. Everything else keeps its golden row, lineage and conflicts, which is exactly what a full rebuild
would give them (tests/unit/test_golden_incremental.py); a dirty xid whose values did not change keeps its
golden row too. A full rebuild runs on the first build, when the entity's configuration changed
(`config_hash`), or when asked (`build(..., full=True)`).

How a golden value is chosen (per field, see docs/golden.md): among the linked records of the candidate
systems (`CanonicalField.candidate_systems`), blanks never win over values; then
- owner / first_non_null: the first system in order that holds a value;
- most_recent: the value of the most recently modified record;
- most_restrictive: the value ranked first in `restrictive_values` (then system order, then recency);
and within one system (two records on one xid, e.g. after a steward's merge): most recently modified, then
key. When that tie-break had to choose between different values, the conflict is recorded.

Erased persons (identity.erasures) are suppressed: their xid gets no golden row and no new lineage, and the
records they had when the request was made (identity.erased_records) never supply a value to anyone.
"""
from __future__ import annotations

import hashlib
import json
from datetime import datetime
from typing import Any

from ..config.models import Config, EntityConfig
from ..errors import ReconcileError
from ..transforms import quote_ident as q, sql_literal
from ..warehouse import SQL_TYPES, once, staging_table, table_exists, transaction

STAGE = "golden"

def golden_table(entity: str) -> str:
    return f"golden.{entity}"


def lineage_table(entity: str) -> str:
    return f"golden.{entity}_lineage"


def conflicts_table(entity: str) -> str:
    return f"golden.{entity}_conflicts"


def erased_keys_sql(entity: str) -> str:
    """SQL selecting `(system, record_key, xid)` of every record that belongs to an erased person of `entity`.

    The contract for identity resolution: never mint an xid for these records and never move them to
    another xid (keep them on the erased xid, or leave them out); records linked to an erased xid later stay
    suppressed too. Golden enforces it either way: these records never supply a value, and an erased xid
    never gets a golden row.
    """
    e = sql_literal(entity)
    return (f"SELECT system, record_key, xid FROM identity.erased_records WHERE entity = {e} "
            f"UNION SELECT x.system, x.record_key, x.xid FROM identity.xref x "
            f"JOIN identity.erasures r ON r.entity = x.entity AND r.xid = x.xid WHERE x.entity = {e}")


def ensure_tables(con, entity: str) -> None:
    """The entity's lineage and conflicts tables (golden.<entity> itself is rebuilt by every run)."""
    con.execute(f"""CREATE TABLE IF NOT EXISTS {lineage_table(entity)} (
        xid VARCHAR NOT NULL,
        field VARCHAR NOT NULL,
        value VARCHAR,                    -- the golden value as text; NULL when no linked record holds one
        source_system VARCHAR,
        source_record_key VARCHAR,
        source_modified_at TIMESTAMP,     -- the source record's modified time when the value was taken
        rule VARCHAR NOT NULL,            -- owner | fallback | first_non_null | most_recent | most_restrictive | none
        run_id VARCHAR NOT NULL,          -- the run that first believed this value from this source
        valid_from TIMESTAMP NOT NULL,    -- that run's run_at
        valid_to TIMESTAMP                -- NULL while current
    )""")
    con.execute(f"""CREATE TABLE IF NOT EXISTS {conflicts_table(entity)} (
        run_id VARCHAR NOT NULL,
        xid VARCHAR NOT NULL,
        field VARCHAR NOT NULL,
        system VARCHAR NOT NULL,          -- the system with several linked records holding different values
        chosen_record_key VARCHAR NOT NULL,
        chosen_value VARCHAR NOT NULL,
        candidates JSON NOT NULL          -- every record of that system on the xid, in tie-break order
    )""")


def _values_sql(con, ent: EntityConfig, entity: str) -> str:
    """One long row per (linked record, mapped field): xid, field, system, record_key, modified_at, value,
    and whether the xid has other linked records (`shared`).

    One join of each system's staging table with its links, unnested into a row per field."""
    parts = []
    for system in sorted(ent.sources):
        table = staging_table(system, entity)
        fields = [f for f in ent.sources[system].fields if f in ent.fields]
        if not fields or not table_exists(con, table):
            continue
        texts = [f"CAST(s.{q(f)} AS VARCHAR)" for f in fields]
        values = ", ".join(f"CASE WHEN trim({t}) = '' THEN NULL ELSE {t} END" for t in texts)
        parts.append(
            f"SELECT l.xid, unnest([{', '.join(map(sql_literal, fields))}]) AS field, l.system, "
            f"s._record_key AS record_key, s._source_modified_at AS modified_at, unnest([{values}]) AS value, "
            f"l.shared "
            f"FROM _links l JOIN {table} s ON s._record_key = l.record_key WHERE l.system = {sql_literal(system)}")
    if not parts:
        return ("SELECT NULL::VARCHAR AS xid, NULL::VARCHAR AS field, NULL::VARCHAR AS system, "
                "NULL::VARCHAR AS record_key, NULL::TIMESTAMP AS modified_at, NULL::VARCHAR AS value, "
                "NULL::BOOLEAN AS shared WHERE FALSE")
    return "\nUNION ALL\n".join(parts)


def _present_sql(con, ent: EntityConfig, entity: str) -> str:
    """Xids with at least one linked, non-erased record still in staging: the xids that get a golden row."""
    parts = [f"SELECT l.xid FROM _links l JOIN {staging_table(s, entity)} s ON s._record_key = l.record_key "
             f"WHERE l.system = {sql_literal(s)}"
             for s in sorted(ent.sources) if table_exists(con, staging_table(s, entity))]
    return "\nUNION\n".join(parts) if parts else "SELECT NULL::VARCHAR AS xid WHERE FALSE"


def _config_tables(con, ent: EntityConfig) -> None:
    """The field strategies as three small tables, so the ranking itself is one SQL statement."""
    fields, cands, restrictive = [], [], []
    for fname, field in ent.fields.items():
        fields.append(f"SELECT {sql_literal(fname)} AS field, {sql_literal(field.strategy)} AS strategy, "
                      f"{sql_literal(field.owner)} AS owner, {len(field.restrictive_values)} AS unranked")
        mapped_by = [s for s, src in ent.sources.items() if fname in src.fields]
        for rank, system in enumerate(field.candidate_systems(mapped_by)):
            cands.append(f"SELECT {sql_literal(fname)} AS field, {sql_literal(system)} AS system, {rank} AS sys_rank")
        for rank, value in enumerate(field.restrictive_values):
            ftype = SQL_TYPES[field.type]
            # Compared as text exactly as staged values are: the typed value cast back to VARCHAR.
            restrictive.append(f"SELECT {sql_literal(fname)} AS field, "
                               f"CAST(CAST({sql_literal(value)} AS {ftype}) AS VARCHAR) AS value, {rank} AS vrank")
    empty = {"_cands": "SELECT NULL::VARCHAR AS field, NULL::VARCHAR AS system, NULL::INTEGER AS sys_rank WHERE FALSE",
             "_restrictive": "SELECT NULL::VARCHAR AS field, NULL::VARCHAR AS value, NULL::INTEGER AS vrank WHERE FALSE"}
    for name, parts in (("_fields", fields), ("_cands", cands), ("_restrictive", restrictive)):
        body = " UNION ALL ".join(parts) if parts else empty[name]
        con.execute(f"CREATE OR REPLACE TEMP TABLE {name} AS {body}")


def config_hash(ent: EntityConfig) -> str:
    """Changes when anything that decides golden values changes (fields, strategies, sources' mappings)."""
    payload = ent.model_dump(mode="json", include={"fields", "sources"})
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _staging_has_run_ids(con, ent: EntityConfig, entity: str) -> bool:
    """Staging written by the extract stage says which run extracted each row (`_run_id`)."""
    tables = [f"{s}__{entity}" for s in ent.sources]
    n = con.execute(f"""SELECT count(DISTINCT table_name) FROM information_schema.columns
                        WHERE table_schema = 'staging' AND column_name = '_run_id'
                          AND table_name IN ({', '.join(map(sql_literal, tables))})""").fetchone()[0]
    return n == sum(table_exists(con, f"staging.{t}") for t in tables)


def dirty_sql(con, ent: EntityConfig, entity: str, prev_run_id: str, prev_run_at) -> str:
    """Xids whose golden row may differ from the last build's (see the module docstring)."""
    e = sql_literal(entity)
    runs = (f"SELECT run_id FROM audit.runs WHERE entity = {e} AND run_at >= {sql_literal(str(prev_run_at))} "
            f"AND run_id <> {sql_literal(prev_run_id)}")
    touched = []
    for system in sorted(ent.sources):
        table = staging_table(system, entity)
        if not table_exists(con, table):
            continue
        touched.append(f"SELECT {sql_literal(system)} AS system, _record_key FROM {table} WHERE _run_id IN ({runs})")
        if table_exists(con, f"{table}_history"):
            touched.append(f"SELECT {sql_literal(system)}, _record_key FROM {table}_history "
                           f"WHERE _change = 'delete' AND _run_id IN ({runs})")
    records = "\nUNION ALL\n".join(touched) or "SELECT NULL::VARCHAR AS system, NULL::VARCHAR AS _record_key WHERE FALSE"
    active = f"SELECT xid FROM identity.xids WHERE entity = {e} AND status = 'active'"
    return f"""
        SELECT x.xid FROM identity.xref x JOIN ({records}) t ON t.system = x.system AND t._record_key = x.record_key
        WHERE x.entity = {e}
        UNION SELECT xid FROM identity.xref_history WHERE entity = {e} AND run_id IN ({runs})
        UNION SELECT previous_xid FROM identity.xref_history
              WHERE entity = {e} AND run_id IN ({runs}) AND previous_xid IS NOT NULL
        UNION SELECT xid FROM identity.erasures WHERE entity = {e}
        UNION (SELECT xid FROM {lineage_table(entity)} WHERE valid_to IS NULL EXCEPT {active})
        UNION (SELECT xid FROM {golden_table(entity)} EXCEPT {active})"""


def build(con, cfg: Config, entity: str, run_id: str, run_at: datetime, full: bool = False) -> dict:
    """Build golden.<entity> from staging + xref, extend its lineage, record conflicts and disagreements.

    Incremental unless this is the first build, the entity's configuration changed or `full` is set: only
    the dirty xids are rebuilt (the summary's `mode`, `reason` and `rebuilt` say which and how many).
    Idempotent per run id: a run that already built golden returns its recorded summary. Runs must be built
    in run_at order (lineage intervals only move forwards).
    """
    ent = cfg.entity(entity)
    gtable, ltable, ctable = golden_table(entity), lineage_table(entity), conflicts_table(entity)

    def _body() -> dict:
        ensure_tables(con, entity)
        newest = con.execute(f"SELECT max(valid_from) FROM {ltable}").fetchone()[0]
        if newest is not None and run_at < newest:
            raise ReconcileError(f"run {run_id!r} (run_at {run_at}) is older than the newest golden history "
                                 f"({newest}); golden records are built in run order")
        chash = config_hash(ent)
        prev = con.execute("""SELECT run_id, finished_at, result FROM audit.stage_runs
                              WHERE entity = ? AND stage = ? AND run_id <> ?
                              ORDER BY finished_at DESC, run_id DESC LIMIT 1""", [entity, STAGE, run_id]).fetchone()
        reason = ("requested" if full else "first build" if prev is None
                  else "no golden table" if not table_exists(con, gtable)
                  else "entity configuration changed" if json.loads(prev[2]).get("config_hash") != chash
                  else "staging without run ids" if not _staging_has_run_ids(con, ent, entity) else None)
        incremental = reason is None
        dirty = dirty_sql(con, ent, entity, prev[0], prev[1]) if incremental else "SELECT NULL::VARCHAR AS xid"
        con.execute(f"CREATE OR REPLACE TEMP TABLE _dirty AS SELECT DISTINCT xid FROM ({dirty}) WHERE xid IS NOT NULL")
        only_dirty = "AND x.xid IN (SELECT xid FROM _dirty)" if incremental else ""
        # Links of active, non-erased xids, without the records an erased person had.
        con.execute(f"""
            CREATE OR REPLACE TEMP TABLE _links AS
            SELECT x.xid, x.system, x.record_key, count(*) OVER (PARTITION BY x.xid) > 1 AS shared
            FROM identity.xref x JOIN identity.xids i ON i.xid = x.xid AND i.entity = x.entity AND i.status = 'active'
            WHERE x.entity = $1 {only_dirty}
              AND NOT EXISTS (SELECT 1 FROM identity.erasures r WHERE r.entity = $1 AND r.xid = x.xid)
              AND NOT EXISTS (SELECT 1 FROM identity.erased_records r
                              WHERE r.entity = $1 AND r.system = x.system AND r.record_key = x.record_key)
        """, [entity])
        con.execute(f"CREATE OR REPLACE TEMP TABLE _values AS {_values_sql(con, ent, entity)}")
        con.execute(f"CREATE OR REPLACE TEMP TABLE _present AS SELECT DISTINCT xid FROM ({_present_sql(con, ent, entity)})")
        _config_tables(con, ent)

        # One ranking for every strategy: blanks last; restrictive rank (0 unless most_restrictive); recency
        # (most_recent only); system order; then within a system most recently modified, then key. An xid with
        # one linked record has one candidate per field, which wins: only the others are ranked.
        con.execute("""
            CREATE OR REPLACE TEMP TABLE _new AS
            WITH win AS (
                SELECT v.xid, v.field, v.system, v.record_key, v.modified_at, v.value
                FROM _values v JOIN _cands c ON c.field = v.field AND c.system = v.system
                WHERE NOT v.shared
                UNION ALL
                SELECT v.xid, v.field, v.system, v.record_key, v.modified_at, v.value
                FROM _values v
                JOIN _cands c ON c.field = v.field AND c.system = v.system
                JOIN _fields f ON f.field = v.field
                LEFT JOIN _restrictive r ON r.field = v.field AND r.value = v.value
                WHERE v.shared
                QUALIFY row_number() OVER (
                    PARTITION BY v.xid, v.field
                    ORDER BY v.value IS NULL, coalesce(r.vrank, f.unranked),
                             CASE WHEN f.strategy = 'most_recent' THEN v.modified_at END DESC NULLS LAST,
                             c.sys_rank, v.modified_at DESC NULLS LAST, v.record_key) = 1)
            SELECT p.xid, f.field, w.value,
                   CASE WHEN w.value IS NOT NULL THEN w.system END AS source_system,
                   CASE WHEN w.value IS NOT NULL THEN w.record_key END AS source_record_key,
                   CASE WHEN w.value IS NOT NULL THEN w.modified_at END AS source_modified_at,
                   CASE WHEN w.value IS NULL THEN 'none'
                        WHEN f.strategy = 'owner' AND w.system = f.owner THEN 'owner'
                        WHEN f.strategy = 'owner' THEN 'fallback'
                        ELSE f.strategy END AS rule
            FROM _present p CROSS JOIN _fields f
            LEFT JOIN win w ON w.xid = p.xid AND w.field = f.field
        """)

        # Conflicts: the supplying system had several records on the xid with different values (only a
        # system with several linked records on one xid can). Within one system the ranking above is: values
        # before blanks, most recently modified, then key. Those of xids not rebuilt are the last build's.
        con.execute(f"DELETE FROM {ctable} WHERE run_id = ?", [run_id])
        if incremental:
            con.execute(f"""INSERT INTO {ctable} (run_id, xid, field, system, chosen_record_key, chosen_value, candidates)
                            SELECT $1, xid, field, system, chosen_record_key, chosen_value, candidates FROM {ctable}
                            WHERE run_id = $2 AND xid NOT IN (SELECT xid FROM _dirty)""", [run_id, prev[0]])
        con.execute(f"""
            INSERT INTO {ctable} (run_id, xid, field, system, chosen_record_key, chosen_value, candidates)
            SELECT $1, n.xid, n.field, n.source_system, n.source_record_key, n.value,
                   to_json(list(struct_pack(record_key := v.record_key, value := v.value,
                                            source_modified_at := v.modified_at)
                                ORDER BY v.value IS NULL, v.modified_at DESC NULLS LAST, v.record_key))
            FROM (SELECT xid, system FROM _links GROUP BY xid, system HAVING count(*) > 1) m
            JOIN _new n ON n.xid = m.xid AND n.source_system = m.system
            JOIN _values v ON v.xid = n.xid AND v.field = n.field AND v.system = n.source_system
            WHERE n.rule IN ('owner', 'fallback', 'first_non_null')
            GROUP BY n.xid, n.field, n.source_system, n.source_record_key, n.value
            HAVING count(DISTINCT v.value) > 1
        """, [run_id])

        # What changed against the current lineage, before the lineage moves on.
        con.execute(f"""
            CREATE OR REPLACE TEMP TABLE _changed AS
            SELECT DISTINCT n.xid FROM _new n
            LEFT JOIN {ltable} l ON l.valid_to IS NULL AND l.xid = n.xid AND l.field = n.field
            WHERE l.xid IS NULL OR l.value IS DISTINCT FROM n.value
        """)
        scope = "AND xid IN (SELECT xid FROM _dirty)" if incremental else ""
        removed = con.execute(f"""SELECT count(DISTINCT xid) FROM {ltable}
                                  WHERE valid_to IS NULL AND xid NOT IN (SELECT xid FROM _present) {scope}""").fetchone()[0]
        # SCD-2: close every current row whose value or source is no longer what we believe (or whose xid is
        # gone: merged, retired, erased), then open a row wherever no current one is left.
        con.execute(f"""
            UPDATE {ltable} AS l SET valid_to = $1
            WHERE l.valid_to IS NULL {scope.replace('xid IN', 'l.xid IN')} AND NOT EXISTS (
                SELECT 1 FROM _new n
                WHERE n.xid = l.xid AND n.field = l.field AND n.value IS NOT DISTINCT FROM l.value
                  AND n.source_system IS NOT DISTINCT FROM l.source_system
                  AND n.source_record_key IS NOT DISTINCT FROM l.source_record_key)
        """, [run_at])
        con.execute(f"""
            INSERT INTO {ltable} (xid, field, value, source_system, source_record_key, source_modified_at, rule,
                                  run_id, valid_from, valid_to)
            SELECT n.xid, n.field, n.value, n.source_system, n.source_record_key, n.source_modified_at, n.rule,
                   $1, $2, NULL
            FROM _new n
            WHERE NOT EXISTS (SELECT 1 FROM {ltable} l WHERE l.valid_to IS NULL AND l.xid = n.xid AND l.field = n.field)
            ORDER BY n.xid, n.field
        """, [run_id, run_at])

        # The golden table: one typed row per xid; unchanged rows keep the run that last changed them. An
        # incremental build rewrites only the rows that change (values changed, new to the table, or gone): a
        # dirty xid whose values are the same keeps its row, which is what a full rebuild gives it.
        cols = [(f, SQL_TYPES[spec.type]) for f, spec in ent.fields.items()]
        pivot = "".join(f", CAST(max(value) FILTER (WHERE field = {sql_literal(f)}) AS {t}) AS {q(f)}" for f, t in cols)
        names = "".join(f"{q(f)}, " for f, _ in cols)
        if incremental:
            con.execute(f"""CREATE OR REPLACE TEMP TABLE _write AS SELECT xid FROM _changed
                            UNION SELECT xid FROM _present WHERE xid NOT IN (SELECT xid FROM {gtable})""")
            con.execute(f"""DELETE FROM {gtable} WHERE xid IN (SELECT xid FROM _write)
                            OR xid IN (SELECT xid FROM _dirty EXCEPT SELECT xid FROM _present)""")
            con.execute(f"""
                INSERT INTO {gtable} (xid, {names}_run_id, _updated_at)
                SELECT xid{pivot}, $1, $2 FROM _new WHERE xid IN (SELECT xid FROM _write)
                GROUP BY xid ORDER BY xid
            """, [run_id, run_at])
        else:
            before = (f"SELECT xid, _run_id, _updated_at FROM {gtable}" if table_exists(con, gtable) else
                      "SELECT NULL::VARCHAR AS xid, NULL::VARCHAR AS _run_id, NULL::TIMESTAMP AS _updated_at WHERE FALSE")
            con.execute(f"CREATE OR REPLACE TEMP TABLE _prev AS {before}")
            con.execute(f"""CREATE OR REPLACE TABLE {gtable} (xid VARCHAR PRIMARY KEY,
                            {''.join(f'{q(f)} {t}, ' for f, t in cols)}_run_id VARCHAR NOT NULL,
                            _updated_at TIMESTAMP NOT NULL)""")
            con.execute(f"""
                INSERT INTO {gtable} (xid, {names}_run_id, _updated_at)
                SELECT g.*, CASE WHEN c.xid IS NULL AND p.xid IS NOT NULL THEN p._run_id ELSE $1 END,
                       CASE WHEN c.xid IS NULL AND p.xid IS NOT NULL THEN p._updated_at ELSE $2 END
                FROM (SELECT xid{pivot} FROM _new GROUP BY xid) g
                LEFT JOIN _changed c ON c.xid = g.xid LEFT JOIN _prev p ON p.xid = g.xid
                ORDER BY g.xid
            """, [run_id, run_at])

        # The sync assessment: linked records whose staged value differs from the golden one (every xid).
        con.execute("DELETE FROM audit.disagreements WHERE run_id = ? AND entity = ?", [run_id, entity])
        _disagreements(con, ent, entity, run_id)

        by_field = dict(con.execute("""SELECT field, sum(disagreeing)::BIGINT FROM audit.disagreements
                                       WHERE run_id = ? AND entity = ? GROUP BY field""", [run_id, entity]).fetchall())
        summary = {
            "records": con.execute(f"SELECT count(*) FROM {gtable}").fetchone()[0],
            "changed": con.execute("SELECT count(*) FROM _changed").fetchone()[0],
            "removed": removed,
            "conflicts": con.execute(f"SELECT count(*) FROM {ctable} WHERE run_id = ?", [run_id]).fetchone()[0],
            "mode": "incremental" if incremental else "full",
            "reason": reason or "rows, links or decisions changed since the last build",
            "rebuilt": con.execute("SELECT count(*) FROM _dirty" if incremental
                                   else "SELECT count(*) FROM _present").fetchone()[0],
            "config_hash": chash,
            "erased": con.execute("SELECT count(*) FROM identity.erasures WHERE entity = ?", [entity]).fetchone()[0],
            "disagreements": {f: int(by_field.get(f, 0)) for f in ent.fields},
        }
        return summary

    summary = once(con, run_id, entity, STAGE, run_at, _body)
    for t in ("_dirty", "_links", "_values", "_present", "_fields", "_cands", "_restrictive", "_new",
              "_changed", "_prev", "_write"):
        con.execute(f"DROP TABLE IF EXISTS {t}")
    return summary


def _disagreements(con, ent: EntityConfig, entity: str, run_id: str) -> None:
    """audit.disagreements for every golden xid: per system, one join of its staging table, its links and the
    golden table, counting per field the records whose (text, blank as NULL) value differs or is missing."""
    rows = []
    for system in sorted(ent.sources):
        table = staging_table(system, entity)
        fields = [f for f in ent.sources[system].fields if f in ent.fields]
        if not fields or not table_exists(con, table):
            continue
        counts = []
        for f in fields:
            text = f"CAST(s.{q(f)} AS VARCHAR)"
            v, g = f"CASE WHEN trim({text}) = '' THEN NULL ELSE {text} END", f"CAST(g.{q(f)} AS VARCHAR)"
            counts += [f"count(*) FILTER (WHERE {v} IS NOT NULL AND {v} IS DISTINCT FROM {g})",
                       f"count(*) FILTER (WHERE {v} IS NULL AND {g} IS NOT NULL)"]
        got = con.execute(f"""
            SELECT count(*), {', '.join(counts)}
            FROM identity.xref x JOIN {golden_table(entity)} g ON g.xid = x.xid
            JOIN {table} s ON s._record_key = x.record_key
            WHERE x.entity = $1 AND x.system = $2
              AND NOT EXISTS (SELECT 1 FROM identity.erased_records r
                              WHERE r.entity = $1 AND r.system = x.system AND r.record_key = x.record_key)
        """, [entity, system]).fetchone()
        if got[0]:
            rows += [(run_id, entity, f, system, got[0], got[1 + 2 * i], got[2 + 2 * i]) for i, f in enumerate(fields)]
    if rows:
        con.executemany("""INSERT INTO audit.disagreements (run_id, entity, field, system, records, disagreeing, missing)
                           VALUES (?, ?, ?, ?, ?, ?, ?)""", sorted(rows, key=lambda r: (r[2], r[3])))


# ----------------------------------------------------------------------------------------------------------
# Erasure (single writer)
# ----------------------------------------------------------------------------------------------------------

def erase(con, entity: str, xid: str, *, request_id: str, requested_at: datetime, requested_by: str, reason: str,
          matched_by: str) -> dict:
    """Record an erasure request for one xid and suppress it now (golden row removed, lineage closed).

    Also snapshots the xid's linked records into identity.erased_records, so they stay suppressed even if
    identity resolution ever links them elsewhere. Idempotent: a second request returns the first.
    """
    ensure_tables(con, entity)
    old = con.execute("SELECT request_id, requested_at, requested_by, reason FROM identity.erasures "
                      "WHERE entity = ? AND xid = ?", [entity, xid]).fetchone()
    if old:
        return {"entity": entity, "xid": xid, "request_id": old[0], "requested_at": old[1], "requested_by": old[2],
                "reason": old[3], "already": True, "records": _erased_records(con, entity, xid)}
    with transaction(con):
        con.execute("""INSERT INTO identity.erasures (entity, xid, request_id, requested_at, requested_by, reason,
                                                      matched_by, status)
                       VALUES (?, ?, ?, ?, ?, ?, ?, 'requested')""",
                    [entity, xid, request_id, requested_at, requested_by, reason, matched_by])
        con.execute("""INSERT OR IGNORE INTO identity.erased_records (entity, system, record_key, xid, request_id)
                       SELECT entity, system, record_key, xid, ? FROM identity.xref WHERE entity = ? AND xid = ?""",
                    [request_id, entity, xid])
        if table_exists(con, golden_table(entity)):
            con.execute(f"DELETE FROM {golden_table(entity)} WHERE xid = ?", [xid])
        con.execute(f"UPDATE {lineage_table(entity)} SET valid_to = greatest(valid_from, ?) "
                    f"WHERE xid = ? AND valid_to IS NULL", [requested_at, xid])
    return {"entity": entity, "xid": xid, "request_id": request_id, "requested_at": requested_at,
            "requested_by": requested_by, "reason": reason, "already": False,
            "records": _erased_records(con, entity, xid)}


def _erased_records(con, entity: str, xid: str) -> list[str]:
    return [f"{s}:{k}" for s, k in con.execute(
        "SELECT system, record_key FROM identity.erased_records WHERE entity = ? AND xid = ? ORDER BY 1, 2",
        [entity, xid]).fetchall()]


# ----------------------------------------------------------------------------------------------------------
# Finding a person and describing everything held about them (read-only)
# ----------------------------------------------------------------------------------------------------------

def email_fields(ent: EntityConfig, system: str) -> list[str]:
    """Fields a source normalises as emails (the `email` transform)."""
    return [f for f, m in ent.sources[system].fields.items() if any(s.name == "email" for s in m.steps)]


def find_xids(con, cfg: Config, entity: str, *, email: str | None = None, xid: str | None = None,
              record: tuple[str, str] | None = None) -> dict:
    """Xids of `entity` named by an email (in any system's staging, current or past), an xid, or a record.

    Returns {"xids": [...], "unlinked": [system:key, ...] (records found but linked to no xid),
    "merged": {asked xid: surviving xid}}.
    """
    ent = cfg.entity(entity)
    found: set[str] = set()
    unlinked: set[str] = set()
    merged: dict[str, str] = {}
    if email is not None:
        for system in sorted(ent.sources):
            fields = email_fields(ent, system)
            table = staging_table(system, entity)
            if not fields or not table_exists(con, table):
                continue
            tables = [table] + ([f"{table}_history"] if table_exists(con, f"{table}_history") else [])
            match = " OR ".join(f"{q(f)} = lower(trim($1))" for f in fields)
            keys = " UNION ".join(f"SELECT _record_key FROM {t} WHERE {match}" for t in tables)
            rows = con.execute(f"""
                SELECT k._record_key, x.xid FROM ({keys}) k
                LEFT JOIN identity.xref x ON x.entity = $2 AND x.system = $3 AND x.record_key = k._record_key
            """, [email, entity, system]).fetchall()
            for key, x in rows:
                (found.add(x) if x else unlinked.add(f"{system}:{key}"))
    if record is not None:
        row = con.execute("SELECT xid FROM identity.xref WHERE entity = ? AND system = ? AND record_key = ?",
                          [entity, record[0], record[1]]).fetchone()
        if row:
            found.add(row[0])
    if xid is not None:
        current, seen = xid, set()
        while current and current not in seen:
            seen.add(current)
            row = con.execute("SELECT status, merged_into FROM identity.xids WHERE entity = ? AND xid = ?",
                              [entity, current]).fetchone()
            if row is None:
                if current == xid and con.execute("SELECT count(*) FROM identity.xref WHERE entity = ? AND xid = ?",
                                                  [entity, xid]).fetchone()[0]:
                    found.add(xid)
                break
            if row[0] == "merged" and row[1]:
                merged[xid] = row[1]
                current = row[1]
                continue
            found.add(current)
            break
    return {"xids": sorted(found), "unlinked": sorted(unlinked), "merged": merged}


def _rows(con, sql: str, params: list) -> list[dict[str, Any]]:
    cur = con.execute(sql, params)
    names = [d[0] for d in cur.description]
    return [dict(zip(names, r)) for r in cur.fetchall()]


def person_report(con, cfg: Config, entity: str, xid: str) -> dict:
    """Everything the warehouse holds about one xid: linked records with their staged values, golden values
    with source and history, consent, conflicts, erasure, and changes written (audit.changes, if it exists)."""
    ent = cfg.entity(entity)
    ident = _rows(con, "SELECT status, merged_into, minted_run_id, minted_at, minted_from FROM identity.xids "
                       "WHERE entity = ? AND xid = ?", [entity, xid])
    erasure = _rows(con, "SELECT request_id, requested_at, requested_by, reason, matched_by, status "
                         "FROM identity.erasures WHERE entity = ? AND xid = ?", [entity, xid])
    links = _rows(con, """SELECT system, record_key, rule, confidence, run_id, linked_at,
                                 CAST(evidence AS VARCHAR) AS evidence FROM identity.xref
                          WHERE entity = ? AND xid = ? ORDER BY system, record_key""", [entity, xid])
    for link in links:  # why the record is this person: the match model's evidence (docs/identity.md)
        link["evidence"] = json.loads(link["evidence"]) if link["evidence"] else None
    records = []
    for link in links:
        system = link["system"]
        table = staging_table(system, entity)
        staged = []
        if system in ent.sources and table_exists(con, table):
            fields = [f for f in ent.sources[system].fields if f in ent.fields]
            staged = _rows(con, f"SELECT _source_modified_at, {', '.join(q(f) for f in fields)} FROM {table} "
                                f"WHERE _record_key = ?", [link["record_key"]])
        rec = dict(link)
        rec["in_staging"] = bool(staged)
        rec["source_modified_at"] = staged[0].pop("_source_modified_at") if staged else None
        rec["values"] = staged[0] if staged else {}
        records.append(rec)

    golden_row, history, conflicts = None, [], []
    if table_exists(con, golden_table(entity)):
        got = _rows(con, f"SELECT * FROM {golden_table(entity)} WHERE xid = ?", [xid])
        golden_row = got[0] if got else None
    if table_exists(con, lineage_table(entity)):
        history = _rows(con, f"""SELECT field, value, source_system, source_record_key, source_modified_at, rule,
                                        run_id, valid_from, valid_to FROM {lineage_table(entity)}
                                 WHERE xid = ? ORDER BY field, valid_from DESC""", [xid])
    if table_exists(con, conflicts_table(entity)):
        conflicts = _rows(con, f"""SELECT run_id, field, system, chosen_record_key, chosen_value, candidates
                                   FROM {conflicts_table(entity)} WHERE xid = ? AND run_id = (
                                       SELECT run_id FROM audit.stage_runs WHERE entity = ? AND stage = ?
                                       ORDER BY finished_at DESC, run_id DESC LIMIT 1)
                                   ORDER BY field, system""", [xid, entity, STAGE])
        for c in conflicts:
            c["candidates"] = json.loads(c["candidates"])

    fields: dict[str, dict] = {}
    for fname, spec in ent.fields.items():
        past = [h for h in history if h["field"] == fname]
        current = next((h for h in past if h["valid_to"] is None), None) if golden_row is not None else None
        fields[fname] = {
            "value": golden_row.get(fname) if golden_row is not None else None,
            "strategy": spec.strategy, "owner": spec.owner,
            "source_system": current["source_system"] if current else None,
            "source_record_key": current["source_record_key"] if current else None,
            "source_modified_at": current["source_modified_at"] if current else None,
            "rule": current["rule"] if current else None,
            "since": current["valid_from"] if current else None,
            "history": [{k: h[k] for k in ("value", "source_system", "source_record_key", "source_modified_at",
                                            "rule", "run_id", "valid_from", "valid_to")} for h in past],
        }
    consent = {f: {k: v[k] for k in ("value", "source_system", "source_record_key", "source_modified_at", "since")}
               for f, v in fields.items() if ent.fields[f].strategy == "most_restrictive"}
    return {
        "entity": entity, "xid": xid,
        "identity": ident[0] if ident else None,
        "erasure": erasure[0] if erasure else None,
        "in_golden": golden_row is not None,
        "records": records,
        "golden": fields,   # value/source are None when there is no golden row (erased, merged, retired)
        "consent": consent,
        "conflicts": conflicts,
        "changes": _changes(con, entity, xid),
    }


def _changes(con, entity: str, xid: str) -> list[dict] | None:
    """Every change written for this xid (audit.changes, from issue 6), or None while that table does not exist."""
    if not table_exists(con, "audit.changes"):
        return None
    cols = {r[0] for r in con.execute("SELECT column_name FROM information_schema.columns "
                                      "WHERE table_schema = 'audit' AND table_name = 'changes'").fetchall()}
    if "xid" not in cols:
        return None
    where = "xid = ?" + (" AND entity = ?" if "entity" in cols else "")
    params = [xid] + ([entity] if "entity" in cols else [])
    return _rows(con, f"SELECT * FROM audit.changes WHERE {where} ORDER BY ALL", params)
