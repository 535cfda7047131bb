"""Run storage on S3 (`runs_url: s3://bucket/prefix`), against moto's S3 server: a local HTTP server that
behaves like S3 (status codes, paging, no folders, copy + delete for a move).

The endpoint and credentials reach every process the way a deployment passes them: the standard AWS_*
environment variables (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...), never the config. "Worker A" is a separate
process with its own checkout that extracts; "worker B" (this process) holds the warehouse, stages, runs the
rest of the pipeline, publishes and prunes. What is on S3 is checked with boto3, not through the code under test.
"""
from __future__ import annotations

import json
import os
import signal
import time
from datetime import datetime

import boto3
import httpx
import duckdb
import pytest

from reconcile import runner
from reconcile.config import load_config
from reconcile.runstore import RunFolder

from .test_runstore import RUN, T0, _config, _worker

BUCKET = "reconcile-runs"
PREFIX = "nightly/runs"


@pytest.fixture
def s3(monkeypatch):
    """A fresh S3 server for the test; its address and test credentials in the environment (inherited by the
    worker processes). Returns a boto3 client to look at the bucket independently."""
    from moto.server import ThreadedMotoServer
    from s3fs import S3FileSystem

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE",
                "RECONCILE_RUNS_URL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://{host}:{port}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test-key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test-secret")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    S3FileSystem.clear_instance_cache()  # an instance of an earlier test would talk to its (stopped) server
    client = boto3.client("s3")
    client.create_bucket(Bucket=BUCKET)
    yield client
    S3FileSystem.clear_instance_cache()
    httpx.post(f"http://{host}:{port}/moto-api/reset")  # moto keeps buckets per Python process, not per server
    server.stop()


def _keys(client, prefix: str = PREFIX) -> list[str]:
    """Every key under `prefix`, through S3's paged listing (2 keys a page: paging is exercised)."""
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=f"{prefix}/",
                                                             PaginationConfig={"PageSize": 2})
    return sorted(o["Key"][len(prefix) + 1:] for page in pages for o in page.get("Contents", []))


def _published(cfg, sql: str) -> list[tuple]:
    con = duckdb.connect(str(cfg.warehouse_path), read_only=True)
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


@pytest.mark.slow  # worker processes
def test_run_storage_on_s3_extract_on_worker_a_staged_published_and_pruned_by_worker_b(project, tmp_path, s3):
    url = f"s3://{BUCKET}/{PREFIX}"
    config_b = _config(project, url, project / "systems")
    config_a = _config(tmp_path / "worker-a", url, project / "systems")
    cfg = load_config(config_b)
    assert cfg.runs_location == url and not RunFolder(cfg, RUN, "contact").is_local

    # Folders of earlier runs: five of contact (oldest first) and two of another entity, written by others.
    old = [f"scheduled__2026-01-{d:02d}T02_00_00_00_00" for d in range(25, 30)]
    for run in old:
        s3.put_object(Bucket=BUCKET, Key=f"{PREFIX}/{run}/contact/crm.parquet", Body=b"old")
        time.sleep(0.05)  # S3 keeps LastModified to the millisecond
    for run in old[:2]:
        s3.put_object(Bucket=BUCKET, Key=f"{PREFIX}/{run}/account/erp.parquet", Body=b"other entity")

    runner.begin_run(cfg, "contact", RUN, T0)
    folder = RunFolder(cfg, RUN, "contact")
    assert folder.names() == ["manifest.json"]  # worker B has looked at the folder before worker A writes

    for system in ("crm", "marketing"):
        proc = _worker(config_a, system)
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err[-2000:]
        result = json.loads(out.strip().splitlines()[-1])
        assert result["path"] == f"{url}/manual__2026-02-01T02_00_00_00_00/contact/{system}.parquet"
    assert not load_config(config_a).warehouse_path.parent.exists()  # worker A opened no warehouse
    assert not (cfg.state_dir / "runs").exists()  # nothing went to a local run folder

    staged = runner.load_staging(cfg, "contact", RUN)
    assert {s: r["staged"] for s, r in staged.items()} == {"crm": 3, "marketing": 2}
    for system in ("crm", "marketing"):
        runner.validate_system(cfg, "contact", system, RUN)
    for stage in ("apply_gates", "resolve_identity", "build_golden", "guard_collisions", "plan_changes",
                  "purge_erased"):
        getattr(runner, stage)(cfg, "contact", RUN)
    summary = runner.finish_run(cfg, "contact", RUN)
    assert summary["status"] == "dry_run", summary

    run = "manual__2026-02-01T02_00_00_00_00/contact/"
    assert [k[len(run):] for k in _keys(s3) if k.startswith(run)] == [
        "crm.parquet", "gates_crm.json", "gates_marketing.json", "manifest.json", "marketing.parquet"]
    # Published for analysts, from what worker A extracted.
    assert _published(cfg, "SELECT run_id, status FROM audit.runs") == [(RUN, "dry_run")]
    assert _published(cfg, "SELECT count(*) FROM golden.contact") == [(4,)]  # anna (both), bo, cy, dee
    # Retention: the current run and the newest four older contact folders are kept; the other entity's stay.
    assert _keys(s3) == sorted(
        [f"{r}/contact/crm.parquet" for r in old[1:]] + [f"{r}/account/erp.parquet" for r in old[:2]]
        + [run + n for n in ("crm.parquet", "gates_crm.json", "gates_marketing.json", "manifest.json",
                             "marketing.parquet")])


