"""Alerts of the reconcile DAGs: an Airflow notifier for what a person must look at.

`ReconcileAlert` is called by `reconcile_dags.py` when a table fails an error-level quality gate, when a load
waits for approval, and when a run ends `failed`, `incomplete`, `blocked` or `awaiting_approval` with a status
or causes the previous run did not have (the library decides: the summary's `alert`, reconcile/report.py). Every
alert goes to the task log and is appended as one JSON line to a file; Slack and email are optional, through
Airflow connections:

* `RECONCILE_ALERT_FILE`: the JSON-lines file (default `$AIRFLOW_HOME/reconcile-alerts.jsonl`);
* `RECONCILE_ALERT_SLACK_CONN_ID`: a Slack incoming-webhook connection (needs apache-airflow-providers-slack);
* `RECONCILE_ALERT_EMAIL_CONN_ID` and `RECONCILE_ALERT_EMAIL_TO` (comma-separated): an SMTP connection and the
  recipients (needs apache-airflow-providers-smtp).

The providers are imported only when configured; a configured channel whose provider is missing, or that fails
to send, is logged as a warning and never fails the task: the log line and the file always have the alert.
The environment is read when an alert is sent, never when the DAG file is parsed.
"""
from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from airflow.sdk import BaseNotifier

ALERT_FILE_ENV = "RECONCILE_ALERT_FILE"
SLACK_CONN_ENV = "RECONCILE_ALERT_SLACK_CONN_ID"
EMAIL_CONN_ENV = "RECONCILE_ALERT_EMAIL_CONN_ID"
EMAIL_TO_ENV = "RECONCILE_ALERT_EMAIL_TO"

log = logging.getLogger("reconcile.alerts")


def alert_file() -> Path:
    """Where alerts are appended: $RECONCILE_ALERT_FILE, else $AIRFLOW_HOME/reconcile-alerts.jsonl."""
    configured = os.environ.get(ALERT_FILE_ENV)
    if configured:
        return Path(configured).expanduser()
    return Path(os.environ.get("AIRFLOW_HOME") or "~/airflow").expanduser() / "reconcile-alerts.jsonl"


class ReconcileAlert(BaseNotifier):
    """One alert: `event` (e.g. `gates_failed`, `run_blocked`), a one-line `message` and JSON `details`.

    Usable inline (`ReconcileAlert(...)(context)`) and wherever Airflow takes a notifier (`notifiers=`,
    `on_failure_callback=`). The run, task and map index come from the context.
    """

    template_fields = ()  # messages carry data (expectation names, values): never rendered as Jinja

    def __init__(self, event: str, message: str, details: Mapping[str, Any] | None = None):
        super().__init__()
        self.event = event
        self.message = message
        self.details = dict(details or {})

    def record(self, context: Mapping[str, Any]) -> dict[str, Any]:
        ti = context.get("ti") or context.get("task_instance")
        map_index = getattr(ti, "map_index", -1)
        return {
            "at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "event": self.event,
            "dag_id": getattr(ti, "dag_id", None) or getattr(context.get("dag"), "dag_id", None),
            "run_id": context.get("run_id") or getattr(ti, "run_id", None),
            "task_id": getattr(ti, "task_id", None),
            "map_index": map_index if isinstance(map_index, int) and map_index >= 0 else None,
            "message": self.message,
            "details": self.details,
        }

    def notify(self, context: Mapping[str, Any]) -> None:
        record = self.record(context)
        log.warning("reconcile alert [%s] %s: %s", record["event"], record["dag_id"], record["message"])
        path = alert_file()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "a", encoding="utf-8") as fh:  # one write per line: concurrent tasks append whole lines
                fh.write(json.dumps(record, default=str, sort_keys=True) + "\n")
        except OSError as e:
            log.error("could not append the alert to %s (%s=%s): %s", path, ALERT_FILE_ENV,
                      os.environ.get(ALERT_FILE_ENV, "unset"), e)
        text = f"reconcile {record['dag_id']} run {record['run_id']}: {record['message']}"
        self._send_slack(context, text)
        self._send_email(context, record, text)

    # Optional channels: each needs its provider, imported only when its connection is configured.

    def _send_slack(self, context: Mapping[str, Any], text: str) -> None:
        conn_id = os.environ.get(SLACK_CONN_ENV)
        if not conn_id:
            return
        try:
            from airflow.providers.slack.notifications.slack_webhook import SlackWebhookNotifier
        except ImportError:
            log.warning("%s=%s is set but apache-airflow-providers-slack is not installed: this alert was not "
                        "sent to Slack (it is in the task log and %s)", SLACK_CONN_ENV, conn_id, alert_file())
            return
        try:
            SlackWebhookNotifier(slack_webhook_conn_id=conn_id, text=text).notify(context)
        except Exception as e:  # an alert channel being down must not fail the run
            log.warning("sending the alert to Slack connection %s failed: %s", conn_id, e)

    def _send_email(self, context: Mapping[str, Any], record: Mapping[str, Any], text: str) -> None:
        conn_id = os.environ.get(EMAIL_CONN_ENV)
        if not conn_id:
            return
        to = [a.strip() for a in os.environ.get(EMAIL_TO_ENV, "").split(",") if a.strip()]
        if not to:
            log.warning("%s=%s is set but %s is empty: this alert was not emailed", EMAIL_CONN_ENV, conn_id,
                        EMAIL_TO_ENV)
            return
        try:
            from airflow.providers.smtp.notifications.smtp import SmtpNotifier
        except ImportError:
            log.warning("%s=%s is set but apache-airflow-providers-smtp is not installed: this alert was not "
                        "emailed (it is in the task log and %s)", EMAIL_CONN_ENV, conn_id, alert_file())
            return
        from html import escape

        body = f"<p>{escape(text)}</p><pre>{escape(json.dumps(record, indent=2, default=str))}</pre>"
        try:
            SmtpNotifier(to=to, smtp_conn_id=conn_id, subject=f"[reconcile] {record['event']}: {record['dag_id']}",
                         html_content=body).notify(context)
        except Exception as e:  # an alert channel being down must not fail the run
            log.warning("emailing the alert through connection %s failed: %s", conn_id, e)


def conclude_run(context: Mapping[str, Any], summary: Mapping[str, Any]) -> Mapping[str, Any]:
    """The end of a DAG run, after the library recorded it: send the run's alert (the summary's `alert`, set
    only on a change of state), then show its status as the final task's state in the DAG run list: `success`
    and `dry_run` return the summary; `failed`, `incomplete`, `blocked` and `awaiting_approval` raise
    AirflowFailException (no retry), the reasons in the message."""
    from airflow.sdk.exceptions import AirflowFailException

    if summary.get("alert"):
        a = summary["alert"]
        ReconcileAlert(a["event"], a["message"], a.get("details"))(context)
    status = summary["status"]
    if status in ("success", "dry_run"):
        return summary
    ti = context.get("ti")
    if ti is not None:
        ti.xcom_push(key="summary", value=dict(summary))
    why = "; ".join(summary.get("reasons") or []) or "see its summary"
    kind = "failed" if status == "failed" else f"ended {status} (recorded; not a crash)"
    raise AirflowFailException(f"reconcile run {summary['run_id']} of {summary['entity']} {kind}: {why}")
