"""The plan's unique pre-check: a change that would make a target's unique value appear twice in its
planned state is held (found by equi-joins on the planned changes, never a join on an OR)."""
from __future__ import annotations

import sqlite3

from reconcile.config import load_config

from ..conftest import sqlite_exec
from .test_plan_load import make, night, table, wh


def test_an_update_to_a_value_another_target_record_holds_is_held(tmp_path):
    path = make(tmp_path, create="true")
    path.write_text(path.read_text().replace("email: {owner: crm}", "email: {owner: crm, send_to: [marketing]}"))
    mkt = tmp_path / "systems" / "marketing.db"
    con = sqlite3.connect(mkt)
    with con:  # a marketing contact no CRM contact matches: it keeps its email
        con.execute("INSERT INTO contacts VALUES (4, 'zed@example.com', 'Zed', 'Zorn', NULL, '2026-01-01T09:00:00Z')")
    con.close()
    cfg = load_config(path)
    night(cfg, 1)
    # Cyrus (CRM C, linked to marketing 2) takes the email marketing 4 holds.
    sqlite_exec(tmp_path / "systems" / "crm.db",
                "UPDATE contact SET emailaddress1 = 'zed@example.com' WHERE contactid = 'C'")
    night(cfg, 2)
    held = wh(cfg, """SELECT record_key, operation, status, reason FROM audit.changes
                      WHERE run_id = 'r2' AND target = 'marketing' AND field = 'email'""")
    assert [(k, op, st) for k, op, st, _ in held] == [("2", "update", "held")], held
    assert held[0][3] == "would break the unique email rule of marketing: zed@example.com would be held by 2 records"
    assert table(mkt, "SELECT vid, email FROM contacts WHERE vid IN (2, 4) ORDER BY vid") == [
        (2, "cy@example.com"), (4, "zed@example.com")]
