"""Expert demonstrations replayed through a real environment.

An expert here is a fixed list of actions (written from a task's gold solution). Replaying
them through the environment, rather than writing the conversation by hand, makes every
observation in a demonstration real and its reward measured: a demonstration whose actions
do not actually solve the task shows up with reward 0 and can be dropped.

This module knows nothing about any particular environment; it relies only on agentloop's
environment contract (:mod:`agentloop.envs.contract`).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from typing import Any

import gymnasium

from agentloop.envs.contract import reset_task, step_outcome
from agentloop.types import Message, Task, Trajectory

EXPERT_POLICY_VERSION = -1
"""The ``policy_version`` of every expert trajectory."""


def replay_actions(env: gymnasium.Env, task_id: str, actions: Sequence[str]) -> Trajectory:
    """Plays ``actions`` in order on ``task_id`` and records the episode.

    The conversation starts with the first observation and alternates assistant actions with
    the observations they produced; the observation that ends the episode is left out (no
    policy ever replies to it). Messages carry no token ids: the learner tokenizes them.

    Args:
        env: An agentloop environment (see the module docstring).
        task_id: The task to reset to.
        actions: The expert's assistant turns, exactly as a policy would write them.

    Raises:
        ValueError: If actions remain after the episode ended, or there are none.
    """
    if not actions:
        raise ValueError(f"no actions to replay for task {task_id!r}")
    name = type(env.unwrapped).__name__
    observation, info = env.reset(options={"task_id": task_id})
    task = reset_task(info, name)
    messages = [Message(role="user", content=observation)]
    reward, success, terminated, truncated, invalid, tampered = 0.0, False, False, False, 0, 0
    for turn, action in enumerate(actions):
        if terminated or truncated:
            raise ValueError(f"task {task_id!r}: the episode ended after {turn} of {len(actions)} actions")
        messages.append(Message(role="assistant", content=action))
        observation, reward, terminated, truncated, step_info = env.step(action)
        step = step_outcome(step_info, task.env)
        invalid += int(step.invalid)
        tampered += step.tamper_attempts
        success = step.success
        if not (terminated or truncated):
            messages.append(Message(role="user", content=observation))
    return Trajectory(
        task=task,
        messages=tuple(messages),
        tokenizer="",
        reward=float(reward),
        success=success,
        terminated=terminated,
        truncated=truncated,
        num_turns=len(actions),
        invalid_actions=invalid,
        source="expert",
        policy_version=EXPERT_POLICY_VERSION,
        iteration=0,
        tamper_attempts=tampered,
    )


def tally(tasks: Sequence[Any], solved: Collection[str], key: Callable[[Any], str]) -> dict[str, dict[str, int]]:
    """Per group of tasks (``key(task)``), ``{"attempted": n, "succeeded": k}``; ``solved`` holds task ids."""
    table: dict[str, dict[str, int]] = {}
    for task in tasks:
        row = table.setdefault(key(task), {"attempted": 0, "succeeded": 0})
        row["attempted"] += 1
        row["succeeded"] += int(task.task.task_id in solved)
    return table


class ExpertReport:
    """What building an env's experts found: per task kind, attempts and successes; per failure
    class, its count and up to three example task ids."""

    def __init__(self) -> None:
        self.by_kind: dict[str, dict[str, int]] = {}
        self.failures: dict[str, dict[str, Any]] = {}

    def record(self, task: Task, failure: str | None) -> None:
        """Counts one task: solved (``failure`` None) or failed for the named reason."""
        row = self.by_kind.setdefault(task.kind, {"attempted": 0, "succeeded": 0})
        row["attempted"] += 1
        if failure is None:
            row["succeeded"] += 1
            return
        entry = self.failures.setdefault(failure, {"count": 0, "examples": []})
        entry["count"] += 1
        if len(entry["examples"]) < 3:
            entry["examples"].append(task.task_id)

    def as_dict(self) -> dict[str, Any]:
        """``{"by_kind": ..., "failures": ...}``, as the env's ``build_*_experts`` returns it."""
        return {"by_kind": self.by_kind, "failures": self.failures}
