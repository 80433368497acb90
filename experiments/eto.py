"""ETO: Exploration-based Trajectory Optimization (Song et al., ACL 2024), on one or more environments.

    behaviour cloning on expert trajectories, then for each iteration:
        explore every training task greedily with the current policy
        pair each exploration with the task's expert trajectory (higher reward chosen)
        DPO on the pairs, the reference being the policy at the start of the round
    evaluating on held-out tasks after every stage.

Usage:
    python experiments/eto.py                                 # embedded default, CPU, local Ray
    python experiments/eto.py --config my.yaml sft.epochs=1   # YAML config plus overrides
    python experiments/eto.py 'envs=[{name: db}, {name: webshop, eval_tasks: 100}]'  # several envs
    python experiments/eto.py --resume runs/eto-20261122-0102 # continue after the last completed stage
    ray job submit --working-dir . -- python experiments/eto.py   # on a running Ray cluster
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import sys
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from agentloop import envs
from agentloop.config import ConfigError, load_config, with_sections
from agentloop.dashboard.launch import DashboardConfig
from agentloop.learners.dpo import DPOLearnerConfig
from agentloop.learners.sft import SFTLearnerConfig
from agentloop.policy.base import PolicyConfig, SamplingConfig
from agentloop.rollout import RolloutConfig
from agentloop.trackers import TrackingConfig


@dataclass
class EnvSpec:
    """One environment of a run and the tasks it contributes."""

    name: str = "db"
    """A registered environment (``agentloop.envs.names()``): db, os, webshop, alfworld, or a plugin's."""
    train_split: str = ""
    """Split explored and imitated; empty = the env's default (its registration's ``train_split``)."""
    eval_split: str = ""
    """Held-out split evaluated after every stage; empty = the env's default."""
    train_tasks: int = 0
    """Use only this many training tasks, a seeded sample, for experts, SFT and exploration (0 = all, as in ETO)."""
    eval_tasks: int = 0
    """Evaluate on this many held-out tasks (the first ones; 0 = all)."""

    def validate(self) -> None:
        if self.name not in envs.names():
            raise ConfigError(f"name: unknown environment {self.name!r}; known: {', '.join(envs.names())}")
        known = envs.definition(self.name).splits
        for key in ("train_split", "eval_split"):
            if getattr(self, key) and getattr(self, key) not in known:
                raise ConfigError(f"{key}: {self.name} has no split {getattr(self, key)!r}; known: {', '.join(known)}")
        if min(self.train_tasks, self.eval_tasks) < 0:
            raise ConfigError("train_tasks and eval_tasks must be >= 0")

    def splits(self) -> tuple[str, str]:
        """The (training, held-out) split names, defaults filled in."""
        found = envs.definition(self.name)
        return self.train_split or found.train_split, self.eval_split or found.eval_split

    def training_tasks(self, data_dir: Path, seed: int) -> list:
        """The training tasks a run with ``seed`` uses: its split's, or the seeded sample of ``train_tasks``."""
        tasks = envs.load_tasks(self.name, data_dir, self.splits()[0])
        keep = set(sample_ids([t.task.task_id for t in tasks], self.train_tasks, seed))
        return [t for t in tasks if t.task.task_id in keep]


