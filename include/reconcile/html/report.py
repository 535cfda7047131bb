"""The run report as HTML: status and why, stages with timings, approvals, changes, gate outcomes, and trend
plots per system (volume with its accepted band, duplicate rates with their limit), review-queue size and
changes per target over time. `reconcile report --html` saves it; the UI plugin serves the same body."""
from __future__ import annotations

from html import escape
from urllib.parse import quote

from .. import queries
from ..config import Config
from .svg import line_plot


def _badge(status: str | None) -> str:
    return f'<span class="badge {escape(str(status))}">{escape(str(status))}</span>'


def _e(value) -> str:
    from . import esc

    return esc(value)


def report_body(cfg: Config, run_id: str | None = None, entity: str | None = None, trend_runs: int = 30,
                docs_url: str | None = None) -> str:
    """The report of one run (default: the newest) as an HTML fragment; a friendly note before any run.
    `docs_url`: where the run's Data Docs are served (the plugin); otherwise their path is shown."""
    if not queries.list_runs(cfg, limit=1):
        return ('<h1>Run report</h1><div class="empty">No runs yet. The first run (the DAG, or '
                '<code>reconcile run</code>) fills this page.</div>')
    run = queries.run_status(cfg, run_id, entity)
    entity = run["entity"]
    s = run["summary"] or {}
    parts = [f"<h1>Run {_e(run['run_id'])} <span class='muted small'>entity {_e(entity)}</span> "
             f"{_badge(run['status'])}</h1>",
             f"<p class='muted'>logical time {_e(run['run_at'])} · started {_e(run['started_at'])} · finished "
             f"{_e(run['finished_at'])}{' · ' + str(run['duration_s']) + ' s' if run.get('duration_s') is not None else ''}</p>"]
    if run["why"]:
        parts.append("<h2>Why this status</h2><ul class='why'>" + "".join(f"<li>{_e(w)}</li>" for w in run["why"])
                     + "</ul>")
    parts.append(_stages(run))
    parts.append(_counts(s))
    if run["approvals"]:
        rows = "".join(f"<tr><td>{_e(t)}</td><td>{_e(a['required'])}</td><td>{_e('; '.join(a['reasons'] or []))}</td>"
                       f"<td>{_badge(a['decision'] or ('waiting' if a['required'] else 'not needed'))}</td>"
                       f"<td>{_e(a['decided_by'])}</td><td>{_e(a['decided_at'])}</td><td>{_e(a['note'])}</td></tr>"
                       for t, a in run["approvals"].items())
        parts.append("<h2>Approvals</h2><table><tr><th>target</th><th>required</th><th>why</th><th>decision</th>"
                     f"<th>by</th><th>at</th><th>note</th></tr>{rows}</table>")
    parts.append(_gates(cfg, run["run_id"], entity))
    docs = (s.get("gates") or {}).get("data_docs")
    if docs:
        where = (f"<a href='{escape(docs_url.format(run_id=quote(run['run_id'], safe='')))}'>open</a>" if docs_url
                 else f"<code>{_e(docs)}</code>")
        parts.append(f"<p>Great Expectations Data Docs of this run (offline, no CDN): {where}</p>")
    parts.append(_trends(cfg, entity, run["run_id"], trend_runs))
    return "".join(parts)


def _stages(run: dict) -> str:
    if not run["stages"]:
        return "<h2>Stages</h2><p class='muted'>no stage finished</p>"
    timed = any(st["seconds"] is not None for st in run["stages"])
    rows = "".join(f"<tr><td>{_e(st['stage'])}</td><td class='num'>"
                   f"{'' if st['seconds'] is None else format(st['seconds'], '.2f')}</td></tr>" for st in run["stages"])
    note = "" if timed else "<p class='muted small'>this run recorded no stage timings</p>"
    return f"<h2>Stages</h2><table><tr><th>stage</th><th>seconds</th></tr>{rows}</table>{note}"


def _counts(s: dict) -> str:
    out = []
    if s.get("extracted"):
        rows = "".join(f"<tr><td>{_e(sys_)}</td><td>{_e(s.get('extract_mode', {}).get(sys_))}</td>"
                       f"<td class='num'>{_e(n)}</td><td class='num'>{_e(s.get('quarantined', {}).get(sys_))}</td>"
                       f"<td class='num'>{_e(s.get('staged', {}).get(sys_))}</td></tr>"
                       for sys_, n in sorted(s["extracted"].items()))
        out.append("<h2>Extraction</h2><table><tr><th>system</th><th>mode</th><th>extracted</th><th>quarantined</th>"
                   f"<th>staged</th></tr>{rows}</table>")
    if s.get("identity") or s.get("golden"):
        i, g = s.get("identity") or {}, s.get("golden") or {}
        out.append(f"<p>identity: {_e(i.get('linked'))} links, {_e(i.get('new_xids'))} new xids, "
                   f"{_e(i.get('review'))} open review items · golden: {_e(g.get('records'))} records, "
                   f"{_e(g.get('changed'))} changed</p>")
    if s.get("changes"):
        keys = ["planned", "applied", "failed", "held", "skipped_conflict"]
        rows = "".join(f"<tr><td>{_e(t)}</td>" + "".join(f"<td class='num'>{_e(c.get(k))}</td>" for k in keys)
                       + "</tr>" for t, c in sorted(s["changes"].items()))
        out.append("<h2>Changes</h2><table><tr><th>target</th>" + "".join(f"<th>{k}</th>" for k in keys)
                   + f"</tr>{rows}</table>")
    return "".join(out)


