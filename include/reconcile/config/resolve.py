"""Resolve where a system lives: inline URL, an environment variable, or an Airflow connection.

Secrets never sit in the config. Inside Airflow, the DAG resolves `connection:` ids and passes the URL in
as an override; outside Airflow, `AIRFLOW_CONN_<ID>` (Airflow's own environment convention) is honoured.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from sqlalchemy.engine import make_url

from ..errors import ReconcileError
from .models import Config


def resolve_url(cfg: Config, system: str, overrides: Mapping[str, str] | None = None,
                environ: Mapping[str, str] | None = None) -> str:
    """Return the SQLAlchemy URL of a system, with relative SQLite paths made absolute."""
    env = os.environ if environ is None else environ
    if overrides and system in overrides:
        url = overrides[system]
    else:
        sc = cfg.systems[system]
        if sc.url:
            url = sc.url
        elif sc.url_env:
            url = env.get(sc.url_env, "")
            if not url:
                raise ReconcileError(
                    f"system {system!r}: environment variable {sc.url_env} (systems.{system}.url_env) is not set"
                )
        else:
            var = f"AIRFLOW_CONN_{sc.connection.upper()}"
            url = env.get(var, "")
            if not url:
                raise ReconcileError(
                    f"system {system!r} uses Airflow connection {sc.connection!r} (systems.{system}.connection); "
                    f"outside an Airflow task set {var} to its URI"
                )
    return _absolutize_sqlite(url, cfg.base_dir)


# Airflow renders some connection types with scheme names SQLAlchemy 2 does not accept, or without a driver
# this project installs: map them to the installed drivers.
_SCHEMES = {"postgres": "postgresql+psycopg2", "postgresql": "postgresql+psycopg2", "mysql": "mysql+pymysql",
            "mariadb": "mysql+pymysql"}


def _absolutize_sqlite(url: str, base: Path) -> str:
    scheme, sep, rest = url.partition("://")
    if sep and scheme in _SCHEMES:
        url = f"{_SCHEMES[scheme]}://{rest}"
    u = make_url(url)
    if u.get_backend_name() == "sqlite" and u.database and u.database != ":memory:" and not u.database.startswith("file:"):
        p = Path(u.database).expanduser()
        if not p.is_absolute():
            return u.set(database=str((base / p).resolve())).render_as_string(hide_password=False)
    return url


def redact(url: str) -> str:
    """A URL safe to print or log (password masked)."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return "<unparseable url>"
