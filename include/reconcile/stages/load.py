"""Load: audit.changes (planned, allowed) -> the target system, in batches, exactly once, resumable.

Per batch of records: the changes are marked `applying` in the warehouse (committed) before the target's
transaction starts, then each record is written inside its own savepoint after an optimistic-concurrency
check (the target still holds what was extracted; otherwise `skipped_conflict`, re-planned next run), with
its before-image captured for rollback. After the target commits, the outcomes are committed here. A load
killed between the two commits is resumed by verifying `applying` changes against the target: a value
already written is marked applied, not written again. Python loops here only at the connector boundary.
"""
from __future__ import annotations

import hashlib
import json
import sys
import time
from datetime import datetime, timezone

from ..config.models import Config
from ..connectors import connect
from ..connectors.sql import SqlWriter
from ..errors import ReconcileError

STAGE = "load"
LOADABLE = ("planned", "applying")


def _now() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


def _hash(value) -> str:
    return hashlib.md5(("\x00" if value is None else str(value)).encode()).hexdigest()


def allowed_targets(con, entity: str, run_id: str) -> dict[str, str]:
    """target -> why it may (or may not) load: approval state per target."""
    rows = con.execute("SELECT target, required, decision FROM audit.approvals WHERE run_id = ? AND entity = ?",
                       [run_id, entity]).fetchall()
    out = {}
    for target, required, decision in rows:
        if decision == "rejected":
            out[target] = "rejected"
        elif required and decision != "approved":
            out[target] = "awaiting_approval"
        else:
            out[target] = "ok"
    return out


def load_target(con, cfg: Config, entity: str, target: str, run_id: str, url: str, progress=None) -> dict:
    """Apply the run's loadable changes for one target. Safe to call again after a crash."""
    state = allowed_targets(con, entity, run_id).get(target, "ok")
    if state != "ok":
        return {"target": target, "status": state, "applied": 0, "failed": 0, "skipped_conflict": 0}
    source = cfg.entities[entity].sources[target]
    settings = cfg.load
    writer = SqlWriter(connect(target, url), source)
    attempt = f"{run_id}@{_now().isoformat()}"
    watched = [source.modified_at] if source.modified_at else [m.column for m in source.fields.values()]
    try:
        _resume(con, writer, entity, target, run_id)
        attempted = failed = 0
        stopped = None
        while True:
            batch = _next_batch(con, entity, target, run_id, settings.batch_size)
            if not batch:
                break
            ids = [c["change_id"] for g in batch for c in g["changes"]]
            con.execute("UPDATE audit.changes SET status = 'applying', load_attempt = ? WHERE change_id IN "
                        "(SELECT unnest(?::VARCHAR[]))", [attempt, ids])
            outcomes = _apply_batch(writer, batch, watched)
            _record(con, entity, target, run_id, outcomes)
            attempted += len(outcomes)
            failed += sum(o["status"] == "failed" for o in outcomes)
            if progress:
                progress(f"  load {target}: {attempted} changes attempted, {failed} failed")
            if attempted >= 10 and failed / attempted > settings.max_failure_rate:
                stopped = (f"stopped: {failed} of {attempted} changes failed (> load.max_failure_rate "
                           f"{settings.max_failure_rate:.0%}); the rest stay planned")
                break
            if settings.pause_seconds:
                time.sleep(settings.pause_seconds)
    finally:
        writer.c.close()
    counts = dict(con.execute("""SELECT status, count(*) FROM audit.changes WHERE run_id = ? AND entity = ?
                                 AND target = ? GROUP BY 1""", [run_id, entity, target]).fetchall())
    return {"target": target, "status": "stopped" if stopped else "done", "reason": stopped,
            "applied": counts.get("applied", 0), "failed": counts.get("failed", 0),
            "skipped_conflict": counts.get("skipped_conflict", 0)}


def _next_batch(con, entity, target, run_id, size) -> list[dict]:
    """The next records' planned changes, grouped by record (a create is its own group)."""
    rows = con.execute("""
        WITH pending AS (
            SELECT *, coalesce(record_key, 'create:' || xid) AS grp FROM audit.changes
            WHERE run_id = ? AND entity = ? AND target = ? AND status = 'planned'),
        groups AS (SELECT DISTINCT grp FROM pending ORDER BY grp LIMIT ?)
        SELECT p.grp, p.change_id, p.record_key, p.xid, p.operation, p.field, p.column_name, p.after_raw, p.expected
        FROM pending p JOIN groups USING (grp) ORDER BY p.grp, p.operation, p.change_id
    """, [run_id, entity, target, size]).fetchall()
    groups: dict[str, dict] = {}
    for grp, cid, key, xid, op, field, col, after, expected in rows:
        g = groups.setdefault(grp, {"record_key": key, "xid": xid, "changes": [],
                                    "expected": json.loads(expected) if expected else None})
        g["changes"].append({"change_id": cid, "operation": op, "field": field, "column": col, "after": after})
    return list(groups.values())


