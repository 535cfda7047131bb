"""Quality gates: staging -> audit.quality_results, audit.sync_health, holds, write blocks, review items.

Suites are generated from the config per staging table; what they cost follows what changed:
- table-level gates (key uniqueness and presence, volume band, duplicate rates, freshness, quarantine rate) are
  aggregates over the whole table, computed set-based in DuckDB every run;
- row-level gates (required fields, email format, picklists) run with Great Expectations (GX Core 1.x,
  ephemeral context, suites as values) on the rows inserted or changed this run (the table's `_history` rows
  of this run). Every row is validated again on the first run, when the row-level suite changed, after a run
  in which a row-level gate failed (so a bad row keeps failing until it is fixed), and every
  `extract.full_every` runs, like the periodic full extract.
GX's SQL engine does not work on DuckDB through duckdb-engine (GX issues 10738, 11579), so GX reads a pandas
batch of only the rows and columns its suite needs. GX is imported once per process, and only when there are
rows to validate. Trend thresholds (volume, duplicate rate) come from earlier runs' rows in audit.sync_health.

Two halves, so Airflow can validate tables in parallel without contending for the warehouse:
`validate_table` only reads (any number at once); `record_gates` is the single writer that stores results,
finds cross-system collisions and decides which writes are held back. The runner calls both.
"""
from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import re
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from ..config.expressions import to_duckdb_sql
from ..config.models import DEFAULT_SEVERITY, Config, GateOverrides
from ..transforms import EMAIL_PATTERN, quote_ident as q, sql_literal, staged_text
from ..warehouse import SQL_TYPES, once, staging_table, table_exists, upsert_review_items

STAGE = "gates"
DEFAULTS = {"history_runs": 7, "max_growth": 0.5, "max_shrink": 0.3, "tolerance_rows": 5,
            "dup_max_increase": 0.05, "quarantine_max": 0.05}
ROW_KINDS = ("required", "email_format", "picklist")  # validated by GX on the rows that changed


# ----------------------------------------------------------------------------------------------------------
# Suites
# ----------------------------------------------------------------------------------------------------------

def duplicate_keys(cfg: Config, entity: str, system: str, gates: GateOverrides) -> dict[str, list[str]]:
    """Named duplicate keys for a source: configured, or email (email-transformed fields) and name + company."""
    source = cfg.entities[entity].sources[system]
    mapped = set(source.fields)
    if gates.duplicate_keys is not None:
        keys = gates.duplicate_keys
    else:
        emails = [f for f, m in source.fields.items() if any(s.name == "email" for s in m.steps)]
        keys = {"email": emails[:1], "name_company": ["first_name", "last_name", "company"]}
    return {k: [f for f in fs if f in mapped] for k, fs in keys.items() if fs and all(f in mapped for f in fs)}


def _severity(gates: GateOverrides, kind: str) -> str:
    return gates.severity.get(kind, DEFAULT_SEVERITY[kind])


def _history(con, entity: str, system: str, run_id: str, column: str, ok_column: str, n: int) -> list[float]:
    rows = con.execute(
        f"""SELECT {column} FROM audit.sync_health
            WHERE entity = ? AND system = ? AND run_id <> ? AND {ok_column} AND {column} IS NOT NULL
            ORDER BY run_at DESC LIMIT ?""",
        [entity, system, run_id, n],
    ).fetchall()
    return [r[0] for r in rows]


def _median(values: list[float]) -> float | None:
    if not values:
        return None
    s = sorted(values)
    mid = len(s) // 2
    return float(s[mid]) if len(s) % 2 else (s[mid - 1] + s[mid]) / 2


def _gx_type(class_name: str) -> str:
    """ExpectColumnValuesToNotBeNull -> expect_column_values_to_not_be_null (GX's expectation type)."""
    return re.sub(r"(?<!^)(?=[A-Z])", "_", class_name).lower()


