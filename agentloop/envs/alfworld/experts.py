"""ALFWorld's experts: each game's walkthrough replayed in the engine."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from agentloop.envs.alfworld.config import ALFWorldEnvConfig
from agentloop.envs.alfworld.env import ALFWorldEnv
from agentloop.envs.alfworld.tasks import ALFWorldTask
from agentloop.envs.experts import ExpertReport, replay_actions
from agentloop.types import Trajectory


def build_alfworld_experts(
    tasks: Sequence[ALFWorldTask], config: ALFWorldEnvConfig
) -> tuple[list[Trajectory], dict[str, Any]]:
    """Replays each game's walkthrough in the engine; keeps the games it solves.

    Actions are written as the policy writes them (``Action: <command>``). Returns the kept
    demonstrations and a report: ``by_kind`` maps each task type to ``{"attempted": n,
    "succeeded": k}``; ``failures`` maps each failure class (``no_walkthrough``,
    ``too_long``: more steps than ``max_steps``; ``not_won``: the walkthrough ran but the goal
    does not hold; ``engine_error``) to its count and up to three example task ids.
    """
    env = ALFWorldEnv(tasks, config)
    env.prepare([t.task.task_id for t in tasks])
    demos: list[Trajectory] = []
    report = ExpertReport()
    try:
        for task in tasks:
            failure = "no_walkthrough" if not task.walkthrough else None
            failure = failure or ("too_long" if len(task.walkthrough) > config.max_steps else None)
            if failure is None:
                try:
                    demo = replay_actions(env, task.task.task_id, [f"Action: {a}" for a in task.walkthrough])
                except (RuntimeError, TimeoutError, ValueError):
                    failure = "engine_error"
                else:
                    failure = None if demo.success else "not_won"
                    if demo.success:
                        demos.append(demo)
            report.record(task.task, failure)
    finally:
        env.close()
    return demos, report.as_dict()
