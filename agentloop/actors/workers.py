"""The two Ray actors of the loop: a rollout worker that acts, a learner that trains.

Both are plain classes wrapped with ``ray.remote`` by :func:`start_workers`, so they are
also usable (and tested) without Ray. The driver owns the replay store; workers only
return records.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from agentloop.actors.transfer import Files, pack_dir, unpack_dir
from agentloop.config import ConfigError
from agentloop.types import Pair, Source, Trajectory

logger = logging.getLogger(__name__)


def set_threads(threads: int) -> int:
    """Sets torch's thread count: ``threads``, or (0) every core this process may run on.

    Ray sets ``OMP_NUM_THREADS`` to an actor's CPU reservation (1 here), which would leave
    all but one core idle; the loop runs one actor at a time, so each may use them all.
    """
    import torch

    torch.set_num_threads(threads or len(os.sched_getaffinity(0)))
    return torch.get_num_threads()


def allocator_env() -> dict[str, str]:
    """Environment variables that give the learner's process an allocator that returns memory.

    A training step allocates and frees gigabytes in tensors of ever-changing sizes; glibc's
    malloc raises its mmap threshold as big blocks are freed, then serves them from heaps
    that fragment and never shrink. On a default run's 24 longest DPO pairs the learner's
    peak went from 4.5 GiB to 3.5 GiB with jemalloc (as PyTorch advises for CPU) and to
    3.1 GiB with glibc at fixed thresholds.
    jemalloc is used when the driver's node has it (apt ``libjemalloc2``; ``scripts/setup.sh``
    installs it), with a background thread that hands idle pages back; otherwise glibc
    with fixed thresholds. A variable already set in the driver's environment wins.

    The rollout worker keeps glibc's defaults (:func:`start_workers`): its decode engine
    keeps one key/value buffer and edits it in place, so the heap stays bounded, and
    jemalloc slows generation. ``bench/generation_throughput.py --workloads stream`` on 250
    DB episodes: 165 tokens/s and a 3.84 GiB peak under glibc, 149 tokens/s and 2.58 GiB
    under jemalloc (the engine before this change: 95 tokens/s and 11.0 GiB under glibc).
    """
    from ctypes.util import find_library

    jemalloc = find_library("jemalloc")
    if jemalloc:
        env = {"LD_PRELOAD": jemalloc, "MALLOC_CONF": "background_thread:true,dirty_decay_ms:5000"}
    else:
        env = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}
    return {k: v for k, v in env.items() if k not in os.environ}


def release_memory() -> None:
    """Returns freed heap to the OS, so an idle actor does not keep its peak while another works.

    glibc keeps freed blocks (a stage's activations, a trainer's model) mapped; the rollout and
    the learner take turns on one machine, so each one's high-water mark would otherwise add up.
    (Under jemalloc, see :func:`allocator_env`, its background thread does this; the call is harmless.)
    """
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


class RolloutWorker:
    """Runs episodes of one or more environments with the current policy, in one generation stream.

    Built in two steps, so a fleet can first see where Ray placed its actors: the constructor
    only keeps its arguments; :meth:`start` takes this actor's share of its node's cores and
    builds the policy.
    """

    def __init__(
        self,
        policy_config: Any,
        rollout_config: Any,
        env_configs: dict[str, Any],
        tasks: Sequence[Any],
        threads: int = 0,
    ) -> None:
        """``env_configs`` maps each env name to its config; ``tasks`` are env task objects of those envs."""
        logging.basicConfig(level=logging.INFO)
        self.policy_config, self.rollout_config, self.threads = policy_config, rollout_config, threads
        self.env_configs = dict(env_configs)
        self.tasks = {(t.task.env, t.task.task_id): t for t in tasks}
        self._env_tasks: dict[str, list[Any]] = {}  # what each env is built over
        for task in tasks:
            self._env_tasks.setdefault(task.task.env, []).append(task)
        self._adapter_dir = Path(tempfile.mkdtemp(prefix="agentloop-adapter-"))
        self.policy: Any = None

    def node(self) -> str:
        """The Ray node this actor runs on."""
        import ray

        return ray.get_runtime_context().get_node_id()

    def start(self, share: int = 0, of: int = 1) -> list[int]:
        """Keeps to share ``share`` of ``of`` equal slices of the cores this process may use (its
        node's, when ``of`` rollout actors share the node), then builds the policy; returns the cores.

        torch's threads (``threads``, 0 = one per core kept) and vLLM's OpenMP threads stay on them.
        """
        from agentloop.policy import make_policy

        cores = sorted(os.sched_getaffinity(0))
        if of > 1 and len(cores) >= of:
            size = len(cores) // of
            cores = cores[share * size : (share + 1) * size]
            os.sched_setaffinity(0, cores)
        logger.info("rollout worker on cores %s: %d torch threads", cores, set_threads(self.threads))
        self.policy = make_policy(self.policy_config)
        limit = getattr(self.policy, "max_model_len", None)
        if limit is not None and self.rollout_config.max_context_tokens > limit:
            raise ConfigError(
                f"rollout.max_context_tokens={self.rollout_config.max_context_tokens} exceeds what the "
                f"{type(self.policy).__name__} engine serves for {self.policy_config.model} ({limit} tokens; "
                "policy.vllm.max_model_len)"
            )
        return cores

    def add_tasks(self, tasks: Sequence[Any]) -> None:
        """Makes more env tasks playable (imagined ones); environments built from now on have them."""
        for task in tasks:
            self.tasks[(task.task.env, task.task.task_id)] = task
            self._env_tasks.setdefault(task.task.env, []).append(task)

    def complete(self, prompts: Sequence[str], max_new_tokens: int) -> list[str]:
        """The policy's answer to each prompt, as a conversation's first user turn (sampled as the
        rollout samples, up to ``max_new_tokens``)."""
        from dataclasses import replace

        chat = self.policy.chat
        sampling = replace(self.rollout_config.sampling, max_new_tokens=max_new_tokens)
        found = self.policy.generate([chat.user_segment(p, first=True) for p in prompts], sampling)
        return [g.text for g in found]

    def load_adapter(self, files: Files | None, version: int) -> int:
        """Acts with the adapter given by value (None = base model); returns the version."""
        path = None if files is None else unpack_dir(files, self._adapter_dir / f"v{version}")
        self.policy.load_adapter(path, version)
        for old in self._adapter_dir.glob("v*"):
            if path is None or old != path:
                shutil.rmtree(old, ignore_errors=True)
        release_memory()
        return self.policy.version

    def serve(
        self,
        dealer: Any,
        name: str,
        source: Source,
        iteration: int,
        batch_size: int = 8,
        deal: int | None = None,
        trials: Any = None,
        memory: Any = None,
    ) -> Iterator[Any]:
        """Plays the episodes ``dealer`` (a :class:`~agentloop.actors.fleet.Dealer` actor) hands
        out, taking more as episodes end, until it has none left: yields finished trajectories in
        batches of ``batch_size`` (the last batch smaller), then the throughput stats. Called as
        a Ray streaming generator (``num_returns="streaming"``), so the driver stores episodes
        while others still run.

        Between generation steps it also asks the dealer which policy version to serve, and
        loads a newly published one there (running requests restart under it). ``deal`` is the
        dealer's deal this call plays: once the dealer has moved on to another, it takes no more.

        With ``trials`` (a :class:`~agentloop.memory.MemoryConfig`) each task taken is played
        as a chain of trials (:class:`~agentloop.memory.Trials`), shown what long-term
        ``memory`` (a :class:`~agentloop.memory.LongTermMemory` actor, or None) recalls for it,
        from other tasks than its own."""
        from agentloop.envs import make_env
        from agentloop.rollout import Rollout

        feed: Any = _DealerFeed(self, dealer, name, deal)
        reflect = teacher = None
        if trials is not None:
            feed, reflect, teacher = self._trials(feed, dealer, trials, memory)
        run = Rollout(
            self.policy,
            lambda env: make_env(env, self._env_tasks[env], self.env_configs[env]),
            feed,
            self.rollout_config,
            source=source,
            iteration=iteration,
            progress=True,
            reflect=reflect,
            teacher=teacher,
            reflection_tokens=trials.reflection_tokens if trials is not None else None,
        )
        batch: list[Trajectory] = []
        try:
            for _, trajectory in run:
                batch.append(trajectory)
                if len(batch) >= batch_size:
                    yield batch
                    batch = []
            if batch:
                yield batch
            yield run.stats
        finally:
            cache = getattr(self.policy, "prefix_cache", None)
            if cache is not None:
                cache.clear()
            release_memory()

    def _trials(self, feed: Any, dealer: Any, trials: Any, memory: Any) -> tuple[Any, Any, Any]:
        """The feed of STE's trials over ``feed``, and who reflects: the policy, asked the returned
        question, or the returned teacher (both None: nobody)."""
        import ray

        from agentloop.endpoint import Endpoint
        from agentloop.memory import Trials
        from agentloop.memory.reflection import TeacherReflection, reflection_prompt

        def recall(tasks):
            return ray.get(
                memory.recall.remote(list(tasks), trials.long_term_k, others=True, solved=trials.recall == "solved")
            )

        def earlier(tasks):
            return ray.get(dealer.earlier.remote([t.key for t in tasks]))

        chained = Trials(
            feed, trials, self.policy.chat.count, recall=recall if memory is not None else None, earlier=earlier
        )
        if not trials.reflect:
            return chained, None, None
        if trials.teacher.enabled:
            return chained, None, TeacherReflection(Endpoint(trials.teacher))
        return chained, reflection_prompt, None

    def sleep(self) -> None:
        """Frees the policy's weights and caches while the learner trains; the next use reloads them."""
        self.policy.sleep()
        release_memory()

    def close(self) -> None:
        if self.policy is not None:
            getattr(self.policy, "close", lambda: None)()
        shutil.rmtree(self._adapter_dir, ignore_errors=True)


class _DealerFeed:
    """A rollout's tasks from a dealer actor; also where a worker picks up a published policy version."""

    def __init__(self, worker: RolloutWorker, dealer: Any, name: str, deal: int | None) -> None:
        self.worker, self.dealer, self.name, self.deal = worker, dealer, name, deal

    def take(self, n: int) -> list[Any]:
        import ray

        keys, version = ray.get(self.dealer.take.remote(self.name, n, self.deal))
        if version is not None and version != self.worker.policy.version:
            published, files = ray.get(self.dealer.adapter.remote())
            self.worker.load_adapter(files, published)
        pairs = [tuple(k.split("/", 1)) for k in keys]  # "<env>/<task_id>", as the replay store keys episodes
        unknown = [k for k, pair in zip(keys, pairs, strict=True) if pair not in self.worker.tasks]
        if unknown:
            raise KeyError(f"unknown tasks: {unknown[:5]}")
        return [self.worker.tasks[pair].task for pair in pairs]


class LearnerWorker:
    """Trains adapters: SFT from the base model, then DPO rounds on the same adapter."""

    def __init__(self, base_model: str, sft_config: Any, dpo_config: Any, threads: int = 0) -> None:
        from agentloop.policy.model import resolve_model

        logging.basicConfig(level=logging.INFO)
        logger.info("learner: %d torch threads", set_threads(threads))
        self.base_model = Path(resolve_model(base_model))
        self.sft_config, self.dpo_config = sft_config, dpo_config
        self._work = Path(tempfile.mkdtemp(prefix="agentloop-learner-"))
        # Imported now (torch, transformers, TRL, datasets, PEFT), while the rollout actors start and
        # play, rather than on the first call.
        import peft  # noqa: F401

        import agentloop.learners.trainers  # noqa: F401

    def sft(
        self, trajectories: Sequence[Trajectory], adapter: Files | None = None, config: Any = None
    ) -> tuple[Files, dict[str, float]]:
        """Behaviour cloning, from the base model or continuing ``adapter``, with the learner's SFT
        settings or ``config``; returns the new adapter (by value) and metrics."""
        from agentloop.learners.sft import train_sft

        start = None if adapter is None else unpack_dir(adapter, self._fresh("start"))
        out = self._fresh("sft")
        try:
            metrics = train_sft(self.base_model, trajectories, config or self.sft_config, out, start)
        finally:
            release_memory()
        return pack_dir(out), metrics

    def dpo(self, adapter: Files, pairs: Sequence[Pair]) -> tuple[Files, dict[str, float]]:
        """One ETO round on ``pairs``; the reference is the policy given by ``adapter``."""
        from agentloop.learners.dpo import train_dpo

        start = unpack_dir(adapter, self._fresh("start"))
        out = self._fresh("dpo")
        try:
            metrics = train_dpo(self.base_model, start, pairs, self.dpo_config, out)
        finally:
            release_memory()
        return pack_dir(out), metrics

    def mismatch(self, adapter: Files | None, trajectories: Sequence[Trajectory]) -> dict[str, float]:
        """How far the serving engine's recorded log-probs are from this learner's, on the same tokens:
        the base model in the DPO learner's dtype with ``adapter`` unmerged (None = the base model).
        See :mod:`agentloop.learners.mismatch`."""
        import torch
        from peft import PeftModel

        from agentloop.learners.common import load_base
        from agentloop.learners.mismatch import learner_scores, mismatch_metrics

        model = load_base(self.base_model, self.dpo_config.dtype)
        if adapter is not None:
            model = PeftModel.from_pretrained(model, str(unpack_dir(adapter, self._fresh("scored"))))
        try:
            with torch.inference_mode():
                return mismatch_metrics(trajectories, learner_scores(model.eval(), trajectories))
        finally:
            del model
            release_memory()

    def _fresh(self, name: str) -> Path:
        path = self._work / name
        shutil.rmtree(path, ignore_errors=True)
        return path

    def close(self) -> None:
        shutil.rmtree(self._work, ignore_errors=True)


def start_workers(config: Any, tasks: Sequence[Any]) -> tuple[Any, Any]:
    """Starts the rollout fleet (``rollout.actors`` actors) and the learner actor.

    GPUs: see :func:`agentloop.actors.fleet.gpu_shares` (a GPU each when there are enough,
    else the learner shares one with the rollout, which it uses in turns). The learner
    reserves one CPU; torch in each actor sets its own thread count (``threads``).
    """
    import ray

    from agentloop.actors.fleet import Fleet, gpu_shares

    _, learner_gpus = gpu_shares(ray.cluster_resources().get("GPU", 0), config.rollout.actors, config.rollout.num_gpus)
    learner_env = allocator_env()
    # Asked for first: its process starts (imports torch, TRL) while the fleet's actors start and play.
    learner = ray.remote(num_cpus=1, num_gpus=learner_gpus, runtime_env={"env_vars": learner_env})(
        LearnerWorker
    ).remote(config.policy.model, config.sft, config.dpo, config.threads)
    fleet = Fleet(config, tasks)
    logger.info(
        "started %d rollout actor(s) (%s GPU each) and the learner (%s GPU; allocator %s)",
        len(fleet.actors),
        fleet.gpus,
        learner_gpus,
        learner_env,
    )
    return fleet, learner
