"""${message}

Revision ID: ${up_revision}
Revises: ${down_revision | comma,n}
Create Date: ${create_date}
"""

import sqlalchemy as sa
from alembic import op
${imports if imports else ""}
revision = ${repr(up_revision)}
down_revision = ${repr(down_revision)}
branch_labels = ${repr(branch_labels)}
depends_on = ${repr(depends_on)}

META = sa.table("meta", sa.column("key", sa.String()), sa.column("value", sa.String()))


def upgrade() -> None:
    """Brings schema ${int(down_revision) if down_revision else 0} to ${int(up_revision)}."""
    ${upgrades if upgrades else "# the schema change, e.g. in op.batch_alter_table(...) (SQLite rebuilds the table)"}
    op.execute(META.update().where(META.c.key == "schema_version").values(value="${int(up_revision)}"))


def downgrade() -> None:
    """The replay store only migrates forward: a newer database is refused, never downgraded."""
    raise NotImplementedError("the replay migrations do not downgrade")
