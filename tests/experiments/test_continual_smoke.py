"""End to end: ``experiments/continual.py`` (DB, then WebShop) and ``experiments/ablation.py`` on a tiny
random model: every stage runs, forgetting of the first env is logged, the ablation table is written."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from experiment_runs import run_experiment

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "experiments"))
import ablation  # noqa: E402
import forgetting_table  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.integration]


def tiny(model: Path) -> list[str]:
    return [
        f"policy.model={model}",
        "policy.backend=transformers",
        "policy.dtype=float32",
        "sft.dtype=float32",
        "round_sft.dtype=float32",
        "dpo.dtype=float32",
        "sft.epochs=1",
        "dpo.epochs=1",
        "db.max_turns=2",
        "rollout.sampling.max_new_tokens=12",
        "memory.trials=2",
        "mismatch_episodes=0",
    ]


def test_envs_trained_in_sequence_log_the_forgetting_of_the_first(tmp_path, data_dir, tiny_model_dir):
    run_dir = tmp_path / "run"
    envs = "envs=[{name: db, train_tasks: 4, eval_tasks: 3}, {name: webshop, train_tasks: 2, eval_tasks: 2}]"
    args = [f"run_dir={run_dir}", *tiny(tiny_model_dir), envs, "phases=[[db], [webshop]]", "iterations=1"]
    # The tiny tokenizer spends about a token a character: WebShop's demonstrations need a long SFT length.
    done = run_experiment("continual.py", [*args, "sft.max_length=16000"], data_dir)
    assert done.returncode == 0, done.stderr[-4000:]
    records = {r["stage"]: r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}
    assert list(records) == [
        "experts", "eval/base", "sft/1", "eval/sft-1", "explore/1", "dpo/1", "eval/1",
        "sft/2", "eval/sft-2", "explore/2", "dpo/2", "eval/2",
    ]  # fmt: skip
    assert "forget/mean_drop" not in records["eval/1"]  # nothing trained before DB
    for stage in ("eval/sft-2", "eval/2"):  # DB's fall from its best, once WebShop trains
        best = max(records[s]["eval/env/db/success_rate"] for s in ("eval/base", "eval/sft-1", "eval/1"))
        now = records[stage]["eval/env/db/success_rate"]
        assert records[stage]["forget/env/db/drop"] == pytest.approx(100 * (best - now))
    assert records["explore/1"]["explore/env/db/episodes"] == 4
    assert "explore/env/webshop/episodes" not in records["explore/1"]
    assert records["explore/2"]["explore/env/webshop/episodes"] == 2
    assert records["sft/2"]["sft/replayed"] == 0  # 10% of 4 DB demonstrations rounds to none
    # the run's record and forgetting table: DB's drop as the run logged it
    kept = forgetting_table.write_records([run_dir], tmp_path / "records")
    assert list(kept[0]["stages"]) == ["eval/base", "eval/sft-1", "eval/1", "eval/sft-2", "eval/2"]
    row = next(line for line in forgetting_table.forgetting_table(kept).splitlines() if "| db |" in line)
    assert row.split(" | ")[6] == f"{records['eval/2']['forget/env/db/drop']:.0f}"


def test_the_ablation_runs_its_rows_from_one_trunk_and_writes_the_table(tmp_path, data_dir, tiny_model_dir):
    out = tmp_path / "ablation"
    args = ["--out", str(out), "--rows", "eto", "trials", "--iterations", "1", "--"]
    args += [*tiny(tiny_model_dir), "envs=[{name: db, train_tasks: 4, eval_tasks: 3}]"]
    done = run_experiment("ablation.py", args, data_dir)
    assert done.returncode == 0, done.stderr[-4000:] + (out / "trials-seed0.log").read_text()[-3000:]
    for row in ("eto", "trials"):
        lines = (out / f"{row}-seed0" / "metrics.jsonl").read_text().splitlines()
        stages = [json.loads(line)["stage"] for line in lines]
        assert stages[:4] == ["experts", "eval/base", "sft", "eval/sft"] and stages[-1] == "eval/1"
    trunk = (out / "trunk-seed0" / "adapters" / "sft" / "adapter_model.safetensors").read_bytes()
    assert (out / "trials-seed0" / "adapters" / "sft" / "adapter_model.safetensors").read_bytes() == trunk
    table = (out / "table.md").read_text()
    held_out, exploration = table.split("Spread over seeds")[0], table.split("Exploration of the training")[1]
    rows = [line.split(" | ") for line in held_out.splitlines() if line.startswith("| 0 |")]
    assert [(r[1], r[2], r[3]) for r in rows][0] == ("sft", "db", rows[0][3]) and len(rows) == 3
    assert rows[0][-2:] == ["-", "- |"]  # sft: no test against itself or eto
    assert rows[1][1] == "eto" and rows[1][-2] == "-" and rows[1][-1] != "- |"  # eto: tested against sft
    assert rows[2][1] == "trials" and "-" not in (rows[2][-2], rows[2][-1])
    assert "| trials | db | 1 |" in table.split("Spread over seeds")[1]
    explored = [line.split(" | ")[1] for line in exploration.splitlines() if line.startswith("| 0 |")]
    assert explored == ["eto", "trials"]  # each row's round-1 exploration, paired with ETO's greedy pass
    kept = {p.name.replace(ablation.fingerprint(out / "trunk-seed0" / "adapters" / "sft")[:8], "T"): json.loads(
        p.read_text()) for p in (out / "records").iterdir()}  # fmt: skip
    assert sorted(kept) == ["seed0-T-eto-1r.json", "seed0-T-sft.json", "seed0-T-trials-1r.json"]
    assert len({r["trunk"] for r in kept.values()}) == 1 and len(kept["seed0-T-trials-1r.json"]["held_out"]) == 3
    rerun = run_experiment("ablation.py", args, data_dir)  # complete: no trunk or row is started again
    assert rerun.returncode == 0 and "resuming" not in rerun.stdout and (out / "table.md").read_text() == table
    again = run_experiment("ablation.py", ["--out", str(tmp_path / "elsewhere"), "--table", "--records",
                                           str(out / "records"), "--iterations", "1"], data_dir)  # fmt: skip
    assert again.returncode == 0, again.stderr[-2000:]
    assert (tmp_path / "elsewhere" / "table.md").read_text() == table  # the same table from the records alone
