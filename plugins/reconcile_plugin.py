"""The reconcile workplace in the Airflow UI: a FastAPI app under `/reconcile` plus menu entries.

Pages (HTML, no script): the review queue and its items (decide link / split / merge / distinct / ignore),
changes and approvals (approve or reject a waiting load), the run report, the data-flow map. A JSON API under
`/reconcile/api/` serves the same data (see `/reconcile/api` and `/reconcile/openapi.json`, and
docs/operations.md#the-airflow-ui-plugin).

Loaded by Airflow's api-server from the plugins folder (`AirflowPlugin.fastapi_apps` and `external_views`).
Every route requires an Airflow login: the JWT of the UI session (cookie) or an `Authorization: Bearer` token,
validated by Airflow's own `get_user` dependency (the one its REST API uses) against the configured auth
manager; recording a decision or an approval also needs edit rights on the entity's DAG
(`reconcile_<entity>`). Reads and writes go through the reconcile library (`reconcile.queries`,
`reconcile.review.decide`, `reconcile.runner.decide_load`), in worker threads (`asyncio.to_thread`), so DuckDB
never blocks the api-server's event loop. The config is `$RECONCILE_CONFIG`, as for the DAGs; every page renders
something sensible before the first run and without a config.
"""
from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote, urlparse

from fastapi import Depends, FastAPI, Form, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse

from airflow.api_fastapi.auth.managers.base_auth_manager import BaseAuthManager
from airflow.api_fastapi.auth.managers.models.base_user import BaseUser
from airflow.api_fastapi.auth.managers.models.resource_details import AccessView, DagDetails
from airflow.api_fastapi.core_api.security import get_user
from airflow.plugins_manager import AirflowPlugin

CONFIG_ENV = "RECONCILE_CONFIG"
DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "config" / "reconcile.yaml"
PAGE_SIZE = 100

API_ROUTES = [
    ("GET", "/api/runs", "recent runs (?limit, ?entity): status, times, summary"),
    ("GET", "/api/runs/{run_id}", "one run (?entity): status, why, stages with timings, approvals, summary"),
    ("GET", "/api/runs/{run_id}/gates", "quality gate outcomes of a run, holds and blocked writes"),
    ("GET", "/api/changes", "a run's changes (?run_id, ?entity, ?target, ?operation, ?status, ?offset, ?limit)"),
    ("GET", "/api/approvals", "a run's approvals (?run_id, ?entity)"),
    ("POST", "/api/approvals", "approve (and load) or reject a waiting load: {run_id, entity, decision, targets?, note?}"),
    ("GET", "/api/items", "review items by priority (?entity, ?kind, ?system, ?status, ?offset, ?limit)"),
    ("GET", "/api/items/{item_id}", "one item: details, records side by side, effects of each decision, decisions"),
    ("GET", "/api/decisions", "recorded decisions, newest first (?item_id, ?limit)"),
    ("POST", "/api/decisions", "record a decision: {item_id, action, reason, xid?, into?, record?}"),
    ("GET", "/api/trends", "per run and system: volume and band, duplicate rates, review size, changes (?entity)"),
    ("GET", "/api/flow", "the data-flow map of the config: fields, edges, problems, ownership matrix"),
    ("GET", "/docs/{run_id}/index.html", "a run's Great Expectations Data Docs, rewritten to load nothing from a CDN"),
]


def _config_path() -> Path:
    return Path(os.environ.get(CONFIG_ENV) or DEFAULT_CONFIG).expanduser()


_cached: dict[str, Any] = {}


def _config():
    """The reconcile config, re-read when the file changes. Raises LookupError with a message a person can act on."""
    from reconcile.config import load_config

    path = _config_path()
    if not path.is_file():
        raise LookupError(f"no reconcile config at {path}: set {CONFIG_ENV} for the api-server "
                          f"(`make ui` does) to your reconcile.yaml")
    stamp = (str(path), path.stat().st_mtime_ns)
    if _cached.get("stamp") != stamp:
        _cached.update(stamp=stamp, cfg=load_config(path, check_expressions=False))
    return _cached["cfg"]


