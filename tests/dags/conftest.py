"""Airflow environment and fixtures for the DAG integrity tests.

Airflow reads AIRFLOW_HOME and its config when it is first imported, so its throwaway home is set up here at
conftest import (`airflow_test_env`), before any test module imports airflow.
"""
from __future__ import annotations

import atexit
import shutil
import sys
import tempfile
from functools import cache
from pathlib import Path

import pytest

from tests.conftest import DAGS_FOLDER, REPO, airflow_test_env  # tests/dags is not a package

DAG_FILE = DAGS_FOLDER / "reconcile_dags.py"
AIRFLOW_HOME = airflow_test_env()
# The dag processor and the task runner put the DAG bundle's folder on sys.path; tests import the DAG file's
# helper modules (reconcile_alerts, reconcile_approval) the same way.
if str(DAGS_FOLDER) not in sys.path:
    sys.path.append(str(DAGS_FOLDER))


def _parse_dags(config: Path | str | None, monkeypatch: pytest.MonkeyPatch):
    # As the dag processor parses: a bundle DagBag puts the dags folder on sys.path, so the DAG file imports
    # its helper modules (reconcile_alerts, reconcile_approval) from beside it.
    from airflow.dag_processing.dagbag import BundleDagBag

    if config is None:
        monkeypatch.delenv("RECONCILE_CONFIG", raising=False)
    else:
        monkeypatch.setenv("RECONCILE_CONFIG", str(config))
    return BundleDagBag(dag_folder=str(DAGS_FOLDER), bundle_path=DAGS_FOLDER)


@pytest.fixture
def parse_dags(monkeypatch):
    """parse_dags(config) -> a DagBag of our dags folder parsed with RECONCILE_CONFIG=config (unset when None).

    Needs no metadata DB: parsing must never touch one."""
    return lambda config: _parse_dags(config, monkeypatch)


@cache
def demo_dag_bag():
    """(DagBag, config path) for a generated demo of 40 people; built once, also at collection time."""
    from reconcile.demo import init_demo

    root = tempfile.mkdtemp(prefix="reconcile-test-demo-")
    atexit.register(shutil.rmtree, root, True)
    config = Path(init_demo(root, people=40)["config"])
    with pytest.MonkeyPatch.context() as mp:
        return _parse_dags(config, mp), config


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    # One test per DAG, named by the file that defines it (astro-cli's Airflow 3 integrity-test idiom).
    if "dag_id" in metafunc.fixturenames:
        bag, _ = demo_dag_bag()
        ids = sorted(bag.dag_ids)
        metafunc.parametrize(
            "dag_id", ids, ids=[f"{Path(bag.dags[d].fileloc).relative_to(REPO)}::{d}" for d in ids])


@pytest.fixture(scope="session")
def dag_bag():
    return demo_dag_bag()[0]


@pytest.fixture(scope="session")
def demo_config() -> Path:
    return demo_dag_bag()[1]
