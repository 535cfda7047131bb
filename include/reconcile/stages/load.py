"""Load: audit.changes (planned, allowed) -> the target system, in batches, exactly once, resumable, in three
steps, so that only the short first and last hold the warehouse (single writer) and the long middle one runs
on any worker that reaches the target and the run storage (`runstore.py`):

1. `export` (warehouse): the target's loadable changes of the run become a change set in the run storage,
   `<run>/load/<target>/<export id>/changes.parquet` (grouped by record, in order; changes left `applying` by
   an interrupted load first), and `load/<target>/current.json` says whether the target may load
   (`ok`, `awaiting_approval`, `rejected`, `dry_run`, `nothing`) and from which change set.
2. `apply` (no warehouse): per batch of records, an intent (its change ids) is journalled beside the change
   set before the batch goes to the target's writer (the connector protocol's write half,
   connectors/base.py: SQL, HubSpot, Dynamics), one `WriteOp` per record carrying its optimistic-concurrency
   precondition (the target still holds what was extracted; otherwise `skipped_conflict`, re-planned next
   run); the writer answers one outcome per record, with its before-image for rollback, journalled after
   the batch. A retried apply (a killed worker, on this or another machine) skips batches with outcomes and
   verifies batches with only an intent against the target: a value already written is not written again.
3. `record` (warehouse): the journal into audit.changes, identity.xref (+ history), audit.write_ledger and
   review.items in set-based statements, idempotently: only changes still `planned` or `applying` take an
   outcome, so recording a journal twice changes nothing. An intent without outcome is recorded `applying`:
   the next load of the run (`reconcile load`, or the next run's `runner.recover_runs`) verifies it.

Python loops here only at the connector boundary.
"""
from __future__ import annotations

import hashlib
import json
import sys
import time
from collections import Counter
from collections.abc import Iterator
from datetime import datetime, timezone

import pyarrow.parquet as pq

from .. import report
from ..config.models import Config
from ..connectors import Writer, WriteOp, connect
from ..connectors.base import as_text
from ..errors import ReconcileError
from ..runstore import RunFolder
from ..transforms import sql_literal
from ..warehouse import transaction
from . import privacy

CHUNK = 50_000  # change set rows per Parquet read


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


def _load_folder(folder: RunFolder, target: str) -> RunFolder:
    return folder.sub(f"load/{target}")


def export(con, entity: str, target: str, run_id: str, folder: RunFolder, state: str) -> dict:
    """Write the target's change set for `apply` (when `state` is `ok`) and its `current.json`. The caller
    records the target's earlier journals first (`record`): the change set then holds what is left to load."""
    out = _load_folder(folder, target)
    current = {"target": target, "state": state, "export": None, "changes": 0}
    if state == "ok":
        export_id = f"{_now():%Y%m%dT%H%M%S%f}"  # sortable: journals are recorded in export order
        changes = out.sub(export_id)
        with changes.replacing("changes.parquet") as local:  # COPY streams it, in this order
            n = con.execute(f"""
                COPY (SELECT change_id, coalesce(record_key, 'create:' || xid) AS grp, status = 'applying' AS resume,
                             record_key, xid, operation, field, column_name, after_raw,
                             CAST(expected AS VARCHAR) AS expected
                      FROM audit.changes WHERE run_id = {sql_literal(run_id)} AND entity = {sql_literal(entity)}
                        AND target = {sql_literal(target)} AND status IN ('planned', 'applying')
                      ORDER BY resume DESC, grp, operation, change_id)
                TO {sql_literal(str(local))} (FORMAT parquet)""").fetchone()[0]
        current.update(export=export_id, changes=n)
    out.write_json("current.json", current)
    return current


def state(folder: RunFolder, target: str) -> str:
    """Whether `apply` may load the target (from `export`): `ok`, `awaiting_approval`, `rejected`, ..."""
    out = _load_folder(folder, target)
    if not out.exists("current.json"):
        raise ReconcileError(f"no change set was exported for {target} ({out.url('current.json')} missing): "
                             f"the load's export step (runner.export_loads) runs first")
    return out.read_json("current.json")["state"]


