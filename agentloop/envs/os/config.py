"""Settings of the Operating System environment and its sandbox."""

from __future__ import annotations

from dataclasses import dataclass

from agentloop.config import ConfigError

SCRATCH_DIRS = ("/root", "/home", "/tmp", "/var", "/usr/local", "/dev/shm", "/usr")
"""The private, writable tmpfs mounts of every sandbox, ``scratch_mb`` each (``/usr`` holds the
host's read-only folders, its own entries are private)."""
MEMORY_RESERVE_MB = 128
"""Memory of an episode its tmpfs mounts can never take: room left for its processes."""


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
    """Processes and threads the sandbox may hold at once (RLIMIT_NPROC of its uid, which is its own)."""
    memory_mb: int = 1024
    """Address space of any one process, in MiB (RLIMIT_AS)."""
    episode_memory_mb: int = 1024
    """Memory of the whole episode, its processes and its tmpfs files together, in MiB (the limit
    of its memory cgroup; not enforced on a host without one, see ``agentloop.envs.os.cgroups``).
    At least the tmpfs mounts' total plus ``MEMORY_RESERVE_MB``, so files alone cannot use it up."""
    episode_processes: int = 120
    """Processes and threads of the whole episode at once (the limit of its pids cgroup). Below
    ``max_processes``, so that this limit, whose hits the cgroup reports, is the one reached first."""
    max_file_mb: int = 16
    """Largest file a process may write, in MiB (RLIMIT_FSIZE)."""
    scratch_mb: int = 64
    """Size of each private writable mount (``SCRATCH_DIRS``), MiB."""
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
        for name in ("max_processes", "episode_processes"):
            if getattr(self, name) < 8:
                raise ConfigError(f"{name} must be at least 8, got {getattr(self, name)}")
        if self.memory_mb < 64:
            raise ConfigError(f"memory_mb must be at least 64, got {self.memory_mb}")
        least = len(SCRATCH_DIRS) * self.scratch_mb + MEMORY_RESERVE_MB
        if self.episode_memory_mb < least:
            raise ConfigError(
                f"episode_memory_mb must be at least {least} (the {len(SCRATCH_DIRS)} tmpfs mounts of "
                f"scratch_mb={self.scratch_mb} plus {MEMORY_RESERVE_MB}), got {self.episode_memory_mb}"
            )
        for name in ("command_timeout_s", "script_timeout_s"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if not 1000 <= self.uid_base < 2**31 - self.uid_count:
            raise ConfigError(f"uid_base must be an unprivileged uid (>= 1000), got {self.uid_base}")
