"""docker-compose.yaml and its Dockerfile, checked statically (no Docker engine needed): the services, the
Airflow 3.3 image, the CeleryExecutor with its broker, result backend and queues, the mounts and environment
reconcile needs, start order and health, and no real secrets."""
from __future__ import annotations

import importlib.util
import re
import shlex
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
COMPOSE = yaml.safe_load((REPO / "docker-compose.yaml").read_text())
SERVICES = COMPOSE["services"]
AIRFLOW_SERVICES = ["airflow-init", "airflow-apiserver", "airflow-scheduler", "airflow-dag-processor",
                    "airflow-triggerer", "warehouse", "worker", "flower"]
LONG_RUNNING = {"airflow-apiserver": "api-server", "airflow-scheduler": "scheduler",
                "airflow-dag-processor": "dag-processor", "airflow-triggerer": "triggerer",
                "warehouse": "celery worker", "worker": "celery worker", "flower": "celery flower"}
WORKERS = ("warehouse", "worker")
# Where the warehouse folder is opened: created by init, written by the warehouse worker, read by the UI plugin.
WITH_WAREHOUSE = {"airflow-init", "airflow-apiserver", "warehouse"}
INTERPOLATED = re.compile(r"^\$\{[A-Za-z_][A-Za-z0-9_]*(:?-[^}]*)?\}$")


def _mounts(service: dict) -> dict[str, str]:
    """target -> source of a service's short-syntax volumes."""
    out = {}
    for v in service.get("volumes", []):
        source, target = re.match(r"^((?:\$\{[^}]*\}|[^:$])+):([^:]+)", v).groups()  # ${VAR:-x} holds a ':'
        out[target] = source
    return out


