"""Golden records: strategies on hand-written staging tables with exact expected rows, lineage history,
conflicts, disagreements, the lineage command (a DSAR answer), erasure, idempotency and the config rules."""
from __future__ import annotations

import json
from datetime import datetime

import duckdb
import pytest

from reconcile import runner
from reconcile.cli import main
from reconcile.config import load_config
from reconcile.errors import ConfigError, ReconcileError
from reconcile.stages import golden
from reconcile.warehouse import open_work, publish

CONFIG = """\
version: 1
warehouse: warehouse/reconcile.duckdb
systems:
  crm: {url: "sqlite:///systems/crm.db", creates_identity: true}
  marketing: {url: "sqlite:///systems/marketing.db"}
  erp: {url: "sqlite:///systems/erp.db"}
entities:
  contact:
    sources:
      crm:
        table: contact
        key: id
        modified_at: modified
        fields:
          email: {column: email, transform: email}
          first_name: first_name
          last_name: last_name
          phone: phone
          company: company
          email_opt_out: {column: opt_out, transform: {map: {"0": false, "1": true}}}
      marketing:
        table: contacts
        key: vid
        modified_at: updated
        fields:
          email: {column: email, transform: email}
          first_name: first_name
          last_name: last_name
          phone: phone
          company: company
          email_opt_out: {column: opt_out, transform: {map: {"0": false, "1": true}}}
      erp:
        table: customer
        key: customer_number
        modified_at: modified
        fields:
          email: {column: email, transform: email}
          last_name: last_name
          phone: phone
          company: company
    fields:
      email:      {owner: crm}
      first_name: {owner: crm, fallback: [marketing]}
      last_name:  {owner: crm, fallback: [erp, marketing]}
      phone:      {owner: marketing, strategy: most_recent}
      company:    {owner: crm, strategy: first_non_null, priority: [erp, crm]}
      email_opt_out: {owner: marketing, type: boolean, strategy: most_restrictive, restrictive_values: [true]}
"""

FIELDS = {"crm": ["email", "first_name", "last_name", "phone", "company", "email_opt_out"],
          "marketing": ["email", "first_name", "last_name", "phone", "company", "email_opt_out"],
          "erp": ["email", "last_name", "phone", "company"]}
GOLDEN_COLUMNS = "xid, email, first_name, last_name, phone, company, email_opt_out"
T1, T2, T3 = datetime(2026, 3, 1, 2), datetime(2026, 3, 2, 2), datetime(2026, 3, 3, 2)


def d(day: int, hour: int = 0) -> datetime:
    return datetime(2026, 1, day, hour)


@pytest.fixture
def cfg(write_config):
    return load_config(write_config(CONFIG))


def stage(cfg, records: dict[str, list[dict]]) -> None:
    """Replace the staging tables with hand-written records: {system: [{key, at, field: value, ...}]}."""
    with open_work(cfg) as con:
        for system, fields in FIELDS.items():
            cols = ", ".join(f"{f} {'BOOLEAN' if f == 'email_opt_out' else 'VARCHAR'}" for f in fields)
            con.execute(f"CREATE OR REPLACE TABLE staging.{system}__contact "
                        f"(_record_key VARCHAR, _source_modified_at TIMESTAMP, {cols})")
            for r in records.get(system, []):
                con.execute(f"INSERT INTO staging.{system}__contact VALUES ({', '.join('?' * (len(fields) + 2))})",
                            [r["key"], r.get("at")] + [r.get(f) for f in fields])


def link(cfg, *links: tuple[str, str, str], status: str = "active") -> None:
    """identity.xref rows (xid, system, record_key), with their xids."""
    with open_work(cfg) as con:
        for xid, system, key in links:
            con.execute("INSERT OR IGNORE INTO identity.xids VALUES (?, 'contact', ?, NULL, 'r0', ?, ?)",
                        [xid, status, T1, f"{system}:{key}"])
            con.execute("INSERT OR REPLACE INTO identity.xref (xid, entity, system, record_key, rule, confidence, run_id, "
                        "linked_at) VALUES (?, 'contact', ?, ?, 'test', 1.0, 'r0', ?)",
                        [xid, system, key, T1])


def build(cfg, run_id: str, run_at: datetime) -> dict:
    with open_work(cfg) as con:
        return golden.build(con, cfg, "contact", run_id, run_at)


