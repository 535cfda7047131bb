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
]


def ensure_schema(con) -> None:
    for schema in SCHEMAS:
        con.execute(f"CREATE SCHEMA IF NOT EXISTS {schema}")
    for ddl in TABLES:
        con.execute(ddl)
