"""Identity resolution on small hand-written systems: exact expectations for the field reports' situations."""
from __future__ import annotations

import json
from datetime import datetime

import duckdb
import pytest

from reconcile import review, runner
from reconcile.config import load_config
from reconcile.stages import identity

from ..conftest import sqlite_exec, write_sqlite

CONFIG = """\
version: 1
warehouse: warehouse/reconcile.duckdb
systems:
  crm: {url: "sqlite:///systems/crm.db", creates_identity: true, xid_column: reconcile_xid}
  marketing: {url: "sqlite:///systems/marketing.db", unique: [email]}
  erp: {url: "sqlite:///systems/erp.db"}
entities:
  contact:
    sources:
      crm:
        table: contact
        key: contactid
        modified_at: modifiedon
        fields:
          email: {column: emailaddress1, transform: email}
          first_name: {column: firstname, transform: trim}
          last_name: {column: lastname, transform: trim}
          phone: {column: telephone1, transform: phone}
          company: companyname
      marketing:
        table: contacts
        key: vid
        modified_at: updated_at
        external_ids: {crm: crm_guid}
        fields:
          email: {column: email, transform: email}
          first_name: firstname
          last_name: lastname
      erp:
        table: customer
        key: customer_number
        modified_at: last_modified
        fields:
          email: {column: email, transform: email}
          first_name: first_name
          last_name: last_name
          phone: {column: phone, transform: phone}
          company: company_name
    fields:
      email: {owner: crm}
      first_name: {owner: crm, send_to: [marketing]}
      last_name: {owner: crm, send_to: [marketing]}
      phone: {owner: crm}
      company: {owner: crm}
    match:
      - {name: email, fields: [email]}
      - name: name_phone
        type: probabilistic
        fields: [first_name, last_name, company, phone]
        exact: [phone]
        block_on: [phone, last_name]
        review_threshold: 0.85
"""

CRM = [  # contactid, email, first, last, phone, company, modifiedon, reconcile_xid
    ("A", "info@shared.example", "Maria", "Schmidt", "4155550101", "Brightwater", "2026-01-01 10:00:00", None),
    ("B", "Info@Shared.example ", "Tom", "Becker", "4155550102", "Brightwater", "2026-01-01 11:00:00", None),
    ("S1", "siobhan@example.org", "Siobhan", "OBrien", "6175550148", "Harbor", "2026-01-02 10:00:00", None),
    ("S2", "siobhan@example.org", "Siobhan", "OBrien", "6175550184", "Harbor", "2026-01-02 12:00:00", None),
    ("D", "Dana.Whitfield@Lumen.example ", "Dana", "Whitfield", "4155550103", "Lumen", "2026-01-03 10:00:00", None),
    ("K", "kasia@nowak.example", "Katarzyna", "Nowakowska", "4155550111", "Nowak GmbH", "2026-01-04 10:00:00", None),
    # the same Katarzyna entered again under another email, phone typed differently: a duplicate by score
    ("K2", "k.nowakowska@nowak.example", "Katarzyna", "Nowakowska", "(415) 555-0111", "Nowak GmbH",
     "2026-01-06 10:00:00", None),
]
MARKETING = [  # vid, email, first, last, crm_guid, updated_at
    (1, "info@shared.example", "Maria", "Schmidt", None, "2026-01-01T09:00:00Z"),
    (2, "dana.whitfield@lumen.example", "Dana", "Whitfield", None, "2026-01-03T09:00:00Z"),
    (3, "siobhan@example.org", "Siobhan", "OBrien", None, "2026-01-02T09:00:00Z"),
    (4, "pat@partner.example", "Pat", "Lee", "K", "2026-01-04T09:00:00Z"),
]
ERP = [("E1", None, "Katarzyna", "Nowakowsak", "(415) 555 0111", "Nowak GmbH", "2026-01-05T10:00:00")]


