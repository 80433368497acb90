"""How a final answer is read and compared with a task's label, as AgentBench compares them."""

from __future__ import annotations

import ast
import json
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    pass

_THOUSANDS_RE = re.compile(r"[-+]?\d{1,3}(?:,\d{3})+(?:\.\d*)?")


def parse_answer_list(text: str) -> list[Any] | None:
    """The values of a ``Final Answer`` list (JSON or Python literal), or None if it is not one.

    One-element rows copied from a raw result, e.g. ``[('Paris',)]``, are unpacked.
    """
    text = text.strip().removesuffix("```").strip()
    candidates = [text] + ([text.splitlines()[0]] if "\n" in text else [])
    for candidate in candidates:
        for load in (json.loads, ast.literal_eval):
            try:
                value = load(candidate)
            except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
                continue
            if isinstance(value, (list, tuple)):
                return [v for item in value for v in (item if isinstance(item, (list, tuple)) else (item,))]
    return None


def _answer_key(value: Any) -> tuple[str, Any]:
    text = "none" if value is None else str(value).strip()
    if text.lower() in ("none", "null"):
        return ("none", None)
    try:
        number = float(text.replace(",", "") if _THOUSANDS_RE.fullmatch(text) else text)
    except ValueError:
        return ("text", text)
    if number != number or number in (float("inf"), float("-inf")):
        return ("text", text)
    return ("number", round(number, 6))


def answers_match(answer: Sequence[Any], label: Sequence[str]) -> bool:
    """Whether an answer list matches a label the way AgentBench compares them.

    Values are stripped and numbers compare as numbers (to 6 decimals, thousands separators
    allowed: ``"1,174"`` matches ``"1174.0"``); a one-value label
    needs exactly one value, longer labels are compared as sets (order and repeats ignored).
    """
    if len(label) == 1:
        return len(answer) == 1 and _answer_key(answer[0]) == _answer_key(label[0])
    return {_answer_key(v) for v in answer} == {_answer_key(v) for v in label}
