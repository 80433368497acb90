"""The WebShop environment on the real 1,000-product set, its reward, and its scripted expert."""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path

import pytest
from gymnasium.error import ResetNeeded
from gymnasium.utils.env_checker import check_env
from hostile import PAYLOADS, RAW

from agentloop.config import ConfigError
from agentloop.envs.webshop import WebShopEnv, WebShopEnvConfig, WebShopTask, build_webshop_experts, load_webshop_tasks
from agentloop.envs.webshop.catalog import Goal, Product
from agentloop.envs.webshop.experts import expert_actions
from agentloop.envs.webshop.scoring import score_purchase, type_reward

BED = "train-B0769HRGD2-000"  # a platform bed on the second results page; size: twin, color: blue
LAMP = "train-B00062IG3A-000"  # a floor lamp without options, first on the first results page
OTTOMAN = "train-B08KLHMPP9-000"  # its instruction does not bring its product into the top 50


@pytest.fixture(scope="module")
def train_tasks(data_dir: Path) -> list[WebShopTask]:
    return load_webshop_tasks(data_dir, "train")


@pytest.fixture(scope="module")
def by_id(train_tasks: list[WebShopTask]) -> dict[str, WebShopTask]:
    return {t.task.task_id: t for t in train_tasks}


@pytest.fixture()
def env(by_id: dict[str, WebShopTask]) -> WebShopEnv:
    shop = WebShopEnv([by_id[i] for i in (BED, LAMP, OTTOMAN)], WebShopEnvConfig())
    yield shop
    shop.close()


def test_splits_hold_disjoint_products_with_goal_texts(data_dir: Path, train_tasks: list[WebShopTask]) -> None:
    test_tasks = load_webshop_tasks(data_dir, "test")
    assert (len(train_tasks), len(test_tasks)) == (1423, 336)
    train_products, test_products = {t.goal.asin for t in train_tasks}, {t.goal.asin for t in test_tasks}
    assert (len(train_products), len(test_products)) == (332, 83) and not train_products & test_products
    assert {t.task.kind for t in train_tasks} == {"beauty", "electronics", "fashion", "garden", "grocery"}
    bed = next(t for t in train_tasks if t.task.task_id == BED)
    assert (bed.task.env, bed.task.split, bed.goal.options) == (
        "webshop",
        "train",
        (("size", "twin"), ("color", "blue")),
    )
    assert bed.task.instruction == (
        "Find me beds with wood frame, box spring, solid wood with size: twin, and color: blue, "
        "and price lower than 390.00 dollars"
    )
    assert bed.product.price < bed.goal.price_upper and bed.catalog is test_tasks[0].catalog
    assert [t.task.task_id for t in load_webshop_tasks(data_dir, "train")] == [t.task.task_id for t in train_tasks]


def test_loading_errors_name_the_problem(tmp_path: Path, data_dir: Path) -> None:
    with pytest.raises(ValueError, match="unknown webshop split 'dev'"):
        load_webshop_tasks(data_dir, "dev")
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "webshop")):
        load_webshop_tasks(tmp_path, "train")
    (tmp_path / "webshop").mkdir()
    with pytest.raises(FileNotFoundError, match="products_1k.jsonl"):
        load_webshop_tasks(tmp_path, "train")


def test_config_validation() -> None:
    WebShopEnvConfig().validate()
    with pytest.raises(ConfigError, match="max_steps"):
        WebShopEnvConfig(max_steps=0).validate()
    with pytest.raises(ConfigError, match="max_observation_chars"):
        WebShopEnvConfig(max_detail_chars=5000).validate()


def test_passes_gymnasium_check_env(env: WebShopEnv) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_env(env, skip_render_check=True)


def test_expert_episode_pages_to_the_goal_chooses_options_and_scores_one(
    env: WebShopEnv, by_id: dict[str, WebShopTask]
) -> None:
    actions = expert_actions(by_id[BED], env.config)
    assert actions is not None and actions[1:] == [
        "click[Next >]",
        "click[B0769HRGD2]",
        "click[twin]",
        "click[blue]",
        "click[Buy Now]",
    ]
    observation, info = env.reset(options={"task_id": BED})
    assert info["task"].task_id == BED and "[Search]" in observation and "search[" in observation
    for action in actions:
        observation, reward, terminated, truncated, info = env.step(action)
        assert env.observation_space.contains(observation) and not info["invalid"]
    assert (reward, terminated, truncated, info["success"]) == (1.0, True, False, True)
    assert "Your score: 1.000" in observation


