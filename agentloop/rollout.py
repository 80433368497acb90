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
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from agentloop.config import ConfigError
from agentloop.envs.contract import EnvContractError, reset_task, step_outcome
from agentloop.policy.base import Generation, Policy, SamplingConfig, open_stream
from agentloop.types import Attempt, Message, Source, Task, Trajectory

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
    env_threads: int = 8
    """Threads that run environment resets and steps beside generation, so an episode waiting
    on its environment (a slow OS command, a sandbox start) never holds the others back. 0 runs
    them in the generation loop between steps: then the order in which turns join the batch,
    and so a greedy run's every token, is the same on every rerun; with threads it depends on
    timing (bf16 kernels round differently in another batch)."""
    actors: int = 1
    """Rollout actors of a fleet (:mod:`agentloop.actors.fleet`): a stage's episodes go to
    whichever has room. Each runs its own engine with ``concurrent_episodes`` in flight."""
    num_cpus: float = 1.0
    """CPUs Ray reserves for each rollout actor. Its threads use its node's cores, shared
    evenly among the rollout actors placed there (top-level ``threads`` sets a count)."""
    num_gpus: float = -1.0
    """GPUs (or a fraction of one) per rollout actor; -1 = auto: a GPU each when the learner
    has one too, half of the only GPU for a single rollout actor and the learner, none on a CPU
    cluster (:func:`agentloop.actors.fleet.gpu_shares`)."""

    def validate(self) -> None:
        if self.concurrent_episodes < 1:
            raise ConfigError(f"concurrent_episodes must be >= 1, got {self.concurrent_episodes}")
        if self.env_threads < 0:
            raise ConfigError(f"env_threads must be >= 0, got {self.env_threads}")
        if self.actors < 1:
            raise ConfigError(f"actors must be >= 1, got {self.actors}")
        if self.num_cpus < 0:
            raise ConfigError(f"num_cpus must be >= 0, got {self.num_cpus}")
        if self.num_gpus < 0 and self.num_gpus != -1:
            raise ConfigError(f"num_gpus must be >= 0, or -1 (auto), got {self.num_gpus}")
        if self.max_context_tokens < 0 or 0 < self.max_context_tokens <= self.sampling.max_new_tokens:
            raise ConfigError("max_context_tokens must exceed sampling.max_new_tokens (or be 0: fit the envs)")


class TaskFeed(Protocol):
    """Where a rollout takes its tasks from while it runs (a fleet's dealer, :mod:`agentloop.actors.fleet`;
    STE's trials, :class:`agentloop.memory.Trials`).

    A feed may also have ``finished(trajectory)``: the rollout calls it as each episode ends,
    before asking for more, so a feed can hand out a follow-up (the task's next trial).
    """

    def take(self, n: int) -> list[Task | Attempt]:
        """Up to ``n`` more tasks (or attempts: a task with memory and its trial number); an
        empty list when none is left now.

        Called once per generation step, between steps (``n`` may be 0), so a feed may also
        change the policy there, as the rollout worker's does when a new version is published.
        """
        ...


class _ListFeed:
    def __init__(self, tasks: Sequence[Task]) -> None:
        self.tasks = deque(tasks)

    def take(self, n: int) -> list[Task]:
        return [self.tasks.popleft() for _ in range(min(n, len(self.tasks)))]


LOOKAHEAD = 8
"""Most tasks a rollout takes from a feed beyond its free episode slots (a quarter of
``concurrent_episodes`` at most, so work is still dealt where there is room), so
environments can load them ahead (ALFWorld)."""


