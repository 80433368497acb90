"""Run metrics: trajectory statistics, a JSON-lines and TensorBoard logger, and the learning curve.

Metric names are paths. For a batch of trajectories logged under a prefix such as ``eval``:

* ``eval/episodes``, ``eval/successes``, ``eval/success_rate``, ``eval/success_ci_low``,
  ``eval/success_ci_high`` (95% Wilson interval), ``eval/reward`` (mean), ``eval/turns``
  (mean assistant turns), ``eval/invalid_action_rate`` (invalid turns over all turns),
  ``eval/truncation_rate``, ``eval/generated_tokens`` (total), ``eval/tamper_attempts``
  (total) and ``eval/tampering_episodes`` (episodes with at least one tamper attempt);
* ``eval/kind/<kind>/episodes``, ``.../successes``, ``.../success_rate`` per task kind;
* ``eval/env/<env>/...`` with the first group's statistics, per environment, always present
  so that a run over one environment and a run over several log the same names, and
  ``eval/env/<env>/kind/<kind>/...`` with the task kind's counts within that environment.

:func:`paired_comparison` gives ``<prefix>/gained``, ``/lost`` and an exact McNemar
``/p_value`` for two evaluations of the same tasks (the loop logs ``eval/vs_sft/...``).

The loop adds its own paths (``sft/loss``, ``dpo/rewards/margins``, ``timing/<stage>``,
``explore/tokens_per_s``) and hands everything to :class:`MetricsLogger`, which appends one
JSON line per call to ``metrics.jsonl`` in the run directory, then gives the same scalars at the
same step to the run's trackers (:mod:`agentloop.trackers`: TensorBoard under ``tensorboard/`` by
default, W&B and MLflow when configured). :func:`plot_learning_curve` reads the JSON lines back.
TensorBoard and matplotlib are imported only when first used.
"""

from __future__ import annotations

import json
import logging
import math
import numbers
import os
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from agentloop.trackers import TENSORBOARD_DIR, TensorBoard, Tracker
from agentloop.types import Trajectory

logger = logging.getLogger(__name__)

JSONL_NAME = "metrics.jsonl"
"""The metrics log inside a run directory."""
RECORD_FIELDS = ("stage", "step", "time")
"""Keys every JSON line carries besides the metrics."""


