"""Identity v2 on small hand-written systems: the match model's three bands, the shared-mailbox guard,
minted orphans, the default model without `match:`, incremental scoring and what the model learns."""
from __future__ import annotations

import json
from datetime import datetime

import duckdb
import pytest

from reconcile import runner
from reconcile.config import load_config

from ..conftest import sqlite_exec, write_sqlite

HEAD = """\
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
        key: contactid
        modified_at: modifiedon
        fields:
          email: {column: email, transform: email}
          first_name: {column: firstname, transform: trim}
          last_name: {column: lastname, transform: trim}
          phone: {column: phone, transform: phone}
          company: company
      marketing:
        table: contacts
        key: vid
        modified_at: updated_at
        fields:
          email: {column: email, transform: email}
          first_name: firstname
          last_name: lastname
      erp:
        table: customer
        key: number
        modified_at: modified
        fields:
          email: {column: email, transform: email}
          first_name: first_name
          last_name: last_name
          phone: {column: phone, transform: phone}
          company: company
    fields:
      email: {owner: crm}
      first_name: {owner: crm}
      last_name: {owner: crm}
      phone: {owner: crm}
      company: {owner: crm}
"""
MATCH = """\
    match:
      - {name: email, fields: [email]}
      - name: person
        type: probabilistic
        fields: [first_name, last_name, company, phone]
        exact: [phone]
        block_on: [phone, [first_name, last_name], [last_name, company]]
"""
T = "2026-01-01 10:00:00"


def make(tmp_path, crm, marketing=(), erp=(), match: str = MATCH):
    """Three SQLite systems holding the given rows (without modified times), and a config."""
    write_sqlite(tmp_path / "systems" / "crm.db", """CREATE TABLE contact (contactid TEXT PRIMARY KEY, email TEXT,
        firstname TEXT, lastname TEXT, phone TEXT, company TEXT, modifiedon TEXT)""", "contact",
                 [(*row, T) for row in crm])
    write_sqlite(tmp_path / "systems" / "marketing.db", """CREATE TABLE contacts (vid INTEGER PRIMARY KEY, email TEXT,
        firstname TEXT, lastname TEXT, updated_at TEXT)""", "contacts", [(*row, T) for row in marketing])
    write_sqlite(tmp_path / "systems" / "erp.db", """CREATE TABLE customer (number TEXT PRIMARY KEY, email TEXT,
        first_name TEXT, last_name TEXT, phone TEXT, company TEXT, modified TEXT)""", "customer",
                 [(*row, T) for row in erp])
    (tmp_path / "reconcile.yaml").write_text(HEAD + match)
    return load_config(tmp_path / "reconcile.yaml")


def night(cfg, n: int) -> dict:
    return runner.run_entity(cfg, "contact", run_id=f"r{n}", run_at=datetime(2026, 2, n, 2))["identity"]


def query(cfg, sql: str, params=()) -> list[tuple]:
    con = duckdb.connect(str(cfg.warehouse_path), read_only=True)
    try:
        return con.execute(sql, list(params)).fetchall()
    finally:
        con.close()


def xid(cfg, system: str, key: str) -> str | None:
    rows = query(cfg, "SELECT xid FROM identity.xref WHERE system = ? AND record_key = ?", (system, key))
    return rows[0][0] if rows else None


def open_items(cfg, kind: str) -> dict[tuple[str, str], dict]:
    return {(d["system"], d["record_key"]): d for (d,) in (
        (json.loads(t),) for (t,) in query(cfg, "SELECT details FROM review.items WHERE kind = ? AND status = 'open'",
                                           (kind,)))}


CRM = [  # contactid, email, first, last, phone, company
    ("A", "info@brightwater.example", "Maria", "Schmidt", "4155550101", "Brightwater"),
    ("R", "bob.jones@acme.example", "Robert", "Jones", "4155550102", "Acme"),
    ("J", "john.smith@initech.example", "John", "Smith", "4155550103", "Initech"),
    ("N", "anna.berg@northwind.example", "Anna", "Berg", "4155550104", "Northwind"),
]


