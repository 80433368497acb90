"""Small records for tests: an episode of a task with the fields a test cares about, the rest plain."""

from __future__ import annotations

from typing import Any

from agentloop.types import Message, Task, Trajectory


def episode(
    task: Task, *, success: bool = True, source: str = "explore", action: str = "done", **fields: Any
) -> Trajectory:
    """A one-turn episode of ``task`` (prompt "go", then ``action``); ``fields`` set any other field."""
    values: dict[str, Any] = {
        "messages": (Message("user", "go"), Message("assistant", action)),
        "tokenizer": "t",
        "reward": float(success),
        "terminated": True,
        "truncated": False,
        "num_turns": 1,
        "invalid_actions": 0,
        "policy_version": 1,
        "iteration": 1,
    }
    return Trajectory(task=task, success=success, source=source, **{**values, **fields})
