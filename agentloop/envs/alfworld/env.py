"""The ALFWorld environment itself: its protocol and episodes."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import gymnasium
from gymnasium.error import ResetNeeded

from agentloop.envs.alfworld.config import ALFWorldEnvConfig
from agentloop.envs.alfworld.engine import ENGINE_LOCK, POOL
from agentloop.envs.alfworld.tasks import ALFWorldTask
from agentloop.envs.spaces import FreeText, unreadable_action
from agentloop.envs.tasks import choose_task, index_tasks

FORMAT_HELP = (
    "Reply with one command per turn, optionally after your reasoning, ending with a line like "
    "'Action: go to countertop 1'. Commands: go to X, take X from Y, put X in/on Y, open X, close X, "
    "toggle X, clean X with Y, heat X with Y, cool X with Y, use X, examine X, look, inventory."
)
NOTHING = "Nothing happens."
"""The engine's answer to a command it does not admit."""
_WELCOME = re.compile(r"^\s*-= Welcome to TextWorld, ALFRED! =-\s*")


def parse_action(text: Any, max_chars: int) -> str:
    """The command in a reply (lower-cased, single-spaced), or ``""`` when there is none."""
    if not isinstance(text, str) or len(text) > max_chars:
        return ""
    _, marker, after = text.rpartition("Action:")
    body = after if marker else text
    line = next((part for part in body.splitlines() if part.strip()), "")
    return " ".join(line.strip().strip("`'\"").rstrip(".").lower().split())


class ALFWorldEnv(gymnasium.Env[str, str]):
    """Gymnasium environment over ALFWorld games, each played in the real engine.

    ``reset(options={"task_id": ...})`` picks a game (otherwise one is drawn with the env's
    seeded generator); ``info["task"]`` is its :class:`~agentloop.types.Task`. ``step``
    returns ``info`` with ``invalid``, ``success`` and ``admissible_commands``. Stepping
    before ``reset`` or after the episode ended raises :class:`gymnasium.error.ResetNeeded`.
    """

    metadata = {"render_modes": []}

    def __init__(self, tasks: Sequence[ALFWorldTask], config: ALFWorldEnvConfig) -> None:
        config.validate()
        self.config = config
        self.tasks = index_tasks(tasks, "ALFWorldEnv")
        self.observation_space = FreeText(1 << 16)
        self.action_space = FreeText(config.max_action_chars)
        self._engine: Any = None
        self._task: ALFWorldTask | None = None
        self._admissible: list[str] = []
        self._steps = 0
        self._done = True
        POOL.users += 1
        self._closed = False

    def prepare(self, task_ids: Sequence[str]) -> None:
        """Tells the process's engine pool which games come next, in order, so it loads them ahead.

        Up to ``lookahead`` of them are loaded in the background; resetting to another task
        still works (it loads then). Unknown ids raise ``KeyError``.
        """
        unknown = [t for t in task_ids if t not in self.tasks]
        if unknown:
            raise KeyError(f"unknown task ids: {unknown[:5]}")
        for t in task_ids:
            self.tasks[t].ensure_file()
        POOL.plan([self.tasks[t].game_file for t in task_ids], self.config.lookahead)

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[str, dict[str, Any]]:
        """Starts an episode on the chosen game; returns its first observation."""
        super().reset(seed=seed)
        task = self._choose(options or {})
        self._release()
        task.ensure_file()
        self._engine, state = POOL.take(task.game_file, self.config.load_timeout_s)
        self._admissible = list(state["admissible_commands"])
        self._task, self._steps, self._done = task, 0, False
        observation = f"{FORMAT_HELP}\n\n{_WELCOME.sub('', state.feedback).strip()}"
        return self._show(observation), {"task": task.task, "admissible_commands": list(self._admissible)}

    def step(self, action: str) -> tuple[str, float, bool, bool, dict[str, Any]]:
        """Plays one reply; see the module docstring for the protocol."""
        if self._task is None or self._done or self._engine is None:
            raise ResetNeeded("ALFWorldEnv.step() needs an episode in progress: call reset() first")
        self._steps += 1
        problem = unreadable_action(action, self.config.max_action_chars, FORMAT_HELP)
        command = "" if problem else parse_action(action, self.config.max_action_chars)
        won = False
        if problem is None and not command:
            problem = f"Invalid action: no command found in the reply. {FORMAT_HELP}"
        if problem is not None:
            observation, invalid = problem, True
        elif command not in self._admissible:  # the engine would answer the same, at a grounding's cost
            observation, invalid = NOTHING, True
        else:
            with ENGINE_LOCK:
                state, _, _ = self._engine.step(command)
            self._admissible = list(state["admissible_commands"])
            observation, invalid, won = state.feedback.strip(), False, bool(state["won"])
        truncated = not won and self._steps >= self.config.max_steps
        self._done = won or truncated
        if self._done:
            self._release()
        info = {"invalid": invalid, "success": won, "admissible_commands": list(self._admissible)}
        return self._show(observation), float(won), won, truncated, info

    def close(self) -> None:
        """Ends the episode; the last environment of the process to close stops the pool's loading ahead."""
        self._release()
        self._task, self._done = None, True
        if not self._closed:
            self._closed = True
            POOL.users -= 1
            if POOL.users == 0:
                POOL.close()

    def _release(self) -> None:
        if self._engine is not None:
            POOL.give_back(self._engine)
            self._engine = None

    def _show(self, observation: str) -> str:
        if not self.config.show_valid_actions:
            return observation
        return f"{observation}\nValid actions: {', '.join(self._admissible)}"

    def _choose(self, options: dict[str, Any]) -> ALFWorldTask:
        return choose_task(self.tasks, options, self.np_random)
