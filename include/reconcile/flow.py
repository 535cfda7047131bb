"""The data-flow map of a config: who owns each field, where its golden value comes from and goes to, and
what is wrong with that wiring. Computed from the config alone (no warehouse, no system is touched).

Called by `reconcile flow`, the run report and the UI plugin's flow page; rendered by reconcile.html.flow.

Problems found:
- `written_into_owner` (error): a field is sent to the system that owns it (its own value would be overwritten
  by a copy of itself; config rules reject it, the map shows it for configs built in code or loaded loosely);
- `write_cycle` (error): the same physical columns feed each other round a loop (crm.x -> marketing.y ->
  crm.x, e.g. through two canonical fields mapped to the same columns), so values chase each other every night;
- `read_and_overwritten` (warning): a system both supplies a field's golden value (owner, fallback or strategy
  candidate) and has that field written into it: its own edits can come back as writes.
"""
from __future__ import annotations

from dataclasses import dataclass, field as dc_field

from .config import Config


@dataclass
class FieldFlow:
    entity: str
    field: str
    owner: str | None
    fallback: list[str]
    send_to: list[str]
    mapped_by: list[str]                # systems whose source maps the field
    sources: list[str]                  # systems whose values may become the golden value, in order
    columns: dict[str, str]             # system -> the column the field lives in there


@dataclass
class FlowMap:
    systems: list[str]
    entities: list[str]
    fields: list[FieldFlow]
    edges: list[dict] = dc_field(default_factory=list)     # {entity, source, target, fields}: golden hop per pair
    problems: list[dict] = dc_field(default_factory=list)  # {kind, severity, entity, field(s), systems, message}

    def as_dict(self) -> dict:
        return {"systems": self.systems, "entities": self.entities,
                "fields": [f.__dict__ for f in self.fields], "edges": self.edges, "problems": self.problems,
                "matrix": matrix(self)}


def flow_map(cfg: Config) -> FlowMap:
    """The data-flow map of `cfg`: per field its owner, fallback, targets and columns; system-to-system edges;
    problems (see the module docstring)."""
    fields: list[FieldFlow] = []
    for ename, ent in sorted(cfg.entities.items()):
        for fname, spec in ent.fields.items():
            mapped = [s for s, src in sorted(ent.sources.items()) if fname in src.fields]
            sources = [s for s in spec.candidate_systems(mapped) if s in mapped]
            columns = {s: ent.sources[s].fields[fname].column for s in mapped}
            fields.append(FieldFlow(ename, fname, spec.owner, list(spec.fallback), list(spec.send_to), mapped,
                                    sources, columns))
    fm = FlowMap(systems=sorted(cfg.systems), entities=sorted(cfg.entities), fields=fields)
    pairs: dict[tuple[str, str, str], list[str]] = {}
    for f in fields:
        for s in f.sources:
            for t in f.send_to:
                pairs.setdefault((f.entity, s, t), []).append(f.field)
    fm.edges = [{"entity": e, "source": s, "target": t, "fields": fs} for (e, s, t), fs in sorted(pairs.items())]
    fm.problems = _problems(cfg, fields)
    return fm


def _node(cfg: Config, entity: str, system: str, column: str) -> str:
    src = cfg.entities[entity].sources[system]
    return f"{system}.{src.table or '(query)'}.{column}"


