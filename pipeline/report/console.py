"""`densecurate report`: Table-1 rows side by side, noun distributions, long tail, caption flags."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import duckdb
from rich.console import Console
from rich.table import Table

from pipeline.density.table1 import Table1Row, table1_rows
from pipeline.report.table_output import table_console
from pipeline.store.catalog import connect, damage_warning, damaged_files, has_view, readable_list
from pipeline.store.freshness import stale_warning
from schemas.errors import MissingInputError
from schemas.layout import TABLE_GLOBS, DatasetLayout


@dataclass(frozen=True)
class GroundingFigures:
    """A grounded field's figures (``densecurate ground``): the honest companions of its Table-1 row."""

    model: str
    grounded_per_image: float
    grounded_share: float  # grounded noun occurrences / noun occurrences
    clip_quantiles: tuple[float, float, float]  # image-caption score p10, median, p90
    near_duplicate_share: float | None  # samples that are a duplicate of a kept one (None: no duplicates table)


@dataclass
class FieldReport:
    """Everything the report shows about one caption field."""

    row: Table1Row
    min_count: int
    nouns_histogram: list[tuple[int, int]]  # (nouns in a caption, captions)
    quantiles: tuple[float, float, float]  # nouns per image: p10, median, p90
    words_mean: float
    words_median: float
    top_nouns: list[tuple[str, int]]
    rank_counts: list[int]  # every noun's count, most frequent first
    tail_occurrence_share: float  # share of noun occurrences from nouns seen <= min_count times
    flags: dict[str, float] = field(default_factory=dict)  # captioner fields: share truncated/repetitive/empty
    grounding: GroundingFigures | None = None

    @property
    def tail_distinct_share(self) -> float:
        return 1.0 - self.row.valid_share if self.row.distinct_nouns else 0.0


GROUNDING_FIGURES = """
SELECT any_value(g.model), avg(g.n_grounded_nouns), sum(g.n_grounded_nouns) / nullif(sum(g.n_nouns), 0),
       quantile_cont(g.clip_score, 0.1), quantile_cont(g.clip_score, 0.5), quantile_cont(g.clip_score, 0.9),
       {duplicate_share}
FROM grounding g {duplicates_join}
WHERE g.field = ? AND NOT g.missing
"""


def grounding_figures(con: duckdb.DuckDBPyConnection, field_name: str) -> GroundingFigures | None:
    """The field's grounding figures, or None when it is not grounded."""
    if not has_view(con, "grounding"):
        return None
    duplicates = has_view(con, "duplicates")
    sql = GROUNDING_FIGURES.format(
        duplicate_share="avg(CASE WHEN dup.kept = false THEN 1 ELSE 0 END)" if duplicates else "NULL",
        duplicates_join="LEFT JOIN duplicates dup ON dup.key = g.key AND dup.model = g.model" if duplicates else "",
    )
    model, per_image, share, p10, p50, p90, dup_share = con.execute(sql, [field_name]).fetchone()
    if model is None:
        return None
    return GroundingFigures(model, per_image or 0.0, share or 0.0, (p10 or 0.0, p50 or 0.0, p90 or 0.0), dup_share)


def _field_report(con: duckdb.DuckDBPyConnection, row: Table1Row, density: str, top: int) -> FieldReport:
    f = row.field
    hist = con.execute(
        f"SELECT n_nouns, count(*) FROM read_parquet({density}) WHERE field = ? GROUP BY 1 ORDER BY 1", [f]
    ).fetchall()
    q10, q50, q90, words_mean, words_median = con.execute(
        f"SELECT quantile_cont(n_nouns, 0.1), quantile_cont(n_nouns, 0.5), quantile_cont(n_nouns, 0.9), "
        f"avg(n_tokens), median(n_tokens) FROM read_parquet({density}) WHERE field = ?",
        [f],
    ).fetchone()
    counts = [c for (c,) in con.execute("SELECT count FROM vocab WHERE field = ? ORDER BY count DESC", [f]).fetchall()]
    min_count = con.execute("SELECT coalesce(max(min_count), 10) FROM vocab WHERE field = ?", [f]).fetchone()[0]
    tail = sum(c for c in counts if c <= min_count)
    flags = {}
    if has_view(con, "captions"):
        got = con.execute(
            "SELECT count(*), avg(truncated::INT), avg(repetitive::INT), avg(empty::INT) FROM captions "
            "WHERE captioner = ? AND status = 'ok'",
            [f],
        ).fetchone()
        if got[0]:
            flags = {"truncated": got[1], "repetitive": got[2], "empty": got[3]}
    return FieldReport(
        row=row,
        min_count=min_count,
        nouns_histogram=hist,
        quantiles=(q10 or 0.0, q50 or 0.0, q90 or 0.0),
        words_mean=words_mean or 0.0,
        words_median=words_median or 0.0,
        top_nouns=[
            (n, c)
            for n, c in con.execute(
                "SELECT noun, count FROM vocab WHERE field = ? ORDER BY count DESC, noun LIMIT ?", [f, top]
            ).fetchall()
        ],
        rank_counts=counts,
        tail_occurrence_share=tail / sum(counts) if counts else 0.0,
        flags=flags,
        grounding=grounding_figures(con, f),
    )


