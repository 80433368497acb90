"""The Operating System environment: AgentBench's OS tasks in real bash, inside a bubblewrap sandbox.

Data and splits. Tasks are read from ``<data_dir>/os_interaction/``. ``train/training.json``
(1,000 generated tasks) is the ``train`` split; the AgentBench test set, ``tasks/1..7/*.json``
(144 tasks), is the held-out ``test`` split, and ``tasks/dev.json`` (26 tasks) the held-out
``dev`` split. A task names its init, example and check scripts with ``{"file": ...}``,
relative to ``scripts/<set>/`` (``scripts/dev/`` for dev); training tasks name only the check
scripts, which every set ships, and read them from ``scripts/1/``. Ids are ``train-0042``,
``dev-0007`` and ``test-4-012`` (set 4, the 13th task of that set, files in name order).
``Task.kind`` is how the task is scored: ``match``, the check script's name
(``integer-match``, ``string-match``, ``size-match``), or ``script`` for any other check.

Protocol (AgentBench's text form). Each assistant turn holds one action, after an optional
``Think: ...``: ``Act: bash`` followed by a ```bash block runs the block in the episode's
shell and shows its output; ``Act: answer(...)`` gives the final answer (the text between
the parentheses) and ``Act: finish`` ends the episode without one (for tasks that only ask
for a change); both end the episode and score it. Long output is cut to
``max_observation_chars`` and the agent is told so. A reply that follows none of these
forms is answered with an explanation, counts as invalid and costs a turn; an episode
without an answer after ``max_turns`` replies is truncated.

Scoring (AgentBench's semantics). A ``match`` task compares the stripped answer with the
expected string. A ``check`` task runs its scripts in order inside the episode's sandbox,
as fresh processes (not in the agent's shell), each with the arguments gathered so far,
starting with the answer (``finish`` answers the empty string); after each script its
output is appended to the arguments; a ``null`` entry runs the task's example solution, so
its output is the expected value the next script compares with. Every script must exit 0.
Reward is 1.0 for success, 0.0 otherwise.

Sandbox design. Each episode runs in its own bubblewrap (``bwrap``) sandbox, started at
``reset`` and killed whole at the next ``reset`` or ``close``:

- Namespaces: new user, pid, network, ipc, uts and cgroup namespaces. The network namespace
  has only a loopback device, so nothing outside is reachable. Inside, the agent is ``root``
  (uid 0) of its own user namespace, without any capability (``--cap-drop ALL``) and
  without the right to make nested user namespaces.
- Unprivileged outside: the sandbox is launched under an unprivileged host uid (by default
  from 61000 up), one uid per live environment, claimed with an abstract Unix socket so
  concurrent environments in other processes never share one and nothing is left on disk.
  Because of that uid the kernel enforces the resource limits even when agentloop runs as
  root (the process limit is not enforced for host uid 0), and inside root can raise no
  hard limit. Host files owned by root show up as ``nobody`` inside.
- Files: the root is an empty tmpfs remounted read-only; the host's ``/etc`` and every
  folder of its ``/usr`` (``/usr/bin``, ``/usr/lib``, ...) are bound read-only (tools such as
  python3 come from the host); ``/bin``, ``/lib``, ... mirror the host's links. ``/root``
  (the home and working directory), ``/home``, ``/tmp``, ``/var``, ``/usr/local``,
  ``/dev/shm`` and ``/usr`` itself (so a task may add a file such as ``/usr/stock.log`` next
  to the read-only folders) are private tmpfs mounts of ``scratch_mb`` each, writable and
  gone with the sandbox. The few host folders there that others may not list (such as
  ``/etc/ssl/private``) are covered by empty ones. Nothing else of the host (``/work``, the data
  directory, the host's ``/root``) is visible, and nothing is written to the host's disk.
- Limits (``prlimit`` before ``bwrap``, inherited by every process): processes
  (``max_processes``, counted per sandbox uid), address space per process (``memory_mb``),
  file size (``max_file_mb``), CPU seconds per process (``cpu_time_s``), no core dumps.
  Each command has a wall-clock limit (``command_timeout_s``): on expiry every process of
  the command is killed; if the shell itself is stuck (a builtin loop), it is replaced by a
  fresh one and the agent is told its state was reset. Output beyond 1 MiB stops a command
  the same way.
- Processes: inside, a small Python supervisor (the host's python3, code passed on the
  command line) runs as pid 1. It keeps one persistent bash per episode (so the working
  directory, variables and functions carry over between commands), runs init, example and
  check scripts as fresh processes, and reaps orphans. As pid 1 it cannot be killed from
  inside, and it is not dumpable, so the agent cannot trace it or reach its pipes to the
  host. The agent's commands run with stdin from ``/dev/null``; each is passed to the shell
  as one quoted ``eval`` and ends with a random marker line that carries the exit status.
- Cleanup: ``--die-with-parent`` and ``--as-pid-1``: when the episode ends the host kills
  ``bwrap``, pid 1 dies with it and the kernel kills every process of the pid namespace;
  the environment then waits until no process of the sandbox uid is left.

Setup per task: the home starts with the files of the host's ``/etc/skel`` (``.bashrc``,
``.profile``, as in a fresh Ubuntu container); the task's ``create.init`` (code or file, bash
or python) runs as a fresh process, a bash one with ``$RANDOM`` seeded from the task id so
that every episode of a task starts from the same files; then its ``start`` command runs in
the agent's shell (as in AgentBench, so a ``start`` of ``var=10`` or a background job is part
of the shell's state). The sandbox is
not a copy of AgentBench's Ubuntu container: tasks that need to write to ``/etc`` or
``/usr`` outside ``/usr/local``, to add users, to install packages or to use the network
cannot succeed here (see :func:`build_os_experts`' report).

A known limit, shared with AgentBench: the agent's background processes are still alive
while the check scripts run. The check code never touches the sandbox's files.

Experts. :func:`expert_actions` runs a task's example solution as ``Act: bash`` and
answers with what it printed (``Act: answer(...)``), answers a match task with its expected
string, and ends with ``Act: finish`` when the checks ignore the answer;
:func:`build_os_experts` replays those actions through :class:`OSEnv` and keeps the
successes.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import re
import select
import shutil
import signal
import socket
import stat
import subprocess
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gymnasium
from gymnasium.error import ResetNeeded

from agentloop.config import ConfigError
from agentloop.envs.experts import replay_actions
from agentloop.envs.spaces import FreeText, unreadable_action
from agentloop.envs.tasks import choose_task, index_tasks
from agentloop.types import Task, Trajectory

logger = logging.getLogger(__name__)

ENV_NAME = "os"
SPLITS = ("train", "test", "dev")
TEST_SETS = ("1", "2", "3", "4", "5", "6", "7")
"""The AgentBench std sets that make up the ``test`` split, folders under ``tasks/``."""
TRAIN_SCRIPT_SET = "1"
"""The scripts folder the training tasks' check files are read from."""
HOME = "/root"
"""The agent's home and working directory inside the sandbox."""
SANDBOX_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
SCRATCH_DIRS = (HOME, "/home", "/tmp", "/var", "/usr/local", "/dev/shm")
"""The private, writable tmpfs mounts of every sandbox (besides ``/usr`` itself)."""
_SKELETON = ("/var/log", "/var/tmp", "/var/lib", "/var/cache", "/var/spool", "/var/mail", "/var/backups")
_SKELETON += ("/usr/local/bin", "/usr/local/sbin", "/usr/local/lib", "/usr/local/share", "/usr/local/etc")
_OUTPUT_KILL_BYTES = 1 << 20
"""A command that prints more than this is stopped."""
_REPLY_SLACK_S = 10.0
"""How much longer than a request's own time limit the host waits for the supervisor."""
_NOTE_SLACK = 300

