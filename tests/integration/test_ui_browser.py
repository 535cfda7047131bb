"""The UI plugin in a real browser: Playwright driving Debian's Chromium (/usr/bin/chromium, installed by .ci/run).

The plugin app is mounted under /reconcile as Airflow mounts `fastapi_apps`, served by uvicorn on 127.0.0.1, and
the browser carries an Airflow session cookie (`_token`, a JWT signed by the configured auth manager, as the UI
login sets it). Screenshots of every page land in $RECONCILE_SCREENSHOTS (default: the test's tmp folder).
"""
from __future__ import annotations

import os
import shutil
import socket
import threading
import time
from pathlib import Path

import duckdb
import pytest

from .ui_demo import fresh_copy, load_plugin, token

pytestmark = pytest.mark.slow

CHROMIUM = os.environ.get("RECONCILE_TEST_CHROMIUM", "/usr/bin/chromium")


@pytest.fixture(scope="module")
def server():
    """Base URL of a uvicorn server running the plugin under /reconcile (one per module)."""
    import uvicorn
    from fastapi import FastAPI

    outer = FastAPI()
    outer.mount("/reconcile", load_plugin().create_app())
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(outer, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    srv.should_exit = True
    thread.join(10)


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no Chromium at {CHROMIUM}: `apt-get install -y chromium` (Debian; .ci/run does it) "
                    f"or set RECONCILE_TEST_CHROMIUM")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        yield b
        b.close()


@pytest.fixture
def page(browser, server, airflow_db, tmp_path):
    ctx = browser.new_context(viewport={"width": 1300, "height": 900})
    ctx.add_cookies([{"name": "_token", "value": token("stella"), "url": server}])
    pg = ctx.new_page()
    yield pg
    ctx.close()