def plan_suite(con, cfg: Config, entity: str, system: str, run_id: str, run_at: datetime) -> dict:
    """Decide what to check on one staging table: columns to read, expectations with thresholds.

    Each check names the GX expectation class and arguments that state it (`gx`); row-level checks are
    built into GX expectations when they run, table-level ones are computed in SQL with the same meaning.
    """
    ent = cfg.entities[entity]
    source = ent.sources[system]
    gates = ent.gates.for_system(system)
    table = staging_table(system, entity)
    checks: list[dict[str, Any]] = []
    columns = ["_record_key"]

    def add(name: str, kind: str, gx: str, args: dict, column: str | None, threshold: dict) -> None:
        checks.append({"name": name, "kind": kind, "column": column, "severity": _severity(gates, kind),
                       "threshold": threshold, "gx": gx, "gx_args": args})

    add("key_unique", "key_unique", "ExpectColumnValuesToBeUnique", {"column": "_record_key"}, "_record_key", {})
    add("key_not_null", "key_not_null", "ExpectColumnValuesToNotBeNull", {"column": "_record_key"}, "_record_key", {})
    for fname, mapping in source.fields.items():
        field = ent.fields[fname]
        if field.required:
            columns.append(fname)
            add(f"required:{fname}", "required", "ExpectColumnValuesToNotBeNull", {"column": fname}, fname, {})
        if any(s.name == "email" for s in mapping.steps):
            columns.append(fname)
            add(f"email_format:{fname}", "email_format", "ExpectColumnValuesToMatchRegex",
                {"column": fname, "regex": EMAIL_PATTERN}, fname, {"regex": EMAIL_PATTERN})
        maps = [s for s in mapping.steps if s.name == "map"]
        if maps and field.type == "string":
            allowed = sorted({staged_text(v) for v in maps[-1].mapping.values()})  # as staged: true, not True
            columns.append(fname)
            add(f"picklist:{fname}", "picklist", "ExpectColumnValuesToBeInSet", {"column": fname, "value_set": allowed},
                fname, {"value_set": allowed})

    if gates.freshness.max_age_hours:
        oldest_ok = run_at - timedelta(hours=gates.freshness.max_age_hours)
        add("freshness", "freshness", "ExpectColumnMaxToBeBetween",
            {"column": "_source_modified_at", "min_value": oldest_ok},
            "_source_modified_at", {"min_value": oldest_ok.isoformat(), "max_age_hours": gates.freshness.max_age_hours})

    # Volume: a band around the median of the last accepted runs, plus absolute bounds.
    v = gates.volume
    n = v.history_runs or DEFAULTS["history_runs"]
    baseline = _median(_history(con, entity, system, run_id, "staged", "volume_ok", n))
    lo, hi = v.min_rows or 0, v.max_rows
    # Records reconcile itself created last night come back as echo inserts: they shift the band, they are
    # not an anomaly.
    echo = con.execute(f"SELECT count(*) FROM {table}_history WHERE _run_id = ? AND _change = 'echo_insert'",
                       [run_id]).fetchone()[0] if table_exists(con, f"{table}_history") else 0
    if baseline is not None:
        tol = DEFAULTS["tolerance_rows"] if v.tolerance_rows is None else v.tolerance_rows
        grow = DEFAULTS["max_growth"] if v.max_growth is None else v.max_growth
        shrink = DEFAULTS["max_shrink"] if v.max_shrink is None else v.max_shrink
        lo = max(lo, math.ceil(baseline * (1 - shrink) - tol) + echo)
        band_hi = math.floor(baseline * (1 + grow) + tol) + echo
        hi = band_hi if hi is None else min(hi, band_hi)
    add("volume", "volume", "ExpectTableRowCountToBeBetween", {"min_value": max(lo, 0), "max_value": hi}, None,
        {"min_value": max(lo, 0), "max_value": hi, "baseline_median": baseline, "echo_inserts": echo})

    # Duplicate rate per named key: the share of rows whose normalised key another row shares.
    dup_keys = {}
    d = gates.duplicate_rate
    for key, fields in duplicate_keys(cfg, entity, system, gates).items():
        dup_keys[key] = fields
        base = _median(_history_json(con, entity, system, run_id, key, n))
        limit = 1.0
        if base is not None:
            limit = base + (DEFAULTS["dup_max_increase"] if d.max_increase is None else d.max_increase)
        if d.max is not None:
            limit = min(limit, d.max)
        add(f"duplicate_rate:{key}", "duplicate_rate", "ExpectColumnMeanToBeBetween",
            {"column": f"_dup_{key}", "min_value": 0, "max_value": round(min(limit, 1.0), 6)},
            f"_dup_{key}", {"max_value": round(min(limit, 1.0), 6), "baseline_median": base, "fields": fields})

    qmax = gates.quarantine_rate.max if gates.quarantine_rate.max is not None else DEFAULTS["quarantine_max"]
    add("quarantine_rate", "quarantine_rate", "ExpectColumnValuesToBeBetween",
        {"column": "quarantine_rate", "min_value": 0, "max_value": qmax}, "quarantine_rate", {"max_value": qmax})
    row_suite = [{k: c[k] for k in ("name", "gx", "gx_args", "severity")} for c in checks if c["kind"] in ROW_KINDS]
    return {"table": table, "columns": list(dict.fromkeys(columns)), "dup_keys": dup_keys, "checks": checks,
            "volume_baseline": baseline,
            "suite_hash": hashlib.sha256(json.dumps(row_suite, sort_keys=True, default=str).encode()).hexdigest()[:16]}