def _strings(node, path=""):
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _strings(v, f"{path}.{k}" if path else str(k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _strings(v, f"{path}[{i}]")
    elif isinstance(node, str):
        yield path, node


def _command(name: str) -> list[str]:
    command = SERVICES[name]["command"]
    return shlex.split(command) if isinstance(command, str) else command


def _option(args: list[str], name: str) -> str | None:
    return args[args.index(name) + 1] if name in args else None


def test_services():
    assert {"postgres", "redis", *AIRFLOW_SERVICES} <= set(SERVICES)
    for name, command in LONG_RUNNING.items():
        assert " ".join(_command(name)).startswith(command), name
    assert "8080" in SERVICES["airflow-apiserver"]["ports"][0].split(":")[-1]
    # Flower is optional: only with `--profile flower`; nothing else sits behind a profile.
    assert SERVICES["flower"]["profiles"] == ["flower"]
    assert "5555" in SERVICES["flower"]["ports"][0].split(":")[-1]
    assert [n for n, s in SERVICES.items() if "profiles" in s] == ["flower"]


def _default_queue() -> str:
    """Airflow's `[operators] default_queue` default, read from its config template (no airflow import)."""
    template = Path(importlib.util.find_spec("airflow").submodule_search_locations[0]) / "config_templates" / "config.yml"
    return yaml.safe_load(template.read_text())["operators"]["options"]["default_queue"]["default"]


def test_celery_queues_and_workers():
    from reconcile.config.models import QueueSettings

    warehouse, worker = _command("warehouse"), _command("worker")
    # The warehouse worker serves exactly the warehouse queue (the config's default), under its own name.
    assert _option(warehouse, "--queues") == QueueSettings().warehouse == "reconcile_warehouse"
    assert _option(warehouse, "--celery-hostname").startswith("warehouse@")
    # General workers serve Airflow's default queue, where extracts go; they scale and have no fixed name.
    assert _option(worker, "--queues") == _default_queue()
    assert "--celery-hostname" not in worker
    for name in WORKERS:
        assert "container_name" not in SERVICES[name] and "ports" not in SERVICES[name], name
        assert SERVICES[name]["environment"]["DUMB_INIT_SETSID"] == "0", f"{name}: Celery needs a warm shutdown"
    assert "deploy" not in SERVICES["warehouse"] or SERVICES["warehouse"]["deploy"].get("replicas", 1) == 1


def test_airflow_image_is_3_3():
    images = {SERVICES[s]["image"] for s in AIRFLOW_SERVICES}
    assert len(images) == 1, "every Airflow service runs the same image"
    (image,) = images
    assert re.search(r":3\.3\.\d+", image), image
    base = SERVICES["airflow-init"]["build"]["args"]["AIRFLOW_IMAGE"]
    assert re.fullmatch(r"apache/airflow:(slim-)?3\.3\.\d+-python3\.11", base), base

    dockerfile = (REPO / "Dockerfile").read_text()
    assert f"ARG AIRFLOW_IMAGE={base}" in dockerfile
    assert re.search(r"^FROM \$\{AIRFLOW_IMAGE\}$", dockerfile, re.M)
    assert "-r /opt/reconcile/requirements.txt" in dockerfile
    assert '"apache-airflow==${AIRFLOW_VERSION}"' in dockerfile
    # The build context is an allow-list: requirements.txt only (never .venv, demo data or warehouses).
    rules = [ln.strip() for ln in (REPO / ".dockerignore").read_text().splitlines() if ln.strip()[:1] not in ("", "#")]
    assert rules == ["*", "!requirements.txt"]


@pytest.mark.parametrize("name", AIRFLOW_SERVICES)
def test_mounts(name):
    mounts = _mounts(SERVICES[name])
    for folder in ("dags", "plugins", "include", "config"):
        assert mounts.get(f"/opt/airflow/{folder}") == f"./{folder}", f"{name}: ./{folder} not mounted"
    # The warehouse sits where the demo config's relative `warehouse:` points, in a host folder an analyst
    # opens without docker; mounted only where it is opened (never on the general workers).
    if name in WITH_WAREHOUSE:
        assert mounts["/opt/airflow/config/warehouse"] == "${RECONCILE_WAREHOUSE_DIR:-./warehouse}"
    else:
        assert "/opt/airflow/config/warehouse" not in mounts, f"{name} must not open the warehouse"
    # Alerts in a host folder too, where RECONCILE_ALERT_FILE points.
    env = SERVICES[name]["environment"]
    assert mounts[str(Path(env["RECONCILE_ALERT_FILE"]).parent)] == "${RECONCILE_ALERTS_DIR:-./alerts}"
    # Run storage shared by every worker: extracts written by any worker are staged by the warehouse worker.
    assert env["RECONCILE_RUNS_URL"] == "${RECONCILE_RUNS_URL:-/opt/airflow/runs}"
    assert mounts["/opt/airflow/runs"] in COMPOSE["volumes"]


@pytest.mark.parametrize("name", AIRFLOW_SERVICES)
def test_environment(name):
    env = SERVICES[name]["environment"]
    assert env["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor"
    assert re.fullmatch(r"postgresql\+psycopg2://\$\{[^}]+\}:\$\{[^}]+\}@postgres/\$\{[^}]+\}",
                        env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"])
    assert env["AIRFLOW__CELERY__BROKER_URL"] == "redis://redis:6379/0"
    # Celery results in the same PostgreSQL as the metadata DB (SQLAlchemy URL behind Celery's db+ prefix).
    assert env["AIRFLOW__CELERY__RESULT_BACKEND"] == "db+" + env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"]
    assert env["AIRFLOW__CORE__LOAD_EXAMPLES"].lower() == "false"
    assert env["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"] == "http://airflow-apiserver:8080/execution/"
    # The DAG file's default (dags/../config/reconcile.yaml) and the mounted config agree.
    assert env["RECONCILE_CONFIG"] == "/opt/airflow/config/reconcile.yaml"
    assert "/opt/airflow/include" in env["PYTHONPATH"].split(":")
    # One airflow.cfg (fernet key, JWT secret) shared by every service, on a named volume.
    assert Path(env["AIRFLOW_CONFIG"]).parent.as_posix() in {
        t for t, s in _mounts(SERVICES[name]).items() if s in COMPOSE["volumes"]}


def test_start_order_and_health():
    assert "pg_isready" in " ".join(SERVICES["postgres"]["healthcheck"]["test"])
    assert SERVICES["redis"]["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]
    init = SERVICES["airflow-init"]
    assert init["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert init["depends_on"]["redis"]["condition"] == "service_healthy"
    assert init["user"] == "0:0"
    script = init["command"][-1]
    assert "airflow db migrate" in script and "set -euo pipefail" in script
    assert {"_AIRFLOW_WWW_USER_USERNAME", "_AIRFLOW_WWW_USER_PASSWORD"} <= set(init["environment"])
    # Host folders and shared volumes are handed to AIRFLOW_UID, so the services (and you) can write them.
    chown = next(line for line in script.splitlines() if line.strip().startswith("chown"))
    assert '"${AIRFLOW_UID:-50000}:0"' in chown
    for folder in ("/opt/airflow/config/warehouse", "/opt/airflow/alerts", "/opt/airflow/runs"):
        assert folder in chown, folder
    for name in LONG_RUNNING:
        service = SERVICES[name]
        assert service["depends_on"]["postgres"]["condition"] == "service_healthy", name
        assert service["depends_on"]["redis"]["condition"] == "service_healthy", name
        assert service["depends_on"]["airflow-init"]["condition"] == "service_completed_successfully", name
        assert service["healthcheck"]["test"], name
        assert service["user"] == "${AIRFLOW_UID:-50000}:0", name
    # A worker is healthy when it answers a Celery ping under its own node name.
    for name in WORKERS:
        test = " ".join(SERVICES[name]["healthcheck"]["test"])
        node = (_option(_command(name), "--celery-hostname") or "celery@%h").replace("%h", "$${HOSTNAME}")
        assert "inspect ping" in test and f'-d "{node}"' in test, name


def test_no_literal_secrets():
    secret_key = re.compile(r"PASSWORD|SECRET|FERNET|TOKEN", re.I)
    for path, value in _strings(COMPOSE):
        key = path.rsplit(".", 1)[-1]
        if secret_key.search(key) and not key.endswith(("_FILE", "_CMD")):
            assert INTERPOLATED.match(value), f"{path} is set to a literal; use ${{VAR:-default}}"
        masked = re.sub(r"\$\{[^}]*\}", "<VAR>", value)
        for creds in re.findall(r"://([^/@\s]+)@", masked):  # user:password@host in URLs
            password = creds.split(":", 1)[1] if ":" in creds else ""
            assert password in ("", "<VAR>"), f"{path}: literal password in a URL"
    assert not re.search(r"(?i)(password|secret|fernet)\s*=", (REPO / "Dockerfile").read_text())


def test_dollar_signs_are_escaped_or_interpolations():
    # Compose interpolates every $: a shell variable must be written $$VAR, or compose swallows it.
    for path, value in _strings(COMPOSE):
        stray = re.sub(r"\$\$|\$\{[A-Za-z_][A-Za-z0-9_]*(:?-[^}]*)?\}", "", value)
        assert "$" not in stray, f"{path}: unescaped $ in {value!r}"
