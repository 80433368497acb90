"""The replay store: every trajectory, preference pair and completed stage of a run, in SQL.

A run keeps its store in a SQLite file in its run directory unless configured with another
SQLAlchemy URL (PostgreSQL works the same way). The store is also the resume record: a
loop stage is *complete* once :meth:`ReplayStore.commit_stage` has written, in one
transaction, the stage's trajectories, its pairs and its completion mark. After a crash a
stage is therefore either complete, with everything it produced, or absent; trajectories a
crashed stage had already written with :meth:`ReplayStore.add` are removed by
:meth:`ReplayStore.discard_incomplete` before the stage runs again.

Pairs are given as :class:`agentloop.types.Pair` records and stored by reference: each of
their trajectories is matched by value against the trajectories of completed stages and of
the stage being committed (so a pair may use trajectories stored by the same call or by an
earlier stage). A rejected trajectory may also be a cut of a stored one ``t``, as ETO cuts
failed explorations: ``dataclasses.replace(t, messages=t.messages[:k], num_turns=...,
terminated=..., truncated=...)``; the pair then keeps a reference to ``t``, ``k`` and the
cut's end state, and every other field must equal ``t``'s. A trajectory that matches nothing
(an expert demonstration never stored before, say) is stored with the pair's stage.

One process writes a store (the loop); any number may read it. The table layout carries a
version (``meta.schema_version``, mirrored by Alembic's ``alembic_version``). Opening a
database of the current version only reads that version. An empty database gets the current
tables; an older one is migrated in place with the Alembic revisions of
:mod:`agentloop.replay.migrations`, in one transaction that keeps every row (on SQLite too:
the store takes over transaction control from the driver so that DDL rolls back); a newer
one is refused, never downgraded. Schema work holds a lock (SQLite's write lock, a
PostgreSQL advisory lock) and rereads the version under it, so two processes opening the
same old database migrate it once.
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import typing
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, TypedDict, Unpack

from sqlalchemy import ColumnElement, Connection, Engine, case, create_engine, delete, event, func, inspect, select
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, aliased

from agentloop.replay.tables import (
    ALIVE,
    BEGUN,
    SCHEMA_VERSION,
    ExperienceRow,
    MetaRow,
    PairRow,
    ProposalRow,
    StageRow,
    TrajectoryRow,
    database_now,
)
from agentloop.types import Experience, Message, Pair, Proposal, Source, Task, Trajectory

logger = logging.getLogger(__name__)

STORE_FILE = "replay.db"
"""The SQLite replay store's file in a run directory."""

GROUP_COLUMNS = (
    "env",
    "task_id",
    "split",
    "kind",
    "source",
    "policy_version",
    "iteration",
    "stage",
    "trial",
    "success",
    "terminated",
    "truncated",
    "tokenizer",
)
"""Trajectory columns that :meth:`ReplayStore.counts` and :meth:`ReplayStore.metrics` group by."""

SCHEMA_LOCK = 0x6167_6C70  # "aglp"
"""PostgreSQL advisory lock key that schema work (creation, migration) holds on a database."""


class SchemaVersionError(RuntimeError):
    """The database holds replay tables of a version this code cannot open or migrate (e.g. a newer one)."""


class TrajectoryFilter(TypedDict, total=False):
    """Filters on stored trajectories; a missing or ``None`` filter matches everything."""

    env: str | None
    task_id: str | None
    split: str | None
    kind: str | None
    source: Source | None
    iteration: int | None
    stage: str | None
    success: bool | None
    policy_version: int | None
    trial: int | None


@dataclass(frozen=True)
class GroupMetrics:
    """Outcome statistics of one group of stored trajectories."""

    episodes: int
    """Number of trajectories in the group."""
    successes: int
    """How many of them succeeded."""
    success_rate: float
    """``successes / episodes``."""
    mean_reward: float
    """Mean final reward."""
    mean_turns: float
    """Mean number of assistant turns."""
    invalid_action_rate: float
    """Invalid assistant turns over all assistant turns (0.0 when no turn was taken)."""
    tamper_attempts: int
    """Tamper attempts recorded over all the group's episodes."""
    tampering_episodes: int
    """How many episodes recorded at least one tamper attempt."""