@dataclass
class _Episode:
    env: Any
    attempt: Attempt
    messages: list[Message]
    invalid: int = 0
    generated: int = 0
    tamper_attempts: int = 0
    memory_tokens: int = 0
    redraws: int = 0  # first turns drawn again (Attempt.avoid)
    ended: Trajectory | None = None  # set while its reflection is generated
    reflecting: list[int] | None = None  # the reflection's prompt

    @property
    def task(self) -> Task:
        return self.attempt.task

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
    actors_lost: int = 0
    """Rollout actors of a fleet that died during the call."""
    replayed_episodes: int = 0
    """Episodes a dead actor had taken and not returned, played again by another actor."""
    memory_tokens: int = 0
    """Prompt tokens that memory added to first turns (STE's trials): what it adds to prefill with a prefix cache."""
    memory_prompt_tokens: int = 0
    """Of ``prompt_tokens``, memory's: it is in every turn's prompt (and the reflection's) of its trial."""
    reflection_tokens: int = 0
    """Tokens generated for reflections (included in ``generated_tokens``)."""
    failed_reflections: int = 0
    """Reflections a teacher failed to write (their episodes kept, without one)."""
    redraws: int = 0
    """First turns drawn again because they repeated an earlier trial's first action (``Attempt.avoid``)."""
    redrawn_tokens: int = 0
    """Tokens of those discarded draws (not in ``generated_tokens``)."""

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
    run = Rollout(policy, make_env, list(tasks), config, source=source, iteration=iteration, progress=progress)
    done = dict(run)
    return [done[i] for i in range(len(tasks))], run.stats


