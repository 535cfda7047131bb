"""Identity resolution: staging -> identity.xref (persistent cross-system ids), review.items, identity.model.

Called by runner.resolve_identity (the `resolve_identity` step of every run). Every record of every system
gets at most one xid; links are made in this order, every run, and only for records not linked yet
(existing links are kept, so an xid stays with its record when its email changes):
  0. steward decisions (review.decisions) not applied yet: they win over every rule;
  1. stored IDs: our xid in the system's `xid_column`, or another system's key in an `external_ids` column;
  2. exact rules (`match:` type exact, or the derived email rule), one-to-one only, and never when the
     names contradict the key (same email, first and last name both different: a shared mailbox);
  3. the match model (stages/identity_model.py, Splink): the records new or changed since they were last
     scored get a match probability against every record sharing a blocking key; a probability at or
     above link_threshold links (one-to-one, no competing candidate, no contradiction);
  4. creates_identity systems mint a new xid for each record still unmatched (never two records of one
     system on one xid automatically), then steps 1-3 run again against the new xids (no new scoring);
  5. records in the review band (review_threshold <= p < link_threshold, or not one-to-one) get one
     candidate item listing their best candidates; the rest get their own xid (identity.orphans: create,
     the default) or wait as orphan items (review).
Within-system duplicates (same exact key, or a same-system pair in the review band) are flagged for
stewards, never merged. Everything is set-based SQL over temp tables; Python only loops over rules,
systems and decisions.
"""
from __future__ import annotations

import json
from datetime import datetime

from ..config.models import Config
from ..errors import ReconcileError
from ..transforms import quote_ident as q, sql_literal
from ..warehouse import once, staging_table, table_exists
from . import identity_model, privacy
from .identity_model import FULL_NAME, ModelSpec, match_rules, model_spec

STAGE = "identity"
KINDS = ("candidate", "orphan", "duplicate", "conflict")
MAX_CANDIDATES = 5  # listed per candidate item, best first


def _norm(col: str) -> str:
    return f"NULLIF(lower(trim(CAST({col} AS VARCHAR))), '')"


def _match_fields(cfg: Config, entity: str, spec: ModelSpec | None) -> list[str]:
    fields: list[str] = []
    for rule in match_rules(cfg, entity):
        fields += rule.fields + rule.exact
        for entry in rule.block_on:
            fields += entry if isinstance(entry, list) else [entry]
    fields += list(_name_fields(cfg, entity))
    return list(dict.fromkeys(fields))


def _name_fields(cfg: Config, entity: str) -> tuple[str, ...]:
    """(first, last) canonical name fields, when the entity has both: the shared-mailbox guard reads them."""
    ent = cfg.entities[entity]
    firsts = [f for f in ent.fields if identity_model.FIELD_KINDS.get(f) == "first_name"]
    lasts = [f for f in ent.fields if identity_model.FIELD_KINDS.get(f) == "last_name"]
    return (firsts[0], lasts[0]) if firsts and lasts else ()


def _ext_targets(cfg: Config, entity: str) -> list[str]:
    ent = cfg.entities[entity]
    return sorted({t for s in ent.sources.values() for t in s.external_ids})


def _build_records(con, cfg: Config, entity: str, spec: ModelSpec | None) -> None:
    """_recs: one row per staged record of every system, match fields normalised, stored IDs alongside."""
    ent = cfg.entities[entity]
    fields = _match_fields(cfg, entity, spec)
    exts = _ext_targets(cfg, entity)
    names = _name_fields(cfg, entity)
    parts = []
    for system, source in sorted(ent.sources.items()):
        if not table_exists(con, staging_table(system, entity)):
            continue
        cols = [f"{sql_literal(system)} AS system", "CAST(_record_key AS VARCHAR) AS record_key",
                f"{sql_literal(system + ':')} || CAST(_record_key AS VARCHAR) AS rid",
                f"{'TRUE' if cfg.systems[system].creates_identity else 'FALSE'} AS creates",
                "_source_modified_at AS modified_at"]
        cols += [f"{_norm(q(f)) if f in source.fields else 'CAST(NULL AS VARCHAR)'} AS {q(f)}" for f in fields]
        cols.append("_xid" if cfg.systems[system].xid_column else "CAST(NULL AS VARCHAR) AS _xid")
        cols += [(q('_ext_' + t) if t in source.external_ids else f"CAST(NULL AS VARCHAR) AS {q('_ext_' + t)}")
                 for t in exts]
        parts.append(f"SELECT {', '.join(cols)} FROM {staging_table(system, entity)}")
    if not parts:
        raise ReconcileError(f"entity {entity!r} has no staging tables yet: extract before resolving identities")
    full = (f", NULLIF(concat_ws(' ', {q(names[0])}, {q(names[1])}), '') AS {q(FULL_NAME)}" if names
            else f", CAST(NULL AS VARCHAR) AS {q(FULL_NAME)}")
    con.execute(f"CREATE OR REPLACE TEMP TABLE _recs AS SELECT *{full} FROM ({' UNION ALL '.join(parts)})")


def _contradicted(cfg: Config, entity: str, a: str, b: str) -> str:
    """SQL: records a and b name two different people (first AND last name both different, not swapped).

    A shared key (e.g. one mailbox) is then no evidence of one person: the shared-mailbox guard."""
    names = _name_fields(cfg, entity)
    if not names:
        return "FALSE"
    f, l = (q(n) for n in names)
    return (f"({a}.{f} IS NOT NULL AND {a}.{l} IS NOT NULL AND {b}.{f} IS NOT NULL AND {b}.{l} IS NOT NULL "
            f"AND jaro_winkler_similarity({a}.{f}, {b}.{f}) < 0.8 AND jaro_winkler_similarity({a}.{l}, {b}.{l}) < 0.8 "
            f"AND NOT (jaro_winkler_similarity({a}.{f}, {b}.{l}) >= 0.92 "
            f"AND jaro_winkler_similarity({a}.{l}, {b}.{f}) >= 0.92))")


