"""Load: audit.changes (planned, allowed) -> the target system, in batches, exactly once, resumable.

Per batch of records: the changes are marked `applying` in the warehouse (committed) before the batch goes
to the target's writer (the connector protocol's write half, connectors/base.py: SQL, HubSpot, Dynamics),
one `WriteOp` per record carrying its optimistic-concurrency precondition (the target still holds what was
extracted; otherwise `skipped_conflict`, re-planned next run). The writer answers one outcome per record,
with its before-image for rollback; the outcomes are then committed here. A load killed between the two is
resumed by verifying `applying` changes against the target: a value already written is marked applied, not
written again. Python loops here only at the connector boundary.
"""
from __future__ import annotations

import hashlib
import json
import sys
import time
from datetime import datetime, timezone

from ..config.models import Config
from ..connectors import Writer, WriteOp, connect
from ..connectors.base import as_text
from ..warehouse import transaction
from . import privacy

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
    connector = connect(target, url, cfg.systems[target])
    attempt = f"{run_id}@{_now().isoformat()}"
    watched = [source.modified_at] if source.modified_at else [m.column for m in source.fields.values()]
    try:
        writer = connector.writer(source)
        privacy.resolve_erase_columns(con, connector, source, entity, target, run_id)  # `writes.erase.columns: all`
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
        connector.close()
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


def _write_op(ref: str, g: dict, watched: list[str]) -> tuple[WriteOp, dict, bool]:
    """One record's changes as a WriteOp, plus what it writes (for the ledger) and whether a rollback can
    restore it (an erasure or a hard delete cannot)."""
    changes = g["changes"]
    key = g["record_key"]
    expected = None
    if key is not None:
        exp = g["expected"] or {}
        expected = {c: exp[c] for c in watched if c in exp}
    op = changes[0]["operation"]
    if op == "create":
        values = json.loads(changes[0]["after"])
        return WriteOp(ref, "create", None, values), values, False
    if any(c["operation"] == "erase" for c in changes):
        spec = json.loads(next(c["after"] for c in changes if c["operation"] == "erase"))
        if spec["mode"] == "delete":
            return WriteOp(ref, "delete", key, {}, expected), {}, False
        written = {c: None for c in spec["columns"]}
        return WriteOp(ref, "update", key, written, expected), written, False
    if any(c["operation"] == "archive" and c["field"] == "*" for c in changes):
        return WriteOp(ref, "delete", key, {}, expected), {}, False
    written = {c["column"]: c["after"] for c in changes if c["column"]}
    return WriteOp(ref, "update", key, written, expected), written, True


def _apply_batch(writer: Writer, batch: list[dict], watched: list[str]) -> list[dict]:
    """The batch through the writer; one outcome per change (a create group is its one change)."""
    ops, written, restorable = [], [], []
    for i, g in enumerate(batch):
        op, w, r = _write_op(str(i), g, watched)
        ops.append(op)
        written.append(w)
        restorable.append(r)
    outcomes: list[dict] = []
    for g, res, w, r in zip(batch, writer.apply(ops), written, restorable):
        changes = g["changes"][:1] if g["record_key"] is None else g["changes"]
        for c in changes:
            o = {"change_id": c["change_id"], "status": res.status, "error": res.error}
            if res.status == "applied":
                o.update(before_image=res.before if r else None, written=w,
                         record_key=res.key if g["record_key"] is None else None)
            elif res.status == "held":  # the target already holds this record: a link candidate, never retried
                o["reason"] = (f"the target refused the create: {res.error}; its record {res.existing_key} is a "
                               "link candidate in review")
                o["existing_key"] = res.existing_key
            outcomes.append(o)
    return outcomes


