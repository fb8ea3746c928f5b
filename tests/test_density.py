"""Concept density: nouns with spaCy, PixArt-α Table-1 numbers worked out by hand, the score stage on Ray."""

from __future__ import annotations

import json
import random

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from densecurate.cli import main
from pipeline.density.nouns import NounExtractor, SpacyModelNotAvailableError
from pipeline.density.table1 import table1_from_nouns
from pipeline.stages.density_file import (
    DensityOptions,
    DensityWorker,
    open_table,
    sample_file,
    sample_positions,
    sampled_batches,
    score_file,
)
from pipeline.stages.score import run_score_stage
from pipeline.stages.shard import run_shard_stage
from pipeline.store.catalog import run_query
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


# --- density FILE at scale: streamed batches, several processes, --sample --------------------------------

SUBJECTS = ["dog", "cat", "woman", "man", "child", "car", "house", "tree", "bird", "boat", "horse", "bicycle"]
COLOURS = ["red", "blue", "green", "white", "black", "yellow", "old", "small", "large", "wooden"]
PLACES = ["beach", "street", "park", "kitchen", "forest", "garden", "city", "mountain", "river", "table"]
STOCK = ["Stock photo", "image", "Free shipping on orders over $50", "Click to enlarge", "logo"]


def varied_captions(n: int, seed: int = 7) -> list[str | None]:
    """Short alt-text-like captions from word lists: 0 to 6 nouns each, stock phrases repeated, some missing."""
    rng = random.Random(seed)
    out: list[str | None] = []
    for _ in range(n):
        kind = rng.random()
        if kind < 0.03:
            out.append(rng.choice([None, "", "  "]))
        elif kind < 0.15:
            out.append(rng.choice(STOCK))
        elif kind < 0.6:
            out.append(f"a {rng.choice(COLOURS)} {rng.choice(SUBJECTS)} in the {rng.choice(PLACES)}")
        else:
            a, b = rng.sample(SUBJECTS, 2)
            out.append(
                f"The {rng.choice(COLOURS)} {a} and a {b} near the {rng.choice(PLACES)} with a {rng.choice(SUBJECTS)}"
            )
    return out


def one_shot_row(path, column: str, settings: NounSettings, *, min_count: int = 10):
    """The former implementation: every text of the column in one list, one NounExtractor over all of it."""
    with duckdb.connect() as con:
        texts = [v for (v,) in con.execute(f'SELECT "{column}"::VARCHAR FROM read_parquet(?)', [str(path)]).fetchall()]
    found = NounExtractor(settings).extract(texts)
    missing = sum(1 for t in texts if not (t and t.strip()))
    return table1_from_nouns(column, (f.nouns for f in found), min_count=min_count, missing=missing)


@pytest.fixture(scope="module")
def varied(tmp_path_factory):
    """2,000 varied captions in a Parquet file (several row groups) and their one-shot Table-1 row."""
    path = tmp_path_factory.mktemp("varied") / "captions.parquet"
    pq.write_table(pa.table({"text": varied_captions(2000), "n": list(range(2000))}), path, row_group_size=700)
    return path, one_shot_row(path, "text", NounSettings())


def test_batches_never_exceed_the_batch_size_and_cover_every_row(varied):
    path, _ = varied
    table = open_table(path, "text")
    sizes = [len(b) for b in table.batches(300)]
    assert max(sizes) <= 300 and len(sizes) >= 7 and sum(sizes) == table.count_rows() == 2000
    assert [t for b in table.batches(300) for t in b] == varied_captions(2000)


def test_sampled_batches_take_the_positions_and_regroup():
    rows = [[f"r{i}" for i in range(j, j + 4)] for j in range(0, 20, 4)]  # 20 rows in batches of 4
    got = list(sampled_batches(rows, [0, 3, 4, 9, 10, 11, 19], batch_rows=3))
    assert got == [["r0", "r3", "r4"], ["r9", "r10", "r11"], ["r19"]]
    assert sample_positions(100, 10, seed=1) == sample_positions(100, 10, seed=1) != sample_positions(100, 10, 2)
    assert sample_positions(5, 10, seed=1) == [0, 1, 2, 3, 4]


