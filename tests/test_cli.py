"""The ``agentloop`` command: help without heavy imports, the data check, export and import through a real
SQLite store, ``run`` passing through to the experiments, and ``eval`` on a tiny random model."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from agentloop.cli import cli
from agentloop.loop import RunDir
from agentloop.replay import FORMATS, ReplayStore, read_pairs, read_trajectories
from agentloop.replay.export import IMPORTED_KIND
from agentloop.types import Message, Pair, Task, Trajectory

REPO = Path(__file__).resolve().parent.parent
SCRIPT = Path(sys.executable).parent / "agentloop"
HEAVY = ("torch", "ray", "transformers", "datasets", "vllm", "trl", "peft")
COMMANDS = ([], ["run"], ["run", "eto"], ["eval"], ["export"], ["import"], ["data"], ["dashboard"])


def _env(data_dir: Path | str) -> dict[str, str]:
    return {**os.environ, "AGENTLOOP_DATA_DIR": str(data_dir), "HF_HUB_OFFLINE": "1", "RAY_AUTH_MODE": "disabled"}


def _agentloop(args: list[str], data_dir: Path | str, cwd: Path = REPO, timeout: int = 120):
    """The installed console script, as a user runs it."""
    return subprocess.run(
        [str(SCRIPT), *args], cwd=cwd, env=_env(data_dir), capture_output=True, text=True, timeout=timeout
    )


def invoke(*args: str):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


# Help


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "agentloop")
def test_help_imports_none_of_the_heavy_libraries(command):
    code = (
        "import runpy, sys\n"
        f"sys.argv = ['agentloop', *{command!r}, '--help']\n"
        "try:\n"
        "    runpy.run_module('agentloop', run_name='__main__', alter_sys=True)\n"  # python -m agentloop ...
        "except SystemExit as e:\n"
        "    assert e.code in (0, None), e.code\n"
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip().endswith("[]"), result.stdout[-2000:]
    assert "usage" in result.stdout.lower()


def test_the_console_script_lists_every_command_and_format():
    result = _agentloop(["--help"], "data")
    commands = ("run", "eval", "export", "import", "data", "dashboard")
    assert result.returncode == 0 and all(c in result.stdout for c in commands)
    assert all(name in invoke("export", "--help").output for name in FORMATS)
    assert f"[default: {IMPORTED_KIND}]" in invoke("import", "--help").output
    assert all(name in invoke("run", "--help").output for name in ("eto", "ste", "continual", "ablation"))


# data


def test_data_reports_every_split_of_the_real_data(data_dir):
    result = _agentloop(["data"], data_dir)
    assert result.returncode == 0, result.stderr
    rows = {tuple(line.split()[:3]) for line in result.stdout.splitlines()}
    assert {("db", "train", "300"), ("db", "dev", "60"), ("webshop", "test", "336")} <= rows
    assert f"data directory: {data_dir} (from AGENTLOOP_DATA_DIR)" in result.stdout
    assert "finds its data" in result.stdout


def test_data_says_what_is_missing_and_fails_without_the_default_runs_split(tmp_path, data_dir):
    empty = invoke("data", "--data-dir", tmp_path / "nothing")
    assert empty.exit_code == 1 and "(from --data-dir)" in empty.output
    assert "github.com/THUDM/AgentBench" in empty.output and "docs/data.md" in empty.output

    # dbbench's training split without its held-out one: the default run cannot start.
    (tmp_path / "data" / "dbbench").mkdir(parents=True)
    (tmp_path / "data" / "dbbench" / "standard.jsonl").symlink_to(data_dir / "dbbench" / "standard.jsonl")
    result = invoke("data", "--data-dir", tmp_path / "data", "--env", "db", "--env", "webshop")
    assert result.exit_code == 1
    lines = result.output.splitlines()
    assert any(line.split()[:3] == ["db", "train", "300"] for line in lines)
    assert any(line.split()[:3] == ["db", "dev", "MISSING"] for line in lines)
    assert "dev.jsonl" in result.output and "princeton-nlp/WebShop" in result.output
    assert "cannot start: it reads db dev" in result.output
    assert not any(line.startswith("os ") for line in lines)  # only the envs asked for

    (tmp_path / "data" / "dbbench" / "dev.jsonl").symlink_to(data_dir / "dbbench" / "dev.jsonl")
    result = invoke("data", "--data-dir", tmp_path / "data")
    assert result.exit_code == 0, result.output  # alfworld, os and webshop missing: not the default run's
    assert "missing or unreadable (9 of 11 splits)" in result.output and "finds its data" in result.output
    assert invoke("data", "--env", "chess").exit_code == 2


# export / import


def _message(role: str, text: str, ids: tuple[int, ...]) -> Message:
    logprobs = tuple(-0.5 for _ in ids) if role == "assistant" else ()
    return Message(role, text, ids, logprobs, 1 if role == "assistant" else None)


def _trajectory(task: Task, answer: str, success: bool, source: str) -> Trajectory:
    messages = (
        _message("user", f"Task: {task.instruction}", (2, 10, 11)),
        _message("assistant", "Action: Operation\n```sql\nSELECT 3;\n```", (20, 21, 1)),
        _message("user", "[(3,)]", (30,)),
        _message("assistant", answer, (40, 41, 1)),
    )
    return Trajectory(
        task=task,
        messages=messages,
        tokenizer="tiny:0123",
        reward=float(success),
        success=success,
        terminated=True,
        truncated=False,
        num_turns=2,
        invalid_actions=0,
        source=source,
        policy_version=1 if source == "explore" else -1,
        iteration=1 if source == "explore" else 0,
    )


@pytest.fixture
def run_store(tmp_path) -> Path:
    """A run directory whose store holds experts, an exploration of the same tasks, and pairs."""
    tasks = [Task("db", f"train-{i}", "train", "counting", f"How many rows in table {i}?") for i in range(3)]
    experts = [_trajectory(t, 'Action: Answer\nFinal Answer: ["3"]', True, "expert") for t in tasks]
    explored = [_trajectory(t, 'Action: Answer\nFinal Answer: ["2"]', i == 0, "explore") for i, t in enumerate(tasks)]
    pairs = [Pair(t, e, x, 1) for t, e, x in zip(tasks, experts, explored, strict=True) if not x.success]
    run = tmp_path / "run"
    with ReplayStore(f"sqlite:///{run / 'replay.db'}") as store:
        store.commit_stage("experts", trajectories=experts, metrics={})
        store.commit_stage("explore/1", trajectories=explored, metrics={})
        store.commit_stage("dpo/1", pairs=pairs, metrics={})
    return run


@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".parquet"])
def test_export_then_import_gives_back_the_same_records(tmp_path, run_store, suffix):
    out = tmp_path / f"explored{suffix}"
    result = invoke("export", "--store", run_store, out, "--stage", "explore/1", "--failure")
    assert result.exit_code == 0, result.output
    fmt = {".json": "eto", ".jsonl": "chat", ".parquet": "dataset"}[suffix]
    assert result.stdout.strip() == f"exported 2 trajectories to {out} ({fmt})"
    with ReplayStore(f"sqlite:///{run_store / 'replay.db'}") as store:
        failed = store.trajectories(stage="explore/1", success=False)
        pairs = store.pairs(iteration=1)
    assert read_trajectories(out, fmt) == failed

    other = tmp_path / "other.db"
    result = invoke("import", out, "--store", other, "--stage", "imported/explore")
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(f"imported 2 trajectories from {out} as stage imported/explore")
    with ReplayStore(f"sqlite:///{other}") as store:
        assert store.trajectories(stage="imported/explore") == failed
        assert "imported/explore" in store.completed_stages()

    paired = tmp_path / f"pairs{suffix}"
    assert invoke("export", "--store", run_store / "replay.db", paired, "--pairs", "--iteration", "1").exit_code == 0
    assert read_pairs(paired, fmt) == pairs and len(pairs) == 2
    result = invoke("import", paired, "--store", f"sqlite:///{other}", "--stage", "imported/pairs", "--pairs")
    assert result.exit_code == 0, result.output
    with ReplayStore(f"sqlite:///{other}") as store:
        assert store.pairs() == pairs


def test_export_and_import_refuse_bad_input_naming_the_option(tmp_path, run_store):
    result = invoke("export", "--store", run_store, tmp_path / "p.jsonl", "--pairs", "--stage", "dpo/1")
    assert result.exit_code == 2 and "--stage" in result.output and "--iteration" in result.output
    result = invoke("export", "--store", tmp_path / "none.db", tmp_path / "t.jsonl")
    assert result.exit_code == 2 and "--store" in result.output and not (tmp_path / "none.db").exists()
    result = invoke("export", "--store", run_store, tmp_path / "t.txt")
    assert result.exit_code == 2 and "--format" in result.output
    result = invoke("export", "--store", run_store, tmp_path / "t.txt", "--format", "csv")
    assert result.exit_code == 2 and "'csv' is not one of eto, chat, dataset" in result.output

    foreign = tmp_path / "foreign.json"
    foreign.write_text(json.dumps([{"id": "7", "conversations": [{"from": "human", "value": "Hi"}]}]))
    result = invoke("import", foreign, "--store", tmp_path / "s.db", "--stage", "imported")
    assert result.exit_code == 1 and "give the env" in result.output  # the library's message, no traceback
    result = invoke("import", foreign, "--store", tmp_path / "s.db", "--stage", "imported", "--env", "chess")
    assert result.exit_code == 2 and "--env" in result.output
    with ReplayStore(f"sqlite:///{tmp_path / 's.db'}") as store:
        assert store.completed_stages() == []  # nothing stored

    out = tmp_path / "experts.json"
    assert invoke("export", "--store", run_store, out, "--source", "expert").exit_code == 0
    result = invoke("import", out, "--store", run_store, "--stage", "experts")
    assert result.exit_code == 1 and "experts" in result.output  # a completed stage is not written twice


# run


def test_run_fails_fast_on_a_bad_override_naming_the_key(tmp_path, data_dir):
    run_dir = tmp_path / "run"
    result = _agentloop(["run", "eto", f"run_dir={run_dir}", "sft.epochs=zero"], data_dir, cwd=tmp_path)
    assert result.returncode == 2 and "sft.epochs: expected int, got 'zero'" in result.stderr
    assert not run_dir.exists() and not (tmp_path / "runs").exists()
    result = _agentloop(["run", "ste", f"run_dir={run_dir}", "memory.nonsense=1"], data_dir, cwd=tmp_path)
    assert result.returncode == 2 and "memory.nonsense" in result.stderr
    result = _agentloop(["run", "chess"], data_dir)
    assert result.returncode == 2 and "choose from" in result.stderr and "eto" in result.stderr


def test_run_hands_the_arguments_to_the_experiment(tmp_path, run_store):
    result = _agentloop(["run", "eto", "--help"], "data", cwd=tmp_path)
    assert result.returncode == 0 and result.stdout.startswith("usage: eto.py [-h] [--config CONFIG] [--resume")
    result = _agentloop(["run", "eto", "--resume", str(tmp_path / "nowhere")], "data", cwd=tmp_path)
    assert result.returncode == 2 and "no config.yaml there" in result.stderr
    # A whole experiment through the command: compare_exploration over the test store's exploration.
    result = _agentloop(["run", "compare_exploration", str(run_store), "--stage", "explore/1"], "data", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0] == "trials (solved/played): 0: 1/3"


# eval


def _adapter(model_dir: Path, out: Path) -> Path:
    """A random LoRA adapter, far from zero, on every linear layer of the tiny model."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)).save_pretrained(out)
    return out