def _record(con, entity: str, target: str, run_id: str, outcomes: list[dict]) -> None:
    """Commit a batch's outcomes here in three set-based statements (statuses, new links, ledger)."""
    import pandas as pd

    now = _now()
    frame = pd.DataFrame([{
        "change_id": o["change_id"], "status": o["status"], "error": o.get("error"),
        "before_image": json.dumps(o["before_image"]) if o.get("before_image") else None,
        "new_key": o.get("record_key"), "reason": o.get("reason"), "existing_key": o.get("existing_key"),
    } for o in outcomes], columns=["change_id", "status", "error", "before_image", "new_key", "reason",
                                   "existing_key"])
    ledger = pd.DataFrame([{"change_id": o["change_id"], "column_name": col, "value_hash": _hash(val)}
                           for o in outcomes if o["status"] == "applied"
                           for col, val in (o.get("written") or {}).items()],
                          columns=["change_id", "column_name", "value_hash"])
    con.register("_outcomes", frame)
    con.register("_written", ledger)
    try:
        with transaction(con):
            con.execute("""UPDATE audit.changes c SET status = o.status, error = o.error,
                                  reason = coalesce(o.reason, c.reason),
                                  before_image = CAST(o.before_image AS JSON),
                                  applied_at = CASE WHEN o.status = 'applied' THEN ?::TIMESTAMP END,
                                  record_key = coalesce(c.record_key, o.new_key)
                           FROM _outcomes o WHERE c.change_id = o.change_id""", [now])
            # A record we created is ours for certain: link it now, so the next run never creates it twice.
            con.execute("""INSERT INTO identity.xref (xid, entity, system, record_key, rule, confidence, run_id, linked_at)
                           SELECT c.xid, c.entity, c.target, c.record_key, 'created', 1.0, c.run_id, ?
                           FROM audit.changes c JOIN _outcomes o USING (change_id)
                           WHERE c.operation = 'create' AND o.status = 'applied' AND c.record_key IS NOT NULL
                           ON CONFLICT DO NOTHING""", [now])
            con.execute("""INSERT INTO identity.xref_history (entity, xid, system, record_key, action, rule, confidence,
                                                              previous_xid, run_id, changed_at, note)
                           SELECT c.entity, c.xid, c.target, c.record_key, 'link', 'created', 1.0, NULL, c.run_id, ?,
                                  'created by reconcile'
                           FROM audit.changes c JOIN _outcomes o USING (change_id)
                           WHERE c.operation = 'create' AND o.status = 'applied' AND c.record_key IS NOT NULL""", [now])
            con.execute("""INSERT INTO audit.write_ledger (entity, target, record_key, column_name, value_hash,
                                                          change_id, run_id, written_at)
                           SELECT ?, ?, coalesce(c.record_key, ''), w.column_name, w.value_hash, w.change_id, ?, ?
                           FROM _written w JOIN audit.changes c USING (change_id)""", [entity, target, run_id, now])
            # A create the target refused because the record exists there (HubSpot's 409): the existing record
            # waits in review as a link candidate for the identity (`reconcile review decide link` takes it).
            con.execute("""INSERT INTO review.items (item_id, entity, kind, system, status, title, details,
                                                     first_seen_run, last_seen_run, created_at, updated_at)
                           SELECT md5(concat_ws('|', 'link_candidate', c.entity, c.target, c.xid, o.existing_key)),
                                  c.entity, 'link_candidate', c.target, 'open',
                                  c.target || ' already holds record ' || coalesce(o.existing_key, '?') ||
                                  ': is it ' || c.xid || '?',
                                  json_object('system', c.target, 'record_key', o.existing_key,
                                              'candidates', json_array(json_object('xid', c.xid)),
                                              'message', o.error, 'change_id', c.change_id, 'values', c.after_raw),
                                  c.run_id, c.run_id, ?, ?
                           FROM audit.changes c JOIN _outcomes o USING (change_id) WHERE o.status = 'held'
                           ON CONFLICT (item_id) DO UPDATE SET last_seen_run = excluded.last_seen_run,
                                  updated_at = excluded.updated_at""", [now, now])
    finally:
        con.unregister("_outcomes")
        con.unregister("_written")


