"""The episode databases: built from a task, copied per episode, locked down, and SQL run on them under limits."""

from __future__ import annotations

import logging
import sqlite3
import time
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    pass
from agentloop.envs.db.config import SQLEnvConfig
from agentloop.envs.db.tasks import DBTask

logger = logging.getLogger(__name__)


_READ_PRAGMAS = frozenset(
    {"table_info", "table_xinfo", "table_list", "index_list", "index_info", "index_xinfo", "foreign_key_list"}
)
_DENIED_ACTIONS = frozenset(
    {sqlite3.SQLITE_ATTACH, sqlite3.SQLITE_DETACH, sqlite3.SQLITE_CREATE_VTABLE, sqlite3.SQLITE_DROP_VTABLE}
)
_DENIED_FUNCTIONS = frozenset({"load_extension"})


def quote_identifier(name: str) -> str:
    """A name as a double-quoted SQL identifier."""
    return '"' + name.replace('"', '""') + '"'


def sqlite_type(declared: str) -> str:
    """The SQLite column type for a declared MySQL-style type.

    Integers (and YEAR) get INTEGER affinity, DECIMAL/NUMERIC get NUMERIC, FLOAT/REAL/DOUBLE
    get REAL; everything else (TEXT, CHAR, STRING, DATE, TIME, ...) is case-insensitive TEXT,
    never SQLite's default NUMERIC for unknown names (which would turn '007' into 7).
    """
    base = declared.strip().upper().split("(")[0].strip()
    if base in {"INT", "INTEGER", "BIGINT", "SMALLINT", "TINYINT", "MEDIUMINT", "YEAR"}:
        return "INTEGER"
    if base in {"DECIMAL", "NUMERIC", "DEC"}:
        return "NUMERIC"
    if base in {"FLOAT", "REAL", "DOUBLE"}:
        return "REAL"
    return "TEXT COLLATE NOCASE"


def build_database(task: DBTask) -> sqlite3.Connection:
    """A new in-memory database holding the task's table and rows."""
    conn = sqlite3.connect(":memory:", isolation_level=None, check_same_thread=False)
    table = quote_identifier(task.table_name)
    columns = ", ".join(f"{quote_identifier(name)} {sqlite_type(kind)}" for name, kind in task.columns)
    marks = ", ".join("?" * len(task.columns))
    conn.execute(f"CREATE TABLE {table} ({columns})")
    conn.execute("BEGIN")
    conn.executemany(f"INSERT INTO {table} VALUES ({marks})", task.rows)
    conn.execute("COMMIT")
    return conn


def _authorize(action: int, arg1: str | None, arg2: str | None, _db: str | None, _source: str | None) -> int:
    """Refuses everything that could reach past the episode's own database."""
    if action in _DENIED_ACTIONS:
        return sqlite3.SQLITE_DENY
    if action == sqlite3.SQLITE_PRAGMA and (arg1 or "").lower() not in _READ_PRAGMAS:
        return sqlite3.SQLITE_DENY
    if action == sqlite3.SQLITE_FUNCTION and (arg2 or "").lower() in _DENIED_FUNCTIONS:
        return sqlite3.SQLITE_DENY
    return sqlite3.SQLITE_OK


def open_copy(template: sqlite3.Connection, config: SQLEnvConfig) -> sqlite3.Connection:
    """A fresh, locked-down in-memory copy of ``template`` for one episode."""
    conn = sqlite3.connect(":memory:", isolation_level=None, check_same_thread=False)
    template.backup(conn)
    conn.execute(f"PRAGMA max_page_count = {int(config.max_db_pages)}")
    conn.setlimit(sqlite3.SQLITE_LIMIT_ATTACHED, 0)
    conn.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, config.max_value_bytes)
    conn.setlimit(sqlite3.SQLITE_LIMIT_SQL_LENGTH, config.max_action_chars * 4)
    conn.set_authorizer(_authorize)
    return conn


# --- running SQL --------------------------------------------------------------------------


@dataclass(frozen=True)
class SQLResult:
    """What one statement produced."""

    text: str
    """The observation: the rows, ``Query OK, ...`` or ``Error: ...``, already capped."""
    rows: tuple[tuple[Any, ...], ...] | None
    """The rows shown (None for a statement without a result set or a failure)."""
    error: bool
    """The statement failed (SQL error, refused operation or time limit)."""
    several: bool = False
    """The text held more than one statement, so nothing ran."""


def run_sql(conn: sqlite3.Connection, sql: str, config: SQLEnvConfig) -> SQLResult:
    """Runs one statement under the time limit and formats its result like a DB client.

    Never raises for bad SQL: errors, refusals and timeouts become ``Error: ...`` text.
    """
    deadline = time.monotonic() + config.query_timeout_s
    expired = [False]

    def over_time() -> int:
        expired[0] = time.monotonic() > deadline
        return int(expired[0])

    conn.set_progress_handler(over_time, 1000)
    cursor = conn.cursor()
    try:
        cursor.execute(sql)
        if cursor.description is None:
            count = max(cursor.rowcount, 0)
            return SQLResult(f"Query OK, {count} row{'' if count == 1 else 's'} affected", None, False)
        return _format_rows(cursor, config)
    except sqlite3.ProgrammingError as e:
        several = "one statement" in str(e)
        return SQLResult(cap_text(f"Error: {e}", config.max_observation_chars), None, True, several)
    except (sqlite3.Error, ValueError, OverflowError, MemoryError, RecursionError) as e:
        if expired[0]:
            message = f"Error: the statement ran longer than {config.query_timeout_s:g} s and was stopped"
        else:
            message = f"Error: {e}"
        return SQLResult(cap_text(message, config.max_observation_chars), None, True)
    finally:
        cursor.close()
        conn.set_progress_handler(None, 0)


def _format_rows(cursor: sqlite3.Cursor, config: SQLEnvConfig) -> SQLResult:
    rows: list[tuple[Any, ...]] = []
    size, more = 0, False
    for row in cursor:
        if len(rows) == config.max_result_rows or size > config.max_observation_chars:
            more = True
            break
        rows.append(row)
        size += len(repr(row)) + 2
    text = cap_text(repr(rows), config.max_observation_chars)
    if more:
        text += f"\n[only the first {len(rows)} rows are shown]"
    return SQLResult(text, tuple(rows), False)


def cap_text(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` characters, with a note saying how long it was."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}\n[output truncated: {len(text)} characters, {limit} shown]"


def table_rows(conn: sqlite3.Connection, table: str, config: SQLEnvConfig) -> Counter[tuple[Any, ...]] | None:
    """The table's rows as a multiset, or None if it cannot be read (dropped, too slow)."""
    deadline = time.monotonic() + config.query_timeout_s
    conn.set_progress_handler(lambda: int(time.monotonic() > deadline), 1000)
    try:
        return Counter(conn.execute(f"SELECT * FROM {quote_identifier(table)}"))
    except (sqlite3.Error, MemoryError) as e:
        logger.debug("cannot read table %r: %s", table, e)
        return None
    finally:
        conn.set_progress_handler(None, 0)