class _Run:
    """Bookkeeping for one resolution run: links and review items written through here."""

    def __init__(self, con, cfg: Config, entity: str, run_id: str, run_at: datetime):
        self.con, self.cfg, self.entity, self.run_id, self.run_at = con, cfg, entity, run_id, run_at
        con.execute("CREATE OR REPLACE TEMP TABLE _seen_items (item_id VARCHAR)")
        # Records with an open candidate item this run: not minted as orphans, not given a second item.
        con.execute("CREATE OR REPLACE TEMP TABLE _in_review (system VARCHAR, record_key VARCHAR)")
        self.stats = {"split": 0, "merged": 0, "decisions": 0, "pairs_scored": 0, "review_band": 0}
        self.scoring = None  # (model, spec) once the match model is ready
        self.splink = None  # the run's Splink database (records, term frequencies), closed by resolve

    # -- links ------------------------------------------------------------------------------------------
    def link_from(self, sql: str) -> int:
        """Insert links from a query yielding (system, record_key, xid, rule, confidence, evidence);
        returns how many."""
        con = self.con
        con.execute(f"CREATE OR REPLACE TEMP TABLE _new AS SELECT DISTINCT ON (system, record_key) * FROM ({sql})")
        n = con.execute("SELECT count(*) FROM _new").fetchone()[0]
        if n:
            con.execute("""INSERT INTO identity.xref (xid, entity, system, record_key, rule, confidence, run_id,
                                                      linked_at, evidence)
                           SELECT xid, ?, system, record_key, rule, confidence, ?, ?, CAST(evidence AS JSON) FROM _new""",
                        [self.entity, self.run_id, self.run_at])
            con.execute("""INSERT INTO identity.xref_history (entity, xid, system, record_key, action, rule, confidence,
                                                              previous_xid, run_id, changed_at, note)
                           SELECT ?, xid, system, record_key, 'link', rule, confidence, NULL, ?, ?, NULL FROM _new""",
                        [self.entity, self.run_id, self.run_at])
        return n

    def mint_for(self, where: str, rule: str = "minted") -> int:
        """A new xid for each unlinked record matching `where` (over _recs r)."""
        con = self.con
        con.execute(f"""CREATE OR REPLACE TEMP TABLE _mint AS
                        SELECT r.system, r.record_key, CAST(uuidv7() AS VARCHAR) AS xid FROM _recs r
                        WHERE {self.unlinked('r')} AND ({where})""")
        con.execute("""INSERT INTO identity.xids (xid, entity, status, merged_into, minted_run_id, minted_at, minted_from)
                       SELECT xid, ?, 'active', NULL, ?, ?, system || ':' || record_key FROM _mint""",
                    [self.entity, self.run_id, self.run_at])
        return self.link_from(f"""SELECT system, record_key, xid, {sql_literal(rule)} AS rule, 1.0 AS confidence,
                                         NULL AS evidence FROM _mint""")

    def unlinked(self, alias: str) -> str:
        return (f"NOT EXISTS (SELECT 1 FROM identity.xref x WHERE x.entity = {sql_literal(self.entity)} "
                f"AND x.system = {alias}.system AND x.record_key = {alias}.record_key)")

    def apply_candidates(self, cand_sql: str) -> int:
        """Link one-to-one candidates (system, record_key, xid, rule, confidence, evidence); others go to review.

        A candidate links only if the record has exactly one candidate xid, the xid has no record of the
        same system yet, no other record of that system claims the same xid, and no steward said distinct.
        """
        con, e = self.con, sql_literal(self.entity)
        con.execute(f"""
            CREATE OR REPLACE TEMP TABLE _cand AS
            SELECT c.* FROM ({cand_sql}) c
            WHERE NOT EXISTS (SELECT 1 FROM _distinct d WHERE d.system = c.system AND d.record_key = c.record_key
                                                          AND d.xid = c.xid)
        """)
        # Materialised one step at a time: DuckDB's planner otherwise misjudges these small joins badly.
        con.execute("CREATE OR REPLACE TEMP TABLE _per_record AS "
                    "SELECT system, record_key, count(DISTINCT xid) AS n FROM _cand GROUP BY system, record_key")
        con.execute("CREATE OR REPLACE TEMP TABLE _per_xid AS "
                    "SELECT xid, system, count(DISTINCT record_key) AS n FROM _cand GROUP BY xid, system")
        con.execute(f"CREATE OR REPLACE TEMP TABLE _taken AS SELECT DISTINCT x.xid, x.system FROM identity.xref x "
                    f"SEMI JOIN _cand c ON c.xid = x.xid WHERE x.entity = {e}")  # only the candidates' xids
        con.execute("""
            CREATE OR REPLACE TEMP TABLE _cand_ok AS
            SELECT c.system, c.record_key, c.xid, min(c.rule) AS rule, max(c.confidence) AS confidence,
                   arg_max(CAST(c.evidence AS VARCHAR), c.confidence) AS evidence
            FROM _cand c
            JOIN _per_record pr ON pr.system = c.system AND pr.record_key = c.record_key AND pr.n = 1
            JOIN _per_xid px ON px.xid = c.xid AND px.system = c.system AND px.n = 1
            LEFT JOIN _taken t ON t.xid = c.xid AND t.system = c.system
            WHERE t.xid IS NULL
            GROUP BY c.system, c.record_key, c.xid
        """)
        return self.link_from("SELECT system, record_key, xid, rule, confidence, evidence FROM _cand_ok")

    # -- review items -----------------------------------------------------------------------------------
    def item_id_sql(self, kind: str, item_key: str) -> str:
        """SQL: the id of the item of `kind` about the situation `item_key` (an SQL expression)."""
        return (f"{sql_literal(kind[:3] + '_')} || substr(sha256({sql_literal(kind + '|' + self.entity + '|')} "
                f"|| {item_key}), 1, 16)")

    def items_from(self, kind: str, sql: str) -> int:
        """Upsert review items from a query yielding (system, record_key, item_key, title, details JSON,
        priority), in one statement. record_key is the record an item is about (NULL for several).

        The item id is derived from kind, entity and item_key, so the same situation keeps its item across
        runs; a decided or ignored item is never reopened. `priority` goes into the details; `reconcile
        review list` sorts by it, highest first.
        """
        con = self.con
        con.execute(f"""
            CREATE OR REPLACE TEMP TABLE _items AS
            SELECT DISTINCT ON (item_id) * FROM (
                SELECT {self.item_id_sql(kind, 'item_key')} AS item_id, system, record_key, title,
                       json_merge_patch(CAST(details AS JSON),
                                        json_object('priority', round(CAST(priority AS DOUBLE), 4))) AS details
                FROM ({sql}))
        """)
        con.execute(
            """INSERT INTO review.items (item_id, entity, kind, system, status, title, details, first_seen_run,
                                         last_seen_run, created_at, updated_at)
               SELECT item_id, ?, ?, system, 'open', title, details, ?, ?, ?, ? FROM _items
               ON CONFLICT (item_id) DO UPDATE SET
                   status = CASE WHEN review.items.status IN ('decided', 'ignored') THEN review.items.status
                                 ELSE 'open' END,
                   title = excluded.title, details = excluded.details,
                   last_seen_run = excluded.last_seen_run, updated_at = excluded.updated_at""",
            [self.entity, kind, self.run_id, self.run_id, self.run_at, self.run_at])
        con.execute("INSERT INTO _seen_items (item_id) SELECT item_id FROM _items")
        if kind == "candidate":
            con.execute("INSERT INTO _in_review (system, record_key) SELECT system, record_key FROM _items "
                        "WHERE record_key IS NOT NULL")
        return con.execute("SELECT count(*) FROM _items").fetchone()[0]


# ----------------------------------------------------------------------------------------------------------

