"""The DuckDB catalog: views over the dataset root's Parquet, stored in ``ROOT/catalog.duckdb``."""

from __future__ import annotations

import fnmatch
import hashlib
import json
import logging
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from schemas.atomic import atomic_output
from schemas.errors import MissingInputError, UserError
from schemas.layout import TABLE_GLOBS, DatasetLayout

log = logging.getLogger(__name__)

# A view reads its files with ``{source}``: plain ``read_parquet`` when they share one schema, else by name.
READ_PARQUET = "read_parquet({files})"
READ_BY_NAME = "read_parquet({files}, union_by_name = true)"
READ_ALL = "SELECT * FROM {source}"
# Tables whose vectors are left out of the default view (a second view has them).
WITHOUT_VECTORS = "SELECT * EXCLUDE ({column}) FROM {{source}}"
# Density rows plus, from the vocabulary, how many of each caption's nouns are valid.
DENSITY_WITH_VALID = """
WITH d AS (SELECT * FROM {source}),
valid AS (
    SELECT x.field, x.key, count(*) AS n_valid_nouns
    FROM (SELECT field, key, unnest(nouns) AS noun FROM d) x
    JOIN vocab v ON v.field = x.field AND v.noun = x.noun AND v.valid
    GROUP BY ALL
)
SELECT d.*, coalesce(valid.n_valid_nouns, 0) AS n_valid_nouns,
       CASE WHEN d.n_nouns > 0 THEN coalesce(valid.n_valid_nouns, 0) / d.n_nouns END AS valid_share
FROM d LEFT JOIN valid USING (field, key)
"""


class QueryError(UserError):
    """A query DuckDB refused (a syntax error, an unknown table or column, a statement that would write)."""


@dataclass(frozen=True)
class View:
    """A catalog view over the Parquet files matching ``glob`` (relative to the root)."""

    name: str
    glob: str
    select: str = READ_ALL
    requires: tuple[str, ...] = ()


VIEWS: tuple[View, ...] = (
    View("samples", TABLE_GLOBS["samples"]),
    View("captions", TABLE_GLOBS["captions"]),
    View("vocab", TABLE_GLOBS["vocab"]),
    View("density", TABLE_GLOBS["density"], DENSITY_WITH_VALID, requires=("vocab",)),
    View("embeddings", TABLE_GLOBS["embeddings"], WITHOUT_VECTORS.format(column="embedding")),
    View("embedding_vectors", TABLE_GLOBS["embeddings"]),
    View("grounding", TABLE_GLOBS["grounding"]),
    View("noun_calibration", TABLE_GLOBS["noun_calibration"], WITHOUT_VECTORS.format(column="text_embedding")),
    View("duplicates", TABLE_GLOBS["duplicates"]),
)

# Settings fixed when a connection opens: no extension is installed or loaded behind a query's back.
CONNECT_CONFIG: dict[str, str | bool] = {
    "autoinstall_known_extensions": False,
    "autoload_known_extensions": False,
    "allow_community_extensions": False,
}
# What a refused statement would do, by its first word; any other would "change the database".
REFUSED_ACTIONS: dict[str, str] = {
    "COPY": "write files",
    "EXPORT": "write files",
    "INSTALL": "install or load extensions",
    "FORCE": "install or load extensions",
    "LOAD": "install or load extensions",
    "ATTACH": "attach or detach databases",
    "DETACH": "attach or detach databases",
    "SET": "change settings",
    "RESET": "change settings",
    "PRAGMA": "run PRAGMA or CALL statements (SHOW, DESCRIBE and SELECT * FROM pragma_... functions read)",
    "CALL": "run PRAGMA or CALL statements (SELECT * FROM the function reads)",
}
READ_STATEMENTS = "SELECT, FROM, WITH, VALUES, DESCRIBE, SHOW, SUMMARIZE, PIVOT and EXPLAIN"
# A PIVOT without an IN list parses as several statements (MULTI): allowed when it starts like a read.
READ_WORDS = frozenset(
    {"(", "SELECT", "FROM", "WITH", "VALUES", "TABLE", "DESCRIBE", "SHOW", "SUMMARIZE", "PIVOT", "UNPIVOT"}
    | {"PIVOT_WIDER", "PIVOT_LONGER"}
)
EXPLAIN_PREFIX_TOKENS = 32  # EXPLAIN [ANALYZE] [(options)] before the statement explained


