"""Fixtures for the actor tests: training tasks of the DB env."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="session")
def db_tasks(data_dir):
    from agentloop import envs

    return envs.load_tasks("db", data_dir, "train")[:12]