def shot(pg, tmp_path: Path, name: str) -> None:
    folder = Path(os.environ.get("RECONCILE_SCREENSHOTS") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    pg.screenshot(path=str(folder / f"{name}.png"), full_page=True)


def warehouse(config: Path):
    return duckdb.connect(str(config.parent / "warehouse" / "reconcile.duckdb"), read_only=True)


def test_decide_distinct_from_the_review_queue(page, server, tmp_path, monkeypatch):
    config = fresh_copy(tmp_path / "demo")
    monkeypatch.setenv("RECONCILE_CONFIG", str(config))
    page.goto(f"{server}/reconcile/review")
    assert page.locator("h1").inner_text() == "Review queue"
    page.select_option("select[name=kind]", "candidate")
    page.click("button:has-text('Filter')")
    shot(page, tmp_path, "review-queue")
    first = page.locator("table.queue tr:has-text('may be the same person') a.item").first  # a scored candidate: evidence
    item_id = first.inner_text()
    first.click()
    assert page.locator("table.side-by-side").is_visible()
    assert page.locator("table.evidence").first.is_visible()
    shot(page, tmp_path, "review-item")
    page.fill("input[name=reason]", "different people, same company")
    page.click("#decide-distinct")
    assert "Decision recorded" in page.locator("h1").inner_text()
    con = warehouse(config)
    rows = con.execute("SELECT action, decided_by, reason FROM review.decisions WHERE item_id = ?", [item_id]).fetchall()
    status = con.execute("SELECT status FROM review.items WHERE item_id = ?", [item_id]).fetchone()[0]
    con.close()
    assert rows and {r for r in rows} == {("distinct", "stella", "different people, same company")}
    assert status == "decided"
    page.click("text=back to the item")
    assert page.locator("table.decisions").inner_text().count("distinct") == len(rows)


def test_approve_a_waiting_load_from_the_changes_page(page, server, tmp_path, monkeypatch):
    config = fresh_copy(tmp_path / "demo")
    monkeypatch.setenv("RECONCILE_CONFIG", str(config))
    con = warehouse(config)
    waiting = [t for (t,) in con.execute("SELECT target FROM audit.approvals WHERE run_id = 'ui_night_1' AND required "
                                         "AND decision IS NULL ORDER BY 1").fetchall()]
    con.close()
    assert waiting
    page.goto(f"{server}/reconcile/changes")
    assert page.locator("form.approve").is_visible()
    assert page.locator("table.record").first.is_visible()  # creates show the record to be created
    shot(page, tmp_path, "changes")
    page.fill("input[name=note]", "checked the sample")
    page.click("#approve")
    text = page.locator("main").inner_text()
    assert "approved and loaded by stella" in text, text
    shot(page, tmp_path, "changes-approved")
    con = warehouse(config)
    decisions = con.execute("SELECT target, decision, decided_by, note FROM audit.approvals WHERE run_id = 'ui_night_1' "
                            "AND required ORDER BY 1").fetchall()
    applied = dict(con.execute("SELECT target, count(*) FROM audit.changes WHERE run_id = 'ui_night_1' "
                               "AND status = 'applied' GROUP BY 1").fetchall())
    status = con.execute("SELECT status FROM audit.runs WHERE run_id = 'ui_night_1'").fetchone()[0]
    con.close()
    assert decisions == [(t, "approved", "stella", "checked the sample") for t in waiting]
    assert all(applied.get(t, 0) > 0 for t in waiting), applied  # the load ran
    assert status in ("success", "blocked")
    page.goto(f"{server}/reconcile/changes")
    assert not page.locator("form.approve").count()


def test_run_report_shows_the_volume_plot(page, server, tmp_path, monkeypatch):
    from .ui_demo import demo_config

    monkeypatch.setenv("RECONCILE_CONFIG", str(demo_config()))
    page.goto(f"{server}/reconcile/report")
    assert "ui_night_1" in page.locator("h1").inner_text()
    plots = page.locator("svg.volume")
    assert plots.count() == 3 and plots.first.is_visible()
    assert plots.first.locator("circle").count() >= 1 and plots.first.locator(".band").count() == 0  # first run
    assert page.locator("svg.duplicates").count() == 3
    shot(page, tmp_path, "report")


def test_flow_page_flags_a_write_cycle(page, server, tmp_path, monkeypatch):
    from ..unit.test_flow_and_cli import CYCLE_CONFIG

    config = tmp_path / "cycle.yaml"
    config.write_text(CYCLE_CONFIG)
    monkeypatch.setenv("RECONCILE_CONFIG", str(config))
    page.goto(f"{server}/reconcile/flow")
    problems = page.locator("ul.problems").inner_text()
    assert "write cycle" in problems and "crm.contact.x -> marketing.contacts.y -> crm.contact.x" in problems
    assert page.locator("svg.flow line.bad").count() == 2
    shot(page, tmp_path, "flow-cycle")


def test_pages_render_before_the_first_run(page, server, tmp_path, monkeypatch):
    from reconcile.cli import main

    main(["demo", "init", str(tmp_path / "fresh"), "--people", "20"])
    monkeypatch.setenv("RECONCILE_CONFIG", str(tmp_path / "fresh" / "reconcile.yaml"))
    for path, text in (("review", "No review items yet"), ("changes", "No runs yet"), ("report", "No runs yet")):
        page.goto(f"{server}/reconcile/{path}")
        assert text in page.locator("main").inner_text(), path
    monkeypatch.setenv("RECONCILE_CONFIG", str(tmp_path / "missing.yaml"))
    page.goto(f"{server}/reconcile/review")
    assert "no reconcile config at" in page.locator("main").inner_text()
    shutil.rmtree(tmp_path / "fresh")


def test_without_a_session_the_browser_is_asked_to_log_in(browser, server):
    ctx = browser.new_context()
    pg = ctx.new_page()
    response = pg.goto(f"{server}/reconcile/review")
    assert response.status == 401 and "Please log in" in pg.locator("h1").inner_text()
    ctx.close()
