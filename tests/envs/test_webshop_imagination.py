"""Imagined WebShop goals: made from a product's own attributes, options and price as WebShop made
its goals, never for a held-out goal's product, and scored by the real environment's reward."""

from __future__ import annotations

import pytest

from agentloop.envs import load_tasks, make_env
from agentloop.envs.webshop import WebShopEnvConfig
from agentloop.envs.webshop.imagine import judge_evidence, product_for
from agentloop.memory.imagination import build, requests

CONFIG = WebShopEnvConfig()


@pytest.fixture(scope="module")
def train(data_dir):
    return load_tasks("webshop", data_dir, "train")


def proposal(instruction: str, attributes: list[str]) -> str:
    return f"Instruction: {instruction}\nAttributes: {'; '.join(attributes)}\n"


def test_goals_are_imagined_for_products_near_the_training_task_and_never_for_held_out_ones(train, data_dir):
    held_out = {t.goal.asin for t in load_tasks("webshop", data_dir, "test")}
    chosen = [product_for(base) for base in train]
    assert not {p.asin for p in chosen} & held_out
    assert all(p.query == base.product.query for p, base in zip(chosen, train, strict=True))
    assert sum(p.asin != base.goal.asin for p, base in zip(chosen, train, strict=True)) > len(train) // 2
    base = next(b for b in train if len(product_for(b).attributes) >= 2 and product_for(b).options)
    prompt = requests([base], None)[0]
    assert f"Attributes: {'; '.join(product_for(base).attributes)}" in prompt and base.goal.instruction in prompt


def test_a_kept_goal_has_the_products_options_and_price_bound_and_the_env_scores_it(train):
    base = next(b for b in train if len(product_for(b).attributes) >= 2 and product_for(b).options)
    product = product_for(base)
    wanted = list(product.attributes[:2])
    text = proposal(f"i am looking for a {product.query} that is {wanted[0]} and {wanted[1]}", wanted)
    proposals, tasks = build([base], [text], {"webshop": CONFIG}, "imagine/1")
    assert proposals[0].valid, proposals[0].reason
    (task,) = tasks
    goal = task.goal
    assert task.task.split == "imagined" and goal.asin == product.asin and goal.attributes == tuple(wanted)
    assert [name for name, _ in goal.options] == [name for name, _ in product.options]
    assert all(value in dict(product.options)[name] for name, value in goal.options)
    assert product.price < goal.price_upper and task.task.instruction == goal.text
    assert build([base], [text], {"webshop": CONFIG}, "imagine/1")[1] == tasks  # the same draw on a rebuild

    # The real environment scores it by WebShop's reward: the product with its options is full reward,
    # the product with another option value is not.
    env = make_env("webshop", tasks, CONFIG)
    try:
        env.reset(options={"task_id": task.task.task_id})
        env.step(f"search[{task.task.instruction}]")
        observation = env.step(f"click[{product.asin}]")[0]
        assert product.title[:20] in observation
        for _, value in goal.options:
            env.step(f"click[{value}]")
        assert env.step("click[Buy Now]")[1] == 1.0
        name, value = goal.options[0]
        other = next(v for v in dict(product.options)[name] if v != value)
        env.reset(options={"task_id": task.task.task_id})
        env.step(f"search[{task.task.instruction}]")
        env.step(f"click[{product.asin}]")
        env.step(f"click[{other}]")
        assert env.step("click[Buy Now]")[1] < 1.0
    finally:
        env.close()
    evidence = judge_evidence(task, CONFIG)
    assert task.task.instruction in evidence and product.title in evidence


def test_goals_the_reward_cannot_score_fairly_are_refused_with_the_reason(train):
    base = next(b for b in train if len(product_for(b).attributes) >= 2)
    product = product_for(base)
    a, b = product.attributes[:2]
    cases = [
        (proposal(f"a {product.query} that is {a}", [a, "made of moon rock"]), "attributes the product does not have"),
        (proposal(f"a {product.query} that is {a}", [a, b]), "the instruction does not ask for"),
        (proposal(f"{product.title} {a}", [a]), "copies the product's title"),
        (proposal(f"item {product.asin} {a}", [a]), "names the product's id"),
        ("Instruction: a lamp", "no attributes"),
        ("Attributes: x", "no instruction"),
    ]
    for text, reason in cases:
        proposals, tasks = build([base], [text], {"webshop": CONFIG}, "imagine/1")
        assert tasks == [] and reason in proposals[0].reason, (text, proposals[0].reason)
