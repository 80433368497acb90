"""Running an experiment script the way a user does: a subprocess, offline, on the test data."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def run_experiment(script: str, args: list[str], data_dir: Path, timeout: int = 1200) -> subprocess.CompletedProcess:
    """``python experiments/<script> <args>`` from the repository, its output captured."""
    env = {**os.environ, "AGENTLOOP_DATA_DIR": str(data_dir), "HF_HUB_OFFLINE": "1", "RAY_AUTH_MODE": "disabled"}
    command = [sys.executable, f"experiments/{script}", *args]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
