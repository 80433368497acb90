"""The WebShop environment: a text shop over WebShop's 1,000-product set, with scripted experts.

Data. Products are read from ``<data_dir>/webshop/products_1k.jsonl`` (one product a line,
already cleaned: title, description, feature bullets, price list, options, attributes,
category path and the search term it was listed under). ``items_ins_v2_1000.json`` gives
415 of these products a synthetic ``instruction`` with its ``instruction_attributes``: they
are the goal products. A product sells at the lower end of its listed price (WebShop draws a
price inside a range at random; a fixed price keeps episodes reproducible).

Goals, as WebShop builds its synthetic goals. Every combination of a goal product's option
values is a goal, with a price bound drawn from the next price steps above the product's price
(two of the next four multiples of $10, the larger kept; $1,000,000 when fewer than two
exist). Its text is ``"<instruction> with <name: value, and name: value>, and price lower
than <bound> dollars"``. To keep products with hundreds of combinations from swamping the
others, each product keeps at most :data:`GOALS_PER_PRODUCT` of its combinations (all of them
when it has fewer, else a sample fixed by the product's ASIN). A task's id is
``<split>-<asin>-<combination index>``; its ``kind`` is the product's shop category
(``beauty``, ``electronics``, ``fashion``, ``garden`` or ``grocery``).

Split. The 415 goal products are shuffled with seed :data:`SPLIT_SEED`; the first 83 (20%)
are ``test``, the other 332 ``train``, so test goals ask for products never seen in training.
With the per-product cap this gives 1,423 train goals and 336 test goals (most of them
``fashion``, whose products have the most option combinations).

Protocol (WebShop's action syntax). Each reply holds one action, ``search[query]`` (only on
the search page) or ``click[label]`` with the label of a bracketed button on the current page
(case and surrounding spaces ignored); text before a final ``Action:`` is allowed, so ReAct
replies work. Pages are WebShop's: the search page (the instruction and ``[Search]``); a
results page (10 products a page, at most 50, ``[Next >]`` / ``[< Prev]`` to page,
``[Back to Search]``, each product's ``[ASIN]``, title and price); an item page (options as
``[value]`` buttons under their names, title, price, ``[Description]``, ``[Features]``,
``[Buy Now]``, ``[< Prev]`` back to the results); and description / features pages (``[< Prev]``
back to the item). Elements are separated by ``[SEP]``. Search is BM25 (``bm25s``, English
stopwords) over each product's indexed text (the data's ``contents``: title, description and
features, lower-cased, as WebShop indexed them) plus its category path and listing search term;
products sharing no word with the query are not listed. The index is built once per product
set and shared by every env over it. A malformed action, a click on something not on the
page, or a search away from the search page is answered with what was wrong and the page's
buttons, marked ``info["invalid"]``, and costs a step. ``[Buy Now]`` ends the episode; ``max_steps`` actions
without buying truncate it.

Scoring (WebShop's reward, Yao et al. 2022). For the bought product y and goal u,
``r = r_type * (attribute matches + option matches + [price <= bound]) / (|attributes| +
|options| + 1)``. A goal attribute matches when one of y's attributes is a fuzzy match
(rapidfuzz token-set ratio above 85) or it occurs in y's title, features or description; a
goal option matches when a chosen option value is such a fuzzy match. ``r_type`` is 1 when y
has the goal's listing search term, shares two category levels, or more than 20% of the goal
title's content words; 0.5 otherwise; 0.1 when under 10% of those words are shared; 0 when
none is. WebShop counts spaCy-tagged nouns of the titles; here every title word of three or
more letters that is not a stopword counts, which needs no tagger model. Success is reward 1.0.

Experts. :func:`expert_actions` searches the goal's whole text, pages to the goal product,
opens it, clicks each goal option and buys; :func:`build_webshop_experts` replays that through
:class:`WebShopEnv` and keeps the successes.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import re
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gymnasium
import numpy as np
from gymnasium.error import ResetNeeded

from agentloop.config import ConfigError
from agentloop.envs.experts import ExpertReport, replay_actions
from agentloop.envs.spaces import FreeText, unreadable_action
from agentloop.envs.tasks import choose_task, index_tasks
from agentloop.types import Task, Trajectory

logger = logging.getLogger(__name__)

ENV_NAME = "webshop"
SPLITS = ("train", "test")
PRODUCTS_FILE = "products_1k.jsonl"
GOALS_FILE = "items_ins_v2_1000.json"
SPLIT_SEED = 0
"""Seed of the shuffle that splits the goal products into train and test."""
TEST_FRACTION = 0.2
"""Share of the goal products held out as ``test``."""
GOALS_PER_PRODUCT = 10
"""At most this many option combinations of one product become goals."""
PRICE_STEPS = tuple(10.0 * i for i in range(1, 100))
"""WebShop's price bounds: the multiples of $10 up to $990."""
NO_PRICE_BOUND = 1_000_000.0
"""The bound of a goal whose product costs too much for two higher price steps."""
FUZZY_MATCH = 85.0
"""A rapidfuzz token-set ratio above this makes two attribute or option strings match."""
TITLE_CHARS = 100
"""Titles on a results page are cut to this many characters."""
_NOTE_SLACK = 300
"""Upper bound on the length of the text added to a page (the first observation's help)."""

