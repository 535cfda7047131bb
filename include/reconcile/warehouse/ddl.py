"""DDL of the warehouse's fixed tables (staging tables are created per source by the extract stage).

Schemas name their layer: staging, identity, golden, review, audit. Documented in docs/warehouse.md.
"""
from __future__ import annotations

SCHEMAS = ("staging", "identity", "golden", "review", "audit")

TABLES = [
    """CREATE TABLE IF NOT EXISTS audit.runs (
        run_id VARCHAR NOT NULL,
        entity VARCHAR NOT NULL,
        status VARCHAR NOT NULL,          -- running | success | failed | blocked
        run_at TIMESTAMP NOT NULL,        -- the run's logical time (Airflow's run_after, or now on the CLI)
        started_at TIMESTAMP NOT NULL,
        finished_at TIMESTAMP,
        error VARCHAR,
        summary JSON,
        PRIMARY KEY (run_id, entity)
    )""",
    """CREATE TABLE IF NOT EXISTS audit.stage_runs (
        run_id VARCHAR NOT NULL,
        entity VARCHAR NOT NULL,
        stage VARCHAR NOT NULL,
        finished_at TIMESTAMP NOT NULL,
        result JSON,
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
        kind VARCHAR NOT NULL,            -- collision | ... (identity resolution adds its kinds)
        system VARCHAR,                   -- the system concerned (for a collision: the target)
        status VARCHAR NOT NULL,          -- open | resolved
        title VARCHAR NOT NULL,
        details JSON NOT NULL,            -- every side of the situation, with its values
        first_seen_run VARCHAR NOT NULL,
        last_seen_run VARCHAR NOT NULL,
        created_at TIMESTAMP NOT NULL,
        updated_at TIMESTAMP NOT NULL
    )""",
]


def ensure_schema(con) -> None:
    for schema in SCHEMAS:
        con.execute(f"CREATE SCHEMA IF NOT EXISTS {schema}")
    for ddl in TABLES:
        con.execute(ddl)
