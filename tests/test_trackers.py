"""Experiment trackers for real: a W&B offline run and an MLflow SQLite store get the records that
``metrics.jsonl`` gets, a resumed run continues the same tracker runs, a tracker that cannot start
fails naming its key, and a tracker failing mid-run loses no JSON line."""

from __future__ import annotations

import json
import logging
import math
import os
import struct
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from experiment_runs import REPO, run_experiment
from localnet import free_port

from agentloop.config import ConfigError, load_config
from agentloop.metrics import MetricsLogger, read_metrics
from agentloop.trackers import IDS_FILE, MLflow, MLflowConfig, TensorBoard, TrackingConfig, WandbConfig, start_trackers


@dataclass
class Learner:
    epochs: int = 2
    learning_rate: float = 1e-4


@dataclass
class Resolved:
    """Stands in for an experiment's resolved config."""

    run_dir: Path = Path("runs/x")
    envs: list[str] = field(default_factory=lambda: ["db", "alfworld"])
    sft: Learner = field(default_factory=Learner)


# Steps as a run logs them: several stages share a step, and STE's steps go back (eval at policy
# version 3, then round 2's exploration at step 2).
RECORDS = [
    ({"eval/success_rate": 0.25, "timing/eval": 3.5}, "eval/base", 0),
    ({"sft/loss": 1.5, "timing/sft": 7.0}, "sft", 1),
    ({"eval/success_rate": 0.5, "eval/env/db/success_rate": 0.75}, "eval/1", 3),
    ({"explore/success_rate": 0.125, "dpo/loss": math.nan}, "explore/2", 2),
]


@pytest.fixture
def wandb_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """W&B offline, its settings and caches in tmp, no API key, no console capture."""
    home = tmp_path / "wandb-home"
    for name in ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(name, str(home / name.lower()))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONSOLE", "off")
    monkeypatch.setenv("WANDB_ERROR_REPORTING", "false")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)