class ReplayStore:
    """Trajectories, pairs and completed stages of one run, in a SQL database."""

    def __init__(self, url: str) -> None:
        """Connects to ``url``, creating the tables (and a SQLite file's directory) or migrating them if needed.

        Args:
            url: A SQLAlchemy URL, e.g. ``"sqlite:///runs/x/replay.db"`` or
                ``"postgresql+psycopg2://user@host:5432/db"``.

        Raises:
            SchemaVersionError: If the database holds tables of a newer or unknown schema version.
        """
        self._engine = _create_engine(url)
        shown = make_url(url).render_as_string(hide_password=True)
        with self._engine.connect() as connection:
            found = _schema_version(connection, shown)
        if found != SCHEMA_VERSION:
            _prepare_schema(self._engine, shown)
        logger.info("replay store %s (schema %d)", shown, SCHEMA_VERSION)

    def close(self) -> None:
        """Closes the store's connections."""
        self._engine.dispose()

    def __enter__(self) -> ReplayStore:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def add(self, trajectories: Iterable[Trajectory], stage: str) -> list[int]:
        """Stores a batch of trajectories of a stage that is not complete yet, all or none.

        Returns:
            The new rows' ids, in the order of ``trajectories``.

        Raises:
            ValueError: If ``stage`` is already complete.
        """
        with Session(self._engine) as session, session.begin():
            _require_open_stage(session, stage)
            rows = [_to_row(t, stage) for t in trajectories]
            session.add_all(rows)
            session.flush()
            return [row.id for row in rows]

    def add_episodes(
        self, trajectories: Iterable[Trajectory], stage: str, experiences: Iterable[Experience] = ()
    ) -> list[int]:
        """Stores finished episodes of a rollout stage that is not complete yet, as they stream in,
        with the experiences distilled from them (long-term memory), all in one transaction.

        Each episode is keyed by its task and trial (:func:`episode_key`), unique within the
        stage: a batch holding an episode the stage has already is refused whole, so a stage
        resumed after a crash cannot store an episode twice. :meth:`discard_incomplete` keeps
        these rows. Each experience belongs to an episode of the batch (same task and trial).

        Returns:
            The new rows' ids, in the order of ``trajectories``.

        Raises:
            ValueError: If ``stage`` is complete, an episode is stored in it already, or an
                experience matches no episode of the batch.
        """
        trajectories = list(trajectories)
        keys = [episode_key(t) for t in trajectories]
        if len(set(keys)) < len(keys):
            raise ValueError(f"{stage}: a batch holds the same episode twice")
        experiences = list(experiences)
        position = dict(zip(keys, range(len(keys)), strict=True))
        unmatched = [e.task.task_id for e in experiences if _experience_key(e) not in position]
        if unmatched:
            raise ValueError(f"{stage}: experiences of episodes not in the batch: {unmatched[:5]}")
        try:
            with Session(self._engine) as session, session.begin():
                _require_open_stage(session, stage)
                rows = [_to_row(t, stage, episode=k) for t, k in zip(trajectories, keys, strict=True)]
                session.add_all(rows)
                session.flush()
                session.add_all(_experience_row(e, rows[position[_experience_key(e)]].id) for e in experiences)
                return [row.id for row in rows]
        except IntegrityError as e:
            taken = sorted(set(keys) & self.episodes(stage))
            if not taken:  # another constraint (a check on a field): not a duplicate
                raise
            raise ValueError(f"{stage}: episodes stored already: {taken[:5]}") from e

    def proposals(self) -> list[Proposal]:
        """Every imagined task of the completed stages, kept or not, oldest first."""
        stmt = select(ProposalRow).where(ProposalRow.stage.in_(select(StageRow.name))).order_by(ProposalRow.id)
        with Session(self._engine) as session:
            return [
                Proposal(r.env, r.base_task_id, r.task_id, r.text, r.stage, r.valid, r.reason, r.judged)
                for r in session.scalars(stmt)
            ]

    def experiences(self) -> list[Experience]:
        """The stored experiences, oldest first: long-term memory as the run has kept it."""
        stmt = select(ExperienceRow).order_by(ExperienceRow.id)
        with Session(self._engine) as session:
            return [_experience(row) for row in session.scalars(stmt)]

    def episodes(self, stage: str) -> set[str]:
        """Keys (:func:`episode_key`) of the episodes :meth:`add_episodes` stored for ``stage``."""
        with Session(self._engine) as session:
            found = session.scalars(
                select(TrajectoryRow.episode).where(TrajectoryRow.stage == stage, TrajectoryRow.episode.is_not(None))
            )
            return set(found)

    def commit_stage(
        self,
        stage: str,
        *,
        trajectories: Iterable[Trajectory] = (),
        pairs: Iterable[Pair] = (),
        proposals: Iterable[Proposal] = (),
        metrics: Mapping[str, float],
    ) -> None:
        """Stores a stage's remaining trajectories, its pairs, its imagined tasks and its completion,
        in one transaction.

        Args:
            stage: The stage name, e.g. ``"explore/1"``; each stage completes once.
            trajectories: Trajectories of the stage not yet stored with :meth:`add`.
            pairs: Pairs the stage built (see the module docstring for how they are matched).
            proposals: Tasks the stage imagined, kept or not (their ``stage`` is ``stage``).
            metrics: The stage's metrics, returned later by :meth:`stage_metrics`.

        Raises:
            ValueError: If the stage is already complete, or a pair's trajectories attempt
                another task than the pair.
            TypeError: If a metric value is not a number.
        """
        pairs = list(pairs)
        for pair in pairs:
            if not pair.task == pair.chosen.task == pair.rejected.task:
                raise ValueError(f"pair of task {pair.task.task_id!r} holds a trajectory of another task")
        encoded = _encode_metrics(metrics)
        with Session(self._engine) as session, session.begin():
            _require_open_stage(session, stage)
            rows = [_to_row(t, stage) for t in trajectories]
            session.add_all(rows)
            session.flush()
            index = _TrajectoryIndex(session, stage)
            session.add_all(index.pair_row(pair) for pair in pairs)
            session.add_all(_proposal_row(p, stage) for p in proposals)
            position = (session.scalar(select(func.max(StageRow.position))) or 0) + 1
            session.add(StageRow(name=stage, position=position, metrics=encoded))
        logger.info("stage %s complete: %d trajectories, %d pairs", stage, len(rows), len(pairs))

    def begin_stage(self, stage: str, *, tasks: int | None = None) -> None:
        """Records that ``stage`` is under way: when it began (now) and, for a rollout stage, how many tasks
        it plays. Only watchers (the dashboard) read it; a resumed stage records its new beginning.

        Raises:
            ValueError: If the stage is already complete.
        """
        value = json.dumps({"started": datetime.now(UTC).isoformat(), "tasks": tasks})
        with Session(self._engine) as session, session.begin():
            _require_open_stage(session, stage)
            session.merge(MetaRow(key=BEGUN + stage, value=value))

    def beat(self) -> None:
        """Records that the process writing this store is alive now (``meta.alive``: when, its host and pid).
        Only watchers read it (:class:`agentloop.loop.Heartbeat` calls this every ``HEARTBEAT_SECONDS``, 30 s)."""
        with Session(self._engine) as session, session.begin():
            at = database_now(session).isoformat()  # the database's clock, which the dashboard reads it against
            value = json.dumps({"at": at, "host": socket.gethostname(), "pid": os.getpid()})
            session.merge(MetaRow(key=ALIVE, value=value))

    def forget_running(self) -> None:
        """Deletes what tells watchers a process is writing this store: its heartbeat and the beginnings of
        stages not complete (their streamed episodes stay, for ``--resume``). For a copy of a run
        (:meth:`agentloop.loop.RunDir.fork`): nothing runs it until it is resumed, which begins its stage again."""
        with Session(self._engine) as session, session.begin():
            done = [BEGUN + name for name in session.scalars(select(StageRow.name))]
            session.execute(delete(MetaRow).where(MetaRow.key == ALIVE))
            session.execute(delete(MetaRow).where(MetaRow.key.startswith(BEGUN), MetaRow.key.not_in(done)))

    def completed_stages(self) -> list[str]:
        """Names of the completed stages, in completion order."""
        with Session(self._engine) as session:
            return list(session.scalars(select(StageRow.name).order_by(StageRow.position)))

    def stage_metrics(self, stage: str) -> dict[str, float]:
        """The metrics a completed stage was committed with.

        Raises:
            KeyError: If the stage is not complete.
        """
        with Session(self._engine) as session:
            row = session.get(StageRow, stage)
            if row is None:
                raise KeyError(stage)
            return {name: float(value) for name, value in row.metrics.items()}

    def discard_incomplete(self) -> int:
        """Deletes the trajectories of stages that never completed (call before resuming),
        except streamed episodes (:meth:`add_episodes`): a resumed stage keeps those and runs
        only the episodes it lacks.

        Returns:
            The number of trajectories deleted.
        """
        with Session(self._engine) as session, session.begin():
            done = select(StageRow.name)
            result = session.execute(
                delete(TrajectoryRow).where(TrajectoryRow.stage.not_in(done), TrajectoryRow.episode.is_(None))
            )
            deleted = result.rowcount  # type: ignore[attr-defined]
        if deleted:
            logger.warning("discarded %d trajectories of incomplete stages", deleted)
        return deleted

    def truncate(self, last: str) -> list[str]:
        """Deletes everything after the completed stage ``last``: the later stages and those never
        completed, with their trajectories, pairs, experiences, imagined tasks and beginnings, in one
        transaction. For a copy of a run to go on from ``last`` (:meth:`agentloop.loop.RunDir.fork`).

        Returns:
            The deleted completed stages, in completion order.

        Raises:
            KeyError: If ``last`` is not a completed stage.
        """
        with Session(self._engine) as session, session.begin():
            position = session.scalar(select(StageRow.position).where(StageRow.name == last))
            if position is None:
                done = ", ".join(session.scalars(select(StageRow.name).order_by(StageRow.position)))
                raise KeyError(f"{last!r} is not a completed stage; completed: {done or 'none'}")
            after = select(StageRow.name).where(StageRow.position > position).order_by(StageRow.position)
            later = list(session.scalars(after))
            kept = select(StageRow.name).where(StageRow.position <= position)
            for table in (PairRow, ExperienceRow, ProposalRow, TrajectoryRow):  # what references a trajectory first
                session.execute(delete(table).where(table.stage.not_in(kept)))
            session.execute(delete(StageRow).where(StageRow.position > position))
            begun = [BEGUN + name for name in session.scalars(kept)]
            session.execute(delete(MetaRow).where(MetaRow.key.startswith(BEGUN), MetaRow.key.not_in(begun)))
        if later:
            logger.info("store cut after stage %s: %s deleted", last, ", ".join(later))
        return later

    def started_stages(self) -> list[str]:
        """Stages not complete that hold streamed episodes (a crash or kill interrupted them)."""
        with Session(self._engine) as session:
            done = select(StageRow.name)
            found = session.scalars(
                select(TrajectoryRow.stage)
                .where(TrajectoryRow.stage.not_in(done), TrajectoryRow.episode.is_not(None))
                .distinct()
            )
            return sorted(found)

    def trajectories(self, *, limit: int | None = None, **filters: Unpack[TrajectoryFilter]) -> list[Trajectory]:
        """Stored trajectories matching every given filter, oldest first.

        Args:
            limit: Return at most this many.
            **filters: See :class:`TrajectoryFilter`.
        """
        stmt = select(TrajectoryRow).where(*_where(filters)).order_by(TrajectoryRow.id).limit(limit)
        with Session(self._engine) as session:
            return [_from_row(row) for row in session.scalars(stmt)]

    def pairs(self, iteration: int | None = None) -> list[Pair]:
        """Stored pairs, oldest first, optionally only those built in one iteration."""
        chosen, rejected = aliased(TrajectoryRow), aliased(TrajectoryRow)
        stmt = (
            select(PairRow, chosen, rejected)
            .join(chosen, PairRow.chosen_id == chosen.id)
            .join(rejected, PairRow.rejected_id == rejected.id)
            .order_by(PairRow.id)
        )
        if iteration is not None:
            stmt = stmt.where(PairRow.iteration == iteration)
        with Session(self._engine) as session:
            return [_pair_from_rows(*row) for row in session.execute(stmt)]

    def counts(self, by: Sequence[str] = ("stage",), **filters: Unpack[TrajectoryFilter]) -> dict[tuple[Any, ...], int]:
        """Numbers of stored trajectories per group.

        Args:
            by: Columns to group by, from :data:`GROUP_COLUMNS`; ``()`` counts all.
            **filters: See :class:`TrajectoryFilter`.

        Returns:
            Group values (in the order of ``by``) to counts, for non-empty groups.
        """
        columns = _group_columns(by)
        stmt = select(*columns, func.count()).select_from(TrajectoryRow).where(*_where(filters))
        stmt = stmt.group_by(*columns).order_by(*columns)
        with Session(self._engine) as session:
            return {tuple(row[:-1]): row[-1] for row in session.execute(stmt)}

    def metrics(
        self, by: Sequence[str] = ("stage",), **filters: Unpack[TrajectoryFilter]
    ) -> dict[tuple[Any, ...], GroupMetrics]:
        """Success rate, mean reward, mean turns, invalid-action rate and tampering per group.

        Args:
            by: Columns to group by, from :data:`GROUP_COLUMNS`, e.g. ``("stage", "kind")``.
            **filters: See :class:`TrajectoryFilter`.

        Returns:
            Group values (in the order of ``by``) to their metrics, for non-empty groups.
        """
        t = TrajectoryRow
        columns = _group_columns(by)
        sums = (
            func.count(),
            func.sum(case((t.success, 1), else_=0)),
            func.sum(t.reward),
            func.sum(t.num_turns),
            func.sum(t.invalid_actions),
            func.sum(t.tamper_attempts),
            func.sum(case((t.tamper_attempts > 0, 1), else_=0)),
        )
        stmt = select(*columns, *sums).where(*_where(filters)).group_by(*columns).order_by(*columns)
        with Session(self._engine) as session:
            return {tuple(row[: len(columns)]): _group_metrics(*row[len(columns) :]) for row in session.execute(stmt)}


