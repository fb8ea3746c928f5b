"""The DuckDB catalog: views over the dataset root's Parquet, stored in ``ROOT/catalog.duckdb``.

The views name their files relative to the root, so the catalog of a moved or copied root reads that root's files,
in densecurate and in plain DuckDB (1.2 or later: the file is written in storage version ``STORAGE_VERSION``). A file
whose Parquet footer does not read is left out of the views, with a warning that names it.
"""

from __future__ import annotations

import fnmatch
import hashlib
import itertools
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from schemas.atomic import atomic_output
from schemas.errors import MissingInputError, UserError
from schemas.layout import CATALOG_FILE, TABLE_GLOBS, DatasetLayout, is_dataset_root

log = logging.getLogger(__name__)

# The DuckDB storage version the catalog is written in: DuckDB 1.2 and every later release open it.
STORAGE_VERSION = "v1.2.0"
WRITE_CONFIG = {"storage_compatibility_version": STORAGE_VERSION}
# What the catalog records (``catalog_info``); a catalog of another format is rebuilt.
CATALOG_FORMAT = 2
# The variable that names the dataset root to the views (densecurate sets it on its connections).
ROOT_VARIABLE = "densecurate_root"
# ``densecurate_files(paths)``: paths relative to the root, under the root that ``ROOT_VARIABLE`` names; when it is
# unset, under the folder of the catalog.duckdb the session opened (DuckDB's default temp_directory is that file's
# path plus ".tmp"); else an error that says what to set.
CATALOG_TEMP = re.escape(f"{CATALOG_FILE}.tmp")
FILES_MACRO = f"""
CREATE MACRO densecurate_files(paths) AS [coalesce(
    getvariable('{ROOT_VARIABLE}') || '/',
    CASE WHEN regexp_matches(current_setting('temp_directory'), '(^|[/\\\\]){CATALOG_TEMP}$')
        THEN regexp_replace(current_setting('temp_directory'), '{CATALOG_TEMP}$', '') END,
    error('cannot tell which dataset root this catalog belongs to: SET VARIABLE {ROOT_VARIABLE} = ''ROOT''')
) || p FOR p IN paths]
"""
# A view reads its files with ``{source}``: plain ``read_parquet`` when they share one schema, else by name.
READ_PARQUET = "read_parquet(densecurate_files({files}))"
READ_BY_NAME = "read_parquet(densecurate_files({files}), union_by_name = true)"
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
SHOWN_DAMAGED = 5  # damaged files a warning names before "and N more"


class QueryError(UserError):
    """A query DuckDB refused (a syntax error, an unknown table or column, a statement that would write)."""


@dataclass(frozen=True)
class View:
    """A catalog view over the Parquet files matching ``glob`` (relative to the root), which ``stage`` writes."""

    name: str
    glob: str
    stage: str
    select: str = READ_ALL
    requires: tuple[str, ...] = ()


VIEWS: tuple[View, ...] = (
    View("samples", TABLE_GLOBS["samples"], "shard"),
    View("captions", TABLE_GLOBS["captions"], "caption"),
    View("vocab", TABLE_GLOBS["vocab"], "score"),
    View("density", TABLE_GLOBS["density"], "score", DENSITY_WITH_VALID, requires=("vocab",)),
    View("embeddings", TABLE_GLOBS["embeddings"], "ground", WITHOUT_VECTORS.format(column="embedding")),
    View("embedding_vectors", TABLE_GLOBS["embeddings"], "ground"),
    View("grounding", TABLE_GLOBS["grounding"], "ground"),
    View(
        "noun_calibration", TABLE_GLOBS["noun_calibration"], "ground", WITHOUT_VECTORS.format(column="text_embedding")
    ),
    View("duplicates", TABLE_GLOBS["duplicates"], "ground"),
    View("runs", TABLE_GLOBS["runs"], ""),  # written by every stage's run: no stage rewrites a past run's record
)
GLOBS = sorted({view.glob for view in VIEWS})
STAGE_OF_GLOB = {view.glob: view.stage for view in VIEWS}

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


