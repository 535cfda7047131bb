"""The alert notifier (dags/reconcile_alerts.py): log line, JSON-lines file, optional Slack / email channels.

No Airflow run is needed: a notifier takes a context; here a small one with the fields a task context has.
"""
from __future__ import annotations

import email
import importlib.util
import json
import logging
import socket
import socketserver
import sys
import threading
import types
from pathlib import Path

import pytest
from reconcile_alerts import ReconcileAlert, alert_file, conclude_run


class _TI:
    dag_id, run_id, task_id, map_index = "reconcile_contact", "manual__2026-11-22", "validate", 1


CONTEXT = {"ti": _TI(), "run_id": _TI.run_id}


@pytest.fixture(autouse=True)
def _no_channels(monkeypatch):
    for var in ("RECONCILE_ALERT_FILE", "RECONCILE_ALERT_SLACK_CONN_ID", "RECONCILE_ALERT_EMAIL_CONN_ID",
                "RECONCILE_ALERT_EMAIL_TO"):
        monkeypatch.delenv(var, raising=False)


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_alert_goes_to_the_log_and_a_json_line(tmp_path, monkeypatch, caplog):
    path = tmp_path / "alerts" / "reconcile.jsonl"
    monkeypatch.setenv("RECONCILE_ALERT_FILE", str(path))
    alert = ReconcileAlert("gates_failed", "error gate(s) failed on staging.crm__contact: picklist:lifecycle",
                           {"system": "crm", "failed": ["picklist:lifecycle"]})

    with caplog.at_level(logging.WARNING, logger="reconcile.alerts"):
        alert(CONTEXT)
        alert(CONTEXT)  # appended, never overwritten

    first, second = _lines(path)
    assert first == second | {"at": first["at"]}
    assert {k: first[k] for k in ("event", "dag_id", "run_id", "task_id", "map_index")} == {
        "event": "gates_failed", "dag_id": "reconcile_contact", "run_id": "manual__2026-11-22",
        "task_id": "validate", "map_index": 1}
    assert first["details"] == {"system": "crm", "failed": ["picklist:lifecycle"]}
    assert "picklist:lifecycle" in caplog.text and "gates_failed" in caplog.text


def test_default_file_is_under_airflow_home(tmp_path, monkeypatch):
    monkeypatch.setenv("AIRFLOW_HOME", str(tmp_path))
    assert alert_file() == tmp_path / "reconcile-alerts.jsonl"


def test_messages_are_data_not_templates(tmp_path, monkeypatch):
    monkeypatch.setenv("RECONCILE_ALERT_FILE", str(tmp_path / "a.jsonl"))
    ReconcileAlert("run_failed", "value {{ not a template }} {% raw %}", {})(CONTEXT)
    assert _lines(tmp_path / "a.jsonl")[0]["message"] == "value {{ not a template }} {% raw %}"


def test_unwritable_file_does_not_fail_the_task(tmp_path, monkeypatch, caplog):
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("RECONCILE_ALERT_FILE", str(tmp_path / "file" / "alerts.jsonl"))  # parent is a file
    with caplog.at_level(logging.WARNING, logger="reconcile.alerts"):
        ReconcileAlert("run_blocked", "held back", {})(CONTEXT)
    assert "held back" in caplog.text and "could not append the alert" in caplog.text


def test_slack_configured_without_its_provider_warns(tmp_path, monkeypatch, caplog):
    # apache-airflow-providers-slack is not installed here, and reconcile does not depend on it.
    if importlib.util.find_spec("airflow.providers.slack") is not None:
        pytest.skip("apache-airflow-providers-slack is installed")
    monkeypatch.setenv("RECONCILE_ALERT_FILE", str(tmp_path / "a.jsonl"))
    monkeypatch.setenv("RECONCILE_ALERT_SLACK_CONN_ID", "reconcile_slack")

    with caplog.at_level(logging.WARNING, logger="reconcile.alerts"):
        ReconcileAlert("run_failed", "extract failed", {})(CONTEXT)

    assert "RECONCILE_ALERT_SLACK_CONN_ID=reconcile_slack is set but apache-airflow-providers-slack" in caplog.text
    assert len(_lines(tmp_path / "a.jsonl")) == 1  # the file still has it