def wilson_interval(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for a success rate of ``k`` out of ``n``.

    Args:
        k: Successes.
        n: Trials; with none, the interval is the whole of [0, 1].
        z: Standard normal quantile (1.96 for 95%).

    Raises:
        ValueError: Unless ``0 <= k <= n``.
    """
    if not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")
    if n == 0:
        return 0.0, 1.0
    p = k / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z / denominator * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def trajectory_metrics(trajectories: Iterable[Trajectory], prefix: str) -> dict[str, float]:
    """Outcome statistics of a batch of trajectories, named as in the module docstring.

    Args:
        trajectories: The batch, e.g. one evaluation stage.
        prefix: First part of every name, e.g. ``"eval"`` or ``"explore"``.

    Returns:
        The metrics; for an empty batch only ``<prefix>/episodes`` (0.0).
    """
    batch = list(trajectories)
    metrics = _summary(batch, prefix)
    for kind, group in _group_by(batch, lambda t: t.task.kind).items():
        metrics |= _success_counts(group, f"{prefix}/kind/{kind}")
    for env, group in _group_by(batch, lambda t: t.task.env).items():
        metrics |= _summary(group, f"{prefix}/env/{env}")
        for kind, family in _group_by(group, lambda t: t.task.kind).items():
            metrics |= _success_counts(family, f"{prefix}/env/{env}/kind/{kind}")
    return metrics


def paired_comparison(before: Iterable[Trajectory], after: Iterable[Trajectory], prefix: str) -> dict[str, float]:
    """Success on the same tasks before and after, with an exact McNemar test.

    Tasks are matched on ``(env, task_id)``; tasks in only one batch are ignored. Returns
    ``<prefix>/tasks`` (matched), ``<prefix>/gained`` (failed before, succeeded after),
    ``<prefix>/lost`` (the reverse) and ``<prefix>/p_value``: the two-sided exact McNemar
    p-value, the binomial probability of a split of the discordant tasks at least this
    uneven if neither side were better (1.0 with no discordant task).
    """
    earlier = {(t.task.env, t.task.task_id): t.success for t in before}
    tasks, gained, lost, p = paired_outcomes(earlier, {(t.task.env, t.task.task_id): t.success for t in after})
    return {
        f"{prefix}/tasks": float(tasks),
        f"{prefix}/gained": float(gained),
        f"{prefix}/lost": float(lost),
        f"{prefix}/p_value": p,
    }


def paired_outcomes(before: Mapping[Any, bool], after: Mapping[Any, bool]) -> tuple[int, int, int, float]:
    """Success per task before and after, on the tasks both hold: (tasks, gained, lost, exact McNemar p)."""
    keys = [key for key in after if key in before]
    gained = sum(after[key] and not before[key] for key in keys)
    lost = sum(before[key] and not after[key] for key in keys)
    return len(keys), gained, lost, mcnemar_exact(gained, lost)


def paired_rewards(
    before: Mapping[Any, float], after: Mapping[Any, float], resamples: int = 100_000
) -> tuple[int, float, float, float]:
    """Mean reward per task before and after, on the tasks both hold: (tasks, mean before, mean after, p).

    The p-value is a two-sided paired permutation test of the mean difference (scipy's
    ``permutation_test``, flipping the sign of each task's difference): exact while the sign
    patterns of the tasks that differ number at most ``resamples``, otherwise from that many
    seeded random flips, so the same outcomes always give the same p. For rewards that are not
    only 0 or 1 (WebShop's), where success counts alone would throw the partial ones away.
    """
    keys = [key for key in after if key in before]
    if not keys:
        return 0, 0.0, 0.0, 1.0
    import numpy as np
    from scipy.stats import permutation_test

    old = np.array([before[key] for key in keys], dtype=np.float64)
    new = np.array([after[key] for key in keys], dtype=np.float64)
    differences = (new - old)[new != old]  # a task without a difference flips to itself: exact tests need fewer
    p = 1.0  # no task differs, or one: its two signs are equally far from 0
    if len(differences) > 1:
        p = permutation_test(
            (differences,), lambda d, axis: d.mean(axis=axis), permutation_type="samples", vectorized=True,
            n_resamples=resamples, alternative="two-sided", rng=np.random.default_rng(0),
        ).pvalue  # fmt: skip
    return len(keys), float(old.mean()), float(new.mean()), float(min(1.0, p))


def forgetting(
    before: Iterable[Mapping[str, float]], now: Mapping[str, float], units: Iterable[str], prefix: str = "forget"
) -> dict[str, float]:
    """How much held-out success on what was trained earlier has fallen: STE's forgetting, in points.

    Each unit of ``units`` (trained in an earlier phase) is an env (``"db"``, read from
    ``eval/env/db/success_rate``) or a task family of one (``"db:UPDATE"``, read from
    ``eval/env/db/kind/UPDATE/success_rate``). For each, its best held-out success rate over the
    evaluation records ``before`` against its rate ``now``: ``<prefix>/env/<env>[/kind/<kind>]/best``,
    ``.../now`` and ``.../drop`` (best - now, in percentage points, negative when it rose), and
    ``<prefix>/mean_drop`` over the units. Units with no earlier record are left out.
    """
    metrics: dict[str, float] = {}
    drops = []
    for unit in sorted(set(units)):
        env, _, kind = unit.partition(":")
        path = f"env/{env}" + (f"/kind/{_path_name(kind)}" if kind else "")
        key = f"eval/{path}/success_rate"
        seen = [r[key] for r in before if key in r]
        if not seen or key not in now:
            continue
        best = max(seen)
        drop = 100.0 * (best - now[key])
        metrics |= {f"{prefix}/{path}/best": best, f"{prefix}/{path}/now": now[key], f"{prefix}/{path}/drop": drop}
        drops.append(drop)
    if drops:
        metrics[f"{prefix}/mean_drop"] = sum(drops) / len(drops)
    return metrics


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value for ``b`` and ``c`` discordant pairs."""
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(b, c) + 1)) / 2**n
    return min(1.0, 2 * tail)


def _summary(batch: list[Trajectory], prefix: str) -> dict[str, float]:
    if not batch:
        return {f"{prefix}/episodes": 0.0}
    metrics = _success_counts(batch, prefix)
    low, high = wilson_interval(int(metrics[f"{prefix}/successes"]), len(batch))
    turns = sum(t.num_turns for t in batch)
    metrics |= {
        f"{prefix}/success_ci_low": low,
        f"{prefix}/success_ci_high": high,
        f"{prefix}/reward": sum(t.reward for t in batch) / len(batch),
        f"{prefix}/turns": turns / len(batch),
        f"{prefix}/invalid_action_rate": sum(t.invalid_actions for t in batch) / turns if turns else 0.0,
        f"{prefix}/truncation_rate": sum(t.truncated for t in batch) / len(batch),
        f"{prefix}/generated_tokens": float(sum(t.generated_tokens for t in batch)),
        f"{prefix}/tamper_attempts": float(sum(t.tamper_attempts for t in batch)),
        f"{prefix}/tampering_episodes": float(sum(t.tamper_attempts > 0 for t in batch)),
    }
    return metrics


def _success_counts(batch: list[Trajectory], prefix: str) -> dict[str, float]:
    successes = sum(t.success for t in batch)
    return {
        f"{prefix}/episodes": float(len(batch)),
        f"{prefix}/successes": float(successes),
        f"{prefix}/success_rate": successes / len(batch),
    }


def _group_by(batch: list[Trajectory], key: Callable[[Trajectory], str]) -> dict[str, list[Trajectory]]:
    """Groups by a name made safe for metric paths (no ``/``, no blanks), in sorted order."""
    groups: dict[str, list[Trajectory]] = {}
    for trajectory in batch:
        groups.setdefault(_path_name(key(trajectory)), []).append(trajectory)
    return dict(sorted(groups.items()))


def _path_name(name: str) -> str:
    """``name`` as one part of a metric path: no ``/``, no blanks."""
    return re.sub(r"[/\s]+", "_", name.strip()) or "_"


class MetricsLogger:
    """Appends metrics to ``run_dir/metrics.jsonl`` and hands each record to the run's trackers.

    The JSON-lines file is only ever appended to, so a resumed run keeps its history; a
    line half-written by a crash is cut off when the logger opens the file again. It is the
    record of the run: a tracker that fails to log is a warning, never a lost line.
    """

    def __init__(self, run_dir: Path, trackers: Sequence[Tracker] | None = None) -> None:
        """Opens (or creates) the run directory's metrics log.

        Args:
            run_dir: The run directory.
            trackers: Where records go besides the JSON lines (:func:`agentloop.trackers.start_trackers`
                starts a run's from its config); None = TensorBoard under ``run_dir/tensorboard``.
        """
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / JSONL_NAME
        self.run_dir.mkdir(parents=True, exist_ok=True)
        _drop_partial_line(self.path)
        self.trackers = list(trackers) if trackers is not None else [TensorBoard(self.run_dir / TENSORBOARD_DIR)]

    def log(self, metrics: Mapping[str, float], *, stage: str, step: int) -> None:
        """Writes one record: a JSON line ``{"stage", "step", "time", **metrics}``, then the same to each tracker.

        Args:
            metrics: Path-named numbers, e.g. ``{"eval/success_rate": 0.4, "timing/eval": 80.2}``.
                Non-finite values are written as ``null`` in the JSON line.
            stage: The loop stage the metrics describe, e.g. ``"eval/sft"``.
            step: The x-axis value in every tracker (e.g. the loop iteration or stage index).

        Raises:
            ValueError: If a metric is named like a record field.
            TypeError: If a value is not a real number.
        """
        clashes = sorted(set(RECORD_FIELDS) & set(metrics))
        if clashes:
            raise ValueError(f"metric names {clashes} are reserved for the record itself")
        values = {name: _real(name, value) for name, value in metrics.items()}
        record: dict[str, Any] = {"stage": stage, "step": step, "time": time.time()}
        record |= {name: value if math.isfinite(value) else None for name, value in values.items()}
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record, allow_nan=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        for tracker in self.trackers:
            try:
                tracker.log(values, step, record["time"])
            except Exception:  # a tracker's outage (network, disk) must not stop the run; the line is written
                logger.warning(
                    "%s did not record %s (step %d); %s has it",
                    type(tracker).__name__,
                    stage,
                    step,
                    self.path,
                    exc_info=True,
                )

    def close(self, failed: bool = False) -> None:
        """Flushes and closes every tracker (a tracker's error is a warning); ``failed``: the run's work raised
        (MLflow and W&B show the run failed)."""
        for tracker in self.trackers:
            try:
                tracker.close(failed)
            except Exception:
                logger.warning("%s did not close", type(tracker).__name__, exc_info=True)

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close(failed=exc_type is not None)


def _real(name: str, value: Any) -> float:
    if not isinstance(value, numbers.Real):
        raise TypeError(f"metric {name!r} is {value!r}, not a real number")
    if not math.isfinite(value):
        logger.warning("metric %s is %s", name, value)
    return float(value)


def _drop_partial_line(path: Path) -> None:
    """Cuts a last line that a crash left without its newline."""
    if not path.exists() or path.stat().st_size == 0:
        return
    data = path.read_bytes()
    if data.endswith(b"\n"):
        return
    keep = data.rfind(b"\n") + 1
    logger.warning("%s: dropping a partial last line of %d bytes", path, len(data) - keep)
    os.truncate(path, keep)


def read_metrics(jsonl: Path) -> list[dict[str, Any]]:
    """The records of a metrics log, in order; malformed lines are skipped with a warning."""
    records = []
    for number, line in enumerate(Path(jsonl).read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            logger.warning("%s:%d: skipping a malformed line", jsonl, number)
    return records


Point = tuple[str, float, tuple[float, float] | None]
"""A learning-curve point: stage, value, and its 95% interval when known."""


def learning_curve(records: list[dict[str, Any]], metric: str = "eval/success_rate") -> dict[str, list[Point]]:
    """The curves :func:`plot_learning_curve` draws: one per environment, plus ``"all"`` when several.

    Each stage contributes its last record holding the metric, in the order stages first
    appear. For a ``.../success_rate`` metric the points carry Wilson intervals when the
    record also holds the matching ``.../successes`` and ``.../episodes``.
    """
    head, _, leaf = metric.rpartition("/")
    pattern = re.compile(rf"{re.escape(head)}/env/([^/]+)/{re.escape(leaf)}")
    envs = sorted({m.group(1) for record in records for key in record if (m := pattern.fullmatch(key))})
    heads = {"all" if len(envs) != 1 else envs[0]: head}
    if len(envs) > 1:
        heads |= {env: f"{head}/env/{env}" for env in envs}
    curves = {label: _points(records, prefix, leaf) for label, prefix in heads.items()}
    return {label: points for label, points in curves.items() if points}


def _points(records: list[dict[str, Any]], head: str, leaf: str) -> list[Point]:
    by_stage: dict[str, Point] = {}
    for record in records:
        value = record.get(f"{head}/{leaf}")
        if value is None:
            continue
        interval = None
        k, n = record.get(f"{head}/successes"), record.get(f"{head}/episodes")
        if leaf == "success_rate" and k is not None and n is not None:
            interval = wilson_interval(int(k), int(n))
        by_stage[record["stage"]] = (record["stage"], float(value), interval)
    return list(by_stage.values())


def plot_learning_curve(jsonl: Path, png: Path, metric: str = "eval/success_rate") -> None:
    """Draws ``metric`` per evaluation stage from a metrics log into a PNG.

    Args:
        jsonl: The run's ``metrics.jsonl``.
        png: Where to write the figure.
        metric: A metric path; ``eval/env/<env>/...`` variants become one curve per env.

    Raises:
        ValueError: If no record holds the metric.
    """
    from matplotlib.figure import Figure

    curves = learning_curve(read_metrics(jsonl), metric)
    if not curves:
        raise ValueError(f"no record in {jsonl} holds {metric!r}")
    stages = list(dict.fromkeys(stage for points in curves.values() for stage, _, _ in points))
    figure = Figure(figsize=(max(6.0, 1.2 * len(stages)), 4.5), layout="constrained")
    axes = figure.add_subplot()
    for i, (label, points) in enumerate(curves.items()):
        offset = (i - (len(curves) - 1) / 2) * 0.08
        x = [stages.index(stage) + offset for stage, _, _ in points]
        y = [value for _, value, _ in points]
        errors = [(v - ci[0], ci[1] - v) if ci else (0.0, 0.0) for _, v, ci in points]
        pooled = {"color": "black", "linestyle": "--"} if label == "all" and len(curves) > 1 else {}
        axes.errorbar(x, y, yerr=list(zip(*errors, strict=True)), marker="o", capsize=4, label=label, **pooled)
    has_intervals = any(ci for points in curves.values() for _, _, ci in points)
    axes.set_xticks(range(len(stages)), stages)
    axes.set_xlabel("stage")
    axes.set_ylabel(metric + (" (bars: 95% Wilson interval)" if has_intervals else ""))
    axes.set_title(f"{metric} by stage")
    if metric.endswith("rate"):
        axes.set_ylim(-0.02, 1.02)
    axes.grid(alpha=0.3)
    axes.legend(title="env")
    Path(png).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(png, dpi=120)


def flatten_metrics(report: Mapping[str, Any], prefix: str) -> dict[str, float]:
    """Nested reports as path-named metrics: ``{"a": {"b": 1}}`` -> ``{"<prefix>/a/b": 1.0}``.

    A list (e.g. the ids of the tasks an expert failed) counts as its length; other
    non-numeric values (strings) are left out.
    """
    flat: dict[str, float] = {}
    for key, value in report.items():
        name = f"{prefix}/{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_metrics(value, name))
        elif isinstance(value, (list, tuple, set)):
            flat[name] = float(len(value))
        elif isinstance(value, (int, float)):
            flat[name] = float(value)
    return flat