@dataclass
class ETOConfig:
    """Everything an ETO run needs; ``python experiments/eto.py --help`` lists overrides."""

    run_dir: str = ""
    """Where the run lives; empty = ``runs/eto-<date>-<time>``."""
    data_dir: str = field(default_factory=lambda: os.environ.get("AGENTLOOP_DATA_DIR", "data"))
    """Task data (``AGENTLOOP_DATA_DIR``; README: how to fill it from the public sources)."""
    store_url: str = ""
    """SQLAlchemy URL of the replay store; empty = SQLite file in the run directory."""
    ray_address: str = ""
    """Ray cluster to join; empty = the cluster of ``ray job submit`` if any, else a local one."""
    envs: list[EnvSpec] = field(default_factory=lambda: [EnvSpec("db")])
    """The environments trained and evaluated together; metrics and curves come per env too."""
    iterations: int = 2
    seed: int = 0
    threads: int = 0
    """torch threads of each actor; 0 = all cores of its node for the learner, and for a rollout
    actor its share of them when several rollout actors run on one node (the loop runs the
    learner and the rollout in turns)."""
    commit_every: int = 8
    """Episodes of a rollout stage stored per transaction as they finish: an interrupted stage
    resumes with only the episodes it lacks."""
    mismatch_episodes: int = 8
    """Episodes of each rollout stage (a seeded sample) that the learner scores again, for the
    ``*/mismatch/*`` metrics: how far the serving engine's log-probs are from the learner's on
    the same tokens (0 = off). Scoring 16 base-model episodes (10,240 tokens) added about 50 s
    to the default run's eval/base; 8 halve that."""
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    rollout: RolloutConfig = field(
        default_factory=lambda: RolloutConfig(
            concurrent_episodes=48, max_context_tokens=0, sampling=SamplingConfig(max_new_tokens=128)
        )
    )
    """128 new tokens per turn cover every expert action (longest: 130 tokens with its stop token, p95 74).
    48 episodes in flight keep the 32 rows of a generation batch busy while some episodes wait.
    ``max_context_tokens`` 0 fits the run's envs (the largest ``context_tokens`` they register)."""
    # The embedded default fits SFT + 2 rounds into about an hour on a 2-core CPU: 2 SFT epochs
    # and 1 DPO epoch per round instead of ETO's 3 and 3; 10% of earlier rounds' pairs replayed.
    # Plain DPO lowered the chosen trajectories' likelihood too and made the 270M policy worse
    # on held-out tasks (7/60 after round 1 against 9/60 after SFT), so the default adds the
    # chosen side's NLL (RPO) to ETO's loss.
    # Learner max_length 0 = the rollout's context, so whole episodes train.
    sft: SFTLearnerConfig = field(default_factory=lambda: SFTLearnerConfig(epochs=2, max_length=0))
    dpo: DPOLearnerConfig = field(
        default_factory=lambda: DPOLearnerConfig(epochs=1, replay_fraction=0.1, sft_loss_weight=1.0, max_length=0)
    )
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    """Where metrics go besides ``metrics.jsonl``: TensorBoard (on), W&B (``tracking.wandb.project``) and MLflow
    (``tracking.mlflow.tracking_uri``) when set; a resumed run continues their runs."""
    dashboard: DashboardConfig = field(default_factory=DashboardConfig)
    """``dashboard.enabled=true`` serves the live dashboard of the run's store while it runs (on
    ``dashboard.host``:``dashboard.port``, localhost by default)."""

    def validate(self) -> None:
        if not Path(self.data_dir).is_dir():
            raise ConfigError(f"data_dir {self.data_dir!r} is not a directory (set AGENTLOOP_DATA_DIR)")
        if self.commit_every < 1:
            raise ConfigError(f"commit_every must be >= 1, got {self.commit_every}")
        if min(self.iterations, self.threads, self.mismatch_episodes) < 0:
            raise ConfigError("iterations, threads and mismatch_episodes must be >= 0")
        names = [spec.name for spec in self.envs]
        if not names or len(set(names)) != len(names):
            raise ConfigError(f"envs: need at least one environment, each once; got {names}")
        self.check_lengths()

    def check_lengths(self) -> None:
        """Refuses a context or learner length that would cut the final turn of most episodes of a chosen env.

        0 (the default) fits the run's envs: see :meth:`fit_lengths`.
        """
        lengths = {
            "rollout.max_context_tokens": self.rollout.max_context_tokens,
            "sft.max_length": self.sft.max_length,
            "dpo.max_length": self.dpo.max_length,
        }
        for i, spec in enumerate(self.envs):
            found = envs.definition(spec.name)
            for key, value in lengths.items():
                if 0 < value < found.median_episode_tokens:
                    raise ConfigError(
                        f"{key}={value} would cut the final turn of most {spec.name} episodes (envs[{i}].name="
                        f"{spec.name}: half of its expert demonstrations are longer than {found.median_episode_tokens} "
                        f"tokens); set {key} to at least {found.context_tokens}, or to 0 to fit the run's envs"
                    )

    def fit_lengths(self) -> None:
        """Resolves the lengths left at 0: the rollout's context becomes the largest that the run's envs
        register (``EnvDefinition.context_tokens``), and each learner's ``max_length`` that context, so
        whole episodes train; the prefix cache left at -1 gets room for every episode in flight at that
        context. Called once, before the config is saved with the run."""
        if self.rollout.max_context_tokens == 0:
            self.rollout.max_context_tokens = max(envs.definition(spec.name).context_tokens for spec in self.envs)
        for learner in (self.sft, self.dpo):
            if learner.max_length == 0:
                learner.max_length = self.rollout.max_context_tokens
        self.policy.fit_prefix_cache(self.rollout.concurrent_episodes, self.rollout.max_context_tokens)

    def env_config(self, name: str):
        """The settings section of one environment (``db``, ``os``, ...)."""
        return getattr(self, name)

    def expert_config(self, name: str):
        """The expert settings of one environment (section ``<name>_experts``), None when its expert has none."""
        return getattr(self, f"{name}_experts", None)


