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
Loading a game grounds its problem, which takes from a fraction of a second to seconds for a
large scene; steps are fast. Each :class:`ALFWorldEnv` runs its engine in a child process of
its own (so a planner crash or hang cannot take the caller down, and a stuck engine can be
killed), and :meth:`ALFWorldEnv.prepare` lets a caller that knows which games come next have
them loaded ahead: the rollout hands each environment the tasks it is about to play, and
``engines`` loader processes ground them while the policy generates.

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
import multiprocessing
import re
from collections.abc import Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import gymnasium
from gymnasium.error import ResetNeeded

from agentloop.config import ConfigError
from agentloop.envs.experts import replay_actions
from agentloop.envs.spaces import FreeText, unreadable_action
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
    engines: int = 2
    """Loader processes that ground upcoming games ahead of their episodes (see ``prepare``)."""
    lookahead: int = 4
    """Games an environment keeps grounded ahead of its current one, at most."""
    load_timeout_s: float = 120.0
    """Longest a game may take to load; a game that takes longer fails its reset."""

    def validate(self) -> None:
        """Raises ``ConfigError`` naming the first field out of range."""
        for name in ("max_steps", "max_action_chars", "engines"):
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


# --- the engine, in a child process ----------------------------------------------------------


def _engine_main(conn: Connection) -> None:
    """A child process: loads games on request and plays the loaded one.

    Requests: ``("load", game_file)`` -> ``(intro, admissible)``; ``("step", command)`` ->
    ``(feedback, won, admissible)``; ``("close",)`` ends the process. Errors come back as
    ``("error", message)``.
    """
    import textworld
    from alfworld.agents.environment.alfred_tw_env import AlfredDemangler
    from textworld.envs.pddl import PddlEnv

    infos = textworld.EnvInfos(won=True, admissible_commands=True)
    env = None
    while True:
        try:
            request = conn.recv()
        except EOFError:
            return
        try:
            if request[0] == "close":
                return
            if request[0] == "load":
                env = AlfredDemangler(shuffle=False)(PddlEnv(infos))
                env.load(request[1])
                state = env.reset()
                conn.send(("ok", state.feedback, list(state["admissible_commands"])))
            else:
                assert env is not None, "step before load"
                state, _, _ = env.step(request[1])
                conn.send(("ok", state.feedback, bool(state["won"]), list(state["admissible_commands"])))
        except Exception as e:  # the caller turns it into an exception of its own
            conn.send(("error", f"{type(e).__name__}: {e}"))


