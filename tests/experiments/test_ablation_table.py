"""The ablation's table from stores written through the store's own API: held-out rows paired with ETO and
SFT, and each row's exploration paired with ETO's greedy pass."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from agentloop.replay import ReplayStore
from agentloop.types import Message, Task, Trajectory

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "experiments"))
import ablation  # noqa: E402


def episode(
    task_id: str, split: str, success: bool, source: str, trial: int = 0, env: str = "db", reward: float | None = None
) -> Trajectory:
    task = Task(env, task_id, split, "SELECT", f"question {task_id}")
    messages = (Message("user", task.instruction), Message("assistant", "Action: Answer\nFinal Answer: [1]"))
    reward = float(success) if reward is None else reward
    return Trajectory(
        task=task, messages=messages, tokenizer="t", reward=reward, success=success, terminated=True,
        truncated=False, num_turns=1, invalid_actions=0, source=source, policy_version=1, iteration=1,  # type: ignore[arg-type]
        generated_tokens=3, trial=trial,
    )  # fmt: skip


def store(path: Path, stages: dict[str, list[Trajectory]], iterations: int = 1, adapter: bytes = b"trunk 0") -> None:
    """A run directory as a trunk or row leaves it: its stages, its config's rounds, the SFT adapter it started from."""
    with ReplayStore(f"sqlite:///{path / 'replay.db'}") as opened:
        for name, trajectories in stages.items():
            opened.commit_stage(name, trajectories=trajectories, metrics={})
    (path / "config.yaml").write_text(f"iterations: {iterations}\n")
    (path / "adapters" / "sft").mkdir(parents=True)
    (path / "adapters" / "sft" / "adapter_model.safetensors").write_bytes(adapter)


def test_the_table_pairs_held_out_rows_and_exploration_on_the_same_tasks(tmp_path):
    held_out = [f"dev-{i}" for i in range(6)]
    train = [f"train-{i}" for i in range(8)]
    sft = [episode(t, "dev", i < 1, "eval") for i, t in enumerate(held_out)]  # every row is a fork of the trunk
    store(tmp_path / "trunk-seed0", {"eval/sft": sft}, iterations=0)
    store(
        tmp_path / "eto-seed0",
        {
            "eval/sft": sft,
            "explore/1": [episode(t, "train", i < 3, "explore") for i, t in enumerate(train)],  # 3 of 8
            "eval/1": [episode(t, "dev", i < 2, "eval") for i, t in enumerate(held_out)],
        },
    )
    # trials: first trials solve train-0 and train-4; retries solve train-5 and train-6; train-1, -2 lost
    chains = [episode(t, "train", i in (0, 4), "explore") for i, t in enumerate(train)]
    chains += [episode(t, "train", i in (5, 6), "explore", trial=1) for i, t in enumerate(train) if i not in (0, 4)]
    chains.append(episode("imagined-0", "imagined", True, "explore"))  # not a training task: left out
    store(
        tmp_path / "trials-seed0",
        {
            "eval/sft": sft,
            "explore/1": chains,
            "eval/1": [episode(t, "dev", i < 4, "eval") for i, t in enumerate(held_out)],
        },
    )
    store(
        tmp_path / "full-seed0", {"eval/sft": sft, "eval/1": sft, "eval/2": sft}, iterations=2
    )  # ran 2 rounds: not this table's
    # the code that ran a row, as its run directory recorded its starts (a fork keeps its trunk's first)
    starts = [{"commit": "feed"}, {"commit": "c0ffee"}, {"commit": "c0ffee"}]
    (tmp_path / "eto-seed0" / "starts.jsonl").write_text("".join(json.dumps(s) + "\n" for s in starts))
    records = ablation.collect(tmp_path, [0], ["eto", "trials", "full"], 1)
    assert [r["commit"] for r in records if r["row"] == "eto"] == ["feed,c0ffee"]
    assert [r["commit"] for r in records if r["row"] == "trials"] == [""]  # none recorded: unknown, not this code
    trunk = records[0]["trunk"][:8]  # each record's name says which trunk it grew from
    assert sorted(p.name for p in (tmp_path / "records").iterdir()) == [
        f"seed0-{trunk}-eto-1r.json", f"seed0-{trunk}-sft.json", f"seed0-{trunk}-trials-1r.json",
    ]  # fmt: skip
    assert ablation.collect(tmp_path, [0], ["full"], 2)[1]["row"] == "full"  # its own table's
    table = ablation.ablation_table(records, 1)
    assert "| 0 | sft | db | 1/6 |" in table
    assert "| 0 | eto | db | 2/6 | 0.333 |" in table
    assert "| 0 | trials | db | 4/6 | 0.667 | [0.300, 0.903] | 2 | 0 | 0.500 | 0.250 |" in table
    assert "| 0 | eto | 3/8 | 3/8 | [0.137, 0.694] | - | - | - |" in table
    assert "| 0 | trials | 2/8 | 4/8 | [0.215, 0.785] | 3 | 2 | 1 |" in table
    assert "full" not in table  # rows not run (for this many rounds) are left out


