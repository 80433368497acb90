"""WebShop's reward for a purchase (Yao et al. 2022)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from agentloop.envs.webshop.catalog import Goal, Product

FUZZY_MATCH = 85.0
"""A rapidfuzz token-set ratio above this makes two attribute or option strings match."""
EXACT_OPTIONS = frozenset({"size"})
"""Options whose values match only exactly (WebShop's ``EXACT_MATCH_OPTS``): fuzzily, "large" would
pass for "x-large" and "4.25 ounce (pack of 12)" for "4.25 ounce (pack of 1)"."""


_WORD_RE = re.compile(r"[a-z]{3,}")
_STOPWORDS = frozenset(
    "the and for with from that this your you are was were has have had not but all any can our its into "
    "per set pcs pack inch inches new size color womens mens women men".split()
)
"""Words that say nothing about a product's type in a title (stand-ins for non-nouns)."""


@dataclass(frozen=True)
class Score:
    """A purchase scored against a goal, part by part."""

    type_reward: float
    """``r_type``: 1, 0.5, 0.1 or 0 as the bought product's type matches the goal's."""
    attributes: int
    """Goal attributes the bought product has."""
    options: int
    """Goal option values among the chosen ones."""
    price_ok: bool
    """The price is within the goal's bound."""
    reward: float
    """The total, within [0, 1]."""


def _fuzzy(a: str, b: str) -> bool:
    from rapidfuzz import fuzz, utils

    return fuzz.token_set_ratio(a, b, processor=utils.default_process) > FUZZY_MATCH


def _title_words(title: str) -> set[str]:
    return set(_WORD_RE.findall(title.lower())) - _STOPWORDS


def type_reward(bought: Product, wanted: Product) -> float:
    """WebShop's ``r_type`` of buying ``bought`` when ``wanted`` was asked for."""
    wanted_words = _title_words(wanted.title)
    overlap = len(_title_words(bought.title) & wanted_words) / len(wanted_words) if wanted_words else 0.2
    same_type = bought.query == wanted.query or len(set(bought.category) & set(wanted.category)) >= 2 or overlap > 0.2
    if overlap == 0.0:
        return 0.0
    if overlap < 0.1:
        return 0.1
    return 1.0 if same_type else 0.5


def has_attribute(product: Product, attribute: str) -> bool:
    """Whether a goal attribute matches one of the product's attributes or occurs in its text."""
    if any(_fuzzy(own, attribute) for own in product.attributes):
        return True
    needle = attribute.lower()
    return any(needle in text.lower() for text in (product.title, " ".join(product.features), product.description))


def option_matches(chosen_name: str, value: str, goal_name: str, want: str) -> bool:
    """Whether the ``value`` chosen for option ``chosen_name`` meets the goal's ``goal_name: want``.

    A size (on either side) must be the same value; other options match fuzzily.
    """
    if {chosen_name.lower(), goal_name.lower()} & EXACT_OPTIONS:
        return value == want
    return _fuzzy(value, want)


def score_purchase(bought: Product, chosen: dict[str, str], wanted: Product, goal: Goal) -> Score:
    """Scores buying ``bought`` with the ``chosen`` option values (name -> value) for ``goal``."""
    r_type = type_reward(bought, wanted)
    attributes = sum(has_attribute(bought, a) for a in goal.attributes)
    options = sum(
        any(option_matches(name, value, goal_name, want) for name, value in chosen.items())
        for goal_name, want in goal.options
    )
    price_ok = bought.price <= goal.price_upper
    reward = r_type * (attributes + options + int(price_ok)) / (len(goal.attributes) + len(goal.options) + 1)
    return Score(r_type, attributes, options, price_ok, reward)
