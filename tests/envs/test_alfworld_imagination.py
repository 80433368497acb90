"""Imagined ALFWorld goals: ALFWorld's own task sentences over a training scene, written into the
scene's game as PDDL goals, kept only when the engine's planner solves them, and scored by the
engine's own goal conditions."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from agentloop.envs import build_experts, load_tasks, make_env

if os.environ.get("CI") != "true":  # CI installs the engine (scripts/setup.sh): there it must be present
    pytest.importorskip("textworld", reason="the ALFWorld engine (pip alfworld textworld) is not installed")

from agentloop.envs.alfworld import ALFWorldEnvConfig  # noqa: E402
from agentloop.envs.alfworld.imagine import judge_evidence, scene  # noqa: E402
from agentloop.memory.imagination import build, requests  # noqa: E402

CONFIG = ALFWorldEnvConfig(max_steps=30)


@pytest.fixture(scope="module")
def kitchen(data_dir: Path):
    train = load_tasks("alfworld", data_dir, "train")
    return next(t for t in train if t.task.task_id.startswith("pick_heat_then_place_in_recep-Egg-None-DiningTable-15/"))


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("AGENTLOOP_CACHE", str(tmp_path / "cache"))


def test_new_goals_of_each_kind_are_planned_by_the_engine_and_scored_by_its_goal_conditions(kitchen, tmp_path):
    prompt = requests([kitchen], None)[0]
    assert "heat some {obj} and put it in {recep}." in prompt and "microwave" in prompt and "egg" in prompt
    sentences = [
        "put a apple in fridge.",
        "put two mug in cabinet.",
        "clean some fork and put it in drawer.",
        "heat some potato and put it in countertop.",
        "cool some tomato and put it in diningtable.",
    ]
    proposals, tasks = build([kitchen] * 5, [f"Task: {s}" for s in sentences], {"alfworld": CONFIG}, "imagine/1")
    assert [p.reason for p in proposals] == [""] * 5
    assert [t.task.kind for t in tasks] == [
        "pick_and_place_simple",
        "pick_two_obj_and_place",
        "pick_clean_then_place_in_recep",
        "pick_heat_then_place_in_recep",
        "pick_cool_then_place_in_recep",
    ]
    assert all(t.task.split == "imagined" and t.game_file.is_relative_to(tmp_path / "cache") for t in tasks)
    heat = tasks[3]
    assert heat.task.instruction == "heat some potato and put it in countertop."
    assert any(c.startswith("heat potato") for c in heat.walkthrough)
    assert json.loads(heat.game_file.read_text())["walkthrough"] == list(heat.walkthrough)
    assert scene(json.loads(heat.game_file.read_text())["pddl_problem"]) == scene(
        json.loads(kitchen.game_file.read_text())["pddl_problem"]
    )  # the same room: only the goal changed
    assert "Task: heat some potato" in judge_evidence(heat, CONFIG)

    # The env scores them by the engine's goal conditions (which `build` replayed each plan against):
    # the planner's walkthrough wins; the kitchen's own task does not.
    demos, report = build_experts("alfworld", [heat], CONFIG, None, seed=0)
    assert len(demos) == 1 and demos[0].success, report
    env = make_env("alfworld", [heat], CONFIG)
    try:
        observation, _ = env.reset(options={"task_id": heat.task.task_id})
        assert "Your task is to: heat some potato and put it in countertop." in observation
        won = False
        for command in kitchen.walkthrough:  # the egg goes hot to the dining table: not this goal
            _, reward, won, truncated, _ = env.step(f"Action: {command}")
            if won or truncated:
                break
        assert not won
    finally:
        env.close()

    # Written again where it is missing (an environment on another machine of the cluster).
    heat.game_file.unlink()
    env = make_env("alfworld", [heat], CONFIG)
    try:
        env.reset(options={"task_id": heat.task.task_id})
        for command in heat.walkthrough:
            _, reward, won, _, _ = env.step(f"Action: {command}")
        assert won and reward == 1.0
    finally:
        env.close()


@pytest.mark.parametrize(
    ("sentence", "reason"),
    [
        ("put a unicorn in fridge.", "no unicorn that can be picked up"),
        ("put a apple in bathtub.", "no bathtub to put things in"),
        ("heat some fork and put it in drawer.", "not heatable"),
        ("put two bread in cabinet.", "only one bread"),
        ("look at egg under the desklamp.", "no lamp called desklamp"),
        ("put a hot egg in diningtable.", "the room's own task"),
        ("make me a sandwich.", "none of ALFWorld's task sentences"),
    ],
)
def test_goals_the_scene_cannot_hold_are_refused_with_the_reason(kitchen, sentence, reason):
    proposals, tasks = build([kitchen], [f"Task: {sentence}"], {"alfworld": CONFIG}, "imagine/1")
    assert tasks == [] and reason in proposals[0].reason, proposals[0].reason
