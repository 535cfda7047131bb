"""Identity resolution: staging -> identity.xref (persistent cross-system ids), review.items.

Every record of every system gets at most one xid; links are made in this order, every run, and only for
records not linked yet (existing links are kept, so an xid stays with its record when its email changes):
  0. steward decisions (review.decisions) not applied yet: they win over every rule;
  1. stored IDs: our xid in the system's `xid_column`, or another system's key in an `external_ids` column;
  2. exact rules (`match:` with type exact), one-to-one only: at most one record per system shares the key,
     exactly one xid among them, and that xid has no other record of the same system;
  3. creates_identity systems mint a new xid for each record still unmatched (never two records of one
     system on one xid automatically), then steps 1-2 run again against the new xids;
  4. probabilistic rules score blocked pairs (DuckDB's jaro_winkler_similarity): review, or link only at
     an explicit link_threshold;
  5. records still unmatched in other systems wait in review as orphans (or are minted: identity.orphans).
Within-system duplicates (same exact key in one system) are flagged for stewards, never merged.
Everything is set-based SQL over temp tables; Python only loops over rules, systems and decisions.
"""
from __future__ import annotations

import json
from datetime import datetime

from ..config.models import Config
from ..errors import ReconcileError
from ..transforms import quote_ident as q, sql_literal
from ..warehouse import once, staging_table

STAGE = "identity"
KINDS = ("candidate", "orphan", "duplicate", "conflict")


def _norm(col: str) -> str:
    return f"NULLIF(lower(trim(CAST({col} AS VARCHAR))), '')"


def _match_fields(cfg: Config, entity: str) -> list[str]:
    ent = cfg.entities[entity]
    fields: list[str] = []
    for rule in ent.match:
        fields += rule.fields + rule.exact
        for entry in rule.block_on:
            fields += entry if isinstance(entry, list) else [entry]
    return list(dict.fromkeys(fields))


def _ext_targets(cfg: Config, entity: str) -> list[str]:
    ent = cfg.entities[entity]
    return sorted({t for s in ent.sources.values() for t in s.external_ids})


def _build_records(con, cfg: Config, entity: str) -> None:
    """_recs: one row per staged record of every system, match fields normalised, stored IDs alongside."""
    ent = cfg.entities[entity]
    fields = _match_fields(cfg, entity)
    exts = _ext_targets(cfg, entity)
    parts = []
    for system, source in sorted(ent.sources.items()):
        exists = con.execute("SELECT count(*) FROM information_schema.tables WHERE table_schema = 'staging' "
                             "AND table_name = ?", [f"{system}__{entity}"]).fetchone()[0]
        if not exists:
            continue
        cols = [f"{sql_literal(system)} AS system", "_record_key AS record_key",
                f"{'TRUE' if cfg.systems[system].creates_identity else 'FALSE'} AS creates",
                "_source_modified_at AS modified_at"]
        cols += [f"{_norm(q(f)) if f in source.fields else 'CAST(NULL AS VARCHAR)'} AS {q(f)}" for f in fields]
        cols.append("_xid" if cfg.systems[system].xid_column else "CAST(NULL AS VARCHAR) AS _xid")
        cols += [(q('_ext_' + t) if t in source.external_ids else f"CAST(NULL AS VARCHAR) AS {q('_ext_' + t)}")
                 for t in exts]
        parts.append(f"SELECT {', '.join(cols)} FROM {staging_table(system, entity)}")
    if not parts:
        raise ReconcileError(f"entity {entity!r} has no staging tables yet: extract before resolving identities")
    con.execute(f"CREATE OR REPLACE TEMP TABLE _recs AS {' UNION ALL '.join(parts)}")


