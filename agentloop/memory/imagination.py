"""STE's imagination: new tasks near the training ones, steered away from what was explored.

For a seeded sample of each environment's training tasks, the explorer is asked for a new
task near it (:attr:`agentloop.envs.registry.EnvDefinition.imagination`), shown the tasks of
long-term memory most similar to it as ones to avoid (STE shows every past query). The
environment builds a task it can score from each proposal, or says why it cannot; the kept
ones are then explored like training tasks. A task is verified when a trial solves it (an
independent attempt agrees with the proposal's own answer) or a judge accepts it
(:mod:`agentloop.memory.judge`).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from agentloop import envs
from agentloop.config import ConfigError
from agentloop.endpoint import EndpointConfig
from agentloop.types import Experience, Proposal, Task, Trajectory

logger = logging.getLogger(__name__)


@dataclass
class ImagineConfig:
    """How many tasks are imagined each round, and who imagines them."""

    tasks_per_env: int = 0
    """Proposals asked for per environment that takes imagined tasks, each round; 0 = none."""
    avoid: int = 5
    """Tasks of long-term memory most similar to the base task, shown as ones to avoid."""
    max_new_tokens: int = 256
    """Longest proposal, in generated tokens (a question and its SQL need more than an action)."""
    explorer: EndpointConfig = field(default_factory=EndpointConfig)
    """Who imagines: empty ``url`` = the policy; else a model behind an OpenAI-compatible endpoint."""
    judged: bool = True
    """A judge reads each valid proposal of an env that writes evidence and says whether its own
    solution does what it asks; one it accepts is verified at once, and its solution, replayed
    through the env, becomes a demonstration (SFT data and ETO's expert pairs)."""
    judge: EndpointConfig = field(default_factory=EndpointConfig)
    """Who judges: empty ``url`` = the policy; else a model behind an OpenAI-compatible endpoint."""

    def validate(self) -> None:
        if self.tasks_per_env < 0 or self.avoid < 0 or self.max_new_tokens < 1:
            raise ConfigError("tasks_per_env and avoid must be >= 0, max_new_tokens >= 1")


def choose_bases(
    train: Mapping[str, Sequence[Any]], n: int, rng: random.Random, held_out: Sequence[Any] = ()
) -> list[Any]:
    """Up to ``n`` training tasks of each env that takes imagined tasks, a seeded sample, envs in order;
    never one whose scene (:attr:`Imagination.scene`) a task of ``held_out`` shares."""
    bases = []
    for name in sorted(train):
        imagination = envs.definition(name).imagination
        if imagination is None or not train[name]:
            continue
        pool = list(train[name])
        if imagination.scene is not None:
            taken = {imagination.scene(t) for t in held_out if t.task.env == name}
            pool = [t for t in pool if imagination.scene(t) not in taken]
            if len(pool) < len(train[name]):
                logger.info("imagination: %d %s training tasks share a held-out task's scene, not used as bases",
                            len(train[name]) - len(pool), name)  # fmt: skip
        bases += rng.sample(pool, min(n, len(pool)))
    return bases


def requests(bases: Sequence[Any], recall: Callable[[Sequence[Task]], list[list[Experience]]] | None) -> list[str]:
    """What the explorer is asked for each base task, with the remembered tasks most like it to avoid."""
    recalled = recall([b.task for b in bases]) if recall is not None and bases else [[] for _ in bases]
    asked = []
    for base, found in zip(bases, recalled, strict=True):
        prompt = envs.definition(base.task.env).imagination.prompt(base)
        avoid = list(dict.fromkeys(e.task.instruction for e in found))
        if avoid:
            prompt += "\n" + "\n".join(["Tasks already tried (write a different one):", *(f"- {t}" for t in avoid)])
        asked.append(prompt)
    return asked


def build(
    bases: Sequence[Any],
    texts: Sequence[str],
    configs: Mapping[str, Any],
    stage: str,
    within: Callable[[Task], bool] | None = None,
) -> tuple[list[Proposal], list[Any]]:
    """The proposals as records, and the env tasks of those each environment could score (and, with
    ``within``, that pass it: a continual phase keeps only tasks of the families it trains).

    Task ids are ``<stage with / as ->-<n>`` (``imagine-1-0``, ...), so they are unique in a run.
    """
    proposals, tasks = [], []
    prefix = stage.replace("/", "-")
    for i, (base, text) in enumerate(zip(bases, texts, strict=True)):
        env = base.task.env
        task_id = f"{prefix}-{i}"
        made = envs.definition(env).imagination.build(base, text, configs[env], task_id)
        if not isinstance(made, str) and within is not None and not within(made.task):
            made = f"a {made.task.kind} task, outside the task families this round explores"
        valid = not isinstance(made, str)
        proposals.append(Proposal(env, base.task.task_id, task_id, text, stage, valid, "" if valid else made))
        if valid:
            tasks.append(made)
    return proposals, tasks


def rebuild(proposals: Sequence[Proposal], train: Mapping[str, Sequence[Any]], configs: Mapping[str, Any]) -> list[Any]:
    """The env tasks of stored valid proposals, built again from their text (on ``--resume``).

    A proposal that no longer builds (its SQL timed out on a busy machine, say) is left out with
    a warning: its stage then plays without it, and the trials it stored are not used.
    """
    by_id = {(name, t.task.task_id): t for name, tasks in train.items() for t in tasks}
    tasks = []
    for p in proposals:
        if p.valid and (p.env, p.base_task_id) in by_id:
            base = by_id[p.env, p.base_task_id]
            made = envs.definition(p.env).imagination.build(base, p.text, configs[p.env], p.task_id)
            if isinstance(made, str):
                logger.warning("imagined task %s was valid when made and is not now (%s): left out", p.task_id, made)
                continue
            tasks.append(made)
    return tasks


def imagination_metrics(proposals: Sequence[Proposal], explored: Sequence[Trajectory], prefix: str) -> dict[str, float]:
    """Per env: tasks proposed, valid (the env could score them), accepted by the judge, solved by
    a trial, and verified (accepted or solved)."""
    solved = {(t.task.env, t.task.task_id) for t in explored if t.success and t.task.split == "imagined"}
    metrics: dict[str, float] = {}
    for env in sorted({p.env for p in proposals}):
        mine = [p for p in proposals if p.env == env]
        metrics[f"{prefix}/env/{env}/proposed"] = float(len(mine))
        metrics[f"{prefix}/env/{env}/valid"] = float(sum(p.valid for p in mine))
        metrics[f"{prefix}/env/{env}/judged"] = float(sum(p.judged is True for p in mine))
        metrics[f"{prefix}/env/{env}/solved"] = float(sum((env, p.task_id) in solved for p in mine))
        metrics[f"{prefix}/env/{env}/verified"] = float(
            sum(p.judged is True or (env, p.task_id) in solved for p in mine)
        )
    return metrics
