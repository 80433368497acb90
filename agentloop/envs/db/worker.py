"""The database worker: the child process in which every SQL statement of the Database environment runs.

:mod:`agentloop.envs.db.engine` starts it as ``python -I -S worker.py <parent pid> <memory MiB>``;
it uses the standard library only, so it starts in about 0.1 s and stays small. Before it
answers anything it locks itself down: it dies with its parent (``PR_SET_PDEATHSIG``), may
write no file (``RLIMIT_FSIZE`` 0), and its SQLite may allocate at most ``memory MiB`` in all
(``hard_heap_limit``) inside an address space of twice that plus
``PYTHON_ALLOWANCE_MIB`` (``RLIMIT_AS``). The parent kills it when a statement outlives its
time limit, whatever the statement is doing.

It holds one database at a time, on a fresh connection opened for it from bytes the parent
sends (``PRAGMA temp_store = MEMORY``: sorts and temporary results never touch the disk;
page count, value length and LIKE pattern capped; the :class:`Guard` authorizer set last).
It keeps that database between requests; the parent keeps its last committed bytes.

Protocol: each message is a 4-byte little-endian length and a :mod:`marshal` payload. The
child first writes ``b"R"`` when it is ready. A request is ``(op, key, data, limits, arg)``:
``key`` names the database, ``data`` is its bytes (None when the child already holds
``key``), ``limits`` is ``(timeout_s, max_db_pages, max_value_bytes, max_sql_chars,
max_rows, max_chars)`` (the size limits take effect with the request that sends the bytes).
``op`` is ``"run"`` (``arg``: one SQL statement) or ``"table"`` (``arg``: ``(table,
schema)``: read the table if ``main``'s schema is exactly ``schema`` and ``temp`` is empty).
A reply is ``(status, value, flag, tamper, data)``: ``("rows", rows, more, 0, data)``,
``("done", rows changed, False, 0, data)``, ``("error", message, several, tamper, data)``,
``("table", rows or None, reason, 0, None)`` or ``("reload", ...)`` (send the bytes).
``data`` is the database's new bytes when the statement changed it, else None.
"""

import ctypes
import marshal
import os
import resource
import signal
import sqlite3
import struct
import sys
import time

PAGE_BYTES = 4096
"""SQLite's page size in every episode database."""
LIKE_PATTERN_CHARS = 100
"""Longest LIKE or GLOB pattern (SQLite's own default is 50,000)."""
PYTHON_ALLOWANCE_MIB = 128
"""Address space the worker's Python needs besides SQLite's heap and copies of the database."""
PR_SET_PDEATHSIG = 1

READ_PRAGMAS = frozenset(
    {"table_info", "table_xinfo", "table_list", "index_list", "index_info", "index_xinfo", "foreign_key_list"}
)
"""The pragmas a statement may use (``PRAGMA x`` or ``pragma_x(...)``): they only describe the schema."""
FUNCTIONS = frozenset(
    """
    abs avg ceil ceiling char coalesce count cume_dist current_date current_time current_timestamp date
    datetime dense_rank first_value floor glob group_concat ifnull iif instr julianday lag last_value lead
    length like likelihood likely lower ltrim max min mod nth_value ntile nullif percent_rank pow power rank
    replace round row_number rtrim sign sqrt strftime substr substring sum time total trim trunc typeof
    unicode unixepoch unlikely upper
    """.split()
)
"""The SQL functions a statement may call: what the tasks need (the gold SQL uses count, like,
sum, max, avg, min, replace, substring, length and abs) and their plain relatives. Everything
else is refused: functions that expose the process (``sqlite_version``, ``fts3_tokenizer``,
``sqlite_compileoption_get``, ...), full-text and R-tree internals, JSON, ``printf``/``format``
(which can loop for minutes), ``hex``, ``zeroblob`` and ``randomblob``."""
SCHEMA_TABLES = frozenset({"sqlite_master", "sqlite_schema", "sqlite_temp_master", "sqlite_temp_schema"})
_SCHEMA_ACTIONS = frozenset(
    {
        sqlite3.SQLITE_CREATE_INDEX,
        sqlite3.SQLITE_CREATE_TABLE,
        sqlite3.SQLITE_CREATE_TEMP_INDEX,
        sqlite3.SQLITE_CREATE_TEMP_TABLE,
        sqlite3.SQLITE_CREATE_TEMP_TRIGGER,
        sqlite3.SQLITE_CREATE_TEMP_VIEW,
        sqlite3.SQLITE_CREATE_TRIGGER,
        sqlite3.SQLITE_CREATE_VIEW,
        sqlite3.SQLITE_CREATE_VTABLE,
        sqlite3.SQLITE_DROP_INDEX,
        sqlite3.SQLITE_DROP_TABLE,
        sqlite3.SQLITE_DROP_TEMP_INDEX,
        sqlite3.SQLITE_DROP_TEMP_TABLE,
        sqlite3.SQLITE_DROP_TEMP_TRIGGER,
        sqlite3.SQLITE_DROP_TEMP_VIEW,
        sqlite3.SQLITE_DROP_TRIGGER,
        sqlite3.SQLITE_DROP_VIEW,
        sqlite3.SQLITE_DROP_VTABLE,
        sqlite3.SQLITE_ALTER_TABLE,
    }
)

