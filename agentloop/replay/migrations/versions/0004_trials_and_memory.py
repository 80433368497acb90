"""Schema 4: STE's trials and memory. ``trajectories.trial`` (0), ``memory`` and ``reflection``
(empty) for every episode stored before, the ``experiences`` table (long-term memory) and the
``proposals`` table (imagined tasks).

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

META = sa.table("meta", sa.column("key", sa.String()), sa.column("value", sa.String()))


def upgrade() -> None:
    """Adds the columns with server defaults and the new table, and records the version."""
    with op.batch_alter_table("trajectories") as batch:
        batch.add_column(sa.Column("trial", sa.Integer(), nullable=False, server_default=sa.text("0")))
        batch.add_column(sa.Column("memory", sa.Text(), nullable=False, server_default=""))
        batch.add_column(sa.Column("reflection", sa.Text(), nullable=False, server_default=""))
        batch.create_check_constraint("ck_trajectories_trial", "trial >= 0")
    op.create_table(
        "experiences",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("trajectory_id", sa.Integer(), sa.ForeignKey("trajectories.id"), nullable=False),
        sa.Column("stage", sa.String(), nullable=False),
        sa.Column("env", sa.String(), nullable=False),
        sa.Column("task_id", sa.String(), nullable=False),
        sa.Column("split", sa.String(), nullable=False),
        sa.Column("kind", sa.String(), nullable=False),
        sa.Column("instruction", sa.Text(), nullable=False),
        sa.Column("trial", sa.Integer(), nullable=False),
        sa.Column("success", sa.Boolean(), nullable=False),
        sa.Column("reward", sa.Double(), nullable=False),
        sa.Column("reflection", sa.Text(), nullable=False),
        sa.Column("actions", sa.JSON(), nullable=False),
    )
    op.create_index("ix_experiences_stage", "experiences", ["stage"])
    op.create_table(
        "proposals",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("stage", sa.String(), nullable=False),
        sa.Column("env", sa.String(), nullable=False),
        sa.Column("base_task_id", sa.String(), nullable=False),
        sa.Column("task_id", sa.String(), nullable=False, unique=True),
        sa.Column("text", sa.Text(), nullable=False),
        sa.Column("valid", sa.Boolean(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
    )
    op.create_index("ix_proposals_stage", "proposals", ["stage"])
    op.execute(META.update().where(META.c.key == "schema_version").values(value="4"))


def downgrade() -> None:
    """The replay store only migrates forward: a newer database is refused, never downgraded."""
    raise NotImplementedError("the replay migrations do not downgrade")
