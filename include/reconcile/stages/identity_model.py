"""The Fellegi-Sunter match model of identity resolution, trained and applied with Splink (DuckDB backend).

Called by stages/identity.py (and `check-config`, which prints the derived model). Three things live here:
  - `model_spec`: which fields are compared and which blocking rules make candidate pairs, from the
    entity's `match:` rules or, without them, derived from the canonical fields two or more systems map;
  - `train`: m and u probabilities estimated from the records themselves (u from random pairs, m by
    expectation maximisation on blocked pairs), term-frequency adjustments, a prior from the exact rules;
    the result is a plain JSON dict (Splink's model format) that identity.model stores per run;
  - `score`: match probability and per-field match weights for the blocked pairs of the records that are
    new or changed this run, against every record (incremental: cost follows what changed).

Splink runs in its own in-memory DuckDB connection; records go in and scored pairs come out as Arrow
tables, so nothing of Splink's working tables ever lands in the warehouse.
"""
from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..config.models import Config

if TYPE_CHECKING:
    import pyarrow as pa

# Canonical field names the default model knows how to compare (and the kind of comparison).
FIELD_KINDS = {
    "email": "email", "email_address": "email",
    "phone": "phone", "mobile": "phone", "phone_number": "phone",
    "first_name": "first_name", "firstname": "first_name", "given_name": "first_name", "forename": "first_name",
    "last_name": "last_name", "lastname": "last_name", "surname": "last_name", "family_name": "last_name",
    "company": "company", "company_name": "company", "organisation": "company", "organization": "company",
    "birth_date": "exact", "date_of_birth": "exact", "postcode": "exact", "zip": "exact", "city": "fuzzy",
}
FULL_NAME = "_full_name"  # derived column: first and last name, for term frequencies on the whole name
# Below this many records m stays at Splink's defaults (EM needs enough pairs to learn from; on a handful of
# records it would only fit noise, slowly): u is still estimated, term frequencies still apply.
MIN_EM_RECORDS = 2_000
MIN_U_RECORDS = 1_000  # below: starting u values, no term-frequency adjustments
EM_ITERATIONS = 10
# Training works on bounded samples, so its cost stays flat as the table grows: u from this many random
# record pairs (two per record, at least 100,000), m by EM on at most this many pairs of each blocking rule.
U_MAX_PAIRS = 2_000_000
EM_MAX_PAIRS = 200_000