def apply(cfg: Config, entity: str, target: str, url: str, folder: RunFolder, progress=None) -> dict:
    """Apply the exported change set of one target; opens no warehouse. Safe to call again after a crash:
    resumes from its journal. The outcome is journalled too (`result.json`), also when the load crashes."""
    out = _load_folder(folder, target)
    current = out.read_json("current.json") if out.exists("current.json") else None
    if current is None or current["state"] != "ok":
        return {"target": target, "status": current["state"] if current else state(folder, target),
                "applied": 0, "failed": 0, "skipped_conflict": 0}
    journal = out.sub(current["export"])
    t0 = time.monotonic()
    try:
        result = _apply(cfg, entity, target, url, journal, progress)
    except Exception as e:
        journal.write_json("result.json", {"target": target, "status": "error", "error": str(e),
                                           "seconds": round(time.monotonic() - t0, 3)})
        raise
    result["seconds"] = round(time.monotonic() - t0, 3)
    journal.write_json("result.json", result)
    return result


def _apply(cfg: Config, entity: str, target: str, url: str, journal: RunFolder, progress) -> dict:
    source = cfg.entities[entity].sources[target]
    settings = cfg.load
    connector = connect(target, url, cfg.systems[target])
    watched = [source.modified_at] if source.modified_at else [m.column for m in source.fields.values()]
    done = set(journal.names())
    counts: Counter = Counter()
    attempted = failed = 0
    stopped = None
    try:
        writer = connector.writer(source)
        erase_columns: list[str] = []
        size = _batch_size(journal, done, settings.batch_size, writer.load_batch)
        with journal.local("changes.parquet") as path:
            for n, batch in enumerate(_batches(path, size), 1):
                intent, outcome = f"intent-{n:06d}.json", f"outcome-{n:06d}.json"
                if outcome in done:  # an earlier attempt applied it
                    counts.update(o["status"] for o in journal.read_json(outcome)["outcomes"])
                    continue
                if not erase_columns and _needs_columns(batch):  # `writes.erase.columns: all`
                    erase_columns = sorted(set(connector.columns(source)) - {source.key, source.modified_at})
                erase = _resolve_erasures(batch, erase_columns)
                interrupted = batch[0]["resume"] or intent in done
                if intent not in done:
                    journal.write_json(intent, {"batch_size": size, "erase": erase, "change_ids": [
                        c["change_id"] for g in batch for c in g["changes"]]}, compact=True)
                outcomes = (_verify(writer, target, batch, watched) if interrupted
                            else _apply_batch(writer, batch, watched))
                journal.write_json(outcome, {"at": _now().isoformat(), "outcomes": outcomes, "erase": erase},
                                   compact=True)
                counts.update(o["status"] for o in outcomes)
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
    return {"target": target, "status": "stopped" if stopped else "done", "reason": stopped,
            "applied": counts["applied"], "failed": counts["failed"], "skipped_conflict": counts["skipped_conflict"]}


def _batch_size(journal: RunFolder, done: set[str], configured: int | None, writers: int) -> int:
    """Records per batch: the size the change set's first attempt journalled, if it journalled a batch (a retry
    must cut the batches its journal numbers, whatever the config or the default says now); else
    `load.batch_size`, else the writer's default. An intent without a size predates them: it was cut at
    `load.batch_size` or the old default, 200."""
    if "intent-000001.json" not in done:
        return configured or writers
    return journal.read_json("intent-000001.json").get("batch_size") or configured or 200


def _batches(path, size: int) -> Iterator[list[dict]]:
    """The change set's records, `size` to a batch, read once in order (a create is its own record; changes
    an interrupted load left `applying` come first, in batches of their own)."""
    batch: list[dict] = []
    group = None
    for chunk in pq.ParquetFile(str(path)).iter_batches(batch_size=CHUNK):
        for r in chunk.to_pylist():
            if group is None or r["grp"] != group["grp"] or r["resume"] != group["resume"]:
                if group is not None and (len(batch) == size or batch[0]["resume"] != r["resume"]):
                    yield batch
                    batch = []
                group = {"grp": r["grp"], "resume": r["resume"], "record_key": r["record_key"], "xid": r["xid"],
                         "expected": json.loads(r["expected"]) if r["expected"] else None, "changes": []}
                batch.append(group)
            group["changes"].append({"change_id": r["change_id"], "operation": r["operation"], "field": r["field"],
                                     "column": r["column_name"], "after": r["after_raw"]})
    if batch:
        yield batch


def _needs_columns(batch: list[dict]) -> bool:
    return any(c["operation"] == "erase" and json.loads(c["after"]).get("all") for g in batch for c in g["changes"])


