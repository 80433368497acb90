"""The Database environment: AgentBench's dbbench tasks on SQLite, plus their expert demonstrations.

Data and split. Tasks are read from ``<data_dir>/dbbench/``: ``standard.jsonl`` (300 tasks) is
the ``train`` split and ``dev.jsonl`` (60 tasks) is held out as ``dev``. A task's id is its
split and its line index, e.g. ``train-0042``. Both files are a third SELECT questions, a third
INSERT and a third UPDATE requests. Sixteen dev tasks use a table whose name also occurs in
the training file, but no dev question appears in training, so dev measures generalisation to
new questions, not to unseen table names.

Episodes. Every task's table is built once into an in-memory SQLite template; every episode
runs on its own fresh copy (SQLite's backup API), so nothing an agent does reaches the
template, the next episode, another task or the disk: ATTACH, VACUUM, virtual tables,
extensions and writing PRAGMAs are refused by an authorizer, a progress handler stops a
statement after ``query_timeout_s``, and the copy's size, strings and fetched rows are capped.

Protocol (AgentBench's text form). Each assistant turn holds one action: ``Action: Operation``
with one SQL statement in a ```sql block (the next observation is the raw result, e.g.
``[('Women +60kg Bronze',)]``, ``Query OK, 1 row affected`` or ``Error: <message>``), or
``Action: Answer`` with ``Final Answer: [...]`` (a JSON or Python list), which ends the episode.
Text before ``Action:`` is allowed. A reply that follows neither form is answered with an
explanation of the format, counts as invalid, and costs a turn; a valid statement that fails
is not invalid, it is reported in ``info["sql_error"]``.

Scoring. SELECT-type tasks (AgentBench's ``other``, ``counting``, ``comparison``, ``ranking``
and ``aggregation-*``) compare the answer list with the label as AgentBench does: values are
stripped, numbers compare as numbers (``"1"`` matches ``"1.0"``), ``None`` and ``"none"`` are
one value, and the order does not matter. INSERT and UPDATE tasks ignore the answer text and
compare the episode's table, as a multiset of rows, with the table the gold SQL leaves on a
separate fresh copy. The gold SQL is read as the MySQL it is (its canonical SQLite form, see
below); run that way it reproduces AgentBench's own MD5 label of the resulting table for 198
of the 200 training write tasks. Reward is 1.0 for success and 0.0 otherwise.

SQLite is not MySQL (where the labels were made): declared column types are mapped to SQLite
affinities, text columns compare case-insensitively (``COLLATE NOCASE``, like MySQL's default
collation), but a text column still compares with a number as text.

Experts. :func:`gold_actions` rewrites a task's MySQL-flavoured gold SQL into one canonical,
fully quoted SQLite statement (sqlglot) and, for SELECT tasks, answers with the rows that
statement returns; :func:`build_db_experts` replays those actions through :class:`SQLEnv` and
keeps the demonstrations that succeed.
"""

from __future__ import annotations

import ast
import json
import logging
import re
import sqlite3
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import gymnasium
import numpy as np
from gymnasium.error import ResetNeeded

from agentloop.config import ConfigError
from agentloop.envs.experts import replay_actions
from agentloop.envs.spaces import FreeText, unreadable_action
from agentloop.envs.tasks import choose_task, index_tasks
from agentloop.types import Task, Trajectory

if TYPE_CHECKING:
    from sqlglot import exp

logger = logging.getLogger(__name__)

ENV_NAME = "db"
SPLIT_FILES = {"train": "standard.jsonl", "dev": "dev.jsonl"}
"""The file of each split inside ``<data_dir>/dbbench``."""
WRITE_KINDS = ("INSERT", "UPDATE")
"""Task kinds scored by the table they leave behind; every other task is a ``SELECT``."""

FORMAT_HELP = (
    'Reply with "Action: Operation" and one SQL statement in a ```sql block, '
    'or with "Action: Answer" and "Final Answer: [...]".'
)
ANSWER_NOT_A_LIST = 'Invalid action: the final answer must be a list, e.g. Final Answer: ["Paris"] or [3].'
_ACTION_RE = re.compile(r"Action:\s*([A-Za-z]*)", re.IGNORECASE)
_SQL_BLOCK_RE = re.compile(r"```(?:[ \t]*(?:sqlite|mysql|sql)\b)?(.*?)```", re.IGNORECASE | re.DOTALL)
_FINAL_RE = re.compile(r"Final Answer:(.*)", re.IGNORECASE | re.DOTALL)
_BARE_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_THOUSANDS_RE = re.compile(r"[-+]?\d{1,3}(?:,\d{3})+(?:\.\d*)?")
_NOTE_SLACK = 300
"""Upper bound on the length of the notes and messages added to a capped observation."""

