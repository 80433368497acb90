"""End to end: ``experiments/ste.py`` on a tiny random model (trials with both memories and
reflections, then SFT/DPO rounds), interrupted and resumed for one more round."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from experiment_runs import run_experiment

REPO = Path(__file__).resolve().parents[2]


def _run(args: list[str], data_dir: Path) -> subprocess.CompletedProcess:
    return run_experiment("ste.py", args, data_dir, timeout=900)


@pytest.mark.slow
@pytest.mark.integration
def test_ste_runs_end_to_end_with_memory_and_resumes(tmp_path, data_dir, tiny_model_dir):
    from agentloop.replay import ReplayStore

    run_dir = tmp_path / "run"
    tiny = [
        f"run_dir={run_dir}",
        f"policy.model={tiny_model_dir}",
        "policy.backend=transformers",
        "policy.dtype=float32",
        "sft.dtype=float32",
        "round_sft.dtype=float32",
        "dpo.dtype=float32",
        "sft.epochs=1",
        "dpo.epochs=1",
        "envs=[{name: db, train_tasks: 5, eval_tasks: 3}, {name: webshop, train_tasks: 2, eval_tasks: 2}]",
        "iterations=1",
        "db.max_turns=2",
        "webshop.max_steps=3",
        "rollout.sampling.max_new_tokens=12",
        "memory.trials=2",
        "memory.reflection_tokens=12",
        "memory.recall=all",  # the random policy solves nothing: every outcome is recalled
        "memory.first_trial_memory=true",  # STE's design: every trial, the first too, is shown long-term memory
        "imagine.tasks_per_env=2",
        "mismatch_episodes=2",
    ]
    first = _run(tiny, data_dir)
    assert first.returncode == 0, first.stderr[-4000:]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    stages = [r["stage"] for r in records]
    # A random model solves nothing: no successes to imitate, so the round is DPO on ETO's pairs only.
    assert stages == ["experts", "eval/base", "sft", "eval/sft", "imagine/1", "explore/1", "dpo/1", "eval/1"]
    # WebShop takes imagined tasks too, but with 3 steps no expert succeeds there: it is not explored.
    assert records[4]["imagine/env/db/proposed"] == 2 and "imagine/env/webshop/proposed" not in records[4]
    explore = records[5]
    dpo = records[6]  # the round logs where its pairs came from
    assert dpo["dpo/expert_pairs"] + dpo["dpo/trial_pairs"] == dpo["dpo/pairs_built"] and dpo["dpo/expert_pairs"] > 0
    tasks = records[0]["experts/successes"]
    assert explore["explore/episodes"] == tasks and explore["explore/first_trial/episodes"] == tasks
    assert explore["explore/trials"] == 2 * tasks and explore["explore/reflections"] == 2 * tasks
    assert explore["explore/memory_trials"] >= tasks and explore["explore/memory_tokens"] > 0
    assert explore["explore/retries"] == tasks and 0 <= explore["explore/retries_repeating"] <= tasks
    assert explore["explore/retries_repeating_solved"] == 0  # a random model solves nothing
    store = ReplayStore(f"sqlite:///{run_dir / 'replay.db'}")
    trials = store.trajectories(stage="explore/1")
    assert sorted(t.trial for t in trials) == [0] * int(tasks) + [1] * int(tasks)
    assert all(t.memory.count("Attempt 1:") == 1 for t in trials if t.trial == 1)
    assert len(store.experiences()) == 2 * tasks  # every trial distilled into long-term memory
    made = store.proposals()
    assert len(made) == 2 and all(p.stage == "imagine/1" and p.env == "db" for p in made)
    assert sum(p.valid for p in made) == records[4]["imagine/env/db/valid"]
    # The policy judged every valid proposal (a random model rarely answers Yes or No: undecided).
    assert sum(p.judged is True for p in made) == records[4]["imagine/env/db/judged"]
    assert sum(p.valid and p.judged is None for p in made) == records[4]["imagine/env/db/judge_undecided"]
    assert all(p.judged is None and p.reason for p in made if not p.valid)
    assert all(t.memory == "" for t in store.trajectories(stage="eval/1"))  # evaluation has no memory
    store.close()

    second = _run(["--resume", str(run_dir), "iterations=2"], data_dir)
    assert second.returncode == 0, second.stderr[-4000:]
    stages = [json.loads(line)["stage"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert stages[8:] == ["imagine/2", "explore/2", "dpo/2", "eval/2"]
    store = ReplayStore(f"sqlite:///{run_dir / 'replay.db'}")
    later = store.trajectories(stage="explore/2")
    # The resumed driver's new actors load round 1's adapter from disk and play it; round 2's is next.
    assert {t.policy_version for t in later} == {2} and (run_dir / "adapters" / "dpo-2").is_dir()
    assert {t.policy_version for t in store.trajectories(stage="eval/2")} == {3}
    # Round 2 recalls round 1's experiences from the store: its first trials are shown them.
    assert any(t.memory.startswith("Experience from similar tasks:") for t in later if t.trial == 0)
    assert len(store.experiences()) == 4 * tasks
    store.close()


def test_a_teacher_that_does_not_answer_fails_the_run_before_any_work(tmp_path, data_dir):
    from localnet import free_port

    port = free_port()  # nobody listens on it
    teacher = [f"memory.teacher.url=http://127.0.0.1:{port}/v1", "memory.teacher.model=m", "memory.teacher.retries=0"]
    result = _run([f"run_dir={tmp_path / 'r'}", *teacher], data_dir)
    assert result.returncode != 0 and f"memory.teacher: http://127.0.0.1:{port}/v1 (m)" in result.stderr
    assert not (tmp_path / "r").exists()  # checked before the run's directory is made


def test_ste_settings_that_would_run_without_effect_or_cut_episodes_fail_naming_the_key(data_dir):
    import sys

    sys.path.insert(0, str(REPO / "experiments"))
    from ste import STEConfig

    from agentloop.config import ConfigError, load_config

    base = [f"data_dir={data_dir}"]
    with pytest.raises(ConfigError, match=r"memory.trials=1 with memory.first_trial_memory=false"):
        load_config(STEConfig, None, [*base, "memory.trials=1"])
    load_config(STEConfig, None, [*base, "memory.trials=1", "memory.long_term_tokens=0"])  # ETO's pass, reflected
    load_config(STEConfig, None, [*base, "memory.trials=1", "memory.first_trial_memory=true"])
    with pytest.raises(ConfigError, match=r"^mix.trial_pairs: pairs among a task's trials need memory.trials >= 2"):
        load_config(STEConfig, None, [*base, "memory.trials=1", "memory.long_term_tokens=0", "mix.successes=false",
                                      "mix.expert_pairs=false"])  # fmt: skip
    with pytest.raises(ConfigError, match=r"rollout.max_context_tokens=1024 leaves 256 tokens beside memory's 768"):
        load_config(STEConfig, None, [*base, "rollout.max_context_tokens=1024"])
    config = load_config(STEConfig, None, [*base, "rollout.max_context_tokens=1024", "memory.short_term_tokens=256"])
    config.fit_lengths()
    assert config.policy.prefix_cache_tokens == config.rollout.concurrent_episodes * 1024  # memory's room included
    with pytest.raises(ConfigError, match=r"^round_sft.max_length=128 would cut the final turn of most db episodes"):
        load_config(STEConfig, None, [*base, "round_sft.max_length=128"])


def test_a_task_stands_as_its_first_success_else_its_best_trial():
    import sys

    from records import episode

    from agentloop.types import Task

    sys.path.insert(0, str(REPO / "experiments"))
    from ste import task_outcomes

    a, b, c = (Task("webshop", name, "train", "k", f"buy {name}") for name in "abc")
    failed = {"success": False, "reward": 0.0}
    trials = [episode(a, trial=0, **failed), episode(a, trial=1), episode(a, trial=2, **failed),
              episode(b, trial=0, **failed), episode(b, trial=1, **failed),
              episode(c, trial=0, success=False, reward=0.5), episode(c, trial=1, **failed),
              episode(c, trial=2, success=False, reward=0.75)]  # fmt: skip
    found = task_outcomes(trials)  # memory.stop_on_success=false: a's chain went on after its success
    # b: no trial better than another, so its first; c: a graded failure, its best
    assert [(t.trial, t.success) for t in found.values()] == [(1, True), (0, False), (2, False)]
