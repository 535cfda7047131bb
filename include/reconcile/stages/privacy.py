"""Privacy: erasure that holds (docs/golden.md#erasure-reconcile-erase), set-based.

Suppression by record (no golden row, never re-created) starts when the request is recorded
(stages/golden.py `erase`), and the systems are anonymised through the plan and the gated load
(stages/plan.py, stages/load.py). This module adds what makes it hold:

- `record_erasure`: at the request, the person's normalised emails, phones, record keys and xid are kept
  as salted hashes (`identity.erased_identifiers`; the salt never enters the warehouse), with their consent
  state;
- `suppress_reappeared`: called by identity resolution before it links anything; a staged record holding
  an erased identifier is suppressed like the person's own records (never linked, minted or created
  anywhere) and raises an `erased_identifier` review item that names no value;
- `purge_erased`: blanks every erased person's values in the warehouse tables (staging and history,
  quarantined raw rows, golden lineage, planned changes, link evidence, quality samples, review items);
- `forget`: the visible `purge_erased` stage of every run and of `reconcile erase`: the above, then the
  kept run files and Data Docs holding the person are rewritten, and so is the working warehouse file, so
  no old copy survives in its free blocks (the published file is a fresh copy of it).

Keys stay, so every record can still be followed, and the erasure itself stays auditable.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
from pathlib import Path

from ..config.models import Config
from ..errors import ReconcileError
from ..transforms import quote_ident as q, sql_literal
from ..warehouse import compact, open_work, staging_table, table_exists, transaction, upsert_review_items
from .golden import conflicts_table, erased_keys_sql, lineage_table

SALT_ENV = "RECONCILE_ERASURE_SALT"
SALT_FILE = "erasure.salt"
REVIEW_KIND = "erased_identifier"
IDENTIFIER_TRANSFORMS = ("email", "phone")
MIN_SCRUB_LENGTH = 5  # shorter values are not looked for in Data Docs text (too many false hits)
ERASED = "[erased]"


# ----------------------------------------------------------------------------------------------------------
# The salt and the hashed identifiers
# ----------------------------------------------------------------------------------------------------------

def erasure_salt(cfg: Config) -> str:
    """The salt of erased identifiers' hashes: `$RECONCILE_ERASURE_SALT`, else `<state_dir>/erasure.salt`,
    generated once (owner-only file). Never stored in a warehouse table."""
    env = os.environ.get(SALT_ENV)
    if env:
        return env
    path = cfg.state_dir / SALT_FILE
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # made meanwhile by another process
            pass
        else:
            with os.fdopen(fd, "w") as fh:
                fh.write(secrets.token_hex(32))
    salt = path.read_text().strip()
    if not salt:
        raise ReconcileError(f"the erasure salt file {path} is empty: restore it (or set ${SALT_ENV})")
    return salt


def _salt_id(salt: str) -> str:
    return hashlib.sha256(f"reconcile-erasure-salt|{salt}".encode()).hexdigest()[:16]


def _checked_salt(con, cfg: Config, entity: str) -> str:
    """The salt, refused when hashes stored earlier were made with another one (they could never match)."""
    salt = erasure_salt(cfg)
    other = con.execute("SELECT DISTINCT salt_id FROM identity.erased_identifiers WHERE entity = ? AND salt_id <> ?",
                        [entity, _salt_id(salt)]).fetchall()
    if other:
        raise ReconcileError(f"the erasure salt changed: identity.erased_identifiers of {entity!r} were hashed with "
                             f"another salt (${SALT_ENV} or {cfg.state_dir / SALT_FILE}); restore the old one, or "
                             f"erased people are no longer recognised when they reappear")
    return salt


def _hash(kind: str, value: str) -> str:
    """SQL: the salted hash of one identifier (the salt is the statement's `$salt` parameter)."""
    return f"sha256($salt || {kind} || ':' || {value})"


def identifiers_sql(con, cfg: Config, entity: str, history: bool = False) -> str:
    """SELECT (system, record_key, kind, value) of every identifier staged for `entity` (or in its history):
    the normalised values of fields with an `email` or `phone` transform, stored record keys of other
    systems (`key:<system>`) and stored xids. NULL when nothing is staged yet."""
    ent = cfg.entities[entity]
    parts = []
    for system, source in sorted(ent.sources.items()):
        table = staging_table(system, entity) + ("_history" if history else "")
        cols = [(f"'{step}'", q(f)) for f, m in source.fields.items() for step in IDENTIFIER_TRANSFORMS
                if any(s.name == step for s in m.steps) and ent.fields[f].type == "string"]
        cols += [(sql_literal("key:" + other), q("_ext_" + other)) for other in sorted(source.external_ids)]
        if cfg.systems[system].xid_column:
            cols.append(("'xid'", q("_xid")))
        present = {q(c) for c in _columns(con, table)}
        parts += [f"SELECT {sql_literal(system)} AS system, CAST(_record_key AS VARCHAR) AS record_key, "
                  f"{kind} AS kind, CAST({col} AS VARCHAR) AS value FROM {table} WHERE {col} IS NOT NULL"
                  for kind, col in cols if col in present]
    return " UNION ALL ".join(parts) if parts else None


def _consent_fields(cfg: Config, entity: str) -> list[str]:
    return [f for f, d in cfg.entities[entity].fields.items() if d.strategy == "most_restrictive"]


def record_erasure(con, cfg: Config, entity: str, xid: str, request_id: str) -> int:
    """At an erasure request (after stages.golden.erase): keep the person's identifiers as salted hashes in
    identity.erased_identifiers, and their consent state (the current `most_restrictive` golden values) in
    identity.erasures.consent. Returns how many identifiers are kept."""
    salt = _checked_salt(con, cfg, entity)
    staged = [s for s in (identifiers_sql(con, cfg, entity), identifiers_sql(con, cfg, entity, history=True)) if s]
    theirs = (f"SELECT i.kind, i.value FROM ({' UNION ALL '.join(staged)}) i JOIN identity.erased_records r "
              f"ON r.entity = $entity AND r.xid = $xid AND r.system = i.system AND r.record_key = i.record_key "
              f"UNION ALL " if staged else "")
    params = {"entity": entity, "xid": xid, "request_id": request_id, "salt": salt, "salt_id": _salt_id(salt)}
    with transaction(con):
        before = con.execute("SELECT count(*) FROM identity.erased_identifiers WHERE entity = $entity AND xid = $xid",
                             {"entity": entity, "xid": xid}).fetchone()[0]
        con.execute(f"""
            INSERT INTO identity.erased_identifiers (entity, kind, hash, xid, request_id, salt_id)
            SELECT DISTINCT $entity, kind, {_hash('kind', 'value')}, $xid, $request_id, $salt_id FROM (
                {theirs}
                SELECT 'key:' || system AS kind, record_key AS value FROM identity.erased_records
                WHERE entity = $entity AND xid = $xid
                UNION ALL SELECT 'xid', $xid)
            ON CONFLICT DO NOTHING""", params)
        consent = _consent_fields(cfg, entity)
        if consent and table_exists(con, lineage_table(entity)):
            con.execute(f"""
                UPDATE identity.erasures SET consent = (
                    SELECT json_group_object(field, value) FROM (
                        SELECT field, arg_max(value, valid_from) AS value FROM {lineage_table(entity)}
                        WHERE xid = $xid AND field IN (SELECT unnest($fields::VARCHAR[])) GROUP BY field))
                WHERE entity = $entity AND xid = $xid""", {"entity": entity, "xid": xid, "fields": consent})
        after = con.execute("SELECT count(*) FROM identity.erased_identifiers WHERE entity = $entity AND xid = $xid",
                            {"entity": entity, "xid": xid}).fetchone()[0]
    return after - before


def suppress_reappeared(con, cfg: Config, entity: str, run_id: str, run_at) -> int:
    """Staged records holding an identifier of an erased person (their hash is in
    identity.erased_identifiers), not linked to a live person: suppressed from now on like the erased
    person's own records (added to identity.erased_records: identity resolution never links or mints them,
    golden never takes a value from them, so nothing is created anywhere), each with an `erased_identifier`
    review item naming the record, the kinds that matched, the erasure request and its consent state, never
    a value. Set-based: the staged identifiers are hashed in SQL and joined to the stored hashes.
    Returns the records newly suppressed."""
    if not con.execute("SELECT count(*) FROM identity.erased_identifiers WHERE entity = ?", [entity]).fetchone()[0]:
        return 0
    staged = identifiers_sql(con, cfg, entity)
    if staged is None:
        return 0
    salt = _checked_salt(con, cfg, entity)
    con.execute(f"""
        CREATE OR REPLACE TEMP TABLE _reappeared AS
        SELECT s.system, s.record_key, list(DISTINCT s.kind ORDER BY s.kind) AS kinds,
               min(e.xid) AS xid, min(e.request_id) AS request_id
        FROM (SELECT system, record_key, kind, {_hash('kind', 'value')} AS hash FROM ({staged})) s
        JOIN identity.erased_identifiers e ON e.entity = $entity AND e.kind = s.kind AND e.hash = s.hash
        ANTI JOIN identity.erased_records r ON r.entity = $entity AND r.system = s.system AND r.record_key = s.record_key
        ANTI JOIN (SELECT x.system, x.record_key FROM identity.xref x WHERE x.entity = $entity
                   AND x.xid NOT IN (SELECT xid FROM identity.erasures WHERE entity = $entity)) live
             ON live.system = s.system AND live.record_key = s.record_key
        GROUP BY s.system, s.record_key""", {"entity": entity, "salt": salt})
    n = con.execute("SELECT count(*) FROM _reappeared").fetchone()[0]
    if not n:
        return 0
    con.execute("""INSERT INTO identity.erased_records (entity, system, record_key, xid, request_id)
                   SELECT ?, system, record_key, xid, request_id FROM _reappeared ON CONFLICT DO NOTHING""", [entity])
    upsert_review_items(con, f"""
        SELECT 'era_' || substr(sha256({sql_literal(entity)} || '|' || r.system || '|' || r.record_key), 1, 16)
                   AS item_id,
               r.system,
               r.system || ' record ' || r.record_key || ' holds an identifier of a person erased by request ' ||
                   r.request_id || ' (' || array_to_string(r.kinds, ', ') ||
                   '): suppressed, not linked and not created anywhere' AS title,
               CAST(json_object('system', r.system, 'record_key', r.record_key, 'matched', to_json(r.kinds),
                                'erased_xid', r.xid, 'request_id', r.request_id,
                                'consent', er.consent, 'priority', 1.0) AS JSON) AS details
        FROM _reappeared r LEFT JOIN identity.erasures er ON er.entity = {sql_literal(entity)} AND er.xid = r.xid""",
                        entity, REVIEW_KIND, run_id, run_at)
    return n


# ----------------------------------------------------------------------------------------------------------
# Purge: the warehouse tables
# ----------------------------------------------------------------------------------------------------------

def _columns(con, table: str) -> set[str]:
    schema, _, name = table.partition(".")
    return {c for (c,) in con.execute("SELECT column_name FROM information_schema.columns WHERE table_schema = ? "
                                      "AND table_name = ?", [schema, name]).fetchall()}


def _clear_values(con, cfg: Config, entity: str) -> list[str]:
    """The identifier values (normalised and as extracted) of erased records still staged: what to look for
    in files that only hold text (Data Docs, gate outcomes). Read before `purge_erased` blanks them."""
    ent = cfg.entities[entity]
    parts = []
    for system, source in sorted(ent.sources.items()):
        cols = [c for f, m in source.fields.items() if any(s.name in IDENTIFIER_TRANSFORMS for s in m.steps)
                for c in (f, "_raw_" + m.column)]
        for table in (staging_table(system, entity), staging_table(system, entity) + "_history"):
            present = _columns(con, table)
            parts += [f"SELECT CAST({q(c)} AS VARCHAR) AS v FROM {table} WHERE _record_key IN "
                      f"(SELECT record_key FROM _erased WHERE system = {sql_literal(system)}) AND {q(c)} IS NOT NULL"
                      for c in cols if c in present]
    if not parts:
        return []
    return [v for (v,) in con.execute(
        f"SELECT DISTINCT trim(v) FROM ({' UNION ALL '.join(parts)}) WHERE length(trim(v)) >= ? ORDER BY 1",
        [MIN_SCRUB_LENGTH]).fetchall()]


def purge_erased(con, cfg: Config, entity: str) -> dict:
    """Blank every erased person's values in the warehouse tables. Returns counts of rows touched per place
    (only rows that still held a value, so a second purge touches nothing)."""
    return _purge(con, cfg, entity)[0]


def _purge(con, cfg: Config, entity: str) -> tuple[dict, list[str]]:
    """`purge_erased`, plus the identifier values it blanked (`_clear_values`), for files holding text."""
    if not con.execute("SELECT count(*) FROM identity.erasures WHERE entity = ?", [entity]).fetchone()[0]:
        return {}, []
    ent = cfg.entities[entity]
    con.execute(f"CREATE OR REPLACE TEMP TABLE _erased AS {erased_keys_sql(entity)}")
    values = _clear_values(con, cfg, entity)
    con.execute("CREATE OR REPLACE TEMP TABLE _scrub AS SELECT DISTINCT lower(unnest(?::VARCHAR[])) AS v", [values])
    touched: dict[str, int] = {}
    with transaction(con):
        for system, source in sorted(ent.sources.items()):
            name = f"{system}__{entity}"
            names = [f for f in source.fields if ent.fields[f].type == "string"]
            names += ["_raw_" + c for c in dict.fromkeys([m.column for m in source.fields.values()])
                      if c != source.key]
            for table in (name, f"{name}_history"):
                present = _columns(con, f"staging.{table}")
                cols = [q(c) for c in names if c in present]
                if not cols:
                    continue
                touched[f"staging.{table}"] = con.execute(f"""
                    UPDATE staging.{table} SET {', '.join(f'{c} = NULL' for c in cols)}
                    WHERE _record_key IN (SELECT record_key FROM _erased WHERE system = ?)
                      AND ({' OR '.join(f'{c} IS NOT NULL' for c in cols)})""", [system]).fetchone()[0]
            touched[f"audit.quarantine:{system}"] = con.execute(
                """UPDATE audit.quarantine SET raw = '{"erased": true}', reason = 'erased'
                   WHERE entity = ? AND system = ? AND record_key IN (SELECT record_key FROM _erased WHERE system = ?)
                     AND reason <> 'erased'""",
                [entity, system, system]).fetchone()[0]
        if table_exists(con, lineage_table(entity)):
            touched["lineage"] = con.execute(
                f"UPDATE {lineage_table(entity)} SET value = NULL WHERE xid IN (SELECT xid FROM _erased) "
                f"AND value IS NOT NULL").fetchone()[0]
        if table_exists(con, conflicts_table(entity)):  # candidates' values: NOT NULL columns, so the rows go
            touched["conflicts"] = con.execute(
                f"DELETE FROM {conflicts_table(entity)} WHERE xid IN (SELECT xid FROM _erased)").fetchone()[0]
        touched["audit.changes"] = con.execute(
            """UPDATE audit.changes SET before_value = NULL, after_value = NULL, before_image = NULL, expected = NULL,
                      after_raw = CASE WHEN operation = 'erase' THEN after_raw END
               WHERE entity = ? AND xid IN (SELECT xid FROM _erased)
                 AND (before_value IS NOT NULL OR after_value IS NOT NULL OR before_image IS NOT NULL
                      OR expected IS NOT NULL OR (operation <> 'erase' AND after_raw IS NOT NULL))""",
            [entity]).fetchone()[0]
        # Link evidence holds the compared values of both sides: the erased record's own, and a record's
        # that was scored against it (`_with`).
        touched["identity.xref"] = con.execute(
            """UPDATE identity.xref x SET evidence = NULL FROM _erased e
               WHERE x.entity = ? AND x.evidence IS NOT NULL AND e.system = x.system AND e.record_key = x.record_key""",
            [entity]).fetchone()[0]
        touched["identity.xref"] += con.execute(
            """UPDATE identity.xref x SET evidence = NULL
               WHERE x.entity = ? AND x.evidence->>'_with' IN (SELECT system || ':' || record_key FROM _erased)""",
            [entity]).fetchone()[0]
        # Review items naming an erased person anywhere in their details (an xid, a record key, system:key):
        # every string of the details is listed once (json_tree) and joined to the erased keys.
        con.execute(f"""
            CREATE OR REPLACE TEMP TABLE _erased_items AS
            SELECT DISTINCT i.item_id FROM review.items i, json_tree(i.details) t
            WHERE i.entity = ? AND i.kind <> '{REVIEW_KIND}' AND t.type = 'VARCHAR'
              AND CAST(i.details AS VARCHAR) <> '{{"erased":true}}'
              AND (t.atom->>'$' IN (SELECT xid FROM _erased)
                   OR t.atom->>'$' IN (SELECT system || ':' || record_key FROM _erased)
                   OR (t.key = 'record_key' AND t.atom->>'$' IN (SELECT record_key FROM _erased)))""", [entity])
        touched["review.items"] = con.execute(
            """UPDATE review.items SET details = '{"erased": true}', title = 'erased: ' || kind
               WHERE item_id IN (SELECT item_id FROM _erased_items)""").fetchone()[0]
        touched["audit.quality_results"] = _purge_samples(con, entity)
    return {k: v for k, v in touched.items() if v}, values


def _purge_samples(con, entity: str) -> int:
    """Quality samples (audit.quality_results.sample, a few offending values) holding a value of an erased
    record: those values become "[erased]". Set-based: samples are unnested and joined to the values."""
    con.execute("""CREATE OR REPLACE TEMP TABLE _samples AS
                   SELECT rowid AS rid, unnest(CAST(sample AS VARCHAR[])) AS v,
                          generate_subscripts(CAST(sample AS VARCHAR[]), 1) AS i
                   FROM audit.quality_results WHERE entity = ? AND json_array_length(sample) > 0""", [entity])
    con.execute("CREATE OR REPLACE TEMP TABLE _sample_hits AS SELECT DISTINCT s.rid, s.i FROM _samples s "
                "JOIN _scrub c ON c.v = lower(trim(s.v))")
    return con.execute(f"""
        UPDATE audit.quality_results q SET sample = c.sample FROM (
            SELECT s.rid, to_json(list(CASE WHEN h.rid IS NULL THEN s.v ELSE '{ERASED}' END ORDER BY s.i)) AS sample
            FROM _samples s LEFT JOIN _sample_hits h USING (rid, i)
            WHERE s.rid IN (SELECT rid FROM _sample_hits) GROUP BY s.rid) c
        WHERE q.rowid = c.rid""").fetchone()[0]


# ----------------------------------------------------------------------------------------------------------
# Forget: the stage (tables, run files, Data Docs, the warehouse file itself)
# ----------------------------------------------------------------------------------------------------------

def forget(cfg: Config, entity: str, docs_root: Path) -> dict:
    """Remove every erased person of `entity` from what reconcile keeps: the warehouse tables
    (`purge_erased`), the rows of kept run extracts (`<runs>/<run>/<entity>/<system>.parquet`, rewritten
    without them), their values in gate outcomes and Data Docs under `docs_root`, then the working
    warehouse file is rewritten (`warehouse.compact`). Returns counts per place; nothing when nothing held
    a value. The caller publishes afterwards (a fresh copy of the rewritten file)."""
    from .. import runstore

    with open_work(cfg) as con:
        if not con.execute("SELECT count(*) FROM identity.erasures WHERE entity = ?", [entity]).fetchone()[0]:
            return {}
        touched, values = _purge(con, cfg, entity)
        rewritten = bool(touched)
        folders = runstore.kept_folders(cfg, entity)
        for folder in folders:
            touched.update(_rewrite_extracts(con, cfg, entity, folder))
    pattern = re.compile("|".join(re.escape(v) for v in sorted(values, key=len, reverse=True)), re.IGNORECASE) \
        if values else None
    if pattern is not None:
        scrubbed = sum(_scrub_file(p, pattern) for p in sorted(docs_root.rglob("*")) if p.is_file())
        scrubbed += sum(folder.rewrite_text(name, lambda text: pattern.sub(ERASED, text))
                        for folder in folders for name in folder.names() if name.endswith(".json"))
        if scrubbed:
            touched["files scrubbed"] = scrubbed
    if rewritten:  # values were blanked: their old copies are still in the file's free blocks
        compact(cfg)
    return touched


def _rewrite_extracts(con, cfg: Config, entity: str, folder) -> dict:
    """Rewrite the run's extracts of `entity` that hold an erased record, without its rows."""
    out = {}
    for system, source in sorted(cfg.entities[entity].sources.items()):
        name = f"{system}.parquet"
        if not folder.exists(name):
            continue
        key = f"NULLIF(CAST({q(source.key)} AS VARCHAR), '')"
        with folder.local(name) as path:
            scan = f"read_parquet({sql_literal(str(path))})"
            erased = f"{key} IN (SELECT record_key FROM _erased WHERE system = {sql_literal(system)})"
            n = con.execute(f"SELECT count(*) FROM {scan} WHERE {erased}").fetchone()[0]
            if not n:
                continue
            with folder.replacing(name) as tmp:
                con.execute(f"COPY (SELECT * FROM {scan} WHERE {key} IS NULL OR NOT ({erased})) "
                            f"TO {sql_literal(str(tmp))} (FORMAT parquet)")
        out[folder.url(name)] = n
    return out


def _scrub_file(path: Path, pattern: re.Pattern) -> int:
    """Replace the values in one text file (a Data Docs page or JSON); binary files are left alone."""
    try:
        text = path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return 0
    new = pattern.sub(ERASED, text)
    if new == text:
        return 0
    tmp = path.with_name(f".{path.name}.erased.tmp")
    tmp.write_text(new, encoding="utf-8")
    os.replace(tmp, path)
    return 1


# ----------------------------------------------------------------------------------------------------------
# What an erasure blanks in a system (`systems.<s>.writes.erase`)
# ----------------------------------------------------------------------------------------------------------

def erase_spec(cfg: Config, entity: str, target: str) -> str:
    """The `after_raw` of an `erase` change into `target`: JSON `{"mode", "columns"}`; for anonymize, the
    columns mapped to string fields plus the configured `columns`, without the key and `retain`. With
    `columns: all` it also carries `"all": true` and `"retain"`, resolved against the system's real columns
    when the load starts (`resolve_erase_spec`)."""
    source = cfg.entities[entity].sources[target]
    ent = cfg.entities[entity]
    settings = cfg.systems[target].writes.erase_settings
    if settings.mode == "delete":
        return json.dumps({"mode": "delete", "columns": []})
    named = [] if settings.columns == "all" else settings.columns
    columns = {m.column for f, m in source.fields.items() if ent.fields[f].type == "string"} | set(named)
    spec = {"mode": "anonymize", "columns": sorted(columns - {source.key} - set(settings.retain))}
    if settings.columns == "all":
        spec.update({"all": True, "retain": sorted(settings.retain)})
    return json.dumps(spec)


def resolve_erase_spec(raw: str, real_columns) -> str | None:
    """An `erase` change's spec configured with `columns: all`, with the system's real columns (`real_columns`,
    the connector's: every one but the key and `modified_at`) minus `retain`: what the load blanks, what a
    resumed load verifies and what audit.changes names once recorded. None for any other spec."""
    spec = json.loads(raw)
    if not spec.get("all"):
        return None
    return json.dumps({"mode": spec["mode"],
                       "columns": sorted((set(spec["columns"]) | set(real_columns)) - set(spec["retain"]))})
