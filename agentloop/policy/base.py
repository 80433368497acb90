"""What every policy backend offers the rollout: batched generation over token prompts."""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

from agentloop.config import ConfigError
from agentloop.policy.chat import ChatTokenizer


@dataclass
class SamplingConfig:
    """How completions are drawn. ETO explores and evaluates greedily (temperature 0)."""

    temperature: float = 0.0
    """0 means greedy decoding."""
    top_p: float = 1.0
    max_new_tokens: int = 160
    """Budget of one assistant turn; a turn cut here ends without the stop token."""
    seed: int = 0

    def validate(self) -> None:
        if self.temperature < 0:
            raise ConfigError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")


@dataclass
class PolicyConfig:
    """Which model acts and how it is run."""

    model: str = "gemma3-270m"
    """``gemma3-270m`` (the embedded default), a checkpoint directory, or a cached model name."""
    backend: Literal["transformers"] = "transformers"
    """Generation engine. (vLLM is the next backend; the seam is :class:`Policy`.)"""
    dtype: Literal["bfloat16", "float32"] = "bfloat16"
    """bf16 runs 3x faster than fp32 on CPUs with AMX/AVX-512-bf16 (see STACK.md)."""
    batch_size: int = 32
    """Most prompts generated together in one forward pass."""
    prefix_cache_tokens: int = 65536
    """Tokens of finished turns whose keys and values are kept, so the next turn of a
    conversation prefills only its new tokens (0 = off). About 18 KB per token for Gemma 3 270M."""

    def validate(self) -> None:
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.prefix_cache_tokens < 0:
            raise ConfigError(f"prefix_cache_tokens must be >= 0, got {self.prefix_cache_tokens}")


@dataclass(frozen=True)
class Generation:
    """One completion."""

    token_ids: tuple[int, ...]
    """Generated ids, the stop token included when one was produced, no padding."""
    text: str
    """Decoded completion without the stop token."""
    finished: bool
    """True if the stop token ended the turn, False if ``max_new_tokens`` did."""


class GenerationStream(Protocol):
    """Requests in, finished generations out, as they finish (continuous batching)."""

    def add(self, key: Hashable, prompt: Sequence[int]) -> None:
        """Queues a prompt; ``key`` names it in what :meth:`step` returns."""
        ...

    @property
    def busy(self) -> bool:
        """True while a queued or running request has not been returned."""
        ...

    def step(self) -> list[tuple[Hashable, Generation]]:
        """Advances generation a little; returns the requests that finished meanwhile."""
        ...


class LockstepStream:
    """A stream over any :class:`Policy`: each step completes every queued prompt in one call."""

    def __init__(self, policy: Policy, sampling: SamplingConfig) -> None:
        self.policy, self.sampling = policy, sampling
        self.queue: list[tuple[Hashable, Sequence[int]]] = []

    def add(self, key: Hashable, prompt: Sequence[int]) -> None:
        self.queue.append((key, prompt))

    @property
    def busy(self) -> bool:
        return bool(self.queue)

    def step(self) -> list[tuple[Hashable, Generation]]:
        queue, self.queue = self.queue, []
        generations = self.policy.generate([prompt for _, prompt in queue], self.sampling) if queue else []
        return [(key, gen) for (key, _), gen in zip(queue, generations, strict=True)]


def open_stream(policy: Policy, sampling: SamplingConfig) -> GenerationStream:
    """The policy's own stream if it batches continuously, else a :class:`LockstepStream`."""
    stream = getattr(policy, "stream", None)
    return stream(sampling) if stream is not None else LockstepStream(policy, sampling)


class Policy(Protocol):
    """A model that continues token prompts; the rollout needs nothing else."""

    chat: ChatTokenizer
    """Turn format and tokenizer the policy's prompts are written in."""
    version: int
    """Version of the weights (0 = base model), bumped each time an adapter is loaded."""

    def generate(self, prompts: Sequence[Sequence[int]], sampling: SamplingConfig) -> list[Generation]:
        """Completes each prompt once, in order."""
        ...