@pytest.fixture
def systems(tmp_path):
    write_sqlite(tmp_path / "systems" / "crm.db", """CREATE TABLE contact (contactid TEXT PRIMARY KEY, emailaddress1 TEXT,
        firstname TEXT, lastname TEXT, telephone1 TEXT, companyname TEXT, modifiedon TEXT, reconcile_xid TEXT)""",
                 "contact", CRM)
    write_sqlite(tmp_path / "systems" / "marketing.db", """CREATE TABLE contacts (vid INTEGER PRIMARY KEY,
        email TEXT UNIQUE, firstname TEXT, lastname TEXT, crm_guid TEXT, updated_at TEXT)""", "contacts", MARKETING)
    write_sqlite(tmp_path / "systems" / "erp.db", """CREATE TABLE customer (customer_number TEXT PRIMARY KEY, email TEXT,
        first_name TEXT, last_name TEXT, phone TEXT, company_name TEXT, last_modified TEXT)""", "customer", ERP)
    (tmp_path / "reconcile.yaml").write_text(CONFIG)
    return tmp_path


def night(cfg, n: int) -> dict:
    return runner.run_entity(cfg, "contact", run_id=f"r{n}", run_at=datetime(2026, 2, n, 2))


def xref(cfg) -> dict[tuple[str, str], str]:
    con = duckdb.connect(str(cfg.warehouse_path), read_only=True)
    try:
        return {(s, k): x for s, k, x in con.execute("SELECT system, record_key, xid FROM identity.xref").fetchall()}
    finally:
        con.close()


def items(cfg, kind: str, status: str = "open") -> list[dict]:
    return [review.show_item(cfg, i["item_id"]) for i in review.list_items(cfg, kind=kind, status=status)]


def test_first_night_links_only_certain_matches(systems):
    cfg = load_config(systems / "reconcile.yaml")
    s = night(cfg, 1)
    links = xref(cfg)
    # every CRM record got its own xid: never two records of one system on one xid automatically
    assert len({links[("crm", k)] for k in ("A", "B", "S1", "S2", "D", "K", "K2")}) == 7
    # email case/whitespace variants across systems: linked
    assert links[("marketing", "2")] == links[("crm", "D")]
    # a stored ID (marketing holds the CRM GUID) links even though the emails differ
    assert links[("marketing", "4")] == links[("crm", "K")]
    # shared mailbox and twice-entered person: the marketing record is not linked to either
    assert ("marketing", "1") not in links and ("marketing", "3") not in links
    # ERP typo without email: not linked
    assert ("erp", "E1") not in links
    assert s["identity"]["by_rule"] == {"external_id:crm": 1, "match:email": 1, "minted": 7}
    assert (s["identity"]["new_xids"], s["identity"]["linked"]) == (7, 9)


def test_every_link_on_a_shared_xid_carries_the_models_evidence_stored_ids_included(systems):
    cfg = load_config(systems / "reconcile.yaml")
    night(cfg, 1)
    con = duckdb.connect(str(cfg.warehouse_path), read_only=True)
    try:
        rows = {(s, k): (rule, json.loads(ev) if ev else None) for s, k, rule, ev in con.execute(
            "SELECT system, record_key, rule, evidence FROM identity.xref").fetchall()}
    finally:
        con.close()
    # Pat Lee in marketing stores Katarzyna's CRM id: a link no scored pair explains (no shared blocking key,
    # nothing in common), so it is scored on its own: a low probability, and per field why
    rule, ev = rows[("marketing", "4")]
    assert rule == "external_id:crm" and ev["_with"] == "crm:K" and ev["_probability"] < 0.001
    assert ev["email"] == {"a": "pat@partner.example", "b": "kasia@nowak.example", "weight": -3.32}
    assert ev["first_name_last_name"] == {"a": "pat lee", "b": "katarzyna nowakowska", "weight": -5.62}
    # the CRM record it joined is explained by the same pair, seen from its side
    assert rows[("crm", "K")][1]["_with"] == "marketing:4"
    assert rows[("crm", "K")][1]["email"]["a"] == "kasia@nowak.example"
    # the email link has its evidence too; records alone on their xid have nothing to compare
    assert rows[("marketing", "2")][1]["_with"] == "crm:D" and rows[("marketing", "2")][1]["_probability"] > 0.999
    assert {k for k, (_, ev) in rows.items() if ev is None} == {("crm", k) for k in ("A", "B", "S1", "S2", "K2")}


def test_shared_mailbox_goes_to_review_with_both_candidates(systems):
    cfg = load_config(systems / "reconcile.yaml")
    night(cfg, 1)
    links = xref(cfg)
    cands = {(i["details"]["system"], i["details"]["record_key"]): i for i in items(cfg, "candidate")}
    mailbox = cands[("marketing", "1")]
    assert sorted(c["xid"] for c in mailbox["details"]["candidates"]) == sorted([links[("crm", "A")], links[("crm", "B")]])
    assert mailbox["details"]["rule"] == "email"


