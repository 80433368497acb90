"""The registry of environments: one registration per environment, looked up by name.

In the spirit of Gymnasium's ``register``/``make``: an environment is registered once, by
name, with the import path of its :class:`EnvDefinition` (``"package.module:ATTRIBUTE"``),
and the definition is imported only when that name is first used, so importing
``agentloop.envs`` stays cheap. The definition says everything the loop needs: how to load
the tasks of a split, how to make the environment, its config class, and how to build its
expert demonstrations.

Environments outside agentloop register the same way, from their own module
(``agentloop.envs.register("counter", "my_package.counter:ENV")``), or without any code in
agentloop or the experiment, through the ``agentloop.envs`` entry-point group of their
package's metadata (``counter = "my_package.counter:ENV"``): entry points are read at the
first lookup, in every process (so Ray actors find them too).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import re
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import gymnasium

    from agentloop.types import Trajectory

ENTRY_POINT_GROUP = "agentloop.envs"
"""The package-metadata entry-point group through which other packages register environments."""
_NAME_RE = re.compile(r"[a-z][a-z0-9_]*")


@dataclass(frozen=True)
class Imagination:
    """How an environment takes new tasks an explorer imagines (STE): what the explorer is asked,
    and how a proposal becomes a task the environment can score."""

    prompt: Callable[[Any], str]
    """``prompt(base)``: the request for a new task near the training task ``base`` (the tasks to
    avoid, already explored, are added after it by :func:`agentloop.memory.imagination.requests`)."""
    build: Callable[[Any, str, Any, str], Any]
    """``build(base, proposal, config, task_id)``: the env task object the proposal describes
    (its ``.task.split`` is ``imagined``), or a sentence saying why it cannot be scored."""
    evidence: Callable[[Any, Any], str] | None = None
    """``evidence(task, config)``: what a judge reads of a built task to decide whether the proposal's own
    solution does what it asks (the task and its solution, as text); None: the env is not judged."""
    scene: Callable[[Any], Hashable] | None = None
    """``scene(task)``: what an imagined task is built over (DB: its table, rows included). A training
    task whose scene a held-out task shares is never a base, so that no imagined task can restate a
    held-out one and train on it; None: held-out tasks share no scene with training ones, or ``build``
    keeps them out itself (WebShop never imagines over a held-out product)."""


@dataclass(frozen=True)
class EnvDefinition:
    """Everything the loop needs to know of one environment.

    The task objects an environment loads are its own (e.g. ``DBTask``); each carries its
    :class:`~agentloop.types.Task` record as ``.task``.
    """

    name: str
    """The environment's name, as ``envs[i].name`` of a run and ``Task.env`` of its tasks."""
    splits: tuple[str, ...]
    """Every split ``load_tasks`` knows."""
    train_split: str
    """The split trained on by default (explored and imitated)."""
    eval_split: str
    """The held-out split evaluated by default."""
    load_tasks: Callable[[Path, str], list[Any]]
    """``load_tasks(data_dir, split)``: the tasks of one split, read from the task data directory."""
    env: Callable[[Sequence[Any], Any], gymnasium.Env]
    """``env(tasks, config)``: a Gymnasium environment over those tasks (usually the env class)."""
    config: type
    """The env's config dataclass (with ``validate()``); a run gets one section of it per env."""
    build_experts: Callable[..., tuple[list[Trajectory], dict[str, Any]]]
    """``build_experts(tasks, config)``, or with ``expert_config`` set ``build_experts(tasks,
    config, expert_config, seed)``: the expert demonstrations, replayed through the real env
    with only the successes kept, and a report of what was found."""
    expert_config: type | None = None
    """The expert's config dataclass, if it has settings (a run's section ``<name>_experts``)."""
    context_tokens: int = 2048
    """Context an episode may fill with the env's default settings, in tokens of the default
    model's tokenizer: a run's default rollout context and learner ``max_length`` are the
    largest of its envs' (``bench/episode_tokens.py`` measures episodes)."""
    imagination: Imagination | None = None
    """How the env takes imagined tasks; None when it takes none."""
    median_episode_tokens: int = 0
    """Median length of the env's expert demonstrations, in tokens of the default model's
    tokenizer (``bench/episode_tokens.py``): a learner ``max_length`` or rollout context
    below it would cut the final turn of most episodes, so a run's config refuses it."""

    def __post_init__(self) -> None:
        if not _NAME_RE.fullmatch(self.name):
            raise ValueError(f"environment name {self.name!r}: use lower-case letters, digits and _")
        for split in (self.train_split, self.eval_split):
            if split not in self.splits:
                raise ValueError(f"environment {self.name!r}: default split {split!r} is not among {self.splits}")


_registered: dict[str, str | EnvDefinition] = {}
"""Each name as it was registered: an import path or a definition."""
_loaded: dict[str, EnvDefinition] = {}
_entry_points_read = False


def register(name: str, definition: str | EnvDefinition) -> None:
    """Registers an environment under ``name``.

    Args:
        name: The environment's name (lower-case letters, digits and ``_``).
        definition: An :class:`EnvDefinition` whose ``name`` is ``name``, or the import path
            of one (``"package.module:ATTRIBUTE"``), imported at the first lookup.

    Raises:
        ValueError: When the name is malformed, or registered already to something else.
    """
    if not _NAME_RE.fullmatch(name):
        raise ValueError(f"environment name {name!r}: use lower-case letters, digits and _")
    if isinstance(definition, EnvDefinition) and definition.name != name:
        raise ValueError(f"registering {name!r} with the definition of {definition.name!r}")
    known = _registered.get(name)
    if known is not None and known != definition:
        raise ValueError(f"environment {name!r} is registered already ({_path(known)})")
    _registered[name] = definition


def names() -> tuple[str, ...]:
    """The registered environment names, in registration order (built-ins first)."""
    _read_entry_points()
    return tuple(_registered)


def definition(name: str) -> EnvDefinition:
    """The definition of a registered environment, imported on first use.

    Raises:
        ValueError: For a name nobody registered.
    """
    _read_entry_points()
    if name not in _registered:
        raise ValueError(f"unknown environment {name!r}; known environments: {', '.join(_registered)}")
    if name not in _loaded:
        found = _registered[name]
        if isinstance(found, str):
            module, _, attribute = found.partition(":")
            found = getattr(importlib.import_module(module), attribute)
        if not isinstance(found, EnvDefinition) or found.name != name:
            raise TypeError(f"{_path(_registered[name])} is not the EnvDefinition of {name!r}")
        _loaded[name] = found
    return _loaded[name]


def _path(definition: str | EnvDefinition) -> str:
    return definition if isinstance(definition, str) else f"<definition of {definition.name!r}>"


def _read_entry_points() -> None:
    """Registers the environments other installed packages declare (once per process)."""
    global _entry_points_read
    if _entry_points_read:
        return
    _entry_points_read = True
    for entry in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        register(entry.name, entry.value)
