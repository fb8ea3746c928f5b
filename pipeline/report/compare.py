"""`densecurate compare`: caption fields side by side on the keys they all have, density against GPU cost.

Density is compared on identical keys only (those every compared field scored), so a captioner that
captioned easier images cannot win by it. Cost comes from the caption rows: each row's ``gpu_seconds``
(its share of its batch's generation time times the GPUs its worker held; ``seconds`` x ``gpus`` in tables
written before that column; a merged field's row: what every source spent on the key). A run on the CPU has
no GPU-seconds: each CPU worker counts as one device, and the comparison says so (``on_cpu``). Alt text
costs nothing.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import duckdb
from rich.table import Table

from pipeline.store.catalog import connect, has_view
from pipeline.store.freshness import scored_fields
from schemas.errors import MissingInputError
from schemas.layout import DatasetLayout
from schemas.score_config import ALT_TEXT_FIELD

SECONDS_PER_HOUR = 3600.0


class NoCommonKeysError(MissingInputError):
    """The compared fields scored disjoint keys (e.g. samples of different seeds)."""


# The keys every compared field scored.
COMMON_KEYS = """
WITH common AS (
    SELECT key FROM density WHERE list_contains($fields, field) GROUP BY key HAVING count(DISTINCT field) = $n
)"""
# Per field on those keys: keys, captions, words, nouns, valid nouns. A noun is valid when the field's
# captions of these keys hold it more than the field's min-count (as `score` set it) times: counted over
# the whole field instead, a field scored on every key would win against a sample. A caption its captioner
# flagged as repetitive counts each of its nouns once: repeating one token is not density.
DENSITY_SQL = (
    COMMON_KEYS
    + """,
{repeated},
d AS (SELECT field, key, missing, n_tokens,
             CASE WHEN r.key IS NULL THEN nouns ELSE list_distinct(nouns) END AS nouns
      FROM density JOIN common USING (key) LEFT JOIN repeated r USING (field, key)
      WHERE list_contains($fields, field)),
occurrences AS (SELECT field, key, unnest(nouns) AS noun FROM d),
min_counts AS (SELECT field, max(min_count) AS min_count FROM vocab GROUP BY field),
valid_nouns AS (
    SELECT o.field, o.noun FROM occurrences o JOIN min_counts m USING (field)
    GROUP BY o.field, o.noun, m.min_count HAVING count(*) > m.min_count
),
valid AS (
    SELECT o.field, o.key, count(*) AS n_valid FROM occurrences o JOIN valid_nouns USING (field, noun) GROUP BY ALL
)
SELECT d.field, count(*), count(*) FILTER (WHERE NOT d.missing), avg(d.n_tokens), avg(coalesce(len(d.nouns), 0)),
       avg(coalesce(valid.n_valid, 0))
FROM d LEFT JOIN valid USING (field, key) GROUP BY d.field
"""
)
# The (field, key) of captions flagged as repetitive; none without a captions view (alt texts only).
REPEATED = "repeated AS (SELECT captioner AS field, key FROM captions WHERE status = 'ok' AND repetitive)"
NONE_REPEATED = "repeated AS (SELECT NULL::VARCHAR AS field, NULL::VARCHAR AS key WHERE false)"
# Per captioner on the same keys: generated tokens and flags of its captions, and what they cost.
CAPTIONS_SQL = (
    COMMON_KEYS
    + """
SELECT captioner,
       avg(num_tokens) FILTER (WHERE status = 'ok'),
       avg(truncated::INT) FILTER (WHERE status = 'ok'),
       avg(repetitive::INT) FILTER (WHERE status = 'ok'),
       avg(empty::INT) FILTER (WHERE status = 'ok'),
       avg(seconds),
       avg({cost}),
       string_agg(DISTINCT coalesce({device}, 'unknown'), ', ' ORDER BY coalesce({device}, 'unknown')),
       bool_or(coalesce({gpus}, 0) = 0)
FROM captions JOIN common USING (key) WHERE list_contains($fields, captioner) GROUP BY captioner
"""
)
GROUNDING_SQL = (
    COMMON_KEYS
    + """
