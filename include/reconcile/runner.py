"""The runner: one run = the stages for one entity, in the order `pipeline.STAGES` declares, identified by a
run id. Airflow tasks call these functions one by one; `run_entity` calls them in order for the CLI and tests.
Each step is idempotent for a run id, so a retried task leaves the same state. A run's status and summary are
decided by `reconcile.report`.
"""
from __future__ import annotations

import json
import os
import secrets
import socket
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

from .config import Config, resolve_url
from . import report
from .errors import ReconcileError
from .html.datadocs import make_offline
from .lazy import lazy_module
from .pipeline import EXTRACT_ONLY_THROUGH, STAGES
from .runstore import RunFolder, kept_folders, prune
from .warehouse import open_work, publish, safe_name, staging_table, table_exists

# Stage modules load on first use, so a CLI verb or an Airflow task imports only what it runs.
extract_stage = lazy_module("reconcile.stages.extract")
golden_stage = lazy_module("reconcile.stages.golden")
load_stage = lazy_module("reconcile.stages.load")
plan_stage = lazy_module("reconcile.stages.plan")
privacy_stage = lazy_module("reconcile.stages.privacy")
identity_stage = lazy_module("reconcile.stages.identity")
quality_stage = lazy_module("reconcile.stages.quality")

Progress = Callable[[str], None]

KEEP_RUN_DIRS = 5


def _quiet(_: str) -> None:
    pass


def stderr_progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def new_run_id(run_at: datetime) -> str:
    """A sortable, unique run id for CLI runs, e.g. `cli__20261122T020000Z_3f2a`."""
    return f"cli__{run_at.strftime('%Y%m%dT%H%M%SZ')}_{secrets.token_hex(2)}"


def utc_naive(dt: datetime) -> datetime:
    return dt.astimezone(timezone.utc).replace(tzinfo=None) if dt.tzinfo else dt


def _read_manifest(cfg: Config, entity: str, run_id: str) -> dict:
    folder = RunFolder(cfg, run_id, entity)
    if not folder.exists("manifest.json"):
        raise ReconcileError(f"run {run_id!r} of entity {entity!r} has not begun ({folder.url('manifest.json')} "
                             f"missing): call begin_run first")
    return folder.read_json("manifest.json")


def owner_id() -> str:
    """This process, as recorded in audit.runs.owner while it works on a run: `host:pid`."""
    return f"{socket.gethostname()}:{os.getpid()}"


def _owner_alive(owner: str) -> bool:
    """False only when the owner is a process of this host that no longer exists (another host's: unknown,
    so taken as alive)."""
    host, _, pid = owner.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True


def _set_owner(con, entity: str, run_id: str, owner: str | None) -> str | None:
    """Record who works on the run now; returns who did before (to restore it)."""
    row = con.execute("SELECT owner FROM audit.runs WHERE run_id = ? AND entity = ?", [run_id, entity]).fetchone()
    con.execute("UPDATE audit.runs SET owner = ? WHERE run_id = ? AND entity = ?", [owner, run_id, entity])
    return row[0] if row else None


def abandoned_runs(con, entity: str, run_id: str) -> list[str]:
    """Earlier runs of the entity that nobody will finish: left `running` by a process of this host that is gone
    (killed mid-run), or finished with changes still `applying` (a load interrupted mid-write). A run between
    orchestrator tasks has no owner and is left alone; so is one whose process is alive or on another host."""
    rows = con.execute("""
        SELECT r.run_id, r.status, r.owner FROM audit.runs r
        WHERE r.entity = ? AND r.run_id <> ?
          AND ((r.status = 'running' AND r.owner IS NOT NULL)
               OR (r.status <> 'running' AND EXISTS (SELECT 1 FROM audit.changes c WHERE c.run_id = r.run_id
                                                     AND c.entity = r.entity AND c.status = 'applying')))
        ORDER BY r.started_at, r.run_id""", [entity, run_id]).fetchall()
    return [rid for rid, status, owner in rows if status != "running" or not _owner_alive(owner)]


