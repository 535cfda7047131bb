"""Read verbs over the published warehouse: runs, changes, gates, trends, the review queue, a person.

One place for every question a person asks after a run, so the CLI (`status`, `changes`, `gates`, `report`,
`review`, `lineage`), the Airflow UI plugin (plugins/reconcile_plugin.py) and the DAGs ask it the same way and
none of them holds SQL. Every verb opens the published warehouse read-only and closes it before returning
plain, JSON-serialisable values. A deployment that has not run yet has no warehouse file: verbs that list
return empty results then (the pages render "no runs yet"), verbs about one thing raise ReconcileError.
"""
from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from typing import Any

from .config import Config
from .errors import ReconcileError
from .pipeline import in_task_order, task_of

# The statuses a change can end in that mean "held back" (summed as `held` in run summaries).
HELD_STATUSES = ("held", "blocked", "rejected")


@contextlib.contextmanager
def _published(cfg: Config) -> Iterator[Any]:
    from .warehouse import open_published

    con = open_published(cfg)
    try:
        yield con
    finally:
        con.close()


def has_warehouse(cfg: Config) -> bool:
    """Whether a published warehouse exists yet (false before the first run finishes)."""
    return cfg.warehouse_path.exists()


def _dicts(cur) -> list[dict]:
    cols = [d[0] for d in cur.description]
    return [dict(zip(cols, r)) for r in cur.fetchall()]


def _json(value: Any) -> Any:
    return json.loads(value) if isinstance(value, str) else value


def _has_column(con, schema: str, table: str, column: str) -> bool:
    return bool(con.execute("SELECT count(*) FROM information_schema.columns WHERE table_schema = ? "
                            "AND table_name = ? AND column_name = ?", [schema, table, column]).fetchone()[0])


# ---------------------------------------------------------------------------------------------------------
# Runs
# ---------------------------------------------------------------------------------------------------------

def list_runs(cfg: Config, limit: int = 10, entity: str | None = None) -> list[dict]:
    """The newest runs first: run_id, entity, status, run_at, started_at, finished_at, error, summary, owner
    (host:pid of the process working on a running run)."""
    if not has_warehouse(cfg):
        return []
    sql = "SELECT run_id, entity, status, run_at, started_at, finished_at, error, summary, owner FROM audit.runs"
    params: list = []
    if entity:
        sql += " WHERE entity = ?"
        params.append(entity)
    with _published(cfg) as con:
        rows = _dicts(con.execute(sql + " ORDER BY started_at DESC, entity LIMIT ?", [*params, limit]))
    for r in rows:
        r["summary"] = _json(r["summary"])
    return rows


def latest_run_id(cfg: Config, entity: str | None = None) -> str | None:
    """The run id of the newest run (of one entity), or None before the first run."""
    runs = list_runs(cfg, limit=1, entity=entity)
    return runs[0]["run_id"] if runs else None


def _why(run: dict) -> list[str]:
    """Plain sentences saying why a run ended as it did: the reasons and notes its summary recorded
    (reconcile.report), or its error while it has none (running, or recorded by an older version)."""
    s = run.get("summary") or {}
    if "reasons" in s:
        return [*s["reasons"], *s.get("notes", [])]
    return [run["error"]] if run.get("error") else []


