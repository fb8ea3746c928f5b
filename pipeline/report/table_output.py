"""Print query results as a rich table, CSV or JSON."""

from __future__ import annotations

import csv
import json
import sys
from collections.abc import Sequence
from typing import Any, Literal

from rich.console import Console
from rich.table import Table

OutputFormat = Literal["table", "csv", "json"]
PIPED_WIDTH = 10_000  # a table written to a file or pipe is as wide as its rows: nothing is cut at 80 columns


def table_console(*, stderr: bool = False) -> Console:
    """A console for tables: the terminal's width, or whole rows when the output is not a terminal."""
    stream = sys.stderr if stderr else sys.stdout
    return Console(stderr=stderr, width=None if stream.isatty() else PIPED_WIDTH)


def for_people(value: Any) -> str:
    """A cell as a person reads it: NULL, floats to 4 significant digits (thousands grouped), the rest as text.
    ``--format json/csv`` keep full precision."""
    if value is None:
        return "NULL"
    if isinstance(value, float):
        return f"{value:,.1f}" if abs(value) >= 1000 else f"{value:.4g}"
    return str(value)


def print_rows(columns: Sequence[str], rows: Sequence[Sequence[Any]], fmt: OutputFormat = "table") -> None:
    """Write ``rows`` to stdout in ``fmt``; JSON is a list of objects. A table rounds floats for people; CSV and
    JSON keep every digit."""
    if fmt == "csv":
        writer = csv.writer(sys.stdout, lineterminator="\n")
        writer.writerow(columns)
        writer.writerows(rows)
    elif fmt == "json":
        records = [dict(zip(columns, row, strict=True)) for row in rows]
        sys.stdout.write(json.dumps(records, default=str, indent=1) + "\n")
    else:
        table = Table(*columns)
        for row in rows:
            table.add_row(*(for_people(v) for v in row))
        table_console().print(table)
