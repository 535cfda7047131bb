"""Exceptions shared by every stage. The CLI maps them to exit codes (see cli.py)."""
from __future__ import annotations

from dataclasses import dataclass


class ReconcileError(Exception):
    """A failure a user can act on; the message names what and where."""


@dataclass(frozen=True)
class Problem:
    """One problem in a config file: where (key path, line) and what was expected."""

    path: str
    message: str
    line: int | None = None

    def __str__(self) -> str:
        where = self.path or "<root>"
        if self.line is not None:
            where = f"{where} (line {self.line})"
        return f"{where}: {self.message}"


class ConfigError(ReconcileError):
    """The config is invalid. Carries every problem found, not just the first."""

    def __init__(self, source: str, problems: list[Problem]):
        self.source = source
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{source}: {len(problems)} problem(s) in config:\n{lines}")


class SystemUnreachable(ReconcileError):
    """A business system could not be reached or queried."""
