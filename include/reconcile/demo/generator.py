"""Demo systems generator: three SQLite "business systems" holding the same people, messily.

`init_demo` (called by `reconcile demo init` and `make demo`) writes a CRM like Dynamics 365, a
marketing tool like HubSpot and an ERP like NetSuite, a demo `reconcile.yaml` pointing at them, and
`answer_key.csv` saying which records are the same real person. The data holds the situations from
the field reports in ../shared/seeds (shared mailboxes, people entered twice, webinar signups
re-entered by hand, typos, opt-outs, inactive records, bad rows); see docs/demo.md.

Deterministic for (people, seed): everything comes from one `random.Random(seed)` and a fixed base
date, never from the wall clock or the global random. Stdlib only, so 100 000 people take seconds.
"""

from __future__ import annotations

import itertools
import os
import random
import sqlite3
import unicodedata
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from . import names
from .answer_key import SITUATIONS, write_answer_key

BASE = datetime(2026, 1, 1)
"""Every generated timestamp is before this instant (taken as UTC)."""

MIN_PEOPLE = 20
SYSTEMS = ("crm", "marketing", "erp")
DB_FILES = {"crm": "systems/crm.db", "marketing": "systems/marketing.db", "erp": "systems/erp.db"}
CONFIG_FILE = "reconcile.yaml"
ANSWER_KEY_FILE = "answer_key.csv"

# Mixed population of random people: (category, weight). "crm+mkt" people are also in ERP when
# "all"; together that is ~60% in CRM and marketing, ~25% in all three.
_CATEGORIES = ("crm+mkt", "all", "mkt", "crm", "erp", "crm+erp")
_CATEGORY_WEIGHTS = (35, 25, 15, 15, 5, 5)
# Rates of the scaled-up situations among random people (the fixed examples exist regardless).
_P_TWICE_IN_CRM = 0.015
_P_WEBINAR_SAME_DAY = 0.02
_P_ERP_TYPO = 0.02
_P_SHARED_MAILBOX = 0.01
_P_UK = 0.03
# Hard cases for identity resolution among random people.
_P_SHARED_ONE_IN_CRM = 0.04    # of CRM-only people: a colleague signs up in marketing with their shared mailbox
_P_NICKNAME = 0.03             # marketing holds a nickname (when the first name has one)
_P_SWAPPED = 0.004             # ERP holds first and last name swapped
_P_CHANGED_EMAIL = 0.01        # marketing holds an older email (and company) of a CRM person, no CRM id
_P_COMMON_NAME = 0.02          # a random person gets one of a few very common full names (a tenth of that
                               # with the long tail below: 0.03% of people per name, as common as "John Smith")

# The long tail (names.SURNAME_PARTS ...): from _TAIL_FROM people on, a share of the people get invented
# first names, surnames and companies instead of ones from the built-in lists: (share of the built-in head,
# people per tail entry, smallest tail). The tail grows with the population up to all the combinations of
# its parts (7,200 first names, 57,600 surnames, 48,000 companies).
_TAIL_FROM = 5_000
_TAIL = {"first": (0.7, 100, 1_000), "last": (0.3, 10, 10_000), "company": (0.1, 20, 2_000)}

_DAY = 86400
_SPECIAL_COUNT = len({pid for pids in SITUATIONS.values() for pid in pids})
_FOLD = str.maketrans({"ł": "l", "Ł": "L", "ß": "ss", "ø": "o", "Ø": "O", "æ": "ae", "Æ": "AE",
                       "đ": "d", "Đ": "D", "ı": "i", "œ": "oe", "Œ": "OE"})

# --- schemas: constraints behave like the products (picklists, unique email, server-side stamps) ---

_DDL = {
    "crm": """
CREATE TABLE contact (
    contactid     TEXT NOT NULL PRIMARY KEY DEFAULT (lower(hex(randomblob(4)) || '-' || hex(randomblob(2))
                  || '-4' || substr(hex(randomblob(2)), 2) || '-' || substr('89ab', 1 + (abs(random()) % 4), 1)
                  || substr(hex(randomblob(2)), 2) || '-' || hex(randomblob(6)))),
    firstname     TEXT,
    lastname      TEXT,
    emailaddress1 TEXT,
    telephone1    TEXT,
    jobtitle      TEXT,
    companyname   TEXT,
    stage         TEXT CHECK (stage IN ('Lead', 'Prospect', 'Customer')),
    statecode     INTEGER NOT NULL DEFAULT 0 CHECK (statecode IN (0, 1)),
    createdon     TEXT DEFAULT (strftime('%Y-%m-%d %H:%M:%S', 'now')),
    modifiedon    TEXT DEFAULT (strftime('%Y-%m-%d %H:%M:%S', 'now')),
    reconcile_xid TEXT
);
-- Dynamics stamps modifiedon on every update unless the writer sets it.
CREATE TRIGGER contact_touch AFTER UPDATE ON contact WHEN NEW.modifiedon IS OLD.modifiedon
BEGIN
    UPDATE contact SET modifiedon = strftime('%Y-%m-%d %H:%M:%S', 'now') WHERE contactid = NEW.contactid;
END;
""",
    "marketing": """
CREATE TABLE contacts (
    vid                       INTEGER PRIMARY KEY,
    email                     TEXT UNIQUE COLLATE NOCASE,
    firstname                 TEXT,
    lastname                  TEXT,
    phone                     TEXT,
    company                   TEXT,
    lifecyclestage            TEXT CHECK (lifecyclestage IN ('subscriber', 'lead', 'marketingqualifiedlead', 'customer')),
    hs_email_optout           INTEGER NOT NULL DEFAULT 0 CHECK (hs_email_optout IN (0, 1)),
    hs_email_optout_source    TEXT,
    hs_email_optout_timestamp TEXT,
    last_engagement_at        TEXT,
    createdate                TEXT DEFAULT (strftime('%Y-%m-%dT%H:%M:%SZ', 'now')),
    lastmodifieddate          TEXT DEFAULT (strftime('%Y-%m-%dT%H:%M:%SZ', 'now')),
    crm_contact_guid          TEXT
);
CREATE TRIGGER contacts_touch AFTER UPDATE ON contacts WHEN NEW.lastmodifieddate IS OLD.lastmodifieddate
BEGIN
    UPDATE contacts SET lastmodifieddate = strftime('%Y-%m-%dT%H:%M:%SZ', 'now') WHERE vid = NEW.vid;
END;
""",
    "erp": """
CREATE TABLE customer (
    customer_number  TEXT NOT NULL PRIMARY KEY,
    first_name       TEXT,
    last_name        TEXT,
    email            TEXT,
    phone            TEXT,
    company_name     TEXT,
    billing_street   TEXT,
    billing_city     TEXT,
    billing_postcode TEXT,
    billing_country  TEXT,
    payment_terms    TEXT,
    credit_limit     NUMERIC,
    is_inactive      TEXT NOT NULL DEFAULT 'F' CHECK (is_inactive IN ('T', 'F')),
    date_created     TEXT DEFAULT (strftime('%Y-%m-%dT%H:%M:%S', 'now')),
    last_modified    TEXT DEFAULT (strftime('%Y-%m-%dT%H:%M:%S', 'now'))
);
CREATE TRIGGER customer_touch AFTER UPDATE ON customer WHEN NEW.last_modified IS OLD.last_modified
BEGIN
    UPDATE customer SET last_modified = strftime('%Y-%m-%dT%H:%M:%S', 'now')
     WHERE customer_number = NEW.customer_number;
END;
""",
}

