"""HubSpot CRM v3 objects: read (list with the `after` cursor; incremental through search on the modified
property, re-windowed before the 10,000-result cap) and write (batch read / create / update / archive, 100
per call, per-record outcomes).

The source's `table` is the object type (`contacts`), `key` its id property (`hs_object_id`), `modified_at`
its last-modified property (`lastmodifieddate` for contacts, `hs_lastmodifieddate` for most others); mapped
columns are properties. A create refused with `409 Conflict` (a contact with that email exists) is `held`
with the existing id, never retried. Called through the Connector / Writer protocol (connectors/base.py).
"""
from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import datetime, timezone

import pyarrow as pa

from ...config.models import ApiLimits, SourceConfig
from ...errors import ReconcileError
from ..base import Outcome, Values, WriteOp, as_text, conflict, strings
from ..http import ApiClient
from . import settings as S

_EXISTING = re.compile(r"Existing ID: *(\S+?)\.?$")


def _rate_wait(resp) -> float | None:
    """HubSpot's 429 carries no Retry-After: when the window is used up, wait for the next interval."""
    if resp.headers.get("X-HubSpot-RateLimit-Remaining") == "0":
        ms = resp.headers.get("X-HubSpot-RateLimit-Interval-Milliseconds")
        if ms and ms.isdigit():
            return int(ms) / 1000
    return None


class HubSpotConnector:
    def __init__(self, system: str, url: str, limits: ApiLimits | None = None):
        lim = limits or ApiLimits()
        self.system = system
        self.page_size = lim.page_size or S.PAGE_SIZE
        self.search_page_size = lim.search_page_size or S.SEARCH_PAGE_SIZE
        self.search_max_results = lim.search_max_results or S.SEARCH_MAX_RESULTS
        self.batch_size = lim.batch_size or S.BATCH_SIZE
        self.api = ApiClient(system, url, max_retries=S.MAX_RETRIES if lim.max_retries is None else lim.max_retries,
                             max_wait=lim.max_wait_seconds or S.MAX_WAIT_SECONDS,
                             timeout=lim.timeout_seconds or S.TIMEOUT_SECONDS, rate_wait=_rate_wait)

    def _objects(self, source: SourceConfig) -> str:
        return f"{S.OBJECTS_PATH}/{source.table}"

    def check(self) -> None:
        self.api.json("GET", f"{S.OBJECTS_PATH}/contacts", params={"limit": 1})

    def max_lengths(self, source: SourceConfig) -> dict[str, int]:
        """Property definitions carry no length: the plan applies HubSpot's 65,535 (DEFAULT_MAX_TEXT_LENGTH)."""
        return {}

    def columns(self, source: SourceConfig) -> list[str]:
        body = self.api.json("GET", f"{S.PROPERTIES_PATH}/{source.table}")
        names = [p["name"] for p in body.get("results", [])]
        return list(dict.fromkeys([S.ID_PROPERTY, source.key, *names]))

    def read_batches(self, source: SourceConfig, columns: list[str], since: datetime | None,
                     batch_size: int) -> Iterator[pa.Table]:
        pages = self._search(source, columns, since) if since is not None and source.modified_at else \
            self._list(source, columns)
        rows: list[dict] = []
        for page in pages:
            rows += page
            while len(rows) >= batch_size:
                yield self._table(rows[:batch_size], columns, source.key)
                rows = rows[batch_size:]
        if rows:
            yield self._table(rows, columns, source.key)

    def _props(self, columns: list[str], key: str) -> list[str]:
        return [c for c in columns if c not in (key, S.ID_PROPERTY)] or [S.ID_PROPERTY]

    def _list(self, source: SourceConfig, columns: list[str]) -> Iterator[list[dict]]:
        params = {"limit": self.page_size, "properties": ",".join(self._props(columns, source.key)),
                  "archived": "false"}
        while True:
            body = self.api.json("GET", self._objects(source), params=params)
            yield body.get("results", [])
            after = ((body.get("paging") or {}).get("next") or {}).get("after")
            if not after:
                return
            params = {**params, "after": after}

    def _search(self, source: SourceConfig, columns: list[str], since: datetime) -> Iterator[list[dict]]:
        """Records modified at or after `since`, ascending. A search pages through at most
        `search_max_results` results, so before the cap it starts a new window at the newest modified time
        read, skipping the records already read."""
        mod = source.modified_at
        start = _epoch_ms(since)
        seen: set[str] = set()
        props = list(dict.fromkeys([*self._props(columns, source.key), mod]))
        while True:
            after, newest, fresh = 0, start, 0
            while True:
                body = self.api.json("POST", f"{self._objects(source)}/search", json={
                    "filterGroups": [{"filters": [{"propertyName": mod, "operator": "GTE", "value": str(start)}]}],
                    "sorts": [{"propertyName": mod, "direction": "ASCENDING"}],
                    "properties": props, "limit": self.search_page_size, "after": str(after)})
                page = []
                for obj in body.get("results", []):
                    value = (obj.get("properties") or {}).get(mod)
                    if value:
                        newest = max(newest, _epoch_ms(value))
                    if obj["id"] not in seen:
                        seen.add(obj["id"])
                        page.append(obj)
                fresh += len(page)
                yield page
                nxt = ((body.get("paging") or {}).get("next") or {}).get("after")
                if not nxt:
                    return
                after = int(nxt)
                if after + self.search_page_size > self.search_max_results:
                    break  # the next page would cross the cap: a new window
            if newest == start and not fresh:
                raise ReconcileError(
                    f"system {self.system!r}: more than {self.search_max_results} {source.table} share the "
                    f"{mod} value {since.isoformat()}; the search API cannot page through them (run a full extract)")
            start = newest

    def _table(self, objs: list[dict], columns: list[str], key: str) -> pa.Table:
        cols = []
        for c in columns:
            if c in (key, S.ID_PROPERTY):
                cols.append(strings([o["id"] for o in objs]))
            else:
                cols.append(strings([(o.get("properties") or {}).get(c) for o in objs]))
        return pa.table(cols, names=columns)

    def writer(self, source: SourceConfig) -> HubSpotWriter:
        return HubSpotWriter(self, source)

    def close(self) -> None:
        self.api.close()


