"""`densecurate density`: the Table-1 row of a caption table on its own (Parquet, CSV or JSONL)."""

from __future__ import annotations

from pathlib import Path

import duckdb

from pipeline.density_stats import Table1Row, table1_from_nouns
from pipeline.nouns import NounExtractor
from schemas.errors import ConfigError, MissingInputError
from schemas.score_config import NounSettings

READERS = {".parquet": "read_parquet", ".csv": "read_csv_auto", ".tsv": "read_csv_auto", ".jsonl": "read_json_auto"}
READERS[".json"] = READERS[".ndjson"] = "read_json_auto"


def read_text_column(path: Path, column: str) -> list[str | None]:
    """Every value of ``column`` (as text) from a Parquet, CSV/TSV or JSON-lines file."""
    reader = READERS.get(path.suffix.lower())
    if reader is None:
        raise ConfigError(f"cannot read {path}: use a .parquet, .csv, .tsv or .jsonl file")
    if not path.is_file():
        raise MissingInputError(f"{path} does not exist")
    with duckdb.connect() as con:
        names = [d[0] for d in con.execute(f"DESCRIBE SELECT * FROM {reader}(?)", [str(path)]).fetchall()]
        if column not in names:
            raise ConfigError(f"{path} has no column {column!r} (columns: {', '.join(names)})")
        quoted = '"' + column.replace('"', '""') + '"'
        return [v for (v,) in con.execute(f"SELECT {quoted}::VARCHAR FROM {reader}(?)", [str(path)]).fetchall()]


def score_file(path: Path, column: str, settings: NounSettings, *, min_count: int) -> Table1Row:
    """Tag every caption of the column (each distinct text once) and return its Table-1 row."""
    texts = read_text_column(path, column)
    found = NounExtractor(settings).extract(texts)
    missing = sum(1 for t in texts if not (t and t.strip()))
    return table1_from_nouns(column, (n.nouns for n in found), min_count=min_count, missing=missing)