class _TrajectoryIndex:
    """Finds the stored row of a pair's trajectory, or stores it, inside one transaction."""

    def __init__(self, session: Session, stage: str) -> None:
        self._session = session
        self._stage = stage
        self._candidates: dict[tuple[Any, ...], list[tuple[int, Trajectory]]] = {}

    def pair_row(self, pair: Pair) -> PairRow:
        """The row of ``pair``, its trajectories matched or stored."""
        rejected = pair.rejected
        return PairRow(
            iteration=pair.iteration,
            stage=self._stage,
            env=pair.task.env,
            task_id=pair.task.task_id,
            chosen_id=self._resolve(pair.chosen, allow_cut=False),
            rejected_id=self._resolve(rejected, allow_cut=True),
            rejected_num_messages=len(rejected.messages),
            rejected_num_turns=rejected.num_turns,
            rejected_terminated=rejected.terminated,
            rejected_truncated=rejected.truncated,
        )

    def _resolve(self, trajectory: Trajectory, *, allow_cut: bool) -> int:
        """Row id of a visible trajectory equal to ``trajectory`` (or cut to it), else of a new row."""
        candidates = self._load(trajectory)
        for row_id, stored in candidates:
            if stored == trajectory:
                return row_id
        if allow_cut:
            for row_id, stored in candidates:
                if _cut_like(stored, trajectory) == trajectory:
                    return row_id
        row = _to_row(trajectory, self._stage)
        self._session.add(row)
        self._session.flush()
        candidates.append((row.id, trajectory))
        logger.info("stored a new %s trajectory of task %s for a pair", trajectory.source, trajectory.task.task_id)
        return row.id

    def _load(self, trajectory: Trajectory) -> list[tuple[int, Trajectory]]:
        t = trajectory
        key = (t.task.env, t.task.task_id, t.source, t.iteration, t.policy_version)
        if key not in self._candidates:
            row = TrajectoryRow
            visible = row.stage.in_(select(StageRow.name)) | (row.stage == self._stage)
            stmt = (
                select(row)
                .where(row.env == key[0], row.task_id == key[1], row.source == key[2])
                .where(row.iteration == key[3], row.policy_version == key[4], visible)
                .order_by(row.id)
            )
            self._candidates[key] = [(r.id, _from_row(r)) for r in self._session.scalars(stmt)]
        return self._candidates[key]