def _gates(cfg: Config, run_id: str, entity: str) -> str:
    g = queries.gate_outcomes(cfg, run_id, entity)
    if not g["outcomes"]:
        return "<h2>Quality gates</h2><p class='muted'>no gate outcomes recorded for this run</p>"
    order = {"failed": 0, "warned": 1, "passed": 2}
    rows = "".join(
        f"<tr><td>{_e(o['table'])}</td><td>{_e(o['expectation'])}</td><td>{_e(o['severity'])}</td>"
        f"<td>{_badge(o['outcome'])}</td><td>{_e(o['observed'])}</td>"
        f"<td class='small'>{_e(', '.join(f'{k}={v}' for k, v in (o['threshold'] or {}).items() if v is not None and k != 'regex'))}</td>"
        f"<td class='num'>{_e(o['unexpected'])}</td></tr>"
        for o in sorted(g["outcomes"], key=lambda o: (order.get(o["outcome"], 3), o["table"], o["expectation"])))
    extra = "".join(f"<li>{_e(n)} identities held back from {_e(t)}</li>" for t, n in g["held"].items())
    extra += "".join(f"<li>writes into {_e(b['target'])}{'' if b['field'] == '*' else ' of ' + _e(b['field'])} "
                     f"blocked: {_e(b['reason'])}</li>" for b in g["blocked"])
    passed = sum(o["outcome"] == "passed" for o in g["outcomes"])
    return (f"<h2>Quality gates</h2><p>{passed} of {len(g['outcomes'])} expectations met</p>"
            f"{'<ul>' + extra + '</ul>' if extra else ''}"
            "<table><tr><th>table</th><th>expectation</th><th>severity</th><th>outcome</th><th>observed</th>"
            f"<th>threshold</th><th>unexpected</th></tr>{rows}</table>")


def _trends(cfg: Config, entity: str, run_id: str, limit: int) -> str:
    rows = queries.health_trend(cfg, entity, limit=limit)
    if not rows:
        return "<h2>Trends</h2><p class='muted'>no trend data yet</p>"
    runs = list(dict.fromkeys(r["run_id"] for r in rows))
    run_at = {r["run_id"]: r["run_at"] for r in rows}
    labels = [run_at[r].strftime("%m-%d %H:%M") if hasattr(run_at[r], "strftime") else r for r in runs]
    idx = {r: i for i, r in enumerate(runs)}
    systems = sorted({r["system"] for r in rows})
    out = ["<h2>Trends per system</h2><p class='muted small'>the last runs, oldest first; the shaded band is "
           "what the volume gate accepted, the dashed line the duplicate-rate limit</p>"]
    for system in systems:
        mine = [r for r in rows if r["system"] == system]
        staged, lows, highs = [None] * len(runs), [None] * len(runs), [None] * len(runs)
        for r in mine:
            i = idx[r["run_id"]]
            staged[i], lows[i], highs[i] = r["staged"], r["volume_min"], r["volume_max"]
        vol = line_plot(f"{system}: staged records (volume)", labels, [{"name": "observed", "values": staged}],
                        band=(lows, highs), css_class="plot volume")
        keys = sorted({k for r in mine for k in r["duplicate_rates"]})
        series = []
        for k in keys:
            vals, lim = [None] * len(runs), [None] * len(runs)
            for r in mine:
                vals[idx[r["run_id"]]] = r["duplicate_rates"].get(k)
                limit = r["duplicate_limits"].get(k)
                lim[idx[r["run_id"]]] = limit if limit is not None and limit < 1 else None  # 1 = no baseline yet
            series.append({"name": f"{k}", "values": vals})
            if any(v is not None for v in lim):
                series.append({"name": f"{k} limit", "values": lim, "dashed": True})
        dup = line_plot(f"{system}: duplicate rate", labels, series, percent=True, css_class="plot duplicates")
        out.append(f"<div class='cards'><div class='card'>{vol}</div><div class='card'>{dup}</div></div>")
    review = [None] * len(runs)
    for r in rows:
        i = idx[r["run_id"]]
        review[i] = (review[i] or 0) + (r["review_open"] or 0)
    targets = sorted({r["system"] for r in rows if r["changes_planned"]})
    change_series = []
    for t in targets:
        planned, applied = [None] * len(runs), [None] * len(runs)
        for r in rows:
            if r["system"] == t:
                planned[idx[r["run_id"]]], applied[idx[r["run_id"]]] = r["changes_planned"], r["changes_applied"]
        change_series += [{"name": f"{t} planned", "values": planned},
                          {"name": f"{t} applied", "values": applied, "dashed": True}]
    out.append("<h2>Review queue and changes over time</h2><div class='cards'>"
               f"<div class='card'>{line_plot('open review items', labels, [{'name': 'open', 'values': review}], css_class='plot review')}</div>"
               f"<div class='card'>{line_plot('changes per target', labels, change_series, width=640, css_class='plot changes')}</div>"
               "</div>")
    return "".join(out)


def report_html(cfg: Config, run_id: str | None = None, entity: str | None = None) -> str:
    """The run report as one self-contained HTML document (what `reconcile report --html` writes)."""
    from . import page

    return page(f"reconcile run report {run_id or '(latest)'}", report_body(cfg, run_id, entity))
