"""The bubblewrap sandbox of one episode: its launch, its limits, and requests to its supervisor."""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import select
import shutil
import signal
import socket
import stat
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agentloop.envs.os.config import OSEnvConfig
from agentloop.envs.os.tasks import Script

logger = logging.getLogger(__name__)


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
def supervisor_source() -> str:
    """The text of :mod:`agentloop.envs.os.supervisor`, which the sandbox's python3 runs as pid 1."""
    return Path(__file__).with_name("supervisor.py").read_text(encoding="utf-8")


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
    argv += ["/usr/bin/python3", "-I", "-S", "-c", supervisor_source(), SANDBOX_PATH, str(_OUTPUT_KILL_BYTES)]
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
