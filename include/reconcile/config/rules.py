"""Cross-field rules checked after parsing and before anything runs.

Each rule returns (key path, message) pairs; the loader turns them into Problems with line numbers.
These encode the product's promises: one writable owner per field, nothing written back into its owner,
no secrets inline, eligibility expressions that are plain boolean expressions over known fields.
"""
from __future__ import annotations

import re

from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from .expressions import check_expression
from .models import NAME_RE, Config

_CRON_FIELD = re.compile(r"^[\d*/,\-A-Za-z?LW#]+$")
_PRESETS = {"@once", "@hourly", "@daily", "@weekly", "@monthly", "@yearly", "@annually", "@continuous"}

Issue = tuple[tuple, str]


def _check_regions(cfg: Config) -> list[Issue]:
    import phonenumbers

    known = phonenumbers.SUPPORTED_REGIONS
    issues: list[Issue] = []
    places = [(("defaults", "phone_region"), cfg.defaults.phone_region)]
    places += [(("systems", s, "phone_region"), c.phone_region) for s, c in cfg.systems.items() if c.phone_region]
    for e, ent in cfg.entities.items():
        for s, src in ent.sources.items():
            for f, m in src.fields.items():
                try:
                    steps = m.steps
                except ValueError:
                    continue
                places += [(("entities", e, "sources", s, "fields", f, "transform"), st.region)
                           for st in steps if st.name == "phone" and st.region]
    for path, region in places:
        if region not in known:
            issues.append((path, f"unknown phone region {region!r}; use an ISO 3166 code such as US, GB, DE"))
    return issues


def check_rules(cfg: Config, expressions: bool = True) -> list[Issue]:
    issues: list[Issue] = _check_regions(cfg)
    issues += _check_names(cfg)
    issues += _check_schedule(cfg)
    issues += _check_systems(cfg)
    for name, entity in cfg.entities.items():
        issues += _check_entity(cfg, name, expressions)
    return issues


def _check_names(cfg: Config) -> list[Issue]:
    issues = []
    for s in cfg.systems:
        if not NAME_RE.match(s):
            issues.append((("systems", s), "system names are lowercase identifiers ([a-z][a-z0-9_]*): they name tables"))
    for e, entity in cfg.entities.items():
        if not NAME_RE.match(e):
            issues.append((("entities", e), "entity names are lowercase identifiers ([a-z][a-z0-9_]*): they name tables"))
        for f in entity.fields:
            if not NAME_RE.match(f) or f.startswith("_"):
                issues.append((("entities", e, "fields", f),
                               "canonical field names are lowercase identifiers ([a-z][a-z0-9_]*): they name columns"))
    if not cfg.systems:
        issues.append((("systems",), "at least one system is required"))
    if not cfg.entities:
        issues.append((("entities",), "at least one entity is required"))
    return issues


def _check_schedule(cfg: Config) -> list[Issue]:
    s = cfg.schedule
    if s is None or s in _PRESETS:
        return []
    parts = s.split()
    if len(parts) != 5 or not all(_CRON_FIELD.match(p) for p in parts):
        return [(("schedule",), f"expected a 5-field cron expression (e.g. '0 2 * * *'), a preset like @daily, or null; got {s!r}")]
    return []


def _check_systems(cfg: Config) -> list[Issue]:
    issues = []
    for name, system in cfg.systems.items():
        issues += _check_system_kind(name, system)
        if system.url:
            try:
                url = make_url(system.url)
            except ArgumentError:
                issues.append((("systems", name, "url"), "not a valid SQLAlchemy URL (e.g. sqlite:///systems/crm.db)"))
                continue
            if url.password:
                issues.append((("systems", name, "url"),
                               "a password is inline in 'url'; move the URL to an environment variable ('url_env') "
                               "or an Airflow connection ('connection')"))
        if system.url_env and not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", system.url_env):
            issues.append((("systems", name, "url_env"), "must be an environment variable name, not a URL"))
        for i, field in enumerate(system.unique):
            mapped_somewhere = any(
                name in e.sources and field in e.sources[name].fields for e in cfg.entities.values()
            )
            if not mapped_somewhere:
                issues.append((("systems", name, "unique", i),
                               f"canonical field {field!r} is not mapped from system {name!r} in any entity"))
    return issues