@dataclass
class ModelSpec:
    """What the model compares and how candidate pairs are found."""

    fields: list[str]                                  # compared canonical fields, in order
    blocking: list[list[str]]                          # a pair shares the values of every field of one entry
    link_threshold: float = 0.999
    review_threshold: float = 0.9
    derived: bool = False                              # True when made from the fields (no `match:`)
    names: tuple[str, str] | None = None               # (first, last) fields, when both are compared
    exact_fields: set[str] = field(default_factory=set)  # compared by equality only (the rules' `exact`)

    @property
    def signature(self) -> str:
        """Changes whenever the comparisons or blocking change: a stored model is reused only for the same."""
        text = json.dumps({"fields": self.fields, "blocking": self.blocking, "names": self.names,
                           "exact": sorted(self.exact_fields), "version": 2}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def _kind(name: str) -> str | None:
    return FIELD_KINDS.get(name.lower())


def mapped_by(cfg: Config, entity: str) -> dict[str, list[str]]:
    """Canonical field -> the systems that map it."""
    ent = cfg.entities[entity]
    out: dict[str, list[str]] = {}
    for system, source in sorted(ent.sources.items()):
        for f in source.fields:
            out.setdefault(f, []).append(system)
    return out


def default_rules(cfg: Config, entity: str) -> list:
    """The `match:` rules an entity gets when it has none: exact email (name-checked), plus a probabilistic
    rule over the identity fields that at least two systems map, blocking chosen from them."""
    from ..config.models import MatchRule

    ent = cfg.entities[entity]
    shared = [f for f, systems in mapped_by(cfg, entity).items()
              if len(systems) >= 2 and _kind(f) and ent.fields.get(f) and ent.fields[f].type in ("string", "date")]
    by_kind: dict[str, str] = {}
    for f in shared:
        by_kind.setdefault(_kind(f), f)
    rules = []
    if "email" in by_kind:
        rules.append(MatchRule(name=by_kind["email"], type="exact", fields=[by_kind["email"]]))
    if len(shared) >= 2:
        blocks: list = []
        for kinds in (("email",), ("phone",), ("first_name", "last_name"), ("last_name", "company")):
            if all(k in by_kind for k in kinds):
                entry = [by_kind[k] for k in kinds]
                blocks.append(entry[0] if len(entry) == 1 else entry)
        if blocks:
            rules.append(MatchRule(name="default", type="probabilistic", fields=shared, block_on=blocks,
                                   exact=[by_kind["phone"]] if "phone" in by_kind else []))
    return rules


def match_rules(cfg: Config, entity: str) -> list:
    """The entity's `match:` rules, or the derived default ones when it has none."""
    ent = cfg.entities[entity]
    return list(ent.match) if ent.match else default_rules(cfg, entity)


def model_spec(cfg: Config, entity: str) -> ModelSpec | None:
    """The model over every field the rules compare; None when no rule is probabilistic."""
    ent = cfg.entities[entity]
    rules = match_rules(cfg, entity)
    prob = [r for r in rules if r.type == "probabilistic"]
    if not prob:
        return None
    fields: list[str] = []
    blocking: list[list[str]] = []
    exact: set[str] = set()
    for r in rules:
        fields += r.fields
        if r.type == "exact":
            blocking.append(list(r.fields))
        else:
            exact |= set(r.exact)
            blocking += [e if isinstance(e, list) else [e] for e in r.block_on]
    fields = list(dict.fromkeys(fields))
    blocking = [list(b) for b in dict.fromkeys(tuple(b) for b in blocking)]
    firsts = [f for f in fields if _kind(f) == "first_name"]
    lasts = [f for f in fields if _kind(f) == "last_name"]
    links = [r.link_threshold for r in prob if r.link_threshold is not None]
    reviews = [r.review_threshold for r in prob if r.review_threshold is not None]
    return ModelSpec(fields=fields, blocking=blocking,
                     link_threshold=max(links) if links else ent.identity.link_threshold,
                     review_threshold=min(reviews) if reviews else ent.identity.review_threshold,
                     derived=not ent.match,
                     names=(firsts[0], lasts[0]) if firsts and lasts else None, exact_fields=exact)


# ----------------------------------------------------------------------------------------------------------
# Splink
# ----------------------------------------------------------------------------------------------------------

def _splink():
    try:
        import splink
        import splink.comparison_library as cl
    except ImportError as exc:  # pragma: no cover - splink is pinned in requirements.txt
        raise ImportError("identity resolution needs Splink: pip install 'splink>=5,<6'") from exc
    return splink, cl


# Starting values (m, u per non-null level, best level first) for each kind of comparison: what a model
# holds before it is trained, and keeps where the data is too small to estimate from (docs/identity.md).
_START = {
    "exact": ([0.9, 0.1], [0.0001, 0.9999]),
    "full_name": ([0.82, 0.02, 0.06, 0.02, 0.03, 0.03, 0.02], [0.00001, 0.000001, 0.00001, 0.00005, 0.005, 0.01, 0.98494]),
    "name": ([0.85, 0.06, 0.03, 0.03, 0.03], [0.005, 0.001, 0.002, 0.01, 0.982]),
    "fuzzy": ([0.75, 0.08, 0.05, 0.12], [0.005, 0.001, 0.004, 0.99]),
}


def _comparisons(spec: ModelSpec, tf: bool) -> list:
    _, cl = _splink()
    email = next((f for f in spec.fields if _kind(f) == "email"), None)
    out = []
    for f in spec.fields:
        if spec.names and f in spec.names:
            if f == spec.names[0]:
                m, u = _START["full_name"]
                out.append(cl.ForenameSurnameComparison(spec.names[0], spec.names[1],
                                                        forename_surname_concat_col_name=FULL_NAME if tf else None)
                           .configure(m_probabilities=m, u_probabilities=u))
            continue
        kind = _kind(f)
        if kind in ("email", "phone") or f in spec.exact_fields or kind == "exact":
            m, u = _START["exact"]
            out.append(cl.ExactMatch(f).configure(term_frequency_adjustments=tf and kind in ("email", "phone"),
                                                  m_probabilities=m, u_probabilities=u))
        elif kind in ("first_name", "last_name"):
            m, u = _START["name"]
            out.append(cl.NameComparison(f).configure(term_frequency_adjustments=tf, m_probabilities=m,
                                                      u_probabilities=u))
        else:
            m, u = _START["fuzzy"]
            fuzzy = (_company_comparison(f, email) if kind == "company" and email
                     else cl.JaroWinklerAtThresholds(f, [0.92, 0.8]))
            out.append(fuzzy.configure(m_probabilities=m, u_probabilities=u))
    return out


JOB_CHANGE = "Different company and different email: a job change, no further evidence"


def _company_comparison(company: str, email: str):
    """The company compared like any fuzzy field, except that when both emails are present and differ, a
    different company is no further evidence against a match. People change email and company together
    (a new job); the model's independence assumption would otherwise count one job change twice, and keep
    a person with the same name and phone in review forever (docs/identity.md)."""
    _, cl = _splink()
    import splink.comparison_level_library as cll

    el, er = f'"{email}_l"', f'"{email}_r"'
    return cl.CustomComparison(output_column_name=company, comparison_levels=[
        cll.NullLevel(company),
        cll.ExactMatchLevel(company),
        cll.JaroWinklerLevel(company, 0.92),
        cll.JaroWinklerLevel(company, 0.8),
        cll.CustomLevel(f"{el} IS NOT NULL AND {er} IS NOT NULL AND {el} <> {er}", label_for_charts=JOB_CHANGE)
        .configure(is_null_level=True),
        cll.ElseLevel(),
    ])


def _block_sql(entry: list[str]) -> str:
    return " AND ".join(f'l."{f}" = r."{f}"' for f in entry)


def _settings(spec: ModelSpec, tf: bool) -> dict:
    splink, _ = _splink()
    creator = splink.SettingsCreator(
        link_type="dedupe_only", unique_id_column_name="rid",
        comparisons=_comparisons(spec, tf),
        blocking_rules_to_generate_predictions=[_block_sql(b) for b in spec.blocking],
        additional_columns_to_retain=["system", "grp"],
        retain_intermediate_calculation_columns=True,
        probability_two_random_records_match=0.0001,
        max_iterations=EM_ITERATIONS,
    )
    return creator.get_settings("duckdb").as_dict()


class SplinkDB:
    """A private in-memory DuckDB for Splink, holding the records as `recs`, with the config's resource
    settings (`duckdb:` memory limit, spill folder, threads) like every database reconcile opens. One per
    resolution run: training, scoring and the evidence of groups (`train`, `score`, `score_groups`) share
    the records and their term-frequency tables, loaded once. Opened on first use; `close` when done.

    In there a record's `rid` is a number (`rid_names` maps it to the record's `system:key`): Splink's
    table of blocked pairs holds two ids per pair, tens of millions of pairs at a million people, and
    numbers keep it several times smaller (and its joins faster) than the text ids."""

    def __init__(self, cfg: Config, records: Callable[[], pa.Table]):
        self.cfg, self._read, self._records, self._con, self._tf = cfg, records, None, None, set()

    @property
    def records(self) -> pa.Table:
        """The records, read (`records()`) on first use: a night that neither trains nor scores never reads them."""
        if self._records is None:
            self._records = self._read()
        return self._records

    @property
    def con(self):
        if self._con is None:
            from ..warehouse import connect

            con = connect(self.cfg)
            con.execute("SET preserve_insertion_order = false")
            con.register("_recs_arrow", self.records)
            # numbered in id order: the same records get the same numbers every run (Splink's samples follow them)
            con.execute("CREATE TABLE rid_names AS SELECT rid AS name, "
                        "CAST(row_number() OVER (ORDER BY rid) AS BIGINT) AS rid FROM _recs_arrow")
            con.execute("CREATE TABLE recs AS SELECT r.* REPLACE (n.rid AS rid) FROM _recs_arrow r "
                        "JOIN rid_names n ON n.name = r.rid")
            con.unregister("_recs_arrow")
            self._con = con
        return self._con

    def linker(self, settings: dict):
        """(Splink's database API, a linker over `recs` with `settings`, the person term frequencies of
        every column it adjusts registered). Each linker gets its own database API, so Splink's cached
        working tables of one (training) are never taken for another's (scoring)."""
        splink, _ = _splink()
        db = splink.DuckDBAPI(connection=self.con)
        linker = splink.Linker(db.register("recs"), settings, log_level=logging.ERROR)
        model = linker.misc.save_model_to_json()
        cols = sorted({lv["tf_adjustment_column"] for c in model["comparisons"] for lv in c["comparison_levels"]
                       if lv.get("tf_adjustment_column")})
        for col in cols:
            if col not in self._tf:
                self.con.execute(f'CREATE TABLE "tf_{col}" AS {term_frequency_sql(col)}')
                self._tf.add(col)
            linker.table_management.register_term_frequency_lookup(db.register(f"tf_{col}"), col)
        return db, linker

    def release(self, db, *tables: str) -> None:
        """Drop the working tables of one linker's use: Splink's (of its database API `db`) and ours
        (`tables`). The records and term frequencies stay for the next."""
        db.delete_tables_created_by_splink_from_db()
        for t in tables:
            self.con.execute(f"DROP TABLE IF EXISTS {t}")

    def close(self) -> None:
        if self._con is not None:
            self._con.close()
            self._con = None


def term_frequency_sql(col: str) -> str:
    """SQL over `recs` (system, grp, col): per value of `col`, its u, the chance that a record of someone else
    holds it too (Splink's term-frequency table for that column).

    Splink's own term frequencies count every record, the record itself and its person's other records
    included, so a person held by three systems made their own phone look three times as common as it is,
    and name + phone too weak to link. Here:
      - people holding a value: the most records of it in any one system, records of one group (`grp`:
        the xid a record is already linked to, else its exact-rule key) counting once;
      - a value's u: the other people holding it, (people - 1) / all people with a value, but never
        rarer than the average chance that two different people agree (the agreement rate of record
        pairs within each system, where records are of different people, computed exactly);
      - with no two people agreeing anywhere: one in (people with a value)^2.
    """
    return f"""WITH per_system AS (
                   SELECT "{col}", system, count(DISTINCT grp) AS n FROM recs WHERE "{col}" IS NOT NULL GROUP BY ALL),
               systems AS (SELECT system, sum(n) AS total, sum(n * (n - 1)) AS agreeing FROM per_system GROUP BY ALL),
               people AS (SELECT "{col}", max(n) AS n FROM per_system GROUP BY ALL),
               total AS (SELECT CAST(sum(n) AS DOUBLE) AS n FROM people),
               average AS (SELECT CAST(sum(agreeing) AS DOUBLE) / nullif(sum(total * (total - 1)), 0) AS u
                           FROM systems)
               SELECT p."{col}", greatest((p.n - 1) / t.n, coalesce(a.u, 0), 1 / (t.n * t.n)) AS "tf_{col}"
               FROM people p, total t, average a"""


def em_rules(spec: ModelSpec) -> list[list[str]]:
    """The blocking rules EM trains on: in order, each rule that lets a comparison be estimated that no
    earlier one did (a session estimates every comparison but those over the rule's own fields), so every
    comparison is estimated once and the others are not trained for nothing. On the demo: email, then phone.
    """
    comparisons = list(dict.fromkeys(frozenset(spec.names) if spec.names and f in spec.names else frozenset([f])
                                     for f in spec.fields))
    left, rules = set(comparisons), []
    for rule in spec.blocking:
        estimated = {c for c in left if not c & set(rule)}
        if estimated:
            rules.append(rule)
            left -= estimated
    return rules


def train(sdb: SplinkDB, spec: ModelSpec, previous: dict | None = None) -> dict:
    """Estimate the model's parameters on the records of `sdb` (Arrow: rid, system, grp, the spec's fields,
    _full_name).

    u from random record pairs, m by expectation maximisation on the pairs of each blocking rule (the
    rule's own fields keep their previous or default m), the prior from the exact rules' matches. With a
    previous model of the same spec, EM starts from its m values. Returns Splink's model JSON.
    """
    n = sdb.records.num_rows
    # Term frequencies, like u, mean something only over enough records.
    db, linker = sdb.linker(previous or _settings(spec, tf=n >= MIN_U_RECORDS))
    try:
        exact_rules = [_block_sql(b) + ' AND l."system" <> r."system"' for b in spec.blocking if len(b) == 1
                       and _kind(b[0]) == "email"]
        # The prior: matches found by the exact rules, scaled up for the ones they miss; on few records (or
        # without an exact rule) one match per record is assumed.
        settings_prior = 1.0 / max(n - 1, 1)
        linker._settings_obj._probability_two_random_records_match = settings_prior
        if exact_rules and n >= MIN_U_RECORDS:
            try:
                linker.training.estimate_probability_two_random_records_match(exact_rules, recall=0.8)
            except Exception:  # no match found to estimate from: the assumed prior stays
                pass
            if not linker._settings_obj._probability_two_random_records_match > 0:
                linker._settings_obj._probability_two_random_records_match = settings_prior
            # Matches are (almost) all between systems, and those are the pairs the model decides on: the
            # prior is per cross-system pair, not per pair of any two records.
            sizes = sdb.con.execute("SELECT count(*) FROM recs GROUP BY system").fetchall()
            cross = (n * n - sum(c * c for (c,) in sizes)) / 2
            if cross > 0:
                linker._settings_obj._probability_two_random_records_match = min(
                    0.5, linker._settings_obj._probability_two_random_records_match * (n * (n - 1) / 2) / cross)
        if n >= MIN_U_RECORDS:
            linker.training.estimate_u_using_random_sampling(max_pairs=min(U_MAX_PAIRS, max(1e5, n * 2.0)), seed=1)
        for b in (em_rules(spec) if n >= MIN_EM_RECORDS else []):
            try:
                # A bounded sample of the rule's pairs (records kept by a hash of their id on each side,
                # sized from a 10% probe): the cost of training does not grow with the table.
                linker.training.estimate_parameters_using_expectation_maximisation(
                    _block_sql(b), max_pairs=EM_MAX_PAIRS, record_sample_proportion=0.1)
            except Exception:  # a rule without enough pairs to learn from: those m values stay as they are
                continue
        return linker.misc.save_model_to_json()
    finally:
        sdb.release(db)


def m_u(model: dict) -> dict[str, list[dict]]:
    """Per comparison, its levels with m and u: what a person reads to see what the model learned."""
    out = {}
    for c in model["comparisons"]:
        out[c["output_column_name"]] = [
            {"level": lv.get("label_for_charts"), "m": lv.get("m_probability"), "u": lv.get("u_probability")}
            for lv in c["comparison_levels"] if not lv.get("is_null_level")]
    return out


def score(sdb: SplinkDB, fresh, model: dict, spec: ModelSpec):
    """Blocked pairs of every fresh record (rid in the Arrow table `fresh`) with every record, scored.

    Pairs of two fresh records are scored once; a fresh record is never paired with itself. Returns (the
    number of pairs scored, an Arrow table (rid_l, rid_r, system_l, system_r, probability, weight,
    evidence, evidence_rev) of the pairs at or above the review threshold: the others are no match and are
    not kept). Evidence is JSON {field: {a, b, weight}} with a the left record (evidence_rev: the right);
    term frequencies come from all records, counted per person (`term_frequency_sql`).
    """
    con = sdb.con
    con.register("_fresh_arrow", fresh)
    con.execute("CREATE TABLE fresh_ids AS SELECT DISTINCT n.rid FROM _fresh_arrow f "
                "JOIN rid_names n ON n.name = f.rid")
    con.unregister("_fresh_arrow")
    con.execute("CREATE TABLE fresh AS SELECT r.* FROM recs r SEMI JOIN fresh_ids USING (rid)")
    con.execute("CREATE TABLE rest AS SELECT r.* FROM recs r ANTI JOIN fresh_ids USING (rid)")
    db, linker = sdb.linker(model)
    try:
        # Splink keeps only the pairs at or above the review threshold: the others (most of them) are never
        # materialised with their comparison columns, so memory follows the review band, not the blocks.
        band = {"threshold_match_probability": spec.review_threshold, "warning_mode": "never"}
        parts = [linker.inference.predict_within(db.register("fresh"), **band)]
        if con.execute("SELECT count(*) FROM rest").fetchall()[0][0]:
            parts.append(linker.inference.predict_between(db.register("fresh"), db.register("rest"), **band))
        _keep_scored(con, parts, model, spec, f"match_probability >= {spec.review_threshold}")
        return _blocked_pairs(con, spec), con.table("scored").to_arrow_table()
    finally:
        sdb.release(db, "fresh_ids", "fresh", "rest", "cand", "scored")


def _keep_scored(con, parts, model: dict, spec: ModelSpec, where: str) -> None:
    """Table `scored` (rid_l, rid_r, system_l, system_r, probability, weight, evidence, evidence_rev) from
    Splink's prediction tables `parts`, the rows matching `where`."""
    names = [c["output_column_name"] for c in model["comparisons"]]
    cols = {c for p in parts for c in p.as_duckdbpyrelation().columns}

    def side(name: str, s: str) -> str:
        if name == FULL_NAME or f"{name}_{s}" not in cols:
            return "NULL"
        return f'"{name}_{s}"'

    ev_fields = []
    for name in names:
        weight = f'"mw_{name}"' + (f' + coalesce("mw_tf_adj_{name}", 0)' if f"mw_tf_adj_{name}" in cols else "")
        if spec.names and name == f"{spec.names[0]}_{spec.names[1]}":
            a = f"concat_ws(' ', {side(spec.names[0], 'l')}, {side(spec.names[1], 'l')})"
            b = f"concat_ws(' ', {side(spec.names[0], 'r')}, {side(spec.names[1], 'r')})"
        else:
            a, b = side(name, "l"), side(name, "r")
        ev_fields.append((name, a, b, f"round({weight}, 2)"))

    def evidence(flip: bool) -> str:
        return "CAST(to_json(struct_pack(" + ", ".join(
            f'"{n}" := struct_pack(a := {b if flip else a}, b := {a if flip else b}, weight := {w})'
            for n, a, b, w in ev_fields) + ")) AS VARCHAR)"
    union = " UNION ALL ".join(
        f"""SELECT nl.name AS rid_l, nr.name AS rid_r, system_l, system_r, match_probability AS probability,
                   round(match_weight, 2) AS weight, {evidence(False)} AS evidence,
                   {evidence(True)} AS evidence_rev
            FROM {p.physical_name} p JOIN rid_names nl ON nl.rid = p.rid_l JOIN rid_names nr ON nr.rid = p.rid_r
            WHERE {where}""" for p in parts)
    con.execute(f"CREATE TABLE scored AS {union}")


def score_groups(sdb: SplinkDB, members, model: dict, spec: ModelSpec):
    """Every pair of records on one identity, scored whatever its probability: the evidence of links that
    no pair scored by `score` explains (a stored id or an exact key whose records' best pair is below the
    review threshold, or was not scored this run).

    `sdb` as for `score` (all the records: term frequencies count people over all of them); `members` an
    Arrow table (rid, xid) of the records of the identities to explain. Blocking on the xid, so the cost
    follows the identities' sizes. Returns an Arrow table like `score`'s, every pair kept.
    """
    con = sdb.con
    con.register("_members_arrow", members)
    con.execute("CREATE TABLE grouped AS SELECT r.* REPLACE (m.xid AS grp) FROM recs r "
                "JOIN rid_names n USING (rid) JOIN _members_arrow m ON m.rid = n.name")
    con.unregister("_members_arrow")
    db, linker = sdb.linker(model)
    try:
        part = linker.inference.predict_within(db.register("grouped"), warning_mode="never",
                                               blocking_rules_to_generate_predictions=['l."grp" = r."grp"'])
        _keep_scored(con, [part], model, spec, "TRUE")
        return con.table("scored").to_arrow_table()
    finally:
        sdb.release(db, "grouped", "scored")



def _blocked_pairs(con, spec: ModelSpec) -> int:
    """How many pairs `score` scored: the pairs of a fresh record with any other record sharing a blocking key,
    each pair once (two fresh records in rid order), counted per rule without the pairs of the rules before
    it, as Splink generates them. Counts of equi-joins only: linear in the block sizes."""
    con.execute("CREATE TABLE cand AS SELECT r.*, f.rid IS NOT NULL AS is_fresh FROM recs r LEFT JOIN fresh_ids f "
                "USING (rid)")
    n = 0
    for i, b in enumerate(spec.blocking):
        earlier = " OR ".join(f"({_block_sql(e)})" for e in spec.blocking[:i]) or "FALSE"
        n += con.execute(f"""SELECT count(*) FROM fresh l JOIN cand r ON {_block_sql(b)}
                             WHERE l.rid <> r.rid AND (NOT r.is_fresh OR l.rid < r.rid)
                               AND NOT coalesce({earlier}, FALSE)""").fetchall()[0][0]
    return n


def comparison_names(model: dict) -> list[str]:
    return [c["output_column_name"] for c in model["comparisons"]]


def describe(cfg: Config, entity: str) -> tuple[list[str], list[str]]:
    """For `check-config`: (the derived rules as text when the entity has no `match:`, warnings about
    sources that can never link to another system)."""
    ent = cfg.entities[entity]
    rules = match_rules(cfg, entity)
    lines = []
    if not ent.match:
        if not rules:
            lines.append(f"entity {entity}: no match: rules, and no identity field (email, phone, names, company) "
                         f"is mapped by two systems: records link only by stored ids")
        for r in rules:
            if r.type == "exact":
                lines.append(f"entity {entity}: derived rule {r.name}: exact on {', '.join(r.fields)} "
                             f"(one-to-one, names must not contradict)")
            else:
                blocks = "; ".join(" + ".join(b if isinstance(b, list) else [b]) for b in r.block_on)
                lines.append(f"entity {entity}: derived rule {r.name}: match model over {', '.join(r.fields)}; "
                             f"blocking on {blocks}")
    keys = [list(r.fields) for r in rules if r.type == "exact"]
    keys += [e if isinstance(e, list) else [e] for r in rules if r.type == "probabilistic" for e in r.block_on]
    warnings = []
    for system, source in sorted(ent.sources.items()):
        stored = bool(source.external_ids) or any(system in s.external_ids for s in ent.sources.values())
        shared = any(all(f in source.fields and f in other.fields for f in key)
                     for key in keys for o, other in ent.sources.items() if o != system)
        if not stored and not shared:
            warnings.append(f"entities.{entity}.sources.{system}: can never link to another system: it shares no "
                            f"match key or blocking fields with any other source and has no external_ids")
    return lines, warnings
