"""Run storage (`runs_url`): extracts handed from one worker to another through a shared location.

Workers are real processes: "worker A" extracts with its own copy of the config (its own checkout, its own
warehouse path that it never creates), "worker B" holds the warehouse and stages. A `file://` URL in a separate
folder stands for shared storage across processes; `memory://` (one process) exercises the non-local path
(files downloaded before DuckDB reads them, moved into place whole).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from datetime import datetime
from pathlib import Path

import duckdb
import pytest

from reconcile import runner
from reconcile.config import load_config
from reconcile.runstore import RunFolder, prune

from ..conftest import write_base_config

T0 = datetime(2026, 2, 1, 2, 0, 0)
RUN = "manual__2026-02-01T02:00:00+00:00"


def _config(folder: Path, runs_url: str, systems: Path, batch_size: int | None = None) -> Path:
    """reconcile.yaml in `folder`: the systems in `systems` (shared), its own warehouse, the given runs_url."""
    return write_base_config(folder, runs_url=runs_url, systems_dir=systems, crm_batch_size=batch_size)


WORKER = """
import json, os, sys, time
from reconcile import runner
from reconcile.config import load_config

config, system, run_id, stall = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]

def progress(msg):
    if stall != "-" and "rows read" in msg:  # the first batch is written: die here when killed
        open(stall, "w").close()
        time.sleep(600)

