"""The review queue: list, show and decide review items. Decisions are stored in review.decisions and
applied by identity resolution on the next run, where they win over every rule.

Reads go to the published warehouse; a decision is written to the working warehouse (under its lock) and
published at once, so analysts see it before the next run applies it.
"""
from __future__ import annotations

import json
import uuid
from datetime import datetime, timezone

from .config import Config
from .errors import ReconcileError
from .warehouse import open_published, open_work, publish

ACTIONS = ("link", "split", "merge", "distinct", "ignore")


def list_items(cfg: Config, kind: str | None = None, status: str | None = "open", entity: str | None = None,
               limit: int = 50) -> list[dict]:
    """Review items, highest priority first (details.priority: the match probability for candidates, 1 for
    conflicts and collisions, 0.9 for shared mailboxes, ...; docs/identity.md#the-review-queue), then kind
    and id."""
    sql = ("SELECT item_id, entity, kind, system, status, title, last_seen_run, "
           # a collision holds writes back: as urgent as a conflict
           "coalesce(TRY_CAST(details->>'priority' AS DOUBLE), CASE WHEN kind = 'collision' THEN 1.0 END) AS priority "
           "FROM review.items WHERE TRUE")
    params: list = []
    for col, val in (("kind", kind), ("status", status), ("entity", entity)):
        if val:
            sql += f" AND {col} = ?"
            params.append(val)
    sql += " ORDER BY priority DESC NULLS LAST, kind, system, item_id LIMIT ?"
    params.append(limit)
    con = open_published(cfg)
    try:
        rows = con.execute(sql, params).fetchall()
    finally:
        con.close()
    keys = ("item_id", "entity", "kind", "system", "status", "title", "last_seen_run", "priority")
    return [dict(zip(keys, r)) for r in rows]


def show_item(cfg: Config, item_id: str) -> dict:
    con = open_published(cfg)
    try:
        row = con.execute("""SELECT item_id, entity, kind, system, status, title, details, first_seen_run,
                                    last_seen_run FROM review.items WHERE item_id = ?""", [item_id]).fetchone()
        if row is None:
            raise ReconcileError(f"no review item {item_id!r} (see `reconcile review list`)")
        decisions = con.execute("""SELECT decision_id, action, system, record_key, xid, other_xid, decided_by,
                                          decided_at, reason, applied_run_id FROM review.decisions
                                   WHERE item_id = ? ORDER BY decided_at""", [item_id]).fetchall()
    finally:
        con.close()
    keys = ("item_id", "entity", "kind", "system", "status", "title", "details", "first_seen_run", "last_seen_run")
    item = dict(zip(keys, row))
    item["details"] = json.loads(item["details"])
    dkeys = ("decision_id", "action", "system", "record_key", "xid", "other_xid", "decided_by", "decided_at",
             "reason", "applied_run_id")
    item["decisions"] = [dict(zip(dkeys, d)) for d in decisions]
    return item


def _parse_record(text: str | None) -> tuple[str, str] | None:
    if text is None:
        return None
    system, sep, key = text.partition(":")
    if not sep or not system or not key:
        raise ReconcileError(f"--record must be SYSTEM:KEY (e.g. crm:6F9619FF-8B86-D011-B42D-00C04FC964FF), got {text!r}")
    return system, key


