"""The replay store's tables, as SQLAlchemy 2 typed ORM models.

Six tables: ``trajectories`` (one row per episode, its conversation as JSON),
``pairs`` (DPO pairs that point at two trajectory rows), ``experiences`` (trials distilled
for long-term memory, each pointing at its trajectory row), ``proposals`` (imagined tasks),
``stages`` (one row per completed
loop stage, the resume record) and ``meta`` (the schema version, and when each stage began). Any change here bumps
:data:`SCHEMA_VERSION` and adds the Alembic revision that migrates a database of the previous
version (:mod:`agentloop.replay.migrations`): the store migrates older databases when it opens
them and refuses newer ones.
"""

from __future__ import annotations

import typing
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    CheckConstraint,
    Connection,
    DateTime,
    Double,
    ForeignKey,
    Index,
    String,
    Text,
    func,
    select,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from agentloop.types import Source

SCHEMA_VERSION = 6
"""Version of the table layout below; stored in ``meta`` under ``schema_version``.

Alembic revision ``f"{SCHEMA_VERSION:04d}"`` of :mod:`agentloop.replay.migrations` brings a
database to it (2: ``trajectories.tamper_attempts``; 3: ``trajectories.episode``, unique per
stage; 4: ``trajectories.trial``, ``memory`` and ``reflection``, and the ``experiences`` and ``proposals`` tables;
5: ``proposals.judged``; 6: indexes on ``pairs.chosen_id``, ``pairs.rejected_id`` and
``experiences.trajectory_id``).
"""

SOURCES = typing.get_args(Source)


def _now() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    """Declarative base of the replay tables."""


BEGUN = "begun/"
"""``meta`` keys ``begun/<stage>``: when a stage began and how many tasks it plays (JSON), written by
:meth:`agentloop.replay.ReplayStore.begin_stage` for watchers; nothing decides work from them."""
ALIVE = "alive"
"""``meta`` key: when the process running the loop last said it was alive, its host and pid (JSON), written
every :data:`HEARTBEAT_SECONDS` by :meth:`agentloop.replay.ReplayStore.beat`, for watchers: a stage still
running in a store whose run stopped beating was abandoned (the run was killed or crashed)."""
HEARTBEAT_SECONDS = 30.0
"""How often a running loop writes :data:`ALIVE`."""


def database_now(connection: Connection | Session) -> datetime:
    """The database server's clock, in UTC: the heartbeat is written and read against it, so a dashboard on
    another host than the run's (PostgreSQL on a cluster) is not misled by the two hosts' clocks differing."""
    now = connection.scalar(select(func.current_timestamp()))
    return now.replace(tzinfo=UTC) if now.tzinfo is None else now.astimezone(UTC)  # SQLite's is naive UTC


class MetaRow(Base):
    """A key/value fact about the database itself (``schema_version``; ``begun/<stage>``, see :data:`BEGUN`;
    ``alive``, the writer's last heartbeat, see :data:`ALIVE`)."""

    __tablename__ = "meta"

    key: Mapped[str] = mapped_column(String, primary_key=True)
    value: Mapped[str] = mapped_column(String)


class TrajectoryRow(Base):
    """One stored :class:`agentloop.types.Trajectory`, its task fields flattened."""

    __tablename__ = "trajectories"
    __table_args__ = (
        CheckConstraint(f"source IN ({', '.join(repr(s) for s in SOURCES)})", name="ck_trajectories_source"),
        CheckConstraint("num_turns >= 0 AND invalid_actions >= 0", name="ck_trajectories_turns"),
        CheckConstraint("tamper_attempts >= 0", name="ck_trajectories_tamper_attempts"),
        CheckConstraint("trial >= 0", name="ck_trajectories_trial"),
        Index("ix_trajectories_env_task", "env", "task_id"),
        Index("ix_trajectories_iteration_source", "iteration", "source"),
        Index("ix_trajectories_stage", "stage"),
        Index("ux_trajectories_stage_episode", "stage", "episode", unique=True),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    env: Mapped[str] = mapped_column(String)
    task_id: Mapped[str] = mapped_column(String)
    split: Mapped[str] = mapped_column(String)
    kind: Mapped[str] = mapped_column(String)
    instruction: Mapped[str] = mapped_column(Text)
    source: Mapped[str] = mapped_column(String)
    policy_version: Mapped[int]
    iteration: Mapped[int]
    stage: Mapped[str] = mapped_column(String)
    """The loop stage that stored the row, e.g. ``"eval/base"`` or ``"explore/1"``."""
    reward: Mapped[float] = mapped_column(Double)
    success: Mapped[bool]
    terminated: Mapped[bool]
    truncated: Mapped[bool]
    num_turns: Mapped[int]
    invalid_actions: Mapped[int]
    generated_tokens: Mapped[int]
    tamper_attempts: Mapped[int] = mapped_column(server_default=text("0"))
    """Added in schema 2; rows migrated from schema 1 hold 0."""
    trial: Mapped[int] = mapped_column(server_default=text("0"))
    """Which trial of its task the episode was in its stage (added in schema 4; 0 before)."""
    memory: Mapped[str] = mapped_column(Text, server_default="")
    """Memory shown before the first observation (added in schema 4; empty before)."""
    reflection: Mapped[str] = mapped_column(Text, server_default="")
    """What was written about the episode after it ended (added in schema 4; empty before)."""
    episode: Mapped[str | None] = mapped_column(String, nullable=True)
    """``"<env>/<task_id>"`` (``"<env>/<task_id>#<trial>"`` for a later trial) for an episode a
    rollout stage streamed in (unique within its stage: a stage resumed after a crash can never
    store an episode twice); NULL for rows stored otherwise (experts, cut pair trajectories) and
    rows from before schema 3."""
    tokenizer: Mapped[str] = mapped_column(String)
    messages: Mapped[list[dict[str, Any]]] = mapped_column(JSON)
    """``[{"role": ..., "content": ..., "token_ids": [...]}, ...]`` in conversation order."""
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)


