"""The DuckDB catalog: `densecurate query` only reads, a copied or moved root keeps working views (in plain DuckDB
too), views stay right when files are added or rewritten after the catalog was made, and a file that does not read
is left out and named."""

from __future__ import annotations

import errno
import json
import shutil
from contextlib import contextmanager
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from densecurate.cli import main
from pipeline.store import catalog
from pipeline.store.catalog import QueryError, connect, damaged_files, has_view, refresh_catalog, run_query, sql_string
from schemas.errors import UserError
from schemas.layout import DatasetLayout
from schemas.tables import PARQUET_META_KEY


def write_shard(root: Path, n: int) -> Path:
    """A shard's Parquet with ``n`` rows (key, status), as the shard stage lays it out."""
    path = root / "shards" / "00000.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"key": [f"k{i}" for i in range(n)], "status": ["ok"] * n}), path)
    return path


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """A dataset root with one 3-row shard and a current catalog; a Parquet file lies outside it."""
    root = tmp_path / "root"
    write_shard(root, 3)
    pq.write_table(pa.table({"key": ["secret"]}), tmp_path / "outside.parquet")
    refresh_catalog(DatasetLayout(root))
    return root


def count(root: Path) -> int:
    """Rows of the samples view, through `densecurate query`'s path."""
    return run_query(root, "SELECT count(*) FROM samples")[1][0][0]


# --- A: a query may not write files, touch extensions or the network, or unlock its settings ---

REFUSED = [
    ("COPY (SELECT 'x' AS key, 'lost' AS status) TO {shard}", "may not write files"),
    ("COPY (SELECT 1 AS x) TO {inside_new}", "may not write files"),
    ("COPY (SELECT 1 AS x) TO {outside_new}", "may not write files"),
    ("COPY samples TO {outside_new} (FORMAT parquet)", "may not write files"),
    ("EXPORT DATABASE {outside_dir}", "may not write files"),
    ("EXPORT DATABASE {inside_dir}", "may not write files"),
    ("EXPLAIN ANALYZE COPY (SELECT 1 AS x) TO {shard}", "may not write files"),
    ("SELECT 1; COPY (SELECT 1 AS x) TO {shard}", "may not write files"),
    ("INSTALL httpfs", "may not install or load extensions"),
    ("LOAD httpfs", "may not install or load extensions"),
    ("FORCE INSTALL httpfs", "may not install or load extensions"),
    ("ATTACH {outside_db} AS other", "may not attach or detach databases"),
    ("ATTACH {inside_db} AS other", "may not attach or detach databases"),
    ("SET enable_external_access = true", "may not change settings"),
    ("RESET enable_external_access", "may not change settings"),
    ("SET lock_configuration = false", "may not change settings"),
    ("CREATE TABLE t AS SELECT 1", "read-only"),
    ("IMPORT DATABASE {outside_dir}", "read-only"),
    ("PRAGMA show_tables", "may not run PRAGMA or CALL"),
    ("CALL enable_profiling(save_location = {shard})", "may not run PRAGMA or CALL"),
    ("SELECT * FROM enable_profiling(save_location = {inside_new})", "locked"),
    ("CHECKPOINT", "read-only"),
]


@pytest.mark.parametrize(("template", "message"), REFUSED)
def test_query_refuses_what_is_not_a_read(root, tmp_path, template, message):
    paths = {
        "shard": root / "shards" / "00000.parquet",
        "inside_new": root / "shards" / "00001.parquet",
        "outside_new": tmp_path / "stolen.parquet",
        "outside_dir": tmp_path / "export",
        "inside_dir": root / "export",
        "outside_db": tmp_path / "new.duckdb",
        "inside_db": root / "new.duckdb",
    }
    before = snapshot(tmp_path)
    with pytest.raises(QueryError, match=message) as info:
        run_query(root, template.format(**{k: sql_string(str(v)) for k, v in paths.items()}))
    assert isinstance(info.value, UserError) and "\n" not in str(info.value)
    assert snapshot(tmp_path) == before  # no byte changed, no file added
    assert count(root) == 3


