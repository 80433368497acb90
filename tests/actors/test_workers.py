"""The actors' process environment: an allocator that gives freed memory back."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from agentloop.actors.workers import allocator_env


def test_actor_processes_get_jemalloc_or_fixed_glibc_thresholds(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("LD_PRELOAD", "MALLOC_CONF", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"):
        monkeypatch.delenv(name, raising=False)
    env = allocator_env()
    assert "LD_PRELOAD" in env or env.keys() == {"MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"}
    # The variables take effect in a new process, as in a Ray worker started with them.
    maps = subprocess.run(
        [sys.executable, "-c", "print(open('/proc/self/maps').read())"],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        check=True,
    )
    assert ("jemalloc" in maps.stdout) == ("LD_PRELOAD" in env)
    assert "cannot be preloaded" not in maps.stderr


def test_a_users_own_allocator_settings_win(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LD_PRELOAD", "libtcmalloc_minimal.so.4")
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    env = allocator_env()
    assert "LD_PRELOAD" not in env and "MALLOC_MMAP_THRESHOLD_" not in env
