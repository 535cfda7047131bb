"""The order of a run's stages, declared once: the runner (`run_entity`), the Airflow DAG and its tests follow
this list. Imports nothing heavy (the DAG file reads it at parse time).

Each stage is a function of `reconcile.runner` and an Airflow task of the same position in the DAG:
`per` says whether it runs once per run (None), once per source system ("system", in parallel on Airflow) or
once per target system ("target"); `recorded` is its name in `audit.stage_runs` where it records a result;
`always`: it runs even when an earlier stage failed (Airflow trigger rule all_done).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Stage:
    function: str                 # reconcile.runner.<function>
    task: str                     # the Airflow task id
    per: str | None = None        # None | "system" | "target"
    recorded: str | None = None   # its name in audit.stage_runs (None: records nothing there)
    always: bool = False          # runs after an earlier stage failed too


STAGES: tuple[Stage, ...] = (
    Stage("begin_run", "begin_run"),
    Stage("extract_system", "extract", per="system"),
    Stage("load_staging", "load_staging", recorded="extract"),
    Stage("validate_system", "validate", per="system"),
    Stage("apply_gates", "apply_gates", recorded="gates"),
    Stage("resolve_identity", "resolve_identity", recorded="identity"),
    Stage("build_golden", "build_golden", recorded="golden"),
    Stage("guard_collisions", "guard_collisions", recorded="guard"),
    Stage("plan_changes", "plan_changes", recorded="plan"),
    Stage("load_changes", "load", per="target", recorded="load"),
    Stage("record_loads", "record_loads", always=True),
    Stage("purge_erased", "purge_erased", always=True),
    Stage("finish_run", "finish_run", always=True),
)

# `reconcile extract` (runner.run_entity(through="extract")) stops after this stage.
EXTRACT_ONLY_THROUGH = "load_staging"


def task_ids() -> list[str]:
    """The DAG's main chain of task ids, in order (the approval branch sits between plan and load)."""
    return [s.task for s in STAGES]


def in_task_order(names) -> list[str]:
    """Stage names (task names, `<task>:<system or target>` for the per-system ones) sorted in pipeline order;
    unknown names last."""
    order = {task: i for i, task in enumerate(task_ids())}
    return sorted(names, key=lambda n: (order.get(n.split(":")[0], len(order)), n))


def task_of(recorded: str) -> str:
    """The task name of an audit.stage_runs name: `extract` -> `load_staging`, `load:<target>` stays."""
    base, sep, rest = recorded.partition(":")
    task = next((s.task for s in STAGES if s.recorded == base), base)
    return f"{task}{sep}{rest}"
