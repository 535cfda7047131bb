"""Two nights on the demo through the documented CLI: the first applies, the second converges to zero."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import duckdb

from reconcile.demo import init_demo

ROOT = Path(__file__).parents[2]


def cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "include"), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "reconcile.cli", *args], capture_output=True, text=True, env=env,
                          timeout=600)


def test_two_nights_on_the_demo_converge(tmp_path):
    init_demo(tmp_path, people=120, seed=11)
    config = str(tmp_path / "reconcile.yaml")
    assert cli("check-config", config, "--connect").returncode == 0
    first = cli("run", "--config", config, "--json")
    assert first.returncode == 3, first.stderr  # blocked: the shared mailbox is newly held for review
    s1 = json.loads(first.stdout)
    assert set(s1) >= {"run_id", "status", "entity", "extracted", "quarantined", "gates", "identity", "golden",
                       "changes"}
    assert s1["status"] == "blocked" and s1["quarantined"] == {"crm": 1, "erp": 1, "marketing": 1}
    applied = sum(c["applied"] for c in s1["changes"].values())
    assert applied > 50 and all(c["failed"] == 0 for c in s1["changes"].values())
    second = cli("run", "--config", config, "--json")
    s2 = json.loads(second.stdout)
    # nothing new is held: the shared mailbox's holds stand from night 1, no alert
    assert (second.returncode, s2["status"], s2["alert"]) == (0, "success", None), s2.get("reasons")
    assert s2["held_new"] == {} and s2["held_standing"]
    assert sum(c["applied"] for c in s2.get("changes", {}).values()) == 0
    assert sum(c["planned"] - c["held"] for c in s2.get("changes", {}).values()) == 0
    assert s2["gates"]["failed"] == 0  # our own writes are not a volume anomaly
    con = duckdb.connect(s1["warehouse"], read_only=True)
    echoes = con.execute("SELECT count(*) FROM staging.marketing__contact_history WHERE _run_id = ? "
                         "AND _change IN ('update', 'insert')", [s2["run_id"]]).fetchone()[0]
    con.close()
    assert echoes == 0  # every change seen on night two was our own write coming back
    status = cli("status", "--config", config)
    assert status.returncode == 0 and s2["run_id"] in status.stdout
    changes = cli("changes", "--config", config, "--run", s1["run_id"], "--csv", str(tmp_path / "c.csv"))
    assert changes.returncode == 0 and (tmp_path / "c.csv").read_text().count("\n") == sum(
        c["planned"] for c in s1["changes"].values()) + 1
