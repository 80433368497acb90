"""What every environment does with its tasks: index them by id, pick one on reset, and compare their words."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

import numpy as np

T = TypeVar("T")


def index_tasks(tasks: Sequence[T], env: str) -> dict[str, T]:
    """An environment's tasks by ``task.task_id``.

    Raises:
        ValueError: With no task, or two tasks of one id; ``env`` names the environment.
    """
    if not tasks:
        raise ValueError(f"{env} needs at least one task")
    by_id = {t.task.task_id: t for t in tasks}  # type: ignore[attr-defined]
    if len(by_id) != len(tasks):
        raise ValueError(f"{env} got two tasks with the same task_id")
    return by_id


def choose_task(tasks: Mapping[str, T], options: Mapping[str, Any], rng: np.random.Generator) -> T:
    """The task ``reset(options=...)`` asks for: ``options["task_id"]``, else one drawn with the env's ``rng``.

    Raises:
        ValueError: On a reset option other than ``task_id``.
        KeyError: For a task id the environment does not have.
    """
    unknown = set(options) - {"task_id"}
    if unknown:
        raise ValueError(f"unknown reset option(s) {sorted(unknown)}; known: ['task_id']")
    if "task_id" not in options:
        ids = list(tasks)
        return tasks[ids[int(rng.integers(len(ids)))]]
    task_id = options["task_id"]
    if task_id not in tasks:
        raise KeyError(f"task_id {task_id!r} is not among this env's {len(tasks)} tasks")
    return tasks[task_id]


def words(text: str) -> list[str]:
    """The words of ``text``, lowercased, without punctuation or quotes: an imagined task that copies its
    example in other quotes or case is still a copy."""
    return re.findall(r"\w+", text.lower())
