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

    def deal(self, keys: Sequence[str]) -> int:
        """A new stage: ``keys`` wait to be taken, in order. Returns the deal's number, which
        takers give back, so a rollout left over from an abandoned deal gets nothing more."""
        self.pending, self.taken = deque(keys), defaultdict(list)
        self.deal_number += 1
        return self.deal_number

    def take(self, worker: str, n: int, deal: int | None = None) -> tuple[list[str], int | None]:
        """Up to ``n`` waiting episodes of deal ``deal`` (None: the current one) for ``worker``,
        and the policy version to serve."""
        if deal is not None and deal != self.deal_number:
            return [], self.version
        keys = [self.pending.popleft() for _ in range(min(n, len(self.pending)))]
        self.taken[worker] += keys
        return keys, self.version

    def give_back(self, worker: str, finished: Sequence[str]) -> list[str]:
        """Puts the episodes ``worker`` took but did not finish first in line again; returns them."""
        done = set(finished)
        lost = [k for k in self.taken.pop(worker, []) if k not in done]
        self.pending.extendleft(reversed(lost))
        return lost

    def waiting(self) -> int:
        return len(self.pending)

    def publish(self, version: int, files: Files | None) -> None:
        """From now on actors serve ``version``: base model plus the adapter ``files`` (None = base)."""
        self.version, self.files = version, files

    def adapter(self) -> tuple[int | None, Files | None]:
        return self.version, self.files


def gpu_shares(total: float, actors: int, per_actor: float) -> tuple[float, float]:
    """GPUs each rollout actor and the learner ask for, given the cluster's ``total``.

    ``per_actor`` -1 (auto): with a GPU for every rollout actor and one for the learner, each
    gets its own; with fewer, but at least one per rollout actor, each rollout actor takes half
    a GPU and the learner half of one of them (the loop runs them in turns); without GPUs, none.
    The learner gets a whole GPU when one is left over after the rollout actors, else half.
    """
    if per_actor < 0:
        if total >= actors + 1:
            return 1.0, 1.0
        if total >= actors:
            return 0.5, 0.5
        if total > 0:
            raise ConfigError(
                f"rollout.num_gpus: the cluster has {total:g} GPUs for rollout.actors={actors} and the learner; "
                "set how much of a GPU each rollout actor takes"
            )
        return 0.0, 0.0
    left = total - actors * per_actor
    return per_actor, 1.0 if left >= 1 else 0.5 if total >= 1 else 0.0


class ActorsLost(RuntimeError):
    """Every rollout actor of the fleet died during a stage."""


_DONE = object()
PLACEMENT_TIMEOUT_S = 900


def _lost() -> tuple[type[BaseException], ...]:
    """Ray's errors for an actor that is gone: it died, its node died, or so did what it returned."""
    from ray.exceptions import NodeDiedError, ObjectLostError, RayActorError

    return RayActorError, ObjectLostError, NodeDiedError


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
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
        self.dealer = ray.remote(num_cpus=0, scheduling_strategy=here)(Dealer).remote()
        self.version: int = 0
        self.files_ref: Any = None  # the current adapter, put once in Ray's object store
        self.actors: dict[str, Any] = {}
        self._placed: dict[str, tuple[str, tuple[int, int]]] = {}  # actor -> its node, its share of the cores
        self._vacated: defaultdict[str, list[tuple[int, int]]] = defaultdict(list)  # shares of dead actors
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
            loads = {name: a.load_adapter.remote(self.files_ref, version) for name, a in self.actors.items()}
            dead = []
            for name, ref in loads.items():
                try:
                    ray.get(ref)
                except _lost():
                    dead.append(name)
            for name in dead:
                self._drop(name)
            if not dead:
                break
        else:
            raise ActorsLost(f"rollout actors keep dying while loading policy v{version}")
        return time.perf_counter() - started

    def publish(self, version: int, files: Files | None) -> None:
        """Makes ``version`` the one to serve without waiting: running actors load it between two
        generation steps; what they generated before keeps the version that produced it."""
        import ray

        self.files_ref, self.version = ray.put(files), version
        ray.get(self.dealer.publish.remote(version, self.files_ref))

    def play(
        self, keys: Sequence[str], source: Source, iteration: int, batch_size: int = 8
    ) -> Iterator[list[Trajectory] | RolloutStats]:
        """Plays one episode per key (``"<env>/<task_id>"``) on the fleet; yields lists of finished
        trajectories as actors return them, then the stage's combined throughput stats.

        Raises:
            ActorsLost: When every actor died before the episodes were played.
        """
        import ray

        if not self.actors:
            raise ActorsLost("no rollout actor is alive")
        started = time.perf_counter()
        deal = ray.get(self.dealer.deal.remote(list(keys)))
        out: queue.Queue = queue.Queue()
        running: set[str] = set()
        finished: dict[str, list[str]] = defaultdict(list)
        stats: list[RolloutStats] = []
        lost_actors = replayed = delivered = generated = 0

        def pump(name: str, actor: Any) -> None:
            try:
                for ref in actor.serve.options(num_returns="streaming").remote(
                    self.dealer, name, source, iteration, batch_size, deal
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
        while running:
            name, item = out.get()
            if isinstance(item, list):
                finished[name] += [f"{t.task.env}/{t.task.task_id}" for t in item]
                delivered, generated = delivered + len(item), generated + sum(t.generated_tokens for t in item)
                yield item
            elif isinstance(item, RolloutStats):
                stats.append(item)
            elif item is _DONE:
                running.discard(name)
                if name in self.actors and ray.get(self.dealer.waiting.remote()):
                    launch(name)  # episodes an actor that died left behind
            elif isinstance(item, _lost()):  # the actor, or the node it ran on, died
                running.discard(name)
                ray.kill(self.actors[name], no_restart=True)  # (a no-op if it is dead already)
                self._drop(name)
                lost = ray.get(self.dealer.give_back.remote(name, finished[name]))
                lost_actors, replayed = lost_actors + 1, replayed + len(lost)
                logger.warning("%s died mid-stage; %d of its episodes go to the other actors", name, len(lost))
                if not self.actors:
                    raise ActorsLost(f"every rollout actor died; {len(lost)} episodes unplayed") from item
                for other in self.actors:
                    if other not in running:
                        launch(other)
            else:
                raise item
        yield RolloutStats(  # prompt counts only from actors that lived to report them
            episodes=delivered,
            generated_tokens=generated,
            seconds=time.perf_counter() - started,
            prompt_tokens=sum(s.prompt_tokens for s in stats),
            reused_prompt_tokens=sum(s.reused_prompt_tokens for s in stats),
            actors_lost=lost_actors,
            replayed_episodes=replayed,
        )

    def _drop(self, name: str) -> None:
        """Forgets a dead actor; its share of its node's cores goes to its replacement."""
        del self.actors[name]
        node, share = self._placed.pop(name)
        self._vacated[node].append(share)

    def sleep(self) -> None:
        """Frees each actor's model until its next rollout (it reloads the same version)."""
        import ray

        ray.get([a.sleep.remote() for a in self.actors.values()])

    def close(self) -> None:
        """Stops every actor (their engines, their temporary adapter files) and the dealer."""
        import ray

        ray.get([a.close.remote() for a in self.actors.values()])
        for actor in [*self.actors.values(), self.dealer]:
            ray.kill(actor)
        self.actors = {}