class Rollout:
    """Plays episodes over one stream of generation requests; iterating it yields
    ``(index, trajectory)`` as each episode ends (``index``: the task's position in the order
    tasks were taken), so a caller can store episodes as they finish. ``stats`` is set once
    iteration is over.

    Args:
        policy: Generates the assistant turns.
        make_env: Builds a fresh environment for an env name (``task.env``); environments are
            built when no idle one of that name is left and reused, so at most
            ``concurrent_episodes`` of each name exist, and tasks of several envs share one stream.
            An environment with a ``prepare(task_ids)`` method (ALFWorld's) is told the task ids
            of its env that are waiting, in the order their episodes will start, so it can load
            them ahead; it is told again whenever more arrive.
        tasks: The tasks to attempt (their ``task_id`` selects the task on reset): a list, or a
            :class:`TaskFeed` that hands them out while the rollout runs, asked for as many as
            there are free episode slots plus :data:`LOOKAHEAD`. The rollout ends when the feed
            has none left and every episode has ended.
        config: Concurrency, context budget and sampling.
        source: Recorded on every trajectory (``explore`` or ``eval``).
        iteration: Loop iteration recorded on every trajectory.
        progress: Show a progress bar.
        reflect: After an episode ends, the question whose answer becomes its ``reflection``
            (one more generated turn of the same conversation, not part of its messages; left
            out when it would not fit the context). None: no reflection.
        teacher: Instead, writes an ended episode's ``reflection`` itself (a teacher model behind
            an endpoint), in the environment threads; a reflection that fails is logged, counted
            in ``stats.failed_reflections`` and left empty.
        reflection_tokens: Most tokens of the policy's reflection (None: ``sampling.max_new_tokens``).
    """

    def __init__(
        self,
        policy: Policy,
        make_env: Callable[[str], Any],
        tasks: Sequence[Task] | TaskFeed,
        config: RolloutConfig,
        *,
        source: Source,
        iteration: int,
        progress: bool = False,
        reflect: Callable[[Trajectory], str] | None = None,
        teacher: Callable[[Trajectory], str] | None = None,
        reflection_tokens: int | None = None,
    ) -> None:
        if config.max_context_tokens < 1:
            raise ValueError("rollout needs max_context_tokens set (0 means an experiment fits it to its envs first)")
        if isinstance(tasks, Sequence):  # known up front: all of them wait in the queue from the start
            self.feed, self.lookahead, total = _ListFeed(tasks), len(tasks), len(tasks)
        else:
            self.feed, self.lookahead, total = tasks, min(LOOKAHEAD, config.concurrent_episodes // 4), None
        self.policy, self.make_env, self.config, self.total = policy, make_env, config, total
        self.source, self.iteration, self.progress = source, iteration, progress
        self.reflect, self.teacher = reflect, teacher
        self.reflection_tokens = reflection_tokens or config.sampling.max_new_tokens
        self.stats: RolloutStats | None = None

    def __iter__(self) -> Iterator[tuple[int, Trajectory]]:
        from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait

        from tqdm import tqdm

        policy, config = self.policy, self.config
        started = time.perf_counter()
        cache = getattr(policy, "prefix_cache", None)
        reused_before = cache.reused_tokens if cache is not None else 0
        prompt_tokens = generated = taken = played = memory_tokens = reflection_tokens = failed_reflections = 0
        memory_prompt_tokens = 0
        redraws = redrawn_tokens = 0
        queue: deque[tuple[int, Attempt]] = deque()  # taken, not started
        idle: dict[str, list[Any]] = {}  # built environments not in an episode, by env name
        built: list[Any] = []
        active: dict[int, _Episode | None] = {}  # None: its reset is under way
        resets: dict[Future, int] = {}  # environment work under way, and whose episode it is
        active_tasks: dict[int, Task] = {}
        steps: dict[Future, int] = {}
        taught: dict[Future, int] = {}  # a teacher's reflections under way
        pool = ThreadPoolExecutor(config.env_threads, "env") if config.env_threads else None
        finished = getattr(self.feed, "finished", None)

        def env_work(fn: Callable[..., Any], *args: Any) -> Future:
            if pool is not None:
                return pool.submit(fn, *args)
            future: Future = Future()  # no threads: done here, between generation steps
            try:
                future.set_result(fn(*args))
            except BaseException as e:  # noqa: BLE001 - raised again by result()
                future.set_exception(e)
            return future

        stream = open_stream(policy, config.sampling)

        def ask(index: int, prompt: list[int], episode: _Episode, **sampling: Any) -> None:
            """Queues a prompt of ``episode``, counting its tokens and memory's share of them."""
            nonlocal prompt_tokens, memory_prompt_tokens
            stream.add(index, prompt, **sampling)
            prompt_tokens += len(prompt)
            memory_prompt_tokens += episode.memory_tokens  # memory opens every prompt of its trial

        bar = tqdm(total=self.total, desc=f"{self.source} episodes", disable=not self.progress, leave=False)
        try:
            while True:
                room = config.concurrent_episodes - len(active) + self.lookahead - len(queue)
                fresh = [item if isinstance(item, Attempt) else Attempt(item) for item in self.feed.take(max(room, 0))]
                queue.extend(enumerate(fresh, start=taken))
                taken += len(fresh)
                for name in dict.fromkeys(a.task.env for a in fresh):  # the env's games, in the order they will start
                    free = idle.setdefault(name, [])
                    if not free:
                        free.append(self.make_env(name))
                        built.append(free[-1])
                    # resets under way may not have asked for their game yet: they come first
                    starting = [active_tasks[i] for f, i in resets.items() if not f.done()]
                    upcoming = [t.task_id for t in [*starting, *(a.task for _, a in queue)] if t.env == name]
                    getattr(free[-1].unwrapped, "prepare", lambda ids: None)(upcoming)
                if not queue and not active:
                    break
                while queue and len(active) < config.concurrent_episodes:
                    index, attempt = queue.popleft()
                    free = idle.setdefault(attempt.task.env, [])
                    if not free:
                        free.append(self.make_env(attempt.task.env))
                        built.append(free[-1])
                    active[index] = None
                    active_tasks[index] = attempt.task
                    resets[env_work(_start, policy, free.pop(), attempt)] = index
                ended: list[tuple[int, Trajectory]] = []  # (index, trajectory) of episodes over, reflection included
                if stream.busy:
                    for index, generation in stream.step():
                        episode = active[index]
                        if episode.ended is not None:  # its reflection
                            reflection_tokens += len(generation.token_ids)
                            if cache is not None:
                                cache.pop([*episode.reflecting, *generation.token_ids], reuse=False)
                            trajectory = replace(
                                episode.ended,
                                reflection=generation.text.strip(),
                                generated_tokens=episode.generated + len(generation.token_ids),
                            )
                            ended.append((index, trajectory))
                        elif _redraw(episode, generation):  # a retry beginning as an earlier trial did
                            episode.redraws += 1
                            redraws, redrawn_tokens = redraws + 1, redrawn_tokens + len(generation.token_ids)
                            if cache is not None:  # no turn will resume from the discarded draw
                                cache.pop([*episode.prompt, *generation.token_ids], reuse=False)
                            ask(index, episode.prompt, episode, temperature=episode.attempt.temperature)
                        else:
                            steps[env_work(_advance, policy, episode, generation, config)] = index
                if pool is not None and not stream.busy and (resets or steps or taught):
                    wait([*resets, *steps, *taught], return_when=FIRST_COMPLETED)  # nothing to generate meanwhile
                for future in [f for f in taught if f.done()]:
                    index = taught.pop(future)
                    try:
                        written = future.result()
                    except Exception as e:  # noqa: BLE001 - the episode is kept without a reflection
                        logger.warning("%s: no reflection: %s", active[index].task.task_id, e)
                        failed_reflections, written = failed_reflections + 1, ""
                    ended.append((index, replace(active[index].ended, reflection=written)))
                for future in [f for f in resets if f.done()]:
                    index = resets.pop(future)
                    episode = active[index] = future.result()
                    ask(index, episode.prompt, episode, temperature=episode.attempt.temperature)
                    memory_tokens += episode.memory_tokens
                for future in [f for f in steps if f.done()]:
                    index = steps.pop(future)
                    episode, outcome = active[index], future.result()
                    if outcome is None:  # the episode goes on: its next turn joins the stream
                        ask(index, episode.prompt, episode, temperature=episode.attempt.temperature)
                        continue
                    trajectory = _trajectory(policy, episode, outcome, self.source, self.iteration)
                    prompt = self._reflection_prompt(trajectory)
                    if prompt:  # the policy reflects: one more turn, resuming from the cached conversation
                        episode.ended, episode.reflecting = trajectory, prompt
                        ask(index, prompt, episode, max_new_tokens=self.reflection_tokens)
                        continue
                    if cache is not None:  # no next turn will resume from this episode's last one
                        cache.pop(trajectory.token_ids, reuse=False)
                    if self.teacher is not None:
                        episode.ended = trajectory
                        taught[env_work(self.teacher, trajectory)] = index
                        continue
                    ended.append((index, trajectory))
                for index, trajectory in ended:
                    episode = active.pop(index)
                    idle[episode.task.env].append(episode.env)
                    del active_tasks[index]
                    generated += trajectory.generated_tokens
                    played += 1
                    bar.update(1)
                    if finished is not None:
                        finished(trajectory)
                    yield index, trajectory
        finally:
            bar.close()
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
            getattr(stream, "close", lambda: None)()
            for env in built:
                env.close()
        self.stats = RolloutStats(
            episodes=played,
            generated_tokens=generated,
            seconds=time.perf_counter() - started,
            prompt_tokens=prompt_tokens,
            reused_prompt_tokens=(cache.reused_tokens - reused_before) if cache is not None else 0,
            memory_tokens=memory_tokens,
            memory_prompt_tokens=memory_prompt_tokens,
            reflection_tokens=reflection_tokens,
            failed_reflections=failed_reflections,
            redraws=redraws,
            redrawn_tokens=redrawn_tokens,
        )

    def _reflection_prompt(self, trajectory: Trajectory) -> list[int]:
        """The prompt of the policy's reflection on an ended episode; empty when it does not reflect,
        or the reflection would not fit the context."""
        if self.reflect is None:
            return []
        prompt = trajectory.token_ids + self.policy.chat.user_segment(self.reflect(trajectory), first=False)
        fits = len(prompt) + self.reflection_tokens <= self.config.max_context_tokens
        return prompt if fits else []


def _start(policy: Policy, env: Any, attempt: Attempt) -> _Episode:
    task = attempt.task
    observation, info = env.reset(options={"task_id": task.task_id})
    started = reset_task(info, task.env)
    if (started.env, started.task_id) != (task.env, task.task_id):
        raise EnvContractError(f"{task.env}: reset to task {task.task_id!r} started {started.task_id!r}")
    content = attempt.memory + observation  # memory, when any, comes before the task
    first = Message("user", content, tuple(policy.chat.user_segment(content, first=True)))
    added = len(first.token_ids) - len(policy.chat.user_segment(observation, first=True)) if attempt.memory else 0
    return _Episode(env=env, attempt=attempt, messages=[first], memory_tokens=added)


def _redraw(episode: _Episode, generation: Generation) -> bool:
    """Whether an episode's first turn is drawn again: it is, verbatim, an action its attempt avoids,
    and the attempt has draws left."""
    attempt = episode.attempt
    first = len(episode.messages) == 1
    return first and episode.redraws < attempt.redraws and generation.text.strip() in attempt.avoid


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
        trial=episode.attempt.trial,
        memory=episode.attempt.memory,
    )
