"""Plan: golden records + xref + each target's staged state -> audit.changes (what each system needs).

Every planned change is justified by ownership (only fields configured with `send_to` the target; never a
field the target owns), eligibility, and the golden value's lineage. Then, per target, in order:
  held    - the identity is held by the collision guard, a value breaks the target's limits (length,
            control / bidi / zero-width characters: `writes.limits`), or the change would break the target's
            `unique:` rules in its planned state (two creates with one email; an update to an email another has);
  blocked - an error-level quality gate failed on a system involved (audit.write_blocks);
  planned - everything else: loaded if the target's change counts are within its thresholds, or approved.
Set-based: one INSERT ... SELECT per operation and target. What a target holds is what reconcile last wrote
there (audit.write_ledger) where that write is newer than the staged row, else the staged row: a target that
does not stamp its modified time on our writes still converges.

Incremental: a run plans only the xids whose changes can differ from the last plan's: those golden's
incremental build would call dirty since that plan (records extracted or deleted, links made or undone,
erasures, status changes: `golden.dirty_sql`) and every xid the last plan had a change for, whatever became
of it (applied, held, blocked, failed, awaiting approval, dry run): a change still needed is planned again
exactly as a full plan would. Every other xid had no change then and nothing it depends on moved, so a full
plan gives it none now. A full plan runs when unsure (`_full_reason`): the first plan, a configuration
change of the entity or its targets, a target planned for the first time, a full extract or a full golden
rebuild this run, a run since the last plan that failed or did not plan, or target writes or rollbacks
recorded since the last plan by another run (`reconcile load` / `approve` / `rollback` of an older run).
"""
from __future__ import annotations

import hashlib
import json
from datetime import datetime

from ..config.expressions import to_duckdb_sql
from ..config.models import DEFAULT_CHANGE_THRESHOLDS, DEFAULT_MAX_TEXT_LENGTH, Config
from ..transforms import quote_ident as q, sql_literal
from ..warehouse import once, staging_table, table_exists
from . import privacy
from .golden import dirty_sql, golden_table, lineage_table

STAGE = "plan"
OPERATIONS = ("create", "update", "link", "archive", "erase")


# Every column of audit.changes, in the order each planning SELECT gives them.
CHANGE_COLUMNS = ("change_id, run_id, entity, target, record_key, xid, operation, field, column_name, before_value, "
                  "after_value, after_raw, status, reason, lineage, expected, before_image, applied_at, error, "
                  "load_attempt")


def _reverse(expr: str, steps) -> str:
    """Canonical value -> the value the target stores (inverse of its value map; else the canonical text)."""
    maps = [s for s in steps if s.name == "map"]
    text = f"CAST({expr} AS VARCHAR)"
    if not maps:
        return text
    inverse: dict[str, str] = {}
    for k, v in sorted(maps[-1].mapping.items()):
        inverse.setdefault(sql_literal(v), k)
    whens = " ".join(f"WHEN {v} THEN {sql_literal(k)}" for v, k in inverse.items())
    return f"(CASE {text} {whens} ELSE {text} END)"


def plan(con, cfg: Config, entity: str, run_id: str, run_at: datetime, full: bool = False) -> dict:
    """Write this run's changes for every target into audit.changes. Idempotent per run id.

    Incremental (only the xids whose changes can differ from the last plan's, see the module docstring)
    unless `_full_reason` finds a reason, or `full` is set; the summary's `mode`, `reason` and
    `xids_planned` say which and how many."""
    ent = cfg.entities[entity]

    def _body() -> dict:
        con.execute("DELETE FROM audit.changes WHERE run_id = ? AND entity = ?", [run_id, entity])
        con.execute("DELETE FROM audit.approvals WHERE run_id = ? AND entity = ?", [run_id, entity])
        has_golden = table_exists(con, f"golden.{entity}")
        targets = [t for t in sorted(ent.sources) if table_exists(con, f"staging.{t}__{entity}")]
        state = _state(con, cfg, entity, run_id, targets)
        reason = "requested" if full else _full_reason(con, cfg, entity, run_id, state, has_golden)
        _scope(con, cfg, entity, run_id, incremental=reason is None)
        for target in targets:
            _plan_target(con, cfg, entity, target, run_id, run_at, has_golden, incremental=reason is None)
        summary = _thresholds(con, cfg, entity, run_id, run_at)
        summary.update(mode="full" if reason else "incremental",
                       reason=reason or "only xids whose records, links, decisions or changes moved",
                       xids_planned=con.execute("SELECT count(*) FROM _plan_xids").fetchone()[0], **state)
        con.execute("DROP TABLE _plan_xids")
        return summary

    return once(con, run_id, entity, STAGE, run_at, _body)


