"""The Operating System environment itself: its protocol, observations and episodes."""

from __future__ import annotations

import logging
import re
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import gymnasium
from gymnasium.error import ResetNeeded

from agentloop.envs.os.config import OSEnvConfig
from agentloop.envs.os.sandbox import HOME, RunResult, Sandbox, SandboxError, UidLease, bwrap_argv
from agentloop.envs.os.scoring import CHECK_OUTPUT_BYTES, score
from agentloop.envs.os.tasks import OSTask, Script
from agentloop.envs.spaces import FreeText, unreadable_action
from agentloop.envs.tasks import choose_task, index_tasks

logger = logging.getLogger(__name__)


_NOTE_SLACK = 300

FORMAT_HELP = (
    'Reply with "Act: bash" followed by a ```bash block of commands, '
    'with "Act: answer(<your answer>)", or with "Act: finish".'
)
_ACT_RE = re.compile(r"Act:\s*(\w*)", re.IGNORECASE)
_BASH_BLOCK_RE = re.compile(r"```[ \t]*(?:bash|sh|shell)?[ \t]*\n?(.*?)```", re.IGNORECASE | re.DOTALL)
_ANSWER_RE = re.compile(r"Act:\s*answer\s*\((.*)\)", re.IGNORECASE | re.DOTALL)
PROTECTED_NAMES = ("pyvenv.cfg", "ld.so.preload")
"""Files that would change how the checks' interpreters or loader start, if they could be written
(they cannot: ``/usr/pyvenv.cfg`` is covered read-only, ``/etc`` is read-only): a command that
names one counts as one tamper attempt per name and episode."""


@dataclass(frozen=True)
class Action:
    """A well-formed action."""

    kind: str
    """``bash``, ``answer`` or ``finish``."""
    body: str
    """The commands, the answer text, or empty for ``finish``."""


def parse_action(text: Any, max_chars: int) -> Action | str:
    """Reads an assistant turn; returns the action, or a message saying what is wrong."""
    if (problem := unreadable_action(text, max_chars, FORMAT_HELP)) is not None:
        return problem
    act = _ACT_RE.search(text)
    if act is None:
        return f'Invalid action: no "Act:" found. {FORMAT_HELP}'
    word = act.group(1).lower()
    if word == "bash":
        block = _BASH_BLOCK_RE.search(text, act.end())
        if block is None:
            return "Invalid action: put the commands of Act: bash inside a ```bash ... ``` block."
        commands = block.group(1).strip()
        return Action("bash", commands) if commands else "Invalid action: the ```bash block is empty."
    if word == "answer":
        answer = _ANSWER_RE.search(text, act.start())
        if answer is None:
            return "Invalid action: write the answer in parentheses, e.g. Act: answer(42)."
        return Action("answer", answer.group(1))
    if word == "finish":
        return Action("finish", "")
    return f"Invalid action: unknown action {act.group(1)[:40]!r}. {FORMAT_HELP}"


def cap_text(text: str, limit: int, total: int | None = None) -> str:
    """``text`` cut to ``limit`` characters, with a note when anything was cut."""
    if len(text) <= limit and (total is None or total <= len(text.encode("utf-8", "replace"))):
        return text
    size = f"{total} bytes" if total is not None else f"{len(text)} characters"
    return f"{text[:limit]}\n[output truncated: {size}, the first {min(limit, len(text))} characters shown]"


def command_observation(result: RunResult, config: OSEnvConfig) -> str:
    """How the output of an agent command is shown to the agent."""
    output = cap_text(result.output, config.max_observation_chars, result.total_bytes)
    text = f"The output of the OS:\n{output}" if output.strip() else "The output of the OS is empty."
    notes = []
    stopped = result.stopped_after
    with_them = f", with {_count(stopped, 'process')} it had started" if stopped else ""
    if result.timed_out:
        notes.append(f"The command ran longer than {config.command_timeout_s:g} s and was stopped{with_them}.")
    elif result.overflow:
        notes.append(f"The command printed more than 1 MiB and was stopped{with_them}.")
    elif stopped:
        notes.append(f"The command reached the process limit: {_count(stopped, 'process')} it left were stopped.")
    if result.shell_restarted:
        notes.append("The shell did not recover and was replaced: variables and the directory were reset.")
    if result.shell_exited is not None:
        notes.append(f"The shell exited (status {result.shell_exited}); a fresh shell was started in {HOME}.")
    if result.stopped_before:
        notes.append(
            "Before this command, the processes of earlier commands reached the process limit: "
            f"{_count(result.stopped_before, 'process')} were stopped."
        )
    return "\n".join([text, *notes])


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}es"