class PairRow(Base):
    """One stored :class:`agentloop.types.Pair`: two trajectory rows and how the rejected one was cut.

    A cut keeps a prefix of the messages and has its own end state (turns, terminated,
    truncated); every other field is the stored trajectory's.
    """

    __tablename__ = "pairs"
    __table_args__ = (
        Index("ix_pairs_iteration", "iteration"),
        Index("ix_pairs_chosen_id", "chosen_id"),  # schema 6, as the two below
        Index("ix_pairs_rejected_id", "rejected_id"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    iteration: Mapped[int]
    stage: Mapped[str] = mapped_column(String)
    """The loop stage that built the pair."""
    env: Mapped[str] = mapped_column(String)
    task_id: Mapped[str] = mapped_column(String)
    chosen_id: Mapped[int] = mapped_column(ForeignKey("trajectories.id"))
    rejected_id: Mapped[int] = mapped_column(ForeignKey("trajectories.id"))
    rejected_num_messages: Mapped[int]
    """How many leading messages of the rejected trajectory the pair keeps (ETO cuts failures)."""
    rejected_num_turns: Mapped[int]
    """``num_turns`` of the pair's rejected trajectory (a cut one counts only the kept turns)."""
    rejected_terminated: Mapped[bool]
    """``terminated`` of the pair's rejected trajectory (a cut one did not end by itself)."""
    rejected_truncated: Mapped[bool]
    """``truncated`` of the pair's rejected trajectory (a cut one ran out of turns)."""


class ExperienceRow(Base):
    """One stored :class:`agentloop.types.Experience`: a trial distilled for long-term memory.

    Written in the same transaction as the trajectory it distills, so memory rebuilt from the
    store after a crash holds exactly the trials that were kept.
    """

    __tablename__ = "experiences"
    __table_args__ = (Index("ix_experiences_stage", "stage"), Index("ix_experiences_trajectory_id", "trajectory_id"))

    id: Mapped[int] = mapped_column(primary_key=True)
    trajectory_id: Mapped[int] = mapped_column(ForeignKey("trajectories.id"))
    """The trial it distills."""
    stage: Mapped[str] = mapped_column(String)
    env: Mapped[str] = mapped_column(String)
    task_id: Mapped[str] = mapped_column(String)
    split: Mapped[str] = mapped_column(String)
    kind: Mapped[str] = mapped_column(String)
    instruction: Mapped[str] = mapped_column(Text)
    trial: Mapped[int]
    success: Mapped[bool] = mapped_column(Boolean)
    reward: Mapped[float] = mapped_column(Double)
    reflection: Mapped[str] = mapped_column(Text)
    actions: Mapped[list[str]] = mapped_column(JSON)


class ProposalRow(Base):
    """One stored :class:`agentloop.types.Proposal`: an imagined task, kept or not (schema 4; ``judged`` since 5)."""

    __tablename__ = "proposals"
    __table_args__ = (Index("ix_proposals_stage", "stage"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    stage: Mapped[str] = mapped_column(String)
    env: Mapped[str] = mapped_column(String)
    base_task_id: Mapped[str] = mapped_column(String)
    task_id: Mapped[str] = mapped_column(String, unique=True)
    text: Mapped[str] = mapped_column(Text)
    valid: Mapped[bool] = mapped_column(Boolean)
    reason: Mapped[str] = mapped_column(Text)
    judged: Mapped[bool | None] = mapped_column(Boolean, nullable=True)  # schema 5


class StageRow(Base):
    """A completed loop stage: written in the same transaction as everything it produced."""

    __tablename__ = "stages"

    name: Mapped[str] = mapped_column(String, primary_key=True)
    position: Mapped[int] = mapped_column(unique=True)
    """Completion order, 1 for the first stage completed."""
    completed_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON)
    """The stage's metrics; non-finite floats are stored as the strings ``"nan"``, ``"inf"``, ``"-inf"``."""
