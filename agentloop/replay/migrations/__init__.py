"""The replay tables' Alembic migrations, shipped inside the package and configured in code.

Revision ``NNNN`` brings a database to schema version ``N`` (:data:`SCHEMA_VERSION`, which
each revision also writes to ``meta.schema_version``): ``0001`` is the layout agentloop
created before it used Alembic, ``0002`` adds ``trajectories.tamper_attempts``. There is no
``alembic.ini``: :func:`config` points Alembic at this directory and hands ``env.py`` the
connection to work on. :class:`agentloop.replay.ReplayStore` calls :func:`create` and
:func:`upgrade` inside the one transaction in which it holds the schema lock, and imports
this module only when a database needs either; Alembic itself is imported on first use.

A new schema version changes :mod:`agentloop.replay.tables`, bumps ``SCHEMA_VERSION`` and
adds ``versions/NNNN_<what>.py`` with ``revision = "NNNN"``, written by hand or by
``alembic.command.revision(config(), "<what>", rev_id="NNNN")``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import Connection, insert

from agentloop.replay.tables import SCHEMA_VERSION, Base, MetaRow

if TYPE_CHECKING:
    from alembic.config import Config

SCRIPT_LOCATION = Path(__file__).resolve().parent
"""The Alembic script directory: ``env.py``, ``script.py.mako`` and ``versions/``."""


def revision(version: int) -> str:
    """The Alembic revision that brings a database to schema ``version``."""
    return f"{version:04d}"


def config(connection: Connection | None = None) -> Config:
    """Alembic's configuration for the replay migrations, to run on ``connection``."""
    with _quiet_alembic():
        from alembic.config import Config

    alembic_config = Config()
    alembic_config.set_main_option("script_location", str(SCRIPT_LOCATION).replace("%", "%%"))
    alembic_config.set_main_option("path_separator", "os")
    alembic_config.attributes["connection"] = connection
    return alembic_config


def create(connection: Connection) -> None:
    """Creates the current tables in an empty database and stamps them with their revision.

    Raises:
        sqlalchemy.exc.DatabaseError: If a replay table exists already (a database that holds
            tables but no schema version is not one to build on).
    """
    Base.metadata.create_all(connection, checkfirst=False)
    connection.execute(insert(MetaRow).values(key="schema_version", value=str(SCHEMA_VERSION)))
    with _quiet_alembic():
        from alembic import command

        command.stamp(config(connection), revision(SCHEMA_VERSION))


def upgrade(connection: Connection, version: int) -> None:
    """Migrates a database of schema ``version`` to :data:`SCHEMA_VERSION`, keeping every row.

    The database is first stamped with ``version``'s revision: schema 1 predates Alembic and
    has no ``alembic_version`` table, and ``meta.schema_version`` is what the store trusts.
    """
    alembic_config = config(connection)
    with _quiet_alembic():
        from alembic import command

        command.stamp(alembic_config, revision(version))
        command.upgrade(alembic_config, revision(SCHEMA_VERSION))


@contextmanager
def _quiet_alembic() -> Iterator[None]:
    """Holds back Alembic's INFO lines: the store logs one line per migration instead.

    Alembic logs its plugins when first imported (hence the imports inside this scope), then
    its context and every step. A level someone set on the ``alembic`` logger is left as it is.
    """
    alembic_logger = logging.getLogger("alembic")
    quiet = alembic_logger.level == logging.NOTSET
    if quiet:
        alembic_logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        if quiet:
            alembic_logger.setLevel(logging.NOTSET)
