"""A local HubSpot-like CRM objects API (v3) over a SQLite table, on 127.0.0.1.

Serves the demo's marketing system through HTTP (`reconcile demo init --api`, started and stopped by
scripts/demo.sh: `python -m reconcile.demo.hubspot_server DB --port N --token-env VAR`) and is the server
the connector tests run against, with their own faults injected. It behaves like the real API where
reconcile depends on it:

- bearer token (401 without it); `X-HubSpot-RateLimit-*` headers on every response and, over the
  configured rate, `429` with HubSpot's RATE_LIMIT body (no `Retry-After`, like HubSpot's secondly limit);
- `GET /crm/v3/objects/{type}` pages with the `after` cursor (at most 100 per page);
- `POST .../search`: filters (EQ, GTE, GT, LTE, LT), one sort, at most 200 per page, and no paging beyond
  `search_max_results` (10,000) results: `400` like HubSpot;
- `POST .../batch/{read,create,update,archive}`: at most 100 inputs. create is all-or-nothing (`409
  Conflict` naming the existing id when a unique value such as the email exists, `400` for invalid
  values); update applies what it can and answers `207 Multi-Status` with one error per failed id;
- single `POST`, `PATCH`, `DELETE` of one object; `lastmodifieddate` / `createdate` stamped by the server;
- every write is appended to `server.writes` (op, id), so tests verify exactly-once against the server.

State lives in the SQLite file (the table's constraints are the portal's validation rules), so it persists
between nights. Test faults: `inject(...)` and `before(...)` (demo/fake_api.py).
"""
from __future__ import annotations

import argparse
import os
import re
import sqlite3
import time
from collections import deque
from datetime import datetime, timezone
from pathlib import Path

from .fake_api import ApiError, LocalApiServer

LIST_LIMIT = 100
SEARCH_LIMIT = 200
SEARCH_MAX_RESULTS = 10_000
BATCH_LIMIT = 100
_OPS = {"EQ": "=", "NEQ": "<>", "GT": ">", "GTE": ">=", "LT": "<", "LTE": "<="}


class HubSpotError(ApiError):
    """An error in HubSpot's shape: {status: error, message, category, correlationId}."""

    def __init__(self, status: int, message: str, category: str = "VALIDATION_ERROR"):
        super().__init__(status, {"status": "error", "message": message, "category": category,
                                  "correlationId": "00000000-0000-0000-0000-000000000000"})
        self.message, self.category = message, category