def rows(cfg, sql: str, params=()) -> list[tuple]:
    with open_work(cfg, read_only=True) as con:
        return con.execute(sql, list(params)).fetchall()


def current(cfg, field: str) -> list[tuple]:
    return rows(cfg, """SELECT xid, value, source_system, source_record_key, rule FROM golden.contact_lineage
                        WHERE field = ? AND valid_to IS NULL ORDER BY xid""", [field])


# ----------------------------------------------------------------------------------------------------------
# Strategies
# ----------------------------------------------------------------------------------------------------------

def test_owner_wins_and_a_null_owner_falls_back_in_order(cfg):
    stage(cfg, {
        "crm": [{"key": "c1", "at": d(1), "email": "ann@crm.example", "first_name": "Ann", "last_name": None},
                {"key": "c2", "at": d(1), "email": None, "first_name": None, "last_name": None}],
        "marketing": [{"key": "m1", "at": d(9), "email": "ann@mkt.example", "first_name": "Annie", "last_name": "Berg-M"},
                      {"key": "m2", "at": d(9), "email": "bo@mkt.example", "first_name": "Bo", "last_name": "Lind-M"}],
        "erp": [{"key": "e1", "at": d(9), "last_name": "Berg-E"}],
    })
    link(cfg, ("X1", "crm", "c1"), ("X1", "marketing", "m1"), ("X1", "erp", "e1"),
         ("X2", "crm", "c2"), ("X2", "marketing", "m2"))
    summary = build(cfg, "r1", T1)

    assert rows(cfg, "SELECT xid, email, first_name, last_name FROM golden.contact ORDER BY xid") == [
        # owner crm beats a newer marketing value; last_name: crm null -> erp before marketing (fallback order)
        ("X1", "ann@crm.example", "Ann", "Berg-E"),
        # no fallback for email: marketing's value is never used; first_name/last_name fall back to marketing
        ("X2", None, "Bo", "Lind-M"),
    ]
    assert current(cfg, "first_name") == [("X1", "Ann", "crm", "c1", "owner"), ("X2", "Bo", "marketing", "m2", "fallback")]
    assert current(cfg, "last_name") == [("X1", "Berg-E", "erp", "e1", "fallback"), ("X2", "Lind-M", "marketing", "m2", "fallback")]
    assert current(cfg, "email") == [("X1", "ann@crm.example", "crm", "c1", "owner"), ("X2", None, None, None, "none")]
    assert (summary["records"], summary["changed"], summary["conflicts"]) == (2, 2, 0)


def test_blanks_never_overwrite_values(cfg):
    stage(cfg, {
        "crm": [{"key": "c1", "at": d(1), "first_name": "   ", "last_name": ""},
                # two owner records on X2: the newer one is blank, so the older value wins
                {"key": "c2a", "at": d(5), "first_name": ""}, {"key": "c2b", "at": d(1), "first_name": "Cy"}],
        "marketing": [{"key": "m1", "at": d(1), "first_name": "Dee", "last_name": " "}],
        "erp": [{"key": "e1", "at": d(1), "last_name": ""}],
    })
    link(cfg, ("X1", "crm", "c1"), ("X1", "marketing", "m1"), ("X1", "erp", "e1"),
         ("X2", "crm", "c2a"), ("X2", "crm", "c2b"))
    build(cfg, "r1", T1)
    assert rows(cfg, "SELECT xid, first_name, last_name FROM golden.contact ORDER BY xid") == [
        ("X1", "Dee", None), ("X2", "Cy", None)]
    assert current(cfg, "first_name") == [("X1", "Dee", "marketing", "m1", "fallback"), ("X2", "Cy", "crm", "c2b", "owner")]
    assert current(cfg, "last_name") == [("X1", None, None, None, "none"), ("X2", None, None, None, "none")]


