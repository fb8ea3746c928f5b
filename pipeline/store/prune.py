"""``densecurate prune``: remove a dataset root's tables that belong to no current shard.

After the shard stage is rerun with ``--replace`` and fewer shards, the per-shard tables of
the removed shards stay (stages never delete on their own) and would be counted by the catalog.
"""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path

from pipeline.store.catalog import refresh_catalog
from pipeline.store.guards import OutputLock, index_of
from schemas.errors import MissingInputError
from schemas.layout import DatasetLayout, is_dataset_root


def orphan_tables(layout: DatasetLayout) -> list[Path]:
    """Per-shard tables (captions, density, embeddings, grounding) whose shard is not a finished shard of the root."""
    shards = set(layout.shard_indices())
    return [p for p in layout.per_shard_tables() if index_of(p) not in shards]


def prune_root(root: Path, *, dry_run: bool = False) -> list[Path]:
    """Remove (or, with ``dry_run``, only list) the orphan tables; each folder is locked while pruned."""
    layout = DatasetLayout(root.resolve())
    if not is_dataset_root(layout.root):
        raise MissingInputError(f"{root} is not a dataset root (no catalog.duckdb, no shards/)")
    orphans = orphan_tables(layout)
    if dry_run or not orphans:
        return orphans
    with ExitStack() as locks:
        for folder in sorted({p.parent for p in orphans}):
            locks.enter_context(OutputLock(folder, "prune"))
        for path in orphans:
            path.unlink()
    refresh_catalog(layout)
    return orphans
