"""OpenLineage events as a data catalogue receives them: `airflow dags test reconcile_contact` on a demo, with
Airflow's OpenLineage provider writing every event through its file transport (a fresh Airflow process, so
the provider reads the transport from the environment as a deployment's workers do).

The golden table's COMPLETE event carries a `columnLineage` facet: every golden field <- the source columns of
the systems that may supply it (owner, then fallbacks), as the demo config maps them."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from reconcile.config import load_config
from reconcile.demo import init_demo

pytestmark = pytest.mark.slow

AIRFLOW = Path(sys.executable).parent / "airflow"


def _column_lineage(dataset: dict) -> dict[str, list[tuple]]:
    """{output column: [(namespace, dataset, column, description), ...]} of a dataset's columnLineage facet."""
    return {column: [(f["namespace"], f["name"], f["field"], f["transformations"][0]["description"])
                     for f in spec["inputFields"]]
            for column, spec in dataset["facets"]["columnLineage"]["fields"].items()}


def test_golden_complete_event_carries_column_lineage(airflow_db, tmp_path):
    config = Path(init_demo(tmp_path / "demo", people=40)["config"])
    cfg = load_config(config)
    events_file = tmp_path / "openlineage.jsonl"
    env = {**os.environ, "RECONCILE_CONFIG": str(config), "AIRFLOW__OPENLINEAGE__NAMESPACE": "reconcile_test",
           "AIRFLOW__OPENLINEAGE__TRANSPORT": json.dumps({"type": "file", "log_file_path": str(events_file),
                                                          "append": True})}
    # Night 1 of the demo ends `blocked` (finish_run fails on purpose), so the exit code is not the point here.
    run = subprocess.run([str(AIRFLOW), "dags", "test", "reconcile_contact"], env=env, capture_output=True,
                         text=True, timeout=1800)
    assert events_file.exists(), (run.stdout + run.stderr)[-3000:]

    events = [json.loads(line) for line in events_file.read_text().splitlines()]
    complete = {e["job"]["name"]: e for e in events if e["eventType"] == "COMPLETE"}
    warehouse = f"duckdb://{cfg.warehouse_path}"
    golden_event = complete["reconcile_contact.build_golden"]
    (golden,) = [d for d in golden_event["outputs"] if d["name"] == "golden.contact"]
    assert golden["namespace"] == warehouse and "schema" in golden["facets"]
    columns = _column_lineage(golden)
    crm, marketing, erp = ("reconcile://crm", "crm.contact"), ("reconcile://marketing", "marketing.contacts"), \
        ("reconcile://erp", "erp.customer")
    assert set(columns) == {"xid", *cfg.entities["contact"].fields}
    assert columns["xid"] == [(warehouse, "identity.xref", "xid", "cross-system id of the linked records")]
    assert columns["email"] == [(*crm, "emailaddress1", "owner; strategy owner (transform: email)")]
    assert columns["phone"] == [(*marketing, "phone", "owner; strategy owner (transform: phone)"),
                                (*crm, "telephone1", "fallback 1; strategy owner (transform: phone)")]
    assert columns["company"] == [(*crm, "companyname", "owner; strategy owner (transform: trim)"),
                                  (*erp, "company_name", "fallback 1; strategy owner (transform: trim)")]
    assert columns["billing_city"] == [(*erp, "billing_city", "owner; strategy owner (transform: trim)")]
    assert columns["email_opt_out_at"] == [(*marketing, "hs_email_optout_timestamp", "owner; strategy owner")]
    # Staging columns <- their source column, on load_staging's event: a catalogue can follow either path.
    staged = {d["name"]: d for d in complete["reconcile_contact.load_staging"]["outputs"]}
    assert _column_lineage(staged["staging.erp__contact"])["billing_city"] == [
        (*erp, "billing_city", "read (transform: trim)")]