def test_pagination_details_and_back_navigation(env: WebShopEnv) -> None:
    env.reset(options={"task_id": BED})
    first, *_ = env.step("Thought: beds.\nAction: search[platform bed solid wood]")
    assert first.startswith("[Back to Search] [SEP] Page 1 (Total results: 50) [SEP] [Next >] [SEP] [")
    second, *_ = env.step("click[next >]")
    assert "Page 2 (Total results: 50)" in second and "[< Prev]" in second and second != first
    assert env.step("click[< Prev]")[0] == first
    env.step("click[Next >]")
    asin = second.split(" [SEP] ")[4].strip("[]")
    item, *_ = env.step(f"click[{asin.lower()}]")
    assert "[Buy Now]" in item and "[Description]" in item
    described, *_ = env.step("click[Description]")
    assert described.startswith("[Back to Search] [SEP] [< Prev] [SEP] ")
    assert env.step("click[< Prev]")[0] == item
    assert env.step("click[< Prev]")[0] == second
    search, *_ = env.step("click[Back to Search]")
    assert search.startswith("WebShop [SEP] Instruction: [SEP] Find me beds")
    _, _, _, truncated, info = env.step("search[twin bed]")
    assert not info["invalid"] and truncated  # the tenth action


def test_invalid_actions_explain_and_cost_a_step(by_id: dict[str, WebShopTask]) -> None:
    env = WebShopEnv([by_id[LAMP]], WebShopEnvConfig(max_steps=5))
    env.reset()
    obs, _, _, _, info = env.step("click[Search]")
    assert info["invalid"] and "not a button" in obs and "search[...]" in obs
    env.step("search[floor lamp]")
    obs, _, _, _, info = env.step("search[lamp]")
    assert info["invalid"] and "no search box" in obs and "[Back to Search]" in obs
    obs, _, _, _, info = env.step("buy the lamp")
    assert info["invalid"] and "is not search[...] or click[...]" in obs
    obs, reward, terminated, truncated, info = env.step("click[Buy Now]")
    assert info["invalid"] and (reward, terminated, truncated) == (0.0, False, True)
    with pytest.raises(ResetNeeded):
        env.step("click[Back to Search]")


def test_step_limit_truncates_and_then_needs_reset(by_id: dict[str, WebShopTask]) -> None:
    env = WebShopEnv([by_id[LAMP]], WebShopEnvConfig(max_steps=2))
    with pytest.raises(ResetNeeded):
        env.step("search[lamp]")
    env.reset()
    assert env.step("search[lamp]")[1:4] == (0.0, False, False)
    _, reward, terminated, truncated, info = env.step("click[Back to Search]")
    assert (reward, terminated, truncated, info["success"]) == (0.0, False, True, False)
    with pytest.raises(ResetNeeded):
        env.step("search[lamp]")
    assert env.reset(options={"task_id": LAMP})[0].endswith("[Search]")


def test_wrong_option_or_wrong_product_bought_in_the_shop_scores_less(
    env: WebShopEnv, by_id: dict[str, WebShopTask]
) -> None:
    actions = expert_actions(by_id[BED], env.config)
    assert actions is not None
    assert play(env, BED, [*actions[:3], "click[full]", *actions[4:]]) == pytest.approx(5 / 6)  # size wrong
    assert play(env, BED, [*actions[:3], "click[Buy Now]"]) == pytest.approx(4 / 6)  # no option chosen
    lamp = expert_actions(by_id[LAMP], env.config)
    assert lamp is not None and play(env, BED, [lamp[0], lamp[1], "click[Buy Now]"]) == 0.0  # a lamp, not a bed


def play(env: WebShopEnv, task_id: str, actions: list[str]) -> float:
    env.reset(options={"task_id": task_id})
    reward = 0.0
    for action in actions:
        _, reward, _, _, _ = env.step(action)
    return reward


SHIRT = Product(
    asin="A1",
    title="Cotton Crew Neck Shirt Classic Summer Tee Casual",
    description="A soft tee with short sleeve cut.",
    features=("Machine wash cold",),
    category=("Clothing", "Men", "Shirts"),
    query="men's t-shirts",
    attributes=("machine wash",),
    options=(("size", ("small", "large")), ("color", ("black", "white"))),
    price=20.0,
    shop="fashion",
    text="",
)
GOAL = Goal(
    "A1",
    "Find me machine wash, short sleeve shirts",
    ("machine wash", "short sleeve"),
    (("size", "large"), ("color", "black")),
    30.0,
)


