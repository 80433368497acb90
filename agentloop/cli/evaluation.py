"""``agentloop eval``: a policy's success on one split of one environment, and a paired test against another.

A policy is a LoRA adapter directory (a run's ``adapters/sft``, ``adapters/dpo-1``, ...), a model checkpoint
directory, or ``base``, the base model. Both sides of a comparison are served by one rollout fleet over one base
model (``policy.model``; a checkpoint directory is that base model), each as a policy version, and play the same
tasks. Settings: an adapter of a run directory is evaluated as its run evaluated, with the sections of the run's
``config.yaml`` that an eval stage reads (``STAGE_READS["eval"]`` of ``experiments/eto.py``, and every env's
section): ``policy``, ``rollout``, ``db``, ... (POLICY's run, else --against's). An adapter outside a run serves
the base model its ``adapter_config.json`` names. ``key=value`` overrides of the experiment's config apply last.

The evaluation is a run directory of its own (``--out DIR``; without it, a temporary one removed at the end):
``config.yaml``, ``policies.yaml`` (the policy and version each stage played), ``metrics.jsonl`` and ``replay.db``
with the stages ``eval/against`` and ``eval/policy``, whose metrics hold the paired test
(``eval/vs_against/gained``, ``/lost``, ``/p_value``); ``agentloop export --store DIR`` writes its trajectories.
The metrics also go to the trackers that ``tracking.*`` overrides configure, as an experiment's do (W&B's offline
mode keeps its files in the run directory: give ``--out``).

The rollout is the experiments' own: the rollout fleet (:class:`agentloop.actors.fleet.Fleet`), each stage's
episodes stored as they finish (:meth:`agentloop.loop.Stages.stream`), as ``Run.evaluate`` of
``experiments/eto.py`` plays them, without a learner.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import click

from agentloop.cli.options import data_dir_option

POLICY_STAGE, AGAINST_STAGE = "eval/policy", "eval/against"
"""The stages of an evaluation's store: POLICY's episodes and --against's."""


@dataclass(frozen=True)
class Policy:
    """One side of an evaluation."""

    given: str
    """As it was named on the command line."""
    adapter: Path | None
    """The LoRA adapter directory; None: the base model itself."""
    model: str | None
    """The base model it needs; None: whichever ``policy.model`` says."""
    settings: dict[str, Any]
    """The eval settings of the run it comes from (sections of its ``config.yaml``); empty outside a run."""


@dataclass(frozen=True)
class Side:
    """A policy as an evaluation plays it."""

    stage: str
    """The stage of its episodes (:data:`POLICY_STAGE`, :data:`AGAINST_STAGE`)."""
    version: int
    """Its policy version on the fleet: 0 for the base model, 1 for POLICY's adapter, 2 for --against's."""
    policy: Policy
    """What it plays."""


def resolve_policy(value: str, option: str) -> Policy:
    """What POLICY or --against names: ``base``, an adapter directory, or a model checkpoint directory.

    Raises:
        click.BadParameter: Naming ``option``, for anything else.
    """
    if value == "base":
        return Policy(value, None, None, {})
    path = Path(value).expanduser().resolve()
    if (path / "adapter_config.json").is_file():
        settings = run_settings(path.parent.parent / "config.yaml") if path.parent.name == "adapters" else {}
        if "policy" in settings and "model" in settings["policy"]:
            return Policy(value, path, str(settings["policy"]["model"]), settings)
        base = json.loads((path / "adapter_config.json").read_text()).get("base_model_name_or_path")
        return Policy(value, path, base or None, settings)
    if (path / "config.json").is_file():
        return Policy(value, None, str(path), {})
    raise click.BadParameter(
        f"{value} is neither a LoRA adapter directory (adapter_config.json), a model checkpoint directory "
        "(config.json), nor 'base'",
        param_hint=option,
    )