def views_fingerprint(root: Path, views: list[str], leave_out: str | None = None) -> dict[str, str]:
    """Per view of ``views`` that the catalog has (and the views it is made from), one hash of its files' names,
    sizes and modification times; files under the folder ``leave_out`` (relative to the root) are not counted."""
    by_name = {view.name: view for view in VIEWS}
    wanted = [name for name in views if name in by_name]
    wanted += [required for name in wanted for required in by_name[name].requires]
    prefix = None if leave_out is None else leave_out.rstrip("/") + "/"
    found = {}
    for name in sorted(set(wanted)):
        listing = _listing(root, by_name[name].glob)
        found[name] = _digest({f: s for f, s in listing.items() if prefix is None or not f.startswith(prefix)})
    return found


def _footer(path: Path) -> pq.ParquetSchema | None:
    """The file's Parquet schema, from its footer; None when the footer does not read (an empty or cut file)."""
    try:
        return pq.read_metadata(path).schema
    except (OSError, pa.ArrowException):
        return None


def _one_schema(root: Path, schemas: list[pq.ParquetSchema], others: list[str]) -> bool:
    """Whether ``schemas`` and those of the files ``others`` (read one at a time, until one differs) are one. Then
    ``read_parquet`` without ``union_by_name`` reads the files as with it, and binding a query reads the first file's
    schema instead of every file's footer (which the scan then reads again): about half of a query's time at 10,000
    files."""
    every = itertools.chain(schemas, (_footer(root / f) for f in others))
    first = next(every, None)
    return first is not None and all(schema is not None and schema.equals(first) for schema in every)


def _table_state(root: Path, listing: dict[str, list[int]], old: Any, old_files: Any) -> dict[str, Any]:
    """A glob's digest, whether its files that read share one schema, and which files do not read (``damaged``).
    Kept from ``old`` (the replaced catalog's record, made for ``old_files``) for the files that did not change; new
    or changed files have their footer read (with one unchanged file as the schema's reference, or all of them when
    they did not share one)."""
    old = old if isinstance(old, dict) else {}
    old_files = old_files if isinstance(old_files, dict) else {}
    digest = _digest(listing)
    if old.get("digest") == digest and isinstance(old.get("one_schema"), bool) and isinstance(old.get("damaged"), list):
        return old
    was_damaged = set(old.get("damaged") or ())
    unchanged = [f for f, stat in listing.items() if old_files.get(f) == stat]
    footers = {f: _footer(root / f) for f, stat in listing.items() if old_files.get(f) != stat}
    readable = [f for f in unchanged if f not in was_damaged]
    schemas = [schema for schema in footers.values() if schema is not None]
    one_schema = _one_schema(root, schemas, readable[:1] if old.get("one_schema") else readable)
    damaged = sorted({f for f in unchanged if f in was_damaged} | {f for f, s in footers.items() if s is None})
    return {"digest": digest, "one_schema": one_schema, "damaged": damaged}


@dataclass
class TablesState:
    """Per glob of the views: a digest of its files, whether those that read share one schema and which do not read
    (``tables``), and its listing (``files``), so that a later refresh reads only new or changed files' footers."""

    tables: dict[str, dict[str, Any]]
    files: dict[str, dict[str, list[int]]]

    @classmethod
    def of(cls, root: Path, known: TablesState | None = None) -> TablesState:
        """The state of the views' files now; files that ``known`` (the catalog being replaced) lists unchanged are
        not read again."""
        known = known or cls({}, {})
        state = cls({}, {})
        for glob in GLOBS:
            listing = _listing(root, glob)
            state.tables[glob] = _table_state(root, listing, known.tables.get(glob), known.files.get(glob))
            state.files[glob] = listing
        return state

    def readable(self, glob: str) -> list[str]:
        """The files of ``glob`` whose footer reads."""
        damaged = set(self.tables[glob]["damaged"])
        return [f for f in self.files[glob] if f not in damaged]


def _damaged(tables: dict[str, dict[str, Any]]) -> dict[str, str]:
    """The files left out of the views, each with the stage whose rerun with --repair rewrites it."""
    return {f: STAGE_OF_GLOB[glob] for glob, table in sorted(tables.items()) for f in table["damaged"]}


def damaged_files(con: duckdb.DuckDBPyConnection) -> dict[str, str]:
    """The files (relative to the root) that the catalog open on ``con`` leaves out of its views because their
    footer does not read, each with the stage whose rerun with --repair rewrites it."""
    (tables,) = con.execute("SELECT tables FROM catalog_info").fetchone()
    return _damaged(json.loads(tables))


