"""Each sandbox's own cgroups: the memory and process limits of an episode as a whole.

A sandbox's processes are launched straight into a memory group and a pids group made for
that sandbox alone (see :func:`launcher_argv`), so no process of an episode ever runs
outside them; the groups are removed with the sandbox.

Both hierarchies are supported, each controller wherever this host offers it:

- cgroup v1 (``/sys/fs/cgroup/memory``, ``/sys/fs/cgroup/pids``): ``memory.limit_in_bytes``
  and, when swap accounting exists, ``memory.memsw.limit_in_bytes`` (no swap at all);
  ``pids.max``. Groups are made inside the group this process is in (read from
  ``/proc/self/cgroup``), so any limit of ours still applies to them.
- cgroup v2: ``memory.max``, ``memory.swap.max`` (0), ``pids.max``, ``cgroup.kill``. Groups
  are made beside this process's group (a v2 group that holds processes cannot have
  children with controllers), or in the root when this process is in the root.

Where a controller has no writable hierarchy (e.g. an unprivileged container), its limit
falls back to what ``prlimit`` enforces, with one warning per process: without ``memory``,
the episode's total memory is NOT bounded (only each process's address space,
``memory_mb``, and each tmpfs's size, ``scratch_mb``); without ``pids``, processes are
bounded by ``RLIMIT_NPROC`` of the sandbox's own uid (``max_processes``), which is still
per episode, but limit hits are then noticed by counting processes instead of from
``pids.events``.

Groups are named ``agentloop-os-<owner pid>-<owner start time>-<n>``: groups whose owner
is gone (a host process killed before it could remove them) are removed when this process
makes its first group.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import os
import re
import signal
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

CONTROLLERS = ("memory", "pids")
PREFIX = "agentloop-os-"
_NAME_RE = re.compile(re.escape(PREFIX) + r"(\d+)-(\d+)-\d+")
_SEQUENCE = itertools.count()


class CgroupError(RuntimeError):
    """A group could not be made, limited or removed."""


@dataclass(frozen=True)
class Hierarchy:
    """Where one controller's groups are made on this host."""

    controller: str
    """``memory`` or ``pids``."""
    version: int
    """1 or 2."""
    parent: Path
    """The folder new groups are made in."""


def find_hierarchies(mountinfo: str, own_groups: str) -> dict[str, Hierarchy]:
    """Where each controller could get its groups, from ``/proc/self/mountinfo`` and ``/proc/self/cgroup``.

    Only the layout is read here (writability is probed by :func:`hierarchies`).
    """
    own: dict[str, str] = {}
    for line in own_groups.splitlines():
        _, controllers, path = line.split(":", 2)
        for controller in controllers.split(",") if controllers else [""]:
            own[controller] = path
    found: dict[str, Hierarchy] = {}
    for line in mountinfo.splitlines():
        fields = line.split()
        if " - " not in line:
            continue
        root, mountpoint = fields[3], fields[4]
        fstype, *rest = line.split(" - ", 1)[1].split()
        options = rest[1].split(",") if len(rest) > 1 else []
        if fstype == "cgroup":
            for controller in CONTROLLERS:
                if controller in options and controller in own and controller not in found:
                    group = _inside(Path(mountpoint), root, own[controller])
                    found[controller] = Hierarchy(controller, 1, group)
        elif fstype == "cgroup2" and "" in own:
            group = _inside(Path(mountpoint), root, own[""])
            parent = group if group == Path(mountpoint) else group.parent
            with contextlib.suppress(OSError):
                available = (group / "cgroup.controllers").read_text().split()
                for controller in CONTROLLERS:
                    if controller in available and controller not in found:
                        found[controller] = Hierarchy(controller, 2, parent)
    return found


def _inside(mountpoint: Path, root: str, path: str) -> Path:
    """The folder of group ``path`` under a mount of the hierarchy's ``root``."""
    relative = path[len(root) :] if root != "/" and path.startswith(root) else path
    return mountpoint / relative.lstrip("/")


