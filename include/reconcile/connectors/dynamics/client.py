"""Dataverse (Dynamics 365) Web API: read with OData `$select` / `$filter` on the modified column, paged by
`@odata.nextLink` with `Prefer: odata.maxpagesize`; write record by record, `PATCH` / `DELETE` with
`If-Match` on the row's ETag read just before the batch (`412 Precondition Failed`: the row changed since,
so `skipped_conflict`), `POST` for creates. The source's `table` is the entity set (`contacts`), `key` its
id column (`contactid`), `modified_at` usually `modifiedon`. Called through the Connector / Writer protocol
(connectors/base.py).
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

_GUID = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")


def literal(value: object) -> str:
    """An OData literal: GUIDs and numbers bare, text quoted ('' escapes a quote), null."""
    if value is None:
        return "null"
    text = as_text(value)
    if _GUID.match(text) or re.fullmatch(r"-?\d+(\.\d+)?", text) or text in ("true", "false"):
        return text
    return "'" + text.replace("'", "''") + "'"


class DynamicsConnector:
    def __init__(self, system: str, url: str, limits: ApiLimits | None = None):
        lim = limits or ApiLimits()
        self.system = system
        self.page_size = lim.page_size or S.PAGE_SIZE
        self.batch_size = lim.batch_size or S.BATCH_SIZE
        self.api = ApiClient(system, url, max_retries=S.MAX_RETRIES if lim.max_retries is None else lim.max_retries,
                             max_wait=lim.max_wait_seconds or S.MAX_WAIT_SECONDS,
                             timeout=lim.timeout_seconds or S.TIMEOUT_SECONDS, headers=S.HEADERS)

    def check(self) -> None:
        self.api.json("GET", "/EntityDefinitions", params={"$select": "LogicalName", "$top": "1"})

    def max_lengths(self, source: SourceConfig) -> dict[str, int]:
        """Not read from the metadata: the plan applies DEFAULT_MAX_TEXT_LENGTH unless writes.limits names one."""
        return {}

    def columns(self, source: SourceConfig) -> list[str]:
        body = self.api.json("GET", "/EntityDefinitions", params={
            "$filter": f"EntitySetName eq '{source.table}'", "$select": "LogicalName",
            "$expand": "Attributes($select=LogicalName)"})
        found = body.get("value") or []
        if not found:
            raise ReconcileError(f"system {self.system!r}: entity set {source.table!r} does not exist")
        return [a["LogicalName"] for a in found[0].get("Attributes", [])]

    def rows(self, path: str, params: dict) -> Iterator[list[dict]]:
        """Pages of rows, following `@odata.nextLink` (an absolute URL carrying every parameter)."""
        headers = {"Prefer": f"odata.maxpagesize={self.page_size}"}
        body = self.api.json("GET", path, params=params, headers=headers)
        while True:
            yield body.get("value", [])
            nxt = body.get("@odata.nextLink")
            if not nxt:
                return
            body = self.api.json("GET", nxt, headers=headers)

    def read_batches(self, source: SourceConfig, columns: list[str], since: datetime | None,
                     batch_size: int) -> Iterator[pa.Table]:
        params = {"$select": ",".join(columns)}
        if since is not None and source.modified_at:
            ts = since if since.tzinfo else since.replace(tzinfo=timezone.utc)
            params["$filter"] = f"{source.modified_at} ge {ts.strftime('%Y-%m-%dT%H:%M:%SZ')}"
            params["$orderby"] = f"{source.modified_at} asc"
        rows: list[dict] = []
        for page in self.rows(f"/{source.table}", params):
            rows += page
            while len(rows) >= batch_size:
                yield _table(rows[:batch_size], columns)
                rows = rows[batch_size:]
        if rows:
            yield _table(rows, columns)

    def writer(self, source: SourceConfig) -> DynamicsWriter:
        return DynamicsWriter(self, source)

    def close(self) -> None:
        self.api.close()


def _table(rows: list[dict], columns: list[str]) -> pa.Table:
    return pa.table([strings([as_text(r.get(c)) for r in rows]) for c in columns], names=columns)


class DynamicsWriter:
    """Writes one entity set, record by record, each guarded by the ETag read just before the batch."""

    load_batch = 200  # records journalled together (and re-verified after a crash)

    def __init__(self, connector: DynamicsConnector, source: SourceConfig):
        self.c = connector
        self.api = connector.api
        self.key = source.key
        self.set = source.table
        self._etags: dict[str, str] = {}

    def _path(self, key: str) -> str:
        return f"/{self.set}({key})"

    def current(self, keys: list[str], columns: list[str]) -> dict[str, Values]:
        out: dict[str, Values] = {}
        keys = list(dict.fromkeys(keys))
        select = ",".join(dict.fromkeys([self.key, *columns]))
        for i in range(0, len(keys), self.c.batch_size):
            chunk = keys[i:i + self.c.batch_size]
            flt = " or ".join(f"{self.key} eq {literal(k)}" for k in chunk)
            for page in self.c.rows(f"/{self.set}", {"$select": select, "$filter": flt}):
                for r in page:
                    k = as_text(r[self.key])
                    self._etags[k] = r.get("@odata.etag")
                    out[k] = {c: as_text(r.get(c)) for c in columns}
        return out

    def find(self, values: dict[str, object]) -> str | None:
        terms = [f"{k} eq {literal(v)}" for k, v in values.items() if v is not None]
        if not terms:
            return None
        body = self.api.json("GET", f"/{self.set}", params={"$select": self.key, "$filter": " and ".join(terms),
                                                           "$top": "1"})
        found = body.get("value") or []
        return as_text(found[0][self.key]) if found else None

    def apply(self, ops: list[WriteOp]) -> list[Outcome]:
        keyed = [o for o in ops if o.op != "create"]
        cols = sorted({c for o in keyed for c in [*(o.expected or {}), *o.values]})
        now = self.current([o.key for o in keyed], cols) if keyed else {}
        return [self._create(o) if o.op == "create" else self._write(o, now.get(o.key)) for o in ops]

    def _write(self, o: WriteOp, now: Values | None) -> Outcome:
        why = conflict(o.expected, now, o.key)
        if why:
            return Outcome(o.ref, "skipped_conflict", key=o.key, error=why)
        headers = {"If-Match": self._etags.get(o.key) or "*"}
        if o.op == "delete":
            resp = self.api.request("DELETE", self._path(o.key), headers=headers)
        else:
            resp = self.api.request("PATCH", self._path(o.key), json=o.values, headers=headers)
        if resp.status_code in (200, 204):
            return Outcome(o.ref, "applied", key=o.key, before={c: now.get(c) for c in o.values})
        if resp.status_code == 412:
            return Outcome(o.ref, "skipped_conflict", key=o.key,
                           error=f"changed in the target since it was read (412 Precondition Failed: "
                                 f"{self.api.message(resp)})")
        if resp.status_code == 404:
            return Outcome(o.ref, "skipped_conflict", key=o.key, error=f"record {o.key} no longer exists in the target")
        return Outcome(o.ref, "failed", key=o.key, error=self.api.message(resp))

    def _create(self, o: WriteOp) -> Outcome:
        resp = self.api.request("POST", f"/{self.set}", json={k: v for k, v in o.values.items() if v is not None},
                                headers={"Prefer": "return=representation"})
        if resp.status_code == 201 and resp.content:
            return Outcome(o.ref, "applied", key=as_text(resp.json().get(self.key)))
        if resp.status_code in (201, 204):
            m = re.search(r"\(([^)]+)\)\s*$", resp.headers.get("OData-EntityId", ""))
            return Outcome(o.ref, "applied", key=m.group(1) if m else None)
        return Outcome(o.ref, "failed", error=self.api.message(resp))
