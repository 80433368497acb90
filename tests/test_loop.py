"""Run bookkeeping: honest resume (settings completed stages read stay fixed) and metrics never lost."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import pytest

from agentloop.config import ConfigError
from agentloop.loop import RunDir, Stages, check_resume
from agentloop.metrics import MetricsLogger, read_metrics
from agentloop.replay import ReplayStore


@dataclass
class Learner:
    epochs: int = 1
    beta: float = 0.1


@dataclass
class Config:
    model: str = "m"
    seed: int = 0
    threads: int = 0
    iterations: int = 2
    envs: list[str] = field(default_factory=lambda: ["db"])
    sft: Learner = field(default_factory=Learner)
    dpo: Learner = field(default_factory=Learner)


READS = {"experts": ("envs", "seed"), "eval": ("envs", "model"), "sft": ("sft", "model"), "dpo": ("dpo", "model")}


def test_a_resume_refuses_settings_that_completed_stages_read():
    saved = Config()
    done = ["experts", "eval/base", "sft"]
    with pytest.raises(ConfigError, match="model: completed stage eval/base ran with 'm'"):
        check_resume(saved, Config(model="other"), done, READS)
    with pytest.raises(ConfigError, match="sft.epochs: completed stage sft"):
        check_resume(saved, Config(sft=Learner(epochs=3)), done, READS)
    with pytest.raises(ConfigError, match="envs: completed stage experts"):
        check_resume(saved, Config(envs=["db", "os"]), done, READS)
    with pytest.raises(ConfigError, match="seed"):
        check_resume(saved, Config(seed=1), done, READS)
    # settings only later stages read, and free ones, are accepted and reported
    changed = check_resume(saved, Config(dpo=Learner(beta=0.5), iterations=3, threads=2), done, READS, free=["threads"])
    assert changed == ["threads", "iterations", "dpo.beta"]
    with pytest.raises(ConfigError, match="dpo.beta: completed stage dpo/1"):
        check_resume(saved, Config(dpo=Learner(beta=0.5)), [*done, "explore/1", "dpo/1"], READS)
    assert check_resume(saved, Config(), done, READS) == []


def test_resume_reads_the_saved_config_and_writes_only_when_told(tmp_path):
    from agentloop.config import load_config

    run = RunDir.create(tmp_path / "run", load_config(Config, None, ["seed=3"]))
    before = run.config_file.read_text()
    _, saved, config = RunDir.resume(run.path, Config, ["iterations=5"])
    assert (saved.seed, saved.iterations, config.seed, config.iterations) == (3, 2, 3, 5)
    assert run.config_file.read_text() == before
    run.save_config(config)
    assert RunDir.resume(run.path, Config)[1].iterations == 5


def test_metrics_committed_but_never_logged_are_logged_when_a_resumed_run_passes_the_stage(tmp_path):
    run = RunDir.create(tmp_path / "run", Config())
    store = ReplayStore(run.store_url)
    metrics = MetricsLogger(run.path)
    Stages(run, store, metrics).rollout("experts", 0, lambda: ([], {"experts/episodes": 0.0}))
    # a crash after the store's commit and before the log: the stage is complete, the log lacks it
    store.commit_stage("eval/base", metrics={"eval/success_rate": 0.25, "timing/eval": 3.0})
    assert [r["stage"] for r in read_metrics(metrics.path)] == ["experts"]

    resumed = Stages(run, store, metrics)
    ran = []
    resumed.rollout("experts", 0, lambda: ran.append("experts"))
    resumed.rollout("eval/base", 7, lambda: ran.append("eval/base"))
    resumed.rollout("eval/base", 7, lambda: ran.append("eval/base"))  # passed twice: logged once
    assert ran == []
    records = read_metrics(metrics.path)
    assert [(r["stage"], r["step"]) for r in records] == [("experts", 0), ("eval/base", 7)]
    assert records[1]["eval/success_rate"] == 0.25 and records[1]["timing/eval"] == 3.0
    assert json.loads(metrics.path.read_text().splitlines()[-1])["stage"] == "eval/base"
    metrics.close()
    store.close()
