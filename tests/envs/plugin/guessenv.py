"""A tiny test-only environment, registered from outside agentloop (``guessenv-0.1.dist-info``).

Everything an environment needs lives here; its only registration is the line of its package
metadata's ``entry_points.txt``. The task: say the secret word of the task (``Answer: <word>``);
``max_turns`` tries. A reply ``Tamper`` counts as an attempt to change what the check depends
on, so tests can follow ``tamper_attempts`` through the loop.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gymnasium

from agentloop.config import ConfigError
from agentloop.envs.experts import replay_actions
from agentloop.envs.registry import EnvDefinition
from agentloop.envs.spaces import FreeText
from agentloop.envs.tasks import choose_task, index_tasks
from agentloop.types import Task, Trajectory

WORDS = {"train": ("apple", "river", "stone", "cloud", "maple", "tiger"), "test": ("ocean", "piano", "lemon")}


@dataclass
class GuessEnvConfig:
    """Settings of the guessing environment."""

    max_turns: int = 2
    """Replies per episode."""

    def validate(self) -> None:
        if self.max_turns < 1:
            raise ConfigError(f"max_turns must be at least 1, got {self.max_turns}")


@dataclass(frozen=True)
class GuessTask:
    """One secret word."""

    task: Task
    word: str


def load_guess_tasks(data_dir: Path, split: str) -> list[GuessTask]:
    """The words of a split (the task data directory is not needed)."""
    return [
        GuessTask(Task("guess", f"{split}-{i}", split, "word", f"Say the word {word}."), word)
        for i, word in enumerate(WORDS[split])
    ]


class GuessEnv(gymnasium.Env[str, str]):
    """Say the task's word: ``Answer: <word>``."""

    def __init__(self, tasks: Sequence[GuessTask], config: GuessEnvConfig) -> None:
        self.tasks, self.config = index_tasks(tasks, "GuessEnv"), config
        self.observation_space, self.action_space = FreeText(200), FreeText(200)
        self._task: GuessTask | None = None
        self._turns = 0

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[str, dict[str, Any]]:
        super().reset(seed=seed)
        self._task, self._turns = choose_task(self.tasks, options or {}, self.np_random), 0
        return f"{self._task.task.instruction} Reply with Answer: <word>.", {"task": self._task.task}

    def step(self, action: str) -> tuple[str, float, bool, bool, dict[str, Any]]:
        assert self._task is not None
        self._turns += 1
        tamper = int(action.strip() == "Tamper")
        answered = action.strip().startswith("Answer:")
        success = answered and action.split(":", 1)[1].strip() == self._task.word
        truncated = not answered and self._turns >= self.config.max_turns
        observation = "Done." if answered else "Reply with Answer: <word>."
        info = {"invalid": not answered and not tamper, "success": success, "tamper_attempts": tamper}
        return observation, float(success), answered, truncated, info


def build_guess_experts(tasks: Sequence[GuessTask], config: GuessEnvConfig) -> tuple[list[Trajectory], dict[str, Any]]:
    """Says each word."""
    env = GuessEnv(tasks, config)
    demos = [replay_actions(env, t.task.task_id, [f"Answer: {t.word}"]) for t in tasks]
    return [d for d in demos if d.success], {"solved": sum(d.success for d in demos)}


ENV = EnvDefinition(
    name="guess",
    splits=("train", "test"),
    train_split="train",
    eval_split="test",
    load_tasks=load_guess_tasks,
    env=GuessEnv,
    config=GuessEnvConfig,
    build_experts=build_guess_experts,
    context_tokens=256,
)
