"""Turning core results into Dagster metadata people can look at: tables, charts, previews."""
from __future__ import annotations

import base64
from pathlib import Path

import polars as pl
from dagster import MetadataValue, TableColumn, TableRecord, TableSchema

_TYPES = {pl.Int8: "int", pl.Int16: "int", pl.Int32: "int", pl.Int64: "int", pl.UInt32: "int", pl.UInt64: "int",
          pl.Float32: "float", pl.Float64: "float", pl.Boolean: "bool"}


def table(frame: pl.DataFrame, max_rows: int = 200) -> MetadataValue:
    frame = frame.head(max_rows)
    schema = TableSchema(columns=[TableColumn(name, _TYPES.get(dtype, "string")) for name, dtype in frame.schema.items()])
    records = [TableRecord({k: (v if isinstance(v, (int, float, bool)) or v is None else str(v))
                            for k, v in row.items()}) for row in frame.iter_rows(named=True)]
    return MetadataValue.table(records, schema=schema)


def image_markdown(path: Path, alt: str) -> MetadataValue:
    """A PNG inlined in markdown, so the UI shows it without file access."""
    data = base64.b64encode(Path(path).read_bytes()).decode()
    return MetadataValue.md(f"![{alt}](data:image/png;base64,{data})")


def number(value: float, digits: int = 4) -> MetadataValue:
    """A measurement Dagster plots over materializations, rounded for display."""
    return MetadataValue.float(round(float(value), digits))


def text(value) -> MetadataValue:
    """Ids, versions and settings: shown, never plotted (they are not measurements)."""
    return MetadataValue.text("" if value is None else str(value))
