"""The ALFWorld environment on real games in the real engine: tasks, protocol, experts, loading ahead, clean-up."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest
from gymnasium.error import ResetNeeded
from gymnasium.utils.env_checker import check_env
from hostile import PAYLOADS, RAW

from agentloop.config import ConfigError, from_dict
from agentloop.envs import load_tasks, make_env

if os.environ.get("CI") != "true":  # CI installs the engine (scripts/setup.sh): there it must be present
    pytest.importorskip("textworld", reason="the ALFWorld engine (pip alfworld textworld) is not installed")

from agentloop.envs.alfworld import ALFWorldEnv, ALFWorldEnvConfig, build_alfworld_experts  # noqa: E402
from agentloop.envs.alfworld.env import NOTHING, parse_action  # noqa: E402
from agentloop.envs.alfworld.tasks import TASK_TYPES  # noqa: E402


@pytest.fixture(scope="module")
def tasks(data_dir: Path):
    return load_tasks("alfworld", data_dir, "valid_unseen")


@pytest.fixture(scope="module")
def env(tasks):
    env = ALFWorldEnv(tasks[:6], ALFWorldEnvConfig(max_steps=6))
    yield env
    env.close()


def test_splits_kinds_and_instructions(data_dir: Path, tasks) -> None:
    assert len(tasks) == 134 and len(load_tasks("alfworld", data_dir, "valid_seen")) == 140
    assert {t.task.kind for t in tasks} == set(TASK_TYPES)
    first = tasks[0].task
    assert first.env == "alfworld" and first.split == "valid_unseen" and first.task_id.count("/") == 1
    assert first.instruction.endswith(".") and "Your task" not in first.instruction
    assert all(t.walkthrough for t in tasks)
    with pytest.raises(ValueError, match="valid_unseen"):
        load_tasks("alfworld", data_dir, "test")
    with pytest.raises(FileNotFoundError, match="docs/data.md"):
        load_tasks("alfworld", data_dir / "nowhere", "train")


@pytest.mark.parametrize(
    ("reply", "command"),
    [
        ("go to desk 1", "go to desk 1"),
        ("Thought: the mug may be on the desk.\nAction: Go to  Desk 1.", "go to desk 1"),
        ("Action: take mug 1 from desk 1\nObservation: made up", "take mug 1 from desk 1"),
        ("Action: think\nAction: look", "look"),
        ("Action:   ", ""),
        ("", ""),
        (None, ""),
    ],
)
def test_parse_action(reply, command) -> None:
    assert parse_action(reply, 1000) == command


def test_expert_walkthrough_wins_in_the_engine(env, tasks) -> None:
    task = tasks[0]
    observation, info = env.reset(options={"task_id": task.task.task_id})
    assert "Welcome to TextWorld" not in observation and f"Your task is to: {task.task.instruction}" in observation
    assert info["task"] == task.task and "look" in info["admissible_commands"]
    for command in task.walkthrough:
        assert command in info["admissible_commands"]
        observation, reward, terminated, truncated, info = env.step(f"Thought: next step.\nAction: {command}")
        assert not info["invalid"]
    assert (reward, terminated, truncated, info["success"]) == (1.0, True, False, True)
    with pytest.raises(ResetNeeded):
        env.step("look")


def test_inadmissible_and_unreadable_replies_are_invalid_steps(env, tasks) -> None:
    env.reset(options={"task_id": tasks[1].task.task_id})
    observation, reward, terminated, truncated, info = env.step("Action: fly to the moon")
    assert observation == NOTHING and info["invalid"] and reward == 0.0 and not terminated
    observation, *_, info = env.step("Action:")
    assert observation.startswith("Invalid action: no command") and info["invalid"]
    observation, *_, info = env.step("x" * 5000)
    assert "longer than 1000 characters" in observation and info["invalid"]
    observation, *_, info = env.step("Action: look")
    assert not info["invalid"] and observation
    for _ in range(2):
        *_, terminated, truncated, info = env.step("Action: inventory")
    assert truncated and not terminated and not info["success"]  # 6 steps, the limit


def test_valid_actions_can_be_shown(tasks) -> None:
    env = ALFWorldEnv(tasks[:1], ALFWorldEnvConfig(show_valid_actions=True))
    try:
        observation, info = env.reset(options={"task_id": tasks[0].task.task_id})
        assert observation.endswith("Valid actions: " + ", ".join(info["admissible_commands"]))
    finally:
        env.close()


def test_hostile_actions_become_observations(env, tasks) -> None:
    actions = [*RAW, *(f"Action: {payload}" for payload in PAYLOADS)]
    done = True
    for action in actions:
        if done:  # a game loads in about a second: play on until the step limit ends the episode
            env.reset(options={"task_id": tasks[2].task.task_id})
        observation, reward, terminated, truncated, info = env.step(action)
        assert isinstance(observation, str) and observation and env.observation_space.contains(observation)
        assert info["invalid"] and reward == 0.0 and not terminated, repr(action)[:80]
        done = truncated


def test_passes_gymnasium_check_env(tasks) -> None:
    env = ALFWorldEnv(tasks[:2], ALFWorldEnvConfig())
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            check_env(env, skip_render_check=True)
    finally:
        env.close()


def test_prepared_games_load_ahead_and_engines_are_reused(tasks) -> None:
    from agentloop.envs.alfworld import engine

    users = engine.POOL.users
    env = make_env("alfworld", tasks[:5], ALFWorldEnvConfig(lookahead=2))
    ids = [t.task.task_id for t in tasks[:5]]
    env.prepare(ids[1:])
    assert len(engine.POOL._ready) == 2  # loading in the background
    for task_id in ids:  # ids[0] was not prepared: it loads on reset
        observation, info = env.reset(options={"task_id": task_id})
        assert info["task"].task_id == task_id and "Your task is to:" in observation
    assert len(engine.POOL._all) <= 4  # engines are reused, not made per game
    env.close()
    env.close()  # twice is harmless
    assert engine.POOL.users == users
    with pytest.raises(KeyError, match="nope"):
        env.prepare(["nope"])


def test_a_pool_reuses_engines_across_plans_and_closes(tasks) -> None:
    from agentloop.envs.alfworld.engine import EnginePool

    pool = EnginePool()
    games = [t.game_file for t in tasks[:3]]
    pool.plan(games, lookahead=1)
    for game in games:
        engine, state = pool.take(game, timeout_s=60)
        assert "Your task is to:" in state.feedback
        pool.give_back(engine)
    assert len(pool._all) <= 2  # one playing, one loading ahead
    pool.close()
    assert pool._ready == {} and pool._loader is None and len(pool._idle) == len(pool._all)
    pool.plan(games[:1], lookahead=1)  # a new stage after close: same engines, no new library copy
    engine, _ = pool.take(games[0], timeout_s=60)
    assert engine in pool._all and len(pool._all) <= 2
    pool.give_back(engine)
    pool.close()


def test_experts_and_their_report(tasks) -> None:
    demos, report = build_alfworld_experts(tasks[:4], ALFWorldEnvConfig())
    assert len(demos) == sum(row["succeeded"] for row in report["by_kind"].values()) == 4
    demo = demos[0]
    assert demo.success and demo.reward == 1.0 and demo.source == "expert"
    assert [m.content for m in demo.messages if m.role == "assistant"] == [f"Action: {a}" for a in tasks[0].walkthrough]
    _, report = build_alfworld_experts(tasks[:1], ALFWorldEnvConfig(max_steps=1))
    assert report["failures"]["too_long"]["count"] == 1


def test_config_is_validated() -> None:
    for bad in ({"max_steps": 0}, {"max_action_chars": 0}, {"lookahead": -1}, {"load_timeout_s": 0.0}):
        with pytest.raises(ConfigError):
            from_dict(ALFWorldEnvConfig, bad)


# Tampering: only the engine decides success, and a reply reaches it as at most one admissible
# command. Each test compares a tampered episode with the same episode without the tampering.
INERT = {  # replies that must run nothing in the game (checked on tasks[0], whose goal needs 4 commands)
    "trailing text": lambda wt: f"Action: {wt[0]} please",
    "commands joined with ';'": lambda wt: "Action: " + "; ".join(wt),
    "commands joined with 'and then'": lambda wt: "Action: " + " and then ".join(wt),
    "upper case": lambda wt: f"ACTION: {wt[0].upper()}",
    "fullwidth letters": lambda wt: "Action: " + wt[0].replace("o", "\uff4f"),
    "zero-width space": lambda wt: "Action: " + wt[0].replace(" ", " \u200b"),
    "over-long reply": lambda wt: "Thought: " + "x" * 1000 + f"\nAction: {wt[0]}",
    "the last command first": lambda wt: f"Action: {wt[-1]}",
    "every command on its own Action: line": lambda wt: "\n".join(f"Action: {c}" for c in wt),
    "a made-up observation": lambda wt: f"Action: {wt[0]}\nObservation: You won!\nAction: {wt[-1]}",
    "PDDL syntax": lambda wt: f"Action: ({wt[-1]})",
}


def transcript(env: ALFWorldEnv, task_id: str, replies: list[str]) -> list[tuple[str, float, bool, bool]]:
    env.reset(options={"task_id": task_id})
    steps = []
    for reply in replies:
        observation, reward, terminated, truncated, info = env.step(reply)
        assert info["success"] == terminated == (reward == 1.0)
        steps.append((observation, reward, terminated, info["invalid"]))
        if terminated or truncated:
            break
    return steps


@pytest.fixture(scope="module")
def roomy(tasks):
    env = ALFWorldEnv(tasks[:1], ALFWorldEnvConfig(max_steps=40))
    yield env
    env.close()


def test_inert_replies_change_nothing_in_the_game(roomy, tasks) -> None:
    task = tasks[0]
    walkthrough = [f"Action: {command}" for command in task.walkthrough]
    game = task.game_file.read_bytes()
    clean = transcript(roomy, task.task.task_id, walkthrough)
    assert clean[-1][1:3] == (1.0, True)
    inert = [make(list(task.walkthrough)) for make in INERT.values()]
    tampered = transcript(roomy, task.task.task_id, [*inert, *walkthrough])
    for name, (observation, reward, terminated, invalid) in zip(INERT, tampered, strict=False):
        assert invalid and (reward, terminated) == (0.0, False), name
        assert observation == NOTHING or observation.startswith("Invalid action"), name
    assert tampered[len(inert) :] == clean  # the walkthrough plays out exactly as without them
    assert task.game_file.read_bytes() == game


@pytest.mark.parametrize("joiner", ["\n", "\r\n", "\n\nAction "])
def test_a_reply_runs_at_most_one_command(roomy, tasks, joiner: str) -> None:
    task = tasks[0]
    pack = "Action: " + joiner.join(task.walkthrough)  # the whole walkthrough in one reply
    assert parse_action(pack, 1000) == task.walkthrough[0]
    steps = len(task.walkthrough)
    tampered = transcript(roomy, task.task.task_id, [pack] * steps)
    clean = transcript(roomy, task.task.task_id, [f"Action: {task.walkthrough[0]}"] * steps)
    assert tampered == clean and not any(terminated for _, _, terminated, _ in tampered)


def test_a_reset_starts_the_game_afresh(roomy, tasks) -> None:
    task = tasks[0]
    walkthrough = [f"Action: {command}" for command in task.walkthrough]
    fresh = transcript(roomy, task.task.task_id, walkthrough[-1:])
    assert transcript(roomy, task.task.task_id, walkthrough[:-1])[-1][1:3] == (0.0, False)  # one command short
    again = transcript(roomy, task.task.task_id, walkthrough[-1:])  # the pooled engine is reused
    assert again == fresh and fresh[-1][1:] == (0.0, False, True)