def resolve(con, cfg: Config, entity: str, run_id: str, run_at: datetime) -> dict:
    """Resolve every staged record of an entity to an xid. One transaction; idempotent per run id."""
    r = _Run(con, cfg, entity, run_id, run_at)
    spec = model_spec(cfg, entity)
    rules = match_rules(cfg, entity)

    def _body() -> dict:
        _build_records(con, cfg, entity, spec)
        privacy.suppress_reappeared(con, cfg, entity, run_id, run_at)  # erased identifiers: suppressed, reviewed
        # An erased person's records are never given a new xid (linked ones stay on the erased xid).
        con.execute(f"""DELETE FROM _recs WHERE {r.unlinked('_recs')} AND EXISTS (
                            SELECT 1 FROM identity.erased_records e WHERE e.entity = ? AND e.system = _recs.system
                            AND e.record_key = _recs.record_key)""", [entity])
        _apply_decisions(r)
        _load_distinct(r)
        _score(r, spec)
        for round_no in (1, 2):
            _stored_ids(r)
            for rule in rules:
                if rule.type == "exact":
                    _exact_rule(r, rule, final=round_no == 2)
            if spec is not None:
                _model_links(r, spec, rules)
            if round_no == 1:
                r.mint_for("r.creates")
        if spec is not None:
            _candidate_items(r, spec)
        _keep_unchanged_items(r)
        _orphans(r)
        _duplicates(r, rules)
        if spec is not None:
            _scored_duplicates(r, spec, rules)
        _retire(r)
        _keep_unchanged_duplicates(r)
        # Items of identity kinds not seen this run no longer apply (the record linked, the duplicate went away).
        con.execute("CREATE OR REPLACE TEMP TABLE _gone AS SELECT i.item_id FROM review.items i "
                    "ANTI JOIN _seen_items s USING (item_id) WHERE i.entity = ? AND i.status = 'open' "
                    "AND i.kind IN ('candidate', 'orphan', 'duplicate', 'conflict')", [entity])
        con.execute("UPDATE review.items SET status = 'resolved', updated_at = ? "
                    "WHERE item_id IN (SELECT item_id FROM _gone)", [run_at])
        _link_evidence(r)
        return _summary(r, spec)

    try:
        return once(con, run_id, entity, STAGE, run_at, _body)
    finally:
        if r.splink is not None:
            r.splink.close()


def _load_distinct(r: _Run) -> None:
    """Pairs (record, xid) a steward declared distinct: never linked or proposed again (merges followed)."""
    r.con.execute("""
        CREATE OR REPLACE TEMP TABLE _distinct AS
        SELECT d.system, d.record_key, coalesce(x.merged_into, d.xid) AS xid
        FROM review.decisions d LEFT JOIN identity.xids x ON x.xid = d.xid
        WHERE d.entity = ? AND d.action = 'distinct' AND d.system IS NOT NULL AND d.xid IS NOT NULL
    """, [r.entity])


def _stored_ids(r: _Run) -> None:
    e = sql_literal(r.entity)
    # The records still unlinked first (on most nights few), then their stored ids: not every record's.
    r.con.execute(f"CREATE OR REPLACE TEMP TABLE _open AS SELECT * FROM _recs rec WHERE {r.unlinked('rec')}")
    parts = [f"""SELECT rec.system, rec.record_key, coalesce(x.merged_into, x.xid) AS xid, 'stored_xid' AS rule,
                        1.0 AS confidence, NULL AS evidence
                 FROM _open rec JOIN identity.xids x ON x.xid = rec._xid AND x.entity = {e}"""]
    for target in _ext_targets(r.cfg, r.entity):
        parts.append(f"""SELECT rec.system, rec.record_key, x.xid, 'external_id:{target}' AS rule, 1.0 AS confidence,
                                NULL AS evidence
                         FROM _open rec JOIN identity.xref x
                           ON x.entity = {e} AND x.system = {sql_literal(target)} AND x.record_key = rec.{q('_ext_' + target)}""")
    r.apply_candidates(" UNION ALL ".join(parts))
    # A stored id that cannot be honoured (its xid already has a record of that system) is a conflict to review.
    r.items_from("conflict", f"""
        SELECT c.system, c.record_key, c.system || '|' || c.record_key || '|' || c.rule AS item_key,
               c.system || ' record ' || c.record_key || ' carries a stored id (' || c.rule ||
               ') that cannot be linked one-to-one to xid ' || c.xid AS title,
               to_json(struct_pack(system := c.system, record_key := c.record_key, xid := c.xid, rule := c.rule,
                   why := 'the xid already has a record of this system, or several records claim it')) AS details,
               1.0 AS priority
        FROM _cand c WHERE {r.unlinked('c')}""")