def _create_engine(url: str) -> Engine:
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        return create_engine(url, pool_pre_ping=True)
    database = parsed.database or ""
    if database and database != ":memory:" and not database.startswith("file:"):
        Path(database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, connect_args={"timeout": 30})
    event.listen(engine, "connect", _sqlite_pragmas)
    return engine


def _schema_version(connection: Connection, shown: str) -> int | None:
    """The database's replay schema version, or None when it has no ``meta`` table (a new database).

    Raises:
        SchemaVersionError: If the version is newer than :data:`SCHEMA_VERSION`, or none this code knows.
    """
    if not inspect(connection).has_table(MetaRow.__tablename__):
        return None
    found = connection.scalar(select(MetaRow.value).where(MetaRow.key == "schema_version"))
    if found is None or not found.isdecimal() or int(found) < 1:
        raise SchemaVersionError(f"{shown} has replay schema version {found}, which this code cannot migrate")
    if int(found) > SCHEMA_VERSION:
        raise SchemaVersionError(
            f"{shown} has replay schema version {found}, newer than this code's {SCHEMA_VERSION} (never downgraded)"
        )
    return int(found)


def _prepare_schema(engine: Engine, shown: str) -> None:
    """Creates the tables of a new database, or migrates an older one to :data:`SCHEMA_VERSION`, under the lock.

    The version is read again under the lock: another process may have done the work meanwhile.
    """
    from agentloop.replay import migrations  # Alembic is imported only when there is schema work

    with _schema_transaction(engine) as connection:
        found = _schema_version(connection, shown)
        if found is None:
            migrations.create(connection)
        elif found < SCHEMA_VERSION:
            migrations.upgrade(connection, found)
    if found is not None and found < SCHEMA_VERSION:
        logger.info("replay store %s migrated from schema %d to %d", shown, found, SCHEMA_VERSION)