_COLUMNS = {
    "crm": ("contactid", "firstname", "lastname", "emailaddress1", "telephone1", "jobtitle", "companyname",
            "stage", "statecode", "createdon", "modifiedon", "reconcile_xid"),
    "marketing": ("vid", "email", "firstname", "lastname", "phone", "company", "lifecyclestage",
                  "hs_email_optout", "hs_email_optout_source", "hs_email_optout_timestamp",
                  "last_engagement_at", "createdate", "lastmodifieddate", "crm_contact_guid"),
    "erp": ("customer_number", "first_name", "last_name", "email", "phone", "company_name", "billing_street",
            "billing_city", "billing_postcode", "billing_country", "payment_terms", "credit_limit",
            "is_inactive", "date_created", "last_modified"),
}
_TABLES = {"crm": "contact", "marketing": "contacts", "erp": "customer"}

DEMO_CONFIG = """\
# Demo configuration written by `reconcile demo init` (see docs/demo.md).
# It wires the three generated SQLite systems into one warehouse; every key is described in
# docs/configuration.md.
version: 1
warehouse: warehouse/reconcile.duckdb      # relative to this file
schedule: "0 2 * * *"
load:
  mode: apply                              # a new config defaults to dry_run; the demo writes back
defaults:
  phone_region: US
systems:
  crm:
    url: sqlite:///systems/crm.db          # relative SQLite paths resolve against this file's folder
    creates_identity: true
    xid_column: reconcile_xid
  marketing:
    url: sqlite:///systems/marketing.db
    unique: [email]
    writes: {create: true}                 # reconcile may create contacts here for eligible CRM contacts
  erp:
    url: sqlite:///systems/erp.db
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
          company: {column: companyname, transform: trim}
          lifecycle: {column: stage, transform: {map: {Lead: lead, Prospect: lead, Customer: customer}}}
          active: {column: statecode, transform: {map: {"0": true, "1": false}}}
      marketing:
        table: contacts
        key: vid
        modified_at: lastmodifieddate
        external_ids: {crm: crm_contact_guid}   # a HubSpot property holding the CRM GUID: a stored ID
        fields:
          email: {column: email, transform: email}
          first_name: {column: firstname, transform: trim}
          last_name: {column: lastname, transform: trim}
          phone: {column: phone, transform: phone}
          company: {column: company, transform: trim}
          lifecycle: {column: lifecyclestage, transform: {map: {subscriber: subscriber, lead: lead, marketingqualifiedlead: lead, customer: customer}}}
          email_opt_out: {column: hs_email_optout, transform: {map: {"0": false, "1": true}}}
          email_opt_out_at: hs_email_optout_timestamp
      erp:
        table: customer
        key: customer_number
        modified_at: last_modified
        fields:
          email: {column: email, transform: email}
          first_name: {column: first_name, transform: trim}
          last_name: {column: last_name, transform: trim}
          phone: {column: phone, transform: phone}
          company: {column: company_name, transform: trim}
          billing_city: {column: billing_city, transform: trim}
          active: {column: is_inactive, transform: {map: {"F": true, "T": false}}}
    fields:
      email:      {owner: crm}
      first_name: {owner: crm, send_to: [marketing, erp]}
      last_name:  {owner: crm, send_to: [marketing, erp]}
      phone:      {owner: marketing, fallback: [crm], send_to: [crm]}
      company:    {owner: crm, fallback: [erp], send_to: [marketing]}
      lifecycle:  {owner: crm, send_to: [marketing]}
      active:     {owner: crm, type: boolean}
      email_opt_out: {owner: marketing, type: boolean}
      email_opt_out_at: {owner: marketing, type: timestamp}
      billing_city: {owner: erp}
    eligibility:
      marketing: "email is not null and active"
      erp: "lifecycle = 'customer'"
    gates:
      changes:                               # the demo's first night fixes many records at once; a real
        create: {max_share: 0.5}             # deployment keeps the conservative defaults (creates 20%,
        update: {max_share: 0.5}             # updates 10%, links 20%) and approves big first loads by hand
        link: {max_share: 1}                 # night 1 stores the xid in every CRM record
    match:                                   # identity rules, tried in order after stored IDs
      - name: email
        fields: [email]                      # exact, one-to-one, never when the names contradict it
      - name: name_company_phone
        type: probabilistic                  # Fellegi-Sunter model trained on the data (docs/identity.md)
        fields: [first_name, last_name, company, phone]
        exact: [phone]
        block_on: [phone, [first_name, last_name], [last_name, company], [first_name, company]]
    identity:
      link_threshold: 0.999                  # match probability that links automatically
      review_threshold: 0.9                  # from here to link_threshold: a candidate item for people
"""