def test_most_recent_takes_the_newest_value_from_any_system(cfg):
    stage(cfg, {
        "crm": [{"key": "c1", "at": d(5), "phone": "+111"}, {"key": "c2", "at": d(9), "phone": None},
                {"key": "c3", "at": d(4), "phone": "+311"}],
        "marketing": [{"key": "m1", "at": d(3), "phone": "+222"}, {"key": "m2", "at": d(2), "phone": "+212"},
                      {"key": "m3", "at": d(4), "phone": "+322"}],
        "erp": [{"key": "e1", "at": d(4), "phone": "+333"}, {"key": "e2", "at": d(1), "phone": "+213"}],
    })
    link(cfg, ("X1", "crm", "c1"), ("X1", "marketing", "m1"), ("X1", "erp", "e1"),
         ("X2", "crm", "c2"), ("X2", "marketing", "m2"), ("X2", "erp", "e2"),
         ("X3", "crm", "c3"), ("X3", "marketing", "m3"))
    build(cfg, "r1", T1)
    assert rows(cfg, """SELECT xid, value, source_system, source_record_key, source_modified_at, rule
                        FROM golden.contact_lineage WHERE field = 'phone' ORDER BY xid""") == [
        ("X1", "+111", "crm", "c1", d(5), "most_recent"),
        ("X2", "+212", "marketing", "m2", d(2), "most_recent"),   # the newest record (crm, day 9) has no phone
        ("X3", "+322", "marketing", "m3", d(4), "most_recent"),   # same time: the owner first
    ]


def test_first_non_null_follows_priority(cfg):
    stage(cfg, {
        "crm": [{"key": "c1", "at": d(1), "company": "Acme CRM"}, {"key": "c2", "at": d(1), "company": "Bolt CRM"}],
        "marketing": [{"key": "m1", "at": d(9), "company": "Acme MKT"}, {"key": "m3", "at": d(9), "company": "Cog MKT"}],
        "erp": [{"key": "e1", "at": d(1), "company": "Acme Ltd"}, {"key": "e2", "at": d(1), "company": None}],
    })
    link(cfg, ("X1", "crm", "c1"), ("X1", "marketing", "m1"), ("X1", "erp", "e1"),
         ("X2", "crm", "c2"), ("X2", "erp", "e2"), ("X3", "marketing", "m3"))
    build(cfg, "r1", T1)
    # priority [erp, crm]: erp first, crm second; marketing is not a candidate at all
    assert current(cfg, "company") == [("X1", "Acme Ltd", "erp", "e1", "first_non_null"),
                                       ("X2", "Bolt CRM", "crm", "c2", "first_non_null"),
                                       ("X3", None, None, None, "none")]


def test_most_restrictive_opt_out_anywhere_wins_with_its_source_and_time(cfg):
    stage(cfg, {
        "crm": [{"key": "c1", "at": d(7), "email_opt_out": True}, {"key": "c2", "at": d(7), "email_opt_out": False},
                {"key": "c3", "at": d(8), "email_opt_out": False}, {"key": "c4", "at": d(8), "email_opt_out": True}],
        "marketing": [{"key": "m1", "at": d(9), "email_opt_out": False}, {"key": "m2", "at": d(3), "email_opt_out": False},
                      {"key": "m3", "at": d(2), "email_opt_out": None}, {"key": "m4", "at": d(2), "email_opt_out": True}],
    })
    link(cfg, *[(f"X{i}", s, f"{s[0]}{i}") for i in range(1, 5) for s in ("crm", "marketing")])
    build(cfg, "r1", T1)
    assert rows(cfg, "SELECT xid, email_opt_out FROM golden.contact ORDER BY xid") == [
        ("X1", True), ("X2", False), ("X3", False), ("X4", True)]
    assert rows(cfg, """SELECT xid, value, source_system, source_record_key, source_modified_at, rule
                        FROM golden.contact_lineage WHERE field = 'email_opt_out' ORDER BY xid""") == [
        ("X1", "true", "crm", "c1", d(7), "most_restrictive"),         # opt-out in crm beats the owner's newer opt-in
        ("X2", "false", "marketing", "m2", d(3), "most_restrictive"),  # both opted in: the owner first
        ("X3", "false", "crm", "c3", d(8), "most_restrictive"),        # the owner has no value
        ("X4", "true", "marketing", "m4", d(2), "most_restrictive"),   # both opted out: the owner first
    ]