@pytest.fixture
def tiny_run(tmp_path, data_dir, tiny_model_dir) -> Path:
    """A run directory as an experiment leaves it: its config (the tiny model's settings) and an adapter."""
    sys.path.insert(0, str(REPO / "experiments"))
    import eto

    from agentloop.config import load_config

    settings = [
        f"data_dir={data_dir}",
        f"policy.model={tiny_model_dir}",
        "policy.backend=transformers",
        "policy.dtype=float32",
        "db.max_turns=2",
        "rollout.sampling.max_new_tokens=12",
    ]
    run = RunDir.create(tmp_path / "run", load_config(eto.ETOConfig, None, settings))
    _adapter(tiny_model_dir, run.adapter("sft"))
    return run.path


def test_eval_refuses_bad_input_before_any_work(tmp_path, data_dir, tiny_run, tiny_model_dir):
    adapter = str(tiny_run / "adapters" / "sft")
    checks = [
        (["--split", "test"], "--split"),
        (["--env", "chess"], "--env"),
        (["polcy.model=x"], "polcy"),
        (["rollout.max_context_tokens=256"], "rollout.max_context_tokens=256 would cut"),
        (["--against", adapter], "--against"),  # the same policy twice
        (["--against", str(tmp_path)], "--against"),  # not a policy
        (["--out", str(tiny_run)], "--out"),  # not empty
    ]
    for args, named in checks:
        result = invoke("eval", adapter, "--data-dir", data_dir, *args)
        assert result.exit_code == 2 and named in result.output, (args, result.output)
    other = tmp_path / "elsewhere" / "adapters" / "sft"  # an adapter of another base model
    (other / "adapter_config.json").parent.mkdir(parents=True)
    (other / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "/models/another"}))
    result = invoke("eval", adapter, "--against", other, "--data-dir", data_dir)
    assert result.exit_code == 2 and "different base models" in result.output and "--against" in result.output
    result = invoke("eval", "base", f"policy.model={tiny_model_dir}", "--data-dir", tmp_path)
    assert result.exit_code == 1 and "agentloop data" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["elsewhere", "run"]  # no evaluation directory made