_PROBE_LOCK = threading.Lock()


def hierarchies() -> dict[str, Hierarchy]:
    """The hierarchies this process can make groups in (probed once: a group is made and removed).

    Logs once what is not enforced for each controller that has none. Safe to call from the
    rollout's environment threads: the first callers wait for one probe (concurrent probes of
    the same group name would see each other's group and give up the controller).
    """
    with _PROBE_LOCK:
        return _probe()


@functools.cache
def _probe() -> dict[str, Hierarchy]:
    try:
        layout = find_hierarchies(Path("/proc/self/mountinfo").read_text(), Path("/proc/self/cgroup").read_text())
    except OSError:
        layout = {}
    usable = {}
    for controller, hierarchy in layout.items():
        probe = hierarchy.parent / f"{PREFIX}probe-{os.getpid()}"
        try:
            if hierarchy.version == 2:
                _enable(hierarchy.parent, controller)
            probe.mkdir()
            probe.rmdir()
        except OSError as e:
            logger.debug("cannot make %s groups in %s: %s", controller, hierarchy.parent, e)
            continue
        usable[controller] = hierarchy
    if "memory" not in usable:
        logger.warning(
            "no writable memory cgroup: an OS episode's total memory (processes and tmpfs together) is NOT "
            "bounded here, only each process's address space (memory_mb) and each tmpfs's size (scratch_mb)"
        )
    if "pids" not in usable:
        logger.warning(
            "no writable pids cgroup: an OS episode's processes are bounded only by RLIMIT_NPROC of its uid "
            "(max_processes), and limit hits are found by counting processes"
        )
    if usable:
        remove_stale_groups(usable.values())
    return usable


def _enable(parent: Path, controller: str) -> None:
    """Lets children of a v2 group use ``controller`` (already so under systemd; needed at a bare root)."""
    control = parent / "cgroup.subtree_control"
    if controller not in control.read_text().split():
        control.write_text(f"+{controller}")


def owner_start_time(pid: int) -> int | None:
    """The start time of process ``pid`` (clock ticks after boot), None when it is gone."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def remove_stale_groups(found: Iterable[Hierarchy]) -> int:
    """Removes groups of ours whose owner process is gone; returns how many."""
    removed = 0
    for hierarchy in found:
        with contextlib.suppress(OSError):
            for entry in os.scandir(hierarchy.parent):
                match = _NAME_RE.fullmatch(entry.name)
                if match and owner_start_time(int(match.group(1))) != int(match.group(2)):
                    with contextlib.suppress(CgroupError):
                        _kill_and_remove(Path(entry.path), hierarchy.version, time.monotonic() + 5.0)
                        removed += 1
    if removed:
        logger.info("removed %d cgroups left by OS environments of processes that are gone", removed)
    return removed


class EpisodeCgroup:
    """The memory and pids groups of one sandbox (those this host offers)."""

    def __init__(self, memory_bytes: int, processes: int, available: dict[str, Hierarchy] | None = None) -> None:
        """Makes the groups and sets their limits.

        Raises:
            CgroupError: When a group cannot be made or limited (nothing is left behind).
        """
        found = hierarchies() if available is None else available
        start = owner_start_time(os.getpid())
        self.name = f"{PREFIX}{os.getpid()}-{start}-{next(_SEQUENCE)}"
        self.groups: dict[str, Path] = {}
        self.versions: dict[Path, int] = {}
        try:
            for controller, hierarchy in found.items():
                group = hierarchy.parent / self.name
                if group not in self.versions:
                    group.mkdir()
                    self.versions[group] = hierarchy.version
                self.groups[controller] = group
                if controller == "memory":
                    _limit_memory(group, hierarchy.version, memory_bytes)
                else:
                    _write(group / "pids.max", str(processes))
        except (OSError, CgroupError) as e:
            self.remove()
            raise CgroupError(f"cannot set up the sandbox's cgroups: {e}") from e

    @property
    def procs_files(self) -> list[str]:
        """The ``cgroup.procs`` files a process writes its pid to, to join every group."""
        return [str(group / "cgroup.procs") for group in self.versions]

    def pids(self) -> set[int]:
        """The host pids of the processes in the groups."""
        return {pid for group in self.versions for pid in _procs(group)}

    def pids_limit_hits(self) -> int:
        """How many times a fork failed at the process limit (0 without a pids group)."""
        group = self.groups.get("pids")
        return 0 if group is None else _counter(group / "pids.events", "max")

    def memory_peak(self) -> int | None:
        """The highest memory use of the episode so far, in bytes (None without a memory group)."""
        group = self.groups.get("memory")
        if group is None:
            return None
        name = "memory.max_usage_in_bytes" if self.versions[group] == 1 else "memory.peak"
        with contextlib.suppress(OSError, ValueError):
            return int((group / name).read_text())
        return None

    def oom_kills(self) -> int:
        """How many processes the kernel killed for the memory limit (0 without a memory group)."""
        group = self.groups.get("memory")
        if group is None:
            return 0
        name = "memory.oom_control" if self.versions[group] == 1 else "memory.events"
        return _counter(group / name, "oom_kill")

    def remove(self, timeout: float = 10.0) -> None:
        """Kills every process left in the groups and removes them.

        Raises:
            CgroupError: When a group still cannot be removed after ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        for group, version in list(self.versions.items()):
            _kill_and_remove(group, version, deadline)
            del self.versions[group]
        self.groups.clear()


