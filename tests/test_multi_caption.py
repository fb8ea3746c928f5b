"""Several captions per image: curate keeps each field's passing caption with its scores (KEY.captions.json),
features encode each, and training draws one per sample and step, by weight, exactly resumable."""

from __future__ import annotations

import io
import json
import math
import shutil
import tarfile
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import save_file

from densecurate.cli import build_parser
from densecurate.commands import curate_config_from_args
from pipeline.sample_data import write_sample_folder
from pipeline.stages.caption import run_caption_stage
from pipeline.stages.curate import CurateStage, run_curate_stage
from pipeline.stages.features import run_features_stage
from pipeline.stages.ground import run_ground_stage
from pipeline.stages.score import run_score_stage
from pipeline.stages.shard import run_shard_stage
from pipeline.store.parquet_meta import read_meta, write_table_atomic
from schemas.caption_config import CaptionConfig
from schemas.errors import ConfigError
from schemas.features_config import FeaturesConfig
from schemas.ground_config import GroundConfig
from schemas.layout import DatasetLayout
from schemas.score_config import CurateConfig, ScoreConfig
from schemas.shard_config import ShardConfig
from schemas.tables import GROUNDING_SCHEMA
from schemas.train_config import TrainConfig, load_train_config
from trainer.data import (
    CAPTION_STREAM,
    CaptionSampling,
    CuratedDataset,
    FeatureDataset,
    _StepOrdered,
    seeded_generator,
)
from trainer.errors import CorruptFeatureError
from trainer.features import NULL_CAPTION_FILE, FeatureEncoder, Features

REPO = Path(__file__).resolve().parents[1]
TINY_YAML = REPO / "trainer" / "configs" / "tiny.yaml"
FIELDS = ("alt_text", "cheap")
RULES = {"min_nouns": 2}
SEED = 5


def rows_of(folder: Path) -> list[dict]:
    return [r for path in sorted(folder.glob("*.parquet")) for r in pq.read_table(path).to_pylist()]


def members(folder: Path, ext: str) -> dict[str, bytes]:
    found = {}
    for tar in sorted(folder.glob("*.tar")):
        with tarfile.open(tar) as tf:
            for member in tf:
                key, _, member_ext = member.name.partition(".")
                if member_ext == ext:
                    found[key] = tf.extractfile(member).read()
    return found


@pytest.fixture(scope="module")
def curated(ray_local, tmp_path_factory, tiny_llava_dir, tiny_pixart_dir, tiny_clip_dir) -> dict[str, Path]:
    """Real photos; a tiny captioner's captions and the alt texts, both scored, the captions also grounded (the
    tiny CLIP, no grounding rule asking for it); curated with the alt text first and the captions second, captions
    of fewer than 2 nouns dropped; then encoded. Also: the alt text alone, and the alt text with a field that
    captioned 2 keys per shard."""
    base = tmp_path_factory.mktemp("multi")
    root = base / "root"
    run_shard_stage([write_sample_folder(base / "photos")], root, ShardConfig(shard_size=5))
    settings = {"batch_size": 4, "max_new_tokens": 24, "prompt": "pixart"}
    for name, extra in (("cheap", {}), ("few", {"sample": 2})):
        config = {"name": name, "model": {"model": str(tiny_llava_dir)}, "generation": settings, **extra}
        run_caption_stage(root, CaptionConfig.model_validate(config))
    run_score_stage(root, ScoreConfig(fields=(*FIELDS, "few"), min_count=1))
    clip = {"model": f"local-dir:{tiny_clip_dir}"}
    grounding = {"fields": ["cheap"], "clip": clip, "batch_size": 8, "grounding": {"z_threshold": 0.0}}
    run_ground_stage(root, GroundConfig.model_validate(grounding))
    run_curate_stage(root, base / "curated", CurateConfig(fields=FIELDS, rules=RULES))
    run_curate_stage(root, base / "single", CurateConfig(field="alt_text", rules=RULES))
    run_curate_stage(root, base / "partial", CurateConfig(fields=("alt_text", "few")))
    features = FeaturesConfig(vae=str(tiny_pixart_dir), text_encoder=str(tiny_pixart_dir), resolution=64, batch_size=8)
    run_features_stage(base / "curated", base / "features", features)
    return {name: base / name for name in ("root", "curated", "single", "partial", "features")}


