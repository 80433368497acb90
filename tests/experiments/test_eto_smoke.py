"""End to end: ``experiments/eto.py`` on a tiny random model over all four envs, with two rollout
actors on the transformers backend and one on vLLM (two vLLM actors sharing the cores, one killed and
replaced, are tested on the fleet); and a driver killed mid-stage, resumed. A round added by
``--resume`` is tested on ``experiments/ste.py``, whose driver is this one's.

The Operating System env joins where its sandbox can run (root and bubblewrap, as in CI).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from experiment_runs import run_experiment
from localnet import free_port, get
from sandbox import why_no_sandbox

REPO = Path(__file__).resolve().parents[2]
OS_SANDBOX = why_no_sandbox() is None


def _run(args: list[str], data_dir: Path) -> subprocess.CompletedProcess:
    return run_experiment("eto.py", args, data_dir, timeout=900)


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.parametrize("backend", ["transformers", "vllm"])
def test_eto_runs_end_to_end_on_each_backend(tmp_path, data_dir, tiny_model_dir, backend):
    from agentloop.replay import ReplayStore

    run_dir = tmp_path / "run"
    envs = ["{name: db, train_tasks: 6, eval_tasks: 4}", "{name: webshop, train_tasks: 3, eval_tasks: 2}"]
    envs.append("{name: alfworld, train_tasks: 2, eval_tasks: 2}")
    if OS_SANDBOX:
        envs.append("{name: os, train_tasks: 2, eval_tasks: 2}")
    tiny = [
        f"run_dir={run_dir}",
        f"policy.model={tiny_model_dir}",
        f"policy.backend={backend}",
        "policy.vllm.enforce_eager=true",
        f"rollout.actors={2 if backend == 'transformers' else 1}",  # an engine start less
        "policy.dtype=float32",
        "sft.dtype=float32",
        "dpo.dtype=float32",
        "sft.epochs=1",
        "dpo.epochs=1",
        f"envs=[{', '.join(envs)}]",
        "iterations=1",
        "db.max_turns=2",
        "alfworld.max_steps=12",  # room for its experts' plans; the tiny model's episodes run to the limit,
        "os.max_turns=4",  # and vLLM on the CPU steps each turn slowly
        "rollout.sampling.max_new_tokens=12",
    ]
    first = _run(tiny, data_dir)
    assert first.returncode == 0, first.stderr[-4000:]

    stages = [json.loads(line)["stage"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert stages == ["experts", "eval/base", "sft", "eval/sft", "explore/1", "dpo/1", "eval/1"]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["eval/env/db/episodes"] == 4 and records[-1]["eval/env/webshop/episodes"] == 2
    assert records[-1]["eval/env/alfworld/episodes"] == 2 and "eval/vs_sft/p_value" in records[-1]
    # The learner re-scored a sample of each rollout stage: the same fp32 model serving and learning.
    for record in records[1:]:
        family = record["stage"].split("/")[0]
        if family in ("eval", "explore"):
            assert record[f"{family}/mismatch/tokens"] > 0 and record[f"{family}/mismatch/mean_abs_dlogp"] < 1e-2
    names = ("db", "webshop", "alfworld", "os") if OS_SANDBOX else ("db", "webshop", "alfworld")
    assert records[-1].get("eval/env/os/episodes") == (2 if OS_SANDBOX else None)
    experts = {env: records[0][f"experts/env/{env}/successes"] for env in names}
    assert experts["webshop"] == 3 and records[4]["explore/episodes"] == sum(experts.values())
    assert (run_dir / "learning_curve.png").stat().st_size > 0
    assert (run_dir / "adapters" / "sft" / "adapter_config.json").is_file()
    assert (run_dir / "adapters" / "dpo-1" / "adapter_config.json").is_file()
    store = ReplayStore(f"sqlite:///{run_dir / 'replay.db'}")
    assert len(store.trajectories(stage="eval/1")) == (10 if OS_SANDBOX else 8)
    assert len(store.trajectories(stage="explore/1")) == sum(experts.values())
    assert {t.policy_version for t in store.trajectories(stage="eval/1")} == {2}
    turns = [m for t in store.trajectories(stage="eval/1") for m in t.messages if m.role == "assistant"]
    assert {m.policy_version for m in turns} == {2}  # as the backend reported it, turn by turn
    assert all(len(m.logprobs) == len(m.token_ids) for m in turns)
    store.close()


def test_bad_config_fails_before_any_work(tmp_path, data_dir):
    result = _run([f"run_dir={tmp_path / 'r'}", "sft.epochs=zero"], data_dir)
    assert result.returncode != 0 and "sft.epochs" in result.stderr
    assert not (tmp_path / "r").exists()
    result = _run([f"run_dir={tmp_path / 'r'}", f"data_dir={tmp_path / 'nowhere'}"], data_dir)
    assert result.returncode != 0 and "data_dir" in result.stderr
    result = _run([f"run_dir={tmp_path / 'r'}", "envs=[{name: chess}]"], data_dir)
    assert result.returncode != 0 and "envs[0].name" in result.stderr
    assert not (tmp_path / "r").exists()


def test_an_eval_split_that_is_the_training_split_is_refused_naming_the_key(tmp_path, data_dir):
    result = _run([f"run_dir={tmp_path / 'r'}", "envs=[{name: db}, {name: os, eval_split: train}]"], data_dir)
    assert result.returncode != 0 and "envs[1].eval_split: 'train' is also os's training split" in result.stderr
    assert not (tmp_path / "r").exists()
    sys.path.insert(0, str(REPO / "experiments"))
    import eto

    from agentloop.config import load_config

    other = load_config(eto.ETOConfig, None, [f"data_dir={data_dir}", "envs=[{name: os, train_split: dev}]"])
    eto.check_held_out(other)  # dev to train, test held out: fine


def test_resume_refuses_overrides_that_change_completed_stages(tmp_path, data_dir):
    sys.path.insert(0, str(REPO / "experiments"))
    import eto

    from agentloop.config import load_config
    from agentloop.loop import RunDir
    from agentloop.replay import ReplayStore

    run = RunDir.create(tmp_path / "run", load_config(eto.ETOConfig, None, [f"data_dir={data_dir}"]))
    with ReplayStore(run.store_url) as store:
        for stage in ("experts", "eval/base"):
            store.commit_stage(stage, metrics={})
    saved = run.config_file.read_text()
    for override in ("policy.model=somewhere/else", "db.max_turns=9", "envs=[{name: db, train_tasks: 5}]", "seed=1"):
        result = _run(["--resume", str(run.path), override], data_dir)
        key = override.split("=")[0]
        assert result.returncode != 0 and f"{key}: completed stage" in result.stderr, (override, result.stderr[-2000:])
    result = _run(["--resume", str(run.path), f"store_url=sqlite:///{tmp_path / 'other.db'}"], data_dir)
    assert result.returncode != 0 and "store_url: a resumed run keeps its store_url" in result.stderr
    assert run.config_file.read_text() == saved  # nothing refused was written


def test_lengths_fit_the_chosen_envs_and_a_length_that_cuts_most_episodes_fails(data_dir):
    sys.path.insert(0, str(REPO / "experiments"))
    import eto

    from agentloop.config import ConfigError, load_config

    base = [f"data_dir={data_dir}"]
    config = load_config(eto.ETOConfig, None, base)
    config.fit_lengths()  # the default DB run: its registered context, and whole episodes in the learners
    assert (config.rollout.max_context_tokens, config.sft.max_length, config.dpo.max_length) == (2048, 2048, 2048)
    assert config.policy.prefix_cache_tokens == 48 * 2048  # every episode in flight keeps its turns
    config = load_config(eto.ETOConfig, None, [*base, "envs=[{name: db}, {name: webshop}]", "dpo.max_length=3000"])
    config.fit_lengths()
    assert (config.rollout.max_context_tokens, config.sft.max_length, config.dpo.max_length) == (4096, 4096, 3000)
    assert config.policy.prefix_cache_tokens == 48 * 4096
    for setting, tokens in (("policy.prefix_cache_tokens=0", 0), ("policy.prefix_cache_tokens=1000", 1000)):
        config = load_config(eto.ETOConfig, None, [*base, setting])
        config.fit_lengths()
        assert config.policy.prefix_cache_tokens == tokens  # off, or the size given, stays
    with pytest.raises(ConfigError, match=r"prefix_cache_tokens must be >= 0 \(0 = off\), or -1"):
        load_config(eto.ETOConfig, None, [*base, "policy.prefix_cache_tokens=-2"])
    assert (config.dpo.replay_fraction, config.dpo.sft_loss_weight) == (0.1, 1.0)  # the experiment's, not the class's
    config = load_config(eto.ETOConfig, None, [*base, "sft.epochs=1", "rollout.sampling.max_new_tokens=12"])
    assert (config.sft.max_length, config.rollout.max_context_tokens, config.rollout.concurrent_episodes) == (0, 0, 48)
    with pytest.raises(ConfigError, match=r"sft.max_length=1024 would cut the final turn of most webshop episodes"):
        load_config(eto.ETOConfig, None, [*base, "envs=[{name: db}, {name: webshop}]", "sft.max_length=1024"])
    with pytest.raises(ConfigError, match=r"rollout.max_context_tokens=256 .*\(envs\[0\].name=db"):
        load_config(eto.ETOConfig, None, [*base, "rollout.max_context_tokens=256"])


def dashboard_run(args: list[str]) -> dict:
    """What the run's dashboard (``dashboard.port`` of ``args``) serves at ``/api/run``."""
    port = next(a.split("=")[1] for a in args if a.startswith("dashboard.port="))
    return json.loads(get(f"http://127.0.0.1:{port}/api/run")[1])


