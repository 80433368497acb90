"""The WebShop environment itself: episodes over the shop's pages."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import gymnasium
from gymnasium.error import ResetNeeded

from agentloop.envs.spaces import FreeText
from agentloop.envs.tasks import choose_task, index_tasks
from agentloop.envs.webshop.catalog import WebShopTask
from agentloop.envs.webshop.config import WebShopEnvConfig
from agentloop.envs.webshop.pages import (
    BACK,
    BUY,
    DETAILS,
    FORMAT_HELP,
    NEXT,
    NOTE_SLACK,
    PREV,
    TITLE_CHARS,
    Page,
    cut_text,
    page_buttons,
    parse_action,
    render,
    shown,
)
from agentloop.envs.webshop.scoring import score_purchase

logger = logging.getLogger(__name__)


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
        self.observation_space = FreeText(config.max_observation_chars + NOTE_SLACK)
        self.action_space = FreeText(config.max_action_chars)
        self._task: WebShopTask | None = None
        self._page = Page()
        self._steps = 0
        self._done = True

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[str, dict[str, Any]]:
        """Starts an episode on the search page of the chosen goal."""
        super().reset(seed=seed)
        task = self._choose(options or {})
        self._task, self._page, self._steps, self._done = task, Page(), 0, False
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
        self._page = Page(kind="results", query=query, results=results)
        return _Outcome(render(self._page, self._task.goal, self.config))

    def _click(self, label: str) -> _Outcome:
        assert self._task is not None
        page, wanted = self._page, label.casefold()
        button = next((b for b in page_buttons(page, self.config) if b.casefold() == wanted), None)
        if button is None:
            return self._invalid(f"{shown(label)} is not a button on this page")
        if button == BUY:
            return self._buy()
        if button == BACK:
            self._page = Page()
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
            f"You bought {cut_text(bought.title, TITLE_CHARS)} (options: {options}) for ${bought.price:.2f}. "
            f"Your score: {score.reward:.3f} of 1.0."
        )
        return _Outcome(cut_text(text, self.config.max_observation_chars), reward=score.reward, terminated=True)

    def _invalid(self, why: str) -> _Outcome:
        """An invalid action's observation: what was wrong and what this page allows."""
        buttons = page_buttons(self._page, self.config)
        allowed = "You can click: " + ", ".join(f"[{b}]" for b in buttons) if buttons else "Here you can search[...]"
        text = cut_text(f"Invalid action: {why}. {allowed}.", self.config.max_observation_chars)
        return _Outcome(text, invalid=True)

    def _choose(self, options: dict[str, Any]) -> WebShopTask:
        return choose_task(self.tasks, options, self.np_random)