# --- small value helpers -------------------------------------------------------------------------

def _crm_ts(t: datetime) -> str:
    return t.isoformat(" ")


def _mkt_ts(t: datetime) -> str:
    return t.isoformat() + "Z"


def _erp_ts(t: datetime) -> str:
    return t.isoformat()


def _fold(text: str) -> str:
    """ASCII email-local-part form of a name: 'Siobhán' -> 'siobhan', "O'Brien" -> 'obrien'."""
    text = unicodedata.normalize("NFKD", text.translate(_FOLD))
    return "".join(c for c in text if c.isascii() and (c.isalnum() or c == "-")).lower()


def _title_email(email: str) -> str:
    """'anna.berg@example.com' -> 'Anna.Berg@Example.com' (how people type into a CRM)."""
    local, domain = email.split("@")
    label, _, rest = domain.partition(".")
    return ".".join(p.capitalize() for p in local.split(".")) + "@" + label.capitalize() + "." + rest


def _typo(name: str, rng: random.Random) -> str:
    """Swap two adjacent letters near the end ('Nowakowska' -> 'Nowakowksa'); double one if too short."""
    spots = [i for i in range(max(1, len(name) - 4), len(name) - 1) if name[i] != name[i + 1]]
    if not spots:
        return name + name[-1]
    i = rng.choice(spots)
    return name[:i] + name[i + 1] + name[i] + name[i + 2:]


@dataclass(slots=True)
class _Phone:
    country: str  # 'US' or 'GB'
    parts: tuple[str, ...]  # US: (area, exchange, line); GB: (area and exchange, line)

    def fmt(self, style: str) -> str:
        if self.country == "US":
            a, e, n = self.parts
            return {
                "intl": f"+1 {a}-{e}-{n}", "paren": f"({a}) {e}-{n}", "paren_space": f"({a}) {e} {n}",
                "digits": f"{a}{e}{n}", "dots": f"{a}.{e}.{n}", "zero_zero": f"001 {a} {e} {n}",
            }[style]
        p, n = self.parts
        return {
            "intl": f"+44 {p} {n}", "compact": "+44" + p.replace(" ", "") + n, "zero_zero": f"0044 {p} {n}",
        }[style]


# Phone styles people use in each system (the same number, typed differently).
_PHONE_STYLES = {
    ("crm", "US"): (("intl", "paren", "dots"), (4, 4, 2)),
    ("marketing", "US"): (("digits", "intl", "paren_space"), (5, 3, 2)),
    ("erp", "US"): (("paren_space", "intl", "zero_zero"), (45, 35, 20)),
    ("crm", "GB"): (("intl",), (1,)),
    ("marketing", "GB"): (("compact",), (1,)),
    ("erp", "GB"): (("zero_zero", "intl"), (1, 1)),
}