@contextmanager
def _schema_transaction(engine: Engine) -> Iterator[Connection]:
    """A connection inside one transaction that holds the schema lock; committed unless the block raises."""
    with engine.connect() as connection:
        if connection.dialect.name == "sqlite":
            with _sqlite_schema_transaction(connection):
                yield connection
            return
        with connection.begin():
            if connection.dialect.name == "postgresql":
                connection.execute(select(func.pg_advisory_xact_lock(SCHEMA_LOCK)))
            yield connection


@contextmanager
def _sqlite_schema_transaction(connection: Connection) -> Iterator[None]:
    """A SQLite transaction that covers DDL, holds the write lock and checks foreign keys at its end.

    The sqlite3 driver begins transactions only before DML, so DDL would commit statement by
    statement: the driver's transaction control is switched off (SQLAlchemy restores it when
    the connection returns to the pool) and ``BEGIN IMMEDIATE`` takes the write lock, so a
    second process waits here. Foreign keys are not enforced inside (a rebuilt table drops the
    rows others refer to, for a moment) and the pragma cannot change inside a transaction, so
    they are switched off around it and checked before the commit.
    """
    connection.execution_options(isolation_level="AUTOCOMMIT")
    connection.exec_driver_sql("PRAGMA foreign_keys=OFF")
    connection.commit()
    try:
        with connection.begin():
            connection.exec_driver_sql("BEGIN IMMEDIATE")
            yield
            dangling = connection.exec_driver_sql("PRAGMA foreign_key_check").all()
            if dangling:
                raise RuntimeError(f"schema work left rows with dangling foreign keys: {dangling[:5]}")
    finally:
        connection.exec_driver_sql("PRAGMA foreign_keys=ON")
        connection.commit()


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    """Write-ahead logging (readers never block the writer) and enforced foreign keys."""
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def _require_open_stage(session: Session, stage: str) -> None:
    if not stage:
        raise ValueError("a stage name must not be empty")
    if session.get(StageRow, stage) is not None:
        raise ValueError(f"stage {stage!r} is already complete")