def _apply_batch(writer: SqlWriter, batch: list[dict], watched: list[str]) -> list[dict]:
    outcomes: list[dict] = []
    with writer.batch() as conn:
        keys = [g["record_key"] for g in batch if g["record_key"] is not None]
        columns = sorted({c["column"] for g in batch for c in g["changes"] if c["column"]} | set(watched))
        current = writer.current(conn, keys, columns) if keys else {}
        for g in batch:
            outcomes += _apply_group(writer, conn, g, current, watched)
    return outcomes


def _apply_group(writer: SqlWriter, conn, g: dict, current: dict, watched: list[str]) -> list[dict]:
    changes = g["changes"]
    key = g["record_key"]

    def all_(status, **extra):
        return [{"change_id": c["change_id"], "status": status, **extra} for c in changes]

    if key is not None:
        now_vals = current.get(key)
        if now_vals is None:
            return all_("skipped_conflict", error=f"record {key} no longer exists in the target")
        expected = g["expected"] or {}
        drift = {c: (expected.get(c), now_vals.get(c)) for c in watched if c in expected and expected.get(c) != now_vals.get(c)}
        if drift:
            return all_("skipped_conflict", error="changed in the target since extraction: " + ", ".join(
                f"{c} {a!r} -> {b!r}" for c, (a, b) in sorted(drift.items())))
    sp = writer.savepoint(conn)
    try:
        op = changes[0]["operation"]
        if op == "create":
            values = json.loads(changes[0]["after"])
            new_key = writer.insert(conn, values)
            sp.commit()
            return [{"change_id": changes[0]["change_id"], "status": "applied", "record_key": new_key,
                     "before_image": None, "written": values}]
        before = {c["column"]: now_vals.get(c["column"]) for c in changes if c["column"]}
        if any(c["operation"] == "erase" for c in changes):
            spec = json.loads(next(c["after"] for c in changes if c["operation"] == "erase"))
            if spec["mode"] == "delete":
                writer.delete(conn, key)
                written = {}
            else:
                written = {c: None for c in spec["columns"]}
                writer.update(conn, key, written)
            before = None  # an erasure is never rolled back
        elif any(c["operation"] == "archive" and c["field"] == "*" for c in changes):
            writer.delete(conn, key)
            written = {}
        else:
            written = {c["column"]: c["after"] for c in changes if c["column"]}
            if writer.update(conn, key, written) != 1:
                raise ReconcileError(f"record {key} was not found for update")
        sp.commit()
        return all_("applied", before_image=before, written=written)
    except Exception as e:  # a constraint violation or a rejected value: this record fails alone
        sp.rollback()
        detail = str(getattr(e, "orig", None) or e).strip().splitlines()[0]
        return all_("failed", error=detail[:500])


def _record(con, entity: str, target: str, run_id: str, outcomes: list[dict]) -> None:
    """Commit a batch's outcomes here in three set-based statements (statuses, new links, ledger)."""
    import pandas as pd

    now = _now()
    frame = pd.DataFrame([{
        "change_id": o["change_id"], "status": o["status"], "error": o.get("error"),
        "before_image": json.dumps(o["before_image"]) if o.get("before_image") else None,
        "new_key": o.get("record_key"),
    } for o in outcomes], columns=["change_id", "status", "error", "before_image", "new_key"])
    ledger = pd.DataFrame([{"change_id": o["change_id"], "column_name": col, "value_hash": _hash(val)}
                           for o in outcomes if o["status"] == "applied"
                           for col, val in (o.get("written") or {}).items()],
                          columns=["change_id", "column_name", "value_hash"])
    con.register("_outcomes", frame)
    con.register("_written", ledger)
    con.execute("BEGIN TRANSACTION")
    try:
        con.execute("""UPDATE audit.changes c SET status = o.status, error = o.error,
                              before_image = CAST(o.before_image AS JSON),
                              applied_at = CASE WHEN o.status = 'applied' THEN ?::TIMESTAMP END,
                              record_key = coalesce(c.record_key, o.new_key)
                       FROM _outcomes o WHERE c.change_id = o.change_id""", [now])
        # A record we created is ours for certain: link it now, so the next run never creates it twice.
        con.execute("""INSERT INTO identity.xref
                       SELECT c.xid, c.entity, c.target, c.record_key, 'created', 1.0, c.run_id, ?
                       FROM audit.changes c JOIN _outcomes o USING (change_id)
                       WHERE c.operation = 'create' AND o.status = 'applied' AND c.record_key IS NOT NULL
                       ON CONFLICT DO NOTHING""", [now])
        con.execute("""INSERT INTO identity.xref_history
                       SELECT c.entity, c.xid, c.target, c.record_key, 'link', 'created', 1.0, NULL, c.run_id, ?,
                              'created by reconcile'
                       FROM audit.changes c JOIN _outcomes o USING (change_id)
                       WHERE c.operation = 'create' AND o.status = 'applied' AND c.record_key IS NOT NULL""", [now])
        con.execute("""INSERT INTO audit.write_ledger
                       SELECT ?, ?, coalesce(c.record_key, ''), w.column_name, w.value_hash, w.change_id, ?, ?
                       FROM _written w JOIN audit.changes c USING (change_id)""", [entity, target, run_id, now])
        con.execute("COMMIT")
    except BaseException:
        con.execute("ROLLBACK")
        raise
    finally:
        con.unregister("_outcomes")
        con.unregister("_written")


