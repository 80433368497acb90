"""This machine's network for tests: a free TCP port, and HTTP GETs that never go through a proxy."""

from __future__ import annotations

import socket
import urllib.request


def free_port() -> int:
    """A local TCP port nobody listens on (free when asked; bind it soon)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str, timeout: float = 10) -> tuple[int, str]:
    """Status and body of a GET, ignoring the environment's proxy settings (raises on errors)."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url, timeout=timeout) as response:
        return response.status, response.read().decode()
