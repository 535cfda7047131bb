"""End to end in Airflow: `dag.test()` runs reconcile_contact on a generated demo with a real metadata DB.

Checks what the DAG promises: the run succeeds, staging tables hold every record minus the quarantined ones,
audit.runs records the Airflow run id; a system behind an Airflow connection is resolved in the task; a
failing source fails the DAG run visibly while the failure is still recorded; a failed error gate fails its
validate task, alerts, blocks the writes that depend on it and lets the rest load; a dry run writes nothing;
a load over a threshold waits in an ApprovalOperator that an answer (or its timeout) resolves.

`airflow dags test` waits for ever on an unanswered human-in-the-loop task, so the approval tests answer it
from a thread the way the API server does (or time it out the way the scheduler does), and fail the run after
a deadline rather than hang.
"""
from __future__ import annotations

import hashlib
import json
import threading
import time
from collections import Counter
from datetime import timedelta
from pathlib import Path

import duckdb
import pytest
import yaml

from reconcile.config import load_config
from reconcile.demo import QUARANTINE_EXPECTED, init_demo, read_answer_key

pytestmark = pytest.mark.slow

SYSTEMS = ("crm", "marketing", "erp")


def _demo(root: Path) -> Path:
    return Path(init_demo(root, people=40)["config"])


def _published(config: Path) -> duckdb.DuckDBPyConnection:
    return duckdb.connect(str(load_config(config).warehouse_path), read_only=True)


def _fail_fast(dag):
    """No retries: dag.test() would otherwise sit out the retry delays of a failing task."""
    for task in dag.tasks:
        task.retries = 0
    return dag


def _dag_state(status: str) -> str:
    """The DAG run state a recorded run status shows in Airflow (finish_run fails for what needs a person)."""
    return "success" if status in ("success", "dry_run") else "failed"


def _task_states(dr) -> dict[str, str]:
    return {(ti.task_id if ti.map_index < 0 else f"{ti.task_id}[{ti.map_index}]"): str(ti.state)
            for ti in dr.get_task_instances()}


def test_dag_run_stages_every_system(airflow_db, dags_for, tmp_path, monkeypatch):
    config = _demo(tmp_path / "demo")
    records = Counter(system for system, _, _ in read_answer_key(tmp_path / "demo" / "answer_key.csv"))
    dag = _fail_fast(dags_for(config)["reconcile_contact"])

    dr = dag.test()

    con = _published(config)
    for system in SYSTEMS:
        staged = con.execute(f"SELECT count(*) FROM staging.{system}__contact").fetchone()[0]
        assert staged == records[system] - QUARANTINE_EXPECTED[system], system
    quarantined = dict(con.execute("SELECT system, count(*) FROM audit.quarantine GROUP BY system").fetchall())
    assert quarantined == QUARANTINE_EXPECTED
    status, summary = con.execute("SELECT status, summary FROM audit.runs WHERE run_id = ? AND entity = 'contact'",
                                  [dr.run_id]).fetchone()
    # The demo newly holds shared mailboxes on its first night: blocked, shown as a failed finish_run (red).
    assert status in ("success", "blocked")
    assert dr.state == _dag_state(status), _task_states(dr)
    loads = {ti.map_index: str(ti.state) for ti in dr.get_task_instances() if ti.task_id == "load"}
    assert sorted(loads) == [0, 1, 2] and set(loads.values()) <= {"success", "skipped"}
    # The demo's thresholds are generous: no load waits for approval, so the human-in-the-loop task is never
    # reached (`make demo` runs `airflow dags test`, which would wait for an answer).
    states = _task_states(dr)
    assert status != "awaiting_approval"
    assert states["check_approval"] == "success"
    assert states["approve_load"] == "skipped" and states["load_approved"] == "skipped"
    assert json.loads(summary)["extracted"] == {s: records[s] for s in SYSTEMS}
    assert all(mode == "full" for mode in json.loads(summary)["extract_mode"].values())