def readable_list(con: duckdb.DuckDBPyConnection, root: Path, glob: str) -> str:
    """An SQL list of the absolute paths of ``glob``'s files under ``root`` that the catalog open on ``con``
    reads (its damaged files left out), for ``read_parquet``; ``[]`` when none reads."""
    (tables, files) = con.execute("SELECT tables, files FROM catalog_info").fetchone()
    damaged = set(json.loads(tables)[glob]["damaged"])
    readable = [str(root / f) for f in json.loads(files)[glob] if f not in damaged]
    return "[" + ", ".join(sql_string(f) for f in readable) + "]"


def damage_warning(root: Path, damaged: dict[str, str]) -> str | None:
    """One sentence naming the files left out of the views and what mends them; None when there are none."""
    if not damaged:
        return None
    named = ", ".join(list(damaged)[:SHOWN_DAMAGED])
    if len(damaged) > SHOWN_DAMAGED:
        named += f" and {len(damaged) - SHOWN_DAMAGED} more"
    stages = " and ".join(f"`densecurate {stage}`" for stage in sorted(set(damaged.values()) - {""}))
    mends = [f"rerunning {stages} with --repair rewrites them"] if stages else []
    if "" in damaged.values():
        mends.append("a history/ file only records a past run: remove it")
    return (
        f"{len(damaged)} damaged Parquet file(s) under {root} left out of the catalog's views, so queries and stats "
        f"leave out their rows: {named} (the footer does not read). `densecurate verify {root}` lists the damaged "
        f"outputs; {'; '.join(mends)}"
    )


def _warn_damaged(root: Path, damaged: dict[str, str]) -> None:
    if warning := damage_warning(root, damaged):
        log.warning("%s", warning)


def _views(state: TablesState) -> list[View]:
    """The views with a file that reads (and whose required views are there)."""
    found: dict[str, View] = {}
    for view in VIEWS:
        if state.readable(view.glob) and all(r in found for r in view.requires):
            found[view.name] = view
    return list(found.values())


def _create_views(con: duckdb.DuckDBPyConnection, state: TablesState) -> None:
    """Create the views on ``con``, reading the files by path relative to the root: by glob when every file of it
    reads, else the files that read by name; with ``union_by_name`` unless they share one schema."""
    con.execute(FILES_MACRO)
    for view in _views(state):
        table = state.tables[view.glob]
        files = state.readable(view.glob) if table["damaged"] else [view.glob]
        read = READ_PARQUET if table["one_schema"] else READ_BY_NAME
        source = read.format(files="[" + ", ".join(sql_string(f) for f in files) + "]")
        con.execute(f"CREATE VIEW {view.name} AS {view.select.format(source=source)}")


def _set_root(con: duckdb.DuckDBPyConnection, root: Path) -> None:
    """Point the views on ``con`` at ``root``, whatever the working directory or DuckDB's temp_directory."""
    con.execute(f"SET VARIABLE {ROOT_VARIABLE} = ?", [str(root.resolve())])


def _write_catalog(con: duckdb.DuckDBPyConnection, root: Path, state: TablesState) -> None:
    """Create the views over ``root``'s files on ``con``, and the record of those files (``catalog_info``)."""
    _set_root(con, root)  # creating a view binds its query, which reads the files
    _create_views(con, state)
    con.execute("CREATE TABLE catalog_info (info VARCHAR, tables VARCHAR, files VARCHAR)")
    con.execute(
        "INSERT INTO catalog_info VALUES (?, ?, ?)",
        [json.dumps({"format": CATALOG_FORMAT}), json.dumps(state.tables), json.dumps(state.files)],
    )


def _stored(layout: DatasetLayout, files: bool = False) -> TablesState | None:
    """What the catalog records of its tables' files (their listing only with ``files``); None without a readable
    catalog of this format."""
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
    return TablesState(tables, listing) if info.get("format") == CATALOG_FORMAT else None


