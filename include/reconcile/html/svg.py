"""Small inline-SVG plots (no JavaScript, no external library): a line chart over runs with an optional
accepted band. Used by the run report (reconcile.html.report), which the CLI saves and the plugin serves."""
from __future__ import annotations

from html import escape

PALETTE = ["#1565c0", "#ef6c00", "#2e7d32", "#6a1b9a", "#00838f", "#ad1457", "#5d4037"]


def _fmt(v: float, percent: bool) -> str:
    if percent:
        return f"{v * 100:.1f}%"
    return f"{v:,.0f}" if abs(v) >= 10 or v == int(v) else f"{v:.2g}"


def line_plot(title: str, labels: list[str], series: list[dict], band: tuple[list, list] | None = None,
              percent: bool = False, width: int = 520, height: int = 210, css_class: str = "plot") -> str:
    """An SVG line chart: one x position per label (runs, oldest first); `series` = [{name, values, color?,
    dashed?}] with None for a missing value; `band` = (lows, highs) shaded as the accepted range. Every point
    carries a <title> with its exact value, so hovering shows it."""
    left, right, top, bottom = 56, 12, 26, 40
    pw, ph = width - left - right, height - top - bottom
    values = [v for s in series for v in s["values"] if v is not None]
    if band:
        values += [v for v in band[0] + band[1] if v is not None]
    n = len(labels)
    out = [f'<svg class="{css_class}" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" role="img" aria-label="{escape(title)}">',
           f'<text x="{left}" y="16" font-size="13" font-weight="600" fill="#1d2733">{escape(title)}</text>']
    if not values or n == 0:
        out.append(f'<text x="{left}" y="{top + ph / 2}" font-size="12" fill="#5b6b7c">no data yet</text></svg>')
        return "".join(out)
    lo, hi = min(values + [0.0]), max(values)
    if hi == lo:
        hi = lo + (1 if not percent else 0.01)
    hi += (hi - lo) * 0.08

    def x(i: int) -> float:
        return left + (pw * (i + 0.5) / n)

    def y(v: float) -> float:
        return top + ph - (v - lo) / (hi - lo) * ph

    for k in range(5):  # grid and y labels
        v = lo + (hi - lo) * k / 4
        out.append(f'<line x1="{left}" x2="{left + pw}" y1="{y(v):.1f}" y2="{y(v):.1f}" stroke="#e6ebf0"/>')
        out.append(f'<text x="{left - 6}" y="{y(v) + 4:.1f}" font-size="10" text-anchor="end" fill="#5b6b7c">'
                   f'{_fmt(v, percent)}</text>')
    out.append(f'<line x1="{left}" x2="{left + pw}" y1="{top + ph}" y2="{top + ph}" stroke="#9aa8b6"/>')
    step = max(1, n // 6)
    for i, lab in enumerate(labels):
        if i % step == 0 or i == n - 1:
            out.append(f'<text x="{x(i):.1f}" y="{top + ph + 14}" font-size="10" text-anchor="middle" '
                       f'fill="#5b6b7c">{escape(lab[-16:])}</text>')
    if band:
        pts = [(i, a, b) for i, (a, b) in enumerate(zip(*band)) if a is not None and b is not None]
        if pts:
            upper = " ".join(f"{x(i):.1f},{y(b):.1f}" for i, _, b in pts)
            lower = " ".join(f"{x(i):.1f},{y(a):.1f}" for i, a, _ in reversed(pts))
            if len(pts) == 1:  # one run: a short bar rather than an invisible zero-width polygon
                i, a, b = pts[0]
                out.append(f'<rect class="band" x="{x(i) - 8:.1f}" y="{y(b):.1f}" width="16" '
                           f'height="{max(y(a) - y(b), 1):.1f}" fill="#c8e6c9" opacity="0.7"/>')
            else:
                out.append(f'<polygon class="band" points="{upper} {lower}" fill="#c8e6c9" opacity="0.7"/>')
    legend_x = left
    for k, s in enumerate(series):
        color = s.get("color") or PALETTE[k % len(PALETTE)]
        pts = [(i, v) for i, v in enumerate(s["values"]) if v is not None]
        dash = ' stroke-dasharray="5 4"' if s.get("dashed") else ""
        if len(pts) > 1:
            out.append(f'<polyline class="series" fill="none" stroke="{color}" stroke-width="2"{dash} points="'
                       + " ".join(f"{x(i):.1f},{y(v):.1f}" for i, v in pts) + '"/>')
        for i, v in pts:
            out.append(f'<circle cx="{x(i):.1f}" cy="{y(v):.1f}" r="3.5" fill="{color}">'
                       f'<title>{escape(s["name"])} {escape(labels[i])}: {_fmt(v, percent)}</title></circle>')
        out.append(f'<rect x="{legend_x}" y="{height - 14}" width="10" height="10" fill="{color}"/>'
                   f'<text x="{legend_x + 14}" y="{height - 5}" font-size="11" fill="#1d2733">{escape(s["name"])}</text>')
        legend_x += 24 + 7 * len(s["name"])
    if band:
        out.append(f'<rect x="{legend_x}" y="{height - 14}" width="10" height="10" fill="#c8e6c9"/>'
                   f'<text x="{legend_x + 14}" y="{height - 5}" font-size="11" fill="#1d2733">accepted band</text>')
    out.append("</svg>")
    return "".join(out)
