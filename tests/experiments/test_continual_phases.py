"""experiments/continual.py's phases: envs or task families of an env, checked before work starts; each
phase's SFT data replays only what earlier phases trained."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from records import episode

from agentloop.config import ConfigError, load_config
from agentloop.replay.store import ReplayStore
from agentloop.types import Task, Trajectory

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "experiments"))
import continual  # noqa: E402


@pytest.fixture(autouse=True)
def data(monkeypatch: pytest.MonkeyPatch, data_dir: Path) -> None:
    monkeypatch.setenv("AGENTLOOP_DATA_DIR", str(data_dir))  # the config checks that its data_dir exists


def config(*overrides: str) -> continual.ContinualConfig:
    return load_config(continual.ContinualConfig, None, list(overrides))


def test_phases_may_be_task_families_of_one_env() -> None:
    assert config("phases=[[db:UPDATE], [db:INSERT]]").phases == [["db:UPDATE"], ["db:INSERT"]]
    both = config("envs=[{name: db}, {name: os}]", "phases=[[db:UPDATE, os], [db:SELECT]]")
    assert both.phases[0] == ["db:UPDATE", "os"]


@pytest.mark.parametrize(
    ("phases", "problem"),
    [
        ("[[db:UPDATE], [db:UPDATE]]", "listed twice"),
        ("[[db], [db:UPDATE]]", "both whole and by families"),
        ("[['db:']]", "a family without its kind"),
        ("[[db], []]", "a phase is empty"),
        ("[[os]]", "not each env of envs"),
    ],
)
def test_bad_phases_fail_naming_the_key(phases: str, problem: str) -> None:
    with pytest.raises(ConfigError, match=f"phases: .*{problem}"):
        config(f"phases={phases}")


def task(kind: str, n: int, env: str = "db") -> Task:
    return Task(env=env, task_id=f"train-{kind}-{n}", split="train", kind=kind, instruction="do it")


def test_a_family_is_its_kind_within_its_env() -> None:
    assert continual.belongs(task("UPDATE", 0), ["db:UPDATE"])
    assert not continual.belongs(task("INSERT", 0), ["db:UPDATE"])
    assert continual.belongs(task("INSERT", 0), ["db:UPDATE", "db"])
    assert not continual.belongs(task("UPDATE", 0, env="os"), ["db:UPDATE"])
    continual.check_families(config("phases=[[db:UPDATE], [db:SELECT]]"))


def test_a_misspelt_family_stops_the_run_before_its_directory_exists(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    with pytest.raises(ConfigError, match="phases: db has no training task of kind 'update'; its kinds: INSERT, SE"):
        continual.main(["phases=[[db:update]]", f"run_dir={run_dir}"])
    assert not run_dir.exists()


def test_a_family_left_out_of_the_training_sample_stops_the_run() -> None:
    sampled = config("envs=[{name: db, train_tasks: 1}]", "phases=[[db:UPDATE], [db:INSERT, db:SELECT]]")
    (kept,) = {t.task.kind for t in sampled.envs[0].training_tasks(Path(sampled.data_dir), sampled.seed)}
    with pytest.raises(ConfigError, match=f"phases: db has no training task of kind .*; its kinds: {kept}$"):
        continual.check_families(sampled)


def trajectory(t: Task, source: str, success: bool = True) -> Trajectory:
    return episode(t, success=success, source=source)


def test_a_phase_replays_only_the_families_trained_before_it(tmp_path: Path) -> None:
    experts = [trajectory(task(kind, n), "expert") for kind in ("UPDATE", "INSERT", "SELECT") for n in range(10)]
    explored = [trajectory(task("UPDATE", n), "explore", success=n < 5) for n in range(10)]
    explored += [trajectory(task("SELECT", n), "explore") for n in range(10)]  # never trained: not replayed
    made = config("phases=[[db:UPDATE], [db:INSERT]]", "sft.replay_fraction=0.4")
    with ReplayStore(f"sqlite:///{tmp_path / 'replay.db'}") as store:
        store.add(explored, "explore/1")
        run = SimpleNamespace(store=store, config=made)
        inserts = [t for t in experts if t.task.kind == "INSERT"]
        data = continual.phase_sft_data(run, inserts, ["db:UPDATE"], experts, 1, 2)
        replayed = data["all"][len(inserts) :]
        assert data["all"][: len(inserts)] == inserts and len(replayed) == 6  # 40% of 10 demonstrations + 5 successes
        assert {(t.task.kind, t.source) for t in replayed} <= {("UPDATE", "expert"), ("UPDATE", "explore")}
        assert all(t.success for t in replayed)
        none = dataclasses.replace(made, sft=dataclasses.replace(made.sft, replay_fraction=0.0))
        alone = SimpleNamespace(store=store, config=none)
        unmixed = continual.phase_sft_data(alone, inserts, ["db:UPDATE"], experts, 1, 2)
        assert unmixed["all"] == inserts
