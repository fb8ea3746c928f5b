"""The dataset root: where each stage reads and writes."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

SHARD_STEM_DIGITS = 5
STATS_SUFFIX = "_stats.json"
PLAN_FILE = "_plan.json"  # in a folder of shards: the indices the last plan made
INPUTS_FILE = "_inputs.json"  # in ROOT/shards: the number of each input (tar, folder, row group) ever planned
# Input number N writes the shards N * PARTS_PER_INPUT + part (part 0, 1, ...): adding an input never
# renames the shards of another.
PARTS_PER_INPUT = 10_000
CATALOG_FILE = "catalog.duckdb"
# The Parquet tables of a root, relative to it: what the catalog's views read.
TABLE_GLOBS = {
    "samples": "shards/*.parquet",
    "captions": "captions/*/*.parquet",
    "vocab": "vocab/*.parquet",
    "density": "density/*/*.parquet",
    "embeddings": "embeddings/*/*.parquet",
    "grounding": "grounding/*/*.parquet",
    "noun_calibration": "calibration/*.parquet",
    "duplicates": "duplicates/*.parquet",
    "runs": "history/*.parquet",
}
# The per-shard tables (one folder per field or model, NNNNN.parquet per shard).
PER_SHARD_TABLES = ("captions", "density", "embeddings", "grounding")
# Folders (and the catalog) a dataset root's own stages write; no user-chosen output may take them.
# A training run's folder: its saved config and its checkpoints (``densecurate train``'s run_dir).
TRAIN_CONFIG_FILE = "config.yaml"
CHECKPOINTS_DIR = "checkpoints"
RESERVED_NAMES = frozenset(
    {
        "shards",
        "captions",
        "density",
        "vocab",
        "embeddings",
        "grounding",
        "calibration",
        "duplicates",
        "history",
        CATALOG_FILE,
    }
)


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


def shard_indices_in(directory: Path) -> list[int]:
    """Indices of the shards in ``directory`` that have a stats file (written last: complete)."""
    return sorted(int(p.name.removesuffix(STATS_SUFFIX)) for p in directory.glob(f"*{STATS_SUFFIX}"))


def is_dataset_root(path: Path) -> bool:
    """Whether ``path`` is a dataset root (it has a catalog or a shards folder)."""
    return (path / CATALOG_FILE).is_file() or (path / "shards").is_dir()


def shard_files_in(directory: Path, index: int) -> ShardFiles:
    """The tar, Parquet and stats file of shard ``index`` in ``directory``."""
    stem = shard_stem(index)
    return ShardFiles(
        tar=directory / f"{stem}.tar", parquet=directory / f"{stem}.parquet", stats=directory / f"{stem}{STATS_SUFFIX}"
    )


@dataclass(frozen=True)
class DatasetLayout:
    """Every path and glob under one dataset root::

    ROOT/shards/NNNNN.{tar,parquet} + NNNNN_stats.json    the shard stage (NNNNN = input x 10,000 + part)
    ROOT/captions/NAME/NNNNN.parquet                      one folder per captioner
    ROOT/density/FIELD/NNNNN.parquet                      one folder per caption field
    ROOT/vocab/FIELD.parquet                              noun counts per field
    ROOT/embeddings/MODEL/NNNNN.parquet                   CLIP image embeddings, one folder per CLIP model
    ROOT/grounding/FIELD/NNNNN.parquet                    image-caption scores and grounded nouns per field
    ROOT/calibration/FIELD.parquet                        per-noun grounding calibration of a field
    ROOT/duplicates/MODEL.parquet                         exact and near-duplicate clusters per CLIP model
    ROOT/catalog.duckdb                                   DuckDB views over the tables above
    """

    root: Path

    @property
    def shards_dir(self) -> Path:
        return self.root / "shards"

    @property
    def catalog_path(self) -> Path:
        return self.root / CATALOG_FILE

    @property
    def captions_root(self) -> Path:
        return self.root / "captions"

    @property
    def density_root(self) -> Path:
        return self.root / "density"

    @property
    def vocab_dir(self) -> Path:
        return self.root / "vocab"

    def shard_files(self, index: int) -> ShardFiles:
        return shard_files_in(self.shards_dir, index)

    @property
    def inputs_file(self) -> Path:
        return self.shards_dir / INPUTS_FILE

    def shard_indices(self) -> list[int]:
        """Indices of the finished shards (those with a stats file)."""
        return shard_indices_in(self.shards_dir)

    def captions_dir(self, name: str) -> Path:
        return self.captions_root / name

    def caption_file(self, name: str, index: int) -> Path:
        return self.captions_dir(name) / f"{shard_stem(index)}.parquet"

    def caption_tables(self, name: str) -> list[Path]:
        """The caption tables of one captioner, in shard order."""
        return sorted(p for p in self.captions_dir(name).glob("*.parquet") if p.stem.isdigit())

    def caption_names(self) -> list[str]:
        """The captioners that have a folder under ``captions/``."""
        root = self.captions_root
        return sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []

    def density_dir(self, field: str) -> Path:
        return self.density_root / field

    def density_file(self, field: str, index: int) -> Path:
        return self.density_dir(field) / f"{shard_stem(index)}.parquet"

    def density_glob(self, field: str = "*") -> str:
        """The density tables of one field, or of every field (``*``)."""
        return str(self.density_dir(field) / "*.parquet")

    def vocab_file(self, field: str) -> Path:
        return self.vocab_dir / f"{field}.parquet"

    def embeddings_dir(self, model: str) -> Path:
        return self.root / "embeddings" / model

    def embedding_file(self, model: str, index: int) -> Path:
        return self.embeddings_dir(model) / f"{shard_stem(index)}.parquet"

    def grounding_dir(self, field: str) -> Path:
        return self.root / "grounding" / field

    def grounding_file(self, field: str, index: int) -> Path:
        return self.grounding_dir(field) / f"{shard_stem(index)}.parquet"

    def calibration_file(self, field: str) -> Path:
        return self.root / "calibration" / f"{field}.parquet"

    def duplicates_file(self, model: str) -> Path:
        return self.root / "duplicates" / f"{model}.parquet"

    @property
    def history_dir(self) -> Path:
        """One Parquet file per stage run over the root (the catalog's ``runs`` view)."""
        return self.root / "history"

    def table_glob(self, table: str) -> str:
        """The glob of a catalog table's Parquet files (``samples``, ``captions``, ``vocab``, ``density``)."""
        return str(self.root / TABLE_GLOBS[table])

    def tables(self) -> list[Path]:
        """Every table of the root besides the shards' own (what the catalog's views read)."""
        return sorted(p for table in TABLE_GLOBS if table != "samples" for p in self.root.glob(TABLE_GLOBS[table]))

    def per_shard_tables(self) -> list[Path]:
        """Every per-shard table (captions, density, embeddings, grounding) of the root."""
        return sorted(p for table in PER_SHARD_TABLES for p in self.root.glob(TABLE_GLOBS[table]) if p.stem.isdigit())

    def tables_of_shards(self, indices: set[int]) -> list[Path]:
        """The per-shard tables made from the shards ``indices``."""
        stems = {f"{shard_stem(i)}.parquet" for i in indices}
        return [p for p in self.per_shard_tables() if p.name in stems]
