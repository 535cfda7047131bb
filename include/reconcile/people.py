"""One person across systems: everything held about them (a DSAR answer) and erasure requests.

Called by the CLI (`reconcile lineage`, `reconcile erase`) and exposed in the public face for the UI plugin and
scripts. `person_lineage` reads the published warehouse; `erase_person` writes the working warehouse under its
lock and publishes at once.
"""
from __future__ import annotations

import getpass
import secrets
from datetime import datetime, timezone

from .config import Config
from .errors import ReconcileError


class PersonNotUnique(ReconcileError):
    """An erasure named more than one person (e.g. an email two people share): name each by xid."""


def person_lineage(cfg: Config, entities: list[str], *, email: str | None = None, xid: str | None = None,
                   record: tuple[str, str] | None = None) -> dict:
    """Everything held about a person named by email, xid or record: {"persons": [one report per xid, see
    stages.golden.person_report], "unlinked": [{entity, record}] (records carrying the email, linked to no xid)}."""
    from .stages import golden
    from .warehouse import open_published

    persons, unlinked = [], []
    con = open_published(cfg)
    try:
        for entity in entities:
            found = golden.find_xids(con, cfg, entity, email=email, xid=xid, record=record)
            unlinked += [{"entity": entity, "record": r} for r in found["unlinked"]]
            persons += [golden.person_report(con, cfg, entity, x) for x in found["xids"]]
    finally:
        con.close()
    return {"persons": persons, "unlinked": unlinked}


def erase_person(cfg: Config, entities: list[str], *, reason: str, by: str | None = None,
                 email: str | None = None, xid: str | None = None, now: datetime | None = None) -> dict:
    """Record an erasure request for the one person named by email or xid (suppressed from golden records
    from now on, never re-created), then publish. Idempotent: a second request returns the first with
    `already: true`. Raises ReconcileError when no person matches, PersonNotUnique when several do."""
    from .runner import data_docs_root
    from .stages import golden, privacy
    from .warehouse import open_work, publish

    if not reason.strip():
        raise ReconcileError("an erasure needs a reason (e.g. the DSAR ticket)")
    if by is None:
        try:
            by = getpass.getuser()
        except (KeyError, OSError):
            by = "unknown"
    now = (now or datetime.now(timezone.utc)).astimezone(timezone.utc).replace(tzinfo=None)
    named = f"email {email}" if email is not None else f"xid {xid}"
    matched_by = "email" if email is not None else f"xid:{xid}"  # never the address: erasure keeps no copy
    with open_work(cfg) as con:
        matches = [(e, x) for e in entities for x in golden.find_xids(con, cfg, e, email=email, xid=xid)["xids"]]
        if not matches:
            raise ReconcileError(f"no person found with {named}")
        if len(matches) > 1:
            raise PersonNotUnique(f"{named} names {len(matches)} persons ("
                                  f"{', '.join(f'{e} {x}' for e, x in matches)}); erase each with --xid (and --entity)")
        entity, found = matches[0]
        result = golden.erase(con, entity, found, request_id=f"erase__{now:%Y%m%dT%H%M%SZ}_{secrets.token_hex(2)}",
                              requested_at=now, requested_by=by, reason=reason, matched_by=matched_by)
        # Idempotent: hashes kept once; a repeated request completes one interrupted after golden.erase.
        result["identifiers"] = privacy.record_erasure(con, cfg, entity, found, result["request_id"])
    result["removed"] = privacy.forget(cfg, entity, data_docs_root(cfg))
    if not result["already"] or result["removed"]:
        publish(cfg)
    return result
