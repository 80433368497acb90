"""Fixtures for the replay tests: a fresh store URL per test (on SQLite, and on the session's PostgreSQL server)."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
from postgres import PostgresServer

_database_numbers = itertools.count()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.integration)])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A URL of an empty database: a SQLite file, or a new database on the PostgreSQL server."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'run' / 'replay.db'}"
    server: PostgresServer = request.getfixturevalue("postgres_server")
    return server.create_database(f"replay_{next(_database_numbers)}")


@pytest.fixture
def other_store_url(store_url: str, request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A second empty database of the same kind as ``store_url``."""
    if store_url.startswith("sqlite"):
        return f"sqlite:///{tmp_path / 'other' / 'replay.db'}"
    server: PostgresServer = request.getfixturevalue("postgres_server")
    return server.create_database(f"replay_{next(_database_numbers)}")