# One settings section per registered environment (``db``, ``os``, ``webshop``, ``alfworld``,
# plugins'), and ``<name>_experts`` for an expert with settings (``db_experts``).
ETOConfig = with_sections(ETOConfig, envs.config_sections())


STAGE_READS = {
    "experts": ("envs", "seed"),
    "eval": ("envs", "policy", "rollout"),
    "explore": ("envs", "policy", "rollout"),
    "sft": ("sft", "policy.model"),
    "dpo": ("dpo", "policy.model", "seed"),
}
"""The settings each stage family reads, besides every env's own section (experts, eval, explore).
A resumed run refuses to change a setting that a completed stage read."""
FREE_SETTINGS = (
    "data_dir",
    "commit_every",
    "mismatch_episodes",
    "threads",
    "ray_address",
    "iterations",
    "rollout.concurrent_episodes",
    "rollout.env_threads",
    "rollout.actors",
    "rollout.num_cpus",
    "rollout.num_gpus",
    "policy.batch_size",
    "policy.prefix_cache_tokens",
)
"""Settings a resumed run may always change: they decide where the task data lives, how fast, or how many
rounds, not what a stage computes."""


def main(argv: list[str] | None = None) -> None:
    from agentloop.learners.data import build_pairs

    config, run_dir, saved = parse_args(argv, ETOConfig, "eto")
    run = Run(config, run_dir, saved, STAGE_READS, FREE_SETTINGS)

    # 1. Expert demonstrations, replayed through the real environment; only successes kept.
    experts = run.stages.rollout("experts", 0, run.make_experts)
    explore_ids = [t.task.key for t in experts]  # every training task with a demonstration, as in ETO

    # 2. The base model, then behaviour cloning on the experts.
    run.evaluate("eval/base", version=0, iteration=0)
    run.adapters[1] = run.stages.train("sft", 1, partial(run.sft, experts))
    run.evaluate("eval/sft", version=1, iteration=0, baseline="eval/base")

    # 3. ETO rounds: explore -> pairs -> DPO (reference = the policy at the start of the round).
    for it in range(1, config.iterations + 1):
        # The policy after round it - 1 (version it) explores every training task with a demonstration.
        found = run.stages.stream(
            f"explore/{it}", it, explore_ids, run.play("explore", it, it), partial(run.explored, it)
        )
        pairs = build_pairs(experts, found, iteration=it)
        run.adapters[it + 1] = run.stages.train(f"dpo/{it}", it, partial(run.dpo, it, pairs), pairs=pairs)
        run.evaluate(f"eval/{it}", version=it + 1, iteration=it, baseline="eval/sft")

    run.finish()


