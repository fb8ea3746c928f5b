"""Concept density: nouns with spaCy, PixArt-α Table-1 numbers worked out by hand, the score stage on Ray."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from densecurate.cli import main
from pipeline.catalog import run_query
from pipeline.density_stats import table1_from_nouns
from pipeline.nouns import NounExtractor, SpacyModelNotAvailableError
from pipeline.score_stage import run_score_stage
from pipeline.shard_stage import run_shard_stage
from schemas.score_config import NounSettings, ScoreConfig
from schemas.shard_config import ShardConfig
from tests import image_factory as mk

# Worked out by hand: nouns dog+grass x11, cat x10, paris+tower x1, one caption missing.
DOG, CAT, PARIS = "A dog runs on the grass.", "A cat sleeps.", "Paris has a tower."
CORPUS = [DOG] * 11 + [CAT] * 10 + [PARIS] + [None]
HAND = {
    "n_captions": 23,
    "distinct_nouns": 5,  # dog, grass, cat, paris, tower
    "valid_distinct_nouns": 2,  # dog and grass (11 > 10); cat is seen exactly 10 times: not valid
    "total_nouns": 11 * 2 + 10 + 2,  # 34
    "nouns_per_caption": 34 / 23,
}


@pytest.fixture(scope="module")
def extractor():
    return NounExtractor(NounSettings())


# Unambiguous on purpose: an irregular and a regular plural, three proper nouns, no word that could be
# tagged either way. 11 words (the full stop is not one); determiners, the verb and prepositions are not nouns.
FARM = "The children feed the horses near the Eiffel Tower in Paris."


def test_nouns_are_lemmas_of_noun_and_propn(extractor):
    (farm,) = extractor.extract([FARM])
    assert farm.nouns == ("child", "horse", "eiffel", "tower", "paris")  # lemmas, lower-cased, in order
    assert farm.n_tokens == 11
    assert extractor.extract([PARIS])[0].nouns == ("paris", "tower")
    common = NounExtractor(NounSettings(nouns="common"), nlp=extractor.nlp)
    assert common.extract([FARM])[0].nouns == ("child", "horse")
    assert common.extract([PARIS])[0].nouns == ("tower",)


def test_only_tagging_components_run(extractor):
    assert extractor.nlp.pipe_names == ["tok2vec", "tagger", "attribute_ruler", "lemmatizer"]


def test_identical_captions_are_tagged_once_and_counted_every_time():
    ex = NounExtractor(NounSettings())
    found = ex.extract(CORPUS)
    assert ex.texts_tagged == 3
    assert sum(len(f.nouns) for f in found) == HAND["total_nouns"]
    assert found[-1].nouns == () and found[-1].n_tokens == 0


def test_table1_numbers_match_the_hand_count(extractor):
    found = extractor.extract(CORPUS)
    row = table1_from_nouns("alt_text", (f.nouns for f in found), min_count=10, missing=1)
    assert {k: row.as_json()[k] for k in HAND} == HAND
    assert row.vn_dn() == "2 / 5 = 40.0%"


def test_min_count_edges(extractor):
    nouns = [f.nouns for f in extractor.extract(CORPUS)]
    assert table1_from_nouns("f", nouns, min_count=9).valid_distinct_nouns == 3  # cat: 10 > 9
    assert table1_from_nouns("f", nouns, min_count=11).valid_distinct_nouns == 0  # 11 is not > 11
    assert table1_from_nouns("f", nouns, min_count=0).valid_distinct_nouns == 5


def test_missing_spacy_model_is_one_clear_sentence():
    with pytest.raises(SpacyModelNotAvailableError, match="'no_such_pipeline' is not installed"):
        NounExtractor(NounSettings(spacy_model="no_such_pipeline"))


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".parquet"])
def test_density_command_json(tmp_path, capsys, suffix):
    path = tmp_path / f"captions{suffix}"
    rows = [{"text": t, "other": i} for i, t in enumerate(CORPUS)]
    if suffix == ".jsonl":
        path.write_text("\n".join(json.dumps(r) for r in rows))
    elif suffix == ".csv":
        path.write_text("text,other\n" + "\n".join(f"{r['text'] or ''},{r['other']}" for r in rows))
    else:
        pq.write_table(pa.Table.from_pylist(rows), path)
    assert main(["density", str(path), "--column", "text", "--format", "json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert {k: got[k] for k in HAND} == HAND
    assert main(["density", str(path), "--column", "text", "--nouns", "common", "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["distinct_nouns"] == 4
    assert main(["density", str(path), "--column", "nope"]) == 2
    assert "no column 'nope'" in capsys.readouterr().err


@pytest.fixture(scope="module")
def scored_root(ray_local, tmp_path_factory):
    """The hand corpus as alt texts of real photos, sharded and scored."""
    base = tmp_path_factory.mktemp("density")
    photos = base / "photos"
    photos.mkdir()
    for i, text in enumerate(CORPUS):
        (photos / f"p{i:02d}.jpg").write_bytes(mk.jpeg_bytes(mk.photo_image((96 + i, 80))))
        if text:
            (photos / f"p{i:02d}.txt").write_text(text)
    root = base / "root"
    run_shard_stage([photos], root, ShardConfig(shard_size=8, image={"resize": 64}))
    results = run_score_stage(root, ScoreConfig(workers=2))
    return root, results


def test_score_stage_writes_density_and_vocab(scored_root):
    root, (result,) = scored_root
    assert result.totals["count"] == 23 and result.totals["missing"] == 1
    assert result.totals["total_nouns"] == HAND["total_nouns"]
    assert sorted(p.name for p in (root / "density" / "alt_text").iterdir()) == [
        ".densecurate.lock",  # the free lock of the score run
        "00000.parquet",
        "00001.parquet",
        "00002.parquet",
        "_plan.json",
    ]
    vocab = dict(run_query(root, "SELECT noun, count FROM vocab WHERE field = 'alt_text'")[1])
    assert vocab == {"dog": 11, "grass": 11, "cat": 10, "paris": 1, "tower": 1}


def test_density_view_counts_valid_nouns_per_sample(scored_root):
    root, _ = scored_root
    sql = (
        "SELECT s.alt_text, d.n_nouns, d.n_valid_nouns, d.valid_share, d.missing FROM density d "
        "JOIN samples s USING (key) GROUP BY ALL ORDER BY 1"
    )
    rows = run_query(root, sql)[1]
    assert rows == [
        (CAT, 1, 0, 0.0, False),
        (DOG, 2, 2, 1.0, False),
        (PARIS, 2, 0, 0.0, False),
        (None, 0, 0, None, True),
    ]


def test_rescore_reuses_shards_and_cli_prints_table1(scored_root, capsys):
    root, _ = scored_root
    (again,) = run_score_stage(root, ScoreConfig(workers=1))
    assert again.shards_reused == again.shards == 3 and again.totals["texts_tagged"] == 5
    assert main(["score", str(root)]) == 0
    assert "2 / 5 = 40.0%" in capsys.readouterr().out


def test_unknown_field_is_a_clear_error(scored_root, capsys):
    root, _ = scored_root
    assert main(["score", str(root), "--field", "llava"]) == 2
    assert "no caption field 'llava'" in capsys.readouterr().err


def test_stats_command(scored_root, capsys):
    root, _ = scored_root
    assert main(["stats", str(root)]) == 0
    out = capsys.readouterr().out
    for title in ("samples by status", "samples by source", "nouns per image by field", "top nouns by field"):
        assert title in out