def _auth_manager() -> BaseAuthManager:
    from airflow.api_fastapi.app import get_auth_manager

    return get_auth_manager()


def _user_name(user: BaseUser) -> str:
    """The name a decision is kept with: the Airflow user's name, as the HITL approval records it."""
    return user.get_name() or str(user.get_id())


async def require_reader(user: Annotated[BaseUser, Depends(get_user)]) -> BaseUser:
    """Any logged-in Airflow user allowed to see the installation's views."""
    if not _auth_manager().is_authorized_view(access_view=AccessView.WEBSITE, user=user):
        raise HTTPException(status_code=403, detail="not allowed to view reconcile")
    return user


Reader = Annotated[BaseUser, Depends(require_reader)]


def _require_editor(user: BaseUser, entity: str) -> None:
    """Recording a decision or an approval acts on the entity's DAG runs: it needs edit rights on that DAG."""
    if not _auth_manager().is_authorized_dag(method="PUT", details=DagDetails(id=f"reconcile_{entity}"), user=user):
        raise HTTPException(status_code=403, detail=f"{_user_name(user)} may not act on DAG reconcile_{entity}")


def _same_origin(request: Request) -> None:
    """Forms post with the session cookie: refuse a post from another site (cross-site request forgery)."""
    origin = request.headers.get("origin") or request.headers.get("referer")
    if origin and urlparse(origin).netloc != request.headers.get("host"):
        raise HTTPException(status_code=403, detail="cross-site form post refused")


async def _call(fn, *args, **kwargs):
    """A blocking library call (DuckDB) in a worker thread; its errors as HTTP errors a person can read."""
    from reconcile.errors import ReconcileError

    try:
        return await asyncio.to_thread(fn, *args, **kwargs)
    except LookupError as e:
        raise HTTPException(status_code=404 if "no review item" in str(e) else 503, detail=str(e)) from None
    except ReconcileError as e:
        text = str(e)
        code = 404 if text.startswith(("no review item", "no run ")) else 409 if "no load waiting" in text else 400
        raise HTTPException(status_code=code, detail=text) from None


def _base(request: Request) -> str:
    return request.scope.get("root_path", "").rstrip("/")


def _html(request: Request, here: str, title: str, body: str, user: BaseUser | None, status: int = 200) -> HTMLResponse:
    from reconcile.html import page
    from reconcile.html.pages import nav

    return HTMLResponse(page(f"reconcile · {title}", body, nav(_base(request), here, _user_name(user) if user else None)),
                        status_code=status)