@pytest.mark.parametrize(
    ("bought", "chosen", "reward"),
    [
        (SHIRT, {"size": "large", "color": "black"}, 1.0),  # (2 attributes + 2 options + price) / 5
        (SHIRT, {"size": "small", "color": "black"}, 4 / 5),  # one wrong option
        (SHIRT, {}, 3 / 5),  # no option chosen
        (dataclasses.replace(SHIRT, price=35.0), {"size": "large", "color": "black"}, 4 / 5),  # over the bound
        (dataclasses.replace(SHIRT, description="A soft tee."), {"size": "large", "color": "black"}, 4 / 5),
        (SHIRT, {"size": "x-large", "color": "black"}, 4 / 5),  # a size must be exact, not a fuzzy match
    ],
)
def test_reward_parts_by_hand(bought: Product, chosen: dict[str, str], reward: float) -> None:
    assert score_purchase(bought, chosen, SHIRT, GOAL).reward == pytest.approx(reward)


def test_type_reward_by_title_query_and_category() -> None:
    other = dataclasses.replace(SHIRT, query="aprons", category=("Home", "Kitchen"))
    assert type_reward(SHIRT, SHIRT) == 1.0
    assert type_reward(dataclasses.replace(other, title="Classic Crew Shirt"), SHIRT) == 1.0  # 3 of 8 title words
    assert type_reward(dataclasses.replace(other, title="Classic Apron"), SHIRT) == 0.5  # 1 of 8 words
    assert type_reward(dataclasses.replace(other, title="Classic Apron", query="men's t-shirts"), SHIRT) == 1.0
    assert type_reward(dataclasses.replace(other, title="Classic Apron", category=("Clothing", "Men")), SHIRT) == 1.0
    wordy = dataclasses.replace(SHIRT, title=SHIRT.title + " Breathable Stretch Slim Fit Solid Pocket")  # 14 words
    assert type_reward(dataclasses.replace(other, title="Classic Apron"), wordy) == 0.1
    knives = dataclasses.replace(other, title="Stainless Steel Kitchen Knife Set")
    assert type_reward(knives, SHIRT) == 0.0
    assert score_purchase(knives, {"size": "large", "color": "black"}, SHIRT, GOAL).reward == 0.0


def test_experts_report_successes_and_failure_classes(by_id: dict[str, WebShopTask]) -> None:
    tasks = [by_id[BED], by_id[LAMP], by_id[OTTOMAN]]
    demos, report = build_webshop_experts(tasks, WebShopEnvConfig())
    assert [d.task.task_id for d in demos] == [BED, LAMP]
    assert all(d.success and d.reward == 1.0 and d.source == "expert" and d.invalid_actions == 0 for d in demos)
    assert report["failures"] == {"not_found": {"count": 1, "examples": [OTTOMAN]}}
    assert report["by_kind"] == {"garden": {"attempted": 3, "succeeded": 2}}
    _, short = build_webshop_experts([by_id[BED]], WebShopEnvConfig(max_steps=5))
    assert short["failures"] == {"too_long": {"count": 1, "examples": [BED]}}


def test_reset_is_seeded_and_rejects_unknown_tasks(env: WebShopEnv) -> None:
    first = [env.reset(seed=3)[1]["task"].task_id] + [env.reset()[1]["task"].task_id for _ in range(6)]
    again = [env.reset(seed=3)[1]["task"].task_id] + [env.reset()[1]["task"].task_id for _ in range(6)]
    assert first == again and len(set(first)) > 1
    with pytest.raises(KeyError, match="train-nothing"):
        env.reset(options={"task_id": "train-nothing"})
    with pytest.raises(ValueError, match="unknown reset option"):
        env.reset(options={"goal": 1})


def hostile_actions() -> list[object]:
    wrapped = [f"{verb}[{payload}]" for payload in PAYLOADS for verb in ("search", "click")]
    return [*RAW, *wrapped]