def valid_nouns(root: Path, field: str) -> dict[str, int]:
    vocab = {r["noun"] for r in pq.read_table(root / "vocab" / f"{field}.parquet").to_pylist() if r["valid"]}
    return {r["key"]: sum(n in vocab for n in r["nouns"]) for r in rows_of(root / "density" / field)}


def expected_entry(root: Path, field: str, key: str, text: str) -> dict:
    """A caption's entry from the density, vocabulary and (when the field is grounded) grounding rows, by hand."""
    density = {r["key"]: r for r in rows_of(root / "density" / field)}[key]
    grounding = {r["key"]: r for r in rows_of(root / "grounding" / field)}.get(key, {})
    return {
        "text": text,
        "field": field,
        "nouns": density["n_nouns"],
        "valid_nouns": valid_nouns(root, field)[key],
        "grounded_nouns": grounding.get("n_grounded_nouns"),
        "grounded_share": grounding.get("grounded_share"),
        "clip_score": grounding.get("clip_score"),
    }


@pytest.mark.slow
def test_curate_keeps_each_fields_passing_caption_with_its_scores(curated):
    root = curated["root"]
    density = {r["key"]: r for r in rows_of(root / "density" / "cheap")}
    cheap = {r["key"]: r for r in rows_of(root / "captions" / "cheap")}
    alt = {r["key"]: r["alt_text"] for r in rows_of(root / "shards") if r["status"] == "ok"}
    found = {k: json.loads(v) for k, v in members(curated["curated"], "captions.json").items()}
    assert found and set(found) == set(members(curated["curated"], "jpg"))
    dropped = 0
    for key, captions in found.items():
        assert captions[0] == expected_entry(root, "alt_text", key, alt[key] or "")
        row = cheap[key]
        text = (row["caption"] or "") if row["status"] == "ok" else ""
        passes = text.strip() and density[key]["n_tokens"] >= 1 and density[key]["n_nouns"] >= RULES["min_nouns"]
        if passes:
            assert captions[1:] == [expected_entry(root, "cheap", key, text)]
            assert captions[1]["grounded_nouns"] is not None  # read from the current grounding, with no rule
        else:
            assert len(captions) == 1
            dropped += 1
    assert dropped and dropped < len(found)  # the rule drops some of the second field's captions, not all
    rows = {r["key"]: r for r in rows_of(curated["curated"]) if r["status"] == "ok"}
    assert {k: r["n_captions"] for k, r in rows.items()} == {k: len(c) for k, c in found.items()}
    kept = Counter(c["field"] for captions in found.values() for c in captions if c["text"])
    by_field: Counter[str] = Counter()
    for path in curated["curated"].glob("*_stats.json"):
        by_field.update(json.loads(path.read_text())["captions_by_field"])
    assert by_field == kept and set(by_field) == set(FIELDS)


@pytest.mark.slow
def test_grounding_is_read_only_when_current_and_is_part_of_the_fingerprint(curated, tmp_path):
    config = CurateConfig(fields=FIELDS, rules=RULES)
    jobs = CurateStage(curated["root"], tmp_path / "out", config).plan()
    layout = DatasetLayout(curated["root"].resolve())
    assert jobs and all(job.others == (("cheap", layout.grounding_file("cheap", job.index)),) for job in jobs)
    root = tmp_path / "root"
    shutil.copytree(curated["root"], root)
    for path in (root / "grounding" / "cheap").glob("*.parquet"):  # as if made from an earlier density
        meta = {**read_meta(path), "density_fingerprint": "earlier"}
        write_table_atomic(path, pq.read_table(path).to_pylist(), GROUNDING_SCHEMA, meta)
    stale = CurateStage(root, tmp_path / "out", config).plan()
    assert all(job.others == (("cheap", None),) for job in stale)
    assert {j.fingerprint for j in jobs}.isdisjoint(j.fingerprint for j in stale)


@pytest.mark.slow
def test_one_field_curates_as_before(curated):
    assert not members(curated["single"], "captions.json")
    assert all(r["n_captions"] is None for r in rows_of(curated["single"]))
    assert not any("captions_by_field" in json.loads(p.read_text()) for p in curated["single"].glob("*_stats.json"))