def test_shared_mailbox_with_only_one_person_in_the_crm_is_not_linked(tmp_path):
    # Tom Becker reads Maria Schmidt's mailbox; only Maria is in the CRM. Email equal, names not.
    cfg = make(tmp_path, CRM, marketing=[(1, "info@brightwater.example", "Tom", "Becker")])
    night(cfg, 1)
    assert xid(cfg, "marketing", "1") is None  # not linked, and not minted either: people decide
    item = open_items(cfg, "candidate")[("marketing", "1")]
    assert "shared mailbox" in item["why"]
    assert [c["record_key"] for c in item["candidates"]] == ["A"]


def test_nickname_with_same_email_and_phone_links(tmp_path):
    cfg = make(tmp_path, CRM, erp=[("E1", "Bob.Jones@acme.example", "Bob", "Jones", "(415) 555-0102", None)])
    s = night(cfg, 1)
    assert xid(cfg, "erp", "E1") == xid(cfg, "crm", "R")
    (rule, evidence), = query(cfg, "SELECT rule, evidence FROM identity.xref WHERE record_key = 'E1'")
    evidence = json.loads(evidence)
    # evidence on every link, exact ones included: the model's probability and per-field weights
    assert rule == "match:email" and evidence["_with"] == "crm:R" and evidence["_probability"] >= 0.999
    assert evidence["email"]["weight"] > 0 and evidence["phone"]["weight"] > 0
    assert evidence["first_name_last_name"]["weight"] < evidence["phone"]["weight"]  # Bob is not Robert
    assert s["minted"] == 4


def test_nickname_same_phone_no_email_links_automatically_by_the_model(tmp_path):
    cfg = make(tmp_path, CRM, erp=[("E1", None, "Rob", "Jones", "+1 415 555 0102", "Acme")])
    s = night(cfg, 1)
    assert xid(cfg, "erp", "E1") == xid(cfg, "crm", "R")
    assert s["by_rule"]["match:person"] == 1 and s["auto_links"] == 1
    (confidence,), = query(cfg, "SELECT confidence FROM identity.xref WHERE record_key = 'E1'")
    assert confidence >= 0.999


def test_common_name_and_no_other_shared_value_does_not_link(tmp_path):
    cfg = make(tmp_path, CRM, erp=[("E2", None, "John", "Smith", "3125550199", "Globex")])
    s = night(cfg, 1)
    assert xid(cfg, "erp", "E2") != xid(cfg, "crm", "J")
    assert s["auto_links"] == 0 and s["linked"] == 4  # the four CRM mints, nothing else


def test_a_job_change_counts_once_same_name_and_phone_with_new_email_and_company_links(tmp_path):
    # Rafael moved from Adventure Works to Tailspin: the ERP still holds his old email and company. Email and
    # company change together, so the different company is no further evidence once the emails differ.
    moved = ("M", "rafael.ortiz@tailspin.example", "Rafael", "Ortiz", "3055550119", "Tailspin")
    cfg = make(tmp_path, [*CRM, moved],
               erp=[("E4", "rortiz@adventure-works.example", "Rafael", "Ortiz", "(305) 555-0119", "Adventure Works")])
    night(cfg, 1)
    assert xid(cfg, "erp", "E4") == xid(cfg, "crm", "M")
    (evidence,), = query(cfg, "SELECT evidence FROM identity.xref WHERE record_key = 'E4'")
    evidence = json.loads(evidence)
    assert evidence["email"]["weight"] < 0 and evidence["company"]["weight"] == 0
    # without an email on one side, a different company still counts against a match
    cfg = make(tmp_path / "no_email", [*CRM, moved],
               erp=[("E4", None, "Rafael", "Ortiz", "(305) 555-0119", "Adventure Works")])
    night(cfg, 1)
    (evidence,), = query(cfg, "SELECT evidence FROM identity.xref WHERE record_key = 'E4'")
    assert json.loads(evidence)["company"]["weight"] < 0


