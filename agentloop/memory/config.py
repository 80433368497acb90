"""Settings of STE's exploration memory."""

from __future__ import annotations

from dataclasses import dataclass, field

from agentloop.config import ConfigError
from agentloop.endpoint import EndpointConfig
from agentloop.types import Trajectory

RECALL = ("solved", "all")


@dataclass
class MemoryConfig:
    """How many trials a task gets, what each one is shown, and who reflects."""

    trials: int = 3
    """Attempts per task in an exploration stage (1 = ETO's single pass)."""
    stop_on_success: bool = True
    """A task's trials end at its first success (else every task gets ``trials`` attempts)."""
    short_term_tokens: int = 512
    """Budget of the earlier trials shown to a later one (0 = no short-term memory); the
    oldest material is dropped first."""
    long_term_tokens: int = 256
    """Budget of the retrieved experiences shown at the start of a trial (0 = no long-term memory)."""
    long_term_k: int = 3
    """Experiences retrieved per trial, most similar first."""
    first_trial_memory: bool = False
    """Whether a task's first trial is shown long-term memory (it has no short-term memory yet), as
    STE's explorer is (the ablation's ``long_term``, ``imagined`` and ``full`` rows set it). Off, the
    first trial is ETO's greedy pass, unchanged, and memory informs the retries only, so exploration
    solves at least what that pass solves. On, the 270M default solved fewer training tasks at its
    first trial than ETO's greedy pass from the same SFT policy, on both seeds (37 against 57 of 250,
    exact McNemar p = 0.0012; seed 1: 37 against 59, p = 0.0007): 40% of the first actions shown
    memory named a table, column or value found only in another task's experience, and those solved
    1 task in 77. Held out, on seed 0's trunk, the round trained on that exploration reached 14/60
    (ETO's round 13/60, p = 1.0); off with ``redraws=4`` (the ``redraw`` row), 18/60: 4 gained and
    0 lost against it, p = 0.125, after exploring 62 tasks against its 43 (30 gained, 11 lost,
    p = 0.0043; README)."""
    recall: str = "solved"
    """Which experiences a trial is shown: ``solved`` (those that solved their task, each with its
    actions: worked examples) or ``all`` (every outcome, as STE's memory lists its queries). With
    ``all``, most of what the 270M default was shown had failed, its lesson an action; solved
    ones did not help it either (see ``first_trial_memory``). Imagination's tasks to avoid always
    come from every experience."""
    retry_temperature: float = 0.7
    """Sampling temperature of every trial after the first (0 = greedy, as the first trial always
    is): a small policy shown its failure mostly repeats it when decoding greedily."""
    redraws: int = 0
    """Times a retry's first turn is drawn again (at ``retry_temperature``) while it repeats, verbatim,
    the first action of an earlier trial of its task (0 = never). Shown its failed trial, the 270M
    default began 269 of 382 retries with that trial's first action, and solved none of them. With 4
    redraws (the ablation's ``redraw`` row) 8 of 379 did, and the retries still solved only 2: what
    holds the small policy back is the memory in its prompt, not the repetition."""
    reflect: bool = True
    """After each trial the policy writes a short reflection (one more turn of the same
    conversation, at most ``reflection_tokens``), kept for later trials and long-term
    memory; it is never trained on."""
    reflection_tokens: int = 64
    """Most tokens of the policy's reflection (STE's are a sentence or two; 0 = the rollout's
    ``max_new_tokens``)."""
    teacher: EndpointConfig = field(default_factory=EndpointConfig)
    """Who reflects: empty ``url`` = the policy; else a teacher model behind an OpenAI-compatible
    endpoint reads each trial's transcript and writes the reflection."""

    def validate(self) -> None:
        if self.trials < 1:
            raise ConfigError(f"trials must be >= 1, got {self.trials}")
        if min(self.short_term_tokens, self.long_term_tokens, self.long_term_k) < 0:
            raise ConfigError("short_term_tokens, long_term_tokens and long_term_k must be >= 0")
        if self.reflection_tokens < 0:
            raise ConfigError(f"reflection_tokens must be >= 0, got {self.reflection_tokens}")
        if self.retry_temperature < 0:
            raise ConfigError(f"retry_temperature must be >= 0, got {self.retry_temperature}")
        if self.redraws < 0:
            raise ConfigError(f"redraws must be >= 0, got {self.redraws}")
        if self.redraws and not self.retry_temperature:
            raise ConfigError("redraws: a greedy retry (retry_temperature=0) would be drawn the same again; set both")
        if self.recall not in RECALL:
            raise ConfigError(f"recall must be one of {', '.join(RECALL)}, got {self.recall!r}")
        if self.long_term_tokens and not self.long_term_k:
            raise ConfigError("long_term_k must be >= 1 when long_term_tokens is set")

    @property
    def memory_tokens(self) -> int:
        """Most tokens memory adds to a trial's first prompt."""
        return self.short_term_tokens + self.long_term_tokens

    def last_trial(self, trajectory: Trajectory) -> bool:
        """Whether ``trajectory`` ends its task's chain of trials."""
        return trajectory.trial + 1 >= self.trials or (self.stop_on_success and trajectory.success)
