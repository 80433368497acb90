"""The environments, reached by name through one registry: load tasks, make an env, build experts.

Each environment is one package with its own registration (an
:class:`~agentloop.envs.registry.EnvDefinition` named ``ENV``) and one line below. The
package is imported only when its name is first used, so importing ``agentloop.envs`` stays
cheap. Task objects are environment-specific (for ``"db"``, :class:`agentloop.envs.db.DBTask`);
every one of them carries its :class:`~agentloop.types.Task` record as ``.task``.

Built in: ``"db"`` (AgentBench dbbench on SQLite), ``"os"`` (AgentBench's OS tasks in a
bubblewrap sandbox), ``"webshop"`` (WebShop's 1,000-product shop) and ``"alfworld"``
(ALFWorld's games in the TextWorld engine). Others register from their own package (see
:mod:`agentloop.envs.registry`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agentloop.envs.registry import EnvDefinition, definition, names, register

if TYPE_CHECKING:
    import gymnasium

    from agentloop.types import Trajectory

register("db", "agentloop.envs.db:ENV")
register("os", "agentloop.envs.os:ENV")
register("webshop", "agentloop.envs.webshop:ENV")
register("alfworld", "agentloop.envs.alfworld:ENV")

__all__ = [
    "EnvDefinition",
    "build_experts",
    "config_sections",
    "definition",
    "load_tasks",
    "make_env",
    "names",
    "register",
]


def load_tasks(env: str, data_dir: Path, split: str) -> list[Any]:
    """The tasks of one split of an environment, read from the task data directory.

    Raises:
        ValueError: For an unknown environment or split.
        FileNotFoundError: When the environment's data is missing from ``data_dir``.
    """
    found = definition(env)
    if split not in found.splits:
        raise ValueError(f"unknown {env} split {split!r}; known splits: {', '.join(found.splits)}")
    return found.load_tasks(Path(data_dir), split)


def make_env(env: str, tasks: Sequence[Any], config: Any) -> gymnasium.Env:
    """A Gymnasium environment over ``tasks``; ``config`` is the env's own (``SQLEnvConfig``, ...).

    Raises:
        ValueError: For an unknown environment.
        TypeError: When ``config`` is not the environment's config type.
    """
    found = definition(env)
    _expect(config, found.config)
    return found.env(tasks, config)


def build_experts(
    env: str, tasks: Sequence[Any], env_config: Any, expert_config: Any, seed: int
) -> tuple[list[Trajectory], dict[str, Any]]:
    """Expert demonstrations for ``tasks``, replayed in the real environment; only successes kept.

    ``expert_config`` is an instance of the env's registered expert config, or None for an
    env whose expert has no settings. Returns the demonstrations and the expert's report.

    Raises:
        ValueError: For an unknown environment.
        TypeError: When a config is not of the environment's type.
    """
    found = definition(env)
    _expect(env_config, found.config)
    if found.expert_config is None:
        if expert_config is not None:
            raise TypeError(f"the {env} expert takes no config, got {type(expert_config).__name__}")
        return found.build_experts(tasks, env_config)
    _expect(expert_config, found.expert_config)
    return found.build_experts(tasks, env_config, expert_config, seed)


def config_sections() -> dict[str, type]:
    """One config section per registered env (its config class, under its name) and per expert
    with settings (under ``<name>_experts``), for an experiment's config to compose."""
    sections: dict[str, type] = {}
    for name in names():
        found = definition(name)
        sections[name] = found.config
        if found.expert_config is not None:
            sections[f"{name}_experts"] = found.expert_config
    return sections


def _expect(config: Any, kind: type) -> None:
    if not isinstance(config, kind):
        raise TypeError(f"expected a {kind.__name__}, got {type(config).__name__}")