def _history_json(con, entity, system, run_id, key, n) -> list[float]:
    rows = con.execute(
        """SELECT CAST(duplicate_rates->>? AS DOUBLE) FROM audit.sync_health
           WHERE entity = ? AND system = ? AND run_id <> ? AND duplicate_ok AND duplicate_rates->>? IS NOT NULL
           ORDER BY run_at DESC LIMIT ?""",
        [key, entity, system, run_id, key, n],
    ).fetchall()
    return [r[0] for r in rows]


# ----------------------------------------------------------------------------------------------------------
# Validation (read-only)
# ----------------------------------------------------------------------------------------------------------

@functools.cache
def _gx():
    """Great Expectations, imported once per process (it takes seconds), analytics off and logging quiet."""
    import logging

    os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")
    import great_expectations as gx

    # Some GX modules set their own loggers to INFO (e.g. one line per ephemeral docs site): quiet them all.
    for name in [n for n in logging.root.manager.loggerDict if n.split(".")[0] == "great_expectations"]:
        logging.getLogger(name).setLevel(logging.ERROR)
    return gx


def row_validation(con, cfg: Config, entity: str, system: str, run_id: str, suite_hash: str) -> tuple[str, str]:
    """('full' | 'changed', why): whether the row-level gates check every row this run or only changed ones."""
    if not table_exists(con, f"{staging_table(system, entity)}_history"):
        return "full", "no change history"
    last = con.execute("""SELECT run_id, suite_hash FROM audit.sync_health
                          WHERE entity = ? AND system = ? AND run_id <> ? AND validation IS NOT NULL
                          ORDER BY run_at DESC LIMIT 1""", [entity, system, run_id]).fetchone()
    if last is None:
        return "full", "first validation"
    if last[1] != suite_hash:
        return "full", "row-level suite changed"
    failed = con.execute(f"""SELECT count(*) FROM audit.quality_results WHERE run_id = ? AND entity = ? AND system = ?
                             AND NOT success AND kind IN ({', '.join(map(sql_literal, ROW_KINDS))})""",
                         [last[0], entity, system]).fetchone()[0]
    if failed:
        return "full", f"row-level gates failed in run {last[0]}"
    since_full = con.execute("""SELECT count(*) FROM audit.sync_health
                                WHERE entity = $1 AND system = $2 AND run_id <> $3 AND validation IS NOT NULL
                                  AND run_at >= (SELECT max(run_at) FROM audit.sync_health WHERE entity = $1
                                                 AND system = $2 AND run_id <> $3 AND validation = 'full')""",
                             [entity, system, run_id]).fetchone()[0]
    if since_full >= cfg.extract.full_every:
        return "full", f"periodic full validation (extract.full_every = {cfg.extract.full_every})"
    return "changed", "rows inserted or changed this run"


