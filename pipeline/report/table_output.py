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


def print_rows(columns: Sequence[str], rows: Sequence[Sequence[Any]], fmt: OutputFormat = "table") -> None:
    """Write ``rows`` to stdout in ``fmt``; JSON is a list of objects."""
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
            table.add_row(*("NULL" if v is None else str(v) for v in row))
        Console().print(table)