def initial_observation(task: OSTask, config: OSEnvConfig) -> str:
    """The first observation: the protocol and the task."""
    return (
        "You are the root user of a Linux machine, working in a bash shell. Solve the task below. "
        f"You have {config.max_turns} replies. Each reply may start with your thoughts "
        '("Think: ...") and must end with exactly one action:\n'
        "Act: bash\n```bash\n# commands\n```\n"
        "runs the commands in your shell (directory and variables persist) and shows their output;\n"
        "Act: answer(your answer)\n"
        "gives the final answer when the task asks a question;\n"
        "Act: finish\n"
        "ends the task when it only asks you to change the system.\n"
        f"Task: {task.task.instruction}"
    )


class OSEnv(gymnasium.Env[str, str]):
    """Gymnasium environment over AgentBench OS tasks, one fresh sandbox per episode.

    ``reset(options={"task_id": ...})`` picks a task (otherwise one is drawn with the env's
    seeded generator), starts its sandbox and runs its setup; ``info["task"]`` is its
    :class:`~agentloop.types.Task`. ``step`` returns ``info`` with ``invalid`` (the action
    broke the protocol), ``success``, ``exit_code`` (of a command; None otherwise),
    ``timed_out`` and ``tamper_attempts`` (files planted where checks could be shadowed, and
    protected files named; see the package docstring). ``step`` before ``reset`` or after the
    episode ended raises :class:`gymnasium.error.ResetNeeded`. The env holds one host uid from
    ``reset`` until ``close``.
    """

    metadata = {"render_modes": []}

    def __init__(self, tasks: Sequence[OSTask], config: OSEnvConfig) -> None:
        config.validate()
        self.config = config
        self.tasks = index_tasks(tasks, "OSEnv")
        bwrap_argv(config)  # fails early when bubblewrap is missing
        first = max(len(initial_observation(t, config)) for t in tasks)
        self.observation_space = FreeText(max(first, config.max_observation_chars + _NOTE_SLACK))
        self.action_space = FreeText(config.max_action_chars)
        self._lease: UidLease | None = None
        self._sandbox: Sandbox | None = None
        self._task: OSTask | None = None
        self._expected: str | None = None
        self._named: set[str] = set()
        self._turns = 0
        self._done = True

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[str, dict[str, Any]]:
        """Starts an episode in a fresh sandbox set up for the chosen task."""
        super().reset(seed=seed)
        task = self._choose(options or {})
        self._close_sandbox()
        if self._lease is None:
            self._lease = UidLease(self.config.uid_base, self.config.uid_count)
        self._sandbox = Sandbox(self.config, self._lease.uid)
        self._expected = self._set_up(task, self._sandbox)
        self._task, self._turns, self._done, self._named = task, 0, False, set()
        return initial_observation(task, self.config), {"task": task.task}

    def step(self, action: str) -> tuple[str, float, bool, bool, dict[str, Any]]:
        """Runs one action; see the module docstring for the protocol and the scoring."""
        if self._sandbox is None or self._task is None or self._done:
            raise ResetNeeded("OSEnv.step() needs an episode in progress: call reset() first")
        self._turns += 1
        parsed = parse_action(action, self.config.max_action_chars)
        info: dict[str, Any] = {"invalid": isinstance(parsed, str), "success": False, "exit_code": None}
        info["timed_out"], info["tamper_attempts"] = False, 0
        reward, terminated = 0.0, False
        if isinstance(parsed, str):
            observation = parsed
        elif parsed.kind == "bash":
            observation, info["exit_code"], info["timed_out"], terminated, info["tamper_attempts"] = self._command(
                parsed.body
            )
        else:
            success, info["tamper_attempts"] = self._score(parsed.body)
            reward, terminated, info["success"] = float(success), True, success
            observation = "Your answer was received; the task is over." if parsed.kind == "answer" else "Finished."
        truncated = not terminated and self._turns >= self.config.max_turns
        self._done = terminated or truncated
        if self._done:
            self._close_sandbox()
        return observation, reward, terminated, truncated, info

    def close(self) -> None:
        """Kills the episode's sandbox and gives the uid back."""
        self._close_sandbox()
        if self._lease is not None:
            self._lease.release()
            self._lease = None
        self._done = True

    def _command(self, commands: str) -> tuple[str, int | None, bool, bool, int]:
        """Runs the agent's commands; a sandbox that stopped answering ends the episode.

        Returns the observation, the exit status, whether it timed out, whether the episode
        ended, and the tamper attempts it made.
        """
        assert self._sandbox is not None
        limit = self.config.max_observation_chars * 4 + 4
        tampers = self._names_protected(commands)
        try:
            result = self._sandbox.run(commands, self.config.command_timeout_s, limit)
        except SandboxError as e:
            logger.warning("sandbox failed during a command: %s", e)
            return "The machine stopped responding; the task is over.", None, True, True, tampers
        self._log_plants(result.plants)
        tampers += len(result.plants)
        return command_observation(result, self.config), result.exit_code, result.timed_out, False, tampers

    def _score(self, answer: str) -> tuple[bool, int]:
        """Stops every process of the agent's, then scores; returns the success and the plants found last."""
        assert self._sandbox is not None and self._task is not None
        try:
            plants = self._sandbox.stop()
            self._log_plants(plants)
            return score(self._task, self._sandbox, answer, self._expected, self.config), len(plants)
        except SandboxError as e:
            logger.warning("sandbox failed while scoring %s: %s", self._task.task.task_id, e)
            return False, 0

    def _names_protected(self, commands: str) -> int:
        named = {name for name in PROTECTED_NAMES if name in commands} - self._named
        self._named |= named
        return len(named)

    def _log_plants(self, plants: Sequence[str]) -> None:
        for plant in plants:
            logger.debug("task %s: tamper attempt: %s", self._task.task.task_id if self._task else "?", plant)

    def _set_up(self, task: OSTask, sandbox: Sandbox) -> str | None:
        """Runs the task's init scripts, then its start command in the agent's shell; returns the expected answer.

        A bash init script first seeds ``$RANDOM`` from the task id, so every episode of a
        task starts from the same files (trajectories of one task stay comparable). A task
        whose checks compare with the example's output (a ``None`` check) gets it now, in the
        episode's own sandbox, before the agent can do anything: the example runs as a fresh
        process in the environment AgentBench gave it (the agent's PATH: examples such as
        test-2-000's count what PATH reaches). Returns that output (None for other tasks).
        """
        seed = zlib.crc32(task.task.task_id.encode()) % 32768
        for script in task.init:
            if script.language == "bash":
                script = Script("bash", f"RANDOM={seed}\n{script.code}")
            result = sandbox.execute(script, [], self.config.script_timeout_s, 2000)
            if result.exit_code != 0:
                logger.debug("init of %s exited %s: %s", task.task.task_id, result.exit_code, result.output)
        if task.start:
            result = sandbox.run(task.start, self.config.script_timeout_s, 2000)
            if result.exit_code != 0:
                logger.debug("start of %s exited %s: %s", task.task.task_id, result.exit_code, result.output)
        expected = None
        if None in task.checks and task.example is not None:
            timeout = self.config.script_timeout_s
            expected = sandbox.execute(task.example, [], timeout, CHECK_OUTPUT_BYTES).output
        sandbox.begin()
        return expected

    def _choose(self, options: dict[str, Any]) -> OSTask:
        return choose_task(self.tasks, options, self.np_random)

    def _close_sandbox(self) -> None:
        if self._sandbox is not None:
            self._sandbox.close()
            self._sandbox = None
