"""The command line: help everywhere, clear errors, query output formats, the demo."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys

import pytest

from densecurate.cli import build_parser, main
from pipeline.sample_data import write_sample_folder
from pipeline.stages.shard import run_shard_stage
from schemas.shard_config import ShardConfig
from tests.chromium import rendered_dom

SUBCOMMANDS = [
    "shard",
    "verify",
    "prune",
    "caption",
    "score",
    "ground",
    "density",
    "stats",
    "compare",
    "report",
    "curate",
    "features",
    "train",
    "export",
    "eval",
    "run",
    "submit",
    "jobs",
    "query",
    "models",
    "demo",
    "merge",
]


@pytest.mark.parametrize(
    "argv",
    [["--help"], ["models", "make-tiny", "--help"], ["models", "convert-dit", "--help"]]
    + [[c, "--help"] for c in SUBCOMMANDS],
)
def test_help_everywhere(argv, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 0
    assert "usage: densecurate" in capsys.readouterr().out


def test_every_subcommand_is_listed():
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert sorted(sub.choices) == sorted(SUBCOMMANDS)


def test_bad_option_value_names_the_field(tmp_path, capsys):
    assert main(["shard", str(tmp_path), "--out", str(tmp_path / "o"), "--resize", "-5"]) == 2
    err = capsys.readouterr().err
    assert "image.resize (--resize)" in err and "greater than or equal to 0" in err


def test_missing_source_is_one_clear_line(tmp_path, capsys):
    assert main(["shard", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.fixture(scope="module")
def sample_root(ray_local, tmp_path_factory):
    base = tmp_path_factory.mktemp("cli")
    root = base / "root"
    run_shard_stage([write_sample_folder(base / "photos")], root, ShardConfig(shard_size=5))
    return root


SQL = "SELECT status, count(*) AS n FROM samples GROUP BY ALL ORDER BY status"


def test_query_json(sample_root, capsys):
    assert main(["query", str(sample_root), SQL, "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out) == [{"status": "ok", "n": 10}, {"status": "skipped", "n": 3}]


def test_query_csv(sample_root, capsys):
    assert main(["query", str(sample_root), SQL, "--format", "csv"]) == 0
    rows = list(csv.reader(io.StringIO(capsys.readouterr().out)))
    assert rows == [["status", "n"], ["ok", "10"], ["skipped", "3"]]


def _table_cells(out: str, line: str = "│") -> list[list[str]]:
    """The cells of a rich table: its body rows are drawn with light lines ``│``, its header with heavy ones ``┃``."""
    return [[cell.strip() for cell in row.strip().strip(line).split(line)] for row in out.splitlines() if line in row]


# pipeline/sample_data.py writes 10 photos and 3 bad files, each skipped with its own reason.
SKIPPED_SQL = "SELECT key, status, reason FROM samples WHERE status <> 'ok' ORDER BY key"
SKIPPED = [
    ["folder-empty", "skipped", "empty_file"],
    ["folder-not_really", "skipped", "not_an_image"],
    ["folder-thumbnail", "skipped", "too_small"],
]


def test_query_table_and_sql_errors(sample_root, capsys):
    assert main(["query", str(sample_root), SQL]) == 0
    out = capsys.readouterr().out
    assert _table_cells(out, "┃") == [["status", "n"]]
    assert _table_cells(out) == [["ok", "10"], ["skipped", "3"]]
    assert main(["query", str(sample_root), SKIPPED_SQL]) == 0
    out = capsys.readouterr().out
    assert _table_cells(out, "┃") == [["key", "status", "reason"]]
    assert _table_cells(out) == SKIPPED
    assert main(["query", str(sample_root), "SELECT nope FROM samples"]) == 2
    assert "nope" in capsys.readouterr().err


def test_query_is_read_only(sample_root, capsys):
    assert main(["query", str(sample_root), "CREATE TABLE t AS SELECT 1"]) == 2
    assert "read-only" in capsys.readouterr().err


def test_catalog_opens_with_plain_duckdb(sample_root):
    import duckdb

    with duckdb.connect(str(sample_root / "catalog.duckdb"), read_only=True) as con:
        assert con.execute("SELECT count(*) FROM samples").fetchone() == (13,)


@pytest.mark.slow
def test_demo_runs_offline(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "densecurate", "demo", "--out", str(tmp_path / "demo")],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
        env={**os.environ, "COLUMNS": "250"},
    )
    assert "written" in result.stdout and "too_small" in result.stdout and "not meaningful" in result.stdout
    demo = tmp_path / "demo"
    assert len(list((demo / "dataset" / "shards").glob("*.tar"))) == 4
    assert len(list((demo / "dataset" / "captions" / "tiny-llava").glob("*.parquet"))) == 4
    assert (demo / "dataset" / "vocab" / "tiny-llava.parquet").is_file()
    assert len(list((demo / "curated").glob("*.tar"))) == 4
    page = (demo / "report.html").read_text()
    assert "<img" in page and 'alt="density against cost"' in page  # the report compares the two families
    assert "captioners compared on" in result.stdout and "tiny-qwen2-vl" in result.stdout
    assert (demo / "export" / "model_index.json").is_file() and (demo / "export" / "transformer").is_dir()
    assert (demo / "runs" / "tiny" / "checkpoints" / "step-00000010").is_dir()
    dom, _ = rendered_dom(demo / "report.html", tmp_path / "profile", width=1400)
    assert 'data-sideways-scroll="false"' in dom, "the demo's report must not scroll sideways at 1400 px"


def test_a_piped_table_keeps_whole_rows_and_rounds_floats_for_people(capsys):
    from pipeline.report.table_output import print_rows

    long = "a long value " * 20
    print_rows(["key", "score", "big", "none"], [(long, -15.90999984741211, 123456.789, None)])
    out = capsys.readouterr().out
    assert long.strip() in out  # not cut at 80 columns: the output is not a terminal
    assert "-15.91" in out and "123,456.8" in out and "NULL" in out
    assert "15.909" not in out
    print_rows(["score"], [(-15.90999984741211,)], "csv")
    assert capsys.readouterr().out == "score\n-15.90999984741211\n"


def test_version_and_quiet_libraries_unless_verbose(capsys):
    import subprocess
    import sys

    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0 and capsys.readouterr().out.startswith("densecurate ")
    check = (
        "import os, sys, logging\nfrom densecurate.cli import main\ntry:\n    main(sys.argv[1:])\n"
        "except SystemExit:\n    pass\nimport transformers.utils.logging as t\n"
        "print(t.is_progress_bar_enabled(), os.environ.get('TRANSFORMERS_VERBOSITY'), "
        "logging.getLogger('ray._private.authentication.authentication_token_setup').level)"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("TRANSFORMERS_VERBOSITY", "HF_HUB_DISABLE_PROGRESS_BARS")}
    quiet = subprocess.run([sys.executable, "-c", check, "jobs", "--help"], capture_output=True, text=True, env=env)
    verbose = subprocess.run(
        [sys.executable, "-c", check, "--verbose", "jobs", "--help"], capture_output=True, text=True, env=env
    )
    assert quiet.stdout.splitlines()[-1] == "False error 40"
    assert verbose.stdout.splitlines()[-1] == "True None 0"


def test_help_shows_every_default(capsys):
    import argparse

    from densecurate.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, command in sub.choices.items():
        for action in command._actions:
            if action.option_strings and action.default not in (None, False, argparse.SUPPRESS):
                assert "default" in (action.help or ""), (name, action.option_strings)
    with pytest.raises(SystemExit):
        main(["caption", "--help"])
    assert "(default: 8)" in " ".join(capsys.readouterr().out.split())