def run_status(cfg: Config, run_id: str | None = None, entity: str | None = None) -> dict:
    """One run (default: the newest) with its summary, stages (with seconds where recorded), approvals and
    `why`: the sentences explaining its status. Several entities in one run id: pass `entity`."""
    if not has_warehouse(cfg):
        raise ReconcileError(f"no warehouse at {cfg.warehouse_path} yet: no run has finished")
    with _published(cfg) as con:
        sql = "SELECT run_id, entity, status, run_at, started_at, finished_at, error, summary FROM audit.runs"
        where, params = [], []
        if run_id:
            where.append("run_id = ?")
            params.append(run_id)
        if entity:
            where.append("entity = ?")
            params.append(entity)
        rows = _dicts(con.execute(sql + (" WHERE " + " AND ".join(where) if where else "")
                                  + " ORDER BY started_at DESC, entity LIMIT 1", params))
        if not rows:
            raise ReconcileError(f"no run {run_id!r}{' of ' + entity if entity else ''} in {cfg.warehouse_path} "
                                 f"(see `reconcile status`)")
        run = rows[0]
        run["summary"] = _json(run["summary"])
        stages = con.execute("SELECT stage FROM audit.stage_runs WHERE run_id = ? AND entity = ?",
                             [run["run_id"], run["entity"]]).fetchall()
        approvals = _dicts(con.execute("""SELECT target, required, reasons, decision, decided_by, decided_at, note
                                          FROM audit.approvals WHERE run_id = ? AND entity = ? ORDER BY target""",
                                       [run["run_id"], run["entity"]]))
    timings = (run["summary"] or {}).get("stages") or {}  # task names, in pipeline order (report.stage_seconds)
    done = {task_of(s) for (s,) in stages}
    order = list(timings) + in_task_order(done - set(timings))
    run["stages"] = [{"stage": s, "seconds": timings.get(s), "done": s in done or s in timings} for s in order]
    run["approvals"] = {a.pop("target"): {**a, "reasons": _json(a["reasons"])} for a in approvals}
    run["why"] = _why(run)
    if run["started_at"] and run["finished_at"]:
        run["duration_s"] = round((run["finished_at"] - run["started_at"]).total_seconds(), 1)
    return run


# ---------------------------------------------------------------------------------------------------------
# Changes and approvals
# ---------------------------------------------------------------------------------------------------------

CHANGE_COLUMNS = ("change_id", "run_id", "entity", "target", "record_key", "xid", "operation", "field",
                  "column_name", "before_value", "after_value", "after_raw", "status", "reason", "lineage",
                  "error", "applied_at")


def list_changes(cfg: Config, run_id: str | None = None, entity: str | None = None, target: str | None = None,
                 status: str | None = None, operation: str | None = None, targets: list[str] | None = None,
                 offset: int = 0, limit: int | None = None) -> dict:
    """A run's change-set (default: the newest run that planned changes), filtered and paged.

    Returns {"run_id", "total" (matching rows), "counts" ({target: {operation: {status: n}}} over the whole
    run), "rows"}. Every row has before and after values; a create's `record` is the record to be created
    (its `after_raw` JSON, in the target's columns)."""
    empty = {"run_id": run_id, "total": 0, "counts": {}, "rows": []}
    if not has_warehouse(cfg):
        return empty
    with _published(cfg) as con:
        if run_id is None:
            row = con.execute("""SELECT c.run_id FROM audit.changes c JOIN audit.runs r USING (run_id, entity)
                                 ORDER BY r.started_at DESC LIMIT 1""").fetchone()
            if row is None:
                return empty
            run_id = row[0]
        where, params = ["run_id = ?"], [run_id]
        for col, val in (("entity", entity), ("target", target), ("status", status), ("operation", operation)):
            if val:
                where.append(f"{col} = ?")
                params.append(val)
        if targets:
            where.append(f"target IN ({', '.join('?' * len(targets))})")
            params += list(targets)
        cond = " AND ".join(where)
        total = con.execute(f"SELECT count(*) FROM audit.changes WHERE {cond}", params).fetchone()[0]
        page = " LIMIT ? OFFSET ?" if limit is not None else ""
        rows = _dicts(con.execute(
            f"SELECT {', '.join(CHANGE_COLUMNS)} FROM audit.changes WHERE {cond} "
            f"ORDER BY target, operation, record_key NULLS FIRST, xid, field{page}",
            [*params, *([limit, offset] if limit is not None else [])]))
        counts: dict = {}
        for t, op, st, n in con.execute("""SELECT target, operation, status, count(*) FROM audit.changes
                                           WHERE run_id = ? GROUP BY ALL ORDER BY ALL""", [run_id]).fetchall():
            counts.setdefault(t, {}).setdefault(op, {})[st] = n
    for r in rows:
        r["record"] = _json(r["after_raw"]) if r["operation"] == "create" and r["after_raw"] else None
    return {"run_id": run_id, "total": total, "counts": counts, "rows": rows}


