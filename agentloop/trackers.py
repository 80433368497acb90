"""Experiment trackers: where each metrics record goes besides ``metrics.jsonl``.

:class:`agentloop.metrics.MetricsLogger` writes the JSON line first, then hands the same record
to each tracker of the run: TensorBoard by default, Weights & Biases and MLflow when the
experiment's ``tracking`` section names a project or a tracking URI. Every tracker gets the
same path names (``eval/success_rate``, ``timing/explore``) at the same step: TensorBoard's
``global_step``, MLflow's ``step``, and in W&B a ``step`` metric that every chart uses as its
x-axis (a run's steps can go back, as when STE evaluates policy version 3 and then explores
round 2, and W&B's own step cannot).

A tracker that cannot start (an unknown project, no API key, an unreachable server) fails the
run before any work with a :class:`~agentloop.config.ConfigError` naming its key; an error
while logging is a warning, the JSON line being written already. The resolved config is logged
once, when a tracker's run is created. The ids of a run's tracker runs are kept in
``trackers.json`` in the run directory, so a resumed run continues the same W&B and MLflow
runs. wandb and mlflow are imported only when configured (``pip install 'agentloop[trackers]'``).
"""

from __future__ import annotations

import atexit
import importlib.util
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Literal, Protocol

from agentloop.config import ConfigError, to_dict

logger = logging.getLogger(__name__)

TENSORBOARD_DIR = "tensorboard"
"""The TensorBoard log directory inside a run directory."""
IDS_FILE = "trackers.json"
"""Inside a run directory: the W&B run id and the MLflow run (with its tracking URI) the run logs to."""
STEP = "step"
"""The W&B metric holding a record's step, the x-axis of every W&B chart of the run."""


@dataclass
class WandbConfig:
    """A Weights & Biases run for the agentloop run, named after its run directory."""

    project: str = ""
    """W&B project; empty = no W&B."""
    entity: str = ""
    """Team or user owning the project; empty = the API key's default entity."""
    mode: Literal["online", "offline"] = "online"
    """``offline`` keeps the W&B run under ``<run_dir>/wandb/`` for a later ``wandb sync``."""
    group: str = ""
    """W&B run group, e.g. the runs of one ablation."""
    tags: list[str] = field(default_factory=list)

    def validate(self) -> None:
        if not self.project and (self.entity or self.group or self.tags):
            raise ConfigError("project: empty, so W&B is off, but entity, group or tags are set")
        if self.project and importlib.util.find_spec("wandb") is None:
            raise ConfigError(
                "project: W&B is configured but wandb is not installed (pip install 'agentloop[trackers]')"
            )


@dataclass
class MLflowConfig:
    """An MLflow run for the agentloop run, named after its run directory."""

    tracking_uri: str = ""
    """Where MLflow keeps runs: ``sqlite:///path/mlflow.db``, ``http(s)://server:5000``, ``databricks``;
    empty = no MLflow (``MLFLOW_TRACKING_URI`` is not read). MLflow 3 refuses a ``file:`` store unless
    ``MLFLOW_ALLOW_FILE_STORE=true``."""
    experiment: str = "agentloop"
    """MLflow experiment, created when missing."""

    def validate(self) -> None:
        if self.tracking_uri and not self.experiment:
            raise ConfigError("experiment: MLflow needs an experiment name")
        if self.tracking_uri and importlib.util.find_spec("mlflow") is None:
            raise ConfigError(
                "tracking_uri: MLflow is configured but mlflow is not installed (pip install 'agentloop[trackers]')"
            )


@dataclass
class TrackingConfig:
    """Where metrics go besides ``metrics.jsonl``: TensorBoard, W&B, MLflow (see :mod:`agentloop.trackers`)."""

    tensorboard: bool = True
    """TensorBoard event files under ``<run_dir>/tensorboard/``."""
    wandb: WandbConfig = field(default_factory=WandbConfig)
    mlflow: MLflowConfig = field(default_factory=MLflowConfig)


class Tracker(Protocol):
    """A sink of metric records (:class:`agentloop.metrics.MetricsLogger` calls it after the JSON line)."""

    def log(self, metrics: Mapping[str, float], step: int, walltime: float) -> None:
        """Records path-named values (NaN included) at ``step``; ``walltime`` in seconds since the epoch."""

    def close(self, failed: bool = False) -> None:
        """Flushes and ends the tracker's run (a resumed run continues it); ``failed``: the work raised."""


