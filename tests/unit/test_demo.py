"""The demo systems generator: real SQLite files, exact expectations about the documented situations."""

from __future__ import annotations

import csv
import re
import sqlite3
from datetime import datetime
from pathlib import Path

import phonenumbers
import pytest
import yaml

from reconcile.demo import QUARANTINE_EXPECTED, SITUATIONS, demo_situations, init_demo

PEOPLE = 40
TABLES = {"crm": ("contact", "contactid"), "marketing": ("contacts", "vid"), "erp": ("customer", "customer_number")}
SHARED = "info@brightwater-dental.example.com"
EMAIL_SHAPE = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("demo")
    init_demo(directory, people=PEOPLE, seed=7)
    return directory


def connect(directory: Path, system: str) -> sqlite3.Connection:
    return sqlite3.connect(directory / "systems" / f"{system}.db")


def all_rows(directory: Path) -> dict[str, list[tuple]]:
    out = {}
    for system, (table, key) in TABLES.items():
        with connect(directory, system) as con:
            out[system] = con.execute(f"SELECT * FROM {table} ORDER BY {key}").fetchall()
    return out


def answer_key(directory: Path) -> list[list[str]]:
    with open(directory / "answer_key.csv", newline="", encoding="utf-8") as f:
        return list(csv.reader(f))


def person_of(directory: Path) -> dict[tuple[str, str], str]:
    return {(s, k): p for s, k, p in answer_key(directory)[1:]}


def test_same_seed_gives_identical_files_and_rows_and_another_seed_differs(tmp_path):
    a = init_demo(tmp_path / "a", people=PEOPLE, seed=7)
    init_demo(tmp_path / "b", people=PEOPLE, seed=7)
    init_demo(tmp_path / "c", people=PEOPLE, seed=8)

    key_a = (tmp_path / "a" / "answer_key.csv").read_bytes()
    assert key_a == (tmp_path / "b" / "answer_key.csv").read_bytes()
    assert all_rows(tmp_path / "a") == all_rows(tmp_path / "b")
    assert key_a != (tmp_path / "c" / "answer_key.csv").read_bytes()
    assert all_rows(tmp_path / "a")["crm"] != all_rows(tmp_path / "c")["crm"]
    assert (tmp_path / "a" / "reconcile.yaml").read_bytes() == (tmp_path / "c" / "reconcile.yaml").read_bytes()
    assert a["people"] == PEOPLE
    assert a["config"] == str(tmp_path / "a" / "reconcile.yaml")
    assert a["answer_key"] == str(tmp_path / "a" / "answer_key.csv")
    assert a["systems"] == {s: str(tmp_path / "a" / "systems" / f"{s}.db") for s in ("crm", "marketing", "erp")}
    assert a["records"] == {s: len(rows) for s, rows in all_rows(tmp_path / "a").items()}


def test_answer_key_covers_every_record_of_every_system_exactly_once(demo):
    rows = answer_key(demo)
    assert rows[0] == ["system", "record_key", "person_id"]
    body = [tuple(r) for r in rows[1:]]
    assert body == sorted(body)
    keys = [(s, k) for s, k, _ in body]
    assert len(keys) == len(set(keys))
    in_systems = {(s, str(r[0])) for s, records in all_rows(demo).items() for r in records}
    assert set(keys) == in_systems
    assert len({p for _, _, p in body}) == PEOPLE


def test_every_system_holds_a_mix_of_people(demo):
    systems_of: dict[str, set[str]] = {}
    for s, _, p in answer_key(demo)[1:]:
        systems_of.setdefault(p, set()).add(s)
    combos = {frozenset(v) for v in systems_of.values()}
    for combo in ({"crm", "marketing"}, {"crm", "marketing", "erp"}, {"marketing"}, {"crm"}, {"erp"}):
        assert frozenset(combo) in combos


def test_marketing_enforces_unique_email_case_insensitively(demo, tmp_path):
    init_demo(tmp_path, people=PEOPLE)
    with connect(tmp_path, "marketing") as con:
        with pytest.raises(sqlite3.IntegrityError, match="UNIQUE"):
            con.execute("INSERT INTO contacts (email) VALUES ('anna.berg@example.com')")
        with pytest.raises(sqlite3.IntegrityError, match="UNIQUE"):
            con.execute("INSERT INTO contacts (email) VALUES ('Anna.Berg@Example.com')")