def test_kept_records_make_the_table_without_their_runs_and_pair_only_rows_of_the_same_trunk(tmp_path):
    def kept(row, trunk, held_out, iterations=1, seed=0):
        return {
            "row": row, "seed": seed, "iterations": iterations, "trunk": trunk, "commit": "",
            "held_out": {f"db/{i}": ok for i, ok in enumerate(held_out)}, "sft": {f"db/{i}": i < 1 for i in range(4)},
            "explore_first": {}, "explore_any": {},
        }  # fmt: skip

    kept_dir = tmp_path / "kept"
    kept_dir.mkdir()
    for name, found in {
        "seed0-eto": kept("eto", "a", [1, 1, 0, 0]),
        "seed0-trials": kept("trials", "a", [1, 1, 1, 1]),
        "seed0-full": kept("full", "b", [1, 1, 1, 0]),  # a trunk trained again elsewhere
        "seed1-eto": kept("eto", "c", [0, 0, 0, 0], iterations=2, seed=1),  # another budget
    }.items():
        (kept_dir / f"{name}.json").write_text(json.dumps(found))
    records = ablation.read_records([kept_dir], 1)
    assert sorted(r["row"] for r in records) == ["eto", "full", "trials"]
    table = ablation.ablation_table(records, 1)
    # seed 0 has two trunks: each is a replicate of its own, named by its trunk
    assert "| 0 (a) | sft | db | 1/4 |" in table  # from the rows' own copy of the trunk's evaluation
    assert "| 0 (a) | trials | db | 4/4 | 1.000 | [0.510, 1.000] | 2 | 0 | 0.500 | 0.250 |" in table
    assert "| 0 (b) | sft | db | 1/4 |" in table
    assert "| 0 (b) | full | db | 3/4 | 0.750 | [0.301, 0.954] | - | - | other trunk | 0.500 |" in table
    assert "- seed 0, trunk a: sft, eto, trials" in table and "- seed 0, trunk b: sft, full" in table
    assert "| sft | db | 2 | 0.250 |" in table  # the spread counts each trunk
    assert "\n| 1 | eto" not in table  # the record of another budget is left out
    assert "Row against row" not in table  # only when asked


def test_one_row_is_paired_against_another_on_held_out_tasks_and_exploration():
    def kept(row, trunk, held_out, first, chain):
        return {
            "row": row, "seed": 0, "iterations": 1, "trunk": trunk, "commit": "", "sft": {"db/0": True, "db/1": False},
            "held_out": {f"db/{i}": bool(ok) for i, ok in enumerate(held_out)},
            "explore_first": {f"db/t{i}": bool(ok) for i, ok in enumerate(first)},
            "explore_any": {f"db/t{i}": bool(ok) for i, ok in enumerate(chain)},
        }  # fmt: skip

    records = [
        kept("eto", "a", [1, 0], [1, 1, 0, 0], [1, 1, 0, 0]),
        kept("full", "a", [1, 1], [0, 0, 0, 0], [0, 1, 0, 0]),
        kept("redraw", "a", [0, 1], [1, 1, 1, 1], [1, 1, 1, 1]),
        kept("trials", "b", [1, 1], [1, 1, 1, 1], [1, 1, 1, 1]),
    ]
    table = ablation.ablation_table(records, 1, [("redraw", "full"), ("full", "sft"), ("trials", "eto")])
    assert "| 0 (a) | redraw | full | 1 vs 2 | 0 | 1 | 1 | 4 vs 0 | 4 | 0 | 0.12 | 4 vs 1 | 3 | 0 | 0.25 |" in table
    # against sft: the row's own copy of its trunk's held-out outcomes; sft explored nothing
    assert "| 0 (a) | full | sft | 2 vs 1 | 1 | 0 | 1 | - | - | - | - | - | - | - | - |" in table
    assert "| 0 (b) | trials | eto | other trunk |" in table


