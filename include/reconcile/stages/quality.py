"""Quality gates: staging -> audit.quality_results, audit.sync_health, holds, write blocks, review items.

Suites are generated from the config per staging table and run with Great Expectations (GX Core 1.x,
ephemeral context, suites as values). GX's SQL engine does not work on DuckDB through duckdb-engine
(GX issues 10738, 11579), so each table is validated as a pandas batch holding *only the columns its suite
needs*; derived per-row flags (e.g. "shares its email with another record") are computed in DuckDB SQL
first, so GX checks a plain column mean. Trend thresholds (volume, duplicate rate) come from earlier runs'
rows in audit.sync_health.

Two halves, so Airflow can validate tables in parallel without contending for the warehouse:
`validate_table` only reads (any number at once); `record_gates` is the single writer that stores results,
finds cross-system collisions and decides which writes are held back.
"""
from __future__ import annotations

import json
import math
import os
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from ..config.expressions import to_duckdb_sql
from ..config.models import DEFAULT_SEVERITY, Config, GateOverrides
from ..transforms import EMAIL_PATTERN, quote_ident as q, sql_literal, staged_text
from ..warehouse import once, staging_table

STAGE = "gates"
DEFAULTS = {"history_runs": 7, "max_growth": 0.5, "max_shrink": 0.3, "tolerance_rows": 5,
            "dup_max_increase": 0.05, "quarantine_max": 0.05}


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


def _has_table(con, name: str) -> bool:
    return bool(con.execute("SELECT count(*) FROM information_schema.tables WHERE table_schema = 'staging' "
                            "AND table_name = ?", [name]).fetchone()[0])


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