def _state(con, cfg: Config, entity: str, run_id: str, targets: list[str]) -> dict:
    """What the next run compares to decide whether it may plan incrementally (kept in the plan's result)."""
    ent = cfg.entities[entity]
    systems = {t: {"kind": cfg.system_kind(t), "erase": privacy.erase_spec(cfg, entity, t),
                   **cfg.systems[t].model_dump(mode="json", include={"creates_identity", "xid_column", "unique",
                                                                     "writes"})} for t in ent.sources}
    payload = json.dumps({"entity": ent.model_dump(mode="json"), "systems": systems}, sort_keys=True, default=str)
    ledger, rolled_back = con.execute("""
        SELECT (SELECT count(*) FROM audit.write_ledger WHERE entity = $1 AND run_id <> $2),
               (SELECT count(*) FROM audit.changes WHERE entity = $1 AND status = 'rolled_back')""",
                                      [entity, run_id]).fetchone()
    return {"plan_config_hash": hashlib.sha256(payload.encode()).hexdigest()[:16], "targets_planned": targets,
            "writes_before": ledger, "rolled_back_before": rolled_back}


def _full_reason(con, cfg: Config, entity: str, run_id: str, state: dict, has_golden: bool) -> str | None:
    """Why this run must plan every xid (None: the incremental plan gives exactly what a full one would)."""
    prev = _previous(con, entity, run_id)
    if prev is None:
        return "first plan"
    prev_run, prev_at, last = prev
    if not has_golden:
        return "no golden table"
    if last.get("mode") is None:
        return "the last plan recorded no state to compare"
    if last.get("plan_config_hash") != state["plan_config_hash"]:
        return "entity or target configuration changed"
    if last.get("targets_planned") != state["targets_planned"]:
        return "the set of targets changed"
    golden_run = con.execute("SELECT result FROM audit.stage_runs WHERE run_id = ? AND entity = ? AND stage = 'golden'",
                             [run_id, entity]).fetchone()
    if golden_run is None or json.loads(golden_run[0]).get("mode") != "incremental":
        return "golden records were rebuilt in full"
    if con.execute("SELECT count(*) FROM audit.extracts WHERE run_id = ? AND entity = ? AND mode = 'full'",
                   [run_id, entity]).fetchone()[0]:
        return "a full extract"
    others = con.execute("""SELECT count(*) FILTER (WHERE run_id <> $2),
                                   count(*) FILTER (WHERE run_id = $2 AND status IN ('running', 'failed'))
                            FROM audit.runs WHERE entity = $1 AND run_id <> $3 AND run_at >= $4""",
                         [entity, prev_run, run_id, prev_at]).fetchone()
    if others[0] or others[1]:
        return "a run since the last plan failed or did not plan"
    ledger, rolled_back = con.execute("""
        SELECT (SELECT count(*) FROM audit.write_ledger WHERE entity = $1 AND run_id NOT IN ($2, $3)),
               (SELECT count(*) FROM audit.changes WHERE entity = $1 AND status = 'rolled_back')""",
                                      [entity, prev_run, run_id]).fetchone()
    if ledger != last.get("writes_before") or rolled_back != last.get("rolled_back_before"):
        return "writes or rollbacks of another run since the last plan"
    return None