def test_owner_tie_break_on_a_merged_xid_records_the_conflict(cfg):
    stage(cfg, {"crm": [
        {"key": "c4a", "at": d(2), "email": "dee@old.example", "first_name": "Dee"},
        {"key": "c4b", "at": d(3), "email": "dee@new.example", "first_name": "Deirdre"},
        {"key": "c5b", "at": d(2), "email": "eve@b.example", "first_name": "Eve"},
        {"key": "c5a", "at": d(2), "email": "eve@a.example", "first_name": "Eve"},
    ]})
    link(cfg, ("X4", "crm", "c4a"), ("X4", "crm", "c4b"), ("X5", "crm", "c5a"), ("X5", "crm", "c5b"))
    summary = build(cfg, "r1", T1)
    assert rows(cfg, "SELECT xid, email, first_name FROM golden.contact ORDER BY xid") == [
        ("X4", "dee@new.example", "Deirdre"),  # most recently modified
        ("X5", "eve@a.example", "Eve"),        # same time: lowest key
    ]
    got = rows(cfg, """SELECT xid, field, system, chosen_record_key, chosen_value, candidates
                       FROM golden.contact_conflicts WHERE run_id = 'r1' ORDER BY xid, field""")
    assert [r[:5] for r in got] == [
        ("X4", "email", "crm", "c4b", "dee@new.example"),
        ("X4", "first_name", "crm", "c4b", "Deirdre"),
        ("X5", "email", "crm", "c5a", "eve@a.example"),   # first_name agrees on X5: no conflict
    ]
    assert [(c["record_key"], c["value"]) for c in json.loads(got[0][5])] == [
        ("c4b", "dee@new.example"), ("c4a", "dee@old.example")]
    assert summary["conflicts"] == 3


def test_disagreement_report_counts_linked_records_against_the_golden_value(cfg):
    stage(cfg, {
        "crm": [{"key": "c1", "at": d(1), "first_name": "Ann"}, {"key": "c2", "at": d(1), "first_name": "Bo"}],
        "marketing": [{"key": "m1", "at": d(1), "first_name": "Annie"}, {"key": "m2", "at": d(1), "first_name": None},
                      {"key": "m3", "at": d(1), "first_name": None}, {"key": "m4", "at": d(1), "first_name": "Di"}],
    })
    link(cfg, ("X1", "crm", "c1"), ("X1", "marketing", "m1"), ("X2", "crm", "c2"), ("X2", "marketing", "m2"),
         ("X3", "crm", "c3"), ("X3", "marketing", "m3"), ("X4", "crm", "c4"), ("X4", "marketing", "m4"))
    # c3 and c4 are not staged: X3 has no first_name anywhere, X4 takes marketing's (fallback): neither disagrees
    summary = build(cfg, "r1", T1)
    assert rows(cfg, """SELECT field, system, records, disagreeing, missing FROM audit.disagreements
                        WHERE run_id = 'r1' AND field = 'first_name' ORDER BY system""") == [
        # m1 holds another value (write-back would overwrite it); m2 holds none where golden has 'Bo'
        ("first_name", "crm", 2, 0, 0), ("first_name", "marketing", 4, 1, 1)]
    assert summary["disagreements"] == {"email": 0, "first_name": 1, "last_name": 0, "phone": 0, "company": 0,
                                        "email_opt_out": 0}


# ----------------------------------------------------------------------------------------------------------
# Lineage and history
# ----------------------------------------------------------------------------------------------------------

def test_every_golden_value_has_exactly_one_current_lineage_row(cfg):
    stage(cfg, {
        "crm": [{"key": "c1", "at": d(1), "email": "a@x.example", "first_name": "Ann", "email_opt_out": False},
                {"key": "c2", "at": d(2), "first_name": "Bo", "phone": "+1"}],
        "marketing": [{"key": "m1", "at": d(3), "phone": "+2", "email_opt_out": True, "last_name": "Berg"}],
        "erp": [{"key": "e2", "at": d(4), "company": "Bolt"}],
    })
    link(cfg, ("X1", "crm", "c1"), ("X1", "marketing", "m1"), ("X2", "crm", "c2"), ("X2", "erp", "e2"))
    build(cfg, "r1", T1)
    stage(cfg, {"crm": [{"key": "c1", "at": d(5), "email": "a@x.example", "first_name": "Anna"},
                        {"key": "c2", "at": d(2), "first_name": "Bo", "phone": "+1"}],
                "marketing": [{"key": "m1", "at": d(3), "phone": "+2", "email_opt_out": True, "last_name": "Berg"}],
                "erp": [{"key": "e2", "at": d(4), "company": "Bolt"}]})
    build(cfg, "r2", T2)
    # golden unpivoted to text, against the current lineage rows: same pairs, same values, one row each
    check = rows(cfg, """
        WITH g AS (FROM (SELECT xid, email, first_name, last_name, phone, company,
                                CAST(email_opt_out AS VARCHAR) email_opt_out FROM golden.contact)
                   UNPIVOT INCLUDE NULLS (value FOR field IN (email, first_name, last_name, phone, company,
                                                              email_opt_out))),
             l AS (SELECT xid, field, value, count(*) OVER (PARTITION BY xid, field) AS n
                   FROM golden.contact_lineage WHERE valid_to IS NULL)
        SELECT (SELECT count(*) FROM g), (SELECT count(*) FROM l),
               (SELECT count(*) FROM g JOIN l ON l.xid = g.xid AND l.field = g.field
                 WHERE l.n = 1 AND l.value IS NOT DISTINCT FROM g.value)""")
    assert check == [(12, 12, 12)]


