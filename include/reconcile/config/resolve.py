"""Resolve where a system lives: inline URL, an environment variable, or an Airflow connection.

Secrets never sit in the config. Inside Airflow, the DAG resolves `connection:` ids and passes the URL in
as an override; outside Airflow, `AIRFLOW_CONN_<ID>` (Airflow's own environment convention) is honoured.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import quote

from sqlalchemy.engine import make_url

from ..errors import ReconcileError
from .models import Config


def resolve_url(cfg: Config, system: str, overrides: Mapping[str, str] | None = None,
                environ: Mapping[str, str] | None = None) -> str:
    """Where a system is: a SQLAlchemy URL (relative SQLite paths made absolute); for an API system its base
    URL with the token as the password (`https://:<token>@host/path`, the form of an Airflow connection URI);
    for a file system the absolute folder."""
    env = os.environ if environ is None else environ
    sc = cfg.systems[system]
    if overrides and system in overrides:
        url = overrides[system]
    elif sc.files:
        p = Path(sc.files).expanduser()
        return str(p if p.is_absolute() else (cfg.base_dir / p).resolve())
    elif sc.api and sc.base_url:
        token = env.get(sc.token_env or "", "")
        if not token:
            raise ReconcileError(f"system {system!r}: environment variable {sc.token_env} "
                                 f"(systems.{system}.token_env) holding the API token is not set")
        return with_token(sc.base_url, token)
    else:
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
    return url if sc.api or sc.files else _absolutize_sqlite(url, cfg.base_dir)


def with_token(base_url: str, token: str) -> str:
    """An API base URL carrying its token as the password (never printed: see `redact`)."""
    scheme, _, rest = base_url.partition("://")
    return f"{scheme}://:{quote(token, safe='')}@{rest}"


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
    """A URL safe to print or log (password or token masked)."""
    scheme, sep, rest = url.partition("://")
    if sep and scheme in ("http", "https"):
        netloc, slash, path = rest.partition("/")
        return f"{scheme}://{netloc.rpartition('@')[2]}{slash}{path}"
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return "<unparseable url>"