def run_settings(config_file: Path) -> dict[str, Any]:
    """The sections of a run's saved config that an eval stage reads; empty when there is no such file."""
    import yaml

    from agentloop import envs
    from agentloop.cli.experiments import import_experiment

    if not config_file.is_file():
        return {}
    saved = yaml.safe_load(config_file.read_text()) or {}
    read = [*import_experiment("eto").STAGE_READS["eval"], *envs.config_sections()]
    return {key: saved[key] for key in read if key in saved and key != "envs"}  # the envs are the command's


def eval_config(sides: list[Policy], base: dict[str, Any], overrides: tuple[str, ...]) -> Any:
    """The experiment's config (``ETOConfig``) of an evaluation: the settings of the sides' run, the base
    model they share, ``base`` (data, envs), then the overrides; validated, lengths fitted.

    Raises:
        click.UsageError: When the sides need different base models, or the config is refused.
    """
    import tempfile

    import yaml

    from agentloop.cli.experiments import import_experiment
    from agentloop.config import ConfigError, load_config

    models = sorted({s.model for s in sides if s.model})
    if len(models) > 1:
        raise click.BadParameter(
            f"POLICY and --against need different base models ({' and '.join(models)}); one evaluation serves "
            "one base model, each side as the base model itself or an adapter on it",
            param_hint="--against",
        )
    data = json.loads(json.dumps(next((s.settings for s in sides if s.settings), {})))  # a deep copy
    if models:
        data.setdefault("policy", {})["model"] = models[0]
    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as settings:
        yaml.safe_dump({**data, **base}, settings)
        settings.flush()
        try:
            config = load_config(import_experiment("eto").ETOConfig, settings.name, list(overrides))
        except ConfigError as e:
            raise click.UsageError(str(e)) from None
    config.fit_lengths()
    return config


class Evaluation:
    """An evaluation's run directory (store, metrics, stages) and a rollout fleet over its tasks, on Ray."""

    def __init__(self, config: Any, run_dir: Any, tasks: list[Any]) -> None:
        from agentloop.cli.experiments import import_experiment
        from agentloop.loop import Stages
        from agentloop.metrics import MetricsLogger
        from agentloop.replay import ReplayStore
        from agentloop.trackers import start_trackers

        self.eto = import_experiment("eto")
        self.config, self.tasks, self.keys = config, tasks, [t.task.key for t in tasks]
        self.store = ReplayStore(run_dir.store_url)
        try:  # the experiment's trackers (TensorBoard; W&B and MLflow when ``tracking.*`` overrides name them)
            self.metrics = MetricsLogger(run_dir.path, start_trackers(config.tracking, run_dir.path, config))
        except BaseException:
            self.store.close()
            raise
        self.stages = Stages(run_dir, self.store, self.metrics)
        self.fleet: Any = None

    def __enter__(self) -> Evaluation:
        """Starts Ray (as ``Run`` does: the cluster of ``ray job submit`` if any, else a local one without
        Ray's dashboard) and the rollout fleet."""
        import ray

        from agentloop.actors.fleet import Fleet

        address = self.config.ray_address or os.environ.get("RAY_ADDRESS") or "local"
        local = {"include_dashboard": False, "num_cpus": self.eto.local_cpus(self.config)} if address == "local" else {}
        try:
            ray.init(address=address, log_to_driver=True, **local)
            self.fleet = Fleet(self.config, self.tasks)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, kind: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        """Stops the fleet and Ray; closes the metrics and the store."""
        import ray

        if self.fleet is not None:
            self.fleet.close()
        ray.shutdown()
        self.metrics.close(failed=kind is not None)  # an evaluation that raised shows as failed in W&B, MLflow
        self.store.close()

    def evaluate(self, stage: str, version: int, adapter: Path | None, baseline: str = "") -> list[Any]:
        """Plays every task with policy ``version`` (the base model plus ``adapter``); stores and returns the
        episodes. With ``baseline``, the stage's metrics include the paired test against that stage."""
        from agentloop.actors.transfer import pack_dir
        from agentloop.metrics import paired_comparison, trajectory_metrics

        files = None if adapter is None else pack_dir(adapter)

        def play(todo: list[str], begun: dict) -> Any:
            self.fleet.ensure(version, files)
            yield from self.fleet.play(todo, "eval", 0, self.config.commit_every, begun=begun)

        def measure(trajectories: list[Any], stats: Any) -> dict[str, float]:
            metrics = {**trajectory_metrics(trajectories, "eval"), **self.eto.rollout_metrics(stats, "eval")}
            if baseline:
                before = self.store.trajectories(stage=baseline)
                metrics |= paired_comparison(before, trajectories, f"eval/vs_{baseline.split('/')[-1]}")
            return metrics

        return self.stages.stream(stage, version, self.keys, play, measure)

    def play(self, sides: list[Side]) -> list[list[Any]]:
        """Every side's episodes, in ``sides`` order; --against's side plays first, so that POLICY's stage
        carries the paired test against it."""
        found = {}
        for side in reversed(sides):
            baseline = sides[-1].stage if side is not sides[-1] else ""
            found[side.stage] = self.evaluate(side.stage, side.version, side.policy.adapter, baseline)
        return [found[side.stage] for side in sides]