@pytest.mark.slow
def test_a_secondary_field_may_caption_some_keys_only(curated):
    few = {r["key"]: r["caption"] for r in rows_of(curated["root"] / "captions" / "few") if r["status"] == "ok"}
    found = {k: json.loads(v) for k, v in members(curated["partial"], "captions.json").items()}
    assert len(found) == len(members(curated["partial"], "jpg")) > len(few)
    assert {k: [c["field"] for c in captions] for k, captions in found.items()} == {
        k: ["alt_text", "few"] if (few.get(k) or "").strip() else ["alt_text"] for k in found
    }


@pytest.mark.slow
def test_features_encode_every_caption(curated, tiny_pixart_dir):
    encoder = FeatureEncoder(str(tiny_pixart_dir), str(tiny_pixart_dir), resolution=64, device="cpu")
    captions = {k: json.loads(v) for k, v in members(curated["features"], "captions.json").items()}
    assert captions == {k: json.loads(v) for k, v in members(curated["curated"], "captions.json").items()}
    feats = {k: Features.from_bytes(v) for k, v in members(curated["features"], "feat.safetensors").items()}
    two = [k for k, c in captions.items() if len(c) == 2]
    assert two and len(two) < len(captions)
    for key, listed in captions.items():
        assert len(feats[key].extra_t5) == len(listed) - 1
    for key in two[:3]:
        (alone,) = encoder.encode_texts([captions[key][1]["text"]])
        (first,) = encoder.encode_texts([captions[key][0]["text"]])
        assert torch.allclose(feats[key].extra_t5[0].float(), alone.float(), atol=1e-3)
        assert torch.allclose(feats[key].t5.float(), first.float(), atol=1e-3)
    rows = {r["key"]: r["n_captions"] for r in rows_of(curated["features"])}
    assert rows == {k: len(c) for k, c in captions.items()}


CAPTIONS = [
    {"text": "a", "grounded_nouns": 1, "clip_score": 30.0, "grounded_share": None},
    {"text": "b", "grounded_nouns": 3, "clip_score": None, "grounded_share": None},
    {"text": "c", "grounded_nouns": 2, "clip_score": 25.0, "grounded_share": None},
]


@pytest.mark.parametrize(
    ("sampling", "expected"),
    [
        (CaptionSampling("first"), [1.0, 0.0, 0.0]),
        (CaptionSampling("uniform"), [1.0, 1.0, 1.0]),
        (CaptionSampling("weighted", "grounded_nouns", 2.0), [math.exp(x / 2) for x in (1, 3, 2)]),
        (CaptionSampling("weighted", "clip_score", 5.0), [math.exp(6), 0.0, math.exp(5)]),  # no score: never
        (CaptionSampling("weighted", "clip_score", 0.01), [1.0, 0.0, 0.0]),  # exp(3000) would overflow
        (CaptionSampling("weighted", "grounded_share", 1.0), [1.0, 1.0, 1.0]),  # none has a score: uniform
    ],
    ids=["first", "uniform", "weighted", "null-never", "cold", "all-null"],
)
def test_drawn_frequencies_follow_the_weights(sampling, expected):
    """Each caption's count over 20,000 positions within 5 standard deviations of its binomial mean (a chance
    of about 6e-7 per count of a correct draw falling outside); a caption of chance 0 or 1 exactly."""
    expected = [e / sum(expected) for e in expected]
    draws = 20_000
    dataset = _StepOrdered([], seed=7, caption_dropout=0.0, sampling=sampling)
    counts = Counter(dataset.caption_index(position, CAPTIONS) for position in range(draws))
    for index, p in enumerate(expected):
        assert abs(counts[index] - draws * p) <= 5 * math.sqrt(draws * p * (1 - p)) + 1e-9, (index, counts)


def test_draws_are_a_function_of_seed_and_position():
    """A resume builds a new dataset and asks for later positions first: it gets the same captions."""
    sampling = CaptionSampling("uniform")
    run = _StepOrdered([], seed=7, caption_dropout=0.0, sampling=sampling)
    drawn = [run.caption_index(p, CAPTIONS) for p in range(2_000)]
    resumed = _StepOrdered([], seed=7, caption_dropout=0.5, sampling=sampling)  # dropout draws elsewhere
    assert [resumed.caption_index(p, CAPTIONS) for p in reversed(range(2_000))] == drawn[::-1]
    other_seed = _StepOrdered([], seed=8, caption_dropout=0.0, sampling=sampling)
    assert [other_seed.caption_index(p, CAPTIONS) for p in range(2_000)] != drawn