@pytest.mark.slow  # worker processes
def test_s3_extract_killed_mid_write_then_retried_on_another_worker_stages_exactly_once(project, tmp_path, s3):
    url = f"s3://{BUCKET}/{PREFIX}"
    cfg = load_config(_config(project, url, project / "systems", batch_size=1))
    runner.begin_run(cfg, "contact", RUN, T0)

    # Worker A writes the first batch of the CRM's three rows, then is killed (SIGKILL: no cleanup runs).
    stall = tmp_path / "a-stalled"
    proc = _worker(_config(tmp_path / "worker-a", url, project / "systems", batch_size=1), "crm", stall)
    deadline = time.monotonic() + 120
    while not stall.exists():
        assert proc.poll() is None, proc.stderr.read()[-2000:]
        assert time.monotonic() < deadline, "worker A never wrote its first batch"
        time.sleep(0.1)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert _keys(s3) == ["manual__2026-02-01T02_00_00_00_00/contact/manifest.json"]  # no extract, whole or part
    with pytest.raises(Exception, match="extract of 'crm' .* is missing"):
        runner.load_staging(cfg, "contact", RUN)

    # The retry runs on worker C (another checkout) and completes; load_staging runs, and is retried too.
    for system in ("crm", "marketing"):
        retry = _worker(_config(tmp_path / "worker-c", url, project / "systems", batch_size=1), system)
        _, err = retry.communicate(timeout=120)
        assert retry.returncode == 0, err[-2000:]
    first = runner.load_staging(cfg, "contact", RUN)
    again = runner.load_staging(cfg, "contact", RUN)
    assert first == again and first["crm"]["staged"] == 3 and first["marketing"]["staged"] == 2
    runner.finish_run(cfg, "contact", RUN)
    assert _published(cfg, "SELECT _record_key, count(*) FROM staging.crm__contact_history GROUP BY 1 ORDER BY 1") \
        == [("c1", 1), ("c2", 1), ("c3", 1)]
    assert _published(cfg, "SELECT count(*) FROM audit.stage_runs WHERE stage = 'extract'") == [(1,)]


def test_s3_files_are_replaced_whole_and_read_back(tmp_path, s3):
    """The rewrite paths erasure uses (`replacing` a Parquet extract, `rewrite_text` of a gate file) on S3."""
    cfg = load_config(_config(tmp_path / "p", f"s3://{BUCKET}/{PREFIX}", tmp_path))
    folder = RunFolder(cfg, RUN, "contact")
    folder.write_json("gates_crm.json", {"sample": ["anna@example.com", "bo@example.com"]})
    with folder.replacing("crm.parquet") as local:
        duckdb.sql(f"COPY (SELECT 'c1' AS contactid) TO '{local}' (FORMAT parquet)")

    assert folder.rewrite_text("gates_crm.json", lambda t: t.replace("anna@example.com", "[erased]")) == 1
    assert folder.rewrite_text("gates_crm.json", lambda t: t) == 0  # unchanged: not written again
    assert folder.read_json("gates_crm.json") == {"sample": ["[erased]", "bo@example.com"]}
    with folder.local("crm.parquet") as path:
        assert duckdb.sql(f"SELECT contactid FROM read_parquet('{path}')").fetchall() == [("c1",)]
    assert _keys(s3) == [f"manual__2026-02-01T02_00_00_00_00/contact/{n}" for n in ("crm.parquet", "gates_crm.json")]
