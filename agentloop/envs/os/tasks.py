"""AgentBench's OS tasks: reading a split of ``<data_dir>/os_interaction``."""

from __future__ import annotations

import ast
import functools
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agentloop.types import Task

logger = logging.getLogger(__name__)

ENV_NAME = "os"
SPLITS = ("train", "test", "dev")
TEST_SETS = ("1", "2", "3", "4", "5", "6", "7")
"""The AgentBench std sets that make up the ``test`` split, folders under ``tasks/``."""
TRAIN_SCRIPT_SET = "1"
"""The scripts folder the training tasks' check files are read from."""
_READ_ONLY_ROOT = (
    "its init cannot make {} (the sandbox's / is read-only): its fixed answer is about files that do not exist"
)
_NO_USERS = "its setup needs useradd and chown to a new user jack, which the sandbox forbids: ~/test never exists"
EXCLUDED = {
    "test-6-003": "its init cannot make /usr/bin/find setuid (/usr is read-only): the check passes without any action",
    "test-6-007": "its init cannot make /data (the sandbox's / is read-only): the check passes without any action",
    "test-6-002": "needs /testfile (the sandbox's / is read-only), useradd and runuser",
    "test-6-005": "needs apt (there is no network) to install sudo, and a writable /etc/sudoers",
    "test-6-006": "needs apt (there is no network) to install sudo, and a writable /etc/sudoers",
    "test-6-008": "needs apt (there is no network) to remove and reinstall sudo",
    "test-4-003": _NO_USERS,
    "test-6-000": _NO_USERS,
    "test-6-001": _NO_USERS,
    "dev-0024": _NO_USERS,
    "test-4-004": _READ_ONLY_ROOT.format("/working"),
    "test-4-005": _READ_ONLY_ROOT.format("/working"),
    "test-4-006": _READ_ONLY_ROOT.format("/working"),
    "test-4-007": _READ_ONLY_ROOT.format("/working"),
}
"""Tasks that cannot be solved or scored honestly in the sandbox, left out at load time, with why.

Measured by running every task's setup in the sandbox (``scripts/<set>/init`` and ``start``)
and every task with ``Act: finish`` and with a wrong answer: the tasks whose setup fails for
what the sandbox forbids (users, apt, writes to ``/``, ``/etc`` or ``/usr``) and whose score
then no longer says whether the task was solved: a check that passes for doing nothing, or
a fixed answer about a state that does not exist. Tasks whose setup fails the same way but
whose expected answer is measured in the sandbox (the example's output, such as dev-0018's
count of users) stay: their score is the truth about the machine the agent sees.
"""
_HOST_CHECK_SYS = {"argv", "exit", "stdout", "stderr"}
_HOST_CHECK_FORBIDDEN = {"open", "exec", "eval", "compile", "__import__", "input", "breakpoint", "getattr", "vars"}


@dataclass(frozen=True)
class Script:
    """A script a task runs inside the sandbox."""

    language: str
    """``bash`` or ``python``."""
    code: str
    """The script's text (files are read when the task is loaded)."""


@dataclass(frozen=True)
class OSTask:
    """One AgentBench OS task: a description, how to set the system up, and how to score."""

    task: Task
    """The task as the loop and the store see it (``kind``: match, check script name, script)."""
    task_set: str
    """Where it comes from: ``train``, ``dev`` or a std set ``1`` .. ``7``."""
    init: tuple[Script, ...]
    """Setup scripts, run as fresh processes before the episode starts."""
    start: str | None
    """A command run in the agent's shell before the episode starts (often a background job)."""
    match: str | None
    """The expected answer of a match task (compared stripped), else None."""
    match_strip: bool
    """Whether the answer is stripped before a match."""
    match_regex: str | None
    """A regular expression the answer must contain, for match tasks given as a regex."""
    checks: tuple[Script | None, ...]
    """The check scripts in order; None runs the example solution. Empty for match tasks."""
    example: Script | None
    """The example solution, if the task has one."""


def load_os_tasks(data_dir: Path, split: str) -> list[OSTask]:
    """Reads one split of AgentBench's OS tasks.

    Args:
        data_dir: The task data directory (the one holding ``os_interaction/``).
        split: ``"train"`` (``train/training.json``), ``"test"`` (``tasks/1..7``) or ``"dev"``
            (``tasks/dev.json``).

    The tasks of ``EXCLUDED`` are left out (logged).

    Raises:
        ValueError: For an unknown split or a malformed task, or a python check that reads more
            than its arguments (python checks run on the host).
        FileNotFoundError: When the directory, a task file or a named script is missing.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown os_interaction split {split!r}; known splits: {sorted(SPLITS)}")
    root = Path(data_dir) / "os_interaction"
    if not root.is_dir():
        raise FileNotFoundError(f"os_interaction data directory not found: {root} (set the data directory)")
    if split == "train":
        scripts = root / "scripts" / TRAIN_SCRIPT_SET
        entries = _read_entries(root / "train" / "training.json")
        tasks = [
            _parse_task(e, path, "train", f"train-{i:04d}", "train", scripts) for i, (path, e) in enumerate(entries)
        ]
    elif split == "dev":
        entries = _read_entries(root / "tasks" / "dev.json")
        tasks = [
            _parse_task(e, path, "dev", f"dev-{i:04d}", "dev", root / "scripts" / "dev")
            for i, (path, e) in enumerate(entries)
        ]
    else:
        tasks = _test_tasks(root)
    kept = [t for t in tasks if t.task.task_id not in EXCLUDED]
    if len(kept) < len(tasks):
        logger.info(
            "os_interaction %s: %d of %d tasks left out (they cannot be solved or scored honestly in the sandbox: "
            "agentloop.envs.os.tasks.EXCLUDED says why)",
            split,
            len(tasks) - len(kept),
            len(tasks),
        )
    return kept


def _test_tasks(root: Path) -> list[OSTask]:
    tasks = []
    for name in TEST_SETS:
        folder = root / "tasks" / name
        files = sorted(folder.glob("*.json"))
        if not files:
            raise FileNotFoundError(f"no task files in {folder}")
        entries = [pair for path in files for pair in _read_entries(path)]
        for i, (path, entry) in enumerate(entries):
            tasks.append(_parse_task(entry, path, "test", f"test-{name}-{i:03d}", name, root / "scripts" / name))
    return tasks


def _read_entries(path: Path) -> list[tuple[Path, dict[str, Any]]]:
    """The tasks of one file (a list of tasks or a single one), each with the file's path."""
    if not path.is_file():
        raise FileNotFoundError(f"os_interaction task file not found: {path}")
    data = json.loads(path.read_text(encoding="utf-8"))
    return [(path, item) for item in (data if isinstance(data, list) else [data])]


