"""Settings of the ALFWorld environment."""

from __future__ import annotations

from dataclasses import dataclass

from agentloop.config import ConfigError


@dataclass
class ALFWorldEnvConfig:
    """Settings of the ALFWorld environment."""

    max_steps: int = 40
    """Replies per episode (ETO: 40; ALFWorld's own default is 50)."""
    show_valid_actions: bool = False
    """Append the admissible commands to every observation (for prompts that want them)."""
    max_action_chars: int = 1000
    """Longer replies are rejected as invalid without being parsed."""
    lookahead: int = 8
    """Prepared games the process's engine pool keeps loaded ahead of their episodes, at most."""
    load_timeout_s: float = 300.0
    """Longest a reset waits for a game loading in the background."""

    def validate(self) -> None:
        """Raises ``ConfigError`` naming the first field out of range."""
        for name in ("max_steps", "max_action_chars"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.lookahead < 0:
            raise ConfigError(f"lookahead must be >= 0, got {self.lookahead}")
        if not self.load_timeout_s > 0:
            raise ConfigError(f"load_timeout_s must be positive, got {self.load_timeout_s}")
