"""Alembic's entry point for the replay migrations: runs them on the connection it is handed.

:func:`agentloop.replay.migrations.config` puts the connection, already inside a transaction,
in ``config.attributes["connection"]``; that transaction (and, on SQLite, the one that makes
DDL transactional) belongs to the caller, so Alembic opens none of its own. There is no
offline (SQL script) mode.
"""

from alembic import context

from agentloop.replay.tables import Base


def run_migrations() -> None:
    """Runs the requested migrations, batch mode on (SQLite rebuilds a table to alter it)."""
    if context.is_offline_mode():
        raise NotImplementedError("the replay migrations run only on a live connection")
    connection = context.config.attributes["connection"]
    if connection is None:
        raise ValueError("pass the connection to migrate: agentloop.replay.migrations.config(connection)")
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        render_as_batch=True,
        transactional_ddl=True,  # the caller's transaction covers DDL, SQLite's included
    )
    with context.begin_transaction():
        context.run_migrations()


run_migrations()
