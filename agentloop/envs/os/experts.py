"""Expert demonstrations of the Operating System environment: each task's example solution replayed in the env."""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from typing import Any

from agentloop.envs.experts import replay_actions, tally
from agentloop.envs.os.config import OSEnvConfig
from agentloop.envs.os.env import OSEnv
from agentloop.envs.os.tasks import OSTask, Script
from agentloop.types import Trajectory

logger = logging.getLogger(__name__)


def _bash(commands: str) -> str:
    return f"Think: I run the commands that solve the task.\n\nAct: bash\n\n```bash\n{commands.strip()}\n```"


def _answer(text: str) -> str:
    return f"Think: The output gives the answer.\n\nAct: answer({text})"


def expert_actions(task: OSTask, env: OSEnv) -> list[str] | None:
    """The expert's turns for a task, from its example solution; None when there is none to write.

    The example runs as ``Act: bash`` (a python example as ``python3 -c``). A check task that
    compares the answer with the example's output answers with that output, measured by
    running the example once in a fresh episode of ``env`` (init is seeded per task, so the
    replay usually sees the same files); so does a task whose checks may read the answer
    (they mention ``argv[1]``, ``$1``, ...) when the example prints something; a match task
    answers its expected string; any other task ends with ``Act: finish``.
    """
    example = task.example
    steps = [] if example is None else [_bash(as_bash(example))]
    if task.match is not None:
        return [*steps, _answer(task.match)]
    if task.match_regex is not None or example is None:
        return None
    if None in task.checks:
        output = _example_output(task, env)
        return None if output is None else [*steps, _answer(output)]
    if any(c is not None and _USES_ANSWER_RE.search(c.code) for c in task.checks):
        output = _example_output(task, env)  # the checks may read the answer: give what the example says
        if output is not None:
            return [*steps, _answer(output)]
    return [*steps, "Think: The change is made.\n\nAct: finish"]


_USES_ANSWER_RE = re.compile(r"argv\[1\]|\$1\b|\$\{1\}|\$@|\$\*")
"""How a check script reads the answer it is given."""


def as_bash(script: Script) -> str:
    if script.language == "bash":
        return script.code
    return "python3 -c " + "'" + script.code.replace("'", "'\\''") + "'"


def _example_output(task: OSTask, env: OSEnv) -> str | None:
    """What the example prints in a fresh episode of the task, stripped; None if it fails."""
    env.reset(options={"task_id": task.task.task_id})
    assert env._sandbox is not None
    try:
        result = env._sandbox.run(as_bash(task.example or Script("bash", "")), env.config.command_timeout_s, 1 << 16)
    finally:
        env._close_sandbox()
        env._done = True
    if result.exit_code is None or not result.output.strip():
        return None
    return result.output.strip()


def build_os_experts(tasks: Sequence[OSTask], config: OSEnvConfig) -> tuple[list[Trajectory], dict[str, Any]]:
    """Replays every task's example solution through a real :class:`OSEnv`; keeps the successes.

    Returns:
        The kept demonstrations (reward 1.0 each), and a report: ``by_set`` and ``by_kind``
        map the task set (``train``, ``dev``, ``1`` .. ``7``) / the task kind to
        ``{"attempted": n, "succeeded": k}``; ``no_actions`` lists the tasks the expert
        could write no actions for; ``failed`` lists the tasks whose replay did not succeed.
    """
    env = OSEnv(tasks, config)
    demos: dict[str, Trajectory] = {}
    no_actions, failed = [], []
    try:
        for task in tasks:
            task_id = task.task.task_id
            actions = expert_actions(task, env)
            if actions is None or len(actions) > config.max_turns:
                no_actions.append(task_id)
                continue
            demo = replay_actions(env, task_id, actions)
            if demo.success:
                demos[task_id] = demo
            else:
                failed.append(task_id)
    finally:
        env.close()
    report = {
        "by_set": tally(tasks, demos, lambda t: t.task_set),
        "by_kind": tally(tasks, demos, lambda t: t.task.kind),
        "no_actions": no_actions,
        "failed": failed,
    }
    for name, row in sorted(report["by_set"].items()):
        logger.info("os experts, set %s: %d/%d succeeded", name, row["succeeded"], row["attempted"])
    return list(demos.values()), report