def recover_runs(cfg: Config, entity: str, run_id: str, url_overrides: Mapping[str, str] | None = None,
                 progress: Progress = _quiet) -> list[dict]:
    """Record the load journals earlier runs left unrecorded (`record_pending_loads`), then finish the
    entity's abandoned runs (`abandoned_runs`, and the finished runs whose journals were just recorded) as
    `reconcile load --run ID` would: changes left `applying` are verified against the target (written:
    applied, with their link and ledger rows; not written: written now), the rest of their approved changes
    loaded, each exactly once; then each run is finished again, marked `recovered_by` this run. Returns their
    summaries."""
    journalled = record_pending_loads(cfg, entity, run_id, progress)
    with open_work(cfg) as con:
        found = abandoned_runs(con, entity, run_id)
        found += [r for (r,) in con.execute(  # finished before their loads were recorded: finish them again
            """SELECT run_id FROM audit.runs WHERE entity = ? AND status <> 'running'
               AND run_id IN (SELECT unnest(?::VARCHAR[])) ORDER BY started_at, run_id""",
            [entity, journalled]).fetchall() if r not in found]
    out = []
    for old in found:
        progress(f"  recovering run {old} of {entity}: abandoned by its process; verifying and finishing it")
        summary = reload(cfg, entity, old, url_overrides=url_overrides, recovered_by=run_id, progress=progress)
        progress(f"  recovered run {old}: {summary['status']}")
        out.append(summary)
    return out


def begin_run(cfg: Config, entity: str, run_id: str, run_at: datetime, full: bool | None = None,
              url_overrides: Mapping[str, str] | None = None, hold: bool = False,
              progress: Progress = _quiet) -> dict:
    """Record the run and decide full/incremental extraction per source. Writes the run manifest.

    A new run first finishes the entity's abandoned runs (`recover_runs`). `hold=True`: this process owns the
    run until `finish_run` (one process runs every stage, as `run_entity` does); an orchestrator whose tasks
    run in separate processes leaves it unowned between tasks."""
    from .config.loader import ensure_expressions_checked

    ensure_expressions_checked(cfg)
    cfg.entity(entity)
    run_at = utc_naive(run_at)
    folder = RunFolder(cfg, run_id, entity)
    with open_work(cfg) as con:
        known = con.execute("SELECT 1 FROM audit.runs WHERE run_id = ? AND entity = ?", [run_id, entity]).fetchone()
    recovered = [] if known else recover_runs(cfg, entity, run_id, url_overrides, progress)
    with open_work(cfg) as con:
        status = con.execute("SELECT status FROM audit.runs WHERE run_id = ? AND entity = ?", [run_id, entity]).fetchone()
        if status and status[0] not in ("running", "failed"):
            raise ReconcileError(f"run {run_id!r} of {entity!r} already finished with status {status[0]!r}; use a new run id")
        if status and status[0] == "failed":  # resume a failed run: finished stages are skipped (idempotent)
            con.execute("UPDATE audit.runs SET status = 'running', error = NULL WHERE run_id = ? AND entity = ?",
                        [run_id, entity])
        if status and hold:
            _set_owner(con, entity, run_id, owner_id())
        if status and folder.exists("manifest.json"):  # a retried task: keep the first decision
            return folder.read_json("manifest.json")
        con.execute(
            "INSERT OR IGNORE INTO audit.runs (run_id, entity, status, run_at, started_at, owner) "
            "VALUES (?, ?, 'running', ?, ?, ?)",
            [run_id, entity, run_at, utc_naive(datetime.now(timezone.utc)), owner_id() if hold else None],
        )
        systems = extract_stage.plan_extract(con, cfg, entity, run_at, full=full)
    manifest = {"run_id": run_id, "entity": entity, "run_at": run_at.isoformat(), "systems": systems,
                "recovered": [{"run_id": r["run_id"], "status": r["status"]} for r in recovered]}
    folder.write_json("manifest.json", manifest)
    return manifest


def extract_system(cfg: Config, entity: str, system: str, run_id: str,
                   url_overrides: Mapping[str, str] | None = None, progress: Progress = _quiet) -> dict:
    """Read one system's source into the run folder. Opens no warehouse file: safe to run in parallel, on any
    worker that reaches the source and the run storage (`runs_url`)."""
    manifest = _read_manifest(cfg, entity, run_id)
    if system not in manifest["systems"]:
        raise ReconcileError(f"entity {entity!r} has no source in system {system!r}")
    url = resolve_url(cfg, system, url_overrides)
    plan = manifest["systems"][system]
    progress(f"extracting {entity} from {system} ({plan['mode']}{', since ' + plan['since'] if plan['since'] else ''})")
    return extract_stage.extract_source(cfg, entity, system, plan, RunFolder(cfg, run_id, entity), url, progress)


