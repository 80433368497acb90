"""The dashboard tests' run store (built by :mod:`dashboard_run`)."""

from __future__ import annotations

from pathlib import Path

import pytest
from dashboard_run import build_run


@pytest.fixture
def run_store(tmp_path: Path) -> tuple[Path, dict[str, int]]:
    """A replay store file holding a small run, and the ids of its notable rows."""
    path = tmp_path / "run" / "replay.db"
    return path, build_run(f"sqlite:///{path}")
