"""STE's memory (Wang et al. 2024): several trials per task, each shown what came before.

* Short-term memory (:mod:`.short_term`): the earlier trials of the same task in the same
  stage, their actions, outcomes and reflections, within a token budget.
* Long-term memory (:mod:`.long_term`): experiences distilled from every trial the run kept,
  retrieved by embedding similarity to the task at hand.
* :mod:`.trials`: the task feed that turns each task into a chain of trials for a rollout.

Nothing here imports torch or ray at import time: the embedding model loads on first use.
"""

from agentloop.memory.config import MemoryConfig
from agentloop.memory.long_term import LongTermMemory, render_experiences
from agentloop.memory.short_term import distill, render_trials
from agentloop.memory.trials import Trials

__all__ = ["LongTermMemory", "MemoryConfig", "Trials", "distill", "render_experiences", "render_trials"]
