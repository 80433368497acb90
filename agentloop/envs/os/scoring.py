"""How an OS episode is scored: the answer matched, or the task's checks run out of the agent's reach."""

from __future__ import annotations

import logging
import re
import subprocess
import sys
from collections.abc import Sequence

from agentloop.envs.os.config import OSEnvConfig
from agentloop.envs.os.sandbox import RunResult, Sandbox
from agentloop.envs.os.tasks import OSTask, Script

logger = logging.getLogger(__name__)

CHECK_OUTPUT_BYTES = 1 << 16
"""What a check prints, at most, that is passed on to the next check."""
_EXIT_BUILTINS = (
    "import _sitebuiltins as _q, builtins as _b; "
    "_b.exit, _b.quit = _q.Quitter('exit', 'EOF'), _q.Quitter('quit', 'EOF')\n"
)
"""What ``site`` gives a check (AgentBench's python checks end with the builtin ``exit()``), set up
without importing ``site`` (``-S``): the host's site packages take 15 ms to start, the check 1 ms."""


def score(task: OSTask, sandbox: Sandbox, answer: str, expected: str | None, config: OSEnvConfig) -> bool:
    """Whether ``answer`` (and the sandbox's state) solve the task, by AgentBench's rules.

    ``expected`` is what the task's example printed at reset (the value of a ``None`` check
    entry). Python checks (comparisons of their arguments) run on the host; bash checks run in
    the sandbox after every other process in it is killed (:meth:`Sandbox.check`).
    """
    if task.match is not None or task.match_regex is not None:
        given = answer.strip() if task.match_strip else answer
        if task.match_regex is not None:
            return re.search(task.match_regex, given) is not None
        return given == task.match
    params = [answer]
    for check in task.checks:
        if check is None:
            if expected is None:
                logger.warning("task %s: a check needs the example's output, but there is none", task.task.task_id)
                return False
            params.append(expected)
            continue
        if check.language == "python":
            result = run_on_host(check, params, config.script_timeout_s, CHECK_OUTPUT_BYTES)
        else:
            result = sandbox.check(check, params, config.script_timeout_s, CHECK_OUTPUT_BYTES)
        if result.exit_code != 0:
            return False
        params.append(result.output)
    return True


def run_on_host(script: Script, args: Sequence[str], timeout: float, limit: int) -> RunResult:
    """Runs a python check on the host: ``python -I -S`` with ``exit``, an empty environment, ``/`` as its directory.

    AgentBench's python checks read only their arguments (``load_os_tasks`` refuses any other),
    so the sandbox, whatever the agent did to it, plays no part in them.
    """
    clean = [a.encode("utf-8", "replace").decode("utf-8").replace("\0", "") for a in args]
    argv = [sys.executable, "-I", "-S", "-c", _EXIT_BUILTINS + script.code, *clean]
    try:
        pipes = {"stdin": subprocess.DEVNULL, "stdout": subprocess.PIPE, "stderr": subprocess.STDOUT}
        done = subprocess.run(argv, **pipes, env={}, cwd="/", timeout=timeout)
    except subprocess.TimeoutExpired as e:
        out = e.output or b""
        return RunResult(out[:limit].decode("utf-8", "replace"), len(out), None, timed_out=True)
    return RunResult(done.stdout[:limit].decode("utf-8", "replace"), len(done.stdout), done.returncode)