def episode_key(t: Trajectory) -> str:
    """The key of an episode within its stage: its task (``"<env>/<task_id>"``), and for a
    later trial of the task its number (``"<env>/<task_id>#<trial>"``)."""
    return trial_key(t.task, t.trial)


def trial_key(task: Task, trial: int = 0) -> str:
    """The episode key of ``task``'s trial ``trial`` (see :func:`episode_key`)."""
    return task.key + (f"#{trial}" if trial else "")


def _experience_key(e: Experience) -> str:
    return trial_key(e.task, e.trial)


def _experience_row(e: Experience, trajectory_id: int) -> ExperienceRow:
    return ExperienceRow(
        trajectory_id=trajectory_id,
        stage=e.stage,
        env=e.task.env,
        task_id=e.task.task_id,
        split=e.task.split,
        kind=e.task.kind,
        instruction=e.task.instruction,
        trial=e.trial,
        success=e.success,
        reward=e.reward,
        reflection=e.reflection,
        actions=list(e.actions),
    )


def _proposal_row(p: Proposal, stage: str) -> ProposalRow:
    if p.stage != stage:
        raise ValueError(f"a proposal of stage {p.stage!r} committed with stage {stage!r}")
    return ProposalRow(
        stage=stage,
        env=p.env,
        base_task_id=p.base_task_id,
        task_id=p.task_id,
        text=p.text,
        valid=p.valid,
        reason=p.reason,
        judged=p.judged,
    )


