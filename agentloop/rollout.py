"""Rollout: many multi-turn episodes at once over one stream of generation requests.

Plain Python, no Ray: a policy, a way to make environments and a list of tasks in,
trajectories out. Every episode keeps the exact tokens its policy saw and produced, so the
learner trains on what was generated (see :mod:`agentloop.policy.chat`).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from agentloop.config import ConfigError
from agentloop.envs.contract import EnvContractError, reset_task, step_outcome
from agentloop.policy.base import Generation, Policy, SamplingConfig, open_stream
from agentloop.types import Message, Source, Task, Trajectory

logger = logging.getLogger(__name__)


@dataclass
class RolloutConfig:
    """How episodes are run."""

    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    concurrent_episodes: int = 32
    """Episodes in flight; their turns are generation requests that batch together as they come."""
    max_context_tokens: int = 2048
    """An episode whose next prompt plus a full turn would exceed this is truncated (0: an
    experiment fits it to its envs before running; :func:`rollout` needs it set)."""

    def validate(self) -> None:
        if self.concurrent_episodes < 1:
            raise ConfigError(f"concurrent_episodes must be >= 1, got {self.concurrent_episodes}")
        if self.max_context_tokens < 0 or 0 < self.max_context_tokens <= self.sampling.max_new_tokens:
            raise ConfigError("max_context_tokens must exceed sampling.max_new_tokens (or be 0: fit the envs)")


@dataclass
class _Episode:
    env: Any
    task: Task
    messages: list[Message]
    invalid: int = 0
    generated: int = 0
    tamper_attempts: int = 0

    @property
    def prompt(self) -> list[int]:
        return [t for m in self.messages for t in m.token_ids]


@dataclass(frozen=True)
class RolloutStats:
    """Throughput of one rollout call."""

    episodes: int
    generated_tokens: int
    seconds: float
    prompt_tokens: int = 0
    """Prompt tokens over all turns (what a backend without a prefix cache prefills)."""
    reused_prompt_tokens: int = 0
    """Of those, the tokens the policy's prefix cache served (0 without one)."""

    @property
    def tokens_per_s(self) -> float:
        return self.generated_tokens / self.seconds if self.seconds > 0 else 0.0

    @property
    def prefix_reuse(self) -> float:
        """Fraction of prompt tokens not prefilled again thanks to the prefix cache."""
        return self.reused_prompt_tokens / self.prompt_tokens if self.prompt_tokens else 0.0


def rollout(
    policy: Policy,
    make_env: Callable[[str], Any],
    tasks: Sequence[Task],
    config: RolloutConfig,
    *,
    source: Source,
    iteration: int,
    progress: bool = False,
) -> tuple[list[Trajectory], RolloutStats]:
    """Runs one episode per task and returns the trajectories in task order (see :class:`Rollout`)."""
    run = Rollout(policy, make_env, tasks, config, source=source, iteration=iteration, progress=progress)
    done = dict(run)
    return [done[i] for i in range(len(tasks))], run.stats


