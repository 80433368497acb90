"""STE exploration (Wang et al., ACL 2024) feeding ETO's training rounds (Song et al., ACL 2024).

    behaviour cloning on expert trajectories, then for each iteration:
        explore every training task in a chain of trials: the first one ETO's greedy pass, each retry shown
            long-term memory: experiences of the most similar tasks tried so far, and
            short-term memory: the task's earlier trials, their outcomes and reflections
            (memory.first_trial_memory=true shows long-term memory to the first trial too, as STE does)
        after each trial the policy reflects; every trial is distilled into long-term memory
        SFT on the round's successful trials (memory stripped), with replay of earlier rounds' data
        DPO on ETO's pairs (expert vs first trial) and the trials' pairs (success vs failure)
    evaluating on held-out tasks, without memory, after every stage.

Usage:
    python experiments/ste.py                                  # embedded default: DB, 1 round, CPU, local Ray
    python experiments/ste.py memory.trials=1 memory.long_term_tokens=0   # ablations are config
    python experiments/ste.py --resume runs/ste-20261202-0102  # continue after the last completed stage
    python experiments/ste.py imagine.tasks_per_env=50         # with imagined tasks
    ray job submit --working-dir . -- python experiments/ste.py
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Any, ClassVar

from eto import FREE_SETTINGS, ETOConfig, Run, parse_args, rollout_metrics

from agentloop import envs
from agentloop.config import ConfigError
from agentloop.learners.sft import SFTLearnerConfig
from agentloop.memory import MemoryConfig
from agentloop.memory.imagination import ImagineConfig
from agentloop.memory.short_term import is_reflection, repeated_retries


@dataclass
class MixConfig:
    """What each round trains on."""

    successes: bool = True
    """SFT on the round's successful trials before its DPO (STE's exploitation)."""
    expert_pairs: bool = True
    """ETO's pairs: each task's expert demonstration against its first trial."""
    trial_pairs: bool = True
    """Pairs among a task's trials: the best trial against each worse one."""

    def validate(self) -> None:
        if not (self.successes or self.expert_pairs or self.trial_pairs):
            raise ConfigError("successes, expert_pairs, trial_pairs: a round needs at least one source of data")


