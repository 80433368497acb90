"""The dashboard started by a run (``dashboard.enabled=true``): ``agentloop dashboard`` in a child process.

The child serves the run's store read-only while the run writes it, in its own process so that neither
slows the other, and it stops with the run: at :meth:`Dashboard.close`, and on its own when the run's
process is gone (``--exit-with``), even after a ``kill -9``. Its port is checked before the run's trackers
start (:func:`check_port`), and it is started after the store exists and before any work, so a port that is
taken or a server that cannot start stops the run naming its key.

The token of a dashboard bound off localhost is never part of the config (the config is saved in the run
directory and logged to the trackers): it comes from ``AGENTLOOP_DASHBOARD_TOKEN``, as for the command.
Only the standard library is imported here; the server's libraries load in the child.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from agentloop.config import ConfigError

TOKEN_ENV = "AGENTLOOP_DASHBOARD_TOKEN"
"""The secret every request must carry when the dashboard binds off localhost."""
STORE_ENV = "AGENTLOOP_DASHBOARD_STORE"
"""How the run hands its store URL to the child (never on its command line, where ``ps`` shows passwords)."""
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
"""Addresses reachable only from this machine: the dashboard serves them without a token."""
LOG_FILE = "dashboard.log"
"""The child's output, in the run directory."""


@dataclass
class DashboardConfig:
    """The live dashboard of a run (``agentloop dashboard`` over its store), served while it runs."""

    enabled: bool = False
    """Serve the dashboard from the run's start to its end (``agentloop dashboard --store RUN`` serves it
    any time, also after the run)."""
    host: str = "127.0.0.1"
    """Address to bind; another than localhost needs ``AGENTLOOP_DASHBOARD_TOKEN`` set."""
    port: int = 8765
    start_timeout: float = 60.0
    """Seconds to wait for the server to answer before the run gives up (its libraries load first)."""

    def validate(self) -> None:
        if not 0 < self.port < 65536:
            raise ConfigError(f"port: {self.port} is not a TCP port (1-65535)")
        if self.start_timeout <= 0:
            raise ConfigError(f"start_timeout: must be > 0, got {self.start_timeout}")
        if self.enabled and self.host not in LOCAL_HOSTS and not os.environ.get(TOKEN_ENV):
            raise ConfigError(
                f"host: binding to {self.host} exposes the run beyond this machine; set {TOKEN_ENV} to a secret "
                "(it is never written to the config), or keep 127.0.0.1"
            )


class Dashboard:
    """A running dashboard child process; :meth:`close` stops it."""

    def __init__(self, process: subprocess.Popen, url: str, log: Path) -> None:
        self.process, self.url, self.log = process, url, log

    def close(self, timeout: float = 10.0) -> None:
        """Stops the server (SIGTERM, then SIGKILL after ``timeout`` seconds); safe to call twice."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_dashboard(config: DashboardConfig, store_url: str, run_dir: Path) -> Dashboard | None:
    """Starts the dashboard of the store at ``store_url`` and waits until it answers; None when not enabled.

    Args:
        config: The experiment's ``dashboard`` section.
        store_url: The run's replay store (it must exist: the dashboard never creates one).
        run_dir: The run directory; the child's output goes to ``dashboard.log`` there.

    Raises:
        ConfigError: Naming ``dashboard.port`` when the port is taken, or the key whose server did not start.
    """
    if not config.enabled:
        return None
    check_port(config, wait=0)  # the run waited for it before its trackers started
    log = Path(run_dir) / LOG_FILE
    command = [sys.executable, "-m", "agentloop", "dashboard", "--host", config.host, "--port", str(config.port)]
    command += ["--exit-with", str(os.getpid())]
    env = {**os.environ, STORE_ENV: store_url}
    with open(log, "ab") as out:
        process = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
    shown = f"[{config.host}]" if ":" in config.host else config.host
    dashboard = Dashboard(process, f"http://{shown}:{config.port}/", log)
    deadline = time.monotonic() + config.start_timeout
    while not _answers(dashboard.url, os.environ.get(TOKEN_ENV)):
        if process.poll() is not None or time.monotonic() > deadline:
            dashboard.close()
            tail = log.read_text(errors="replace").strip().splitlines()[-5:]
            raise ConfigError(
                f"dashboard.enabled: the dashboard did not start on {config.host}:{config.port} "
                f"(see {log}): {' | '.join(tail) or 'no output'}"
            )
        time.sleep(0.2)
    suffix = "  (open it once with ?token=...)" if config.host not in LOCAL_HOSTS else ""
    print(f"dashboard: {dashboard.url}{suffix}")
    return dashboard


def check_port(config: DashboardConfig, wait: float = 5.0) -> None:
    """Fails when the dashboard's port cannot be bound, after waiting up to ``wait`` seconds for it to free up
    (the dashboard of a run killed just before stops within about a second of noticing).

    Raises:
        ConfigError: Naming ``dashboard.port``.
    """
    if not config.enabled:
        return
    family = socket.AF_INET6 if ":" in config.host else socket.AF_INET
    deadline = time.monotonic() + wait
    while True:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((config.host, config.port))
                return
            except OSError as e:
                if time.monotonic() > deadline:
                    raise ConfigError(
                        f"dashboard.port: cannot bind {config.host}:{config.port} ({e.strerror}); choose another port"
                    ) from e
        time.sleep(0.25)


def _answers(url: str, token: str | None) -> bool:
    request = urllib.request.Request(url + "api/version")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never through a proxy of the environment
    try:
        with direct.open(request, timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False
