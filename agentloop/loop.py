"""Run bookkeeping for experiment loops: the run directory, stages, resume.

A run is a directory holding its resolved config, the replay store (SQLite by default),
the adapters and the metrics. A stage (``experts``, ``eval/base``, ``sft``, ``explore/1``,
``dpo/1``, ...) commits its trajectories, pairs, metrics and completion mark in one store
transaction, after writing any adapter it produced; so after a crash a stage is either
complete, with everything it made, or absent, and ``--resume`` reruns it from scratch. The
metrics log (``metrics.jsonl``, TensorBoard) is written after that commit; a completed stage
a crash kept out of the log is logged again from the store when a resumed run passes it.

A resumed run keeps what its completed stages did: :func:`check_resume` refuses an override
of any setting a completed stage read (the experiment says which stage reads which settings).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

import yaml

from agentloop.actors.transfer import Files, pack_dir, unpack_dir
from agentloop.config import ConfigError, to_dict
from agentloop.types import Experience, Pair, Proposal, Trajectory

logger = logging.getLogger(__name__)
C = TypeVar("C")


_ABSENT = object()
"""A key missing from a saved config."""


@dataclass(frozen=True)
class RunDir:
    """The directory of one run."""

    path: Path

    @property
    def config_file(self) -> Path:
        return self.path / "config.yaml"

    @property
    def store_url(self) -> str:
        from agentloop.replay import STORE_FILE

        return f"sqlite:///{(self.path / STORE_FILE).resolve()}"

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
    def resume(cls, path: Path, config_cls: type[C], overrides: Sequence[str] = ()) -> tuple[RunDir, C, C]:
        """Opens an existing run: its saved config, and that config with ``overrides`` on top.

        Nothing is written: once the overrides are accepted (:func:`check_resume`), save the
        new config with :meth:`save_config`.
        """
        from agentloop.config import load_config

        run = cls(Path(path))
        if not run.config_file.is_file():
            raise ConfigError(f"--resume {path}: no config.yaml there; is it a run directory?")
        legacy = run.legacy_settings(config_cls)
        saved = load_config(config_cls, run.config_file, legacy)
        return run, saved, load_config(config_cls, run.config_file, [*legacy, *overrides])

    def legacy_settings(self, config_cls: type) -> list[str]:
        """Overrides restoring what this run ran with for settings its saved config predates.

        A config class lists in ``LEGACY`` (a class attribute: dotted key -> value) the settings whose
        default is not what runs made before the setting existed did (``memory.first_trial_memory``: such
        runs showed memory at every trial). Without this, a run saved before the key would be read with
        today's default, and a resume would change what its begun stages compute without a word.

        A key counts as predated only where its section was saved without it. A config with no such
        section at all never ran what the section sets (an STE row forked from an ETO trunk has no
        ``memory``), so it starts with today's defaults, as a new run would.
        """
        raw = yaml.safe_load(self.config_file.read_text()) or {}
        found = []
        for key, value in getattr(config_cls, "LEGACY", {}).items():
            *sections, name = key.split(".")
            node: Any = raw
            for part in sections:
                node = node.get(part, _ABSENT) if isinstance(node, dict) else _ABSENT
            if isinstance(node, dict) and name not in node:
                logger.info("%s: not in %s (the run predates it); read as %r, what runs did then", key,
                            self.config_file, value)  # fmt: skip
                found.append(f"{key}={json.dumps(value)}")
        return found

    def fork(self, target: Path, at: str | None = None) -> RunDir:
        """A new run directory at ``target`` holding this run's completed stages (store, adapters,
        metrics, config), to go on with ``--resume`` and other settings of stages still to run.

        With ``at``, only the stages completed up to and including it: a finished run forked at
        ``eval/sft`` goes on from its SFT policy (its later stages' rows, adapters and metrics are
        left out of the copy; the run itself is not touched).

        Made whole or not at all: copied beside the target, then renamed into place. The SQLite
        store is copied with SQLite's backup API, so what the run committed is there even if its
        write-ahead log was never checkpointed; the source may be running meanwhile (what it does for
        a stage not yet complete is left out, but for its streamed episodes, which a resume keeps; the fork is not
        shown running until it is resumed). The fork starts tracker runs of its own (W&B and MLflow
        ids are not copied). A run whose store lives elsewhere (``store_url``) cannot be forked this way.

        Raises:
            KeyError: If ``at`` is not a completed stage of the run.
            FileNotFoundError: If the run has no store.
        """
        import shutil
        import sqlite3

        from agentloop.replay import STORE_FILE, ReplayStore
        from agentloop.trackers import IDS_FILE

        config = yaml.safe_load(self.config_file.read_text())
        if config.get("store_url"):
            raise ConfigError(f"store_url: {self.path} keeps its store elsewhere; fork copies only a run's own store")
        target = Path(target)
        if target.exists() and any(target.iterdir()):
            raise FileExistsError(f"run directory {target} is not empty")
        if not (self.path / STORE_FILE).is_file():
            raise FileNotFoundError(f"{self.path} holds no {STORE_FILE}: nothing to fork")
        staging = target.with_name(target.name + ".forking")
        shutil.rmtree(staging, ignore_errors=True)
        try:
            # The store first, then the files: a stage the source completes meanwhile is then either not
            # complete in the copy, or complete with its adapter copied whole (adapters are renamed into place).
            staging.mkdir(parents=True)
            source, copy = sqlite3.connect(self.path / STORE_FILE), sqlite3.connect(staging / STORE_FILE)
            with copy:
                source.backup(copy)
            source.close()
            copy.close()
            # Tracker ids stay behind: the fork logs to tracker runs of its own, not into the source's.
            skip = shutil.ignore_patterns("tensorboard", "wandb", "*.png", STORE_FILE + "*", IDS_FILE + "*")
            shutil.copytree(self.path, staging, ignore=skip, dirs_exist_ok=True)
            copied = RunDir(staging)
            with ReplayStore(copied.store_url) as store:
                if at is not None:
                    store.truncate(at)
                store.forget_running()  # the source's heartbeat and running stage are not the fork's
                kept = store.completed_stages()
            copied.keep_only(kept)  # also what the source was writing for a stage still running
            if "run_dir" in config:  # where the fork lives now
                config["run_dir"] = str(target)
            (staging / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        shutil.rmtree(target, ignore_errors=True)
        staging.replace(target)
        return RunDir(target)

    def keep_only(self, stages: Sequence[str]) -> None:
        """Removes the adapters and metrics lines of every stage but ``stages`` (a fork cut at a stage)."""
        import shutil

        from agentloop.metrics import JSONL_NAME, read_metrics

        adapters = {self.adapter(stage).name for stage in stages}
        for found in (self.path / "adapters").glob("*"):
            if found.name not in adapters:
                shutil.rmtree(found) if found.is_dir() else found.unlink()
        metrics = self.path / JSONL_NAME
        if metrics.is_file():
            keep = set(stages)  # read_metrics skips a line torn by a kill; written back as MetricsLogger writes
            records = [r for r in read_metrics(metrics) if isinstance(r, dict) and r.get("stage") in keep]
            metrics.write_text("".join(json.dumps(r, allow_nan=False) + "\n" for r in records))

    @property
    def starts_file(self) -> Path:
        return self.path / "starts.jsonl"

    def record_start(self, argv: Sequence[str]) -> dict[str, Any]:
        """Appends to ``starts.jsonl`` what started (or resumed) the run: when, the command line, the commit of
        the code (``dirty`` when its tracked files differ from it; "" outside a git checkout) and the host, so a
        record made from the run later can say which code ran each part of it. Returns the line."""
        import platform

        commit = code_commit()
        start = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "argv": list(argv), "commit": commit,
            "dirty": bool(commit and _git("status", "--porcelain", "--untracked-files=no")),
            "host": platform.node(), "cpu": _cpu_model(),
        }  # fmt: skip
        cut = self.starts_file.is_file() and not self.starts_file.read_bytes().endswith(b"\n")
        with open(self.starts_file, "a") as log:
            log.write(("\n" if cut else "") + json.dumps(start) + "\n")  # after a line a crash cut: a line of its own
        return start

    def starts(self) -> list[dict[str, Any]]:
        """What :meth:`record_start` wrote, oldest first (none for runs made before it existed)."""
        if not self.starts_file.is_file():
            return []
        found = []
        for line in self.starts_file.read_text().splitlines():
            try:
                found.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line a crash cut
        return found

    def commits(self) -> str:
        """The commits of the code that started or resumed the run, oldest first, comma-separated ("" when none
        was recorded)."""
        return ",".join(dict.fromkeys(start["commit"] for start in self.starts() if start.get("commit")))

    def save_config(self, config: Any) -> None:
        """Writes the resolved config into the run directory (replacing it whole)."""
        temporary = self.config_file.with_suffix(".yaml.tmp")
        temporary.write_text(yaml.safe_dump(_plain(to_dict(config)), sort_keys=False))
        temporary.replace(self.config_file)


def code_commit() -> str:
    """The commit of the agentloop checkout running ("" outside a git checkout, or without git)."""
    return _git("rev-parse", "HEAD")


def _git(*args: str) -> str:
    """A git command's output in agentloop's own checkout; "" when it fails or git is missing."""
    import subprocess

    here = str(Path(__file__).resolve().parent)
    try:
        done = subprocess.run(["git", "-C", here, *args], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return ""
    return done.stdout.strip() if done.returncode == 0 else ""


def _cpu_model() -> str:
    """The CPU's model name (Linux), else the platform's processor string."""
    import platform

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def check_resume(
    saved: Any,
    config: Any,
    completed: Sequence[str],
    reads: Mapping[str, Sequence[str]],
    free: Sequence[str] = (),
) -> list[str]:
    """Refuses a resumed config that changes a setting a completed stage read.

    Settings are dotted keys of the config (``policy.model``, ``sft.epochs``; a list such as
    ``envs`` is one setting). A changed setting is accepted when it is ``free`` (it changes
    how fast, not what a stage computes) or when no completed stage reads it: the stages
    still to run use the new value.

    Args:
        saved: The run's saved config.
        config: The config the resumed run would use.
        completed: The run's completed stages (``explore/1``, ...).
        reads: For each stage family (a stage name's part before ``/``), the settings or
            sections it reads (``"sft"`` covers every ``sft.*``); an entry under a stage's whole
            name (``"sft/1"``) takes its family's place for that stage.
        free: Settings any resumed run may change.

    Returns:
        The changed settings, all accepted.

    Raises:
        ConfigError: Naming the first changed setting that a completed stage read.
    """
    before, after = _flat(to_dict(saved)), _flat(to_dict(config))
    changed = [key for key in dict.fromkeys([*before, *after]) if before.get(key) != after.get(key)]
    for key in changed:
        if _covers(free, key):
            continue
        for stage in completed:
            if _covers(reads.get(stage, reads.get(stage.split("/")[0], ())), key):
                raise ConfigError(
                    f"{key}: completed stage {stage} ran with {before.get(key)!r}; a resumed run cannot change it "
                    f"to {after.get(key)!r} (resume without this override, or start a new run)"
                )
    return changed


def _covers(prefixes: Sequence[str], key: str) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def _flat(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}, "c": [..]}`` as ``{"a.b": 1, "c": [..]}``."""
    flat: dict[str, Any] = {}
    for name, value in data.items():
        if isinstance(value, Mapping):
            flat |= _flat(value, f"{prefix}{name}.")
        else:
            flat[f"{prefix}{name}"] = _plain(value)
    return flat


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return str(value) if isinstance(value, Path) else value


class Heartbeat:
    """Writes that the run is alive into its store every ``every`` seconds (:meth:`ReplayStore.beat`), from a
    daemon thread, until closed or the process dies: the dashboard tells a stage still running from one a
    killed or crashed run left behind by it. A beat that fails (the store busy, say) is skipped, never raised.
    """

    def __init__(self, store: Any, every: float | None = None) -> None:
        import threading

        from agentloop.replay.tables import HEARTBEAT_SECONDS

        self.store, self.every = store, HEARTBEAT_SECONDS if every is None else every
        self._stop = threading.Event()
        self._beat()
        self._thread = threading.Thread(target=self._run, name="agentloop-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        try:
            self.store.beat()
        except Exception as e:  # noqa: BLE001 - a watcher's convenience must never stop the run
            logger.debug("heartbeat not written: %s", e)

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self._beat()

    def close(self) -> None:
        """Stops beating (the run ends: nothing of it runs any more)."""
        self._stop.set()
        self._thread.join()


class Remembers(Protocol):
    """What a rollout stage's stored episodes feed: long-term memory (:mod:`agentloop.memory`)."""

    def distill(self, trajectories: list[Trajectory], stage: str) -> list[Experience]:
        """The experiences to keep of a batch of finished episodes."""
        ...

    def add(self, experiences: list[Experience]) -> None:
        """Remembers experiences once they are stored."""
        ...


def trial_chains(trajectories: Iterable[Trajectory]) -> dict[str, list[Trajectory]]:
    """Trials by their task's key (``"<env>/<task_id>"``), each chain in trial order."""
    chains: dict[str, list[Trajectory]] = {}
    for t in trajectories:
        chains.setdefault(t.task.key, []).append(t)
    return {k: sorted(v, key=lambda t: t.trial) for k, v in chains.items()}


class Stages:
    """Runs named stages once: completed ones are skipped on resume, the rest are timed."""

    def __init__(self, run: RunDir, store: Any, metrics: Any) -> None:
        from agentloop.metrics import read_metrics

        self.run, self.store, self.metrics = run, store, metrics
        self.completed = list(store.completed_stages())
        self._logged = {r["stage"] for r in read_metrics(metrics.path)} if metrics.path.exists() else set()
        if self.completed:
            logger.info("resuming after stages: %s", ", ".join(self.completed))

    def done(self, stage: str, step: int) -> bool:
        """Whether ``stage`` completed before; if so, its metrics are in the log (logged again if a crash lost them)."""
        if stage not in self.completed:
            return False
        if stage not in self._logged:
            logger.info("%s: its metrics were committed but never logged; logging them from the store", stage)
            self.metrics.log(self.store.stage_metrics(stage), stage=stage, step=step)
            self._logged.add(stage)
        return True

    def rollout(
        self, stage: str, step: int, work: Callable[[], tuple[list[Trajectory], dict[str, float]]]
    ) -> list[Trajectory]:
        """A stage that produces trajectories (experts, explore, eval); returns them."""
        if self.done(stage, step):
            return self.store.trajectories(stage=stage)
        self.store.begin_stage(stage)
        started = time.perf_counter()
        trajectories, metrics = work()
        metrics[f"timing/{stage.split('/')[0]}"] = time.perf_counter() - started
        self._commit(stage, step, metrics, trajectories=trajectories)
        return trajectories

    def stream(
        self,
        stage: str,
        step: int,
        keys: Sequence[str],
        play: Callable[[list[str], dict[str, list[Trajectory]]], Iterable[Any]],
        metrics_of: Callable[[list[Trajectory], Any], dict[str, float]],
        *,
        ends: Callable[[Trajectory], bool] | None = None,
        memory: Remembers | None = None,
    ) -> list[Trajectory]:
        """A rollout stage whose episodes are stored as they finish, so an interrupted one resumes
        with only the episodes it lacks.

        Args:
            stage: The stage's name.
            step: Its step in the metrics log.
            keys: The episodes the stage plays (``"<env>/<task_id>"``), in order; with ``ends``,
                each key is a chain of trials of its task.
            play: Plays the given keys; yields lists of finished trajectories as they end (each
                list is stored at once), then one last item, the run's throughput stats. Its
                second argument holds, for chains begun before an interruption, their stored trials.
            metrics_of: The stage's metrics from all its trajectories (in ``keys`` order, a
                chain's trials in order) and the stats.
            ends: Whether a trial ends its chain (STE's trials); None: one episode per key.
            memory: Distills each stored batch into experiences, stored in the same transaction,
                then added to long-term memory.

        Returns:
            The stage's trajectories in ``keys`` order.
        """
        if self.done(stage, step):  # in keys order, as when it ran (its trials of keys no longer asked are left out)
            found = trial_chains(self.store.trajectories(stage=stage))
            return [t for k in keys for t in found.get(k, ())]
        ends = ends or (lambda _: True)  # without trials, a key's one episode ends it
        chains = trial_chains(self.store.trajectories(stage=stage))
        stored = {k for k, trials in chains.items() if ends(trials[-1])}
        todo = [k for k in keys if k not in stored]
        begun = {k: chains[k] for k in todo if k in chains}
        self.store.begin_stage(stage, tasks=len(keys))
        if stored or begun:
            logger.info(
                "%s: %d of %d episodes stored before (%d more begun); playing the other %d",
                stage,
                len(stored),
                len(keys),
                len(begun),
                len(todo),
            )
        started = time.perf_counter()
        stats = None
        for item in play(todo, begun) if todo else ():
            if isinstance(item, list):
                experiences = memory.distill(item, stage) if memory is not None else []
                self.store.add_episodes(item, stage, experiences)
                if experiences:
                    memory.add(experiences)
            else:
                stats = item
        found = trial_chains(self.store.trajectories(stage=stage))
        missing = [k for k in keys if k not in found or not ends(found[k][-1])]
        if missing:
            raise RuntimeError(f"{stage}: {len(missing)} episodes were never returned, e.g. {missing[:3]}")
        trajectories = [t for k in keys for t in found[k]]
        metrics = metrics_of(trajectories, stats)
        family = stage.split("/")[0]
        metrics[f"timing/{family}"] = time.perf_counter() - started
        metrics[f"{family}/resumed_episodes"] = float(len(stored))
        self._commit(stage, step, metrics)
        return trajectories

    def imagine(
        self, stage: str, step: int, work: Callable[[], tuple[list[Proposal], dict[str, float]]]
    ) -> list[Proposal]:
        """A stage that imagines tasks (STE); returns its proposals, kept or not (read back on resume)."""
        if self.done(stage, step):
            return [p for p in self.store.proposals() if p.stage == stage]
        self.store.begin_stage(stage)
        started = time.perf_counter()
        proposals, metrics = work()
        metrics[f"timing/{stage.split('/')[0]}"] = time.perf_counter() - started
        self._commit(stage, step, metrics, proposals=proposals)
        return proposals

    def train(
        self, stage: str, step: int, work: Callable[[], tuple[Files, dict[str, float]]], pairs: Sequence[Pair] = ()
    ) -> Files:
        """A stage that produces an adapter; returns its files (read back from disk on resume)."""
        target = self.run.adapter(stage)
        if self.done(stage, step):
            return pack_dir(target)
        self.store.begin_stage(stage)
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
        self._logged.add(stage)
        detail = ("/kind/", "/env/", "/by_type/", "/by_kind/", "/recovery/")
        shown = {k: round(v, 4) for k, v in metrics.items() if not any(d in k for d in detail)}
        logger.info("%s done: %s", stage, shown)