def _now_iso() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _ts_value(value) -> str:
    """A filter value on a date property: epoch milliseconds (HubSpot's form) or ISO text -> ISO text."""
    text = str(value)
    if re.fullmatch(r"\d{10,}", text):
        return datetime.fromtimestamp(int(text) / 1000, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
    return text


class ObjectType:
    """One object type served from one table: `id_column` is the object id (an INTEGER PRIMARY KEY)."""

    def __init__(self, name: str, table: str, id_column: str, unique: tuple[str, ...] = ("email",),
                 modified: str = "lastmodifieddate", created: str = "createdate", label: str = "Contact"):
        self.name, self.table, self.id_column, self.unique = name, table, id_column, unique
        self.modified, self.created, self.label = modified, created, label


class HubSpotServer(LocalApiServer):
    """The server; `start()` serves in a background thread, `stop()` ends it. Use as a context manager."""

    def __init__(self, db: str | Path, token: str, objects: list[ObjectType] | None = None, port: int = 0,
                 rate_limit: tuple[int, float] | None = None, search_max_results: int = SEARCH_MAX_RESULTS,
                 list_limit: int = LIST_LIMIT, search_limit: int = SEARCH_LIMIT):
        super().__init__(db, token, port)
        self.objects = {o.name: o for o in (objects or [ObjectType("contacts", "contacts", "vid")])}
        self.rate_limit = rate_limit            # (requests, per seconds)
        self.search_max_results = search_max_results
        self.list_limit, self.search_limit = list_limit, search_limit
        self._hits: deque = deque()

    def unauthorized(self) -> HubSpotError:
        return HubSpotError(401, "Authentication credentials not found. This API supports OAuth 2.0 authentication "
                                 "and you can find more details at https://developers.hubspot.com/docs/methods/auth/oauth-overview",
                            "INVALID_AUTHENTICATION")

    def fault_body(self, status: int) -> dict:
        return {"status": "error", "message": f"injected HTTP {status}",
                "category": "RATE_LIMITS" if status == 429 else "INTERNAL_ERROR"}

    def _rate_headers(self) -> tuple[bool, dict]:
        if not self.rate_limit:
            return False, {}
        limit, per = self.rate_limit
        now = time.monotonic()
        with self.lock:
            while self._hits and now - self._hits[0] > per:
                self._hits.popleft()
            over = len(self._hits) >= limit
            if not over:
                self._hits.append(now)
            remaining = max(0, limit - len(self._hits))
        return over, {"X-HubSpot-RateLimit-Max": str(limit), "X-HubSpot-RateLimit-Remaining": str(remaining),
                      "X-HubSpot-RateLimit-Interval-Milliseconds": str(int(per * 1000))}

    def route(self, method: str, path: str, query: dict, headers, payload) -> tuple[int, dict, object]:
        over, rate = self._rate_headers()
        if over:
            return 429, rate, {"status": "error", "message": "You have reached your secondly limit.",
                               "errorType": "RATE_LIMIT", "policyName": "SECONDLY", "category": "RATE_LIMITS"}
        m = re.fullmatch(r"/crm/v3/properties/([^/]+)", path)
        if m and method == "GET":
            return 200, rate, self._properties(self._type(m.group(1)))
        m = re.fullmatch(r"/crm/v3/objects/([^/]+)(?:/([^/]+))?(?:/([^/]+))?", path)
        if not m:
            raise HubSpotError(404, f"no route for {method} {path}", "OBJECT_NOT_FOUND")
        otype = self._type(m.group(1))
        sub, action = m.group(2), m.group(3)
        with self.lock, self.connect() as con:
            if sub is None and method == "GET":
                return 200, rate, self._list(con, otype, query)
            if sub is None and method == "POST":
                return 201, rate, self._create_one(con, otype, payload.get("properties") or {})
            if sub == "search" and method == "POST":
                return 200, rate, self._search(con, otype, payload)
            if sub == "batch" and method == "POST":
                status, out = self._batch(con, otype, action, payload)
                return status, rate, out
            if sub and action is None and method == "GET":
                props = (query.get("properties") or [""])[0].split(",")
                return 200, rate, self._object(otype, self._row(con, otype, sub), [p for p in props if p])
            if sub and action is None and method == "PATCH":
                return 200, rate, self._update_one(con, otype, sub, payload.get("properties") or {})
            if sub and action is None and method == "DELETE":
                self._row(con, otype, sub)
                con.execute(f'DELETE FROM "{otype.table}" WHERE "{otype.id_column}" = ?', [sub])
                self.writes.append(("archive", sub))
                return 204, rate, None
        raise HubSpotError(405, f"{method} is not allowed on {path}", "METHOD_NOT_ALLOWED")

    def _type(self, name: str) -> ObjectType:
        if name not in self.objects:
            raise HubSpotError(400, f"Unable to infer object type from: {name}", "VALIDATION_ERROR")
        return self.objects[name]

    def _columns(self, con, otype: ObjectType) -> list[str]:
        return [r[1] for r in con.execute(f'PRAGMA table_info("{otype.table}")')]

    def _properties(self, otype: ObjectType) -> dict:
        with self.connect() as con:
            cols = self._columns(con, otype)
        names = ["hs_object_id"] + [c for c in cols if c != otype.id_column]
        return {"results": [{"name": n, "label": n, "type": "string", "fieldType": "text"} for n in names]}

    def _object(self, otype: ObjectType, row: sqlite3.Row, props: list[str]) -> dict:
        oid = str(row[otype.id_column])
        keys = row.keys()
        wanted = props or [c for c in (otype.created, otype.modified, "email", "firstname", "lastname") if c in keys]
        out = {"hs_object_id": oid}
        for p in wanted:
            if p in keys and p != otype.id_column:
                out[p] = None if row[p] is None else str(row[p])
        return {"id": oid, "properties": out,
                "createdAt": row[otype.created] if otype.created in keys else None,
                "updatedAt": row[otype.modified] if otype.modified in keys else None, "archived": False}

    def _row(self, con, otype: ObjectType, oid: str) -> sqlite3.Row:
        row = con.execute(f'SELECT * FROM "{otype.table}" WHERE "{otype.id_column}" = ?', [oid]).fetchone()
        if row is None:
            raise HubSpotError(404, f"resource not found: {otype.label} {oid} does not exist", "OBJECT_NOT_FOUND")
        return row

    def _list(self, con, otype: ObjectType, query: dict) -> dict:
        limit = min(int((query.get("limit") or ["10"])[0]), self.list_limit)
        after = (query.get("after") or [None])[0]
        props = [p for p in (query.get("properties") or [""])[0].split(",") if p]
        self._check_props(con, otype, props)
        where, args = "", []
        if after:
            where, args = f'WHERE "{otype.id_column}" > ?', [int(after)]
        rows = con.execute(f'SELECT * FROM "{otype.table}" {where} ORDER BY "{otype.id_column}" LIMIT ?',
                           [*args, limit + 1]).fetchall()
        out = {"results": [self._object(otype, r, props) for r in rows[:limit]]}
        if len(rows) > limit:
            nxt = str(rows[limit - 1][otype.id_column])
            out["paging"] = {"next": {"after": nxt, "link": f"{self.url}/crm/v3/objects/{otype.name}?after={nxt}"}}
        return out

    def _check_props(self, con, otype: ObjectType, props) -> None:
        cols = set(self._columns(con, otype)) | {"hs_object_id"}
        bad = [p for p in props if p not in cols]
        if bad:
            raise HubSpotError(400, f'Property values were not valid: Property "{bad[0]}" does not exist',
                           "VALIDATION_ERROR")

    def _column(self, otype: ObjectType, prop: str) -> str:
        return otype.id_column if prop in ("hs_object_id", "id") else prop

    def _search(self, con, otype: ObjectType, payload: dict) -> dict:
        limit = int(payload.get("limit", 10))
        after = int(payload.get("after") or 0)
        if limit > self.search_limit:
            raise HubSpotError(400, f"limit must be at most {self.search_limit}", "VALIDATION_ERROR")
        if after + limit > self.search_max_results:
            raise HubSpotError(400, f"Paging beyond {self.search_max_results} results is not supported: narrow the "
                                "search (e.g. by lastmodifieddate)", "VALIDATION_ERROR")
        props = payload.get("properties") or []
        self._check_props(con, otype, props)
        groups, args = [], []
        for group in payload.get("filterGroups") or []:
            terms = []
            for f in group.get("filters") or []:
                col = self._column(otype, f["propertyName"])
                self._check_props(con, otype, [f["propertyName"]])
                op = _OPS.get(f.get("operator", "EQ"))
                if op is None:
                    raise HubSpotError(400, f"unsupported operator {f.get('operator')}", "VALIDATION_ERROR")
                if col in (otype.modified, otype.created):
                    terms.append(f'julianday("{col}") {op} julianday(?)')
                    args.append(_ts_value(f["value"]))
                else:
                    terms.append(f'"{col}" {op} ?')
                    args.append(f.get("value"))
            groups.append("(" + " AND ".join(terms or ["1"]) + ")")
        where = ("WHERE " + " OR ".join(groups)) if groups else ""
        order = f'"{otype.id_column}"'
        for s in payload.get("sorts") or []:
            col = self._column(otype, s["propertyName"] if isinstance(s, dict) else s)
            desc = isinstance(s, dict) and s.get("direction") == "DESCENDING"
            key = f'julianday("{col}")' if col in (otype.modified, otype.created) else f'"{col}"'
            order = f'{key} {"DESC" if desc else "ASC"}, "{otype.id_column}"'
        total = con.execute(f'SELECT count(*) FROM "{otype.table}" {where}', args).fetchone()[0]
        rows = con.execute(f'SELECT * FROM "{otype.table}" {where} ORDER BY {order} LIMIT ? OFFSET ?',
                           [*args, limit, after]).fetchall()
        out = {"total": total, "results": [self._object(otype, r, props) for r in rows]}
        if after + limit < total:
            out["paging"] = {"next": {"after": str(after + limit)}}
        return out

    def _values(self, con, otype: ObjectType, props: dict) -> dict:
        # An empty string clears a property, as in HubSpot.
        props = {k: (None if v == "" else v) for k, v in props.items() if k not in ("hs_object_id", otype.id_column)}
        self._check_props(con, otype, props)
        return props

    def _existing(self, con, otype: ObjectType, values: dict) -> str | None:
        for col in otype.unique:
            if values.get(col) not in (None, ""):
                row = con.execute(f'SELECT "{otype.id_column}" FROM "{otype.table}" WHERE "{col}" = ?',
                                  [values[col]]).fetchone()
                if row is not None:
                    return str(row[0])
        return None

    def _insert(self, con, otype: ObjectType, props: dict) -> str:
        values = self._values(con, otype, props)
        existing = self._existing(con, otype, values)
        if existing is not None:
            raise HubSpotError(409, f"{otype.label} already exists. Existing ID: {existing}", "CONFLICT")
        now = _now_iso()
        cols = self._columns(con, otype)
        for stamp in (otype.created, otype.modified):
            if stamp in cols:
                values[stamp] = now
        names = list(values)
        try:
            cur = con.execute(f'INSERT INTO "{otype.table}" ({", ".join(chr(34) + n + chr(34) for n in names)}) '
                              f'VALUES ({", ".join("?" * len(names))})', [values[n] for n in names])
        except sqlite3.IntegrityError as e:
            raise HubSpotError(400, f"Property values were not valid: {e}", "VALIDATION_ERROR") from None
        return str(cur.lastrowid)

    def _apply_update(self, con, otype: ObjectType, oid: str, props: dict) -> None:
        self._row(con, otype, oid)
        values = self._values(con, otype, props)
        clash = {k: v for k, v in values.items() if k in otype.unique}
        existing = self._existing(con, otype, clash)
        if existing is not None and existing != oid:
            raise HubSpotError(409, f"{otype.label} already exists. Existing ID: {existing}", "CONFLICT")
        if otype.modified in self._columns(con, otype):
            values[otype.modified] = _now_iso()
        sets = ", ".join(f'"{k}" = ?' for k in values)
        try:
            con.execute(f'UPDATE "{otype.table}" SET {sets} WHERE "{otype.id_column}" = ?', [*values.values(), oid])
        except sqlite3.IntegrityError as e:
            raise HubSpotError(400, f"Property values were not valid: {e}", "VALIDATION_ERROR") from None
        self.writes.append(("update", oid))

    def _create_one(self, con, otype: ObjectType, props: dict) -> dict:
        oid = self._insert(con, otype, props)
        self.writes.append(("create", oid))
        return self._object(otype, self._row(con, otype, oid), list(props))

    def _update_one(self, con, otype: ObjectType, oid: str, props: dict) -> dict:
        self._apply_update(con, otype, oid, props)
        return self._object(otype, self._row(con, otype, oid), list(props))

    def _batch(self, con, otype: ObjectType, action: str, payload: dict) -> tuple[int, dict | None]:
        inputs = payload.get("inputs") or []
        if len(inputs) > BATCH_LIMIT:
            raise HubSpotError(400, f"Batch size {len(inputs)} exceeds the limit of {BATCH_LIMIT} inputs",
                           "VALIDATION_ERROR")
        started = _now_iso()
        if action == "read":
            props = payload.get("properties") or []
            self._check_props(con, otype, props)
            results, errors = [], []
            for i in inputs:
                row = con.execute(f'SELECT * FROM "{otype.table}" WHERE "{otype.id_column}" = ?',
                                  [i["id"]]).fetchone()
                if row is None:
                    errors.append(str(i["id"]))
                else:
                    results.append(self._object(otype, row, props))
            out = {"status": "COMPLETE", "results": results, "startedAt": started, "completedAt": _now_iso()}
            if errors:
                out.update(numErrors=1, errors=[{"status": "error", "category": "OBJECT_NOT_FOUND",
                                                  "message": f"Could not get some {otype.label.upper()} objects, "
                                                             "they may be deleted or not exist.",
                                                  "context": {"ids": errors}}])
                return 207, out
            return 200, out
        if action == "create":  # all or nothing, like HubSpot
            con.execute("SAVEPOINT batch")
            try:
                created = []
                for i in inputs:
                    oid = self._insert(con, otype, i.get("properties") or {})
                    created.append((oid, i))
            except HubSpotError:
                con.execute("ROLLBACK TO batch")
                raise
            con.execute("RELEASE batch")
            results = []
            for oid, i in created:
                self.writes.append(("create", oid))
                obj = self._object(otype, self._row(con, otype, oid), list(i.get("properties") or {}))
                if i.get("objectWriteTraceId"):
                    obj["objectWriteTraceId"] = i["objectWriteTraceId"]
                results.append(obj)
            return 201, {"status": "COMPLETE", "results": results, "startedAt": started, "completedAt": _now_iso()}
        if action == "update":  # per input: what is valid is applied, the rest answers 207
            results, errors = [], []
            for i in inputs:
                con.execute("SAVEPOINT one")
                try:
                    self._apply_update(con, otype, str(i["id"]), i.get("properties") or {})
                    con.execute("RELEASE one")
                    results.append(self._object(otype, self._row(con, otype, str(i["id"])),
                                                list(i.get("properties") or {})))
                except HubSpotError as e:
                    con.execute("ROLLBACK TO one")
                    con.execute("RELEASE one")
                    errors.append({"status": "error", "category": e.category, "message": e.message,
                                   "context": {"ids": [str(i["id"])]}})
            out = {"status": "COMPLETE", "results": results, "startedAt": started, "completedAt": _now_iso()}
            if errors:
                out.update(numErrors=len(errors), errors=errors)
                return 207, out
            return 200, out
        if action == "archive":
            for i in inputs:
                con.execute(f'DELETE FROM "{otype.table}" WHERE "{otype.id_column}" = ?', [i["id"]])
                self.writes.append(("archive", str(i["id"])))
            return 204, None
        raise HubSpotError(404, f"unknown batch action {action!r}", "OBJECT_NOT_FOUND")


DEMO_TOKEN_ENV = "RECONCILE_DEMO_HUBSPOT_TOKEN"
DEFAULT_DEMO_PORT = 18777


def api_demo_config(config: str, port: int) -> str:
    """The demo config with marketing reached through this server (`reconcile demo init --api`)."""
    sql = "  marketing:\n    url: sqlite:///systems/marketing.db\n"
    api = (f"  marketing:                               # the HubSpot-like API scripts/demo.sh serves from\n"
           f"    api: hubspot                           # systems/marketing.db\n"
           f"    base_url: http://127.0.0.1:{port}\n"
           f"    token_env: {DEMO_TOKEN_ENV}   # scripts/demo.sh generates the token\n")
    key = "        table: contacts\n        key: vid\n"
    if sql not in config or key not in config:
        raise ValueError("the demo config no longer has the marketing system this variant replaces")
    return config.replace(sql, api).replace(key, "        table: contacts                 # the object type\n"
                                                 "        key: hs_object_id\n")


def main(argv: list[str] | None = None) -> int:
    """`python -m reconcile.demo.hubspot_server DB --port N --token-env VAR`: serve until terminated."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("db", help="the SQLite file holding the `contacts` table (the demo's systems/marketing.db)")
    p.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (0: any free port)")
    p.add_argument("--token-env", default=DEMO_TOKEN_ENV,
                   help="environment variable holding the bearer token clients must send")
    p.add_argument("--ready-file", help="write the server's URL here once it listens")
    args = p.parse_args(argv)
    token = os.environ.get(args.token_env)
    if not token:
        p.error(f"environment variable {args.token_env} (the API token) is not set")
    if not Path(args.db).is_file():
        p.error(f"{args.db} does not exist: run `reconcile demo init DIR --api` first")
    srv = HubSpotServer(args.db, token, port=args.port)
    if args.ready_file:
        Path(args.ready_file).write_text(srv.url)
    print(f"HubSpot-like API for {args.db} on {srv.url}", flush=True)
    srv.serve_forever()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
