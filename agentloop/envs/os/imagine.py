"""Imagined OS tasks (STE's imagination): AgentInstruct-style tasks derived from a training task.

The explorer is shown a training task (its question, the setup script that prepares the
machine, its solution and the kind of answer its check compares) and writes a new task of the
same kind: a question, a setup script (or none, to keep the training task's), and the shell
command whose output is the answer. The new task keeps the training task's check (AgentBench's
``integer-match``, ``string-match``, ...), so it is scored exactly as the training tasks are: the
agent's answer against what the solution printed in the episode's own sandbox.

:func:`imagined_task` keeps a proposal only when it is not the example task itself (the same
question, in other quotes or case, on the same setup or on one written otherwise that gives the same
answer); in the sandbox, the setup runs and the solution prints an answer; it prints the same
answer in a second fresh sandbox; the answer is not written in the question (given away) or in
the solution (a constant such as ``echo 3``, an answer the explorer knows before it asks); and the
task's own check accepts it, which is measured by replaying the solution and that answer through the real environment.
"""

from __future__ import annotations

import re

from agentloop.envs.experts import replay_actions
from agentloop.envs.os.config import OSEnvConfig
from agentloop.envs.os.env import OSEnv
from agentloop.envs.os.experts import as_bash, expert_actions
from agentloop.envs.os.tasks import ENV_NAME, OSTask, Script
from agentloop.envs.tasks import words
from agentloop.types import Task

SETUP_CHARS = 1500
"""Longest setup script shown to the explorer (the start is kept)."""
MAX_ANSWER_CHARS = 200
"""Longest answer an imagined task may have (AgentBench's answers are a number or a short line)."""

ANSWER_KINDS = {
    "integer-match": "an integer",
    "string-match": "one line of text",
    "size-match": "a file size such as 4.0K or 12M",
}
"""What each check compares, as the explorer is told."""

_QUESTION_RE = re.compile(r"Task:\s*(.+?)\s*(?:\n\s*(?:Setup|Solution):|$)", re.IGNORECASE | re.DOTALL)
_BLOCK_RE = r"{}:\s*```(?:[ \t]*(?:bash|sh|shell)\b)?(.*?)```"


def proposal_prompt(base: OSTask) -> str:
    """What the explorer is asked: a new task like ``base``."""
    setup = "\n".join(s.code for s in base.init if s.language == "bash").strip() or "# (none)"
    kind = ANSWER_KINDS.get(base.task.kind, "a short answer")
    lines = [
        "Invent a new task for a Linux shell, like the example below but asking something different. The task "
        f"asks a question whose answer is {kind}; the setup prepares files for it (bash, run before the task; "
        "may be empty); the solution is one shell command that prints exactly the answer.",
        f"Example task: {base.task.instruction}",
        f"Example setup:\n```bash\n{setup[:SETUP_CHARS]}\n```",
    ]
    if base.example is not None and base.example.language == "bash":
        lines.append(f"Example solution:\n```bash\n{base.example.code.strip()}\n```")
    lines.append("Reply exactly as:\nTask: ...\nSetup:\n```bash\n...\n```\nSolution:\n```bash\n...\n```")
    return "\n".join(lines)


def parse_proposal(text: str) -> tuple[str, str, str] | str:
    """The (question, setup, solution) of a proposal, or a sentence saying why it cannot be read."""
    question = _QUESTION_RE.search(text or "")
    if question is None or not question.group(1).strip():
        return "no task"
    setup = re.search(_BLOCK_RE.format("Setup"), text, re.IGNORECASE | re.DOTALL)
    solution = re.search(_BLOCK_RE.format("Solution"), text, re.IGNORECASE | re.DOTALL)
    if solution is None or not solution.group(1).strip():
        return "no Solution: ```bash block"
    return " ".join(question.group(1).split()), (setup.group(1).strip() if setup else ""), solution.group(1).strip()