print(json.dumps(runner.extract_system(load_config(config), "contact", system, run_id, progress=progress)))
"""


def _worker(config: Path, system: str, stall: Path | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", WORKER, str(config), system, RUN, str(stall or "-")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _staged(cfg, sql: str) -> list[tuple]:
    con = duckdb.connect(str(cfg.warehouse_path), read_only=True)
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


def test_default_run_storage_is_the_state_folder(project, monkeypatch):
    monkeypatch.delenv("RECONCILE_RUNS_URL", raising=False)
    cfg = load_config(project / "reconcile.yaml")
    assert cfg.runs_location == str(cfg.state_dir / "runs")
    monkeypatch.setenv("RECONCILE_RUNS_URL", "s3://bucket/reconcile/runs")  # the deployment's choice wins
    assert cfg.runs_location == "s3://bucket/reconcile/runs"


def test_relative_runs_url_resolves_against_the_config(tmp_path, monkeypatch):
    monkeypatch.delenv("RECONCILE_RUNS_URL", raising=False)
    cfg = load_config(_config(tmp_path / "conf", "shared/runs", tmp_path))
    assert cfg.runs_location == str(tmp_path / "conf" / "shared" / "runs")


@pytest.mark.slow  # worker processes
def test_extract_on_worker_a_is_staged_by_worker_b(project, tmp_path, monkeypatch):
    monkeypatch.delenv("RECONCILE_RUNS_URL", raising=False)
    shared = tmp_path / "shared-storage" / "runs"
    config_b = _config(project, f"file://{shared}", project / "systems")
    config_a = _config(tmp_path / "worker-a", f"file://{shared}", project / "systems")
    cfg = load_config(config_b)
    runner.begin_run(cfg, "contact", RUN, T0)

    results = {}
    for system in ("crm", "marketing"):
        proc = _worker(config_a, system)
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err[-2000:]
        results[system] = json.loads(out.strip().splitlines()[-1])
    assert results["crm"]["rows"] == 3 and results["marketing"]["rows"] == 2
    assert results["crm"]["path"] == str(shared / "manual__2026-02-01T02_00_00_00_00" / "contact" / "crm.parquet")
    # Worker A never opened a warehouse: nothing exists where its config puts one.
    assert not load_config(config_a).warehouse_path.parent.exists()
    assert not (cfg.state_dir / "runs").exists()  # nothing went to worker B's local run folder either

    staged = runner.load_staging(cfg, "contact", RUN)
    assert {s: r["staged"] for s, r in staged.items()} == {"crm": 3, "marketing": 2}


@pytest.mark.slow  # worker processes
def test_extract_killed_mid_write_then_retried_on_another_worker_stages_exactly_once(project, tmp_path,
                                                                                   monkeypatch):
    monkeypatch.delenv("RECONCILE_RUNS_URL", raising=False)
    shared = tmp_path / "shared-storage" / "runs"
    config_b = _config(project, f"file://{shared}", project / "systems", batch_size=1)
    cfg = load_config(config_b)
    runner.begin_run(cfg, "contact", RUN, T0)
    folder = RunFolder(cfg, RUN, "contact")

    # Worker A writes the first batch of the CRM's three rows, then is killed (SIGKILL: no cleanup runs).
    stall = tmp_path / "a-stalled"
    proc = _worker(_config(tmp_path / "worker-a", f"file://{shared}", project / "systems", batch_size=1), "crm", stall)
    deadline = time.monotonic() + 120
    while not stall.exists():
        assert proc.poll() is None, proc.stderr.read()[-2000:]
        assert time.monotonic() < deadline, "worker A never wrote its first batch"
        time.sleep(0.1)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    leftovers = sorted(p.name for p in Path(folder.root).iterdir())
    assert not folder.exists("crm.parquet"), "a killed extract must leave no file that staging reads"
    assert [n for n in leftovers if n.startswith(".crm.parquet.")], leftovers  # only its temporary file

    # Staging now refuses, naming the missing extract, and changes nothing.
    with pytest.raises(Exception, match="extract of 'crm' .* is missing"):
        runner.load_staging(cfg, "contact", RUN)

    # The retry runs on worker C (another checkout), completes; then load_staging runs, and is retried too.
    for system in ("crm", "marketing"):
        retry = _worker(_config(tmp_path / "worker-c", f"file://{shared}", project / "systems", batch_size=1), system)
        _, err = retry.communicate(timeout=120)
        assert retry.returncode == 0, err[-2000:]
    first = runner.load_staging(cfg, "contact", RUN)
    again = runner.load_staging(cfg, "contact", RUN)
    assert first == again and first["crm"]["staged"] == 3
    runner.finish_run(cfg, "contact", RUN)

    assert _staged(cfg, "SELECT _record_key FROM staging.crm__contact ORDER BY 1") == [("c1",), ("c2",), ("c3",)]
    assert _staged(cfg, "SELECT _record_key, count(*) FROM staging.crm__contact_history GROUP BY 1 ORDER BY 1") == [
        ("c1", 1), ("c2", 1), ("c3", 1)]
    assert _staged(cfg, "SELECT count(*) FROM audit.stage_runs WHERE stage = 'extract'") == [(1,)]


def test_non_local_storage_is_downloaded_for_staging_and_pruned(project, monkeypatch):
    # memory:// lives in this process only, which is enough to exercise the non-local code path end to end.
    import fsspec

    monkeypatch.delenv("RECONCILE_RUNS_URL", raising=False)
    fs = fsspec.filesystem("memory")
    fs.rm("/reconcile-test", recursive=True) if fs.exists("/reconcile-test") else None
    cfg = load_config(_config(project, "memory://reconcile-test/runs", project / "systems"))
    assert not RunFolder(cfg, RUN, "contact").is_local

    runner.begin_run(cfg, "contact", RUN, T0)
    for system in ("crm", "marketing"):
        runner.extract_system(cfg, "contact", system, RUN)
    staged = runner.load_staging(cfg, "contact", RUN)

    assert {s: r["staged"] for s, r in staged.items()} == {"crm": 3, "marketing": 2}
    folder = RunFolder(cfg, RUN, "contact")
    assert folder.url("crm.parquet") == "memory:///reconcile-test/runs/manual__2026-02-01T02_00_00_00_00/contact/crm.parquet"
    assert sorted(n.rsplit("/", 1)[-1] for n in fs.ls(folder.root, detail=False)) == [
        "crm.parquet", "manifest.json", "marketing.parquet"]
    for i in range(6):  # older runs' folders: only the newest few of the entity are kept
        RunFolder(cfg, f"r{i}", "contact").write_json("manifest.json", {"i": i})
        time.sleep(0.01)  # memory:// records creation times
    prune(cfg, "contact", keep=3, current_run_id=RUN)
    kept = sorted(p.rsplit("/", 1)[-1] for p in fs.ls("/reconcile-test/runs", detail=False))
    assert kept == ["manual__2026-02-01T02_00_00_00_00", "r4", "r5"]


def test_prune_keeps_other_entities_and_the_current_run(tmp_path, monkeypatch):
    monkeypatch.delenv("RECONCILE_RUNS_URL", raising=False)
    cfg = load_config(_config(tmp_path / "p", str(tmp_path / "runs"), tmp_path))
    for i in range(4):
        for entity in ("contact", "account"):
            folder = RunFolder(cfg, f"r{i}", entity)
            folder.write_json("manifest.json", {"i": i})
            os.utime(Path(folder.path("manifest.json")), (1_000_000 + i, 1_000_000 + i))
    prune(cfg, "contact", keep=2, current_run_id="r0")  # r0 is the oldest, but it is running: kept
    left = sorted(str(p.relative_to(tmp_path / "runs")) for p in (tmp_path / "runs").glob("*/*"))
    assert left == ["r0/account", "r0/contact", "r1/account", "r2/account", "r3/account", "r3/contact"]
