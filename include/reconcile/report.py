"""A run's status and summary: the one place for the rules (the runner records them, the CLI maps them to exit
codes, the DAG to task states and alerts).

Statuses, worst first (`worst` of several entities is the first that occurs):

* `failed`: a stage crashed (or an Airflow task failed for another reason than a recorded gate or load
  outcome); the error says which.
* `incomplete`: the run finished, but changes it was allowed to write were not all written: some failed at
  the target, or planned changes were never attempted (a load stopped by `load.max_failure_rate`, a load
  interrupted and not resumed). The summary lists counts and reasons (`failures`) and the unattempted
  changes (`unattempted`).
* `awaiting_approval`: a load is over a change threshold and waits for a person.
* `blocked`: this run held or blocked something new: an error-level gate failed, a load was rejected, or
  changes (`held_new`) or identities (collision guard, `holds_new`) were held that the previous run did not
  hold. Holds standing from earlier runs (e.g. open collision review items holding the same changes every
  night) are reported as `held_standing` / `holds_standing` and do not block.
* `dry_run`: planned, nothing written. `success`: every change the run was allowed to write was written.

`causes` are stable keys of what made the status (no counts): an alert goes out when a run's status or its
causes differ from the previous run's (`alert`), not every night the same thing stands.
"""
from __future__ import annotations

import json
from collections.abc import Iterable, Mapping

from .pipeline import in_task_order, task_of

STATUSES = ("failed", "incomplete", "awaiting_approval", "blocked", "dry_run", "success")  # worst first
ALERTING = ("failed", "incomplete", "awaiting_approval", "blocked")
HELD_STATUSES = ("held", "blocked", "rejected")
UNATTEMPTED_LISTED = 100  # unattempted changes listed per target in the summary (all: `reconcile changes`)


def worst(statuses: Iterable[str]) -> str:
    """The worst of several statuses (an unknown status counts as failed)."""
    return min(statuses, key=lambda s: STATUSES.index(s) if s in STATUSES else 0)


def load_stage_name(target: str) -> str:
    """Where a target's load outcome is recorded in audit.stage_runs."""
    return f"load:{target}"