def test_dag_runs_every_stage_the_cli_runs(airflow_db, dags_for, tmp_path):
    # Drift guard: a stage added to runner.run_entity but not wired into the DAG shows up here.
    from reconcile import runner

    config = _demo(tmp_path / "demo")
    dr = _fail_fast(dags_for(config)["reconcile_contact"]).test()
    assert dr.state == _dag_state(_run_row(config, dr.run_id)[0]), _task_states(dr)
    cli = runner.run_entity(load_config(config), "contact", run_id="cli_drift_check")

    con = _published(config)
    # (load:<target> rows record the loads each run had to do: the second run has nothing left to write)
    stages = {run_id: {s for (s,) in con.execute(
        "SELECT stage FROM audit.stage_runs WHERE run_id = ? AND entity = 'contact' AND stage NOT LIKE 'load:%'",
        [run_id]).fetchall()} for run_id in (dr.run_id, "cli_drift_check")}
    assert stages[dr.run_id] == stages["cli_drift_check"]
    summary = json.loads(con.execute("SELECT summary FROM audit.runs WHERE run_id = ?", [dr.run_id]).fetchone()[0])
    assert set(summary) == set(cli) - {"duration_s"}


def test_system_behind_an_airflow_connection(airflow_db, dags_for, tmp_path, monkeypatch):
    # The CRM is configured as `connection: reconcile_test_crm`, which exists only in Airflow's metadata DB:
    # no AIRFLOW_CONN_* variable, so only the task's Task SDK lookup can find it.
    from airflow.models.connection import Connection
    from airflow.utils.session import create_session

    config = _demo(tmp_path / "demo")
    crm_db = (config.parent / "systems" / "crm.db").resolve()
    text = config.read_text()
    assert "    url: sqlite:///systems/crm.db" in text
    config.write_text(text.replace("    url: sqlite:///systems/crm.db", "    connection: reconcile_test_crm", 1))
    monkeypatch.delenv("AIRFLOW_CONN_RECONCILE_TEST_CRM", raising=False)
    with create_session() as session:
        session.query(Connection).filter(Connection.conn_id == "reconcile_test_crm").delete()
        session.add(Connection(conn_id="reconcile_test_crm", uri=f"sqlite:///{crm_db}"))
    dag = _fail_fast(dags_for(config)["reconcile_contact"])

    dr = dag.test()

    assert dr.state == _dag_state(_run_row(config, dr.run_id)[0]), _task_states(dr)
    records = Counter(s for s, _, _ in read_answer_key(config.parent / "answer_key.csv"))
    staged = _published(config).execute("SELECT count(*) FROM staging.crm__contact").fetchone()[0]
    assert staged == records["crm"] - QUARANTINE_EXPECTED["crm"]


def test_failing_source_fails_the_run_and_is_recorded(airflow_db, dags_for, tmp_path, monkeypatch):
    config = _demo(tmp_path / "demo")
    (config.parent / "systems" / "erp.db").unlink()
    (config.parent / "systems" / "erp.db").write_bytes(b"")  # an empty database: table customer is missing
    dag = dags_for(config)["reconcile_contact"]
    _fail_fast(dag)

    dr = dag.test()

    states = _task_states(dr)
    assert dr.state == "failed", states
    assert states["extract[1]"] == "failed"  # systems are mapped in sorted order: crm, erp, marketing
    assert states["load_staging"] == "upstream_failed"
    assert states["finish_run"] == "failed"  # ran anyway (all_done), recorded the failure, then failed the run
    status, error = _published(config).execute(
        "SELECT status, error FROM audit.runs WHERE run_id = ? AND entity = 'contact'", [dr.run_id]).fetchone()
    assert status == "failed"
    assert "extract" in error


# --- gates, dry run and approval -------------------------------------------------------------------------

def _edit_config(config: Path, edit) -> None:
    data = yaml.safe_load(config.read_text())
    edit(data["entities"]["contact"])
    config.write_text(yaml.safe_dump(data, sort_keys=False))


def _checksums(config: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted((config.parent / "systems").glob("*.db"))}


def _run_row(config: Path, run_id: str) -> tuple[str, dict]:
    status, summary = _published(config).execute(
        "SELECT status, summary FROM audit.runs WHERE run_id = ? AND entity = 'contact'", [run_id]).fetchone()
    return status, json.loads(summary)