def plan_suite(con, cfg: Config, entity: str, system: str, run_id: str, run_at: datetime) -> dict:
    """Decide what to check on one staging table: columns to read, expectations with thresholds."""
    import great_expectations.expectations as gxe

    ent = cfg.entities[entity]
    source = ent.sources[system]
    gates = ent.gates.for_system(system)
    table = staging_table(system, entity)
    checks: list[dict[str, Any]] = []
    columns = ["_record_key"]

    def add(name: str, kind: str, expectation, column: str | None, threshold: dict) -> None:
        checks.append({"name": name, "kind": kind, "column": column, "severity": _severity(gates, kind),
                       "threshold": threshold, "expectation": expectation})

    add("key_unique", "key_unique", gxe.ExpectColumnValuesToBeUnique(column="_record_key"), "_record_key", {})
    add("key_not_null", "key_not_null", gxe.ExpectColumnValuesToNotBeNull(column="_record_key"), "_record_key", {})
    for fname, mapping in source.fields.items():
        field = ent.fields[fname]
        if field.required:
            columns.append(fname)
            add(f"required:{fname}", "required", gxe.ExpectColumnValuesToNotBeNull(column=fname), fname, {})
        if any(s.name == "email" for s in mapping.steps):
            columns.append(fname)
            add(f"email_format:{fname}", "email_format",
                gxe.ExpectColumnValuesToMatchRegex(column=fname, regex=EMAIL_PATTERN), fname,
                {"regex": EMAIL_PATTERN})
        maps = [s for s in mapping.steps if s.name == "map"]
        if maps and field.type == "string":
            allowed = sorted({staged_text(v) for v in maps[-1].mapping.values()})  # as staged: true, not True
            columns.append(fname)
            add(f"picklist:{fname}", "picklist", gxe.ExpectColumnValuesToBeInSet(column=fname, value_set=allowed),
                fname, {"value_set": allowed})

    if gates.freshness.max_age_hours:
        oldest_ok = run_at - timedelta(hours=gates.freshness.max_age_hours)
        columns.append("_source_modified_at")
        add("freshness", "freshness",
            gxe.ExpectColumnMaxToBeBetween(column="_source_modified_at", min_value=oldest_ok),
            "_source_modified_at", {"min_value": oldest_ok.isoformat(), "max_age_hours": gates.freshness.max_age_hours})

    # Volume: a band around the median of the last accepted runs, plus absolute bounds.
    v = gates.volume
    n = v.history_runs or DEFAULTS["history_runs"]
    baseline = _median(_history(con, entity, system, run_id, "staged", "volume_ok", n))
    lo, hi = v.min_rows or 0, v.max_rows
    # Records reconcile itself created last night come back as echo inserts: they shift the band, they are
    # not an anomaly.
    echo = con.execute(f"SELECT count(*) FROM {table}_history WHERE _run_id = ? AND _change = 'echo_insert'",
                       [run_id]).fetchone()[0] if _has_table(con, f"{system}__{entity}_history") else 0
    if baseline is not None:
        tol = DEFAULTS["tolerance_rows"] if v.tolerance_rows is None else v.tolerance_rows
        grow = DEFAULTS["max_growth"] if v.max_growth is None else v.max_growth
        shrink = DEFAULTS["max_shrink"] if v.max_shrink is None else v.max_shrink
        lo = max(lo, math.ceil(baseline * (1 - shrink) - tol) + echo)
        band_hi = math.floor(baseline * (1 + grow) + tol) + echo
        hi = band_hi if hi is None else min(hi, band_hi)
    add("volume", "volume", gxe.ExpectTableRowCountToBeBetween(min_value=max(lo, 0), max_value=hi), None,
        {"min_value": max(lo, 0), "max_value": hi, "baseline_median": baseline, "echo_inserts": echo})

    # Duplicate rate per named key: a 0/1 flag per row computed in SQL, its mean checked by GX.
    flags = {}
    d = gates.duplicate_rate
    for key, fields in duplicate_keys(cfg, entity, system, gates).items():
        norm = [f"lower(trim(CAST({q(f)} AS VARCHAR)))" for f in fields]
        all_set = " AND ".join(f"{q(f)} IS NOT NULL" for f in fields)
        flags[f"_dup_{key}"] = (f"CASE WHEN {all_set} AND count(*) OVER (PARTITION BY {', '.join(norm)}) > 1 "
                                f"THEN 1 ELSE 0 END")
        past = [r for r in _history_json(con, entity, system, run_id, key, n)]
        base = _median(past)
        limit = 1.0
        if base is not None:
            limit = base + (DEFAULTS["dup_max_increase"] if d.max_increase is None else d.max_increase)
        if d.max is not None:
            limit = min(limit, d.max)
        add(f"duplicate_rate:{key}", "duplicate_rate",
            gxe.ExpectColumnMeanToBeBetween(column=f"_dup_{key}", min_value=0, max_value=round(min(limit, 1.0), 6)),
            f"_dup_{key}", {"max_value": round(min(limit, 1.0), 6), "baseline_median": base, "fields": fields})

    qmax = gates.quarantine_rate.max if gates.quarantine_rate.max is not None else DEFAULTS["quarantine_max"]
    add("quarantine_rate", "quarantine_rate",
        gxe.ExpectColumnValuesToBeBetween(column="quarantine_rate", min_value=0, max_value=qmax),
        "quarantine_rate", {"max_value": qmax})
    return {"table": table, "columns": list(dict.fromkeys(columns)), "flags": flags, "checks": checks,
            "volume_baseline": baseline}


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

