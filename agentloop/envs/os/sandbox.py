"""The bubblewrap sandbox of one episode: its launch, its limits, and requests to its supervisor."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import select
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agentloop.envs.os.cgroups import CgroupError, EpisodeCgroup, hierarchies, launcher_argv
from agentloop.envs.os.config import SCRATCH_DIRS, OSEnvConfig
from agentloop.envs.os.tasks import Script

logger = logging.getLogger(__name__)


HOME = "/root"
"""The agent's home and working directory inside the sandbox."""
SANDBOX_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
"""The PATH of the agent's shell (Ubuntu's)."""
TOOLS = "/run/agentloop"
"""Where the sandbox sees the trusted tools of the checks (:func:`trusted_tools`), read-only."""
IO_DIR = "/run/agentloop-io"
"""The supervisor's private tmpfs for the FIFO that carries each command's output."""
SYSTEM_PATH = f"{TOOLS}/bin:/usr/sbin:/usr/bin:/sbin:/bin"
"""The read-only part of the checks' PATH."""
CHECK_PATH = f"{SYSTEM_PATH}:/usr/local/sbin:/usr/local/bin"
"""The PATH of the bash checks: read-only folders first, so a program the agent writes (a ``calc``
a task asks for) is found, but never instead of a system program."""
_SKELETON = ("/var/log", "/var/tmp", "/var/lib", "/var/cache", "/var/spool", "/var/mail", "/var/backups")
_SKELETON += ("/usr/local/bin", "/usr/local/sbin", "/usr/local/lib", "/usr/local/share", "/usr/local/etc")
_USR_STANDARD = ("bin", "sbin", "lib", "lib32", "lib64", "libx32", "libexec")
"""Folders of ``/usr`` that programs look into: covered, read-only and empty, where the host has none."""
_OUTPUT_KILL_BYTES = 1 << 20
"""A command that prints more than this is stopped."""
_REPLY_SLACK_S = 10.0
"""How much longer than a request's own time limit the host waits for the supervisor."""
_TOOLS_HOST = Path("/run/agentloop-os")
"""Where the host keeps the trusted tools (root's own tmpfs on most systems), one folder per version."""
_PYVENV = "home = /usr/bin\ninclude-system-site-packages = false\n"


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
    stopped_before: int = 0
    """Processes left by earlier commands, stopped before this one because the episode reached its
    process limit."""
    stopped_after: int = 0
    """Processes this command left, stopped because it timed out, printed too much or reached the
    process limit."""
    plants: tuple[str, ...] = ()
    """Files that appeared where they could change what a check runs (see the supervisor's ``scan``)."""


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


@functools.cache
def trusted_tools() -> Path:
    """The host folder of the checks' trusted interpreters, made once per version of the host's binaries.

    It holds ``bin/bash`` and ``bin/python3``, copies of the host's, owned by root and
    *execute-only* (mode 0711): the kernel marks a process that runs a binary it cannot read
    as not dumpable, so no process of the sandbox (same uid) can trace a check's shell or
    python or open their memory, even a program of the agent's that the check itself runs.
    Beside ``bin``, a ``pyvenv.cfg`` makes that python a virtual environment of
    ``/usr/bin`` without site packages: no ``.pth`` file or ``sitecustomize`` the agent
    writes (in ``/usr/local`` or ``~/.local``) is read by it. The sandbox sees the folder
    read-only at ``TOOLS``.

    Raises:
        SandboxError: When the folder cannot be made or is not root's alone.
    """
    sources = {name: Path(shutil.which(name, path="/usr/bin:/bin") or name).resolve() for name in ("bash", "python3")}
    digest = hashlib.sha256(_PYVENV.encode())
    for name, source in sources.items():
        if not source.is_file():
            raise SandboxError(f"the OS sandbox needs the host's {name}, not found")
        info = source.stat()
        digest.update(f"{name} {source} {info.st_size} {info.st_mtime_ns} {info.st_ino}".encode())
    folder = _TOOLS_HOST / digest.hexdigest()[:16]
    try:
        _TOOLS_HOST.mkdir(mode=0o755, exist_ok=True)
        _check_root_only(_TOOLS_HOST)
        if not folder.exists():
            building = Path(tempfile.mkdtemp(prefix=".building-", dir=_TOOLS_HOST))
            (building / "bin").mkdir(mode=0o755)
            for name, source in sources.items():
                shutil.copyfile(source, building / "bin" / name)
                os.chmod(building / "bin" / name, 0o711)
            (building / "pyvenv.cfg").write_text(_PYVENV)
            os.chmod(building, 0o755)
            try:
                building.rename(folder)
            except OSError:  # another process made it first
                shutil.rmtree(building)
        for path in (folder, folder / "bin", folder / "bin" / "bash", folder / "bin" / "python3"):
            _check_root_only(path)
    except OSError as e:
        raise SandboxError(f"cannot make the checks' trusted tools in {_TOOLS_HOST}: {e}") from e
    return folder