def load_staging(cfg: Config, entity: str, run_id: str, progress: Progress = _quiet) -> dict:
    """Load the run's extracts into staging tables (single writer, one transaction)."""
    manifest = _read_manifest(cfg, entity, run_id)
    with open_work(cfg) as con:
        return extract_stage.stage_entity(
            con, cfg, entity, run_id, datetime.fromisoformat(manifest["run_at"]), manifest,
            RunFolder(cfg, run_id, entity), progress,
        )


def data_docs_root(cfg: Config) -> Path:
    """Where Great Expectations Data Docs go: beside the published warehouse, one folder per run."""
    return cfg.warehouse_path.parent / "data_docs"


def docs_dir(cfg: Config, run_id: str) -> Path:
    """Where a run's Great Expectations Data Docs go."""
    return data_docs_root(cfg) / safe_name(run_id)


def validate_system(cfg: Config, entity: str, system: str, run_id: str, progress: Progress = _quiet) -> dict:
    """Run the quality suite on one staging table (read-only: tables validate in parallel).

    The outcome is saved in the run folder for `apply_gates`; returns it, including which error gates failed
    (`errors`) and which of those did not fail in the previous run (`new_errors`: what to alert on).
    """
    manifest = _read_manifest(cfg, entity, run_id)
    if system not in manifest["systems"]:
        raise ReconcileError(f"entity {entity!r} has no source in system {system!r}")
    progress(f"validating staging.{system}__{entity}")
    with open_work(cfg, read_only=True) as con:
        result = quality_stage.validate_table(con, cfg, entity, system, run_id,
                                              datetime.fromisoformat(manifest["run_at"]),
                                              docs_dir(cfg, run_id) / system)
        standing = report.standing_gate_errors(con, entity, system, run_id)
    RunFolder(cfg, run_id, entity).write_json(f"gates_{system}.json", result)
    result["errors"] = [r["expectation"] for r in result["results"] if not r["success"] and r["severity"] == "error"]
    result["new_errors"] = [e for e in result["errors"] if e not in standing]  # the rest failed last run too
    result["warnings"] = [r["expectation"] for r in result["results"] if not r["success"] and r["severity"] == "warn"]
    return result


def apply_gates(cfg: Config, entity: str, run_id: str, progress: Progress = _quiet) -> dict:
    """Record every table's outcome, find cross-system collisions, decide held and blocked writes."""
    manifest = _read_manifest(cfg, entity, run_id)
    folder = RunFolder(cfg, run_id, entity)
    validations = {}
    missing = []
    for system in sorted(manifest["systems"]):
        if folder.exists(f"gates_{system}.json"):
            validations[system] = folder.read_json(f"gates_{system}.json")
        else:
            missing.append(system)
    if missing:
        raise ReconcileError(f"run {run_id!r}: validation of {', '.join(missing)} did not complete; "
                             f"nothing can be written until every staging table is validated")
    index = quality_stage.write_docs_index(docs_dir(cfg, run_id), run_id, validations)
    make_offline(docs_dir(cfg, run_id))  # GX pages load their styles from CDNs: inline them, load nothing
    with open_work(cfg) as con:
        gates = quality_stage.record_gates(con, cfg, entity, run_id, datetime.fromisoformat(manifest["run_at"]),
                                           validations, docs_index=index)
    progress(f"  gates: {gates['passed']} passed, {gates['warned']} warned, {gates['failed']} failed; "
             f"data docs {index}")
    return gates


def resolve_identity(cfg: Config, entity: str, run_id: str, progress: Progress = _quiet) -> dict:
    """Link every staged record to a persistent cross-system id (xid); uncertain cases go to review."""
    manifest = _read_manifest(cfg, entity, run_id)
    with open_work(cfg) as con:
        result = identity_stage.resolve(con, cfg, entity, run_id, datetime.fromisoformat(manifest["run_at"]))
    progress(f"  identity: {result['linked']} links ({', '.join(f'{k} {v}' for k, v in result['by_rule'].items()) or 'none'}), "
             f"{result['new_xids']} new xids, {result['review']} open review items")
    return result


def guard_collisions(cfg: Config, entity: str, run_id: str, progress: Progress = _quiet) -> dict:
    """Hold identities that would share a unique value in a target system (homogenization guard)."""
    manifest = _read_manifest(cfg, entity, run_id)

    def identities(cfg_: Config, entity_: str, owner: str, only: str | None = None) -> str:
        # The golden values are what would be written; before golden exists, the owner's records.
        if "golden" in stages_done:
            return quality_stage.golden_identities_sql(cfg_, entity_, only=only)
        return identity_stage.xid_identities_sql(cfg_, entity_, owner, only)

    with open_work(cfg) as con:
        stages_done = {r[0] for r in con.execute(
            "SELECT stage FROM audit.stage_runs WHERE run_id = ? AND entity = ?", [run_id, entity]).fetchall()}
        result = quality_stage.guard_collisions(con, cfg, entity, run_id, datetime.fromisoformat(manifest["run_at"]),
                                                identities)
    progress(f"  collision guard: held {result['held'] or 'none'}")
    return result