def test_twice_entered_person_is_a_duplicate_candidate_not_merged(systems):
    cfg = load_config(systems / "reconcile.yaml")
    night(cfg, 1)
    links = xref(cfg)
    dups = {tuple(r["record_key"] for r in i["details"]["records"]): i for i in items(cfg, "duplicate")}
    # same normalised email within CRM (exact rule), and a look-alike by score (probabilistic rule)
    assert set(dups) == {("A", "B"), ("S1", "S2"), ("K", "K2")}
    assert links[("crm", "S1")] != links[("crm", "S2")] and links[("crm", "K")] != links[("crm", "K2")]
    by_score = dups[("K", "K2")]["details"]
    assert by_score["rule"] == "model" and by_score["probability"] >= 0.999
    # the evidence says why: same name, company and phone, different email
    assert by_score["evidence"]["phone"]["weight"] > 0 > by_score["evidence"]["email"]["weight"]


def test_erp_typo_without_email_is_a_scored_candidate(systems):
    cfg = load_config(systems / "reconcile.yaml")
    night(cfg, 1)
    links = xref(cfg)
    cands = {(i["details"]["system"], i["details"]["record_key"]): i for i in items(cfg, "candidate")}
    erp = cands[("erp", "E1")]["details"]
    # both CRM Katarzynas (K and its duplicate K2) are candidates; K is shown with its evidence
    assert {c["record_key"] for c in erp["candidates"]} == {"K", "K2"}
    best = next(c for c in erp["candidates"] if c["record_key"] == "K")
    assert best["xid"] == links[("crm", "K")]
    # probable enough to link, but two identities compete: people decide
    assert best["probability"] >= 0.999 and erp["why"] == "several candidate identities: people decide"
    assert best["evidence"]["phone"]["weight"] > 10
    name = best["evidence"]["first_name_last_name"]
    assert (name["a"], name["b"]) == ("katarzyna nowakowsak", "katarzyna nowakowska") and name["weight"] > 0
    assert erp["would_change"]["differing_fields"] == ["first_name_last_name"]
    # records in review are not minted as orphans
    assert ("erp", "E1") not in links and items(cfg, "orphan") == []


def test_xids_are_stable_across_three_runs_with_edits_and_no_change_run_makes_no_links(systems):
    cfg = load_config(systems / "reconcile.yaml")
    night(cfg, 1)
    first = xref(cfg)
    crm = systems / "systems" / "crm.db"
    sqlite_exec(crm, "UPDATE contact SET emailaddress1 = 'dana@new.example', lastname = 'Whitfield-Ng', "
                     "modifiedon = '2026-01-20 10:00:00' WHERE contactid = 'D'")
    s2 = night(cfg, 2)
    sqlite_exec(crm, "INSERT INTO contact VALUES ('N', 'nia@example.com', 'Nia', 'Obi', NULL, NULL, '2026-01-21 10:00:00', NULL)")
    s3 = night(cfg, 3)
    third = xref(cfg)
    assert {k: v for k, v in third.items() if k in first} == first  # nobody's xid moved
    assert s2["identity"]["linked"] == 0 and s2["identity"]["new_xids"] == 0
    assert s3["identity"]["by_rule"] == {"minted": 1} and ("crm", "N") in third
    s4 = night(cfg, 4)  # no source change at all
    assert (s4["identity"]["linked"], s4["identity"]["new_xids"], s4["identity"]["by_rule"]) == (0, 0, {})