SCHEMA_CHANGE = (
    "changing the schema (CREATE, DROP or ALTER of a table, view, trigger or index, temporary ones "
    "included) is not allowed here: the task's table is fixed; use SELECT, INSERT, UPDATE or DELETE"
)
TRANSACTIONS = (
    "transactions (BEGIN, COMMIT, ROLLBACK, SAVEPOINT) are not available here: every statement is committed on its own"
)
ATTACH = "ATTACH, DETACH and VACUUM are not available here: the episode has one in-memory database"
MAINTENANCE = "ANALYZE and REINDEX are not available here"
OTHER = "this kind of statement is not available here: use SELECT, INSERT, UPDATE or DELETE"


class Guard:
    """The authorizer of one connection: lets through what the tasks need and records every refusal.

    ``refused`` collects, for the statement being prepared, each refusal as (reason, whether
    it was a schema change); :meth:`verdict` turns them into the observation.
    """

    def __init__(self, tables: set[str], modules: frozenset[str]) -> None:
        self.tables = {name.lower() for name in tables}
        self.modules = modules
        self.refused: list[tuple[str, bool]] = []

    def __call__(self, action: int, arg1: str | None, arg2: str | None, _db: str | None, _src: str | None) -> int:
        refusal = self.judge(action, (arg1 or "").lower(), (arg2 or "").lower())
        if refusal is None:
            return sqlite3.SQLITE_OK
        self.refused.append(refusal)
        return sqlite3.SQLITE_DENY

    def judge(self, action: int, arg1: str, arg2: str) -> tuple[str, bool] | None:
        """None to allow, else (reason, schema change) to refuse."""
        if action in (sqlite3.SQLITE_SELECT, sqlite3.SQLITE_RECURSIVE):
            return None
        if action == sqlite3.SQLITE_FUNCTION:
            if arg2 in FUNCTIONS:
                return None
            kind = "function" if arg2.replace("_", "").isalnum() else "operator"
            return f"the {kind} {arg2}{'()' if kind == 'function' else ''} is not available here", False
        if action == sqlite3.SQLITE_READ:
            # Besides the task's table and the schema, a statement reads only its own recursive
            # CTEs: every name but a virtual table's or a pragma's is one of those.
            pragma = arg1.startswith("pragma_")
            if arg1 in self.tables or arg1 in SCHEMA_TABLES or (pragma and arg1[7:] in READ_PRAGMAS):
                return None
            if arg1 in self.modules or pragma:
                return f"the table-valued function or virtual table {arg1} is not available here", False
            return None
        if action == sqlite3.SQLITE_PRAGMA:
            if arg1 in READ_PRAGMAS:
                return None
            listed = ", ".join(sorted(READ_PRAGMAS))
            return f"PRAGMA {arg1} is not available here (only {listed})", arg1 == "writable_schema"
        if action in (sqlite3.SQLITE_INSERT, sqlite3.SQLITE_UPDATE, sqlite3.SQLITE_DELETE):
            if arg1 in self.tables:
                return None
            if arg1 in SCHEMA_TABLES:
                # SQLite asks about UPDATE of sqlite_master while it sets up a table-valued
                # function; a statement itself may never write it (writable_schema is refused).
                return None if action == sqlite3.SQLITE_UPDATE else (SCHEMA_CHANGE, True)
            return "only the task's table can be changed", False
        if action in _SCHEMA_ACTIONS:
            return SCHEMA_CHANGE, True
        if action in (sqlite3.SQLITE_TRANSACTION, sqlite3.SQLITE_SAVEPOINT):
            return TRANSACTIONS, False
        if action in (sqlite3.SQLITE_ATTACH, sqlite3.SQLITE_DETACH):
            return ATTACH, False
        if action in (sqlite3.SQLITE_ANALYZE, sqlite3.SQLITE_REINDEX):
            return MAINTENANCE, False
        return OTHER, False

    def verdict(self) -> tuple[str, bool] | None:
        """The reason to show for the refused statement, and whether it tried to change the schema."""
        if not self.refused:
            return None
        reasons = [reason for reason, _ in self.refused]
        if MAINTENANCE in reasons:  # ANALYZE first asks to write sqlite_master: not an attempt of the agent's
            return MAINTENANCE, False
        return reasons[0], any(schema for _, schema in self.refused)