POINT_IN_TIME = """
    SELECT field, value, source_system, source_record_key, rule, run_id
    FROM golden.contact_lineage
    WHERE xid = ? AND valid_from <= ? AND (valid_to IS NULL OR valid_to > ?)
    ORDER BY field"""


def test_history_across_three_runs_answers_what_we_believed_on_a_past_date(cfg):
    mkt = [{"key": "m1", "at": d(1), "email": "ann@mkt.example", "first_name": "Anna"}]
    stage(cfg, {"crm": [{"key": "c1", "at": d(1), "email": "ann@crm.example", "first_name": "Ann"}], "marketing": mkt})
    link(cfg, ("X1", "crm", "c1"), ("X1", "marketing", "m1"))
    s1 = build(cfg, "r1", T1)
    stage(cfg, {"crm": [{"key": "c1", "at": d(10), "email": "ann@crm.example", "first_name": "Anna"}], "marketing": mkt})
    s2 = build(cfg, "r2", T2)
    # the owner clears the name: same value, now from marketing (a new source is a new history row)
    stage(cfg, {"crm": [{"key": "c1", "at": d(20), "email": "ann@crm.example", "first_name": None}], "marketing": mkt})
    s3 = build(cfg, "r3", T3)
    assert (s1["changed"], s2["changed"], s3["changed"]) == (1, 1, 0)

    def believed(on: datetime) -> list[tuple]:
        return [r for r in rows(cfg, POINT_IN_TIME, ["X1", on, on]) if r[0] in ("email", "first_name")]

    assert believed(datetime(2026, 2, 1)) == []
    assert believed(datetime(2026, 3, 1, 12)) == [("email", "ann@crm.example", "crm", "c1", "owner", "r1"),
                                                  ("first_name", "Ann", "crm", "c1", "owner", "r1")]
    assert believed(T2) == [("email", "ann@crm.example", "crm", "c1", "owner", "r1"),
                            ("first_name", "Anna", "crm", "c1", "owner", "r2")]
    assert believed(datetime(2026, 4, 1)) == [("email", "ann@crm.example", "crm", "c1", "owner", "r1"),
                                              ("first_name", "Anna", "marketing", "m1", "fallback", "r3")]
    assert rows(cfg, """SELECT value, valid_from, valid_to FROM golden.contact_lineage
                        WHERE field = 'first_name' ORDER BY valid_from""") == [
        ("Ann", T1, T2), ("Anna", T2, T3), ("Anna", T3, None)]
    # the row keeps the run that last changed a value
    assert rows(cfg, "SELECT _run_id, _updated_at FROM golden.contact") == [("r2", T2)]


def test_an_xid_that_goes_away_closes_its_history(cfg):
    stage(cfg, {"crm": [{"key": "c1", "at": d(1), "first_name": "Ann"}, {"key": "c2", "at": d(1), "first_name": "Bo"},
                        {"key": "c3", "at": d(1), "first_name": "Cy"}]})
    link(cfg, ("X1", "crm", "c1"), ("X2", "crm", "c2"), ("X3", "crm", "c3"))
    build(cfg, "r1", T1)
    with open_work(cfg) as con:  # a steward merged X2 into X1; X3 was retired (its link left behind)
        con.execute("UPDATE identity.xref SET xid = 'X1' WHERE xid = 'X2'")
        con.execute("UPDATE identity.xids SET status = 'merged', merged_into = 'X1' WHERE xid = 'X2'")
        con.execute("UPDATE identity.xids SET status = 'retired' WHERE xid = 'X3'")
    s2 = build(cfg, "r2", T2)
    assert rows(cfg, "SELECT xid, first_name FROM golden.contact") == [("X1", "Ann")]
    assert rows(cfg, "SELECT count(*) FROM golden.contact_lineage WHERE xid IN ('X2', 'X3') AND valid_to IS NULL") == [(0,)]
    assert rows(cfg, "SELECT DISTINCT valid_to FROM golden.contact_lineage WHERE xid IN ('X2', 'X3')") == [(T2,)]
    assert s2["removed"] == 2 and s2["conflicts"] == 1