def sql_string(text: str) -> str:
    """``text`` as a DuckDB string literal."""
    return "'" + text.replace("'", "''") + "'"


def has_view(con: duckdb.DuckDBPyConnection, name: str) -> bool:
    """Whether the catalog has the view (its tables exist)."""
    return bool(con.execute("SELECT count(*) FROM duckdb_views() WHERE view_name = ?", [name]).fetchone()[0])


def _available_views(layout: DatasetLayout) -> dict[str, str]:
    """Each view whose table has files, with its glob relative to the root."""
    root = layout.root.resolve()
    found: dict[str, str] = {}
    for view in VIEWS:
        if any(root.glob(view.glob)) and all(r in found for r in view.requires):
            found[view.name] = view.glob
    return found


def _catalog_info(layout: DatasetLayout) -> dict[str, Any]:
    """What a current catalog records: the root it was built for and its views."""
    return {"root": str(layout.root.resolve()), "views": _available_views(layout)}


def _entries(folder: str) -> list[os.DirEntry[str]]:
    try:
        with os.scandir(folder) as entries:
            return list(entries)
    except OSError:
        return []


def _listing(root: Path, glob: str) -> dict[str, list[int]]:
    """The files under ``root`` that pathlib's ``root.glob(glob)`` finds (each part of ``glob`` a name or a
    ``*`` pattern), by path relative to the root, with their size and modification time in ns. Listed with
    ``os.scandir``: tens of thousands of files cost no Path object each."""
    *parents, last = glob.split("/")
    folders = [str(root)]
    for part in parents:
        folders = [e.path for f in folders for e in _entries(f) if fnmatch.fnmatchcase(e.name, part) and e.is_dir()]
    prefix = len(os.path.join(root, ""))
    found: dict[str, list[int]] = {}
    for entry in (e for f in folders for e in _entries(f) if fnmatch.fnmatchcase(e.name, last)):
        try:
            stat = entry.stat()
        except OSError:  # removed since it was listed
            continue
        found[entry.path[prefix:]] = [stat.st_size, stat.st_mtime_ns]
    return dict(sorted(found.items()))


def _digest(listing: dict[str, list[int]]) -> str:
    """One hash of the listed files: any file added, removed or rewritten changes it."""
    return hashlib.sha256(json.dumps(listing).encode()).hexdigest()


def _one_schema(paths: list[Path]) -> bool:
    """Whether the files all have one Parquet schema (and pyarrow reads them). Then ``read_parquet`` without
    ``union_by_name`` reads them as with it, and binding a query reads the first file's schema instead of every
    file's footer (which the scan then reads again): about half of a query's time at 10,000 files."""
    try:
        first = pq.read_metadata(paths[0]).schema
        return all(pq.read_metadata(path).schema.equals(first) for path in paths[1:])
    except (IndexError, OSError, pa.ArrowException):
        return False


@dataclass
class TablesState:
    """Per glob of the views: a digest of its files and whether they share one schema (``tables``), and the
    listing of the globs whose files do (``files``), so that a later refresh reads only new or changed files."""

    tables: dict[str, dict[str, Any]]
    files: dict[str, dict[str, list[int]]]

    @classmethod
    def of(cls, root: Path, globs: Iterable[str], known: TablesState | None = None) -> TablesState:
        """The state of the files ``globs`` match now; files that ``known`` (the same root's catalog being
        replaced) lists unchanged are not read again."""
        known = known or cls({}, {})
        state = cls({}, {})
        for glob in sorted(set(globs)):
            listing = _listing(root, glob)
            digest = _digest(listing)
            old, old_files = known.tables.get(glob), known.files.get(glob)
            old, old_files = old if isinstance(old, dict) else {}, old_files if isinstance(old_files, dict) else {}
            unchanged = [f for f, stat in listing.items() if old_files.get(f) == stat] if old.get("one_schema") else []
            if old.get("digest") == digest and isinstance(old.get("one_schema"), bool):
                one_schema = old["one_schema"]
            elif unchanged:  # they share one schema: compare the new or changed files with one of them
                changed = [f for f, stat in listing.items() if old_files.get(f) != stat]
                one_schema = _one_schema([root / f for f in [unchanged[0], *changed]])
            else:
                one_schema = _one_schema([root / f for f in listing])
            state.tables[glob] = {"digest": digest, "one_schema": one_schema}
            if one_schema:
                state.files[glob] = listing
        return state