def build_golden(cfg: Config, entity: str, run_id: str, progress: Progress = _quiet) -> dict:
    """Golden records from staging + identity.xref: values under field ownership, lineage, disagreements.

    Idempotent per run id (recorded in audit.stage_runs); with no identity links yet, golden is empty.
    """
    manifest = _read_manifest(cfg, entity, run_id)
    with open_work(cfg) as con:
        result = golden_stage.build(con, cfg, entity, run_id, datetime.fromisoformat(manifest["run_at"]))
    disagreeing = {f: n for f, n in result["disagreements"].items() if n}
    progress(f"  golden: {result['records']} records, {result['changed']} changed, {result['conflicts']} conflicts; "
             f"disagreements {disagreeing or 'none'}")
    return result


def plan_changes(cfg: Config, entity: str, run_id: str, dry_run: bool | None = None, approve: bool = False,
                 progress: Progress = _quiet) -> dict:
    """Plan every target's changes (audit.changes), check thresholds; in dry-run mode nothing will load.

    `dry_run=None` follows the config's `load.mode`. `approve=True` pre-approves loads over a threshold
    (`reconcile run --approve`)."""
    manifest = _read_manifest(cfg, entity, run_id)
    dry = (cfg.load.mode == "dry_run") if dry_run is None else dry_run
    with open_work(cfg) as con:
        result = plan_stage.plan(con, cfg, entity, run_id, datetime.fromisoformat(manifest["run_at"]))
        if dry:
            con.execute("UPDATE audit.changes SET status = 'dry_run' WHERE run_id = ? AND entity = ? "
                        "AND status = 'planned'", [run_id, entity])
        elif approve:
            con.execute("""UPDATE audit.approvals SET decision = 'approved', decided_by = 'run --approve',
                           decided_at = ? WHERE run_id = ? AND entity = ? AND required AND decision IS NULL""",
                        [utc_naive(datetime.now(timezone.utc)), run_id, entity])
        con.execute("UPDATE audit.stage_runs SET result = json_merge_patch(result, ?) WHERE run_id = ? AND entity = ? "
                    "AND stage = 'plan'", [json.dumps({"dry_run": dry}), run_id, entity])
    result["dry_run"] = dry
    for target, t in sorted(result["targets"].items()):
        progress(f"  plan {target}: {t['planned']} to write, {t['held']} held, {t['blocked']} blocked"
                 f"{' (dry run)' if dry else ''}{'; needs approval: ' + '; '.join(t['approval_reasons']) if t['needs_approval'] else ''}")
    return result


def targets_to_load(cfg: Config, entity: str, run_id: str) -> dict[str, str]:
    """target -> 'ok' | 'awaiting_approval' | 'rejected' | 'dry_run' | 'nothing' (for orchestrators' branching)."""
    with open_work(cfg, read_only=True) as con:
        return _load_states(con, cfg, entity, run_id)


def _load_states(con, cfg: Config, entity: str, run_id: str) -> dict[str, str]:
    states = load_stage.allowed_targets(con, entity, run_id)
    counts = dict(con.execute("""SELECT target, count(*) FILTER (WHERE status IN ('planned', 'applying'))
                                 FROM audit.changes WHERE run_id = ? AND entity = ? GROUP BY 1""",
                              [run_id, entity]).fetchall())
    dry = con.execute("SELECT count(*) FROM audit.changes WHERE run_id = ? AND entity = ? AND status = 'dry_run'",
                      [run_id, entity]).fetchone()[0]
    out = {}
    for target in sorted(cfg.entities[entity].sources):
        if dry:
            out[target] = "dry_run"
        elif not counts.get(target):
            out[target] = "nothing"
        else:
            out[target] = states.get(target, "ok")
    return out


def export_loads(cfg: Config, entity: str, run_id: str, targets: Iterable[str] | None = None) -> dict[str, str]:
    """The load's first step, on the warehouse (short): record what earlier loads of the run journalled, then
    write each target's change set and load state (`targets_to_load`) into the run storage, where
    `apply_load` reads them on any worker. Returns the states of the targets exported (default: all)."""
    folder = RunFolder(cfg, run_id, entity)
    with open_work(cfg) as con:
        for t in sorted(cfg.entities[entity].sources):
            load_stage.record(con, entity, t, run_id, folder)
        states = _load_states(con, cfg, entity, run_id)
        wanted = sorted(states) if targets is None else sorted(targets)
        for t in wanted:
            load_stage.export(con, entity, t, run_id, folder, states[t])
    return {t: states[t] for t in wanted}