def record_load(con, entity: str, run_id: str, target: str, outcome: dict, at, seconds: float | None = None) -> None:
    """Record one target's load outcome (the last attempt's): `summarize` reads the stop reason from it and
    tells a load that ended incomplete from one that crashed (`status: error`)."""
    con.execute("DELETE FROM audit.stage_runs WHERE run_id = ? AND entity = ? AND stage = ?",
                [run_id, entity, load_stage_name(target)])
    con.execute("INSERT INTO audit.stage_runs (run_id, entity, stage, finished_at, result, seconds) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                [run_id, entity, load_stage_name(target), at, json.dumps(outcome, default=str), seconds])


def stage_seconds(con, entity: str, run_id: str, timed: Mapping[str, float] | None = None) -> dict[str, float]:
    """Seconds per stage, in pipeline order, keyed by task name (`extract:<system>`, `validate:<system>` and
    `load:<target>` for the per-system ones): what the stages recorded in audit.stage_runs, plus `timed`, the
    timings a process that ran the stages itself measured (the CLI's `run_entity`; on Airflow the task
    durations are Airflow's own)."""
    recorded = {task_of(stage): s for stage, s in con.execute(
        "SELECT stage, seconds FROM audit.stage_runs WHERE run_id = ? AND entity = ? AND seconds IS NOT NULL",
        [run_id, entity]).fetchall()}
    merged = {**recorded, **(timed or {})}
    return {k: round(merged[k], 3) for k in in_task_order(merged)}


def _results(con, entity: str, run_id: str) -> dict[str, dict]:
    return {stage: json.loads(res) for stage, res in con.execute(
        "SELECT stage, result FROM audit.stage_runs WHERE run_id = ? AND entity = ?", [run_id, entity]).fetchall()}


def _previous_run(con, entity: str, run_id: str, stage: str | None = None) -> str | None:
    """The newest earlier run of the entity (that recorded `stage`, when given)."""
    row = con.execute(f"""
        SELECT r.run_id FROM audit.runs r
        WHERE r.entity = $e AND r.run_id <> $r
          AND r.started_at <= (SELECT started_at FROM audit.runs WHERE run_id = $r AND entity = $e)
          {'AND EXISTS (SELECT 1 FROM audit.stage_runs s WHERE s.run_id = r.run_id AND s.entity = r.entity '
           'AND s.stage = $s)' if stage else "AND r.status <> 'running'"}
        ORDER BY r.started_at DESC, r.run_id DESC LIMIT 1""",
                      {"e": entity, "r": run_id, **({"s": stage} if stage else {})}).fetchone()
    return row[0] if row else None


def previous_summary(con, entity: str, run_id: str) -> dict | None:
    """The summary of the newest earlier finished run of the entity (what `alert` compares with)."""
    prev = _previous_run(con, entity, run_id)
    if prev is None:
        return None
    row = con.execute("SELECT status, summary FROM audit.runs WHERE run_id = ? AND entity = ?", [prev, entity]).fetchone()
    return {**(json.loads(row[1]) if row[1] else {}), "status": row[0]}


def _held(con, entity: str, run_id: str) -> tuple[dict[str, int], dict[str, int], dict[str, str]]:
    """Held changes per target: new (not held by the previous planning run) and standing, and one reason per
    target with new holds. A change is the same across runs by target, record (or the xid of a create),
    operation and field."""
    prev = _previous_run(con, entity, run_id, "plan")
    rows = con.execute("""
        WITH cur AS (SELECT target, coalesce(record_key, 'create:' || xid) AS k, operation, coalesce(field, '') AS f,
                            reason FROM audit.changes WHERE run_id = $r AND entity = $e AND status = 'held'),
             prev AS (SELECT DISTINCT target, coalesce(record_key, 'create:' || xid) AS k, operation,
                             coalesce(field, '') AS f, TRUE AS standing
                      FROM audit.changes WHERE run_id = $p AND entity = $e AND status = 'held')
        SELECT target, count(*) FILTER (WHERE standing IS NULL), count(*) FILTER (WHERE standing),
               min(reason) FILTER (WHERE standing IS NULL)
        FROM cur LEFT JOIN prev USING (target, k, operation, f) GROUP BY target ORDER BY target""",
                       {"r": run_id, "e": entity, "p": prev}).fetchall()
    new = {t: n for t, n, _, _ in rows if n}
    standing = {t: s for t, _, s, _ in rows if s}
    return new, standing, {t: why for t, n, _, why in rows if n}


def _holds(con, entity: str, run_id: str) -> tuple[dict[str, int], dict[str, int]]:
    """Identities the collision guard held per target: new (not held by the previous guarded run) and
    standing."""
    prev = _previous_run(con, entity, run_id, "guard")
    rows = con.execute("""
        WITH cur AS (SELECT DISTINCT target, identity FROM audit.holds WHERE run_id = $r AND entity = $e),
             prev AS (SELECT DISTINCT target, identity, TRUE AS standing FROM audit.holds
                      WHERE run_id = $p AND entity = $e)
        SELECT target, count(*) FILTER (WHERE standing IS NULL), count(*) FILTER (WHERE standing)
        FROM cur LEFT JOIN prev USING (target, identity) GROUP BY target ORDER BY target""",
                       {"r": run_id, "e": entity, "p": prev}).fetchall()
    return {t: n for t, n, _ in rows if n}, {t: s for t, _, s in rows if s}


def _unattempted(con, entity: str, run_id: str, results: dict) -> dict[str, dict]:
    """Changes the run was allowed to write (not waiting for approval, not rejected) but never wrote: still
    planned, or left applying by an interrupted load. Per target: count, reason and the changes."""
    rows = con.execute("""
        SELECT c.target, c.status, c.change_id, c.operation, c.record_key, c.xid, c.field FROM audit.changes c
        LEFT JOIN audit.approvals a ON a.run_id = c.run_id AND a.entity = c.entity AND a.target = c.target
        WHERE c.run_id = ? AND c.entity = ? AND c.status IN ('planned', 'applying')
          AND a.decision IS DISTINCT FROM 'rejected' AND NOT (coalesce(a.required, FALSE) AND a.decision IS NULL)
        ORDER BY c.target, c.change_id""", [run_id, entity]).fetchall()
    out: dict[str, dict] = {}
    for target, status, cid, op, key, xid, field in rows:
        t = out.setdefault(target, {"count": 0, "applying": 0, "changes": []})
        t["count"] += 1
        t["applying"] += status == "applying"
        if len(t["changes"]) < UNATTEMPTED_LISTED:
            t["changes"].append({"change_id": cid, "operation": op, "record_key": key, "xid": xid, "field": field})
    for target, t in out.items():
        outcome = results.get(load_stage_name(target))
        if t["applying"]:
            t["reason"] = (f"{t['applying']} change(s) were left applying by an interrupted load "
                           f"(`reconcile load --run {run_id}` verifies and finishes them)")
        elif outcome and outcome.get("reason"):
            t["reason"] = outcome["reason"]
        elif outcome and outcome.get("status") == "error":
            t["reason"] = f"the load into {target} crashed: {outcome.get('error')}"
        else:
            t["reason"] = f"the load into {target} did not run"
        t["listed"] = len(t["changes"])
    return out


def _failures(con, entity: str, run_id: str) -> dict[str, list[dict]]:
    rows = con.execute("""SELECT target, coalesce(error, 'no error given') AS e, count(*) AS n FROM audit.changes
                          WHERE run_id = ? AND entity = ? AND status = 'failed' GROUP BY ALL
                          ORDER BY target, n DESC, e""", [run_id, entity]).fetchall()
    out: dict[str, list[dict]] = {}
    for target, error, n in rows:
        if len(out.setdefault(target, [])) < 10:
            out[target].append({"error": error, "count": n})
    return out


def changes_summary(con, entity: str, run_id: str) -> dict:
    """Per target, in target order: planned, applied, failed, held (held, blocked or rejected), skipped_conflict,
    unattempted."""
    rows = con.execute("""SELECT target, status, count(*) FROM audit.changes WHERE run_id = ? AND entity = ?
                          GROUP BY ALL ORDER BY target, status""", [run_id, entity]).fetchall()
    out: dict[str, dict] = {}
    for target, status, n in rows:
        t = out.setdefault(target, {"planned": 0, "applied": 0, "failed": 0, "held": 0, "skipped_conflict": 0,
                                    "unattempted": 0})
        t["planned"] += n
        if status in ("applied", "failed", "skipped_conflict"):
            t[status] += n
        elif status in HELD_STATUSES:
            t["held"] += n
    return out


def _unexplained(failed_tasks: Iterable[tuple[str, str | None, str]], gates: dict | None,
                 results: dict) -> list[tuple[str, str | None, str]]:
    """Orchestrator tasks that did not succeed for another reason than an outcome the run recorded: a
    `validate` failed on its error gates, a `load` that recorded an incomplete outcome."""
    gated = {f["system"] for f in (gates or {}).get("failures", []) if f.get("severity") == "error"}
    out = []
    for task, subject, state in failed_tasks:
        if task == "validate" and subject in gated:
            continue
        outcome = results.get(load_stage_name(subject)) if subject else None
        if task.startswith("load") and outcome and outcome.get("status") != "error":
            continue
        out.append((task, subject, state))
    return out


def summarize(con, cfg, entity: str, run_id: str, error: str | None = None,
              failed_tasks: Iterable[tuple[str, str | None, str]] = ()) -> dict:
    """The run's summary with its status, `reasons` (sentences), `notes` (what stands from earlier runs) and
    `causes` (stable keys), from what the run
    recorded. `error`: the run crashed with this error. `failed_tasks`: (task, system or None, state) of an
    orchestrator's tasks that did not succeed (Airflow); those not explained by a recorded outcome fail the run."""
    row = con.execute("SELECT run_at FROM audit.runs WHERE run_id = ? AND entity = ?", [run_id, entity]).fetchone()
    results = _results(con, entity, run_id)
    extract = results.get("extract")
    gates = results.get("gates")
    if gates is not None:
        gates["held"] = results.get("guard", {}).get("held", {})
    reasons: list[tuple[int, str]] = []  # why the status is what it is (worst first)
    notes: list[str] = []  # what stands from earlier runs (no effect on the status)
    causes: list[str] = []
    statuses = ["success"]

    def because(status: str, reason: str, cause: str) -> None:
        statuses.append(status)
        reasons.append((STATUSES.index(status), reason))
        causes.append(f"{status}:{cause}")

    unexplained = _unexplained(failed_tasks, gates, results)
    if unexplained and not error:
        cause = [t for t in unexplained if t[2] == "failed"] or unexplained  # the cause, not the fallout
        error = "task(s) failed: " + ", ".join(f"{t}[{s}]" if s else t for t, s, _ in sorted(cause, key=str))
    if error is None and extract is None:
        error = "extraction did not complete"
    elif error is None and gates is None and "identity" in results:
        error = "quality gates did not complete"
    plan = results.get("plan")
    dry = bool(plan and plan.get("dry_run"))
    summary: dict = {
        "run_id": run_id,
        "entity": entity,
        "run_at": row[0].isoformat(),
        "extracted": {s: r["extracted"] for s, r in (extract or {}).items()},
        "quarantined": {s: r["quarantined"] for s, r in (extract or {}).items()},
        "staged": {s: r["staged"] for s, r in (extract or {}).items()},
        "extract_mode": {s: r["mode"] for s, r in (extract or {}).items()},
        "warehouse": str(cfg.warehouse_path),
    }
    if error:
        because("failed", error, error)
    if gates is not None:
        summary["gates"] = gates
        for f in gates.get("failures", []):
            if f.get("severity") == "error":
                because("blocked", f"error gate {f['expectation']} failed on {f['table']}",
                        f"gate:{f['table']}:{f['expectation']}")
    if "guard" in results:
        summary["holds_new"], summary["holds_standing"] = holds_new, holds_standing = _holds(con, entity, run_id)
        for target, n in holds_new.items():
            because("blocked", f"{n} identities newly held back from {target} by the collision guard "
                               f"(see the review queue)", f"holds:{target}:{run_id}")
        if holds_standing:
            notes.append("identities held by the collision guard since earlier runs (standing, not news): "
                         + ", ".join(f"{t} {n}" for t, n in holds_standing.items()))
    for key in ("golden", "identity"):
        if key in results:
            summary[key] = results[key]
    if plan is not None:
        summary["changes"] = changes = changes_summary(con, entity, run_id)
        new, standing, why_new = _held(con, entity, run_id)
        summary["held_new"], summary["held_standing"] = new, standing
        if dry:
            reasons.append((STATUSES.index("dry_run"), "dry run: changes were planned, nothing was written"))
        else:
            failures = _failures(con, entity, run_id)
            unattempted = _unattempted(con, entity, run_id, results)
            summary["failures"], summary["unattempted"] = failures, unattempted
            for target, errors in failures.items():
                n = sum(e["count"] for e in errors)
                because("incomplete", f"{n} change(s) into {target} failed (e.g. {errors[0]['error']})",
                        f"failed:{target}")
            for target, u in unattempted.items():
                changes.setdefault(target, {}).update(unattempted=u["count"])
                because("incomplete", f"{u['count']} planned change(s) into {target} were not attempted: "
                                      f"{u['reason']}", f"unattempted:{target}")
            for target, state, why, by in con.execute("""
                    SELECT target, CASE WHEN decision = 'rejected' THEN 'rejected' ELSE 'awaiting' END, reasons,
                           decided_by FROM audit.approvals
                    WHERE run_id = ? AND entity = ? AND (decision = 'rejected' OR (required AND decision IS NULL))
                    ORDER BY target""", [run_id, entity]).fetchall():
                if state == "awaiting":
                    because("awaiting_approval", f"the load into {target} waits for approval: "
                                                 f"{'; '.join(json.loads(why) if why else [])}", f"approval:{target}")
                else:
                    because("blocked", f"the load into {target} was rejected by {by}", f"rejected:{target}")
            for target, n in new.items():
                because("blocked", f"{n} change(s) into {target} newly held (e.g. {why_new[target]})",
                        f"held:{target}:{run_id}")  # new holds are news every time
        if standing:
            notes.append("changes held since earlier runs (standing, not news): "
                         + ", ".join(f"{t} {n}" for t, n in standing.items()))
    # A dry run writes nothing: what it would hold or block is its assessment, not its status.
    summary["status"] = "dry_run" if dry and not error else worst(statuses)
    summary["reasons"] = [r for _, r in sorted(reasons, key=lambda r: r[0])]
    summary["notes"] = notes
    summary["causes"] = sorted(set(causes))
    if error:
        summary["error"] = error
    return summary


def standing_gate_errors(con, entity: str, system: str, run_id: str) -> set[str]:
    """The error gates that failed on this system's table in the entity's previous validated run: a gate that
    fails again is standing (the task still fails; no new alert), one that did not is news."""
    return {e for (e,) in con.execute("""
        SELECT expectation FROM audit.quality_results
        WHERE entity = $e AND system = $s AND NOT success AND severity = 'error' AND run_id = (
            SELECT q.run_id FROM audit.quality_results q
            JOIN audit.runs r ON r.run_id = q.run_id AND r.entity = q.entity
            WHERE q.entity = $e AND q.system = $s AND q.run_id <> $r ORDER BY r.started_at DESC LIMIT 1)""",
                                      {"e": entity, "s": system, "r": run_id}).fetchall()}


def alert(summary: dict, previous: dict | None) -> dict | None:
    """The alert a finished run raises, or None: only when its status needs a person (failed, incomplete,
    awaiting_approval, blocked) and it differs from the previous run's status or has a cause that run had not.
    Returns {"event": "run_<status>", "message", "details"}."""
    status = summary["status"]
    if status not in ALERTING:
        return None
    causes = set(summary.get("causes") or [])
    if previous and previous.get("status") == status and causes <= set(previous.get("causes") or []):
        return None
    why = summary.get("reasons") or []
    return {"event": f"run_{status}",
            "message": f"run of {summary['entity']} ended {status}: {'; '.join(why[:3]) or 'see its summary'}",
            "details": {k: summary.get(k) for k in ("entity", "run_id", "status", "reasons", "changes", "held_new",
                                                   "held_standing", "holds_new", "holds_standing")}}