FORMAT_HELP = "Reply with one action: search[your query] on the search page, or click[label] for a [label] on the page."
_ACTION_RE = re.compile(r"(search|click)\[(.*)\]", re.DOTALL)
_LAST_ACTION_RE = re.compile(r"Action:\s*", re.IGNORECASE)
_WORD_RE = re.compile(r"[a-z]{3,}")
_STOPWORDS = frozenset(
    "the and for with from that this your you are was were has have had not but all any can our its into "
    "per set pcs pack inch inches new size color womens mens women men".split()
)
"""Words that say nothing about a product's type in a title (stand-ins for non-nouns)."""
BACK, PREV, NEXT, BUY = "Back to Search", "< Prev", "Next >", "Buy Now"
DETAILS = ("Description", "Features")


# --- data ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Product:
    """One product of the shop."""

    asin: str
    """Amazon's product id, shown and clicked on results pages."""
    title: str
    """The product's name."""
    description: str
    """The text of its description page."""
    features: tuple[str, ...]
    """Its feature bullets (the features page)."""
    category: tuple[str, ...]
    """Its category path, broadest level first (may be empty)."""
    query: str
    """The search term the product was listed under (WebShop's product type)."""
    attributes: tuple[str, ...]
    """Short attribute phrases mined from its text (goal attributes are checked against them)."""
    options: tuple[tuple[str, tuple[str, ...]], ...]
    """Option names with their values, in page order."""
    price: float
    """The price it sells at, in dollars."""
    shop: str
    """The shop category: ``beauty``, ``electronics``, ``fashion``, ``garden`` or ``grocery``."""
    text: str
    """The text the search index holds for it."""


@dataclass(frozen=True)
class Goal:
    """What a shopper asks for: a product type with attributes, option values and a price bound."""

    asin: str
    """The product the goal was made from."""
    instruction: str
    """The product's synthetic instruction, without the option and price clause."""
    attributes: tuple[str, ...]
    """Attributes the bought product must have."""
    options: tuple[tuple[str, str], ...]
    """Option (name, value) pairs to choose."""
    price_upper: float
    """The highest acceptable price, in dollars."""

    @property
    def text(self) -> str:
        """The goal as the shopper states it."""
        clause = f" with {', and '.join(f'{name}: {value}' for name, value in self.options)}" if self.options else ""
        return f"{self.instruction}{clause}, and price lower than {self.price_upper:.2f} dollars"


