"""Human approval of loads over a change threshold, for the reconcile DAGs (Airflow 3 human-in-the-loop).

`reconcile_dags.py` branches after `plan_changes`: `follow()` picks `approve_load` only when a target's load
waits for approval, so a run that needs none never reaches the human-in-the-loop task (`airflow dags test`
would otherwise wait for an answer). `approval_request()` writes the question: change counts per target,
operation and status, ten sample changes and the command that lists them all. `LoadApprovalOperator` is
Airflow's `ApprovalOperator` (options Approve / Reject, default Reject, bounded response timeout) that records
the answer in reconcile's `audit.approvals` through `runner.approve`, so Airflow and the CLI agree on it: an
approval lets `load_approved` write; a rejection, or no answer before the timeout, writes nothing.
"""
from __future__ import annotations

import math
import os
from collections.abc import Mapping
from datetime import timedelta
from typing import Any

from airflow.providers.standard.operators.hitl import ApprovalOperator

APPROVAL_TIMEOUT_ENV = "RECONCILE_APPROVAL_TIMEOUT_HOURS"
DEFAULT_APPROVAL_TIMEOUT_HOURS = 12.0
SAMPLE_SIZE = 10

LOAD_TASK = "load"
APPROVAL_TASK = "approve_load"


def approval_timeout() -> timedelta:
    """How long an approval waits for an answer ($RECONCILE_APPROVAL_TIMEOUT_HOURS, default 12 h)."""
    raw = os.environ.get(APPROVAL_TIMEOUT_ENV, "").strip()
    if not raw:
        return timedelta(hours=DEFAULT_APPROVAL_TIMEOUT_HOURS)
    try:
        hours = float(raw)
    except ValueError:
        hours = math.nan
    if not (math.isfinite(hours) and hours > 0):
        raise ValueError(f"{APPROVAL_TIMEOUT_ENV}={raw!r}: expected a positive number of hours (default "
                         f"{DEFAULT_APPROVAL_TIMEOUT_HOURS:g}); an approval must never wait forever")
    return timedelta(hours=hours)


def follow(states: Mapping[str, str]) -> list[str]:
    """The tasks the branch after plan_changes follows, from the load states (`runner.export_loads`).

    `load` always (each target loads or says why not); `approve_load` only if some target awaits approval."""
    return [LOAD_TASK, APPROVAL_TASK] if "awaiting_approval" in states.values() else [LOAD_TASK]


def branch(cfg, entity: str, run_id: str, plan: Mapping[str, Any]) -> tuple[list[str], dict[str, Any] | None]:
    """What `check_approval` follows (`follow`) and, when a load waits for approval, its request (subject and
    body, `approval_request`); `plan`: plan_changes' result. Exports every target's change set and load state
    first (`runner.export_loads`), which the `load` tasks read on any worker."""
    from reconcile import runner

    states = runner.export_loads(cfg, entity, run_id)
    tasks = follow(states)
    return tasks, (approval_request(cfg, entity, run_id, plan, states) if APPROVAL_TASK in tasks else None)


def _cell(value: Any, width: int = 48) -> str:
    text = "" if value is None else str(value).replace("\n", " ").replace("|", "\\|")
    return text if len(text) <= width else text[: width - 1] + "…"


