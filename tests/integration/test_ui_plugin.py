"""The UI plugin's pages and JSON API through FastAPI's TestClient, with Airflow's real auth manager.

The plugin app is mounted under /reconcile exactly as Airflow's api-server mounts `fastapi_apps`; requests
carry a JWT signed by the configured SimpleAuthManager (bearer header or the UI's `_token` cookie).
"""
from __future__ import annotations

import duckdb
import pytest

from .ui_demo import demo_config, fresh_copy, load_plugin, token

pytestmark = pytest.mark.slow


@pytest.fixture
def client(airflow_db, monkeypatch):
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    monkeypatch.setenv("RECONCILE_CONFIG", str(demo_config()))
    outer = FastAPI()
    outer.mount("/reconcile", load_plugin().create_app())
    return TestClient(outer)


def bearer(user: str = "alice", role: str = "admin") -> dict:
    return {"Authorization": f"Bearer {token(user, role)}"}


def test_unauthenticated_requests_are_refused(client):
    for path in ("/reconcile/api/runs", "/reconcile/api/items", "/reconcile/review", "/reconcile/changes"):
        r = client.get(path)
        assert r.status_code == 401, (path, r.status_code)
    assert client.get("/reconcile/api/runs").json() == {"detail": "Not authenticated"}
    assert "Please log in" in client.get("/reconcile/review").text
    r = client.post("/reconcile/api/decisions", json={"item_id": "x", "action": "ignore", "reason": "r"})
    assert r.status_code == 401
    assert client.get("/reconcile/api/runs", headers={"Authorization": "Bearer not-a-jwt"}).status_code == 403


def test_api_reads_the_runs_changes_and_items(client):
    runs = client.get("/reconcile/api/runs", headers=bearer()).json()["runs"]
    assert [(r["run_id"], r["status"]) for r in runs] == [("ui_night_1", "awaiting_approval")]
    run = client.get("/reconcile/api/runs/ui_night_1", headers=bearer()).json()
    assert any("waits for approval" in w for w in run["why"])
    assert {a for a, v in run["approvals"].items() if v["required"] and v["decision"] is None}

    changes = client.get("/reconcile/api/changes", params={"operation": "create", "limit": 5}, headers=bearer()).json()
    assert changes["run_id"] == "ui_night_1" and changes["total"] > 5 and len(changes["rows"]) == 5
    assert all(r["record"] and r["before_value"] is None for r in changes["rows"])  # a create shows its record
    page2 = client.get("/reconcile/api/changes", params={"operation": "create", "limit": 5, "offset": 5},
                       headers=bearer()).json()
    assert {r["change_id"] for r in page2["rows"]}.isdisjoint(r["change_id"] for r in changes["rows"])

    items = client.get("/reconcile/api/items", headers=bearer()).json()
    assert items["total"] == len(items["items"]) > 0
    kinds = {i["kind"] for i in items["items"]}
    only = client.get("/reconcile/api/items", params={"kind": sorted(kinds)[0]}, headers=bearer()).json()
    assert {i["kind"] for i in only["items"]} == {sorted(kinds)[0]}
    item = client.get(f"/reconcile/api/items/{items['items'][0]['item_id']}", headers=bearer()).json()
    assert item["records"] and set(item["effects"]) == {"link", "split", "merge", "distinct", "ignore"}
    assert client.get("/reconcile/api/items/nope", headers=bearer()).status_code == 404

    gates = client.get("/reconcile/api/runs/ui_night_1/gates", headers=bearer()).json()
    assert any(o["expectation"] == "volume" for o in gates["outcomes"])
    trends = client.get("/reconcile/api/trends", headers=bearer()).json()["trends"]
    assert {t["system"] for t in trends} == {"crm", "marketing", "erp"}
    assert all(t["volume_min"] is not None or t["volume_max"] is None for t in trends)
    flow = client.get("/reconcile/api/flow", headers=bearer()).json()
    assert flow["matrix"] and {p["kind"] for p in flow["problems"]} == {"read_and_overwritten"}


def test_cookie_session_opens_the_pages(client):
    client.cookies.set("_token", token("alice"))
    for path, text in (("/reconcile/review", "Review queue"), ("/reconcile/changes", "Approve and load"),
                       ("/reconcile/report", "Trends per system"), ("/reconcile/flow", "Ownership matrix"),
                       ("/reconcile/api", "/reconcile/api/items")):
        r = client.get(path)
        assert r.status_code == 200 and text in r.text, path
        assert "signed in as alice" in r.text


def test_decision_through_the_api_is_recorded_with_the_user(airflow_db, tmp_path, monkeypatch):
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    config = fresh_copy(tmp_path / "demo")
    monkeypatch.setenv("RECONCILE_CONFIG", str(config))
    outer = FastAPI()
    outer.mount("/reconcile", load_plugin().create_app())
    client = TestClient(outer)
    item = client.get("/reconcile/api/items", params={"kind": "candidate"}, headers=bearer()).json()["items"][0]

    viewer = client.post("/reconcile/api/decisions", headers=bearer("vic", "viewer"),
                         json={"item_id": item["item_id"], "action": "ignore", "reason": "not mine"})
    assert viewer.status_code == 403  # a viewer may read, not decide

    r = client.post("/reconcile/api/decisions", headers=bearer("alice"),
                    json={"item_id": item["item_id"], "action": "ignore", "reason": "test data"})
    assert r.status_code == 200, r.text
    con = duckdb.connect(str(config.parent / "warehouse" / "reconcile.duckdb"), read_only=True)
    rows = con.execute("SELECT action, decided_by, reason FROM review.decisions WHERE item_id = ?",
                       [item["item_id"]]).fetchall()
    con.close()
    assert rows == [("ignore", "alice", "test data")]
    bad = client.post("/reconcile/api/decisions", headers=bearer(),
                      json={"item_id": item["item_id"], "action": "explode", "reason": "x"})
    assert bad.status_code == 400 and "unknown action" in bad.json()["detail"]


def test_data_docs_are_served_without_any_cdn(client):
    import re

    report = client.get("/reconcile/report", headers=bearer())
    assert "/reconcile/docs/ui_night_1/index.html" in report.text
    index = client.get("/reconcile/docs/ui_night_1/index.html", headers=bearer())
    assert index.status_code == 200 and "staging.crm__contact" in index.text
    page = client.get("/reconcile/docs/ui_night_1/crm/index.html", headers=bearer())
    assert page.status_code == 200 and "reconcile: offline" in page.text
    loads = re.findall(r"<(?:link|script|img)\b[^>]*(?:href|src)=[\"']https?://", page.text)
    assert loads == []
    assert client.get("/reconcile/docs/ui_night_1/../../reconcile.yaml", headers=bearer()).status_code == 404
    assert client.get("/reconcile/docs/ui_night_1/crm/index.html").status_code == 401


def test_cli_report_is_one_self_contained_file(tmp_path, capsys):
    from reconcile.cli import main

    out = tmp_path / "report.html"
    assert main(["report", "-c", str(demo_config()), "--run", "ui_night_1", "--html", str(out)]) == 0
    html = out.read_text()
    assert "http" not in html  # no external URL of any kind: styles and plots are inline
    assert html.count("<svg class=\"plot volume\"") == 3 and "awaiting_approval" in html
    assert "waits for approval" in html and "Quality gates" in html
