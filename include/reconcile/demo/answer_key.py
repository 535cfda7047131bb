"""The demo's answer key: which records in the three systems are the same real person.

`answer_key.csv` has the header `system,record_key,person_id`, one row per record of every system,
sorted by system then record_key (as text). Two records share a person_id exactly when they are the
same person. Integration tests use `demo_situations` to find the documented special records without
hard-coding keys that depend on the seed.
"""

from __future__ import annotations

import csv
from collections.abc import Iterable
from pathlib import Path

HEADER = ("system", "record_key", "person_id")

# The fixed examples every demo holds, whatever the seed or size: situation -> person ids.
# Random people start after these, so the ids are stable.
SITUATIONS: dict[str, tuple[str, ...]] = {
    "email_and_phone_variants": ("P000001",),  # Anna Berg, in all three systems
    "uk_phone": ("P000002",),                  # Oliver Hughes, +44 20 7946 0018 spelled three ways
    "shared_mailbox": ("P000003", "P000004"),  # Maria Schmidt and Tom Becker, info@brightwater-dental...
    "twice_in_crm": ("P000005",),              # Siobhán O'Brien, two CRM contacts
    "webinar_same_day": ("P000006",),          # Dana Whitfield, marketing signup then manual CRM entry
    "erp_surname_typo": ("P000007",),          # Katarzyna Nowakowska / ERP 'Nowakowsak', no email
    "inactive": ("P000008",),                  # Jürgen Köhler, statecode 1 and is_inactive 'T'
    "opt_outs": ("P000009", "P000010", "P000011"),  # one per hs_email_optout_source
    "quarantined": ("P000012", "P000013", "P000014"),  # one bad row per system
    # Hard cases for identity resolution (docs/identity.md):
    "shared_mailbox_one_in_crm": ("P000015", "P000016"),  # Grace Okafor (CRM) and Liam Walsh (marketing only)
    "nickname": ("P000017",),                  # William Turner in CRM, "Bill" in marketing and ERP
    "swapped_names": ("P000018",),             # Mei Chen; the ERP has first and last name swapped
    "changed_email_and_company": ("P000019",),  # Rafael Ortiz moved jobs; marketing holds the old email
    "common_name": ("P000020",),               # a second Anna Berg (ERP only): another person
}

SYSTEMS = ("crm", "marketing", "erp")

# Rows extraction must quarantine, per system: exactly the "quarantined" situation's records.
QUARANTINE_EXPECTED = {"crm": 1, "marketing": 1, "erp": 1}


def write_answer_key(path: Path, rows: Iterable[tuple[str, object, str]]) -> None:
    """Write (system, record_key, person_id) rows sorted by system and record_key as text."""
    ordered = sorted((system, str(key), pid) for system, key, pid in rows)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(HEADER)
        writer.writerows(ordered)


def read_answer_key(path: str | Path) -> list[tuple[str, str, str]]:
    """The answer key's rows as (system, record_key, person_id) strings."""
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        if tuple(next(reader)) != HEADER:
            raise ValueError(f"{path}: expected header {','.join(HEADER)}")
        return [tuple(row) for row in reader]


def demo_situations(directory: str | Path) -> dict[str, dict[str, list[str]]]:
    """Record keys of each documented situation in a generated demo, read from its answer key.

    Returns {situation: {"person_ids": [...], "crm": [...], "marketing": [...], "erp": [...]}} with
    keys as text, sorted the way the answer key is.
    """
    by_person: dict[str, list[tuple[str, str]]] = {}
    for system, key, pid in read_answer_key(Path(directory) / "answer_key.csv"):
        by_person.setdefault(pid, []).append((system, key))
    result = {}
    for name, pids in SITUATIONS.items():
        entry = {"person_ids": list(pids), **{s: [] for s in SYSTEMS}}
        for pid in pids:
            for system, key in by_person.get(pid, ()):
                entry[system].append(key)
        for s in SYSTEMS:
            entry[s].sort()
        result[name] = entry
    return result
