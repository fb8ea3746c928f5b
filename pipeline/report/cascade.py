"""A merged field as a cascade: its density and cost beside its sources', and the saving against captioning every
key with its costliest source.

Cost is device-seconds per image: a row's GPU-seconds on a GPU, its seconds on the CPU (a CPU worker counted as
one device). A merged row's cost is what every source spent on its key, so the cascade's cost per image is the
cheap captioner's on every key plus the strong one's on the keys it recaptioned. The costliest source's cost
and density "on every key" are its figures on the keys it captioned, taken as its rate on every key: the keys
a query chose as weak are not a random sample, so that density is an estimate.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import duckdb
from rich.table import Table

from pipeline.report.compare import caption_columns
from pipeline.store.catalog import connect, has_view
from pipeline.store.parquet_meta import read_meta
from schemas.layout import DatasetLayout
from schemas.score_config import ALT_TEXT_FIELD

SECONDS_PER_HOUR = 3600.0

# Per caption field: rows, device-seconds per row, whether any row was made on the CPU.
COST_SQL = """
SELECT captioner, count(*), avg({cost}), bool_or(coalesce({gpus}, 0) = 0 AND seconds > 0)
FROM captions WHERE list_contains($fields, captioner) GROUP BY captioner
"""
DENSITY_SQL = """
SELECT field, avg(n_nouns), avg(n_valid_nouns) FROM density WHERE list_contains($fields, field) GROUP BY field
"""
GROUNDED_SQL = "SELECT field, avg(n_grounded_nouns) FROM grounding WHERE list_contains($fields, field) GROUP BY field"
WON_SQL = "SELECT source, count(*) FROM captions WHERE captioner = $field GROUP BY source"


@dataclass(frozen=True)
class SourceFigures:
    """One field on its own keys: captions, device-seconds per caption, density per image."""

    field: str
    keys: int
    seconds_per_caption: float
    nouns_per_image: float | None
    valid_nouns_per_image: float | None
    grounded_nouns_per_image: float | None  # None: not grounded


@dataclass(frozen=True)
class CascadeFigures:
    """A merged field against its costliest source captioning every key."""

    field: str
    rule: str
    won_by: dict[str, int]  # keys whose caption each source gave
    no_caption: int
    on_cpu: bool  # some cost is CPU-worker seconds
    merged: SourceFigures
    sources: list[SourceFigures]
    costliest: str | None  # the source with the most device-seconds per caption (None: every source is free)
    hours_per_million: float  # the cascade's device-hours per 1M images
    costliest_hours_per_million: float  # the costliest source's, on every key
    saving_hours_per_million: float
    valid_nouns_per_hour: float | None  # the cascade's valid nouns per device-hour
    costliest_valid_nouns_per_hour: float | None
    grounded_nouns_per_hour: float | None
    costliest_grounded_nouns_per_hour: float | None

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


def merged_fields(layout: DatasetLayout) -> dict[str, dict[str, Any]]:
    """The root's merged fields, each with what its files record of the merge (fields, rule)."""
    found = {}
    for name in layout.caption_names():
        tables = layout.caption_tables(name)
        meta = read_meta(tables[0]) if tables else None
        if meta is not None and isinstance(meta.get("merge"), dict):
            found[name] = meta["merge"]
    return found


def _per_hour(per_image: float | None, seconds: float) -> float | None:
    return per_image / (seconds / SECONDS_PER_HOUR) if per_image is not None and seconds > 0 else None


def _source_figures(con: duckdb.DuckDBPyConnection, fields: list[str], columns: dict[str, str]) -> dict:
    params = {"fields": fields}
    cost = {row[0]: row[1:] for row in con.execute(COST_SQL.format(**columns), params).fetchall()}
    density = (
        {row[0]: row[1:] for row in con.execute(DENSITY_SQL, params).fetchall()} if has_view(con, "density") else {}
    )
    grounded = dict(con.execute(GROUNDED_SQL, params).fetchall()) if has_view(con, "grounding") else {}
    figures = {}
    for name in fields:
        keys, seconds, _ = cost.get(name, (0, 0.0, False))
        nouns, valid = density.get(name, (None, None))
        figures[name] = SourceFigures(name, keys, seconds or 0.0, nouns, valid, grounded.get(name))
    on_cpu = any(row[2] for row in cost.values())
    return {"figures": figures, "on_cpu": on_cpu}


