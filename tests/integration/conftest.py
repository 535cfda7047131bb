"""Airflow environment and fixtures for end-to-end DAG runs (`dag.test()`).

Airflow reads AIRFLOW_HOME and its config when it is first imported, so its throwaway home is set up here at
conftest import (`airflow_test_env`), before any test imports airflow.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from ..conftest import DAGS_FOLDER, airflow_test_env

AIRFLOW_HOME = airflow_test_env()


@pytest.fixture(scope="session")
def airflow_db() -> str:
    """A migrated SQLite metadata DB in the throwaway AIRFLOW_HOME (in-process: no second interpreter start)."""
    from airflow.configuration import conf
    from airflow.utils import db

    url = conf.get("database", "sql_alchemy_conn")
    # Refuse to touch anything but our own throwaway database (airflow may have been imported too early).
    assert url == f"sqlite:///{AIRFLOW_HOME}/airflow.db", f"refusing to migrate {url}"
    db.upgradedb()
    return url


@pytest.fixture
def dags_for(monkeypatch):
    """dags_for(config) -> {dag_id: DAG} parsed from our dags folder with RECONCILE_CONFIG=config.

    The variable stays set for the whole test, because dag.test() re-parses the folder to record the DAG."""
    from airflow.dag_processing.dagbag import BundleDagBag

    def _dags(config: Path) -> dict:
        monkeypatch.setenv("RECONCILE_CONFIG", str(config))
        # A bundle DagBag, as the dag processor and dag.test() use: the dags folder is on sys.path.
        bag = BundleDagBag(dag_folder=str(DAGS_FOLDER), bundle_path=DAGS_FOLDER)
        assert not bag.import_errors, bag.import_errors
        return bag.dags

    return _dags
