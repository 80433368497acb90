"""Imagined WebShop goals (STE's imagination), made the way WebShop made its own.

WebShop's goals come from a product: a shopper's instruction that asks for some of the product's
mined attributes, one combination of its option values, and a price bound drawn from the price
steps above its price. Here the explorer writes the instruction and names the attributes it asks
for; the option values and the price bound are drawn as WebShop draws them (seeded by the new
task's id). The product is one near the training task: a product of the same product type that
no goal was made from (the shop's distractors), or else the training task's own product, so an
imagined goal never names a held-out goal's product.

:func:`imagined_task` keeps a proposal only when every attribute it names is one of the
product's own (the reward checks attributes against them), the instruction asks for each of
them, does not copy the product's title or name its id, and is not one of the product's
existing instructions; and the scripted expert, searching for the instruction, finds the
product and buys it with full reward in the real environment: WebShop's reward scores it.
"""

from __future__ import annotations

import math
import re
import zlib

import numpy as np

from agentloop.envs.experts import replay_actions
from agentloop.envs.webshop.catalog import ENV_NAME, Goal, Product, WebShopTask, option_values, price_bound
from agentloop.envs.webshop.config import WebShopEnvConfig
from agentloop.envs.webshop.env import WebShopEnv
from agentloop.envs.webshop.experts import expert_actions
from agentloop.types import Task

MAX_ATTRIBUTES = 3
"""Most attributes one imagined goal asks for (WebShop's goals ask for one to three)."""
TITLE_SHARE = 0.8
"""An instruction holding more than this share of the title's words copies the title."""

_INSTRUCTION_RE = re.compile(r"Instruction:\s*(.+?)\s*(?:\n\s*Attributes:|$)", re.IGNORECASE | re.DOTALL)
_ATTRIBUTES_RE = re.compile(r"Attributes:\s*(.+?)\s*(?:\n\s*Instruction:|$)", re.IGNORECASE | re.DOTALL)
_WORD_RE = re.compile(r"[a-z0-9]+")


def product_for(base: WebShopTask) -> Product:
    """The product a goal near ``base`` is imagined for: a product of the same type that no goal was
    made from, chosen by the base task's id, or the base's own product when there is none."""
    own = base.product
    others = sorted(
        (p for p in base.catalog.products if p.query == own.query and p.asin not in base.catalog.goal_asins),
        key=lambda p: p.asin,
    )
    return others[zlib.crc32(base.task.task_id.encode()) % len(others)] if others else own


def proposal_prompt(base: WebShopTask) -> str:
    """What the explorer is asked: a shopper's instruction for the product near ``base``."""
    product = product_for(base)
    options = "; ".join(f"{name}: {', '.join(values)}" for name, values in product.options) or "(none)"
    lines = [
        "Write a new instruction a shopper could give to find this product in an online shop. Ask for the kind "
        f"of product and for 1 to {MAX_ATTRIBUTES} of its attributes (use the attributes listed, word for word); "
        "do not copy its title.",
        f"Product: {product.title}",
        f"Category: {' > '.join(product.category) or product.query}",
        f"Attributes: {'; '.join(product.attributes) or '(none)'}",
        f"Options: {options}",
        f"An example instruction, for a similar product: {base.goal.instruction}",
    ]
    lines.append("Reply exactly as:\nInstruction: ...\nAttributes: first attribute; second attribute")
    return "\n".join(lines)


def parse_proposal(text: str) -> tuple[str, tuple[str, ...]] | str:
    """The (instruction, attributes) of a proposal, or a sentence saying why it cannot be read."""
    instruction = _INSTRUCTION_RE.search(text or "")
    attributes = _ATTRIBUTES_RE.search(text or "")
    if instruction is None or not instruction.group(1).strip():
        return "no instruction"
    if attributes is None:
        return "no attributes"
    named = tuple(a.strip(" .\"'") for a in re.split(r"[;,\n]", attributes.group(1)) if a.strip(" .\"'"))
    if not named:
        return "no attributes"
    return " ".join(instruction.group(1).split()), named


def _words(text: str) -> list[str]:
    return _WORD_RE.findall(text.lower())


def imagined_task(base: WebShopTask, text: str, config: WebShopEnvConfig, task_id: str) -> WebShopTask | str:
    """The goal a proposal describes, for the product near ``base``, or a sentence saying why it is not kept.

    Args:
        base: The training task it is imagined near (its product type, and its shop).
        text: The explorer's proposal (:func:`proposal_prompt`'s format).
        config: The environment's settings; the expert's purchase is replayed under them.
        task_id: The new task's id (split ``imagined``); it seeds the options and the price bound.
    """
    parsed = parse_proposal(text)
    if isinstance(parsed, str):
        return parsed
    instruction, named = parsed
    product = product_for(base)
    own = {a.lower(): a for a in product.attributes}
    unknown = [a for a in named if a.lower() not in own]
    if unknown:
        return f"attributes the product does not have: {unknown[:3]}"
    attributes = tuple(dict.fromkeys(own[a.lower()] for a in named))
    if len(attributes) > MAX_ATTRIBUTES:
        return f"{len(attributes)} attributes (at most {MAX_ATTRIBUTES})"
    words = set(_words(instruction))
    missing = [a for a in attributes if not set(_words(a)) <= words]
    if missing:
        return f"the instruction does not ask for {missing[:3]}"
    title = set(_words(product.title))
    if product.asin.lower() in instruction.lower():
        return "the instruction names the product's id"
    if title and len(title & words) / len(title) > TITLE_SHARE:
        return "the instruction copies the product's title"
    if product.asin == base.goal.asin and _words(instruction) == _words(base.goal.instruction):
        return "the instruction is the training task's own"
    rng = np.random.default_rng(zlib.crc32(task_id.encode()))  # options and price bound, as WebShop draws them
    combinations = math.prod(len(values) for _, values in product.options)
    options = option_values(product, int(rng.integers(combinations)))
    goal = Goal(product.asin, instruction, attributes, options, price_bound(product, rng))
    task = WebShopTask(Task(ENV_NAME, task_id, "imagined", product.shop, goal.text), goal, base.catalog)
    actions = expert_actions(task, config)
    if actions is None:
        return f"a search for the instruction does not find the product in its first {config.max_results} results"
    if len(actions) > config.max_steps:
        return f"buying it takes {len(actions)} steps (at most {config.max_steps})"
    env = WebShopEnv([task], config)
    try:
        if not replay_actions(env, task_id, actions).success:
            return "buying the product with its options does not score full reward"
    finally:
        env.close()
    return task


def judge_evidence(task: WebShopTask, config: WebShopEnvConfig) -> str:
    """What a judge reads of an imagined goal: the goal, and the product it was made for."""
    product = task.product
    options = "; ".join(f"{name}: {value}" for name, value in task.goal.options) or "(none)"
    return "\n".join(
        [
            f"Task: buy a product matching this instruction: {task.task.instruction}",
            f"Solution: buy {product.title} (price {product.price:.2f} dollars) with the options {options}",
            f"The product's attributes: {'; '.join(product.attributes)}",
        ]
    )