def _table_gates(con, table: str, plan: dict, qrate: float) -> tuple[dict[str, dict], int, dict[str, float]]:
    """Table-level gates as aggregates over the whole staging table: {name: result}, rows, duplicate rates."""
    fresh = any(c["kind"] == "freshness" for c in plan["checks"])
    staged, null_keys, newest = con.execute(
        f"SELECT count(*), count(*) FILTER (WHERE _record_key IS NULL), "
        f"{'max(_source_modified_at)' if fresh else 'NULL'} FROM {table}").fetchone()
    dup_rows, dup_sample = con.execute(f"""
        SELECT coalesce(sum(n), 0), list(_record_key ORDER BY _record_key)[1:10]
        FROM (SELECT _record_key, count(*) AS n FROM {table} WHERE _record_key IS NOT NULL GROUP BY 1 HAVING n > 1)
    """).fetchone()
    rates = {}
    for key, fields in plan["dup_keys"].items():
        norm = ", ".join(f"lower(trim(CAST({q(f)} AS VARCHAR)))" for f in fields)
        all_set = " AND ".join(f"{q(f)} IS NOT NULL" for f in fields)
        shared = con.execute(f"""SELECT coalesce(sum(n), 0) FROM (SELECT count(*) AS n FROM {table} WHERE {all_set}
                                 GROUP BY {norm} HAVING n > 1)""").fetchone()[0]
        rates[key] = (shared / staged) if staged else 0.0
    out = {}
    for c in plan["checks"]:
        a, kind = c["gx_args"], c["kind"]
        unexpected, sample = None, []
        if kind == "key_unique":
            ok, unexpected, sample = dup_rows == 0, int(dup_rows), list(dup_sample or [])
            observed = f"{unexpected} unexpected"
        elif kind == "key_not_null":
            ok, unexpected, sample = null_keys == 0, int(null_keys), [None] * min(int(null_keys), 10)
            observed = f"{unexpected} unexpected"
        elif kind == "volume":
            ok = staged >= a["min_value"] and (a["max_value"] is None or staged <= a["max_value"])
            observed = staged
        elif kind == "freshness":
            ok, observed = newest is not None and newest >= a["min_value"], newest
        elif kind == "duplicate_rate":
            if not staged:  # a rate over no rows is undefined: duplicate rates only apply to non-empty tables
                continue
            observed = rates[c["column"].removeprefix("_dup_")]
            ok = a["min_value"] <= observed <= a["max_value"]
        elif kind == "quarantine_rate":
            ok, observed = a["min_value"] <= qrate <= a["max_value"], qrate
        else:
            continue
        out[c["name"]] = _result(c, ok, observed, unexpected, sample)
    return out, staged, rates


def _result(c: dict, ok: bool, observed, unexpected: int | None, sample: list) -> dict:
    return {"expectation": c["name"], "kind": c["kind"], "gx_expectation": _gx_type(c["gx"]),
            "column": c["column"], "severity": c["severity"], "success": bool(ok),
            "observed_value": _text(observed), "threshold": c["threshold"], "unexpected_count": unexpected,
            "sample": [_text(x) for x in sample[:10]]}


