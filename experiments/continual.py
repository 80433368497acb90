"""Continual learning across environments, after STE's replay against forgetting (Wang et al. 2024).

    expert demonstrations of every env; the base model evaluated on every env
    for each phase (a group of envs, DB then OS, or of task families of an env, DB's UPDATE
    tasks then its INSERT tasks):
        SFT on the phase's demonstrations, continuing the policy, plus a replayed share of the
            SFT data of everything trained before, per env (sft.replay_fraction)
        STE rounds on the phase's training tasks (trials with memory, SFT on successes, DPO),
            replaying earlier rounds' data per env (round_sft.replay_fraction, dpo.replay_fraction)
        after every stage: held-out success on every env, and forgetting: how far each env or
            family of an earlier phase has fallen below its best (forget/env/<env>/drop, and
            forget/env/<env>/kind/<kind>/drop for a family, in points)

Usage:
    python experiments/continual.py 'envs=[{name: db}, {name: os}]' 'phases=[[db], [os]]'
    python experiments/continual.py 'phases=[[db:UPDATE], [db:INSERT]]'   # task families of one env
    python experiments/continual.py ... sft.replay_fraction=0 round_sft.replay_fraction=0 \\
        dpo.replay_fraction=0                                 # the same sequence without replay
    agentloop fork runs/without-replay runs/with-replay --at eval/sft-1
    python experiments/continual.py --resume runs/with-replay sft.replay_fraction=0.1 ...
        # with iterations=0, a copy of the run without replay cut after its phase 1: phase 1
        # replays nothing, so both runs share it exactly and differ only from phase 2 on (phase 1's
        # STE rounds, if any, replay earlier rounds' data: then run both from the start)
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from functools import partial

from eto import FREE_SETTINGS, Run, parse_args
from ste import STAGE_READS, RunMemory, STEConfig, check_endpoints, ste_round

from agentloop.config import ConfigError
from agentloop.learners.sft import SFTLearnerConfig


@dataclass
class ContinualConfig(STEConfig):
    """An STE run over envs, or task families, in sequence; ``iterations`` is the number of STE rounds per phase."""

    phases: list[list[str]] = field(default_factory=lambda: [["db"]])
    """What each phase trains, in order: envs (``db``) or task families of an env (``db:UPDATE``, a
    :attr:`agentloop.types.Task.kind`). Each env of ``envs`` once, whole or as families, each family
    once; an env's families not listed are never trained (and still evaluated)."""
    sft: SFTLearnerConfig = field(default_factory=lambda: SFTLearnerConfig(epochs=2, max_length=0, replay_fraction=0.1))
    """Each phase's SFT; 10% of the SFT data of what was trained before is replayed, per env, as STE replays."""

    def validate(self) -> None:
        super().validate()
        problem = _phases_problem(self.phases, [spec.name for spec in self.envs])
        if problem:
            raise ConfigError(
                f"phases: each env of envs once, whole (db) or as task families (db:UPDATE), in non-empty phases;"
                f" {problem}: {self.phases}"
            )


def _phases_problem(phases: list[list[str]], envs: list[str]) -> str:
    """What is wrong with ``phases`` for ``envs`` ("" when nothing)."""
    listed = [unit.partition(":") for phase in phases for unit in phase]
    whole = {env for env, colon, _ in listed if not colon}
    families = {env for env, colon, _ in listed if colon}
    if not all(phases):
        return "a phase is empty"
    if len(set(listed)) < len(listed):
        return "an env or family is listed twice"
    if any(colon and not kind for _, colon, kind in listed):
        return "a family without its kind"
    if whole & families:
        return "an env is listed both whole and by families"
    if whole | families != set(envs):
        return "not each env of envs, or another"
    return ""


def check_config(config: ContinualConfig) -> None:
    """Before any work: the phases' families exist in the data, and the configured endpoints answer."""
    check_families(config)
    check_endpoints(config)