@pytest.mark.parametrize("page", ["search", "results", "item"])
def test_hostile_actions_become_observations(env: WebShopEnv, page: str) -> None:
    lead = {"search": [], "results": ["search[bed]"], "item": ["search[bed]", "click[B0769HRGD2]"]}
    for action in hostile_actions():
        env.reset(options={"task_id": BED})
        for step in lead[page]:
            assert not env.step(step)[4]["invalid"]
        obs, reward, terminated, truncated, info = env.step(action)  # type: ignore[arg-type]
        assert isinstance(obs, str) and env.observation_space.contains(obs), repr(action)[:80]
        assert reward == 0.0 and not info["success"] and not terminated


def test_registry_loads_makes_and_builds_experts(data_dir: Path) -> None:
    from agentloop import envs

    tasks = envs.load_tasks("webshop", data_dir, "test")[:3]
    env = envs.make_env("webshop", tasks, WebShopEnvConfig())
    observation, info = env.reset(options={"task_id": tasks[0].task.task_id})
    assert info["task"] == tasks[0].task and isinstance(observation, str)
    demos, _ = envs.build_experts("webshop", tasks, WebShopEnvConfig(), None, seed=0)
    assert demos and all(d.success and d.task.env == "webshop" for d in demos)
    with pytest.raises(TypeError):
        envs.build_experts("webshop", tasks, WebShopEnvConfig(), object(), seed=0)


# Tampering: no action sequence may raise the reward above what buying that product with the
# options chosen on its own page earns. Each case pairs a tampered episode on BED with the
# same episode without the tampering; the two must score the same.
SEARCH = (
    "search[Find me beds with wood frame, box spring, solid wood with size: twin, and color: blue, "
    "and price lower than 390.00 dollars]"
)
NEXT, OPEN, BUY = "click[Next >]", "click[B0769HRGD2]", "click[Buy Now]"  # BED is on the second page
MATTRESS = "click[B01A0L5FXA]"  # first page: a queen mattress with a "twin" size option, over BED's price bound
TAMPERING = {
    "options chosen on another product are not carried over": (
        [SEARCH, MATTRESS, "click[twin]", "click[< Prev]", NEXT, OPEN, BUY],
        [SEARCH, NEXT, OPEN, BUY],
    ),
    "options chosen then the product reopened are dropped": (
        [SEARCH, NEXT, OPEN, "click[twin]", "click[blue]", "click[< Prev]", OPEN, BUY],
        [SEARCH, NEXT, OPEN, BUY],
    ),
    "option labels clicked on the search and results pages": (
        ["click[twin]", SEARCH, "click[blue]", NEXT, "click[twin]", OPEN, BUY],
        [SEARCH, NEXT, OPEN, BUY],
    ),
    "other products' option values on this item page": (  # each would match the goal's "blue" or be a size
        [SEARCH, NEXT, OPEN, "click[light blue]", "click[aqua blue]", "click[king]", BUY],
        [SEARCH, NEXT, OPEN, BUY],
    ),
    "one value clicked twice counts once": (
        [SEARCH, NEXT, OPEN, "click[blue]", "click[blue]", BUY],
        [SEARCH, NEXT, OPEN, "click[blue]", BUY],
    ),
    "two values of one option: the last one counts": (
        [SEARCH, NEXT, OPEN, "click[twin]", "click[full]", "click[blue]", BUY],
        [SEARCH, NEXT, OPEN, "click[full]", "click[blue]", BUY],
    ),
    "near-miss labels choose nothing": (
        [
            SEARCH,
            NEXT,
            OPEN,
            "click[\uff54\uff57\uff49\uff4e]",
            "click[twin\u200b]",
            "click[twin xl]",
            "click[twi]",
            BUY,
        ],
        [SEARCH, NEXT, OPEN, BUY],
    ),
    "two actions in one reply": (
        [SEARCH, NEXT, OPEN, "click[twin] click[blue]", "click[blue]\nclick[twin]", BUY],
        [SEARCH, NEXT, OPEN, BUY],
    ),
    "only the last Action: counts": (
        [SEARCH, NEXT, OPEN, "click[blue]", "Action: click[twin]\nAction: click[Buy Now]"],
        [SEARCH, NEXT, OPEN, "click[blue]", BUY],
    ),
    "page markup injected through a search": (
        ["search[[Buy Now] [SEP] [twin] [SEP] [blue]]", BUY, "click[twin]", "click[Back to Search]"]
        + [SEARCH, NEXT, OPEN, BUY],
        [SEARCH, NEXT, OPEN, BUY],
    ),
    "Buy Now away from an item page": (
        [BUY, SEARCH, BUY, NEXT, OPEN, "click[Description]", BUY, "click[< Prev]", "click[twin]", "click[< Prev]", BUY]
        + [OPEN, "click[twin]", BUY],
        [SEARCH, NEXT, OPEN, "click[twin]", BUY],
    ),
    "paging past the end and back": (
        [SEARCH, *[NEXT] * 5, *["click[< Prev]"] * 3, OPEN, BUY],
        [SEARCH, NEXT, OPEN, BUY],
    ),
    "the goal product's ASIN clicked on another product's page": (
        [SEARCH, MATTRESS, "click[twin]", OPEN, BUY],
        [SEARCH, MATTRESS, "click[twin]", BUY],
    ),
    "over-long, combining and control characters": (
        [SEARCH, NEXT, OPEN, "click[" + "twin " * 300 + "]", "click[twin\u0301]", "click[tw\x00in]", BUY],
        [SEARCH, NEXT, OPEN, BUY],
    ),
    "case and spaces pick the product's own value": (
        [SEARCH, NEXT, OPEN, "click[  TWIN \t]", "click[\u00a0Blue]", BUY],
        [SEARCH, NEXT, OPEN, "click[twin]", "click[blue]", BUY],
    ),
}