def test_schemas_reject_values_the_products_reject(tmp_path):
    init_demo(tmp_path, people=PEOPLE)
    with connect(tmp_path, "crm") as con:
        with pytest.raises(sqlite3.IntegrityError, match="CHECK"):
            con.execute("INSERT INTO contact (firstname, stage) VALUES ('X', 'lead')")
        con.execute("INSERT INTO contact (firstname) VALUES ('Y')")  # Dynamics assigns the GUID
        guid, statecode = con.execute("SELECT contactid, statecode FROM contact WHERE firstname = 'Y'").fetchone()
        assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}", guid)
        assert statecode == 0
    with connect(tmp_path, "erp") as con:
        with pytest.raises(sqlite3.IntegrityError, match="NOT NULL"):
            con.execute("INSERT INTO customer (first_name) VALUES ('X')")
        with pytest.raises(sqlite3.IntegrityError, match="CHECK"):
            con.execute("INSERT INTO customer (customer_number, is_inactive) VALUES ('CUST-99999', 'Y')")


def test_updates_stamp_the_modified_column_unless_the_writer_sets_it(tmp_path):
    init_demo(tmp_path, people=PEOPLE)
    with connect(tmp_path, "crm") as con:
        con.execute("UPDATE contact SET modifiedon = '2026-02-02 00:00:00' WHERE lastname = 'Whitfield'")
        assert con.execute("SELECT modifiedon FROM contact WHERE lastname = 'Whitfield'").fetchone() == (
            "2026-02-02 00:00:00",)
        con.execute("UPDATE contact SET jobtitle = 'CTO' WHERE lastname = 'Whitfield'")
        (stamped,) = con.execute("SELECT modifiedon FROM contact WHERE lastname = 'Whitfield'").fetchone()
    assert stamped != "2026-02-02 00:00:00"
    datetime.strptime(stamped, "%Y-%m-%d %H:%M:%S")


def test_shared_mailbox_is_two_crm_people_and_one_marketing_contact(demo):
    who = person_of(demo)
    with connect(demo, "crm") as con:
        crm = con.execute(
            "SELECT contactid, firstname, lastname FROM contact WHERE lower(trim(emailaddress1)) = ? ORDER BY lastname",
            (SHARED,)).fetchall()
    with connect(demo, "marketing") as con:
        mkt = con.execute("SELECT vid, firstname, lastname, crm_contact_guid FROM contacts WHERE email = ?",
                          (SHARED,)).fetchall()
    assert [(first, last) for _, first, last in crm] == [("Tom", "Becker"), ("Maria", "Schmidt")]
    tom, maria = (who[("crm", guid)] for guid, _, _ in crm)
    assert (maria, tom) == SITUATIONS["shared_mailbox"]
    assert len(mkt) == 1
    vid, first, last, guid = mkt[0]
    assert (first, last, guid) == ("Maria", "Schmidt", crm[1][0])
    assert who[("marketing", str(vid))] == maria


def test_one_person_entered_twice_in_crm(demo):
    who = person_of(demo)
    with connect(demo, "crm") as con:
        rows = con.execute(
            "SELECT contactid, emailaddress1, telephone1, modifiedon FROM contact "
            "WHERE firstname = 'Siobhán' AND lastname = 'O''Brien' ORDER BY createdon").fetchall()
    assert [(email, phone) for _, email, phone, _ in rows] == [
        ("siobhan.obrien@example.org", "+1 617-555-0148"), ("siobhan.obrien@example.org", "(617) 555-0184")]
    assert rows[0][3] != rows[1][3]
    assert who[("crm", rows[0][0])] == who[("crm", rows[1][0])] == "P000005"
    with connect(demo, "marketing") as con:
        assert con.execute("SELECT phone, crm_contact_guid FROM contacts WHERE email = 'siobhan.obrien@example.org'"
                           ).fetchall() == [("6175550148", None)]


def test_webinar_signup_and_manual_crm_entry_the_same_day(demo):
    who = person_of(demo)
    with connect(demo, "marketing") as con:
        vid, email, stage, created, guid = con.execute(
            "SELECT vid, email, lifecyclestage, createdate, crm_contact_guid FROM contacts WHERE lastname = 'Whitfield'"
        ).fetchone()
    with connect(demo, "crm") as con:
        guid_crm, email_crm, created_crm = con.execute(
            "SELECT contactid, emailaddress1, createdon FROM contact WHERE lastname = 'Whitfield'").fetchone()
    assert (email, stage, created, guid) == (
        "dana.whitfield@lumen-analytics.example.com", "subscriber", "2025-11-18T15:02:37Z", None)
    assert (email_crm, created_crm) == ("Dana.Whitfield@Lumen-Analytics.example.com", "2025-11-18 19:41:05")
    assert who[("marketing", str(vid))] == who[("crm", guid_crm)] == "P000006"


