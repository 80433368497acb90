"""Schema 5: ``proposals.judged``, the judge's verdict on an imagined task (NULL: not judged, as
every proposal stored before).

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

META = sa.table("meta", sa.column("key", sa.String()), sa.column("value", sa.String()))


def upgrade() -> None:
    """Adds the nullable column and records the version."""
    with op.batch_alter_table("proposals") as batch:
        batch.add_column(sa.Column("judged", sa.Boolean(), nullable=True))
    op.execute(META.update().where(META.c.key == "schema_version").values(value="5"))


def downgrade() -> None:
    """The replay store only migrates forward: a newer database is refused, never downgraded."""
    raise NotImplementedError("the replay migrations do not downgrade")
