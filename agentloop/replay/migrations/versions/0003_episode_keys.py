"""Schema 3: ``trajectories.episode``, the key of a streamed episode, unique within its stage.

Rows stored before hold NULL (a unique index lets NULLs repeat). SQLite rebuilds the table
in batch mode, as for schema 2.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

META = sa.table("meta", sa.column("key", sa.String()), sa.column("value", sa.String()))


def upgrade() -> None:
    """Adds the nullable column and the unique index, and records the version."""
    with op.batch_alter_table("trajectories") as batch:
        batch.add_column(sa.Column("episode", sa.String(), nullable=True))
        batch.create_index("ux_trajectories_stage_episode", ["stage", "episode"], unique=True)
    op.execute(META.update().where(META.c.key == "schema_version").values(value="3"))


def downgrade() -> None:
    """The replay store only migrates forward: a newer database is refused, never downgraded."""
    raise NotImplementedError("the replay migrations do not downgrade")