def _previous(con, entity: str, run_id: str) -> tuple[str, datetime, dict] | None:
    """The last plan before this run: its run id, run time and result."""
    row = con.execute("""SELECT run_id, finished_at, result FROM audit.stage_runs
                         WHERE entity = ? AND stage = ? AND run_id <> ?
                         ORDER BY finished_at DESC, run_id DESC LIMIT 1""", [entity, STAGE, run_id]).fetchone()
    return None if row is None else (row[0], row[1], json.loads(row[2]))


def _scope(con, cfg: Config, entity: str, run_id: str, incremental: bool) -> None:
    """`_plan_xids`: the xids this run plans. Incremental: the dirty ones since the last plan and every xid
    that plan had a change for; full: every xid of a golden record or a link."""
    e = sql_literal(entity)
    if incremental:
        prev_run, prev_at, _ = _previous(con, entity, run_id)
        xids = (f"{dirty_sql(con, cfg.entities[entity], entity, prev_run, prev_at)} "
                f"UNION SELECT xid FROM audit.changes WHERE run_id = {sql_literal(prev_run)} AND entity = {e}")
    else:
        golden = (f"SELECT xid FROM {golden_table(entity)} UNION "
                  if table_exists(con, golden_table(entity)) else "")
        xids = f"{golden}SELECT xid FROM identity.xref WHERE entity = {e}"
    con.execute(f"CREATE OR REPLACE TEMP TABLE _plan_xids AS SELECT DISTINCT xid FROM ({xids}) WHERE xid IS NOT NULL")