class Rollout:
    """One episode per task over one stream of generation requests; iterating it plays them and
    yields ``(task index, trajectory)`` as each episode ends, so a caller can store episodes as
    they finish. ``stats`` is set once iteration is over.

    Args:
        policy: Generates the assistant turns.
        make_env: Builds a fresh environment for an env name (``task.env``); environments are
            built when no idle one of that name is left and reused, so at most
            ``concurrent_episodes`` of each name exist, and tasks of several envs share one stream.
            An environment with a ``prepare(task_ids)`` method (ALFWorld's) is told, once per
            env name, all the task ids of that env in the order their episodes will start, so
            it can load them ahead.
        tasks: The tasks to attempt (their ``task_id`` selects the task on reset).
        config: Concurrency, context budget and sampling.
        source: Recorded on every trajectory (``explore`` or ``eval``).
        iteration: Loop iteration recorded on every trajectory.
        progress: Show a progress bar.
    """

    def __init__(
        self,
        policy: Policy,
        make_env: Callable[[str], Any],
        tasks: Sequence[Task],
        config: RolloutConfig,
        *,
        source: Source,
        iteration: int,
        progress: bool = False,
    ) -> None:
        if config.max_context_tokens < 1:
            raise ValueError("rollout needs max_context_tokens set (0 means an experiment fits it to its envs first)")
        self.policy, self.make_env, self.tasks, self.config = policy, make_env, list(tasks), config
        self.source, self.iteration, self.progress = source, iteration, progress
        self.stats: RolloutStats | None = None

    def __iter__(self) -> Iterator[tuple[int, Trajectory]]:
        from tqdm import tqdm

        policy, config, tasks = self.policy, self.config, self.tasks
        started = time.perf_counter()
        cache = getattr(policy, "prefix_cache", None)
        reused_before = cache.reused_tokens if cache is not None else 0
        prompt_tokens = generated = 0
        queue = deque(enumerate(tasks))
        idle: dict[str, list[Any]] = {}  # built environments not in an episode, by env name
        built: list[Any] = []
        prepared: set[str] = set()
        active: dict[int, _Episode] = {}
        stream = open_stream(policy, config.sampling)
        bar = tqdm(total=len(tasks), desc=f"{self.source} episodes", disable=not self.progress, leave=False)
        try:
            while queue or active:
                while queue and len(active) < config.concurrent_episodes:
                    index, task = queue.popleft()
                    free = idle.setdefault(task.env, [])
                    if not free:
                        free.append(self.make_env(task.env))
                        built.append(free[-1])
                        if task.env not in prepared:  # the env's games, in the order they will start
                            prepared.add(task.env)
                            upcoming = [task.task_id, *(t.task_id for _, t in queue if t.env == task.env)]
                            getattr(free[-1].unwrapped, "prepare", lambda ids: None)(upcoming)
                    active[index] = _start(policy, free.pop(), task)
                    stream.add(index, active[index].prompt)
                    prompt_tokens += len(active[index].prompt)
                for index, generation in stream.step():
                    episode = active[index]
                    outcome = _advance(policy, episode, generation, config)
                    if outcome is None:  # the episode goes on: its next turn joins the stream
                        stream.add(index, episode.prompt)
                        prompt_tokens += len(episode.prompt)
                        continue
                    trajectory = _trajectory(policy, episode, outcome, self.source, self.iteration)
                    if cache is not None:  # no next turn will resume from this episode's last one
                        cache.pop(trajectory.token_ids, reuse=False)
                    idle[episode.task.env].append(episode.env)
                    del active[index]
                    generated += trajectory.generated_tokens
                    bar.update(1)
                    yield index, trajectory
        finally:
            bar.close()
            getattr(stream, "close", lambda: None)()
            for env in built:
                env.close()
        self.stats = RolloutStats(
            episodes=len(tasks),
            generated_tokens=generated,
            seconds=time.perf_counter() - started,
            prompt_tokens=prompt_tokens,
            reused_prompt_tokens=(cache.reused_tokens - reused_before) if cache is not None else 0,
        )


def _start(policy: Policy, env: Any, task: Task) -> _Episode:
    observation, info = env.reset(options={"task_id": task.task_id})
    started = reset_task(info, task.env)
    if (started.env, started.task_id) != (task.env, task.task_id):
        raise EnvContractError(f"{task.env}: reset to task {task.task_id!r} started {started.task_id!r}")
    first = Message("user", observation, tuple(policy.chat.user_segment(observation, first=True)))
    return _Episode(env=env, task=task, messages=[first])


def _advance(
    policy: Policy, episode: _Episode, gen: Generation, config: RolloutConfig
) -> tuple[float, bool, bool, bool] | None:
    """Plays one generated turn; returns (reward, success, terminated, truncated) if the episode ended."""
    episode.messages.append(Message("assistant", gen.text, gen.token_ids, gen.logprobs, gen.version))
    episode.generated += len(gen.token_ids)
    observation, reward, terminated, truncated, info = episode.env.step(gen.text)
    step = step_outcome(info, episode.task.env)
    episode.invalid += int(step.invalid)
    episode.tamper_attempts += step.tamper_attempts
    success = step.success
    if terminated or truncated:
        return float(reward), success, terminated, truncated
    segment = tuple(policy.chat.user_segment(observation, first=False))
    episode.messages.append(Message("user", observation, segment))
    if len(episode.prompt) + config.sampling.max_new_tokens > config.max_context_tokens:
        return float(reward), success, False, True
    return None


def _version(policy: Policy, episode: _Episode) -> int:
    """The episode's policy version: the one every turn reports, else the policy's own.

    A backend that reports versions per turn lets a publish mid-stage show: an episode whose
    turns came from two versions is recorded under the older one (it is partly off-policy
    for the newer) and logged.
    """
    versions = {m.policy_version for m in episode.messages if m.role == "assistant" and m.policy_version is not None}
    if not versions:
        return policy.version
    if len(versions) > 1:
        logger.info("%s/%s: turns of policy versions %s", episode.task.env, episode.task.task_id, sorted(versions))
    return min(versions)


def _trajectory(
    policy: Policy, episode: _Episode, outcome: tuple[float, bool, bool, bool], source: Source, iteration: int
) -> Trajectory:
    reward, success, terminated, truncated = outcome
    return Trajectory(
        task=episode.task,
        messages=tuple(episode.messages),
        tokenizer=policy.chat.name,
        reward=reward,
        success=success,
        terminated=terminated,
        truncated=truncated,
        num_turns=sum(m.role == "assistant" for m in episode.messages),
        invalid_actions=episode.invalid,
        source=source,
        policy_version=_version(policy, episode),
        iteration=iteration,
        generated_tokens=episode.generated,
        tamper_attempts=episode.tamper_attempts,
    )