def test_erp_customer_with_surname_typo_and_no_email(demo):
    who = person_of(demo)
    with connect(demo, "erp") as con:
        number, email, company, phone = con.execute(
            "SELECT customer_number, email, company_name, phone FROM customer WHERE last_name = 'Nowakowsak'"
        ).fetchone()
    person = who[("erp", number)]
    crm_keys = [k for (s, k), p in who.items() if s == "crm" and p == person]
    assert len(crm_keys) == 1
    with connect(demo, "crm") as con:
        crm = con.execute("SELECT firstname, lastname, companyname, telephone1 FROM contact WHERE contactid = ?",
                          (crm_keys[0],)).fetchone()
    assert email is None
    assert crm == ("Katarzyna", "Nowakowska", company, "+1 312-555-0187")
    assert (company, phone) == ("Vistula Logistics", "(312) 555 0187")


def test_variants_of_one_person_across_the_three_systems(demo):
    with connect(demo, "crm") as con:
        crm = con.execute("SELECT emailaddress1, telephone1 FROM contact WHERE lastname = 'Berg' AND firstname = 'Anna'"
                          ).fetchall()
    with connect(demo, "marketing") as con:
        mkt = con.execute("SELECT email, phone FROM contacts WHERE lastname = 'Berg' AND firstname = 'Anna'").fetchall()
    with connect(demo, "erp") as con:
        erp = con.execute("SELECT email, phone FROM customer WHERE last_name = 'Berg' AND first_name = 'Anna' "
                          "AND email IS NOT NULL").fetchall()  # the other Anna Berg (common_name) has none
    assert crm == [(" Anna.Berg@Example.com ", "+1 415-555-0134")]
    assert mkt == [("anna.berg@example.com", "4155550134")]
    assert erp == [("Anna.Berg@example.com", "(415) 555 0134")]


def test_inactive_records_and_opt_outs(demo):
    with connect(demo, "crm") as con:
        assert con.execute("SELECT statecode FROM contact WHERE lastname = 'Köhler' AND firstname = 'Jürgen'"
                           ).fetchall() == [(1,)]
    with connect(demo, "erp") as con:
        assert con.execute("SELECT is_inactive FROM customer WHERE last_name = 'Köhler' AND first_name = 'Jürgen'"
                           ).fetchall() == [("T",)]
    keys = demo_situations(demo)["opt_outs"]["marketing"]
    with connect(demo, "marketing") as con:
        rows = con.execute(
            f"SELECT hs_email_optout, hs_email_optout_source, hs_email_optout_timestamp IS NOT NULL FROM contacts "
            f"WHERE vid IN ({','.join('?' * len(keys))}) ORDER BY hs_email_optout_source", keys).fetchall()
        assert rows == [(1, "CRM sync", 1), (1, "import", 1), (1, "unsubscribe link", 1)]
        # Opted-out contacts always say when; the others never carry a source.
        assert con.execute("SELECT count(*) FROM contacts WHERE (hs_email_optout = 1) != "
                           "(hs_email_optout_source IS NOT NULL AND hs_email_optout_timestamp IS NOT NULL)"
                           ).fetchone() == (0,)


def test_exactly_the_documented_bad_rows_are_invalid(tmp_path):
    init_demo(tmp_path, people=2000, seed=3)
    checks = {  # system: (table, email column, phone column, modified column, timestamp format)
        "crm": ("contact", "emailaddress1", "telephone1", "modifiedon", "%Y-%m-%d %H:%M:%S"),
        "marketing": ("contacts", "email", "phone", "lastmodifieddate", "%Y-%m-%dT%H:%M:%SZ"),
        "erp": ("customer", "email", "phone", "last_modified", "%Y-%m-%dT%H:%M:%S"),
    }
    bad = {}
    for system, (table, email, phone, modified, fmt) in checks.items():
        with connect(tmp_path, system) as con:
            rows = con.execute(f"SELECT {email}, {phone}, {modified} FROM {table}").fetchall()
        bad[system] = sorted({e for e, _, _ in rows if e is not None and not EMAIL_SHAPE.match(e.strip())}
                             | {m for _, _, m in rows if not _parses(m, fmt)})
        for _, p, _ in rows:  # every phone is valid once a leading 00 is read as +
            if p is not None:
                number = phonenumbers.parse("+" + p[2:] if p.startswith("00") else p, "US")
                assert phonenumbers.is_valid_number(number), p
    assert bad == {"crm": ["mike.jones(at)example.com"], "marketing": ["no-email-given"], "erp": ["31/02/2026 25:61"]}
    assert {s: len(v) for s, v in bad.items()} == QUARANTINE_EXPECTED