@pytest.fixture(scope="module")
def roomy(by_id: dict[str, WebShopTask]) -> WebShopEnv:
    shop = WebShopEnv([by_id[BED]], WebShopEnvConfig(max_steps=30))
    yield shop
    shop.close()


def episode(env: WebShopEnv, actions: list[str]) -> tuple[float, bool, str]:
    """Plays ``actions`` on BED; the reward, whether the episode ended, and the last observation."""
    env.reset(options={"task_id": BED})
    for action in actions:
        observation, reward, terminated, truncated, info = env.step(action)
        if terminated or truncated:
            break
    assert info["success"] == (reward == 1.0)
    return reward, terminated, observation


@pytest.mark.parametrize("case", TAMPERING)
def test_tampering_does_not_change_the_reward(roomy: WebShopEnv, case: str) -> None:
    tampered, clean = TAMPERING[case]
    reward, terminated, observation = episode(roomy, tampered)
    clean_reward, clean_terminated, clean_observation = episode(roomy, clean)
    assert terminated and clean_terminated
    assert (reward, observation) == (clean_reward, clean_observation)


def test_reward_reads_the_bought_product_and_its_own_values(roomy: WebShopEnv, by_id: dict[str, WebShopTask]) -> None:
    reward, _, observation = episode(roomy, [SEARCH, NEXT, OPEN, "click[ TWIN ]", "click[BLUE]", BUY])
    assert reward == 1.0 and "(options: size: twin, color: blue)" in observation  # the catalog's text, not the click's
    bed = by_id[BED]
    mattress = bed.catalog.by_asin["B01A0L5FXA"]
    reward, _, _ = episode(roomy, [SEARCH, MATTRESS, "click[twin]", BUY])
    score = score_purchase(mattress, {"size": "twin"}, bed.product, bed.goal)
    assert mattress.price > bed.goal.price_upper and not score.price_ok and reward == score.reward < 1.0


def test_bracketed_words_in_titles_are_not_buttons(roomy: WebShopEnv) -> None:
    roomy.reset(options={"task_id": BED})
    results, *_ = roomy.step("search[hdmi cable 3 pack braided]")
    assert "[3 Pack]" in results  # a title's text (B08QSNM69H) that looks like a button
    observation, reward, terminated, _, info = roomy.step("click[3 Pack]")
    assert info["invalid"] and "not a button" in observation and (reward, terminated) == (0.0, False)


PANTRY = "train-B003I567W4-000"  # crackers; size: 4.25 ounce (pack of 1), which fuzzily matches every other size


@pytest.mark.parametrize("size", ["4.25 ounce (pack of 12)", "7.7 ounce (pack of 1)"])
def test_a_wrong_size_scores_as_no_size(by_id: dict[str, WebShopTask], size: str) -> None:
    env = WebShopEnv([by_id[PANTRY]], WebShopEnvConfig())
    actions = expert_actions(by_id[PANTRY], env.config)
    assert actions is not None and actions[-2:] == ["click[4.25 ounce (pack of 1)]", BUY]
    assert play(env, PANTRY, actions) == 1.0
    assert play(env, PANTRY, [*actions[:-2], f"click[{size}]", BUY]) == play(env, PANTRY, [*actions[:-2], BUY]) < 1.0