def _resume(con, writer: Writer, entity: str, target: str, run_id: str) -> None:
    """Changes left `applying` by a killed load: written already -> applied, recorded like any applied change
    (a create's `created` link, the write ledger); not written -> planned again."""
    rows = con.execute("""SELECT change_id, record_key, operation, column_name, after_raw FROM audit.changes
                          WHERE run_id = ? AND entity = ? AND target = ? AND status = 'applying'""",
                       [run_id, entity, target]).fetchall()
    if not rows:
        return
    print(f"resuming load into {target}: verifying {len(rows)} change(s) interrupted mid-write", file=sys.stderr)
    keys = [r[1] for r in rows if r[1] is not None]
    cols = sorted({r[3] for r in rows if r[3]} | {c for r in rows if r[2] == "erase"
                                                 for c in json.loads(r[4]).get("columns", [])})
    current = writer.current(keys, cols) if keys else {}
    outcomes = []
    for cid, key, op, col, after in rows:
        found = None
        if op == "update" or op == "link" or (op == "archive" and col):
            done, written = key in current and current[key].get(col) == after, {col: after}
        elif op == "create":
            values = json.loads(after)
            found = writer.find({k: v for k, v in values.items() if v is not None})
            done, written = found is not None, values
        else:  # erase / hard delete: done if the record is gone (or, anonymised, its text columns blank)
            spec = json.loads(after) if op == "erase" else {"mode": "delete"}
            written = {} if spec["mode"] == "delete" else {c: None for c in spec["columns"]}
            done = key not in current or (spec["mode"] != "delete" and all(
                current[key].get(c) is None for c in spec["columns"]))
        outcomes.append({"change_id": cid, "status": "applied", "error": "verified after an interrupted load",
                         "written": written, "record_key": found} if done else
                        {"change_id": cid, "status": "planned", "error": None})
    _record(con, entity, target, run_id, outcomes)


def rollback(con, cfg: Config, entity: str, target: str, run_id: str, url: str) -> dict:
    """Revert a run's applied changes in one target from their before-images; values edited since are
    skipped and reported (the writer's precondition: the target still holds what we wrote)."""
    source = cfg.entities[entity].sources[target]
    connector = connect(target, url, cfg.systems[target])
    restored, skipped, impossible = [], [], []
    try:
        writer = connector.writer(source)
        rows = con.execute("""SELECT change_id, record_key, operation, column_name, after_raw, before_image
                              FROM audit.changes WHERE run_id = ? AND entity = ? AND target = ? AND status = 'applied'
                              ORDER BY change_id""", [run_id, entity, target]).fetchall()
        ops, meta = [], {}
        for cid, key, op, col, after, before in rows:
            if op == "create":  # remove what we created, unless edited since
                written = json.loads(after)
                ops.append(WriteOp(cid, "delete", key, {}, {c: as_text(v) for c, v in written.items()}))
            elif before is None or op == "erase" or (op == "archive" and not col):
                impossible.append({"change_id": cid, "record_key": key, "why": f"{op} has no before-image"})
                continue
            else:
                ops.append(WriteOp(cid, "update", key, {col: json.loads(before).get(col)}, {col: after}))
            meta[cid] = (key, op, col, after)
        for res in writer.apply(ops) if ops else []:
            key, op, col, after = meta[res.ref]
            if res.status == "applied":
                restored.append(res.ref)
                if op == "create":  # the record is gone: so is the link we made (a later run may re-plan)
                    con.execute("""INSERT INTO identity.xref_history (entity, xid, system, record_key, action,
                                                   rule, confidence, previous_xid, run_id, changed_at, note)
                                   SELECT entity, xid, system, record_key, 'unlink', 'rollback', NULL, NULL, ?, now(),
                                          'created record removed by rollback'
                                   FROM identity.xref WHERE entity = ? AND system = ? AND record_key = ?""",
                                [run_id, entity, target, key])
                    con.execute("DELETE FROM identity.xref WHERE entity = ? AND system = ? AND record_key = ?",
                                [entity, target, key])
            elif op == "create":
                skipped.append({"change_id": res.ref, "record_key": key, "why": "edited since it was created"})
            else:
                skipped.append({"change_id": res.ref, "record_key": key, "column": col,
                                "why": f"edited since ({res.error}); we wrote {after!r}"})
        if restored:
            con.execute("UPDATE audit.changes SET status = 'rolled_back' WHERE change_id IN (SELECT unnest(?::VARCHAR[]))",
                        [restored])
    finally:
        connector.close()
    return {"target": target, "restored": len(restored), "skipped": skipped, "not_reversible": impossible}