def test_orphan_without_candidate_gets_its_own_minted_xid(tmp_path):
    cfg = make(tmp_path, CRM, erp=[("E3", "zed@quill.example", "Zed", "Quill", "2065550100", "Quill Ltd")])
    s = night(cfg, 1)
    assert query(cfg, "SELECT rule FROM identity.xref WHERE record_key = 'E3'") == [("minted_orphan",)]
    assert query(cfg, "SELECT minted_from, status FROM identity.xids WHERE xid = ?", (xid(cfg, "erp", "E3"),)) \
        == [("erp:E3", "active")]
    assert (s["minted"], s["orphans"], s["review"]) == (5, 0, 0)


def test_config_without_match_links_email_equal_name_consistent_records(tmp_path):
    cfg = make(tmp_path, CRM, marketing=[(1, "anna.berg@northwind.example", "Anna", "Berg"),
                                         (2, "info@brightwater.example", "Tom", "Becker")], match="")
    s = night(cfg, 1)
    assert xid(cfg, "marketing", "1") == xid(cfg, "crm", "N")
    assert xid(cfg, "marketing", "2") is None  # the derived email rule has the same shared-mailbox guard
    assert s["by_rule"]["match:email"] == 1


def test_a_run_with_one_changed_record_scores_only_that_record(tmp_path):
    cfg = make(tmp_path, CRM, marketing=[(1, "anna.berg@northwind.example", "Anna", "Berg")],
               erp=[("E1", None, "Rob", "Jones", "+1 415 555 0102", "Acme")])
    first = night(cfg, 1)
    assert first["pairs_scored"] == 2  # marketing 1 ~ crm N (email, name); erp E1 ~ crm R (phone)
    sqlite_exec(tmp_path / "systems" / "marketing.db",
                "UPDATE contacts SET lastname = 'Berg-Lund', updated_at = '2026-01-02 10:00:00' WHERE vid = 1")
    second = night(cfg, 2)
    # only marketing 1 is scored: against crm N, the one record it shares a blocking key (email) with
    assert second["pairs_scored"] == 1 and second["model"]["status"] == "reused"
    assert night(cfg, 3)["pairs_scored"] == 0  # nothing changed, nothing scored
    assert xid(cfg, "marketing", "1") == xid(cfg, "crm", "N")


def test_xids_stay_stable_across_three_runs_and_review_items_survive_incremental_runs(tmp_path):
    cfg = make(tmp_path, CRM, marketing=[(1, "info@brightwater.example", "Tom", "Becker")],
               erp=[("E1", None, "Rob", "Jones", "+1 415 555 0102", "Acme")])
    night(cfg, 1)
    before = query(cfg, "SELECT system, record_key, xid FROM identity.xref ORDER BY ALL")
    item_before = open_items(cfg, "candidate")
    for n in (2, 3):
        s = night(cfg, n)
        assert (s["linked"], s["minted"]) == (0, 0)
    assert query(cfg, "SELECT system, record_key, xid FROM identity.xref ORDER BY ALL") == before
    assert open_items(cfg, "candidate").keys() == item_before.keys() == {("marketing", "1")}


@pytest.mark.slow
def test_trained_m_u_exact_email_is_high_and_a_common_value_weighs_less(tmp_path):
    """Enough records to train on (u sampled, m by EM): 1,100 people in CRM and ERP, 40 of whom share one
    office phone; the rest have their own. A shared value is weaker evidence than a rare one."""
    crm, erp = [], []
    for i in range(1100):
        phone = "4155550100" if i < 40 else f"212555{i:04d}"
        email = f"person{i}@example{i % 50}.com"
        crm.append((f"C{i}", email, f"First{i % 97}", f"Last{i}", phone, f"Company {i % 60}"))
        # ERP typed a third of the emails differently or not at all, so email is not the only evidence
        erp.append((f"E{i}", email if i % 3 else None, f"First{i % 97}", f"Last{i}", phone, f"Company {i % 60}"))
    cfg = make(tmp_path, crm, erp=erp)
    night(cfg, 1)
    (m_u, status), = query(cfg, "SELECT m_u, status FROM identity.model WHERE run_id = 'r1'")
    exact_email = json.loads(m_u)["email"][0]
    assert status == "trained" and exact_email["level"] == "Exact match on email"
    assert exact_email["m"] > 0.9 and exact_email["u"] < 0.001
    weights = dict(query(cfg, """SELECT record_key, CAST(evidence->'$.phone.weight' AS DOUBLE) FROM identity.xref
                                WHERE system = 'erp' AND record_key IN ('E1', 'E500')"""))
    assert weights["E1"] < weights["E500"] - 3  # 40 people share E1's phone: term frequency lowers its weight


