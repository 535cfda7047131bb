"""A real distributed run: Airflow 3 with the CeleryExecutor on this machine's Redis and PostgreSQL.

Starts a scheduler, a dag-processor, an api-server, a triggerer and two Celery workers: `warehouse`, serving
the config's `queues.warehouse`, and `general`, serving Airflow's default queue. Extracts hand their Parquet
files to the warehouse worker through a separate run storage folder given as a `file://` URL
(`RECONCILE_RUNS_URL`), and the warehouse worker hands the loads their change sets the same way. The test
triggers `reconcile_contact` on a demo deployment through the REST API (a JWT from /auth/token), waits for
it, and checks that the extracts and the loads ran on the general worker and everything else on the
warehouse worker (task instances' hostnames and queues) and the warehouse's state; then
triggers contact's second run and a second entity's DAG (`reconcile_lead`, a dry run) together: both finish,
contact converges (nothing left to write) and lead is staged in full. The OpenLineage provider's file
transport records every task's events: they carry the systems and warehouse tables as datasets. Everything it
started is stopped, and its metadata database dropped, at the end.

Isolation on a shared machine: a metadata database of its own (`airflow_ci_<random>`), queue names of its
own on the broker, free ports. Skipped, with the reason, when Redis or PostgreSQL is not reachable.
"""
from __future__ import annotations

import copy
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import duckdb
import httpx
import pytest
import yaml

from reconcile.config import load_config
from reconcile.demo import QUARANTINE_EXPECTED, init_demo, read_answer_key

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
REDIS = ("127.0.0.1", 6379)
POSTGRES = ("127.0.0.1", 5432)
ADMIN_DSN = os.environ.get("RECONCILE_TEST_POSTGRES_DSN", "postgresql+psycopg2://postgres@127.0.0.1:5432/test")
RUN_TIMEOUT = 900  # seconds for one DAG run on a loaded 2-core machine


def _reachable(address: tuple[str, int]) -> bool:
    try:
        socket.create_connection(address, timeout=3).close()
        return True
    except OSError:
        return False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def metadata_db():
    """A PostgreSQL database of its own for Airflow's metadata and Celery's results; dropped afterwards."""
    if not _reachable(POSTGRES):
        pytest.skip(f"PostgreSQL is not reachable on {POSTGRES[0]}:{POSTGRES[1]}: the Celery run needs it "
                    f"for Airflow's metadata DB")
    if not _reachable(REDIS):
        pytest.skip(f"Redis is not reachable on {REDIS[0]}:{REDIS[1]}: the Celery run needs it as broker")
    import sqlalchemy as sa

    name = f"airflow_ci_{secrets.token_hex(4)}"
    admin = sa.create_engine(ADMIN_DSN, isolation_level="AUTOCOMMIT")
    with admin.connect() as con:
        con.execute(sa.text(f'CREATE DATABASE "{name}"'))
    base = ADMIN_DSN.rsplit("/", 1)[0]
    try:
        yield f"{base}/{name}"
    finally:
        with admin.connect() as con:
            con.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