def test_worker_cache_changes_nothing():
    texts = varied_captions(300, seed=3)
    small = DensityWorker(NounSettings(), cache_size=5)
    counts = [small.count(texts[i : i + 50], keep_nouns=True) for i in range(0, 300, 50)]
    once = DensityWorker(NounSettings()).count(texts, keep_nouns=True)
    merged = counts[0]
    for c in counts[1:]:
        merged.merge(c)
    assert merged == once and len(small.cache) == 5


@pytest.mark.slow
def test_streamed_row_equals_the_one_shot_row(varied):
    path, reference = varied
    row = score_file(path, DensityOptions(column="text", workers=1, batch_rows=300))
    assert row == reference and reference.missing > 0 and reference.valid_distinct_nouns > 10


@pytest.mark.slow
def test_several_processes_equal_one(ray_local, varied):
    path, reference = varied
    assert score_file(path, DensityOptions(column="text", workers=2, batch_rows=250)) == reference


@pytest.mark.slow
def test_sample_is_reproducible_and_its_interval_holds_the_full_mean(varied, capsys):
    path, reference = varied
    options = DensityOptions(column="text", workers=1, sample=400, seed=11, batch_rows=128)
    first, again = sample_file(path, options), sample_file(path, options)
    assert first == again and first.n_sample == 400 and first.n_rows == 2000
    low, high = first.ci95
    assert low < reference.nouns_per_caption < high and high - low < 1.0
    assert sample_file(path, options.model_copy(update={"seed": 12})) != first
    argv = ["density", str(path), "--column", "text", "--sample", "400", "--seed", "11", "--workers", "1"]
    assert main([*argv, "--batch-rows", "128", "--format", "json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert {"n_rows", "n_sample", "nouns_per_caption", "ci95_low", "ci95_high", "missing"} <= got.keys()
    assert "distinct_nouns" not in got and (got["ci95_low"], got["ci95_high"]) == (low, high)
    assert main(argv) == 0
    out = " ".join(capsys.readouterr().out.split())  # the table wraps on a narrow terminal
    assert "95%" in out and "not estimated from a sample" in out


def test_full_run_json_keys_and_globs_and_folders(tmp_path, capsys):
    parts = tmp_path / "parts"
    parts.mkdir()
    for i, chunk in enumerate((CORPUS[:10], CORPUS[10:])):
        pq.write_table(pa.table({"text": chunk}), parts / f"{i:05d}.parquet")
    for source in (parts, parts / "*.parquet"):
        assert main(["density", str(source), "--column", "text", "--workers", "1", "--format", "json"]) == 0
        got = json.loads(capsys.readouterr().out)
        assert {k: got[k] for k in HAND} == HAND and {"valid_share", "missing", "field"} <= got.keys()


@pytest.mark.parametrize(
    "args, expected",
    [
        (["{tmp}/none/*.parquet"], "no file matches"),
        (["{tmp}"], "no file matches"),  # a folder without Parquet files
        (["{tmp}/a.txt"], "use a .parquet, .csv, .tsv or .jsonl file"),
        (["{tmp}/gone.csv"], "does not exist"),
        (["{csv}", "--sample", "0"], "sample (--sample)"),
        (["{csv}", "--workers", "0"], "workers (--workers)"),
        (["{csv}", "--batch-rows", "0"], "batch_rows (--batch-rows)"),
    ],
)
def test_density_bad_inputs_are_one_sentence(tmp_path, capsys, args, expected):
    csv = tmp_path / "c.csv"
    csv.write_text("text\na red car\n")
    argv = ["density", *(a.format(tmp=tmp_path, csv=csv) for a in args), "--column", "text"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert expected in err and len([ln for ln in err.splitlines() if ln.startswith("error:")]) == 1


def test_a_small_file_is_tagged_in_this_process_unless_workers_or_a_cluster_are_asked_for(monkeypatch):
    from pipeline.stages.density_file import IN_PROCESS_ROWS, DensityOptions, for_size

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    options = DensityOptions(column="caption")
    assert for_size(options, IN_PROCESS_ROWS).workers == 1
    assert for_size(options, IN_PROCESS_ROWS + 1).workers is None
    assert for_size(options.model_copy(update={"workers": 2}), 10).workers == 2
    assert for_size(options.model_copy(update={"ray_address": "127.0.0.1:6379"}), 10).workers is None
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    assert for_size(options, 10).workers is None