def lock_down(parent: int, memory_mib: int) -> None:
    """Dies with the parent; no files, no core dumps; SQLite's heap and the address space capped."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before the line above
        os._exit(0)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past RLIMIT_FSIZE fails instead of killing
    resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    space = (2 * memory_mib + PYTHON_ALLOWANCE_MIB) << 20
    resource.setrlimit(resource.RLIMIT_AS, (space, space))
    sqlite3.connect(":memory:").execute(f"PRAGMA hard_heap_limit = {memory_mib << 20}").fetchall()


def virtual_table_modules() -> frozenset[str]:
    """The names of this SQLite's virtual table modules (``json_each``, ``dbstat``, ``sqlite_stmt``, ...)."""
    conn = sqlite3.connect(":memory:")
    return frozenset(name.lower() for (name,) in conn.execute("SELECT name FROM pragma_module_list"))


def open_database(data: bytes, limits: tuple, modules: frozenset[str]) -> tuple[sqlite3.Connection, Guard]:
    """A fresh, locked-down connection holding ``data``."""
    _, pages, value_bytes, sql_chars, _, _ = limits
    conn = sqlite3.connect(":memory:", isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA temp_store = MEMORY")
    conn.deserialize(data)
    conn.execute(f"PRAGMA max_page_count = {int(pages)}")
    conn.setlimit(sqlite3.SQLITE_LIMIT_ATTACHED, 0)
    conn.setlimit(sqlite3.SQLITE_LIMIT_WORKER_THREADS, 0)
    conn.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, value_bytes)
    conn.setlimit(sqlite3.SQLITE_LIMIT_SQL_LENGTH, sql_chars)
    conn.setlimit(sqlite3.SQLITE_LIMIT_LIKE_PATTERN_LENGTH, LIKE_PATTERN_CHARS)
    tables = {name for (name,) in conn.execute("SELECT name FROM main.sqlite_schema WHERE type = 'table'")}
    guard = Guard(tables, modules)
    conn.set_authorizer(guard)
    return conn, guard


def run(conn: sqlite3.Connection, guard: Guard, sql: str, limits: tuple, memory_mib: int) -> tuple:
    """Runs one statement under the time limit; the reply for it."""
    timeout_s, _, _, _, max_rows, max_chars = limits
    deadline = time.monotonic() + timeout_s
    before = conn.total_changes
    guard.refused.clear()
    conn.set_progress_handler(lambda: time.monotonic() > deadline, 1000)
    cursor = conn.cursor()
    try:
        cursor.execute(sql)
        if cursor.description is None:
            reply = ["done", conn.total_changes - before, False, 0, None]  # rowcount misses WITH ... UPDATE
        else:
            reply = ["rows", *fetch(cursor, max_rows, max_chars), 0, None]
    except sqlite3.ProgrammingError as e:
        reply = ["error", str(e), "one statement" in str(e), 0, None]
    except MemoryError:
        reply = ["error", f"the statement needed more than {memory_mib} MiB of memory and was stopped", False, 0, None]
    except (sqlite3.Error, ValueError, OverflowError, RecursionError) as e:
        message, tamper = explain(str(e), guard, time.monotonic() > deadline, limits)
        reply = ["error", message, False, int(tamper), None]
    finally:
        cursor.close()
        conn.set_progress_handler(None, 0)
    if conn.total_changes != before:
        conn.set_authorizer(None)
        reply[4] = conn.serialize()
        conn.set_authorizer(guard)
    return tuple(reply)