def test_after_a_retraining_unchanged_records_are_scored_again(tmp_path):
    # retrain_every: 2 -> night 1 trains, night 2 reuses, night 3 trains again and re-scores every record
    cfg = make(tmp_path, CRM, marketing=[(1, "anna.berg@northwind.example", "Anna", "Berg")],
               erp=[("E1", None, "Rob", "Jones", "+1 415 555 0102", "Acme")],
               match=MATCH + "    identity: {retrain_every: 2}\n")
    first = night(cfg, 1)
    before = query(cfg, "SELECT system, record_key, xid FROM identity.xref ORDER BY ALL")
    second, third = night(cfg, 2), night(cfg, 3)
    assert [s["model"]["status"] for s in (first, second, third)] == ["trained", "reused", "trained"]
    assert (first["pairs_scored"], second["pairs_scored"], third["pairs_scored"]) == (2, 0, 2)
    assert third["model"]["trained_run_id"] == "r3" and third["linked"] == 0
    assert query(cfg, "SELECT system, record_key, xid FROM identity.xref ORDER BY ALL") == before
    # every fingerprint now names the new model: night 4 (reused) scores nothing again
    assert night(cfg, 4)["pairs_scored"] == 0


def test_unlinked_records_wait_in_open_items_and_none_is_resolved_in_the_run_that_made_it(tmp_path):
    """The lost-orphans bug (v1, 300k people): orphan items were created and set resolved in the same run,
    so the summary said review 0, orphans 0 with thousands of records unlinked. With identity.orphans:
    review, every record left without an xid has exactly one open item, across runs, until it links."""
    cfg = make(tmp_path, CRM, marketing=[(1, "info@brightwater.example", "Tom", "Becker"),
                                         (2, "zed@quill.example", "Zed", "Quill")],
               erp=[("E3", None, "Ida", "Moss", "2065550100", "Moss Ltd")],
               match=MATCH + "    identity: {orphans: review}\n")

    def state():
        return query(cfg, """SELECT kind, system, details->>'record_key', status, first_seen_run FROM review.items
                             ORDER BY ALL""")

    for n in (1, 2):
        s = night(cfg, n)
        assert (s["unlinked_records"], s["review"], s["orphans"], s["candidates"], s["minted"]) == (3, 3, 2, 1,
                                                                                                   4 if n == 1 else 0)
        assert state() == [("candidate", "marketing", "1", "open", "r1"), ("orphan", "erp", "E3", "open", "r1"),
                           ("orphan", "marketing", "2", "open", "r1")]
    # Zed enters the CRM: his marketing contact links by email, and only his orphan item is resolved
    sqlite_exec(tmp_path / "systems" / "crm.db", "INSERT INTO contact VALUES ('Z', 'zed@quill.example', 'Zed', "
                                                 "'Quill', NULL, NULL, '2026-01-03 10:00:00')")
    s = night(cfg, 3)
    assert (s["unlinked_records"], s["orphans"], s["by_rule"]) == (2, 1, {"match:email": 1, "minted": 1})
    assert state() == [("candidate", "marketing", "1", "open", "r1"), ("orphan", "erp", "E3", "open", "r1"),
                       ("orphan", "marketing", "2", "resolved", "r1")]