def create_app() -> FastAPI:
    app = FastAPI(title="reconcile", version="1",
                  description="The reconcile workplace: review queue, changes and approvals, run reports, data-flow "
                              "map, and their JSON API. Every route needs an Airflow login.")

    @app.exception_handler(HTTPException)
    async def _errors(request: Request, exc: HTTPException):
        if request.url.path.startswith(f"{_base(request)}/api") or "json" in request.headers.get("accept", ""):
            return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)
        if exc.status_code == 401:
            try:
                login = _auth_manager().get_url_login(next_url=str(request.url))
            except Exception:  # an auth manager without a login page: the UI root leads there
                login = "/"
            body = (f"<h1>Please log in</h1><p>The reconcile pages need an Airflow login. "
                    f"<a href='{login}'>Log in to Airflow</a>, then come back.</p>")
            return _html(request, "", "log in", body, None, 401)
        return _html(request, "", "error", f"<h1>{exc.status_code}</h1><p>{exc.detail}</p>", None, exc.status_code)

    # ------------------------------------------------------------------ pages

    @app.get("/", include_in_schema=False)
    async def index(request: Request, user: Reader):
        return RedirectResponse(f"{_base(request)}/review", status_code=303)

    @app.get("/review", response_class=HTMLResponse, summary="review queue page")
    async def review_page(request: Request, user: Reader, entity: str | None = None, kind: str | None = None,
                          system: str | None = None, status: str = "open"):
        from reconcile import review_queue
        from reconcile.html.pages import no_config, review_queue_page

        try:
            cfg = _config()
        except LookupError as e:
            return _html(request, "review", "review queue", no_config(str(e)), user)
        queue = await _call(review_queue, cfg, entity=entity or None, kind=kind or None, system=system or None,
                            status=status or None)
        filters = {"entity": entity, "kind": kind, "system": system, "status": status}
        return _html(request, "review", "review queue", review_queue_page(_base(request), queue, filters), user)

    @app.get("/review/{item_id}", response_class=HTMLResponse, summary="review item page")
    async def item_page(request: Request, item_id: str, user: Reader):
        from reconcile import review_item
        from reconcile.html.pages import review_item_page

        item = await _call(review_item, _config(), item_id)
        return _html(request, "review", item["item_id"], review_item_page(_base(request), item), user)

    @app.post("/review/{item_id}/decide", response_class=HTMLResponse, summary="decide a review item (form)")
    async def decide_form(request: Request, item_id: str, user: Reader, action: Annotated[str, Form()],
                          reason: Annotated[str, Form()], xid: Annotated[str | None, Form()] = None):
        from reconcile.html.pages import message_page

        _same_origin(request)
        rows = await _decide(user, {"item_id": item_id, "action": action, "reason": reason, "xid": xid or None})
        text = f"recorded {action} by {_user_name(user)} ({', '.join(r['decision_id'] for r in rows)}); applied on the next run"
        return _html(request, "review", "decision recorded",
                     message_page(_base(request), "Decision recorded", text, f"review/{quote(item_id)}", "back to the item"),
                     user)

    @app.get("/changes", response_class=HTMLResponse, summary="changes and approvals page")
    async def changes_page(request: Request, user: Reader, run_id: str | None = None, target: str | None = None,
                           operation: str | None = None, status: str | None = None, offset: int = 0):
        from reconcile import approvals, list_changes, list_runs
        from reconcile.html.pages import changes_page as render, no_config

        try:
            cfg = _config()
        except LookupError as e:
            return _html(request, "changes", "changes", no_config(str(e)), user)
        runs = await _call(list_runs, cfg, limit=30)
        run_id = run_id or (runs[0]["run_id"] if runs else None)
        changes = await _call(list_changes, cfg, run_id=run_id, target=target or None, operation=operation or None,
                              status=status or None, offset=max(offset, 0), limit=PAGE_SIZE)
        appr = await _call(approvals, cfg, changes["run_id"]) if changes["run_id"] else []
        filters = {"run_id": run_id, "target": target, "operation": operation, "status": status, "offset": offset}
        return _html(request, "changes", "changes", render(_base(request), runs, changes, appr, filters, PAGE_SIZE), user)

    @app.post("/changes/decide", response_class=HTMLResponse, summary="approve or reject a waiting load (form)")
    async def approve_form(request: Request, user: Reader, run_id: Annotated[str, Form()],
                           entity: Annotated[str, Form()], decision: Annotated[str, Form()],
                           target: Annotated[list[str] | None, Form()] = None,
                           note: Annotated[str | None, Form()] = None):
        from reconcile.html.pages import message_page

        _same_origin(request)
        summary = await _decide_load(user, {"run_id": run_id, "entity": entity, "decision": decision,
                                            "targets": target, "note": note})
        loads = ", ".join(f"{t}: {c['applied']} applied, {c['failed']} failed"
                          for t, c in sorted(summary.get("changes", {}).items()) if t in summary["decided"])
        text = (f"{'approved and loaded' if decision == 'approve' else 'rejected'} by {_user_name(user)}: "
                f"{', '.join(summary['decided'])}; the run is now {summary['status']}"
                f"{' (' + loads + ')' if loads and decision == 'approve' else ''}")
        return _html(request, "changes", "load decided",
                     message_page(_base(request), "Load decided", text, f"changes?run_id={quote(run_id)}",
                                  "back to the changes"), user)

    @app.get("/report", response_class=HTMLResponse, summary="run report page")
    async def report_page(request: Request, user: Reader, run_id: str | None = None, entity: str | None = None):
        from reconcile.html import report_body
        from reconcile.html.pages import no_config

        try:
            cfg = _config()
        except LookupError as e:
            return _html(request, "report", "run report", no_config(str(e)), user)
        body = await _call(report_body, cfg, run_id or None, entity or None,
                           docs_url=f"{_base(request)}/docs/{{run_id}}/index.html")
        return _html(request, "report", "run report", body, user)

    @app.get("/docs/{run_id}/{path:path}", summary="a run's Great Expectations Data Docs (offline)")
    async def data_docs(run_id: str, path: str, user: Reader):
        from fastapi.responses import FileResponse
        from reconcile.runner import docs_dir

        root = docs_dir(cfg_or_503(), run_id).resolve()
        target = (root / path).resolve()
        if not target.is_relative_to(root) or not target.is_file():
            raise HTTPException(status_code=404, detail=f"no Data Docs page {path!r} for run {run_id!r}")
        return FileResponse(target)

    @app.get("/flow", response_class=HTMLResponse, summary="data-flow map page")
    async def flow_page(request: Request, user: Reader):
        from reconcile import flow_map
        from reconcile.html import flow_body
        from reconcile.html.pages import no_config

        try:
            cfg = _config()
        except LookupError as e:
            return _html(request, "flow", "data-flow map", no_config(str(e)), user)
        return _html(request, "flow", "data-flow map", flow_body(flow_map(cfg), str(cfg.path)), user)

    @app.get("/api", response_class=HTMLResponse, summary="API documentation page")
    async def api_doc(request: Request, user: Reader):
        from reconcile.html.pages import api_page

        return _html(request, "api", "API", api_page(_base(request), API_ROUTES), user)

    # ------------------------------------------------------------------ JSON API

    def cfg_or_503():
        try:
            return _config()
        except LookupError as e:
            raise HTTPException(status_code=503, detail=str(e)) from None

    @app.get("/api/runs")
    async def api_runs(user: Reader, limit: int = Query(20, ge=1, le=500), entity: str | None = None):
        from reconcile import list_runs

        return {"runs": await _call(list_runs, cfg_or_503(), limit=limit, entity=entity)}

    @app.get("/api/runs/{run_id}")
    async def api_run(run_id: str, user: Reader, entity: str | None = None):
        from reconcile import run_status

        return await _call(run_status, cfg_or_503(), run_id, entity)

    @app.get("/api/runs/{run_id}/gates")
    async def api_gates(run_id: str, user: Reader, entity: str | None = None, failed: bool = False):
        from reconcile import gate_outcomes

        return await _call(gate_outcomes, cfg_or_503(), run_id, entity, failed)

    @app.get("/api/changes")
    async def api_changes(user: Reader, run_id: str | None = None, entity: str | None = None,
                          target: str | None = None, operation: str | None = None, status: str | None = None,
                          offset: int = Query(0, ge=0), limit: int = Query(PAGE_SIZE, ge=1, le=10_000)):
        from reconcile import list_changes

        return await _call(list_changes, cfg_or_503(), run_id=run_id, entity=entity, target=target,
                           operation=operation, status=status, offset=offset, limit=limit)

    @app.get("/api/approvals")
    async def api_approvals(user: Reader, run_id: str | None = None, entity: str | None = None):
        from reconcile import approvals, latest_run_id

        cfg = cfg_or_503()
        run_id = run_id or await _call(latest_run_id, cfg, entity)
        return {"run_id": run_id, "approvals": await _call(approvals, cfg, run_id, entity) if run_id else []}

    @app.post("/api/approvals")
    async def api_decide_load(body: dict, user: Reader):
        return await _decide_load(user, body)

    @app.get("/api/items")
    async def api_items(user: Reader, entity: str | None = None, kind: str | None = None, system: str | None = None,
                        status: str | None = "open", offset: int = Query(0, ge=0),
                        limit: int = Query(200, ge=1, le=5000)):
        from reconcile import review_queue

        return await _call(review_queue, cfg_or_503(), entity=entity, kind=kind, system=system,
                           status=None if status == "all" else status, limit=limit, offset=offset)

    @app.get("/api/items/{item_id}")
    async def api_item(item_id: str, user: Reader):
        from reconcile import review_item

        return await _call(review_item, cfg_or_503(), item_id)

    @app.get("/api/decisions")
    async def api_decisions(user: Reader, item_id: str | None = None, limit: int = Query(200, ge=1, le=5000)):
        from reconcile import review_decisions

        return {"decisions": await _call(review_decisions, cfg_or_503(), item_id, limit)}

    @app.post("/api/decisions")
    async def api_decide(body: dict, user: Reader):
        return {"decisions": await _decide(user, body)}

    @app.get("/api/trends")
    async def api_trends(user: Reader, entity: str | None = None, limit: int = Query(60, ge=1, le=1000)):
        from reconcile import health_trend

        return {"trends": await _call(health_trend, cfg_or_503(), entity, limit)}

    @app.get("/api/flow")
    async def api_flow(user: Reader):
        from reconcile import flow_map

        return flow_map(cfg_or_503()).as_dict()

    return app