@click.command("eval", short_help="Evaluate a policy; a paired test against another.")
@click.argument("policy")
@click.argument("overrides", nargs=-1)
@click.option("--against", metavar="OTHER", help="Another policy (an adapter, or base) on the same tasks: paired test.")
@click.option("--env", "env_name", default="db", show_default=True, help="The environment.")
@click.option("--split", default="", help="Its split [default: the env's held-out split].")
@click.option("--tasks", type=click.IntRange(min=0), default=0, help="Only the split's first N tasks [default: all].")
@click.option(
    "--out", type=click.Path(file_okay=False, path_type=Path), help="Keep the evaluation (store, metrics) here."
)
@data_dir_option
def evaluate(
    policy: str,
    overrides: tuple[str, ...],
    against: str | None,
    env_name: str,
    split: str,
    tasks: int,
    out: Path | None,
    data_dir: Path,
) -> None:
    """Evaluate POLICY on one split of one env: k/n solved with a 95% Wilson interval, and with
    --against an exact McNemar test on the same tasks (gained, lost, p).

    POLICY (and OTHER) is a LoRA adapter directory (RUN/adapters/sft), a model checkpoint
    directory, or `base`. An adapter of a run is played with its run's policy, rollout and env
    settings; OVERRIDES (key.sub=value, as an experiment takes them) apply on top. With --out DIR
    the episodes stay in DIR/replay.db (stages eval/policy and eval/against) for `agentloop export`.

    \b
        agentloop eval runs/eto-20261122-010203/adapters/dpo-1 --against runs/eto-20261122-010203/adapters/sft
        agentloop eval RUN/adapters/sft --against base --env webshop --tasks 100 --out runs/eval-webshop
        agentloop eval base policy.model=/models/my-checkpoint rollout.actors=2
    """
    import shutil
    import tempfile

    import yaml

    from agentloop.config import ConfigError
    from agentloop.loop import RunDir

    split = _check_env(env_name, split)
    if out is not None and out.exists() and any(out.iterdir()):
        raise click.BadParameter(f"{out} is not empty; an evaluation starts in a new directory", param_hint="--out")
    sides = plan(policy, against)
    spec = {"name": env_name, "eval_split": split, "eval_tasks": tasks}
    config = eval_config([s.policy for s in sides], {"data_dir": str(data_dir), "envs": [spec]}, overrides)
    played = _load_tasks(env_name, Path(config.data_dir), split, tasks)

    path = out or Path(tempfile.mkdtemp(prefix="agentloop-eval-"))
    try:
        run_dir = RunDir.create(path, config)
        run_dir.record_start(sys.argv)
        record = {
            s.stage: {"policy": s.policy.given, "adapter": _text(s.policy.adapter), "version": s.version} for s in sides
        }
        (path / "policies.yaml").write_text(yaml.safe_dump(record, sort_keys=False))
        try:
            evaluation = Evaluation(config, run_dir, played)
        except ConfigError as e:  # a tracker that cannot start
            raise click.ClickException(str(e)) from None
        with evaluation:
            found = evaluation.play(sides)
        click.echo(report(sides, found, f"{env_name}/{split}"))
        if out is not None:
            stages = " and ".join(s.stage for s in sides)
            click.echo(f"stored in {out}/replay.db, stages {stages}: agentloop export --store {out} FILE")
    finally:
        if out is None:
            shutil.rmtree(path, ignore_errors=True)


