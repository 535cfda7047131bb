"""The data-flow map as HTML and SVG: problems first, the ownership matrix (field x system), and a diagram of
what flows where (systems -> golden.<entity> -> systems). Model: reconcile.flow.flow_map."""
from __future__ import annotations

from html import escape

from ..flow import FlowMap, matrix


def flow_svg(fm: FlowMap, standalone: bool = False) -> str:
    """Systems on the left supply golden.<entity> in the middle, which is sent to systems on the right.
    Each arrow is labelled with its fields; arrows involved in a problem are red. `standalone`: an .svg file
    (with the SVG namespace); inline in HTML it needs none."""
    bad = {(p.get("entity"), s, f) for p in fm.problems for s in p["systems"] for f in p["fields"]}
    cyc = {f for p in fm.problems if p["kind"] == "write_cycle" for f in p["fields"]}
    systems = fm.systems
    box_h, gap = 34, 18
    col_h = len(systems) * (box_h + gap)
    ent_h = max(len(fm.entities), 1) * (box_h + 2 * gap)
    height = max(col_h, ent_h) + 60
    width = 980
    lx, mx, rx, bw = 20, 400, 780, 180

    def sy(i: int) -> float:
        return 40 + i * (box_h + gap)

    def ey(i: int) -> float:
        return 40 + i * (box_h + 2 * gap) + (max(col_h, ent_h) - ent_h) / 2

    ns = ' xmlns="http://www.w3.org/2000/svg"' if standalone else ""
    out = [f'<svg class="flow"{ns} width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" role="img" aria-label="data flow">',
           '<defs><marker id="arrow" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" markerHeight="7" '
           'orient="auto"><path d="M0,0 L10,5 L0,10 z" fill="#5b6b7c"/></marker>'
           '<marker id="arrow-bad" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" markerHeight="7" '
           'orient="auto"><path d="M0,0 L10,5 L0,10 z" fill="#c62828"/></marker></defs>',
           f'<text x="{lx}" y="20" font-size="12" fill="#5b6b7c">supplies (owner, fallback, candidate)</text>',
           f'<text x="{mx}" y="20" font-size="12" fill="#5b6b7c">golden record</text>',
           f'<text x="{rx}" y="20" font-size="12" fill="#5b6b7c">is written (send_to)</text>']
    pos = {s: i for i, s in enumerate(systems)}
    for ei, e in enumerate(fm.entities):
        supplied: dict[str, list[str]] = {}
        sent: dict[str, list[str]] = {}
        for f in (f for f in fm.fields if f.entity == e):
            for s in f.sources:
                supplied.setdefault(s, []).append(f.field)
            for t in f.send_to:
                sent.setdefault(t, []).append(f.field)
        gy = ey(ei) + box_h / 2
        for s, fs in sorted(supplied.items()):
            y1 = sy(pos[s]) + box_h / 2
            out.append(f'<line x1="{lx + bw}" y1="{y1}" x2="{mx - 4}" y2="{gy}" stroke="#5b6b7c" stroke-width="1.5" '
                       f'marker-end="url(#arrow)"/>')
            out.append(f'<text x="{lx + bw + 8}" y="{y1 - 4}" font-size="10" fill="#1d2733">{escape(", ".join(fs))}</text>')
        for t, fs in sorted(sent.items()):
            y2 = sy(pos[t]) + box_h / 2
            is_bad = any((e, t, f) in bad or f"{e}.{f}" in cyc for f in fs)
            color, marker = ("#c62828", "arrow-bad") if is_bad else ("#1565c0", "arrow")
            out.append(f'<line class="{"bad" if is_bad else "ok"}" x1="{mx + bw}" y1="{gy}" x2="{rx - 4}" y2="{y2}" '
                       f'stroke="{color}" stroke-width="{3 if is_bad else 1.5}" marker-end="url(#{marker})"/>')
            out.append(f'<text x="{rx - 8}" y="{y2 - 6}" font-size="10" text-anchor="end" fill="{color}">'
                       f'{escape(", ".join(fs))}</text>')
        out.append(f'<rect x="{mx}" y="{ey(ei)}" width="{bw}" height="{box_h}" rx="6" fill="#fff7d6" stroke="#b8a25a"/>'
                   f'<text x="{mx + bw / 2}" y="{ey(ei) + 21}" font-size="13" text-anchor="middle">golden.{escape(e)}</text>')
    for s, i in pos.items():
        for x in (lx, rx):
            out.append(f'<rect x="{x}" y="{sy(i)}" width="{bw}" height="{box_h}" rx="6" fill="#e6f0fb" stroke="#1565c0"/>'
                       f'<text x="{x + bw / 2}" y="{sy(i) + 21}" font-size="13" text-anchor="middle">{escape(s)}</text>')
    out.append("</svg>")
    return "".join(out)


def flow_body(fm: FlowMap, source: str = "") -> str:
    """The flow page: problems, the ownership matrix, the diagram."""
    parts = [f"<h1>Data-flow map</h1><p class='muted'>from the config alone{' (' + escape(source) + ')' if source else ''}: "
             "who owns each field, where its golden value comes from and which systems it is written into</p>"]
    if fm.problems:
        items = "".join(f"<li class='{escape(p['severity'])}'><span class='badge {escape(p['severity'])}'>"
                        f"{escape(p['severity'])}</span> <b>{escape(p['kind'].replace('_', ' '))}</b>: "
                        f"{escape(p['message'])}</li>" for p in fm.problems)
        parts.append(f"<h2>Problems ({len(fm.problems)})</h2><ul class='problems'>{items}</ul>")
    else:
        parts.append("<h2>Problems</h2><p class='ok'>none: no field is written into its owner, no write cycle, "
                     "no system both supplies and receives the same field</p>")
    rows = []
    flagged = {(p.get("entity"), f) for p in fm.problems for f in p["fields"]}
    cyc = {f for p in fm.problems if p["kind"] == "write_cycle" for f in p["fields"]}
    for r in matrix(fm):
        hot = (r["entity"], r["field"]) in flagged or f"{r['entity']}.{r['field']}" in cyc
        cells = "".join(f"<td{' class=diff' if hot and 'sent to' in v else ''}>{escape(v)}</td>"
                        for v in r["cells"].values())
        rows.append(f"<tr><td>{escape(r['entity'])}</td><td>{escape(r['field'])}</td>{cells}</tr>")
    head = "".join(f"<th>{escape(s)}</th>" for s in fm.systems)
    parts.append("<h2>Ownership matrix</h2><table class='matrix'><tr><th>entity</th><th>field</th>"
                 f"{head}</tr>{''.join(rows)}</table>")
    parts.append(f"<h2>What flows where</h2>{flow_svg(fm)}")
    return "".join(parts)
