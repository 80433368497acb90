"""experiments/retry_sampling.py: stored retry prompts generated again, with and without their memory."""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import pytest
import yaml
from records import episode

from agentloop.replay import ReplayStore
from agentloop.types import Message, Task

REPO = Path(__file__).resolve().parents[2]


def test_retry_prompts_are_generated_with_and_without_their_memory(tmp_path, tiny_model_dir, capsys):
    sys.path.insert(0, str(REPO / "experiments"))
    import retry_sampling

    memory = "Your earlier attempts at this task:\nAttempt 1: not solved."
    run = tmp_path / "run"
    run.mkdir()
    trials = []
    for name in ("a", "b", "c"):
        task = Task("db", name, "train", "SELECT", f"question {name}")
        trials.append(episode(task, success=False, trial=0))
        retry = episode(task, success=False, trial=1, memory=memory)
        trials.append(replace(retry, messages=(Message("user", f"{memory}\n\nquestion {name}"), retry.messages[1])))
    with ReplayStore(f"sqlite:///{run / 'replay.db'}") as store:
        store.add(trials, "explore/1")
    config = {
        "policy": {"model": str(tiny_model_dir), "dtype": "float32"},
        "rollout": {"sampling": {"max_new_tokens": 6}},
        "db": {"max_action_chars": 4000},
    }
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    retry_sampling.main([str(run), "--n", "2", "--setting", "0", "--setting", "1.5,min_p=0.05"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"2 retry prompts of explore/1 in {run}; first turns of at most 6 tokens"
    rows = [line.split(" | ") for line in lines[3:]]
    assert [(r[0], r[1]) for r in rows] == [
        ("| T=0", "with memory"),
        ("| T=0", "without memory"),
        ("| T=1.5, min_p=0.05", "with memory"),
        ("| T=1.5, min_p=0.05", "without memory"),
    ]
    # random weights write no DB action: every turn is counted, none reads as one
    assert all(r[3] == "0/2" for r in rows)


def test_a_setting_names_only_known_cuts():
    sys.path.insert(0, str(REPO / "experiments"))
    import retry_sampling

    assert retry_sampling.setting("0.7,min_p=0.1,top_p=0.9").min_p == 0.1
    with pytest.raises(SystemExit, match="top_k"):
        retry_sampling.setting("0.7,top_k=5")
