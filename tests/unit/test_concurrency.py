"""Parallel extraction never contends for the DuckDB file; analysts reading the warehouse never break a run."""
from __future__ import annotations

import multiprocessing as mp
from datetime import datetime

import duckdb

from reconcile import runner
from reconcile.config import load_config

T0 = datetime(2026, 2, 1, 2)


def _extract(config_path: str, system: str, barrier) -> tuple[str, int]:
    cfg = load_config(config_path)
    barrier.wait(timeout=60)  # start both extractions at the same moment
    return system, runner.extract_system(cfg, "contact", system, "r1")["rows"]


def _validate(config_path: str, system: str, barrier) -> tuple[str, list]:
    cfg = load_config(config_path)
    barrier.wait(timeout=60)
    return system, runner.validate_system(cfg, "contact", system, "r1")["errors"]


def test_extractions_and_validations_run_concurrently_in_separate_processes(project):
    cfg = load_config(project / "reconcile.yaml")
    runner.begin_run(cfg, "contact", "r1", T0)
    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager:
        barrier = manager.Barrier(2)
        with ctx.Pool(2) as pool:
            results = pool.starmap(_extract, [(str(project / "reconcile.yaml"), s, barrier) for s in ("crm", "marketing")])
    assert sorted(results) == [("crm", 3), ("marketing", 2)]
    staged = runner.load_staging(cfg, "contact", "r1")
    assert {s: r["staged"] for s, r in staged.items()} == {"crm": 3, "marketing": 2}
    # validation only reads the warehouse: both tables validate at once, sharing the lock
    with ctx.Manager() as manager:
        barrier = manager.Barrier(2)
        with ctx.Pool(2) as pool:
            checked = pool.starmap(_validate, [(str(project / "reconcile.yaml"), s, barrier) for s in ("crm", "marketing")])
    assert sorted(checked) == [("crm", []), ("marketing", [])]
    runner.apply_gates(cfg, "contact", "r1")
    assert runner.finish_run(cfg, "contact", "r1")["status"] == "success"


def test_analyst_holding_the_warehouse_open_neither_breaks_the_run_nor_sees_it_half_done(project):
    import sqlite3

    cfg = load_config(project / "reconcile.yaml")
    runner.run_entity(cfg, "contact", run_id="r1", run_at=T0)
    analyst = duckdb.connect(str(cfg.warehouse_path), read_only=True)
    before = analyst.execute("SELECT count(*) FROM staging.crm__contact").fetchone()[0]

    con = sqlite3.connect(project / "systems" / "crm.db")
    con.execute("INSERT INTO contact VALUES ('c9', 'new@example.com', 'Nia', NULL, 'Customer', 0, '2026-01-21 10:00:00')")
    con.commit()
    con.close()
    summary = runner.run_entity(cfg, "contact", run_id="r2", run_at=datetime(2026, 2, 2, 2))
    assert summary["status"] == "dry_run"

    # The open session keeps its consistent snapshot of the last finished run ...
    assert analyst.execute("SELECT count(*) FROM staging.crm__contact").fetchone()[0] == before == 3
    assert analyst.execute("SELECT count(*) FROM audit.runs").fetchone()[0] == 1
    analyst.close()
    # ... and reopening shows the new finished run, never a running one.
    fresh = duckdb.connect(str(cfg.warehouse_path), read_only=True)
    assert fresh.execute("SELECT count(*) FROM staging.crm__contact").fetchone()[0] == 4
    assert fresh.execute("SELECT run_id, status FROM audit.runs ORDER BY run_id").fetchall() == [
        ("r1", "dry_run"), ("r2", "dry_run")]
    fresh.close()
