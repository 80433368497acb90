"""Schema 2: ``trajectories.tamper_attempts``, 0 for every episode stored before.

SQLite cannot add a table constraint in place: batch mode rebuilds ``trajectories`` (copy,
drop, rename) with its indexes and checks, which is why the store runs migrations with
SQLite's foreign-key enforcement off. PostgreSQL alters the table directly.

Revision ID: 0002
Revises: 0001
Create Date: 2026-01-01
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

META = sa.table("meta", sa.column("key", sa.String()), sa.column("value", sa.String()))


def upgrade() -> None:
    """Adds the column (server default 0) and its check, and records the version."""
    with op.batch_alter_table("trajectories") as batch:
        batch.add_column(sa.Column("tamper_attempts", sa.Integer(), nullable=False, server_default=sa.text("0")))
        batch.create_check_constraint("ck_trajectories_tamper_attempts", "tamper_attempts >= 0")
    op.execute(META.update().where(META.c.key == "schema_version").values(value="2"))


def downgrade() -> None:
    """The replay store only migrates forward: a newer database is refused, never downgraded."""
    raise NotImplementedError("the replay migrations do not downgrade")