def validate_table(con, cfg: Config, entity: str, system: str, run_id: str, run_at: datetime,
                   docs_dir: Path | None = None) -> dict:
    """Run the generated suite on one staging table. Reads only; returns JSON-serialisable results."""
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")
    import great_expectations as gx
    import pandas as pd
    from great_expectations.data_context.types.base import ProgressBarsConfig

    plan = plan_suite(con, cfg, entity, system, run_id, run_at)
    table = plan["table"]
    select = ", ".join([q(c) for c in plan["columns"]] + [f"{expr} AS {q(name)}" for name, expr in plan["flags"].items()])
    frame = con.execute(f"SELECT {select} FROM {table}").df()  # only the columns the suite needs
    ext = con.execute("SELECT extracted, quarantined FROM audit.extracts WHERE run_id = ? AND entity = ? AND system = ?",
                      [run_id, entity, system]).fetchone() or (0, 0)
    # Relative to the larger of rows read and rows staged, so a small incremental extract does not swing it.
    denominator = max(ext[0], len(frame))
    qrate = (ext[1] / denominator) if denominator else 0.0
    metrics = pd.DataFrame({"quarantine_rate": [qrate]})

    ctx = gx.get_context(mode="ephemeral")
    ctx.variables.progress_bars = ProgressBarsConfig(globally=False)
    if docs_dir is not None:
        ctx.add_data_docs_site(site_name="reconcile", site_config={
            "class_name": "SiteBuilder",
            "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(docs_dir)},
            "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
        })
    ds = ctx.data_sources.add_pandas("reconcile")
    table_checks = [c for c in plan["checks"] if c["column"] != "quarantine_rate"]
    metric_checks = [c for c in plan["checks"] if c["column"] == "quarantine_rate"]
    if frame.empty:  # a mean over no rows is undefined: duplicate rates only apply to non-empty tables
        table_checks = [c for c in table_checks if c["kind"] != "duplicate_rate"]
    results = []
    for name, df, checks in ((table, frame, table_checks), (f"{table}__extract_metrics", metrics, metric_checks)):
        for c in checks:
            c["expectation"].meta = {"name": c["name"]}
        suite = ctx.suites.add(gx.ExpectationSuite(name=name, expectations=[c["expectation"] for c in checks]))
        batch_def = ds.add_dataframe_asset(name=name).add_batch_definition_whole_dataframe("run")
        vdef = ctx.validation_definitions.add(gx.ValidationDefinition(name=name, data=batch_def, suite=suite))
        actions = [gx.checkpoint.UpdateDataDocsAction(name="docs", site_names=["reconcile"])] if docs_dir else []
        cp = ctx.checkpoints.add(gx.Checkpoint(name=f"cp_{name}", validation_definitions=[vdef], actions=actions))
        run = cp.run(batch_parameters={"dataframe": df},
                     run_id=gx.core.run_identifier.RunIdentifier(run_name=run_id))
        by_name = {c["name"]: c for c in checks}
        for vres in run.run_results.values():
            for r in vres.results:
                c = by_name[r.expectation_config.meta["name"]]
                res = r.result or {}
                observed = res.get("observed_value")
                if c["kind"] == "quarantine_rate":
                    observed = qrate
                elif observed is None and "unexpected_count" in res:
                    observed = f"{res['unexpected_count']} unexpected"
                results.append({
                    "expectation": c["name"], "kind": c["kind"], "gx_expectation": r.expectation_config.type,
                    "column": c["column"], "severity": c["severity"], "success": bool(r.success),
                    "observed_value": _text(observed), "threshold": c["threshold"],
                    "unexpected_count": res.get("unexpected_count"),
                    "sample": [_text(x) for x in (res.get("partial_unexpected_list") or [])[:10]],
                })
    dup_rates = {name.removeprefix("_dup_"): (float(frame[name].mean()) if not frame.empty else 0.0)
                 for name in plan["flags"]}
    return {
        "system": system, "table": table, "results": results,
        "metrics": {"staged": int(len(frame)), "extracted": int(ext[0]), "quarantined": int(ext[1]),
                    "quarantine_rate": qrate, "duplicate_rates": dup_rates,
                    "volume_baseline": plan["volume_baseline"]},
        "data_docs": str(docs_dir / "index.html") if docs_dir else None,
    }


def _text(value: Any) -> str | None:
    if value is None:
        return None
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


# ----------------------------------------------------------------------------------------------------------
# Recording, collisions and blocks (single writer)
# ----------------------------------------------------------------------------------------------------------

