"""The episode databases: task templates, and the worker process in which all their SQL runs.

A task's template is built here, in-process, from the task's own rows (the only SQL this
process ever runs is the fixed ``CREATE TABLE`` and parameterised ``INSERT`` of that build),
and kept as bytes. Every other statement (the agent's, the gold SQL, the scoring read) runs
in a :class:`DBWorker`: a child process (:mod:`agentloop.envs.db.worker`) killed when a
statement outlives its time limit, whatever SQLite is busy with. An :class:`EpisodeDB` is
one episode's database: the parent keeps its last committed bytes, so a statement that was
killed leaves it as it was before.

One worker serves every environment of a process (per memory bound): the rollout steps its
environments one at a time from one thread, and one worker (13 MiB resident) costs the same
step latency as one per environment (0.4 ms median with 48 envs stepped in turn) without the
48 processes (576 MiB resident, 248 MiB PSS). A killed worker's replacement starts at once,
so it is ready by the next statement (a start takes about 30 ms).
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import logging
import marshal
import os
import select
import sqlite3
import struct
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agentloop.envs.db import worker as worker_module
from agentloop.envs.db.config import SQLEnvConfig
from agentloop.envs.db.tasks import DBTask

logger = logging.getLogger(__name__)

KILL_GRACE_S = 0.5
"""How much longer than its time limit a statement may take to stop itself before its worker is killed."""
START_TIMEOUT_S = 30.0
"""How long a new worker may take to start."""
WORKER_PATH = Path(worker_module.__file__)
CRASHED = ("error", "the database engine stopped while running the statement; nothing was changed", False, 0, None)
"""The reply of a worker that died before its time limit (e.g. its memory ran out outside SQLite)."""


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


@dataclass(frozen=True)
class Template:
    """A task's table before any statement ran, as database bytes."""

    table: str
    """Name of the task's table."""
    data: bytes
    """The serialized database."""
    schema: tuple[tuple[str, str, str, str], ...]
    """``main``'s schema rows (type, name, table, sql): scoring reads the table only while it is unchanged."""


def build_template(task: DBTask) -> Template:
    """The task's table and rows, built in a new in-memory database and serialized."""
    conn = sqlite3.connect(":memory:", isolation_level=None)
    try:
        table = quote_identifier(task.table_name)
        columns = ", ".join(f"{quote_identifier(name)} {sqlite_type(kind)}" for name, kind in task.columns)
        conn.execute(f"CREATE TABLE {table} ({columns})")
        conn.execute("BEGIN")
        conn.executemany(f"INSERT INTO {table} VALUES ({', '.join('?' * len(task.columns))})", task.rows)
        conn.execute("COMMIT")
        schema = conn.execute("SELECT type, name, tbl_name, sql FROM main.sqlite_schema ORDER BY name").fetchall()
        return Template(task.table_name, conn.serialize(), tuple(schema))
    finally:
        conn.close()


_KEYS = itertools.count()


class EpisodeDB:
    """One episode's database: its last committed bytes, kept by the parent as the rollback point."""

    def __init__(self, template: Template) -> None:
        self.template = template
        self.data = template.data
        """The database as the last statement that completed left it."""
        self.key = next(_KEYS)
        """Names this database to the worker."""


@dataclass(frozen=True)
class SQLResult:
    """What one statement produced."""

    text: str
    """The observation: the rows, ``Query OK, ...`` or ``Error: ...``, already capped."""
    rows: tuple[tuple[Any, ...], ...] | None
    """The rows shown (None for a statement without a result set or a failure)."""
    error: bool
    """The statement failed (SQL error, refused operation, time or memory limit)."""
    several: bool = False
    """The text held more than one statement, so nothing ran."""
    tamper_attempts: int = 0
    """1 if the statement was refused for trying to change the schema scoring depends on."""


