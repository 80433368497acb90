"""Expert demonstrations of the Database environment: the canonical gold SQL replayed in the env."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from agentloop.config import ConfigError
from agentloop.envs.experts import replay_actions, tally
from agentloop.types import Trajectory

if TYPE_CHECKING:
    pass
from agentloop.envs.db.config import SQLEnvConfig
from agentloop.envs.db.engine import leased_worker, run_on_template
from agentloop.envs.db.env import SQLEnv
from agentloop.envs.db.gold import canonical_sql, mistaken_sql
from agentloop.envs.db.tasks import DBTask

logger = logging.getLogger(__name__)


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


def _operation(sql: str) -> str:
    return f"Action: Operation\n```sql\n{sql};\n```"


def _answer(values: Sequence[Any]) -> str:
    return f"Action: Answer\nFinal Answer: {json.dumps(list(values), ensure_ascii=False, default=str)}"


def _answer_values(task: DBTask, sql: str, config: SQLEnvConfig) -> list[Any] | None:
    """The flattened result of ``sql`` on a fresh copy of the task's table (None on error)."""
    result = run_on_template(task, sql, config)
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
    failed = run_on_template(task, mistake, config).error
    return [_operation(mistake), *actions] if failed else None


def build_db_experts(
    tasks: Sequence[DBTask], config: SQLEnvConfig, experts: DBExpertConfig, seed: int
) -> tuple[list[Trajectory], dict[str, Any]]:
    """Replays every task's gold actions through a real :class:`SQLEnv`; keeps the successes.

    Of the successful demonstrations whose SQL needs quoted names and whose unquoted form
    fails, ``experts.recovery_fraction`` (drawn with ``seed``) is replaced by a recovery demo: the
    unquoted statement, its real error, then the correct statement and the answer.

    Returns:
        The kept demonstrations (reward 1.0 each), and a report: ``by_type`` and ``by_kind``
        map AgentBench's type / the task kind to ``{"attempted": n, "succeeded": k}``;
        ``unreadable`` counts tasks whose gold SQL gave no actions; ``recovery`` counts the
        ``eligible``, ``chosen`` and ``kept`` recovery demos; ``unchanged_by_gold`` lists the
        write tasks whose gold SQL leaves the table as it was, so that answering at once,
        without any SQL, already succeeds (a policy can learn that shortcut there).
    """
    experts.validate()
    with leased_worker(config):  # one worker for the whole build, shared with the env's
        env = SQLEnv(tasks, config)
        try:
            demos, unreadable = _replay_gold(env, tasks, config)
            recovery = _add_recovery(env, demos, config, experts.recovery_fraction, seed)
            unchanged = [
                t.task.task_id
                for t in tasks
                if t.is_write and replay_actions(env, t.task.task_id, [_answer([])]).success
            ]
        finally:
            env.close()
    report = {
        "by_type": tally(tasks, demos, lambda t: t.query_type),
        "by_kind": tally(tasks, demos, lambda t: t.task.kind),
        "unreadable": unreadable,
        "recovery": recovery,
        "unchanged_by_gold": unchanged,
    }
    for name, row in sorted(report["by_type"].items()):
        logger.info("db experts %s: %d/%d succeeded", name, row["succeeded"], row["attempted"])
    if unchanged:
        logger.warning("db write tasks solved by answering without any SQL (gold changes nothing): %s", unchanged)
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
