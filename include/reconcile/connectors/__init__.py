"""Connectors: the only code that talks to business systems. One module per protocol.

A connector reads a source in batches (optionally only rows modified since a watermark) and, in later
stages, applies batches of changes. Systems themselves are configuration: any SQLAlchemy URL works with
`SqlConnector`.
"""
from .base import Connector
from .sql import SqlConnector

__all__ = ["Connector", "SqlConnector", "connect"]


def connect(system: str, url: str) -> Connector:
    """The connector for a system URL (today every URL is a SQLAlchemy URL)."""
    return SqlConnector(system, url)
