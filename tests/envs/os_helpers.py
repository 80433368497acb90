"""What the Operating System environment's tests share: settings, action helpers, task loading, cgroup checks."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import pytest
from sandbox import why_no_sandbox

from agentloop.envs.os import OSEnv, OSEnvConfig, OSTask, load_os_tasks
from agentloop.envs.os.cgroups import hierarchies

CONFIG = OSEnvConfig(
    command_timeout_s=1.0, script_timeout_s=5.0, cpu_time_s=3, max_processes=48, memory_mb=256, max_file_mb=4
)
FINISH = "Act: finish"
SANDBOX_MARKS = [
    pytest.mark.integration,
    pytest.mark.skipif(why_no_sandbox() is not None, reason=str(why_no_sandbox())),
]


def bash(commands: str) -> str:
    return f"Think: let me look.\nAct: bash\n```bash\n{commands}\n```"


def answer(text: str) -> str:
    return f"Act: answer({text})"


def load(data_dir: Path, ids: Iterable[str]) -> dict[str, OSTask]:
    """The tasks with these ids, from whichever split holds them."""
    wanted = set(ids)
    found = {t.task.task_id: t for s in ("train", "dev", "test") for t in load_os_tasks(data_dir, s)}
    return {i: found[i] for i in wanted}


def episode(env: OSEnv, task_id: str, actions: list[str]) -> tuple[float, int, list[str]]:
    """Plays ``actions`` in a fresh episode; returns the reward, the tamper attempts and the observations."""
    env.reset(options={"task_id": task_id})
    reward, tampers, observations = 0.0, 0, []
    for action in actions:
        observation, reward, terminated, truncated, info = env.step(action)
        tampers += info["tamper_attempts"]
        observations.append(observation)
        if terminated or truncated:
            break
    return reward, tampers, observations


def need_cgroups() -> None:
    """Skips a test that needs writable memory and pids cgroups where there are none, but fails in CI.

    The machines this project is built and tested on have them (cgroup v1, root): a CI run
    that cannot use them must say so, not skip the tests that prove the episode's limits.
    """
    missing = [c for c in ("memory", "pids") if c not in hierarchies()]
    if missing:
        message = f"no writable {' and '.join(missing)} cgroup on this host"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{message}: CI machines must enforce the OS episode's limits with cgroups")
        pytest.skip(message)
