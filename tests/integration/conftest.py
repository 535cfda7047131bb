"""Airflow environment and fixtures for end-to-end DAG runs (`dag.test()`).

Airflow reads AIRFLOW_HOME and its config when it is first imported, so this runs at conftest import: a
throwaway AIRFLOW_HOME with its own SQLite metadata DB (never the project's `.airflow` that `make` exports,
never a database configured in the caller's shell), our dags folder, no examples. tests/dags/conftest.py does
the same; both share one home through _RECONCILE_TEST_AIRFLOW_HOME so they can run in one pytest session.
"""
from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DAGS_FOLDER = REPO / "dags"


def _airflow_test_env() -> str:
    home = os.environ.get("_RECONCILE_TEST_AIRFLOW_HOME")
    if not home:
        home = tempfile.mkdtemp(prefix="reconcile-test-airflow-")
        os.environ["_RECONCILE_TEST_AIRFLOW_HOME"] = home
        atexit.register(shutil.rmtree, home, True)
    os.environ.update({
        "AIRFLOW_HOME": home,
        "AIRFLOW__CORE__DAGS_FOLDER": str(DAGS_FOLDER),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home}/airflow.db",
    })
    return home


AIRFLOW_HOME = _airflow_test_env()


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