def _check_root_only(path: Path) -> None:
    info = path.lstat()
    if info.st_uid != 0 or info.st_mode & 0o022 or stat.S_ISLNK(info.st_mode):
        raise SandboxError(f"{path} must belong to root and be writable by root alone")


@functools.cache
def covered_paths() -> tuple[str, ...]:
    """Paths in the sandbox's writable mounts covered with empty read-only folders.

    ``/usr/pyvenv.cfg`` (python reads it beside its ``bin`` folder's parent: a file there
    would re-point ``/usr/bin/python3``'s standard library); the standard folders of ``/usr``
    the host lacks (programs and the loader look into them); and each folder the host's
    dynamic-loader cache points into that would be writable in the sandbox (such as
    ``/usr/local/cuda-13.0`` here: a library planted there would be loaded by name). Each
    cover's parent is itself a mount point, so it cannot be moved or renamed away.
    """
    paths = ["/usr/pyvenv.cfg"]
    paths += [f"/usr/{name}" for name in _USR_STANDARD if not os.path.lexists(f"/usr/{name}")]
    for folder in _loader_cache_folders():
        for mount in SCRATCH_DIRS:
            if folder.startswith(mount + "/"):
                top = folder[: len(mount) + 1] + folder[len(mount) + 1 :].split("/")[0]
                if mount != "/usr" or not os.path.lexists(top):  # host folders of /usr are bound read-only
                    paths.append(top)
                break
    return tuple(dict.fromkeys(paths))