class _Engine:
    """One engine process holding one loaded game."""

    def __init__(self, timeout_s: float) -> None:
        context = multiprocessing.get_context("spawn")
        self._conn, child = context.Pipe()
        self._process = context.Process(target=_engine_main, args=(child,), daemon=True)
        self._process.start()
        child.close()
        self.timeout_s = timeout_s
        self.game: Path | None = None
        self._pending: Path | None = None

    def start_load(self, game_file: Path) -> None:
        """Asks the engine to load a game without waiting for it."""
        self._conn.send(("load", str(game_file)))
        self._pending, self.game = game_file, None

    def finish_load(self) -> tuple[str, list[str]]:
        """Waits for the game asked for last; returns its intro and admissible commands."""
        reply = self._receive()
        self.game, self._pending = self._pending, None
        return reply[0], reply[1]

    def step(self, command: str) -> tuple[str, bool, list[str]]:
        self._conn.send(("step", command))
        return tuple(self._receive())  # type: ignore[return-value]

    @property
    def loading(self) -> bool:
        return self._pending is not None

    def _receive(self) -> list[Any]:
        if not self._conn.poll(self.timeout_s):
            self.close()
            raise TimeoutError(f"the ALFWorld engine did not answer within {self.timeout_s} s")
        status, *reply = self._conn.recv()
        if status == "error":
            raise RuntimeError(f"ALFWorld engine: {reply[0]}")
        return reply

    def close(self) -> None:
        if self._process.is_alive():
            try:
                self._conn.send(("close",))
            except (BrokenPipeError, OSError):
                pass
            self._process.join(timeout=2)
            if self._process.is_alive():
                self._process.kill()
                self._process.join()
        self._conn.close()


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
        if not tasks:
            raise ValueError("ALFWorldEnv needs at least one task")
        self.config = config
        self.tasks = {t.task.task_id: t for t in tasks}
        if len(self.tasks) != len(tasks):
            raise ValueError("ALFWorldEnv got two tasks with the same task_id")
        self._ids = list(self.tasks)
        self.observation_space = FreeText(1 << 16)
        self.action_space = FreeText(config.max_action_chars)
        self._engines: list[_Engine] = []
        self._engine: _Engine | None = None
        self._upcoming: list[str] = []
        self._task: ALFWorldTask | None = None
        self._admissible: list[str] = []
        self._steps = 0
        self._done = True

    def prepare(self, task_ids: Sequence[str]) -> None:
        """Tells the env which games it will be reset to next, in order, so it can load them ahead.

        Up to ``lookahead`` of them are loaded in the background; resetting to another task
        still works (it loads then). Unknown ids raise ``KeyError``.
        """
        unknown = [t for t in task_ids if t not in self.tasks]
        if unknown:
            raise KeyError(f"unknown task ids: {unknown[:5]}")
        self._upcoming = list(task_ids)
        self._fill()

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[str, dict[str, Any]]:
        """Starts an episode on the chosen game; returns its first observation."""
        super().reset(seed=seed)
        task = self._choose(options or {})
        if self._upcoming and self._upcoming[0] == task.task.task_id:
            self._upcoming.pop(0)
        engine = self._take(task.game_file)
        try:
            intro, self._admissible = engine.finish_load()
        except Exception:
            self._discard(engine)
            raise
        self._fill()
        self._task, self._steps, self._done = task, 0, False
        observation = f"{FORMAT_HELP}\n\n{_WELCOME.sub('', intro).strip()}"
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
        elif command not in self._admissible:
            observation, invalid = NOTHING, True
        else:
            feedback, won, self._admissible = self._engine.step(command)
            observation, invalid = feedback.strip(), False
        truncated = not won and self._steps >= self.config.max_steps
        self._done = won or truncated
        info = {"invalid": invalid, "success": won, "admissible_commands": list(self._admissible)}
        return self._show(observation), float(won), won, truncated, info

    def close(self) -> None:
        """Stops every engine process of this env."""
        for engine in self._engines:
            engine.close()
        self._engines, self._engine, self._upcoming = [], None, []
        self._task, self._done = None, True

    def _show(self, observation: str) -> str:
        if not self.config.show_valid_actions:
            return observation
        return f"{observation}\nValid actions: {', '.join(self._admissible)}"

    def _take(self, game_file: Path) -> _Engine:
        """The engine that has (or is loading) ``game_file``, asking a free engine to load it if none has."""
        if self._engine is not None and self._engine.game is not None:
            self._engine.game = None  # the previous episode's game is spent
        engine = next((e for e in self._engines if e._pending == game_file), None)
        if engine is None:
            engine = self._free() or self._spawn()
            engine.start_load(game_file)
        self._engine = engine
        return engine

    def _fill(self) -> None:
        """Starts loading the next upcoming games on idle engines, up to ``lookahead`` ahead."""
        loading = {e._pending for e in self._engines if e.loading}
        for task_id in self._upcoming[: self.config.lookahead]:
            game = self.tasks[task_id].game_file
            if game in loading:
                continue
            engine = self._free() or (self._spawn() if len(self._engines) <= self.config.lookahead else None)
            if engine is None:
                return
            engine.start_load(game)
            loading.add(game)

    def _free(self) -> _Engine | None:
        return next((e for e in self._engines if e is not self._engine and not e.loading), None)

    def _spawn(self) -> _Engine:
        engine = _Engine(self.config.load_timeout_s)
        self._engines.append(engine)
        return engine

    def _discard(self, engine: _Engine) -> None:
        engine.close()
        self._engines.remove(engine)
        self._engine = None

    def _choose(self, options: dict[str, Any]) -> ALFWorldTask:
        unknown = set(options) - {"task_id"}
        if unknown:
            raise ValueError(f"unknown reset option(s) {sorted(unknown)}; known: ['task_id']")
        if "task_id" not in options:
            return self.tasks[self._ids[int(self.np_random.integers(len(self._ids)))]]
        task_id = options["task_id"]
        if task_id not in self.tasks:
            raise KeyError(f"task_id {task_id!r} is not among this env's {len(self.tasks)} tasks")
        return self.tasks[task_id]


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
    by_kind: dict[str, dict[str, int]] = {}
    failures: dict[str, dict[str, Any]] = {}
    try:
        for task in tasks:
            row = by_kind.setdefault(task.task.kind, {"attempted": 0, "succeeded": 0})
            row["attempted"] += 1
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
                        row["succeeded"] += 1
            if failure is not None:
                entry = failures.setdefault(failure, {"count": 0, "examples": []})
                entry["count"] += 1
                entry["examples"] += [task.task.task_id] if len(entry["examples"]) < 3 else []
    finally:
        env.close()
    return demos, {"by_kind": by_kind, "failures": failures}