def _plan_target(con, cfg: Config, entity: str, target: str, run_id: str, run_at: datetime, has_golden: bool,
                 incremental: bool) -> None:
    """Plan one target's changes; `incremental`: only for the xids of `_plan_xids`."""
    ent = cfg.entities[entity]
    sysconf = cfg.systems[target]
    source = ent.sources[target]
    st = staging_table(target, entity)
    e, t, r = sql_literal(entity), sql_literal(target), sql_literal(run_id)
    elig = f"({to_duckdb_sql(ent.eligibility[target], column_prefix='g')})" if target in ent.eligibility else "TRUE"
    mod_col = source.modified_at
    # What the load checks before writing (optimistic concurrency): the modified time as the system holds it,
    # or, without one, every mapped column.
    watched = [mod_col] if mod_col else [m.column for m in source.fields.values()]
    expected = "to_json(struct_pack(" + ", ".join(f"{q(c)} := s.{q('_raw_' + c)}" for c in watched) + "))"
    inserts = []
    _last_written(con, entity, target)

    def scoped(xid: str) -> str:
        """Only the xids this run plans (every xid on a full plan)."""
        return f"AND {xid} IN (SELECT xid FROM _plan_xids)" if incremental else ""

    def written(column: str) -> str:
        """The join to what reconcile last wrote into this column of the staged record (see `_last_written`)."""
        return (f"LEFT JOIN _last_written lw ON lw.record_key = s._record_key "
                f"AND lw.column_name = {sql_literal(column)}")

    def differs(after_raw: str, canonical_differs: str) -> str:
        """Does the target hold another value than the one to write? What it holds is what we last wrote
        there when that write came after the staged row was read, else the staged value: a target that does
        not stamp its modified time on our writes is never re-read, and its stale staged row must not
        re-plan the same write every night."""
        return (f"(CASE WHEN lw.run_at >= s._extracted_at THEN lw.value_hash <> md5(coalesce({after_raw}, chr(0))) "
                f"ELSE {canonical_differs} END)")

    def change_id(key_expr: str, field_expr: str, op: str) -> str:
        return (f"substr(md5({r} || '|' || {t} || '|' || {key_expr} || '|' || {field_expr} || '|' || '{op}'), 1, 20)")

    if has_golden:
        lt = lineage_table(entity)
        for fname, mapping in source.fields.items():
            field = ent.fields[fname]
            if target not in field.send_to:
                continue
            after_raw = _reverse(f"g.{q(fname)}", mapping.steps)
            blank_ok = "TRUE" if sysconf.writes.blanks_overwrite else f"g.{q(fname)} IS NOT NULL"
            inserts.append(f"""
                SELECT {change_id('x.record_key', sql_literal(fname), 'update')} AS change_id, {r}, {e}, {t},
                       x.record_key, g.xid, 'update', {sql_literal(fname)}, {sql_literal(mapping.column)},
                       CAST(s.{q(fname)} AS VARCHAR), CAST(g.{q(fname)} AS VARCHAR), {after_raw},
                       'planned', {sql_literal(f'{fname} is owned by {field.owner}; {target} holds another value')},
                       (SELECT l.source_system || ':' || l.source_record_key || ' (' || l.rule || ')' FROM {lt} l
                        WHERE l.xid = g.xid AND l.field = {sql_literal(fname)} AND l.valid_to IS NULL LIMIT 1),
                       {expected}, NULL, NULL, NULL, NULL
                FROM {golden_table(entity)} g
                JOIN identity.xref x ON x.entity = {e} AND x.xid = g.xid AND x.system = {t}
                JOIN {st} s ON s._record_key = x.record_key
                {written(mapping.column)}
                WHERE {differs(after_raw, f'g.{q(fname)} IS DISTINCT FROM s.{q(fname)}')}
                  AND {blank_ok} AND {elig} {scoped('g.xid')}""")
        if sysconf.writes.create:
            cols = [(f, m) for f, m in source.fields.items() if ent.fields[f].owner != target]
            values = ", ".join(f"{q(m.column)} := {_reverse(f'g.{q(f)}', m.steps)}" for f, m in cols)
            if sysconf.xid_column:
                values += f", {q(sysconf.xid_column)} := g.xid"
            inserts.append(f"""
                SELECT {change_id('g.xid', "'*'", 'create')}, {r}, {e}, {t}, NULL, g.xid, 'create', NULL, NULL,
                       NULL, NULL, CAST(to_json(struct_pack({values})) AS VARCHAR), 'planned',
                       {sql_literal(f'eligible for {target} and no record there yet')}, NULL, NULL, NULL, NULL, NULL, NULL
                FROM {golden_table(entity)} g
                WHERE {elig} {scoped('g.xid')}
                  AND NOT EXISTS (SELECT 1 FROM identity.xref x WHERE x.entity = {e} AND x.xid = g.xid AND x.system = {t})""")
    if sysconf.xid_column:
        inserts.append(f"""
            SELECT {change_id('x.record_key', "'_xid'", 'link')}, {r}, {e}, {t}, x.record_key, x.xid, 'link', '_xid',
                   {sql_literal(sysconf.xid_column)}, s._xid, x.xid, x.xid, 'planned',
                   'store the cross-system id so the next run matches by stored id', NULL, {expected},
                   NULL, NULL, NULL, NULL
            FROM identity.xref x JOIN {st} s ON s._record_key = x.record_key
            JOIN identity.xids i ON i.xid = x.xid AND i.status = 'active'
            {written(sysconf.xid_column)}
            WHERE x.entity = {e} AND x.system = {t} AND {differs('x.xid', 's._xid IS DISTINCT FROM x.xid')}
              {scoped('x.xid')} AND x.xid NOT IN (SELECT xid FROM identity.erasures WHERE entity = {e})""")
    arch = sysconf.writes.archive
    if arch is not None:
        creators = [s for s in ent.sources if cfg.systems[s].creates_identity]
        present = " UNION ".join(
            f"SELECT x2.xid FROM identity.xref x2 JOIN {staging_table(s, entity)} s2 ON s2._record_key = x2.record_key "
            f"WHERE x2.entity = {e} AND x2.system = {sql_literal(s)}" for s in creators
            if table_exists(con, f"staging.{s}__{entity}")) or "SELECT NULL::VARCHAR AS xid WHERE FALSE"
        op_field = "'*'" if arch.hard_delete else sql_literal(arch.column or "")
        inserts.append(f"""
            SELECT {change_id('x.record_key', op_field, 'archive')}, {r}, {e}, {t}, x.record_key, x.xid, 'archive',
                   {op_field}, {sql_literal(arch.column) if arch.column else 'NULL'}, NULL, NULL,
                   {'NULL' if arch.hard_delete else sql_literal(arch.value)}, 'planned',
                   'its identity is gone from every identity source', NULL, {expected}, NULL, NULL, NULL, NULL
            FROM identity.xref x JOIN {st} s ON s._record_key = x.record_key
            WHERE x.entity = {e} AND x.system = {t} AND x.xid NOT IN ({present}) {scoped('x.xid')}
              AND x.xid IN (SELECT xid FROM identity.xref WHERE entity = {e}
                            AND system IN ({', '.join(sql_literal(c) for c in creators) or 'NULL'}))
              AND NOT EXISTS (SELECT 1 FROM audit.changes c WHERE c.entity = {e} AND c.target = {t}
                              AND c.record_key = x.record_key AND c.operation = 'archive' AND c.status = 'applied')""")
    erase_spec = privacy.erase_spec(cfg, entity, target)  # what `writes.erase` blanks (or delete)
    inserts.append(f"""
        SELECT {change_id('x.record_key', "'*'", 'erase')}, {r}, {e}, {t}, x.record_key, x.xid, 'erase', '*', NULL,
               NULL, NULL, {sql_literal(erase_spec)}, 'planned', 'erasure request ' || er.request_id, NULL,
               NULL, NULL, NULL, NULL, NULL
        FROM identity.erasures er JOIN identity.xref x ON x.entity = er.entity AND x.xid = er.xid AND x.system = {t}
        JOIN {st} s ON s._record_key = x.record_key
        WHERE er.entity = {e} {scoped('x.xid')}
          AND NOT EXISTS (SELECT 1 FROM audit.changes c WHERE c.entity = {e} AND c.target = {t}
                          AND c.record_key = x.record_key AND c.operation = 'erase' AND c.status = 'applied')""")
    for sql in inserts:
        con.execute(f"INSERT INTO audit.changes ({CHANGE_COLUMNS}) {sql}")

    # Erased people get nothing but their erasure.
    con.execute(f"""UPDATE audit.changes SET status = 'held', reason = 'erasure requested: only the erasure is written'
                    WHERE run_id = {r} AND entity = {e} AND target = {t} AND operation <> 'erase'
                      AND xid IN (SELECT xid FROM identity.erasures WHERE entity = {e})""")
    # Collision guard: nothing about a held identity is written to that target.
    con.execute(f"""UPDATE audit.changes c SET status = 'held', reason = h.reason || ' (review item ' || h.item_id || ')'
                    FROM audit.holds h
                    WHERE c.run_id = {r} AND c.entity = {e} AND c.target = {t} AND c.status = 'planned'
                      AND h.run_id = c.run_id AND h.entity = c.entity AND h.target = c.target AND h.identity = c.xid""")
    # Failed error gates: every write into the target, or writes of the failing system's fields.
    con.execute(f"""UPDATE audit.changes c SET status = 'blocked', reason = b.reason
                    FROM audit.write_blocks b
                    WHERE c.run_id = {r} AND c.entity = {e} AND c.target = {t} AND c.status = 'planned'
                      AND b.run_id = c.run_id AND b.entity = c.entity AND b.target = c.target
                      AND (b.field = '*' OR b.field = c.field
                           -- a create or archive carries every field: any block on the target stops it
                           OR c.operation IN ('create', 'archive'))""")
    _hold_over_limits(con, cfg, entity, target, run_id)
    # Target-rule pre-check: the target's unique fields in its planned state. Every planned value carries the
    # change that would write it, so the changes to hold are found by equi-joins (never a join on an OR).
    for ufield in sysconf.unique:
        if ufield not in source.fields:
            continue
        col = source.fields[ufield].column
        con.execute(f"""
            CREATE OR REPLACE TEMP TABLE _planned_state AS
            WITH upd AS (SELECT record_key, change_id, after_value FROM audit.changes
                         WHERE run_id = {r} AND entity = {e} AND target = {t} AND status = 'planned'
                           AND operation = 'update' AND field = {sql_literal(ufield)})
            SELECT CASE WHEN u.after_value IS NOT NULL THEN u.change_id END AS change_id,
                   lower(coalesce(u.after_value, CAST(s.{q(ufield)} AS VARCHAR))) AS v
            FROM {st} s LEFT JOIN upd u ON u.record_key = s._record_key
            UNION ALL
            SELECT change_id, lower(CAST(after_raw AS JSON)->>{sql_literal(col)}) FROM audit.changes
            WHERE run_id = {r} AND entity = {e} AND target = {t} AND status = 'planned' AND operation = 'create'
        """)
        con.execute(f"""
            UPDATE audit.changes c SET status = 'held',
                   reason = 'would break the unique {ufield} rule of {target}: ' || p.v || ' would be held by '
                            || p.n || ' records'
            FROM (SELECT s.change_id, d.v, d.n FROM _planned_state s
                  JOIN (SELECT v, count(*) AS n FROM _planned_state WHERE v IS NOT NULL
                        GROUP BY v HAVING count(*) > 1) d ON d.v = s.v
                  WHERE s.change_id IS NOT NULL) p
            WHERE c.run_id = {r} AND c.entity = {e} AND c.target = {t} AND c.status = 'planned'
              AND c.change_id = p.change_id
        """)