_READ_PRAGMAS = frozenset(
    {"table_info", "table_xinfo", "table_list", "index_list", "index_info", "index_xinfo", "foreign_key_list"}
)
_DENIED_ACTIONS = frozenset(
    {sqlite3.SQLITE_ATTACH, sqlite3.SQLITE_DETACH, sqlite3.SQLITE_CREATE_VTABLE, sqlite3.SQLITE_DROP_VTABLE}
)
_DENIED_FUNCTIONS = frozenset({"load_extension"})


@dataclass
class SQLEnvConfig:
    """Settings of the Database environment."""

    max_turns: int = 5
    """Assistant turns per episode; an episode without an answer by then is truncated."""
    max_observation_chars: int = 800
    """Longer SQL output is cut to this many characters, with a note saying so."""
    query_timeout_s: float = 2.0
    """Wall-clock limit of one SQL statement (fetching its rows included)."""
    max_result_rows: int = 50
    """At most this many result rows are shown; a note says when there were more."""
    max_action_chars: int = 4000
    """Longer actions are rejected as invalid without being parsed."""
    max_db_pages: int = 4096
    """Size cap of an episode's database, in SQLite pages (4 KiB each)."""
    max_value_bytes: int = 100_000
    """Largest string or blob a statement may build."""

    def validate(self) -> None:
        """Checks every limit is positive.

        Raises:
            ConfigError: Naming the first field out of range.
        """
        for name in ("max_turns", "max_observation_chars", "max_result_rows", "max_action_chars", "max_db_pages"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.max_value_bytes < 1000:
            raise ConfigError(f"max_value_bytes must be at least 1000, got {self.max_value_bytes}")
        if not self.query_timeout_s > 0:
            raise ConfigError(f"query_timeout_s must be positive, got {self.query_timeout_s}")


@dataclass(frozen=True)
class DBTask:
    """One dbbench task: a question or a change request over one table."""

    task: Task
    """The task as the loop and the store see it (``kind`` is SELECT, INSERT or UPDATE)."""
    query_type: str
    """AgentBench's finer type: ``INSERT``, ``UPDATE``, ``counting``, ``aggregation-AVG``, ..."""
    table_name: str
    """Name of the task's only table."""
    columns: tuple[tuple[str, str], ...]
    """The table's columns as (name, declared type), in order."""
    rows: tuple[tuple[Any, ...], ...]
    """The table's rows, as stored in the data file."""
    label: tuple[str, ...]
    """The expected answer values of a SELECT task; empty for INSERT and UPDATE."""
    gold_sql: str
    """The reference SQL (MySQL-flavoured, often imperfect for SELECT tasks)."""

    @property
    def is_write(self) -> bool:
        """Whether the task is scored by the table it leaves behind."""
        return self.task.kind in WRITE_KINDS


def load_db_tasks(data_dir: Path, split: str) -> list[DBTask]:
    """Reads one split of the dbbench tasks.

    Args:
        data_dir: The task data directory (the one holding ``dbbench/``).
        split: ``"train"`` (``standard.jsonl``) or ``"dev"`` (``dev.jsonl``).

    Raises:
        ValueError: For an unknown split or a malformed line.
        FileNotFoundError: When the directory or the split's file is missing.
    """
    if split not in SPLIT_FILES:
        raise ValueError(f"unknown dbbench split {split!r}; known splits: {sorted(SPLIT_FILES)}")
    folder = Path(data_dir) / "dbbench"
    if not folder.is_dir():
        raise FileNotFoundError(f"dbbench data directory not found: {folder} (set the data directory)")
    path = folder / SPLIT_FILES[split]
    if not path.is_file():
        raise FileNotFoundError(f"dbbench split file not found: {path}")
    tasks = []
    with path.open(encoding="utf-8") as lines:
        for index, line in enumerate(lines):
            try:
                tasks.append(_parse_task(json.loads(line), split, index))
            except (KeyError, IndexError, TypeError, ValueError) as e:
                raise ValueError(f"{path}, line {index + 1}: malformed dbbench task ({e!r})") from e
    return tasks


def _parse_task(entry: dict[str, Any], split: str, index: int) -> DBTask:
    query_type = str(entry["type"][0])
    kind = query_type if query_type in WRITE_KINDS else "SELECT"
    table = entry["table"]
    info = table["table_info"]
    write = kind in WRITE_KINDS
    task = Task(
        env=ENV_NAME,
        task_id=f"{split}-{index:04d}",
        split=split,
        kind=kind,
        instruction=str(entry["description"]),
    )
    return DBTask(
        task=task,
        query_type=query_type,
        table_name=str(table["table_name"]),
        columns=tuple((str(c["name"]), str(c["type"])) for c in info["columns"]),
        rows=tuple(tuple(row) for row in info["rows"]),
        label=() if write else tuple(str(v) for v in entry["label"]),
        gold_sql=str(entry["label"][0] if write else entry["sql"]["query"]),
    )


# --- building the databases ---------------------------------------------------------------


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


# --- parsing and scoring actions ----------------------------------------------------------


@dataclass(frozen=True)
class Action:
    """A well-formed action: an SQL operation or a final answer."""

    kind: str
    """``operation`` or ``answer``."""
    body: str
    """The SQL statement, or the text after ``Final Answer:``."""


def parse_action(text: Any, max_chars: int) -> Action | str:
    """Reads an assistant turn; returns the action, or a message saying what is wrong."""
    if (problem := unreadable_action(text, max_chars, FORMAT_HELP)) is not None:
        return problem
    match = _ACTION_RE.search(text)
    if match is None:
        return f'Invalid action: no "Action:" found. {FORMAT_HELP}'
    word = match.group(1).lower()
    if word == "operation":
        block = _SQL_BLOCK_RE.search(text)
        if block is None:
            return "Invalid action: put the SQL of an Operation inside a ```sql ... ``` block."
        sql = block.group(1).strip()
        return Action("operation", sql) if sql else "Invalid action: the ```sql block is empty."
    if word == "answer":
        final = _FINAL_RE.search(text)
        if final is None:
            return 'Invalid action: an Answer needs a line "Final Answer: [...]".'
        return Action("answer", final.group(1).strip())
    return f"Invalid action: unknown action {match.group(1)[:40]!r}. {FORMAT_HELP}"


def parse_answer_list(text: str) -> list[Any] | None:
    """The values of a ``Final Answer`` list (JSON or Python literal), or None if it is not one.

    One-element rows copied from a raw result, e.g. ``[('Paris',)]``, are unpacked.
    """
    text = text.strip().removesuffix("```").strip()
    candidates = [text] + ([text.splitlines()[0]] if "\n" in text else [])
    for candidate in candidates:
        for load in (json.loads, ast.literal_eval):
            try:
                value = load(candidate)
            except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
                continue
            if isinstance(value, (list, tuple)):
                return [v for item in value for v in (item if isinstance(item, (list, tuple)) else (item,))]
    return None


def _answer_key(value: Any) -> tuple[str, Any]:
    text = "none" if value is None else str(value).strip()
    if text.lower() in ("none", "null"):
        return ("none", None)
    try:
        number = float(text.replace(",", "") if _THOUSANDS_RE.fullmatch(text) else text)
    except ValueError:
        return ("text", text)
    if number != number or number in (float("inf"), float("-inf")):
        return ("text", text)
    return ("number", round(number, 6))


def answers_match(answer: Sequence[Any], label: Sequence[str]) -> bool:
    """Whether an answer list matches a label the way AgentBench compares them.

    Values are stripped and numbers compare as numbers (to 6 decimals, thousands separators
    allowed: ``"1,174"`` matches ``"1174.0"``); a one-value label
    needs exactly one value, longer labels are compared as sets (order and repeats ignored).
    """
    if len(label) == 1:
        return len(answer) == 1 and _answer_key(answer[0]) == _answer_key(label[0])
    return {_answer_key(v) for v in answer} == {_answer_key(v) for v in label}


def initial_observation(task: DBTask, config: SQLEnvConfig) -> str:
    """The first observation: the protocol, the question, the table and its columns."""
    columns = ", ".join(f"{quote_identifier(name)} {sqlite_type(kind).split()[0]}" for name, kind in task.columns)
    return (
        f"Use the SQLite table below to answer the question or make the change it asks for. "
        f"You have {config.max_turns} replies. Each reply holds one action: either\n"
        "Action: Operation\n```sql\nSELECT ...;\n```\n"
        "to run one SQL statement and see its result, or, to finish,\n"
        'Action: Answer\nFinal Answer: ["value", ...]\n'
        "Write table and column names in double quotes. After an INSERT or UPDATE, finish with Final Answer: [].\n"
        f"Question: {task.task.instruction}\n"
        f"Table: {quote_identifier(task.table_name)}\n"
        f"Columns: {columns}"
    )


# --- the environment ----------------------------------------------------------------------


@dataclass(frozen=True)
class _Outcome:
    """What one step produced, before the turn limit is applied."""

    observation: str
    reward: float = 0.0
    terminated: bool = False
    invalid: bool = False
    sql_error: bool = False


def _operate(db: sqlite3.Connection, sql: str, config: SQLEnvConfig) -> _Outcome:
    """Runs an Operation's statement; several statements make the action invalid."""
    result = run_sql(db, sql, config)
    if result.several:
        return _Outcome(f"Invalid action: write exactly one SQL statement per Operation. {FORMAT_HELP}", invalid=True)
    return _Outcome(result.text, sql_error=result.error)


class SQLEnv(gymnasium.Env[str, str]):
    """Gymnasium environment over dbbench tasks, one fresh SQLite copy per episode.

    ``reset(options={"task_id": ...})`` picks a task (otherwise one is drawn with the env's
    seeded generator); ``info["task"]`` is its :class:`~agentloop.types.Task`. ``step`` returns
    ``info`` with ``invalid`` (the action broke the protocol), ``sql_error`` (a valid
    statement failed) and ``success``. Calling ``step`` before ``reset`` or after the episode
    ended raises :class:`gymnasium.error.ResetNeeded`, as Gymnasium's order enforcing does.
    """

    metadata = {"render_modes": []}

    def __init__(self, tasks: Sequence[DBTask], config: SQLEnvConfig) -> None:
        config.validate()
        self.config = config
        self.tasks = index_tasks(tasks, "SQLEnv")
        self._templates: dict[str, sqlite3.Connection] = {}
        self._expected: dict[str, Counter[tuple[Any, ...]] | None] = {}
        first = max(len(initial_observation(t, config)) for t in tasks)
        self.observation_space = FreeText(max(first, config.max_observation_chars + _NOTE_SLACK))
        self.action_space = FreeText(config.max_action_chars)
        self._db: sqlite3.Connection | None = None
        self._task: DBTask | None = None
        self._turns = 0
        self._done = True

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[str, dict[str, Any]]:
        """Starts an episode on a fresh copy of the chosen task's table."""
        super().reset(seed=seed)
        task = self._choose(options or {})
        self._close_db()
        self._db = open_copy(self._template(task), self.config)
        self._task, self._turns, self._done = task, 0, False
        return initial_observation(task, self.config), {"task": task.task}

    def step(self, action: str) -> tuple[str, float, bool, bool, dict[str, Any]]:
        """Runs one action; see the module docstring for the protocol and the scoring."""
        if self._db is None or self._task is None or self._done:
            raise ResetNeeded("SQLEnv.step() needs an episode in progress: call reset() first")
        self._turns += 1
        parsed = parse_action(action, self.config.max_action_chars)
        if isinstance(parsed, str):
            outcome = _Outcome(parsed, invalid=True)
        elif parsed.kind == "answer":
            outcome = self._score(self._task, self._db, parsed.body)
        else:
            outcome = _operate(self._db, parsed.body, self.config)
        truncated = not outcome.terminated and self._turns >= self.config.max_turns
        self._done = outcome.terminated or truncated
        info = {"invalid": outcome.invalid, "sql_error": outcome.sql_error, "success": outcome.reward > 0}
        return outcome.observation, outcome.reward, outcome.terminated, truncated, info

    def close(self) -> None:
        """Frees the episode's database and every template."""
        self._close_db()
        for conn in self._templates.values():
            conn.close()
        self._templates.clear()

    def _score(self, task: DBTask, db: sqlite3.Connection, body: str) -> _Outcome:
        """Ends the episode on a final answer, unless a SELECT answer is not a list."""
        if task.is_write:
            expected = self._expected_table(task)
            success = expected is not None and table_rows(db, task.table_name, self.config) == expected
        else:
            values = parse_answer_list(body)
            if values is None:
                return _Outcome(ANSWER_NOT_A_LIST, invalid=True)
            success = answers_match(values, task.label)
        return _Outcome("Answer received; the episode is over.", reward=float(success), terminated=True)

    def _choose(self, options: dict[str, Any]) -> DBTask:
        return choose_task(self.tasks, options, self.np_random)

    def _template(self, task: DBTask) -> sqlite3.Connection:
        template = self._templates.get(task.task.task_id)
        if template is None:
            template = self._templates[task.task.task_id] = build_database(task)
        return template

    def _expected_table(self, task: DBTask) -> Counter[tuple[Any, ...]] | None:
        """The table the gold SQL leaves on a separate fresh copy (computed once per task).

        The gold SQL is MySQL, so it is read as MySQL (its canonical SQLite form, e.g. with
        ``'\\n'`` escapes decoded); only SQL that cannot be parsed runs as written.
        """
        if task.task.task_id not in self._expected:
            copy = open_copy(self._template(task), self.config)
            result = run_sql(copy, canonical_sql(task) or task.gold_sql, self.config)
            if result.error:
                logger.warning("gold SQL of %s fails on SQLite (%s)", task.task.task_id, result.text)
            rows = None if result.error else table_rows(copy, task.table_name, self.config)
            copy.close()
            self._expected[task.task.task_id] = rows
        return self._expected[task.task.task_id]

    def _close_db(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None


# --- expert demonstrations ----------------------------------------------------------------


@dataclass
class DBExpertConfig:
    """Settings of the Database expert demonstrations."""

    recovery_fraction: float = 0.25
    """Share of the tasks whose SQL needs quoted names that get an error-then-retry demo."""

    def validate(self) -> None:
        """Checks the fraction is within [0, 1].

        Raises:
            ConfigError: If it is not.
        """
        if not 0.0 <= self.recovery_fraction <= 1.0:
            raise ConfigError(f"recovery_fraction must be within [0, 1], got {self.recovery_fraction}")


_GLUED_KEYWORD_RE = re.compile(r"(?<=[\w)\]`])(?=(?:FROM|WHERE|GROUP BY|ORDER BY|HAVING|LIMIT)\b)")
"""A clause keyword stuck to the word before it: the trace of a line break lost from the gold SQL."""
_QUOTED_RE = re.compile(r"""'(?:[^'\\]|\\.|'')*'|`[^`]*`|"(?:[^"\\]|\\.|"")*"|\[[^\]]*\]""", re.DOTALL)


def _name_key(name: str) -> str:
    """A name compared loosely: case, underscores and runs of spaces ignored."""
    return re.sub(r"[\s_]+", " ", name).strip().lower()


def _repair_gold_sql(sql: str, task: DBTask) -> str:
    """Repairs the gold SQL's names and lost line breaks, in MySQL syntax.

    Clause keywords glued to the previous word (``LeagueFROM``) get their space back.

    Double-quoted text that names a table or column becomes an identifier (elsewhere it stays
    a MySQL string), a bracketed ``[name]`` becomes a backtick-quoted one, and unquoted
    multi-word or symbol-bearing names found outside quotes are put in backticks; string
    literals are never touched.
    """
    names = [task.table_name] + [name for name, _ in task.columns]
    known = {_name_key(n) for n in names}
    needy = sorted((n for n in names if not _BARE_NAME_RE.fullmatch(n) and re.search(r"[A-Za-z]", n)), key=len)
    patterns = [r"\s+".join(map(re.escape, n.split())) for n in reversed(needy) if n.strip()]
    bare = re.compile(rf"(?<![\w`])(?:{'|'.join(patterns)})(?![\w`])", re.IGNORECASE) if patterns else None

    def fix_bare(text: str) -> str:
        text = _GLUED_KEYWORD_RE.sub(" ", text)
        return bare.sub(lambda m: f"`{m.group(0)}`", text) if bare else text

    out, last = [], 0
    for match in _QUOTED_RE.finditer(sql):
        out.append(fix_bare(sql[last : match.start()]))
        token = match.group(0)
        inner = token[1:-1]
        if token[0] == "[" or (token[0] == '"' and _name_key(inner) in known):
            token = "`" + inner.replace("`", "``") + "`"
        out.append(token)
        last = match.end()
    out.append(fix_bare(sql[last:]))
    return "".join(out)


def _point_names_at_task(tree: exp.Expression, task: DBTask) -> None:
    """Renames table references to the task's table and loose column names to real ones."""
    from sqlglot import exp

    ctes = {cte.alias_or_name.lower() for cte in tree.find_all(exp.CTE)}
    aliases = {a.name.lower() for a in tree.find_all(exp.TableAlias)}
    columns = {_name_key(name): name for name, _ in task.columns}
    for table in tree.find_all(exp.Table):
        if table.name.lower() not in ctes:
            table.set("this", exp.to_identifier(task.table_name, quoted=True))
            table.set("db", None)
    for column in tree.find_all(exp.Column):
        real = columns.get(_name_key(column.name))
        if real is not None:
            column.set("this", exp.to_identifier(real, quoted=True))
        if column.table and column.table.lower() not in aliases | ctes:
            column.set("table", exp.to_identifier(task.table_name, quoted=True))


def _canonical_tree(task: DBTask) -> exp.Expression | None:
    """The gold SQL parsed as MySQL with its names repaired, or None if it cannot be read."""
    import sqlglot
    from sqlglot.errors import SqlglotError

    try:
        trees = [t for t in sqlglot.parse(_repair_gold_sql(task.gold_sql, task), read="mysql") if t is not None]
        if len(trees) != 1:
            return None
        _point_names_at_task(trees[0], task)
        trees[0].sql(dialect="sqlite")
    except (SqlglotError, ValueError, RecursionError) as e:
        logger.debug("gold SQL of %s is unreadable: %s", task.task.task_id, e)
        return None
    return trees[0]


def canonical_sql(task: DBTask) -> str | None:
    """The task's gold SQL as one SQLite statement with every name double-quoted, or None."""
    tree = _canonical_tree(task)
    return None if tree is None else tree.sql(dialect="sqlite", identify=True)


def mistaken_sql(task: DBTask) -> str | None:
    """The natural mistake: the canonical statement with its names unquoted.

    None when the canonical statement needs no quoting (the mistake would not be one).
    """
    from sqlglot import exp

    tree = _canonical_tree(task)
    if tree is None:
        return None
    identifiers = list(tree.find_all(exp.Identifier))
    if all(_BARE_NAME_RE.fullmatch(i.name) for i in identifiers):
        return None
    for identifier in identifiers:
        identifier.set("quoted", False)
    return tree.sql(dialect="sqlite", identify=False)


def _operation(sql: str) -> str:
    return f"Action: Operation\n```sql\n{sql};\n```"


def _answer(values: Sequence[Any]) -> str:
    return f"Action: Answer\nFinal Answer: {json.dumps(list(values), ensure_ascii=False, default=str)}"


def _answer_values(task: DBTask, sql: str, config: SQLEnvConfig) -> list[Any] | None:
    """The flattened result of ``sql`` on a fresh copy of the task's table (None on error)."""
    template = build_database(task)
    copy = open_copy(template, config)
    try:
        result = run_sql(copy, sql, config)
    finally:
        copy.close()
        template.close()
    if result.error or result.rows is None:
        return None
    return [value for row in result.rows for value in row]


def gold_actions(task: DBTask, config: SQLEnvConfig | None = None) -> list[str] | None:
    """The expert's turns for a task: its canonical gold SQL, then the final answer.

    A SELECT task answers with the values its canonical SQL returns on a fresh copy; an
    INSERT or UPDATE task answers ``[]``. None when the gold SQL cannot be read or fails.
    """
    config = config or SQLEnvConfig()
    sql = canonical_sql(task)
    if sql is None:
        return None
    if task.is_write:
        return [_operation(sql), _answer([])]
    values = _answer_values(task, sql, config)
    return None if values is None else [_operation(sql), _answer(values)]


def recovery_actions(task: DBTask, config: SQLEnvConfig | None = None) -> list[str] | None:
    """Expert turns that first make the unquoted-names mistake, then retry correctly.

    None unless the task has gold actions and the mistaken statement really fails on a
    fresh copy of the table (a mistake that happens to run would teach nothing).
    """
    config = config or SQLEnvConfig()
    actions = gold_actions(task, config)
    mistake = mistaken_sql(task)
    if actions is None or mistake is None:
        return None
    template = build_database(task)
    copy = open_copy(template, config)
    try:
        failed = run_sql(copy, mistake, config).error
    finally:
        copy.close()
        template.close()
    return [_operation(mistake), *actions] if failed else None


def build_db_experts(
    tasks: Sequence[DBTask], config: SQLEnvConfig, recovery_fraction: float, seed: int
) -> tuple[list[Trajectory], dict[str, Any]]:
    """Replays every task's gold actions through a real :class:`SQLEnv`; keeps the successes.

    Of the successful demonstrations whose SQL needs quoted names and whose unquoted form
    fails, a ``recovery_fraction`` (drawn with ``seed``) is replaced by a recovery demo: the
    unquoted statement, its real error, then the correct statement and the answer.

    Returns:
        The kept demonstrations (reward 1.0 each), and a report: ``by_type`` and ``by_kind``
        map AgentBench's type / the task kind to ``{"attempted": n, "succeeded": k}``;
        ``unreadable`` counts tasks whose gold SQL gave no actions; ``recovery`` counts the
        ``eligible``, ``chosen`` and ``kept`` recovery demos.
    """
    DBExpertConfig(recovery_fraction=recovery_fraction).validate()
    env = SQLEnv(tasks, config)
    try:
        demos, unreadable = _replay_gold(env, tasks, config)
        recovery = _add_recovery(env, demos, config, recovery_fraction, seed)
    finally:
        env.close()
    report = {
        "by_type": _tally(tasks, demos, lambda t: t.query_type),
        "by_kind": _tally(tasks, demos, lambda t: t.task.kind),
        "unreadable": unreadable,
        "recovery": recovery,
    }
    for name, row in sorted(report["by_type"].items()):
        logger.info("db experts %s: %d/%d succeeded", name, row["succeeded"], row["attempted"])
    return list(demos.values()), report


def _replay_gold(env: SQLEnv, tasks: Sequence[DBTask], config: SQLEnvConfig) -> tuple[dict[str, Trajectory], int]:
    """The successful gold replays by task id, and how many tasks had no gold actions."""
    demos, unreadable = {}, 0
    for task in tasks:
        actions = gold_actions(task, config)
        if actions is None:
            unreadable += 1
            continue
        if len(actions) > config.max_turns:
            continue  # cannot fit the turn budget: not a demonstration of this env
        demo = replay_actions(env, task.task.task_id, actions)
        if demo.success:
            demos[task.task.task_id] = demo
    return demos, unreadable


def _add_recovery(
    env: SQLEnv, demos: dict[str, Trajectory], config: SQLEnvConfig, fraction: float, seed: int
) -> dict[str, int]:
    """Swaps a fraction of the eligible demos for error-then-retry ones, in place."""
    candidates = {task_id: recovery_actions(env.tasks[task_id], config) for task_id in sorted(demos)}
    eligible = sorted(
        task_id
        for task_id, actions in candidates.items()
        if actions is not None and len(actions) <= config.max_turns  # must fit the turn budget
    )
    count = round(fraction * len(eligible))
    chosen = np.random.default_rng(seed).choice(eligible, size=count, replace=False) if count else []
    kept = 0
    for task_id in chosen:
        demo = replay_actions(env, str(task_id), candidates[str(task_id)] or [])
        if demo.success:
            demos[str(task_id)] = demo
            kept += 1
    return {"eligible": len(eligible), "chosen": int(count), "kept": kept}


def _tally(
    tasks: Sequence[DBTask], demos: dict[str, Trajectory], key: Callable[[DBTask], str]
) -> dict[str, dict[str, int]]:
    table: dict[str, dict[str, int]] = {}
    for task in tasks:
        row = table.setdefault(key(task), {"attempted": 0, "succeeded": 0})
        row["attempted"] += 1
        row["succeeded"] += int(task.task.task_id in demos)
    return table
