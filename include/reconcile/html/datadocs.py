"""Great Expectations Data Docs that work offline: no stylesheet, script or image from a CDN.

GX writes its Data Docs pages with Bootstrap, jQuery, Font Awesome and Vega loaded from public CDNs, so offline
(or behind a strict proxy) they render unstyled and half empty. `make_offline` rewrites every page of a run's
Data Docs in place: external <link rel=stylesheet> and <script src> tags are removed, external images point at
the logo GX ships in `static/`, and one inline stylesheet lays the tables out. The validation results are
plain HTML tables in those pages, so nothing is lost. Called by the runner after a run's docs are built
(runner.apply_gates); the UI plugin serves the result.
"""
from __future__ import annotations

import re
from pathlib import Path

_EXTERNAL_CSS = re.compile(r"<link\b[^>]*href=[\"']https?://[^>]*>", re.I)
_EXTERNAL_JS = re.compile(r"<script\b[^>]*src=[\"']https?://[^>]*>\s*</script>", re.I)
_EXTERNAL_IMG = re.compile(r"(<img\b[^>]*src=)[\"']https?://[^\"']*[\"']", re.I)
MARK = "<!-- reconcile: offline -->"

OFFLINE_CSS = """<style>
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #1d2733; margin: 0 16px; }
.container, .container-fluid { max-width: 1300px; margin: 0 auto; }
nav, .navbar { padding: 8px 0; border-bottom: 1px solid #d5dde5; margin-bottom: 12px; }
.navbar img { height: 28px; }
table { border-collapse: collapse; margin: 6px 0 12px; width: 100%; }
th, td { border: 1px solid #d5dde5; padding: 4px 8px; text-align: left; vertical-align: top; }
th { background: #f6f8fa; }
.card { border: 1px solid #d5dde5; border-radius: 6px; padding: 8px 12px; margin: 8px 0; }
.badge { display: inline-block; padding: 1px 8px; border-radius: 10px; background: #e3e8ee; font-size: 12px; }
.text-danger, .fa-times { color: #c62828; } .text-success, .fa-check-circle { color: #2e7d32; }
.d-none, .modal, .collapse:not(.show) { display: none; }
code, pre { background: #f6f8fa; padding: 1px 4px; }
footer { position: static !important; color: #5b6b7c; font-size: 12px; }
.fa-check-circle::before { content: "\\2714"; } .fa-times::before { content: "\\2718"; }
.fa-question-circle::before { content: "?"; }
</style>"""


def make_offline(docs_root: Path) -> int:
    """Rewrite every Data Docs page under `docs_root` to load nothing from the network. Idempotent; returns
    how many pages were rewritten."""
    count = 0
    for page in sorted(Path(docs_root).rglob("*.html")):
        text = page.read_text(encoding="utf-8")
        if MARK in text:
            continue
        logo = _relative_logo(page, Path(docs_root))
        new = _EXTERNAL_CSS.sub("", text)
        new = _EXTERNAL_JS.sub("", new)
        new = _EXTERNAL_IMG.sub(lambda m: f'{m.group(1)}"{logo}"', new)
        new = new.replace("</head>", f"{MARK}{OFFLINE_CSS}</head>", 1) if "</head>" in new else MARK + OFFLINE_CSS + new
        page.write_text(new, encoding="utf-8")
        count += 1
    return count


def _relative_logo(page: Path, root: Path) -> str:
    """The GX logo shipped with the docs of this page's table (static/images/), relative to the page; a blank
    image when there is none."""
    for parent in [page.parent, *page.parents]:
        logo = parent / "static" / "images" / "logo-long-vector.svg"
        if logo.exists():
            depth = len(page.parent.relative_to(parent).parts)
            return "../" * depth + "static/images/logo-long-vector.svg"
        if parent == root:
            break
    return "data:image/gif;base64,R0lGODlhAQABAAAAACw="