def train_config(curated: dict[str, Path], tiny_pixart_dir: Path, *overrides: str) -> TrainConfig:
    base = [f"run_dir={curated['root'].parent}/run", f"pipeline={tiny_pixart_dir}"]
    base += [f"data.features={curated['features']}", f"data.curated={curated['curated']}"]
    return load_train_config(TINY_YAML.read_text(), [*base, "caption_dropout=0", *overrides], "tiny.yaml")


def documented_draw(config: TrainConfig, position: int, captions: list[dict]) -> int:
    """The draw as documented, by hand: softmax(score / temperature) over the captions with a score (uniform
    when uniform or none has one), from the generator of (seed, position, caption stream)."""
    if len(captions) < 2:
        return 0
    scores = [c[config.data.caption_weight] for c in captions]
    if config.data.caption_sampling == "uniform" or all(s is None for s in scores):
        weights = [1.0] * len(captions)
    else:
        top = max(s for s in scores if s is not None)
        weights = [0.0 if s is None else math.exp((s - top) / config.data.caption_temperature) for s in scores]
    probabilities = torch.tensor(weights, dtype=torch.float64) / sum(weights)
    return int(torch.multinomial(probabilities, 1, generator=seeded_generator(config.seed, position, CAPTION_STREAM)))


@pytest.mark.slow
@pytest.mark.parametrize(
    "sampling", [["data.caption_sampling=uniform"], ["data.caption_sampling=weighted", "data.caption_temperature=0.5"]]
)
def test_a_training_steps_batch_holds_the_drawn_captions_states(curated, tiny_pixart_dir, sampling):
    from trainer.loop import _open_batches

    config = train_config(curated, tiny_pixart_dir, *sampling)
    batches = _open_batches(config, torch.device("cpu"), start=0, rank=0, world=1)
    dataset: FeatureDataset = batches.loader.dataset
    non_first = 0
    for step, batch in zip(range(4), batches.loader, strict=False):
        _, t5, _ = batches.tensors(batch)  # what the step's loss is computed from
        for i in range(config.data.batch_size):
            position = step * config.data.batch_size + i
            ref = dataset.ref_at(position)
            feats = Features.from_bytes(ref.read("feat.safetensors"))
            drawn = documented_draw(config, position, json.loads(ref.read("captions.json")))
            states = feats.caption_states(drawn).float()
            assert int(batch["caption_index"][i]) == drawn
            assert torch.equal(t5[i, : states.shape[0]], states) and not t5[i, states.shape[0] :].any()
            non_first += drawn > 0
    assert non_first > 0


@pytest.mark.slow
def test_curated_training_data_encodes_the_drawn_caption(curated, tiny_pixart_dir):
    from trainer.loop import _open_batches

    config = train_config(curated, tiny_pixart_dir, "data.source=curated", "data.caption_sampling=uniform")
    batches = _open_batches(config, torch.device("cpu"), start=0, rank=0, world=1)
    dataset: CuratedDataset = batches.loader.dataset
    non_first = 0
    for step, batch in zip(range(3), batches.loader, strict=False):
        _, t5, _ = batches.tensors(batch)
        for i in range(config.data.batch_size):
            position = step * config.data.batch_size + i
            captions = json.loads(dataset.ref_at(position).read("captions.json"))
            drawn = documented_draw(config, position, captions)
            assert batch["caption"][i] == captions[drawn]["text"]
            (alone,) = batches.online.encode_texts([captions[drawn]["text"]])
            assert torch.allclose(t5[i, : alone.shape[0]], alone.float(), atol=1e-2)
            non_first += drawn > 0
    assert non_first > 0


@pytest.mark.slow
def test_feature_items_are_the_same_on_resume_and_dropout_follows_the_draw(curated):
    settings = {"seed": SEED, "max_tokens": 120, "scaling_factor": 0.18, "sampling": CaptionSampling("uniform")}
    run = FeatureDataset(curated["features"], caption_dropout=0.0, **settings)
    positions = range(3 * len(run))  # three epochs
    items = [run[p] for p in positions]
    resumed = FeatureDataset(curated["features"], caption_dropout=0.0, **settings)
    for p in reversed(positions):
        again = resumed[p]
        assert again["caption_index"] == items[p]["caption_index"] and torch.equal(again["t5"], items[p]["t5"])
    assert any(item["caption_index"] for item in items)
    dropped = FeatureDataset(curated["features"], caption_dropout=1.0, **settings)
    for p in positions[:8]:
        item = dropped[p]
        assert item["caption_index"] == items[p]["caption_index"]  # drawn, then dropped
        assert torch.equal(item["t5"][: dropped.null_t5.shape[0]], dropped.null_t5.float())


