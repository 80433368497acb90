"""The contract between agentloop's environments and whoever runs their episodes.

Beyond Gymnasium's signatures, every environment promises:

- ``reset(options={"task_id": ...})`` starts that task and returns ``info["task"]``, its
  :class:`~agentloop.types.Task`;
- every ``step`` returns ``info["invalid"]`` (bool: the action broke the protocol) and
  ``info["success"]`` (bool: the task is solved, meaningful when the episode ends), and may
  return ``info["tamper_attempts"]`` (int >= 0: how many things the action did that try to
  change what the success check depends on; absent means none).

The rollout and the expert replay read these through :func:`step_outcome` and
:func:`reset_task`, so an environment that breaks the contract fails loudly, naming itself
and the key, instead of being read with silent defaults.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from agentloop.types import Task


class EnvContractError(TypeError):
    """An environment returned an ``info`` that breaks agentloop's environment contract."""


@dataclass(frozen=True)
class StepOutcome:
    """What the contract guarantees of one step's ``info``."""

    invalid: bool
    """The action broke the environment's protocol."""
    success: bool
    """The environment judges the task solved."""
    tamper_attempts: int
    """Attempts in this step to change what the success check depends on."""


def reset_task(info: Any, env: str) -> Task:
    """The task of a reset's ``info``.

    Raises:
        EnvContractError: When ``info`` is not a mapping with a ``Task`` under ``"task"``.
    """
    task = _mapping(info, env, "reset").get("task")
    if not isinstance(task, Task):
        raise EnvContractError(f"{env}: reset() must return info['task'] as a Task, got {type(task).__name__}")
    return task


def step_outcome(info: Any, env: str) -> StepOutcome:
    """The contract's part of a step's ``info``.

    Raises:
        EnvContractError: When a required key is missing or any key has the wrong type.
    """
    info = _mapping(info, env, "step")
    for key in ("invalid", "success"):
        if key not in info:
            raise EnvContractError(f"{env}: step() must return info[{key!r}] (bool); it is missing")
        if not isinstance(info[key], bool):
            raise EnvContractError(f"{env}: step() info[{key!r}] must be a bool, got {info[key]!r}")
    attempts = info.get("tamper_attempts", 0)
    if isinstance(attempts, bool) or not isinstance(attempts, int) or attempts < 0:
        raise EnvContractError(f"{env}: step() info['tamper_attempts'] must be an int >= 0, got {attempts!r}")
    return StepOutcome(invalid=info["invalid"], success=info["success"], tamper_attempts=attempts)


def _mapping(info: Any, env: str, call: str) -> dict[str, Any]:
    if not isinstance(info, dict):
        raise EnvContractError(f"{env}: {call}() must return a dict as info, got {type(info).__name__}")
    return info
