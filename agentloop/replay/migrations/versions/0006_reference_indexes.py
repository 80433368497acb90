"""Schema 6: indexes on the columns that reference a trajectory (``pairs.chosen_id``,
``pairs.rejected_id``, ``experiences.trajectory_id``).

PostgreSQL does not index a foreign key's referencing side by itself: without these, deleting a
trajectory (discarding an interrupted stage) scans ``pairs`` and ``experiences`` once per row, and
the dashboard's "pairs of this trajectory" scans ``pairs``. Indexes only: no row changes.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

META = sa.table("meta", sa.column("key", sa.String()), sa.column("value", sa.String()))


def upgrade() -> None:
    """Creates the three indexes and records the version."""
    op.create_index("ix_pairs_chosen_id", "pairs", ["chosen_id"])
    op.create_index("ix_pairs_rejected_id", "pairs", ["rejected_id"])
    op.create_index("ix_experiences_trajectory_id", "experiences", ["trajectory_id"])
    op.execute(META.update().where(META.c.key == "schema_version").values(value="6"))


def downgrade() -> None:
    """The replay store only migrates forward: a newer database is refused, never downgraded."""
    raise NotImplementedError("the replay migrations do not downgrade")
