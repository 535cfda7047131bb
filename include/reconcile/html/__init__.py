"""HTML rendering for people: the run report, the data-flow map, plots as inline SVG.

Everything here returns self-contained HTML (inline CSS and SVG, no script, no external URL), so a page
saved to disk (`reconcile report --html`, `reconcile flow --format html`) looks the same offline as when the
Airflow UI plugin (plugins/reconcile_plugin.py) serves it. Data comes from reconcile.queries and
reconcile.flow; nothing here touches the warehouse itself.
"""
from __future__ import annotations

from html import escape
from typing import Any

from .flow import flow_body, flow_svg
from .report import report_body

__all__ = ["page", "esc", "flow_body", "flow_svg", "report_body", "CSS"]

CSS = """
:root { --fg:#1d2733; --muted:#5b6b7c; --line:#d5dde5; --bg:#f6f8fa; --accent:#1565c0; --ok:#2e7d32;
        --warn:#ef6c00; --bad:#c62828; }
* { box-sizing: border-box; }
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: var(--fg); margin: 0;
       background: #fff; }
header.top { background: #0f2537; color: #fff; padding: 10px 24px; display: flex; gap: 20px; align-items: center; }
header.top a { color: #cfe3ff; text-decoration: none; font-weight: 500; }
header.top a.here { color: #fff; border-bottom: 2px solid #fff; }
header.top .brand { font-weight: 700; margin-right: 12px; color: #fff; }
header.top .user { margin-left: auto; color: #cfe3ff; font-size: 13px; }
main { padding: 16px 24px 40px; max-width: 1400px; }
h1 { font-size: 22px; margin: 8px 0 12px; } h2 { font-size: 17px; margin: 24px 0 8px; }
h3 { font-size: 15px; margin: 16px 0 6px; }
table { border-collapse: collapse; margin: 6px 0 12px; }
th, td { border: 1px solid var(--line); padding: 4px 8px; text-align: left; vertical-align: top; }
th { background: var(--bg); font-weight: 600; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.muted { color: var(--muted); } .small { font-size: 12px; }
.key { white-space: nowrap; font-family: ui-monospace, SFMono-Regular, Menlo, monospace; font-size: 11px; }
.badge { display: inline-block; padding: 1px 8px; border-radius: 10px; font-size: 12px; font-weight: 600;
         background: #e3e8ee; }
.badge.success, .badge.passed, .badge.applied, .badge.approved { background: #e3f4e4; color: var(--ok); }
.badge.blocked, .badge.warned, .badge.held, .badge.awaiting_approval, .badge.incomplete, .badge.warning
       { background: #fff1e0; color: var(--warn); }
.badge.failed, .badge.error, .badge.rejected { background: #fde8e8; color: var(--bad); }
.badge.dry_run, .badge.planned { background: #e6f0fb; color: var(--accent); }
.diff { background: #fff7d6; }
.problems li.error { color: var(--bad); } .problems li.warning { color: var(--warn); }
.cards { display: flex; flex-wrap: wrap; gap: 16px; }
.card { border: 1px solid var(--line); border-radius: 6px; padding: 8px 12px; background: #fff; }
form.inline { display: inline; }
button, .button { font: inherit; padding: 4px 12px; border-radius: 4px; border: 1px solid var(--accent);
         background: var(--accent); color: #fff; cursor: pointer; }
button.secondary { background: #fff; color: var(--accent); }
button.danger { background: var(--bad); border-color: var(--bad); }
input, select { font: inherit; padding: 3px 6px; }
nav.filters { margin: 8px 0 12px; display: flex; gap: 12px; flex-wrap: wrap; align-items: end; }
.empty { padding: 24px; border: 1px dashed var(--line); border-radius: 6px; color: var(--muted); background: var(--bg); }
pre { background: var(--bg); padding: 8px; overflow-x: auto; }
svg text { font-family: system-ui, sans-serif; }
"""


def esc(value: Any) -> str:
    """A value as HTML text: None as an en dash, booleans as true/false (as staged)."""
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "true" if value else "false"
    return escape(str(value))


def page(title: str, body: str, nav: str = "") -> str:
    """A complete HTML document: inline CSS, no script, no external resource."""
    return (f"<!doctype html><html lang='en'><head><meta charset='utf-8'>"
            f"<meta name='viewport' content='width=device-width, initial-scale=1'>"
            f"<title>{escape(title)}</title><style>{CSS}</style></head><body>{nav}<main>{body}</main></body></html>")