def _problems(cfg: Config, fields: list[FieldFlow]) -> list[dict]:
    problems: list[dict] = []
    for f in fields:
        if f.owner and f.owner in f.send_to:
            problems.append({"kind": "written_into_owner", "severity": "error", "entity": f.entity,
                             "fields": [f.field], "systems": [f.owner],
                             "message": f"{f.entity}.{f.field} is sent to {f.owner}, the system that owns it"})
        for t in f.send_to:
            if t != f.owner and t in f.sources:
                role = "fallback" if t in f.fallback else f"a {cfg.entities[f.entity].fields[f.field].strategy} candidate"
                problems.append({"kind": "read_and_overwritten", "severity": "warning", "entity": f.entity,
                                 "fields": [f.field], "systems": [t],
                                 "message": f"{t} both supplies {f.entity}.{f.field} ({role}) and has it written into it"})
    # Physical columns: an edge per (source column -> target column) of every field; a loop is a write cycle.
    graph: dict[str, set[str]] = {}
    label: dict[tuple[str, str], str] = {}
    for f in fields:
        for s in f.sources:
            for t in f.send_to:
                if t not in f.columns or s == t:
                    continue
                a, b = _node(cfg, f.entity, s, f.columns[s]), _node(cfg, f.entity, t, f.columns[t])
                graph.setdefault(a, set()).add(b)
                graph.setdefault(b, set())
                label[(a, b)] = f"{f.entity}.{f.field}"
    for component in _cycles(graph):
        members = sorted(component)
        via = sorted({label[(a, b)] for a in members for b in graph[a] if b in component})
        problems.append({"kind": "write_cycle", "severity": "error", "entity": None, "fields": via,
                         "systems": sorted({m.split(".", 1)[0] for m in members}), "columns": members,
                         "message": f"write cycle: {' -> '.join(members + members[:1])} (through {', '.join(via)}); "
                                    f"values would chase each other on every run"})
    return problems


def _cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """Strongly connected components with more than one node (Tarjan, iterative): the write cycles."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    out: list[set[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                comp = set()
                while True:
                    n = stack.pop()
                    on_stack.discard(n)
                    comp.add(n)
                    if n == node:
                        break
                if len(comp) > 1:
                    out.append(comp)
    return out


def matrix(fm: FlowMap) -> list[dict]:
    """The ownership matrix: one row per entity field, one cell per system: owner | fallback N | sent to |
    read (mapped, not a source of the golden value) | "" (not mapped); plus `candidate` for strategy sources."""
    rows = []
    for f in fm.fields:
        cells = {}
        for s in fm.systems:
            roles = []
            if s == f.owner:
                roles.append("owner")
            if s in f.fallback:
                roles.append(f"fallback {f.fallback.index(s) + 1}")
            if s in f.sources and s != f.owner and s not in f.fallback:
                roles.append("candidate")
            if s in f.send_to:
                roles.append("sent to")
            if not roles and s in f.mapped_by:
                roles.append("read")
            cells[s] = ", ".join(roles)
        rows.append({"entity": f.entity, "field": f.field, "cells": cells})
    return rows


def mermaid(fm: FlowMap) -> str:
    """A Mermaid flowchart: systems -> golden.<entity> (fields each system supplies) -> systems (fields sent).
    Links involved in a problem are drawn red."""
    lines = ["flowchart LR"]
    for s in fm.systems:
        lines.append(f"    {s}[({s})]")
    link = 0
    bad_links = []
    flagged = {(p.get("entity"), sys_, fld) for p in fm.problems for sys_ in p["systems"] for fld in p["fields"]}
    flagged_fields = {fld for p in fm.problems if p["kind"] == "write_cycle" for fld in p["fields"]}
    for e in fm.entities:
        g = f"golden_{e}"
        lines.append(f'    {g}{{{{"golden.{e}"}}}}')
        supplied: dict[str, list[str]] = {}
        sent: dict[str, list[str]] = {}
        for f in (f for f in fm.fields if f.entity == e):
            for s in f.sources:
                supplied.setdefault(s, []).append(f.field)
            for t in f.send_to:
                sent.setdefault(t, []).append(f.field)
        for s, fs in sorted(supplied.items()):
            lines.append(f'    {s} -->|"{", ".join(fs)}"| {g}')
            link += 1
        for t, fs in sorted(sent.items()):
            lines.append(f'    {g} -->|"{", ".join(fs)}"| {t}')
            if any((e, t, fld) in flagged or f"{e}.{fld}" in flagged_fields for fld in fs):
                bad_links.append(link)
            link += 1
    if bad_links:
        lines.append(f"    linkStyle {','.join(map(str, bad_links))} stroke:#c62828,stroke-width:3px")
    for p in fm.problems:
        lines.append(f"    %% {p['severity']}: {p['message']}")
    return "\n".join(lines) + "\n"
