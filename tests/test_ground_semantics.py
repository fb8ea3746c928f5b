"""What grounding means, tested with a CLIP that knows something: a tiny open_clip trained here on synthetic
shapes (tests/shapes_clip.py), loaded through ``local-dir:`` like a user's model, run through the real
shard -> score -> ground stages on held-out images.

Fields of the root: ``alt_text`` names every drawn shape plus one that is not drawn; the captioner ``true``
names exactly the drawn shapes; the captioner ``wrong`` describes another scene with other shapes.
"""

from __future__ import annotations

import random
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline.stages.ground import run_ground_stage
from pipeline.stages.score import run_score_stage
from pipeline.stages.shard import run_shard_stage
from pipeline.store.parquet_meta import write_table_atomic
from schemas.ground_config import GroundConfig
from schemas.score_config import ScoreConfig
from schemas.shard_config import ShardConfig
from schemas.tables import CAPTIONS_SCHEMA
from tests.shapes_clip import COLOURS, SHAPES, caption_for, crop, draw_scene, held_out_scenes, jpeg

SCENES = 100
Z_THRESHOLD = 2.5  # the shapes model's separation (tests/shapes_clip.py); the stage's default is 2.0
DUP_THRESHOLD = 0.8  # its image embeddings are coarse: copies score >= 0.8, scenes of other shapes below
pytestmark = pytest.mark.slow


def _write_captioner(root: Path, name: str, captions: dict[str, str]) -> None:
    """A captioner's tables as the caption stage writes them (one row per key of each shard)."""
    for parquet in sorted((root / "shards").glob("*.parquet")):
        keys = [r["key"] for r in pq.read_table(parquet).to_pylist() if r["status"] == "ok"]
        rows = [
            {"key": k, "captioner": name, "status": "ok", "caption": captions[k], "raw_caption": captions[k]}
            for k in keys
        ]
        meta = {"fingerprint": f"{name}-{parquet.stem}", "stats": {"count": len(rows)}}
        write_table_atomic(root / "captions" / name / parquet.name, rows, CAPTIONS_SCHEMA, meta)


def _ground(root: Path, clip_dir: Path, fields: list[str]) -> None:
    grounding = {"z_threshold": Z_THRESHOLD}
    clip = {"model": f"local-dir:{clip_dir}"}
    duplicates = {"threshold": DUP_THRESHOLD}
    config = {"fields": fields, "clip": clip, "grounding": grounding, "duplicates": duplicates}
    run_ground_stage(root, GroundConfig.model_validate(config))


@pytest.fixture(scope="module")
def shapes_root(ray_local, shapes_clip_dir, tmp_path_factory) -> tuple[Path, dict]:
    """Held-out scenes; alt text names the drawn shapes and one absent one; ``true`` and ``wrong`` captioners."""
    base = tmp_path_factory.mktemp("shapes")
    folder = base / "images"
    folder.mkdir()
    rng = random.Random(7)
    scenes = held_out_scenes(seed=101, n=SCENES)
    truth: dict[str, dict] = {}
    true_captions, wrong_captions = {}, {}
    for i, (image, shapes) in enumerate(scenes):
        drawn = {kind for _, kind in shapes}
        absent = rng.choice([s for s in SHAPES if s not in drawn])
        other = next(s for _, s in rng.sample(scenes, SCENES) if {k for _, k in s} != drawn)
        image.save(folder / f"s{i:03d}.png")
        (folder / f"s{i:03d}.txt").write_text(caption_for([*shapes, (rng.choice(COLOURS), absent)], rng))
        key = f"folder-s{i:03d}"
        truth[key] = {"drawn": drawn, "absent": absent}
        true_captions[key] = caption_for(shapes, rng)
        wrong_captions[key] = caption_for(other, rng)
    root = base / "root"
    run_shard_stage([folder], root, ShardConfig(shard_size=25, image={"resize": 0, "min_size": 32}))
    _write_captioner(root, "true", true_captions)
    _write_captioner(root, "wrong", wrong_captions)
    run_score_stage(root, ScoreConfig(fields=("alt_text", "true", "wrong")))
    _ground(root, shapes_clip_dir, ["alt_text", "true", "wrong"])
    return root, truth


def _grounding(root: Path, field: str) -> dict[str, dict]:
    tables = sorted((root / "grounding" / field).glob("*.parquet"))
    return {r["key"]: r for p in tables for r in pq.read_table(p).to_pylist()}


def test_drawn_shapes_are_grounded_and_named_absent_ones_are_not(shapes_root):
    root, truth = shapes_root
    drawn, absent = [], []
    for key, row in _grounding(root, "alt_text").items():
        for noun, grounded in zip(row["nouns"], row["grounded"], strict=True):
            if noun in truth[key]["drawn"]:
                drawn.append(grounded)
            elif noun == truth[key]["absent"]:
                absent.append(not grounded)
    assert len(drawn) >= 150 and len(absent) == SCENES
    assert sum(drawn) / len(drawn) >= 0.9, f"drawn shapes grounded: {sum(drawn)}/{len(drawn)}"
    assert sum(absent) / len(absent) >= 0.9, f"absent shapes judged not grounded: {sum(absent)}/{len(absent)}"


def test_grounded_share_separates_honest_from_hallucinating_captions(shapes_root):
    root, _ = shapes_root

    def share(rows: dict[str, dict]) -> float:
        return sum(r["n_grounded_nouns"] for r in rows.values()) / sum(r["n_nouns"] for r in rows.values())

    honest, padded, wrong = (_grounding(root, f) for f in ("true", "alt_text", "wrong"))
    assert share(honest) > share(padded) > share(wrong)


def test_the_true_caption_outscores_a_wrong_one(shapes_root):
    root, _ = shapes_root
    true, wrong = _grounding(root, "true"), _grounding(root, "wrong")
    wins = [true[k]["clip_score"] > wrong[k]["clip_score"] for k in true]
    assert len(wins) == SCENES
    assert sum(wins) / len(wins) >= 0.9, f"true caption ranked first in {sum(wins)}/{len(wins)}"


def test_reencoded_and_cropped_copies_are_duplicates_and_distinct_scenes_are_not(ray_local, shapes_clip_dir, tmp_path):
    """One scene per shape kind (nothing in common between scenes), each with a JPEG and a cropped copy:
    exactly one cluster per scene, holding the scene and its two copies, the scene kept."""
    folder = tmp_path / "images"
    folder.mkdir()
    rng = random.Random(11)
    for kind, colour in zip(SHAPES, COLOURS, strict=True):
        image, shapes = draw_scene(rng, [(colour, kind)])
        caption = caption_for(shapes, rng)
        for name, version in (("a", image), ("b_jpeg", jpeg(image, quality=75)), ("c_crop", crop(image, 3))):
            version.save(folder / f"{kind}_{name}.png")
            (folder / f"{kind}_{name}.txt").write_text(caption)
    root = tmp_path / "root"
    run_shard_stage([folder], root, ShardConfig(shard_size=6, image={"resize": 0, "min_size": 32}))
    run_score_stage(root, ScoreConfig())
    _ground(root, shapes_clip_dir, ["alt_text"])
    rows = pq.read_table(next((root / "duplicates").glob("*.parquet"))).to_pylist()
    clusters: dict[str, set[str]] = {}
    for row in rows:
        clusters.setdefault(row["cluster"], set()).add(row["key"])
    expected = {f"folder-{k}_a": {f"folder-{k}_a", f"folder-{k}_b_jpeg", f"folder-{k}_c_crop"} for k in SHAPES}
    assert clusters == expected
    assert all(r["kind"] == ("semantic" if not r["kept"] else None) for r in rows)