def load_state(cfg: Config, entity: str, run_id: str, target: str) -> str:
    """Whether `apply_load` may write the target, as `export_loads` left it in the run storage (no warehouse)."""
    return load_stage.state(RunFolder(cfg, run_id, entity), target)


def apply_load(cfg: Config, entity: str, run_id: str, target: str,
               url_overrides: Mapping[str, str] | None = None, progress: Progress = _quiet) -> dict:
    """The load's second step, on any worker that reaches the target and the run storage (opens no warehouse):
    apply the target's exported change set in batches, journalled in the run storage; call again after a
    crash, on any worker: it resumes from the journal, writing nothing twice."""
    url = resolve_url(cfg, target, url_overrides)
    return load_stage.apply(cfg, entity, target, url, RunFolder(cfg, run_id, entity), progress)


def record_loads(cfg: Config, entity: str, run_id: str, progress: Progress = _quiet) -> dict[str, dict]:
    """The load's last step, on the warehouse (short): every target's journal into audit.changes, the links,
    the write ledger and review; each load's outcome for the run's status (an incomplete load: `report`).
    Idempotent. Returns the outcome per target recorded now."""
    folder = RunFolder(cfg, run_id, entity)
    out = {}
    with open_work(cfg) as con:
        for target in sorted(cfg.entities[entity].sources):
            result = load_stage.record(con, entity, target, run_id, folder)
            if result is not None:
                out[target] = result
                progress(f"  load {target}: {result['status']}, {result['applied']} applied, {result['failed']} "
                         f"failed, {result['skipped_conflict']} skipped as conflicts"
                         f"{'; ' + result['reason'] if result.get('reason') else ''}")
    return out


def record_pending_loads(cfg: Config, entity: str, run_id: str, progress: Progress = _quiet) -> list[str]:
    """Record the load journals of the entity's earlier runs that were never recorded (a run killed between
    applying and recording): what they wrote is then in the warehouse exactly once, and what they left
    mid-batch `applying`, for `recover_runs` to verify. Returns those runs."""
    found = []
    with open_work(cfg) as con:
        for folder in kept_folders(cfg, entity):
            if not folder.exists("manifest.json"):
                continue
            old = folder.read_json("manifest.json")["run_id"]
            if old == run_id:
                continue
            if any(load_stage.record(con, entity, t, old, folder) is not None
                   for t in sorted(cfg.entities[entity].sources)):
                progress(f"  recorded what the loads of run {old} of {entity} journalled and never recorded")
                found.append(old)
    return found


def load_changes(cfg: Config, entity: str, run_id: str, target: str,
                 url_overrides: Mapping[str, str] | None = None, progress: Progress = _quiet) -> dict:
    """Load one target's approved changes in one process (the CLI; resumable: call again after a crash): the
    three steps an orchestrator runs as separate tasks (`export_loads`, `apply_load`, `record_loads`).
    Meanwhile this process owns the run."""
    with open_work(cfg) as con:
        before = _set_owner(con, entity, run_id, owner_id())
    try:
        export_loads(cfg, entity, run_id, [target])
        try:
            apply_load(cfg, entity, run_id, target, url_overrides, progress)
        finally:
            result = record_loads(cfg, entity, run_id, progress).get(target)
    finally:
        with open_work(cfg) as con:
            _set_owner(con, entity, run_id, before)
    return result or {"target": target, "status": load_state(cfg, entity, run_id, target), "applied": 0,
                      "failed": 0, "skipped_conflict": 0}


