"""A demo warehouse for the UI tests (plugin API, browser, report), built once per test session.

`reconcile demo init` with 60 people, its change thresholds lowered so that night 1's loads wait for
approval (the changes page has something to approve), then one `reconcile run`: review items, gate outcomes,
trends and a waiting load, through the real CLI. Also the Airflow auth setup the plugin needs: the auth manager
initialised and JWTs signed by it, as Airflow's login would issue them.
"""
from __future__ import annotations

import functools
import importlib.util
import shutil
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PLUGIN_FILE = REPO / "plugins" / "reconcile_plugin.py"


@functools.cache
def demo_config() -> Path:
    from reconcile.cli import main

    root = Path(tempfile.mkdtemp(prefix="reconcile-ui-demo-"))
    import atexit

    atexit.register(shutil.rmtree, root, True)
    assert main(["demo", "init", str(root), "--people", "60", "--seed", "11"]) == 0
    config = root / "reconcile.yaml"
    text = config.read_text()
    assert "create: {max_share: 0.5}" in text and "update: {max_share: 0.5}" in text
    config.write_text(text.replace("create: {max_share: 0.5}", "create: {max_share: 0.01}")
                      .replace("update: {max_share: 0.5}", "update: {max_share: 0.01}"))
    assert main(["run", "--config", str(config), "--run-id", "ui_night_1"]) == 3  # awaiting approval
    return config


def fresh_copy(dest: Path) -> Path:
    """A private copy of the demo (a test that writes must not disturb the others)."""
    src = demo_config().parent
    shutil.copytree(src, dest, symlinks=True)
    return dest / "reconcile.yaml"


def load_plugin():
    """plugins/reconcile_plugin.py, imported from its file as Airflow's plugin manager does."""
    spec = importlib.util.spec_from_file_location("reconcile_plugin", PLUGIN_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def auth_manager():
    """Airflow's configured auth manager (SimpleAuthManager here), initialised as the api-server does."""
    from airflow.api_fastapi.app import create_auth_manager

    am = create_auth_manager()
    am.init()
    return am


def token(username: str, role: str = "admin") -> str:
    """A JWT for a SimpleAuthManager user, signed like the one the UI login sets in the `_token` cookie."""
    from airflow.api_fastapi.auth.managers.simple.user import SimpleAuthManagerUser

    return auth_manager().generate_jwt(SimpleAuthManagerUser(username=username, role=role))