def decide(cfg: Config, action: str, by: str, reason: str, item_id: str | None = None, entity: str | None = None,
           xid: str | None = None, into: str | None = None, record: str | None = None,
           now: datetime | None = None) -> list[dict]:
    """Record a steward's decision. Returns the decision rows written (a 'distinct' on several candidates
    writes one per candidate). Raises ReconcileError when the decision does not fit the item."""
    if action not in ACTIONS:
        raise ReconcileError(f"unknown action {action!r}; expected one of {', '.join(ACTIONS)}")
    if not by.strip() or not reason.strip():
        raise ReconcileError("a decision needs --by (who) and --reason (why): they are kept with it")
    now = (now or datetime.now(timezone.utc)).replace(tzinfo=None)
    rec = _parse_record(record)
    with open_work(cfg) as con:
        item = None
        if item_id:
            row = con.execute("SELECT entity, kind, status, details FROM review.items WHERE item_id = ?",
                              [item_id]).fetchone()
            if row is None:
                raise ReconcileError(f"no review item {item_id!r} (see `reconcile review list`)")
            item = {"entity": row[0], "kind": row[1], "status": row[2], "details": json.loads(row[3])}
            entity = entity or item["entity"]
        if entity is None:
            entity = next(iter(cfg.entities)) if len(cfg.entities) == 1 else None
            if entity is None:
                raise ReconcileError("--entity is required when the config has several entities")
        details = item["details"] if item else {}
        if rec is None and "record_key" in details:
            rec = (details["system"], details["record_key"])

        def xid_of(system: str, key: str) -> str | None:
            r = con.execute("SELECT xid FROM identity.xref WHERE entity = ? AND system = ? AND record_key = ?",
                            [entity, system, key]).fetchone()
            return r[0] if r else None

        def known_xid(x: str) -> str:
            if not con.execute("SELECT count(*) FROM identity.xids WHERE xid = ? AND entity = ?", [x, entity]).fetchone()[0]:
                raise ReconcileError(f"unknown xid {x!r} for entity {entity!r}")
            return x

        rows: list[dict] = []
        base = {"item_id": item_id, "entity": entity, "decided_by": by, "decided_at": now, "reason": reason}
        candidate_xids = sorted({c["xid"] for c in details.get("candidates", []) if c.get("xid")})
        if action == "link":
            if rec is None:
                raise ReconcileError("link needs a record: an item about one record, or --record SYSTEM:KEY")
            target = xid or (candidate_xids[0] if len(candidate_xids) == 1 else None)
            if target is None:
                raise ReconcileError(f"link needs --xid: the item has {len(candidate_xids)} candidate xids "
                                     f"({', '.join(candidate_xids) or 'none'})")
            rows.append({**base, "action": "link", "system": rec[0], "record_key": rec[1], "xid": known_xid(target)})
        elif action == "split":
            if rec is None:
                raise ReconcileError("split needs a record: --record SYSTEM:KEY")
            if xid_of(*rec) is None:
                raise ReconcileError(f"{rec[0]}:{rec[1]} is not linked to any xid: nothing to split")
            rows.append({**base, "action": "split", "system": rec[0], "record_key": rec[1]})
        elif action == "merge":
            if xid and into:
                pairs = [(known_xid(xid), known_xid(into))]
            elif item and item["kind"] == "duplicate":
                xids = list(dict.fromkeys(r["xid"] for r in details.get("records", []) if r.get("xid")))
                survivor = known_xid(into) if into else (xids[0] if xids else None)
                pairs = [(x, survivor) for x in xids if x != survivor]
                if not pairs:
                    raise ReconcileError("nothing to merge: the item's records are not on two different xids yet")
            else:
                raise ReconcileError("merge needs --xid X --into Y, or a duplicate item")
            rows += [{**base, "action": "merge", "xid": a, "other_xid": b} for a, b in pairs]
        elif action == "distinct":
            if rec is not None and (xid or candidate_xids):
                rows += [{**base, "action": "distinct", "system": rec[0], "record_key": rec[1], "xid": known_xid(x)}
                         for x in ([xid] if xid else candidate_xids)]
            elif item is not None:
                rows.append({**base, "action": "distinct"})  # e.g. a duplicate item: two people, keep them apart
            else:
                raise ReconcileError("distinct needs an item, or --record SYSTEM:KEY with --xid X")
        else:  # ignore
            if item is None:
                raise ReconcileError("ignore needs an item id")
            rows.append({**base, "action": "ignore"})

        cols = ("decision_id", "item_id", "entity", "action", "system", "record_key", "xid", "other_xid",
                "decided_by", "decided_at", "reason")
        for r in rows:
            r["decision_id"] = "dec_" + uuid.uuid4().hex[:16]
            con.execute(f"INSERT INTO review.decisions ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})",
                        [r.get(c) for c in cols])
        if item_id:
            con.execute("UPDATE review.items SET status = ?, updated_at = ? WHERE item_id = ?",
                        ["ignored" if action == "ignore" else "decided", now, item_id])
    publish(cfg)
    return rows
