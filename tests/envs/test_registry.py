"""One registry of environments: registration, lookup, plugins, and the info contract."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import gymnasium
import pytest
from gymnasium.utils.env_checker import check_env

from agentloop import envs
from agentloop.envs import registry
from agentloop.envs.contract import EnvContractError, reset_task, step_outcome
from agentloop.envs.registry import EnvDefinition
from agentloop.types import Task

REPO = Path(__file__).resolve().parents[2]
PLUGIN = Path(__file__).resolve().parent / "plugin"
"""A test-only environment package (``guessenv``) whose only registration is its entry point."""


@pytest.fixture
def guess(monkeypatch):
    monkeypatch.syspath_prepend(str(PLUGIN))
    # The registration ends with the test: a config composed later in this process (the
    # experiment's ETOConfig) must not gain a 'guess' section its subprocesses do not know.
    monkeypatch.setattr(registry, "_registered", dict(registry._registered))
    monkeypatch.setattr(registry, "_loaded", dict(registry._loaded))
    envs.register("guess", "guessenv:ENV")
    return envs.definition("guess")


def test_built_in_envs_are_registered_with_consistent_definitions():
    assert envs.names()[:4] == ("db", "os", "webshop", "alfworld")
    for name in ("db", "os", "webshop", "alfworld"):
        found = envs.definition(name)
        assert found.name == name and found.train_split in found.splits and found.eval_split in found.splits
        found.config().validate()
    assert envs.config_sections()["db_experts"] is envs.definition("db").expert_config


def test_registration_is_checked():
    with pytest.raises(ValueError, match="unknown environment 'chess'"):
        envs.definition("chess")
    with pytest.raises(ValueError, match="registered already"):
        envs.register("db", "somewhere.else:ENV")
    with pytest.raises(ValueError, match="lower-case"):
        envs.register("Bad Name", "x:ENV")
    with pytest.raises(ValueError, match="default split"):
        EnvDefinition("x", ("a",), "a", "b", list, dict, dict, list)
    envs.register("db", "agentloop.envs.db:ENV")  # the same registration again is harmless


def test_a_plugin_env_works_through_the_registry(guess, tmp_path):
    tasks = envs.load_tasks("guess", tmp_path, "train")
    config = guess.config()
    demos, report = envs.build_experts("guess", tasks, config, None, seed=0)
    assert report == {"solved": 6} and all(d.success for d in demos)
    env = envs.make_env("guess", tasks, config)
    check_env(env, skip_render_check=True)
    with pytest.raises(TypeError, match="GuessEnvConfig"):
        envs.make_env("guess", tasks, envs.definition("db").config())
    with pytest.raises(ValueError, match="unknown guess split 'dev'"):
        envs.load_tasks("guess", tmp_path, "dev")


def test_the_info_contract_is_checked_not_defaulted():
    task = Task("x", "t-1", "train", "k", "do it")
    assert reset_task({"task": task}, "x") == task
    with pytest.raises(EnvContractError, match="x: reset\\(\\) must return info\\['task'\\]"):
        reset_task({}, "x")
    outcome = step_outcome({"invalid": False, "success": True, "tamper_attempts": 2}, "x")
    assert (outcome.invalid, outcome.success, outcome.tamper_attempts) == (False, True, 2)
    assert step_outcome({"invalid": True, "success": False}, "x").tamper_attempts == 0
    with pytest.raises(EnvContractError, match="x: step\\(\\) must return info\\['success'\\]"):
        step_outcome({"invalid": False}, "x")
    with pytest.raises(EnvContractError, match="must be a bool, got 1"):
        step_outcome({"invalid": 1, "success": False}, "x")
    with pytest.raises(EnvContractError, match="tamper_attempts"):
        step_outcome({"invalid": False, "success": False, "tamper_attempts": -1}, "x")


def test_rollout_counts_tamper_attempts_and_refuses_a_broken_info(guess, tmp_path, tiny_model_dir):
    from transformers import AutoTokenizer

    from agentloop.policy.base import Generation, SamplingConfig
    from agentloop.policy.chat import ChatTokenizer
    from agentloop.rollout import RolloutConfig, rollout

    chat = ChatTokenizer(AutoTokenizer.from_pretrained(tiny_model_dir))

    class Scripted:
        version = 1

        def __init__(self, action: str) -> None:
            self.chat, self.action = chat, action

        def generate(self, prompts, sampling: SamplingConfig) -> list[Generation]:
            return [Generation(tuple(chat.assistant_segment(self.action)), self.action, True) for _ in prompts]

    tasks = envs.load_tasks("guess", tmp_path, "test")
    config = RolloutConfig(concurrent_episodes=2, max_context_tokens=512)
    make = lambda name: envs.make_env(name, tasks, guess.config())  # noqa: E731
    trajectories, _ = rollout(Scripted("Tamper"), make, [t.task for t in tasks], config, source="eval", iteration=0)
    assert [t.tamper_attempts for t in trajectories] == [2, 2, 2]  # two turns, each an attempt
    assert all(t.truncated and not t.success for t in trajectories)

    class NoSuccess(gymnasium.Wrapper):
        def step(self, action):
            observation, reward, terminated, truncated, info = self.env.step(action)
            return observation, reward, terminated, truncated, {"invalid": info["invalid"]}

    broken = lambda name: NoSuccess(make(name))  # noqa: E731
    with pytest.raises(EnvContractError, match="guess: step\\(\\) must return info\\['success'\\]"):
        rollout(Scripted("Answer: x"), broken, [tasks[0].task], config, source="eval", iteration=0)


@pytest.mark.slow
@pytest.mark.integration
def test_a_plugin_env_runs_through_the_eto_experiment(tmp_path, tiny_model_dir):
    """The registration (one entry-point line) reaches the driver and the Ray actors alike."""
    run_dir = tmp_path / "run"
    args = [
        f"run_dir={run_dir}",
        f"policy.model={tiny_model_dir}",
        "policy.dtype=float32",
        "sft.dtype=float32",
        "dpo.dtype=float32",
        "sft.epochs=1",
        "dpo.epochs=1",
        "envs=[{name: guess}]",
        "guess.max_turns=1",
        "iterations=0",  # experts, evaluations and SFT: the env reaches the driver and every actor
        "rollout.sampling.max_new_tokens=8",
    ]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(PLUGIN), os.environ.get("PYTHONPATH", "")]),
        "AGENTLOOP_DATA_DIR": str(tmp_path),
        "HF_HUB_OFFLINE": "1",
        "RAY_AUTH_MODE": "disabled",
    }
    result = subprocess.run(
        [sys.executable, "experiments/eto.py", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, result.stderr[-4000:]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in records] == ["experts", "eval/base", "sft", "eval/sft"]
    assert records[0]["experts/env/guess/successes"] == 6 and records[-1]["eval/env/guess/episodes"] == 3
    assert "eval/tamper_attempts" in records[-1]
