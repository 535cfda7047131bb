"""A local Dataverse-like (Dynamics 365) Web API over a SQLite table, on 127.0.0.1, for the connector tests.

Behaves like the real API where reconcile depends on it: OData v4 `$select`, `$filter` (eq, ne, gt, ge,
lt, le joined by `and` / `or`; datetimes unquoted), `$orderby`, `$top`; `Prefer: odata.maxpagesize` paging
with `@odata.nextLink` (a `$skiptoken`); every row carries `@odata.etag`, which changes whenever the row
changes (also when it is edited behind the API); `PATCH` and `DELETE` honour `If-Match` (`412 Precondition
Failed` when the row changed); `POST` with `Prefer: return=representation`; service protection limits:
`429` with `Retry-After`. Errors in Dataverse's shape `{"error": {"code", "message"}}`.
"""
from __future__ import annotations

import hashlib
import re
import sqlite3
import time
import uuid
from collections import deque
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import quote

from .fake_api import ApiError, LocalApiServer

API = "/api/data/v9.2"
_TERM = re.compile(r"^\s*(\w+)\s+(eq|ne|gt|ge|lt|le)\s+(.+?)\s*$")
_OPS = {"eq": "=", "ne": "<>", "gt": ">", "ge": ">=", "lt": "<", "le": "<="}


def _err(status: int, message: str, code: str = "0x80040217", headers: dict | None = None) -> ApiError:
    return ApiError(status, {"error": {"code": code, "message": message}}, headers)


class EntitySet:
    def __init__(self, name: str, table: str, id_column: str, modified: str = "modifiedon",
                 created: str = "createdon"):
        self.name, self.table, self.id_column, self.modified, self.created = name, table, id_column, modified, created


