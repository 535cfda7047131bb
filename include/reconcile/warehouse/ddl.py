"""DDL of the warehouse's fixed tables (staging tables are created per source by the extract stage).

Schemas name their layer: staging, identity, golden, review, audit. Documented in docs/warehouse.md.
"""
from __future__ import annotations

import functools

SCHEMAS = ("staging", "identity", "golden", "review", "audit")

TABLES = [
    """CREATE TABLE IF NOT EXISTS audit.runs (
        run_id VARCHAR NOT NULL,
        entity VARCHAR NOT NULL,
        status VARCHAR NOT NULL,          -- running | success | dry_run | blocked | awaiting_approval
                                          --   | incomplete | failed (reconcile/report.py)
        run_at TIMESTAMP NOT NULL,        -- the run's logical time (Airflow's run_after, or now on the CLI)
        started_at TIMESTAMP NOT NULL,
        finished_at TIMESTAMP,
        error VARCHAR,
        summary JSON,
        owner VARCHAR,                    -- host:pid of the process working on the run now (NULL: none)
        PRIMARY KEY (run_id, entity)
    )""",
    """CREATE TABLE IF NOT EXISTS audit.stage_runs (
        run_id VARCHAR NOT NULL,
        entity VARCHAR NOT NULL,
        stage VARCHAR NOT NULL,
        finished_at TIMESTAMP NOT NULL,
        result JSON,
        seconds DOUBLE,                   -- wall-clock seconds the stage took (the attempt that recorded it)
        PRIMARY KEY (run_id, entity, stage)
    )""",
    """CREATE TABLE IF NOT EXISTS audit.extracts (
        run_id VARCHAR NOT NULL,
        entity VARCHAR NOT NULL,
        system VARCHAR NOT NULL,
        mode VARCHAR NOT NULL,            -- full | incremental
        since TIMESTAMP,                  -- lower bound on modified_at (incremental), NULL for full
        extracted BIGINT NOT NULL,        -- rows read from the source
        accepted BIGINT NOT NULL,         -- rows that passed the row checks
        quarantined BIGINT NOT NULL,
        inserted BIGINT NOT NULL,
        updated BIGINT NOT NULL,
        deleted BIGINT NOT NULL,          -- keys gone from a full snapshot
        staged BIGINT NOT NULL,           -- rows in the staging table after this run
        watermark TIMESTAMP,              -- newest source modified_at seen so far
        PRIMARY KEY (run_id, entity, system)
    )""",
    """CREATE TABLE IF NOT EXISTS audit.watermarks (
        entity VARCHAR NOT NULL,
        system VARCHAR NOT NULL,
        watermark TIMESTAMP,
        source_hash VARCHAR NOT NULL,     -- hash of the source's config; a change forces a full extract
        runs_since_full INTEGER NOT NULL,
        last_full_run_id VARCHAR,
        PRIMARY KEY (entity, system)
    )""",
    """CREATE TABLE IF NOT EXISTS audit.column_limits (
        entity VARCHAR NOT NULL,
        system VARCHAR NOT NULL,
        column_name VARCHAR NOT NULL,
        max_length BIGINT NOT NULL,       -- declared maximum length in characters (a VARCHAR(n)), read at extract
        run_id VARCHAR NOT NULL,          -- the extract that read it
        PRIMARY KEY (entity, system, column_name)
    )""",
    """CREATE TABLE IF NOT EXISTS audit.quarantine (
        run_id VARCHAR NOT NULL,
        entity VARCHAR NOT NULL,
        system VARCHAR NOT NULL,
        record_key VARCHAR,               -- NULL when the key itself is missing
        reason VARCHAR NOT NULL,
        raw JSON NOT NULL,                -- the row exactly as extracted
        quarantined_at TIMESTAMP NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS audit.quality_results (
        run_id VARCHAR NOT NULL,
        entity VARCHAR NOT NULL,
        system VARCHAR NOT NULL,
        table_name VARCHAR NOT NULL,      -- e.g. staging.crm__contact
        expectation VARCHAR NOT NULL,     -- e.g. volume, email_format:email, duplicate_rate:email
        kind VARCHAR NOT NULL,            -- the gate kind (severity is configured per kind)
        gx_expectation VARCHAR NOT NULL,  -- the Great Expectations expectation type that ran
        column_name VARCHAR,
        severity VARCHAR NOT NULL,        -- error | warn
        success BOOLEAN NOT NULL,
        observed_value VARCHAR,
        threshold JSON,                   -- the bounds the observation was held to
        unexpected_count BIGINT,
        sample JSON,                      -- a few offending values
        evaluated_at TIMESTAMP NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS audit.sync_health (
        run_id VARCHAR NOT NULL,
        entity VARCHAR NOT NULL,
        system VARCHAR NOT NULL,
        run_at TIMESTAMP NOT NULL,
        extracted BIGINT,
        quarantined BIGINT,
        staged BIGINT,
        quarantine_rate DOUBLE,
        duplicate_rate_email DOUBLE,
        duplicate_rate_name_company DOUBLE,
        duplicate_rates JSON,             -- every configured duplicate key -> rate
        volume_baseline DOUBLE,           -- median staged rows of the accepted runs before this one
        volume_change DOUBLE,             -- staged / baseline - 1
        volume_ok BOOLEAN,                -- accepted as a volume baseline for later runs
        duplicate_ok BOOLEAN,             -- accepted as a duplicate-rate baseline for later runs
        gates_passed INTEGER,
        gates_warned INTEGER,
        gates_failed INTEGER,
        held BIGINT,                      -- identities held back from writes into this system
        linked_records BIGINT,            -- records of this system carrying an xid after the run
        unlinked_records BIGINT,          -- records still waiting for an identity (in review)
        review_open BIGINT,               -- open review items about this system
        changes_planned BIGINT,           -- changes planned into this system
        changes_applied BIGINT,
        changes_failed BIGINT,
        changes_held BIGINT,              -- held, blocked or rejected
        rows_validated BIGINT,            -- rows the row-level gates (GX) checked this run
        validation VARCHAR,               -- full (every row) | changed (rows inserted or changed this run)
        suite_hash VARCHAR,               -- the row-level suite checked; a change forces a full validation
        PRIMARY KEY (run_id, entity, system)
    )""",
    """CREATE TABLE IF NOT EXISTS audit.holds (
        run_id VARCHAR NOT NULL,
        entity VARCHAR NOT NULL,
        target VARCHAR NOT NULL,          -- the system nothing about this identity is written to
        identity VARCHAR NOT NULL,        -- the identity held (a cross-system id once identity resolution runs)
        reason VARCHAR NOT NULL,
        item_id VARCHAR                   -- the review item explaining it
    )""",
    """CREATE TABLE IF NOT EXISTS audit.write_blocks (
        run_id VARCHAR NOT NULL,
        entity VARCHAR NOT NULL,
        target VARCHAR NOT NULL,          -- the system writes are blocked into
        field VARCHAR NOT NULL,           -- a canonical field, or '*' for every write into the target
        source_system VARCHAR NOT NULL,   -- whose failed error gate caused the block
        reason VARCHAR NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS review.items (
        item_id VARCHAR PRIMARY KEY,      -- deterministic: the same situation keeps its item across runs
        entity VARCHAR NOT NULL,
        kind VARCHAR NOT NULL,            -- collision | link_candidate (load) | ... (identity resolution adds its kinds)
        system VARCHAR,                   -- the system concerned (for a collision: the target)
        status VARCHAR NOT NULL,          -- open | resolved
        title VARCHAR NOT NULL,
        details JSON NOT NULL,            -- every side of the situation, with its values
        first_seen_run VARCHAR NOT NULL,
        last_seen_run VARCHAR NOT NULL,
        created_at TIMESTAMP NOT NULL,
        updated_at TIMESTAMP NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS review.decisions (
        decision_id VARCHAR PRIMARY KEY,
        item_id VARCHAR,                  -- the review item decided (NULL for a decision made without one)
        entity VARCHAR NOT NULL,
        action VARCHAR NOT NULL,          -- link | split | merge | distinct | ignore
        system VARCHAR,                   -- the record concerned (link, split, distinct)
        record_key VARCHAR,
        xid VARCHAR,                      -- link: target; merge: the xid merged away; distinct: the other side
        other_xid VARCHAR,                -- merge: the surviving xid
        decided_by VARCHAR NOT NULL,
        decided_at TIMESTAMP NOT NULL,
        reason VARCHAR NOT NULL,
        applied_run_id VARCHAR,           -- the run that applied it (decisions apply on the next run)
        applied_at TIMESTAMP
    )""",
    """CREATE TABLE IF NOT EXISTS audit.changes (
        change_id VARCHAR NOT NULL,       -- deterministic from run, target, record, field, operation
        run_id VARCHAR NOT NULL,
        entity VARCHAR NOT NULL,
        target VARCHAR NOT NULL,          -- the system written to
        record_key VARCHAR,               -- the target's record (NULL for a create until it is applied)
        xid VARCHAR,
        operation VARCHAR NOT NULL,       -- create | update | link | archive | erase
        field VARCHAR,                    -- canonical field ('_xid' for link, '*' for whole-record operations)
        column_name VARCHAR,              -- the target's column
        before_value VARCHAR,             -- canonical value the target held at extraction
        after_value VARCHAR,              -- canonical golden value
        after_raw VARCHAR,                -- what is written, in the target's representation (JSON for create)
        status VARCHAR NOT NULL,          -- planned | held | blocked | dry_run | rejected | applying | applied
                                          --   | failed | skipped_conflict | rolled_back
        reason VARCHAR,
        lineage VARCHAR,                  -- the golden value's source (system:record (rule))
        expected JSON,                    -- optimistic concurrency: the target's values at extraction
        before_image JSON,                -- the target's values just before the write (for rollback)
        applied_at TIMESTAMP,
        error VARCHAR,
        load_attempt VARCHAR,             -- which load wrote it
        PRIMARY KEY (change_id)
    )""",
    """CREATE TABLE IF NOT EXISTS audit.approvals (
        run_id VARCHAR NOT NULL,
        entity VARCHAR NOT NULL,
        target VARCHAR NOT NULL,
        required BOOLEAN NOT NULL,        -- a change count is over its threshold
        reasons JSON,
        decision VARCHAR,                 -- approved | rejected | NULL (none yet)
        decided_by VARCHAR,
        decided_at TIMESTAMP,
        note VARCHAR,
        PRIMARY KEY (run_id, entity, target)
    )""",
    """CREATE TABLE IF NOT EXISTS audit.write_ledger (
        entity VARCHAR NOT NULL,
        target VARCHAR NOT NULL,
        record_key VARCHAR NOT NULL,
        column_name VARCHAR NOT NULL,
        value_hash VARCHAR NOT NULL,      -- md5 of the value written: our own writes are recognised on extract
        change_id VARCHAR NOT NULL,
        run_id VARCHAR NOT NULL,
        written_at TIMESTAMP NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS identity.xids (
        xid VARCHAR PRIMARY KEY,          -- minted once (UUIDv7), never reused
        entity VARCHAR NOT NULL,
        status VARCHAR NOT NULL,          -- active | merged | retired (no record left in any system)
        merged_into VARCHAR,              -- for status merged: the surviving xid
        minted_run_id VARCHAR NOT NULL,
        minted_at TIMESTAMP NOT NULL,
        minted_from VARCHAR               -- system:record_key that caused the mint (or 'decision:split')
    )""",
    """CREATE TABLE IF NOT EXISTS identity.xref (
        xid VARCHAR NOT NULL,
        entity VARCHAR NOT NULL,
        system VARCHAR NOT NULL,
        record_key VARCHAR NOT NULL,
        rule VARCHAR NOT NULL,            -- what made the link: minted, stored_xid, external_id:<sys>, match:<rule>,
                                          --   decision:<action>
        confidence DOUBLE NOT NULL,       -- 1.0 for deterministic links; the match probability for model links
        run_id VARCHAR NOT NULL,
        linked_at TIMESTAMP NOT NULL,
        evidence JSON,                    -- why: per compared field {a, b, weight}, plus _probability, _weight and
                                          --   _with (the record it was scored against); NULL when nothing was scored
        PRIMARY KEY (entity, system, record_key)
    )""",
    """CREATE TABLE IF NOT EXISTS identity.model (
        entity VARCHAR NOT NULL,
        run_id VARCHAR NOT NULL,          -- the run that used it (one row per run that scored records)
        status VARCHAR NOT NULL,          -- trained (this run) | reused (trained by trained_run_id)
        trained_run_id VARCHAR NOT NULL,
        signature VARCHAR NOT NULL,       -- compared fields and blocking rules: a model is reused only for the same
        records BIGINT NOT NULL,          -- records it was trained on / applied to
        link_threshold DOUBLE NOT NULL,
        review_threshold DOUBLE NOT NULL,
        parameters JSON NOT NULL,         -- Splink's model JSON: comparisons, levels, m and u, prior, blocking rules
        m_u JSON NOT NULL,                -- per compared field, its levels with m and u (readable summary)
        created_at TIMESTAMP NOT NULL,
        PRIMARY KEY (entity, run_id)
    )""",
    """CREATE TABLE IF NOT EXISTS identity.fingerprints (
        entity VARCHAR NOT NULL,
        system VARCHAR NOT NULL,
        record_key VARCHAR NOT NULL,
        fingerprint VARCHAR NOT NULL,     -- md5 of the compared values (and model signature) when last scored
        run_id VARCHAR NOT NULL,          -- the run that scored it
        PRIMARY KEY (entity, system, record_key)
    )""",
    """CREATE TABLE IF NOT EXISTS identity.xref_history (
        entity VARCHAR NOT NULL,
        xid VARCHAR NOT NULL,
        system VARCHAR NOT NULL,
        record_key VARCHAR NOT NULL,
        action VARCHAR NOT NULL,          -- link | unlink | merge | split | retire
        rule VARCHAR NOT NULL,
        confidence DOUBLE,
        previous_xid VARCHAR,             -- for unlink/merge/split: where the record was before
        run_id VARCHAR NOT NULL,
        changed_at TIMESTAMP NOT NULL,
        note VARCHAR
    )""",
]

