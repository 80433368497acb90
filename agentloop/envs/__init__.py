"""The environments, reached by name: load tasks, make an env, build expert demonstrations.

Each environment module is imported only when its name is first used, so importing
``agentloop.envs`` stays cheap. Task objects are environment-specific (for ``"db"``,
:class:`agentloop.envs.sql.DBTask`); every one of them carries its
:class:`~agentloop.types.Task` record as ``.task``.

Known environments: ``"db"`` (AgentBench dbbench on SQLite; splits ``train``, ``dev``),
``"os"`` (AgentBench's OS tasks in a bubblewrap sandbox; ``train``, ``test``, ``dev``),
``"webshop"`` (WebShop's 1,000-product shop; ``train``, ``test``) and ``"alfworld"``
(ALFWorld's games in the TextWorld engine; ``train``, ``valid_seen``, ``valid_unseen``,
``valid_train``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import gymnasium

    from agentloop.types import Trajectory

KNOWN_ENVS = ("db", "os", "webshop", "alfworld")
"""Names accepted by the functions below."""

DEFAULT_SPLITS = {
    "db": ("train", "dev"),
    "os": ("train", "test"),
    "webshop": ("train", "test"),
    "alfworld": ("train", "valid_unseen"),
}
"""Each environment's (training, held-out) split: dbbench's standard/dev, AgentBench OS's
generated training tasks against its 144-task test set, WebShop's seeded product split,
ALFWorld's training games against its unseen valid split (ETO's unseen test)."""


def _check(env: str) -> None:
    if env not in KNOWN_ENVS:
        raise ValueError(f"unknown environment {env!r}; known environments: {', '.join(KNOWN_ENVS)}")


def load_tasks(env: str, data_dir: Path, split: str) -> list[Any]:
    """The tasks of one split of an environment, read from the task data directory.

    Raises:
        ValueError: For an unknown environment or split.
        FileNotFoundError: When the environment's data is missing from ``data_dir``.
    """
    _check(env)
    if env == "alfworld":
        from agentloop.envs.alfworld import load_alfworld_tasks

        return load_alfworld_tasks(Path(data_dir), split)
    if env == "os":
        from agentloop.envs.bash import load_os_tasks

        return load_os_tasks(Path(data_dir), split)
    if env == "webshop":
        from agentloop.envs.webshop import load_webshop_tasks

        return load_webshop_tasks(Path(data_dir), split)
    from agentloop.envs.sql import load_db_tasks

    return load_db_tasks(Path(data_dir), split)


def make_env(env: str, tasks: Sequence[Any], config: Any) -> gymnasium.Env:
    """A Gymnasium environment over ``tasks``; ``config`` is the env's own (``SQLEnvConfig``, ...).

    Raises:
        ValueError: For an unknown environment.
        TypeError: When ``config`` is not the environment's config type.
    """
    _check(env)
    if env == "alfworld":
        from agentloop.envs.alfworld import ALFWorldEnv, ALFWorldEnvConfig

        _expect(config, ALFWorldEnvConfig)
        return ALFWorldEnv(tasks, config)
    if env == "os":
        from agentloop.envs.bash import OSEnv, OSEnvConfig

        _expect(config, OSEnvConfig)
        return OSEnv(tasks, config)
    if env == "webshop":
        from agentloop.envs.webshop import WebShopEnv, WebShopEnvConfig

        _expect(config, WebShopEnvConfig)
        return WebShopEnv(tasks, config)
    from agentloop.envs.sql import SQLEnv, SQLEnvConfig

    _expect(config, SQLEnvConfig)
    return SQLEnv(tasks, config)


def build_experts(
    env: str, tasks: Sequence[Any], env_config: Any, expert_config: Any, seed: int
) -> tuple[list[Trajectory], dict[str, Any]]:
    """Expert demonstrations for ``tasks``, replayed in the real environment; only successes kept.

    For ``"db"``, ``env_config`` is an ``SQLEnvConfig`` and ``expert_config`` a
    ``DBExpertConfig``; for the others, the env's config and None (their experts have no
    settings). Returns the demonstrations and a per-type success report.

    Raises:
        ValueError: For an unknown environment.
        TypeError: When a config is not of the environment's type.
    """
    _check(env)
    if env in ("os", "webshop", "alfworld") and expert_config is not None:
        raise TypeError(f"the {env} expert takes no config, got {type(expert_config).__name__}")
    if env == "alfworld":
        from agentloop.envs.alfworld import ALFWorldEnvConfig, build_alfworld_experts

        _expect(env_config, ALFWorldEnvConfig)
        return build_alfworld_experts(tasks, env_config)
    if env == "os":
        from agentloop.envs.bash import OSEnvConfig, build_os_experts

        _expect(env_config, OSEnvConfig)
        return build_os_experts(tasks, env_config)
    if env == "webshop":
        from agentloop.envs.webshop import WebShopEnvConfig, build_webshop_experts

        _expect(env_config, WebShopEnvConfig)
        return build_webshop_experts(tasks, env_config)
    from agentloop.envs.sql import DBExpertConfig, SQLEnvConfig, build_db_experts

    _expect(env_config, SQLEnvConfig)
    _expect(expert_config, DBExpertConfig)
    expert_config.validate()
    return build_db_experts(tasks, env_config, expert_config.recovery_fraction, seed)


def _expect(config: Any, kind: type) -> None:
    if not isinstance(config, kind):
        raise TypeError(f"expected a {kind.__name__}, got {type(config).__name__}")