def test_rows_pair_only_on_the_tasks_both_played_and_a_row_without_its_adapter_with_nothing(tmp_path):
    sft = [episode(f"dev-{i}", "dev", i < 1, "eval") for i in range(4)]
    store(
        tmp_path / "eto-seed0",
        {"eval/sft": sft, "eval/1": [episode(f"dev-{i}", "dev", i < 2, "eval") for i in range(2)]},
    )
    store(
        tmp_path / "trials-seed0",
        {"eval/sft": sft, "eval/1": [episode(f"dev-{i}", "dev", True, "eval") for i in range(4)]},
    )
    store(tmp_path / "full-seed0", {"eval/sft": sft, "eval/1": sft})
    (tmp_path / "full-seed0" / "adapters" / "sft" / "adapter_model.safetensors").unlink()
    records = ablation.collect(tmp_path, [0], ["eto", "trials", "full"], 1)
    assert [r["trunk"] for r in records if r["row"] == "full"] == [""]
    table = ablation.ablation_table(records, 1)
    # eto played 2 of the 4 held-out tasks: trials is tested on those 2 only, and says so
    assert "| 0 (cc2456ba) | trials | db | 4/4 | 1.000 | [0.510, 1.000] | 0 | 0 | 1.000 (on 2) | 0.250 |" in table
    assert "| 0 (no adapter) | full | db | 1/4 | 0.250 | [0.046, 0.699] | - | - | other trunk | 1.000 |" in table


def test_graded_rewards_get_their_own_paired_table_and_binary_ones_none(tmp_path):
    def played(rewards, env="webshop"):
        return [episode(f"g-{i}", "test", r == 1.0, "eval", env=env, reward=r) for i, r in enumerate(rewards)]

    sft = played([0.0, 0.25, 0.5, 1.0, 0.0, 0.0]) + played([0.0, 1.0], env="db")
    store(tmp_path / "trunk-seed0", {"eval/sft": sft}, iterations=0)
    store(tmp_path / "eto-seed0", {"eval/sft": sft, "eval/1": played([0.5, 0.25, 0.5, 1.0, 0.0, 0.0])})
    store(tmp_path / "full-seed0", {"eval/sft": sft, "eval/1": played([0.5, 0.75, 1.0, 1.0, 0.25, 0.5])})
    records = ablation.collect(tmp_path, [0], ["eto", "full"], 1)
    assert records[1]["held_out_reward"] == {f"webshop/g-{i}": r for i, r in enumerate([0.5, 0.25, 0.5, 1.0, 0, 0])}
    table = ablation.ablation_table(records, 1)
    assert "| 0 | sft | webshop | 0.292 | - | - | - | - |" in table  # db's rewards are its successes: no line
    # against eto: +0.5, +0.5, +0.25, +0.5 on four tasks (2 of 16 sign patterns as far out);
    # against sft: +0.5 on four tasks and +0.25 on one (2 of 32)
    assert "| 0 | full | webshop | 0.667 | +0.292 | 0.125 | +0.375 | 0.062 |" in table
    assert "| 0 | eto | webshop | 0.375 | - | - | +0.083 | 1.000 |" in table
    assert "| 0 | full | db |" not in table.split("Mean held-out reward")[1]
    rows_only = ablation.ablation_table([r for r in records if r["row"] != "sft"], 1)  # the trunk's record is gone
    assert "| 0 | sft | webshop | 0.292 | - | - | - | - |" in rows_only  # from the rows' copy of its rewards

    graded = ablation.ablation_table([{**r, "held_out_reward": {}} for r in records], 1)
    assert "Mean held-out reward" not in graded  # records written before rewards were kept: no reward table


def test_every_run_plays_in_its_envs_context_plus_the_memory_budgets(data_dir, monkeypatch) -> None:
    monkeypatch.setenv("AGENTLOOP_DATA_DIR", str(data_dir))  # the config checks that its data_dir exists
    assert ablation.rollout_context([]) == 2048 + 512 + 256  # DB: the trunk every DB record started from
    assert ablation.rollout_context(["envs=[{name: db}, {name: webshop}]"]) == 4096 + 768
    assert ablation.rollout_context(["memory.short_term_tokens=0", "rollout.max_context_tokens=9000"]) == 2048 + 256