@pytest.mark.slow
@pytest.mark.integration
def test_a_driver_killed_mid_explore_resumes_with_only_the_missing_episodes(tmp_path, data_dir, tiny_model_dir):
    import signal
    import sqlite3
    import time

    run_dir = tmp_path / "run"
    args = [
        f"run_dir={run_dir}",
        f"policy.model={tiny_model_dir}",
        "policy.dtype=float32",
        "sft.dtype=float32",
        "dpo.dtype=float32",
        "sft.epochs=1",
        "dpo.epochs=1",
        "envs=[{name: db, train_tasks: 24, eval_tasks: 2}]",
        "iterations=1",
        "db.max_turns=3",
        "rollout.sampling.max_new_tokens=16",
        "rollout.concurrent_episodes=2",
        "commit_every=2",
        "dashboard.enabled=true",  # watched live while it explores
        f"dashboard.port={free_port()}",
    ]

    def explored() -> dict[str, int]:
        with sqlite3.connect(f"file:{run_dir / 'replay.db'}?mode=ro", uri=True, timeout=5) as db:
            try:
                rows = db.execute("SELECT episode, id FROM trajectories WHERE stage = 'explore/1'").fetchall()
            except sqlite3.OperationalError:  # the store is still creating its tables
                return {}
        return dict(rows)

    env = {**os.environ, "AGENTLOOP_DATA_DIR": str(data_dir), "HF_HUB_OFFLINE": "1", "RAY_AUTH_MODE": "disabled"}
    driver = subprocess.Popen(
        [sys.executable, "experiments/eto.py", *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # its local Ray cluster dies with it
    )
    deadline = time.monotonic() + 600
    try:
        while time.monotonic() < deadline and driver.poll() is None:
            if (run_dir / "replay.db").exists() and len(explored()) >= 4:
                live = dashboard_run(args)
                os.killpg(driver.pid, signal.SIGKILL)
                break
            time.sleep(0.05)
        assert driver.wait(timeout=60) == -signal.SIGKILL, "the run ended before explore/1 could be interrupted"
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
    before = explored()
    with sqlite3.connect(run_dir / "replay.db") as db:
        done = [name for (name,) in db.execute("SELECT name FROM stages")]
        (demonstrated,) = db.execute("SELECT count(*) FROM trajectories WHERE stage = 'experts'").fetchone()
    # The run's own dashboard showed explore/1 under way, with the episodes stored so far.
    (progress,) = live["progress"]
    assert progress["stage"] == "explore/1" and 4 <= progress["done"] <= len(before)
    assert progress["total"] == demonstrated
    assert {s["name"] for s in live["stages"] if not s["running"]} == {"experts", "eval/base", "sft", "eval/sft"}
    assert "explore/1" not in done and len(before) >= 4 and "explore/1" not in done

    resumed = _run(["--resume", str(run_dir)], data_dir)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "dashboard: http://127.0.0.1:" in resumed.stdout and "dashboard stopped" in resumed.stdout
    after = explored()
    assert len(after) == demonstrated > len(before)  # every task with a demonstration explored once
    assert all(after[key] == row for key, row in before.items())  # kept, not played again
    record = next(
        json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if '"explore/1"' in line
    )
    assert record["explore/resumed_episodes"] == len(before) and record["explore/episodes"] == len(after)
