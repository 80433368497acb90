"""Gymnasium spaces for free-form text.

``gymnasium.spaces.Text`` accepts only characters of a fixed charset (alphanumeric by
default). Model actions and environment observations are arbitrary unicode, so the text
spaces here accept any ``str`` up to a length; validating an action is the environment's
job, and a malformed one becomes an observation, never an exception.
"""

from __future__ import annotations

import string
from typing import Any

from gymnasium import spaces

PRINTABLE = string.printable


class FreeText(spaces.Text):
    """Any string of at most ``max_length`` characters (samples use printable ASCII)."""

    def __init__(self, max_length: int, *, seed: int | None = None) -> None:
        super().__init__(max_length=max_length, min_length=0, charset=PRINTABLE, seed=seed)

    def contains(self, x: Any) -> bool:
        return isinstance(x, str) and len(x) <= self.max_length

    def __repr__(self) -> str:
        return f"FreeText({self.max_length})"


def unreadable_action(text: Any, max_chars: int, format_help: str) -> str | None:
    """What makes ``text`` unreadable as an action before any parsing (not a string, too long), or None."""
    if not isinstance(text, str):
        return f"Invalid action: expected text, got {type(text).__name__}. {format_help}"
    if len(text) > max_chars:
        return f"Invalid action: longer than {max_chars} characters. {format_help}"
    return None
