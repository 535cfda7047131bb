"""File connector: CSV, Parquet and Excel exports in a folder (`systems.<s>.files`), read-only.

The source's `table` is a file name or glob inside the folder; `pick: newest` (default) reads the newest
matching file (by modification time, then name), `pick: all` reads every match, in name order, as one
snapshot. Every read is a full snapshot (stages/extract.py never reads a file incrementally), so a row
missing from the next export is a deletion. CSV and Parquet are read by DuckDB; Excel (.xlsx) by openpyxl
(DuckDB's excel extension is not bundled). Values arrive as text, like every connector's.
"""
from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import duckdb
import pyarrow as pa

from ..config.models import SourceConfig
from ..errors import ReconcileError, SystemUnreachable
from ..transforms import sql_literal
from .base import strings

FORMATS = {".csv": "csv", ".txt": "csv", ".tsv": "csv", ".parquet": "parquet", ".pq": "parquet", ".xlsx": "excel",
           ".xlsm": "excel"}


class FileConnector:
    def __init__(self, system: str, folder: str):
        self.system = system
        self.folder = Path(folder)

    def check(self) -> None:
        if not self.folder.is_dir():
            raise SystemUnreachable(f"system {self.system!r}: export folder {self.folder} does not exist")

    def files(self, source: SourceConfig) -> list[Path]:
        """The files one read takes, in read order (one for `pick: newest`)."""
        self.check()
        found = sorted(p for p in self.folder.glob(source.table or "") if p.is_file())
        if not found:
            raise ReconcileError(f"system {self.system!r}: no file matches {source.table!r} in {self.folder}")
        kinds = {FORMATS.get(p.suffix.lower()) for p in found}
        if None in kinds or len(kinds) > 1:
            raise ReconcileError(
                f"system {self.system!r}: {source.table!r} matches "
                f"{', '.join(sorted({p.suffix or p.name for p in found}))} files; one of "
                f"{', '.join(sorted(FORMATS))} is expected, the same for every file")
        if (source.pick or "newest") == "newest":
            return [max(found, key=lambda p: (p.stat().st_mtime_ns, p.name))]
        return found

    def max_lengths(self, source: SourceConfig) -> dict[str, int]:
        """Exports declare no lengths (and are never written)."""
        return {}

    def columns(self, source: SourceConfig) -> list[str]:
        files = self.files(source)
        cols: dict[str, None] = {}
        for table in self._read(files, batch_size=1, limit=0):
            cols.update(dict.fromkeys(table.column_names))
        return list(cols)

    def read_batches(self, source: SourceConfig, columns: list[str], since: datetime | None,
                     batch_size: int) -> Iterator[pa.Table]:
        for table in self._read(self.files(source), batch_size):
            missing = [c for c in columns if c not in table.column_names]
            for c in missing:  # a column absent from one of several exports: NULL there
                table = table.append_column(c, pa.nulls(table.num_rows, pa.string()))
            yield table.select(columns)

    def _read(self, files: list[Path], batch_size: int, limit: int | None = None) -> Iterator[pa.Table]:
        kind = FORMATS[files[0].suffix.lower()]
        for path in files:
            try:
                if kind == "excel":
                    yield from _excel(path, batch_size, limit)
                    continue
                yield from _duckdb(path, kind, batch_size, limit)
            except (duckdb.Error, OSError, ValueError, KeyError) as e:
                raise ReconcileError(f"system {self.system!r}: cannot read {path}: "
                                     f"{str(e).strip().splitlines()[0]}") from None

    def writer(self, source: SourceConfig):
        raise ReconcileError(f"system {self.system!r} is a folder of exports ({self.folder}): read-only, it "
                             "cannot be a write target")

    def close(self) -> None:
        pass


def _duckdb(path: Path, kind: str, batch_size: int, limit: int | None) -> Iterator[pa.Table]:
    """Every column as text, exactly as the export holds it (no type sniffing: staging types the values)."""
    reader = (f"read_csv({sql_literal(str(path))}, all_varchar = true, header = true)" if kind == "csv" else
              f"read_parquet({sql_literal(str(path))})")
    con = duckdb.connect()
    try:
        names = [r[0] for r in con.execute(f"DESCRIBE SELECT * FROM {reader}").fetchall()]
        select = ", ".join(f'CAST("{n.replace(chr(34), chr(34) * 2)}" AS VARCHAR) AS "{n.replace(chr(34), chr(34) * 2)}"'
                           for n in names)
        sql = f"SELECT {select} FROM {reader}" + ("" if limit is None else f" LIMIT {int(limit)}")
        empty = True
        for batch in con.sql(sql).to_arrow_reader(batch_size):
            empty = False
            yield pa.Table.from_batches([batch])
        if empty:
            yield pa.table({n: pa.array([], pa.string()) for n in names})
    finally:
        con.close()


def _excel(path: Path, batch_size: int, limit: int | None) -> Iterator[pa.Table]:
    """The first sheet; its first row is the header."""
    from openpyxl import load_workbook

    wb = load_workbook(path, read_only=True, data_only=True)
    try:
        rows = wb.worksheets[0].iter_rows(values_only=True)
        header = next(rows, None)
        if header is None:
            raise ValueError("the first sheet is empty (no header row)")
        names = [str(h) for h in header]
        chunk: list[tuple] = []
        taken = 0
        for row in rows:
            if limit is not None and taken >= limit:
                break
            if all(v is None for v in row):
                continue
            chunk.append(row)
            taken += 1
            if len(chunk) >= batch_size:
                yield _excel_table(names, chunk)
                chunk = []
        if chunk or taken == 0:
            yield _excel_table(names, chunk)
    finally:
        wb.close()


def _excel_table(names: list[str], rows: list[tuple]) -> pa.Table:
    cols = list(zip(*rows)) if rows else [() for _ in names]
    return pa.table([strings([_cell(v) for v in col]) for col in cols], names=names)


def _cell(value):
    """Excel stores whole numbers as floats: 42.0 is the customer number 42."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return value
