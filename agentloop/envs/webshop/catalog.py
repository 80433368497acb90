"""WebShop's products and goals: reading ``<data_dir>/webshop``, building the goals and the train/test split."""

from __future__ import annotations

import functools
import json
import logging
import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from agentloop.types import Task

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

    def __init__(self, products: Sequence[Product], goal_asins: frozenset[str] = frozenset()) -> None:
        self.products = tuple(products)
        self.by_asin = {p.asin: p for p in self.products}
        self.goal_asins = goal_asins
        """The products some goal (of any split) was made from; the others are only ever found."""
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
    return Catalog(products, frozenset(instructions)), instructions


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


def price_bound(product: Product, rng: np.random.Generator) -> float:
    """A goal's price bound, as WebShop draws it: the higher of two of the four price steps above the price."""
    steps = [p for p in PRICE_STEPS if p > product.price][:4]
    return float(max(rng.choice(steps, 2, replace=False))) if len(steps) >= 2 else NO_PRICE_BOUND


def option_values(product: Product, index: int) -> tuple[tuple[str, str], ...]:
    """The ``index``-th combination of the product's option values (the last option varies fastest)."""
    chosen, rest = [], int(index)
    for name, values in reversed(product.options):
        rest, digit = divmod(rest, len(values))
        chosen.append((name, values[digit]))
    return tuple(reversed(chosen))


def _product_tasks(
    catalog: Catalog, product: Product, instruction: str, attributes: tuple[str, ...], split: str
) -> list[WebShopTask]:
    """The goals of one product: up to :data:`GOALS_PER_PRODUCT` option combinations."""
    rng = np.random.default_rng([SPLIT_SEED, zlib.crc32(product.asin.encode())])
    total = math.prod(len(values) for _, values in product.options)
    picks = range(total) if total <= GOALS_PER_PRODUCT else sorted(rng.choice(total, GOALS_PER_PRODUCT, replace=False))
    tasks = []
    for index in picks:
        upper = price_bound(product, rng)
        goal = Goal(product.asin, instruction, attributes, option_values(product, index), upper)
        task = Task(ENV_NAME, f"{split}-{product.asin}-{int(index):03d}", split, product.shop, goal.text)
        tasks.append(WebShopTask(task, goal, catalog))
    return tasks