# Golden records (stages/golden.py; docs/golden.md). The per-entity tables golden.<entity>,
# golden.<entity>_lineage and golden.<entity>_conflicts are created by the stage, like staging tables.
TABLES += [
    """CREATE TABLE IF NOT EXISTS audit.disagreements (
        run_id VARCHAR NOT NULL,
        entity VARCHAR NOT NULL,
        field VARCHAR NOT NULL,
        system VARCHAR NOT NULL,
        records BIGINT NOT NULL,          -- linked records of golden xids in this system
        disagreeing BIGINT NOT NULL,      -- holding a (staged, normalised) value different from the golden one
        missing BIGINT NOT NULL,          -- holding no value where the golden record has one
        PRIMARY KEY (run_id, entity, field, system)
    )""",
    """CREATE TABLE IF NOT EXISTS identity.erasures (
        entity VARCHAR NOT NULL,
        xid VARCHAR NOT NULL,             -- suppressed from now on: no golden row, never re-created
        request_id VARCHAR NOT NULL,
        requested_at TIMESTAMP NOT NULL,
        requested_by VARCHAR NOT NULL,
        reason VARCHAR NOT NULL,
        matched_by VARCHAR NOT NULL,      -- how the person was named: email (never the address) | xid:<x>
        status VARCHAR NOT NULL,          -- requested (issue 6 plans the erasure in each system)
        consent JSON,                     -- the person's consent fields (most_restrictive) when erased
        PRIMARY KEY (entity, xid)
    )""",
    """CREATE TABLE IF NOT EXISTS identity.erased_identifiers (
        entity VARCHAR NOT NULL,
        kind VARCHAR NOT NULL,            -- email | phone | key:<system> (a record key) | xid
        hash VARCHAR NOT NULL,            -- sha256 of salt || kind || ':' || normalised value; never the value
        xid VARCHAR NOT NULL,             -- the erased person it belonged to
        request_id VARCHAR NOT NULL,
        salt_id VARCHAR NOT NULL,         -- which salt made the hash (a fingerprint of it, not the salt)
        PRIMARY KEY (entity, kind, hash)
    )""",
    """CREATE TABLE IF NOT EXISTS identity.erased_records (
        entity VARCHAR NOT NULL,
        system VARCHAR NOT NULL,
        record_key VARCHAR NOT NULL,      -- a record linked to an erased xid when the request was made
        xid VARCHAR NOT NULL,
        request_id VARCHAR NOT NULL,
        PRIMARY KEY (entity, system, record_key)
    )""",
]