@dataclass
class STEConfig(ETOConfig):
    """An ETO run whose exploration has STE's trials and memory; ``--help`` lists overrides."""

    LEGACY: ClassVar[dict[str, Any]] = {
        "memory.first_trial_memory": True,  # before 457c1ee every trial was shown long-term memory
        "memory.recall": "all",  # before d527ec8 long-term memory showed every outcome
        "memory.retry_temperature": 0.0,  # before 61fe778 retries decoded greedily
    }
    """What runs saved before these settings existed did (:meth:`agentloop.loop.RunDir.legacy_settings`)."""

    iterations: int = 1
    """STE rounds. One on the CPU default: its 670 trials of the 250 DB tasks took 42 min on 2 cores
    (ETO's greedy pass of the same tasks takes about 4), so two rounds would not fit in 90 minutes."""
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    imagine: ImagineConfig = field(default_factory=ImagineConfig)
    mix: MixConfig = field(default_factory=MixConfig)
    round_sft: SFTLearnerConfig = field(
        default_factory=lambda: SFTLearnerConfig(epochs=1, max_length=0, learning_rate=1e-4, replay_fraction=0.1)
    )
    """SFT of each round on its successful trials, continuing the current adapter; 10% of earlier
    rounds' SFT data (the expert demonstrations, earlier successes) replayed, per env, as STE replays."""

    def validate(self) -> None:
        super().validate()
        if self.memory.trials == 1 and self.memory.long_term_tokens and not self.memory.first_trial_memory:
            raise ConfigError(
                "memory.trials=1 with memory.first_trial_memory=false: no trial would ever be shown long-term memory; "
                "set memory.first_trial_memory=true (one pass, shown memory) or memory.long_term_tokens=0"
            )
        if self.memory.trials == 1 and not (self.mix.successes or self.mix.expert_pairs):
            raise ConfigError("mix.trial_pairs: pairs among a task's trials need memory.trials >= 2, and are all this "
                              "round would train on")  # fmt: skip

    def check_lengths(self) -> None:
        """As :meth:`ETOConfig.check_lengths`, for ``round_sft`` too; and a rollout context set by hand must leave
        an episode its room beside memory's budgets, or a trial shown all its memory would be cut short."""
        super().check_lengths()
        context, memory = self.rollout.max_context_tokens, self.memory.memory_tokens
        for i, spec in enumerate(self.envs):
            found = envs.definition(spec.name)
            if 0 < self.round_sft.max_length < found.median_episode_tokens:
                raise ConfigError(
                    f"round_sft.max_length={self.round_sft.max_length} would cut the final turn of most {spec.name} "
                    f"episodes (envs[{i}].name={spec.name}: half are longer than {found.median_episode_tokens} "
                    "tokens); set it to 0 to fit the rollout's context"
                )
            if context and memory and context - memory < found.median_episode_tokens:
                raise ConfigError(
                    f"rollout.max_context_tokens={context} leaves {context - memory} tokens beside memory's {memory} "
                    f"(memory.short_term_tokens + memory.long_term_tokens): a trial shown all of it would cut most "
                    f"{spec.name} episodes (envs[{i}].name={spec.name}: half are longer than "
                    f"{found.median_episode_tokens} tokens); set it to at least {found.context_tokens + memory}, "
                    "or to 0 to fit the envs and memory"
                )

    def fit_lengths(self) -> None:
        """As :meth:`ETOConfig.fit_lengths`, with room in the rollout's context for memory; learners
        get the same length (a trial shown little memory may use the room for its own turns)."""
        context = max(envs.definition(spec.name).context_tokens for spec in self.envs)
        if self.rollout.max_context_tokens == 0:
            self.rollout.max_context_tokens = context + self.memory.memory_tokens
        for learner in (self.sft, self.round_sft, self.dpo):  # a trial shown little memory may run longer
            if learner.max_length == 0:
                learner.max_length = self.rollout.max_context_tokens
        self.policy.fit_prefix_cache(self.rollout.concurrent_episodes, self.rollout.max_context_tokens)


STAGE_READS = {
    "experts": ("envs", "seed"),
    "eval": ("envs", "policy", "rollout"),
    "imagine": ("envs", "policy", "rollout.sampling", "imagine", "memory", "seed"),
    "explore": ("envs", "policy", "rollout", "memory", "imagine"),
    "sft": ("sft", "policy.model"),
    "round_sft": ("round_sft", "mix", "policy.model", "seed"),
    "dpo": ("dpo", "mix", "policy.model", "seed"),
}
"""As in eto.py, plus what imagination and trials read (``imagine``, ``memory``) and what rounds train on
(``round_sft``, ``mix``)."""


def main(argv: list[str] | None = None) -> None:
    config, run_dir, saved = parse_args(argv, STEConfig, "ste", __doc__, check=check_endpoints)
    run = Run(config, run_dir, saved, STAGE_READS, FREE_SETTINGS)
    memory = RunMemory(run)  # rebuilt from the store's experiences on --resume

    # 1. Expert demonstrations, then the base model and behaviour cloning, as in ETO.
    experts = run.stages.rollout("experts", 0, run.make_experts)
    explore_ids = [t.task.key for t in experts]
    run.evaluate("eval/base", version=0, iteration=0)
    run.adapters[1] = run.stages.train("sft", 1, partial(run.sft, experts))
    run.evaluate("eval/sft", version=1, iteration=0, baseline="eval/base")
    version = 1  # the policy that explores next

    # 2. Rounds: imagine -> trials with memory -> SFT on successes -> DPO on pairs -> evaluate.
    for it in range(1, config.iterations + 1):
        version = ste_round(run, memory, it, version, explore_ids, experts)
        run.evaluate(f"eval/{it}", version=version, iteration=it, baseline="eval/sft")

    run.finish()


def check_endpoints(config) -> None:
    """A configured teacher or explorer must answer before any work starts (a mis-set one would
    otherwise fail every reflection of a stage, and a resumed run could not change it)."""
    from agentloop.endpoint import Endpoint

    for key, endpoint in (
        ("memory.teacher", config.memory.teacher),
        ("imagine.explorer", config.imagine.explorer),
        ("imagine.judge", config.imagine.judge),
    ):
        if endpoint.enabled:
            Endpoint(endpoint).check(key)