def _create_views(con: duckdb.DuckDBPyConnection, info: dict[str, Any], state: TablesState) -> None:
    """Create the views of ``info`` on ``con``, reading the Parquet files by absolute path under the root: with
    ``union_by_name`` unless they share one schema."""
    root = Path(info["root"])
    for view in VIEWS:
        if view.name in info["views"]:
            read = READ_PARQUET if state.tables.get(view.glob, {}).get("one_schema") else READ_BY_NAME
            source = read.format(files=sql_string(str(root / view.glob)))
            con.execute(f"CREATE VIEW {view.name} AS {view.select.format(source=source)}")


def _stored(layout: DatasetLayout, files: bool = False) -> tuple[dict[str, Any], TablesState] | None:
    """What the catalog records of its root and views, and of its tables' files (their listing only with
    ``files``); None without a readable catalog of this version."""
    if not layout.catalog_path.is_file():
        return None
    try:
        with duckdb.connect(str(layout.catalog_path), read_only=True) as con:
            row = con.execute(f"SELECT info, tables{', files' if files else ''} FROM catalog_info").fetchone()
        info, tables = json.loads(row[0]), json.loads(row[1])
        listing = json.loads(row[2]) if files else {}
    except (duckdb.Error, TypeError, ValueError):
        return None
    if not (isinstance(info, dict) and isinstance(tables, dict) and isinstance(listing, dict)):
        return None
    return info, TablesState(tables, listing)


def refresh_catalog(layout: DatasetLayout) -> Path:
    """Rewrite the catalog with one view per table that has files; swapped in atomically."""
    info = _catalog_info(layout)
    stored = _stored(layout, files=True)
    known = stored[1] if stored is not None and stored[0].get("root") == info["root"] else None
    state = TablesState.of(Path(info["root"]), info["views"].values(), known)
    with atomic_output(layout.catalog_path) as tmp, duckdb.connect(str(tmp)) as con:
        _create_views(con, info, state)
        con.execute("CREATE TABLE catalog_info (info VARCHAR, tables VARCHAR, files VARCHAR)")
        con.execute(
            "INSERT INTO catalog_info VALUES (?, ?, ?)",
            [json.dumps(info, sort_keys=True), json.dumps(state.tables), json.dumps(state.files)],
        )
    return layout.catalog_path


def _catalog_is_current(layout: DatasetLayout) -> bool:
    """Whether the catalog was built for this root (not a copy's old place), these tables and these files (a
    view made without ``union_by_name`` must not meet a file of another schema)."""
    stored = _stored(layout)
    if stored is None:
        return False
    info, state = stored
    if info != _catalog_info(layout) or set(state.tables) != set(info["views"].values()):
        return False
    root = Path(info["root"])
    return all(
        isinstance(table, dict) and table.get("digest") == _digest(_listing(root, glob))
        for glob, table in state.tables.items()
    )


def _open_catalog(layout: DatasetLayout) -> duckdb.DuckDBPyConnection:
    """The root's catalog, rebuilt first when stale; in memory when a stale one cannot be rewritten."""
    if _catalog_is_current(layout):
        return duckdb.connect(str(layout.catalog_path), read_only=True, config=CONNECT_CONFIG)
    try:
        refresh_catalog(layout)
    except (OSError, duckdb.Error) as exc:  # a read-only root, e.g. a moved copy on a read-only mount
        log.warning("cannot rewrite %s (%s): using a catalog in memory", layout.catalog_path, exc)
        con = duckdb.connect(":memory:", config=CONNECT_CONFIG)
        info = _catalog_info(layout)
        _create_views(con, info, TablesState.of(Path(info["root"]), info["views"].values()))
        return con
    return duckdb.connect(str(layout.catalog_path), read_only=True, config=CONNECT_CONFIG)


