"""Run bookkeeping: honest resume (settings completed stages read stay fixed) and metrics never lost."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, ClassVar

import pytest
from records import episode

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


def test_a_stage_read_by_its_own_name_overrides_its_family():
    saved, reads = Config(), {**READS, "sft/1": ("sft.epochs", "model")}  # sft/1 never read sft.beta
    assert check_resume(saved, Config(sft=Learner(beta=0.5)), ["sft/1"], reads) == ["sft.beta"]
    with pytest.raises(ConfigError, match="sft.beta: completed stage sft/2"):
        check_resume(saved, Config(sft=Learner(beta=0.5)), ["sft/1", "sft/2"], reads)
    with pytest.raises(ConfigError, match="sft.epochs: completed stage sft/1"):
        check_resume(saved, Config(sft=Learner(epochs=3)), ["sft/1"], reads)


def test_resume_reads_the_saved_config_and_writes_only_when_told(tmp_path):
    from agentloop.config import load_config

    run = RunDir.create(tmp_path / "run", load_config(Config, None, ["seed=3"]))
    before = run.config_file.read_text()
    _, saved, config = RunDir.resume(run.path, Config, ["iterations=5"])
    assert (saved.seed, saved.iterations, config.seed, config.iterations) == (3, 2, 3, 5)
    assert run.config_file.read_text() == before
    run.save_config(config)
    assert RunDir.resume(run.path, Config)[1].iterations == 5


@dataclass
class Grown(Config):
    """Config after a setting was added whose default is not what earlier runs did."""

    LEGACY: ClassVar[dict[str, Any]] = {"dpo.beta": 0.5, "sampled": False}
    sampled: bool = True


def test_a_run_saved_before_a_setting_existed_resumes_with_what_it_ran_with(tmp_path):
    import yaml

    from agentloop.config import load_config

    run = RunDir.create(tmp_path / "run", load_config(Config, None, ["dpo.beta=0.5"]))
    old = yaml.safe_load(run.config_file.read_text())
    del old["dpo"]["beta"]  # saved before dpo.beta existed
    run.config_file.write_text(yaml.safe_dump(old))
    _, saved, config = RunDir.resume(run.path, Grown)
    assert (saved.dpo.beta, saved.sampled, config.dpo.beta, config.sampled) == (0.5, False, 0.5, False)
    assert check_resume(saved, config, ["dpo/1"], READS) == []  # nothing changed
    _, saved, config = RunDir.resume(run.path, Grown, ["sampled=true", "dpo.beta=0.2"])
    assert config.sampled and config.dpo.beta == 0.2  # an override still wins, and is checked
    with pytest.raises(ConfigError, match="dpo.beta: completed stage dpo/1 ran with 0.5"):
        check_resume(saved, config, ["dpo/1"], READS)
    run.save_config(config)
    assert RunDir.resume(run.path, Grown)[1].dpo.beta == 0.2  # saved now: the legacy value no longer applies


def test_a_run_without_a_legacy_setting_s_section_starts_with_today_s_defaults(tmp_path):
    """A run whose config never had the section (an STE row forked from an ETO trunk has no
    ``memory``) never ran what it sets: the legacy values are for runs that did."""
    import yaml

    from agentloop.config import load_config

    run = RunDir.create(tmp_path / "run", load_config(Config, None, ["dpo.beta=0.2"]))
    old = yaml.safe_load(run.config_file.read_text())
    del old["dpo"]
    run.config_file.write_text(yaml.safe_dump(old))
    assert run.legacy_settings(Grown) == ["sampled=false"]  # the top level is always saved
    _, saved, config = RunDir.resume(run.path, Grown)
    assert saved.dpo.beta == config.dpo.beta == Config().dpo.beta and not config.sampled


def test_ste_s_legacy_settings_are_its_own_settings(data_dir):
    import sys
    from pathlib import Path

    from agentloop.config import load_config

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
    from ste import STEConfig

    overrides = [f"{key}={json.dumps(value)}" for key, value in STEConfig.LEGACY.items()]
    # every key names a setting, every value is valid
    config = load_config(STEConfig, None, [f"data_dir={data_dir}", *overrides])
    assert config.memory.first_trial_memory is True and config.memory.recall == "all"


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


def test_a_streamed_stage_stores_batches_as_they_come_and_resumes_with_only_the_missing(tmp_path):
    from dataclasses import replace

    from agentloop.types import Task, Trajectory

    def played(key: str) -> Trajectory:
        env, task_id = key.split("/")
        return episode(Task(env, task_id, "train", "k", "do it"), action="ok", generated_tokens=1)

    keys = [f"db/t-{i}" for i in range(7)]
    asked = []

    def play(crash_after: int | None):
        def run(todo, begun):
            asked.append(list(todo))
            for start in range(0, len(todo), 2):
                if crash_after is not None and start >= crash_after:
                    raise KeyboardInterrupt  # the driver dies mid-stage
                yield [played(k) for k in todo[start : start + 2]]
            yield {"seconds": 1.0}

        return run

    def measure(trajectories, stats):
        return {"explore/episodes": float(len(trajectories)), "explore/seconds": stats["seconds"]}

    run = RunDir.create(tmp_path / "run", Config())
    store = ReplayStore(run.store_url)
    metrics = MetricsLogger(run.path)
    with pytest.raises(KeyboardInterrupt):
        Stages(run, store, metrics).stream("explore/1", 1, keys, play(crash_after=4), measure)
    assert store.episodes("explore/1") == set(keys[:4]) and store.started_stages() == ["explore/1"]

    resumed = Stages(run, ReplayStore(run.store_url), metrics)
    found = resumed.stream("explore/1", 1, keys, play(crash_after=None), measure)
    assert asked == [keys, keys[4:]]  # the second run played only what the first did not store
    assert [f"{t.task.env}/{t.task.task_id}" for t in found] == keys
    assert len(store.trajectories(stage="explore/1")) == 7 and store.completed_stages() == ["explore/1"]
    record = read_metrics(metrics.path)[-1]
    assert record["explore/episodes"] == 7 and record["explore/resumed_episodes"] == 4
    assert resumed.stream("explore/1", 1, keys, play(crash_after=0), measure) == found  # complete: not run again
    again = resumed.stream("explore/1", 1, keys[::-1], play(crash_after=0), measure)
    assert [f"{t.task.env}/{t.task.task_id}" for t in again] == keys[::-1]  # read back in the order asked
    assert replace(found[0]) == found[0]
    metrics.close()
    store.close()


def test_a_stage_of_trial_chains_resumes_each_chain_after_its_last_stored_trial_with_its_memory(tmp_path):
    from agentloop.memory import MemoryConfig, distill
    from agentloop.types import Task, Trajectory

    trials = MemoryConfig(trials=3)
    solved_at = {"db/a": 0, "db/b": 2, "db/c": 1, "db/d": None}  # d never: three trials

    def trial(key: str, number: int) -> Trajectory:
        env, task_id = key.split("/")
        success = solved_at[key] == number
        task = Task(env, task_id, "train", "k", f"do {task_id}")
        return episode(task, success=success, action=f"try {number}", trial=number, reflection=f"lesson {number}")

    asked, remembered = [], []

    class Memory:
        def distill(self, batch, stage):
            return [distill(t, stage) for t in batch]

        def add(self, experiences):
            remembered.extend(experiences)

    def play(crash_after: int | None):
        def run(todo, begun):
            asked.append((list(todo), {k: [t.trial for t in v] for k, v in begun.items()}))
            played = 0
            for number in range(3):  # trials in rounds, each chain until it ends
                for key in todo:
                    done = begun.get(key, [])
                    if len(done) > number or any(trials.last_trial(t) for t in done):
                        continue
                    if number and solved_at[key] is not None and solved_at[key] < number:
                        continue
                    if crash_after is not None and played >= crash_after:
                        raise KeyboardInterrupt
                    yield [trial(key, number)]
                    played += 1
            yield None

        return run

    run = RunDir.create(tmp_path / "run", Config())
    store = ReplayStore(run.store_url)
    metrics = MetricsLogger(run.path)
    keys = list(solved_at)
    with pytest.raises(KeyboardInterrupt):
        Stages(run, store, metrics).stream(
            "explore/1", 1, keys, play(5), lambda ts, s: {}, ends=trials.last_trial, memory=Memory()
        )
    # Stored: the four first trials, and b's second; a is over, b, c and d go on.
    assert store.episodes("explore/1") == {"db/a", "db/b", "db/c", "db/d", "db/b#1"}
    assert len(store.experiences()) == 5 and remembered == store.experiences()
    found = Stages(run, store, metrics).stream(
        "explore/1", 1, keys, play(None), lambda ts, s: {"explore/trials": float(len(ts))}, ends=trials.last_trial
    )
    assert asked[1] == (["db/b", "db/c", "db/d"], {"db/b": [0, 1], "db/c": [0], "db/d": [0]})
    assert [(t.task.task_id, t.trial) for t in found] == [
        ("a", 0), ("b", 0), ("b", 1), ("b", 2), ("c", 0), ("c", 1), ("d", 0), ("d", 1), ("d", 2)
    ]  # fmt: skip
    assert [t.reflection for t in found[1:4]] == ["lesson 0", "lesson 1", "lesson 2"]
    assert read_metrics(metrics.path)[-1]["explore/trials"] == 9
    metrics.close()
    store.close()


def test_a_fork_holds_the_runs_completed_stages_and_names_its_own_directory(tmp_path):
    from agentloop.types import Task

    run = RunDir.create(tmp_path / "run", Config(seed=3))
    task = Task("db", "1", "dev", "SELECT", "q")
    done = episode(task, source="eval", policy_version=0, iteration=0)
    metrics = MetricsLogger(run.path, trackers=[])
    with ReplayStore(run.store_url) as store:  # left open, unsynced, as a running run's store is
        store.begin_stage("eval/base", tasks=1)
        store.commit_stage("eval/base", trajectories=[done], metrics={"eval/successes": 1.0})
        store.begin_stage("dpo/1")
        store.beat()
        metrics.log({"x": 1.0}, stage="eval/base", step=0)
        for stage in ("sft", "dpo/1"):  # sft complete; dpo/1 running: its adapter written, not yet committed
            run.adapter(stage).mkdir(parents=True)
            (run.adapter(stage) / "adapter_model.safetensors").write_bytes(b"weights")
        store.commit_stage("sft", metrics={})
        metrics.log({"x": 2.0}, stage="sft", step=0)
        metrics.close()
        with open(run.path / "metrics.jsonl", "a") as torn:  # a line cut short by a kill, then one stageless
            torn.write('{"x": 3.0}\n{"stage": "dpo/1", "x"')
        (run.path / "trackers.json").write_text('{"wandb": "source-run-id"}')
        forked = run.fork(tmp_path / "fork")
    with ReplayStore(forked.store_url) as store:
        assert store.completed_stages() == ["eval/base", "sft"] and len(store.trajectories(stage="eval/base")) == 1
    from agentloop.dashboard.queries import StoreReader

    source, copy = StoreReader(run.store_url), StoreReader(forked.store_url)
    assert source.last_beat() is not None and [s.name for s in source.stages() if s.position is None] == ["dpo/1"]
    assert copy.last_beat() is None and [s.name for s in copy.stages() if s.position is None] == []  # runs nothing
    assert (forked.adapter("sft") / "adapter_model.safetensors").read_bytes() == b"weights"
    assert not forked.adapter("dpo/1").exists() and not (forked.path / "trackers.json").exists()
    assert [r["stage"] for r in read_metrics(forked.path / "metrics.jsonl")] == ["eval/base", "sft"]
    _, saved, _ = RunDir.resume(forked.path, Config)
    assert saved.seed == 3 and not (tmp_path / "fork.forking").exists()
    with pytest.raises(FileExistsError):
        run.fork(tmp_path / "fork")
    empty = RunDir.create(tmp_path / "empty", Config())
    with pytest.raises(FileNotFoundError, match="no replay.db"):
        empty.fork(tmp_path / "fork2")
    assert not (tmp_path / "empty" / "replay.db").exists() and not (tmp_path / "fork2.forking").exists()


def test_a_fork_at_a_stage_leaves_out_the_later_stages_and_the_run_untouched(tmp_path):
    from click.testing import CliRunner

    from agentloop.cli import cli
    from agentloop.types import Task

    run = RunDir.create(tmp_path / "run", Config(seed=3))
    task = Task("db", "1", "dev", "SELECT", "q")
    done = episode(task, source="eval", policy_version=0, iteration=0)
    metrics = MetricsLogger(run.path, trackers=[])
    with ReplayStore(run.store_url) as store:
        for stage in ("eval/base", "sft", "eval/sft", "dpo/1", "eval/1"):
            store.commit_stage(stage, trajectories=[done] if stage.startswith("eval") else [], metrics={})
            metrics.log({"x": 1.0}, stage=stage, step=0)
            if not stage.startswith("eval"):
                run.adapter(stage).mkdir(parents=True)
                (run.adapter(stage) / "adapter_model.safetensors").write_bytes(stage.encode())
    metrics.close()
    before = sorted(p.relative_to(run.path) for p in run.path.rglob("*"))

    found = CliRunner().invoke(cli, ["fork", str(run.path), str(tmp_path / "fork"), "--at", "eval/sft"])

    assert found.exit_code == 0, found.output
    assert "3 stages (eval/base, sft, eval/sft)" in found.output
    forked = RunDir(tmp_path / "fork")
    with ReplayStore(forked.store_url) as store:
        assert store.completed_stages() == ["eval/base", "sft", "eval/sft"] and len(store.trajectories()) == 2
    assert sorted(p.name for p in (forked.path / "adapters").iterdir()) == ["sft"]
    assert [r["stage"] for r in read_metrics(forked.path / "metrics.jsonl")] == ["eval/base", "sft", "eval/sft"]
    assert sorted(p.relative_to(run.path) for p in run.path.rglob("*")) == before
    with ReplayStore(run.store_url) as store:
        assert len(store.completed_stages()) == 5
    missing = CliRunner().invoke(cli, ["fork", str(run.path), str(tmp_path / "other"), "--at", "dpo/2"])
    assert missing.exit_code == 2 and "'dpo/2' is not a completed stage; completed: eval/base, sft" in missing.output
    assert not (tmp_path / "other").exists() and not (tmp_path / "other.forking").exists()


def test_each_start_of_a_run_is_recorded_with_the_code_s_commit_and_a_fork_keeps_them(tmp_path):
    import subprocess
    from pathlib import Path

    import agentloop

    run = RunDir.create(tmp_path / "run", Config())
    assert run.starts() == []
    first = run.record_start(["experiments/eto.py", "seed=1"])
    run.record_start(["experiments/eto.py", "--resume", str(run.path)])
    here = Path(agentloop.__file__).parent
    try:
        head = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True)
        expected = head.stdout.strip() if head.returncode == 0 else ""
    except FileNotFoundError:  # no git on the machine: no commit to record
        expected = ""
    assert first["commit"] == expected
    with open(run.starts_file, "a") as log:
        log.write('{"time": "cut by a cra')  # a crash mid-line: the line is skipped, the others kept
    assert [s["argv"][1] for s in run.starts()] == ["seed=1", "--resume"]
    run.record_start(["experiments/ste.py", "--resume", str(run.path)])  # after the cut line, on a line of its own
    assert [s["argv"][0] for s in run.starts()] == ["experiments/eto.py", "experiments/eto.py", "experiments/ste.py"]
    assert run.starts()[0] == first and first["cpu"] and isinstance(first["dirty"], bool)
    assert run.commits() == first["commit"]  # the same code each time: once
    with ReplayStore(run.store_url):
        pass
    assert [s["argv"] for s in run.fork(tmp_path / "fork").starts()] == [s["argv"] for s in run.starts()]