def _parses(value: str, fmt: str) -> bool:
    try:
        return datetime.strptime(value, fmt) < datetime(2026, 1, 1)
    except ValueError:
        return False


def test_demo_situations_names_the_special_records(demo):
    found = demo_situations(demo)
    assert set(found) == set(SITUATIONS)
    assert {s: len(found["twice_in_crm"][s]) for s in ("crm", "marketing", "erp")} == {"crm": 2, "marketing": 1, "erp": 0}
    assert {s: len(found["shared_mailbox"][s]) for s in ("crm", "marketing", "erp")} == {"crm": 2, "marketing": 1, "erp": 0}
    assert {s: len(found["quarantined"][s]) for s in ("crm", "marketing", "erp")} == QUARANTINE_EXPECTED
    with connect(demo, "erp") as con:
        assert con.execute("SELECT last_modified FROM customer WHERE customer_number = ?",
                           found["quarantined"]["erp"]).fetchone() == ("31/02/2026 25:61",)


def test_refuses_to_overwrite_unless_forced(tmp_path):
    init_demo(tmp_path, people=PEOPLE, seed=7)
    first = (tmp_path / "answer_key.csv").read_bytes()
    with pytest.raises(FileExistsError, match=re.escape(str(tmp_path / "reconcile.yaml"))):
        init_demo(tmp_path, people=PEOPLE, seed=8)
    (tmp_path / "reconcile.yaml").unlink()
    with pytest.raises(FileExistsError, match=re.escape(str(tmp_path / "systems" / "crm.db"))):
        init_demo(tmp_path, people=PEOPLE, seed=8)
    assert (tmp_path / "answer_key.csv").read_bytes() == first

    result = init_demo(tmp_path, people=PEOPLE + 5, seed=8, force=True)
    assert result["people"] == PEOPLE + 5
    assert (tmp_path / "answer_key.csv").read_bytes() != first
    assert sum(result["records"].values()) == len(answer_key(tmp_path)) - 1
    assert sorted(p.name for p in (tmp_path / "systems").iterdir()) == ["crm.db", "erp.db", "marketing.db"]


@pytest.mark.parametrize("people", [19, 0, -5])
def test_too_few_people_is_an_error(tmp_path, people):
    with pytest.raises(ValueError, match="people must be an integer >= 20"):
        init_demo(tmp_path, people=people)
    assert list(tmp_path.iterdir()) == []


def test_twenty_people_hold_every_situation(tmp_path):
    result = init_demo(tmp_path, people=20)
    assert result["people"] == 20
    found = demo_situations(tmp_path)
    for name, entry in found.items():
        assert sum(len(entry[s]) for s in ("crm", "marketing", "erp")) >= len(SITUATIONS[name]), name


def test_config_describes_the_generated_systems(demo):
    text = (demo / "reconcile.yaml").read_text(encoding="utf-8")
    assert text.startswith("# Demo configuration")
    assert "docs/configuration.md" in text.split("version: 1")[0]
    config = yaml.safe_load(text)
    assert config["version"] == 1
    assert config["warehouse"] == "warehouse/reconcile.duckdb"
    assert config["defaults"] == {"phone_region": "US"}
    assert config["systems"] == {
        "crm": {"url": "sqlite:///systems/crm.db", "creates_identity": True, "xid_column": "reconcile_xid"},
        "marketing": {"url": "sqlite:///systems/marketing.db", "unique": ["email"], "writes": {"create": True}},
        "erp": {"url": "sqlite:///systems/erp.db"},
    }
    contact = config["entities"]["contact"]
    assert contact["eligibility"] == {"marketing": "email is not null and active", "erp": "lifecycle = 'customer'"}
    assert {name: spec["owner"] for name, spec in contact["fields"].items()} == {
        "email": "crm", "first_name": "crm", "last_name": "crm", "phone": "marketing", "company": "crm",
        "lifecycle": "crm", "active": "crm", "email_opt_out": "marketing", "email_opt_out_at": "marketing",
        "billing_city": "erp"}
    for system, source in contact["sources"].items():
        table, key = TABLES[system]
        assert (source["table"], source["key"]) == (table, key)
        with connect(demo, system) as con:
            columns = {r[1] for r in con.execute(f"PRAGMA table_info({table})")}
            assert source["modified_at"] in columns
            for field, mapping in source["fields"].items():
                assert field in contact["fields"]
                column = mapping if isinstance(mapping, str) else mapping["column"]
                assert column in columns, (system, column)
                transform = None if isinstance(mapping, str) else mapping.get("transform")
                if isinstance(transform, dict):  # every stored value has a mapping
                    values = {str(v) for (v,) in con.execute(f"SELECT DISTINCT {column} FROM {table}")}
                    assert values <= set(transform["map"]), (system, column, values)