def _row_gates(frame, checks: list[dict], table: str, run_id: str, docs_dir: Path | None) -> dict[str, dict]:
    """Row-level gates with Great Expectations on `frame` (the rows to validate): {name: result}."""
    if frame.empty:
        return {c["name"]: _result(c, True, "0 unexpected", 0, []) for c in checks}
    gx = _gx()
    from great_expectations.data_context.types.base import ProgressBarsConfig

    ctx = gx.get_context(mode="ephemeral")
    ctx.variables.progress_bars = ProgressBarsConfig(globally=False)
    if docs_dir is not None:
        ctx.add_data_docs_site(site_name="reconcile", site_config={
            "class_name": "SiteBuilder",
            "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(docs_dir)},
            "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
        })
    ds = ctx.data_sources.add_pandas("reconcile")
    expectations = []
    for c in checks:
        e = getattr(gx.expectations, c["gx"])(**c["gx_args"])
        e.meta = {"name": c["name"]}
        expectations.append(e)
    suite = ctx.suites.add(gx.ExpectationSuite(name=table, expectations=expectations))
    batch_def = ds.add_dataframe_asset(name=table).add_batch_definition_whole_dataframe("run")
    vdef = ctx.validation_definitions.add(gx.ValidationDefinition(name=table, data=batch_def, suite=suite))
    actions = [gx.checkpoint.UpdateDataDocsAction(name="docs", site_names=["reconcile"])] if docs_dir else []
    cp = ctx.checkpoints.add(gx.Checkpoint(name=f"cp_{table}", validation_definitions=[vdef], actions=actions))
    run = cp.run(batch_parameters={"dataframe": frame}, run_id=gx.core.run_identifier.RunIdentifier(run_name=run_id))
    by_name = {c["name"]: c for c in checks}
    out = {}
    for vres in run.run_results.values():
        for r in vres.results:
            c = by_name[r.expectation_config.meta["name"]]
            res = r.result or {}
            observed = res.get("observed_value")
            if observed is None and "unexpected_count" in res:
                observed = f"{res['unexpected_count']} unexpected"
            out[c["name"]] = _result(c, r.success, observed, res.get("unexpected_count"),
                                     res.get("partial_unexpected_list") or [])
    return out


def validate_table(con, cfg: Config, entity: str, system: str, run_id: str, run_at: datetime,
                   docs_dir: Path | None = None) -> dict:
    """Run the generated suite on one staging table. Reads only; returns JSON-serialisable results."""
    plan = plan_suite(con, cfg, entity, system, run_id, run_at)
    table = plan["table"]
    ext = con.execute("SELECT extracted, quarantined FROM audit.extracts WHERE run_id = ? AND entity = ? AND system = ?",
                      [run_id, entity, system]).fetchone() or (0, 0)
    staged = con.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
    # Relative to the larger of rows read and rows staged, so a small incremental extract does not swing it.
    denominator = max(ext[0], staged)
    qrate = (ext[1] / denominator) if denominator else 0.0
    by_name, staged, rates = _table_gates(con, table, plan, qrate)

    row_checks = [c for c in plan["checks"] if c["kind"] in ROW_KINDS]
    mode, why = row_validation(con, cfg, entity, system, run_id, plan["suite_hash"])
    row_cols = list(dict.fromkeys(["_record_key"] + [c["column"] for c in row_checks]))
    where = "" if mode == "full" else (
        f" WHERE _record_key IN (SELECT _record_key FROM {table}_history WHERE _run_id = {sql_literal(run_id)} "
        f"AND _change <> 'delete')")
    frame = con.execute(f"SELECT {', '.join(map(q, row_cols))} FROM {table}{where}").df() if row_checks else None
    validated = 0 if frame is None else len(frame)
    if row_checks:
        by_name.update(_row_gates(frame, row_checks, table, run_id, docs_dir))
    results = [by_name[c["name"]] for c in plan["checks"] if c["name"] in by_name]
    return {
        "system": system, "table": table, "results": results,
        "metrics": {"staged": int(staged), "extracted": int(ext[0]), "quarantined": int(ext[1]),
                    "quarantine_rate": qrate, "duplicate_rates": rates,
                    "volume_baseline": plan["volume_baseline"], "rows_validated": validated,
                    "validation": mode, "validation_reason": why, "suite_hash": plan["suite_hash"]},
        "data_docs": str(docs_dir / "index.html") if docs_dir and validated else None,
    }