def plan(policy: str, against: str | None) -> list[Side]:
    """POLICY's side and --against's: each policy with its stage and version (0 = the base model).

    Raises:
        click.BadParameter: When a side names no policy, or --against names POLICY's.
    """
    named = [(POLICY_STAGE, 1, resolve_policy(policy, "POLICY"))]
    if against is not None:
        named.append((AGAINST_STAGE, 2, resolve_policy(against, "--against")))
    sides = [Side(stage, 0 if found.adapter is None else version, found) for stage, version, found in named]
    if len(sides) == 2 and sides[0].policy.adapter == sides[1].policy.adapter:  # both None: the one base model
        raise click.BadParameter(f"{against} is the policy POLICY names already", param_hint="--against")
    return sides


def _load_tasks(env: str, data_dir: Path, split: str, n: int) -> list[Any]:
    """The first ``n`` tasks of the split (0 = all), as an eval stage takes them."""
    from agentloop import envs

    try:
        tasks = envs.load_tasks(env, data_dir, split)[: n or None]
    except FileNotFoundError as e:
        raise click.ClickException(f"{e}; `agentloop data` checks the data directory") from None
    if not tasks:
        raise click.ClickException(f"{env} split {split} holds no task in {data_dir}")
    return tasks


def _text(path: Path | None) -> str | None:
    return None if path is None else str(path)


def _check_env(env: str, split: str) -> str:
    """The split to play (``split``, or the env's held-out one), both checked against the registry."""
    from agentloop import envs

    if env not in envs.names():
        raise click.BadParameter(f"unknown env {env!r}; known: {', '.join(envs.names())}", param_hint="--env")
    found = envs.definition(env)
    if split and split not in found.splits:
        raise click.BadParameter(
            f"{env} has no split {split!r}; its splits: {', '.join(found.splits)}", param_hint="--split"
        )
    return split or found.eval_split


def report(sides: list[Side], outcomes: list[list[Any]], where: str) -> str:
    """Each side's k/n with a 95% Wilson interval; with two sides, the exact McNemar test of the first against
    the second on the tasks both played."""
    from agentloop.metrics import paired_comparison, wilson_interval

    lines = [f"{where}, {len(outcomes[0])} tasks"]
    for name, side, played in zip(("POLICY", "AGAINST"), sides, outcomes, strict=False):
        k, n = sum(t.success for t in played), len(played)
        low, high = wilson_interval(k, n)
        shown = f"{k}/{n} = {k / n:.1%}"
        lines.append(
            f"{name:<8} {shown:<14} 95% Wilson interval [{low:.1%}, {high:.1%}]  {side.policy.given} (v{side.version})"
        )
    if len(sides) == 2:
        test = paired_comparison(outcomes[1], outcomes[0], "paired")
        lines.append(
            f"paired on {test['paired/tasks']:.0f} tasks: POLICY gained {test['paired/gained']:.0f} and lost "
            f"{test['paired/lost']:.0f} against AGAINST; exact McNemar p = {test['paired/p_value']:.4g}"
        )
    return "\n".join(lines)