@pytest.fixture(scope="module")
def mlflow_uri(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One SQLite store for the module (creating its tables takes seconds), telemetry off."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
        yield f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


@pytest.fixture
def no_telemetry(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")


def log_records(run_dir: Path, config: TrackingConfig, records=RECORDS) -> None:
    with MetricsLogger(run_dir, start_trackers(config, run_dir, Resolved())) as log:
        for metrics, stage, step in records:
            log.log(metrics, stage=stage, step=step)


def wandb_records(run_file: Path) -> list[Any]:
    """The records of a ``run-<id>.wandb`` file. wandb 0.31 has no public reader of its offline log, a
    LevelDB-style log of protobuf ``Record`` messages: a 7-byte header, then 32 KiB blocks of chunks, each
    with a 7-byte header (CRC32C, length, type: 1 full, 2 first, 3 middle, 4 last)."""
    from wandb.proto.wandb_internal_pb2 import Record

    data = run_file.read_bytes()
    assert data[:4] == b":W&B"
    records, pending, pos = [], b"", 7
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a chunk header is padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0:
            break
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            records.append(Record.FromString(pending))
            pending = b""
    return records


def wandb_runs(run_dir: Path) -> list[tuple[str, dict[str, Any], list[dict[str, Any]]]]:
    """Each offline piece of the run, in order: its run id, its config, its history rows."""
    pieces = []
    for run_file in sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb")):
        records = wandb_records(run_file)
        run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
        config = {u.key: json.loads(u.value_json) for u in run.config.update if u.key != "_wandb"}
        rows = []
        for record in (r for r in records if r.WhichOneof("record_type") == "history"):
            row = {item.key or ".".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            rows.append({key: value for key, value in row.items() if not key.startswith("_")})  # W&B's own
        pieces.append((run.run_id, config, rows))
    return pieces


def test_wandb_offline_run_gets_every_record_and_resumes(tmp_path: Path, wandb_offline: None) -> None:
    import wandb

    config = TrackingConfig(wandb=WandbConfig(project="agentloop-test", mode="offline", tags=["t"]))
    log_records(tmp_path, config, RECORDS[:3])
    log_records(tmp_path, config, RECORDS[3:])  # a resumed run
    wandb.teardown()  # W&B's service process writes the offline files out in full

    (first_id, first_config, first_rows), (second_id, second_config, second_rows) = wandb_runs(tmp_path)
    assert first_id == second_id == json.loads((tmp_path / IDS_FILE).read_text())["wandb"]["id"]
    assert first_config == {
        "run_dir": "runs/x",
        "envs": ["db", "alfworld"],
        "sft": {"epochs": 2, "learning_rate": 1e-4},
    }
    assert second_config == {}  # logged once, when the W&B run was made
    rows = first_rows + second_rows
    assert [row.pop("step") for row in rows] == [step for _, _, step in RECORDS]
    assert rows[:3] == [metrics for metrics, _, _ in RECORDS[:3]]
    assert rows[3]["explore/success_rate"] == 0.125 and math.isnan(rows[3]["dpo/loss"])
    # The same names at the same steps in the JSON lines and in TensorBoard.
    assert [(r["stage"], r["step"]) for r in read_metrics(tmp_path / "metrics.jsonl")] == [
        (s, n) for _, s, n in RECORDS
    ]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(s.step, s.value) for s in events.Scalars("eval/success_rate")] == [(0, 0.25), (3, 0.5)]


def test_mlflow_sqlite_run_gets_every_record_and_resumes(tmp_path: Path, mlflow_uri: str) -> None:
    from mlflow.tracking import MlflowClient

    config = TrackingConfig(tensorboard=False, mlflow=MLflowConfig(tracking_uri=mlflow_uri, experiment="resume"))
    log_records(tmp_path / "run", config, RECORDS[:3])
    run_id = json.loads((tmp_path / "run" / IDS_FILE).read_text())["mlflow"]["run_id"]
    client = MlflowClient(tracking_uri=mlflow_uri)
    assert client.get_run(run_id).info.status == "FINISHED"
    log_records(tmp_path / "run", config, RECORDS[3:])  # a resumed run

    experiment = client.get_experiment_by_name("resume")
    assert [r.info.run_id for r in client.search_runs([experiment.experiment_id])] == [run_id]
    run = client.get_run(run_id)
    assert run.info.run_name == "run" and run.info.status == "FINISHED"
    assert run.data.params == {
        "run_dir": "runs/x",
        "envs": '["db", "alfworld"]',
        "sft.epochs": "2",
        "sft.learning_rate": "0.0001",
    }
    history = {
        name: [(m.step, m.value) for m in client.get_metric_history(run_id, name)]
        for name in {name for metrics, _, _ in RECORDS for name in metrics}
    }
    nan = history.pop("dpo/loss")
    assert nan[0][0] == 2 and math.isnan(nan[0][1])
    assert history == {
        "eval/success_rate": [(0, 0.25), (3, 0.5)],
        "timing/eval": [(0, 3.5)],
        "sft/loss": [(1, 1.5)],
        "timing/sft": [(1, 7.0)],
        "eval/env/db/success_rate": [(3, 0.75)],
        "explore/success_rate": [(2, 0.125)],
    }
    assert not (tmp_path / "run" / "tensorboard").exists()


def test_a_tracker_failing_mid_run_loses_no_json_line(
    tmp_path: Path, mlflow_uri: str, caplog: pytest.LogCaptureFixture
) -> None:
    from mlflow.tracking import MlflowClient

    mlflow = MLflow.start(MLflowConfig(tracking_uri=mlflow_uri, experiment="failing"), tmp_path, {}, None)
    with MetricsLogger(tmp_path, [mlflow, TensorBoard(tmp_path / "tensorboard")]) as log:
        log.log({"eval/success_rate": 0.25}, stage="eval/base", step=0)
        MlflowClient(tracking_uri=mlflow_uri).delete_run(mlflow.run_id)  # the tracker's run is gone mid-run
        with caplog.at_level(logging.WARNING, logger="agentloop.metrics"):
            log.log({"eval/success_rate": 0.5}, stage="eval/sft", step=1)
    assert "MLflow did not record eval/sft (step 1)" in caplog.text
    assert [r["eval/success_rate"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [0.25, 0.5]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tensorboard"))  # the trackers after the failing one still log
    events.Reload()
    assert [(s.step, s.value) for s in events.Scalars("eval/success_rate")] == [(0, 0.25), (1, 0.5)]


def test_a_tracker_that_cannot_start_fails_naming_its_key(
    tmp_path: Path, wandb_offline: None, no_telemetry: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    unreachable = MLflowConfig(tracking_uri=f"http://127.0.0.1:{free_port()}")
    with pytest.raises(ConfigError, match=r"tracking\.mlflow\.tracking_uri='http://127\.0\.0\.1:\d+'.*could not start"):
        start_trackers(TrackingConfig(mlflow=unreachable), tmp_path, Resolved())
    with pytest.raises(ConfigError, match=r"tracking\.mlflow\.tracking_uri='nosuch://x'.*unsupported URI"):
        start_trackers(TrackingConfig(mlflow=MLflowConfig(tracking_uri="nosuch://x")), tmp_path, Resolved())
    with pytest.raises(ConfigError, match=r"tracking\.wandb\.project='a/b'.*Invalid project name"):
        start_trackers(TrackingConfig(wandb=WandbConfig(project="a/b", mode="offline")), tmp_path, Resolved())
    assert not (tmp_path / IDS_FILE).exists()
    # Checked with the config, before a run directory exists.
    with pytest.raises(ConfigError, match=r"wandb\.project: empty, so W&B is off, but entity"):
        load_config(TrackingConfig, overrides=["wandb.entity=team"])
    with pytest.raises(ConfigError, match=r"mlflow\.experiment: MLflow needs"):
        load_config(TrackingConfig, overrides=["mlflow.tracking_uri=sqlite:///m.db", "mlflow.experiment="])


def test_eto_stops_before_any_work_on_a_tracker_that_cannot_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sys.path.insert(0, str(REPO / "experiments"))
    import eto

    config = load_config(eto.ETOConfig, None, [f"data_dir={tmp_path}"])
    assert config.tracking == TrackingConfig()  # TensorBoard and metrics.jsonl only, as before
    with pytest.raises(ConfigError, match=r"tracking\.wandb\.mode: 'sometimes' is not one of"):
        load_config(eto.ETOConfig, None, [f"data_dir={tmp_path}", "tracking.wandb.mode=sometimes"])

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    uri = f"http://127.0.0.1:{free_port()}"
    result = run_experiment("eto.py", [f"run_dir={tmp_path / 'r'}", f"tracking.mlflow.tracking_uri={uri}"], tmp_path)
    assert result.returncode != 0 and f"tracking.mlflow.tracking_uri='{uri}'" in result.stderr
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == ["config.yaml", "starts.jsonl"]  # no store or Ray


def test_a_run_that_raises_leaves_its_mlflow_run_failed_not_running(tmp_path: Path, mlflow_uri: str) -> None:
    from mlflow.tracking import MlflowClient

    script = f"""
from pathlib import Path
from agentloop.trackers import MLflowConfig, TrackingConfig, start_trackers
config = TrackingConfig(tensorboard=False, mlflow=MLflowConfig(tracking_uri={mlflow_uri!r}, experiment="crash"))
start_trackers(config, Path({str(tmp_path / "run")!r}), config)
raise RuntimeError("the run failed mid-way")
"""
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode != 0 and "the run failed mid-way" in result.stderr
    run_id = json.loads((tmp_path / "run" / IDS_FILE).read_text())["mlflow"]["run_id"]
    assert MlflowClient(tracking_uri=mlflow_uri).get_run(run_id).info.status == "FAILED"


def test_work_that_raises_inside_the_logger_ends_its_mlflow_run_failed(tmp_path: Path, mlflow_uri: str) -> None:
    from mlflow.tracking import MlflowClient

    mlflow = MLflow.start(MLflowConfig(tracking_uri=mlflow_uri, experiment="raising"), tmp_path, {}, None)
    with pytest.raises(RuntimeError, match="evaluation failed"), MetricsLogger(tmp_path, [mlflow]) as log:
        log.log({"eval/success_rate": 0.25}, stage="eval/policy", step=0)
        raise RuntimeError("evaluation failed")
    assert MlflowClient(tracking_uri=mlflow_uri).get_run(mlflow.run_id).info.status == "FAILED"
