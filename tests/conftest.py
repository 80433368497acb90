"""Shared fixtures: the task data directory, a tiny random model on disk, a PostgreSQL server."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).parent))

REPO = Path(__file__).resolve().parent.parent


def _data_dir() -> Path:
    return Path(os.environ.get("AGENTLOOP_DATA_DIR", REPO.parent / "shared" / "data")).resolve()


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The task data directory (``AGENTLOOP_DATA_DIR``, else ``../shared/data``)."""
    path = _data_dir()
    if not (path / "dbbench").is_dir():
        pytest.skip(f"task data not found in {path}; set AGENTLOOP_DATA_DIR")
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer random Gemma 3 model with a 320-token BPE tokenizer, saved to disk."""
    from assets import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[Any]:
    """A PostgreSQL server for the whole session; skipped where absent, required when ``CI=true``."""
    from postgres import PostgresServer, PostgresUnavailable, find_bindir

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


def _start(server: Any) -> None:
    try:
        server.start()
    except BaseException:
        server.stop()
        raise