class Run:
    """What an experiment drives: its tasks, replay store and stages, the rollout fleet and the learner,
    and the adapter of every policy version. Started by the constructor (Ray included).

    Args:
        config: The experiment's resolved config (an :class:`ETOConfig` or an extension of it).
        run_dir: The run directory.
        saved: The saved config of a resumed run (None for a new one).
        reads: For each stage family, the settings it reads (``STAGE_READS``).
        free: Settings a resumed run may always change (``FREE_SETTINGS``).
    """

    def __init__(self, config, run_dir, saved, reads, free) -> None:
        import ray

        from agentloop.actors.workers import start_workers
        from agentloop.dashboard.launch import check_port, start_dashboard
        from agentloop.loop import Heartbeat, Stages
        from agentloop.metrics import MetricsLogger
        from agentloop.replay import ReplayStore
        from agentloop.trackers import start_trackers

        self.config, self.run_dir = config, run_dir
        url = config.store_url or run_dir.store_url
        if saved is not None:
            # A stage with episodes stored already counts as done for what it read: its remaining
            # episodes must be played with the same settings.
            with ReplayStore(url) as stored:
                begun = stored.completed_stages() + stored.started_stages()
            resume_checks(config, saved, run_dir, begun, reads, free)
        check_port(config.dashboard)  # a taken port, too, stops the run before its trackers start
        # Before any work, and after the resume checks (a refused resume touches no tracker run): a tracker
        # that cannot start (W&B, MLflow) stops the run here, before any task is loaded or a new run's store made.
        self.metrics = MetricsLogger(run_dir.path, start_trackers(config.tracking, run_dir.path, config))
        self.train, self.held_out = {}, []  # training tasks by env; held-out tasks of all envs
        for spec in config.envs:
            self.train[spec.name] = spec.training_tasks(Path(config.data_dir), config.seed)
            held_out = envs.load_tasks(spec.name, Path(config.data_dir), spec.splits()[1])
            self.held_out += held_out[: spec.eval_tasks or None]
        self.store = ReplayStore(url)
        self.heartbeat = Heartbeat(self.store)  # tells the dashboard this run lives
        self.stages = Stages(run_dir, self.store, self.metrics)
        print(f"run directory: {run_dir.path}")
        # Before any work too: a dashboard that cannot start stops the run. It stops with the run.
        self.dashboard = start_dashboard(config.dashboard, url, run_dir.path)

        # A job from `ray job submit` finds its cluster in RAY_ADDRESS; otherwise start a local one
        # (never silently join a cluster some earlier `ray start` left behind).
        address = config.ray_address or os.environ.get("RAY_ADDRESS") or "local"
        # A local cluster skips Ray's dashboard (about 0.9 GB): agentloop's own (dashboard.enabled) and its
        # trackers show the run. It declares enough CPUs for every actor's reservation: the learner and the
        # rollout take turns.
        local = {"include_dashboard": False, "num_cpus": local_cpus(config)} if address == "local" else {}
        ray.init(address=address, log_to_driver=True, **local)
        every = [t for tasks in self.train.values() for t in tasks] + self.held_out
        self.fleet, self.learner = start_workers(config, every)
        self.adapters = {0: None}  # policy version -> its adapter's files (None: the base model)

    def play(self, source: str, version: int, iteration: int, **trials):
        """Plays episodes on the rollout fleet with policy ``version``; yields batches of finished
        trajectories as they end (stored at once by ``stages.stream``), then the throughput stats.
        ``trials``: STE's trial settings for :meth:`agentloop.actors.fleet.Fleet.play`."""

        def run(todo: list[str], begun: dict):
            self.fleet.ensure(version, self.adapters[version])
            yield from self.fleet.play(todo, source, iteration, self.config.commit_every, begun=begun, **trials)

        return run

    def mismatch(self, trajectories, version: int, prefix: str) -> dict[str, float]:
        """The learner scores a sample of a stage's episodes under the policy that played them."""
        import ray

        if not self.config.mismatch_episodes:
            return {}
        sample = random.Random(self.config.seed).sample(
            trajectories, min(self.config.mismatch_episodes, len(trajectories))
        )
        try:
            found = ray.get(self.learner.mismatch.remote(self.adapters[version], sample))
        except ray.exceptions.RayTaskError as e:  # a measurement must not keep the stage from committing
            logging.getLogger("eto").warning("%s/mismatch not measured: %s", prefix, e)
            return {}
        return {f"{prefix}/mismatch/{k}": v for k, v in found.items()}

    def evaluate(self, stage: str, version: int, iteration: int, baseline: str = "", extra=None) -> list:
        """Runs the held-out tasks; with a baseline stage, also a paired test against it on the same tasks.
        ``extra(metrics)``: more metrics from the stage's own."""
        from agentloop.metrics import paired_comparison, trajectory_metrics

        def measure(trajectories, stats):
            metrics = {**trajectory_metrics(trajectories, "eval"), **rollout_metrics(stats, "eval")}
            metrics |= self.mismatch(trajectories, version, "eval")
            if baseline:
                before = self.store.trajectories(stage=baseline)
                metrics |= paired_comparison(before, trajectories, f"eval/vs_{baseline.split('/')[-1]}")
            return metrics | (extra(metrics) if extra is not None else {})

        keys = [t.task.key for t in self.held_out]
        return self.stages.stream(stage, version, keys, self.play("eval", version, iteration), measure)

    def make_experts(self):
        """Expert demonstrations of every training task, replayed through the real environment."""
        from agentloop.metrics import flatten_metrics, trajectory_metrics

        demos, report = [], {}
        for name, tasks in self.train.items():
            config = self.config
            found, report[name] = envs.build_experts(
                name, tasks, config.env_config(name), config.expert_config(name), seed=config.seed
            )
            demos += found
        return demos, {**trajectory_metrics(demos, "experts"), **flatten_metrics(report, "experts/report")}

    def sft(self, trajectories, adapter=None, config=None):
        """Behaviour cloning (from the base model, or continuing ``adapter``); the rollout sleeps meanwhile."""
        import ray

        self.fleet.sleep()  # the rollout workers' models leave memory while the learner's is in it
        return ray.get(self.learner.sft.remote(trajectories, adapter, config))

    def explored(self, version: int, trajectories, stats) -> dict[str, float]:
        """The metrics of an exploration stage."""
        from agentloop.metrics import trajectory_metrics

        metrics = {**trajectory_metrics(trajectories, "explore"), **rollout_metrics(stats, "explore")}
        return metrics | self.mismatch(trajectories, version, "explore")

    def dpo(self, it: int, pairs, start: int | None = None):
        """A DPO round on ``pairs`` plus replay of earlier rounds' pairs (per env), from policy version
        ``start`` (default ``it``, the policy that explored), which is also the reference."""
        import ray

        from agentloop.learners.data import mix_replay_per_env

        earlier = [p for p in self.store.pairs() if p.iteration < it]
        rng = random.Random(self.config.seed + it)
        batch = mix_replay_per_env(pairs, earlier, self.config.dpo.replay_fraction, rng)
        self.fleet.sleep()
        files, metrics = ray.get(self.learner.dpo.remote(self.adapters[it if start is None else start], batch))
        return files, {**metrics, "dpo/pairs_built": len(pairs), "dpo/pairs_replayed": len(batch) - len(pairs)}

    def finish(self) -> None:
        """Closes the metrics (and draws the learning curve), the actors and Ray."""
        import ray

        from agentloop.metrics import plot_learning_curve

        self.heartbeat.close()
        self.metrics.close()
        plot_learning_curve(self.run_dir.path / "metrics.jsonl", self.run_dir.path / "learning_curve.png")
        print(f"learning curve: {self.run_dir.path / 'learning_curve.png'}")
        self.fleet.close()  # the actors' temp dirs (adapters) go too
        ray.get(self.learner.close.remote())
        ray.shutdown()
        if self.dashboard is not None:
            self.dashboard.close()
            where = "STORE_URL" if self.config.store_url else self.run_dir.path
            print(f"dashboard stopped; `agentloop dashboard --store {where}` serves it again")