class TensorBoard:
    """TensorBoard scalars in ``log_dir``; the writer opens on the first record (and again after a close)."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = Path(log_dir)
        self._writer: Any = None

    def log(self, metrics: Mapping[str, float], step: int, walltime: float) -> None:
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(self.log_dir))
        for name, value in metrics.items():
            self._writer.add_scalar(name, value, global_step=step, walltime=walltime)
        self._writer.flush()

    def close(self, failed: bool = False) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


class Wandb:
    """A W&B run; :meth:`start` makes or continues one."""

    def __init__(self, run: Any) -> None:
        self.run = run

    @classmethod
    def start(cls, config: WandbConfig, run_dir: Path, resolved: dict[str, Any], known: dict | None) -> Wandb:
        """Starts a W&B run with the resolved config, or continues the run ``known`` names (``{"id": ...}``).

        W&B's offline mode ignores ``resume`` but keeps the id, so ``wandb sync`` joins the pieces.
        """
        import wandb

        run = wandb.init(
            project=config.project,
            entity=config.entity or None,
            mode=config.mode,
            dir=run_dir,
            name=run_dir.name,
            group=config.group or None,
            tags=config.tags or None,
            id=known["id"] if known else None,
            resume="allow" if known else None,
            config=None if known else resolved,
            reinit="create_new",
        )
        run.define_metric(STEP, hidden=True)
        run.define_metric("*", step_metric=STEP)
        return cls(run)

    @property
    def ids(self) -> dict[str, str]:
        """What continues this run: its id."""
        return {"id": self.run.id}

    def log(self, metrics: Mapping[str, float], step: int, walltime: float) -> None:
        self.run.log({STEP: step, **metrics})

    def close(self, failed: bool = False) -> None:
        self.run.finish(exit_code=1 if failed else 0)


class MLflow:
    """An MLflow run, written through :class:`mlflow.tracking.MlflowClient`; :meth:`start` makes or continues one."""

    def __init__(self, client: Any, tracking_uri: str, run_id: str) -> None:
        self.client, self.tracking_uri, self.run_id = client, tracking_uri, run_id
        atexit.register(self._exit_unclosed)

    @classmethod
    def start(cls, config: MLflowConfig, run_dir: Path, resolved: dict[str, Any], known: dict | None) -> MLflow:
        """Creates a run in the experiment with the resolved config as parameters (dotted keys), or
        continues the run ``known`` names (``{"tracking_uri": ..., "run_id": ...}``) at the same URI."""
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient
        from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

        client = MlflowClient(tracking_uri=config.tracking_uri)
        if known and known["tracking_uri"] == config.tracking_uri:
            run = client.get_run(known["run_id"])
            if run.info.lifecycle_stage != "active":
                raise RuntimeError(
                    f"the run's MLflow run {run.info.run_id} is {run.info.lifecycle_stage} (restore it, or drop "
                    f"'mlflow' from {IDS_FILE} to start a new one)"
                )
            client.update_run(run.info.run_id, status="RUNNING")
            return cls(client, config.tracking_uri, run.info.run_id)
        if known:
            logger.info(
                "MLflow moved from %s to %s: starting a new run there", known["tracking_uri"], config.tracking_uri
            )
        experiment = client.get_experiment_by_name(config.experiment)
        experiment_id = experiment.experiment_id if experiment else client.create_experiment(config.experiment)
        tags = {"agentloop.run_dir": str(run_dir.resolve())}
        run = client.create_run(experiment_id, run_name=run_dir.name, tags=tags)
        params = [Param(key, value[:MAX_PARAM_VAL_LENGTH]) for key, value in _flat(resolved).items()]
        client.log_batch(run.info.run_id, params=params)
        return cls(client, config.tracking_uri, run.info.run_id)

    @property
    def ids(self) -> dict[str, str]:
        """What continues this run: its tracking URI and run id."""
        return {"tracking_uri": self.tracking_uri, "run_id": self.run_id}

    def log(self, metrics: Mapping[str, float], step: int, walltime: float) -> None:
        from mlflow.entities import Metric

        stamp = int(walltime * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, stamp, step) for k, v in metrics.items()])

    def close(self, failed: bool = False) -> None:
        atexit.unregister(self._exit_unclosed)
        self.client.set_terminated(self.run_id, status="FAILED" if failed else "FINISHED")

    def _exit_unclosed(self) -> None:
        """At the exit of a process that never closed the tracker (the run raised, or was interrupted), the
        MLflow run ends FAILED rather than staying RUNNING for good; ``--resume`` sets it RUNNING again."""
        try:
            self.client.set_terminated(self.run_id, status="FAILED")
        except Exception as e:  # at exit, nothing else can be done about it
            logger.warning("MLflow run %s not marked FAILED: %s", self.run_id, e)


def start_trackers(config: TrackingConfig, run_dir: Path, resolved: Any) -> list[Tracker]:
    """The run's trackers, started: TensorBoard (when on), then W&B and MLflow when configured,
    continuing the tracker runs ``trackers.json`` names and recording the ones started.

    Args:
        config: The experiment's ``tracking`` section.
        run_dir: The run directory.
        resolved: The resolved experiment config (a config dataclass), logged to a new tracker run.

    Raises:
        ConfigError: Naming the key of a tracker that could not start (those started are closed).
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / IDS_FILE
    ids = json.loads(path.read_text()) if path.is_file() else {}
    plain = json.loads(json.dumps(to_dict(resolved), default=str))
    trackers: list[Tracker] = [TensorBoard(run_dir / TENSORBOARD_DIR)] if config.tensorboard else []
    wandb, mlflow = config.wandb, config.mlflow
    wanted = []  # (name in trackers.json, what an error names, how to start it)
    if wandb.project:
        what = f"tracking.wandb.project={wandb.project!r} (entity={wandb.entity!r}, mode={wandb.mode})"
        wanted.append(("wandb", what, partial(Wandb.start, wandb)))
    if mlflow.tracking_uri:
        what = f"tracking.mlflow.tracking_uri={mlflow.tracking_uri!r} (experiment={mlflow.experiment!r})"
        wanted.append(("mlflow", what, partial(MLflow.start, mlflow)))
    for name, what, start in wanted:
        try:
            tracker = start(run_dir, plain, ids.get(name))
        except Exception as e:  # whatever the tracker's library raises, the run stops here, before any work
            for started in trackers:
                started.close()
            raise ConfigError(f"{what}: could not start: {type(e).__name__}: {e}") from e
        trackers.append(tracker)
        ids[name] = tracker.ids
        temporary = path.with_suffix(".json.tmp")
        temporary.write_text(json.dumps(ids, indent=2) + "\n")
        temporary.replace(path)
    return trackers


def _flat(data: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"a": {"b": 1}, "c": [1]}`` as ``{"a.b": "1", "c": "[1]"}`` (MLflow parameters)."""
    flat: dict[str, str] = {}
    for key, value in data.items():
        if isinstance(value, Mapping):
            flat |= _flat(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value if isinstance(value, str) else json.dumps(value)
    return flat