def _exact_rule(r: _Run, rule, final: bool) -> None:
    """Link one-to-one exact matches the names do not contradict; in the final round, put ambiguous and
    contradicted ones in review."""
    e = sql_literal(r.entity)
    key = "concat_ws(chr(31), " + ", ".join(f"rec.{q(f)}" for f in rule.fields) + ")"
    all_set = " AND ".join(f"rec.{q(f)} IS NOT NULL" for f in rule.fields)
    names = [q(n) for n in _name_fields(r.cfg, r.entity)]
    name_cols = "".join(f", rec.{n}" for n in names)
    # Every step below starts from a record unlinked at this point (xid NULL), so only the keys such a record
    # holds are kept: on a night when little changed, a few keys instead of every record.
    r.con.execute(f"""
        CREATE OR REPLACE TEMP TABLE _keyed AS
        WITH keyed AS (
            SELECT rec.system, rec.record_key, {key} AS k, x.xid{name_cols}
            FROM _recs rec
            LEFT JOIN identity.xref x ON x.entity = {e} AND x.system = rec.system AND x.record_key = rec.record_key
            WHERE {all_set})
        SELECT * FROM keyed SEMI JOIN (SELECT DISTINCT k FROM keyed WHERE xid IS NULL) open_keys USING (k)
    """)
    # Per key: the most identities one system holds (its records on one xid, e.g. merged by a steward,
    # count once), the xids, the systems.
    r.con.execute("""
        CREATE OR REPLACE TEMP TABLE _kgroups AS
        SELECT g.k, p.max_per_system, g.xids, g.systems, g.the_xid
        FROM (SELECT k, count(DISTINCT xid) AS xids, count(DISTINCT system) AS systems,
                     any_value(xid) FILTER (WHERE xid IS NOT NULL) AS the_xid
              FROM _keyed GROUP BY k) g
        JOIN (SELECT k, max(n) AS max_per_system
              FROM (SELECT k, system, count(DISTINCT coalesce(xid, record_key)) AS n FROM _keyed GROUP BY k, system)
              GROUP BY k) p USING (k)
    """)
    # One-to-one matches whose names contradict the key (a linked record of the xid names someone else).
    r.con.execute(f"""
        CREATE OR REPLACE TEMP TABLE _kmatch AS
        SELECT kd.system, kd.record_key, kd.k, g.the_xid AS xid,
               bool_or({_contradicted(r.cfg, r.entity, 'kd', 'o')}) AS contradicted,
               list(struct_pack(system := o.system, record_key := o.record_key, xid := o.xid)
                    ORDER BY o.system, o.record_key) AS others
        FROM _keyed kd JOIN _kgroups g USING (k)
        JOIN _keyed o ON o.k = kd.k AND o.xid = g.the_xid
        WHERE kd.xid IS NULL AND g.max_per_system = 1 AND g.xids = 1
        GROUP BY kd.system, kd.record_key, kd.k, g.the_xid
    """)
    r.apply_candidates(f"""
        SELECT system, record_key, xid, 'match:{rule.name}' AS rule, 1.0 AS confidence, NULL AS evidence
        FROM _kmatch WHERE NOT contradicted""")
    if not final:
        return
    r.items_from("candidate", f"""
        SELECT m.system, m.record_key, m.system || '|' || m.record_key AS item_key,
               m.system || ' record ' || m.record_key || ' shares {rule.name} ' || replace(m.k, chr(31), ' + ') ||
               ' with another person (different first and last name): shared mailbox? not linked' AS title,
               to_json(struct_pack(system := m.system, record_key := m.record_key, rule := {sql_literal(rule.name)},
                   key := string_split(m.k, chr(31)),
                   candidates := m.others,
                   would_change := struct_pack(links := m.system || ':' || m.record_key || ' joins xid ' || m.xid),
                   why := 'shared mailbox? the names contradict the key: the same {rule.name} is no evidence of one person'))
                   AS details,
               0.9 AS priority
        FROM _kmatch m WHERE m.contradicted AND {r.unlinked('m')}""")
    # Waiting on a duplicate: an unlinked record, alone in its system on the key, whose key another system holds
    # on several identities that look like one person entered twice (names not contradicting each other nor
    # the record). That system's duplicate item decides it (a merge lets the record link on the next run) and
    # lists it; the record gets no item of its own while that item is open.
    contradicted = _contradicted(r.cfg, r.entity, "a", "b")
    r.con.execute(f"""
        CREATE OR REPLACE TEMP TABLE _kdup AS
        SELECT a.k, a.system, bool_or({contradicted}) AS contradicted,
               {r.item_id_sql('duplicate', f"a.system || '|' || {sql_literal(rule.name)} || '|' || a.k")} AS item_id
        FROM _keyed a JOIN _keyed b ON b.k = a.k AND b.system = a.system AND a.record_key < b.record_key
        WHERE a.xid IS NULL OR b.xid IS NULL OR a.xid <> b.xid
        GROUP BY a.k, a.system""")
    r.con.execute(f"""
        INSERT INTO _in_review (system, record_key)
        SELECT DISTINCT kd.system, kd.record_key
        FROM _keyed kd JOIN _kdup d ON d.k = kd.k AND d.system <> kd.system AND NOT d.contradicted
        LEFT JOIN review.items i ON i.item_id = d.item_id
        ANTI JOIN _kdup own ON own.k = kd.k AND own.system = kd.system
        ANTI JOIN _in_review ir ON ir.system = kd.system AND ir.record_key = kd.record_key
        WHERE {r.unlinked('kd')} AND coalesce(i.status, 'open') NOT IN ('decided', 'ignored')
          AND NOT EXISTS (SELECT 1 FROM _keyed o WHERE o.k = kd.k AND o.system = d.system
                                                   AND {_contradicted(r.cfg, r.entity, 'kd', 'o')})""")
    # Ambiguous: an unlinked record whose key is shared by several records of one system, or by several xids.
    r.items_from("candidate", f"""
        SELECT kd.system, kd.record_key, kd.system || '|' || kd.record_key AS item_key,
               kd.system || ' record ' || kd.record_key || ' matches several records on {rule.name} (' ||
               replace(kd.k, chr(31), ' + ') || '): not linked automatically' AS title,
               to_json(struct_pack(system := kd.system, record_key := kd.record_key, rule := {sql_literal(rule.name)},
                   key := string_split(kd.k, chr(31)),
                   candidates := list(struct_pack(system := o.system, record_key := o.record_key, xid := o.xid)
                                      ORDER BY o.system, o.record_key),
                   would_change := struct_pack(links := kd.system || ':' || kd.record_key || ' joins the chosen xid'),
                   why := 'one-to-one match required for automatic links')) AS details,
               0.8 AS priority
        FROM _keyed kd JOIN _kgroups g USING (k)
        JOIN _keyed o ON o.k = kd.k AND NOT (o.system = kd.system AND o.record_key = kd.record_key)
        ANTI JOIN _in_review ir ON ir.system = kd.system AND ir.record_key = kd.record_key
        WHERE {r.unlinked('kd')} AND g.systems > 1 AND (g.max_per_system > 1 OR g.xids > 1)
          AND NOT EXISTS (SELECT 1 FROM _distinct d WHERE d.system = kd.system AND d.record_key = kd.record_key
                                                       AND d.xid = o.xid)
        GROUP BY kd.system, kd.record_key, kd.k""")


# ----------------------------------------------------------------------------------------------------------
# The match model: score what changed, then three bands
# ----------------------------------------------------------------------------------------------------------

def _fingerprint_sql(spec: ModelSpec, trained_run_id: str) -> str:
    """A record's compared values and the model that scores them: either changing makes it scored again."""
    return ("md5(concat_ws(chr(31), " + sql_literal(spec.signature) + ", " + sql_literal(trained_run_id) + ", "
            + ", ".join(f"coalesce(rec.{q(f)}, chr(0))" for f in spec.fields) + "))")


def _model(r: _Run, spec: ModelSpec, sdb: identity_model.SplinkDB) -> tuple[dict, str]:
    """The model for this run and the run that trained it: the stored one for the same spec if trained fewer
    than `retrain_every` runs ago, else trained now (from the previous parameters). One identity.model row
    per run either way."""
    con, e = r.con, r.entity
    # fetchall, not fetchone: training reads the records on this connection, which needs every result finished
    prev = next(iter(con.execute("""SELECT parameters, trained_run_id, signature FROM identity.model WHERE entity = ?
                                    ORDER BY created_at DESC, run_id DESC LIMIT 1""", [e]).fetchall()), None)
    every = r.cfg.entities[e].identity.retrain_every
    if prev and prev[2] == spec.signature:
        uses = con.execute("SELECT count(*) FROM identity.model WHERE entity = ? AND trained_run_id = ?",
                           [e, prev[1]]).fetchall()[0][0]
        if uses < every:
            model, trained_run, status = json.loads(prev[0]), prev[1], "reused"
        else:
            model, trained_run, status = identity_model.train(sdb, spec, json.loads(prev[0])), r.run_id, "trained"
    else:
        model, trained_run, status = identity_model.train(sdb, spec), r.run_id, "trained"
    con.execute("""INSERT INTO identity.model (entity, run_id, status, trained_run_id, signature, records,
                                               link_threshold, review_threshold, parameters, m_u, created_at)
                   VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)""",
                [e, r.run_id, status, trained_run, spec.signature, con.execute("SELECT count(*) FROM _recs").fetchall()[0][0],
                 spec.link_threshold, spec.review_threshold, json.dumps(model), json.dumps(identity_model.m_u(model)),
                 r.run_at])
    r.stats["model"] = {"status": status, "trained_run_id": trained_run}
    return model, trained_run


