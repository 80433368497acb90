"""The dashboard a run starts (``dashboard.enabled=true``): a real child server over a real store, its config
checked before any work, and its lifetime tied to the run's process."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest
from localnet import free_port, get

from agentloop.config import ConfigError, load_config
from agentloop.dashboard.launch import TOKEN_ENV, DashboardConfig, start_dashboard


def answers(url: str) -> bool:
    try:
        return get(url)[0] == 200
    except OSError:
        return False


def test_a_bad_dashboard_config_names_its_key(monkeypatch):
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    with pytest.raises(ConfigError, match=r"^port: 70000"):
        load_config(DashboardConfig, overrides=["port=70000"])
    with pytest.raises(ConfigError, match=f"^host: .*{TOKEN_ENV}"):
        load_config(DashboardConfig, overrides=["enabled=true", "host=0.0.0.0"])
    load_config(DashboardConfig, overrides=["host=0.0.0.0"])  # off: nothing is served, nothing to guard
    monkeypatch.setenv(TOKEN_ENV, "s3cret")
    assert load_config(DashboardConfig, overrides=["enabled=true", "host=0.0.0.0"]).host == "0.0.0.0"


def test_off_by_default_and_then_nothing_starts(tmp_path):
    assert start_dashboard(DashboardConfig(), "sqlite:///nowhere.db", tmp_path) is None


def test_the_run_dashboard_serves_the_store_live_and_stops_when_closed(tmp_path, run_store):
    path, ids = run_store
    config = DashboardConfig(enabled=True, port=free_port())
    dashboard = start_dashboard(config, f"sqlite:///{path}", tmp_path)
    try:
        status, body = get(dashboard.url + "api/run")
        assert status == 200 and [s["name"] for s in json.loads(body)["stages"]][:2] == ["experts", "eval/base"]
        status, page = get(dashboard.url + f"trajectories/{ids['hostile']}")
        assert status == 200 and "&lt;script&gt;" in page
    finally:
        dashboard.close()
    assert dashboard.process.returncode is not None and not answers(dashboard.url + "api/version")
    dashboard.close()  # twice is fine


def test_a_taken_port_stops_the_run_naming_the_key(tmp_path, run_store):
    path, _ = run_store
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        config = DashboardConfig(enabled=True, port=taken.getsockname()[1])
        with pytest.raises(ConfigError, match=r"^dashboard\.port: cannot bind"):
            start_dashboard(config, f"sqlite:///{path}", tmp_path)


def test_a_server_that_cannot_start_stops_the_run_with_its_output(tmp_path):
    config = DashboardConfig(enabled=True, port=free_port(), start_timeout=60)
    with pytest.raises(ConfigError, match=r"^dashboard\.enabled: .*no replay store"):
        start_dashboard(config, f"sqlite:///{tmp_path / 'missing.db'}", tmp_path)
    assert (tmp_path / "dashboard.log").is_file()


def test_the_dashboard_dies_with_a_killed_run(tmp_path, run_store):
    """A run killed with SIGKILL cannot close its dashboard: the dashboard notices and stops by itself."""
    path, _ = run_store
    port = free_port()
    script = textwrap.dedent(f"""
        import time
        from agentloop.dashboard.launch import DashboardConfig, start_dashboard
        start_dashboard(DashboardConfig(enabled=True, port={port}), "sqlite:///{path}", {str(tmp_path)!r})
        print("up", flush=True)
        time.sleep(600)
    """)
    run = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert run.stdout.readline().startswith("dashboard: ") and run.stdout.readline() == "up\n"
        url = f"http://127.0.0.1:{port}/api/version"
        assert answers(url)
        os.kill(run.pid, signal.SIGKILL)
        run.wait(10)
        deadline = time.monotonic() + 30
        while answers(url) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not answers(url)
    finally:
        if run.poll() is None:
            run.kill()