# What `writes.limits.characters: hold` refuses (RE2 classes): control characters but tab, LF and CR; bidi
# embeddings, overrides and isolates; zero-width characters and the byte-order mark.
CHARACTER_CLASSES = {
    "a control character": r"[\x{0}-\x{8}\x{B}\x{C}\x{E}-\x{1F}\x{7F}]",
    "a bidi control character": r"[\x{202A}-\x{202E}\x{2066}-\x{2069}]",
    "a zero-width character": r"[\x{200B}-\x{200D}\x{2060}\x{FEFF}]",
}
LIMITS_REASON = "over the target's limits: "


def _hold_over_limits(con, cfg: Config, entity: str, target: str, run_id: str) -> None:
    """Hold planned values the target cannot or must not take (`writes.limits`): longer than the column's
    limit (the smaller of the configured one and the declared VARCHAR(n); else the API's default), or
    holding control, bidi or zero-width characters. Never sent; `reason` says which value and why."""
    ent, sysconf = cfg.entities[entity], cfg.systems[target]
    source = ent.sources[target]
    limits = sysconf.writes.limits
    declared = dict(con.execute("SELECT column_name, max_length FROM audit.column_limits WHERE entity = ? "
                                "AND system = ?", [entity, target]).fetchall())
    columns = list(dict.fromkeys([m.column for m in source.fields.values()] +
                                 ([sysconf.xid_column] if sysconf.xid_column else [])))
    lengths = {}
    for col in columns:
        configured = limits.columns.get(col) or limits.max_length or DEFAULT_MAX_TEXT_LENGTH.get(
            cfg.system_kind(target))
        known = [n for n in (configured, declared.get(col)) if n]
        if known:
            lengths[col] = min(known)
    r, e, t = sql_literal(run_id), sql_literal(entity), sql_literal(target)
    mine = f"run_id = {r} AND entity = {e} AND target = {t} AND status = 'planned'"
    # Every value about to be sent, one row per change and column (a create carries one per column).
    con.execute(f"""
        CREATE OR REPLACE TEMP TABLE _sent AS
        SELECT change_id, column_name, after_raw AS v FROM audit.changes
        WHERE {mine} AND operation IN ('update', 'link') AND after_raw IS NOT NULL
        UNION ALL
        SELECT c.change_id, k.column_name, CAST(c.after_raw AS JSON)->>k.column_name FROM audit.changes c
        CROSS JOIN (SELECT unnest(?::VARCHAR[]) AS column_name) k
        WHERE {mine.replace('run_id', 'c.run_id')} AND c.operation = 'create'
    """, [columns])
    checks = ["CASE WHEN length(s.v) > l.max_length THEN 'value for ' || s.column_name || ' has ' || length(s.v) "
              "|| ' characters, more than ' || l.max_length END"]
    if limits.characters == "hold":
        checks += [f"CASE WHEN regexp_matches(s.v, {sql_literal(rx)}) THEN 'value for ' || s.column_name || "
                   f"' holds U+' || printf('%04X', unicode(regexp_extract(s.v, {sql_literal(rx)}))) || "
                   f"{sql_literal(', ' + what)} END" for what, rx in CHARACTER_CLASSES.items()]
    con.execute(f"""
        UPDATE audit.changes c SET status = 'held', reason = {sql_literal(LIMITS_REASON)} || p.why
                                                              || ' (systems.{target}.writes.limits)'
        FROM (SELECT change_id, string_agg(why, '; ' ORDER BY why) AS why FROM (
                  SELECT s.change_id, coalesce({', '.join(checks)}) AS why
                  FROM _sent s LEFT JOIN (SELECT unnest(?::VARCHAR[]) AS column_name,
                                                 unnest(?::BIGINT[]) AS max_length) l USING (column_name)
                  WHERE s.v IS NOT NULL)
              WHERE why IS NOT NULL GROUP BY change_id) p
        WHERE c.change_id = p.change_id
    """, [list(lengths), list(lengths.values())])
    con.execute("DROP TABLE _sent")