def test_connection_itself_is_confined_and_locked(root, tmp_path):
    """Beneath the statement check, DuckDB itself refuses files outside the root and unlocking."""
    with connect(root) as con:
        with pytest.raises(duckdb.PermissionException):
            con.execute(f"COPY (SELECT 1 AS x) TO {sql_string(str(tmp_path / 'x.parquet'))}")
        with pytest.raises(duckdb.Error, match="locked"):
            con.execute("SET enable_external_access = true")
        with pytest.raises(duckdb.Error, match="locked"):
            con.execute("RESET allowed_directories")
        with pytest.raises(duckdb.Error):
            con.execute("LOAD httpfs")
    assert not (tmp_path / "x.parquet").exists()


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT count(*) FROM samples",
        "SELECT count(*) FROM read_parquet({shards})",
        "FROM samples SELECT count(*)",
        "WITH s AS (SELECT * FROM samples) SELECT count(*) FROM s",
        "SELECT count(*) FROM (DESCRIBE samples)",
        "SELECT count(*) FROM (PIVOT samples ON status USING count(*))",
    ],
)
def test_query_reads_parquet_under_the_root(root, sql):
    shards = sql_string(str(root.resolve() / "shards" / "*.parquet"))
    assert run_query(root, sql.format(shards=shards))[1][0][0] >= 1


def test_query_runs_describe_pivot_and_explain(root):
    assert [r[0] for r in run_query(root, "DESCRIBE samples")[1]] == ["key", "status"]
    assert run_query(root, "PIVOT (SELECT status FROM samples) ON status USING count(*)")[1] == [(3,)]
    with pytest.raises(QueryError, match="may not write files"):  # a PIVOT inside a COPY is still a COPY
        run_query(root, f"COPY (PIVOT samples ON status) TO {sql_string(str(root / 'p.csv'))}")
    assert run_query(root, "EXPLAIN ANALYZE SELECT count(*) FROM samples")[1]
    assert run_query(root, "EXPLAIN (FORMAT json) SELECT 1")[1]


@pytest.mark.parametrize(
    "path",
    [
        "{tmp}/outside.parquet",
        "{root}/../outside.parquet",
        "{root}2/x.parquet",  # a sibling whose name starts with the root's
        "/etc/*",
        "https://example.invalid/x.parquet",
    ],
)
def test_query_cannot_read_outside_the_root(root, tmp_path, path):
    (tmp_path / "root2").mkdir()
    pq.write_table(pa.table({"key": ["secret"]}), tmp_path / "root2" / "x.parquet")
    target = sql_string(path.format(tmp=tmp_path, root=root))
    with pytest.raises(QueryError, match="only files under the dataset root"):
        run_query(root, f"SELECT * FROM read_parquet({target})")


def test_query_cannot_read_text_outside_the_root(root):
    with pytest.raises(QueryError, match="only files under the dataset root"):
        run_query(root, "SELECT * FROM read_text('/etc/hostname')")


# --- B: a copied or moved root has working views over its own files ---


def test_moved_root_has_working_views(root, tmp_path):
    """The views name their files relative to the root: a moved root's catalog is current as it is."""
    moved = tmp_path / "elsewhere" / "moved"
    moved.parent.mkdir()
    shutil.move(root, moved)
    before = (moved / "catalog.duckdb").read_bytes()
    assert count(moved) == 3
    assert (moved / "catalog.duckdb").read_bytes() == before  # not rebuilt
    with duckdb.connect(str(moved / "catalog.duckdb"), read_only=True) as con:  # plain DuckDB too
        assert con.execute("SELECT count(*) FROM samples").fetchone() == (3,)
        assert json.loads(con.execute("SELECT info FROM catalog_info").fetchone()[0]) == {"format": 2}


