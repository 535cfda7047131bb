"""The connector protocol every protocol-specific connector implements."""
from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime
from typing import Protocol

import pyarrow as pa

from ..config.models import SourceConfig


class Connector(Protocol):
    system: str

    def check(self) -> None:
        """Raise SystemUnreachable (naming the system, never the password) if the system cannot be reached."""

    def columns(self, source: SourceConfig) -> list[str]:
        """The columns the source (table or query) really has."""

    def read_batches(self, source: SourceConfig, columns: list[str], since: datetime | None,
                     batch_size: int) -> Iterator[pa.Table]:
        """Yield the source's rows as Arrow tables of strings (raw values, NULL kept), `batch_size` rows each."""

    def close(self) -> None: ...