def approvals(cfg: Config, run_id: str, entity: str | None = None) -> list[dict]:
    """A run's approval rows: target, required, reasons, decision (approved | rejected | None), by, at, note,
    and `waiting` (required and not decided yet)."""
    if not has_warehouse(cfg):
        return []
    sql = ("SELECT entity, target, required, reasons, decision, decided_by, decided_at, note FROM audit.approvals "
           "WHERE run_id = ?")
    params: list = [run_id]
    if entity:
        sql += " AND entity = ?"
        params.append(entity)
    with _published(cfg) as con:
        rows = _dicts(con.execute(sql + " ORDER BY entity, target", params))
    for r in rows:
        r["reasons"] = _json(r["reasons"])
        r["waiting"] = bool(r["required"]) and r["decision"] is None
    return rows


# ---------------------------------------------------------------------------------------------------------
# Gates and trends
# ---------------------------------------------------------------------------------------------------------

def gate_outcomes(cfg: Config, run_id: str | None = None, entity: str | None = None, failed: bool = False) -> dict:
    """Quality gate outcomes of a run (default: the newest evaluated): {"run_id", "outcomes", "held"
    ({target: identities}), "blocked" ([{target, field, reason}])}. `failed`: only expectations not met.
    Outcome is passed, warned or failed (an error-level expectation not met)."""
    if not has_warehouse(cfg):
        return {"run_id": None, "outcomes": [], "held": {}, "blocked": []}
    with _published(cfg) as con:
        if run_id is None:
            row = con.execute("SELECT run_id FROM audit.quality_results "
                              "ORDER BY evaluated_at DESC, run_id DESC LIMIT 1").fetchone()
            if row is None:
                return {"run_id": None, "outcomes": [], "held": {}, "blocked": []}
            run_id = row[0]
        sql = """SELECT entity, system, table_name, expectation, severity, success, observed_value, threshold,
                        unexpected_count, sample FROM audit.quality_results WHERE run_id = ?"""
        params: list = [run_id]
        if entity:
            sql += " AND entity = ?"
            params.append(entity)
        if failed:
            sql += " AND NOT success"
        rows = con.execute(sql + " ORDER BY entity, table_name, expectation", params).fetchall()
        held = con.execute("SELECT target, count(DISTINCT identity) FROM audit.holds WHERE run_id = ? "
                           "GROUP BY 1 ORDER BY 1", [run_id]).fetchall()
        blocks = con.execute("SELECT target, field, reason FROM audit.write_blocks WHERE run_id = ? ORDER BY 1, 2",
                             [run_id]).fetchall()
    outcomes = [{"entity": r[0], "system": r[1], "table": r[2], "expectation": r[3], "severity": r[4],
                 "outcome": "passed" if r[5] else ("failed" if r[4] == "error" else "warned"),
                 "observed": r[6], "threshold": _json(r[7]), "unexpected": r[8], "sample": _json(r[9])}
                for r in rows]
    return {"run_id": run_id, "outcomes": outcomes, "held": dict(held),
            "blocked": [{"target": b[0], "field": b[1], "reason": b[2]} for b in blocks]}


