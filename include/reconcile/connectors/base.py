"""The connector protocol: both halves every connector implements (SQL, files, HubSpot, Dynamics).

Read half: `columns` and `read_batches` (Arrow tables of strings, optionally only rows modified since a
watermark), called by stages/extract.py. Write half: `writer(source)` returns a `Writer` that reads the
target's current values and applies a batch of `WriteOp`s with one `Outcome` per op, called by
stages/load.py, which never sees a connection, a transaction or an HTTP call. A read-only connector (files)
raises `ReconcileError` from `writer`.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal, Protocol

import pyarrow as pa

from ..config.models import SourceConfig

Values = dict[str, str | None]


@dataclass
class WriteOp:
    """One record's write. `expected` is the optimistic-concurrency precondition: the target's values (as
    strings, like extraction) the write was planned against; if any differ now the op is skipped as a
    conflict, never written."""

    ref: str                                    # the caller's id for this op (echoed in its Outcome)
    op: Literal["create", "update", "delete"]
    key: str | None = None                      # the target's record (None for create)
    values: dict[str, object] = field(default_factory=dict)
    expected: Values | None = None


@dataclass
class Outcome:
    """What happened to one WriteOp.

    status: applied | failed | skipped_conflict | held (the target refused a create because the record
    already exists there: `existing_key` names it, a link candidate for review, never retried blindly).
    """

    ref: str
    status: Literal["applied", "failed", "skipped_conflict", "held"]
    key: str | None = None                      # the record written (new key for a create)
    error: str | None = None                    # the target's own message
    before: Values | None = None                # values of the written columns just before the write
    existing_key: str | None = None


class Writer(Protocol):
    """The write half for one source (table, API object type) of a system."""

    key: str
    load_batch: int  # records per load batch (one journal entry, one transaction where the target has them)
                     # when `load.batch_size` is unset

    def current(self, keys: list[str], columns: list[str]) -> dict[str, Values]:
        """The target's current values (strings, like extraction) of these records; absent keys are gone."""

    def apply(self, ops: list[WriteOp]) -> list[Outcome]:
        """Apply a batch; one Outcome per op, in order. A rejected record fails alone."""

    def find(self, values: dict[str, object]) -> str | None:
        """The key of a record holding exactly these values (resuming an interrupted create), else None."""


class Connector(Protocol):
    system: str

    def check(self) -> None:
        """Raise SystemUnreachable (naming the system, never a password or token) if it cannot be reached."""

    def columns(self, source: SourceConfig) -> list[str]:
        """The columns (properties) the source really has."""

    def read_batches(self, source: SourceConfig, columns: list[str], since: datetime | None,
                     batch_size: int) -> Iterator[pa.Table]:
        """Yield the source's rows as Arrow tables of strings (raw values, NULL kept), `batch_size` rows each."""

    def max_lengths(self, source: SourceConfig) -> dict[str, int]:
        """Declared maximum lengths (characters) of the source's text columns, e.g. a VARCHAR(40); {} where
        the system declares none. Read at extract, checked by the plan before anything is written."""

    def writer(self, source: SourceConfig) -> Writer:
        """The write half for this source; ReconcileError if the system or source cannot be written."""

    def close(self) -> None: ...


def as_text(value: object) -> str | None:
    """A value as extraction sees it (text, NULL kept): the form preconditions and before-images compare."""
    if value is None:
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def conflict(expected: Values | None, now: Values | None, key: str | None) -> str | None:
    """Why a write planned against `expected` must not happen now (None: the record is as extracted)."""
    if now is None:
        return f"record {key} no longer exists in the target"
    drift = {c: (v, now.get(c)) for c, v in (expected or {}).items() if c in now and v != now.get(c)}
    if drift:
        return "changed in the target since extraction: " + ", ".join(
            f"{c} {a!r} -> {b!r}" for c, (a, b) in sorted(drift.items()))
    return None


def strings(values: list) -> pa.Array:
    """Python values -> an Arrow string array (the connector boundary: raw text, NULL kept)."""
    out = []
    for v in values:
        if v is None or isinstance(v, str):
            out.append(v)
        elif isinstance(v, datetime):
            out.append(v.isoformat(sep=" "))
        elif isinstance(v, bytes):
            out.append(v.hex())
        else:
            out.append(str(v))
    return pa.array(out, type=pa.string())
