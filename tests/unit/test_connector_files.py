"""File sources: CSV, Parquet and Excel exports in a folder, read by the file connector and staged; every
export is a full snapshot, so a row missing from the next export is a deletion. Read-only."""
from __future__ import annotations

import os
from datetime import datetime
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from reconcile import runner
from reconcile.config import load_config
from reconcile.config.models import SourceConfig
from reconcile.connectors.files import FileConnector
from reconcile.errors import ConfigError, ReconcileError

CONFIG = """\
version: 1
warehouse: warehouse/reconcile.duckdb
systems:
  erp:
    files: exports                     # a folder, relative to this file
    creates_identity: true
entities:
  contact:
    sources:
      erp:
        table: "customers_*.{ext}"
        pick: {pick}
        key: customer_number
        modified_at: last_modified
        fields:
          email: {{column: email, transform: email}}
          credit: credit_limit
    fields:
      email: {{owner: erp}}
      credit: {{owner: erp, type: number}}
"""
HEADER = ["customer_number", "email", "credit_limit", "last_modified"]
DAY1 = [["C-1", "Ann@Example.com", "1000", "2026-01-01 10:00:00"],
        ["C-2", "bo@example.com", "250.5", "2026-01-02 10:00:00"],
        ["C-3", "cy@example.com", None, "2026-01-03 10:00:00"]]


def write_export(path: Path, rows: list[list], mtime: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".csv":
        lines = [",".join(HEADER)] + [",".join("" if v is None else v for v in r) for r in rows]
        path.write_text("\n".join(lines) + "\n")
    elif path.suffix == ".parquet":
        cols = list(zip(*rows))
        pq.write_table(pa.table({h: pa.array(list(c)) for h, c in zip(HEADER, cols)}), path)
    else:
        from openpyxl import Workbook

        wb = Workbook()
        ws = wb.active
        ws.append(HEADER)
        for r in rows:
            ws.append([float(v) if h == "credit_limit" and v else v for h, v in zip(HEADER, r)])
        wb.save(path)
    os.utime(path, (mtime, mtime))


def staged(cfg) -> list[tuple]:
    con = duckdb.connect(str(cfg.warehouse_path), read_only=True)
    try:
        return con.execute("SELECT _record_key, email, credit FROM staging.erp__contact ORDER BY 1").fetchall()
    finally:
        con.close()


def extracts(cfg, run_id: str) -> tuple:
    con = duckdb.connect(str(cfg.warehouse_path), read_only=True)
    try:
        return con.execute("SELECT mode, extracted, deleted FROM audit.extracts WHERE run_id = ?", [run_id]).fetchone()
    finally:
        con.close()


@pytest.mark.parametrize("ext", ["csv", "parquet", "xlsx"])
def test_an_export_is_staged_and_a_row_gone_from_the_next_export_is_a_delete(tmp_path, ext):
    (tmp_path / "reconcile.yaml").write_text(CONFIG.format(ext=ext, pick="newest"))
    exports = tmp_path / "exports"
    write_export(exports / f"customers_2026-02-01.{ext}", DAY1, mtime=1_700_000_000)
    cfg = load_config(tmp_path / "reconcile.yaml")
    runner.run_entity(cfg, "contact", run_id="r1", run_at=datetime(2026, 2, 1, 2))
    assert staged(cfg) == [("C-1", "ann@example.com", 1000.0), ("C-2", "bo@example.com", 250.5),
                           ("C-3", "cy@example.com", None)]
    # the next night's export: C-2 is gone, C-3 changed; the older file stays in the folder
    write_export(exports / f"customers_2026-02-02.{ext}", [DAY1[0], ["C-3", "cy@example.com", "75", "2026-02-01 09:00:00"]],
                 mtime=1_700_086_400)
    runner.run_entity(cfg, "contact", run_id="r2", run_at=datetime(2026, 2, 2, 2))
    assert staged(cfg) == [("C-1", "ann@example.com", 1000.0), ("C-3", "cy@example.com", 75.0)]
    assert extracts(cfg, "r2") == ("full", 2, 1)


def test_pick_all_reads_every_export_as_one_snapshot(tmp_path):
    (tmp_path / "reconcile.yaml").write_text(CONFIG.format(ext="csv", pick="all"))
    write_export(tmp_path / "exports" / "customers_eu.csv", DAY1[:2], mtime=1_700_000_000)
    write_export(tmp_path / "exports" / "customers_us.csv", DAY1[2:], mtime=1_600_000_000)
    cfg = load_config(tmp_path / "reconcile.yaml")
    runner.run_entity(cfg, "contact", run_id="r1", run_at=datetime(2026, 2, 1, 2))
    assert [r[0] for r in staged(cfg)] == ["C-1", "C-2", "C-3"]


def test_no_matching_file_and_mixed_formats_are_clear_errors(tmp_path):
    conn = FileConnector("erp", str(tmp_path))
    src = SourceConfig(table="customers_*.csv", key="customer_number", fields={})
    with pytest.raises(ReconcileError, match=r"system 'erp': no file matches 'customers_\*.csv'"):
        conn.columns(src)
    write_export(tmp_path / "customers_1.csv", DAY1, 1_700_000_000)
    write_export(tmp_path / "customers_2.parquet", DAY1, 1_700_000_000)
    with pytest.raises(ReconcileError, match="the same for every file"):
        conn.columns(SourceConfig(table="customers_*", key="customer_number", fields={}))
    with pytest.raises(ReconcileError, match="read-only, it cannot be a write target"):
        conn.writer(src)


def test_check_config_refuses_a_file_system_as_a_write_target(tmp_path):
    text = CONFIG.format(ext="csv", pick="newest").replace("      credit: {owner: erp, type: number}\n",
                                                           "      credit: {owner: erp, type: number}\n"
                                                           "      note: {owner: crm, send_to: [erp]}\n")
    text = text.replace("systems:\n", "systems:\n  crm: {url: 'sqlite:///crm.db', creates_identity: true}\n")
    text = text.replace("          credit: credit_limit\n", "          credit: credit_limit\n          note: note\n"
                        "      crm: {table: contact, key: id, fields: {note: note}}\n")
    (tmp_path / "reconcile.yaml").write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(tmp_path / "reconcile.yaml")
    assert "systems.erp" in str(e.value) and "read-only" in str(e.value)