class Catalog:
    """The products of one data directory, with a BM25 index over their text built on first use."""

    def __init__(self, products: Sequence[Product]) -> None:
        self.products = tuple(products)
        self.by_asin = {p.asin: p for p in self.products}
        self._index: Any = None
        self._tokenizer: Any = None
        self._empty_id = -1

    def search(self, query: str, limit: int) -> list[Product]:
        """The best ``limit`` products for ``query`` by BM25, best first; none share no word with it."""
        self.build_index()
        ids = self._tokenizer.tokenize([query], update_vocab=False, show_progress=False)[0]
        ids = [i for i in ids if i != self._empty_id]
        if not ids:
            return []
        k = min(limit, len(self.products))
        found, scores = self._index.retrieve([ids], k=k, show_progress=False, backend_selection="numpy")
        return [self.products[int(d)] for d, s in zip(found[0], scores[0], strict=True) if s > 0]

    def build_index(self) -> None:
        """Builds the BM25 index (once); later calls return at once."""
        if self._index is not None:
            return
        import bm25s

        tokenizer = bm25s.tokenization.Tokenizer(stopwords="en")
        corpus = tokenizer.tokenize([p.text for p in self.products], show_progress=False)
        index = bm25s.BM25(backend="numpy")
        index.index(corpus, show_progress=False)
        self._empty_id = tokenizer.get_vocab_dict().get("", -1)
        self._tokenizer, self._index = tokenizer, index


@dataclass(frozen=True)
class WebShopTask:
    """One WebShop goal, with the shop it is pursued in."""

    task: Task
    """The task as the loop and the store see it (``instruction`` is the goal text)."""
    goal: Goal
    """The goal that scores a purchase."""
    catalog: Catalog = field(repr=False, compare=False)
    """The shop (shared by every task loaded from the same data directory)."""

    @property
    def product(self) -> Product:
        """The goal's own product."""
        return self.catalog.by_asin[self.goal.asin]