class _SmtpSink(socketserver.StreamRequestHandler):
    """Just enough SMTP (EHLO, MAIL, RCPT, DATA, QUIT) to receive one message, like a relay would."""

    def handle(self):
        self.wfile.write(b"220 sink ready\r\n")
        body: list[bytes] | None = None
        while line := self.rfile.readline():
            if body is not None:
                if line == b".\r\n":
                    self.server.messages.append(b"".join(body).decode())
                    body = None
                    self.wfile.write(b"250 queued\r\n")
                else:
                    body.append(line)
                continue
            verb = line[:4].upper()
            if verb == b"DATA":
                body = []
                self.wfile.write(b"354 go ahead\r\n")
            elif verb == b"QUIT":
                self.wfile.write(b"221 bye\r\n")
                return
            else:
                self.wfile.write(b"250 ok\r\n")


@pytest.fixture
def smtp_server():
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _SmtpSink)
    server.messages = []
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


def test_email_through_an_airflow_smtp_connection(tmp_path, monkeypatch, smtp_server):
    pytest.importorskip("airflow.providers.smtp.notifications.smtp")  # installed with Airflow here
    conn = {"conn_type": "smtp", "host": "127.0.0.1", "port": smtp_server.server_address[1],
            "extra": {"disable_tls": True, "disable_ssl": True, "from_email": "reconcile@example.com",
                      "retry_limit": 0, "timeout": 5}}
    monkeypatch.setenv("AIRFLOW_CONN_RECONCILE_SMTP", json.dumps(conn))
    monkeypatch.setenv("RECONCILE_ALERT_FILE", str(tmp_path / "a.jsonl"))
    monkeypatch.setenv("RECONCILE_ALERT_EMAIL_CONN_ID", "reconcile_smtp")
    monkeypatch.setenv("RECONCILE_ALERT_EMAIL_TO", "data-team@example.com, ops@example.com")

    ReconcileAlert("gates_failed", "error gate(s) failed on staging.crm__contact: picklist:lifecycle",
                   {"failed": ["picklist:lifecycle"]})(CONTEXT)

    (raw,) = smtp_server.messages
    message = email.message_from_string(raw)
    assert message["Subject"] == "[reconcile] gates_failed: reconcile_contact"
    assert message["To"] == "data-team@example.com, ops@example.com"
    (html,) = [p.get_payload(decode=True).decode() for p in message.walk() if p.get_content_type() == "text/html"]
    assert "picklist:lifecycle" in html and "manual__2026-11-22" in html


def test_unreachable_smtp_server_does_not_fail_the_task(tmp_path, monkeypatch, caplog):
    pytest.importorskip("airflow.providers.smtp.notifications.smtp")
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    conn = {"conn_type": "smtp", "host": "127.0.0.1", "port": port,
            "extra": {"disable_tls": True, "disable_ssl": True, "from_email": "r@example.com", "retry_limit": 0,
                      "timeout": 2}}
    monkeypatch.setenv("AIRFLOW_CONN_RECONCILE_SMTP", json.dumps(conn))
    monkeypatch.setenv("RECONCILE_ALERT_FILE", str(tmp_path / "a.jsonl"))
    monkeypatch.setenv("RECONCILE_ALERT_EMAIL_CONN_ID", "reconcile_smtp")
    monkeypatch.setenv("RECONCILE_ALERT_EMAIL_TO", "data-team@example.com")
    with caplog.at_level(logging.WARNING, logger="reconcile.alerts"):
        ReconcileAlert("run_failed", "extract failed", {})(CONTEXT)
    assert "emailing the alert through connection reconcile_smtp failed" in caplog.text
    assert len(_lines(tmp_path / "a.jsonl")) == 1