def test_a_record_waiting_on_a_duplicate_links_once_the_duplicate_is_merged(tmp_path):
    # Siobhan is twice in the CRM with one email; her marketing contact shares it. One item: the duplicate,
    # which lists the marketing contact as waiting; merging it lets the contact link on the next run.
    from reconcile import review

    cfg = make(tmp_path, CRM + [("S1", "siobhan@example.org", "Siobhan", "OBrien", None, "Harbor"),
                                ("S2", "siobhan@example.org", "Siobhan", "OBrien", None, "Harbor")],
               marketing=[(3, "siobhan@example.org", "Siobhan", "OBrien")])
    s = night(cfg, 1)
    assert xid(cfg, "marketing", "3") is None and open_items(cfg, "candidate") == {}
    assert (s["review"], s["duplicates"], s["unlinked_records"]) == (1, 1, 1)
    (item_id, details), = query(cfg, "SELECT item_id, details FROM review.items WHERE kind = 'duplicate'")
    details = json.loads(details)
    assert details["waiting"] == [{"system": "marketing", "record_key": "3"}]
    assert details["would_change"]["links"] == "merge: one xid for all 2 records; then marketing:3 join(s) it"
    review.decide(cfg, "merge", by="steward", reason="entered twice", item_id=item_id)
    s = night(cfg, 2)
    assert xid(cfg, "marketing", "3") == xid(cfg, "crm", "S1") == xid(cfg, "crm", "S2")
    assert s["by_rule"] == {"decision:merge": 1, "match:email": 1} and s["review"] == 0


def test_term_frequencies_count_other_people_not_the_records_of_the_same_person():
    from reconcile.stages.identity_model import term_frequency_sql

    con = duckdb.connect()
    con.execute("CREATE TABLE recs (system VARCHAR, grp VARCHAR, phone VARCHAR)")
    con.execute("""INSERT INTO recs (system, grp, phone) VALUES
        -- Ann's phone in three systems (her own records: not a common value); Bob's only in the CRM
        ('crm', 'ann', 'p1'), ('marketing', 'ann', 'p1'), ('erp', 'erp:1', 'p1'), ('crm', 'bob', 'p2'),
        -- Cy's phone twice in the CRM, on one group (one person entered twice, sharing an email)
        ('crm', 'cy', 'p3'), ('crm', 'cy', 'p3'),
        -- an office switchboard three CRM contacts and one ERP customer share
        ('crm', 'd', 'p4'), ('crm', 'e', 'p4'), ('crm', 'f', 'p4'), ('erp', 'erp:2', 'p4')""")
    tf = dict(con.execute(term_frequency_sql("phone")).fetchall())
    # people holding a value: p1 1, p2 1, p3 1, p4 3, so 6 in all; within the CRM 6 people, 3 of them share
    # p4: 6 agreeing ordered pairs of 30, on the ERP 0 of 2: average u 6 / 32
    assert tf == {"p1": 6 / 32, "p2": 6 / 32, "p3": 6 / 32, "p4": 2 / 6}


def test_em_trains_on_the_fewest_blocking_rules_that_estimate_every_comparison():
    from reconcile.stages.identity_model import ModelSpec, em_rules

    # the demo's rules: email estimates names, company and phone; phone then estimates email; the name and
    # company rules would only estimate again what is estimated
    demo = ModelSpec(fields=["email", "first_name", "last_name", "company", "phone"],
                     blocking=[["email"], ["phone"], ["first_name", "last_name"], ["last_name", "company"],
                               ["first_name", "company"]], names=("first_name", "last_name"))
    assert em_rules(demo) == [["email"], ["phone"]]
    # a rule over one name field cannot estimate the name comparison (it uses both fields)
    no_email = ModelSpec(fields=["first_name", "last_name", "company", "phone"],
                         blocking=[["last_name"], ["phone"], ["company"]], names=("first_name", "last_name"))
    assert em_rules(no_email) == [["last_name"], ["phone"]]
