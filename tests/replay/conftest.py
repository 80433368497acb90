"""Fixtures for the replay tests: a throwaway PostgreSQL server and a fresh store URL per test."""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from postgres import PostgresServer, PostgresUnavailable, find_bindir

_database_numbers = itertools.count()


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """A PostgreSQL server for the whole session; skipped where absent, required when ``CI=true``."""
    bindir = find_bindir()
    try:
        if bindir is None:
            raise PostgresUnavailable("PostgreSQL server programs (initdb, pg_ctl, postgres) not found")
        server = PostgresServer(bindir)
        _start(server)
    except PostgresUnavailable as e:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{e}; CI must provide a PostgreSQL server")
        pytest.skip(str(e))
    try:
        yield server
    finally:
        server.stop()


def _start(server: PostgresServer) -> None:
    try:
        server.start()
    except BaseException:
        server.stop()
        raise


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
