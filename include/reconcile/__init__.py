"""reconcile: nightly reconciliation of business systems into a DuckDB warehouse.

The public face. A DAG, the CLI and a test call the same verbs:

    cfg = load_config("reconcile.yaml")
    summary = run(cfg, entity="contact")

Stage-level verbs for orchestrators (each idempotent for a run id): `begin_run`, `extract_system`,
`load_staging`, `finish_run`. After a run: `decide_load` (approve and load, or reject), `reload`, `rollback`,
`decide` (a review decision), `erase_person`. Read verbs over the published warehouse, for the CLI, the UI
plugin and the DAGs alike: `list_runs`, `run_status`, `list_changes`, `approvals`, `gate_outcomes`,
`health_trend`, `review_queue`, `review_item`, `review_decisions`, `person_lineage`; `flow_map` reads the
config alone; `report_html` renders a run report as one self-contained HTML page. Nothing here imports Airflow. Names are imported lazily so that a DAG file
can read the config at parse time without importing DuckDB or the connectors.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "Config": "reconcile.config",
    "load_config": "reconcile.config",
    "ConfigError": "reconcile.errors",
    "ReconcileError": "reconcile.errors",
    "SystemUnreachable": "reconcile.errors",
    "begin_run": "reconcile.runner",
    "extract_system": "reconcile.runner",
    "load_staging": "reconcile.runner",
    "finish_run": "reconcile.runner",
    "new_run_id": "reconcile.runner",
    "run_entity": "reconcile.runner",
    "init_demo": "reconcile.demo",
    # acting on a run and the review queue (CLI, DAG, UI plugin alike)
    "decide_load": "reconcile.runner",
    "reload": "reconcile.runner",
    "rollback": "reconcile.runner",
    "decide": "reconcile.review",
    "erase_person": "reconcile.people",
    # read verbs over the published warehouse (reconcile.queries)
    "list_runs": "reconcile.queries",
    "latest_run_id": "reconcile.queries",
    "run_status": "reconcile.queries",
    "list_changes": "reconcile.queries",
    "approvals": "reconcile.queries",
    "gate_outcomes": "reconcile.queries",
    "health_trend": "reconcile.queries",
    "review_queue": "reconcile.queries",
    "review_item": "reconcile.queries",
    "review_decisions": "reconcile.queries",
    "person_lineage": "reconcile.people",
    # the data-flow map and HTML for people
    "flow_map": "reconcile.flow",
    "report_html": "reconcile.html.report",
}

__all__ = sorted([*_EXPORTS, "run"])


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'reconcile' has no attribute {name!r}")


def run(cfg, entity: str | None = None, **kwargs) -> dict:
    """Run one entity (or every entity, returning {entity: summary}) through every stage."""
    from .runner import run_entity

    if entity is not None:
        return run_entity(cfg, entity, **kwargs)
    return {name: run_entity(cfg, name, **kwargs) for name in sorted(cfg.entities)}