def _check_system_kind(name: str, system) -> list[Issue]:
    """Where the system is: SQL (url | url_env | connection), API (api + base_url + token_env | connection)
    or a folder of exports (files)."""
    path = ("systems", name)
    given = [k for k in ("url", "url_env", "connection", "base_url", "token_env", "files") if getattr(system, k)]
    if system.api:
        if system.connection:
            extra = [k for k in given if k not in ("connection", "base_url")]
            if extra:
                return [(path, f"an API system with 'connection' takes its URL and token from the connection; "
                               f"remove {', '.join(extra)}")]
            return []
        missing = [k for k in ("base_url", "token_env") if not getattr(system, k)]
        extra = [k for k in given if k not in ("base_url", "token_env")]
        out = [(path, f"an API system (api: {system.api}) needs {' and '.join(missing)} (or an Airflow 'connection')")
               ] if missing else []
        if extra:
            out.append((path, f"an API system does not take {', '.join(extra)}"))
        if system.base_url and not re.match(r"^https?://[^/@\s]+(/\S*)?$", system.base_url):
            out.append((path + ("base_url",), "expected an http(s) URL without credentials, e.g. https://api.hubapi.com"))
        if system.token_env and not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", system.token_env):
            out.append((path + ("token_env",), "must be an environment variable name, not a token"))
        return out
    if system.files:
        extra = [k for k in given if k != "files"]
        return [(path, f"a file system ('files') does not take {', '.join(extra)}")] if extra else []
    if any(getattr(system, k) for k in ("base_url", "token_env")):
        return [(path, "'base_url' and 'token_env' belong to API systems: set 'api' (hubspot or dynamics)")]
    sql = [k for k in given if k in ("url", "url_env", "connection")]
    if len(sql) != 1:
        return [(path, "set exactly one of 'url' (no password inline), 'url_env' (an environment variable "
                       f"holding the URL) or 'connection' (an Airflow connection id); got {', '.join(sql) or 'none'}"
                       " (or 'api' for an API system, 'files' for a folder of exports)")]
    return []


def _check_sources_of_kind(cfg: Config, ename: str) -> list[Issue]:
    """API and file systems read a named object / file pattern (`table`), never a SQL query; files are read-only."""
    issues: list[Issue] = []
    entity = cfg.entities[ename]
    for sname, source in entity.sources.items():
        if sname not in cfg.systems:
            continue
        kind = cfg.system_kind(sname)
        spath = ("entities", ename, "sources", sname)
        if kind != "sql" and source.query is not None:
            what = "an object name" if kind != "files" else "a file name or glob"
            issues.append((spath + ("query",), f"system {sname!r} is a {kind} system: 'table' names {what}; "
                                               "queries are for SQL systems"))
        if kind != "files" and source.pick is not None:
            issues.append((spath + ("pick",), f"'pick' is for file systems; {sname!r} is a {kind} system"))
        if kind == "files":
            w = cfg.systems[sname].writes
            targets = [f for f, spec in entity.fields.items() if sname in spec.send_to]
            if targets or w.create or w.archive or cfg.systems[sname].xid_column:
                what = (f"fields {', '.join(targets)} are sent to it" if targets else
                        "writes.create/archive or xid_column are set")
                issues.append((("systems", sname), f"system {sname!r} is a folder of exports (read-only) but {what}; "
                                                   "a file system can only be a source"))
    return issues