def _resolve_erasures(batch: list[dict], real_columns: list[str]) -> dict[str, str]:
    """`writes.erase.columns: all` specs of the batch resolved against the system's real columns (in place);
    returns change_id -> resolved spec, journalled so that audit.changes names exactly what was blanked."""
    resolved = {}
    for g in batch:
        for c in g["changes"]:
            if c["operation"] == "erase":
                spec = privacy.resolve_erase_spec(c["after"], real_columns)
                if spec is not None:
                    c["after"] = resolved[c["change_id"]] = spec
    return resolved


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


def _verify(writer: Writer, target: str, batch: list[dict], watched: list[str]) -> list[dict]:
    """A batch an interrupted load may have written in part: each change already in the target is applied
    (with what it wrote, for the ledger, and a create's key, for its link), never written again; the rest
    goes through the writer now."""
    changes = [(g, c) for g in batch for c in g["changes"]]
    print(f"resuming load into {target}: verifying {len(changes)} change(s) interrupted mid-write", file=sys.stderr)
    keys = [g["record_key"] for g in batch if g["record_key"] is not None]
    cols = sorted({c["column"] for _, c in changes if c["column"]} | {
        col for _, c in changes if c["operation"] == "erase" for col in json.loads(c["after"]).get("columns", [])})
    current = writer.current(keys, cols) if keys else {}
    outcomes, rest = [], []
    for g in batch:
        missing = []
        for c in g["changes"]:
            key, op, col, after, found = g["record_key"], c["operation"], c["column"], c["after"], None
            if op in ("update", "link") or (op == "archive" and col):
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
            if done:
                outcomes.append({"change_id": c["change_id"], "status": "applied", "error": "verified after an "
                                 "interrupted load", "written": written, "record_key": found})
            else:
                missing.append(c)
        if missing:
            rest.append({**g, "changes": missing})
    return outcomes + (_apply_batch(writer, rest, watched) if rest else [])


def record(con, entity: str, target: str, run_id: str, folder: RunFolder) -> dict | None:
    """Record what the target's journals hold and was not recorded yet (`recorded.json` lists what was),
    oldest change set first, and the last one's load outcome in audit.stage_runs (`result.json`, or `error`
    for a load still unfinished, with the run's counts); returns that outcome, or None when there was nothing
    new. Idempotent; an outcome journalled after its intent was recorded (`applying`) is recorded later."""
    out = _load_folder(folder, target)
    result = None
    for export_id in [n for n in out.names() if n != "current.json" and not n.startswith(".")]:
        journal = out.sub(export_id)
        names = set(journal.names())
        seen = journal.read_json("recorded.json") if "recorded.json" in names else {"files": []}
        done = {n[len("outcome-"):] for n in names if n.startswith("outcome-")}
        new = sorted(n for n in names - set(seen["files"]) if n.startswith(("outcome-", "intent-", "result."))
                     and not (n.startswith("intent-") and n[len("intent-"):] in done))
        if not new:
            continue
        outcomes, pending, erase = [], [], {}
        for n in new:
            if n.startswith("outcome-"):
                data = journal.read_json(n)
                outcomes += [{**o, "at": data["at"]} for o in data["outcomes"]]
            elif n.startswith("intent-"):
                data = journal.read_json(n)
                pending += data["change_ids"]
            else:
                continue
            erase.update(data.get("erase") or {})
        result = journal.read_json("result.json") if "result.json" in names else {
            "target": target, "status": "error", "error": f"the load of change set {export_id} was interrupted "
                                                          f"({len(pending)} change(s) left applying)"}
        _record(con, run_id, f"{run_id}@{export_id}", outcomes, pending, erase)
        counts = dict(con.execute("""SELECT status, count(*) FROM audit.changes WHERE run_id = ? AND entity = ?
                                     AND target = ? GROUP BY 1""", [run_id, entity, target]).fetchall())
        result.update({s: counts.get(s, 0) for s in ("applied", "failed", "skipped_conflict")})
        report.record_load(con, entity, run_id, target, result, _now(), result.get("seconds"))
        # A crash before this line: recorded again, which changes nothing.
        journal.write_json("recorded.json", {"files": sorted(set(seen["files"]) | set(new))})
    return result


