"""WebShop's scripted expert: search, page to the goal product, open it, choose the options, buy."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from agentloop.envs.experts import ExpertReport, replay_actions
from agentloop.envs.webshop.catalog import WebShopTask
from agentloop.envs.webshop.config import WebShopEnvConfig
from agentloop.envs.webshop.env import WebShopEnv
from agentloop.envs.webshop.pages import BUY, NEXT
from agentloop.types import Trajectory

logger = logging.getLogger(__name__)


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
