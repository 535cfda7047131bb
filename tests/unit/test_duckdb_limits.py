"""`duckdb:` settings: every DuckDB database reconcile opens is bounded by the config's memory limit and
spills into the state folder (never the current directory), so a million-record night cannot take the
whole machine."""
from __future__ import annotations

import pytest
import yaml

import reconcile
from reconcile.config import load_config
from reconcile.errors import ReconcileError
from reconcile.warehouse import connect, open_published, open_work

from ..conftest import BASE_CONFIG


def _config(project, **duckdb):
    data = yaml.safe_load(BASE_CONFIG)
    if duckdb:
        data["duckdb"] = duckdb
    (project / "reconcile.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    return load_config(project / "reconcile.yaml")


def _settings(con) -> tuple:
    return con.execute("SELECT current_setting('memory_limit'), current_setting('temp_directory'), "
                       "current_setting('threads')").fetchone()


def test_default_is_a_quarter_of_memory_spilling_into_the_state_folder(project, monkeypatch):
    monkeypatch.delenv("RECONCILE_DUCKDB_MEMORY_LIMIT", raising=False)
    cfg = _config(project)
    assert cfg.duckdb_settings()["memory_limit"] == "25%"
    with open_work(cfg) as con:
        limit, spill, _ = _settings(con)
    with connect(cfg) as private:
        assert _settings(private)[0] == limit
    assert spill == str(cfg.state_dir / "tmp") and (cfg.state_dir / "tmp").is_dir()
    import duckdb

    assert limit != duckdb.connect().execute("SELECT current_setting('memory_limit')").fetchone()[0]


def test_configured_limit_and_threads_reach_the_working_and_published_databases(project, monkeypatch):
    monkeypatch.delenv("RECONCILE_DUCKDB_MEMORY_LIMIT", raising=False)
    cfg = _config(project, memory_limit="300MB", threads=1, temp_directory="spill")
    reconcile.run(cfg)
    with open_work(cfg) as con:
        assert _settings(con) == ("286.1 MiB", str(project / "spill"), 1)
    con = open_published(cfg)
    try:
        assert _settings(con)[0] == "286.1 MiB"
    finally:
        con.close()


def test_a_query_bigger_than_the_limit_spills_instead_of_failing(project, monkeypatch):
    monkeypatch.delenv("RECONCILE_DUCKDB_MEMORY_LIMIT", raising=False)
    cfg = _config(project, memory_limit="64MB", threads=1)
    # ~4M rows sorted by a hash: far more sort state than 64 MB.
    big = ("SELECT count(*), count(DISTINCT h) FROM (SELECT i, md5(i::VARCHAR) AS h FROM range(4000000) t(i) "
           "ORDER BY h) s")
    import duckdb

    with connect(cfg) as con:
        assert con.execute(big).fetchone() == (4_000_000, 4_000_000)
    # The same limit with nowhere to spill: the query cannot run.
    with duckdb.connect(config={"memory_limit": "64MB", "threads": 1, "temp_directory": ""}) as con:
        with pytest.raises(duckdb.OutOfMemoryException):
            con.execute(big)


def test_the_environment_wins_and_a_bad_value_names_the_variable(project, monkeypatch):
    cfg = _config(project, memory_limit="2GB")
    monkeypatch.setenv("RECONCILE_DUCKDB_MEMORY_LIMIT", "1GB")
    with connect(cfg) as con:
        assert _settings(con)[0] == "953.6 MiB"
    monkeypatch.setenv("RECONCILE_DUCKDB_MEMORY_LIMIT", "lots")
    with pytest.raises(ReconcileError, match="RECONCILE_DUCKDB_MEMORY_LIMIT='lots'"):
        connect(cfg)


def test_a_bad_configured_limit_is_refused_with_its_key(project):
    data = yaml.safe_load(BASE_CONFIG)
    data["duckdb"] = {"memory_limit": "half"}
    (project / "reconcile.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    with pytest.raises(ReconcileError, match="duckdb.memory_limit"):
        load_config(project / "reconcile.yaml")