def load_webshop_tasks(data_dir: Path, split: str) -> list[WebShopTask]:
    """Reads one split of the WebShop goals (see the module docstring for the split).

    Args:
        data_dir: The task data directory (the one holding ``webshop/``).
        split: ``"train"`` or ``"test"``.

    Raises:
        ValueError: For an unknown split or a malformed data file.
        FileNotFoundError: When the directory or one of its files is missing.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown webshop split {split!r}; known splits: {list(SPLITS)}")
    folder = Path(data_dir).resolve() / "webshop"
    if not folder.is_dir():
        raise FileNotFoundError(f"webshop data directory not found: {folder} (set the data directory)")
    catalog, instructions = _load_folder(folder)
    goal_asins = sorted(a for a in instructions if a in catalog.by_asin)
    order = np.random.default_rng(SPLIT_SEED).permutation(len(goal_asins))
    cut = round(TEST_FRACTION * len(goal_asins))
    chosen = order[:cut] if split == "test" else order[cut:]
    tasks = []
    for asin in sorted(goal_asins[i] for i in chosen):
        instruction, attributes = instructions[asin]
        tasks.extend(_product_tasks(catalog, catalog.by_asin[asin], instruction, attributes, split))
    return tasks


@functools.lru_cache(maxsize=4)
def _load_folder(folder: Path) -> tuple[Catalog, dict[str, tuple[str, tuple[str, ...]]]]:
    """The catalog and the goal instructions of one ``webshop/`` folder (read once per folder)."""
    paths = [folder / PRODUCTS_FILE, folder / GOALS_FILE]
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(f"webshop data file not found: {path}")
    products = []
    with paths[0].open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            try:
                products.append(_parse_product(json.loads(line)))
            except (KeyError, IndexError, TypeError, ValueError) as e:
                raise ValueError(f"{paths[0]}, line {number}: malformed product ({e!r})") from e
    try:
        entries = json.loads(paths[1].read_text(encoding="utf-8"))
        instructions = {
            str(asin): (str(e["instruction"]), tuple(str(a) for a in e["instruction_attributes"]))
            for asin, e in entries.items()
            if "instruction" in e
        }
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{paths[1]}: malformed goal file ({e!r})") from e
    return Catalog(products), instructions


def _parse_product(entry: dict[str, Any]) -> Product:
    raw = entry["product"]
    category = tuple(level.strip() for level in str(raw["product_category"]).split("›") if level.strip())
    options = tuple(
        (str(name), tuple(dict.fromkeys(str(v) for v in values))) for name, values in raw["options"].items()
    )
    return Product(
        asin=str(entry["id"]),
        title=str(raw["Title"]),
        description=str(raw["Description"] or ""),
        features=tuple(str(b).strip() for b in raw["BulletPoints"] or ()),
        category=category,
        query=str(raw["query"]),
        attributes=tuple(str(a) for a in raw["Attributes"] or ()),
        options=options,
        price=float(raw["pricing"][0]) if raw["pricing"] else 100.0,
        shop=str(raw["category"]),
        text=" ".join([str(entry["contents"]), " ".join(category), str(raw["query"])]),
    )


def _product_tasks(
    catalog: Catalog, product: Product, instruction: str, attributes: tuple[str, ...], split: str
) -> list[WebShopTask]:
    """The goals of one product: up to :data:`GOALS_PER_PRODUCT` option combinations."""
    rng = np.random.default_rng([SPLIT_SEED, zlib.crc32(product.asin.encode())])
    sizes = [len(values) for _, values in product.options]
    total = math.prod(sizes)
    picks = range(total) if total <= GOALS_PER_PRODUCT else sorted(rng.choice(total, GOALS_PER_PRODUCT, replace=False))
    steps = [p for p in PRICE_STEPS if p > product.price][:4]
    tasks = []
    for index in picks:
        upper = float(max(rng.choice(steps, 2, replace=False))) if len(steps) >= 2 else NO_PRICE_BOUND
        chosen, rest = [], int(index)
        for (name, values), size in zip(reversed(product.options), reversed(sizes), strict=True):
            rest, digit = divmod(rest, size)
            chosen.append((name, values[digit]))
        goal = Goal(product.asin, instruction, attributes, tuple(reversed(chosen)), upper)
        task = Task(ENV_NAME, f"{split}-{product.asin}-{int(index):03d}", split, product.shop, goal.text)
        tasks.append(WebShopTask(task, goal, catalog))
    return tasks


# --- scoring ------------------------------------------------------------------------------


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


def score_purchase(bought: Product, chosen: dict[str, str], wanted: Product, goal: Goal) -> Score:
    """Scores buying ``bought`` with the ``chosen`` option values (name -> value) for ``goal``."""
    r_type = type_reward(bought, wanted)
    attributes = sum(has_attribute(bought, a) for a in goal.attributes)
    options = sum(any(_fuzzy(value, want) for value in chosen.values()) for _, want in goal.options)
    price_ok = bought.price <= goal.price_upper
    reward = r_type * (attributes + options + int(price_ok)) / (len(goal.attributes) + len(goal.options) + 1)
    return Score(r_type, attributes, options, price_ok, reward)


# --- pages --------------------------------------------------------------------------------


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


@dataclass
class _Page:
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


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3].rstrip() + "..."


def _shown(text: str, limit: int = 40) -> str:
    """User text quoted safely for an observation (escaped, cut)."""
    return _cut(repr(_cut(text, limit)), limit + 20)


def _buttons(page: _Page, config: WebShopEnvConfig) -> list[str]:
    """The labels clickable on ``page``, in page order."""
    if page.kind == "search":
        return []
    if page.kind == "results":
        prev = [PREV] if page.number > 0 else []
        more = [NEXT] if (page.number + 1) * config.results_per_page < len(page.results) else []
        return [BACK, *prev, *more, *(p.asin for p in _on_page(page, config))]
    if page.kind == "item":
        assert page.product is not None
        values = [v for _, values in page.product.options for v in values]
        return [BACK, PREV, *values, *DETAILS, BUY]
    return [BACK, PREV]


def _on_page(page: _Page, config: WebShopEnvConfig) -> list[Product]:
    start = page.number * config.results_per_page
    return page.results[start : start + config.results_per_page]


def render(page: _Page, goal: Goal, config: WebShopEnvConfig) -> str:
    """The page as text: elements joined by ``[SEP]``, clickable ones in brackets."""
    if page.kind == "search":
        parts = ["WebShop", "Instruction:", goal.text, "[Search]"]
    elif page.kind == "results":
        parts = [f"[{b}]" for b in _buttons(page, config) if b in (BACK, PREV, NEXT)]
        parts.insert(1, f"Page {page.number + 1} (Total results: {len(page.results)})")
        for product in _on_page(page, config):
            parts += [f"[{product.asin}]", _cut(product.title, TITLE_CHARS), f"${product.price:.2f}"]
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
        return f"Invalid action: {_shown(action)} is not search[...] or click[...]. {FORMAT_HELP}"
    return match.group(1), match.group(2).strip()


# --- the environment ----------------------------------------------------------------------


@dataclass(frozen=True)
class _Outcome:
    """What one step produced, before the step limit is applied."""

    observation: str
    reward: float = 0.0
    terminated: bool = False
    invalid: bool = False


class WebShopEnv(gymnasium.Env[str, str]):
    """Gymnasium environment over WebShop goals; every task must share one catalog.

    ``reset(options={"task_id": ...})`` picks a goal (otherwise one is drawn with the env's
    seeded generator); ``info["task"]`` is its :class:`~agentloop.types.Task`. ``step`` returns
    ``info`` with ``invalid`` (the action was malformed or not possible on the page) and
    ``success`` (reward 1.0). Stepping before ``reset`` or after the episode ended raises
    :class:`gymnasium.error.ResetNeeded`.
    """

    metadata = {"render_modes": []}

    def __init__(self, tasks: Sequence[WebShopTask], config: WebShopEnvConfig) -> None:
        config.validate()
        self.config = config
        self.tasks = index_tasks(tasks, "WebShopEnv")
        if len({id(t.catalog) for t in tasks}) != 1:
            raise ValueError("WebShopEnv's tasks must come from one catalog (one data directory)")
        self.catalog = tasks[0].catalog
        self.catalog.build_index()
        self.observation_space = FreeText(config.max_observation_chars + _NOTE_SLACK)
        self.action_space = FreeText(config.max_action_chars)
        self._task: WebShopTask | None = None
        self._page = _Page()
        self._steps = 0
        self._done = True

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[str, dict[str, Any]]:
        """Starts an episode on the search page of the chosen goal."""
        super().reset(seed=seed)
        task = self._choose(options or {})
        self._task, self._page, self._steps, self._done = task, _Page(), 0, False
        return self._intro() + "\n" + render(self._page, task.goal, self.config), {"task": task.task}

    def step(self, action: str) -> tuple[str, float, bool, bool, dict[str, Any]]:
        """Carries out one action; see the module docstring for the pages and the scoring."""
        if self._task is None or self._done:
            raise ResetNeeded("WebShopEnv.step() needs an episode in progress: call reset() first")
        self._steps += 1
        parsed = parse_action(action, self.config.max_action_chars)
        if isinstance(parsed, str):
            outcome = _Outcome(parsed, invalid=True)
        elif parsed[0] == "search":
            outcome = self._search(parsed[1])
        else:
            outcome = self._click(parsed[1])
        truncated = not outcome.terminated and self._steps >= self.config.max_steps
        self._done = outcome.terminated or truncated
        info = {"invalid": outcome.invalid, "success": outcome.reward >= 1.0}
        return outcome.observation, outcome.reward, outcome.terminated, truncated, info

    def close(self) -> None:
        """Ends the episode; the shared catalog stays loaded for other envs."""
        self._task, self._done = None, True

    def _intro(self) -> str:
        return f"You are shopping in WebShop and have {self.config.max_steps} actions. {FORMAT_HELP}"

    def _search(self, query: str) -> _Outcome:
        assert self._task is not None
        if self._page.kind != "search":
            return self._invalid("there is no search box on this page; click[Back to Search] first")
        if not query:
            return self._invalid("the search query is empty")
        results = self.catalog.search(query, self.config.max_results)
        self._page = _Page(kind="results", query=query, results=results)
        return _Outcome(render(self._page, self._task.goal, self.config))

    def _click(self, label: str) -> _Outcome:
        assert self._task is not None
        page, wanted = self._page, label.casefold()
        button = next((b for b in _buttons(page, self.config) if b.casefold() == wanted), None)
        if button is None:
            return self._invalid(f"{_shown(label)} is not a button on this page")
        if button == BUY:
            return self._buy()
        if button == BACK:
            self._page = _Page()
        elif page.kind == "results":
            self._click_results(button)
        elif page.kind == "item":
            self._click_item(button)
        else:  # a description or features page: its only other button goes back to the item
            page.kind = "item"
        return _Outcome(render(self._page, self._task.goal, self.config))

    def _click_results(self, button: str) -> None:
        page = self._page
        if button in (NEXT, PREV):
            page.number += 1 if button == NEXT else -1
        else:
            page.kind, page.product, page.chosen = "item", self.catalog.by_asin[button], {}

    def _click_item(self, button: str) -> None:
        page = self._page
        assert page.product is not None
        if button == PREV:
            page.kind = "results"
        elif button in DETAILS:
            page.kind = button
        else:
            name = next(n for n, values in page.product.options if button in values)
            page.chosen[name] = button

    def _buy(self) -> _Outcome:
        assert self._task is not None and self._page.product is not None
        bought, chosen = self._page.product, self._page.chosen
        score = score_purchase(bought, chosen, self._task.product, self._task.goal)
        options = ", ".join(f"{n}: {v}" for n, v in chosen.items()) or "none"
        text = (
            f"You bought {_cut(bought.title, TITLE_CHARS)} (options: {options}) for ${bought.price:.2f}. "
            f"Your score: {score.reward:.3f} of 1.0."
        )
        return _Outcome(_cut(text, self.config.max_observation_chars), reward=score.reward, terminated=True)

    def _invalid(self, why: str) -> _Outcome:
        """An invalid action's observation: what was wrong and what this page allows."""
        buttons = _buttons(self._page, self.config)
        allowed = "You can click: " + ", ".join(f"[{b}]" for b in buttons) if buttons else "Here you can search[...]"
        text = _cut(f"Invalid action: {why}. {allowed}.", self.config.max_observation_chars)
        return _Outcome(text, invalid=True)

    def _choose(self, options: dict[str, Any]) -> WebShopTask:
        return choose_task(self.tasks, options, self.np_random)


