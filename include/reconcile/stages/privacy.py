"""Privacy: what an erasure request removes from the warehouse itself, every run, set-based.

Suppression (no golden row, never re-created) happens when the request is recorded (stages/golden.py), and
the systems are anonymised through the plan and the gated load (stages/plan.py, stages/load.py). This step
removes the person's values from what reconcile keeps: staging (current and history), quarantined raw rows,
golden lineage values, planned-change values and review-item details. Keys stay, so every record can still
be followed, and the erasure itself stays auditable. It runs at the end of every run because a record the
systems still hold is re-extracted until its anonymisation has been applied.
"""
from __future__ import annotations

from ..config.models import Config
from ..transforms import quote_ident as q, sql_literal
from ..warehouse import staging_table
from .golden import erased_keys_sql, lineage_table


def _exists(con, schema: str, table: str) -> bool:
    return bool(con.execute("SELECT count(*) FROM information_schema.tables WHERE table_schema = ? AND table_name = ?",
                            [schema, table]).fetchone()[0])


def purge_erased(con, cfg: Config, entity: str) -> dict:
    """Blank every erased person's values in the warehouse. Returns counts of rows touched per place."""
    if not con.execute("SELECT count(*) FROM identity.erasures WHERE entity = ?", [entity]).fetchone()[0]:
        return {}
    ent = cfg.entities[entity]
    con.execute(f"CREATE OR REPLACE TEMP TABLE _erased AS {erased_keys_sql(entity)}")
    touched: dict[str, int] = {}
    con.execute("BEGIN TRANSACTION")
    try:
        for system, source in sorted(ent.sources.items()):
            name = f"{system}__{entity}"
            cols = [f for f in source.fields if ent.fields[f].type == "string"]
            raw = [c for c in dict.fromkeys([m.column for m in source.fields.values()]) if c != source.key]
            sets = ", ".join([f"{q(f)} = NULL" for f in cols] + [f"{q('_raw_' + c)} = NULL" for c in raw])
            for table in (name, f"{name}_history"):
                if not _exists(con, "staging", table) or not sets:
                    continue
                n = con.execute(f"""UPDATE staging.{table} SET {sets}
                                    WHERE _record_key IN (SELECT record_key FROM _erased WHERE system = ?)""",
                                [system]).fetchone()[0]
                touched[f"staging.{table}"] = n
            touched[f"audit.quarantine:{system}"] = con.execute(
                """UPDATE audit.quarantine SET raw = '{"erased": true}'
                   WHERE entity = ? AND system = ? AND record_key IN (SELECT record_key FROM _erased WHERE system = ?)""",
                [entity, system, system]).fetchone()[0]
        if _exists(con, "golden", f"{entity}_lineage"):
            touched["lineage"] = con.execute(
                f"UPDATE {lineage_table(entity)} SET value = NULL WHERE xid IN (SELECT xid FROM _erased) "
                f"AND value IS NOT NULL").fetchone()[0]
        touched["audit.changes"] = con.execute(
            """UPDATE audit.changes SET before_value = NULL, after_value = NULL, before_image = NULL, expected = NULL,
                      after_raw = CASE WHEN operation = 'erase' THEN after_raw END
               WHERE entity = ? AND xid IN (SELECT xid FROM _erased)
                 AND (before_value IS NOT NULL OR after_value IS NOT NULL OR before_image IS NOT NULL
                      OR (operation <> 'erase' AND after_raw IS NOT NULL))""", [entity]).fetchone()[0]
        touched["review.items"] = con.execute(
            """UPDATE review.items i SET details = '{"erased": true}', title = 'erased: ' || i.kind
               WHERE i.entity = ? AND EXISTS (SELECT 1 FROM _erased e WHERE contains(CAST(i.details AS VARCHAR), e.xid)
                                              OR contains(CAST(i.details AS VARCHAR), '"' || e.record_key || '"'))
                 AND CAST(i.details AS VARCHAR) <> '{"erased":true}'""", [entity]).fetchone()[0]
        con.execute("COMMIT")
    except BaseException:
        con.execute("ROLLBACK")
        raise
    return {k: v for k, v in touched.items() if v}
