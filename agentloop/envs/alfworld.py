"""The ALFWorld environment: ALFRED household tasks as text games in the real TextWorld/PDDL engine.

Data. Games are read from ``<data_dir>/alfworld/json_2.1.1/<split>/<task>/<trial>/game.tw-pddl``:
a JSON file with the PDDL domain and problem, the text grammar (which holds the task's
sentence, "Your task is to: ...") and an expert ``walkthrough``. Splits are the data's
folders: ``train`` (883 games, a subset of ALFWorld's 3,553), ``valid_seen`` (140) and
``valid_unseen`` (134, the unseen test split of ALFWorld and ETO), plus ``valid_train`` (200).
A task's id is ``<task folder>/<trial folder>`` and its ``kind`` the task type, the folder
name's prefix (``pick_and_place_simple``, ``look_at_obj_in_light``,
``pick_clean_then_place_in_recep``, ``pick_heat_then_place_in_recep``,
``pick_cool_then_place_in_recep``, ``pick_two_obj_and_place``). Games marked unsolvable in
their file are skipped when loading.

Engine. The games run in TextWorld's PDDL backend (``textworld.envs.pddl.PddlEnv``, the
fast-downward planner grounding each problem), with ALFWorld's ``AlfredDemangler`` giving
objects their readable names ("desk 1"), exactly as ``alfworld``'s own text environment does.
Loading a game grounds its problem twice (load, then reset): 0.4 to 2.5 s on this project's
CPU; steps take tens of milliseconds. Each engine holds its own copy of the planner's shared
library, which textworld never unloads, so engines are pooled per process and reused from
game to game (a new engine per game would leak a library copy each time). textworld's parsers
are module-level and not thread-safe, so one lock serialises every engine call of a process.
The pool loads games ahead on a background thread, which overlaps with the policy's generation
(it does not take the lock): :meth:`ALFWorldEnv.prepare` hands it the games that come
next (the rollout does this with each stage's tasks) and up to ``lookahead`` of them are
loaded while the policy generates; resetting to a game nobody prepared loads it on the spot.
When the last environment of the process closes, loading ahead stops and the engines go idle;
they are never unloaded (unloading the library and loading it again crashes the process).

Protocol (ALFWorld's, as ETO prompts it). Each reply holds one command of ALFWorld's action set
(``go to desk 1``, ``take mug 1 from desk 1``, ``put mug 1 in/on coffeemachine 1``, ``open``,
``close``, ``toggle``, ``clean``, ``heat``, ``cool``, ``use``, ``examine``, ``look``,
``inventory``); text before a final ``Action:`` is allowed, so ReAct replies ("Thought: ...
Action: go to desk 1") work, and only the first line after it counts. The observation is the
engine's feedback; a command the engine does not admit in the current state gets its own
answer, "Nothing happens.", and is marked ``info["invalid"]``. An empty, unreadable or
over-long reply gets an observation saying what was wrong, also marked invalid. Every reply
costs a step; the episode ends when the goal holds (reward 1.0, success) or is truncated
after ``max_steps`` replies (ETO: 40). ``info["admissible_commands"]`` always lists the
commands the engine accepts next; with ``show_valid_actions`` the observation lists them too.

Experts. :func:`build_alfworld_experts` replays each game's walkthrough in the engine and keeps
the games it solves.
"""

from __future__ import annotations

import json
import re
import threading
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gymnasium
from gymnasium.error import ResetNeeded

from agentloop.config import ConfigError
from agentloop.envs.experts import ExpertReport, replay_actions
from agentloop.envs.spaces import FreeText, unreadable_action
from agentloop.envs.tasks import choose_task, index_tasks
from agentloop.types import Task, Trajectory

SPLITS = ("train", "valid_seen", "valid_unseen", "valid_train")
"""The data's split folders."""
TASK_TYPES = (
    "pick_and_place_simple",
    "look_at_obj_in_light",
    "pick_clean_then_place_in_recep",
    "pick_heat_then_place_in_recep",
    "pick_cool_then_place_in_recep",
    "pick_two_obj_and_place",
)
"""ALFWorld's six task types (a game folder's name starts with one)."""
FORMAT_HELP = (
    "Reply with one command per turn, optionally after your reasoning, ending with a line like "
    "'Action: go to countertop 1'. Commands: go to X, take X from Y, put X in/on Y, open X, close X, "
    "toggle X, clean X with Y, heat X with Y, cool X with Y, use X, examine X, look, inventory."
)
NOTHING = "Nothing happens."
"""The engine's answer to a command it does not admit."""
_WELCOME = re.compile(r"^\s*-= Welcome to TextWorld, ALFRED! =-\s*")
_TASK_SENTENCE = re.compile(r"Your task is to: ([^\"\n]*)")


