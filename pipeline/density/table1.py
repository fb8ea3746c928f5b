"""PixArt-α Table-1 numbers: distinct nouns (DN), valid distinct nouns (VN), total nouns, nouns per caption."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass

import duckdb

# One row per field: captions scored, nouns in all, distinct and valid distinct nouns (catalog views).
TABLE1_SQL = """
SELECT d.field,
       count(*) AS n_captions,
       count(*) FILTER (WHERE d.missing) AS missing,
       coalesce(sum(d.n_nouns), 0) AS total_nouns,
       (SELECT count(*) FROM vocab v WHERE v.field = d.field) AS distinct_nouns,
       (SELECT count(*) FROM vocab v WHERE v.field = d.field AND v.valid) AS valid_distinct_nouns
FROM read_parquet({density}) d
GROUP BY d.field ORDER BY d.field
"""


@dataclass(frozen=True)
class Table1Row:
    """One row of PixArt-α's Table 1 for a caption field."""

    field: str
    n_captions: int
    distinct_nouns: int
    valid_distinct_nouns: int
    total_nouns: int
    missing: int = 0

    @property
    def valid_share(self) -> float:
        return self.valid_distinct_nouns / self.distinct_nouns if self.distinct_nouns else 0.0

    @property
    def nouns_per_caption(self) -> float:
        return self.total_nouns / self.n_captions if self.n_captions else 0.0

    def as_json(self) -> dict[str, object]:
        """The numbers with their documented keys (plus field, valid_share, missing)."""
        return {**asdict(self), "valid_share": self.valid_share, "nouns_per_caption": self.nouns_per_caption}

    def vn_dn(self) -> str:
        """``VN / DN = share`` as the paper prints it."""
        return f"{self.valid_distinct_nouns:,} / {self.distinct_nouns:,} = {100 * self.valid_share:.1f}%"


def table1_from_nouns(
    field: str, noun_lists: Iterable[Iterable[str]], *, min_count: int, missing: int = 0
) -> Table1Row:
    """Table-1 numbers straight from per-caption noun lists (a valid noun is seen more than ``min_count`` times)."""
    counts: Counter[str] = Counter()
    n_captions = 0
    for nouns in noun_lists:
        n_captions += 1
        counts.update(nouns)
    return table1_from_counts(field, n_captions, counts, min_count=min_count, missing=missing)


def table1_from_counts(
    field: str, n_captions: int, counts: Counter[str], *, min_count: int, missing: int = 0
) -> Table1Row:
    """Table-1 numbers from every noun's count over ``n_captions`` captions (valid: seen more than ``min_count``)."""
    return Table1Row(
        field=field,
        n_captions=n_captions,
        distinct_nouns=len(counts),
        valid_distinct_nouns=sum(1 for c in counts.values() if c > min_count),
        total_nouns=counts.total(),
        missing=missing,
    )


def table1_rows(con: duckdb.DuckDBPyConnection, density: str) -> list[Table1Row]:
    """Table-1 rows of every scored field, from the density files (``density``: an SQL glob or list of them for
    ``read_parquet``) and the ``vocab`` view."""
    sql = TABLE1_SQL.format(density=density)
    return [
        Table1Row(field=f, n_captions=n, missing=m, total_nouns=t, distinct_nouns=dn, valid_distinct_nouns=vn)
        for f, n, m, t, dn, vn in con.execute(sql).fetchall()
    ]