async def _decide(user: BaseUser, body: dict) -> list[dict]:
    """A review decision, recorded exactly as `reconcile review decide --by <user> --reason ...` records it."""
    from reconcile import decide, review_item

    cfg = _config()
    item_id = body.get("item_id")
    if not item_id or not body.get("action"):
        raise HTTPException(status_code=422, detail="a decision needs item_id and action")
    item = await _call(review_item, cfg, item_id)
    _require_editor(user, item["entity"])
    return await _call(decide, cfg, body["action"], _user_name(user), body.get("reason") or "", item_id=item_id,
                       xid=body.get("xid"), into=body.get("into"), record=body.get("record"))


async def _decide_load(user: BaseUser, body: dict) -> dict:
    """Approve (and load) or reject a waiting load: `reconcile approve` / Airflow's approval task, by this user."""
    from reconcile import decide_load

    cfg = _config()
    run_id, entity, decision = body.get("run_id"), body.get("entity"), body.get("decision")
    if not run_id or decision not in ("approve", "reject"):
        raise HTTPException(status_code=422, detail="needs run_id and decision: approve | reject")
    if not entity:
        if len(cfg.entities) != 1:
            raise HTTPException(status_code=422, detail="needs entity: the config has several")
        entity = next(iter(cfg.entities))
    _require_editor(user, entity)
    note = body.get("note") or f"{decision}d in the reconcile UI"
    return await _call(decide_load, cfg, entity, run_id, _user_name(user), body.get("targets") or None,
                       reject=decision == "reject", note=note)


app = create_app()


class ReconcilePlugin(AirflowPlugin):
    name = "reconcile"
    fastapi_apps = [{"app": app, "url_prefix": "/reconcile", "name": "reconcile"}]
    external_views = [
        {"name": "Review queue", "href": "reconcile/review", "url_route": "reconcile-review",
         "category": "Reconcile", "destination": "nav"},
        {"name": "Changes and approvals", "href": "reconcile/changes", "url_route": "reconcile-changes",
         "category": "Reconcile", "destination": "nav"},
        {"name": "Run report", "href": "reconcile/report", "url_route": "reconcile-report",
         "category": "Reconcile", "destination": "nav"},
        {"name": "Data-flow map", "href": "reconcile/flow", "url_route": "reconcile-flow",
         "category": "Reconcile", "destination": "nav"},
    ]