class _Pools:
    """Where first names, surnames and companies are drawn from, for a population of `people`.

    Below _TAIL_FROM people exactly the built-in lists (a draw is one `rng.choice`, so small demos stay
    byte-identical). From there on each list is the head of a pool with a tail of invented entries (see
    _TAIL), as in real data: a few common surnames and big employers, then a long tail. The tails do
    not depend on the seed, and a larger population keeps a smaller one's tail and adds to it.
    """

    def __init__(self, people: int) -> None:
        big = people >= _TAIL_FROM
        self.common_name_rate = _P_COMMON_NAME / 10 if big else _P_COMMON_NAME
        join = "".join
        self.first = self._pool(names.FIRST_NAMES, names.FIRST_NAME_PARTS, "first", big and people, join)
        self.last = self._pool(names.LAST_NAMES, names.SURNAME_PARTS, "last", big and people, join)
        self.company = self._pool(names.COMPANIES, names.COMPANY_PARTS, "company", big and people,
                                  _invented_company)

    @staticmethod
    def _pool(head: tuple, parts: tuple, kind: str, people: int, build) -> tuple[tuple, tuple, float]:
        """(head, tail, share of draws from the head); the tail is the first n of one fixed shuffle of all
        combinations of `parts` that are not in the head."""
        if not people:
            return head, (), 1.0
        head_share, per_entry, smallest = _TAIL[kind]
        taken = {h if isinstance(h, str) else h[0] for h in head}
        combos = [c for c in dict.fromkeys(build(p) for p in itertools.product(*parts))
                  if (c if isinstance(c, str) else c[0]) not in taken]
        random.Random(f"reconcile-demo-{kind}").shuffle(combos)
        return head, tuple(combos[:max(smallest, people // per_entry)]), head_share

    @staticmethod
    def draw(rng: random.Random, pool: tuple[tuple, tuple, float]):
        head, tail, head_share = pool
        if not tail or rng.random() < head_share:
            return rng.choice(head)
        return rng.choice(tail)


def _invented_company(parts: tuple[str, ...]) -> tuple[str, str]:
    """('Amber', 'Bay', 'Dental') -> ('Amber Bay Dental', 'amber-bay-dental.example.com')."""
    words = [w for w in parts if w]
    return " ".join(words), "-".join(_fold(w) for w in words) + ".example.com"


@dataclass(slots=True)
class _Person:
    pid: str
    first: str
    last: str
    email: str | None  # canonical: trimmed, lowercase
    company: tuple[str, str] | None  # (name, domain)
    phone: _Phone
    city: tuple
    born: datetime  # first contact with the business


_AUTO = object()  # "choose at random" (None means NULL)


class _Builder:
    """Accumulates rows for the three systems; ids that follow creation order are assigned at the end."""

    def __init__(self, rng: random.Random, pools: _Pools) -> None:
        self.rng = rng
        self.pools = pools
        self.crm: list[tuple] = []
        self.mkt: list[tuple] = []  # (createdate, seq, row without vid, pid)
        self.erp: list[tuple] = []  # (date_created, seq, row without number, pid)
        self.used_emails: set[str] = set()

    # -- people ---------------------------------------------------------------------------------

    def random_time(self, lo_days: float, hi_days: float) -> datetime:
        """A whole-second instant between hi_days and lo_days before BASE."""
        return BASE - timedelta(seconds=self.rng.randrange(int(lo_days * _DAY), int(hi_days * _DAY)))

    def after(self, t: datetime, lo_days: float, hi_days: float) -> datetime:
        """t plus a random offset, but never later than one hour before BASE."""
        u = t + timedelta(seconds=self.rng.randrange(int(lo_days * _DAY), int(hi_days * _DAY) + 1))
        return min(u, BASE - timedelta(hours=1))

    def until_base(self, t: datetime) -> datetime:
        """A modified time between t and BASE."""
        return t + timedelta(seconds=int(self.rng.random() * (BASE - t).total_seconds() * 0.999))

    def unique_email(self, local: str, domain: str) -> str:
        email, n = f"{local}@{domain}", 1
        while email in self.used_emails:
            n += 1
            email = f"{local}{n}@{domain}"
        self.used_emails.add(email)
        return email

    def new_person(self, pid: str, last: str | None = None, has_email: bool = True) -> _Person:
        rng = self.rng
        first = self.first_name()
        last = last or _Pools.draw(rng, self.pools.last)
        company = self.company() if rng.random() < 0.85 else None
        if rng.random() < _P_UK:
            city = rng.choice(names.UK_CITIES)
            phone = _Phone("GB", (city[2], f"{rng.randrange(1000):04d}"))
        else:
            city = rng.choice(names.US_CITIES)
            exchange = rng.randrange(200, 1000)
            while exchange % 100 == 11 or exchange == 555:  # N11 and 555 exchanges are not real numbers
                exchange = rng.randrange(200, 1000)
            phone = _Phone("US", (rng.choice(city[3]), str(exchange), f"{rng.randrange(10000):04d}"))
        email = None
        if has_email:
            f, l = _fold(first), _fold(last)
            local = rng.choices((f"{f}.{l}", f"{f[0]}{l}", f"{f}{l}", f"{f}_{l}"), (6, 2, 1, 1))[0]
            domain = company[1] if company and rng.random() < 0.7 else rng.choice(names.PERSONAL_DOMAINS)
            email = self.unique_email(local, domain)
        return _Person(pid, first, last, email, company, phone, city, self.random_time(7, 3 * 365))

    def first_name(self) -> str:
        return _Pools.draw(self.rng, self.pools.first)

    def company(self) -> tuple[str, str]:
        return _Pools.draw(self.rng, self.pools.company)

    def phone_for(self, system: str, p: _Person) -> str:
        styles, weights = _PHONE_STYLES[(system, p.phone.country)]
        return p.phone.fmt(self.rng.choices(styles, weights)[0])

    # -- rows -----------------------------------------------------------------------------------

    def crm_row(self, p: _Person, *, created: datetime | None = None, modified: datetime | None = None,
                email=_AUTO, phone=_AUTO, stage: str | None = None, statecode: int | None = None) -> str:
        rng = self.rng
        created = created or self.after(p.born, 0, 20)
        modified = modified or self.until_base(created)
        if email is _AUTO:
            email = p.email
            if email is not None:
                r = rng.random()
                if r < 0.25:
                    email = _title_email(email)
                elif r < 0.35:
                    email = f" {_title_email(email) if r < 0.3 else email} "
                elif r < 0.4:
                    local, domain = email.split("@")
                    email = f"{local}@{domain.upper()}"
        if phone is _AUTO:
            phone = self.phone_for("crm", p) if rng.random() < 0.9 else None
        if stage is None:
            stage = rng.choice(("Lead", "Prospect", "Customer"))
        if statecode is None:
            statecode = 1 if rng.random() < 0.04 else 0
        guid = str(uuid.UUID(int=rng.getrandbits(128), version=4))
        title = rng.choice(names.JOB_TITLES) if rng.random() < 0.85 else None
        self.crm.append(((guid, p.first, p.last, email, phone, title,
                          p.company[0] if p.company else None, stage, statecode,
                          _crm_ts(created), _crm_ts(modified), None), p.pid))
        return guid

    def mkt_row(self, p: _Person, *, created: datetime | None = None, modified: datetime | None = None,
                email=_AUTO, phone=_AUTO, lifecycle: str | None = None, guid: str | None = None,
                optout_source: str | None = None, first: str | None = None, last: str | None = None,
                company=_AUTO) -> None:
        rng = self.rng
        created = created or self.after(p.born, 0, 20)
        modified = modified or self.until_base(created)
        if email is _AUTO:
            email = p.email  # HubSpot stores emails lowercased
        if phone is _AUTO:
            phone = self.phone_for("marketing", p) if rng.random() < 0.6 else None
        if company is _AUTO:
            company = p.company[0] if p.company and rng.random() < 0.85 else None
        if first is None and last is None and rng.random() < 0.05:
            first, last = p.first.lower(), p.last.lower()  # typed into a web form
        if optout_source is None and rng.random() < 0.07:
            optout_source = rng.choice(("unsubscribe link", "import", "CRM sync"))
        optout_at = None
        if optout_source:
            optout_at = created + (modified - created) * rng.random()
            optout_at = _mkt_ts(optout_at.replace(microsecond=0))
        engaged = None
        if rng.random() < 0.75:  # engagement updates the record, so it is never after lastmodifieddate
            engaged = _mkt_ts(created + timedelta(seconds=int(rng.random() * (modified - created).total_seconds())))
        row = (email, first or p.first, last or p.last, phone, company, lifecycle or "lead",
               1 if optout_source else 0, optout_source or None, optout_at, engaged,
               _mkt_ts(created), _mkt_ts(modified), guid)
        self.mkt.append((created, len(self.mkt), row, p.pid))

    def erp_row(self, p: _Person, *, created: datetime | None = None, modified: datetime | str | None = None,
                email=_AUTO, phone=_AUTO, inactive: bool | None = None, last: str | None = None,
                first: str | None = None, company=_AUTO) -> None:
        """An ERP customer; `modified` may be a raw string to plant an unparseable value."""
        rng = self.rng
        created = created or self.after(p.born, 7, 300)
        modified = modified or self.until_base(created)
        if isinstance(modified, datetime):
            modified = _erp_ts(modified)
        if email is _AUTO:
            email = None
            if p.email and rng.random() < 0.6:
                email = p.email if rng.random() < 0.75 else _title_email(p.email)
        if phone is _AUTO:
            phone = self.phone_for("erp", p) if rng.random() < 0.95 else None
        if company is _AUTO:
            company = p.company[0] if p.company else None
        if inactive is None:
            inactive = rng.random() < 0.06
        street = f"{rng.randrange(1, 9999)} {rng.choice(names.STREETS)}"
        if p.phone.country == "GB":
            city, postcode, country = p.city[0], p.city[1], "GB"
        else:
            city, postcode, country = p.city[0], f"{p.city[2]}{rng.randrange(100):02d}", "US"
        terms = rng.choice(("Net 15", "Net 30", "Net 30", "Net 45", "Net 60", "Due on receipt"))
        limit = rng.choice((0, 1000, 2500, 5000, 10000, 25000, 50000))
        row = (first or p.first, last or p.last, email, phone, company, street, city, postcode, country, terms, limit,
               "T" if inactive else "F", _erp_ts(created), modified)
        self.erp.append((created, len(self.erp), row, p.pid))

    # -- finishing ------------------------------------------------------------------------------

    def finished_rows(self) -> dict[str, list[tuple[tuple, str]]]:
        """Rows per system as (row, person_id); vids and customer numbers follow creation order."""
        mkt, vid = [], 1000
        for _, _, row, pid in sorted(self.mkt, key=lambda r: (r[0], r[1])):
            vid += self.rng.randrange(1, 4)  # gaps: contacts deleted over the years
            mkt.append(((vid, *row), pid))
        erp = [((f"CUST-{n:05d}", *row), pid)
               for n, (_, _, row, pid) in enumerate(sorted(self.erp, key=lambda r: (r[0], r[1])), start=1)]
        return {"crm": self.crm, "marketing": mkt, "erp": erp}


# --- the people ------------------------------------------------------------------------------------

def _special_people(b: _Builder) -> None:
    """The fixed, documented examples (person ids P000001..P000014, see answer_key.SITUATIONS).

    Their emails are reserved so random people never reuse them. optout_source="" means "not opted
    out" (None would let chance decide).
    """

    def day(d: int, h: int = 0, m: int = 0, s: int = 0) -> datetime:
        """Midnight d days before BASE, plus a time of day."""
        return BASE - timedelta(days=d) + timedelta(hours=h, minutes=m, seconds=s)

    def person(*args) -> _Person:
        p = _Person(*args)
        if p.email:
            b.used_emails.add(p.email)
        return p

    sf = ("San Francisco", "CA", "941", ("415",))

    # Email case/whitespace and phone format variants, in all three systems.
    p = person("P000001", "Anna", "Berg", "anna.berg@example.com", ("Northwind Traders", "northwind-traders.example.com"),
                _Phone("US", ("415", "555", "0134")), sf, day(500))
    g = b.crm_row(p, created=day(500, 9, 30), modified=day(40, 11), email=" Anna.Berg@Example.com ",
                  phone="+1 415-555-0134", stage="Customer", statecode=0)
    b.mkt_row(p, created=day(499, 14), modified=day(30, 8), phone="4155550134", lifecycle="customer", guid=g,
              optout_source="", company="Northwind Traders", first="Anna", last="Berg")
    b.erp_row(p, created=day(420, 10), modified=day(60, 16), email="Anna.Berg@example.com",
              phone="(415) 555 0134", inactive=False)
    # UK number in three international spellings.
    p = person("P000002", "Oliver", "Hughes", "oliver.hughes@litware.example.com", ("Litware", "litware.example.com"),
                _Phone("GB", ("20 7946", "0018")), names.UK_CITIES[0], day(700))
    g = b.crm_row(p, created=day(700, 10), modified=day(90, 9), phone="+44 20 7946 0018",
                  email="oliver.hughes@litware.example.com", stage="Customer", statecode=0)
    b.mkt_row(p, created=day(698, 12), modified=day(20, 7), phone="+442079460018", lifecycle="customer", guid=g,
              optout_source="", company="Litware", first="Oliver", last="Hughes")
    b.erp_row(p, created=day(650, 15), modified=day(100, 10), email=None, phone="0044 20 7946 0018",
              inactive=False)
    # Shared mailbox: two people, one address; marketing (unique email) holds only Maria, synced earlier.
    dental = ("Brightwater Dental", "brightwater-dental.example.com")
    sd = ("San Diego", "CA", "921", ("619",))
    maria = person("P000003", "Maria", "Schmidt", "info@brightwater-dental.example.com", dental,
                    _Phone("US", ("619", "555", "0121")), sd, day(600))
    tom = person("P000004", "Tom", "Becker", "info@brightwater-dental.example.com", dental,
                  _Phone("US", ("619", "555", "0122")), sd, day(200))
    g = b.crm_row(maria, created=day(600, 10), modified=day(240, 15), email="info@brightwater-dental.example.com",
                  phone="(619) 555-0121", stage="Prospect", statecode=0)
    b.mkt_row(maria, created=day(600, 10, 5), modified=day(240, 15, 10), phone="6195550121",
              lifecycle="marketingqualifiedlead", guid=g, optout_source="", company="Brightwater Dental",
              first="Maria", last="Schmidt")
    b.crm_row(tom, created=day(200, 9), modified=day(12, 16, 45), email="Info@Brightwater-Dental.example.com ",
              phone="(619) 555-0122", stage="Lead", statecode=0)
    # One person entered twice in CRM (second time with two digits swapped); marketing not linked.
    p = person("P000005", "Siobhán", "O'Brien", "siobhan.obrien@example.org", ("Proseware", "proseware.example.com"),
                _Phone("US", ("617", "555", "0148")), ("Boston", "MA", "021", ("617",)), day(650))
    b.crm_row(p, created=day(650, 9, 12), modified=day(400, 10), email="siobhan.obrien@example.org",
              phone="+1 617-555-0148", stage="Prospect", statecode=0)
    b.crm_row(p, created=day(320, 14, 3), modified=day(95, 17, 20), email="siobhan.obrien@example.org",
              phone="(617) 555-0184", stage="Prospect", statecode=0)
    b.mkt_row(p, created=day(649, 8), modified=day(50, 12), phone="6175550148", lifecycle="marketingqualifiedlead",
              guid=None, optout_source="", company="Proseware", first="Siobhán", last="O'Brien")
    # Webinar signup in marketing, then the same person typed into CRM by hand a few hours later.
    p = person("P000006", "Dana", "Whitfield", "dana.whitfield@lumen-analytics.example.com",
                ("Lumen Analytics", "lumen-analytics.example.com"), _Phone("US", ("512", "555", "0163")),
                ("Austin", "TX", "787", ("512",)), day(44))
    b.mkt_row(p, created=day(44, 15, 2, 37), modified=day(44, 15, 4, 10), phone=None, lifecycle="subscriber",
              guid=None, optout_source="", company="Lumen Analytics", first="Dana", last="Whitfield")
    b.crm_row(p, created=day(44, 19, 41, 5), modified=day(44, 19, 41, 5),
              email="Dana.Whitfield@Lumen-Analytics.example.com", phone="(512) 555-0163", stage="Lead", statecode=0)
    # ERP customer with a surname typo and no email; same company and phone.
    p = person("P000007", "Katarzyna", "Nowakowska", "katarzyna.nowakowska@vistula-logistics.example.com",
                ("Vistula Logistics", "vistula-logistics.example.com"), _Phone("US", ("312", "555", "0187")),
                ("Chicago", "IL", "606", ("312",)), day(800))
    g = b.crm_row(p, created=day(800, 11), modified=day(150, 9), email="katarzyna.nowakowska@vistula-logistics.example.com",
                  phone="+1 312-555-0187", stage="Customer", statecode=0)
    b.mkt_row(p, created=day(799, 16), modified=day(70, 10), phone="3125550187", lifecycle="customer", guid=g,
              optout_source="", company="Vistula Logistics", first="Katarzyna", last="Nowakowska")
    b.erp_row(p, created=day(760, 13), modified=day(110, 14), email=None, phone="(312) 555 0187",
              last="Nowakowsak", inactive=False)
    # A former customer: inactive in CRM and in ERP.
    p = person("P000008", "Jürgen", "Köhler", "juergen.koehler@mueller-soehne.example.com",
                ("Müller & Söhne Maschinenbau", "mueller-soehne.example.com"), _Phone("US", ("212", "555", "0175")),
                ("New York", "NY", "100", ("212",)), day(1000))
    b.crm_row(p, created=day(1000, 10), modified=day(180, 12), email="juergen.koehler@mueller-soehne.example.com",
              phone="(212) 555-0175", stage="Customer", statecode=1)
    b.erp_row(p, created=day(950, 10), modified=day(181, 9), email="juergen.koehler@mueller-soehne.example.com",
              phone="001 212 555 0175", inactive=True)
    # Opt-outs, one per source.
    for pid, first, last, email, source, in_crm in (
        ("P000009", "Zoë", "Lefèvre", "zoe.lefevre@example.net", "unsubscribe link", True),
        ("P000010", "Ayşe", "Yılmaz", "ayse.yilmaz@bosphorus-textiles.example.com", "import", False),
        ("P000011", "Kwame", "Mensah", "kwame.mensah@example.com", "CRM sync", True),
    ):
        p = person(pid, first, last, email, None, _Phone("US", ("303", "555", f"01{pid[-2:]}")),
                    ("Denver", "CO", "802", ("303",)), day(400))
        g = b.crm_row(p, created=day(400, 10), modified=day(100, 10), email=email, phone=None, stage="Lead",
                      statecode=0) if in_crm else None
        b.mkt_row(p, created=day(400, 11), modified=day(25, 9, 30), phone=None, lifecycle="lead", guid=g,
                  optout_source=source, company=None, first=first, last=last)
    # Bad rows that extraction must quarantine (exactly one per system).
    p = person("P000012", "Mike", "Jones", None, None, _Phone("US", ("404", "555", "0112")),
                ("Atlanta", "GA", "303", ("404",)), day(300))
    b.crm_row(p, created=day(300, 10), modified=day(10, 10), email="mike.jones(at)example.com",
              phone="(404) 555-0112", stage="Lead", statecode=0)
    p = person("P000013", "Priya", "Raman", None, None, _Phone("US", ("206", "555", "0113")),
                ("Seattle", "WA", "981", ("206",)), day(90))
    b.mkt_row(p, created=day(90, 13), modified=day(89, 13), email="no-email-given", phone=None,
              lifecycle="subscriber", guid=None, optout_source="", company=None, first="Priya", last="Raman")
    p = person("P000014", "Henrik", "Larsen", "henrik.larsen@fjord-outfitters.example.com",
                ("Fjord Outfitters", "fjord-outfitters.example.com"), _Phone("US", ("503", "555", "0114")),
                ("Portland", "OR", "972", ("503",)), day(250))
    b.erp_row(p, created=day(250, 10), modified="31/02/2026 25:61", email="henrik.larsen@fjord-outfitters.example.com",
              phone="(503) 555 0114", inactive=False)

    # Hard cases for identity resolution.
    # A shared mailbox where only one of the two people is in the CRM: Liam reads Grace's studio inbox and
    # signed up for the newsletter with it. Same email, different first and last name: not one person.
    yoga = ("Harbor Yoga", "harbor-yoga.example.com")
    sea = ("Seattle", "WA", "981", ("206",))
    grace = person("P000015", "Grace", "Okafor", "info@harbor-yoga.example.com", yoga,
                   _Phone("US", ("206", "555", "0115")), sea, day(380))
    liam = person("P000016", "Liam", "Walsh", "info@harbor-yoga.example.com", yoga,
                  _Phone("US", ("206", "555", "0116")), sea, day(120))
    b.crm_row(grace, created=day(380, 10), modified=day(60, 10), email="info@harbor-yoga.example.com",
              phone="(206) 555-0115", stage="Customer", statecode=0)
    b.mkt_row(liam, created=day(120, 18), modified=day(30, 9), phone=None, lifecycle="subscriber", guid=None,
              optout_source="", company="Harbor Yoga", first="Liam", last="Walsh")
    # A nickname: William in the CRM, Bill in marketing (same email) and in the ERP (same phone, no email).
    p = person("P000017", "William", "Turner", "william.turner@contoso-freight.example.com",
               ("Contoso Freight", "contoso-freight.example.com"), _Phone("US", ("713", "555", "0117")),
               ("Houston", "TX", "770", ("713",)), day(540))
    b.crm_row(p, created=day(540, 9), modified=day(80, 9), email="william.turner@contoso-freight.example.com",
              phone="+1 713-555-0117", stage="Customer", statecode=0)
    b.mkt_row(p, created=day(539, 12), modified=day(35, 12), phone=None, lifecycle="customer", guid=None,
              optout_source="", company="Contoso Freight", first="Bill", last="Turner")
    b.erp_row(p, created=day(500, 10), modified=day(90, 10), email=None, phone="(713) 555 0117", first="Bill",
              inactive=False)
    # First and last name swapped in the ERP (an import that mixed up the columns); no email there.
    p = person("P000018", "Mei", "Chen", "mei.chen@fabrikam.example.com", ("Fabrikam", "fabrikam.example.com"),
               _Phone("US", ("408", "555", "0118")), ("San Jose", "CA", "951", ("408",)), day(610))
    b.crm_row(p, created=day(610, 9), modified=day(70, 9), email="mei.chen@fabrikam.example.com",
              phone="(408) 555-0118", stage="Customer", statecode=0)
    b.erp_row(p, created=day(600, 9), modified=day(75, 9), email=None, phone="(408) 555 0118", first="Chen",
              last="Mei", inactive=False)
    # Changed job: the CRM holds the new company and email, marketing the old ones (no CRM id stored).
    p = person("P000019", "Rafael", "Ortiz", "rafael.ortiz@tailspin-toys.example.com",
               ("Tailspin Toys", "tailspin-toys.example.com"), _Phone("US", ("305", "555", "0119")),
               ("Miami", "FL", "331", ("305",)), day(900))
    b.crm_row(p, created=day(900, 9), modified=day(20, 9), email="rafael.ortiz@tailspin-toys.example.com",
              phone="(305) 555-0119", stage="Prospect", statecode=0)
    b.mkt_row(p, created=day(899, 10), modified=day(300, 10), email="rortiz@adventure-works.example.com",
              phone="3055550119", lifecycle="lead", guid=None, optout_source="", company="Adventure Works",
              first="Rafael", last="Ortiz")
    # A common name: another Anna Berg, an ERP-only customer elsewhere. Sharing a name is not being one.
    p = person("P000020", "Anna", "Berg", None, ("Blue Yonder Airlines", "blue-yonder.example.com"),
               _Phone("US", ("702", "555", "0120")), ("Las Vegas", "NV", "891", ("702",)), day(300))
    b.erp_row(p, created=day(300, 9), modified=day(40, 9), email=None, phone="(702) 555 0120", inactive=False)


def _random_people(b: _Builder, start: int, people: int) -> None:
    rng = b.rng
    n = start
    while n <= people:
        cat = rng.choices(_CATEGORIES, _CATEGORY_WEIGHTS)[0]
        pid = f"P{n:06d}"
        n += 1
        if cat == "crm+mkt" and n <= people and rng.random() < _P_SHARED_MAILBOX:
            # A family address: two people, both in CRM; marketing can hold the address only once.
            p = b.new_person(pid, has_email=False)
            p.email = b.unique_email(f"{_fold(p.last)}.family", rng.choice(names.PERSONAL_DOMAINS))
            partner = b.new_person(f"P{n:06d}", last=p.last, has_email=False)
            while partner.first == p.first:
                partner.first = b.first_name()
            partner.email = p.email
            n += 1
            g = b.crm_row(p, stage=rng.choice(("Lead", "Prospect")))
            b.mkt_row(p, lifecycle=rng.choice(("lead", "marketingqualifiedlead")), guid=g)
            b.crm_row(partner, stage="Lead")
            continue
        p = b.new_person(pid, has_email=cat != "crm" or rng.random() < 0.95)
        if rng.random() < b.pools.common_name_rate:
            p.first, p.last = rng.choice(names.COMMON_NAMES)
        if cat == "crm" and p.company and n <= people and rng.random() < _P_SHARED_ONE_IN_CRM:
            # A shared mailbox with one person in the CRM and a colleague in marketing only.
            p.email = b.unique_email("info", p.company[1])
            colleague = b.new_person(f"P{n:06d}", has_email=False)
            colleague.email, colleague.company = p.email, p.company
            n += 1
            b.crm_row(p, stage=rng.choice(("Lead", "Prospect", "Customer")))
            b.mkt_row(colleague, lifecycle="subscriber", guid=None)
            continue
        if cat == "mkt":
            b.mkt_row(p, lifecycle=rng.choice(("subscriber", "subscriber", "subscriber", "lead")))
            continue
        if cat == "erp":
            b.erp_row(p)
            continue
        if cat == "crm+mkt" and rng.random() < _P_WEBINAR_SAME_DAY:
            signup = b.after(p.born, 0, 5).replace(hour=rng.randrange(8, 16))  # at most BASE - 2 days
            b.mkt_row(p, created=signup, lifecycle="subscriber", guid=None)
            manual = signup + timedelta(seconds=rng.randrange(2 * 3600, 6 * 3600))
            b.crm_row(p, created=manual, email=_title_email(p.email), stage="Lead", statecode=0)
            continue
        customer = cat in ("all", "crm+erp")
        stage = ("Customer" if rng.random() < 0.9 else "Prospect") if customer else (
            rng.choice(("Lead", "Lead", "Prospect")) if cat == "crm+mkt" else None)
        statecode = 1 if rng.random() < 0.04 else 0
        g = b.crm_row(p, stage=stage, statecode=statecode)
        if rng.random() < _P_TWICE_IN_CRM:
            first_row = b.crm[-1][0]
            b.crm_row(p, created=b.after(p.born, 30, 400), email=first_row[3], stage=stage, statecode=0)
        if cat in ("crm+mkt", "all"):
            if customer:
                lifecycle = "customer" if rng.random() < 0.8 else "marketingqualifiedlead"
            else:
                lifecycle = "lead" if stage == "Lead" else "marketingqualifiedlead"
            r = rng.random()
            if r < _P_CHANGED_EMAIL and p.email:
                local, domain = p.email.split("@")
                b.mkt_row(p, lifecycle=lifecycle, guid=None, email=b.unique_email(local, "old-" + domain),
                          company=b.company()[0])
            elif r < _P_CHANGED_EMAIL + _P_NICKNAME and p.first in names.NICKNAMES:
                b.mkt_row(p, lifecycle=lifecycle, guid=g if rng.random() < 0.7 else None,
                          first=names.NICKNAMES[p.first], last=p.last)
            else:
                b.mkt_row(p, lifecycle=lifecycle, guid=g if rng.random() < 0.7 else None)
        if customer:
            inactive = rng.random() < (0.7 if statecode else 0.05)
            if cat == "all" and rng.random() < _P_ERP_TYPO:
                b.erp_row(p, email=None, last=_typo(p.last, rng), inactive=inactive)
            elif rng.random() < _P_SWAPPED:
                b.erp_row(p, email=None, first=p.last, last=p.first, inactive=inactive)
            else:
                b.erp_row(p, inactive=inactive)


# --- writing ---------------------------------------------------------------------------------------

def _write_db(path: Path, system: str, rows: list[tuple[tuple, str]]) -> None:
    """Build the database beside its final name and move it into place (a re-run never sees half a file)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    con = sqlite3.connect(tmp)
    try:
        con.executescript(_DDL[system])
        cols = _COLUMNS[system]
        sql = f"INSERT INTO {_TABLES[system]} ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})"
        with con:  # one transaction for the whole table
            con.executemany(sql, (row for row, _ in rows))
    except BaseException:
        con.close()
        tmp.unlink(missing_ok=True)
        raise
    con.close()
    os.replace(tmp, path)


def init_demo(directory: str | Path, people: int = 200, seed: int = 7, force: bool = False,
              api_port: int | None = None) -> dict:
    """Write DIR/reconcile.yaml, DIR/systems/{crm,marketing,erp}.db (SQLite) and DIR/answer_key.csv.

    Deterministic for (people, seed): the same inputs give a byte-identical answer key and identical
    database rows. Refuses with FileExistsError if the config, a database or the answer key already
    exists, unless force=True (then they are replaced; anything else in DIR, such as a warehouse, is
    left alone). With `api_port`, the config reaches marketing through the HubSpot-like API on that port of
    127.0.0.1 (served from systems/marketing.db by demo/hubspot_server.py). Returns {"config", "systems": {name: path}, "answer_key", "records": {system: n},
    "people"} with paths as strings.
    """
    if isinstance(people, bool) or not isinstance(people, int) or people < MIN_PEOPLE:
        raise ValueError(f"people must be an integer >= {MIN_PEOPLE} so every demo situation fits, got {people!r}")
    root = Path(directory)
    config_path, key_path = root / CONFIG_FILE, root / ANSWER_KEY_FILE
    db_paths = {name: root / rel for name, rel in DB_FILES.items()}
    if not force:
        existing = [str(p) for p in (config_path, *db_paths.values(), key_path) if p.exists()]
        if existing:
            raise FileExistsError(
                f"refusing to overwrite existing demo files: {', '.join(existing)} "
                "(choose another directory, or pass --force to replace them)")

    builder = _Builder(random.Random(seed), _Pools(people))
    _special_people(builder)
    _random_people(builder, _SPECIAL_COUNT + 1, people)
    rows = builder.finished_rows()

    (root / "systems").mkdir(parents=True, exist_ok=True)
    for name in SYSTEMS:
        _write_db(db_paths[name], name, rows[name])
    write_answer_key(key_path, ((name, row[0], pid) for name in SYSTEMS for row, pid in rows[name]))
    if api_port is None:
        config_path.write_text(DEMO_CONFIG, encoding="utf-8")
    else:  # marketing behind the local HubSpot-like API (demo/hubspot_server.py) instead of read as SQLite
        from .hubspot_server import api_demo_config

        config_path.write_text(api_demo_config(DEMO_CONFIG, api_port), encoding="utf-8")
    return {
        "config": str(config_path),
        "systems": {name: str(path) for name, path in db_paths.items()},
        "answer_key": str(key_path),
        "records": {name: len(rows[name]) for name in SYSTEMS},
        "people": len({pid for name in SYSTEMS for _, pid in rows[name]}),
    }