def approve(cfg: Config, entity: str, run_id: str, by: str, targets: list[str] | None = None,
            reject: bool = False, note: str | None = None) -> list[str]:
    """Record an approval (or rejection) of loads over a threshold. Returns the targets decided."""
    if not by.strip():
        raise ReconcileError("an approval needs --by (who approves)")
    with open_work(cfg) as con:
        rows = con.execute("""SELECT target FROM audit.approvals WHERE run_id = ? AND entity = ? AND required
                              AND decision IS NULL ORDER BY 1""", [run_id, entity]).fetchall()
        pending = [r[0] for r in rows if targets is None or r[0] in targets]
        if not pending:
            raise ReconcileError(f"run {run_id!r} of {entity!r} has no load waiting for approval"
                                 f"{' into ' + ', '.join(targets) if targets else ''}")
        decision = "rejected" if reject else "approved"
        now = utc_naive(datetime.now(timezone.utc))
        for t in pending:
            con.execute("""UPDATE audit.approvals SET decision = ?, decided_by = ?, decided_at = ?, note = ?
                           WHERE run_id = ? AND entity = ? AND target = ?""", [decision, by, now, note, run_id, entity, t])
            if reject:
                con.execute("""UPDATE audit.changes SET status = 'rejected', reason = 'load rejected by ' || ?
                               WHERE run_id = ? AND entity = ? AND target = ? AND status = 'planned'""",
                            [by, run_id, entity, t])
    return pending


def decide_load(cfg: Config, entity: str, run_id: str, by: str, targets: list[str] | None = None,
                reject: bool = False, note: str | None = None, progress: Progress = _quiet) -> dict:
    """Approve (and load) or reject a run's loads waiting for approval, then finish the run again.

    The one place for `reconcile approve` and the UI plugin's approve button; the same effect as Airflow's
    approval task followed by `load_approved`. Returns the run summary with `decided`: the targets decided."""
    decided = approve(cfg, entity, run_id, by, targets, reject=reject, note=note)
    if not reject:
        for t in decided:
            load_changes(cfg, entity, run_id, t, progress=progress)
    summary = finish_run(cfg, entity, run_id, progress=progress)
    summary["decided"] = decided
    return summary


def reload(cfg: Config, entity: str, run_id: str, targets: list[str] | None = None,
           url_overrides: Mapping[str, str] | None = None, recovered_by: str | None = None,
           progress: Progress = _quiet) -> dict:
    """(Re)load a run's approved changes (resumes an interrupted load), then finish the run again.
    Returns the run summary with `loaded` (targets loaded) and `waiting` (targets still waiting for approval)."""
    states = targets_to_load(cfg, entity, run_id)
    loaded = [t for t, st in states.items() if st == "ok" and (not targets or t in targets)]
    for t in loaded:
        load_changes(cfg, entity, run_id, t, url_overrides, progress=progress)
    summary = finish_run(cfg, entity, run_id, recovered_by=recovered_by, progress=progress)
    summary["loaded"] = loaded
    summary["waiting"] = [t for t, st in states.items() if st == "awaiting_approval"]
    return summary


def rollback(cfg: Config, entity: str, run_id: str, target: str | None = None,
             url_overrides: Mapping[str, str] | None = None, progress: Progress = _quiet) -> list[dict]:
    """Revert a run's applied changes (all targets, or one), then publish."""
    targets = [target] if target else sorted(cfg.entities[entity].sources)
    out = []
    with open_work(cfg) as con:
        for t in targets:
            res = load_stage.rollback(con, cfg, entity, t, run_id, resolve_url(cfg, t, url_overrides))
            progress(f"  rollback {t}: {res['restored']} restored, {len(res['skipped'])} skipped (edited since), "
                     f"{len(res['not_reversible'])} not reversible")
            out.append(res)
    publish(cfg, entity)
    return out


def _assessment(con, entity: str, run_id: str) -> dict:
    """The synchronisation assessment a dry run gives (seed 002: "is the data actually synchronised?"):
    per system, how many records match across systems, duplicates, disagreements, what would be written."""
    out: dict[str, dict] = {}
    rows = con.execute("""SELECT system, staged, linked_records, duplicate_rate_email, duplicate_rate_name_company,
                                 review_open FROM audit.sync_health WHERE run_id = ? AND entity = ?""",
                       [run_id, entity]).fetchall()
    for system, staged, linked, dup_e, dup_n, review in rows:
        out[system] = {"records": staged, "linked": linked,
                       "match_rate": round(linked / staged, 4) if staged and linked is not None else None,
                       "duplicate_rate_email": dup_e, "duplicate_rate_name_company": dup_n, "review_open": review,
                       "disagreements": {}, "would_write": {}}
    # Matched: the record shares its xid with a record of another system (a minted xid alone is no match).
    for system, matched in con.execute("""
            SELECT x.system, count(*) FROM identity.xref x
            WHERE x.entity = ? AND EXISTS (SELECT 1 FROM identity.xref y WHERE y.entity = x.entity AND y.xid = x.xid
                                           AND y.system <> x.system)
            GROUP BY 1""", [entity]).fetchall():
        if system in out:
            out[system]["matched_in_other_systems"] = matched
            staged = out[system]["records"]
            out[system]["match_rate"] = round(matched / staged, 4) if staged else None
    for field, system, n in con.execute("""SELECT field, system, disagreeing FROM audit.disagreements
                                           WHERE run_id = ? AND entity = ? AND disagreeing > 0""",
                                        [run_id, entity]).fetchall():
        out.setdefault(system, {"disagreements": {}, "would_write": {}})["disagreements"][field] = n
    for target, op, n in con.execute("""SELECT target, operation, count(*) FROM audit.changes
                                        WHERE run_id = ? AND entity = ? AND status = 'dry_run' GROUP BY ALL""",
                                     [run_id, entity]).fetchall():
        out.setdefault(target, {"disagreements": {}, "would_write": {}})["would_write"][op] = n
    return out


