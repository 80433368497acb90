"""The forgetting table from continual runs' stores written through the store's own API: each earlier family
paired with the end of its own phase and with the run without replay, and records that make the table alone."""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

from agentloop.replay import ReplayStore
from agentloop.types import Message, Task, Trajectory

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "experiments"))
import forgetting_table  # noqa: E402


def episode(task_id: str, kind: str, success: bool) -> Trajectory:
    task = Task("db", task_id, "dev", kind, f"question {task_id}")
    messages = (Message("user", task.instruction), Message("assistant", "Action: Answer\nFinal Answer: [1]"))
    return Trajectory(
        task=task, messages=messages, tokenizer="t", reward=float(success), success=success, terminated=True,
        truncated=False, num_turns=1, invalid_actions=0, source="eval", policy_version=1, iteration=0,  # type: ignore[arg-type]
        generated_tokens=3,
    )  # fmt: skip


def held_out(update: list[bool], insert: list[bool]) -> list[Trajectory]:
    return [episode(f"u{i}", "UPDATE", ok) for i, ok in enumerate(update)] + [
        episode(f"i{i}", "INSERT", ok) for i, ok in enumerate(insert)
    ]


def continual_run(path: Path, replay: float, stages: dict[str, list[Trajectory]], phase1: bytes = b"sft-1") -> Path:
    """A run directory as continual.py leaves it: config, stages, phase 1's adapter."""
    path.mkdir(parents=True)
    config = {
        "seed": 0, "iterations": 0, "phases": [["db:UPDATE"], ["db:INSERT"]],
        "sft": {"epochs": 5, "replay_fraction": replay}, "round_sft": {"replay_fraction": replay},
        "dpo": {"replay_fraction": replay},
    }  # fmt: skip
    (path / "config.yaml").write_text(yaml.safe_dump(config))
    with ReplayStore(f"sqlite:///{path / 'replay.db'}") as opened:
        for name, trajectories in stages.items():
            opened.commit_stage(name, trajectories=trajectories, metrics={})
    (path / "adapters" / "sft-1").mkdir(parents=True)
    (path / "adapters" / "sft-1" / "adapter_model.safetensors").write_bytes(phase1)
    return path


def test_each_earlier_family_is_paired_with_its_phase_end_and_with_the_run_without_replay(tmp_path):
    base = held_out([False] * 4, [False] * 2)
    phase1 = held_out([True, True, True, False], [False, False])  # UPDATE 3/4 after its phase
    without = continual_run(
        tmp_path / "noreplay", 0.0,
        {"eval/base": base, "eval/sft-1": phase1, "eval/sft-2": held_out([False] * 4, [True, False])},
    )  # fmt: skip
    replayed = continual_run(
        tmp_path / "replay", 0.5,
        {"eval/base": base, "eval/sft-1": phase1, "eval/sft-2": held_out([True, False, True, True], [True, False])},
    )  # fmt: skip
    other = continual_run(
        tmp_path / "other-trunk", 0.1, {"eval/sft-1": phase1, "eval/sft-2": phase1}, phase1=b"another"
    )  # a phase 1 trained again: nothing to pair it with
    records = forgetting_table.write_records([without, replayed, other], tmp_path / "records", ran_at="abc")
    assert sorted(p.name for p in (tmp_path / "records").iterdir()) == [
        "noreplay.json", "other-trunk.json", "replay.json",
    ]  # fmt: skip
    assert records[1]["commit"] == "abc" and records[1]["replay"] == {"sft": 0.5, "round_sft": 0.5, "dpo": 0.5}
    table = forgetting_table.forgetting_table(records, baseline="noreplay")
    lines = table.splitlines()
    # without replay: UPDATE 3/4 -> 0/4, 3 lost; 75 points below its best
    assert "| noreplay | 0 / 0 / 0 | db:UPDATE | 3/4 | 0/4 [0%, 49%] | 0 / 3, 0.25 | 75 |  |" in lines
    # with replay: 3/4 -> 3/4 (u3 gained, u1 lost): no forgetting; against no replay 3 gained, none lost
    assert "| replay | 0.5 / 0.5 / 0.5 | db:UPDATE | 3/4 | 3/4 [30%, 95%] | 1 / 1, 1 | 0 | 3 / 0, 0.25 |" in lines
    assert "| replay | 0.5 / 0.5 / 0.5 | db:INSERT |  | 1/2 [9%, 91%] | (trained last) |  | 0 / 0, 1 |" in lines
    assert "| other-trunk | 0.1 / 0.1 / 0.1 | db:UPDATE | 3/4 | 3/4 [30%, 95%] | 0 / 0, 1 | 0 |  |" in lines
    # the records alone make the same table
    kept = forgetting_table.read_records(tmp_path / "records")
    assert forgetting_table.forgetting_table(kept, baseline="noreplay") == table