def main(argv: list[str] | None = None) -> None:
    config, run_dir, saved = parse_args(argv, ContinualConfig, "continual", __doc__, check=check_config)
    # Rounds are numbered across phases, so a resumed run keeps its rounds per phase (iterations).
    free = tuple(key for key in FREE_SETTINGS if key != "iterations")
    run = Run(config, run_dir, saved, stage_reads(), free)
    memory = RunMemory(run)

    experts = run.stages.rollout("experts", 0, run.make_experts)
    run.evaluate("eval/base", version=0, iteration=0)
    version, rounds, trained = 0, 0, []
    for p, units in enumerate(config.phases, start=1):
        earlier = list(trained)  # envs and families of the phases before this one: what may be forgotten
        mine = [t for t in experts if belongs(t.task, units)]
        if not mine:
            raise SystemExit(f"phase {p} ({', '.join(units)}): no expert demonstration to start it from")
        data = phase_sft_data(run, mine, earlier, experts, rounds, p)
        run.adapters[version + 1] = run.stages.train(f"sft/{p}", p, partial(phase_sft, run, version, data))
        version += 1
        trained += units
        run.evaluate(f"eval/sft-{p}", version=version, iteration=rounds, extra=partial(forgetting, run, earlier))
        seen = [t for t in experts if belongs(t.task, trained)]  # the SFT data its rounds may replay
        for _ in range(config.iterations):
            rounds += 1
            keys = [t.task.key for t in mine]  # explored, and imagined near: only the phase's envs and families
            version = ste_round(run, memory, rounds, version, keys, seen, partial(belongs, units=units))
            run.evaluate(f"eval/{rounds}", version=version, iteration=rounds, extra=partial(forgetting, run, earlier))

    run.finish()


def stage_reads() -> dict[str, tuple[str, ...]]:
    """STE's stage reads, with each phase's SFT reading the phases; the first phase's SFT replays nothing
    (no env came before it), so a run forked after it may still set ``sft.replay_fraction``."""
    from dataclasses import fields

    reads = {**STAGE_READS, "sft": ("sft", "policy.model", "phases", "seed", "iterations")}
    settings = (f"sft.{f.name}" for f in fields(SFTLearnerConfig) if f.name != "replay_fraction")
    reads["sft/1"] = (*settings, "policy.model", "phases", "seed", "iterations")
    return reads


def belongs(task, units: list[str]) -> bool:
    """Whether ``task`` (a :class:`agentloop.types.Task`) is in one of ``units``: envs (``db``) or families
    (``db:UPDATE``)."""
    return any(task.env == env and kind in ("", task.kind) for env, _, kind in (u.partition(":") for u in units))


def check_families(config: ContinualConfig) -> None:
    """Fails, naming ``phases``, when a family it lists has no task among its env's training tasks (a kind
    misspelt, or left out of a ``train_tasks`` sample): before the run's directory, trackers or actors exist."""
    from pathlib import Path

    families = [u.partition(":")[::2] for phase in config.phases for u in phase if ":" in u]
    specs = {spec.name: spec for spec in config.envs}
    found = {
        env: sorted({t.task.kind for t in specs[env].training_tasks(Path(config.data_dir), config.seed)})
        for env in {env for env, _ in families}
    }  # each env's tasks read once
    for env, kind in families:
        kinds = found[env]
        if kind not in kinds:
            raise ConfigError(f"phases: {env} has no training task of kind {kind!r}; its kinds: {', '.join(kinds)}")


def phase_sft_data(run: Run, new, earlier: list[str], experts, rounds: int, phase: int) -> dict[str, list]:
    """A phase's SFT data: its demonstrations ``new``, plus the replayed share of the SFT data of everything
    trained before (``earlier``'s demonstrations and their rounds' successes), per env."""
    from agentloop.learners.data import mix_replay_per_env

    before = [t for t in experts if belongs(t.task, earlier)]
    for n in range(1, rounds + 1):
        found = run.store.trajectories(stage=f"explore/{n}", source="explore", success=True)
        before += [t for t in found if belongs(t.task, earlier)]
    rng = random.Random(run.config.seed * 1000 + phase)
    return {"new": new, "all": mix_replay_per_env(new, before, run.config.sft.replay_fraction, rng)}


def phase_sft(run: Run, version: int, data: dict[str, list]):
    """SFT of a phase, from the base model (phase 1) or continuing the current policy; shares logged."""
    files, metrics = run.sft(data["all"], run.adapters[version] if version else None)
    new, total = len(data["new"]), len(data["all"])
    return files, {**metrics, "sft/demonstrations": new, "sft/replayed": total - new}


def forgetting(run: Run, earlier: list[str], metrics: dict[str, float]) -> dict[str, float]:
    """Forgetting of the envs and families trained in earlier phases: their best held-out success so far
    against now."""
    from agentloop.metrics import forgetting as drops
    from agentloop.metrics import read_metrics

    records = [r for r in read_metrics(run.metrics.path) if r["stage"].startswith("eval/")] if earlier else []
    return drops(records, metrics, earlier)


if __name__ == "__main__":
    main()
