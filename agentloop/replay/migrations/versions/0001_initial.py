"""Schema 1: the replay tables as agentloop created them before it used Alembic.

Every run directory made before schema 2 holds this layout with ``meta.schema_version = '1'``
and no ``alembic_version`` table; the store stamps such a database with this revision before
upgrading it. Run on an empty database, this revision builds the same layout.

Revision ID: 0001
Revises:
Create Date: 2026-01-01
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Creates the four schema-1 tables and records the version."""
    meta = op.create_table(
        "meta",
        sa.Column("key", sa.String(), primary_key=True),
        sa.Column("value", sa.String(), nullable=False),
    )
    _create_trajectories()
    op.create_table(
        "stages",
        sa.Column("name", sa.String(), primary_key=True),
        sa.Column("position", sa.Integer(), nullable=False, unique=True),
        sa.Column("completed_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("metrics", sa.JSON(), nullable=False),
    )
    _create_pairs()
    op.bulk_insert(meta, [{"key": "schema_version", "value": "1"}])


def _create_trajectories() -> None:
    op.create_table(
        "trajectories",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("env", sa.String(), nullable=False),
        sa.Column("task_id", sa.String(), nullable=False),
        sa.Column("split", sa.String(), nullable=False),
        sa.Column("kind", sa.String(), nullable=False),
        sa.Column("instruction", sa.Text(), nullable=False),
        sa.Column("source", sa.String(), nullable=False),
        sa.Column("policy_version", sa.Integer(), nullable=False),
        sa.Column("iteration", sa.Integer(), nullable=False),
        sa.Column("stage", sa.String(), nullable=False),
        sa.Column("reward", sa.Double(), nullable=False),
        sa.Column("success", sa.Boolean(), nullable=False),
        sa.Column("terminated", sa.Boolean(), nullable=False),
        sa.Column("truncated", sa.Boolean(), nullable=False),
        sa.Column("num_turns", sa.Integer(), nullable=False),
        sa.Column("invalid_actions", sa.Integer(), nullable=False),
        sa.Column("generated_tokens", sa.Integer(), nullable=False),
        sa.Column("tokenizer", sa.String(), nullable=False),
        sa.Column("messages", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("source IN ('expert', 'explore', 'eval')", name="ck_trajectories_source"),
        sa.CheckConstraint("num_turns >= 0 AND invalid_actions >= 0", name="ck_trajectories_turns"),
    )
    op.create_index("ix_trajectories_env_task", "trajectories", ["env", "task_id"])
    op.create_index("ix_trajectories_iteration_source", "trajectories", ["iteration", "source"])
    op.create_index("ix_trajectories_stage", "trajectories", ["stage"])


def _create_pairs() -> None:
    op.create_table(
        "pairs",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("iteration", sa.Integer(), nullable=False),
        sa.Column("stage", sa.String(), nullable=False),
        sa.Column("env", sa.String(), nullable=False),
        sa.Column("task_id", sa.String(), nullable=False),
        sa.Column("chosen_id", sa.Integer(), sa.ForeignKey("trajectories.id"), nullable=False),
        sa.Column("rejected_id", sa.Integer(), sa.ForeignKey("trajectories.id"), nullable=False),
        sa.Column("rejected_num_messages", sa.Integer(), nullable=False),
        sa.Column("rejected_num_turns", sa.Integer(), nullable=False),
        sa.Column("rejected_terminated", sa.Boolean(), nullable=False),
        sa.Column("rejected_truncated", sa.Boolean(), nullable=False),
    )
    op.create_index("ix_pairs_iteration", "pairs", ["iteration"])


def downgrade() -> None:
    """The replay store only migrates forward: a newer database is refused, never downgraded."""
    raise NotImplementedError("the replay migrations do not downgrade")