@dataclass
class ALFWorldEnvConfig:
    """Settings of the ALFWorld environment."""

    max_steps: int = 40
    """Replies per episode (ETO: 40; ALFWorld's own default is 50)."""
    show_valid_actions: bool = False
    """Append the admissible commands to every observation (for prompts that want them)."""
    max_action_chars: int = 1000
    """Longer replies are rejected as invalid without being parsed."""
    lookahead: int = 8
    """Prepared games the process's engine pool keeps loaded ahead of their episodes, at most."""
    load_timeout_s: float = 300.0
    """Longest a reset waits for a game loading in the background."""

    def validate(self) -> None:
        """Raises ``ConfigError`` naming the first field out of range."""
        for name in ("max_steps", "max_action_chars"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.lookahead < 0:
            raise ConfigError(f"lookahead must be >= 0, got {self.lookahead}")
        if not self.load_timeout_s > 0:
            raise ConfigError(f"load_timeout_s must be positive, got {self.load_timeout_s}")


# --- tasks --------------------------------------------------------------------------------


@dataclass(frozen=True)
class ALFWorldTask:
    """One game: its record, its game file and its expert walkthrough."""

    task: Task
    game_file: Path
    walkthrough: tuple[str, ...]


def load_alfworld_tasks(data_dir: Path, split: str) -> list[ALFWorldTask]:
    """The solvable games of one split, in sorted folder order.

    Raises:
        ValueError: For an unknown split, or a game folder of no known task type.
        FileNotFoundError: When the split's folder is missing from ``data_dir``.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown alfworld split {split!r}; known splits: {list(SPLITS)}")
    root = Path(data_dir) / "alfworld" / "json_2.1.1" / split
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is missing: see docs/data.md to fetch ALFWorld's json_2.1.1 games")
    tasks = []
    for game_file in sorted(root.glob("*/*/game.tw-pddl")):
        data = json.loads(game_file.read_text())
        if not data.get("solvable", True):
            continue
        folder, trial = game_file.parent.parent.name, game_file.parent.name
        kind = next((t for t in TASK_TYPES if folder.startswith(t + "-")), None)
        if kind is None:
            raise ValueError(f"{game_file}: the folder {folder!r} names no ALFWorld task type")
        sentence = _TASK_SENTENCE.search(data["grammar"])
        instruction = sentence.group(1).strip() if sentence else folder
        task = Task("alfworld", f"{folder}/{trial}", split, kind, instruction)
        tasks.append(ALFWorldTask(task, game_file, tuple(data.get("walkthrough") or ())))
    if not tasks:
        raise FileNotFoundError(f"no game.tw-pddl under {root}")
    return tasks


def parse_action(text: Any, max_chars: int) -> str:
    """The command in a reply (lower-cased, single-spaced), or ``""`` when there is none."""
    if not isinstance(text, str) or len(text) > max_chars:
        return ""
    _, marker, after = text.rpartition("Action:")
    body = after if marker else text
    line = next((part for part in body.splitlines() if part.strip()), "")
    return " ".join(line.strip().strip("`'\"").rstrip(".").lower().split())


# --- the engines ----------------------------------------------------------------------------


class _EnginePool:
    """The process's engines: reused across games, loading prepared games ahead on one thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._idle: list[Any] = []
        self._ready: dict[Path, Future] = {}  # game -> future (engine, first state), loaded ahead
        self._upcoming: deque[Path] = deque()
        self._loader: ThreadPoolExecutor | None = None
        self._all: list[Any] = []
        self.users = 0
        self.lookahead = 0

    def plan(self, games: Sequence[Path], lookahead: int) -> None:
        """The games the next resets will ask for, in order; loads up to ``lookahead`` of them ahead."""
        with self._lock:
            self._upcoming, self.lookahead = deque(games), lookahead
            keep = set(games)
            stale = {game: future for game, future in self._ready.items() if game not in keep}
            for game in stale:
                del self._ready[game]
        for future in stale.values():  # loaded for a plan that changed: back to idle
            self._give_back(future.result()[0])
        self._top_up()

    def take(self, game: Path, timeout_s: float) -> tuple[Any, Any]:
        """An engine with ``game`` loaded and reset, and its first state."""
        with self._lock:
            future = self._ready.pop(game, None)
            if future is None and game in self._upcoming:
                self._upcoming.remove(game)
        loaded = future.result(timeout=timeout_s) if future is not None else self._load(game)
        self._top_up()
        return loaded

    def give_back(self, engine: Any) -> None:
        """Returns an engine whose game is over."""
        self._give_back(engine)
        self._top_up()

    def close(self) -> None:
        """Stops loading ahead and returns every engine to the idle list, where the next plan finds them.

        Engines are never unloaded: unloading the planner's library (``dlclose``) and loading a
        copy again crashes the process, so the pool keeps the engines it made (at most the
        episodes that ran at once plus ``lookahead``) for the process's lifetime.
        """
        with self._lock:
            loader, self._loader, self._upcoming = self._loader, None, deque()
        if loader is not None:
            loader.shutdown(wait=True)
        with self._lock:
            ready, self._ready = self._ready, {}
        for future in ready.values():
            try:
                self._give_back(future.result()[0])
            except Exception:  # a game that failed to load already gave its engine back
                pass

    def _give_back(self, engine: Any) -> None:
        with self._lock:
            self._idle.append(engine)

    def _top_up(self) -> None:
        with self._lock:
            while self._upcoming and len(self._ready) < self.lookahead:
                game = self._upcoming.popleft()
                if game not in self._ready:
                    if self._loader is None:
                        self._loader = ThreadPoolExecutor(1, thread_name_prefix="alfworld-loader")
                    self._ready[game] = self._loader.submit(self._load, game)

    def _load(self, game: Path) -> tuple[Any, Any]:
        with self._lock:
            engine = self._idle.pop() if self._idle else None
        if engine is None:
            with _ENGINE_LOCK:
                engine = _new_engine()
            with self._lock:
                self._all.append(engine)
        try:
            with _ENGINE_LOCK:
                engine.load(str(game))
            with _ENGINE_LOCK:  # released in between, so a step waiting on it goes first
                return engine, engine.reset()
        except Exception:
            self._give_back(engine)
            raise


def _new_engine() -> Any:
    """A PDDL engine with ALFWorld's object names, as ``alfworld``'s text environment builds it."""
    import textworld
    from alfworld.agents.environment.alfred_tw_env import AlfredDemangler
    from textworld.envs.pddl import PddlEnv

    return AlfredDemangler(shuffle=False)(PddlEnv(textworld.EnvInfos(won=True, admissible_commands=True)))


_POOL = _EnginePool()
_ENGINE_LOCK = threading.Lock()
"""Serialises every engine call of the process: textworld parses games and text with module-level
parsers that are not thread-safe. Loading ahead still overlaps with generation, which does not take it."""


# --- the environment -----------------------------------------------------------------------


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
        _POOL.users += 1
        self._closed = False

    def prepare(self, task_ids: Sequence[str]) -> None:
        """Tells the process's engine pool which games come next, in order, so it loads them ahead.

        Up to ``lookahead`` of them are loaded in the background; resetting to another task
        still works (it loads then). Unknown ids raise ``KeyError``.
        """
        unknown = [t for t in task_ids if t not in self.tasks]
        if unknown:
            raise KeyError(f"unknown task ids: {unknown[:5]}")
        _POOL.plan([self.tasks[t].game_file for t in task_ids], self.config.lookahead)

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[str, dict[str, Any]]:
        """Starts an episode on the chosen game; returns its first observation."""
        super().reset(seed=seed)
        task = self._choose(options or {})
        self._release()
        self._engine, state = _POOL.take(task.game_file, self.config.load_timeout_s)
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
            with _ENGINE_LOCK:
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
            _POOL.users -= 1
            if _POOL.users == 0:
                _POOL.close()

    def _release(self) -> None:
        if self._engine is not None:
            _POOL.give_back(self._engine)
            self._engine = None

    def _show(self, observation: str) -> str:
        if not self.config.show_valid_actions:
            return observation
        return f"{observation}\nValid actions: {', '.join(self._admissible)}"

    def _choose(self, options: dict[str, Any]) -> ALFWorldTask:
        return choose_task(self.tasks, options, self.np_random)


# --- experts -------------------------------------------------------------------------------


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