def purge_erased(cfg: Config, entity: str, run_id: str, progress: Progress = _quiet) -> dict:
    """Remove erased people's values from the warehouse, the kept run files and Data Docs, and rewrite the
    working warehouse file (stages/privacy.py `forget`): a stage of its own, after the loads and before
    finish_run, run even when an earlier stage failed (a run re-extracts a person until the systems are
    anonymised). Idempotent; returns what was removed per place."""
    purged = privacy_stage.forget(cfg, entity, data_docs_root(cfg))
    progress(f"  erased people's values removed from the warehouse: {purged or 'nothing to remove'} (run {run_id})")
    return purged


def finish_run(cfg: Config, entity: str, run_id: str, error: str | None = None,
               failed_tasks: Iterable[tuple[str, str | None, str]] = (), recovered_by: str | None = None,
               timings: Mapping[str, float] | None = None, progress: Progress = _quiet) -> dict:
    """Record the run's status and summary in audit.runs (the rules: `reconcile.report`), publish the warehouse
    for analysts, return the summary. `error`: the run crashed; `failed_tasks`: an orchestrator's tasks that did
    not succeed, as (task, system or None, state); `recovered_by`: the run that found this one abandoned and
    finished it (kept when the run is finished again); `timings`: seconds per stage this process measured
    (`report.stage_seconds`). The summary's `alert` is what to tell a person, or None."""
    with open_work(cfg) as con:
        if con.execute("SELECT 1 FROM audit.runs WHERE run_id = ? AND entity = ?", [run_id, entity]).fetchone() is None:
            raise ReconcileError(f"run {run_id!r} of {entity!r} is unknown: it never began")
        summary = report.summarize(con, cfg, entity, run_id, error=error, failed_tasks=failed_tasks)
        summary["stages"] = report.stage_seconds(con, entity, run_id, timings)
        _sync_health_counts(con, cfg, entity, run_id)
        if summary["status"] == "dry_run":
            summary["assessment"] = _assessment(con, entity, run_id)
        recovered_by = recovered_by or con.execute(
            "SELECT summary->>'$.recovered_by' FROM audit.runs WHERE run_id = ? AND entity = ?",
            [run_id, entity]).fetchone()[0]
        if recovered_by:
            summary["recovered_by"] = recovered_by
        summary["alert"] = report.alert(summary, report.previous_summary(con, entity, run_id))
        con.execute("UPDATE audit.runs SET status = ?, finished_at = ?, error = ?, summary = ?, owner = NULL "
                    "WHERE run_id = ? AND entity = ?",
                    [summary["status"], utc_naive(datetime.now(timezone.utc)), summary.get("error"),
                     json.dumps(summary), run_id, entity])
    for reason in summary["reasons"]:
        progress(f"  {summary['status']}: {reason}")
    for note in summary["notes"]:
        progress(f"  note: {note}")
    path = publish(cfg, entity)
    progress(f"published {path}")
    prune(cfg, entity, KEEP_RUN_DIRS, run_id)
    return summary