class Cluster:
    """The Airflow processes of the run, each logging to its own file; stopped (group-wide) on exit."""

    def __init__(self, home: Path, env: dict[str, str]):
        self.home, self.env, self.procs = home, env, {}

    def start(self, name: str, *args: str, **extra_env: str) -> None:
        log = open(self.home / f"{name}.log", "w")
        self.procs[name] = subprocess.Popen([str(BIN / "airflow"), *args], env={**self.env, **extra_env},
                                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def check_alive(self) -> None:
        for name, proc in self.procs.items():
            assert proc.poll() is None, f"{name} exited ({proc.returncode}):\n{self.tail(name)}"

    def tail(self, name: str, lines: int = 40) -> str:
        return "\n".join((self.home / f"{name}.log").read_text(errors="replace").splitlines()[-lines:])

    def tails(self) -> str:
        return "\n".join(f"--- {n}.log ---\n{self.tail(n)}" for n in self.procs)

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 60
        for proc in self.procs.values():
            try:
                proc.wait(timeout=max(1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)


def _wait(what: str, check, cluster: Cluster, timeout: float, every: float = 2.0):
    deadline = time.monotonic() + timeout
    while True:
        cluster.check_alive()
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}\n{cluster.tails()}")
        time.sleep(every)


def _quietly(fn):
    """fn() or None while the API server is still starting."""
    try:
        return fn()
    except httpx.HTTPError:
        return None


def test_celery_run_spreads_tasks_over_two_workers_and_converges(metadata_db, tmp_path):
    home = tmp_path / "airflow"
    home.mkdir()
    demo = tmp_path / "demo"
    config = Path(init_demo(demo, people=40)["config"])
    suffix = secrets.token_hex(3)
    warehouse_queue, general_queue = f"ci_warehouse_{suffix}", f"ci_general_{suffix}"
    # No schedule: unpausing would otherwise start the latest scheduled run at once; only our triggers run.
    # A second entity, `lead`, read from the same systems: its DAG runs at the same time as contact's second.
    data = yaml.safe_load(config.read_text())
    data["schedule"] = None
    data["queues"] = {"warehouse": warehouse_queue}
    data["entities"]["lead"] = copy.deepcopy(data["entities"]["contact"])
    config.write_text(yaml.safe_dump(data, sort_keys=False))
    lineage_file = tmp_path / "openlineage.jsonl"
    runs = tmp_path / "shared-runs"
    # Task instances record the hostname of the worker that ran them: one name per worker process.
    (home / "ci_hostname.py").write_text("import os\n\ndef name():\n    return os.environ['CI_WORKER_NAME']\n")
    api_port = _free_port()
    api = f"http://127.0.0.1:{api_port}"
    db_url = metadata_db
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "_RECONCILE_TEST"))},
        "AIRFLOW_HOME": str(home),
        "PYTHONPATH": os.pathsep.join([str(home), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": db_url,
        "AIRFLOW__CELERY__BROKER_URL": f"redis://{REDIS[0]}:{REDIS[1]}/0",
        "AIRFLOW__CELERY__RESULT_BACKEND": "db+" + db_url,
        "AIRFLOW__OPERATORS__DEFAULT_QUEUE": general_queue,
        "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "True",
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{api}/execution/",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "True",
        "AIRFLOW__CORE__FERNET_KEY": "",
        "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_urlsafe(32),
        "AIRFLOW__API__PORT": str(api_port),
        "AIRFLOW__API__WORKERS": "1",
        "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
        "AIRFLOW__SCHEDULER__ENABLE_HEALTH_CHECK": "False",
        "AIRFLOW__LOGGING__TRIGGERER_LOG_SERVER_PORT": str(_free_port()),
        "RECONCILE_CONFIG": str(config),
        "RECONCILE_RUNS_URL": f"file://{runs}",
        "RECONCILE_ALERT_FILE": str(tmp_path / "alerts.jsonl"),
        # OpenLineage events of every task, through the provider's file transport.
        "AIRFLOW__OPENLINEAGE__TRANSPORT": json.dumps({"type": "file", "log_file_path": str(lineage_file),
                                                       "append": True}),
        "AIRFLOW__OPENLINEAGE__NAMESPACE": "reconcile_ci",
    }
    migrate = subprocess.run([str(BIN / "airflow"), "db", "migrate"], env=env, capture_output=True, text=True,
                             timeout=600)
    assert migrate.returncode == 0, migrate.stdout[-3000:] + migrate.stderr[-3000:]

    cluster = Cluster(home, env)
    try:
        cluster.start("api-server", "api-server", "--port", str(api_port))
        cluster.start("scheduler", "scheduler")
        cluster.start("dag-processor", "dag-processor")
        cluster.start("triggerer", "triggerer")
        for name, queue in (("warehouse", warehouse_queue), ("general", general_queue)):
            cluster.start(f"worker-{name}", "celery", "worker", "--queues", queue, "--concurrency", "2",
                          "--celery-hostname", f"{name}-{suffix}@%h",
                          AIRFLOW__CORE__HOSTNAME_CALLABLE="ci_hostname.name", CI_WORKER_NAME=f"{name}-{suffix}",
                          AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT=str(_free_port()))

        client = httpx.Client(base_url=api, timeout=30)
        token = _wait("the API server", lambda: _quietly(
            lambda: client.get("/auth/token").raise_for_status().json()["access_token"]), cluster, 240)
        client.headers["Authorization"] = f"Bearer {token}"
        for dag_id in ("reconcile_contact", "reconcile_lead"):
            _wait(f"{dag_id} to be parsed", lambda: _quietly(
                lambda: client.get(f"/api/v2/dags/{dag_id}").status_code == 200), cluster, 240)
            client.patch(f"/api/v2/dags/{dag_id}", json={"is_paused": False}).raise_for_status()

        def trigger(dag_id: str, conf: dict | None = None) -> str:
            run = client.post(f"/api/v2/dags/{dag_id}/dagRuns", json={"logical_date": None, "conf": conf or {}})
            return run.raise_for_status().json()["dag_run_id"]

        def finished(dag_id: str, run_id: str) -> list[dict]:
            state = _wait(f"{dag_id} run {run_id}", lambda: _quietly(lambda: (lambda s: s if s in ("success", "failed")
                          else None)(client.get(f"/api/v2/dags/{dag_id}/dagRuns/{run_id}").json()["state"])),
                          cluster, RUN_TIMEOUT, every=5)
            tis = client.get(f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances",
                             params={"limit": 100}).raise_for_status().json()["task_instances"]
            states = {(t["task_id"], t["map_index"]): t["state"] for t in tis}
            # A run recorded blocked (the demo's newly held mailboxes) fails finish_run on purpose: red, not a crash.
            bad = {k for k, v in states.items() if v not in ("success", "skipped")}
            assert state == "success" or bad == {("finish_run", -1)}, (state, states, cluster.tails())
            return tis

        first_id = trigger("reconcile_contact")
        tis = finished("reconcile_contact", first_id)

        ran = [t for t in tis if t["state"] in ("success", "failed")]
        where = {(t["task_id"], t["map_index"]): (t["hostname"], t["queue"]) for t in ran}
        general = {k: v for k, v in where.items() if k[0] in ("extract", "load")}
        assert sorted(k for k in general if k[0] == "extract") == [("extract", 0), ("extract", 1), ("extract", 2)]
        # the loads ran (the demo's first night writes the CRM and marketing at least), off the warehouse worker
        loaded = sorted(["crm", "erp", "marketing"][i] for task, i in general if task == "load")
        assert {"crm", "marketing"} <= set(loaded), where
        assert set(general.values()) == {(f"general-{suffix}", general_queue)}
        others = {k: v for k, v in where.items() if k not in general}
        assert {"begin_run", "load_staging", "validate", "apply_gates", "build_golden", "check_approval",
                "record_loads", "finish_run"} <= {k[0] for k in others}
        assert set(others.values()) == {(f"warehouse-{suffix}", warehouse_queue)}, others
        # The Parquet hand-off went through the shared run storage, never the warehouse's state folder: the
        # extracts to load_staging, the change sets to the loads, their journals to record_loads.
        cfg = load_config(config)
        assert sorted(p.name for p in runs.glob("*/contact/*.parquet")) == ["crm.parquet", "erp.parquet",
                                                                             "marketing.parquet"]
        assert sorted(p.parent.parent.name for p in runs.glob("*/contact/load/*/*/recorded.json")) == loaded
        assert not (cfg.state_dir / "runs").exists()

        con = duckdb.connect(str(cfg.warehouse_path), read_only=True)
        records = Counter(s for s, _, _ in read_answer_key(demo / "answer_key.csv"))
        for system in ("crm", "erp", "marketing"):
            staged = con.execute(f"SELECT count(*) FROM staging.{system}__contact").fetchone()[0]
            assert staged == records[system] - QUARANTINE_EXPECTED[system], system
        status, summary = con.execute("SELECT status, summary FROM audit.runs WHERE run_id = ?",
                                      [first_id]).fetchone()
        con.close()
        first = json.loads(summary)
        assert status in ("success", "blocked"), first  # the demo's shared mailboxes are held: blocked
        assert sum(c["applied"] for c in first["changes"].values()) > 0
        assert all(c["failed"] == 0 for c in first["changes"].values())

        # Two entity DAGs at once: contact's second run and lead's first (a dry run: lead reads the same
        # systems and must not write into them), sharing the one warehouse worker.
        second_id = trigger("reconcile_contact")
        lead_id = trigger("reconcile_lead", {"dry_run": True})
        finished("reconcile_contact", second_id)
        finished("reconcile_lead", lead_id)
        con = duckdb.connect(str(cfg.warehouse_path), read_only=True)
        runs_recorded = con.execute("SELECT entity, run_id, status FROM audit.runs ORDER BY 1, 2").fetchall()
        second = json.loads(con.execute("SELECT summary FROM audit.runs WHERE run_id = ? AND entity = 'contact'",
                                        [second_id]).fetchone()[0])
        for system in ("crm", "erp", "marketing"):  # both read the systems as contact's first night left them
            lead, contact = (con.execute(f"SELECT count(*) FROM staging.{system}__{e}").fetchone()[0]
                             for e in ("lead", "contact"))
            assert lead == contact >= records[system] - QUARANTINE_EXPECTED[system], system
        written_by_lead = con.execute("SELECT count(*) FROM audit.changes WHERE entity = 'lead' "
                                      "AND status NOT IN ('dry_run', 'held', 'blocked')").fetchone()[0]
        con.close()
        assert sorted((e, r) for e, r, _ in runs_recorded) == sorted(
            [("contact", first_id), ("contact", second_id), ("lead", lead_id)])
        assert dict(((e, r), s) for e, r, s in runs_recorded)[("lead", lead_id)] == "dry_run"
        assert written_by_lead == 0
        # Converged: nothing left to write on the second night (held changes stay held, not re-applied).
        assert sum(c["applied"] for c in second.get("changes", {}).values()) == 0
        assert sum(c["planned"] - c["held"] for c in second.get("changes", {}).values()) == 0

        # OpenLineage: every task's events carry its datasets; golden columns say where each field comes from.
        events = [json.loads(line) for line in lineage_file.read_text().splitlines()]
        complete = {e["job"]["name"]: e for e in events if e["eventType"] == "COMPLETE"}
        warehouse = f"duckdb://{cfg.warehouse_path}"
        golden = complete["reconcile_contact.build_golden"]
        assert {(d["namespace"], d["name"]) for d in golden["inputs"]} == {
            (warehouse, f"staging.{s}__contact") for s in ("crm", "erp", "marketing")} | {(warehouse, "identity.xref")}
        (out,) = [d for d in golden["outputs"] if d["name"] == "golden.contact"]
        assert out["namespace"] == warehouse
        fields = {f["name"]: f.get("description") for f in out["facets"]["schema"]["fields"]}
        assert fields["email"].startswith("owner crm; strategy owner; from staging.crm__contact.email")
        assert set(out["facets"]["columnLineage"]["fields"]) == set(fields)  # each field's source columns
        extract = complete["reconcile_contact.extract"]
        assert {("reconcile://crm", "crm.contact"), ("reconcile://erp", "erp.customer")} <= {
            (d["namespace"], d["name"]) for d in extract["inputs"]}
    finally:
        cluster.stop()
        import redis

        redis.Redis(*REDIS).delete(warehouse_queue, general_queue)  # our queues only; the broker is shared