def test_rebuilding_for_the_same_run_id_leaves_the_same_state(cfg):
    stage(cfg, {"crm": [{"key": "c1", "at": d(1), "first_name": "Ann"}, {"key": "c1b", "at": d(2), "first_name": "Anne"}]})
    link(cfg, ("X1", "crm", "c1"), ("X1", "crm", "c1b"))
    snapshot = """SELECT (SELECT list(g ORDER BY xid) FROM golden.contact g)::VARCHAR,
                         (SELECT count(*) FROM golden.contact_lineage), (SELECT count(*) FROM golden.contact_conflicts),
                         (SELECT count(*) FROM audit.disagreements), (SELECT count(*) FROM audit.stage_runs)"""
    first = build(cfg, "r1", T1)
    before = rows(cfg, snapshot)
    stage(cfg, {"crm": [{"key": "c1", "at": d(1), "first_name": "Changed"}]})  # a retried task sees later data
    assert build(cfg, "r1", T1) == first
    assert rows(cfg, snapshot) == before
    with pytest.raises(ReconcileError, match="built in run order"):
        build(cfg, "r0", datetime(2026, 2, 1))


def test_empty_identity_gives_an_empty_golden_table_with_every_column(cfg):
    stage(cfg, {"crm": [{"key": "c1", "at": d(1), "first_name": "Ann"}]})
    summary = build(cfg, "r1", T1)
    assert summary == {"records": 0, "changed": 0, "removed": 0, "conflicts": 0, "erased": 0,
                       "disagreements": {f: 0 for f in ("email", "first_name", "last_name", "phone", "company",
                                                        "email_opt_out")},
                       "mode": "full", "reason": "first build", "rebuilt": 0,
                       "config_hash": golden.config_hash(cfg.entities["contact"])}
    assert rows(cfg, "SELECT column_name, data_type FROM information_schema.columns "
                     "WHERE table_schema = 'golden' AND table_name = 'contact' ORDER BY ordinal_position") == [
        ("xid", "VARCHAR"), ("email", "VARCHAR"), ("first_name", "VARCHAR"), ("last_name", "VARCHAR"),
        ("phone", "VARCHAR"), ("company", "VARCHAR"), ("email_opt_out", "BOOLEAN"), ("_run_id", "VARCHAR"),
        ("_updated_at", "TIMESTAMP")]


# ----------------------------------------------------------------------------------------------------------
# Erasure
# ----------------------------------------------------------------------------------------------------------

PEOPLE = {
    "crm": [{"key": "c1", "at": d(1), "email": "ann@crm.example", "first_name": "Ann", "email_opt_out": False},
            {"key": "c2", "at": d(1), "email": "bo@crm.example", "first_name": "Bo"}],
    "marketing": [{"key": "m1", "at": d(4), "email": "ann.b@mkt.example", "first_name": "Annie", "email_opt_out": True},
                  {"key": "m9", "at": d(4), "email": "ann@crm.example", "first_name": "Ann"}],
}