class _Run:
    """Bookkeeping for one resolution run: links and review items written through here."""

    def __init__(self, con, cfg: Config, entity: str, run_id: str, run_at: datetime):
        self.con, self.cfg, self.entity, self.run_id, self.run_at = con, cfg, entity, run_id, run_at
        con.execute("CREATE OR REPLACE TEMP TABLE _seen_items (item_id VARCHAR)")
        self.stats = {"split": 0, "merged": 0, "decisions": 0}

    # -- links ------------------------------------------------------------------------------------------
    def link_from(self, sql: str) -> int:
        """Insert links from a query yielding (system, record_key, xid, rule, confidence); returns how many."""
        con = self.con
        con.execute(f"CREATE OR REPLACE TEMP TABLE _new AS SELECT DISTINCT * FROM ({sql})")
        n = con.execute("SELECT count(*) FROM _new").fetchone()[0]
        if n:
            con.execute("""INSERT INTO identity.xref SELECT xid, ?, system, record_key, rule, confidence, ?, ? FROM _new""",
                        [self.entity, self.run_id, self.run_at])
            con.execute("""INSERT INTO identity.xref_history
                           SELECT ?, xid, system, record_key, 'link', rule, confidence, NULL, ?, ?, NULL FROM _new""",
                        [self.entity, self.run_id, self.run_at])
        return n

    def mint_for(self, where: str, rule: str = "minted") -> int:
        """A new xid for each unlinked record matching `where` (over _recs r)."""
        con = self.con
        con.execute(f"""CREATE OR REPLACE TEMP TABLE _mint AS
                        SELECT r.system, r.record_key, CAST(uuidv7() AS VARCHAR) AS xid FROM _recs r
                        WHERE {self.unlinked('r')} AND ({where})""")
        con.execute("""INSERT INTO identity.xids
                       SELECT xid, ?, 'active', NULL, ?, ?, system || ':' || record_key FROM _mint""",
                    [self.entity, self.run_id, self.run_at])
        return self.link_from(f"SELECT system, record_key, xid, {sql_literal(rule)} AS rule, 1.0 AS confidence FROM _mint")

    def unlinked(self, alias: str) -> str:
        return (f"NOT EXISTS (SELECT 1 FROM identity.xref x WHERE x.entity = {sql_literal(self.entity)} "
                f"AND x.system = {alias}.system AND x.record_key = {alias}.record_key)")

    def apply_candidates(self, cand_sql: str) -> int:
        """Link one-to-one candidates (system, record_key, xid, rule, confidence); others go to review.

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
        con.execute(f"CREATE OR REPLACE TEMP TABLE _taken AS SELECT DISTINCT xid, system FROM identity.xref "
                    f"WHERE entity = {e}")
        con.execute("""
            CREATE OR REPLACE TEMP TABLE _cand_ok AS
            SELECT c.system, c.record_key, c.xid, min(c.rule) AS rule, max(c.confidence) AS confidence
            FROM _cand c
            JOIN _per_record pr ON pr.system = c.system AND pr.record_key = c.record_key AND pr.n = 1
            JOIN _per_xid px ON px.xid = c.xid AND px.system = c.system AND px.n = 1
            LEFT JOIN _taken t ON t.xid = c.xid AND t.system = c.system
            WHERE t.xid IS NULL
            GROUP BY c.system, c.record_key, c.xid
        """)
        return self.link_from("SELECT system, record_key, xid, rule, confidence FROM _cand_ok")

    # -- review items -----------------------------------------------------------------------------------
    def items_from(self, kind: str, sql: str) -> int:
        """Upsert review items from a query yielding (system, item_key, title, details JSON), in one statement.

        The item id is derived from kind, entity and item_key, so the same situation keeps its item across
        runs; a decided or ignored item is never reopened.
        """
        con = self.con
        con.execute(f"""
            CREATE OR REPLACE TEMP TABLE _items AS
            SELECT DISTINCT ON (item_id) * FROM (
                SELECT {sql_literal(kind[:3] + '_')} || substr(sha256({sql_literal(kind + '|' + self.entity + '|')}
                       || item_key), 1, 16) AS item_id, system, title, CAST(details AS JSON) AS details
                FROM ({sql}))
        """)
        con.execute(
            """INSERT INTO review.items
               SELECT item_id, ?, ?, system, 'open', title, details, ?, ?, ?, ? FROM _items
               ON CONFLICT (item_id) DO UPDATE SET
                   status = CASE WHEN review.items.status IN ('decided', 'ignored') THEN review.items.status
                                 ELSE 'open' END,
                   title = excluded.title, details = excluded.details,
                   last_seen_run = excluded.last_seen_run, updated_at = excluded.updated_at""",
            [self.entity, kind, self.run_id, self.run_id, self.run_at, self.run_at])
        con.execute("INSERT INTO _seen_items SELECT item_id FROM _items")
        return con.execute("SELECT count(*) FROM _items").fetchone()[0]


# ----------------------------------------------------------------------------------------------------------

def resolve(con, cfg: Config, entity: str, run_id: str, run_at: datetime) -> dict:
    """Resolve every staged record of an entity to an xid. One transaction; idempotent per run id."""
    ent = cfg.entities[entity]
    r = _Run(con, cfg, entity, run_id, run_at)

    def _body() -> dict:
        _build_records(con, cfg, entity)
        # An erased person's records are never given a new xid (linked ones stay on the erased xid).
        con.execute(f"""DELETE FROM _recs WHERE {r.unlinked('_recs')} AND EXISTS (
                            SELECT 1 FROM identity.erased_records e WHERE e.entity = ? AND e.system = _recs.system
                            AND e.record_key = _recs.record_key)""", [entity])
        _apply_decisions(r)
        _load_distinct(r)
        for round_no in (1, 2):
            _stored_ids(r)
            for rule in ent.match:
                if rule.type == "exact":
                    _exact_rule(r, rule, final=round_no == 2)
            if round_no == 1:
                r.mint_for("r.creates")
        for rule in ent.match:
            if rule.type == "probabilistic":
                _probabilistic_rule(r, rule)
        _orphans(r)
        _duplicates(r)
        for rule in ent.match:
            if rule.type == "probabilistic":
                _probabilistic_duplicates(r, rule)
        _retire(r)
        # Items of identity kinds not seen this run no longer apply (the record linked, the duplicate went away).
        con.execute(
            """UPDATE review.items SET status = 'resolved', updated_at = ?
               WHERE entity = ? AND kind IN ('candidate', 'orphan', 'duplicate', 'conflict') AND status = 'open'
                 AND item_id NOT IN (SELECT item_id FROM _seen_items)""",
            [run_at, entity],
        )
        summary = _summary(r)
        return summary

    return once(con, run_id, entity, STAGE, run_at, _body)


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
    parts = [f"""SELECT rec.system, rec.record_key, coalesce(x.merged_into, x.xid) AS xid, 'stored_xid' AS rule,
                        1.0 AS confidence
                 FROM _recs rec JOIN identity.xids x ON x.xid = rec._xid AND x.entity = {e}
                 WHERE {r.unlinked('rec')}"""]
    for target in _ext_targets(r.cfg, r.entity):
        parts.append(f"""SELECT rec.system, rec.record_key, x.xid, 'external_id:{target}' AS rule, 1.0 AS confidence
                         FROM _recs rec JOIN identity.xref x
                           ON x.entity = {e} AND x.system = {sql_literal(target)} AND x.record_key = rec.{q('_ext_' + target)}
                         WHERE {r.unlinked('rec')}""")
    r.apply_candidates(" UNION ALL ".join(parts))
    # A stored id that cannot be honoured (its xid already has a record of that system) is a conflict to review.
    r.items_from("conflict", f"""
        SELECT c.system, c.system || '|' || c.record_key || '|' || c.rule AS item_key,
               c.system || ' record ' || c.record_key || ' carries a stored id (' || c.rule ||
               ') that cannot be linked one-to-one to xid ' || c.xid AS title,
               to_json(struct_pack(system := c.system, record_key := c.record_key, xid := c.xid, rule := c.rule,
                   why := 'the xid already has a record of this system, or several records claim it')) AS details
        FROM _cand c WHERE {r.unlinked('c')}""")


def _exact_rule(r: _Run, rule, final: bool) -> None:
    """Link one-to-one exact matches; in the final round, put ambiguous ones in review."""
    e = sql_literal(r.entity)
    key = "concat_ws(chr(31), " + ", ".join(f"rec.{q(f)}" for f in rule.fields) + ")"
    all_set = " AND ".join(f"rec.{q(f)} IS NOT NULL" for f in rule.fields)
    r.con.execute(f"""
        CREATE OR REPLACE TEMP TABLE _keyed AS
        SELECT rec.system, rec.record_key, {key} AS k, x.xid
        FROM _recs rec LEFT JOIN identity.xref x ON x.entity = {e} AND x.system = rec.system AND x.record_key = rec.record_key
        WHERE {all_set}
    """)
    r.con.execute("""
        CREATE OR REPLACE TEMP TABLE _kgroups AS
        SELECT k, max(per_system) AS max_per_system, count(DISTINCT xid) AS xids, count(DISTINCT system) AS systems,
               any_value(xid) FILTER (WHERE xid IS NOT NULL) AS the_xid
        FROM (SELECT k, system, xid, count(*) OVER (PARTITION BY k, system) AS per_system FROM _keyed)
        GROUP BY k
    """)
    r.apply_candidates(f"""
        SELECT kd.system, kd.record_key, g.the_xid AS xid, 'match:{rule.name}' AS rule, 1.0 AS confidence
        FROM _keyed kd JOIN _kgroups g USING (k)
        WHERE kd.xid IS NULL AND g.max_per_system = 1 AND g.xids = 1
    """)
    if not final:
        return
    # Ambiguous: an unlinked record whose key is shared by several records of one system, or by several xids.
    r.items_from("candidate", f"""
        SELECT kd.system, kd.system || '|' || kd.record_key AS item_key,
               kd.system || ' record ' || kd.record_key || ' matches several records on {rule.name} (' ||
               replace(kd.k, chr(31), ' + ') || '): not linked automatically' AS title,
               to_json(struct_pack(system := kd.system, record_key := kd.record_key, rule := {sql_literal(rule.name)},
                   key := string_split(kd.k, chr(31)),
                   candidates := list(struct_pack(system := o.system, record_key := o.record_key, xid := o.xid)
                                      ORDER BY o.system, o.record_key),
                   why := 'one-to-one match required for automatic links')) AS details
        FROM _keyed kd JOIN _kgroups g USING (k)
        JOIN _keyed o ON o.k = kd.k AND NOT (o.system = kd.system AND o.record_key = kd.record_key)
        WHERE {r.unlinked('kd')} AND g.systems > 1 AND (g.max_per_system > 1 OR g.xids > 1)
          AND NOT EXISTS (SELECT 1 FROM _distinct d WHERE d.system = kd.system AND d.record_key = kd.record_key
                                                       AND d.xid = o.xid)
        GROUP BY kd.system, kd.record_key, kd.k""")


def _similarities(rule) -> list[str]:
    """Per-field similarity of records a and b (NULL when either side is empty): equality for `exact`
    fields, Jaro-Winkler for the others."""
    sims = []
    for f in rule.fields:
        if f in rule.exact:
            sims.append(f"CASE WHEN a.{q(f)} IS NULL OR b.{q(f)} IS NULL THEN NULL "
                        f"WHEN a.{q(f)} = b.{q(f)} THEN 1.0 ELSE 0.0 END")
        else:
            sims.append(f"CASE WHEN a.{q(f)} IS NULL OR b.{q(f)} IS NULL THEN NULL "
                        f"ELSE jaro_winkler_similarity(a.{q(f)}, b.{q(f)}) END")
    return sims


def _probabilistic_rule(r: _Run, rule) -> None:
    e = sql_literal(r.entity)
    sims = _similarities(rule)
    def block(entry) -> str:
        fs = entry if isinstance(entry, list) else [entry]
        on = " AND ".join(f"a.{q(f)} = b.{q(f)}" for f in fs)
        return (f"""SELECT a.system AS a_system, a.record_key AS a_key, b.system AS b_system, b.record_key AS b_key
                    FROM _unl a JOIN _recs b ON {on} AND a.system <> b.system""")

    # Only unlinked records are compared, each against records of other systems sharing a blocking key.
    r.con.execute(f"CREATE OR REPLACE TEMP TABLE _unl AS SELECT * FROM _recs rec WHERE {r.unlinked('rec')}")
    blocks = " UNION ".join(block(entry) for entry in rule.block_on)
    evidence = "struct_pack(" + ", ".join(
        f"{q(f)} := struct_pack(a := a.{q(f)}, b := b.{q(f)}, similarity := round(({s}), 3))"
        for f, s in zip(rule.fields, sims)) + ")"
    r.con.execute(f"""
        CREATE OR REPLACE TEMP TABLE _pairs AS
        WITH p AS ({blocks}),
             scored AS (
                SELECT a.system, a.record_key, x.xid, b.system AS other_system, b.record_key AS other_key,
                       list_filter([{', '.join(sims)}], lambda s: s IS NOT NULL) AS sims, {evidence} AS evidence
                FROM p JOIN _recs a ON a.system = p.a_system AND a.record_key = p.a_key
                       JOIN _recs b ON b.system = p.b_system AND b.record_key = p.b_key
                       JOIN identity.xref x ON x.entity = {e} AND x.system = b.system AND x.record_key = b.record_key)
        SELECT system, record_key, xid, other_system, other_key, round(list_avg(sims), 4) AS score, evidence
        FROM scored WHERE len(sims) >= 2
    """)
    r.con.execute("""DELETE FROM _pairs WHERE EXISTS (SELECT 1 FROM _distinct d WHERE d.system = _pairs.system
                     AND d.record_key = _pairs.record_key AND d.xid = _pairs.xid)""")
    if rule.link_threshold is not None:
        r.apply_candidates(f"""
            SELECT system, record_key, xid, 'match:{rule.name}' AS rule, max(score) AS confidence FROM _pairs
            WHERE score >= {rule.link_threshold} GROUP BY ALL""")
    r.items_from("candidate", f"""
        SELECT system, system || '|' || record_key AS item_key,
               system || ' record ' || record_key || ' resembles ' || count(*) || ' record(s) ({rule.name}, best score '
               || max(score) || '): review' AS title,
               to_json(struct_pack(system := system, record_key := record_key, rule := {sql_literal(rule.name)},
                   candidates := list(struct_pack(xid := xid, system := other_system, record_key := other_key,
                                                  score := score, evidence := evidence) ORDER BY score DESC, xid),
                   why := {sql_literal('probabilistic match: people decide' if rule.link_threshold is None else
                                       f'score below link_threshold {rule.link_threshold} or not one-to-one')})) AS details
        FROM _pairs p WHERE score >= {rule.review_threshold} AND {r.unlinked('p')}
          AND p.system || '|' || p.record_key NOT IN (   -- an earlier rule already put it in review
              SELECT i.system || '|' || (i.details->>'record_key') FROM review.items i JOIN _seen_items USING (item_id)
              WHERE i.kind = 'candidate')
        GROUP BY system, record_key""")


def _probabilistic_duplicates(r: _Run, rule) -> None:
    """Within one system, records scoring at or above review_threshold are duplicate candidates (never merged)."""
    sims = _similarities(rule)
    blocks = " UNION ".join(
        "SELECT a.system, a.record_key AS a_key, b.record_key AS b_key FROM _recs a JOIN _recs b ON "
        + " AND ".join(f"a.{q(f)} = b.{q(f)}" for f in (e if isinstance(e, list) else [e]))
        + " AND a.system = b.system AND a.record_key < b.record_key" for e in rule.block_on)
    e = sql_literal(r.entity)
    r.items_from("duplicate", f"""
        WITH p AS ({blocks}),
             scored AS (
                SELECT p.system, p.a_key, p.b_key,
                       list_avg(list_filter([{', '.join(sims)}], lambda s: s IS NOT NULL)) AS score,
                       len(list_filter([{', '.join(sims)}], lambda s: s IS NOT NULL)) AS n
                FROM p JOIN _recs a ON a.system = p.system AND a.record_key = p.a_key
                       JOIN _recs b ON b.system = p.system AND b.record_key = p.b_key)
        SELECT s.system, s.system || '|' || {sql_literal(rule.name)} || '|' || s.a_key || '|' || s.b_key AS item_key,
               '2 ' || s.system || ' records look alike (' || {sql_literal(rule.name)} || ', score ' ||
               round(s.score, 3) || '): same person entered twice?' AS title,
               to_json(struct_pack(system := s.system, rule := {sql_literal(rule.name)}, score := round(s.score, 4),
                   records := [struct_pack(record_key := s.a_key, xid := xa.xid),
                               struct_pack(record_key := s.b_key, xid := xb.xid)],
                   why := 'within-system duplicate by score: decide merge or distinct')) AS details
        FROM scored s
        LEFT JOIN identity.xref xa ON xa.entity = {e} AND xa.system = s.system AND xa.record_key = s.a_key
        LEFT JOIN identity.xref xb ON xb.entity = {e} AND xb.system = s.system AND xb.record_key = s.b_key
        WHERE s.n >= 2 AND s.score >= {rule.review_threshold}
          -- pairs an exact rule already flagged as duplicates are not repeated
          AND NOT EXISTS (SELECT 1 FROM review.items i JOIN _seen_items USING (item_id)
                          WHERE i.kind = 'duplicate' AND i.system = s.system
                            AND contains(CAST(i.details AS VARCHAR), '"' || s.a_key || '"')
                            AND contains(CAST(i.details AS VARCHAR), '"' || s.b_key || '"'))""")


def _orphans(r: _Run) -> None:
    ent = r.cfg.entities[r.entity]
    if ent.identity.orphans == "create":
        r.mint_for("""NOT r.creates AND r.system || '|' || r.record_key NOT IN (
                          SELECT i.system || '|' || (i.details->>'record_key') FROM review.items i
                          JOIN _seen_items USING (item_id) WHERE i.kind = 'candidate')""", rule="minted_orphan")
        return
    r.items_from("orphan", f"""
        SELECT rec.system, rec.system || '|' || rec.record_key AS item_key,
               rec.system || ' record ' || rec.record_key || ' matches no one and ' || rec.system ||
               ' may not create identities' AS title,
               to_json(struct_pack(system := rec.system, record_key := rec.record_key,
                   why := rec.system || ' has creates_identity: false; link it, or set identity.orphans: create')) AS details
        FROM _recs rec
        WHERE {r.unlinked('rec')}
          AND rec.system || '|' || rec.record_key NOT IN (   -- already in review as a candidate
              SELECT i.system || '|' || (i.details->>'record_key') FROM review.items i JOIN _seen_items USING (item_id)
              WHERE i.kind = 'candidate')""")


def _duplicates(r: _Run) -> None:
    """Records of one system sharing an exact key: duplicate candidates for stewards (never merged)."""
    e = sql_literal(r.entity)
    for rule in r.cfg.entities[r.entity].match:
        if rule.type != "exact":
            continue
        key = "concat_ws(chr(31), " + ", ".join(f"rec.{q(f)}" for f in rule.fields) + ")"
        all_set = " AND ".join(f"rec.{q(f)} IS NOT NULL" for f in rule.fields)
        r.items_from("duplicate", f"""
            SELECT rec.system, rec.system || '|' || {sql_literal(rule.name)} || '|' || {key} AS item_key,
                   count(*) || ' ' || rec.system || ' records share {rule.name} ' || replace({key}, chr(31), ' + ') ||
                   ': same person entered twice, or different people (e.g. a shared mailbox)?' AS title,
                   to_json(struct_pack(system := rec.system, rule := {sql_literal(rule.name)},
                       key := string_split({key}, chr(31)),
                       records := list(struct_pack(record_key := rec.record_key, xid := x.xid) ORDER BY rec.record_key),
                       why := 'within-system duplicate: decide merge or distinct')) AS details
            FROM _recs rec LEFT JOIN identity.xref x
              ON x.entity = {e} AND x.system = rec.system AND x.record_key = rec.record_key
            WHERE {all_set}
            GROUP BY rec.system, {key} HAVING count(*) > 1""")


def _retire(r: _Run) -> None:
    """An xid none of whose records remains in any system is retired (and revived if one comes back)."""
    con, e = r.con, r.entity
    con.execute("""CREATE OR REPLACE TEMP TABLE _present AS
                   SELECT DISTINCT x.xid FROM identity.xref x JOIN _recs rec USING (system, record_key)
                   WHERE x.entity = ?""", [e])
    con.execute("""CREATE OR REPLACE TEMP TABLE _retired AS SELECT xid FROM identity.xids
                   WHERE entity = ? AND status = 'active' AND xid NOT IN (SELECT xid FROM _present)""", [e])
    con.execute("""INSERT INTO identity.xref_history
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
        con.execute("INSERT INTO identity.xref_history VALUES (?, ?, ?, ?, 'unlink', ?, NULL, NULL, ?, ?, ?)",
                    [r.entity, prev[0], system, key, rule, r.run_id, r.run_at, note])
    con.execute("INSERT INTO identity.xref VALUES (?, ?, ?, ?, ?, 1.0, ?, ?)",
                [xid, r.entity, system, key, rule, r.run_id, r.run_at])
    con.execute("INSERT INTO identity.xref_history VALUES (?, ?, ?, ?, ?, ?, 1.0, ?, ?, ?, ?)",
                [r.entity, xid, system, key, action, rule, prev[0] if prev else None, r.run_id, r.run_at, note])


def _final_xid(r: _Run, xid: str) -> str:
    row = r.con.execute("SELECT status, merged_into FROM identity.xids WHERE xid = ? AND entity = ?",
                        [xid, r.entity]).fetchone()
    if row is None:
        raise ReconcileError(f"unknown xid {xid!r} for entity {r.entity!r}")
    return row[1] if row[0] == "merged" and row[1] else xid


def _new_xid(r: _Run, origin: str) -> str:
    xid = str(r.con.execute("SELECT uuidv7()").fetchone()[0])
    r.con.execute("INSERT INTO identity.xids VALUES (?, ?, 'active', NULL, ?, ?, ?)",
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


def _summary(r: _Run) -> dict:
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
    }


def xid_identities_sql(cfg: Config, entity: str, owner: str) -> str:
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
            f"WHERE x.entity = {sql_literal(entity)}")