def _text(value: Any) -> str | None:
    if value is None:
        return None
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, datetime):
        return value.isoformat()
    return str(value)


# ----------------------------------------------------------------------------------------------------------
# Recording, collisions and blocks (single writer)
# ----------------------------------------------------------------------------------------------------------

# The collision guard's identities: `identities_sql(cfg, entity, owner, only=None)` returns SQL yielding
# (identity, records, the entity's fields); `only` names a relation with an `identity` column to keep to.

def default_identities_sql(cfg: Config, entity: str, system: str, only: str | None = None) -> str:
    """Until identity resolution exists, each record of a field's owner system is its own identity."""
    ent = cfg.entities[entity]
    mapped = set(ent.sources[system].fields)
    cols = ", ".join(
        (q(f) if f in mapped else f"CAST(NULL AS {SQL_TYPES[ent.fields[f].type]}) AS {q(f)}") for f in ent.fields)
    sql = (f"SELECT {sql_literal(system + ':')} || _record_key AS identity, "
           f"[struct_pack(system := {sql_literal(system)}, record_key := _record_key)] AS records, {cols} "
           f"FROM {staging_table(system, entity)}")
    return f"SELECT * FROM ({sql}) SEMI JOIN {only} USING (identity)" if only else sql


def golden_identities_sql(cfg: Config, entity: str, owner: str | None = None, only: str | None = None) -> str:
    """Identities as golden records: the values that would be written, with the records behind each xid (listed
    by one join, not per xid: with `only`, for those xids alone)."""
    cols = ", ".join(f"g.{q(f)}" for f in cfg.entities[entity].fields)
    keep_g = f" SEMI JOIN {only} o ON o.identity = g.xid" if only else ""
    keep_x = f" SEMI JOIN {only} o ON o.identity = x.xid" if only else ""
    return (f"SELECT g.xid AS identity, r.records, {cols} FROM golden.{entity} g{keep_g} "
            f"LEFT JOIN (SELECT x.xid, list(struct_pack(system := x.system, record_key := x.record_key) "
            f"ORDER BY x.system, x.record_key) AS records FROM identity.xref x{keep_x} "
            f"WHERE x.entity = {sql_literal(entity)} GROUP BY x.xid) r ON r.xid = g.xid")