class HubSpotWriter:
    """Writes one object type: batch calls of `batch_size`, each record's outcome from the API's answer."""

    load_batch = 200  # records journalled together; the calls inside stay at the vendor's batch limit

    def __init__(self, connector: HubSpotConnector, source: SourceConfig):
        self.c = connector
        self.api = connector.api
        self.key = source.key
        self.path = connector._objects(source)
        self.n = connector.batch_size

    def _chunks(self, items: list) -> Iterator[list]:
        for i in range(0, len(items), self.n):
            yield items[i:i + self.n]

    def current(self, keys: list[str], columns: list[str]) -> dict[str, Values]:
        props = [c for c in dict.fromkeys(columns) if c not in (self.key, S.ID_PROPERTY)]
        out: dict[str, Values] = {}
        for chunk in self._chunks(list(dict.fromkeys(keys))):
            body = self.api.json("POST", f"{self.path}/batch/read", ok=(200, 207),
                                 json={"properties": props, "inputs": [{"id": k} for k in chunk]})
            for obj in body.get("results", []):
                p = obj.get("properties") or {}
                out[str(obj["id"])] = {c: (str(obj["id"]) if c in (self.key, S.ID_PROPERTY) else p.get(c))
                                       for c in columns}
        return out

    def find(self, values: dict[str, object]) -> str | None:
        filters = [{"propertyName": k, "operator": "EQ", "value": as_text(v)} for k, v in values.items()
                   if v is not None and k not in (self.key, S.ID_PROPERTY)]
        if not filters:
            return None
        body = self.api.json("POST", f"{self.path}/search", json={
            "filterGroups": [{"filters": filters}], "properties": [S.ID_PROPERTY], "limit": 1})
        results = body.get("results") or []
        return str(results[0]["id"]) if results else None

    def apply(self, ops: list[WriteOp]) -> list[Outcome]:
        out: dict[str, Outcome] = {}
        keyed = [o for o in ops if o.op != "create"]
        if keyed:
            cols = sorted({c for o in keyed for c in [*(o.expected or {}), *o.values]})
            now = self.current([o.key for o in keyed], cols)
            ready = []
            for o in keyed:
                why = conflict(o.expected, now.get(o.key), o.key)
                if why:
                    out[o.ref] = Outcome(o.ref, "skipped_conflict", key=o.key, error=why)
                else:
                    o_before = {c: now[o.key].get(c) for c in o.values}
                    out[o.ref] = Outcome(o.ref, "applied", key=o.key, before=o_before)
                    ready.append(o)
            self._updates([o for o in ready if o.op == "update"], out)
            self._archive([o for o in ready if o.op == "delete"], out)
        self._creates([o for o in ops if o.op == "create"], out)
        return [out[o.ref] for o in ops]

    def _props(self, values: dict[str, object], create: bool = False) -> dict[str, str]:
        """Property values as HubSpot takes them: text; an empty string clears a property (a create omits it)."""
        return {k: ("" if v is None else as_text(v)) for k, v in values.items()
                if k not in (self.key, S.ID_PROPERTY) and not (create and v is None)}

    def _fail(self, out: dict[str, Outcome], ref: str, message: str) -> None:
        o = out[ref]
        out[ref] = Outcome(ref, "failed", key=o.key, error=message[:500])

    def _updates(self, ops: list[WriteOp], out: dict[str, Outcome]) -> None:
        for chunk in self._chunks(ops):
            resp = self.api.request("POST", f"{self.path}/batch/update", json={
                "inputs": [{"id": o.key, "properties": self._props(o.values)} for o in chunk]})
            if resp.status_code == 200:
                continue
            if resp.status_code == 207:
                by_key = {o.key: o.ref for o in chunk}
                for err in resp.json().get("errors", []):
                    for k in (err.get("context") or {}).get("ids", []):
                        if str(k) in by_key:
                            why = err.get("message") or err.get("category", "error")
                            self._fail(out, by_key[str(k)], self.api.mask(why))
                continue
            # The whole batch refused (one bad input may fail all): isolate each record.
            for o in chunk:
                one = self.api.request("PATCH", f"{self.path}/{o.key}", json={"properties": self._props(o.values)})
                if one.status_code == 404:
                    out[o.ref] = Outcome(o.ref, "skipped_conflict", key=o.key,
                                         error=f"record {o.key} no longer exists in the target")
                elif one.status_code >= 300:
                    self._fail(out, o.ref, self.api.message(one))

    def _archive(self, ops: list[WriteOp], out: dict[str, Outcome]) -> None:
        for chunk in self._chunks(ops):
            resp = self.api.request("POST", f"{self.path}/batch/archive", json={"inputs": [{"id": o.key} for o in chunk]})
            if resp.status_code >= 300:
                for o in chunk:
                    self._fail(out, o.ref, self.api.message(resp))

    def _creates(self, ops: list[WriteOp], out: dict[str, Outcome]) -> None:
        for chunk in self._chunks(ops):
            resp = self.api.request("POST", f"{self.path}/batch/create", json={
                "inputs": [{"properties": self._props(o.values, create=True), "objectWriteTraceId": o.ref} for o in chunk]})
            if resp.status_code in (200, 201):
                results = resp.json().get("results", [])
                traced = {r.get("objectWriteTraceId"): str(r["id"]) for r in results if r.get("objectWriteTraceId")}
                for i, o in enumerate(chunk):
                    key = traced.get(o.ref) or (str(results[i]["id"]) if not traced and i < len(results) else None)
                    out[o.ref] = Outcome(o.ref, "applied", key=key)
                continue
            # A batch create is all or nothing (409 when one email exists, 400 for one bad value): one by one,
            # so each record gets its own answer.
            for o in chunk:
                one = self.api.request("POST", self.path, json={"properties": self._props(o.values, create=True)})
                if one.status_code in (200, 201):
                    out[o.ref] = Outcome(o.ref, "applied", key=str(one.json()["id"]))
                elif one.status_code == 409:
                    msg = self.api.message(one)
                    m = _EXISTING.search(msg)
                    out[o.ref] = Outcome(o.ref, "held", error=msg, existing_key=m.group(1) if m else None)
                else:
                    out[o.ref] = Outcome(o.ref, "failed", error=self.api.message(one))


def _epoch_ms(value: datetime | str) -> int:
    """A timestamp (naive = UTC, or ISO text such as HubSpot's `2026-01-01T09:00:00.000Z`) as epoch ms."""
    if isinstance(value, str):
        if value.isdigit():
            return int(value)
        value = datetime.fromisoformat(value.replace("Z", "+00:00"))
    if value.tzinfo is None:
        value = value.replace(tzinfo=timezone.utc)
    return int(value.timestamp() * 1000)