def ensure_schema(con) -> None:
    """Create what is missing; for a warehouse made by an older version, add the columns it lacks (nullable,
    at the end), so upgrading never needs a manual migration and never touches existing data. A warehouse that
    already has every column costs one catalog query (this runs on every writable open)."""
    want = _columns()
    have = _present(con)
    if have >= want.keys():
        return
    for schema in SCHEMAS:
        con.execute(f"CREATE SCHEMA IF NOT EXISTS {schema}")
    for ddl in TABLES:
        con.execute(ddl)
    have = _present(con)
    for (schema, table, column), ctype in want.items():  # in each table's column order
        if (schema, table, column) not in have:
            con.execute(f'ALTER TABLE {schema}.{table} ADD COLUMN "{column}" {ctype}')


def _present(con) -> set[tuple[str, str, str]]:
    return set(con.execute("SELECT table_schema, table_name, column_name FROM information_schema.columns "
                           f"WHERE table_schema IN ({', '.join('?' for _ in SCHEMAS)})", list(SCHEMAS)).fetchall())


@functools.cache
def _columns() -> dict[tuple[str, str, str], str]:
    """(schema, table, column) -> type of every column the DDL declares, each table's in column order: the DDL run
    once per process in an empty in-memory database."""
    import duckdb

    con = duckdb.connect()
    try:
        for schema in SCHEMAS:
            con.execute(f"CREATE SCHEMA {schema}")
        for ddl in TABLES:
            con.execute(ddl)
        rows = con.execute("SELECT table_schema, table_name, column_name, data_type FROM information_schema.columns "
                           "ORDER BY table_schema, table_name, ordinal_position").fetchall()
    finally:
        con.close()
    return {(schema, table, column): ctype for schema, table, column, ctype in rows}
