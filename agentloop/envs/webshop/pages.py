"""The shop's pages as text, and the actions that move between them."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from agentloop.envs.spaces import unreadable_action
from agentloop.envs.webshop.catalog import Goal, Product
from agentloop.envs.webshop.config import WebShopEnvConfig

TITLE_CHARS = 100
"""Titles on a results page are cut to this many characters."""
NOTE_SLACK = 300
"""Upper bound on the length of the text added to a page (the first observation's help)."""

FORMAT_HELP = "Reply with one action: search[your query] on the search page, or click[label] for a [label] on the page."
_ACTION_RE = re.compile(r"(search|click)\[(.*)\]", re.DOTALL)
_LAST_ACTION_RE = re.compile(r"Action:\s*", re.IGNORECASE)


BACK, PREV, NEXT, BUY = "Back to Search", "< Prev", "Next >", "Buy Now"
DETAILS = ("Description", "Features")


@dataclass
class Page:
    """Where the shopper is: the page kind and what it shows."""

    kind: str = "search"
    """``search``, ``results``, ``item`` or one of :data:`DETAILS`."""
    query: str = ""
    """The last search's query."""
    results: list[Product] = field(default_factory=list)
    """The last search's products."""
    number: int = 0
    """The results page shown (0-based)."""
    product: Product | None = None
    """The opened product."""
    chosen: dict[str, str] = field(default_factory=dict)
    """Option values clicked on the item page, by option name."""


def cut_text(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3].rstrip() + "..."


def shown(text: str, limit: int = 40) -> str:
    """User text quoted safely for an observation (escaped, cut)."""
    return cut_text(repr(cut_text(text, limit)), limit + 20)


def page_buttons(page: Page, config: WebShopEnvConfig) -> list[str]:
    """The labels clickable on ``page``, in page order."""
    if page.kind == "search":
        return []
    if page.kind == "results":
        prev = [PREV] if page.number > 0 else []
        more = [NEXT] if (page.number + 1) * config.results_per_page < len(page.results) else []
        return [BACK, *prev, *more, *(p.asin for p in on_page(page, config))]
    if page.kind == "item":
        assert page.product is not None
        values = [v for _, values in page.product.options for v in values]
        return [BACK, PREV, *values, *DETAILS, BUY]
    return [BACK, PREV]


def on_page(page: Page, config: WebShopEnvConfig) -> list[Product]:
    start = page.number * config.results_per_page
    return page.results[start : start + config.results_per_page]


def render(page: Page, goal: Goal, config: WebShopEnvConfig) -> str:
    """The page as text: elements joined by ``[SEP]``, clickable ones in brackets."""
    if page.kind == "search":
        parts = ["WebShop", "Instruction:", goal.text, "[Search]"]
    elif page.kind == "results":
        parts = [f"[{b}]" for b in page_buttons(page, config) if b in (BACK, PREV, NEXT)]
        parts.insert(1, f"Page {page.number + 1} (Total results: {len(page.results)})")
        for product in on_page(page, config):
            parts += [f"[{product.asin}]", cut_text(product.title, TITLE_CHARS), f"${product.price:.2f}"]
        if not page.results:
            parts.append("No products match the query.")
    elif page.kind == "item":
        assert page.product is not None
        parts = [f"[{BACK}]", f"[{PREV}]"]
        for name, values in page.product.options:
            parts += [name, *(f"[{v}]" for v in values)]
        if page.chosen:
            parts.append("Selected: " + ", ".join(f"{n}: {v}" for n, v in page.chosen.items()))
        parts += [page.product.title, f"Price: ${page.product.price:.2f}", *(f"[{d}]" for d in DETAILS), f"[{BUY}]"]
    else:
        assert page.product is not None
        text = page.product.description if page.kind == "Description" else " ".join(page.product.features)
        if len(text) > config.max_detail_chars:
            text = text[: config.max_detail_chars] + f" [cut at {config.max_detail_chars} characters]"
        parts = [f"[{BACK}]", f"[{PREV}]", text or f"No {page.kind.lower()} given."]
    page_text = " [SEP] ".join(parts)
    limit = config.max_observation_chars
    return page_text if len(page_text) <= limit else page_text[: limit - 40] + " [page cut here]"


def parse_action(text: Any, max_chars: int) -> tuple[str, str] | str:
    """Reads a reply: ``(verb, argument)`` of its action, or a message saying what is wrong."""
    if (problem := unreadable_action(text, max_chars, FORMAT_HELP)) is not None:
        return problem
    marks = list(_LAST_ACTION_RE.finditer(text))
    action = (text[marks[-1].end() :] if marks else text).strip()
    match = _ACTION_RE.fullmatch(action)
    if match is None:
        return f"Invalid action: {shown(action)} is not search[...] or click[...]. {FORMAT_HELP}"
    return match.group(1), match.group(2).strip()
