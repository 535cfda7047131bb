"""docker-compose.yaml and its Dockerfile, checked statically (no Docker engine needed): the services, the
Airflow 3.3 image, the mounts and environment reconcile needs, start order and health, and no real secrets."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
COMPOSE = yaml.safe_load((REPO / "docker-compose.yaml").read_text())
SERVICES = COMPOSE["services"]
AIRFLOW_SERVICES = ["airflow-init", "airflow-apiserver", "airflow-scheduler", "airflow-dag-processor",
                    "airflow-triggerer"]
LONG_RUNNING = {"airflow-apiserver": "api-server", "airflow-scheduler": "scheduler",
                "airflow-dag-processor": "dag-processor", "airflow-triggerer": "triggerer"}
INTERPOLATED = re.compile(r"^\$\{[A-Za-z_][A-Za-z0-9_]*(:?-[^}]*)?\}$")


def _mounts(service: dict) -> dict[str, str]:
    """target -> source of a service's short-syntax volumes."""
    out = {}
    for v in service.get("volumes", []):
        source, target = v.split(":")[:2]
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


def test_services():
    assert {"postgres", *AIRFLOW_SERVICES} <= set(SERVICES)
    for name, command in LONG_RUNNING.items():
        assert SERVICES[name]["command"] == command
    assert "8080" in SERVICES["airflow-apiserver"]["ports"][0].split(":")[-1]


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
    # The warehouse sits where the demo config's relative `warehouse:` points, on a named volume.
    assert mounts.get("/opt/airflow/config/warehouse") in COMPOSE["volumes"]


@pytest.mark.parametrize("name", AIRFLOW_SERVICES)
def test_environment(name):
    env = SERVICES[name]["environment"]
    assert env["AIRFLOW__CORE__EXECUTOR"] == "LocalExecutor"
    assert re.fullmatch(r"postgresql\+psycopg2://\$\{[^}]+\}:\$\{[^}]+\}@postgres/\$\{[^}]+\}",
                        env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"])
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
    init = SERVICES["airflow-init"]
    assert init["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert init["user"] == "0:0"
    script = init["command"][-1]
    assert "airflow db migrate" in script and "set -euo pipefail" in script
    assert {"_AIRFLOW_WWW_USER_USERNAME", "_AIRFLOW_WWW_USER_PASSWORD"} <= set(init["environment"])
    for name in LONG_RUNNING:
        service = SERVICES[name]
        assert service["depends_on"]["postgres"]["condition"] == "service_healthy", name
        assert service["depends_on"]["airflow-init"]["condition"] == "service_completed_successfully", name
        assert service["healthcheck"]["test"], name
        assert service["user"] == "${AIRFLOW_UID:-50000}:0", name


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