class DynamicsServer(LocalApiServer):
    def __init__(self, db: str | Path, token: str, sets: list[EntitySet], port: int = 0,
                 rate_limit: tuple[int, float] | None = None, retry_after: int = 1):
        super().__init__(db, token, port)
        self.sets = {s.name: s for s in sets}
        self.rate_limit, self.retry_after = rate_limit, retry_after
        self._hits: deque = deque()

    def unauthorized(self) -> ApiError:
        return _err(401, "Bearer token is missing or invalid", "0x80072560")

    def fault_body(self, status: int) -> dict:
        return {"error": {"code": "0x80072322" if status == 429 else "0x80040216",
                          "message": f"injected HTTP {status}"}}

    def _throttled(self) -> bool:
        if not self.rate_limit:
            return False
        limit, per = self.rate_limit
        now = time.monotonic()
        with self.lock:
            while self._hits and now - self._hits[0] > per:
                self._hits.popleft()
            if len(self._hits) >= limit:
                return True
            self._hits.append(now)
        return False

    def route(self, method: str, path: str, query: dict, headers, payload):
        if self._throttled():
            raise _err(429, "Number of requests exceeded the limit of 6000 over time window of 300 seconds.",
                       "0x80072322", {"Retry-After": str(self.retry_after)})
        if not path.startswith(API + "/"):
            raise _err(404, f"Resource not found for the segment '{path}'.", "0x8006088a")
        rest = path[len(API) + 1:]
        q = {k: v[0] for k, v in query.items()}
        if rest == "EntityDefinitions" and method == "GET":
            return 200, {}, self._definitions(q)
        m = re.fullmatch(r"(\w+)(?:\(([^)]+)\))?", rest)
        if not m or m.group(1) not in self.sets:
            raise _err(404, f"Resource not found for the segment '{rest}'.", "0x8006088a")
        es, rid = self.sets[m.group(1)], m.group(2)
        rid = rid.strip("'") if rid else None
        with self.lock, self.connect() as con:
            if rid is None and method == "GET":
                return self._list(con, es, q, headers)
            if rid is None and method == "POST":
                return self._create(con, es, payload, headers)
            row = con.execute(f'SELECT * FROM "{es.table}" WHERE "{es.id_column}" = ?', [rid]).fetchone()
            if row is None:
                raise _err(404, f"{es.table} With Id = {rid} Does Not Exist", "0x80040217")
            match = headers.get("If-Match")
            if match and match != "*" and match != _etag(row):
                raise _err(412, "The version of the existing record doesn't match the RowVersion property provided.",
                           "0x80060882")
            if method == "GET":
                return 200, {}, self._entity(es, row, _select(q))
            if method == "PATCH":
                values = self._values(con, es, payload)
                cols = self._columns(con, es)
                if es.modified in cols:
                    values[es.modified] = _now()
                sets = ", ".join(f'"{k}" = ?' for k in values)
                try:
                    con.execute(f'UPDATE "{es.table}" SET {sets} WHERE "{es.id_column}" = ?', [*values.values(), rid])
                except sqlite3.IntegrityError as e:
                    raise _err(400, str(e), "0x80040237") from None
                self.writes.append(("update", rid))
                return 204, {}, None
            if method == "DELETE":
                con.execute(f'DELETE FROM "{es.table}" WHERE "{es.id_column}" = ?', [rid])
                self.writes.append(("delete", rid))
                return 204, {}, None
        raise _err(405, f"{method} is not supported here", "0x80060888")

    def _columns(self, con, es: EntitySet) -> list[str]:
        return [r[1] for r in con.execute(f'PRAGMA table_info("{es.table}")')]

    def _definitions(self, q: dict) -> dict:
        m = re.fullmatch(r"EntitySetName eq '(\w+)'", q.get("$filter", ""))
        if not m or m.group(1) not in self.sets:
            return {"value": []}
        es = self.sets[m.group(1)]
        with self.connect() as con:
            cols = self._columns(con, es)
        return {"value": [{"LogicalName": es.table, "EntitySetName": es.name,
                           "Attributes": [{"LogicalName": c} for c in cols]}]}

    def _entity(self, es: EntitySet, row: sqlite3.Row, select: list[str]) -> dict:
        out = {"@odata.etag": _etag(row)}
        for c in select or row.keys():
            if c not in row.keys():
                raise _err(400, f"Could not find a property named '{c}' on type 'Microsoft.Dynamics.CRM.{es.table}'.",
                           "0x80060888")
            out[c] = row[c]
        return out

    def _where(self, es: EntitySet, text: str | None) -> tuple[str, list]:
        if not text:
            return "", []
        groups, args = [], []
        for group in re.split(r"\s+or\s+", text.strip().strip("()")):
            terms = []
            for term in re.split(r"\s+and\s+", group.strip().strip("()")):
                m = _TERM.match(term)
                if not m:
                    raise _err(400, f"Syntax error in $filter near '{term}'", "0x80060888")
                col, op, raw = m.groups()
                value = None if raw == "null" else raw[1:-1].replace("''", "'") if raw.startswith("'") else raw
                if col in (es.modified, es.created):
                    terms.append(f'julianday("{col}") {_OPS[op]} julianday(?)')
                elif value is None:
                    terms.append(f'"{col}" IS {"NOT " if op == "ne" else ""}NULL')
                    continue
                else:
                    terms.append(f'"{col}" {_OPS[op]} ?')
                args.append(value)
            groups.append("(" + " AND ".join(terms) + ")")
        return "WHERE " + " OR ".join(groups), args

    def _list(self, con, es: EntitySet, q: dict, headers):
        prefer = headers.get("Prefer") or ""
        m = re.search(r"odata\.maxpagesize=(\d+)", prefer)
        page = min(int(m.group(1)), 5000) if m else 5000
        if "$top" in q:
            page = min(page, int(q["$top"]))
        skip = int(q.get("$skiptoken") or 0)
        where, args = self._where(es, q.get("$filter"))
        order = f'"{es.id_column}"'
        if q.get("$orderby"):
            col, _, direction = q["$orderby"].partition(" ")
            key = f'julianday("{col}")' if col in (es.modified, es.created) else f'"{col}"'
            order = f'{key} {"DESC" if direction.strip() == "desc" else "ASC"}, "{es.id_column}"'
        rows = con.execute(f'SELECT * FROM "{es.table}" {where} ORDER BY {order} LIMIT ? OFFSET ?',
                           [*args, page + 1, skip]).fetchall()
        out = {"@odata.context": f"{self.url}{API}/$metadata#{es.name}",
               "value": [self._entity(es, r, _select(q)) for r in rows[:page]]}
        if len(rows) > page and "$top" not in q:
            params = "&".join(f"{k}={quote(v, safe='')}" for k, v in q.items() if k != "$skiptoken")
            out["@odata.nextLink"] = f"{self.url}{API}/{es.name}?{params}&$skiptoken={skip + page}"
        return 200, ({"Preference-Applied": f"odata.maxpagesize={page}"} if m else {}), out

    def _values(self, con, es: EntitySet, payload: dict) -> dict:
        cols = set(self._columns(con, es))
        bad = [k for k in payload if k not in cols]
        if bad:
            raise _err(400, f"The property '{bad[0]}' does not exist on type 'Microsoft.Dynamics.CRM.{es.table}'.",
                       "0x80060888")
        return {k: v for k, v in payload.items() if k != es.id_column}

    def _create(self, con, es: EntitySet, payload: dict, headers):
        values = self._values(con, es, payload)
        rid = str(payload.get(es.id_column) or uuid.uuid4())
        values[es.id_column] = rid
        cols = self._columns(con, es)
        for stamp in (es.created, es.modified):
            if stamp in cols:
                values[stamp] = _now()
        names = list(values)
        try:
            con.execute(f'INSERT INTO "{es.table}" ({", ".join(chr(34) + n + chr(34) for n in names)}) '
                        f'VALUES ({", ".join("?" * len(names))})', [values[n] for n in names])
        except sqlite3.IntegrityError as e:
            raise _err(400, str(e), "0x80040237") from None
        self.writes.append(("create", rid))
        link = {"OData-EntityId": f"{self.url}{API}/{es.name}({rid})"}
        if "return=representation" in (headers.get("Prefer") or ""):
            row = con.execute(f'SELECT * FROM "{es.table}" WHERE "{es.id_column}" = ?', [rid]).fetchone()
            return 201, link, self._entity(es, row, [])
        return 204, link, None


def _select(q: dict) -> list[str]:
    return [c for c in (q.get("$select") or "").split(",") if c]


def _etag(row: sqlite3.Row) -> str:
    """A row version that changes with any change to the row (Dataverse's versionnumber)."""
    digest = hashlib.md5(repr(tuple(row)).encode()).hexdigest()[:12]
    return f'W/"{int(digest, 16)}"'


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
