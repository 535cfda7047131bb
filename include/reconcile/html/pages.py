"""The UI plugin's pages as HTML fragments: review queue, review item, changes and approvals, runs.

Pure rendering over reconcile.queries results (no Airflow, no warehouse access here): the plugin
(plugins/reconcile_plugin.py) fetches the data in a thread, then calls these. `base` is the URL prefix the
plugin is mounted under (e.g. `/reconcile`). Item details are rendered generically: whatever JSON identity
resolution records (scores, evidence, candidates) shows up, known keys just look nicer.
"""
from __future__ import annotations

import json
from html import escape
from typing import Any
from urllib.parse import quote, urlencode

from . import esc

PAGES = (("review", "Review queue"), ("changes", "Changes and approvals"), ("report", "Run report"),
         ("flow", "Data-flow map"), ("api", "API"))
ACTIONS = ("link", "split", "merge", "distinct", "ignore")


def nav(base: str, here: str, user: str | None) -> str:
    links = "".join(f"<a href='{base}/{slug}'{' class=here' if slug == here else ''}>{escape(title)}</a>"
                    for slug, title in PAGES)
    who = f"<span class='user'>signed in as {escape(user)}</span>" if user else ""
    return f"<header class='top'><span class='brand'>reconcile</span>{links}{who}</header>"


def badge(status: Any) -> str:
    return f"<span class='badge {escape(str(status))}'>{escape(str(status))}</span>"


def _select(name: str, values: list, chosen: str | None, label: str) -> str:
    opts = "".join(f"<option value='{escape(str(v))}'{' selected' if str(v) == chosen else ''}>{escape(str(v))}</option>"
                   for v in values)
    return (f"<label>{escape(label)}<br><select name='{name}'><option value=''>all</option>{opts}</select></label>")


def no_config(message: str) -> str:
    return f"<h1>reconcile</h1><div class='empty'>{escape(message)}</div>"


# ---------------------------------------------------------------------------------------------------------
# Review
# ---------------------------------------------------------------------------------------------------------

def review_queue_page(base: str, queue: dict, filters: dict) -> str:
    f = queue["facets"]
    form = (f"<form method='get' action='{base}/review'><nav class='filters'>"
            f"{_select('entity', f['entity'], filters.get('entity'), 'entity')}"
            f"{_select('kind', f['kind'], filters.get('kind'), 'kind')}"
            f"{_select('system', f['system'], filters.get('system'), 'system')}"
            f"{_select('status', ['open', 'decided', 'ignored', 'resolved'], filters.get('status'), 'status')}"
            "<button type='submit'>Filter</button></nav></form>")
    head = f"<h1>Review queue</h1><p class='muted'>{queue['total']} item(s), highest priority first</p>{form}"
    if not queue["items"]:
        note = ("No review items yet: identity resolution fills this queue when a run finds uncertain matches."
                if not any(f.values()) else "No item matches these filters.")
        return head + f"<div class='empty'>{note}</div>"
    rows = "".join(
        f"<tr><td><a class='item' href='{base}/review/{quote(i['item_id'])}'>{escape(i['item_id'])}</a></td>"
        f"<td>{esc(i['priority'])}</td><td>{esc(i['kind'])}</td><td>{esc(i['entity'])}</td><td>{esc(i['system'])}</td>"
        f"<td>{badge(i['status'])}</td><td>{esc(i['title'])}</td><td class='small'>{esc(i['last_seen_run'])}</td></tr>"
        for i in queue["items"])
    return head + ("<table class='queue'><tr><th>item</th><th>priority</th><th>kind</th><th>entity</th><th>system</th>"
                   f"<th>status</th><th>what</th><th>last seen</th></tr>{rows}</table>")


def _value(v: Any) -> str:
    if isinstance(v, (dict, list)):
        return f"<code class='small'>{escape(json.dumps(v, default=str, ensure_ascii=False))}</code>"
    return esc(v)