def health_trend(cfg: Config, entity: str | None = None, limit: int = 60) -> list[dict]:
    """Per run and system, oldest first: staged volume with its accepted band (the volume gate's min/max),
    duplicate rates with their limit, review-queue size and changes planned/applied/held. For plotting."""
    if not has_warehouse(cfg):
        return []
    where = "WHERE h.entity = ?" if entity else ""
    with _published(cfg) as con:
        rows = _dicts(con.execute(f"""
            WITH recent AS (SELECT DISTINCT run_id, run_at FROM audit.sync_health h {where}
                            ORDER BY run_at DESC, run_id DESC LIMIT ?)
            SELECT h.run_id, h.entity, h.system, h.run_at, h.staged, h.quarantined, h.duplicate_rates,
                   h.review_open, h.changes_planned, h.changes_applied, h.changes_held, h.changes_failed,
                   h.gates_failed, h.gates_warned,
                   v.observed_value AS volume_observed, v.threshold AS volume_threshold, v.success AS volume_ok,
                   d.thresholds AS duplicate_thresholds
            FROM audit.sync_health h JOIN recent USING (run_id, run_at)
            LEFT JOIN audit.quality_results v ON v.run_id = h.run_id AND v.entity = h.entity
                 AND v.system = h.system AND v.expectation = 'volume'
            LEFT JOIN (SELECT run_id, entity, system,
                              json_group_object(expectation, json_object('max', threshold->>'max_value',
                                                                          'ok', success)) AS thresholds
                       FROM audit.quality_results WHERE kind = 'duplicate_rate' GROUP BY ALL) d
                 ON d.run_id = h.run_id AND d.entity = h.entity AND d.system = h.system
            {where} ORDER BY h.run_at, h.run_id, h.system""", [*([entity] if entity else []), limit,
                                                               *([entity] if entity else [])]))
    for r in rows:
        th = _json(r.pop("volume_threshold")) or {}
        r["volume_min"], r["volume_max"] = th.get("min_value"), th.get("max_value")
        r["duplicate_rates"] = _json(r["duplicate_rates"]) or {}
        dup = _json(r.pop("duplicate_thresholds")) or {}
        r["duplicate_limits"] = {k.split(":", 1)[-1]: (float(v["max"]) if v.get("max") is not None else None)
                                 for k, v in dup.items()}
    return rows


# ---------------------------------------------------------------------------------------------------------
# The review queue
# ---------------------------------------------------------------------------------------------------------

def review_queue(cfg: Config, entity: str | None = None, kind: str | None = None, system: str | None = None,
                 status: str | None = "open", limit: int = 200, offset: int = 0) -> dict:
    """Review items, highest priority first: {"total", "items", "facets" ({entity|kind|system: [values]})}.

    Priority is the item's `priority` column or `details.priority` when identity resolution records one
    (higher first), then the match probability, then kind and id: items render whatever details they carry."""
    if not has_warehouse(cfg):
        return {"total": 0, "items": [], "facets": {"entity": [], "kind": [], "system": []}}
    with _published(cfg) as con:
        prio = ("priority" if _has_column(con, "review", "items", "priority")
                else "TRY_CAST(details->>'priority' AS DOUBLE)")
        where, params = ["TRUE"], []
        for col, val in (("entity", entity), ("kind", kind), ("system", system), ("status", status)):
            if val:
                where.append(f"{col} = ?")
                params.append(val)
        cond = " AND ".join(where)
        total = con.execute(f"SELECT count(*) FROM review.items WHERE {cond}", params).fetchone()[0]
        items = _dicts(con.execute(
            f"""SELECT item_id, entity, kind, system, status, title, {prio} AS priority,
                       TRY_CAST(details->>'probability' AS DOUBLE) AS probability, first_seen_run, last_seen_run,
                       updated_at
                FROM review.items WHERE {cond}
                ORDER BY priority DESC NULLS LAST, probability DESC NULLS LAST, kind, item_id LIMIT ? OFFSET ?""",
            [*params, limit, offset]))
        facets = {col: [v for (v,) in con.execute(f"SELECT DISTINCT {col} FROM review.items WHERE {col} IS NOT NULL "
                                                  f"ORDER BY 1").fetchall()] for col in ("entity", "kind", "system")}
    return {"total": total, "items": items, "facets": facets}


def review_item(cfg: Config, item_id: str) -> dict:
    """One review item with its details (as recorded), its decisions, `records`: the records it names side by
    side with their staged values (see item_records), and `effects`: what each decision would change, in words."""
    from .review import show_item

    item = show_item(cfg, item_id)
    item["records"] = item_records(cfg, item)
    item["effects"] = decision_effects(item)
    return item


def _referenced_records(details: Any, system: str | None = None) -> list[tuple[str, str]]:
    """Every (system, record_key) a review item's details name, wherever they sit, in order of appearance.
    A record without its own `system` belongs to the nearest enclosing one (e.g. a duplicate's records)."""
    found: list[tuple[str, str]] = []
    if isinstance(details, dict):
        system = details.get("system") if isinstance(details.get("system"), str) else system
        if system and isinstance(details.get("record_key"), str):
            found.append((system, details["record_key"]))
        for value in details.values():
            found += _referenced_records(value, system)
    elif isinstance(details, list):
        for value in details:
            found += _referenced_records(value, system)
    return list(dict.fromkeys(found))