def test_split_and_merge_decisions_survive_the_next_two_runs(systems):
    cfg = load_config(systems / "reconcile.yaml")
    night(cfg, 1)
    before = xref(cfg)
    review.decide(cfg, "split", by="steward", reason="marketing 2 is Dana's assistant", record="marketing:2")
    dup = next(i for i in items(cfg, "duplicate") if [r["record_key"] for r in i["details"]["records"]] == ["S1", "S2"])
    review.decide(cfg, "merge", by="steward", reason="same person entered twice", item_id=dup["item_id"])
    s2 = night(cfg, 2)
    assert (s2["identity"]["split"], s2["identity"]["merged"]) == (1, 1)
    for n in (3, 4):
        s = night(cfg, n)
        links = xref(cfg)
        assert links[("marketing", "2")] not in (before[("crm", "D")],)
        assert links[("crm", "S1")] == links[("crm", "S2")] == before[("crm", "S1")]
        assert s["identity"]["linked"] == 0
    con = duckdb.connect(str(cfg.warehouse_path), read_only=True)
    assert con.execute("SELECT status, merged_into FROM identity.xids WHERE xid = ?",
                       [before[("crm", "S2")]]).fetchone() == ("merged", before[("crm", "S1")])
    history = con.execute("SELECT action, rule FROM identity.xref_history WHERE record_key IN ('2', 'S2') "
                          "AND run_id = 'r2' ORDER BY action, rule").fetchall()
    con.close()
    assert history == [("merge", "decision:merge"), ("split", "decision:split"),
                       ("unlink", "decision:merge"), ("unlink", "decision:split")]
    # the decided duplicate item is never reopened
    assert review.show_item(cfg, dup["item_id"])["status"] == "decided"


def test_link_and_distinct_decisions_win_over_rules(systems):
    cfg = load_config(systems / "reconcile.yaml")
    night(cfg, 1)
    links = xref(cfg)
    cands = {(i["details"]["system"], i["details"]["record_key"]): i for i in items(cfg, "candidate")}
    review.decide(cfg, "link", by="ann", reason="confirmed by phone", item_id=cands[("marketing", "1")]["item_id"],
                  xid=links[("crm", "A")])
    review.decide(cfg, "distinct", by="ann", reason="different Katarzyna", item_id=cands[("erp", "E1")]["item_id"])
    night(cfg, 2)
    night(cfg, 3)
    after = xref(cfg)
    assert after[("marketing", "1")] == links[("crm", "A")]
    # never proposed again: the ERP record is now a person of its own (identity.orphans: create)
    assert after[("erp", "E1")] not in (links[("crm", "K")], links[("crm", "K2")])
    con = duckdb.connect(str(cfg.warehouse_path), read_only=True)
    assert con.execute("SELECT rule FROM identity.xref WHERE record_key = 'E1'").fetchone() == ("minted_orphan",)
    con.close()
    assert review.show_item(cfg, cands[("erp", "E1")]["item_id"])["status"] == "decided"


def test_bad_decisions_are_refused_with_a_reason(systems):
    from reconcile.errors import ReconcileError

    cfg = load_config(systems / "reconcile.yaml")
    night(cfg, 1)
    with pytest.raises(ReconcileError, match="needs --by"):
        review.decide(cfg, "split", by=" ", reason="x", record="crm:A")
    with pytest.raises(ReconcileError, match="not linked"):
        review.decide(cfg, "split", by="a", reason="x", record="marketing:1")
    with pytest.raises(ReconcileError, match="SYSTEM:KEY"):
        review.decide(cfg, "split", by="a", reason="x", record="crmA")
    with pytest.raises(ReconcileError, match="unknown xid"):
        review.decide(cfg, "link", by="a", reason="x", record="marketing:1", xid="nope")


class CountingConnection:
    """Counts statements sent to DuckDB, to show the work does not grow with the number of records."""

    def __init__(self, con):
        self.con, self.statements = con, 0

    def execute(self, *args, **kwargs):
        self.statements += 1
        return self.con.execute(*args, **kwargs)

    def sql(self, *args, **kwargs):
        self.statements += 1
        return self.con.sql(*args, **kwargs)

    def register(self, *args):
        return self.con.register(*args)

    def unregister(self, *args):
        return self.con.unregister(*args)


def test_resolution_is_set_based(tmp_path):
    """The number of SQL statements is the same for 40 and 400 people: no per-record Python loop."""
    from reconcile.demo import init_demo
    from reconcile.warehouse import open_work

    counts = []
    for people in (40, 400):
        d = tmp_path / str(people)
        init_demo(d, people=people, seed=3)
        cfg = load_config(d / "reconcile.yaml")
        m = runner.begin_run(cfg, "contact", "r1", datetime(2026, 2, 1))
        for s in m["systems"]:
            runner.extract_system(cfg, "contact", s, "r1")
        runner.load_staging(cfg, "contact", "r1")
        with open_work(cfg) as con:
            counting = CountingConnection(con)
            result = identity.resolve(counting, cfg, "contact", "r1", datetime(2026, 2, 1))
        assert result["linked"] > people / 2
        counts.append(counting.statements)
    assert counts[0] == counts[1]