def _confine_to_root(con: duckdb.DuckDBPyConnection, root: Path) -> None:
    """Let ``con`` touch no file outside ``root``, nor the network, and lock its settings."""
    allowed = sorted({str(root.absolute()), str(root.resolve())})
    con.execute("SET allowed_directories = ?", [allowed])  # only while external access is still on
    con.execute("SET enable_external_access = false")
    con.execute("SET lock_configuration = true")  # a query's SET or RESET cannot undo the two above


def connect(root: Path) -> duckdb.DuckDBPyConnection:
    """A read-only connection to the root's catalog, refreshed first when tables appeared or the root moved.

    The connection reads files under the root only: no other file, no network, no extension
    installed or loaded, and its settings are locked.
    """
    layout = DatasetLayout(root)
    if not layout.root.is_dir():
        raise MissingInputError(f"dataset root {root} does not exist")
    con = _open_catalog(layout)
    try:
        _confine_to_root(con, layout.root)
    except BaseException:
        con.close()
        raise
    return con


def _token_starts(text: str) -> list[int]:
    """Where each token of ``text`` that is not a comment starts."""
    return [pos for pos, kind in duckdb.tokenize(text) if kind != duckdb.token_type.comment]


def _first_word(text: str) -> str:
    """The statement's first keyword upper case, or its first character when it starts with no word."""
    starts = _token_starts(text)
    match = re.match(r"\w+|\S", text[starts[0] :]) if starts else None
    return match.group(0).upper() if match else ""


def _explained(con: duckdb.DuckDBPyConnection, text: str) -> duckdb.Statement | None:
    """The statement an EXPLAIN shows (or runs, with ANALYZE): the first suffix after EXPLAIN that parses."""
    for start in _token_starts(text)[1:EXPLAIN_PREFIX_TOKENS]:
        try:
            (inner,) = con.extract_statements(text[start:])
        except (duckdb.Error, ValueError):
            continue
        return inner
    return None


def _refusal(con: duckdb.DuckDBPyConnection, statement: duckdb.Statement) -> str | None:
    """Why ``statement`` may not run in a query, as one sentence; None for a read."""
    kind = statement.type.name
    if kind == "SELECT" or (kind == "MULTI" and _first_word(statement.query) in READ_WORDS):
        return None
    if kind == "EXPLAIN":
        inner = _explained(con, statement.query)
        return _refusal(con, inner) if inner is not None else f"query may only EXPLAIN a {READ_STATEMENTS} statement"
    word = _first_word(statement.query) or kind
    action = REFUSED_ACTIONS.get(word, "change the database")
    return f"query may not {action}: `densecurate query` is read-only and runs {READ_STATEMENTS}, not {word}"


def check_read_only(con: duckdb.DuckDBPyConnection, sql: str) -> None:
    """Raise QueryError unless every statement of ``sql`` only reads."""
    try:
        statements = con.extract_statements(sql)
    except duckdb.Error as exc:
        raise QueryError(f"query failed: {exc}") from None
    if not statements:
        raise QueryError(
            'the query is empty: give one SQL statement, e.g. "SELECT status, count(*) FROM samples GROUP BY ALL"'
        )
    for statement in statements:
        if (reason := _refusal(con, statement)) is not None:
            raise QueryError(reason)


def _query_error(root: Path, exc: duckdb.Error) -> QueryError:
    """The QueryError for what DuckDB refused; the sandbox's refusals in one line."""
    first = str(exc).splitlines()[0]
    if isinstance(exc, duckdb.PermissionException):
        return QueryError(
            f"query may read only files under the dataset root {root}, with no network or extensions ({first})"
        )
    if "configuration has been locked" in first:
        return QueryError(f"query may not change settings: the connection's configuration is locked ({first})")
    return QueryError(f"query failed: {exc}")


def run_query(root: Path, sql: str, params: list[Any] | None = None) -> tuple[list[str], list[tuple[Any, ...]]]:
    """Run ``sql`` on a read-only connection to the root's catalog; returns column names and rows.

    Only reads run (see ``check_read_only``), and they read files under the root only.
    """
    with connect(root) as con:
        check_read_only(con, sql)
        try:
            cursor = con.execute(sql, params or [])
        except duckdb.Error as exc:
            raise _query_error(root, exc) from None
        columns = [d[0] for d in cursor.description] if cursor.description else []
        return columns, cursor.fetchall()