def ste_round(run: Run, memory: RunMemory, it: int, version: int, explore_ids: list[str], experts, within=None) -> int:
    """One STE round from policy ``version`` on the tasks ``explore_ids`` (and those it imagines near them;
    with ``within``, a test of a :class:`agentloop.types.Task`, only imagined tasks that pass it are kept);
    ``experts`` are the demonstrations replayed in its SFT. Returns the version it trained."""
    config = run.config
    # The explorer imagines tasks near a sample of the training tasks, unlike those remembered;
    # the judge's accepted ones are verified, their own solutions replayed as demonstrations.
    imagined, accepted = [], []
    if config.imagine.tasks_per_env:
        from agentloop.memory.imagination import rebuild

        stage = f"imagine/{it}"
        made: dict = {}  # the tasks built when the stage runs now; rebuilt from the store when it ran before
        ask = partial(imagine, run, memory, version, it, set(explore_ids), made, within)
        proposals = run.stages.imagine(stage, it, ask)
        imagined = made.get("tasks") or rebuild(proposals, run.train, env_configs(config))
        run.fleet.add_tasks(imagined)
        accepted = imagined_experts(run, proposals, imagined)
    # Every task played in a chain of trials, each shown long- and short-term memory.
    stage = f"explore/{it}"
    keys = explore_ids + [t.task.key for t in imagined]
    play = run.play("explore", version, it, trials=config.memory, memory=memory.actor)
    trials = run.stages.stream(
        stage, it, keys, play, partial(explored, run, version, it), ends=config.memory.last_trial, memory=memory
    )
    # SFT on the round's successes, then DPO on expert and trial pairs (reference: the policy after SFT).
    # A stage completed before a resume counts, whatever its data would be now: the versions stay those trained.
    done = run.stages.completed
    if f"round_sft/{it}" in done or (config.mix.successes and (accepted or any(t.success for t in trials))):
        data = round_sft_data(run, it, trials, experts, accepted)
        train = partial(train_round_sft, run, version, data)
        run.adapters[version + 1] = run.stages.train(f"round_sft/{it}", it, train)
        version += 1
    pairs = round_pairs(config.mix, experts + accepted, trials, it)
    if f"dpo/{it}" in done or pairs:
        run.adapters[version + 1] = run.stages.train(
            f"dpo/{it}", it, partial(train_dpo, run, it, pairs, version), pairs=pairs
        )
        version += 1
    return version


class RunMemory:
    """The run's long-term memory: a :class:`agentloop.memory.LongTermMemory` Ray actor that the
    rollout actors ask, fed from the replay store (rebuilt from it on ``--resume``)."""

    def __init__(self, run: Run) -> None:
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        from agentloop.memory import LongTermMemory as Memory

        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        self.actor = None
        if run.config.memory.long_term_tokens:
            self.actor = ray.remote(num_cpus=0, scheduling_strategy=here)(Memory).remote()
            ray.get(self.actor.add.remote(run.store.experiences()))

    def recall(self, k: int):
        """Long-term memory's ``k`` most similar experiences of each of some tasks (None without memory)."""
        import ray

        if self.actor is None:
            return None
        return lambda tasks: ray.get(self.actor.recall.remote(list(tasks), k))

    def distill(self, trajectories, stage: str):
        from agentloop.memory import distill

        return [distill(t, stage) for t in trajectories]

    def add(self, experiences) -> None:
        import ray

        if self.actor is not None:
            ray.get(self.actor.add.remote(experiences))


