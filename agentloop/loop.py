"""Run bookkeeping for experiment loops: the run directory, stages, resume.

A run is a directory holding its resolved config, the replay store (SQLite by default),
the adapters and the metrics. A stage (``experts``, ``eval/base``, ``sft``, ``explore/1``,
``dpo/1``, ...) commits its trajectories, pairs, metrics and completion mark in one store
transaction, after writing any adapter it produced; so after a crash a stage is either
complete, with everything it made, or absent, and ``--resume`` reruns it from scratch.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import yaml

from agentloop.actors.transfer import Files, pack_dir, unpack_dir
from agentloop.config import ConfigError, to_dict
from agentloop.types import Pair, Trajectory

logger = logging.getLogger(__name__)
C = TypeVar("C")


@dataclass(frozen=True)
class RunDir:
    """The directory of one run."""

    path: Path

    @property
    def config_file(self) -> Path:
        return self.path / "config.yaml"

    @property
    def store_url(self) -> str:
        return f"sqlite:///{(self.path / 'replay.db').resolve()}"

    def adapter(self, stage: str) -> Path:
        """Where the adapter a training stage produced lives (``dpo/1`` -> ``adapters/dpo-1``)."""
        return self.path / "adapters" / stage.replace("/", "-")

    @classmethod
    def create(cls, path: Path, config: Any) -> RunDir:
        """Makes a new run directory and writes the resolved config into it."""
        path = Path(path)
        if path.exists() and any(path.iterdir()):
            raise FileExistsError(f"run directory {path} is not empty: pass --resume {path} to continue it")
        path.mkdir(parents=True, exist_ok=True)
        (path / "config.yaml").write_text(yaml.safe_dump(_plain(to_dict(config)), sort_keys=False))
        return cls(path)

    @classmethod
    def resume(cls, path: Path, config_cls: type[C], overrides: Sequence[str] = ()) -> tuple[RunDir, C]:
        """Opens an existing run and reloads its config; overrides apply on top and are saved."""
        from agentloop.config import load_config

        run = cls(Path(path))
        if not run.config_file.is_file():
            raise ConfigError(f"--resume {path}: no config.yaml there; is it a run directory?")
        config = load_config(config_cls, run.config_file, list(overrides))
        if overrides:
            run.config_file.write_text(yaml.safe_dump(_plain(to_dict(config)), sort_keys=False))
        return run, config


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return str(value) if isinstance(value, Path) else value


class Stages:
    """Runs named stages once: completed ones are skipped on resume, the rest are timed."""

    def __init__(self, run: RunDir, store: Any, metrics: Any) -> None:
        self.run, self.store, self.metrics = run, store, metrics
        self.completed = list(store.completed_stages())
        if self.completed:
            logger.info("resuming after stages: %s", ", ".join(self.completed))

    def done(self, stage: str) -> bool:
        return stage in self.completed

    def rollout(
        self, stage: str, step: int, work: Callable[[], tuple[list[Trajectory], dict[str, float]]]
    ) -> list[Trajectory]:
        """A stage that produces trajectories (experts, explore, eval); returns them."""
        if self.done(stage):
            return self.store.trajectories(stage=stage)
        started = time.perf_counter()
        trajectories, metrics = work()
        metrics[f"timing/{stage.split('/')[0]}"] = time.perf_counter() - started
        self._commit(stage, step, metrics, trajectories=trajectories)
        return trajectories

    def train(
        self, stage: str, step: int, work: Callable[[], tuple[Files, dict[str, float]]], pairs: Sequence[Pair] = ()
    ) -> Files:
        """A stage that produces an adapter; returns its files (read back from disk on resume)."""
        target = self.run.adapter(stage)
        if self.done(stage):
            return pack_dir(target)
        started = time.perf_counter()
        files, metrics = work()
        metrics[f"timing/{stage.split('/')[0]}"] = time.perf_counter() - started
        unpack_dir(files, target)
        self._commit(stage, step, metrics, pairs=pairs)
        return files

    def _commit(self, stage: str, step: int, metrics: dict[str, float], **records: Any) -> None:
        self.store.commit_stage(stage, metrics=metrics, **records)
        self.completed.append(stage)
        self.metrics.log(metrics, stage=stage, step=step)
        detail = ("/kind/", "/env/", "/by_type/", "/by_kind/", "/recovery/")
        shown = {k: round(v, 4) for k, v in metrics.items() if not any(d in k for d in detail)}
        logger.info("%s done: %s", stage, shown)