def _resume(con, writer: SqlWriter, entity: str, target: str, run_id: str) -> None:
    """Changes left `applying` by a killed load: written already -> applied; not written -> planned again."""
    rows = con.execute("""SELECT change_id, record_key, operation, column_name, after_raw FROM audit.changes
                          WHERE run_id = ? AND entity = ? AND target = ? AND status = 'applying'""",
                       [run_id, entity, target]).fetchall()
    if not rows:
        return
    print(f"resuming load into {target}: verifying {len(rows)} change(s) interrupted mid-write", file=sys.stderr)
    with writer.batch() as conn:
        keys = [r[1] for r in rows if r[1] is not None]
        cols = sorted({r[3] for r in rows if r[3]})
        current = writer.current(conn, keys, cols) if keys else {}
        for cid, key, op, col, after in rows:
            if op == "update" or op == "link" or (op == "archive" and col):
                done = key in current and current[key].get(col) == after
            elif op == "create":
                values = json.loads(after)
                probe = {k: v for k, v in values.items() if v is not None}
                found = _find(writer, conn, probe)
                done = found is not None
                if done:
                    con.execute("UPDATE audit.changes SET record_key = ? WHERE change_id = ?", [found, cid])
            else:  # erase / hard delete: done if the record is gone (or, anonymised, its text columns blank)
                spec = json.loads(after) if op == "erase" else {"mode": "delete"}
                done = key not in current or (spec["mode"] != "delete" and all(
                    v is None for c, v in writer.current(conn, [key], spec["columns"]).get(key, {}).items()))
            con.execute("UPDATE audit.changes SET status = ?, applied_at = CASE WHEN ? THEN ? END, "
                        "error = CASE WHEN ? THEN 'verified after an interrupted load' END WHERE change_id = ?",
                        ["applied" if done else "planned", done, _now(), done, cid])


def _find(writer: SqlWriter, conn, values: dict) -> str | None:
    import sqlalchemy as sa

    stmt = sa.select(sa.column(writer.key)).select_from(writer.table)
    for k, v in values.items():
        stmt = stmt.where(sa.column(k) == v)
    row = conn.execute(stmt.limit(1)).fetchone()
    return None if row is None else str(row[0])


def rollback(con, cfg: Config, entity: str, target: str, run_id: str, url: str) -> dict:
    """Revert a run's applied changes in one target from their before-images; values edited since are
    skipped and reported."""
    source = cfg.entities[entity].sources[target]
    writer = SqlWriter(connect(target, url), source)
    restored, skipped, impossible = [], [], []
    try:
        rows = con.execute("""SELECT change_id, record_key, operation, column_name, after_raw, before_image
                              FROM audit.changes WHERE run_id = ? AND entity = ? AND target = ? AND status = 'applied'
                              ORDER BY change_id""", [run_id, entity, target]).fetchall()
        with writer.batch() as conn:
            keys = [r[1] for r in rows if r[1]]
            cols = sorted({r[3] for r in rows if r[3]})
            current = writer.current(conn, keys, cols) if keys else {}
            for cid, key, op, col, after, before in rows:
                if op == "create":
                    written = json.loads(after)
                    now_vals = writer.current(conn, [key], list(written)).get(key)
                    if now_vals is None or any(now_vals.get(c) != (None if v is None else str(v)) for c, v in written.items()):
                        skipped.append({"change_id": cid, "record_key": key, "why": "edited since it was created"})
                        continue
                    writer.delete(conn, key)
                    restored.append(cid)
                    # the record is gone: so is the link we made when we created it (a later run may re-plan)
                    con.execute("""INSERT INTO identity.xref_history
                                   SELECT entity, xid, system, record_key, 'unlink', 'rollback', NULL, NULL, ?, now(),
                                          'created record removed by rollback'
                                   FROM identity.xref WHERE entity = ? AND system = ? AND record_key = ?""",
                                [run_id, entity, target, key])
                    con.execute("DELETE FROM identity.xref WHERE entity = ? AND system = ? AND record_key = ?",
                                [entity, target, key])
                    continue
                if before is None or op == "erase" or (op == "archive" and not col):
                    impossible.append({"change_id": cid, "record_key": key, "why": f"{op} has no before-image"})
                    continue
                if current.get(key, {}).get(col) != after:
                    skipped.append({"change_id": cid, "record_key": key, "column": col,
                                    "why": f"edited since: now {current.get(key, {}).get(col)!r}, we wrote {after!r}"})
                    continue
                writer.update(conn, key, {col: json.loads(before).get(col)})
                restored.append(cid)
        if restored:
            con.execute("UPDATE audit.changes SET status = 'rolled_back' WHERE change_id IN (SELECT unnest(?::VARCHAR[]))",
                        [restored])
    finally:
        writer.c.close()
    return {"target": target, "restored": len(restored), "skipped": skipped, "not_reversible": impossible}