def _record(con, run_id: str, attempt: str, outcomes: list[dict], pending: list[str], erase: dict[str, str]) -> None:
    """A journal into the warehouse in one transaction of set-based statements (erase specs, intents without
    outcome, statuses, new links, ledger, link candidates). Only changes still planned or applying take an
    outcome, and every insert follows from such an update: recording a journal again changes nothing."""
    import pandas as pd

    frame = pd.DataFrame([{
        "change_id": o["change_id"], "status": o["status"], "error": o.get("error"),
        "before_image": json.dumps(o["before_image"]) if o.get("before_image") else None,
        "new_key": o.get("record_key"), "reason": o.get("reason"), "existing_key": o.get("existing_key"),
        "at": datetime.fromisoformat(o["at"]),
    } for o in outcomes], columns=["change_id", "status", "error", "before_image", "new_key", "reason",
                                   "existing_key", "at"])
    ledger = pd.DataFrame([{"change_id": o["change_id"], "column_name": col, "value_hash": _hash(val)}
                           for o in outcomes if o["status"] == "applied"
                           for col, val in (o.get("written") or {}).items()],
                          columns=["change_id", "column_name", "value_hash"])
    specs = pd.DataFrame({"change_id": list(erase), "after_raw": list(erase.values())},
                         columns=["change_id", "after_raw"])
    con.register("_journal", frame)
    con.register("_written", ledger)
    con.register("_specs", specs)
    try:
        with transaction(con):
            con.execute("""UPDATE audit.changes c SET after_raw = s.after_raw FROM _specs s
                           WHERE c.change_id = s.change_id AND c.run_id = ?""", [run_id])
            con.execute("""UPDATE audit.changes SET status = 'applying', load_attempt = ?
                           WHERE run_id = ? AND status = 'planned' AND change_id IN (SELECT unnest(?::VARCHAR[]))""",
                        [attempt, run_id, pending])
            # The outcomes that are news: their changes still wait for one (a journal recorded before: none).
            con.execute("""CREATE OR REPLACE TEMP TABLE _outcomes AS
                           SELECT o.* FROM _journal o JOIN audit.changes c USING (change_id)
                           WHERE c.run_id = ? AND c.status IN ('planned', 'applying')""", [run_id])
            con.execute("""UPDATE audit.changes c SET status = o.status, error = o.error,
                                  reason = coalesce(o.reason, c.reason),
                                  before_image = CAST(o.before_image AS JSON),
                                  applied_at = CASE WHEN o.status = 'applied' THEN o.at END,
                                  record_key = coalesce(c.record_key, o.new_key), load_attempt = ?
                           FROM _outcomes o WHERE c.change_id = o.change_id""", [attempt])
            # A record we created is ours for certain: link it now, so the next run never creates it twice.
            con.execute("""INSERT INTO identity.xref (xid, entity, system, record_key, rule, confidence, run_id, linked_at)
                           SELECT c.xid, c.entity, c.target, c.record_key, 'created', 1.0, c.run_id, o.at
                           FROM audit.changes c JOIN _outcomes o USING (change_id)
                           WHERE c.operation = 'create' AND o.status = 'applied' AND c.record_key IS NOT NULL
                           ON CONFLICT DO NOTHING""")
            con.execute("""INSERT INTO identity.xref_history (entity, xid, system, record_key, action, rule, confidence,
                                                              previous_xid, run_id, changed_at, note)
                           SELECT c.entity, c.xid, c.target, c.record_key, 'link', 'created', 1.0, NULL, c.run_id, o.at,
                                  'created by reconcile'
                           FROM audit.changes c JOIN _outcomes o USING (change_id)
                           WHERE c.operation = 'create' AND o.status = 'applied' AND c.record_key IS NOT NULL""")
            con.execute("""INSERT INTO audit.write_ledger (entity, target, record_key, column_name, value_hash,
                                                          change_id, run_id, written_at)
                           SELECT c.entity, c.target, coalesce(c.record_key, ''), w.column_name, w.value_hash,
                                  w.change_id, c.run_id, o.at
                           FROM _written w JOIN _outcomes o USING (change_id) JOIN audit.changes c USING (change_id)""")
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
                                  c.run_id, c.run_id, o.at, o.at
                           FROM audit.changes c JOIN _outcomes o USING (change_id) WHERE o.status = 'held'
                           ON CONFLICT (item_id) DO UPDATE SET last_seen_run = excluded.last_seen_run,
                                  updated_at = excluded.updated_at""")
            con.execute("DROP TABLE _outcomes")
    finally:
        con.unregister("_journal")
        con.unregister("_written")
        con.unregister("_specs")


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