def _sync_health_counts(con, cfg: Config, entity: str, run_id: str) -> None:
    """Identity, review and change counts per system into audit.sync_health (trends to plot and alert on)."""
    for system in sorted(cfg.entities[entity].sources):
        table = f"{system}__{entity}"
        if not table_exists(con, staging_table(system, entity)):
            continue
        con.execute(f"""
            UPDATE audit.sync_health SET
                linked_records = (SELECT count(*) FROM staging.{table} s JOIN identity.xref x
                                  ON x.entity = $e AND x.system = $s AND x.record_key = s._record_key),
                unlinked_records = (SELECT count(*) FROM staging.{table} s ANTI JOIN identity.xref x
                                    ON x.entity = $e AND x.system = $s AND x.record_key = s._record_key),
                review_open = (SELECT count(*) FROM review.items WHERE entity = $e AND system = $s AND status = 'open'),
                changes_planned = (SELECT count(*) FROM audit.changes WHERE run_id = $r AND entity = $e AND target = $s),
                changes_applied = (SELECT count(*) FROM audit.changes WHERE run_id = $r AND entity = $e AND target = $s
                                   AND status = 'applied'),
                changes_failed = (SELECT count(*) FROM audit.changes WHERE run_id = $r AND entity = $e AND target = $s
                                  AND status = 'failed'),
                changes_held = (SELECT count(*) FROM audit.changes WHERE run_id = $r AND entity = $e AND target = $s
                                AND status IN ('held', 'blocked', 'rejected'))
            WHERE run_id = $r AND entity = $e AND system = $s""", {"r": run_id, "e": entity, "s": system})


def run_entity(cfg: Config, entity: str, run_id: str | None = None, run_at: datetime | None = None,
               full: bool | None = None, url_overrides: Mapping[str, str] | None = None,
               progress: Progress = _quiet, dry_run: bool | None = None, approve: bool = False,
               through: str = "load") -> dict:
    """Every stage of `pipeline.STAGES`, in order, for one entity, in this process (which owns the run until it
    finishes). `through="extract"` stops once staging is loaded. Failures are recorded and re-raised."""
    run_at = utc_naive(run_at or datetime.now(timezone.utc))
    run_id = run_id or new_run_id(run_at)
    t0 = time.monotonic()
    timings: dict[str, float] = {}

    def timed(name: str, fn, *args, **kwargs):
        started = time.monotonic()
        try:
            return fn(*args, **kwargs)
        finally:
            timings[name] = time.monotonic() - started

    progress(f"run {run_id}: entity {entity}")
    manifest = timed("begin_run", begin_run, cfg, entity, run_id, run_at, full=full, url_overrides=url_overrides,
                     hold=True, progress=progress)
    systems = sorted(manifest["systems"])

    def extract_all() -> None:
        # Threads are enough: extraction waits on the source databases, and writes only Parquet.
        with ThreadPoolExecutor(max_workers=min(4, len(systems)) or 1) as pool:
            futures = [pool.submit(timed, f"extract:{s}", extract_system, cfg, entity, s, run_id, url_overrides,
                                   progress) for s in systems]
            for f in futures:
                r = f.result()
                progress(f"  {r['system']}: {r['rows']} rows extracted ({r['mode']})")

    def load_all() -> None:
        for target, state in targets_to_load(cfg, entity, run_id).items():
            if state == "ok":
                load_changes(cfg, entity, run_id, target, url_overrides, progress)
            elif state == "awaiting_approval":
                progress(f"  load {target}: waiting for approval (reconcile approve --run {run_id})")

    steps = {  # stages whose call differs from `stage(cfg, entity, run_id, progress=progress)`
        "extract_system": extract_all,
        "validate_system": lambda: [timed(f"validate:{s}", validate_system, cfg, entity, s, run_id, progress)
                                    for s in systems],
        "plan_changes": lambda: plan_changes(cfg, entity, run_id, dry_run=dry_run, approve=approve,
                                             progress=progress),
        "load_changes": load_all,
    }

    def run(stage) -> None:
        step = steps.get(stage.function)
        if step is not None:
            step()
        elif stage.recorded:  # times itself in audit.stage_runs
            globals()[stage.function](cfg, entity, run_id, progress=progress)
        else:
            timed(stage.task, globals()[stage.function], cfg, entity, run_id, progress=progress)

    between = STAGES[1:-1]  # between begin_run and finish_run
    done, skipping = 0, False
    try:
        for i, stage in enumerate(between):
            if not skipping or stage.always:
                run(stage)
            done = i + 1
            skipping = skipping or (through == "extract" and stage.function == EXTRACT_ONLY_THROUGH)
        summary = finish_run(cfg, entity, run_id, timings=timings, progress=progress)
    except BaseException as e:
        try:  # the stages that run even after a failure (an erased person's values go in any case)
            for stage in between[done + 1:]:
                if stage.always:
                    run(stage)
        finally:
            finish_run(cfg, entity, run_id, error=str(e) or type(e).__name__, timings=timings, progress=progress)
        raise
    summary["duration_s"] = round(time.monotonic() - t0, 2)
    if manifest.get("recovered"):
        summary["recovered"] = manifest["recovered"]
    return summary