def _solution_output(task: OSTask, env: OSEnv) -> str | None:
    """What the task's solution prints in a fresh episode, stripped; None when it fails (exits
    non-zero or times out) or prints nothing."""
    env.reset(options={"task_id": task.task.task_id})
    assert env._sandbox is not None and task.example is not None
    try:
        result = env._sandbox.run(as_bash(task.example), env.config.command_timeout_s, 1 << 16)
    finally:
        env._close_sandbox()
        env._done = True
    return result.output.strip() if result.exit_code == 0 and result.output.strip() else None


def _base_answer(base: OSTask, config: OSEnvConfig) -> str | None:
    """What ``base``'s own solution prints on its own setup (None without a bash solution)."""
    if base.example is None or base.example.language != "bash":
        return None
    env = OSEnv([base], config)
    try:
        return _solution_output(base, env)
    finally:
        env.close()


def _written_in(answer: str, text: str) -> bool:
    """Whether ``answer`` appears in ``text`` as a whole word (or whole phrase)."""
    return re.search(rf"(?<![\w.]){re.escape(answer)}(?![\w]|\.\d)", text) is not None


def imagined_task(base: OSTask, text: str, config: OSEnvConfig, task_id: str) -> OSTask | str:
    """The task a proposal describes, derived from ``base``, or a sentence saying why it is not kept.

    Args:
        base: The training task it derives from (its check, and its setup when the proposal has none).
        text: The explorer's proposal (:func:`proposal_prompt`'s format).
        config: The environment's settings; the proposal runs in its sandbox.
        task_id: The new task's id (split ``imagined``).
    """
    if base.match is not None or base.match_regex is not None or base.checks[:1] != (None,):
        return "the base task is not scored against its solution's output"
    parsed = parse_proposal(text)
    if isinstance(parsed, str):
        return parsed
    question, setup, solution = parsed
    own_setup = bool(setup) and not setup.lstrip().startswith("# (none)")
    base_setup = "\n".join(s.code for s in base.init if s.language == "bash")
    if words(question) == words(base.task.instruction) and (not own_setup or words(setup) == words(base_setup)):
        return "the example task itself"  # the same question on the same machine, in other quotes or case
    task = OSTask(
        task=Task(ENV_NAME, task_id, "imagined", base.task.kind, question),
        task_set="imagined",
        init=(Script("bash", setup),) if own_setup else base.init,
        start=None if own_setup else base.start,
        match=None,
        match_strip=True,
        match_regex=None,
        checks=base.checks,
        example=Script("bash", solution),
    )
    env = OSEnv([task], config)
    try:
        first, second = _solution_output(task, env), _solution_output(task, env)
        if first is None:
            return "the solution fails or prints nothing"
        if first != second:
            return "the solution prints a different answer each time it runs"
        if len(first) > MAX_ANSWER_CHARS:
            return f"the answer is {len(first)} characters (at most {MAX_ANSWER_CHARS})"
        if _written_in(first, solution):
            return f"the solution prints a constant ({first[:40]!r} is written in it)"
        if _written_in(first, question):
            return f"the task gives its answer away ({first[:40]!r} is written in it)"
        if words(question) == words(base.task.instruction) and first == _base_answer(base, config):
            return "the example task itself (its question, and its answer on a setup written otherwise)"
        actions = expert_actions(task, env)
        if actions is None or not replay_actions(env, task_id, actions).success:
            return f"the task's check ({base.task.kind}) does not accept the solution's own answer"
    finally:
        env.close()
    return task


def judge_evidence(task: OSTask, config: OSEnvConfig) -> str:
    """What a judge reads of an imagined task: the question, the setup, the solution and its answer."""
    setup = "\n".join(s.code for s in task.init if s.language == "bash").strip() or "(none)"
    env = OSEnv([task], config)
    try:
        answer = _solution_output(task, env)
    finally:
        env.close()
    return "\n".join(
        [
            f"Task: {task.task.instruction}",
            f"Setup (bash, run before the task):\n{setup[:SETUP_CHARS]}",
            f"Solution (bash):\n{task.example.code if task.example else ''}",
            f"Its answer: {answer!r}",
        ]
    )