def test_an_erased_person_does_not_come_back_on_later_runs(cfg):
    stage(cfg, PEOPLE)
    link(cfg, ("X1", "crm", "c1"), ("X1", "marketing", "m1"), ("X2", "crm", "c2"))
    build(cfg, "r1", T1)
    with open_work(cfg) as con:
        out = golden.erase(con, "contact", "X1", request_id="e1", requested_at=datetime(2026, 3, 1, 9),
                           requested_by="dpo", reason="GDPR art. 17", matched_by="xid:X1")
    assert out["records"] == ["crm:c1", "marketing:m1"] and not out["already"]
    assert rows(cfg, "SELECT xid FROM golden.contact") == [("X2",)]  # suppressed at once

    link(cfg, ("X1", "marketing", "m9"))  # a record identity links to the person after the request
    s2 = build(cfg, "r2", T2)  # the records are still in staging
    assert rows(cfg, "SELECT xid FROM golden.contact") == [("X2",)]
    assert rows(cfg, "SELECT count(*) FROM golden.contact_lineage WHERE xid = 'X1' AND "
                     "(valid_to IS NULL OR run_id = 'r2')") == [(0,)]
    assert (s2["records"], s2["erased"]) == (1, 1)

    # identity resolution re-mints the erased records onto a new xid: they still supply nothing
    link(cfg, ("X9", "crm", "c1"), ("X9", "marketing", "m1"))
    build(cfg, "r3", T3)
    assert rows(cfg, "SELECT xid FROM golden.contact") == [("X2",)]
    with open_work(cfg, read_only=True) as con:
        assert con.execute(f"SELECT * FROM ({golden.erased_keys_sql('contact')}) ORDER BY ALL").fetchall() == [
            # the snapshot names c1 and m1 whatever xref says now; m9 is on the erased xid
            ("crm", "c1", "X1"), ("marketing", "m1", "X1"), ("marketing", "m9", "X1")]
    with open_work(cfg) as con:
        again = golden.erase(con, "contact", "X1", request_id="e2", requested_at=T3, requested_by="x", reason="y",
                             matched_by="xid:X1")
    assert again["already"] and again["request_id"] == "e1"


# ----------------------------------------------------------------------------------------------------------
# The lineage and erase commands
# ----------------------------------------------------------------------------------------------------------

@pytest.fixture
def published_people(cfg):
    stage(cfg, PEOPLE)
    link(cfg, ("X1", "crm", "c1"), ("X1", "marketing", "m1"), ("X2", "crm", "c2"))
    build(cfg, "r1", T1)
    stage(cfg, {**PEOPLE, "crm": [{**PEOPLE["crm"][0], "at": d(6), "first_name": "Anna"}, PEOPLE["crm"][1]]})
    build(cfg, "r2", T2)
    publish(cfg)
    return cfg


def lineage(cfg, capsys, *args) -> tuple[int, str, str]:
    code = main(["lineage", "--config", str(cfg.path), *args])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("email", ["ann@crm.example", " Ann.B@MKT.example "])
def test_lineage_finds_a_person_by_any_of_their_emails(published_people, capsys, email):
    code, out, _ = lineage(published_people, capsys, "--email", email, "--json")
    assert code == 0
    report = json.loads(out)
    # m9 carries Ann's crm email but is linked to no one: it is named, not claimed
    assert [p["xid"] for p in report["persons"]] == ["X1"]
    person = report["persons"][0]
    assert [(r["system"], r["record_key"], r["values"]["first_name"]) for r in person["records"]] == [
        ("crm", "c1", "Anna"), ("marketing", "m1", "Annie")]
    first = person["golden"]["first_name"]
    assert (first["value"], first["source_system"], first["source_record_key"], first["rule"]) == (
        "Anna", "crm", "c1", "owner")
    assert [(h["value"], h["run_id"], h["valid_to"]) for h in first["history"]] == [
        ("Anna", "r2", None), ("Ann", "r1", str(T2))]
    assert person["consent"] == {"email_opt_out": {
        "value": True, "source_system": "marketing", "source_record_key": "m1",
        "source_modified_at": str(d(4)), "since": str(T1)}}
    assert person["changes"] in (None, [])  # None until audit.changes (issue 6) exists; nothing written yet
    assert report["unlinked"] == ([{"entity": "contact", "record": "marketing:m9"}] if "crm" in email else [])


def test_changes_written_for_the_person_are_listed_once_audit_changes_exists():
    con = duckdb.connect()
    con.execute("CREATE SCHEMA audit")
    assert golden._changes(con, "contact", "X1") is None
    con.execute("CREATE TABLE audit.changes (entity VARCHAR, xid VARCHAR, target VARCHAR, operation VARCHAR)")
    con.execute("INSERT INTO audit.changes VALUES ('contact', 'X1', 'marketing', 'update'), "
                "('contact', 'X2', 'marketing', 'update'), ('account', 'X1', 'erp', 'create'), "
                "('contact', 'X1', 'erp', 'erase')")
    assert golden._changes(con, "contact", "X1") == [
        {"entity": "contact", "xid": "X1", "target": "erp", "operation": "erase"},
        {"entity": "contact", "xid": "X1", "target": "marketing", "operation": "update"}]