def _score(r: _Run, spec: ModelSpec | None) -> None:
    """_pairs: every scored pair, in both directions (system, record_key, other_system, other_key,
    probability, weight, evidence, contradicted). Only records new or changed since they were last scored
    (identity.fingerprints), or all of them when the model was trained again this run, are scored, against
    every record."""
    con, e = r.con, r.entity
    con.execute("""CREATE OR REPLACE TEMP TABLE _pairs (system VARCHAR, record_key VARCHAR, other_system VARCHAR,
                   other_key VARCHAR, probability DOUBLE, weight DOUBLE, evidence VARCHAR, contradicted BOOLEAN)""")
    con.execute("CREATE OR REPLACE TEMP TABLE _fresh (rid VARCHAR)")
    if spec is None:
        return
    exact = [rule for rule in match_rules(r.cfg, e) if rule.type == "exact"]
    key = (f"concat_ws(chr(31), {', '.join('rec.' + q(f) for f in exact[0].fields)})" if exact else "NULL")
    cols = ", ".join(["rec.rid", "rec.system"] + [f"rec.{q(f)}" for f in spec.fields]
                     + ([f"rec.{q(FULL_NAME)}"] if spec.names else []))
    # grp: who a record is, as far as known (term frequencies count people, not records). Read on first use:
    # before this run links anything when it trains or scores; a night that does neither reads them only for
    # the evidence of its deterministic links (_link_evidence), if it made any, and most nights not at all.
    records = f"""SELECT {cols}, coalesce(x.xid, {key}, rec.rid) AS grp FROM _recs rec
                  LEFT JOIN identity.xref x ON x.entity = {sql_literal(e)} AND x.system = rec.system
                                           AND x.record_key = rec.record_key"""
    sdb = r.splink = identity_model.SplinkDB(r.cfg, lambda: con.sql(records).to_arrow_table())
    model, trained_run = _model(r, spec, sdb)
    r.scoring = (model, spec)  # for the evidence of links no scored pair explains (_link_evidence)
    fingerprint = _fingerprint_sql(spec, trained_run)
    con.execute(f"""INSERT INTO _fresh (rid) SELECT rec.rid FROM _recs rec
                    ANTI JOIN identity.fingerprints fp ON fp.entity = {sql_literal(e)} AND fp.system = rec.system
                        AND fp.record_key = rec.record_key AND fp.fingerprint = {fingerprint}""")
    if not con.execute("SELECT count(*) FROM _fresh").fetchall()[0][0]:  # fetchall: the result is finished
        return
    fresh = con.sql("SELECT rid FROM _fresh").to_arrow_table()
    r.stats["pairs_scored"], scored = identity_model.score(sdb, fresh, model, spec)
    con.register("_scored_arrow", scored)
    try:
        con.execute("CREATE OR REPLACE TEMP TABLE _scored AS SELECT * FROM _scored_arrow")
    finally:
        con.unregister("_scored_arrow")
    shared = [rule for rule in match_rules(r.cfg, e) if rule.type == "exact"]
    same_key = " OR ".join("(" + " AND ".join(f"a.{q(f)} = b.{q(f)}" for f in rule.fields) + ")" for rule in shared)
    contradicted = f"(({same_key}) AND {_contradicted(r.cfg, e, 'a', 'b')})" if shared else "FALSE"
    con.execute(f"""
        INSERT INTO _pairs (system, record_key, other_system, other_key, probability, weight, evidence, contradicted)
        SELECT a.system, a.record_key, b.system, b.record_key, s.probability, s.weight, s.evidence, {contradicted}
        FROM _scored s JOIN _recs a ON a.rid = s.rid_l JOIN _recs b ON b.rid = s.rid_r
        UNION ALL
        SELECT b.system, b.record_key, a.system, a.record_key, s.probability, s.weight, s.evidence_rev, {contradicted}
        FROM _scored s JOIN _recs a ON a.rid = s.rid_l JOIN _recs b ON b.rid = s.rid_r""")
    con.execute(f"""INSERT OR REPLACE INTO identity.fingerprints (entity, system, record_key, fingerprint, run_id)
                    SELECT {sql_literal(e)}, rec.system, rec.record_key, {fingerprint}, {sql_literal(r.run_id)}
                    FROM _recs rec SEMI JOIN _fresh USING (rid)""")


def _band(r: _Run, spec: ModelSpec) -> None:
    """_band: per unlinked record and candidate xid (of another system), the best pair, at or above
    review_threshold; `competing` counts the record's candidate xids."""
    e = sql_literal(r.entity)
    r.con.execute(f"""
        CREATE OR REPLACE TEMP TABLE _band AS
        SELECT p.system, p.record_key, x.xid, max(p.probability) AS probability,
               arg_max(p.evidence, p.probability) AS evidence, arg_max(p.weight, p.probability) AS weight,
               arg_max(p.other_system, p.probability) AS other_system, arg_max(p.other_key, p.probability) AS other_key,
               bool_or(p.contradicted) AS contradicted,
               count(*) OVER (PARTITION BY p.system, p.record_key) AS competing
        FROM _pairs p
        -- the record still unlinked, first: after the first links most pairs drop out before the join
        ANTI JOIN identity.xref u ON u.entity = {e} AND u.system = p.system AND u.record_key = p.record_key
        JOIN identity.xref x ON x.entity = {e} AND x.system = p.other_system AND x.record_key = p.other_key
        WHERE p.system <> p.other_system AND p.probability >= {spec.review_threshold}
          AND NOT EXISTS (SELECT 1 FROM _distinct d WHERE d.system = p.system AND d.record_key = p.record_key
                                                       AND d.xid = x.xid)
        GROUP BY p.system, p.record_key, x.xid""")


def _model_rule(rules) -> str:
    return "match:" + next(rule.name for rule in rules if rule.type == "probabilistic")


def _model_links(r: _Run, spec: ModelSpec, rules) -> None:
    """Automatic links: probability >= link_threshold, the record's only candidate xid, names not
    contradicting a shared key; then the one-to-one rule (apply_candidates)."""
    _band(r, spec)
    r.apply_candidates(f"""
        SELECT system, record_key, xid, {sql_literal(_model_rule(rules))} AS rule, probability AS confidence,
               json_merge_patch(CAST(evidence AS JSON), json_object('_probability', probability, '_weight', weight,
                                                                    '_with', other_system || ':' || other_key)) AS evidence
        FROM _band WHERE probability >= {spec.link_threshold} AND competing = 1 AND NOT contradicted""")


def _candidate_items(r: _Run, spec: ModelSpec) -> None:
    """The review band: one candidate item per unlinked record, its best candidates first."""
    _band(r, spec)
    e = sql_literal(r.entity)
    r.con.execute(f"""
        CREATE OR REPLACE TEMP TABLE _cand_items AS
        WITH c AS (
            SELECT b.*, (SELECT count(*) FROM identity.xref y WHERE y.entity = {e} AND y.xid = b.xid) AS xid_records,
                   row_number() OVER (PARTITION BY b.system, b.record_key ORDER BY b.probability DESC, b.xid) AS rank
            FROM _band b ANTI JOIN _in_review ir ON ir.system = b.system AND ir.record_key = b.record_key)
        SELECT system, record_key, max(probability) AS best, count(*) AS n,
               arg_max(xid, probability) AS best_xid, arg_max(xid_records, probability) AS best_xid_records,
               arg_max(evidence, probability) AS best_evidence,
               list(struct_pack(xid := xid, system := other_system, record_key := other_key,
                                probability := round(probability, 6),
                                weight := weight, records_on_xid := xid_records, evidence := CAST(evidence AS JSON))
                    ORDER BY probability DESC, xid) FILTER (WHERE rank <= {MAX_CANDIDATES}) AS candidates,
               bool_or(contradicted) AS contradicted
        FROM c GROUP BY system, record_key""")
    n = r.items_from("candidate", f"""
        SELECT system, record_key, system || '|' || record_key AS item_key,
               system || ' record ' || record_key || ' may be the same person as ' || n || ' identit' ||
               CASE WHEN n = 1 THEN 'y' ELSE 'ies' END || ' (best probability ' || round(best, 4) || '): review' AS title,
               to_json(struct_pack(system := system, record_key := record_key, rule := 'model',
                   probability := round(best, 6), candidates := candidates,
                   would_change := struct_pack(
                       links := system || ':' || record_key || ' joins xid ' || best_xid || ' (' || best_xid_records ||
                                ' record(s))',
                       differing_fields := (SELECT list(k ORDER BY k) FROM (
                           SELECT unnest(json_keys(CAST(best_evidence AS JSON))) AS k)
                           WHERE json_extract_string(CAST(best_evidence AS JSON), '$."' || k || '".a') IS DISTINCT FROM
                                 json_extract_string(CAST(best_evidence AS JSON), '$."' || k || '".b')
                             AND json_extract_string(CAST(best_evidence AS JSON), '$."' || k || '".a') IS NOT NULL
                             AND json_extract_string(CAST(best_evidence AS JSON), '$."' || k || '".b') IS NOT NULL)),
                   why := CASE WHEN contradicted THEN 'same key, different first and last name: shared mailbox?'
                               WHEN n > 1 THEN 'several candidate identities: people decide'
                               WHEN best >= {spec.link_threshold} THEN 'not one-to-one: the identity already has a record of this system'
                               ELSE 'probability below link_threshold {spec.link_threshold}' END)) AS details,
               best * (CASE WHEN n = 1 THEN 1.0 ELSE 0.9 END) AS priority
        FROM _cand_items""")
    r.stats["review_band"] = n