def refresh_catalog(layout: DatasetLayout) -> Path:
    """Rewrite the catalog with one view per table that has a file that reads; swapped in atomically. Files whose
    footer does not read are left out, with a warning."""
    root = layout.root.resolve()
    state = TablesState.of(root, _stored(layout, files=True))
    with atomic_output(layout.catalog_path) as tmp, duckdb.connect(str(tmp), config=WRITE_CONFIG) as con:
        _write_catalog(con, root, state)
    _warn_damaged(layout.root, _damaged(state.tables))
    return layout.catalog_path


def _catalog_is_current(layout: DatasetLayout) -> bool:
    """Whether the catalog records the files the views' globs match now (a view made without ``union_by_name`` must
    not meet a file of another schema, nor a view a file that does not read)."""
    stored = _stored(layout)
    if stored is None or set(stored.tables) != set(GLOBS):
        return False
    root = layout.root.resolve()
    return all(
        isinstance(table, dict) and table.get("digest") == _digest(_listing(root, glob))
        for glob, table in stored.tables.items()
    )


def _catalog_in_memory(layout: DatasetLayout) -> duckdb.DuckDBPyConnection:
    """The root's catalog, made in memory."""
    root = layout.root.resolve()
    state = TablesState.of(root)
    con = duckdb.connect(":memory:", config=CONNECT_CONFIG)
    _write_catalog(con, root, state)
    _warn_damaged(layout.root, _damaged(state.tables))
    return con


def _open_catalog(layout: DatasetLayout) -> duckdb.DuckDBPyConnection:
    """The root's catalog, rebuilt first when stale; in memory when a stale one cannot be rewritten. Warns of the
    files its views leave out."""
    if _catalog_is_current(layout):
        con = duckdb.connect(str(layout.catalog_path), read_only=True, config=CONNECT_CONFIG)
        _warn_damaged(layout.root, damaged_files(con))
        return con
    try:
        refresh_catalog(layout)
    except (OSError, duckdb.Error) as exc:  # a read-only root, e.g. a copy on a read-only mount
        log.warning("cannot rewrite %s (%s): using a catalog in memory", layout.catalog_path, exc)
        return _catalog_in_memory(layout)
    return duckdb.connect(str(layout.catalog_path), read_only=True, config=CONNECT_CONFIG)


def _confine_to_root(con: duckdb.DuckDBPyConnection, root: Path) -> None:
    """Let ``con`` touch no file outside ``root``, nor the network, and lock its settings."""
    allowed = sorted({str(root.absolute()), str(root.resolve())})
    con.execute("SET allowed_directories = ?", [allowed])  # only while external access is still on
    con.execute("SET enable_external_access = false")
    con.execute("SET lock_configuration = true")  # a query's SET or RESET cannot undo the two above


def connect(root: Path) -> duckdb.DuckDBPyConnection:
    """A read-only connection to the root's catalog, refreshed first when its tables' files changed.

    The connection reads files under the root only: no other file, no network, no extension
    installed or loaded, and its settings are locked.
    """
    layout = DatasetLayout(root)
    if not layout.root.is_dir():
        raise MissingInputError(f"dataset root {root} does not exist")
    if not is_dataset_root(layout.root):  # the catalog would be written into a folder that is not one
        raise MissingInputError(
            f"{root} is not a dataset root (no shards/ folder, no {CATALOG_FILE}): give the folder that "
            "`densecurate shard --out` wrote"
        )
    con = _open_catalog(layout)
    try:
        _set_root(con, layout.root)
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


def _with_damage(root: Path, con: duckdb.DuckDBPyConnection, error: QueryError) -> QueryError:
    """``error``, followed by which files the views leave out when there are any (a view of a table whose only
    files are damaged does not exist)."""
    if warning := damage_warning(root, damaged_files(con)):
        return QueryError(f"{error}; note: {warning}")
    return error


def run_query(root: Path, sql: str, params: list[Any] | None = None) -> tuple[list[str], list[tuple[Any, ...]]]:
    """Run ``sql`` on a read-only connection to the root's catalog; returns column names and rows.

    Only reads run (see ``check_read_only``), and they read files under the root only.
    """
    with connect(root) as con:
        check_read_only(con, sql)
        try:
            cursor = con.execute(sql, params or [])
        except duckdb.Error as exc:
            raise _with_damage(root, con, _query_error(root, exc)) from None
        columns = [d[0] for d in cursor.description] if cursor.description else []
        return columns, cursor.fetchall()
