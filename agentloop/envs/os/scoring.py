"""How an OS episode is scored: the answer matched, or the task's check scripts run."""

from __future__ import annotations

import logging
import re

from agentloop.envs.os.config import OSEnvConfig
from agentloop.envs.os.sandbox import Sandbox
from agentloop.envs.os.tasks import OSTask

logger = logging.getLogger(__name__)


def score(task: OSTask, sandbox: Sandbox, answer: str, config: OSEnvConfig) -> bool:
    """Whether ``answer`` (and the sandbox's state) solve the task, by AgentBench's rules."""
    if task.match is not None or task.match_regex is not None:
        given = answer.strip() if task.match_strip else answer
        if task.match_regex is not None:
            return re.search(task.match_regex, given) is not None
        return given == task.match
    params = [answer]
    for check in task.checks:
        script = check if check is not None else task.example
        if script is None:
            logger.warning("task %s: a check runs the example solution, but it has none", task.task.task_id)
            return False
        result = sandbox.execute(script, [] if check is None else params, config.script_timeout_s, 1 << 16)
        if check is not None and result.exit_code != 0:
            return False
        params.append(result.output)
    return True