def _check_entity(cfg: Config, ename: str, expressions: bool = True) -> list[Issue]:
    entity = cfg.entities[ename]
    base = ("entities", ename)
    issues: list[Issue] = []
    systems = set(cfg.systems)
    sources = set(entity.sources)

    if not entity.sources:
        issues.append((base + ("sources",), "at least one source is required"))
    for sname, source in entity.sources.items():
        spath = base + ("sources", sname)
        if sname not in systems:
            issues.append((spath, f"no system named {sname!r} is configured under 'systems' "
                                  f"(configured: {', '.join(sorted(systems)) or 'none'})"))
        if (source.table is None) == (source.query is None):
            issues.append((spath, "set exactly one of 'table' or 'query'"))
        if source.query is not None and ";" in source.query.strip().rstrip(";"):
            issues.append((spath + ("query",), "must be a single SELECT statement (no ';')"))
        for fname, mapping in source.fields.items():
            try:
                steps = mapping.steps
            except ValueError as e:
                issues.append((spath + ("fields", fname, "transform"), str(e)))
                steps = []
            if fname not in entity.fields:
                issues.append((spath + ("fields", fname),
                               f"{fname!r} is not a canonical field of entity {ename!r}; declare it under "
                               f"entities.{ename}.fields"))
                continue
            ftype = entity.fields[fname].type
            names = [t.name for t in steps]
            if ftype != "string" and any(n in ("email", "phone", "lower", "upper") for n in names):
                issues.append((spath + ("fields", fname, "transform"),
                               f"text transforms ({', '.join(names)}) need a string field; {fname!r} is {ftype}"))

    for fname, field in entity.fields.items():
        fpath = base + ("fields", fname)
        if not field.owner:
            issues.append((fpath + ("owner",), "every canonical field needs exactly one owner (a system name)"))
        else:
            issues += _check_system_ref(entity, ename, fname, field.owner, fpath + ("owner",), systems, sources)
        for i, fb in enumerate(field.fallback):
            if fb == field.owner:
                issues.append((fpath + ("fallback", i), f"{fb!r} is the owner; fallback lists other systems"))
            else:
                issues += _check_system_ref(entity, ename, fname, fb, fpath + ("fallback", i), systems, sources)
        for i, target in enumerate(field.send_to):
            if target == field.owner:
                issues.append((fpath + ("send_to", i),
                               f"{fname!r} is owned by {target!r}; a field is never sent to the system that owns it"))
            else:
                issues += _check_system_ref(entity, ename, fname, target, fpath + ("send_to", i), systems, sources)
        for i, target in enumerate(field.send_to):
            src = entity.sources.get(target)
            if src is not None and src.table is None:
                issues.append((fpath + ("send_to", i),
                               f"{target!r} reads entity {ename!r} through a query; reconcile writes only to a 'table'"))
        if len(set(field.send_to)) != len(field.send_to):
            issues.append((fpath + ("send_to",), "lists a system twice"))
        issues += _check_strategy(entity, ename, fname, fpath, systems, sources)

    issues += _check_gates(entity, base + ("gates",), systems, sources)
    for sname, source in entity.sources.items():
        w = cfg.systems[sname].writes if sname in cfg.systems else None
        if w is not None and (w.create or w.archive) and source.table is None:
            issues.append((("systems", sname, "writes"),
                           f"{sname!r} reads entity {ename!r} through a query; creates and archives need a 'table'"))
        if w is not None and w.archive is not None and not w.archive.hard_delete and not w.archive.column:
            issues.append((("systems", sname, "writes", "archive"),
                           "set 'column' and 'value' for a soft delete, or 'hard_delete: true'"))
    issues += _check_match(entity, ename, base)
    issues += _check_sources_of_kind(cfg, ename)
    field_types = {f: spec.type for f, spec in entity.fields.items()}
    for target, text in entity.eligibility.items():
        epath = base + ("eligibility", target)
        if target not in systems:
            issues.append((epath, f"no system named {target!r} is configured under 'systems'"))
        elif target not in sources:
            issues.append((epath, f"system {target!r} has no source for entity {ename!r}"))
        for msg in (check_expression(text, field_types) if expressions else
                    (["must be a single expression: ';' is not allowed"] if ";" in text else [])):
            issues.append((epath, msg))
    return issues


def _check_system_ref(entity, ename: str, fname: str, system: str, path: tuple, systems: set, sources: set) -> list[Issue]:
    if system not in systems:
        return [(path, f"{system!r} is not a configured system (configured: {', '.join(sorted(systems))})")]
    if system not in sources:
        return [(path, f"system {system!r} has no source for entity {ename!r} (add entities.{ename}.sources.{system})")]
    if fname not in entity.sources[system].fields:
        return [(path, f"system {system!r} does not map field {fname!r} "
                       f"(add it under entities.{ename}.sources.{system}.fields)")]
    return []


def _check_gates(entity, path: tuple, systems: set, sources: set) -> list[Issue]:
    from .models import GATE_KINDS

    issues: list[Issue] = []
    levels = [(path, entity.gates)] + [(path + ("systems", s), o) for s, o in entity.gates.systems.items()]
    for s in entity.gates.systems:
        if s not in sources:
            issues.append((path + ("systems", s), f"system {s!r} has no source for this entity"))
    for p, level in levels:
        for kind in level.severity:
            if kind not in GATE_KINDS:
                issues.append((p + ("severity", kind), f"unknown gate {kind!r}; known: {', '.join(GATE_KINDS)}"))
        for name, fields in (level.duplicate_keys or {}).items():
            if not NAME_RE.match(name):
                issues.append((p + ("duplicate_keys", name), "duplicate key names are lowercase identifiers"))
            for i, f in enumerate(fields):
                if f not in entity.fields:
                    issues.append((p + ("duplicate_keys", name, i), f"{f!r} is not a canonical field"))
    return issues


