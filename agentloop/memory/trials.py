"""STE's exploration episodes: each task played as a chain of trials, each shown what came before.

:class:`Trials` is a task feed for :class:`agentloop.rollout.Rollout`. It hands out a task's
first trial, and when the rollout reports that trial finished (:meth:`Trials.finished`), the
next one, with memory: the experiences long-term memory recalls for the task, then the task's
earlier trials in this stage. Trials of different tasks share the rollout's one generation
stream, so memory costs only its extra prompt tokens.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from agentloop.memory.config import MemoryConfig
from agentloop.memory.long_term import render_experiences
from agentloop.memory.short_term import first_action, render_trials
from agentloop.types import Attempt, Experience, Task, Trajectory

Recall = Callable[[Sequence[Task]], list[list[Experience]]]
"""Tasks in, for each the experiences long-term memory holds for it, most similar first."""
Earlier = Callable[[Sequence[Task]], Mapping[str, Sequence[Trajectory]]]
"""Tasks in, the trials already played of those whose chains were begun elsewhere (a resumed
stage, an actor that died), by their task's ``key``."""


class Trials:
    """A task feed that plays each task of ``tasks`` as a chain of up to ``config.trials`` trials.

    Args:
        tasks: Where first trials come from: a list of tasks or a feed with ``take(n)``.
        config: Trials per task, when a chain ends, memory budgets.
        count: Tokens of a text in the policy's tokenizer (memory budgets).
        recall: Long-term memory; None (or ``config.long_term_tokens`` 0) shows none.
        earlier: Earlier trials of chains to continue; None when every chain starts here.
    """

    def __init__(
        self,
        tasks: Sequence[Task] | Any,
        config: MemoryConfig,
        count: Callable[[str], int],
        *,
        recall: Recall | None = None,
        earlier: Earlier | None = None,
    ) -> None:
        self.tasks = _List(tasks) if isinstance(tasks, Sequence) else tasks
        self.config, self.count, self.recall, self.earlier = config, count, recall, earlier
        self.chains: dict[str, list[Trajectory]] = {}  # the trials of each chain under way
        self.ready: deque[Task] = deque()  # tasks whose next trial can start

    def take(self, n: int) -> list[Attempt]:
        """Up to ``n`` attempts: next trials of chains under way first, then first trials."""
        tasks = [self.ready.popleft() for _ in range(min(n, len(self.ready)))]
        fresh = self.tasks.take(n - len(tasks))
        if fresh and self.earlier is not None:
            for key, trials in self.earlier(fresh).items():
                self.chains[key] = sorted(trials, key=lambda t: t.trial)
        return self._attempts(tasks + fresh)

    def finished(self, trajectory: Trajectory) -> bool:
        """Records a finished trial; returns whether its chain goes on (its next trial is then ready)."""
        key = trajectory.task.key
        if self.config.last_trial(trajectory):
            self.chains.pop(key, None)
            return False
        self.chains.setdefault(key, []).append(trajectory)
        self.ready.append(trajectory.task)
        return True

    def _attempts(self, tasks: list[Task]) -> list[Attempt]:
        config = self.config
        earliers = [self.chains.setdefault(task.key, []) for task in tasks]
        shown = [i for i, earlier in enumerate(earliers) if earlier or config.first_trial_memory]
        recalled = [[] for _ in tasks]
        if shown and self.recall is not None and config.long_term_tokens:
            for i, found in zip(shown, self.recall([tasks[i] for i in shown]), strict=True):
                recalled[i] = found
        attempts = []
        for task, found, earlier in zip(tasks, recalled, earliers, strict=True):
            memory = render_experiences(found, config.long_term_tokens, self.count)
            memory += render_trials(earlier, config.short_term_tokens, self.count)
            retry = config.retry_temperature if earlier else None  # a first trial samples as the rollout does
            avoid = tuple(dict.fromkeys(a for t in earlier if (a := first_action(t)))) if config.redraws else ()
            attempts.append(
                Attempt(task, trial=len(earlier), memory=memory, temperature=retry, avoid=avoid, redraws=config.redraws)
            )
        return attempts


class _List:
    def __init__(self, tasks: Sequence[Task]) -> None:
        self.tasks = deque(tasks)

    def take(self, n: int) -> list[Task]:
        return [self.tasks.popleft() for _ in range(min(n, len(self.tasks)))]