def launcher_argv(procs_files: list[str], uid: int, command: list[str]) -> list[str]:
    """The command line that joins the groups as root, then becomes ``uid`` and runs ``command``.

    A ``/bin/sh`` writes its own pid to each ``cgroup.procs`` and then ``exec``s
    ``setpriv`` (same process), which drops every id to ``uid`` and every capability before
    it ``exec``s ``command``: nothing of the sandbox ever runs outside the groups or as root.
    """
    join = 'while [ "$1" != -- ]; do echo $$ > "$1" || exit 125; shift; done; shift; exec "$@"'
    setpriv = ["/usr/bin/setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups"]
    return ["/bin/sh", "-c", join, "agentloop-sandbox", *procs_files, "--", *setpriv, *command]


def _limit_memory(group: Path, version: int, limit: int) -> None:
    if version == 1:
        _write(group / "memory.limit_in_bytes", str(limit))
        if (group / "memory.memsw.limit_in_bytes").exists():  # swap accounting: no swap either
            _write(group / "memory.memsw.limit_in_bytes", str(limit))
    else:
        _write(group / "memory.max", str(limit))
        if (group / "memory.swap.max").exists():
            _write(group / "memory.swap.max", "0")


def _write(path: Path, value: str) -> None:
    try:
        path.write_text(value)
    except OSError as e:
        raise CgroupError(f"cannot write {value} to {path}: {e}") from e


def _counter(path: Path, key: str) -> int:
    with contextlib.suppress(OSError, ValueError):
        for line in path.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key:
                return int(value)
    return 0


def _procs(group: Path) -> list[int]:
    try:
        return [int(pid) for pid in (group / "cgroup.procs").read_text().split()]
    except (OSError, ValueError):
        return []


def _kill_and_remove(group: Path, version: int, deadline: float) -> None:
    """Kills what is left in ``group``, waits until it is empty and removes it."""
    kill_file = group / "cgroup.kill"
    while group.exists():
        if version == 2 and kill_file.exists():
            with contextlib.suppress(OSError):
                kill_file.write_text("1")
        else:
            for pid in _procs(group):  # only processes inside the episode's own group
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
        try:
            group.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError as e:
            if time.monotonic() > deadline:
                raise CgroupError(f"cannot remove {group}: {e}") from e
            time.sleep(0.002)
