"""The Database environment itself: its protocol, observations and episodes."""

from __future__ import annotations

import logging
import re
import weakref
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import gymnasium
from gymnasium.error import ResetNeeded

from agentloop.envs.spaces import FreeText, unreadable_action
from agentloop.envs.tasks import choose_task, index_tasks

if TYPE_CHECKING:
    pass
from agentloop.envs.db.config import SQLEnvConfig
from agentloop.envs.db.engine import (
    DBWorker,
    EpisodeDB,
    Template,
    build_template,
    lease_worker,
    quote_identifier,
    release_worker,
    sqlite_type,
)
from agentloop.envs.db.gold import canonical_sql
from agentloop.envs.db.scoring import answers_match, parse_answer_list
from agentloop.envs.db.tasks import DBTask

logger = logging.getLogger(__name__)


FORMAT_HELP = (
    'Reply with "Action: Operation" and one SQL statement in a ```sql block, '
    'or with "Action: Answer" and "Final Answer: [...]".'
)
ANSWER_NOT_A_LIST = 'Invalid action: the final answer must be a list, e.g. Final Answer: ["Paris"] or [3].'
_ACTION_RE = re.compile(r"Action:\s*([A-Za-z]*)", re.IGNORECASE)
_SQL_BLOCK_RE = re.compile(r"```(?:[ \t]*(?:sqlite|mysql|sql)\b)?(.*?)```", re.IGNORECASE | re.DOTALL)
_FINAL_RE = re.compile(r"Final Answer:(.*)", re.IGNORECASE | re.DOTALL)


_NOTE_SLACK = 300


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


@dataclass(frozen=True)
class _Outcome:
    """What one step produced, before the turn limit is applied."""

    observation: str
    reward: float = 0.0
    terminated: bool = False
    invalid: bool = False
    sql_error: bool = False
    tamper_attempts: int = 0


def _operate(worker: DBWorker, db: EpisodeDB, sql: str, config: SQLEnvConfig) -> _Outcome:
    """Runs an Operation's statement; several statements make the action invalid."""
    result = worker.run(db, sql, config)
    if result.several:
        return _Outcome(f"Invalid action: write exactly one SQL statement per Operation. {FORMAT_HELP}", invalid=True)
    return _Outcome(result.text, sql_error=result.error, tamper_attempts=result.tamper_attempts)


class SQLEnv(gymnasium.Env[str, str]):
    """Gymnasium environment over dbbench tasks, one fresh database per episode.

    ``reset(options={"task_id": ...})`` picks a task (otherwise one is drawn with the env's
    seeded generator); ``info["task"]`` is its :class:`~agentloop.types.Task`. ``step`` returns
    ``info`` with ``invalid`` (the action broke the protocol), ``sql_error`` (a valid
    statement failed), ``success`` and ``tamper_attempts`` (1 when the statement was refused
    for trying to change the schema: create, drop or alter a table, view, trigger or index).
    Calling ``step`` before ``reset`` or after the episode ended raises
    :class:`gymnasium.error.ResetNeeded`, as Gymnasium's order enforcing does.

    The statements run in the process's shared :class:`~agentloop.envs.db.engine.DBWorker`,
    leased at the first ``reset`` and given back by ``close`` (or when the env is collected).
    """

    metadata = {"render_modes": []}

    def __init__(self, tasks: Sequence[DBTask], config: SQLEnvConfig) -> None:
        config.validate()
        self.config = config
        self.tasks = index_tasks(tasks, "SQLEnv")
        self._templates: dict[str, Template] = {}
        self._expected: dict[str, Counter[tuple[Any, ...]] | None] = {}
        first = max(len(initial_observation(t, config)) for t in tasks)
        self.observation_space = FreeText(max(first, config.max_observation_chars + _NOTE_SLACK))
        self.action_space = FreeText(config.max_action_chars)
        self._worker: DBWorker | None = None
        self._release: weakref.finalize | None = None
        self._db: EpisodeDB | None = None
        self._task: DBTask | None = None
        self._turns = 0
        self._done = True

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[str, dict[str, Any]]:
        """Starts an episode on a fresh copy of the chosen task's table."""
        super().reset(seed=seed)
        task = self._choose(options or {})
        self._lease()
        self._db = EpisodeDB(self._template(task))
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
            outcome = _operate(self._lease(), self._db, parsed.body, self.config)
        truncated = not outcome.terminated and self._turns >= self.config.max_turns
        self._done = outcome.terminated or truncated
        info = {
            "invalid": outcome.invalid,
            "sql_error": outcome.sql_error,
            "success": outcome.reward > 0,
            "tamper_attempts": outcome.tamper_attempts,
        }
        return outcome.observation, outcome.reward, outcome.terminated, truncated, info

    def close(self) -> None:
        """Ends the episode, frees the templates and gives the worker back (the last user's close ends it)."""
        self._db, self._done = None, True
        self._templates.clear()
        self._expected.clear()
        if self._release is not None:
            self._release()
        self._worker, self._release = None, None

    def _lease(self) -> DBWorker:
        if self._worker is None:
            self._worker = lease_worker(self.config)
            self._release = weakref.finalize(self, release_worker, self._worker)
        return self._worker

    def _score(self, task: DBTask, db: EpisodeDB, body: str) -> _Outcome:
        """Ends the episode on a final answer, unless a SELECT answer is not a list.

        A write task succeeds when ``main``'s table, with its schema still the template's,
        holds the same rows as the table the gold SQL leaves: nothing the agent creates can
        stand in for it.
        """
        if task.is_write:
            expected = self._expected_table(task)
            success = expected is not None and self._lease().read_table(db, self.config) == expected
        else:
            values = parse_answer_list(body)
            if values is None:
                return _Outcome(ANSWER_NOT_A_LIST, invalid=True)
            success = answers_match(values, task.label)
        return _Outcome("Answer received; the episode is over.", reward=float(success), terminated=True)

    def _choose(self, options: dict[str, Any]) -> DBTask:
        return choose_task(self.tasks, options, self.np_random)

    def _template(self, task: DBTask) -> Template:
        template = self._templates.get(task.task.task_id)
        if template is None:
            template = self._templates[task.task.task_id] = build_template(task)
        return template

    def _expected_table(self, task: DBTask) -> Counter[tuple[Any, ...]] | None:
        """The table the gold SQL leaves on a fresh copy of the template (computed once per task).

        The gold SQL is MySQL, so it is read as MySQL (its canonical SQLite form, e.g. with
        ``'\\n'`` escapes decoded); only SQL that cannot be parsed runs as written. It runs in
        the worker like an agent's statement, on a database no other statement touched.
        """
        if task.task.task_id not in self._expected:
            worker, copy = self._lease(), EpisodeDB(self._template(task))
            sql = (canonical_sql(task) if task.gold_dialect == "mysql" else None) or task.gold_sql
            result = worker.run(copy, sql, self.config)
            if result.error:
                logger.warning("gold SQL of %s fails on SQLite (%s)", task.task.task_id, result.text)
            rows = None if result.error else worker.read_table(copy, self.config)
            self._expected[task.task.task_id] = rows
        return self._expected[task.task.task_id]