def cap_text(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` characters, with a note saying how long it was."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}\n[output truncated: {len(text)} characters, {limit} shown]"


def _limits(config: SQLEnvConfig) -> tuple[float, int, int, int, int, int]:
    """The per-request limits, in the order the worker reads them."""
    return (
        config.query_timeout_s,
        config.max_db_pages,
        config.max_value_bytes,
        config.max_action_chars * 4,
        config.max_result_rows,
        config.max_observation_chars,
    )


class DBWorker:
    """One worker process, respawned after it is killed, running the statements of any number of databases.

    It holds one database at a time: a request for another one carries that database's bytes.
    Requests are serialized by a lock. The process dies with this one (``PR_SET_PDEATHSIG``)
    and on :meth:`stop`. (The kernel sends that signal when the *thread* that started the
    process exits; a worker found dead before a request is replaced without a word.)
    """

    def __init__(self, memory_mib: int) -> None:
        self.memory_mib = memory_mib
        self._lock = threading.Lock()
        self._process: subprocess.Popen[bytes] | None = None
        self._ready = False
        self._held: int | None = None  # key of the database the process holds
        self.restarts = 0
        """How many times the process was killed (a statement outlived its limit) or died, and replaced."""
        self._spawn()

    @property
    def pid(self) -> int | None:
        """The worker process's id (None once stopped)."""
        return None if self._process is None else self._process.pid

    def run(self, db: EpisodeDB, sql: str, config: SQLEnvConfig) -> SQLResult:
        """Runs one statement on ``db`` and formats its result like a DB client.

        Never raises for bad SQL: errors, refusals, the time and memory limits become
        ``Error: ...`` text. A statement that changed the database updates ``db.data``; one
        that was killed leaves it as it was.
        """
        reply = self._call(("run", db.key, None, _limits(config), sql), db, config.query_timeout_s)
        if reply is None:
            message = f"Error: the statement ran longer than {config.query_timeout_s:g} s and was stopped"
            return SQLResult(message, None, True)
        status, value, flag, tamper, data = reply
        if data is not None:
            db.data = data
        if status == "rows":
            text = cap_text(repr(value), config.max_observation_chars)
            if flag:
                text += f"\n[only the first {len(value)} rows are shown]"
            return SQLResult(text, tuple(map(tuple, value)), False)
        if status == "done":
            return SQLResult(f"Query OK, {value} row{'' if value == 1 else 's'} affected", None, False)
        return SQLResult(cap_text(f"Error: {value}", config.max_observation_chars), None, True, flag, tamper)

    def read_table(self, db: EpisodeDB, config: SQLEnvConfig) -> Counter[tuple[Any, ...]] | None:
        """``db``'s task table as a multiset of rows; None unless the schema is still the template's."""
        template = db.template
        request = ("table", db.key, None, _limits(config), (template.table, template.schema))
        reply = self._call(request, db, config.query_timeout_s)
        if reply is None or reply[0] != "table" or reply[1] is None:
            why = "it took too long" if reply is None else reply[2] if reply[0] == "table" else reply[1]
            logger.warning("scoring could not read %r: %s", template.table, why)
            return None
        return Counter(map(tuple, reply[1]))

    def stop(self) -> None:
        """Ends the worker process (a later request starts a new one)."""
        with self._lock:
            self._end()

    def _call(self, request: tuple, db: EpisodeDB, timeout_s: float) -> tuple | None:
        """The reply to ``request``, or None when the process had to be killed (too slow, or it died)."""
        with self._lock:
            for _ in range(2):
                process = self._started()
                if self._held != db.key:
                    request = (*request[:2], db.data, *request[3:])
                deadline = time.monotonic() + timeout_s + KILL_GRACE_S
                reply = self._exchange(process, request, deadline)
                if reply is None:
                    self.restarts += 1
                    self._end()
                    self._spawn()  # starts now, so it is ready by the next statement
                    return None if time.monotonic() >= deadline else CRASHED
                self._held = db.key
                if reply[0] != "reload":
                    return reply
                self._held = None
            raise RuntimeError("the database worker keeps asking for a database it was sent")

    def _exchange(self, process: subprocess.Popen[bytes], request: tuple, deadline: float) -> tuple | None:
        assert process.stdin is not None and process.stdout is not None
        payload = marshal.dumps(request)
        message = memoryview(struct.pack("<I", len(payload)) + payload)
        try:
            while message:
                message = message[os.write(process.stdin.fileno(), message) :]
        except OSError:  # the process died
            return None
        head = _read(process.stdout.fileno(), 4, deadline)
        body = head and _read(process.stdout.fileno(), struct.unpack("<I", head)[0], deadline)
        return None if body is None else marshal.loads(body)

    def _spawn(self) -> None:
        argv = [sys.executable, "-I", "-S", str(WORKER_PATH), str(os.getpid()), str(self.memory_mib)]
        self._process = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0, start_new_session=True
        )
        self._ready, self._held = False, None

    def _started(self) -> subprocess.Popen[bytes]:
        if self._process is not None and self._process.poll() is not None:  # died while idle
            self._end()
        if self._process is None:
            self._spawn()
        assert self._process is not None and self._process.stdout is not None
        if not self._ready:
            if _read(self._process.stdout.fileno(), 1, time.monotonic() + START_TIMEOUT_S) != b"R":
                self._end()
                raise RuntimeError(f"the database worker did not start within {START_TIMEOUT_S:g} s")
            self._ready = True
        return self._process

    def _end(self) -> None:
        process, self._process, self._held = self._process, None, None
        if process is None:
            return
        process.kill()
        process.wait()
        for pipe in (process.stdin, process.stdout):
            if pipe is not None:
                pipe.close()


def _read(fd: int, size: int, deadline: float) -> bytes | None:
    """Exactly ``size`` bytes from ``fd``, or None at end of file or when ``deadline`` passes."""
    chunks, missing = [], size
    while missing:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            return None
        chunk = os.read(fd, min(missing, 1 << 20))
        if not chunk:
            return None
        chunks.append(chunk)
        missing -= len(chunk)
    return b"".join(chunks)


# --- the shared workers ---------------------------------------------------------------------

_shared: dict[int, tuple[DBWorker, int]] = {}  # memory bound -> (worker, users)
_shared_lock = threading.Lock()
_shared_pid = os.getpid()


def lease_worker(config: SQLEnvConfig) -> DBWorker:
    """The process's worker for ``config.max_memory_mib`` (started if need be); :func:`release_worker` gives it back."""
    global _shared_pid
    with _shared_lock:
        if _shared_pid != os.getpid():  # a forked copy of this process: the workers are the parent's
            _shared.clear()
            _shared_pid = os.getpid()
        worker, users = _shared.get(config.max_memory_mib, (None, 0))
        if worker is None:
            worker = DBWorker(config.max_memory_mib)
        _shared[config.max_memory_mib] = (worker, users + 1)
        return worker


def release_worker(worker: DBWorker) -> None:
    """Gives a leased worker back; the last user's release ends its process."""
    with _shared_lock:
        held, users = _shared.get(worker.memory_mib, (None, 0))
        if held is not worker or os.getpid() != _shared_pid:
            return
        if users > 1:
            _shared[worker.memory_mib] = (worker, users - 1)
            return
        del _shared[worker.memory_mib]
    worker.stop()


@contextlib.contextmanager
def leased_worker(config: SQLEnvConfig) -> Iterator[DBWorker]:
    """A leased worker for the ``with`` block."""
    worker = lease_worker(config)
    try:
        yield worker
    finally:
        release_worker(worker)


@atexit.register
def _stop_shared_workers() -> None:
    with _shared_lock:
        workers = [worker for worker, _ in _shared.values()] if os.getpid() == _shared_pid else []
        _shared.clear()
    for worker in workers:
        worker.stop()


def run_on_template(task: DBTask, sql: str, config: SQLEnvConfig) -> SQLResult:
    """Runs ``sql`` on a fresh copy of the task's table (used for gold SQL, never an agent's)."""
    with leased_worker(config) as worker:
        return worker.run(EpisodeDB(build_template(task)), sql, config)