# --- expert demonstrations ----------------------------------------------------------------


def expert_actions(task: WebShopTask, config: WebShopEnvConfig) -> list[str] | None:
    """The scripted expert's actions: search, page to the goal product, open it, choose, buy.

    None when the search for the instruction does not return the goal product at all.
    """
    query = task.task.instruction
    found = [p.asin for p in task.catalog.search(query, config.max_results)]
    if task.goal.asin not in found:
        return None
    pages = found.index(task.goal.asin) // config.results_per_page
    choose = [f"click[{value}]" for _, value in task.goal.options]
    return [f"search[{query}]", *[f"click[{NEXT}]"] * pages, f"click[{task.goal.asin}]", *choose, f"click[{BUY}]"]


def build_webshop_experts(
    tasks: Sequence[WebShopTask], config: WebShopEnvConfig
) -> tuple[list[Trajectory], dict[str, Any]]:
    """Replays the scripted expert on every task through a real :class:`WebShopEnv`; keeps successes.

    Returns:
        The kept demonstrations (reward 1.0 each), and a report: ``by_kind`` maps each shop
        category to ``{"attempted": n, "succeeded": k}``; ``failures`` maps each failure class
        (``not_found``: the search misses the goal product; ``too_long``: the actions exceed
        ``max_steps``; ``low_reward``: bought but scored below 1.0) to its count and up to
        three example task ids.
    """
    env = WebShopEnv(tasks, config)
    demos: list[Trajectory] = []
    report = ExpertReport()
    try:
        for task in tasks:
            actions = expert_actions(task, config)
            failure = "not_found" if actions is None else "too_long" if len(actions) > config.max_steps else None
            if actions is not None and failure is None:
                demo = replay_actions(env, task.task.task_id, actions)
                failure = None if demo.success else "low_reward"
                if demo.success:
                    demos.append(demo)
            report.record(task.task, failure)
    finally:
        env.close()
    logger.info("webshop experts: %d/%d succeeded; failures %s", len(demos), len(tasks), report.failures)
    return demos, report.as_dict()