def _parse_task(entry: dict[str, Any], path: Path, split: str, task_id: str, task_set: str, scripts: Path) -> OSTask:
    try:
        evaluation = entry["evaluation"]
        example_raw = evaluation.get("example", entry.get("example"))
        match = evaluation.get("match")
        if isinstance(match, str):
            match = {"answer": match, "strip": True}
        checks_raw = evaluation.get("check")
        if isinstance(checks_raw, (dict, str)):
            checks_raw = [checks_raw]
        checks = tuple(None if c is None else _script(c, scripts) for c in (checks_raw or []) if match is None)
        for check in checks:
            if check is not None and check.language == "python" and (problem := host_check_problem(check.code)):
                raise ValueError(f"its python check cannot run on the host: {problem}")
        if match is None and not checks:
            raise ValueError("the evaluation has neither match nor check")
        task = Task(
            env=ENV_NAME,
            task_id=task_id,
            split=split,
            kind=_kind(match, checks_raw),
            instruction=str(entry["description"]),
        )
        return OSTask(
            task=task,
            task_set=task_set,
            init=_init_scripts(entry.get("create"), scripts),
            start=entry.get("start"),
            match=None if match is None else match.get("answer"),
            match_strip=True if match is None else bool(match.get("strip", True)),
            match_regex=None if match is None else match.get("regex"),
            checks=checks,
            example=None if example_raw is None else _script(example_raw, scripts),
        )
    except (KeyError, TypeError, AttributeError, ValueError) as e:
        raise ValueError(f"{path}: malformed os_interaction task {task_id} ({e!r})") from e


def _kind(match: dict[str, Any] | None, checks: list[Any] | None) -> str:
    if match is not None:
        return "match"
    files = [c.get("file", "") for c in checks or [] if isinstance(c, dict)]
    if checks and checks[0] is None and len(files) == 1 and files[0].startswith("check/"):
        return Path(files[0]).stem
    return "script"


def _script(raw: Any, scripts: Path) -> Script:
    """A script given as bash text, ``{"code": ...}`` or ``{"file": ...}`` (optional ``language``)."""
    if isinstance(raw, str):
        return Script("bash", raw)
    language = str(raw.get("language", "bash"))
    if language not in ("bash", "python"):
        raise ValueError(f"unknown script language {language!r}")
    if "code" in raw:
        return Script(language, str(raw["code"]))
    path = scripts / str(raw["file"])
    if not path.is_file():
        raise FileNotFoundError(f"os_interaction script not found: {path}")
    return Script(language, path.read_text(encoding="utf-8"))


def _init_scripts(create: Any, scripts: Path) -> tuple[Script, ...]:
    """The setup scripts of ``create.init`` (one or a list); a malformed ``create`` means none."""
    if not isinstance(create, dict) or create.get("init") is None:
        return ()
    init = create["init"]
    return tuple(_script(item, scripts) for item in (init if isinstance(init, list) else [init]))


@functools.cache
def host_check_problem(code: str) -> str | None:
    """Why a python check could not run on the host, or None when it only reads its arguments.

    A check may import nothing but ``sys`` and use only ``sys.argv``, ``sys.exit`` and its
    output streams, and none of the builtins that reach files or other code (``open``,
    ``eval``, ``__import__``, ...) or dunder attributes.
    """
    try:
        tree = ast.parse(code)
    except SyntaxError as e:
        return f"syntax error: {e}"
    for node in ast.walk(tree):
        if isinstance(node, ast.Import) and any(alias.name != "sys" for alias in node.names):
            return "it imports a module other than sys"
        if isinstance(node, ast.ImportFrom) and (
            node.module != "sys" or any(alias.name not in _HOST_CHECK_SYS for alias in node.names)
        ):
            return "it imports more than sys.argv and sys.exit"
        if isinstance(node, ast.Name) and node.id in _HOST_CHECK_FORBIDDEN:
            return f"it uses {node.id}"
        if isinstance(node, ast.Attribute) and (
            node.attr.startswith("__")
            or (isinstance(node.value, ast.Name) and node.value.id == "sys" and node.attr not in _HOST_CHECK_SYS)
        ):
            return f"it uses the attribute {node.attr}"
    return None