def test_email_without_recipients_warns(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("RECONCILE_ALERT_FILE", str(tmp_path / "a.jsonl"))
    monkeypatch.setenv("RECONCILE_ALERT_EMAIL_CONN_ID", "reconcile_smtp")
    with caplog.at_level(logging.WARNING, logger="reconcile.alerts"):
        ReconcileAlert("run_failed", "extract failed", {})(CONTEXT)
    assert "RECONCILE_ALERT_EMAIL_TO is empty" in caplog.text


def test_slack_provider_gets_the_connection_and_text(tmp_path, monkeypatch):
    # The provider cannot be installed here: a stand-in module with the provider's class name and signature
    # (slack_webhook_conn_id, text; notify(context)) checks the wiring, and that a failing send does not raise.
    sent = []

    class SlackWebhookNotifier:
        def __init__(self, *, slack_webhook_conn_id, text):
            self.conn_id, self.text = slack_webhook_conn_id, text

        def notify(self, context):
            sent.append((self.conn_id, self.text, context["run_id"]))
            raise ConnectionError("slack is down")

    module = types.ModuleType("airflow.providers.slack.notifications.slack_webhook")
    module.SlackWebhookNotifier = SlackWebhookNotifier
    monkeypatch.setitem(sys.modules, "airflow.providers.slack.notifications.slack_webhook", module)
    monkeypatch.setenv("RECONCILE_ALERT_FILE", str(tmp_path / "a.jsonl"))
    monkeypatch.setenv("RECONCILE_ALERT_SLACK_CONN_ID", "reconcile_slack")

    ReconcileAlert("run_blocked", "2 writes held", {})(CONTEXT)

    assert sent == [("reconcile_slack", "reconcile reconcile_contact run manual__2026-11-22: 2 writes held",
                     "manual__2026-11-22")]


class _PushingTI(_TI):
    task_id, map_index = "finish_run", -1

    def __init__(self):
        self.pushed = {}

    def xcom_push(self, key, value):
        self.pushed[key] = value


def _summary(status: str, alert: dict | None) -> dict:
    return {"run_id": "manual__2026-11-22", "entity": "contact", "status": status, "alert": alert,
            "reasons": [f"why {status}"]}


def test_a_run_needing_a_person_fails_the_final_task_and_alerts_once(tmp_path, monkeypatch):
    from airflow.sdk.exceptions import AirflowFailException

    monkeypatch.setenv("RECONCILE_ALERT_FILE", str(tmp_path / "a.jsonl"))
    ti = _PushingTI()
    alert = {"event": "run_blocked", "message": "run of contact ended blocked: why blocked", "details": {}}
    with pytest.raises(AirflowFailException, match=r"ended blocked \(recorded; not a crash\): why blocked"):
        conclude_run({"ti": ti, "run_id": _TI.run_id}, _summary("blocked", alert))
    assert [a["event"] for a in _lines(tmp_path / "a.jsonl")] == ["run_blocked"]
    assert ti.pushed["summary"]["status"] == "blocked"
    # the next night, the same standing state: still red, no second alert (the library set no alert)
    with pytest.raises(AirflowFailException, match="ended incomplete"):
        conclude_run({"ti": ti, "run_id": _TI.run_id}, _summary("incomplete", None))
    assert len(_lines(tmp_path / "a.jsonl")) == 1


def test_a_successful_run_is_green_and_silent(tmp_path, monkeypatch):
    monkeypatch.setenv("RECONCILE_ALERT_FILE", str(tmp_path / "a.jsonl"))
    summary = _summary("success", None)
    assert conclude_run({"ti": _PushingTI(), "run_id": _TI.run_id}, summary) is summary
    assert conclude_run({"ti": _PushingTI(), "run_id": _TI.run_id}, _summary("dry_run", None))["status"] == "dry_run"
    assert not (tmp_path / "a.jsonl").exists()