def _generic(details: Any) -> str:
    """Any JSON as nested definition tables (for keys the page does not know)."""
    if isinstance(details, dict):
        return ("<table class='details'>" + "".join(f"<tr><th>{escape(str(k))}</th><td>{_generic(v)}</td></tr>"
                                                   for k, v in details.items()) + "</table>")
    if isinstance(details, list) and details and all(isinstance(x, dict) for x in details):
        keys = list(dict.fromkeys(k for x in details for k in x))
        return ("<table class='details'><tr>" + "".join(f"<th>{escape(str(k))}</th>" for k in keys) + "</tr>"
                + "".join("<tr>" + "".join(f"<td>{_generic(x.get(k))}</td>" for k in keys) + "</tr>" for x in details)
                + "</table>")
    return _value(details)


def _evidence(candidates: list) -> str:
    """Per candidate: score and, per field, the two values, their similarity and whether they agree."""
    out = []
    for c in candidates:
        if not isinstance(c, dict):
            out.append(f"<p>{_value(c)}</p>")
            continue
        head = ", ".join(f"{escape(str(k))} <b>{_value(v)}</b>" for k, v in c.items() if k != "evidence")
        ev = c.get("evidence")
        table = ""
        if isinstance(ev, dict) and ev:
            rows = []
            for field, e in ev.items():
                if isinstance(e, dict):
                    extra = {k: v for k, v in e.items() if k not in ("a", "b", "similarity", "weight")}
                    sim = e.get("similarity")
                    agree = ("agree" if sim == 1 else "missing" if sim is None else
                             "close" if isinstance(sim, (int, float)) and sim >= 0.85 else "differ")
                    rows.append(f"<tr><td>{escape(field)}</td><td>{_value(e.get('a'))}</td><td>{_value(e.get('b'))}</td>"
                                f"<td class='num'>{_value(sim)}</td><td class='num'>{_value(e.get('weight'))}</td>"
                                f"<td>{badge(agree)}</td><td>{_value(extra) if extra else ''}</td></tr>")
                else:
                    rows.append(f"<tr><td>{escape(field)}</td><td colspan='6'>{_value(e)}</td></tr>")
            table = ("<table class='evidence'><tr><th>field</th><th>this record</th><th>candidate</th>"
                     "<th>similarity</th><th>weight</th><th></th><th>more</th></tr>" + "".join(rows) + "</table>")
        out.append(f"<div class='card'><p>candidate: {head}</p>{table}</div>")
    return "<div class='cards'>" + "".join(out) + "</div>"


def review_item_page(base: str, item: dict) -> str:
    d = item.get("details") or {}
    parts = [f"<p><a href='{base}/review'>&larr; review queue</a></p>",
             f"<h1>{esc(item['title'])}</h1>",
             f"<p>{badge(item['status'])} <span class='muted'>{esc(item['kind'])} · entity {esc(item['entity'])} · "
             f"system {esc(item['system'])} · item {esc(item['item_id'])} · seen in runs "
             f"{esc(item['first_seen_run'])} .. {esc(item['last_seen_run'])}</span></p>"]
    for key in ("why", "probability", "priority", "score"):
        if key in d:
            parts.append(f"<p><b>{escape(key)}</b>: {_value(d[key])}</p>")
    records = item.get("records") or []
    if records:
        head = "".join(f"<th>{esc(r['system'])}:{esc(r['record_key'])}"
                       f"{'' if r['staged'] else '<br><span class=small>(not in staging)</span>'}</th>" for r in records)
        xids = "".join(f"<td class=small>{esc(r['xid'])}</td>" for r in records)
        rows = [f"<tr><th>xid</th>{xids}</tr>"]
        for field in records[0]["values"]:
            vals = [r["values"].get(field) for r in records]
            differ = len({json.dumps(v, default=str) for v in vals if v is not None}) > 1
            rows.append(f"<tr{' class=diff' if differ else ''}><th>{escape(field)}</th>"
                        + "".join(f"<td>{esc(v)}</td>" for v in vals) + "</tr>")
        parts.append("<h2>Records side by side</h2><p class='muted small'>staged values; highlighted rows disagree</p>"
                     f"<table class='side-by-side'><tr><th>field</th>{head}</tr>{''.join(rows)}</table>")
    if isinstance(d.get("candidates"), list) and d["candidates"]:
        parts.append(f"<h2>Competing candidates ({len(d['candidates'])})</h2>{_evidence(d['candidates'])}")
    rest = {k: v for k, v in d.items() if k not in ("candidates", "why", "probability", "priority", "score")}
    if rest:
        parts.append(f"<h2>Details</h2>{_generic(rest)}")
    effects = item.get("effects") or {}
    cands = sorted({c.get("xid") for c in d.get("candidates", []) if isinstance(c, dict) and c.get("xid")})
    xid_field = ("<label>xid (link: the target; distinct: the other side)<br><select name='xid'><option value=''>"
                 "(the item's candidate)</option>" + "".join(f"<option>{escape(x)}</option>" for x in cands)
                 + "</select></label>") if len(cands) > 1 else ""
    rows = "".join(f"<tr><td><button type='submit' name='action' value='{a}' class='{'secondary' if a == 'ignore' else ''}'"
                   f" id='decide-{a}'>{a}</button></td><td>{esc(effects.get(a))}</td></tr>" for a in ACTIONS)
    parts.append(f"<h2>Decide</h2><form method='post' action='{base}/review/{quote(item['item_id'])}/decide'>"
                 f"<nav class='filters'><label>reason (kept with the decision)<br><input name='reason' size='60' "
                 f"required placeholder='why'></label>{xid_field}</nav>"
                 f"<table class='decide'><tr><th>decision</th><th>what it would change at the next run</th></tr>"
                 f"{rows}</table></form>")
    if item.get("decisions"):
        rows = "".join(f"<tr><td>{esc(x['decision_id'])}</td><td>{esc(x['action'])}</td><td>{esc(x['decided_by'])}</td>"
                       f"<td>{esc(x['decided_at'])}</td><td>{esc(x['reason'])}</td>"
                       f"<td>{esc(x['applied_run_id'] or '(next run)')}</td></tr>" for x in item["decisions"])
        parts.append("<h2>Decisions</h2><table class='decisions'><tr><th>decision</th><th>action</th><th>by</th>"
                     f"<th>at</th><th>reason</th><th>applied in</th></tr>{rows}</table>")
    return "".join(parts)