def approval_request(cfg, entity: str, run_id: str, plan: Mapping[str, Any], states: Mapping[str, str],
                     sample: int = SAMPLE_SIZE) -> dict[str, Any]:
    """Subject and Markdown body of the approval for the targets awaiting it (`plan`: plan_changes' result).

    Publishes the warehouse first, so that `reconcile changes --run` (which reads the published file) lists
    the whole changeset while the approval waits: a consistent snapshot, taken after planning."""
    from reconcile import list_changes
    from reconcile.warehouse import publish

    targets = sorted(t for t, s in states.items() if s == "awaiting_approval")
    publish(cfg, entity)
    found = list_changes(cfg, run_id=run_id, entity=entity, status="planned", targets=targets, limit=sample)
    rows = [(r["target"], r["operation"], r["record_key"] or "(new)", r["field"], r["before_value"],
             r["after_value"] if r["after_value"] is not None else r["after_raw"]) for r in found["rows"]]
    per_target = plan.get("targets", {})
    timeout_h = approval_timeout().total_seconds() / 3600
    lines = [
        f"Run `{run_id}` of entity `{entity}` plans more changes than its thresholds allow into "
        f"**{', '.join(targets)}**.",
        "",
        f"**Approve** loads these changes. **Reject**, or no answer within {timeout_h:g} h, writes nothing "
        f"into {'these systems' if len(targets) > 1 else 'this system'}; the run then ends `blocked`.",
        "",
        "Why approval is needed:",
    ]
    lines += [f"- {t}: {'; '.join(per_target.get(t, {}).get('approval_reasons') or ['over a threshold'])}"
              for t in targets]
    others = {t: s for t, s in sorted(states.items()) if t not in targets}
    if others:
        lines += ["", "Other targets (not part of this decision): "
                  + ", ".join(f"{t} `{s}`" for t, s in others.items())]
    lines += ["", "Changes by target, operation and status:", "",
              "| target | operation | statuses |", "|---|---|---|"]
    for t in sorted(per_target):
        for op, statuses in sorted(per_target[t].get("by_operation", {}).items()):
            counts = ", ".join(f"{s} {n}" for s, n in sorted(statuses.items()))
            lines.append(f"| {t} | {op} | {counts} |")
    lines += ["", f"Sample ({len(rows)} of the changes waiting for this decision):", "",
              "| target | operation | record | field | before | after |", "|---|---|---|---|---|---|"]
    lines += ["| " + " | ".join(_cell(v, 40 if i < 4 else 48) for i, v in enumerate(r)) + " |" for r in rows]
    from urllib.parse import quote

    lines += ["", f"The full list, every change with its before and after values (creates show the record): "
                  f"[Changes and approvals](/reconcile/changes?run_id={quote(run_id, safe='')}) in the reconcile "
                  f"menu, or:", "",
              f"    reconcile changes --config {cfg.path} --run '{run_id}' --csv changes.csv"]
    return {
        "targets": targets,
        "subject": f"reconcile {entity}: approve loading into {', '.join(targets)}?",
        "body": "\n".join(lines),
    }


class LoadApprovalOperator(ApprovalOperator):
    """`ApprovalOperator` whose answer is recorded in reconcile (`runner.approve`) before Airflow acts on it.

    Approve: the waiting targets are approved by the responder; their change sets are exported again
    (`runner.export_loads`, now `ok`); returns them (`load_approved` and each `load_approved_on_<queue>` map
    over them; each loads the targets of its queue).
    Reject or timeout (the default option): the targets are rejected, so nothing is written into them even by
    a later `reconcile load`, and ApprovalOperator skips `load_approved`.
    """

    def __init__(self, *, reconcile_config, entity: str, **kwargs) -> None:
        super().__init__(**kwargs)
        self.reconcile_config = reconcile_config
        self.entity = entity

    def execute_complete(self, context, event: dict[str, Any]) -> Any:
        if "error" in event:  # no answer and no default: cannot happen with defaults="Reject"; fail visibly
            return super().execute_complete(context=context, event=event)
        from reconcile import runner
        from reconcile.errors import ReconcileError

        chosen = list(event.get("chosen_options") or [])
        self.validate_chosen_options(chosen)
        approved = chosen == [self.APPROVE]
        user = event.get("responded_by_user") or {}
        timed_out = bool(event.get("timedout")) and not user
        by = user.get("name") or user.get("id") or ("airflow (no answer)" if timed_out else "airflow")
        note = ("no answer within the response timeout: rejected by default" if timed_out
                else f"answered {chosen[0] if chosen else '?'} in Airflow")
        run_id = context["run_id"]
        try:
            decided = runner.approve(self.reconcile_config, self.entity, run_id, by=by, reject=not approved, note=note)
            self.log.info("%s by %s: %s", "approved" if approved else "rejected", by, ", ".join(decided))
        except ReconcileError as e:  # decided meanwhile outside Airflow (`reconcile approve`): that answer stands
            self.log.warning("nothing left to decide in reconcile: %s", e)
            decided = []
        targets = sorted(set(decided) | set(self._waiting(context)))  # each load_approved checks its target again
        # Their change sets and states for load_approved, which reads them on any worker (no warehouse there).
        runner.export_loads(self.reconcile_config, self.entity, run_id, targets)
        super().execute_complete(context=context, event=event)  # on Reject: skips load_approved (raises)
        return targets

    @staticmethod
    def _waiting(context) -> list[str]:
        request = context["ti"].xcom_pull(task_ids="check_approval", key="approval") or {}
        return list(request.get("targets") or [])