def _scored_duplicates(r: _Run, spec: ModelSpec, rules) -> None:
    """Same-system pairs in the review band on different xids: duplicate candidates (never merged). Pairs an
    exact rule already flags (same key) are not repeated."""
    e = sql_literal(r.entity)
    exact = [rule for rule in rules if rule.type == "exact"]
    same_key = " OR ".join("(" + " AND ".join(f"a.{q(f)} = b.{q(f)}" for f in rule.fields) + ")" for rule in exact)
    r.items_from("duplicate", f"""
        SELECT p.system, NULL AS record_key,
               p.system || '|model|' || p.record_key || '|' || p.other_key AS item_key,
               '2 ' || p.system || ' records look alike (probability ' || round(p.probability, 4) ||
               '): same person entered twice?' AS title,
               to_json(struct_pack(system := p.system, rule := 'model', probability := round(p.probability, 6),
                   records := [struct_pack(record_key := p.record_key, xid := xa.xid),
                               struct_pack(record_key := p.other_key, xid := xb.xid)],
                   keys := [p.system || ':' || p.record_key, p.system || ':' || p.other_key],
                   evidence := CAST(p.evidence AS JSON),
                   would_change := struct_pack(links := 'merge: one xid for both records'),
                   why := 'within-system duplicate by the match model: decide merge or distinct')) AS details,
               p.probability * 0.5 AS priority
        FROM _pairs p
        JOIN _recs a ON a.system = p.system AND a.record_key = p.record_key
        JOIN _recs b ON b.system = p.other_system AND b.record_key = p.other_key
        LEFT JOIN identity.xref xa ON xa.entity = {e} AND xa.system = p.system AND xa.record_key = p.record_key
        LEFT JOIN identity.xref xb ON xb.entity = {e} AND xb.system = p.other_system AND xb.record_key = p.other_key
        WHERE p.system = p.other_system AND p.record_key < p.other_key AND p.probability >= {spec.review_threshold}
          AND xa.xid IS DISTINCT FROM xb.xid
          {f'AND NOT ({same_key})' if same_key else ''}""")


def _keep_unchanged_items(r: _Run) -> None:
    """Model candidate items about records not scored again this run (nothing changed) stay open as they are,
    as long as the record is still unlinked: incremental scoring must not close what it did not look at."""
    e = sql_literal(r.entity)
    r.con.execute(f"""
        CREATE OR REPLACE TEMP TABLE _kept AS
        SELECT i.item_id FROM review.items i
        WHERE i.entity = {e} AND i.status = 'open' AND i.kind = 'candidate' AND i.details->>'rule' = 'model'
          AND (i.system || ':' || (i.details->>'record_key')) NOT IN (SELECT rid FROM _fresh)
          AND NOT EXISTS (SELECT 1 FROM identity.xref x WHERE x.entity = {e} AND x.system = i.system
                          AND x.record_key = i.details->>'record_key')
          AND i.item_id NOT IN (SELECT item_id FROM _seen_items)""")
    r.con.execute("INSERT INTO _seen_items (item_id) SELECT item_id FROM _kept")
    r.con.execute("INSERT INTO _in_review (system, record_key) SELECT i.system, i.details->>'record_key' "
                  "FROM review.items i SEMI JOIN _kept USING (item_id)")


def _keep_unchanged_duplicates(r: _Run) -> None:
    """Model duplicate items whose two records were not scored again stay open while on different xids."""
    e = sql_literal(r.entity)
    r.con.execute(f"""
        INSERT INTO _seen_items (item_id)
        SELECT d.item_id FROM (
            SELECT i.item_id, unnest(CAST(i.details->'$.keys' AS VARCHAR[])) AS rid
            FROM review.items i
            WHERE i.entity = {e} AND i.status = 'open' AND i.kind = 'duplicate' AND i.details->>'rule' = 'model') d
        LEFT JOIN _recs rec USING (rid)
        LEFT JOIN identity.xref x ON x.entity = {e} AND x.system = rec.system AND x.record_key = rec.record_key
        GROUP BY d.item_id
        HAVING count(rec.rid) = 2 AND count(DISTINCT x.xid) = 2 AND NOT bool_or(d.rid IN (SELECT rid FROM _fresh))
           AND d.item_id NOT IN (SELECT item_id FROM _seen_items)""")


def _link_evidence(r: _Run) -> None:
    """Every link made this run carries the model's evidence. The links a deterministic rule made (stored
    ids, exact keys, decisions, a mint the others then joined) have none yet: each gets its best pair with
    another record now on its xid, from the pairs scored this run (at or above review_threshold), else
    from every pair of records on those xids, scored now whatever its probability (probability, weight,
    per-field weights). A record alone on its xid has nothing to compare."""
    if r.scoring is None:
        return
    con, e, run = r.con, sql_literal(r.entity), sql_literal(r.run_id)

    def set_evidence() -> None:
        con.execute(f"""UPDATE identity.xref x SET evidence = ev.evidence FROM _ev ev
                        WHERE x.entity = {e} AND x.system = ev.system AND x.record_key = ev.record_key""")

    # The best pair's row first (a number: arg_max over the evidence text itself is several times slower),
    # its JSON after: one document per link, not one per pair.
    con.execute(f"""
        CREATE OR REPLACE TEMP TABLE _ev AS
        SELECT best.system, best.record_key,
               json_merge_patch(CAST(p.evidence AS JSON),
                                json_object('_probability', p.probability, '_weight', p.weight,
                                            '_with', p.other_system || ':' || p.other_key)) AS evidence
        FROM (SELECT x.system, x.record_key, arg_max(p.rowid, p.probability) AS pair
              FROM identity.xref x
              JOIN _pairs p ON p.system = x.system AND p.record_key = x.record_key
              JOIN identity.xref y ON y.entity = x.entity AND y.system = p.other_system AND y.record_key = p.other_key
                                  AND y.xid = x.xid
              WHERE x.entity = {e} AND x.run_id = {run} AND x.evidence IS NULL
              GROUP BY x.system, x.record_key) best
        JOIN _pairs p ON p.rowid = best.pair""")
    set_evidence()
    con.execute(f"""CREATE OR REPLACE TEMP TABLE _members AS
                    SELECT rec.rid, rec.system, rec.record_key, x.xid, x.run_id = {run} AND x.evidence IS NULL AS unexplained
                    FROM identity.xref x JOIN _recs rec USING (system, record_key)
                    WHERE x.entity = {e} AND x.xid IN (
                        SELECT xid FROM identity.xref WHERE entity = {e} AND run_id = {run} AND evidence IS NULL)""")
    if not con.execute("SELECT 1 FROM _members GROUP BY xid HAVING count(*) > 1 LIMIT 1").fetchall():
        return  # every link explained by a scored pair, or alone on its xid
    model, spec = r.scoring
    scored = identity_model.score_groups(r.splink, con.sql("SELECT rid, xid FROM _members").to_arrow_table(),
                                         model, spec)
    con.register("_grouped_arrow", scored)
    try:
        con.execute("""CREATE OR REPLACE TEMP TABLE _grouped AS
                       SELECT rid_l AS rid, rid_r AS other, probability, weight, evidence FROM _grouped_arrow
                       UNION ALL
                       SELECT rid_r, rid_l, probability, weight, evidence_rev FROM _grouped_arrow""")
    finally:
        con.unregister("_grouped_arrow")
    con.execute("""
        CREATE OR REPLACE TEMP TABLE _ev AS
        SELECT m.system, m.record_key,
               arg_max(json_merge_patch(CAST(g.evidence AS JSON),
                                        json_object('_probability', g.probability, '_weight', g.weight,
                                                    '_with', g.other)), g.probability) AS evidence
        FROM _members m JOIN _grouped g USING (rid)
        WHERE m.unexplained
        GROUP BY m.system, m.record_key""")
    set_evidence()