def find_collisions(con, cfg: Config, entity: str, run_id: str, run_at: datetime,
                    identities_sql=default_identities_sql) -> dict[str, int]:
    """For every target with `unique:` fields: identities that would share one unique value there are held.

    Writes audit.holds and one review item per colliding value. Returns {target: identities held}.
    """
    ent = cfg.entities[entity]
    held: dict[str, int] = {}
    seen_items: list[str] = []
    for target, sysconf in sorted(cfg.systems.items()):
        if target not in ent.sources:
            continue
        for ufield in sysconf.unique:
            if ufield not in ent.fields or not ent.fields[ufield].owner:
                continue
            owner = ent.fields[ufield].owner
            elig = ent.eligibility.get(target)
            where = f"({to_duckdb_sql(elig)})" if elig else "TRUE"
            uvalue = f"lower(trim(CAST({q(ufield)} AS VARCHAR)))"
            # First the identities that collide and their value, from the values alone; then their whole rows
            # (each item's sides, with the records behind them) for those few only.
            con.execute(f"""
                CREATE OR REPLACE TEMP TABLE _colliding AS
                WITH ids AS (SELECT DISTINCT identity, {uvalue} AS _uvalue
                             FROM ({identities_sql(cfg, entity, owner)}) WHERE {where} AND {q(ufield)} IS NOT NULL)
                SELECT identity, _uvalue FROM ids
                WHERE _uvalue IN (SELECT _uvalue FROM ids GROUP BY 1 HAVING count(*) > 1)
            """)
            con.execute(f"""
                CREATE OR REPLACE TEMP TABLE _collide AS
                SELECT c._uvalue AS value, c.identity, to_json(i) AS side
                FROM (SELECT *, {uvalue} AS _uvalue FROM ({identities_sql(cfg, entity, owner, only='_colliding')})) i
                JOIN _colliding c USING (identity)
            """)
            # One review item per colliding value (id stable across runs), one hold per identity: set-based.
            key = f"collision|{entity}|{target}|{ufield}|"
            con.execute(f"""
                CREATE OR REPLACE TEMP TABLE _col_items AS
                SELECT 'col_' || substr(sha256({sql_literal(key)} || value), 1, 16) AS item_id, value,
                       count(*) || ' {entity} records would share {ufield} "' || value ||
                       '" in {target}, which requires it to be unique' AS title,
                       to_json(struct_pack(target := {sql_literal(target)}, field := {sql_literal(ufield)},
                           value := value, identities := list(identity ORDER BY identity),
                           sides := list(side ORDER BY identity), priority := 1.0)) AS details
                FROM _collide GROUP BY value
            """)
            upsert_review_items(con, f"SELECT item_id, {sql_literal(target)} AS system, title, details FROM _col_items",
                                entity, "collision", run_id, run_at)
            con.execute(
                f"""INSERT INTO audit.holds (run_id, entity, target, identity, reason, item_id)
                    SELECT ?, ?, ?, c.identity,
                           {sql_literal(ufield + ' "')} || c.value || {sql_literal('" would be shared with another ' + entity + ' in ' + target)},
                           i.item_id
                    FROM _collide c JOIN _col_items i USING (value)""",
                [run_id, entity, target])
            seen_items += [r[0] for r in con.execute("SELECT item_id FROM _col_items").fetchall()]
            n = con.execute("SELECT count(DISTINCT identity) FROM _collide").fetchone()[0]
            if n:
                held[target] = held.get(target, 0) + n
    # Collisions that no longer occur are resolved (their item stays for the record).
    con.execute(
        f"""UPDATE review.items SET status = 'resolved', updated_at = ?
            WHERE entity = ? AND kind = 'collision' AND status = 'open'
              AND item_id NOT IN (SELECT unnest(?::VARCHAR[]))""",
        [run_at, entity, seen_items],
    )
    return held