def _experience(row: ExperienceRow) -> Experience:
    return Experience(
        task=Task(env=row.env, task_id=row.task_id, split=row.split, kind=row.kind, instruction=row.instruction),
        success=row.success,
        reward=row.reward,
        reflection=row.reflection,
        actions=tuple(row.actions),
        stage=row.stage,
        trial=row.trial,
    )


def _to_row(t: Trajectory, stage: str, episode: str | None = None) -> TrajectoryRow:
    return TrajectoryRow(
        env=t.task.env,
        task_id=t.task.task_id,
        split=t.task.split,
        kind=t.task.kind,
        instruction=t.task.instruction,
        source=t.source,
        policy_version=t.policy_version,
        iteration=t.iteration,
        stage=stage,
        reward=t.reward,
        success=t.success,
        terminated=t.terminated,
        truncated=t.truncated,
        num_turns=t.num_turns,
        invalid_actions=t.invalid_actions,
        generated_tokens=t.generated_tokens,
        tamper_attempts=t.tamper_attempts,
        trial=t.trial,
        memory=t.memory,
        reflection=t.reflection,
        tokenizer=t.tokenizer,
        messages=[_message_row(m) for m in t.messages],
        episode=episode,
    )


def _message_row(m: Message) -> dict:
    row = {"role": m.role, "content": m.content, "token_ids": list(m.token_ids)}
    if m.logprobs:
        row["logprobs"] = list(m.logprobs)
    if m.policy_version is not None:
        row["policy_version"] = m.policy_version
    return row