@pytest.mark.slow
@pytest.mark.integration
def test_eval_compares_an_adapter_with_the_base_model_and_keeps_the_episodes(tmp_path, data_dir, tiny_run):
    out = tmp_path / "eval"
    adapter = tiny_run / "adapters" / "sft"
    mlflow_db = tmp_path / "mlflow.db"  # the run's trackers: here MLflow's SQLite store
    args = ["--tasks", "3", "--out", str(out), f"tracking.mlflow.tracking_uri=sqlite:///{mlflow_db}"]
    result = _agentloop(["eval", str(adapter), "--against", "base", *args], data_dir, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    lines = result.stdout.splitlines()
    report = lines[lines.index("db/dev, 3 tasks") :]
    assert report[1].startswith("POLICY ") and f"{adapter} (v1)" in report[1] and "95% Wilson interval [" in report[1]
    assert report[2].startswith("AGAINST ") and "base (v0)" in report[2]
    assert report[3].startswith("paired on 3 tasks: POLICY gained") and "exact McNemar p = " in report[3]

    with ReplayStore(f"sqlite:///{out / 'replay.db'}") as store:
        assert store.completed_stages() == ["eval/against", "eval/policy"]
        played = {stage: store.trajectories(stage=stage) for stage in ("eval/policy", "eval/against")}
    assert {t.policy_version for t in played["eval/policy"]} == {1}
    assert {t.policy_version for t in played["eval/against"]} == {0}
    tasks = {stage: sorted(t.task.task_id for t in found) for stage, found in played.items()}  # stored as they end
    assert tasks["eval/policy"] == tasks["eval/against"] == ["dev-0000", "dev-0001", "dev-0002"]
    assert all(t.source == "eval" and t.task.split == "dev" for ts in played.values() for t in ts)
    k = sum(t.success for t in played["eval/policy"])
    assert f"POLICY   {k}/3 = " in report[1]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in records] == ["eval/against", "eval/policy"]
    assert records[1]["eval/vs_against/tasks"] == 3 and "eval/vs_against/p_value" in records[1]
    assert yaml.safe_load((out / "policies.yaml").read_text())["eval/policy"]["version"] == 1
    with sqlite3.connect(mlflow_db) as db:  # the same records, by the same names, in MLflow
        logged = dict(db.execute("SELECT key, value FROM latest_metrics").fetchall())
    assert logged["eval/vs_against/tasks"] == 3 and logged["eval/episodes"] == 3
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["policy"]["dtype"] == "float32" and saved["db"]["max_turns"] == 2  # the run's settings
    assert [start["argv"][1] for start in RunDir(out).starts()] == ["eval"]  # what ran it, and with which code

    exported = tmp_path / "eval.jsonl"
    result = _agentloop(["export", "--store", str(out), str(exported), "--stage", "eval/policy"], data_dir)
    assert result.returncode == 0 and read_trajectories(exported, "chat") == played["eval/policy"]