def _orphans(r: _Run) -> None:
    """Records of systems that may not create identities, still unlinked and not in review: their own xid
    (identity.orphans: create, the default), or an orphan item each (review)."""
    ent = r.cfg.entities[r.entity]
    not_in_review = "NOT EXISTS (SELECT 1 FROM _in_review ir WHERE ir.system = r.system AND ir.record_key = r.record_key)"
    if ent.identity.orphans == "create":
        r.mint_for(f"NOT r.creates AND {not_in_review}", rule="minted_orphan")
        return
    r.items_from("orphan", f"""
        SELECT r.system, r.record_key, r.system || '|' || r.record_key AS item_key,
               r.system || ' record ' || r.record_key || ' matches no one and ' || r.system ||
               ' may not create identities' AS title,
               to_json(struct_pack(system := r.system, record_key := r.record_key,
                   would_change := struct_pack(links := 'link: joins the chosen xid; identity.orphans: create mints one'),
                   why := r.system || ' has creates_identity: false; link it, or set identity.orphans: create')) AS details,
               0.1 AS priority
        FROM _recs r
        WHERE {r.unlinked('r')} AND {not_in_review}""")


def _duplicates(r: _Run, rules) -> None:
    """Records of one system sharing an exact key: duplicate candidates for stewards (never merged)."""
    e = sql_literal(r.entity)
    for rule in rules:
        if rule.type != "exact":
            continue
        key = "concat_ws(chr(31), " + ", ".join(f"rec.{q(f)}" for f in rule.fields) + ")"
        all_set = " AND ".join(f"rec.{q(f)} IS NOT NULL" for f in rule.fields)
        # The keys several records of one system share: the only ones an item is about (few of all keys).
        r.con.execute(f"""
            CREATE OR REPLACE TEMP TABLE _dupkeys AS
            SELECT rec.system, {key} AS k FROM _recs rec WHERE {all_set} GROUP BY ALL HAVING count(*) > 1""")
        # Unlinked records sharing the key: what a merge would let link (listed on the item).
        r.con.execute(f"""
            CREATE OR REPLACE TEMP TABLE _waiting AS
            SELECT {key} AS k, list(struct_pack(system := rec.system, record_key := rec.record_key)
                                    ORDER BY rec.system, rec.record_key) AS records
            FROM _recs rec WHERE {all_set} AND {key} IN (SELECT k FROM _dupkeys) AND {r.unlinked('rec')}
            GROUP BY ALL""")
        r.items_from("duplicate", f"""
            SELECT rec.system, NULL AS record_key, rec.system || '|' || {sql_literal(rule.name)} || '|' || {key} AS item_key,
                   count(*) || ' ' || rec.system || ' records share {rule.name} ' || replace({key}, chr(31), ' + ') ||
                   ': same person entered twice, or different people (e.g. a shared mailbox)?' AS title,
                   to_json(struct_pack(system := rec.system, rule := {sql_literal(rule.name)},
                       key := string_split({key}, chr(31)),
                       records := list(struct_pack(record_key := rec.record_key, xid := x.xid) ORDER BY rec.record_key),
                       waiting := coalesce(list_filter(any_value(w.records), lambda o: o.system <> rec.system), []),
                       would_change := struct_pack(links := 'merge: one xid for all ' || count(*) || ' records' ||
                           coalesce('; then ' || nullif(array_to_string(list_transform(list_filter(
                               any_value(w.records), lambda o: o.system <> rec.system), lambda o: o.system || ':' || o.record_key),
                               ', '), '') || ' join(s) it', '')),
                       why := 'within-system duplicate: decide merge or distinct')) AS details,
                   0.5 AS priority
            FROM _recs rec SEMI JOIN _dupkeys d ON d.system = rec.system AND d.k = {key}
            LEFT JOIN identity.xref x ON x.entity = {e} AND x.system = rec.system AND x.record_key = rec.record_key
            LEFT JOIN _waiting w ON w.k = {key}
            WHERE {all_set}
            GROUP BY rec.system, {key}""")


def _retire(r: _Run) -> None:
    """An xid none of whose records remains in any system is retired (and revived if one comes back)."""
    con, e = r.con, r.entity
    con.execute("""CREATE OR REPLACE TEMP TABLE _present AS
                   SELECT DISTINCT x.xid FROM identity.xref x JOIN _recs rec USING (system, record_key)
                   WHERE x.entity = ?""", [e])
    con.execute("""CREATE OR REPLACE TEMP TABLE _retired AS SELECT xid FROM identity.xids
                   WHERE entity = ? AND status = 'active' AND xid NOT IN (SELECT xid FROM _present)""", [e])
    con.execute("""INSERT INTO identity.xref_history (entity, xid, system, record_key, action, rule, confidence,
                                                      previous_xid, run_id, changed_at, note)
                   SELECT ?, x.xid, x.system, x.record_key, 'retire', x.rule, x.confidence, NULL, ?, ?,
                          'no record of this xid remains in any system'
                   FROM identity.xref x JOIN _retired USING (xid) WHERE x.entity = ?""",
                [e, r.run_id, r.run_at, e])
    r.stats["retired"] = con.execute("SELECT count(*) FROM _retired").fetchone()[0]
    con.execute("UPDATE identity.xids SET status = 'retired' WHERE xid IN (SELECT xid FROM _retired)")
    con.execute("""UPDATE identity.xids SET status = 'active' WHERE entity = ? AND status = 'retired'
                   AND xid IN (SELECT xid FROM _present)""", [e])


# ----------------------------------------------------------------------------------------------------------
# Steward decisions
# ----------------------------------------------------------------------------------------------------------