def record_gates(con, cfg: Config, entity: str, run_id: str, run_at: datetime, validations: dict[str, dict],
                 docs_index: str | None = None) -> dict:
    """Store every outcome, compute holds and write blocks, update sync health. Idempotent per run id."""
    ent = cfg.entities[entity]

    def _body() -> dict:
        for t in ("audit.quality_results", "audit.write_blocks", "audit.sync_health"):
            con.execute(f"DELETE FROM {t} WHERE run_id = ? AND entity = ?", [run_id, entity])
        passed = warned = failed = 0
        failures = []
        for system, v in sorted(validations.items()):
            for r in v["results"]:
                con.execute(
                    """INSERT INTO audit.quality_results (run_id, entity, system, table_name, expectation, kind,
                           gx_expectation, column_name, severity, success, observed_value, threshold,
                           unexpected_count, sample, evaluated_at)
                       VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)""",
                    [run_id, entity, system, v["table"], r["expectation"], r["kind"], r["gx_expectation"], r["column"],
                     r["severity"], r["success"], r["observed_value"], json.dumps(r["threshold"], default=str),
                     r["unexpected_count"], json.dumps(r["sample"]), run_at],
                )
                if r["success"]:
                    passed += 1
                    continue
                failures.append({"system": system, "table": v["table"], "expectation": r["expectation"],
                                 "severity": r["severity"], "observed": r["observed_value"],
                                 "threshold": r["threshold"]})
                if r["severity"] == "error":
                    failed += 1
                else:
                    warned += 1

        # An error on a system's table blocks every write into it, and every write of its fields elsewhere.
        for system, v in sorted(validations.items()):
            errors = [r["expectation"] for r in v["results"] if not r["success"] and r["severity"] == "error"]
            if not errors:
                continue
            reason = f"error gate(s) failed on {v['table']}: {', '.join(errors)}"
            con.execute("INSERT INTO audit.write_blocks (run_id, entity, target, field, source_system, reason) "
                        "VALUES (?, ?, ?, '*', ?, ?)",
                        [run_id, entity, system, system, reason])
            for fname, field in sorted(ent.fields.items()):
                if field.owner == system:
                    for target in field.send_to:
                        con.execute("INSERT INTO audit.write_blocks (run_id, entity, target, field, source_system, "
                                    "reason) VALUES (?, ?, ?, ?, ?, ?)",
                                    [run_id, entity, target, fname, system, reason])

        for system, v in sorted(validations.items()):
            m = v["metrics"]
            res = {r["expectation"]: r for r in v["results"]}
            vol_ok = res.get("volume", {}).get("success", True)
            dup_ok = all(r["success"] for r in v["results"] if r["kind"] == "duplicate_rate")
            base = m["volume_baseline"]
            con.execute(
                """INSERT INTO audit.sync_health (run_id, entity, system, run_at, extracted, quarantined, staged,
                       quarantine_rate, duplicate_rate_email, duplicate_rate_name_company, duplicate_rates,
                       volume_baseline, volume_change, volume_ok, duplicate_ok, gates_passed, gates_warned,
                       gates_failed, held, rows_validated, validation, suite_hash)
                   VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)""",
                [run_id, entity, system, run_at, m["extracted"], m["quarantined"], m["staged"], m["quarantine_rate"],
                 m["duplicate_rates"].get("email"), m["duplicate_rates"].get("name_company"),
                 json.dumps(m["duplicate_rates"]), base, (m["staged"] / base - 1) if base else None, vol_ok, dup_ok,
                 sum(r["success"] for r in v["results"]),
                 sum((not r["success"]) and r["severity"] == "warn" for r in v["results"]),
                 sum((not r["success"]) and r["severity"] == "error" for r in v["results"]),
                 0, m.get("rows_validated"), m.get("validation"), m.get("suite_hash")],
            )
        blocked_targets = sorted({r[0] for r in con.execute(
            "SELECT target FROM audit.write_blocks WHERE run_id = ? AND entity = ?", [run_id, entity]).fetchall()})
        summary = {"passed": passed, "warned": warned, "failed": failed,
                   "blocked": blocked_targets, "failures": failures, "data_docs": docs_index}
        return summary

    return once(con, run_id, entity, STAGE, run_at, _body)


def write_docs_index(docs_root: Path, run_id: str, validations: dict[str, dict]) -> str:
    """A small index page linking each table's GX Data Docs for this run."""
    docs_root.mkdir(parents=True, exist_ok=True)
    items = []
    for system, v in sorted(validations.items()):
        bad = [r["expectation"] for r in v["results"] if not r["success"]]
        state = "all passed" if not bad else "not met: " + ", ".join(bad)
        items.append(f'<li><a href="{system}/index.html">{v["table"]}</a>: {state}</li>')
    page = (f"<!doctype html><meta charset='utf-8'><title>reconcile gates {run_id}</title>"
            f"<h1>Quality gates, run {run_id}</h1><ul>{''.join(items)}</ul>")
    (docs_root / "index.html").write_text(page, encoding="utf-8")
    return str(docs_root / "index.html")


GUARD_STAGE = "guard"


def guard_collisions(con, cfg: Config, entity: str, run_id: str, run_at: datetime,
                     identities_sql=default_identities_sql) -> dict:
    """The collision guard as its own step (after identity resolution, on xids). Idempotent per run id."""

    def _body() -> dict:
        con.execute("DELETE FROM audit.holds WHERE run_id = ? AND entity = ?", [run_id, entity])
        held = find_collisions(con, cfg, entity, run_id, run_at, identities_sql)
        for system, n in held.items():
            con.execute("UPDATE audit.sync_health SET held = ? WHERE run_id = ? AND entity = ? AND system = ?",
                        [n, run_id, entity, system])
        result = {"held": held}
        return result

    return once(con, run_id, entity, GUARD_STAGE, run_at, _body)
