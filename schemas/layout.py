"""The dataset root: where each stage reads and writes."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

SHARD_STEM_DIGITS = 5


def shard_stem(index: int) -> str:
    """The zero-padded file stem of shard ``index`` (``00042``)."""
    return f"{index:0{SHARD_STEM_DIGITS}d}"


@dataclass(frozen=True)
class ShardFiles:
    """The three files of one output shard, img2dataset style."""

    tar: Path
    parquet: Path
    stats: Path

    def all(self) -> tuple[Path, Path, Path]:
        """The files in the order they are committed (stats last: it marks completion)."""
        return (self.tar, self.parquet, self.stats)


def shard_files_in(directory: Path, index: int) -> ShardFiles:
    """The tar, Parquet and stats file of shard ``index`` in ``directory``."""
    stem = shard_stem(index)
    return ShardFiles(
        tar=directory / f"{stem}.tar", parquet=directory / f"{stem}.parquet", stats=directory / f"{stem}_stats.json"
    )


@dataclass(frozen=True)
class DatasetLayout:
    """Paths under one dataset root."""

    root: Path

    @property
    def shards_dir(self) -> Path:
        return self.root / "shards"

    @property
    def catalog_path(self) -> Path:
        return self.root / "catalog.duckdb"

    def captions_dir(self, name: str) -> Path:
        return self.root / "captions" / name

    def caption_file(self, name: str, index: int) -> Path:
        return self.captions_dir(name) / f"{shard_stem(index)}.parquet"

    def density_file(self, field: str, index: int) -> Path:
        return self.root / "density" / field / f"{shard_stem(index)}.parquet"

    def vocab_file(self, field: str) -> Path:
        return self.root / "vocab" / f"{field}.parquet"

    def shard_files(self, index: int) -> ShardFiles:
        return shard_files_in(self.shards_dir, index)
