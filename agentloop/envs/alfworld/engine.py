"""The process's pool of TextWorld/PDDL engines: reused across games, loading prepared games ahead."""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any


class EnginePool:
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
            with ENGINE_LOCK:
                engine = new_engine()
            with self._lock:
                self._all.append(engine)
        try:
            with ENGINE_LOCK:
                engine.load(str(game))
            with ENGINE_LOCK:  # released in between, so a step waiting on it goes first
                return engine, engine.reset()
        except Exception:
            self._give_back(engine)
            raise


def new_engine() -> Any:
    """A PDDL engine with ALFWorld's object names, as ``alfworld``'s text environment builds it."""
    import textworld
    from alfworld.agents.environment.alfred_tw_env import AlfredDemangler
    from textworld.envs.pddl import PddlEnv

    return AlfredDemangler(shuffle=False)(PddlEnv(textworld.EnvInfos(won=True, admissible_commands=True)))


def planning_engine() -> Any:
    """An engine like :func:`new_engine` that also reports the planner's plan from each state
    (``policy_commands``: TextWorld asks fast-downward for it)."""
    import textworld
    from alfworld.agents.environment.alfred_tw_env import AlfredDemangler
    from textworld.envs.pddl import PddlEnv

    infos = textworld.EnvInfos(won=True, admissible_commands=True, policy_commands=True)
    return AlfredDemangler(shuffle=False)(PddlEnv(infos))


POOL = EnginePool()
ENGINE_LOCK = threading.Lock()
"""Serialises every engine call of the process: textworld parses games and text with module-level
parsers that are not thread-safe. Loading ahead still overlaps with generation, which does not take it."""