def imagine(run: Run, memory: RunMemory, version: int, it: int, keys: set[str], made: dict, within=None):
    """Proposals of new tasks near a seeded sample of the round's training tasks (``keys``), by the
    policy (or the configured explorer), each shown the remembered tasks most like its base as ones to avoid;
    a task that fails ``within`` (another task family than the round's, say) is not valid."""
    import random

    from agentloop.endpoint import Endpoint
    from agentloop.memory.imagination import build, choose_bases, requests

    config = run.config
    train = {name: [t for t in tasks if t.task.key in keys] for name, tasks in run.train.items()}
    bases = choose_bases(train, config.imagine.tasks_per_env, random.Random(config.seed * 1000 + it), run.held_out)
    asked = requests(bases, memory.recall(config.imagine.avoid) if config.imagine.avoid else None)
    if config.imagine.explorer.enabled:
        texts = Endpoint(config.imagine.explorer).answers(asked)
    else:
        texts = run.fleet.complete(asked, version, run.adapters[version], config.imagine.max_new_tokens)
    proposals, made["tasks"] = build(bases, texts, env_configs(config), f"imagine/{it}", within)
    if config.imagine.judged:
        from agentloop.memory.judge import SYSTEM, judge

        if config.imagine.judge.enabled:
            ask = partial(Endpoint(config.imagine.judge).answers, system=SYSTEM)
        else:
            ask = partial(run.fleet.complete, version=version, files=run.adapters[version], max_new_tokens=8)
        proposals = judge(proposals, made["tasks"], env_configs(config), ask)
    metrics = {}
    for env in sorted({p.env for p in proposals}):
        mine = [p for p in proposals if p.env == env]
        metrics |= {
            f"imagine/env/{env}/proposed": len(mine),
            f"imagine/env/{env}/valid": sum(p.valid for p in mine),
            f"imagine/env/{env}/judged": sum(p.judged is True for p in mine),
            f"imagine/env/{env}/judge_undecided": sum(p.valid and p.judged is None for p in mine),
        }
    return proposals, metrics


def imagined_experts(run: Run, proposals, imagined) -> list:
    """Demonstrations of the imagined tasks the judge accepted: each proposal's own solution,
    replayed through the env (only those that succeed are kept; the same on every resume)."""
    accepted = {(p.env, p.task_id) for p in proposals if p.judged}
    demos = []
    for name in sorted({env for env, _ in accepted}):
        tasks = [t for t in imagined if (name, t.task.task_id) in accepted]
        config = run.config
        found, _ = envs.build_experts(
            name, tasks, config.env_config(name), config.expert_config(name), seed=config.seed
        )
        demos += found
    return demos


def env_configs(config) -> dict:
    return {spec.name: config.env_config(spec.name) for spec in config.envs}


AFTER_EXPLORING = ("/solved", "/verified")
"""The imagination metrics known only once the imagined tasks were explored."""


def explored(run: Run, version: int, it: int, trials, stats) -> dict[str, float]:
    """An exploration stage's metrics: per training task (its first successful trial, else its best), for
    the first trials alone (the single greedy pass), a paired test of the two, trials per task, memory's
    prompt tokens, and how many imagined tasks a trial solved, and how many are verified (solved or
    accepted by the judge), per env."""
    from agentloop.memory.imagination import imagination_metrics
    from agentloop.metrics import paired_comparison, trajectory_metrics

    imagined = [t for t in trials if t.task.split == "imagined"]
    made = (
        [p for p in run.store.proposals() if p.valid and p.stage == f"imagine/{imagined[0].iteration}"]
        if imagined
        else []
    )
    trials = [t for t in trials if t.task.split != "imagined"]
    last = task_outcomes(trials)
    first = [t for t in trials if t.trial == 0]
    solved = [t for t in last.values() if t.success]
    retries, repeating, repeating_solved = repeated_retries(trials)
    metrics = {
        **trajectory_metrics(list(last.values()), "explore"),
        **trajectory_metrics(first, "explore/first_trial"),
        **paired_comparison(first, list(last.values()), "explore/vs_first_trial"),
        **rollout_metrics(stats, "explore"),
        "explore/trials": float(len(trials)),
        "explore/trials_per_task": len(trials) / max(len(last), 1),
        "explore/solved_trial_mean": sum(t.trial + 1 for t in solved) / max(len(solved), 1),
        "explore/reflections": float(sum(bool(t.reflection) for t in trials)),
        "explore/reflections_as_actions": float(
            sum(bool(t.reflection) and not is_reflection(t.reflection, t.actions) for t in trials)
        ),
        "explore/memory_trials": float(sum(bool(t.memory) for t in trials)),
        "explore/retries": float(retries),
        "explore/retries_repeating": float(repeating),  # their first action verbatim the previous trial's
        "explore/retries_repeating_solved": float(repeating_solved),
        **{k: v for k, v in imagination_metrics(made, imagined, "imagine").items() if k.endswith(AFTER_EXPLORING)},
        "imagine/trials": float(len(imagined)),
    }
    if stats is not None:
        metrics["explore/memory_tokens"] = float(stats.memory_tokens)
        metrics["explore/memory_token_share"] = stats.memory_prompt_tokens / max(stats.prompt_tokens, 1)
        metrics["explore/reflection_tokens"] = float(stats.reflection_tokens)
        metrics["explore/failed_reflections"] = float(stats.failed_reflections)
        metrics["explore/redraws"] = float(stats.redraws)  # retries' first turns drawn again (memory.redraws)
        metrics["explore/redrawn_tokens"] = float(stats.redrawn_tokens)
    return metrics | run.mismatch(trials, version, "explore")