def _alerts(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_failed_error_gate_fails_validate_alerts_and_blocks_dependent_loads(airflow_db, dags_for, tmp_path,
                                                                          monkeypatch):
    # Marketing's lifecycle map forgets `customer`, and unmapped picklist values are an error for marketing:
    # its table fails `picklist:lifecycle`. Writes into marketing and of marketing's fields (phone, into the
    # CRM) are blocked; the CRM still gets its links.
    config = _demo(tmp_path / "demo")

    def edit(entity):
        entity["sources"]["marketing"]["fields"]["lifecycle"]["transform"]["map"].pop("customer")
        entity["gates"]["systems"] = {"marketing": {"severity": {"picklist": "error"}}}

    _edit_config(config, edit)
    alert_file = tmp_path / "alerts.jsonl"
    monkeypatch.setenv("RECONCILE_ALERT_FILE", str(alert_file))
    before = _checksums(config)
    dag = _fail_fast(dags_for(config)["reconcile_contact"])

    dr = dag.test()

    states = _task_states(dr)
    # The run is recorded blocked, then finish_run fails so the DAG run shows it (see the DAG doc).
    assert dr.state == "failed", states
    assert states["validate[2]"] == "failed"  # systems in sorted order: crm, erp, marketing
    assert states["validate[0]"] == states["validate[1]"] == "success"
    assert states["apply_gates"] == "success"  # ran after the failed gate and recorded every outcome
    assert states["load[2]"] == "skipped"  # marketing blocked
    assert states["load[1]"] == "success"  # erp is not blocked: the corrections the match model found load
    assert states["load[0]"] == "success"  # the CRM's own changes (links) still load
    assert states["approve_load"] == "skipped" and states["finish_run"] == "failed"

    status, summary = _run_row(config, dr.run_id)
    assert status == "blocked"
    assert "error" not in summary  # a gate failure is not a crash
    assert [(f["system"], f["expectation"]) for f in summary["gates"]["failures"] if f["severity"] == "error"] == [
        ("marketing", "picklist:lifecycle")]
    assert summary["changes"]["marketing"]["applied"] == 0
    after = _checksums(config)
    assert after["marketing.db"] == before["marketing.db"]  # nothing written into the system that failed
    assert after["crm.db"] != before["crm.db"]  # the CRM's links were written

    gates, = [a for a in _alerts(alert_file) if a["event"] == "gates_failed"]
    assert gates["run_id"] == dr.run_id and gates["task_id"] == "validate" and gates["map_index"] == 2
    assert gates["details"]["system"] == "marketing" and gates["details"]["failed"] == ["picklist:lifecycle"]
    assert "picklist:lifecycle" in gates["message"]
    assert [a["event"] for a in _alerts(alert_file)] == ["gates_failed", "run_blocked"]
    assert "error gate picklist:lifecycle failed on" in _alerts(alert_file)[1]["message"]

    # Night 2, the same gate fails again: validate fails again (the run is still red), but nothing new
    # happened, so neither the gate nor the run alerts a second time.
    dr2 = dag.test()
    states2 = _task_states(dr2)
    assert states2["validate[2]"] == "failed" and dr2.state == "failed", states2
    assert _run_row(config, dr2.run_id)[0] == "blocked"
    assert [a["event"] for a in _alerts(alert_file)] == ["gates_failed", "run_blocked"]


def test_dry_run_param_writes_nothing(airflow_db, dags_for, tmp_path, monkeypatch):
    config = _demo(tmp_path / "demo")  # load.mode: apply; the param forces a dry run
    monkeypatch.setenv("RECONCILE_ALERT_FILE", str(tmp_path / "alerts.jsonl"))
    before = _checksums(config)
    dag = _fail_fast(dags_for(config)["reconcile_contact"])

    dr = dag.test(run_conf={"dry_run": True})

    states = _task_states(dr)
    assert dr.state == "success", states
    assert _checksums(config) == before
    status, summary = _run_row(config, dr.run_id)
    assert status == "dry_run"
    assert all(c["applied"] == 0 for c in summary["changes"].values())
    assert {states[f"load[{i}]"] for i in range(3)} == {"skipped"}
    assert states["approve_load"] == "skipped"
    assert not _alerts(tmp_path / "alerts.jsonl")  # a dry run is not something to alert on


def _over_threshold(config: Path) -> None:
    """Any create or update into marketing needs approval; the CRM's changes do not."""
    def edit(entity):
        entity["gates"]["systems"] = {"marketing": {"changes": {"create": {"max": 0}, "update": {"max": 0}}}}

    _edit_config(config, edit)


class _HitlResponder(threading.Thread):
    """Answers the run's approve_load as the API server does (or lets it time out as the scheduler does).

    After `deadline` seconds, or if answering fails, it fails whatever still waits for input instead, so that
    dag.test() returns rather than waiting for ever."""

    def __init__(self, dag_id: str, *, answer: str | None, deadline: float = 180):
        super().__init__(daemon=True)
        self.dag_id, self.answer, self.deadline = dag_id, answer, deadline
        self.answered = False
        self.gave_up = False
        self.error: Exception | None = None
        self.body = None
        self._stop_event = threading.Event()

    def stop(self):
        self._stop_event.set()
        self.join(timeout=30)

    def run(self):
        end = time.monotonic() + self.deadline
        while not self._stop_event.wait(0.5):
            try:
                if self.error is not None or time.monotonic() > end:
                    self._fail_waiting_tasks()  # keeps doing so until the run ends: never a hang
                elif not self.answered:
                    self._answer_if_waiting()
            except Exception as e:  # never leave dag.test() waiting: report it and fail the waiting task
                self.error = self.error or e

    def _answer_if_waiting(self):
        from airflow.models.taskinstance import TaskInstance
        from airflow.utils.session import create_session
        from airflow.utils.state import TaskInstanceState
        from sqlalchemy import select
        from sqlalchemy.orm import joinedload

        with create_session() as session:
            ti = session.scalars(select(TaskInstance).where(
                TaskInstance.dag_id == self.dag_id, TaskInstance.task_id == "approve_load",
                TaskInstance.state == TaskInstanceState.AWAITING_INPUT)
                .options(joinedload(TaskInstance.hitl_detail))).first()
            if ti is not None:
                self.body = ti.hitl_detail.body
                self._respond(ti, session)
                self.answered = True

    def _fail_waiting_tasks(self):
        # dag.test() recomputes the run's state from its tasks, so fail the waiting task, not the run.
        from airflow.models.taskinstance import TaskInstance
        from airflow.utils.session import create_session
        from airflow.utils.state import TaskInstanceState
        from sqlalchemy import update

        self.gave_up = True
        with create_session() as session:
            session.execute(update(TaskInstance).where(TaskInstance.dag_id == self.dag_id,
                                                       TaskInstance.state == TaskInstanceState.AWAITING_INPUT)
                            .values(state=TaskInstanceState.FAILED))

    def _respond(self, ti, session):
        from airflow._shared.timezones import timezone
        from airflow.models.trigger import handle_event_submit
        from airflow.triggers.base import TriggerEvent

        if self.answer is None:  # nobody answers: the response timeout passes; the scheduler's sweep resolves it
            from airflow.jobs.job import Job
            from airflow.jobs.scheduler_job_runner import SchedulerJobRunner

            ti.trigger_timeout = timezone.utcnow() - timedelta(seconds=1)
            session.flush()
            SchedulerJobRunner(job=Job()).check_awaiting_input_timeouts(session=session)
            return
        detail = ti.hitl_detail  # what PATCH .../hitlDetails does for a user's answer
        detail.responded_by = {"id": "ana", "name": "Ana Lytic"}
        detail.responded_at = timezone.utcnow()
        detail.chosen_options = [self.answer]
        detail.params_input = {}
        session.add(detail)
        handle_event_submit(TriggerEvent(detail.as_resume_event_payload()), task_instance=ti, session=session)


def _run_with_answer(dag, answer: str | None, **kwargs):
    responder = _HitlResponder(dag.dag_id, answer=answer)
    responder.start()
    try:
        dr = dag.test(**kwargs)
    finally:
        responder.stop()
    assert responder.error is None, f"answering approve_load failed: {responder.error!r}"
    assert not responder.gave_up, "approve_load was never resolved: it was failed after the deadline"
    return dr, responder


def test_load_over_threshold_waits_for_approval_and_loads_when_approved(airflow_db, dags_for, tmp_path,
                                                                        monkeypatch):
    config = _demo(tmp_path / "demo")
    _over_threshold(config)
    alert_file = tmp_path / "alerts.jsonl"
    monkeypatch.setenv("RECONCILE_ALERT_FILE", str(alert_file))
    before = _checksums(config)
    dag = _fail_fast(dags_for(config)["reconcile_contact"])

    dr, responder = _run_with_answer(dag, "Approve")

    states = _task_states(dr)
    assert responder.answered, states
    assert states["approve_load"] == "success"
    assert states["load[2]"] == "skipped"  # marketing waited for the answer ...
    assert states["load_approved[0]"] == "success"  # ... and loaded after it (mapped over the approved targets)
    assert states["load[0]"] == "success"  # the CRM needed no approval and did not wait for one
    # The question: counts, a sample, where the full list is.
    assert "marketing" in responder.body and "| marketing | create |" in responder.body
    assert "reconcile changes --config" in responder.body and dr.run_id in responder.body
    status, summary = _run_row(config, dr.run_id)
    assert status in ("success", "blocked")  # blocked: the demo's shared mailboxes are newly held for review
    assert dr.state == _dag_state(status), states
    assert summary["changes"]["marketing"]["applied"] > 0
    assert _checksums(config)["marketing.db"] != before["marketing.db"]
    decision = _published(config).execute(
        "SELECT decision, decided_by FROM audit.approvals WHERE run_id = ? AND target = 'marketing'",
        [dr.run_id]).fetchone()
    assert decision == ("approved", "Ana Lytic")
    assert "approval_requested" in [a["event"] for a in _alerts(alert_file)]


def test_no_answer_before_the_timeout_rejects_and_writes_nothing(airflow_db, dags_for, tmp_path, monkeypatch):
    config = _demo(tmp_path / "demo")
    _over_threshold(config)
    alert_file = tmp_path / "alerts.jsonl"
    monkeypatch.setenv("RECONCILE_ALERT_FILE", str(alert_file))
    before = _checksums(config)
    dag = _fail_fast(dags_for(config)["reconcile_contact"])

    dr, responder = _run_with_answer(dag, None)

    states = _task_states(dr)
    assert responder.answered and dr.state == "failed", states  # blocked: shown as a failed finish_run
    assert states["approve_load"] == "success"  # resolved with its default, Reject
    assert states["load_approved"] == "skipped"
    assert _checksums(config)["marketing.db"] == before["marketing.db"]
    status, summary = _run_row(config, dr.run_id)
    assert status == "blocked"
    assert summary["changes"]["marketing"]["applied"] == 0
    decision = _published(config).execute(
        "SELECT decision, decided_by FROM audit.approvals WHERE run_id = ? AND target = 'marketing'",
        [dr.run_id]).fetchone()
    assert decision == ("rejected", "airflow (no answer)")
    assert [a["event"] for a in _alerts(alert_file)] == ["approval_requested", "run_blocked"]


def test_approve_param_pre_approves_without_asking(airflow_db, dags_for, tmp_path, monkeypatch):
    config = _demo(tmp_path / "demo")
    _over_threshold(config)
    monkeypatch.setenv("RECONCILE_ALERT_FILE", str(tmp_path / "alerts.jsonl"))
    dag = _fail_fast(dags_for(config)["reconcile_contact"])

    dr, responder = _run_with_answer(dag, "Reject", run_conf={"approve": True})  # would reject if asked

    states = _task_states(dr)
    assert not responder.answered, states
    assert states["approve_load"] == "skipped"
    assert states["load[2]"] == "success"
    status, summary = _run_row(config, dr.run_id)
    assert dr.state == _dag_state(status), states
    assert summary["changes"]["marketing"]["applied"] > 0
