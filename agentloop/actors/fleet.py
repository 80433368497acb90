"""A fleet of rollout actors fed by one dealer: episodes go to whichever actor has room.

    driver                        dealer (Ray actor)              rollout actors
    play(keys) --deal(keys)-->    pending episodes, version  <--  take(n) between generation steps
               <--batches of finished trajectories, streamed back as they end, from every actor--

Each rollout actor asks the dealer for more episodes whenever it has free slots (one call
per generation step), so a fast actor takes more and a stage ends when the last episode
does, not when the slowest fixed share does. The same call tells the actor which policy
version to serve: :meth:`Fleet.publish` changes it while episodes run, and every actor
loads it between two of its steps (its running requests restart under it).

When an actor dies mid-stage, the episodes it took and did not return go back to the
dealer and the live actors play them; the dead actor is replaced before the next stage.
The driver stores what comes back (:meth:`agentloop.loop.Stages.stream`), so an episode is
either stored once or played again.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import defaultdict, deque
from collections.abc import Iterator, Sequence
from typing import Any

from agentloop.actors.transfer import Files
from agentloop.actors.workers import RolloutWorker
from agentloop.config import ConfigError
from agentloop.rollout import RolloutStats
from agentloop.types import Source, Trajectory

logger = logging.getLogger(__name__)


class Dealer:
    """Hands a stage's episodes to rollout actors as they ask, and says which policy version to serve.

    A plain class, run as a Ray actor by :class:`Fleet`. Episodes are keys ``"<env>/<task_id>"``.
    """

    def __init__(self) -> None:
        self.pending: deque[str] = deque()
        self.taken: dict[str, list[str]] = defaultdict(list)
        self.version: int | None = None
        self.files: Files | None = None
        self.deal_number = 0
        self.retired: set[str] = set()  # workers given up for dead: they take nothing more
        self.begun: dict[str, list[Trajectory]] = {}  # trials already played of chains dealt again

    def deal(self, keys: Sequence[str], begun: dict[str, list[Trajectory]] | None = None) -> int:
        """A new stage: ``keys`` wait to be taken, in order (with trials, ``begun`` holds the
        trials played before of chains that go on). Returns the deal's number, which takers
        give back, so a rollout left over from an abandoned deal gets nothing more."""
        self.pending, self.taken = deque(keys), defaultdict(list)
        self.begun = dict(begun or {})
        self.deal_number += 1
        return self.deal_number

    def earlier(self, keys: Sequence[str]) -> dict[str, list[Trajectory]]:
        """The trials played before of those of ``keys`` whose chains were begun elsewhere."""
        return {k: self.begun[k] for k in keys if k in self.begun}

    def take(self, worker: str, n: int, deal: int | None = None) -> tuple[list[str], int | None]:
        """Up to ``n`` waiting episodes of deal ``deal`` (None: the current one) for ``worker``,
        and the policy version to serve."""
        if (deal is not None and deal != self.deal_number) or worker in self.retired:
            return [], self.version
        keys = [self.pending.popleft() for _ in range(min(n, len(self.pending)))]
        self.taken[worker] += keys
        return keys, self.version

    def give_back(
        self, worker: str, finished: Sequence[str], begun: dict[str, list[Trajectory]] | None = None
    ) -> list[str]:
        """Retires ``worker`` (given up for dead, it may still be running for a moment: it takes
        nothing more) and puts the episodes it took but did not finish first in line again;
        returns them. ``begun``: the trials returned so far of chains under way, recorded for
        the lost ones before they can be taken again (so a chain goes on after its last trial)."""
        self.retired.add(worker)
        done = set(finished)
        lost = [k for k in self.taken.pop(worker, []) if k not in done]
        self.begun.update({k: begun[k] for k in lost if k in (begun or {})})
        self.pending.extendleft(reversed(lost))
        return lost

    def waiting(self) -> int:
        return len(self.pending)

    def taken_by(self, worker: str) -> list[str]:
        """The episodes ``worker`` has taken in this deal (finished or not)."""
        return list(self.taken.get(worker, []))

    def publish(self, version: int, files: Files | None) -> None:
        """From now on actors serve ``version``: base model plus the adapter ``files`` (None = base)."""
        self.version, self.files = version, files

    def adapter(self) -> tuple[int | None, Files | None]:
        return self.version, self.files


def gpu_shares(total: float, actors: int, per_actor: float) -> tuple[float, float]:
    """GPUs each rollout actor and the learner ask for, given the cluster's ``total``.

    ``per_actor`` -1 (auto): with a GPU for every rollout actor and one for the learner, each
    gets its own; with one GPU and one rollout actor, they share it, half each (the loop runs
    them in turns); without GPUs, none. An explicit ``per_actor`` leaves the learner a whole GPU
    when one is free after the rollout actors, else half of one when half is free.

    Raises:
        ConfigError: When the GPUs cannot be shared out that way (naming ``rollout.num_gpus``).
    """
    if per_actor < 0:
        if total >= actors + 1:
            return 1.0, 1.0
        if total >= 1 and actors == 1:
            return 0.5, 0.5
        if total > 0:
            raise ConfigError(
                f"rollout.num_gpus: the cluster has {total:g} GPUs for rollout.actors={actors} and the learner; "
                "set how much of a GPU each rollout actor takes (the learner needs half of one left over)"
            )
        return 0.0, 0.0
    left = total - actors * per_actor
    if total == 0 and per_actor == 0:
        return 0.0, 0.0
    if left >= 1:
        return per_actor, 1.0
    if left >= 0.5:
        return per_actor, 0.5
    raise ConfigError(
        f"rollout.num_gpus={per_actor:g} for rollout.actors={actors} leaves {max(left, 0):g} of the cluster's "
        f"{total:g} GPUs: the learner needs at least half a GPU"
    )


class ActorsLost(RuntimeError):
    """Every rollout actor of the fleet died during a stage."""


_DONE = object()
PLACEMENT_TIMEOUT_S = 900


def _lost() -> tuple[type[BaseException], ...]:
    """Ray's errors for an actor that is gone: it died, its node died, or so did what it returned."""
    from ray.exceptions import NodeDiedError, ObjectLostError, RayActorError

    return RayActorError, ObjectLostError, NodeDiedError