def task_outcomes(trials) -> dict:
    """Each task's trial that stands for it, by key: its first success (with ``memory.stop_on_success=false``
    a chain goes on after it), else its best trial, the earliest of equals (WebShop grades a failure: a
    retry may buy a worse product than the first trial did)."""
    from agentloop.loop import trial_chains

    def best(chain):
        return next((t for t in chain if t.success), max(chain, key=lambda t: t.reward))  # max keeps the first of ties

    return {key: best(chain) for key, chain in trial_chains(trials).items()}


def round_sft_data(run: Run, it: int, trials, experts, accepted=()) -> dict[str, list]:
    """A round's SFT data: its successful trials and the demonstrations of the imagined tasks the
    judge accepted, and a replayed share of earlier rounds' (the expert demonstrations and
    earlier rounds' successes), per env."""
    import random

    from agentloop.learners.data import mix_replay_per_env

    earlier = list(experts)
    for before in range(1, it):
        earlier += [t for t in run.store.trajectories(stage=f"explore/{before}", source="explore") if t.success]
    new = [t for t in trials if t.success] + list(accepted)
    mixed = mix_replay_per_env(new, earlier, run.config.round_sft.replay_fraction, random.Random(run.config.seed + it))
    return {"new": new, "all": mixed}


def train_round_sft(run: Run, version: int, data: dict[str, list]):
    """SFT on a round's data, continuing the adapter of ``version``; its share of new and replayed data logged."""
    files, metrics = run.sft(data["all"], run.adapters[version], run.config.round_sft)
    new, total = len(data["new"]), len(data["all"])
    imagined = [t for t in data["new"] if t.task.split == "imagined"]
    shares = {
        "round_sft/successes": sum(t.source == "explore" for t in data["new"]),
        "round_sft/judged_demos": sum(t.source == "expert" for t in imagined),
        "round_sft/imagined": len(imagined),
        "round_sft/imagined_share": len(imagined) / total,
        "round_sft/replayed": total - new,
        "round_sft/replay_share": (total - new) / total,
    }
    return files, {**metrics, **shares}


def train_dpo(run: Run, it: int, pairs, version: int):
    """DPO on a round's pairs (and replayed ones) from policy ``version``; the share of each source of pairs logged."""
    files, metrics = run.dpo(it, pairs, start=version)
    expert = sum(p.chosen.source == "expert" for p in pairs)
    imagined = sum(p.task.split == "imagined" for p in pairs)
    shares = {
        "dpo/expert_pairs": expert,
        "dpo/trial_pairs": len(pairs) - expert,
        "dpo/expert_pair_share": expert / len(pairs),
        "dpo/imagined_pairs": imagined,
        "dpo/imagined_pair_share": imagined / len(pairs),
    }
    return files, {**metrics, **shares}


def round_pairs(mix: MixConfig, experts, trials, it: int) -> list:
    """ETO's pairs (each expert against its task's first trial) and the trials' own pairs, as configured."""
    from agentloop.learners.data import build_pairs, trial_pairs

    pairs = []
    if mix.expert_pairs:
        pairs += build_pairs(experts, [t for t in trials if t.trial == 0], iteration=it)
    if mix.trial_pairs:
        pairs += trial_pairs(trials, iteration=it)
    return pairs


if __name__ == "__main__":
    main()
