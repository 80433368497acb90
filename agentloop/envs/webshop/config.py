"""Settings of the WebShop environment."""

from __future__ import annotations

from dataclasses import dataclass

from agentloop.config import ConfigError


@dataclass
class WebShopEnvConfig:
    """Settings of the WebShop environment."""

    max_steps: int = 10
    """Actions per episode (ETO's WebShop budget); an episode without a purchase by then is truncated."""
    results_per_page: int = 10
    """Products on one results page."""
    max_results: int = 50
    """Products a search returns at most (over all its pages)."""
    max_detail_chars: int = 1000
    """A description or features page is cut to this many characters, with a note."""
    max_action_chars: int = 1000
    """Longer actions are rejected as invalid without being parsed."""
    max_observation_chars: int = 3000
    """Any longer page is cut to this many characters, with a note."""

    def validate(self) -> None:
        """Checks every limit is positive and a page fits in an observation.

        Raises:
            ConfigError: Naming the first field out of range.
        """
        for name in ("max_steps", "results_per_page", "max_results", "max_detail_chars", "max_action_chars"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.max_observation_chars < self.max_detail_chars + 200:
            raise ConfigError(
                f"max_observation_chars must be at least max_detail_chars + 200, got {self.max_observation_chars}"
            )