def _last_written(con, entity: str, target: str) -> None:
    """`_last_written`: per record and column of the target, the value (hash) reconcile last wrote there
    and its run's time, from audit.write_ledger; writes undone by a rollback do not count."""
    con.execute("""
        CREATE OR REPLACE TEMP TABLE _last_written AS
        SELECT record_key, column_name, value_hash, run_at FROM (
            SELECT w.record_key, w.column_name, w.value_hash, r.run_at,
                   row_number() OVER (PARTITION BY w.record_key, w.column_name
                                      ORDER BY r.run_at DESC, w.written_at DESC) AS rn
            FROM audit.write_ledger w
            JOIN audit.changes c ON c.change_id = w.change_id AND c.status = 'applied'
            JOIN audit.runs r ON r.run_id = w.run_id AND r.entity = w.entity
            WHERE w.entity = ? AND w.target = ?)
        WHERE rn = 1""", [entity, target])


def _thresholds(con, cfg: Config, entity: str, run_id: str, run_at: datetime) -> dict:
    """Per target: counts by operation and status; whether the load needs approval (audit.approvals)."""
    ent = cfg.entities[entity]
    out: dict[str, dict] = {}
    rows = con.execute("""SELECT target, operation, status, count(*) FROM audit.changes
                          WHERE run_id = ? AND entity = ? GROUP BY ALL ORDER BY ALL""", [run_id, entity]).fetchall()
    for target, op, status, n in rows:
        t = out.setdefault(target, {"planned": 0, "held": 0, "blocked": 0, "by_operation": {}})
        t["by_operation"].setdefault(op, {})[status] = n
        if status in t:
            t[status] += n
    over = dict(con.execute("""SELECT target, count(*) FROM audit.changes WHERE run_id = ? AND entity = ?
                               AND status = 'held' AND starts_with(reason, ?) GROUP BY 1""",
                            [run_id, entity, LIMITS_REASON]).fetchall())
    for target, t in out.items():
        t["held_over_limits"] = over.get(target, 0)
        size = con.execute(f"SELECT count(*) FROM {staging_table(target, entity)}").fetchone()[0]
        limits = ent.gates.for_system(target).changes
        reasons = []
        for op, default in DEFAULT_CHANGE_THRESHOLDS.items():
            n = t["by_operation"].get(op, {}).get("planned", 0)
            lim = limits.get(op)
            max_n = lim.max if lim and lim.max is not None else default["max"]
            share = lim.max_share if lim and lim.max_share is not None else default["max_share"]
            if n > max_n:
                reasons.append(f"{n} {op}s > max {max_n}")
            elif share is not None and size and n > share * size and n > 0:
                reasons.append(f"{n} {op}s > {share:.0%} of {size} records")
        t["needs_approval"] = bool(reasons)
        t["approval_reasons"] = reasons
        con.execute("INSERT INTO audit.approvals (run_id, entity, target, required, reasons) VALUES (?, ?, ?, ?, ?)",
                    [run_id, entity, target, bool(reasons), json.dumps(reasons)])
    return {"targets": out}