@pytest.mark.slow
def test_curated_without_captions_json_trains_on_key_txt(curated):
    dataset = CuratedDataset(
        curated["single"], seed=SEED, resolution=64, caption_dropout=0.0, sampling=CaptionSampling("uniform")
    )
    for p in range(len(dataset)):
        item, ref = dataset[p], dataset.ref_at(p)
        assert item["caption_index"] == 0 and item["caption"] == (ref.read("txt") or b"").decode()


def write_feature_shard(folder: Path, samples: dict[str, tuple[Features, list[dict]]]) -> Path:
    """One feature shard of hand-made samples (``KEY.feat.safetensors`` and ``KEY.captions.json``) and the null
    caption."""
    folder.mkdir()
    with tarfile.open(folder / "00000.tar", "w") as tar:
        for key, (feats, captions) in samples.items():
            for ext, data in (("feat.safetensors", feats.to_bytes()), ("captions.json", json.dumps(captions).encode())):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    save_file({"t5": torch.zeros(1, 4)}, str(folder / NULL_CAPTION_FILE))
    return folder


@pytest.mark.parametrize(
    ("extra", "listed", "message"),
    [
        ([torch.full((2, 4), float("nan"))], 2, "holds NaN or infinite values in t5_1"),
        ([torch.ones(2, 4)], 3, "lists 3 captions in its captions.json but its feat.safetensors holds the states of 2"),
    ],
    ids=["nan", "mismatch"],
)
def test_a_further_captions_states_are_checked(tmp_path, extra, listed, message):
    feats = Features(vae=torch.ones(8, 2, 2), t5=torch.ones(3, 4), extra_t5=extra)
    captions = [{"text": str(i), "grounded_nouns": i} for i in range(listed)]
    folder = write_feature_shard(tmp_path / "feats", {"k": (feats, captions)})
    dataset = FeatureDataset(
        folder, seed=0, max_tokens=8, scaling_factor=1.0, caption_dropout=0.0, sampling=CaptionSampling("uniform")
    )
    with pytest.raises(CorruptFeatureError, match=message):
        dataset[0]


def test_caption_sampling_settings():
    config = load_train_config(TINY_YAML.read_text(), ["run_dir=r", "pipeline=p"], "tiny.yaml")
    assert (config.data.caption_sampling, config.data.caption_weight, config.data.caption_temperature) == (
        "first",
        "grounded_nouns",
        1.0,
    )
    for override, message in [
        ("data.caption_sampling=best", "data.caption_sampling: Input should be 'first', 'uniform' or 'weighted'"),
        ("data.caption_weight=length", "data.caption_weight: Input should be 'nouns'"),
        ("data.caption_temperature=0", "data.caption_temperature: Input should be greater than 0"),
    ]:
        with pytest.raises(ConfigError, match=message):
            load_train_config(TINY_YAML.read_text(), ["run_dir=r", "pipeline=p", override], "tiny.yaml")


def curate_args(*argv: str) -> CurateConfig:
    return curate_config_from_args(build_parser().parse_args(["curate", "root", "--out", "out", *argv]))


def test_curate_fields_from_the_command_line():
    assert curate_args("--field", "alt_text").fields == ("alt_text",)
    config = curate_args("--field", "alt_text", "--field", "cheap", "--fields", "strong, best")
    assert (config.field, config.fields) == ("alt_text", ("alt_text", "cheap", "strong", "best"))
    assert CurateConfig(field="cheap").fields == ("cheap",) and CurateConfig(fields=["a", "b"]).field == "a"
    with pytest.raises(ValueError, match=r"fields alt_text, alt_text, cheap name 'alt_text' twice"):
        curate_args("--fields", "alt_text,cheap", "--field", "alt_text")
    with pytest.raises(ValueError, match="is not the first of fields"):
        CurateConfig(field="b", fields=("a", "b"))