def readable_density(con: duckdb.DuckDBPyConnection, root: Path) -> str:
    """The density files of ``root`` that read, as an SQL list; a sentence when none does."""
    density = readable_list(con, root.resolve(), TABLE_GLOBS["density"])
    if density == "[]":
        raise MissingInputError(f"no density file under {root} reads: {damage_warning(root, damaged_files(con))}")
    return density


def gather_report(root: Path, *, top: int = 15) -> list[FieldReport]:
    """Per scored field, the report's numbers (needs `densecurate score` first)."""
    layout = DatasetLayout(root.resolve())
    if not list(layout.root.glob(TABLE_GLOBS["density"])):
        raise MissingInputError(f"nothing scored under {root}: run `densecurate score {root}` first")
    with connect(root) as con:
        density = readable_density(con, root)
        return [_field_report(con, row, density, top) for row in table1_rows(con, density)]


def warn_if_stale(root: Path) -> None:
    """Say which fields' density describes earlier texts than the field holds now."""
    warning = stale_warning(DatasetLayout(root.resolve()))
    if warning:
        Console(stderr=True).print(f"[red]{warning}[/red]")


def table1_table(
    rows: list[Table1Row],
    title: str = "concept density (PixArt-alpha Table 1)",
    grounding: list[GroundingFigures | None] | None = None,
) -> Table:
    """Metrics as rows, fields as columns: alt text and each captioner side by side; with ``grounding``
    (one per row) also the grounded figures of the fields that have them."""
    table = Table("", *(r.field for r in rows), title=title)
    for name, value in table1_lines(rows, grounding):
        table.add_row(name, *value)
    return table


def table1_lines(
    rows: list[Table1Row], grounding: list[GroundingFigures | None] | None = None
) -> list[tuple[str, list[str]]]:
    """The Table-1 lines (name, one value per field), followed by the grounded ones when any field has them."""
    lines = [
        ("captions", [f"{r.n_captions:,}" for r in rows]),
        ("VN / DN", [r.vn_dn() for r in rows]),
        ("total nouns", [f"{r.total_nouns:,}" for r in rows]),
        ("nouns per image", [f"{r.nouns_per_caption:.1f}" for r in rows]),
        ("missing captions", [f"{r.missing:,}" for r in rows]),
    ]
    if not grounding or all(g is None for g in grounding):
        return lines

    def each(show) -> list[str]:
        return ["-" if g is None else show(g) for g in grounding]

    return [
        *lines,
        ("grounded nouns per image", each(lambda g: f"{g.grounded_per_image:.1f}")),
        ("grounded share", each(lambda g: f"{100 * g.grounded_share:.1f}%")),
        (
            "image-caption score p10 / median / p90",
            each(lambda g: "{:.1f} / {:.1f} / {:.1f}".format(*g.clip_quantiles)),
        ),
        (
            "near-duplicate share",
            each(lambda g: "-" if g.near_duplicate_share is None else f"{100 * g.near_duplicate_share:.1f}%"),
        ),
        ("grounded by (CLIP model)", each(lambda g: g.model)),
    ]


def print_table1(root: Path) -> None:
    """Print the Table-1 rows of every scored field (and which are stale)."""
    warn_if_stale(root)
    with connect(root) as con:
        rows = table1_rows(con, readable_density(con, root))
        table_console().print(table1_table(rows, grounding=[grounding_figures(con, r.field) for r in rows]))


def print_report(
    root: Path, reports: list[FieldReport], comparison: Table | None = None, cascades: Sequence[Table] = ()
) -> None:
    """The whole report on the console (first, which fields are stale); ``comparison``: the captioner
    comparison's table, and ``cascades`` the merged fields' tables, shown after Table 1."""
    warn_if_stale(root)
    console = table_console()
    console.print(table1_table([r.row for r in reports], grounding=[r.grounding for r in reports]))
    if comparison is not None:
        console.print(comparison)
    for cascade in cascades:
        console.print(cascade)
    names = [r.row.field for r in reports]
    dist = Table("", *names, title="nouns per image, caption length, long tail")
    dist.add_row(
        "nouns per image p10 / median / p90", *("{:.0f} / {:.0f} / {:.0f}".format(*r.quantiles) for r in reports)
    )
    dist.add_row("words per caption (mean / median)", *(f"{r.words_mean:.1f} / {r.words_median:.0f}" for r in reports))
    dist.add_row(
        "distinct nouns seen <= min-count times",
        *(f"{100 * r.tail_distinct_share:.1f}% (min-count {r.min_count})" for r in reports),
    )
    dist.add_row("noun occurrences from those nouns", *(f"{100 * r.tail_occurrence_share:.1f}%" for r in reports))
    for flag in ("truncated", "repetitive", "empty"):
        dist.add_row(f"captions flagged {flag}", *(f"{100 * r.flags[flag]:.1f}%" if r.flags else "-" for r in reports))
    console.print(dist)
    top = Table("rank", *names, title="most frequent nouns")
    for i in range(max((len(r.top_nouns) for r in reports), default=0)):
        top.add_row(
            str(i + 1), *(f"{r.top_nouns[i][0]} ({r.top_nouns[i][1]})" if i < len(r.top_nouns) else "" for r in reports)
        )
    console.print(top)
