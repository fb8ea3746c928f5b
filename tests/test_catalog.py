"""The DuckDB catalog: `densecurate query` only reads, a copied or moved root keeps working views, and views stay
right when files are added or rewritten after the catalog was made."""

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

from pipeline import catalog
from pipeline.catalog import QueryError, connect, refresh_catalog, run_query, sql_string
from schemas.errors import UserError
from schemas.layout import DatasetLayout


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
    moved = tmp_path / "elsewhere" / "moved"
    shutil.copytree(root, moved)
    shutil.rmtree(root)
    assert count(moved) == 3
    with duckdb.connect(str(moved / "catalog.duckdb"), read_only=True) as con:  # plain DuckDB too
        assert con.execute("SELECT count(*) FROM samples").fetchone() == (3,)
        info = json.loads(con.execute("SELECT info FROM catalog_info").fetchone()[0])
    assert info == {"root": str(moved.resolve()), "views": {"samples": "shards/*.parquet"}}


def test_copied_root_reads_its_own_files(root, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    write_shard(copy, 5)
    assert (count(copy), count(root)) == (5, 3)


def test_moved_read_only_root_still_has_working_views(root, tmp_path, monkeypatch):
    """A moved root on a read-only mount: its stale catalog cannot be rewritten, so one in memory serves."""

    @contextmanager
    def read_only_fs(final: Path):
        raise OSError(errno.EROFS, "Read-only file system", str(final))
        yield final  # pragma: no cover

    moved = tmp_path / "moved"
    shutil.copytree(root, moved)
    shutil.rmtree(root)
    before = snapshot(moved)
    monkeypatch.setattr(catalog, "atomic_output", read_only_fs)
    assert count(moved) == 3
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


def test_refresh_reads_the_schema_of_new_or_changed_files_only(root, monkeypatch):
    read: list[list[str]] = []
    one_schema = catalog._one_schema

    def counted(paths: list[Path]) -> bool:
        read.append([p.name for p in paths])
        return one_schema(paths)

    monkeypatch.setattr(catalog, "_one_schema", counted)
    refresh_catalog(DatasetLayout(root))
    assert count(root) == 3 and read == []  # nothing changed: no file opened to check
    write_table(root, 1, {"key": ["a"], "status": ["ok"]})
    assert count(root) == 4
    assert read == [["00000.parquet", "00001.parquet"]]  # one known file as the reference, and the new one