def _move(r: _Run, system: str, key: str, xid: str, rule: str, action: str, note: str | None) -> None:
    con = r.con
    prev = con.execute("SELECT xid FROM identity.xref WHERE entity = ? AND system = ? AND record_key = ?",
                       [r.entity, system, key]).fetchone()
    if prev and prev[0] == xid:
        return
    if prev:
        con.execute("DELETE FROM identity.xref WHERE entity = ? AND system = ? AND record_key = ?", [r.entity, system, key])
        con.execute("INSERT INTO identity.xref_history (entity, xid, system, record_key, action, rule, run_id, "
                    "changed_at, note) VALUES (?, ?, ?, ?, 'unlink', ?, ?, ?, ?)",
                    [r.entity, prev[0], system, key, rule, r.run_id, r.run_at, note])
    con.execute("INSERT INTO identity.xref (xid, entity, system, record_key, rule, confidence, run_id, linked_at) "
                "VALUES (?, ?, ?, ?, ?, 1.0, ?, ?)", [xid, r.entity, system, key, rule, r.run_id, r.run_at])
    con.execute("INSERT INTO identity.xref_history (entity, xid, system, record_key, action, rule, confidence, "
                "previous_xid, run_id, changed_at, note) VALUES (?, ?, ?, ?, ?, ?, 1.0, ?, ?, ?, ?)",
                [r.entity, xid, system, key, action, rule, prev[0] if prev else None, r.run_id, r.run_at, note])


def _final_xid(r: _Run, xid: str) -> str:
    row = r.con.execute("SELECT status, merged_into FROM identity.xids WHERE xid = ? AND entity = ?",
                        [xid, r.entity]).fetchone()
    if row is None:
        raise ReconcileError(f"unknown xid {xid!r} for entity {r.entity!r}")
    return row[1] if row[0] == "merged" and row[1] else xid


def _new_xid(r: _Run, origin: str) -> str:
    xid = str(r.con.execute("SELECT uuidv7()").fetchone()[0])
    r.con.execute("INSERT INTO identity.xids (xid, entity, status, minted_run_id, minted_at, minted_from) "
                  "VALUES (?, ?, 'active', ?, ?, ?)",
                  [xid, r.entity, r.run_id, r.run_at, origin])
    return xid


def _apply_decisions(r: _Run) -> None:
    con = r.con
    pending = con.execute("""SELECT decision_id, action, system, record_key, xid, other_xid, decided_by, reason
                             FROM review.decisions WHERE entity = ? AND applied_run_id IS NULL
                             ORDER BY decided_at, decision_id""", [r.entity]).fetchall()
    for did, action, system, key, xid, other, by, reason in pending:
        note = f"decision {did} by {by}: {reason}"
        if action == "link":
            _move(r, system, key, _final_xid(r, xid), f"decision:link", "link", note)
        elif action in ("split", "distinct"):
            current = con.execute("SELECT xid FROM identity.xref WHERE entity = ? AND system = ? AND record_key = ?",
                                  [r.entity, system, key]).fetchone()
            # split always; distinct only if the record currently sits on the xid it is distinct from
            if action == "split" or (current and xid and current[0] == _final_xid(r, xid)):
                new = _new_xid(r, f"decision:{action}")
                _move(r, system, key, new, f"decision:{action}", "split", note)
                r.stats["split"] += 1
        elif action == "merge":
            src, dst = _final_xid(r, xid), _final_xid(r, other)
            if src != dst:
                moved = con.execute("SELECT system, record_key FROM identity.xref WHERE entity = ? AND xid = ?",
                                    [r.entity, src]).fetchall()
                for s, k in moved:
                    _move(r, s, k, dst, "decision:merge", "merge", note)
                con.execute("UPDATE identity.xids SET status = 'merged', merged_into = ? WHERE xid = ? OR merged_into = ?",
                            [dst, src, src])
                r.stats["merged"] += 1
        con.execute("UPDATE review.decisions SET applied_run_id = ?, applied_at = ? WHERE decision_id = ?",
                    [r.run_id, r.run_at, did])
        r.stats["decisions"] += 1


def _summary(r: _Run, spec: ModelSpec | None) -> dict:
    con, e = r.con, r.entity
    by_rule = dict(con.execute("""SELECT rule, count(*) FROM identity.xref_history
                                  WHERE entity = ? AND run_id = ? AND action IN ('link', 'merge', 'split')
                                  GROUP BY 1 ORDER BY 1""", [e, r.run_id]).fetchall())
    new_xids = con.execute("SELECT count(*) FROM identity.xids WHERE entity = ? AND minted_run_id = ?",
                           [e, r.run_id]).fetchone()[0]
    open_items = dict(con.execute("""SELECT kind, count(*) FROM review.items
                                     WHERE entity = ? AND status = 'open' AND kind IN ('candidate', 'orphan', 'duplicate', 'conflict')
                                     GROUP BY 1""", [e]).fetchall())
    totals = con.execute("""SELECT count(*) FILTER (WHERE status = 'active'), count(*) FROM identity.xids
                            WHERE entity = ?""", [e]).fetchone()
    linked_records = con.execute("SELECT count(*) FROM identity.xref WHERE entity = ?", [e]).fetchone()[0]
    unlinked = con.execute(f"SELECT count(*) FROM _recs rec WHERE {r.unlinked('rec')}").fetchone()[0]
    return {
        "linked": sum(by_rule.values()),
        "new_xids": new_xids,
        "review": sum(open_items.values()),
        "by_rule": by_rule,
        "candidates": open_items.get("candidate", 0),
        "orphans": open_items.get("orphan", 0),
        "duplicates": open_items.get("duplicate", 0),
        "conflicts": open_items.get("conflict", 0),
        "split": r.stats["split"],
        "merged": r.stats["merged"],
        "retired": r.stats.get("retired", 0),
        "decisions_applied": r.stats["decisions"],
        "active_xids": totals[0],
        "linked_records": linked_records,
        "unlinked_records": unlinked,
        "auto_links": sum(n for rule, n in by_rule.items() if rule in _model_rule_names(r)),
        "review_band": r.stats["review_band"],
        "minted": by_rule.get("minted", 0) + by_rule.get("minted_orphan", 0),
        "pairs_scored": r.stats["pairs_scored"],
        "model": r.stats.get("model"),
    }


def _model_rule_names(r: _Run) -> set[str]:
    return {"match:" + rule.name for rule in match_rules(r.cfg, r.entity) if rule.type == "probabilistic"}


def xid_identities_sql(cfg: Config, entity: str, owner: str, only: str | None = None) -> str:
    """Per xid, the owner system's linked record values (for the collision guard until golden records exist)."""
    ent = cfg.entities[entity]
    mapped = set(ent.sources[owner].fields)
    type_sql = {"string": "VARCHAR", "boolean": "BOOLEAN", "integer": "BIGINT", "number": "DOUBLE", "date": "DATE",
                "timestamp": "TIMESTAMP"}
    cols = ", ".join((f"s.{q(f)}" if f in mapped else f"CAST(NULL AS {type_sql[ent.fields[f].type]}) AS {q(f)}")
                     for f in ent.fields)
    return (f"SELECT x.xid AS identity, [struct_pack(system := x.system, record_key := x.record_key)] AS records, "
            f"{cols} FROM identity.xref x JOIN {staging_table(owner, entity)} s "
            f"ON x.system = {sql_literal(owner)} AND s._record_key = x.record_key "
            f"JOIN identity.xids i ON i.xid = x.xid AND i.status = 'active' "
            + (f"SEMI JOIN {only} o ON o.identity = x.xid " if only else "")
            + f"WHERE x.entity = {sql_literal(entity)}")