def _died(error: BaseException) -> bool:
    """Whether ``error`` says an actor is gone, not that code running in it raised (a
    ``RayTaskError`` also looks like the error it wraps)."""
    from ray.exceptions import RayTaskError

    return isinstance(error, _lost()) and not isinstance(error, RayTaskError)


class Fleet:
    """``rollout.actors`` rollout actors, started and kept on one policy version.

    Args:
        config: The experiment's config: ``policy``, ``rollout`` (``actors``, ``num_cpus``,
            ``num_gpus``), ``threads``, and each env's section (``env_config``).
        tasks: Every env task object the actors may be asked to play.
    """

    def __init__(self, config: Any, tasks: Sequence[Any]) -> None:
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        self.config, self.tasks = config, list(tasks)
        rollout = config.rollout
        self.gpus, _ = gpu_shares(ray.cluster_resources().get("GPU", 0), rollout.actors, rollout.num_gpus)
        # The dealer lives on the driver's node: losing another node must not lose the stage's queue.
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        self.dealer = ray.remote(num_cpus=0, scheduling_strategy=here)(Dealer).remote()
        self.version: int = 0
        self.files_ref: Any = None  # the current adapter, put once in Ray's object store
        self.actors: dict[str, Any] = {}
        self._placed: dict[str, tuple[str, tuple[int, int]]] = {}  # actor -> its node, its share of the cores
        self._vacated: defaultdict[str, list[tuple[int, int]]] = defaultdict(list)  # shares of dead actors
        self._loaded: dict[str, int] = {}  # actor -> the version it serves
        self._serial = 0
        self._add(rollout.actors)

    def _add(self, n: int) -> None:
        """Starts ``n`` actors; each takes an equal share of the cores of its node among the new ones there."""
        import ray

        env_configs = {spec.name: self.config.env_config(spec.name) for spec in self.config.envs}
        worker = ray.remote(num_cpus=self.config.rollout.num_cpus, num_gpus=self.gpus)(RolloutWorker)
        fresh = {}
        for _ in range(n):
            self._serial += 1
            fresh[f"rollout-{self._serial}"] = worker.remote(
                self.config.policy, self.config.rollout, env_configs, self.tasks, self.config.threads
            )
        try:  # waits for Ray to place them (an autoscaler may be adding nodes)
            placed = ray.get([a.node.remote() for a in fresh.values()], timeout=PLACEMENT_TIMEOUT_S)
        except ray.exceptions.GetTimeoutError:
            raise ActorsLost(
                f"Ray placed no node for {n} rollout actor(s) ({self.config.rollout.num_cpus} CPU, {self.gpus} GPU "
                f"each) in {PLACEMENT_TIMEOUT_S} s; see rollout.num_cpus and rollout.num_gpus"
            ) from None
        nodes = dict(zip(fresh, placed, strict=True))
        shares, new_on_node = {}, defaultdict(list)
        for name, node in nodes.items():
            if self._vacated[node]:  # a replacement takes the cores of an actor that died there
                shares[name] = self._vacated[node].pop()
            else:
                new_on_node[node].append(name)
        for names in new_on_node.values():
            shares.update({name: (i, len(names)) for i, name in enumerate(names)})
        cores = ray.get([a.start.remote(*shares[name]) for name, a in fresh.items()])
        for name, kept in zip(fresh, cores, strict=True):
            self._placed[name] = (nodes[name], shares[name])
            logger.info("%s on node %s, cores %s, %s GPU", name, nodes[name][:8], kept, self.gpus)
        self.actors.update(fresh)

    def ensure(self, version: int, files: Files | None) -> float:
        """Puts every actor on ``version`` (base model plus adapter ``files``; None = base) and
        replaces actors that died; returns the seconds until the last one had it live."""
        import ray

        started = time.perf_counter()
        if version != self.version or self.files_ref is None:
            self.files_ref = ray.put(files)
            self.version = version
            ray.get(self.dealer.publish.remote(version, self.files_ref))
        for _ in range(3):  # an actor that died since the last stage is replaced, then loaded
            missing = self.config.rollout.actors - len(self.actors)
            if missing > 0:
                logger.warning("starting %d rollout actor(s) in place of those that died", missing)
                self._add(missing)
            stale = {name: a for name, a in self.actors.items() if self._loaded.get(name) != version}
            dead = self._each(stale, "load_adapter", self.files_ref, version)
            self._loaded.update({name: version for name in stale if name not in dead})
            if not dead:
                break
        else:
            raise ActorsLost(f"rollout actors keep dying while loading policy v{version}")
        return time.perf_counter() - started

    def add_tasks(self, tasks: Sequence[Any]) -> None:
        """Makes more env tasks (imagined ones) playable by every actor, and by those started later."""
        self.tasks += list(tasks)
        if tasks:
            self._each(dict(self.actors), "add_tasks", list(tasks))

    def complete(self, prompts: Sequence[str], version: int, files: Files | None, max_new_tokens: int) -> list[str]:
        """The answers of policy ``version`` to ``prompts`` (one user turn each, up to ``max_new_tokens``),
        spread over the actors."""
        import ray

        self.ensure(version, files)
        names = list(self.actors)
        shares = {name: list(range(i, len(prompts), len(names))) for i, name in enumerate(names)}
        calls = {
            name: self.actors[name].complete.remote([prompts[i] for i in idx], max_new_tokens)
            for name, idx in shares.items()
        }
        answers: list[str] = [""] * len(prompts)
        for name, ref in calls.items():
            for i, text in zip(shares[name], ray.get(ref), strict=True):
                answers[i] = text
        return answers

    def publish(self, version: int, files: Files | None) -> None:
        """Makes ``version`` the one to serve without waiting: running actors load it between two
        generation steps; what they generated before keeps the version that produced it."""
        import ray

        self.files_ref, self.version = ray.put(files), version
        ray.get(self.dealer.publish.remote(version, self.files_ref))

    def play(
        self,
        keys: Sequence[str],
        source: Source,
        iteration: int,
        batch_size: int = 8,
        *,
        trials: Any = None,
        begun: dict[str, list[Trajectory]] | None = None,
        memory: Any = None,
    ) -> Iterator[list[Trajectory] | RolloutStats]:
        """Plays one episode per key (``"<env>/<task_id>"``) on the fleet; yields lists of finished
        trajectories as actors return them, then the stage's combined throughput stats.

        With ``trials`` (a :class:`~agentloop.memory.MemoryConfig`), each key is a chain of
        trials of its task played by one actor (STE): ``begun`` holds the trials played before
        of chains to continue, ``memory`` is a long-term memory actor (or None), recalled from
        for other tasks than each trial's own. A chain an actor left
        unfinished when it died goes on elsewhere from its last returned trial.

        Raises:
            ActorsLost: When every actor died before the episodes were played.
        """
        import ray

        if not self.actors:
            raise ActorsLost("no rollout actor is alive")
        started = time.perf_counter()
        deal = ray.get(self.dealer.deal.remote(list(keys), begun))
        out: queue.Queue = queue.Queue()
        running: set[str] = set()
        finished: dict[str, list[str]] = defaultdict(list)
        chains = {k: list(v) for k, v in (begun or {}).items()}  # trials so far of each chain
        counts: dict[str, Any] = {"delivered": 0, "generated": 0, "lost_actors": 0, "replayed": 0, "stats": []}

        def pump(name: str, actor: Any) -> None:
            try:
                for ref in actor.serve.options(num_returns="streaming").remote(
                    self.dealer, name, source, iteration, batch_size, deal, trials, memory
                ):
                    out.put((name, ray.get(ref)))
                out.put((name, _DONE))
            except BaseException as e:  # noqa: BLE001 - handed to the driver's thread
                out.put((name, e))

        def launch(name: str) -> None:
            running.add(name)
            threading.Thread(target=pump, args=(name, self.actors[name]), daemon=True).start()

        for name in self.actors:
            launch(name)
        try:
            yield from self._collect(out, running, launch, finished, counts, chains, trials)
        finally:
            if running:  # left early (an error, or the caller stopped): the actors play nothing more
                ray.get(self.dealer.deal.remote([]))
        yield RolloutStats(  # prompt counts only from actors that lived to report them
            episodes=counts["delivered"],
            generated_tokens=counts["generated"],
            seconds=time.perf_counter() - started,
            prompt_tokens=sum(s.prompt_tokens for s in counts["stats"]),
            reused_prompt_tokens=sum(s.reused_prompt_tokens for s in counts["stats"]),
            actors_lost=counts["lost_actors"],
            replayed_episodes=counts["replayed"],
            memory_tokens=sum(s.memory_tokens for s in counts["stats"]),
            memory_prompt_tokens=sum(s.memory_prompt_tokens for s in counts["stats"]),
            reflection_tokens=sum(s.reflection_tokens for s in counts["stats"]),
            failed_reflections=sum(s.failed_reflections for s in counts["stats"]),
            redraws=sum(s.redraws for s in counts["stats"]),
            redrawn_tokens=sum(s.redrawn_tokens for s in counts["stats"]),
        )

    def _collect(self, out, running, launch, finished, counts, chains, trials) -> Iterator[list[Trajectory]]:
        """What the actors' streams bring, until every one has ended; a dead actor's episodes are dealt again."""
        import ray

        while running:
            name, item = out.get()
            if isinstance(item, list):
                for t in item:
                    key = t.task.key
                    if trials is None or trials.last_trial(t):
                        finished[name].append(key)
                        chains.pop(key, None)
                    else:
                        chains.setdefault(key, []).append(t)
                counts["delivered"] += len(item)
                counts["generated"] += sum(t.generated_tokens for t in item)
                yield item
            elif isinstance(item, RolloutStats):
                counts["stats"].append(item)
            elif item is _DONE:
                running.discard(name)
                if name in self.actors and ray.get(self.dealer.waiting.remote()):
                    launch(name)  # episodes an actor that died left behind
            elif _died(item):  # the actor, or the node it ran on, died
                running.discard(name)
                ray.kill(self.actors[name], no_restart=True)  # (a no-op if it is dead already)
                self._drop(name)
                # its chains go on from their last returned trial, recorded as their keys go back
                lost = ray.get(self.dealer.give_back.remote(name, finished[name], chains if trials else None))
                counts["lost_actors"] += 1
                counts["replayed"] += len(lost)
                logger.warning("%s died mid-stage; %d of its episodes go to the other actors", name, len(lost))
                if not self.actors:
                    raise ActorsLost(f"every rollout actor died; {len(lost)} episodes unplayed") from item
                for other in self.actors:
                    if other not in running:
                        launch(other)
            else:
                raise item

    def _drop(self, name: str) -> None:
        """Forgets a dead actor; its share of its node's cores goes to its replacement."""
        del self.actors[name]
        self._loaded.pop(name, None)
        node, share = self._placed.pop(name)
        self._vacated[node].append(share)

    def _each(self, actors: dict[str, Any], method: str, *args: Any) -> list[str]:
        """Calls ``method`` on each of ``actors`` and waits; drops those found dead, and returns their names."""
        import ray

        calls = {name: getattr(actor, method).remote(*args) for name, actor in actors.items()}
        dead = []
        for name, ref in calls.items():
            try:
                ray.get(ref)
            except BaseException as e:
                if not _died(e):
                    raise
                logger.warning("%s is gone (%s); it will be replaced before the next rollout", name, type(e).__name__)
                dead.append(name)
        for name in dead:
            self._drop(name)
        return dead

    def sleep(self) -> None:
        """Frees each actor's model until its next rollout (it reloads the same version)."""
        self._each(dict(self.actors), "sleep")

    def close(self) -> None:
        """Stops every actor (their engines, their temporary adapter files) and the dealer."""
        import ray

        self._each(dict(self.actors), "close")
        for actor in [*self.actors.values(), self.dealer]:
            ray.kill(actor)
        self.actors = {}
