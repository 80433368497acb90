"""Settings of the Database environment."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from agentloop.config import ConfigError

if TYPE_CHECKING:
    pass


@dataclass
class SQLEnvConfig:
    """Settings of the Database environment."""

    max_turns: int = 5
    """Assistant turns per episode; an episode without an answer by then is truncated."""
    max_observation_chars: int = 800
    """Longer SQL output is cut to this many characters, with a note saying so."""
    query_timeout_s: float = 2.0
    """Wall-clock limit of one SQL statement (fetching its rows included); the scoring read of
    the table and the gold SQL have the same limit. A statement that does not stop itself by
    then (a single slow built-in function cannot be interrupted) has its worker process killed."""
    max_result_rows: int = 50
    """At most this many result rows are shown; a note says when there were more."""
    max_action_chars: int = 4000
    """Longer actions are rejected as invalid without being parsed."""
    max_db_pages: int = 1024
    """Size cap of an episode's database, in SQLite pages of 4 KiB (the largest task's is 4)."""
    max_value_bytes: int = 10_000
    """Largest string or blob a statement may build (the tasks' values have at most 412 characters)."""
    max_memory_mib: int = 256
    """Memory SQLite may use in the worker process, database included (its hard heap limit): a
    statement needing more fails with an observation saying so. The worker's address space is
    capped at twice this plus 128 MiB; one worker serves every env with the same value."""

    def validate(self) -> None:
        """Checks every limit is in range.

        Raises:
            ConfigError: Naming the first field out of range.
        """
        for name in ("max_turns", "max_observation_chars", "max_result_rows", "max_action_chars", "max_db_pages"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.max_value_bytes < 1000:
            raise ConfigError(f"max_value_bytes must be at least 1000, got {self.max_value_bytes}")
        if not self.query_timeout_s > 0:
            raise ConfigError(f"query_timeout_s must be positive, got {self.query_timeout_s}")
        if self.max_memory_mib < 16:
            raise ConfigError(f"max_memory_mib must be at least 16, got {self.max_memory_mib}")
        if self.max_db_pages * 4 > self.max_memory_mib * 1024 // 2:
            raise ConfigError(
                f"max_db_pages ({self.max_db_pages} pages of 4 KiB) must fit in half of max_memory_mib"
                f" ({self.max_memory_mib} MiB)"
            )