def _cascade(
    con: duckdb.DuckDBPyConnection, name: str, merge: dict[str, Any], columns: dict[str, str]
) -> CascadeFigures:
    sources = list(merge["fields"])
    found = _source_figures(con, [name, *sources], columns)
    figures: dict[str, SourceFigures] = found["figures"]
    won = dict(con.execute(WON_SQL, {"field": name}).fetchall())
    paid = [figures[s] for s in sources if s != ALT_TEXT_FIELD and figures[s].seconds_per_caption > 0]
    costliest = max(paid, key=lambda f: f.seconds_per_caption) if paid else None
    merged = figures[name]
    hours = merged.seconds_per_caption * 1e6 / SECONDS_PER_HOUR
    strong_hours = costliest.seconds_per_caption * 1e6 / SECONDS_PER_HOUR if costliest else 0.0
    strong_seconds = costliest.seconds_per_caption if costliest else 0.0
    return CascadeFigures(
        field=name,
        rule=merge.get("by", ""),
        won_by={s: int(won.get(s, 0)) for s in sources},
        no_caption=int(won.get(None, 0)),
        on_cpu=found["on_cpu"],
        merged=merged,
        sources=[figures[s] for s in sources],
        costliest=costliest.field if costliest else None,
        hours_per_million=hours,
        costliest_hours_per_million=strong_hours,
        saving_hours_per_million=strong_hours - hours,
        valid_nouns_per_hour=_per_hour(merged.valid_nouns_per_image, merged.seconds_per_caption),
        costliest_valid_nouns_per_hour=_per_hour(costliest.valid_nouns_per_image, strong_seconds)
        if costliest
        else None,
        grounded_nouns_per_hour=_per_hour(merged.grounded_nouns_per_image, merged.seconds_per_caption),
        costliest_grounded_nouns_per_hour=(
            _per_hour(costliest.grounded_nouns_per_image, strong_seconds) if costliest else None
        ),
    )


def cascade_figures(root: Path, fields: list[str] | None = None) -> list[CascadeFigures]:
    """The figures of every merged field of the root (or of those among ``fields``)."""
    layout = DatasetLayout(root.resolve())
    merges = {n: m for n, m in merged_fields(layout).items() if not fields or n in fields}
    if not merges:
        return []
    with connect(root) as con:
        if not has_view(con, "captions"):
            return []
        columns = caption_columns(con)
        return [_cascade(con, name, merge, columns) for name, merge in sorted(merges.items())]


def _number(value: float | None, fmt: str = "{:.2f}") -> str:
    return "-" if value is None else fmt.format(value)


def cascade_lines(c: CascadeFigures) -> list[tuple[str, str, str]]:
    """``(metric, the cascade, the costliest source on every key)`` lines, for the console and the HTML report."""
    unit = "CPU-worker" if c.on_cpu else "GPU"
    strong = next((s for s in c.sources if s.field == c.costliest), None)
    won = ", ".join(f"{s} {n:,}" for s, n in c.won_by.items())
    return [
        ("best caption from", f"{won}, none {c.no_caption:,}", f"{strong.keys:,} keys captioned" if strong else "-"),
        ("nouns per image", _number(c.merged.nouns_per_image), _number(strong and strong.nouns_per_image)),
        (
            "valid nouns per image",
            _number(c.merged.valid_nouns_per_image),
            _number(strong and strong.valid_nouns_per_image),
        ),
        (
            "grounded nouns per image",
            _number(c.merged.grounded_nouns_per_image),
            _number(strong and strong.grounded_nouns_per_image),
        ),
        (
            f"{unit}-seconds per image",
            f"{c.merged.seconds_per_caption:.3g}",
            _number(strong and strong.seconds_per_caption, "{:.3g}"),
        ),
        (f"{unit}-hours per 1M images", f"{c.hours_per_million:,.1f}", f"{c.costliest_hours_per_million:,.1f}"),
        (f"saving per 1M images ({unit}-hours)", f"{c.saving_hours_per_million:,.1f}", ""),
        (
            f"valid nouns per {unit}-hour",
            _number(c.valid_nouns_per_hour, "{:,.0f}"),
            _number(c.costliest_valid_nouns_per_hour, "{:,.0f}"),
        ),
        (
            f"grounded nouns per {unit}-hour",
            _number(c.grounded_nouns_per_hour, "{:,.0f}"),
            _number(c.costliest_grounded_nouns_per_hour, "{:,.0f}"),
        ),
    ]


CASCADE_NOTE = (
    "the costliest source's figures on every key are its cost and density on the keys it captioned; when a query "
    "chose those keys (as weak ones), its density on every key is an estimate"
)
CPU_CASCADE_NOTE = (
    "CPU-worker: some sources captioned on the CPU; their seconds are CPU-worker seconds (one worker counted as one "
    "device), not GPU-seconds: caption on the GPU you will use for the full run to compare costs"
)


def cascade_notes(c: CascadeFigures) -> list[str]:
    """The notes under a cascade's table: how the costliest source's figures are taken, and CPU costs."""
    return [CASCADE_NOTE, CPU_CASCADE_NOTE] if c.on_cpu else [CASCADE_NOTE]


def cascade_title(c: CascadeFigures) -> str:
    return f"cascade {c.field}: the best of {', '.join(c.won_by)} by {c.rule.replace('_', ' ')}"


def cascade_table(c: CascadeFigures) -> Table:
    """The cascade against its costliest source on every key."""
    strong = f"{c.costliest} on every key" if c.costliest else "no source with a cost"
    table = Table("", f"{c.field} (cascade)", strong, title=cascade_title(c), caption="\n".join(cascade_notes(c)))
    for row in cascade_lines(c):
        table.add_row(*row)
    return table