def local_cpus(config) -> int:
    """CPUs a local Ray cluster declares: this machine's cores, or enough for every actor's reservation."""
    import math

    return max(len(os.sched_getaffinity(0)), math.ceil(config.rollout.actors * config.rollout.num_cpus) + 1)


def rollout_metrics(stats, prefix: str) -> dict[str, float]:
    """Generation throughput of a rollout stage and how much prompt prefill the cache saved
    (none when a resumed stage had every episode stored already)."""
    if stats is None:
        return {}
    return {
        f"{prefix}/tokens_per_s": stats.tokens_per_s,
        f"{prefix}/prefix_reuse": stats.prefix_reuse,
        f"{prefix}/actors_lost": float(stats.actors_lost),
        f"{prefix}/replayed_episodes": float(stats.replayed_episodes),
    }


def sample_ids(ids: list[str], n: int, seed: int) -> list[str]:
    """All ids (n = 0) or a seeded sample of n, in their original order."""
    if not n or n >= len(ids):
        return ids
    keep = set(random.Random(seed).sample(ids, n))
    return [i for i in ids if i in keep]


def parse_args(
    argv: list[str] | None, config_class: type = ETOConfig, name: str = "eto", doc: str = __doc__, check=None
):
    """Reads the config (YAML + overrides, or a run to resume) and opens the run directory
    (new runs: ``runs/<name>-<date>-<time>`` unless ``run_dir`` is set). ``check(config)``, an
    experiment's own check of its config (against the data, or endpoints that must answer), raises before
    a new run's directory exists, or before a resumed run starts any work."""
    from agentloop.loop import RunDir

    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, help=f"YAML file mirroring {config_class.__name__}")
    parser.add_argument("--resume", type=Path, help="run directory to continue after its last completed stage")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. sft.epochs=1")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.resume:
        if args.config:
            raise ConfigError("--resume continues a run with its own config.yaml; give overrides, not --config")
        run, saved, config = RunDir.resume(args.resume, config_class, args.overrides)
        for each in (saved, config):  # lengths a saved config lacks (a section its experiment had not) are fitted
            each.fit_lengths()
        for key in ("run_dir", "store_url"):  # where the run and its record of completed stages live
            if getattr(config, key) != getattr(saved, key):
                raise ConfigError(f"{key}: a resumed run keeps its {key} ({getattr(saved, key)!r})")
        if check is not None:
            check(config)
        run.record_start(sys.argv)
        return config, run, saved
    config = load_config(config_class, args.config, args.overrides)
    config.fit_lengths()
    check_held_out(config)
    if check is not None:
        check(config)
    path = Path(config.run_dir or f"runs/{name}-{time.strftime('%Y%m%d-%H%M%S')}")
    run = RunDir.create(path, config)
    run.record_start(sys.argv)
    return config, run, None


def check_held_out(config) -> None:
    """An experiment's held-out tasks are not its training tasks (``agentloop eval`` may play any split).

    Raises:
        ConfigError: Naming ``envs[i].eval_split`` when it is that env's training split.
    """
    for i, spec in enumerate(config.envs):
        train, held_out = spec.splits()
        if train == held_out:
            raise ConfigError(
                f"envs[{i}].eval_split: {held_out!r} is also {spec.name}'s training split: its held-out tasks "
                "would be explored and trained on; choose another split"
            )


def resume_checks(config, saved, run, completed: list[str], reads=STAGE_READS, free=FREE_SETTINGS) -> None:
    """A resumed run may change only what its completed stages did not read (see ``STAGE_READS``)."""
    from agentloop.loop import check_resume

    sections = tuple(envs.config_sections())
    reads = {
        family: tuple(keys) + (sections if family in ("experts", "eval", "explore") else ())
        for family, keys in reads.items()
    }
    changed = check_resume(saved, config, completed, reads, free=free)
    if changed:
        print(f"resuming with changed settings (no completed stage read them): {', '.join(changed)}")
        run.save_config(config)


if __name__ == "__main__":
    main()