def _check_match(entity, ename: str, base: tuple) -> list[Issue]:
    issues: list[Issue] = []
    names = [r.name for r in entity.match]
    for i, rule in enumerate(entity.match):
        rpath = base + ("match", i)
        if not NAME_RE.match(rule.name):
            issues.append((rpath + ("name",), "rule names are lowercase identifiers"))
        if names.count(rule.name) > 1:
            issues.append((rpath + ("name",), f"rule name {rule.name!r} is used twice"))
        if not rule.fields:
            issues.append((rpath + ("fields",), "a rule needs at least one field"))
        for key in ("fields", "exact", "block_on"):
            for j, entry in enumerate(getattr(rule, key)):
                for f in (entry if isinstance(entry, list) else [entry]):
                    if f not in entity.fields:
                        issues.append((rpath + (key, j), f"{f!r} is not a canonical field of entity {ename!r}"))
        if rule.type == "probabilistic" and not rule.block_on:
            issues.append((rpath + ("block_on",), "a probabilistic rule needs block_on fields (so cost grows linearly)"))
        if rule.type == "exact" and (rule.block_on or rule.link_threshold is not None):
            issues.append((rpath, "block_on and link_threshold apply to probabilistic rules only"))
        if rule.type == "exact" and rule.review_threshold is not None:
            issues.append((rpath, "review_threshold applies to probabilistic rules only"))
        review = rule.review_threshold if rule.review_threshold is not None else entity.identity.review_threshold
        if rule.link_threshold is not None and rule.link_threshold < review:
            issues.append((rpath + ("link_threshold",), "must be at least review_threshold"))
    if entity.identity.link_threshold < entity.identity.review_threshold:
        issues.append((base + ("identity", "link_threshold"), "must be at least review_threshold"))
    for sname, source in entity.sources.items():
        for target, column in source.external_ids.items():
            if target not in entity.sources or target == sname:
                issues.append((base + ("sources", sname, "external_ids", target),
                               f"{target!r} must be another system with a source for entity {ename!r}"))
    return issues


_VALUE_TYPES = {"string": (str,), "boolean": (bool,), "integer": (int,), "number": (int, float)}


def _check_strategy(entity, ename: str, fname: str, fpath: tuple, systems: set, sources: set) -> list[Issue]:
    """How the golden value is chosen: priority and restrictive_values only where they mean something."""
    field = entity.fields[fname]
    issues: list[Issue] = []
    if field.priority and field.strategy == "owner":
        issues.append((fpath + ("priority",), "applies to strategies first_non_null, most_recent and most_restrictive; "
                                              "strategy owner uses 'fallback' after the owner"))
    if field.priority and field.fallback:
        issues.append((fpath + ("priority",), "set either 'fallback' or 'priority', not both: priority replaces the "
                                              "owner-then-fallback order"))
    for i, system in enumerate(field.priority):
        issues += _check_system_ref(entity, ename, fname, system, fpath + ("priority", i), systems, sources)
    if len(set(field.priority)) != len(field.priority):
        issues.append((fpath + ("priority",), "lists a system twice"))
    if field.strategy == "most_restrictive":
        if not field.restrictive_values:
            issues.append((fpath + ("restrictive_values",),
                           "strategy most_restrictive needs restrictive_values, most restrictive first "
                           "(e.g. [true] for an opt-out flag)"))
        for i, value in enumerate(field.restrictive_values):
            ok = _VALUE_TYPES.get(field.type)
            wrong = value is None or (ok is not None and (not isinstance(value, ok) or
                                                          (field.type != "boolean" and isinstance(value, bool))))
            if wrong:
                issues.append((fpath + ("restrictive_values", i), f"{value!r} is not a {field.type} value"))
    elif field.restrictive_values:
        issues.append((fpath + ("restrictive_values",), "applies to strategy most_restrictive only"))
    if field.strategy == "most_recent" and field.owner:
        mapped_by = [s for s, src in entity.sources.items() if fname in src.fields]
        for system in field.candidate_systems(mapped_by):
            if system in entity.sources and entity.sources[system].modified_at is None:
                issues.append((fpath + ("strategy",),
                               f"most_recent compares modified times, but source {system!r} has no modified_at "
                               f"(set entities.{ename}.sources.{system}.modified_at, or leave {system!r} out "
                               f"of 'priority')"))
    return issues


def check_expressions(cfg: Config) -> list[Issue]:
    """Only the eligibility-expression rules (for a config loaded with check_expressions=False)."""
    issues: list[Issue] = []
    for ename, entity in cfg.entities.items():
        types = {f: spec.type for f, spec in entity.fields.items()}
        for target, text in entity.eligibility.items():
            issues += [(("entities", ename, "eligibility", target), m) for m in check_expression(text, types)]
    return issues