def test_lineage_text_output_names_records_sources_history_and_consent(published_people, capsys):
    code, out, _ = lineage(published_people, capsys, "--record", "marketing:m1")
    assert code == 0
    assert "contact X1 (active)" in out
    assert "crm:c1" in out and "marketing:m1" in out
    assert "first_name" in out and "Anna" in out and "was 'Ann'" in out
    assert "email_opt_out    true  from marketing:m1, record modified 2026-01-04 00:00:00" in out


def test_lineage_bad_arguments_exit_2_and_nobody_exits_1(published_people, capsys):
    assert lineage(published_people, capsys, "--record", "no-colon")[0] == 2
    code, _, err = lineage(published_people, capsys, "--record", "billing:k1")
    assert code == 2 and "billing" in err
    with pytest.raises(SystemExit) as exc:
        lineage(published_people, capsys)
    assert exc.value.code == 2
    code, _, err = lineage(published_people, capsys, "--email", "nobody@example.com")
    assert code == 1 and "nobody@example.com" in err


def test_erase_command_suppresses_the_person_in_the_published_warehouse(published_people, capsys):
    cfg = published_people
    code = main(["erase", "--config", str(cfg.path), "--email", "ANN.B@mkt.example", "--reason", "DSAR 42",
                 "--by", "dpo"])
    out = capsys.readouterr().out
    assert code == 0 and "X1" in out
    code, out, _ = lineage(cfg, capsys, "--xid", "X1", "--json")
    person = json.loads(out)["persons"][0]
    assert person["in_golden"] is False
    assert (person["erasure"]["reason"], person["erasure"]["requested_by"]) == ("DSAR 42", "dpo")
    assert person["golden"]["first_name"]["value"] is None
    assert main(["erase", "--config", str(cfg.path), "--xid", "X1", "--reason", "again"]) == 0
    assert "already" in capsys.readouterr().out
    assert main(["erase", "--config", str(cfg.path), "--email", "nobody@example.com", "--reason", "r"]) == 1


# ----------------------------------------------------------------------------------------------------------
# Runner and config rules
# ----------------------------------------------------------------------------------------------------------

def test_run_summary_reports_golden(project):
    cfg = load_config(project / "reconcile.yaml")
    summary = runner.run_entity(cfg, "contact", run_id="r1", run_at=T1)
    with open_work(cfg, read_only=True) as con:
        n = con.execute("SELECT count(*) FROM golden.contact").fetchone()[0]
    assert summary["golden"]["records"] == n
    assert set(summary["golden"]["disagreements"]) == {"email", "first_name", "phone", "lifecycle", "active"}


@pytest.mark.parametrize("old,new,path,fragment", [
    ("phone:      {owner: marketing, strategy: most_recent}",
     "phone:      {owner: marketing, priority: [crm]}",
     "entities.contact.fields.phone.priority", "strategy owner uses 'fallback'"),
    ("priority: [erp, crm]}", "priority: [erp, marketing, erp]}",
     "entities.contact.fields.company.priority", "lists a system twice"),
    ("first_name: {owner: crm, fallback: [marketing]}",
     "first_name: {owner: crm, strategy: first_non_null, priority: [erp]}",
     "entities.contact.fields.first_name.priority[0]", "system 'erp' does not map field 'first_name'"),
    ("restrictive_values: [true]}", "restrictive_values: []}",
     "entities.contact.fields.email_opt_out.restrictive_values", "needs restrictive_values"),
    ("restrictive_values: [true]}", "restrictive_values: [yes please]}",
     "entities.contact.fields.email_opt_out.restrictive_values[0]", "not a boolean value"),
    ("email:      {owner: crm}", "email:      {owner: crm, restrictive_values: [x]}",
     "entities.contact.fields.email.restrictive_values", "most_restrictive only"),
    ("        modified_at: updated\n", "",
     "entities.contact.fields.phone.strategy", "source 'marketing' has no modified_at"),
    ("strategy: most_recent}", "strategy: newest}", "entities.contact.fields.phone.strategy", "most_recent"),
])
def test_strategy_config_errors_name_the_key_path(write_config, old, new, path, fragment):
    assert old in CONFIG
    with pytest.raises(ConfigError) as exc:
        load_config(write_config(CONFIG.replace(old, new)))
    assert any(p.path == path and fragment in p.message for p in exc.value.problems), exc.value.problems
