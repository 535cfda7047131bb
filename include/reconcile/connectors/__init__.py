"""Connectors: the only code that talks to business systems. One module or package per protocol.

Every connector implements both halves of the protocol in base.py: read batches since a watermark, and a
writer that applies a batch of changes with per-record outcomes. Systems themselves are configuration:
any SQLAlchemy URL works with `SqlConnector`, a folder of exports with `FileConnector` (read-only), a
HubSpot- or Dynamics-style API with its package. Called by stages/extract.py, stages/load.py and the CLI's
`check-config --connect`.
"""
from __future__ import annotations

from .base import Connector, Outcome, Writer, WriteOp
from .sql import SqlConnector

__all__ = ["Connector", "Outcome", "SqlConnector", "Writer", "WriteOp", "connect"]


def connect(system: str, url: str, system_config=None) -> Connector:
    """The connector for a system, from its resolved URL (config.resolve_url) and its `SystemConfig`
    (which says the kind: `api`, `files`, else SQL). API packages are imported only when used."""
    sc = system_config
    if sc is not None and sc.files:
        from .files import FileConnector

        return FileConnector(system, url)
    if sc is not None and sc.api == "hubspot":
        from .hubspot import HubSpotConnector

        return HubSpotConnector(system, url, sc.limits)
    if sc is not None and sc.api == "dynamics":
        from .dynamics import DynamicsConnector

        return DynamicsConnector(system, url, sc.limits)
    return SqlConnector(system, url)