def _loader_cache_folders() -> set[str]:
    ldconfig = shutil.which("ldconfig", path="/usr/sbin:/sbin:/usr/bin:/bin")
    if ldconfig is None:
        return set()
    try:
        listing = subprocess.run([ldconfig, "-p"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return set()
    return {os.path.dirname(line.rsplit("=> ", 1)[1].strip()) for line in listing.splitlines() if "=> /" in line}


def bwrap_argv(config: OSEnvConfig) -> list[str]:
    """The ``prlimit`` + ``bwrap`` + supervisor command line of a sandbox."""
    bwrap, prlimit = shutil.which("bwrap"), shutil.which("prlimit")
    if bwrap is None or prlimit is None or not os.path.exists("/usr/bin/setpriv"):
        raise SandboxError(
            "the OS environment needs bubblewrap, prlimit and setpriv: apt-get install bubblewrap util-linux"
        )
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
    for path in SCRATCH_DIRS[:-1]:  # /usr is mounted above
        argv += ["--size", str(config.scratch_mb * mib), "--perms", "0755", "--tmpfs", path]
    for path in _SKELETON:
        argv += ["--dir", path]
    for path in covered_paths():
        argv += ["--size", "4096", "--perms", "0755", "--tmpfs", path, "--remount-ro", path]
    argv += ["--ro-bind", str(trusted_tools()), TOOLS]
    argv += ["--size", "65536", "--perms", "0700", "--tmpfs", IO_DIR]
    argv += ["--chmod", "1777", "/tmp", "--chmod", "1777", "/dev/shm", "--chmod", "0700", HOME]
    argv += ["--remount-ro", "/", "--chdir", HOME, "--setenv", "PATH", SANDBOX_PATH]
    settings = supervisor_settings(config)
    argv += ["/usr/bin/python3", "-I", "-S", "-c", supervisor_source(), json.dumps(settings)]
    return argv


def supervisor_settings(config: OSEnvConfig) -> dict[str, Any]:
    """The supervisor's settings (its one JSON argument)."""
    return {
        "path": SANDBOX_PATH,
        "check_path": CHECK_PATH,
        "system_path": SYSTEM_PATH,
        "tools": f"{TOOLS}/bin",
        "io": IO_DIR,
        "kill_bytes": _OUTPUT_KILL_BYTES,
        "process_limit": min(config.max_processes, config.episode_processes),
    }


class Sandbox:
    """One bubblewrap sandbox with its supervisor, the agent's persistent shell and its cgroups."""

    def __init__(self, config: OSEnvConfig, uid: int) -> None:
        if os.geteuid() != 0:
            raise SandboxError("the OS sandbox must be started by root, to run it under its own unprivileged uid")
        self.config = config
        self.uid = uid
        self._buffer = b""
        self.cgroup: EpisodeCgroup | None = None
        if hierarchies():
            try:
                self.cgroup = EpisodeCgroup(config.episode_memory_mb << 20, config.episode_processes)
            except CgroupError as e:
                raise SandboxError(str(e)) from e
        self._limit_hits = 0
        procs = [] if self.cgroup is None else self.cgroup.procs_files
        try:
            self._proc = subprocess.Popen(
                launcher_argv(procs, uid, bwrap_argv(config)),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                start_new_session=True,
                env={"PATH": "/usr/bin:/bin"},
                cwd="/",
            )
        except (OSError, SandboxError):
            self._remove_cgroup()
            raise
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
        """Runs ``command`` in the agent's persistent shell and returns its output (``limit`` bytes at most).

        Before it, when the episode reached its process limit since the last cleanup (or the
        setup), every process but the shell and the task's own is stopped (``stopped_before``).
        """
        hits = self.cgroup.pids_limit_hits() if self.cgroup is not None else 0
        request = {"op": "run", "cmd": command, "timeout": timeout, "limit": limit, "clean": hits > self._limit_hits}
        reply = self._request(request, timeout)
        self._limit_hits = hits if request["clean"] else self._limit_hits  # hits after the cleanup: next time
        return RunResult(
            output=reply["out"],
            total_bytes=reply["total"],
            exit_code=reply["code"],
            timed_out=reply["timeout"],
            overflow=reply["overflow"],
            shell_restarted=reply["restarted"],
            shell_exited=reply["exited"],
            stopped_before=reply["stopped_before"],
            stopped_after=reply["stopped_after"],
            plants=tuple(reply["plants"]),
        )

    def execute(self, script: Script, args: Sequence[str], timeout: float, limit: int) -> RunResult:
        """Runs ``script`` as a fresh process (not in the agent's shell) with ``args``, in the agent's environment."""
        return self._script("exec", script, args, timeout, limit, False)

    def check(self, script: Script, args: Sequence[str], timeout: float, limit: int) -> RunResult:
        """Runs a check script, after killing every other process of the sandbox, with the trusted tools."""
        return self._script("check", script, args, timeout, limit, True)

    def begin(self) -> None:
        """Marks the end of the task's setup (its processes and files are the task's own)."""
        self._request({"op": "begin"}, _REPLY_SLACK_S)
        self._limit_hits = self.cgroup.pids_limit_hits() if self.cgroup is not None else 0

    def stop(self) -> tuple[str, ...]:
        """Kills every process in the sandbox but its supervisor; returns the plants found since the last look."""
        return tuple(self._request({"op": "stop"}, _REPLY_SLACK_S)["plants"])

    def close(self) -> None:
        """Kills the sandbox, waits until none of its processes is left and removes its cgroups."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self._proc.pid, signal.SIGKILL)
        self._proc.wait()
        for stream in (self._proc.stdin, self._proc.stdout, self._proc.stderr):
            with contextlib.suppress(OSError):
                stream.close()
        self._remove_cgroup()
        deadline = time.monotonic() + 5.0
        while leftovers := uid_processes(self.uid):
            if time.monotonic() > deadline:
                for pid in leftovers:  # only the sandbox's own uid: never another process
                    with contextlib.suppress(OSError):
                        os.kill(pid, signal.SIGKILL)
                deadline = time.monotonic() + 5.0
            time.sleep(0.002)

    def _remove_cgroup(self) -> None:
        if self.cgroup is not None:
            try:
                self.cgroup.remove()
            except CgroupError as e:
                logger.warning("%s", e)

    def _script(
        self, op: str, script: Script, args: Sequence[str], timeout: float, limit: int, trusted: bool
    ) -> RunResult:
        clean = [a.encode("utf-8", "replace").decode("utf-8").replace("\0", "") for a in args]
        request = {"op": op, "language": script.language, "code": script.code, "args": clean, "trusted": trusted}
        reply = self._request({**request, "timeout": timeout, "limit": limit}, timeout)
        return RunResult(reply["out"], reply["total"], reply["code"], reply["timeout"], reply["overflow"])

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