def default_identities_sql(cfg: Config, entity: str, system: str) -> str:
    """Until identity resolution exists, each record of a field's owner system is its own identity."""
    ent = cfg.entities[entity]
    mapped = set(ent.sources[system].fields)
    cols = ", ".join(
        (q(f) if f in mapped else f"CAST(NULL AS {_sql_type(ent.fields[f].type)}) AS {q(f)}") for f in ent.fields)
    return (f"SELECT {sql_literal(system + ':')} || _record_key AS identity, "
            f"[struct_pack(system := {sql_literal(system)}, record_key := _record_key)] AS records, {cols} "
            f"FROM {staging_table(system, entity)}")


def golden_identities_sql(cfg: Config, entity: str, owner: str | None = None) -> str:
    """Identities as golden records: the values that would be written, with the records behind each xid."""
    cols = ", ".join(f"g.{q(f)}" for f in cfg.entities[entity].fields)
    return (f"SELECT g.xid AS identity, (SELECT list(struct_pack(system := x.system, record_key := x.record_key) "
            f"ORDER BY x.system, x.record_key) FROM identity.xref x WHERE x.entity = {sql_literal(entity)} "
            f"AND x.xid = g.xid) AS records, {cols} FROM golden.{entity} g")


def _sql_type(ftype: str) -> str:
    return {"string": "VARCHAR", "boolean": "BOOLEAN", "integer": "BIGINT", "number": "DOUBLE", "date": "DATE",
            "timestamp": "TIMESTAMP"}[ftype]


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
            ident = identities_sql(cfg, entity, owner)
            elig = ent.eligibility.get(target)
            where = f"({to_duckdb_sql(elig)})" if elig else "TRUE"
            con.execute(f"""
                CREATE OR REPLACE TEMP TABLE _collide AS
                WITH ids AS (SELECT *, lower(trim(CAST({q(ufield)} AS VARCHAR))) AS _uvalue
                             FROM ({ident}) WHERE {where} AND {q(ufield)} IS NOT NULL),
                     groups AS (SELECT _uvalue FROM ids GROUP BY 1 HAVING count(DISTINCT identity) > 1)
                SELECT i._uvalue AS value, i.identity, to_json(i) AS side FROM ids i JOIN groups USING (_uvalue)
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
                           sides := list(side ORDER BY identity))) AS details
                FROM _collide GROUP BY value
            """)
            con.execute(
                """INSERT INTO review.items
                   SELECT item_id, ?, 'collision', ?, 'open', title, details, ?, ?, ?, ? FROM _col_items
                   ON CONFLICT (item_id) DO UPDATE SET
                       status = CASE WHEN review.items.status IN ('decided', 'ignored') THEN review.items.status
                                     ELSE 'open' END,
                       title = excluded.title, details = excluded.details,
                       last_seen_run = excluded.last_seen_run, updated_at = excluded.updated_at""",
                [entity, target, run_id, run_id, run_at, run_at])
            con.execute(
                f"""INSERT INTO audit.holds
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
                    "INSERT INTO audit.quality_results VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
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
            con.execute("INSERT INTO audit.write_blocks VALUES (?, ?, ?, '*', ?, ?)",
                        [run_id, entity, system, system, reason])
            for fname, field in sorted(ent.fields.items()):
                if field.owner == system:
                    for target in field.send_to:
                        con.execute("INSERT INTO audit.write_blocks VALUES (?, ?, ?, ?, ?, ?)",
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
                       gates_failed, held)
                   VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)""",
                [run_id, entity, system, run_at, m["extracted"], m["quarantined"], m["staged"], m["quarantine_rate"],
                 m["duplicate_rates"].get("email"), m["duplicate_rates"].get("name_company"),
                 json.dumps(m["duplicate_rates"]), base, (m["staged"] / base - 1) if base else None, vol_ok, dup_ok,
                 sum(r["success"] for r in v["results"]),
                 sum((not r["success"]) and r["severity"] == "warn" for r in v["results"]),
                 sum((not r["success"]) and r["severity"] == "error" for r in v["results"]),
                 0],
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