def _names_and_companies(directory: Path) -> list[tuple[str, str, str | None, str]]:
    """(first, last, company, person) of every record of the three systems, names lowercased."""
    key = person_of(directory)
    out = []
    for system, sql in (("crm", "SELECT contactid, firstname, lastname, companyname FROM contact"),
                        ("marketing", "SELECT vid, firstname, lastname, company FROM contacts"),
                        ("erp", "SELECT customer_number, first_name, last_name, company_name FROM customer")):
        with connect(directory, system) as con:
            out += [(f.lower(), l.lower(), c, key[(system, str(k))]) for k, f, l, c in con.execute(sql)]
    return out


def test_small_demos_draw_names_and_companies_from_the_built_in_lists(demo):
    from reconcile.demo import names

    firsts = {n.lower() for n in (*names.FIRST_NAMES, *names.NICKNAMES.values())}
    lasts = {n.lower() for n in names.LAST_NAMES}
    anagrams = {"".join(sorted(n)) for n in lasts}  # an ERP surname typo swaps two letters
    companies = {c for c, _ in names.COMPANIES}
    random_people = [r for r in _names_and_companies(demo) if r[3] > "P000020"]  # after the fixed examples
    assert random_people
    for first, last, company, person in random_people:
        assert first in firsts or first in lasts, (first, person)  # swapped names hold a surname as first name
        assert last in lasts or last in firsts or "".join(sorted(last)) in anagrams, (last, person)
        assert company is None or company in companies, (company, person)


def test_large_demos_have_a_long_tail_so_a_full_name_and_company_mostly_name_one_person(tmp_path):
    """From 5,000 people on, invented names and companies join the built-in lists and the tail grows with
    the population: distinct values grow, and two records sharing first name, last name and company are
    nearly always one person (with the built-in lists alone, 200 surnames and 50 companies, they are not)."""
    from reconcile.demo import names

    counts = {}
    for people in (6_000, 24_000):
        init_demo(tmp_path / str(people), people=people, seed=5)
        rows = _names_and_companies(tmp_path / str(people))
        counts[people] = [len({r[i] for r in rows}) for i in range(3)]
        groups: dict[tuple, list[str]] = {}
        for first, last, company, person in rows:
            if company is not None:
                groups.setdefault((first, last, company), []).append(person)
        pairs = same = 0
        for persons in groups.values():
            for i, a in enumerate(persons):
                for b in persons[i + 1:]:
                    pairs, same = pairs + 1, same + (a == b)
        assert same / pairs > 0.98, (people, same, pairs)
        head = sum(1 for r in rows if r[2] in {c for c, _ in names.COMPANIES}) / len(rows)
        assert 0.05 < head < 0.15, head  # one person in ten works at one of the 50 built-in companies
    assert counts[6_000][0] > 1.3 * len(names.FIRST_NAMES), counts  # first names, surnames, companies
    assert counts[6_000][1] > 10 * len(names.LAST_NAMES), counts
    assert counts[6_000][2] > 20 * len(names.COMPANIES), counts
    assert counts[24_000][1] > 1.5 * counts[6_000][1], counts


def test_the_tails_grow_with_the_population_and_a_larger_one_extends_a_smaller_one():
    from reconcile.demo.generator import _Pools

    small, large = _Pools(50_000), _Pools(400_000)
    assert not _Pools(4_999).last[1] and not _Pools(4_999).company[1]  # below 5,000: the built-in lists only
    for kind, (n_small, n_large) in {"first": (1_000, 4_000), "last": (10_000, 40_000),
                                     "company": (2_500, 20_000)}.items():
        tail_small, tail_large = getattr(small, kind)[1], getattr(large, kind)[1]
        assert (len(tail_small), len(tail_large)) == (n_small, n_large), kind
        assert tail_large[:n_small] == tail_small, kind
        assert len(set(tail_large)) == n_large, kind