def message_page(base: str, title: str, text: str, back: str, back_label: str, ok: bool = True) -> str:
    return (f"<h1>{escape(title)}</h1><p>{badge('success' if ok else 'failed')} {escape(text)}</p>"
            f"<p><a href='{base}/{back}'>{escape(back_label)}</a></p>")


# ---------------------------------------------------------------------------------------------------------
# Changes and approvals
# ---------------------------------------------------------------------------------------------------------

def changes_page(base: str, runs: list[dict], changes: dict, approvals: list[dict], filters: dict,
                 page_size: int) -> str:
    if not runs:
        return ("<h1>Changes and approvals</h1><div class='empty'>No runs yet: the first run plans its changes "
                "into audit.changes and they show here.</div>")
    run_id = changes["run_id"] or filters.get("run_id") or runs[0]["run_id"]
    run_opts = "".join(f"<option value='{escape(r['run_id'])}'{' selected' if r['run_id'] == run_id else ''}>"
                       f"{escape(r['run_id'])} ({escape(r['entity'])}, {escape(r['status'])})</option>" for r in runs)
    targets = sorted(changes["counts"])
    ops = sorted({op for t in changes["counts"].values() for op in t})
    statuses = sorted({st for t in changes["counts"].values() for o in t.values() for st in o})
    parts = ["<h1>Changes and approvals</h1>",
             f"<form method='get' action='{base}/changes'><nav class='filters'><label>run<br><select name='run_id'>"
             f"{run_opts}</select></label>{_select('target', targets, filters.get('target'), 'target')}"
             f"{_select('operation', ops, filters.get('operation'), 'operation')}"
             f"{_select('status', statuses, filters.get('status'), 'status')}"
             "<button type='submit'>Show</button></nav></form>"]
    waiting = [a for a in approvals if a["waiting"]]
    if approvals:
        rows = "".join(
            f"<tr><td>{esc(a['entity'])}</td><td>{esc(a['target'])}</td><td>{esc('; '.join(a['reasons'] or []))}</td>"
            f"<td>{badge(a['decision'] or ('waiting' if a['required'] else 'not needed'))}</td>"
            f"<td>{esc(a['decided_by'])}</td><td>{esc(a['note'])}</td></tr>" for a in approvals)
        parts.append("<h2>Approvals</h2><table class='approvals'><tr><th>entity</th><th>target</th><th>why needed</th>"
                     f"<th>decision</th><th>by</th><th>note</th></tr>{rows}</table>")
    if waiting:
        ent = waiting[0]["entity"]
        boxes = "".join(f"<label><input type='checkbox' name='target' value='{escape(a['target'])}' checked> "
                        f"{escape(a['target'])}</label> " for a in waiting if a["entity"] == ent)
        parts.append(f"<form method='post' action='{base}/changes/decide' class='approve'>"
                     f"<input type='hidden' name='run_id' value='{escape(run_id)}'>"
                     f"<input type='hidden' name='entity' value='{escape(ent)}'>"
                     f"<p>Waiting for a decision: {boxes}</p><nav class='filters'><label>note<br>"
                     f"<input name='note' size='50'></label>"
                     "<button type='submit' name='decision' value='approve' id='approve'>Approve and load</button>"
                     "<button type='submit' name='decision' value='reject' id='reject' class='danger'>Reject</button>"
                     "</nav><p class='muted small'>The same as Airflow's approval task and <code>reconcile approve</code>: "
                     "approve loads these targets now; reject writes nothing into them.</p></form>")
    counts = "".join(f"<tr><td>{esc(t)}</td><td>{esc(op)}</td><td>"
                     + ", ".join(f"{badge(st)} {n}" for st, n in sorted(sts.items())) + "</td></tr>"
                     for t, o in sorted(changes["counts"].items()) for op, sts in sorted(o.items()))
    parts.append(f"<h2>Run {esc(run_id)}</h2><table class='counts'><tr><th>target</th><th>operation</th>"
                 f"<th>statuses</th></tr>{counts}</table>")
    offset = int(filters.get("offset") or 0)
    total = changes["total"]
    rows = []
    for c in changes["rows"]:
        if c["record"] is not None:
            after = ("<table class='record'>" + "".join(f"<tr><th>{escape(str(k))}</th><td>{esc(v)}</td></tr>"
                                                      for k, v in c["record"].items()) + "</table>")
            before = "<span class='muted'>(new record)</span>"
        else:
            before, after = esc(c["before_value"]), esc(c["after_value"] if c["after_value"] is not None
                                                          else c["after_raw"])
        rows.append(f"<tr><td>{esc(c['target'])}</td><td>{esc(c['operation'])}</td>"
                    f"<td class='key'>{esc(c['record_key'] or '(new)')}<br><span class='muted'>{esc(c['xid'])}</span></td>"
                    f"<td>{esc(c['field'])}</td><td>{before}</td><td>{after}</td><td>{badge(c['status'])}</td>"
                    f"<td class='small'>{esc(c['reason'] or c['error'])}</td><td class='small'>{esc(c['lineage'])}</td></tr>")
    query = {k: v for k, v in filters.items() if v and k != "offset"}
    query["run_id"] = run_id

    def link(off: int, label: str) -> str:
        return f"<a href='{base}/changes?{urlencode({**query, 'offset': off})}'>{label}</a>"

    pager = (f"<p>rows {offset + 1 if total else 0}–{min(offset + page_size, total)} of {total} "
             + (link(max(offset - page_size, 0), "&larr; previous") + " " if offset > 0 else "")
             + (link(offset + page_size, "next &rarr;") if offset + page_size < total else "") + "</p>")
    parts.append(pager + "<table class='changes'><tr><th>target</th><th>operation</th><th>record / xid</th>"
                 "<th>field</th><th>before</th><th>after</th><th>status</th><th>reason</th><th>lineage</th></tr>"
                 + "".join(rows) + "</table>" + pager)
    return "".join(parts)


def api_page(base: str, routes: list[tuple[str, str, str]]) -> str:
    rows = "".join(f"<tr><td>{escape(m)}</td><td><code>{escape(base + p)}</code></td><td>{escape(d)}</td></tr>"
                   for m, p, d in routes)
    return ("<h1>JSON API</h1><p>Behind the same pages and the same login (a browser session cookie, or "
            "<code>Authorization: Bearer &lt;token&gt;</code> from Airflow's <code>POST /auth/token</code>). "
            f"The OpenAPI schema: <a href='{base}/openapi.json'>{base}/openapi.json</a>.</p>"
            f"<table><tr><th>method</th><th>path</th><th>what</th></tr>{rows}</table>")
