"""Metrics: Wilson intervals, trajectory statistics, the JSON-lines/TensorBoard log and the curve."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from agentloop.metrics import (
    MetricsLogger,
    flatten_metrics,
    forgetting,
    learning_curve,
    mcnemar_exact,
    paired_comparison,
    paired_rewards,
    plot_learning_curve,
    read_metrics,
    trajectory_metrics,
    wilson_interval,
)
from agentloop.types import Message, Task, Trajectory


@pytest.mark.parametrize(
    ("k", "n", "z", "expected"),
    [
        # p = 0.5, z^2 = 3.8416: centre (0.5 + 0.19208) / 1.38416 = 0.5,
        # half 1.96 / 1.38416 * sqrt(0.025 + 0.009604) = 1.416021 * 0.186022 = 0.263411.
        (5, 10, 1.96, (0.236589, 0.763411)),
        # p = 0: centre = half = 0.19208 / 1.38416 = 0.138770; the low end clamps to 0.
        (0, 10, 1.96, (0.0, 0.277540)),
        (10, 10, 1.96, (0.722460, 1.0)),
        # z = 1, p = 0.25: centre (0.25 + 0.125) / 1.25 = 0.3,
        # half 1 / 1.25 * sqrt(0.046875 + 0.015625) = 0.8 * 0.25 = 0.2.
        (1, 4, 1.0, (0.1, 0.5)),
        (0, 0, 1.96, (0.0, 1.0)),
    ],
)
def test_wilson_interval_by_hand(k: int, n: int, z: float, expected: tuple[float, float]) -> None:
    assert wilson_interval(k, n, z) == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize(("k", "n"), [(-1, 3), (4, 3)])
def test_wilson_interval_rejects_impossible_counts(k: int, n: int) -> None:
    with pytest.raises(ValueError):
        wilson_interval(k, n)


def episode(
    env: str, kind: str, *, success: bool, reward: float, turns: int, invalid: int, tokens: int, tamper: int = 0
) -> Trajectory:
    task = Task(env=env, task_id=f"{kind}-{turns}", split="dev", kind=kind, instruction="do it")
    return Trajectory(
        task=task,
        messages=(Message("user", "go"), Message("assistant", "done")),
        tokenizer="t",
        reward=reward,
        success=success,
        terminated=success,
        truncated=not success,
        num_turns=turns,
        invalid_actions=invalid,
        source="eval",
        policy_version=1,
        iteration=1,
        generated_tokens=tokens,
        tamper_attempts=tamper,
    )


BATCH = [
    episode("db", "SELECT", success=True, reward=1.0, turns=2, invalid=0, tokens=10),
    episode("db", "SELECT", success=False, reward=0.0, turns=6, invalid=3, tokens=30, tamper=4),
    episode("db", "INSERT", success=True, reward=1.0, turns=4, invalid=1, tokens=20, tamper=1),
    episode("alfworld", "pick_and_place", success=False, reward=0.5, turns=8, invalid=0, tokens=40),
]


@pytest.mark.parametrize(
    ("b", "c", "expected"),
    [
        (0, 0, 1.0),
        (1, 4, 0.375),  # 2 * (C(5,0) + C(5,1)) / 2^5 = 12 / 32
        (3, 1, 0.625),  # 2 * (1 + 4) / 16
        (0, 6, 0.03125),  # 2 / 64
        (5, 5, 1.0),  # the tail passes 1/2: clamped
    ],
)
def test_mcnemar_exact_by_hand(b: int, c: int, expected: float) -> None:
    assert mcnemar_exact(b, c) == pytest.approx(expected)


def test_paired_rewards_flip_each_tasks_difference_exactly_while_few_tasks_differ() -> None:
    before = {"a": 0.0, "b": 0.5, "c": 1.0, "gone": 0.0}
    # differences +0.5 and +0.25 (c unchanged): sign patterns give means 0.375, 0.125, -0.125, -0.375,
    # two of the four as far from 0 as the one seen
    assert paired_rewards(before, {"a": 0.5, "b": 0.75, "c": 1.0, "new": 1.0}) == (3, 0.5, 0.75, pytest.approx(0.5))
    six = {str(i): 0.1 * (i + 1) for i in range(6)}  # every task better, by different amounts: 2 of 64 patterns
    assert paired_rewards(dict.fromkeys(six, 0.0), six)[3] == pytest.approx(2 / 64)
    assert paired_rewards(before, before)[3] == 1.0  # no task differs
    assert paired_rewards(before, {**before, "a": 1.0})[3] == 1.0  # one does: either sign is as far out
    assert paired_rewards(before, {"other": 1.0}) == (0, 0.0, 0.0, 1.0)


def test_paired_rewards_sample_the_same_flips_every_time_when_too_many_tasks_differ() -> None:
    before = {i: 0.0 for i in range(40)}
    after = {i: (0.3 if i % 3 else -0.2) + 0.01 * i for i in range(40)}
    first = paired_rewards(before, after, resamples=2000)
    assert first == paired_rewards(before, after, resamples=2000)  # seeded: a table is reproducible
    assert 0.0 < first[3] < 0.01  # 26 of 40 tasks up by 0.3 or more, the other 14 within 0.2 of where they were


def test_forgetting_is_the_fall_from_each_earlier_envs_best_in_points() -> None:
    before = [
        {"eval/env/db/success_rate": 0.10},
        {"eval/env/db/success_rate": 0.20, "eval/env/os/success_rate": 0.05},
        {"eval/success_rate": 0.3},  # no per-env figure: not counted
    ]
    now = {"eval/env/db/success_rate": 0.15, "eval/env/os/success_rate": 0.10, "eval/env/webshop/success_rate": 0.4}
    found = forgetting(before, now, ["db", "os", "webshop"])
    assert found == pytest.approx(
        {
            "forget/env/db/best": 0.20,
            "forget/env/db/now": 0.15,
            "forget/env/db/drop": 5.0,  # 20% best, 15% now
            "forget/env/os/best": 0.05,
            "forget/env/os/now": 0.10,
            "forget/env/os/drop": -5.0,  # it rose
            "forget/mean_drop": 0.0,
        }
    )  # webshop has no earlier record: left out
    assert forgetting(before, now, []) == {}


def test_forgetting_of_a_task_family_reads_its_kind_within_its_env() -> None:
    before = [{"eval/env/db/kind/UPDATE/success_rate": 0.25, "eval/kind/UPDATE/success_rate": 0.9}]
    now = {"eval/env/db/kind/UPDATE/success_rate": 0.10, "eval/env/db/success_rate": 0.5}
    assert forgetting(before, now, ["db:UPDATE", "db:INSERT"]) == pytest.approx(
        {
            "forget/env/db/kind/UPDATE/best": 0.25,
            "forget/env/db/kind/UPDATE/now": 0.10,
            "forget/env/db/kind/UPDATE/drop": 15.0,
            "forget/mean_drop": 15.0,
        }
    )  # INSERT has no record; the kind over all envs (eval/kind/UPDATE) is not the family's


def test_paired_comparison_matches_tasks() -> None:
    def run(outcomes: list[tuple[bool, int]]) -> list[Trajectory]:
        return [episode("db", "SELECT", success=s, reward=0.0, turns=t, invalid=0, tokens=1) for s, t in outcomes]

    before, after = run([(True, 1), (False, 2)]), run([(False, 1), (True, 2), (True, 3)])
    metrics = paired_comparison(before, after, "eval/vs_sft")  # the task with 3 turns has no "before"
    assert metrics == {
        "eval/vs_sft/tasks": 2.0,
        "eval/vs_sft/gained": 1.0,
        "eval/vs_sft/lost": 1.0,
        "eval/vs_sft/p_value": 1.0,
    }


def test_trajectory_metrics_by_hand() -> None:
    metrics = trajectory_metrics(BATCH, "eval")
    low, high = wilson_interval(2, 4)
    overall = {
        "eval/episodes": 4.0,
        "eval/successes": 2.0,
        "eval/success_rate": 0.5,
        "eval/success_ci_low": low,
        "eval/success_ci_high": high,
        "eval/reward": 2.5 / 4,
        "eval/turns": 20 / 4,
        "eval/invalid_action_rate": 4 / 20,
        "eval/truncation_rate": 2 / 4,
        "eval/generated_tokens": 100.0,
        "eval/tamper_attempts": 4 + 1,
        "eval/tampering_episodes": 2,
    }
    assert {k: v for k, v in metrics.items() if k.count("/") == 1} == pytest.approx(overall)
    assert metrics["eval/kind/SELECT/success_rate"] == 0.5
    assert metrics["eval/kind/INSERT/success_rate"] == 1.0
    assert metrics["eval/kind/pick_and_place/episodes"] == 1.0
    assert metrics["eval/env/db/success_rate"] == pytest.approx(2 / 3)
    assert metrics["eval/env/db/turns"] == 4.0
    assert metrics["eval/env/db/invalid_action_rate"] == pytest.approx(4 / 12)
    assert metrics["eval/env/alfworld/reward"] == 0.5
    assert metrics["eval/env/alfworld/generated_tokens"] == 40.0
    assert metrics["eval/env/db/tamper_attempts"] == 5.0
    assert metrics["eval/env/db/tampering_episodes"] == 2.0
    assert metrics["eval/env/alfworld/tamper_attempts"] == metrics["eval/env/alfworld/tampering_episodes"] == 0.0
    assert metrics["eval/env/db/kind/SELECT/successes"] == 1.0
    assert metrics["eval/env/db/kind/INSERT/success_rate"] == 1.0
    assert metrics["eval/env/alfworld/kind/pick_and_place/episodes"] == 1.0
    assert len(metrics) == 12 + 3 * 3 + 2 * 12 + 3 * 3


def test_trajectory_metrics_edge_cases() -> None:
    assert trajectory_metrics([], "eval") == {"eval/episodes": 0.0}
    odd = episode("db", "a/b c", success=True, reward=1.0, turns=0, invalid=0, tokens=0)
    metrics = trajectory_metrics([odd], "explore")
    assert metrics["explore/kind/a_b_c/success_rate"] == 1.0
    assert metrics["explore/invalid_action_rate"] == 0.0


def test_logger_appends_json_lines_across_restarts(tmp_path: Path) -> None:
    with MetricsLogger(tmp_path) as log:
        log.log({"eval/success_rate": 0.25, "timing/eval": 3.5}, stage="eval/base", step=0)
        log.log({"dpo/loss": math.nan, "dpo/rewards/margins": 0.5}, stage="dpo/1", step=1)
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"stage": "eval/eto-1", "st')  # a crash in the middle of a line
    with MetricsLogger(tmp_path) as log:
        log.log({"eval/success_rate": 0.5}, stage="eval/eto-1", step=2)

    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [(r["stage"], r["step"]) for r in records] == [("eval/base", 0), ("dpo/1", 1), ("eval/eto-1", 2)]
    assert records[0]["eval/success_rate"] == 0.25 and records[0]["timing/eval"] == 3.5
    assert records[1]["dpo/loss"] is None and records[1]["dpo/rewards/margins"] == 0.5
    assert all(isinstance(r["time"], float) for r in records)
    for line in (tmp_path / "metrics.jsonl").read_text().splitlines():
        json.loads(line)


def test_logger_refuses_bad_metrics(tmp_path: Path) -> None:
    with MetricsLogger(tmp_path) as log:
        with pytest.raises(ValueError, match="reserved"):
            log.log({"step": 1.0}, stage="x", step=0)
        with pytest.raises(TypeError, match="not a real number"):
            log.log({"eval/success_rate": "high"}, stage="x", step=0)  # type: ignore[dict-item]


def test_logger_writes_tensorboard_scalars(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with MetricsLogger(tmp_path) as log:
        log.log({"eval/success_rate": 0.25, "timing/explore": 7.0}, stage="eval/base", step=0)
        log.log({"eval/success_rate": 0.75}, stage="eval/eto-1", step=3)
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(s.step, s.value) for s in events.Scalars("eval/success_rate")] == [(0, 0.25), (3, 0.75)]
    assert [s.value for s in events.Scalars("timing/explore")] == [7.0]


def write_eval_log(run_dir: Path) -> Path:
    """Four evaluation stages over two envs, with an exploration record in between."""
    db = [(4, 20), (9, 20), (12, 20), (13, 20)]
    alfworld = [(0, 10), (5, 10), (6, 10), (8, 10)]
    with MetricsLogger(run_dir) as log:
        for step, stage in enumerate(["eval/base", "eval/sft", "eval/eto-1", "eval/eto-2"]):
            metrics = {}
            for env, (k, n) in (("db", db[step]), ("alfworld", alfworld[step])):
                metrics |= {f"eval/env/{env}/successes": k, f"eval/env/{env}/episodes": n}
                metrics[f"eval/env/{env}/success_rate"] = k / n
            k, n = db[step][0] + alfworld[step][0], 30
            metrics |= {"eval/successes": k, "eval/episodes": n, "eval/success_rate": k / n}
            log.log(metrics, stage=stage, step=step)
            log.log({"explore/success_rate": 0.1}, stage=f"explore/{step}", step=step)
    return run_dir / "metrics.jsonl"


def test_learning_curve_points_and_intervals(tmp_path: Path) -> None:
    curves = learning_curve(read_metrics(write_eval_log(tmp_path)))
    assert list(curves) == ["all", "alfworld", "db"]
    assert [stage for stage, _, _ in curves["db"]] == ["eval/base", "eval/sft", "eval/eto-1", "eval/eto-2"]
    assert curves["db"][1] == ("eval/sft", 9 / 20, wilson_interval(9, 20))
    assert curves["all"][0] == ("eval/base", 4 / 30, wilson_interval(4, 30))
    explore = learning_curve(read_metrics(tmp_path / "metrics.jsonl"), "explore/success_rate")
    assert explore == {"all": [(f"explore/{i}", 0.1, None) for i in range(4)]}


def test_plot_learning_curve_writes_png(tmp_path: Path) -> None:
    png = tmp_path / "plots" / "learning_curve.png"
    plot_learning_curve(write_eval_log(tmp_path), png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="holds"):
        plot_learning_curve(tmp_path / "metrics.jsonl", png, metric="sft/loss")


def test_expert_reports_flatten_to_numbers_lists_counting_as_their_length() -> None:
    report = {
        "by_kind": {"ls": {"attempted": 3, "succeeded": 2}},
        "failed": ["train/7"],
        "failures": {"timeout": {"count": 1, "examples": ["train/7"]}},
        "note": "left out",
    }
    assert flatten_metrics(report, "experts/report") == {
        "experts/report/by_kind/ls/attempted": 3.0,
        "experts/report/by_kind/ls/succeeded": 2.0,
        "experts/report/failed": 1.0,
        "experts/report/failures/timeout/count": 1.0,
        "experts/report/failures/timeout/examples": 1.0,
    }
