"""Where a caption field's texts are: the shards' alt text, or a captioner's caption tables."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq

from pipeline.store.guards import require_complete
from pipeline.store.parquet_meta import read_meta
from pipeline.store.shard_reading import read_shard_stats
from schemas.errors import MissingInputError
from schemas.layout import DatasetLayout
from schemas.score_config import ALT_TEXT_FIELD
from schemas.tables import STATUS_OK


@dataclass(frozen=True)
class TextSource:
    """One shard's texts of a field: the table, its text column and the fingerprint of those texts."""

    index: int
    table: Path  # the shard's Parquet (alt_text) or the captioner's Parquet
    column: str
    fingerprint: str


def require_field(layout: DatasetLayout, field_name: str) -> None:
    """Refuse a field that is neither alt_text nor a captioner of the root."""
    if field_name != ALT_TEXT_FIELD and field_name not in layout.caption_names():
        have = ", ".join([ALT_TEXT_FIELD, *layout.caption_names()])
        raise MissingInputError(f"no caption field {field_name!r} under {layout.root} (have: {have})")


def field_sources(layout: DatasetLayout, field_name: str) -> list[TextSource]:
    """The texts of ``field_name`` per shard that has them; raises when the field does not exist."""
    if field_name == ALT_TEXT_FIELD:
        shards = require_complete(layout.shards_dir).finished
        return [
            TextSource(i, layout.shard_files(i).parquet, ALT_TEXT_FIELD, _shard_texts_id(layout, i)) for i in shards
        ]
    require_field(layout, field_name)
    sources = []
    for path in layout.caption_tables(field_name):
        meta = read_meta(path)
        if meta is not None:
            sources.append(TextSource(int(path.stem), path, "caption", meta["fingerprint"]))
    return sources


def _shard_texts_id(layout: DatasetLayout, index: int) -> str:
    return read_shard_stats(layout, index)["inputs_fingerprint"]


def read_texts(source: TextSource) -> tuple[list[str], list[str | None]]:
    """Keys and texts of one shard: its written samples' alt text, or every caption row."""
    rows = pq.read_table(source.table, columns=["key", "status", source.column]).to_pylist()
    if source.column == ALT_TEXT_FIELD:
        rows = [r for r in rows if r["status"] == STATUS_OK]
    return [r["key"] for r in rows], [r[source.column] for r in rows]