def _message(row: dict) -> Message:
    """A stored message; rows written before turns recorded log-probs and versions lack them."""
    return Message(
        row["role"], row["content"], tuple(row["token_ids"]), tuple(row.get("logprobs", ())), row.get("policy_version")
    )


def _from_row(row: TrajectoryRow) -> Trajectory:
    return Trajectory(
        task=Task(env=row.env, task_id=row.task_id, split=row.split, kind=row.kind, instruction=row.instruction),
        messages=tuple(_message(m) for m in row.messages),
        tokenizer=row.tokenizer,
        reward=row.reward,
        success=row.success,
        terminated=row.terminated,
        truncated=row.truncated,
        num_turns=row.num_turns,
        invalid_actions=row.invalid_actions,
        source=typing.cast(Source, row.source),
        policy_version=row.policy_version,
        iteration=row.iteration,
        generated_tokens=row.generated_tokens,
        tamper_attempts=row.tamper_attempts,
        trial=row.trial,
        memory=row.memory,
        reflection=row.reflection,
    )


def _cut(trajectory: Trajectory, num_messages: int, num_turns: int, terminated: bool, truncated: bool) -> Trajectory:
    """``trajectory`` cut to its first ``num_messages`` messages, with the cut's own end state."""
    return replace(
        trajectory,
        messages=trajectory.messages[:num_messages],
        num_turns=num_turns,
        terminated=terminated,
        truncated=truncated,
    )


def _cut_like(stored: Trajectory, cut: Trajectory) -> Trajectory:
    """``stored`` cut the way ``cut`` looks (equal to ``cut`` exactly when ``cut`` is a cut of it)."""
    return _cut(stored, len(cut.messages), cut.num_turns, cut.terminated, cut.truncated)


def _pair_from_rows(pair: PairRow, chosen_row: TrajectoryRow, rejected_row: TrajectoryRow) -> Pair:
    chosen = _from_row(chosen_row)
    rejected = _cut(
        _from_row(rejected_row),
        pair.rejected_num_messages,
        pair.rejected_num_turns,
        pair.rejected_terminated,
        pair.rejected_truncated,
    )
    return Pair(task=chosen.task, chosen=chosen, rejected=rejected, iteration=pair.iteration)


def _where(filters: Mapping[str, Any]) -> list[ColumnElement[bool]]:
    known = TrajectoryFilter.__annotations__
    unknown = sorted(set(filters) - set(known))
    if unknown:
        raise TypeError(f"unknown trajectory filter(s) {unknown}; known: {list(known)}")
    return [getattr(TrajectoryRow, name) == value for name, value in filters.items() if value is not None]


def _group_columns(by: Sequence[str]) -> list[Any]:
    if isinstance(by, str):
        raise TypeError("`by` is a sequence of column names, e.g. ('stage',)")
    unknown = [name for name in by if name not in GROUP_COLUMNS]
    if unknown:
        raise ValueError(f"cannot group by {unknown}; choose from {GROUP_COLUMNS}")
    return [getattr(TrajectoryRow, name) for name in by]


def _group_metrics(
    episodes: int, successes: int, reward: float, turns: int, invalid: int, tampers: int, tampering: int
) -> GroupMetrics:
    return GroupMetrics(
        episodes=episodes,
        successes=successes,
        success_rate=successes / episodes,
        mean_reward=reward / episodes,
        mean_turns=turns / episodes,
        invalid_action_rate=invalid / turns if turns else 0.0,
        tamper_attempts=tampers,
        tampering_episodes=tampering,
    )


def _encode_metrics(metrics: Mapping[str, float]) -> dict[str, float | str]:
    """Metrics as JSON-safe values: non-finite floats become ``"nan"``, ``"inf"`` or ``"-inf"``."""
    encoded: dict[str, float | str] = {}
    for name, value in metrics.items():
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise TypeError(f"metric {name!r} is {value!r}, not a number")
        encoded[name] = float(value) if math.isfinite(value) else str(float(value))
    return encoded