def item_records(cfg: Config, item: dict) -> list[dict]:
    """The records a review item is about, side by side: system, record_key, xid and the canonical values
    staged for it ({field: value} in the config's field order; `staged` false if no longer in staging)."""
    entity = item["entity"]
    fields = list(cfg.entity(entity).fields) if entity in cfg.entities else []
    refs = _referenced_records(item.get("details") or {}, item.get("system"))
    by_system: dict[str, list[str]] = {}
    for system, key in refs:
        by_system.setdefault(system, []).append(key)
    from .warehouse import table_exists

    values: dict[tuple[str, str], dict] = {}
    xids: dict[tuple[str, str], str] = {}
    with _published(cfg) as con:
        for system, keys in sorted(by_system.items()):
            table = f"{system}__{entity}"
            marks = ", ".join("?" * len(keys))
            for k, x in con.execute(f"SELECT record_key, xid FROM identity.xref WHERE entity = ? AND system = ? "
                                    f"AND record_key IN ({marks})", [entity, system, *keys]).fetchall():
                xids[(system, k)] = x
            if system not in cfg.systems or not table_exists(con, f"staging.{table}"):
                continue
            have = {c for (c,) in con.execute("SELECT column_name FROM information_schema.columns WHERE "
                                              "table_schema = 'staging' AND table_name = ?", [table]).fetchall()}
            cols = [f for f in fields if f in have]
            select = ", ".join(f'"{c}"' for c in ["_record_key", *cols])
            for row in con.execute(f"SELECT {select} FROM staging.{table} WHERE _record_key IN ({marks})",
                                   keys).fetchall():
                values[(system, row[0])] = dict(zip(cols, row[1:]))
    return [{"system": s, "record_key": k, "xid": xids.get((s, k)), "staged": (s, k) in values,
             "values": {f: values.get((s, k), {}).get(f) for f in fields}} for s, k in refs]


def decision_effects(item: dict) -> dict[str, str]:
    """What each decision on this item would do at the next run (plain sentences, from the item's details)."""
    d = item.get("details") or {}
    rec = f"{d['system']}:{d['record_key']}" if d.get("system") and d.get("record_key") else "the record"
    cands = sorted({c.get("xid") for c in d.get("candidates", []) if isinstance(c, dict) and c.get("xid")})
    xids = list(dict.fromkeys(r.get("xid") for r in d.get("records", []) if isinstance(r, dict) and r.get("xid")))
    first = cands[0] if len(cands) == 1 else "the chosen candidate (needs an xid when there are several)"
    subject = next((r for r in item.get("records") or []
                    if (r["system"], r["record_key"]) == (d.get("system"), d.get("record_key"))), None)
    linked = subject is None or subject.get("xid") is not None
    return {
        "link": f"{rec} joins {first}: its values feed that golden record and changes follow for every target",
        "split": (f"{rec} leaves its xid and gets a new one of its own: a separate golden record" if linked
                  else f"nothing to split: {rec} is linked to no xid yet"),
        "merge": (f"the xids {', '.join(xids[1:])} are merged into {xids[0]}: one golden record" if len(xids) > 1
                  else "two xids become one golden record (needs two xids)"),
        "distinct": (f"{rec} is never linked to {', '.join(cands)} by any rule" if cands
                     else "these records are kept apart as different people, whatever the rules say"),
        "ignore": "the item is closed; nothing changes and the rules keep deciding",
    }


def review_decisions(cfg: Config, item_id: str | None = None, limit: int = 200) -> list[dict]:
    """Recorded decisions, newest first (of one item, or all)."""
    if not has_warehouse(cfg):
        return []
    sql = ("SELECT decision_id, item_id, entity, action, system, record_key, xid, other_xid, decided_by, decided_at, "
           "reason, applied_run_id, applied_at FROM review.decisions")
    params: list = []
    if item_id:
        sql += " WHERE item_id = ?"
        params.append(item_id)
    with _published(cfg) as con:
        return _dicts(con.execute(sql + " ORDER BY decided_at DESC, decision_id LIMIT ?", [*params, limit]))