def fetch(cursor: sqlite3.Cursor, max_rows: int, max_chars: int) -> tuple[list, bool]:
    """The rows an observation can show, and whether there were more."""
    rows: list = []
    size = 0
    for row in cursor:
        if len(rows) == max_rows or size > max_chars:
            return rows, True
        rows.append(row)
        size += len(repr(row)) + 2
    return rows, False


def explain(error: str, guard: Guard, late: bool, limits: tuple) -> tuple[str, bool]:
    """The observation's message for a failed statement, and whether it tried to change the schema."""
    timeout_s, pages, value_bytes, sql_chars, _, _ = limits
    refusal = guard.verdict()
    if refusal is not None:
        return refusal
    if late and error == "interrupted":
        return f"the statement ran longer than {timeout_s:g} s and was stopped", False
    if "may not be modified" in error:  # a direct write to sqlite_master
        return SCHEMA_CHANGE, True
    if error == "database or disk is full":
        return f"the database is full (it may hold at most {pages} pages of {PAGE_BYTES // 1024} KiB)", False
    if error == "string or blob too big":
        return f"string or blob too big (a value may hold at most {value_bytes} bytes)", False
    if error == "LIKE or GLOB pattern too complex":
        return f"LIKE or GLOB pattern too long (at most {LIKE_PATTERN_CHARS} characters)", False
    if error in ("query string is too large", "statement too long"):
        return f"the statement is too long (at most {sql_chars} characters)", False
    return error, False


def read_table(conn: sqlite3.Connection, guard: Guard, table: str, schema: list, timeout_s: float) -> tuple:
    """The reply with ``main``'s table ``table``, if the schema is exactly ``schema`` and ``temp`` empty."""
    deadline = time.monotonic() + timeout_s
    conn.set_authorizer(None)
    conn.set_progress_handler(lambda: time.monotonic() > deadline, 1000)
    try:
        found = conn.execute("SELECT type, name, tbl_name, sql FROM main.sqlite_schema ORDER BY name").fetchall()
        temporary = conn.execute("SELECT count(*) FROM temp.sqlite_schema").fetchone()[0]
        if found != [tuple(row) for row in schema] or temporary:
            return ("table", None, f"the schema changed: {found!r}, {temporary} temporary objects", 0, None)
        rows = conn.execute('SELECT * FROM main."' + table.replace('"', '""') + '"').fetchall()
        return ("table", rows, "", 0, None)
    except (sqlite3.Error, MemoryError) as e:
        return ("table", None, f"the table cannot be read: {e!r}", 0, None)
    finally:
        conn.set_progress_handler(None, 0)
        conn.set_authorizer(guard)


def serve(memory_mib: int) -> None:
    """Answers requests until the parent closes the pipe."""
    source, sink = sys.stdin.buffer, sys.stdout.buffer
    sink.write(b"R")
    sink.flush()
    modules = virtual_table_modules()
    held: tuple | None = None  # (key, connection, guard) of the database held
    while True:
        head = source.read(4)
        if len(head) < 4:
            return
        op, key, data, limits, arg = marshal.loads(source.read(struct.unpack("<I", head)[0]))
        try:
            if data is not None:
                if held is not None:
                    held[1].close()
                held = None
                held = (key, *open_database(data, limits, modules))
            if held is None or held[0] != key:
                reply = ("reload", None, False, 0, None)
            elif op == "run":
                reply = run(held[1], held[2], arg, limits, memory_mib)
            else:
                reply = read_table(held[1], held[2], arg[0], arg[1], limits[0])
            payload = marshal.dumps(reply)
        except Exception as e:  # the held database may now differ from the parent's bytes: drop it
            held = None
            payload = marshal.dumps(
                ("error", f"the database engine failed ({e!r}); nothing was changed", False, 0, None)
            )
        sink.write(struct.pack("<I", len(payload)) + payload)
        sink.flush()


if __name__ == "__main__":
    lock_down(int(sys.argv[1]), int(sys.argv[2]))
    serve(int(sys.argv[2]))