FORMAT_HELP = (
    'Reply with "Act: bash" followed by a ```bash block of commands, '
    'with "Act: answer(<your answer>)", or with "Act: finish".'
)
_ACT_RE = re.compile(r"Act:\s*(\w*)", re.IGNORECASE)
_BASH_BLOCK_RE = re.compile(r"```[ \t]*(?:bash|sh|shell)?[ \t]*\n?(.*?)```", re.IGNORECASE | re.DOTALL)
_ANSWER_RE = re.compile(r"Act:\s*answer\s*\((.*)\)", re.IGNORECASE | re.DOTALL)


@dataclass
class OSEnvConfig:
    """Settings of the Operating System environment and its sandbox."""

    max_turns: int = 8
    """Assistant turns per episode (AgentBench allows 8 rounds)."""
    max_observation_chars: int = 800
    """Longer command output is cut to this many characters, with a note saying so."""
    max_action_chars: int = 8000
    """Longer actions are rejected as invalid without being run."""
    command_timeout_s: float = 10.0
    """Wall-clock limit of one agent command."""
    script_timeout_s: float = 30.0
    """Wall-clock limit of one init, example or check script."""
    cpu_time_s: int = 30
    """CPU seconds any one process of the sandbox may use (RLIMIT_CPU)."""
    max_processes: int = 128
    """Processes and threads the sandbox may hold at once (RLIMIT_NPROC of its uid)."""
    memory_mb: int = 1024
    """Address space of any one process, in MiB (RLIMIT_AS)."""
    max_file_mb: int = 16
    """Largest file a process may write, in MiB (RLIMIT_FSIZE)."""
    scratch_mb: int = 64
    """Size of each private writable mount (home, /home, /tmp, /var, /usr/local, /dev/shm), MiB."""
    uid_base: int = 61000
    """First host uid the sandboxes run under; each live environment claims its own."""
    uid_count: int = 1000
    """How many uids from ``uid_base`` on may be claimed."""

    def validate(self) -> None:
        """Checks every limit is positive and the uids are unprivileged.

        Raises:
            ConfigError: Naming the first field out of range.
        """
        for name in (
            "max_turns",
            "max_observation_chars",
            "max_action_chars",
            "cpu_time_s",
            "max_file_mb",
            "scratch_mb",
            "uid_count",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.max_processes < 8:
            raise ConfigError(f"max_processes must be at least 8, got {self.max_processes}")
        if self.memory_mb < 64:
            raise ConfigError(f"memory_mb must be at least 64, got {self.memory_mb}")
        for name in ("command_timeout_s", "script_timeout_s"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if not 1000 <= self.uid_base < 2**31 - self.uid_count:
            raise ConfigError(f"uid_base must be an unprivileged uid (>= 1000), got {self.uid_base}")


# --- tasks --------------------------------------------------------------------------------


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

    Raises:
        ValueError: For an unknown split or a malformed task.
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
        return [
            _parse_task(e, path, "train", f"train-{i:04d}", "train", scripts) for i, (path, e) in enumerate(entries)
        ]
    if split == "dev":
        entries = _read_entries(root / "tasks" / "dev.json")
        return [
            _parse_task(e, path, "dev", f"dev-{i:04d}", "dev", root / "scripts" / "dev")
            for i, (path, e) in enumerate(entries)
        ]
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


# --- the sandbox --------------------------------------------------------------------------

_SUPERVISOR = r"""
import json, os, re, select, signal, subprocess, sys, time
import ctypes
ctypes.CDLL(None).prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE 0: the agent cannot trace us or open our pipes
ENV = {"HOME": "/root", "USER": "root", "LOGNAME": "root", "SHELL": "/bin/bash", "TERM": "dumb",
       "LANG": "C.UTF-8", "PATH": sys.argv[1]}
KILL_BYTES = int(sys.argv[2])
shell = None
tracked = set()  # our own children, waited for by their Popen: reap() must leave them alone

def members(pgid):
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit() and int(name) != 1:
            try:
                if os.getpgid(int(name)) == pgid:
                    found.append(int(name))
            except OSError:
                pass
    return found

def kill_group(pgid, spare=()):
    for _ in range(50):
        victims = [p for p in members(pgid) if p not in spare]
        if not victims:
            return
        for pid in victims:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        reap()
        time.sleep(0.005)

def reap():
    for name in os.listdir("/proc"):
        if name.isdigit() and int(name) not in tracked:
            try:
                with open("/proc/%s/stat" % name) as f:
                    stat = f.read().rsplit(")", 1)[1].split()
                if stat[0] == "Z" and stat[1] == "1":
                    os.waitpid(int(name), os.WNOHANG)
            except (OSError, IndexError, ChildProcessError):
                pass

def start_shell():
    global shell
    shell = subprocess.Popen(["/bin/bash", "--noprofile", "--norc"], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd="/root", env=ENV,
                             start_new_session=True)
    tracked.add(shell.pid)

def stop_shell():
    global shell
    if shell is not None:
        kill_group(shell.pid)
        shell.wait()
        tracked.discard(shell.pid)
        shell = None

def quote(text):
    out = []
    for byte in text.encode("utf-8", "replace"):
        ch = chr(byte)
        if ch == "\\" or ch == "'":
            out.append("\\" + ch)
        elif 32 <= byte < 127:
            out.append(ch)
        else:
            out.append("\\x%02x" % byte)
    return "$'" + "".join(out) + "'"

def collect(fd, deadline, limit, on_expire, marker=None, proc=None):
    # Reads fd until EOF, the marker, or (given proc) proc's exit and what it left in the pipe;
    # returns (head, total, found, expired, overflow).
    head, tail, total, expired, overflow = bytearray(), b"", 0, False, False
    while True:
        if proc is not None and proc.poll() is not None and not select.select([fd], [], [], 0)[0]:
            return bytes(head), total, None, expired, overflow
        left = deadline - time.monotonic()
        if left <= 0 or (total > KILL_BYTES and not overflow):
            if expired:
                return bytes(head), total, None, True, overflow
            overflow = overflow or total > KILL_BYTES
            expired = left <= 0
            on_expire()
            deadline = time.monotonic() + 1.0
            continue
        ready, _, _ = select.select([fd], [], [], min(left, 0.2 if proc is None else 0.01))
        if not ready:
            if proc is None:
                reap()
            continue
        chunk = os.read(fd, 65536)
        if not chunk:
            return bytes(head), total, None, expired, overflow
        window = tail + chunk
        start = total - len(tail)
        total += len(chunk)
        if len(head) < limit:
            head += chunk[: limit - len(head)]
        if marker is not None:
            found = marker.search(window)
            if found:
                end = start + found.start()
                return bytes(head[:end]), end, int(found.group(1)), expired, overflow
        tail = window[-64:]

def run(request):
    if shell is None or shell.poll() is not None:
        stop_shell()
        start_shell()
    token = os.urandom(12).hex()
    marker = re.compile(b"\n" + token.encode() + b":(-?\\d+)\n")
    script = "eval %s </dev/null\nprintf '\\n%%s:%%d\\n' %s \"$?\"\n" % (quote(request["cmd"]), token)
    try:
        shell.stdin.write(script.encode())
        shell.stdin.flush()
    except OSError:
        pass
    deadline = time.monotonic() + request["timeout"]
    pgid = shell.pid
    head, total, code, expired, overflow = collect(shell.stdout.fileno(), deadline, request["limit"],
                                                  lambda: kill_group(pgid, spare={pgid}), marker)
    reply = {"out": head.decode("utf-8", "replace"), "total": total, "code": code, "timeout": expired,
             "overflow": overflow, "restarted": False, "exited": None}
    if code is None:
        if shell.poll() is None:
            reply["restarted"] = True
        else:
            reply["exited"] = shell.returncode
        stop_shell()
        start_shell()
    return reply

def execute(request):
    proc = subprocess.Popen(request["argv"], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, cwd="/root", env=ENV, start_new_session=True)
    tracked.add(proc.pid)
    deadline = time.monotonic() + request["timeout"]
    head, total, _, expired, overflow = collect(proc.stdout.fileno(), deadline, request["limit"],
                                               lambda: kill_group(proc.pid), proc=proc)
    if expired or overflow:
        kill_group(proc.pid)
    code = proc.wait()
    tracked.discard(proc.pid)
    proc.stdout.close()  # background children it left keep running, as after docker exec
    return {"out": head.decode("utf-8", "replace"), "total": total, "code": None if expired else code,
            "timeout": expired, "overflow": overflow}

for name in os.listdir("/etc/skel"):  # a home like a fresh Ubuntu root's: .bashrc, .profile
    try:
        with open("/etc/skel/" + name, "rb") as src, open("/root/" + name, "wb") as dst:
            dst.write(src.read())
    except OSError:
        pass
start_shell()
sys.stdout.write('{"ready": true}\n')
sys.stdout.flush()
for line in sys.stdin:
    request = json.loads(line)
    reply = run(request) if request["op"] == "run" else execute(request)
    reap()
    sys.stdout.write(json.dumps(reply) + "\n")
    sys.stdout.flush()
"""


@dataclass(frozen=True)
class RunResult:
    """What a command or script printed and how it ended."""

    output: str
    """Its stdout and stderr, merged, cut to the requested limit."""
    total_bytes: int
    """How many bytes it printed in all."""
    exit_code: int | None
    """Its exit status; None when it was stopped or the shell was replaced."""
    timed_out: bool = False
    """It ran past its wall-clock limit and was stopped."""
    overflow: bool = False
    """It printed more than 1 MiB and was stopped."""
    shell_restarted: bool = False
    """The agent's shell was stuck and was replaced by a fresh one."""
    shell_exited: int | None = None
    """The agent's shell exited (with this status) and was replaced by a fresh one."""


class SandboxError(RuntimeError):
    """The sandbox could not start, or stopped answering."""


class UidLease:
    """A host uid claimed for one environment's sandboxes, held while the object lives.

    The claim is an abstract Unix socket named after the uid: the kernel frees it when the
    socket is closed or the process dies, so no lock file is ever left behind.
    """

    def __init__(self, base: int, count: int) -> None:
        self.uid = -1
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        for uid in range(base, base + count):
            try:
                self._socket.bind(f"\0agentloop-os-sandbox-uid-{uid}")
            except OSError:
                continue
            self.uid = uid
            return
        self._socket.close()
        raise SandboxError(f"all sandbox uids {base}..{base + count - 1} are in use")

    def release(self) -> None:
        """Gives the uid back."""
        self._socket.close()


def uid_processes(uid: int) -> list[int]:
    """The host pids of the live processes of ``uid`` (owner of their /proc entry).

    Zombies are left out: they hold nothing but a pid until the host's init reaps them.
    """
    pids = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            with contextlib.suppress(OSError, IndexError):
                if os.stat(f"/proc/{name}").st_uid != uid:
                    continue
                with open(f"/proc/{name}/stat", "rb") as stat:
                    if stat.read().rsplit(b")", 1)[1].split()[0] != b"Z":
                        pids.append(int(name))
    return pids


@functools.cache
def unreadable_system_dirs() -> tuple[str, ...]:
    """Folders of the host's ``/usr`` and ``/etc`` that others may not list (e.g. ``/etc/ssl/private``).

    The sandbox's root is nobody outside, so it could not list them, and every ``find /usr``
    would print "Permission denied" where AgentBench's root sees a quiet tree: each is
    covered with an empty read-only folder. Walked once per process (under a second).
    """
    found = []
    for top in ("/usr", "/etc"):
        for parent, dirs, _ in os.walk(top):
            for name in dirs:
                path = os.path.join(parent, name)
                with contextlib.suppress(OSError):
                    mode = os.lstat(path).st_mode
                    if stat.S_ISDIR(mode) and mode & 0o005 != 0o005 and not path.startswith("/usr/local/"):
                        found.append(path)
    return tuple(found)


def bwrap_argv(config: OSEnvConfig) -> list[str]:
    """The ``prlimit`` + ``bwrap`` + supervisor command line of a sandbox."""
    bwrap = shutil.which("bwrap")
    prlimit = shutil.which("prlimit")
    if bwrap is None or prlimit is None:
        raise SandboxError("the OS environment needs bubblewrap and prlimit: apt-get install bubblewrap util-linux")
    mib = 1 << 20
    argv = [
        prlimit,
        f"--nproc={config.max_processes}",
        f"--as={config.memory_mb * mib}",
        f"--fsize={config.max_file_mb * mib}",
        f"--cpu={config.cpu_time_s}",
        "--core=0",
        "--nofile=1024",
        "--",
        bwrap,
        "--unshare-all",
        "--unshare-user",
        "--disable-userns",
        "--cap-drop",
        "ALL",
        "--uid",
        "0",
        "--gid",
        "0",
        "--hostname",
        "sandbox",
        "--die-with-parent",
        "--new-session",
        "--as-pid-1",
        "--clearenv",
        "--ro-bind",
        "/etc",
        "/etc",
        "--size",
        str(config.scratch_mb * mib),
        "--perms",
        "0755",
        "--tmpfs",
        "/usr",
    ]
    for name in sorted(os.listdir("/usr")):  # /usr's own entries are private, its folders the host's
        host = Path("/usr") / name
        if host.is_symlink():
            argv += ["--symlink", os.readlink(host), str(host)]
        elif name != "local":
            argv += ["--ro-bind", str(host), str(host)]
    for name in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):
        host = Path("/") / name
        if host.is_symlink():
            argv += ["--symlink", os.readlink(host), str(host)]
        elif host.is_dir():
            argv += ["--ro-bind", str(host), str(host)]
    for path in unreadable_system_dirs():
        argv += ["--size", "4096", "--tmpfs", path, "--remount-ro", path]
    argv += ["--proc", "/proc", "--dev", "/dev", "--remount-ro", "/dev"]
    for path in SCRATCH_DIRS:
        argv += ["--size", str(config.scratch_mb * mib), "--perms", "0755", "--tmpfs", path]
    for path in _SKELETON:
        argv += ["--dir", path]
    argv += ["--chmod", "1777", "/tmp", "--chmod", "1777", "/dev/shm", "--chmod", "0700", HOME]
    argv += ["--remount-ro", "/", "--chdir", HOME, "--setenv", "PATH", SANDBOX_PATH]
    argv += ["/usr/bin/python3", "-I", "-S", "-c", _SUPERVISOR, SANDBOX_PATH, str(_OUTPUT_KILL_BYTES)]
    return argv


class Sandbox:
    """One bubblewrap sandbox with its supervisor and the agent's persistent shell."""

    def __init__(self, config: OSEnvConfig, uid: int) -> None:
        if os.geteuid() != 0:
            raise SandboxError("the OS sandbox must be started by root, to run it under its own unprivileged uid")
        self.config = config
        self.uid = uid
        self._buffer = b""
        self._proc = subprocess.Popen(
            bwrap_argv(config),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            user=uid,
            group=uid,
            extra_groups=[],
            start_new_session=True,
            env={"PATH": "/usr/bin:/bin"},
            cwd="/",
        )
        try:
            ready = self._reply(time.monotonic() + _REPLY_SLACK_S)
        except SandboxError:
            self.close()
            raise
        if not ready.get("ready"):
            self.close()
            raise SandboxError(f"unexpected first message from the sandbox: {ready!r}")

    @property
    def alive(self) -> bool:
        """Whether the sandbox is still running."""
        return self._proc.poll() is None

    def run(self, command: str, timeout: float, limit: int) -> RunResult:
        """Runs ``command`` in the agent's persistent shell and returns its output (``limit`` bytes at most)."""
        reply = self._request({"op": "run", "cmd": command, "timeout": timeout, "limit": limit}, timeout)
        return RunResult(
            output=reply["out"],
            total_bytes=reply["total"],
            exit_code=reply["code"],
            timed_out=reply["timeout"],
            overflow=reply["overflow"],
            shell_restarted=reply["restarted"],
            shell_exited=reply["exited"],
        )

    def execute(self, script: Script, args: Sequence[str], timeout: float, limit: int) -> RunResult:
        """Runs ``script`` as a fresh process (not in the agent's shell) with ``args``."""
        clean = [a.encode("utf-8", "replace").decode("utf-8").replace("\0", "") for a in args]
        if script.language == "python":
            argv = ["python3", "-c", script.code, *clean]
        else:
            argv = ["bash", "-c", script.code, "script", *clean]
        reply = self._request({"op": "exec", "argv": argv, "timeout": timeout, "limit": limit}, timeout)
        return RunResult(reply["out"], reply["total"], reply["code"], reply["timeout"], reply["overflow"])

    def close(self) -> None:
        """Kills the sandbox and waits until none of its processes is left."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self._proc.pid, signal.SIGKILL)
        self._proc.wait()
        for stream in (self._proc.stdin, self._proc.stdout, self._proc.stderr):
            with contextlib.suppress(OSError):
                stream.close()
        deadline = time.monotonic() + 5.0
        while leftovers := uid_processes(self.uid):
            if time.monotonic() > deadline:
                for pid in leftovers:  # only the sandbox's own uid: never another process
                    with contextlib.suppress(OSError):
                        os.kill(pid, signal.SIGKILL)
                deadline = time.monotonic() + 5.0
            time.sleep(0.002)

    def _request(self, request: dict[str, Any], timeout: float) -> dict[str, Any]:
        if not self.alive:
            raise SandboxError("the sandbox is not running")
        try:
            self._proc.stdin.write(json.dumps(request).encode() + b"\n")
            self._proc.stdin.flush()
        except OSError as e:
            raise SandboxError(f"cannot reach the sandbox: {e}") from e
        return self._reply(time.monotonic() + timeout + _REPLY_SLACK_S)

    def _reply(self, deadline: float) -> dict[str, Any]:
        fd = self._proc.stdout.fileno()
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            ready = select.select([fd], [], [], max(left, 0))[0] if left > 0 else []
            if not ready:
                raise SandboxError("the sandbox did not answer in time")
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                error = self._proc.stderr.read(2000).decode(errors="replace") if self._proc.poll() is not None else ""
                raise SandboxError(f"the sandbox stopped: {error.strip()}")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return json.loads(line)


# --- actions, observations and scoring ----------------------------------------------------


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
    if result.timed_out:
        notes.append(f"The command ran longer than {config.command_timeout_s:g} s and was stopped.")
    if result.overflow:
        notes.append("The command printed more than 1 MiB and was stopped.")
    if result.shell_restarted:
        notes.append("The shell did not recover and was replaced: variables and the directory were reset.")
    if result.shell_exited is not None:
        notes.append(f"The shell exited (status {result.shell_exited}); a fresh shell was started in {HOME}.")
    return "\n".join([text, *notes])


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


# --- the environment ----------------------------------------------------------------------


class OSEnv(gymnasium.Env[str, str]):
    """Gymnasium environment over AgentBench OS tasks, one fresh sandbox per episode.

    ``reset(options={"task_id": ...})`` picks a task (otherwise one is drawn with the env's
    seeded generator), starts its sandbox and runs its setup; ``info["task"]`` is its
    :class:`~agentloop.types.Task`. ``step`` returns ``info`` with ``invalid`` (the action
    broke the protocol), ``success``, ``exit_code`` (of a command; None otherwise) and
    ``timed_out``. ``step`` before ``reset`` or after the episode ended raises
    :class:`gymnasium.error.ResetNeeded`. The env holds one host uid from ``reset`` until
    ``close``.
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
        self._set_up(task, self._sandbox)
        self._task, self._turns, self._done = task, 0, False
        return initial_observation(task, self.config), {"task": task.task}

    def step(self, action: str) -> tuple[str, float, bool, bool, dict[str, Any]]:
        """Runs one action; see the module docstring for the protocol and the scoring."""
        if self._sandbox is None or self._task is None or self._done:
            raise ResetNeeded("OSEnv.step() needs an episode in progress: call reset() first")
        self._turns += 1
        parsed = parse_action(action, self.config.max_action_chars)
        info: dict[str, Any] = {"invalid": isinstance(parsed, str), "success": False, "exit_code": None}
        info["timed_out"] = False
        reward, terminated = 0.0, False
        if isinstance(parsed, str):
            observation = parsed
        elif parsed.kind == "bash":
            observation, info["exit_code"], info["timed_out"], terminated = self._command(parsed.body)
        else:
            success = self._score(parsed.body)
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

    def _command(self, commands: str) -> tuple[str, int | None, bool, bool]:
        """Runs the agent's commands; a sandbox that stopped answering ends the episode."""
        assert self._sandbox is not None
        limit = self.config.max_observation_chars * 4 + 4
        try:
            result = self._sandbox.run(commands, self.config.command_timeout_s, limit)
        except SandboxError as e:
            logger.warning("sandbox failed during a command: %s", e)
            return "The machine stopped responding; the task is over.", None, True, True
        return command_observation(result, self.config), result.exit_code, result.timed_out, False

    def _score(self, answer: str) -> bool:
        assert self._sandbox is not None and self._task is not None
        try:
            return score(self._task, self._sandbox, answer, self.config)
        except SandboxError as e:
            logger.warning("sandbox failed while scoring %s: %s", self._task.task.task_id, e)
            return False

    def _set_up(self, task: OSTask, sandbox: Sandbox) -> None:
        """Runs the task's init scripts, then its start command in the agent's shell.

        A bash init script first seeds ``$RANDOM`` from the task id, so every episode of a
        task starts from the same files (trajectories of one task stay comparable).
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

    def _choose(self, options: dict[str, Any]) -> OSTask:
        return choose_task(self.tasks, options, self.np_random)

    def _close_sandbox(self) -> None:
        if self._sandbox is not None:
            self._sandbox.close()
            self._sandbox = None


# --- expert demonstrations ----------------------------------------------------------------


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
    steps = [] if example is None else [_bash(_as_bash(example))]
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


def _as_bash(script: Script) -> str:
    if script.language == "bash":
        return script.code
    return "python3 -c " + "'" + script.code.replace("'", "'\\''") + "'"


def _example_output(task: OSTask, env: OSEnv) -> str | None:
    """What the example prints in a fresh episode of the task, stripped; None if it fails."""
    env.reset(options={"task_id": task.task.task_id})
    assert env._sandbox is not None
    try:
        result = env._sandbox.run(_as_bash(task.example or Script("bash", "")), env.config.command_timeout_s, 1 << 16)
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
        "by_set": _tally(tasks, demos, lambda t: t.task_set),
        "by_kind": _tally(tasks, demos, lambda t: t.task.kind),
        "no_actions": no_actions,
        "failed": failed,
    }
    for name, row in sorted(report["by_set"].items()):
        logger.info("os experts, set %s: %d/%d succeeded", name, row["succeeded"], row["attempted"])
    return list(demos.values()), report


def _tally(tasks: Sequence[OSTask], demos: dict[str, Trajectory], key: Any) -> dict[str, dict[str, int]]:
    table: dict[str, dict[str, int]] = {}
    for task in tasks:
        row = table.setdefault(key(task), {"attempted": 0, "succeeded": 0})
        row["attempted"] += 1
        row["succeeded"] += int(task.task.task_id in demos)
    return table