def test_copied_root_reads_its_own_files(root, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    write_shard(copy, 5)
    assert (count(copy), count(root)) == (5, 3)


def test_copy_on_a_read_only_mount_still_has_working_views(root, tmp_path, monkeypatch):
    """A copy whose files changed, on a read-only mount: its stale catalog cannot be rewritten, so one in memory
    serves."""

    @contextmanager
    def read_only_fs(final: Path):
        raise OSError(errno.EROFS, "Read-only file system", str(final))
        yield final  # pragma: no cover

    moved = tmp_path / "moved"
    shutil.copytree(root, moved)
    shutil.rmtree(root)
    write_shard(moved, 5)
    before = snapshot(moved)
    monkeypatch.setattr(catalog, "atomic_output", read_only_fs)
    assert count(moved) == 5
    with pytest.raises(QueryError, match="read-only"):
        run_query(moved, "CREATE TABLE t AS SELECT 1")
    with pytest.raises(QueryError, match="may not write files"):
        run_query(moved, f"COPY (SELECT 1 AS x) TO {sql_string(str(moved / 'shards' / '00000.parquet'))}")
    assert snapshot(moved) == before


# --- C: files added or rewritten after the catalog was made ---


def write_table(root: Path, index: int, columns: dict[str, list]) -> None:
    path = root / "shards" / f"{index:05d}.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path)


def test_views_read_files_of_another_schema_by_name(root):
    """Shards of other columns, added after the catalog was made, are read by column name (missing ones null)."""
    write_table(root, 1, {"key": ["a"], "status": ["ok"], "source": ["web"]})
    write_table(root, 2, {"status": ["skipped"], "key": ["b"]})
    rows = run_query(root, "SELECT key, status, source FROM samples ORDER BY key")[1]
    assert rows == [
        ("a", "ok", "web"),
        ("b", "skipped", None),
        ("k0", "ok", None),
        ("k1", "ok", None),
        ("k2", "ok", None),
    ]
    (root / "shards" / "00001.parquet").unlink()
    assert [r[0] for r in run_query(root, "DESCRIBE samples")[1]] == ["key", "status"]
    assert count(root) == 4


def test_view_columns_follow_a_rewritten_file(root):
    write_table(root, 0, {"key": ["a", "b"], "status": ["ok", "ok"], "width": [1, 2]})
    assert run_query(root, "SELECT key, width FROM samples ORDER BY key")[1] == [("a", 1), ("b", 2)]


def test_refresh_reads_the_footers_of_new_or_changed_files_only(root, monkeypatch):
    read: list[str] = []
    footer = catalog._footer

    def counted(path: Path) -> pq.ParquetSchema | None:
        read.append(path.name)
        return footer(path)

    monkeypatch.setattr(catalog, "_footer", counted)
    refresh_catalog(DatasetLayout(root))
    assert count(root) == 3 and read == []  # nothing changed: no file opened to check
    write_table(root, 1, {"key": ["a"], "status": ["ok"]})
    assert count(root) == 4
    assert read == ["00001.parquet", "00000.parquet"]  # the new file, and one known file as the schema's reference
    read.clear()
    (root / "shards" / "00002.parquet").write_bytes(b"")
    assert count(root) == 4 and read == ["00002.parquet", "00000.parquet"]
    read.clear()
    write_table(root, 3, {"key": ["b"], "status": ["ok"]})
    assert count(root) == 5 and read == ["00003.parquet", "00000.parquet"]  # the damaged file is known


# --- D: plain DuckDB (1.2 or later) opens the catalog of the root it is in, wherever that root is ---


def open_plain(catalog_file: Path) -> duckdb.DuckDBPyConnection:
    """The catalog as the README opens it with the duckdb package: read-only, no variable set."""
    return duckdb.connect(str(catalog_file), read_only=True)


@pytest.mark.parametrize("original", ["removed", "changed"])
def test_plain_duckdb_reads_the_copy_it_opens(root, tmp_path, monkeypatch, original):
    copy = tmp_path / "elsewhere" / "copy"
    shutil.copytree(root, copy)
    if original == "removed":
        shutil.rmtree(root)
    else:
        write_shard(root, 7)
    other = tmp_path / "other"
    write_shard(other, 9)
    monkeypatch.chdir(other)  # a working directory with files at the same relative paths
    for path in (copy / "catalog.duckdb", Path("../elsewhere/copy/catalog.duckdb")):
        with open_plain(path) as con:
            assert con.execute("SELECT count(*) FROM samples").fetchone() == (3,)
    assert count(copy) == 3  # densecurate too, from that working directory


def test_attached_catalog_reads_the_root_its_variable_names(root):
    """Attached to another session, the catalog cannot tell its root: it says what to set."""
    with duckdb.connect() as con:
        con.execute(f"ATTACH {sql_string(str(root / 'catalog.duckdb'))} AS cat (READ_ONLY)")
        with pytest.raises(duckdb.Error, match="SET VARIABLE densecurate_root"):
            con.execute("SELECT count(*) FROM cat.samples")
        con.execute("SET VARIABLE densecurate_root = ?", [str(root)])
        assert con.execute("SELECT count(*) FROM cat.samples").fetchone() == (3,)


def test_catalog_is_written_in_storage_version_1_2(root):
    with open_plain(root / "catalog.duckdb") as con:
        (tags,) = con.execute("SELECT tags FROM duckdb_databases() WHERE database_name = current_database()").fetchone()
    assert tags["storage_version"].startswith("v1.2.0")  # what the README states


def test_catalog_of_an_earlier_format_is_rebuilt(root):
    """A catalog whose views hold absolute paths (and that DuckDB 1.2 may not open) is replaced."""
    path = root / "catalog.duckdb"
    path.unlink()
    with duckdb.connect(str(path)) as con:
        con.execute(f"CREATE VIEW samples AS SELECT * FROM read_parquet({sql_string(str(root / 'shards/*.parquet'))})")
        con.execute("CREATE TABLE catalog_info AS SELECT '{\"views\": {}}' AS info, '{}' AS tables, '{}' AS files")
    assert count(root) == 3
    with open_plain(path) as con:
        assert json.loads(con.execute("SELECT info FROM catalog_info").fetchone()[0]) == {"format": 2}
        assert (
            "densecurate_files"
            in con.execute("SELECT sql FROM duckdb_views() WHERE view_name = 'samples'").fetchone()[0]
        )


# --- E: a file whose footer does not read is left out of the views, and named ---


def write_with_meta(path: Path, columns: dict[str, list], meta: dict[str, str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.table(columns).replace_schema_metadata({PARQUET_META_KEY: json.dumps(meta).encode()})
    pq.write_table(table, path)


@pytest.fixture
def scored_root(tmp_path: Path) -> Path:
    """A root with two shards of two samples, captioned by ``tiny`` and scored from those captions."""
    root = tmp_path / "scored"
    for index in range(2):
        keys = [f"{index}-{i}" for i in range(2)]
        name = f"{index:05d}.parquet"
        write_table(root, index, {"key": keys, "status": ["ok"] * 2, "reason": [None] * 2, "source": ["web"] * 2})
        write_with_meta(
            root / "captions" / "tiny" / name,
            {"key": keys, "captioner": ["tiny"] * 2, "status": ["ok"] * 2, "num_tokens": [4] * 2}
            | {flag: [False] * 2 for flag in ("truncated", "repetitive", "empty")},
            {"fingerprint": f"captions-{index}"},
        )
        write_with_meta(
            root / "density" / "tiny" / name,
            {"key": keys, "field": ["tiny"] * 2, "n_tokens": [4] * 2, "n_nouns": [1] * 2, "nouns": [["dog"]] * 2},
            {"fingerprint": f"density-{index}", "source_fingerprint": f"captions-{index}"},
        )
    (root / "vocab").mkdir()
    vocab = pa.table({"field": ["tiny"], "noun": ["dog"], "count": [4], "valid": [True]})
    pq.write_table(vocab, root / "vocab" / "tiny.parquet")
    refresh_catalog(DatasetLayout(root))
    return root


def damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    path.write_bytes(b"" if how == "empty" else data[: len(data) // 2])


@pytest.mark.parametrize("how", ["empty", "cut"])
def test_damaged_file_is_left_out_and_named(scored_root, capsys, caplog, how):
    damaged = scored_root / "captions" / "tiny" / "00001.parquet"
    good = damaged.read_bytes()
    damage(damaged, how)
    assert main(["query", str(scored_root), "SELECT count(*) AS n FROM captions", "--format", "csv"]) == 0
    assert capsys.readouterr().out == "n\n2\n"  # the rows of the file that reads
    assert "captions/tiny/00001.parquet" in caplog.text
    assert "`densecurate caption` with --repair" in caplog.text and f"densecurate verify {scored_root}" in caplog.text
    caplog.clear()
    assert main(["stats", str(scored_root)]) == 0
    out, err = capsys.readouterr()
    assert "captions/tiny/00001.parquet" in out and "densecurate caption --repair" in out
    assert "captions by captioner" in out and "nouns per image by field" in out
    assert "captions/tiny/00001.parquet" in caplog.text
    assert "stale" not in err  # a caption file that does not read is damaged, not changed since scored
    damaged.write_bytes(good)  # what a rerun with --repair does
    caplog.clear()
    assert main(["query", str(scored_root), "SELECT count(*) AS n FROM captions", "--format", "csv"]) == 0
    assert capsys.readouterr().out == "n\n4\n" and "damaged" not in caplog.text


def test_a_table_with_no_file_that_reads_has_no_view(scored_root, caplog):
    damage(scored_root / "vocab" / "tiny.parquet", "cut")
    with connect(scored_root) as con:
        assert not has_view(con, "vocab") and not has_view(con, "density")  # density needs the vocabulary
        assert damaged_files(con) == {"vocab/tiny.parquet": "score"}
    assert count(scored_root) == 4 and "vocab/tiny.parquet" in caplog.text