SELECT field, count(*), avg(n_grounded_nouns)
FROM grounding JOIN common USING (key) WHERE list_contains($fields, field) GROUP BY field
"""
)


@dataclass(frozen=True)
class FieldComparison:
    """One caption field on the compared keys: its density, its flags and what a caption cost."""

    field: str
    keys: int  # keys every compared field has (the same for every field)
    captions: int  # of those, with a caption
    words_per_caption: float
    tokens_per_caption: float | None  # generated tokens (None for alt text)
    nouns_per_image: float
    valid_nouns_per_image: float
    grounded_nouns_per_image: float | None  # None: grounding has not covered the compared keys
    truncated_share: float | None
    repetitive_share: float | None
    empty_share: float | None
    device: str | None  # the workers' GPUs, "cpu", or None (alt text: no model)
    on_cpu: bool  # some captions were made on the CPU: their seconds are CPU-worker seconds
    seconds_per_caption: float  # worker seconds (0 for alt text)
    gpu_seconds_per_caption: float  # gpu_seconds (seconds x GPUs held; CPU: seconds; 0 for alt text)
    valid_nouns_per_gpu_second: float | None  # None when a caption cost nothing
    grounded_nouns_per_gpu_second: float | None
    gpu_hours_per_million: float
    gpu_hours_per_ten_million: float
    on_pareto_front: bool = False  # no other field has as many valid nouns per image for less cost

    def as_json(self) -> dict[str, Any]:
        """The comparison with snake-case keys, as ``--format json`` prints it."""
        return asdict(self)


def _per_second(density: float | None, cost: float) -> float | None:
    return density / cost if density is not None and cost > 0 else None


def pareto_front(points: list[tuple[float, float]]) -> list[bool]:
    """For each ``(cost, density)``: whether no other point has at most its cost and at least its density,
    one of them strictly."""
    return [not any(c2 <= c and d2 >= d and (c2 < c or d2 > d) for c2, d2 in points) for c, d in points]


def _require_scored(layout: DatasetLayout, fields: list[str]) -> None:
    scored = scored_fields(layout)
    missing = [f for f in fields if f not in scored]
    if missing:
        raise MissingInputError(
            f"field {missing[0]!r} is not scored under {layout.root} (scored: {', '.join(scored) or 'none'}): run "
            f"`densecurate score {layout.root} --field {missing[0]}` first"
        )


def caption_columns(con: duckdb.DuckDBPyConnection) -> dict[str, str]:
    """``device`` and ``gpus`` as columns (NULL for caption tables written before they existed), and ``cost``: a
    row's device-seconds, its GPU-seconds on a GPU (``gpu_seconds``, else seconds x GPUs) and its seconds on the
    CPU (a merged row's: what its sources spent on the key)."""
    have = {name for name, *_ in con.execute("DESCRIBE captions").fetchall()}
    columns = {name: name if name in have else "NULL" for name in ("device", "gpus", "gpu_seconds")}
    gpus = columns["gpus"]
    columns["cost"] = (
        f"CASE WHEN coalesce({gpus}, 0) > 0 THEN coalesce({columns['gpu_seconds']}, seconds * {gpus}) ELSE seconds END"
    )
    return columns


def compare_fields(root: Path, fields: list[str] | None = None) -> list[FieldComparison]:
    """Every scored field (or ``fields``) compared on the keys they all scored; raises when they share none."""
    layout = DatasetLayout(root.resolve())
    fields = sorted(set(fields)) if fields else scored_fields(layout)
    if not fields:
        raise MissingInputError(f"nothing scored under {root}: run `densecurate score {root} --field ...` first")
    _require_scored(layout, fields)
    params = {"fields": fields, "n": len(fields)}
    with connect(root) as con:
        repeated = REPEATED if has_view(con, "captions") else NONE_REPEATED
        density = {row[0]: row[1:] for row in con.execute(DENSITY_SQL.format(repeated=repeated), params).fetchall()}
        if not density:
            raise NoCommonKeysError(
                f"the fields {', '.join(fields)} have no scored key in common: caption the same keys (the same "
                "--sample and --sample-seed, or every key) and score them"
            )
        captions = {}
        if has_view(con, "captions"):
            sql = CAPTIONS_SQL.format(**caption_columns(con))
            captions = {row[0]: row[1:] for row in con.execute(sql, params).fetchall()}
        grounding = {}
        if has_view(con, "grounding"):
            grounding = {row[0]: row[1:] for row in con.execute(GROUNDING_SQL, params).fetchall()}
    compared = [_comparison(f, density[f], captions.get(f), grounding.get(f)) for f in fields]
    front = pareto_front([(c.gpu_seconds_per_caption, c.valid_nouns_per_image) for c in compared])
    return [replace(c, on_pareto_front=on) for c, on in zip(compared, front, strict=True)]


def comparison_or_none(root: Path) -> list[FieldComparison] | None:
    """Every scored field compared (for the report), or None when they share no scored key."""
    try:
        return compare_fields(root)
    except NoCommonKeysError:
        return None


def _comparison(field: str, density: tuple, captions: tuple | None, grounding: tuple | None) -> FieldComparison:
    keys, n_captions, words, nouns, valid = density
    tokens = truncated = repetitive = empty = device = None
    seconds = gpu_seconds = 0.0
    on_cpu = False
    if field != ALT_TEXT_FIELD and captions is not None:
        tokens, truncated, repetitive, empty, seconds, gpu_seconds, device, on_cpu = captions
    grounded = grounding[1] if grounding is not None and grounding[0] == keys else None
    per_million = gpu_seconds * 1e6 / SECONDS_PER_HOUR
    return FieldComparison(
        field=field,
        keys=keys,
        captions=n_captions,
        words_per_caption=words or 0.0,
        tokens_per_caption=tokens,
        nouns_per_image=nouns or 0.0,
        valid_nouns_per_image=valid or 0.0,
        grounded_nouns_per_image=grounded,
        truncated_share=truncated,
        repetitive_share=repetitive,
        empty_share=empty,
        device=device,
        on_cpu=bool(on_cpu),
        seconds_per_caption=seconds or 0.0,
        gpu_seconds_per_caption=gpu_seconds or 0.0,
        valid_nouns_per_gpu_second=_per_second(valid, gpu_seconds or 0.0),
        grounded_nouns_per_gpu_second=_per_second(grounded, gpu_seconds or 0.0),
        gpu_hours_per_million=per_million,
        gpu_hours_per_ten_million=10 * per_million,
    )


def _number(value: float | None, fmt: str = "{:.2f}", none: str = "-") -> str:
    return none if value is None else fmt.format(value)


def _share(value: float | None) -> str:
    return _number(None if value is None else 100 * value, "{:.1f}%")


def comparison_lines(compared: list[FieldComparison]) -> list[tuple[str, list[str]]]:
    """``(metric, one value per field)`` lines, shared by the console table and the HTML report."""

    def each(show) -> list[str]:
        return [show(c) for c in compared]

    def cost(c: FieldComparison, value: float) -> str:
        if c.device is None:
            return "0 (no model)"
        return f"{value:.3g}" + (" (CPU)" if c.on_cpu else "")

    return [
        ("keys compared", each(lambda c: f"{c.keys:,}")),
        ("captions", each(lambda c: f"{c.captions:,}")),
        ("words per caption", each(lambda c: f"{c.words_per_caption:.1f}")),
        ("tokens per caption", each(lambda c: _number(c.tokens_per_caption, "{:.1f}"))),
        ("nouns per image", each(lambda c: f"{c.nouns_per_image:.2f}")),
        ("valid nouns per image", each(lambda c: f"{c.valid_nouns_per_image:.2f}")),
        ("grounded nouns per image", each(lambda c: _number(c.grounded_nouns_per_image, none="not measured"))),
        ("flagged truncated", each(lambda c: _share(c.truncated_share))),
        ("flagged repetitive", each(lambda c: _share(c.repetitive_share))),
        ("flagged empty", each(lambda c: _share(c.empty_share))),
        ("device", each(lambda c: c.device or "-")),
        ("GPU-seconds per caption", each(lambda c: cost(c, c.gpu_seconds_per_caption))),
        ("valid nouns per GPU-second", each(lambda c: _number(c.valid_nouns_per_gpu_second))),
        ("grounded nouns per GPU-second", each(lambda c: _number(c.grounded_nouns_per_gpu_second))),
        ("GPU-hours per 1M images", each(lambda c: cost(c, c.gpu_hours_per_million))),
        ("GPU-hours per 10M images", each(lambda c: cost(c, c.gpu_hours_per_ten_million))),
        ("on the Pareto front", each(lambda c: "yes" if c.on_pareto_front else "no")),
    ]


CPU_NOTE = (
    "(CPU): captioned on the CPU; its seconds are CPU-worker seconds (one worker counted as one device), "
    "not GPU-seconds: caption the sample on the GPU you will use for the full run to compare costs"
)


def comparison_table(compared: list[FieldComparison]) -> Table:
    """Metrics as rows, fields as columns (with a note when a field was captioned on the CPU)."""
    keys = compared[0].keys
    caption = CPU_NOTE if any(c.on_cpu for c in compared) else None
    table = Table(
        "", *(c.field for c in compared), title=f"captioners compared on {keys:,} identical keys", caption=caption
    )
    for name, values in comparison_lines(compared):
        table.add_row(name, *values)
    return table
